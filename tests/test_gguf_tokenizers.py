"""The GGUF Mergeflow writes tokenizes as transformers does, for each kind of tokenizer models ship.

Each kind is built here offline (``builders``): byte-level BPE with GPT-2's own split, Llama 3's
split regex (``llama-bpe``) and Qwen2's; SentencePiece ``tokenizer.model`` as Gemma 2 and Phi-3
ship it. For each, ``mergeflow.merge(save_method="gguf")`` writes the file, llama.cpp loads its
vocabulary alone (``vocab_only=True``) and must give transformers' ids for the same text: plain
text (``special=False``), text with the chat's special tokens (``special=True``), and the bos
token added as the model adds it. A tokenizer llama.cpp would not reproduce is refused while
planning: one line naming the file, exit 2, nothing written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from builders import build_adapter, build_base, save_bpe_tokenizer, save_sentencepiece_tokenizer
from helpers import run_cli

import mergeflow

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (scripts/setup builds it)")
pytest.importorskip("conversion", reason="llama.cpp's converter (scripts/setup --gguf)")

VOCAB = 384
PLAIN = ["hello world 2024!", "the model merges a small adapter", "we've said they'll go ?",
         "  spaces\tand\nlines 12345", "The Model MERGES, quickly.", "é ü 漢字 🙂 ¿qué?"]
BPE_CHAT = ["<|user|>hi there<|end|><|assistant|>", "<s>one</s> two<|system|>x"]
# transformers' Llama tokenizer (a Metaspace pre-tokenizer that prepends one "▁") splits a leading
# run of spaces otherwise than SentencePiece itself does; llama.cpp follows SentencePiece, so
# there the reference is the tokenizer.model (and transformers is checked to still differ)
SENTENCEPIECE_NOT_TRANSFORMERS = {("spm-phi3", "  spaces\tand\nlines 12345")}
# and llama.cpp starts every piece of text after a special token with SentencePiece's prefix
# space (as SentencePiece run on each piece does, transformers' "legacy" Llama tokenizer), where
# transformers 5 does not: for a prefix-space model the chat strings' reference is that
PIECEWISE_SENTENCEPIECE = {"spm-phi3"}
KINDS = {  # kind -> (builders architecture, config overrides, chat strings with special tokens)
    "gpt-2": ("llama", {}, BPE_CHAT),
    "llama-bpe": ("llama3", {}, BPE_CHAT),
    "qwen2": ("qwen2", {}, [*BPE_CHAT, "<|endoftext|>tail"]),
    "spm-gemma": ("gemma2", {}, ["<start_of_turn>user\nhi there<end_of_turn>\n<start_of_turn>model\n",
                                 "<bos>x<eos>"]),
    "spm-phi3": ("phi3", {"bos_token_id": 1, "eos_token_id": 2},
                 ["<|user|>\nhi there<|end|>\n<|assistant|>\n", "<s>x</s><|endoftext|>"]),
}


def save_kind(base: Path, kind: str) -> None:
    """The kind's tokenizer, trained here, saved into ``base``."""
    if kind.startswith("spm-"):
        save_sentencepiece_tokenizer(base, VOCAB, kind.removeprefix("spm-"))
    else:  # Llama 3's tokenizer adds its bos when encoding
        save_bpe_tokenizer(base, VOCAB, kind, add_bos=kind == "llama-bpe")


def merged_gguf(root: Path, kind: str) -> tuple[Path, Path]:
    """A tiny base of the kind's architecture with its tokenizer, an adapter, and the f16 GGUF
    Mergeflow writes: (base, gguf file)."""
    arch, overrides, _ = KINDS[kind]
    base = build_base(root / "base", arch, tokenizer=False, vocab_size=VOCAB, **overrides)
    save_kind(base, kind)
    adapter = build_adapter(base, root / "adapter", target_modules=["o_proj"])
    out = root / "out"
    mergeflow.merge(base, adapter, out, save_method="gguf", gguf_type="f16")
    return base, out / "model-f16.gguf"


def sentencepiece_encode(folder: Path, text: str) -> list[int]:
    """``text``'s ids by the SentencePiece model itself."""
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")
                                                ).encode(text)


def piecewise_encode(folder: Path, text: str, specials: dict[str, int]) -> list[int]:
    """``text`` cut at its special tokens: each special token's id, each piece between them
    encoded by the SentencePiece model on its own (so each gets its prefix space)."""
    import re

    ids = []
    for piece in re.split(f"({'|'.join(map(re.escape, specials))})", text):
        ids += [specials[piece]] if piece in specials else sentencepiece_encode(folder, piece)
    return ids


def llama_ids(vocab, text: str, *, bos: bool, special: bool) -> list[int]:
    return vocab.tokenize(text.encode(), add_bos=bos, special=special)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_llama_cpp_tokenizes_as_transformers_does(tmp_path, kind):
    from transformers import AutoTokenizer

    base, path = merged_gguf(tmp_path, kind)
    tokenizer = AutoTokenizer.from_pretrained(base)
    vocab = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    for text in PLAIN:
        want = tokenizer.encode(text, add_special_tokens=False)
        if (kind, text) in SENTENCEPIECE_NOT_TRANSFORMERS:
            sentencepiece_ids = sentencepiece_encode(base, text)
            assert sentencepiece_ids != want, "transformers now tokenizes as SentencePiece does"
            want = sentencepiece_ids
        assert llama_ids(vocab, text, bos=False, special=False) == want, text
        bos = [tokenizer.bos_token_id] if tokenizer.encode("x")[0] == tokenizer.bos_token_id else []
        assert llama_ids(vocab, text, bos=True, special=False) == bos + want, text
    for text in KINDS[kind][2]:
        want = tokenizer.encode(text, add_special_tokens=False)
        if kind in PIECEWISE_SENTENCEPIECE:
            pieces = piecewise_encode(base, text, tokenizer.get_added_vocab())
            assert pieces != want, "transformers now prefixes text after a special token"
            want = pieces
        assert llama_ids(vocab, text, bos=False, special=True) == want, text
    assert vocab.token_eos() == tokenizer.eos_token_id
    assert vocab.token_bos() == tokenizer.bos_token_id
    assert vocab.metadata["tokenizer.chat_template"] == tokenizer.chat_template


def test_a_split_regex_llama_cpp_does_not_implement_is_refused_naming_the_file(tmp_path):
    """A byte-level BPE tokenizer.json whose split regex llama.cpp neither knows by its hash nor
    implements: exit 2 while planning, one line naming the tokenizer.json, nothing written."""
    base = build_base(tmp_path / "base", "llama", tokenizer=False, vocab_size=VOCAB)
    save_bpe_tokenizer(base, VOCAB, "llama-bpe")
    tokenizer_json = base / "tokenizer.json"
    data = json.loads(tokenizer_json.read_text())
    split = data["pre_tokenizer"]["pretokenizers"][0]["pattern"]
    split["Regex"] = split["Regex"].replace(r"\p{N}{1,3}", r"\p{N}{1,4}")  # digits in fours
    tokenizer_json.write_text(json.dumps(data))
    _assert_gguf_refused_naming(base, tokenizer_json, tmp_path)


def test_a_gemma_style_bpe_tokenizer_json_without_tokenizer_model_is_refused(tmp_path):
    """Gemma's BPE tokenizer.json (▁ for spaces, byte fallback, no ByteLevel) with no
    tokenizer.model beside it: llama.cpp's converter reads Gemma 3's vocabulary as byte-level BPE
    then, which would tokenize differently, so the merge is refused while planning: exit 2, one
    line naming the tokenizer.json, nothing written."""
    base = build_base(tmp_path / "base", "gemma3", tokenizer=False, vocab_size=VOCAB)
    save_sentencepiece_tokenizer(base, VOCAB, "gemma")
    (base / "tokenizer.model").unlink()
    _assert_gguf_refused_naming(base, base / "tokenizer.json", tmp_path,
                                "a SentencePiece-style tokenizer (byte fallback, '▁' for spaces) "
                                "with no tokenizer.model beside it")


def _assert_gguf_refused_naming(base: Path, tokenizer_json: Path, tmp_path: Path,
                                why: str = "its pre-tokenizer is neither known to llama.cpp"
                                ) -> None:
    """``mergeflow merge --save-method gguf`` on ``base``: exit 2 while planning, one line naming
    ``tokenizer_json`` and ``why``, nothing written."""
    adapter = build_adapter(base, tmp_path / "adapter", target_modules=["o_proj"])
    out = tmp_path / "out"
    proc = run_cli("merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out),
                   "--save-method", "gguf")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
    assert proc.stderr.startswith(f"error: {tokenizer_json}: {why}"), proc.stderr
    assert not out.exists()
