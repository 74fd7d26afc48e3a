"""Several adapters of one base: one batch (``mergeflow merge --adapter A1 ... --adapter AN``)
against N single merges run one after another, and ``cp`` of the base N times for scale.

Each route runs as its own process (the singles: one process each, summed), with the page
cache dropped of the base first where the machine allows it (``--cold``, root only), else warm
for both; the figures are wall time and peak RSS (``wait4``'s ru_maxrss; for the singles, the
largest). A random bf16 Llama and N rank-16 LoRA adapters on every linear layer.

    .venv/bin/python bench/bench_many.py --adapters 4 [--hidden 2048 --layers 16] [--cold]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_gguf import run  # one process: wall seconds and peak RSS (MiB)


def drop_cache(cold: bool) -> None:
    if cold:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def build(work: Path, hidden: int, layers: int, adapters: int) -> None:
    import torch
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from builders import build_adapter, build_base

    base = build_base(work / "base", "llama", dtype=torch.bfloat16, hidden_size=hidden,
                      intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 256,
                      vocab_size=32000, max_shard_size="1GB")
    for i in range(adapters):
        build_adapter(base, work / f"adapter-{i}", seed=i, r=16, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--cold", action="store_true", help="drop the page cache before each "
                        "route (root only)")
    parser.add_argument("--build", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        build(args.build, args.hidden, args.layers, args.adapters)
        return
    work = Path(tempfile.mkdtemp(prefix="bench-many-"))
    env = dict(os.environ, PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1")
    try:
        subprocess.run([sys.executable, __file__, "--build", str(work), "--hidden",
                        str(args.hidden), "--layers", str(args.layers), "--adapters",
                        str(args.adapters)], env=env, check=True, stdout=subprocess.DEVNULL)
        base = work / "base"
        adapters = [work / f"adapter-{i}" for i in range(args.adapters)]
        cli = [sys.executable, "-m", "mergeflow.cli.app", "merge", "--base", str(base)]
        drop_cache(args.cold)
        batch = run([*cli, "--out", str(work / "batch"),
                     *[a for adapter in adapters for a in ("--adapter", str(adapter))]], env)
        shutil.rmtree(work / "batch")
        drop_cache(args.cold)
        singles = [run([*cli, "--adapter", str(adapter), "--out", str(work / f"single-{i}")],
                       env) for i, adapter in enumerate(adapters)]
        for i in range(args.adapters):
            shutil.rmtree(work / f"single-{i}")
        drop_cache(args.cold)
        start = time.monotonic()
        for i in range(args.adapters):
            shutil.copytree(base, work / f"copy-{i}")
        os.sync()
        copy = time.monotonic() - start
        size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
        single_time = sum(t for t, _ in singles)
        print(f"model: llama hidden {args.hidden}, {args.layers} layers, base {size / 1e9:.2f} "
              f"GB bf16, {args.adapters} adapters, page cache {'cold' if args.cold else 'warm'}")
        print(f"batch (one sweep):        {batch[0]:6.1f} s, peak RSS {batch[1]:5d} MiB")
        print(f"{args.adapters} single merges:        {single_time:6.1f} s "
              f"({', '.join(f'{t:.1f}' for t, _ in singles)}), peak RSS "
              f"{max(r for _, r in singles):5d} MiB")
        print(f"cp of the base x{args.adapters} + sync: {copy:6.1f} s")
        print(f"ratios: batch / singles time {batch[0] / single_time:.2f}x, peak RSS "
              f"{batch[1] / max(r for _, r in singles):.2f}x; batch / cp {batch[0] / copy:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
