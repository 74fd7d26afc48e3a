"""Quantized (bitsandbytes 4-bit / 8-bit) bases: merged_16bit, merged_4bit, lora export, and
merging onto the original weights.

Every base here is a tiny Llama (hidden 128, intermediate 256, 2 layers) quantized by transformers
on the CPU and saved with ``save_pretrained``; every adapter is made by PEFT on the quantized
model. The references are the live adapter (``PeftModel`` on the quantized model transformers
loads) and PEFT's own ``merge_and_unload`` on the float original.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from builders import build_adapter, build_base, build_quantized_base
from helpers import logits_of, read_tensors
from safetensors.torch import save_file
from typer.testing import CliRunner

import mergeflow
from mergeflow.engine import codecs
from mergeflow.errors import CheckpointError, InputError, PlanError
from mergeflow.model import quant
from mergeflow.model.checkpoint import Checkpoint

SIZES = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]  # k_proj, up_proj unadapted
CASES = {
    "nf4-dq-f32-sharded": dict(bits=4, quant_type="nf4", double_quant=True,
                               compute_dtype=torch.float32, max_shard_size="60KB"),
    "nf4-bf16": dict(bits=4, quant_type="nf4", double_quant=False, compute_dtype=torch.bfloat16),
    "fp4-dq-bf16": dict(bits=4, quant_type="fp4", double_quant=True, compute_dtype=torch.bfloat16),
    "fp4-f32-sharded": dict(bits=4, quant_type="fp4", double_quant=False,
                            compute_dtype=torch.float32, max_shard_size="60KB"),
    "int8": dict(bits=8),
}
# Largest logit difference allowed against the live adapter on the quantized model: float32
# output merges must agree to float32 rounding (measured: ~5e-7); bfloat16 ones (the "auto" dtype
# of a bf16-compute or 8-bit base) to bfloat16 rounding of the weights (measured: 3e-3 to 6e-3).
# The tiny models' logits are about 0.75 in size.
LIVE_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def _live_reference_is_bf16() -> bool:
    """On CPUs with AVX512-BF16, bitsandbytes runs the live 4-bit layers with its fused bf16
    kernel whatever the compute dtype, so the live reference itself is bf16-rounded there."""
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


if _live_reference_is_bf16():
    LIVE_TOL[torch.float32] = 3e-2  # measured there: 2e-3 (LoRA) to 2.2e-2 (DoRA)


# -- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def original(tmp_path_factory) -> Path:
    """The float32 model every quantized base is made from."""
    return build_base(tmp_path_factory.mktemp("q-original") / "model", "llama", **SIZES)


@pytest.fixture(scope="session")
def quantized(original, tmp_path_factory):
    """``quantized(case)`` -> (base folder, adapter folder), built once per case."""
    root = tmp_path_factory.mktemp("q-bases")
    built: dict[str, tuple[Path, Path]] = {}

    def make(case: str) -> tuple[Path, Path]:
        if case not in built:
            base = build_quantized_base(original, root / case, **CASES[case])
            adapter = build_adapter(base, root / f"{case}-adapter", target_modules=TARGETS)
            built[case] = base, adapter
        return built[case]

    return make


@pytest.fixture(scope="session")
def live(quantized, input_ids):
    """``live(case)``: logits of the live adapter on the quantized model (the reference)."""
    cache: dict[str, torch.Tensor] = {}

    def get(case: str) -> torch.Tensor:
        if case not in cache:
            base, adapter = quantized(case)
            cache[case] = logits_of(base, input_ids, adapter=adapter)
        return cache[case]

    return get


@pytest.fixture(scope="session")
def merged16(quantized, tmp_path_factory):
    """``merged16(case)``: the merged_16bit output folder of a case, merged once."""
    root = tmp_path_factory.mktemp("q-merged16")
    cache: dict[str, Path] = {}

    def get(case: str) -> Path:
        if case not in cache:
            base, adapter = quantized(case)
            mergeflow.merge(base, adapter, root / case)
            cache[case] = root / case
        return cache[case]

    return get


def _bnb_modules(model) -> set[str]:
    return {type(m).__name__ for m in model.modules() if type(m).__module__.startswith("bitsandbytes")}


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


# -- reading quantized bases -------------------------------------------------------------------

@pytest.mark.parametrize("case", list(CASES))
def test_merged_16bit_matches_live_adapter(case, quantized, live, merged16, input_ids):
    base, _ = quantized(case)
    if "max_shard_size" in CASES[case]:
        assert len(Checkpoint(base).files) > 1  # units' siblings may sit in other shards
    out = merged16(case)
    config = _config(out)
    assert "quantization_config" not in config
    compute = CASES[case].get("compute_dtype")
    want_dtype = "float32" if compute == torch.float32 else "bfloat16"
    assert config["dtype"] == want_dtype  # auto: bnb_4bit_compute_dtype, else bfloat16
    tensors = read_tensors(out)
    assert set(tensors) == set(Checkpoint(base).tensors) - quant.detect(
        _config(base), Checkpoint(base)).siblings
    assert all(t.dtype == getattr(torch, want_dtype) for t in tensors.values())

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert not _bnb_modules(model)  # a plain model
    got = logits_of(out, input_ids)
    diff = (got - live(case)).abs().max().item()
    print(f"{case}: merged_16bit vs live adapter max |dlogit| = {diff:.2e}")
    assert diff < LIVE_TOL[getattr(torch, want_dtype)]


def _forward(model, input_ids) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=input_ids).logits.float()


@pytest.mark.parametrize("case", list(CASES))
def test_merged_4bit_reloads_quantized(case, quantized, merged16, tmp_path, input_ids):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, adapter = quantized(case)
    out = tmp_path / "m4"
    report = mergeflow.merge(base, adapter, out, save_method="merged_4bit")
    config = _config(out)
    assert config["quantization_config"] == _config(base)["quantization_config"]
    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    kind = "Linear4bit" if CASES[case]["bits"] == 4 else "Linear8bitLt"
    assert _bnb_modules(model) == {kind}
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == kind
    got = _forward(model, input_ids)
    # PEFT's own merge on the quantized model (dequantize, add, re-quantize) is the same encoding
    peft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, device_map="cpu"), adapter).merge_and_unload()
    exact = (got - _forward(peft, input_ids)).abs().max().item()
    # and against the 16-bit merge, the difference is the rounding of one more quantization: the
    # same size as the base's own (4-bit: ~0.16 of logits ~0.75 on these tiny random models)
    rounding = (got - logits_of(merged16(case), input_ids)).abs().max().item()
    print(f"{case}: merged_4bit vs PEFT 4-bit merge_and_unload {exact:.2e}, "
          f"vs merged_16bit {rounding:.2e}")
    assert exact < 1e-5
    assert rounding < (0.25 if CASES[case]["bits"] == 4 else 0.05)
    # unadapted quantized weights are copied byte for byte
    before, after = read_tensors(base), read_tensors(out)
    assert set(after) == set(before)
    for name in before:
        if ".k_proj." in name or ".up_proj." in name:
            assert torch.equal(before[name], after[name]), name
    assert any("re-quantized" in n for n in report.notes)


@pytest.mark.parametrize("case", ["nf4-dq-f32-sharded", "int8"])
def test_lora_export_round_trips(case, quantized, live, tmp_path, input_ids):
    base, adapter = quantized(case)
    out = tmp_path / "lora"
    report = mergeflow.merge(base, adapter, out, save_method="lora")
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md",
            "merge-manifest.json", "tokenizer.json"} <= names
    assert "config.json" not in names and "model.safetensors" not in names
    assert (out / "adapter_config.json").read_bytes() == (adapter / "adapter_config.json").read_bytes()
    assert read_tensors_file(out / "adapter_model.safetensors").keys() == \
        read_tensors_file(adapter / "adapter_model.safetensors").keys()
    got = logits_of(base, input_ids, adapter=out)
    assert torch.equal(got, live(case))
    assert any("unmerged" in n for n in report.notes)


def read_tensors_file(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_lora_export_converts_a_bin_adapter(quantized, live, tmp_path, input_ids):
    base, adapter = quantized("nf4-dq-f32-sharded")
    old = tmp_path / "old-adapter"
    old.mkdir()
    shutil.copy(adapter / "adapter_config.json", old)
    torch.save(read_tensors_file(adapter / "adapter_model.safetensors"), old / "adapter_model.bin")
    out = tmp_path / "lora"
    mergeflow.merge(base, old, out, save_method="lora")
    assert (out / "adapter_model.safetensors").is_file() and not (out / "adapter_model.bin").exists()
    assert torch.equal(logits_of(base, input_ids, adapter=out), live("nf4-dq-f32-sharded"))


def test_dora_on_a_4bit_base(quantized, tmp_path, input_ids):
    base, _ = quantized("nf4-dq-f32-sharded")
    adapter = build_adapter(base, tmp_path / "dora", target_modules=["q_proj", "down_proj"],
                            use_dora=True, use_rslora=True)
    report = mergeflow.merge(base, adapter, tmp_path / "out")
    assert report.variant == "rsDoRA"
    diff = (logits_of(tmp_path / "out", input_ids)
            - logits_of(base, input_ids, adapter=adapter)).abs().max().item()
    print(f"rsDoRA on nf4: merged_16bit vs live adapter max |dlogit| = {diff:.2e}")
    assert diff < LIVE_TOL[torch.float32]


def test_lora_export_is_validated_against_the_base(quantized, make_base, make_adapter, tmp_path):
    base, _ = quantized("nf4-bf16")
    other = make_adapter(make_base("llama"), target_modules=["q_proj"])  # hidden 64, not 128
    with pytest.raises(PlanError, match="q_proj"):
        mergeflow.merge(base, other, tmp_path / "out", save_method="lora")
    assert not (tmp_path / "out").exists()


# -- merging onto the original ------------------------------------------------------------------

@pytest.mark.parametrize("case", ["nf4-dq-f32-sharded", "fp4-dq-bf16", "int8"])
def test_merge_onto_original_matches_peft_merge(case, original, quantized, tmp_path, input_ids):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, adapter = quantized(case)
    out = tmp_path / "onto-original"
    report = mergeflow.merge(base, adapter, out, merge_onto="original", original_base=original)
    assert _config(out)["dtype"] == "float32"  # auto: the original's own dtype
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(original), adapter)
    model = model.merge_and_unload().eval()
    with torch.no_grad():
        ref = model(input_ids=input_ids).logits
    diff = (logits_of(out, input_ids) - ref).abs().max().item()
    print(f"{case}: merge onto original vs PEFT merge_and_unload max |dlogit| = {diff:.2e}")
    assert diff < 1e-4
    assert any("original" in n and str(original) in n for n in report.notes)
    manifest = json.loads((out / "merge-manifest.json").read_text())
    assert manifest["options"]["merge_onto"] == "original"
    assert any("original" in n for n in manifest["report"]["notes"])


def test_merged_4bit_onto_original(original, quantized, tmp_path, input_ids):
    from transformers import AutoModelForCausalLM

    base, adapter = quantized("nf4-dq-f32-sharded")
    out = tmp_path / "m4-original"
    mergeflow.merge(base, adapter, out, save_method="merged_4bit", merge_onto="original",
                    original_base=original)
    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    assert _bnb_modules(model) == {"Linear4bit"}


def test_dequantized_is_the_default_and_reported(quantized, merged16):
    manifest = json.loads((merged16("nf4-bf16") / "merge-manifest.json").read_text())
    assert manifest["options"]["merge_onto"] == "dequantized"
    assert manifest["options"]["save_method"] == "merged_16bit"
    assert any("dequantized" in n for n in manifest["report"]["notes"])


def test_bad_original_exits_2(quantized, tmp_path):
    from mergeflow.cli.app import app

    base, adapter = quantized("nf4-bf16")
    bad = build_base(tmp_path / "bad-original", "llama", **{**SIZES, "intermediate_size": 192})
    result = CliRunner().invoke(app, [
        "merge", "--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "out"),
        "--merge-onto", "original", "--original-base", str(bad)])
    assert result.exit_code == 2, result.output
    assert "mlp" in result.output and "shape" in result.output
    assert not (tmp_path / "out").exists()


def test_original_with_other_tensor_names_is_refused(quantized, original, tmp_path):
    base, adapter = quantized("nf4-bf16")
    bad = tmp_path / "renamed"
    shutil.copytree(original, bad)
    tensors = read_tensors(bad)
    tensors["model.extra.weight"] = tensors.pop("model.norm.weight")
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(PlanError, match=r"model\.norm\.weight"):
        mergeflow.merge(base, adapter, tmp_path / "out", merge_onto="original", original_base=bad)


# -- options ------------------------------------------------------------------------------------

def test_options_are_checked(quantized, original, make_adapter, tmp_path):
    base, adapter = quantized("nf4-bf16")
    with pytest.raises(InputError, match="needs `original_base=PATH`"):
        mergeflow.merge(base, adapter, tmp_path / "a", merge_onto="original")
    with pytest.raises(InputError, match="only read with `merge_onto=original`"):
        mergeflow.merge(base, adapter, tmp_path / "b", original_base=original)
    plain_adapter = make_adapter(original, target_modules=["q_proj"])
    with pytest.raises(InputError, match="not quantized"):
        mergeflow.merge(original, plain_adapter, tmp_path / "c", save_method="merged_4bit")
    with pytest.raises(InputError, match="not quantized"):
        mergeflow.merge(original, plain_adapter, tmp_path / "d", merge_onto="original",
                        original_base=original)


def test_save_method_and_merge_onto_change_the_fingerprint(quantized, original, tmp_path):
    from mergeflow.pipeline.steps import prepare
    from mergeflow.spec import MergeSpec

    base, adapter = quantized("nf4-bf16")
    prints = set()
    for i, extra in enumerate([{}, {"save_method": "merged_4bit"}, {"save_method": "lora"},
                               {"merge_onto": "original", "original_base": str(original)}]):
        spec = MergeSpec(base=str(base), adapter=str(adapter), out=str(tmp_path / f"o{i}"), **extra)
        prints.add(prepare(spec).fingerprint)
    assert len(prints) == 4


def test_cli_flags(quantized, original, make_adapter, tmp_path):
    """The flags reach the spec: each of these is refused at plan time (exit 2, nothing written)
    for the reason only that flag can cause."""
    from mergeflow.cli.app import app

    base, adapter = quantized("nf4-bf16")
    plain_adapter = make_adapter(original, target_modules=["q_proj"])
    runs = {
        "not quantized": ["--base", str(original), "--adapter", str(plain_adapter),
                          "--save-method", "merged_4bit"],
        "needs --original-base": ["--base", str(base), "--adapter", str(adapter),
                                  "--merge-onto", "original"],
        "only read with --merge-onto": ["--base", str(base), "--adapter", str(adapter),
                                        "--original-base", str(original)],
        # a word-level tokenizer: llama.cpp has no pre-tokenizer for it
        "pre-tokenizer": ["--base", str(base), "--adapter", str(adapter), "--save-method", "gguf"],
    }
    for i, (message, args) in enumerate(runs.items()):
        out = tmp_path / f"out{i}"
        result = CliRunner().invoke(app, ["merge", *args, "--out", str(out)])
        assert result.exit_code == 2, result.output
        assert message in " ".join(result.output.split()), result.output
        assert not out.exists()


# -- layouts (bitsandbytes directly, no model) ------------------------------------------------------

def _fake_quantized(folder: Path, blocksize: int, nested: bool, quant_type: str,
                    storage: str = "uint8") -> torch.Tensor:
    """A one-weight bitsandbytes checkpoint with an arbitrary blocksize; returns the weight."""
    import bitsandbytes.functional as bnbf

    folder.mkdir()
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    packed, state = bnbf.quantize_4bit(weight, blocksize=blocksize, compress_statistics=nested,
                                       quant_type=quant_type)
    tensors = {"layer.weight": packed, "norm.weight": torch.ones(64)}
    tensors.update({f"layer.weight.{k}": v for k, v in state.as_dict(packed=True).items()})
    save_file(tensors, str(folder / "model.safetensors"))
    qc = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": quant_type,
          "bnb_4bit_quant_storage": storage, "bnb_4bit_compute_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps({"quantization_config": qc}))
    return bnbf.dequantize_4bit(packed, state)


@pytest.mark.parametrize(("blocksize", "nested", "quant_type"),
                         [(32, False, "nf4"), (128, True, "fp4"), (256, True, "nf4"), (4096, False, "fp4")])
def test_any_blocksize_dequantizes_and_requantizes(tmp_path, blocksize, nested, quant_type):
    want = _fake_quantized(tmp_path / "q", blocksize, nested, quant_type)
    base = Checkpoint(tmp_path / "q")
    found = quant.detect(_config(tmp_path / "q"), base)
    assert found.compute_dtype() == "BF16"
    spec = found.units["layer.weight"]
    assert (spec.blocksize, spec.nested, spec.shape) == (blocksize, nested, [64, 256])
    assert set(found.logical_tensors(base)) == {"layer.weight", "norm.weight"}
    stored = base.read_many(quant.output_keys(spec))
    weight = codecs.dequantize(spec, stored)
    assert torch.equal(weight, want.float())
    again = codecs.requantize(spec, weight)
    infos = quant.output_infos(spec, base)
    assert [(k, tuple(v.shape)) for k, v in again.items()] == [(i.name, i.shape) for i in infos]
    assert torch.allclose(codecs.dequantize(spec, again), weight, atol=1e-3)


def test_unsupported_storage_fails_at_plan_time(tmp_path):
    _fake_quantized(tmp_path / "q", 64, False, "nf4", storage="bfloat16")
    with pytest.raises(CheckpointError, match="bnb_4bit_quant_storage"):
        quant.detect(_config(tmp_path / "q"), Checkpoint(tmp_path / "q"))


def test_broken_units_fail_at_plan_time(tmp_path):
    _fake_quantized(tmp_path / "q", 64, True, "nf4")
    config = _config(tmp_path / "q")
    tensors = read_tensors(tmp_path / "q")
    missing = tmp_path / "missing"
    missing.mkdir()
    save_file({k: v for k, v in tensors.items() if not k.endswith("nested_absmax")},
              str(missing / "model.safetensors"))
    with pytest.raises(CheckpointError, match="nested_absmax"):
        quant.detect(config, Checkpoint(missing))
    with pytest.raises(CheckpointError, match="no quantization_config"):
        quant.detect({}, Checkpoint(tmp_path / "q"))
    with pytest.raises(CheckpointError, match="gptq"):
        quant.detect({"quantization_config": {"quant_method": "gptq"}}, Checkpoint(tmp_path / "q"))


# -- device ---------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("save_method", ["merged_16bit", "merged_4bit"])
def test_cuda_matches_cpu(quantized, tmp_path, save_method):
    base, adapter = quantized("nf4-dq-f32-sharded")
    mergeflow.merge(base, adapter, tmp_path / "cpu", save_method=save_method)
    mergeflow.merge(base, adapter, tmp_path / "cuda", save_method=save_method, device="cuda")
    cpu, gpu = read_tensors(tmp_path / "cpu"), read_tensors(tmp_path / "cuda")
    assert cpu.keys() == gpu.keys()
    for name in cpu:
        if cpu[name].is_floating_point():
            assert torch.allclose(cpu[name].float(), gpu[name].float(), atol=1e-4), name
        elif "quant_state" not in name:
            assert (cpu[name].int() - gpu[name].int()).abs().le(1).float().mean() > 0.99, name


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_without_a_device_is_a_clear_input_error(quantized, tmp_path):
    base, adapter = quantized("nf4-bf16")
    with pytest.raises(InputError, match="`device=cuda`"):
        mergeflow.merge(base, adapter, tmp_path / "out", device="cuda")
    assert not (tmp_path / "out").exists()


# -- streaming: row blocks of quantized units ---------------------------------------------------

@pytest.mark.parametrize("case", ["nf4-bf16", "fp4-dq-bf16", "int8"])
@pytest.mark.parametrize("method", ["merged_16bit", "merged_4bit"])
def test_quantized_units_stream_by_rows_to_the_same_bytes(case, method, quantized, tmp_path):
    """Dequantizing and re-quantizing row block by row block (1 KB of float32 rows: a few rows
    per block) gives the bytes of whole-weight decoding and encoding (1 GB blocks)."""
    from helpers import sha256, weight_files

    base, adapter = quantized(case)
    for size in ("1KB", "1GB"):
        mergeflow.merge(base, adapter, tmp_path / size, save_method=method, block_size=size)
    rows, whole = (({p.name: sha256(p) for p in weight_files(tmp_path / s)}) for s in ("1KB", "1GB"))
    assert rows == whole
