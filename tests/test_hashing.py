"""The inputs' sha256 for the manifest, hashed from the merge's own reads of the base.

Route: :class:`mergeflow.storage.hashing.ReadDigest` fed directly, in any read order, against
``hashlib`` over the whole file; then ``mergeflow.merge`` in process with an empty hash memo
(``MERGEFLOW_CACHE`` set per test), whose manifest must list every base file's true sha256 while
the base is read once (the bytes read again for the hash are counted at the hashing module's
one read function).
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import os
import random
import struct
import threading
import time
from pathlib import Path

import pytest
import torch
from builders import build_adapter, build_base

import mergeflow
from mergeflow.errors import CheckpointError
from mergeflow.model.index import safetensors_shards
from mergeflow.output.folder import MANIFEST
from mergeflow.storage import hashing
from mergeflow.storage.hashing import HashCache, ReadDigest


def fake_safetensors(path: Path, data_size: int, seed: int) -> tuple[int, bytes]:
    """A file laid out as safetensors are (8 length bytes, a header, the data); returns where
    the data starts and the whole file's bytes. Only the layout matters to the digest."""
    header = b'{"__metadata__":{"x":"y"}}   '
    data = random.Random(seed).randbytes(data_size)
    raw = struct.pack("<Q", len(header)) + header + data
    path.write_bytes(raw)
    return 8 + len(header), raw


def feed_ranges(digest: ReadDigest, raw: bytes, ranges: list[tuple[int, int]]) -> None:
    for start, stop in ranges:
        digest.feed(start, memoryview(raw[start:stop]))


def chunks(start: int, stop: int, rng: random.Random) -> list[tuple[int, int]]:
    """[start, stop) cut at random points."""
    cuts = sorted(rng.sample(range(start + 1, stop), 20))
    edges = [start, *cuts, stop]
    return list(itertools.pairwise(edges))


@pytest.mark.parametrize("seed", range(8))
def test_any_read_order_gives_the_files_sha256(tmp_path, seed):
    rng = random.Random(seed)
    path = tmp_path / "w.safetensors"
    start, raw = fake_safetensors(path, 50_000, seed)
    ranges = chunks(start, len(raw), rng)
    rng.shuffle(ranges)
    ranges += [(a, min(b + 7, len(raw))) for a, b in rng.sample(ranges, 5)]  # overlapping reads
    del ranges[rng.randrange(len(ranges))]  # a range the merge never reads
    digest = ReadDigest(path, hashing._memo_key(path))
    feed_ranges(digest, raw, ranges)
    assert digest.finish() == hashlib.sha256(raw).hexdigest()


def test_in_order_reads_are_not_read_again(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    start, raw = fake_safetensors(path, 40_000, 1)
    digest = ReadDigest(path, hashing._memo_key(path))
    read_again = []
    real = hashing._hash_range
    monkeypatch.setattr(hashing, "_hash_range", lambda d, fd, a, b, p: (
        read_again.append(b - a), real(d, fd, a, b, p)))
    # layer 1, then layer 2 out of file order (as "layers.10" sorts before "layers.2"), then 10
    third = start + (len(raw) - start) // 3
    feed_ranges(digest, raw, [(start, third), (2 * third - start, len(raw)), (third, 2 * third - start)])
    assert digest.finish() == hashlib.sha256(raw).hexdigest()
    # only the range read ahead of the frontier is read again, once the frontier reaches it
    assert read_again == [len(raw) - (2 * third - start)]


def test_a_file_changed_after_registration_is_hashed_whole(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEFLOW_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "w.safetensors"
    start, raw = fake_safetensors(path, 10_000, 2)
    digests, rest = hashing.hash_while_reading([path])
    assert rest == [] and len(digests) == 1
    feed_ranges(digests[0], raw, [(start, len(raw))])
    _, changed = fake_safetensors(path, 10_001, 3)
    assert digests[0].finish() is None  # the caller must not trust it
    assert HashCache().sha256(path) == hashlib.sha256(changed).hexdigest()


def test_cancelled_hashing_forgets_its_files(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEFLOW_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "w.safetensors"
    _, raw = fake_safetensors(path, 10_000, 4)
    hashes = hashing.start_hashes({"base": {}}, [path], [])
    hashes.cancel()
    assert str(path.resolve()) not in hashing._reading
    assert HashCache().sha256(path) == hashlib.sha256(raw).hexdigest()


def test_merge_manifest_lists_the_true_sha256_with_one_read_of_the_base(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEFLOW_CACHE", str(tmp_path / "cache"))  # nothing hashed before
    base = build_base(tmp_path / "base", "llama", tokenizer=False, hidden_size=128,
                      intermediate_size=256, num_hidden_layers=12, dtype=torch.bfloat16,
                      max_shard_size="200KB")
    adapter = build_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "down_proj"])
    monkeypatch.setattr(hashing, "_fill_until_read", lambda digests, stop: None)  # reads alone
    read_again = []
    real = hashing._hash_range
    monkeypatch.setattr(hashing, "_hash_range", lambda d, fd, a, b, p: (
        read_again.append((Path(p).name, b - a)), real(d, fd, a, b, p)))
    mergeflow.merge(base, adapter, tmp_path / "out", no_tokenizer=True, max_shard_size="300KB",
                    workers=1)
    listed = json.loads((tmp_path / "out" / MANIFEST).read_text())["inputs"]["sha256"]["base"]
    weights = sorted(p.name for p in base.glob("*.safetensors"))
    assert len(weights) > 2
    assert {n: listed[n] for n in weights} == {
        n: hashlib.sha256((base / n).read_bytes()).hexdigest() for n in weights}
    base_bytes = sum(os.path.getsize(base / n) for n in weights)
    again = sum(size for name, size in read_again if name in weights)
    assert again < base_bytes / 4, (again, base_bytes)  # headers and out-of-order layers only


def test_an_up_to_date_rerun_hashes_nothing(tmp_path, monkeypatch):
    base = build_base(tmp_path / "base", "llama", tokenizer=False, dtype=torch.bfloat16,
                      max_shard_size="200KB")
    adapter = build_adapter(base, tmp_path / "adapter", target_modules=["q_proj"])
    monkeypatch.setenv("MERGEFLOW_CACHE", str(tmp_path / "cache-1"))
    mergeflow.merge(base, adapter, tmp_path / "out", no_tokenizer=True)
    # a process and a cache that remember no hash: planning the rerun starts hashing the
    # base's weights ...
    monkeypatch.setenv("MERGEFLOW_CACHE", str(tmp_path / "cache-2"))
    monkeypatch.setattr(hashing, "_known", {})
    monkeypatch.setattr(hashing, "_fill_until_read", lambda digests, stop: None)
    started = []
    real = hashing.hash_while_reading
    monkeypatch.setattr(hashing, "hash_while_reading",
                        lambda paths: started.append(real(paths)) or started[-1])
    again = mergeflow.merge(base, adapter, tmp_path / "out", no_tokenizer=True)
    assert again.status == "up-to-date"
    digests = started[0][0]
    assert digests, "the rerun's planning registered no weight file"
    # ... and finding the output up to date stops it: no file is left waiting for reads
    weights = {str(p.resolve()) for p in base.glob("*.safetensors")}
    assert not weights & set(hashing._reading)
    assert all(d.finish() is None for d in digests)


def test_hashing_ahead_is_taken_over_by_the_merge_that_reads_the_files(tmp_path, monkeypatch):
    """The CLI starts hashing a local base before torch is imported (``hash_ahead``); planning
    pauses it for the layout's fork, takes its digests over and drops a file the merge does not
    read. The manifest lists the true sha256 either way."""
    monkeypatch.setenv("MERGEFLOW_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hashing, "_known", {})
    base = build_base(tmp_path / "base", "llama", tokenizer=False, dtype=torch.bfloat16,
                      max_shard_size="60KB")
    adapter = build_adapter(base, tmp_path / "adapter", target_modules=["q_proj"])
    weights = sorted(p.name for p in base.glob("*.safetensors"))
    assert len(weights) > 1 and (base / "model.safetensors.index.json").is_file()
    fake_safetensors(base / "consolidated.safetensors", 10_000, 5)  # not in the index

    shards = safetensors_shards(base)
    assert [p.name for p in shards] == weights  # the index's files only
    hashing.hash_ahead(shards)
    ahead = {d.path.name: d for d in hashing._ahead.digests}
    assert sorted(ahead) == weights
    hashing.pause_hashing()
    assert not any(t.name == "mergeflow-hash-before-reads" for t in threading.enumerate())

    taken = []
    real = hashing.hash_while_reading
    monkeypatch.setattr(hashing, "hash_while_reading",
                        lambda paths: taken.append(real(paths)) or taken[-1])
    stray = hashing.ReadDigest(base / "consolidated.safetensors", "stray")
    hashing._ahead.digests.append(stray)  # as if hashed ahead from a folder listing
    hashing._reading[stray.real] = stray
    mergeflow.merge(base, adapter, tmp_path / "out", no_tokenizer=True, workers=1)
    assert set(taken[0][0]) >= set(ahead.values())  # the same digests, not new ones
    assert stray.real not in hashing._reading and stray.finish() is None
    assert hashing._ahead is None
    listed = json.loads((tmp_path / "out" / MANIFEST).read_text())["inputs"]["sha256"]["base"]
    assert {n: listed[n] for n in weights} == {
        n: hashlib.sha256((base / n).read_bytes()).hexdigest() for n in weights}


def test_hash_ahead_of_files_it_cannot_read_does_nothing(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable index"):  # the CLI then skips it
        safetensors_shards(tmp_path)
    hashing.hash_ahead([tmp_path / "missing.safetensors"])
    assert hashing._ahead is None


def test_reads_hashed_behind_wait_for_their_slot_and_give_the_files_sha256(tmp_path, monkeypatch):
    """``hashing_behind(slot)``: the bytes read are hashed on another thread, in read order; the
    next read into the same slot waits until they are (its buffer is then free to refill)."""
    monkeypatch.setenv("MERGEFLOW_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "w.safetensors"
    start, raw = fake_safetensors(path, 300_000, 6)
    digests, _ = hashing.hash_while_reading([path])
    digest = digests[0]
    events = []
    real_feed = hashing.ReadDigest.feed

    def slow_feed(self, offset, data):
        time.sleep(0.05)
        events.append(("hashed", offset, threading.current_thread().name))
        real_feed(self, offset, data)

    monkeypatch.setattr(hashing.ReadDigest, "feed", slow_feed)
    buffer = bytearray(50_000)
    for n, offset in enumerate(range(start, len(raw), len(buffer))):
        with hashing.hashing_behind(n % 2):
            events.append(("read", offset, n % 2))
            got = raw[offset:offset + len(buffer)]
            buffer[:len(got)] = got
            hashing.observe_read(digest.real, offset, memoryview(buffer)[:len(got)])
        buffer = bytearray(len(buffer)) if n % 2 == 0 else buffer  # two slots: two buffers
    hashing.wait_for_hashes()
    assert {name for kind, _, name in events if kind == "hashed"} == {"mergeflow-hash-behind"}
    hashed = [offset for kind, offset, _ in events if kind == "hashed"]
    assert hashed == sorted(hashed)  # in read order
    # a slot is read into again only once its previous read is hashed
    for i, (kind, _, slot) in enumerate(events):
        if kind == "read":
            earlier = [o for k, o, s in events[:i] if k == "read" and s == slot]
            if earlier:
                assert ("hashed", earlier[-1], "mergeflow-hash-behind") in events[:i]
    assert digest.finish() == hashlib.sha256(raw).hexdigest()


def test_a_merge_hashes_its_16_bit_base_behind_its_reads(tmp_path, monkeypatch):
    """A merge's worker reads and merges; the base's bytes it reads are hashed on a thread of
    their own (issue 27: math and sha256 on two cores), and the manifest lists the true sha256."""
    monkeypatch.setenv("MERGEFLOW_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hashing, "_known", {})
    monkeypatch.setattr(hashing, "_fill_until_read", lambda digests, stop: None)  # reads alone
    base = build_base(tmp_path / "base", "llama", tokenizer=False, hidden_size=128,
                      intermediate_size=256, num_hidden_layers=4, dtype=torch.bfloat16)
    adapter = build_adapter(base, tmp_path / "adapter", target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    threads = collections.Counter()
    real_feed = hashing.ReadDigest.feed

    def feed(self, offset, data):
        threads[threading.current_thread().name] += len(data)
        real_feed(self, offset, data)

    monkeypatch.setattr(hashing.ReadDigest, "feed", feed)
    mergeflow.merge(base, adapter, tmp_path / "out", no_tokenizer=True, workers=1,
                    block_size="1MB")
    listed = json.loads((tmp_path / "out" / MANIFEST).read_text())["inputs"]["sha256"]["base"]
    weights = sorted(p.name for p in base.glob("*.safetensors"))
    assert {n: listed[n] for n in weights} == {
        n: hashlib.sha256((base / n).read_bytes()).hexdigest() for n in weights}
    merged = threads["mergeflow-hash-behind"]
    assert merged > sum(threads.values()) / 2, threads  # the merged weights; copies hash inline
