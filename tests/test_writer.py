"""writer.ShardWriter: streamed files are standard safetensors that read back exactly."""

from __future__ import annotations

import hashlib
import itertools
import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file

from mergeflow.engine.writer import ShardWriter
from mergeflow.errors import MergeError
from mergeflow.model.checkpoint import DTYPE_NAMES


def _write(path, tensors: dict[str, torch.Tensor]):
    specs = [(name, DTYPE_NAMES[t.dtype], list(t.shape)) for name, t in tensors.items()]
    with ShardWriter(path, specs) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    return writer


def _read(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)


def _raw_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert got[name].shape == tensor.shape, name
        # Compare bytes: exact for every dtype (NaN payloads and -0.0 included).
        assert torch.equal(_raw_bytes(got[name]), _raw_bytes(tensor)), name


def _sample() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "w.f32": torch.randn(3, 5, generator=gen),
        "w.bf16": torch.randn(4, 7, generator=gen).bfloat16(),
        "w.f16": torch.randn(2, 3, 4, generator=gen).half(),
        "w.f64": torch.randn(6, generator=gen).double(),
        "ids.i64": torch.arange(-5, 7),
        "ids.i32": torch.arange(9, dtype=torch.int32).reshape(3, 3),
        "ids.i16": torch.tensor([-300, 2, 300], dtype=torch.int16),
        "ids.i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "packed.u8": torch.randint(0, 256, (11,), generator=gen, dtype=torch.uint8),
        "mask.bool": torch.tensor([True, False, True]),
        "f8.e4m3": torch.randn(5, generator=gen).to(torch.float8_e4m3fn),
        "f8.e5m2": torch.randn(5, generator=gen).to(torch.float8_e5m2),
        "scalar": torch.tensor(3.25),
        "scalar.bf16": torch.tensor(-1.5, dtype=torch.bfloat16),
        "empty": torch.zeros(0, 4),
        "transposed": torch.randn(4, 6, generator=gen).T,  # non-contiguous input
    }


@pytest.fixture(params=["direct", "cached"])
def route(request, monkeypatch) -> str:
    """The route of the shard's bytes (mergeflow.storage.sink): past the page cache (O_DIRECT,
    where the file system has it) or through it."""
    from mergeflow.storage import sink as sink_module

    monkeypatch.setenv(sink_module.DIRECT_WRITES, "1" if request.param == "direct" else "0")
    return request.param


def test_roundtrip_all_dtypes_and_shapes(tmp_path, route):
    tensors = _sample()
    writer = _write(tmp_path / "x.safetensors", tensors)

    _assert_same(_read(tmp_path / "x.safetensors"), tensors)
    _assert_same(load_file(str(tmp_path / "x.safetensors")), tensors)
    data = (tmp_path / "x.safetensors").read_bytes()
    assert writer.size == len(data)
    assert writer.sha256 == hashlib.sha256(data).hexdigest()
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    # Tensor data starts 8-byte aligned, as the safetensors format asks.
    assert (8 + struct.unpack("<Q", data[:8])[0]) % 8 == 0
    assert not list(tmp_path.glob(".*"))


def test_header_matches_what_safetensors_reads(tmp_path):
    tensors = _sample()
    _write(tmp_path / "x.safetensors", tensors)
    data = (tmp_path / "x.safetensors").read_bytes()
    header = json.loads(data[8: 8 + struct.unpack("<Q", data[:8])[0]])
    assert [k for k in header if k != "__metadata__"] == list(tensors)  # file order = write order
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        for name, tensor in tensors.items():
            assert f.get_slice(name).get_shape() == list(tensor.shape)
            assert f.get_slice(name).get_dtype() == DTYPE_NAMES[tensor.dtype]


def test_exception_removes_temp_file_and_leaves_old_file(tmp_path, route):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"previous complete file")
    tensors = {"a": torch.ones(3), "b": torch.zeros(2)}
    specs = [(n, DTYPE_NAMES[t.dtype], list(t.shape)) for n, t in tensors.items()]
    with pytest.raises(RuntimeError, match="boom"), ShardWriter(path, specs) as writer:
        writer.write("a", tensors["a"])
        assert writer.tmp.exists()
        raise RuntimeError("boom")
    assert not writer.tmp.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    assert path.read_bytes() == b"previous complete file"


def test_closing_before_every_tensor_is_written_fails_cleanly(tmp_path, route):
    path = tmp_path / "model.safetensors"
    specs = [("a", "F32", [3]), ("b", "F32", [2])]
    with pytest.raises(MergeError, match="b"), ShardWriter(path, specs) as writer:
        writer.write("a", torch.ones(3))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", [("b", torch.ones(3)), ("a", torch.ones(3, dtype=torch.float16)),
                                 ("a", torch.ones(4))], ids=["name", "dtype", "shape"])
def test_unplanned_tensor_is_refused(tmp_path, bad):
    specs = [("a", "F32", [3])]
    with pytest.raises(MergeError), ShardWriter(tmp_path / "m.safetensors", specs) as writer:
        writer.write(*bad)
    assert list(tmp_path.iterdir()) == []


_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
           torch.int8, torch.uint8, torch.bool]


@st.composite
def tensor_dicts(draw):
    names = draw(st.lists(st.text(alphabet="abcdefghij._0123456789", min_size=1, max_size=12),
                          min_size=1, max_size=6, unique=True))
    tensors = {}
    for name in names:
        dtype = draw(st.sampled_from(_DTYPES))
        shape = draw(st.lists(st.integers(0, 4), min_size=0, max_size=3))
        numel = 1
        for d in shape:
            numel *= d
        raw = draw(st.binary(min_size=numel * dtype.itemsize, max_size=numel * dtype.itemsize))
        flat = torch.tensor(list(raw), dtype=torch.uint8)
        if dtype == torch.bool:
            flat = flat % 2
        tensors[name] = flat.view(dtype).reshape(shape)
    return tensors


@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(tensors=tensor_dicts())
def test_property_roundtrip(tmp_path, tensors):
    path = tmp_path / "p.safetensors"
    path.unlink(missing_ok=True)
    _write(path, tensors)
    _assert_same(_read(path), tensors)


def test_writeback_starts_every_chunk_and_changes_no_byte(tmp_path, monkeypatch):
    """Through the page cache, the writer asks the kernel to start writing each WRITEBACK_BYTES
    of dirty data (so the closing fsync is short) over exactly the ranges written, and the file
    is the same bytes."""
    from mergeflow.storage import sink as sink_module

    monkeypatch.setenv(sink_module.DIRECT_WRITES, "0")  # the route through the page cache
    calls = []
    real = sink_module.start_writeback
    monkeypatch.setattr(sink_module, "WRITEBACK_BYTES", 4096)
    monkeypatch.setattr(sink_module, "start_writeback",
                        lambda fd, offset, n: (calls.append((offset, n)), real(fd, offset, n)))
    tensors = {f"t{i}": torch.randn(64, 48) for i in range(8)}  # 12 KiB each
    _write(tmp_path / "a.safetensors", tensors)
    assert len(calls) >= 8
    assert [offset for offset, _ in calls] == [0] + [sum(calls[i][1] for i in range(k))
                                                     for k in range(1, len(calls))]
    _assert_same(_read(tmp_path / "a.safetensors"), tensors)
    monkeypatch.setattr(sink_module, "WRITEBACK_BYTES", 2**40)
    _write(tmp_path / "b.safetensors", tensors)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_both_routes_write_the_same_bytes(tmp_path, monkeypatch):
    """Larger than a direct chunk, ending mid-block: the same file through either route."""
    from mergeflow.storage import sink as sink_module

    gen = torch.Generator().manual_seed(1)
    tensors = {f"t{i}": torch.randn(1000 + i, 700, generator=gen).bfloat16() for i in range(5)}
    shas = []
    for direct in ("1", "0"):
        monkeypatch.setenv(sink_module.DIRECT_WRITES, direct)
        shas.append(_write(tmp_path / f"{direct}.safetensors", tensors).sha256)
    assert (tmp_path / "1.safetensors").read_bytes() == (tmp_path / "0.safetensors").read_bytes()
    assert shas[0] == shas[1] == hashlib.sha256((tmp_path / "0.safetensors").read_bytes()).hexdigest()
    assert (tmp_path / "0.safetensors").stat().st_size % sink_module.ALIGN  # the tail is cut
    _assert_same(_read(tmp_path / "1.safetensors"), tensors)


def _cached_pages(path) -> int:
    """How many of the file's pages are in the page cache (``mincore`` on a mapping of it)."""
    import ctypes
    import mmap
    import os

    size = os.path.getsize(path)
    pages = -(-size // mmap.PAGESIZE)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as mapped:
        libc = ctypes.CDLL(None, use_errno=True)
        vec = (ctypes.c_ubyte * pages)()
        anchor = ctypes.c_char.from_buffer(mapped)
        try:
            assert libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor)),
                                ctypes.c_size_t(size), vec) == 0
        finally:
            del anchor  # the mapping cannot close while a ctypes object points into it
        return sum(v & 1 for v in vec)


def _drops_clean_pages(folder) -> bool:
    """Whether this file system drops a synced file's pages on POSIX_FADV_DONTNEED (a disk
    does; tmpfs cannot: its pages are the file)."""
    import os

    probe = folder / "probe"
    probe.write_bytes(os.urandom(1 << 20))
    with open(probe, "rb+") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    dropped = _cached_pages(probe) == 0
    probe.unlink()
    return dropped


@pytest.mark.skipif(not hasattr(__import__("os"), "posix_fadvise"), reason="needs posix_fadvise")
def test_written_shard_leaves_the_page_cache_with_the_same_bytes(tmp_path, monkeypatch):
    """Through the page cache, a shard is written once and not read again, so its pages leave
    the page cache: each window once the disk has it (the file then never holds more than two
    windows of the cache), the rest after the closing fsync. The bytes are the same as a write
    that keeps them."""
    from mergeflow.storage import sink as sink_module

    if not _drops_clean_pages(tmp_path):
        pytest.skip(f"{tmp_path}'s file system keeps clean pages on POSIX_FADV_DONTNEED")
    monkeypatch.setenv(sink_module.DIRECT_WRITES, "0")  # the route through the page cache
    released = []
    real = sink_module.release_written
    monkeypatch.setattr(sink_module, "WRITEBACK_BYTES", 64 * 1024)
    monkeypatch.setattr(sink_module, "release_written",
                        lambda fd, offset, n: (released.append((offset, n)), real(fd, offset, n)))
    tensors = {f"t{i}": torch.randn(256, 256) for i in range(8)}  # 256 KiB each
    _write(tmp_path / "a.safetensors", tensors)
    assert _cached_pages(tmp_path / "a.safetensors") == 0
    windows = [(o, n) for o, n in released if n]
    assert len(windows) >= 6 and windows[0][0] == 0  # one per tensor here
    assert all(o + n == o2 for (o, n), (o2, _) in itertools.pairwise(windows))

    monkeypatch.setattr(sink_module, "drop_cached", lambda *a, **k: None)
    monkeypatch.setattr(sink_module, "release_written", lambda *a, **k: None)
    _write(tmp_path / "b.safetensors", tensors)
    assert _cached_pages(tmp_path / "b.safetensors") > 0  # what the kernel keeps otherwise
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
