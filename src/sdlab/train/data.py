"""Training data: a folder of captioned images, deterministic order, per-rank sharding, latent caching.

Dataset layouts (the common trainer conventions):
  - ``image.png`` + ``image.txt`` (same name, the caption; another extension with ``caption_extension``, kohya's
    ``--caption_extension``), in the folder or any subfolder, linked folders included (images: `IMAGE_SUFFIXES`;
    one warning names the caption files that name no image read, `_warn_of_captions_without_images`);
  - kohya-ss/sd-scripts' DreamBooth layout (``layout="kohya"``; ``"auto"`` takes it when every first-level
    folder that holds images is named ``<N>_<class tokens>``, ``10_sks dog``, with N >= 1 and no image lies beside
    them, `_auto_layout`): as kohya's ``generate_dreambooth_subsets_config_by_subdirs`` reads it, each first-level
    folder whose name before its first ``_`` is an integer N >= 1 holds images drawn N times per epoch, and an
    image there without a caption file trains on the class tokens (the rest of the name; kohya's empty caption
    when there are none: ``10_``); a caption file gives its first line, as kohya's ``read_caption``. As in kohya
    only the images directly in such a folder count; images elsewhere (the root, other folders, deeper folders)
    are skipped with a warning and counted;
  - a ``metadata.jsonl`` at the root, one ``{"file_name": "a.png", "text": "..."}`` per line, or a
    ``metadata.csv`` with the columns ``file_name`` and ``text`` (Hugging Face ``imagefolder``'s two metadata
    files; ``caption`` is accepted for ``text``; a UTF-8 byte-order mark is read past). When one exists it is
    the whole dataset (both: an error).
A file that PIL cannot open or decode to its end, an empty / missing caption (but in a repeat folder its empty
class tokens and a caption file whose first line is blank, which kohya trains on the empty caption), or a caption that is not UTF-8 text, is skipped with a warning and counted (`DatasetScan.skipped`); it is never fatal. An image that passes the
scan but fails to decode later is replaced by the next sample of the stream (of its bucket, else of another one,
`TrainData._stand_ins`), warned about once and counted once in ``TrainData.broken_at_load``.

Order and sharding: the sample stream is an endless concatenation of per-epoch permutations drawn from
``(seed, epoch)``. Optimiser step ``s`` consumes stream positions ``[s*G, (s+1)*G)`` with
``G = batch_size * grad_accum * world_size``; within a step, micro-step ``a`` of rank ``r`` takes the
``batch_size`` positions starting at ``a*world*batch + r*batch``. The "data position" of a run is therefore
just the step, and every sample gets a seed from ``(seed, step, slot in the global batch)``, so all of its
randomness (crop, flip, caption shuffle, noise, timestep, caption dropout) is the same however the global
batch is split.

Caption shuffle (kohya's ``--shuffle_caption`` / ``--keep_tokens`` / ``caption_separator``, `shuffle_tags`):
the caption's tags, its parts between separators, are put in a new order each time the image is drawn (the
first ``keep_tokens`` stay in front) and joined by ", ".
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import itertools
import json
import logging
import math
import os
import random
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import Tensor

from sdlab.checkpoints.io import write_safetensors_atomic
from sdlab.models.vae import posterior_draw
from sdlab.pipeline.images import upright_8bit
from sdlab.train.errors import TrainError
from sdlab.train.run_checkpoint import checkpoint_path, list_checkpoints
from sdlab.train.run_lock import LOCK_NAME
from sdlab.train.run_log import is_run_log
from sdlab.train.task import Batch
from sdlab.utils.text import not_utf8

logger = logging.getLogger(__name__)

__all__ = [
    "CAPTION_EXTENSIONS",
    "DATA_LAYOUTS",
    "IMAGE_SUFFIXES",
    "DatasetScan",
    "ImageSample",
    "LatentCache",
    "SampleStream",
    "TrainData",
    "cover_size",
    "derive_seed",
    "load_training_image",
    "make_bucket_resolutions",
    "posterior_generators",
    "posterior_sample",
    "repeat_folder",
    "sample_seeds",
    "scan_dataset",
    "select_bucket",
    "shuffle_tags",
    "upright_size",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".jfif", ".webp", ".avif", ".bmp", ".gif", ".tif", ".tiff")
_SEED_MASK = (1 << 63) - 1


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from a tuple of integers / strings (SHA-256; stable across runs and platforms)."""
    digest = hashlib.sha256(("/".join(str(p) for p in parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & _SEED_MASK


def generator_for(*parts: int | str) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


def sample_seeds(batch: Batch, generator: torch.Generator) -> list[int]:
    """The batch's per-sample seeds (`Batch.seeds`); for a batch built without them, one drawn per sample from
    ``generator``."""
    return batch.seeds or [int(torch.randint(0, 2**62, (), generator=generator)) for _ in range(len(batch))]


def posterior_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """The generator of each image's posterior noise, ``generator_for(seed, "posterior")``: a sample's latent is the
    same in every task, cached or not, however the global batch is split over processes and micro-steps."""
    return [generator_for(seed, "posterior") for seed in seeds]


def posterior_sample(mean: Tensor, std: Tensor, seeds: Sequence[int]) -> Tensor:
    """z = mean + std * eps (B, C, h, w) float32, the VAE's own draw (`posterior_draw`) with each image's eps from
    its `posterior_generators` (what the VAE task's forward draws from too)."""
    return posterior_draw(mean.float(), std.float(), posterior_generators(seeds))


# ----------------------------------------------------------------------------------------------------------
# Scanning


@dataclass(frozen=True)
class ImageSample:
    path: Path
    caption: str
    repeats: int = 1                       # draws per epoch (kohya's <N>_<class tokens> folders)


@dataclass
class DatasetScan:
    samples: list[ImageSample]
    skipped: Counter = field(default_factory=Counter)   # reason -> count: "broken_image", "empty_caption", ...
    layout: str = "plain"                               # how it was read: "plain" (a metadata file too) or "kohya"

    def __len__(self) -> int:
        return len(self.samples)

    def digest(self, root: str | os.PathLike[str]) -> str:
        """SHA-256 of what the run trains on: each sample's path below ``root``, size in bytes, caption and
        repeats (not the modification time, which a copy of the folder changes)."""
        h = hashlib.sha256()
        for sample in self.samples:
            size = sample.path.stat().st_size if _is_file(sample.path) else -1
            h.update(json.dumps([os.path.relpath(sample.path, root), size, sample.caption, sample.repeats]).encode())
        return h.hexdigest()


# the caption files of an image that `scan_dataset` names when the chosen one is missing
CAPTION_EXTENSIONS = (".txt", ".caption")


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a name too long for the file system, ...
        return False


def _decodes(im: Image.Image) -> None:
    """Decode ``im`` to its last byte where `Image.verify` reads no pixel data (JPEG, BMP, TIFF, GIF), so a
    truncated file fails here; a JPEG that ends in its EOI marker is complete and is not decoded, another one
    is decoded at 1/8 scale (`Image.draft`), which still reads all of its data."""
    if im.format in ("PNG", "WEBP"):      # verify reads and checks every chunk
        return
    if im.format == "JPEG":
        im.fp.seek(-2, os.SEEK_END)
        if im.fp.read(2) == b"\xff\xd9":
            return
        im.draft("RGB", (1, 1))
    im.load()


def _image_opens(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            _decodes(im)
        return True
    except Exception as exc:  # PIL raises many types for damaged files
        logger.warning("skipping %s: cannot read image (%s)", path, " ".join(str(exc).split()) or type(exc).__name__)
        return False


METADATA_FILES = ("metadata.jsonl", "metadata.csv")   # Hugging Face imagefolder's caption files
_CAPTION_KEYS = ("text", "caption")


def _metadata_entry(root: Path, row: object) -> tuple[Path, str | None] | None:
    """(image path, caption or None) of one metadata row (a parsed JSON line, a CSV row), or None when it is no
    object with a file name."""
    if not isinstance(row, dict):
        return None
    name = row.get("file_name", row.get("file"))  # "file": sdlab.tiny.datasets.build
    if not isinstance(name, str) or not name.strip() or "\0" in name:
        return None
    caption = next((row[key] for key in _CAPTION_KEYS if key in row), None)
    if isinstance(caption, str) and not_utf8(caption, "text") is not None:   # an escaped lone surrogate
        return None
    return root / name, caption if isinstance(caption, str) else None


def _jsonl_rows(meta: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed object or None when the line is not UTF-8 JSON) of each non-blank line of a
    ``metadata.jsonl``, after a UTF-8 byte-order mark, which Windows editors write."""
    for number, line in enumerate(meta.read_bytes().removeprefix(codecs.BOM_UTF8).splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            yield number, None


def _csv_rows(meta: Path) -> Iterator[tuple[int, object]]:
    """(line number, {column: cell}) of each non-blank row of a ``metadata.csv`` (Hugging Face imagefolder's
    other metadata file: a header row naming the columns, ``file_name`` and ``text``), read as UTF-8 after a
    byte-order mark (Excel's "CSV UTF-8"). Read strictly, as pandas' ``read_csv`` (which imagefolder uses) reads
    it: a file that is not UTF-8 text or not well-formed CSV is a `TrainError` naming the line (`_csv_cells`).
    Of two columns of one name the first is read, as pandas reads it (it renames the second ``text.1``); cells
    past the header's columns are not read."""
    raw = meta.read_bytes().removeprefix(codecs.BOM_UTF8)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise TrainError(f"{meta} is not UTF-8 text (the byte 0x{raw[err.start]:02X} at byte {err.start + 1}); "
                         f"save it as CSV UTF-8") from None
    rows = _csv_cells(meta, text)
    header = next((cells for _, cells in rows), None)
    if header is None or not {"file_name", "file"} & set(header):
        raise TrainError(f"{meta}: its first row names the columns, and a file_name column is needed "
                         f"(it has {', '.join(map(repr, header or [])) or 'none'})")
    columns: dict[str, int] = {}                        # column name -> index of its first column
    for index, name in enumerate(header):
        columns.setdefault(name, index)
    for number, cells in rows:
        if any(cell.strip() for cell in cells[:len(header)]):
            yield number, {name: cells[index] if index < len(cells) else None for name, index in columns.items()}


def _csv_cells(meta: Path, text: str) -> Iterator[tuple[int, list[str]]]:
    """(line the row starts on, its cells) of each non-blank row of CSV ``text``, read with ``strict=True``: a
    quote never closed (which would take in every row after it) or a stray quote after a quoted cell is a
    `TrainError` naming ``meta`` and the line, as is a cell over csv's field limit (131,072 characters)."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    while True:
        start = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            raise TrainError(f"{meta}: the row starting on line {start} is not well-formed CSV: "
                             f"{_csv_fault(str(err))}") from None
        if cells:                                       # a blank line reads as []
            yield start, cells


def _csv_fault(error: str) -> str:
    """What Python's csv error ``error`` means for whoever wrote the file."""
    if error == "unexpected end of data":
        return ('a quoted cell is never closed (the file ends inside it); close it with ", and write a " inside '
                'a quoted cell twice ("")')
    if error.startswith("field larger than field limit"):
        return (f"a cell is over {csv.field_size_limit():,} characters, the most read (is a quoted cell never "
                f"closed, taking in the lines after it?)")
    return f'{error} (a " inside a quoted cell is written twice: "")'


def _read_metadata(root: Path, meta: Path, scan: DatasetScan) -> list[tuple[Path, str | None]]:
    """Entries of a ``metadata.jsonl`` or ``metadata.csv``; a row that is not an object with a ``file_name`` text
    is skipped with a warning and counted as ``bad_metadata_line``. Rows without a ``text`` (or ``caption``) are
    named in one warning with the keys they have (their images are skipped as uncaptioned)."""
    entries, uncaptioned = [], []
    rows = _csv_rows(meta) if meta.suffix == ".csv" else _jsonl_rows(meta)
    for number, row in rows:
        entry = _metadata_entry(root, row)
        if entry is None:
            logger.warning("skipping %s line %d: not a UTF-8 JSON object with a file_name text" if meta.suffix ==
                           ".jsonl" else "skipping %s line %d: no file_name", meta, number)
            scan.skipped["bad_metadata_line"] += 1
            continue
        if not any(key in row for key in _CAPTION_KEYS):
            uncaptioned.append((number, row))
        entries.append(entry)
    if uncaptioned:
        number, row = uncaptioned[0]
        keys = [key for key in row if key is not None and key not in ("file_name", "file")]
        logger.warning("%s: %d line(s) have no \"text\" (the caption; \"caption\" is read too; line %d has %s): "
                       "their images are skipped; name the caption \"text\"", meta, len(uncaptioned), number,
                       ", ".join(map(repr, keys)) or "only the file_name")
    return entries


def is_run_folder(folder: Path) -> bool:
    """Whether ``folder`` is an ``sdlab train`` run folder, by what only a run writes: its lock file (a run going
    on, the new run's own ``--output-dir`` among them), a run checkpoint under its own name (`checkpoint_path`), or
    a run's log.csv (`is_run_log`: its header) with summary.json. Its previews and weights are no training data:
    the scan never enters one below ``--data-dir`` (`_warn_of_run_folders`). A dataset's own summary.json, log.csv
    or checkpoints/*.pt do not make it one."""
    if _is_file(folder / LOCK_NAME) or (_is_file(folder / "summary.json") and is_run_log(folder / "log.csv")):
        return True
    try:
        return any(path == checkpoint_path(folder / "checkpoints", step)
                   for step, path in list_checkpoints(folder / "checkpoints"))
    except OSError:                                     # a checkpoints folder that cannot be listed
        return False


def _warn_of_run_folders(root: Path) -> None:
    """One warning naming the run folders below ``root`` (`is_run_folder`) that the scan leaves out."""
    found = []
    for folder in _walk_folders(root):
        try:
            found += [sub for sub in _subfolders(folder, runs=True) if is_run_folder(sub)]
        except OSError:                                 # a folder that cannot be listed: `_walk_images` says so
            continue
    if found:
        logger.warning("--data-dir %s: left out %s, %s of sdlab train (previews, weights and checkpoints are no "
                       "training data)", root, _names([str(p) for p in found]),
                       "a run folder" if len(found) == 1 else "run folders")


def _walk_images(folder: Path, recursive: bool, ancestors: frozenset[str] = frozenset()) -> Iterator[Path]:
    """The images in ``folder`` (and, ``recursive``, in its subfolders, following links to folders as kohya's
    ``os.listdir`` walk does; a link back to a folder it is in is skipped with a warning, a run folder,
    `is_run_folder`, quietly), sorted."""
    real = os.path.realpath(folder)
    if real in ancestors:
        logger.warning("skipping %s: a link back to %s, which holds it", folder, real)
        return
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as err:
        logger.warning("skipping folder %s: cannot list it (%s)", folder, err.strerror or err)
        return
    for entry in entries:
        path = Path(entry.path)
        if entry.is_dir():
            if recursive and not is_run_folder(path):
                yield from _walk_images(path, True, ancestors | {real})
        elif path.suffix.lower() in IMAGE_SUFFIXES and entry.is_file():
            yield path


def _image_files(folder: Path, recursive: bool) -> list[Path]:
    return list(_walk_images(folder, recursive))


def _walk_folders(folder: Path, ancestors: frozenset[str] = frozenset()) -> Iterator[Path]:
    """``folder`` and every folder below it as `_walk_images` walks them (links followed, loops and run folders
    not), quietly."""
    real = os.path.realpath(folder)
    if real in ancestors:
        return
    yield folder
    try:
        subfolders = _subfolders(folder)
    except OSError:
        return
    for sub in subfolders:
        yield from _walk_folders(sub, ancestors | {real})


def _warn_of_captions_without_images(folders: Iterator[Path], extension: str) -> None:
    """One warning naming the ``extension`` caption files in ``folders`` that no image the scan reads is named
    by (an iPhone's photo.heic beside its photo.txt; a notes.txt), with the other file of that name, if any."""
    unread = []
    for folder in folders:
        try:
            names = sorted(e.name for e in os.scandir(folder) if e.is_file())
        except OSError:
            continue
        stems: dict[str, list[str]] = {}
        for name in names:
            stems.setdefault(Path(name).stem, []).append(name)
        for name in names:
            if Path(name).suffix != extension:
                continue
            beside = [other for other in stems[Path(name).stem] if other != name]
            if not any(Path(other).suffix.lower() in IMAGE_SUFFIXES for other in beside):
                other = next((o for o in beside if Path(o).suffix not in CAPTION_EXTENSIONS), None)
                unread.append(f"{folder / name}" + (f" (beside {other}, a format not read)" if other else ""))
    if unread:
        logger.warning("%d %s file(s) name no image that is read, and train nothing: %s; the images read are %s "
                       "files (convert others, e.g. HEIC, to PNG or JPEG)", len(unread), extension,
                       _names(unread, limit=3), " ".join(IMAGE_SUFFIXES))


def _warn_of_metadata_below(root: Path) -> None:
    """One warning naming the metadata files in folders below ``root`` (a Hugging Face dataset's ``train/``
    split), which are not read: only one directly in the ``--data-dir`` is."""
    below = [folder / name for folder in itertools.islice(_walk_folders(root), 1, None) for name in METADATA_FILES
             if _is_file(folder / name)]
    if below:
        logger.warning("--data-dir %s: %s %s not read (only a metadata file directly in --data-dir is); give "
                       "--data-dir %s to train on its images and captions", root, _names([str(p) for p in below]),
                       "is" if len(below) == 1 else "are", min(below, key=lambda p: p.parent.name != "train").parent)


def _subfolders(root: Path, runs: bool = False) -> list[Path]:
    """The folders (links to folders too) directly in ``root``, sorted by name; run folders (`is_run_folder`)
    only with ``runs``."""
    found = sorted((Path(e.path) for e in os.scandir(root) if e.is_dir()), key=lambda p: p.name)
    return found if runs else [p for p in found if not is_run_folder(p)]


def _caption_file(image: Path, extension: str) -> Path:
    return image.with_name(image.stem + extension)


_UNICODE_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
                 (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def _caption_text(raw: bytes) -> str:
    """A caption file's text: UTF-16 or UTF-32 where it starts with their byte-order mark (what Windows Notepad
    saves as "Unicode"), else UTF-8 (a UTF-8 byte-order mark kept, as kohya's ``read_caption`` keeps it: see
    `_caption_words`)."""
    codec = next((codec for bom, codec in _UNICODE_BOMS if raw.startswith(bom)), "utf-8")
    return raw.decode(codec)


def _caption_words(caption: str | None) -> str:
    """The caption trained: stripped, without a UTF-8 byte-order mark in front (Windows editors write one; the
    tokenizer drops it, so a caption file of a byte-order mark alone is an empty caption)."""
    return (caption or "").removeprefix("\ufeff").strip()


def _caption_fault(err: UnicodeDecodeError) -> str:
    """Why a caption file's bytes are not text, and what to do: UTF-8 text that is not (most often Latin-1), or,
    behind a UTF-16 / UTF-32 byte-order mark, a damaged file of that encoding (cut short, a broken surrogate)."""
    if err.encoding.startswith(("utf-16", "utf-32")):
        name = err.encoding[:6].upper()
        return (f"starts with a {name} byte-order mark but is damaged {name} text ({err.reason} at byte "
                f"{err.start + 1} of {len(err.object)}); save it again (as UTF-8, or as \"Unicode\")")
    return (f"is not UTF-8 text: the byte 0x{err.object[err.start]:02X} at byte {err.start + 1}; convert it to "
            f"UTF-8 first (e.g. iconv -f latin1 -t utf-8)")


def _read_captions(images: list[Path], extension: str, scan: DatasetScan) -> list[tuple[Path, str | None]]:
    """(image, its same-name ``extension`` caption or None); an image whose caption file is not UTF-8 (or UTF-16 /
    UTF-32 with a byte-order mark) text is skipped with a warning naming the file and why (`_caption_fault`) and
    counted as ``bad_caption``."""
    entries = []
    for path in images:
        caption = _caption_file(path, extension)
        try:
            entries.append((path, _caption_text(caption.read_bytes()) if caption.is_file() else None))
        except UnicodeDecodeError as err:
            logger.warning("skipping %s: its caption %s %s", path, caption, _caption_fault(err))
            scan.skipped["bad_caption"] += 1
    return entries


def repeat_folder(name: str) -> tuple[int, str] | None:
    """(repeats, class tokens) of a kohya DreamBooth folder name, kohya's ``extract_dreambooth_params``: the
    text before the first ``_`` read as an integer (``int``), the rest the class tokens; None when it is none."""
    head, _, class_tokens = name.partition("_")
    try:
        return int(head), class_tokens
    except ValueError:
        return None


DATA_LAYOUTS = ("auto", "plain", "kohya")
_KOHYA_NAMES = "kohya's <repeats>_<class tokens> folders"


def _is_repeat_folder(folder: Path) -> bool:
    """Whether ``folder`` is named as a kohya repeat folder, ``<digits>_...`` with at least 1 repeat (a plain
    dataset's numbered folders ``1/ 2/`` have no ``_``)."""
    return re.match(r"\d+_", folder.name) is not None and repeat_folder(folder.name)[0] >= 1


def _names(items: list[str], limit: int = 5) -> str:
    """'a', 'a and b', 'a, b and c', the first ``limit`` of them then 'and N more'."""
    shown = items[:limit] + ([f"{len(items) - limit} more"] if len(items) > limit else [])
    return " and ".join(filter(None, (", ".join(shown[:-1]), shown[-1])))


def _auto_layout(root: Path) -> str:
    """``"kohya"`` when every first-level folder of ``root`` with an image anywhere below it (names starting with
    ``.`` left out) is a repeat folder (`_is_repeat_folder`) and no image lies directly in ``root``; else
    ``"plain"``, with a warning where a repeat folder stands beside other images. Either choice of kohya's layout
    is said in a warning, as it changes which images train and how often."""
    folders = [p for p in _subfolders(root) if not p.name.startswith(".") and next(_walk_images(p, True), None)]
    repeats = [p for p in folders if _is_repeat_folder(p)]
    others, loose = [p for p in folders if p not in repeats], _image_files(root, False)
    if not repeats:
        return "plain"
    if others or loose:
        beside = [repr(p.name) for p in others] + ([f"{len(loose)} image(s) beside them"] if loose else [])
        logger.warning("--data-dir %s: %s %s named like %s, but %s %s not; read as plain folders (no repeats; images "
                       "without a caption file are skipped); --data-layout kohya reads only the repeat folders, as "
                       "kohya does", root, _names([repr(p.name) for p in repeats]),
                       "is" if len(repeats) == 1 else "are", _KOHYA_NAMES, _names(beside),
                       "is" if len(others) + len(loose) == 1 else "are")
        return "plain"
    counts = [f"{p.name!r} x{repeat_folder(p.name)[0]} ({len(_image_files(p, False))} images)" for p in repeats]
    most = max(repeat_folder(p.name)[0] for p in repeats)
    year = f" (a repeat count of {most} reads like a year or a number in a folder name)" if most >= 1000 else ""
    logger.warning("--data-dir %s: read as %s: %s%s; --data-layout plain reads them as plain folders", root,
                   _KOHYA_NAMES, _names(counts, limit=8), year)
    return "kohya"


def _skip_outside(images: list[Path], why: str, scan: DatasetScan) -> None:
    """Warn once per folder of ``images`` that they are not read in the repeat layout, and count them."""
    for folder, count in Counter(path.parent for path in images).items():
        logger.warning("skipping %d image(s) in %s: %s", count, folder, why)
        scan.skipped["outside_repeat_folders"] += count


def _caption_lines(text: str) -> list[str]:
    """The lines of a caption file as kohya's ``read_caption`` splits them (text-mode ``readlines``: a line ends at
    ``\n``, ``\r`` or ``\r\n``)."""
    return re.split(r"\r\n?|\n", text)


def _first_lines(folder: Path, captions: list[tuple[Path, str | None]]) -> list[tuple[Path, str | None]]:
    """Each caption's first line, kohya's ``lines[0]``; one warning for the folder when a later line holds text."""
    lines = [(path, None if caption is None else _caption_lines(caption)) for path, caption in captions]
    longer = [path for path, parts in lines if parts is not None and "".join(parts[1:]).strip()]
    if longer:
        logger.warning("%s: %d caption file(s) hold more than one line (%s, ...): only the first line is the "
                       "caption, as kohya reads it", folder, len(longer), longer[0].name)
    return [(path, None if parts is None else parts[0]) for path, parts in lines]


def _read_repeat_layout(root: Path, extension: str,
                        scan: DatasetScan) -> list[tuple[Path, str | None, int, bool]]:
    """(image, caption, repeats, whether an empty caption trains) of a kohya DreamBooth layout (module
    docstring): an image without a caption file takes its folder's class tokens, empty ones too (kohya's empty
    caption), and one with a caption file its first line, a blank one too (a file holding a line break); a 0-byte
    caption file, which kohya's ``read_caption`` refuses, has none. A `TrainError` when no folder is a repeat
    folder."""
    entries: list[tuple[Path, str | None, int, bool]] = []
    read: list[str] = []
    layout = "kohya's <repeats>_<class tokens> layout reads only the images directly in such folders"
    _skip_outside(_image_files(root, False), layout, scan)
    for folder in _subfolders(root):
        params = repeat_folder(folder.name)
        if params is None or params[0] < 1:
            why = "its name does not start with <repeats>_" if params is None else f"{params[0]} repeats"
            _skip_outside(_image_files(folder, True), f"{why} ({layout})", scan)
            continue
        repeats, class_tokens = params
        _skip_outside([p for sub in _subfolders(folder) for p in _image_files(sub, True)],
                      f"in a folder inside {folder.name} ({layout})", scan)
        texts = _read_captions(_image_files(folder, False), extension, scan)
        captions = _first_lines(folder, texts)
        uncaptioned = [path for path, caption in captions if caption is None]
        other = next(filter(None, (_other_caption(path, extension) for path in uncaptioned)), None)
        if uncaptioned:
            trains_on = (f"the class tokens {class_tokens!r}" if class_tokens.strip() else
                         "the empty caption (the folder's name has no class tokens), as kohya trains them")
            beside = f"; {other.with_suffix('').name}: {_read_with(other)}" if other else ""
            logger.log(logging.INFO if class_tokens.strip() and not other else logging.WARNING,
                       "%s: %d image(s) without a %s caption train on %s%s", folder, len(uncaptioned), extension,
                       trains_on, beside)
        entries += [(path, class_tokens if caption is None else caption, repeats, text != "")
                    for (path, caption), (_, text) in zip(captions, texts)]
        read.append(f"{folder.name!r} x{repeats}")
    if not read:
        raise TrainError(f"--data-dir {root}: --data-layout kohya reads {_KOHYA_NAMES} (10_sks dog, at least 1 "
                         f"repeat), and it has none; --data-layout plain reads its images wherever they are")
    logger.info("dataset %s: kohya repeat folders %s", root, ", ".join(read))
    return entries


def _other_caption(path: Path, extension: str) -> Path | None:
    """A caption file of ``path`` with another of `CAPTION_EXTENSIONS` than ``extension``, if there is one."""
    others = [_caption_file(path, ext) for ext in CAPTION_EXTENSIONS if ext != extension]
    return next((other for other in others if _is_file(other)), None)


def _read_with(other: Path) -> str:
    return f"the caption file {other.name} beside it is read with --caption-extension {other.suffix}"


def _no_caption(path: Path, caption: str | None, extension: str | None) -> str:
    """Why ``path`` has no caption, naming a caption file of another extension beside it."""
    if caption is not None or extension is None:
        return "empty or missing caption"
    other = _other_caption(path, extension)
    return f"no {extension} caption ({_read_with(other)})" if other else f"no {extension} caption file"


def scan_dataset(root: str | os.PathLike[str], caption_extension: str = ".txt", layout: str = "auto") -> DatasetScan:
    """Find every usable (image, caption) pair under ``root`` (see module docstring), sorted by path;
    ``caption_extension`` (kohya's ``--caption_extension``; a missing leading dot is added, as kohya does) names
    the caption file of an image; ``layout`` (`DATA_LAYOUTS`) how its folders are read, recorded in
    `DatasetScan.layout`."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} {'is not a folder' if root.exists() else 'does not exist'}")
    if layout not in DATA_LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(DATA_LAYOUTS)}; got {layout!r}")
    extension = caption_extension if caption_extension.startswith(".") else "." + caption_extension
    scan = DatasetScan(samples=[])
    metas = [root / name for name in METADATA_FILES if (root / name).is_file()]
    if len(metas) > 1:
        raise TrainError(f"--data-dir {root} holds both a metadata.jsonl and a metadata.csv: each is the whole "
                         f"dataset; keep one")
    if metas:
        meta = metas[0]
        if layout == "kohya":
            raise TrainError(f"--data-dir {root} holds a {meta.name}, which is the whole dataset: --data-layout "
                             f"kohya does not apply to it (drop it, or the {meta.name})")
        entries = [(path, caption, 1, False) for path, caption in _read_metadata(root, meta, scan)]
        extension = None
    else:
        scan.layout = _auto_layout(root) if layout == "auto" else layout
        entries = _read_repeat_layout(root, extension, scan) if scan.layout == "kohya" else \
            [(path, caption, 1, False) for path, caption in _read_captions(_image_files(root, True), extension, scan)]
        _warn_of_captions_without_images(_walk_folders(root) if scan.layout == "plain" else
                                          (p for p in _subfolders(root) if _is_repeat_folder(p)), extension)
        _warn_of_metadata_below(root)
        _warn_of_run_folders(root)
    for path, caption, repeats, empty_trains in sorted(entries, key=lambda e: str(e[0])):
        if not _is_file(path):
            logger.warning("skipping %s: file not found", path)
            scan.skipped["missing_image"] += 1
        elif not _caption_words(caption) and not empty_trains:
            logger.warning("skipping %s: %s", path, _no_caption(path, caption, extension))
            scan.skipped["empty_caption"] += 1
        elif not _image_opens(path):
            scan.skipped["broken_image"] += 1
        else:
            scan.samples.append(ImageSample(path, _caption_words(caption), repeats))
    logger.info("dataset %s: %d samples, skipped %s", root, len(scan.samples), dict(scan.skipped) or "none")
    return scan


# ----------------------------------------------------------------------------------------------------------
# Images


@dataclass(frozen=True)
class LoadedImage:
    pixels: Tensor                     # (3, H, W) in [-1, 1]: the square resolution or the bucket
    original_size: tuple[int, int]     # (height, width) of the file
    crop_top_left: tuple[int, int]     # (top, left) in the resized image, mirrored with it when flipped
    flipped: bool


def upright_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image as it is trained: turned by its EXIF orientation (`upright_8bit`)."""
    with Image.open(path) as im:
        width, height = im.size
        turned = im.getexif().get(0x0112) in (5, 6, 7, 8)
    return (height, width) if turned else (width, height)


def make_bucket_resolutions(max_reso: tuple[int, int], min_size: int = 256, max_size: int = 1024,
                            divisible: int = 64) -> list[tuple[int, int]]:
    """kohya's aspect-ratio buckets (``library/model_util.make_bucket_resolutions``), (width, height) sorted: the
    square of ``max_reso``'s area, and for every width from ``min_size`` to ``max_size`` in steps of ``divisible``
    the tallest height (a multiple of ``divisible``, at most ``max_size``) that keeps the area, and its transpose,
    where that height is at least ``min_size``."""
    max_area = max_reso[0] * max_reso[1]
    side = int(math.sqrt(max_area) // divisible) * divisible
    resos = {(side, side)}
    for width in range(min_size, max_size + 1, divisible):
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos |= {(width, height), (height, width)}
    return sorted(resos)


def cover_size(width: int, height: int, bucket: tuple[int, int]) -> tuple[int, int]:
    """The size an image is resized to before it is cropped to ``bucket`` (width, height): scaled to cover it,
    sides rounded half up (kohya's ``BucketManager.select_bucket``)."""
    scale = bucket[1] / height if width / height > bucket[0] / bucket[1] else bucket[0] / width
    return int(width * scale + 0.5), int(height * scale + 0.5)


def select_bucket(width: int, height: int, resos: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket of a (width, height) image, kohya's ``BucketManager.select_bucket`` (which may scale up): its
    own size when that is a bucket, else the first bucket of the nearest aspect ratio."""
    if (width, height) in resos:
        return width, height
    aspect = width / height
    return min(resos, key=lambda reso: abs(reso[0] / reso[1] - aspect))


def load_training_image(path: Path, resolution: int, *, center_crop: bool, random_flip: bool,
                        generator: torch.Generator, bucket: tuple[int, int] | None = None,
                        flip: bool = False) -> LoadedImage:
    """Open, resize (Lanczos) and crop (centre or random from ``generator``) to a ``resolution`` square (the short
    side resized to it) or to ``bucket`` (width, height; resized as `cover_size`), optionally flip horizontally
    (p = 0.5 from ``generator``; always with ``flip``); pixels in [-1, 1]. The crop corner of a flipped image is
    that of the window in the mirrored resized image (`mirrored_left`)."""
    target_w, target_h = bucket or (resolution, resolution)
    with Image.open(path) as im:
        im = upright_8bit(im).convert("RGB")
        width, height = im.size
        if bucket is None:
            scale = resolution / min(width, height)
            new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
        else:
            new_w, new_h = cover_size(width, height, bucket)
        im = im.resize((new_w, new_h), Image.Resampling.LANCZOS)
    if center_crop:
        top, left = (new_h - target_h) // 2, (new_w - target_w) // 2
    else:
        top = int(torch.randint(0, new_h - target_h + 1, (1,), generator=generator))
        left = int(torch.randint(0, new_w - target_w + 1, (1,), generator=generator))
    im = im.crop((left, top, left + target_w, top + target_h))
    flipped = flip or bool(random_flip and float(torch.rand((), generator=generator)) < 0.5)
    if flipped:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left = mirrored_left(left, target_w, new_w)
    array = np.asarray(im, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3)
    pixels = torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()  # (3, H, W)
    return LoadedImage(pixels, (height, width), (top, left), flipped)


def mirrored_left(left: int, crop_width: int, width: int) -> int:
    """The left edge of a ``crop_width`` window at ``left`` in a ``width``-wide image once the image is flipped
    horizontally: SDXL's crop_top_left of a flipped image (kohya's ``target_size[0] - crop_ltrb[2]``)."""
    return width - left - crop_width


def shuffle_tags(caption: str, rng: random.Random, keep_tokens: int = 0, separator: str = ",") -> str:
    """The caption's tags (split at ``separator``, stripped) in ``rng``'s order after the first ``keep_tokens``,
    joined by ", ": kohya's ``BaseDataset.process_caption`` with ``shuffle_caption`` (no tag dropout, warm-up or
    keep_tokens_separator)."""
    tags = [tag.strip() for tag in caption.strip().split(separator)]
    kept, shuffled = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(shuffled)
    return ", ".join(kept + shuffled)


# ----------------------------------------------------------------------------------------------------------
# Order


class SampleStream:
    """Stream position -> sample index: epochs of one length, each a seeded order (from ``(seed, epoch)``) of
    every sample drawn its ``repeats`` times. With ``buckets`` (one per sample), an epoch is made of runs of
    ``group`` positions (a global batch) from one bucket: each bucket's draws are shuffled and cut into runs, a
    shorter last run filled up with its own images again in turn (its step trains the images of kohya's shorter
    last batch of the bucket, alike where their number divides ``group``, else the first ones once more), and
    the runs are shuffled."""

    def __init__(self, repeats: Sequence[int], seed: int, buckets: Sequence[tuple[int, int]] | None = None,
                 group: int = 1):
        self.draws = [i for i, n in enumerate(repeats) for _ in range(n)]
        if not self.draws:
            raise ValueError("the dataset has no usable samples")
        self.seed = seed
        self.group = group
        self.by_bucket = None if buckets is None else [
            [i for i in self.draws if buckets[i] == bucket] for bucket in sorted(set(buckets))]
        self.epoch_length = len(self.draws) if self.by_bucket is None else \
            sum(-(-len(members) // group) * group for members in self.by_bucket if members)
        self._perms: dict[int, list[int]] = {}

    def _draw(self, epoch: int) -> list[int]:
        generator = generator_for(self.seed, "epoch", epoch)
        if self.by_bucket is None:
            return [self.draws[k] for k in torch.randperm(len(self.draws), generator=generator).tolist()]
        runs = []
        for members in filter(None, self.by_bucket):
            order = [members[k] for k in torch.randperm(len(members), generator=generator).tolist()]
            runs += [order[i:i + self.group] for i in range(0, len(order), self.group)]
            runs[-1] = (runs[-1] * self.group)[:self.group]
        return [i for k in torch.randperm(len(runs), generator=generator).tolist() for i in runs[k]]

    def permutation(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = self._draw(epoch)
        return self._perms[epoch]

    def __getitem__(self, position: int) -> int:
        epoch, offset = divmod(position, self.epoch_length)
        return self.permutation(epoch)[offset]

    def epoch_of(self, position: int) -> int:
        return position // self.epoch_length


# ----------------------------------------------------------------------------------------------------------
# Latent cache


def module_fingerprint(module: torch.nn.Module) -> str:
    """SHA-1 of every tensor of a module's state dict (names, shapes, dtypes, bytes): a cache key."""
    h = hashlib.sha1()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)  # flat: a channels-last 1x1 conv weight has stride(-1) != 1
        h.update(f"{name}:{tuple(tensor.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class LatentCache:
    """Per-image VAE posteriors (mean, std) on disk, keyed by file path + mtime + size + resolution + flip,
    in a folder named by the VAE's fingerprint. Training draws ``z = mean + std * eps`` from the sample's
    seed, so cached and uncached runs see the same distribution of latents."""

    def __init__(self, vae: torch.nn.Module, to_model_latents: Callable[[Tensor], Tensor], folder: Path,
                 resolution: int, device: torch.device, dtype: torch.dtype = torch.float32):
        self.vae = vae
        self.to_model_latents = to_model_latents        # VAE latents -> model latents (`ModelBundle`'s)
        self.folder = Path(folder) / f"vae-{module_fingerprint(vae)[:16]}-{resolution}"
        self.resolution = resolution
        self.device = device
        self.dtype = dtype
        self.folder.mkdir(parents=True, exist_ok=True)

    def _file(self, path: Path, flipped: bool, bucket: tuple[int, int] | None) -> Path:
        stat = path.stat()
        key = f"{path.resolve()}|{stat.st_mtime_ns}|{stat.st_size}|{self.resolution}|{int(flipped)}"
        key += f"|{bucket[0]}x{bucket[1]}" if bucket else ""
        key += "|mirrored crop" if flipped else ""   # not the entries stored before its crop corner was mirrored
        return self.folder / (hashlib.sha1(key.encode()).hexdigest() + ".safetensors")

    def ensure(self, items: Sequence[tuple[ImageSample, bool, tuple[int, int] | None]], batch_size: int = 64) -> int:
        """Encode and store the posteriors of the (sample, flipped, bucket or None) items not cached yet, up to
        ``batch_size`` images of one bucket per VAE call. Returns how many were encoded."""
        targets = ((s, f, b, self._file(s.path, f, b)) for s, f, b in items)
        missing = sorted(((s, f, b, target) for s, f, b, target in targets if not target.is_file()),
                         key=lambda item: item[2] or (0, 0))
        runs = [list(same) for _, same in itertools.groupby(missing, key=lambda item: item[2])]
        chunks = [run[i:i + batch_size] for run in runs for i in range(0, len(run), batch_size)]
        done = 0
        for chunk in chunks:
            images = [load_training_image(s.path, self.resolution, center_crop=True, random_flip=False,
                                          generator=torch.Generator(), bucket=b, flip=f) for s, f, b, _ in chunk]
            pixels = torch.stack([im.pixels for im in images])  # (N, 3, H, W)
            with torch.no_grad():
                posterior = self.vae.encode(pixels.to(self.device, self.dtype))
            mean, std = posterior.mean.float().cpu(), posterior.std.float().cpu()  # (N, C, h, w)
            for i, ((_, _, _, target), image) in enumerate(zip(chunk, images)):
                write_safetensors_atomic(target, {  # a cache: atomic, not flushed file by file
                    "mean": mean[i].clone(), "std": std[i].clone(),
                    "original_size": torch.tensor(image.original_size),
                    "crop_top_left": torch.tensor(image.crop_top_left)}, fsync=False)
            done += len(chunk)
            if len(missing) > batch_size:
                logger.info("latent cache: %d / %d encoded", done, len(missing))
        return len(missing)

    def load(self, sample: ImageSample, flipped: bool, bucket: tuple[int, int] | None = None) -> dict[str, Tensor]:
        return load_file(str(self._file(sample.path, flipped, bucket)))


# ----------------------------------------------------------------------------------------------------------
# Batches


class TrainData:
    """Builds the micro-batch of (step, micro-step) for one rank, with decoding on a thread pool and a
    one-batch look-ahead. With ``bucket_resolutions`` (kohya's ``--enable_bucket``) each image trains at its
    bucket (`select_bucket`), and every image of a step comes from one bucket (`SampleStream`)."""

    def __init__(self, scan: DatasetScan, *, resolution: int, center_crop: bool, random_flip: bool, seed: int,
                 batch_size: int, grad_accum: int, rank: int = 0, world_size: int = 1, num_workers: int = 2,
                 latent_cache: LatentCache | None = None, shuffle_caption: bool = False, keep_tokens: int = 0,
                 caption_separator: str = ",", bucket_resolutions: Sequence[tuple[int, int]] | None = None):
        self.scan = scan
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.seed = seed
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.rank = rank
        self.world_size = world_size
        self.buckets = None if bucket_resolutions is None else \
            [select_bucket(*upright_size(s.path), bucket_resolutions) for s in scan.samples]
        if self.buckets is not None:
            counts = Counter(b for b, s in zip(self.buckets, scan.samples) for _ in range(s.repeats))
            logger.info("buckets (images with repeats): %s", ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(counts.items())))
        self.stream = SampleStream([s.repeats for s in scan.samples], seed, self.buckets, self.global_batch)
        self.latent_cache = latent_cache
        self.shuffle_caption = shuffle_caption
        self.keep_tokens = keep_tokens
        self.caption_separator = caption_separator
        self.broken_at_load: Counter = Counter()
        self._pool = ThreadPoolExecutor(max_workers=max(1, num_workers), thread_name_prefix="sdlab-data")

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    def epoch_at(self, step: int) -> int:
        return self.stream.epoch_of(step * self.global_batch)

    def slots(self, micro: int) -> list[int]:
        """Positions inside the global batch of this rank's micro-batch ``micro``."""
        start = micro * self.world_size * self.batch_size + self.rank * self.batch_size
        return list(range(start, start + self.batch_size))

    def sample_seed(self, step: int, slot: int) -> int:
        return derive_seed(self.seed, "sample", step, slot)

    def prepare_cache(self) -> None:
        """Encode the posteriors this rank is responsible for (every world_size-th sample)."""
        if self.latent_cache is None:
            return
        flips = (False, True) if self.random_flip else (False,)
        mine = [(sample, flipped, self.bucket_of(i)) for i, sample in enumerate(self.scan.samples)
                if i % self.world_size == self.rank for flipped in flips]
        self.latent_cache.ensure(mine)

    def bucket_of(self, index: int) -> tuple[int, int] | None:
        """The (width, height) bucket of sample ``index``; None without bucketing."""
        return None if self.buckets is None else self.buckets[index]

    def caption(self, caption: str, seed: int) -> str:
        """The caption a sample trains with: its tags shuffled (`shuffle_tags`, from the sample's seed) when asked."""
        if not self.shuffle_caption:
            return caption
        return shuffle_tags(caption, random.Random(derive_seed(seed, "caption")), self.keep_tokens,
                            self.caption_separator)

    def _stand_ins(self, position: int) -> Iterator[int]:
        """The samples that may fill stream ``position``: its own, then the next ones of the stream of its bucket,
        then, where none of those loads, the next ones of the other buckets (trained at its bucket, so that a
        step keeps one bucket)."""
        bucket = self.bucket_of(self.stream[position])
        following = range(position, position + self.stream.epoch_length)
        yield from (i for i in map(self.stream.__getitem__, following) if self.bucket_of(i) == bucket)
        yield from (i for i in map(self.stream.__getitem__, following) if self.bucket_of(i) != bucket)

    def _load_one(self, step: int, slot: int) -> tuple[ImageSample, int, LoadedImage | dict[str, Tensor]]:
        """The sample of a slot, or when it cannot be decoded the next one of the stream that can (`_stand_ins`);
        a file that failed once is passed over from then on (warned about and counted once)."""
        seed = self.sample_seed(step, slot)
        position = step * self.global_batch + slot
        bucket = self.bucket_of(self.stream[position])
        for index in self._stand_ins(position):
            sample = self.scan.samples[index]
            if str(sample.path) in self.broken_at_load:
                continue
            g = generator_for(seed, "augment")
            try:
                if self.latent_cache is not None:
                    flipped = bool(self.random_flip and float(torch.rand((), generator=g)) < 0.5)
                    if self.bucket_of(index) != bucket:     # not cached at this bucket: encoded now
                        self.latent_cache.ensure([(sample, flipped, bucket)])
                    return sample, seed, self.latent_cache.load(sample, flipped, bucket)
                image = load_training_image(sample.path, self.resolution, center_crop=self.center_crop,
                                            random_flip=self.random_flip, generator=g, bucket=bucket)
                return sample, seed, image
            except Exception as exc:  # a file that passed the scan but cannot be decoded now
                if str(sample.path) not in self.broken_at_load:
                    logger.warning("skipping %s from step %d on: %s", sample.path, step, " ".join(str(exc).split()),
                                   extra={"per_rank": True})  # only this process loads it (`train.cli` logging)
                self.broken_at_load[str(sample.path)] = 1
        raise RuntimeError("no sample of the dataset can be loaded")

    def _assemble(self, step: int, micro: int) -> Batch:
        loaded = list(self._pool.map(lambda slot: self._load_one(step, slot), self.slots(micro)))
        seeds = [seed for _, seed, _ in loaded]
        captions = [self.caption(s.caption, seed) for (s, _, _), seed in zip(loaded, seeds)]
        paths = [str(s.path) for s, _, _ in loaded]
        if self.latent_cache is not None:
            mean = torch.stack([e["mean"] for _, _, e in loaded])  # (B, C, h, w)
            std = torch.stack([e["std"] for _, _, e in loaded])
            latents = self.latent_cache.to_model_latents(posterior_sample(mean, std, seeds))
            return Batch(images=None, captions=captions, latents=latents, paths=paths, seeds=seeds,
                         original_sizes=[tuple(int(v) for v in e["original_size"]) for _, _, e in loaded],
                         crops_top_left=[tuple(int(v) for v in e["crop_top_left"]) for _, _, e in loaded])
        return Batch(
            images=torch.stack([img.pixels for _, _, img in loaded]),  # (B, 3, H, W)
            captions=captions, paths=paths, seeds=seeds,
            original_sizes=[img.original_size for _, _, img in loaded],
            crops_top_left=[img.crop_top_left for _, _, img in loaded],
        )

    def iterate(self, start_step: int, end_step: int) -> Iterator[tuple[int, int, Batch]]:
        """Yield (step, micro, batch) for steps [start_step, end_step), loading one batch ahead."""
        order = [(s, m) for s in range(start_step, end_step) for m in range(self.grad_accum)]
        pending: Future | None = None
        lookahead = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdlab-prefetch")
        try:
            for i, (step, micro) in enumerate(order):
                batch = pending.result() if pending is not None else self._assemble(step, micro)
                pending = lookahead.submit(self._assemble, *order[i + 1]) if i + 1 < len(order) else None
                yield step, micro, batch
        finally:
            lookahead.shutdown(wait=False, cancel_futures=True)  # no Thread.join: see `close`
            wait([pending] if pending is not None else [])     # a wait a KeyboardInterrupt may cut safely

    def close(self) -> None:
        """Stop the loading threads without joining them: they end on their own once their work is done (the
        interpreter's exit joins them). A KeyboardInterrupt raised inside Thread.join (a second Ctrl-C while
        training runs under the Python API) marks the still-running thread as ended on Python 3.11
        (cpython#90882); the exit then finalizes the interpreter under it, and the thread, waking inside
        torch, aborts the process ("terminate called without an active exception")."""
        self._pool.shutdown(wait=False, cancel_futures=True)
