"""The server's SQLite database (`sdlab-server.sqlite` in the output folder): the job history.

Jobs are written when queued, started, done with a batch's pictures and finished (not per step), so a restart
keeps the history; a job
the server stopped under is recorded `interrupted` as it stops, or on the next start when it could not be
(a crash, a failed write). A database that cannot be opened, read or written is a `StoreError` naming
the file and why; a row that cannot be read (a damaged page, a hand edit) is listed as damaged.

One server uses an output folder at a time: it holds the folder's lock file (`LOCK_NAME`) while it runs, and
a second `sdlab serve` on the folder is refused (`StoreError`), so a starting server marks interrupted only
jobs no live server is running. On a file system without file locks (some network mounts) it warns and runs
unlocked.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from sdlab.utils.files import LockHeld, hold_lock_file

logger = logging.getLogger(__name__)

DB_NAME = "sdlab-server.sqlite"
LOCK_NAME = "sdlab-server.lock"     # held by the server using the output folder; holds its process id
# How long a write waits while another program holds the file's write lock: briefly on a request's path (the
# client gets a 503 and can retry), longer for the worker's writes (a job starts or ends), which nobody awaits.
REQUEST_BUSY_TIMEOUT_S = 2.0
WORKER_BUSY_TIMEOUT_S = 30.0
INTERRUPTED_ERROR = "the server stopped before this job finished"

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

_JSON_COLUMNS = {"request": dict, "images": list, "infotexts": list}     # each one's JSON type
_COLUMNS = ("id", "status", "mode", "model", "request", "images", "infotexts", "error", "created", "started",
            "finished", "step", "steps")
UNFINISHED = ("queued", "running")
_HINTS = {                      # sqlite3's error name -> what the user can do about it
    "SQLITE_BUSY": "another program holds it (another sdlab serve on the same output folder?)",
    "SQLITE_NOTADB": "move the file away to start a new history",
    "SQLITE_CORRUPT": "move the file away to start a new history",
    "SQLITE_CANTOPEN": "it must be a file this user can read and write",
    "SQLITE_READONLY": "it must be a file this user can read and write",
}


def _readable(column: str) -> str:
    """SQL of a JSON column as itself, or `{}` where it cannot be read (a damaged page, a hand edit), so that SQLite's
    JSON functions over every row (the list's filter, a script job's parts, the pictures rows hold) pass over such a
    row instead of failing the whole query with "malformed JSON"."""
    return f"CASE WHEN json_valid({column}) THEN {column} ELSE '{{}}' END"


class StoreError(Exception):
    """The job history cannot be opened, read or written; the message names the file and why."""


class _Connection:
    """One sqlite3 connection, shared by the server's threads under its lock (SQLite calls are short)."""

    def __init__(self, path: Path, busy_timeout_s: float) -> None:
        self.db = sqlite3.connect(path, timeout=busy_timeout_s, check_same_thread=False, isolation_level=None)
        self.lock = threading.Lock()

    def close(self) -> None:
        with self.lock:
            self.db.close()


class Store:
    """Two connections: the requests' (reads, and writes that wait `REQUEST_BUSY_TIMEOUT_S` at most) and the
    worker's (writes that wait `WORKER_BUSY_TIMEOUT_S`), so a worker write that waits on a lock held by
    another program holds up no request (in WAL mode reads do not wait on writers)."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / DB_NAME
        self._lock = _hold_folder(folder)
        try:
            self._requests = _Connection(self.path, REQUEST_BUSY_TIMEOUT_S)
            self._worker = _Connection(self.path, WORKER_BUSY_TIMEOUT_S)
        except sqlite3.Error as err:
            self._lock.close()
            raise self._error("cannot open", err) from None
        try:
            with self._using("cannot open", self._worker) as db:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")     # WAL: no fsync per commit, never corrupt
                db.executescript(_SCHEMA)
                db.execute(f"UPDATE jobs SET status = 'interrupted', error = ?, "
                           f"finished = COALESCE(finished, started, created) WHERE status IN {UNFINISHED}",
                           (INTERRUPTED_ERROR,))
        except StoreError:
            self.close()
            raise

    def close(self) -> None:
        self._requests.close()
        self._worker.close()
        self._lock.close()

    def save_job(self, record: dict[str, Any], *, by_worker: bool = False) -> None:
        """Insert or replace a job (`record` has every column; JSON columns as Python values); `by_worker`:
        on the worker's connection, which waits longer for a lock another program holds."""
        values = [json.dumps(record[c]) if c in _JSON_COLUMNS else record[c] for c in _COLUMNS]
        with self._using("cannot write", self._worker if by_worker else self._requests) as db:
            db.execute(f"INSERT OR REPLACE INTO jobs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
                       values)

    def job(self, job_id: str) -> dict[str, Any] | None:
        with self._using("cannot read", self._requests) as db:
            row = db.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _record(row)

    def jobs(self, limit: int, without: str | None = None, before: str | None = None) -> list[dict[str, Any]]:
        """The newest `limit` jobs, newest first; with `without`, only those whose request has no such key; with
        `before` (a job's id), only those listed after that job (older, or as old and written earlier): the next
        page of the list. A `before` the history lacks is a `KeyError`."""
        where, values = [], []
        if without is not None:
            where.append(f"json_extract({_readable('request')}, ?) IS NULL")    # a damaged row: listed
            values.append(f'$."{without}"')
        with self._using("cannot read", self._requests) as db:
            if before is not None:
                after = db.execute("SELECT created, rowid FROM jobs WHERE id = ?", (before,)).fetchone()
                if after is None:
                    raise KeyError(before)
                where.append("(created < ? OR (created = ? AND rowid < ?))")
                values += [after[0], after[0], after[1]]
            clause = f"WHERE {' AND '.join(where)} " if where else ""
            rows = db.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM jobs {clause}ORDER BY created DESC, rowid DESC LIMIT ?",
                (*values, limit),
            ).fetchall()
        return [_record(row) for row in rows]

    def parts(self, job_id: str, key: str) -> list[dict[str, Any]]:
        """The jobs whose request's `key` is `job_id` (a script job's requests: `key` "script_job")."""
        with self._using("cannot read", self._requests) as db:
            rows = db.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs "
                              f"WHERE json_extract({_readable('request')}, ?) = ?",
                              (f'$."{key}"', job_id)).fetchall()
        return [_record(row) for row in rows]

    def held_pictures(self, names: list[str]) -> set[str]:
        """Those of the picture names `names` that a job's row still lists."""
        if not names:
            return set()
        with self._using("cannot read", self._requests) as db:
            rows = db.execute(f"SELECT DISTINCT picture.value FROM jobs, json_each({_readable('jobs.images')}) "
                              f"AS picture "
                              f"WHERE picture.value IN ({', '.join('?' * len(names))})", names).fetchall()
        return {row[0] for row in rows}

    def delete_jobs(self, job_ids: list[str]) -> None:
        """Delete these jobs' rows in one transaction: all of them, or (a `StoreError`) none."""
        with self._using("cannot write", self._requests) as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany("DELETE FROM jobs WHERE id = ?", [(job_id,) for job_id in job_ids])
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    @contextmanager
    def _using(self, doing: str, connection: _Connection) -> Iterator[sqlite3.Connection]:
        """The connection's database, under its lock; an SQLite error in the block is a `StoreError` saying
        what failed (`doing`: "cannot write", ...)."""
        with connection.lock:
            try:
                yield connection.db
            except sqlite3.Error as err:
                raise self._error(doing, err) from None

    def _error(self, doing: str, err: sqlite3.Error) -> StoreError:
        """`StoreError`: "<doing> the job history <file>: <sqlite3's reason>[; what to do]"."""
        hint = _HINTS.get(getattr(err, "sqlite_errorname", ""))    # the error's name: Python 3.11 and later
        return StoreError(f"{doing} the job history {self.path}: {err}" + (f"; {hint}" if hint else ""))


def _hold_folder(folder: Path) -> IO[str]:
    """The folder's lock file, open and locked (`hold_lock_file`) with this process's id in it; a `StoreError`
    when another process holds it. On a file system without file locks a warning, and the file unlocked."""
    path = folder / LOCK_NAME
    try:
        lock, unlocked = hold_lock_file(path, str(os.getpid()))
    except LockHeld as held:
        raise StoreError(f"the output folder {folder} is in use by another sdlab serve"
                         + (f" (process {held.holder})" if held.holder.isdigit() else "")
                         + "; stop it, or give this server another --output-dir") from None
    except OSError as err:
        raise StoreError(f"cannot lock {path}: {err.strerror}") from None
    if unlocked:
        logger.warning("the file system of %s has no file locks (%s): a second sdlab serve on the folder is not "
                       "detected", folder, unlocked)
    return lock


def _record(row: tuple) -> dict[str, Any]:
    """A row as a job record; a JSON column that cannot be read (a damaged page, a hand edit) is left empty and
    the job's `error` says so, so one damaged row does not hide the rest of the history."""
    record = dict(zip(_COLUMNS, row))
    for column, kind in _JSON_COLUMNS.items():
        try:
            value = json.loads(record[column])
        except (TypeError, ValueError) as err:
            value = err
        if isinstance(value, kind):
            record[column] = value
            continue
        reason = value if isinstance(value, Exception) else f"not a JSON {kind.__name__}"
        record[column] = kind()
        record["error"] = f"this job's history row is damaged: its {column} cannot be read ({reason})"
    return record
