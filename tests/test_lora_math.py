"""mergeflow.math.lora against PEFT's own layers: same random tensors, PEFT's delta and merge results.

Each case wraps one random layer with PEFT (``get_peft_model`` on a one-module network), gives the
LoRA weights (and DoRA magnitude, LoRA bias) random values, then compares what Mergeflow computes
from the raw tensors with what PEFT's ``get_delta_weight`` / ``merge`` produce.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from mergeflow.math.lora import dora_rescale, embedding_delta, linear_delta, merge_bias, merge_linear
from mergeflow.model.adapter import load_adapter

IN, OUT = 24, 40


class One(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


def _peft_layer(layer: nn.Module, seed: int = 0, **lora_kwargs):
    """``layer`` wrapped by PEFT with random LoRA weights; returns (peft model, lora layer)."""
    torch.manual_seed(seed)
    lora_kwargs.setdefault("r", 4)
    lora_kwargs.setdefault("lora_alpha", 8)
    model = get_peft_model(One(layer), LoraConfig(target_modules=["proj"], init_lora_weights=False,
                                                  **lora_kwargs))
    lora = model.base_model.model.proj
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * torch.randn_like(param))
            elif "lora_B" in name or "lora_embedding_B" in name:
                param.copy_(torch.randn_like(param))  # B is random (not zero) in every case
    return model, lora


def _raw(lora):
    a = lora.lora_A["default"].weight.detach().clone()
    b = lora.lora_B["default"].weight.detach().clone()
    return a, b, lora.scaling["default"]


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_linear_delta_matches_peft(rslora):
    _, lora = _peft_layer(nn.Linear(IN, OUT), r=8, lora_alpha=16, use_rslora=rslora)
    a, b, scale = _raw(lora)
    expected = lora.get_delta_weight("default")
    torch.testing.assert_close(linear_delta(a, b, scale), expected, rtol=1e-6, atol=1e-6)
    assert expected.abs().max() > 0.1


def test_fan_in_fan_out_delta_and_merge_match_peft():
    conv = Conv1D(OUT, IN)  # weight (in, out)
    nn.init.normal_(conv.weight)
    _, lora = _peft_layer(conv, fan_in_fan_out=True)
    a, b, scale = _raw(lora)
    weight = lora.base_layer.weight.detach().clone()
    assert weight.shape == (IN, OUT)
    # PEFT's delta is in storage orientation (in, out); linear_delta is (out, in).
    torch.testing.assert_close(linear_delta(a, b, scale).T, lora.get_delta_weight("default"))
    lora.merge()
    merged = merge_linear(weight, a, b, scale, fan_in_fan_out=True)
    assert merged.shape == weight.shape
    torch.testing.assert_close(merged, lora.base_layer.weight.detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv1d-fan-in-fan-out"])
def test_dora_merge_matches_peft(conv):
    layer = Conv1D(OUT, IN) if conv else nn.Linear(IN, OUT)
    nn.init.normal_(layer.weight)
    _, lora = _peft_layer(layer, use_dora=True, fan_in_fan_out=conv)
    a, b, scale = _raw(lora)
    weight = lora.base_layer.weight.detach().clone()
    magnitude = lora.lora_magnitude_vector["default"].weight.detach().clone()
    assert magnitude.shape == (OUT,)

    lora.merge()
    merged = merge_linear(weight, a, b, scale, fan_in_fan_out=conv, magnitude=magnitude)

    torch.testing.assert_close(merged, lora.base_layer.weight.detach(), rtol=1e-5, atol=1e-6)
    # Not plain LoRA: the magnitudes matter, and each output row ends up with its magnitude.
    plain = merge_linear(weight, a, b, scale, fan_in_fan_out=conv)
    assert (merged - plain).abs().max() > 1e-2
    rows = merged.T if conv else merged
    torch.testing.assert_close(torch.linalg.vector_norm(rows, dim=1), magnitude, rtol=1e-5, atol=1e-6)


def test_dora_rescale_formula():
    gen = torch.Generator().manual_seed(5)
    merged, magnitude = torch.randn(OUT, IN, generator=gen), torch.rand(OUT, generator=gen) + 0.5
    out = dora_rescale(merged, magnitude)
    for row in range(OUT):
        expected = magnitude[row] / merged[row].norm() * merged[row]
        torch.testing.assert_close(out[row], expected)


def test_lora_bias_merge_matches_peft():
    _, lora = _peft_layer(nn.Linear(IN, OUT, bias=True), lora_bias=True)
    scale = lora.scaling["default"]
    bias = lora.base_layer.bias.detach().clone()
    b_bias = lora.lora_B["default"].bias.detach().clone()
    assert b_bias.abs().max() > 0
    lora.merge()
    torch.testing.assert_close(merge_bias(bias, b_bias, scale), lora.base_layer.bias.detach())


def test_embedding_delta_matches_peft():
    _, lora = _peft_layer(nn.Embedding(50, 16))
    a = lora.lora_embedding_A["default"].detach().clone()
    b = lora.lora_embedding_B["default"].detach().clone()
    assert a.shape == (4, 50) and b.shape == (16, 4)
    expected = lora.get_delta_weight("default")
    assert expected.shape == (50, 16) and expected.abs().max() > 0.1
    torch.testing.assert_close(embedding_delta(a, b, lora.scaling["default"]), expected)


def test_math_runs_in_float32_for_half_inputs():
    _, lora = _peft_layer(nn.Linear(IN, OUT))
    a, b, scale = _raw(lora)
    weight = lora.base_layer.weight.detach().clone()
    merged = merge_linear(weight.bfloat16(), a.bfloat16(), b.bfloat16(), scale)
    assert merged.dtype == torch.float32
    exact = weight.bfloat16().float() + scale * (b.bfloat16().float() @ a.bfloat16().float())
    torch.testing.assert_close(merged, exact)


class Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(IN, OUT)
        self.v_proj = nn.Linear(IN, OUT)
        self.o_proj = nn.Linear(OUT, IN)

    def forward(self, x):
        return self.o_proj(self.q_proj(x) + self.v_proj(x))


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_adapter_scales_match_peft_layers(rslora, tmp_path):
    """load_adapter's per-module scale (r, lora_alpha, rsLoRA, rank/alpha patterns) equals
    the scaling PEFT's own layers use."""
    config = LoraConfig(target_modules=["q_proj", "v_proj", "o_proj"], r=4, lora_alpha=8,
                        use_rslora=rslora, rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 3},
                        init_lora_weights=False)
    model = get_peft_model(Two(), config)
    model.save_pretrained(tmp_path)
    modules = load_adapter(tmp_path).modules
    inner = model.base_model.model
    scales = {name: getattr(inner, name).scaling["default"] for name in ("q_proj", "v_proj", "o_proj")}
    assert len(set(scales.values())) == 3, "the patterns must give three different scales"
    for name, scale in scales.items():
        assert modules[name].scale == pytest.approx(scale), name
