"""What the model's own code says about its tensors: which is the input embedding, which the
output head, whether they are tied, and which layers store weights transposed (``Conv1D``).

The model is instantiated from its config on the ``meta`` device (no memory, no weights), so this
works for any architecture transformers knows, without a list of model names.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergeflow.errors import PlanError


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
    """Find the embedding, head, tie and Conv1D modules of the base model.

    Falls back to ``config.json`` alone when transformers cannot build the architecture (then no
    module is known to be transposed, and embedding/head changes are refused).
    """
    try:
        model, hf_config = _meta_model(config_dir)
    except Exception:
        return ModelLayout(embed=None, head=None, tied=bool(config.get("tie_word_embeddings")))
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
