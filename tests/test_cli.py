"""The real ``mergeflow merge`` command, each case in its own process.

Bad inputs exit 2 with a one-line ``error:`` message that names the offending file or key, and
leave no output folder (nor a staging folder) behind.

Starting the CLI costs seconds of imports (torch, transformers, peft), so the cases are prepared
first and run concurrently: one in a fresh interpreter through the installed console script, the
others in processes forked from a server that imported the CLI once. Each test checks its case.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from helpers import (
    finish,
    load_json,
    read_tensors,
    run_cli_forked,
    snapshot,
    staging_leftovers,
    start_cli,
)
from safetensors.torch import load_file

import mergeflow
from mergeflow.output.folder import TOKENIZER_FILES

TARGETS = ["q_proj", "v_proj"]


@dataclass
class Case:
    base: Path
    adapter: Path
    out: Path
    flags: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)  # what the error line must name
    rc: int = 2
    fresh: bool = False  # run through the console script in a new interpreter

    def args(self) -> list[str]:
        return ["merge", "--base", str(self.base), "--adapter", str(self.adapter),
                "--out", str(self.out), *self.flags]


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def _prepare(root: Path, make_base, make_adapter) -> dict[str, Case]:
    base = make_base("llama")
    adapter = make_adapter(base, target_modules=TARGETS)
    cases: dict[str, Case] = {}

    def case(name: str, base: Path, adapter: Path, **kwargs) -> None:
        cases[name] = Case(base, adapter, root / name / "merged", **kwargs)
        (root / name).mkdir(exist_ok=True)

    # Base without config.json.
    broken = _copy(base, root / "missing-config" / "base")
    (broken / "config.json").unlink()
    case("missing-config", broken, adapter, names=[str(broken / "config.json")], fresh=True)

    # Adapter with LoRA on a module the base lacks: trained on a 3-layer llama (same widths).
    deeper = make_adapter(make_base("llama", num_hidden_layers=3), target_modules=TARGETS)
    case("module-missing-in-base", base, deeper,
         names=[str(deeper / "adapter_model.safetensors"), "model.layers.2.self_attn."])

    # Adapter made for another base: hidden size 128, so every LoRA shape is wrong.
    wider = make_adapter(make_base("llama", hidden_size=128, intermediate_size=256),
                         target_modules=TARGETS)
    case("shape-mismatch", base, wider,
         names=[str(wider / "adapter_model.safetensors"), "model.layers.0.self_attn.q_proj"])

    # Truncated base shard.
    truncated = _copy(base, root / "truncated-shard" / "base")
    shard = truncated / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    case("truncated-shard", truncated, adapter, names=[str(shard)])

    # Not a LoRA adapter.
    ia3 = _copy(adapter, root / "not-lora" / "adapter")
    config = load_json(ia3 / "adapter_config.json")
    config["peft_type"] = "IA3"
    (ia3 / "adapter_config.json").write_text(json.dumps(config))
    case("not-lora", base, ia3, names=[str(ia3 / "adapter_config.json"), "IA3"])

    # adapter_config.json is not JSON.
    garbled = _copy(adapter, root / "unreadable-adapter-config" / "adapter")
    (garbled / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8,')
    case("unreadable-adapter-config", base, garbled, names=[str(garbled / "adapter_config.json")])

    # A legacy .bin whose pickle needs code (an argparse.Namespace) to load.
    pickled = _copy(adapter, root / "pickle-needs-code" / "adapter")
    state: dict[str, object] = dict(load_file(str(pickled / "adapter_model.safetensors")))
    state["training_args"] = argparse.Namespace(lr=1e-4)
    (pickled / "adapter_model.safetensors").unlink()
    torch.save(state, pickled / "adapter_model.bin")
    case("pickle-needs-code", base, pickled, names=[str(pickled / "adapter_model.bin")])

    # No tokenizer anywhere (and no --tokenizer): refused; --no-tokenizer then works.
    bare = make_base("llama", tokenizer=False)
    bare_adapter = make_adapter(bare, target_modules=TARGETS)
    assert not any((bare / n).exists() for n in TOKENIZER_FILES)
    case("no-tokenizer", bare, bare_adapter, names=[str(bare), "--tokenizer"])
    case("no-tokenizer-flag", bare, bare_adapter, flags=["--no-tokenizer"], rc=0)

    # A finished output of other options: refused without --overwrite, replaced with it.
    for name, flags, rc in [("rerun-other-dtype", ["--dtype", "bfloat16"], 2),
                            ("overwrite-flag", ["--dtype", "bfloat16", "--overwrite"], 0)]:
        case(name, base, adapter, flags=flags, rc=rc)
        mergeflow.merge(base, adapter, cases[name].out)
    cases["rerun-other-dtype"].names = [str(cases["rerun-other-dtype"].out), "--overwrite"]
    return cases


@pytest.fixture(scope="module")
def runs(tmp_path_factory, make_base, make_adapter):
    """name -> (case, CLI result, snapshot of the output folder before the run or None)."""
    root = tmp_path_factory.mktemp("cli")
    cases = _prepare(root, make_base, make_adapter)
    before = {n: snapshot(c.out) if c.out.exists() else None for n, c in cases.items()}
    fresh = {n: start_cli(*c.args()) for n, c in cases.items() if c.fresh}
    forked = [n for n, c in cases.items() if not c.fresh]
    results = dict(zip(forked, run_cli_forked([cases[n].args() for n in forked], root), strict=True))
    results.update({n: finish(proc) for n, proc in fresh.items()})
    return {n: (cases[n], results[n], before[n]) for n in cases}


BAD = ["missing-config", "module-missing-in-base", "shape-mismatch", "truncated-shard", "not-lora",
       "unreadable-adapter-config", "pickle-needs-code", "no-tokenizer"]


def _error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one error line, got:\n{result.stderr}"
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


@pytest.mark.parametrize("name", BAD)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(name, runs):
    case, result, before = runs[name]
    assert result.returncode == 2, result.stderr + result.stdout
    line = _error_line(result)
    for expected in case.names:
        assert expected in line, f"{expected!r} not named in: {line}"
    assert before is None
    assert not case.out.exists()
    assert staging_leftovers(case.out) == []


def test_rerun_with_other_options_exits_2_and_changes_nothing(runs):
    case, result, before = runs["rerun-other-dtype"]
    assert result.returncode == 2, result.stderr
    line = _error_line(result)
    for expected in case.names:
        assert expected in line
    assert snapshot(case.out) == before
    assert staging_leftovers(case.out) == []


def test_overwrite_flag_replaces_the_output(runs):
    case, result, before = runs["overwrite-flag"]
    assert result.returncode == 0, result.stderr
    assert before is not None and load_json(case.out / "config.json")["dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in read_tensors(case.out).values())
    assert staging_leftovers(case.out) == []


def test_no_tokenizer_flag_merges_without_tokenizer(runs):
    case, result, _ = runs["no-tokenizer-flag"]
    assert result.returncode == 0, result.stderr
    assert "merged" in result.stdout
    files = {p.name for p in case.out.iterdir()}
    assert {"config.json", "model.safetensors", "merge-manifest.json"} <= files
    assert not files & set(TOKENIZER_FILES)
    manifest = load_json(case.out / "merge-manifest.json")
    assert set(manifest["files"]) == files - {"merge-manifest.json"}
    assert staging_leftovers(case.out) == []


# --------------------------------------------------------------------------- flags = MergeSpec


CLI_ONLY = {"prefect", "out_name"}  # how to run or name a batch, not what to merge


def _merge_params() -> dict:
    import typer

    from mergeflow.cli.app import app

    command = typer.main.get_command(app).commands["merge"]
    return {p.name: p for p in command.params if p.name != "help"}


def test_every_spec_field_is_a_merge_flag_with_its_default_and_help():
    """MergeSpec declares the options; the CLI only spells them: one flag per field, named
    after it, with the field's default and its description as the help."""
    from rich.markup import escape

    from mergeflow.cli.words import cli_words
    from mergeflow.spec import MergeSpec

    params = _merge_params()
    fields = MergeSpec.model_fields
    assert set(fields) == set(params) - CLI_ONLY, (set(fields) ^ (set(params) - CLI_ONLY))
    for name, info in fields.items():
        param = params[name]
        flag = "--" + name.replace("_", "-")
        assert flag in param.opts, (name, param.opts)
        assert param.help == escape(cli_words(info.description)), name  # fields as flags
        if info.is_required():
            assert param.required, name
        else:
            assert not param.required and param.default == info.default, \
                (name, param.default, info.default)


def test_every_merge_flag_is_in_the_readme_table():
    from helpers import REPO

    readme = (REPO / "README.md").read_text()
    table = readme.split("### `mergeflow merge` options", 1)[1].split("\n\n", 2)[1]
    documented = set(re.findall(r"--[a-z0-9-]+", table))
    for name, param in _merge_params().items():
        assert documented & set(param.opts + param.secondary_opts), f"{name} not in README"


def test_a_bad_size_names_the_flag(tmp_path):
    from typer.testing import CliRunner

    from mergeflow.cli.app import app

    result = CliRunner().invoke(app, ["merge", "--adapter", "a", "--out", str(tmp_path / "o"),
                                      "--max-shard-size", "5 gigs", "--block-size", "0KB"])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "invalid options: --max-shard-size: '5 gigs': use a size like 5GB" in text, text
    assert "--block-size: '0KB': must be a positive size" in text, text
    result = CliRunner().invoke(app, ["merge", "--adapter", "a", "--out", str(tmp_path / "o"),
                                      "--max-shard-size", "5gb", "--low-disk"])
    assert result.exit_code == 2, result.output
    assert "error: --low-disk needs --push-to" in " ".join(result.output.split()), result.output
