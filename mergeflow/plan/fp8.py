"""save_method fp8: which planned tensors are written as float8, and the ``quantization_config``
that says so.

The targets are what compressed-tensors' ``FP8_DYNAMIC`` / ``FP8_BLOCK`` presets target: every
``torch.nn.Linear`` of the model (the model's own code says which, :attr:`ModelLayout.linear`)
but ``lm_head``. Embeddings, norms, fused 3-D expert tensors and the head stay in the 16-bit
dtype. The config is built by compressed-tensors' own classes, as llm-compressor writes it.
"""

from __future__ import annotations

from typing import Literal

from mergeflow.model.layout import ModelLayout
from mergeflow.plan.model import Fp8, TensorPart, TensorPlan

FP8_DTYPE = "F8_E4M3"
IGNORED = ["lm_head"]  # as llm-compressor's recipes: the head stays 16-bit
BLOCK = (128, 128)
PRESETS = {"channel": "FP8_DYNAMIC", "block": "FP8_BLOCK"}


def fp8_targets(layout: ModelLayout, head: str | None) -> set[str]:
    """The disk weight names written as float8: every Linear's weight but the head's."""
    return {f"{m}.weight" for m in layout.linear if f"{m}.weight" != head
            and m.rsplit(".", 1)[-1] not in IGNORED}


def fp8_output(plan: TensorPlan, targets: set[str], scheme: Literal["channel", "block"]) -> TensorPlan:
    """The entry written as float8 values plus a ``<name>_scale`` part, when it is a 2-D target
    weight; unchanged otherwise."""
    if plan.name not in targets or len(plan.shape) != 2:
        return plan
    rows, cols = plan.shape
    grid = [rows, 1] if scheme == "channel" else [-(-rows // BLOCK[0]), -(-cols // BLOCK[1])]
    return plan.model_copy(update={
        "dtype": FP8_DTYPE, "encoding": Fp8(scheme=scheme, dtype=plan.dtype),
        "parts": [TensorPart(name=scale_name(plan.name), dtype=plan.dtype, shape=grid)]})


def fp8_note(tensors: list[TensorPlan], scheme: Literal["channel", "block"]) -> str:
    """What the FP8 export wrote, for the report."""
    count = sum(isinstance(t.encoding, Fp8) for t in tensors)
    how = "one scale per output row" if scheme == "channel" else "one scale per 128x128 block"
    return (f"save_method fp8 ({PRESETS[scheme]}): {count} Linear weights written as "
            f"float8_e4m3fn with {how}, activations quantized per token at serving; lm_head, "
            "embeddings and norms kept 16-bit")


def scale_name(weight: str) -> str:
    """The scale tensor written beside a float8 weight (``X.weight`` -> ``X.weight_scale``)."""
    return f"{weight}_scale"


def fp8_config(scheme: Literal["channel", "block"]) -> dict:
    """config.json's ``quantization_config`` for the output, as compressed-tensors' own
    ``ModelCompressor.update_config`` writes it (format ``float-quantized``, compressed)."""
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme

    config = QuantizationConfig(
        config_groups={"group_0": preset_name_to_scheme(PRESETS[scheme], ["Linear"])},
        ignore=list(IGNORED), format="float-quantized", quantization_status="compressed")
    for group in config.config_groups.values():
        group.format = "float-quantized"
    return {"version": compressed_tensors.__version__, "quant_method": "compressed-tensors",
            "sparsity_config": {}, "transform_config": {},
            **config.model_dump(mode="json", exclude={"quant_method"})}


__all__ = ["BLOCK", "PRESETS", "fp8_config", "fp8_note", "fp8_output", "fp8_targets", "scale_name"]
