"""FP8 in and out: bases that ship in FP8, and ``save_method=fp8`` for vLLM.

Route: ``mergeflow.merge`` in this process, CPU. Bases are tiny Llamas (hidden 256, so 128x128
blocks fit) saved in bfloat16, then stored as FP8 the two ways FP8 bases ship
(``tests/builders.build_fp8_base``): DeepSeek/Qwen block-wise FP8 (``weight_scale_inv``), and
compressed-tensors FP8_DYNAMIC made by compressed-tensors' own compressor. Adapters are PEFT's.

The references are the field's own code: transformers' FP8 dequantizer (``FineGrainedFP8Config(
dequantize=True)``, or transformers + compressed-tensors decompressing) with the adapter live on
top, and for the export compressed-tensors' own compressor run on PEFT's merged model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from builders import build_adapter, build_base, build_fp8_base, save_compressed_tensors
from helpers import read_tensors

import mergeflow
from mergeflow.errors import InputError

pytest.importorskip("compressed_tensors", reason="compressed-tensors (the fp8 and test extras)")

SIZES = dict(hidden_size=256, intermediate_size=384, num_attention_heads=4, num_key_value_heads=2,
             num_hidden_layers=2, vocab_size=320)
TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]  # k_proj, up_proj unadapted
IDS = torch.tensor([[1, 5, 9, 42, 7, 300, 11, 2]])


@pytest.fixture(scope="module")
def bf16_base(tmp_path_factory) -> Path:
    return build_base(tmp_path_factory.mktemp("fp8") / "base", dtype=torch.bfloat16, **SIZES)


@pytest.fixture(scope="module")
def adapter(bf16_base) -> Path:
    return build_adapter(bf16_base, bf16_base.parent / "adapter", target_modules=TARGETS)


def _dequantized_model(base: Path, dtype: torch.dtype):
    """The FP8 base as transformers itself dequantizes it."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig, FineGrainedFP8Config

    config = json.loads((base / "config.json").read_text())["quantization_config"]
    extra = {"quantization_config": FineGrainedFP8Config(dequantize=True)
             if config["quant_method"] == "fp8" else CompressedTensorsConfig(run_compressed=False)}
    return AutoModelForCausalLM.from_pretrained(base, dtype=dtype, **extra).eval()


def _live_logits(base: Path, adapter: Path) -> torch.Tensor:
    from peft import PeftModel

    model = PeftModel.from_pretrained(_dequantized_model(base, torch.bfloat16), adapter).eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def _logits(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


@pytest.mark.parametrize("layout", ["block", "channel"])
def test_an_fp8_base_merges_onto_the_weights_transformers_dequantizes(tmp_path, bf16_base,
                                                                      adapter, layout):
    base = build_fp8_base(bf16_base, tmp_path / f"fp8-{layout}", layout=layout)
    out = tmp_path / "merged"
    report = mergeflow.merge(base, adapter, out)

    merged = read_tensors(out)
    assert not any(t.dtype == torch.float8_e4m3fn for t in merged.values())
    assert not any(k.endswith(("_scale", "_scale_inv")) for k in merged)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert any("merged onto its dequantized weights" in n for n in report.notes)
    # unadapted weights are transformers' own dequantization, bit for bit
    dequantized = _dequantized_model(base, torch.bfloat16).state_dict()
    for name in ("model.layers.0.self_attn.k_proj.weight", "model.layers.1.mlp.up_proj.weight"):
        assert merged[name].dtype == torch.bfloat16
        assert torch.equal(merged[name], dequantized[name]), name
    # adapted ones: the dequantized weight the bf16 model runs with plus PEFT's float32 delta,
    # rounded once to bf16
    from peft import PeftModel

    peft_merged = PeftModel.from_pretrained(_dequantized_model(base, torch.bfloat16).float(),
                                            adapter)
    expected = peft_merged.merge_and_unload().state_dict()
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        want = expected[name].to(torch.bfloat16)
        off = (merged[name] != want).float().mean().item()
        assert off < 1e-3, f"{name}: {off:.2%} of elements differ from PEFT's merge"
    # and the merged model runs as the adapter live on the dequantized base
    live, got = _live_logits(base, adapter), _logits(out)
    assert (got - live).abs().max().item() < 3e-2 * live.abs().max().item()


def test_save_method_fp8_is_compressed_tensors_own_encoding_of_the_merge(tmp_path, bf16_base,
                                                                          adapter):
    out = tmp_path / "fp8"
    report = mergeflow.merge(bf16_base, adapter, out, save_method="fp8")

    written = read_tensors(out)
    config = json.loads((out / "config.json").read_text())
    linears = [k for k in written if ".layers." in k and k.endswith("proj.weight")]
    assert len(linears) == 2 * 7
    for name in linears:  # every Linear but lm_head is float8 with a per-row scale
        assert written[name].dtype == torch.float8_e4m3fn, name
        assert list(written[f"{name}_scale"].shape) == [written[name].shape[0], 1]
    assert written["lm_head.weight"].dtype == torch.bfloat16
    assert written["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert any("FP8_DYNAMIC" in n for n in report.notes)

    # the peer: PEFT's merge, then compressed-tensors' own compressor (llm-compressor's route)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(bf16_base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload().to(torch.bfloat16)
    save_compressed_tensors(merged, tmp_path / "peer")
    peer = read_tensors(tmp_path / "peer")
    peer_config = json.loads((tmp_path / "peer" / "config.json").read_text())
    assert config["quantization_config"] == peer_config["quantization_config"]
    assert set(written) == set(peer)
    for name, tensor in peer.items():
        same = (written[name].view(torch.uint8) == tensor.view(torch.uint8)).float().mean().item() \
            if tensor.dtype == torch.float8_e4m3fn else (written[name] == tensor).float().mean().item()
        assert same > 0.999, f"{name}: {1 - same:.2%} of values differ from compressed-tensors'"

    # transformers (with compressed-tensors) loads it on the CPU; it runs as close to the live
    # adapter as the per-channel FP8 rounding of the exact merge (the peer's file) does
    from helpers import logits_of

    live = logits_of(bf16_base, IDS, adapter=adapter, dtype=torch.bfloat16)
    got, rounded = _logits(out), _logits(tmp_path / "peer")
    assert (got - rounded).abs().max().item() <= 1e-2 * rounded.abs().max().item()
    assert (got - live).abs().max().item() <= 1.05 * (rounded - live).abs().max().item() + 1e-3
    assert (got - live).abs().max().item() < 0.25 * live.abs().max().item()  # FP8, not garbage


def test_fp8_block_scheme_writes_a_scale_per_128x128_block(tmp_path, bf16_base, adapter):
    out = tmp_path / "fp8-block"
    mergeflow.merge(bf16_base, adapter, out, save_method="fp8", fp8_scheme="block")
    written = read_tensors(out)
    assert list(written["model.layers.0.mlp.gate_proj.weight_scale"].shape) == [3, 2]  # 384x256
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["config_groups"]["group_0"]["weights"]["strategy"] == "block"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(bf16_base, dtype=torch.float32)
    from peft import PeftModel

    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload().to(torch.bfloat16)
    save_compressed_tensors(merged, tmp_path / "peer", "FP8_BLOCK")
    peer = read_tensors(tmp_path / "peer")
    for name in ("model.layers.0.mlp.gate_proj.weight", "model.layers.1.self_attn.o_proj.weight"):
        for key in (name, f"{name}_scale"):
            a, b = written[key], peer[key]
            if a.dtype == torch.float8_e4m3fn:
                a, b = a.view(torch.uint8), b.view(torch.uint8)
            assert (a == b).float().mean().item() > 0.999, key


def test_fp8_scheme_without_save_method_fp8_is_refused(tmp_path, bf16_base, adapter):
    with pytest.raises(InputError, match=r"fp8_scheme=block` is only read with `save_method=fp8"):
        mergeflow.merge(bf16_base, adapter, tmp_path / "out", fp8_scheme="block")
    assert not (tmp_path / "out").exists()


def _drop_tensor(folder, key: str) -> None:
    """Remove tensor ``key`` from the folder's single ``model.safetensors`` (a broken base)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    del tensors[key]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_a_float8_weight_without_its_scale_is_refused_naming_it(tmp_path, bf16_base, adapter):
    base = build_fp8_base(bf16_base, tmp_path / "fp8", layout="block")
    _drop_tensor(base, "model.layers.1.mlp.up_proj.weight_scale_inv")
    with pytest.raises(InputError, match=r"model\.layers\.1\.mlp\.up_proj\.weight' has no"):
        mergeflow.merge(base, adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("layout", ["block", "channel"])
def test_merged_4bit_keeps_an_fp8_base_in_its_own_format(tmp_path, bf16_base, adapter, layout):
    """merged_4bit (re-quantize in the base's own format): changed weights re-encoded as the
    base's own tool encodes them (transformers' FP8 quantizer for block-wise FP8,
    compressed-tensors for its format) from PEFT's merge; unchanged ones copied as stored."""
    from safetensors.torch import load_file

    base = build_fp8_base(bf16_base, tmp_path / "fp8", layout=layout)
    out = tmp_path / "out"
    report = mergeflow.merge(base, adapter, out, save_method="merged_4bit")
    written, stored = read_tensors(out), load_file(base / "model.safetensors")
    assert set(written) == set(stored)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == json.loads(
        (base / "config.json").read_text())["quantization_config"]
    assert any("re-quantized" in n and "quantization_config kept" in n for n in report.notes)
    role = "weight_scale_inv" if layout == "block" else "weight_scale"
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.up_proj"):  # unadapted
        for key in (f"{name}.weight", f"{name}.{role}"):
            assert written[key].view(torch.uint8).equal(stored[key].view(torch.uint8)), key
    # the peer: PEFT's merge on the dequantized weights, encoded by the base's own tool
    from peft import PeftModel

    model = _dequantized_model(base, torch.bfloat16).float()
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload().to(torch.bfloat16)
    weights = merged.state_dict()
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):  # adapted
        if layout == "block":
            from types import SimpleNamespace

            from transformers import FineGrainedFP8Config
            from transformers.integrations.finegrained_fp8 import Fp8Quantize

            quantizer = Fp8Quantize(SimpleNamespace(quantization_config=FineGrainedFP8Config()))
            peer = quantizer._quantize_one(f"{name}.weight", weights[f"{name}.weight"])
        else:  # the merged weights in a plain model, as llm-compressor would be given them
            from transformers import AutoModelForCausalLM

            plain = AutoModelForCausalLM.from_pretrained(bf16_base, dtype=torch.bfloat16)
            plain.load_state_dict({k: weights[k] for k in plain.state_dict()})
            save_compressed_tensors(plain, tmp_path / "peer")
            peer = read_tensors(tmp_path / "peer")
        same = (written[f"{name}.weight"].view(torch.uint8)
                == peer[f"{name}.weight"].view(torch.uint8)).float().mean().item()
        assert same > 0.999, name
        assert torch.equal(written[f"{name}.{role}"], peer[f"{name}.{role}"]), name
    # transformers loads it as an FP8 model again, and it runs like the live adapter
    live, got = _live_logits(base, adapter), _dequantized_logits(out)
    assert (got - live).abs().max().item() < 0.25 * live.abs().max().item()


def _dequantized_logits(folder: Path) -> torch.Tensor:
    with torch.no_grad():
        return _dequantized_model(folder, torch.bfloat16)(input_ids=IDS).logits.float()


def test_an_fp8_base_exports_to_fp8_again(tmp_path, bf16_base, adapter):
    """FP8 in, FP8 out: the block-wise base decoded by rows, merged, and encoded per channel."""
    base = build_fp8_base(bf16_base, tmp_path / "fp8", layout="block")
    out = tmp_path / "out"
    mergeflow.merge(base, adapter, out, save_method="fp8")
    written = read_tensors(out)
    assert not any(k.endswith("_scale_inv") for k in written)
    # the peer: PEFT's merge on the weights transformers dequantizes, then compressed-tensors
    from peft import PeftModel

    model = _dequantized_model(base, torch.bfloat16).float()
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload().to(torch.bfloat16)
    save_compressed_tensors(merged, tmp_path / "peer")
    peer = read_tensors(tmp_path / "peer")  # (transformers keeps the dequantized base's scales)
    assert set(written) == {k for k in peer if not k.endswith("_scale_inv")}
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"):
        assert written[name].dtype == torch.float8_e4m3fn
        same = (written[name].view(torch.uint8) == peer[name].view(torch.uint8)).float().mean()
        assert same.item() > 0.999, name
        assert torch.equal(written[f"{name}_scale"], peer[f"{name}_scale"]), name


def test_verification_checks_fp8_weights_as_served_and_catches_a_wrong_scale(tmp_path, bf16_base,
                                                                               adapter):
    """The sampled-row check decodes the written float8 values with their scales: the output
    passes, and the same file with one weight's scales off by 10% fails, naming it."""
    from safetensors.torch import load_file, save_file

    from mergeflow.engine.shards import open_merger
    from mergeflow.model.checkpoint import Checkpoint
    from mergeflow.pipeline.steps import prepare
    from mergeflow.pipeline.verification import NumericChecker, check_values
    from mergeflow.plan import Fp8, MergePlan
    from mergeflow.spec import MergeSpec

    out = tmp_path / "out"
    mergeflow.merge(bf16_base, adapter, out, save_method="fp8")
    prepared = prepare(MergeSpec(base=str(bf16_base), adapter=str(adapter),
                                 out=str(tmp_path / "again"), save_method="fp8"))
    plan = MergePlan.load(prepared.plan_path)
    entries = [t for s in plan.shards for t in s.tensors if isinstance(t.encoding, Fp8)]
    assert len(entries) == 14
    count, checks, problems = check_values(Checkpoint(out), entries, NumericChecker(open_merger(plan)))
    assert count == 14 and not problems and len(checks) == 14
    assert {c.kind for c in checks} == {"LoRA", "FP8 encoding"}  # adapted, and only re-encoded
    assert max(c.relative_error for c in checks) < 0.05

    tensors = load_file(out / "model.safetensors")
    name = "model.layers.1.mlp.gate_proj.weight"
    tensors[f"{name}_scale"] = tensors[f"{name}_scale"] * 1.1
    (tmp_path / "bad").mkdir()
    save_file(tensors, tmp_path / "bad" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "bad" / "config.json").write_bytes((out / "config.json").read_bytes())
    _, _, problems = check_values(Checkpoint(tmp_path / "bad"), entries,
                                  NumericChecker(open_merger(plan)))
    assert len(problems) == 1 and name in problems[0], problems


# -- MXFP4 (gpt-oss) ----------------------------------------------------------------------------

GPT_OSS_EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(bf16 gpt-oss, its MXFP4 checkpoint, an adapter on attention and both expert tensors)."""
    from builders import build_gpt_oss, build_mxfp4_base

    root = tmp_path_factory.mktemp("gpt_oss")
    build_gpt_oss(root / "bf16", hidden=96, intermediate=64, dtype=torch.bfloat16)
    adapter = build_adapter(root / "bf16", root / "adapter", target_modules=["q_proj", "v_proj"],
                            target_parameters=GPT_OSS_EXPERTS)
    return root / "bf16", build_mxfp4_base(root / "bf16", root / "mxfp4"), adapter


def _mxfp4_dequantized(base: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, Mxfp4Config

    return AutoModelForCausalLM.from_pretrained(
        base, dtype=dtype, quantization_config=Mxfp4Config(dequantize=True)).eval()


# whole tensors, then 64-row blocks across 96-row experts
@pytest.mark.parametrize("block_size", ["24MiB", "3KiB"])
def test_an_mxfp4_base_merges_onto_the_experts_transformers_decodes(tmp_path, gpt_oss, block_size):
    _, base, adapter = gpt_oss
    out = tmp_path / "merged"
    report = mergeflow.merge(base, adapter, out, block_size=block_size)

    merged = read_tensors(out)
    assert not any(k.endswith(("_blocks", "_scales")) for k in merged)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert any("MXFP4" in n for n in report.notes)
    dequantized = _mxfp4_dequantized(base, torch.bfloat16)
    # the adapter's merge onto the experts transformers decodes (PEFT, float32, rounded once)
    from peft import PeftModel

    expected = PeftModel.from_pretrained(dequantized.float(), adapter).merge_and_unload()
    expected = expected.state_dict()
    for name in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"):
        assert merged[name].dtype == torch.bfloat16 and merged[name].shape == expected[name].shape
        off = (merged[name] != expected[name].to(torch.bfloat16)).float().mean().item()
        assert off < 1e-3, f"{name}: {off:.2%} of elements differ from PEFT's merge"
    # and it runs as the adapter live on the dequantized MXFP4 base
    live = PeftModel.from_pretrained(_mxfp4_dequantized(base, torch.bfloat16), adapter).eval()
    with torch.no_grad():
        want = live(input_ids=IDS[:, :6] % 128).logits.float()
    from transformers import AutoModelForCausalLM

    got_model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        got = got_model(input_ids=IDS[:, :6] % 128).logits.float()
    assert (got - want).abs().max().item() < 3e-2 * want.abs().max().item()


def test_mxfp4_blocks_without_scales_are_refused_naming_them(tmp_path, gpt_oss):
    _, base, adapter = gpt_oss
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in base.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    _drop_tensor(broken, "model.layers.1.mlp.experts.down_proj_scales")
    with pytest.raises(InputError, match=r"down_proj_blocks' have no"):
        mergeflow.merge(broken, adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_merged_4bit_on_an_mxfp4_base_is_refused_naming_what_to_use(tmp_path, gpt_oss):
    _, base, adapter = gpt_oss
    with pytest.raises(InputError, match=r"does not write MXFP4.*use `save_method=merged_16bit`"):
        mergeflow.merge(base, adapter, tmp_path / "out", save_method="merged_4bit")
    assert not (tmp_path / "out").exists()
