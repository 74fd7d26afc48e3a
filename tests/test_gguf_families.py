"""--save-method gguf across the families people ship, judged by llama.cpp itself.

Route: ``mergeflow.merge(save_method="gguf", gguf_type="f16,q4_k_m")`` in this process, CPU,
on tiny models built here from transformers configs (hidden 256, so k-quant blocks fit). The
peer is the two-step route a user would otherwise run: Mergeflow's SafeTensors merge, then
llama.cpp's own converter (``tests/gguf_two_step.py``, in a subprocess), then llama.cpp's
quantizer (``llama_cpp.llama_model_quantize``). Mergeflow's files must hold the very tensors
of the two-step route's, byte for byte, in f16 and in q4_k_m, and llama.cpp running Mergeflow's
f16 file must agree with transformers running the merged model. Gemma 2 and Phi-3/3.5 carry a
SentencePiece ``tokenizer.model`` trained here (``builders.save_sentencepiece_tokenizer``), as
llama.cpp's converter reads their vocabulary from it; Phi-4 is Phi-3's architecture with a BPE
tokenizer whose ``tokenizer_config.json`` names ``GPT2Tokenizer``.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import build_adapter, build_base, save_bpe_tokenizer, save_sentencepiece_tokenizer

import mergeflow

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (scripts/setup builds it)")
gguf = pytest.importorskip("gguf")
pytest.importorskip("conversion", reason="llama.cpp's converter (scripts/setup --gguf)")

VOCAB = 384
SIZES = {"hidden_size": 256, "intermediate_size": 512, "vocab_size": VOCAB}
# Phi-3.5's long-context rope (``longrope``): llama.cpp's converter writes its factors as tensors
_LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 32,
             "long_factor": [1.0 + i / 32 for i in range(32)],
             "short_factor": [1.0 + i / 64 for i in range(32)]}
# the config's special ids are its tokenizer's (Phi3Config's defaults are Phi-3's 32000-sized ones)
_SPM_IDS, _BPE_IDS = {"bos_token_id": 1, "eos_token_id": 2}, {"bos_token_id": 0, "eos_token_id": 1}
FAMILIES = {  # case -> (builders architecture, config overrides, tokenizer)
    "llama3.1": ("llama3", {}, "gpt-2"),
    "llama3.2-tied": ("llama3", {"tie_word_embeddings": True}, "gpt-2"),
    "mistral": ("mistral", {}, "gpt-2"),
    "qwen2.5": ("qwen2", {}, "qwen2"),
    "qwen3": ("qwen3", {}, "qwen2"),
    "mixtral": ("mixtral", {}, "gpt-2"),
    "qwen3-moe": ("qwen3_moe", {"moe_intermediate_size": 256}, "qwen2"),
    "gemma3": ("gemma3", {}, "gpt-2"),
    # Gemma 2 and Phi-3 read a SentencePiece tokenizer.model; Gemma 2 scaled as its 2B/9B are
    "gemma2": ("gemma2", {"query_pre_attn_scalar": 16}, "spm-gemma"),
    "phi3": ("phi3", _SPM_IDS, "spm-phi3"),
    "phi3.5-longrope": ("phi3", {**_SPM_IDS, "rope_parameters": _LONGROPE,
                                 "original_max_position_embeddings": 32}, "spm-phi3"),
    # Phi-4 is Phi3ForCausalLM with a GPT-2 class BPE tokenizer and no sliding window
    "phi4": ("phi3", {**_BPE_IDS, "sliding_window": None}, "gpt2-class"),
}
# tiny Gemma 3 configs run differently in llama.cpp and transformers whichever route made the
# file (the two-step route's file included); its exactness is the byte comparison alone
LOGITS_DIFFER_IN_LLAMA_CPP = {"gemma3"}
# llama.cpp's f16 path against transformers' float32, relative to the largest logit; MoE layers
# round each expert's output and the routing weights once more
TOLERANCE = {"mixtral": 3e-2, "qwen3-moe": 3e-2}
TOP1 = {"mixtral": 0.75, "qwen3-moe": 0.75}  # and a near-tie in routing or logits may flip
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
PROMPTS = ["hello world 2024!", "the model merges a small adapter"]


def save_tokenizer_of(base: Path, kind: str) -> str:
    """The case's tokenizer into ``base``; returns the pre-tokenizer the two-step route names
    for a BPE tokenizer (unused by a SentencePiece one)."""
    if kind.startswith("spm-"):
        save_sentencepiece_tokenizer(base, VOCAB, kind.removeprefix("spm-"))
        return "gpt-2"
    if kind == "gpt2-class":  # Phi-4's tokenizer_config names GPT2Tokenizer
        save_bpe_tokenizer(base, VOCAB, "gpt-2")
        config = json.loads((base / "tokenizer_config.json").read_text())
        (base / "tokenizer_config.json").write_text(
            json.dumps({**config, "tokenizer_class": "GPT2Tokenizer"}))
        return "gpt-2"
    save_bpe_tokenizer(base, VOCAB, kind)
    return kind


def two_step(merged: Path, folder: Path, pre: str) -> dict[str, Path]:
    """The peer's f16 and q4_k_m files: llama.cpp's converter on the merged SafeTensors, then
    llama.cpp's quantizer on its f16 file."""
    f16, q4 = folder / "two-step-f16.gguf", folder / "two-step-q4_k_m.gguf"
    script = Path(__file__).with_name("gguf_two_step.py")
    subprocess.run([sys.executable, str(script), str(merged), str(f16), "f16"], check=True,
                   capture_output=True, env={**os.environ, "MERGEFLOW_TEST_PRE": pre})
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = 1
    assert llama_cpp.llama_model_quantize(str(f16).encode(), str(q4).encode(),
                                          ctypes.byref(params)) == 0
    return {"f16": f16, "q4_k_m": q4}


def tensors(path: Path) -> dict[str, tuple[str, list[int], bytes]]:
    return {t.name: (t.tensor_type.name, [int(d) for d in t.shape], bytes(np.asarray(t.data)))
            for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("case", sorted(FAMILIES))
def test_each_family_is_the_two_step_route_byte_for_byte_and_runs_as_merged(tmp_path, case):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    arch, overrides, kind = FAMILIES[case]
    base = build_base(tmp_path / "base", arch, tokenizer=False, **{**SIZES, **overrides})
    pre = save_tokenizer_of(base, kind)
    adapter = build_adapter(base, tmp_path / "adapter", target_modules=TARGETS)
    merged = tmp_path / "merged"
    mergeflow.merge(base, adapter, merged)
    out = tmp_path / "out"
    report = mergeflow.merge(base, adapter, out, save_method="gguf", gguf_type="f16,q4_k_m")
    assert report.dtype == "f16,q4_k_m"
    peer = two_step(merged, tmp_path, pre)
    for gguf_type, peer_file in peer.items():
        ours, theirs = tensors(out / f"model-{gguf_type}.gguf"), tensors(peer_file)
        assert sorted(ours) == sorted(theirs), gguf_type
        different = [name for name in ours if ours[name] != theirs[name]]
        assert not different, (gguf_type, different[:5])
    if case in LOGITS_DIFFER_IN_LLAMA_CPP:
        return
    tokenizer = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    llm = llama_cpp.Llama(str(out / "model-f16.gguf"), n_ctx=64, logits_all=True, verbose=False,
                          n_threads=1, seed=0)
    for text in PROMPTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        with torch.no_grad():
            want = model(torch.tensor([ids])).logits[0].numpy()  # (n, vocab)
        llm.reset()
        llm.eval(ids)
        got = np.array(llm.scores[:len(ids)], dtype=np.float32)  # (n, vocab)
        assert np.abs(got - want).max() <= TOLERANCE.get(case, 5e-3) * float(np.abs(want).max())
        assert (got.argmax(-1) == want.argmax(-1)).mean() >= TOP1.get(case, 1.0), text


@pytest.mark.parametrize("merge_onto", ["dequantized", "original"])
def test_a_4bit_base_to_gguf_is_the_two_step_route_onto_either_weights(tmp_path, merge_onto):
    """A bitsandbytes nf4 base (made here from a 16-bit one): GGUF onto its dequantized weights,
    or onto the original 16-bit ones, holds the two-step route's tensors byte for byte."""
    from builders import build_quantized_base

    original = build_base(tmp_path / "original", "llama3", tokenizer=False, **SIZES)
    save_bpe_tokenizer(original, VOCAB)
    base = build_quantized_base(original, tmp_path / "nf4")
    save_bpe_tokenizer(base, VOCAB)
    adapter = build_adapter(base, tmp_path / "adapter", target_modules=TARGETS)
    onto = {"merge_onto": merge_onto,
            **({"original_base": str(original)} if merge_onto == "original" else {})}
    merged = tmp_path / "merged"
    mergeflow.merge(base, adapter, merged, **onto)
    out = tmp_path / "out"
    mergeflow.merge(base, adapter, out, save_method="gguf", gguf_type="f16", **onto)
    ours, theirs = tensors(out / "model-f16.gguf"), tensors(two_step(merged, tmp_path, "gpt-2")["f16"])
    assert sorted(ours) == sorted(theirs)
    assert [name for name in ours if ours[name] != theirs[name]] == []
