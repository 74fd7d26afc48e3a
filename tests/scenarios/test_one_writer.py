"""One writer per output: a second merge into an ``out`` another process is writing stops at once
with one line naming that process (exit 2, nothing written), and two real merges racing into the
same ``out`` never end in a traceback or a damaged output.

Route: the real CLI in child processes (in-process route; PREFECT_API_URL dropped by cli_env),
and a real process holding the lock."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import cli_env, finish, run_cli, start_cli

import mergeflow
from mergeflow.output.folder import MANIFEST
from mergeflow.storage.lock import lock_path
from mergeflow.storage.staging import Staging

HOLD = ("import sys, time\n"
        "from mergeflow.storage.lock import output_lock\n"
        "with output_lock(sys.argv[1]):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(60)\n")


@pytest.fixture(scope="module")
def inputs(make_base, make_adapter):
    base = make_base("llama", max_shard_size="60KB")
    return base, make_adapter(base, target_modules=["q_proj", "v_proj", "down_proj"])


def _merge_args(base: Path, adapter: Path, out: Path) -> list[str]:
    return ["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out),
            "--max-shard-size", "40KB"]


def test_a_second_writer_is_refused_naming_the_first(inputs, tmp_path):
    base, adapter = inputs
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], env=cli_env(), text=True,
                              stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = run_cli(*_merge_args(base, adapter, out))
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().splitlines() == [
            f"error: --out {out}: another merge is writing it (pid {holder.pid} on "
            f"{json.loads(lock_path(out).read_text())['host']}, since "
            f"{json.loads(lock_path(out).read_text())['since']}); wait for it to finish, or "
            "choose another --out"]
        assert not out.exists() and not Staging.for_output(out).folder.exists()
    finally:
        holder.kill()
        holder.wait()
    assert run_cli(*_merge_args(base, adapter, out)).returncode == 0  # the lock died with it
    assert (out / MANIFEST).is_file()


def test_two_merges_racing_into_one_out_end_cleanly(inputs, tmp_path):
    base, adapter = inputs
    out = tmp_path / "out"
    procs = [start_cli(*_merge_args(base, adapter, out)) for _ in range(2)]
    results = [finish(p) for p in procs]
    for r in results:
        assert "Traceback" not in r.stderr, r.stderr
        assert r.returncode == 0 or (r.returncode == 2 and "another merge is writing it"
                                     in r.stderr), r.stderr
    assert any(r.returncode == 0 for r in results)
    reference = tmp_path / "reference"
    mergeflow.merge(base, adapter, reference, max_shard_size="40KB")
    for path in reference.glob("*.safetensors"):
        assert (out / path.name).read_bytes() == path.read_bytes(), path.name
