"""``--save-method fp8`` against llm-compressor itself: the same bytes as its data-free oneshot.

llm-compressor pins another transformers than this project, so it runs from a venv of its own,
made once (``--make-venv``: ``python -m venv`` + ``pip install llmcompressor``; it needs the
package registry). The check builds a tiny bf16 Llama and a PEFT adapter here, merges them with
PEFT (float32, rounded once to bf16) for llm-compressor, runs ``oneshot`` with
``QuantizationModifier(targets="Linear", scheme=FP8_DYNAMIC | FP8_BLOCK, ignore=["lm_head"])``
in that venv, and compares every tensor's bytes and the ``quantization_config`` with
Mergeflow's output of the same merge. Exit status 1 on any difference.

    .venv/bin/python bench/check_llmcompressor.py --make-venv /tmp/llmc
    .venv/bin/python bench/check_llmcompressor.py --llmc-python /tmp/llmc/bin/python
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ONESHOT = """
import sys, torch
from transformers import AutoModelForCausalLM
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
merged, out, preset = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.bfloat16)
oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme=preset, ignore=["lm_head"]))
model.save_pretrained(out, save_compressed=True)
"""
SCHEMES = {"channel": "FP8_DYNAMIC", "block": "FP8_BLOCK"}


def build(work: Path) -> tuple[Path, Path]:
    """A bf16 Llama (hidden 256, 2 layers), an adapter on five projections, PEFT's merge."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from builders import build_adapter, build_base

    base = build_base(work / "base", dtype=torch.bfloat16, hidden_size=256,
                      intermediate_size=384, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=320)
    adapter = build_adapter(base, work / "adapter", target_modules=[
        "q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"])
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload().to(torch.bfloat16)
    merged.save_pretrained(work / "merged")
    return base, adapter


def differences(ours: Path, theirs: Path) -> list[str]:
    """Every tensor or config difference between two FP8 folders, one line each."""
    import torch
    from safetensors.torch import load_file

    a, b = load_file(ours / "model.safetensors"), load_file(theirs / "model.safetensors")
    found = [f"tensor sets differ: {sorted(set(a) ^ set(b))[:5]}"] if set(a) != set(b) else []
    for name in sorted(set(a) & set(b)):
        x, y = a[name], b[name]
        if x.dtype != y.dtype or x.shape != y.shape:
            found.append(f"{name}: {x.dtype}{list(x.shape)} against {y.dtype}{list(y.shape)}")
        elif not torch.equal(x.view(torch.uint8), y.view(torch.uint8)):
            found.append(f"{name}: {(x.view(torch.uint8) != y.view(torch.uint8)).float().mean():.4%}"
                         " of the values differ")
    qa, qb = (_set_fields(json.loads((f / "config.json").read_text())["quantization_config"])
              for f in (ours, theirs))
    if qa != qb:
        found.append(f"quantization_config differs: {json.dumps(qa)} against {json.dumps(qb)}")
    return found


def _set_fields(config: object) -> object:
    """A config without its version and the fields left at None (one compressed-tensors version
    writes them, the next leaves them out), for comparing meaning."""
    if isinstance(config, dict):
        return {k: _set_fields(v) for k, v in config.items()
                if v is not None and v != {} and k not in ("version", "observer", "observer_kwargs")}
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--llmc-python", type=Path, help="python of a venv with llmcompressor")
    parser.add_argument("--make-venv", type=Path, help="create that venv here and exit")
    args = parser.parse_args()
    if args.make_venv:
        subprocess.run([sys.executable, "-m", "venv", str(args.make_venv)], check=True)
        subprocess.run([str(args.make_venv / "bin" / "pip"), "install", "-q", "llmcompressor"],
                       check=True)
        return
    if args.llmc_python is None:
        parser.error("--llmc-python is required (make the venv with --make-venv first)")
    import mergeflow

    work = Path(tempfile.mkdtemp(prefix="check-llmc-"))
    base, adapter = build(work)
    (work / "oneshot.py").write_text(ONESHOT)
    failed = False
    for scheme, preset in SCHEMES.items():
        mergeflow.merge(base, adapter, work / f"mergeflow-{scheme}", save_method="fp8",
                        fp8_scheme=scheme)
        subprocess.run([str(args.llmc_python), str(work / "oneshot.py"), str(work / "merged"),
                        str(work / f"llmc-{scheme}"), preset], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        found = differences(work / f"mergeflow-{scheme}", work / f"llmc-{scheme}")
        print(f"{preset}: " + ("the same bytes and quantization_config as llm-compressor"
                               if not found else "; ".join(found)))
        failed |= bool(found)
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
