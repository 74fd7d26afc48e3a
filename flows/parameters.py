"""The merge flow's ``spec`` parameter: a partial :class:`~mergeflow.spec.MergeSpec` layered
over the deployment's defaults.

Prefect merges a run's parameters with its deployment's defaults one top-level name at a time,
so a run that passes ``spec`` would replace the whole default ``spec`` (device, workers, ...).
The flow's parameter is therefore :class:`MergeRequest`, MergeSpec with every field optional
(the same names, types, checks and descriptions, so the UI form and the server's schema check
still know them), and the flow layers it over the deployment's default ``spec``
(:func:`layered`). A field left out or null keeps the default.

What the run form shows is the JSON schema (:func:`form_schema`): each field as MergeSpec types
it (an enum as a dropdown, no ``null`` alternative, so no str/None toggle and no "(Optional)"
label), no default (an empty field is left out, so the deployment's default stands; the
description says MergeSpec's), and ``adapter`` and ``out`` marked required. Python callers and
the flow still pass None for "not set"; the event triggers build ``spec`` from the payload's
keys alone (``deployments/prefect.yaml``), so nothing sends a null the server would refuse.

The batch flow (``flows/batch.py``) takes :class:`BatchRequest` the same way: MergeRequest without
``adapter``, since its adapters are a list of their own, and with ``out`` the folder the outputs
go under.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from mergeflow.spec import MergeSpec


def _optional(name: str) -> tuple[Any, Any]:
    """MergeSpec field ``name`` as an optional field: its type and checks, default None."""
    field = MergeSpec.model_fields[name]
    annotation = Annotated[(field.annotation, *field.metadata)] if field.metadata \
        else field.annotation
    return annotation | None, Field(None, description=field.description,
                                    json_schema_extra=field.json_schema_extra)


REQUIRED = ("adapter", "out")  # a run cannot do without them; no deployment default gives them


def form_schema(schema: dict[str, Any], model: type[BaseModel] | None = None) -> None:
    """The request's JSON schema as the run form renders it (see the module docstring): each
    ``anyOf [T, null]`` becomes ``T``, the ``null`` defaults go, and ``adapter``/``out`` are
    required. Pydantic calls this when it builds the schema; validation is unchanged."""
    for name, prop in schema.get("properties", {}).items():
        kinds = [k for k in prop.pop("anyOf", []) if k.get("type") != "null"]
        if len(kinds) == 1:
            prop.update(kinds[0])
        elif kinds:
            prop["anyOf"] = kinds
        if prop.get("default", 0) is None:
            del prop["default"]
        default = MergeSpec.model_fields[name].default if name in MergeSpec.model_fields else None
        if default not in (None, [], "") and "Default" not in prop.get("description", ""):
            prop["description"] = f"{prop.get('description', '')} Default: {default}.".strip()
    schema["required"] = [n for n in REQUIRED if n in schema.get("properties", {})]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra=form_schema)

    @model_validator(mode="before")
    @classmethod
    def _from_spec(cls, data: Any) -> Any:
        """A whole MergeSpec (the CLI's, a test's) is a request that sets every field it has."""
        return data.model_dump(include=set(cls.model_fields)) if isinstance(data, MergeSpec) \
            else data

    def fields_set(self) -> dict[str, Any]:
        """The fields this request sets (None: left to the defaults)."""
        return self.model_dump(mode="json", exclude_none=True)


MergeRequest = create_model(
    "MergeRequest", __base__=_Request,
    __doc__="A merge request: any MergeSpec fields; the rest come from the deployment's "
            "default spec. A run needs adapter and out, from the request or the defaults.",
    **{name: _optional(name) for name in MergeSpec.model_fields})

BatchRequest = create_model(
    "BatchRequest", __base__=_Request,
    __doc__="The options every output of a batch shares: any MergeSpec field but adapter (the "
            "run's adapters are a list of their own); out is the folder the outputs go under, "
            "each at out/<name>. The rest come from the deployment's default spec.",
    **{name: _optional(name) for name in MergeSpec.model_fields if name != "adapter"})


def layered(defaults: Mapping[str, Any] | None, request: Mapping[str, Any] | BaseModel | None
            ) -> MergeSpec:
    """``request``'s fields over the ``defaults`` (a deployment's default ``spec``), validated.

    Fields that are None (or absent) are left to the defaults.

    Raises:
        pydantic.ValidationError: the result is not a valid :class:`MergeSpec` (e.g. neither
            gives ``adapter``).
    """
    if isinstance(request, BaseModel):
        request = request.model_dump(mode="json")
    base = {k: v for k, v in (defaults or {}).items() if v is not None} \
        if isinstance(defaults, Mapping) else {}
    base.update({k: v for k, v in (request or {}).items() if v is not None})
    return MergeSpec.model_validate(base)
