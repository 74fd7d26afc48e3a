"""The streaming core: row blocks, stored-byte copies and the writer thread.

The merge must give the same bytes whatever the block size (one row at a time or the whole
tensor), copy unchanged tensors byte for byte from the base, and give the same bytes on CUDA
as on the CPU within float32 rounding.
"""

from __future__ import annotations

import pytest
import torch
from helpers import read_tensors, sha256, weight_files
from safetensors import safe_open

import mergeflow
from mergeflow.model.checkpoint import Checkpoint

BF16 = torch.bfloat16
# Every block-streamed op: linear LoRA, DoRA, rsLoRA, embedding LoRA, head LoRA, lora_bias,
# trainable tokens and a vocabulary that grows (pad to a multiple of 96: new mean rows).
CASES = {
    "lora-embed-head": ("llama", dict(target_modules=["q_proj", "down_proj", "embed_tokens",
                                                      "lm_head"]), {}),
    "pad-vocab": ("llama", dict(target_modules=["k_proj"]), dict(pad_vocab_to_multiple_of=96)),
    "dora-rslora": ("llama", dict(target_modules=["q_proj", "v_proj", "up_proj"], use_dora=True,
                                  use_rslora=True), {}),
    "lora-bias": ("qwen2", dict(target_modules=["q_proj", "v_proj"], lora_bias=True), {}),
    "tokens": ("llama", dict(target_modules=["o_proj"], trainable_token_indices=[3, 40, 90]), {}),
    "gpt2-dora-conv1d": ("gpt2", dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                                      use_dora=True), {}),
}


def _shard_hashes(folder):
    return {p.name: sha256(p) for p in weight_files(folder)}


@pytest.mark.parametrize("case", list(CASES))
def test_block_size_never_changes_the_bytes(case, make_base, make_adapter, tmp_path):
    arch, lora, options = CASES[case]
    base = make_base(arch, dtype=BF16)
    adapter = make_adapter(base, **lora)
    # 256 bytes of float32 per block: one row (or a few) at a time; 1 GB: every tensor whole.
    mergeflow.merge(base, adapter, tmp_path / "rows", block_size="256B", **options)
    mergeflow.merge(base, adapter, tmp_path / "whole", block_size="1GB", **options)
    assert _shard_hashes(tmp_path / "rows") == _shard_hashes(tmp_path / "whole")


def test_unchanged_tensors_are_copied_as_stored_bytes(make_base, make_adapter, tmp_path):
    base = make_base("llama", dtype=BF16)
    adapter = make_adapter(base, target_modules=["q_proj"])
    mergeflow.merge(base, adapter, tmp_path / "out", block_size="1KB")
    merged = read_tensors(tmp_path / "out")
    stored = read_tensors(base)
    untouched = [n for n in stored if "q_proj" not in n]
    assert untouched and all(
        torch.equal(merged[n].view(torch.uint8), stored[n].view(torch.uint8)) for n in untouched)
    assert all(not torch.equal(merged[n], stored[n]) for n in stored if "q_proj" in n)


def test_positional_row_reads_match_safe_open(make_base):
    base = make_base("llama", dtype=BF16)
    ckpt = Checkpoint(base)
    name = "model.embed_tokens.weight"
    with safe_open(str(base / ckpt.tensors[name].file), "pt") as f:
        want = f.get_tensor(name)
    assert torch.equal(ckpt.read_rows(name, 5, 17), want[5:17])
    assert torch.equal(ckpt.read_row_set(name, [0, 1, 2, 9, 40]), want[[0, 1, 2, 9, 40]])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", ["lora-embed-head", "pad-vocab", "dora-rslora"])
def test_cuda_blocks_match_the_cpu(case, make_base, make_adapter, tmp_path):
    """Pinned host buffers, float32 merge on the device, asynchronous copies back: the same
    tensors as the CPU path up to float32 rounding of the products (GEMM kernels differ)."""
    arch, lora, options = CASES[case]
    base = make_base(arch)
    adapter = make_adapter(base, **lora)
    mergeflow.merge(base, adapter, tmp_path / "cpu", **options)
    mergeflow.merge(base, adapter, tmp_path / "cuda", device="cuda", block_size="4KB", **options)
    cpu, cuda = read_tensors(tmp_path / "cpu"), read_tensors(tmp_path / "cuda")
    assert cpu.keys() == cuda.keys()
    for name in cpu:
        torch.testing.assert_close(cuda[name], cpu[name], rtol=1e-5, atol=1e-5, msg=name)
