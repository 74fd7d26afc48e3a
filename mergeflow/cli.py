"""The ``mergeflow`` command.

Exit codes: 0 success, 2 bad input (a one-line message naming the file or key and the fix),
1 any other failure.

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
    from mergeflow import api, resources

    resources.for_spec(spec)  # sizes and the memory bound are checked before anything runs
    prepared = api.prepare(spec)
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


@app.command()
def merge(
    adapter: Annotated[str, typer.Option(
        help="PEFT LoRA adapter: folder, hf://org/name[@rev] or s3://bucket/prefix.")],
    out: Annotated[Path, typer.Option(help="Output folder (appears when complete).")],
    base: Annotated[str | None, typer.Option(
        help="Base model: folder, hf://org/name[@rev] or s3://bucket/prefix "
             "(default: the adapter config's base_model_name_or_path).")] = None,
    dtype: Annotated[str, typer.Option(help="auto | bfloat16 | float16 | float32")] = "auto",
    max_shard_size: Annotated[str, typer.Option(help="Largest shard, e.g. 5GB.")] = "5GB",
    tokenizer: Annotated[Path | None, typer.Option(
        help="Tokenizer folder (default: the adapter's, else the base's).")] = None,
    no_tokenizer: Annotated[bool, typer.Option("--no-tokenizer", help="Write no tokenizer files.")] = False,
    pad_vocab_to_multiple_of: Annotated[int | None, typer.Option(
        help="Round the vocabulary up to a multiple of N.")] = None,
    allow_vocab_shrink: Annotated[bool, typer.Option(
        "--allow-vocab-shrink", help="Allow fewer vocabulary rows than the base has.")] = False,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace a different finished output.")] = False,
    device: Annotated[str, typer.Option(
        help="cpu | cuda: where dequantizing, merging and re-quantizing run.")] = "cpu",
    save_method: Annotated[str, typer.Option(
        help="merged_16bit | merged_4bit (re-quantize with the quantized base's settings) | "
             "lora (export the adapter unmerged).")] = "merged_16bit",
    merge_onto: Annotated[str, typer.Option(
        help="dequantized | original: for a quantized base, merge onto its dequantized weights "
             "or onto --original-base.")] = "dequantized",
    original_base: Annotated[str | None, typer.Option(
        help="The 16-bit checkpoint the quantized base was made from.")] = None,
    workers: Annotated[int | None, typer.Option(
        help="Layer groups merged in parallel (default: from the cores and memory; "
             "1 below 4 cores).")] = None,
    block_size: Annotated[str, typer.Option(
        help="Row block read, merged and written at a time, e.g. 32MiB.")] = "32MiB",
    memory_limit: Annotated[str | None, typer.Option(
        help="Working memory the merge may use beyond its baseline, e.g. 4GiB "
             "(default: a quarter of the available memory).")] = None,
    prefect: Annotated[bool, typer.Option(
        "--prefect", help="Run as the Prefect flow merge-adapter (visible in the UI; without "
        "PREFECT_API_URL Prefect starts a temporary server). Default: in-process, unless "
        "PREFECT_API_URL, --dask-address or --push-to is set.")] = False,
    dask_address: Annotated[str | None, typer.Option(
        help="Run layer groups on this Dask cluster (tcp://host:8786).")] = None,
    no_verify: Annotated[bool, typer.Option(
        "--no-verify", help="Skip the numeric and checksum verification.")] = False,
    push_to: Annotated[str | None, typer.Option(
        help="Publish to hf://org/name or s3://bucket/prefix after verifying.")] = None,
    private: Annotated[bool, typer.Option("--private", help="hf://: private repo.")] = False,
    revision: Annotated[str | None, typer.Option(help="hf://: branch to commit to.")] = None,
    create_pr: Annotated[bool, typer.Option("--create-pr", help="hf://: open a PR.")] = False,
    commit_message: Annotated[str | None, typer.Option(help="hf://: commit message.")] = None,
    s3_sse: Annotated[str | None, typer.Option(help="s3://: AES256 | aws:kms")] = None,
    s3_kms_key_id: Annotated[str | None, typer.Option(help="s3://: KMS key id.")] = None,
    low_disk: Annotated[bool, typer.Option(
        "--low-disk", help="With --push-to: ship and delete each shard as it is verified.")] = False,
) -> None:
    """Merge ADAPTER into BASE and write a SafeTensors checkpoint to OUT."""
    try:
        spec = MergeSpec(base=base, adapter=adapter, out=str(out), dtype=dtype,
                         max_shard_size=max_shard_size,
                         tokenizer=str(tokenizer) if tokenizer else None,
                         no_tokenizer=no_tokenizer, overwrite=overwrite, device=device,
                         pad_vocab_to_multiple_of=pad_vocab_to_multiple_of,
                         allow_vocab_shrink=allow_vocab_shrink, save_method=save_method,
                         merge_onto=merge_onto,
                         original_base=original_base,
                         workers=workers, block_size=block_size, memory_limit=memory_limit,
                         dask_address=dask_address, verify=not no_verify,
                         push_to=push_to, private=private, revision=revision,
                         create_pr=create_pr, commit_message=commit_message, s3_sse=s3_sse,
                         s3_kms_key_id=s3_kms_key_id, low_disk=low_disk)
    except ValueError as exc:
        _fail(2, "invalid options: " + "; ".join(
            f"--{'-'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}"
            for e in exc.errors()))
    try:
        report, ran = _run(spec, prefect)
    except InputError as exc:
        _fail(2, str(exc))
    except MergeError as exc:
        _fail(1, str(exc))
    except OSError as exc:
        from mergeflow.writer import DISK_FULL

        if exc.errno not in DISK_FULL:
            raise
        _fail(2, f"{exc.filename or spec.out}: no space left on the device ({exc.strerror}); free "
                 "space or pass --out on a bigger disk, then rerun: finished groups are kept")
    _print_report(report)
    if spec.push_to:
        _print_published(spec.push_to)
    _print_line(ran)


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
    out.print(f"[bold green]merged[/] {report.lora_modules} {report.variant} modules "
              f"({report.replaced_tensors} tensors replaced, {report.lora_biases} LoRA biases) "
              f"into {report.tensors} tensors, {report.total_size / 1e9:.2f} GB {report.dtype} "
              f"in {report.shards} shard(s)")
    _print_notes(report.notes)
    out.print(f"output: {report.out}")


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
