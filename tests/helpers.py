"""Helpers shared by the test modules (imported as ``helpers``; tests/ is on sys.path)."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import subprocess
import sys
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
    """The installed ``mergeflow`` console script (``python -m mergeflow.cli`` if absent)."""
    script = Path(sys.executable).with_name("mergeflow")
    if script.is_file():
        return [str(script), *args]
    return [sys.executable, "-m", "mergeflow.cli", *args]


def cli_env() -> dict[str, str]:
    # Third-party deprecation warnings are not Mergeflow's output; keep them off stderr.
    return dict(os.environ, PYTHONWARNINGS="ignore", NO_COLOR="1", COLUMNS="80")


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


def _cli_child(args: list[str], stdout_path: str, stderr_path: str) -> None:
    """Body of a forked CLI process: fds 1 and 2 go to files, exit status is the CLI's."""
    import traceback
    import warnings

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    for fd, path in ((1, stdout_path), (2, stderr_path)):
        new = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(new, fd)
        os.close(new)
    os.environ.update(NO_COLOR="1", COLUMNS="80")
    code = 1
    try:
        from mergeflow.cli import app

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


def run_cli_forked(argvs: list[list[str]], workdir: Path, timeout: float = 300) -> list[CliResult]:
    """Run the CLI once per argv, each in its own process, all at once.

    The processes fork from a multiprocessing forkserver that imported ``mergeflow.cli`` once
    (torch, transformers and peft take seconds to import), so each run is a real separate process
    with its own stdout, stderr and exit status, without paying the imports again.
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["mergeflow.cli"])
    procs = []
    for i, argv in enumerate(argvs):
        paths = (str(workdir / f"cli-{i}.out"), str(workdir / f"cli-{i}.err"))
        proc = ctx.Process(target=_cli_child, args=(argv, *paths))
        proc.start()
        procs.append((proc, paths))
    results = []
    for proc, (out_path, err_path) in procs:
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join()
        results.append(CliResult(proc.exitcode, Path(out_path).read_text(), Path(err_path).read_text()))
    return results
