"""An IP-Adapter without a picture of its own in an img2img / inpaint request draws on the request's init picture,
by the rule a ControlNet follows (`pipeline.control.drawn_on_init`, through `image_prompt.prompts_on_init`; A1111's
ControlNet extension's `choose_input_image`: a unit without an image takes `p.init_images[0]`) at every door: the
Python API (`IPAdapterInput(file)`), the CLI (`--ip-adapter FILE` without `--ip-adapter-image`, or `none`), the
native server (`ip_adapters` entries without `image`; under a script each request's own picture) and the A1111
route (a unit without `image`). Each picture equals the native job's, 0 of 255 apart; txt2img refuses such an
adapter with one message at each door."""

from __future__ import annotations

import re

import httpx
import pytest
from PIL import Image, ImageDraw

from cli_helpers import run
from init_picture_fixtures import (A1111_IMG2IMG, CLI, INIT, LOOPBACK, MASK, NATIVE, SD_UPSCALE, a1111_picture,
                                   a1111_units, api_drawn, apart, cli_drawn, cli_pictures, grid_last, listed_model,
                                   native_body, native_job, native_settings, parameters_text, same,
                                   write_face_id_adapter, write_tiny_ip_adapter)
from server_fixtures import b64_png, start_server

ENTRY = {"model": "ip-adapter_tiny", "scale": 0.8}
MESSAGE = ("needs an image; only an img2img or inpaint request's IP-Adapter may leave it out, to draw on the init "
           "picture")

OTHER = Image.new("RGB", (96, 64), (30, 40, 220))            # another picture: the adapter's shows
ImageDraw.Draw(OTHER).rectangle([20, 4, 60, 60], fill=(250, 250, 20))


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    import sdlab

    root = tmp_path_factory.mktemp("ip-adapter-on-init")
    models = root / "models"
    pipe = sdlab.load()
    adapter = write_tiny_ip_adapter(models, pipe)
    INIT.save(root / "init.png")
    OTHER.save(root / "other.png")
    MASK.save(root / "mask.png")
    server = start_server(root / "outputs", "--models-dir", str(models))
    client = httpx.Client(base_url=server.url, timeout=300)
    yield {"client": client, "pipe": pipe, "adapter": adapter, "init": root / "init.png", "mask": root / "mask.png",
           "other": root / "other.png"}
    client.close()
    server.stop()


def _api(setup, mode: str, **options):
    """The API's picture of the native job's settings (strength 0.7, resize mode crop) and its parameters text."""
    result = api_drawn(setup["pipe"], mode, strength=0.7, resize_mode="crop", **options)
    return result.images[0], parameters_text(result)


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_the_api_the_cli_and_the_native_job_draw_an_ip_adapter_without_a_picture_on_the_init_picture(
        setup, tmp_path, capsys, mode):
    """The native entry without `image`, `IPAdapterInput(file, scale=0.8)` and `--ip-adapter FILE` (no
    --ip-adapter-image; `none` the same) draw one picture, 0/255, with one parameters text; the adapter given the
    init picture itself draws it too; given another picture, or no adapter, the picture differs."""
    from sdlab.pipeline.image_prompt import IPAdapterInput

    job, (served,) = native_job(setup["client"], native_body(mode, ip_adapters=[ENTRY]))
    text = served.info["parameters"]
    line = re.search(r"IP-Adapter 0: \"Model: ip-adapter_tiny \[\w+\], Weight: 0.8\"", text)
    assert line, text
    assert job["request"]["ip_adapters"] == [{"model": "ip-adapter_tiny.safetensors", "scale": 0.8}]

    api, api_text = _api(setup, mode, ip_adapters=[IPAdapterInput(setup["adapter"], scale=0.8)])
    same(api, served)
    assert line[0] in api_text          # the API's text holds no model hash, which the saved picture adds
    for flags in (["--ip-adapter", str(setup["adapter"]), "--ip-adapter-scale", "0.8"],
                  ["--ip-adapter", str(setup["adapter"]), "--ip-adapter-image", "none", "--ip-adapter-scale", "0.8"]):
        (cli,) = cli_drawn(setup, tmp_path, capsys, mode, "--strength", "0.7", "--resize-mode", "crop", *flags)
        same(cli, served)
        assert cli.info["parameters"] == text

    given, _ = _api(setup, mode, ip_adapters=[IPAdapterInput(setup["adapter"], INIT, 0.8)])
    same(given, served)
    other, _ = _api(setup, mode, ip_adapters=[IPAdapterInput(setup["adapter"], OTHER, 0.8)])
    plain, _ = _api(setup, mode)
    assert apart(other, served) > 5 and apart(plain, served) > 5, (apart(other, served), apart(plain, served))


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_the_a1111_routes_unit_without_an_image_is_the_native_job_of_its_settings(setup, mode):
    """`/sdapi/v1/img2img` with an IP-Adapter unit without an image (the extension takes `init_images[0]`) equals
    the native job its picture's parameters give (`/api/parameters`: the unit's module, A1111's conventions) with
    the `ip_adapters` entry again without an image, 0/255; and the same unit given the init picture."""
    client = setup["client"]
    model = listed_model(client, "ip-adapter_tiny")
    unit = {"enabled": True, "module": "ip-adapter_clip_sd15", "model": model, "weight": 0.8}
    body = {**A1111_IMG2IMG, "denoising_strength": 0.7, "resize_mode": 1}
    if mode == "inpaint":
        body["mask"] = b64_png(MASK)
    drawn = client.post("/sdapi/v1/img2img", json={**body, **a1111_units(unit)})
    picture = a1111_picture(drawn)
    given = client.post("/sdapi/v1/img2img", json={**body, **a1111_units({**unit, "image": b64_png(INIT)})})
    same(a1111_picture(given), picture)

    native = native_settings(client, drawn.json()["images"][0])
    # an A1111 unit's line records its resize mode (the extension's default: Crop and Resize)
    assert native["ip_adapters"] == [{"model": model, "scale": 0.8, "module": "ip-adapter_clip_sd15",
                                      "resize_mode": "crop"}], native
    native.update(mode=mode, init_image=b64_png(INIT), resize_mode="crop",     # the pictures and how they fit:
                  **({"mask_image": b64_png(MASK)} if mode == "inpaint" else {}))   # given again, as A1111's paste
    _, (redrawn,) = native_job(client, native)
    same(redrawn, picture)
    plain = client.post("/sdapi/v1/img2img", json=body)
    assert apart(a1111_picture(plain), picture) > 5


@pytest.mark.parametrize("script, flags", [LOOPBACK, SD_UPSCALE], ids=["loopback", "sd-upscale"])
def test_scripts_draw_an_ip_adapter_without_a_picture_on_each_requests_own(setup, tmp_path, capsys, script, flags):
    """Each Loopback pass's adapter takes that pass's picture, each SD upscale tile batch its first tile, as a
    ControlNet's does (tests/test_control_on_init_picture.py): the native job's script equals the CLI's, and
    differs from the adapter given the user's picture throughout (the job's first init picture)."""
    init64 = INIT.resize((64, 64))
    init64.save(tmp_path / "init64.png")
    body = {**NATIVE, "mode": "img2img", "init_image": b64_png(init64), "strength": 0.7, **script}
    _, served = native_job(setup["client"], {**body, "ip_adapters": [ENTRY]})
    drawn = cli_pictures(["img2img", *CLI, "--init", str(tmp_path / "init64.png"), "--strength", "0.7", *flags,
                          "--ip-adapter", str(setup["adapter"]), "--ip-adapter-scale", "0.8",
                          "--out", str(tmp_path / "cli.png")], capsys)
    served = grid_last(served)
    assert len(drawn) == len(served)
    for got, want in zip(drawn, served):
        same(got, want)
    _, fixed = native_job(setup["client"], {**body, "ip_adapters": [{**ENTRY, "image": b64_png(init64)}]})
    fixed = grid_last(fixed)
    last = len(drawn) - 2 if len(drawn) > 1 else 0          # the last pass (before Loopback's grid); the upscale
    same(fixed[0], drawn[0]) if len(drawn) > 1 else None   # Loopback's first pass: its own picture is the user's
    assert apart(fixed[last], drawn[last]) > 0


def test_txt2img_refuses_an_ip_adapter_without_a_picture_at_every_door(setup, tmp_path, capsys):
    from sdlab.pipeline.image_prompt import IPAdapterInput
    from sdlab.pipeline.request import RequestError

    with pytest.raises(RequestError) as refused:
        setup["pipe"].txt2img("a red apple", steps=2, ip_adapters=[IPAdapterInput(setup["adapter"])])
    assert str(refused.value) == f"IP-Adapter 0: {MESSAGE}"
    client = setup["client"]
    answer = client.post("/api/jobs", json={**NATIVE, "ip_adapters": [ENTRY]})
    assert (answer.status_code, answer.json()["detail"]) == (422, f"IP-Adapter 0: {MESSAGE}")
    unit = {"enabled": True, "module": "ip-adapter_clip_sd15", "model": "ip-adapter_tiny"}
    answer = client.post("/sdapi/v1/txt2img", json={"prompt": "a red apple", "steps": 2, "width": 64, "height": 64,
                                                    **a1111_units(unit)})
    assert (answer.status_code, answer.json()["detail"]) == (
        422, f"control 0 (module 'ip-adapter_clip_sd15'): {MESSAGE}")
    for extra in ([], ["--ip-adapter-image", "none"]):
        code, out, err = run(["txt2img", *CLI, "--ip-adapter", str(setup["adapter"]), *extra,
                              "--out", str(tmp_path / "t.png")], capsys)
        assert (code, out) == (2, "")
        assert err.strip().splitlines() == [f"sdlab: error: --ip-adapter {str(setup['adapter'])!r}: "
                                            f"IP-Adapter 0: {MESSAGE}"]
    assert not list(tmp_path.iterdir())


def test_a_face_id_adapter_without_a_face_embedding_is_refused_in_img2img_too(setup):
    """The init picture is no face embedding: a FaceID adapter drawn on it is the FaceID message, not a crash."""
    from sdlab.pipeline.image_prompt import IPAdapterInput
    from sdlab.pipeline.request import RequestError

    face = write_face_id_adapter(setup["adapter"].parent / "ip-adapter-faceid_tiny.bin", setup["pipe"])
    try:
        with pytest.raises(RequestError) as refused:
            _api(setup, "img2img", ip_adapters=[IPAdapterInput(face)])
    finally:
        face.unlink()
    assert "an IP-Adapter FaceID reads an InsightFace face embedding" in str(refused.value)
