"""A1111 1.10's Prompts from file or textbox script (scripts/prompts_from_file.py): one job per line.

    a red apple
    --prompt "a green pear" --negative_prompt blurry --steps 12 --seed 7
    --prompt a cat --sampler_name "Euler a" --width 512 --height 768 --n_iter 2

Lines are stripped and empty ones skipped. A line with `--` in it is read as A1111's `cmdargs` reads it
(`line_args`): split as a shell would (`shlex`: quotes keep spaces), `--prompt` and `--negative_prompt` take the
words up to the next `--word`, every other tag one value, converted as A1111's `prompt_tags` says (`PROMPT_TAGS`:
int, float, a boolean that is true only as `true`, a text, a checkpoint); `--sampler_name` is looked up among
A1111's sampler names and aliases in any case (None where unknown, as A1111's `samplers_map.get`). Such a line that
does not read (a word without `--`, a tag without a value, a tag not in the table, a number that is none) is a
`PromptsFileError` with A1111's text; A1111 then draws the whole line as a prompt (`read_lines` gives both).
A line without `--` is a prompt.

A line's prompt goes before the request's (`prompt_position` "start") or after it ("end"), with a space, and so
does its negative prompt; the request's stands alone where the line has none (`line_prompts`). Seeds
(`line_seeds`): with Iterate seed every line each line starts batch_size * n_iter (the request's) after the one
before, with Use same random seed for all lines every line draws the request's seed, a -1 drawn once for either;
otherwise each line draws the request's seed as it is (a -1 its own). A line's --seed wins over either.
"""

from __future__ import annotations

import io
import shlex
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from sdlab.diffusion.samplers import A1111_SAMPLERS_MAP
from sdlab.pipeline.request import fixed_seed

POSITIONS = ("start", "end")        # A1111's Insert prompts at the


class PromptsFileError(ValueError):
    """A line A1111's `cmdargs` cannot read, with A1111's error text; `bad_value` the (tag, text) of a value that is
    not the tag's kind (`--steps abc`: ("steps", "abc")), `unknown_tag` a tag not in `PROMPT_TAGS` (`--step`:
    "step"), None for the other errors."""

    def __init__(self, message: str, bad_value: tuple[str, str] | None = None, unknown_tag: str | None = None) -> None:
        super().__init__(message)
        self.bad_value, self.unknown_tag = bad_value, unknown_tag


def _boolean(text: str) -> bool:
    return text == "true"            # A1111's `process_boolean_tag`: anything else is False


PROMPT_TAGS: dict[str, Any] = {     # A1111 1.10 scripts/prompts_from_file.py `prompt_tags`, in order
    "sd_model": "checkpoint", "outpath_samples": str, "outpath_grids": str, "prompt_for_display": str, "prompt": str,
    "negative_prompt": str, "styles": str, "seed": int, "subseed_strength": float, "subseed": int,
    "seed_resize_from_h": int, "seed_resize_from_w": int, "sampler_index": int, "sampler_name": str,
    "batch_size": int, "n_iter": int, "steps": int, "cfg_scale": float, "width": int, "height": int,
    "restore_faces": _boolean, "tiling": _boolean, "do_not_save_samples": _boolean, "do_not_save_grid": _boolean,
}


def a1111_sampler_name(text: str) -> str | None:
    """A1111's `samplers_map.get(text.lower())`: the sampler's A1111 name where `text` is one of A1111's names or
    aliases in any case, else None."""
    return A1111_SAMPLERS_MAP.get(text.lower())


def line_args(line: str, find_checkpoint: Callable[[str], str | None] = lambda name: name) -> dict[str, Any]:
    """A1111's `cmdargs(line)`: the line's tags and values. `find_checkpoint` names the checkpoint of
    `--sd_model` (A1111's `get_closet_checkpoint_match`), None where there is none."""
    try:
        words = shlex.split(line)
    except ValueError as err:                    # "No closing quotation", "No escaped character"
        raise PromptsFileError(str(err)) from None
    args: dict[str, Any] = {}
    pos = 0
    while pos < len(words):
        word = words[pos]
        if not word.startswith("--"):
            raise PromptsFileError(f'must start with "--": {word}')
        if pos + 1 >= len(words):
            raise PromptsFileError(f"missing argument for command line option {word}")
        tag = word[2:]
        if tag in ("prompt", "negative_prompt"):
            pos += 1
            text = words[pos]
            pos += 1
            while pos < len(words) and not words[pos].startswith("--"):
                text += " " + words[pos]
                pos += 1
            args[tag] = text
            continue
        kind = PROMPT_TAGS.get(tag)
        if kind is None:
            raise PromptsFileError(f"unknown commandline option: {word}", unknown_tag=tag)
        args[tag] = _value(kind, words[pos + 1], find_checkpoint, tag)
        pos += 2
    return args


def _value(kind: Any, text: str, find_checkpoint: Callable[[str], str | None], tag: str) -> Any:
    """A tag's value as A1111's `process_*_tag` converts it (its ValueError's text where it fails)."""
    if tag == "sampler_name":
        return a1111_sampler_name(text)
    if kind == "checkpoint":
        if (name := find_checkpoint(text)) is None:
            raise PromptsFileError(f"Unknown checkpoint: {text}")
        return name
    try:
        return kind(text)
    except ValueError as err:
        raise PromptsFileError(str(err), (tag, text)) from None


@dataclass(frozen=True)
class Line:
    """One job: the line's `number` in the text (from 1), the line, its tags (`{"prompt": line}` where it has no
    `--` or does not read) and, where it does not read, A1111's error text (and `PromptsFileError.bad_value`,
    `unknown_tag`)."""

    number: int
    text: str
    args: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    bad_value: tuple[str, str] | None = None
    unknown_tag: str | None = None


def read_lines(text: str, find_checkpoint: Callable[[str], str | None] = lambda name: name,
               most: int | None = None) -> list[Line]:
    """The jobs of `text` in order, as A1111's `Script.run` reads them; with `most`, the first `most` (the text
    after them is not read)."""
    lines: list[Line] = []
    for number, raw in enumerate(_split_lines(text), 1):
        line = raw.strip()
        if not line:
            continue
        if most is not None and len(lines) == most:
            break
        if "--" not in line:
            lines.append(Line(number, line, {"prompt": line}))
            continue
        try:
            lines.append(Line(number, line, line_args(line, find_checkpoint)))
        except PromptsFileError as err:
            lines.append(Line(number, line, {"prompt": line}, str(err), err.bad_value, err.unknown_tag))
    return lines


def _split_lines(text: str) -> Iterator[str]:
    """`text.splitlines()` one line at a time: universal newlines (\\n, \\r\\n, \\r) split as it is read, then the
    other line breaks `splitlines` knows within each."""
    for chunk in io.StringIO(text, newline=None):
        yield from chunk.splitlines()


def line_prompts(args: dict[str, Any], prompt: str, negative_prompt: str, position: str = "start") -> dict[str, str]:
    """The prompt and negative prompt a line draws: its own put before (`start`) or after (`end`) the request's
    with a space; the request's where the line has none, the line's alone where either is empty (A1111 joins only
    two non-empty texts)."""
    def joined(own: str | None, base: str) -> str:
        if own is None:
            return base
        if own and base:
            return f"{own} {base}" if position == "start" else f"{base} {own}"
        return own

    return {"prompt": joined(args.get("prompt"), prompt),
            "negative_prompt": joined(args.get("negative_prompt"), negative_prompt)}


def line_seeds(seed: int | None, count: int, iterate: bool, same_seed: bool, batch_size: int = 1,
               n_iter: int = 1) -> tuple[list[int], int]:
    """The request seed of each of `count` lines (before a line's own --seed) and the seed A1111 answers with
    last: a -1 (or None) seed is drawn once with `iterate` or `same_seed`, and `iterate` adds batch_size * n_iter
    (the request's) after each line."""
    seed = -1 if seed is None else seed
    if iterate or same_seed:
        seed = fixed_seed(seed)
    seeds = []
    for _ in range(count):
        seeds.append(seed)
        if iterate:
            seed += batch_size * n_iter
    return seeds, seed
