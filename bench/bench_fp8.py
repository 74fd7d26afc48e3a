"""FP8 export (``--save-method fp8``) against the peer's route and ``cp``.

The peer is what llm-compressor's data-free ``FP8_DYNAMIC`` oneshot does on a merged model, run
with the same libraries it runs: PEFT's ``merge_and_unload`` on the whole model, then
compressed-tensors' scheme, weight scales from each weight's range and its ``ModelCompressor``,
then ``save_pretrained`` (llm-compressor itself pins an older transformers than this project, so
it cannot share the venv; its FP8_DYNAMIC path adds no math to these calls). ``cp`` is the base's
weights copied and synced: the floor any route pays to read and write the bytes.

Each route runs as its own process, ``--runs`` times in turn (paired); the figures are medians of
wall time and peak RSS (``wait4``'s ru_maxrss). ``--fp8-base`` also times merging an FP8 base
(block-wise, built from the same weights) to ``merged_16bit`` against transformers' dequantizing
load plus PEFT's merge and save.

    .venv/bin/python bench/bench_fp8.py                              # hidden 1024, 8 layers
    .venv/bin/python bench/bench_fp8.py --hidden 2048 --layers 16 --runs 3 --fp8-base
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gguf import run  # one route timed: its seconds and peak RSS

TESTS = str(Path(__file__).resolve().parent.parent / "tests")
PEER_EXPORT = f"""
import sys, torch
sys.path.insert(0, {TESTS!r})
from builders import save_compressed_tensors
from peft import PeftModel
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
merged = PeftModel.from_pretrained(model, sys.argv[2]).merge_and_unload()
save_compressed_tensors(merged, sys.argv[3])
"""
PEER_FP8_BASE = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, FineGrainedFP8Config
model = AutoModelForCausalLM.from_pretrained(
    sys.argv[1], dtype=torch.bfloat16, quantization_config=FineGrainedFP8Config(dequantize=True))
PeftModel.from_pretrained(model, sys.argv[2]).merge_and_unload().save_pretrained(sys.argv[3])
"""


def build(work: Path, hidden: int, layers: int, vocab: int, fp8_base: bool) -> None:
    """The bench's bf16 Llama base, a rank-16 adapter on every projection, and (``fp8_base``)
    the base in block-wise FP8."""
    import torch

    sys.path.insert(0, TESTS)
    from builders import build_adapter, build_base, build_fp8_base

    base = build_base(work / "base", "llama", dtype=torch.bfloat16, hidden_size=hidden,
                      intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 256,
                      vocab_size=vocab)
    build_adapter(base, work / "adapter", r=16, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    if fp8_base:
        build_fp8_base(base, work / "fp8-base", layout="block")


def routes(work: Path, fp8_base: bool) -> dict[str, list[str]]:
    """Each route's command, by name."""
    (work / "peer_export.py").write_text(PEER_EXPORT)
    (work / "peer_fp8_base.py").write_text(PEER_FP8_BASE)
    cli = [sys.executable, "-m", "mergeflow.cli.app", "merge", "--adapter", str(work / "adapter")]
    weights = str(work / "base" / "model.safetensors")
    out = {
        "mergeflow fp8": [*cli, "--base", str(work / "base"), "--out", str(work / "out"),
                          "--save-method", "fp8"],
        "PEFT merge + compressed-tensors": [sys.executable, str(work / "peer_export.py"),
                                            str(work / "base"), str(work / "adapter"),
                                            str(work / "out")],
        "cp + sync": ["sh", "-c", f"mkdir -p {work / 'out'} && cp {weights} {work / 'out'} && sync"],
    }
    if fp8_base:
        out["mergeflow fp8 base -> 16-bit"] = [*cli, "--base", str(work / "fp8-base"),
                                               "--out", str(work / "out")]
        out["transformers dequantize + PEFT merge"] = [
            sys.executable, str(work / "peer_fp8_base.py"), str(work / "fp8-base"),
            str(work / "adapter"), str(work / "out")]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--fp8-base", action="store_true")
    parser.add_argument("--build", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        build(args.build, args.hidden, args.layers, args.vocab, args.fp8_base)
        return
    work = Path(tempfile.mkdtemp(prefix="bench-fp8-"))
    env = dict(os.environ, PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1")
    try:
        # built in a child: a process's peak RSS starts at its parent's
        subprocess.run([sys.executable, __file__, "--build", str(work), "--hidden",
                        str(args.hidden), "--layers", str(args.layers), "--vocab", str(args.vocab),
                        *(["--fp8-base"] if args.fp8_base else [])], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        commands = routes(work, args.fp8_base)
        results: dict[str, list[tuple[float, int]]] = {name: [] for name in commands}
        for _ in range(args.runs):  # paired: every route once per round
            for name, cmd in commands.items():
                shutil.rmtree(work / "out", ignore_errors=True)
                results[name].append(run(cmd, env))
        size = (work / "base" / "model.safetensors").stat().st_size
        print(f"model: llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, "
              f"bf16 weights {size / 1e6:.0f} MB; medians of {args.runs} paired runs")
        med = {n: (statistics.median(t for t, _ in r), statistics.median(m for _, m in r))
               for n, r in results.items()}
        for name, (seconds, rss) in med.items():
            print(f"  {name:38s} {seconds:7.2f} s   peak RSS {rss:6d} MiB")
        ours, peer, floor = (med["mergeflow fp8"], med["PEFT merge + compressed-tensors"],
                             med["cp + sync"])
        print(f"fp8 export: time {ours[0] / peer[0]:.2f}x the peer's, {ours[0] / floor[0]:.2f}x "
              f"cp's; peak RSS {ours[1] / peer[1]:.2f}x the peer's")
        if args.fp8_base:
            ours, peer = (med["mergeflow fp8 base -> 16-bit"],
                          med["transformers dequantize + PEFT merge"])
            print(f"fp8 base: time {ours[0] / peer[0]:.2f}x the peer's, peak RSS "
                  f"{ours[1] / peer[1]:.2f}x the peer's")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
