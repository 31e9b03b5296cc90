"""File hashes computed once per version of a file.

A1111's model, LoRA and embedding hashes are SHA-256 digests over whole files, gigabytes for a checkpoint,
so each is kept by (path, kind, size, modification time) in a small SQLite file, as A1111 keeps its
`cache.json`: a file is read again only when it changes. The cache lives in `$SDLAB_CACHE_DIR`, else
`$XDG_CACHE_HOME/sdlab`, else `~/.cache/sdlab`. A cache that cannot be opened or written (read-only home,
full disk, a locked or damaged file) is skipped: the hash is then computed every time, never wrong.

What a model listing reads of each file (a header's metadata, an upscaler network's scale) is kept in memory
by (path, size, modification time) too (`read_per_version`), as A1111 keeps such reads in its `cache.json`: a
listing of many files reads only those that changed.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

CACHE_FILE = "file-hashes.sqlite"
_T = TypeVar("_T")
_READS: dict[tuple[str, Callable[[Path], Any]], tuple[int, int, Any]] = {}    # (path, read) -> (size, mtime, value)
_READS_LOCK = threading.Lock()
_SCHEMA = """CREATE TABLE IF NOT EXISTS hashes (
    path TEXT NOT NULL, kind TEXT NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, value TEXT NOT NULL,
    PRIMARY KEY (path, kind))"""


def cache_dir() -> Path:
    explicit = os.environ.get("SDLAB_CACHE_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sdlab"


def _connect() -> sqlite3.Connection:
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(folder / CACHE_FILE, timeout=10)
    connection.execute(_SCHEMA)
    return connection


def cached_hash(path: str | os.PathLike[str], kind: str, compute: Callable[[Path], str]) -> str:
    """`compute(path)` (a hash of kind `kind`, e.g. "sha256"), from the cache when the file is unchanged."""
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), kind)
    try:
        with closing(_connect()) as connection, connection:
            row = connection.execute(
                "SELECT value FROM hashes WHERE path = ? AND kind = ? AND size = ? AND mtime_ns = ?",
                (*key, stat.st_size, stat.st_mtime_ns),
            ).fetchone()
        if row is not None:
            return row[0]
    except (OSError, sqlite3.Error) as err:
        logger.debug("hash cache unavailable (%s); hashing %s", err, path)
        return compute(path)
    value = compute(path)
    try:
        with closing(_connect()) as connection, connection:
            connection.execute("INSERT OR REPLACE INTO hashes VALUES (?, ?, ?, ?, ?)",
                               (*key, stat.st_size, stat.st_mtime_ns, value))
    except (OSError, sqlite3.Error) as err:
        logger.debug("hash cache not written (%s)", err)
    return value


def read_per_version(path: str | os.PathLike[str], read: Callable[[Path], _T]) -> _T:
    """`read(path)`, kept in memory while the file keeps its size and modification time; a file that cannot be
    looked at is read every time (`read` then answers for it as it does uncached)."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        return read(path)
    key, version = (str(path), read), (stat.st_size, stat.st_mtime_ns)
    with _READS_LOCK:
        kept = _READS.get(key)
    if kept is not None and kept[:2] == version:
        return kept[2]
    value = read(path)
    with _READS_LOCK:
        _READS[key] = (*version, value)
    return value


__all__ = ["cache_dir", "cached_hash", "read_per_version"]
