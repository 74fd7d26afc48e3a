"""Disk space (issue 8): the preflight estimate refuses a merge that cannot fit before any work,
and a disk that fills up mid-merge (ENOSPC) is a clear DiskSpaceError that publishes nothing and
leaves a resumable staging folder.

Exit codes follow the phase (issue 15): the preflight's refusal (NotEnoughDiskSpace, an
InputError) exits 2, as nothing was written; a disk filling up mid-merge exits 1, and every
ENOSPC is translated by the core (the CLI has no OSError case of its own)."""

from __future__ import annotations

import errno
import os
from collections import namedtuple
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import join_forked, run_cli_forked, snapshot, staging_leftovers, start_forked

import mergeflow
from mergeflow.errors import DiskSpaceError, InputError
from mergeflow.output.folder import MANIFEST
from mergeflow.pipeline import preflight
from mergeflow.pipeline import steps as api
from mergeflow.plan import MergePlan
from mergeflow.spec import MergeSpec
from mergeflow.storage import sink
from mergeflow.storage.staging import Staging

TARGETS = ["q_proj", "v_proj", "down_proj"]
Usage = namedtuple("Usage", "total used free")
SHARD = "100KB"  # output shard size: several shards


@pytest.fixture(scope="module")
def inputs(make_base, make_adapter):
    base = make_base("llama", max_shard_size="100KB")
    return base, make_adapter(base, target_modules=TARGETS)


@pytest.fixture
def parent(tmp_path):
    """The folder the output goes into, with a sentinel file."""
    folder = tmp_path / "outputs"
    folder.mkdir()
    (folder / "sentinel.txt").write_text("keep\n")
    return folder


class FullDisk:
    """Stands in for the shard sinks' ``pwrite`` and ``fsync`` (mergeflow.storage.sink, both
    routes: past the page cache and through it): ``budget`` bytes in all are stored, then every
    write fails with ``error`` (ENOSPC), like a real disk; ``on_flush``: the writes seem to
    succeed and the fsync fails instead (a buffered write found out late)."""

    def __init__(self, budget: int, on_flush: bool = False, error: int = errno.ENOSPC) -> None:
        self.left = budget
        self.on_flush = on_flush
        self.error = error

    def pwrite(self, fd: int, data, offset: int) -> int:
        size = memoryview(data).nbytes
        if size > self.left:
            if not self.on_flush:
                self.left = 0
                raise OSError(self.error, os.strerror(self.error))
            self.left = -1
            return size  # "stored", found out at the fsync
        self.left -= size
        return os.pwrite(fd, data, offset)

    def fsync(self, fd: int) -> None:
        if self.left < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        os.fsync(fd)

    def install(self, patch: Callable[[object, str, object], None]) -> None:
        """Put this disk under the sinks (``patch``: ``monkeypatch.setattr``, or ``setattr``
        in a child process)."""
        patch(sink, "pwrite", self.pwrite)
        patch(sink, "fsync", self.fsync)


def _plan(base: Path, adapter: Path, out: Path) -> tuple[MergePlan, api.PreparedMerge]:
    prepared = api.prepare(MergeSpec(base=str(base), adapter=str(adapter), out=str(out),
                                     max_shard_size=SHARD))
    return MergePlan.load(Path(prepared.plan_path)), prepared


# --------------------------------------------------------------------------- preflight


def test_preflight_refuses_a_disk_too_small_before_any_work(inputs, parent, monkeypatch):
    base, adapter = inputs
    before = snapshot(parent)
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: Usage(10**6, 10**6 - 5000, 5000))
    with pytest.raises(DiskSpaceError) as caught:
        mergeflow.merge(base, adapter, parent / "merged")
    message = str(caught.value)
    assert isinstance(caught.value, InputError)
    assert message.startswith(f"{parent}: 5000 bytes (5.0 KB) free, but the merge into "
                              f"{parent / 'merged'} needs ")
    needed = int(message.split("needs ")[1].split(" ")[0])
    assert needed > 5000 and f"free {needed - 5000} bytes" in message
    assert "\n" not in message
    assert snapshot(parent) == before  # no output, no staging folder


def test_estimate_counts_shards_tokenizer_small_files_and_resume(inputs, tmp_path):
    base, adapter = inputs
    out = tmp_path / "merged"
    plan, prepared = _plan(base, adapter, out)
    tokenizer = sum((base / n).stat().st_size for n in os.listdir(base)
                    if n.startswith(("tokenizer", "special_tokens", "chat_template")))
    full = preflight.required_bytes(plan, out)
    assert full == plan.total_size + tokenizer + preflight.SMALL_FILES
    largest = max(s.nbytes for s in plan.shards)
    assert preflight.required_bytes(plan, out, low_disk=True) == largest + tokenizer + \
        preflight.SMALL_FILES
    # An interrupted run of the same plan kept its first shard: that part is not needed again.
    first = api.run_shard(prepared.plan_path, 0)
    assert preflight.required_bytes(plan, out) == full - first.size


def test_headroom_setting(inputs, parent, monkeypatch):
    base, adapter = inputs
    plan, _ = _plan(base, adapter, parent / "merged")
    needed = preflight.required_bytes(plan, parent / "merged")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: Usage(0, 0, needed + 100))
    preflight.check_disk_space(plan, parent / "merged")  # fits
    monkeypatch.setenv("MERGEFLOW_MIN_FREE_BYTES", "1KB")
    with pytest.raises(DiskSpaceError, match=r"\+ 1000 bytes \(1\.0 KB\) kept free "
                                             r"\(MERGEFLOW_MIN_FREE_BYTES\)"):
        preflight.check_disk_space(plan, parent / "merged")


def test_a_finished_output_needs_no_space(inputs, parent, monkeypatch):
    base, adapter = inputs
    mergeflow.merge(base, adapter, parent / "merged")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: Usage(0, 0, 0))
    assert mergeflow.merge(base, adapter, parent / "merged").status == "up-to-date"


def test_cli_headroom_exits_2_with_the_numbers(inputs, parent, tmp_path):
    base, adapter = inputs
    before = snapshot(parent)
    [result] = run_cli_forked([["merge", "--base", str(base), "--adapter", str(adapter),
                             "--out", str(parent / "merged")]], tmp_path,
                           {"MERGEFLOW_MIN_FREE_BYTES": str(10**18)})
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {parent}: ") and " free, but the merge into " in line
    assert "kept free (MERGEFLOW_MIN_FREE_BYTES)" in line and "--out on a bigger disk" in line
    assert snapshot(parent) == before


# --------------------------------------------------------------------------- ENOSPC mid-merge


@pytest.mark.parametrize("route", ["direct", "cached"])
@pytest.mark.parametrize("on_flush", [False, True], ids=["write", "flush"])
def test_disk_full_mid_merge_is_a_disk_error_then_resumes(inputs, parent, tmp_path, monkeypatch,
                                                          on_flush, route):
    """Either route of the shard writes: past the page cache (O_DIRECT, where the file system
    has it) and through it."""
    base, adapter = inputs
    out = parent / "merged"
    monkeypatch.setenv(sink.DIRECT_WRITES, "1" if route == "direct" else "0")
    clean = mergeflow.merge(base, adapter, tmp_path / "clean", max_shard_size=SHARD)
    assert clean.shards >= 3
    first = sorted((tmp_path / "clean").glob("*.safetensors"))[0].stat().st_size
    # the disk fills up in the 2nd shard (the direct route stores the 1st, smaller than one
    # chunk, as one write padded to sink.ALIGN)
    FullDisk(first + 2 * sink.ALIGN, on_flush=on_flush).install(monkeypatch.setattr)

    with pytest.raises(DiskSpaceError) as caught:  # one worker: the shards in order
        mergeflow.merge(base, adapter, out, max_shard_size=SHARD, workers=1)
    message = str(caught.value)
    staging = Staging.for_output(out)
    assert message.startswith(f"{staging.folder}/model-0000")  # the file being written
    assert "no space left on the device" in message and "bytes not yet stored" in message
    assert f"the staging folder {staging.folder} is kept" in message and "rerun" in message
    assert not isinstance(caught.value, InputError)  # mid-merge: no refusal of bad input
    assert "\n" not in message
    assert not out.exists()
    assert not list(parent.rglob(MANIFEST))
    assert not staging.leftovers(), "the half-written file must be deleted"
    assert len(staging.done_records()) == 1

    monkeypatch.undo()
    monkeypatch.setenv(sink.DIRECT_WRITES, "1" if route == "direct" else "0")
    report = mergeflow.merge(base, adapter, out, max_shard_size=SHARD)
    assert report.shards_resumed == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == \
        {p.name: p.read_bytes() for p in (tmp_path / "clean").iterdir()}
    assert staging_leftovers(out) == []


def test_disk_full_while_finalizing_is_a_disk_error(inputs, parent, monkeypatch):
    """An ENOSPC outside the shard writer (here: config.json, written while finalizing) is
    translated by the core too: a DiskSpaceError naming the file, never a bare OSError."""
    base, adapter = inputs
    out = parent / "merged"
    real = api.write_json

    def full(path, data):
        if Path(path).name == "config.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data)

    monkeypatch.setattr(api, "write_json", full)
    with pytest.raises(DiskSpaceError) as caught:
        mergeflow.merge(base, adapter, out, max_shard_size=SHARD)
    staging = Staging.for_output(out)
    message = str(caught.value)
    assert message.startswith(f"{staging.folder / 'config.json'}: no space left on the device")
    assert f"the staging folder {staging.folder} is kept" in message
    assert isinstance(caught.value.__cause__, OSError) and not isinstance(caught.value, InputError)
    assert not out.exists() and not list(parent.rglob(MANIFEST))
    monkeypatch.undo()
    assert mergeflow.merge(base, adapter, out, max_shard_size=SHARD).shards_resumed >= 1


def test_other_write_errors_are_not_disk_errors(tmp_path, monkeypatch):
    import torch

    from mergeflow.engine.writer import ShardWriter

    FullDisk(200, error=errno.EIO).install(monkeypatch.setattr)
    with pytest.raises(OSError) as caught, \
            ShardWriter(tmp_path / "x.safetensors", [("w", "F32", [64])]) as shard:
        shard.write("w", torch.zeros(64))
    assert caught.value.errno == errno.EIO and not isinstance(caught.value, DiskSpaceError)
    assert caught.value.__cause__ is None
    assert not list(tmp_path.iterdir())


def _cli_child_disk_full(args: list[str], stdout_path: str, stderr_path: str,
                         env: dict[str, str], where: str) -> None:
    """The CLI with the disk filling up in the shard writer or while finalizing."""
    from helpers import _cli_child

    if where == "writer":
        FullDisk(20_000).install(setattr)
    else:
        real = api.write_json

        def full(path, data):
            if Path(path).name == "config.json":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            real(path, data)

        api.write_json = full
    _cli_child(args, stdout_path, stderr_path, env)


@pytest.mark.parametrize("where", ["writer", "finalize"])
def test_cli_disk_full_mid_merge_exits_1_with_one_line(inputs, parent, tmp_path, prefect_server,
                                                       where):
    """Through the Prefect flow: a full disk in a merge task or while finalizing.

    This exited 2 before issue 15. Exit 2 promises "refused before anything was written", but
    here the merge had started: the staging folder holds the plan and any finished shards,
    which a rerun resumes from. So a disk filling up mid-merge exits 1, and its one line says
    the staging folder is kept (the preflight's refusal, before any work, still exits 2)."""
    base, adapter = inputs
    out = parent / "merged"
    paths = (str(tmp_path / "out.txt"), str(tmp_path / "err.txt"))
    args = ["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out),
            "--workers", "1", "--max-shard-size", SHARD]
    proc = start_forked(_cli_child_disk_full,
                        (args, *paths, {"PREFECT_API_URL": prefect_server}, where))
    code = join_forked(proc)
    stderr = Path(paths[1]).read_text()
    assert code == 1, stderr
    lines = [line for line in stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "no space left on the device" in lines[0], stderr
    name = "model-00001-of-0000" if where == "writer" else "config.json"
    assert name in lines[0]
    assert "staging folder" in lines[0] and "is kept" in lines[0] and "resume" in lines[0]
    assert not out.exists() and not list(parent.rglob(MANIFEST))
    assert Staging.for_output(out).folder.is_dir()  # kept for the rerun
    Staging.for_output(out).remove()
