"""`sdlab grid`'s model axes (A1111 1.10 scripts/xyz_grid.py: Checkpoint name, VAE, Refiner checkpoint, Refiner
switch at): every cell is the picture `sdlab txt2img --model M [--vae V | --no-sidecar-vae] [--refiner R
--refiner-switch S]` draws with the grid's other options, pixel-equal (max diff 0) and with the same parameters;
each checkpoint loads once, also where A1111's order alternates two models of equal cost; every model is checked
before any loads, so a bad one is one error line with nothing loaded, drawn or written.

Two tiny SD1 checkpoints (alpha with a sidecar VAE), a VAE file, and two tiny SDXL bases with a refiner."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file

from cli_helpers import pixels, run
from sdlab.pipeline.grid import Plot, parse_axis
from sdlab.pipeline.png_info import parse_parameters, read_parameters

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a red apple"
SETTINGS = ["--steps", "2", "--seed", "7", "--sampler", "Euler", "--width", "32", "--height", "32"]


def _vae_file(path: Path, seed: int) -> None:
    from bundle_fixtures import randomize_, tiny_bundle

    state = randomize_(tiny_bundle("sd1", seed=9).vae, seed).state_dict()
    save_file({key: value.contiguous() for key, value in state.items()}, str(path))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    from bundle_fixtures import tiny_bundle, write_original

    folder = tmp_path_factory.mktemp("grid-models")
    write_original(tiny_bundle("sd1", seed=3), folder / "alpha.safetensors", junk=False)
    write_original(tiny_bundle("sd1", seed=4), folder / "beta.safetensors", junk=False)
    _vae_file(folder / "alpha.vae.safetensors", 99)                  # alpha's sidecar (A1111's Automatic)
    _vae_file(folder / "blue.safetensors", 97)
    write_original(tiny_bundle("sdxl", seed=0), folder / "base1.safetensors", junk=False)
    write_original(tiny_bundle("sdxl", seed=1), folder / "base2.safetensors", junk=False)
    write_original(tiny_bundle("sdxl-refiner", seed=5), folder / "refiner.safetensors", junk=False)
    return folder


@pytest.fixture
def loads(monkeypatch) -> list[str]:
    """The checkpoint files loaded (`load_bundle`: a model, a refiner), by name, in order."""
    import sdlab.api

    loaded, load_bundle = [], sdlab.api.load_bundle

    def recording(path, **kwargs):
        loaded.append(Path(path).name)
        return load_bundle(path, **kwargs)

    monkeypatch.setattr(sdlab.api, "load_bundle", recording)
    return loaded


def _txt2img(capsys, out: Path, *options: str) -> tuple[np.ndarray, dict]:
    code, _, err = run(["txt2img", PROMPT, *SETTINGS, *options, "--no-progress", "--out", str(out)], capsys)
    assert code == 0, err
    return pixels(out), parse_parameters(read_parameters(out))


def _grid(capsys, tmp_path: Path, *options: str) -> tuple[Path, Path]:
    out, cells = tmp_path / "grid.png", tmp_path / "cells"
    code, _, err = run(["grid", PROMPT, *SETTINGS, *options, "--out", str(out), "--keep-cells", str(cells),
                        "--no-progress"], capsys)
    assert code == 0, err
    return out, cells


def _cell(cells: Path, number: int, index: tuple[int, int, int]) -> tuple[np.ndarray, dict]:
    path = cells / f"{number:03d}-x{index[0]}-y{index[1]}-z{index[2]}.png"
    return pixels(path), parse_parameters(read_parameters(path))


def test_checkpoint_cells_are_txt2img_with_that_model(models: Path, tmp_path: Path, capsys, loads) -> None:
    """X Checkpoint name (beta, alpha, which draws with its sidecar VAE as txt2img does) x Y CFG Scale: each cell
    is txt2img --model M --cfg C, parameters too (Model, Model hash, VAE); each model loads once; the labels are
    the file names (A1111's `format_remove_path`), the grid's parameters its first cell's with X Type / X Values as
    typed, the sheet the cells laid out as `Plot.sheet`."""
    alpha, beta = models / "alpha.safetensors", models / "beta.safetensors"
    axis = f"Checkpoint name={beta},{alpha}"
    out, cells = _grid(capsys, tmp_path, "--x", axis, "--y", "cfg=3,5")
    assert loads == ["beta.safetensors", "alpha.safetensors"]
    pictures = {}
    for j, cfg in enumerate(("3", "5")):
        for i, model in enumerate((beta, alpha)):
            want, text = _txt2img(capsys, tmp_path / f"single-{i}{j}.png", "--model", str(model), "--cfg", cfg)
            got, recorded = _cell(cells, 2 * j + i, (i, j, 0))
            assert np.abs(got - want).max() == 0, (model.name, cfg)
            assert recorded == text
            pictures[(i, j, 0)] = got
    assert _cell(cells, 1, (1, 0, 0))[1]["VAE"] == "alpha.vae.safetensors"
    assert not np.array_equal(pictures[(0, 0, 0)], pictures[(1, 0, 0)])
    plot = Plot(parse_axis(axis), parse_axis("cfg=3,5"))
    assert plot.x.labels == ("beta.safetensors", "alpha.safetensors")
    assert parse_axis("model=models/sdxl-base/,a.ckpt").labels == ("sdxl-base", "a.ckpt")       # a diffusers folder
    sheet = plot.sheet({index: Image.fromarray(picture.astype(np.uint8)) for index, picture in pictures.items()})
    assert np.array_equal(pixels(out), np.asarray(sheet, dtype=np.int16))
    grid = parse_parameters(read_parameters(out))
    assert (grid["X Type"], grid["X Values"], grid["Model"], grid["CFG scale"]) == (
        "Checkpoint name", f"{beta},{alpha}", "beta", 3.0)


def test_a_checkpoint_named_by_its_a1111_title_is_its_file(models: Path, tmp_path: Path, capsys, loads) -> None:
    """A Checkpoint name as A1111's X/Y/Z plot lists it, 'beta.safetensors [0123456789]' (its title: the file and
    a short hash), draws with the file, as A1111's get_closet_checkpoint_match strips the checksum; the label and
    X Values keep what was typed."""
    beta = models / "beta.safetensors"
    axis = f"Checkpoint name={beta} [0123456789]"
    out, cells = _grid(capsys, tmp_path, "--x", axis)
    assert loads == ["beta.safetensors"]
    want, text = _txt2img(capsys, tmp_path / "single.png", "--model", str(beta))
    got, recorded = _cell(cells, 0, (0, 0, 0))
    assert np.abs(got - want).max() == 0 and recorded == text
    assert parse_parameters(read_parameters(out))["X Values"] == f"{beta} [0123456789]"


def test_vae_cells_are_txt2img_with_that_vae(models: Path, tmp_path: Path, capsys, loads) -> None:
    """VAE None (the checkpoint's own: --no-sidecar-vae), automatic (txt2img's default: alpha's sidecar) and a VAE
    file (--vae): each cell txt2img's picture and parameters, labelled `VAE: <value>` (a file by its name, as
    A1111's); alpha loads once (the other VAEs are read alone)."""
    alpha, blue = models / "alpha.safetensors", models / "blue.safetensors"
    _, cells = _grid(capsys, tmp_path, "--model", str(alpha), "--x", f"VAE=None, automatic, {blue}")
    assert loads == ["alpha.safetensors"]
    flags = (["--no-sidecar-vae"], [], ["--vae", str(blue)])
    drawn = []
    for i, options in enumerate(flags):
        want, text = _txt2img(capsys, tmp_path / f"single-{i}.png", "--model", str(alpha), *options)
        got, recorded = _cell(cells, i, (i, 0, 0))
        assert np.abs(got - want).max() == 0, options
        assert recorded == text
        drawn.append(got)
    assert "VAE" not in _cell(cells, 0, (0, 0, 0))[1] and _cell(cells, 2, (2, 0, 0))[1]["VAE"] == "blue.safetensors"
    assert not np.array_equal(drawn[0], drawn[1]) and not np.array_equal(drawn[1], drawn[2])
    assert parse_axis(f"VAE=None, automatic, {blue}").labels == ("VAE: None", "VAE: automatic",
                                                                 "VAE: blue.safetensors")     # A1111's: file names


def test_refiner_cells_are_txt2img_with_that_refiner_and_switch(models: Path, tmp_path: Path, capsys,
                                                                loads) -> None:
    """X Refiner switch at x Y Refiner checkpoint (None: no refiner) on an SDXL base: each cell txt2img --refiner R
    --refiner-switch S (or none), parameters too; the base and the refiner load once."""
    base, refiner = models / "base1.safetensors", models / "refiner.safetensors"
    _, cells = _grid(capsys, tmp_path, "--model", str(base), "--x", "Refiner switch at=0.5,0.8",
                     "--y", f"Refiner checkpoint=None,{refiner}")
    assert loads == ["base1.safetensors", "refiner.safetensors"]
    for j, with_refiner in enumerate(([], ["--refiner", str(refiner)])):
        for i, switch in enumerate(("0.5", "0.8")):
            want, text = _txt2img(capsys, tmp_path / f"single-{i}{j}.png", "--model", str(base), *with_refiner,
                                  "--refiner-switch", switch)
            got, recorded = _cell(cells, 2 * j + i, (i, j, 0))
            assert np.abs(got - want).max() == 0, (switch, with_refiner)
            assert recorded == text
    assert _cell(cells, 3, (1, 1, 0))[1]["Refiner"].startswith("refiner")
    assert parse_axis(f"Refiner checkpoint=None,{refiner}").labels == ("None", "refiner.safetensors")


def test_each_model_loads_once_where_a1111s_order_alternates_them(models: Path, tmp_path: Path, capsys,
                                                                  loads) -> None:
    """Checkpoint name and Refiner checkpoint cost the same (1.0), so A1111's order is Y, then X fastest: base1,
    base2, base1, base2. The grid draws each checkpoint's cells together (base1 with and without the refiner, then
    base2): each base loads once; the kept cells keep the plot's numbering and are txt2img's pictures."""
    base1, base2, refiner = (models / f"{name}.safetensors" for name in ("base1", "base2", "refiner"))
    x, y = f"Checkpoint name={base1},{base2}", f"Refiner checkpoint=None,{refiner}"
    assert Plot(parse_axis(x), parse_axis(y)).drawing_order() == [(0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0)]
    _, cells = _grid(capsys, tmp_path, "--x", x, "--y", y)
    assert loads == ["base1.safetensors", "refiner.safetensors", "base2.safetensors", "refiner.safetensors"]
    want, text = _txt2img(capsys, tmp_path / "single.png", "--model", str(base2), "--refiner", str(refiner))
    got, recorded = _cell(cells, 3, (1, 1, 0))
    assert np.abs(got - want).max() == 0 and recorded == text
    want, text = _txt2img(capsys, tmp_path / "single-plain.png", "--model", str(base1))
    got, recorded = _cell(cells, 0, (0, 0, 0))
    assert np.abs(got - want).max() == 0 and recorded == text


def test_each_checkpoint_finds_its_loras_as_txt2img_with_that_model(models: Path, tmp_path: Path, capsys) -> None:
    """Two A1111 trees (models/Stable-diffusion/M, models/Lora/ink), each with its own ink LoRA: a Checkpoint name
    cell of `<lora:ink:1>` and `--lora ink` (by name) merges and records the ink beside its checkpoint, as txt2img
    --model M does, with or without the grid's --model (from either tree)."""
    import shutil

    from test_prompt_loras import _lora_file, _small_lora

    checkpoints = []
    for tree, (name, seed) in enumerate((("alpha", 0), ("beta", 1))):
        folder = tmp_path / f"webui{tree}" / "models"
        (folder / "Stable-diffusion").mkdir(parents=True)
        checkpoints.append(shutil.copy(models / f"{name}.safetensors", folder / "Stable-diffusion"))
        _lora_file(folder / "Lora" / "ink.safetensors", _small_lora(seed))
        _lora_file(folder / "Lora" / "tag.safetensors", _small_lora(seed + 2))
    prompt, axis = "a red apple <lora:tag:0.8>", f"Checkpoint name={checkpoints[0]},{checkpoints[1]}"
    drawn = {}
    for model in checkpoints:
        out = tmp_path / f"single-{Path(model).stem}.png"
        code, _, err = run(["txt2img", prompt, *SETTINGS, "--lora", "ink", "--model", model, "--no-progress",
                            "--out", str(out)], capsys)
        assert code == 0, err
        drawn[model] = pixels(out), parse_parameters(read_parameters(out))
    assert drawn[checkpoints[0]][1]["Lora hashes"] != drawn[checkpoints[1]][1]["Lora hashes"]
    for given in ([], ["--model", checkpoints[1]]):
        cells = tmp_path / f"cells{len(given)}"
        code, _, err = run(["grid", prompt, *SETTINGS, "--lora", "ink", *given, "--x", axis, "--out",
                            str(tmp_path / "grid.png"), "--keep-cells", str(cells), "--no-progress"], capsys)
        assert code == 0, err
        for i, model in enumerate(checkpoints):
            got, recorded = _cell(cells, i, (i, 0, 0))
            want, text = drawn[model]
            assert np.abs(got - want).max() == 0 and recorded == text, (given, model)


@pytest.mark.parametrize("axes, options, message", [
    (["--x", "Checkpoint name={alpha},{models}/gone.safetensors"], [], "gone.safetensors: no such file"),
    (["--x", "VAE=None,{models}/notes.txt"], ["--model", "{alpha}"], "notes.txt"),
    (["--x", "Refiner checkpoint=None,{alpha}"], ["--model", "{base}"], "the refiner"),
    (["--x", "Refiner switch at=0.5,0.8"], ["--model", "{base}"], "a Refiner switch at axis"),
    (["--x", "Refiner checkpoint={refiner}"], ["--model", "{base}", "--hr-scale", "2"],
     "the hires fix does not run with an SDXL refiner"),
    (["--x", "Checkpoint name={alpha},{base}"], ["--clip-skip", "2"], "clip skip 2 is too large"),
    (["--x", "Checkpoint name={alpha},{base}"], ["--lora", "{lora}"], "a LoRA for another model"),
    (["--x", "Checkpoint name={alpha},{base}", "--y", "Prompt S/R=apple,apple <lora:ink:1>"],
     ["--lora-dir", "{loras}"], "LoRA ink: "),
])
def test_a_bad_model_fails_before_any_loads(models: Path, tmp_path: Path, tmp_path_factory, capsys, loads,
                                            axes: list[str], options: list[str], message: str) -> None:
    """A missing checkpoint, a file that is no VAE, a refiner whose latent space is not its base's (an SD1 model
    for an SDXL base), a Refiner switch at axis with no refiner, a refiner with the hires fix; and the checks of a
    loaded model on a later checkpoint (clip skip past the tiny SDXL's layers, an SD1 LoRA by --lora or a cell's
    tag on it), made without its weights: one error line, nothing loaded, drawn or written."""
    from test_prompt_loras import _lora_file, _small_lora

    (models / "notes.txt").write_text("not a VAE")
    lora = _lora_file(tmp_path_factory.mktemp("loras") / "ink.safetensors", _small_lora(0))
    names = {"models": models, "alpha": models / "alpha.safetensors", "base": models / "base1.safetensors",
             "refiner": models / "refiner.safetensors", "lora": lora, "loras": lora.parent}
    given = [text.format(**names) for text in (*axes, *options)]
    code, _, err = run(["grid", PROMPT, *SETTINGS, *given, "--out", str(tmp_path / "g.png"), "--no-progress"],
                       capsys)
    assert code == 2 and message in err and err.count("\n") == 1 and err.startswith("sdlab: error: "), err
    assert loads == [] and list(tmp_path.iterdir()) == []
