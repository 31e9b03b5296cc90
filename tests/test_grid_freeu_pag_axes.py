"""X/Y/Z axes for FreeU and PAG: sd-webui-freeu's names for FreeU's factors ("[FreeU] Stage 1 Backbone Scale" ...,
ljleb/sd-webui-freeu lib_free_u/xyz_grid.py; earlier "[FreeU] Block 1 ..."), sdlab's own for FreeU's step window
and the PAG scale (Forge's built-in FreeU / PAG scripts add none). Each cell is the request with the axis's value
set, drawn as that single request: `sdlab grid`, the A1111 route's X/Y/Z plot (through Forge's FreeU Integrated /
PerturbedAttentionGuidance Integrated args) and a native X/Y/Z job (from the job's own FreeU and PAG).
"""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from sdlab.models.freeu import FreeU
from sdlab.pipeline.grid import GridError, Plot, parse_axis
from sdlab.server.a1111_scripts import axis_types, cell_bodies, xyz_args
from server_fixtures import sdlab_server, wait_for_job  # noqa: F401  (a session fixture)

A1111 = {"prompt": "a red apple", "negative_prompt": "blurry", "steps": 2, "seed": 7, "cfg_scale": 5.0,
         "sampler_name": "Euler", "width": 64, "height": 64}
NATIVE = {"prompt": "a red apple", "negative_prompt": "blurry", "steps": 2, "seed": 7, "cfg_scale": 5.0,
          "sampler": "Euler", "img2img_convention": "a1111", "width": 64, "height": 64}


def _index(label: str, mode: str = "txt2img") -> int:
    return [axis.label for axis in axis_types(mode)].index(label)


def _script_args(x: tuple[str, str], y: tuple[str, str] = ("Nothing", "")) -> list:
    """A1111 1.10's X/Y/Z `script_args`: X and Y by label, sub-images included (the grid, then each cell)."""
    return [_index(x[0]), x[1], [], _index(y[0]), y[1], [], 0, "", [], True, True]


# ------------------------------------------------------------------------------------------------------
# the grid's axes


def test_the_axes_set_the_cells_freeu_and_pag():
    plot = Plot(parse_axis("[FreeU] Stage 1 Backbone Scale=1.1,1.5"), parse_axis("PAG scale=0,3"),
                parse_axis("FreeU end=0.5"))
    cells = dict(plot.cells({"prompt": "x"}))
    assert cells[(1, 1, 0)]["freeu"] == FreeU(b1=1.5, end=0.5) and cells[(1, 1, 0)]["pag_scale"] == 3.0
    assert cells[(0, 0, 0)]["freeu"] == FreeU(b1=1.1, end=0.5) and cells[(0, 0, 0)]["pag_scale"] == 0.0
    assert plot.x.labels == ("[FreeU] Stage 1 Backbone Scale: 1.1", "[FreeU] Stage 1 Backbone Scale: 1.5")
    assert plot.y.labels == ("PAG scale: 0.0", "PAG scale: 3.0")
    # on the request's own FreeU (the native API's mapping of its fields too), which Enabled False turns off
    own = {"freeu": {"b1": 1.2, "b2": 1.3, "s1": 0.8, "s2": 0.3, "version": 1, "convention": "diffusers"}}
    skips = dict(Plot(parse_axis("[FreeU] Stage 2 Skip Scale=0.5"), parse_axis("[FreeU] Enabled=True,False"))
                 .cells(own))
    assert skips[(0, 0, 0)]["freeu"] == FreeU(1.2, 1.3, 0.8, 0.5, 1, "diffusers") and skips[(0, 1, 0)]["freeu"] is None


@pytest.mark.parametrize("name, field", [
    ("[FreeU] Stage 1 Backbone Scale", "freeu_b1"), ("[FreeU] Stage 2 Backbone Scale", "freeu_b2"),
    ("[FreeU] Stage 1 Skip Scale", "freeu_s1"), ("[FreeU] Stage 2 Skip Scale", "freeu_s2"),
    ("[FreeU] Block 1 Backbone Scale", "freeu_b1"), ("[FreeU] Block 2 Skip Scale", "freeu_s2"),  # earlier names
    ("[FreeU] Enabled", "freeu_enabled"), ("freeu", "freeu_enabled"), ("FreeU start", "freeu_start"),
    ("freeu_end", "freeu_end"), ("PAG scale", "pag_scale"), ("pag", "pag_scale"),
])
def test_the_axes_are_found_by_name(name, field):
    value = "True" if field == "freeu_enabled" else "0.5"
    assert parse_axis(f"{name}={value}").field.name == field


@pytest.mark.parametrize("spec, words", [
    ("[FreeU] Stage 1 Backbone Scale=11", "must lie in [-10, 10]"),
    ("FreeU start=1.5", "must lie in [0, 1]"),
    ("PAG scale=-1", "PAG scale must lie in [0, 100]"),
    ("[FreeU] Enabled=maybe", "'maybe' is not True, False, 1, 0 or None"),
    ("[FreeU] Enabled=none", "'none' is not True, False, 1, 0 or None"),   # the extension's None: that case alone
])
def test_a_bad_value_is_a_grid_error(spec, words):
    with pytest.raises(GridError, match=words.replace("[", r"\[").replace("]", r"\]")):
        parse_axis(spec)


def test_enabled_reads_values_as_the_extension_does():
    """[FreeU] Enabled's values as sd-webui-freeu's `str_to_bool` (lib_free_u/xyz_grid.py) reads them: true / 1,
    false / 0 in any case, "None" and "" None, which its FreeU draws off (`if not global_state.instance.enable`)."""

    def str_to_bool(string):    # ljleb/sd-webui-freeu lib_free_u/xyz_grid.py (master, 1a8be97), transcribed
        string = str(string)
        if string in ["None", ""]:
            return None
        elif string.lower() in ["true", "1"]:
            return True
        elif string.lower() in ["false", "0"]:
            return False
        else:
            raise ValueError(f"Could not convert string to boolean: {string}")

    words = ["True", "true", "TRUE", "1", "False", "false", "0", "None", ""]
    axis = parse_axis("[FreeU] Enabled=" + ",".join(words))
    assert axis.values == tuple(str_to_bool(word) for word in words)
    cells = dict(Plot(axis).cells({"prompt": "x"}))
    assert [cells[(i, 0, 0)]["freeu"] is not None for i in range(len(words))] == [bool(str_to_bool(w)) for w in words]


def test_a_cell_at_odds_with_the_requests_own_freeu_names_the_cell():
    """An axis value that makes the cell's FreeU wrong with the request's own (an end before its start) is a
    GridError naming the cell and the axis, not the request's FreeU."""
    with pytest.raises(GridError, match=r"^the grid cell FreeU end: 0.2: FreeU start \(0.5\) must not come after"):
        Plot(parse_axis("FreeU end=0.7,0.2")).cells({"prompt": "x", "freeu": {"start": 0.5}})


def test_a1111_cells_carry_forges_script_args():
    """The A1111 route's cells: FreeU as Forge's FreeU Integrated args [enabled, b1, b2, s1, s2, start, end] from
    the request's (under the title it was sent by), PAG as PerturbedAttentionGuidance Integrated's [enabled, scale]."""
    from sdlab.server.a1111 import Txt2ImgIn
    from sdlab.server.a1111_scripts import xyz_plot

    body = Txt2ImgIn(**A1111, alwayson_scripts={"FreeU Integrated": {"args": [True, 1.2, 1.3, 0.8, 0.3]}})
    args = xyz_args(_script_args(("[FreeU] Stage 1 Skip Scale", "0.5,0.7"), ("PAG scale", "2")))
    cells = dict(cell_bodies(body, xyz_plot(args, "txt2img"), args, "txt2img"))
    assert cells[(1, 0, 0)].alwayson_scripts == {
        "FreeU Integrated": {"args": [True, 1.2, 1.3, 0.7, 0.3, 0.0, 1.0]},
        "perturbedattentionguidance integrated": {"args": [True, 2.0]}}
    enabled = xyz_args([_index("[FreeU] Enabled"), "", ["False"]])      # an axis with choices: the dropdown
    off = dict(cell_bodies(body, xyz_plot(enabled, "txt2img"), enabled, "txt2img"))
    assert off[(0, 0, 0)].alwayson_scripts == {"FreeU Integrated": {"args": [False]}}


def test_sdlab_grid_cells_are_single_txt2img_runs(tmp_path, capsys):
    """`sdlab grid` (the shipped model, 64 px, 2 steps): X [FreeU] Stage 2 Backbone Scale on the command's --freeu,
    Y PAG scale: each kept cell pixel-equal to `sdlab txt2img` with that --freeu / --pag-scale."""
    from cli_helpers import pixels, run

    common = ["a red apple", "--steps", "2", "--seed", "7", "--cfg", "4", "--no-progress"]
    cells = tmp_path / "cells"
    code, _, err = run(["grid", *common, "--freeu", "1.2,1.3,0.8,0.3", "--freeu-version", "1",
                        "--x", "[FreeU] Stage 2 Backbone Scale=1,1.6", "--y", "PAG scale=3",
                        "--out", str(tmp_path / "grid.png"), "--keep-cells", str(cells)], capsys)
    assert code == 0, err
    drawn = {}
    for j, pag in enumerate(("3",)):
        for i, b2 in enumerate(("1", "1.6")):
            out = tmp_path / f"single-{i}{j}.png"
            code, _, err = run(["txt2img", *common, "--freeu", f"1.2,{b2},0.8,0.3", "--freeu-version", "1",
                                "--pag-scale", pag, "--out", str(out)], capsys)
            assert code == 0, err
            drawn[(i, j)] = pixels(out)
            assert np.array_equal(pixels(cells / f"{2 * j + i:03d}-x{i}-y{j}-z0.png"), drawn[(i, j)]), (b2, pag)
    assert not np.array_equal(drawn[(0, 0)], drawn[(1, 0)])


# ------------------------------------------------------------------------------------------------------
# drawn through the servers


@pytest.fixture
def client(sdlab_server):
    with httpx.Client(base_url=sdlab_server.url, timeout=300) as c:
        yield c


def _pictures(answer: httpx.Response) -> list[np.ndarray]:
    assert answer.status_code == 200, answer.text
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB")) for b in answer.json()["images"]]


def test_a1111_plot_cells_are_the_single_requests_with_forges_scripts(client):
    """X [FreeU] Stage 2 Backbone Scale 1, 1.6 on no FreeU (FreeU's defaults for the rest), Y PAG scale 0, 3: each
    cell pixel-equal to the single txt2img with those Forge script args, its infotext theirs."""
    args = _script_args(("[FreeU] Stage 2 Backbone Scale", "1,1.6"), ("PAG scale", "0,3"))
    answer = client.post("/sdapi/v1/txt2img", json={**A1111, "script_name": "X/Y/Z plot", "script_args": args})
    pictures, info = _pictures(answer), json.loads(answer.json()["info"])
    assert len(pictures) == 5
    for n, (b2, pag) in enumerate((b2, pag) for pag in (0.0, 3.0) for b2 in (1.0, 1.6)):
        single = client.post("/sdapi/v1/txt2img", json={**A1111, "alwayson_scripts": {
            "FreeU Integrated": {"args": [True, 1.3, b2, 0.9, 0.2, 0.0, 1.0]},
            "PerturbedAttentionGuidance Integrated": {"args": [True, pag]}}})
        assert np.array_equal(pictures[1 + n], _pictures(single)[0]), (b2, pag)
        assert info["infotexts"][1 + n] == json.loads(single.json()["info"])["infotexts"][0]
        assert f"freeu_b2: {b2:g}" in info["infotexts"][1 + n]
    assert not np.array_equal(pictures[1], pictures[2]) and not np.array_equal(pictures[1], pictures[3])
    assert "X Type: [FreeU] Stage 2 Backbone Scale" in info["infotexts"][0]


def test_an_a1111_cell_at_odds_with_the_requests_freeu_is_a_422_naming_the_cell(client):
    """FreeU end 0.2 on FreeU Integrated args starting at 0.5: a 422 naming the cell, not the request's args."""
    answer = client.post("/sdapi/v1/txt2img", json={
        **A1111, "script_name": "X/Y/Z plot", "script_args": _script_args(("FreeU end", "0.2")),
        "alwayson_scripts": {"FreeU Integrated": {"args": [True, 1.2, 1.3, 0.8, 0.3, 0.5, 1.0]}}})
    assert answer.status_code == 422
    assert "the grid cell FreeU end: 0.2: FreeU start (0.5) must not come after its end (0.2)" in answer.text
    assert "alwayson_scripts" not in answer.text


def test_a_native_plot_starts_from_the_jobs_freeu_and_pag(client):
    """A native X/Y/Z job with FreeU version 1 (diffusers' blocks) and PAG 2: a Stage 2 Skip Scale axis draws the
    job's setting with that factor changed, its version and convention kept (Forge's args carry neither), and
    its PAG; each cell pixel-equal to the native job with that setting."""
    own = {"b1": 1.2, "b2": 1.3, "s1": 0.8, "s2": 0.3, "version": 1, "convention": "diffusers"}
    job = {**NATIVE, "freeu": own, "pag_scale": 2.0}
    plot = client.post("/api/jobs", json={**job, "script_name": "X/Y/Z plot",
                                          "script_args": _script_args(("[FreeU] Stage 2 Skip Scale", "0.5,0.9"))})
    assert plot.status_code == 202, plot.text
    drawn = wait_for_job(client, plot.json()["id"], 300)
    assert drawn["status"] == "done", drawn
    cells = [np.asarray(Image.open(io.BytesIO(client.get(url).content)).convert("RGB")) for url in drawn["images"]]
    for n, s2 in enumerate((0.5, 0.9)):
        single = client.post("/api/jobs", json={**job, "freeu": {**own, "s2": s2}})
        assert single.status_code == 202, single.text
        done = wait_for_job(client, single.json()["id"], 300)
        picture = np.asarray(Image.open(io.BytesIO(client.get(done["images"][0]).content)).convert("RGB"))
        assert np.array_equal(cells[1 + n], picture), s2
        assert f"freeu_s2: {s2:g}" in drawn["infotexts"][1 + n] and "FreeU version: 1" in drawn["infotexts"][1 + n]
        assert "PerturbedAttentionGuidance_scale: 2" in drawn["infotexts"][1 + n]
