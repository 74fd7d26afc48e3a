"""A function's answer from a forked child (``mergeflow.model.forked``), and a new base's layout
learnt that way (``mergeflow.model.layout.start_layout``): the same layout as learnt in the
process, errors raised in the parent, a lost child replaced by learning here, no child where a
thread runs. Each case runs in a fresh interpreter: forking needs a process with one thread,
which pytest's is not guaranteed to be."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from helpers import REPO
from helpers import run_python as _run


def test_the_childs_value_and_exceptions_reach_the_parent():
    got = _run("""
        import json, os
        from mergeflow.errors import PlanError
        from mergeflow.model.forked import ChildLost, call_in_fork

        def outcome(fn):
            call = call_in_fork(fn)
            assert call is not None, "one thread: forking is allowed"
            try:
                return ["value", call.result()]
            except ChildLost:
                return ["lost"]
            except Exception as exc:
                return ["error", type(exc).__name__, str(exc)]

        def plan_error():
            raise PlanError("config.json: no such head")

        class Unpicklable(Exception):
            def __reduce__(self):
                raise TypeError("no")

        def unpicklable():
            raise Unpicklable("kept as text")

        print(json.dumps({
            "value": outcome(lambda: {"pid": os.getpid(), "big": "x" * 300_000}),
            "plan_error": outcome(plan_error),
            "unpicklable": outcome(unpicklable),
            "killed": outcome(lambda: os._exit(3)),
            "parent": os.getpid(),
        }))
    """)
    kind, value = got["value"]
    assert kind == "value" and value["pid"] != got["parent"] and len(value["big"]) == 300_000
    assert got["plan_error"] == ["error", "PlanError", "config.json: no such head"]
    assert got["unpicklable"] == ["error", "RuntimeError", "Unpicklable: kept as text"]
    assert got["killed"] == ["lost"]


def test_the_child_runs_without_the_garbage_collector_and_the_parent_keeps_it():
    got = _run("""
        import gc, json
        from mergeflow.model.forked import call_in_fork

        call = call_in_fork(gc.isenabled)
        assert call is not None, "one thread: forking is allowed"
        print(json.dumps({"child": call.result(), "parent": gc.isenabled()}))
    """)
    assert got == {"child": False, "parent": True}


def test_cancel_stops_and_reaps_the_child_and_no_fork_happens_beside_a_thread():
    got = _run("""
        import json, os, signal, threading, time
        from mergeflow.model.forked import call_in_fork

        def gone(pid):  # ended and reaped: not even a zombie is left
            try:
                os.kill(pid, 0)
                return False
            except ProcessLookupError:
                return True

        call = call_in_fork(lambda: time.sleep(60))
        pid = call._pid
        started = time.monotonic()
        call.cancel()
        call.cancel()  # twice is harmless
        cancelled = {"gone": gone(pid), "seconds": time.monotonic() - started}

        class Stop(Exception):
            pass

        def stop_now(signum, frame):
            raise Stop

        signal.signal(signal.SIGALRM, stop_now)  # an exception while the parent waits
        waited = call_in_fork(lambda: time.sleep(60))
        waited_pid = waited._pid
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        try:
            waited.result()
            raised = False
        except Stop:
            raised = True
        interrupted = {"raised": raised, "gone": gone(waited_pid),
                       "seconds": time.monotonic() - started}

        stop = threading.Event()
        worker = threading.Thread(target=stop.wait)
        worker.start()
        beside_thread = call_in_fork(lambda: 1)
        stop.set()
        worker.join()
        print(json.dumps({"cancelled": cancelled, "interrupted": interrupted,
                          "beside_thread": beside_thread is None,
                          "after_thread": call_in_fork(lambda: 1).result()}))
    """)
    assert got["cancelled"]["gone"] is True and got["cancelled"]["seconds"] < 30
    assert got["interrupted"] == {**got["interrupted"], "raised": True, "gone": True}
    assert got["interrupted"]["seconds"] < 30  # not the child's 60 s
    assert got["beside_thread"] is True and got["after_thread"] == 1


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_layout_learnt_in_a_child_is_the_one_learnt_here(arch, make_base, tmp_path,
                                                            monkeypatch):
    """The child's layout equals the in-process one and is cached, and the parent never imports
    transformers; with the child lost, or with ``fork=False``, the layout is learnt in the
    parent."""
    from mergeflow.model.checkpoint import Checkpoint
    from mergeflow.model.config import base_config
    from mergeflow.model.layout import read_layout

    base = make_base(arch)
    monkeypatch.setenv("MERGEFLOW_CACHE", str(tmp_path / "here"))
    here = read_layout(base, set(Checkpoint(base).tensors), base_config(base))
    script = f"""
        import json, os, sys
        from pathlib import Path
        from mergeflow.model import forked, layout
        from mergeflow.model.checkpoint import Checkpoint
        from mergeflow.model.config import base_config

        if os.environ.get("LOSE_CHILD"):  # the child dies before it answers
            layout.call_in_fork = lambda fn: forked.call_in_fork(lambda: os._exit(9))
        base = Path({str(base)!r})
        got = layout.start_layout(base, set(Checkpoint(base).tensors), base_config(base),
                                  fork=not os.environ.get("NO_FORK")).result()
        print(json.dumps({{"embed": got.embed, "head": got.head, "tied": got.tied,
                          "conv1d": sorted(got.conv1d), "linear": sorted(got.linear),
                          "map": got.model_map.to_json(),
                          "transformers": "transformers" in sys.modules}}))
    """
    expected = {"embed": here.embed, "head": here.head, "tied": here.tied,
                "conv1d": sorted(here.conv1d), "linear": sorted(here.linear),
                "map": json.loads(json.dumps(here.model_map.to_json()))}
    child = _run(script, {"MERGEFLOW_CACHE": str(tmp_path / "child")})
    assert child.pop("transformers") is False
    assert child == expected
    assert len(list((tmp_path / "child" / "layout").glob("*.json"))) == 1  # cached by the parent
    lost = _run(script, {"MERGEFLOW_CACHE": str(tmp_path / "lost"), "LOSE_CHILD": "1"})
    assert lost.pop("transformers") is True  # learnt here after all
    assert lost == expected
    asked_here = _run(script, {"MERGEFLOW_CACHE": str(tmp_path / "here-too"), "NO_FORK": "1"})
    assert asked_here.pop("transformers") is True  # fork=False: learnt in the process
    assert asked_here == expected


def test_an_incomplete_base_is_refused_from_the_child(make_base, tmp_path):
    """The child's PlanError (tie_word_embeddings false, no head) is the parent's."""
    import shutil

    base = shutil.copytree(make_base("llama"), tmp_path / "base")
    config = json.loads((base / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (base / "config.json").write_text(json.dumps(config))
    got = _run(f"""
        import json
        from pathlib import Path
        from mergeflow.errors import PlanError
        from mergeflow.model.checkpoint import Checkpoint
        from mergeflow.model.layout import start_layout

        base = Path({str(base)!r})
        names = set(Checkpoint(base).tensors) - {{"lm_head.weight"}}
        try:
            start_layout(base, names, json.loads((base / "config.json").read_text())).result()
            print(json.dumps({{"error": None}}))
        except PlanError as exc:
            print(json.dumps({{"error": str(exc)}}))
    """, {"MERGEFLOW_CACHE": str(tmp_path / "cache")})
    assert "tie_word_embeddings is false" in got["error"] and "lm_head.weight" in got["error"]


def test_no_fork_once_cuda_is_initialized_or_when_fork_fails():
    got = _run("""
        import errno, json, os
        import torch
        from mergeflow.model.forked import call_in_fork

        before = call_in_fork(lambda: 1).result()
        real_cuda = torch.cuda.is_initialized
        torch.cuda.is_initialized = lambda: True  # as after a CUDA merge in this process
        after_cuda = call_in_fork(lambda: 1) is None
        torch.cuda.is_initialized = real_cuda
        fds_before = len(os.listdir("/proc/self/fd"))

        def no_memory():
            raise OSError(errno.ENOMEM, "Cannot allocate memory")

        os.fork = no_memory  # strict overcommit in a large process
        refused = call_in_fork(lambda: 1) is None
        print(json.dumps({"before": before, "after_cuda": after_cuda,
                          "fork_failed": refused,
                          "fds_kept": len(os.listdir("/proc/self/fd")) - fds_before}))
    """)
    assert got == {"before": 1, "after_cuda": True, "fork_failed": True, "fds_kept": 0}


def test_a_model_the_child_cannot_build_is_asked_again_here(make_base, tmp_path):
    """transformers cannot build it in the child: the parent asks again (same fallback answer,
    nothing cached), so nothing about the child can turn a layout into the fallback."""
    import shutil

    base = shutil.copytree(make_base("llama"), tmp_path / "base")
    config = json.loads((base / "config.json").read_text())
    config["model_type"] = "no-such-architecture"
    (base / "config.json").write_text(json.dumps(config))
    got = _run(f"""
        import json, sys
        from pathlib import Path
        from mergeflow.model import layout

        asked = []
        learn = layout._LayoutQuery.learn

        def counted(self):
            asked.append(1)
            return learn(self)

        layout._LayoutQuery.learn = counted  # the child's count stays in the child
        forks = []
        fork = layout.call_in_fork
        layout.call_in_fork = lambda fn: forks.append(fork(fn)) or forks[-1]
        base = Path({str(base)!r})
        got = layout.start_layout(base, {{"model.embed_tokens.weight"}},
                                  json.loads((base / "config.json").read_text())).result()
        print(json.dumps({{"embed": got.embed, "conv1d": sorted(got.conv1d),
                           "forked": forks != [None], "asked_here": len(asked)}}))
    """, {"MERGEFLOW_CACHE": str(tmp_path / "cache")})
    assert got == {"embed": None, "conv1d": [], "forked": True, "asked_here": 1}
    assert not list((tmp_path / "cache").rglob("*.json"))


def test_a_child_that_outlives_its_killed_parent_does_not_keep_the_output_locked(tmp_path):
    """A ``flock`` belongs to the open file, which a forked child shares: the layout's child
    closes its copy, so an output is free the moment the merge holding it is killed, even while
    the child still runs."""
    out = tmp_path / "out"
    env = {"MERGEFLOW_LOCK_DIR": str(tmp_path / "locks")}
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, signal, sys, time
        from mergeflow.model.forked import call_in_fork
        from mergeflow.storage.lock import output_lock
        with output_lock({str(out)!r}):
            call = call_in_fork(lambda: time.sleep(30))  # the child outlives this process
            assert call is not None
            print("locked", call._pid, flush=True)
            sys.stdin.readline()
            os.kill(os.getpid(), signal.SIGKILL)
        """)], cwd=REPO, env=dict(os.environ, **env), stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True)
    child = None
    try:
        word, child = parent.stdout.readline().split()
        assert word == "locked"
        held = _run(f"""
            import json
            from mergeflow.errors import OutputError
            from mergeflow.storage.lock import output_lock
            try:
                with output_lock({str(out)!r}):
                    print(json.dumps({{"held": False}}))
            except OutputError:
                print(json.dumps({{"held": True}}))
            """, env)
        assert held == {"held": True}  # the parent holds it while it runs
        parent.stdin.write("\n")
        parent.stdin.flush()
        parent.wait(timeout=60)
        free = _run(f"""
            import json
            from mergeflow.storage.lock import output_lock
            with output_lock({str(out)!r}):
                print(json.dumps({{"held": False}}))
            """, env)
        assert free == {"held": False}
    finally:
        parent.kill()
        if child is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(child), signal.SIGKILL)
