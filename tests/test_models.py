"""The models people fine-tune today (issue 12): MoE experts adapted with ``target_parameters``,
vision-language models whose checkpoint names differ from the model in memory (Llava, Gemma 3,
Qwen2-VL, Qwen2.5-VL), and GPT-NeoX's ``embed_out`` head. Each merge is compared with the live PEFT
adapter on the same base."""

from __future__ import annotations

import json

import pytest
import torch
from builders import build_gpt_oss, model_class_of
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


def test_router_and_shared_expert_lora(make_base, make_adapter, input_ids, tmp_path):
    """Qwen2-MoE with LoRA on the router (``mlp.gate``, a bare weight: ``target_parameters``),
    on the shared expert and its gate (``nn.Linear``), and on the experts: each lands on its
    own disk tensor, and the merge is the live adapter."""
    base = make_base("qwen2_moe")
    shared = ["shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj",
              "shared_expert_gate"]
    adapter = make_adapter(base, target_modules=["q_proj", *shared],
                           target_parameters=[*EXPERTS, "mlp.gate.weight"])
    _merge_and_compare(base, adapter, tmp_path / "out", input_ids)
    merged, original = read_tensors(tmp_path / "out"), read_tensors(base)
    assert set(merged) == set(original)
    changed = {k for k in original if not torch.equal(merged[k], original[k])}
    layer = "model.layers.1.mlp."
    for name in ["gate", *shared, "experts.0.gate_proj", "experts.3.down_proj"]:
        assert f"{layer}{name}.weight" in changed, name


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
    report = _merge_and_compare(base, adapter, out, input_ids)
    merged, original = read_tensors(out), read_tensors(base)
    assert set(merged) == set(original)
    assert all(torch.equal(merged[k], original[k]) for k in original if "vision_tower" in k)
    assert not torch.equal(merged["language_model.model.layers.0.self_attn.q_proj.weight"],
                           original["language_model.model.layers.0.self_attn.q_proj.weight"])
    assert (out / "preprocessor_config.json").is_file()
    assert any("checkpoint's own names" in n and "'language_model.model.layers." in n
               for n in report.notes), report.notes
    assert json.loads((out / "config.json").read_text())["architectures"] == [
        "LlavaForConditionalGeneration"]


def test_tensor_held_under_two_names_is_refused(make_base, make_adapter, tmp_path):
    """A Llava checkpoint holding one weight under both namings (the legacy
    ``language_model.model...`` the loader renames, and ``model.language_model...``) has no
    single place for that weight: the merge refuses, naming both, and writes nothing."""
    import shutil

    from safetensors.torch import save_file

    base = make_base("llava")
    adapter = make_adapter(base, target_modules=["q_proj", "v_proj"])
    broken = tmp_path / "base"
    shutil.copytree(base, broken)
    tensors = load_file(broken / "model.safetensors")
    legacy = "language_model.model.layers.0.self_attn.q_proj.weight"
    current = "model.language_model.layers.0.self_attn.q_proj.weight"
    tensors[current] = tensors[legacy].clone()
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(PlanError, match="more than once") as refused:
        mergeflow.merge(broken, adapter, tmp_path / "out", dtype="float32")
    assert legacy in str(refused.value) and current in str(refused.value)
    assert not (tmp_path / "out").exists()


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


# -- experts fused on disk (gpt-oss): the disk tensor is the in-memory (E, d1, d2) parameter ----

GPT_OSS_EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    """(base, adapter): LoRA on the attention and, with target_parameters, on both fused expert
    parameters of every layer."""
    from builders import build_adapter

    root = tmp_path_factory.mktemp("gpt_oss")
    base = build_gpt_oss(root / "base")
    adapter = build_adapter(base, root / "adapter", target_modules=ATTENTION,
                            target_parameters=GPT_OSS_EXPERTS)
    return base, adapter


def _peft_merged(base, adapter):
    """PEFT's own merge_and_unload of the adapter onto the base (float32)."""
    from peft import PeftModel

    auto = model_class_of(base)
    model = PeftModel.from_pretrained(auto.from_pretrained(base, dtype=torch.float32), adapter)
    return model.merge_and_unload().eval()


def test_fused_experts_match_live_adapter_and_merge_and_unload(gpt_oss, input_ids, tmp_path):
    """Experts stored fused on disk get each expert's update on its own rows: the reloaded merge
    matches the live adapter and PEFT's merge_and_unload, tensor by tensor; a block smaller than
    an expert (and blocks straddling experts) give the same bytes as the default block."""
    base, adapter = gpt_oss
    report = _merge_and_compare(base, adapter, tmp_path / "out", input_ids)
    assert any("4 of them holding several experts each" in n for n in report.notes), report.notes
    merged, original = read_tensors(tmp_path / "out"), read_tensors(base)
    assert set(merged) == set(original)
    reference = _peft_merged(base, adapter).state_dict()
    fused = [k for k in original if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert len(fused) == 4
    for key in [*fused, "model.layers.1.self_attn.q_proj.weight"]:
        assert not torch.equal(merged[key], original[key]), key
        torch.testing.assert_close(merged[key], reference[key], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        unloaded = _peft_merged(base, adapter)(input_ids=input_ids).logits
    assert (logits_of(tmp_path / "out", input_ids) - unloaded).abs().max() < 1e-4
    mergeflow.merge(base, adapter, tmp_path / "small", dtype="float32", block_size="8KB")
    small = read_tensors(tmp_path / "small")
    assert all(torch.equal(small[k], merged[k]) for k in merged)


def test_fused_experts_bf16_cli_within_rounding(gpt_oss, input_ids, tmp_path):
    """CLI merge to bfloat16: the reloaded model is PEFT's merge_and_unload up to bf16 rounding
    (the same values cast), and matches the live adapter far closer than the adapter's effect."""
    from helpers import run_cli

    base, adapter = gpt_oss
    out = tmp_path / "out"
    done = run_cli("merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out),
                   "--dtype", "bfloat16")
    assert done.returncode == 0, done.stderr
    merged = read_tensors(out)
    reference = _peft_merged(base, adapter).state_dict()
    for key in [k for k in merged if ".experts." in k]:
        assert merged[key].dtype == torch.bfloat16
        torch.testing.assert_close(merged[key], reference[key].to(torch.bfloat16), rtol=0, atol=0)
    live = logits_of(base, input_ids, adapter=adapter)
    plain = logits_of(base, input_ids)
    got = logits_of(out, input_ids)
    effect = (live - plain).abs().max()
    assert effect > 0.1
    assert (got - live).abs().max() < 0.05 * effect


def test_fused_experts_across_shards(tmp_path_factory, input_ids, tmp_path):
    """A base sharded so that the fused expert tensors of a layer sit in different files, merged
    into a sharded output with row blocks smaller than one expert: each fused tensor still gets
    all its experts, and no block holds more than its share of rows."""
    from builders import build_adapter

    from mergeflow.engine.ops import TensorMerger
    from mergeflow.plan import Experts

    root = tmp_path_factory.mktemp("gpt_oss_sharded")
    base = build_gpt_oss(root / "base", max_shard_size="120KB", hidden=128)
    homes = {k: f for f, keys in shard_keys(base).items() for k in keys}
    assert homes["model.layers.0.mlp.experts.gate_up_proj"] != \
        homes["model.layers.0.mlp.experts.down_proj"], homes
    adapter = build_adapter(base, root / "adapter", target_modules=["q_proj"],
                            target_parameters=GPT_OSS_EXPERTS)
    out = tmp_path / "out"
    report = mergeflow.merge(base, adapter, out, dtype="float32", max_shard_size="120KB",
                             block_size="8KB")
    assert report.shards > 2
    assert (logits_of(out, input_ids) - logits_of(base, input_ids, adapter=adapter)).abs().max() < 1e-4
    merged, reference = read_tensors(out), _peft_merged(base, adapter).state_dict()
    for key in [k for k in merged if k.endswith("_proj") and ".experts." in k]:
        torch.testing.assert_close(merged[key], reference[key], rtol=1e-5, atol=1e-6)
    # gate_up_proj (4, 128, 96): an expert's 128 rows come in two 64-row blocks of 96 columns
    from mergeflow.engine.shards import open_merger
    from mergeflow.pipeline.steps import prepare
    from mergeflow.plan import MergePlan
    from mergeflow.spec import MergeSpec

    plan = MergePlan.load(prepare(MergeSpec(base=str(base), adapter=str(adapter),
                                            out=str(tmp_path / "v"), dtype="float32")).plan_path)
    entry = next(t for s in plan.shards for t in s.tensors
                 if t.name == "model.layers.0.mlp.experts.gate_up_proj")
    assert entry.find(Experts).rows_per_expert == 128
    source = open_merger(plan, block_bytes=8 * 1024)
    assert isinstance(source, TensorMerger)
    blocks = []
    for block, _, release in source.blocks(entry):
        blocks.append(block.clone())
        if release is not None:
            release()  # the pooled buffer goes back, as the shard writer gives it back
    assert [tuple(b.shape) for b in blocks] == [(64, 96)] * 8
    assert torch.equal(torch.cat(blocks).reshape(4, 128, 96), merged[entry.name])


def test_fused_experts_are_verified_row_by_row(gpt_oss, tmp_path):
    """Verification's sampled-row check covers a fused tensor: the merged output passes, and one
    expert's rows changed (an update applied to the wrong expert) fail it."""
    from mergeflow.engine.shards import open_merger
    from mergeflow.pipeline.steps import prepare
    from mergeflow.pipeline.verification import NumericChecker
    from mergeflow.plan import Experts, MergePlan
    from mergeflow.spec import MergeSpec

    base, adapter = gpt_oss
    mergeflow.merge(base, adapter, tmp_path / "out", dtype="float32")
    prepared = prepare(MergeSpec(base=str(base), adapter=str(adapter), out=str(tmp_path / "v"),
                                 dtype="float32"))
    plan = MergePlan.load(prepared.plan_path)
    entry = next(t for s in plan.shards for t in s.tensors
                 if t.name == "model.layers.1.mlp.experts.down_proj")
    op = entry.find(Experts)
    assert op is not None and op.count == 4 and op.rows_per_expert == 48
    assert entry.row_shape == [4 * 48, 64]
    merged = read_tensors(tmp_path / "out")[entry.name].reshape(entry.row_shape)
    checker = NumericChecker(open_merger(plan))
    rows = checker.sample(entry)
    assert set((rows // 48).tolist()) == {0, 1, 2, 3}  # every expert's rows are looked at
    check = checker.check(entry, merged[rows], rows)
    assert check.ok and check.kind == "LoRA" and check.relative_error < 1e-5, check
    # expert 2's rows with expert 3's update: right shape, wrong expert
    original = read_tensors(base)[entry.name]
    swapped = merged.clone().reshape(4, 48, 64)
    swapped[2] = original[2] + (merged.reshape(4, 48, 64)[3] - original[3])
    bad = checker.check(entry, swapped.reshape(entry.row_shape)[rows], rows)
    assert not bad.ok, bad


def test_expert_count_counts_experts_inside_fused_tensors(gpt_oss):
    """The count check sees the experts a fused tensor holds: all four pass, three are refused."""
    from mergeflow.model.modelmap import WrappedParam
    from mergeflow.plan import BaseTensor, Experts, LoraPart, TensorPlan
    from mergeflow.plan.experts import check_wrapped

    param = WrappedParam(param="model.layers.0.mlp.experts.down_proj", shape=(4, 48, 64),
                         experts=4, b_left=False, rank=4, scale=2.0)
    first = LoraPart(expert=0, experts=4, b_left=False, transposed=False, rows=(0, 1, 48),
                     cols=(0, 1, 64), scale=2.0)

    def planned(count):
        op = Experts(module="m", first=first, count=count, rows_per_expert=48)
        return {param.param: TensorPlan(name=param.param, dtype="F32", shape=[count, 48, 64],
                                        source=BaseTensor(name=param.param), ops=[op])}

    assert check_wrapped({"m": param}, planned(4))
    with pytest.raises(PlanError, match="merges 3 of its 4 experts"):
        check_wrapped({"m": param}, planned(3))


def test_a_slice_of_fused_experts(gpt_oss):
    """A disk tensor holding experts 2 and 3 only (experts split over two tensors along their
    first dimension): its rows get exactly PEFT's updates of experts 2 and 3."""
    from peft import PeftModel
    from peft.tuners.lora.layer import ParamWrapper

    from mergeflow.engine.ops import merge_experts
    from mergeflow.model.modelmap import Axis, Piece, WrappedParam, expert_slice
    from mergeflow.plan.experts import _piece_op

    base, adapter = gpt_oss
    live = PeftModel.from_pretrained(model_class_of(base).from_pretrained(base), adapter)
    wrapper = next(m for n, m in live.named_modules()
                   if isinstance(m, ParamWrapper) and ".layers.0." in n
                   and m.parameter_name == "gate_up_proj")
    delta = wrapper.get_delta_weight("default")  # (4, 64, 96)
    a = wrapper.lora_A["default"].weight.detach()
    b = wrapper.lora_B["default"].weight.detach()
    param = WrappedParam(param="p", shape=(4, 64, 96), experts=4, b_left=False, rank=4,
                         scale=wrapper.scaling["default"])
    piece = Piece("p.second_half", (2, 64, 96), (Axis(2, 0), Axis(0, 1), Axis(0, 2)))
    where = expert_slice(piece, param)
    assert (where.expert, where.count, where.stride) == (2, 2, 1)
    op = _piece_op("m", param, where)
    work = torch.zeros(2 * 64, 96)
    for i in range(0, 2 * 64, 40):  # blocks of 40 rows, straddling the two experts
        j = min(i + 40, 2 * 64)
        merge_experts(work[i:j], op, lambda k: op.part(k).factors(a, b), i, j)
    torch.testing.assert_close(work.reshape(2, 64, 96), delta[2:].float(), rtol=1e-4, atol=1e-6)
