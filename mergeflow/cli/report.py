"""What ``mergeflow merge`` prints when it is done: the report of the merge on stdout, its
warnings in yellow on stderr. The two consoles, :data:`out` and :data:`err`, are the ones every
part of the CLI prints to.

Every line here is plain text (:func:`_say`): paths, notes and names are never read as rich
markup (an output folder named ``runs/[b]`` is printed as it is, and ``x[/b]`` does not break
the report), and a long line is left for the terminal to wrap, so a path copied from it has no
line break inside."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.text import Text

from mergeflow.cli.words import cli_words
from mergeflow.spec import format_size

if TYPE_CHECKING:
    from mergeflow.pipeline.results import MergeReport

#: Errors, warnings, progress and the interrupt line.
err = Console(stderr=True)
#: The report.
out = Console()


def _say(text: str, word: str = "") -> None:
    """One line on stdout, as it is: ``word`` (if any) in bold green, then ``text``; no markup,
    no highlighting, not wrapped."""
    line = Text.assemble((word, "bold green"), " " if word else "", text)
    out.print(line, highlight=False, soft_wrap=True)


def print_published(dest: str) -> None:
    """Say where the output went."""
    _say(f"published to {dest}")


def print_line(text: str) -> None:
    """One line on stdout as it is (no markup, no highlighting, not wrapped)."""
    _say(text)


def _print_notes(notes: list[str]) -> None:
    """Notes under the report on stdout; warnings (``warning: ...``) in yellow on stderr."""
    for note in notes:
        note = cli_words(note)
        if note.startswith("warning:"):
            err.print(Text(note, style="yellow"), highlight=False, soft_wrap=True)
        else:
            _say(f"  - {note}")


def print_report(report: MergeReport) -> None:
    """What a merge did (or that there was nothing to do), its notes and where the output is."""
    if report.status == "up-to-date":
        _say(f"{report.out} already holds this merge; nothing to do.")
        _print_notes([n for n in report.notes if n.startswith("warning:")])
        return
    if report.shards_resumed:
        _say(f"resumed {report.shards_resumed} of {report.shards} groups from an "
             "interrupted run")
    if report.save_method == "lora":
        _print_lora(report)
        return
    if report.save_method == "gguf":
        _print_gguf(report)
        return
    _say(f"{report.lora_modules} {report.variant} modules ({report.replaced_tensors} tensors "
         f"replaced, {report.lora_biases} LoRA biases) into {report.tensors} tensors, "
         f"{format_size(report.total_size)} {report.dtype} in {report.shards} shard(s)", "merged")
    if report.gguf_files:  # merged_16bit,gguf: converted from those shards
        _say(f"the shards into {', '.join(report.gguf_files)} "
             f"({format_size(sum(report.gguf_files.values()))}) with an Ollama Modelfile",
             "converted")
    _print_notes(report.notes)
    _say(f"output: {report.out}")
    if report.gguf_files:
        _print_ollama(report)


def _print_lora(report: MergeReport) -> None:
    """An adapter exported unmerged: what was written."""
    _say(f"the {report.variant} adapter unmerged ({report.lora_modules} modules, "
         f"{report.tensors} tensors, {format_size(report.total_size)})", "exported")
    _print_notes(report.notes)
    _say(f"output: {report.out}")


def _print_gguf(report: MergeReport) -> None:
    """A GGUF merge: what was written, and the command that imports it into Ollama."""
    from mergeflow.engine.gguf import gguf_filename

    files = ", ".join(gguf_filename(t) for t in report.dtype.split(","))
    _say(f"{report.lora_modules} {report.variant} modules into {files} ({report.tensors} "
         f"tensors, {format_size(report.total_size)} {report.dtype}) with an Ollama Modelfile",
         "merged")
    _print_notes(report.notes)
    _say(f"output: {report.out}")
    _print_ollama(report)


def _print_ollama(report: MergeReport) -> None:
    """The command that imports the output's GGUF (its Modelfile) into Ollama."""
    from mergeflow.output.modelfile import ollama_command

    print_line(f"to run it in Ollama: {ollama_command(report.out, Path(report.out).name.lower())}")
