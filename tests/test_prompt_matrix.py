"""A1111 1.10's Prompt matrix script (`sdlab.pipeline.prompt_matrix`, `sdlab grid --prompt-matrix`): combinations,
seeds, the grid's rows and legends against A1111's code transcribed below, and every picture drawn equal to the
single `sdlab txt2img` run it stands for (the shipped model, 64 px, 2 steps)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from cli_helpers import pixels, run
from sdlab.pipeline.grid import GridError, grid_layout
from sdlab.pipeline.png_info import parse_parameters, read_parameters
from sdlab.pipeline.prompt_matrix import prompt_matrix

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------------------
# A1111 (AUTOMATIC1111/stable-diffusion-webui v1.10, scripts/prompt_matrix.py `Script.run` and modules/images.py
# `draw_prompt_matrix`), transcribed: the combinations, the seeds, the grid's rows and the legends.

def a1111_matrix(original_prompt, put_at_start, variations_delimiter, different_seeds, seed):
    delimiter = ", " if variations_delimiter == "comma" else " "
    all_prompts = []
    prompt_matrix_parts = original_prompt.split("|")
    combination_count = 2 ** (len(prompt_matrix_parts) - 1)
    for combination_num in range(combination_count):
        selected_prompts = [text.strip().strip(',') for n, text in enumerate(prompt_matrix_parts[1:])
                            if combination_num & (1 << n)]
        if put_at_start:
            selected_prompts = selected_prompts + [prompt_matrix_parts[0]]
        else:
            selected_prompts = [prompt_matrix_parts[0]] + selected_prompts
        all_prompts.append(delimiter.join(selected_prompts))
    seeds = [int(seed + (i if different_seeds else 0)) for i in range(len(all_prompts))]
    rows = 1 << ((len(prompt_matrix_parts) - 1) // 2)
    return all_prompts, seeds, rows


def a1111_legends(all_prompts):
    prompts = all_prompts[1:]
    boundary = math.ceil(len(prompts) / 2)
    prompts_horiz = prompts[:boundary]
    prompts_vert = prompts[boundary:]
    hor_texts = [[(x, pos & (1 << i) != 0) for i, x in enumerate(prompts_horiz)] for pos in range(1 << len(prompts_horiz))]
    ver_texts = [[(x, pos & (1 << i) != 0) for i, x in enumerate(prompts_vert)] for pos in range(1 << len(prompts_vert))]
    return hor_texts, ver_texts


MATRIX_PROMPTS = ["a cat", "a cat|red", "a cat |red, | in the snow,|at night", "a|b|c|d|e", ",x|, y ,|z", "a||b"]


@pytest.mark.parametrize("text", MATRIX_PROMPTS)
@pytest.mark.parametrize("at_start, delimiter, different", [(False, "comma", False), (True, "space", True),
                                                            (False, "space", True), (True, "comma", False)])
def test_matrix_combinations_seeds_and_rows_are_a1111s(text: str, at_start: bool, delimiter: str,
                                                       different: bool) -> None:
    prompts, seeds, rows = a1111_matrix(text, at_start, delimiter, different, 100)
    matrix = prompt_matrix({"prompt": text}, "positive", at_start, delimiter, different)
    cells = matrix.cells({"prompt": text, "seed": 100, "subseed": 50})
    assert [cell["prompt"] for _, cell in cells] == prompts
    assert [cell["seed"] for _, cell in cells] == seeds
    assert [cell["subseed"] for _, cell in cells] == [50 + n for n in range(len(prompts))]   # A1111's all_subseeds
    columns = math.ceil(len(prompts) / rows)
    assert matrix.shape() == (columns, rows, 1)
    assert [index for index, _ in cells] == [(n % columns, n // columns, 0) for n in range(len(prompts))]  # image_grid
    across, down = matrix.legends()
    hor, ver = a1111_legends([part.strip() for part in text.split("|")])
    assert [[(a.text, a.active) for a in label] for label in across] == hor
    assert [[(a.text, a.active) for a in label] for label in down] == ver


def test_matrix_of_the_negative_prompt_and_a1111s_refusals() -> None:
    matrix = prompt_matrix({"prompt": "a cat", "negative_prompt": "blurry|dark"}, "negative")
    cells = matrix.cells({"prompt": "a cat", "negative_prompt": "blurry|dark", "seed": 1})
    assert [(c["prompt"], c["negative_prompt"]) for _, c in cells] == [("a cat", "blurry"), ("a cat", "blurry, dark")]
    with pytest.raises(GridError, match="^Unknown prompt type both$"):
        prompt_matrix({"prompt": "a|b"}, "both")
    with pytest.raises(GridError, match="^Unknown variations delimiter tab$"):
        prompt_matrix({"prompt": "a|b"}, variations_delimiter="tab")
    with pytest.raises(GridError, match=r"of 10 parts makes 2\^9 pictures; a grid holds at most 256"):
        prompt_matrix({"prompt": "|".join("abcdefghij")})


def test_a_matrix_past_the_grid_is_refused_from_its_parts_before_any_prompt_is_built(monkeypatch) -> None:
    """2 ** (parts - 1) prompts: built before the refusal, 40 parts took hours (and 20,000 parts fit the prompt)."""
    from sdlab.pipeline.prompt_matrix import PromptMatrix

    def no_prompts(self) -> list[str]:
        raise AssertionError("a prompt was built for a matrix that is refused")

    monkeypatch.setattr(PromptMatrix, "prompts", no_prompts)
    monkeypatch.setattr(PromptMatrix, "prompt", no_prompts, raising=False)
    for parts in (10, 40, 10_000):
        with pytest.raises(GridError, match=rf"of {parts} parts makes 2\^{parts - 1} pictures"):
            prompt_matrix({"prompt": "|".join(["a"] * parts)})


def test_matrix_fixes_an_unset_seed_once() -> None:
    cells = prompt_matrix({"prompt": "a|b|c"}).cells({"prompt": "a|b|c"})
    assert len({cell["seed"] for _, cell in cells}) == 1 and cells[0][1]["seed"] >= 0


def test_draw_plot_refuses_to_keep_a_matrix_seeds_random() -> None:
    """draw_plot draws a PromptMatrix as a Plot; its keep_random_seeds is a Plot's alone (the matrix fixes them)."""
    from PIL import Image

    from sdlab.pipeline.grid import draw_plot

    def run(request):
        return SimpleNamespace(images=[Image.new("RGB", (64, 64))], request=request)

    matrix = prompt_matrix({"prompt": "a|b|c"})
    sheet, results = draw_plot(run, {"prompt": "a|b|c"}, matrix)
    assert len(results) == 4 and sheet.width > 128
    with pytest.raises(GridError, match="^keep_random_seeds: a prompt matrix draws every picture on one fixed seed"):
        draw_plot(run, {"prompt": "a|b|c"}, matrix, keep_random_seeds=True)


PROMPT = "a red apple|on a table|at night"


def test_grid_prompt_matrix_pictures_equal_single_runs(tmp_path: Path, capsys) -> None:
    out, kept = tmp_path / "matrix.png", tmp_path / "cells"
    code, stdout, err = run(["grid", PROMPT, "--prompt-matrix", "--matrix-random-seeds", "--matrix-join", "space",
                             "--seed", "11", "--steps", "2", "--margin", "4", "--out", str(out), "--keep-cells",
                             str(kept), "--no-progress"], capsys)
    assert code == 0, err
    assert stdout.strip() == str(out)
    prompts, seeds, rows = a1111_matrix(PROMPT, False, "space", True, 11)
    matrix = prompt_matrix({"prompt": PROMPT}, variations_delimiter="space", margin=4)
    across, down = matrix.legends()
    layout = grid_layout((64, 64), 2, 2, across, down, 4)
    sheet = pixels(out)
    assert sheet.shape == (layout.size[1], layout.size[0], 3) and layout.top > 0 and layout.left > 0
    for n, (prompt, seed) in enumerate(zip(prompts, seeds)):
        single = tmp_path / f"single-{n}.png"
        code, _, err = run(["txt2img", prompt, "--seed", str(seed), "--steps", "2", "--out", str(single),
                            "--no-progress"], capsys)
        assert code == 0, err
        want = pixels(single)
        left, top = layout.cell_at(n % 2, n // 2)
        assert np.array_equal(sheet[top:top + 64, left:left + 64], want), prompt
        assert np.array_equal(pixels(kept / f"{n:03d}-x{n % 2}-y{n // 2}-z0.png"), want), prompt
    first = parse_parameters(read_parameters(out))          # A1111: the grid carries the first picture's text
    assert (first["Prompt"], first["Seed"], "Script" in first) == ("a red apple", 11, False)


def test_a_lora_tag_part_sets_its_preset_on_its_pictures_alone(tmp_path: Path, capsys) -> None:
    """sdlab-tiny-lcm names the lcm preset: the pictures with its tag draw LCM (4 steps), the others the model's
    sampler and steps, each the picture txt2img draws with its prompt."""
    prompt = "a red apple|<lora:sdlab-tiny-lcm:1>"
    kept = tmp_path / "cells"
    code, _, err = run(["grid", prompt, "--prompt-matrix", "--seed", "3", "--out", str(tmp_path / "m.png"),
                        "--keep-cells", str(kept), "--no-progress"], capsys)
    assert code == 0, err
    prompts, _, _ = a1111_matrix(prompt, False, "comma", False, 3)
    for n, (text, sampler) in enumerate(zip(prompts, ["DPM++ 2M", "LCM"])):
        single = tmp_path / f"single-{n}.png"
        code, _, err = run(["txt2img", text, "--seed", "3", "--out", str(single), "--no-progress"], capsys)
        assert code == 0, err
        cell = kept / f"{n:03d}-x{n}-y0-z0.png"
        assert parse_parameters(read_parameters(cell))["Sampler"] == sampler == \
            parse_parameters(read_parameters(single))["Sampler"]
        assert np.array_equal(pixels(cell), pixels(single)), text


@pytest.mark.parametrize("options, match", [
    (["--x", "steps=1,2"], "--x: not --prompt-matrix's"),
    (["--batch-count", "2"], "--batch and --batch-count are not its"),
    (["--matrix-negative"], "--matrix-negative splits --negative"),
    (["--margin", "501"], "--margin must be 0 to 500"),
])
def test_grid_prompt_matrix_refusals_before_any_work(tmp_path: Path, capsys, options: list[str], match: str) -> None:
    out = tmp_path / "m.png"
    code, _, err = run(["grid", PROMPT, "--prompt-matrix", *options, "--out", str(out)], capsys)
    assert code == 2 and match in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("flag", [["--matrix-at-start"], ["--matrix-join", "space"], ["--matrix-join", "comma"]])
def test_matrix_flags_need_prompt_matrix(tmp_path: Path, capsys, flag: list[str]) -> None:
    code, _, err = run(["grid", PROMPT, "--x", "steps=1,2", *flag, "--out", str(tmp_path / "g.png")], capsys)
    assert code == 2 and f"{flag[0]}: give --prompt-matrix" in err
