"""Build the demo's inputs: a small Llama-architecture model and a DoRA adapter, both random."""

import sys
from pathlib import Path

import quiet  # noqa: F401  (first: it silences the libraries below)
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # tests/builders.py
from builders import build_adapter, build_base

work = Path(sys.argv[1] if len(sys.argv) > 1 else "demo-out")
if not (work / "base" / "config.json").is_file():
    print(f"building a small Llama model in {work}/base ...")
    build_base(work / "base", "llama", dtype=torch.bfloat16, hidden_size=512,
               intermediate_size=1376, num_hidden_layers=4, vocab_size=4096)
if not (work / "adapter" / "adapter_config.json").is_file():
    print(f"building a LoRA adapter in {work}/adapter ...")
    build_adapter(work / "base", work / "adapter", r=8, lora_alpha=16, save_tokenizer_too=True,
                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                  "down_proj"])
