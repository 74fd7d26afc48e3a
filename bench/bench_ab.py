"""Benchmark: one change, paired. Two source trees of Mergeflow (``--a``, ``--b``: e.g. a
``git archive`` of the commit before and of the commit) run the same CLI merge in turn, in fresh
processes, ``--pairs`` times, and the medians and the median of the per-pair ratios are printed.

    python bench/bench_ab.py --model /tmp/mf-bench/models/3.6b --max-shard-size 20GB \
        --a /tmp/snap-before --b /tmp/snap-after --pairs 3

Each merge starts with its inputs in the page cache and an empty hash cache (so the inputs are
hashed, as on a first merge), with the base's layout cached (learnt once before the pairs, so
both routes skip it); with ``--cold``, an empty cache folder every time, so each merge learns the
layout too, as a first merge of a new base does. The model folder is one
``bench_merge.py`` built (``base/`` and ``adapter/``). Wall time and the merge phase's own time
(the CLI's "wrote ... in N s" line) are both reported; user and system CPU come from
``/usr/bin/time``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
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

TIME = re.compile(r"TIME wall ([\d.]+) user ([\d.]+) sys ([\d.]+) rss (\d+)")
WROTE = re.compile(r"wrote .* in ([\d.]+) s")


def merge(src: Path, model: Path, out: Path, cache: Path, shard: str,
          cold: bool = False, extra: tuple[str, ...] = ()) -> dict[str, float]:
    """One CLI merge with ``src`` on the path; its times and peak RSS. ``cold``: with an empty
    cache (the layout learnt again), else with only the input hashes dropped. ``extra``: more
    CLI flags."""
    shutil.rmtree(out, ignore_errors=True)
    if cold:
        shutil.rmtree(cache, ignore_errors=True)
    drop_input_hashes(cache)  # the inputs are hashed again
    warm_page_cache(model)
    env = dict(os.environ, PYTHONPATH=str(src), MERGEFLOW_CACHE=str(cache))
    cmd = ["/usr/bin/time", "-f", "TIME wall %e user %U sys %S rss %M",
           *merge_argv(model / "base", model / "adapter", out, shard, *extra)]
    # cwd: a neutral folder. `python -m` puts its working folder first on sys.path, before
    # PYTHONPATH: run from the repository, both sides would import the repository's tree.
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True,
                          cwd=out.parent)
    text = proc.stdout + proc.stderr
    wall, user, sys_s, rss = TIME.search(text).groups()
    wrote = WROTE.search(text)
    return {"wall_s": float(wall), "merge_s": float(wrote.group(1)) if wrote else float("nan"),
            "cpu_s": float(user) + float(sys_s), "rss_gib": int(rss) / 2**20}


def check_imports(src: Path, folder: Path) -> None:
    """Exit unless a merge run as :func:`merge` runs it imports the ``mergeflow`` in ``src``."""
    found = subprocess.run([sys.executable, "-c", "import mergeflow; print(mergeflow.__file__)"],
                           env=dict(os.environ, PYTHONPATH=str(src)), capture_output=True,
                           text=True, check=True, cwd=folder).stdout.strip()
    if not Path(found).resolve().is_relative_to(src.resolve()):
        sys.exit(f"{src}: the merges would import {found}, not this tree")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="holds base/ and adapter/")
    parser.add_argument("--a", type=Path, required=True, help="the source tree before")
    parser.add_argument("--b", type=Path, required=True, help="the source tree after")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--max-shard-size", default="1GB")
    parser.add_argument("--cold", action="store_true",
                        help="an empty cache for every merge: the layout is learnt every time")
    parser.add_argument("--no-verify", action="store_true",
                        help="merge with --no-verify (e.g. b writes knowingly wrong bytes to "
                             "bound a cost from above)")
    args = parser.parse_args()
    extra = ("--no-verify",) if args.no_verify else ()
    runs: dict[str, list[dict[str, float]]] = {"a": [], "b": []}
    with tempfile.TemporaryDirectory(prefix="mf-ab-") as tmp:
        cache, out = Path(tmp) / "cache", Path(tmp) / "out"
        for src in (args.a, args.b):
            check_imports(src, Path(tmp))
        merge(args.b, args.model, out, cache, args.max_shard_size, extra=extra)  # the layout
        for _ in range(args.pairs):
            for route, src in (("a", args.a), ("b", args.b)):
                runs[route].append(merge(src, args.model, out, cache, args.max_shard_size,
                                         args.cold, extra))
                print(route, runs[route][-1], flush=True)
    print(f"\n{args.model.name}, --max-shard-size {args.max_shard_size}, {args.pairs} pairs, "
          f"{'cold (layout learnt every time)' if args.cold else 'layout cached'}, "
          "medians (b / a: median of the per-pair ratios)\n")
    print("| measure | a | b | b / a |")
    print("| --- | ---: | ---: | ---: |")
    for key, unit in (("wall_s", "s"), ("merge_s", "s"), ("cpu_s", "s"), ("rss_gib", "GiB")):
        a = statistics.median(r[key] for r in runs["a"])
        b = statistics.median(r[key] for r in runs["b"])
        ratio = statistics.median(rb[key] / ra[key] for ra, rb in zip(runs["a"], runs["b"], strict=True))
        print(f"| {key} | {a:.2f} {unit} | {b:.2f} {unit} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
