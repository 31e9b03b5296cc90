"""A ControlNet without a picture of its own in an img2img / inpaint request draws on the request's init picture,
by one rule (`pipeline.control.drawn_on_init`, A1111's ControlNet extension's `choose_input_image`: the init picture,
fitted by img2img's resize mode) through every door: the Python API (`ControlInput(file, None, ...)`), the CLI
(`--control FILE` / `FILE::STRENGTH[:START:END]`; under --loopback / --sd-upscale each pass's picture, each tile
batch's first tile) and the native server (`controls` entries without `image`). Each picture equals the native
server's job for the same request, 0 of 255 apart, with the same parameters; txt2img refuses such a control with
one message at each door."""

from __future__ import annotations

import re
from base64 import b64decode
from pathlib import Path

import httpx
import pytest

from cli_helpers import run
from controlnet_fixtures import diffusers_controlnet, write_layout
from init_picture_fixtures import (A1111_IMG2IMG, CLI, INIT, LOOPBACK, MASK, NATIVE, SD_UPSCALE, a1111_picture,
                                   a1111_units, api_drawn, apart, cli_drawn, cli_pictures, grid_last, listed_model,
                                   native_body, native_job, native_settings, parameters_text, same)
from server_fixtures import b64_png, png_picture, start_server

UNIT = {"model": "strong_lines", "module": "canny", "strength": 0.9, "threshold_a": 60, "threshold_b": 160}
UNIT_FLAGS = ["--control-module", "canny", "--control-threshold-a", "60", "--control-threshold-b", "160"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    import sdlab

    root = tmp_path_factory.mktemp("control-on-init")
    folder = root / "models" / "ControlNet"
    folder.mkdir(parents=True)
    pipe = sdlab.load()
    factor = pipe.bundle.vae_config.downsample_factor
    net = write_layout(diffusers_controlnet(pipe.bundle.unet_config, 3, hint_widths=(16, 32, 96, 256)[: factor.bit_length()],
                                           std=0.6), "diffusers-file", folder)       # strong: its hint shows
    net = net.rename(folder / "strong_lines.safetensors")
    INIT.save(root / "init.png")
    MASK.save(root / "mask.png")
    server = start_server(root / "outputs", "--models-dir", str(root / "models"))
    client = httpx.Client(base_url=server.url, timeout=300)
    yield {"client": client, "pipe": pipe, "net": net, "init": root / "init.png", "mask": root / "mask.png"}
    client.close()
    server.stop()


def _from_png(setup, png: Path, tmp_path: Path, capsys):
    """`sdlab img2img --from-png PNG` on the init picture with `--control FILE`: its picture."""
    (again,) = cli_pictures(["img2img", "--from-png", str(png), "--init", str(setup["init"]), "--control",
                             str(setup["net"]), "--threads", "1", "--no-progress",
                             "--out", str(tmp_path / "again.png")], capsys)
    return again


def _control_line(parameters: str) -> str:
    return re.search(r'ControlNet 0: "[^"]*"', parameters)[0]


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_the_api_and_the_cli_draw_a_control_without_a_picture_as_the_native_job(setup, tmp_path, capsys, mode):
    """Resize mode "crop": the control takes the init picture cropped to 64x64 and records its own resize mode
    (none given: the native default, Just Resize), as sd-webui-controlnet writes its unit's `resize_mode`; the
    same control given the init picture itself with resize mode "crop" is the same picture; without the
    control the picture differs (the control shows). Inpaint: an `inpaint` preprocessor's hint masked by the run's
    mask on the init picture."""
    from sdlab.pipeline.control import ControlInput

    unit = {**UNIT, "module": "inpaint"} if mode == "inpaint" else UNIT
    job, (served,) = native_job(setup["client"], native_body(mode, controls=[unit]))
    text = served.info["parameters"]
    assert "Resize Mode: Just Resize" in text and job["request"]["controls"][0]["resize_mode"] == "resize"

    module = unit["module"]
    thresholds = {"threshold_a": 60, "threshold_b": 160} if module == "canny" else {}
    result = api_drawn(setup["pipe"], mode, strength=0.7, resize_mode="crop",
                       controls=[ControlInput(setup["net"], None, 0.9, module=module, **thresholds)])
    same(result.images[0], served)
    assert _control_line(parameters_text(result)) == _control_line(text)

    flags = ["--control", f"{setup['net']}::0.9", *(UNIT_FLAGS if module == "canny" else ["--control-module", module])]
    (cli,) = cli_drawn(setup, tmp_path, capsys, mode, "--strength", "0.7", "--resize-mode", "crop", *flags)
    same(cli, served)
    assert cli.info["parameters"] == text

    given = api_drawn(setup["pipe"], mode, strength=0.7, resize_mode="crop",
                      controls=[ControlInput(setup["net"], INIT, 0.9, module=module, resize_mode="crop", **thresholds)])
    same(given.images[0], served)
    plain = api_drawn(setup["pipe"], mode, strength=0.7, resize_mode="crop")
    assert apart(plain.images[0], served) > 20


def test_a_bare_control_file_takes_the_init_picture_and_its_defaults(setup, tmp_path, capsys):
    """`--control FILE`: strength 1, all the steps, the init picture by Just Resize (img2img's default), as the
    native entry of the model alone; `--from-png` of the server's picture with `--control FILE` redraws it."""
    job, (served,) = native_job(setup["client"], {**NATIVE, "mode": "img2img", "init_image": b64_png(INIT),
                                                  "strength": 0.6, "controls": [{"model": "strong_lines"}]})
    assert "Resize Mode: Just Resize" in served.info["parameters"]
    (cli,) = cli_drawn(setup, tmp_path, capsys, "img2img", "--strength", "0.6", "--control", str(setup["net"]))
    same(cli, served)
    assert cli.info["parameters"] == served.info["parameters"]
    (tmp_path / "served.png").write_bytes(setup["client"].get(job["images"][0]).content)
    again = _from_png(setup, tmp_path / "served.png", tmp_path, capsys)
    same(again, served)
    assert again.info["parameters"] == served.info["parameters"]


@pytest.mark.parametrize("script, flags", [LOOPBACK, SD_UPSCALE], ids=["loopback", "sd-upscale"])
def test_cli_scripts_draw_a_control_without_a_picture_on_each_requests_own(setup, tmp_path, capsys, script, flags):
    """Each Loopback pass's control takes that pass's picture, each SD upscale tile batch its first tile, as the
    native job's script (tests/test_server_script_controls.py proves that one equal to the A1111 route's): the
    CLI's pictures equal the job's, and differ from the control drawn on the user's picture throughout."""
    body = {**NATIVE, "mode": "img2img", "init_image": b64_png(INIT.resize((64, 64))), "strength": 0.7, **script}
    _, served = native_job(setup["client"], {**body, "controls": [UNIT]})
    INIT.resize((64, 64)).save(tmp_path / "init64.png")
    drawn = cli_pictures(["img2img", *CLI, "--init", str(tmp_path / "init64.png"), "--strength", "0.7", *flags,
                          "--control", f"{setup['net']}::0.9", *UNIT_FLAGS, "--out", str(tmp_path / "cli.png")],
                         capsys)
    served = grid_last(served)
    assert len(drawn) == len(served)
    for got, want in zip(drawn, served):
        same(got, want)
    fixed = cli_pictures(["img2img", *CLI, "--init", str(tmp_path / "init64.png"), "--strength", "0.7", *flags,
                          "--control", f"{setup['net']}:{tmp_path / 'init64.png'}:0.9", *UNIT_FLAGS,
                          "--out", str(tmp_path / "fixed.png")], capsys)
    last = len(drawn) - 2 if len(drawn) > 1 else 0          # the last pass (before Loopback's grid); the upscale
    assert apart(fixed[last], drawn[last]) > 20


def test_txt2img_refuses_a_control_without_a_picture_at_every_door(setup, tmp_path, capsys):
    from sdlab.pipeline.control import ControlInput
    from sdlab.pipeline.request import RequestError

    message = ("control 0: needs an image; only an img2img or inpaint request's control may leave it out, to draw "
               "on the init picture")
    with pytest.raises(RequestError) as refused:
        setup["pipe"].txt2img("a red apple", steps=2, controls=[ControlInput(setup["net"])])
    assert str(refused.value) == message
    answer = setup["client"].post("/api/jobs", json={**NATIVE, "controls": [UNIT]})
    assert (answer.status_code, answer.json()["detail"]) == (422, message)
    models = setup["client"].get("/controlnet/model_list").json()["model_list"]
    unit = {"enabled": True, "model": next(name for name in models if "strong_lines" in name), "module": "canny"}
    answer = setup["client"].post("/sdapi/v1/txt2img", json={"prompt": "a red apple", "steps": 2, "width": 64,
                                                             "height": 64, **a1111_units(unit)})
    assert (answer.status_code, answer.json()["detail"]) == (422, message)
    for spec in (str(setup["net"]), f"{setup['net']}::0.8:0:0.5"):
        code, out, err = run(["txt2img", *CLI, "--control", spec, "--out", str(tmp_path / "t.png")], capsys)
        assert (code, out) == (2, "")
        assert err.strip().splitlines() == [f"sdlab: error: --control {spec!r}: {message}"]
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("spec, message", [
    ("{net}:0.8", "the image '0.8' does not exist; to leave the image out (the init picture) write FILE::0.8"),
    ("{net}::0:1", "expected FILE[:IMAGE[:STRENGTH[:START:END]]]"),
    (":{init}", "expected FILE[:IMAGE[:STRENGTH[:START:END]]]"),
    ("{net}::2:0.6:0.4", "need 0 <= start < end <= 1, got start 0.6, end 0.4"),
    ("{net}::-1", "strength must lie in [0, 10], got -1.0"),
    ("{dir}/missing.safetensors", "the ControlNet '{dir}/missing.safetensors' does not exist"),
])
def test_bad_control_specs_are_one_line(setup, tmp_path, capsys, spec, message):
    spec = spec.format(net=setup["net"], init=setup["init"], dir=tmp_path)
    code, out, err = run(["img2img", *CLI, "--init", str(setup["init"]), "--control", spec,
                          "--out", str(tmp_path / "x.png")], capsys)
    assert (code, out) == (2, "")
    [line] = err.strip().splitlines()
    assert line.startswith("sdlab: error: ") and line.endswith(message.format(dir=tmp_path)), line
    assert not (tmp_path / "x.png").exists()


def test_control_specs_without_an_image_parse_to_none(setup):
    """`FILE`, `FILE:` and `FILE::STRENGTH[:START:END]` leave the image out; `FILE:IMAGE...` keeps it (colons in
    paths: split where both sides exist)."""
    from sdlab.cli.generate import _parse_control

    net, init = str(setup["net"]), str(setup["init"])
    for spec, numbers in ((net, (1.0, 0.0, 1.0)), (f"{net}:", (1.0, 0.0, 1.0)), (f"{net}::0.8", (0.8, 0.0, 1.0)),
                          (f"{net}::0.8:0.2:0.9", (0.8, 0.2, 0.9))):
        control = _parse_control(spec, "diffusers")
        assert (control.model, control.image) == (net, None)
        assert (control.strength, control.start, control.end) == numbers
    control = _parse_control(f"{net}:{init}:0.5", "diffusers")
    assert control.image.size == INIT.size and control.strength == 0.5


def _drive_paths(setup, folder: Path, monkeypatch) -> None:
    """A relative folder ``C:`` in `folder` (the current folder), holding ``n/canny.safetensors`` and
    ``i/edges.png``: a Windows drive path's text names a file here too."""
    (folder / "C:" / "n").mkdir(parents=True)
    (folder / "C:" / "i").mkdir()
    (folder / "C:" / "n" / "canny.safetensors").write_bytes(Path(setup["net"]).read_bytes())
    INIT.save(folder / "C:" / "i" / "edges.png")
    monkeypatch.chdir(folder)


def test_a_windows_drive_colon_is_part_of_the_path(setup, tmp_path, monkeypatch):
    """``C:/...`` or ``C:\\...`` at the start of FILE or IMAGE keeps its colon: ``C:/n/net:0.8`` is FILE:IMAGE (an
    image '0.8'), as ``net:0.8`` is, not FILE::0.8."""
    from sdlab.cli.generate import UserError, _parse_control

    _drive_paths(setup, tmp_path, monkeypatch)
    net, edges = "C:/n/canny.safetensors", "C:/i/edges.png"
    for spec, numbers in ((f"{net}::0.8", (0.8, 0.0, 1.0)), (f"{net}:", (1.0, 0.0, 1.0)),
                          (f"{net}::0.8:0.1:0.9", (0.8, 0.1, 0.9)), (net, (1.0, 0.0, 1.0))):
        control = _parse_control(spec, "diffusers")
        assert (control.model, control.image) == (net, None), spec
        assert (control.strength, control.start, control.end) == numbers, spec
    for spec in (f"{net}:{edges}", f"{net}:{edges}:0.5:0:0.5"):
        control = _parse_control(spec, "diffusers")
        assert control.model == net and control.image.size == INIT.size, spec
    assert _parse_control(f"{net}:{edges}:0.5:0:0.5", "diffusers").end == 0.5
    for spec in (f"{net}:0.8", f"{setup['net']}:0.8"):
        with pytest.raises(UserError) as refused:
            _parse_control(spec, "diffusers")
        assert str(refused.value) == (f"--control {spec!r}: the image '0.8' does not exist; to leave the image "
                                      "out (the init picture) write FILE::0.8")
    for spec, missing in (("C:\\n\\gone.pth::0.8", "C:\\n\\gone.pth"), ("C:/n/gone.pth", "C:/n/gone.pth"),
                          (f"{net}:C:/i/gone.png:0.8", None)):
        with pytest.raises(UserError) as refused:
            _parse_control(spec, "diffusers")
        assert str(refused.value).endswith(f"the ControlNet {missing!r} does not exist" if missing else
                                           "control image 'C:/i/gone.png' does not exist"), str(refused.value)


@pytest.mark.parametrize("spec", ["{net}::", "{net}:::"])
def test_empty_fields_are_no_part_of_the_file(setup, tmp_path, spec):
    """``FILE::`` names FILE (no image, no numbers): a missing one is named without its colons."""
    from sdlab.cli.generate import UserError, _parse_control

    control = _parse_control(spec.format(net=setup["net"]), "diffusers")
    assert (control.model, control.image, control.strength) == (str(setup["net"]), None, 1.0)
    with pytest.raises(UserError) as refused:
        _parse_control(spec.format(net=tmp_path / "net.pth"), "diffusers")
    assert str(refused.value) == f"the ControlNet '{tmp_path / 'net.pth'}' does not exist"


def test_txt2img_says_a_number_in_the_image_place_needs_a_picture(setup, tmp_path, capsys):
    """txt2img refuses FILE::0.8, so ``FILE:0.8`` there says the control needs a picture, not FILE::0.8."""
    spec = f"{setup['net']}:0.8"
    code, out, err = run(["txt2img", *CLI, "--control", spec, "--out", str(tmp_path / "t.png")], capsys)
    assert (code, out) == (2, "")
    assert err.strip().splitlines() == [f"sdlab: error: --control {spec!r}: the image '0.8' does not exist; "
                                        "txt2img has no init picture, so the control needs one: FILE:IMAGE:0.8"]
    assert not list(tmp_path.iterdir())


def test_the_control_flag_shows_both_forms(capsys):
    """--help's metavar nests the optional fields (FILE:0.8 is no strength) and names FILE::STRENGTH."""
    with pytest.raises(SystemExit):
        run(["img2img", "--help"], capsys)
    text = " ".join(capsys.readouterr().out.split())
    assert "--control FILE[:IMAGE[:STRENGTH[:START:END]]] | FILE::STRENGTH..." in text
    assert "not FILE:STRENGTH" in text


def test_a_grids_img2img_cells_draw_a_control_without_a_picture_on_the_init_picture(setup, tmp_path, capsys):
    """`sdlab grid --init` with `--control FILE::STRENGTH`: each cell is the `sdlab img2img` of its settings."""
    flags = ["--init", str(setup["init"]), "--strength", "0.7", "--control", f"{setup['net']}::0.9"]
    code, out, err = run(["grid", *CLI, *flags, "--x", "CFG Scale=3,9", "--keep-cells", str(tmp_path / "cells"),
                          "--out", str(tmp_path / "grid.png")], capsys)
    assert code == 0, err
    cell = png_picture((tmp_path / "cells" / "001-x1-y0-z0.png").read_bytes())
    (alone,) = cli_drawn(setup, tmp_path, capsys, "img2img", "--strength", "0.7", "--cfg", "9",
                    "--control", f"{setup['net']}::0.9")
    same(cell, alone)
    assert "ControlNet 0: " in cell.info["parameters"]


def test_a1111_unit_without_a_picture_records_its_own_resize_mode_and_reads_back_the_same_picture(
        setup, tmp_path, capsys):
    """sd-webui-controlnet writes a unit's own `resize_mode` (scripts/infotext.py `serialize_unit`, @ 1e6f689, of
    the units `get_enabled_units` copies before `choose_input_image` hands a unit without an image img2img's
    resize mode: scripts/controlnet.py), and draws that unit on the init picture by img2img's mode. So does the
    A1111 route: a "Resize and Fill" unit in a Just resize img2img records "Resize Mode: Resize and Fill" and draws
    as the unit given the init picture with Just Resize; the line read back (`/api/parameters`, the web UI's
    Reuse of a dropped picture; `--from-png` with `--control FILE`) draws the same picture, 0/255."""
    client = setup["client"]
    model = listed_model(client, "strong_lines")
    unit = {"enabled": True, "model": model, "module": "canny", "weight": 0.9, "threshold_a": 60,
            "threshold_b": 160, "resize_mode": "Resize and Fill"}
    body = {**A1111_IMG2IMG, "denoising_strength": 0.7, "resize_mode": 0}
    drawn = client.post("/sdapi/v1/img2img", json={**body, **a1111_units(unit)})
    picture = a1111_picture(drawn)
    line = _control_line(picture.info["parameters"])
    assert "Resize Mode: Resize and Fill" in line, line
    given = client.post("/sdapi/v1/img2img", json={**body, **a1111_units({**unit, "image": b64_png(INIT),
                                                                     "resize_mode": "Just Resize"})})
    same(a1111_picture(given), picture)
    filled = client.post("/sdapi/v1/img2img", json={**body, **a1111_units({**unit, "image": b64_png(INIT)})})
    assert apart(a1111_picture(filled), picture) > 0

    native = native_settings(client, drawn.json()["images"][0])
    assert native["controls"][0]["resize_mode"] == "fill", native["controls"]
    _, (redrawn,) = native_job(client, {**native, "mode": "img2img", "init_image": b64_png(INIT),
                                        "resize_mode": "resize"})
    same(redrawn, picture)
    assert _control_line(redrawn.info["parameters"]) == line

    (tmp_path / "drawn.png").write_bytes(b64decode(drawn.json()["images"][0]))
    again = _from_png(setup, tmp_path / "drawn.png", tmp_path, capsys)
    same(again, picture)
    assert _control_line(again.info["parameters"]) == line
