"""A1111's `mask_round` (its img2img API field, default true): off, a transparent mask keeps its soft alpha, and
the latent blend (A1111's ``latmask``) and a 9-channel model's conditioning mask take the blurred mask's levels
instead of rounding them. The reference is A1111's code (modules/processing.py, ``create_binary_mask``,
``StableDiffusionProcessingImg2Img.init``, ``inpainting_image_conditioning``), transcribed below.
Reduced-width random models, 32 x 32 pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from bundle_fixtures import init_picture, tiny_bundle
from PIL import Image, ImageDraw

from sdlab.api import Pipeline
from sdlab.diffusion.noise import generators_for
from sdlab.pipeline.generate import _inpaint_extra, _start, encode_image
from sdlab.pipeline.plan import make_plan
from sdlab.pipeline.request import GenerationRequest, RequestError, resolve
from sdlab.server.a1111 import Img2ImgIn, _request

SIZE = 32
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _brush() -> Image.Image:
    """A semi-transparent brush stroke (alpha 90 < 128): A1111's rounding keeps none of it."""
    mask = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0))
    ImageDraw.Draw(mask).ellipse((6, 4, 28, 26), fill=(255, 255, 255, 90))
    return mask


def _a1111_masks(mask: Image.Image, mask_round: bool, latent_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A1111's image_mask, latmask and conditioning mask for a mask without blur, Whole picture, at the mask's
    size (`create_binary_mask`, the ``latmask`` lines of `StableDiffusionProcessingImg2Img.init` and
    `inpainting_image_conditioning`'s mask, nearest-interpolated to the latent size)."""
    if mask.mode == "RGBA" and mask.getextrema()[-1] != (255, 255):
        image_mask = mask.split()[-1].convert("L")
        if mask_round:
            image_mask = image_mask.point(lambda x: 255 if x > 128 else 0)
    else:
        image_mask = mask.convert("L")
    latmask = image_mask.convert("RGB").resize((latent_size, latent_size))
    latmask = np.moveaxis(np.array(latmask, dtype=np.float32), 2, 0)[0] / 255
    if mask_round:
        latmask = np.around(latmask)
    conditioning_mask = torch.from_numpy(np.array(image_mask.convert("L")).astype(np.float32) / 255.0)[None, None]
    if mask_round:
        conditioning_mask = torch.round(conditioning_mask)
    conditioning_mask = F.interpolate(conditioning_mask, size=(latent_size, latent_size))
    return np.array(image_mask), latmask, conditioning_mask[0, 0].numpy()


def _request_of(mask_round: bool, **fields) -> GenerationRequest:
    return GenerationRequest("x", steps=3, seed=1, width=SIZE, height=SIZE, sampler="Euler", init_image=init_picture(SIZE),
                             mask_image=_brush(), strength=0.75, img2img_convention="a1111", mask_round=mask_round,
                             **fields)


@pytest.mark.parametrize("mask_round", [True, False])
def test_mask_round_sets_a1111s_mask_latent_mask_and_conditioning_mask(mask_round):
    bundle = tiny_bundle("sd1-inpaint")
    plan = make_plan(bundle, _request_of(mask_round))
    start = _start(bundle, plan, generators_for(plan.request.seeds()))
    latent_size = plan.latent_shape[-1]
    image_mask, latmask, conditioning_mask = _a1111_masks(_brush(), mask_round, latent_size)

    assert np.array_equal(np.rint(plan.mask[0, 0].numpy() * 255), image_mask)
    assert image_mask.max() == (0 if mask_round else 90)
    np.testing.assert_array_equal(start.latent_mask[0, 0].numpy(), latmask)
    with torch.no_grad():
        extra = _inpaint_extra(bundle, plan.request, start, generators_for(plan.request.seeds()))  # (1, 5, h, w)
    np.testing.assert_allclose(extra[0, 0].numpy(), conditioning_mask, atol=1e-7)
    soft = torch.from_numpy(image_mask / 255.0).float()[None, None]                      # (1, 1, H, W)
    with torch.no_grad():
        masked_picture = encode_image(bundle, start.pixels * (1 - soft), None)           # A1111: the mean
    torch.testing.assert_close(extra[:, 1:], masked_picture, atol=1e-5, rtol=0)


def test_mask_round_off_repaints_a_semi_transparent_brush_that_rounding_drops():
    pipe = Pipeline(tiny_bundle("sd1", seed=7))
    drawn = {mask_round: np.asarray(pipe.inpaint("a red hat", init_picture(SIZE), _brush(), steps=2, seed=1,
                                                 sampler="Euler", img2img_convention="a1111",
                                                 mask_round=mask_round).images[0], dtype=np.int16)
             for mask_round in (True, False)}
    original = np.asarray(init_picture(SIZE), dtype=np.int16)
    assert np.array_equal(drawn[True], original)                         # nothing is repainted
    inside = np.asarray(_brush().getchannel("A")) > 0
    assert np.abs(drawn[False] - original)[inside].max() > 3             # the brush is, at 180/255 overlay weight
    assert np.array_equal(drawn[False][~inside], original[~inside])


def test_a1111_api_mask_round_reaches_the_request():
    picture = init_picture(SIZE)
    assert _request(Img2ImgIn(prompt="x"), inits=(picture,), mask=_brush()).mask_round is True
    assert _request(Img2ImgIn(prompt="x", mask_round=False), inits=(picture,), mask=_brush()).mask_round is False


def test_mask_round_must_be_a_bool():
    with pytest.raises(RequestError, match="mask_round must be True or False"):
        resolve(_request_of("no"), default_size=SIZE, default_sampler="Euler", default_schedule="karras", factor=8)
