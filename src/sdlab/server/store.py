"""The server's SQLite database (`sdlab-server.sqlite` in the output folder): the job history.

Jobs are written when queued, started and finished (not per step), so a restart keeps the history; a job
that was queued or running when the server stopped is marked `interrupted` on the next start.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

DB_NAME = "sdlab-server.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    mode TEXT NOT NULL,
    model TEXT,
    request TEXT NOT NULL,
    images TEXT NOT NULL DEFAULT '[]',
    infotexts TEXT NOT NULL DEFAULT '[]',
    error TEXT,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    step INTEGER NOT NULL DEFAULT 0,
    steps INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created);
"""

_JSON_COLUMNS = ("request", "images", "infotexts")
_COLUMNS = ("id", "status", "mode", "model", "request", "images", "infotexts", "error", "created", "started",
            "finished", "step", "steps")
UNFINISHED = ("queued", "running")


class Store:
    """One connection shared by the server's threads under a lock (SQLite calls are short)."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / DB_NAME
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")     # WAL: no fsync per commit, never corrupt
            self._db.executescript(_SCHEMA)
            self._db.execute(
                f"UPDATE jobs SET status = 'interrupted', error = 'the server stopped before this job finished' "
                f"WHERE status IN {UNFINISHED}"
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def save_job(self, record: dict[str, Any]) -> None:
        """Insert or replace a job (`record` has every column; JSON columns as Python values)."""
        values = [json.dumps(record[c]) if c in _JSON_COLUMNS else record[c] for c in _COLUMNS]
        with self._lock:
            self._db.execute(
                f"INSERT OR REPLACE INTO jobs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
                values,
            )

    def job(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _record(row)

    def jobs(self, limit: int) -> list[dict[str, Any]]:
        """The newest `limit` jobs, newest first."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM jobs ORDER BY created DESC, rowid DESC LIMIT ?", (limit,)
            ).fetchall()
        return [_record(row) for row in rows]


def _record(row: tuple) -> dict[str, Any]:
    record = dict(zip(_COLUMNS, row))
    for column in _JSON_COLUMNS:
        record[column] = json.loads(record[column])
    return record
