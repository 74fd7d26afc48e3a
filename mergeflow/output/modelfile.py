"""The Ollama Modelfile beside a GGUF output: FROM the file, the chat template translated to
Ollama's Go template where it translates, and the stop tokens (eos and the template's
end-of-turn special tokens), all read from the tokenizer folder."""

from __future__ import annotations

import json
from pathlib import Path

from mergeflow.storage.staging import Staging, atomic_write

MODELFILE = "Modelfile"
_ROLES = ("system", "user", "assistant")
_MARK = "\x00{}\x00"


def go_template(chat_template: str, bos: str = "", eos: str = "") -> str | None:
    """The chat template as an Ollama (Go) template, for templates that wrap each message in a
    role-dependent prefix and suffix: the Jinja template is rendered with marker messages and
    cut at the markers. None when it is not of that shape (Ollama then reads the GGUF's own
    ``tokenizer.chat_template``)."""
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
        parts[role] = (prefix, suffix)
    start = bos if full.startswith(bos) and bos else ""
    if start + "".join(p + _MARK.format(r) + s for r, (p, s) in parts.items()) != full:
        return None
    branches = "".join(
        f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{r}" }}}}{_go(p)}{{{{ .Content }}}}{_go(s)}'
        for i, (r, (p, s)) in enumerate(parts.items()))
    return (f"{_go(start)}{{{{- range .Messages }}}}{branches}{{{{ end }}}}{{{{ end }}}}"
            f"{_go(with_prompt[len(full):])}")


def _go(text: str) -> str:
    """Literal text inside a Go template (only ``{{`` needs escaping)."""
    return text.replace("{{", '{{ "{{" }}')


def modelfile(gguf_name: str, tokenizer: Path) -> str:
    """An Ollama Modelfile for the GGUF: FROM, the translated chat template (when it translates)
    and the stop tokens (eos and the template's end-of-turn special tokens)."""
    config_path = tokenizer / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    template = config.get("chat_template")
    if template is None and (tokenizer / "chat_template.jinja").is_file():
        template = (tokenizer / "chat_template.jinja").read_text()
    bos, eos = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
    lines = [f"FROM ./{gguf_name}"]
    go = go_template(template, bos, eos) if isinstance(template, str) else None
    if go is not None:
        lines.append(f'TEMPLATE """{go}"""')
    stops = [eos] if eos else []
    for token in _special_tokens(tokenizer):
        if isinstance(template, str) and token in template and token not in stops \
                and token != bos and "end" in token.lower():
            stops.append(token)
    lines.extend(f'PARAMETER stop "{s}"' for s in stops)
    return "\n".join(lines) + "\n"


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
    """The Modelfile beside the GGUF, written durably."""
    atomic_write(staging.folder / MODELFILE, modelfile(gguf_name, tokenizer))


def ollama_command(out: str | Path, name: str) -> str:
    """The command that imports the published GGUF into Ollama."""
    return f"ollama create {name} -f {Path(out) / MODELFILE}"
