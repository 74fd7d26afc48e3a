"""Mergeflow: merge LoRA adapters into their base models, streaming, and publish SafeTensors.

The names below are loaded on first use (PEP 562), so ``import mergeflow.spec`` or the CLI's
``--help`` never pay for torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from mergeflow.version import __version__

_LAZY = {
    "merge": "mergeflow.pipeline.local",
    "merge_many": "mergeflow.pipeline.many",
    "MergeReport": "mergeflow.pipeline.results",
    "InputError": "mergeflow.errors",
    "MergeError": "mergeflow.errors",
    "TransientError": "mergeflow.errors",
    "MergeSpec": "mergeflow.spec",
    "save_pretrained_merged": "mergeflow.live.save",
    "push_to_hub_merged": "mergeflow.live.save",
    "patch": "mergeflow.live.save",
    "MergeOnTrainEnd": "mergeflow.live.callback",
}

__all__ = ["InputError", "MergeError", "MergeOnTrainEnd", "MergeReport", "MergeSpec",
           "TransientError", "__version__", "merge", "merge_many", "patch", "push_to_hub_merged",
           "save_pretrained_merged"]

if TYPE_CHECKING:
    from mergeflow.errors import InputError, MergeError, TransientError
    from mergeflow.live.callback import MergeOnTrainEnd
    from mergeflow.live.save import patch, push_to_hub_merged, save_pretrained_merged
    from mergeflow.pipeline.local import merge
    from mergeflow.pipeline.many import merge_many
    from mergeflow.pipeline.results import MergeReport
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
