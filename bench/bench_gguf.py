"""GGUF in one step (``--save-method gguf``) against the two-step route: ``mergeflow merge`` to a
16-bit SafeTensors checkpoint, then llama.cpp's ``convert_hf_to_gguf.py`` on it.

Each step runs as its own process; the figures are wall time, the peak RSS of each process
(``wait4``'s ru_maxrss) and the extra disk the route needs (the 16-bit checkpoint). The converter
is the one vendored in the llama-cpp-python sdist (``--converter``: its convert_hf_to_gguf.py,
next to its ``conversion/`` and ``gguf-py/``). It does not know the bench's freshly trained
tokenizer by its hash, so it runs through a wrapper that names the pre-tokenizer ("gpt-2", what
Mergeflow writes for it) and says there is no tokenizer.model (so that the converter does not
need sentencepiece); nothing else in the converter is changed.

    PYTHONPATH=$PWD .venv/bin/python bench/bench_gguf.py --converter /path/to/convert_hf_to_gguf.py
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
sys.argv = sys.argv[1:]
here = sys.argv[0].rsplit('/', 1)[0]
sys.path[:0] = [here, here + '/gguf-py']  # the converter's own gguf, as it uses it
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'gpt-2'
def no_spm(self):  # there is no tokenizer.model; without sentencepiece installed it would fail
    raise FileNotFoundError('tokenizer.model')
base.TextModel._create_vocab_sentencepiece = no_spm
runpy.run_path(sys.argv[0], run_name='__main__')
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
    parser.add_argument("--converter", required=True, type=Path)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--gguf-type", default="f16", choices=["f16", "bf16", "q8_0"])
    parser.add_argument("--build", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        build(args.build, args.hidden, args.layers, args.vocab)
        return

    work = Path(tempfile.mkdtemp(prefix="bench-gguf-"))
    env = dict(os.environ, PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1")
    base, adapter = work / "base", work / "adapter"
    try:
        # built in a child: a process's peak RSS starts at its parent's (kept across fork and
        # exec), so this process never imports torch
        subprocess.run([sys.executable, __file__, "--build", str(work), "--converter", "-",
                        "--hidden", str(args.hidden), "--layers", str(args.layers),
                        "--vocab", str(args.vocab)], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cli = [sys.executable, "-m", "mergeflow.cli.app", "merge", "--base", str(base),
               "--adapter", str(adapter)]
        one = run([*cli, "--out", str(work / "one"), "--save-method", "gguf",
                   "--gguf-type", args.gguf_type], env)
        merged = work / "merged"
        merge = run([*cli, "--out", str(merged), "--dtype", "bfloat16"], env)
        wrapper = work / "wrap.py"
        wrapper.write_text(WRAPPER)
        convert = run([sys.executable, str(wrapper), str(args.converter), str(merged),
                       "--outtype", args.gguf_type, "--outfile", str(work / "two.gguf")], env)
        one_size = size(work / "one" / f"model-{args.gguf_type}.gguf")
        print(f"model: llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, "
              f"bf16 base {size(base) / 1e6:.0f} MB, GGUF {args.gguf_type} {one_size / 1e6:.0f} MB")
        print(f"one step  (merge --save-method gguf): {one[0]:6.1f} s, peak RSS {one[1]:5d} MiB, "
              "extra disk 0 MB")
        print(f"two steps (merge, then convert):      {merge[0] + convert[0]:6.1f} s "
              f"({merge[0]:.1f} + {convert[0]:.1f}), peak RSS {max(merge[1], convert[1]):5d} MiB "
              f"(merge {merge[1]}, convert {convert[1]}), extra disk {size(merged) / 1e6:.0f} MB")
        print(f"ratios two/one: time {(merge[0] + convert[0]) / one[0]:.2f}x, "
              f"peak RSS {max(merge[1], convert[1]) / one[1]:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
