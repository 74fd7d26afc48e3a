"""Stacked adapters (``--stack``): SFT then DPO on top, merged in one pass, against PEFT running
both adapters active together.

Route: ``mergeflow.merge(stack=[...])`` in process and the CLI for the refusals, CPU, float32
tiny Llama bases; the reference is PEFT with both adapters loaded and both active
(``set_adapter([...])``), as PEFT stacks them.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from builders import build_adapter, build_base
from helpers import run_cli

import mergeflow

IDS = torch.tensor([[1, 5, 9, 17, 33, 2, 64, 100]])


def _live_logits(base, adapters: list) -> torch.Tensor:
    """PEFT with every adapter loaded and all of them active; logits (1, n, vocab)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft = PeftModel.from_pretrained(model, adapters[0], adapter_name="a0")
    for i, adapter in enumerate(adapters[1:], start=1):
        peft.load_adapter(adapter, adapter_name=f"a{i}")
    peft.base_model.set_adapter([f"a{i}" for i in range(len(adapters))])
    with torch.no_grad():
        return peft.eval()(IDS).logits


def _merged_logits(folder) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(IDS).logits


def test_stacked_adapters_match_peft_with_all_of_them_active(tmp_path):
    base = build_base(tmp_path / "base", "llama")
    sft = build_adapter(base, tmp_path / "sft", seed=1, r=8, lora_alpha=16,
                        target_modules=["q_proj", "v_proj", "down_proj"])
    dpo = build_adapter(base, tmp_path / "dpo", seed=2, r=4, lora_alpha=4, use_rslora=True,
                        target_modules=["q_proj", "o_proj", "up_proj"])
    report = mergeflow.merge(base, sft, tmp_path / "out", stack=[str(dpo)])
    assert report.status == "merged"
    want = _live_logits(base, [sft, dpo])
    got = _merged_logits(tmp_path / "out")
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()
    only_sft = _merged_logits_of(base, sft, tmp_path / "sft-only")
    assert not torch.allclose(only_sft, want, atol=1e-3)  # the second adapter counted
    again = mergeflow.merge(base, sft, tmp_path / "out", stack=[str(dpo)])
    assert again.status == "up-to-date"  # the same stack is the same merge


def _merged_logits_of(base, adapter, out) -> torch.Tensor:
    mergeflow.merge(base, adapter, out)
    return _merged_logits(out)


@pytest.mark.parametrize("odd", ["dora", "other-base"])
def test_adapters_that_do_not_stack_are_refused_naming_both(tmp_path, odd):
    base = build_base(tmp_path / "base", "llama")
    sft = build_adapter(base, tmp_path / "sft", seed=1, target_modules=["q_proj"])
    second = build_adapter(base, tmp_path / "second", seed=2, target_modules=["v_proj"],
                           use_dora=odd == "dora")
    if odd == "other-base":
        config = json.loads((second / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = "acme/another-model"
        (second / "adapter_config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    proc = run_cli("merge", "--base", str(base), "--adapter", str(sft), "--stack", str(second),
                   "--out", str(out))
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip()
    assert line.startswith("error: ") and "\n" not in line, proc.stderr
    assert str(sft) in line and str(second) in line, line
    assert not out.exists()
    shutil.rmtree(tmp_path / "base")
