"""Several adapters of one base: one batch (``mergeflow merge --adapter A1 ... --adapter AN``)
against N single merges run one after another, N PEFT ``merge_and_unload`` runs
(``bench/peft_merge.py``, ``--peft``) and ``cp`` of the base N times + ``sync``, for scale.

Each route runs as its own process (the singles and PEFT runs: one process each, summed), the
routes of one repeat back to back (paired, so the shared machine's noise hits them alike), with
the page cache dropped of everything before each route where the machine allows it (``--cold``,
root only; the base is then read from the disk once per route), else warm. Figures: wall time and
peak RSS (``wait4``'s ru_maxrss; for N processes, the largest); medians over ``--repeats``, and
for the ratios the median of the per-repeat ratios. A random bf16 Llama and N rank-16 LoRA
adapters on every linear layer.

    .venv/bin/python bench/bench_many.py --adapters 1 2 4 8 --repeats 3 --peft [--cold]
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

from bench_gguf import run  # one process: wall seconds and peak RSS (MiB)

BENCH = Path(__file__).resolve().parent


def drop_cache(cold: bool) -> None:
    if cold:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def build(work: Path, hidden: int, layers: int, adapters: int) -> None:
    import torch
    sys.path.insert(0, str(BENCH.parent / "tests"))
    from builders import build_adapter, build_base

    base = build_base(work / "base", "llama", dtype=torch.bfloat16, hidden_size=hidden,
                      intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 256,
                      vocab_size=32000, max_shard_size="1GB")
    for i in range(adapters):
        build_adapter(base, work / f"adapter-{i}", seed=i, r=16, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def sequence(cmds: list[list[str]], env: dict[str, str], cold: bool, outs: list[Path]
             ) -> tuple[float, int]:
    """Run the commands one after another (the page cache dropped first); total seconds and the
    largest peak RSS; their outputs are removed afterwards."""
    drop_cache(cold)
    runs = [run(cmd, env) for cmd in cmds]
    for out in outs:
        shutil.rmtree(out, ignore_errors=True)
    return sum(t for t, _ in runs), max(r for _, r in runs)


def one_repeat(work: Path, n: int, env: dict[str, str], cold: bool, peft: bool
               ) -> dict[str, tuple[float, int]]:
    """Every route once for N adapters: name -> (seconds, peak RSS MiB)."""
    base = work / "base"
    adapters = [work / f"adapter-{i}" for i in range(n)]
    cli = [sys.executable, "-m", "mergeflow.cli.app", "merge", "--base", str(base)]
    got = {"batch": sequence([[*cli, "--out", str(work / "batch"),
                               *[a for ad in adapters for a in ("--adapter", str(ad))]]],
                             env, cold, [work / "batch"])}
    outs = [work / f"single-{i}" for i in range(n)]
    got["singles"] = sequence([[*cli, "--adapter", str(ad), "--out", str(out)]
                               for ad, out in zip(adapters, outs, strict=True)], env, cold, outs)
    if peft:
        outs = [work / f"peft-{i}" for i in range(n)]
        got["peft"] = sequence([[sys.executable, str(BENCH / "peft_merge.py"), str(base),
                                 str(ad), str(out), "--max-shard-size", "5GB"]
                                for ad, out in zip(adapters, outs, strict=True)], env, cold, outs)
    drop_cache(cold)
    start = time.monotonic()
    for i in range(n):
        shutil.copytree(base, work / f"copy-{i}")
    os.sync()
    got["cp"] = (time.monotonic() - start, 0)
    for i in range(n):
        shutil.rmtree(work / f"copy-{i}")
    return got


def report(n: int, runs: list[dict[str, tuple[float, int]]]) -> None:
    """Print the medians and the median per-repeat ratios of one N."""
    def median(route: str, k: int) -> float:
        return statistics.median(r[route][k] for r in runs)

    def ratio(route: str, k: int) -> float:
        return statistics.median(r["batch"][k] / r[route][k] for r in runs)

    line = [f"N={n}: batch {median('batch', 0):.1f} s {median('batch', 1):.0f} MiB",
            f"singles {median('singles', 0):.1f} s {median('singles', 1):.0f} MiB"]
    if "peft" in runs[0]:
        line.append(f"PEFT {median('peft', 0):.1f} s {median('peft', 1):.0f} MiB")
    line.append(f"cp+sync {median('cp', 0):.1f} s")
    print(" | ".join(line))
    ratios = [f"batch/singles time {ratio('singles', 0):.2f}x RSS {ratio('singles', 1):.2f}x"]
    if "peft" in runs[0]:
        ratios.append(f"batch/PEFT time {ratio('peft', 0):.2f}x RSS {ratio('peft', 1):.2f}x")
    ratios.append(f"cp/batch throughput {statistics.median(r['cp'][0] / r['batch'][0] for r in runs):.2f}x")
    print("    " + ", ".join(ratios), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapters", type=int, nargs="+", default=[4], help="values of N")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peft", action="store_true", help="also N PEFT merge_and_unload runs")
    parser.add_argument("--cold", action="store_true", help="drop the page cache before each "
                        "route (root only)")
    parser.add_argument("--build", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    most = max(args.adapters)
    if args.build:
        build(args.build, args.hidden, args.layers, most)
        return
    work = Path(tempfile.mkdtemp(prefix="bench-many-"))
    env = dict(os.environ, PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1")
    try:
        subprocess.run([sys.executable, __file__, "--build", str(work), "--hidden",
                        str(args.hidden), "--layers", str(args.layers), "--adapters", str(most)],
                       env=env, check=True, stdout=subprocess.DEVNULL)
        size = sum(p.stat().st_size for p in (work / "base").glob("*.safetensors"))
        print(f"model: llama hidden {args.hidden}, {args.layers} layers, base {size / 1e9:.2f} GB "
              f"bf16; page cache {'cold' if args.cold else 'warm'}; medians of {args.repeats}")
        for n in args.adapters:
            report(n, [one_repeat(work, n, env, args.cold, args.peft)
                       for _ in range(args.repeats)])
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
