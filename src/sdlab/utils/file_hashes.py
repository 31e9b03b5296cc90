"""File hashes computed once per version of a file.

A1111's model, LoRA and embedding hashes are SHA-256 digests over whole files, gigabytes for a checkpoint,
so each is kept by (path, kind, size, modification time) in a small SQLite file, as A1111 keeps its
`cache.json`: a file is read again only when it changes. The cache lives in `$SDLAB_CACHE_DIR`, else
`$XDG_CACHE_HOME/sdlab`, else `~/.cache/sdlab`. A cache that cannot be opened or written (read-only home,
full disk, a locked or damaged file) is skipped: the hash is then computed every time, never wrong.

What a model listing reads of each file (a header's metadata, an upscaler network's scale) is kept in memory
by path and version of the file (`read_per_version`: size, modification time, inode and change time, so a copy
that keeps the size and modification time of the file it replaces is read too), as A1111 keeps such reads in
its `cache.json`: a listing of many files reads only those that changed. The reads of files that are gone are
dropped whenever the table has doubled since the last sweep, so it holds at most about twice the files there are.
"""

from __future__ import annotations

import hashlib
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
_READS: dict[tuple[str, Callable[[Path], Any]], tuple[tuple[int, ...], Any]] = {}   # (path, read) -> (version, value)
_READS_LOCK = threading.Lock()
_FIRST_SWEEP = 64
_sweep_at = _FIRST_SWEEP          # the table's size at which the reads of files that are gone are dropped
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
        value = _cached(key, stat)
        if value is not None:
            return value
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


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The hex SHA-256 of the whole file (A1111's model hash), computed once per version of the file."""
    return cached_hash(path, "sha256", _file_sha256)


def known_file_sha256(path: str | os.PathLike[str]) -> str | None:
    """`file_sha256` where it has been computed for this version of the file, else None (nothing is read)."""
    return known_hash(path, "sha256")


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def known_hash(path: str | os.PathLike[str], kind: str) -> str | None:
    """The hash of kind `kind` the cache holds for this version of the file, else None (a file gone, or a cache
    that cannot be read, too): nothing is hashed, as A1111's `sha256_from_cache` lists models."""
    path = Path(path).resolve()
    try:
        return _cached((str(path), kind), path.stat())
    except (OSError, sqlite3.Error):
        return None


def _cached(key: tuple[str, str], stat: os.stat_result) -> str | None:
    with closing(_connect()) as connection, connection:
        row = connection.execute(
            "SELECT value FROM hashes WHERE path = ? AND kind = ? AND size = ? AND mtime_ns = ?",
            (*key, stat.st_size, stat.st_mtime_ns),
        ).fetchone()
    return None if row is None else row[0]


def read_per_version(path: str | os.PathLike[str], read: Callable[[Path], _T]) -> _T:
    """`read(path)`, kept in memory while the file keeps its version (`stat_version`); a file that cannot be
    looked at is read every time (`read` then answers for it as it does uncached)."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        return read(path)
    key, version = (str(path), read), stat_version(stat)
    with _READS_LOCK:
        kept = _READS.get(key)
    if kept is not None and kept[0] == version:
        return kept[1]
    value = read(path)
    with _READS_LOCK:
        _READS[key] = (version, value)
        sweep = len(_READS) >= _sweep_at
    if sweep:
        _forget_gone_files()
    return value


def file_version(path: str | os.PathLike[str]) -> tuple[int, int, int, int] | None:
    """The version of the file at `path` (`stat_version`), for a cache of what is read from it: a different file
    at the same path is another version; None for a path that cannot be looked at."""
    try:
        return stat_version(os.stat(path))
    except OSError:
        return None


def stat_version(stat: os.stat_result) -> tuple[int, int, int, int]:
    """What tells two versions of a file apart: size and modification time, and the inode and change time, which a
    copy that keeps the size and modification time (`cp -p`, `rsync -t`, an unzip) does not keep: `utime` sets
    the modification time, no call sets the change time."""
    return stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns


def _forget_gone_files() -> None:
    """Drop the reads of files that no longer exist, and sweep again when the table has doubled: a folder whose
    files come and go keeps at most about twice its files' reads, and a read costs O(1) looks at files on average."""
    global _sweep_at
    with _READS_LOCK:
        paths = {path for path, _ in _READS}
    gone = {path for path in paths if not os.path.exists(path)}
    with _READS_LOCK:
        for key in [key for key in _READS if key[0] in gone]:
            del _READS[key]
        _sweep_at = max(_FIRST_SWEEP, 2 * len(_READS))


__all__ = ["cache_dir", "cached_hash", "file_sha256", "file_version", "known_file_sha256", "known_hash",
           "read_per_version", "stat_version"]
