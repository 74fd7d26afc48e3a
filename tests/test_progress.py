"""The CLI's progress display (issue 16, item 5): tensors and bytes done of the total, the rate,
the ETA and the verify phase, with sizes in adaptive units (a tiny output never reads
"0.00 GB"); the formatting functions directly, the tensor count on a real half-written shard,
and one real CLI run's final lines."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import REPO, cli_command, cli_env, run_cli
from safetensors.torch import save_file

from mergeflow.cli.progress import (
    _tensors_in,
    finished_line,
    format_eta,
    format_pair,
    format_rate,
    progress_detail,
)
from mergeflow.spec import format_size
from mergeflow.storage.staging import Staging


@pytest.mark.parametrize(("size", "text"), [
    (0, "0 B"), (999, "999 B"), (1000, "1.00 KB"), (35_700, "35.70 KB"),
    (12_345_678, "12.35 MB"), (1_200_000_000, "1.20 GB"), (3.5e12, "3.50 TB")])
def test_sizes_take_the_largest_unit_that_keeps_the_figure_at_least_one(size, text):
    assert format_size(size) == text


def test_a_pair_is_in_the_totals_unit():
    assert format_pair(450_000_000, 1_200_000_000) == "0.45/1.20 GB"
    assert format_pair(12_000, 35_000) == "12.00/35.00 KB"
    assert format_pair(300, 800) == "300/800 B"
    assert format_pair(0, 35_000) == "0.00/35.00 KB"


def test_rate_and_eta():
    assert format_rate(85e6) == "85.00 MB/s"
    assert format_rate(1.5e9) == "1.50 GB/s"
    assert format_rate(2_000) == "2.00 KB/s"
    assert format_rate(0) == format_rate(None) == "- B/s"
    assert format_eta(7.4) == "ETA 0:07"
    assert format_eta(125) == "ETA 2:05"
    assert format_eta(3723) == "ETA 1:02:03"
    assert format_eta(None) == format_eta(float("inf")) == format_eta(float("nan")) == "ETA -"


def test_progress_detail_rates_only_what_this_run_wrote():
    # 450 MB in the folder, 150 MB of it resumed: 300 MB in 10 s is 30 MB/s; 750 MB left: 25 s.
    assert progress_detail(12, 40, 450_000_000, 1_200_000_000, 10.0, 300_000_000) == \
        "12/40 tensors, 0.45/1.20 GB, 30.00 MB/s, ETA 0:25"
    assert progress_detail(0, 40, 0, 1_200_000_000, 0.0, 0) == \
        "0/40 tensors, 0.00/1.20 GB, - B/s, ETA -"
    assert finished_line(40, 35_000, 2.0, 35_000) == \
        "wrote 40/40 tensors, 35.00 KB in 2.0 s (17.50 KB/s)"


def test_finished_line_says_apart_what_was_merged_during_planning():
    # 20 KB merged ahead (already in staging when the run phase began): the rate is the rest's
    assert finished_line(40, 35_000, 1.5, 15_000, bytes_ahead=20_000) == \
        "wrote 40/40 tensors, 35.00 KB in 1.5 s (10.00 KB/s); 20.00 KB of it merged while " \
        "the base's layout was learnt"
    # every shard merged ahead: no run-phase rate to give (it was "- B/s")
    assert finished_line(40, 35_000, 0.1, 0, bytes_ahead=35_000) == \
        "wrote 40/40 tensors, 35.00 KB (all merged while the base's layout was learnt)"


def test_tensors_in_a_half_written_shard_count_from_its_header(tmp_path):
    """A shard's header comes first (8 bytes of length, then the JSON); a tensor counts once
    all of its bytes are in the file."""
    path = tmp_path / "shard.safetensors"
    save_file({"a": torch.zeros(4, 4), "b": torch.ones(4, 4), "c": torch.ones(2, 4)}, path)
    data = path.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    ends = [64, 128, 160]
    for written, tensors in [(0, 0), (63, 0), (64, 1), (127, 1), (128, 2), (160, 3)]:
        (tmp_path / "partial").write_bytes(data[:header + written])
        assert _tensors_in(tmp_path / "partial", ends) == tensors, written
    assert _tensors_in(tmp_path / "missing", ends) == 0


def _merge_on(route: str, request, *args: str) -> subprocess.CompletedProcess:
    """``mergeflow merge ARGS`` in-process, or as the flow on the session's Prefect server."""
    if route != "prefect":
        return run_cli("merge", *args)
    env = {**cli_env(), "PREFECT_API_URL": request.getfixturevalue("prefect_server")}
    return subprocess.run(cli_command("merge", *args, "--prefect"), cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=600, check=False)


@pytest.mark.parametrize("route", ["in-process", "prefect"])
def test_a_cli_run_says_what_it_wrote_then_that_it_verifies(make_base, make_adapter, tmp_path,
                                                            route, request, monkeypatch):
    """Both routes, the flow's too: its verify step can start and end between two looks of
    the display at the staging folder, and the line must still be said, in order. An empty
    cache of its own: a first merge of this base (in-process, it merges ahead while it learns
    the layout), whichever tests ran before."""
    monkeypatch.setenv("MERGEFLOW_CACHE", str(tmp_path / "cache"))
    base = make_base("llama")
    adapter = make_adapter(base, target_modules=["q_proj", "v_proj"])
    out = tmp_path / "out"
    result = _merge_on(route, request, "--base", str(base), "--adapter", str(adapter),
                       "--out", str(out))
    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    report = json.loads((out / "merge-manifest.json").read_text())["report"]
    size = format_size(report["total_size"])
    assert size.endswith(" KB")  # a tiny model: its size in KB, not "0.00 GB"
    assert len(lines) == 2, result.stderr
    # a first in-process merge of a base merges its shards while it learns the layout
    assert re.fullmatch(rf"wrote {report['tensors']}/{report['tensors']} tensors, {size} "
                        r"(in [0-9.]+ s \([0-9.]+ (B|KB|MB|GB)/s\)|"
                        r"\(all merged while the base's layout was learnt\))", lines[0]), lines[0]
    assert lines[1] == (f"verifying {out}: checksums, completeness and the merged tensors' "
                        "numerics ...")
    assert f"tensors, {size} float32" in " ".join(result.stdout.split())
    assert "0.00 GB" not in result.stdout + result.stderr


@pytest.mark.parametrize("route", ["in-process", "prefect"])
def test_no_verify_says_nothing_of_verifying(make_base, make_adapter, tmp_path, route, request):
    """With --no-verify neither route's display announces a verify step that never runs."""
    base = make_base("llama")
    adapter = make_adapter(base, target_modules=["q_proj", "v_proj"])
    result = _merge_on(route, request, "--base", str(base), "--adapter", str(adapter),
                       "--out", str(tmp_path / "out"), "--no-verify")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wrote "), result.stderr


def test_the_display_counts_finished_shipped_and_half_written_shards(make_base, make_adapter,
                                                                     tmp_path):
    """What the bar shows, from a real staging folder: a finished shard counts whole, one shipped
    and deleted (low_disk) by its record, one being written by the tensors its file holds."""
    from mergeflow.cli.progress import StagingProgress
    from mergeflow.pipeline import steps as api
    from mergeflow.plan import MergePlan
    from mergeflow.spec import MergeSpec

    base = make_base("llama", max_shard_size="60KB")
    adapter = make_adapter(base, target_modules=["q_proj"])
    spec = MergeSpec(base=str(base), adapter=str(adapter), out=str(tmp_path / "out"),
                     max_shard_size="40KB")
    prepared = api.prepare(spec)
    plan = MergePlan.load(Path(prepared.plan_path))
    assert len(plan.shards) >= 3
    progress = StagingProgress(prepared)
    assert progress._written() == (0, 0)

    first, second = (api.run_shard(prepared.plan_path, i) for i in range(2))
    counts = [len(s.tensors) for s in plan.shards]
    assert progress._written() == (first.size + second.size, counts[0] + counts[1])
    (Path(prepared.staging) / second.filename).unlink()  # shipped (low_disk): its record stays
    assert progress._written() == (first.size + second.size, counts[0] + counts[1])

    third = plan.shards[2]
    api.run_shard(prepared.plan_path, 2)
    done = Path(prepared.staging) / third.filename
    data = done.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    done.unlink()
    Staging.for_output(prepared.out).done_record(third.filename).unlink()
    partial = Staging.for_output(prepared.out).partial(third.filename)
    partial.write_bytes(data[:header + third.tensors[0].nbytes])  # one tensor in, so far
    size, tensors = progress._written()
    assert tensors == counts[0] + counts[1] + 1
    assert size == first.size + second.size + header + third.tensors[0].nbytes


def test_the_report_prints_an_output_path_with_brackets_as_it_is(make_base, make_adapter,
                                                                  tmp_path, monkeypatch):
    """Brackets in a path are not rich markup: ``[exp]`` stays in the printed path (it was
    dropped), ``[/b]`` does not break the report after the merge (it was a traceback), and the
    long report line is one line for the terminal to wrap (the CLI's COLUMNS is 80).
    In-process route, an empty cache of its own."""
    monkeypatch.setenv("MERGEFLOW_CACHE", str(tmp_path / "cache"))
    base = make_base("llama")
    adapter = make_adapter(base, target_modules=["q_proj", "v_proj"])
    out = tmp_path / "runs" / "[exp]" / "x[/b]" / "model"
    out.parent.mkdir(parents=True)
    result = run_cli("merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stdout.splitlines()
    assert f"output: {out}" in lines, result.stdout
    merged = [line for line in lines if line.startswith("merged ")]
    assert len(merged) == 1 and merged[0].endswith("shard(s)") and len(merged[0]) > 80, lines
    assert (out / "merge-manifest.json").is_file()
