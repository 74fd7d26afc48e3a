"""Benchmark: Mergeflow's streaming merge against PEFT's ``merge_and_unload`` route and ``cp``.

    python bench/bench_merge.py --sizes 0.9b,3.6b,3.6b-deep --repeats 3 --workdir /tmp/mf-bench
    python bench/bench_merge.py --sizes 70b-slice-1,70b-slice-4 --repeats 3
    python bench/bench_merge.py --sizes tiny          # a ~56M model, to check the script quickly

Sizes: ``tiny`` (~56M), ``0.9b``, ``3.6b`` (4x the parameters by width *and* depth: hidden 4096)
``3.6b-deep`` (4x by depth alone: the 0.9b's tensor shapes, 72 layers) and ``deep-narrow``
(its 651 tensors at hidden 64: fixed costs alone, for ``bench_split.py``): random Llamas in
bf16 saved in 1GB shards with ``save_pretrained``, and a LoRA adapter for each built by PEFT
(r=16 on q,k,v,o,gate,up,down, ``init_lora_weights=False``).

``70b-slice-1`` and ``70b-slice-4``: Llama-3-70B's real tensor shapes (vocab 128256, hidden 8192,
intermediate 28672, 64 heads / 8 kv heads) with 1 and 4 decoder layers (5.9 and 11 GB on disk),
and an r=16 adapter on every linear layer *plus* the embedding (embedding LoRA) and ``lm_head``.
Both are written by hand, tensor by tensor, so building them takes little memory: the base's
shards (<= 2 GB each; the 2.1 GB embedding and head get one of their own) are streamed to disk
one row block at a time (random bf16, std 0.02; norms 1), with ``model.safetensors.index.json``
and a ``LlamaConfig`` config.json; the adapter has PEFT's key names and an ``adapter_config.json``
written by ``LoraConfig.save_pretrained`` (random nonzero A and B, so the merge is real). PEFT is
not run on these sizes: it would need the whole model in memory.

Inputs are built once and cached in the workdir. Each route runs in a fresh process of its own,
with the inputs already in the page cache and the disk idle (an untimed ``sync`` first: PEFT's
``save_pretrained`` leaves its output to be written back). The disk's own speed still varies
(see :func:`settle`): read ``cp`` + ``sync`` as the disk's speed *in that run*.
With ``--repeats N`` the routes run interleaved, repeat by repeat (mergeflow, peft, cp + sync,
mergeflow, peft, cp + sync, ...), so noise from
the shared machine hits them alike; the report gives medians, and for the ratios the median of
the per-repeat ratios (with the ratio of the medians in brackets):

* ``mergeflow merge --max-shard-size 1GB --no-tokenizer`` with an empty ``MERGEFLOW_CACHE`` (so
  hashing the inputs is part of the figure) - "mergeflow";
* ``bench/peft_merge.py``: ``from_pretrained(bf16)``, ``PeftModel.from_pretrained``,
  ``merge_and_unload()``, ``save_pretrained(max_shard_size="1GB")`` - "peft";
* ``cp --reflink=never`` of the base's shard files into a fresh folder, then ``sync`` of the
  copies (an fsync of each, as Mergeflow's writer does; not a system-wide sync, which would also
  flush other people's writes) - "cp + sync", the speed of the disk. Throughput is shard bytes
  written per second of wall time, for it and for mergeflow.

In each repeat, right after the cold mergeflow run, mergeflow again with that run's layout memo
kept but no input hashes ("mergeflow (cold hash, layout cached)": new files of a known
architecture, the common case of a team's second base), so it is paired with ``cp`` too. After
the paired repeats, once each: mergeflow with the hash cache left warm ("mergeflow (warm hash)")
and with ``--no-verify`` too, when the CLI has it (``--skip-extra`` leaves these and the
layout-cached runs out);
and with ``--baseline-src DIR``, the mergeflow package in DIR (e.g. the previous commit) -
"baseline".

Wall time is measured around the process; peak RSS is the kernel's ``ru_maxrss`` of it (the
largest single process), read from ``/usr/bin/time -v`` when it exists, else from
``getrusage(RUSAGE_CHILDREN)`` in a small wrapper process that runs only the measured command
(``--rss getrusage`` forces that). A sampler also polls ``/proc`` every 0.1 s for the sum over the
command's process tree (Mergeflow's Prefect server is a second process; a new base's layout is
learnt in a forked child) and its split into anonymous and file-backed (mmap) pages, and for the
sum of the tree's proportional set sizes (PSS: pages a forked child shares with its parent
counted once, where the RSS sum counts them twice). Mergeflow runs with a Prefect home of the benchmark's own
(``WORKDIR/prefect-home``), so it neither contends with nor grows ``~/.prefect``.

Output agreement: the sha256 of every tensor's bytes in every output (read straight from the
safetensors files, 16 MiB at a time). Mergeflow's output must hold the same bytes as PEFT's, as
the baseline's and as every other mergeflow route's; exactly the targeted tensors must differ
from the base. ``--compare-with RESULTS.json`` compares them with the digests recorded by an
earlier run (when its inputs had the same digests). For PEFT sizes it also compares the values of
12 sampled tensors (max abs diff, in bf16 ulps).

``--mergeflow-src DIR`` benchmarks the mergeflow package in DIR (e.g. a ``git archive`` of one
commit) instead of the installed one, so concurrent edits of the working tree cannot change the
code under test mid-run; a ``SNAPSHOT`` file in DIR names it in the report.

Nothing is downloaded. Building a 3.6B model needs ~8 GB of RAM and ~7.2 GB of disk; each merge
writes another model's worth (deleted after measuring). Building a 70B slice peaks at 0.5 GiB of
RAM (measured for ``70b-slice-1``: 45 s, mostly the torch import) but takes 5.9 / 11 GB of disk,
plus up to three outputs' worth while measuring. Mergeflow itself peaked at 18.2 GiB on
``70b-slice-1`` at 2c602c7 (issue 11): mind the machine's memory before running it. The report
(markdown, for docs/benchmarks.md) is printed at the end and written to WORKDIR/report.md, and
with the raw figures to WORKDIR/results.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import statistics
import struct
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
    # The 3.6b-deep's 651 tensors at a 32nd of its width: a merge of it is almost all fixed
    # and per-tensor cost (bench/bench_split.py).
    "deep-narrow": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=72,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=1000),
}
# Llama-3-70B's real tensor shapes, with only a few of its 80 decoder layers.
LLAMA3_70B = dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                  num_key_value_heads=8, vocab_size=128256)
SLICES: dict[str, dict] = {
    "70b-slice-1": dict(LLAMA3_70B, num_hidden_layers=1),
    "70b-slice-4": dict(LLAMA3_70B, num_hidden_layers=4),
}
SIZES.update(SLICES)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SLICE_TARGETS = [*TARGETS, "embed_tokens", "lm_head"]
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
            init_lora_weights=False)
SHARD = "1GB"  # save_pretrained's shards for the small sizes, and every merge's output shards
SLICE_SHARD_BYTES = 2 * 10**9  # the 70B slices' base shards (a bigger tensor gets its own)
# Hidden --slice-dims: overrides of the slices' dimensions, to smoke-test the slice builder and
# route on a small model. Overridden slices are cached in a folder of their own.
SLICE_DIMS: dict[str, int] = {}

# Targets from issue 11 (ratios are mergeflow merge / the other route).
TIME_TARGET_09 = 0.5  # wall time / PEFT at 0.9b (goal 0.3)
TIME_GOAL_09 = 0.3
TIME_TARGET_36 = 0.4  # wall time / PEFT at 3.6b
RSS_TARGET = 0.25  # peak RSS (largest process) / PEFT at 0.9b
SCALE_TARGET = 1.15  # peak RSS 3.6b (4x wider) / 0.9b
SLICE_RSS_TARGET = 1.5  # GiB, peak RSS of the 1-layer 70B slice
SLICE_SCALE_TARGET = 1.10  # peak RSS 4-layer / 1-layer slice
THROUGHPUT_TARGET = 0.5  # merge throughput / cp + sync at 3.6b
# Issue 27's targets: real-shaped (deep) models, cold and warm input hash, and cp's throughput.
# A merge whose layout memo is warm but whose input hashes are not (paired with the cold one)
LAYOUT_CACHED = "mergeflow (cold hash, layout cached)"
ISSUE27 = {"deep_cold": 0.5, "deep_warm": 0.35, "small_cold": 0.35, "throughput": 0.6,
           "rss_gib": 0.46}

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


def set_slice_dims(spec: str | None) -> None:
    """Apply ``--slice-dims k=v,...`` to the slice sizes (for smoke tests)."""
    if not spec:
        return
    dims = {k.strip(): int(v) for k, v in (kv.split("=") for kv in spec.split(",") if kv)}
    unknown = set(dims) - set(SLICES["70b-slice-1"])
    if unknown:
        raise SystemExit(f"--slice-dims: unknown keys {sorted(unknown)}")
    SLICE_DIMS.update(dims)
    for name in SLICES:
        SIZES[name] = dict(SLICES[name], **dims)


# --------------------------------------------------------------------------------------------
# Building the inputs (each in a subprocess of its own, so this process stays small)


def llama_config(size: str):
    from transformers import LlamaConfig

    if size in SLICES:
        cfg = SIZES[size]
        ids = (dict(bos_token_id=128000, eos_token_id=128001)
               if cfg["vocab_size"] > 128001 else {})
        return LlamaConfig(**cfg, **ids, max_position_embeddings=8192, rope_theta=500000.0,
                           rms_norm_eps=1e-5, tie_word_embeddings=False,
                           architectures=["LlamaForCausalLM"], dtype="bfloat16")
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


# The 70B slices, written by hand one tensor (and one row block) at a time.


def slice_tensors(size: str) -> list[tuple[str, tuple[int, ...]]]:
    """The base's tensors (name, shape) in ``save_pretrained``'s order."""
    c = SIZES[size]
    h, inter, vocab = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    head_dim = h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * head_dim, c["num_key_value_heads"] * head_dim
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, h))]
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out += [(p + "self_attn.q_proj.weight", (q, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, q)),
                (p + "mlp.gate_proj.weight", (inter, h)), (p + "mlp.up_proj.weight", (inter, h)),
                (p + "mlp.down_proj.weight", (h, inter)),
                (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,))]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))]
    return out


def slice_lora_tensors(size: str) -> list[tuple[str, tuple[int, int], float]]:
    """The adapter's tensors (PEFT's saved key, shape, std of its random values)."""
    r = LORA["r"]
    out = []
    for name, shape in slice_tensors(size):
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] not in SLICE_TARGETS:
            continue
        key = f"base_model.model.{module}"
        rows, cols = shape
        if module.endswith("embed_tokens"):
            # nn.Embedding(vocab, hidden): delta = (B @ A).T, A (r, vocab), B (hidden, r)
            out += [(f"{key}.lora_embedding_A", (r, rows), r**-0.5),
                    (f"{key}.lora_embedding_B", (cols, r), 0.02)]
        else:
            # nn.Linear(in=cols, out=rows): delta = B @ A, A (r, in), B (out, r)
            out += [(f"{key}.lora_A.weight", (r, cols), cols**-0.5),
                    (f"{key}.lora_B.weight", (rows, r), 0.02)]
    return out


def _random_blocks(name: str, shape: tuple[int, ...], std: float, dtype, block_bytes=32 << 20):
    """Random normal values * std in row blocks of about ``block_bytes`` of float32, seeded by
    the tensor's name (so a rebuild writes the same bytes)."""
    import torch

    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") >> 1
    gen = torch.Generator().manual_seed(seed)
    rows, cols = shape[0], math.prod(shape[1:])
    step = max(1, block_bytes // (4 * cols))
    for i in range(0, rows, step):
        yield (torch.randn(min(step, rows - i), cols, generator=gen) * std).to(dtype)


def _write_safetensors(path: Path, tensors: list[tuple[str, tuple[int, ...]]], blocks) -> None:
    """A bf16 safetensors file written as a stream: the header, then each tensor's bytes as
    ``blocks(name, shape)`` yields them. Only one block is in memory at a time."""
    import torch

    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        n = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape in tensors:
            written = 0
            for block in blocks(name, shape):
                assert block.dtype == torch.bfloat16
                data = block.contiguous().view(torch.uint8).numpy()
                f.write(data)
                written += data.nbytes
            if written != math.prod(shape) * 2:
                raise RuntimeError(f"{name}: wrote {written} bytes for shape {shape}")
        f.flush()
        os.fsync(f.fileno())


def _build_slice_base(size: str, folder: Path) -> None:
    import torch

    def blocks(name, shape):
        if name.endswith("norm.weight"):
            yield torch.ones(shape, dtype=torch.bfloat16)
        else:
            yield from _random_blocks(name, shape, 0.02, torch.bfloat16)

    tensors = slice_tensors(size)
    shards: list[list] = [[]]
    used = 0
    for name, shape in tensors:
        n = math.prod(shape) * 2
        if shards[-1] and used + n > SLICE_SHARD_BYTES:
            shards.append([])
            used = 0
        shards[-1].append((name, shape))
        used += n
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        log(f"{size}: writing {file} ({sum(math.prod(s) * 2 for _, s in shard) / 1e9:.2f} GB)")
        _write_safetensors(folder / file, shard, blocks)
        weight_map.update({name: file for name, _ in shard})
    params = sum(math.prod(shape) for _, shape in tensors)
    index = {"metadata": {"total_size": params * 2}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    llama_config(size).save_pretrained(folder)
    (folder / "bench_params.json").write_text(json.dumps({"size": size, "params": params}))


def _build_slice_adapter(size: str, base: Path, folder: Path) -> None:
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    tensors = {key: torch.cat(list(_random_blocks(key, shape, std, torch.float32)))
               for key, shape, std in slice_lora_tensors(size)}
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = LoraConfig(**dict(LORA, target_modules=SLICE_TARGETS),
                        base_model_name_or_path=str(base))
    config.save_pretrained(str(folder))


def model_root(size: str, workdir: Path) -> Path:
    if size in SLICES and SLICE_DIMS:
        tag = hashlib.sha256(json.dumps(SIZES[size], sort_keys=True).encode()).hexdigest()[:8]
        return workdir / "models" / f"{size}-dims-{tag}"
    return workdir / "models" / size


def ensure_inputs(size: str, workdir: Path) -> tuple[Path, Path, int]:
    """The cached base and adapter of one size, built when missing."""
    root = model_root(size, workdir)
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
        dims = ["--slice-dims", ",".join(f"{k}={v}" for k, v in SLICE_DIMS.items())]
        subprocess.run([sys.executable, __file__, f"--_build-{kind}", size, str(folder),
                        *(dims if SLICE_DIMS else [])], check=True)
        done.write_text("ok\n")
        log(f"{size}: {kind} built in {time.perf_counter() - t0:.0f} s")
    params = json.loads((base / "bench_params.json").read_text())["params"]
    return base, adapter, params


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def shard_bytes(folder: Path) -> int:
    """Bytes of a model folder's safetensors files (the tensors, what a merge must write)."""
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


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


def _pss(pid: int) -> int:
    """Proportional set size in KiB of one process (pages shared with another process, e.g. a
    forked child, counted once over both), 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class Sampler(threading.Thread):
    """Polls the process tree's RSS split (anon vs file-backed) at the moment of its peak, and
    its peak PSS (the RSS sum counts a forked child's pages shared with its parent twice)."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_total = self.peak_anon = self.anon_at_peak = self.file_at_peak = 0
        self.peak_pss = 0
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
            self.peak_pss = max(self.peak_pss, sum(_pss(p) for p in pids))
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
            "peak_anon_gib": sampler.peak_anon / gib,
            "sampled_peak_pss_gib": sampler.peak_pss / gib}


def cp_sync_command(dest: Path, files: list[Path]) -> list[str]:
    """The disk's reference: ``cp`` (a real copy, no reflink) of ``files`` into ``dest``, then
    ``sync`` (fsync) of the copies, as one command to time."""
    script = 'd=$1; shift; cp --reflink=never -- "$@" "$d"/ && sync -- "$d"/*'
    return ["sh", "-c", script, "cp-sync", str(dest), *map(str, files)]


def dd_direct_command(dest: Path, nbytes: int, block: int = 4 * 2**20) -> list[str]:
    """The disk itself: ``dd`` of at least ``nbytes`` zero bytes into the file ``dest`` in
    ``block``-sized ``O_DIRECT`` writes (Mergeflow writes 4 MiB ``O_DIRECT`` chunks), then fsync;
    no page cache involved, unlike ``cp`` + ``sync``."""
    return ["dd", "if=/dev/zero", f"of={dest}", f"bs={block}", f"count={-(-nbytes // block)}",
            "oflag=direct", "conv=fsync", "status=none"]


def settle(*folders: Path) -> None:
    """Before a measured run, untimed: the disk finishes what earlier runs left dirty (PEFT's
    ``save_pretrained`` does not fsync, so its 7 GB at 3.6b could still be being written back
    while the next route ran), then the inputs are read into the page cache
    (:func:`warm_page_cache`). This VM's disk stays slow for a while after any large write
    whatever the sync: ``cp`` + ``sync`` of 7.26 GB took 3.2-10.1 s on 2026-12-05, slowest
    right after another 7 GB write, so compare ratios of paired runs only."""
    os.sync()
    warm_page_cache(*folders)


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


def safetensors_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header (without ``__metadata__``) and where its data starts."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def tensor_digests(folder: Path) -> dict[str, str]:
    """``{name: "DTYPE[shape]:sha256 of its bytes"}`` over a folder's safetensors files, read
    16 MiB at a time (bounded memory at any tensor size). Independent of how the tensors are
    split into shards and of the files' headers and metadata."""
    buf = memoryview(bytearray(16 << 20))
    out: dict[str, str] = {}
    for path in sorted(folder.glob("*.safetensors")):
        header, start = safetensors_header(path)
        with open(path, "rb", buffering=0) as f:
            for name, meta in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                begin, end = meta["data_offsets"]
                f.seek(start + begin)
                digest, left = hashlib.sha256(), end - begin
                while left:
                    n = f.readinto(buf[:min(left, len(buf))])
                    if not n:
                        raise RuntimeError(f"{path}: {name} is truncated")
                    digest.update(buf[:n])
                    left -= n
                out[name] = f"{meta['dtype']}{meta['shape']}:{digest.hexdigest()}"
    return out


def cached_digests(folder: Path, cache: Path) -> dict[str, str]:
    """``tensor_digests`` of a cached input folder, computed once."""
    if cache.is_file():
        return json.loads(cache.read_text())
    found = tensor_digests(folder)
    cache.write_text(json.dumps(found, indent=0))
    return found


def compare_digests(a: dict[str, str], b: dict[str, str]) -> dict:
    """Whether two outputs hold the same tensors with the same bytes (dtype and shape too)."""
    differ = sorted(k for k in a.keys() & b.keys() if a[k] != b[k])
    return {"identical": a == b, "tensors": len(a), "differ": len(differ),
            "differ_names": differ[:5], "only_first": sorted(a.keys() - b.keys())[:5],
            "only_second": sorted(b.keys() - a.keys())[:5]}


def lora_modules(adapter: Path) -> set[str]:
    """The base tensors an adapter changes, from its saved keys."""
    header, _ = safetensors_header(adapter / "adapter_model.safetensors")
    return {k.removeprefix("base_model.model.").split(".lora_")[0] + ".weight"
            for k in header if ".lora_" in k}


def digests_summary(digests: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(sorted(digests.items())).encode()).hexdigest()

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


def bench_env(src: str | None, workdir: str | Path) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    # Mergeflow runs its pipeline as a Prefect flow: give it a Prefect home (database) of the
    # benchmark's own, so it neither contends with nor grows anybody else's ~/.prefect.
    env["PREFECT_HOME"] = str(Path(workdir).resolve() / "prefect-home")
    env.pop("PREFECT_API_URL", None)
    if src:
        src = str(Path(src).resolve())
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    return env


def mergeflow_origin(src: str | None, workdir: str | Path) -> str:
    """Which mergeflow the measured processes import (file and git commit when known)."""
    out = subprocess.run([sys.executable, "-c", "import mergeflow; print(mergeflow.__file__)"],
                         env=bench_env(src, workdir), capture_output=True, text=True,
                         check=True, cwd=workdir)
    path = Path(out.stdout.strip()).parent
    stamp = path.parent / "SNAPSHOT"
    if stamp.is_file():
        return f"{path} ({stamp.read_text().strip()})"
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "mergeflow"],
                           capture_output=True, text=True).stdout.strip()
    return f"{path} (repo HEAD {commit}{', with uncommitted changes' if dirty else ''})"


def mergeflow_supports(env: dict, workdir: Path, option: str) -> bool:
    """Whether the benchmarked mergeflow's CLI has ``option`` (read from its source)."""
    out = subprocess.run([sys.executable, "-c", "import mergeflow.cli.app as c; print(c.__file__)"],
                         env=env, capture_output=True, text=True, cwd=workdir)
    try:
        return option in Path(out.stdout.strip()).read_text()
    except OSError:
        return False


def mergeflow_cmd() -> list[str]:
    """The ``mergeflow`` command as ``python -m mergeflow.cli``, which runs whichever mergeflow
    the process imports (the installed one, or ``--mergeflow-src`` / ``--baseline-src``), also
    across the move of the CLI into a package."""
    return [sys.executable, "-m", "mergeflow.cli"]


def merge_argv(base: Path, adapter: Path, out: Path, shard: str, *extra: str) -> list[str]:
    """``mergeflow merge`` of ``adapter`` into ``base``, written to ``out`` in ``shard`` shards
    with no tokenizer: the command every benchmark times (``extra``: more flags)."""
    return [*mergeflow_cmd(), "merge", "--base", str(base), "--adapter", str(adapter), "--out",
            str(out), "--max-shard-size", shard, "--no-tokenizer", *extra]


def drop_input_hashes(cache: Path) -> None:
    """Forget the input hashes a ``MERGEFLOW_CACHE`` folder holds; its layout memo stays (a new
    base of a known architecture)."""
    (cache / "sha256.json").unlink(missing_ok=True)


def _medians(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]
            if all(isinstance(r.get(k), (int, float)) for r in runs)}


def run_size(size: str, args, method: str, previous: dict) -> dict:
    workdir = Path(args.workdir)
    is_slice = size in SLICES
    with_peft = not is_slice and not args.skip_peft
    log(f"{size}: {count_params(size):,} parameters ({SIZES[size]})")
    base, adapter, params = ensure_inputs(size, workdir)
    root = base.parent
    runs_dir = workdir / "runs" / root.name
    runs_dir.mkdir(parents=True, exist_ok=True)
    mf_out, peft_out = runs_dir / "out-mergeflow", runs_dir / "out-peft"
    cp_out, baseline_out = runs_dir / "out-cp", runs_dir / "out-baseline"
    env = bench_env(args.mergeflow_src, workdir)
    shards = sorted(base.glob("*.safetensors"))
    layout_out = runs_dir / "out-layout-cached"
    for stale in (mf_out, layout_out, peft_out, cp_out, baseline_out):  # a stopped run's
        shutil.rmtree(stale, ignore_errors=True)
    # at most four outputs at once: mergeflow's cold and layout-cached ones, peft's or the
    # baseline's, and cp's
    need = 4 * sum(p.stat().st_size for p in shards) / 1e9
    free = shutil.disk_usage(workdir).free / 1e9
    if free < need * 1.1:
        raise SystemExit(f"{size}: {free:.0f} GB free in {workdir}, but its outputs need about "
                         f"{need * 1.1:.0f} GB; free some space or pass another --workdir")
    results: dict[str, list[dict]] = {"mergeflow": [], **({"peft": []} if with_peft else {}),
                                      "cp + sync": []}

    def measured(route: str, cmd: list[str], env_: dict, log_name: str, out: Path) -> dict:
        settle(base, adapter)
        load = os.getloadavg()[0]
        r = measure(cmd, env_, method, runs_dir / log_name)
        written = shard_bytes(out)
        r.update(written_gb=written / 1e9, write_gbps=written / 1e9 / r["wall_s"], load1=load)
        results.setdefault(route, []).append(r)
        log(f"{size}: {route} #{len(results[route])}: {r['wall_s']:.1f} s, "
            f"{r['rss_gib']:.2f} GiB (process tree, sampled: {r['sampled_peak_gib']:.2f} GiB, "
            f"PSS {r['sampled_peak_pss_gib']:.2f} GiB), "
            f"{r['write_gbps']:.3f} GB/s written, load {load:.1f}")
        return r

    def run_mergeflow(route: str, cache: Path, extra: list[str], log_name: str,
                      env_: dict = env, out: Path = mf_out) -> None:
        shutil.rmtree(out, ignore_errors=True)
        cmd = merge_argv(base, adapter, out, SHARD, *extra)
        measured(route, cmd, dict(env_, MERGEFLOW_CACHE=str(cache)), log_name, out)

    def run_peft(rep: int) -> None:
        shutil.rmtree(peft_out, ignore_errors=True)
        cmd = [sys.executable, str(HERE / "peft_merge.py"), str(base), str(adapter),
               str(peft_out), "--max-shard-size", SHARD]
        measured("peft", cmd, env, f"peft-{rep}.log", peft_out)

    def run_cp(rep: int) -> None:
        shutil.rmtree(cp_out, ignore_errors=True)
        cp_out.mkdir()
        # a real copy (no reflink), then fsync of each copy: what it takes to write the bytes
        measured("cp + sync", cp_sync_command(cp_out, shards), env, f"cp-{rep}.log", cp_out)
        shutil.rmtree(cp_out, ignore_errors=True)

    def run_layout_cached(cold_cache: Path, rep: int) -> None:
        """A base of a known architecture whose files are new (re-downloaded, copied, edited):
        the layout memo of the cold run just made applies (it is keyed by config.json and the
        tensor names), its input hashes do not. Paired, like the cold run."""
        layout_only = Path(tempfile.mkdtemp(prefix="mf-cache-", dir=workdir))
        shutil.copytree(cold_cache, layout_only, dirs_exist_ok=True)
        drop_input_hashes(layout_only)
        run_mergeflow(LAYOUT_CACHED, layout_only, [], f"mergeflow-layout-{rep}.log",
                      out=layout_out)
        shutil.rmtree(layout_only, ignore_errors=True)

    cache = None
    for rep in range(args.repeats):
        # Mergeflow, hash cache empty: hashing the inputs is part of the job.
        if cache is not None:
            shutil.rmtree(cache, ignore_errors=True)
        cache = Path(tempfile.mkdtemp(prefix="mf-cache-", dir=workdir))
        run_mergeflow("mergeflow", cache, [], f"mergeflow-{rep}.log")
        if not args.skip_extra:
            run_layout_cached(cache, rep)
        if with_peft:
            run_peft(rep)
        run_cp(rep)

    log(f"{size}: hashing every tensor of the outputs ...")
    base_digests = cached_digests(base, root / "base-digests.json")
    adapter_digests = tensor_digests(adapter)
    mf_digests = tensor_digests(mf_out)
    changed = {k for k, v in mf_digests.items() if base_digests.get(k) != v}
    expected = lora_modules(adapter)
    check: dict = {"tensors": len(mf_digests), "changed_vs_base": len(changed),
                   "expected_changed": len(expected), "changed_as_expected": changed == expected,
                   "unexpected_changes": sorted(changed - expected)[:5],
                   "unchanged_targets": sorted(expected - changed)[:5],
                   "same_names_as_base": set(mf_digests) == set(base_digests)}
    if with_peft:
        check["vs_peft"] = compare_digests(mf_digests, tensor_digests(peft_out))
        check["sampled"] = compare_outputs(mf_out, peft_out, base,
                                           SIZES[size]["num_hidden_layers"])
        log(f"{size}: same tensor bytes as peft: {check['vs_peft']['identical']}; sampled max "
            f"|mergeflow - peft| = {check['sampled']['max_abs_diff']:.3g} "
            f"({check['sampled']['max_diff_ulps']:.2f} bf16 ulp)")
    log(f"{size}: {len(changed)} tensors changed vs the base, {len(expected)} targeted: "
        f"{'as expected' if check['changed_as_expected'] else 'NOT as expected'}")
    sizes_on_disk = {"base_gb": folder_bytes(base) / 1e9,
                     "mergeflow_out_gb": folder_bytes(mf_out) / 1e9}
    if with_peft:
        sizes_on_disk["peft_out_gb"] = folder_bytes(peft_out) / 1e9
        if not args.keep_outputs:
            shutil.rmtree(peft_out, ignore_errors=True)

    # Mergeflow once more with the hash cache of the last run left in place, and (when the CLI
    # has it) once without its post-merge verification, to show what each part costs. Each
    # must write the same bytes.
    check["routes_agree"] = {}
    extra_routes = [] if args.skip_extra else [("mergeflow (warm hash)", [], "mergeflow-warm")]
    if not args.skip_extra and mergeflow_supports(env, workdir, "--no-verify"):
        extra_routes.append(("mergeflow (warm hash, --no-verify)", ["--no-verify"],
                             "mergeflow-warm-noverify"))
    for route, extra, log_name in extra_routes:
        run_mergeflow(route, cache, extra, f"{log_name}.log")
        check["routes_agree"][route] = compare_digests(mf_digests, tensor_digests(mf_out))
    if not args.skip_extra:
        check["routes_agree"][LAYOUT_CACHED] = compare_digests(mf_digests,
                                                               tensor_digests(layout_out))
        shutil.rmtree(layout_out, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    if not args.keep_outputs:
        shutil.rmtree(mf_out, ignore_errors=True)

    # The previous commit (or any other snapshot), once, with an empty hash cache.
    if args.baseline_src:
        bl_env = bench_env(args.baseline_src, workdir)
        bl_cache = Path(tempfile.mkdtemp(prefix="mf-cache-", dir=workdir))
        run_mergeflow("baseline", bl_cache, [], "baseline.log", env_=bl_env, out=baseline_out)
        shutil.rmtree(bl_cache, ignore_errors=True)
        check["vs_baseline"] = compare_digests(mf_digests, tensor_digests(baseline_out))
        log(f"{size}: same tensor bytes as the baseline: {check['vs_baseline']['identical']}")
        if not args.keep_outputs:
            shutil.rmtree(baseline_out, ignore_errors=True)

    inputs = digests_summary({**base_digests, **{"adapter:" + k: v
                                                 for k, v in adapter_digests.items()}})
    if previous:
        old = {r["size"]: r for r in previous.get("results", [])}.get(size)
        if old is None:
            check["vs_previous"] = {"comparable": False, "why": f"no {size} in that run"}
        elif old.get("digests", {}).get("inputs") != inputs:
            check["vs_previous"] = {"comparable": False, "why": "its inputs had other bytes"}
        else:
            check["vs_previous"] = dict(compare_digests(mf_digests,
                                                        old["digests"]["mergeflow_out"]),
                                        comparable=True)

    # Per-repeat ratios: each repeat's routes ran back to back, so they saw the same noise.
    pairs = []
    for i in range(args.repeats):
        mf, cp = results["mergeflow"][i], results["cp + sync"][i]
        pair = {"write_gbps_mergeflow_over_cp": mf["write_gbps"] / cp["write_gbps"],
                "time_mergeflow_over_cp": mf["wall_s"] / cp["wall_s"]}
        if LAYOUT_CACHED in results:
            pair["write_gbps_layout_cached_over_cp"] = \
                results[LAYOUT_CACHED][i]["write_gbps"] / cp["write_gbps"]
        if with_peft:
            pe = results["peft"][i]
            pair.update(time_mergeflow_over_peft=mf["wall_s"] / pe["wall_s"],
                        rss_mergeflow_over_peft=mf["rss_gib"] / pe["rss_gib"],
                        tree_rss_mergeflow_over_peft=mf["sampled_peak_gib"]
                        / pe["sampled_peak_gib"])
        pairs.append(pair)
    return {"size": size, "params": params, "config": SIZES[size],
            "slice_dims_overridden": bool(is_slice and SLICE_DIMS), "runs": results,
            "median": {route: _medians(runs) for route, runs in results.items()},
            "pairs": pairs, "pair_median": _medians(pairs), "check": check,
            "disk": sizes_on_disk, "base_shard_gb": sum(p.stat().st_size for p in shards) / 1e9,
            "digests": {"inputs": inputs, "mergeflow_out": mf_digests}}


# --------------------------------------------------------------------------------------------
# The report: markdown, to paste into docs/benchmarks.md


def _num(x: float) -> str:
    """Two decimals, or two significant digits below 0.1 (a ratio of 0.004 is not 0.00)."""
    return f"{x:.2f}" if abs(x) >= 0.1 or x == 0 else f"{x:.2g}"


def _ratio(res: dict, key: str, num: tuple[str, str], den: tuple[str, str]) -> str:
    """``median of the per-repeat ratios (ratio of the medians)``, or a dash."""
    m = res["median"]
    if key not in res["pair_median"] or num[0] not in m or den[0] not in m:
        return "-"
    return f"{_num(res['pair_median'][key])} ({_num(m[num[0]][num[1]] / m[den[0]][den[1]])})"


def _yes_no(entry: dict | None) -> str:
    if entry is None:
        return "-"
    if entry.get("comparable") is False:
        return f"n/a ({entry['why']})"
    if entry["identical"]:
        return f"yes ({entry['tensors']} tensors)"
    return (f"**NO**: {entry['differ']} differ {entry['differ_names']}, only here "
            f"{entry['only_first']}, only there {entry['only_second']}")


def report(all_results: list[dict], meta: dict) -> str:
    source = ("/usr/bin/time -v" if meta["rss_method"] == "time"
              else "getrusage(RUSAGE_CHILDREN)")
    lines = [f"Command: `{meta['command']}`", "",
             f"- mergeflow: {meta['mergeflow']}"]
    if meta.get("baseline"):
        lines.append(f"- baseline: {meta['baseline']}")
    if meta.get("compare_with"):
        lines.append(f"- compared with the digests of: {meta['compare_with']}")
    lines += [f"- machine: {meta['machine']}",
              f"- load average (1 min) at the start / end: {meta['load_start']:.1f} / "
              f"{meta.get('load_end', math.nan):.1f}"]
    if any(r["slice_dims_overridden"] for r in all_results):
        lines.append(f"- **70B slices with overridden dimensions (smoke test): {SLICE_DIMS}**")
    lines += ["", "| size | params | route | runs | wall s | peak RSS GiB | process tree GiB "
              "| tree PSS GiB | anon / file GiB | written GB | GB/s written |",
              "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for res in all_results:
        for route, m in res["median"].items():
            params = (f"{res['params'] / 1e9:.3f}B" if res["params"] >= 1e8
                      else f"{res['params'] / 1e6:.2f}M")
            lines.append(f"| {res['size']} | {params} | {route} "
                         f"| {len(res['runs'][route])} | {m['wall_s']:.1f} | {m['rss_gib']:.2f} "
                         f"| {m['sampled_peak_gib']:.2f} | {m.get('sampled_peak_pss_gib', math.nan):.2f} "
                         f"| {m['anon_at_peak_gib']:.2f} / {m['file_at_peak_gib']:.2f} "
                         f"| {m['written_gb']:.2f} | {m['write_gbps']:.3f} |")
    lines += ["", "Paired ratios, mergeflow / the other route: median of the per-repeat ratios "
              "(ratio of the medians in brackets). Throughput: shard bytes written per second.", "",
              "| size | pairs | time / peft | peak RSS / peft | process tree / peft "
              "| throughput / cp+sync | time / cp+sync |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    columns = [("time_mergeflow_over_peft", "wall_s", "peft"),
               ("rss_mergeflow_over_peft", "rss_gib", "peft"),
               ("tree_rss_mergeflow_over_peft", "sampled_peak_gib", "peft"),
               ("write_gbps_mergeflow_over_cp", "write_gbps", "cp + sync"),
               ("time_mergeflow_over_cp", "wall_s", "cp + sync")]
    for res in all_results:
        cells = [_ratio(res, key, ("mergeflow", field), (other, field))
                 for key, field, other in columns]
        lines.append(f"| {res['size']} | {len(res['pairs'])} | {' | '.join(cells)} |")
    others = [(res, route) for res in all_results for route in res["median"]
              if route not in ("mergeflow", "peft", "cp + sync")]
    if others:
        lines += ["", "Other routes (medians of their runs: the layout-cached one runs in every "
                  "repeat, the warm ones once after them), against the paired medians:", "",
                  "| size | route | time / mergeflow | time / peft | peak RSS / mergeflow "
                  "| peak RSS / peft |", "| --- | --- | ---: | ---: | ---: | ---: |"]
        for res, route in others:
            m, o = res["median"], res["median"][route]
            vs_peft = ((f"{o['wall_s'] / m['peft']['wall_s']:.2f}",
                        f"{o['rss_gib'] / m['peft']['rss_gib']:.2f}") if "peft" in m
                       else ("-", "-"))
            lines.append(f"| {res['size']} | {route} "
                         f"| {o['wall_s'] / m['mergeflow']['wall_s']:.2f} | {vs_peft[0]} "
                         f"| {o['rss_gib'] / m['mergeflow']['rss_gib']:.2f} | {vs_peft[1]} |")

    by_size = {r["size"]: r for r in all_results}
    scaling = []
    for big, small in (("3.6b", "0.9b"), ("3.6b-deep", "0.9b"), ("70b-slice-4", "70b-slice-1")):
        if big in by_size and small in by_size:
            b, s = by_size[big]["median"]["mergeflow"], by_size[small]["median"]["mergeflow"]
            scaling.append((big, small, b["rss_gib"] / s["rss_gib"],
                            b["sampled_peak_gib"] / s["sampled_peak_gib"]))
    if scaling:
        lines += ["", "| mergeflow peak RSS | largest process | process tree |",
                  "| --- | ---: | ---: |"]
        lines += [f"| {big} / {small} | {r:.2f} | {t:.2f} |" for big, small, r, t in scaling]

    lines += ["", "Output agreement: sha256 of every tensor's bytes.", "",
              "| size | tensors | changed vs base / targeted | same bytes as peft "
              "| sampled max abs diff vs peft (bf16 ulp) | other mergeflow routes "
              "| same bytes as baseline | same bytes as the earlier run |",
              "| --- | ---: | --- | --- | --- | --- | --- | --- |"]
    for res in all_results:
        c = res["check"]
        sampled = (f"{c['sampled']['max_abs_diff']:.3g} ({c['sampled']['max_diff_ulps']:.2f})"
                   if "sampled" in c else "-")
        agree = c["routes_agree"]
        routes = ("-" if not agree else "same bytes" if all(e["identical"] for e in agree.values())
                  else "**DIFFER**: " + ", ".join(r for r, e in agree.items() if not e["identical"]))
        changed = (f"{c['changed_vs_base']} / {c['expected_changed']}"
                   + ("" if c["changed_as_expected"] else
                      f" **NOT AS EXPECTED** {c['unexpected_changes']} {c['unchanged_targets']}"))
        lines.append(f"| {res['size']} | {c['tensors']} | {changed} | {_yes_no(c.get('vs_peft'))} "
                     f"| {sampled} | {routes} | {_yes_no(c.get('vs_baseline'))} "
                     f"| {_yes_no(c.get('vs_previous'))} |")

    lines += ["", "Targets (issue 11):", "", "| target | measured | must reach | |",
              "| --- | ---: | --- | --- |"]
    rows = 0

    def target(name: str, value: float, goal: str, met: bool) -> None:
        nonlocal rows
        rows += 1
        lines.append(f"| {name} | {_num(value)} | {goal} | {'met' if met else '**not met**'} |")

    pm = {s: r["pair_median"] for s, r in by_size.items()}
    vs_peft = {s: p for s, p in pm.items() if "time_mergeflow_over_peft" in p}  # PEFT ran
    if "0.9b" in vs_peft:
        t = pm["0.9b"]["time_mergeflow_over_peft"]
        target("0.9b wall time, mergeflow / PEFT", t, f"<= {TIME_TARGET_09}x "
               f"(goal {TIME_GOAL_09}x)", t <= TIME_TARGET_09)
    if "3.6b" in vs_peft:
        t = pm["3.6b"]["time_mergeflow_over_peft"]
        target("3.6b wall time / PEFT", t, f"<= {TIME_TARGET_36}x", t <= TIME_TARGET_36)
    if "0.9b" in vs_peft:
        r = pm["0.9b"]["rss_mergeflow_over_peft"]
        target("0.9b peak RSS / PEFT (largest process)", r, f"<= {RSS_TARGET}x", r <= RSS_TARGET)
    scale = {big: r for big, _, r, _ in scaling}
    if "3.6b" in scale:
        r = scale["3.6b"]
        target("peak RSS, 3.6b (4x wider) / 0.9b", r, f"<= {SCALE_TARGET}x", r <= SCALE_TARGET)
    smoke = [s for s in SLICES if s in by_size and by_size[s]["slice_dims_overridden"]]
    if smoke:  # the slice targets mean nothing at overridden dimensions
        lines.append(f"| 70B-slice targets: not measured ({', '.join(smoke)} ran at smoke-test "
                     "dimensions) | | | |")
        by_size = {s: r for s, r in by_size.items() if s not in smoke}
        scale.pop("70b-slice-4", None)
    if "70b-slice-1" in by_size:
        g = by_size["70b-slice-1"]["median"]["mergeflow"]["rss_gib"]
        target("70B-width slice, 1 layer, peak RSS GiB", g, f"<= {SLICE_RSS_TARGET} GiB",
               g <= SLICE_RSS_TARGET)
    if "70b-slice-4" in scale:
        r = scale["70b-slice-4"]
        target("70B-width slice, 4 layers / 1 layer, peak RSS", r, f"<= {SLICE_SCALE_TARGET}x",
               r <= SLICE_SCALE_TARGET)
    if "3.6b" in pm:
        t = pm["3.6b"]["write_gbps_mergeflow_over_cp"]
        target("merge throughput / cp+sync at 3.6b", t, f">= {THROUGHPUT_TARGET}x",
               t >= THROUGHPUT_TARGET)
    if rows == 0 and not smoke:
        lines.append("| (none of the target sizes ran) | | | |")
    lines += _issue27_targets(by_size, pm)
    identical = [c[k]["identical"] for res in all_results for c in [res["check"]]
                 for k in ("vs_peft", "vs_baseline", "vs_previous")
                 if k in c and c[k].get("comparable", True)]
    lines.append(f"| outputs bit-identical to PEFT, the baseline and the earlier run | "
                 f"{sum(identical)} of {len(identical)} checks | all | "
                 f"{'met' if all(identical) else '**not met**'} |")

    lines += ["", f"Peak RSS: `ru_maxrss` from {source} (the largest single process). Process "
              "tree: the sum over the command's processes, sampled every 0.1 s; anon / file: its "
              "split at that peak; tree PSS: the same sum of proportional set sizes (pages a "
              "forked child shares with its parent counted once). cp+sync: `cp --reflink=never` "
              "of the base's shards to a fresh folder, then `sync` (fsync) of the copies, timed "
              "together. Every route starts with "
              "its inputs in the page cache and the disk idle (an untimed `sync` first)."]
    return "\n".join(lines)


def _issue27_targets(by_size: dict, pm: dict) -> list[str]:
    """Issue 27's targets, from the sizes that ran (the warm-hash one from the single warm run
    against the paired PEFT median)."""
    rows = []

    def row(name: str, value: float, goal: str, met: bool) -> None:
        rows.append(f"| {name} | {_num(value)} | {goal} | {'met' if met else '**not met**'} |")

    if "time_mergeflow_over_peft" in pm.get("3.6b-deep", {}):
        t = pm["3.6b-deep"]["time_mergeflow_over_peft"]
        row("3.6b-deep / PEFT, cold hash", t, f"<= {ISSUE27['deep_cold']}x", t <= ISSUE27["deep_cold"])
        med = by_size["3.6b-deep"]["median"]
        if "mergeflow (warm hash)" in med and "peft" in med:
            t = med["mergeflow (warm hash)"]["wall_s"] / med["peft"]["wall_s"]
            row("3.6b-deep / PEFT, warm hash (one run)", t, f"<= {ISSUE27['deep_warm']}x",
                t <= ISSUE27["deep_warm"])
    if "time_mergeflow_over_peft" in pm.get("0.9b", {}):
        t = pm["0.9b"]["time_mergeflow_over_peft"]
        row("0.9b / PEFT, cold hash", t, f"<= {ISSUE27['small_cold']}x", t <= ISSUE27["small_cold"])
    if "3.6b" in pm:
        t = pm["3.6b"]["write_gbps_mergeflow_over_cp"]
        row("3.6b throughput / cp+sync, cold hash", t, f">= {ISSUE27['throughput']}x",
            t >= ISSUE27["throughput"])
        if "write_gbps_layout_cached_over_cp" in pm["3.6b"]:
            t = pm["3.6b"]["write_gbps_layout_cached_over_cp"]
            row("3.6b throughput / cp+sync, cold hash, layout cached (known architecture)", t,
                f">= {ISSUE27['throughput']}x", t >= ISSUE27["throughput"])
        g = by_size["3.6b"]["median"]["mergeflow"]["rss_gib"]
        row("peak RSS at 3.6b, GiB", g, f"<= {ISSUE27['rss_gib']}", g <= ISSUE27["rss_gib"])
    if not rows:
        return []
    return ["", "Targets (issue 27):", "", "| target | measured | must reach | |",
            "| --- | ---: | --- | --- |", *rows]


def machine() -> str:
    import platform
    from importlib.metadata import version

    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) / 1024**2
    except OSError:
        mem = math.nan
    pkgs = ", ".join(f"{p} {version(p)}" for p in ("torch", "transformers", "peft", "safetensors"))
    return (f"{os.cpu_count()} CPUs, {mem:.0f} GiB RAM, Python {platform.python_version()}, "
            f"{pkgs}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="0.9b,3.6b", help=f"comma list of {', '.join(SIZES)}")
    parser.add_argument("--repeats", type=int, default=1,
                        help="paired repeats: the routes run interleaved, once per repeat")
    parser.add_argument("--repeats-for", default="",
                        help="per-size repeats overriding --repeats, e.g. 0.9b=3")
    parser.add_argument("--workdir", default="/tmp/mf-bench", help="models, outputs, logs")
    parser.add_argument("--rss", choices=["auto", "time", "getrusage"], default="auto",
                        help="peak RSS from /usr/bin/time -v or a getrusage wrapper")
    parser.add_argument("--keep-outputs", action="store_true", help="keep the merged outputs")
    parser.add_argument("--skip-peft", action="store_true",
                        help="leave PEFT out: mergeflow against cp + sync alone (faster, for "
                        "the throughput figure)")
    parser.add_argument("--skip-extra", action="store_true",
                        help="skip the single warm-hash and --no-verify mergeflow runs")
    parser.add_argument("--mergeflow-src", default=None,
                        help="a folder holding the mergeflow package to benchmark (put first on "
                        "PYTHONPATH), e.g. a `git archive` snapshot; default: the installed one")
    parser.add_argument("--baseline-src", default=None,
                        help="a folder holding an older mergeflow (e.g. a `git archive` of the "
                        "previous commit): run once per size; its output must have the same "
                        "tensor bytes")
    parser.add_argument("--compare-with", default=None,
                        help="an earlier run's results.json (or its workdir): its mergeflow "
                        "outputs' tensor digests must match, where the inputs did")
    parser.add_argument("--slice-dims", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_build-base", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--_build-adapter", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    set_slice_dims(args.slice_dims)
    if args._build_base:
        size, folder = args._build_base[0], Path(args._build_base[1])
        (_build_slice_base if size in SLICES else _build_base)(size, folder)
        return
    if args._build_adapter:
        size, folder = args._build_adapter[0], Path(args._build_adapter[1])
        if size in SLICES:
            _build_slice_adapter(size, folder.parent / "base", folder)
        else:
            _build_adapter(folder.parent / "base", folder)
        return

    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        parser.error(f"unknown size(s) {unknown}; choose from {list(SIZES)}")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    previous: dict = {}
    if args.compare_with:
        path = Path(args.compare_with)
        path = path / "results.json" if path.is_dir() else path
        previous = json.loads(path.read_text())
    per_size = dict(kv.split("=") for kv in args.repeats_for.split(",") if kv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    method = rss_method(args.rss)
    free = shutil.disk_usage(workdir).free / 1e9
    log(f"workdir {workdir} ({free:.0f} GB free), {os.cpu_count()} CPUs, peak RSS via {method}")
    meta = {"command": shlex.join(["python", "bench/bench_merge.py", *sys.argv[1:]]),
            "rss_method": method, "cpus": os.cpu_count(), "machine": machine(),
            "mergeflow": mergeflow_origin(args.mergeflow_src, workdir),
            "baseline": (mergeflow_origin(args.baseline_src, workdir) if args.baseline_src
                         else None),
            "compare_with": str(args.compare_with) if args.compare_with else None,
            "load_start": os.getloadavg()[0]}
    # Create the benchmark's Prefect database (migrations) untimed, with a trivial flow.
    subprocess.run([sys.executable, "-c", "from prefect import flow\n"
                    "@flow\ndef warm_up():\n    return 1\nwarm_up()"],
                   env=bench_env(args.mergeflow_src, workdir), cwd=workdir, capture_output=True)
    log(f"benchmarking mergeflow from {meta['mergeflow']}")
    if meta["baseline"]:
        log(f"baseline: mergeflow from {meta['baseline']}")
    all_results: list[dict] = []

    def save(final: bool) -> str:
        meta["load_end"] = os.getloadavg()[0]
        text = report(all_results, meta)
        (workdir / "results.json").write_text(json.dumps(
            {**meta, "complete": final, "report": text, "results": all_results}, indent=1))
        (workdir / "report.md").write_text(text + "\n")
        return text

    for size in sizes:
        size_args = argparse.Namespace(**vars(args))
        size_args.repeats = int(per_size.get(size, args.repeats))
        all_results.append(run_size(size, size_args, method, previous))
        save(final=False)
    text = save(final=True)
    print()
    print(text)
    print(f"\nraw figures: {workdir / 'results.json'}; this report: {workdir / 'report.md'}")


if __name__ == "__main__":
    main()
