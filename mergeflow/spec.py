"""MergeSpec: one merge request, validated. The CLI, the Python API and the Prefect flow's
parameter form all take this same model, and it is the one place the options are declared:
their names, types, defaults, descriptions (the CLI's ``--help``), the size syntax
(:func:`size_bytes`, which ``mergeflow.plan.parse_size`` uses too) and the combinations that
cannot mean anything (:meth:`MergeSpec.option_problems`). ``tests/test_cli.py`` proves that every
field has its ``mergeflow merge`` flag with the same default and help."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    model_validator,
)
from pydantic_core import PydanticCustomError

#: Size units, case-insensitive: decimal (KB = 1000 bytes) and binary (KiB = 1024 bytes).
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*")
#: The same language as a JSON-schema pattern (the Prefect parameter form checks it; a size
#: must also be positive, which a pattern cannot say).
SIZE_PATTERN = r"^\s*[0-9]+(\.[0-9]+)?\s*(([KkMmGgTt][Ii]?)?[Bb])?\s*$"
SIZE_HELP = "use a size like 5GB, 500MB, 500MiB or 2GiB (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB; " \
    "any case; a plain number is bytes)"


def size_bytes(text: str | int) -> int:
    """A size (``"5GB"``, ``"5gb"``, ``"500MiB"``, ``"2GiB"``, ``"1000000"`` or an int) in bytes.

    The one size parser: the spec's size fields validate with it and
    ``mergeflow.plan.parse_size`` wraps it.

    Raises:
        ValueError: not a size, or not positive.
    """
    if isinstance(text, bool):
        raise ValueError(f"{text!r}: {SIZE_HELP}")
    if isinstance(text, int):
        size = text
    else:
        match = _SIZE.fullmatch(str(text))
        unit = match.group(2).upper() if match else ""
        if not match or unit not in SIZE_UNITS:
            raise ValueError(f"{text!r}: {SIZE_HELP}")
        size = int(float(match.group(1)) * SIZE_UNITS[unit])
    if size <= 0:
        raise ValueError(f"{text!r}: must be a positive size")
    return size


def format_size(size: float, digits: int = 2) -> str:
    """Bytes for people in the largest decimal unit that keeps the figure at least 1:
    ``512 B``, ``2.05 KB``, ``35.7 MB``, ``1.20 GB`` (never ``0.00 GB``)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if size >= scale:
            return f"{size / scale:.{digits}f} {unit}"
    return f"{int(size)} B"


def _size_text(value: Any) -> Any:
    """An int size is kept as its text (the field stays a JSON string)."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _check_size(value: str) -> str:
    """A size field's check; the error's location names the field (the CLI: its flag)."""
    try:
        size_bytes(value)
    except ValueError as exc:
        raise PydanticCustomError("byte_size", "{problem}", {"problem": str(exc)}) from None
    return value


#: A size option: text such as ``5GB`` (kept as given, so the spec stays JSON), checked by
#: :func:`size_bytes`; an int is accepted as bytes.
Size = Annotated[str, BeforeValidator(_size_text), AfterValidator(_check_size),
                 Field(json_schema_extra={"pattern": SIZE_PATTERN})]


#: The one pair of save methods that go together: the GGUF is converted from the 16-bit shards.
SAFETENSORS_AND_GGUF = "merged_16bit,gguf"


def _save_methods(value: Any) -> Any:
    """``save_method`` as given, or several joined by commas: ``gguf,merged_16bit`` (any order,
    spaces) is :data:`SAFETENSORS_AND_GGUF`; any other pair is refused in one line."""
    if not isinstance(value, str) or "," not in value:
        return value
    methods = [m.strip() for m in value.split(",") if m.strip()]
    if sorted(methods) == sorted(SAFETENSORS_AND_GGUF.split(",")):
        return SAFETENSORS_AND_GGUF
    raise PydanticCustomError(
        "save_methods", "{value}: only merged_16bit,gguf combines save methods (one "
        "SafeTensors checkpoint, and GGUF files converted from its 16-bit shards); write the "
        "others in separate runs", {"value": value})


class MergeSpec(BaseModel):
    """Everything that defines one merge."""

    model_config = ConfigDict(extra="forbid")

    base: str | None = Field(
        None, description="Base model: a folder (model.safetensors or shards + index), "
        "hf://org/name[@revision] or s3://bucket/prefix. Default: the base the adapter's "
        "config names.")
    adapter: str = Field(description="PEFT LoRA adapter: a folder (adapter_config.json + "
                         "weights), hf://org/name[@revision] or s3://bucket/prefix. The CLI "
                         "takes several (repeat the flag): each is merged into its own folder "
                         "under `out`, in one sweep over the base.")
    out: str = Field(description="Output folder; it appears only once the merge is complete.")
    stack: list[str] = Field(
        [], description="Adapters stacked on `adapter`, in order (SFT, then "
        "DPO on top): the output is the base with all of them active together, as PEFT runs "
        "several LoRA adapters at once; the base is read once. Plain LoRA and rsLoRA; DoRA, "
        "modules_to_save and trainable tokens are refused.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Output dtype; 'auto' keeps the base's own float dtype (for a "
        "4-bit base merged to 16 bits: its bnb_4bit_compute_dtype; an 8-bit one: bfloat16; "
        "merged onto the original: the original's dtype).")
    max_shard_size: Size = Field(
        "5GB", description="Largest output shard, e.g. 5GB or 500MiB.")
    tokenizer: str | None = Field(
        None, description="Tokenizer folder to ship; default: the adapter's, else the base's.")
    no_tokenizer: bool = Field(
        False, description="Write no tokenizer files (otherwise a missing tokenizer is an error).")
    pad_vocab_to_multiple_of: int | None = Field(
        None, ge=1, le=4096, description="Round the vocabulary up to a multiple of this.")
    allow_vocab_shrink: bool = Field(
        False, description="Allow a merged vocabulary smaller than the base's.")
    overwrite: bool = Field(
        False, description="Replace a finished output made from other inputs or options.")
    device: Literal["cpu", "cuda"] = Field(
        "cpu", description="Where dequantizing, the merge math and re-quantizing run.")
    save_method: Annotated[Literal["merged_16bit", "merged_4bit", "lora", "gguf", "fp8",
                                   "merged_16bit,gguf"],
                           BeforeValidator(_save_methods)] = Field(
        "merged_16bit", description="merged_16bit: a plain checkpoint in `dtype`. merged_4bit: "
        "merge, then re-quantize the changed weights in the quantized base's own format and "
        "settings (bitsandbytes 4-bit or 8-bit, or FP8). lora: no merge; export the adapter as "
        "adapter_model.safetensors, checked against the base. gguf: merge straight into one "
        "GGUF file for llama.cpp and Ollama (`gguf_type`), with an Ollama Modelfile. fp8: the "
        "compressed-tensors FP8 checkpoint vLLM serves (`fp8_scheme`; lm_head stays 16-bit). "
        "merged_16bit,gguf: both in one folder from one read of the base (the GGUF files are "
        "converted from the merged shards).")
    fp8_scheme: Literal["channel", "block"] = Field(
        "channel", description="With `save_method=fp8`: channel is FP8_DYNAMIC (one scale per "
        "output row, dynamic per-token activations); block is FP8_BLOCK (one scale per 128x128 "
        "block, the layout DeepSeek and Qwen ship).")
    gguf_type: str = Field(
        "f16", pattern=r"^[a-z0-9_]+(,[a-z0-9_]+)*$", description="With `save_method=gguf` (or "
        "merged_16bit,gguf): the GGUF type, or several separated by commas (one merge makes them all). "
        "f16, bf16 and q8_0 are written by llama.cpp's converter as the merge streams (norms and "
        "1-D tensors stay f32); llama.cpp's quantizer types (q4_k_m, q5_k_m, q6_k, "
        "q4_0, q5_0, q3_k_m, iq4_xs, ...) are made by llama.cpp itself from the streamed 16-bit "
        "file, which is then deleted unless it was asked for too. All need llama.cpp's converter "
        "and quantizer (scripts/setup --gguf).")
    gguf_check: bool = Field(
        True, description="With `save_method=gguf` (or merged_16bit,gguf): llama.cpp scores "
        "every quantized file "
        "against the 16-bit GGUF of the same merge on fixed token sequences (mean KL "
        "divergence, top-1 agreement), in the report and the model card.")
    merge_onto: Literal["dequantized", "original"] = Field(
        "dequantized", description="For a quantized base: merge onto its dequantized weights "
        "(what the adapter was trained against) or onto the original 16-bit weights "
        "(`original_base`).")
    original_base: str | None = Field(
        None, description="The 16-bit checkpoint the quantized base was made from "
        "(needed to merge onto the original; tensor names and shapes must match).")
    verify: bool = Field(
        True, description="Check checksums, completeness and the numerics of every merged "
        "tensor before publishing.")
    workers: int | None = Field(
        None, ge=1, le=64, description="Layer groups merged in parallel (thread pool size); "
        "default: decided from the cores and memory available (see mergeflow.pipeline.resources).")
    block_size: Size = Field(
        "12MiB", description="Bytes of one row block: every tensor is read, merged and written in "
        "blocks of about this many float32 bytes, so memory never follows a tensor's size.")
    memory_limit: Size | None = Field(
        None, description="Budget for the merge's working memory beyond the process baseline "
        "(workers x blocks must fit); default: a quarter of the available memory.")
    dask_address: str | None = Field(
        None, description="Run layer groups on this existing Dask cluster (e.g. "
        "tcp://scheduler:8786) instead of local threads; workers must see the same paths.")
    push_to: str | None = Field(
        None, pattern=r"^(hf|s3)://.+", description="Publish the verified output to "
        "hf://org/name or s3://bucket/prefix (the manifest goes last).")
    private: bool = Field(False, description="hf:// only: create the repo private.")
    revision: str | None = Field(None, description="hf:// only: branch to commit to.")
    create_pr: bool = Field(False, description="hf:// only: open a pull request instead.")
    commit_message: str | None = Field(None, description="hf:// only: the commit message.")
    s3_sse: Literal["AES256", "aws:kms"] | None = Field(
        None, description="s3:// only: server-side encryption.")
    s3_kms_key_id: str | None = Field(None, description="s3:// only: KMS key for aws:kms.")
    low_disk: bool = Field(
        False, description="With push_to: publish each shard as soon as it is written and "
        "verified, then delete it locally (local disk stays near one shard; with "
        "`save_method=gguf`, each GGUF file once written and checked: the 16-bit file and one "
        "quantized file at most).")

    def option_problems(self) -> list[str]:
        """The combinations of options that cannot mean anything, one line each (options named
        by their field names in backticks; the CLI shows them as its flags). Checked when a
        spec is made and again by ``mergeflow.pipeline.steps.prepare`` (a ``model_copy(update=...)`` is
        not validated)."""
        problems = []
        if self.merge_onto == "original" and not self.original_base:
            problems.append("`merge_onto=original` needs `original_base=PATH`: the 16-bit "
                            "checkpoint the quantized base was made from")
        if self.original_base and self.merge_onto != "original":
            problems.append(f"`original_base={self.original_base}` is only read with "
                            "`merge_onto=original`; add that, or drop `original_base`")
        if self.save_method == "lora" and self.merge_onto == "original":
            problems.append("`save_method=lora` exports the adapter unmerged, so `merge_onto=original` "
                            "has nothing to do; drop one of them")
        if self.save_method == SAFETENSORS_AND_GGUF and self.low_disk:
            problems.append(f"`save_method={SAFETENSORS_AND_GGUF}` converts the GGUF from the "
                            "shards on disk, which `low_disk=True` ships and deletes one by one; "
                            "drop `low_disk`, or write `save_method=gguf` alone")
        if self.fp8_scheme != "channel" and self.save_method != "fp8":
            problems.append(f"`fp8_scheme={self.fp8_scheme}` is only read with `save_method=fp8`; "
                            "add that, or drop `fp8_scheme`")
        if self.low_disk and not self.push_to:
            problems.append("`low_disk=True` needs `push_to`: shards are shipped and deleted as they go")
        return problems

    @property
    def writes_gguf(self) -> bool:
        """GGUF files are among the outputs (``gguf``, or with the SafeTensors checkpoint)."""
        return "gguf" in self.save_method.split(",")

    @property
    def writes_safetensors(self) -> bool:
        """A SafeTensors checkpoint or adapter is among the outputs (anything but ``gguf``)."""
        return self.save_method != "gguf"

    @property
    def planned_method(self) -> str:
        """The save method the tensors are planned for: ``merged_16bit`` when the GGUF comes
        from the 16-bit shards, else ``save_method`` itself."""
        return self.save_method.split(",")[0]

    @model_validator(mode="after")
    def _check_combinations(self) -> MergeSpec:
        problems = self.option_problems()
        if problems:  # type "option_combination", no location: the CLI prints the message as is
            raise PydanticCustomError(OPTION_COMBINATION, "{message}",
                                      {"message": "; ".join(problems)})
        return self


#: The pydantic error type of :meth:`MergeSpec.option_problems`.
OPTION_COMBINATION = "option_combination"
