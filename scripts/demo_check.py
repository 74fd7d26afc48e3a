"""Check the demo's merged model against the live adapter, as a user would."""

import sys
from pathlib import Path

import quiet  # noqa: F401  (first: it silences the libraries below)
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

work = Path(sys.argv[1] if len(sys.argv) > 1 else "demo-out")
ids = torch.randint(0, 4096, (1, 16), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    base = AutoModelForCausalLM.from_pretrained(work / "base")
    live = PeftModel.from_pretrained(base, work / "adapter").eval()(ids).logits.float()
    merged = AutoModelForCausalLM.from_pretrained(work / "merged").eval()(ids).logits.float()
diff = (live - merged).abs().max().item()
spread = live.abs().max().item()
print(f"merged model reloaded with transformers; max |logit diff| vs live adapter: {diff:.4f} "
      f"(logits up to {spread:.2f}; bf16 rounding)")
print(f"merged model: {work.resolve() / 'merged'}")
