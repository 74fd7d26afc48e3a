"""How many layer groups to merge at once, with how many torch threads and how big a block.

:func:`decide` is a pure function of the request (``--workers``, ``--block-size``,
``--memory-limit``) and of the machine (usable cores, available memory), so it can be tested
for any machine. The rule:

* **Memory.** Each worker holds about :data:`BUFFERS_PER_WORKER` blocks of working buffers (the
  read block, its float32 copy, the merged block and the encoded bytes being written), so
  ``workers x BUFFERS_PER_WORKER x block_bytes`` must fit the budget: ``--memory-limit``, else a
  quarter of the available memory. When it does not, automatic workers are reduced first, then
  the block is made smaller (not below :data:`MIN_BLOCK`).
* **Cores.** Each worker merges on one thread while its writer thread hashes and writes what
  it merged, and its input hasher hashes what it read, each costing about as much. Below four
  usable cores there is one worker per core, each with one torch thread: a second worker's
  math fills what the first's writer leaves (on two cores, the 3.6b with its two output
  shards: 8.9 s against 9.6 s with one worker, medians of 4 pairs; four 1.7 GB outputs of a
  batch: 9.6 s against 10.7 s). Above, one worker per two cores (at most
  :data:`MAX_AUTO_WORKERS`), each with the cores left once every writer and hasher has one
  (:func:`torch_threads`).
* **Fewer shards than workers** (:func:`running`): only as many workers run as there are shards
  to write, and the cores the idle workers would have had go to the running ones' torch threads:
  a one-shard output on 16 cores merges with 14 torch threads, not 1.
* **Several outputs** (a batch, :mod:`mergeflow.pipeline.many`): the sweep merges one shard of
  each of ``outputs`` side by side, one worker each, at most the one-output count.
* **The allocator** (:func:`limit_malloc_arenas`): a merging process keeps at most
  :data:`MALLOC_ARENAS` of glibc's malloc arenas.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, replace

from mergeflow.errors import InputError
from mergeflow.spec import size_bytes

# Blocks of working memory per worker, at most (mergeflow.engine.readers): the float32 work block,
# the read buffers and the encoded blocks in the writer's hands (16-bit models: 1 + 3 read slots
# of half a block, hashed behind the reads, + 3 of half a block; float32 in and out: 1 + 1 + 2).
BUFFERS_PER_WORKER = 4
MIN_BLOCK = 2**20  # 1 MiB: below this, per-block overhead dominates
MAX_AUTO_WORKERS = 8
MEMORY_SHARE = 4  # the default budget is available memory / MEMORY_SHARE
MALLOC_ARENAS = 2  # glibc malloc arenas a merging process keeps (limit_malloc_arenas)
_M_ARENA_MAX = -8  # glibc's mallopt() parameter for it (malloc.h)


@dataclass(frozen=True)
class Resources:
    """What a merge runs with: parallel layer groups, row-block size, torch threads each."""

    workers: int
    block_bytes: int
    torch_threads: int
    memory_budget: int | None = None  # bytes the workers' buffers must fit (None: unknown)

    @property
    def working_bytes(self) -> int:
        """The buffers' bound: workers x BUFFERS_PER_WORKER x block_bytes."""
        return self.workers * BUFFERS_PER_WORKER * self.block_bytes


def usable_cpus() -> int:
    """Cores this process may run on (its CPU affinity), else the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def available_memory(meminfo: str = "/proc/meminfo") -> int | None:
    """``MemAvailable`` in bytes (Linux), else free physical pages; None when unknown."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def automatic_workers(cpus: int, outputs: int = 1) -> int:
    """Workers when ``--workers`` is not given, before the memory budget has its say: see the
    module docstring (cores, several outputs)."""
    one = cpus if cpus < 4 else min(MAX_AUTO_WORKERS, cpus // 2)
    return one if outputs <= 1 else min(outputs, one)


def decide(workers: int | None, block_bytes: int, memory_limit: int | None,
           cpus: int | None = None, available: int | None = None,
           outputs: int = 1) -> Resources:
    """Choose workers, block size and torch threads (see the module docstring for the rule).

    Args:
        workers: ``--workers`` (None: automatic).
        block_bytes: ``--block-size`` in bytes (the largest block; it may be made smaller).
        memory_limit: ``--memory-limit`` in bytes (None: a quarter of ``available``).
        cpus: usable cores (None: this process's CPU affinity).
        available: available memory in bytes (None: read ``/proc/meminfo``).
        outputs: outputs merged side by side (a batch's sweep), one worker each at most.

    Raises:
        InputError: a value is not positive, or ``--memory-limit`` cannot hold even one block
            per requested worker.
    """
    if workers is not None and workers < 1:
        raise InputError(f"`workers={workers}`: must be at least 1")
    if block_bytes <= 0:
        raise InputError(f"`block_size={block_bytes}`: must be positive")
    if memory_limit is not None and memory_limit <= 0:
        raise InputError(f"`memory_limit={memory_limit}`: must be positive")
    cpus = max(1, cpus if cpus is not None else usable_cpus())
    if memory_limit is None:
        available = available if available is not None else available_memory()
    budget = memory_limit if memory_limit is not None else (
        available // MEMORY_SHARE if available else None)
    count = workers if workers is not None else automatic_workers(cpus, outputs)
    block = block_bytes
    if budget is not None:
        if workers is None:  # fewer automatic workers before smaller blocks
            count = max(1, min(count, budget // (BUFFERS_PER_WORKER * block)))
        if count * BUFFERS_PER_WORKER * block > budget:
            block = max(MIN_BLOCK, budget // (count * BUFFERS_PER_WORKER))
            block = min(block, block_bytes)
        if count * BUFFERS_PER_WORKER * block > budget and memory_limit is not None:
            need = count * BUFFERS_PER_WORKER * MIN_BLOCK
            raise InputError(
                f"`memory_limit={memory_limit}`: too small for {count} worker(s); each needs "
                f"{BUFFERS_PER_WORKER} blocks of at least {MIN_BLOCK // 2**20} MiB ({need} bytes "
                "in all); raise `memory_limit` or lower `workers`")
    return Resources(workers=count, block_bytes=block, torch_threads=torch_threads(cpus, count),
                     memory_budget=budget)


def for_spec(spec, cpus: int | None = None, available: int | None = None,
             outputs: int = 1) -> Resources:
    """:func:`decide` for a :class:`~mergeflow.spec.MergeSpec` (sizes parsed, errors naming
    the option); ``outputs``: merged side by side with the same options (a batch)."""
    return decide(spec.workers, size_option(spec.block_size, "block_size"),
                  size_option(spec.memory_limit, "memory_limit")
                  if spec.memory_limit is not None else None, cpus=cpus, available=available,
                  outputs=outputs)


def running(decided: Resources, shards: int, cpus: int | None = None) -> Resources:
    """``decided`` as it runs ``shards`` shards: at most one worker per shard, and the torch
    threads recomputed for the workers that run (:func:`torch_threads`), on ``cpus`` usable cores
    (None: this process's)."""
    workers = max(1, min(decided.workers, shards))
    cpus = max(1, cpus if cpus is not None else usable_cpus())
    return replace(decided, workers=workers, torch_threads=torch_threads(cpus, workers))


def size_option(text: str | int, option: str) -> int:
    """A size option (``24MiB``, ``5gb``, ``1000000``) in bytes, via
    :func:`mergeflow.spec.size_bytes` (the parser the spec validates with).

    Raises:
        InputError: naming ``option`` (a MergeSpec field name, in backticks).
    """
    try:
        return size_bytes(text)
    except ValueError as exc:
        raise InputError(f"`{option}` {exc}") from None


def torch_threads(cpus: int, workers: int) -> int:
    """Intra-op threads per worker: the cores left once each worker's writer thread (which
    writes and sha256-hashes the output at about a core's speed) and its input hasher (which
    hashes the 16-bit rows it reads, :func:`mergeflow.storage.hashing.hashing_behind`) have
    one each, shared out. More would oversubscribe the cores, and OpenMP's spinning threads
    then stall each other: on 2 busy cores a merge measured 6x slower with 2 torch threads
    than with 1."""
    return max(1, (cpus - 2 * workers) // workers)


_first_seen_threads: int | None = None  # torch's intra-op threads before Mergeflow set them


def apply_threads(decided: Resources, lower_only: bool = False) -> None:
    """Give torch ``decided.torch_threads`` intra-op threads, never more than it had before
    Mergeflow first set them in this process (its default, or the caller's own
    ``torch.set_num_threads``), so a long-lived process (a Prefect worker, a training script)
    gets them back for a merge that runs fewer workers than the last one; ``lower_only``: only
    ever fewer than it has now. ``MERGEFLOW_TORCH_THREADS`` or ``OMP_NUM_THREADS``, when set,
    win."""
    import torch

    global _first_seen_threads
    wanted = os.environ.get("MERGEFLOW_TORCH_THREADS")
    if wanted is None and os.environ.get("OMP_NUM_THREADS"):
        return
    if _first_seen_threads is None:
        _first_seen_threads = torch.get_num_threads()
    threads = int(wanted) if wanted else min(decided.torch_threads, _first_seen_threads)
    current = torch.get_num_threads()
    if wanted or threads < current or (threads > current and not lower_only):
        torch.set_num_threads(max(1, threads))


def limit_threads(workers: int = 1) -> None:
    """:func:`apply_threads` for ``workers`` merging at once on this machine's cores (a task
    runner's worker, which knows no spec): a ceiling, never more threads than the flow's own
    division left (``lower_only``)."""
    cpus = usable_cpus()
    apply_threads(Resources(workers=workers, block_bytes=MIN_BLOCK,
                            torch_threads=torch_threads(cpus, workers)), lower_only=True)


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Let glibc's allocator keep at most ``arenas`` arenas in this process (unless
    ``MALLOC_ARENA_MAX`` says otherwise); True if the limit was set.

    glibc gives each new thread that allocates an arena of its own, up to eight per core, and
    each arena keeps the blocks freed into it for its next allocations. A merge's many threads
    (readers, input hashers, shard writers, the merge ahead's, verification's) each then keep
    blocks of their own, and the process's RSS grows past what is in use. With two arenas, a
    cold 3.6b CLI merge peaked at 0.42 GiB instead of 0.46 (medians of 4 pairs), in the same
    time: each allocation is a whole block, so the threads hardly wait for an arena's lock.

    Call it before the threads start: an arena, once made, stays. It does nothing where the C
    library has no ``mallopt`` (not glibc). The CLI calls it for its own process; a library
    caller's process is its own, so :func:`mergeflow.merge` leaves the allocator alone.
    """
    if "MALLOC_ARENA_MAX" in os.environ:  # the user's choice, already read by glibc
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError, TypeError):  # no such library or function here
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(_M_ARENA_MAX, arenas) == 1
