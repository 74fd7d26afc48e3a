"""Benchmark: where a merge's wall time goes (issue 27, item 4): the fixed costs of a run and of
a tensor against the work per byte.

    python bench/bench_split.py --sizes deep-narrow,0.9b,3.6b-deep --repeats 3 --workdir /tmp/mf-bench

Models: ``bench_merge.py``'s (built by it when missing; ``deep-narrow`` is the 3.6b-deep's 651
tensors at hidden 64, so its merge is almost all fixed and per-tensor cost). Each run is a fresh
process running ``mergeflow.merge`` in-process (no Prefect), inputs in the page cache, in three
states of Mergeflow's cache, interleaved repeat by repeat:

* ``cold``: an empty ``MERGEFLOW_CACHE``: the base's layout is learnt from transformers (the model
  built on the meta device) and every input file is hashed for the manifest - a new base;
* ``layout``: the layout cached, the inputs' hashes not - a base seen before, edited or copied;
* ``warm``: both cached - a second adapter on the same base.

Each run reports ``import mergeflow`` (torch included) and the report's own step timings: ``load``
(headers, layout, plan, staging), ``merge`` (every shard), ``finalize``, ``verify``, ``publish``;
the fixed share is everything but ``merge``. Medians of the repeats. The disk's reference (``cp``
+ ``sync``) and PEFT are ``bench_merge.py``'s: this script measures a split, not a speed claim.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_merge import (  # noqa: E402  (the benchmark scripts sit side by side)
    bench_env,
    drop_input_hashes,
    ensure_inputs,
    log,
    machine,
    shard_bytes,
    warm_page_cache,
)

STATES = ("cold", "layout", "warm")
STEPS = ("import", "load", "merge", "finalize", "verify", "publish")

CHILD = """
import json, resource, sys, time
t0 = time.perf_counter()
from mergeflow import merge  # the package is lazy: this imports the pipeline (torch, pydantic)
t1 = time.perf_counter()
report = merge(sys.argv[1], sys.argv[2], sys.argv[3], no_tokenizer=True, max_shard_size="1GB")
t2 = time.perf_counter()
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"import": t1 - t0, **report.timings, "total": t2 - t0,
                  "user": usage.ru_utime, "system": usage.ru_stime, "tensors": report.tensors}))
"""


def prepare_cache(state: str, cache: Path, primed: Path) -> None:
    """Make ``cache`` the state's Mergeflow cache: empty, the layout alone, or all of ``primed``
    (the cache a run on this base left)."""
    shutil.rmtree(cache, ignore_errors=True)
    if state == "cold":
        cache.mkdir(parents=True)
        return
    shutil.copytree(primed, cache)
    if state == "layout":
        drop_input_hashes(cache)


def run_merge(base: Path, adapter: Path, out: Path, cache: Path, env: dict) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, str(base), str(adapter), str(out)],
                          env=dict(env, MERGEFLOW_CACHE=str(cache)), capture_output=True,
                          text=True, check=True)
    wall = time.perf_counter() - start
    result = json.loads(done.stdout.strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    return {**result, "process": wall}


def bench_size(size: str, repeats: int, workdir: Path, env: dict) -> dict:
    base, adapter, _ = ensure_inputs(size, workdir)
    warm_page_cache(base, adapter)
    scratch = Path(tempfile.mkdtemp(prefix=f"split-{size}-", dir=workdir))
    primed = scratch / "primed-cache"
    primed.mkdir()
    log(f"{size}: priming a cache (one untimed run)")
    run_merge(base, adapter, scratch / "out", primed, env)
    runs: dict[str, list[dict]] = {s: [] for s in STATES}
    for repeat in range(repeats):
        for state in STATES:
            cache = scratch / f"cache-{state}"
            prepare_cache(state, cache, primed)
            runs[state].append(run_merge(base, adapter, scratch / "out", cache, env))
            log(f"{size} #{repeat + 1} {state}: " + ", ".join(
                f"{k} {runs[state][-1].get(k, 0):.2f}" for k in (*STEPS, "total")))
    shutil.rmtree(scratch, ignore_errors=True)
    return {"size": size, "bytes": shard_bytes(base), "runs": runs}


def median(runs: list[dict], key: str) -> float:
    return statistics.median(r.get(key, 0.0) for r in runs)


def report(results: list[dict], command: str) -> str:
    lines = [f"`{command}`", "", f"machine: {machine()}", "",
             "| size | cache | " + " | ".join(STEPS) + " | total | fixed (all but merge) | "
             "fixed share | user / system s |",
             "| --- | --- |" + " ---: |" * (len(STEPS) + 4)]
    for res in results:
        for state in STATES:
            runs = res["runs"][state]
            total = median(runs, "total")
            fixed = statistics.median(r["total"] - r.get("merge", 0.0) for r in runs)
            lines.append(
                f"| {res['size']} | {state} | "
                + " | ".join(f"{median(runs, k):.2f}" for k in STEPS)
                + f" | {total:.2f} | {fixed:.2f} | {fixed / total:.0%} | "
                f"{median(runs, 'user'):.1f} / {median(runs, 'system'):.1f} |")
    lines.append("")
    for res in results:
        runs = res["runs"]["warm"]
        tensors = runs[0]["tensors"]
        merge = median(runs, "merge")
        lines.append(f"- {res['size']}: {tensors} tensors, {res['bytes'] / 1e9:.2f} GB; warm, the "
                     f"merge step {merge:.2f} s ({res['bytes'] / 1e9 / merge:.2f} GB/s, "
                     f"{1000 * merge / tensors:.2f} ms a tensor), verification "
                     f"{1000 * median(runs, 'verify') / tensors:.2f} ms a tensor")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="deep-narrow,0.9b")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default="/tmp/mf-bench")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    env = bench_env(None, workdir)
    results = [bench_size(size.strip(), args.repeats, workdir, env)
               for size in args.sizes.split(",") if size.strip()]
    command = " ".join(["python", "bench/bench_split.py", *sys.argv[1:]])
    text = report(results, command)
    (workdir / "split.json").write_text(json.dumps(results, indent=1))
    (workdir / "split.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
