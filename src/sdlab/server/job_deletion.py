"""Deleting a finished job from the history (`POST /api/jobs/{id}/delete`): its row and its pictures, all or nothing.

A script job goes with its requests (the rows tagged `script_job`, which the list leaves out) and their pictures.
Each picture is first renamed to a hidden name in its folder (one the image route never serves); only when every
rename worked are the rows deleted, in one transaction; only then are the renamed files removed. A rename or a row
delete that fails puts the pictures renamed so far back: the job stays whole, and the answer says why (503). A
queued or running job is refused (409: cancel it first); an unknown id is a 404. A deletion the server stopped in
the middle of (a crash, a kill) is finished or undone when it starts again (`recover_deletions`).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from sdlab.server.inputs import BadRequest
from sdlab.server.store import UNFINISHED, Store, StoreError

logger = logging.getLogger("sdlab.server")

DELETING_PREFIX = ".deleting-"          # a picture's name while its job is being deleted
_ONE_AT_A_TIME = threading.Lock()       # two deletions of one job: the second finds it gone (404)


def delete_job(store: Store, images_dir: Path, job_id: str, live: Any | None) -> dict[str, Any]:
    """Delete the finished job `job_id` (`live`: the queue's job of that id, or None) with its pictures; the
    answer `{id, deleted: [job ids], images: count}`."""
    with _ONE_AT_A_TIME:
        record = store.job(job_id)
        if record is None and live is None:
            raise BadRequest(f"no job {job_id!r}", 404, "Not Found")
        status = live.status if live is not None else record["status"]
        if status in UNFINISHED:
            raise BadRequest(f"job {job_id} is {status}: only a finished job can be deleted (cancel it first: "
                             f"DELETE /api/jobs/{job_id})", 409, "Conflict")
        if live is not None or record is None:  # finished, its row not written yet
            raise BadRequest(f"job {job_id} has just finished and is still being recorded; try again", 409,
                             "Conflict")
        rows = [record, *store.parts(job_id, "script_job")]
        if busy := [row["id"] for row in rows if row["status"] in UNFINISHED]:
            raise BadRequest(f"job {job_id} has requests still queued or running ({', '.join(busy)}): only a "
                             "finished job can be deleted", 409, "Conflict")
        names = list(dict.fromkeys(name for row in rows for name in row["images"]))
        moved = _move_aside(images_dir, names)
        try:
            store.delete_jobs([row["id"] for row in rows])
        except StoreError:
            _put_back(images_dir, moved)
            raise
        for name in moved:
            try:
                (images_dir / (DELETING_PREFIX + name)).unlink()
            except OSError as err:              # the job is gone; the file only takes room
                logger.error("deleted job %s left its picture %s: %s", job_id, DELETING_PREFIX + name, err.strerror)
        return {"id": job_id, "deleted": [row["id"] for row in rows], "images": len(moved)}


def _move_aside(images_dir: Path, names: list[str]) -> list[str]:
    """Rename each picture that exists to its hidden name; the names renamed. One that cannot be: those renamed are
    put back and a `StoreError` says which and why."""
    moved: list[str] = []
    for name in names:
        path = images_dir / name
        if not path.is_file():                  # removed by hand: nothing to keep whole
            continue
        try:
            path.rename(images_dir / (DELETING_PREFIX + name))
        except OSError as err:
            _put_back(images_dir, moved)
            raise StoreError(f"cannot delete the picture {name} of the output folder's {images_dir.name} folder "
                             f"({err.strerror}); nothing was deleted") from None
        moved.append(name)
    return moved


def _put_back(images_dir: Path, moved: list[str]) -> None:
    for name in moved:
        try:
            (images_dir / (DELETING_PREFIX + name)).rename(images_dir / name)
        except OSError as err:
            logger.error("could not put back the picture %s: %s", name, err.strerror)


def recover_deletions(store: Store, images_dir: Path) -> None:
    """Finish or undo each deletion left in the middle (its pictures' hidden names still in `images_dir`), so a job
    is whole or gone: a hidden picture a row still lists is put back (the rows were not deleted: the job stays),
    one no row lists is removed (the rows went, its removal did not happen). Run at startup, when no deletion runs
    (the output folder is held by one server)."""
    hidden = sorted(path.name for path in images_dir.glob(DELETING_PREFIX + "*")) if images_dir.is_dir() else []
    names = [name[len(DELETING_PREFIX):] for name in hidden]
    held = store.held_pictures(names)
    for name in names:
        path = images_dir / (DELETING_PREFIX + name)
        try:
            if name in held:
                path.rename(images_dir / name)
                logger.warning("put back the picture %s of a deletion stopped before its job went", name)
            else:
                path.unlink()
                logger.warning("removed the picture %s of a deleted job", DELETING_PREFIX + name)
        except OSError as err:
            logger.error("cannot recover the picture %s of a stopped deletion: %s", path.name, err.strerror)
