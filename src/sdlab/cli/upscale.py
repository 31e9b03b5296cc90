"""`sdlab upscale`: make a picture larger with an ESRGAN-family model or a plain resize.

    sdlab upscale photo.png --model RealESRGAN_x4plus.pth --out photo-x4.png       # the model's scale
    sdlab upscale photo.png --model 4x-UltraSharp.safetensors --scale 2 --out p2.png  # x4 pass, Lanczos to x2
    sdlab upscale photo.png --scale 2 --out p2.png                                   # Lanczos (also --model nearest)

The size follows A1111's Extras (`Upscaler.upscale`, `sdlab.pipeline.upscale.upscale_by`): width and height
times the scale, each rounded down to a multiple of 8; model passes until the picture is large enough (a
first pass even at scale 1), then a Lanczos resize to that size. The input's A1111 `parameters` text is copied
into the output; a PNG also keeps the input's other text items and, as A1111's Extras saves one, says what was
done in `postprocessing` and `extras` text items (`Postprocess upscale by: 2.0, Postprocess upscaler: R-ESRGAN
4x+`). The output's folder is checked before the model loads (made only when writing); the file is written
under a temporary name and renamed; a bad input writes nothing.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from sdlab.cli.errors import UserError, write_error
from sdlab.utils.dtypes import AUTO, DTYPE_CHOICES, requested_dtype
from sdlab.utils.files import check_output_folder, make_output_folder

PLAIN_DEFAULT_SCALE = 4.0        # a plain resize without --scale: A1111's Extras default
OUT_FOLDER = "the folder of --out"


def add_upscale(subparsers: argparse._SubParsersAction) -> None:
    help_text = "make a picture larger with an ESRGAN / Real-ESRGAN model (or Lanczos)"
    p = subparsers.add_parser("upscale", help=help_text, description=help_text)
    p.add_argument("image", help="the picture to upscale (PNG, JPEG, WebP, ...)")
    p.add_argument("--model", default="lanczos",
                   help="upscaler file (.safetensors, .pth, .pt: ESRGAN, Real-ESRGAN, BSRGAN), or lanczos / nearest "
                        "for a plain resize (default lanczos)")
    p.add_argument("--scale", type=float,
                   help=f"output size / input size, each side rounded down to a multiple of 8 as A1111's Extras "
                        f"(default: the model's; {PLAIN_DEFAULT_SCALE:g} for a plain resize)")
    p.add_argument("--tile", type=int, default=192, help="tile side in input pixels, 0 = whole picture at once (default 192)")
    p.add_argument("--tile-overlap", type=int, default=32, help="pixels neighbouring tiles share (default 32)")
    p.add_argument("--out", required=True, help="output file (.png, .jpg, .webp); an existing file is replaced")
    p.add_argument("--device", type=str.lower, default="cpu", help="cpu, cuda, cuda:1, mps, in any case (default cpu)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=AUTO,
                   help="weight dtype; auto (default): fp32, as auto keeps every small model (README)")
    p.set_defaults(run=run_upscale)


def _read_input(path: str):
    from sdlab.pipeline.request import RequestError, input_image

    try:
        image = input_image(path, "image")
    except RequestError as err:
        raise UserError(str(err)) from None
    if image.mode not in ("RGB", "RGBA"):
        image = image.convert("RGBA" if "A" in image.getbands() or "transparency" in image.info else "RGB")
    return image


def _parameters_of(path: str) -> str | None:
    """The input's A1111 parameters text, or None (a picture without one, or an unreadable chunk)."""
    from sdlab.pipeline.png_info import ParametersError, read_parameters

    try:
        return read_parameters(path)
    except (ParametersError, OSError, ValueError):
        return None


def _postprocessing_texts(image, scale: float, upscaler) -> dict[str, str]:
    """The text items A1111's Extras (`run_postprocessing`) saves in a PNG besides the parameters: the input's own
    (string items of the picture, which `_read_input` read as `image`), and the infotext of what was done as both
    `postprocessing` and `extras` (`ScriptPostprocessingUpscale`: the scale asked, then the upscaler by the name
    A1111 lists it: R-ESRGAN 4x+ for RealESRGAN_x4plus, else the file's stem; Lanczos, Nearest)."""
    from sdlab.pipeline.png_info import other_text_items, quote
    from sdlab.pipeline.upscale import a1111_upscaler_name

    name = upscaler.capitalize() if isinstance(upscaler, str) else a1111_upscaler_name(upscaler.name)
    infotext = f"Postprocess upscale by: {float(scale)}, Postprocess upscaler: {quote(name)}"
    return {**other_text_items(image), "postprocessing": infotext, "extras": infotext}


def _check_options(args: argparse.Namespace) -> None:
    from sdlab.pipeline.png_info import IMAGE_SUFFIXES, image_format

    if image_format(args.out) is None:
        raise UserError(f"--out {args.out!r}: sdlab writes {', '.join(IMAGE_SUFFIXES)} files; name one of these")
    if os.path.isdir(args.out):
        raise UserError(f"--out {args.out!r} is a folder; name the output file")
    if args.scale is not None and not (0 < args.scale <= 16):
        raise UserError(f"--scale must lie in (0, 16], got {args.scale:g}")
    if args.tile < 0 or args.tile_overlap < 0:
        raise UserError("--tile and --tile-overlap must be >= 0")
    from sdlab.pipeline.upscale import MIN_TILE, tile_overlap_limit, tile_too_small

    if tile_too_small(args.tile):
        raise UserError(f"--tile {args.tile} is too small; use {MIN_TILE} or more pixels (0 = no tiling)")
    limit = tile_overlap_limit(args.tile, args.tile_overlap)
    if limit is not None:
        raise UserError(f"--tile-overlap {args.tile_overlap} must be at most half of --tile {args.tile} "
                        f"({limit}): tiles step by tile - overlap, so a larger overlap multiplies the network "
                        "runs (one per pixel at 16 / 15)")
    check_output_folder(Path(args.out).parent, OUT_FOLDER)


def _load(model: str, args: argparse.Namespace):
    """(the upscaler or the plain resize's name, its scale, its name for messages)."""
    from sdlab.api import RequestError, resolve_device
    from sdlab.checkpoints.upscaler import load_upscaler
    from sdlab.pipeline.upscale import PLAIN_UPSCALERS

    try:
        device = resolve_device(args.device)       # checked for a plain resize too, which runs on the CPU
    except RequestError as err:
        raise UserError(str(err)) from None
    if model.strip().lower() in PLAIN_UPSCALERS and not os.path.exists(model):
        return model.strip().lower(), None
    if not os.path.exists(model):
        raise UserError(f"the upscaler model {model!r} does not exist (or name lanczos / nearest for a plain resize)")
    upscaler = load_upscaler(model, device=device, dtype=requested_dtype(args.dtype))
    return upscaler, upscaler.scale


def run_upscale(args: argparse.Namespace) -> int:
    from sdlab.pipeline.png_info import encode_image, image_format, write_files_all_or_nothing
    from sdlab.pipeline.upscale import UpscaleError, upscale_by

    _check_options(args)
    image = _read_input(args.image)
    parameters = _parameters_of(args.image)
    upscaler, model_scale = _load(args.model, args)
    scale = args.scale if args.scale is not None else (model_scale or PLAIN_DEFAULT_SCALE)
    try:
        result = upscale_by(image, upscaler, scale, tile=args.tile, overlap=args.tile_overlap)
    except UpscaleError as err:
        raise UserError(str(err)) from None
    out = Path(args.out)
    texts = _postprocessing_texts(image, scale, upscaler)
    blob = encode_image(result, image_format(out), parameters, texts=texts)
    make_output_folder(out.parent, OUT_FOLDER)
    try:
        write_files_all_or_nothing([(out, blob)], overwrite=True)
    except OSError as err:
        raise write_error(err, out) from None
    print(out)
    return 0
