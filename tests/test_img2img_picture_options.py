"""A1111's img2img resize modes, inpainting's Masked content and Inpaint area "Only masked", checked against
A1111's own functions transcribed here (``modules/images.py`` ``resize_image`` with no img2img upscaler,
``modules/masking.py`` ``get_crop_region_v2`` / ``expand_crop_region`` / ``fill``, ``modules/processing.py``
``uncrop`` / ``apply_overlay``) and against runs that reach the same inputs another way.

Reduced-width random SD1 models, pictures of 32 to 48 pixels, 2 steps.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from bundle_fixtures import tiny_bundle
from PIL import Image, ImageFilter, ImageOps

from sdlab.api import Pipeline
from sdlab.diffusion.noise import generators_for
from sdlab.pipeline.generate import _start, encode_image
from sdlab.pipeline.images import a1111_latent_mask, latent_mask, pil_to_tensor
from sdlab.pipeline.infotext import from_parameters, to_parameters
from sdlab.pipeline.inpaint_area import inpaint_region
from sdlab.pipeline.masked_content import fill
from sdlab.pipeline.overlay import blurred_mask
from sdlab.pipeline.plan import make_plan
from sdlab.pipeline.png_info import format_parameters, parse_parameters
from sdlab.pipeline.request import GenerationRequest, RequestError, next_batch
from sdlab.pipeline.upscale import resize_image

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
LANCZOS = Image.Resampling.LANCZOS


# ---------------------------------------------------------------------------------------------------------
# A1111, transcribed (upscaler_for_img2img None: every resize is a plain Lanczos resize)


def a1111_resize_image(resize_mode, im, width, height):
    if im.mode == "RGBA":
        im = im.convert("RGB")

    def resize(im, w, h):
        return im.resize((w, h), resample=LANCZOS)

    if resize_mode == 0:
        res = resize(im, width, height)
    elif resize_mode == 1:
        ratio = width / height
        src_ratio = im.width / im.height
        src_w = width if ratio > src_ratio else im.width * height // im.height
        src_h = height if ratio <= src_ratio else im.height * width // im.width
        resized = resize(im, src_w, src_h)
        res = Image.new("RGB", (width, height))
        res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    else:
        ratio = width / height
        src_ratio = im.width / im.height
        src_w = width if ratio < src_ratio else im.width * height // im.height
        src_h = height if ratio >= src_ratio else im.height * width // im.width
        resized = resize(im, src_w, src_h)
        res = Image.new("RGB", (width, height))
        res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
        if ratio < src_ratio:
            fill_height = height // 2 - src_h // 2
            if fill_height > 0:
                res.paste(resized.resize((width, fill_height), box=(0, 0, width, 0)), box=(0, 0))
                res.paste(resized.resize((width, fill_height), box=(0, resized.height, width, resized.height)),
                          box=(0, fill_height + src_h))
        elif ratio > src_ratio:
            fill_width = width // 2 - src_w // 2
            if fill_width > 0:
                res.paste(resized.resize((fill_width, height), box=(0, 0, 0, height)), box=(0, 0))
                res.paste(resized.resize((fill_width, height), box=(resized.width, 0, resized.width, height)),
                          box=(fill_width + src_w, 0))
    return res


def a1111_get_crop_region_v2(mask, pad=0):
    mask = mask if isinstance(mask, Image.Image) else Image.fromarray(mask)
    if box := mask.getbbox():
        x1, y1, x2, y2 = box
        return (max(x1 - pad, 0), max(y1 - pad, 0), min(x2 + pad, mask.size[0]),
                min(y2 + pad, mask.size[1])) if pad else box


def a1111_expand_crop_region(crop_region, processing_width, processing_height, image_width, image_height):
    x1, y1, x2, y2 = crop_region
    ratio_crop_region = (x2 - x1) / (y2 - y1)
    ratio_processing = processing_width / processing_height
    if ratio_crop_region > ratio_processing:
        desired_height = (x2 - x1) / ratio_processing
        desired_height_diff = int(desired_height - (y2 - y1))
        y1 -= desired_height_diff // 2
        y2 += desired_height_diff - desired_height_diff // 2
        if y2 >= image_height:
            diff = y2 - image_height
            y2 -= diff
            y1 -= diff
        if y1 < 0:
            y2 -= y1
            y1 -= y1
        if y2 >= image_height:
            y2 = image_height
    else:
        desired_width = (y2 - y1) * ratio_processing
        desired_width_diff = int(desired_width - (x2 - x1))
        x1 -= desired_width_diff // 2
        x2 += desired_width_diff - desired_width_diff // 2
        if x2 >= image_width:
            diff = x2 - image_width
            x2 -= diff
            x1 -= diff
        if x1 < 0:
            x2 -= x1
            x1 -= x1
        if x2 >= image_width:
            x2 = image_width
    return x1, y1, x2, y2


def a1111_fill(image, mask):
    image_mod = Image.new("RGBA", (image.width, image.height))
    image_masked = Image.new("RGBa", (image.width, image.height))
    image_masked.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    image_masked = image_masked.convert("RGBa")
    for radius, repeats in [(256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)]:
        blurred = image_masked.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            image_mod.alpha_composite(blurred)
    return image_mod.convert("RGB")


def a1111_only_masked_overlay(image, mask_for_overlay):
    """The overlay image of StableDiffusionProcessingImg2Img.init (the picture where the mask is not)."""
    image_masked = Image.new("RGBa", (image.width, image.height))
    image_masked.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask_for_overlay.convert("L")))
    return image_masked.convert("RGBA")


def a1111_apply_overlay(image, paste_loc, overlay):
    x, y, w, h = paste_loc                                   # uncrop
    base_image = Image.new("RGBA", (overlay.width, overlay.height))
    image = a1111_resize_image(1, image, w, h)
    base_image.paste(image, (x, y))
    image = base_image.convert("RGBA")
    image.alpha_composite(overlay)
    return image.convert("RGB")


# ---------------------------------------------------------------------------------------------------------
# pictures


def _picture(width: int = 48, height: int = 32) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack([x / (width - 1), y / (height - 1), 1 - x * y / ((width - 1) * (height - 1))], axis=-1)
    noise = np.random.default_rng(3).integers(-20, 20, rgb.shape)
    return Image.fromarray(np.clip(rgb * 255 + noise, 0, 255).astype(np.uint8))


def _mask(width: int = 48, height: int = 32, box: tuple[int, int, int, int] = (26, 6, 38, 14)) -> Image.Image:
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, box)
    return mask


def _u8(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(np.int16)


@pytest.fixture(scope="module")
def pipe():
    return Pipeline(tiny_bundle("sd1", seed=7))


def _inpaint(pipe, **options):
    settings = dict(steps=2, seed=5, sampler="Euler", img2img_convention="a1111", mask_blur=1.5) | options
    return pipe.inpaint("a red hat", settings.pop("init_image", _picture()), settings.pop("mask_image", _mask()),
                        **settings)


# ---------------------------------------------------------------------------------------------------------
# the pieces against A1111's


@pytest.mark.parametrize("source", [(48, 32), (32, 48), (30, 30), (33, 17)])
@pytest.mark.parametrize("target", [(32, 32), (40, 24), (24, 40), (48, 32)])
@pytest.mark.parametrize("mode", ["resize", "crop", "fill"])
def test_resize_modes_are_a1111s_resize_image(source, target, mode):
    index = ["resize", "crop", "fill"].index(mode)
    picture = _picture(*source)
    assert np.array_equal(_u8(resize_image(picture, "None", target, mode=mode)),
                          _u8(a1111_resize_image(index, picture, *target)))
    grey = blurred_mask(_mask(*source, box=(3, 2, 20, 12)), 2.0)              # masks go through it too ("L")
    ours = resize_image(grey, "None", target, mode=mode)
    reference = a1111_resize_image(index, grey, *target).convert("L")
    assert ours.mode == "L" and np.array_equal(np.asarray(ours), np.asarray(reference))


def test_only_masked_region_is_a1111s_crop_region():
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(300):
        width, height = rng.integers(16, 90, 2)
        mask = np.zeros((height, width), dtype=np.uint8)
        x1, y1 = rng.integers(0, width), rng.integers(0, height)
        x2, y2 = rng.integers(x1, width + 1), rng.integers(y1, height + 1)
        mask[y1:y2, x1:x2] = rng.integers(0, 256)
        image = Image.fromarray(mask)
        padding = int(rng.choice([0, 1, 4, 32]))
        size = tuple(int(v) for v in rng.choice([8, 16, 32, 48, 64], 2))
        box = a1111_get_crop_region_v2(image, padding)
        expected = None if box is None else a1111_expand_crop_region(box, *size, width, height)
        assert inpaint_region(image, padding, size) == expected
        checked += expected is not None
    assert checked > 200
    # a mask drawn in a 16x4 strip, processed square: grown to 16x16 around it, then moved inside the picture
    strip = _mask(64, 64, (40, 60, 56, 64))
    expected = a1111_expand_crop_region((40, 60, 56, 64), 32, 32, 64, 64)
    assert inpaint_region(strip, 0, (32, 32)) == expected == (40, 48, 56, 64)


def test_fill_is_a1111s_masking_fill():
    picture = _picture()
    mask = blurred_mask(_mask(), 2.0)
    filled = fill(picture, mask)
    assert np.array_equal(_u8(filled), _u8(a1111_fill(picture, mask)))
    outside = np.asarray(mask) == 0
    assert np.array_equal(_u8(filled)[outside], _u8(picture)[outside])              # kept pixels are kept
    assert np.abs(_u8(filled)[~outside] - _u8(picture)[~outside]).max() > 20       # the masked area is painted


# ---------------------------------------------------------------------------------------------------------
# resize modes in a run


@pytest.mark.parametrize("mode", ["resize", "crop", "fill"])
def test_img2img_encodes_the_picture_resized_by_its_mode(pipe, mode):
    plan = pipe.resolve(GenerationRequest("x", init_image=_picture(), width=32, height=32, resize_mode=mode))
    index = ["resize", "crop", "fill"].index(mode)
    assert np.array_equal(_u8(plan.picture.image), _u8(a1111_resize_image(index, _picture(), 32, 32)))
    assert plan.picture.mask is None and plan.picture.overlay is None


@pytest.mark.parametrize(("size", "tiled_vae"), [((48, 32), None), ((49, 31), None), ((49, 31), True)])
def test_latent_resize_mode_interpolates_the_init_latent(pipe, size, tiled_vae):
    """A1111's "Just resize (latent upscale)": the picture encoded at its own size, the latent resized bilinear.
    Any size: sides that are not multiples of the VAE factor (2 here) give floor(side / 2) latent pixels, as
    A1111's encoder does; such a picture is encoded whole even when the VAE is asked to tile."""
    bundle, picture = pipe.bundle, _picture(*size)
    plan = make_plan(bundle, GenerationRequest("x", init_image=picture, width=32, height=24, resize_mode="latent",
                                               strength=0.5, img2img_convention="a1111", steps=2, seed=1,
                                               tiled_vae=tiled_vae))
    start = _start(bundle, plan, generators_for(plan.request.seeds()))
    own = bundle.vae.moments(pil_to_tensor(picture))[:, :4] * bundle.scaling_factor       # (1, 4, 16 or 15, 24)
    assert own.shape[-2:] == (size[1] // 2, size[0] // 2)
    expected = F.interpolate(own, size=(12, 16), mode="bilinear")                           # (1, 4, 12, 16)
    assert start.image_latent.shape == (1, 4, 12, 16)
    torch.testing.assert_close(start.image_latent, expected, rtol=0, atol=0)
    assert pipe.run(plan).images[0].size == (32, 24)


def test_whole_picture_inpainting_resizes_mask_and_picture_by_the_mode(pipe):
    """A1111: image_mask = resize_image(resize_mode, blurred mask); mask_for_overlay = 2 x it; the overlay is
    the picture resized by the same mode."""
    plan = pipe.resolve(GenerationRequest("x", init_image=_picture(), mask_image=_mask(), mask_blur=1.5, width=32,
                                          height=32, resize_mode="crop"))
    blurred = blurred_mask(_mask(), 1.5)
    image_mask = np.asarray(a1111_resize_image(1, blurred, 32, 32).convert("L"), dtype=np.float32)
    assert np.array_equal(plan.mask[0, 0].numpy() * 255, image_mask)
    overlay = plan.picture.overlay
    assert np.array_equal(_u8(overlay.original), _u8(a1111_resize_image(1, _picture(), 32, 32)))
    assert np.array_equal(np.rint(overlay.weight[0, 0].numpy() * 255), np.clip(image_mask * 2, 0, 255))
    assert overlay.region is None


# ---------------------------------------------------------------------------------------------------------
# Masked content


def test_fill_is_what_the_init_latent_is_encoded_from(pipe):
    """"fill" draws what "original" draws from A1111's filled picture (resized by the mode, then filled by the
    resized blurred mask): the decoded pictures are equal."""
    blurred = a1111_resize_image(1, blurred_mask(_mask(), 1.5), 32, 32).convert("L")
    filled = a1111_fill(a1111_resize_image(1, _picture(), 32, 32), blurred)
    ours = _inpaint(pipe, inpaint_fill="fill", width=32, height=32, resize_mode="crop", paste_back=False)
    reference = _inpaint(pipe, init_image=filled, mask_image=blurred, mask_blur=0, inpaint_fill="original",
                         paste_back=False)
    assert np.array_equal(_u8(ours.images[0]), _u8(reference.images[0]))
    original = _inpaint(pipe, inpaint_fill="original", width=32, height=32, resize_mode="crop", paste_back=False)
    assert not np.array_equal(_u8(ours.images[0]), _u8(original.images[0]))


@pytest.mark.parametrize("content", ["latent noise", "latent nothing"])
def test_latent_noise_is_each_seeds_first_draw_and_nothing_is_zero(pipe, content):
    """A1111: init_latent * mask + create_random_tensors(shape, all_seeds[0:B]) * nmask, the seeds' first draws
    (the very draw its initial noise is too); "latent nothing" leaves zeros. Both encode the filled picture."""
    bundle = pipe.bundle
    request = GenerationRequest("x", init_image=_picture(), mask_image=_mask(), mask_blur=1.5, batch_size=2, seed=11,
                                inpaint_fill=content, img2img_convention="a1111", strength=1.0, steps=2)
    plan = make_plan(bundle, request)
    start = _start(bundle, plan, generators_for(plan.request.seeds()))
    repaint = a1111_latent_mask(plan.mask, (24, 16)).bool().expand(2, 4, -1, -1)                # (2, 4, 16, 24)
    assert 0 < repaint[0, 0].sum() < repaint[0, 0].numel()
    filled = fill(_picture(), blurred_mask(_mask(), 1.5))
    encoded = encode_image(bundle, pil_to_tensor(filled)).expand(2, -1, -1, -1)               # (2, 4, 16, 24)
    torch.testing.assert_close(start.image_latent[~repaint], encoded[~repaint], rtol=0, atol=0)
    if content == "latent nothing":
        assert torch.equal(start.image_latent[repaint], torch.zeros(int(repaint.sum())))
        return
    draws = torch.cat([torch.randn((1, 4, 16, 24), generator=torch.Generator().manual_seed(seed))
                       for seed in (11, 12)])                                                  # (2, 4, 16, 24)
    assert torch.equal(start.image_latent[repaint], draws[repaint])
    assert torch.equal(start.noise, draws)                       # A1111's initial noise: the same first draws


@pytest.mark.parametrize("convention, variation", [("a1111", False), ("a1111", True), ("diffusers", False)])
def test_latent_noise_of_later_batches_is_the_first_batchs_under_a1111s_convention(pipe, convention, variation):
    """A1111 fills the init latent once per job, in `init` before its n_iter loop, from ``all_seeds[0:B]``: every
    batch of a batch count repaints the first batch's latent noise (its own initial noise still its seeds');
    diffusers' convention draws each batch's from its own seeds."""
    bundle = pipe.bundle
    extra = dict(subseed=5, subseed_strength=0.5) if variation else {}
    request = GenerationRequest("x", init_image=_picture(), mask_image=_mask(), mask_blur=1.5, batch_size=2, seed=11,
                                inpaint_fill="latent noise", img2img_convention=convention, strength=0.75, steps=2,
                                **extra)
    first = make_plan(bundle, request).request
    later = make_plan(bundle, next_batch(first, 2)).request                          # all_seeds[4:6]
    start = _start(bundle, make_plan(bundle, later), generators_for(later.seeds()))
    repaint = start.latent_mask.bool().expand(2, 4, -1, -1)                            # (2, 4, 16, 24)
    seeds = [11, 11] if variation else [11, 12] if convention == "a1111" else [15, 16]
    draws = torch.cat([torch.randn((1, 4, 16, 24), generator=torch.Generator().manual_seed(seed))
                       for seed in seeds])                                             # (2, 4, 16, 24)
    assert torch.equal(start.image_latent[repaint], draws[repaint])
    assert later.seeds() == ([11, 11] if variation else [15, 16])                     # its own noise's seeds


# ---------------------------------------------------------------------------------------------------------
# Inpaint area "Only masked"


def test_only_masked_draws_the_region_and_pastes_it_back_as_a1111(pipe):
    options = dict(inpaint_only_masked=True, inpaint_padding=4, width=32, height=32, inpaint_fill="original")
    plan = pipe.resolve(GenerationRequest("x", init_image=_picture(), mask_image=_mask(), mask_blur=1.5, **options))
    blurred = blurred_mask(_mask(), 1.5)
    region = a1111_expand_crop_region(a1111_get_crop_region_v2(blurred, 4), 32, 32, 48, 32)
    assert plan.picture.overlay.region == region == (18, 0, 46, 28)                # 28 x 22 grown to 28 x 28
    assert np.array_equal(_u8(plan.picture.image), _u8(a1111_resize_image(2, _picture().crop(region), 32, 32)))
    crop_mask = np.asarray(a1111_resize_image(2, blurred.crop(region), 32, 32).convert("L"), dtype=np.float32)
    assert np.array_equal(plan.mask[0, 0].numpy() * 255, crop_mask)

    pasted = _inpaint(pipe, **options).images[0]
    drawn = _inpaint(pipe, **options, paste_back=False).images[0]
    assert pasted.size == (48, 32) and drawn.size == (32, 32)
    x1, y1, x2, y2 = region
    outside = np.ones((32, 48), dtype=bool)
    outside[y1:y2, x1:x2] = False
    assert np.array_equal(_u8(pasted)[outside], _u8(_picture())[outside])            # the picture itself
    overlay = a1111_only_masked_overlay(_picture(), blurred)
    expected = a1111_apply_overlay(drawn, (x1, y1, x2 - x1, y2 - y1), overlay)
    assert np.array_equal(_u8(pasted), _u8(expected))                                # PIL's arithmetic too
    inside = np.asarray(blurred) > 200
    assert np.abs(_u8(pasted)[inside] - _u8(_picture())[inside]).max() > 10          # the region was redrawn


def test_only_masked_with_a_blank_mask_draws_img2img_of_the_whole_picture(pipe):
    blank = Image.new("L", (48, 32), 0)
    result = _inpaint(pipe, mask_image=blank, inpaint_only_masked=True, strength=0.6)
    assert result.request.mask_image is None and result.request.mode == "img2img"
    img2img = pipe.img2img("a red hat", _picture(), strength=0.6, steps=2, seed=5, sampler="Euler",
                           img2img_convention="a1111", mask_blur=1.5)
    assert np.array_equal(_u8(result.images[0]), _u8(img2img.images[0]))
    assert "Masked content" not in format_parameters(to_parameters(result.request))


# ---------------------------------------------------------------------------------------------------------
# parameters


def test_parameters_write_and_read_a1111s_labels(pipe):
    resolved = pipe.resolve(GenerationRequest(
        "x", init_image=_picture(), mask_image=_mask(), inpaint_fill="latent noise", inpaint_only_masked=True,
        inpaint_padding=12, resize_mode="crop", width=32, height=32)).request
    p = to_parameters(resolved)
    assert (p["Inpaint area"], p["Masked area padding"], p["Masked content"]) == ("Only masked", 12, "latent noise")
    assert "Resize mode" not in format_parameters(p)                     # A1111 writes no resize mode
    back = from_parameters(parse_parameters(format_parameters(p)))
    assert (back["inpaint_fill"], back["inpaint_only_masked"], back["inpaint_padding"]) == ("latent noise", True, 12)
    plain = format_parameters(to_parameters(GenerationRequest("x", init_image=_picture(), mask_image=_mask(), seed=1)))
    assert not [label for label in ("Masked content", "Inpaint area", "Masked area padding") if label in plain]
    a1111 = "x\nSteps: 20, Sampler: Euler, Seed: 1, Size: 512x512, Mask blur: 4, Inpaint area: Only masked, " \
            "Masked area padding: 32, Masked content: fill, Denoising strength: 0.75"
    fields = from_parameters(parse_parameters(a1111))
    assert (fields["inpaint_fill"], fields["inpaint_only_masked"], fields["inpaint_padding"]) == ("fill", True, 32)
    with pytest.raises(ValueError, match="Inpaint area"):
        from_parameters(parse_parameters(a1111.replace("Only masked", "Everything")))


# ---------------------------------------------------------------------------------------------------------
# bad values


@pytest.mark.parametrize("options, message", [
    (dict(resize_mode="stretch"), "unknown resize mode 'stretch'; valid: resize, crop, fill, latent"),
    (dict(resize_mode=1), "unknown resize mode 1"),
    (dict(inpaint_fill="noise"), "unknown masked content 'noise'; valid: fill, original, latent noise, latent nothing"),
    (dict(inpaint_fill="latent-noise"), "unknown masked content"),
    (dict(inpaint_only_masked="yes"), "inpaint_only_masked must be True or False"),
    (dict(inpaint_padding=-1), "inpaint_padding must be a number of pixels in 0..8192, got -1"),
    (dict(inpaint_padding=2.5), "inpaint_padding must be a number of pixels"),
    (dict(resize_mode="latent", width=32, height=32), "resize mode 'latent' cannot inpaint a 48x32 picture at 32x32"),
])
def test_bad_values_are_one_request_error(pipe, options, message):
    with pytest.raises(RequestError) as err:
        pipe.resolve(GenerationRequest("x", init_image=_picture(), mask_image=_mask(), **options))
    assert message in str(err.value)


# ---------------------------------------------------------------------------------------------------------
# several init pictures, mask blur x / y, inverted masks, the initial noise multiplier


def test_each_picture_of_the_batch_starts_from_its_own_init_image(pipe):
    """A1111's several `init_images`: picture i draws init image i % N, in one batch and with its own seed;
    outside the mask every picture is its own init image's."""
    first, second = _picture(), Image.new("RGB", (48, 32), (0, 200, 0))
    mask = _mask()
    both = _inpaint(pipe, init_image=first, init_images=(first, second), mask_image=mask, batch_size=4,
                    inpaint_fill="original").images
    outside = np.asarray(blurred_mask(mask, 1.5)) == 0
    for i, image in enumerate(both):
        assert np.array_equal(_u8(image)[outside], _u8((first, second)[i % 2])[outside])
    alone = _inpaint(pipe, init_image=second, mask_image=mask, seed=6, inpaint_fill="original").images[0]
    assert np.abs(_u8(alone) - _u8(both[1])).max() <= 1                   # picture 1: seed 6, the second picture


def test_more_init_images_than_pictures_are_refused(pipe):
    with pytest.raises(RequestError, match="3 init images for a batch of 2"):
        pipe.resolve(GenerationRequest("x", init_images=(_picture(),) * 3, batch_size=2, steps=2))


@pytest.mark.parametrize("mode", ["resize", "crop", "fill"])
def test_init_images_of_several_sizes_are_each_resized_by_the_mode(pipe, mode):
    """A1111's `StableDiffusionProcessingImg2Img.init` brings every init image to width x height
    (`images.resize_image(self.resize_mode, image, self.width, self.height)`) before it batches them."""
    inits = (_picture(), _picture(30, 30))
    plan = pipe.resolve(GenerationRequest("x", init_images=inits, batch_size=2, width=32, height=24, resize_mode=mode))
    index = ["resize", "crop", "fill"].index(mode)
    for picture, init in zip(plan.pictures, inits):
        assert np.array_equal(_u8(picture.image), _u8(a1111_resize_image(index, init, 32, 24)))
    drawn = pipe.img2img("x", inits[0], init_images=inits, batch_size=2, width=32, height=24, resize_mode=mode,
                         steps=2, seed=5, sampler="Euler", img2img_convention="a1111").images
    alone = pipe.img2img("x", inits[1], width=32, height=24, resize_mode=mode, steps=2, seed=6, sampler="Euler",
                         img2img_convention="a1111").images[0]
    assert [image.size for image in drawn] == [(32, 24)] * 2 and np.abs(_u8(drawn[1]) - _u8(alone)).max() <= 1


def test_only_masked_crops_each_init_image_at_the_first_ones_region_as_a1111(pipe):
    """"Only masked" does not resize the init images first: A1111 crops each at the mask's crop region and
    resizes the crop by "Resize and fill", its overlay the blurred mask resized to that picture."""
    first, second = _picture(), _picture(40, 36)
    options = dict(inpaint_only_masked=True, inpaint_padding=4, width=32, height=32, inpaint_fill="original")
    plan = pipe.resolve(GenerationRequest("x", init_images=(first, second), batch_size=2, mask_image=_mask(),
                                          mask_blur=1.5, **options))
    blurred = blurred_mask(_mask(), 1.5)
    region = a1111_expand_crop_region(a1111_get_crop_region_v2(blurred, 4), 32, 32, 48, 32)
    assert np.array_equal(_u8(plan.pictures[1].image), _u8(a1111_resize_image(2, second.crop(region), 32, 32)))
    drawn = _inpaint(pipe, init_images=(first, second), batch_size=2, paste_back=False, **options).images
    pasted = _inpaint(pipe, init_images=(first, second), batch_size=2, **options).images
    x1, y1, x2, y2 = region
    overlay = a1111_only_masked_overlay(second, a1111_resize_image(0, blurred, *second.size))
    expected = a1111_apply_overlay(drawn[1], (x1, y1, x2 - x1, y2 - y1), overlay)
    assert pasted[1].size == second.size and np.array_equal(_u8(pasted[1]), _u8(expected))


def test_init_images_of_several_sizes_without_one_size_to_draw_them_at_are_refused(pipe):
    inits = (_picture(), _picture(32, 32))
    with pytest.raises(RequestError, match=r"several sizes \(32x32, 48x32\) need width and height"):
        pipe.resolve(GenerationRequest("x", init_images=inits, batch_size=2, width=32, steps=2))
    with pytest.raises(RequestError, match="resize mode 'latent' encodes each init image at its own size"):
        pipe.resolve(GenerationRequest("x", init_images=inits, batch_size=2, width=32, height=32, resize_mode="latent"))
    blank = Image.new("L", (48, 32), 0)                     # "Only masked" without a region: A1111 keeps the sizes
    with pytest.raises(RequestError, match="resize mode 'latent' encodes each init image at its own size"):
        pipe.resolve(GenerationRequest("x", init_images=inits, batch_size=2, width=32, height=32, resize_mode="latent",
                                       mask_image=blank, inpaint_only_masked=True))
    cropped = pipe.resolve(GenerationRequest("x", init_images=inits, batch_size=2, width=32, height=32,
                                             resize_mode="latent", mask_image=_mask(), inpaint_only_masked=True))
    assert [picture.image.size for picture in cropped.pictures] == [(32, 32)] * 2


def test_mask_blur_y_blurs_along_y_alone_and_0_leaves_an_axis_as_it_is():
    stripes = Image.new("L", (32, 32), 0)
    stripes.paste(255, (0, 12, 32, 20))                                   # varies along y only
    assert np.array_equal(np.asarray(blurred_mask(stripes, 4.0, 0.0)), np.asarray(stripes))
    along_y = np.asarray(blurred_mask(stripes, 0.0, 4.0))
    assert not np.array_equal(along_y, np.asarray(stripes))
    assert np.array_equal(along_y, np.asarray(blurred_mask(stripes, 4.0)))   # x's blur changes no row here


def test_an_inverted_mask_repaints_where_the_mask_is_black_and_is_recorded(pipe):
    inverted = _inpaint(pipe, invert_mask=True)
    assert np.array_equal(_u8(inverted.images[0]), _u8(_inpaint(pipe, mask_image=ImageOps.invert(_mask())).images[0]))
    labels = to_parameters(inverted.request)
    assert labels["Mask mode"] == "Inpaint not masked"
    assert from_parameters(parse_parameters(format_parameters(labels)))["invert_mask"] is True
    assert to_parameters(_inpaint(pipe).request)["Mask mode"] is None          # None: left out of the text


def test_uneven_mask_blur_is_recorded_by_axis():
    """A1111 writes no Mask blur when x and y differ; sdlab writes Mask blur x / y and reads them back."""
    request = GenerationRequest("x", init_image=_picture(), mask_image=_mask(), mask_blur=8.0, mask_blur_y=0.0,
                                seed=1, steps=2, width=48, height=32)
    labels = to_parameters(request)
    assert labels["Mask blur"] is None and (labels["Mask blur x"], labels["Mask blur y"]) == (8.0, 0.0)
    fields = from_parameters(parse_parameters(format_parameters(labels)))
    assert (fields["mask_blur"], fields["mask_blur_y"]) == (8.0, 0.0)


def test_the_noise_multiplier_scales_the_initial_noise_and_is_recorded(pipe):
    """A1111's `sample`: x = rng.next() * initial_noise_multiplier, then init latent + x * sigma."""
    def start(multiplier: float):
        plan = make_plan(pipe.bundle, GenerationRequest("x", init_image=_picture(), steps=2, seed=5, sampler="Euler",
                                                        img2img_convention="a1111", noise_multiplier=multiplier))
        return plan, _start(pipe.bundle, plan, generators_for(plan.request.seeds()))

    plan, half = start(0.5)
    _, whole = start(1.0)
    assert torch.equal(half.image_latent, whole.image_latent)
    assert torch.allclose(half.x - half.image_latent, 0.5 * (whole.x - whole.image_latent), atol=1e-6)
    labels = to_parameters(plan.request)
    assert labels["Noise multiplier"] == 0.5
    assert from_parameters(parse_parameters(format_parameters(labels)))["noise_multiplier"] == 0.5
    assert to_parameters(replace(plan.request, noise_multiplier=1.0))["Noise multiplier"] is None


def _pil_latmask(mask: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """A1111's processing.py: latmask = init_mask.convert('RGB').resize(size) / 255, [0], np.around."""
    return np.around(np.moveaxis(np.array(mask.convert("RGB").resize(size), dtype=np.float32), 2, 0) / 255)[0]


@pytest.mark.parametrize("box, sigma", [((20, 20, 44, 44), 4.0), ((13, 13, 51, 51), 0.0), ((36, 8, 52, 20), 4.0)])
def test_a1111_convention_repaints_a1111s_latent_cells_and_diffusers_its_own(pipe, box, sigma):
    """Under A1111's img2img convention the latent cells kept and repainted are A1111's `latmask` (the blurred
    mask resized with PIL's default resample, rounded); diffusers' convention keeps its nearest shrink."""
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, box)
    for convention in ("a1111", "diffusers"):
        request = GenerationRequest("x", init_image=_picture(64, 64), mask_image=mask, mask_blur=sigma, steps=2,
                                    seed=1, img2img_convention=convention, strength=0.5)
        plan = make_plan(pipe.bundle, request)
        start = _start(pipe.bundle, plan, generators_for(plan.request.seeds()))
        blurred = blurred_mask(mask, sigma)
        expected = (_pil_latmask(blurred, (32, 32)) if convention == "a1111"
                    else latent_mask((plan.mask >= 0.5).float(), 2)[0, 0].numpy())
        assert np.array_equal(start.latent_mask[0, 0].numpy(), expected)
