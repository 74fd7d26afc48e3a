"""The webhook receiver's outbox: every accepted delivery, recorded durably before it is answered.

A delivery is a row keyed by its idempotency key: the deployment, the spec fields, and what
became of it (``pending`` until a run exists, then ``launched`` with the run's id and name, or
``refused`` with the reason). With a batching window, a delivery is first ``held`` under its
group (the adapters of one base and one output folder with the same options), until the window
after the group's newest delivery has passed; then the group is launched as one run.

Rows are written with SQLite in WAL mode and ``synchronous=FULL``,
so an answered delivery survives a crash or power cut of the receiver; a restarted receiver
launches whatever is still pending. One receiver process owns one outbox file.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PENDING, LAUNCHED, REFUSED, HELD = "pending", "launched", "refused", "held"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    key TEXT PRIMARY KEY,
    deployment TEXT NOT NULL,
    fields TEXT NOT NULL,
    state TEXT NOT NULL,
    flow_run_id TEXT,
    flow_run_name TEXT,
    detail TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    received REAL NOT NULL,
    grp TEXT
)
"""
_COLUMNS = "key, deployment, fields, state, flow_run_id, flow_run_name, detail, attempts, " \
    "received, grp"


@dataclass(frozen=True)
class Delivery:
    """One accepted delivery and what became of it."""

    key: str
    deployment: str
    fields: dict[str, Any]
    state: str
    flow_run_id: str | None = None
    flow_run_name: str | None = None
    detail: str | None = None
    attempts: int = 0
    received: float = 0.0  # when it was recorded (seconds since the epoch)
    group: str | None = None  # its batching group while held


class Outbox:
    """Accepted deliveries in one SQLite file (see the module's text). Thread-safe."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a commit is on the disk when it returns
        self._db.execute(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(deliveries)")}
        if "grp" not in columns:  # an outbox written before batching windows
            self._db.execute("ALTER TABLE deliveries ADD COLUMN grp TEXT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add(self, key: str, deployment: str, fields: dict[str, Any],
            group: str | None = None) -> tuple[Delivery, bool]:
        """Record a delivery (durably) unless its key is there already: held under ``group``
        when one is given, else pending; returns the row and whether it is new."""
        with self._lock:
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO deliveries (key, deployment, fields, state, received, grp)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (key, deployment, json.dumps(fields, sort_keys=True),
                 HELD if group else PENDING, time.time(), group))
            return self._get(key), cursor.rowcount == 1

    def held(self) -> dict[str, list[Delivery]]:
        """The held deliveries by group, each group oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT key FROM deliveries WHERE state = ? ORDER BY received", (HELD,))
            groups: dict[str, list[Delivery]] = {}
            for (key,) in rows.fetchall():
                delivery = self._get(key)
                groups.setdefault(delivery.group, []).append(delivery)
            return groups

    def release(self, key: str) -> None:
        """A held delivery whose group turned out to be itself alone: launch it on its own."""
        with self._lock:
            self._db.execute("UPDATE deliveries SET state = ?, grp = NULL WHERE key = ? "
                             "AND state = ?", (PENDING, key, HELD))

    def get(self, key: str) -> Delivery | None:
        with self._lock:
            return self._get(key)

    def pending(self) -> list[Delivery]:
        """The deliveries with no run yet, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT key FROM deliveries WHERE state = ? ORDER BY received", (PENDING,))
            return [self._get(key) for (key,) in rows.fetchall()]

    def launched(self, key: str, flow_run_id: str, flow_run_name: str | None) -> None:
        self._set(key, LAUNCHED, flow_run_id=flow_run_id, flow_run_name=flow_run_name,
                  detail=None)

    def refused(self, key: str, detail: str) -> None:
        self._set(key, REFUSED, detail=detail)

    def retry_later(self, key: str, detail: str) -> None:
        """A launch attempt that failed for a reason worth retrying (the API unreachable)."""
        self._set(key, PENDING, detail=detail)

    def forget(self, key: str) -> None:
        """Drop a delivery that was answered with an error (the sender will send it again)."""
        with self._lock:
            self._db.execute("DELETE FROM deliveries WHERE key = ?", (key,))

    def _set(self, key: str, state: str, **columns: Any) -> None:
        names = ", ".join(f"{name} = ?" for name in columns)
        with self._lock:
            self._db.execute(
                f"UPDATE deliveries SET state = ?, attempts = attempts + 1, {names} "
                "WHERE key = ?", (state, *columns.values(), key))

    def _get(self, key: str) -> Delivery | None:
        row = self._db.execute(f"SELECT {_COLUMNS} FROM deliveries WHERE key = ?",
                               (key,)).fetchone()
        if row is None:
            return None
        return Delivery(row[0], row[1], json.loads(row[2]), *row[3:])
