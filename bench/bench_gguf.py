"""GGUF in one step (``--save-method gguf``) against the two-step route: ``mergeflow merge`` to a
16-bit SafeTensors checkpoint, then llama.cpp's converter on it (then, for a k-quant, llama.cpp's
quantizer on the converter's f16 file).

Each step runs as its own process; the figures are wall time, the peak RSS of each process
(``wait4``'s ru_maxrss) and the extra disk each route needs at its peak (the 16-bit checkpoint,
the intermediate f16 GGUF). Both routes use the converter ``scripts/setup --gguf`` installs (the
one in the pinned llama-cpp-python sdist). It does not know the bench's freshly trained
tokenizer by its hash, so the two-step route runs it through a wrapper that names the
pre-tokenizer ("gpt-2", what Mergeflow names it by its regex); nothing else is changed.

    .venv/bin/python bench/bench_gguf.py                          # hidden 1024, 8 layers, f16
    .venv/bin/python bench/bench_gguf.py --hidden 8192 --layers 1 --vocab 128256  # 70B width
    .venv/bin/python bench/bench_gguf.py --gguf-type q4_k_m --hidden 2048 --layers 16
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

WRAPPER = """
import runpy, sys
sys.argv = ['convert_hf_to_gguf', *sys.argv[1:]]
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'gpt-2'
runpy.run_module('convert_hf_to_gguf', run_name='__main__')
"""
QUANTIZE = """
import ctypes, sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, 'LLAMA_FTYPE_MOSTLY_' + sys.argv[3].upper())
params.nthread = len(__import__('os').sched_getaffinity(0))
assert llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(),
                                      ctypes.byref(params)) == 0
"""


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, int]:
    """Run one step; (seconds, peak RSS in MiB)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd[:4]} failed: {proc.stderr.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss // 1024


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() \
        else path.stat().st_size


def build(work: Path, hidden: int, layers: int, vocab: int) -> None:
    """The bench's bf16 Llama base (with a byte-level BPE tokenizer) and a rank-16 adapter."""
    import torch
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from builders import build_adapter, build_base, save_bpe_tokenizer

    base = build_base(work / "base", "llama", tokenizer=False, dtype=torch.bfloat16,
                      hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64,
                      num_key_value_heads=hidden // 256, vocab_size=vocab)
    save_bpe_tokenizer(base, 512)
    build_adapter(base, work / "adapter", r=16, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--gguf-type", default="f16",
                        help="f16, bf16, q8_0 (converter) or a llama.cpp quantizer type")
    parser.add_argument("--no-gguf-check", action="store_true",
                        help="leave out llama.cpp's score of the quantized file (one step)")
    parser.add_argument("--build", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        build(args.build, args.hidden, args.layers, args.vocab)
        return

    work = Path(tempfile.mkdtemp(prefix="bench-gguf-"))
    env = dict(os.environ, PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1")
    base, adapter = work / "base", work / "adapter"
    quantized = args.gguf_type not in ("f16", "bf16", "q8_0")
    outtype = "f16" if quantized else args.gguf_type
    try:
        # built in a child: a process's peak RSS starts at its parent's (kept across fork and
        # exec), so this process never imports torch
        subprocess.run([sys.executable, __file__, "--build", str(work), "--hidden",
                        str(args.hidden), "--layers", str(args.layers), "--vocab",
                        str(args.vocab)], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cli = [sys.executable, "-m", "mergeflow.cli.app", "merge", "--base", str(base),
               "--adapter", str(adapter)]
        one = run([*cli, "--out", str(work / "one"), "--save-method", "gguf",
                   "--gguf-type", args.gguf_type,
                   *(["--no-gguf-check"] if args.no_gguf_check else [])], env)
        one_size = size(work / "one" / f"model-{args.gguf_type}.gguf")
        shutil.rmtree(work / "one")
        merged = work / "merged"
        steps = [run([*cli, "--out", str(merged), "--dtype", "bfloat16"], env)]
        (work / "wrap.py").write_text(WRAPPER)
        steps.append(run([sys.executable, str(work / "wrap.py"), str(merged), "--outtype",
                          outtype, "--outfile", str(work / "two.gguf")], env))
        extra = size(merged) + (size(work / "two.gguf") if quantized else 0)
        if quantized:
            (work / "quantize.py").write_text(QUANTIZE)
            steps.append(run([sys.executable, str(work / "quantize.py"), str(work / "two.gguf"),
                              str(work / "two-q.gguf"), args.gguf_type], env))
        # ours writes the same intermediate f16 GGUF as the converter's (then deletes it)
        one_extra = size(work / "two.gguf") if quantized else 0
        two_time, two_rss = sum(t for t, _ in steps), max(r for _, r in steps)
        print(f"model: llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, "
              f"bf16 base {size(base) / 1e6:.0f} MB, GGUF {args.gguf_type} {one_size / 1e6:.0f} MB")
        print(f"one step  (merge --save-method gguf): {one[0]:6.1f} s, peak RSS {one[1]:5d} MiB, "
              f"extra disk {one_extra / 1e6:.0f} MB (the intermediate 16-bit GGUF)")
        print(f"two steps (merge, convert{', quantize' if quantized else ''}): {two_time:6.1f} s "
              f"({' + '.join(f'{t:.1f}' for t, _ in steps)}), peak RSS {two_rss:5d} MiB "
              f"({', '.join(str(r) for _, r in steps)}), extra disk {extra / 1e6:.0f} MB")
        print(f"ratios one/two: time {one[0] / two_time:.2f}x, peak RSS {one[1] / two_rss:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
