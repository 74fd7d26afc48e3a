"""``save_pretrained_merged`` / ``push_to_hub_merged`` / ``patch`` on a live, trained PeftModel
(issue 13): a real ``transformers.Trainer`` trains a tiny Llama with LoRA on the CPU, and every
output, reloaded with plain transformers, must give the live model's logits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from builders import model_config
from helpers import build_vlm_base, logits_of, read_tensors
from test_sinks import RecordingHfApi

import mergeflow
from mergeflow.errors import DiskSpaceError, InputError, OptionsError
from mergeflow.live.save import base_mismatch, live_base_tensors
from mergeflow.output.folder import MANIFEST, read_manifest
from mergeflow.pipeline.verification import check_files

# The outputs are bfloat16 (merged_16bit of a float32 model): logits agree with the live float32
# model to bfloat16 rounding of the weights (measured ~4e-3 on these logits of about 0.75).
BF16_TOL = 2e-2
TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]


def lora(model, seed: int = 0, **kwargs):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    kwargs.setdefault("target_modules", TARGETS)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kwargs))


def train(model, output_dir: Path, tokenizer=None, callbacks=(), steps: int = 3):
    """A few real Trainer steps on random token ids (labels = inputs)."""
    from transformers import Trainer, TrainingArguments

    gen = torch.Generator().manual_seed(7)
    rows = torch.randint(4, 128, (16, 16), generator=gen)
    data = [{"input_ids": r, "labels": r} for r in rows]
    args = TrainingArguments(output_dir=str(output_dir), max_steps=steps,
                             per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
                             use_cpu=True, save_strategy="no", logging_strategy="no",
                             disable_tqdm=True, seed=0, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                      callbacks=list(callbacks))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    changed = [n for n, p in model.named_parameters() if p.requires_grad
               and not torch.equal(before[n], p.detach())]
    assert changed, "training changed no LoRA weight"
    return trainer


def live_logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def assert_same_logits(out: Path, model, ids: torch.Tensor, tol: float = BF16_TOL) -> float:
    """The reloaded output acts like the live model, and the adapter made a real difference."""
    got, want = logits_of(out, ids), live_logits(model, ids)
    with model.disable_adapter(), torch.no_grad():
        plain = model(input_ids=ids).logits.float()
    diff = (got - want).abs().max().item()
    effect = (plain - want).abs().max().item()
    assert diff < tol, diff
    assert effect > 10 * tol, f"the adapter changes the logits by only {effect}"
    count, problems = check_files(out)
    assert count > 0 and not problems, problems
    return diff


@pytest.fixture(scope="module")
def base_dir(make_base) -> Path:
    return make_base("llama")


@pytest.fixture(scope="module")
def tokenizer(base_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_dir)


@pytest.fixture(scope="module")
def trained(base_dir, tokenizer, tmp_path_factory):
    """A LoRA model over the on-disk base, trained by a real Trainer (do not change it)."""
    from transformers import AutoModelForCausalLM

    model = lora(AutoModelForCausalLM.from_pretrained(base_dir))
    train(model, tmp_path_factory.mktemp("train"), tokenizer)
    return model


# --------------------------------------------------------------------------- the base on disk


def test_base_on_disk_is_read_from_its_files(trained, base_dir, tokenizer, tmp_path, input_ids):
    out = tmp_path / "merged"
    report = mergeflow.save_pretrained_merged(trained, out, tokenizer)
    assert report.status == "merged" and report.lora_modules == 2 * len(TARGETS)
    assert any(f"read from {base_dir}" in n for n in report.notes), report.notes
    assert any("writing bfloat16" in n for n in report.notes)
    assert read_manifest(out)["inputs"]["base"] == str(base_dir)
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "quantization_config" not in config
    assert (out / "tokenizer.json").is_file() and (out / MANIFEST).is_file()
    assert_same_logits(out, trained, input_ids)
    assert not list(tmp_path.glob(".mergeflow-live-*")), "the temporary folder is left behind"
    q_proj = trained.get_base_model().model.layers[0].self_attn.q_proj  # the live model is
    assert hasattr(q_proj, "lora_A") and not q_proj.merged  # untouched: LoRA still unmerged
    # the same call again: the output is up to date, nothing is rewritten
    again = mergeflow.save_pretrained_merged(trained, out, tokenizer)
    assert again.status == "up-to-date"


def test_patch_adds_the_unsloth_methods(trained, tokenizer, tmp_path, input_ids):
    model = mergeflow.patch(trained)
    report = model.save_pretrained_merged(str(tmp_path / "m"), tokenizer,
                                          save_method="merged_16bit", max_shard_size="100KB")
    assert report.shards > 1 and (tmp_path / "m" / "model.safetensors.index.json").is_file()
    assert_same_logits(tmp_path / "m", trained, input_ids)
    assert callable(model.push_to_hub_merged)


def test_lora_method_exports_the_trained_adapter(trained, base_dir, tokenizer, tmp_path,
                                                 input_ids):
    out = tmp_path / "adapter"
    report = mergeflow.save_pretrained_merged(trained, out, tokenizer, save_method="lora")
    assert report.save_method == "lora" and (out / "adapter_model.safetensors").is_file()
    got = logits_of(base_dir, input_ids, adapter=out)
    assert (got - live_logits(trained, input_ids)).abs().max().item() < 1e-5


def test_unsloth_options_that_mean_nothing_here_are_refused(trained, tmp_path):
    with pytest.raises(OptionsError, match="state_dict"):
        mergeflow.save_pretrained_merged(trained, tmp_path / "a", state_dict={})
    with pytest.raises(OptionsError, match="SafeTensors only"):
        mergeflow.save_pretrained_merged(trained, tmp_path / "a", safe_serialization=False)
    with pytest.raises(OptionsError, match="save_method"):
        mergeflow.save_pretrained_merged(trained, tmp_path / "a", save_method="gguf")
    with pytest.raises(InputError, match="not quantized"):
        mergeflow.save_pretrained_merged(trained, tmp_path / "a", save_method="merged_4bit")
    with pytest.raises(InputError, match=r"^`merge_onto=original`: the live base is not quantized"):
        mergeflow.save_pretrained_merged(trained, tmp_path / "a", merge_onto="original")
    with pytest.raises(OptionsError, match="use `merge_onto=dequantized` or `merge_onto=original`"):
        mergeflow.save_pretrained_merged(trained, tmp_path / "a", merge_onto="16bit")
    assert mergeflow.save_pretrained_merged(trained, tmp_path / "a", is_main_process=False) \
        is None
    assert not (tmp_path / "a").exists()
    with pytest.raises(InputError, match=r"not a peft\.PeftModel"):
        mergeflow.save_pretrained_merged(trained.get_base_model(), tmp_path / "a")


# --------------------------------------------------------------------------- the base in memory


def test_base_built_in_memory_is_spilled(tokenizer, tmp_path, input_ids):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = lora(AutoModelForCausalLM.from_config(model_config("llama")))
    train(model, tmp_path / "train", tokenizer)
    out = tmp_path / "merged"
    report = mergeflow.save_pretrained_merged(model, out, tokenizer,
                                              temporary_location=tmp_path / "tmp")
    assert any("spilled" in n for n in report.notes), report.notes
    assert_same_logits(out, model, input_ids)
    assert list((tmp_path / "tmp").iterdir()) == []  # spill removed once published


def test_base_changed_in_memory_is_noticed(base_dir, tmp_path, input_ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[-1] += 0.5  # the last row, not a LoRA target
    model = lora(model)
    problem = base_mismatch(base_dir, live_base_tensors(model), model)
    assert problem == "model.layers.1.mlp.up_proj.weight row 127 differs between disk and the " \
        "live model"
    with pytest.raises(InputError, match="is not the base of the live model"):
        mergeflow.save_pretrained_merged(model, tmp_path / "x", base=base_dir, no_tokenizer=True)
    report = mergeflow.save_pretrained_merged(model, tmp_path / "m")
    assert any("not the live model's base" in n for n in report.notes), report.notes
    assert any("no tokenizer" in n for n in report.notes)
    assert_same_logits(tmp_path / "m", model, input_ids)


def test_a_rerun_after_a_failure_resumes(trained, tmp_path, input_ids, monkeypatch):
    from mergeflow.pipeline import steps as api

    out, calls = tmp_path / "m", []
    real = api.run_shard

    def fail_second(plan_path, index, *args, **kwargs):
        calls.append(index)
        if index == 1 and calls.count(1) == 1:
            raise DiskSpaceError("disk full while writing shard 2 (simulated)")
        return real(plan_path, index, *args, **kwargs)

    monkeypatch.setattr(api, "run_shard", fail_second)
    options = dict(max_shard_size="50KB", workers=1, base="memory")
    with pytest.raises(DiskSpaceError, match="simulated"):
        mergeflow.save_pretrained_merged(trained, out, **options)
    report = mergeflow.save_pretrained_merged(trained, out, **options)
    assert report.shards_resumed == 1, report
    assert_same_logits(out, trained, input_ids)


# --------------------------------------------------------------------------- 4-bit in memory

SIZES = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def four_bit(make_base):
    """A float base quantized to 4-bit nf4 at load (so the 4-bit weights exist only in memory),
    with a random LoRA on top."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    original = make_base("llama", **SIZES)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(original, quantization_config=config,
                                                 device_map="cpu")
    return original, lora(model, seed=1)


def test_4bit_in_memory_merged_16bit(four_bit, tmp_path, input_ids):
    original, model = four_bit
    out = tmp_path / "m16"
    report = mergeflow.save_pretrained_merged(model, out)
    assert any(f"quantized at load from {original}" in n for n in report.notes), report.notes
    assert any("dequantized 4-bit/8-bit weights" in n for n in report.notes)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert_same_logits(out, model, input_ids, tol=3e-2)


def test_4bit_in_memory_merged_4bit_is_peft_encoding(four_bit, tmp_path, input_ids):
    from transformers import AutoModelForCausalLM

    _, model = four_bit
    out = tmp_path / "m4"
    live_packed = {k: v.clone() for k, v in live_base_tensors(model).items()}
    mergeflow.save_pretrained_merged(model, out, save_method="merged_4bit_forced")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    merged = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    assert type(merged.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    got = live_logits(merged, input_ids)
    written = read_tensors(out)
    for name, value in live_packed.items():  # unadapted quantized weights: the live bytes
        if ".k_proj." in name or ".up_proj." in name:
            assert torch.equal(written[name], value), name
    # PEFT's own merge of the live 4-bit model (dequantize, add, re-quantize): same encoding.
    # It changes the live model, so it comes last.
    peft = model.merge_and_unload()
    assert (got - live_logits(peft, input_ids)).abs().max().item() < 1e-5


# --------------------------------------------------------------------------- push_to_hub_merged


class TokenRecordingHfApi(RecordingHfApi):
    """The sink tests' Hub fake, built the way HfPublisher builds HfApi (with a token)."""

    instances: ClassVar[list[TokenRecordingHfApi]] = []

    def __init__(self, token=None) -> None:
        super().__init__()
        self.token = token
        TokenRecordingHfApi.instances.append(self)


def test_push_to_hub_merged_publishes_one_commit(trained, tokenizer, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", TokenRecordingHfApi)
    TokenRecordingHfApi.instances.clear()
    folder = tmp_path / "kept"
    report = mergeflow.push_to_hub_merged(trained, "acme/tiny-merged", tokenizer, token="hf_x",
                                          private=True, commit_message="trained run 3",
                                          save_directory=folder)
    assert report.out == "hf://acme/tiny-merged"
    api, = TokenRecordingHfApi.instances
    assert api.token == "hf_x"
    (repo,), kwargs = api.named("create_repo")[0]
    assert repo == "acme/tiny-merged" and kwargs["private"] is True
    ((_, names), kwargs), = api.named("create_commit")
    assert names[-1] == MANIFEST and "model.safetensors" in names and "tokenizer.json" in names
    assert set(names) == {*read_manifest(folder)["files"], MANIFEST}
    assert kwargs["commit_message"] == "trained run 3"
    # Unsloth's spelling: save_pretrained_merged(repo, push_to_hub=True), temp dir removed
    TokenRecordingHfApi.instances.clear()
    mergeflow.save_pretrained_merged(trained, "acme/other", tokenizer, push_to_hub=True,
                                     use_temp_dir=True, temporary_location=tmp_path / "t")
    ((repo, names), _), = TokenRecordingHfApi.instances[0].named("create_commit")
    assert repo == "acme/other" and names[-1] == MANIFEST
    assert list((tmp_path / "t").iterdir()) == []


def test_prequantized_4bit_base_on_disk_is_read_from_its_files(four_bit, tmp_path, input_ids):
    """The common QLoRA case: a checkpoint saved already quantized (like the *-bnb-4bit repos)."""
    from builders import build_quantized_base
    from transformers import AutoModelForCausalLM

    original, _ = four_bit
    saved = build_quantized_base(original, tmp_path / "bnb-4bit", double_quant=True)
    model = lora(AutoModelForCausalLM.from_pretrained(saved, device_map="cpu"), seed=2)
    report = mergeflow.save_pretrained_merged(model, tmp_path / "m", save_method="merged_16bit")
    assert any(f"read from {saved}" in n for n in report.notes), report.notes
    assert not any("spilled" in n for n in report.notes)
    assert_same_logits(tmp_path / "m", model, input_ids, tol=3e-2)


# --------------------------------------------------------------------------- converted bases

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
CONVERTED = {  # arch -> (LoRA targets, a live tensor transformers builds from several on disk)
    "mixtral": (dict(target_modules=["q_proj"], target_parameters=EXPERTS),
                "model.layers.1.mlp.experts.down_proj"),
    "qwen3_moe": (dict(target_modules="all-linear", target_parameters=EXPERTS),
                  "model.layers.1.mlp.experts.gate_up_proj"),
    "llava": (dict(target_modules=r".*language_model.*\.(q_proj|v_proj)"), None),
    "gemma3": (dict(target_modules=r".*(language_model.*\.(q_proj|v_proj)|vision_tower.*\.fc1)"),
               None),
    "qwen2_vl": (dict(target_modules=r".*(language_model.*\.(q_proj|v_proj)|visual.*\.qkv)"),
                 None),
}
VLM_BUILT_HERE = ("gemma3", "qwen2_vl")  # built by helpers.build_vlm_base, not make_base


def converted_base(arch: str, make_base, folder: Path) -> Path:
    """The saved base of ``arch``: a session base, or a VLM built into ``folder``."""
    if arch in VLM_BUILT_HERE:
        folder.mkdir()
        return build_vlm_base(folder, arch)
    return make_base(arch)


@pytest.mark.parametrize("arch", sorted(CONVERTED))
def test_converted_base_on_disk_is_read_from_its_files(arch, make_base, make_adapter, tmp_path):
    """A live MoE (experts stacked in memory, one tensor per expert on disk) or VLM (Llava,
    Gemma 3, Qwen2-VL: renamed in memory) loaded from disk is matched to its checkpoint through
    the model map: the base is read from disk, nothing is spilled, and the output is the disk
    route's, tensor for tensor."""
    from builders import model_class_of
    from peft import PeftModel

    base = converted_base(arch, make_base, tmp_path / "base")
    lora_kwargs, _ = CONVERTED[arch]
    adapter = make_adapter(base, **lora_kwargs)
    model = PeftModel.from_pretrained(model_class_of(base).from_pretrained(base), adapter)
    assert base_mismatch(base, live_base_tensors(model), model) is None
    report = mergeflow.save_pretrained_merged(model, tmp_path / "live", dtype="float32",
                                              temporary_location=tmp_path / "tmp")
    assert any(f"read from {base}" in n for n in report.notes), report.notes
    assert not any("spilled" in n for n in report.notes), report.notes
    mergeflow.merge(base, adapter, tmp_path / "disk", dtype="float32")
    live_out, disk_out = read_tensors(tmp_path / "live"), read_tensors(tmp_path / "disk")
    assert set(live_out) == set(disk_out) == set(read_tensors(base))
    assert all(torch.equal(live_out[k], disk_out[k]) for k in disk_out)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_changed_expert_is_noticed_on_its_disk_tensor(arch, make_base, make_adapter):
    """One row of one expert changed in memory: the check names the per-expert disk tensor and
    row (read through the model map, not a name-for-name comparison)."""
    from builders import model_class_of
    from peft import PeftModel

    base = make_base(arch)
    lora_kwargs, stacked = CONVERTED[arch]
    model = PeftModel.from_pretrained(model_class_of(base).from_pretrained(base),
                                      make_adapter(base, **lora_kwargs))
    live = live_base_tensors(model)
    experts, rows = live[stacked].shape[:2]  # (experts, rows, cols)
    with torch.no_grad():
        live[stacked][experts - 2, rows - 1] += 0.5  # the live storage itself
    problem = base_mismatch(base, live_base_tensors(model), model)
    expert = experts - 2
    if arch == "mixtral":  # down_proj[e] is w2 of expert e; its last row is row rows - 1
        assert problem == (f"model.layers.1.block_sparse_moe.experts.{expert}.w2.weight row "
                           f"{rows - 1} differs between disk and the live model")
    else:  # gate_up_proj[e]'s last row is the last row of up_proj (gate first, then up)
        assert problem == (f"model.layers.1.mlp.experts.{expert}.up_proj.weight row "
                           f"{rows // 2 - 1} differs between disk and the live model")


def test_fp8_method_writes_compressed_tensors_fp8_from_the_live_model(trained, base_dir, tokenizer,
                                                                      tmp_path, input_ids):
    """Unsloth-style ``save_method="fp8"``: the CLI's compressed-tensors FP8 of the same merge."""
    pytest.importorskip("compressed_tensors")
    out = tmp_path / "fp8"
    report = mergeflow.save_pretrained_merged(trained, out, tokenizer, save_method="fp8")
    assert report.save_method == "fp8"
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    tensors = read_tensors(out)
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert tensors[q_proj].dtype == torch.float8_e4m3fn and f"{q_proj}_scale" in tensors
    # the same merge through the CLI's route, from the adapter the live model saves
    trained.save_pretrained(tmp_path / "adapter")
    mergeflow.merge(base_dir, tmp_path / "adapter", tmp_path / "cli", save_method="fp8")
    assert read_tensors(tmp_path / "cli").keys() == tensors.keys()
    for name, tensor in read_tensors(tmp_path / "cli").items():
        assert torch.equal(tensor.view(torch.uint8) if tensor.dtype == torch.float8_e4m3fn
                           else tensor, tensors[name].view(torch.uint8)
                           if tensor.dtype == torch.float8_e4m3fn else tensors[name]), name
