"""Read a PEFT LoRA adapter: its config (read with PEFT's own semantics, see
:mod:`mergeflow.model.adapter_config`) and its weights, lazily.

The adapter becomes a set of per-module specs the planner can check against the base:

* :class:`LoraModule` - one LoRA pair (A, B) on a base module, with its scale and variant
  (DoRA magnitude, ``lora_bias``), read from the saved keys.
* ``replacements`` - adapter tensors that replace a base tensor whole: ``modules_to_save``
  copies and biases trained with ``bias="all"|"lora_only"``.
* ``token_deltas`` - trainable-token rows (``trainable_token_indices``).
"""

from __future__ import annotations

import json
import math
import pickle
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergeflow.errors import AdapterError, CheckpointError
from mergeflow.math.numerics import all_finite
from mergeflow.model.adapter_config import AdapterConfig, ConfigError, parse_config
from mergeflow.model.checkpoint import DTYPE_NAMES, Checkpoint, TensorInfo

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
PREFIX = "base_model.model."

# Saved-key suffixes of a LoRA layer; everything else an adapter holds replaces a base tensor.
LORA_SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_B.bias": "B_bias",
    ".lora_magnitude_vector": "magnitude",
    ".lora_embedding_A": "embedding_A",
    ".lora_embedding_B": "embedding_B",
    ".token_adapter.trainable_tokens_delta": "token_delta",
}

# Config options whose adapters are not "W + s*B@A" and so cannot be merged by this formula.
UNSUPPORTED_OPTIONS = {
    "layer_replication": "layer replication",
    "use_qalora": "QA-LoRA",
    "alora_invocation_tokens": "activated LoRA (aLoRA), which only acts after its invocation "
    "tokens and so cannot be merged into the weights",
    "use_bdlora": "BD-LoRA",
    "kasa_config": "KaSA",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "arrow_config": "Arrow routing",
}
# Initialisations that rewrite the base weights: their adapters only fit the rewritten base.
RESIDUAL_INITS = ("pissa", "olora", "corda", "lora_ga", "eva")


@dataclass
class LoraModule:
    """One LoRA pair on a base module.

    ``kind`` is "linear" (A: (r, in), B: (out, r)) or "embedding"
    (A: (r, num_embeddings), B: (dim, r)).
    """

    module: str
    kind: str
    rank: int
    alpha: float
    scale: float
    a_key: str
    b_key: str
    magnitude_key: str | None = None
    bias_key: str | None = None


@dataclass
class Adapter:
    """A LoRA adapter folder, parsed; tensors are read on demand with :meth:`read`."""

    folder: Path
    config: AdapterConfig
    raw_config: dict
    weights: dict[str, TensorInfo]
    weights_file: str
    modules: dict[str, LoraModule] = field(default_factory=dict)
    replacements: dict[str, str] = field(default_factory=dict)  # base key -> adapter key
    # Replacements saved from a LoRA layer's ``base_layer`` (PEFT saves the base embedding/head
    # when it adapts them): the base weight as trained against, not a trained copy.
    base_layer: set[str] = field(default_factory=set)
    # Extra saved copies of a tensor that has a better source (key -> the key used instead).
    redundant: dict[str, str] = field(default_factory=dict)
    token_deltas: dict[str, tuple[str, list[int]]] = field(default_factory=dict)
    _reader: Checkpoint | None = None
    _pickled: dict[str, torch.Tensor] | None = None

    def read(self, key: str) -> torch.Tensor:
        """Read one adapter tensor (CPU)."""
        if self._reader is not None:
            return self._reader.read(key)
        assert self._pickled is not None
        return self._pickled[key]

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every adapter tensor as ``(key, tensor)``, one at a time (CPU)."""
        if self._reader is not None:
            yield from self._reader.iter_tensors()
        else:
            assert self._pickled is not None
            yield from self._pickled.items()

    @property
    def use_dora(self) -> bool:
        return bool(self.config.use_dora)


def read_adapter_config(folder: str | Path) -> dict:
    """The adapter's ``adapter_config.json`` as PEFT wrote it (a JSON object): the one place it
    is read; :func:`load_adapter` parses and checks it.

    Raises:
        AdapterError: the file is missing, unreadable, or not a JSON object (naming it).
    """
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise AdapterError(f"{path}: not found; point `adapter` at a PEFT adapter folder")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{path}: unreadable JSON ({exc}); re-save the adapter") from exc
    if not isinstance(raw, dict):
        raise AdapterError(f"{path}: expected a JSON object; re-save the adapter")
    return raw


def _read_config(folder: Path) -> tuple[AdapterConfig, dict]:
    path = folder / CONFIG_FILE
    raw = read_adapter_config(folder)
    peft_type = str(raw.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise AdapterError(
            f"{path}: peft_type is {raw.get('peft_type')!r}; Mergeflow merges LoRA adapters only "
            "(IA3, LoHa, LoKr, prompt tuning and others are not supported)"
        )
    if raw.get("peft_type") != "LORA":
        raise AdapterError(f"{path}: peft_type is {raw.get('peft_type')!r}; PEFT writes (and only "
                           "reads) 'LORA'; fix the spelling")
    try:
        config = parse_config(raw)
    except ConfigError as exc:
        raise AdapterError(f"{path}: not a valid LoRA config: {exc}") from exc
    return config, raw


def _check_supported(config: AdapterConfig, path: Path) -> None:
    for option, what in UNSUPPORTED_OPTIONS.items():
        if getattr(config, option, None):
            raise AdapterError(
                f"{path}: '{option}' is set; Mergeflow cannot merge {what}. "
                "Serve this adapter unmerged with PEFT instead"
            )
    init = config.init_lora_weights
    if isinstance(init, str) and init.lower().startswith(RESIDUAL_INITS):
        raise AdapterError(
            f"{path}: init_lora_weights={init!r} rewrites the base weights, so this adapter only "
            "fits that rewritten base. Re-save it with PEFT's "
            "path_initial_model_for_weight_conversion to get a plain LoRA, then merge that"
        )


def _load_weights(folder: Path, adapter: Adapter) -> None:
    if (folder / SAFETENSORS_FILE).is_file():
        try:
            adapter._reader = Checkpoint(folder, weights_file=SAFETENSORS_FILE)
        except CheckpointError as exc:
            raise AdapterError(str(exc)) from exc
        adapter.weights = adapter._reader.tensors
        adapter.weights_file = SAFETENSORS_FILE
        return
    path = folder / PICKLE_FILE
    if not path.is_file():
        raise AdapterError(
            f"{folder}: no {SAFETENSORS_FILE} or {PICKLE_FILE}; the adapter has no weights"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise AdapterError(
            f"{path}: this pickle needs more than plain tensors to load, and Mergeflow only "
            "loads adapter pickles with weights_only=True. Convert it to "
            f"{SAFETENSORS_FILE} in an environment you trust"
        ) from exc
    except (OSError, RuntimeError, EOFError) as exc:
        raise AdapterError(f"{path}: unreadable torch file ({exc})") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AdapterError(f"{path}: expected a dict of tensors")
    adapter._pickled = state
    adapter.weights = {
        k: TensorInfo(k, PICKLE_FILE, tuple(v.shape), DTYPE_NAMES[v.dtype]) for k, v in state.items()
    }
    adapter.weights_file = PICKLE_FILE


def _split_key(key: str, path: Path) -> tuple[str, str | None]:
    """Split a saved key into (base-relative name, LoRA part or None for a replacement)."""
    if not key.startswith(PREFIX):
        raise AdapterError(f"{path}: key '{key}' does not start with '{PREFIX}'; not a PEFT save")
    name = key[len(PREFIX) :]
    for suffix, part in LORA_SUFFIXES.items():
        if name.endswith(suffix):
            return name[: -len(suffix)], part
    # Wrapper paths name the module's own tensors: ".base_layer." (a LoRA layer's base, e.g. a
    # bias trained with bias="all", or the base embedding PEFT saves when it adapts embeddings),
    # ".original_module." and ".modules_to_save." (some PEFT versions save these beside a
    # modules_to_save copy). In the base the tensor has the module's own name.
    for wrapper in WRAPPERS:
        name = name.replace(wrapper, ".")
    return name, None


# Saved-key wrapper infixes, by what the tensor is: the base weight or a trained copy.
WRAPPERS = {".base_layer.": "base", ".original_module.": "base", ".modules_to_save.": "copy"}


def _replacement_rank(key: str) -> int:
    """Which of several saved tensors for one base tensor wins: a trained copy first."""
    for wrapper, role in WRAPPERS.items():
        if wrapper in key:
            return 1 if role == "copy" else 2
    return 0


def _group_keys(adapter: Adapter, path: Path) -> None:
    parts: dict[str, dict[str, str]] = {}
    for key in sorted(adapter.weights, key=_replacement_rank):
        name, part = _split_key(key, path)
        if part is not None:
            parts.setdefault(name, {})[part] = key
        elif name in adapter.replacements:
            adapter.redundant[key] = adapter.replacements[name]
        else:
            adapter.replacements[name] = key
            if _replacement_rank(key) == 2:
                adapter.base_layer.add(name)
    config = adapter.config
    for module, found in sorted(parts.items()):
        if "token_delta" in found:
            adapter.token_deltas[module] = (found.pop("token_delta"), _token_indices(config, module))
        if not found:
            continue
        kind = "embedding" if "embedding_A" in found or "embedding_B" in found else "linear"
        a_part, b_part = ("embedding_A", "embedding_B") if kind == "embedding" else ("A", "B")
        if a_part not in found or b_part not in found:
            raise AdapterError(
                f"{path}: module '{module}' has {sorted(found)} but not both LoRA matrices; "
                "the adapter file is incomplete"
            )
        rank = int(config.rank_for(module))
        alpha = float(config.alpha_for(module))
        scale = alpha / math.sqrt(rank) if config.use_rslora else alpha / rank
        adapter.modules[module] = LoraModule(
            module=module,
            kind=kind,
            rank=rank,
            alpha=alpha,
            scale=scale,
            a_key=found[a_part],
            b_key=found[b_part],
            magnitude_key=found.get("magnitude"),
            bias_key=found.get("B_bias"),
        )
        if adapter.use_dora and kind == "linear" and "magnitude" not in found:
            raise AdapterError(
                f"{path}: use_dora is set but '{module}' has no lora_magnitude_vector"
            )


def _token_indices(config: AdapterConfig, module: str) -> list[int]:
    """The token indices PEFT trained for one module (``trainable_token_indices``)."""
    spec = config.trainable_token_indices
    if isinstance(spec, dict):
        indices = config.token_indices_for(module)
        if indices is not None:
            return indices
        raise AdapterError(
            f"adapter_config.json: trainable token rows saved for '{module}', but "
            "trainable_token_indices does not name it"
        )
    if isinstance(spec, list):
        return list(spec)
    raise AdapterError(
        f"adapter_config.json: trainable token rows saved for '{module}', but "
        "trainable_token_indices is not set"
    )


def load_adapter(folder: Path | str) -> Adapter:
    """Parse an adapter folder: config (PEFT's semantics), weight headers, module specs.

    Raises:
        AdapterError: missing or unreadable files, a non-LoRA adapter, an option that cannot be
            merged, or weights that do not form complete LoRA pairs.
    """
    folder = Path(folder)
    config, raw = _read_config(folder)
    path = folder / CONFIG_FILE
    _check_supported(config, path)
    adapter = Adapter(folder=folder, config=config, raw_config=raw, weights={}, weights_file="")
    _load_weights(folder, adapter)
    _group_keys(adapter, folder / adapter.weights_file)
    if not adapter.modules and not adapter.replacements and not adapter.token_deltas:
        raise AdapterError(f"{folder / adapter.weights_file}: holds no adapter weights")
    return adapter


def check_values(adapter: Adapter) -> list[str]:
    """Read every adapter tensor once (adapters are small) before any work is done.

    Refuses NaN or Inf anywhere, naming the key and the base tensor it would be merged into, and
    warns when every LoRA delta is zero (``lora_B`` all zeros, as saved right after
    ``get_peft_model`` with the default ``init_lora_weights=True``): such a merge is a silent
    no-op.

    Returns:
        Warnings for the merge report, each starting with "warning:".

    Raises:
        AdapterError: a tensor holds NaN or Inf.
    """
    targets = _merge_targets(adapter)
    deltas = {k: m for m, s in adapter.modules.items() for k in (s.b_key, s.bias_key) if k}
    changing: set[str] = set()  # LoRA modules whose delta is not zero
    for key, tensor in adapter.iter_tensors():
        if not all_finite(tensor):
            raise AdapterError(
                f"{adapter.folder / adapter.weights_file}: tensor '{key}' holds NaN or Inf "
                f"(merged into '{targets.get(key, key)}'); the training run diverged or the file "
                "is damaged: retrain, or merge an earlier checkpoint")
        if key in deltas and bool(tensor.any()):
            changing.add(deltas[key])
    return _zero_delta_warnings(adapter, changing)


def _merge_targets(adapter: Adapter) -> dict[str, str]:
    """Adapter key -> the base tensor it changes (for messages)."""
    targets = {key: name for name, key in adapter.replacements.items()}
    for module, spec in adapter.modules.items():
        for key in (spec.a_key, spec.b_key, spec.magnitude_key):
            if key:
                targets[key] = f"{module}.weight"
        if spec.bias_key:
            targets[spec.bias_key] = f"{module}.bias"
    for module, (key, _) in adapter.token_deltas.items():
        targets[key] = f"{module}.weight"
    return targets


def _zero_delta_warnings(adapter: Adapter, changing: set[str]) -> list[str]:
    """The no-op warning when no LoRA module changes anything (DoRA magnitudes aside)."""
    modules = adapter.modules
    if not modules or changing or any(s.magnitude_key for s in modules.values()):
        return []
    why = (f"lora_B is all zeros in all {len(modules)} LoRA modules; was the adapter trained? "
           "(PEFT's default init_lora_weights=True saves B = 0)")
    if adapter.replacements or adapter.token_deltas:
        return [f"warning: every LoRA delta is zero, so only the adapter's replaced tensors and "
                f"token rows change the base ({why})"]
    return [f"warning: the adapter changes no weight at all, the output equals the base ({why})"]
