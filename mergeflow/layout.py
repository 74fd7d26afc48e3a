"""What the model's own code says about its tensors: which is the input embedding, which the
output head, whether they are tied, and which layers store weights transposed (``Conv1D``).

The model is instantiated from its config on the ``meta`` device (no memory, no weights), so this
works for any architecture transformers knows, without a list of model names. Importing
transformers and building the model costs seconds, so the answer is cached as JSON in the
Mergeflow cache folder (``$MERGEFLOW_CACHE/layout/``), keyed by the canonical JSON of
``config.json``, the set of tensor names, and the Mergeflow and installed transformers versions:
a second merge of the same base imports no transformers. A damaged cache entry is ignored and
rewritten.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from mergeflow.errors import PlanError
from mergeflow.memo import installed_version, memo_path, read_memo, write_memo

CACHE_FORMAT = 1


@dataclass
class ModelLayout:
    """Embedding/head names (tensor names, ``.weight`` included) and transposed modules."""

    embed: str | None
    head: str | None
    tied: bool
    conv1d: set[str] = field(default_factory=set)  # module names whose weight is (in, out)


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if get is not None else config


def _meta_model(config_dir: Path):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_dir)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config), config


def _module_names(model) -> dict[int, str]:
    return {id(m): n for n, m in model.named_modules()}


def read_layout(config_dir: Path, tensor_names: set[str], config: dict) -> ModelLayout:
    """Find the embedding, head, tie and Conv1D modules of the base model (cached).

    ``config`` is the parsed ``config.json`` of ``config_dir``. Falls back to ``config.json``
    alone when transformers cannot build the architecture (then no module is known to be
    transposed, and embedding/head changes are refused); that answer is not cached.
    """
    path = _cache_path(config_dir, tensor_names)
    cached = _load_cached(path) if path is not None else None
    if cached is not None:
        return cached
    layout = _model_layout(config_dir, tensor_names, config)
    if layout is not None:
        if path is not None:
            _store(path, layout)
        return layout
    return ModelLayout(embed=None, head=None, tied=bool(config.get("tie_word_embeddings")))


def _model_layout(config_dir: Path, tensor_names: set[str], config: dict) -> ModelLayout | None:
    """The layout from the model's own code; None when transformers cannot build it."""
    try:
        model, hf_config = _meta_model(config_dir)
    except Exception:
        return None
    names = _module_names(model)
    from transformers.pytorch_utils import Conv1D

    conv1d = {n for n, m in model.named_modules() if isinstance(m, Conv1D)}
    embed_module = model.get_input_embeddings()
    head_module = model.get_output_embeddings()
    embed = f"{names[id(embed_module)]}.weight" if embed_module is not None else None
    head = f"{names[id(head_module)]}.weight" if head_module is not None else None
    tied = bool(getattr(_text_config(hf_config), "tie_word_embeddings", False))
    if head is not None and not tied and head not in tensor_names:
        raise PlanError(
            f"{config_dir}: config.json says tie_word_embeddings is false but the checkpoint has "
            f"no '{head}'; the base checkpoint is incomplete"
        )
    return ModelLayout(embed=embed, head=head, tied=tied and head is not None, conv1d=conv1d)


# -- the cache ------------------------------------------------------------------------------


def _cache_path(config_dir: Path, tensor_names: set[str]) -> Path | None:
    """Where the layout of this ``config.json`` (the file transformers reads) and tensor set is
    cached; None when the config cannot be read as JSON (then nothing is cached)."""
    try:
        config = json.loads((Path(config_dir) / "config.json").read_text())
        canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (OSError, TypeError, ValueError, UnicodeDecodeError):
        return None
    return memo_path("layout", {
        "format": CACHE_FORMAT, "config": hashlib.sha256(canonical.encode()).hexdigest(),
        "tensors": hashlib.sha256("\n".join(sorted(tensor_names)).encode()).hexdigest(),
        "transformers": installed_version("transformers")})


def _load_cached(path: Path) -> ModelLayout | None:
    """A cached layout, or None when there is none or it is damaged in any way."""
    data = read_memo(path)
    if data is None or data.get("format") != CACHE_FORMAT:
        return None
    embed, head, tied, conv1d = (data.get(k) for k in ("embed", "head", "tied", "conv1d"))
    if not (all(v is None or isinstance(v, str) for v in (embed, head)) and isinstance(tied, bool)
            and isinstance(conv1d, list) and all(isinstance(n, str) for n in conv1d)):
        return None
    return ModelLayout(embed=embed, head=head, tied=tied, conv1d=set(conv1d))


def _store(path: Path, layout: ModelLayout) -> None:
    write_memo(path, {"format": CACHE_FORMAT, "embed": layout.embed, "head": layout.head,
                      "tied": layout.tied, "conv1d": sorted(layout.conv1d)})
