"""The bad-input corpus (issue 8), through the real ``mergeflow merge`` command.

Every case builds one broken input (a corrupt or lying safetensors header, a broken index, a
poisoned or foreign adapter, a tokenizer that does not fit, an output inside an input) and checks
that the CLI exits 2 with ONE ``error:`` line naming the file or key at fault, before any work:
the folder the output would go into (watched with a sentinel file) is byte-for-byte unchanged, so
no output, manifest or staging folder appears. tests/test_cli.py holds the first cases of the
corpus; these extend it. The numeric guards (non-finite merged values, a no-op adapter) close the
file.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from builders import save_tokenizer
from helpers import run_cli_forked, snapshot
from safetensors.torch import load_file, save_file

import mergeflow
from mergeflow.errors import AdapterError, InputError

TARGETS = ["q_proj", "v_proj", "down_proj"]


@dataclass
class Case:
    base: Path
    adapter: Path
    out: Path
    names: list[str]  # what the one error line must name
    flags: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def args(self) -> list[str]:
        return ["merge", "--base", str(self.base), "--adapter", str(self.adapter),
                "--out", str(self.out), *self.flags]

    @property
    def watched(self) -> Path:
        """The folder the output would appear in (holding a sentinel file, or an input)."""
        return self.out.parent


# --------------------------------------------------------------------------- damaging files


def header_of(path: Path) -> tuple[dict, bytes]:
    """A safetensors file's header (parsed) and its data bytes."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def write_raw(path: Path, header_text: str, data: bytes) -> None:
    body = header_text.encode()
    body += b" " * (-len(body) % 8)
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)


def edit_header(path: Path, edit: Callable[[dict], None]) -> None:
    """Rewrite a safetensors header (data bytes unchanged)."""
    header, data = header_of(path)
    edit(header)
    write_raw(path, json.dumps(header), data)


def first_key(path: Path, suffix: str) -> str:
    header, _ = header_of(path)
    return sorted(k for k in header if k.endswith(suffix))[0]


def copy(src: Path, dest: Path) -> Path:
    return Path(shutil.copytree(src, dest))


class Poison:
    """A pickle payload that would create a file if it were ever unpickled with code allowed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def added_tokens_adapter(base: Path, folder: Path) -> Path:
    """A run that resized to 136 rows and trained full embed/head copies (as in test_vocab)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(base)
    model.resize_token_embeddings(136)
    peft_model = get_peft_model(model, LoraConfig(
        r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"],
        init_lora_weights=False))
    peft_model.save_pretrained(folder)
    save_tokenizer(folder, 128, extra_tokens=8)  # 136 tokens: fits
    return folder


# --------------------------------------------------------------------------- the corpus


class Corpus:
    """Builds the cases under ``root``; each gets its own folder ``root/<name>/``."""

    def __init__(self, root: Path, make_base, make_adapter) -> None:
        self.root = root
        self.base = make_base("llama")
        self.adapter = make_adapter(self.base, target_modules=TARGETS)
        self.sharded = make_base("llama", max_shard_size="100KB")
        self.sharded_adapter = make_adapter(self.sharded, target_modules=TARGETS)
        self.shard2 = sorted(p.name for p in self.sharded.glob("model-*.safetensors"))[1]
        self.make_base, self.make_adapter = make_base, make_adapter
        self.cases: dict[str, Case] = {}

    def dir(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def add(self, name: str, base: Path, adapter: Path, names: list[str], *,
            out: Path | None = None, flags: list[str] | None = None,
            env: dict[str, str] | None = None) -> None:
        if out is None:
            parent = self.dir(name) / "out-parent"
            parent.mkdir()
            (parent / "sentinel.txt").write_text("the merge must not touch this folder\n")
            out = parent / "merged"
        self.cases[name] = Case(base, adapter, out, names, flags or [], env or {})

    def base_copy(self, name: str, sharded: bool = False, where: str = "base") -> Path:
        return copy(self.sharded if sharded else self.base, self.dir(name) / where)

    def adapter_copy(self, name: str) -> Path:
        return copy(self.adapter, self.dir(name) / "adapter")

    # -- base checkpoints -------------------------------------------------------------------

    def headers(self) -> None:
        name = "corrupt-header"
        shard = self.base_copy(name) / "model.safetensors"
        raw = bytearray(shard.read_bytes())
        raw[9:40] = b"\xff" * 31  # inside the header JSON
        shard.write_bytes(bytes(raw))
        self.add(name, shard.parent, self.adapter, [str(shard), "header"])

        for name, length in (("header-length-beyond-file", None), ("header-length-absurd", 2**40)):
            shard = self.base_copy(name) / "model.safetensors"
            raw = shard.read_bytes()
            length = length or len(raw) + 1000
            shard.write_bytes(struct.pack("<Q", length) + raw[8:])
            self.add(name, shard.parent, self.adapter, [str(shard), f"header length {length}"])

        name = "truncated-in-header"
        shard = self.base_copy(name) / "model.safetensors"
        shard.write_bytes(shard.read_bytes()[:100])
        self.add(name, shard.parent, self.adapter, [str(shard)])

        name = "empty-file"
        shard = self.base_copy(name) / "model.safetensors"
        shard.write_bytes(b"")
        self.add(name, shard.parent, self.adapter, [str(shard), "too short"])

        name = "truncated-second-shard"
        shard = self.base_copy(name, sharded=True) / self.shard2
        shard.write_bytes(shard.read_bytes()[:-1])
        self.add(name, shard.parent, self.sharded_adapter, [str(shard), "truncated"])

        name = "duplicate-key-in-header"
        shard = self.base_copy(name) / "model.safetensors"
        key = first_key(shard, "input_layernorm.weight")
        header, data = header_of(shard)
        entry = json.dumps(header[key])
        text = json.dumps(header).replace(f'"{key}": {entry}', f'"{key}": {entry}, "{key}": {entry}')
        write_raw(shard, text, data)
        self.add(name, shard.parent, self.adapter, [str(shard), f"'{key}' twice"])

        name = "unknown-dtype-F7"
        shard = self.base_copy(name) / "model.safetensors"
        key = first_key(shard, "norm.weight")
        edit_header(shard, lambda h: h[key].update(dtype="F7"))
        self.add(name, shard.parent, self.adapter, [str(shard), key, "'F7'"])

        name = "unmergeable-dtype-C64"
        shard = self.base_copy(name) / "model.safetensors"
        key = first_key(shard, "post_attention_layernorm.weight")

        def complex64(header: dict) -> None:
            header[key].update(dtype="C64", shape=[header[key]["shape"][0] // 2])

        edit_header(shard, complex64)
        self.add(name, shard.parent, self.adapter, [str(shard), key, "C64"])

        name = "offsets-overlap"
        shard = self.base_copy(name) / "model.safetensors"
        key = first_key(shard, "q_proj.weight")
        edit_header(shard, lambda h: h[key].update(
            data_offsets=[h[key]["data_offsets"][0] + 4, h[key]["data_offsets"][1] + 4]))
        self.add(name, shard.parent, self.adapter, [str(shard), key])

    def indexes(self) -> None:
        index_name = "model.safetensors.index.json"
        shard2 = self.shard2

        def index_case(name: str, edit: Callable[[Path, dict], list[str]]) -> None:
            base = self.base_copy(name, sharded=True)
            index = json.loads((base / index_name).read_text())
            names = edit(base, index)
            (base / index_name).write_text(json.dumps(index))
            self.add(name, base, self.sharded_adapter, names)

        def key_in_two_shards(base: Path, index: dict) -> list[str]:
            key = sorted(k for k, f in index["weight_map"].items() if f != shard2)[0]
            first = load_file(str(base / index["weight_map"][key]))
            second = load_file(str(base / shard2))
            save_file({**second, key: first[key]}, str(base / shard2), metadata={"format": "pt"})
            return [str(base / shard2), key]

        def missing_file(base: Path, index: dict) -> list[str]:
            (base / shard2).unlink()
            return [str(base / shard2), "not found"]

        def parent_path(base: Path, index: dict) -> list[str]:
            shutil.copyfile(base / shard2, base.parent / shard2)  # a real file outside
            index["weight_map"] = {k: f"../{v}" if v == shard2 else v
                                   for k, v in index["weight_map"].items()}
            return [str(base / index_name), f"../{shard2}"]

        def absolute_path(base: Path, index: dict) -> list[str]:
            outside = base.parent / shard2
            shutil.copyfile(base / shard2, outside)
            index["weight_map"] = {k: str(outside) if v == shard2 else v
                                   for k, v in index["weight_map"].items()}
            return [str(base / index_name), str(outside)]

        def weight_map_not_object(base: Path, index: dict) -> list[str]:
            index["weight_map"] = list(index["weight_map"].items())
            return [str(base / index_name), "weight_map"]

        def weight_map_value_not_name(base: Path, index: dict) -> list[str]:
            key = sorted(index["weight_map"])[0]
            index["weight_map"][key] = {"file": index["weight_map"][key]}
            return [str(base / index_name), key]

        index_case("key-in-two-shards", key_in_two_shards)
        index_case("index-missing-file", missing_file)
        index_case("index-parent-path", parent_path)
        index_case("index-absolute-path", absolute_path)
        index_case("index-weight-map-not-object", weight_map_not_object)
        index_case("index-value-not-a-name", weight_map_value_not_name)

    # -- adapters ---------------------------------------------------------------------------

    def adapter_weights(self) -> None:
        for name, part, value in (("nan-in-adapter", "down_proj.lora_B.weight", float("nan")),
                                  ("inf-in-adapter", "v_proj.lora_A.weight", float("inf"))):
            adapter = self.adapter_copy(name)
            file = adapter / "adapter_model.safetensors"
            state = load_file(str(file))
            key = sorted(k for k in state if k.endswith(part))[-1]
            state[key].view(-1)[3] = value
            save_file(state, str(file), metadata={"format": "pt"})
            self.add(name, self.base, adapter, [str(file), key])

        name = "corrupt-adapter-file"
        adapter = self.adapter_copy(name)
        file = adapter / "adapter_model.safetensors"
        file.write_bytes(file.read_bytes()[:-7])
        self.add(name, self.base, adapter, [str(file)])

        name = "adapter-for-other-base-mlp"  # same hidden size, other intermediate size
        other = self.make_adapter(self.make_base("llama", intermediate_size=96), target_modules=TARGETS)
        self.add(name, self.base, other, [str(other / "adapter_model.safetensors"), "down_proj",
                                          "another base"])

        name = "target-module-renamed"
        adapter = self.adapter_copy(name)
        file = adapter / "adapter_model.safetensors"
        state = load_file(str(file))
        state = {k.replace("layers.1.self_attn.q_proj", "layers.1.self_attn.query"): v
                 for k, v in state.items()}
        save_file(state, str(file), metadata={"format": "pt"})
        self.add(name, self.base, adapter, [str(file), "layers.1.self_attn.query"])

        name = "pickle-with-code"
        adapter = self.adapter_copy(name)
        state = dict(load_file(str(adapter / "adapter_model.safetensors")))
        marker = self.dir(name) / "PWNED"
        state["payload"] = Poison(marker)
        (adapter / "adapter_model.safetensors").unlink()
        torch.save(state, adapter / "adapter_model.bin")
        self.add(name, self.base, adapter, [str(adapter / "adapter_model.bin"), "weights_only"])

    def adapter_configs(self) -> None:
        def config_case(name: str, text: str | None, names: list[str]) -> None:
            adapter = self.adapter_copy(name)
            path = adapter / "adapter_config.json"
            if text is None:
                path.unlink()
                path.mkdir()  # a folder where the file should be
            else:
                path.write_bytes(text.encode("utf-8", "surrogateescape"))
            self.add(name, self.base, adapter, [str(path), *names])

        config = json.loads((self.adapter / "adapter_config.json").read_text())
        for peft_type in ("LOHA", "LOKR", "ADALORA"):
            config_case(f"peft-type-{peft_type}", json.dumps({**config, "peft_type": peft_type}),
                        [peft_type])
        config_case("peft-type-missing", json.dumps({k: v for k, v in config.items()
                                                     if k != "peft_type"}), ["LoRA adapters only"])
        config_case("adapter-config-a-list", json.dumps([config]), ["JSON object"])
        config_case("adapter-config-binary", "\udcff\udcfe\x00garbage", ["unreadable"])
        config_case("adapter-config-is-a-folder", None, ["not found"])

    # -- vocabulary and output location -----------------------------------------------------

    def tokenizer_and_output(self) -> None:
        name = "tokenizer-larger-than-vocab"
        qwen = self.make_base("qwen2")
        adapter = added_tokens_adapter(qwen, self.dir(name) / "adapter")
        tokenizer = save_tokenizer(self.dir(name) / "tokenizer", 128, extra_tokens=20)
        self.add(name, qwen, adapter, ["148 tokens", "136 rows", "--tokenizer"],
                 flags=["--tokenizer", str(tokenizer)])

        name = "out-inside-adapter"
        adapter = self.adapter_copy(name)
        self.add(name, self.base, adapter, ["--out", str(adapter)], out=adapter / "merged")

        name = "out-is-the-base"
        base = self.base_copy(name)
        self.add(name, base, self.adapter, ["--out", str(base)], out=base)

        name = "out-contains-the-base"
        base = self.base_copy(name, where="inner/base")
        self.add(name, base, self.adapter, ["--out", str(base)], out=base.parent)

        name = "min-free-bytes-not-a-size"  # the preflight's own setting, unreadable
        self.add(name, self.base, self.adapter, ["MERGEFLOW_MIN_FREE_BYTES='lots'"],
                 env={"MERGEFLOW_MIN_FREE_BYTES": "lots"})

    def build(self) -> dict[str, Case]:
        self.headers()
        self.indexes()
        self.adapter_weights()
        self.adapter_configs()
        self.tokenizer_and_output()
        return self.cases


@pytest.fixture(scope="module")
def runs(tmp_path_factory, make_base, make_adapter):
    """name -> (case, CLI result, snapshot of the watched folder before the run)."""
    root = tmp_path_factory.mktemp("bad-inputs")
    logs = tmp_path_factory.mktemp("bad-inputs-logs")
    cases = Corpus(root, make_base, make_adapter).build()
    before = {n: snapshot(c.watched) for n, c in cases.items()}
    results = {}
    for env in ({}, {"MERGEFLOW_MIN_FREE_BYTES": "lots"}):
        names = [n for n, c in cases.items() if c.env == env]
        for start in range(0, len(names), 8):  # a few at a time: the machine has 2 cores
            batch = names[start:start + 8]
            results.update(zip(batch, run_cli_forked([cases[n].args() for n in batch], logs, env),
                               strict=True))
    return {n: (cases[n], results[n], before[n]) for n in cases}


CASES = ["corrupt-header", "header-length-beyond-file", "header-length-absurd",
         "truncated-in-header", "empty-file", "truncated-second-shard", "duplicate-key-in-header",
         "unknown-dtype-F7", "unmergeable-dtype-C64", "offsets-overlap", "key-in-two-shards",
         "index-missing-file", "index-parent-path", "index-absolute-path",
         "index-weight-map-not-object", "index-value-not-a-name", "nan-in-adapter",
         "inf-in-adapter", "corrupt-adapter-file", "adapter-for-other-base-mlp",
         "target-module-renamed", "pickle-with-code", "peft-type-LOHA", "peft-type-LOKR",
         "peft-type-ADALORA", "peft-type-missing", "adapter-config-a-list",
         "adapter-config-binary", "adapter-config-is-a-folder", "tokenizer-larger-than-vocab",
         "out-inside-adapter", "out-is-the-base", "out-contains-the-base",
         "min-free-bytes-not-a-size"]


@pytest.mark.parametrize("name", CASES)
def test_bad_input_exits_2_names_the_culprit_and_touches_nothing(name, runs):
    case, result, before = runs[name]
    assert result.returncode == 2, result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one error line, got:\n{result.stderr}"
    assert lines[0].startswith("error: "), lines[0]
    print(f"{name}: {lines[0]}")
    for expected in case.names:
        assert expected in lines[0], f"{expected!r} not named in: {lines[0]}"
    assert "Traceback" not in result.stderr
    # Nothing appeared, changed or vanished where the output would go: no output folder, no
    # staging folder, no manifest.
    assert snapshot(case.watched) == before
    assert case.out.exists() == (case.out in (case.base, case.base.parent))


def test_the_corpus_is_complete(runs):
    assert sorted(runs) == sorted(CASES)


def test_pickle_payload_never_ran(runs):
    case, _, _ = runs["pickle-with-code"]
    assert not (case.adapter.parent / "PWNED").exists()


# --------------------------------------------------------------------------- numeric guards


def _scaled_adapter(adapter: Path, dest: Path, value: float) -> Path:
    """A copy of ``adapter`` whose every LoRA weight is ``value`` (finite, but huge)."""
    dest = copy(adapter, dest)
    file = dest / "adapter_model.safetensors"
    state = {k: torch.full_like(v, value) for k, v in load_file(str(file)).items()}
    save_file(state, str(file), metadata={"format": "pt"})
    return dest


def test_overflowing_merge_fails_the_group_naming_the_tensor(make_base, make_adapter, tmp_path):
    """Finite adapter weights (1e20) whose product overflows float32: the plan-time scan lets
    them through, the merge's own guard stops the group."""
    base = make_base("llama")
    adapter = _scaled_adapter(make_adapter(base, target_modules=["q_proj"]), tmp_path / "a", 1e20)
    out = tmp_path / "out"
    with pytest.raises(AdapterError, match=r"merged tensor 'model\.layers\.\d\.self_attn\.q_proj"
                                           r"\.weight' holds NaN or Inf"):
        mergeflow.merge(base, adapter, out, verify=False)
    assert not out.exists()
    assert not list(tmp_path.glob(".out.mergeflow-partial/*.safetensors"))


def test_overflow_in_the_output_dtype_is_caught_without_verification(make_base, make_adapter,
                                                                      tmp_path):
    base = make_base("llama")
    adapter = _scaled_adapter(make_adapter(base, target_modules=["q_proj"]), tmp_path / "a", 300.0)
    with pytest.raises(InputError, match=r"q_proj\.weight' holds NaN or Inf as F16"):
        mergeflow.merge(base, adapter, tmp_path / "out", dtype="float16", verify=False)
    assert not (tmp_path / "out").exists()


def test_overflow_in_the_output_dtype_is_not_published(make_base, make_adapter, tmp_path):
    """Verification re-reads the written values: an Inf that reached a shard is never published."""
    from mergeflow.errors import VerificationError
    from mergeflow.pipeline import steps as api
    from mergeflow.spec import MergeSpec

    base = make_base("llama")
    adapter = _scaled_adapter(make_adapter(base, target_modules=["q_proj"]), tmp_path / "a", 300.0)
    prepared = api.prepare(MergeSpec(base=str(base), adapter=str(adapter),
                                     out=str(tmp_path / "out"), dtype="float16"))
    plan = api.MergePlan.load(Path(prepared.plan_path))
    source = api.open_merger(plan)
    source_blocks = source.blocks

    def unchecked(t):  # write the overflowed values, as a buggy writer would
        if not t.lora:
            return source_blocks(t)
        wide = source_blocks(t.model_copy(update={"dtype": "F32"}))
        return ((b.half(), ready, release) for b, ready, release in wide)

    source.blocks = unchecked
    results = [api.run_shard(prepared.plan_path, i, source=source)
               for i in range(prepared.shard_count)]
    api.finalize(prepared, results)
    report = api.verify(prepared)
    with pytest.raises(VerificationError, match=r"q_proj\.weight' holds NaN or Inf"):
        api.check_verified(prepared, report)
    assert not (tmp_path / "out").exists()


def test_adapter_that_changes_nothing_is_reported(make_base, make_adapter, tmp_path):
    """lora_B = 0 everywhere (saved right after get_peft_model): a silent no-op merge, reported
    as a warning by the plan (report, card, manifest) and by verification alike."""
    from mergeflow.pipeline import steps as api
    from mergeflow.spec import MergeSpec

    base = make_base("llama")
    adapter = make_adapter(base, target_modules=TARGETS, init_lora_weights=True)
    assert not any(t.any() for k, t in load_file(str(adapter / "adapter_model.safetensors")).items()
                   if "lora_B" in k)
    spec = MergeSpec(base=str(base), adapter=str(adapter), out=str(tmp_path / "out"))
    prepared = api.prepare(spec)
    plan_notes = json.loads(Path(prepared.plan_path).read_text())["notes"]
    warnings = [n for n in plan_notes if n.startswith("warning:")]
    assert len(warnings) == 1 and "changes no weight at all" in warnings[0]
    assert "lora_B is all zeros in all 6 LoRA modules" in warnings[0]
    report = mergeflow.merge(base, adapter, tmp_path / "merged")
    assert warnings[0] in report.notes
    manifest = json.loads((tmp_path / "merged" / "merge-manifest.json").read_text())
    assert warnings[0] in manifest["report"]["notes"]
    assert warnings[0] in (tmp_path / "merged" / "README.md").read_text()


def test_trained_adapter_gets_no_warning(make_base, make_adapter, tmp_path):
    base = make_base("llama")
    report = mergeflow.merge(base, make_adapter(base, target_modules=TARGETS), tmp_path / "out")
    assert not [n for n in report.notes if n.startswith("warning:")]


def test_verification_warns_on_the_same_adapter(make_base, make_adapter, tmp_path):
    from mergeflow.pipeline import steps as api
    from mergeflow.spec import MergeSpec

    base = make_base("llama")
    adapter = make_adapter(base, target_modules=TARGETS, init_lora_weights=True)
    prepared = api.prepare(MergeSpec(base=str(base), adapter=str(adapter), out=str(tmp_path / "o")))
    results = [api.run_shard(prepared.plan_path, i) for i in range(prepared.shard_count)]
    api.finalize(prepared, results)
    assert any("changes no weight at all" in w for w in api.verify(prepared).warnings)


def test_cli_prints_warnings_in_yellow_on_stderr(make_base, make_adapter, tmp_path):
    from rich.console import Console

    from mergeflow.cli import report as cli_report
    from mergeflow.pipeline.steps import MergeReport

    report = MergeReport(out="o", status="merged", dtype="float32", shards=1, tensors=3,
                         total_size=10, lora_modules=2, replaced_tensors=0, lora_biases=0,
                         variant="LoRA", notes=["a decision", "warning: nothing changes"])
    stdout, stderr = io.StringIO(), io.StringIO()
    saved = cli_report.out, cli_report.err
    cli_report.out = Console(file=stdout, force_terminal=True, color_system="standard", width=200)
    cli_report.err = Console(file=stderr, force_terminal=True, color_system="standard", width=200)
    try:
        cli_report.print_report(report)
    finally:
        cli_report.out, cli_report.err = saved
    assert "a decision" in stdout.getvalue() and "warning" not in stdout.getvalue()
    assert "\x1b[33mwarning: nothing changes" in stderr.getvalue()  # yellow


def test_cli_warns_about_a_no_op_adapter(make_base, make_adapter, tmp_path, prefect_server):
    base = make_base("llama")
    adapter = make_adapter(base, target_modules=TARGETS, init_lora_weights=True)
    [result] = run_cli_forked([["merge", "--base", str(base), "--adapter", str(adapter),
                             "--out", str(tmp_path / "out")]], tmp_path,
                           {"PREFECT_API_URL": prefect_server})
    assert result.returncode == 0, result.stderr
    warning = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warning and "changes no weight at all" in warning[0]
    assert "warning" not in result.stdout
