"""Pictures in and out of the model: PIL <-> tensors, sizes, inpainting masks, outpainting canvases.

Value ranges: PIL images hold 0..255; the VAE works on [-1, 1] (``x = 2 * pixel / 255 - 1``). The
conversions follow diffusers' ``VaeImageProcessor`` to the bit, so that pictures can be compared with
diffusers' at 1/255:

- in: ``np.array(image, float32) / 255`` then ``2x - 1`` (``pil_to_numpy`` + ``normalize``);
- out: ``(x / 2 + 0.5).clamp(0, 1)`` in the tensor's dtype, then float32, ``* 255``, rounded half to even,
  to uint8 (``denormalize`` + ``pt_to_numpy`` + ``numpy_to_pil``).

Masks: white (1) = repaint, black (0) = keep, as in diffusers and A1111. ``prepare_mask`` does what
diffusers' inpaint pipeline does to a mask (resize with Lanczos, grayscale, / 255, binarize at 0.5);
``latent_mask`` shrinks it to the latent grid with nearest-neighbour ``interpolate``, as
``StableDiffusionInpaintPipeline.prepare_mask_latents`` does (``a1111_latent_mask``: as A1111 does, the soft
mask resized bicubic and rounded); ``masked_image`` is
``image * (mask < 0.5)``, the input of the masked-image latent of 9-channel inpainting U-Nets. A mask
with transparency (RGBA, alpha not all 255) counts by its alpha channel, as in A1111 (``mask_levels``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import struct
from collections.abc import Iterator
from typing import IO, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ExifTags, Image, ImageFilter, ImageOps

logger = logging.getLogger(__name__)

Colour = tuple[int, int, int] | str


class ImageTooLargeError(ValueError):
    """An image file whose declared pixel count exceeds Pillow's decompression-bomb limit."""


def source_name(path: object) -> str:
    """What an error calls a picture's source: its path (quoted), a file object's name, else "the picture" (bytes
    in memory, as a server reads what a client sends)."""
    name = os.fspath(path) if isinstance(path, (str, os.PathLike)) else getattr(path, "name", None)
    return repr(name) if isinstance(name, str) else "the picture"


def declared_pixels(fp: IO[bytes]) -> int | None:
    """The pixel count the header of the picture in `fp` declares, as Pillow's `_decompression_bomb_check` counts
    it (``max(w, 1) * max(h, 1)``), read by the format plugins `Image.open` tries, in its order, without its
    bomb check; `fp` is left at its start. None where no plugin reads the header (`Image.open` then gives Pillow's
    own error)."""
    Image.preinit()                                              # the common plugins first, in Image.open's
    Image.init()                                                 # order, then every other, as its last try loads
    try:
        fp.seek(0)
    except (AttributeError, OSError):                            # not seekable: Image.open reads it into memory
        return None
    prefix = fp.read(16)
    try:
        for name in list(Image.ID):
            factory, accept = Image.OPEN[name]
            try:                                                # accept and factory in one try, as in
                accepted = not accept or accept(prefix)         # Image.open's _open_core (BMP's accept
                if isinstance(accepted, str) or not accepted:   # raises struct.error on a file under 4
                    continue                                    # bytes); a str: Image.open's note why not
                fp.seek(0)
                header = factory(fp, "")
            except (SyntaxError, IndexError, TypeError, struct.error):    # Image.open tries the next plugin
                continue
            except Exception:                                   # Image.open raises it: let it
                return None
            return max(header.width, 1) * max(header.height, 1)
        return None
    finally:
        fp.seek(0)


@contextlib.contextmanager
def open_image(path: str | os.PathLike[str] | IO[bytes]) -> Iterator[Image.Image]:
    """``Image.open(path)`` that refuses decompression bombs: ``ImageTooLargeError`` (a ``ValueError``).

    Pillow warns above ``Image.MAX_IMAGE_PIXELS`` (about 89 megapixels) and raises above twice that; both
    become the error here, raised before any pixel is decoded and before `Image.open` runs its own check (so
    its `DecompressionBombWarning` is never printed beside the error): the header's size is read first
    (`declared_pixels`) and checked against the same limit, rather than by turning Pillow's warning into an
    error or silencing it, since the warning filters are one list shared by every thread
    (``warnings.catch_warnings`` is not thread-safe) and the host program's own. Other failures are Pillow's own
    (``FileNotFoundError``, ``UnidentifiedImageError`` / ``OSError``, ``ValueError``).
    """
    if isinstance(path, (str, os.PathLike)):
        with open(path, "rb") as fp:
            _refuse_past_the_limit(path, declared_pixels(fp))
    else:
        _refuse_past_the_limit(path, declared_pixels(path))
    try:
        image = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:   # the warning: where filters say
        raise ImageTooLargeError(f"{source_name(path)} is too large to open safely ({err})") from None
    with image:
        _refuse_past_the_limit(path, max(image.width, 1) * max(image.height, 1))   # as Pillow's check counts
        yield image


def _refuse_past_the_limit(path: object, pixels: int | None) -> None:
    """``ImageTooLargeError`` where `pixels` exceeds Pillow's ``Image.MAX_IMAGE_PIXELS`` (None: no limit)."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and pixels is not None and pixels > limit:
        raise ImageTooLargeError(f"{source_name(path)} is too large to open safely (Image size ({pixels} pixels) "
                                 f"exceeds limit of {limit} pixels, could be decompression bomb DOS attack.)")


def read_image(path: str | os.PathLike[str]) -> Image.Image:
    """The decoded image at ``path``, detached from its file and made `upright_8bit`; decompression bombs as
    in ``open_image``."""
    with open_image(path) as image:
        image.load()
        return upright_8bit(image)


_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")   # 16-bit greyscale PNG / TIFF, 16-bit signed / 32-bit TIFF


def upright_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """The (width, height) of `read_image(path)` from the file's header alone, the pixels not decoded: turned by
    its EXIF orientation as `upright_8bit` turns it. A PNG's EXIF is read where the format puts it, before the
    pixels (a later eXIf chunk, which Pillow finds only by decoding, is not looked for)."""
    with open_image(path) as image:
        width, height = image.size
        known = image.format != "PNG" or "exif" in image.info
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1) if known else 1
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def upright_8bit(image: Image.Image) -> Image.Image:
    """A picture as it is meant to be seen, in 8 bits a channel (a new image): turned by its EXIF
    orientation (a phone photo stored sideways; diffusers' ``load_image`` and A1111 do the same), its
    palette alphas kept (`with_palette_alpha`), and `eight_bit` (by the file's TIFF tags, which the copy lacks)."""
    return eight_bit(with_palette_alpha(ImageOps.exif_transpose(image)), image)  # a copy, also when nothing changes


def with_palette_alpha(image: Image.Image) -> Image.Image:
    """A palette (or RGB) picture whose transparency is an alpha per palette entry (``info["transparency"]``
    bytes: a PNG tRNS chunk as pngquant / TinyPNG write a painted layer) made RGBA, so masks take its alpha
    (`mask_levels`) and init pictures are laid on white by it (`on_white`), as A1111 reads every picture
    (``images.fix_image``: ``fix_png_transparency``); any other picture as it is."""
    if image.mode in ("RGB", "P") and isinstance(image.info.get("transparency"), bytes):
        return image.convert("RGBA")
    return image


def eight_bit(image: Image.Image, opened: Image.Image | None = None) -> Image.Image:
    """A 16-bit greyscale picture scaled to 0..255 ("L"; Pillow's ``convert`` would clip every value above 255
    to white), a 32-bit or signed integer one from its range (`integer_levels`), a 32-bit float one ("F", a float
    TIFF) scaled from its range (`float_range`; Pillow's ``convert`` reads it as 0..255, so a 0..1 picture comes
    out black; its range tags read from ``opened``, the image as opened, where ``image`` is a copy of it), keeping
    its ``info`` (text items, EXIF) as ``convert`` does but a 16-bit transparent value; any other picture as it is."""
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        low, high = float_range(opened or image, values)
        values = np.nan_to_num(values)                  # NaN black, infinities the ends
        scaled = np.floor((values - low) * (255.0 / (high - low)))   # cut, as Pillow's convert("L") cuts
    elif image.mode in _WIDE_MODES:
        scaled = integer_levels(np.asarray(image), opened or image)
    else:
        return image
    eight = Image.fromarray(np.clip(np.round(scaled), 0, 255).astype(np.uint8), mode="L")
    eight.info = {key: value for key, value in image.info.items() if key != "transparency"}
    return eight


_SAMPLE_RANGE_TAGS = (340, 341)     # TIFF's SMinSampleValue, SMaxSampleValue
_BITS_PER_SAMPLE, _SAMPLE_FORMAT, _SIGNED = 258, 339, 2     # TIFF tags; SampleFormat 2: signed integers


def integer_levels(values: np.ndarray, image: Image.Image) -> np.ndarray:
    """The pixels `values` (H, W) of a wide integer greyscale picture `image` (as opened: its TIFF tags) on
    0..255, by the range its file stores, as scikit-image's ``img_as_ubyte`` reads it. A TIFF Pillow opens as
    mode "I" by its BitsPerSample: unsigned 0..2**bits - 1 (a 32-bit one held as int32 by Pillow, the upper half
    negative), signed (SampleFormat 2) 0..2**(bits - 1) - 1, its negatives black; any other (a 16-bit PNG, PGM
    or unsigned TIFF: Pillow's "I;16" modes, and the "I" older Pillow opens a 16-bit PNG as) 0..65535."""
    tags = getattr(image, "tag_v2", {})
    bits = _first_number(tags.get(_BITS_PER_SAMPLE)) if image.mode == "I" else None
    if bits not in (16, 32):
        return values.astype(np.float64) / 257.0
    if _first_number(tags.get(_SAMPLE_FORMAT)) == _SIGNED:
        return np.maximum(values.astype(np.float64), 0.0) * (255.0 / (2 ** (bits - 1) - 1))
    if bits == 32:
        values = values.astype(np.int32).view(np.uint32)
    return values.astype(np.float64) * (255.0 / (2**bits - 1))


def float_range(image: Image.Image, values: np.ndarray) -> tuple[float, float]:
    """The (black, white) values of a float picture ``image`` (``values``: its pixels): the range its TIFF tags
    SMinSampleValue / SMaxSampleValue give, else 0..1 (the convention of the programs that write float pictures:
    Photoshop, GIMP, OpenCV, scikit-image, which clip what lies outside it: a resampled picture's slight overshoot
    or undershoot) unless its brightest finite value passes `FLOAT_WHITE_PAST`, then 0..255 (Pillow's reading,
    which diffusers' ``load_image`` and kohya's loaders inherit: a picture ``convert("F")`` made)."""
    tags = getattr(image, "tag_v2", {})
    low, high = (_first_number(tags.get(tag)) for tag in _SAMPLE_RANGE_TAGS)
    if low is not None and high is not None and math.isfinite(low) and math.isfinite(high) and high > low:
        return low, high
    finite = values[np.isfinite(values)]
    return (0.0, 255.0) if finite.size and finite.max() > FLOAT_WHITE_PAST else (0.0, 1.0)


FLOAT_WHITE_PAST = 2.0
"""The brightest value past which a float picture is read as 0..255 (`float_range`): a 0..1 picture's overshoot
stays below it, and a 0..255 picture whose brightest value is below it is black either way."""


def _first_number(value: object) -> float | None:
    """A TIFF tag's number (Pillow gives a number, or a tuple of one per channel), or None."""
    if isinstance(value, tuple):
        value = value[0] if value else None
    return float(value) if isinstance(value, (int, float)) else None


def on_white(image: Image.Image) -> Image.Image:
    """An RGBA init picture laid on white by its alpha, as A1111 flattens every img2img / inpainting input
    (``images.flatten`` with ``img2img_background_color``, default ``#ffffff``) before it is encoded and
    pasted back, so a transparent cut-out's background is white, not whatever colour its transparent pixels
    hold; other pictures come back unchanged."""
    if image.mode != "RGBA":
        return image
    flat = Image.new("RGBA", image.size, (255, 255, 255, 255))
    flat.alpha_composite(image)
    return flat.convert("RGB")


def flattened(image: Image.Image) -> Image.Image:
    """A picture with transparency (RGBA, LA, a palette's transparent colour) laid on white by its alpha, as
    A1111's `HWC3` lays an RGBA hint (`color * alpha + 255 * (1 - alpha)`); others unchanged."""
    return on_white(image.convert("RGBA")) if image.has_transparency_data else image


def snap_size(width: int, height: int, multiple: int = 8) -> tuple[int, int]:
    """Round ``width`` and ``height`` down to multiples of ``multiple`` (the VAE factor), warning if changed.

    Rounding down (not to nearest) is diffusers' and A1111's choice: the picture never grows past what
    was asked for, and a size already on the grid is kept as it is.
    """
    snapped = (width - width % multiple, height - height % multiple)
    if min(snapped) <= 0:
        raise ValueError(f"size {width}x{height} is smaller than one {multiple}-pixel cell")
    if snapped != (width, height):
        logger.warning("size %dx%d is not a multiple of %d; using %dx%d", width, height, multiple, *snapped)
    return snapped


def _as_list(images: Image.Image | Sequence[Image.Image]) -> list[Image.Image]:
    return [images] if isinstance(images, Image.Image) else list(images)


def pil_to_tensor(
    images: Image.Image | Sequence[Image.Image],
    size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Images -> float32 (B, 3, H, W) in [-1, 1]. All images must share one size, or give ``size=(W, H)``.

    With ``size``, images of another size are resized with Lanczos (diffusers' default resample).
    Non-RGB images (RGBA, L, P) are converted to RGB first.
    """
    return 2.0 * pil_to_unit_tensor(images, size) - 1.0


def pil_to_unit_tensor(
    images: Image.Image | Sequence[Image.Image],
    size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Images -> float32 (B, 3, H, W) in [0, 1] (``/ 255``), as ``pil_to_tensor`` before its ``2x - 1``."""
    batch = []
    for image in _as_list(images):
        if size is not None and image.size != tuple(size):
            image = image.resize(tuple(size), resample=Image.Resampling.LANCZOS)
        batch.append(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)   # (H, W, 3)
    if len({a.shape for a in batch}) != 1:
        raise ValueError(f"images have different sizes {[a.shape[1::-1] for a in batch]}; pass size=(W, H)")
    return torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)                     # (B, 3, H, W) in [0, 1]


def unit_pixels(x: torch.Tensor) -> torch.Tensor:
    """A VAE's decode (B, C, H, W) in [-1, 1] -> float32 in [0, 1] on the CPU, unrounded: ComfyUI's VAEDecode IMAGE
    (comfy/sd.py VAE.decode: the float decode's (x + 1) / 2 clamped), which its picture nodes are fed."""
    return ((x.detach().float().cpu() + 1.0) / 2.0).clamp(0, 1)


def tensor_to_pil(x: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) or (B, 1, H, W) in [-1, 1] -> PIL images, rounded exactly as diffusers rounds."""
    if x.ndim != 4:
        raise ValueError(f"expected (B, C, H, W), got {tuple(x.shape)}")
    unit = (x * 0.5 + 0.5).clamp(0, 1)                                  # (B, C, H, W) in [0, 1], x's dtype
    pixels = unit.detach().cpu().permute(0, 2, 3, 1).float().numpy()    # (B, H, W, C) float32
    pixels = (pixels * 255).round().astype(np.uint8)                     # numpy rounds half to even
    if pixels.shape[-1] == 1:
        return [Image.fromarray(p[..., 0]) for p in pixels]                    # uint8 (H, W): mode "L"
    return [Image.fromarray(p) for p in pixels]


def mask_levels(mask_image: Image.Image, round_alpha: bool = True) -> Image.Image:
    """A mask picture's grey levels (mode "L", white = repaint). A mask with transparency, an RGBA picture
    whose alpha is not 255 everywhere, is its alpha channel made binary (alpha > 128 = repaint; as it is
    without `round_alpha`, A1111's ``mask_round`` off), else its
    luminance with its grey levels (a feathered brush blends). A1111's rule (``create_binary_mask`` in
    ``modules/processing.py``: ``image.mode == 'RGBA' and image.getextrema()[-1] != (255, 255)`` takes
    ``image.split()[-1]`` thresholded at ``x > 128``, else ``image.convert('L')``), so a painted layer
    exported as a transparent PNG repaints what is painted, not the whole picture."""
    if mask_image.mode == "RGBA" and mask_image.getextrema()[-1] != (255, 255):
        alpha = mask_image.getchannel("A")
        return alpha.point(lambda v: 255 if v > 128 else 0) if round_alpha else alpha
    return mask_image if mask_image.mode == "L" else mask_image.convert("L")


def fit_mask(mask_image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The mask at ``size=(W, H)``: one of another size becomes its levels (``mask_levels``) resized with
    Lanczos, the resampling of diffusers' mask processor and of A1111 for an "L" picture
    (``images.resize_image``); one of that size is returned as it is."""
    if mask_image.size == tuple(size):
        return mask_image
    return mask_levels(mask_image).resize(tuple(size), resample=Image.Resampling.LANCZOS)


def prepare_mask(
    mask_image: Image.Image,
    size: tuple[int, int],
    blur_radius: float = 0,
    binarize: bool = True,
) -> torch.Tensor:
    """Mask image -> float32 (1, 1, H, W) in [0, 1] at ``size=(W, H)``; 1 = repaint.

    Steps, in diffusers' order: optional Gaussian blur (PIL ``GaussianBlur(blur_radius)``, what
    ``VaeImageProcessor.blur`` does), resize to ``size`` with Lanczos, grayscale (``mask_levels``: the alpha
    channel of an RGBA mask with transparency), / 255, and with
    ``binarize`` (diffusers' inpaint default) values >= 0.5 become 1 and the rest 0. With ``binarize``
    the blur only rounds the mask's outline; ``binarize=False`` keeps a soft mask (for blending the
    result back onto the original picture, as A1111's mask blur does).
    """
    if blur_radius > 0:
        mask_image = mask_image.filter(ImageFilter.GaussianBlur(blur_radius))
    if mask_image.size != tuple(size):
        mask_image = mask_image.resize(tuple(size), resample=Image.Resampling.LANCZOS)
    mask = torch.from_numpy(np.asarray(mask_levels(mask_image), dtype=np.float32) / 255.0)  # (H, W)
    if binarize:
        mask = (mask >= 0.5).to(torch.float32)
    return mask[None, None]                                                                  # (1, 1, H, W)


def latent_mask(mask: torch.Tensor, factor: int = 8) -> torch.Tensor:
    """Pixel mask (B, 1, H, W) -> latent mask (B, 1, H // factor, W // factor), nearest neighbour."""
    height, width = mask.shape[-2:]
    return F.interpolate(mask, size=(height // factor, width // factor))   # default mode: nearest


def comfyui_latent_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """ComfyUI's latent noise mask (comfy/sampler_helpers.py ``prepare_mask``): the pixel mask (1, 1, H, W)
    resized bilinearly (align_corners False, no antialias) to ``size=(w, h)`` and kept soft: (1, 1, h, w),
    1 = repaint. A mask edge off the 8-pixel grid gives the cells it crosses a level between 0 and 1."""
    width, height = size
    return F.interpolate(mask, size=(height, width), mode="bilinear")                     # (1, 1, h, w)


def comfyui_grown_mask(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """ComfyUI's VAEEncodeForInpaint noise mask (nodes.py ``VAEEncodeForInpaint.encode``, ``grow_mask_by``): the pixel
    mask (1, 1, H, W) rounded, grown by a `pixels` x `pixels` box (a convolution with ones, padded
    ceil((pixels - 1) / 2) on every side, so an even box grows one pixel more up and left; clamped to 1, cut back to
    H x W) and rounded; `pixels` 0 rounds it alone. (1, 1, H, W), 1 = repaint."""
    height, width = mask.shape[-2:]
    rounded = mask.round()                                                                # (1, 1, H, W)
    if pixels == 0:
        return rounded
    box = torch.ones((1, 1, pixels, pixels), dtype=mask.dtype, device=mask.device)
    grown = F.conv2d(rounded, box, padding=math.ceil((pixels - 1) / 2)).clamp(0, 1)       # (1, 1, H(+1), W(+1))
    return grown[:, :, :height, :width].round()                                           # (1, 1, H, W)


def comfyui_encoded_mask(mask: np.ndarray, size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    """The mask ComfyUI's VAEEncodeForInpaint greys and grows (nodes.py ``VAEEncodeForInpaint.encode``): the MASK
    (H, W) in [0, 1] resized bilinearly to the pixels' `size` (w, h), cut by the crop `box` (left, top, right,
    bottom) that takes the pixels to multiples of 8, and rounded: as a mask picture ("L", 0 or 255, white =
    repaint), which the rounding of an inpaint job and `comfyui_grown_mask` keep as it is."""
    width, height = size
    resized = F.interpolate(torch.from_numpy(mask)[None, None], size=(height, width), mode="bilinear")  # (1, 1, h, w)
    left, top, right, bottom = box
    kept = resized[0, 0, top:bottom, left:right].round()                                  # (h', w')
    return Image.fromarray((kept.numpy() * 255).astype(np.uint8), "L")


def a1111_latent_mask(mask: torch.Tensor, size: tuple[int, int], rounded: bool = True) -> torch.Tensor:
    """A1111's latent mask (``latmask`` of ``StableDiffusionProcessingImg2Img.init``): the blurred mask
    (1, 1, H, W) in [0, 1] as its uint8 picture, resized to ``size=(w, h)`` with PIL's default resample
    (bicubic), / 255 and rounded (`rounded`, A1111's ``mask_round``; else left soft): (1, 1, h, w), 1 = repaint."""
    pixels = (mask[0, 0] * 255).round().to(torch.uint8).cpu().numpy()                     # (H, W)
    small = Image.fromarray(pixels).resize(tuple(size), resample=Image.Resampling.BICUBIC)
    levels = np.asarray(small, dtype=np.float32) / 255                                    # (h, w)
    return torch.from_numpy(np.around(levels) if rounded else levels)[None, None].to(mask.device)


def masked_image(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The picture faded to 0 (mid-grey) where it is repainted: ``image * (1 - mask)``, (B, 3, H, W). A binary
    mask (diffusers' ``image * (mask < 0.5)`` of a thresholded one, A1111's rounded one) blanks the repainted
    pixels; a soft one (A1111's ``mask_round`` off) keeps ``1 - mask`` of them."""
    return image * (1 - mask)


def pad_for_outpaint(
    image: Image.Image,
    left: int = 0,
    right: int = 0,
    top: int = 0,
    bottom: int = 0,
    fill: str | Colour = "edge",
    *,
    mask_overlap: int = 0,
    seed: int = 0,
) -> tuple[Image.Image, Image.Image]:
    """Grow the canvas for outpainting; returns (padded RGB image, "L" mask that is white where new).

    ``fill`` decides what the new area starts as (img2img-style outpainting keeps some of it):
    ``"edge"`` repeats the border pixels outward, ``"noise"`` is uniform RGB noise from ``seed``, and any
    other value is a colour (``(r, g, b)`` or a PIL colour name such as ``"black"`` or ``"#808080"``).
    ``mask_overlap`` extends the white area that many pixels into the original picture on each padded
    side, so that the seam itself is repainted.
    """
    if min(left, right, top, bottom, mask_overlap) < 0:
        raise ValueError("padding and mask_overlap must be >= 0")
    rgb = np.asarray(image.convert("RGB"))                                   # (H, W, 3) uint8
    height, width = rgb.shape[:2]
    pad = ((top, bottom), (left, right), (0, 0))
    if fill == "edge":
        canvas = np.pad(rgb, pad, mode="edge")
    elif fill == "noise":
        rng = np.random.default_rng(seed)
        canvas = rng.integers(0, 256, (height + top + bottom, width + left + right, 3), dtype=np.uint8)
        canvas[top:top + height, left:left + width] = rgb
    else:
        colour = Image.new("RGB", (1, 1), fill).getpixel((0, 0))
        canvas = np.pad(rgb, pad, mode="constant")
        canvas[:] = colour
        canvas[top:top + height, left:left + width] = rgb

    mask = np.full(canvas.shape[:2], 255, dtype=np.uint8)                    # (H', W') white = repaint
    keep_top = top + (mask_overlap if top else 0)
    keep_left = left + (mask_overlap if left else 0)
    keep_bottom = top + height - (mask_overlap if bottom else 0)
    keep_right = left + width - (mask_overlap if right else 0)
    mask[keep_top:max(keep_top, keep_bottom), keep_left:max(keep_left, keep_right)] = 0
    return Image.fromarray(canvas), Image.fromarray(mask)                      # mask: uint8 (H, W), mode "L"
