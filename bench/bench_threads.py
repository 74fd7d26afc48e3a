"""Where a merge's cores go, thread by thread: one CLI merge under ``perf record``, its samples
grouped by thread and by what they ran (sha256, the merge's math, kernel copies, the
interpreter), in core-seconds.

    python bench/bench_threads.py --model /tmp/mf-bench/models/3.6b
    python bench/bench_threads.py --model /tmp/mf-bench/models/3.6b --layout-cached

The model folder is one ``bench_merge.py`` built (``base/`` and ``adapter/``). The merge starts
with its inputs in the page cache and an empty cache folder (input hashes and layout learnt, as
on a first merge; ``--layout-cached``: the layout learnt by an untimed merge first). Needs
``perf`` (linux-perf) and a ``perf_event_paranoid`` that lets this user sample its own processes.

Each thread's share of the samples is scaled to core-seconds by the merge's user + system time
(``getrusage`` of the child), so the table adds up to what the merge cost; the thread's role is
read from what it ran most (a writer thread hashes the output, a reader thread does the math, the
layout's child is a process of its own). ``perf`` samples at 499 Hz, so a thread that ran less
than a few tens of milliseconds is folded into "other threads".
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_merge import (  # the benchmark scripts sit side by side
    drop_input_hashes,
    merge_argv,
    warm_page_cache,
)

SAMPLE = re.compile(r"^\s*(\S+)\s+(\d+)/(\d+)\s+([\d.]+):(.*)$")  # comm pid/tid time: [frame]
FRAME = re.compile(r"^\s*[0-9a-f]+\s+(.*?)\s+\((.*)\)\s*$")  # ip symbol (dso)


def family(symbol: str, dso: str) -> str:
    """What a sample ran, in a few words."""
    if "libcrypto" in dso:
        return "sha256"
    if "sgemm" in symbol or "gemm" in symbol:
        return "LoRA matmul"
    if "libtorch" in dso:
        return "torch kernels (casts, checks)"
    if "kernel" in dso:
        return "kernel (copies, I/O)"
    if "libpython" in dso:
        return "interpreter"
    if "libc.so" in dso:
        return "libc (memcpy)"
    return "other"


def record(model: Path, shard: str, cache: Path, out: Path, data: Path) -> float:
    """The merge under ``perf record``; its user + system seconds."""
    shutil.rmtree(out, ignore_errors=True)
    warm_page_cache(model)  # the inputs in the page cache
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(["perf", "record", "-F", "499", "-q", "-o", str(data), "--",
                    *merge_argv(model / "base", model / "adapter", out, shard)],
                   env=dict(os.environ, MERGEFLOW_CACHE=str(cache)), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    shutil.rmtree(out, ignore_errors=True)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def samples(data: Path) -> list[tuple[str, float, str]]:
    """``(pid/tid, time, family)`` of every sample."""
    text = subprocess.run(["perf", "script", "-i", str(data), "-F", "comm,pid,tid,time,ip,sym,dso"],
                          capture_output=True, text=True, check=True).stdout
    found, head = [], None
    for line in text.splitlines():
        if (m := SAMPLE.match(line)) is not None:  # the frame follows on the line (no call
            head = (f"{m.group(2)}/{m.group(3)}", float(m.group(4)))  # graph) or on the next
            line = m.group(5)
        if head is not None and (f := FRAME.match(line)) is not None:
            found.append((*head, family(f.group(1), f.group(2))))
            head = None
    return found


def role(pid: str, main_pid: str, kinds: collections.Counter) -> str:
    """A thread's role, from its process and what it ran most."""
    if pid != main_pid:
        return "layout child (another process)"
    top = kinds.most_common(1)[0][0]
    if top == "sha256":  # a shard's writer copies into its O_DIRECT chunks; an input hasher
        writer = kinds["libc (memcpy)"] >= kinds["kernel (copies, I/O)"]  # reads the file
        return "writer: output sha256" if writer else "input sha256"
    return {"LoRA matmul": "math (merge, then verify)",
            "torch kernels (casts, checks)": "math (merge, then verify)",
            "interpreter": "main (imports, planning)"}.get(top, top)


def report(found: list[tuple[str, float, str]], core_s: float) -> None:
    by_thread: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    span: dict[str, list[float]] = {}
    for thread, when, kind in found:
        by_thread[thread][kind] += 1
        first, last = span.get(thread, (when, when))
        span[thread] = [min(first, when), max(last, when)]
    total = len(found)
    start = min(t for t, _ in span.values())
    main_pid = found[0][0].split("/")[0]
    print(f"{total} samples, {core_s:.1f} core-seconds (user + system)\n")
    print("| thread | role | core-s | share | from - to (s) | what it ran |")
    print("| --- | --- | ---: | ---: | --- | --- |")
    roles: collections.Counter = collections.Counter()
    other = 0
    for thread, kinds in sorted(by_thread.items(), key=lambda kv: -sum(kv[1].values())):
        n = sum(kinds.values())
        name = role(thread.split("/")[0], main_pid, kinds)
        roles[name] += n
        if n < total * 0.01:
            other += n
            continue
        first, last = span[thread]
        ran = ", ".join(f"{k} {100 * v / n:.0f}%" for k, v in kinds.most_common(3))
        print(f"| {thread} | {name} | {core_s * n / total:.2f} | {100 * n / total:.1f}% "
              f"| {first - start:.1f} - {last - start:.1f} | {ran} |")
    if other:
        print(f"| other threads | | {core_s * other / total:.2f} | {100 * other / total:.1f}% | | |")
    families: collections.Counter = collections.Counter(kind for _, _, kind in found)
    print("\n| role | core-s |\n| --- | ---: |")
    for name, n in roles.most_common():
        print(f"| {name} | {core_s * n / total:.2f} |")
    print("\n| what ran | core-s |\n| --- | ---: |")
    for kind, n in families.most_common():
        print(f"| {kind} | {core_s * n / total:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="holds base/ and adapter/")
    parser.add_argument("--max-shard-size", default="1GB")
    parser.add_argument("--layout-cached", action="store_true",
                        help="learn the layout in an untimed merge first")
    args = parser.parse_args()
    if shutil.which("perf") is None:
        raise SystemExit("needs perf (linux-perf)")
    with tempfile.TemporaryDirectory(prefix="mf-threads-") as tmp:
        cache, out, data = Path(tmp) / "cache", Path(tmp) / "out", Path(tmp) / "perf.data"
        if args.layout_cached:
            record(args.model, args.max_shard_size, cache, out, data)
            drop_input_hashes(cache)
        core_s = record(args.model, args.max_shard_size, cache, out, data)
        print(f"{args.model.name}, --max-shard-size {args.max_shard_size}, "
              f"{'layout cached' if args.layout_cached else 'cold (layout learnt)'}, "
              "input hashes not cached\n")
        report(samples(data), core_s)


if __name__ == "__main__":
    main()
