"""What the tests of image prompts drawn on a request's init picture share (tests/test_control_on_init_picture.py,
test_ip_adapter_on_init_picture.py, test_ip_adapter_only_masked.py): the init picture and its mask, one request as
each door spells it (Python API, CLI, native server, A1111 route), how each door's pictures are drawn and read, and
the pixel comparisons."""

from __future__ import annotations

import base64
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image, ImageDraw

from cli_helpers import run
from ip_adapter_fixtures import ip_adapter_state, write_image_encoder, write_ip_adapter
from server_fixtures import b64_png, drawn_pictures, png_picture

INIT = Image.new("RGB", (96, 64), (200, 80, 40))        # wider than the drawing: the resize mode shows
ImageDraw.Draw(INIT).ellipse([8, 8, 80, 56], fill=(20, 200, 90))
MASK = Image.new("L", (96, 64), 0)
ImageDraw.Draw(MASK).rectangle([30, 10, 70, 50], fill=255)

SETTINGS = {"steps": 3, "seed": 7, "cfg_scale": 5.0, "sampler": "Euler", "width": 64, "height": 64}
NATIVE = {"prompt": "a red apple", "negative_prompt": "blurry", **SETTINGS}
CLI = ["a red apple", "--negative", "blurry", "--steps", "3", "--seed", "7", "--cfg", "5", "--sampler", "Euler",
       "--width", "64", "--height", "64", "--threads", "1", "--no-progress"]     # the test server draws on one thread
A1111_IMG2IMG = {"prompt": "a red apple", "negative_prompt": "blurry", "steps": 3, "seed": 7, "cfg_scale": 5,
                 "sampler_name": "Euler", "width": 64, "height": 64, "init_images": [b64_png(INIT)]}

LOOPBACK = ({"script_name": "Loopback", "script_args": [2, 0.5, "Linear", "None"]},
            ["--loopback", "2", "--final-strength", "0.5", "--strength-curve", "linear"])
SD_UPSCALE = ({"script_name": "SD upscale", "script_args": ["", 16, "Lanczos", 2]},
              ["--sd-upscale", "2", "--upscaler", "lanczos", "--tile-overlap", "16"])


def a1111_picture(answer: httpx.Response) -> Image.Image:
    """An A1111 route's first picture."""
    assert answer.status_code == 200, answer.text
    return png_picture(base64.b64decode(answer.json()["images"][0]))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)                     # (H, W, 3)


def apart(got: Image.Image, want: Image.Image) -> int:
    """The largest difference of two pictures of one size, of 255."""
    assert got.size == want.size
    return int(np.abs(pixels(got) - pixels(want)).max())


def same(got: Image.Image, want: Image.Image) -> None:
    assert apart(got, want) == 0


def api_drawn(pipe, mode: str, **settings):
    """`pipe.img2img` / `pipe.inpaint` of the native job's prompt and SETTINGS (updated by `settings`) on INIT (and
    MASK), on one thread as the test server draws."""
    settings = {**SETTINGS, **settings}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if mode == "inpaint":
            return pipe.inpaint("a red apple", INIT, MASK, "blurry", **settings)
        return pipe.img2img("a red apple", INIT, settings.pop("strength"), "blurry", **settings)
    finally:
        torch.set_num_threads(threads)


def parameters_text(result) -> str:
    """The parameters text of an API result, as the CLI and the server write it (without the model hash)."""
    from sdlab.pipeline.infotext import to_parameters
    from sdlab.pipeline.png_info import format_parameters

    return format_parameters(to_parameters(result.request))


def native_job(client: httpx.Client, body: dict) -> tuple[dict, list[Image.Image]]:
    """A native job drawn to the end, and its pictures."""
    return drawn_pictures(client, body, timeout_s=300)


def native_body(mode: str, **fields) -> dict:
    """The native job of NATIVE on INIT (and MASK) at strength 0.7, fitted by crop."""
    body = {**NATIVE, "mode": mode, "init_image": b64_png(INIT), "strength": 0.7, "resize_mode": "crop", **fields}
    return {**body, "mask_image": b64_png(MASK)} if mode == "inpaint" else body


def native_settings(client: httpx.Client, b64: str) -> dict:
    """The native job fields a picture's parameters give (`/api/parameters`), the model left out."""
    from sdlab.server.native import JobIn

    settings = client.post("/api/parameters", json={"image": b64}).json()["settings"]
    return {key: value for key, value in settings.items()
            if value is not None and key in JobIn.model_fields and key != "model"}


def a1111_units(*units: dict) -> dict:
    """An A1111 request's ControlNet units."""
    return {"alwayson_scripts": {"controlnet": {"args": list(units)}}}


def listed_model(client: httpx.Client, stem: str) -> str:
    """The A1111 ControlNet model list's title of the file named `stem` ("stem [hash]")."""
    return next(title for title in client.get("/controlnet/model_list").json()["model_list"]
                if title.startswith(f"{stem} ["))


def cli_pictures(argv: list[str], capsys) -> list[Image.Image]:
    """The pictures `sdlab ARGV` wrote, in the order it names them."""
    code, out, err = run(argv, capsys)
    assert code == 0, err
    return [png_picture(Path(line).read_bytes()) for line in out.splitlines()]


def cli_drawn(setup: dict, tmp_path: Path, capsys, mode: str, *flags: str) -> list[Image.Image]:
    """`sdlab img2img` / `inpaint` of CLI on the setup's init picture (and mask) with `flags`."""
    extra = ["--mask", str(setup["mask"])] if mode == "inpaint" else []
    return cli_pictures([mode, *CLI, "--init", str(setup["init"]), *extra, *flags,
                         "--out", str(tmp_path / "cli.png")], capsys)


def grid_last(pictures: list[Image.Image]) -> list[Image.Image]:
    """A script job's pictures in the CLI's order: the job lists its grid first, the CLI last."""
    return pictures[1:] + pictures[:1] if len(pictures) > 1 else pictures


def cross_widths(pipe) -> list[int]:
    """The widths of the U-Net's cross-attention layers, an IP-Adapter's layout."""
    from sdlab.models.ip_adapter import cross_attentions

    return [attn.to_q.weight.shape[0] for attn in cross_attentions(pipe.bundle.unet)]


def write_tiny_ip_adapter(models: Path, pipe) -> Path:
    """A random IP-Adapter for `pipe`'s U-Net as models/ControlNet/ip-adapter_tiny.safetensors, its image encoder in
    models/image_encoder (h94's layout: one folder up)."""
    (models / "ControlNet").mkdir(parents=True, exist_ok=True)
    write_image_encoder(models / "image_encoder", seed=2, width=128, projection=32)
    return write_ip_adapter(models / "ControlNet" / "ip-adapter_tiny.safetensors",
                            ip_adapter_state(cross_widths(pipe), pipe.bundle.unet_config.context_dim, 32, seed=3,
                                             std=0.3))


def write_face_id_adapter(path: Path, pipe) -> Path:
    """A random IP-Adapter FaceID for `pipe`'s U-Net at `path`."""
    from test_ip_adapter_layers import face_id_state

    return write_ip_adapter(path, face_id_state(cross_widths(pipe), pipe.bundle.unet_config.context_dim))
