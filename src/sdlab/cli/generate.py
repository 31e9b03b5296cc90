"""`sdlab txt2img | img2img | inpaint`: draw pictures from the command line.

    sdlab txt2img "a red apple" --negative "blurry" --steps 20 --seed 1 --out apple.png
    sdlab img2img "a green apple" --init apple.png --strength 0.6
    sdlab inpaint "a pear" --init apple.png --mask mask.png
    sdlab inpaint "a wide field" --init apple.png --outpaint 64,64,0,0
    sdlab txt2img --from-png apple.png          # the same picture again, from its parameters chunk

Unset options take the model family's defaults (size, sampler, schedule). Each picture is a PNG with
an A1111-style `parameters` chunk, written atomically; nothing is written when an input is bad.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

from sdlab.cli.errors import UserError

DTYPES = ("fp32", "fp16", "bf16")


def add_generate(subparsers: argparse._SubParsersAction) -> None:
    for mode, help_text in (
        ("txt2img", "draw a picture from a prompt"),
        ("img2img", "redraw an init image guided by a prompt"),
        ("inpaint", "repaint the white area of a mask (or grow the canvas with --outpaint)"),
    ):
        p = subparsers.add_parser(mode, help=help_text, description=help_text)
        p.add_argument("prompt", nargs="?", help="the prompt (A1111 syntax: (word:1.3), [word], BREAK)")
        p.add_argument("--negative", help="negative prompt")
        p.add_argument("--model", help="checkpoint file or diffusers folder (default: the model shipped with sdlab)")
        p.add_argument("--vae", help="standalone VAE file that replaces the checkpoint's VAE")
        p.add_argument("--family", help="override family detection (sd1, sd2, sdxl, ...)")
        p.add_argument("--prediction", choices=("eps", "v", "x0"), help="override the prediction type (SD 2.x 768: v)")
        p.add_argument("--refiner", help="SDXL refiner checkpoint that finishes the schedule")
        p.add_argument("--refiner-switch", type=float, default=0.8,
                       help="fraction of the schedule the base model runs before the refiner (default 0.8)")
        p.add_argument("--sampler", help='sampler, A1111 or ComfyUI name ("DPM++ 2M", "euler_ancestral", ...)')
        p.add_argument("--schedule", help="noise schedule: karras, exponential, normal, simple, sgm_uniform, leading, ...")
        p.add_argument("--steps", type=int, help="sampling steps (default 20)")
        p.add_argument("--cfg", type=float, help="classifier-free guidance scale (default 7)")
        p.add_argument("--seed", type=int, help="seed of the first image; image i uses seed + i (default: random)")
        p.add_argument("--width", type=int, help="width in pixels, a multiple of 8 (default: the family's)")
        p.add_argument("--height", type=int, help="height in pixels, a multiple of 8 (default: the family's)")
        p.add_argument("--batch", type=int, help="number of images (default 1)")
        p.add_argument("--clip-skip", type=int, help="A1111 clip skip: 1 = usual layer, 2 = one layer back")
        p.add_argument("--eta", type=float, help="noise amount of ancestral / DDIM samplers")
        p.add_argument("--out", default="outputs", help="output .png file, or a folder (default: ./outputs)")
        p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps (default cpu)")
        p.add_argument("--dtype", choices=DTYPES, default="fp32", help="weight dtype (default fp32)")
        p.add_argument(
            "--lora", action="append", default=[], metavar="FILE:WEIGHT",
            help="merge a LoRA file (kohya / A1111 format) at WEIGHT (default 1); repeatable",
        )
        p.add_argument("--from-png", help="take every unset option from this PNG's parameters chunk")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        if mode != "txt2img":
            p.add_argument("--init", help="init image (required unless --from-png names one)")
            p.add_argument("--strength", type=float, help="how much to change the image, in (0, 1]")
        if mode == "inpaint":
            p.add_argument("--mask", help="mask image, white = repaint, same size as --init")
            p.add_argument("--mask-blur", type=float, help="Gaussian blur radius of the mask in pixels")
            p.add_argument(
                "--outpaint", metavar="L,R,T,B",
                help="grow the canvas by these many pixels left,right,top,bottom and paint the new area",
            )
        p.set_defaults(run=run_generate, mode=mode)


def _options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """GenerationRequest keyword arguments: the PNG's parameters, then every option given on the line."""
    from sdlab.pipeline.infotext import from_parameters
    from sdlab.pipeline.png_info import parse_parameters, read_parameters

    options: dict[str, Any] = {}
    if args.from_png:
        try:
            text = read_parameters(args.from_png)
        except OSError as err:
            raise UserError(f"cannot read {args.from_png}: {err}") from None
        if not text:
            raise UserError(f"{args.from_png} has no 'parameters' chunk to regenerate from")
        try:
            options.update(from_parameters(parse_parameters(text)))
        except ValueError as err:
            raise UserError(str(err)) from None
    given = {
        "prompt": args.prompt,
        "negative_prompt": args.negative,
        "sampler": args.sampler,
        "schedule": args.schedule,
        "steps": args.steps,
        "cfg_scale": args.cfg,
        "seed": args.seed,
        "width": args.width,
        "height": args.height,
        "batch_size": args.batch,
        "clip_skip": args.clip_skip,
        "eta": args.eta,
        "strength": getattr(args, "strength", None),
        "mask_blur": getattr(args, "mask_blur", None),
    }
    options.update({k: v for k, v in given.items() if v is not None})
    if options.get("prompt") is None:
        raise UserError("a prompt is needed (or --from-png FILE)")
    if args.mode == "txt2img":
        options.pop("strength", None)
    return options


def _open_image(path: str, what: str):
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except FileNotFoundError:
        raise UserError(f"the {what} {path!r} does not exist") from None
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read the {what} {path!r}: {err}") from None


def _parse_outpaint(text: str) -> tuple[int, int, int, int]:
    parts = text.split(",")
    try:
        values = tuple(int(v) for v in parts)
    except ValueError:
        values = ()
    if len(values) != 4 or min(values) < 0 or max(values) == 0:
        raise UserError(f"--outpaint wants four pixel counts LEFT,RIGHT,TOP,BOTTOM (>= 0, not all 0), got {text!r}")
    return values  # type: ignore[return-value]


def _output_paths(out: str, prompt: str, seeds: list[int]) -> list[Path]:
    """Where each image goes; checks the folder is writable before any work is done."""
    target = Path(out)
    if target.suffix.lower() == ".png":
        folder = target.parent if str(target.parent) else Path(".")
        paths = [target] if len(seeds) == 1 else [target.with_name(f"{target.stem}-{i}.png") for i in range(len(seeds))]
    else:
        folder = target
        slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48] or "image"
        paths = [folder / f"{seed}-{slug}.png" for seed in seeds]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".sdlab-check-"):
            pass
    except OSError as err:
        raise UserError(f"cannot write to the output folder {str(folder)!r}: {err.strerror or err}") from None
    return paths


def _load_pipeline(args: argparse.Namespace):
    import torch

    from sdlab.api import load, shipped_model_path

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    model = args.model or shipped_model_path()
    if model is None:
        raise UserError("no --model given and this sdlab install has no built-in model; pass --model PATH")
    loras = [_parse_lora(spec) for spec in args.lora]
    if not 0.0 < args.refiner_switch < 1.0:
        raise UserError(f"--refiner-switch must lie in (0, 1), got {args.refiner_switch}")
    pipe = load(model, device=args.device, dtype=dtype, vae=args.vae, family=args.family, prediction=args.prediction,
                refiner=args.refiner, refiner_switch=args.refiner_switch, loras=loras)
    return pipe, model


def _parse_lora(spec: str) -> tuple[str, float]:
    """``FILE[:WEIGHT]`` -> (file, weight). The text after the last colon is the weight unless the whole spec
    is an existing file or that text is a path or file name ("C:\\x.safetensors", "C:x.safetensors")."""
    path, colon, weight = spec.rpartition(":")
    if not colon or not path or os.path.isfile(spec) or re.search(r"[/\\]|\.[A-Za-z]\w*$", weight):
        path, weight = spec, "1"
    try:
        value = float(weight)
    except ValueError:
        value = float("nan")
    if value != value or abs(value) == float("inf"):
        raise UserError(f"--lora {spec!r}: the weight {weight!r} is not a finite number (FILE:WEIGHT, e.g. style.safetensors:0.8)")
    if not os.path.isfile(path):
        raise UserError(f"the LoRA file {path!r} does not exist")
    return path, value


def run_generate(args: argparse.Namespace) -> int:
    from sdlab.pipeline.images import pad_for_outpaint
    from sdlab.pipeline.infotext import to_parameters
    from sdlab.pipeline.png_info import format_parameters, model_hash, save_png_atomic
    from sdlab.pipeline.request import GenerationRequest, RequestError

    options = _options_from_args(args)
    if args.mode != "txt2img":
        if not args.init:
            raise UserError(f"{args.mode} needs --init IMAGE")
        options["init_image"] = _open_image(args.init, "init image")
    if args.mode == "inpaint":
        if args.outpaint:
            if args.mask:
                raise UserError("give either --mask or --outpaint, not both")
            left, right, top, bottom = _parse_outpaint(args.outpaint)
            options["init_image"], options["mask_image"] = pad_for_outpaint(
                options["init_image"], left, right, top, bottom, mask_overlap=8
            )
            options.pop("width", None)
            options.pop("height", None)
        elif args.mask:
            options["mask_image"] = _open_image(args.mask, "mask")
        else:
            raise UserError("inpaint needs --mask IMAGE or --outpaint L,R,T,B")
        options.setdefault("strength", 1.0)

    try:
        request = GenerationRequest(**options)
    except TypeError as err:
        raise UserError(str(err)) from None
    pipe, model = _load_pipeline(args)
    try:
        from sdlab.pipeline.generate import resolve_for

        request = resolve_for(pipe.bundle, request)
    except RequestError as err:
        raise UserError(str(err)) from None
    paths = _output_paths(args.out, request.prompt, request.seeds())

    progress = None
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=request.steps, desc=args.mode, unit="step", file=sys.stderr, leave=False)
        progress = lambda info: bar.update(1)  # noqa: E731
    try:
        result = pipe.run(request, progress=progress)
    except RequestError as err:
        raise UserError(str(err)) from None
    finally:
        if bar is not None:
            bar.close()

    name = Path(model).stem if os.path.isfile(model) else Path(model).name
    hash_ = model_hash(model) if os.path.isfile(model) else None
    for i, (image, path) in enumerate(zip(result.images, paths)):
        parameters = format_parameters(to_parameters(result.request, index=i, model_name=name, model_hash=hash_))
        save_png_atomic(image, path, parameters)
        print(path)
    return 0
