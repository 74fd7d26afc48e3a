"""How the shard writer's bytes reach the disk (issue 27, item 3), against ``cp`` + ``sync``.

Writes N shards of S bytes each through Mergeflow's own ``ShardWriter`` (sha256 as it writes,
fsync, rename) by each route of ``mergeflow.storage.sink``:

* ``direct``: past the page cache (``O_DIRECT``, 4 MiB aligned writes; the default where the
  file system allows it);
* ``cached``: through the page cache, each 64 MiB window dropped once the disk has it
  (``MERGEFLOW_DIRECT_WRITES=0``);
* ``keep``: through the page cache with the drops switched off (the writer before issue 27);

and, for scale, ``cp`` of an S-byte file N times + ``sync``. Each route is its own process, all
back to back in each repeat (paired), the page cache dropped before each route where the
machine allows it (root); medians of wall, user and system seconds, and of the per-repeat
ratios.

    .venv/bin/python bench/bench_writes.py --files 4 --size 1.7GB --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BLOCK = 8 * 2**20  # bytes handed to the writer at a time, as a merge's row blocks are
ROW = 4096  # bf16 elements per row


def drop_cache() -> None:
    """Empty the page cache (root only; elsewhere the routes run warm)."""
    os.sync()
    with contextlib.suppress(OSError):
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


ROUTES = ("direct", "cached", "keep", "cp")


def write_shards(folder: Path, files: int, size: int, route: str) -> None:
    """``files`` one-tensor shards of about ``size`` bytes through ShardWriter."""
    import torch

    from mergeflow.engine import writer as writer_module
    from mergeflow.storage import sink

    os.environ[sink.DIRECT_WRITES] = "1" if route == "direct" else "0"
    if route == "keep":  # the writer as it was: pages left to the kernel
        sink.release_written = lambda *args: None
        sink.drop_cached = lambda *args: None
    block = torch.randint(-2**15, 2**15, (BLOCK // 2,), dtype=torch.int16).view(torch.bfloat16)
    rows_per_block = BLOCK // (2 * ROW)
    blocks = max(1, size // BLOCK)
    for i in range(files):
        specs = [("weight", "BF16", [blocks * rows_per_block, ROW])]
        with writer_module.ShardWriter(folder / f"shard-{i}.safetensors", specs) as writer:
            writer.begin(*specs[0])
            for _ in range(blocks):
                writer.append(block.view(rows_per_block, ROW))
            writer.end()


def child(route: str, folder: Path, files: int, size: int) -> None:
    """One route in this process; prints its wall, user and system seconds as JSON."""
    start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    if route == "cp":
        source = folder / "source"
        for i in range(files):
            shutil.copyfile(source, folder / f"copy-{i}")
        os.sync()
    else:
        write_shards(folder, files, size, route)
    after = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"wall": time.perf_counter() - start,
                      "user": after.ru_utime - before.ru_utime,
                      "sys": after.ru_stime - before.ru_stime}))


def run_route(route: str, folder: Path, files: int, size: int) -> dict[str, float]:
    drop_cache()
    out = subprocess.run([sys.executable, __file__, "--child", route, "--folder", str(folder),
                          "--files", str(files), "--size", str(size)],
                         check=True, capture_output=True, text=True).stdout
    for path in folder.iterdir():
        if path.name != "source":
            path.unlink()
    return json.loads(out.strip().splitlines()[-1])


def size_of(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for unit, factor in units.items():
        if text.upper().endswith(unit):
            return int(float(text[:-len(unit)]) * factor)
    return int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--size", default="1.7GB")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--folder", type=Path, help="where to write (default: a temporary folder)")
    parser.add_argument("--child", choices=ROUTES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = size_of(str(args.size))
    if args.child:
        child(args.child, args.folder, args.files, size)
        return
    folder = Path(tempfile.mkdtemp(prefix="bench-cache-", dir=args.folder))
    try:
        with open(folder / "source", "wb") as f:
            for _ in range(max(1, size // BLOCK)):
                f.write(os.urandom(BLOCK))
        runs = [{route: run_route(route, folder, args.files, size) for route in ROUTES}
                for _ in range(args.repeats)]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"{args.files} shards of {size / 1e9:.2f} GB, medians of {args.repeats} paired runs")
    for route in ROUTES:
        med = {k: statistics.median(r[route][k] for r in runs) for k in ("wall", "user", "sys")}
        print(f"{route:8s} wall {med['wall']:6.2f} s  user {med['user']:5.2f} s  "
              f"sys {med['sys']:5.2f} s")
    for route, peer in (("direct", "cached"), ("direct", "keep"), ("direct", "cp"),
                        ("cached", "cp")):
        ratio = statistics.median(r[route]["wall"] / r[peer]["wall"] for r in runs)
        cpu = statistics.median((r[route]["user"] + r[route]["sys"])
                                / max(1e-9, r[peer]["user"] + r[peer]["sys"]) for r in runs)
        print(f"{route} / {peer}: wall {ratio:.2f}x, CPU {cpu:.2f}x")


if __name__ == "__main__":
    main()
