"""Fuzzed small files at every save method: truncated, mistyped and oddly shaped configs,
tokenizer files and adapter configs (issue 28).

Route: the real ``mergeflow merge`` command, in processes forked from a server that imported it
once (a few at a time), CPU, no Prefect. Each mutant is one damaged copy of a good base (a tiny
Llama with a byte-level BPE tokenizer, so every save method can run) or of its adapter, made
by a fixed rule from a fixed seed, so a failure names a mutant that can be rebuilt. Every run
must end with exit 2, ONE ``error:`` line and no traceback, with nothing written where the
output would go.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable

import pytest
from builders import build_adapter, build_base, save_bpe_tokenizer
from helpers import run_cli_forked, snapshot

pytest.importorskip("conversion", reason="llama.cpp's converter (scripts/setup --gguf)")

SAVE_METHODS = ["merged_16bit", "lora", "gguf"]
SEED = 2028


def truncated(text: str, rng: random.Random) -> str:
    """The file cut somewhere in its first half (never empty)."""
    return text[:rng.randrange(1, max(2, len(text) // 2))]


def mistyped(key: str, value: object) -> Callable[[str, random.Random], str]:
    """The JSON object with ``key`` set to a value of the wrong type."""
    def mutate(text: str, rng: random.Random) -> str:
        data = json.loads(text)
        data[key] = value
        return json.dumps(data)
    return mutate


def reshaped(shape: object) -> Callable[[str, random.Random], str]:
    """The file replaced by JSON of another shape (a list, a number, a deep nest)."""
    return lambda text, rng: json.dumps(shape)


# (file, in the base or the adapter folder, mutation name, mutation)
MUTATIONS = [
    ("config.json", "base", "truncated", truncated),
    ("config.json", "base", "a-list", reshaped([1, 2, 3])),
    ("config.json", "base", "hidden_size-a-string", mistyped("hidden_size", "wide")),
    ("config.json", "base", "num_hidden_layers-null", mistyped("num_hidden_layers", None)),
    ("config.json", "base", "vocab_size-negative", mistyped("vocab_size", -5)),
    ("config.json", "base", "architectures-a-number", mistyped("architectures", 7)),
    ("tokenizer.json", "base", "truncated", truncated),
    ("tokenizer.json", "base", "a-list", reshaped(["a", "b"])),
    ("tokenizer.json", "base", "model-a-string", mistyped("model", "bpe")),
    ("tokenizer.json", "base", "added_tokens-an-object", mistyped("added_tokens", {"a": 1})),
    ("tokenizer_config.json", "base", "truncated", truncated),
    ("tokenizer_config.json", "base", "a-number", reshaped(12)),
    ("adapter_config.json", "adapter", "truncated", truncated),
    ("adapter_config.json", "adapter", "r-a-string", mistyped("r", "eight")),
    ("adapter_config.json", "adapter", "target_modules-a-number", mistyped("target_modules", 5)),
    ("adapter_config.json", "adapter", "lora_alpha-a-list", mistyped("lora_alpha", [16])),
    ("adapter_config.json", "adapter", "deep-nest", reshaped([[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]])),
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(mutant name, save method) -> (out folder, CLI result, snapshot before)."""
    root = tmp_path_factory.mktemp("fuzz")
    base = build_base(root / "base", "llama", tokenizer=False, vocab_size=384)
    save_bpe_tokenizer(base, 384)
    adapter = build_adapter(base, root / "adapter", target_modules=["q_proj", "v_proj"])
    rng = random.Random(SEED)
    argvs, keys, outs, before = [], [], {}, {}
    for filename, where, name, mutate in MUTATIONS:
        mutant = root / f"{filename}-{name}"
        folders = {"base": mutant / "base", "adapter": mutant / "adapter"}
        shutil.copytree(base, folders["base"])
        shutil.copytree(adapter, folders["adapter"])
        target = folders[where] / filename
        target.write_text(mutate(target.read_text(), rng))
        for method in SAVE_METHODS:
            watched = mutant / f"out-{method}"
            watched.mkdir()
            (watched / "sentinel").write_text("untouched")
            out = watched / "model"
            key = (f"{filename}:{name}", method)
            keys.append(key)
            outs[key] = out
            before[key] = snapshot(watched)
            argvs.append(["merge", "--base", str(folders["base"]), "--adapter",
                          str(folders["adapter"]), "--out", str(out), "--save-method", method])
    logs = tmp_path_factory.mktemp("fuzz-logs")
    results = []
    for start in range(0, len(argvs), 8):  # a few at a time: the machine has 2 cores
        results += run_cli_forked(argvs[start:start + 8], logs)
    return {key: (outs[key], result, before[key])
            for key, result in zip(keys, results, strict=True)}


@pytest.mark.parametrize("method", SAVE_METHODS)
@pytest.mark.parametrize("mutant", [f"{f}:{n}" for f, _, n, _ in MUTATIONS])
def test_a_fuzzed_input_is_one_line_exit_2_and_nothing_written(runs, mutant, method):
    out, result, before = runs[(mutant, method)]
    assert result.returncode == 2, result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    assert mutant.split(":")[0] in lines[0], lines[0]  # names the file at fault
    assert snapshot(out.parent) == before
