"""What the tests of an IP-Adapter in an "Only masked" inpaint share (tests/test_ip_adapter_only_masked.py,
test_ip_adapter_only_masked_resize.py): the inpaint area settings, the extension's crop transcribed
(`extension_crop`), the pictures the image encoder is given (`seen`), sdlab's own cut turned off (`uncut`), the
tiny adapters and an in-process server the tests can patch, and one "Only masked" inpaint of INIT and MASK as the
native and the A1111 route spell it.

Reference, transcribed from Mikubill/sd-webui-controlnet scripts/controlnet.py (v1.1.455):
`try_crop_image_with_a1111_mask(p, unit, input_image, resize_mode)` cuts each channel as
``images.resize_image(resize_mode.int_value(), channel, mask.width, mask.height)``, ``.crop(crop_region)``, then
``images.resize_image(ResizeMode.OUTER_FIT.int_value(), channel, p.width, p.height)``, the channels stacked again
(`images.resize_image` is sdlab's `upscale.resize_image`, A1111's modes 0 / 1 / 2)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image, ImageFilter

from init_picture_fixtures import (A1111_IMG2IMG, INIT, MASK, NATIVE, a1111_picture, listed_model, native_job,
                                   write_face_id_adapter, write_tiny_ip_adapter)
from server_fixtures import b64_png

SIZE, BLUR, PADDING = (64, 64), 4, 8
ONLY_MASKED = {"mask_blur": BLUR, "inpaint_only_masked": True, "inpaint_padding": PADDING}


def extension_crop(image: Image.Image, mode: str) -> Image.Image:
    """`try_crop_image_with_a1111_mask`'s cut of `image` (RGB or L) for `MASK` blurred by `BLUR` (its
    `prepare_mask`: the init picture's size), the crop region A1111's (`masking.get_crop_region` +
    `expand_crop_region`: sdlab's `inpaint_region`), `mode` the unit's resize mode (for the init picture
    img2img's)."""
    from sdlab.pipeline.inpaint_area import inpaint_region
    from sdlab.pipeline.upscale import IMG2IMG_UPSCALER, resize_image

    mask = MASK.filter(ImageFilter.GaussianBlur(BLUR))
    region = inpaint_region(mask, PADDING, SIZE)
    array = np.asarray(image)
    channels = [image] if image.mode == "L" else [Image.fromarray(array[:, :, i]) for i in range(array.shape[2])]
    channels = [resize_image(c, IMG2IMG_UPSCALER, mask.size, mode=mode) for c in channels]
    channels = [c.crop(region) for c in channels]
    channels = [resize_image(c, IMG2IMG_UPSCALER, SIZE, mode="fill") for c in channels]
    stacked = np.stack([np.asarray(c) for c in channels], axis=2)                            # (H, W, C)
    return Image.fromarray(stacked[:, :, 0] if image.mode == "L" else stacked)


@pytest.fixture
def seen(monkeypatch):
    """The pictures (and masks) each image prompt's encoder is given, as `picture_pixels` reads them."""
    from sdlab.pipeline import image_prompt

    given, read = [], image_prompt.picture_pixels

    def recording(prompt, *args, **kwargs):
        given.append((prompt.image, prompt.mask))
        return read(prompt, *args, **kwargs)

    monkeypatch.setattr(image_prompt, "picture_pixels", recording)
    return given


def uncut(monkeypatch) -> None:
    """sdlab's cut turned off: the adapter draws the picture it is given."""
    from sdlab.pipeline import image_prompt

    monkeypatch.setattr(image_prompt, "in_region", lambda prompt, *args: prompt)


@contextmanager
def patchable_setup(root: Path, face_id: bool = False) -> Iterator[dict]:
    """The shipped model's pipeline, ip-adapter_tiny for its U-Net (with `face_id` also ip-adapter-faceid_tiny.bin)
    in root/models/ControlNet, and a client of the server app run in this process (so that `uncut` and `seen` reach
    it) on root/models, writing to root/outputs: {"pipe", "adapter", "client"} (and "face")."""
    import sdlab
    from fastapi.testclient import TestClient

    from sdlab.server.app import create_app
    from sdlab.server.config import ServerConfig

    models = root / "models"
    pipe = sdlab.load()
    setup = {"pipe": pipe, "adapter": write_tiny_ip_adapter(models, pipe)}
    if face_id:
        setup["face"] = write_face_id_adapter(models / "ControlNet" / "ip-adapter-faceid_tiny.bin", pipe)
    app = create_app(ServerConfig(output_dir=root / "outputs", models_dir=models, controlnet_dir=models / "ControlNet"))
    with TestClient(app) as client:
        yield {**setup, "client": client}


def native_only_masked(client: httpx.Client, entry: dict) -> tuple[dict, Image.Image]:
    """A native "Only masked" inpaint of NATIVE on INIT and MASK with one `ip_adapters` entry of ip-adapter_tiny at
    scale 0.8 (updated by `entry`): the job and its picture."""
    body = {**NATIVE, "mode": "inpaint", "init_image": b64_png(INIT), "mask_image": b64_png(MASK), **ONLY_MASKED,
            "ip_adapters": [{"model": "ip-adapter_tiny", "scale": 0.8, **entry}]}
    job, (picture,) = native_job(client, body)
    return job, picture


def a1111_only_masked(client: httpx.Client, unit: dict) -> tuple[dict, Image.Image]:
    """An A1111 "Only masked" img2img of A1111_IMG2IMG with MASK and one ControlNet unit of ip-adapter_tiny
    (module ip-adapter_clip_sd15, weight 0.8, updated by `unit`): the answer's info and its picture."""
    body = {**A1111_IMG2IMG, "mask": b64_png(MASK), "mask_blur": BLUR, "inpaint_full_res": True,
            "inpaint_full_res_padding": PADDING,
            "alwayson_scripts": {"controlnet": {"args": [{"enabled": True, "module": "ip-adapter_clip_sd15",
                                                          "model": listed_model(client, "ip-adapter_tiny"),
                                                          "weight": 0.8, **unit}]}}}
    answer = client.post("/sdapi/v1/img2img", json=body)
    picture = a1111_picture(answer).convert("RGB")
    return json.loads(answer.json()["info"]), picture
