"""The Ollama Modelfile beside a GGUF, for the chat templates the families publish.

For each family (``chat_templates.FAMILIES``: Llama 3, Qwen2.5, ChatML, Gemma 2, Gemma 3,
Mistral, Phi-3.5): the stop tokens are the family's end of turn and eos; a template that is a
role-by-role prefix and suffix becomes a Go TEMPLATE that, run on a conversation, gives the text
the Jinja template gives (minus the bos llama.cpp adds itself); any other template gets no
TEMPLATE (Ollama then reads the GGUF's own chat template) rather than a wrong one. A real GGUF
merge writes the Modelfile from the file's own ``add_bos_token``, and ``push_to`` publishes every
GGUF and the Modelfile with the manifest.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from builders import build_adapter, build_base, save_bpe_tokenizer
from chat_templates import FAMILIES

import mergeflow
from mergeflow.output.modelfile import modelfile

# family -> (translates to a Go template, the stop tokens in order)
EXPECTED = {
    "llama3": (True, ["<|eot_id|>"]),
    "llama3-base-eos": (True, ["<|end_of_text|>", "<|eot_id|>"]),
    "qwen2.5": (False, ["<|im_end|>"]),  # a default system message: not a prefix and suffix
    "chatml": (True, ["<|endoftext|>", "<|im_end|>"]),
    "gemma2": (False, ["<eos>", "<end_of_turn>"]),  # refuses a system role
    "gemma3": (False, ["<eos>", "<end_of_turn>"]),  # folds the system into the first user turn
    "mistral": (False, ["</s>"]),  # refuses a system role
    "phi3": (True, ["<|endoftext|>", "<|end|>"]),
}
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]


def tokenizer_folder(folder: Path, family: str) -> Path:
    """The family's tokenizer_config.json (template, bos, eos) and its tokenizer.json's special
    added tokens."""
    template, bos, eos, specials = FAMILIES[family]
    folder.mkdir(parents=True)
    config = {"chat_template": template, "bos_token": bos or None, "eos_token": eos}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    added = [{"id": i, "content": t, "special": True} for i, t in enumerate(specials)]
    (folder / "tokenizer.json").write_text(json.dumps({"added_tokens": added}))
    return folder


def parse(text: str) -> tuple[str | None, list[str]]:
    """A Modelfile's TEMPLATE (None without one) and its stop tokens."""
    template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M)
    return (template.group(1) if template else None,
            re.findall(r'^PARAMETER stop "(.*)"$', text, re.M))


def run_go(template: str, messages: list[dict[str, str]]) -> str:
    """Ollama's rendering of the Go templates Mergeflow writes: text and string literals,
    ``{{- range .Messages }}``, ``if``/``else if eq .Role "r"``, ``.Content``, ``end``
    (text/template's semantics for this subset, ``{{-`` trimming the text before it)."""
    out: list[str] = []
    pos = 0
    actions = list(re.finditer(r"{{(-?) (.*?) (-?)}}", template))
    body: list[tuple[str, str]] = []  # (kind, value) in order
    for match in actions:
        text = template[pos:match.start()]
        body.append(("text", text.rstrip() if match.group(1) else text))
        body.append(("action", match.group(2)))
        pos = match.end()
    body.append(("text", template[pos:]))
    i = 0
    while i < len(body):
        kind, value = body[i]
        if kind == "text" or value.startswith('"'):
            out.append(json.loads(value) if kind == "action" else value)
        elif value == "range .Messages":
            end = _matching_end(body, i)
            for message in messages:
                out.append(_branch(body[i + 1:end], message))
            i = end
        i += 1
    return "".join(out)


def _matching_end(body: list[tuple[str, str]], start: int) -> int:
    depth = 0
    for j in range(start, len(body)):
        kind, value = body[j]
        if kind == "action" and (value.startswith(("range ", "if "))):
            depth += 1
        elif kind == "action" and value == "end":
            depth -= 1
            if depth == 0:
                return j
    raise ValueError("unbalanced template")


def _branch(body: list[tuple[str, str]], message: dict[str, str]) -> str:
    """One message through the if / else if chain on .Role."""
    out, taking, taken = [], False, False
    for kind, value in body:
        role = re.fullmatch(r'(?:if|else if) eq \.Role "(\w+)"', value) if kind == "action" else None
        if role:
            taking = not taken and message["role"] == role.group(1)
            taken = taken or taking
        elif value == "end" and kind == "action":
            taking = False
        elif taking:
            out.append(message["content"] if value == ".Content" and kind == "action" else
                       json.loads(value) if kind == "action" else value)
    return "".join(out)


def jinja(family: str, messages: list[dict[str, str]]) -> str:
    """The family's own template, rendered as transformers renders it, with a reply prompted."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template, bos, eos, _ = FAMILIES[family]
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=True,
                                            bos_token=bos, eos_token=eos)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("adds_bos", [True, False])
def test_each_family_gets_its_template_and_stop_tokens(tmp_path, family, adds_bos):
    text = modelfile("model-q4_k_m.gguf", tokenizer_folder(tmp_path / "tok", family), adds_bos)
    assert text.startswith("FROM ./model-q4_k_m.gguf\n")
    go, stops = parse(text)
    translates, want_stops = EXPECTED[family]
    assert stops == want_stops
    assert (go is not None) == translates, text
    if go is None:
        return
    bos = FAMILIES[family][1]
    for messages in (CONVERSATION, CONVERSATION[1:], CONVERSATION[1:2]):
        want = jinja(family, messages)
        if adds_bos and bos:  # llama.cpp adds it; the template must not add a second
            want = want.removeprefix(bos)
        assert run_go(go, messages) == want, (family, messages)


def test_the_go_renderer_follows_text_template_on_a_known_template():
    """The renderer itself, on Ollama's own ChatML-style template text."""
    go = ('{{- range .Messages }}{{ if eq .Role "user" }}U:{{ .Content }}\n{{ else if eq .Role '
          '"assistant" }}A:{{ .Content }}\n{{ end }}{{ end }}{{ "{{" }}A:')
    assert run_go(go, CONVERSATION) == "U:Hi!\nA:Hello.\nU:2+2?\n{{A:"


pytest.importorskip("llama_cpp", reason="llama-cpp-python (scripts/setup builds it)")
pytest.importorskip("conversion", reason="llama.cpp's converter (scripts/setup --gguf)")


@pytest.fixture(scope="module")
def llama3_like(tmp_path_factory):
    """A Llama-3-like base: Llama 3's split regex, a tokenizer that adds <s>, and a chat
    template that starts with the bos token; and an adapter."""
    root = tmp_path_factory.mktemp("modelfile")
    base = build_base(root / "base", "llama3", tokenizer=False, vocab_size=384)
    save_bpe_tokenizer(base, 384, "llama-bpe", add_bos=True)
    template = base / "chat_template.jinja"
    template.write_text("{{ bos_token }}" + template.read_text())
    return base, build_adapter(base, root / "adapter", target_modules=["o_proj"])


def test_the_modelfile_beside_a_gguf_leaves_out_the_bos_llama_cpp_adds(llama3_like, tmp_path):
    import gguf

    base, adapter = llama3_like
    out = tmp_path / "out"
    mergeflow.merge(base, adapter, out, save_method="gguf", gguf_type="f16")
    reader = gguf.GGUFReader(out / "model-f16.gguf")
    assert reader.get_field("tokenizer.ggml.add_bos_token").contents() is True
    go, stops = parse((out / "Modelfile").read_text())
    assert go is not None and not go.startswith("<s>"), go
    assert go.startswith("{{- range .Messages }}")
    assert stops == ["</s>", "<|end|>"]


def test_push_to_publishes_every_gguf_and_the_modelfile_with_the_manifest(llama3_like, tmp_path,
                                                                         monkeypatch):
    """``push_to`` an s3:// destination (moto's S3 server): every GGUF, the Modelfile, the card
    and the manifest arrive, byte for byte, the manifest listing each."""
    from s3_server import aws_test_env, moto_s3, new_bucket

    from mergeflow.remote.fetch import s3_client

    base, adapter = llama3_like
    out = tmp_path / "out"
    with aws_test_env(), moto_s3() as url:
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)
        client = s3_client(url)
        bucket = new_bucket(client)
        mergeflow.merge(base, adapter, out, save_method="gguf", gguf_type="f16,q8_0",
                        push_to=f"s3://{bucket}/run")
        sent = {o["Key"].removeprefix("run/"): client.get_object(Bucket=bucket, Key=o["Key"])
                ["Body"].read() for o in client.list_objects_v2(Bucket=bucket)["Contents"]}
    local = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(local) == ["Modelfile", "README.md", "merge-manifest.json", "model-f16.gguf",
                             "model-q8_0.gguf"]
    assert sent == local
    manifest = json.loads(local["merge-manifest.json"])
    assert sorted(manifest["files"]) == sorted(set(local) - {"merge-manifest.json"})
