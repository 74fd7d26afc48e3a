"""The base model built from its ``config.json`` by transformers on the ``meta`` device (no
memory, no weights): what the layout (:mod:`mergeflow.model.layout`) and PEFT's wrapped
parameters (:mod:`mergeflow.model.wrappers`) are read from. Importing this module imports
nothing heavy; calling :func:`meta_model` imports transformers' model code."""

from __future__ import annotations

import warnings
from pathlib import Path


def model_class(config):
    """The class the checkpoint was saved from (``architectures`` in config.json) when
    transformers has it, else ``AutoModelForCausalLM``'s choice: the class the adapter was
    trained on, so its module names are the adapter's."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None and hasattr(cls, "_from_config"):
            return cls
    return transformers.AutoModelForCausalLM


def meta_model(config_dir: Path):
    """The model of ``config_dir/config.json`` on the ``meta`` device (no memory, no weights),
    and its config."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(config_dir)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    cls = model_class(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            if hasattr(cls, "from_config"):
                return cls.from_config(config), config
            return cls._from_config(config), config
