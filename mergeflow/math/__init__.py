"""Tensor math with no I/O: LoRA/DoRA deltas and finiteness checks."""
