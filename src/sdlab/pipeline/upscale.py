"""Making pictures and latents larger: upscaler networks (tiled), plain resampling, latent interpolation.

Pixel space, A1111's upscaler semantics (`upscale_image`):
- an upscaler network (ESRGAN / Real-ESRGAN, `sdlab.checkpoints.upscaler`) runs pass after pass (at most
  `MAX_PASSES`) until the picture is at least the target size, then Lanczos resizes it to the target
  exactly; so `--scale 2` with a x4 model is one x4 pass and a Lanczos halving, `--scale 8` two passes.
  As in A1111, the first pass runs even at scale 1 (then a x4 result is resized back), and a pass that
  leaves the size unchanged (a 1x model: denoising, de-JPEG) is the last one.
  The network sees RGB in [0, 1], what ESRGAN and Real-ESRGAN were trained on (A1111 flips to BGR); an
  alpha channel is not upscaled by the network but resized with Lanczos and put back, as A1111 does.
- `"Lanczos"` and `"Nearest"` are plain PIL resizes to the target (A1111's upscalers of those names;
  A1111's `"None"` is Lanczos as well).

Two of A1111's own entry points sit on top: `upscale_by` is its `Upscaler.upscale` (Extras: the size
rounded down to multiples of 8), `resize_image` its `images.resize_image` (the hires fix: the upscaler
runs only when the picture is smaller than the target; img2img's resize modes: just resize, crop and
resize, resize and fill).

Tiling (`run_upscaler`): the input is cut into `tile` x `tile` pixel tiles overlapping by `overlap`, each
goes through the network alone, and the outputs are blended with linear ramps across the overlaps
(`sdlab.pipeline.tiling`), so memory is bounded by the tile and seams fade instead of showing as lines.
A pixel's output depends on its neighbourhood only (the network is convolutional), so tiles that overlap
by more than the border the zero padding disturbs give the untiled picture up to small differences.

Latent space (`upscale_latent`): A1111's "Latent" upscalers are `torch.nn.functional.interpolate` on the
latent with these modes (A1111's `shared.latent_upscale_modes`):

| A1111 name                     | mode            | antialias |
|--------------------------------|-----------------|-----------|
| Latent                         | bilinear        | no        |
| Latent (antialiased)           | bilinear        | yes       |
| Latent (bicubic)               | bicubic         | no        |
| Latent (bicubic antialiased)   | bicubic         | yes       |
| Latent (nearest)               | nearest         | no        |
| Latent (nearest-exact)         | nearest-exact   | no        |
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from sdlab.checkpoints.upscaler import Upscaler
from sdlab.models.cpu_memory import reusing_large_blocks
from sdlab.pipeline.images import eight_bit
from sdlab.pipeline.tiling import decode_tiled

DEFAULT_TILE = 192              # input pixels per tile side (A1111's ESRGAN tile); 0 = no tiling
DEFAULT_OVERLAP = 32            # input pixels shared by neighbouring tiles (A1111: 8; more hides seams better)
MAX_PASSES = 3                  # network passes before the final Lanczos resize (A1111's limit)
MAX_OUTPUT_PIXELS = 8192 * 8192 # larger results (or intermediate passes) are refused: about 200 MB as RGB

LATENT_UPSCALE_MODES: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
PLAIN_UPSCALERS = {                             # A1111's "None" upscaler resizes with Lanczos too
    "lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST, "none": Image.Resampling.LANCZOS,
}

# A1111's names of the upscalers it downloads -> the file each runs (`realesrgan_model.get_realesrgan_models`, the
# ESRGAN upscaler's `model_name`); sdlab's loader reads them all (RRDBNet, SRVGGNetCompact) and finds them by that name
A1111_UPSCALER_FILES = {
    "R-ESRGAN General 4xV3": "realesr-general-x4v3.pth",
    "R-ESRGAN General WDN 4xV3": "realesr-general-wdn-x4v3.pth",
    "R-ESRGAN AnimeVideo": "realesr-animevideov3.pth",
    "R-ESRGAN 4x+": "RealESRGAN_x4plus.pth",
    "R-ESRGAN 4x+ Anime6B": "RealESRGAN_x4plus_anime_6B.pth",
    "R-ESRGAN 2x+": "RealESRGAN_x2plus.pth",
    "ESRGAN_4x": "ESRGAN_4x.pth",
}
A1111_REALESRGAN_STEMS = frozenset(file.rsplit(".", 1)[0] for name, file in A1111_UPSCALER_FILES.items()
                                   if name.startswith("R-ESRGAN"))
"""The files A1111's RealESRGAN upscaler looks for in its models/RealESRGAN folder (`get_realesrgan_models`), by stem."""
# A1111's built-in upscalers whose networks sdlab does not run (its ScuNET, SwinIR and LDSR extensions)
A1111_FOREIGN_UPSCALERS = {"ScuNET GAN": "ScuNET", "ScuNET PSNR": "ScuNET", "SwinIR 4x": "SwinIR",
                           "LDSR": "LDSR (a latent diffusion upscaler)"}


def a1111_upscaler_stem(name: str) -> str:
    """The file stem an upscaler name looks for: the file A1111 runs for one of its own names
    (`A1111_UPSCALER_FILES`: "R-ESRGAN 4x+" -> RealESRGAN_x4plus), else the name (A1111 names other files by stem)."""
    file = A1111_UPSCALER_FILES.get(name.strip())
    return name if file is None else file.rsplit(".", 1)[0]


def a1111_upscaler_name(stem: str) -> str:
    """What A1111 calls the upscaler file of `stem`: its own name for a file it downloads, else the stem."""
    return next((name for name, file in A1111_UPSCALER_FILES.items() if file.rsplit(".", 1)[0] == stem), stem)


def missing_upscaler(name: str, where: str) -> str | None:
    """Why one of A1111's own upscaler names found no file: the file to place `where`, or the network sdlab does
    not run (`A1111_FOREIGN_UPSCALERS`); None for other names."""
    key = name.strip() if isinstance(name, str) else name
    if key in A1111_UPSCALER_FILES:
        return (f"the upscaler {key!r} is A1111's name of the file {A1111_UPSCALER_FILES[key]}, which was not found: "
                f"place it (or a .safetensors of it under that name) {where}")
    if key in A1111_FOREIGN_UPSCALERS:
        return (f"the upscaler {key!r} is A1111's {A1111_FOREIGN_UPSCALERS[key]}, a network sdlab does not run; "
                "use an ESRGAN / Real-ESRGAN file, Lanczos, Nearest or a latent mode")
    return None


class UpscaleError(ValueError):
    """An upscale that cannot be done (unknown method, a size beyond the limits); the message says why."""


_LATENT_SHORT_NAMES = {
    "bilinear": "Latent", "antialiased": "Latent (antialiased)", "bilinear-antialiased": "Latent (antialiased)",
    "bicubic": "Latent (bicubic)", "bicubic-antialiased": "Latent (bicubic antialiased)",
    "nearest-exact": "Latent (nearest-exact)",
}   # no plain "nearest": that is A1111's pixel upscaler "Nearest" (PLAIN_UPSCALERS)


def canonical_latent_name(name: str) -> str:
    """A1111's name of a latent upscaler ("Latent (bicubic)") for that name in any case or a short name
    (`_LATENT_SHORT_NAMES`: "bilinear", "antialiased", "bicubic", "nearest-exact", ...)."""
    key = " ".join(name.split()).lower()
    by_name = {a1111.lower(): a1111 for a1111 in LATENT_UPSCALE_MODES} | _LATENT_SHORT_NAMES
    if key not in by_name:
        raise UpscaleError(f"unknown latent upscale mode {name!r}; valid: {', '.join(LATENT_UPSCALE_MODES)} "
                           f"(or {', '.join(_LATENT_SHORT_NAMES)})")
    return by_name[key]


def latent_mode(name: str) -> tuple[str, bool]:
    """(interpolate mode, antialias) for a latent upscaler name (`canonical_latent_name`)."""
    return LATENT_UPSCALE_MODES[canonical_latent_name(name)]


def upscale_latent(z: torch.Tensor, height: int, width: int, method: str = "Latent") -> torch.Tensor:
    """z (B, C, h, w) resized to (B, C, height, width) latent pixels as A1111's `method` does."""
    mode, antialias = latent_mode(method)
    return F.interpolate(z, size=(height, width), mode=mode, antialias=antialias)   # (B, C, height, width)


def target_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """(width, height) times `scale`, truncated as A1111 does, never below 1 pixel."""
    if not (math.isfinite(scale) and scale > 0):
        raise UpscaleError(f"the scale must be a positive number, got {scale}")
    if not (math.isfinite(width * scale) and math.isfinite(height * scale)):       # 1e308 is finite, 64 x 1e308 not
        raise UpscaleError(f"upscaling {width}x{height} by {scale:g} is beyond any picture size; use a smaller scale")
    return max(1, int(width * scale)), max(1, int(height * scale))


MIN_TILE = 16
"""The smallest tile an upscaler model runs in (A1111's ESRGAN_tile slider, 0 or 16..512)."""


def tile_too_small(tile: int) -> bool:
    """Whether `tile` pixels a side is a tile below `MIN_TILE` (0, no tiles, is not): each would make an upscale one
    network call per few pixels (hours at 2048², the device held). Every door refuses it in its own words: `sdlab
    upscale --tile`, the A1111 API's ESRGAN_tile, a request's hr_upscaler_tile; `run_upscaler` (the Python API's
    `upscale_by` / `upscale_image` / `resize_image` too) by `check_tiles`."""
    return 0 < tile < MIN_TILE


def tile_overlap_limit(tile: int, overlap: int) -> int | None:
    """The most pixels `tile`-pixel tiles may share, half a tile, where `overlap` passes it, else None (also for
    tile 0: no tiles). Tiles step by tile - overlap, so within the limit an upscale takes at most about 4 x its
    untiled work; past it the runs multiply (one per pixel at 16 / 15; `_run_network` clamps an overlap that
    reaches the tile to tile - 1). Every door refuses such a pair in its own words: `sdlab upscale --tile-overlap`,
    the A1111 API's ESRGAN_tile_overlap, a request's hr_upscaler_tile_overlap."""
    limit = tile // 2
    return limit if tile and overlap > limit else None


def check_tiles(tile: int, overlap: int) -> None:
    """`UpscaleError` where `tile` / `overlap` break `tile_too_small` or `tile_overlap_limit` (or are negative):
    the rules the doors check in their own words, kept where every network pass runs (`run_upscaler`)."""
    if tile < 0 or overlap < 0 or tile_too_small(tile):
        raise UpscaleError(f"upscaler tiles of {tile} px overlapping by {overlap} px: a tile is 0 (no tiles) or "
                           f"{MIN_TILE} or more pixels, an overlap 0 or more")
    limit = tile_overlap_limit(tile, overlap)
    if limit is not None:
        raise UpscaleError(f"an upscaler tile overlap of {overlap} px passes half the {tile} px tile (at most {limit})")


def _check_size(width: int, height: int) -> None:
    if width * height > MAX_OUTPUT_PIXELS:
        raise UpscaleError(f"upscaling to {width}x{height} pixels is beyond the limit of {MAX_OUTPUT_PIXELS:,} pixels; "
                           "upscale a smaller picture or by a smaller scale")


_MODES = {1: "L", 3: "RGB", 4: "RGBA"}           # network channels -> PIL mode


def _to_tensor(image: Image.Image, channels: int) -> torch.Tensor:
    array = np.asarray(image.convert(_MODES[channels]), dtype=np.float32).reshape(image.height, image.width, -1)
    return torch.from_numpy(array / 255.0).permute(2, 0, 1)[None].contiguous()   # (1, C, H, W)


def _to_image(x: torch.Tensor) -> Image.Image:
    array = (x[0].float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)   # (H, W, C)
    mode = _MODES[array.shape[-1]]
    return Image.fromarray(array.cpu().numpy().squeeze(-1) if mode == "L" else array.cpu().numpy(), mode)


@torch.inference_mode()
def run_upscaler(upscaler: Upscaler, image: Image.Image, *, tile: int = DEFAULT_TILE,
                 overlap: int = DEFAULT_OVERLAP) -> Image.Image:
    """One pass of the network over `image`, tiled unless `tile` is 0. A 3-channel network sees RGB and a
    1-channel one L, and the alpha channel, if any, is resized with Lanczos and put back (RGBA / LA); a
    4-channel network sees RGBA. A 16-bit greyscale picture is scaled to 8 bits first, as files are read
    (`eight_bit`). Tiles below `MIN_TILE` or overlapping past half a tile are refused (`check_tiles`)."""
    check_tiles(tile, overlap)
    image = eight_bit(image)
    config = upscaler.net.config
    if config.in_channels not in _MODES or config.out_channels not in _MODES:
        raise UpscaleError(f"the upscaler maps {config.in_channels} to {config.out_channels} channels; "
                           "sdlab runs 1 (grey), 3 (RGB) and 4 (RGBA) channel upscalers")
    fold, scale = config.unshuffle, upscaler.scale
    if min(image.size) < fold:
        raise UpscaleError(f"the picture is {image.width}x{image.height}; this upscaler needs at least {fold} px a side")
    _check_size(image.width * scale, image.height * scale)
    net = upscaler.net
    param = next(net.parameters())
    x = _to_tensor(image, config.in_channels).to(param.device, param.dtype)       # (1, C, H, W)
    with reusing_large_blocks(x.device):   # its 64-channel maps at 2 and 4 x a tile's size: large blocks
        y = _run_network(net, x, tile, overlap, fold, scale)                     # (1, C, sH, sW)
    out = _to_image(y)
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    if config.out_channels in (1, 3) and has_alpha:
        alpha = image.convert("RGBA").getchannel("A").resize(out.size, Image.Resampling.LANCZOS)
        out.putalpha(alpha)
    return out


def _run_network(net: nn.Module, x: Tensor, tile: int, overlap: int, fold: int, scale: int) -> Tensor:
    """net(x), tiled unless `tile` is 0. x: (1, C, H, W) -> (1, C', H * scale, W * scale)"""
    if tile <= 0:
        return net(x)
    # A pixel-unshuffled network is shift-equivariant only by whole folds: pad as the network itself does, then
    # cut tiles on the fold's grid.
    height, width = x.shape[-2:]
    x = F.pad(x, (0, -width % fold, 0, -height % fold), mode="reflect") if fold > 1 else x
    tile = max(fold, tile - tile % fold)
    overlap = min(overlap - overlap % fold, tile - fold)
    y = decode_tiled(net, x, tile, overlap, factor=scale)                        # (1, C, sH', sW'): any x`scale` map
    return y[..., : height * scale, : width * scale]                             # (1, C, sH, sW)


def _plain_resample(name: str) -> Image.Resampling:
    """The PIL filter of a plain resize's name ("Lanczos", "Nearest", "None"; any case)."""
    resample = PLAIN_UPSCALERS.get(name.strip().lower())
    if resample is None:
        raise UpscaleError(f"unknown upscaler {name!r}; name an upscaler model file, Lanczos, Nearest or None")
    return resample


def upscale_image(image: Image.Image, upscaler: Upscaler | str, size: tuple[int, int], *,
                  tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP) -> Image.Image:
    """`image` at `size` (width, height): network passes until large enough, then Lanczos (module docstring).

    `upscaler` is a loaded network or the name of a plain resize, "Lanczos" or "Nearest" (any case).
    """
    width, height = size
    _check_size(width, height)
    if isinstance(upscaler, str):
        return image.resize((width, height), resample=_plain_resample(upscaler))
    one_pass = partial(run_upscaler, upscaler, tile=tile, overlap=overlap)
    return _passes(image, one_pass, size, first_always=image.size == size)


def _passes(image: Image.Image, one_pass: Callable[[Image.Image], Image.Image], size: tuple[int, int], *,
            first_always: bool) -> Image.Image:
    """A1111's `Upscaler.upscale` loop: `one_pass` (at most `MAX_PASSES` times) until the picture covers `size`,
    the first even when it already does if `first_always` (A1111: at scale 1); a pass that leaves the size
    unchanged (a 1x model: denoising, de-JPEG) is the last. Then Lanczos to `size`."""
    for i in range(MAX_PASSES):
        if image.width >= size[0] and image.height >= size[1] and (i > 0 or not first_always):
            break
        before = image.size
        image = one_pass(image)
        if image.size == before:
            break
    return image if image.size == size else image.resize(size, resample=Image.Resampling.LANCZOS)


def upscale_by(image: Image.Image, upscaler: Upscaler | str, scale: float, *,
               tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP) -> Image.Image:
    """A1111's `Upscaler.upscale(image, scale)`: `image` made (int(W * scale) // 8 * 8, int(H * scale) // 8 * 8).

    A pass is one network run or, for a plain resize ("Lanczos", "Nearest"), a resize by `scale` with its own
    filter (A1111's `do_upscale`); passes run as `_passes` says, the first even at scale 1.
    """
    size = upscaled_size(image.width, image.height, scale)
    if isinstance(upscaler, str):
        one_pass = partial(_resize_by, scale=scale, resample=_plain_resample(upscaler))
    else:
        one_pass = partial(run_upscaler, upscaler, tile=tile, overlap=overlap)
    return _passes(image, one_pass, size, first_always=scale == 1)


def upscaled_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """The size `upscale_by` makes of a `width` x `height` picture: (int(W * scale) // 8 * 8, int(H * scale) // 8 * 8);
    an `UpscaleError` past `MAX_OUTPUT_PIXELS` or below 8 pixels a side."""
    _check_size(*target_size(width, height, scale))
    size = int(width * scale // 8 * 8), int(height * scale // 8 * 8)
    if min(size) < 1:
        raise UpscaleError(f"upscaling {width}x{height} by {scale:g} leaves less than 8 pixels a side; use a larger "
                           "scale")
    return size


def _resize_by(image: Image.Image, scale: float, resample: Image.Resampling) -> Image.Image:
    """A plain upscaler's pass (A1111's `do_upscale` of Lanczos and Nearest): `image` resized by `scale`."""
    return image.resize(target_size(image.width, image.height, scale), resample=resample)


IMG2IMG_UPSCALER = "None"   # A1111's `upscaler_for_img2img` default: resize modes resize with Lanczos alone


def resize_image(image: Image.Image, upscaler: Upscaler | str, size: tuple[int, int], *, mode: str = "resize",
                 tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP) -> Image.Image:
    """`image` at `size` (width, height) as A1111's `images.resize_image` does (the hires fix: "resize"; img2img:
    its resize mode, with "None", A1111's default img2img upscaler):

    - "resize" stretches it: the upscaler runs only on a picture smaller than `size` (cover scale
      max(w / W, h / H) > 1), by that scale (`upscale_by`); Lanczos then gives `size`. "None" is a Lanczos
      resize alone;
    - "crop" resizes it so that it covers `size` with its aspect ratio kept (the other side rounded down) and
      cuts the middle out (`centred_on_canvas`);
    - "fill" resizes it to fit inside `size` and lays it in the middle, its first and last rows (or columns)
      stretched over the empty bands (`_fill_bands`).
    """
    _check_size(*size)
    if mode == "resize":
        return _stretched(image, upscaler, size, tile, overlap)
    width, height = size
    ratio, source_ratio = width / height, image.width / image.height
    spans_width = ratio > source_ratio if mode == "crop" else ratio < source_ratio
    if spans_width:
        inner = width, image.height * width // image.width
    else:
        inner = image.width * height // image.height, height
    resized = _stretched(image, upscaler, inner, tile, overlap)
    canvas = centred_on_canvas(resized, size)
    if mode == "fill" and ratio != source_ratio:
        _fill_bands(canvas, resized, above_and_below=ratio < source_ratio)
    return canvas


def _stretched(image: Image.Image, upscaler: Upscaler | str, size: tuple[int, int], tile: int,
               overlap: int) -> Image.Image:
    """`resize_image`'s "resize" (A1111's inner `resize`)."""
    scale = max(size[0] / image.width, size[1] / image.height)
    if scale > 1 and not (isinstance(upscaler, str) and upscaler.strip().lower() == "none"):
        image = upscale_by(image, upscaler, scale, tile=tile, overlap=overlap)
    return image if image.size == size else image.resize(size, resample=Image.Resampling.LANCZOS)


def centred_on_canvas(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """`image` pasted centred on a black canvas of `size` in its mode (A1111's `resize_image` and Extras crop:
    a larger picture is cut, a smaller one gets black borders)."""
    canvas = Image.new(image.mode, size)
    canvas.paste(image, (size[0] // 2 - image.width // 2, size[1] // 2 - image.height // 2))
    return canvas


def _fill_bands(canvas: Image.Image, inner: Image.Image, above_and_below: bool) -> None:
    """"Resize and fill"'s bands: the empty rows above and below `inner` (or the columns left and right of it)
    on `canvas` painted with its first and last row (column) stretched over them, as A1111 paints them (a
    bicubic resize of the zero-height / zero-width box on that edge)."""
    width, height = canvas.size
    bicubic = Image.Resampling.BICUBIC
    if above_and_below and (band := height // 2 - inner.height // 2) > 0:
        canvas.paste(inner.resize((width, band), bicubic, box=(0, 0, width, 0)), (0, 0))
        canvas.paste(inner.resize((width, band), bicubic, box=(0, inner.height, width, inner.height)),
                     (0, band + inner.height))
    elif not above_and_below and (band := width // 2 - inner.width // 2) > 0:
        canvas.paste(inner.resize((band, height), bicubic, box=(0, 0, 0, height)), (0, 0))
        canvas.paste(inner.resize((band, height), bicubic, box=(inner.width, 0, inner.width, height)),
                     (band + inner.width, 0))
