"""The output folder: the small files around the shards and the manifest.

A merge is built in a staging folder beside the output and moved into place with one rename once
its manifest is written (the folder's layout and the publish: :mod:`mergeflow.storage.staging`). The
output folder therefore either does not exist, or holds a finished model whose manifest lists
every file with its sha256.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

from mergeflow.errors import OutputError
from mergeflow.storage.confine import confined_file
from mergeflow.storage.hashing import sha256_file
from mergeflow.storage.staging import MANIFEST_FILE

log = logging.getLogger(__name__)

MANIFEST = MANIFEST_FILE  # written last: a folder holding it is a finished merge
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json", "merges.txt",
    "vocab.txt", "chat_template.jinja", "chat_template.json",
)
# What a multimodal model's processor reads besides the tokenizer (AutoProcessor); the chat
# template travels with the tokenizer.
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json",
                   "video_preprocessor_config.json")


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
                f"`out={out}`: overlaps the input folder {folder}; write the merge elsewhere"
            )


def check_existing_output(out: Path, fingerprint: str, overwrite: bool,
                          deep: bool = False) -> bool:
    """Decide what an existing ``out`` means. True: it already holds this very merge, intact:
    its files match its manifest (:func:`output_damage`; ``deep``: their sha256 too, as before
    an upload). A finished merge of the same inputs whose files no longer match is rebuilt
    (False), never taken as done nor shipped.

    Raises:
        OutputError: it holds something else and ``overwrite`` is not set.
    """
    if not out.exists():
        return False
    if not out.is_dir():
        raise OutputError(f"`out={out}`: exists and is not a folder")
    manifest = read_manifest(out)
    if manifest is not None and manifest.get("plan_fingerprint") == fingerprint:
        damage = output_damage(out, manifest, deep)
        if damage is None:
            return True
        log.warning("%s holds this merge, but %s; rebuilding it", out, damage)
        return False
    if overwrite or not any(out.iterdir()):
        return False
    what = "a finished merge of other inputs or options" if manifest else "files but no manifest"
    raise OutputError(
        f"`out={out}`: holds {what}; pass `overwrite=True` to replace it or choose another folder"
    )


def output_damage(out: Path, manifest: dict, deep: bool = False) -> str | None:
    """How a finished output's files differ from its manifest, in words, or None when they
    match: every listed file present with its size (and, ``deep``, its sha256). Files it does
    not list are not part of the model (and never uploaded: publishing ships listed files)."""
    files = manifest.get("files")
    if not isinstance(files, dict):
        return f"its {MANIFEST} lists no files"
    for name, entry in sorted(files.items()):
        path = out / name
        if not path.is_file() or path.is_symlink():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != entry.get("size"):
            return f"{name} has {size} bytes where its manifest says {entry.get('size')}"
    if deep:
        for name, entry in sorted(files.items()):
            if sha256_file(out / name) != entry.get("sha256"):
                return f"{name}'s sha256 differs from its manifest's"
    return None


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
            shutil.copyfile(confined_file(source, name), dest / name)
            copied.append(name)
    return copied


def copy_processor(base: Path, dest: Path) -> list[str]:
    """Copy a multimodal base's processor files (image/video preprocessor, chat template) that
    the tokenizer copy did not bring; returns the names copied."""
    copied = []
    for name in PROCESSOR_FILES:
        if (base / name).is_file() and not (dest / name).exists():
            shutil.copyfile(confined_file(base, name), dest / name)
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


#: ``base_model_relation`` by save method. The Hub knows "adapter", "merge", "quantized" and
#: "finetune"; its "merge" is a merge of several models (mergekit), listed under the base's
#: "Merges". A LoRA merged into its one base is a fine-tune of that base ("finetune", also for
#: merged_4bit: re-quantized trained weights, not a quantization of the base's own), and an
#: unmerged export is an "adapter".
BASE_MODEL_RELATION = {"merged_16bit": "finetune", "merged_4bit": "finetune", "lora": "adapter",
                       "merged_16bit,gguf": "finetune"}
#: A ``config.json`` architecture's class-name suffix -> the Hub's ``pipeline_tag``.
PIPELINE_TAGS = {"ForCausalLM": "text-generation"}
_HF_CACHE_REPO = re.compile(r"(?:^|/)models--([^/]+?)--([^/]+)/snapshots/[^/]+/?$")


def hub_repo_id(ref: str | None) -> str | None:
    """``ref`` as a Hugging Face Hub model id (``org/name`` or a legacy ``name``), or None when
    it is not one: a local path (absolute, ``./``, ``~``), an ``s3://`` reference or anything the
    Hub's own repo-id check refuses. ``hf://org/name@rev`` gives ``org/name``. (Whether a
    relative ``org/name`` is really a local folder is judged by :func:`hub_base_model`, from the
    folders read, never from the working directory.)"""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not ref or not isinstance(ref, str):
        return None
    if ref.startswith("hf://"):
        ref = ref.removeprefix("hf://").split("@", 1)[0]
    elif "://" in ref or ref.startswith((".", "~", "/")):
        return None
    try:
        validate_repo_id(ref)
    except HFValidationError:
        return None
    return ref


def hub_base_model(base_folder: Path | None, named: str | None,
                   adapter_folder: Path | None = None) -> str | None:
    """The base's Hub id for the card's ``base_model``, never a local path: the repo of a base
    read from the Hugging Face cache (``.../models--org--name/snapshots/<rev>``, where ``hf://``
    bases are fetched to), else the adapter config's ``base_model_name_or_path`` when that is a
    Hub id (see :func:`hub_repo_id`) and not a local path (:func:`names_local_path`), else None
    (the key is then left out). The answer never depends on the working directory."""
    if base_folder is not None:
        match = _HF_CACHE_REPO.search(Path(base_folder).as_posix())
        if match:
            return hub_repo_id(f"{match.group(1)}/{match.group(2)}")
    repo = hub_repo_id(named)
    if repo is None or names_local_path(repo, base_folder, adapter_folder):
        return None
    return repo


def names_local_path(named: str, base_folder: Path | None, adapter_folder: Path | None) -> bool:
    """Whether a relative ``named`` that looks like ``org/name`` is a local path after all: the
    end of the base folder that was read, or a path that exists from the adapter's folder or a
    folder above it (where a training script's relative path starts)."""
    parts = Path(named).parts
    if base_folder is not None and Path(base_folder).absolute().parts[-len(parts):] == parts:
        return True
    if adapter_folder is None:
        return False
    anchor = Path(adapter_folder).absolute()
    return any((folder / named).exists() for folder in (anchor, *anchor.parents))


def base_license(base_folder: Path | None, config: dict | None = None) -> dict[str, str]:
    """``license`` (and ``license_name`` / ``license_link`` for "other") of the base's own model
    card (its README.md front matter), else a ``license`` in its ``config`` (config.json); {}
    when neither says."""
    if base_folder is None:
        return {}
    found: dict = {}
    card = Path(base_folder) / "README.md"
    if card.is_file():
        from huggingface_hub.repocard import metadata_load

        try:
            found = metadata_load(card) or {}
        except Exception:  # a malformed card carries no license over; the merge goes on
            found = {}
    if not found.get("license"):
        found = {"license": (config or {}).get("license")}
    return {k: v for k in ("license", "license_name", "license_link")
            if isinstance(v := found.get(k), str) and v}


def pipeline_tag(config: dict | None) -> str | None:
    """The Hub's ``pipeline_tag`` for a config's ``architectures`` (``*ForCausalLM``:
    text-generation), or None when it is not known."""
    for name in (config or {}).get("architectures") or []:
        for suffix, tag in PIPELINE_TAGS.items():
            if isinstance(name, str) and name.endswith(suffix):
                return tag
    return None


def model_card(base_model: str | None, adapter_name: str | None, report: dict,
               adapter_only: bool = False, *, base_folder: Path | None = None,
               base_config: dict | None = None) -> str:
    """A README.md model card with Hugging Face metadata and the merge options
    (``adapter_only``: the card of an unmerged adapter export, ``save_method`` lora).

    ``base_model``: the base's Hub id (:func:`hub_base_model`) or None, in which case the
    metadata has no ``base_model`` (nor ``base_model_relation``); a local path never goes into
    the metadata. ``base_folder``: the base read, for its license (:func:`base_license`) and,
    without a Hub id, the name the text calls it by; ``base_config``: its config.json, for the
    ``pipeline_tag`` and a license the card does not give.
    """
    from huggingface_hub import ModelCard, ModelCardData

    save_method = "lora" if adapter_only else str(report.get("save_method", "merged_16bit"))
    relation = BASE_MODEL_RELATION.get(save_method) if base_model else None
    data = ModelCardData(
        base_model=base_model or None,
        library_name="peft" if adapter_only else "transformers",
        pipeline_tag=pipeline_tag(base_config),
        tags=["mergeflow", "lora"] if adapter_only else ["mergeflow", "lora", "merge"],
        **base_license(base_folder, base_config),
        **({"base_model_relation": relation} if relation else {}),
    )
    base_text = base_model or (Path(base_folder).name if base_folder is not None else None)
    if adapter_only:
        intro = [
            "# LoRA adapter", "",
            f"The LoRA adapter `{adapter_name or 'unknown'}` for the base model "
            f"`{base_text or 'unknown'}`, exported unmerged by Mergeflow after checking it "
            "against the base. Load it with `PeftModel.from_pretrained(base_model, path)`.", "",
        ]
    else:
        intro = [
            "# Merged model", "",
            f"This checkpoint is the base model `{base_text or 'unknown'}` with the LoRA adapter "
            f"`{adapter_name or 'unknown'}` merged into its weights by Mergeflow. It loads with "
            "`AutoModelForCausalLM.from_pretrained` like any other checkpoint.", "",
        ]
    lines = ["---", data.to_yaml(), "---", "", *intro, "## Merge", ""]
    lines += [f"- **{k}**: {v}" for k, v in report.items() if not isinstance(v, (list, dict))]
    if report.get("gguf_files"):
        lines.append(f"- **gguf**: {', '.join(report['gguf_files'])} (llama.cpp; an Ollama "
                     "`Modelfile` beside them)")
    for note in report.get("notes", []):
        lines.append(f"- {note}")
    lines += ["", f"Every file's sha256 is listed in `{MANIFEST}`.", ""]
    return ModelCard("\n".join(lines)).content
