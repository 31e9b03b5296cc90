"""Generation parameters in PNG files, in the layout AUTOMATIC1111 writes (its "infotext").

A1111 stores one ``tEXt``/``iTXt`` chunk named ``parameters``::

    a photograph of an astronaut riding a horse
    Negative prompt: blurry, lowres
    Steps: 20, Sampler: Euler a, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, Model hash: abcdef1234, Model: name, Version: sdlab 0.1.0

Line 1 (possibly several lines) is the prompt, then ``Negative prompt: ...`` (left out when empty), then
one line of ``Key: value`` pairs joined by ``", "``. A value containing a comma, a colon or a newline is
written as a JSON string (A1111 ``infotext_utils.quote``); a key whose value equals the key is written
alone (a flag). Parameter mappings here use A1111's labels as keys, with ``"Prompt"`` and
``"Negative prompt"`` for the two prompts, so files written by either program read the same way.

Lossy corners, the same as in A1111: the text is stripped as a whole and each prompt line is stripped,
a prompt line that starts with ``Negative prompt:`` starts the negative prompt, empty lines before a
prompt's first text are dropped (``Negative prompt:`` alone on its line, the negative on the next), and a
last line with fewer than three ``Key: value`` pairs is read as prompt text.

JPEG and WebP files carry the same text in the EXIF ``UserComment`` tag, as A1111 writes it (piexif's
"unicode" encoding: ``UNICODE\\0`` then UTF-16-BE); one in IFD0 instead, where Fooocus writes it, is read
too. Reading is bounded: at most ``MAX_PARAMETERS_CHARS`` characters, parsed in linear time. Other programs'
metadata (ComfyUI's workflow, Fooocus's JSON, NovelAI's, InvokeAI's) is not read; ``foreign_metadata`` names it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import re
import secrets
import shutil
import stat
import struct
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

from PIL import Image, PngImagePlugin

from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.io import read_safetensors_header
from sdlab.pipeline.images import open_image, source_name
from sdlab.utils.file_hashes import cached_hash, file_sha256, known_file_sha256, known_hash, read_per_version
from sdlab.utils.files import atomic_write, fsync_dir

logger = logging.getLogger(__name__)

PARAMETERS_KEY = "parameters"          # the PNG text chunk A1111, ComfyUI-A1111 nodes and Civitai read
PROMPT = "Prompt"
NEGATIVE_PROMPT = "Negative prompt"

# A1111 infotext_utils.re_param: a key, a colon, then a JSON string or anything up to the next comma.
# Possessive quantifiers: a failed key never backtracks (A1111's pattern is quadratic on a long key-like
# run without a colon); `_pairs` skips such a run whole instead of retrying inside it.
_PARAM = re.compile(r'\s*(\w[\w \-/]++):\s*("(?:\\.|[^\\"])++"|[^,]*+)(?:,|$)')
_SKIP = re.compile(r"\s*(?:\w[\w \-/]*+|.)", re.DOTALL)
_KEY = re.compile(r"\w[\w \-/]+")
_NEGATIVE_PREFIX = "Negative prompt:"

MAX_PARAMETERS_CHARS = 65_536          # two 20,000-character prompts and the settings fit; longer text is refused
IMAGE_SUFFIXES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
_EXIF_IFD = 0x8769                     # the Exif sub-IFD
_USER_COMMENT = 0x9286
_UNICODE_PREFIX = b"UNICODE\0"         # EXIF character code of UserComment: UCS-2 / UTF-16, big-endian here
_ASCII_PREFIX = b"ASCII\0\0\0"


class ParametersError(ValueError):
    """An image whose parameters cannot be read (too large, undecodable, not an image)."""

# Fields whose values are numbers; everything else is returned as text, as A1111 does.
_INT_FIELDS = frozenset({"Steps", "Seed", "Clip skip", "Hires steps", "Variation seed", "ENSD"})
_FLOAT_FIELDS = frozenset({"CFG scale", "Denoising strength", "Variation seed strength", "Hires upscale", "Eta",
                           "Eta DDIM"})


def version_label() -> str:
    """The ``Version`` value sdlab writes, e.g. ``sdlab 0.1.0``."""
    try:
        return f"sdlab {metadata.version('sdlab')}"
    except metadata.PackageNotFoundError:
        return "sdlab"


def _format_value(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))                    # CFG scale 7.0 -> "7", as A1111's UI values read
    return str(value)


def quote(text: str) -> str:
    """A1111 ``quote``: JSON-quote a value with a comma, colon or newline; also one that starts with ``"``.

    The last case is an addition: A1111 would write ``"x"`` bare and read it back as ``x``.
    """
    if "," not in text and "\n" not in text and ":" not in text and not text.startswith('"'):
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text: str) -> str:
    """A1111 ``unquote``: decode a JSON string, keep anything else (or anything undecodable) as it is."""
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


_CHECKSUM = re.compile(r"\s*\[[^]]+]\s*$")     # A1111's sd_models.re_strip_checksum


def without_checksum(title: str) -> str:
    """A checkpoint's title as A1111 lists it ('name.safetensors [6ce0161689]') without its ' [hash]', as A1111's
    `get_closet_checkpoint_match` strips it (`re_strip_checksum`); any other text as it is."""
    return _CHECKSUM.sub("", title)


def format_parameters(p: Mapping[str, Any]) -> str:
    """The ``parameters`` text for a mapping of A1111 labels to values (``None`` values are left out).

    ``p["Prompt"]`` and ``p["Negative prompt"]`` are the prompts; every other key becomes a ``Key: value``
    pair on the last line, in the mapping's order (A1111's order is Steps, Sampler, Schedule type,
    CFG scale, Seed, Size, Model hash, Model, ..., Version).
    """
    prompt = str(p.get(PROMPT) or "")
    negative = str(p.get(NEGATIVE_PROMPT) or "")
    pairs = []
    for key, value in p.items():
        if key in (PROMPT, NEGATIVE_PROMPT) or value is None:
            continue
        if not _KEY.fullmatch(key):
            raise ValueError(f"parameter name {key!r} cannot be written (letters, digits, space, '-', '/')")
        text = _format_value(value)
        pairs.append(key if text == key else f"{key}: {quote(text)}")
    negative_line = f"\n{_NEGATIVE_PREFIX} {negative}" if negative else ""
    return f"{prompt}{negative_line}\n{', '.join(pairs)}".strip()


def _typed(key: str, value: str) -> Any:
    try:
        if key in _INT_FIELDS:
            return int(value)
        if key in _FLOAT_FIELDS:
            return float(value)
    except ValueError:
        logger.warning("parameter %r has a non-numeric value %r; kept as text", key, value)
    return value


def parse_parameters(text: str) -> dict[str, Any]:
    """Inverse of ``format_parameters``, and a reader of A1111-written ``parameters`` text.

    Returns ``{"Prompt": ..., "Negative prompt": ..., <label>: <value>, ...}``. Values are text, except
    integers for Steps, Seed, Clip skip (and a few other counts) and floats for CFG scale and Denoising
    strength. ``Size`` stays ``"WxH"``. Fields missing from the text are missing from the result (A1111
    fills in its UI defaults at this point; that is the caller's business here).
    """
    *lines, last_line = text.strip().split("\n")
    pairs = _pairs(last_line)
    if len(pairs) < 3:
        lines.append(last_line)
        pairs = []

    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith(_NEGATIVE_PREFIX):
            in_negative = True
            line = line[len(_NEGATIVE_PREFIX):].strip()
        (negative_lines if in_negative else prompt_lines).append(line)

    result: dict[str, Any] = {PROMPT: _joined(prompt_lines), NEGATIVE_PROMPT: _joined(negative_lines)}
    for key, value in pairs:
        if value[:1] == '"' and value[-1:] == '"':
            value = unquote(value)
        result[key] = _typed(key, value)
    return result


def _joined(lines: list[str]) -> str:
    """A prompt's lines as A1111 joins them, a newline before a line only once the prompt holds text: the empty
    lines before its first text (the empty rest of a `Negative prompt:` line) are dropped."""
    first = next((i for i, line in enumerate(lines) if line), len(lines))
    return "\n".join(lines[first:])


def _pairs(line: str) -> list[tuple[str, str]]:
    """Every ``Key: value`` pair of ``line``: what ``re.findall`` with A1111's pattern finds, in linear time.

    Where no pair starts, a whole run of key characters is skipped: a pair cannot start inside it either,
    since every start in the run reaches the same end, which is not followed by ``:``.
    """
    pairs, position = [], 0
    while position < len(line):
        match = _PARAM.match(line, position)
        if match:
            pairs.append((match.group(1), match.group(2)))
            position = match.end() if match.end() > position else position + 1
        else:
            position = _SKIP.match(line, position).end()
    return pairs


def save_png_atomic(image: Image.Image, path: str | os.PathLike, parameters: str | None) -> None:
    """Write ``image`` as a PNG with a ``parameters`` text chunk, atomically.

    The file is written under a temporary name in the same directory, flushed to disk, then renamed over
    ``path`` (``sdlab.utils.files.atomic_write``), so a reader never sees half a file; on any error the temporary file is
    removed and ``path`` is left as it was. Text that is not Latin-1 goes into an ``iTXt`` (UTF-8) chunk.
    """
    path = Path(path)
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text(PARAMETERS_KEY, parameters)
    atomic_write(path, lambda temporary: image.save(temporary, format="PNG", pnginfo=info))


def other_text_items(image: Image.Image) -> dict[str, str]:
    """A picture's text items besides its parameters (`image.info`'s strings: a ComfyUI workflow, ...), which
    A1111's Extras keeps in what it writes (`run_postprocessing`: `read_info_from_image`'s items)."""
    return {key: value for key, value in image.info.items()
            if isinstance(key, str) and isinstance(value, str) and key != PARAMETERS_KEY}


def read_parameters(path: str | os.PathLike) -> str | None:
    """The ``parameters`` text stored in an image file (PNG chunk or JPEG / WebP EXIF), or ``None``.

    Raises ``ParametersError`` for an image Pillow refuses (too many pixels: a decompression bomb, or
    text chunks beyond Pillow's limits) and for text longer than ``MAX_PARAMETERS_CHARS``;
    ``FileNotFoundError`` / ``OSError`` for a missing or unreadable file.
    """
    try:
        with open_image(path) as image:
            chunks = getattr(image, "text", None)     # PNG: every tEXt/iTXt/zTXt chunk, also those after IDAT
            value = chunks.get(PARAMETERS_KEY) if chunks is not None else image.info.get(PARAMETERS_KEY)
            if value is None and image.format in ("JPEG", "WEBP", "MPO"):
                value = _exif_parameters(image)
    except ValueError as err:                       # Pillow: "Decompressed Data Too Large", bombs, bad EXIF
        raise ParametersError(f"cannot read the parameters of {source_name(path)}: {err}") from None
    if not isinstance(value, str):
        return None
    if len(value) > MAX_PARAMETERS_CHARS:
        raise ParametersError(f"the parameters text of {source_name(path)} is {len(value)} characters long; "
                              f"the limit is {MAX_PARAMETERS_CHARS}")
    return value


def _exif_parameters(image: Image.Image) -> str | None:
    """The parameters in a JPEG / WebP's EXIF UserComment: the Exif IFD's, where A1111 writes it, else IFD0's,
    where Fooocus does; None when absent or when the EXIF is broken."""
    try:
        exif = image.getexif()
        comment = exif.get_ifd(_EXIF_IFD).get(_USER_COMMENT)
        return _user_comment(exif.get(_USER_COMMENT) if comment is None else comment)
    except Exception as err:        # Pillow's EXIF parser raises many types on corrupt data; it only loses text
        logger.warning("cannot read the EXIF of %s: %s", getattr(image, "filename", "the image"), err)
        return None


def _user_comment(data: Any) -> str | None:
    """An EXIF UserComment as text (A1111 writes ``UNICODE\\0`` + UTF-16-BE; Fooocus ASCII text, which Pillow
    reads as a str), or None."""
    if isinstance(data, str):
        return data or None
    if not isinstance(data, bytes) or len(data) > 4 * MAX_PARAMETERS_CHARS:
        return None
    if data.startswith(_UNICODE_PREFIX):
        return data[8:].decode("utf-16-be", errors="replace")
    if data.startswith(_ASCII_PREFIX):
        return data[8:].decode("ascii", errors="replace")
    return data.decode("utf-8", errors="ignore") or None       # A1111's fallback for unprefixed bytes


def foreign_metadata(source: str | os.PathLike | io.BytesIO, text: str | None) -> str | None:
    """What an image holds in place of the A1111 parameters text sdlab reads, named by the program that writes
    it, or None: a JSON object as its parameters `text` (Fooocus's own scheme, SwarmUI's) or, where it has no
    parameters text, ComfyUI's, InvokeAI's or NovelAI's text chunks. `source` is the image (a path or its bytes)."""
    if text:
        return _json_metadata(text)
    try:
        with open_image(source) as image:
            chunks = dict(getattr(image, "text", None) or {})
    except (OSError, ValueError):
        return None
    if str(chunks.get("Software", "")).startswith("NovelAI"):
        return "NovelAI's metadata (its 'Comment' chunk)"
    return next((what for chunk, what in _OTHER_CHUNKS.items() if chunk in chunks), None)


# PNG text chunks in which other programs keep their settings instead of a `parameters` text -> what they hold
_OTHER_CHUNKS = {
    "prompt": "ComfyUI's workflow (its 'prompt' / 'workflow' chunks)",
    "workflow": "ComfyUI's workflow (its 'prompt' / 'workflow' chunks)",
    "invokeai_metadata": "InvokeAI's metadata (its 'invokeai_metadata' chunk)",
    "sd-metadata": "InvokeAI's metadata (its 'sd-metadata' chunk)",
    "Dream": "InvokeAI's metadata (its 'Dream' chunk)",
}


def _json_metadata(text: str) -> str | None:
    """JSON settings in a parameters text, named by their program (None: not a JSON object)."""
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    if "sui_image_params" in data:
        return "SwarmUI's JSON metadata"
    if data.get("metadata_scheme") == "fooocus" or "fooocus" in str(data.get("version", "")).lower():
        return "Fooocus's JSON metadata (its 'fooocus' scheme; its 'a1111' scheme writes A1111's text)"
    return "JSON metadata"


def _exif_with_comment(text: str) -> bytes:
    """EXIF holding only a UserComment, typed UNDEFINED (7) as the EXIF standard and A1111's piexif write it
    (Pillow would type the bytes BYTE, which piexif, and so A1111's PNG Info, cannot read): a big-endian TIFF
    header, IFD0 at 8 with the Exif IFD's pointer, the Exif IFD at 26, the comment at 44."""
    comment = _UNICODE_PREFIX + text.encode("utf-16-be")
    entry = ">HHHII I"   # entries in the IFD (1), tag, type, count, value or offset, next IFD (none)
    ifd0 = struct.pack(entry, 1, _EXIF_IFD, 4, 1, 26, 0)                       # LONG pointer, bytes 8..26
    exif_ifd = struct.pack(entry, 1, _USER_COMMENT, 7, len(comment), 44, 0)    # UNDEFINED, bytes 26..44
    return b"Exif\x00\x00MM\x00*" + struct.pack(">I", 8) + ifd0 + exif_ifd + comment


def image_format(path: str | os.PathLike) -> str | None:
    """``"PNG"``, ``"JPEG"`` or ``"WEBP"`` from a file name's extension, or None for any other name."""
    return IMAGE_SUFFIXES.get(Path(path).suffix.lower())


def encode_image(image: Image.Image, fmt: str, parameters: str | None, quality: int = 95,
                 texts: Mapping[str, str] | None = None) -> bytes:
    """The bytes of ``image`` as a PNG (``parameters`` text chunk, then one per item of ``texts``, as A1111's
    ``encode_pil_to_base64`` writes a picture's text items) or a JPEG / WebP (EXIF UserComment: the parameters
    alone, as A1111's).

    JPEG and WebP are written at ``quality`` (95 unless given); a JPEG's EXIF holds at most 64 KiB (about
    32,000 characters of parameters): longer text raises ``ParametersError``.
    """
    buffer = io.BytesIO()
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        if parameters is not None:
            info.add_text(PARAMETERS_KEY, parameters)
        for key, text in (texts or {}).items():
            info.add_text(key, text)
        image.save(buffer, format="PNG", pnginfo=info)
        return buffer.getvalue()
    if fmt not in ("JPEG", "WEBP"):
        raise ValueError(f"cannot write {fmt!r} images; sdlab writes PNG, JPEG and WebP")
    exif = _exif_with_comment(parameters) if parameters is not None else b""
    if fmt == "JPEG" and len(exif) > 65_000:
        raise ParametersError(f"the parameters ({len(parameters or '')} characters) do not fit in a JPEG's "
                              "64 KiB EXIF block; write a .png or a .webp")
    image.convert("RGB").save(buffer, format=fmt, quality=quality, exif=exif)
    return buffer.getvalue()


def write_files_all_or_nothing(files: Sequence[tuple[Path, bytes]], *, overwrite: bool) -> None:
    """Write every ``(path, data)`` or none: all go to temporary files first, then each is renamed.

    With ``overwrite=False`` an existing file is never replaced: ``FileExistsError`` is raised and the files
    of this call already in place are removed again. With ``overwrite=True`` whatever a name held but a folder
    (a file, a symlink: ``_keep_aside``) is kept aside until every name is placed, so that a later name that
    cannot be placed (a folder of that name) takes the batch back and puts the replaced entries back. A name
    is recorded before its rename and the take-back asks whether the rename took place (``_holds``), so an
    interrupt (Ctrl+C) at any point leaves the names as they were. A full disk raises ``OSError`` with
    ``errno.ENOSPC`` (or ``EDQUOT``) before any file of the batch appears. Temporary names are short
    (``.sdlab-<hex>.tmp``) so that only the final names meet the file system's name-length limit.
    """
    temporaries: list[tuple[Path, Path]] = []
    placed: list[tuple[Path, Path]] = []            # (temporary, name) whose rename has begun
    kept: dict[Path, Path] = {}                     # a replaced entry's name -> the second name kept of it
    try:
        for path, data in files:
            temporary = path.with_name(f".sdlab-{secrets.token_hex(6)}.tmp")
            temporaries.append((temporary, path))
            with open(temporary, "xb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
        for temporary, path in temporaries:
            if overwrite and _stands(path):
                kept[path] = path.with_name(f".sdlab-{secrets.token_hex(6)}.old")   # recorded before it is made
                _keep_aside(path, kept[path])
            placed.append((temporary, path))
            _place(temporary, path, overwrite)
    except BaseException:
        for temporary, path in placed:
            with contextlib.suppress(OSError):
                if _holds(path, temporary):
                    if path in kept:
                        os.replace(kept.pop(path), path)
                    else:
                        path.unlink(missing_ok=True)
        for leftover in [temporary for temporary, _ in temporaries] + list(kept.values()):
            with contextlib.suppress(OSError):      # a read-only folder: the error raised is the write's
                leftover.unlink(missing_ok=True)
        raise
    for copy in kept.values():
        with contextlib.suppress(OSError):
            copy.unlink()
    for folder in {path.parent for path, _ in files}:
        fsync_dir(folder)


def _stands(path: Path) -> bool:
    """Whether something other than a folder stands at ``path`` (a symlink counts as itself, not its target)."""
    try:
        return not stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _keep_aside(path: Path, copy: Path) -> None:
    """Make ``copy`` a second name for the entry at ``path``, to put it back with: a symlink as a link to the
    same target, anything else as a hard link, else (a file system without them) a regular file as a copy.
    A copy that fails (a full disk) is removed again, and its error names ``path``."""
    if path.is_symlink():
        os.symlink(os.readlink(path), copy)
        return
    try:
        os.link(path, copy)
        return
    except OSError:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            raise
    try:
        shutil.copy2(path, copy)
    except BaseException as err:
        with contextlib.suppress(OSError):
            copy.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.filename is None:
            err.filename = str(path)
        raise


def _holds(path: Path, temporary: Path) -> bool:
    """Whether ``path`` holds the file written at ``temporary``: its rename (or hard link) took place."""
    try:
        written = os.lstat(temporary)
    except FileNotFoundError:
        return True                                 # renamed, or linked and the temporary removed
    try:
        return os.path.samestat(written, os.lstat(path))
    except FileNotFoundError:
        return False


def _place(temporary: Path, path: Path, overwrite: bool) -> None:
    """Rename ``temporary`` to ``path``; without ``overwrite`` fail with FileExistsError if ``path`` exists."""
    if overwrite:
        os.replace(temporary, path)
        return
    try:
        os.link(temporary, path)                  # atomic "create if absent", even against another process
    except FileExistsError:
        raise
    except OSError as err:                        # a file system without hard links
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path)) from None
        os.replace(temporary, path)
        return
    temporary.unlink()


def model_hash(path: str | os.PathLike) -> str:
    """A1111's short model hash: the first 10 hex digits of the SHA-256 of the whole file."""
    return file_sha256(path)[:10]


def vae_ref(report: Any) -> tuple[str, str | None] | None:
    """The standalone VAE a model was loaded with (a `LoadReport`'s `vae_file`: the `vae` argument, or the
    `<name>.vae.*` beside the model, as A1111 draws it) as A1111 records it: (file name, short hash), its
    `VAE` / `VAE hash` (a folder has no hash); None for the model's own VAE."""
    vae = getattr(report, "vae_file", None)
    if vae is None:
        return None
    return Path(vae).name, model_hash(vae) if os.path.isfile(vae) else None


def embedding_hash(path: str | os.PathLike) -> str:
    """A1111's short embedding hash (``TI hashes``): the first 12 hex digits of the file's SHA-256."""
    return file_sha256(path)[:12]


def _sha256_rest(file: Any, block_size: int) -> str:
    """Hex SHA-256 of what is left of the open binary ``file``, read in blocks of ``block_size``."""
    digest = hashlib.sha256()
    while block := file.read(block_size):
        digest.update(block)
    return digest.hexdigest()


def lora_hash(path: str | os.PathLike) -> str:
    """A1111's short LoRA hash (``Lora hashes``): the first 12 characters of the ``sshs_model_hash`` a
    ``.safetensors`` file's metadata holds (kohya writes it), which A1111 1.10's ``NetworkOnDisk`` takes before
    any hash it computes; else 12 hex digits of the SHA-256 of the file, for a ``.safetensors`` file of its
    tensor data only (the "addnet" hash, which ignores the header)."""
    return _stored_lora_hash(path) or cached_hash(path, "addnet", _addnet_hash)


def known_lora_hash(path: str | os.PathLike) -> str | None:
    """`lora_hash` where the file's metadata holds it or it has been computed for this version of the file, else
    None (no more than the header is read)."""
    return _stored_lora_hash(path) or known_hash(path, "addnet")


def _stored_lora_hash(path: str | os.PathLike) -> str | None:
    """The first 12 characters of a ``.safetensors`` file's ``sshs_model_hash``, as they are; None without one."""
    if Path(path).suffix.lower() != ".safetensors":
        return None
    return read_per_version(path, safetensors_metadata).get("sshs_model_hash", "")[:12] or None


def _addnet_hash(path: Path) -> str:
    with open(path, "rb") as file:
        if path.suffix.lower() == ".safetensors":
            file.seek(read_safetensors_header(file, path)[1])
        return _sha256_rest(file, 1 << 20)[:12]


def readable_lora_hash(path: str | os.PathLike) -> str | None:
    """`lora_hash`, or None with a warning naming the file when it is not readable safetensors (a LoRA
    folder is listed or searched around such a file, as A1111 lists what it can read)."""
    try:
        return lora_hash(path)
    except CheckpointError as err:
        logger.warning("skipping %s", err)
        return None


_GENERIC_STEM = re.compile(r"(final|last|model|checkpoint|diffusion_pytorch_model|step-?\d+)(-ema)?", re.IGNORECASE)


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` of a ``.safetensors`` file's header ({} when unreadable or absent)."""
    try:
        with open(path, "rb") as file:
            header, _ = read_safetensors_header(file, path)
    except (OSError, CheckpointError):
        return {}
    meta = header.get("__metadata__")
    return {k: v for k, v in meta.items() if isinstance(v, str)} if isinstance(meta, dict) else {}


def model_name(path: str | os.PathLike) -> str:
    """The ``Model`` name written into the parameters: the file's own title, else a name from its path.

    A ``modelspec.title`` in a ``.safetensors`` header wins; a diffusers folder is named by the folder; a
    file with a generic name (``final.safetensors``, ``final-ema``, ``last``, ``model``, ``step-200``, as
    training runs write them) is named by its run folder (``runs/cats/final-ema.safetensors`` ->
    ``cats-final-ema``... except ``final``, which is the run's own name: ``cats``); anything else by its stem.
    """
    path = Path(path)
    absolute = Path(os.path.abspath(path))          # normalised, symlinks kept: a link's own name counts
    if path.is_dir():
        return absolute.name
    title = safetensors_metadata(path).get("modelspec.title", "").strip() if path.suffix == ".safetensors" else ""
    if title:
        return " ".join(title.split())[:200]
    stem = path.stem
    if _GENERIC_STEM.fullmatch(stem):
        folder = absolute.parent.name
        if folder:
            return folder if stem.lower() == "final" else f"{folder}-{stem}"
    return stem
