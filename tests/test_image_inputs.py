"""Pictures read from files as they are meant to be seen (`pipeline.images.upright_8bit`): a JPEG with an
EXIF orientation (phone photos) is turned upright, as diffusers' `load_image` and A1111 do, and a 16-bit
greyscale PNG is scaled to 8 bits instead of clipped to white; for init images, upscaler inputs and
training data alike."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps, PngImagePlugin

from sdlab.pipeline.images import mask_levels, on_white, read_image, upright_8bit
from sdlab.pipeline.request import input_image
from sdlab.server.config import Limits
from sdlab.server.inputs import image_from_bytes
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


def _float_tiff(path: Path, low: float, high: float, **tags: float) -> Path:
    """A 64 x 16 float (Pillow mode "F") TIFF ramp from `low` (black) to `high` (white); `tags`: TIFF tag
    number -> value (340 SMinSampleValue, 341 SMaxSampleValue)."""
    ramp = np.tile(np.linspace(low, high, 64, dtype=np.float32), (16, 1))
    Image.fromarray(ramp, mode="F").save(path, tiffinfo={int(k[1:]): v for k, v in tags.items()})
    assert Image.open(path).mode == "F"
    return path


def _stripe_png_16bit_rgb(path: Path) -> Path:
    """A 16-bit RGB PNG (written by hand: Pillow writes none), 64 x 16, red ramping black -> white."""
    import struct
    import zlib

    red = np.linspace(0, 65535, 64).round().astype(">u2")
    row = np.stack([red, np.zeros_like(red), np.zeros_like(red)], -1).tobytes()
    raw = b"".join(b"\x00" + row for _ in range(16))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 64, 16, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("low,high,tags", [
    (0.0, 1.0, {}),                              # Photoshop's, GIMP's, OpenCV's float convention
    (0.0, 255.0, {}),                            # values past 1: read as Pillow reads them (diffusers, kohya)
    (-1.0, 3.0, {"t340": -1.0, "t341": 3.0}),    # the file's SMinSampleValue / SMaxSampleValue
    (-0.02, 1.02, {}),                           # a 0..1 picture's overshoot, clipped (was read as 0..255: black)
])
def test_a_float_tiff_keeps_its_levels(tmp_path: Path, low, high, tags) -> None:
    """Before, a 0..1 float TIFF trained (and was read as an init picture) black: Pillow's convert clips it to
    0..1 of 255."""
    path = _float_tiff(tmp_path / "ramp.tif", low, high, **tags)
    image = read_image(path)
    levels = np.asarray(image, dtype=np.float32)
    assert image.mode == "L" and levels.min() == 0 and levels.max() == 255 and abs(levels.mean() - 127.5) < 1
    loaded = load_training_image(path, 16, center_crop=True, random_flip=False, generator=torch.Generator())
    assert abs(float(loaded.pixels.mean())) < 0.05                 # [-1, 1]: mid-grey on average, not black


def _integer_tiff(path: Path, writer: str, dtype: str) -> Path:
    """A 64 x 16 integer TIFF (Pillow opens it as mode "I") ramping black -> white over the whole range its
    `dtype` gives (unsigned 0..2**bits - 1; signed 0..2**(bits - 1) - 1, a column of negatives on the left,
    black), written by Pillow (mode "I": int32) or by tifffile."""
    info = np.iinfo(dtype)
    ramp = np.linspace(0, int(info.max), 64).round().astype(np.int64)
    ramp[0] = info.min
    rows = np.tile(ramp, (16, 1)).astype(dtype)
    if writer == "pillow":
        Image.fromarray(rows, mode="I").save(path)
    else:
        pytest.importorskip("tifffile").imwrite(path, rows)
    assert Image.open(path).mode == "I"
    return path


@pytest.mark.parametrize("writer, dtype", [("pillow", "int32"), ("tifffile", "int32"), ("tifffile", "uint32"),
                                           ("tifffile", "int16")])
def test_an_integer_tiff_keeps_its_levels(tmp_path: Path, writer, dtype) -> None:
    """Read by its own range (scikit-image's img_as_ubyte), not as unsigned 16 bits: before, a 32-bit one's values
    past 65535 were white (a training picture of one colour), an unsigned one's upper half (negative in Pillow's
    int32) black, and a signed 16-bit one (Pillow's "I" too) came out no brighter than mid-grey."""
    path = _integer_tiff(tmp_path / "ramp.tif", writer, dtype)
    image = read_image(path)
    levels = np.asarray(image, dtype=np.float32)[0]                       # one row, black -> white
    assert image.mode == "L" and levels[0] == 0 and levels[-1] == 255 and abs(levels.mean() - 127.5) < 3
    assert (np.diff(levels[1:]) >= 0).all()                               # a ramp, not wrapped
    loaded = load_training_image(path, 16, center_crop=True, random_flip=False, generator=torch.Generator())
    assert abs(float(loaded.pixels.mean())) < 0.05                 # [-1, 1]: mid-grey on average, not white


def test_a_16_bit_rgb_png_keeps_its_levels(tmp_path: Path) -> None:
    path = _stripe_png_16bit_rgb(tmp_path / "rgb16.png")
    loaded = load_training_image(path, 16, center_crop=False, random_flip=False, generator=torch.Generator(),
                                 bucket=(64, 16))
    red, green = (loaded.pixels[c] for c in (0, 1))
    assert abs(float(red.mean())) < 0.05 and float(red[:, 0].mean()) < -0.95 and float(red[:, -1].mean()) > 0.95
    assert float(green.max()) == -1.0


def test_a_16_bit_picture_keeps_its_text_items(tmp_path: Path) -> None:
    """As Pillow's ``convert`` keeps ``info`` (Extras copies a picture's text items into its answer, as A1111's
    run_postprocessing). Before: the 8-bit picture had none ({} against an 8-bit PNG's {'Comment': ...})."""
    text = PngImagePlugin.PngInfo()
    text.add_text("Comment", "keep me")
    Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(tmp_path / "wide.png", pnginfo=text)
    raw = (tmp_path / "wide.png").read_bytes()
    for image in (read_image(tmp_path / "wide.png"), image_from_bytes(raw, "image", Limits())):
        assert image.mode == "L" and image.info["Comment"] == "keep me"


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


def _a1111_read(raw: bytes) -> Image.Image:
    """A1111 1.10 modules/images.py `read` -> `fix_image`: exif_transpose, then `fix_png_transparency`."""
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(raw)))
    if image.mode in ("RGB", "P") and isinstance(image.info.get("transparency"), bytes):
        image = image.convert("RGBA")
    return image


def _a1111_binary_mask(image: Image.Image) -> Image.Image:
    """modules/processing.py `create_binary_mask(image, round=True)`."""
    if image.mode == "RGBA" and image.getextrema()[-1] != (255, 255):
        return image.split()[-1].convert("L").point(lambda x: 255 if x > 128 else 0)
    return image.convert("L")


def _a1111_flatten(image: Image.Image) -> Image.Image:
    """modules/images.py `flatten(img, "#ffffff")`, img2img's init picture."""
    if image.mode == "RGBA":
        background = Image.new("RGBA", image.size, "#ffffff")
        background.paste(image, mask=image)
        image = background
    return image.convert("RGB")


def _palette_layer() -> bytes:
    """A pngquant-style PNG: a palette with an alpha per entry (tRNS bytes): a red stroke (alpha 255), its
    antialiased edge (alpha 100), the rest transparent and stored black."""
    layer = Image.new("P", (8, 8), 0)
    layer.putpalette([0, 0, 0, 200, 30, 30, 10, 200, 10] + [0] * (253 * 3))
    layer.paste(1, (0, 0, 3, 8))
    layer.paste(2, (3, 0, 4, 8))
    buffer = io.BytesIO()
    layer.save(buffer, "PNG", transparency=bytes([0, 255, 100]))
    return buffer.getvalue()


def test_a_palette_picture_with_alphas_is_read_as_a1111_reads_it(tmp_path: Path) -> None:
    """Before: the picture stayed "P", so a mask was its luminance (row [76, 76, 76, 76, 0...] against A1111's
    [255, 255, 255, 0...]) and an init picture kept its transparent pixels black (max diff 255)."""
    raw = _palette_layer()
    (tmp_path / "layer.png").write_bytes(raw)
    reference = _a1111_read(raw)
    for image in (image_from_bytes(raw, "mask", Limits()), read_image(tmp_path / "layer.png")):
        assert image.mode == "RGBA"
        assert np.array_equal(np.asarray(mask_levels(image)), np.asarray(_a1111_binary_mask(reference)))
        assert np.array_equal(np.asarray(on_white(image).convert("RGB")), np.asarray(_a1111_flatten(reference)))


def test_a_palette_with_one_transparent_colour_stays_a_palette() -> None:
    """A1111 leaves a picture whose transparency is one palette index (an int, not bytes) as it is."""
    layer = Image.new("P", (4, 4), 1)
    layer.info["transparency"] = 0
    assert upright_8bit(layer).mode == "P"


def test_bytes_that_are_no_picture_are_named_without_pillows_stream_object() -> None:
    """Before: 'init_images[0] is not a readable image: cannot identify image file <_io.BytesIO object at
    0x7f6c...>' (a memory address in the client's error) for text and for an empty string alike."""
    import pytest

    from sdlab.server.inputs import BadRequest

    for raw, says in ((b"hello", "init_images[0] is not a readable image: not a picture file Pillow knows (PNG, "
                                  "JPEG, WebP, ...)"),
                      (b"", "init_images[0] is empty: no picture was sent")):
        with pytest.raises(BadRequest) as err:
            image_from_bytes(raw, "init_images[0]", Limits())
        assert str(err.value) == says and err.value.status == 400, err.value


def test_files_of_under_4_bytes_are_unidentified_as_image_open_says(tmp_path: Path) -> None:
    """Image.open takes a struct.error from a format's `accept` (BMP / DIB on fewer than 4 bytes) as "not this
    format"; `open_image`'s header read let it escape: struct.error "unpack_from requires a buffer of at least 4
    bytes" for a file of 1 to 3 bytes, from a path and from memory alike."""
    import pytest
    from PIL import UnidentifiedImageError

    from sdlab.pipeline.images import declared_pixels, open_image

    for raw in (b"", b"B", b"ab", b"BM\x00"):
        (tmp_path / "short.png").write_bytes(raw)
        assert declared_pixels(io.BytesIO(raw)) is None
        for source in (tmp_path / "short.png", io.BytesIO(raw)):
            with pytest.raises(UnidentifiedImageError, match="cannot identify image file"):
                with open_image(source):
                    pass
            with pytest.raises(UnidentifiedImageError):
                Image.open(source)                              # Pillow's own answer, the same
