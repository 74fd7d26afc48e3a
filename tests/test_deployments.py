"""deployments/prefect.yaml, the Kubernetes pool template, the finished-adapter scan and the
watcher flow (issue 7). The watcher runs against the session's Prefect server; the merge runs it
starts are only created here (no worker): tests/scenarios/test_e2e_prefect.py executes them for real."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import yaml
from helpers import REPO

from mergeflow.errors import SourceError
from mergeflow.output.folder import MANIFEST
from mergeflow.spec import MergeSpec
from mergeflow.storage.hashing import HashCache
from triggers import finished
from triggers.finished import find_local, merged_already

PREFECT_YAML = REPO / "deployments" / "prefect.yaml"
K8S_TEMPLATE = REPO / "deployments" / "work-pools" / "kubernetes-gpu.json"


@pytest.fixture(scope="module")
def prefect_yaml() -> dict:
    return yaml.safe_load(PREFECT_YAML.read_text())


def _deployment(doc: dict, name: str) -> dict:
    return next(d for d in doc["deployments"] if d["name"] == name)


def _render_trigger(trigger: dict, payload: dict) -> dict:
    """The trigger's parameters rendered for an event, by the server's own code path."""
    from prefect.server.events.actions import RunDeployment
    from prefect.utilities.schema_tools.hydration import HydrationContext, hydrate

    params = copy.deepcopy(trigger["parameters"])
    RunDeployment._upgrade_v1_templates(params)
    context = HydrationContext(render_jinja=True, raise_on_error=True,
                               jinja_context={"event": {"payload": payload}})
    return hydrate(params, context)


# --------------------------------------------------------------------------- prefect.yaml


def test_merge_deployments_are_complete(prefect_yaml):
    gpu = _deployment(prefect_yaml, "merge-adapter")
    cpu = _deployment(prefect_yaml, "merge-adapter-cpu")
    for dep, pool in ((gpu, "gpu"), (cpu, "cpu")):
        assert dep["entrypoint"] == "flows/merge.py:merge_adapter"
        assert dep["work_pool"]["name"] == pool
        assert dep["enforce_parameter_schema"] is True
        assert dep["concurrency_limit"]["limit"] >= 1
        assert "mergeflow" in dep["tags"]
        # the defaults are valid MergeSpec fields (adapter and out come from each trigger)
        MergeSpec(adapter="a", out="o", **dep["parameters"]["spec"])
    assert gpu["parameters"]["spec"]["device"] == "cuda"
    assert cpu["parameters"]["spec"]["device"] == "cpu"
    pull = prefect_yaml["pull"][0]["prefect.deployments.steps.set_working_directory"]
    assert pull["directory"] == "{{ checkout.stdout }}"


def test_batch_deployments_mirror_the_merge_deployments(prefect_yaml):
    """``merge-adapters`` (gpu) and ``merge-adapters-cpu`` run the batch flow with the
    defaults of the single merge deployments on the same pools; the defaults layer under a
    batch run's shared options as they do under a single run's spec."""
    from flows.batch import merge_adapters
    from flows.parameters import layered

    for batch_name, single_name in (("merge-adapters", "merge-adapter"),
                                    ("merge-adapters-cpu", "merge-adapter-cpu")):
        batch, single = _deployment(prefect_yaml, batch_name), _deployment(prefect_yaml,
                                                                           single_name)
        assert batch["entrypoint"] == "flows/batch.py:merge_adapters"
        assert batch["work_pool"] == single["work_pool"]
        assert batch["parameters"]["spec"] == single["parameters"]["spec"]
        assert batch["enforce_parameter_schema"] is True
        assert batch["concurrency_limit"] == single["concurrency_limit"]
        assert "mergeflow" in batch["tags"]
        assert set(batch["parameters"]) <= set(merge_adapters.parameters.properties)
        spec = layered(batch["parameters"]["spec"], {"adapter": "/a", "out": "/o"})
        assert spec.device == single["parameters"]["spec"]["device"]
    watch = _deployment(prefect_yaml, "watch-adapters")["parameters"]
    assert watch["batch_deployment"] == "merge-adapters/merge-adapters"
    assert watch["window_seconds"] == 0  # one run per adapter unless a window is chosen


def test_the_run_form_asks_for_the_spec_alone():
    """The deployment's parameter schema (what the UI's run form renders) has ``spec`` and
    nothing internal: the CLI hands its planned merge to the flow beside the parameters."""
    from flows.merge import merge_adapter

    schema = merge_adapter.parameters.model_dump()
    assert set(schema["properties"]) == {"spec"}


def test_event_triggers_route_and_template_the_spec(prefect_yaml):
    gpu = _deployment(prefect_yaml, "merge-adapter")["triggers"][0]
    cpu = _deployment(prefect_yaml, "merge-adapter-cpu")["triggers"][0]
    assert gpu["expect"] == cpu["expect"] == ["mergeflow.adapter.ready"]
    assert gpu["match"] == {"prefect.resource.id": "mergeflow.adapter.*"}
    assert cpu["match"] == {"prefect.resource.id": "mergeflow.cpu-adapter.*"}

    minimal = _render_trigger(gpu, {"adapter": "/a", "out": "/o", "dtype": None,
                                    "note": "not a spec field"})["spec"]
    assert minimal == {"adapter": "/a", "out": "/o"}  # no null, no key the spec does not have
    # fields left out keep the deployment's defaults (the flow layers the run's spec over them)
    from flows.parameters import layered

    spec = layered(_deployment(prefect_yaml, "merge-adapter")["parameters"]["spec"], minimal)
    assert (spec.device, spec.workers, spec.dtype) == ("cuda", 4, "auto")
    full = _render_trigger(cpu, {"adapter": "hf://o/a@1", "out": "/o", "base": "/b",
                                 "push_to": "s3://bk/m", "dtype": "bfloat16",
                                 "device": "cuda"})["spec"]
    assert full["base"] == "/b" and full["push_to"] == "s3://bk/m"
    assert full["dtype"] == "bfloat16" and full["device"] == "cpu"  # the CPU deployment stays CPU
    assert layered(_deployment(prefect_yaml, "merge-adapter-cpu")["parameters"]["spec"],
                   full).workers == 2


def test_event_payload_uses_the_spec_names_and_still_reads_destination(prefect_yaml):
    """Payloads carry MergeSpec's field names (``push_to``); ``destination``, its old name, is
    a deprecated alias the triggers still read, and ``push_to`` wins over it."""
    from triggers.events import adapter_ready_event, adapter_ready_payload

    payload = adapter_ready_payload("/a", "/o", push_to="s3://bk/m", dtype="bfloat16")
    assert payload == {"adapter": "/a", "out": "/o", "push_to": "s3://bk/m", "dtype": "bfloat16"}
    assert adapter_ready_event("/a", "/o", push_to="s3://bk/m")[0]["payload"]["push_to"] == \
        "s3://bk/m"
    assert set(payload) <= set(MergeSpec.model_fields)
    gpu = _deployment(prefect_yaml, "merge-adapter")["triggers"][0]
    assert _render_trigger(gpu, payload)["spec"]["push_to"] == "s3://bk/m"
    old = {"adapter": "/a", "out": "/o", "destination": "s3://old/m"}
    assert _render_trigger(gpu, old)["spec"]["push_to"] == "s3://old/m"
    both = {**old, "push_to": "s3://new/m"}
    assert _render_trigger(gpu, both)["spec"]["push_to"] == "s3://new/m"
    every = {k: "x" for k in MergeSpec.model_fields}
    assert set(_render_trigger(gpu, every)["spec"]) <= set(MergeSpec.model_fields)


def test_the_run_form_shows_types_dropdowns_and_required_fields_not_null_toggles(prefect_yaml):
    """What the UI renders for ``spec``: no field offers null (no str/None toggle, no
    "(Optional)" label), an enum is a dropdown of its values, adapter and out are required, no
    default overrides the deployment's; a rendered trigger's spec passes the server's own check
    of the schema, and the deployments' default specs do too."""
    from prefect.utilities.schema_tools.validation import validate

    from flows.batch import merge_adapters
    from flows.merge import merge_adapter

    for flow, required in ((merge_adapter, ["adapter", "out"]), (merge_adapters, ["out"])):
        schema = flow.parameters.model_dump()
        definitions = schema.get("definitions") or schema["$defs"]
        request = definitions[next(n for n in definitions if n.endswith("Request"))]
        assert request["required"] == required
        for name, prop in request["properties"].items():
            assert "anyOf" not in prop and prop.get("type") != "null", name
            assert "default" not in prop, name
        assert request["properties"]["save_method"]["enum"][0] == "merged_16bit"
        assert request["properties"]["device"] == {**request["properties"]["device"],
                                                   "type": "string", "enum": ["cpu", "cuda"]}
    schema = merge_adapter.parameters.model_dump()
    for name in ("merge-adapter", "merge-adapter-cpu"):
        dep = _deployment(prefect_yaml, name)
        spec = _render_trigger(dep["triggers"][0], {"adapter": "/a", "out": "/o", "base": None})
        assert validate(spec, schema, ignore_required=False) == []
        assert validate(dep["parameters"], schema, ignore_required=True) == []
    assert validate({"spec": {"adapter": "/a", "out": "/o", "device": None}}, schema) != []


def test_watcher_deployment(prefect_yaml):
    from prefect.client.schemas.schedules import CronSchedule

    watch = _deployment(prefect_yaml, "watch-adapters")
    assert watch["entrypoint"] == "flows/watch.py:merge_new_adapters"
    assert watch["concurrency_limit"]["collision_strategy"] == "CANCEL_NEW"
    schedule = watch["schedules"][0]
    CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])
    from flows.watch import merge_new_adapters

    names = set(merge_new_adapters.parameters.properties)
    assert set(watch["parameters"]) <= names
    assert {"location", "out_root", "push_root"} <= names


def test_deploy_script_is_valid_bash():
    script = REPO / "deployments" / "deploy.sh"
    assert script.stat().st_mode & 0o111
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "work-pool create gpu" in text and "concurrency-limit create gpu" in text
    assert "deploy --no-prompt --all --prefect-file deployments/prefect.yaml" in text
    assert "merge-adapters/merge-adapters" in text  # the batch deployment's usage line


# --------------------------------------------------------------------------- Kubernetes pool


def test_kubernetes_template_requests_gpus_with_selector_and_tolerations():
    from prefect.utilities.templating import apply_values, find_placeholders

    template = json.loads(K8S_TEMPLATE.read_text())
    variables = template["variables"]["properties"]
    used = {p.name for p in find_placeholders(template["job_configuration"])}
    assert used <= set(variables), used - set(variables)
    defaults = {k: v["default"] for k, v in variables.items() if "default" in v}
    job = apply_values(template["job_configuration"], defaults)["job_manifest"]
    pod = job["spec"]["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_kubernetes_pool_is_accepted_by_the_server(prefect_server):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    template = json.loads(K8S_TEMPLATE.read_text())

    async def create():
        async with get_client() as client:
            pool = await client.create_work_pool(WorkPoolCreate(
                name=f"k8s-{uuid.uuid4().hex[:8]}", type="kubernetes", base_job_template=template))
            return await client.read_work_pool(pool.name)

    pool = asyncio.run(create())
    assert pool.base_job_template["variables"]["properties"]["gpu_count"]["default"] == 1


# --------------------------------------------------------------------------- finished adapters


def _finished_adapter(adapter: Path, root: Path, name: str, marker: str = "_COMPLETE") -> Path:
    folder = root / name
    shutil.copytree(adapter, folder)
    if marker:
        (folder / marker).write_text("{}")
    return folder


@pytest.fixture(scope="module")
def tiny_adapter(make_base, make_adapter) -> tuple[Path, Path]:
    base = make_base("llama")
    return base, make_adapter(base)


def test_scan_finds_only_finished_adapters(tiny_adapter, tmp_path):
    _, adapter = tiny_adapter
    root = tmp_path / "inbox"
    root.mkdir()
    _finished_adapter(adapter, root, "done-marker")
    _finished_adapter(adapter, root, "done-trainer", marker="trainer_state.json")
    _finished_adapter(adapter, root, "still-training", marker="")
    _finished_adapter(adapter, root, "checkpoint-500", marker="trainer_state.json")
    _finished_adapter(adapter, root, ".hidden")
    no_weights = _finished_adapter(adapter, root, "no-weights")
    (no_weights / "adapter_model.safetensors").unlink()
    (root / "stray-file.txt").write_text("x")

    cache = HashCache(tmp_path / "hashes.json")
    found = find_local(root, cache=cache)
    assert [a.name for a in found] == ["done-marker", "done-trainer"]
    marker = root / "done-marker" / "_COMPLETE"
    assert found[0].finished_at == marker.stat().st_mtime  # the marker is its newest file
    assert finished.adapter_base(found[0]) == str(json.loads(
        (adapter / "adapter_config.json").read_text())["base_model_name_or_path"])
    assert found[0].ref == str((root / "done-marker").resolve())
    assert found[0].key.startswith("mergeflow-watch:")
    # stable across scans; different per location; changed by new weights
    assert find_local(root, cache=cache) == found
    assert found[0].fingerprint != found[1].fingerprint
    weights = root / "done-marker" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes() + b"\0")
    assert find_local(root, cache=cache)[0].fingerprint != found[0].fingerprint
    assert [a.name for a in find_local(root, markers=("trainer_state.json",), cache=cache)] == [
        "done-trainer"]


def test_scan_rejects_missing_folder_and_other_schemes(tmp_path):
    with pytest.raises(SourceError, match="not a folder"):
        finished.find_finished(str(tmp_path / "nope"))
    with pytest.raises(SourceError, match="s3://"):
        finished.find_finished("hf://org/name")


def test_merged_already_reads_the_local_manifest(tmp_path):
    assert not merged_already("a", str(tmp_path))
    (tmp_path / "a").mkdir()
    assert not merged_already("a", str(tmp_path))
    (tmp_path / "a" / MANIFEST).write_text('{"files": {}}')
    assert merged_already("a", str(tmp_path))


def test_scan_and_manifest_check_on_s3(tiny_adapter):
    from s3_server import aws_test_env, moto_s3, new_bucket

    from mergeflow.remote.fetch import s3_client

    _, adapter = tiny_adapter
    with aws_test_env(), moto_s3() as endpoint:
        client = s3_client(endpoint)
        bucket = new_bucket(client)
        for name, marker in (("ready", "_COMPLETE"), ("busy", None), ("checkpoint-9", "_COMPLETE")):
            for path in adapter.iterdir():
                client.upload_file(str(path), bucket, f"inbox/{name}/{path.name}")
            if marker:
                client.put_object(Bucket=bucket, Key=f"inbox/{name}/{marker}", Body=b"")
        found = finished.find_finished(f"s3://{bucket}/inbox", client=client)
        assert [(a.name, a.ref) for a in found] == [("ready", f"s3://{bucket}/inbox/ready")]
        assert abs(found[0].finished_at - time.time()) < 600  # LastModified of its files
        assert finished.adapter_base(found[0], client=client) == json.loads(
            (adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
        assert finished.find_s3(f"s3://{bucket}/inbox", client=client) == found
        client.put_object(Bucket=bucket, Key="inbox/ready/adapter_config.json", Body=b"{}")
        assert finished.find_s3(f"s3://{bucket}/inbox", client=client)[0].fingerprint != \
            found[0].fingerprint

        push_root = f"s3://{bucket}/merged"
        assert not merged_already("ready", "/unused", push_root, client=client)
        client.put_object(Bucket=bucket, Key=f"merged/ready/{MANIFEST}", Body=b"{}")
        assert merged_already("ready", "/unused", push_root, client=client)


# --------------------------------------------------------------------------- watcher flow


def stand_in_merge_adapter(spec: MergeSpec) -> None:
    """The merge flow's signature (its parameter schema) without its body: these runs are only
    created, never executed."""


@pytest.fixture(scope="module")
def merge_deployment(prefect_server) -> str:
    """A ``merge-adapter`` deployment on the session server with the real parameter schema
    (enforced) and a default spec; no worker serves it."""
    from prefect import flow

    name = f"watch-test-{uuid.uuid4().hex[:8]}"
    flow(stand_in_merge_adapter, name="merge-adapter").to_deployment(
        name=name, parameters={"spec": {"workers": 3}}, enforce_parameter_schema=True).apply()
    return f"merge-adapter/{name}"


def _runs_of(deployment: str) -> list:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    async def read():
        async with get_client() as client:
            return await client.read_flow_runs(deployment_filter=DeploymentFilter(
                name=DeploymentFilterName(any_=[deployment.split("/")[1]])))

    return asyncio.run(read())


def test_watcher_starts_each_new_adapter_once(tiny_adapter, merge_deployment, tmp_path):
    from flows.watch import merge_new_adapters

    base, adapter = tiny_adapter
    inbox, out_root = tmp_path / "inbox", tmp_path / "merged"
    inbox.mkdir()
    _finished_adapter(adapter, inbox, "alpha")
    _finished_adapter(adapter, inbox, "beta")
    _finished_adapter(adapter, inbox, "gamma", marker="")  # not finished
    (out_root / "beta").mkdir(parents=True)
    (out_root / "beta" / MANIFEST).write_text("{}")  # already merged

    kwargs = dict(location=str(inbox), out_root=str(out_root), deployment=merge_deployment,
                  options={"base": str(base), "device": "cpu"})
    first = merge_new_adapters(**kwargs)
    second = merge_new_adapters(**kwargs)  # an overlapping schedule: the same run comes back
    assert [r["adapter"] for r in first] == [str((inbox / "alpha").resolve())]
    assert [r["flow_run_id"] for r in second] == [r["flow_run_id"] for r in first]
    runs = [r for r in _runs_of(merge_deployment)
            if r.parameters["spec"]["adapter"].startswith(str(inbox.resolve()))]
    assert len(runs) == 1
    spec = runs[0].parameters["spec"]
    assert spec["adapter"] == str((inbox / "alpha").resolve())
    assert spec["out"] == str((out_root / "alpha").resolve())
    assert spec["base"] == str(base) and spec["device"] == "cpu"
    assert spec["workers"] == 3  # the deployment's default, under the watcher's fields
    assert runs[0].idempotency_key.startswith("mergeflow-watch:")


def test_watcher_retries_a_failed_merge_under_the_next_key(tiny_adapter, merge_deployment,
                                                           tmp_path):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.states import Failed

    from flows.watch import merge_new_adapters

    _, adapter = tiny_adapter
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    _finished_adapter(adapter, inbox, "delta")
    kwargs = dict(location=str(inbox), out_root=str(tmp_path / "merged"),
                  deployment=merge_deployment, options={"device": "cpu"}, attempts=2)
    first = merge_new_adapters(**kwargs)[0]

    async def fail(run_id: str):
        async with get_client() as client:
            await client.set_flow_run_state(run_id, Failed(), force=True)

    asyncio.run(fail(first["flow_run_id"]))
    retry = merge_new_adapters(**kwargs)[0]
    assert retry["flow_run_id"] != first["flow_run_id"]
    asyncio.run(fail(retry["flow_run_id"]))
    # attempts exhausted: the last attempt's run is reported, nothing new is started
    assert merge_new_adapters(**kwargs)[0]["flow_run_id"] == retry["flow_run_id"]


# --------------------------------------------------------------------------- watcher window


def test_groups_by_base_wait_for_the_newest_and_key_by_sorted_fingerprints():
    from triggers.finished import AdapterGroup, FinishedAdapter, group_by_base

    a, b, c, d = (FinishedAdapter(n, f"/in/{n}", f"fp-{n}", t)
                  for n, t in (("b-ckpt", 100.0), ("a-ckpt", 130.0), ("other", 50.0),
                               ("broken", 10.0)))
    groups = group_by_base([a, b, c, d], ["/base", "/base", "/base-2", None])
    assert [(g.base, [x.name for x in g.adapters]) for g in groups] == [
        ("/base", ["a-ckpt", "b-ckpt"]), (None, ["broken"]), ("/base-2", ["other"])]
    both = groups[0]
    assert both.newest == 130.0
    assert not both.ready(now=200.0, window_seconds=600) and both.ready(730.0, 600)
    assert both.key.startswith("mergeflow-watch-batch:")
    assert both.key == AdapterGroup("/base", (a, b)).key  # the order does not matter
    assert both.key != AdapterGroup("/base", (a, b, c)).key
    assert groups[2].key == c.key  # a group of one is that adapter's single merge


@pytest.fixture(scope="module")
def batch_deployment(prefect_server) -> str:
    """A ``merge-adapters`` deployment of the real batch flow on the session server (its
    parameter schema enforced) with a default spec; no worker serves it."""
    from flows.batch import merge_adapters

    name = f"watch-batch-{uuid.uuid4().hex[:8]}"
    merge_adapters.to_deployment(name=name, parameters={"spec": {"workers": 3}},
                                 enforce_parameter_schema=True).apply()
    return f"merge-adapters/{name}"


def _age(folder: Path, seconds: int) -> None:
    """Every file of an adapter folder finished ``seconds`` ago."""
    import os
    import time

    past = time.time() - seconds
    for path in folder.iterdir():
        os.utime(path, (past, past))


def _other_base(folder: Path, base: str) -> None:
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config,
                                                            "base_model_name_or_path": base}))


def test_watcher_window_holds_a_fresh_group_then_starts_one_batch_run_once(
        tiny_adapter, merge_deployment, batch_deployment, tmp_path):
    from flows.watch import merge_new_adapters, start_batch
    from triggers.finished import find_local, group_by_base

    base, adapter = tiny_adapter
    inbox, out_root = tmp_path / "inbox", tmp_path / "merged"
    inbox.mkdir()
    for name in ("ckpt-2", "ckpt-1"):
        _finished_adapter(adapter, inbox, name)
    _other_base(_finished_adapter(adapter, inbox, "elsewhere"), str(tmp_path / "base-2"))
    kwargs = dict(location=str(inbox), out_root=str(out_root), deployment=merge_deployment,
                  batch_deployment=batch_deployment, window_seconds=600,
                  options={"device": "cpu"}, push_root=None)

    assert merge_new_adapters(**kwargs) == []  # every group finished just now: held back
    assert not _runs_in(batch_deployment, inbox) and not _runs_in(merge_deployment, inbox)

    for name in ("ckpt-1", "ckpt-2"):
        _age(inbox / name, 3600)  # the window has passed for base 1, not for "elsewhere"
    first = merge_new_adapters(**kwargs)
    refs = [str((inbox / n).resolve()) for n in ("ckpt-1", "ckpt-2")]
    assert [r["adapters"] for r in first] == [refs]
    again = merge_new_adapters(**kwargs)  # the run works on them: nothing new starts
    assert again == []
    runs = _runs_in(batch_deployment, inbox)
    assert len(runs) == 1 and not _runs_in(merge_deployment, inbox)
    run = runs[0]
    assert str(run.id) == first[0]["flow_run_id"]
    assert run.parameters["adapters"] == refs
    assert run.parameters["out_names"] == ["ckpt-1", "ckpt-2"]
    assert run.parameters["spec"]["out"] == str(out_root.resolve())
    assert run.parameters["spec"]["device"] == "cpu" and run.parameters["spec"]["workers"] == 3
    assert "adapter" not in run.parameters["spec"]
    assert run.idempotency_key.startswith("mergeflow-watch-batch:")
    # two watchers that both saw the group before either started it share the one run
    ready = [g for g in group_by_base(find_local(inbox), [str(base)] * 2 + [None])
             if len(g.adapters) == 2]
    twin = start_batch.fn(ready[0], {"out": str(out_root.resolve()), "device": "cpu"},
                          batch_deployment, 3)
    assert twin["flow_run_id"] == first[0]["flow_run_id"]

    _age(inbox / "elsewhere", 3600)  # its own base, a group of one: its single merge
    last = merge_new_adapters(**kwargs)
    assert [r["adapter"] for r in last] == [str((inbox / "elsewhere").resolve())]
    assert len(_runs_in(merge_deployment, inbox)) == 1
    assert len(_runs_in(batch_deployment, inbox)) == 1


def test_watcher_window_retries_a_failed_batch_under_the_next_key(
        tiny_adapter, merge_deployment, batch_deployment, tmp_path):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.states import Failed

    from flows.watch import merge_new_adapters

    _, adapter = tiny_adapter
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for name in ("one", "two"):
        _age(_finished_adapter(adapter, inbox, name), 3600)
    kwargs = dict(location=str(inbox), out_root=str(tmp_path / "merged"),
                  deployment=merge_deployment, batch_deployment=batch_deployment,
                  window_seconds=60, attempts=2)
    first = merge_new_adapters(**kwargs)[0]

    async def fail(run_id: str):
        async with get_client() as client:
            await client.set_flow_run_state(run_id, Failed(), force=True)

    asyncio.run(fail(first["flow_run_id"]))
    retry = merge_new_adapters(**kwargs)[0]  # no longer in flight: the group's next attempt
    assert retry["flow_run_id"] != first["flow_run_id"]
    keys = {str(r.id): r.idempotency_key for r in _runs_in(batch_deployment, inbox)}
    assert keys[retry["flow_run_id"]] == f"{keys[first['flow_run_id']]}#2"


def _runs_in(deployment: str, inbox: Path) -> list:
    """The runs of ``deployment`` for adapters under ``inbox``."""
    from triggers.launch import run_adapters

    root = str(inbox.resolve())
    return [r for r in _runs_of(deployment)
            if any(a.startswith(root) for a in run_adapters(r.parameters))]
