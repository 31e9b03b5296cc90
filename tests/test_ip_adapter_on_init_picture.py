"""An IP-Adapter without a picture of its own in an img2img / inpaint request draws on the request's init picture,
by the rule a ControlNet follows (`pipeline.control.drawn_on_init`, through `image_prompt.prompts_on_init`; A1111's
ControlNet extension's `choose_input_image`: a unit without an image takes `p.init_images[0]`) at every door: the
Python API (`IPAdapterInput(file)`), the CLI (`--ip-adapter FILE` without `--ip-adapter-image`, or `none`), the
native server (`ip_adapters` entries without `image`; under a script each request's own picture) and the A1111
route (a unit without `image`). Each picture equals the native job's, 0 of 255 apart; txt2img refuses such an
adapter with one message at each door."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from cli_helpers import run
from ip_adapter_fixtures import ip_adapter_state, write_image_encoder, write_ip_adapter
from server_fixtures import b64_png, start_server, wait_for_job

NATIVE = {"prompt": "a red apple", "negative_prompt": "blurry", "steps": 3, "seed": 7, "cfg_scale": 5.0,
          "sampler": "Euler", "width": 64, "height": 64}
CLI = ["a red apple", "--negative", "blurry", "--steps", "3", "--seed", "7", "--cfg", "5", "--sampler", "Euler",
       "--width", "64", "--height", "64", "--threads", "1", "--no-progress"]     # the test server draws on one thread
ENTRY = {"model": "ip-adapter_tiny", "scale": 0.8}
MESSAGE = ("needs an image; only an img2img or inpaint request's IP-Adapter may leave it out, to draw on the init "
           "picture")

INIT = Image.new("RGB", (96, 64), (200, 80, 40))
ImageDraw.Draw(INIT).ellipse([8, 8, 80, 56], fill=(20, 200, 90))
OTHER = Image.new("RGB", (96, 64), (30, 40, 220))            # another picture: the adapter's shows
ImageDraw.Draw(OTHER).rectangle([20, 4, 60, 60], fill=(250, 250, 20))
MASK = Image.new("L", (96, 64), 0)
ImageDraw.Draw(MASK).rectangle([30, 10, 70, 50], fill=255)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    import sdlab
    from sdlab.models.ip_adapter import cross_attentions

    root = tmp_path_factory.mktemp("ip-adapter-on-init")
    models = root / "models"
    (models / "ControlNet").mkdir(parents=True)
    pipe = sdlab.load()
    bundle = pipe.bundle
    widths = [attn.to_q.weight.shape[0] for attn in cross_attentions(bundle.unet)]
    write_image_encoder(models / "image_encoder", seed=2, width=128, projection=32)   # one folder up: h94's layout
    adapter = write_ip_adapter(models / "ControlNet" / "ip-adapter_tiny.safetensors",
                               ip_adapter_state(widths, bundle.unet_config.context_dim, 32, seed=3, std=0.3))
    INIT.save(root / "init.png")
    OTHER.save(root / "other.png")
    MASK.save(root / "mask.png")
    server = start_server(root / "outputs", "--models-dir", str(models))
    client = httpx.Client(base_url=server.url, timeout=300)
    yield {"client": client, "pipe": pipe, "adapter": adapter, "init": root / "init.png", "mask": root / "mask.png",
           "other": root / "other.png"}
    client.close()
    server.stop()


def _picture(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def _job(client: httpx.Client, body: dict) -> tuple[dict, list[Image.Image]]:
    answer = client.post("/api/jobs", json=body)
    assert answer.status_code == 202, answer.text
    job = wait_for_job(client, answer.json()["id"], 300)
    assert job["status"] == "done", job
    return job, [_picture(client.get(url).content) for url in job["images"]]


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def _same(got: Image.Image, want: Image.Image) -> None:
    assert got.size == want.size
    assert np.abs(_pixels(got) - _pixels(want)).max() == 0


def _apart(got: Image.Image, want: Image.Image) -> int:
    return int(np.abs(_pixels(got) - _pixels(want)).max())


def _api(setup, mode: str, **options):
    """`pipe.img2img` / `pipe.inpaint` of the native job's settings on one thread, as the test server draws, and
    its parameters text."""
    from sdlab.pipeline.infotext import to_parameters
    from sdlab.pipeline.png_info import format_parameters

    pipe, threads = setup["pipe"], torch.get_num_threads()
    settings = {"steps": 3, "seed": 7, "cfg_scale": 5.0, "sampler": "Euler", "width": 64, "height": 64,
                "strength": 0.7, "resize_mode": "crop", **options}
    torch.set_num_threads(1)
    try:
        if mode == "inpaint":
            result = pipe.inpaint("a red apple", INIT, MASK, "blurry", **settings)
        else:
            result = pipe.img2img("a red apple", INIT, settings.pop("strength"), "blurry", **settings)
    finally:
        torch.set_num_threads(threads)
    return result.images[0], format_parameters(to_parameters(result.request))


def _cli(setup, tmp_path: Path, capsys, mode: str, *flags: str) -> list[Image.Image]:
    extra = ["--mask", str(setup["mask"])] if mode == "inpaint" else []
    code, out, err = run([mode, *CLI, "--init", str(setup["init"]), *extra, *flags,
                          "--out", str(tmp_path / "cli.png")], capsys)
    assert code == 0, err
    return [_picture(Path(line).read_bytes()) for line in out.splitlines()]


def _native_body(mode: str, **fields) -> dict:
    body = {**NATIVE, "mode": mode, "init_image": b64_png(INIT), "strength": 0.7, "resize_mode": "crop", **fields}
    return {**body, "mask_image": b64_png(MASK)} if mode == "inpaint" else body


def _a1111_units(*units: dict) -> dict:
    return {"alwayson_scripts": {"controlnet": {"args": list(units)}}}


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_the_api_the_cli_and_the_native_job_draw_an_ip_adapter_without_a_picture_on_the_init_picture(
        setup, tmp_path, capsys, mode):
    """The native entry without `image`, `IPAdapterInput(file, scale=0.8)` and `--ip-adapter FILE` (no
    --ip-adapter-image; `none` the same) draw one picture, 0/255, with one parameters text; the adapter given the
    init picture itself draws it too; given another picture, or no adapter, the picture differs."""
    from sdlab.pipeline.image_prompt import IPAdapterInput

    job, (served,) = _job(setup["client"], _native_body(mode, ip_adapters=[ENTRY]))
    text = served.info["parameters"]
    line = re.search(r"IP-Adapter 0: \"Model: ip-adapter_tiny \[\w+\], Weight: 0.8\"", text)
    assert line, text
    assert job["request"]["ip_adapters"] == [{"model": "ip-adapter_tiny.safetensors", "scale": 0.8}]

    api, api_text = _api(setup, mode, ip_adapters=[IPAdapterInput(setup["adapter"], scale=0.8)])
    _same(api, served)
    assert line[0] in api_text          # the API's text holds no model hash, which the saved picture adds
    for flags in (["--ip-adapter", str(setup["adapter"]), "--ip-adapter-scale", "0.8"],
                  ["--ip-adapter", str(setup["adapter"]), "--ip-adapter-image", "none", "--ip-adapter-scale", "0.8"]):
        (cli,) = _cli(setup, tmp_path, capsys, mode, "--strength", "0.7", "--resize-mode", "crop", *flags)
        _same(cli, served)
        assert cli.info["parameters"] == text

    given, _ = _api(setup, mode, ip_adapters=[IPAdapterInput(setup["adapter"], INIT, 0.8)])
    _same(given, served)
    other, _ = _api(setup, mode, ip_adapters=[IPAdapterInput(setup["adapter"], OTHER, 0.8)])
    plain, _ = _api(setup, mode)
    assert _apart(other, served) > 5 and _apart(plain, served) > 5, (_apart(other, served), _apart(plain, served))


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_the_a1111_routes_unit_without_an_image_is_the_native_job_of_its_settings(setup, mode):
    """`/sdapi/v1/img2img` with an IP-Adapter unit without an image (the extension takes `init_images[0]`) equals
    the native job its picture's parameters give (`/api/parameters`: the unit's module, A1111's conventions) with
    the `ip_adapters` entry again without an image, 0/255; and the same unit given the init picture."""
    client = setup["client"]
    model = next(title for title in client.get("/controlnet/model_list").json()["model_list"]
                 if title.startswith("ip-adapter_tiny ["))
    unit = {"enabled": True, "module": "ip-adapter_clip_sd15", "model": model, "weight": 0.8}
    body = {"prompt": "a red apple", "negative_prompt": "blurry", "steps": 3, "seed": 7, "cfg_scale": 5,
            "sampler_name": "Euler", "width": 64, "height": 64, "init_images": [b64_png(INIT)],
            "denoising_strength": 0.7, "resize_mode": 1}
    if mode == "inpaint":
        body["mask"] = b64_png(MASK)
    drawn = client.post("/sdapi/v1/img2img", json={**body, **_a1111_units(unit)})
    assert drawn.status_code == 200, drawn.text
    picture = _picture(base64.b64decode(drawn.json()["images"][0]))
    given = client.post("/sdapi/v1/img2img", json={**body, **_a1111_units({**unit, "image": b64_png(INIT)})})
    _same(_picture(base64.b64decode(given.json()["images"][0])), picture)

    from sdlab.server.native import JobIn

    settings = client.post("/api/parameters", json={"image": drawn.json()["images"][0]}).json()["settings"]
    native = {key: value for key, value in settings.items()
              if value is not None and key in JobIn.model_fields and key != "model"}
    assert native["ip_adapters"] == [{"model": model, "scale": 0.8, "module": "ip-adapter_clip_sd15"}], native
    native.update(mode=mode, init_image=b64_png(INIT), resize_mode="crop",     # the pictures and how they fit:
                  **({"mask_image": b64_png(MASK)} if mode == "inpaint" else {}))   # given again, as A1111's paste
    _, (redrawn,) = _job(client, native)
    _same(redrawn, picture)
    plain = client.post("/sdapi/v1/img2img", json=body)
    assert _apart(_picture(base64.b64decode(plain.json()["images"][0])), picture) > 5


LOOPBACK = ({"script_name": "Loopback", "script_args": [2, 0.5, "Linear", "None"]},
            ["--loopback", "2", "--final-strength", "0.5", "--strength-curve", "linear"])
SD_UPSCALE = ({"script_name": "SD upscale", "script_args": ["", 16, "Lanczos", 2]},
              ["--sd-upscale", "2", "--upscaler", "lanczos", "--tile-overlap", "16"])


@pytest.mark.parametrize("script, flags", [LOOPBACK, SD_UPSCALE], ids=["loopback", "sd-upscale"])
def test_scripts_draw_an_ip_adapter_without_a_picture_on_each_requests_own(setup, tmp_path, capsys, script, flags):
    """Each Loopback pass's adapter takes that pass's picture, each SD upscale tile batch its first tile, as a
    ControlNet's does (tests/test_control_on_init_picture.py): the native job's script equals the CLI's, and
    differs from the adapter given the user's picture throughout (the job's first init picture)."""
    init64 = INIT.resize((64, 64))
    init64.save(tmp_path / "init64.png")
    body = {**NATIVE, "mode": "img2img", "init_image": b64_png(init64), "strength": 0.7, **script}
    _, served = _job(setup["client"], {**body, "ip_adapters": [ENTRY]})
    code, out, err = run(["img2img", *CLI, "--init", str(tmp_path / "init64.png"), "--strength", "0.7", *flags,
                          "--ip-adapter", str(setup["adapter"]), "--ip-adapter-scale", "0.8",
                          "--out", str(tmp_path / "cli.png")], capsys)
    assert code == 0, err
    drawn = [_picture(Path(line).read_bytes()) for line in out.splitlines()]
    served = served[1:] + served[:1] if len(served) > 1 else served       # the job: grid first; the CLI: grid last
    assert len(drawn) == len(served)
    for got, want in zip(drawn, served):
        _same(got, want)
    _, fixed = _job(setup["client"], {**body, "ip_adapters": [{**ENTRY, "image": b64_png(init64)}]})
    fixed = fixed[1:] + fixed[:1] if len(fixed) > 1 else fixed
    last = len(drawn) - 2 if len(drawn) > 1 else 0          # the last pass (before Loopback's grid); the upscale
    _same(fixed[0], drawn[0]) if len(drawn) > 1 else None   # Loopback's first pass: its own picture is the user's
    assert _apart(fixed[last], drawn[last]) > 0


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
                                                    **_a1111_units(unit)})
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
    from test_ip_adapter_layers import face_id_state

    from sdlab.models.ip_adapter import cross_attentions

    bundle = setup["pipe"].bundle
    widths = [attn.to_q.weight.shape[0] for attn in cross_attentions(bundle.unet)]
    face = write_ip_adapter(setup["adapter"].parent / "ip-adapter-faceid_tiny.bin",
                            face_id_state(widths, bundle.unet_config.context_dim))
    try:
        with pytest.raises(RequestError) as refused:
            _api(setup, "img2img", ip_adapters=[IPAdapterInput(face)])
    finally:
        face.unlink()
    assert "an IP-Adapter FaceID reads an InsightFace face embedding" in str(refused.value)
