"""storage.sink: a file written front to back, past the page cache where the file system allows
it (O_DIRECT in aligned chunks, the tail padded then cut), else through it; same bytes either
way, and a full disk or a refused direct write handled."""

from __future__ import annotations

import errno
import fcntl
import os
import random

import pytest
from test_writer import _cached_pages, _drops_clean_pages

from mergeflow.storage import sink as sink_module
from mergeflow.storage.sink import ALIGN, CachedSink, DirectSink, open_sink

direct_io = pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="needs O_DIRECT (Linux)")


def _pieces(seed: int, chunk: int) -> list[bytes]:
    """Writes of every awkward size around ``chunk``: empty, one byte, a chunk exactly, a chunk
    and one, many small ones across chunk boundaries."""
    rng = random.Random(seed)
    sizes = [0, 1, chunk - 1, chunk, chunk + 1, 3, 2 * chunk + 5, 0, ALIGN, 7]
    sizes += [rng.randrange(1, chunk // 3) for _ in range(40)]
    return [rng.randbytes(n) for n in sizes]


def _direct_sink(path, chunk: int) -> DirectSink:
    """A DirectSink on ``path``; skips where the file system refuses O_DIRECT."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            pytest.skip(f"{path.parent}'s file system refuses O_DIRECT")
        raise
    return DirectSink(fd, chunk=chunk)


@direct_io
@pytest.mark.parametrize("chunk", [ALIGN, 2 * ALIGN, 16 * ALIGN])
@pytest.mark.parametrize("seed", [0, 1])
def test_direct_sink_writes_exactly_the_bytes_given(tmp_path, chunk, seed):
    pieces = _pieces(seed, chunk)
    sink = _direct_sink(tmp_path / "f", chunk)
    for piece in pieces:
        sink.write(memoryview(piece) if seed else piece)
    sink.finish()
    sink.close()
    want = b"".join(pieces)
    assert (tmp_path / "f").read_bytes() == want  # the padding of the last chunk is cut off
    assert len(want) % ALIGN  # the pieces end mid-block: the cut is tested


@pytest.mark.parametrize("route", ["direct", "cached"])
def test_both_routes_store_the_same_bytes(tmp_path, monkeypatch, route):
    monkeypatch.setenv(sink_module.DIRECT_WRITES, "1" if route == "direct" else "0")
    pieces = _pieces(2, sink_module.CHUNK // 8)
    sink = open_sink(tmp_path / "f")
    if route == "cached" or not hasattr(os, "O_DIRECT"):
        assert isinstance(sink, CachedSink)
    for piece in pieces:
        sink.write(piece)
    sink.finish()
    sink.close()
    assert (tmp_path / "f").read_bytes() == b"".join(pieces)


@pytest.mark.parametrize("direct", ["1", "0"])
def test_an_empty_file(tmp_path, monkeypatch, direct):
    monkeypatch.setenv(sink_module.DIRECT_WRITES, direct)
    sink = open_sink(tmp_path / "f")
    sink.finish()
    sink.close()
    assert (tmp_path / "f").read_bytes() == b""


@direct_io
def test_a_direct_write_leaves_no_page_in_the_cache(tmp_path):
    if not _drops_clean_pages(tmp_path):
        pytest.skip(f"{tmp_path}'s file system keeps its pages (tmpfs)")
    sink = _direct_sink(tmp_path / "f", 64 * 1024)
    data = os.urandom(3 * 64 * 1024 + 100)
    sink.write(data)
    sink.finish()
    sink.close()
    assert _cached_pages(tmp_path / "f") == 0  # no fadvise was needed: nothing went through it
    assert (tmp_path / "f").read_bytes() == data


@direct_io
def test_open_falls_back_to_the_page_cache_where_o_direct_is_refused(tmp_path, monkeypatch):
    real = os.open

    def refusing(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), str(path))
        return real(path, flags, *args)

    monkeypatch.setattr(sink_module.os, "open", refusing)
    sink = open_sink(tmp_path / "f")
    assert isinstance(sink, CachedSink)
    sink.write(b"abc")
    sink.finish()
    sink.close()
    assert (tmp_path / "f").read_bytes() == b"abc"


@direct_io
def test_a_refused_direct_write_continues_through_the_page_cache(tmp_path, monkeypatch):
    """A file system that takes O_DIRECT at open but refuses the write (EINVAL): the chunk and
    the rest of the file are written through the page cache, the same bytes."""
    refused = []
    real = os.pwrite

    def refuse_direct(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(offset)
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real(fd, data, offset)

    monkeypatch.setattr(sink_module, "pwrite", refuse_direct)
    sink = _direct_sink(tmp_path / "f", ALIGN)
    pieces = _pieces(3, ALIGN)
    for piece in pieces:
        sink.write(piece)
    sink.finish()
    sink.close()
    assert refused == [0]
    assert (tmp_path / "f").read_bytes() == b"".join(pieces)


@direct_io
def test_a_full_disk_in_a_direct_write_is_raised_and_the_sink_still_closes(tmp_path, monkeypatch):
    writes = []

    def full(fd, data, offset):
        writes.append(offset)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(sink_module, "pwrite", full)
    sink = _direct_sink(tmp_path / "f", ALIGN)
    with pytest.raises(OSError) as caught:
        for _ in range(8):  # a later write (or finish) reports the failed chunk
            sink.write(bytes(ALIGN))
        sink.finish()
    assert caught.value.errno == errno.ENOSPC
    assert writes[0] == 0
    sink.close()
    sink.close()  # idempotent: the shard writer may close after a failed finish
    with pytest.raises(OSError):
        os.fstat(sink._fd)  # the descriptor is closed


def test_a_chunk_must_be_aligned(tmp_path):
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        with pytest.raises(ValueError, match="multiple of 4096"):
            DirectSink(fd, chunk=ALIGN + 1)
    finally:
        os.close(fd)
