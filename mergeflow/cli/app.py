"""The ``mergeflow`` command: the typer app, its ``merge`` and ``webhook serve`` commands and the
choice of route for a merge.

Exit codes follow the phase: 0 success; 2 bad input refused while planning, before anything
is written (a one-line message naming the file or key and the fix); 1 any failure once the merge
runs (a full disk mid-merge, a destination failing after ``--out`` was published: the message
says what was published and what was not); 130 interrupted by Ctrl-C (SIGINT) or SIGTERM, either
signal: one line on stderr names the staging folder, which is kept, and says that rerunning the
same command resumes (:class:`mergeflow.cli.signals.StopOnSignal`). See :mod:`mergeflow.errors`.

Core messages name options by their MergeSpec fields in backticks (`` `overwrite=True` ``);
everything the CLI prints goes through :func:`mergeflow.cli.words.cli_words`, which shows them as
flags.

The ``merge`` options are :class:`~mergeflow.spec.MergeSpec`'s fields: their help and defaults
come from the spec (``tests/test_cli.py`` proves that every field has its flag).

``mergeflow merge`` runs in-process (``mergeflow.pipeline.run_local``) unless the run should be a
Prefect flow run: with ``--prefect``, ``PREFECT_API_URL`` in the environment, ``--dask-address``
or ``--push-to``. The core (torch, ...) and Prefect are imported only inside the commands, so
``--help`` starts in a fraction of a second.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

from mergeflow.cli.progress import StagingProgress
from mergeflow.cli.report import err, print_line, print_published, print_report
from mergeflow.cli.signals import StopOnSignal, in_thread, on_interrupt
from mergeflow.cli.words import cli_words
from mergeflow.cli.words import option_default as _default
from mergeflow.cli.words import option_help as _help
from mergeflow.errors import CheckpointError, InputError, MergeError
from mergeflow.model.index import safetensors_shards
from mergeflow.spec import MergeSpec
from mergeflow.storage.hashing import hash_ahead
from mergeflow.storage.lock import output_lock

if TYPE_CHECKING:
    from mergeflow.pipeline.results import MergeReport, PreparedMerge

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Merge LoRA adapters into base models and publish SafeTensors checkpoints.")


@app.callback()
def main() -> None:
    """Mergeflow: streaming LoRA merges."""
    # bitsandbytes notes on import that optional CPU kernels are missing; it falls back to its
    # own, so the note is noise in a merge's output (its errors still show)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


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
    return _execute(spec, _plan(spec, prefect), prefect)


def _plan(spec: MergeSpec, prefect: bool = False) -> PreparedMerge:
    """The planning phase: every refusal of bad input happens here, before any output is
    written (an InputError from here exits 2). A merge that runs in this process has its
    shards merged ahead while a new base's layout is learnt (:mod:`mergeflow.pipeline.ahead`)."""
    from mergeflow import pipeline

    pipeline.for_spec(spec)  # sizes and the memory bound are checked before anything runs
    return pipeline.prepare(spec, ahead=flow_reason(spec, prefect) is None)


def _hash_base_ahead(spec: MergeSpec) -> None:
    """Start hashing a local base's shards for the manifest before torch is imported (which
    takes one core for most of a second), when this process will read them; planning takes
    the hashing over (:func:`mergeflow.storage.hashing.hash_ahead`). A base planning will
    refuse is left to planning to report."""
    if spec.dask_address or not spec.base or "://" in spec.base:
        return
    folder = Path(spec.base)
    if not folder.is_dir():
        return
    try:
        hash_ahead(safetensors_shards(folder))
    except CheckpointError:
        return


def _execute(spec: MergeSpec, prepared: PreparedMerge,
             prefect: bool = False) -> tuple[MergeReport, str]:
    """The run phase of a planned merge (any failure from here exits 1), on a thread of its
    own (:func:`in_thread`)."""
    from mergeflow import pipeline

    reason = flow_reason(spec, prefect)
    if reason is None or (prepared.up_to_date and not spec.push_to):
        with StagingProgress(prepared, enabled=not prepared.up_to_date,
                             verifies=_verify_step_runs(spec)) as progress:
            report = in_thread(pipeline.run_local, prepared, spec, on_phase=progress.phase)
            progress.finish()
        if reason is not None:  # nothing to merge, so no flow run was started
            return report, f"ran in-process (already up to date; no flow run started although {reason})"
        return report, "ran in-process"
    return _run_flow(spec, prepared, reason)


def _run_flow(spec: MergeSpec, prepared: PreparedMerge, reason: str) -> tuple[MergeReport, str]:
    """Run the ``merge-adapter`` flow on the merge planned already (it is not planned twice);
    an interrupt marks its run crashed and stops Prefect's temporary server
    (:func:`flows.merge.abandon_cli_runs`)."""
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Without PREFECT_API_URL, Prefect starts a temporary local server; give it time on a busy box.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from flows.merge import abandon_cli_runs, run_from_cli

    on_interrupt.insert(0, abandon_cli_runs)  # after the progress display is stopped
    try:
        with StagingProgress(prepared, enabled=not prepared.up_to_date,
                             verifies=_verify_step_runs(spec)) as progress:
            report, name = in_thread(run_from_cli, spec, prepared)  # raises the flow's error
            progress.finish(verified=_verify_step_runs(spec))
    finally:
        on_interrupt.remove(abandon_cli_runs)
    return report, f"ran as Prefect flow run merge-adapter/{name} ({reason})"


def _verify_step_runs(spec: MergeSpec) -> bool:
    """Whether a run of ``spec`` has a verify step of its own between finalize and publish
    (:func:`mergeflow.pipeline.run_local` and the flow alike): a low-disk merge verifies each shard
    as it goes, and a GGUF output is published without one."""
    return spec.verify and not spec.low_disk and spec.save_method != "gguf"


@app.command()
def merge(
    adapter: Annotated[list[str], typer.Option(help=_help("adapter"))],
    out: Annotated[Path, typer.Option(help=_help("out"))],
    base: Annotated[str | None, typer.Option(help=_help("base"))] = _default("base"),
    stack: Annotated[list[str], typer.Option(help=_help("stack"))] = _default("stack"),
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
    gguf_check: Annotated[bool, typer.Option(
        "--gguf-check/--no-gguf-check", help=_help("gguf_check"))] = _default("gguf_check"),
    fp8_scheme: Annotated[str, typer.Option(help=_help("fp8_scheme"))] = _default("fp8_scheme"),
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
    out_name: Annotated[list[str] | None, typer.Option(
        help="With several --adapter: each output's folder name under --out, in order "
             "(default: the adapter folder's name).")] = None,
) -> None:
    """Merge ADAPTER into BASE and write a SafeTensors checkpoint to OUT."""
    fields = {name: str(value) if isinstance(value, Path) else value
              for name, value in locals().items() if name in MergeSpec.model_fields}
    if len(adapter) > 1 or out_name:  # a batch: one output per adapter under --out
        _merge_batch(fields, adapter, out_name, prefect)
        return
    fields["adapter"] = adapter[0]
    try:
        spec = MergeSpec(**fields)
    except ValueError as exc:
        _fail(2, _invalid_options(exc))
    with StopOnSignal(spec.out), contextlib.ExitStack() as held:  # Ctrl-C / SIGTERM: exit 130
        try:
            held.enter_context(output_lock(spec.out))  # one writer per output
            _hash_base_ahead(spec)
            prepared = _plan(spec, prefect)
        except InputError as exc:  # refused before anything was written
            _fail(2, str(exc))
        except MergeError as exc:
            _fail(1, str(exc))
        try:
            report, ran = _execute(spec, prepared, prefect)
        except MergeError as exc:  # once the merge runs, every failure exits 1 (mergeflow.errors)
            _fail(1, str(exc))
    print_report(report)
    if spec.push_to:
        print_published(spec.push_to)
    print_line(ran)


def _merge_batch(fields: dict, adapters: list[str], names: list[str] | None,
                 prefect: bool = False) -> None:
    """Several adapters of one base, in one sweep over the base, each into ``--out/<name>``:
    in this process, or with ``--prefect`` as the Prefect flow ``merge-adapters``
    (:func:`_run_batch_flow`). Exit 2 when any is refused (nothing written), 1 when some
    failed (the finished ones are printed and kept)."""
    from mergeflow.pipeline.many import PartialMergeError, merge_many, output_folders

    options = {k: v for k, v in fields.items() if k not in ("adapter", "out", "base")}
    try:
        shared = MergeSpec(**{**fields, "adapter": adapters[0]})  # the shared options, once
    except ValueError as exc:
        _fail(2, _invalid_options(exc))
    ran = "ran in-process"
    try:
        outputs = output_folders(fields["out"], adapters, names)
        with StopOnSignal(list(outputs)):  # Ctrl-C / SIGTERM: one line, exit 130
            if prefect:
                reports, ran = _run_batch_flow(shared, adapters, names)
            else:
                reports = in_thread(merge_many, fields.get("base"), outputs, **options)
    except InputError as exc:
        _fail(2, str(exc))
    except PartialMergeError as exc:
        for report in exc.reports.values():
            print_report(report)
        _fail(1, str(exc))
    except MergeError as exc:
        _fail(1, str(exc))
    for report in reports.values():
        print_report(report)
    print_line(ran)


def _run_batch_flow(spec: MergeSpec, adapters: list[str], names: list[str] | None
                    ) -> tuple[dict[str, MergeReport], str]:
    """Run the batch as the ``merge-adapters`` flow here (``spec.out``: the folder the
    outputs go under), against ``PREFECT_API_URL`` or Prefect's temporary local server."""
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from flows.batch import run_batch_from_cli
    from flows.merge import abandon_cli_runs

    on_interrupt.insert(0, abandon_cli_runs)  # an interrupt marks the run crashed
    try:
        reports, name = in_thread(run_batch_from_cli, spec, adapters, names)
    finally:
        on_interrupt.remove(abandon_cli_runs)
    return reports, f"ran as Prefect flow run merge-adapters/{name} (--prefect)"


def _invalid_options(exc: ValueError) -> str:
    """A spec's validation errors on one line: ``--flag: problem`` for a field's value, the
    message itself for options that cannot go together."""
    errors = exc.errors() if hasattr(exc, "errors") else [{"loc": (), "msg": str(exc)}]
    fields = [f"--{'-'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}"
              for e in errors if e["loc"]]
    combinations = [e["msg"] for e in errors if not e["loc"]]
    return "; ".join([*(["invalid options: " + "; ".join(fields)] if fields else []),
                      *combinations])


def _fail(code: int, message: str) -> NoReturn:
    """Print ``message`` (a core message: its option names become flags, :func:`cli_words`)
    as the error on stderr, on one line whatever text a library put in it, and exit with
    ``code``."""
    from rich.markup import escape

    line = " ".join(cli_words(message).split())
    err.print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


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
    outbox: Annotated[str | None, typer.Option(
        help="The SQLite file accepted deliveries are recorded in before they are answered, "
             "so none is lost to a restart (default: "
             "$XDG_STATE_HOME/mergeflow/webhook-outbox.sqlite).")] = None,
    allow_root: Annotated[list[str] | None, typer.Option(
        help="A folder (absolute) or s3:// / hf:// prefix deliveries may read and write; "
             "repeat for several (default: $MERGEFLOW_WEBHOOK_ROOTS, comma-separated). Every "
             "other location is refused with 403.")] = None,
    allow_overwrite: Annotated[bool, typer.Option(
        help="Accept deliveries that ask to overwrite a finished output.")] = False,
    window_seconds: Annotated[float, typer.Option(
        min=0, help="Hold training deliveries of one base and output folder (with the same "
        "options) and merge them in one merge-adapters run once none arrived for this many "
        "seconds; 0: one run per delivery.")] = 0.0,
    batch_deployment: Annotated[str, typer.Option(
        help="The batch deployment a held group runs on, <flow>/<deployment>.")
    ] = "merge-adapters/merge-adapters",
    log_level: Annotated[str, typer.Option(help="debug | info | warning")] = "info",
) -> None:
    """Serve POST /hooks/training, POST /hooks/huggingface and GET /healthz (triggers.webhook)."""
    from triggers.webhook import load_settings, serve

    try:
        settings = load_settings(deployment=deployment, max_body_bytes=max_body_bytes,
                                 api_url=api_url, secret_block=secret_block,
                                 hf_secret_block=hf_secret_block, hf_out_root=hf_out_root,
                                 hf_push_root=hf_push_root, allowed_roots=allow_root,
                                 allow_overwrite=allow_overwrite, outbox=outbox,
                                 window_seconds=window_seconds,
                                 batch_deployment=batch_deployment)
    except ValueError as exc:
        _fail(2, str(exc))
    serve(settings, host=host, port=port, log_level=log_level)


if __name__ == "__main__":
    from mergeflow.cli.leave import run_then_leave

    run_then_leave(app)
