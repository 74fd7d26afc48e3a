"""MergeSpec is the one place options are declared (issue 15, item 4): one size parser shared
with ``plan.parse_size``, a JSON schema the Prefect deployment can enforce, and the option
combinations that cannot mean anything refused by the spec itself."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

import mergeflow
from mergeflow.errors import InputError, OptionsError
from mergeflow.plan import parse_size
from mergeflow.spec import SIZE_PATTERN, MergeSpec, size_bytes

SIZE_FIELDS = ["max_shard_size", "block_size", "memory_limit"]

ACCEPTED = {
    "5GB": 5 * 10**9, "5gb": 5 * 10**9, "5Gb": 5 * 10**9, "500MB": 500 * 10**6,
    "500MiB": 500 * 2**20, "500mib": 500 * 2**20, "2GiB": 2 * 2**30, "2GIB": 2 * 2**30,
    "1000000": 10**6, "1000000B": 10**6, "7b": 7, "100KB": 100_000, "10 KiB": 10 * 1024,
    " 1.5KB ": 1500, "0.5GiB": 2**29, "1TB": 10**12, "1tib": 2**40, "3 mb": 3 * 10**6,
    "24MiB": 24 * 2**20, 123: 123,
}
REJECTED = ["lots", "5XB", "GB", "", " ", "0", "0KB", "0.0001B", "-1GB", "1e3", "5 G B", "5G",
            "5M", "5KiBB", "1,000", "0x10", ".5GB", "5.GB", "5GB!", "inf", "nan", "1.5.5MB", 0,
            -3]


def _spec_accepts(field: str, value) -> bool:
    try:
        MergeSpec(adapter="a", out="o", **{field: value})
    except ValidationError as exc:
        [error] = exc.errors()
        assert error["loc"] == (field,) and error["type"] == "byte_size", error
        return False
    return True


def _parse(value) -> int | None:
    try:
        return parse_size(value)
    except InputError as exc:
        assert "`max_shard_size`" in str(exc)
        return None


@pytest.mark.parametrize("field", SIZE_FIELDS)
@pytest.mark.parametrize("value", [*ACCEPTED, *REJECTED], ids=repr)
def test_the_spec_and_parse_size_agree(field, value):
    expected = ACCEPTED.get(value) if not isinstance(value, int) or value > 0 else None
    assert _parse(value) == expected
    assert _spec_accepts(field, value) == (expected is not None)
    if expected is not None:
        assert size_bytes(MergeSpec(adapter="a", out="o", **{field: value}).model_dump()[field]) \
            == expected


_SIZE_TEXT = st.builds(
    lambda space1, number, space2, unit, space3: f"{space1}{number}{space2}{unit}{space3}",
    st.sampled_from(["", " ", "\t"]),
    st.one_of(st.integers(0, 10**6).map(str),
              st.tuples(st.integers(0, 999), st.integers(0, 999)).map(lambda t: f"{t[0]}.{t[1]}"),
              st.text("0123456789.-e+x,", min_size=1, max_size=6)),
    st.sampled_from(["", " ", "  "]),
    st.one_of(st.sampled_from(["", "B", "b", "KB", "kb", "Kb", "kB", "MB", "mB", "GB", "gb", "TB",
                               "KiB", "kib", "KIB", "MiB", "mib", "GiB", "gIb", "TiB", "K", "M",
                               "G", "iB", "PB", "PiB", "KiBB", "bit", "B B"]),
              st.text("BbGgIiKkMmTtX ", max_size=4)),
    st.sampled_from(["", " ", "\n"]),
)


@settings(max_examples=400, deadline=None)
@given(_SIZE_TEXT)
def test_parse_size_the_spec_and_the_json_pattern_agree_on_any_text(text):
    parsed = _parse(text)
    assert _spec_accepts("max_shard_size", text) == (parsed is not None)
    assert _spec_accepts("memory_limit", text) == (parsed is not None)
    # The schema's pattern (what the Prefect form checks) is the same language, less positivity.
    if parsed is not None:
        assert re.search(SIZE_PATTERN, text)
    elif re.search(SIZE_PATTERN, text):
        with pytest.raises(ValueError, match="positive"):
            size_bytes(text)


def test_sizes_stay_json_and_the_flow_schema_enforces_them():
    from prefect.utilities.schema_tools.validation import validate

    from flows.merge import merge_adapter

    spec = MergeSpec(adapter="a", out="o", max_shard_size="5gb", block_size=4096,
                     memory_limit="2GiB")
    dumped = spec.model_dump(mode="json")
    assert (dumped["max_shard_size"], dumped["block_size"], dumped["memory_limit"]) == \
        ("5gb", "4096", "2GiB")
    assert MergeSpec.model_validate_json(json.dumps(dumped)) == spec
    json.dumps(MergeSpec.model_json_schema())

    # The flow takes a partial spec (every field optional, layered over the deployment's
    # defaults), with the same size pattern.
    schema = merge_adapter.parameters.model_dump()
    properties = schema["definitions"]["MergeRequest"]["properties"]
    assert properties["max_shard_size"]["type"] == "string"
    assert properties["max_shard_size"]["pattern"] == SIZE_PATTERN
    assert "default" not in properties["block_size"]  # left empty: the deployment's default
    good = {"spec": {"adapter": "a", "out": "o", "max_shard_size": "5gb", "memory_limit": "1 GiB"}}
    assert validate(good, schema, preprocess=True) == []
    bad = {"spec": {"adapter": "a", "out": "o", "max_shard_size": "5 gigs"}}
    assert validate(bad, schema, preprocess=True)


COMBINATIONS = {
    "needs `original_base=PATH`": dict(merge_onto="original"),
    "only read with `merge_onto=original`": dict(original_base="/orig"),
    "`save_method=lora` exports the adapter unmerged": dict(save_method="lora",
                                                            merge_onto="original",
                                                            original_base="/orig"),
    "`low_disk=True` needs `push_to`": dict(low_disk=True),
}


@pytest.mark.parametrize("message", COMBINATIONS)
def test_option_combinations_are_refused_by_the_spec(message, tmp_path):
    options = COMBINATIONS[message]
    with pytest.raises(ValidationError) as caught:
        MergeSpec(adapter="a", out="o", **options)
    [error] = caught.value.errors()
    assert error["loc"] == () and error["type"] == "option_combination"
    assert message in error["msg"]
    # The Python API raises them as an InputError (as before), which is also a ValueError.
    with pytest.raises(OptionsError, match=re.escape(message)) as raised:
        mergeflow.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", **options)
    assert isinstance(raised.value, InputError) and isinstance(raised.value, ValueError)
    assert not (tmp_path / "out").exists()


def test_prepare_checks_the_combinations_of_an_unvalidated_copy(tmp_path):
    from mergeflow.pipeline import steps as api

    spec = MergeSpec(adapter="a", out=str(tmp_path / "o")).model_copy(
        update={"merge_onto": "original"})
    with pytest.raises(OptionsError, match="needs `original_base=PATH`"):
        api.prepare(spec)


def test_valid_combinations_pass():
    MergeSpec(adapter="a", out="o", merge_onto="original", original_base="/orig")
    MergeSpec(adapter="a", out="o", save_method="lora")
    MergeSpec(adapter="a", out="o", low_disk=True, push_to="s3://b/p")


def test_the_run_form_offers_the_save_methods_as_a_dropdown_with_the_pair():
    """``save_method`` stays an enum in the Prefect form (a dropdown), the one pair included;
    the flow's partial spec normalizes and refuses pairs as MergeSpec does."""
    from prefect.utilities.schema_tools.validation import validate

    from flows.merge import merge_adapter
    from flows.parameters import layered

    schema = merge_adapter.parameters.model_dump()
    field = schema["definitions"]["MergeRequest"]["properties"]["save_method"]
    choices = field["enum"]
    assert choices == ["merged_16bit", "merged_4bit", "lora", "gguf", "fp8", "merged_16bit,gguf"]
    pair = {"spec": {"adapter": "a", "out": "o", "save_method": "merged_16bit,gguf"}}
    assert validate(pair, schema, preprocess=True) == []
    assert validate({"spec": {"adapter": "a", "out": "o", "save_method": "lora,gguf"}}, schema,
                    preprocess=True)
    defaults = {"adapter": "a", "out": "o", "save_method": "gguf"}
    assert layered(defaults, {"save_method": "gguf,merged_16bit"}).save_method == \
        "merged_16bit,gguf"
    with pytest.raises(ValidationError, match="only merged_16bit,gguf combines save methods"):
        layered({}, {"adapter": "a", "out": "o", "save_method": "lora,gguf"})
