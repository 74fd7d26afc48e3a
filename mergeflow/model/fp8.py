"""FP8 bases: find each float8 weight's scale and say which block of the weight each scale covers.

Two layouts are read, both ``float8_e4m3fn`` weights that decode as ``weight * scale``, the scale
broadcast over its block:

* **block-wise FP8** (``quant_method: fp8``, as DeepSeek and Qwen publish, transformers'
  ``FineGrainedFP8Config``): ``X.weight`` F8_E4M3 ``(out, in)`` with ``X.weight_scale_inv``
  float32 ``(ceil(out/bh), ceil(in/bw))`` for ``weight_block_size: [bh, bw]`` (``[128, 128]``).
  Despite its name the scale is multiplied, as transformers' and DeepSeek's dequantizers do.
* **compressed-tensors FP8** (``quant_method: compressed-tensors``, ``format: float-quantized``,
  as llm-compressor writes for vLLM): ``X.weight`` with ``X.weight_scale`` per output channel
  ``(out, 1)``, per tensor ``(1,)``, or per block ``(ceil(out/bh), ceil(in/bw))``. Activation
  scales (``X.input_scale``) belong to serving, not to the weights, and are dropped.

Every layout is described by one block shape ``[bh, bw]`` (per channel: ``[1, in]``; per tensor:
``[out, in]``), so decoding is one rule: ``W[i, j] = q[i, j] * S[i // bh, j // bw]``, rounded
to the model's dtype (:mod:`mergeflow.engine.fp8`). Anything else (int4 packs, asymmetric zero points, e5m2
weights, MXFP4) is refused while planning, naming the key and what to do.
"""

from __future__ import annotations

from mergeflow.errors import CheckpointError
from mergeflow.model.checkpoint import Checkpoint, TensorInfo
from mergeflow.model.quant import QuantizedBase, QuantSpec, model_dtype

FP8_WEIGHT = "F8_E4M3"
SCALE_ROLES = ("weight_scale_inv", "weight_scale")  # block-wise FP8, compressed-tensors
DROPPED_ROLES = ("input_scale", "weight_zero_point", "input_zero_point")
METHODS = ("fp8", "compressed-tensors")


def _error(path: str, message: str) -> CheckpointError:
    return CheckpointError(f"{path}: {message}")


def detect_fp8(config: dict, base: Checkpoint) -> QuantizedBase:
    """The FP8 units of a base whose ``quantization_config`` says ``fp8`` or compressed-tensors.

    Raises:
        CheckpointError: a scheme Mergeflow cannot decode, a float8 weight without its scale, a
            scale without its weight, or a scale of a shape no block size explains.
    """
    path = str(base.folder / "config.json")
    qc = config["quantization_config"]
    block = _declared_block(qc, path)
    dtype = model_dtype(config)
    units: dict[str, QuantSpec] = {}
    for name, info in base.tensors.items():
        if info.dtype.startswith("F8") and name.endswith(".weight"):
            units[name] = _unit(base, info, block, path, dtype)
    if not units:
        raise _error(path, f"declares {qc.get('quant_method')} quantization, but no tensor is "
                           "stored as float8; the weights are not quantized. Remove "
                           "quantization_config from config.json or re-save the quantized model")
    quantized = QuantizedBase(method="fp8", config=qc, units=units)
    quantized.siblings = {k for u in units.values() for k in u.siblings.values()}
    quantized.siblings |= _dropped(base, units)
    _check_no_orphans(base, quantized)
    return quantized


def _declared_block(qc: dict, path: str) -> list[int] | None:
    """``[bh, bw]`` for block-wise FP8 (``quant_method: fp8``), None for compressed-tensors
    (whose scale shapes say their strategy); refuses what is not an FP8 weight scheme."""
    method = qc.get("quant_method")
    if method == "fp8":
        block = qc.get("weight_block_size")
        if block is None:
            return None  # per-tensor FP8 (a scalar weight_scale_inv), inferred from shapes
        if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0
                                                                    for b in block)):
            raise _error(path, f"quantization_config.weight_block_size is {block!r}; expected "
                               "two positive integers such as [128, 128]")
        return block
    return _check_compressed_tensors(qc, path)


def _check_compressed_tensors(qc: dict, path: str) -> list[int] | None:
    """compressed-tensors: only symmetric 8-bit float weights (``float-quantized``) decode here;
    returns the weights' ``block_structure`` for the block strategy (else None)."""
    formats = {qc.get("format")} | {g.get("format") for g in (qc.get("config_groups") or {}).values()
                                    if isinstance(g, dict)}
    formats.discard(None)
    if formats - {"float-quantized"}:
        raise _error(path, f"compressed-tensors format {sorted(formats)}; Mergeflow reads FP8 "
                           "weights (format float-quantized). Merge onto the 16-bit model the "
                           "checkpoint was made from instead (pass that as `base`)")
    blocks = []
    for name, group in (qc.get("config_groups") or {}).items():
        weights = (group or {}).get("weights") or {}
        if weights.get("type") != "float" or weights.get("num_bits") != 8 \
                or weights.get("symmetric") is False:
            raise _error(path, f"compressed-tensors group {name!r} quantizes weights as "
                               f"{weights.get('num_bits')}-bit {weights.get('type')} "
                               f"(symmetric={weights.get('symmetric')}); Mergeflow reads "
                               "symmetric 8-bit float (FP8) weights only")
        if weights.get("strategy") == "block":
            blocks.append(weights.get("block_structure"))
    if len({str(b) for b in blocks}) > 1:
        raise _error(path, f"compressed-tensors groups use different weight blocks {blocks}; "
                           "Mergeflow reads one block shape per checkpoint")
    return blocks[0] if blocks else None


def _unit(base: Checkpoint, info: TensorInfo, block: list[int] | None, path: str,
          dtype: str) -> QuantSpec:
    """One float8 weight and its scale, checked against each other."""
    where = base.folder / info.file
    module = info.name[: -len(".weight")]
    if info.dtype != FP8_WEIGHT or len(info.shape) != 2:
        raise CheckpointError(f"{where}: '{info.name}' is {info.dtype}{list(info.shape)}; "
                              "Mergeflow decodes 2-D float8_e4m3fn weights")
    role = next((r for r in SCALE_ROLES if f"{module}.{r}" in base.tensors), None)
    if role is None:
        raise CheckpointError(f"{where}: float8 weight '{info.name}' has no '{module}.weight_scale' "
                              "or '.weight_scale_inv'; the checkpoint is incomplete")
    scale = base.tensors[f"{module}.{role}"]
    shape = [int(d) for d in info.shape]
    spec_block = _scale_block(shape, list(scale.shape), block)
    if spec_block is None:
        raise CheckpointError(
            f"{where}: '{scale.name}' is {list(scale.shape)}, which is no block grid of the "
            f"{shape} weight '{info.name}'" + (f" in blocks of {block}" if block else "")
            + "; the checkpoint is inconsistent")
    return QuantSpec(method="fp8", weight=info.name, siblings={role: scale.name}, shape=shape,
                     dtype=dtype, block=spec_block)


def _scale_block(shape: list[int], scale: list[int], block: list[int] | None) -> list[int] | None:
    """The ``[bh, bw]`` each scale entry covers, or None when ``scale`` fits no block."""
    out, cols = shape
    if scale in ([], [1], [1, 1]):
        return [out, cols]  # per tensor
    if block is not None:
        grid = [-(-out // block[0]), -(-cols // block[1])]
        return block if scale == grid else None
    if scale == [out, 1]:
        return [1, cols]  # per output channel
    return None


def _dropped(base: Checkpoint, units: dict[str, QuantSpec]) -> set[str]:
    """Activation scales and zero points of the units' modules: serving parameters, not weights."""
    modules = {w[: -len(".weight")] for w in units}
    return {f"{m}.{r}" for m in modules for r in DROPPED_ROLES if f"{m}.{r}" in base.tensors}


def _check_no_orphans(base: Checkpoint, quantized: QuantizedBase) -> None:
    """A scale that belongs to no float8 weight means a broken checkpoint."""
    for key in base.tensors:
        if key.endswith(tuple(f".{r}" for r in SCALE_ROLES)) and key not in quantized.siblings:
            raise CheckpointError(
                f"{base.folder / base.tensors[key].file}: '{key}' is an FP8 scale but its weight "
                "is not stored as float8; the checkpoint is inconsistent")


__all__ = ["METHODS", "detect_fp8"]
