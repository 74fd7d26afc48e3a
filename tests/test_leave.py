"""The ``mergeflow`` command ends without the interpreter's teardown (mergeflow.cli.leave), yet
as a normal exit would: exit handlers run, output is flushed, live threads are waited for."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

# At interpreter teardown, this module-level object's __del__ prints "teardown": the message is
# the sign that the teardown ran.
PROLOGUE = """
import atexit, sys, threading, time
from mergeflow.cli.leave import leave, run_then_leave

class Teardown:
    def __del__(self):
        sys.stderr.write("teardown\\n")

witness = Teardown()
atexit.register(lambda: open(sys.argv[1], "w").write("handler ran"))
sys.stdout.write("buffered, no newline")
"""


def _run(body: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout buffered
    return subprocess.run([sys.executable, "-c", PROLOGUE + body, str(tmp_path / "handler")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
                          check=False)


@pytest.mark.parametrize(("code", "rc"), [(0, 0), (None, 0), (2, 2), (130, 130)])
def test_leave_runs_exit_handlers_flushes_and_skips_the_teardown(tmp_path, code, rc):
    proc = _run(f"leave({code!r})", tmp_path)
    assert proc.returncode == rc, proc.stderr
    assert proc.stdout == "buffered, no newline"
    assert (tmp_path / "handler").read_text() == "handler ran"
    assert "teardown" not in proc.stderr  # os._exit: no module teardown


def test_leave_waits_for_a_running_thread_as_a_normal_exit_does(tmp_path):
    body = ("def work():\n    time.sleep(0.5)\n    open(sys.argv[1] + '.thread', 'w').write('done')\n"
            "threading.Thread(target=work).start()\nleave(3)")
    proc = _run(body, tmp_path)
    assert proc.returncode == 3, proc.stderr
    assert Path(f"{tmp_path / 'handler'}.thread").read_text() == "done"
    assert (tmp_path / "handler").read_text() == "handler ran"
    assert "teardown" in proc.stderr  # the normal exit, which joins the thread


def test_a_message_as_exit_code_is_printed_as_python_does(tmp_path):
    proc = _run("leave('fatal: no')", tmp_path)
    assert proc.returncode == 1
    assert "fatal: no" in proc.stderr


def test_run_then_leave_passes_on_the_app_exit_code(tmp_path):
    proc = _run("def app():\n    raise SystemExit(2)\nrun_then_leave(app)", tmp_path)
    assert proc.returncode == 2 and "teardown" not in proc.stderr
    proc = _run("run_then_leave(lambda: None)", tmp_path)
    assert proc.returncode == 0 and proc.stdout == "buffered, no newline"


@pytest.mark.parametrize("module", ["mergeflow.cli", "mergeflow.cli.app"])
def test_the_command_leaves_with_its_exit_code(module, tmp_path):
    """``python -m mergeflow.cli`` (as the console script) and ``-m mergeflow.cli.app``: a bad
    input is refused with exit 2 and its one line, --help exits 0."""
    ok = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True,
                        text=True, timeout=120, check=False)
    assert ok.returncode == 0 and "merge" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", module, "merge", "--adapter",
                          str(tmp_path / "missing"), "--out", str(tmp_path / "out")],
                         cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert bad.returncode == 2, bad.stderr
    assert "missing" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "out").exists()
