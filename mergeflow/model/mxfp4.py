"""MXFP4 bases (gpt-oss): find each packed expert tensor and say what the model sees it as.

gpt-oss ships its MoE experts in MXFP4 (``quant_method: mxfp4``): ``X_blocks`` uint8
``(E, out, G, 16)`` holds 32 e2m1 values per group (two per byte, low nibble first) and
``X_scales`` uint8 ``(E, out, G)`` one e8m0 exponent per group (``2 ** (s - 127)``), with
``in = 32 * G``. The model holds ``X`` as ``(E, in, out)``: transformers' own conversion
(``transformers.integrations.mxfp4``) decodes it and transposes each expert. Everything else
(attention, router, embeddings, head) is stored as it is used.

A unit here is named by the model's ``X`` (:attr:`QuantSpec.logical_name`), shaped
``(E, in, out)``; :mod:`mergeflow.engine.mxfp4` decodes it by experts or by rows of
``(E * in, out)``, as the merge streams it.
"""

from __future__ import annotations

from mergeflow.errors import CheckpointError
from mergeflow.model.checkpoint import Checkpoint
from mergeflow.model.quant import QuantizedBase, QuantSpec, model_dtype

BLOCKS, SCALES = "_blocks", "_scales"
GROUP = 32  # values per e8m0 scale


def detect_mxfp4(config: dict, base: Checkpoint) -> QuantizedBase:
    """The MXFP4 units of a base whose ``quantization_config`` says ``mxfp4``.

    Raises:
        CheckpointError: packed blocks without their scales (or scales without blocks), or
            tensors of a layout other than transformers' ``(E, out, G, 16)`` and ``(E, out, G)``.
    """
    path = base.folder / "config.json"
    dtype = model_dtype(config)
    units = {}
    for key, info in base.tensors.items():
        if key.endswith(BLOCKS):
            unit = _unit(base, key, dtype)
            units[unit.logical_name] = unit
        elif key.endswith(SCALES) and key[: -len(SCALES)] + BLOCKS not in base.tensors:
            raise CheckpointError(f"{base.folder / info.file}: '{key}' has no "
                                  f"'{key[: -len(SCALES)]}{BLOCKS}'; the checkpoint is incomplete")
    if not units:
        raise CheckpointError(f"{path}: declares mxfp4 quantization, but no tensor is stored as "
                              "MXFP4 blocks; remove quantization_config or re-save the model")
    quantized = QuantizedBase(method="mxfp4", config=config["quantization_config"], units=units)
    quantized.siblings = {k for u in units.values() for k in u.siblings.values()}
    return quantized


def _unit(base: Checkpoint, key: str, dtype: str) -> QuantSpec:
    """One packed expert tensor and its scales, checked against each other."""
    name = key[: -len(BLOCKS)]
    blocks = base.tensors[key]
    where = base.folder / blocks.file
    scales = base.tensors.get(name + SCALES)
    if scales is None:
        raise CheckpointError(f"{where}: MXFP4 blocks '{key}' have no '{name}{SCALES}'; the "
                              "checkpoint is incomplete")
    shape = list(blocks.shape)
    if blocks.dtype != "U8" or len(shape) != 4 or shape[3] != GROUP // 2 \
            or scales.dtype != "U8" or list(scales.shape) != shape[:3]:
        raise CheckpointError(
            f"{where}: '{key}' is {blocks.dtype}{shape} with scales {scales.dtype}"
            f"{list(scales.shape)}; Mergeflow reads gpt-oss's MXFP4 layout, U8[E, out, G, 16] "
            "blocks and U8[E, out, G] scales")
    experts, out, groups = shape[:3]
    return QuantSpec(method="mxfp4", weight=key, siblings={"scales": scales.name},
                     shape=[experts, groups * GROUP, out], dtype=dtype, name=name)


__all__ = ["detect_mxfp4"]
