"""The ``mergeflow`` command.

Exit codes follow the phase: 0 success; 2 bad input refused while planning, before anything
is written (a one-line message naming the file or key and the fix); 1 any failure once the merge
runs (a full disk mid-merge, a destination failing after ``--out`` was published: the message
says what was published and what was not). See :mod:`mergeflow.errors`.

The ``merge`` options are :class:`~mergeflow.spec.MergeSpec`'s fields: their help and defaults
come from the spec (``tests/test_cli.py`` proves that every field has its flag).

``mergeflow merge`` runs in-process (``mergeflow.api.run_local``) unless the run should be a
Prefect flow run: with ``--prefect``, ``PREFECT_API_URL`` in the environment, ``--dask-address``
or ``--push-to``. The core (torch, ...) and Prefect are imported only inside the commands, so
``--help`` starts in a fraction of a second.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from mergeflow.errors import InputError, MergeError
from mergeflow.spec import MergeSpec

if TYPE_CHECKING:
    from mergeflow.api import MergeReport, PreparedMerge

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Merge LoRA adapters into base models and publish SafeTensors checkpoints.")
err = Console(stderr=True)
out = Console()

@app.callback()
def main() -> None:
    """Mergeflow: streaming LoRA merges."""


def flow_reason(spec: MergeSpec, prefect: bool = False) -> str | None:
    """Why this merge runs as a Prefect flow run; None: it runs in-process."""
    if prefect:
        return "--prefect"
    if os.environ.get("PREFECT_API_URL"):
        return "PREFECT_API_URL is set"
    if spec.dask_address:
        return "--dask-address"
    if spec.push_to:
        return "--push-to"
    return None


def _run(spec: MergeSpec, prefect: bool = False) -> tuple[MergeReport, str]:
    """Plan (failing fast on bad input), then run the merge - in-process, or as the Prefect flow
    (see :func:`flow_reason`) - with a progress bar. Returns the report and the line saying
    which path ran."""
    return _execute(spec, _plan(spec), prefect)


def _plan(spec: MergeSpec) -> PreparedMerge:
    """The planning phase: every refusal of bad input happens here, before any output is
    written (an InputError from here exits 2)."""
    from mergeflow import api, resources

    resources.for_spec(spec)  # sizes and the memory bound are checked before anything runs
    return api.prepare(spec)


def _execute(spec: MergeSpec, prepared: PreparedMerge,
             prefect: bool = False) -> tuple[MergeReport, str]:
    """The run phase of a planned merge (any failure from here exits 1)."""
    from mergeflow import api

    reason = flow_reason(spec, prefect)
    if reason is None or (prepared.up_to_date and not spec.push_to):
        with _StagingProgress(prepared, enabled=not prepared.up_to_date):
            report = api.run_local(prepared, spec)
        if reason is not None:  # nothing to merge, so no flow run was started
            return report, f"ran in-process (already up to date; no flow run started although {reason})"
        return report, "ran in-process"
    return _run_flow(spec, prepared, reason)


def _run_flow(spec: MergeSpec, prepared: PreparedMerge, reason: str) -> tuple[MergeReport, str]:
    """Run the ``merge-adapter`` flow on the merge planned already (it is not planned twice)."""
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Without PREFECT_API_URL, Prefect starts a temporary local server; give it time on a busy box.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from flows.merge import merge_adapter

    with _StagingProgress(prepared):
        state = merge_adapter(spec, prepared=prepared, return_state=True)
    name = _flow_run_name(state.state_details.flow_run_id)
    report = state.result()  # raises the flow's own exception when it failed
    return report, f"ran as Prefect flow run merge-adapter/{name} ({reason})"


def _flow_run_name(flow_run_id) -> str:
    """The flow run's name as the Prefect UI shows it (its id if the API cannot say)."""
    try:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            return client.read_flow_run(flow_run_id).name
    except Exception:
        return str(flow_run_id)


class _StagingProgress:
    """A progress bar fed by watching the staging folder grow, so it works the same whatever
    runs the groups (threads, processes, a Dask cluster sharing the disk)."""

    def __init__(self, prepared: PreparedMerge, interval: float = 0.25,
                 enabled: bool = True) -> None:
        from mergeflow.staging import Staging

        self.staging = Staging.for_output(prepared.out)
        self.total = prepared.total_size
        self.groups = prepared.shard_count
        self.interval = interval
        self.enabled = enabled
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _written(self) -> tuple[int, int]:
        size = 0
        for path in self.staging.progress_files():
            with contextlib.suppress(OSError):
                size += path.stat().st_size
        return min(size, self.total), len(self.staging.done_records())

    def _poll(self) -> None:
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

        columns = [TextColumn("[bold]merging"), BarColumn(),
                   TextColumn(f"{{task.fields[done]}}/{self.groups} groups"), DownloadColumn()]
        with Progress(*columns, console=err, transient=True) as bar:
            task = bar.add_task("merge", total=self.total, done=0)
            while not self._stop.wait(self.interval):
                size, done = self._written()
                bar.update(task, completed=size, done=done)

    def __enter__(self) -> _StagingProgress:
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.enabled:
            self._thread.join()


def _help(field: str) -> str:
    """A ``merge`` option's help: its MergeSpec field's description (brackets escaped, so
    rich shows ``hf://org/name[@revision]`` as written)."""
    from rich.markup import escape

    return escape(MergeSpec.model_fields[field].description or "")


def _default(field: str):
    """A ``merge`` option's default: its MergeSpec field's default."""
    return MergeSpec.model_fields[field].default


@app.command()
def merge(
    adapter: Annotated[str, typer.Option(help=_help("adapter"))],
    out: Annotated[Path, typer.Option(help=_help("out"))],
    base: Annotated[str | None, typer.Option(help=_help("base"))] = _default("base"),
    dtype: Annotated[str, typer.Option(help=_help("dtype"))] = _default("dtype"),
    max_shard_size: Annotated[str, typer.Option(
        help=_help("max_shard_size"))] = _default("max_shard_size"),
    tokenizer: Annotated[Path | None, typer.Option(
        help=_help("tokenizer"))] = _default("tokenizer"),
    no_tokenizer: Annotated[bool, typer.Option(
        "--no-tokenizer", help=_help("no_tokenizer"))] = _default("no_tokenizer"),
    pad_vocab_to_multiple_of: Annotated[int | None, typer.Option(
        help=_help("pad_vocab_to_multiple_of"))] = _default("pad_vocab_to_multiple_of"),
    allow_vocab_shrink: Annotated[bool, typer.Option(
        "--allow-vocab-shrink", help=_help("allow_vocab_shrink"))] = _default("allow_vocab_shrink"),
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help=_help("overwrite"))] = _default("overwrite"),
    device: Annotated[str, typer.Option(help=_help("device"))] = _default("device"),
    save_method: Annotated[str, typer.Option(
        help=_help("save_method"))] = _default("save_method"),
    gguf_type: Annotated[str, typer.Option(help=_help("gguf_type"))] = _default("gguf_type"),
    merge_onto: Annotated[str, typer.Option(help=_help("merge_onto"))] = _default("merge_onto"),
    original_base: Annotated[str | None, typer.Option(
        help=_help("original_base"))] = _default("original_base"),
    workers: Annotated[int | None, typer.Option(help=_help("workers"))] = _default("workers"),
    block_size: Annotated[str, typer.Option(help=_help("block_size"))] = _default("block_size"),
    memory_limit: Annotated[str | None, typer.Option(
        help=_help("memory_limit"))] = _default("memory_limit"),
    prefect: Annotated[bool, typer.Option(
        "--prefect", help="Run as the Prefect flow merge-adapter (visible in the UI; without "
        "PREFECT_API_URL Prefect starts a temporary server). Default: in-process, unless "
        "PREFECT_API_URL, --dask-address or --push-to is set.")] = False,
    dask_address: Annotated[str | None, typer.Option(
        help=_help("dask_address"))] = _default("dask_address"),
    verify: Annotated[bool, typer.Option(
        "--verify/--no-verify", help=_help("verify"))] = _default("verify"),
    push_to: Annotated[str | None, typer.Option(help=_help("push_to"))] = _default("push_to"),
    private: Annotated[bool, typer.Option(
        "--private", help=_help("private"))] = _default("private"),
    revision: Annotated[str | None, typer.Option(help=_help("revision"))] = _default("revision"),
    create_pr: Annotated[bool, typer.Option(
        "--create-pr", help=_help("create_pr"))] = _default("create_pr"),
    commit_message: Annotated[str | None, typer.Option(
        help=_help("commit_message"))] = _default("commit_message"),
    s3_sse: Annotated[str | None, typer.Option(help=_help("s3_sse"))] = _default("s3_sse"),
    s3_kms_key_id: Annotated[str | None, typer.Option(
        help=_help("s3_kms_key_id"))] = _default("s3_kms_key_id"),
    low_disk: Annotated[bool, typer.Option(
        "--low-disk", help=_help("low_disk"))] = _default("low_disk"),
) -> None:
    """Merge ADAPTER into BASE and write a SafeTensors checkpoint to OUT."""
    fields = {name: str(value) if isinstance(value, Path) else value
              for name, value in locals().items() if name in MergeSpec.model_fields}
    try:
        spec = MergeSpec(**fields)
    except ValueError as exc:
        _fail(2, _invalid_options(exc))
    try:
        prepared = _plan(spec)
    except InputError as exc:  # refused before anything was written
        _fail(2, str(exc))
    except MergeError as exc:
        _fail(1, str(exc))
    try:
        report, ran = _execute(spec, prepared, prefect)
    except MergeError as exc:  # once the merge runs, every failure exits 1 (mergeflow.errors)
        _fail(1, str(exc))
    _print_report(report)
    if spec.push_to:
        _print_published(spec.push_to)
    _print_line(ran)


def _invalid_options(exc: ValueError) -> str:
    """A spec's validation errors on one line: ``--flag: problem`` for a field's value, the
    message itself for options that cannot go together."""
    errors = exc.errors() if hasattr(exc, "errors") else [{"loc": (), "msg": str(exc)}]
    fields = [f"--{'-'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}"
              for e in errors if e["loc"]]
    combinations = [e["msg"] for e in errors if not e["loc"]]
    return "; ".join([*(["invalid options: " + "; ".join(fields)] if fields else []),
                      *combinations])


def _fail(code: int, message: str) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _print_published(dest: str) -> None:
    """Say where the output went (a function of its own: in ``merge``, ``out`` is the path)."""
    out.print(f"published to {dest}")


def _print_line(text: str) -> None:
    out.print(text, highlight=False, soft_wrap=True)


def _print_notes(notes: list[str]) -> None:
    """Notes under the report on stdout; warnings (``warning: ...``) in yellow on stderr."""
    for note in notes:
        if note.startswith("warning:"):
            err.print(f"[yellow]{note}[/]", highlight=False, soft_wrap=True)
        else:
            out.print(f"  - {note}")


def _print_report(report: MergeReport) -> None:
    if report.status == "up-to-date":
        out.print(f"{report.out} already holds this merge; nothing to do.")
        _print_notes([n for n in report.notes if n.startswith("warning:")])
        return
    if report.groups_resumed:
        out.print(f"resumed {report.groups_resumed} of {report.shards} groups from an "
                  "interrupted run")
    if report.save_method == "lora":
        out.print(f"[bold green]exported[/] the {report.variant} adapter unmerged "
                  f"({report.lora_modules} modules, {report.tensors} tensors, "
                  f"{report.total_size / 1e6:.2f} MB)")
        _print_notes(report.notes)
        out.print(f"output: {report.out}")
        return
    if report.save_method == "gguf":
        _print_gguf(report)
        return
    out.print(f"[bold green]merged[/] {report.lora_modules} {report.variant} modules "
              f"({report.replaced_tensors} tensors replaced, {report.lora_biases} LoRA biases) "
              f"into {report.tensors} tensors, {report.total_size / 1e9:.2f} GB {report.dtype} "
              f"in {report.shards} shard(s)")
    _print_notes(report.notes)
    out.print(f"output: {report.out}")


def _print_gguf(report: MergeReport) -> None:
    """A GGUF merge: what was written, and the command that imports it into Ollama."""
    from mergeflow.gguf_export import gguf_filename, ollama_command

    out.print(f"[bold green]merged[/] {report.lora_modules} {report.variant} modules into "
              f"{gguf_filename(report.dtype)} ({report.tensors} tensors, "
              f"{report.total_size / 1e9:.2f} GB {report.dtype}) with an Ollama Modelfile")
    _print_notes(report.notes)
    out.print(f"output: {report.out}")
    _print_line(f"to run it in Ollama: {ollama_command(report.out, Path(report.out).name.lower())}")


webhook_app = typer.Typer(no_args_is_help=True,
                          help="Receive training / Hugging Face webhooks and start merge runs.")
app.add_typer(webhook_app, name="webhook")


@webhook_app.command("serve")
def webhook_serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8787,
    deployment: Annotated[str, typer.Option(
        help="Merge deployment to run, <flow>/<deployment>.")] = "merge-adapter/merge-adapter",
    max_body_bytes: Annotated[int, typer.Option(help="Largest accepted body (413 above).")] = 65536,
    secret_block: Annotated[str | None, typer.Option(
        help="Prefect Secret block holding the training hook's HMAC secret "
             "(default: $MERGEFLOW_WEBHOOK_SECRET).")] = None,
    hf_secret_block: Annotated[str | None, typer.Option(
        help="Prefect Secret block holding the Hugging Face webhook secret "
             "(default: $MERGEFLOW_HF_WEBHOOK_SECRET).")] = None,
    hf_out_root: Annotated[str | None, typer.Option(
        help="Hugging Face hook: merge outputs go under this folder.")] = None,
    hf_push_root: Annotated[str | None, typer.Option(
        help="Hugging Face hook: publish to <root>/<name> (hf://org or s3://bucket/prefix).")] = None,
    api_url: Annotated[str | None, typer.Option(
        help="Prefect API URL (default: $PREFECT_API_URL).")] = None,
    log_level: Annotated[str, typer.Option(help="debug | info | warning")] = "info",
) -> None:
    """Serve POST /hooks/training, POST /hooks/huggingface and GET /healthz (triggers.webhook)."""
    from triggers.webhook import load_settings, serve

    try:
        settings = load_settings(deployment=deployment, max_body_bytes=max_body_bytes,
                                 api_url=api_url, secret_block=secret_block,
                                 hf_secret_block=hf_secret_block, hf_out_root=hf_out_root,
                                 hf_push_root=hf_push_root)
    except ValueError as exc:
        _fail(2, str(exc))
    serve(settings, host=host, port=port, log_level=log_level)


if __name__ == "__main__":
    app()
