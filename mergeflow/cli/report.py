"""What ``mergeflow merge`` prints when it is done: the report of the merge on stdout, its
warnings in yellow on stderr. The two consoles, :data:`out` and :data:`err`, are the ones every
part of the CLI prints to."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from mergeflow.cli.words import cli_words
from mergeflow.spec import format_size

if TYPE_CHECKING:
    from mergeflow.pipeline.results import MergeReport

#: Errors, warnings, progress and the interrupt line.
err = Console(stderr=True)
#: The report.
out = Console()


def print_published(dest: str) -> None:
    """Say where the output went."""
    out.print(f"published to {dest}")


def print_line(text: str) -> None:
    """One line on stdout as it is (no highlighting, not wrapped)."""
    out.print(text, highlight=False, soft_wrap=True)


def _print_notes(notes: list[str]) -> None:
    """Notes under the report on stdout; warnings (``warning: ...``) in yellow on stderr."""
    for note in notes:
        note = cli_words(note)
        if note.startswith("warning:"):
            err.print(f"[yellow]{note}[/]", highlight=False, soft_wrap=True)
        else:
            out.print(f"  - {note}")


def print_report(report: MergeReport) -> None:
    """What a merge did (or that there was nothing to do), its notes and where the output is."""
    if report.status == "up-to-date":
        out.print(f"{report.out} already holds this merge; nothing to do.")
        _print_notes([n for n in report.notes if n.startswith("warning:")])
        return
    if report.shards_resumed:
        out.print(f"resumed {report.shards_resumed} of {report.shards} groups from an "
                  "interrupted run")
    if report.save_method == "lora":
        _print_lora(report)
        return
    if report.save_method == "gguf":
        _print_gguf(report)
        return
    out.print(f"[bold green]merged[/] {report.lora_modules} {report.variant} modules "
              f"({report.replaced_tensors} tensors replaced, {report.lora_biases} LoRA biases) "
              f"into {report.tensors} tensors, {format_size(report.total_size)} {report.dtype} "
              f"in {report.shards} shard(s)")
    if report.gguf_files:  # merged_16bit,gguf: converted from those shards
        out.print(f"[bold green]converted[/] the shards into {', '.join(report.gguf_files)} "
                  f"({format_size(sum(report.gguf_files.values()))}) with an Ollama Modelfile")
    _print_notes(report.notes)
    out.print(f"output: {report.out}")
    if report.gguf_files:
        _print_ollama(report)


def _print_lora(report: MergeReport) -> None:
    """An adapter exported unmerged: what was written."""
    out.print(f"[bold green]exported[/] the {report.variant} adapter unmerged "
              f"({report.lora_modules} modules, {report.tensors} tensors, "
              f"{format_size(report.total_size)})")
    _print_notes(report.notes)
    out.print(f"output: {report.out}")


def _print_gguf(report: MergeReport) -> None:
    """A GGUF merge: what was written, and the command that imports it into Ollama."""
    from mergeflow.engine.gguf import gguf_filename

    files = ", ".join(gguf_filename(t) for t in report.dtype.split(","))
    out.print(f"[bold green]merged[/] {report.lora_modules} {report.variant} modules into "
              f"{files} ({report.tensors} tensors, "
              f"{format_size(report.total_size)} {report.dtype}) with an Ollama Modelfile")
    _print_notes(report.notes)
    out.print(f"output: {report.out}")
    _print_ollama(report)


def _print_ollama(report: MergeReport) -> None:
    """The command that imports the output's GGUF (its Modelfile) into Ollama."""
    from mergeflow.output.modelfile import ollama_command

    print_line(f"to run it in Ollama: {ollama_command(report.out, Path(report.out).name.lower())}")
