"""The CUDA route, run for real: tests, byte comparisons with the CPU route, memory, core scaling.

    scripts/gpu-check OUTDIR                  # what the device machine runs (see the README)
    python bench/gpu_check.py OUTDIR --sizes tiny --cores 1,2 --skip-tests   # a quick dry run

Steps, in order of importance (each writes its results into OUTDIR as soon as it ends, so a run
cut short still reports what it did):

1. ``tests``: the ``gpu``-marked tests (``pytest -m gpu`` over the test files that hold them);
   log in ``OUTDIR/gpu-tests.log``.
2. ``merges``: for each size (default ``0.9b`` and ``70b-slice-1``, built as ``bench/bench_merge.py``
   builds them), one merge with ``device=cpu`` and one with ``device=cuda``, each in a process of
   its own: wall time, host peak RSS, device peak memory (``torch.cuda.max_memory_reserved``)
   checked against the merge's memory budget (``memory_limit``, what ``save_pretrained_merged``'s
   ``maximum_memory_usage`` sets), and the sha256 of every output tensor compared between the
   routes. A tensor whose bytes differ is listed with its largest difference in bf16 ulps.
3. ``disk``: ``cp`` + ``sync`` of the first size's base shards into the work folder, and ``dd`` of
   as many bytes in 4 MiB ``O_DIRECT`` writes, fsynced, timed: the speed of the disk the curves
   write to (a merge cannot write faster than the second).
4. ``scaling``: the CPU route's throughput (output bytes / wall second) on 1, 2, 4, 8 and 16 cores
   (CPU affinity set before the merge starts, so Mergeflow sizes its workers and torch threads
   from it), on the first size, in 1GB shards; ``scaling_one_shard``: the same output in one
   shard on 1 and 16 cores (``--one-shard-cores``), where one worker runs and the cores the
   idle workers would have had go to its torch threads; and ``scaling_tmpfs``: the 1GB-shard
   curve again with the outputs in ``/dev/shm`` (``--tmpfs``; RAM, no disk), where the merge is
   bound by its cores alone. Each merge records its steps' wall times (``steps_s``: planning with
   the layout's child as ``load``, then ``merge``, ``finalize``, ``verify``), so a flat curve
   shows where its time went.

``OUTDIR/gpu-check.json`` holds every figure; ``OUTDIR/gpu-check.md`` the same as tables for
``docs/benchmarks.md``. Nothing is downloaded: the packages the device machine lacks travel as
wheels (``scripts/gpu-check`` installs ``.whl/*.whl`` when the folder is there).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import bench_merge  # noqa: E402  (the benchmark's model builders)

MEMORY_LIMIT = "4GiB"  # the merge's working-memory budget, on the host and on the device


def log(msg: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------
# One merge, in a process of its own (``--_merge``)


def _merge_child(base: str, adapter: str, out: str, device: str, result: str,
                 max_shard_size: str = "1GB") -> None:
    import torch

    import mergeflow

    t0 = time.perf_counter()
    report = mergeflow.merge(base, adapter, out, device=device, max_shard_size=max_shard_size,
                             no_tokenizer=True, memory_limit=MEMORY_LIMIT, overwrite=True)
    wall = time.perf_counter() - t0
    figures = {"wall_s": wall, "status": report.status,
               "host_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
               "steps_s": dict(report.timings)}
    if device == "cuda":
        figures["device_peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        figures["device_peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    Path(result).write_text(json.dumps(figures))


def run_merge(base: Path, adapter: Path, out: Path, device: str, work: Path,
              cpus: int | None = None, max_shard_size: str = "1GB") -> dict:
    """One merge in a fresh process (on ``cpus`` cores when given); its figures."""
    shutil.rmtree(out, ignore_errors=True)
    result = work / f"result-{device}-{cpus}.json"
    cmd = [sys.executable, __file__, "--_merge", str(base), str(adapter), str(out), device,
           str(result), max_shard_size]
    env = dict(os.environ, MERGEFLOW_CACHE=str(work / f"cache-{device}-{cpus}"))
    shutil.rmtree(env["MERGEFLOW_CACHE"], ignore_errors=True)
    preexec = (lambda: os.sched_setaffinity(0, range(cpus))) if cpus else None
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, preexec_fn=preexec)
    if proc.returncode != 0:
        raise RuntimeError(f"{device} merge failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    figures = json.loads(result.read_text())
    written = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    figures.update(written_gb=written / 1e9, write_gbps=written / 1e9 / figures["wall_s"])
    return figures


# --------------------------------------------------------------------------------------------
# Comparing outputs tensor by tensor


def _header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return 8 + n, json.loads(f.read(n))


def tensor_digests(folder: Path) -> dict[str, tuple[str, Path, int, int, str]]:
    """name -> (sha256 of its bytes, file, start, end, dtype) for every tensor in ``folder``."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        start, header = _header(path)
        with open(path, "rb") as f:
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                a, b = info["data_offsets"]
                f.seek(start + a)
                h, left = hashlib.sha256(), b - a
                while left:
                    chunk = f.read(min(left, 16 << 20))
                    h.update(chunk)
                    left -= len(chunk)
                out[name] = (h.hexdigest(), path, start + a, start + b, info["dtype"])
    return out


def _max_ulps(a: tuple, b: tuple) -> float:
    """Largest difference between two bf16 tensors' values, in bf16 ulps of the larger one."""
    import torch

    def load(entry):
        _, path, start, end, _ = entry
        with open(path, "rb") as f:
            f.seek(start)
            return torch.frombuffer(bytearray(f.read(end - start)), dtype=torch.bfloat16).float()

    x, y = load(a), load(b)
    ulp = torch.maximum(x.abs(), y.abs()).clamp_min(1e-30) * 2.0**-7
    return float(((x - y).abs() / ulp).max())


def compare(cpu: Path, cuda: Path) -> dict:
    """Whether the two outputs hold the same tensors with the same bytes, and where not, how far."""
    a, b = tensor_digests(cpu), tensor_digests(cuda)
    differ = sorted(n for n in a.keys() & b.keys() if a[n][0] != b[n][0])
    detail = {n: _max_ulps(a[n], b[n]) for n in differ[:12] if a[n][4] == "BF16"}
    return {"tensors": len(a), "same_names": a.keys() == b.keys(), "differing": len(differ),
            "identical": a.keys() == b.keys() and not differ,
            "differing_max_bf16_ulps": detail}


# --------------------------------------------------------------------------------------------
# The steps


def environment() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cuda_available": torch.cuda.is_available(), "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
        info["device_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    for name in ("transformers", "peft", "safetensors", "pydantic", "bitsandbytes"):
        try:
            info[name] = __import__(name).__version__
        except Exception as exc:
            info[name] = f"missing ({type(exc).__name__})"
    return info


def gpu_test_files() -> list[str]:
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py")
                  if "mark.gpu" in p.read_text())


def run_tests(outdir: Path) -> dict:
    files = gpu_test_files()
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-q", *files]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    (outdir / "gpu-tests.log").write_text(proc.stdout + proc.stderr)
    last = (proc.stdout.strip().splitlines() or [""])[-1]
    return {"files": files, "rc": proc.returncode, "summary": last,
            "wall_s": time.perf_counter() - t0}


def merge_both_routes(size: str, work: Path) -> dict:
    base, adapter, params = bench_merge.ensure_inputs(size, work)
    out = work / "runs" / size
    figures: dict = {"params": params}
    for device in ("cpu", "cuda"):
        log(f"{size}: merging with device={device} ...")
        figures[device] = run_merge(base, adapter, out / device, device, work)
        log(f"{size}: {device}: {figures[device]}")
    figures["comparison"] = compare(out / "cpu", out / "cuda")
    budget = bench_merge_size_bytes(MEMORY_LIMIT)
    reserved = figures["cuda"].get("device_peak_reserved_gib", 0) * 2**30
    figures["device_memory_within_budget"] = reserved <= budget
    log(f"{size}: comparison {figures['comparison']}")
    shutil.rmtree(out, ignore_errors=True)
    return figures


def bench_merge_size_bytes(text: str) -> int:
    from mergeflow.spec import size_bytes

    return size_bytes(text)


def scaling(size: str, work: Path, cores: list[int], max_shard_size: str = "1GB",
            out: Path | None = None) -> dict:
    """The CPU route's figures on each count of ``cores``, output shards of ``max_shard_size``
    (the 0.9b: two shards at 1GB, one at 5GB, where the workers' idle cores go to torch),
    written into ``out`` (default: the work folder's disk)."""
    base, adapter, _ = bench_merge.ensure_inputs(size, work)
    out = out if out is not None else work / "runs" / "scaling"
    usable = len(os.sched_getaffinity(0))
    curve = {}
    for n in cores:
        if n > usable:
            continue
        log(f"{size}: CPU route on {n} core(s), {max_shard_size} shards, into {out} ...")
        figures = run_merge(base, adapter, out, "cpu", work, cpus=n,
                            max_shard_size=max_shard_size)
        curve[str(n)] = {k: figures[k] for k in ("wall_s", "write_gbps", "host_peak_rss_gib",
                                                 "steps_s")}
        log(f"{size}: {n} core(s): {curve[str(n)]}")
    shutil.rmtree(out, ignore_errors=True)
    return curve


def disk_speed(size: str, work: Path) -> dict:
    """What the disk the merges write to takes for the same bytes: ``cp`` + ``sync`` of the
    base's shards into the work folder (no reflink; through the page cache) and ``dd`` of as many
    bytes in 4 MiB ``O_DIRECT`` writes, fsynced (the disk itself, written as Mergeflow writes)."""
    base, _, _ = bench_merge.ensure_inputs(size, work)
    shards = sorted(base.glob("*.safetensors"))
    written = bench_merge.shard_bytes(base)
    dest = work / "runs" / "disk"
    routes = {"cp_sync": bench_merge.cp_sync_command(dest, shards),
              "dd_direct": bench_merge.dd_direct_command(dest / "zeros", written)}
    figures = {}
    for route, command in routes.items():
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        os.sync()
        bench_merge.warm_page_cache(base)  # from the page cache, as the merges read them
        t0 = time.perf_counter()
        subprocess.run(command, check=True)
        wall = time.perf_counter() - t0
        figures[route] = {"wall_s": wall, "write_gbps": written / 1e9 / wall}
    shutil.rmtree(dest, ignore_errors=True)
    return figures


def tmpfs_folder(need_bytes: int) -> Path | None:
    """A folder in ``/dev/shm`` (RAM) with room for ``need_bytes`` twice over, or None."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or shutil.disk_usage(shm).free < 2 * need_bytes:
        return None
    return shm / f"mf-gpu-check-{os.getpid()}"


def markdown(results: dict) -> str:
    lines = [f"Environment: {json.dumps(results.get('environment', {}))}", ""]
    tests = results.get("tests")
    if tests:
        lines += [f"GPU tests ({', '.join(tests['files'])}): rc {tests['rc']}, {tests['summary']}", ""]
    merges = results.get("merges", {})
    if merges:
        lines += ["| size | route | wall s | GB/s written | host peak RSS GiB | device peak GiB "
                  "(reserved / allocated) | bytes vs CPU |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for size, f in merges.items():
            if "error" in f:
                lines.append(f"| {size} | error: {f['error'].strip().splitlines()[-1][:200]} | | | | | |")
                continue
            c = f["comparison"]
            same = ("identical" if c["identical"] else
                    f"{c['differing']}/{c['tensors']} tensors differ (max ulps "
                    f"{max(c['differing_max_bf16_ulps'].values(), default=0):.1f})")
            for device in ("cpu", "cuda"):
                r = f[device]
                dev = (f"{r['device_peak_reserved_gib']:.2f} / {r['device_peak_allocated_gib']:.2f}"
                       f" (budget {MEMORY_LIMIT}: {'within' if f['device_memory_within_budget'] else 'OVER'})"
                       if device == "cuda" else "")
                lines.append(f"| {size} | {device} | {r['wall_s']:.1f} | {r['write_gbps']:.2f} | "
                             f"{r['host_peak_rss_gib']:.2f} | {dev} | {same if device == 'cuda' else ''} |")
        lines.append("")
    disk = results.get("disk")
    if disk:
        cp, dd = disk["cp_sync"], disk["dd_direct"]
        lines += [f"Disk, the base's shard bytes: `cp` + `sync` {cp['wall_s']:.1f} s "
                  f"({cp['write_gbps']:.2f} GB/s); `dd`, 4 MiB O_DIRECT writes, fsync "
                  f"{dd['wall_s']:.1f} s ({dd['write_gbps']:.2f} GB/s).", ""]
    for key, title in (("scaling", "1GB shards"), ("scaling_one_shard", "one shard"),
                       ("scaling_tmpfs", "1GB shards into /dev/shm (no disk)")):
        curve = results.get(key, {})
        if curve:
            lines += [f"CPU route, {title}:", "",
                      "| cores | wall s | GB/s written | x 1 core | steps s |",
                      "| --- | --- | --- | --- | --- |"]
            one = curve.get("1", next(iter(curve.values())))["write_gbps"]
            for n, f in curve.items():
                steps = ", ".join(f"{k} {v:.1f}" for k, v in f.get("steps_s", {}).items())
                lines.append(f"| {n} | {f['wall_s']:.1f} | {f['write_gbps']:.2f} | "
                             f"{f['write_gbps'] / one:.2f} | {steps} |")
            lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_merge":
        _merge_child(*sys.argv[2:8])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", help="folder for the results (created)")
    parser.add_argument("--workdir", default="/tmp/mf-gpu-check", help="models and outputs")
    parser.add_argument("--sizes", default="0.9b,70b-slice-1")
    parser.add_argument("--cores", default="1,2,4,8,16")
    parser.add_argument("--one-shard-cores", default="1,16",
                        help="core counts for the curve of a one-shard output (5GB shards)")
    parser.add_argument("--tmpfs", default="1,4,16",
                        help="core counts for the curve written into /dev/shm (RAM: no disk)")
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args()
    outdir, work = Path(args.outdir), Path(args.workdir)
    outdir.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"environment": environment()}

    def save() -> None:
        (outdir / "gpu-check.json").write_text(json.dumps(results, indent=2) + "\n")
        (outdir / "gpu-check.md").write_text(markdown(results))

    log(f"environment: {results['environment']}")
    save()
    if not args.skip_tests:
        log("running the gpu-marked tests ...")
        results["tests"] = run_tests(outdir)
        log(f"tests: {results['tests']}")
        save()
    sizes = [s for s in args.sizes.split(",") if s]
    results["merges"] = {}
    for size in sizes:
        try:
            results["merges"][size] = merge_both_routes(size, work)
        except Exception as exc:
            results["merges"][size] = {"error": f"{type(exc).__name__}: {exc}"}
            log(f"{size}: FAILED: {exc}")
        save()
    if sizes:
        results["disk"] = disk_speed(sizes[0], work)
        log(f"disk: {results['disk']}")
        save()
    if sizes and args.cores:
        results["scaling"] = scaling(sizes[0], work, [int(c) for c in args.cores.split(",")])
        save()
    if sizes and args.one_shard_cores:
        results["scaling_one_shard"] = scaling(
            sizes[0], work, [int(c) for c in args.one_shard_cores.split(",")], "5GB")
        save()
    if sizes and args.tmpfs:
        base, _, _ = bench_merge.ensure_inputs(sizes[0], work)
        shm = tmpfs_folder(bench_merge.shard_bytes(base))
        if shm is None:
            log("no /dev/shm with room for the output: the tmpfs curve is skipped")
        else:
            results["scaling_tmpfs"] = scaling(sizes[0], work,
                                               [int(c) for c in args.tmpfs.split(",")], out=shm)
            save()
    log("done")
    print(markdown(results))


if __name__ == "__main__":
    main()
