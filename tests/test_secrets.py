"""No secret reaches a log (issue 8).

The end-to-end merge with publishing to S3 (moto's server over HTTP) runs twice - through the real
CLI and the Prefect flow (session Prefect server, Prefect logging at DEBUG, Mergeflow's own
loggers shipped to the Prefect API at INFO), and through the Python API (Mergeflow's loggers at
DEBUG) - with distinctive AWS keys, an HF_TOKEN and
MERGEFLOW_WEBHOOK_SECRET in the environment, plus a failing publish to a missing bucket. None of
the values may appear in stdout, stderr, the flow runs' logs, parameters and artifacts as the
Prefect API returns them, the output files or the published objects.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid

import pytest
from helpers import REPO, cli_command
from s3_server import _AWS_ENV, moto_s3

BUCKET = "secrets"
TOKEN = uuid.uuid4().hex[:12]
SECRETS = {
    "AWS_SECRET_ACCESS_KEY": f"mfAwsSecret{TOKEN}",
    "AWS_SESSION_TOKEN": f"mfAwsSession{TOKEN}",
    "HF_TOKEN": f"hf_mfHubToken{TOKEN}",
    "HUGGING_FACE_HUB_TOKEN": f"hf_mfLegacyToken{TOKEN}",
    "MERGEFLOW_WEBHOOK_SECRET": f"mfWebhookSecret{TOKEN}",
}
API_SCRIPT = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                    format="%(levelname)s %(name)s: %(message)s")
logging.getLogger("mergeflow").setLevel(logging.DEBUG)
import mergeflow
from mergeflow.errors import MergeError
base, adapter, out, dest, missing = sys.argv[1:6]
report = mergeflow.merge(base, adapter, out, push_to=dest)
print(report.model_dump_json())
try:
    mergeflow.merge(base, adapter, out, push_to=missing)
except MergeError as exc:
    print(f"expected failure: {type(exc).__name__}: {exc}")
    logging.getLogger("mergeflow.test").exception("the publish failed")
"""


@pytest.fixture(scope="module")
def s3_url():
    import boto3

    with moto_s3() as url:
        client = boto3.session.Session(
            aws_access_key_id="setup", aws_secret_access_key="setup",
            region_name="us-east-1").client("s3", endpoint_url=url)
        client.create_bucket(Bucket=BUCKET)
        yield url, client


def _env(url: str, prefect_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(_AWS_ENV, **SECRETS, AWS_ENDPOINT_URL=url, PREFECT_API_URL=prefect_url,
               PREFECT_LOGGING_LEVEL="DEBUG", PREFECT_LOGGING_EXTRA_LOGGERS="mergeflow",
               PREFECT_LOGGING_ROOT_LEVEL="INFO",
               PYTHONWARNINGS="ignore", NO_COLOR="1")
    return env


def _prefect_records(out_paths: list[str]) -> tuple[list[str], int]:
    """Every log message, flow-run parameter set and artifact the Prefect API holds, as text;
    and how many of this test's flow-run log lines came from Mergeflow's own loggers."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    async def read() -> tuple[list[str], int]:
        texts: list[str] = []
        async with get_client() as client:
            runs = await client.read_flow_runs(limit=200)
            ours = [r.id for r in runs if any(p in str(r.parameters) for p in out_paths)]
            texts += [f"{r.name} {r.parameters}" for r in runs]
            ours_logs = await client.read_logs(log_filter=LogFilter(
                flow_run_id=LogFilterFlowRunId(any_=ours))) if ours else []
            offset = 0
            while page := await client.read_logs(limit=200, offset=offset):
                texts += [f"{log.name} {log.message}" for log in page]
                offset += len(page)
            texts += [f"{a.key} {a.data} {a.description}" for a in await client.read_artifacts()]
        return texts, sum(log.name.startswith("mergeflow") for log in ours_logs)

    return asyncio.run(read())


def test_no_secret_in_any_output(make_base, make_adapter, tmp_path, s3_url, prefect_server):
    url, client = s3_url
    base = make_base("llama")
    adapter = make_adapter(base, target_modules=["q_proj", "v_proj"])
    env = _env(url, prefect_server)
    cli_out, api_out = tmp_path / "cli-out", tmp_path / "api-out"
    cli = subprocess.Popen(
        cli_command("merge", "--base", str(base), "--adapter", str(adapter), "--out", str(cli_out),
                    "--push-to", f"s3://{BUCKET}/cli", "--workers", "1"),
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    api = subprocess.Popen(
        [sys.executable, "-c", API_SCRIPT, str(base), str(adapter), str(api_out),
         f"s3://{BUCKET}/api", f"s3://missing-{TOKEN.lower()}/x"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cli_stdout, cli_stderr = cli.communicate(timeout=600)
    api_stdout, api_stderr = api.communicate(timeout=600)
    assert cli.returncode == 0, cli_stderr
    assert api.returncode == 0, api_stderr
    assert "published to" in cli_stdout
    # the error path ran too: --out was up to date, so the failed push is an UploadError
    assert "expected failure: UploadError" in api_stdout
    assert "DEBUG mergeflow" in api_stderr or "INFO mergeflow" in api_stderr  # logs were on

    # The credentials were really used: the objects are there.
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=BUCKET)["Contents"]}
    assert {"cli/merge-manifest.json", "api/merge-manifest.json"} <= keys

    records, our_logs = _prefect_records([str(cli_out)])
    assert our_logs > 0, "Mergeflow's log lines did not reach the Prefect API"
    texts = {"cli stdout": cli_stdout, "cli stderr": cli_stderr, "api stdout": api_stdout,
             "api stderr": api_stderr, "prefect": "\n".join(records)}
    for folder in (cli_out, api_out):
        for path in folder.iterdir():
            texts[str(path)] = path.read_bytes().decode("latin-1")
    for key in sorted(keys):
        got = client.get_object(Bucket=BUCKET, Key=key)
        texts[f"s3://{BUCKET}/{key}"] = (got["Body"].read().decode("latin-1")
                                         + str(got.get("Metadata")))
    leaks = [(where, name) for where, text in texts.items() for name, value in SECRETS.items()
             if value in text]
    assert not leaks, leaks
