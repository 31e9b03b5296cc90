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
a prompt line that starts with ``Negative prompt:`` starts the negative prompt, and a last line with
fewer than three ``Key: value`` pairs is read as prompt text.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

from PIL import Image, PngImagePlugin

from sdlab.utils.files import atomic_write

logger = logging.getLogger(__name__)

PARAMETERS_KEY = "parameters"          # the PNG text chunk A1111, ComfyUI-A1111 nodes and Civitai read
PROMPT = "Prompt"
NEGATIVE_PROMPT = "Negative prompt"

# A1111 infotext_utils.re_param: a key, a colon, then a JSON string or anything up to the next comma.
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_KEY = re.compile(r"\w[\w \-/]+")
_NEGATIVE_PREFIX = "Negative prompt:"

# Fields whose values are numbers; everything else is returned as text, as A1111 does.
_INT_FIELDS = frozenset({"Steps", "Seed", "Clip skip", "Hires steps", "Variation seed", "ENSD"})
_FLOAT_FIELDS = frozenset({"CFG scale", "Denoising strength", "Variation seed strength", "Hires upscale", "Eta"})


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
    if len(_PARAM.findall(last_line)) < 3:
        lines.append(last_line)
        last_line = ""

    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith(_NEGATIVE_PREFIX):
            in_negative = True
            line = line[len(_NEGATIVE_PREFIX):].strip()
        (negative_lines if in_negative else prompt_lines).append(line)

    result: dict[str, Any] = {PROMPT: "\n".join(prompt_lines), NEGATIVE_PROMPT: "\n".join(negative_lines)}
    for key, value in _PARAM.findall(last_line):
        if value[:1] == '"' and value[-1:] == '"':
            value = unquote(value)
        result[key] = _typed(key, value)
    return result


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


def read_parameters(path: str | os.PathLike) -> str | None:
    """The ``parameters`` text stored in an image file, or ``None`` when it has none."""
    with Image.open(path) as image:
        chunks = getattr(image, "text", None)     # PNG: every tEXt/iTXt/zTXt chunk, also those after IDAT
        value = chunks.get(PARAMETERS_KEY) if chunks is not None else image.info.get(PARAMETERS_KEY)
    return value if isinstance(value, str) else None


def model_hash(path: str | os.PathLike, block_size: int = 1 << 20) -> str:
    """A1111's short model hash: the first 10 hex digits of the SHA-256 of the whole file."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(block_size):
            digest.update(block)
    return digest.hexdigest()[:10]
