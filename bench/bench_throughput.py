"""Benchmark: Mergeflow's write throughput against ``cp`` + ``sync`` of the same shards and against
the disk's own direct-write speed, each route starting from the same disk state.

    python bench/bench_throughput.py --model /tmp/mf-bench/models/3.6b --repeats 7

Per repeat, in turn, each in a fresh process: a first merge (empty cache: the input hashes and
the layout learnt), a merge of new files of a known architecture (the layout kept, the input
hashes dropped), and ``cp --reflink=never`` + ``sync`` of the base's shards. Before each route the
previous route's output is deleted and the disk synced (untimed), and the inputs are read into
the page cache. PEFT is not run: ``bench_merge.py`` compares with it.

``cp`` + ``sync`` writes through the page cache, so it measures the kernel's writeback as much as
the disk: on this VM it took 3.2 to 16 s for the same 7.26 GB, depending on what the page cache
held. So a fourth route measures the disk itself: ``dd`` of as many zero bytes in 4 MiB
``O_DIRECT`` writes (Mergeflow's own writes are 4 MiB ``O_DIRECT`` chunks), then fsync
("dd direct"). Throughput is shard bytes written per wall second; the report gives medians and,
for each route, the median of its per-repeat ratios to ``cp`` + ``sync`` and to ``dd``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_merge import (  # the benchmark scripts sit side by side
    cp_sync_command,
    dd_direct_command,
    drop_input_hashes,
    merge_argv,
    shard_bytes,
    warm_page_cache,
)

ROUTES = ("cold", "layout cached", "cp + sync", "dd direct")


def timed(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def run_route(route: str, model: Path, out: Path, cache: Path, shard: str) -> float:
    """One route's wall seconds, from a rested disk (see the module docstring)."""
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    warm_page_cache(model)
    env = dict(os.environ, MERGEFLOW_CACHE=str(cache))
    if route == "cp + sync":
        out.mkdir(parents=True)
        return timed(cp_sync_command(out, sorted((model / "base").glob("*.safetensors"))), env)
    if route == "dd direct":  # the disk itself: the same bytes, past the page cache, fsynced
        out.mkdir(parents=True)
        return timed(dd_direct_command(out / "zeros", shard_bytes(model / "base")), env)
    if route == "cold":
        shutil.rmtree(cache, ignore_errors=True)
    else:  # the layout learnt by the cold run just before; the input hashes dropped
        drop_input_hashes(cache)
    return timed(merge_argv(model / "base", model / "adapter", out, shard), env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="holds base/ and adapter/")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-shard-size", default="1GB")
    args = parser.parse_args()
    written = shard_bytes(args.model / "base")
    walls: dict[str, list[float]] = {route: [] for route in ROUTES}
    with tempfile.TemporaryDirectory(prefix="mf-throughput-", dir="/tmp") as tmp:
        out, cache = Path(tmp) / "out", Path(tmp) / "cache"
        for repeat in range(args.repeats):
            for route in ROUTES:
                walls[route].append(run_route(route, args.model, out, cache, args.max_shard_size))
            print(f"#{repeat + 1}: " + ", ".join(f"{r} {w[-1]:.2f} s" for r, w in walls.items()),
                  flush=True)
        shutil.rmtree(out, ignore_errors=True)
    print(f"\n{args.model.name}: {written / 1e9:.2f} GB of shards, {args.repeats} repeats, "
          "medians; the ratios: medians of the per-repeat ratios\n")
    print("| route | wall s | GB/s written | throughput / cp + sync | throughput / dd direct |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for route, runs in walls.items():
        ratios = [statistics.median(r / w for r, w in zip(walls[ref], runs, strict=True))
                  for ref in ("cp + sync", "dd direct")]
        wall = statistics.median(runs)
        print(f"| {route} | {wall:.2f} | {written / 1e9 / wall:.2f} | {ratios[0]:.2f}x "
              f"| {ratios[1]:.2f}x |")


if __name__ == "__main__":
    main()
