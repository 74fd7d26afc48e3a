"""``len(tokenizer)`` - the token ids a merged model must embed - without importing transformers.

transformers' ``len(AutoTokenizer.from_pretrained(folder))`` for a tokenizers-backed tokenizer is
the size of ``tokenizer.json``'s vocabulary with its added tokens, after the loader has added
the tokens ``tokenizer_config.json`` names that are not in it yet: its ``added_tokens_decoder``,
the named special tokens (``bos_token``, ..., any other ``*_token``) and ``extra_special_tokens``
(``additional_special_tokens``). For the generic classes (``TokenizersBackend``,
``PreTrainedTokenizerFast``) that is computed here with the ``tokenizers`` library alone.

Any other tokenizer (a model-specific class that may rebuild the vocabulary or add default
special tokens, custom code, legacy ``special_tokens_map.json`` / ``added_tokens.json`` files, no
``tokenizer.json``) is measured by transformers itself, and the answer is cached in the
Mergeflow cache folder by the sha256 of the tokenizer files and the transformers and tokenizers
versions, so a second merge with the same tokenizer imports no transformers either.
"""

from __future__ import annotations

import json
from pathlib import Path

from mergeflow.errors import InputError
from mergeflow.storage.hashing import HashCache
from mergeflow.storage.memo import installed_version, memo_path, read_memo, write_memo

GENERIC_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
# Files AutoTokenizer may read to build a tokenizer (config.json: the class, by model_type).
TOKENIZER_INPUTS = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json", "merges.txt",
    "vocab.txt", "chat_template.jinja", "chat_template.json", "config.json",
)
CACHE_FORMAT = 1


class _NotGeneric(Exception):
    """The tokenizer needs transformers' own loader to be measured."""


def tokenizer_length(folder: Path) -> int:
    """``len(AutoTokenizer.from_pretrained(folder))``, computed without transformers when the
    tokenizer allows it, else measured once by transformers and cached.

    Raises:
        InputError: the tokenizer does not load.
    """
    folder = Path(folder)
    try:
        return generic_length(folder)
    except _NotGeneric:
        pass
    path = _cache_path(folder)
    cached = read_memo(path)
    if cached is not None and cached.get("format") == CACHE_FORMAT \
            and isinstance(cached.get("length"), int) and not isinstance(cached["length"], bool):
        return cached["length"]
    length = _transformers_length(folder)
    write_memo(path, {"format": CACHE_FORMAT, "length": length})
    return length


def generic_length(folder: Path) -> int:
    """The length of a generic tokenizers-backed tokenizer, from its files alone.

    Raises:
        _NotGeneric: the tokenizer is not one this function can measure exactly.
        InputError: tokenizer.json does not load.
    """
    tokenizer_file, config_file = folder / "tokenizer.json", folder / "tokenizer_config.json"
    if not tokenizer_file.is_file() or not config_file.is_file():
        raise _NotGeneric
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise _NotGeneric from exc
    if not isinstance(config, dict) or config.get("tokenizer_class") not in GENERIC_CLASSES \
            or "auto_map" in config:
        raise _NotGeneric
    decoder = config.get("added_tokens_decoder")
    if decoder is None and any((folder / f).exists() for f in ("special_tokens_map.json",
                                                               "added_tokens.json")):
        raise _NotGeneric  # the legacy loading path, with its own precedence rules
    names: list[str] = []
    if decoder is not None:
        if not isinstance(decoder, dict):
            raise _NotGeneric
        names += [_content(entry, added=True) for entry in decoder.values()]
    for key, value in config.items():
        if key.endswith("_token") and value is not None and not isinstance(value, bool):
            names.append(_content(value))
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens")
    if isinstance(extra, dict):
        names += [_content(v) for v in extra.values()]
    elif isinstance(extra, list):
        names += [_content(v) for v in extra]
    elif extra is not None:
        raise _NotGeneric
    from tokenizers import Tokenizer

    try:
        vocab = Tokenizer.from_file(str(tokenizer_file)).get_vocab(with_added_tokens=True)
    except Exception as exc:  # the Rust loader raises plain Exceptions
        raise InputError(f"{tokenizer_file}: the tokenizer does not load ({exc}); "
                         "pass a working one as `tokenizer=PATH`") from exc
    return len(set(vocab) | set(names))


def _content(value: object, added: bool = False) -> str:
    """The text of a token as tokenizer_config.json stores it: a string, or an AddedToken dict
    (``{"__type": "AddedToken", "content": ...}``; without ``__type`` in added_tokens_decoder)."""
    if isinstance(value, str) and not added:
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str) \
            and (added or value.get("__type") == "AddedToken"):
        return value["content"]
    raise _NotGeneric


def _cache_path(folder: Path) -> Path:
    cache = HashCache()
    files = {name: cache.sha256(folder / name) for name in TOKENIZER_INPUTS
             if (folder / name).is_file()}
    cache.save()
    return memo_path("tokenizer-length", {
        "format": CACHE_FORMAT, "files": files,
        "transformers": installed_version("transformers"),
        "tokenizers": installed_version("tokenizers")})


def _transformers_length(folder: Path) -> int:
    from transformers import AutoTokenizer

    try:
        return len(AutoTokenizer.from_pretrained(folder))
    except Exception as exc:
        raise InputError(f"{folder}: the tokenizer does not load ({exc}); "
                         "pass a working one as `tokenizer=PATH`") from exc
