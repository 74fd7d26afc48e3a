"""Prefect tasks: thin wrappers over ``mergeflow`` core functions, adding retries and tags.

Tasks take and return paths and small pydantic models, never tensors.
"""

from tasks.merge import (
    convert_gguf,
    finalize,
    gguf_low_disk,
    load,
    merge_low_disk,
    merge_shard,
    publish,
    resize_vocab_and_untie,
    upload,
    verify,
    write_gguf,
)
from tasks.policy import IO_RETRIES, retry_transient

__all__ = ["IO_RETRIES", "convert_gguf", "finalize", "gguf_low_disk", "load", "merge_shard",
           "merge_low_disk", "publish", "resize_vocab_and_untie", "retry_transient", "upload",
           "verify", "write_gguf"]
