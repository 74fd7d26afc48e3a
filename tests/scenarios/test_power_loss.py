"""Power loss (issue 15): a power cut at any moment of a merge, with everything that was not
fsynced dropped, never leaves a corrupt finished-looking output, and a rerun from what survived
produces the clean run's bytes.

The SIGKILL tests (test_crash.py) cannot see a missing fsync: the kernel keeps the page cache. So
the merge runs once in-process under a *journal* that hooks ``os.fsync``, ``os.replace`` and
every ``faults.checkpoint``, and records, for the folder the merge writes in:

* at every fsync of a file, its bytes (that is what a power cut keeps of it);
* at every fsync of a folder, its entries (name -> inode): only those names survive a cut;
* at every hook (a *cut point*, ~100 over planning, shards, records, finalize and publish) the
  folders' current entries.

The model of the disk is the conservative POSIX one: a file's data survives only if it was
fsynced after it was written, and a folder's entries (creates, renames, deletes) only if the
folder was fsynced after them. Entry changes not yet fsynced may each survive or not, in any
combination; a rename is one change (never both names or neither). Every cut point is replayed
with none of them, all of them, each one alone and all but each one - a few thousand disks,
checked in memory. On each, the folder at the output path must be absent or finished: its
manifest parses and every file it lists is there with the listed size and sha256. The distinct
disks of the "none" and "all" replays are then written out and the merge is rerun on each: it
must finish with output byte-identical to a clean run and nothing left beside it.

The checker can fail: ``test_broken_durability_is_caught`` removes one fsync from the code
(every folder fsync; the file fsync in ``atomic_write``; the fsync of the small files before the
manifest) and asserts the same replay finds a corrupt or unfinished output at the output path;
``test_without_leftover_cleanup_a_rerun_is_caught`` turns off the removal of half-written files
on resume and asserts the rerun check fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import staging_leftovers

import mergeflow
from mergeflow import faults
from mergeflow.output.folder import MANIFEST
from mergeflow.storage import durable, sink

pytestmark = pytest.mark.skipif(not (sys.platform.startswith("linux") and hasattr(os, "O_PATH")),
                                reason="the journal reads /proc/self/fd and holds O_PATH fds")

TARGETS = ["q_proj", "v_proj", "down_proj"]
SHARD = "150KB"

Key = tuple[int, int]  # (st_dev, st_ino) of a file or folder


@dataclass
class Cut:
    """The disk as a power cut at this moment could leave it (before choosing which pending
    entry changes survive)."""

    label: str
    synced_data: dict[Key, bytes]  # file -> its bytes at its last fsync
    synced_dirs: dict[Key, dict[str, Key]]  # folder -> its entries at its last fsync
    current: dict[Key, dict[str, Key]]  # folder -> its entries now


@dataclass
class Journal:
    """Records what is durable while a merge runs in ``root`` (see the module docstring)."""

    root: Path
    is_dir: dict[Key, bool] = field(default_factory=dict)
    synced_data: dict[Key, bytes] = field(default_factory=dict)
    synced_dirs: dict[Key, dict[str, Key]] = field(default_factory=dict)
    cuts: list[Cut] = field(default_factory=list)
    _held: dict[Key, int] = field(default_factory=dict)
    root_key: Key = (0, 0)

    def start(self) -> None:
        """Everything already below ``root`` counts as durable."""
        self.root = Path(os.path.realpath(self.root))
        st = os.stat(self.root)
        self.root_key = (st.st_dev, st.st_ino)
        self.is_dir[self.root_key] = True
        current = self._walk()
        self.synced_dirs.update(current)
        for key, is_dir in self.is_dir.items():
            if not is_dir:
                self.synced_data[key] = self._read_key(key)

    def close(self) -> None:
        for fd in self._held.values():
            os.close(fd)
        self._held.clear()

    # -- what the disk holds -----------------------------------------------------------------

    def _hold(self, key: Key, path: str | Path | int, dir_fd: int | None = None) -> None:
        """Keep the inode open (``path``: a name, or an open fd), so its number is never reused
        for another file during the run."""
        if key not in self._held:
            self._held[key] = os.dup(path) if isinstance(path, int) else \
                os.open(path, os.O_PATH | os.O_NOFOLLOW, dir_fd=dir_fd)

    def _read_key(self, key: Key) -> bytes:
        with open(f"/proc/self/fd/{self._held[key]}", "rb") as f:
            return f.read()

    def _entries(self, folder: str | int) -> dict[str, Key]:
        entries = {}
        with os.scandir(folder) as it:
            for entry in it:
                st = entry.stat(follow_symlinks=False)
                key = (st.st_dev, st.st_ino)
                self.is_dir[key] = stat.S_ISDIR(st.st_mode)
                if isinstance(folder, int):
                    self._hold(key, entry.name, dir_fd=folder)
                else:
                    self._hold(key, entry.path)
                entries[entry.name] = key
        return entries

    def _walk(self) -> dict[Key, dict[str, Key]]:
        """Every folder's entries below ``root`` now."""
        found, todo = {}, [(self.root_key, str(self.root))]
        while todo:
            key, path = todo.pop()
            found[key] = self._entries(path)
            todo += [(k, os.path.join(path, n)) for n, k in found[key].items() if self.is_dir[k]]
        return found

    def _mine(self, path: str | Path) -> bool:
        real = os.path.realpath(path)
        return real == str(self.root) or real.startswith(str(self.root) + os.sep)

    def cut(self, label: str) -> None:
        self.cuts.append(Cut(label, dict(self.synced_data), dict(self.synced_dirs), self._walk()))

    # -- the hooks ---------------------------------------------------------------------------

    def install(self, monkeypatch) -> None:
        real_fsync, real_replace, real_checkpoint = os.fsync, os.replace, faults.checkpoint

        def fsync(fd: int) -> None:
            path = os.readlink(f"/proc/self/fd/{fd}")
            if not self._mine(path.removesuffix(" (deleted)")):
                return real_fsync(fd)
            self.cut(f"before fsync {os.path.relpath(path, self.root)}")
            real_fsync(fd)
            st = os.fstat(fd)
            key = (st.st_dev, st.st_ino)
            self.is_dir[key] = stat.S_ISDIR(st.st_mode)
            self._hold(key, fd)
            if self.is_dir[key]:
                self.synced_dirs[key] = self._entries(fd)
            else:
                self.synced_data[key] = self._read_key(key)
            self.cut(f"after fsync {os.path.relpath(path, self.root)}")

        def replace(src, dst, *args, **kwargs):
            if not (self._mine(src) or self._mine(dst)):
                return real_replace(src, dst, *args, **kwargs)
            name = f"{os.path.relpath(src, self.root)} -> {os.path.relpath(dst, self.root)}"
            self.cut(f"before rename {name}")
            real_replace(src, dst, *args, **kwargs)
            self.cut(f"after rename {name}")

        def checkpoint(name: str) -> None:
            self.cut(f"at {name}")
            real_checkpoint(name)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(faults, "checkpoint", checkpoint)


# --------------------------------------------------------------------------- replaying a cut


def _groups(journal: Journal, cut: Cut) -> list[list[tuple[Key, str, Key | None]]]:
    """The entry changes not yet durable at ``cut``, grouped so that a rename (the same inode
    leaving one name and arriving at another) is one change: (folder, name, entry now)."""
    changes = []
    for folder in set(cut.current) | set(cut.synced_dirs):
        durable_entries = cut.synced_dirs.get(folder, {})
        now = cut.current.get(folder, {})  # a folder deleted since: empty now
        for name in set(durable_entries) | set(now):
            if durable_entries.get(name) != now.get(name):
                changes.append((folder, name, durable_entries.get(name), now.get(name)))
    parent = list(range(len(changes)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    by_key: dict[Key, int] = {}
    for i, (_, _, before, after) in enumerate(changes):
        for key in (before, after):
            if key is not None:
                if key in by_key:
                    parent[find(i)] = find(by_key[key])
                else:
                    by_key[key] = i
    groups: dict[int, list] = {}
    for i, (folder, name, _, after) in enumerate(changes):
        groups.setdefault(find(i), []).append((folder, name, after))
    return sorted(groups.values(), key=lambda g: sorted((n, str(f)) for f, n, _ in g))


def replay(journal: Journal, cut: Cut, survive: list[list]) -> dict:
    """The tree below ``root`` after the cut: durable entries plus the changes in ``survive``;
    each file holds its bytes as last fsynced (empty if never). Nested dicts of bytes."""
    listing = {folder: dict(entries) for folder, entries in cut.synced_dirs.items()}
    for group in survive:
        for folder, name, after in group:
            entries = listing.setdefault(folder, {})
            if after is None:
                entries.pop(name, None)
            else:
                entries[name] = after

    def build(folder: Key, depth: int) -> dict:
        assert depth < 10, "a folder inside itself"
        return {name: build(key, depth + 1) if journal.is_dir[key]
                else cut.synced_data.get(key, b"")
                for name, key in listing.get(folder, {}).items()}

    return build(journal.root_key, 0)


def output_problem(tree: dict) -> str | None:
    """Why the folder at the output path is not a finished, intact output (None: absent or
    finished with every listed file as the manifest says)."""
    out = tree.get("out")
    if out is None:
        return None
    if not isinstance(out, dict):
        return "the output path is a file"
    if MANIFEST not in out:
        return f"a folder without {MANIFEST} at the output path: {sorted(out)}"
    try:
        files = json.loads(out[MANIFEST])["files"]
    except (ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable ({len(out[MANIFEST])} bytes)"
    for name, entry in files.items():
        data = out.get(name)
        if not isinstance(data, bytes):
            return f"{name} is listed in the manifest but missing"
        if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            return f"{name} does not match the manifest ({len(data)} of {entry['size']} bytes)"
    return None


def strategies(groups: list) -> list[tuple[str, list]]:
    """Which pending changes survive: none, all, each alone, all but each."""
    out = [("none", []), ("all", groups)]
    for i, group in enumerate(groups):
        out.append((f"only {i}", [group]))
        if len(groups) > 1:
            out.append((f"all but {i}", groups[:i] + groups[i + 1:]))
    return out


def check_every_cut(journal: Journal) -> tuple[int, list[str], list[tuple[str, dict]]]:
    """Replay every cut with every strategy. Returns the number of disks checked, the problems
    found, and the distinct "none"/"all" disks (to rerun the merge on)."""
    checked, problems, rerun, seen = 0, [], [], set()
    for cut in journal.cuts:
        for name, survive in strategies(_groups(journal, cut)):
            tree = replay(journal, cut, survive)
            checked += 1
            problem = output_problem(tree)
            if problem:
                problems.append(f"cut {cut.label!r}, {name}: {problem}")
            if name in ("none", "all"):
                digest = _digest(tree)
                if digest not in seen:
                    seen.add(digest)
                    rerun.append((f"{cut.label} ({name})", tree))
    return checked, problems, rerun


def _digest(tree: dict) -> str:
    h = hashlib.sha256()

    def feed(node: dict) -> None:
        for name in sorted(node):
            h.update(name.encode() + b"\0")
            if isinstance(node[name], dict):
                h.update(b"d")
                feed(node[name])
                h.update(b"u")
            else:
                h.update(b"f" + hashlib.sha256(node[name]).digest())

    feed(tree)
    return h.hexdigest()


def materialize(tree: dict, folder: Path) -> None:
    """Write a replayed tree out. The rerun is another process than the one the cut stopped, so
    a temporary file named after the dead process's pid (``.<name>.<pid>.tmp``) is renamed to
    another pid: this process's own writes must not happen to reuse and hide it."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, node in tree.items():
        if isinstance(node, dict):
            materialize(node, folder / name)
        else:
            (folder / re.sub(rf"\.{os.getpid()}\.tmp$", f".{os.getpid() + 1}.tmp", name)
             ).write_bytes(node)


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# --------------------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def inputs(make_base, make_adapter):
    base = make_base("llama")
    return base, make_adapter(base, target_modules=TARGETS)


@pytest.fixture(scope="module")
def clean(inputs, tmp_path_factory):
    """A clean run's output files (and the options every run here uses)."""
    base, adapter = inputs
    out = tmp_path_factory.mktemp("clean") / "out"
    report = mergeflow.merge(base, adapter, out, max_shard_size=SHARD, workers=1)
    assert report.shards >= 3, "the merge must span several shards"
    return files_of(out)


def journaled_merge(inputs, root: Path, monkeypatch, *, previous: Path | None = None) -> Journal:
    """Run the merge into ``root/out`` under a journal; ``previous``: a finished output of
    another merge already (durably) at ``root/out``, which the run replaces."""
    base, adapter = inputs
    root.mkdir()
    if previous is not None:
        materialize(files_of(previous), root / "out")
    journal = Journal(root)
    journal.start()
    with monkeypatch.context() as patch:
        journal.install(patch)
        journal.cut("start")
        mergeflow.merge(base, adapter, root / "out", max_shard_size=SHARD, workers=1,
                        overwrite=previous is not None)
        journal.cut("end")
    return journal


@pytest.fixture(scope="module")
def previous(inputs, tmp_path_factory):
    """A finished output of a different merge (another shard size), to be replaced."""
    base, adapter = inputs
    out = tmp_path_factory.mktemp("previous") / "out"
    mergeflow.merge(base, adapter, out, max_shard_size="400KB", workers=1)
    return out


@pytest.mark.parametrize(("scenario", "route"), [
    ("fresh", "direct"), ("fresh", "cached"), ("overwrite", "direct")])
def test_power_cut_anywhere_leaves_no_corrupt_output_and_reruns_byte_identical(
        inputs, clean, previous, tmp_path, monkeypatch, scenario, route):
    """``route``: the shards' bytes past the page cache (O_DIRECT, where the file system has
    it) or through it (mergeflow.storage.sink)."""
    monkeypatch.setenv(sink.DIRECT_WRITES, "1" if route == "direct" else "0")
    journal = journaled_merge(inputs, tmp_path / "run", monkeypatch,
                              previous=previous if scenario == "overwrite" else None)
    try:
        assert len(journal.cuts) >= 50
        checked, problems, rerun = check_every_cut(journal)
    finally:
        journal.close()
    assert not problems, f"{len(problems)} of {checked} disks:\n" + "\n".join(problems[:20])
    assert len(rerun) >= 10

    base, adapter = inputs
    for i, (label, tree) in enumerate(rerun):
        out = tmp_path / f"rerun-{i}" / "out"
        materialize(tree, out.parent)
        mergeflow.merge(base, adapter, out, max_shard_size=SHARD, workers=1,
                        overwrite=scenario == "overwrite")
        assert files_of(out) == clean, f"rerun after the cut {label}: output differs"
        assert staging_leftovers(out) == [], f"rerun after the cut {label}: leftovers"
    print(f"\npower loss ({scenario}): {len(journal.cuts)} cut points, {checked} disks checked, "
          f"0 corrupt; {len(rerun)} distinct disks rerun, all byte-identical")


def _replace_everywhere(monkeypatch, original, replacement) -> None:
    """Bind ``replacement`` wherever a Mergeflow module holds ``original`` (``from x import``)."""
    for name, module in list(sys.modules.items()):
        if name == "mergeflow" or name.startswith("mergeflow."):
            for attr, value in list(vars(module).items()):
                if value is original:
                    monkeypatch.setattr(module, attr, replacement)


def _atomic_write_without_file_fsync(path, data) -> None:
    """durable.atomic_write with its file fsync removed (rename and folder fsync kept)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)
    durable.fsync_dir(path.parent)


BROKEN = {
    "no-folder-fsync": (durable.fsync_dir, lambda folder: None),
    "no-file-fsync-in-atomic-write": (durable.atomic_write, _atomic_write_without_file_fsync),
    "no-fsync-of-small-files-before-manifest": (durable.fsync_file, lambda path: None),
}


@pytest.mark.parametrize("broken", sorted(BROKEN))
def test_broken_durability_is_caught(inputs, tmp_path, monkeypatch, broken):
    """Remove one fsync from the code: some power cut then leaves a corrupt or unfinished folder
    at the output path, and the checker finds it."""
    original, replacement = BROKEN[broken]
    with monkeypatch.context() as patch:
        _replace_everywhere(patch, original, replacement)
        journal = journaled_merge(inputs, tmp_path / "run", monkeypatch)
    try:
        _, problems, _ = check_every_cut(journal)
    finally:
        journal.close()
    assert problems, f"{broken}: no power cut left a bad output; the checker cannot see it"


def test_without_leftover_cleanup_a_rerun_is_caught(inputs, clean, tmp_path, monkeypatch):
    """A cut inside ``atomic_write`` (after the fsync, before the rename) can leave its durable
    temporary file in staging. Without :meth:`Staging.clear_leftovers` on resume, the rerun
    would publish it or refuse the output (verification: not listed in the manifest) on every
    rerun: the rerun check catches that."""
    from mergeflow.errors import MergeError
    from mergeflow.storage.staging import Staging

    monkeypatch.setattr(Staging, "clear_leftovers", lambda self: None)
    journal = journaled_merge(inputs, tmp_path / "run", monkeypatch)
    try:
        _, problems, rerun = check_every_cut(journal)
    finally:
        journal.close()
    assert not problems
    left = [(label, tree) for label, tree in rerun
            if any(name.endswith(".tmp") for name in tree.get(".out.mergeflow-partial", {}))]
    assert left, "no cut leaves an atomic_write temporary file in staging"
    tree = left[-1][1]
    out = tmp_path / "rerun" / "out"
    materialize(tree, out.parent)
    base, adapter = inputs
    with pytest.raises(MergeError, match="not listed in the manifest"):
        mergeflow.merge(base, adapter, out, max_shard_size=SHARD, workers=1)
