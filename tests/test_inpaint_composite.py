"""Inpainting pastes the original back outside the (blurred) mask after decoding, as A1111 does.

Reduced-width random models (4-channel SD1 and a 9-channel inpainting U-Net), 32 x 32 pixels, 2 steps: the
pictures are noise, which is what makes "outside the mask equals the original" a strong check.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from bundle_fixtures import tiny_bundle
from diffusers.image_processor import VaeImageProcessor
from PIL import Image, ImageOps

from sdlab.api import Pipeline
from sdlab.pipeline.overlay import blur_mask, blurred_mask, gaussian_taps, overlay_weight, paste_back

SIZE = 32
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def pipes():
    return {name: Pipeline(tiny_bundle(name, seed=7)) for name in ("sd1", "sd1-inpaint")}


def _picture() -> Image.Image:
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / (SIZE - 1)
    return Image.fromarray((np.stack([x, y, 1 - x * y], axis=-1) * 255).round().astype(np.uint8))


def _square_mask() -> Image.Image:
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[8:24, 10:22] = 255
    return Image.fromarray(mask)


def _inpaint(pipe, **options):
    return pipe.inpaint("a red hat", _picture(), _square_mask(), steps=2, seed=1, sampler="Euler", **options)


def _u8(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(np.int16)


@pytest.mark.parametrize("family", ["sd1", "sd1-inpaint"])
@pytest.mark.parametrize("blur", [0.0, 2.0])
def test_outside_the_blurred_mask_is_the_original_and_inside_follows_the_blend(pipes, family, blur):
    pasted = _inpaint(pipes[family], mask_blur=blur).images[0]
    decoded = _inpaint(pipes[family], mask_blur=blur, paste_back=False).images[0]
    w = overlay_weight(blur_mask(_square_mask(), blur, (SIZE, SIZE)))[0, 0].numpy()[..., None]   # (H, W, 1)
    original, ours, drawn = _u8(_picture()), _u8(pasted), _u8(decoded)

    outside = w[..., 0] == 0
    assert outside.sum() > SIZE * SIZE // 3
    assert np.array_equal(ours[outside], original[outside])                 # exactly the original's pixels
    assert np.abs(drawn[outside] - original[outside]).max() > 10            # which the decode alone is not
    assert np.abs(ours - np.rint(original * (1 - w) + drawn * w)).max() <= 1    # original over the result
    assert np.array_equal(ours, _u8(_a1111_overlay(decoded, _picture(), w[..., 0])))   # in PIL's arithmetic
    inside = w[..., 0] == 1
    assert inside.sum() > 0 and np.array_equal(ours[inside], drawn[inside])
    if blur:
        ramp = (w[..., 0] > 0) & (w[..., 0] < 1)
        assert ramp.sum() > 0                                                # the blur softens the seam


def _a1111_blur(mask: np.ndarray, blur_x: float, blur_y: float) -> np.ndarray:
    """A1111's mask blur (StableDiffusionProcessingImg2Img.init), transcribed: two cv2 calls on the uint8 mask."""
    cv2 = pytest.importorskip("cv2")
    if blur_x > 0:
        kernel_size = 2 * int(2.5 * blur_x + 0.5) + 1
        mask = cv2.GaussianBlur(mask, (kernel_size, 1), blur_x)
    if blur_y > 0:
        kernel_size = 2 * int(2.5 * blur_y + 0.5) + 1
        mask = cv2.GaussianBlur(mask, (1, kernel_size), blur_y)
    return mask


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (6, 1), (3, 5), (40, 13), (97, 131)])
def test_mask_blur_is_cv2s_8_bit_gaussian_bit_for_bit(shape):
    """Each axis as A1111's cv2.GaussianBlur blurs a uint8 mask (OpenCV's fixed-point kernel and rounding),
    for masks thinner than the kernel too, x and y apart and together."""
    rng = np.random.default_rng(sum(shape))
    masks = [rng.integers(0, 256, shape, dtype=np.uint8), np.where(rng.random(shape) > 0.6, 255, 0).astype(np.uint8)]
    sigmas = [0.3, 0.5, 1.0, 1.7, 2.5, 3.0, 4.0, 5.5, 7.3, 11.0, 16.0, 20.0, 33.3, 64.0]
    for mask in masks:
        for blur_x, blur_y in [(s, s) for s in sigmas] + [(s, 0.0) for s in sigmas] + [(0.0, s) for s in sigmas]:
            ours = np.asarray(blurred_mask(Image.fromarray(mask), blur_x, blur_y))
            np.testing.assert_array_equal(ours, _a1111_blur(mask, blur_x, blur_y), err_msg=f"{blur_x}, {blur_y}")


def test_mask_blur_taps_are_opencvs_fixed_point_kernel():
    """The 1/256 taps sum to 256; above sigma 2.5 OpenCV carries each tap's rounding error into the next,
    which plain rounding of the float kernel does not give."""
    for sigma in np.linspace(0.2, 60.0, 300):
        taps = gaussian_taps(float(sigma))
        assert len(taps) == 2 * int(2.5 * sigma + 0.5) + 1 and taps.sum() == 256
        assert np.array_equal(taps, taps[::-1])
    x = np.arange(-10, 11)
    plain = np.exp(-(x**2) / (2 * 4.0**2))
    assert not np.array_equal(gaussian_taps(4.0), np.rint(plain / plain.sum() * 256))


def _a1111_overlay(drawn: Image.Image, original: Image.Image, weight: np.ndarray) -> Image.Image:
    """A1111's overlay image (StableDiffusionProcessingImg2Img.init) and `apply_overlay`, transcribed, for the
    overlay weight `weight` (H, W) in [0, 1] (its `mask_for_overlay` / 255)."""
    mask_for_overlay = Image.fromarray(np.rint(weight * 255).astype(np.uint8))
    image_masked = Image.new("RGBa", (original.width, original.height))
    image_masked.paste(original.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask_for_overlay.convert("L")))
    overlay = image_masked.convert("RGBA")
    image = drawn.convert("RGBA")
    image.alpha_composite(overlay)
    return image.convert("RGB")


@pytest.mark.parametrize("blur", [0.0, 3.0])
def test_paste_back_is_the_pil_alpha_composite_a1111_and_diffusers_use(blur):
    """A1111's apply_overlay (the same PIL code as diffusers' `VaeImageProcessor.apply_overlay`): the original,
    premultiplied under the inverted `mask_for_overlay` (2 x blurred mask, clipped), alpha-composited over the
    result, pixel for pixel; a float blend rounded once is up to 1 level off it on the blur's ramp."""
    rng = np.random.default_rng(0)
    drawn = Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    original = _picture()
    weight = overlay_weight(blur_mask(_square_mask(), blur, (SIZE, SIZE)))
    w = weight[0, 0].numpy()
    mask_for_overlay = Image.fromarray(np.rint(w * 255).astype(np.uint8))
    ours = _u8(paste_back([drawn], original, weight)[0])
    assert np.array_equal(ours, _u8(_a1111_overlay(drawn, original, w)))
    assert np.array_equal(ours, _u8(VaeImageProcessor().apply_overlay(mask_for_overlay, original, drawn)))
    float_blend = np.rint(_u8(original) * (1 - w[..., None]) + _u8(drawn) * w[..., None])
    assert np.abs(ours - float_blend).max() == (1 if blur else 0)                # only the ramp rounds


def test_outpainting_keeps_the_original_picture(pipes):
    from sdlab.pipeline.images import pad_for_outpaint

    image, mask = pad_for_outpaint(_picture(), right=16, mask_overlap=8)
    result = pipes["sd1"].inpaint("a wide field", image, mask, steps=2, seed=1, sampler="Euler").images[0]
    kept = _u8(result)[:, :SIZE - 8 - 1]                                     # left of the seam's blend
    assert np.array_equal(kept, _u8(image)[:, :SIZE - 8 - 1])


def test_paste_back_needs_a_bool():
    from sdlab.pipeline.request import GenerationRequest, RequestError, resolve

    request = GenerationRequest("x", init_image=_picture(), mask_image=_square_mask(), paste_back="yes")
    with pytest.raises(RequestError, match="paste_back must be True or False"):
        resolve(request, default_size=SIZE, default_sampler="Euler", default_schedule="karras", factor=8)


def test_weights_stay_in_the_unit_interval():
    soft = blur_mask(_square_mask(), 5.0, (48, 40))
    assert soft.shape == (1, 1, 40, 48)
    assert float(soft.min()) >= 0 and float(soft.max()) <= 1
    assert torch.equal(overlay_weight(torch.tensor([0.0, 0.25, 0.5, 0.9])), torch.tensor([0.0, 0.5, 1.0, 1.0]))


@pytest.mark.parametrize("convention, blended", [("a1111", True), ("diffusers", False)])
def test_a1111_convention_blends_the_kept_latent_for_inpainting_models_too(convention, blended):
    """A1111 blends the init latent into the kept region for every model (`CFGDenoiser`), diffusers' 9-channel
    pipeline leaves it to the model; the A1111 convention (its API, its pictures) does as A1111."""
    from bundle_fixtures import init_picture, lower_right_mask, tiny_bundle

    from sdlab.diffusion.noise import generators_for
    from sdlab.pipeline.generate import encode_image, sample_latents
    from sdlab.pipeline.images import latent_mask, pil_to_tensor
    from sdlab.pipeline.plan import make_plan
    from sdlab.pipeline.request import GenerationRequest

    bundle = tiny_bundle("sd1-inpaint")
    request = GenerationRequest("x", steps=3, seed=1, width=32, height=32, sampler="Euler", init_image=init_picture(32),
                                mask_image=lower_right_mask(32), strength=0.75, img2img_convention=convention)
    plan = make_plan(bundle, request)
    latents = sample_latents(bundle, plan)                                             # (1, 4, 16, 16)
    generators = None if convention == "a1111" else generators_for(plan.request.seeds())  # A1111: the mean
    known = encode_image(bundle, pil_to_tensor(init_picture(32)), generators)
    keep = latent_mask((plan.mask >= 0.5).float(), 2) == 0                              # (1, 1, 16, 16)
    same = torch.allclose(latents[keep.expand_as(latents)], known[keep.expand_as(known)], atol=1e-5)
    assert same == blended


def test_a1111_convention_blends_only_the_output_and_starts_from_the_noised_init_latent():
    """A1111's default inpainting (`CFGDenoiser`, `mask_before_denoising` off): the model sees x as the sampler
    has it and only its x0 is blended; at denoising 1 the start is the init latent plus noise at sigma_max."""
    from bundle_fixtures import init_picture, lower_right_mask

    from sdlab.diffusion.guidance import masked
    from sdlab.diffusion.noise import generators_for
    from sdlab.pipeline.generate import _start
    from sdlab.pipeline.plan import make_plan
    from sdlab.pipeline.request import GenerationRequest

    seen = []
    inner = lambda x, sigma, **_: seen.append(x) or torch.zeros_like(x)               # noqa: E731
    x, known, mask = torch.randn(1, 4, 4, 4), torch.ones(1, 4, 4, 4), torch.zeros(1, 1, 4, 4)
    mask[..., :2] = 1
    out = masked(inner, known, mask, torch.randn(1, 4, 4, 4), blend_from_call=None)(x, torch.ones(1))
    assert torch.equal(seen[0], x) and torch.equal(out, mask * 0 + (1 - mask) * known)

    bundle = tiny_bundle("sd1")
    for convention in ("a1111", "diffusers"):
        plan = make_plan(bundle, GenerationRequest(
            "x", steps=3, seed=1, width=32, height=32, sampler="Euler", init_image=init_picture(32),
            mask_image=lower_right_mask(32), strength=1.0, img2img_convention=convention))
        start = _start(bundle, plan, generators_for(plan.request.seeds()))
        from_init = torch.allclose(start.x, start.image_latent + start.noise * plan.sigmas[0], atol=1e-5)
        assert from_init == (convention == "a1111")
