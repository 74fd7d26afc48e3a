"""Property tests of the checkpoint readers (issue 8): whatever the bytes of a safetensors header
or an index, reading either succeeds with a faithful result or raises CheckpointError, never
anything else; valid files round-trip exactly."""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from mergeflow.errors import CheckpointError
from mergeflow.model.checkpoint import DTYPE_NAMES, Checkpoint, read_header

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])
TORCH_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
                torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory(prefix="readers-") as folder:
        yield Path(folder)


def _read_or_refuse(path: Path):
    """Read a header; a CheckpointError is an accepted answer, anything else fails the test."""
    try:
        return read_header(path)
    except CheckpointError as exc:
        assert str(path) in str(exc)  # the message names the file
        return None


def _tensors(draw) -> dict[str, torch.Tensor]:
    names = draw(st.lists(st.text(st.characters(codec="utf-8", exclude_characters="\x00"),
                                  min_size=1, max_size=12).filter(lambda n: n != "__metadata__"),
                          min_size=1, max_size=5, unique=True))
    out = {}
    for name in names:
        dtype = draw(st.sampled_from(TORCH_DTYPES))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        out[name] = (torch.rand(shape) * 10).to(dtype)
    return out


valid_tensors = st.composite(_tensors)


def _valid_file(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path = folder / "valid.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


@SETTINGS
@given(tensors=valid_tensors())
def test_valid_files_round_trip(scratch, tensors):
    path = _valid_file(scratch, tensors)
    infos = read_header(path)
    assert set(infos) == set(tensors)
    for name, tensor in tensors.items():
        assert infos[name].shape == tuple(tensor.shape)
        assert infos[name].dtype == DTYPE_NAMES[tensor.dtype]
        assert infos[name].file == path.name
    ckpt = Checkpoint(scratch, weights_file=path.name)
    for name, tensor in tensors.items():
        assert torch.equal(ckpt.read(name), tensor)


@SETTINGS
@given(data=st.binary(max_size=300))
def test_arbitrary_bytes_never_crash(scratch, data):
    path = scratch / "random.safetensors"
    path.write_bytes(data)
    _read_or_refuse(path)


@SETTINGS
@given(tensors=valid_tensors(), data=st.data())
def test_mutated_valid_files_never_crash(scratch, tensors, data):
    """Flip, cut, insert and overwrite bytes of a valid file, mostly inside the header."""
    raw = bytearray(_valid_file(scratch, tensors).read_bytes())
    header_end = 8 + struct.unpack("<Q", bytes(raw[:8]))[0]
    for _ in range(data.draw(st.integers(1, 4))):
        if not raw:
            break
        where = data.draw(st.integers(0, min(len(raw), header_end + 8) - 1))
        action = data.draw(st.sampled_from(["flip", "cut", "insert", "byte", "truncate"]))
        if action == "flip":
            raw[where] ^= 1 << data.draw(st.integers(0, 7))
        elif action == "cut":
            del raw[where:where + data.draw(st.integers(1, 8))]
        elif action == "insert":
            raw[where:where] = data.draw(st.binary(min_size=1, max_size=8))
        elif action == "byte":
            raw[where] = data.draw(st.sampled_from(b'{}[]",:0123456789 \x00\xff'))
        else:
            del raw[data.draw(st.integers(0, len(raw))):]
    path = scratch / "mutated.safetensors"
    path.write_bytes(bytes(raw))
    infos = _read_or_refuse(path)
    if infos is not None:  # accepted: then every tensor it promises really reads
        ckpt = Checkpoint(scratch, weights_file=path.name)
        for name, info in infos.items():
            assert tuple(ckpt.read(name).shape) == info.shape


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                  max_size=4),
    max_leaves=12)
entry = st.fixed_dictionaries({}, optional={
    "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "F7", "C64", "U32", "", "f32"])
    | json_values,
    "shape": st.lists(st.integers(-2, 5), max_size=3) | json_values,
    "data_offsets": st.lists(st.integers(-4, 80), min_size=0, max_size=3) | json_values,
})


@SETTINGS
@given(table=st.dictionaries(st.text(max_size=8), entry | json_values, max_size=4),
       data_size=st.integers(0, 96), pad=st.sampled_from([b"", b"   "]))
def test_structured_headers_never_crash(scratch, table, data_size, pad):
    """Well-formed JSON with random entries: dtypes, shapes and offsets in and out of range."""
    body = json.dumps(table).encode() + pad
    path = scratch / "structured.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body + bytes(data_size))
    infos = _read_or_refuse(path)
    if infos is not None:
        assert sum(i.nbytes for i in infos.values()) == data_size


@pytest.mark.parametrize("length", [2**64 - 1, 10**12, 100 * 10**6 + 1, 60])
def test_absurd_header_lengths_are_refused(tmp_path, length):
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", length) + b"{}" + bytes(40))
    with pytest.raises(CheckpointError, match="header length"):
        read_header(path)


def test_repeated_name_in_a_header_is_refused(tmp_path):
    """safetensors itself keeps the last of two identical entries; Mergeflow refuses."""
    entry = '{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
    body = f'{{"a.weight":{entry},"a.weight":{entry}}}'.encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body + bytes(4))
    with pytest.raises(CheckpointError, match=r"'a\.weight' twice"):
        read_header(path)


# --------------------------------------------------------------------------- the index


def _shard_folder(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"a.weight": torch.ones(2), "b.weight": torch.zeros(3)}, str(folder / "s1.safetensors"))
    save_file({"c.weight": torch.ones(1, dtype=torch.int64)}, str(folder / "s2.safetensors"))
    return folder


file_names = st.sampled_from(["s1.safetensors", "s2.safetensors", "missing.safetensors",
                              "../s1.safetensors", "/etc/passwd", "", ".", "sub/", "s1.safetensors\x00",
                              "x" * 300]) | st.text(max_size=12)
weight_maps = st.dictionaries(st.sampled_from(["a.weight", "b.weight", "c.weight", "d.weight"]),
                              file_names | json_values, max_size=4)


@SETTINGS
@given(index=st.fixed_dictionaries({}, optional={"weight_map": weight_maps | json_values,
                                                 "metadata": json_values}) | json_values)
def test_random_indexes_never_crash(scratch, index):
    folder = _shard_folder(scratch / "sharded")
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    try:
        ckpt = Checkpoint(folder)
    except CheckpointError as exc:
        assert "model.safetensors.index.json" in str(exc) or str(folder) in str(exc)
        return
    # Accepted: then it is exactly what the index says, and every tensor reads.
    assert isinstance(index, dict)
    assert {k: Path(i.file) for k, i in ckpt.tensors.items()} == {
        k: Path(v) for k, v in index["weight_map"].items()}
    for name in ckpt.tensors:
        ckpt.read(name)


@SETTINGS
@given(text=st.text(max_size=60) | st.binary(max_size=60).map(lambda b: b.decode("latin-1")))
def test_random_index_text_never_crashes(scratch, text):
    folder = _shard_folder(scratch / "sharded-text")
    (folder / "model.safetensors.index.json").write_text(text, encoding="utf-8",
                                                         errors="surrogateescape")
    try:
        Checkpoint(folder)
    except CheckpointError:
        return
    assume(False)  # a valid index by chance: nothing more to check


def test_valid_index_round_trips(tmp_path):
    folder = _shard_folder(tmp_path / "ok")
    weight_map = {"a.weight": "s1.safetensors", "b.weight": "s1.safetensors",
                  "c.weight": "s2.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ckpt = Checkpoint(folder)
    assert {k: i.file for k, i in ckpt.tensors.items()} == weight_map
    assert torch.equal(ckpt.read("c.weight"), torch.ones(1, dtype=torch.int64))
