"""Benchmark: Mergeflow's streaming merge against PEFT's ``merge_and_unload`` route.

    python bench/bench_merge.py --sizes 0.9b,3.6b --repeats 1 --workdir /tmp/mf-bench
    python bench/bench_merge.py --sizes tiny          # a ~56M model, to check the script quickly

Sizes: ``tiny`` (~56M), ``0.9b``, ``3.6b`` (4x the parameters by width *and* depth: hidden 4096)
and ``3.6b-deep`` (4x by depth alone: the 0.9b's tensor shapes, 72 layers). For each size it
builds (once, cached in the workdir) a random Llama in bf16 saved in 1GB shards and a LoRA
adapter for it (r=16 on q,k,v,o,gate,up,down, ``init_lora_weights=False``), then times, each in a
fresh process of its own and with the inputs already in the page cache:

* ``mergeflow merge --max-shard-size 1GB --no-tokenizer`` with an empty ``MERGEFLOW_CACHE`` (so
  hashing the inputs is part of the figure) - "mergeflow";
* the same with the hash cache left warm by the previous run - "mergeflow (warm hash)";
* the same with ``--no-verify`` too, when the CLI has that option;
* ``bench/peft_merge.py``: ``from_pretrained(bf16)``, ``PeftModel.from_pretrained``,
  ``merge_and_unload()``, ``save_pretrained(max_shard_size="1GB")`` - "peft".

Wall time is measured around the process; peak RSS is the kernel's ``ru_maxrss`` of it (the
largest single process), read from ``/usr/bin/time -v`` when it exists, else from
``getrusage(RUSAGE_CHILDREN)`` in a small wrapper process that runs only the measured command
(``--rss getrusage`` forces that). A sampler also polls ``/proc`` every 0.1 s for the sum over the
command's process tree (Mergeflow's Prefect server is a second process) and its split into
anonymous and file-backed (mmap) pages. Mergeflow runs with a Prefect home of the benchmark's own
(``WORKDIR/prefect-home``), so it neither contends with nor grows ``~/.prefect``. Finally it
compares both outputs: same tensor names, and the values of 12 sampled tensors (max abs diff, in
bf16 ulps), to show both routes did the same job.

``--mergeflow-src DIR`` benchmarks the mergeflow package in DIR (e.g. a ``git archive`` of one
commit) instead of the installed one, so concurrent edits of the working tree cannot change the
code under test mid-run; a ``SNAPSHOT`` file in DIR names it in the report.

Nothing is downloaded. Models are built with random weights; building a 3.6B one needs ~8 GB of
RAM and ~7.2 GB of disk, and each merge writes another ~7.2 GB (deleted after measuring). Raw
figures go to WORKDIR/results.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# Llama shapes. kv heads < heads (GQA) as in current Llamas; vocab 32000 as in Llama 2.
SIZES: dict[str, dict] = {
    "tiny": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                 num_attention_heads=8, num_key_value_heads=4, vocab_size=32000),
    "0.9b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                 num_attention_heads=16, num_key_value_heads=8, vocab_size=32000),
    "3.6b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=19,
                 num_attention_heads=32, num_key_value_heads=8, vocab_size=32000),
    # 4x the 0.9b by depth alone: same tensor shapes, 72 layers instead of 16.
    "3.6b-deep": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=72,
                      num_attention_heads=16, num_key_value_heads=8, vocab_size=32000),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
            init_lora_weights=False)
SHARD = "1GB"

# Targets from the issue.
TIME_TARGET = 0.5  # mergeflow wall time <= 0.5x PEFT's (at 0.9B)
RSS_TARGET = 0.3  # mergeflow peak RSS <= 0.3x PEFT's (at 0.9B)
SCALE_TARGET = 1.15  # mergeflow peak RSS at 3.6B within 15% of its 0.9B figure

# Runs argv[1:] as the only child and reports that child's peak RSS (KiB on Linux).
RUSAGE_WRAPPER = (
    "import resource, subprocess, sys\n"
    "rc = subprocess.call(sys.argv[1:])\n"
    "print('MAXRSS_KB=%d' % resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,"
    " file=sys.stderr)\n"
    "sys.exit(rc)\n"
)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------
# Building the inputs (each in a subprocess of its own, so this process stays small)


def llama_config(size: str):
    from transformers import LlamaConfig

    return LlamaConfig(**SIZES[size], max_position_embeddings=2048, tie_word_embeddings=False,
                       rms_norm_eps=1e-5)


def count_params(size: str) -> int:
    """Exact parameter count, from a model built on the meta device (no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(llama_config(size))
    return sum(p.numel() for p in model.parameters())


def _build_base(size: str, folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(llama_config(size), dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder, max_shard_size=SHARD)
    (folder / "bench_params.json").write_text(json.dumps({"size": size, "params": n}))


def _build_adapter(base: Path, folder: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    peft_model = get_peft_model(model, LoraConfig(**LORA))
    peft_model.save_pretrained(folder)


def ensure_inputs(size: str, workdir: Path) -> tuple[Path, Path, int]:
    """The cached base and adapter of one size, built when missing."""
    root = workdir / "models" / size
    base, adapter = root / "base", root / "adapter"
    for folder, kind in ((base, "base"), (adapter, "adapter")):
        done = folder / ".bench-complete"
        if done.is_file():
            log(f"{size}: reusing {kind} in {folder}")
            continue
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        log(f"{size}: building {kind} in {folder} ...")
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, f"--_build-{kind}", size, str(folder)],
                       check=True)
        done.write_text("ok\n")
        log(f"{size}: {kind} built in {time.perf_counter() - t0:.0f} s")
    params = json.loads((base / "bench_params.json").read_text())["params"]
    return base, adapter, params


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------------
# Measuring a process


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return found


def _rss_parts(pid: int) -> tuple[int, int]:
    """(RssAnon, RssFile + RssShmem) in KiB of one process, 0s if it is gone."""
    anon = file = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    anon = int(line.split()[1])
                elif line.startswith(("RssFile:", "RssShmem:")):
                    file += int(line.split()[1])
    except OSError:
        pass
    return anon, file


class Sampler(threading.Thread):
    """Polls the process tree's RSS split (anon vs file-backed) at the moment of its peak."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_total = self.peak_anon = self.anon_at_peak = self.file_at_peak = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            # Only the measured command counts, not the time/wrapper process above it.
            pids = _descendants(self.pid)[1:]
            anon = file = 0
            for p in pids:
                a, f = _rss_parts(p)
                anon, file = anon + a, file + f
            if anon + file > self.peak_total:
                self.peak_total, self.anon_at_peak, self.file_at_peak = anon + file, anon, file
            self.peak_anon = max(self.peak_anon, anon)
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def rss_method(requested: str) -> str:
    if requested != "auto":
        return requested
    return "time" if Path("/usr/bin/time").is_file() else "getrusage"


def measure(cmd: list[str], env: dict, method: str, log_path: Path) -> dict:
    """Run ``cmd`` as its own process; wall seconds, peak RSS (GiB) and the anon/file split."""
    wrapper = ["/usr/bin/time", "-v"] if method == "time" else [sys.executable, "-c", RUSAGE_WRAPPER]
    full = [*wrapper, *cmd]
    with open(log_path, "w") as logf:
        t0 = time.perf_counter()
        # cwd: a neutral folder, so `python -c`/`-m` do not import the repo's tree by accident
        proc = subprocess.Popen(full, env=env, stdout=logf, stderr=subprocess.STDOUT,
                                cwd=log_path.parent)
        sampler = Sampler(proc.pid)
        sampler.start()
        rc = proc.wait()
        wall = time.perf_counter() - t0
        sampler.stop()
    text = log_path.read_text(errors="replace")
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (rc {rc}); see {log_path}:\n{text[-3000:]}")
    pattern = (r"Maximum resident set size \(kbytes\): (\d+)" if method == "time"
               else r"MAXRSS_KB=(\d+)")
    found = re.findall(pattern, text)
    if not found:
        raise RuntimeError(f"no peak RSS in {log_path}")
    gib = 1024**2
    return {"wall_s": wall, "rss_gib": int(found[-1]) / gib,
            "sampled_peak_gib": sampler.peak_total / gib,
            "anon_at_peak_gib": sampler.anon_at_peak / gib,
            "file_at_peak_gib": sampler.file_at_peak / gib,
            "peak_anon_gib": sampler.peak_anon / gib}


def warm_page_cache(*folders: Path) -> None:
    """Read the inputs once (untimed) so every measured run starts with them in the page cache;
    otherwise whichever route runs first after a build pays the disk reads."""
    buf = bytearray(16 << 20)
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                with open(path, "rb", buffering=0) as f:
                    while f.readinto(buf):
                        pass


def mergeflow_supports(args, option: str) -> bool:
    """Whether the benchmarked mergeflow's CLI has ``option`` (read from its source)."""
    out = subprocess.run([sys.executable, "-c", "import mergeflow.cli as c; print(c.__file__)"],
                         env=bench_env(args), capture_output=True, text=True, cwd=args.workdir)
    try:
        return option in Path(out.stdout.strip()).read_text()
    except OSError:
        return False


def mergeflow_cmd() -> list[str]:
    script = Path(sys.executable).parent / "mergeflow"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "mergeflow.cli"]


# --------------------------------------------------------------------------------------------
# Checking that both routes wrote the same model


def _weight_map(folder: Path) -> dict[str, str]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return json.loads(index.read_text())["weight_map"]
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return {k: "model.safetensors" for k in f.keys()}  # noqa: SIM118


def _load(folder: Path, wmap: dict[str, str], name: str):
    from safetensors import safe_open

    with safe_open(str(folder / wmap[name]), framework="pt") as f:
        return f.get_tensor(name)


def compare_outputs(mf_out: Path, peft_out: Path, base: Path, layers: int) -> dict:
    """Same names/shapes/dtypes everywhere; values of a sample of tensors compared."""
    import torch

    mf_map, peft_map, base_map = _weight_map(mf_out), _weight_map(peft_out), _weight_map(base)
    result: dict = {"same_names": set(mf_map) == set(peft_map),
                    "only_mergeflow": sorted(set(mf_map) - set(peft_map))[:5],
                    "only_peft": sorted(set(peft_map) - set(mf_map))[:5], "tensors": {}}
    last = layers - 1
    sample = [f"model.layers.0.self_attn.{m}.weight" for m in TARGETS[:4]]
    sample += [f"model.layers.0.mlp.{m}.weight" for m in TARGETS[4:]]
    sample += [f"model.layers.{last}.self_attn.q_proj.weight",
               f"model.layers.{last}.mlp.down_proj.weight",
               f"model.layers.{last}.input_layernorm.weight",
               "model.embed_tokens.weight", "lm_head.weight"]
    worst_abs = worst_ulp = 0.0
    for name in sample:
        if name not in mf_map or name not in peft_map:
            result["tensors"][name] = "missing"
            continue
        a, b = _load(mf_out, mf_map, name), _load(peft_out, peft_map, name)
        w = _load(base, base_map, name)
        if a.dtype != b.dtype or a.shape != b.shape:
            result["tensors"][name] = f"mismatch {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
            worst_abs = math.inf
            continue
        af, bf, wf = a.float(), b.float(), w.float()
        diff = (af - bf).abs()
        # one bf16 ulp at each value's magnitude: 2^(exponent - 7)
        mag = torch.maximum(af.abs(), bf.abs()).clamp_min(2.0**-126)
        ulp = torch.exp2(torch.floor(torch.log2(mag)) - 7)
        entry = {"dtype": str(a.dtype).replace("torch.", ""),
                 "max_abs_diff": float(diff.max()), "max_diff_ulps": float((diff / ulp).max()),
                 "frac_elements_differing": float((diff > 0).float().mean()),
                 "max_abs_change_vs_base": float((af - wf).abs().max())}
        result["tensors"][name] = entry
        worst_abs = max(worst_abs, entry["max_abs_diff"])
        worst_ulp = max(worst_ulp, entry["max_diff_ulps"])
    result["max_abs_diff"], result["max_diff_ulps"] = worst_abs, worst_ulp
    return result


# --------------------------------------------------------------------------------------------
# The benchmark


def bench_env(args) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    # Mergeflow runs its pipeline as a Prefect flow: give it a Prefect home (database) of the
    # benchmark's own, so it neither contends with nor grows anybody else's ~/.prefect.
    env["PREFECT_HOME"] = str(Path(args.workdir).resolve() / "prefect-home")
    env.pop("PREFECT_API_URL", None)
    if args.mergeflow_src:
        src = str(Path(args.mergeflow_src).resolve())
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    return env


def mergeflow_origin(args) -> str:
    """Which mergeflow the measured processes import (file and git commit when known)."""
    out = subprocess.run([sys.executable, "-c", "import mergeflow; print(mergeflow.__file__)"],
                         env=bench_env(args), capture_output=True, text=True, check=True,
                         cwd=args.workdir)
    path = Path(out.stdout.strip()).parent
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "mergeflow"],
                           capture_output=True, text=True).stdout.strip()
    stamp = path.parent / "SNAPSHOT"
    if stamp.is_file():
        return f"{path} ({stamp.read_text().strip()})"
    return f"{path} (repo HEAD {commit}{', with uncommitted changes' if dirty else ''})"


def run_size(size: str, args, method: str) -> dict:
    workdir = Path(args.workdir)
    log(f"{size}: {count_params(size):,} parameters ({SIZES[size]})")
    base, adapter, params = ensure_inputs(size, workdir)
    runs_dir = workdir / "runs" / size
    runs_dir.mkdir(parents=True, exist_ok=True)
    mf_out, peft_out = runs_dir / "out-mergeflow", runs_dir / "out-peft"
    env = bench_env(args)
    results: dict[str, list[dict]] = {"mergeflow": [], "mergeflow (warm hash)": [], "peft": []}
    mf_merge = [*mergeflow_cmd(), "merge", "--base", str(base), "--adapter", str(adapter),
                "--out", str(mf_out), "--max-shard-size", SHARD, "--no-tokenizer"]

    def run_mergeflow(route: str, cache: Path, extra: list[str], log_name: str) -> None:
        shutil.rmtree(mf_out, ignore_errors=True)
        warm_page_cache(base, adapter)
        r = measure([*mf_merge, *extra], dict(env, MERGEFLOW_CACHE=str(cache)), method,
                    runs_dir / log_name)
        results.setdefault(route, []).append(r)
        log(f"{size}: {route} #{len(results[route])}: {r['wall_s']:.1f} s, "
            f"{r['rss_gib']:.2f} GiB (process tree, sampled: {r['sampled_peak_gib']:.2f} GiB)")

    cache = None
    for rep in range(args.repeats):
        # Mergeflow, hash cache empty: hashing the inputs is part of the job.
        if cache is not None:
            shutil.rmtree(cache, ignore_errors=True)
        cache = Path(tempfile.mkdtemp(prefix="mf-cache-", dir=workdir))
        run_mergeflow("mergeflow", cache, [], f"mergeflow-{rep}.log")
        # PEFT.
        shutil.rmtree(peft_out, ignore_errors=True)
        warm_page_cache(base, adapter)
        cmd = [sys.executable, str(HERE / "peft_merge.py"), str(base), str(adapter),
               str(peft_out), "--max-shard-size", SHARD]
        r = measure(cmd, env, method, runs_dir / f"peft-{rep}.log")
        results["peft"].append(r)
        log(f"{size}: peft #{rep + 1}: {r['wall_s']:.1f} s, {r['rss_gib']:.2f} GiB "
            f"(process tree, sampled: {r['sampled_peak_gib']:.2f} GiB)")
    # Mergeflow once more with the hash cache of the last run left in place, and (when the CLI
    # has it) once without its post-merge verification, to show what each part costs.
    run_mergeflow("mergeflow (warm hash)", cache, [], "mergeflow-warm.log")
    if mergeflow_supports(args, "--no-verify"):
        run_mergeflow("mergeflow (warm hash, --no-verify)", cache, ["--no-verify"],
                      "mergeflow-warm-noverify.log")
    shutil.rmtree(cache, ignore_errors=True)

    log(f"{size}: comparing outputs ...")
    check = compare_outputs(mf_out, peft_out, base, SIZES[size]["num_hidden_layers"])
    log(f"{size}: same tensor names: {check['same_names']}; sampled max |mergeflow - peft| = "
        f"{check['max_abs_diff']:.3g} ({check['max_diff_ulps']:.2f} bf16 ulp)")
    sizes_on_disk = {"base_gb": folder_bytes(base) / 1e9, "mergeflow_out_gb": folder_bytes(mf_out) / 1e9,
                     "peft_out_gb": folder_bytes(peft_out) / 1e9}
    if not args.keep_outputs:
        shutil.rmtree(mf_out, ignore_errors=True)
        shutil.rmtree(peft_out, ignore_errors=True)
    medians = {route: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
               for route, runs in results.items()}
    return {"size": size, "params": params, "config": SIZES[size], "runs": results,
            "median": medians, "check": check, "disk": sizes_on_disk}


def report(all_results: list[dict], method: str) -> str:
    source = "/usr/bin/time -v" if method == "time" else "getrusage(RUSAGE_CHILDREN)"
    lines = [f"peak RSS: ru_maxrss from {source}"
             " (the largest single process); process tree: sum over the command's processes, "
             "sampled every 0.1 s; anon/file: its split at that peak", "",
             "| size | params | route | runs | wall s (median) | peak RSS GiB (median) "
             "| process tree, sampled GiB | anon / file-backed at peak GiB |",
             "|---|---|---|---|---|---|---|---|"]
    for res in all_results:
        for route, m in res["median"].items():
            lines.append(f"| {res['size']} | {res['params'] / 1e9:.3f}B | {route} "
                         f"| {len(res['runs'][route])} | {m['wall_s']:.1f} | {m['rss_gib']:.2f} "
                         f"| {m['sampled_peak_gib']:.2f} "
                         f"| {m['anon_at_peak_gib']:.2f} / {m['file_at_peak_gib']:.2f} |")
    lines += ["", "| size | route | time / peft | peak RSS / peft |", "|---|---|---|---|"]
    for res in all_results:
        m = res["median"]
        for route in m:
            if route != "peft":
                lines.append(f"| {res['size']} | {route} "
                             f"| {m[route]['wall_s'] / m['peft']['wall_s']:.2f} "
                             f"| {m[route]['rss_gib'] / m['peft']['rss_gib']:.2f} |")
    lines += ["", "| size | time mergeflow/peft | time warm-hash/peft | RSS mergeflow/peft "
              "| max abs diff (bf16 ulp) |", "|---|---|---|---|---|"]
    by_size = {r["size"]: r for r in all_results}
    for res in all_results:
        m = res["median"]
        peft = m["peft"]
        lines.append(
            f"| {res['size']} | {m['mergeflow']['wall_s'] / peft['wall_s']:.2f} "
            f"| {m['mergeflow (warm hash)']['wall_s'] / peft['wall_s']:.2f} "
            f"| {m['mergeflow']['rss_gib'] / peft['rss_gib']:.2f} "
            f"| {res['check']['max_abs_diff']:.3g} ({res['check']['max_diff_ulps']:.2f}) |")
    lines.append("")
    if "0.9b" in by_size:
        m = by_size["0.9b"]["median"]
        t = m["mergeflow"]["wall_s"] / m["peft"]["wall_s"]
        r = m["mergeflow"]["rss_gib"] / m["peft"]["rss_gib"]
        lines.append(f"target wall time <= {TIME_TARGET}x PEFT at 0.9B: {t:.2f}x -> "
                     f"{'MET' if t <= TIME_TARGET else 'NOT MET'}")
        lines.append(f"target peak RSS <= {RSS_TARGET}x PEFT at 0.9B: {r:.2f}x -> "
                     f"{'MET' if r <= RSS_TARGET else 'NOT MET'}")
    for big in ("3.6b", "3.6b-deep"):
        if "0.9b" in by_size and big in by_size:
            s = (by_size[big]["median"]["mergeflow"]["rss_gib"]
                 / by_size["0.9b"]["median"]["mergeflow"]["rss_gib"])
            lines.append(f"target mergeflow peak RSS {big} / 0.9b <= {SCALE_TARGET}: {s:.2f} -> "
                         f"{'MET' if s <= SCALE_TARGET else 'NOT MET'}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="0.9b,3.6b", help=f"comma list of {', '.join(SIZES)}")
    parser.add_argument("--repeats", type=int, default=1, help="runs per route (medians reported)")
    parser.add_argument("--repeats-for", default="",
                        help="per-size repeats overriding --repeats, e.g. 0.9b=3")
    parser.add_argument("--workdir", default="/tmp/mf-bench", help="models, outputs, logs")
    parser.add_argument("--rss", choices=["auto", "time", "getrusage"], default="auto",
                        help="peak RSS from /usr/bin/time -v or a getrusage wrapper")
    parser.add_argument("--keep-outputs", action="store_true", help="keep the merged outputs")
    parser.add_argument("--mergeflow-src", default=None,
                        help="a folder holding the mergeflow package to benchmark (put first on "
                        "PYTHONPATH), e.g. a `git archive` snapshot; default: the installed one")
    parser.add_argument("--_build-base", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--_build-adapter", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._build_base:
        _build_base(args._build_base[0], Path(args._build_base[1]))
        return
    if args._build_adapter:
        folder = Path(args._build_adapter[1])
        _build_adapter(folder.parent / "base", folder)
        return

    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        parser.error(f"unknown size(s) {unknown}; choose from {list(SIZES)}")
    per_size = dict(kv.split("=") for kv in args.repeats_for.split(",") if kv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    method = rss_method(args.rss)
    free = shutil.disk_usage(workdir).free / 1e9
    log(f"workdir {workdir} ({free:.0f} GB free), {os.cpu_count()} CPUs, peak RSS via {method}")
    origin = mergeflow_origin(args)
    # Create the benchmark's Prefect database (migrations) untimed, with a trivial flow.
    subprocess.run([sys.executable, "-c", "from prefect import flow\n"
                    "@flow\ndef warm_up():\n    return 1\nwarm_up()"],
                   env=bench_env(args), cwd=workdir, capture_output=True)
    log(f"benchmarking mergeflow from {origin}")
    all_results = []
    for size in sizes:
        size_args = argparse.Namespace(**vars(args))
        size_args.repeats = int(per_size.get(size, args.repeats))
        all_results.append(run_size(size, size_args, method))
        (workdir / "results.json").write_text(json.dumps(
            {"rss_method": method, "cpus": os.cpu_count(), "mergeflow": origin,
             "results": all_results}, indent=1))
    print()
    print(f"mergeflow: {origin}")
    print(report(all_results, method))
    print(f"\nraw figures: {workdir / 'results.json'}")


if __name__ == "__main__":
    main()
