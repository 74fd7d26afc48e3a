"""GGUF k-quants (``--gguf-type q4_k_m`` and the other types llama.cpp's quantizer makes): the
file is exactly what llama.cpp's own quantizer makes of Mergeflow's streamed 16-bit GGUF (the
two-step route), llama.cpp loads it and its logits follow the merged model, no 16-bit file is
left behind, and a type llama.cpp does not offer here is refused before anything is written.

Route: ``mergeflow.merge`` in process, and the CLI for the refusal; llama.cpp is llama-cpp-python.
Models: tiny Llama and Qwen2 with hidden 256, so k-quant blocks (256 values) fit their rows."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import build_adapter, build_base, save_bpe_tokenizer
from helpers import run_cli

import mergeflow
from mergeflow.output.folder import MANIFEST

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (scripts/setup builds it)")

VOCAB = 512
CASES = {"llama": ("llama", "gpt-2"), "qwen2": ("qwen2", "qwen2")}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = ["hello world 2024!", "the model merges a small adapter"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-quant")
    built = {}

    def get(case: str) -> tuple[Path, Path]:
        if case not in built:
            arch, pre = CASES[case]
            base = build_base(root / case / "base", arch, tokenizer=False, vocab_size=VOCAB,
                              hidden_size=256, intermediate_size=512, dtype=torch.bfloat16)
            save_bpe_tokenizer(base, VOCAB, pre)
            built[case] = (base, build_adapter(base, root / case / "adapter",
                                               target_modules=TARGETS))
        return built[case]

    return get


def _llama_quantize(source: Path, dest: Path, gguf_type: str) -> None:
    """llama.cpp's quantizer, called here as llama-quantize would be (the two-step route)."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{gguf_type.upper()}")
    params.nthread = 1
    assert llama_cpp.llama_model_quantize(str(source).encode(), str(dest).encode(),
                                          ctypes.byref(params)) == 0


def _logits(path: Path, ids: list[int]) -> np.ndarray:
    llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float32)  # (n, vocab)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("gguf_type", ["q4_k_m", "q5_k_m"])
def test_a_k_quant_is_llama_cpps_own_quantization_of_the_merge(models, tmp_path, case,
                                                                gguf_type):
    base, adapter = models(case)
    streamed = tmp_path / "bf16"
    mergeflow.merge(base, adapter, streamed, save_method="gguf", gguf_type="bf16")
    two_step = tmp_path / f"two-step-{gguf_type}.gguf"
    _llama_quantize(streamed / "model-bf16.gguf", two_step, gguf_type)

    out = tmp_path / "out"
    report = mergeflow.merge(base, adapter, out, save_method="gguf", gguf_type=gguf_type)
    assert report.dtype == gguf_type and report.status == "merged"
    path = out / f"model-{gguf_type}.gguf"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["Modelfile", "README.md", MANIFEST, path.name])  # no 16-bit file left behind
    assert path.read_bytes() == two_step.read_bytes()
    assert f"model-{gguf_type}.gguf" in (out / "Modelfile").read_text()


def test_llama_cpp_runs_the_k_quant_close_to_the_16_bit_merge(models, tmp_path):
    base, adapter = models("llama")
    mergeflow.merge(base, adapter, tmp_path / "bf16", save_method="gguf", gguf_type="bf16")
    mergeflow.merge(base, adapter, tmp_path / "q6", save_method="gguf", gguf_type="q6_k")
    ids = list(range(3, 40))
    want = _logits(tmp_path / "bf16" / "model-bf16.gguf", ids)
    got = _logits(tmp_path / "q6" / "model-q6_k.gguf", ids)
    assert np.abs(got - want).max() <= 0.1 * np.abs(want).max()
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("gguf_type", ["q9_k", "iq2_xxs"])
def test_a_type_llama_cpp_does_not_offer_here_is_refused_before_writing(models, tmp_path,
                                                                        gguf_type):
    base, adapter = models("qwen2")
    out = tmp_path / "out"
    proc = run_cli("merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out),
                   "--save-method", "gguf", "--gguf-type", gguf_type)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith(f"error: --gguf-type {gguf_type}: choose f16, bf16, q8_0 or")
    assert "q4_k_m" in proc.stderr and not out.exists()


def test_the_disk_check_counts_the_16_bit_file_beside_the_k_quant(models, tmp_path):
    from mergeflow.pipeline import prepare
    from mergeflow.pipeline.preflight import required_bytes
    from mergeflow.plan import MergePlan
    from mergeflow.spec import MergeSpec

    base, adapter = models("llama")
    needed = {}
    for gguf_type in ("bf16", "q4_k_m"):
        out = tmp_path / gguf_type
        spec = MergeSpec(base=str(base), adapter=str(adapter), out=str(out), save_method="gguf",
                         gguf_type=gguf_type)
        plan = MergePlan.load(prepare(spec).plan_path)
        needed[gguf_type] = (required_bytes(plan, out), plan.total_size)
    (streamed, total), (quantized, _) = needed["bf16"], needed["q4_k_m"]
    assert quantized - streamed == total * 17 // 32  # the quantized file, beside the 16-bit one


def test_several_types_come_from_one_merge(models, tmp_path):
    base, adapter = models("qwen2")
    out = tmp_path / "out"
    report = mergeflow.merge(base, adapter, out, save_method="gguf",
                             gguf_type="q4_k_m,q8_0,bf16")
    assert report.dtype == "q4_k_m,q8_0,bf16" and report.shards == 3
    names = ["model-q4_k_m.gguf", "model-q8_0.gguf", "model-bf16.gguf"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, "Modelfile", "README.md",
                                                            MANIFEST])
    assert report.total_size == sum((out / n).stat().st_size for n in names)
    for gguf_type in ("q4_k_m", "q8_0"):  # each is llama.cpp's own quantization of the bf16 file
        two_step = tmp_path / f"{gguf_type}.gguf"
        _llama_quantize(out / "model-bf16.gguf", two_step, gguf_type)
        assert (out / f"model-{gguf_type}.gguf").read_bytes() == two_step.read_bytes()
    assert "model-q4_k_m.gguf" in (out / "Modelfile").read_text()  # the first type asked

    only_quantized = tmp_path / "k"
    mergeflow.merge(base, adapter, only_quantized, save_method="gguf", gguf_type="q4_k_m,q6_k")
    assert sorted(p.name for p in only_quantized.glob("*.gguf")) == [
        "model-q4_k_m.gguf", "model-q6_k.gguf"]  # the 16-bit file it came from is gone


def test_each_quantized_file_is_scored_by_llama_cpp_and_fewer_bits_score_worse(models, tmp_path):
    from mergeflow.engine.gguf_score import score_files

    base, adapter = models("llama")
    out = tmp_path / "scored"
    report = mergeflow.merge(base, adapter, out, save_method="gguf",
                             gguf_type="q8_0,q4_k_m,q2_k")
    scores = report.gguf_scores
    assert sorted(scores) == ["model-q2_k.gguf", "model-q4_k_m.gguf", "model-q8_0.gguf"]
    kl = {name.split("-")[1].split(".")[0]: score["mean_kl"] for name, score in scores.items()}
    assert 0 < kl["q8_0"] < kl["q4_k_m"] < kl["q2_k"], kl  # the fewer bits, the further off
    assert all(0 <= score["top1"] <= 1 and score["tokens"] > 100 for score in scores.values())
    assert any(note.startswith("model-q4_k_m.gguf: mean KL") for note in report.notes)
    assert "model-q4_k_m.gguf: mean KL" in (out / "README.md").read_text()
    # a file against itself: nothing lost
    same = score_files(out / "model-q8_0.gguf", [out / "model-q8_0.gguf"])[0]
    assert same.mean_kl == pytest.approx(0, abs=1e-9) and same.top1 == 1
    unscored = mergeflow.merge(base, adapter, tmp_path / "unscored", save_method="gguf",
                               gguf_type="q4_k_m", gguf_check=False)
    assert unscored.gguf_scores == {}
