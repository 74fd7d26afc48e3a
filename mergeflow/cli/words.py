"""Flag wording: core messages name options by their MergeSpec fields in backticks
(`` `overwrite=True` ``); :func:`cli_words` shows them as the flags of ``mergeflow merge``, and
each ``merge`` option takes its help (:func:`option_help`) and default (:func:`option_default`)
from its field."""

from __future__ import annotations

import re
from typing import Any

from mergeflow.spec import MergeSpec

_FLAG_WORD = re.compile(r"`([a-z][a-z0-9_]*)(?:=([^`]*))?`")


def cli_words(text: str) -> str:
    """A core message with its option names (MergeSpec fields in backticks: `` `max_shard_size` ``,
    `` `merge_onto=original` ``, `` `overwrite=True` ``, `` `tokenizer=PATH` ``) as the flags
    of ``mergeflow merge`` (``--max-shard-size``, ``--merge-onto original``, ``--overwrite``,
    ``--tokenizer PATH``). Backticked words that are not fields are left as they are."""
    return _FLAG_WORD.sub(_flag, text)


def _flag(match: re.Match) -> str:
    """One backticked word of :func:`cli_words` as a flag (as it was, if not a field)."""
    name, value = match.group(1), match.group(2)
    if name not in MergeSpec.model_fields:
        return match.group(0)
    option = "--" + name.replace("_", "-")
    if value is None or value == "True":
        return option
    if value == "False":
        return "--no-verify" if name == "verify" else f"no {option}"
    return f"{option} {value}"


def option_help(field: str) -> str:
    """A ``merge`` option's help: its MergeSpec field's description (brackets escaped, so
    rich shows ``hf://org/name[@revision]`` as written)."""
    from rich.markup import escape

    return escape(cli_words(MergeSpec.model_fields[field].description or ""))


def option_default(field: str) -> Any:
    """A ``merge`` option's default: its MergeSpec field's default."""
    return MergeSpec.model_fields[field].default
