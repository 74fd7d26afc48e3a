"""Benchmark: the merge's per-element math on one core, in whole-block passes (what
``TensorMerger`` does: widen the block, LoRA ``addmm_`` over 64-row tiles, cast, NaN/Inf check)
against the same steps fused per 64-row tile (each tile widened, merged and cast while it is in
the core's cache).

    python bench/bench_tiles.py
    python bench/bench_tiles.py --rank 64 --blocks 256,768,3072

Shapes: a 3.6b model's gate/up projection (11008 x 4096) and down projection (4096 x 11008),
bf16, rank 16 by default. A block holds ``block_bytes / (4 * in_features)`` rows of float32 work
(the default 12 MiB block: 768 and 285 rows), so ``--blocks`` lists row counts. Both ways give
the same bits (checked), because the tiles, and so every ``addmm_``, are the same.
"""

from __future__ import annotations

import argparse
import time

import torch

TILE = 64  # rows per LoRA addmm_ (mergeflow.engine.readers.ROW_TILE)


def inputs(rows: int, cols: int, rank: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(rows, cols, generator=gen) * 0.02).to(torch.bfloat16)  # (out, in)
    a = torch.randn(rank, cols, generator=gen) * 0.01  # (r, in)
    b = torch.randn(rows, rank, generator=gen) * 0.01  # (out, r)
    return w, a, b


def by_block(w, a, b, out, block: int) -> None:
    """Whole-block passes: widen, addmm_ per tile, cast, check."""
    work = torch.empty(block, w.shape[1])
    for i in range(0, w.shape[0], block):
        j = min(i + block, w.shape[0])
        part = work[:j - i]
        part.copy_(w[i:j])  # (k, in) bf16 -> f32
        for t in range(i, j, TILE):
            u = min(t + TILE, j)
            part[t - i:u - i].addmm_(b[t:u], a, alpha=2.0)  # (n, r) @ (r, in)
        out[i:j].copy_(part)  # f32 -> bf16
        torch.aminmax(out[i:j])


def by_tile(w, a, b, out, block: int) -> None:
    """The same steps fused per tile, then one check per block."""
    tile = torch.empty(TILE, w.shape[1])
    for i in range(0, w.shape[0], block):
        j = min(i + block, w.shape[0])
        for t in range(i, j, TILE):
            u = min(t + TILE, j)
            part = tile[:u - t]
            part.copy_(w[t:u])
            part.addmm_(b[t:u], a, alpha=2.0)
            out[t:u].copy_(part)
        torch.aminmax(out[i:j])


def best_ns(fn, w, a, b, block: int, repeats: int) -> tuple[float, torch.Tensor]:
    out = torch.empty_like(w)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(w, a, b, out, block)
        best = min(best, time.perf_counter() - start)
    return best / w.numel() * 1e9, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--blocks", default="285,768,3072", help="rows per block")
    parser.add_argument("--repeats", type=int, default=5, help="best of")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| shape (out x in) | rows per block | whole-block passes ns/elem | fused per tile "
          "ns/elem | fused / passes | same bits |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for rows, cols in ((11008, 4096), (4096, 11008)):
        w, a, b = inputs(rows, cols, args.rank)
        for block in (int(x) for x in args.blocks.split(",")):
            passes, x = best_ns(by_block, w, a, b, block, args.repeats)
            fused, y = best_ns(by_tile, w, a, b, block, args.repeats)
            same = torch.equal(x.view(torch.int16), y.view(torch.int16))
            print(f"| {rows} x {cols} | {block} | {passes:.3f} | {fused:.3f} | "
                  f"{fused / passes:.2f}x | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
