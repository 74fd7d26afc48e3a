"""The models people fine-tune today (issue 12): MoE experts adapted with ``target_parameters``,
vision-language models whose checkpoint names differ from the model in memory (Llava, Gemma 3,
Qwen2-VL, Qwen2.5-VL), and GPT-NeoX's ``embed_out`` head. Each merge is compared with the live PEFT
adapter on the same base."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import (
    PREPROCESSOR_CONFIG,
    PROCESSOR_CONFIG,
    build_vlm_base,
    logits_of,
    read_tensors,
    run_cli,
    shard_keys,
    vlm_inputs,
    vlm_logits,
)
from safetensors.torch import load_file

import mergeflow
from mergeflow.errors import PlanError
from mergeflow.testing import model_class_of

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _merge_and_compare(base, adapter, out, input_ids, tol=1e-4):
    report = mergeflow.merge(base, adapter, out, dtype="float32")
    auto = model_class_of(base)
    live = logits_of(base, input_ids, adapter=adapter, auto_class=auto)
    merged = logits_of(out, input_ids, auto_class=auto)
    plain = logits_of(base, input_ids, auto_class=auto)
    assert (live - plain).abs().max() > 100 * tol, "the adapter must change the logits"
    assert (merged - live).abs().max() < tol
    return report


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("targets", [["q_proj"], "all-linear"])
def test_expert_lora_matches_live_adapter(arch, targets, make_base, make_adapter, input_ids,
                                          tmp_path):
    base = make_base(arch)
    adapter = make_adapter(base, target_modules=targets, target_parameters=EXPERTS)
    report = _merge_and_compare(base, adapter, tmp_path / "out", input_ids)
    assert any("target_parameters" in n for n in report.notes)
    # every expert tensor on disk keeps its per-expert name, and changed
    merged, original = read_tensors(tmp_path / "out"), read_tensors(base)
    assert set(merged) == set(original)
    experts = [k for k in original if ".experts.0." in k or ".experts.3." in k]
    assert experts and all(not torch.equal(merged[k], original[k]) for k in experts)


def test_each_expert_slice_is_peft_delta(make_base, make_adapter, tmp_path):
    """w1 (gate) and w3 (up) of expert e are rows [0, I) and [I, 2I) of PEFT's update of
    gate_up_proj[e]; w2 is down_proj[e]'s, computed here with PEFT's own get_delta_weight."""
    from peft import PeftModel
    from peft.tuners.lora.layer import ParamWrapper

    base = make_base("mixtral")
    adapter = make_adapter(base, target_modules=["q_proj"], target_parameters=EXPERTS)
    mergeflow.merge(base, adapter, tmp_path / "out", dtype="float32")
    merged, original = read_tensors(tmp_path / "out"), read_tensors(base)
    live = PeftModel.from_pretrained(model_class_of(base).from_pretrained(base), adapter)
    wrappers = {m.parameter_name: m for n, m in live.named_modules()
                if isinstance(m, ParamWrapper) and ".layers.1." in n}
    gate_up = wrappers["gate_up_proj"].get_delta_weight("default")  # (E, 2I, H)
    down = wrappers["down_proj"].get_delta_weight("default")  # (E, H, I)
    inter = gate_up.shape[1] // 2
    for e in range(gate_up.shape[0]):
        key = f"model.layers.1.block_sparse_moe.experts.{e}"
        for name, delta in (("w1", gate_up[e, :inter]), ("w3", gate_up[e, inter:]),
                            ("w2", down[e])):
            got = merged[f"{key}.{name}.weight"] - original[f"{key}.{name}.weight"]
            torch.testing.assert_close(got, delta, rtol=1e-4, atol=1e-5)


def test_experts_split_across_shards(make_base, make_adapter, input_ids, tmp_path):
    base = make_base("qwen3_moe", max_shard_size="60KB")
    layers = [{k.split(".experts.")[0] for k in keys if ".experts." in k}
              for keys in shard_keys(base).values()]
    assert len(shard_keys(base)) > 2 and any(len(x) == 1 for x in layers)
    adapter = make_adapter(base, target_modules=["q_proj"], target_parameters=EXPERTS)
    _merge_and_compare(base, adapter, tmp_path / "out", input_ids)


def test_missing_expert_fails_loudly(make_base, make_adapter, tmp_path):
    """A base missing one expert's tensor is refused; nothing is silently left unmerged."""
    import shutil

    from safetensors.torch import save_file

    base = make_base("mixtral")
    adapter = make_adapter(base, target_modules=["q_proj"], target_parameters=EXPERTS)
    broken = tmp_path / "base"
    shutil.copytree(base, broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.0.block_sparse_moe.experts.2.w3.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(PlanError, match="experts"):
        mergeflow.merge(broken, adapter, tmp_path / "out", dtype="float32")
    assert not (tmp_path / "out").exists()


def test_per_expert_linear_lora(make_base, tmp_path):
    """Older adapters put an nn.Linear LoRA on each expert (``experts.N.w1``); transformers
    5 no longer builds such a model, so the adapter is written here as PEFT saved them, and
    the result is checked against ``W + s * B @ A``."""
    from safetensors.torch import save_file

    base = make_base("mixtral")
    gen = torch.Generator().manual_seed(3)
    weights, modules = {}, ["model.layers.0.block_sparse_moe.experts.1.w1",
                            "model.layers.1.block_sparse_moe.experts.3.w2"]
    original = read_tensors(base)
    for m in modules:
        out_f, in_f = original[f"{m}.weight"].shape
        weights[f"base_model.model.{m}.lora_A.weight"] = torch.randn(4, in_f, generator=gen)
        weights[f"base_model.model.{m}.lora_B.weight"] = torch.randn(out_f, 4, generator=gen)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_file(weights, adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["w1", "w2"],
        "layers_to_transform": None, "base_model_name_or_path": str(base)}))
    mergeflow.merge(base, adapter, tmp_path / "out", dtype="float32")
    merged = read_tensors(tmp_path / "out")
    for m in modules:
        a = weights[f"base_model.model.{m}.lora_A.weight"]
        b = weights[f"base_model.model.{m}.lora_B.weight"]
        torch.testing.assert_close(merged[f"{m}.weight"], original[f"{m}.weight"] + 2 * b @ a)


def test_vision_language_model(make_base, make_adapter, input_ids, tmp_path):
    """Llava: the adapter names ``model.language_model.layers...`` (memory), the checkpoint
    ``language_model.model.layers...`` (disk). Vision tensors are kept; the output reloads with
    LlavaForConditionalGeneration and matches the live adapter on text."""
    base = make_base("llava")
    (base / "preprocessor_config.json").write_text(json.dumps({"image_processor_type":
                                                               "CLIPImageProcessor"}))
    adapter = make_adapter(base, target_modules=r".*language_model.*\.(q_proj|v_proj)")
    out = tmp_path / "out"
    _merge_and_compare(base, adapter, out, input_ids)
    merged, original = read_tensors(out), read_tensors(base)
    assert set(merged) == set(original)
    assert all(torch.equal(merged[k], original[k]) for k in original if "vision_tower" in k)
    assert not torch.equal(merged["language_model.model.layers.0.self_attn.q_proj.weight"],
                           original["language_model.model.layers.0.self_attn.q_proj.weight"])
    assert (out / "preprocessor_config.json").is_file()
    assert json.loads((out / "config.json").read_text())["architectures"] == [
        "LlavaForConditionalGeneration"]


def test_gpt_neox_embed_out_head(make_base, make_adapter, input_ids, tmp_path):
    """GPT-NeoX's head is ``embed_out`` on disk, ``lm_head`` in memory: LoRA on it lands there."""
    base = make_base("gpt_neox")
    adapter = make_adapter(base, target_modules=["query_key_value", "dense", "lm_head"])
    _merge_and_compare(base, adapter, tmp_path / "out", input_ids)
    merged, original = read_tensors(tmp_path / "out"), read_tensors(base)
    assert set(merged) == set(original)
    assert not torch.equal(merged["embed_out.weight"], original["embed_out.weight"])


# -- Gemma 3, Qwen2-VL, Qwen2.5-VL ---------------------------------------------------------------

VLMS = {  # arch -> (class it reloads with, its vision modules' prefix on disk)
    "gemma3": ("Gemma3ForConditionalGeneration", "vision_tower."),
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", "visual."),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "visual."),
}
LANGUAGE = r".*language_model.*\.(q_proj|v_proj)"
VISION_TOO = {  # LoRA on the language model and on the vision tower / projector as well
    "gemma3": r".*(language_model.*\.(q_proj|v_proj)|vision_tower.*\.(q_proj|fc1))",
    "qwen2_vl": r".*(language_model.*\.(q_proj|v_proj)|visual.*\.(qkv|merger\.mlp\.0))",
    "qwen2_5_vl": r".*(language_model.*\.(q_proj|v_proj)|visual.*\.(qkv|merger\.mlp\.0))",
}


@pytest.fixture(scope="module")
def vlm_base(tmp_path_factory):
    """``vlm_base(arch)``: a tiny saved VLM (see :func:`helpers.build_vlm_base`), built once."""
    root = tmp_path_factory.mktemp("vlm-bases")
    built = {}

    def make(arch: str):
        if arch not in built:
            folder = root / arch
            folder.mkdir()
            built[arch] = build_vlm_base(folder, arch)
        return built[arch]

    return make


def _assert_processor_files_kept(base, out):
    for name in ("preprocessor_config.json", "processor_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (base / name).read_bytes(), name


@pytest.mark.parametrize("arch", sorted(VLMS))
@pytest.mark.parametrize("vision", [False, True], ids=["language", "language+vision"])
def test_vlm_matches_live_adapter(arch, vision, vlm_base, make_adapter, input_ids, tmp_path):
    """LoRA on the language model's q_proj/v_proj (and on the vision tower and projector):
    the merged output reloads with the model's own class and matches the live adapter on text
    and on text with an image; every vision tensor is kept (changed only where targeted)."""
    from transformers import AutoModelForImageTextToText

    base = vlm_base(arch)
    adapter = make_adapter(base, target_modules=VISION_TOO[arch] if vision else LANGUAGE)
    out = tmp_path / "out"
    mergeflow.merge(base, adapter, out, dtype="float32")

    cls_name, vision_prefix = VLMS[arch]
    assert json.loads((out / "config.json").read_text())["architectures"] == [cls_name]
    assert model_class_of(out).__name__ == cls_name
    assert type(AutoModelForImageTextToText.from_pretrained(out)).__name__ == cls_name
    for inputs in ({"input_ids": input_ids}, vlm_inputs(arch, input_ids)):
        live = vlm_logits(base, inputs, adapter=adapter)
        plain = vlm_logits(base, inputs)
        merged = vlm_logits(out, inputs)
        assert (live - plain).abs().max() > 1e-2, "the adapter must change the logits"
        torch.testing.assert_close(merged, live, atol=1e-4, rtol=0)

    merged, original = read_tensors(out), read_tensors(base)
    assert set(merged) == set(original)
    vision_keys = [k for k in original if k.startswith(vision_prefix)]
    changed = {k for k in vision_keys if not torch.equal(merged[k], original[k])}
    assert vision_keys and (bool(changed) == vision)
    q_proj = next(k for k in original if "layers.0.self_attn.q_proj.weight" in k
                  and not k.startswith(vision_prefix))
    assert not torch.equal(merged[q_proj], original[q_proj])
    _assert_processor_files_kept(base, out)
    assert json.loads((out / "preprocessor_config.json").read_text()) == PREPROCESSOR_CONFIG[arch]
    assert json.loads((out / "processor_config.json").read_text()) == PROCESSOR_CONFIG


def test_vlm_cli_bfloat16(vlm_base, make_adapter, input_ids, tmp_path):
    """Gemma 3 through the real CLI into bf16: the logits (with an image) are the live adapter's
    within bf16 rounding, far from the base's; the processor files travel along."""
    base = vlm_base("gemma3")
    adapter = make_adapter(base, target_modules=VISION_TOO["gemma3"])
    out = tmp_path / "out"
    done = run_cli("merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out),
                   "--dtype", "bfloat16")
    assert done.returncode == 0, done.stderr
    assert all(t.dtype == torch.bfloat16 for t in read_tensors(out).values())
    inputs = vlm_inputs("gemma3", input_ids)
    live, plain = vlm_logits(base, inputs, adapter=adapter), vlm_logits(base, inputs)
    merged = vlm_logits(out, inputs)
    tolerance = 3e-2 * live.abs().max().item()  # ~8 bits of mantissa, through two layers
    torch.testing.assert_close(merged, live, atol=tolerance, rtol=0)
    assert (merged - plain).abs().max() > 10 * tolerance
    _assert_processor_files_kept(base, out)


def test_gemma3_projector_parameter(vlm_base, make_adapter, input_ids, tmp_path):
    """Gemma 3's projector is a bare parameter (``mm_input_projection_weight``, used as
    ``x @ W``): LoRA on it via ``target_parameters`` lands on its disk tensor and matches the
    live adapter with an image; the vision tower itself is kept."""
    base = vlm_base("gemma3")
    projector = "multi_modal_projector.mm_input_projection_weight"
    adapter = make_adapter(base, target_modules=LANGUAGE, target_parameters=[projector])
    out = tmp_path / "out"
    report = mergeflow.merge(base, adapter, out, dtype="float32")
    assert any("target_parameters" in n for n in report.notes)
    inputs = vlm_inputs("gemma3", input_ids)
    live, plain = vlm_logits(base, inputs, adapter=adapter), vlm_logits(base, inputs)
    assert (live - plain).abs().max() > 1e-2
    torch.testing.assert_close(vlm_logits(out, inputs), live, atol=1e-4, rtol=0)
    merged, original = read_tensors(out), read_tensors(base)
    assert not torch.equal(merged[projector], original[projector])
    assert all(torch.equal(merged[k], original[k]) for k in original if "vision_tower" in k)
