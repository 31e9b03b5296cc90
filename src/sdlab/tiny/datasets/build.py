"""Write a training set: a folder of PNG images with same-name .txt captions, plus metadata.jsonl.

Sample `i` of a set built with `seed` is drawn from its own generator `default_rng([seed, i])`, so a
set is deterministic from its seed, and the first n samples of a larger set equal a set of n. The
caption's wording (paraphrase template, which stated fields it leaves out) comes from a second generator,
`default_rng([seed, i, 1])`, so the images do not depend on the caption options.
Captions that leave a field out ("a red apple on a light blue background": no size, no position) teach the
model prompts that say less than the picture shows; `metadata.jsonl` keeps the full scene in `spec`.
With `unsaid_defaults` a field the caption leaves out is drawn at its default instead (`UNSAID_DEFAULTS`:
large, in the center, on white), as a photographer frames a subject nobody placed: "a cat" then means one
picture, not a spread of them that a small model blurs into fragments. The images then depend on which
fields the caption omits (the caption generator is drawn first).
Shapes never use a pair of `HELD_OUT_SHAPE_COLOURS`, nor a colour too close to the background
(`MIN_CONTRAST` Delta E*ab) to be seen.

Command line: `python -m sdlab.tiny.datasets.build OUT --count 50000 --seed 0 [--kind mixed|emoji|shapes]`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from sdlab.tiny.datasets.captions import CAPTION_TEMPLATES, COUNTS, SHAPES, SceneSpec, caption
from sdlab.tiny.datasets.colours import BACKGROUND_COLOURS, MIN_CONTRAST, SUBJECT_COLOURS, contrasting
from sdlab.tiny.datasets.emoji_subset import EMOJI_NAMES
from sdlab.tiny.datasets.layout import POSITIONS, SIZES
from sdlab.tiny.datasets.phrasing import ALIAS_PROB, free_caption
from sdlab.tiny.datasets.scene import render_scene
from sdlab.tiny.datasets.shapes import is_held_out
from sdlab.utils.files import atomic_write

__all__ = ["DATASET_KINDS", "MIN_CONTRAST", "OMITTABLE_FIELDS", "UNSAID_DEFAULTS", "build_dataset", "caption_variant",
           "sample_spec", "shape_pairs_for_training", "unsaid_fields", "with_unsaid_defaults"]

logger = logging.getLogger(__name__)

DATASET_KINDS = ("mixed", "emoji", "shapes")
OMITTABLE_FIELDS = ("size", "position", "background")  # what a caption may leave unsaid
#: what a field the caption leaves out is drawn as, with `unsaid_defaults` (a shape that would not stand out
#: on white goes on black)
UNSAID_DEFAULTS: dict[str, str] = {"size": "large", "position": "center", "background": "white"}


def shape_pairs_for_training() -> list[tuple[str, str]]:
    """(shape, colour) pairs a training set may draw: all pairs minus the held-out ones."""
    return [(s, c) for s in SHAPES for c in SUBJECT_COLOURS if not is_held_out(s, c)]


def sample_spec(rng: np.random.Generator, kind: str, emoji_fraction: float = 0.5,
                plural_prob: float = 0.0) -> SceneSpec:
    """Draw one training scene (uniform over the allowed combinations of each attribute); with
    ``plural_prob`` the scene has two or three small copies of its subject instead of one."""
    if kind == "mixed":
        kind = "emoji" if rng.random() < emoji_fraction else "shapes"
    size = SIZES[rng.integers(len(SIZES))]
    position = POSITIONS[rng.integers(len(POSITIONS))]
    count = 1
    if plural_prob and rng.random() < plural_prob:
        count, size, position = COUNTS[1 + int(rng.integers(len(COUNTS) - 1))], "small", None
    if kind == "emoji":
        background = BACKGROUND_COLOURS[rng.integers(len(BACKGROUND_COLOURS))]
        return SceneSpec("emoji", EMOJI_NAMES[rng.integers(len(EMOJI_NAMES))], None, size, position, background,
                         count)
    if kind != "shapes":
        raise ValueError(f"kind must be one of {DATASET_KINDS}, got {kind!r}")
    pairs = shape_pairs_for_training()
    shape, colour = pairs[rng.integers(len(pairs))]
    backgrounds = [b for b in BACKGROUND_COLOURS if contrasting(colour, b)]
    background = backgrounds[rng.integers(len(backgrounds))]
    return SceneSpec("shape", shape, colour, size, position, background, count)


def unsaid_fields(spec: SceneSpec, rng: np.random.Generator, omit_probs: Mapping[str, float]) -> SceneSpec:
    """What a caption of ``spec`` states: each omittable field dropped (set to None) with its chance in
    ``omit_probs``; several copies are said without size or position."""
    said = replace(spec, **{name: None for name in OMITTABLE_FIELDS if rng.random() < omit_probs.get(name, 0.0)})
    if spec.count != 1:
        said = replace(said, size=None, position=None)
    return said


def with_unsaid_defaults(spec: SceneSpec, said: SceneSpec) -> SceneSpec:
    """The scene to draw for a caption stating ``said``: every field it leaves out at `UNSAID_DEFAULTS`
    (several copies keep their group layout)."""
    if spec.count == 1:
        spec = replace(spec, **{name: UNSAID_DEFAULTS[name] for name in ("size", "position")
                                if getattr(said, name) is None})
    if said.background is None:
        background = UNSAID_DEFAULTS["background"]
        if spec.kind == "shape" and not contrasting(spec.colour, background):
            background = "black"
        spec = replace(spec, background=background)
    return spec


def caption_variant(said: SceneSpec, rng: np.random.Generator, paraphrase_prob: float, free_prob: float = 0.0,
                    synonym_prob: float = 0.0, alias_prob: float = ALIAS_PROB) -> str:
    """The caption of what ``said`` states (`unsaid_fields`): free phrasing with ``free_prob`` (colours written
    as other spellings with ``synonym_prob``, emoji by everyday names with ``alias_prob``), else a paraphrase
    template with ``paraphrase_prob``, else the canonical template."""
    if free_prob and rng.random() < free_prob:
        return free_caption(said, rng, synonym_prob=synonym_prob, alias_prob=alias_prob)
    template = int(rng.integers(1, CAPTION_TEMPLATES)) if rng.random() < paraphrase_prob else 0
    return caption(said, template)


def _write_atomic(path: Path, data: bytes) -> None:
    """Many small files: atomic, but not flushed to disk one by one (``fsync=False``)."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data), fsync=False)


def build_dataset(
    out_dir: str | os.PathLike[str],
    count: int,
    seed: int = 0,
    kind: str = "mixed",
    image_size: int = 64,
    emoji_fraction: float = 0.5,
    paraphrase_prob: float = 0.0,
    omit_probs: Mapping[str, float] | None = None,
    free_prob: float = 0.0,
    plural_prob: float = 0.0,
    unsaid_defaults: bool = False,
    synonym_prob: float = 0.0,
    alias_prob: float = ALIAS_PROB,
) -> list[dict[str, object]]:
    """Write `count` images `NNNNNN.png` + `NNNNNN.txt` and `metadata.jsonl` into `out_dir`.

    paraphrase_prob: chance that a caption uses one of the paraphrase templates instead of the
    canonical one. omit_probs: field ("size", "position", "background") -> chance that the caption leaves
    it out (independently per field). free_prob: chance of a freely worded caption (`phrasing.free_caption`).
    plural_prob: chance of a scene with two or three small copies of its subject. unsaid_defaults: draw the
    fields a caption leaves out at `UNSAID_DEFAULTS` instead of at random. synonym_prob: chance that a free
    caption writes a colour as another spelling the parser reads ("grey", "navy"). alias_prob: chance that a
    free caption calls an emoji by an everyday name ("a frog", "pizza") where it has one. Returns the metadata records
    (file, caption, full spec) in order.
    """
    omit_probs = dict(omit_probs or {})
    unknown = set(omit_probs) - set(OMITTABLE_FIELDS)
    if unknown:
        raise ValueError(f"omit_probs: unknown fields {sorted(unknown)}; known: {', '.join(OMITTABLE_FIELDS)}")
    import io

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    digits = max(6, len(str(max(count - 1, 0))))
    records: list[dict[str, object]] = []
    for index in range(count):
        rng = np.random.default_rng([seed, index])
        spec = sample_spec(rng, kind, emoji_fraction, plural_prob)
        wording = np.random.default_rng([seed, index, 1])
        said = unsaid_fields(spec, wording, omit_probs)
        if unsaid_defaults:
            spec = with_unsaid_defaults(spec, said)
        text = caption_variant(said, wording, paraphrase_prob, free_prob, synonym_prob, alias_prob)
        image = render_scene(spec, rng, image_size)
        stem = f"{index:0{digits}d}"
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        _write_atomic(out / f"{stem}.png", buffer.getvalue())
        _write_atomic(out / f"{stem}.txt", text.encode())
        records.append({"file": f"{stem}.png", "caption": text, "spec": asdict(spec)})
        if (index + 1) % 5000 == 0:
            logger.info("wrote %d / %d images", index + 1, count)
    lines = "".join(json.dumps(record) + "\n" for record in records)
    _write_atomic(out / "metadata.jsonl", lines.encode())
    return records


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sdlab.tiny.datasets.build",
                                     description="Build an sdlab emoji / shapes training set.")
    parser.add_argument("out_dir")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kind", choices=DATASET_KINDS, default="mixed")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--emoji-fraction", type=float, default=0.5)
    parser.add_argument("--paraphrase-prob", type=float, default=0.0,
                        help="chance of a paraphrase template instead of the canonical caption")
    parser.add_argument("--free-prob", type=float, default=0.0,
                        help="chance of a freely worded caption (synonyms, word order, everyday names, extra words)")
    parser.add_argument("--plural-prob", type=float, default=0.0,
                        help="chance of a scene with two or three small copies of its subject")
    parser.add_argument("--unsaid-defaults", action="store_true",
                        help="draw a field the caption leaves out at its default (large, center, white) "
                             "instead of at random")
    parser.add_argument("--synonym-prob", type=float, default=0.0,
                        help="chance that a free caption writes a colour as another spelling (grey, violet, navy)")
    parser.add_argument("--alias-prob", type=float, default=ALIAS_PROB,
                        help="chance that a free caption calls an emoji by an everyday name (a frog, pizza, the moon)")
    for name in OMITTABLE_FIELDS:
        parser.add_argument(f"--omit-{name}", type=float, default=0.0, metavar="P",
                            help=f"chance that a caption leaves the {name} out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    omit = {name: getattr(args, f"omit_{name}") for name in OMITTABLE_FIELDS}
    build_dataset(args.out_dir, args.count, args.seed, args.kind, args.image_size, args.emoji_fraction,
                  args.paraphrase_prob, omit, args.free_prob, args.plural_prob, args.unsaid_defaults,
                  args.synonym_prob, args.alias_prob)


if __name__ == "__main__":
    main()
