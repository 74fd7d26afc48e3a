"""Verification reads a written shard's sampled rows from the disk (the shard's writes went past
the page cache): it first announces every sampled row of the shard to the kernel
(``Checkpoint.will_read_rows``, ``POSIX_FADV_WILLNEED``) so the disk fetches them while the
checks compute. Route: in-process ``mergeflow.merge`` on a tiny Llama."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import mergeflow
from mergeflow.model import checkpoint as checkpoint_module
from mergeflow.model.checkpoint import Checkpoint


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="needs posix_fadvise")
def test_will_read_rows_announces_each_run_of_rows_in_bytes(tmp_path, monkeypatch):
    weight = torch.randn(40, 6)  # 24 bytes a row
    save_file({"w": weight, "b": torch.randn(3)}, tmp_path / "model.safetensors")
    ckpt = Checkpoint(tmp_path)
    info = ckpt.tensors["w"]
    hints = []
    real = os.posix_fadvise
    monkeypatch.setattr(checkpoint_module.os, "posix_fadvise",
                        lambda fd, offset, n, advice: (hints.append((offset, n, advice)),
                                                       real(fd, offset, n, advice)))
    rows = [2, 3, 4, 10, 30, 31]
    ckpt.will_read_rows("w", rows)
    assert hints == [(info.offset + 2 * 24, 3 * 24, os.POSIX_FADV_WILLNEED),
                     (info.offset + 10 * 24, 24, os.POSIX_FADV_WILLNEED),
                     (info.offset + 30 * 24, 2 * 24, os.POSIX_FADV_WILLNEED)]
    assert torch.equal(ckpt.read_row_set("w", rows), weight[rows])
    hints.clear()
    ckpt.will_read_rows("b", [])  # nothing to announce, and a 1-d tensor is fine
    assert hints == []


def test_verification_announces_every_row_it_reads_from_the_output(make_base, make_adapter,
                                                                  tmp_path, monkeypatch):
    base = make_base("llama")
    adapter = make_adapter(base, target_modules=["q_proj", "v_proj", "down_proj"])
    out = tmp_path / "out"
    announced: dict[tuple[str, str], list[int]] = {}
    read: dict[tuple[str, str], list[int]] = {}
    will, read_set = Checkpoint.will_read_rows, Checkpoint.read_row_set

    def record_will(self, name, rows):
        announced[(self.folder.name, name)] = list(rows)
        return will(self, name, rows)

    def record_read(self, name, rows):
        read[(self.folder.name, name)] = list(rows)
        return read_set(self, name, rows)

    monkeypatch.setattr(Checkpoint, "will_read_rows", record_will)
    monkeypatch.setattr(Checkpoint, "read_row_set", record_read)
    report = mergeflow.merge(base, adapter, out, max_shard_size="60KB")
    assert report.status == "merged" and report.shards > 1
    staging = {k: v for k, v in read.items() if k[0] != Path(base).name}  # the written shards
    assert {name for _, name in staging} == {  # one read per merged tensor, 2 layers
        f"model.layers.{i}.{m}.weight" for i in range(2)
        for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}
    assert staging == {k: announced[k] for k in staging}
