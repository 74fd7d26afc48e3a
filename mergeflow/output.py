"""The output folder: the small files around the shards and the manifest.

A merge is built in a staging folder beside the output and moved into place with one rename once
its manifest is written (the folder's layout and the publish: :mod:`mergeflow.staging`). The
output folder therefore either does not exist, or holds a finished model whose manifest lists
every file with its sha256.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from mergeflow.errors import InputError, OutputError

MANIFEST = "merge-manifest.json"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json", "merges.txt",
    "vocab.txt", "chat_template.jinja", "chat_template.json",
)
# What a multimodal model's processor reads besides the tokenizer (AutoProcessor).
PROCESSOR_FILES = (
    "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
    "chat_template.jinja", "chat_template.json",
)


def write_json(path: Path, data: object) -> None:
    """Write JSON deterministically (same data, same bytes)."""
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def read_manifest(folder: Path) -> dict | None:
    """The manifest of a finished output folder, or None when the folder is not finished."""
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def check_output_location(out: Path, inputs: list[Path]) -> None:
    """Refuse an output folder inside an input, or one that contains an input."""
    out_r = out.resolve()
    for folder in inputs:
        inp = folder.resolve()
        if out_r == inp or inp in out_r.parents or out_r in inp.parents:
            raise OutputError(
                f"--out {out}: overlaps the input folder {folder}; write the merge elsewhere"
            )


def check_existing_output(out: Path, fingerprint: str, overwrite: bool) -> bool:
    """Decide what an existing ``out`` means. True: it already holds this very merge.

    Raises:
        OutputError: it holds something else and ``overwrite`` is not set.
    """
    if not out.exists():
        return False
    if not out.is_dir():
        raise OutputError(f"--out {out}: exists and is not a folder")
    manifest = read_manifest(out)
    if manifest is not None and manifest.get("plan_fingerprint") == fingerprint:
        return True
    if overwrite or not any(out.iterdir()):
        return False
    what = "a finished merge of other inputs or options" if manifest else "files but no manifest"
    raise OutputError(
        f"--out {out}: holds {what}; pass --overwrite to replace it or choose another folder"
    )


def find_tokenizer(candidates: list[Path]) -> Path | None:
    """The first folder that holds a tokenizer (tokenizer.json or tokenizer_config.json)."""
    for folder in candidates:
        if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
            return folder
    return None


def copy_tokenizer(source: Path, dest: Path) -> list[str]:
    """Copy the tokenizer files byte for byte; returns the names copied."""
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, dest / name)
            copied.append(name)
    return copied


def copy_processor(base: Path, dest: Path) -> list[str]:
    """Copy a multimodal base's processor files (image/video preprocessor, chat template) that
    the tokenizer copy did not bring; returns the names copied."""
    copied = []
    for name in PROCESSOR_FILES:
        if (base / name).is_file() and not (dest / name).exists():
            shutil.copyfile(base / name, dest / name)
            copied.append(name)
    return copied


def output_config(base_config: dict, dtype_name: str, keep_quantization: bool = False) -> dict:
    """The base's config.json for the merged model: dtype updated, quantization removed (kept
    with ``keep_quantization``, for a merged_4bit output stored in the base's own format)."""
    config = {k: v for k, v in base_config.items()
              if keep_quantization or k != "quantization_config"}
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype_name
    config["dtype"] = dtype_name
    return config


def model_card(base_name: str | None, adapter_name: str | None, report: dict,
               adapter_only: bool = False) -> str:
    """A README.md model card with Hugging Face metadata and the merge options
    (``adapter_only``: the card of an unmerged adapter export, ``save_method`` lora)."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(
        base_model=base_name or None,
        library_name="peft" if adapter_only else "transformers",
        tags=["mergeflow", "lora"] if adapter_only else ["mergeflow", "lora", "merge"],
    )
    if adapter_only:
        intro = [
            "# LoRA adapter", "",
            f"The LoRA adapter `{adapter_name or 'unknown'}` for the base model "
            f"`{base_name or 'unknown'}`, exported unmerged by Mergeflow after checking it "
            "against the base. Load it with `PeftModel.from_pretrained(base_model, path)`.", "",
        ]
    else:
        intro = [
            "# Merged model", "",
            f"This checkpoint is the base model `{base_name or 'unknown'}` with the LoRA adapter "
            f"`{adapter_name or 'unknown'}` merged into its weights by Mergeflow. It loads with "
            "`AutoModelForCausalLM.from_pretrained` like any other checkpoint.", "",
        ]
    lines = ["---", data.to_yaml(), "---", "", *intro, "## Merge", ""]
    lines += [f"- **{k}**: {v}" for k, v in report.items() if not isinstance(v, (list, dict))]
    for note in report.get("notes", []):
        lines.append(f"- {note}")
    lines += ["", f"Every file's sha256 is listed in `{MANIFEST}`.", ""]
    return ModelCard("\n".join(lines)).content


def require_config(base: Path) -> dict:
    """The base's config.json, which every merged model needs."""
    path = base / "config.json"
    if not path.is_file():
        raise InputError(f"{path}: not found; the base folder needs the model's config.json")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: unreadable JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise InputError(f"{path}: expected a JSON object")
    return config
