"""A1111's prompt styles (`sdlab.pipeline.styles`): styles.csv read, styles applied and found again exactly as
A1111 1.10's modules/styles.py (transcribed below as the reference), and `sdlab txt2img --style` / `--from-png` /
`sdlab grid`'s Styles axis drawing the picture of the styled prompt."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
import typing
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdlab.pipeline.styles import (
    StyleDatabase, StylesError, WatchedStyles, infotext_styles, read_styles_file, styled_options, styles_files,
)

SRC = Path(__file__).resolve().parents[1] / "src"


# --- reference: AUTOMATIC1111/stable-diffusion-webui v1.10 modules/styles.py (PromptStyle, merge_prompts,
# apply_styles_to_prompt, extract_style_text_from_prompt, extract_original_prompts, StyleDatabase.load_from_csv /
# apply_styles_to_prompt / apply_negative_styles_to_prompt / extract_styles_from_prompt), transcribed
class RefStyle(typing.NamedTuple):
    name: str
    prompt: str | None
    negative_prompt: str | None
    path: str | None = None


def ref_merge_prompts(style_prompt: str, prompt: str) -> str:
    if "{prompt}" in style_prompt:
        res = style_prompt.replace("{prompt}", prompt)
    else:
        parts = filter(None, (prompt.strip(), style_prompt.strip()))
        res = ", ".join(parts)
    return res


def ref_apply_styles_to_prompt(prompt, styles):
    for style in styles:
        prompt = ref_merge_prompts(style, prompt)
    return prompt


def ref_extract_style_text_from_prompt(style_text, prompt):
    stripped_prompt = prompt.strip()
    stripped_style_text = style_text.strip()
    if "{prompt}" in stripped_style_text:
        left, right = stripped_style_text.split("{prompt}", 2)
        if stripped_prompt.startswith(left) and stripped_prompt.endswith(right):
            prompt = stripped_prompt[len(left):len(stripped_prompt) - len(right)]
            return True, prompt
    else:
        if stripped_prompt.endswith(stripped_style_text):
            prompt = stripped_prompt[:len(stripped_prompt) - len(stripped_style_text)]
            if prompt.endswith(', '):
                prompt = prompt[:-2]
            return True, prompt
    return False, prompt


def ref_extract_original_prompts(style, prompt, negative_prompt):
    if not style.prompt and not style.negative_prompt:
        return False, prompt, negative_prompt
    match_positive, extracted_positive = ref_extract_style_text_from_prompt(style.prompt, prompt)
    if not match_positive:
        return False, prompt, negative_prompt
    match_negative, extracted_negative = ref_extract_style_text_from_prompt(style.negative_prompt, negative_prompt)
    if not match_negative:
        return False, prompt, negative_prompt
    return True, extracted_positive, extracted_negative


class RefStyleDatabase:
    def __init__(self, paths):
        self.no_style = RefStyle("None", "", "", None)
        self.styles = {}
        for path in paths:
            self.load_from_csv(path)

    def load_from_csv(self, path):
        with open(path, "r", encoding="utf-8-sig", newline="") as file:
            reader = csv.DictReader(file, skipinitialspace=True)
            for row in reader:
                if not row or row["name"].startswith("#"):
                    continue
                prompt = row["prompt"] if "prompt" in row else row["text"]
                negative_prompt = row.get("negative_prompt", "")
                self.styles[row["name"]] = RefStyle(row["name"], prompt, negative_prompt, str(path))

    def apply_styles_to_prompt(self, prompt, styles):
        return ref_apply_styles_to_prompt(prompt, [self.styles.get(x, self.no_style).prompt for x in styles])

    def apply_negative_styles_to_prompt(self, prompt, styles):
        return ref_apply_styles_to_prompt(prompt, [self.styles.get(x, self.no_style).negative_prompt for x in styles])

    def extract_styles_from_prompt(self, prompt, negative_prompt):
        extracted = []
        applicable_styles = list(self.styles.values())
        while True:
            found_style = None
            for style in applicable_styles:
                is_match, new_prompt, new_neg_prompt = ref_extract_original_prompts(style, prompt, negative_prompt)
                if is_match:
                    found_style = style
                    prompt = new_prompt
                    negative_prompt = new_neg_prompt
                    break
            if not found_style:
                break
            applicable_styles.remove(found_style)
            extracted.append(found_style.name)
        return list(reversed(extracted)), prompt, negative_prompt


# --- end of the reference

STYLES_CSV = (
    '\ufeffname, prompt, negative_prompt, notes\n'
    'cinematic,"{prompt}, film grain, 35mm","blurry, {prompt}",x\n'
    '\n'
    '# a comment,ignored,\n'
    'ink,"ink drawing, ""monochrome""",\n'
    'quoted,"two\nlines",ugly\n'
    'wrap,"masterpiece, {prompt}, best",\n'
    'plain,  spaced  ,\n'
)
MORE_CSV = 'name,prompt,negative_prompt\nink,"ink wash",grey\nextra,"extra detail",lowres\n'
PROMPTS = ["a cat", "  a cat  ", "", "a (red:1.2) apple, [night]", "{prompt}"]
NEGATIVES = ["", "ugly", "  lowres "]
NAMES = [[], ["cinematic"], ["ink"], ["wrap", "cinematic"], ["cinematic", "ink", "plain"], ["nope"],
         ["extra", "nope", "wrap"], ["ink", "ink"], ["quoted", "plain", "extra"]]


@pytest.fixture
def files(tmp_path) -> list[Path]:
    first, second = tmp_path / "styles.csv", tmp_path / "styles-more.csv"
    first.write_text(STYLES_CSV, encoding="utf-8")
    second.write_text(MORE_CSV, encoding="utf-8")
    return [first, second]


def test_files_read_as_a1111_reads_them(files) -> None:
    ours, ref = StyleDatabase.load(files), RefStyleDatabase(files)
    assert [(s.name, s.prompt, s.negative_prompt) for s in ours.styles.values()] == \
        [(s.name, s.prompt, s.negative_prompt) for s in ref.styles.values()]
    assert ours.styles["ink"].prompt == "ink wash"                # the later file's row, the first place kept
    assert list(ours.styles)[:3] == ["cinematic", "ink", "quoted"]
    assert ours.styles["quoted"].prompt == "two\nlines"


@pytest.mark.parametrize("names", NAMES)
def test_styles_apply_as_a1111(files, names) -> None:
    ours, ref = StyleDatabase.load(files), RefStyleDatabase(files)
    for prompt in PROMPTS:
        for negative in NEGATIVES:
            assert ours.apply(prompt, names) == ref.apply_styles_to_prompt(prompt, names)
            assert ours.apply_negative(negative, names) == ref.apply_negative_styles_to_prompt(negative, names)


def test_cinematic_puts_the_prompt_where_it_says(files) -> None:
    styles = StyleDatabase.load(files)
    assert styles.apply("a cat", ["cinematic", "ink"]) == "a cat, film grain, 35mm, ink wash"
    assert styles.apply_negative("ugly", ["cinematic", "ink"]) == "blurry, ugly, grey"
    assert styles.apply("  a cat ", ["nope"]) == "a cat"          # an unknown name: A1111's empty no_style


@pytest.mark.parametrize("names", NAMES)
def test_styles_are_found_again_as_a1111_finds_them(files, names) -> None:
    ours, ref = StyleDatabase.load(files), RefStyleDatabase(files)
    for prompt in PROMPTS[:4]:
        for negative in NEGATIVES:
            styled, styled_negative = ours.apply(prompt, names), ours.apply_negative(negative, names)
            assert ours.extract(styled, styled_negative) == ref.extract_styles_from_prompt(styled, styled_negative)
            assert ours.extract(prompt, negative) == ref.extract_styles_from_prompt(prompt, negative)


def test_extract_round_trips(files) -> None:
    styles = StyleDatabase.load(files)
    names = ["wrap", "cinematic", "extra"]
    found = styles.extract(styles.apply("a cat", names), styles.apply_negative("ugly", names))
    assert found == (names, "a cat", "ugly")


def test_a_style_with_two_placeholders_matches_nothing(tmp_path) -> None:
    path = tmp_path / "s.csv"
    path.write_text('name,prompt\ntwice,"{prompt} and {prompt}"\n', encoding="utf-8")
    styles = StyleDatabase.load([path])
    assert styles.apply("a", ["twice"]) == "a and a"
    assert styles.extract("a and a", "") == ([], "a and a", "")     # A1111's split fails on it


# A1111 1.10 modules/infotext_utils.py `parse_generation_parameters`, its styles block, transcribed (Version None)
def ref_infotext_styles(res, prompt, negative_prompt, db, option):
    if option != "Ignore":
        found_styles, prompt_no_styles, negative_prompt_no_styles = db.extract_styles_from_prompt(prompt,
                                                                                                  negative_prompt)
        same_hr_styles = True
        if "Hires prompt" in res or "Hires negative prompt" in res:
            hr_prompt, hr_negative_prompt = res.get("Hires prompt", prompt), res.get("Hires negative prompt",
                                                                                     negative_prompt)
            hr_found_styles, hr_prompt_no_styles, hr_negative_prompt_no_styles = db.extract_styles_from_prompt(
                hr_prompt, hr_negative_prompt)
            if same_hr_styles := found_styles == hr_found_styles:
                res["Hires prompt"] = '' if hr_prompt_no_styles == prompt_no_styles else hr_prompt_no_styles
                res['Hires negative prompt'] = '' if hr_negative_prompt_no_styles == negative_prompt_no_styles \
                    else hr_negative_prompt_no_styles
        if same_hr_styles:
            prompt, negative_prompt = prompt_no_styles, negative_prompt_no_styles
            if (option == "Apply if any" and found_styles) or option == "Apply":
                res['Styles array'] = found_styles
    res["Prompt"] = prompt
    res["Negative prompt"] = negative_prompt
    return res


@pytest.mark.parametrize("option", ["Ignore", "Apply", "Discard", "Apply if any"])
@pytest.mark.parametrize("hires", [None, "same", "other", "own"])
def test_infotext_styles_as_a1111(files, option, hires) -> None:
    ours, ref = StyleDatabase.load(files), RefStyleDatabase(files)
    for names in NAMES:
        prompt, negative = ours.apply("a cat", names), ours.apply_negative("ugly", names)
        res = {"Steps": "2"}
        if hires == "same":
            res["Hires prompt"] = ours.apply("a dog", names)
        elif hires == "other":
            res["Hires prompt"] = ours.apply("a dog", ["extra"])
        elif hires == "own":
            res["Hires negative prompt"] = ours.apply_negative("bad", names)
        expected = ref_infotext_styles(dict(res), prompt, negative, ref, option)
        assert infotext_styles({"Prompt": prompt, "Negative prompt": negative, **res}, ours, option) == \
            {"Prompt": prompt, "Negative prompt": negative, **expected}


def test_old_a1111_texts_keep_their_hires_prompts(files) -> None:
    """Texts of A1111 before 1.8.0-139 (`v180_hr_styles`) styled no hires prompt: they are left as written."""
    styles = StyleDatabase.load(files)
    params = {"Prompt": styles.apply("a cat", ["ink"]), "Negative prompt": styles.apply_negative("", ["ink"]),
              "Hires prompt": styles.apply("a dog", ["ink"]), "Version": "v1.7.0"}
    read = infotext_styles(params, styles)
    assert (read["Prompt"], read["Hires prompt"], read["Styles array"]) == ("a cat", params["Hires prompt"], ["ink"])
    assert infotext_styles({**params, "Version": "v1.9.4"}, styles)["Hires prompt"] == "a dog"


def test_styled_options_take_the_axis_names_after_the_given(files) -> None:
    styles = StyleDatabase.load(files)
    options = {"prompt": "a cat", "negative_prompt": "", "hr_prompt": "", "hr_negative_prompt": "bad",
               "styles": ("cinematic",), "steps": 3}
    out = styled_options(options, styles, ["ink"])
    assert out == {"prompt": styles.apply("a cat", ["ink", "cinematic"]),
                   "negative_prompt": styles.apply_negative("", ["ink", "cinematic"]), "hr_prompt": "",
                   "hr_negative_prompt": styles.apply_negative("bad", ["ink", "cinematic"]), "steps": 3}


@pytest.mark.parametrize("text, error", [
    ("prompt,negative_prompt\nx,y\n", "no 'name' column"),
    ("name,negative_prompt\nx,y\n", "no 'prompt' column"),
    ("name,prompt\n\"x,y\n", "not a CSV file"),
])
def test_a_malformed_file_is_an_error_naming_it(tmp_path, text, error) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text, encoding="utf-8")
    if "CSV" in error:
        with pytest.raises(StylesError, match=f"bad.csv: {error}"):
            read_styles_file_strict(path)
    else:
        with pytest.raises(StylesError, match=f"bad.csv: {error}"):
            read_styles_file(path)


def read_styles_file_strict(path: Path):
    import csv as _csv
    old = _csv.field_size_limit()
    _csv.field_size_limit(4)            # an unterminated quote runs to the end of the file: past the limit
    try:
        return read_styles_file(path)
    finally:
        _csv.field_size_limit(old)


def test_not_utf8_and_missing_files_are_errors(tmp_path) -> None:
    path = tmp_path / "latin.csv"
    path.write_bytes("name,prompt\ncafé,x\n".encode("latin-1"))
    with pytest.raises(StylesError, match="not UTF-8"):
        read_styles_file(path)
    with pytest.raises(StylesError, match="does not exist"):
        styles_files([tmp_path / "none.csv"])


def test_a_folder_given_as_the_styles_file_is_named_as_one(tmp_path) -> None:
    """`--styles-file ~/webui` (the folder A1111's styles.csv is in): 'is a folder; name the file', not 'does not
    exist' (before)."""
    with pytest.raises(StylesError, match=r"is a folder; name the file \(A1111's '.*styles\.csv'\)"):
        styles_files([tmp_path])


def _edit(path: Path, text: str, tick: int = 1) -> None:
    """Write `text` to `path`, its modification time moved on by `tick` seconds (a coarse file system's clock)."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text, encoding="utf-8")
    os.utime(path, ns=(before + tick * 10**9, before + tick * 10**9))


def test_watched_styles_are_read_again_when_a_file_changes(tmp_path, caplog) -> None:
    """A styles file edited (its size or modification time), or a new file a pattern matches, is read again at the
    next look; an edit that cannot be read keeps the styles read before it, logged."""
    path = tmp_path / "styles.csv"
    _edit(path, "name,prompt\nink,ink drawing\n")
    watched = WatchedStyles([tmp_path / "*.csv"])
    assert watched.current().listed() == [{"name": "ink", "prompt": "ink drawing", "negative_prompt": ""}]
    first = watched.current()
    assert watched.current() is first                                   # unchanged: not read again
    _edit(path, "name,prompt\nink,ink drawing bold\nneon,neon lights\n")
    assert [s["name"] for s in watched.current().listed()] == ["ink", "neon"]
    _edit(path, "name,prompt\nink,INK drawing bold\nneon,neon lights\n")    # the same size, a later time
    assert watched.current().styles["ink"].prompt == "INK drawing bold"
    _edit(tmp_path / "more.csv", "name,prompt\nchalk,chalk\n")         # a new file the pattern matches
    assert set(watched.current().styles) == {"ink", "neon", "chalk"}
    before = watched.current()
    _edit(path, "title,prompt\nx,y\n")                                 # half-edited: no name column
    assert watched.current() is before and "no 'name' column" in caplog.text
    _edit(path, "name,prompt\nink,ink again\n")                        # fixed: read again
    assert watched.current().styles["ink"].prompt == "ink again"
    with pytest.raises(StylesError, match="does not exist"):            # at start: the error itself
        WatchedStyles([tmp_path / "none.csv"])


def test_patterns_name_the_files_in_their_folder(files, tmp_path) -> None:
    assert styles_files([tmp_path / "styles*.csv"]) == sorted(files)
    assert styles_files([tmp_path / "nothing*.csv"]) == []
    assert styles_files([files[0], tmp_path / "*.csv"]) == [files[0], files[1]]


def test_the_old_name_text_format_reads(tmp_path) -> None:
    path = tmp_path / "old.csv"
    path.write_text("name,text\nold,an old style\n", encoding="utf-8")
    assert StyleDatabase.load([path]).apply("a", ["old"]) == "a, an old style"


# --- the command line: the tiny shipped model, 2 steps

def sdlab(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "sdlab", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def parameters(path: Path) -> str:
    return Image.open(path).info["parameters"]


def test_cli_style_draws_the_styled_prompt_and_from_png_reads_it(files, tmp_path) -> None:
    draw = ["--steps", "2", "--seed", "5", "--sampler", "Euler"]
    styled = sdlab(tmp_path, "txt2img", "a cat", "--negative", "ugly", "--style", "cinematic", "--style", "ink",
                   "--styles-file", str(tmp_path / "styles*.csv"), *draw, "--out", "styled.png")
    assert styled.returncode == 0, styled.stderr
    styles = StyleDatabase.load([tmp_path / "styles*.csv"])       # styles-more.csv, then styles.csv
    prompt, negative = styles.apply("a cat", ["cinematic", "ink"]), styles.apply_negative("ugly", ["cinematic", "ink"])
    plain = sdlab(tmp_path, "txt2img", prompt, "--negative", negative, *draw, "--out", "plain.png")
    assert plain.returncode == 0, plain.stderr
    assert np.array_equal(pixels(tmp_path / "styled.png"), pixels(tmp_path / "plain.png"))
    assert parameters(tmp_path / "styled.png").startswith(f"{prompt}\nNegative prompt: {negative}\n")
    # ./styles.csv without --styles-file; --from-png finds the styles and draws them again
    again = sdlab(tmp_path, "txt2img", "--from-png", "styled.png", "--out", "again.png")
    assert again.returncode == 0, again.stderr
    assert np.array_equal(pixels(tmp_path / "again.png"), pixels(tmp_path / "styled.png"))
    # another --style replaces the picture's: its prompt without the old styles, the new one applied
    other = sdlab(tmp_path, "txt2img", "--from-png", "styled.png", "--style", "plain", "--out", "other.png")
    assert other.returncode == 0, other.stderr
    assert parameters(tmp_path / "other.png").startswith(
        f"{styles.apply('a cat', ['plain'])}\nNegative prompt: {styles.apply_negative('ugly', ['plain'])}\n")


def test_cli_style_errors_are_one_line(files, tmp_path) -> None:
    unknown = sdlab(tmp_path, "txt2img", "a cat", "--style", "nope", "--out", "x.png")
    assert unknown.returncode != 0 and not (tmp_path / "x.png").exists()
    assert "--style 'nope': no such style in styles.csv; styles: 'cinematic'" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    (tmp_path / "bad.csv").write_text("title,prompt\nx,y\n", encoding="utf-8")
    bad = sdlab(tmp_path, "txt2img", "a cat", "--styles-file", "bad.csv", "--out", "x.png")
    assert bad.returncode != 0 and "--styles-file: bad.csv: no 'name' column" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_cli_prompts_file_styles_tag_names_one_character_styles(files, tmp_path) -> None:
    """A line's `--styles ink` is A1111's `setattr(copy_p, "styles", "ink")`: `apply_styles_to_prompt` iterates the
    text, so the line draws with the style `k` (and no `i` / `n`), not with --style's."""
    (tmp_path / "one.csv").write_text("name,prompt,negative_prompt\nk,kite,grey\n", encoding="utf-8")
    (tmp_path / "lines.txt").write_text("a cat\n--prompt a dog --styles ink\n", encoding="utf-8")
    run = sdlab(tmp_path, "txt2img", "--prompts-file", "lines.txt", "--style", "ink", "--styles-file", "styles.csv",
                "--styles-file", "one.csv", "--steps", "1", "--seed", "2", "--out", "out/")
    assert run.returncode == 0, run.stderr
    styles = StyleDatabase.load([tmp_path / "styles.csv", tmp_path / "one.csv"])
    drawn = [parameters(tmp_path / path).split("\nSteps: ")[0] for path in run.stdout.split()]
    assert drawn == [styles.apply("a cat", ["ink"]),
                     f"{styles.apply('a dog', 'ink')}\nNegative prompt: {styles.apply_negative('', 'ink')}"]
    assert drawn[1] == "a dog, kite\nNegative prompt: grey"


def test_grid_styles_axis_adds_to_the_given_styles(files, tmp_path) -> None:
    run = sdlab(tmp_path, "grid", "a cat", "--style", "ink", "--x", "Styles=cinematic,\"plain,extra\"",
                "--styles-file", "styles.csv", "--styles-file", "styles-more.csv",
                "--steps", "1", "--seed", "2", "--out", "grid.png", "--keep-cells", "cells")
    assert run.returncode == 0, run.stderr
    styles = StyleDatabase.load(files)
    first_lines = [parameters(path).splitlines()[0] for path in sorted((tmp_path / "cells").iterdir())]
    assert first_lines == [styles.apply("a cat", ["ink", "cinematic"]), styles.apply("a cat", ["ink", "plain", "extra"])]
    assert "X Type: Styles" in parameters(tmp_path / "grid.png")


def test_grid_styles_axis_of_an_unknown_style_is_an_error(files, tmp_path) -> None:
    run = sdlab(tmp_path, "grid", "a cat", "--x", "Styles=cinematic,nope", "--out", "grid.png")
    assert run.returncode != 0 and not (tmp_path / "grid.png").exists()
    assert "a Styles axis's) name 'nope', which no --styles-file has" in run.stderr and "Traceback" not in run.stderr


def _recording_run(requests: list):
    """A `run` that records each request and draws a grey 8 px picture (the prompts are what is tested)."""
    from sdlab.pipeline.request import GenerationResult

    def run(request):
        requests.append(request)
        return GenerationResult([Image.new("RGB", (8, 8), "grey")], [request.seed or 0], request)
    return run


def test_draw_plot_draws_a_styles_axis_with_the_styles_given(files) -> None:
    """The library's `draw_plot` with a Styles axis draws each cell's styled prompts, the options' `styles` first
    (as `sdlab grid --style`); without `styles=` or with a name it lacks, a GridError that says so (before: a
    TypeError, `styles` not being a request field)."""
    from sdlab.pipeline.grid import GridError, Plot, draw_plot, parse_axis

    styles = StyleDatabase.load(files)
    requests: list = []
    plot = Plot(parse_axis('Styles=cinematic,"plain,extra"'))
    draw_plot(_recording_run(requests), {"prompt": "a cat", "negative_prompt": "ugly", "styles": ("ink",), "seed": 1},
              plot, styles=styles)
    assert [(r.prompt, r.negative_prompt) for r in requests] == [
        (styles.apply("a cat", names), styles.apply_negative("ugly", names))
        for names in (["ink", "cinematic"], ["ink", "plain", "extra"])]
    with pytest.raises(GridError, match=r"name the prompt styles 'cinematic', 'plain', 'extra': give the styles"):
        draw_plot(_recording_run([]), {"prompt": "a cat"}, plot)
    with pytest.raises(GridError, match=r"name 'nope', which `styles` lacks; styles: 'cinematic'"):
        draw_plot(_recording_run([]), {"prompt": "a cat"}, Plot(parse_axis("Styles=nope")), styles=styles)
    plain: list = []
    draw_plot(_recording_run(plain), {"prompt": "a cat", "seed": 1}, Plot(parse_axis("steps=1,2")))
    assert [r.prompt for r in plain] == ["a cat", "a cat"]          # no styles: the prompts as given


def test_draw_plot_names_the_options_styles_as_the_cells_not_a_styles_axis() -> None:
    """The options' own styles with no `styles=`: the GridError names the cells' styles, not a Styles axis the
    plot does not have."""
    from sdlab.pipeline.grid import GridError, Plot, draw_plot, parse_axis

    with pytest.raises(GridError) as raised:
        draw_plot(_recording_run([]), {"prompt": "a cat", "styles": ["ink"]}, Plot(parse_axis("steps=1,2")))
    assert str(raised.value).startswith("the cells' styles (the options', then a Styles axis's) name the prompt "
                                        "styles 'ink': give the styles")


def test_a_removed_styles_file_drops_its_styles_and_each_state_is_logged_once(tmp_path, caplog) -> None:
    """A file removed while the server runs drops its styles (A1111's reload reads the files there are) and is
    logged once, not at every look; an unreadable edit is logged once too; the file made again is read again."""
    ink, neon = tmp_path / "ink.csv", tmp_path / "neon.csv"
    _edit(ink, "name,prompt\nink,ink drawing\n")
    _edit(neon, "name,prompt\nneon,neon lights\n")
    watched = WatchedStyles([ink, neon])
    neon.unlink()
    for _ in range(5):
        assert list(watched.current().styles) == ["ink"]
    assert caplog.text.count("is gone") == 1 and "ERROR" not in caplog.text
    _edit(ink, "title,prompt\nx,y\n")                                  # half-edited: no name column
    for _ in range(5):
        assert list(watched.current().styles) == ["ink"]
    assert caplog.text.count("no 'name' column") == 1
    _edit(ink, "name,prompt\nink,ink again\n")
    _edit(neon, "name,prompt\nneon,neon again\n")
    assert {name: s.prompt for name, s in watched.current().styles.items()} == {"ink": "ink again",
                                                                                  "neon": "neon again"}


def test_a_read_that_catches_a_file_being_written_keeps_the_styles_before(tmp_path, monkeypatch) -> None:
    """A read during a save that is not atomic (A1111 writes styles.csv in place) keeps the styles read before and
    is made again at the next look: a file whose size or time moved while it was read, or one written less than a
    second ago that gave no styles where it had some (truncated, not yet written)."""
    import sdlab.pipeline.styles as styles_module

    path = tmp_path / "styles.csv"
    _edit(path, "name,prompt\nink,ink drawing\nneon,neon lights\n")
    watched = WatchedStyles([path])
    read = styles_module.read_styles_file

    def written_during_the_read(file):
        styles = read(file)
        _edit(path, "name,prompt\nink,ink drawing\nneon,neon lights\nchalk,chalk\n")   # the save goes on
        return styles[:1]

    _edit(path, "name,prompt\nink,ink drawing\n")                       # the save begins
    monkeypatch.setattr(styles_module, "read_styles_file", written_during_the_read)
    assert list(watched.current().styles) == ["ink", "neon"]            # the styles before
    monkeypatch.setattr(styles_module, "read_styles_file", read)
    assert list(watched.current().styles) == ["ink", "neon", "chalk"]   # read again: the saved file
    path.write_text("", encoding="utf-8")                              # truncated, the rows not yet written
    for _ in range(3):
        assert list(watched.current().styles) == ["ink", "neon", "chalk"]
    path.write_text("name,prompt\nink,ink drawing\nneon,neon lights\nchalk,chalk!\n", encoding="utf-8")
    assert watched.current().styles["chalk"].prompt == "chalk!"
    path.write_text("name,prompt\n", encoding="utf-8")                 # emptied on purpose
    assert list(watched.current().styles) == ["ink", "neon", "chalk"]   # ... while it may be a save going on
    past = time.time_ns() - 2 * 10**9
    os.utime(path, ns=(past, past))                                      # ... taken once it is older
    assert list(watched.current().styles) == []


def test_a_styles_file_made_after_start_is_read(tmp_path) -> None:
    """Without --styles-file, `sdlab serve --models-dir`'s styles.csv (or the webui folder's) is watched where it
    would be read: made after the server starts, it is read at the next look."""
    models = tmp_path / "models"
    (models / "Stable-diffusion").mkdir(parents=True)
    watched = WatchedStyles([], [models / "styles.csv", tmp_path / "styles.csv"])
    assert not watched.current().styles
    _edit(tmp_path / "styles.csv", "name,prompt\nink,ink drawing\n")
    assert list(watched.current().styles) == ["ink"]
    _edit(models / "styles.csv", "name,prompt\nneon,neon lights\n")   # the first one wins, as at start
    assert list(watched.current().styles) == ["neon"]


def test_a_styles_file_is_parsed_from_one_reading(tmp_path, monkeypatch) -> None:
    """The file is read whole before it is parsed, so its header and rows are of one version: read line by line
    while a writer truncates and rewrites it, an empty first read then another header made a KeyError (a 500)."""
    import sdlab.pipeline.styles as styles_module

    class BeingWritten:
        """Line by line: empty at first, then a half-written file; whole: the file as a reader sees it at once."""

        def __init__(self) -> None:
            self.lines = iter([None, "title,prompt\n", "x,y\n"])

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            return None

        def __iter__(self):
            return self

        def __next__(self) -> str:
            line = next(self.lines)
            if line is None:
                raise StopIteration
            return line

        def read(self) -> str:
            return "name,prompt\nink,ink drawing\n"

    monkeypatch.setattr(styles_module, "open", lambda *args, **kwargs: BeingWritten(), raising=False)
    assert [style.name for style in read_styles_file(tmp_path / "styles.csv")] == ["ink"]
