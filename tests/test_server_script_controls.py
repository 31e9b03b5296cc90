"""Selectable scripts draw with the request's ControlNet units and IP-Adapters, as A1111 applies its always-on units
to every picture a script draws: on the native job API (`controls` / `ip_adapters` with `script_name`) and on the
A1111 route (`alwayson_scripts.controlnet` with `script_name`), each picture of the script is, pixel for pixel, the
plain request with that picture's settings and the same units: an X/Y/Z plot's cell over CFG, a Prompts from file
line at its own size (the hint drawn at that size), a Loopback pass (the unit's picture stays the user's)."""

from __future__ import annotations

import base64
import io
import json
import re

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw

from controlnet_fixtures import diffusers_controlnet, write_layout
from ip_adapter_fixtures import SAMPLE_PICTURE, ip_adapter_state, write_image_encoder, write_ip_adapter
from server_fixtures import b64_png, drawn_pictures, file_b64, start_server

NATIVE = {"prompt": "a red apple", "negative_prompt": "blurry", "steps": 3, "seed": 7, "cfg_scale": 5.0,
          "sampler": "Euler", "width": 64, "height": 64}
A1111 = {"prompt": "a red apple", "negative_prompt": "blurry", "steps": 3, "seed": 7, "cfg_scale": 5.0,
         "sampler_name": "Euler", "width": 64, "height": 64}
INIT = Image.new("RGB", (64, 64), (200, 80, 40))


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    import sdlab
    from sdlab.models.ip_adapter import cross_attentions

    root = tmp_path_factory.mktemp("server-script-controls")
    models = root / "models"
    controlnet = models / "ControlNet"
    controlnet.mkdir(parents=True)
    bundle = sdlab.load().bundle
    widths = [attn.to_q.weight.shape[0] for attn in cross_attentions(bundle.unet)]
    write_image_encoder(models / "image_encoder", seed=2, width=128, projection=32)
    write_ip_adapter(controlnet / "ip-adapter_tiny.safetensors",
                     ip_adapter_state(widths, bundle.unet_config.context_dim, 32, seed=3, std=0.3))
    factor = bundle.vae_config.downsample_factor
    net = write_layout(diffusers_controlnet(bundle.unet_config, 3, hint_widths=(16, 32, 96, 256)[: factor.bit_length()],
                                            std=0.05), "diffusers-file", controlnet)
    net.rename(controlnet / "tiny_canny.safetensors")
    strong = write_layout(diffusers_controlnet(bundle.unet_config, 3, hint_widths=(16, 32, 96, 256)[: factor.bit_length()],
                                               std=0.6), "diffusers-file", controlnet)
    strong.rename(controlnet / "strong_lines.safetensors")    # a unit whose picture shows in the drawing
    hint = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(hint).rectangle([10, 10, 50, 50], outline="white", width=4)
    reference = root / "reference.png"
    Image.open(SAMPLE_PICTURE).convert("RGB").crop((0, 0, 200, 160)).save(reference)
    server = start_server(root / "outputs", "--models-dir", str(models))
    client = httpx.Client(base_url=server.url, timeout=300)
    canny = next(name for name in client.get("/controlnet/model_list").json()["model_list"] if "canny" in name)
    strong = next(name for name in client.get("/controlnet/model_list").json()["model_list"] if "strong" in name)
    yield {"client": client, "hint": b64_png(hint), "picture": file_b64(reference), "canny": canny, "strong": strong}
    client.close()
    server.stop()


def _units(setup) -> dict:
    """A Canny ControlNet unit and an IP-Adapter, as the native job's fields."""
    return {"controls": [{"model": "tiny_canny", "image": setup["hint"], "module": "canny", "strength": 0.9,
                          "threshold_a": 60, "threshold_b": 160}],
            "ip_adapters": [{"model": "ip-adapter_tiny", "image": setup["picture"], "scale": 0.7}]}


def _a1111_units(setup) -> dict:
    """The same units as A1111's `alwayson_scripts.controlnet` args."""
    return {"alwayson_scripts": {"controlnet": {"args": [
        {"enabled": True, "model": setup["canny"], "image": setup["hint"], "module": "canny", "weight": 0.9,
         "threshold_a": 60, "threshold_b": 160, "pixel_perfect": False, "resize_mode": "Crop and Resize"},
        {"enabled": True, "model": "ip-adapter_tiny", "module": "ip-adapter_clip_sd15", "image": setup["picture"],
         "weight": 0.7}]}}}


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _job(client: httpx.Client, body: dict) -> tuple[dict, list[np.ndarray]]:
    return drawn_pictures(client, body, _pixels, timeout_s=300)


def _a1111(client: httpx.Client, route: str, body: dict) -> tuple[dict, list[np.ndarray]]:
    answer = client.post(f"/sdapi/v1/{route}", json=body)
    assert answer.status_code == 200, answer.text
    return json.loads(answer.json()["info"]), [_pixels(base64.b64decode(b)) for b in answer.json()["images"]]


def _cfg_axis(client: httpx.Client) -> int:
    axes = client.get("/api/scripts").json()["txt2img"]["axes"]
    return next(axis["index"] for axis in axes if axis["label"] == "CFG Scale")


def _same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    assert (got == want).all(), np.abs(got.astype(int) - want).max()


def test_a_native_plots_cells_are_plain_jobs_with_the_units(setup) -> None:
    client = setup["client"]
    body = {**NATIVE, **_units(setup)}
    plot, pictures = _job(client, {**body, "script_name": "X/Y/Z plot",
                                   "script_args": [_cfg_axis(client), "3,9", [], 0, "", [], 0, "", [], False, True]})
    assert len(pictures) == 3                               # the grid, then each cell
    for cfg, cell, text in zip((3.0, 9.0), pictures[1:], plot["infotexts"][1:]):
        plain, (picture,) = _job(client, {**body, "cfg_scale": cfg})
        _same(cell, picture)
        assert text == plain["infotexts"][0] and "ControlNet 0: " in text
    _, (without,) = _job(client, {**NATIVE, "cfg_scale": 3.0})
    assert np.abs(pictures[1].astype(int) - without).max() > 10     # the units change the cell
    recorded = plot["request"]
    assert recorded["controls"][0]["model"] == "tiny_canny.safetensors" and "image" not in recorded["controls"][0]
    assert recorded["ip_adapters"][0]["scale"] == 0.7 and "image" not in recorded["ip_adapters"][0]


def test_an_a1111_plots_cells_are_single_requests_with_the_units(setup) -> None:
    client = setup["client"]
    body = {**A1111, **_a1111_units(setup)}
    info, pictures = _a1111(client, "txt2img", {**body, "script_name": "x/y/z plot",
                                                "script_args": [_cfg_axis(client), "3,9", [], 0, "", [], 0, "", [],
                                                                False, True]})
    assert len(pictures) == 3
    for cfg, cell, text in zip((3.0, 9.0), pictures[1:], info["infotexts"][1:]):
        single, (picture,) = _a1111(client, "txt2img", {**body, "cfg_scale": cfg})
        _same(cell, picture)
        assert text == single["infotexts"][0] and 'ControlNet 1: "Module: ip-adapter_clip_sd15' in text


@pytest.mark.parametrize("door", ["native", "a1111"])
def test_prompts_from_file_lines_at_their_own_size_draw_the_units_at_it(setup, door) -> None:
    """A line that sets its own width / height draws the unit's hint at that size: the plain request of that size."""
    client = setup["client"]
    text = '--prompt "a pear" --width 96 --height 64\n--prompt "a cup" --width 64 --height 96\n'
    script = {"script_name": "Prompts from file or textbox", "script_args": [False, False, "end", text]}
    if door == "native":
        body = {**NATIVE, **_units(setup), "prompt": "still life"}
        _, pictures = _job(client, {**body, **script})
        singles = [_job(client, {**body, **fields})[1][0] for fields in (
            {"prompt": "still life a pear", "width": 96}, {"prompt": "still life a cup", "height": 96})]
    else:
        body = {**A1111, **_a1111_units(setup), "prompt": "still life"}
        _, pictures = _a1111(client, "txt2img", {**body, **script})
        singles = [_a1111(client, "txt2img", {**body, **fields})[1][0] for fields in (
            {"prompt": "still life a pear", "width": 96}, {"prompt": "still life a cup", "height": 96})]
    assert [p.shape[:2] for p in pictures] == [(64, 96), (96, 64)]
    for got, want in zip(pictures, singles):
        _same(got, want)


def _seed_and_denoise(text: str) -> tuple[int, float]:
    return int(re.search(r"Seed: (\d+)", text)[1]), float(re.search(r"Denoising strength: ([\d.]+)", text)[1])


def test_a_loopback_pass_keeps_the_units_own_picture(setup) -> None:
    """Each pass is the plain img2img job of the previous pass's picture at its seed and strength, with the units
    as sent: the unit's picture stays the user's, not the pass's."""
    client = setup["client"]
    body = {**NATIVE, **_units(setup), "mode": "img2img", "init_image": b64_png(INIT), "strength": 0.7,
            "img2img_convention": "a1111"}
    job, pictures = _job(client, {**body, "script_name": "Loopback", "script_args": [2, 0.5, "Linear", "None"]})
    assert len(pictures) == 3                               # the passes' grid, then each pass's picture
    before = INIT
    for picture, text in zip(pictures[1:], job["infotexts"][1:]):
        seed, strength = _seed_and_denoise(text)
        fields = {"init_image": b64_png(before), "seed": seed, "strength": strength}
        if before is not INIT:
            fields["inpaint_fill"] = "original"             # A1111's loopback sets it after the first pass
        _, (plain,) = _job(client, {**body, **fields})
        _same(picture, plain)
        before = Image.fromarray(picture)


INIT_PICTURE = Image.new("RGB", (64, 64), (200, 80, 40))
ImageDraw.Draw(INIT_PICTURE).ellipse([8, 8, 56, 50], fill=(20, 200, 90))
LOOPBACK = {"script_name": "Loopback", "script_args": [2, 0.5, "Linear", "None"]}
SD_UPSCALE = {"script_name": "SD upscale", "script_args": ["", 16, "Lanczos", 2]}
OUTPAINTING = {"script_name": "Poor man's outpainting", "script_args": [32, 4, 1, ["left"]]}


def _imageless_units(setup) -> tuple[dict, dict]:
    """A Canny unit without a picture of its own, as the native job's field and as A1111's unit."""
    native = {"controls": [{"model": "strong_lines", "module": "canny", "strength": 0.9, "threshold_a": 60,
                            "threshold_b": 160}], "control_convention": "a1111", "img2img_convention": "a1111",
              "schedule": "uniform", "rng": "CPU"}           # the A1111 route's rules (/api/parameters of its picture)
    a1111 = {"alwayson_scripts": {"controlnet": {"args": [
        {"enabled": True, "model": setup["strong"], "module": "canny", "weight": 0.9, "threshold_a": 60,
         "threshold_b": 160, "pixel_perfect": False}]}}}
    return native, a1111


@pytest.mark.parametrize("script", [LOOPBACK, SD_UPSCALE, OUTPAINTING], ids=["loopback", "sd-upscale", "outpainting"])
def test_a_unit_without_a_picture_draws_on_each_requests_init_picture(setup, script) -> None:
    """A unit without a picture of its own takes each request's init picture, as the extension's
    `choose_input_image` takes `p.init_images[0]`: a Loopback pass's picture, an SD upscale tile. The native job's
    pictures equal the A1111 route's (each pass; the upscaled picture; the outpainted canvas), and differ from the
    unit drawn on the user's picture throughout."""
    client = setup["client"]
    native, a1111 = _imageless_units(setup)
    job, pictures = _job(client, {**NATIVE, **native, "mode": "img2img", "init_image": b64_png(INIT_PICTURE),
                                  "strength": 0.7, **script})
    _, want = _a1111(client, "img2img", {**A1111, **a1111, "init_images": [b64_png(INIT_PICTURE)],
                                         "denoising_strength": 0.7, **script})
    assert len(pictures) == len(want) == (3 if script is LOOPBACK else 1)
    for got, expected in zip(pictures, want):
        _same(got, expected)
    fixed = {**native, "controls": [{**native["controls"][0], "image": b64_png(INIT_PICTURE)}]}
    _, on_users = _job(client, {**NATIVE, **fixed, "mode": "img2img", "init_image": b64_png(INIT_PICTURE),
                                "strength": 0.7, **script})
    assert np.abs(on_users[-1].astype(int) - pictures[-1]).max() > 20     # the unit's picture shows


def test_a_native_unit_without_a_picture_draws_on_the_jobs_init_picture_and_txt2img_refuses_it(setup) -> None:
    client = setup["client"]
    native, _ = _imageless_units(setup)
    body = {**NATIVE, **native, "mode": "img2img", "init_image": b64_png(INIT_PICTURE), "strength": 0.7}
    _, (without,) = _job(client, body)
    given = {**native["controls"][0], "image": b64_png(INIT_PICTURE), "resize_mode": "resize"}
    _, (with_init,) = _job(client, {**body, "controls": [given]})
    _same(without, with_init)
    answer = client.post("/api/jobs", json={**NATIVE, **native})
    assert answer.status_code == 422
    assert answer.json()["detail"] == ("control 0: needs an image; only an img2img or inpaint request's control "
                                       "may leave it out, to draw on the init picture")
