"""Crash injection (issue 8): SIGKILL a real merge at 20+ moments spread over planning, merging,
finalizing and uploading to S3 (moto's server over HTTP), then rerun it.

The kill points are deterministic (``MERGEFLOW_FAULT_AT=<point>:<n>``, see mergeflow/faults.py):
the process kills itself with SIGKILL - no cleanup runs - the n-th time it reaches the point.
After every kill:

* the local output folder either does not exist or holds a manifest whose every file verifies;
* the S3 prefix either has no ``merge-manifest.json`` or has every listed object, with the
  listed size, sha256 metadata and bytes;

and the rerun finishes with output (local files and S3 objects) byte-identical to a clean run's.

Most kills run ``mergeflow.merge(..., push_to=...)`` in processes forked from a server that
imported Mergeflow once (imports cost seconds); two run the real CLI through the Prefect flow
(one through the installed console script with only the environment variable). Run with ``-s``
to see the summary line.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import REPO, cli_command, join_forked, start_forked
from s3_server import _AWS_ENV, moto_s3

from mergeflow.output.folder import MANIFEST
from mergeflow.pipeline.verification import check_files

TARGETS = ["q_proj", "v_proj", "down_proj"]
SHARD = "100KB"
BUCKET = "crash"
KILLED = -signal.SIGKILL


# --------------------------------------------------------------------------- child processes


def _redirect(log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _merge_child(job: dict) -> None:
    """A forked child: ``mergeflow.merge`` with push to S3 (or the CLI), fault points installed.
    Writes the report and what the upload did to ``job["result"]``; exit 0, 1, or killed."""
    import warnings

    import torch

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    _redirect(job["log"])
    os.environ.pop("MERGEFLOW_FAULT_AT", None)
    os.environ.update(job["env"])
    from mergeflow.pipeline import steps as api
    code = 1
    try:
        if job.get("cli"):
            from helpers import _cli_child

            _cli_child(job["cli"], job["log"] + ".out", job["log"], job["env"])  # exits with its status
        published = {}
        real_upload = api.upload

        def upload(spec):
            result = real_upload(spec)
            published.update(result.model_dump())
            return result

        api.upload = upload
        import mergeflow

        report = mergeflow.merge(job["base"], job["adapter"], job["out"], max_shard_size=SHARD,
                                 push_to=job["push_to"])
        Path(job["result"]).write_text(json.dumps({"report": report.model_dump(),
                                                   "publish": published}))
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def run_forked(job: dict, timeout: float = 300) -> int:
    """Run one job in a process forked from the forkserver; its exit code (-9: killed)."""
    return join_forked(start_forked(_merge_child, (job,)), timeout)


def run_console_script(job: dict, timeout: float = 300) -> int:
    """Run the installed ``mergeflow`` command in a fresh interpreter (fault by env only)."""
    env = {k: v for k, v in os.environ.items() if k != "MERGEFLOW_FAULT_AT"}
    env.update(job["env"], PYTHONWARNINGS="ignore", NO_COLOR="1")
    with open(job["log"], "a") as log:
        proc = subprocess.run(cli_command(*job["cli"]), cwd=REPO, env=env, stdout=log,
                              stderr=subprocess.STDOUT, timeout=timeout, check=False)
    return proc.returncode


# --------------------------------------------------------------------------- checking state


def local_state(out: Path) -> str:
    """"absent", "complete" (manifest present, every file verifies), "partial" or "corrupt"."""
    if not out.exists():
        return "absent"
    if not (out / MANIFEST).is_file():
        return "partial"
    _, problems = check_files(out)
    return "corrupt" if problems else "complete"


def s3_objects(client, prefix: str) -> dict[str, dict]:
    """Relative key -> {bytes, sha256 metadata, size} of every object under the prefix."""
    objects = {}
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{prefix}/")
    for page in pages:
        for item in page.get("Contents", []):
            got = client.get_object(Bucket=BUCKET, Key=item["Key"])
            objects[item["Key"][len(prefix) + 1:]] = {
                "bytes": got["Body"].read(), "sha256": got.get("Metadata", {}).get("sha256"),
                "size": got["ContentLength"]}
    return objects


def s3_state(client, prefix: str) -> str:
    """"absent" (no manifest: incomplete by contract), "complete" or "corrupt"."""
    objects = s3_objects(client, prefix)
    if MANIFEST not in objects:
        return "absent"
    for name, entry in json.loads(objects[MANIFEST]["bytes"])["files"].items():
        got = objects.get(name)
        if (got is None or got["size"] != entry["size"] or got["sha256"] != entry["sha256"]
                or hashlib.sha256(got["bytes"]).hexdigest() != entry["sha256"]):
            return "corrupt"
    return "complete"


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# --------------------------------------------------------------------------- scenarios


@dataclass
class Scenario:
    """Kill at each of ``points`` in turn (each run resuming the last), then rerun to the end."""

    name: str
    stage: str
    points: list[str]
    via: str = "api"  # "api" (forked mergeflow.merge), "cli" (forked CLI), "script" (fresh CLI)
    outcomes: list[tuple[str, str]] = field(default_factory=list)  # (local, s3) after each kill
    resumed: bool = False
    identical: bool = False


class Harness:
    def __init__(self, root: Path, base: Path, adapter: Path, env: dict[str, str], client) -> None:
        self.root, self.base, self.adapter, self.env, self.client = root, base, adapter, env, client

    def job(self, name: str, run: int, fault: str | None, via: str) -> dict:
        folder = self.root / name
        folder.mkdir(exist_ok=True)
        env = dict(self.env)
        if fault:
            env["MERGEFLOW_FAULT_AT"] = fault
        out, push_to = folder / "out" / "merged", f"s3://{BUCKET}/{name}"
        job = {"base": str(self.base), "adapter": str(self.adapter), "out": str(out),
               "push_to": push_to, "env": env, "log": str(folder / f"run-{run}.log"),
               "result": str(folder / f"result-{run}.json")}
        if via != "api":
            job["cli"] = ["merge", "--base", str(self.base), "--adapter", str(self.adapter),
                          "--out", str(out), "--max-shard-size", SHARD, "--push-to", push_to,
                          "--workers", "1"]
        return job

    def run(self, job: dict, via: str) -> int:
        return run_console_script(job) if via == "script" else run_forked(job)

    def play(self, scenario: Scenario) -> dict:
        """Kill, check, rerun; returns the rerun's result (report and publish summary)."""
        out = self.root / scenario.name / "out" / "merged"
        for i, point in enumerate(scenario.points):
            job = self.job(scenario.name, i, point, scenario.via)
            code = self.run(job, scenario.via)
            assert code == KILLED, (f"{scenario.name}: {point} was not reached (exit {code}):\n"
                                    + Path(job["log"]).read_text()[-3000:])
            scenario.outcomes.append((local_state(out), s3_state(self.client, scenario.name)))
        job = self.job(scenario.name, len(scenario.points), None, scenario.via)
        code = self.run(job, scenario.via)
        log = Path(job["log"]).read_text()
        assert code == 0, f"{scenario.name}: the rerun failed (exit {code}):\n{log[-3000:]}"
        if scenario.via == "api":
            result = json.loads(Path(job["result"]).read_text())
            scenario.resumed = bool(result["report"]["shards_resumed"]
                                    or result["report"]["status"] == "up-to-date"
                                    or result["publish"].get("skipped"))
        else:
            stdout = Path(job["log"] + ".out")
            log += stdout.read_text() if stdout.is_file() else ""
            scenario.resumed = "resumed" in log or "already holds" in log
        return {"out": out, "prefix": scenario.name}


def scenarios(tensors: int, shards: int, objects: int) -> list[Scenario]:
    """20 kill points over the four stages, two through the CLI, and one double kill."""
    t, s, o = tensors, shards, objects
    api = [
        ("planning", "before-planned:1"), ("planning", "after-planned:1"),
        ("merging", "tensor-written:1"), ("merging", f"tensor-written:{t // 3}"),
        ("merging", f"tensor-written:{2 * t // 3}"), ("merging", f"tensor-written:{t}"),
        ("merging", "shard-before-rename:1"), ("merging", f"shard-before-rename:{s}"),
        ("merging", "shard-renamed:2"), ("merging", "after-shard-recorded:1"),
        ("merging", f"after-shard-recorded:{s - 1}"), ("merging", f"before-shard-recorded:{s}"),
        ("finalizing", "before-manifest:1"), ("finalizing", "after-manifest:1"),
        ("finalizing", "before-publish-rename:1"), ("finalizing", "after-publish-rename:1"),
        ("uploading", "before-s3-put:1"), ("uploading", "after-s3-put:1"),
        ("uploading", f"after-s3-put:{o - 2}"), ("uploading", "before-s3-manifest-put:1"),
    ]
    out = [Scenario(f"kill-{i:02d}", stage, [point]) for i, (stage, point) in enumerate(api)]
    out.append(Scenario("cli-script", "merging", [f"tensor-written:{t // 2}"], via="script"))
    out.append(Scenario("cli-flow", "uploading", ["before-s3-put:3"], via="cli"))
    out.append(Scenario("double", "merging+uploading",
                        [f"tensor-written:{t // 2}", "after-s3-put:2"]))
    return out


@pytest.fixture(scope="module")
def s3_env():
    """moto's S3 on 127.0.0.1 with a bucket; the environment a child needs to reach it."""
    import boto3

    with moto_s3() as url:
        env = {**_AWS_ENV, "AWS_ENDPOINT_URL": url}
        client = boto3.session.Session(
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=env["AWS_DEFAULT_REGION"]).client("s3", endpoint_url=url)
        client.create_bucket(Bucket=BUCKET)
        yield env, client


def test_sigkill_anywhere_then_rerun_is_byte_identical(make_base, make_adapter, tmp_path,
                                                       s3_env, prefect_server):
    env, client = s3_env
    env = {**env, "PREFECT_API_URL": prefect_server}
    base = make_base("llama")
    adapter = make_adapter(base, target_modules=TARGETS)
    harness = Harness(tmp_path, base, adapter, env, client)

    clean_job = harness.job("clean", 0, None, "api")
    assert run_forked(clean_job) == 0, Path(clean_job["log"]).read_text()
    clean = json.loads(Path(clean_job["result"]).read_text())["report"]
    clean_out = Path(clean_job["out"])
    clean_files, clean_objects = files_of(clean_out), s3_objects(client, "clean")
    assert clean["shards"] >= 4 and set(clean_objects) == set(clean_files)
    plan = scenarios(clean["tensors"], clean["shards"], len(clean_objects))

    def play(scenario: Scenario) -> Scenario:
        final = harness.play(scenario)
        scenario.identical = (files_of(final["out"]) == clean_files
                              and s3_objects(client, final["prefix"]) == clean_objects)
        return scenario

    with ThreadPoolExecutor(max_workers=2) as pool:  # two kills at a time: 2 cores
        played = list(pool.map(play, plan))

    outcomes = [o for s in played for o in s.outcomes]
    kills = len(outcomes)
    corrupt = sum("corrupt" in o for o in outcomes)
    partial = sum(o[0] == "partial" for o in outcomes)
    stages = {}
    for s in played:
        stages[s.stage] = stages.get(s.stage, 0) + len(s.points)
    summary = (f"crash test: kills={kills} ({', '.join(f'{k} {v}' for k, v in stages.items())}; "
               f"{sum(s.via != 'api' for s in played)} through the CLI) "
               f"resumed={sum(s.resumed for s in played)} corrupt={corrupt} partial={partial} "
               f"reruns finished={len(played)} byte-identical={sum(s.identical for s in played)}"
               f"/{len(played)} (local files and S3 objects)")
    print("\n" + summary)
    for s in played:
        print(f"  {s.name:10} {s.via:6} {s.stage:17} {' then '.join(s.points):32} "
              f"after kill: {s.outcomes}  resumed={s.resumed}")
    assert kills >= 20
    assert corrupt == 0 and partial == 0
    assert all(s.identical for s in played), [s.name for s in played if not s.identical]
    # Kills in the upload stage leave a finished local output and an unmarked S3 prefix.
    for s in played:
        if s.stage == "uploading":
            assert s.outcomes[-1] == ("complete", "absent"), (s.name, s.outcomes)
