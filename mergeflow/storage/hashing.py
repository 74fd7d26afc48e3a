"""sha256 of files, remembered by (path, size, mtime) so unchanged inputs are hashed once.

Three ways to know a file's sha256 without hashing it on the critical path:

* the Hugging Face cache names every LFS blob by its sha256 (``blobs/<64 hex>``), so a file
  that resolves there is never read to be hashed;
* :class:`HashCache` remembers hashes by resolved path, size and mtime;
* :func:`hash_while_reading` hashes a safetensors file from the reads the merge makes of it
  anyway (:class:`ReadDigest`, fed by :func:`observe_read`), so the base is read once, not a
  second time for the manifest: on the reading thread, or on a thread of its own behind the
  reads (:func:`hashing_behind`); before the merge reads, idle time is used too, from before
  torch is imported (:func:`hash_ahead`);
* :func:`prefetch` hashes the other files on a background thread (``hashlib`` releases the GIL)
  while the merge runs; :meth:`HashCache.sha256` then waits for that result instead of reading
  the file a second time.

Merge plans identify their inputs by :func:`file_identity` (size and mtime, the same trust
the memo places in them), so planning never waits for a hash; the manifest still lists every
input's sha256.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import re
import struct
import threading
from bisect import insort
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

CHUNK = 8 * 2**20


def cache_dir() -> Path:
    """Mergeflow's cache folder: ``$MERGEFLOW_CACHE``, else ``~/.cache/mergeflow``."""
    return Path(os.environ.get("MERGEFLOW_CACHE", Path.home() / ".cache" / "mergeflow"))


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in chunks into one reused buffer (constant memory)."""
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        _hash_range(digest, fd, 0, os.fstat(fd).st_size, path)
    finally:
        os.close(fd)
    return digest.hexdigest()


def _hash_range(digest, fd: int, start: int, stop: int, path: Path) -> None:
    """Feed bytes ``[start, stop)`` of an open file to ``digest``, ``CHUNK`` at a time.

    Raises:
        OSError: the file cannot be read, or ends before ``stop``.
    """
    buffer = memoryview(bytearray(min(CHUNK, max(stop - start, 0))))
    while start < stop:
        got = os.preadv(fd, [buffer[:stop - start]], start)
        if got == 0:
            raise OSError(f"{path}: ends at byte {start}, before {stop}")
        digest.update(buffer[:got])
        start += got


_BLOB = re.compile(r"[0-9a-f]{64}")
_lock = threading.Lock()
_known: dict[str, str] = {}  # memo key -> sha256, computed by this process
_pending: dict[str, threading.Event] = {}  # memo key -> set when its hash is in _known


def known_sha256(path: Path) -> str | None:
    """The sha256 a content-addressed store already names the file by: a Hugging Face cache
    LFS blob (``.../blobs/<sha256>``; smaller files' blobs are named by their git sha1)."""
    real = Path(path).resolve()
    return real.name if real.parent.name == "blobs" and _BLOB.fullmatch(real.name) else None


def file_identity(path: Path) -> str:
    """What a plan records about an input file: its size and mtime (ns), or its sha256 when a
    content-addressed cache names it so. Stable across runs, and free to compute."""
    known = known_sha256(path)
    if known is not None:
        return f"sha256:{known}"
    st = Path(path).stat()
    return f"size:{st.st_size},mtime_ns:{st.st_mtime_ns}"


def _memo_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def prefetch(paths: Iterable[Path]) -> threading.Thread:
    """Hash ``paths`` on a daemon thread, into this process's memo (and the on-disk one)."""
    todo = []
    with _lock:
        for path in paths:
            key = _memo_key(path)
            if key not in _known and key not in _pending:
                _pending[key] = threading.Event()
                todo.append((path, key))

    def run() -> None:
        cache = HashCache()
        for path, key in todo:
            try:
                digest = cache.entries.get(key) or known_sha256(path) or sha256_file(path)
                cache.entries[key] = digest
                cache._dirty = True
                with _lock:
                    _known[key] = digest
            except OSError:
                pass  # the caller hashes it itself (and sees the error)
            finally:
                with _lock:
                    event = _pending.pop(key, None)
                if event is not None:
                    event.set()
        cache.save()

    thread = threading.Thread(target=run, name="mergeflow-prefetch-hashes", daemon=True)
    thread.start()
    return thread


class HashCache:
    """A small JSON memo of file hashes keyed by resolved path, size and mtime."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or cache_dir() / "sha256.json"
        try:
            self.entries: dict[str, str] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.entries = {}
        self._dirty = False

    def sha256(self, path: Path) -> str:
        """The file's sha256, from the memo when its size and mtime are unchanged."""
        key = _memo_key(path)
        if key in self.entries:
            return self.entries[key]
        with _lock:
            event = _pending.get(key)
        if event is not None:
            event.wait()
        with _lock:
            digest = _known.get(key)
        if digest is None:
            digest = _finish_read_digest(path, key) or known_sha256(path) or sha256_file(path)
        self.entries[key] = digest
        self._dirty = True
        return digest

    def save(self) -> None:
        """Persist the memo (atomically); a failure to write it only costs a rehash."""
        if not self._dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_text(json.dumps(self.entries))
            os.replace(tmp, self.path)
        except OSError:
            pass


def fingerprint_files(folder: Path, names: list[str], cache: HashCache) -> dict[str, str]:
    """sha256 of each named file of a folder that exists, in name order."""
    return {n: cache.sha256(folder / n) for n in sorted(names) if (folder / n).is_file()}


def identify_files(folder: Path, names: list[str]) -> dict[str, str]:
    """:func:`file_identity` of each named file of a folder that exists, in name order."""
    return {n: file_identity(folder / n) for n in sorted(names) if (folder / n).is_file()}


class ReadDigest:
    """The sha256 of one file, built from the byte ranges a merge reads of it anyway.

    sha256 is sequential, so the digest has a frontier: a read that starts at or before it
    (and reaches past it) is hashed on the reading thread; a read that starts beyond it is only
    remembered. When the frontier reaches a remembered range (the merge read it out of file
    order), that range is read again from the file and hashed; :meth:`finish` reads whatever
    the merge never read (a resumed run's finished shards, bytes no tensor covers). Reading in
    file order therefore reads each byte once; any other order costs at most today's second read
    of the parts read out of order.

    Args:
        path: the file (a safetensors file: hashing starts with its header).
        key: its memo key (resolved path, size and mtime) when it was registered.
    """

    def __init__(self, path: Path, key: str) -> None:
        self.path = path
        self.key = key
        self.real = str(path.resolve())  # how the reads name it (:func:`observe_read`)
        self.size = path.stat().st_size  # as registered: finish() checks it is unchanged
        self._sha = hashlib.sha256()
        self._at = 0  # bytes [0, _at) are in _sha
        self._ahead: list[tuple[int, int]] = []  # sorted ranges read beyond _at, not hashed
        self._lock = threading.Lock()
        self._broken = False  # a read of the file failed: finish() gives up, the caller rehashes
        self._digest: str | None = None
        self.fed = False  # the merge has read from the file (so its reads are under way)
        with self._lock:
            self._catch_up_to(self._header_end())

    def _header_end(self) -> int:
        """Where a safetensors file's data starts (8 length bytes, then the JSON header)."""
        try:
            with open(self.path, "rb") as f:
                head = f.read(8)
        except OSError:
            self._broken = True
            return 0
        return 8 + struct.unpack("<Q", head)[0] if len(head) == 8 else 0

    def feed(self, offset: int, data: memoryview) -> None:
        """Bytes ``[offset, offset + len(data))`` of the file, just read by the merge; never
        raises (a failure only leaves the hash to :meth:`finish`'s caller)."""
        end = offset + len(data)
        self.fed = True
        with self._lock:
            if self._digest is not None or self._broken or end <= self._at:
                return
            if offset > self._at:
                insort(self._ahead, (offset, end))
                return
            self._sha.update(data[self._at - offset:])  # releases the GIL for large data
            self._at = end
            self._take_ahead()

    def cancel(self) -> None:
        """Stop: no more reads are hashed, :meth:`finish` gives None."""
        with self._lock:
            self._broken = True

    def advance(self) -> bool:
        """Read and hash the next ``CHUNK`` bytes past the frontier (the idle-time filler's
        step). False once there is nothing left to hash."""
        with self._lock:
            if self._digest is not None or self._broken:
                return False
            self._catch_up_to(min(self._at + CHUNK, self.size))
            self._take_ahead()
            return self._at < self.size and not self._broken

    def _take_ahead(self) -> None:
        """Hash the remembered ranges the frontier has reached, reading them again."""
        while self._ahead and self._ahead[0][0] <= self._at:
            _, end = self._ahead.pop(0)
            self._catch_up_to(end)

    def _catch_up_to(self, stop: int) -> None:
        """Read and hash the file from the frontier up to ``stop``."""
        if self._broken or stop <= self._at:
            return
        try:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                _hash_range(self._sha, fd, self._at, stop, self.path)
            finally:
                os.close(fd)
            self._at = stop
        except OSError:
            self._broken = True

    def finish(self) -> str | None:
        """The file's sha256: the rest of the file read and hashed. None when the file changed
        since registration or could not be read (the caller hashes it whole)."""
        with self._lock:
            if self._digest is None and not self._broken:
                try:
                    unchanged = _memo_key(self.path) == self.key
                except OSError:
                    unchanged = False
                if not unchanged:
                    return None
                self._catch_up_to(self.size)
                if not self._broken:
                    self._digest = self._sha.hexdigest()
            return self._digest


_reading: dict[str, ReadDigest] = {}  # resolved path -> its digest, while a merge reads it


@dataclass
class InputHashes:
    """The inputs' identities as a plan records them, and the hashing of them under way."""

    identities: dict[str, dict[str, str]]  # role -> file name -> identity (file_identity)
    digests: list[ReadDigest]  # the files hashed from the merge's reads

    def cancel(self) -> None:
        """Stop hashing from reads (the merge will not run): forget the digests."""
        for digest in self.digests:
            _forget(digest)


def start_hashes(identities: dict[str, dict[str, str]], read: list[Path],
                 other: list[Path]) -> InputHashes:
    """Start hashing a merge's inputs for its manifest: the files among ``read`` that the merge
    will read in this process, from those reads (:func:`hash_while_reading`); the rest on a
    background thread (:func:`prefetch`)."""
    digests, rest = hash_while_reading(read)
    prefetch([*rest, *other])
    return InputHashes(identities, digests)


def hash_while_reading(paths: Iterable[Path]) -> tuple[list[ReadDigest], list[Path]]:
    """Have each safetensors file among ``paths`` hashed from the merge's own reads of it
    (:class:`ReadDigest`; :meth:`HashCache.sha256` finishes it), and from idle time before the
    merge reads (:func:`_fill_until_read`). Returns the digests (those :func:`hash_ahead`
    started included: taken over), and the other files and those whose hash is already known,
    for :func:`prefetch`."""
    digests, rest = _register(paths)
    _take_over_ahead(digests)
    if digests:
        _Filler(digests)
    return digests, rest


def _register(paths: Iterable[Path]) -> tuple[list[ReadDigest], list[Path]]:
    """A digest for each safetensors file among ``paths`` that is not hashed yet (reusing one
    :func:`hash_ahead` started), and the rest (see :func:`hash_while_reading`)."""
    rest: list[Path] = []
    digests: list[ReadDigest] = []
    remembered = HashCache().entries
    ahead = _ahead.digests if _ahead is not None else []
    for path in paths:
        if path.suffix != ".safetensors" or not path.is_file() or known_sha256(path):
            rest.append(path)
            continue
        key = _memo_key(path)
        with _lock:
            current = _reading.get(str(path.resolve()))
            if key in _known:
                continue
        if current is not None and current.key == key:  # under way already
            if current in ahead:  # started by hash_ahead: this merge takes it over
                digests.append(current)
            continue
        if key in remembered:
            rest.append(path)
            continue
        digest = ReadDigest(path, key)
        with _lock:
            _reading[digest.real] = digest
        digests.append(digest)
    return digests, rest


def hash_ahead(paths: list[Path]) -> None:
    """Start hashing the safetensors files among ``paths`` before anything else is known of the
    merge that will read them: a command line calls it before it imports torch, which leaves a
    core idle. The next :func:`hash_while_reading` takes over the digests of the files it asks
    for and drops the others; :func:`pause_hashing` stops the thread before a fork. Never
    raises: an unreadable file is left to planning to report."""
    global _ahead
    try:
        digests, _ = _register(paths)
    except OSError:
        return
    _take_over_ahead([])  # one set of files hashed ahead at a time
    if digests:
        _ahead = _Ahead(digests, _Filler(digests))


def pause_hashing() -> None:
    """Stop the thread :func:`hash_ahead` started, and wait for it, so that no other thread
    runs (a process about to ``fork``); its digests keep their progress, and
    :func:`hash_while_reading` goes on from there."""
    if _ahead is not None:
        _ahead.filler.stop()


class _Filler:
    """A thread hashing files ahead of the merge's reads (:func:`_fill_until_read`), started
    at once."""

    def __init__(self, digests: list[ReadDigest]) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=_fill_until_read, args=(digests, self._stop),
                                        daemon=True, name="mergeflow-hash-before-reads")
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread (after its current chunk) and wait for it."""
        self._stop.set()
        self._thread.join()


@dataclass
class _Ahead:
    """What :func:`hash_ahead` started: its digests and the thread filling them."""

    digests: list[ReadDigest]
    filler: _Filler


_ahead: _Ahead | None = None


def _take_over_ahead(taken: list[ReadDigest]) -> None:
    """End :func:`hash_ahead`'s part: stop its thread, and forget the digests of the files
    that are not among ``taken`` (the merge does not read them)."""
    global _ahead
    ahead, _ahead = _ahead, None
    if ahead is None:
        return
    ahead.filler.stop()
    for digest in ahead.digests:
        if digest not in taken:
            _forget(digest)


def _forget(digest: ReadDigest) -> None:
    """Stop hashing from reads of ``digest``'s file."""
    digest.cancel()
    with _lock:
        if _reading.get(digest.real) is digest:
            del _reading[digest.real]


def _fill_until_read(digests: list[ReadDigest], stop: threading.Event) -> None:
    """Hash the files ahead of the merge while it has not started reading them: the time
    before planning (importing torch), and between planning and the first read (importing
    transformers for a new base's layout, reading headers) leaves a core idle. Stops at the
    merge's first read, so from then on each byte is hashed from the read that merges it, or
    when told (``stop``)."""
    for digest in digests:
        while not stop.is_set() and not any(d.fed for d in digests) and digest.advance():
            pass


def observe_read(real_path: str, offset: int, data: memoryview) -> None:
    """Hand bytes the merge just read from a file (by its resolved path) to the file's
    :class:`ReadDigest`, if one is waiting for them; a dict lookup otherwise. Inside
    :func:`hashing_behind`, the bytes are hashed on the reading thread's hasher instead."""
    if not _reading:
        return
    digest = _reading.get(real_path)
    if digest is None:
        return
    behind = getattr(_this_thread, "deferring", None)
    if behind is not None:
        behind.submit(digest, offset, data)
    else:
        digest.feed(offset, data)


@contextlib.contextmanager
def hashing_behind(slot: int) -> Iterator[None]:
    """Reads observed in this block (:func:`observe_read`) into this thread's read buffer
    ``slot`` are hashed on a thread of their own instead of on the reading thread, so the
    merge's math and its input's sha256 run on two cores. Entering waits until the slot's
    previous read is hashed (its buffer may then be read into again); the caller must leave the
    buffer unchanged until it reads into the same slot again, or :func:`wait_for_hashes`."""
    behind = getattr(_this_thread, "behind", None)
    if behind is None:
        behind = _this_thread.behind = _HashBehind()
    behind.wait(behind.slots.get(slot, 0))
    _this_thread.deferring = behind
    try:
        yield
    finally:
        _this_thread.deferring = None
        behind.slots[slot] = behind.submitted


def wait_for_hashes() -> None:
    """Wait until every read this thread deferred (:func:`hashing_behind`) is hashed, so that
    every read buffer may be reused and the digests are whole up to here."""
    behind = getattr(_this_thread, "behind", None)
    if behind is not None:
        behind.wait(behind.submitted)


_this_thread = threading.local()


class _HashBehind:
    """One reading thread's hasher: feeds its deferred reads to their digests in the order they
    were read, on a daemon thread that ends after a second without work (and starts again)."""

    IDLE_S = 1.0

    def __init__(self) -> None:
        self._todo: queue.SimpleQueue = queue.SimpleQueue()
        self._state = threading.Condition()
        self.submitted = 0  # reads submitted
        self._hashed = 0  # reads hashed (in submission order)
        self._running = False
        self.slots: dict[int, int] = {}  # read slot -> reads submitted up to its last read

    def submit(self, digest: ReadDigest, offset: int, data: memoryview) -> None:
        with self._state:
            self.submitted += 1
            self._todo.put((digest, offset, data))
            if not self._running:
                self._running = True
                threading.Thread(target=self._run, name="mergeflow-hash-behind",
                                 daemon=True).start()

    def wait(self, count: int) -> None:
        """Until the first ``count`` reads submitted are hashed."""
        with self._state:
            while self._hashed < count:
                self._state.wait()

    def _run(self) -> None:
        while True:
            try:
                digest, offset, data = self._todo.get(timeout=self.IDLE_S)
            except queue.Empty:
                with self._state:
                    if self._todo.empty():
                        self._running = False
                        return
                continue
            try:
                digest.feed(offset, data)  # never raises
            finally:
                with self._state:
                    self._hashed += 1
                    self._state.notify_all()


def _finish_read_digest(path: Path, key: str) -> str | None:
    """The sha256 a :class:`ReadDigest` built for ``path`` (its memo key ``key``), if any."""
    real = str(path.resolve())
    with _lock:
        digest = _reading.get(real)
    if digest is None or digest.key != key:
        return None
    result = digest.finish()
    with _lock:
        if _reading.get(real) is digest:
            del _reading[real]
        if result is not None:
            _known[key] = result
    return result
