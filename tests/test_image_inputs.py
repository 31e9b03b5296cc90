"""Pictures read from files as they are meant to be seen (`pipeline.images.upright_8bit`): a JPEG with an
EXIF orientation (phone photos) is turned upright, as diffusers' `load_image` and A1111 do, and a 16-bit
greyscale PNG is scaled to 8 bits instead of clipped to white; for init images, upscaler inputs and
training data alike."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdlab.pipeline.images import read_image, upright_8bit
from sdlab.pipeline.request import input_image
from sdlab.train.data import load_training_image


def _sideways_jpeg(path: Path) -> Path:
    """A 64 wide x 32 high JPEG stored sideways with EXIF Orientation 6 (rotate 90 clockwise to view):
    upright it is 32 x 64, its top half white."""
    upright = Image.new("RGB", (32, 64), "black")
    upright.paste((255, 255, 255), (0, 0, 32, 32))
    stored = upright.transpose(Image.Transpose.ROTATE_90)          # what the camera wrote
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, exif=exif.tobytes(), quality=95)
    return path


def _ramp_16bit(path: Path) -> Path:
    ramp = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (16, 1))   # black -> white
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")
    return path


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    path = _sideways_jpeg(tmp_path / "phone.jpg")
    for image in (read_image(path), input_image(str(path), "init image")):
        assert image.size == (32, 64)
        pixels = np.asarray(image.convert("L"), dtype=np.float32)
        assert pixels[:28].mean() > 200 and pixels[36:].mean() < 50   # white on top
    loaded = load_training_image(path, 32, center_crop=True, random_flip=False, generator=torch.Generator())
    assert loaded.original_size == (64, 32)                        # (height, width), upright


def test_16_bit_greyscale_keeps_its_levels(tmp_path: Path) -> None:
    path = _ramp_16bit(tmp_path / "ramp16.png")
    image = read_image(path)
    assert image.mode == "L"
    levels = np.asarray(image, dtype=np.float32)
    assert abs(levels.mean() - 127.5) < 1 and levels.min() == 0 and levels.max() == 255
    loaded = load_training_image(path, 16, center_crop=True, random_flip=False, generator=torch.Generator())
    assert abs(float(loaded.pixels.mean())) < 0.05                 # [-1, 1]: mid-grey on average, not white


def test_ordinary_pictures_pass_unchanged() -> None:
    rgba = Image.new("RGBA", (5, 3), (10, 20, 30, 40))
    out = upright_8bit(rgba)
    assert out is not rgba and out.mode == "RGBA" and out.tobytes() == rgba.tobytes()


def test_a_transparent_init_picture_is_laid_on_white_as_a1111_flattens_it():
    from sdlab.pipeline.request import GenerationRequest, resolve

    cut_out = Image.new("RGBA", (16, 16), (0, 0, 0, 0))                  # transparent pixels stored black
    cut_out.paste((200, 0, 0, 255), (8, 0, 16, 16))
    cut_out.putpixel((0, 0), (0, 0, 255, 128))
    req = resolve(GenerationRequest("x", init_image=cut_out), default_size=16, default_sampler="Euler",
                  default_schedule="karras", factor=8)
    flat = np.asarray(req.init_image)
    assert req.init_image.mode == "RGB"
    assert (flat[1:, :8] == 255).all() and (flat[:, 8:] == (200, 0, 0)).all()
    assert tuple(flat[0, 0]) == (127, 127, 255)                            # A1111's paste(img, mask=img)
