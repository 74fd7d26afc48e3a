"""Embeddings and head: vocab resize and untie, compared with the live adapter (issue 4).

Every case merges a real PEFT adapter into a tiny real model, reloads the output with plain
transformers, and compares logits with ``PeftModel`` on the base; it also checks the config
flags and which head/embedding tensors were written.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from builders import save_tokenizer
from helpers import load_json, logits_of, read_tensors, run_cli, sha256

import mergeflow
from mergeflow.errors import PlanError

ATOL = 1e-4


def _live_logits(base: Path, adapter: Path, ids: torch.Tensor, vocab: int | None = None):
    """The live adapter's logits; ``vocab`` resizes the base first, as the trainer did."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if vocab is not None:
        model.resize_token_embeddings(vocab)
    model = PeftModel.from_pretrained(model, adapter).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


CASES = {
    # id: (arch, LoraConfig kwargs, tie expected in the output, head tensor written)
    "tied-qwen2-head-lora": ("qwen2", dict(target_modules=["q_proj", "lm_head"]), False, True),
    "tied-qwen2-nothing-unties": ("qwen2", dict(target_modules=["q_proj", "v_proj"]), True, False),
    "tied-qwen2-embedding-lora": ("qwen2", dict(target_modules=["q_proj", "embed_tokens"]),
                                  False, True),
    "tied-qwen2-trainable-tokens": ("qwen2", dict(target_modules=["q_proj"],
                                                  trainable_token_indices=[5, 9, 77]), True, False),
    "tied-qwen2-embed-copy": ("qwen2", dict(target_modules=["q_proj"],
                                            modules_to_save=["embed_tokens"]), False, True),
    "gpt2-wte-tie-embedding-lora": ("gpt2", dict(target_modules=["c_attn", "wte"],
                                                 fan_in_fan_out=True), False, True),
    "gpt2-wte-tie-kept": ("gpt2", dict(target_modules=["c_attn"], fan_in_fan_out=True), True, False),
    "untied-llama-head-and-embed-lora": ("llama", dict(target_modules=["q_proj", "embed_tokens",
                                                                       "lm_head"]), False, True),
    "untied-llama-trainable-tokens": ("llama", dict(target_modules=["q_proj"],
                                                    trainable_token_indices={"embed_tokens": [7]}),
                                      False, True),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_embedding_and_head_cases_match_live_adapter(case, make_base, make_adapter, input_ids,
                                                     tmp_path):
    arch, lora_kwargs, tied, head_written = CASES[case]
    base = make_base(arch)
    adapter = make_adapter(base, **lora_kwargs)
    report = mergeflow.merge(base, adapter, tmp_path / "out")

    merged = logits_of(tmp_path / "out", input_ids)
    live = _live_logits(base, adapter, input_ids)
    assert (merged - live).abs().max() < ATOL
    assert (live - logits_of(base, input_ids)).abs().max() > 1e-2  # the adapter does something

    config = load_json(tmp_path / "out" / "config.json")
    assert config.get("tie_word_embeddings", True) is tied
    assert ("lm_head.weight" in read_tensors(tmp_path / "out")) is head_written
    if load_json(base / "config.json").get("tie_word_embeddings"):
        assert any(("tied" in n) for n in report.notes)  # the decision is explained


def test_peft_merge_is_wrong_on_tied_head_lora_and_ours_is_right(make_base, make_adapter,
                                                                   input_ids, tmp_path):
    """PEFT's merge_and_unload writes the head delta into the shared embedding (REFERENCE.md)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = make_base("qwen2")
    adapter = make_adapter(base, target_modules=["lm_head"])
    live = _live_logits(base, adapter, input_ids)
    peft_merged = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload().eval()
    with torch.no_grad():
        peft_logits = peft_merged(input_ids=input_ids).logits
    mergeflow.merge(base, adapter, tmp_path / "out")
    assert (peft_logits - live).abs().max() > 1e-2
    assert (logits_of(tmp_path / "out", input_ids) - live).abs().max() < ATOL


@pytest.fixture(scope="module")
def added_tokens_adapter(make_base, tmp_path_factory):
    """A run that added 8 special tokens, resized to 136 rows and trained full embed/head copies."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = make_base("qwen2")
    folder = tmp_path_factory.mktemp("added-tokens")
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(base)
    model.resize_token_embeddings(136)
    peft_model = get_peft_model(model, LoraConfig(
        r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"],
        init_lora_weights=False))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if param.requires_grad and "lora_" not in name:
                param.add_(0.05 * torch.randn_like(param))
    peft_model.save_pretrained(folder)
    save_tokenizer(folder, 128, extra_tokens=8)
    return base, folder


def test_added_tokens_with_full_copies(added_tokens_adapter, tmp_path):
    base, adapter = added_tokens_adapter
    ids = torch.tensor([[4, 130, 135, 20, 131]])  # includes added tokens
    report = mergeflow.merge(base, adapter, tmp_path / "out")
    live = _live_logits(base, adapter, ids, vocab=136)
    merged = logits_of(tmp_path / "out", ids)
    assert merged.shape[-1] == 136
    assert (merged - live).abs().max() < ATOL
    config = load_json(tmp_path / "out" / "config.json")
    assert config["vocab_size"] == 136 and config["tie_word_embeddings"] is False
    assert any("128 -> 136" in n for n in report.notes)


def test_pad_vocab_to_multiple_of(added_tokens_adapter, tmp_path):
    base, adapter = added_tokens_adapter
    ids = torch.tensor([[4, 130, 135, 20]])
    mergeflow.merge(base, adapter, tmp_path / "out", pad_vocab_to_multiple_of=64)
    tensors = read_tensors(tmp_path / "out")
    assert tensors["model.embed_tokens.weight"].shape[0] == 192
    assert load_json(tmp_path / "out" / "config.json")["vocab_size"] == 192
    live = _live_logits(base, adapter, ids, vocab=136)
    assert (logits_of(tmp_path / "out", ids)[..., :136] - live).abs().max() < ATOL
    # The padding rows are the mean of the trained rows.
    embed = tensors["model.embed_tokens.weight"]
    assert torch.allclose(embed[136:], embed[:136].mean(0).expand(56, -1), atol=1e-6)


def test_tokenizer_with_added_tokens_grows_an_untrained_vocab(make_base, make_adapter, tmp_path):
    base = make_base("llama")
    adapter = make_adapter(base, target_modules=["q_proj"])
    save_tokenizer(tmp_path / "tok", 128, extra_tokens=6)
    report = mergeflow.merge(base, adapter, tmp_path / "out", tokenizer=str(tmp_path / "tok"))
    tensors, base_tensors = read_tensors(tmp_path / "out"), read_tensors(base)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert tensors[name].shape[0] == 134
        assert torch.equal(tensors[name][:128], base_tensors[name])
        assert torch.allclose(tensors[name][128:], base_tensors[name].mean(0).expand(6, -1))
    assert load_json(tmp_path / "out" / "config.json")["vocab_size"] == 134
    assert any("mean" in n for n in report.notes)


def test_tokenizer_longer_than_trained_vocab_is_refused(added_tokens_adapter, tmp_path):
    base, adapter = added_tokens_adapter
    save_tokenizer(tmp_path / "tok", 128, extra_tokens=20)  # 148 tokens > 136 trained rows
    result = run_cli("merge", "--base", str(base), "--adapter", str(adapter),
                     "--out", str(tmp_path / "out"), "--tokenizer", str(tmp_path / "tok"))
    assert result.returncode == 2
    assert "148 tokens" in result.stderr and "136 rows" in result.stderr
    assert not (tmp_path / "out").exists()


def test_vocab_shrink_needs_explicit_permission(make_base, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = make_base("llama")
    model = AutoModelForCausalLM.from_pretrained(base)
    model.resize_token_embeddings(120)
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False,
                                     modules_to_save=["embed_tokens", "lm_head"])
                   ).save_pretrained(tmp_path / "adapter")
    with pytest.raises(PlanError, match="pass `allow_vocab_shrink=True` if that is intended"):
        mergeflow.merge(base, tmp_path / "adapter", tmp_path / "out", no_tokenizer=True)
    mergeflow.merge(base, tmp_path / "adapter", tmp_path / "out", no_tokenizer=True,
                    allow_vocab_shrink=True)
    assert read_tensors(tmp_path / "out")["lm_head.weight"].shape[0] == 120


def test_tokenizer_fidelity(make_base, make_adapter, tmp_path):
    """The trained tokenizer ships byte for byte; eos, pad, added tokens, chat template survive."""
    from transformers import AutoTokenizer

    base = make_base("llama")
    adapter = make_adapter(base, target_modules=["q_proj"])
    tok_dir = save_tokenizer(tmp_path / "trained-tok", 128, extra_tokens=0)
    source = AutoTokenizer.from_pretrained(tok_dir)
    source.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    source.eos_token = "<|tool|>"
    source.save_pretrained(tok_dir)
    # the tokenizer grows the vocab by one (mean row), and ships unchanged
    mergeflow.merge(base, adapter, tmp_path / "out", tokenizer=str(tok_dir))
    for path in tok_dir.iterdir():
        assert sha256(tmp_path / "out" / path.name) == sha256(path), path.name
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert reloaded.eos_token == "<|tool|>" and reloaded.pad_token == "<pad>"
    assert reloaded.chat_template == source.chat_template
    assert len(reloaded) == 129
    assert reloaded.convert_tokens_to_ids("<|tool|>") == 128
