"""Input folders are confined: a file Mergeflow reads or copies from an input folder is never a
symlink that leads out of that folder (``merges.txt -> /etc/passwd`` would otherwise be copied
into the output and published).

Two content-addressed layouts are the exceptions: the Hugging Face cache, where
``models--org--name/snapshots/<rev>/`` holds links into the same repo's ``blobs/``, and the live
route's own work folder (``.mergeflow-live-*/{base,adapter}/`` -> ``../blobs/``, see
:mod:`mergeflow.live.save`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from mergeflow.errors import InputError

_HF_REPO_PREFIXES = ("models--", "datasets--", "spaces--")
LIVE_WORK_PREFIX = ".mergeflow-live-"  # the live route's work folders (mergeflow.live.save)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def allowed_roots(folder: Path) -> list[str]:
    """Where the files of ``folder`` may really live: the folder itself (resolved) and, for a
    Hugging Face cache snapshot or a live-route work folder, its ``blobs/``."""
    roots = [os.path.realpath(folder)]
    parent = folder.parent
    if parent.name == "snapshots" and parent.parent.name.startswith(_HF_REPO_PREFIXES):
        roots.append(os.path.realpath(parent.parent / "blobs"))
    if parent.name.startswith(LIVE_WORK_PREFIX):
        roots.append(os.path.realpath(parent / "blobs"))
    return roots


def check_confined(folder: Path, names: Iterable[str]) -> None:
    """Refuse any of ``names`` (present in ``folder``) that resolves outside the folder.

    Raises:
        InputError: naming the link and where it leads, and the fix.
    """
    roots = allowed_roots(folder)
    for name in names:
        path = folder / name
        if not os.path.lexists(path):
            continue
        target = os.path.realpath(path)
        if not any(_inside(target, root) for root in roots):
            named = os.readlink(path) if os.path.islink(path) else target
            raise InputError(
                f"{path}: a symlink to {named}, outside {folder}; Mergeflow reads inputs only "
                "from inside their folders (so nothing outside is copied into the output). "
                "Replace the link with a copy of the file, or drop it")


def confined_file(folder: Path, name: str) -> Path:
    """``folder / name`` once :func:`check_confined` allows it (for a copy)."""
    check_confined(folder, [name])
    return folder / name
