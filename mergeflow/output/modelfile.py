"""The Ollama Modelfile beside a GGUF output: FROM the file, the chat template translated to
Ollama's Go template where it translates, and the stop tokens (eos, the special tokens that end
the assistant's turn in the template, and the template's other end-of-turn special tokens), all
read from the tokenizer folder.

Ollama (llama.cpp) adds the bos token itself when the GGUF says so (``tokenizer.ggml.add_bos_token``),
so a template's leading bos is left out of the Go template then: kept, every prompt would start
with two. A template that is not a role-by-role prefix and suffix (a default system message,
a system message folded into the first user turn, roles that must alternate) is not translated:
the Modelfile then has no TEMPLATE and Ollama reads the GGUF's own ``tokenizer.chat_template``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mergeflow.storage.staging import Staging, atomic_write

MODELFILE = "Modelfile"
_ROLES = ("system", "user", "assistant")
_MARK = "\x00{}\x00"


@dataclass(frozen=True)
class Translated:
    """A chat template cut into Go template parts: the text before the messages, each role's
    prefix and suffix, and the generation prompt."""

    start: str
    parts: dict[str, tuple[str, str]]
    prompt: str

    def go(self, adds_bos: str = "") -> str:
        """The Ollama (Go) template; ``adds_bos``: the bos llama.cpp adds itself (left out)."""
        start = self.start.removeprefix(adds_bos) if adds_bos else self.start
        branches = "".join(
            f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{r}" }}}}{_go(p)}{{{{ .Content }}}}'
            f"{_go(s)}" for i, (r, (p, s)) in enumerate(self.parts.items()))
        return (f"{_go(start)}{{{{- range .Messages }}}}{branches}{{{{ end }}}}{{{{ end }}}}"
                f"{_go(self.prompt)}")


def go_template(chat_template: str, bos: str = "", eos: str = "", adds_bos: bool = False
                ) -> str | None:
    """The chat template as an Ollama (Go) template, for templates that wrap each message in a
    role-dependent prefix and suffix: the Jinja template is rendered with marker messages and
    cut at the markers. None when it is not of that shape (Ollama then reads the GGUF's own
    ``tokenizer.chat_template``). ``adds_bos``: llama.cpp adds the bos itself (the GGUF's
    ``add_bos_token``), so a leading bos is left out."""
    translated = translate(chat_template, bos, eos)
    return None if translated is None else translated.go(bos if adds_bos else "")


def translate(chat_template: str, bos: str = "", eos: str = "") -> Translated | None:
    """The chat template cut at marker messages (see :func:`go_template`), or None."""
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        template = env.from_string(chat_template)

        def render(messages, prompt):
            return template.render(messages=messages, add_generation_prompt=prompt,
                                   bos_token=bos, eos_token=eos)
        messages = [{"role": r, "content": _MARK.format(r)} for r in _ROLES]
        full = render(messages, False)
        with_prompt = render(messages, True)
    except Exception:
        return None
    if eos and not with_prompt.startswith(full) and full.endswith(eos):
        full = full[:-len(eos)]  # an eos closing the conversation when no reply is prompted
    if not with_prompt.startswith(full):
        return None
    # each role's prefix and suffix, from that role's message rendered alone
    parts = {}
    for role in _ROLES:
        single = render([{"role": role, "content": _MARK.format(role)}], False)
        if bos and single.startswith(bos):
            single = single[len(bos):]
        prefix, sep, suffix = single.partition(_MARK.format(role))
        if not sep:
            return None
        if eos and suffix.endswith(eos) and not full.endswith(suffix):
            suffix = suffix[:-len(eos)]  # the closing eos again, not the role's own
        parts[role] = (prefix, suffix)
    start = bos if full.startswith(bos) and bos else ""
    if start + "".join(p + _MARK.format(r) + s for r, (p, s) in parts.items()) != full:
        return None
    return Translated(start, parts, with_prompt[len(full):])


def _go(text: str) -> str:
    """Literal text inside a Go template (only ``{{`` needs escaping)."""
    return text.replace("{{", '{{ "{{" }}')


def modelfile(gguf_name: str, tokenizer: Path, adds_bos: bool = False) -> str:
    """An Ollama Modelfile for the GGUF: FROM, the translated chat template (when it translates)
    and the stop tokens (see :func:`stop_tokens`). ``adds_bos``: llama.cpp adds the bos token
    itself (the GGUF's ``add_bos_token``), so the template's leading bos is left out."""
    config_path = tokenizer / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    template = config.get("chat_template")
    if template is None and (tokenizer / "chat_template.jinja").is_file():
        template = (tokenizer / "chat_template.jinja").read_text()
    bos, eos = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
    lines = [f"FROM ./{gguf_name}"]
    translated = translate(template, bos, eos) if isinstance(template, str) else None
    if translated is not None:
        lines.append(f'TEMPLATE """{translated.go(bos if adds_bos else "")}"""')
    stops = stop_tokens(template if isinstance(template, str) else "", translated, bos, eos,
                        _special_tokens(tokenizer))
    lines.extend(f'PARAMETER stop "{s}"' for s in stops)
    return "\n".join(lines) + "\n"


def stop_tokens(template: str, translated: Translated | None, bos: str, eos: str,
                specials: list[str]) -> list[str]:
    """Where generation stops: eos; the special tokens that end the assistant's turn (in the
    translated template's assistant suffix); and the template's special tokens that name an end
    of turn (``<|eot_id|>``, ``<|im_end|>``, ``<end_of_turn>``, ``<|end|>``), in that order. A
    token that opens a turn (in a role's prefix, as Llama 3's ``<|end_header_id|>``) is not one."""
    stops = [eos] if eos else []
    suffix = translated.parts["assistant"][1] if translated is not None else ""
    opening = "".join(p for p, _ in translated.parts.values()) if translated is not None else ""
    ending = sorted((t for t in specials if t in suffix), key=suffix.index)
    named = [t for t in specials if t in template and t != bos and t not in opening
             and ("end" in t.lower() or "eot" in t.lower())]
    for token in [*ending, *named]:
        if token not in stops:
            stops.append(token)
    return stops


def _token_text(value) -> str:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


def _special_tokens(tokenizer: Path) -> list[str]:
    path = tokenizer / "tokenizer.json"
    if not path.is_file():
        return []
    added = json.loads(path.read_text()).get("added_tokens") or []
    return [t["content"] for t in added if t.get("special")]


def write_modelfile(staging: Staging, gguf_name: str, tokenizer: Path) -> None:
    """The Modelfile beside the GGUF (already in the staging folder), written durably."""
    adds_bos = gguf_adds_bos(staging.folder / gguf_name)
    atomic_write(staging.folder / MODELFILE, modelfile(gguf_name, tokenizer, adds_bos))


def gguf_adds_bos(path: Path) -> bool:
    """Whether llama.cpp adds the bos token to every prompt of this GGUF: its
    ``tokenizer.ggml.add_bos_token`` (False when the file does not say)."""
    import gguf

    field = gguf.GGUFReader(path).get_field("tokenizer.ggml.add_bos_token")
    return bool(field.contents()) if field is not None else False


def ollama_command(out: str | Path, name: str) -> str:
    """The command that imports the published GGUF into Ollama."""
    return f"ollama create {name} -f {Path(out) / MODELFILE}"
