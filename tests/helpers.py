"""Helpers shared by the test modules (imported as ``helpers``; tests/ is on sys.path)."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

REPO = Path(__file__).resolve().parent.parent


def logits_of(folder: Path, ids: torch.Tensor, *, adapter: Path | None = None,
              dtype: torch.dtype = torch.float32, auto_class=None) -> torch.Tensor:
    """Logits of a saved model (optionally with a live PEFT adapter on top), eval mode, no grad."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    auto_class = auto_class or AutoModelForCausalLM
    model = auto_class.from_pretrained(folder, dtype=dtype)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def run_python(code: str, env: dict[str, str] | None = None) -> dict:
    """Run ``code`` in a fresh interpreter (one thread, so it may fork; nothing imported from
    the test process); the JSON object its last line prints."""
    import textwrap

    full = dict(os.environ, PYTHONWARNINGS="ignore", **(env or {}))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=full,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (sharded) safetensors checkpoint folder, checking no name repeats."""
    tensors: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                assert key not in tensors, f"{key} appears in two shards"
                tensors[key] = f.get_tensor(key)
    return tensors


def shard_keys(folder: Path) -> dict[str, list[str]]:
    """Shard file name -> the tensor names its header holds."""
    out = {}
    for path in weight_files(folder):
        with safe_open(str(path), framework="pt") as f:
            out[path.name] = list(f.keys())
    return out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file below ``folder`` (relative name -> (inode, mtime_ns, bytes)), plus the folder's
    own inode under "."; equal snapshots mean nothing was rewritten, replaced or added."""
    snap: dict[str, tuple[int, int, bytes]] = {".": (folder.stat().st_ino, 0, b"")}
    for path in sorted(folder.rglob("*")):
        st = path.stat()
        snap[str(path.relative_to(folder))] = (
            st.st_ino, st.st_mtime_ns, path.read_bytes() if path.is_file() else b"")
    return snap


def age_files(folder: Path, seconds: int = 3600) -> None:
    """Move every mtime below ``folder`` into the past, so any rewrite shows in a snapshot."""
    for path in [folder, *folder.rglob("*")]:
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - seconds * 10**9))


def staging_leftovers(out: Path) -> list[str]:
    """Names beside ``out`` that a merge into it uses while running (staging, old copy)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def load_json(path: Path) -> dict:
    return json.loads(path.read_text())


def cli_command(*args: str) -> list[str]:
    """The installed ``mergeflow`` console script (``python -m mergeflow.cli.app`` if absent)."""
    script = Path(sys.executable).with_name("mergeflow")
    if script.is_file():
        return [str(script), *args]
    return [sys.executable, "-m", "mergeflow.cli.app", *args]


def cli_env() -> dict[str, str]:
    """The environment of a CLI subprocess: this one's, without PREFECT_API_URL (the session's
    Prefect server exports it, so an inherited one would send a CLI test down the flow route
    or not depending on which tests ran first; a test wanting that route sets it itself)."""
    # Third-party deprecation warnings are not Mergeflow's output; keep them off stderr.
    env = dict(os.environ, PYTHONWARNINGS="ignore", NO_COLOR="1", COLUMNS="80")
    env.pop("PREFECT_API_URL", None)
    return env


def start_cli(*args: str) -> subprocess.Popen:
    """Start the real CLI in a fresh interpreter (environment inherited); see :func:`finish`."""
    return subprocess.Popen(cli_command(*args), cwd=REPO, env=cli_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real CLI in a fresh interpreter and wait for it (``returncode``, ``stdout``,
    ``stderr`` as text)."""
    return subprocess.run(cli_command(*args), cwd=REPO, env=cli_env(), capture_output=True,
                          text=True, timeout=timeout, check=False)


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def finish(proc: subprocess.Popen, timeout: float = 300) -> CliResult:
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
    return CliResult(proc.returncode, stdout, stderr)


def _cli_child(args: list[str], stdout_path: str, stderr_path: str,
               env: dict[str, str] | None = None) -> None:
    """Body of a forked CLI process: fds 1 and 2 go to files, exit status is the CLI's. The
    environment is the forkserver's with ``env`` over it, PREFECT_API_URL only if ``env`` sets
    it (see :func:`cli_env`)."""
    import traceback
    import warnings

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    for fd, path in ((1, stdout_path), (2, stderr_path)):
        new = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(new, fd)
        os.close(new)
    os.environ.pop("PREFECT_API_URL", None)
    os.environ.update(env or {}, NO_COLOR="1", COLUMNS="80")
    code = 1
    try:
        from mergeflow.cli.app import app

        app(args=list(args), prog_name="mergeflow")
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


#: Held while a forked child starts and while its exit status is read. ``Process.start()`` polls
#: every live child of this process (multiprocessing's ``_cleanup``), so a start in one thread
#: could read the status another thread is waiting on: that thread then finds the status pipe
#: at EOF and reports exit 255 (a real kill seen as "not reached" in the crash test, issue 27's
#: CI run). Starting and polling under one lock makes the first reader's answer the only one.
_FORKED = threading.Lock()


def start_forked(target, args: tuple) -> multiprocessing.Process:
    """Start ``target(*args)`` in a process forked from a forkserver that imported
    ``mergeflow.cli.app`` once (torch, transformers and peft take seconds to import)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["mergeflow.cli.app"])
    proc = ctx.Process(target=target, args=args)
    with _FORKED:
        proc.start()
    return proc


def join_forked(proc: multiprocessing.Process, timeout: float = 300) -> int:
    """Wait for a child from :func:`start_forked` (killed after ``timeout``); its exit code
    (negative: the signal that ended it). Safe to call from several threads at once."""
    from multiprocessing.connection import wait

    if not wait([proc.sentinel], timeout):
        proc.kill()
    wait([proc.sentinel])
    with _FORKED:
        return proc.exitcode


def run_cli_forked(argvs: list[list[str]], workdir: Path, env: dict[str, str] | None = None,
                   timeout: float = 300) -> list[CliResult]:
    """Run the CLI once per argv, each in its own forked process (:func:`start_forked`), all at
    once, with ``env`` over the forkserver's environment in each child.

    Each run is a real separate process with its own stdout, stderr and exit status, without
    paying the imports again.
    """
    procs = []
    for i, argv in enumerate(argvs):
        paths = (str(workdir / f"cli-{i}.out"), str(workdir / f"cli-{i}.err"))
        procs.append((start_forked(_cli_child, (argv, *paths, env or {})), paths))
    return [CliResult(join_forked(proc, timeout), Path(out).read_text(), Path(err).read_text())
            for proc, (out, err) in procs]


# -- vision-language bases (issue 12) -----------------------------------------------------------

#: The processor_config.json a VLM base ships (kept byte for byte by a merge).
PROCESSOR_CONFIG = {"processor_class": "TinyTestProcessor", "num_image_tokens": 4}
#: Token ids the tiny VLMs reserve (vocabulary 128): image, video / end-of-image, start-of-image.
IMAGE_TOKEN, SECOND_TOKEN, START_TOKEN = 127, 126, 125


def _tiny_text(**overrides) -> dict:
    """The language model's sizes, as :mod:`builders` builds its tiny models."""
    from builders import _small

    return _small(**overrides)


def vlm_config(arch: str):
    """A tiny vision-language config: "gemma3" (SigLIP tower, soft-token projector), "qwen2_vl"
    or "qwen2_5_vl" (patch-merger tower, M-RoPE). Each image becomes 4 image tokens."""
    import transformers as tf

    if arch == "gemma3":
        text = dict(_tiny_text(head_dim=16), model_type="gemma3_text", sliding_window=16)
        vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)
        return tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                               image_token_index=IMAGE_TOKEN, eoi_token_index=SECOND_TOKEN,
                               boi_token_index=START_TOKEN)
    if arch in ("qwen2_vl", "qwen2_5_vl"):
        rope = {"rope_type": "default", "mrope_section": [2, 3, 3]}
        text = dict(_tiny_text(), model_type=f"{arch}_text", rope_parameters=rope)
        vision = dict(depth=1, hidden_size=32, num_heads=2, patch_size=4, spatial_merge_size=2,
                      temporal_patch_size=2, in_channels=3)
        if arch == "qwen2_vl":
            vision.update(embed_dim=32, hidden_size=64, mlp_ratio=2)
            config_class = tf.Qwen2VLConfig
        else:
            vision.update(intermediate_size=64, out_hidden_size=64, fullatt_block_indexes=[0],
                          window_size=16)
            config_class = tf.Qwen2_5_VLConfig
        return config_class(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN,
                            video_token_id=SECOND_TOKEN, vision_start_token_id=START_TOKEN)
    raise ValueError(f"unknown vision-language architecture {arch!r}")


#: preprocessor_config.json of each tiny VLM (the image processor AutoProcessor would load).
PREPROCESSOR_CONFIG = {
    "gemma3": {"image_processor_type": "Gemma3ImageProcessor", "size": {"height": 32, "width": 32}},
    "qwen2_vl": {"image_processor_type": "Qwen2VLImageProcessor", "patch_size": 4, "merge_size": 2,
                 "temporal_patch_size": 2},
}
PREPROCESSOR_CONFIG["qwen2_5_vl"] = PREPROCESSOR_CONFIG["qwen2_vl"]


def build_vlm_base(folder: Path, arch: str, seed: int = 0) -> Path:
    """Save a tiny random VLM with its own class (``save_pretrained``), a tokenizer with a chat
    template, a preprocessor_config.json and a processor_config.json."""
    from builders import save_tokenizer
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(vlm_config(arch), dtype=torch.float32)
    model.save_pretrained(folder)
    save_tokenizer(folder, 128)
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG[arch]))
    (folder / "processor_config.json").write_text(json.dumps(PROCESSOR_CONFIG))
    return folder


def vlm_inputs(arch: str, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Model inputs with one fixed random image per sequence, in the form the architecture's
    image processor produces, its 4 image tokens placed after ``ids[:, :3]`` behind a
    start-of-image token. (The image processors need Pillow, which is not installed.)"""
    gen = torch.Generator().manual_seed(7)
    batch = ids.shape[0]
    if arch == "gemma3":
        pixels = {"pixel_values": torch.randn(batch, 3, 32, 32, generator=gen)}
    else:  # 16x16 image: a 4x4 grid of 4x4 patches, 2 frames each -> (16 * batch, 3 * 2 * 4 * 4)
        pixels = {"pixel_values": torch.randn(16 * batch, 96, generator=gen),
                  "image_grid_thw": torch.tensor([[1, 4, 4]] * batch)}
    marked = torch.tensor([START_TOKEN] + [IMAGE_TOKEN] * 4).expand(batch, -1)
    input_ids = torch.cat([ids[:, :3], marked, ids[:, 3:]], dim=1)  # (batch, seq + 5)
    if arch != "gemma3":  # M-RoPE: which tokens are image tokens (1), as the processor returns
        pixels["mm_token_type_ids"] = (input_ids == IMAGE_TOKEN).long()  # (batch, seq + 5)
    return {"input_ids": input_ids, **pixels}


def vlm_logits(folder: Path, inputs: dict[str, torch.Tensor], *,
               adapter: Path | None = None) -> torch.Tensor:
    """Logits of a saved VLM reloaded with the class its config names (optionally under a live
    PEFT adapter), eval mode, no grad."""
    from builders import model_class_of
    from peft import PeftModel

    model = model_class_of(folder).from_pretrained(folder, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits.float()


class ServedReceiver:
    """``mergeflow webhook serve``'s app (``triggers.webhook.create_app(settings)``) under uvicorn
    in a thread, on a free local port; ``url`` is its base URL. A context manager."""

    def __init__(self, settings) -> None:
        import uvicorn

        from triggers.webhook import create_app

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1",
                                                    port=port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServedReceiver:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.server.started, "the receiver did not start"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
