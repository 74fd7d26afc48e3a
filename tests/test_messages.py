"""Error and help texts name options the way their reader calls them (issue 16, item 5): the
core names a MergeSpec field in backticks (`` `overwrite=True` ``), the CLI translates that to
its flag (``--overwrite``) with :func:`mergeflow.cli.words.cli_words`; and ``mergeflow.merge`` refuses
an argument of the wrong type (a live PeftModel) with a TypeError that names it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from helpers import REPO, run_cli

import mergeflow
from mergeflow.cli.words import cli_words, option_help
from mergeflow.errors import OutputError
from mergeflow.spec import MergeSpec

#: Not scanned: the CLI itself (the package mergeflow/cli, which spells flags) and the callback,
#: whose log line is a shell command to run.
NOT_SCANNED = {"mergeflow/cli", "mergeflow/live/callback.py"}
FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9-]*)")


@pytest.mark.parametrize(("core", "cli"), [
    ("raise `max_shard_size`", "raise --max-shard-size"),
    ("`merge_onto=original` needs `original_base=PATH`", "--merge-onto original needs "
     "--original-base PATH"),
    ("pass `overwrite=True` to replace it", "pass --overwrite to replace it"),
    ("drop `no_tokenizer=True`, or pass `tokenizer=PATH`", "drop --no-tokenizer, or pass "
     "--tokenizer PATH"),
    ("`out=/a b/c`: exists", "--out /a b/c: exists"),
    ("`verify=False` skips it", "--no-verify skips it"),
    ("`memory_limit` '0MB': must be a positive size", "--memory-limit '0MB': must be a positive "
     "size"),
    ("`base_model_name_or_path` is empty", "`base_model_name_or_path` is empty"),  # no field
    ("no options here", "no options here"),
])
def test_cli_words_turn_fields_into_flags(core, cli):
    assert cli_words(core) == cli


def test_every_translated_flag_is_a_real_merge_option():
    from typer.main import get_command

    from mergeflow.cli.app import app

    merge = get_command(app).commands["merge"]
    flags = {opt for param in merge.params for opt in (*param.opts, *param.secondary_opts)}
    for field in MergeSpec.model_fields:
        assert cli_words(f"`{field}`") in flags, field
    assert cli_words("`verify=False`") in flags


def _strings(tree: ast.AST) -> list[tuple[int, str]]:
    """Every string literal of a module that is not a docstring, with its line."""
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                       ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and id(node) not in docstrings]


def test_core_messages_name_fields_not_flags():
    fields = {name.replace("_", "-") for name in MergeSpec.model_fields}
    found = []
    for path in sorted((REPO / "mergeflow").rglob("*.py")):
        relative = path.relative_to(REPO)
        if any(relative.is_relative_to(skipped) for skipped in NOT_SCANNED):
            continue
        for line, text in _strings(ast.parse(path.read_text())):
            found += [f"{path.name}:{line}: --{flag}" for flag in FLAG.findall(text)
                      if flag in fields or flag.removeprefix("no-") in fields]
    assert found == []


def test_the_help_shows_flags():
    text = option_help("save_method")
    assert "--dtype" in text and "--gguf-type" in text and "`dtype`" not in text


@pytest.fixture(scope="module")
def merged(make_base, make_adapter, tmp_path_factory):
    base = make_base("llama")
    adapter = make_adapter(base, target_modules=["q_proj"])
    out = tmp_path_factory.mktemp("merged") / "out"
    mergeflow.merge(base, adapter, out)
    return base, adapter, out


def test_the_api_says_overwrite_true_and_the_cli_says_overwrite(merged):
    base, adapter, out = merged
    with pytest.raises(OutputError) as caught:
        mergeflow.merge(base, adapter, out, dtype="bfloat16")
    assert str(caught.value) == (f"`out={out}`: holds a finished merge of other inputs or "
                                 "options; pass `overwrite=True` to replace it or choose "
                                 "another folder")
    result = run_cli("merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out),
                     "--dtype", "bfloat16")
    assert result.returncode == 2
    assert " ".join(result.stderr.split()) == (
        f"error: --out {out}: holds a finished merge of other inputs or options; pass "
        "--overwrite to replace it or choose another folder")


def test_merge_refuses_a_live_peft_model_with_a_type_error(merged, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base, adapter, _ = merged
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(TypeError) as caught:
        mergeflow.merge(model, adapter, tmp_path / "out")
    message = str(caught.value)
    assert message.startswith("mergeflow.merge: `base` must be a folder path, hf://org/name or "
                              "s3://bucket/prefix (got PeftModel)")
    assert "save_pretrained_merged" in message
    with pytest.raises(TypeError, match=r"`adapter` must be a folder path.*\(got PeftModel\)"):
        mergeflow.merge(base, model, tmp_path / "out")
    with pytest.raises(TypeError, match=r"`out` must be a folder path.*\(got int\)"):
        mergeflow.merge(base, adapter, 3)
    assert not (tmp_path / "out").exists()
    assert mergeflow.merge(Path(base), str(adapter), tmp_path / "out").status == "merged"
