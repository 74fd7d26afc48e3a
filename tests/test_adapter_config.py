"""Mergeflow's own adapter_config.json reader against PEFT's ``LoraConfig`` (issue 11, item 4).

Every ``LoraConfig`` variant the test suite builds (and the features it has no test of its own
for) is saved by PEFT, then read both ways: every field must agree, and so must the per-module
rank, alpha and scale (``rank_pattern`` / ``alpha_pattern``) and the target-module matching
(``target_modules``, ``exclude_modules``, ``modules_to_save``, ``layers_to_transform``,
``layers_pattern``) on many module names. Configs PEFT refuses are refused too.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from pathlib import Path

import pytest

from mergeflow.errors import AdapterError
from mergeflow.model.adapter import load_adapter
from mergeflow.model.adapter_config import AdapterConfig, ConfigError, parse_config

ATTN_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2 = ["c_attn", "c_proj", "c_fc"]

# (id, LoraConfig kwargs): the suite's configs (test_merge_matrix, test_vocab, test_bad_inputs,
# test_lora_math, test_quantized, test_flow, the demo and the benchmark), then every other
# feature the reader handles.
CORPUS = [
    ("plain", dict(target_modules=ATTN_MLP, r=4, lora_alpha=8)),
    ("rslora", dict(target_modules=["q_proj", "v_proj", "down_proj"], r=8, lora_alpha=16,
                    use_rslora=True)),
    ("patterns", dict(target_modules=["q_proj", "v_proj", "o_proj"], r=4, lora_alpha=8,
                      rank_pattern={"model.layers.1.self_attn.q_proj": 8, "v_proj": 2},
                      alpha_pattern={"o_proj": 32, "model.layers.0.self_attn.q_proj": 2})),
    ("rslora-patterns", dict(target_modules=["q_proj", "v_proj", "o_proj"], r=4, lora_alpha=8,
                             use_rslora=True, rank_pattern={"v_proj": 2},
                             alpha_pattern={"o_proj": 3})),
    ("regex-patterns", dict(target_modules=ATTN_MLP, r=4, lora_alpha=8,
                            rank_pattern={r"layers\.1\..*_proj": 6, "mlp.down_proj": 3},
                            alpha_pattern={r"self_attn\.(q|k)_proj": 5.5})),
    ("gpt2-fan-in-fan-out", dict(target_modules=GPT2, fan_in_fan_out=True)),
    ("dora", dict(target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)),
    ("dora-gpt2", dict(target_modules=GPT2, fan_in_fan_out=True, use_dora=True)),
    ("lora-bias", dict(target_modules=["q_proj", "k_proj", "v_proj"], lora_bias=True)),
    ("bias-all", dict(target_modules=["q_proj", "v_proj"], bias="all")),
    ("bias-lora-only", dict(target_modules=["q_proj", "v_proj"], bias="lora_only")),
    ("modules-to-save-head", dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])),
    ("modules-to-save-both", dict(r=4, target_modules=["q_proj"],
                                  modules_to_save=["embed_tokens", "lm_head"])),
    ("phi3-fused", dict(target_modules=["qkv_proj", "gate_up_proj", "o_proj", "down_proj"])),
    ("layers-to-transform", dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1])),
    ("layers-to-transform-int", dict(target_modules=["q_proj", "down_proj"], layers_to_transform=0)),
    ("layers-pattern", dict(target_modules=["q_proj", "c_attn"], layers_to_transform=[0, 2],
                            layers_pattern="layers")),
    ("layers-patterns", dict(target_modules=["q_proj", "c_attn"], layers_to_transform=[1],
                             layers_pattern=["h", "layers"])),
    ("head-lora", dict(target_modules=["q_proj", "lm_head"])),
    ("embedding-lora", dict(target_modules=["q_proj", "embed_tokens"])),
    ("gpt2-wte", dict(target_modules=["c_attn", "wte"], fan_in_fan_out=True)),
    ("trainable-tokens", dict(target_modules=["q_proj"], trainable_token_indices=[5, 9, 77])),
    ("trainable-tokens-dict", dict(target_modules=["q_proj"],
                                   trainable_token_indices={"embed_tokens": [7]})),
    ("ensure-weight-tying", dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"],
                                 ensure_weight_tying=True)),
    ("seq-cls", dict(task_type="SEQ_CLS", target_modules=["q_proj", "v_proj"])),
    ("causal-lm", dict(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=ATTN_MLP)),
    ("bench", dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=ATTN_MLP)),
    ("no-op-init", dict(target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=True)),
    ("regex-targets", dict(target_modules=r".*\.(q|v)_proj")),
    ("all-linear", dict(target_modules="all-linear")),
    ("exclude-list", dict(target_modules=ATTN_MLP,
                          exclude_modules=["down_proj", "layers.0.self_attn.q_proj"])),
    ("exclude-regex", dict(target_modules=ATTN_MLP, exclude_modules=r".*layers\.1\..*")),
    ("float-alpha", dict(target_modules=["q_proj"], lora_alpha=12.5, r=3)),
    ("gaussian-init", dict(target_modules=["q_proj"], init_lora_weights="gaussian")),
    ("pissa-init", dict(target_modules=["q_proj"], init_lora_weights="pissa_niter_4")),
    ("olora-init", dict(target_modules=["q_proj"], init_lora_weights="olora")),
    ("layer-replication", dict(target_modules=["q_proj"], layer_replication=[[0, 2], [1, 2]])),
    ("target-parameters", dict(target_modules=None, target_parameters=["mlp.experts.gate_up_proj"])),
    ("qalora", dict(target_modules=["q_proj"], use_qalora=True)),
    ("alora", dict(target_modules=["q_proj"], task_type="CAUSAL_LM", alora_invocation_tokens=[4, 5])),
]

# Module names the per-module rules are checked on (llama, gpt2, phi3, qwen2 classifiers, MoE
# and nested layouts, and near misses).
MODULES = [
    *(f"model.layers.{i}.self_attn.{p}" for i in (0, 1, 2, 10) for p in
      ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj")),
    *(f"model.layers.{i}.mlp.{p}" for i in (0, 1, 2) for p in
      ("gate_proj", "up_proj", "down_proj", "gate_up_proj")),
    *(f"transformer.h.{i}.{p}" for i in (0, 1, 2) for p in
      ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")),
    "model.embed_tokens", "lm_head", "transformer.wte", "score", "q_proj",
    "model.layers.1.block_sparse_moe.experts.0.q_proj", "model.layers.3.experts.1.down_proj",
    "encoder.layers.2.self_attn.q_proj", "model.xq_proj", "model.layers.1.self_attn.q_proj_b",
    "model.layers.0.self_attn.q_proj.base_layer", "model.lm_head.dense",
]


def _save(config, folder: Path) -> Path:
    folder.mkdir(parents=True)
    config.save_pretrained(str(folder))
    return folder


def _peft_config(folder: Path):
    from peft import LoraConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LoraConfig.from_pretrained(str(folder))


def _raw(folder: Path) -> dict:
    return json.loads((folder / "adapter_config.json").read_text())


def _normal(value):
    """PEFT's value in the reader's terms: sets as frozensets, sub-configs as "set or not"."""
    if isinstance(value, set):
        return frozenset(value)
    if dataclasses.is_dataclass(value):
        return "<set>"
    return value


def _compare(mine: AdapterConfig, peft) -> None:
    for f in dataclasses.fields(AdapterConfig):
        if f.name == "unknown":
            continue
        theirs = getattr(peft, f.name)
        ours = getattr(mine, f.name)
        if dataclasses.is_dataclass(theirs):
            ours = "<set>" if ours is not None else None
        if f.name in ("rank_pattern", "alpha_pattern") and theirs is None:
            theirs = {}
        assert ours == _normal(theirs), f"{f.name}: ours {ours!r}, PEFT's {theirs!r}"


def _peft_resolution(peft, module: str) -> tuple[int, float, float]:
    """What PEFT's LoraModel._create_and_replace and LoraLayer.update_layer compute."""
    from peft.utils.other import get_pattern_key

    r = peft.rank_pattern.get(get_pattern_key(peft.rank_pattern.keys(), module), peft.r)
    alpha = peft.alpha_pattern.get(get_pattern_key(peft.alpha_pattern.keys(), module),
                                   peft.lora_alpha)
    scale = alpha / math.sqrt(r) if peft.use_rslora else alpha / r
    return r, alpha, scale


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """Each corpus config saved by PEFT, plus hand edits PEFT must tolerate."""
    from peft import LoraConfig
    from peft.tuners.lora.config import ArrowConfig, BdLoraConfig, KasaConfig, VeloraConfig

    root = tmp_path_factory.mktemp("configs")
    folders = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, kwargs in CORPUS:
            kwargs = {"init_lora_weights": False, **kwargs}
            folders[name] = _save(LoraConfig(**kwargs), root / name)
        for name, extra in (("bdlora", dict(use_bdlora=BdLoraConfig(target_modules_bd_a=["q_proj"]))),
                            ("kasa", dict(kasa_config=KasaConfig())),
                            ("arrow", dict(arrow_config=ArrowConfig())),
                            ("velora", dict(velora_config=VeloraConfig()))):
            folders[name] = _save(LoraConfig(target_modules=["q_proj"], **extra), root / name)
    # A newer PEFT's fields, and the runtime_config PEFT ignores, are tolerated.
    future = root / "future-fields"
    future.mkdir()
    raw = {**_raw(folders["patterns"]), "some_future_option": {"x": 1}, "lora_new_flag": True,
           "runtime_config": {"ephemeral_gpu_offload": False}}
    (future / "adapter_config.json").write_text(json.dumps(raw))
    folders["future-fields"] = future
    # Sub-config written as an empty object: PEFT still builds (and so "sets") it.
    empty = root / "empty-kasa"
    empty.mkdir()
    (empty / "adapter_config.json").write_text(json.dumps({**_raw(folders["plain"]), "kasa_config": {}}))
    folders["empty-kasa"] = empty
    return folders


def test_corpus_is_representative(corpus):
    assert len(corpus) >= 15
    features = {"use_rslora", "rank_pattern", "alpha_pattern", "layers_to_transform",
                "layers_pattern", "fan_in_fan_out", "use_dora", "lora_bias", "modules_to_save",
                "trainable_token_indices", "ensure_weight_tying", "exclude_modules",
                "layer_replication", "target_parameters", "use_qalora", "alora_invocation_tokens",
                "use_bdlora", "kasa_config", "velora_config", "arrow_config"}
    used = {k for folder in corpus.values() for k, v in _raw(folder).items() if v}
    assert features <= used, features - used
    targets = [_raw(f)["target_modules"] for f in corpus.values()]
    assert any(isinstance(t, str) for t in targets) and any(isinstance(t, list) for t in targets)


@pytest.mark.parametrize("name", [c[0] for c in CORPUS] + [
    "bdlora", "kasa", "arrow", "velora", "future-fields", "empty-kasa"])
def test_fields_and_per_module_resolution_match_peft(name, corpus):
    from peft.tuners.tuners_utils import check_target_module_exists

    folder = corpus[name]
    peft = _peft_config(folder)
    mine = parse_config(_raw(folder))
    _compare(mine, peft)
    for module in MODULES:
        rank, alpha, scale = _peft_resolution(peft, module)
        assert (mine.rank_for(module), mine.alpha_for(module)) == (rank, alpha), module
        assert mine.scale_for(module) == scale, module  # bit for bit: the merge uses it
        if not (peft.target_modules is None and peft.target_parameters is None):
            expected = bool(check_target_module_exists(peft, module))
            assert mine.targets(module) == expected, (name, module)


def test_unknown_fields_are_kept_aside(corpus):
    mine = parse_config(_raw(corpus["future-fields"]))
    assert mine.unknown == ("lora_new_flag", "some_future_option")
    assert mine.rank_for("model.layers.0.self_attn.v_proj") == 2


# Configs PEFT refuses to load (LoraConfig.__post_init__ / PeftConfigMixin), written by hand.
REFUSED = {
    "layers-pattern-without-layers": dict(target_modules=["q_proj"], layers_pattern="layers"),
    "regex-targets-with-layers": dict(target_modules=r".*q_proj", layers_to_transform=[0]),
    "regex-targets-with-pattern": dict(target_modules=r".*q_proj", layers_pattern="layers",
                                       layers_to_transform=[0]),
    "lora-bias-with-dora": dict(target_modules=["q_proj"], lora_bias=True, use_dora=True),
    "lora-bias-with-gaussian": dict(target_modules=["q_proj"], lora_bias=True,
                                    init_lora_weights="gaussian"),
    "bad-task-type": dict(target_modules=["q_proj"], task_type="TEXT_TO_SPEECH"),
    "target-parameters-str": dict(target_modules=None, target_parameters="experts.w1"),
    "dora-with-megatron": dict(target_modules=["q_proj"], use_dora=True,
                               megatron_config={"num_layers": 2}),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_configs_peft_refuses_are_refused(name, tmp_path):
    raw = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, **REFUSED[name]}
    (tmp_path / "adapter_config.json").write_text(json.dumps(raw))
    with pytest.raises((TypeError, ValueError)):
        _peft_config(tmp_path)
    with pytest.raises(ConfigError):
        parse_config(raw)


@pytest.mark.parametrize(("field", "value"), [("r", "8"), ("r", 0), ("use_rslora", "false"),
                                              ("lora_alpha", None), ("target_modules", [1, 2]),
                                              ("rank_pattern", {"q_proj": "big"}),
                                              ("layers_to_transform", ["0"])])
def test_values_of_the_wrong_type_are_refused_with_the_file_named(field, value, tmp_path,
                                                                  corpus):
    raw = {**_raw(corpus["plain"]), field: value}
    (tmp_path / "adapter_config.json").write_text(json.dumps(raw))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(AdapterError, match=field) as info:
        load_adapter(tmp_path)
    assert str(tmp_path / "adapter_config.json") in str(info.value)


# Real adapters, saved by PEFT after building the live model (configs as a training run writes
# them), read by load_adapter: PEFT's own per-module ranks, scales and token indices.
REAL = [
    ("llama", dict(target_modules=ATTN_MLP, rank_pattern={"v_proj": 2, "layers.1.mlp.down_proj": 6},
                   alpha_pattern={"o_proj": 32}, use_rslora=True)),
    ("llama", dict(target_modules="all-linear")),
    ("llama", dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1])),
    ("qwen2", dict(target_modules=["q_proj"], trainable_token_indices=[5, 9, 77])),
    ("llama", dict(target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [7]})),
    ("gpt2", dict(target_modules=GPT2, fan_in_fan_out=True, layers_to_transform=[0],
                  layers_pattern="h")),
]


@pytest.mark.parametrize(("arch", "kwargs"), REAL, ids=[f"{a}-{i}" for i, (a, _) in enumerate(REAL)])
def test_real_adapters_resolve_like_the_live_peft_model(arch, kwargs, make_base, make_adapter):
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import check_target_module_exists
    from transformers import AutoModelForCausalLM

    base = make_base(arch)
    folder = make_adapter(base, **kwargs)
    adapter = load_adapter(folder)
    _compare(adapter.config, _peft_config(folder))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        live = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)
    prefix = "base_model.model."
    layers = {n[len(prefix):]: m for n, m in live.named_modules() if isinstance(m, LoraLayer)}
    lora_layers = {n: m for n, m in layers.items() if "default" in m.r}
    assert lora_layers and set(lora_layers) == set(adapter.modules)
    for name, layer in lora_layers.items():
        spec = adapter.modules[name]
        assert (spec.rank, spec.scale) == (layer.r["default"], layer.scaling["default"]), name
    peft_config = live.peft_config["default"]
    names = [n[len(prefix):] for n, _ in live.base_model.model.named_modules(prefix="base_model.model")
             if n.startswith(prefix) and "lora_" not in n and "base_layer" not in n]
    for name in names:
        assert adapter.config.targets(name) == bool(check_target_module_exists(peft_config, name)), name
    for module, (_, indices) in adapter.token_deltas.items():
        wrapper = live.get_submodule(f"{prefix}{module}")
        assert indices == list(wrapper.token_adapter.token_indices["default"])
