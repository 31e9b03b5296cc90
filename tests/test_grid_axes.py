"""X/Y/Z plot axes and picture (sdlab.pipeline.grid): A1111's value lists and ranges, fields, Prompt S/R, the
cell limit, and the layout of the labelled sheet."""

from __future__ import annotations


import numpy as np
import pytest
from PIL import Image

from sdlab.pipeline.grid import (
    MAX_CELLS,
    GridError,
    Plot,
    cell_count,
    draw_grid,
    font_size,
    grid_font,
    grid_layout,
    parse_axis,
    split_values,
    title_height,
    row_grids,
)


@pytest.mark.parametrize("spec,values", [
    ("steps=1-5", [1, 2, 3, 4, 5]),
    ("steps=1-10 (+3)", [1, 4, 7, 10]),
    ("steps=10-2 (-4)", [10, 6]),                     # A1111: range(start, end + 1, step), so 2 is left out
    ("steps=10-20 [3]", [10, 15, 20]),
    ("steps=1-10 [4]", [1, 4, 7, 10]),
    ("steps=1-2 [4]", [1, 1, 1, 2]),                  # linspace, truncated to int as A1111 does
    ("steps= 5, 1-3 ,8", [5, 1, 2, 3, 8]),
    ("cfg=1-2 (+0.25)", [1.0, 1.25, 1.5, 1.75, 2.0]),
    ("cfg=5-9 [3]", [5.0, 7.0, 9.0]),
    ("cfg=7, 3.5", [7.0, 3.5]),
    ("width=64-128 (+32)", [64, 96, 128]),
    ("Denoising strength=0.25-0.75 [3]", [0.25, 0.5, 0.75]),
])
def test_ranges_parse_as_a1111(spec: str, values: list) -> None:
    axis = parse_axis(spec)
    assert list(axis.values) == values
    assert all(type(v) is type(values[0]) for v in axis.values)


def test_fields_and_labels() -> None:
    assert parse_axis("Steps=10").labels == ("Steps: 10",)
    assert parse_axis("CFG Scale=7,7.5").labels == ("CFG Scale: 7.0", "CFG Scale: 7.5")       # A1111: round(x, 8)
    assert parse_axis("cfg=1-2 (+0.5)").labels == ("CFG Scale: 1.0", "CFG Scale: 1.5", "CFG Scale: 2.0")
    assert parse_axis("denoise=0.5,1").labels == ("Denoising: 0.5", "Denoising: 1.0")
    assert parse_axis("cfg=7.123456789,7.123461").labels == ("CFG Scale: 7.12345679", "CFG Scale: 7.123461")
    assert parse_axis("cfg_scale=3").field.name == "cfg_scale"
    assert parse_axis("clip_skip=1,2").labels == ("Clip skip: 1", "Clip skip: 2")
    assert parse_axis("Clip skip=2").field.name == "clip_skip"
    assert parse_axis("scheduler=karras,normal").labels == ("Schedule type: karras", "Schedule type: normal")
    assert parse_axis('sampler=Euler a,"DPM++ 2M"').labels == ("Euler a", "DPM++ 2M")
    assert parse_axis("denoise=0.5").field.name == "strength"
    assert parse_axis("Prompt S/R=cat,dog").field.name == "prompt"
    assert parse_axis("seed=3,-1").values == (3, -1)                    # a Plot draws the -1 (`fix_axis_seeds`)
    assert 0 <= Plot(parse_axis("seed=-1")).x.values[0] < 2**32


def test_prompt_sr_replaces_in_both_prompts() -> None:
    axis = parse_axis('prompt_sr=red, "light, blue",green')
    assert axis.values == ("red", "light, blue", "green")
    options = {"prompt": "a red apple, red sky", "negative_prompt": "red noise", "steps": 3}
    assert axis.apply(options, 0) == options
    assert axis.apply(options, 1) == {"prompt": "a light, blue apple, light, blue sky",
                                      "negative_prompt": "light, blue noise", "steps": 3}
    Plot(axis).cells({"prompt": "a red apple"})
    Plot(axis).cells({"prompt": "an apple", "negative_prompt": "red"})
    with pytest.raises(GridError, match="did not find 'red'"):
        Plot(axis).cells({"prompt": "a blue apple", "negative_prompt": "blurry"})


def test_prompt_sr_replaces_in_the_second_prompts_too() -> None:
    """SDXL's prompt_2 / negative_prompt_2 are prompt texts: S/R replaces in them as in the prompt (A1111 has
    none), so the second encoder does not keep the old word under the new label, and finds its word there."""
    axis = parse_axis("prompt_sr=red,green")
    options = {"prompt": "a red apple", "negative_prompt": "blurry", "prompt_2": "red light", "negative_prompt_2": "red"}
    assert axis.apply(options, 1) == {"prompt": "a green apple", "negative_prompt": "blurry",
                                      "prompt_2": "green light", "negative_prompt_2": "green"}
    assert axis.apply({"prompt": "an apple", "prompt_2": "red light"}, 1) == {"prompt": "an apple",
                                                                             "prompt_2": "green light"}
    with pytest.raises(GridError, match="did not find 'red'"):
        Plot(axis).cells({"prompt": "an apple", "prompt_2": "blue light", "negative_prompt_2": "blurry"})


def a1111_apply_prompt(prompt: str, negative_prompt: str, x: str, xs: list[str]) -> tuple[str, str]:
    """AUTOMATIC1111/stable-diffusion-webui scripts/xyz_grid.py `apply_prompt`, transcribed (p -> the prompts)."""
    if xs[0] not in prompt and xs[0] not in negative_prompt:
        raise RuntimeError(f"Prompt S/R did not find {xs[0]} in prompt or negative prompt.")
    return prompt.replace(xs[0], x), negative_prompt.replace(xs[0], x)


@pytest.mark.parametrize("x, y, message", [
    # a second S/R on the word the first replaced: A1111 refuses its cells (pear, apple) and (pear, plum)
    ("Prompt S/R=apple,pear", "Prompt S/R=apple,plum", "the grid cell pear, apple: Prompt S/R did not find 'apple'"),
    # a Prompt order after an S/R that replaced one of its tokens (A1111 would splice 'red' in at find() = -1)
    ("Prompt S/R=red,green", "Prompt order=red,blue", "the grid cell green, red, blue: Prompt order did not find 'red'"),
])
def test_prompt_axes_are_checked_in_each_cell_after_the_axes_before(x: str, y: str, message: str) -> None:
    prompt = "a red apple on a light blue table"
    plot = Plot(parse_axis(x), parse_axis(y))
    with pytest.raises(GridError, match=message):
        plot.cells({"prompt": prompt})
    sr = parse_axis(x)                                       # each good S/R cell is A1111's
    for i, value in enumerate(sr.values):
        assert sr.apply({"prompt": prompt}, i)["prompt"] == a1111_apply_prompt(prompt, "", value, list(sr.values))[0]
    with pytest.raises(RuntimeError, match="did not find apple"):         # A1111 refuses the (pear, plum) cell too
        a1111_apply_prompt("a red pear on a light blue table", "", "plum", ["apple", "plum"])


@pytest.mark.parametrize("spec,match", [
    ("colour=1,2", "unknown grid field 'colour'"),
    ("steps", "FIELD=V1,V2"),
    ("steps=ten", "not an integer or a range"),
    ("steps=1-5 (+0)", "step of 0"),
    ("cfg=abc", "not a number"),
    ("cfg=nan", "not a finite number"),
    ("cfg=1e400-1e400", "has a number that is not finite"),          # numpy.arange could not count it
    ("cfg=1-1e400 [3]", "has a number that is not finite"),
    ("cfg=1-2 [1e400]", "has a number that is not finite"),
    ("cfg=1-2 (+1e400)", "has a number that is not finite"),
    ("steps=5-1", "no values"),
    ("steps=,", "no values"),
    ("steps=0,4", "Steps must be at least 1"),
    ("sampler=Euler,Eulr", "unknown sampler 'Eulr'; valid names:"),
    ("schedule=karras,wobbly", "unknown schedule 'wobbly'"),
    ("denoise=0.5,1.5", "strength must lie in"),
    ("steps=1-100000", "a grid holds at most 256"),
    ("seed=1-10 [1000000]", "a grid holds at most 256"),
    ("cfg=0-1000000 (+0.001)", "a grid holds at most 256"),
])
def test_bad_axes(spec: str, match: str) -> None:
    with pytest.raises(GridError, match=match.replace("(", r"\(").replace("+", r"\+")):
        parse_axis(spec)


@pytest.mark.parametrize("spec,values", [
    ("cfg=5e-1,7", [0.5, 7.0]),                       # a number as float() reads it, not the range "5e" to "1"
    ("denoise=1e-1", [0.1]),
    ("cfg=1E+1", [10.0]),
    ("cfg=1e0-3 (+1)", [1.0, 2.0, 3.0]),              # exponents in A1111's ranges too
    ("cfg=1e-1-3e-1 [3]", np.linspace(0.1, 0.3, 3).tolist()),
])
def test_float_values_take_exponents(spec: str, values: list) -> None:
    assert list(parse_axis(spec).values) == values


@pytest.mark.parametrize("spec", ["cfg=2x-3", "cfg=5e", "cfg=1e-", "cfg=1.2.3-4", "denoise=0,5-1x"])
def test_a_float_value_that_is_no_number_is_one_grid_error(spec: str) -> None:
    with pytest.raises(GridError, match="is not a number or a range"):
        parse_axis(spec)


def test_cell_limit() -> None:
    axes = [parse_axis("steps=1-16"), parse_axis("seed=1-16")]
    assert cell_count(axes) == MAX_CELLS
    with pytest.raises(GridError, match="512 cells"):
        cell_count(axes + [parse_axis("cfg=1,2")])


def test_csv_split_keeps_quoted_commas() -> None:
    assert split_values(' a, "b, c" ,d') == ["a", "b, c", "d"]


def _cell(colour: tuple[int, int, int], size=(64, 64)) -> Image.Image:
    return Image.new("RGB", size, colour)


def test_sheet_size_is_cells_plus_label_bands_and_cells_sit_in_place() -> None:
    rng = np.random.default_rng(0)
    cells = [[Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(3)] for _ in range(2)]
    x, y = ["Steps: 2", "Steps: 3", "Steps: 4"], ["Euler", "DPM++ 2M"]
    sheet = draw_grid(cells, x, y)
    layout = grid_layout((64, 64), 3, 2, x, y)
    assert sheet.size == layout.size == (layout.left + 3 * 64, layout.top + 2 * 64)
    assert layout.left >= 48 and layout.top > 0
    for j in range(2):
        for i in range(3):
            box = (layout.left + 64 * i, layout.top + 64 * j, layout.left + 64 * (i + 1), layout.top + 64 * (j + 1))
            assert np.array_equal(np.asarray(sheet.crop(box)), np.asarray(cells[j][i]))
    band = np.asarray(sheet.crop((layout.left, 0, sheet.width, layout.top)))
    assert (band < 128).any()                                        # the X labels are drawn
    only_x = draw_grid([cells[0]], x, [""])
    assert only_x.size == (3 * 64, grid_layout((64, 64), 3, 1, x, [""]).top + 64)


def a1111_draw_texts(drawing, draw_x, draw_y, lines, fnt, line_spacing, color_inactive=(153, 153, 153)):
    """A1111 1.10 modules/images.py `draw_grid_annotations`' `draw_texts` (`lines`: (text, is_active), `line.size`
    as its `multiline_textbbox` gives it; no line wider than its slot, so the font is not shrunk)."""
    for text, is_active in lines:
        bbox = drawing.multiline_textbbox((0, 0), text, font=fnt)
        size = (bbox[2] - bbox[0], bbox[3] - bbox[1])
        drawing.multiline_text((draw_x, draw_y + size[1] / 2), text, font=fnt,
                               fill=(0, 0, 0) if is_active else color_inactive, anchor="mm", align="center")
        if not is_active:
            drawing.line((draw_x - size[0] // 2, draw_y + size[1] // 2, draw_x + size[0] // 2, draw_y + size[1] // 2),
                         fill=color_inactive, width=4)
        draw_y += size[1] + line_spacing


@pytest.mark.parametrize("cell_size", [64, 512])
def test_legend_lines_and_their_strike_through_are_drawn_as_a1111s(cell_size: int) -> None:
    """A prompt matrix legend (an inactive part grey and struck through its middle, an active one black) pixel-equal
    to A1111's drawing of the same lines, at the same place, in the same font."""
    from PIL import ImageDraw

    from sdlab.pipeline.grid import Annotation

    lines = [("agy", False), ("red fur", True), ("AHM", False)]
    cell = _cell((255, 255, 255), (cell_size, cell_size))
    label = tuple(Annotation(text, active) for text, active in lines)
    sheet = draw_grid([[cell]], [label], [()])
    layout = grid_layout(cell.size, 1, 1, [label], [()])
    size = font_size(*cell.size)
    fnt, spacing = grid_font(size), size // 2
    want = Image.new("RGB", sheet.size, "white")
    drawing = ImageDraw.Draw(want)
    heights = sum(drawing.multiline_textbbox((0, 0), text, font=fnt)[3]
                  - drawing.multiline_textbbox((0, 0), text, font=fnt)[1] + spacing for text, _ in lines) - spacing
    a1111_draw_texts(drawing, cell_size / 2, layout.top / 2 - heights / 2, lines, fnt, spacing)
    assert np.array_equal(np.asarray(sheet)[:layout.top], np.asarray(want)[:layout.top])


def test_z_sub_grids_sit_side_by_side_under_titles() -> None:
    grids = [draw_grid([[_cell((255, 0, 0)), _cell((0, 255, 0))]], ["a", "b"], [""]) for _ in range(3)]
    sheet, lefts = row_grids(grids, ["Seed: 1", "Seed: 2", "Seed: 3"], font_size(64, 64))
    band = title_height(grids[0].width, "Seed: 1", font_size(64, 64))
    assert sheet.size == (3 * grids[0].width, band + grids[0].height)          # A1111: image_grid(..., rows=1)
    assert lefts == [0, grids[0].width, 2 * grids[0].width]
    box = (lefts[2], band, lefts[2] + grids[2].width, sheet.height)
    assert np.array_equal(np.asarray(sheet.crop(box)), np.asarray(grids[2]))
    assert (np.asarray(sheet.crop((lefts[1], 0, lefts[2], band))) < 128).any()  # the second title, above its grid


def test_cells_of_different_sizes_take_the_largest_slot() -> None:
    sheet = draw_grid([[_cell((0, 0, 0), (64, 64)), _cell((0, 0, 0), (96, 64))]], ["Width: 64", "Width: 96"], [""])
    assert sheet.width == 2 * 96


def test_font_is_scalable_when_freetype_is_there() -> None:
    font = grid_font(14)
    assert font.getbbox("Steps: 10")[3] > 8


def test_schedule_axis_takes_a1111_labels() -> None:
    axis = parse_axis("schedule=SGM Uniform,Automatic,DDIM,karras")
    assert axis.values == ("SGM Uniform", "Automatic", "DDIM", "karras")       # as typed, as A1111 keeps them
    assert axis.labels[0] == "Schedule type: SGM Uniform"


def _recording_run(requests: list):
    """A `run` that records each request and draws a grey 8 px picture (the seeds are what is tested)."""
    from sdlab.pipeline.request import GenerationResult

    def run(request):
        requests.append(request)
        return GenerationResult([Image.new("RGB", (8, 8), "grey")], [request.seed or 0], request)
    return run


@pytest.mark.parametrize("seeds", [{}, {"seed": -1}, {"seed": -1, "subseed": -1, "subseed_strength": 0.5}])
def test_draw_plot_fixes_one_seed_for_the_whole_grid(seeds: dict) -> None:
    """A1111's plot calls `processing.fix_seed(p)` before its first cell (unless "Keep -1 for seeds"), so one
    seed and one variation seed serve every cell, as `sdlab grid` does."""
    from sdlab.pipeline.grid import Plot, draw_plot

    requests: list = []
    draw_plot(_recording_run(requests), {"prompt": "a", **seeds}, Plot(parse_axis("cfg=2,4,6"), parse_axis("steps=1,2")))
    assert len(requests) == 6
    assert len({r.seed for r in requests}) == 1 and requests[0].seed not in (None, -1)
    assert len({r.subseed for r in requests}) == 1 and requests[0].subseed not in (None, -1)
    kept: list = []
    draw_plot(_recording_run(kept), {"prompt": "a", **seeds}, Plot(parse_axis("cfg=2,4"), keep_random_seeds=True))
    assert [r.seed for r in kept] == [seeds.get("seed")] * 2                  # each cell draws its own


def test_keep_random_seeds_keeps_a_seed_axis_minus_one_random_in_each_cell_as_a1111() -> None:
    """A1111's "Keep -1 for seeds" skips `fix_seed(p)` and `fix_axis_seeds`: a -1 of a Seed / Var. seed axis
    reaches each cell as -1 (drawn there), labelled -1, and no `Fixed X Values` is written."""
    from sdlab.pipeline.grid import Plot, draw_plot

    plot = Plot(parse_axis("seed=-1,5"), parse_axis("Var. seed=-1"), keep_random_seeds=True)
    requests: list = []
    draw_plot(_recording_run(requests), {"prompt": "a", "subseed_strength": 0.5}, plot)
    assert [(r.seed, r.subseed) for r in requests] == [(-1, -1), (5, -1)]
    assert plot.x.labels == ("Seed: -1", "Seed: 5")
    assert plot.parameters() == {"Script": "X/Y/Z plot", "X Type": "Seed", "X Values": "-1,5",
                                 "Y Type": "Var. seed", "Y Values": "-1"}
    fixed = Plot(parse_axis("seed=-1,5"))                                  # otherwise drawn once, and recorded
    assert fixed.x.values[0] != -1 and fixed.x.labels[0] == f"Seed: {fixed.x.values[0]}"
    assert fixed.parameters()["Fixed X Values"] == f"{fixed.x.values[0]}, 5"


def test_draw_plot_takes_keep_random_seeds_as_the_plot_does() -> None:
    """`draw_plot(..., keep_random_seeds=True)` (the keyword scripts pass) draws as a Plot made with it: the
    base seed and a seed axis's -1 stay random in each cell (before, a TypeError)."""
    from sdlab.pipeline.grid import Plot, draw_plot

    requests: list = []
    draw_plot(_recording_run(requests), {"prompt": "a"}, Plot(parse_axis("seed=-1,5"), parse_axis("cfg=2,4")),
              keep_random_seeds=True)
    assert [(r.seed, r.cfg_scale) for r in requests] == [(-1, 2.0), (5, 2.0), (-1, 4.0), (5, 4.0)]
    assert all(r.subseed in (None, -1) for r in requests)


def test_draw_plot_keeps_a_given_seed() -> None:
    from sdlab.pipeline.grid import Plot, draw_plot

    requests: list = []
    draw_plot(_recording_run(requests), {"prompt": "a", "seed": 9, "subseed": 3}, Plot(parse_axis("cfg=2,4")))
    assert [(r.seed, r.subseed) for r in requests] == [(9, 3), (9, 3)]


def test_draw_legend_off_lays_the_cells_out_alone() -> None:
    """A1111's Draw legend off: `image_grid` without `draw_grid_annotations`, Z sub-grids side by side."""
    from sdlab.pipeline.grid import Plot

    plot = Plot(parse_axis("steps=1,2"), parse_axis("cfg=3,4,5"), parse_axis("seed=1,2"), legend=False)
    colours = {(i, j, k): (40 * i, 50 * j, 100 * k) for i in range(2) for j in range(3) for k in range(2)}
    sheet = np.asarray(plot.sheet({index: _cell(colour) for index, colour in colours.items()}))
    assert sheet.shape == (3 * 64, 2 * 2 * 64, 3)
    for (i, j, k), colour in colours.items():
        assert (sheet[64 * j:64 * (j + 1), 128 * k + 64 * i:128 * k + 64 * (i + 1)] == colour).all()
