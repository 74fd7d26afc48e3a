"""Benchmark: learning a new base's layout in the forked child, with and without the garbage
collector (issue 27: the first merge of a base waits for it).

    python bench/bench_layout.py --model /tmp/mf-bench/models/0.9b --pairs 8

The process imports the pipeline first (torch and all, as a merge has them when it forks), then
each pair forks the layout's child twice through ``mergeflow.model.forked.call_in_fork``, an
empty ``MERGEFLOW_CACHE`` each time (so transformers' model code is imported and the model built
on the meta device in the child): once as Mergeflow runs it (collector off in the child), once
with the collector turned back on first (as before). Wall time from the fork to the answer;
medians and the median of the per-pair ratios. The model folder is one ``bench_merge.py`` built.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mergeflow.pipeline.steps  # noqa: F401  (torch and the pipeline, as a merging process has them)
from mergeflow.model.checkpoint import Checkpoint
from mergeflow.model.forked import call_in_fork
from mergeflow.model.layout import read_layout


def learn_in_child(base: Path, collector: bool) -> float:
    """Seconds from the fork to the child's answer, with an empty layout cache."""
    checkpoint = Checkpoint(base)
    shapes = {n: tuple(i.shape) for n, i in checkpoint.tensors.items()}
    config = json.loads((base / "config.json").read_text())
    os.environ["MERGEFLOW_CACHE"] = tempfile.mkdtemp(prefix="bench-layout-")

    def learn() -> str | None:
        if collector:
            gc.enable()
        return read_layout(base, set(shapes), config, shapes).embed

    start = time.perf_counter()
    call = call_in_fork(learn)
    if call is None:
        sys.exit("forking is not possible in this process")
    call.result()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="holds base/")
    parser.add_argument("--pairs", type=int, default=8)
    args = parser.parse_args()
    runs: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(args.pairs):
        runs["off"].append(learn_in_child(args.model / "base", collector=False))
        runs["on"].append(learn_in_child(args.model / "base", collector=True))
    ratio = statistics.median(off / on for off, on in zip(runs["off"], runs["on"], strict=True))
    print(f"{args.model.name}: the layout learnt in the forked child, {args.pairs} pairs, medians")
    print("| collector in the child | wall s | runs |")
    print("| --- | ---: | --- |")
    for name, label in (("on", "on (before)"), ("off", "off (now)")):
        print(f"| {label} | {statistics.median(runs[name]):.2f} | "
              f"{', '.join(f'{t:.2f}' for t in runs[name])} |")
    print(f"off / on: {ratio:.2f}x")


if __name__ == "__main__":
    main()
