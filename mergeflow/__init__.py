"""Mergeflow: merge LoRA adapters into their base models, streaming, and publish SafeTensors.

The names below are loaded on first use (PEP 562), so ``import mergeflow.spec`` or the CLI's
``--help`` never pay for torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from mergeflow.version import __version__

_LAZY = {
    "merge": "mergeflow.api",
    "MergeReport": "mergeflow.api",
    "InputError": "mergeflow.errors",
    "MergeError": "mergeflow.errors",
    "TransientError": "mergeflow.errors",
    "MergeSpec": "mergeflow.spec",
    "save_pretrained_merged": "mergeflow.live",
    "push_to_hub_merged": "mergeflow.live",
    "patch": "mergeflow.live",
    "MergeOnTrainEnd": "mergeflow.callback",
}

__all__ = ["InputError", "MergeError", "MergeOnTrainEnd", "MergeReport", "MergeSpec",
           "TransientError", "__version__", "merge", "patch", "push_to_hub_merged",
           "save_pretrained_merged"]

if TYPE_CHECKING:
    from mergeflow.api import MergeReport, merge
    from mergeflow.callback import MergeOnTrainEnd
    from mergeflow.errors import InputError, MergeError, TransientError
    from mergeflow.live import patch, push_to_hub_merged, save_pretrained_merged
    from mergeflow.spec import MergeSpec


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mergeflow' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
