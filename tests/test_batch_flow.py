"""The batch flow ``merge-adapters`` (issue 25, item 4): several adapters of one base in one
Prefect flow run, against a real (temporary) Prefect server. Each output is compared with the
single merge of its adapter (every file's bytes) and with ``merge_many``'s; every output has
its own artifacts; a refused adapter fails the run with one line and writes nothing; a partial
failure keeps the finished outputs published and names them."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from helpers import REPO, cli_command, cli_env, snapshot
from test_flow import _artifacts, _logs

import mergeflow
from mergeflow.errors import OutputError

pytestmark = pytest.mark.usefixtures("prefect_server")

SHARD = "40KB"  # several output shards, so the sweep interleaves the outputs


@pytest.fixture(scope="module")
def two_adapters(make_base, make_adapter):
    """A sharded base, a plain LoRA and a DoRA adapter with the head."""
    base = make_base("llama", max_shard_size="60KB")
    plain = make_adapter(base, seed=11, target_modules=["q_proj", "v_proj"])
    dora = make_adapter(base, seed=12, use_dora=True,
                        target_modules=["o_proj", "down_proj", "lm_head"])
    return base, [plain, dora]


def _files(folder: Path) -> dict[str, bytes]:
    """Every file of an output, by name, with its bytes."""
    return {name: data for name, (_, _, data) in snapshot(folder).items() if name != "."}


def test_the_batch_flow_writes_what_single_merges_and_merge_many_write(two_adapters, tmp_path):
    from flows.batch import merge_adapters
    from flows.merge import artifact_key

    base, adapters = two_adapters
    root = tmp_path / "flow"
    state = merge_adapters([str(a) for a in adapters],
                           {"base": str(base), "out": str(root), "max_shard_size": SHARD},
                           ["plain", "dora"], return_state=True)
    assert state.is_completed()
    reports = state.result()  # the persisted result: one report per output, by output folder
    outs = [str(root / "plain"), str(root / "dora")]
    assert list(reports) == outs
    many = mergeflow.merge_many(base, {tmp_path / "many" / "plain": adapters[0],
                                       tmp_path / "many" / "dora": adapters[1]},
                                max_shard_size=SHARD)
    assert len(many) == 2
    artifacts = _artifacts(state.state_details.flow_run_id)
    for out, adapter in zip(outs, adapters, strict=True):
        name = Path(out).name
        single = tmp_path / "single" / name
        mergeflow.merge(base, adapter, single, max_shard_size=SHARD)
        assert len(list(Path(out).glob("*.safetensors"))) > 2  # several shards swept
        assert _files(Path(out)) == _files(single) == _files(tmp_path / "many" / name), name
        report = reports[out]
        assert report.status == "merged" and report.out == out
        assert report.verification.startswith("verification passed:")
        assert report.manifest_sha256 == mergeflow.pipeline.sha256_file(
            Path(out) / "merge-manifest.json")
        markdown = artifacts[artifact_key("merge-report", out)].data
        assert f"- adapter: `{adapter}`" in markdown and "passed" in markdown
        assert f"- output: `{out}`" in markdown
        assert "q_proj" in str(artifacts[artifact_key("delta-norms", out)].data) or \
            "o_proj" in str(artifacts[artifact_key("delta-norms", out)].data)
    progress = artifacts[artifact_key("batch-progress", str(root))]
    assert progress.type == "progress" and float(progress.data) == 100.0

    again = merge_adapters([str(a) for a in adapters],
                           {"base": str(base), "out": str(root), "max_shard_size": SHARD},
                           ["plain", "dora"], return_state=True)
    assert {r.status for r in again.result().values()} == {"up-to-date"}
    notes = _artifacts(again.state_details.flow_run_id)
    assert all("already holds this merge" in notes[artifact_key("merge-report", o)].data
               for o in outs)


def test_a_refused_adapter_fails_the_run_with_one_line_and_nothing_is_written(two_adapters,
                                                                               tmp_path):
    from flows.batch import merge_adapters

    base, adapters = two_adapters
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{ not json")
    root = tmp_path / "out"
    state = merge_adapters([str(adapters[0]), str(bad)], {"base": str(base), "out": str(root)},
                           return_state=True)
    assert state.is_failed()
    assert "1 of 2 adapters refused, nothing written" in state.message and str(bad) in \
        state.message
    assert "\n" not in state.message.strip()
    logs = _logs(state.state_details.flow_run_id)
    assert not [m for m in logs if "Traceback" in m], logs
    assert any("1 of 2 adapters refused" in m for m in logs), logs
    assert not root.exists() or not any(root.iterdir())


def test_options_and_adapters_are_checked_before_anything_runs(two_adapters, tmp_path):
    from flows.batch import merge_adapters

    base, adapters = two_adapters
    no_out = merge_adapters([str(adapters[0])], {"base": str(base)}, return_state=True)
    assert no_out.is_failed() and "invalid batch options: spec.out" in no_out.message
    empty = merge_adapters([], {"out": str(tmp_path / "o")}, return_state=True)
    assert empty.is_failed() and "no adapters" in empty.message
    clash = merge_adapters([str(a) for a in adapters], {"out": str(tmp_path / "o")},
                           ["same", "same"], return_state=True)
    assert clash.is_failed() and "would both be written to" in clash.message
    assert not (tmp_path / "o").exists()


def test_a_partial_failure_keeps_and_names_the_finished_outputs(two_adapters, tmp_path,
                                                                monkeypatch):
    from flows.batch import merge_adapters
    from flows.merge import artifact_key
    from mergeflow.pipeline import steps

    base, adapters = two_adapters
    root = tmp_path / "out"
    real = steps.publish_output

    def publish(prepared):
        if Path(prepared.out).name == "dora":
            raise OutputError(f"{prepared.out}: simulated: the disk went read-only")
        return real(prepared)

    monkeypatch.setattr(steps, "publish_output", publish)
    state = merge_adapters([str(a) for a in adapters], {"base": str(base), "out": str(root)},
                           ["plain", "dora"], return_state=True)
    assert state.is_failed()
    assert "1 of 2 outputs failed" in state.message and "read-only" in state.message
    assert f"finished: {root / 'plain'}" in state.message
    assert (root / "plain" / "merge-manifest.json").is_file()
    assert not (root / "dora").exists()
    artifacts = _artifacts(state.state_details.flow_run_id)
    assert artifact_key("merge-report", str(root / "plain")) in artifacts
    assert artifact_key("merge-report", str(root / "dora")) not in artifacts


def test_the_run_form_takes_a_list_of_adapters():
    """The parameter schema the UI's run form renders: ``adapters`` an array of strings,
    ``out_names`` an optional one, ``spec`` every MergeSpec field but ``adapter``."""
    from flows.batch import merge_adapters

    schema = merge_adapters.parameters.model_dump()
    assert set(schema["properties"]) == {"adapters", "spec", "out_names"}
    assert schema["properties"]["adapters"]["type"] == "array"
    assert schema["properties"]["adapters"]["items"] == {"type": "string"}
    assert schema["required"] == ["adapters", "spec"]
    request = schema["definitions"]["BatchRequest"]["properties"]
    assert "adapter" not in request and {"out", "base", "device", "push_to"} <= set(request)
    assert "out_names" in json.dumps(schema)


def test_the_cli_runs_a_batch_as_the_flow_with_prefect(two_adapters, tmp_path, prefect_server):
    base, adapters = two_adapters
    out = tmp_path / "cli"
    args = ["merge", "--base", str(base), "--adapter", str(adapters[0]), "--adapter",
            str(adapters[1]), "--out-name", "plain", "--out-name", "dora", "--out", str(out),
            "--prefect"]
    result = subprocess.run(cli_command(*args), cwd=REPO, capture_output=True, text=True,
                            env={**cli_env(), "PREFECT_API_URL": prefect_server}, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "ran as Prefect flow run merge-adapters/" in result.stdout
    single = tmp_path / "single"
    mergeflow.merge(base, adapters[1], single)
    assert _files(out / "dora") == _files(single)
    assert (out / "plain" / "merge-manifest.json").is_file()
