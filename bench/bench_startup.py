"""Benchmark: two costs at a merge's start and in its inner loop (issue 27, items 1 and 4).

    python bench/bench_startup.py --base /tmp/mf-bench/models/3.6b/base --repeats 5

* **Hashing while torch imports.** The CLI imports torch (most of a second, one core) before
  it can plan; meanwhile it hashes a local base's shards on a thread
  (:func:`mergeflow.storage.hashing.hash_ahead`). Each repeat runs two fresh interpreters in
  turn: one that only imports torch, one that starts ``hash_ahead`` first, imports torch and
  stops the hashing (``pause_hashing``, as planning does before its fork). Printed: the import's
  wall time each way, and the bytes hashed meanwhile (work taken off the merge's cores).
* **The merged block's NaN/Inf check.** Before, one ``aminmax`` pass over the float32 work
  block (``fits``); now ``all_finite`` on the block as cast to bf16 (an ``aminmax`` over half
  the bytes). Nanoseconds per element, one thread, a 12 MiB float32 block, median of the repeats.

Medians of the repeats; the machine is shared, so compare the two columns of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IMPORT_ONLY = """
import json, time
t0 = time.monotonic()
import torch
print(json.dumps({"import_s": time.monotonic() - t0, "hashed_gb": 0.0}))
"""

IMPORT_WHILE_HASHING = """
import json, sys, time
from pathlib import Path
t0 = time.monotonic()
from mergeflow.model.index import safetensors_shards
from mergeflow.storage import hashing
hashing.hash_ahead(safetensors_shards(Path(sys.argv[1])))
import torch
t1 = time.monotonic()
hashing.pause_hashing()
done = sum(d._at for d in hashing._ahead.digests) if hashing._ahead else 0
print(json.dumps({"import_s": t1 - t0, "hashed_gb": done / 1e9}))
"""


def run_python(code: str, base: Path, cache: str) -> dict:
    """``code`` in a fresh interpreter with an empty hash cache; its JSON line."""
    env = dict(os.environ, MERGEFLOW_CACHE=cache)
    out = subprocess.run([sys.executable, "-c", code, str(base)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def import_overlap(base: Path, repeats: int) -> None:
    alone, ahead = [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as cache:
            alone.append(run_python(IMPORT_ONLY, base, cache))
        with tempfile.TemporaryDirectory() as cache:
            ahead.append(run_python(IMPORT_WHILE_HASHING, base, cache))
    a = statistics.median(r["import_s"] for r in alone)
    b = statistics.median(r["import_s"] for r in ahead)
    gb = statistics.median(r["hashed_gb"] for r in ahead)
    print("| torch import | alone | while hashing ahead | hashed meanwhile |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| wall, median of {repeats} | {a:.2f} s | {b:.2f} s ({b / a:.2f}x) | {gb:.2f} GB |")


def finite_check(repeats: int) -> None:
    import torch

    from mergeflow.math.numerics import all_finite, fits

    torch.set_num_threads(1)
    work = torch.randn(3 * 2**20)  # 12 MiB of float32: the merge's default work block
    out = work.to(torch.bfloat16)

    def per_element(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(20):
                fn()
            times.append((time.perf_counter() - start) / 20 / work.numel() * 1e9)
        return statistics.median(times)

    before = per_element(lambda: fits(work, torch.bfloat16))
    now = per_element(lambda: all_finite(out))
    print()
    print("| NaN/Inf check of a merged block | ns / element |")
    print("| --- | ---: |")
    print(f"| before: `fits` on the float32 block | {before:.3f} |")
    print(f"| now: `all_finite` on the bf16 block as cast | {now:.3f} ({now / before:.2f}x) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="a folder of safetensors shards")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import_overlap(args.base, args.repeats)
    finite_check(args.repeats)


if __name__ == "__main__":
    main()
