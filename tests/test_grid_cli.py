"""`sdlab grid` with the shipped model (64 px, 2-4 steps): each cell is the picture `sdlab txt2img` draws with its
settings, the sheet's size is the cells plus the label bands, Prompt S/R replaces, and bad axes fail before
any work with one error line and nothing written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli_helpers import pixels, run
from sdlab.pipeline.grid import field_named, font_size, grid_layout, parse_axis, title_height
from sdlab.pipeline.png_info import parse_parameters, read_parameters

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a red apple on a light blue background"


def _txt2img(tmp_path: Path, capsys, name: str, *options: str) -> np.ndarray:
    out = tmp_path / name
    code, _, err = run(["txt2img", *options, "--no-progress", "--out", str(out)], capsys)
    assert code == 0, err
    return pixels(out)


def test_cells_equal_single_txt2img_runs(tmp_path: Path, capsys) -> None:
    out = tmp_path / "grid.png"
    cells = tmp_path / "cells"
    code, stdout, err = run(["grid", PROMPT, "--x", "steps=2-3", "--y", "sampler=Euler,DPM++ 2M", "--seed", "7",
                             "--cfg", "4", "--out", str(out), "--keep-cells", str(cells), "--no-progress"], capsys)
    assert code == 0, err
    assert stdout.strip() == str(out)
    sheet = pixels(out)
    x, y = ["Steps: 2", "Steps: 3"], ["Euler", "DPM++ 2M"]
    layout = grid_layout((64, 64), 2, 2, x, y)
    assert sheet.shape == (layout.top + 2 * 64, layout.left + 2 * 64, 3)
    assert layout.top > 0 and layout.left > 0
    for j, sampler in enumerate(["Euler", "DPM++ 2M"]):
        for i, steps in enumerate(["2", "3"]):
            want = _txt2img(tmp_path, capsys, f"single-{i}{j}.png", PROMPT, "--steps", steps, "--sampler", sampler,
                            "--seed", "7", "--cfg", "4")
            top, left = layout.top + 64 * j, layout.left + 64 * i
            assert np.array_equal(sheet[top:top + 64, left:left + 64], want), (sampler, steps)
            kept = cells / f"{2 * j + i:03d}-x{i}-y{j}-z0.png"
            assert np.array_equal(pixels(kept), want)
            assert parse_parameters(read_parameters(kept))["Steps"] == int(steps)
    first = parse_parameters(read_parameters(out))
    assert (first["Steps"], first["Sampler"], first["Seed"], first["CFG scale"]) == (2, "Euler", 7, 4.0)
    assert first["Prompt"] == PROMPT


@pytest.mark.parametrize("options, sampler", [(["--lora", "sdlab-tiny-lcm"], "LCM"),   # the LoRA names lcm
                                              (["--preset", "turbo"], "Euler a")])
def test_cells_follow_the_preset_as_txt2img_does(tmp_path: Path, capsys, options: list[str], sampler: str) -> None:
    cells = tmp_path / "cells"
    code, _, err = run(["grid", PROMPT, "--x", "steps=1,2", *options, "--seed", "3", "--out", str(tmp_path / "g.png"),
                        "--keep-cells", str(cells), "--no-progress"], capsys)
    assert code == 0, err
    for i, steps in enumerate(["1", "2"]):
        kept = cells / f"{i:03d}-x{i}-y0-z0.png"
        assert parse_parameters(read_parameters(kept))["Sampler"] == sampler
        want = _txt2img(tmp_path, capsys, f"single-{i}.png", PROMPT, "--steps", steps, *options, "--seed", "3")
        assert np.array_equal(pixels(kept), want), steps


def test_a_cells_lora_tag_sets_its_preset_on_that_cell_alone(tmp_path: Path, capsys) -> None:
    """A Prompt S/R that adds sdlab-tiny-lcm's tag (which names the lcm preset) draws that cell as txt2img draws
    its prompt: LCM at the preset's steps, the other cell at the model's sampler and steps."""
    cells = tmp_path / "cells"
    code, _, err = run(["grid", PROMPT, "--x", "prompt_sr=apple,apple <lora:sdlab-tiny-lcm:1>", "--seed", "3",
                        "--out", str(tmp_path / "g.png"), "--keep-cells", str(cells), "--no-progress"], capsys)
    assert code == 0, err
    for i, prompt in enumerate([PROMPT, PROMPT.replace("apple", "apple <lora:sdlab-tiny-lcm:1>")]):
        kept = cells / f"{i:03d}-x{i}-y0-z0.png"
        want = _txt2img(tmp_path, capsys, f"single-{i}.png", prompt, "--seed", "3")
        recorded, single = (parse_parameters(read_parameters(path)) for path in (kept, tmp_path / f"single-{i}.png"))
        assert (recorded["Sampler"], recorded["Steps"]) == (single["Sampler"], single["Steps"])
        assert (recorded["Sampler"] == "LCM") == (i == 1)
        assert np.array_equal(pixels(kept), want), prompt


def _tcd_lora(folder: Path) -> Path:
    """The shipped LCM-LoRA saved as a LoRA whose file names the tcd preset (TCD-LoRA's eta 0.3, its gamma)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    import sdlab

    shipped = Path(sdlab.__file__).parent / "models" / "data" / "loras" / "sdlab-tiny-lcm.safetensors"
    with safe_open(str(shipped), "pt") as f:
        metadata = {**f.metadata(), "sdlab.preset": "tcd"}
    save_file(load_file(str(shipped)), str(folder / "tiny-tcd.safetensors"), metadata=metadata)
    return folder / "tiny-tcd.safetensors"


@pytest.mark.parametrize("by", ["--preset", "the LoRA"])
def test_a_preset_eta_goes_with_each_cells_sampler(tmp_path: Path, capsys, by: str) -> None:
    """TCD's eta is its sampler's (5656ba6): the Euler a cell of a sampler axis runs Euler a at its own eta, the
    picture `sdlab txt2img --sampler "Euler a"` draws under the same preset, and the TCD cell at TCD's 0.3."""
    options = ["--preset", "tcd"] if by == "--preset" else ["--lora", str(_tcd_lora(tmp_path))]
    cells = tmp_path / "cells"
    code, _, err = run(["grid", PROMPT, "--x", "sampler=TCD,Euler a", *options, "--steps", "2", "--seed", "5",
                        "--out", str(tmp_path / "g.png"), "--keep-cells", str(cells), "--no-progress"], capsys)
    assert code == 0, err
    for i, sampler in enumerate(["TCD", "Euler a"]):
        kept = cells / f"{i:03d}-x{i}-y0-z0.png"
        want = _txt2img(tmp_path, capsys, f"single-{i}.png", PROMPT, "--sampler", sampler, *options, "--steps", "2",
                        "--seed", "5")
        assert np.array_equal(pixels(kept), want), sampler
        assert "Eta" not in parse_parameters(read_parameters(kept))      # each sampler at its default eta


def test_prompt_sr_and_z_axis(tmp_path: Path, capsys) -> None:
    out = tmp_path / "grid.png"
    code, _, err = run(["grid", PROMPT, "--x", "prompt_sr=apple,star", "--z", "seed=1,2", "--steps", "2",
                        "--out", str(out), "--keep-cells", str(tmp_path / "c"), "--no-progress"], capsys)
    assert code == 0, err
    star = tmp_path / "c" / "001-x1-y0-z0.png"
    recorded = parse_parameters(read_parameters(star))
    assert recorded["Prompt"] == "a red star on a light blue background" and recorded["Seed"] == 1
    want = _txt2img(tmp_path, capsys, "star.png", "a red star on a light blue background", "--steps", "2", "--seed", "2")
    assert np.array_equal(pixels(tmp_path / "c" / "003-x1-y0-z1.png"), want)
    sub = grid_layout((64, 64), 2, 1, ["apple", "star"], [""])
    band = title_height(sub.size[0], "Seed: 2", font_size(64, 64))
    sheet = pixels(out)
    assert sheet.shape[:2] == (band + sub.size[1], 2 * sub.size[0])      # Z sub-grids side by side, as A1111
    top, left = band + sub.top, sub.size[0] + sub.left + 64           # the second sub-grid's second cell
    assert np.array_equal(sheet[top:top + 64, left:left + 64], want)


def test_one_random_seed_serves_every_cell(tmp_path: Path, capsys) -> None:
    out = tmp_path / "g.png"
    code, _, err = run(["grid", PROMPT, "--x", "cfg=3,5", "--steps", "2", "--out", str(out),
                        "--keep-cells", str(tmp_path / "c"), "--no-progress"], capsys)
    assert code == 0, err
    seeds = {parse_parameters(read_parameters(p))["Seed"] for p in (tmp_path / "c").iterdir()}
    assert len(seeds) == 1


def test_keep_random_seeds_draws_each_cells_own_seeds(tmp_path: Path, capsys) -> None:
    """--keep-random-seeds is A1111's Keep -1 for seeds: the unset seed and a -1 of a seed axis stay random in each
    cell, and the grid records no Fixed X Values."""
    out, cells = tmp_path / "g.png", tmp_path / "c"
    code, _, err = run(["grid", PROMPT, "--x", "Var. seed=-1,-1", "--y", "cfg=3,5", "--subseed-strength", "0.5",
                        "--steps", "1", "--keep-random-seeds", "--out", str(out), "--keep-cells", str(cells),
                        "--no-progress"], capsys)
    assert code == 0, err
    recorded = [parse_parameters(read_parameters(p)) for p in sorted(cells.iterdir())]
    assert len({r["Seed"] for r in recorded}) == 4 and len({r["Variation seed"] for r in recorded}) == 4
    grid = parse_parameters(read_parameters(out))
    assert grid["X Values"] == "-1,-1" and "Fixed X Values" not in grid


@pytest.mark.parametrize("axis,match", [
    ("color=1,2", "unknown grid field"),
    ("steps=1-5 (+0)", "step of 0"),
    ("steps=1-x", "not an integer or a range"),
    ("cfg=2x-3", "'2x-3' is not a number or a range"),
    ("cfg=1e400-1e400", "'1e400-1e400' has a number that is not finite"),
    ("sampler=Euler,Eulr", "unknown sampler 'Eulr'"),
    ("seed=1-300", "at most 256"),
    ("prompt_sr=pear,plum", "did not find 'pear'"),
    ("denoise=0.3,0.5", "needs --init"),
    ("width=64,4", "width must be an integer in 8..8192"),
])
def test_bad_axes_fail_before_any_work(tmp_path: Path, capsys, axis: str, match: str) -> None:
    out = tmp_path / "grid.png"
    code, stdout, err = run(["grid", PROMPT, "--x", axis, "--y", "steps=2,3", "--steps", "2", "--model",
                             str(tmp_path / "not-loaded.safetensors"), "--out", str(out), "--no-progress"], capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sdlab: error:") and match in lines[0], err
    assert list(tmp_path.iterdir()) == []                      # the (missing) model was never opened


def test_a_prompt_axis_that_misses_in_one_cell_fails_before_any_work(tmp_path: Path, capsys) -> None:
    """Prompt S/R and Prompt order are checked in each cell after the axes before them (A1111's `apply_prompt`
    raises per cell): Y's 'red' is gone from X's green cell."""
    code, _, err = run(["grid", PROMPT, "--x", "Prompt S/R=red,green", "--y", "Prompt order=red,light blue",
                        "--model", str(tmp_path / "not-loaded.safetensors"), "--out", str(tmp_path / "g.png")], capsys)
    assert code == 2, err
    assert err.strip() == ("sdlab: error: the grid cell green, red, light blue: Prompt order did not find 'red' in "
                           "the prompt")
    assert list(tmp_path.iterdir()) == []


def test_a_unipc_order_axis_acts_on_a1111s_unipc_under_the_models_steps(tmp_path: Path, capsys) -> None:
    """A UniPC Order axis with a UniPC that is not A1111's (not on ddim_uniform) is refused before the model loads;
    on A1111's, the order is held under the steps the cells draw, the model's 14 here (A1111's min(x, steps - 1)
    against its steps), so 30 draws as order 13."""
    code, _, err = run(["grid", PROMPT, "--sampler", "UniPC", "--x", "UniPC Order=1,3", "--model",
                        str(tmp_path / "not-loaded.safetensors"), "--out", str(tmp_path / "g.png")], capsys)
    assert code == 2 and err.count("\n") == 1 and "acts on A1111's UniPC only" in err, err
    assert list(tmp_path.iterdir()) == []
    cells = tmp_path / "c"
    code, _, err = run(["grid", PROMPT, "--sampler", "UniPC", "--schedule", "ddim_uniform", "--x", "UniPC Order=30",
                        "--seed", "3", "--out", str(tmp_path / "g.png"), "--keep-cells", str(cells), "--no-progress"],
                       capsys)
    assert code == 0, err
    want = _txt2img(tmp_path, capsys, "single.png", PROMPT, "--sampler", "UniPC", "--schedule", "ddim_uniform",
                    "--unipc-order", "13", "--seed", "3")
    assert np.array_equal(pixels(cells / "000-x0-y0-z0.png"), want)


def test_too_many_cells_across_axes(tmp_path: Path, capsys) -> None:
    code, _, err = run(["grid", PROMPT, "--x", "seed=1-20", "--y", "steps=1-13", "--out", str(tmp_path / "g.png")], capsys)
    assert code == 2 and "260 cells" in err
    code, _, err = run(["grid", PROMPT, "--out", str(tmp_path / "g.png")], capsys)
    assert code == 2 and "at least one axis" in err


def test_img2img_grid_over_denoise(tmp_path: Path, capsys) -> None:
    init = tmp_path / "init.png"
    Image.new("RGB", (64, 64), (200, 40, 40)).save(init)
    out = tmp_path / "g.png"
    code, _, err = run(["grid", PROMPT, "--init", str(init), "--x", "denoise=0.5,1", "--steps", "3", "--seed", "5",
                        "--out", str(out), "--keep-cells", str(tmp_path / "c"), "--no-progress"], capsys)
    assert code == 0, err
    single = tmp_path / "single.png"
    code, _, err = run(["img2img", PROMPT, "--init", str(init), "--strength", "0.5", "--steps", "3", "--seed", "5",
                        "--no-progress", "--out", str(single)], capsys)
    assert code == 0, err
    assert np.array_equal(pixels(tmp_path / "c" / "000-x0-y0-z0.png"), pixels(single))
    assert parse_parameters(read_parameters(out))["Denoising strength"] == 0.5


def test_txt2img_denoising_axis_is_the_hires_fixs_denoise_as_a1111(tmp_path: Path, capsys) -> None:
    """A1111's Denoising axis sets denoising_strength, the hires fix's second-pass strength in txt2img; with the
    A1111 axis types Hires steps and Var. seed (fixed -1 recorded as `Fixed Y Values`)."""
    out, cells = tmp_path / "g.png", tmp_path / "c"
    code, _, err = run(["grid", PROMPT, "--hr-scale", "1.5", "--x", "Denoising=0.4,0.8", "--y", "hires steps=1,2",
                        "--z", "Var. seed=-1", "--subseed-strength", "0.3", "--steps", "2", "--seed", "5",
                        "--out", str(out), "--keep-cells", str(cells), "--no-progress"], capsys)
    assert code == 0, err
    grid = parse_parameters(read_parameters(out))
    subseed = int(grid["Fixed Z Values"])
    assert (grid["X Type"], grid["Y Type"], grid["Z Type"]) == ("Denoising", "Hires steps", "Var. seed")
    for j, steps in enumerate(["1", "2"]):
        for i, denoise in enumerate(["0.4", "0.8"]):
            want = _txt2img(tmp_path, capsys, f"single-{i}{j}.png", PROMPT, "--hr-scale", "1.5", "--hr-denoise",
                            denoise, "--hr-steps", steps, "--subseed", str(subseed), "--subseed-strength", "0.3",
                            "--steps", "2", "--seed", "5")
            assert np.array_equal(pixels(cells / f"{2 * j + i:03d}-x{i}-y{j}-z0.png"), want), (denoise, steps)
    code, _, err = run(["grid", PROMPT, "--x", "Denoising=0.4", "--out", str(tmp_path / "h.png")], capsys)
    assert code == 2 and "needs --init IMAGE (img2img's strength) or the hires fix" in err


def test_no_legend_draws_the_cells_alone(tmp_path: Path, capsys) -> None:
    out, cells = tmp_path / "g.png", tmp_path / "c"
    code, _, err = run(["grid", PROMPT, "--x", "steps=1,2", "--y", "Nothing", "--no-legend", "--seed", "3",
                        "--out", str(out), "--keep-cells", str(cells), "--no-progress"], capsys)
    assert code == 0, err
    sheet = pixels(out)
    assert sheet.shape == (64, 128, 3)
    assert np.array_equal(sheet[:, 64:], pixels(cells / "001-x1-y0-z0.png"))
    assert "Y Type" not in parse_parameters(read_parameters(out))


def test_model_checks_run_before_the_first_cell(tmp_path: Path, capsys, monkeypatch) -> None:
    import sdlab.api

    drawn = []
    monkeypatch.setattr(sdlab.api.Pipeline, "run", lambda self, request, **kw: drawn.append(request))
    out = tmp_path / "g.png"
    code, _, err = run(["grid", PROMPT, "--x", "clip_skip=1,40", "--steps", "2", "--out", str(out), "--no-progress"], capsys)
    assert code == 2 and "clip skip" in err.lower() and err.count("sdlab: error:") == 1, err
    assert drawn == [] and list(tmp_path.iterdir()) == []


def test_new_folders_are_made_only_when_writing(tmp_path: Path, capsys) -> None:
    code, _, _ = run(["grid", PROMPT, "--x", "steps=0", "--out", str(tmp_path / "a" / "g.png"),
                      "--keep-cells", str(tmp_path / "b")], capsys)
    assert code == 2 and list(tmp_path.iterdir()) == []
    code, _, err = run(["grid", PROMPT, "--x", "steps=2", "--out", str(tmp_path / "a" / "g.png"),
                        "--keep-cells", str(tmp_path / "b"), "--no-progress"], capsys)
    assert code == 0, err
    assert (tmp_path / "a" / "g.png").is_file() and (tmp_path / "b" / "000-x0-y0-z0.png").is_file()


def test_an_out_that_is_a_folder_is_refused_before_any_cell_is_drawn(tmp_path: Path, capsys, monkeypatch) -> None:
    """`--out grid.png` naming an existing folder: one error before any work (before, every cell was drawn and then
    the write failed with 'Is a directory')."""
    import sdlab.api

    drawn = []
    monkeypatch.setattr(sdlab.api.Pipeline, "run", lambda self, request, **kw: drawn.append(request))
    (tmp_path / "grid.png").mkdir()
    code, _, err = run(["grid", PROMPT, "--x", "steps=2,3", "--out", str(tmp_path / "grid.png"), "--no-progress"],
                       capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "is a folder; name the grid's file" in err, err
    assert drawn == [] and list((tmp_path / "grid.png").iterdir()) == []


def test_python_api_draw_plot_matches_txt2img() -> None:
    import sdlab
    from sdlab.pipeline.grid import Plot, draw_plot, parse_axis

    pipe = sdlab.load()
    plot = Plot(parse_axis("cfg=3,6"), z=parse_axis("steps=2,3"))
    sheet, results = draw_plot(pipe.run, {"prompt": PROMPT, "seed": 4}, plot)
    assert sorted(results) == [(0, 0, 0), (0, 0, 1), (1, 0, 0), (1, 0, 1)]
    want = pipe.txt2img(PROMPT, cfg_scale=6.0, steps=3, seed=4).images[0]
    assert np.array_equal(np.asarray(results[(1, 0, 1)].images[0]), np.asarray(want))
    assert sheet.width == 2 * 2 * 64 and sheet.height > 64                # two Z sub-grids side by side


def test_python_api_draw_cells_draws_a_batch_count_as_sdlab_grid() -> None:
    """`draw_cells`, the drawing loop of `draw_plot` (`sdlab grid` draws each cell with its `cell_batches`): each
    cell as `batch_count` batches whose seeds continue, every batch's result kept, the cell shown as A1111's batch
    grid."""
    import sdlab
    from sdlab.pipeline.grid import Plot, draw_cells, parse_axis

    pipe = sdlab.load()
    plot = Plot(parse_axis("steps=2,3"))
    sheet, results = draw_cells(pipe.run, plot, plot.cells({"prompt": PROMPT, "seed": 4}), batch_count=2)
    assert [[result.request.seed for result in results[(i, 0, 0)]] for i in range(2)] == [[4, 5], [4, 5]]
    want = pipe.txt2img(PROMPT, steps=3, seed=5).images[0]
    assert np.array_equal(np.asarray(results[(1, 0, 0)][1].images[0]), np.asarray(want))
    layout = grid_layout((128, 64), 2, 1, ["Steps: 2", "Steps: 3"], [""])     # a cell: its 2 pictures in a row
    assert sheet.size == layout.size
    assert np.array_equal(np.asarray(sheet)[layout.top:, layout.left + 128 + 64:], np.asarray(want))


def test_axes_must_start_at_x(tmp_path: Path, capsys) -> None:
    code, _, err = run(["grid", PROMPT, "--y", "steps=2,3", "--out", str(tmp_path / "g.png")], capsys)
    assert code == 2 and "--x" in err


def test_prompt_sr_of_a_lora_tag_records_each_cells_own_loras(tmp_path: Path, capsys) -> None:
    from safetensors.torch import load_file, save_file

    import sdlab

    shipped = Path(sdlab.__file__).parent / "models" / "data" / "loras" / "sdlab-tiny-lcm.safetensors"
    save_file({k: (v * 2.0 if "up" in k else v).contiguous() for k, v in load_file(str(shipped)).items()},
              str(tmp_path / "other.safetensors"))                  # a second, different LoRA
    prompt = f"{PROMPT} <lora:sdlab-tiny-lcm:1>"
    cells = tmp_path / "c"
    code, _, err = run(["grid", prompt, "--x", "prompt_sr=<lora:sdlab-tiny-lcm:1>,,<lora:other:1>", "--lora-dir",
                        str(tmp_path), "--steps", "2", "--seed", "5", "--sampler", "Euler", "--out",
                        str(tmp_path / "g.png"), "--keep-cells", str(cells), "--no-progress"], capsys)
    assert code == 0, err
    recorded = [parse_parameters(read_parameters(cells / f"{i:03d}-x{i}-y0-z0.png")) for i in range(3)]
    assert "sdlab-tiny-lcm:" in recorded[0]["Lora hashes"] and "<lora:sdlab-tiny-lcm:1>" in recorded[0]["Prompt"]
    assert "Lora hashes" not in recorded[1] and "<lora" not in recorded[1]["Prompt"]
    assert recorded[2]["Lora hashes"].startswith("other:") and "sdlab-tiny-lcm" not in recorded[2]["Prompt"]
    for i in range(3):                                                # each cell redraws from its own PNG
        cell = cells / f"{i:03d}-x{i}-y0-z0.png"
        again = tmp_path / f"again-{i}.png"
        code, _, err = run(["txt2img", "--from-png", str(cell), "--lora-dir", str(tmp_path), "--no-progress",
                            "--out", str(again)], capsys)
        assert code == 0, err
        assert np.array_equal(pixels(again), pixels(cell)), i
    assert not np.array_equal(pixels(cells / "000-x0-y0-z0.png"), pixels(cells / "002-x2-y0-z0.png"))


def test_schedule_axis_takes_a1111_labels_as_txt2img(tmp_path: Path, capsys) -> None:
    cells = tmp_path / "c"
    code, _, err = run(["grid", PROMPT, "--x", "schedule=SGM Uniform,Automatic,Karras", "--steps", "2", "--seed", "3",
                        "--out", str(tmp_path / "g.png"), "--keep-cells", str(cells), "--no-progress"], capsys)
    assert code == 0, err
    for i, schedule in enumerate(["SGM Uniform", None, "Karras"]):
        kept = cells / f"{i:03d}-x{i}-y0-z0.png"
        options = [] if schedule is None else ["--schedule", schedule]            # Automatic: the model's default
        want = _txt2img(tmp_path, capsys, f"single-{i}.png", PROMPT, "--steps", "2", "--seed", "3", *options)
        assert np.array_equal(pixels(kept), want), schedule
        assert read_parameters(kept) == read_parameters(tmp_path / f"single-{i}.png")


def test_a_standalone_vae_is_recorded_in_cells_and_grid_as_txt2img_does(tmp_path: Path, capsys) -> None:
    from safetensors.torch import save_file

    import sdlab

    vae = tmp_path / "my-vae.safetensors"
    save_file({k: v.contiguous() for k, v in sdlab.load().bundle.vae.state_dict().items()}, str(vae))
    out, cells = tmp_path / "g.png", tmp_path / "c"
    code, _, err = run(["grid", PROMPT, "--x", "steps=2,3", "--vae", str(vae), "--seed", "2", "--out", str(out),
                        "--keep-cells", str(cells), "--no-progress"], capsys)
    assert code == 0, err
    _txt2img(tmp_path, capsys, "single.png", PROMPT, "--steps", "3", "--vae", str(vae), "--seed", "2")
    want = parse_parameters(read_parameters(tmp_path / "single.png"))
    assert want["VAE"] == "my-vae.safetensors" and want["VAE hash"]
    assert parse_parameters(read_parameters(cells / "001-x1-y0-z0.png")) == want
    grid = parse_parameters(read_parameters(out))
    assert (grid["VAE hash"], grid["VAE"]) == (want["VAE hash"], want["VAE"])


def test_the_grid_records_a1111_plot_fields(tmp_path: Path, capsys) -> None:
    out, cells = tmp_path / "g.png", tmp_path / "c"
    code, _, err = run(["grid", PROMPT, "--x", "seed=-1,5", "--y", "cfg=3, 4.5", "--z", "sampler=Euler,DPM++ 2M",
                        "--steps", "2", "--out", str(out), "--keep-cells", str(cells), "--no-progress"], capsys)
    assert code == 0, err
    text = read_parameters(out)
    grid = parse_parameters(text)
    drawn = parse_parameters(read_parameters(cells / "000-x0-y0-z0.png"))["Seed"]
    assert (grid["Script"], grid["X Type"], grid["X Values"]) == ("X/Y/Z plot", "Seed", "-1,5")
    assert grid["Fixed X Values"] == f"{drawn}, 5"                  # the seed -1 drew, kept (xyz_grid.py `cell`)
    assert (grid["Y Type"], grid["Y Values"], grid["Z Type"], grid["Z Values"]) == (
        "CFG Scale", "3, 4.5", "Sampler", "Euler,DPM++ 2M")
    assert "Fixed Y Values" not in grid and "Fixed Z Values" not in grid
    assert text.rstrip().endswith(grid["Version"]) and text.index("Script: X/Y/Z plot") > text.index("Model:")
    assert "Script" not in parse_parameters(read_parameters(cells / "001-x1-y0-z0.png"))     # cells: their own


def test_cells_take_txt2img_s_other_options_as_txt2img_draws_them(tmp_path: Path, capsys) -> None:
    """README: every other option as in txt2img. Threads, tiling, a variation seed, the hires fix, a batch and a
    batch count: each cell's pictures are txt2img's with those options, and the cell shows them as A1111's
    batch grid (2 x 2 for 4 pictures)."""
    from sdlab.pipeline.grid import cell_picture

    options = ["--seed", "5", "--cfg", "4", "--threads", "1", "--tiling", "--subseed", "7", "--subseed-strength",
               "0.3", "--hr-scale", "1.5", "--hr-steps", "1", "--hr-denoise", "0.5", "--batch", "2",
               "--batch-count", "2"]
    out, cells = tmp_path / "grid.png", tmp_path / "cells"
    code, _, err = run(["grid", PROMPT, "--x", "steps=2,3", *options, "--out", str(out), "--keep-cells", str(cells),
                        "--no-progress"], capsys)
    assert code == 0, err
    sheet = pixels(out)
    layout = grid_layout((192, 192), 2, 1, ["Steps: 2", "Steps: 3"], [""])
    assert sheet.shape == (layout.top + 192, layout.left + 2 * 192, 3)
    for i, steps in enumerate(["2", "3"]):
        code, _, err = run(["txt2img", PROMPT, "--steps", steps, *options, "--no-progress",
                            "--out", str(tmp_path / f"single{i}.png")], capsys)
        assert code == 0, err
        singles = [tmp_path / f"single{i}-{m}.png" for m in range(4)]
        for m, single in enumerate(singles):
            kept = cells / f"{i:03d}-x{i}-y0-z0-{m}.png"
            assert np.array_equal(pixels(kept), pixels(single)), (steps, m)
            assert parse_parameters(read_parameters(kept)) == parse_parameters(read_parameters(single))
        want = np.asarray(cell_picture([Image.open(s).convert("RGB") for s in singles]), dtype=np.int16)
        left = layout.left + 192 * i
        assert np.array_equal(sheet[layout.top:, left:left + 192], want), steps
    recorded = parse_parameters(read_parameters(out))
    assert recorded["Tiling"] == "True" and recorded["Variation seed"] == 7 and recorded["Hires upscale"] == 1.5


def test_a_one_image_cell_is_its_image_and_a_batch_a1111_s_batch_grid() -> None:
    """`cell_picture`: A1111's `images.image_grid` at its default settings (round(sqrt(n)) rows, white where a
    row is short), transcribed here as the reference."""
    from a1111_image_grid import a1111_image_grid
    from sdlab.pipeline.grid import cell_picture

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)) for _ in range(5)]
    assert cell_picture(images[:1]) is images[0]
    for n in (2, 3, 4, 5):
        assert np.array_equal(np.asarray(cell_picture(images[:n])), np.asarray(a1111_image_grid(images[:n]))), n


def test_cells_take_a_refiner_and_controlnets_as_txt2img(tmp_path: Path, capsys) -> None:
    """--refiner / --refiner-switch and --control / --control-module in a grid: each cell is txt2img's picture
    with them, recorded as txt2img records them."""
    from PIL import ImageDraw

    from bundle_fixtures import tiny_bundle, write_original
    from controlnet_fixtures import diffusers_controlnet, write_layout

    base, refiner = tmp_path / "base.safetensors", tmp_path / "refiner.safetensors"
    write_original(tiny_bundle("sdxl"), base, junk=False)
    write_original(tiny_bundle("sdxl-refiner", seed=5), refiner, junk=False)
    (tmp_path / "net").mkdir()
    net = write_layout(diffusers_controlnet(tiny_bundle("sdxl").unet_config, 5, hint_widths=(16, 32)), "original",
                       tmp_path / "net")
    hint = tmp_path / "hint.png"
    image = Image.new("RGB", (32, 32), "white")
    ImageDraw.Draw(image).rectangle([6, 6, 24, 24], outline="black", width=3)
    image.save(hint)
    options = ["--model", str(base), "--seed", "2", "--sampler", "Euler", "--width", "32", "--height", "32",
               "--refiner", str(refiner), "--refiner-switch", "0.5", "--control", f"{net}:{hint}:0.8",
               "--control-module", "invert"]
    cells = tmp_path / "cells"
    code, _, err = run(["grid", "a castle", "--x", "steps=2,3", *options, "--out", str(tmp_path / "g.png"),
                        "--keep-cells", str(cells), "--no-progress"], capsys)
    assert code == 0, err
    single = tmp_path / "single.png"
    code, _, err = run(["txt2img", "a castle", "--steps", "3", *options, "--no-progress", "--out", str(single)], capsys)
    assert code == 0, err
    kept = cells / "001-x1-y0-z0.png"
    assert np.array_equal(pixels(kept), pixels(single))
    recorded = parse_parameters(read_parameters(kept))
    assert recorded == parse_parameters(read_parameters(single))
    assert "Refiner" in recorded and recorded["ControlNet 0"].startswith("Module: invert")


def test_grid_compiles_the_u_net_with_compile(tmp_path: Path, capsys, monkeypatch) -> None:
    """--compile reaches the load as txt2img's does (the compiled run itself is tested in test_compile.py)."""
    import sdlab.api

    asked = {}

    def load(*args, **kwargs):
        asked.update(kwargs)
        raise sdlab.api.RequestError("stopped before loading")

    monkeypatch.setattr(sdlab.api, "load", load)
    code, _, err = run(["grid", PROMPT, "--x", "steps=2,3", "--compile", "--out", str(tmp_path / "g.png")], capsys)
    assert code == 2 and "stopped before loading" in err and asked["compile"] is True


def test_the_hires_fix_with_init_is_refused(tmp_path: Path, capsys) -> None:
    """A grid with --init draws img2img cells without a hires fix (ComfyUI's img2img two-pass is sdlab img2img's):
    refused in one line that says so, not ignored, --hr-convention comfyui too."""
    init = tmp_path / "init.png"
    Image.new("RGB", (64, 64)).save(init)
    code, _, err = run(["grid", PROMPT, "--init", str(init), "--x", "steps=2,3", "--hr-scale", "2",
                        "--out", str(tmp_path / "g.png")], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "--hr-scale: a grid with --init draws img2img cells without a hires fix (ComfyUI's img2img two-pass: " \
           "sdlab img2img --hr-convention comfyui)" in err
    code, _, err = run(["grid", PROMPT, "--init", str(init), "--x", "steps=2,3", "--hr-convention", "comfyui",
                        "--hr-scale", "1.5", "--out", str(tmp_path / "g.png")], capsys)
    assert code == 2 and "--hr-scale, --hr-convention: a grid with --init draws img2img cells without" in err, err
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("axis", ["hr_denoise=0.3,0.5", "Hires steps=1,2", "Hires sampler=Euler,DDIM"])
def test_a_hires_axis_with_init_is_refused(tmp_path: Path, capsys, axis: str) -> None:
    """`hr_denoise` is the hires fix's denoise alone, never img2img's strength (A1111's Denoising axis is that:
    `denoise`); with --init, whose cells have no hires fix, a hires axis is refused in one line before any work."""
    init = tmp_path / "init.png"
    Image.new("RGB", (64, 64)).save(init)
    code, _, err = run(["grid", PROMPT, "--init", str(init), "--x", axis, "--model",
                        str(tmp_path / "not-loaded.safetensors"), "--out", str(tmp_path / "g.png")], capsys)
    name = field_named(axis.partition("=")[0]).name
    assert code == 2 and err == (f"sdlab: error: {name}: a grid with --init draws img2img cells without a hires fix "
                                 "(ComfyUI's img2img two-pass: sdlab img2img --hr-convention comfyui)\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["init.png"]
    cell = parse_axis("hr_denoise=0.3").apply({"prompt": "a", "init_image": Image.new("RGB", (8, 8))}, 0)
    assert cell["hr_denoise"] == 0.3 and "strength" not in cell


def test_grid_help_points_at_no_option_it_lacks() -> None:
    """The option texts txt2img and grid share (`cli/generate.py` `_add_*_flags`) speak of --from-png only where
    the command has it; the grid's description says it is not the grid's."""
    from sdlab.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    grid_texts = [action.help or "" for action in commands["grid"]._actions]
    assert not [text for text in grid_texts if "--from-png" in text or "--models-dir" in text]
    for command in ("txt2img", "img2img"):
        texts = {action.dest: action.help or "" for action in commands[command]._actions}
        assert all("--from-png" in texts[dest] for dest in ("refiner_switch", "clip_skip", "tiling", "lora_dir")), command
    assert "--from-png" in {action.dest: action.help for action in commands["img2img"]._actions}["strength"]


def test_a_size_axis_draws_each_cell_at_its_size_as_txt2img(tmp_path: Path, capsys) -> None:
    """A1111's Size axis (`apply_size`: "WIDTHxHEIGHT" into p.width / p.height), labelled `Size: <value>`."""
    cells = tmp_path / "cells"
    code, _, err = run(["grid", PROMPT, "--x", "Size=64x32, 32 x 64", "--steps", "2", "--seed", "7",
                        "--out", str(tmp_path / "g.png"), "--keep-cells", str(cells), "--no-progress"], capsys)
    assert code == 0, err
    for i, (width, height) in enumerate(((64, 32), (32, 64))):
        want = _txt2img(tmp_path, capsys, f"single-{i}.png", PROMPT, "--steps", "2", "--seed", "7", "--width",
                        str(width), "--height", str(height))
        assert np.array_equal(pixels(cells / f"{i:03d}-x{i}-y0-z0.png"), want)
    assert parse_axis("Size=64x32, 32 x 64").labels == ("Size: 64x32", "Size: 32 x 64")
    assert parse_parameters(read_parameters(tmp_path / "g.png"))["X Type"] == "Size"
