"""Execution: row readers, the per-op block steps, shard writing, GGUF writing and the quantization
codecs."""
