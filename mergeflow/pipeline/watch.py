"""What the watchers for finished adapters and outputs (``triggers/finished.py``,
``triggers/training.py``) read of the core: manifests, file hashes and remote listings."""

from mergeflow.output.folder import MANIFEST, read_manifest
from mergeflow.remote.fetch import (
    HF_SCHEME,
    S3_SCHEME,
    list_s3_prefix,
    parse_hf_ref,
    parse_s3_ref,
    raise_s3,
    s3_client,
    s3_key,
)
from mergeflow.storage.hashing import HashCache, sha256_file

__all__ = ["HF_SCHEME", "MANIFEST", "S3_SCHEME", "HashCache", "list_s3_prefix", "parse_hf_ref",
           "parse_s3_ref", "raise_s3", "read_manifest", "s3_client", "s3_key", "sha256_file"]
