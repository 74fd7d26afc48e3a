"""The reference route the benchmark compares Mergeflow with: PEFT's own merge.

    python bench/peft_merge.py BASE ADAPTER OUT [--max-shard-size 1GB]

Loads the whole base model in bf16, applies the adapter, ``merge_and_unload()`` and
``save_pretrained``: what a user does without Mergeflow. Run as its own process so its peak RSS
is its own.
"""

from __future__ import annotations

import argparse

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("base")
    parser.add_argument("adapter")
    parser.add_argument("out")
    parser.add_argument("--max-shard-size", default="1GB")
    args = parser.parse_args()
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(model, args.adapter)
    model = model.merge_and_unload()
    model.save_pretrained(args.out, max_shard_size=args.max_shard_size)


if __name__ == "__main__":
    main()
