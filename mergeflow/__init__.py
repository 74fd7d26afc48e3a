"""Mergeflow: merge LoRA adapters into their base models, streaming, and publish SafeTensors."""

__version__ = "0.1.0"

from mergeflow.api import MergeReport, merge
from mergeflow.errors import InputError, MergeError, TransientError
from mergeflow.spec import MergeSpec

__all__ = ["InputError", "MergeError", "MergeReport", "MergeSpec", "TransientError", "merge",
           "__version__"]
