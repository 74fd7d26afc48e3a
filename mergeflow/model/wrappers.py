"""The parameters an adapter with ``target_parameters`` adapts whole (PEFT's ``ParamWrapper``),
as PEFT itself wraps them on the base model built on the ``meta`` device: their experts count,
layout, rank and scale.

Asking PEFT imports transformers' model code and PEFT (seconds, and 0.2 GiB), so the answer is
cached like the layout (:mod:`mergeflow.model.layout`), as JSON in ``$MERGEFLOW_CACHE/wrappers/``,
keyed by the canonical JSON of ``config.json``, the bytes of ``adapter_config.json`` and the
Mergeflow, transformers and PEFT versions: a second merge of the same base with the same adapter
configuration imports neither. A damaged cache entry is ignored and rewritten.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import asdict
from pathlib import Path

from mergeflow.errors import AdapterError, PlanError
from mergeflow.model.config import config_digest
from mergeflow.model.meta import meta_model
from mergeflow.model.modelmap import WrappedParam
from mergeflow.storage.memo import installed_version, memo_path, read_memo, write_memo

CACHE_FORMAT = 1
ADAPTER_CONFIG = "adapter_config.json"
Wrapped = dict[str, WrappedParam]  # adapter module name -> the parameter PEFT wraps there


def read_param_wrappers(config_dir: Path, adapter_dir: Path) -> dict[str, WrappedParam]:
    """The parameters an adapter with ``target_parameters`` adapts whole, by adapter module
    name (its saved keys less ``.lora_A.weight``), as PEFT itself wraps them (cached).

    PEFT is asked directly: its ``get_peft_model`` runs on the base model built on the ``meta``
    device, so the nesting of several wrapped parameters on one module (``experts.base_layer``
    is the first one PEFT wrapped), the experts count, the layout and the scale are PEFT's own.

    Raises:
        PlanError: transformers cannot build the base model.
        AdapterError: PEFT cannot read ``adapter_config.json``.
    """
    cached = cached_param_wrappers(config_dir, adapter_dir)
    if cached is not None:
        return cached
    path = _cache_path(config_dir, adapter_dir)
    wrapped = _peft_wrappers(config_dir, adapter_dir)
    if path is not None:
        write_memo(path, {"format": CACHE_FORMAT,
                          "wrapped": {name: asdict(w) for name, w in wrapped.items()}})
    return wrapped


def cached_param_wrappers(config_dir: Path, adapter_dir: Path) -> dict[str, WrappedParam] | None:
    """:func:`read_param_wrappers`' cached answer, or None (without importing anything)."""
    path = _cache_path(config_dir, adapter_dir)
    return _load_cached(path) if path is not None else None


def _peft_wrappers(config_dir: Path, adapter_dir: Path) -> dict[str, WrappedParam]:
    """:func:`read_param_wrappers`, asked of PEFT (no cache)."""
    try:
        model, _ = meta_model(config_dir)
    except Exception as exc:
        raise PlanError(f"{config_dir}: transformers cannot build this model ({exc}); an adapter "
                        "with target_parameters needs the model's own code") from exc
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.layer import ParamWrapper

    try:
        config = LoraConfig.from_pretrained(str(adapter_dir))
    except Exception as exc:
        raise AdapterError(f"{adapter_dir / ADAPTER_CONFIG}: PEFT cannot read it ({exc})") from exc
    config.inference_mode = True
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, config)
    wrapped = {}
    prefix = "base_model.model."
    for name, module in peft_model.named_modules():
        if not isinstance(module, ParamWrapper):
            continue
        owner = name.removeprefix(prefix).replace(".base_layer", "")
        param = module.get_param()
        adapter_name = next(iter(module.r))
        wrapped[name.removeprefix(prefix)] = WrappedParam(
            param=f"{owner}.{module.parameter_name}", shape=tuple(param.shape),
            experts=module.num_experts,
            b_left=module.num_experts == 1 or module._did_swap_in_out_features,
            rank=module.r[adapter_name], scale=float(module.scaling[adapter_name]))
    return wrapped


# -- the cache ------------------------------------------------------------------------------


def _cache_path(config_dir: Path, adapter_dir: Path) -> Path | None:
    """Where the answer for this ``config.json`` and ``adapter_config.json`` is cached; None when
    either cannot be read (then nothing is cached, and asking PEFT reports the problem)."""
    config = config_digest(config_dir)
    try:
        adapter_config = (adapter_dir / ADAPTER_CONFIG).read_bytes()
    except OSError:
        return None
    if config is None:
        return None
    return memo_path("wrappers", {
        "format": CACHE_FORMAT, "config": config,
        "adapter_config": hashlib.sha256(adapter_config).hexdigest(),
        "transformers": installed_version("transformers"), "peft": installed_version("peft")})


def _load_cached(path: Path) -> dict[str, WrappedParam] | None:
    """A cached answer, or None when there is none or it is damaged in any way."""
    data = read_memo(path)
    if data is None or data.get("format") != CACHE_FORMAT or not isinstance(data.get("wrapped"), dict):
        return None
    wrapped = {}
    for name, entry in data["wrapped"].items():
        param = _wrapped_param(entry)
        if param is None:
            return None
        wrapped[name] = param
    return wrapped or None


def _wrapped_param(entry: object) -> WrappedParam | None:
    """One cached :class:`WrappedParam`, or None when any field is missing or of the wrong type."""
    if not isinstance(entry, dict):
        return None
    param, shape, experts, b_left, rank, scale = (entry.get(k) for k in (
        "param", "shape", "experts", "b_left", "rank", "scale"))
    counts = (experts, rank)
    if not (isinstance(param, str) and isinstance(shape, list) and isinstance(b_left, bool)
            and all(isinstance(d, int) and not isinstance(d, bool) for d in (*shape, *counts))
            and isinstance(scale, int | float) and not isinstance(scale, bool)
            and math.isfinite(scale)):
        return None
    return WrappedParam(param=param, shape=tuple(shape), experts=experts, b_left=b_left,
                        rank=rank, scale=float(scale))
