"""Train a tiny Llama with LoRA for a few steps on the CPU, then merge it - the README's
"From a training script" example, complete and runnable offline:

    python scripts/train_and_merge.py WORKDIR [--save-method merged_16bit]

It writes WORKDIR/base (a tiny random model, standing in for the one you fine-tune), trains with
a real ``transformers.Trainer`` and ``MergeOnTrainEnd`` (merged into WORKDIR/merged-by-callback at
the end of training), then merges again with the Unsloth-style call (WORKDIR/merged). A failed
merge makes the script exit non-zero (the adapter is saved either way).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # tests/builders.py
from builders import build_base
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

import mergeflow


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--save-method", default="merged_16bit")
    args = parser.parse_args()
    work = args.workdir

    base = build_base(work / "base", "llama")  # your base: a folder or a Hub id in the cache
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))

    rows = torch.randint(4, 128, (32, 16), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": r, "labels": r} for r in rows]
    trainer = Trainer(
        model=model, processing_class=tokenizer, train_dataset=data,
        args=TrainingArguments(output_dir=str(work / "run"), max_steps=5, learning_rate=1e-2,
                               per_device_train_batch_size=8, report_to=[], use_cpu=True,
                               save_strategy="no", disable_tqdm=True),
        callbacks=[mergeflow.MergeOnTrainEnd(out=work / "merged-by-callback",
                                             save_method=args.save_method)],
    )
    trainer.train()  # saves run/adapter (+ _COMPLETE), then merges; raises if the merge fails

    mergeflow.patch(model)  # Unsloth's methods on this model: code written for Unsloth runs as is
    report = model.save_pretrained_merged(work / "merged", tokenizer, save_method=args.save_method)
    print(f"merged {report.lora_modules} LoRA modules into {report.out} ({report.dtype})")
    for note in report.notes:
        print(" -", note)


if __name__ == "__main__":
    main()
