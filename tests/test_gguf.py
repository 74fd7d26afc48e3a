"""--save-method gguf: llama.cpp itself (llama-cpp-python) is the client.

Each GGUF Mergeflow writes is loaded by llama.cpp and its logits compared with the merged
SafeTensors model in transformers; one merged tensor read back with gguf.GGUFReader equals the
SafeTensors value; llama.cpp tokenizes as transformers does; an architecture not covered is
refused; a crash before the rename leaves no .gguf that looks finished.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import build_adapter, build_base, save_bpe_tokenizer
from helpers import read_tensors, run_cli

import mergeflow

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (scripts/setup builds it)")
gguf = pytest.importorskip("gguf")

VOCAB = 384
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]
PROMPTS = ["hello world 2024!", "the model merges a small adapter", "we've said they'll go ?"]
# llama.cpp's float path against transformers' float32, relative to the largest logit: f16 and
# bf16 round the weights once (2^-11, 2^-8); q8_0 rounds weights and activations to 8 bits
TOLERANCE = {"f16": 5e-3, "bf16": 3e-2, "q8_0": 1.5e-1}
CASES = {  # architecture -> (base config overrides, pre-tokenizer of its tokenizer)
    "llama-tied": ("llama", {"tie_word_embeddings": True}, "gpt-2"),
    "qwen2": ("qwen2", {}, "qwen2"),
    "gemma3": ("gemma3", {}, "gpt-2"),  # Gemma 3's BPE tokenizer.json, no tokenizer.model
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Per case: (base, adapter, merged SafeTensors reference), built once."""
    root = tmp_path_factory.mktemp("gguf")
    built = {}

    def get(case: str) -> tuple[Path, Path, Path]:
        if case not in built:
            arch, overrides, pre = CASES[case]
            base = build_base(root / case / "base", arch, tokenizer=False, vocab_size=VOCAB,
                              **overrides)
            save_bpe_tokenizer(base, VOCAB, pre)
            adapter = build_adapter(base, root / case / "adapter", target_modules=TARGETS)
            reference = root / case / "merged"
            mergeflow.merge(base, adapter, reference)
            built[case] = (base, adapter, reference)
        return built[case]

    return get


def write(models, tmp_path: Path, case: str, gguf_type: str) -> tuple[Path, Path]:
    base, adapter, _ = models(case)
    out = tmp_path / f"{case}-{gguf_type}"
    report = mergeflow.merge(base, adapter, out, save_method="gguf", gguf_type=gguf_type)
    assert report.save_method == "gguf" and report.dtype == gguf_type
    return out, out / f"model-{gguf_type}.gguf"


def load_llama(path: Path):
    return llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1,
                           seed=0)


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float32)  # (n, vocab)


@pytest.mark.parametrize(("case", "gguf_type"), [
    ("llama-tied", "f16"), ("llama-tied", "q8_0"), ("qwen2", "f16"), ("qwen2", "q8_0"),
    ("qwen2", "bf16"),
])
def test_llama_cpp_logits_match_the_merged_model(models, tmp_path, case, gguf_type):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, _, reference = models(case)
    out, path = write(models, tmp_path, case, gguf_type)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["Modelfile", "README.md", "merge-manifest.json", path.name])
    tokenizer = AutoTokenizer.from_pretrained(reference)
    model = AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32).eval()
    llm = load_llama(path)
    for text in PROMPTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        with torch.no_grad():
            want = model(torch.tensor([ids])).logits[0].numpy()  # (n, vocab)
        got = llama_logits(llm, ids)
        scale = float(np.abs(want).max())
        assert np.abs(got - want).max() <= TOLERANCE[gguf_type] * scale, (text, scale)
        if gguf_type == "f16":  # bf16 and q8_0 may flip a near-tie
            assert (got.argmax(-1) == want.argmax(-1)).all()


def test_merged_tensors_read_back_equal_the_safetensors_values(models, tmp_path):
    _, _, reference = models("llama-tied")
    _, path = write(models, tmp_path, "llama-tied", "f16")
    merged = read_tensors(reference)
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert "output.weight" not in tensors  # tied: llama.cpp reads token_embd
    down = np.asarray(tensors["blk.0.ffn_down.weight"].data)  # (out, in) as numpy sees it
    want = merged["model.layers.0.mlp.down_proj.weight"]
    assert np.array_equal(down, want.to(torch.float16).numpy())
    # q rows: HF keeps each head's rotary pairs in two halves, llama.cpp interleaves them
    q = np.asarray(tensors["blk.1.attn_q.weight"].data)
    hf = merged["model.layers.1.self_attn.q_proj.weight"].to(torch.float16).numpy()
    head = 16
    for h in range(4):
        for i in range(head // 2):
            assert np.array_equal(q[h * head + 2 * i], hf[h * head + i])
            assert np.array_equal(q[h * head + 2 * i + 1], hf[h * head + head // 2 + i])
    norm = np.asarray(tensors["blk.0.attn_norm.weight"].data)
    assert norm.dtype == np.float32


def test_gemma_norms_carry_the_offset_llama_cpp_expects(models, tmp_path):
    _, _, reference = models("gemma3")
    _, path = write(models, tmp_path, "gemma3", "f16")
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    stored = read_tensors(reference)["model.norm.weight"].numpy()
    assert np.array_equal(np.asarray(tensors["output_norm.weight"].data), stored + 1)
    assert "output.weight" not in tensors


def test_tokenizer_ids_eos_and_chat_template(models, tmp_path):
    from transformers import AutoTokenizer

    _, _, reference = models("qwen2")
    _, path = write(models, tmp_path, "qwen2", "f16")
    tokenizer = AutoTokenizer.from_pretrained(reference)
    llm = load_llama(path)
    for text in [*PROMPTS, "<|user|>hi there<|end|><|assistant|>", "  spaces\tand\nlines 12345"]:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == \
            tokenizer.encode(text, add_special_tokens=False), text
    assert llm.token_eos() == tokenizer.eos_token_id
    assert llm.token_bos() == tokenizer.bos_token_id
    assert llm.metadata["tokenizer.chat_template"] == tokenizer.chat_template
    assert llm.metadata["tokenizer.ggml.pre"] == "qwen2"


def test_modelfile_has_the_translated_template_and_stops(models, tmp_path):
    out, path = write(models, tmp_path, "llama-tied", "q8_0")
    text = (out / "Modelfile").read_text()
    assert text.startswith(f"FROM ./{path.name}\n")
    assert 'PARAMETER stop "</s>"' in text and 'PARAMETER stop "<|end|>"' in text
    go = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    # the Go template's literal parts are the Jinja template's own, role by role
    for role in ("system", "user", "assistant"):
        assert f'eq .Role "{role}" }}}}<|{role}|>{{{{ .Content }}}}<|end|>' in go
    assert go.endswith("{{ end }}{{ end }}<|assistant|>")
    manifest = json.loads((out / "merge-manifest.json").read_text())
    assert set(manifest["files"]) == {"Modelfile", "README.md", path.name}
    assert manifest["files"][path.name]["size"] == path.stat().st_size


def test_an_architecture_the_converter_does_not_know_is_refused_by_name(tmp_path):
    base = build_base(tmp_path / "base", "llama", tokenizer=False, vocab_size=VOCAB)
    save_bpe_tokenizer(base, VOCAB)
    adapter = build_adapter(base, tmp_path / "adapter", target_modules=["o_proj"])
    config = json.loads((base / "config.json").read_text())
    config["architectures"] = ["Llama9ForCausalLM"]  # a model llama.cpp has not met
    (base / "config.json").write_text(json.dumps(config))
    proc = run_cli("merge", "--base", str(base), "--adapter", str(adapter), "--out",
                   str(tmp_path / "out"), "--save-method", "gguf")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (
        f"error: {base / 'config.json'}: architecture 'Llama9ForCausalLM' is not one llama.cpp's "
        "converter converts (Architecture 'Llama9ForCausalLM' not supported!); merge with "
        "--save-method merged_16bit instead")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("broken", ["word-level", "no tokenizer.model"])
def test_a_tokenizer_the_converter_refuses_is_one_line_exit_2(tmp_path, broken):
    """A word-level tokenizer.json (no pre-tokenizer llama.cpp implements), and a Gemma 2 base
    without the tokenizer.model llama.cpp's converter reads Gemma 2's vocabulary from."""
    arch = "llama" if broken == "word-level" else "gemma2"
    base = build_base(tmp_path / "base", arch, tokenizer=broken == "word-level", vocab_size=VOCAB)
    if broken != "word-level":
        save_bpe_tokenizer(base, VOCAB)
    adapter = build_adapter(base, tmp_path / "adapter", target_modules=["o_proj"])
    out = tmp_path / "out"
    proc = run_cli("merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out),
                   "--save-method", "gguf")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
    if broken == "word-level":
        assert proc.stderr.startswith(f"error: {base / 'tokenizer.json'}: its pre-tokenizer is "
                                      "neither known to llama.cpp")
    else:
        assert proc.stderr.startswith(f"error: {base / 'config.json'}: llama.cpp's converter "
                                      "cannot convert this model (FileNotFoundError: File not "
                                      f"found: {base / 'tokenizer.model'})")
    assert not out.exists()


def test_cli_prints_the_ollama_command_and_a_crash_leaves_no_finished_gguf(models, tmp_path):
    base, adapter, _ = models("llama-tied")
    out = tmp_path / "cli-out"
    args = ("merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out),
            "--save-method", "gguf", "--gguf-type", "q8_0")
    os.environ["MERGEFLOW_FAULT_AT"] = "gguf-before-rename:1"
    try:
        crashed = run_cli(*args)
    finally:
        del os.environ["MERGEFLOW_FAULT_AT"]
    assert crashed.returncode != 0
    assert not out.exists()
    assert not [p for p in tmp_path.rglob("*.gguf")]  # only a .partial, never a finished name
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    assert f"ollama create cli-out -f {out / 'Modelfile'}" in done.stdout
    assert (out / "model-q8_0.gguf").is_file()
    assert not [p for p in tmp_path.rglob("*.partial")]
