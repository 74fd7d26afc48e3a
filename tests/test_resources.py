"""Workers, block size and torch threads from the machine (issue 11, item 6): mergeflow.pipeline.resources."""

from __future__ import annotations

import itertools
import os
import platform

import pytest
from helpers import run_python
from pydantic import ValidationError

from mergeflow.errors import InputError
from mergeflow.pipeline.resources import (
    BUFFERS_PER_WORKER,
    MALLOC_ARENAS,
    MIN_BLOCK,
    Resources,
    apply_threads,
    available_memory,
    decide,
    for_spec,
    limit_threads,
    running,
    usable_cpus,
)
from mergeflow.spec import MergeSpec

MiB, GiB = 2**20, 2**30
BLOCK = 32 * MiB
PLENTY = 64 * GiB


@pytest.mark.parametrize(("cpus", "workers", "threads"), [
    (1, 1, 1), (2, 2, 1), (3, 3, 1),  # small boxes: one worker per core, one torch thread
    (4, 2, 1), (6, 3, 1), (16, 8, 1), (64, 8, 6),  # one per two cores, at most 8
])
def test_automatic_workers_follow_the_cores(cpus, workers, threads):
    got = decide(None, BLOCK, None, cpus=cpus, available=PLENTY)
    assert (got.workers, got.torch_threads, got.block_bytes) == (workers, threads, BLOCK)
    assert got.memory_budget == PLENTY // 4


def test_explicit_workers_are_kept_and_threads_divided():
    assert decide(3, BLOCK, None, cpus=2, available=PLENTY) == Resources(
        workers=3, block_bytes=BLOCK, torch_threads=1, memory_budget=PLENTY // 4)
    assert decide(4, BLOCK, None, cpus=16, available=PLENTY).torch_threads == 2


def test_memory_limit_reduces_automatic_workers_first():
    got = decide(None, BLOCK, 256 * MiB, cpus=16, available=PLENTY)
    assert (got.workers, got.block_bytes, got.torch_threads) == (2, BLOCK, 6)
    assert got.working_bytes <= 256 * MiB


def test_default_budget_is_a_quarter_of_available_memory():
    got = decide(None, BLOCK, None, cpus=16, available=GiB)  # 256 MiB budget
    assert got.memory_budget == GiB // 4 and got.workers == 2


def test_memory_limit_then_shrinks_the_block():
    got = decide(2, BLOCK, 64 * MiB, cpus=8, available=PLENTY)
    assert (got.workers, got.block_bytes) == (2, 8 * MiB)
    got = decide(None, BLOCK, 16 * MiB, cpus=8, available=PLENTY)
    assert (got.workers, got.block_bytes) == (1, 4 * MiB)


def test_block_is_never_made_larger_than_asked():
    assert decide(None, 4 * MiB, 10 * GiB, cpus=2, available=PLENTY).block_bytes == 4 * MiB


def test_a_memory_limit_that_cannot_hold_the_workers_is_an_input_error():
    with pytest.raises(InputError, match="`memory_limit=8388608`: too small for 4 worker"):
        decide(4, BLOCK, 8 * MiB, cpus=8, available=PLENTY)
    with pytest.raises(InputError, match="`memory_limit=1048576`: too small"):
        decide(None, BLOCK, MiB, cpus=2, available=PLENTY)


def test_unknown_memory_decides_from_the_cores_alone():
    got = decide(None, BLOCK, None, cpus=8, available=0)
    assert (got.workers, got.block_bytes, got.memory_budget) == (4, BLOCK, None)


@pytest.mark.parametrize("bad", [dict(workers=0), dict(block_bytes=0), dict(memory_limit=-1)])
def test_non_positive_values_are_refused(bad):
    args = dict(workers=None, block_bytes=BLOCK, memory_limit=None) | bad
    with pytest.raises(InputError):
        decide(**args, cpus=2, available=PLENTY)


def test_the_bound_holds_whenever_a_limit_is_set():
    """workers x BUFFERS_PER_WORKER x block <= --memory-limit, for every accepted combination."""
    for workers, block, limit, cpus in itertools.product(
            [None, 1, 2, 5, 16], [MIN_BLOCK, 8 * MiB, 32 * MiB, 100 * MiB],
            [4 * MiB, 20 * MiB, 300 * MiB, 5 * GiB], [1, 2, 4, 7, 32]):
        try:
            got = decide(workers, block, limit, cpus=cpus, available=PLENTY)
        except InputError:
            assert (workers or 1) * BUFFERS_PER_WORKER * MIN_BLOCK > limit
            continue
        assert got.working_bytes <= limit, (workers, block, limit, cpus, got)
        assert got.block_bytes <= block and got.block_bytes >= min(block, MIN_BLOCK)
        assert got.torch_threads == max(1, (cpus - 2 * got.workers) // got.workers)
        if workers is not None:
            assert got.workers == workers


def test_machine_probes(tmp_path):
    assert usable_cpus() >= 1
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16384 kB\nMemFree:  100 kB\nMemAvailable:    8192 kB\n")
    assert available_memory(str(meminfo)) == 8192 * 1024
    real = available_memory()
    assert real is None or real > 0


def test_for_spec_parses_the_sizes_and_names_the_option():
    spec = MergeSpec(adapter="a", out="o", workers=2, block_size="8MiB", memory_limit="1gb")
    got = for_spec(spec, cpus=4, available=PLENTY)
    assert (got.workers, got.block_bytes, got.memory_budget) == (2, 8 * MiB, 10**9)
    assert for_spec(MergeSpec(adapter="a", out="o"), cpus=2, available=PLENTY).workers == 2
    with pytest.raises(ValidationError, match="memory_limit"):  # the spec refuses it first
        MergeSpec(adapter="a", out="o", memory_limit="0MB")
    unchecked = MergeSpec(adapter="a", out="o").model_copy(update={"memory_limit": "0MB"})
    with pytest.raises(InputError, match="`memory_limit` '0MB': must be a positive size"):
        for_spec(unchecked, cpus=2)


@pytest.mark.parametrize(("cpus", "outputs", "workers", "threads"), [
    (2, 1, 2, 1), (2, 2, 2, 1), (2, 4, 2, 1),  # one worker per core, one torch thread each
    (1, 4, 1, 1), (3, 2, 2, 1),
    (16, 2, 2, 6), (16, 4, 4, 2), (16, 12, 8, 1),  # above 4 cores: one per output, as for one
])
def test_a_batch_merges_outputs_side_by_side(cpus, outputs, workers, threads):
    got = decide(None, BLOCK, None, cpus=cpus, available=PLENTY, outputs=outputs)
    assert (got.workers, got.torch_threads, got.block_bytes) == (workers, threads, BLOCK)


def test_a_batch_adds_workers_only_where_their_blocks_fit_the_budget():
    """More outputs never shrink the block a one-output plan was given (the plan's block is
    what each worker uses): extra workers are dropped first."""
    one = decide(None, BLOCK, 4 * BLOCK, cpus=2, available=PLENTY)
    batch = decide(None, BLOCK, 4 * BLOCK, cpus=2, available=PLENTY, outputs=4)
    assert (batch.workers, batch.block_bytes) == (1, one.block_bytes)
    assert decide(None, BLOCK, 8 * BLOCK, cpus=2, available=PLENTY, outputs=4).workers == 2
    assert decide(3, BLOCK, None, cpus=2, available=PLENTY, outputs=4).workers == 3  # as asked


@pytest.mark.parametrize(("cpus", "shards", "workers", "threads"), [
    (16, 1, 1, 14), (16, 2, 2, 6), (16, 4, 4, 2), (16, 8, 8, 1), (16, 20, 8, 1),
    (2, 1, 1, 1), (2, 5, 2, 1),  # two cores: the writer and the hasher share one
])
def test_fewer_shards_than_workers_give_the_idle_workers_cores_to_torch(cpus, shards, workers,
                                                                         threads):
    decided = decide(None, BLOCK, None, cpus=cpus, available=PLENTY)
    got = running(decided, shards, cpus=cpus)
    assert (got.workers, got.torch_threads) == (workers, threads)
    assert (got.block_bytes, got.memory_budget) == (decided.block_bytes, decided.memory_budget)
    assert got.working_bytes <= decided.working_bytes  # never more memory than decided


def test_torch_threads_come_back_for_a_later_merge_and_tasks_only_lower_them(monkeypatch):
    """A long-lived process: a merge with many workers lowers torch's threads; a later one with
    fewer raises them again, never above what torch had before Mergeflow first set them; a
    task's ceiling (``limit_threads``) never raises them."""
    torch = pytest.importorskip("torch")
    import mergeflow.pipeline.resources as resources

    monkeypatch.delenv("MERGEFLOW_TORCH_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    monkeypatch.setattr(resources, "_first_seen_threads", None)
    monkeypatch.setattr(resources, "usable_cpus", lambda: 16)  # limit_threads(1): 15 threads
    try:
        torch.set_num_threads(4)
        apply_threads(Resources(workers=4, block_bytes=BLOCK, torch_threads=1))
        assert torch.get_num_threads() == 1
        limit_threads(1)  # a task's ceiling: cpus - 1 threads, but never more than now
        assert torch.get_num_threads() == 1
        apply_threads(Resources(workers=1, block_bytes=BLOCK, torch_threads=3))
        assert torch.get_num_threads() == 3
        apply_threads(Resources(workers=1, block_bytes=BLOCK, torch_threads=15))
        assert torch.get_num_threads() == 4  # what it had before the first merge
        monkeypatch.setenv("MERGEFLOW_TORCH_THREADS", "2")
        apply_threads(Resources(workers=1, block_bytes=BLOCK, torch_threads=15))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# A fresh interpreter: (optionally) the code under test, then six threads that each allocate
# and hold a block at once, then glibc's own count of its arenas (malloc_stats, on stderr).
_ARENAS = """
import ctypes, json, os, sys, tempfile, threading
{setup}
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
held = threading.Barrier(6)

def allocate():
    block = libc.malloc(2**20)
    held.wait()  # every thread holds a block at the same moment
    libc.free(block)

threads = [threading.Thread(target=allocate) for _ in range(6)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
with tempfile.TemporaryFile("w+") as log:
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(log.fileno(), 2)
    libc.malloc_stats()
    os.dup2(saved, 2)
    log.seek(0)
    stats = log.read()
print(json.dumps({{"arenas": stats.count("Arena "), "set": {result}}}))
"""


def _arenas(setup: str = "", result: str = "None") -> dict:
    return run_python(_ARENAS.format(setup=setup, result=result))


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or "MALLOC_ARENA_MAX" in os.environ,
                    reason="glibc's allocator, not limited by the environment already")
def test_a_merging_process_keeps_two_malloc_arenas():
    """Without the limit, glibc gives the six threads arenas of their own; with it, the
    process keeps two, and the CLI's entry point sets it before anything else runs."""
    assert _arenas()["arenas"] > MALLOC_ARENAS  # the control: the limit is what changes it
    limited = _arenas("from mergeflow.pipeline.resources import limit_malloc_arenas\n"
                      "done = limit_malloc_arenas()", "done")
    assert limited == {"arenas": MALLOC_ARENAS, "set": True}
    # the `mergeflow` command: main() runs the app last; here the app is the threads above
    cli = _arenas("import mergeflow.cli.__main__ as entry\n"
                  "entry.run_then_leave = lambda app: None\n"
                  "entry.main()")
    assert cli["arenas"] == MALLOC_ARENAS
