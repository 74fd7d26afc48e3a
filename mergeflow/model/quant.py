"""bitsandbytes 4-bit / 8-bit bases: find each quantized weight's siblings and plan its output.

(:func:`detect` is also the one entry for FP8 and MXFP4 bases, whose layouts
:mod:`mergeflow.model.fp8` and :mod:`mergeflow.model.mxfp4` read into the same :class:`QuantSpec`
units.)

A checkpoint that ``transformers`` saved from a bitsandbytes-quantized model stores each
quantized weight as a *unit*: the stored weight plus sibling tensors that describe how to decode
it. 4-bit (nf4 / fp4), ``X.weight`` is the packed uint8 tensor ``((n + 1) // 2, 1)`` and::

    X.weight.absmax                        per-block scales (uint8 when double-quantized)
    X.weight.quant_map                     the 16-value code book
    X.weight.nested_absmax                 double quant only: scales of the scales
    X.weight.nested_quant_map              double quant only: their code book
    X.weight.quant_state.bitsandbytes__nf4 uint8 bytes of a JSON dict (shape, dtype, blocksize, ...)

8-bit (LLM.int8), ``X.weight`` is int8 ``(out, in)`` with ``X.SCB`` (per-row absmax, (out,)) and
``X.weight_format`` (a uint8 scalar; 0 is the row-major layout, the only one there is today).

:func:`detect` finds the units from headers (plus the few-hundred-byte quant-state JSON of each
4-bit weight, which holds its real shape); :func:`output_keys` and :func:`output_infos` say what a
unit is written as. Decoding a unit and encoding a merged weight back into the same layout, with
the base's own settings, is execution's job: :mod:`mergeflow.engine.codecs` (bitsandbytes' own
``bitsandbytes.functional``; nothing re-implements a code book).

Decisions:

* ``merged_4bit`` re-quantizes only the weights the adapter changed, with that unit's own quant
  type, blocksize, double quant and dtype; unchanged units are copied byte for byte (re-encoding
  them would round them a second time), and weights the base left unquantized (its skipped
  modules, ``lm_head``, norms, embeddings) stay unquantized. The result equals PEFT's own merge on
  the quantized model (dequantize, add, re-quantize), bit for bit in the tests.
* An 8-bit (LLM.int8) base stays 8-bit under ``merged_4bit``: "re-quantize with the base's own
  settings" means int8 rows + ``SCB`` (bitsandbytes' ``int8_vectorwise_quant`` of the float16
  weight, as ``Int8Params`` does), not a change of precision.
* Output sizes are known at plan time without quantizing anything: a weight of the same shape
  re-encoded with the same settings gives tensors of exactly the base unit's sizes. The one
  exception is the quant-state JSON, which holds a float (``nested_offset``) whose text length
  varies; it is planned at its longest possible length (:func:`quant_state_size`) and padded
  with spaces, which JSON ignores and bitsandbytes/transformers load as they are.
* Planning reads each 4-bit unit's quant-state JSON (a few hundred bytes) because only it holds
  the weight's real shape; every other check uses headers alone.
* Only the uint8 4-bit storage transformers writes by default is read; other
  ``bnb_4bit_quant_storage`` dtypes, non-row int8 layouts and other quantization methods (GPTQ,
  AWQ, ...) are refused at plan time.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import BaseModel

from mergeflow.errors import CheckpointError
from mergeflow.model.checkpoint import Checkpoint, TensorInfo

QS_MARK = ".quant_state.bitsandbytes__"
BNB4_ROLES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
ROW_FORMAT = 0  # bitsandbytes' code for the row-major int8 layout
# The longest repr a Python float has: a requantized weight's quant-state JSON holds one
# (nested_offset), so its planned size assumes this and the JSON is padded with spaces to it.
LONGEST_FLOAT = -2.2250738585072014e-308
QS_SLACK = 16  # extra planned bytes for the quant-state JSON, in case bitsandbytes adds a key
FLOAT_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


class QuantSpec(BaseModel):
    """One quantized unit, as the plan records it: enough to dequantize or requantize it.

    ``siblings`` maps a role (``absmax``, ``quant_map``, ``nested_absmax``, ``nested_quant_map``,
    ``quant_state.bitsandbytes__nf4``; for 8-bit ``SCB`` and ``weight_format``) to a base key.
    ``dtype`` is the dequantized weight's dtype (the one bitsandbytes recorded when quantizing).
    """

    method: Literal["bnb4", "bnb8", "fp8", "mxfp4"]
    weight: str
    siblings: dict[str, str]
    shape: list[int]
    dtype: str
    quant_type: str | None = None
    blocksize: int | None = None
    nested: bool = False
    quant_state_size: int = 0  # bytes planned for a requantized quant-state JSON (4-bit)
    block: list[int] | None = None  # FP8: the [rows, cols] of the weight each scale covers
    name: str | None = None  # the tensor the model sees, when not the stored weight's key (MXFP4)

    @property
    def logical_name(self) -> str:
        """The name the model (and the plan) knows this weight by."""
        return self.name or self.weight

    @property
    def quant_state_key(self) -> str | None:
        """The base key of the packed quant-state JSON (4-bit), else None."""
        return next((k for r, k in self.siblings.items() if r.startswith("quant_state")), None)


@dataclass
class QuantizedBase:
    """A bitsandbytes checkpoint: its ``quantization_config`` and its quantized units."""

    method: Literal["bnb4", "bnb8", "fp8", "mxfp4"]
    config: dict
    units: dict[str, QuantSpec] = field(default_factory=dict)  # logical weight name -> unit
    siblings: set[str] = field(default_factory=set)  # every sibling key of every unit

    @property
    def bits(self) -> int:
        return 4 if self.method == "bnb4" else 8

    @property
    def library(self) -> str:
        """Who quantized it, for messages: bitsandbytes, or the FP8 format's name."""
        if self.method == "mxfp4":
            return "MXFP4"
        if self.method != "fp8":
            return "bitsandbytes"
        return "compressed-tensors" if self.config.get("quant_method") != "fp8" else "FP8"

    def describe(self) -> str:
        """A short human description, e.g. ``4-bit nf4 (double quant, blocksize 64)``."""
        if self.method == "bnb8":
            return "8-bit LLM.int8"
        if self.method == "fp8":
            blocks = sorted({"x".join(map(str, u.block or [])) for u in self.units.values()})
            return f"8-bit float e4m3, scale blocks {'/'.join(blocks)}"
        if self.method == "mxfp4":
            return "MXFP4 experts (4-bit e2m1 in groups of 32, e8m0 scales)"
        first = next(iter(self.units.values()))
        types = sorted({u.quant_type for u in self.units.values() if u.quant_type})
        blocks = sorted({u.blocksize for u in self.units.values() if u.blocksize})
        dq = "double quant" if first.nested else "no double quant"
        return (f"4-bit {'/'.join(types)} ({dq}, blocksize "
                f"{'/'.join(str(b) for b in blocks)})")

    def logical_tensors(self, base: Checkpoint) -> dict[str, TensorInfo]:
        """The base as the model sees it: units at their real shape and dtype, no siblings."""
        stored = {u.weight: u for u in self.units.values()}
        view = {}
        for name, info in base.tensors.items():
            if name in self.siblings:
                continue
            unit = stored.get(name)
            if unit is None:
                view[name] = info
            else:
                view[unit.logical_name] = TensorInfo(unit.logical_name, info.file,
                                                     tuple(unit.shape), unit.dtype)
        return view

    def logical_view(self, base: Checkpoint) -> Checkpoint:
        """A shallow copy of ``base`` whose headers are :meth:`logical_tensors`, for planning
        (reading through it still returns stored bytes)."""
        view = copy.copy(base)
        view.tensors = self.logical_tensors(base)
        return view

    def compute_dtype(self) -> str | None:
        """``bnb_4bit_compute_dtype`` as a safetensors dtype name (4-bit only), else None."""
        if self.method != "bnb4":
            return None
        name = str(self.config.get("bnb_4bit_compute_dtype") or "").removeprefix("torch.")
        return FLOAT_NAMES.get(name)


def model_dtype(config: dict) -> str:
    """The float dtype config.json says the model runs in, as a safetensors name (bfloat16 when
    it says none): the dtype a quantized base's weights are decoded to, as transformers does."""
    return FLOAT_NAMES.get(str(config.get("dtype") or config.get("torch_dtype")), "BF16")


def _config_error(path: str, message: str) -> CheckpointError:
    return CheckpointError(f"{path}: {message}")


def _find_units(base: Checkpoint) -> tuple[dict[str, str], dict[str, str]]:
    """Stored weight key -> method, and quant-state key -> weight key, from names alone."""
    methods: dict[str, str] = {}
    qs_keys: dict[str, str] = {}
    for key in base.tensors:
        if QS_MARK in key:
            weight = key.split(".quant_state.")[0]
            qs_keys[key] = weight
            methods[weight] = "bnb4"
        elif key.endswith(".SCB"):
            methods[key[: -len("SCB")] + "weight"] = "bnb8"
    return methods, qs_keys


def _config_method(qc: dict, path: str) -> str:
    """Which bitsandbytes flavour ``quantization_config`` declares."""
    method = qc.get("quant_method", "bitsandbytes")
    if method != "bitsandbytes":
        raise _config_error(path, (
            f"quantization_config.quant_method is {method!r}; Mergeflow reads bitsandbytes 4-bit "
            "and 8-bit, FP8, compressed-tensors FP8 and MXFP4 checkpoints only. Merge onto the 16-bit "
            "model it was made from instead (pass that as `base`)"))
    if qc.get("load_in_4bit") or qc.get("_load_in_4bit"):
        return "bnb4"
    if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
        return "bnb8"
    raise _config_error(path, "quantization_config sets neither load_in_4bit nor load_in_8bit; "
                              "re-save the base with transformers")


def detect(config: dict, base: Checkpoint) -> QuantizedBase | None:
    """Find a bitsandbytes base's quantized units; None for an unquantized base.

    Reads headers, and for 4-bit bases each unit's small quant-state JSON (its real shape and
    settings). Everything a merge could trip over later is checked here, at plan time.

    Raises:
        CheckpointError: config.json and the tensors disagree, another quantization method, or a
            storage layout Mergeflow cannot read (non-uint8 4-bit storage, a non-row int8 format,
            a sibling without its weight, ...). The message names the key and the fix.
    """
    path = str(base.folder / "config.json")
    qc = config.get("quantization_config")
    if isinstance(qc, dict) and qc.get("quant_method") in ("fp8", "compressed-tensors"):
        from mergeflow.model.fp8 import detect_fp8  # it builds on this module's QuantSpec

        return detect_fp8(config, base)
    if isinstance(qc, dict) and qc.get("quant_method") == "mxfp4":
        from mergeflow.model.mxfp4 import detect_mxfp4

        return detect_mxfp4(config, base)
    methods, qs_keys = _find_units(base)
    if qc is None:
        scaled = next((k for k in base.tensors if k.endswith((".weight_scale_inv", ".weight_scale"))),
                      None)
        if scaled is not None:
            raise _config_error(path, (
                f"has no quantization_config, but '{scaled}' is an FP8 scale; config.json and "
                "the weights come from different saves"))
        if methods:
            raise _config_error(path, (
                f"has no quantization_config, but '{next(iter(methods))}' is stored quantized by "
                "bitsandbytes; config.json and the weights come from different saves"))
        return None
    if not isinstance(qc, dict):
        raise _config_error(path, "quantization_config is not a JSON object")
    method = _config_method(qc, path)
    if not methods:
        raise _config_error(path, (
            f"declares bitsandbytes {'4' if method == 'bnb4' else '8'}-bit quantization, but no "
            "tensor carries a bitsandbytes quant state; the weights are not quantized. Remove "
            "quantization_config from config.json or re-save the quantized model"))
    other = next((w for w, m in methods.items() if m != method), None)
    if other is not None:
        raise _config_error(path, (
            f"declares {'4' if method == 'bnb4' else '8'}-bit quantization but '{other}' is stored "
            "in the other bitsandbytes format; config.json and the weights disagree"))
    if method == "bnb4":
        _check_storage(qc, path)
        states = base.read_many(sorted(qs_keys))
        units = {w: _bnb4_unit(base, w, key, states[key]) for key, w in qs_keys.items()}
    else:
        units = {w: _bnb8_unit(base, w) for w in methods}
        _check_int8_formats(base, units)
    quantized = QuantizedBase(method=method, config=qc, units=units)
    quantized.siblings = {k for u in units.values() for k in u.siblings.values()}
    _check_no_orphans(base, quantized)
    return quantized


def _check_storage(qc: dict, path: str) -> None:
    storage = str(qc.get("bnb_4bit_quant_storage") or "uint8").removeprefix("torch.")
    if storage != "uint8":
        raise _config_error(path, (
            f"bnb_4bit_quant_storage is {storage}; Mergeflow reads the uint8 storage transformers "
            "writes by default. Re-save the quantized base with bnb_4bit_quant_storage=uint8, or "
            "merge onto the 16-bit model it was made from (pass that as `base`)"))


def _missing(base: Checkpoint, weight: str, key: str) -> CheckpointError:
    return CheckpointError(
        f"{base.folder / base.tensors[weight].file}: quantized weight '{weight}' has no '{key}'; "
        "the checkpoint is incomplete (re-save it with save_pretrained)")


def _bnb4_unit(base: Checkpoint, weight: str, qs_key: str, packed_state: torch.Tensor) -> QuantSpec:
    """Check one 4-bit unit's layout and describe it."""
    where = base.folder / base.tensors[qs_key].file
    if weight not in base.tensors:
        raise CheckpointError(f"{where}: '{qs_key}' belongs to '{weight}', which is missing; "
                              "the checkpoint is incomplete")
    try:
        state = json.loads(bytes(packed_state.to(torch.uint8).numpy()).decode("utf-8"))
        quant_type, blocksize = state["quant_type"], int(state["blocksize"])
        shape, dtype = [int(d) for d in state["shape"]], FLOAT_NAMES[state["dtype"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{where}: '{qs_key}' is not a bitsandbytes quant state ({exc!r}); "
                              "re-save the quantized base") from exc
    if quant_type not in QUANT_TYPES or qs_key.rsplit("__", 1)[1] != quant_type:
        raise CheckpointError(f"{where}: '{qs_key}' has quant_type {quant_type!r}; Mergeflow "
                              "reads nf4 and fp4")
    nested = "nested_offset" in state
    roles = [r for r in BNB4_ROLES if nested or not r.startswith("nested")]
    siblings = {r: f"{weight}.{r}" for r in roles}
    for key in siblings.values():
        if key not in base.tensors:
            raise _missing(base, weight, key)
    siblings[qs_key[len(weight) + 1:]] = qs_key
    spec = QuantSpec(method="bnb4", weight=weight, siblings=siblings, shape=shape, dtype=dtype,
                     quant_type=quant_type, blocksize=blocksize, nested=nested)
    _check_bnb4_layout(base, spec, state)
    spec.quant_state_size = quant_state_size(state)
    return spec


def _check_bnb4_layout(base: Checkpoint, spec: QuantSpec, state: dict) -> None:
    """The packed weight and absmax must be the sizes bitsandbytes gives this shape/blocksize."""
    stored = base.tensors[spec.weight]
    where = base.folder / stored.file
    numel = math.prod(spec.shape)
    if stored.dtype != "U8" or stored.shape != ((numel + 1) // 2, 1):
        raise CheckpointError(
            f"{where}: quantized weight '{spec.weight}' is stored as {stored.dtype}"
            f"{list(stored.shape)}, but a {spec.shape} weight in the uint8 storage transformers "
            f"writes is U8[{(numel + 1) // 2}, 1]; this storage layout is not supported. "
            "Re-save the base with transformers (bnb_4bit_quant_storage=uint8)")
    if spec.blocksize not in BLOCKSIZES:
        raise CheckpointError(f"{where}: '{spec.weight}' has blocksize {spec.blocksize}; "
                              f"bitsandbytes supports {list(BLOCKSIZES)}")
    absmax = base.tensors[spec.siblings["absmax"]]
    blocks = -(-numel // spec.blocksize)
    want_dtype = "U8" if spec.nested else "F32"
    if absmax.shape != (blocks,) or absmax.dtype != want_dtype:
        raise CheckpointError(
            f"{where}: '{absmax.name}' is {absmax.dtype}{list(absmax.shape)}, expected "
            f"{want_dtype}[{blocks}] for a {spec.shape} weight in blocks of {spec.blocksize}; "
            "the checkpoint is inconsistent")
    if spec.nested and "nested_blocksize" not in state:
        raise CheckpointError(f"{where}: '{spec.weight}' quant state has nested_offset but no "
                              "nested_blocksize; re-save the quantized base")


def quant_state_size(state: dict) -> int:
    """Bytes planned for a requantized weight's quant-state JSON: this state's JSON with the
    longest possible float as its offset, plus a little slack. Written JSON is padded with
    spaces to exactly this size (JSON ignores trailing whitespace)."""
    worst = dict(state)
    if "nested_offset" in worst:
        worst["nested_offset"] = LONGEST_FLOAT
    return len(json.dumps(worst).encode("utf-8")) + QS_SLACK


def _bnb8_unit(base: Checkpoint, weight: str) -> QuantSpec:
    """Check one 8-bit unit's layout and describe it."""
    module = weight[: -len(".weight")]
    scb_key = f"{module}.SCB"
    where = base.folder / base.tensors[scb_key].file
    if weight not in base.tensors:
        raise CheckpointError(f"{where}: '{scb_key}' belongs to '{weight}', which is missing; "
                              "the checkpoint is incomplete")
    stored, scb = base.tensors[weight], base.tensors[scb_key]
    if stored.dtype != "I8" or len(stored.shape) != 2 or scb.shape != (stored.shape[0],):
        raise CheckpointError(
            f"{where}: 8-bit weight '{weight}' is {stored.dtype}{list(stored.shape)} with SCB "
            f"{list(scb.shape)}; Mergeflow reads the row-major int8 layout (I8[out, in] and "
            "SCB[out]) that transformers writes")
    siblings = {"SCB": scb_key}
    if f"{weight}_format" in base.tensors:
        siblings["weight_format"] = f"{weight}_format"
    return QuantSpec(method="bnb8", weight=weight, siblings=siblings, shape=list(stored.shape),
                     dtype="F16")


def _check_int8_formats(base: Checkpoint, units: dict[str, QuantSpec]) -> None:
    keys = [u.siblings["weight_format"] for u in units.values() if "weight_format" in u.siblings]
    for key, value in base.read_many(keys).items():
        if value.numel() != 1 or int(value.reshape(-1)[0]) != ROW_FORMAT:
            raise CheckpointError(
                f"{base.folder / base.tensors[key].file}: '{key}' is {value.tolist()}, an int8 "
                "layout other than row-major (0); re-save the base with a current bitsandbytes")


def _check_no_orphans(base: Checkpoint, quantized: QuantizedBase) -> None:
    """A quant-state-looking tensor that belongs to no unit means a broken checkpoint."""
    suffixes = (*(f".{r}" for r in BNB4_ROLES), ".weight_format")
    for key in base.tensors:
        if key.endswith(suffixes) and key not in quantized.siblings:
            raise CheckpointError(
                f"{base.folder / base.tensors[key].file}: '{key}' looks like bitsandbytes quant "
                "state but belongs to no quantized weight; the checkpoint is inconsistent")


def output_keys(spec: QuantSpec) -> list[str]:
    """The keys a unit is written as: the stored weight, then its siblings (sorted)."""
    return [spec.weight, *sorted(spec.siblings.values())]


def output_infos(spec: QuantSpec, base: Checkpoint) -> list[TensorInfo]:
    """The (name, dtype, shape) of each tensor a requantized unit is written as, known at plan
    time: re-encoding a weight of the same shape with the same settings gives tensors of the
    base unit's own sizes, except the quant-state JSON, whose planned size is fixed by
    :func:`quant_state_size`."""
    infos = []
    for key in output_keys(spec):
        info = base.tensors[key]
        if key == spec.quant_state_key:
            info = TensorInfo(key, info.file, (spec.quant_state_size,), "U8")
        infos.append(info)
    return infos


__all__ = ["QuantSpec", "QuantizedBase", "detect", "model_dtype", "output_infos", "output_keys",
           "quant_state_size"]
