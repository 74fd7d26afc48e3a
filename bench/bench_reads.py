"""Benchmark: how a merge should read its base (issue 27, item 3): each way of getting a shard's
bytes into the float32 work block, against ``cp`` of the same file.

    python bench/bench_reads.py --repeats 3 \
        --file /tmp/mf-bench/models/3.6b/base/model-00002-of-00008.safetensors

Every route reads the whole file in 6 MiB blocks of bf16 and widens each to float32 in one reused
work buffer (what the merge does before its LoRA ``addmm``):

* ``pread``: ``os.preadv`` into one reused buffer, then ``.float()`` into the work block (the
  merge's route); with the page cache warm, and cold (caches dropped first; needs root);
* ``O_DIRECT``: the same from an ``O_DIRECT`` descriptor (4 KiB-aligned buffer and offsets): no
  page cache at all, so always cold;
* ``mmap``: the file mapped, each block widened straight from the mapping (one copy fewer), then
  ``MADV_DONTNEED`` on it so the RSS stays flat; warm and cold.

``cp`` + ``sync`` of the file to the same folder is the disk's reference. Each route runs in this
process; user and system CPU seconds come from ``getrusage``. Medians of the repeats, interleaved.
"""

from __future__ import annotations

import argparse
import mmap
import os
import resource
import statistics
import subprocess
import time
import warnings
from pathlib import Path

import torch

BLOCK = 6 * 2**20  # bytes of bf16 per block: the merge's default 12 MiB float32 block
ALIGN = 4096


def drop_caches() -> bool:
    """Drop the page cache (root only); False when not allowed."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def widen(raw: torch.Tensor, work: torch.Tensor) -> None:
    """bf16 bytes -> the float32 work block, as the merge's block loop does."""
    values = raw.view(torch.bfloat16)
    work[: values.numel()].copy_(values)


def read_pread(path: Path, work: torch.Tensor, direct: bool = False) -> int:
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags)
    size = os.fstat(fd).st_size
    # an aligned buffer (mmap'd memory is page-aligned), as O_DIRECT needs
    buf = mmap.mmap(-1, BLOCK + ALIGN)
    view = memoryview(buf)
    raw = torch.frombuffer(buf, dtype=torch.uint8)
    done = 0
    try:
        while done < size:
            want = min(BLOCK, size - done)
            got = os.preadv(fd, [view[: (want + ALIGN - 1) // ALIGN * ALIGN if direct else want]],
                            done)
            got = min(got, want)
            if got <= 0:
                break
            widen(raw[: got - got % 2], work)
            done += got
    finally:
        view.release()
        del raw
        buf.close()
        os.close(fd)
    return done


def read_mmap(path: Path, work: torch.Tensor) -> int:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        mapped = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    try:
        done = 0
        while done < size:
            want = min(BLOCK, size - done)
            with warnings.catch_warnings():  # read-only mapping: only ever read from here
                warnings.simplefilter("ignore")
                block = torch.frombuffer(mapped, dtype=torch.uint8, count=want - want % 2,
                                         offset=done)
            widen(block, work)
            del block
            start = done // mmap.PAGESIZE * mmap.PAGESIZE
            mapped.madvise(mmap.MADV_DONTNEED, start, done + want - start)
            done += want
    finally:
        mapped.close()
    return done


def run_cp(path: Path) -> None:
    dest = path.with_name(f".bench-reads-copy-{os.getpid()}")
    subprocess.run(["cp", "--reflink=never", str(path), str(dest)], check=True)
    fd = os.open(dest, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    dest.unlink()


def timed(fn) -> tuple[float, float, float]:
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    fn()
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    return wall, after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--file", required=True, type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one merge worker's math thread
    work = torch.empty(BLOCK // 2, dtype=torch.float32)
    can_drop = drop_caches()
    routes = {
        "pread, warm": (False, lambda: read_pread(args.file, work)),
        "mmap + MADV_DONTNEED, warm": (False, lambda: read_mmap(args.file, work)),
        **({"pread, cold": (True, lambda: read_pread(args.file, work)),
            "mmap + MADV_DONTNEED, cold": (True, lambda: read_mmap(args.file, work))}
           if can_drop else {}),
        "O_DIRECT": (True, lambda: read_pread(args.file, work, direct=True)),
        "cp + sync (reference)": (False, lambda: run_cp(args.file)),
    }
    figures: dict[str, list[tuple[float, float, float]]] = {name: [] for name in routes}
    for _ in range(args.repeats):
        for name, (cold, fn) in routes.items():
            if cold and can_drop:
                drop_caches()
            elif not cold:
                read_pread(args.file, work)  # warm the cache
            figures[name].append(timed(fn))
    size = args.file.stat().st_size / 1e9
    print(f"{args.file} ({size:.2f} GB), {args.repeats} repeats, medians"
          + ("" if can_drop else "; cold routes left out (dropping the page cache needs root)"))
    print("\n| route | wall s | GB/s | user s | system s |\n| --- | ---: | ---: | ---: | ---: |")
    for name, runs in figures.items():
        wall, user, system = (statistics.median(r[i] for r in runs) for i in range(3))
        print(f"| {name} | {wall:.2f} | {size / wall:.2f} | {user:.2f} | {system:.2f} |")


if __name__ == "__main__":
    main()
