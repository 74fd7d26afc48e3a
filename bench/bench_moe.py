"""Benchmark: memory of an MoE merge with expert LoRA, at two expert counts (issue 12).

    python bench/bench_moe.py --experts 8,32 --repeats 2 --workdir /tmp/mf-moe-bench
    python bench/bench_moe.py --experts 4,8 --hidden 256 --moe-intermediate 128   # quick check

The model is a random Qwen3-MoE in bf16 (``--hidden`` 1024, ``--moe-intermediate`` 512,
``--layers`` 2, 8 heads / 4 kv heads, vocab 8000, every layer sparse), saved with
``save_pretrained`` in 1GB shards: transformers writes one tensor per expert on disk
(``mlp.experts.N.gate_proj/up_proj/down_proj``) while the model in memory stacks them into
``experts.gate_up_proj`` / ``experts.down_proj``. The adapter is PEFT's own: r=16 LoRA on
q,k,v,o plus ``target_parameters`` on both stacked expert parameters (``ParamWrapper``,
``init_lora_weights=False``). The expert counts share every width, so a bigger count is more
experts of the same size: Mergeflow, which merges one expert's tensor at a time in row blocks,
should need the same memory at any count, while PEFT holds the whole model.

Routes, each in a fresh process of its own, interleaved repeat by repeat (mergeflow, peft,
cp + sync, ...) so noise from the shared machine hits them alike:

* ``mergeflow merge --max-shard-size 1GB --no-tokenizer --workers 1 --block-size BLOCK`` with an
  empty ``MERGEFLOW_CACHE`` - "mergeflow"; its *block budget* is
  ``workers x BUFFERS_PER_WORKER x block`` (:mod:`mergeflow.pipeline.resources`);
* ``bench/peft_merge.py``: ``from_pretrained(bf16)``, ``PeftModel.from_pretrained``,
  ``merge_and_unload()``, ``save_pretrained(max_shard_size="1GB")`` - "peft";
* ``cp --reflink=never`` of the base's shards, then ``sync`` of the copies - "cp + sync";
* once per expert count, "imports": a process that only imports what a Mergeflow merge of this
  model imports (mergeflow's CLI and API, torch, transformers' Qwen3-MoE, PEFT) - the fixed cost
  under Mergeflow's peak. "Mergeflow over imports" is its peak minus that, to compare with the
  block budget; and "mergeflow, 1MB block": the same merge with the smallest block
  (``MIN_BLOCK``), so the part of the peak that the block budget governs shows as the
  difference;
* after each cold "mergeflow" run, "mergeflow, warm cache": the same merge again with the cache
  that run filled (input hashes, the layout and PEFT's whole-parameter wrappers: a second
  adapter with the same configuration on a known base imports neither transformers nor PEFT).

Peak RSS is the kernel's ``ru_maxrss`` of the measured process (``/usr/bin/time -v`` or
``getrusage(RUSAGE_CHILDREN)`` in a wrapper, as in ``bench/bench_merge.py``, whose measuring code
this reuses); medians over the repeats, and for the ratios the median of the per-repeat ratios.
Agreement: every tensor of Mergeflow's and of PEFT's output against PEFT's merge done in float32
(same names, dtypes and shapes; the largest error in bf16 ulps of each reference value: 0.5 is a
correctly rounded merge, PEFT's bf16 route rounds twice), and exactly the targeted tensors differ
from the base.
The report (markdown) is printed and written to WORKDIR/report.md, the raw figures to
WORKDIR/results.json. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_merge import (  # noqa: E402  (the benchmark scripts sit side by side)
    bench_env,
    cp_sync_command,
    log,
    measure,
    merge_argv,
    mergeflow_origin,
    rss_method,
    shard_bytes,
    tensor_digests,
)

SHARD = "1GB"
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
IMPORTS = ("import mergeflow.cli.app, mergeflow.pipeline.steps, torch, peft; "
           "from transformers import Qwen3MoeForCausalLM")
GIB = 2**30
SMALL_BLOCK = "1MB"  # mergeflow.pipeline.resources.MIN_BLOCK: the smallest block budget


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", default="8,32", help="expert counts, comma-separated")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--moe-intermediate", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--block-size", default="8MB", help="mergeflow's --block-size")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", default="/tmp/mf-moe-bench")
    parser.add_argument("--mergeflow-src", default=None,
                        help="benchmark the mergeflow package in this folder")
    parser.add_argument("--rss", choices=["auto", "time", "getrusage"], default="auto")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- the inputs


def build_inputs(root: Path, experts: int, args: argparse.Namespace) -> tuple[Path, Path]:
    """The base (saved by transformers: one tensor per expert) and PEFT's adapter for
    ``experts`` experts, built once and cached in ``root``."""
    base, adapter = root / "base", root / "adapter"
    if (adapter / "adapter_config.json").is_file():
        return base, adapter
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    shutil.rmtree(root, ignore_errors=True)
    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        hidden_size=args.hidden, intermediate_size=2 * args.moe_intermediate,
        moe_intermediate_size=args.moe_intermediate, num_experts=experts, num_experts_per_tok=2,
        num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
        head_dim=args.hidden // 8, vocab_size=args.vocab, decoder_sparse_step=1,
        mlp_only_layers=[], tie_word_embeddings=False, max_position_embeddings=256)
    model = Qwen3MoeForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(base, max_shard_size=SHARD)
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=ATTENTION,
                      target_parameters=EXPERTS, init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(adapter)
    return base, adapter


def expected_changes(base: Path) -> set[str]:
    """The base tensors the adapter changes: q,k,v,o and every expert's three projections."""
    return {name for name in tensor_digests(base)
            if any(f".self_attn.{m}." in name for m in ATTENTION) or ".mlp.experts." in name}


# --------------------------------------------------------------------------- the routes


def run_count(experts: int, args: argparse.Namespace, method: str) -> dict:
    """Every route on the model with ``experts`` experts; the raw figures."""
    workdir = Path(args.workdir).resolve()
    root = workdir / f"qwen3moe-e{experts}-h{args.hidden}-i{args.moe_intermediate}"
    log(f"{experts} experts: building the inputs (cached in {root}) ...")
    base, adapter = build_inputs(root, experts, args)
    env = bench_env(args.mergeflow_src, workdir)
    shards = sorted(base.glob("*.safetensors"))
    outs = {name: workdir / f"out-{name}" for name in ("mergeflow", "peft", "cp")}
    runs: dict[str, list[dict]] = {"mergeflow": [], "peft": [], "cp + sync": [], "imports": [],
                                   "mergeflow, 1MB block": [], "mergeflow, warm cache": []}

    def measured(route: str, cmd: list[str], env_: dict, log_name: str) -> None:
        runs[route].append(measure(cmd, env_, method, workdir / log_name))
        r = runs[route][-1]
        log(f"  {route}: {r['wall_s']:.1f} s, peak RSS {r['rss_gib']:.3f} GiB")

    def run_mergeflow(route: str, block_size: str, log_name: str, cache: Path) -> None:
        shutil.rmtree(outs["mergeflow"], ignore_errors=True)
        measured(route, merge_argv(base, adapter, outs["mergeflow"], SHARD, "--workers", "1",
                                   "--block-size", block_size),
                 dict(env, MERGEFLOW_CACHE=str(cache)), log_name)

    def empty_cache() -> Path:
        return Path(tempfile.mkdtemp(prefix="mf-cache-", dir=workdir))

    measured("imports", [sys.executable, "-c", IMPORTS], env, f"imports-e{experts}.log")
    cache = empty_cache()
    run_mergeflow("mergeflow, 1MB block", SMALL_BLOCK, f"mergeflow-small-e{experts}.log", cache)
    shutil.rmtree(cache, ignore_errors=True)
    for rep in range(args.repeats):
        cache = empty_cache()  # hashes, layout and PEFT's wrappers all to be learnt
        run_mergeflow("mergeflow", args.block_size, f"mergeflow-e{experts}-{rep}.log", cache)
        # the same merge again, every answer cached (a second adapter of a known base and config)
        run_mergeflow("mergeflow, warm cache", args.block_size,
                      f"mergeflow-warm-e{experts}-{rep}.log", cache)
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(outs["peft"], ignore_errors=True)
        measured("peft", [sys.executable, str(HERE / "peft_merge.py"), str(base), str(adapter),
                          str(outs["peft"]), "--max-shard-size", SHARD],
                 env, f"peft-e{experts}-{rep}.log")
        shutil.rmtree(outs["cp"], ignore_errors=True)
        outs["cp"].mkdir()
        measured("cp + sync", cp_sync_command(outs["cp"], shards), env, f"cp-e{experts}-{rep}.log")
    log(f"{experts} experts: comparing the outputs ...")
    agreement = compare_outputs(outs["mergeflow"], outs["peft"], base, adapter, workdir)
    for out in outs.values():
        shutil.rmtree(out, ignore_errors=True)
    return {"experts": experts, "base_bytes": shard_bytes(base), "runs": runs,
            "agreement": agreement}


def compare_outputs(mf_out: Path, peft_out: Path, base: Path, adapter: Path,
                    workdir: Path) -> dict:
    """Mergeflow's and PEFT's outputs against PEFT's merge done in float32 and rounded once to
    bf16 (saved by ``save_pretrained``, so under the disk names): names, dtypes, shapes and the
    largest error of each in bf16 ulps of the reference value; and whether exactly the targeted
    tensors differ from the base. (PEFT's own bf16 merge rounds twice.)"""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    def tensors(folder: Path) -> dict:
        found: dict = {}
        for path in sorted(folder.glob("*.safetensors")):
            found.update(load_file(path))
        return found

    reference_dir = workdir / "out-float32-reference"
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(
        reference_dir, max_shard_size=SHARD)
    del model
    reference, original = tensors(reference_dir), tensors(base)
    shutil.rmtree(reference_dir, ignore_errors=True)
    result: dict = {}
    for route, folder in (("mergeflow", mf_out), ("peft", peft_out)):
        got = tensors(folder)
        worst, mismatched = 0.0, [n for n in got if n not in reference
                                  or got[n].shape != reference[n].shape
                                  or got[n].dtype != original[n].dtype]
        for name in sorted(set(got) & set(reference)):
            ref = reference[name].float()
            mag = ref.abs().clamp_min(2.0**-126)  # one bf16 ulp at each value: 2^(exponent - 7)
            ulp = torch.exp2(torch.floor(torch.log2(mag)) - 7)
            worst = max(worst, float(((got[name].float() - ref).abs() / ulp).max()))
        changed = {n for n in got if n in original and not torch.equal(got[n], original[n])}
        result[route] = {"same_names": set(got) == set(original), "mismatched": mismatched[:5],
                         "max_ulps_vs_float32": worst,
                         "changed_as_targeted": changed == expected_changes(base)}
    return result


# --------------------------------------------------------------------------- the report


def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def paired_ratio(a: list[dict], b: list[dict], key: str) -> float:
    """The median over repeats of ``a[i][key] / b[i][key]``."""
    return statistics.median(x[key] / y[key] for x, y in zip(a, b, strict=True))


def block_budget(block_size: str) -> int:
    """Mergeflow's bound on its working buffers with one worker: BUFFERS_PER_WORKER blocks."""
    from mergeflow.pipeline.resources import BUFFERS_PER_WORKER
    from mergeflow.spec import size_bytes

    return BUFFERS_PER_WORKER * size_bytes(block_size)


def report(results: list[dict], args: argparse.Namespace, origin: str) -> str:
    budget = block_budget(args.block_size)
    lines = [f"Mergeflow: {origin}. Qwen3-MoE bf16, hidden {args.hidden}, moe_intermediate "
             f"{args.moe_intermediate}, {args.layers} layers, vocab {args.vocab}; LoRA r={args.rank} "
             f"on q,k,v,o + target_parameters on gate_up_proj/down_proj; {args.repeats} paired "
             f"repeats, medians. Block budget (1 worker x 4 x {args.block_size}): "
             f"{budget / 2**20:.0f} MiB.", "",
             "| experts | base on disk | mergeflow peak RSS | over imports | over imports, 1MB "
             "block | PEFT peak RSS | RSS mergeflow / PEFT | wall mergeflow / PEFT | "
             "wall mergeflow / cp+sync | warm cache: wall, peak RSS, wall / PEFT "
             "| max error, bf16 ulps: mergeflow / PEFT |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        runs, agree = r["runs"], r["agreement"]
        over = median(runs["mergeflow"], "rss_gib") - median(runs["imports"], "rss_gib")
        small = median(runs["mergeflow, 1MB block"], "rss_gib") - median(runs["imports"], "rss_gib")
        ok = all(a["same_names"] and not a["mismatched"] and a["changed_as_targeted"]
                 for a in agree.values())
        lines.append(
            f"| {r['experts']} | {r['base_bytes'] / GIB:.2f} GiB | "
            f"{median(runs['mergeflow'], 'rss_gib'):.3f} GiB | {over * 1024:.0f} MiB | "
            f"{small * 1024:.0f} MiB | "
            f"{median(runs['peft'], 'rss_gib'):.3f} GiB | "
            f"{paired_ratio(runs['mergeflow'], runs['peft'], 'rss_gib'):.2f}x | "
            f"{paired_ratio(runs['mergeflow'], runs['peft'], 'wall_s'):.2f}x | "
            f"{paired_ratio(runs['mergeflow'], runs['cp + sync'], 'wall_s'):.2f}x | "
            f"{median(runs['mergeflow, warm cache'], 'wall_s'):.1f} s, "
            f"{median(runs['mergeflow, warm cache'], 'rss_gib'):.3f} GiB, "
            f"{paired_ratio(runs['mergeflow, warm cache'], runs['peft'], 'wall_s'):.2f}x | "
            f"{agree['mergeflow']['max_ulps_vs_float32']:.2f} / "
            f"{agree['peft']['max_ulps_vs_float32']:.2f}"
            f"{'' if ok else ' (MISMATCH: see results.json)'} |")
    if len(results) > 1:
        first, last = results[0], results[-1]
        mf = median(last["runs"]["mergeflow"], "rss_gib") / median(first["runs"]["mergeflow"],
                                                                    "rss_gib")
        peft = median(last["runs"]["peft"], "rss_gib") / median(first["runs"]["peft"], "rss_gib")
        lines += ["", f"Peak RSS growth {first['experts']} -> {last['experts']} experts: "
                      f"mergeflow {mf:.2f}x, PEFT {peft:.2f}x."]
    lines += ["", "Peak RSS: `ru_maxrss` of the measured process. \"over imports\": mergeflow's "
                  "peak minus that of a process importing what it imports; \"1MB block\": the "
                  f"same with `--block-size {SMALL_BLOCK}` (budget "
                  f"{block_budget(SMALL_BLOCK) / 2**20:.0f} MiB), run once: the difference "
                  "between the two is what the block budget buys. Max error: against PEFT's "
                  "merge in float32 rounded once to bf16, in bf16 ulps of each reference value "
                  "(0.5 = correctly rounded)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    method = rss_method(args.rss)
    counts = [int(c) for c in args.experts.split(",") if c]
    results = [run_count(e, args, method) for e in counts]
    text = report(results, args, mergeflow_origin(args.mergeflow_src, workdir))
    (workdir / "results.json").write_text(json.dumps(results, indent=1))
    (workdir / "report.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
