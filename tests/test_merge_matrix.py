"""The merged checkpoint, reloaded with plain transformers, gives the live PEFT adapter's logits.

Every case builds a tiny real base and a real PEFT adapter with random non-zero weights, merges
with Mergeflow and compares logits on the same input ids against ``PeftModel`` applied live to
the base. Each case also checks that the merge changed the model (a no-op merge must fail).
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from helpers import logits_of, read_tensors, shard_keys, weight_files
from safetensors import safe_open
from safetensors.torch import load_file

import mergeflow
from mergeflow.model.adapter import load_adapter
from mergeflow.model.checkpoint import DTYPES

ATTN_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2 = ["c_attn", "c_proj", "c_fc"]

# (id, arch, LoraConfig kwargs); float32 bases, so merged and live logits agree to ~1e-6.
CASES = [
    ("plain", "llama", dict(target_modules=ATTN_MLP, r=4, lora_alpha=8)),
    ("rslora", "llama", dict(target_modules=["q_proj", "v_proj", "down_proj"], r=8, lora_alpha=16,
                             use_rslora=True)),
    ("rank-alpha-pattern", "llama", dict(
        target_modules=["q_proj", "v_proj", "o_proj"], r=4, lora_alpha=8,
        rank_pattern={"model.layers.1.self_attn.q_proj": 8, "v_proj": 2},
        alpha_pattern={"o_proj": 32, "model.layers.0.self_attn.q_proj": 2})),
    ("gpt2-fan-in-fan-out", "gpt2", dict(target_modules=GPT2, fan_in_fan_out=True)),
    ("dora-llama", "llama", dict(target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)),
    ("dora-gpt2", "gpt2", dict(target_modules=GPT2, fan_in_fan_out=True, use_dora=True)),
    ("lora-bias-qwen2", "qwen2", dict(target_modules=["q_proj", "k_proj", "v_proj"], lora_bias=True)),
    ("bias-all-qwen2", "qwen2", dict(target_modules=["q_proj", "v_proj"], bias="all")),
    ("bias-lora-only-qwen2", "qwen2", dict(target_modules=["q_proj", "v_proj"], bias="lora_only")),
    ("modules-to-save-lm-head", "llama", dict(target_modules=["q_proj", "v_proj"],
                                              modules_to_save=["lm_head"])),
    ("phi3-fused", "phi3", dict(target_modules=["qkv_proj", "gate_up_proj", "o_proj", "down_proj"])),
    ("layers-to-transform", "llama", dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1])),
]

ATOL = 1e-4
CHANGED = 1e-2  # merged logits must differ from the base's by more than this (observed: ~0.5-1.5)


def _lora_modules(adapter) -> set[str]:
    """Modules with a saved LoRA pair, read straight from the adapter file."""
    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as f:
        return {k.removeprefix("base_model.model.").rsplit(".lora_A", 1)[0]
                for k in f.keys() if ".lora_A" in k}  # noqa: SIM118


def _non_lora_keys(adapter) -> dict[str, torch.Tensor]:
    state = load_file(str(adapter / "adapter_model.safetensors"))
    return {k: v for k, v in state.items() if "lora_" not in k}


def _tensor_bytes(path) -> int:
    """Sum of the byte sizes of the tensors a safetensors header lists."""
    with safe_open(str(path), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) * DTYPES[f.get_slice(k).get_dtype()].itemsize
                   for k in f.keys())  # noqa: SIM118


@pytest.mark.parametrize(("arch", "lora_kwargs"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_merged_logits_match_live_adapter(arch, lora_kwargs, make_base, make_adapter, input_ids,
                                          tmp_path):
    base = make_base(arch)
    adapter = make_adapter(base, **lora_kwargs)
    out = tmp_path / "merged"

    report = mergeflow.merge(base, adapter, out)

    assert report.status == "merged"
    assert report.lora_modules == len(_lora_modules(adapter)) > 0
    merged = logits_of(out, input_ids)
    live = logits_of(base, input_ids, adapter=adapter)
    plain = logits_of(base, input_ids)
    torch.testing.assert_close(merged, live, atol=ATOL, rtol=0)
    assert (merged - plain).abs().max() > CHANGED, "the merge left the model unchanged"

    out_tensors, base_tensors = read_tensors(out), read_tensors(base)
    assert set(out_tensors) == set(base_tensors)
    assert all(t.dtype == torch.float32 for t in out_tensors.values())


def test_rank_and_alpha_patterns_are_applied(make_base, make_adapter):
    """The pattern keys above really match modules (else the pattern case would prove little),
    and Mergeflow resolves each module's scale as PEFT does."""
    kwargs = dict(CASES[2][2])
    adapter = make_adapter(make_base("llama"), **kwargs)
    state = load_file(str(adapter / "adapter_model.safetensors"))
    prefix = "base_model.model.model.layers"
    assert state[f"{prefix}.1.self_attn.q_proj.lora_A.weight"].shape[0] == 8
    assert state[f"{prefix}.0.self_attn.q_proj.lora_A.weight"].shape[0] == 4
    assert state[f"{prefix}.0.self_attn.v_proj.lora_A.weight"].shape[0] == 2

    modules = load_adapter(adapter).modules
    assert modules["model.layers.1.self_attn.q_proj"].scale == pytest.approx(8 / 8)
    assert modules["model.layers.0.self_attn.q_proj"].scale == pytest.approx(2 / 4)
    assert modules["model.layers.1.self_attn.v_proj"].scale == pytest.approx(8 / 2)
    assert modules["model.layers.0.self_attn.o_proj"].scale == pytest.approx(32 / 4)


def test_rslora_scale(make_base, make_adapter):
    adapter = make_adapter(make_base("llama"), **CASES[1][2])
    for spec in load_adapter(adapter).modules.values():
        assert spec.scale == pytest.approx(16 / math.sqrt(8))


def test_layers_to_transform_leaves_other_layers_bit_identical(make_base, make_adapter, tmp_path):
    base = make_base("llama")
    adapter = make_adapter(base, **CASES[-1][2])
    mergeflow.merge(base, adapter, tmp_path / "out")
    out, ref = read_tensors(tmp_path / "out"), read_tensors(base)
    changed = {k for k in ref if not torch.equal(out[k], ref[k])}
    assert changed == {"model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight"}


@pytest.mark.parametrize("case", ["bias-all-qwen2", "bias-lora-only-qwen2", "modules-to-save-lm-head"])
def test_replaced_tensors_are_the_adapters_copies(case, make_base, make_adapter, tmp_path):
    """Trained biases and modules_to_save copies land in the output exactly (float32 in and out),
    under the base's own tensor names."""
    _, arch, kwargs = next(c for c in CASES if c[0] == case)
    base = make_base(arch)
    adapter = make_adapter(base, **kwargs)
    report = mergeflow.merge(base, adapter, tmp_path / "out")
    saved = _non_lora_keys(adapter)
    assert saved and report.replaced_tensors == len(saved)
    out, ref = read_tensors(tmp_path / "out"), read_tensors(base)
    for key, value in saved.items():
        name = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
        assert not torch.equal(value, ref[name]), f"{name}: the adapter's copy was never trained"
        assert torch.equal(out[name], value), name


def test_bfloat16_base(make_base, make_adapter, input_ids, tmp_path):
    """A bf16 base merges to bf16 (dtype auto); the error is bf16 rounding of the weights only."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = make_base("llama", dtype=torch.bfloat16)
    adapter = make_adapter(base, target_modules=ATTN_MLP)
    out = tmp_path / "merged"
    report = mergeflow.merge(base, adapter, out)
    assert report.dtype == "bfloat16"
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"

    # Weights: PEFT's own merge in float32 of the same base, rounded once to bf16 (<= 1 ulp apart).
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    reference = PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()
    merged = read_tensors(out)
    for name, tensor in merged.items():
        assert tensor.dtype == torch.bfloat16, name
        torch.testing.assert_close(tensor.float(), reference[name].to(torch.bfloat16).float(),
                                   rtol=2**-7, atol=1e-6, msg=name)

    # Logits, computed in float32: merged bf16 weights vs the live adapter on the bf16 base.
    merged_logits = logits_of(out, input_ids)
    live = logits_of(base, input_ids, adapter=adapter)
    plain = logits_of(base, input_ids)
    tolerance = 3e-2 * live.abs().max().item()  # ~8 bits of mantissa, through two layers
    torch.testing.assert_close(merged_logits, live, atol=tolerance, rtol=0)
    assert (merged_logits - plain).abs().max() > 10 * tolerance


def test_sharded_base_to_sharded_output(make_base, make_adapter, input_ids, tmp_path):
    base = make_base("llama", max_shard_size="100KB")
    assert (base / "model.safetensors.index.json").is_file() and len(weight_files(base)) > 1
    adapter = make_adapter(base, target_modules=ATTN_MLP)
    out = tmp_path / "merged"

    report = mergeflow.merge(base, adapter, out, max_shard_size="50KB")

    index = json.loads((out / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    shards = shard_keys(out)
    assert len(shards) == report.shards > 1
    assert not (out / "model.safetensors").exists()
    assert set(weight_map.values()) == set(shards)
    # Every tensor exactly once, in the shard the index names.
    listed = [k for keys in shards.values() for k in keys]
    assert len(listed) == len(set(listed)) == len(weight_map)
    for filename, keys in shards.items():
        for key in keys:
            assert weight_map[key] == filename
    # total_size is the sum of the tensors' byte sizes, read back from the shard headers; each
    # shard respects the limit (no single tensor here is larger than 50KB).
    sizes = {filename: _tensor_bytes(out / filename) for filename in shards}
    assert index["metadata"]["total_size"] == sum(sizes.values()) == report.total_size
    assert max(sizes.values()) <= 50_000
    base_index = json.loads((base / "model.safetensors.index.json").read_text())
    assert set(weight_map) == set(base_index["weight_map"])

    merged = logits_of(out, input_ids)
    torch.testing.assert_close(merged, logits_of(base, input_ids, adapter=adapter), atol=ATOL, rtol=0)
    assert (merged - logits_of(base, input_ids)).abs().max() > CHANGED


def test_sequence_classification_score_head_in_modules_to_save(tmp_path, input_ids):
    """modules_to_save on a non-embedding module: the ``score`` head of a Qwen2 classifier,
    which PEFT's SEQ_CLS task adds to modules_to_save; both paths use the SequenceClassification
    auto class."""
    from builders import model_config, save_tokenizer
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    base, adapter, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    config = model_config("qwen2", num_labels=3, pad_token_id=3)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(base)
    save_tokenizer(base, config.vocab_size)
    model = AutoModelForSequenceClassification.from_pretrained(base)
    peft_model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    assert "score" in peft_model.peft_config["default"].modules_to_save
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "modules_to_save" in name:
                param.add_(0.1 * torch.randn_like(param))
    peft_model.save_pretrained(adapter)

    report = mergeflow.merge(base, adapter, out)

    assert report.replaced_tensors == 1
    auto = AutoModelForSequenceClassification
    merged = logits_of(out, input_ids, auto_class=auto)
    live = logits_of(base, input_ids, adapter=adapter, auto_class=auto)
    torch.testing.assert_close(merged, live, atol=ATOL, rtol=0)
    assert (merged - logits_of(base, input_ids, auto_class=auto)).abs().max() > CHANGED
    saved_score = load_file(str(adapter / "adapter_model.safetensors"))["base_model.model.score.weight"]
    assert torch.equal(read_tensors(out)["score.weight"], saved_score)


def test_legacy_bin_adapter_merges_identically(make_base, make_adapter, tmp_path):
    base = make_base("llama")
    adapter = make_adapter(base, target_modules=ATTN_MLP, use_dora=True)
    legacy = tmp_path / "legacy-adapter"
    shutil.copytree(adapter, legacy)
    state = load_file(str(legacy / "adapter_model.safetensors"))
    (legacy / "adapter_model.safetensors").unlink()
    torch.save(state, legacy / "adapter_model.bin")

    mergeflow.merge(base, adapter, tmp_path / "from-safetensors")
    mergeflow.merge(base, legacy, tmp_path / "from-bin")

    a, b = read_tensors(tmp_path / "from-safetensors"), read_tensors(tmp_path / "from-bin")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert ((tmp_path / "from-bin" / "model.safetensors").read_bytes()
            == (tmp_path / "from-safetensors" / "model.safetensors").read_bytes())
