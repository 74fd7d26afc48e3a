"""``MergeOnTrainEnd`` (issue 13): a real ``Trainer`` trains a tiny Llama with LoRA on the CPU and
the callback merges in-process, or announces the adapter with the ``mergeflow.adapter.ready``
event (the session's real Prefect server) or a signed POST to the real webhook receiver (served
over HTTP); a merge failure is loud and ends the script with a non-zero exit status."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import pytest
from builders import model_config
from helpers import REPO, cli_env
from pydantic import SecretStr
from test_live import assert_same_logits, lora, train

import mergeflow
from mergeflow.errors import InputError
from mergeflow.live.callback import MARKER, MergeAfterTrainingError
from triggers.events import ADAPTER_READY
from triggers.training import PrefectEvent, Webhook

SECRET = "mergeflow-callback-test-secret-0b7e"


@pytest.fixture(scope="module")
def base_dir(make_base) -> Path:
    return make_base("llama")


@pytest.fixture(scope="module")
def tokenizer(base_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_dir)


def fresh_model(base_dir: Path):
    from transformers import AutoModelForCausalLM

    return lora(AutoModelForCausalLM.from_pretrained(base_dir))


def assert_finished_adapter(folder: Path) -> None:
    names = {p.name for p in folder.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", MARKER} <= names, names


# --------------------------------------------------------------------------- in-process


def test_callback_merges_at_train_end(base_dir, tokenizer, tmp_path, input_ids):
    model = fresh_model(base_dir)
    callback = mergeflow.MergeOnTrainEnd(out=tmp_path / "merged", max_shard_size="100KB")
    train(model, tmp_path / "run", tokenizer, callbacks=[callback])
    assert_finished_adapter(tmp_path / "run" / "adapter")
    assert callback.report.status == "merged" and callback.report.shards > 1
    assert (tmp_path / "merged" / "tokenizer.json").is_file()  # the trainer's tokenizer
    assert_same_logits(tmp_path / "merged", model, input_ids)


def test_a_failed_merge_is_loud_and_raised(base_dir, tokenizer, tmp_path, caplog):
    model = fresh_model(base_dir)
    callback = mergeflow.MergeOnTrainEnd(out=tmp_path / "merged", save_method="merged_4bit")
    with caplog.at_level(logging.ERROR, logger="mergeflow.live.callback"), \
            pytest.raises(MergeAfterTrainingError, match="adapter is saved in"):
        train(model, tmp_path / "run", tokenizer, callbacks=[callback])
    assert_finished_adapter(tmp_path / "run" / "adapter")  # nothing trained is lost
    error, = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "mergeflow merge --adapter" in error.getMessage() and "not quantized" in \
        error.getMessage()
    assert not (tmp_path / "merged").exists()


def test_the_exit_status_tells_the_truth(tmp_path):
    """The README's example script, run for real: exit 0 when merged, non-zero when not."""
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(REPO / "scripts" / "train_and_merge.py"),
                               *args], cwd=REPO, env=cli_env(), capture_output=True, text=True,
                              timeout=600, check=False)

    ok = run(str(tmp_path / "ok"))
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "base: read from" in ok.stdout
    for out in ("merged", "merged-by-callback"):
        assert (tmp_path / "ok" / out / "merge-manifest.json").is_file()
    failed = run(str(tmp_path / "bad"), "--save-method", "merged_4bit")
    assert failed.returncode != 0
    assert "MergeAfterTrainingError" in failed.stderr and "adapter is saved" in failed.stderr
    assert (tmp_path / "bad" / "run" / "adapter" / MARKER).is_file()


def test_a_handoff_without_a_readable_base_is_refused_before_training(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    model = lora(AutoModelForCausalLM.from_config(model_config("llama")))
    callback = mergeflow.MergeOnTrainEnd(out="/merged/x", notify=PrefectEvent())
    with pytest.raises(InputError, match="built in memory"):
        train(model, tmp_path / "run", tokenizer, callbacks=[callback])
    assert not (tmp_path / "run" / "adapter").exists()


# --------------------------------------------------------------------------- the Prefect event


def _events(api: str, resource: str) -> list[dict]:
    body = {"filter": {"event": {"name": [ADAPTER_READY]},
                       "resource": {"id": [resource]}, "order": "DESC"}, "limit": 10}
    answer = httpx.post(f"{api}/events/filter", json=body, timeout=30)
    answer.raise_for_status()
    return answer.json()["events"]


def test_event_mode_emits_adapter_ready(prefect_server, base_dir, tokenizer, tmp_path):
    model = fresh_model(base_dir)
    out = str(tmp_path / "merged-on-gpu-pool")
    callback = mergeflow.MergeOnTrainEnd(out=out, push_to="hf://acme/tiny",
                                         notify=PrefectEvent(target="cpu"), dtype="bfloat16")
    train(model, tmp_path / "run", tokenizer, callbacks=[callback])
    adapter = tmp_path / "run" / "adapter"
    assert_finished_adapter(adapter)
    resource = callback.answer["resource"]
    assert resource == f"mergeflow.cpu-adapter.{adapter}"
    deadline, events = time.monotonic() + 30, []
    while not events and time.monotonic() < deadline:
        events = _events(prefect_server, resource)
        time.sleep(0.25)
    event, = events
    assert event["id"] == callback.answer["event_id"]
    assert event["payload"] == {"adapter": str(adapter), "out": out, "base": str(base_dir),
                                "push_to": "hf://acme/tiny", "dtype": "bfloat16"}
    # announcing the same finished adapter again sends the same event id (a duplicate)
    again = PrefectEvent(target="cpu").announce(callback.request(model, adapter))
    assert again["event_id"] == event["id"]


def test_event_mode_refuses_options_the_trigger_drops(tmp_path, base_dir):
    request = {"adapter": str(tmp_path), "out": "/o", "base": str(base_dir), "push_to": None,
               "options": {"max_shard_size": "1GB"}}
    with pytest.raises(InputError, match="Webhook"):
        PrefectEvent(api_url="http://127.0.0.1:9/api").announce(request)


# --------------------------------------------------------------------------- the webhook


def stand_in_merge_adapter(spec: mergeflow.MergeSpec) -> None:
    """The merge flow's signature (its parameter schema) without its body."""


@pytest.fixture(scope="module")
def receiver(prefect_server):
    """``mergeflow webhook serve``'s app on a real port, starting runs of a deployment with the
    merge flow's enforced parameter schema (no worker runs them)."""
    from helpers import ServedReceiver
    from prefect import flow

    from triggers.webhook import WebhookSettings

    name = f"callback-test-{uuid.uuid4().hex[:8]}"
    flow(stand_in_merge_adapter, name="merge-adapter").to_deployment(
        name=name, enforce_parameter_schema=True).apply()
    # both routes to the one deployment: device cpu (no target) picks the CPU route
    settings = WebhookSettings(deployment=f"merge-adapter/{name}",
                               cpu_deployment=f"merge-adapter/{name}", api_url=prefect_server,
                               training_secret=SecretStr(SECRET),
                               allowed_roots=[tempfile.gettempdir()])  # where pytest's folders are
    with ServedReceiver(settings) as served:
        yield f"{served.url}/hooks/training"


def _flow_run(run_id: str):
    from prefect.client.orchestration import get_client

    async def read():
        async with get_client() as prefect:
            return await prefect.read_flow_run(run_id)

    return asyncio.run(read())


def test_webhook_mode_starts_one_merge_run(receiver, base_dir, tokenizer, tmp_path):
    model = fresh_model(base_dir)
    out = str(tmp_path / "merged-on-gpu-pool")
    callback = mergeflow.MergeOnTrainEnd(out=out, notify=Webhook(receiver, secret=SECRET),
                                         max_shard_size="1GB", device="cpu")
    train(model, tmp_path / "run", tokenizer, callbacks=[callback])
    adapter = tmp_path / "run" / "adapter"
    run = _flow_run(callback.answer["flow_run_id"])
    spec = run.parameters["spec"]
    assert (spec["adapter"], spec["out"], spec["base"]) == (str(adapter), out, str(base_dir))
    assert spec["max_shard_size"] == "1GB" and spec["device"] == "cpu"
    again = Webhook(receiver, secret=SECRET).announce(callback.request(model, adapter))
    assert again["flow_run_id"] == callback.answer["flow_run_id"]  # a redelivery, same run


def test_webhook_with_the_wrong_secret_fails_the_training_script(receiver, base_dir, tokenizer,
                                                                tmp_path):
    model = fresh_model(base_dir)
    callback = mergeflow.MergeOnTrainEnd(out=str(tmp_path / "m"),
                                         notify=Webhook(receiver, secret="not-the-secret"))
    with pytest.raises(MergeAfterTrainingError, match="HTTP 401"):
        train(model, tmp_path / "run", tokenizer, callbacks=[callback])
    assert_finished_adapter(tmp_path / "run" / "adapter")
