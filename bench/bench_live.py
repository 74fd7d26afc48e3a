"""Benchmark: ``mergeflow.save_pretrained_merged`` on a live PeftModel against PEFT's
``merge_and_unload().save_pretrained()`` on the same live model (issue 13).

    python bench/bench_live.py --workdir /tmp/mf-live            # bf16 base and 4-bit base
    python bench/bench_live.py --hidden 512 --layers 2 --vocab 8000   # quick check

Each route runs in a fresh process of its own: it builds the live model (a random Llama in
bf16 - ``--hidden`` / ``--intermediate`` / ``--layers`` / ``--vocab`` - with an r=16 LoRA on
q,k,v,o,gate,up,down, ``init_lora_weights=False``), then measures the one call that saves the
merge. The live model's weights are made resident first (cloned out of the mmapped checkpoint,
as after training). Peak memory is the process's RSS sampled every 2 ms during the call, minus
its RSS just before (the live model, which every route holds anyway): "extra peak"; and the
same for anonymous pages alone (RSS minus file-backed pages: what the process really needs;
file pages of mmapped outputs can be dropped by the kernel). Routes:

* ``mergeflow-memory``: ``save_pretrained_merged(model, out, base="memory")``: the in-memory
  route (the base spilled, in its stored form, to ``temporary_location``, then the streaming
  merge); the spill's bytes are reported;
* ``mergeflow-disk``: the base loaded from its saved folder, ``save_pretrained_merged(model, out)``
  (read from the files after the check against the live weights);
* ``peft``: ``model.merge_and_unload().save_pretrained(out)`` (merges into the live model, which
  is no longer a PeftModel afterwards).

With ``--bits 4`` (run by default after the bf16 case), the live base is the same model quantized
to nf4 at load (``BitsAndBytesConfig``, CPU) and the output is 16-bit: mergeflow's
``merged_16bit`` against PEFT's ``merge_and_unload()`` (dequantize, add, re-quantize per layer),
``dequantize()`` (the whole model back to 16 bits in memory) and ``save_pretrained``.

Wall times are printed too, but this machine is shared: read them as rough.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def memory() -> tuple[int, int]:
    """(RSS, anonymous RSS) of this process: resident pages, and those not backed by a file
    (file-backed pages - mmapped checkpoints - can be dropped by the kernel at any time)."""
    with open("/proc/self/statm") as f:
        fields = f.read().split()
    page = os.sysconf("SC_PAGE_SIZE")
    return int(fields[1]) * page, (int(fields[1]) - int(fields[2])) * page


class PeakSampler:
    """The largest RSS and anonymous RSS seen while the context is open (every 2 ms)."""

    def __enter__(self) -> PeakSampler:
        self.start = memory()
        self.peak = list(self.start)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        now = memory()
        self.peak = [max(a, b) for a, b in zip(self.peak, now, strict=True)]

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self._sample()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def build_base(args, folder: Path) -> Path:
    """The random bf16 base, saved once (the disk route and the 4-bit route load it)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 128,
                         num_key_value_heads=max(1, args.hidden // 512), vocab_size=args.vocab,
                         tie_word_embeddings=False, max_position_embeddings=256)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from builders import save_tokenizer

    save_tokenizer(folder, 128)
    return folder


def live_model(base: Path, bits: int):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if bits == 4:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(base, quantization_config=quant,
                                                     device_map="cpu", dtype=torch.bfloat16)
    else:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    with torch.no_grad():  # resident, as after training (not pages of the mmapped checkpoint)
        for param in model.parameters():
            if param.is_floating_point():
                param.data = param.data.clone()
    torch.manual_seed(1)
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS,
                                            init_lora_weights=False))


def run_route(route: str, base: Path, out: Path, bits: int) -> dict:
    """One route in this process: build the live model, then measure the save call."""
    import mergeflow

    model = live_model(base, bits)
    if route == "mergeflow-memory":
        model.get_base_model().name_or_path = ""  # as if built in memory: nothing on disk
    tmp = out.parent / f"{out.name}-tmp"
    spilled = {"bytes": 0}

    def watch_spill(stop: threading.Event) -> None:
        while not stop.wait(0.05):
            if tmp.exists():
                spilled["bytes"] = max(spilled["bytes"], folder_bytes(tmp))

    stop = threading.Event()
    watcher = threading.Thread(target=watch_spill, args=(stop,), daemon=True)
    watcher.start()
    start = time.perf_counter()
    with PeakSampler() as sampler:
        if route.startswith("mergeflow"):
            report = mergeflow.save_pretrained_merged(
                model, out, save_method="merged_16bit", temporary_location=tmp,
                base="memory" if route == "mergeflow-memory" else None, workers=1)
            notes = report.notes
        elif bits == 4:
            model.merge_and_unload().dequantize().save_pretrained(out)
            notes = []
        else:
            model.merge_and_unload().save_pretrained(out)
            notes = []
    wall = time.perf_counter() - start
    stop.set()
    watcher.join()
    return {"route": route, "bits": bits, "live_rss": sampler.start[0],
            "extra_peak": sampler.peak[0] - sampler.start[0],
            "extra_peak_anon": sampler.peak[1] - sampler.start[1], "wall_s": wall,
            "output_bytes": folder_bytes(out), "spill_bytes": spilled["bytes"], "notes": notes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mf-live-bench"))
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--bits", type=int, choices=[0, 4], default=None,
                        help="0: the bf16 base only; 4: the 4-bit base only (default: both)")
    parser.add_argument("--route", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    base = args.workdir / f"base-{args.hidden}x{args.layers}-{args.vocab}"
    if args.route:  # a child process: one route, its result as JSON on the last line
        print(json.dumps(run_route(args.route, base, args.out, args.bits or 0)))
        return
    build_base(args, base)
    print(f"base: {base} ({folder_bytes(base) / 1e9:.2f} GB bf16)")
    results = []
    for bits in ([args.bits] if args.bits is not None else [0, 4]):
        routes = ["mergeflow-memory", "peft"] + (["mergeflow-disk"] if bits == 0 else [])
        for route in routes:
            out = args.workdir / f"out-{route}-{bits}"
            subprocess.run(["rm", "-rf", str(out), f"{out}-tmp"], check=True)
            cmd = [sys.executable, __file__, "--workdir", str(args.workdir), "--hidden",
                   str(args.hidden), "--intermediate", str(args.intermediate), "--layers",
                   str(args.layers), "--vocab", str(args.vocab), "--route", route, "--out",
                   str(out), "--bits", str(bits)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False,
                                  env=dict(os.environ, PYTHONPATH=str(REPO)))
            if done.returncode != 0:
                sys.exit(f"{route} failed:\n{done.stderr[-4000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            results.append(result)
            mib, gb = 2**20, 1e9
            print(f"{'4-bit' if bits else 'bf16 '} {route:17s} "
                  f"live model {result['live_rss'] / mib:7.0f} MiB  "
                  f"extra peak {result['extra_peak'] / mib:6.0f} MiB "
                  f"(anon {result['extra_peak_anon'] / mib:6.0f})  "
                  f"wall {result['wall_s']:6.1f} s  output {result['output_bytes'] / gb:.2f} GB  "
                  f"spill {result['spill_bytes'] / gb:.2f} GB")
        by = {r["route"]: r for r in results if r["bits"] == bits}
        for key in ("extra_peak", "extra_peak_anon"):
            ratio = by["peft"][key] / max(1, by["mergeflow-memory"][key])
            print(f"  {key}, peft / mergeflow-memory: {ratio:.1f}x")
    (args.workdir / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
