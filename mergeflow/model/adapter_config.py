"""``adapter_config.json`` read the way PEFT reads it, without importing PEFT.

PEFT's ``LoraConfig.from_pretrained`` is a dataclass built from the JSON: unknown keys (written by
a newer PEFT) are dropped, ``runtime_config`` is ignored, list-valued ``target_modules`` /
``exclude_modules`` become sets and ``__post_init__`` refuses a few contradictory combinations.
:class:`AdapterConfig` does the same for every field Mergeflow reads, and the functions below
resolve per-module settings exactly as PEFT does when it builds the live adapter:

* :func:`pattern_key` - ``rank_pattern`` / ``alpha_pattern`` keys (``peft.utils.other.get_pattern_key``);
* :func:`check_target_module_exists` - ``target_modules``, ``exclude_modules``, ``modules_to_save``,
  ``layers_to_transform`` and ``layers_pattern`` (``peft.tuners.tuners_utils``);
* :meth:`AdapterConfig.token_indices_for` - ``trainable_token_indices`` given per module.

``tests/test_adapter_config.py`` checks all of this against PEFT on the test suite's configs.
Where PEFT would accept a value of the wrong type (a string for ``r``, ``"false"`` for a flag) and
fail or misbehave later, this reader refuses it up front.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

# PEFT's TaskType values (peft.utils.peft_types.TaskType).
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS",
              "FEATURE_EXTRACTION")
# Nested sub-configs: PEFT turns a dict into its dataclass (so even ``{}`` counts as "set").
SUBCONFIGS = ("use_bdlora", "kasa_config", "velora_config", "monteclora_config", "arrow_config",
              "eva_config", "corda_config", "lora_ga_config")


class ConfigError(ValueError):
    """The config is not one PEFT would load (or one whose values make no sense)."""


@dataclass(frozen=True)
class AdapterConfig:
    """The fields of a PEFT ``LoraConfig`` that Mergeflow uses, with PEFT's defaults."""

    peft_type: str = "LORA"
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    r: int = 8
    lora_alpha: float = 8
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    target_modules: frozenset[str] | str | None = None
    exclude_modules: frozenset[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_dora: bool = False
    lora_bias: bool = False
    modules_to_save: list[str] | None = None
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    ensure_weight_tying: bool = False
    init_lora_weights: bool | str = True
    megatron_config: dict | None = None
    loftq_config: dict = field(default_factory=dict)
    # Options Mergeflow refuses (see mergeflow.model.adapter.UNSUPPORTED_OPTIONS).
    target_parameters: list[str] | None = None
    layer_replication: list | None = None
    use_qalora: bool = False
    alora_invocation_tokens: list[int] | None = None
    use_bdlora: dict | None = None
    kasa_config: dict | None = None
    velora_config: dict | None = None
    monteclora_config: dict | None = None
    arrow_config: dict | None = None
    eva_config: dict | None = None
    corda_config: dict | None = None
    lora_ga_config: dict | None = None
    # Keys PEFT does not know (a newer PEFT wrote them); dropped, as PEFT drops them.
    unknown: tuple[str, ...] = ()

    # -- per-module resolution ------------------------------------------------------------

    def rank_for(self, module: str) -> int:
        """The rank PEFT gives ``module`` (``rank_pattern``, else ``r``)."""
        return self.rank_pattern.get(pattern_key(self.rank_pattern, module), self.r)

    def alpha_for(self, module: str) -> float:
        """The alpha PEFT gives ``module`` (``alpha_pattern``, else ``lora_alpha``)."""
        return self.alpha_pattern.get(pattern_key(self.alpha_pattern, module), self.lora_alpha)

    def scale_for(self, module: str) -> float:
        """PEFT's ``scaling``: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        rank, alpha = self.rank_for(module), self.alpha_for(module)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def targets(self, module: str) -> bool:
        """Whether PEFT puts a LoRA layer on ``module`` (see :func:`check_target_module_exists`)."""
        return check_target_module_exists(self, module)

    def token_indices_for(self, module: str) -> list[int] | None:
        """The trainable-token indices of ``module``: PEFT wraps each module whose name ends with
        a key of the dict (plain ``str.endswith``); a list applies to the input embedding."""
        spec = self.trainable_token_indices
        if isinstance(spec, dict):
            for key, indices in spec.items():
                if module.endswith(key):
                    return list(indices)
            return None
        return list(spec) if spec is not None else None


def pattern_key(patterns: Iterable[str], module: str) -> str:
    """PEFT's ``get_pattern_key``: the first pattern that matches the end of the module name
    (``re.match(rf"(.*\\.)?({key})$", module)``), else the module name itself."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return module


def check_target_module_exists(config: AdapterConfig, key: str) -> bool:
    """PEFT's ``check_target_module_exists`` (as a bool): is ``key`` a module PEFT adapts?

    * ``exclude_modules`` (a str is a full-match regex; a list matches the name or a ``.name``
      suffix) and ``modules_to_save`` modules are never adapted;
    * a str ``target_modules`` is a full-match regex;
    * a list matches the name exactly, or as a ``.name`` suffix; only suffix matches are then
      restricted by ``layers_to_transform``: the layer index is the first number after
      ``<layers_pattern>.`` (any ``.<segment>.<number>.`` without a pattern).
    """
    exclude = config.exclude_modules
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return False
        elif key in exclude or any(key.endswith(f".{e}") for e in exclude):
            return False
    if config.modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", key)
                                      for m in config.modules_to_save):
        return False
    targets = config.target_modules
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    found = any(key.endswith(f".{t}") for t in targets)
    indexes = config.layers_to_transform
    using_indexes = indexes is not None and (len(indexes) != 0 if isinstance(indexes, list) else True)
    if not (using_indexes and found):
        return found
    patterns = config.layers_pattern
    match = None
    if patterns is None or len(patterns) == 0:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == indexes if isinstance(indexes, int) else index in indexes


# -- reading ------------------------------------------------------------------------------

_FIELDS = {f.name for f in fields(AdapterConfig)} - {"unknown"}
_FLAGS = ("inference_mode", "use_rslora", "fan_in_fan_out", "use_dora", "lora_bias",
          "ensure_weight_tying", "use_qalora")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _str_list(name: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{name} must be a string or a list of strings, not {value!r}")
    return value


def _int_list(name: str, value: Any) -> list[int]:
    if not isinstance(value, list) or not all(_is_int(v) for v in value):
        raise ConfigError(f"{name} must be a list of integers, not {value!r}")
    return value


def _modules(name: str, value: Any) -> frozenset[str] | str | None:
    if value is None or isinstance(value, str):
        return value
    return frozenset(_str_list(name, value))


def _pattern(name: str, value: Any, check) -> dict:
    if value is None:
        return {}  # PEFT would keep None and fail on .keys(); no pattern is what it means
    if not isinstance(value, dict) or not all(isinstance(k, str) and check(v)
                                              for k, v in value.items()):
        raise ConfigError(f"{name} must map module patterns to numbers, not {value!r}")
    return dict(value)


def parse_config(raw: Mapping[str, Any]) -> AdapterConfig:
    """Build an :class:`AdapterConfig` from the JSON object of ``adapter_config.json``.

    Raises:
        ConfigError: PEFT would refuse the config, or a value Mergeflow reads has the wrong type.
    """
    if raw.get("peft_type") != "LORA":
        raise ConfigError(f"peft_type is {raw.get('peft_type')!r}, not 'LORA'")
    known = {k: v for k, v in raw.items() if k in _FIELDS}
    unknown = tuple(sorted(k for k in raw if k not in _FIELDS and k != "runtime_config"
                           and k not in _PEFT_ONLY))
    for name in _FLAGS:
        if name in known and not isinstance(known[name], bool):
            raise ConfigError(f"{name} must be true or false, not {known[name]!r}")
    r = known.get("r", 8)
    if not _is_int(r) or r <= 0:
        raise ConfigError(f"r must be a positive integer, not {r!r}")
    alpha = known.get("lora_alpha", 8)
    if not _is_number(alpha):
        raise ConfigError(f"lora_alpha must be a number, not {alpha!r}")
    known["rank_pattern"] = _pattern("rank_pattern", known.get("rank_pattern"),
                                     lambda v: _is_int(v) and v > 0)
    known["alpha_pattern"] = _pattern("alpha_pattern", known.get("alpha_pattern"), _is_number)
    known["target_modules"] = _modules("target_modules", known.get("target_modules"))
    known["exclude_modules"] = _modules("exclude_modules", known.get("exclude_modules"))
    layers = known.get("layers_to_transform")
    if layers is not None and not _is_int(layers):
        _int_list("layers_to_transform", layers)
    pattern = known.get("layers_pattern")
    if pattern is not None and not isinstance(pattern, str):
        _str_list("layers_pattern", pattern)
    if known.get("modules_to_save") is not None:
        _str_list("modules_to_save", known["modules_to_save"])
    tokens = known.get("trainable_token_indices")
    if isinstance(tokens, dict):
        for key, value in tokens.items():
            _int_list(f"trainable_token_indices[{key!r}]", value)
    elif tokens is not None:
        _int_list("trainable_token_indices", tokens)
    init = known.get("init_lora_weights", True)
    if not isinstance(init, (bool, str)):
        raise ConfigError(f"init_lora_weights must be true, false or a method name, not {init!r}")
    for name in SUBCONFIGS:
        value = known.get(name)
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{name} must be an object or null, not {value!r}")
    if isinstance(known.get("target_parameters"), str):
        raise ConfigError("target_parameters must be a list of strings or null")
    config = AdapterConfig(**known, unknown=unknown)
    _post_init_checks(config)
    return config


# Keys PEFT's LoraConfig accepts that Mergeflow has no use for (so they are not "unknown").
_PEFT_ONLY = {"auto_mapping", "peft_version", "lora_dropout", "megatron_core", "qalora_group_size"}


def _post_init_checks(config: AdapterConfig) -> None:
    """The refusals of PEFT's ``LoraConfig.__post_init__`` (same conditions)."""
    if config.task_type is not None and config.task_type not in TASK_TYPES:
        raise ConfigError(f"invalid task_type {config.task_type!r}; PEFT knows "
                          f"{', '.join(TASK_TYPES)}")
    if isinstance(config.target_modules, str) and config.layers_to_transform is not None:
        raise ConfigError("layers_to_transform cannot be used when target_modules is a str")
    if isinstance(config.target_modules, str) and config.layers_pattern is not None:
        raise ConfigError("layers_pattern cannot be used when target_modules is a str")
    if config.layers_pattern and config.layers_to_transform is None:
        raise ConfigError("layers_pattern is set but layers_to_transform is not")
    if config.use_dora and config.megatron_config:
        raise ConfigError("DoRA does not support megatron_core (use_dora with megatron_config)")
    if config.init_lora_weights == "loftq" and not config.loftq_config:
        raise ConfigError("init_lora_weights is 'loftq' but loftq_config is not set")
    if config.lora_bias and config.init_lora_weights not in (True, False):
        raise ConfigError("lora_bias=True needs init_lora_weights true or false, not "
                          f"{config.init_lora_weights!r}")
    if config.lora_bias and config.use_dora:
        raise ConfigError("lora_bias=True is not supported with DoRA (use_dora)")


__all__ = ["AdapterConfig", "ConfigError", "check_target_module_exists", "parse_config",
           "pattern_key"]
