"""Lean start (issue 11, item 4): what a local merge and the CLI import, the layout cache and
the tokenizer length computed without transformers."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

from mergeflow.output.folder import MANIFEST

HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "prefect")
REPORT = "import json, sys; print(json.dumps(sorted(m for m in {names!r} if m in sys.modules)))"


def _python(code: str, env: dict[str, str] | None = None, timeout: float = 300) -> list[str]:
    """Run ``code`` in a fresh interpreter; return the modules of HEAVY (etc.) it loaded, as
    printed by its last line."""
    full = dict(os.environ, PYTHONWARNINGS="ignore", **(env or {}))
    full.pop("PREFECT_API_URL", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=full, capture_output=True,
                          text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_spec_cli_and_package_load_no_heavy_module():
    code = ("import mergeflow.spec, mergeflow.cli.app, mergeflow\n"
            "assert mergeflow.__version__ and mergeflow.MergeSpec is mergeflow.spec.MergeSpec\n"
            "assert issubclass(mergeflow.InputError, mergeflow.MergeError)\n"
            "assert 'merge' in dir(mergeflow)\n" + REPORT.format(names=HEAVY))
    assert _python(code) == []


@pytest.mark.parametrize("args", [["--help"], ["merge", "--help"], ["webhook", "serve", "--help"],
                                  ["webhook", "--help"]])
def test_help_loads_no_heavy_module(args):
    code = ("from mergeflow.cli.app import app\n"
            f"try:\n    app(args={args!r}, prog_name='mergeflow')\n"
            "except SystemExit as exc:\n    assert exc.code in (0, None), exc.code\n"
            + REPORT.format(names=(*HEAVY, "fastapi", "triggers", "flows")))
    assert _python(code) == []


def test_lazy_package_attributes_still_work():
    import mergeflow
    from mergeflow import pipeline

    assert mergeflow.merge is pipeline.merge and mergeflow.MergeReport is pipeline.MergeReport
    with pytest.raises(AttributeError):
        mergeflow.no_such_thing  # noqa: B018


@pytest.fixture(scope="module")
def tiny(make_base, make_adapter):
    base = make_base("llama", max_shard_size="60KB")
    return base, make_adapter(base, target_modules=["q_proj", "v_proj", "down_proj"])


def _merge_twice(base: Path, adapter: Path, root: Path, options: str = "",
                 cache: Path | None = None) -> tuple[list, list]:
    """Two merges of ``adapter`` on ``base``, each in a fresh interpreter with the same
    ``MERGEFLOW_CACHE`` (``cache``, default ``root/cache``), into ``root/a`` and ``root/b``: the
    heavy modules each imported. The two outputs must hold the same bytes."""
    env = {"MERGEFLOW_CACHE": str(cache or root / "cache")}
    merge = ("import mergeflow\n"
             "r = mergeflow.merge({base!r}, {adapter!r}, {out!r}" + options + ")\n"
             "assert r.status == 'merged', r\n")
    loaded = [_python(merge.format(base=str(base), adapter=str(adapter), out=str(root / out))
                      + REPORT.format(names=HEAVY), env) for out in ("a", "b")]
    for path in (root / "a").iterdir():
        assert path.read_bytes() == (root / "b" / path.name).read_bytes(), path.name
    return loaded[0], loaded[1]


def test_a_local_merge_imports_no_transformers_peft_bitsandbytes_or_prefect(tiny, tmp_path):
    """The first merge of a base asks transformers for its layout in a child process (cached);
    neither it nor the second merge of the same base imports any of them."""
    first, second = _merge_twice(*tiny, tmp_path, ", max_shard_size='40KB'")
    assert first == ["torch"]  # the layout question, answered once by a child
    assert list((tmp_path / "cache" / "layout").glob("*.json"))
    assert second == ["torch"]
    assert len(list((tmp_path / "a").glob("*.safetensors"))) > 1


def test_a_local_cli_merge_runs_in_process_without_prefect(tiny, tmp_path):
    base, adapter = tiny
    env = {"MERGEFLOW_CACHE": str(tmp_path / "cache"), "NO_COLOR": "1", "COLUMNS": "200"}
    run = ("import io, contextlib\n"
           "from mergeflow.cli.app import app\n"
           "buf = io.StringIO()\n"
           "with contextlib.redirect_stdout(buf):\n"
           "    try:\n"
           "        app(args={args!r}, prog_name='mergeflow')\n"
           "    except SystemExit as exc:\n"
           "        assert exc.code in (0, None), exc.code\n"
           "assert 'ran in-process' in buf.getvalue(), buf.getvalue()\n")
    for out in ("a", "b"):
        args = ["merge", "--base", str(base), "--adapter", str(adapter),
                "--out", str(tmp_path / out), "--max-shard-size", "40KB"]
        loaded = _python(run.format(args=args) + REPORT.format(names=HEAVY), env)
    assert loaded == ["torch"]


def test_the_cli_starts_hashing_the_base_before_it_imports_torch(tiny, tmp_path):
    """Importing torch keeps one core busy for most of a second: the CLI hashes a local base's
    shards meanwhile (``hash_ahead``), pauses for the layout's fork (a new base's layout is
    still learnt in a child), and the merge's manifest lists their true sha256."""
    base, adapter = tiny
    env = {"MERGEFLOW_CACHE": str(tmp_path / "cache"), "NO_COLOR": "1"}
    args = ["merge", "--base", str(base), "--adapter", str(adapter), "--out",
            str(tmp_path / "out"), "--max-shard-size", "40KB", "--no-tokenizer"]
    run = ("import json, sys, time\n"
           "from mergeflow.storage import hashing\n"
           "seen = []\n"
           "hashing.CHUNK = 4096\n"  # a slow hasher, still at work when planning forks
           "step = hashing.ReadDigest.advance\n"
           "hashing.ReadDigest.advance = lambda self: (time.sleep(0.05), step(self))[1]\n"
           "real = hashing.hash_ahead\n"
           "count = lambda: len(hashing._ahead.digests) if hashing._ahead else 0\n"
           "hashing.hash_ahead = lambda paths: (seen.append((sorted(str(p) for p in paths),"
           " 'torch' in sys.modules, count())), real(paths), seen.append(count()))\n"
           "from mergeflow.cli.app import app\n"
           "try:\n"
           f"    app(args={args!r}, prog_name='mergeflow')\n"
           "except SystemExit as exc:\n"
           "    assert exc.code in (0, None), exc.code\n"
           "print(json.dumps([seen, 'transformers' in sys.modules]))\n")
    ((paths, torch_loaded, before), after), transformers_loaded = _python(run, env)
    assert paths == sorted(str(p) for p in base.glob("*.safetensors")) and not torch_loaded
    # the hashing paused for the layout's fork: transformers ran in the child, not here
    assert not transformers_loaded
    shards = len(list(base.glob("*.safetensors")))
    assert (before, after) == (0, shards) and shards > 1
    listed = json.loads((tmp_path / "out" / MANIFEST).read_text())["inputs"]["sha256"]["base"]
    assert {p.name: listed[p.name] for p in base.glob("*.safetensors")} == {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in base.glob("*.safetensors")}


def test_merges_with_target_parameters_import_no_transformers_or_peft(
        make_base, make_adapter, tmp_path):
    """An adapter with ``target_parameters`` (MoE experts): the first merge asks PEFT which
    parameters it wraps in the layout's forked child, the second, in a fresh process, reads the
    cached answer; neither imports transformers or PEFT itself; same bytes."""
    base = make_base("mixtral")
    adapter = make_adapter(base, target_modules=["q_proj"],
                           target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    first, second = _merge_twice(base, adapter, tmp_path)
    assert len(list((tmp_path / "cache" / "wrappers").glob("*.json"))) == 1  # PEFT was asked
    assert len(list((tmp_path / "cache" / "layout").glob("*.json"))) == 1
    assert first == second == ["torch"]


def test_a_cached_layout_and_new_wrappers_ask_peft_in_a_child(make_base, make_adapter, tmp_path):
    """A second adapter configuration on a known base: the layout is cached, PEFT's wrapped
    parameters are not, so the child answers them alone."""
    base = make_base("mixtral")
    adapter = make_adapter(base, target_modules=["q_proj"],
                           target_parameters=["mlp.experts.gate_up_proj"])
    other = make_adapter(base, target_modules=["q_proj"],
                         target_parameters=["mlp.experts.down_proj"])
    _merge_twice(base, adapter, tmp_path)
    layouts = list((tmp_path / "cache" / "layout").glob("*.json"))
    first, _ = _merge_twice(base, other, tmp_path / "other", cache=tmp_path / "cache")
    assert first == ["torch"]
    assert len(list((tmp_path / "cache" / "wrappers").glob("*.json"))) == 2
    assert list((tmp_path / "cache" / "layout").glob("*.json")) == layouts  # not learnt again


def test_cached_param_wrappers_are_peft_s_and_a_damaged_entry_is_harmless(
        make_base, make_adapter, tmp_path, monkeypatch):
    from mergeflow.model import wrappers

    monkeypatch.setenv("MERGEFLOW_CACHE", str(tmp_path))
    base = make_base("qwen3_moe")
    adapter = make_adapter(base, target_modules=["q_proj"],
                           target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    fresh = wrappers.read_param_wrappers(base, adapter)
    assert fresh and all(w.experts > 1 for w in fresh.values())
    [entry] = (tmp_path / "wrappers").glob("*.json")

    def no_peft(config_dir, adapter_dir):
        raise AssertionError("the cached answer was not used")

    with monkeypatch.context() as m:
        m.setattr(wrappers, "_peft_wrappers", no_peft)
        assert wrappers.read_param_wrappers(base, adapter) == fresh
    good = json.loads(entry.read_text())
    name = next(iter(good["wrapped"]))
    for damage in ("", "{not json", "[]", json.dumps({**good, "format": 0}),
                   json.dumps({**good, "wrapped": {name: {**good["wrapped"][name], "rank": "16"}}}),
                   json.dumps({**good, "wrapped": {name: {**good["wrapped"][name],
                                                          "scale": None}}})):
        entry.write_text(damage)
        assert wrappers.read_param_wrappers(base, adapter) == fresh
        assert wrappers._load_cached(entry) == fresh  # rewritten whole


# -- the layout cache -----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "phi3"])
def test_layout_is_cached_and_a_damaged_entry_is_harmless(arch, make_base, tmp_path, monkeypatch):
    from mergeflow.model import layout
    from mergeflow.model.checkpoint import Checkpoint
    from mergeflow.model.config import base_config

    monkeypatch.setenv("MERGEFLOW_CACHE", str(tmp_path))
    base = make_base(arch)
    names, config = set(Checkpoint(base).tensors), base_config(base)
    fresh = layout.read_layout(base, names, config)
    assert fresh.embed is not None and (arch != "gpt2" or fresh.conv1d)
    [entry] = (tmp_path / "layout").glob("*.json")

    def no_transformers(config_dir):
        raise AssertionError("the cached layout was not used")

    with monkeypatch.context() as m:
        m.setattr(layout, "meta_model", no_transformers)
        assert layout.read_layout(base, names, config) == fresh
    for damage in ("", "{not json", "[]", json.dumps({"format": 1, "embed": 3, "head": None,
                                                      "tied": False, "conv1d": []}),
                   json.dumps({"format": 1, "embed": "x", "head": None, "tied": "yes",
                               "conv1d": []}), "\udcff"):
        entry.write_bytes(damage.encode("utf-8", "surrogateescape"))
        assert layout.read_layout(base, names, config) == fresh
        assert layout._load_cached(entry) == fresh  # rewritten whole
    # Other tensor names (e.g. a quantized base's view) are another entry.
    layout.read_layout(base, names | {"extra.weight"}, config)
    assert len(list((tmp_path / "layout").glob("*.json"))) == 2


def test_an_architecture_transformers_cannot_build_is_not_cached(make_base, tmp_path, monkeypatch):
    import shutil

    from mergeflow.model import layout

    monkeypatch.setenv("MERGEFLOW_CACHE", str(tmp_path / "cache"))
    base = shutil.copytree(make_base("llama"), tmp_path / "base")
    config = json.loads((base / "config.json").read_text())
    config["model_type"] = "no-such-architecture"
    (base / "config.json").write_text(json.dumps(config))
    got = layout.read_layout(base, {"model.embed_tokens.weight"}, config)
    assert (got.embed, got.head, got.conv1d) == (None, None, set())
    assert not list((tmp_path / "cache").rglob("*.json"))


# -- the tokenizer length -------------------------------------------------------------------


def _edit_config(folder: Path, **changes) -> Path:
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
    return folder


def _tokenizers(root: Path, base: Path) -> dict[str, Path]:
    """The tokenizers the test suite builds (builders.save_tokenizer, test_vocab's
    trained tokenizer), and edits of them that exercise each rule."""
    import shutil

    from builders import save_tokenizer
    from transformers import AutoTokenizer

    made = {"base": base}
    for extra in (0, 8, 20):
        made[f"extra-{extra}"] = save_tokenizer(root / f"extra-{extra}", 128, extra_tokens=extra)
    made["vocab-512"] = save_tokenizer(root / "vocab-512", 512, extra_tokens=3)
    trained = save_tokenizer(root / "trained", 128)
    tok = AutoTokenizer.from_pretrained(trained)
    tok.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    tok.eos_token = "<|tool|>"
    tok.add_tokens(["newword", "w7"])  # one new, one already in the vocabulary
    tok.save_pretrained(trained)
    made["trained"] = trained

    def variant(name: str, source: str = "extra-8", **changes) -> None:
        made[name] = _edit_config(shutil.copytree(made[source], root / name), **changes)

    entry = {"content": "<|decoder-only|>", "lstrip": False, "normalized": False,
             "rstrip": False, "single_word": False, "special": True}
    variant("added-tokens-decoder", added_tokens_decoder={"300": entry, "0": {
        **entry, "content": "<unk>"}})
    variant("eos-not-in-vocab", eos_token="<|eot|>")
    variant("eos-as-added-token", eos_token={"__type": "AddedToken", "content": "<|end|>",
                                             "lstrip": False, "normalized": False,
                                             "rstrip": False, "single_word": False,
                                             "special": True})
    variant("model-specific-token", image_token="<image>", add_bos_token=True)
    variant("extra-tokens-in-vocab", extra_special_tokens=["w5", "<s>", "<|fresh|>"])
    variant("named-extra-tokens", extra_special_tokens={"audio_token": "<audio>"})
    variant("legacy-additional", additional_special_tokens=["<|legacy|>"])
    variant("fast-class", tokenizer_class="PreTrainedTokenizerFast")
    return made


@pytest.fixture(scope="module")
def tokenizer_corpus(make_base, tmp_path_factory) -> dict[str, Path]:
    return _tokenizers(tmp_path_factory.mktemp("tokenizers"), make_base("llama"))


def test_tokenizer_length_without_transformers_equals_len_autotokenizer(tokenizer_corpus):
    from transformers import AutoTokenizer

    from mergeflow.model.tokenizer import generic_length

    lengths = {}
    for name, folder in tokenizer_corpus.items():
        expected = len(AutoTokenizer.from_pretrained(folder))
        assert generic_length(folder) == expected, name
        lengths[name] = expected
    assert lengths["extra-20"] == 148 and lengths["trained"] == 130  # the suite's own numbers
    assert lengths["added-tokens-decoder"] == lengths["extra-8"] + 1
    assert lengths["extra-tokens-in-vocab"] == lengths["extra-8"] + 1


def test_other_tokenizers_are_measured_by_transformers_once(tokenizer_corpus, tmp_path,
                                                            monkeypatch):
    import shutil

    from mergeflow.model import tokenizer

    monkeypatch.setenv("MERGEFLOW_CACHE", str(tmp_path / "cache"))
    legacy = shutil.copytree(tokenizer_corpus["extra-8"], tmp_path / "legacy")
    (legacy / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|legacy-eos|>"}))
    calls = []
    real = tokenizer._transformers_length
    monkeypatch.setattr(tokenizer, "_transformers_length",
                        lambda folder: calls.append(folder) or real(folder))
    from transformers import AutoTokenizer

    expected = len(AutoTokenizer.from_pretrained(legacy))
    assert tokenizer.tokenizer_length(legacy) == expected and len(calls) == 1
    assert tokenizer.tokenizer_length(legacy) == expected and len(calls) == 1  # cached
    (legacy / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|other|>"}))
    assert tokenizer.tokenizer_length(legacy) == expected and len(calls) == 2  # files changed
    [entry] = [p for p in (tmp_path / "cache" / "tokenizer-length").glob("*.json")][:1]
    entry.write_text('{"format": 1, "length": "many"}')  # damaged: measured again
    tokenizer.tokenizer_length(legacy)
    assert len(calls) >= 3
    assert tokenizer.tokenizer_length(tokenizer_corpus["extra-8"]) == 136
    assert len(calls) <= 4  # the generic one never needs transformers


def test_a_broken_tokenizer_json_is_an_input_error(tokenizer_corpus, tmp_path):
    import shutil

    from mergeflow.errors import InputError
    from mergeflow.model.tokenizer import tokenizer_length

    broken = shutil.copytree(tokenizer_corpus["extra-0"], tmp_path / "broken")
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(InputError, match="does not load"):
        tokenizer_length(broken)


def test_peft_s_refusal_in_the_child_is_raised_here(make_base, make_adapter, tmp_path):
    """The child's answer about the wrapped parameters may be an error (transformers cannot
    build a model of an unknown architecture, which target_parameters need): raised by the
    merge as it would be in-process, naming the base; nothing is written. In a fresh
    interpreter (one thread), so the one child really forks."""
    import shutil

    known = make_base("mixtral")
    adapter = make_adapter(known, target_modules=["q_proj"],
                           target_parameters=["mlp.experts.down_proj"])
    base = tmp_path / "base"
    shutil.copytree(known, base)
    config = json.loads((base / "config.json").read_text())
    config.update(model_type="no-such-architecture", architectures=["NoSuchForCausalLM"])
    (base / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    code = ("import json\n"
            "import mergeflow\n"
            "from mergeflow.errors import PlanError\n"
            "from mergeflow.model import layout\n"
            "children = []\n"
            "real = layout.call_in_fork\n"
            "layout.call_in_fork = lambda fn: children.append(real(fn)) or children[-1]\n"
            "try:\n"
            f"    mergeflow.merge({str(base)!r}, {str(adapter)!r}, {str(out)!r}, no_tokenizer=True)\n"
            "    raise SystemExit('merged')\n"
            "except PlanError as exc:\n"
            "    print(json.dumps([str(exc), [c is not None for c in children]]))\n")
    message, forked = _python(code, {"MERGEFLOW_CACHE": str(tmp_path / "cache")})
    assert "transformers cannot build this model" in message and str(base) in message
    assert forked == [True]  # one child, asked both questions
    assert not out.exists()
