"""An IP-Adapter picture under the request's control_convention "a1111", prepared as A1111's ControlNet extension
prepares it (sd-webui-controlnet `annotator/clipvision/__init__.py` `ClipVisionDetector.__call__`, transcribed
below with cv2 and transformers' `CLIPImageProcessor` on the extension's arguments): squashed to 224 x 224 by
OpenCV's INTER_AREA (`preprocess.area_resize`, compared with cv2 bit for bit on pictures that shrink, grow, both,
by whole and other factors), no crop, the unit's mask scaling the normalised pixels; diffusers' convention is
transformers' `CLIPImageProcessor` as before, bit for bit."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil

from ip_adapter_fixtures import SAMPLE_PICTURE
from sdlab.pipeline.clip_image import clip_pixels, extension_clip_pixels
from sdlab.pipeline.image_prompt import IPAdapterInput, picture_pixels
from sdlab.pipeline.preprocess import area_resize
from sdlab.pipeline.request import RequestError

cv2 = pytest.importorskip("cv2")

SIZES = [(100, 80), (224, 224), (223, 225), (150, 300), (57, 33), (400, 120), (500, 600), (448, 448), (672, 448),
         (1000, 700), (224, 100), (300, 224), (113, 224), (7, 5), (1, 1), (2000, 37), (225, 1000)]
"""(width, height): growing, shrinking, one side each way, 2 x 2, 3 x 2 and other factors, not square."""


# --- sd-webui-controlnet (main, annotator/clipvision/__init__.py): ClipVisionDetector's processor and the part of
# __call__ before the model; its input is the unit's RGB picture with the mask's first channel as a fourth
# (internal_controlnet/external_code.py ControlNetUnit.get_input_images_rgba / combine_image_and_mask) -------------

def extension_pixels(input_image: np.ndarray) -> torch.Tensor:
    processor = CLIPImageProcessorPil(crop_size=224, do_center_crop=True, do_convert_rgb=True, do_normalize=True,
                                      do_resize=True, image_mean=[0.48145466, 0.4578275, 0.40821073],
                                      image_std=[0.26862954, 0.26130258, 0.27577711], resample=3, size=224)
    mask = None
    input_image = cv2.resize(input_image, (224, 224), interpolation=cv2.INTER_AREA)
    if input_image.shape[2] == 4:  # Has alpha channel.
        mask = 255 - input_image[:, :, 3:4]
        input_image = input_image[:, :, :3]
    feat = processor(images=input_image, return_tensors="pt")
    if mask is not None:
        feat["pixel_values"] *= torch.from_numpy(mask).float().permute(2, 0, 1)[None] / 255.0   # rearrange h w c -> 1 c h w
    return feat["pixel_values"][0]


@pytest.mark.parametrize("ipp", [True, False])
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_area_resize_is_opencvs_inter_area_bit_for_bit(ipp, channels):
    rng = np.random.default_rng(channels)
    was = cv2.ipp.useIPP()
    cv2.ipp.setUseIPP(ipp)
    try:
        for width, height in SIZES:
            for target in ((224, 224), (97, 161)):
                picture = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
                expected = cv2.resize(picture, target, interpolation=cv2.INTER_AREA).reshape(*target[::-1], channels)
                assert np.array_equal(area_resize(picture, *target), expected), ((width, height), target)
    finally:
        cv2.ipp.setUseIPP(was)


@functools.cache
def _large_photo() -> np.ndarray:
    photo = np.asarray(Image.open(SAMPLE_PICTURE).convert("RGB").resize((3000, 2000), Image.Resampling.BICUBIC))
    return photo ^ np.random.default_rng(7).integers(0, 4, photo.shape, dtype=np.uint8)      # grain: 2 low bits


@pytest.mark.parametrize("target", [(224, 224), (1000, 667), (750, 500), (2999, 1999), (3100, 150)])
def test_area_resize_of_a_large_photo_is_opencvs(target):
    """A 3000 x 2000 photo (a camera's picture, as an IP-Adapter unit gets it) squashed to 224, shrunk by whole
    factors (4), by others, by a pixel, and stretched: cv2's INTER_AREA bit for bit."""
    photo = _large_photo()
    expected = cv2.resize(photo, target, interpolation=cv2.INTER_AREA)
    assert np.array_equal(area_resize(photo, *target), expected)


@pytest.mark.parametrize("band_values", [1, 777])
def test_area_resize_in_bands_is_the_same(monkeypatch, band_values):
    """Bands of one output row and of rows that divide nothing (sources shared by two bands): cv2's pixels."""
    import sdlab.pipeline.preprocess as module

    monkeypatch.setattr(module, "AREA_BAND_VALUES", band_values)
    rng = np.random.default_rng(8)
    for (width, height), target in (((150, 300), (97, 161)), ((301, 157), (100, 52)), ((96, 64), (32, 16)),
                                    ((97, 61), (40, 30)), ((120, 90), (180, 45)), ((90, 120), (45, 180)),
                                    ((33, 17), (70, 40))):                  # one side growing, both growing
        picture = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        expected = cv2.resize(picture, target, interpolation=cv2.INTER_AREA)
        assert np.array_equal(area_resize(picture, *target), expected), ((width, height), target)


def test_area_resize_that_grows_a_side_holds_a_band_at_a_time():
    """A 2000 x 1500 picture stretched to 3000 x 750 (a side growing: OpenCV's linear area mode) is cv2's, and
    holds its output and one band's int32 sums (22 MiB; it took 378 MiB, 60 times the 6.4 MiB output, in one piece)."""
    import tracemalloc

    picture = np.random.default_rng(9).integers(0, 256, (1500, 2000, 3), dtype=np.uint8)
    tracemalloc.start()
    try:
        out = area_resize(picture, 3000, 750)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.array_equal(out, cv2.resize(picture, (3000, 750), interpolation=cv2.INTER_AREA))
    assert peak < out.nbytes + (32 << 20)


def _picture(width: int, height: int) -> Image.Image:
    return Image.open(SAMPLE_PICTURE).convert("RGB").resize((width, height), Image.Resampling.BILINEAR)


@pytest.mark.parametrize("size", [(301, 157), (150, 323), (97, 61), (224, 224), (640, 480), (50, 400)])
def test_pixels_are_the_extensions(size):
    picture = _picture(*size)
    expected = extension_pixels(np.asarray(picture))
    assert torch.equal(extension_clip_pixels(picture), expected)
    # the extension squashes the whole picture where CLIPImageProcessor crops its centre
    assert size == (224, 224) or not torch.equal(expected, clip_pixels(picture))


@pytest.mark.parametrize("size", [(301, 157), (97, 61)])
def test_the_units_mask_is_the_extensions(size):
    picture = _picture(*size)
    rng = np.random.default_rng(5)
    mask = Image.fromarray(np.where(rng.random(size[::-1]) < 0.3, 255, 0).astype(np.uint8)).convert("RGB")
    rgba = np.concatenate([np.asarray(picture), np.asarray(mask)[:, :, :1]], axis=2)       # combine_image_and_mask
    ours = extension_clip_pixels(picture, mask=mask)
    assert torch.equal(ours, extension_pixels(rgba))
    assert not torch.equal(ours, extension_clip_pixels(picture))
    black = Image.new("L", size)                         # nothing masked: the picture's pixels (factor 1)
    assert torch.equal(extension_clip_pixels(picture, mask=black), extension_clip_pixels(picture))
    with pytest.raises(ValueError, match="the mask is 10x10"):
        extension_clip_pixels(picture, mask=Image.new("L", (10, 10)))


def test_the_convention_picks_the_preparation():
    picture = _picture(301, 157)
    prompt = IPAdapterInput("adapter.safetensors", picture)
    assert torch.equal(picture_pixels(prompt, 224, 0, "diffusers"), clip_pixels(picture))    # as before, bit for bit
    assert torch.equal(picture_pixels(prompt, 224, 0, "a1111"), extension_clip_pixels(picture))
    mask = Image.new("L", picture.size, 255)
    masked = IPAdapterInput("adapter.safetensors", picture, mask=mask)
    assert torch.equal(picture_pixels(masked, 224, 0, "a1111"), torch.zeros(3, 224, 224))
    with pytest.raises(RequestError, match="a mask is the A1111 ControlNet extension's"):
        picture_pixels(masked, 224, 0, "diffusers")
    with pytest.raises(RequestError, match="IP-Adapter 0: the mask is 3x3"):
        picture_pixels(IPAdapterInput("adapter.safetensors", picture, mask=Image.new("L", (3, 3))), 224, 0, "a1111")
