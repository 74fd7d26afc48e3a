"""SafeTensors and GGUF from one read of the base (``save_method="merged_16bit,gguf"``), and GGUF
with ``low_disk`` (each file shipped and deleted as soon as it is made).

Route: ``mergeflow.merge`` in process, the CLI (a crash and its rerun, the refusals) and the
Prefect flow. Model: a tiny bfloat16 Llama with hidden 256 (k-quant blocks fit), so the 16-bit
GGUF type f16 differs from the merge's dtype: the case where the GGUF streamed from the float32
merge and the GGUF converted from the bf16 shards would differ if the gguf route did not round
the merge to ``dtype`` first. The peers are the separate runs: ``merged_16bit`` alone and
``gguf`` alone, compared byte for byte; the base's reads are counted at ``Checkpoint.pread``,
which every read of a tensor's bytes goes through.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path

import pytest
import torch
from builders import build_adapter, build_base, save_bpe_tokenizer
from helpers import run_cli

import mergeflow
from mergeflow.model.checkpoint import Checkpoint
from mergeflow.output.folder import MANIFEST
from mergeflow.spec import MergeSpec
from mergeflow.storage.staging import Staging

pytest.importorskip("llama_cpp", reason="llama-cpp-python (scripts/setup builds it)")
pytest.importorskip("conversion", reason="llama.cpp's converter (scripts/setup --gguf)")

VOCAB = 384
TYPES = "f16,q4_k_m"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]
BOTH = "merged_16bit,gguf"
GGUF_FILES = ["model-f16.gguf", "model-q4_k_m.gguf"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files(folder: Path) -> dict[str, str]:
    """Every file of a folder by name -> sha256."""
    return {p.name: sha256(p) for p in sorted(folder.iterdir()) if p.is_file()}


class BaseReads:
    """Bytes read from each folder through :meth:`Checkpoint.pread` while installed."""

    def __init__(self, monkeypatch) -> None:
        self.bytes: Counter[Path] = Counter()
        real = Checkpoint.pread

        def counted(checkpoint, info, start, buffer):
            self.bytes[checkpoint.folder.resolve()] += len(buffer)
            return real(checkpoint, info, start, buffer)

        monkeypatch.setattr(Checkpoint, "pread", counted)

    def take(self) -> Counter[Path]:
        taken, self.bytes = self.bytes, Counter()
        return taken


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("one-read")
    base = build_base(root / "base", "llama", tokenizer=False, vocab_size=VOCAB, hidden_size=256,
                      intermediate_size=512, dtype=torch.bfloat16)
    save_bpe_tokenizer(base, VOCAB, "gpt-2")
    return base, build_adapter(base, root / "adapter", target_modules=TARGETS)


@pytest.fixture(scope="module")
def separate(inputs, tmp_path_factory) -> dict[str, Path]:
    """The two separate runs the combined one must equal: merged_16bit alone and gguf alone."""
    base, adapter = inputs
    root = tmp_path_factory.mktemp("separate")
    mergeflow.merge(base, adapter, root / "st", verify=False)
    mergeflow.merge(base, adapter, root / "gguf", save_method="gguf", gguf_type=TYPES)
    return {"st": root / "st", "gguf": root / "gguf"}


def test_one_read_writes_the_checkpoint_and_the_gguf_of_the_separate_runs(
        inputs, separate, tmp_path, monkeypatch):
    base, adapter = inputs
    reads = BaseReads(monkeypatch)
    mergeflow.merge(base, adapter, tmp_path / "st", verify=False)
    alone = reads.take()
    out = tmp_path / "both"
    report = mergeflow.merge(base, adapter, out, save_method=BOTH, gguf_type=TYPES, verify=False)
    combined = reads.take()

    # The base is read exactly as much as by merged_16bit alone: once, for the shards; the GGUF
    # is converted from the shards in staging.
    base_dir, staging = base.resolve(), Staging.for_output(out).folder.resolve()
    assert combined[base_dir] == alone[base_dir] > 0
    # and the shards, once more, for the GGUF (and the adapter's small tensors)
    assert set(combined) == {base_dir, staging, adapter.resolve()}

    got, st, gguf = files(out), files(separate["st"]), files(separate["gguf"])
    for name in set(st) - {"README.md", MANIFEST}:  # shards, config, tokenizer: byte for byte
        assert got[name] == st[name], name
    for name in [*GGUF_FILES, "Modelfile"]:  # the GGUF files of gguf alone, byte for byte
        assert got[name] == gguf[name], name
    assert set(got) == set(st) | {*GGUF_FILES, "Modelfile"}

    manifest = json.loads((out / MANIFEST).read_text())
    assert set(manifest["files"]) == set(got) - {MANIFEST}
    assert all(manifest["files"][n]["sha256"] == got[n] for n in manifest["files"])
    assert manifest["options"]["save_method"] == BOTH and manifest["options"]["gguf_type"] == TYPES
    assert report.save_method == BOTH and report.dtype == "bfloat16" and report.shards == 1
    assert report.gguf_files == {n: (out / n).stat().st_size for n in GGUF_FILES}
    assert list(report.gguf_scores) == ["model-q4_k_m.gguf"]
    assert manifest["report"]["gguf_files"] == report.gguf_files
    card = (out / "README.md").read_text()
    assert "- **gguf**: model-f16.gguf, model-q4_k_m.gguf" in card
    assert "model-q4_k_m.gguf: mean KL" in card


def test_gguf_alone_on_a_bf16_base_holds_the_two_step_routes_f16_tensors(separate, tmp_path):
    """The gguf route rounds the merge to the base's bf16 before the converter writes f16, as
    llama.cpp's own converter run on the merged_16bit folder does (streamed straight from the
    float32 merge, the f16 values differed)."""
    import subprocess
    import sys

    import gguf
    import numpy as np

    peer = tmp_path / "two-step-f16.gguf"
    script = Path(__file__).with_name("gguf_two_step.py")
    subprocess.run([sys.executable, str(script), str(separate["st"]), str(peer), "f16"],
                   check=True, capture_output=True)

    def tensors(path: Path) -> dict[str, tuple[str, bytes]]:
        return {t.name: (t.tensor_type.name, bytes(np.asarray(t.data)))
                for t in gguf.GGUFReader(path).tensors}

    ours, theirs = tensors(separate["gguf"] / "model-f16.gguf"), tensors(peer)
    assert sorted(ours) == sorted(theirs)
    assert [name for name in ours if ours[name] != theirs[name]] == []


def test_the_spelling_and_order_of_the_pair_do_not_matter():
    spec = MergeSpec(adapter="a", out="o", save_method=" gguf , merged_16bit")
    assert spec.save_method == BOTH and spec.writes_gguf and spec.writes_safetensors
    assert spec.planned_method == "merged_16bit"
    alone = MergeSpec(adapter="a", out="o", save_method="gguf")
    assert alone.writes_gguf and not alone.writes_safetensors and alone.planned_method == "gguf"


@pytest.mark.parametrize("methods", ["lora,gguf", "merged_4bit,gguf",
                                     "merged_16bit,merged_4bit", "gguf,gguf"])
def test_other_pairs_are_refused_in_one_line(methods):
    with pytest.raises(ValueError) as caught:
        MergeSpec(adapter="a", out="o", save_method=methods)
    [error] = caught.value.errors()
    assert error["loc"] == ("save_method",)
    assert error["msg"] == (f"{methods}: only merged_16bit,gguf combines save methods (one "
                            "SafeTensors checkpoint, and GGUF files converted from its 16-bit "
                            "shards); write the others in separate runs")


def test_cli_refusals_exit_2_with_one_line_and_write_nothing(inputs, tmp_path):
    base, adapter = inputs
    out = tmp_path / "out"
    common = ("merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out))
    pair = run_cli(*common, "--save-method", "lora,gguf")
    assert pair.returncode == 2, pair.stderr
    assert pair.stderr.strip() == (
        "error: invalid options: --save-method: lora,gguf: only merged_16bit,gguf combines save "
        "methods (one SafeTensors checkpoint, and GGUF files converted from its 16-bit shards); "
        "write the others in separate runs")
    low_disk = run_cli(*common, "--save-method", BOTH, "--low-disk", "--push-to", "s3://b/p")
    assert low_disk.returncode == 2, low_disk.stderr
    assert low_disk.stderr.strip() == (
        "error: --save-method merged_16bit,gguf converts the GGUF from the shards on disk, which "
        "--low-disk ships and deletes one by one; drop --low-disk, or write --save-method gguf "
        "alone")
    assert not out.exists() and not list(tmp_path.glob(".*staging*"))


def test_a_crash_mid_gguf_resumes_from_the_shards_to_the_same_bytes(inputs, separate, tmp_path):
    """Killed as the first GGUF file is renamed (the shards written and verified): the rerun
    keeps the shards (the base is not merged again), converts again, and gives the same bytes;
    a third run has nothing to do."""
    base, adapter = inputs
    out = tmp_path / "both"
    args = ("merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out),
            "--save-method", BOTH, "--gguf-type", TYPES)
    os.environ["MERGEFLOW_FAULT_AT"] = "gguf-before-rename:1"
    try:
        crashed = run_cli(*args)
    finally:
        del os.environ["MERGEFLOW_FAULT_AT"]
    assert crashed.returncode != 0 and not out.exists()
    assert not list(tmp_path.rglob("*.gguf"))  # only a .partial, never a finished name
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    said = " ".join(done.stdout.split())  # rich wraps long lines
    assert "resumed 1 of 1 groups from an interrupted run" in said
    assert "converted the shards into model-f16.gguf, model-q4_k_m.gguf" in said
    assert f"ollama create both -f {out / 'Modelfile'}" in done.stdout
    got, st, gguf = files(out), files(separate["st"]), files(separate["gguf"])
    assert all(got[n] == st[n] for n in set(st) - {"README.md", MANIFEST})
    assert all(got[n] == gguf[n] for n in [*GGUF_FILES, "Modelfile"])
    again = run_cli(*args)
    assert again.returncode == 0 and "already holds this merge" in " ".join(again.stdout.split())
    assert files(out) == got


def test_the_flow_runs_the_same_steps_to_the_same_bytes(inputs, tmp_path, prefect_server):
    from flows.merge import merge_adapter

    base, adapter = inputs
    spec = MergeSpec(base=str(base), adapter=str(adapter), out=str(tmp_path / "flow"),
                     save_method=BOTH, gguf_type=TYPES)
    state = merge_adapter(spec, return_state=True)
    assert state.is_completed()
    report = state.result()
    assert set(report.gguf_files) == set(GGUF_FILES) and "convert to gguf" in report.timings
    assert report.verification.startswith("verification passed")
    local = mergeflow.merge(base, adapter, tmp_path / "local", save_method=BOTH, gguf_type=TYPES)
    assert files(tmp_path / "flow") == files(tmp_path / "local")
    assert report.gguf_files == local.gguf_files


def test_push_to_publishes_both_outputs_with_the_manifest(inputs, tmp_path, monkeypatch):
    """To moto's S3 server: the destination holds the folder's every file, GGUF included."""
    from s3_server import aws_test_env, moto_s3, new_bucket

    from mergeflow.remote.fetch import s3_client

    base, adapter = inputs
    out = tmp_path / "both"
    with aws_test_env(), moto_s3() as url:
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)
        client = s3_client(url)
        bucket = new_bucket(client)
        mergeflow.merge(base, adapter, out, save_method=BOTH, gguf_type="q8_0",
                        push_to=f"s3://{bucket}/m", verify=False)
        stored = {o["Key"]: client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
                  for o in client.list_objects_v2(Bucket=bucket)["Contents"]}
    assert "m/model-q8_0.gguf" in stored and "m/model.safetensors" in stored
    assert {k: hashlib.sha256(v).hexdigest() for k, v in stored.items()} == {
        f"m/{name}": digest for name, digest in files(out).items()}


class _SpyPublisher:
    """The real publisher, noting which GGUF files are on local disk at each put."""

    def __init__(self, real, staging: Path) -> None:
        self.real, self.staging, self.on_disk, self.put_names = real, staging, [], []

    def put(self, path, sha256, size):
        self.on_disk.append(sorted(p.name for p in self.staging.glob("*.gguf")))
        self.put_names.append(Path(path).name)
        return self.real.put(path, sha256, size)

    def finish(self, small, manifest):
        self.put_names += [Path(p).name for p in small] + [Path(manifest).name]
        return self.real.finish(small, manifest)


def test_low_disk_gguf_ships_each_file_as_it_is_made(inputs, separate, tmp_path, monkeypatch):
    """To moto's S3 server: every file asked for is there, byte for byte gguf alone's, the
    manifest last; local disk never held more than the 16-bit file and one quantized file,
    and nothing is left locally."""
    from s3_server import aws_test_env, moto_s3, new_bucket

    from mergeflow.pipeline import steps as api
    from mergeflow.remote.fetch import s3_client

    base, adapter = inputs
    out = tmp_path / "out"
    spies = []

    def spied(dest, **options):
        spies.append(_SpyPublisher(real_open(dest, **options), Staging.for_output(out).folder))
        return spies[-1]

    real_open = api.open_publisher
    monkeypatch.setattr(api, "open_publisher", spied)
    types = "q4_k_m,q6_k"  # two quantized files from a 16-bit one that was not asked for
    with aws_test_env(), moto_s3() as url:
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)
        client = s3_client(url)
        bucket = new_bucket(client)
        report = mergeflow.merge(base, adapter, out, save_method="gguf", gguf_type=types,
                                 low_disk=True, push_to=f"s3://{bucket}/m")
        stored = {o["Key"]: client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
                  for o in client.list_objects_v2(Bucket=bucket)["Contents"]}
    [spy] = spies
    assert spy.put_names == ["model-q4_k_m.gguf", "model-q6_k.gguf", "Modelfile", "README.md",
                             MANIFEST]
    # at each put: the 16-bit file it is quantized from, and the one quantized file shipped
    assert spy.on_disk == [["model-bf16.gguf", "model-q4_k_m.gguf"],
                           ["model-bf16.gguf", "model-q6_k.gguf"]]
    assert not out.exists() and not Staging.for_output(out).folder.exists()
    assert report.out == f"s3://{bucket}/m" and report.dtype == types
    local = tmp_path / "local"
    mergeflow.merge(base, adapter, local, save_method="gguf", gguf_type=types)
    assert set(stored) == {f"m/{n}" for n in files(local)}
    for name in ("model-q4_k_m.gguf", "model-q6_k.gguf", "Modelfile", "README.md"):
        assert stored[f"m/{name}"] == (local / name).read_bytes(), name
    manifest = json.loads(stored[f"m/{MANIFEST}"])
    assert {n: e["sha256"] for n, e in manifest["files"].items()} == {
        n: hashlib.sha256(stored[f"m/{n}"]).hexdigest() for n in manifest["files"]}
    assert manifest["files"] == json.loads((local / MANIFEST).read_text())["files"]


def test_low_disk_gguf_names_the_files_shipped_when_the_destination_fails(inputs, tmp_path,
                                                                         monkeypatch):
    from mergeflow.errors import SinkError, UploadError
    from mergeflow.pipeline import steps as api

    class FailingSecond:
        def __init__(self) -> None:
            self.put_names = []

        def put(self, path, sha256, size):
            if self.put_names:
                raise SinkError("s3://bk/m: access denied")
            self.put_names.append(Path(path).name)

    monkeypatch.setattr(api, "open_publisher", lambda dest, **options: FailingSecond())
    base, adapter = inputs
    with pytest.raises(UploadError) as caught:
        mergeflow.merge(base, adapter, tmp_path / "out", save_method="gguf",
                        gguf_type="bf16,q4_k_m", low_disk=True, push_to="s3://bk/m",
                        gguf_check=False)
    assert str(caught.value).startswith("publishing to s3://bk/m failed after 1 of 2 GGUF "
                                        "files were shipped (model-bf16.gguf)")


def test_the_disk_check_counts_the_files_on_disk_together(inputs, tmp_path):
    from mergeflow.pipeline import prepare
    from mergeflow.pipeline.preflight import required_bytes
    from mergeflow.plan import MergePlan

    base, adapter = inputs

    def needed(save_method: str, gguf_type: str = "q4_k_m,q6_k", **kw) -> tuple[int, int]:
        out = tmp_path / f"{save_method}-{gguf_type}-{sorted(kw)}"
        spec = MergeSpec(base=str(base), adapter=str(adapter), out=str(out),
                         save_method=save_method, gguf_type=gguf_type, **kw)
        plan = MergePlan.load(prepare(spec).plan_path)
        return required_bytes(plan, out, low_disk=spec.low_disk), plan.total_size

    (st, total), (both, _) = needed("merged_16bit"), needed(BOTH)
    assert both - st == total + 2 * (total * 17 // 32)  # the bf16 file and both k-quants
    (gguf, _), (low, _) = needed("gguf"), needed("gguf", low_disk=True, push_to="s3://b/p")
    assert gguf - low == total * 17 // 32  # low_disk: one quantized file at a time


@pytest.mark.parametrize(("options", "steps"), [
    ({"save_method": BOTH}, ["write_shards", "finalize", "verify", "convert_gguf", "publish"]),
    ({"save_method": BOTH, "verify": False, "push_to": "s3://b/p"},
     ["write_shards", "finalize", "convert_gguf", "publish", "upload"]),
    ({"save_method": "gguf"}, ["write_gguf", "publish"]),
    ({"save_method": "gguf", "low_disk": True, "push_to": "s3://b/p"}, ["gguf_low_disk"]),
    ({"low_disk": True, "push_to": "s3://b/p"}, ["merge_low_disk"]),
])
def test_the_one_order_places_the_gguf_steps(options, steps):
    from mergeflow.pipeline import PreparedMerge, steps_for

    prepared = PreparedMerge(out="o", staging="s", plan_path="p", fingerprint="f",
                             up_to_date=False, shard_count=1, tensor_count=1, total_size=1)
    assert steps_for(MergeSpec(adapter="a", out="o", **options), prepared) == steps
