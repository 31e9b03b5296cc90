"""Combine training folders into one without copying images: ``python -m sdlab.train.combine OUT SRC...``.

Writes ``OUT/metadata.jsonl`` with one ``{"file_name", "text"}`` line per usable (image, caption) pair of
every source folder (either layout that ``sdlab train`` reads), the file names relative to OUT; an image of a
kohya repeat folder (``10_sks dog``) is listed once per repeat, so an epoch draws it as often as before. The
images stay where they are, so a latent cache built on a source folder is reused (its key is the resolved path).
A kohya image that trains on the empty caption (a folder named ``10_``) has no line a metadata.jsonl trains on,
and is left out with a warning.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import NamedTuple

from sdlab.train.data import scan_dataset
from sdlab.utils.files import atomic_write

logger = logging.getLogger(__name__)


class Listed(NamedTuple):
    """What a combined metadata.jsonl lists: distinct images, and lines (an image of a repeat folder on several)."""
    images: int
    lines: int


def combine(out: str | os.PathLike[str], sources: list[str | os.PathLike[str]]) -> Listed:
    """Write ``out/metadata.jsonl`` listing every sample of ``sources``; returns how many images and lines."""
    out = Path(out)
    root = out.resolve()
    lines, images = [], set()
    for source in sources:
        samples = scan_dataset(source).samples
        uncaptioned = [sample.path for sample in samples if not sample.caption]
        if uncaptioned:
            logger.warning("%s: %d image(s) train on the empty caption (%s, ...), which a metadata.jsonl does not "
                           "list: left out", source, len(uncaptioned), uncaptioned[0])
        for sample in samples:
            name = os.path.relpath(sample.path.resolve(), root)
            line = json.dumps({"file_name": name, "text": sample.caption}, ensure_ascii=False)
            if sample.caption:
                lines += [line] * sample.repeats
                images.add(sample.path.resolve())
    if not lines:
        raise ValueError("the source folders hold no usable (image, caption) pairs")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "metadata.jsonl", lambda tmp: tmp.write_text("\n".join(lines) + "\n", encoding="utf-8"))
    return Listed(len(images), len(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sdlab.train.combine", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="folder for the combined metadata.jsonl")
    parser.add_argument("sources", nargs="+", help="training folders to list")
    args = parser.parse_args(argv)
    try:
        listed = combine(args.out_dir, args.sources)
    except (OSError, ValueError) as err:
        print(f"sdlab: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    repeats = f", {listed.lines} lines with repeats" if listed.lines != listed.images else ""
    print(f"wrote {Path(args.out_dir) / 'metadata.jsonl'}: {listed.images} images{repeats}")


if __name__ == "__main__":
    main()
