"""A1111's prompt styles: `styles.csv` files read, and styles applied and found again, as A1111 1.10 does
(modules/styles.py).

A styles file is CSV in UTF-8 (a byte-order mark allowed, as A1111's editor writes one) with a header row naming
its columns, spaces after the commas ignored: `name`, `prompt` (A1111's oldest files: `text`) and, optionally,
`negative_prompt`; other columns are ignored. Quotes keep commas and line breaks inside a value (`""` is a quote).
Rows that are empty or whose name starts with `#` are skipped; a row without some cells has them empty. A name
given twice keeps its first place in the list and the last row's texts, across files too. A file without a `name`
column or without a `prompt` / `text` column, or one that is not CSV in UTF-8, is a `StylesError` naming it
(A1111 logs the error and keeps the styles read before it).

    name,prompt,negative_prompt
    cinematic,"{prompt}, film grain, 35mm",blurry
    ink,"ink drawing, monochrome",

A style applies to a prompt as A1111's `merge_prompts`: a style text holding `{prompt}` has it replaced by the
prompt (the prompt where the style says), any other is appended after ", " (the empty one of the two left out,
each stripped of spaces); styles apply in the order asked, each to the text the ones before it made, the
negative prompt by the styles' negative texts the same way. A name no file has counts as an empty style (A1111's
`no_style`), which only strips the prompt's spaces.

Reading a picture's parameters back, A1111 finds the styles whose texts the prompt and negative prompt still
hold (`StyleDatabase.extract`, A1111's `extract_styles_from_prompt`) and takes them out (`infotext_styles`, its
`parse_generation_parameters` under the option "Infer styles from prompts of pasted infotext").
"""

from __future__ import annotations

import csv
import io
import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdlab.pipeline.infotext import a1111_version
from sdlab.pipeline.png_info import NEGATIVE_PROMPT, PROMPT

logger = logging.getLogger(__name__)

STYLES_FILE = "styles.csv"                  # A1111's file name, in its webui folder
STYLES_ARRAY = "Styles array"               # the parsed parameters' key of the styles found (A1111's)
INFOTEXT_STYLES = ("Ignore", "Apply", "Discard", "Apply if any")
"""A1111's option `infotext_styles` ("Infer styles from prompts of pasted infotext"): Ignore leaves the prompts as
written; Discard takes the styles' texts out of them; Apply also names the styles (`Styles array`, an empty list
where none matched); Apply if any (A1111's default) names them where some matched."""
HIRES_STYLES_SINCE = a1111_version("1.8.0-139")  # A1111's `v180_hr_styles`: older texts' hires prompts kept as written


class StylesError(ValueError):
    """A styles file that cannot be read; the message names it and says why."""


@dataclass(frozen=True)
class PromptStyle:
    name: str
    prompt: str
    negative_prompt: str
    path: str = ""                  # the file it was read from

    def listed(self) -> dict[str, str]:
        """A1111's `GET /sdapi/v1/prompt-styles` item."""
        return {"name": self.name, "prompt": self.prompt, "negative_prompt": self.negative_prompt}


NO_STYLE = PromptStyle("None", "", "")      # what an unknown name applies (A1111's `no_style`)


def merge_prompts(style_prompt: str, prompt: str) -> str:
    """A1111's `merge_prompts`: the style's text with `{prompt}` replaced by the prompt, or both joined by ", "."""
    if "{prompt}" in style_prompt:
        return style_prompt.replace("{prompt}", prompt)
    return ", ".join(filter(None, (prompt.strip(), style_prompt.strip())))


def apply_styles_to_prompt(prompt: str, style_prompts: Iterable[str]) -> str:
    """A1111's `apply_styles_to_prompt`: each style text merged in turn into what the ones before made."""
    for style_prompt in style_prompts:
        prompt = merge_prompts(style_prompt, prompt)
    return prompt


def extract_style_text(style_text: str, prompt: str) -> tuple[bool, str]:
    """A1111's `extract_style_text_from_prompt`: (True, the prompt without the style's text) where the stripped
    prompt is the stripped style text around (`{prompt}`) or after (", " before it dropped) something, else (False,
    the prompt). A style text with more than one `{prompt}` matches nothing (A1111 fails on it)."""
    stripped_prompt, stripped_style = prompt.strip(), style_text.strip()
    if "{prompt}" in stripped_style:
        parts = stripped_style.split("{prompt}")
        if len(parts) != 2:
            return False, prompt
        left, right = parts
        if stripped_prompt.startswith(left) and stripped_prompt.endswith(right):
            return True, stripped_prompt[len(left):len(stripped_prompt) - len(right)]
    elif stripped_prompt.endswith(stripped_style):
        rest = stripped_prompt[:len(stripped_prompt) - len(stripped_style)]
        return True, rest[:-2] if rest.endswith(", ") else rest
    return False, prompt


def extract_original_prompts(style: PromptStyle, prompt: str, negative_prompt: str) -> tuple[bool, str, str]:
    """A1111's `extract_original_prompts`: whether both texts hold the style's (a style with neither text never
    matches), and the texts without them."""
    if not style.prompt and not style.negative_prompt:
        return False, prompt, negative_prompt
    matched, positive = extract_style_text(style.prompt, prompt)
    if not matched:
        return False, prompt, negative_prompt
    matched, negative = extract_style_text(style.negative_prompt, negative_prompt)
    if not matched:
        return False, prompt, negative_prompt
    return True, positive, negative


def styles_files(patterns: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """The files `patterns` name, as A1111's `--styles-file` (repeatable): a file name with `*` or `?` is a
    pattern in its folder (the matches sorted; none: nothing), any other a file that must exist; each file once."""
    found: list[Path] = []
    for pattern in patterns:
        folder, name = os.path.split(os.fspath(pattern))
        if "*" in name or "?" in name:
            found += sorted(Path(folder or ".").glob(name))
        elif Path(pattern).is_dir():
            raise StylesError(f"the styles file {os.fspath(pattern)!r} is a folder; name the file (A1111's "
                              f"{os.path.join(os.fspath(pattern), 'styles.csv')!r})")
        elif not Path(pattern).is_file():
            raise StylesError(f"the styles file {os.fspath(pattern)!r} does not exist")
        else:
            found.append(Path(pattern))
    return list(dict.fromkeys(found))


def read_styles_file(path: str | os.PathLike[str]) -> list[PromptStyle]:
    """The styles of one file, in its order (A1111's `load_from_csv`); a `StylesError` for a file that cannot be
    read as one. The file is read whole, then parsed: its header and rows are of one version of it, whatever
    writes it meanwhile."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as file:
            text = file.read()
        reader = csv.DictReader(io.StringIO(text, newline=""), skipinitialspace=True)
        columns = reader.fieldnames or []
        if columns and "name" not in columns:
            raise StylesError(f"{os.fspath(path)}: no 'name' column (its header: {', '.join(columns)}); a "
                              "styles file starts with the header name,prompt,negative_prompt")
        if columns and "prompt" not in columns and "text" not in columns:
            raise StylesError(f"{os.fspath(path)}: no 'prompt' column (its header: {', '.join(columns)}); a "
                              "styles file starts with the header name,prompt,negative_prompt")
        return [_style(row, path) for row in reader if row and not (row["name"] or "").startswith("#")]
    except UnicodeDecodeError as err:
        raise StylesError(f"{os.fspath(path)}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except csv.Error as err:
        raise StylesError(f"{os.fspath(path)}: not a CSV file ({err})") from None
    except OSError as err:
        raise StylesError(f"cannot read the styles file {os.fspath(path)!r}: {err.strerror or err}") from None


def _style(row: Mapping[str | None, Any], path: str | os.PathLike[str]) -> PromptStyle:
    """A CSV row as a style: A1111's old `text` column as the prompt, missing cells empty."""
    prompt = row["prompt"] if "prompt" in row else row["text"]
    return PromptStyle(row["name"] or "", prompt or "", row.get("negative_prompt") or "", os.fspath(path))


class StyleDatabase:
    """The styles of some files by name (A1111's `StyleDatabase`), in the order the files list them."""

    def __init__(self, styles: Iterable[PromptStyle] = ()) -> None:
        self.styles: dict[str, PromptStyle] = {}
        for style in styles:
            self.styles[style.name] = style

    @classmethod
    def load(cls, patterns: Iterable[str | os.PathLike[str]]) -> StyleDatabase:
        """The styles of the files `patterns` name (`styles_files`), read in turn."""
        return cls(style for path in styles_files(patterns) for style in read_styles_file(path))

    def __bool__(self) -> bool:
        return bool(self.styles)

    def listed(self) -> list[dict[str, str]]:
        return [style.listed() for style in self.styles.values()]

    def unknown(self, names: Iterable[str]) -> list[str]:
        """The names of `names` no file has."""
        return [name for name in names if name not in self.styles]

    def apply(self, prompt: str, names: Iterable[str]) -> str:
        """A1111's `StyleDatabase.apply_styles_to_prompt`."""
        return apply_styles_to_prompt(prompt, [self.styles.get(name, NO_STYLE).prompt for name in names])

    def apply_negative(self, negative_prompt: str, names: Iterable[str]) -> str:
        """A1111's `StyleDatabase.apply_negative_styles_to_prompt`."""
        return apply_styles_to_prompt(negative_prompt,
                                      [self.styles.get(name, NO_STYLE).negative_prompt for name in names])

    def extract(self, prompt: str, negative_prompt: str) -> tuple[list[str], str, str]:
        """A1111's `extract_styles_from_prompt`: the styles the texts end with (or are wrapped in), found from the
        outermost in, in the order they were applied, and the texts without them."""
        found: list[str] = []
        candidates = list(self.styles.values())
        while True:
            for style in candidates:
                matched, new_prompt, new_negative = extract_original_prompts(style, prompt, negative_prompt)
                if matched:
                    prompt, negative_prompt = new_prompt, new_negative
                    candidates.remove(style)
                    found.append(style.name)
                    break
            else:
                return found[::-1], prompt, negative_prompt


SAVE_NS = 10**9
"""How long after it was written a styles file that gave no styles may still be being saved (A1111 truncates it,
then writes it)."""
FileState = tuple[str, "tuple[int, int] | None"]
"""A watched styles file's path and its modification time (ns) and size, None while it does not exist."""


def is_pattern(pattern: str | os.PathLike[str]) -> bool:
    """Whether a `--styles-file` value is a pattern (`*` or `?` in its file name), not one file."""
    name = os.path.basename(os.fspath(pattern))
    return "*" in name or "?" in name


def file_state(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_mtime_ns, info.st_size


class WatchedStyles:
    """The styles of the files `patterns` name (`StyleDatabase.load`), read again whenever those files change
    while a server runs: a file's modification time or size, the files a pattern matches, a file removed (its
    styles dropped, as A1111's reload drops them) or made again. Without patterns, the first of `candidates` that
    exists is the file (`sdlab serve --models-dir`'s styles.csv, read once it is made). A styles file edited
    while the server runs is in use from the next request on, without a restart (A1111 has a refresh button for
    it). The first read's error is raised; a later one (a file half-written, not CSV) is logged once for that
    state of the files and the styles read before it stay in use, as A1111's reload keeps the styles read before
    an unreadable file. A read that caught a file being written (its state changed while it was read, or no
    styles from a file that had some, written less than a second ago) keeps the styles before it and is made
    again at the next look."""

    def __init__(self, patterns: Iterable[str | os.PathLike[str]],
                 candidates: Iterable[str | os.PathLike[str]] = ()) -> None:
        self.patterns, self.candidates = tuple(patterns), tuple(candidates)
        self._lock = threading.Lock()
        self._styles = StyleDatabase.load(self.patterns)
        self._state = self._files_state()
        if not self.patterns and self._state:
            self._styles = self._read(self._state)

    def _files_state(self) -> tuple[FileState, ...]:
        """Each file read now with its `file_state`: the files the patterns match and the plain files they name
        (existing or not); without patterns, the first candidate that exists."""
        if not self.patterns:
            return tuple((os.fspath(Path(path)), state) for path in self.candidates
                         if (state := file_state(path)) is not None)[:1]
        files = [os.fspath(path) for pattern in self.patterns       # as `styles_files` spells them
                 for path in (styles_files([pattern]) if is_pattern(pattern) else [Path(pattern)])]
        return tuple((path, file_state(path)) for path in dict.fromkeys(files))

    @staticmethod
    def _read(state: tuple[FileState, ...]) -> StyleDatabase:
        return StyleDatabase(style for path, info in state if info is not None for style in read_styles_file(path))

    def _caught_writing(self, state: tuple[FileState, ...], styles: StyleDatabase) -> bool:
        """Whether the read of `state` may have caught a file being written: a file's state moved during the read,
        or a file written less than `SAVE_NS` ago gave no styles where the styles before held some of it (a save
        that truncates it, then writes; once it is that old, an emptied file is taken)."""
        if self._files_state() != state:
            return True
        now = time.time_ns()
        return any(info is not None and now - info[0] < SAVE_NS and not any(s.path == path for s in styles.styles.values())
                   and any(s.path == path for s in self._styles.styles.values()) for path, info in state)

    def current(self) -> StyleDatabase:
        """The styles as the files now are: read again where they changed since the last read."""
        if not self.patterns and not self.candidates:
            return self._styles
        with self._lock:
            state = self._files_state()
            if state == self._state:
                return self._styles
            try:
                styles = self._read(state)
            except StylesError as err:      # logged once: the same state is not read again
                logger.error("the styles files changed but cannot be read, the styles read before stay: %s", err)
                self._state = state
                return self._styles
            if self._caught_writing(state, styles):
                return self._styles
            for path, info in state:
                if info is None and any(s.path == path for s in self._styles.styles.values()):
                    logger.warning("the styles file %r is gone: its styles are dropped", path)
            self._styles, self._state = styles, state
            logger.info("styles read again: %d styles", len(styles.styles))
            return self._styles


HIRES_PROMPT, HIRES_NEGATIVE_PROMPT = "Hires prompt", "Hires negative prompt"


def infotext_styles(parameters: Mapping[str, Any], styles: StyleDatabase,
                    mode: str = "Apply if any") -> dict[str, Any]:
    """Parsed parameters (`png_info.parse_parameters`) with the styles' texts taken out of the prompts and the
    styles named (`STYLES_ARRAY`) as A1111 1.10's `parse_generation_parameters` under the option `mode`
    (`INFOTEXT_STYLES`): the hires prompts too (a text of A1111 1.8.0-139 or later, or of no A1111 version) when
    the same styles are found there, each then empty where it is the prompt's; other styles there leave every
    prompt as written."""
    res = dict(parameters)
    if mode == "Ignore":
        return res
    prompt, negative = str(res.get(PROMPT, "")), str(res.get(NEGATIVE_PROMPT, ""))
    found, bare_prompt, bare_negative = styles.extract(prompt, negative)
    same_hires_styles = True
    version = a1111_version(res.get("Version"))
    if (HIRES_PROMPT in res or HIRES_NEGATIVE_PROMPT in res) and (version > HIRES_STYLES_SINCE if version else True):
        hr_found, hr_prompt, hr_negative = styles.extract(str(res.get(HIRES_PROMPT, prompt)),
                                                          str(res.get(HIRES_NEGATIVE_PROMPT, negative)))
        same_hires_styles = found == hr_found
        if same_hires_styles:
            res[HIRES_PROMPT] = "" if hr_prompt == bare_prompt else hr_prompt
            res[HIRES_NEGATIVE_PROMPT] = "" if hr_negative == bare_negative else hr_negative
    if same_hires_styles:
        prompt, negative = bare_prompt, bare_negative
        if (mode == "Apply if any" and found) or mode == "Apply":
            res[STYLES_ARRAY] = found
    res[PROMPT], res[NEGATIVE_PROMPT] = prompt, negative
    return res


PROMPT_FIELDS = {"prompt": False, "negative_prompt": True, "hr_prompt": False, "hr_negative_prompt": True}
"""The GenerationRequest texts styles apply to, each with whether it is a negative one. An empty hires prompt is
the (styled) prompt, as A1111's `hr_prompt` '' is."""


def styled_options(options: Mapping[str, Any], styles: StyleDatabase, names: Sequence[str] = ()) -> dict[str, Any]:
    """GenerationRequest keyword arguments with the styles `names`, then those of their `styles` key (a Styles
    axis's, taken out), applied to the prompts (`PROMPT_FIELDS`) as A1111's `setup_prompts`."""
    out = dict(options)
    names = [*names, *out.pop("styles", ())]
    if not names:
        return out
    for key, negative in PROMPT_FIELDS.items():
        text = out.get(key)
        if key == "prompt" or key == "negative_prompt" or text:
            apply = styles.apply_negative if negative else styles.apply
            out[key] = apply(text or "", names)
    return out
