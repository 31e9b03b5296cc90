"""`sdlab txt2img | img2img | inpaint`: draw pictures from the command line.

    sdlab txt2img "a red apple" --negative "blurry" --steps 20 --seed 1 --out apple.png
    sdlab img2img "a green apple" --init apple.png --strength 0.6
    sdlab inpaint "a pear" --init apple.png --mask mask.png
    sdlab inpaint "a wide field" --init apple.png --outpaint 64,64,0,0
    sdlab txt2img --from-png apple.png          # the same picture again, from its parameters chunk
    sdlab txt2img --prompts-file prompts.txt    # a run per line, A1111's Prompts from file (cli/prompts_file.py)
    sdlab img2img "a castle" --init photo.png --loopback 4    # A1111's Loopback (cli/img2img_scripts.py)
    sdlab img2img "a castle" --init photo.png --sd-upscale 2  # A1111's SD upscale (cli/img2img_scripts.py)
    sdlab inpaint "a castle" --init photo.png --mask sky.png --loopback 3     # Loopback with the mask

Unset options take the model family's defaults (size, sampler, schedule). Each picture carries the
A1111-style parameters (a PNG `parameters` chunk; EXIF UserComment in a .jpg / .webp), including the
model's name and hash and every LoRA (`<lora:NAME:WEIGHT>` in the prompt, `Lora hashes`), so that
`--from-png` draws it again. In a folder, files are named `00012-<seed>-<prompt>.png` with A1111's
counter and never replace an existing file; a batch is written all or nothing; nothing is written when
an input is bad.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sdlab.cli.errors import UserError, utf8_text, write_error
from sdlab.cli.img2img_scripts import (add_img2img_script_flags, check_script_flags, run_script, script_chosen,
                                       script_request, take_recorded_script_settings)
from sdlab.cli.prompts_file import add_prompts_file_flags, check_without_prompts_file, run_prompts_file
from sdlab.utils.dtypes import DTYPE_CHOICES, requested_dtype
from sdlab.utils.files import make_output_folder
from sdlab.utils.numbers import finite_float
from sdlab.utils.threads import use_threads_for

logger = logging.getLogger("sdlab")
MASKED_CONTENT_FLAGS = ("fill", "original", "latent-noise", "latent-nothing", "grey")   # the request's, hyphenated



def add_generate(subparsers: argparse._SubParsersAction) -> None:
    for mode, help_text in (
        ("txt2img", "draw a picture from a prompt"),
        ("img2img", "redraw an init image guided by a prompt"),
        ("inpaint", "repaint the white area of a mask (or grow the canvas with --outpaint)"),
    ):
        p = subparsers.add_parser(mode, help=help_text, description=help_text)
        p.add_argument("prompt", nargs="?", type=utf8_text("the prompt"),
                       help="the prompt (A1111 syntax: (word:1.3), [word], BREAK)")
        p.add_argument("--negative", "--negative-prompt", dest="negative", type=utf8_text("--negative"),
                       help="negative prompt (diffusers' and A1111's negative_prompt)")
        _add_second_prompt_flags(p, from_png=True)
        _add_model_flags(p, from_png=True)
        _add_sampling_flags(p, from_png=True, init=mode != "txt2img")
        p.add_argument("--out", default="outputs",
                       help="output file (.png, .jpg, .webp; a batch adds -0, -1, ...; an existing file is replaced) "
                            "or a folder, where files are numbered 00012-SEED-PROMPT.png and never replaced "
                            "(default: ./outputs)")
        _add_run_flags(p, from_png=True)
        p.add_argument("--models-dir", action="append", default=[], metavar="DIR",
                       help="where --from-png looks for the picture's model, by name or by its recorded hash "
                            "(subfolders too), its LoRAs (its Lora / loras folder) and an upscaler by name (its "
                            "ESRGAN / RealESRGAN folders): A1111's models layout; repeatable, the first that holds "
                            "a name wins")
        p.add_argument("--from-png", help="take every unset option, the LoRAs and (checked) the model from this "
                                          "image's parameters (PNG, or JPEG / WebP written by sdlab or A1111)")
        add_style_flags(p, from_png=True)
        add_prompts_file_flags(p)
        if mode != "inpaint":       # img2img: ComfyUI's two-pass graph from a VAEEncode (--hr-convention comfyui)
            _add_hires_flags(p)
        if mode != "txt2img":
            _add_init_flags(p, "init image (required, also with --from-png)", "1" if mode == "inpaint" else "0.75",
                            from_png=True)
        if mode != "txt2img":
            add_img2img_script_flags(p, mode)
        if mode == "inpaint":
            _add_inpaint_flags(p)
        p.set_defaults(run=run_generate, mode=mode)


def add_style_flags(p: argparse.ArgumentParser, from_png: bool) -> None:
    """A1111's prompt styles: --style NAME of --styles-file FILE (`sdlab grid` shares them; `from_png`: the command
    has --from-png)."""
    p.add_argument("--style", action="append", default=[], type=utf8_text("--style"), metavar="NAME",
                   help="an A1111 prompt style of --styles-file: its prompt and negative prompt applied to the prompts "
                        "(where its text has {prompt}, the prompt goes there; else it is appended after ', '); "
                        "repeatable, applied in order" + _if_from_png(from_png, " (default: the styles a --from-png "
                                                                                 "picture's prompts end with)"))
    p.add_argument("--styles-file", action="append", default=[], metavar="FILE",
                   help="A1111's styles.csv (header name,prompt,negative_prompt) that --style names; a name with * or "
                        "? is a pattern in its folder; repeatable (default: ./styles.csv if there is one)")


def styles_of(args: argparse.Namespace):
    """The styles of --styles-file (./styles.csv if there is one without it); a file that cannot be read, or a
    --style no file has, is a UserError."""
    from sdlab.pipeline.styles import STYLES_FILE, StyleDatabase, StylesError

    files = args.styles_file or ([STYLES_FILE] if Path(STYLES_FILE).is_file() else [])
    try:
        styles = StyleDatabase.load(files)
    except StylesError as err:
        raise UserError(f"--styles-file: {err}") from None
    if unknown := styles.unknown(args.style):
        where = ", ".join(files) or "no --styles-file (and no ./styles.csv)"
        raise UserError(f"--style {unknown[0]!r}: no such style in {where}; styles: "
                        f"{', '.join(map(repr, styles.styles)) or 'none'}")
    return styles


def _picture_styles(recorded: dict[str, Any], styles) -> tuple[dict[str, Any], list[str]]:
    """A --from-png picture's parameters with the texts of the styles its prompts hold taken out, and those styles,
    as A1111 pastes a picture's parameters (`styles.infotext_styles`, its default "Apply if any")."""
    from sdlab.pipeline.styles import STYLES_ARRAY, infotext_styles

    if not recorded:
        return recorded, []
    read = infotext_styles(recorded, styles)
    return read, read.pop(STYLES_ARRAY, [])


def _if_from_png(from_png: bool, text: str) -> str:
    """`text`, a help text's words on --from-png, for a command that has it (not `sdlab grid`); else nothing."""
    return text if from_png else ""


def _add_second_prompt_flags(p: argparse.ArgumentParser, from_png: bool) -> None:
    """SDXL's --prompt-2 and --negative-prompt-2 (`sdlab grid` shares them; `from_png`: the command has --from-png)."""
    p.add_argument("--prompt-2", type=utf8_text("--prompt-2"), dest="prompt_2",
                   help="SDXL: the second text encoder's (OpenCLIP bigG's) prompt, diffusers' prompt_2 (default: the "
                        "prompt" + _if_from_png(from_png, "; a --from-png picture's Prompt 2 unless another prompt is "
                                                          "given") + ")")
    p.add_argument("--negative-prompt-2", type=utf8_text("--negative-prompt-2"), dest="negative_prompt_2",
                   help="SDXL: the second text encoder's negative prompt (default: the negative prompt"
                        + _if_from_png(from_png, "; a --from-png picture's Negative prompt 2 unless another --negative "
                                                 "is given") + ")")


def _add_model_flags(p: argparse.ArgumentParser, from_png: bool) -> None:
    """The model drawing: its file, VAE, family, prediction type and SDXL refiner (`sdlab grid` shares them;
    `from_png`: the command has --from-png)."""
    p.add_argument("--model", help="checkpoint file or diffusers folder (default: the model shipped with sdlab)")
    p.add_argument("--vae", help="standalone VAE file that replaces the checkpoint's VAE")
    p.add_argument("--no-sidecar-vae", dest="sidecar_vae", action="store_false",
                   help="keep the checkpoint's own VAE where an A1111 sidecar <name>.vae.* lies beside it "
                        "(drawn by default, as A1111's sd_vae Automatic; this is its None)")
    p.add_argument("--family", help="override family detection (sd1, sd2, sdxl, ...)")
    p.add_argument("--prediction", choices=("eps", "v", "x0"), help="override the prediction type (SD 2.x 768: v)")
    p.add_argument("--refiner", help="SDXL refiner checkpoint that finishes the schedule")
    p.add_argument("--refiner-switch", type=float,
                   help="fraction of the schedule the base model runs before the refiner (default 0.8"
                        + _if_from_png(from_png, ", or the --from-png picture's") + ")")


def _add_sampling_flags(p: argparse.ArgumentParser, from_png: bool, init: bool) -> None:
    """The settings of the pictures drawn: sampler to preset (`sdlab grid` shares them; `from_png`: the command
    has --from-png; `init`: it has --init, whose picture's size an unset size is)."""
    p.add_argument("--sampler", help='sampler, A1111 or ComfyUI name ("DPM++ 2M", "euler_ancestral", ...); '
                   "LMS, PLMS and DPM++ 3M SDE need about 30 steps with guidance (LMS: 20 with karras)")
    p.add_argument("--schedule", help="noise schedule: karras, exponential, normal, simple, sgm_uniform, leading, ... "
                   "(default: the model's, sgm_uniform for sdlab-tiny, karras for SD)")
    p.add_argument("--init-noise", type=str.lower, metavar="RULE",
                   help="how the start noise is scaled: sigma_max (times the first sigma, as A1111), vp (times "
                        "sqrt(1 + sigma^2), as diffusers' VP schedulers) or comfyui (ComfyUI's KSampler rule) "
                        "(default: the schedule's; a diffusers-named schedule: its scheduler's)")
    p.add_argument("--batch-noise", choices=("per_image", "comfyui"),
                   help="a batch's noise: per_image (image i from seed + i's generator, A1111's and diffusers') or "
                        "comfyui (the whole batch from one generator of the seed, as ComfyUI's KSampler) "
                        "(default per_image)")
    p.add_argument("--quantize-timesteps", action=argparse.BooleanOptionalAction,
                   help="round the U-Net's timesteps to integers, as diffusers' DPM-Solver and UniPC do with "
                        "Karras or exponential sigmas (default off)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's, 14 for sdlab-tiny, 20 for SD)")
    p.add_argument("--cfg", "--cfg-scale", type=float, dest="cfg",
                   help="classifier-free guidance scale (default: the model's, 5 for sdlab-tiny, 7 for SD)")
    p.add_argument("--guidance-rescale", "--cfg-rescale", type=float, dest="guidance_rescale", metavar="PHI",
                   help="diffusers' guidance_rescale (Lin et al. 2023): the guided noise prediction rescaled toward "
                        "the prompt's own standard deviation by this fraction, 0..1 (0 = off, the default; 0.7 for "
                        "zero-terminal-SNR models); recorded as CFG rescale")
    p.add_argument("--pag-scale", type=float, dest="pag_scale", metavar="SCALE",
                   help="perturbed-attention guidance (Ahn et al. 2024; diffusers' pag_scale, Forge's PAG scale, "
                        "ComfyUI's PerturbedAttentionGuidance): guides away from a U-Net pass whose --pag-layers "
                        "self-attentions are the identity, one more U-Net row per picture; 0 = off (the default), "
                        "3 is the usual value")
    p.add_argument("--pag-adaptive-scale", type=float, dest="pag_adaptive_scale", metavar="RATE",
                   help="diffusers' pag_adaptive_scale: the PAG scale at timestep t is max(SCALE - RATE * (1000 - t), 0), "
                        "so PAG fades out toward the end (0 = constant, the default)")
    p.add_argument("--pag-layers", nargs="+", dest="pag_layers", metavar="LAYER",
                   help="the self-attentions PAG perturbs, as diffusers' pag_applied_layers: regular expressions "
                        "searched in diffusers' module names, e.g. mid (the default), down, up, down_blocks.1, "
                        "up_blocks.0.attentions.1")
    p.add_argument("--ngms", "--s-min-uncond", type=float, dest="s_min_uncond", metavar="SIGMA",
                   help="A1111's NGMS (Negative Guidance minimum sigma): no negative prompt at every other model call "
                        "below this sigma (DDIM, PLMS, UniPC: timestep); 0 = off")
    p.add_argument("--ngms-all-steps", action=argparse.BooleanOptionalAction, dest="s_min_uncond_all",
                   help="A1111's NGMS all steps: --ngms skips every call below its sigma, not every other one")
    p.add_argument("--skip-early-cfg", type=float, dest="skip_early_cond", metavar="FRACTION",
                   help="A1111's Skip Early CFG: no negative prompt (no guidance) in this fraction of the first model "
                        "calls, 0..1 (0 = off)")
    p.add_argument("--pad-conds", action=argparse.BooleanOptionalAction, dest="pad_cond_uncond",
                   help="A1111's Pad conds: a prompt and negative of different lengths, the shorter padded with "
                        "chunks of \"\" (otherwise each is read as if alone)")
    p.add_argument("--pad-conds-v0", action=argparse.BooleanOptionalAction, dest="pad_cond_uncond_v0",
                   help="A1111's Pad conds v0 (its DDIM / PLMS before 1.6): the negative's last vector repeated to the "
                        "prompt's length, or the negative cut to it; wins over --pad-conds")
    p.add_argument("--seed", type=int, help="seed of the first image; image i uses seed + i (default: random)")
    p.add_argument("--subseed", type=int, metavar="SEED",
                   help="variation seed (A1111): with --subseed-strength, image i's noise moves toward the noise "
                        "of SEED + i while every image keeps --seed (default: random)")
    p.add_argument("--subseed-strength", type=float, metavar="S",
                   help="how far toward the variation seed's noise, 0 (off, the default) to 1")
    p.add_argument("--rng", type=str.lower, choices=("cpu", "gpu", "nv"),
                   help="random source of the noise (A1111's RNG; any case): cpu (default: a CPU generator, the "
                        "same noise on every device), nv (the numbers an NVIDIA GPU draws, on any device), gpu "
                        "(A1111's default: the CUDA device's generator; on other devices nv's numbers)"
                        + _if_from_png(from_png, "; a --from-png picture's RNG, A1111's without one gpu"))
    p.add_argument("--seed-resize-from", metavar="WxH",
                   help="A1111's Seed resize from: the noise the seeds draw at WxH pixels, centred in this size's, "
                        "so a picture keeps its composition at another size (0x0: off)")
    of_init = "; with --init the init picture's" if init else ""
    p.add_argument("--width", type=int, help=f"width in pixels, a multiple of 8 (default: the family's{of_init})")
    p.add_argument("--height", type=int, help=f"height in pixels, a multiple of 8 (default: the family's{of_init})")
    p.add_argument("--batch", type=int, help="images drawn together, one batch (default 1)")
    p.add_argument("--batch-count", type=int, default=1, metavar="N",
                   help="batches drawn one after another (A1111's batch count); seeds continue (default 1)")
    p.add_argument("--clip-skip", type=int,
                   help="clip skip: 1 = the usual layer, 2 = one layer back, for the prompt only (diffusers' "
                        "clip_skip=1)"
                        + _if_from_png(from_png, "; an A1111 picture's (--from-png) moves the negative too"))
    p.add_argument("--emphasis", metavar="MODE",
                   help="A1111's Emphasis mode: Original (the default: (word:1.2) weights, the mean restored), "
                        "\"No norm\" (weights, no mean restored), Ignore (the syntax read, no weight applied), None "
                        "(brackets, weights and BREAK are plain text) or ComfyUI (ComfyUI's parentheses and weights: "
                        "z_empty + (z - z_empty) * w)")
    p.add_argument("--old-prompt-editing", action=argparse.BooleanOptionalAction,
                   help="A1111's Old prompt editing timelines: [a:b:N] switches after step N when N >= 1, after N of "
                        "the steps when N < 1 (A1111 before 1.6); the hires pass reuses the first pass's timeline")
    p.add_argument("--downcast-alphas-cumprod", action=argparse.BooleanOptionalAction,
                   help="A1111's Downcast alphas_cumprod: the schedule's sigmas from float16 alphas_cumprod, as A1111 "
                        "before 1.7 drew")
    p.add_argument("--zero-terminal-snr", action=argparse.BooleanOptionalAction,
                   help="A1111's Noise Schedule \"Zero Terminal SNR\": the model's schedule rescaled so its last "
                        "step is pure noise (for models trained so)")
    p.add_argument("--tiling", action=argparse.BooleanOptionalAction,
                   help="A1111's Tiling: a seamless picture, whose left edge continues its right edge and top "
                        "edge its bottom (a texture that tiles)"
                        + _if_from_png(from_png, "; --no-tiling turns off a --from-png picture's"))
    _add_freeu_flags(p, from_png)
    _add_deep_cache_flags(p, from_png)
    p.add_argument("--token-merging-ratio", type=float, metavar="R",
                   help="A1111's Token merging ratio (tomesd): merge this fraction (0 <= R < 1) of the full-resolution "
                        "tokens before each self-attention, at most 3/4 of them (tomesd's cap: a ratio above 0.75 "
                        "merges as 0.75); faster at large sizes, a little less faithful; SDXL, without attention at "
                        "full resolution, draws unchanged (default 0: "
                        "none" + _if_from_png(from_png, ", or the --from-png picture's") + ")")
    p.add_argument("--eta", type=float, help="noise amount of ancestral / DDIM samplers (TCD: gamma)")
    p.add_argument("--s-churn", type=float, help="A1111's Sigma churn: Euler, Heun and DPM2 add noise back at each "
                   "step (k-diffusion's s_churn; 0 = off)")
    p.add_argument("--s-tmin", type=float, help="A1111's Sigma tmin: churn only at sigmas >= this")
    p.add_argument("--s-tmax", type=float, help="A1111's Sigma tmax: churn only at sigmas <= this (default and 0: inf, as A1111's 0)")
    p.add_argument("--s-noise", type=float, help="A1111's Sigma noise: scale of the noise the sampler adds (default 1)")
    p.add_argument("--sigma-min", type=float, dest="schedule_sigma_min",
                   help="A1111's Schedule min sigma: the schedule's lowest sigma (karras, exponential, "
                        "polyexponential, normal, sgm_uniform, A1111's Beta / KL Optimal; 0 = the model's)")
    p.add_argument("--sigma-max", type=float, dest="schedule_sigma_max",
                   help="A1111's Schedule max sigma: the schedule's highest sigma (as --sigma-min; 0 = the model's)")
    p.add_argument("--rho", type=float, dest="schedule_rho",
                   help="A1111's Schedule rho of karras (default 7) and polyexponential (default 1); 0 = the default")
    p.add_argument("--discard-penultimate-sigma", action=argparse.BooleanOptionalAction,
                   dest="discard_penultimate_sigma",
                   help="A1111's Discard penultimate sigma: drop the schedule's next-to-last sigma (as A1111's DPM2 "
                        "rows do) for any sampler but DDIM, PLMS, UniPC")
    p.add_argument("--unipc-variant", type=str.lower, metavar="VARIANT",
                   help="A1111's UniPC variant (its uni_pc_variant): bh1 (the default) or bh2, the B(h) of A1111's "
                        "UniPC")
    p.add_argument("--unipc-order", type=int, metavar="N",
                   help="A1111's UniPC order (its uni_pc_order), 1..50 (default 3); its UniPC takes at least N steps")
    p.add_argument("--unipc-lower-order-final", action=argparse.BooleanOptionalAction,
                   help="A1111's UniPC lower order final (its uni_pc_lower_order_final, default on): the last steps "
                        "of A1111's UniPC at a lower order; --no-unipc-lower-order-final keeps --unipc-order")
    p.add_argument("--beta-alpha", type=float, help="A1111's Beta schedule alpha: the beta schedules' Beta(alpha, "
                   "beta) (schedule beta or A1111's Beta; default 0.6)")
    p.add_argument("--beta-beta", type=float, help="A1111's Beta schedule beta (as --beta-alpha; default 0.6)")
    p.add_argument("--sgm-noise-multiplier", action=argparse.BooleanOptionalAction,
                   help="A1111's SGM noise multiplier: txt2img starts from noise times sqrt(1 + sigma^2), as SGM's "
                        "SDXL code (not DDIM, PLMS, UniPC)")
    p.add_argument("--extra-noise", type=float, metavar="X",
                   help="A1111's Extra noise: img2img, inpainting and the hires pass add their start noise once "
                        "more, times X (default 0)")
    p.add_argument("--eta-noise-seed-delta", "--ensd", type=int, dest="ensd",
                   help="A1111's ENSD: ancestral step noise from seed + N (e.g. 31337)")
    p.add_argument("--preset", metavar="NAME",
                   help="few-step settings (sampler, schedule, steps, CFG, eta) of a distilled model or LoRA: "
                        "turbo, lcm, lightning, hyper, tcd, lcm-model; options given here win (docs/few-step.md)")


CONTROL_SYNTAX = "FILE[:IMAGE[:STRENGTH[:START:END]]]"
"""--control's syntax: IMAGE left out (FILE, or FILE::STRENGTH[:START:END]) draws on img2img's / inpaint's init
picture."""


def _add_run_flags(p: argparse.ArgumentParser, from_png: bool) -> None:
    """Device, dtype, LoRAs, embeddings, ControlNets, progress, threads and compile (`sdlab grid` shares them;
    `from_png`: the command has --from-png)."""
    p.add_argument("--device", type=str.lower, default="cpu", help="cpu, cuda, cuda:1, mps, in any case (default cpu)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="weight dtype; auto (default): bf16 for SD1.5 / SDXL-size models on a CPU with native "
                        "bf16 or on CUDA, fp32 for small models (docs/performance.md)")
    p.add_argument(
        "--lora", action="append", default=[], metavar="FILE:WEIGHT",
        help="merge a LoRA file (kohya / A1111 format), or the LoRA of that name in the LoRA folders, at "
             "WEIGHT (default 1); repeatable",
    )
    p.add_argument("--embeddings-dir", action="append", default=[], metavar="DIR",
                   help="textual-inversion embeddings (.safetensors / .pt / .bin, subfolders too): each file's "
                        "name is a word of the prompt (or embedding:NAME); repeatable")
    p.add_argument("--lora-dir", action="append", default=[], metavar="DIR",
                   help="where <lora:NAME:WEIGHT> / <lora:NAME:TE:UNET> tags of the prompt"
                        + _if_from_png(from_png, " (or of --from-png)") + " find NAME.safetensors, subfolders "
                        "included; repeatable (also searched: models/Lora beside the --model's folder, "
                        + _if_from_png(from_png, "the --from-png file's folder, ") + "the current folder"
                        + _if_from_png(from_png, ", then the Lora / loras folder of each --models-dir") + ")")
    p.add_argument("--control", action="append", default=[], metavar=f"{CONTROL_SYNTAX} | FILE::STRENGTH...",
                   help="a ControlNet or T2I-Adapter (original or diffusers file / folder) and its hint image, "
                        "with its strength (default 1) and the fraction of the steps it acts on (default 0:1); "
                        "img2img / inpaint may leave the image out (FILE, or FILE::STRENGTH[:START:END]; not "
                        "FILE:STRENGTH, whose STRENGTH would be the image): the "
                        "control draws on the init picture (each pass's or tile's under a script), fitted by the "
                        "--resize-mode, as A1111's ControlNet unit without a picture; repeatable")
    p.add_argument("--control-module", action="append", default=[], type=str.lower, metavar="NAME",
                   help="preprocessor of the hint image of the matching --control (the first for the first, ...): "
                        "none (default), canny, scribble, threshold, invert, tile_resample, inpaint, inpaint_only "
                        "(A1111's meanings) or tile (sdlab's: down 4x and back); repeatable")
    p.add_argument("--control-mode", action="append", default=[], type=str.lower, metavar="MODE",
                   help="A1111's control mode of the matching --control: balanced (default), prompt (\"My prompt "
                        "is more important\"), control (\"ControlNet is more important\"); repeatable")
    p.add_argument("--control-resize", action="append", default=[], type=str.lower, metavar="MODE",
                   help="how the hint image of the matching --control fits the picture (A1111's resize modes): "
                        "resize (Just Resize: stretched; the default), crop (Crop and Resize), fill (Resize and "
                        "Fill: padded with its border's colour); repeatable")
    p.add_argument("--control-threshold-a", action="append", default=[], type=float, metavar="VALUE",
                   help="A1111's Threshold A of the matching --control's preprocessor: canny's low threshold "
                        "(100), threshold's level (127), tile_resample's rate (1); -1: the default; repeatable")
    p.add_argument("--control-threshold-b", action="append", default=[], type=float, metavar="VALUE",
                   help="A1111's Threshold B of the matching --control's preprocessor: canny's high threshold "
                        "(200); -1: the default; repeatable")
    p.add_argument("--control-processor-res", action="append", default=[], type=int, metavar="N",
                   help="A1111's Processor Res of the matching --control's canny / threshold / scribble: its "
                        "picture's short side is scaled to N (1..2048, A1111's slider's top) first; -1: unset, "
                        "the picture's own size (the default), or 512 when a picture's parameters are redrawn by "
                        "A1111's rule (Control steps: a1111), as the extension; repeatable")
    p.add_argument("--control-pixel-perfect", action="append", default=[], choices=("true", "false"),
                   help="A1111's Pixel Perfect of the matching --control (true: the Processor Res that scales its "
                        "picture to the drawing's size); repeatable")
    p.add_argument("--control-mask", action="append", default=[], metavar="FILE",
                   help="the mask of the matching --control's inpaint / inpaint_only hint (white = masked; "
                        "without one an inpainting run's mask serves); none: no mask of its own; repeatable")
    p.add_argument("--ip-adapter", action="append", default=[], metavar="FILE",
                   help="an IP-Adapter (h94's ip-adapter_sd15 / ip-adapter_sdxl .safetensors or .bin): the "
                        "matching --ip-adapter-image is drawn as an image prompt; repeatable")
    p.add_argument("--ip-adapter-image", action="append", default=[], metavar="FILE",
                   help="the picture of the matching --ip-adapter (the first for the first, ...); a FaceID "
                        "adapter's InsightFace face embedding as a .npy file instead (sdlab computes none); none "
                        "(or empty, or not given for the last adapters): img2img's / inpaint's --init picture, as "
                        "a --control without an image; repeatable")
    p.add_argument("--ip-adapter-face-embedding", action="append", default=[], metavar="FILE.npy",
                   help="the InsightFace face embedding (.npy, 512 floats) of the matching --ip-adapter, a FaceID "
                        "Plus adapter, which also reads its --ip-adapter-image picture; none (or empty): no face "
                        "embedding for that adapter (another kind), so that a FaceID Plus may follow it; repeatable")
    p.add_argument("--ip-adapter-face-shortcut", action="append", default=[], type=_face_shortcut, metavar="S",
                   help="the face shortcut's scale of the matching --ip-adapter, a FaceID Plus (its face tokens "
                        "added back times S, 0..10: a Plus v2's, for a file not named 'plusv2'); none: the default, "
                        "1 for a file whose name holds 'plusv2' (ComfyUI_IPAdapter_plus' rule), no shortcut for "
                        "another" + _if_from_png(from_png, ", or the --from-png picture's Face shortcut")
                        + "; repeatable")
    p.add_argument("--ip-adapter-scale", action="append", default=[], type=_ip_adapter_scale, metavar="S",
                   help="how strongly the matching --ip-adapter's picture acts, 0..10 (default 1"
                        + _if_from_png(from_png, ", or the Weight and Layers a --from-png picture's parameters record")
                        + "; A1111's Weight); or per layer (InstantStyle), "
                        "diffusers' set_ip_adapter_scale dict as JSON ('{\"up\": {\"block_0\": [0, 1, 0]}}': "
                        "blocks not named 0), its compact text ('down.block_2=0/1 up.block_0=0/1/0') or a preset: "
                        "style, style+layout (SDXL's up_blocks.0.attentions.1, and down_blocks.2.attentions.1); "
                        "repeatable")
    p.add_argument("--ip-adapter-encoder", action="append", default=[], metavar="PATH",
                   help="the CLIP image encoder of the matching --ip-adapter (a folder with config.json and "
                        "model.safetensors, or its .safetensors file); default: the image_encoder folder beside "
                        "the adapter file or one folder up (h94/IP-Adapter's layout); repeatable")
    for flag, which, default in (("--ip-adapter-start", "from", "0"), ("--ip-adapter-end", "to", "1")):
        p.add_argument(flag, action="append", default=[], type=float, metavar="F",
                       help=f"the fraction of the steps the matching --ip-adapter acts {which}, 0..1 (default "
                            f"{default}" + _if_from_png(from_png, ", or the --from-png picture's Guidance Start / End")
                            + "; A1111's ControlNet unit's); its steps as a --control's: diffusers' rule"
                            + _if_from_png(from_png, ", or a --from-png picture's Control steps") + "; repeatable")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads (default: all cores; for small models such as the shipped one the free "
                        "cores, at most 2; OMP_NUM_THREADS also sets it)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the U-Net (slow first run of each size; kept in a cache for later runs)")


def _add_init_flags(p: argparse.ArgumentParser, init_help: str, strength_default: str, from_png: bool) -> None:
    """--init, --strength and --resize-mode (img2img's and inpaint's; `sdlab grid`'s with --init; `from_png`: the
    command has --from-png)."""
    p.add_argument("--init", help=init_help)
    p.add_argument("--strength", type=float,
                   help=f"how much to change the image, in (0, 1] (default {strength_default}"
                        + _if_from_png(from_png, ", or the --from-png picture's") + ")")
    p.add_argument("--resize-mode", choices=("resize", "crop", "fill", "latent"),
                   help="how --init fits --width x --height (A1111's resize modes): resize stretches it (the "
                        "default), crop covers the size and cuts the middle out, fill fits it inside and "
                        "stretches its edges over the rest, latent stretches its latent (bilinear)")
    p.add_argument("--mask-weight", type=float, dest="inpainting_mask_weight", metavar="W",
                   help="A1111's Conditional mask weight: how much an inpainting model's masked picture is masked, "
                        "0 (the whole picture) to 1 (the default)")
    p.add_argument("--image-cfg-scale", type=_image_cfg_scale, metavar="S",
                   help="an edit (InstructPix2Pix) model's image guidance scale (A1111's Image CFG scale, diffusers' "
                        "image_guidance_scale): how closely it keeps to --init, 0 or more (default 1.5"
                        + _if_from_png(from_png, ", or the --from-png picture's") + "); none: no image guidance, "
                        "the picture in both passes of CFG (A1111's unset field), which 1 draws too but records; "
                        "other models do not read it")


def _image_cfg_scale(text: str) -> float | str:
    """--image-cfg-scale: a number, or "none" (`NO_IMAGE_GUIDANCE`, any case), which `_options_from_args` makes the
    request's None."""
    from sdlab.pipeline.request import NO_IMAGE_GUIDANCE

    if text.strip().lower() == NO_IMAGE_GUIDANCE:
        return NO_IMAGE_GUIDANCE
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or none, got {text!r}") from None


def _add_inpaint_flags(p: argparse.ArgumentParser) -> None:
    """The mask, its blur and mode, the masked area's content, "Only masked" and --outpaint."""
    p.add_argument("--mask", help="mask image, white = repaint; one of another size than --init is "
                                  "resized with it")
    p.add_argument("--mask-blur", type=float, metavar="SIGMA",
                   help="A1111's Mask blur: the standard deviation in pixels of the Gaussian blur of the mask "
                        "(a kernel of 2*int(2.5*SIGMA+0.5)+1 taps, as cv2's; default 0, no blur, or the "
                        "--from-png picture's; A1111's UI starts at 4)")
    p.add_argument("--invert-mask", action=argparse.BooleanOptionalAction,
                   help="repaint where the mask is black (A1111's Mask mode \"Inpaint not masked\"); "
                        "--no-invert-mask turns off a --from-png picture's")
    p.add_argument("--mask-round", action=argparse.BooleanOptionalAction,
                   help="--no-mask-round keeps the blurred mask's levels where A1111 rounds them (its API's "
                        "mask_round off: a transparent mask's alpha, the latent blend and a 9-channel model's mask "
                        "soft); --mask-round (the default) turns off a --from-png picture's")
    p.add_argument("--masked-content", choices=MASKED_CONTENT_FLAGS,
                   help="what the masked area starts as (A1111's Masked content): original (the default), "
                        "fill (the colours around it), latent-noise, latent-nothing; grey: the masked pixels "
                        "mid-grey as encoded (ComfyUI's VAEEncodeForInpaint)")
    p.add_argument("--mask-grow", type=int, metavar="PX",
                   help="grow the rounded mask by a PX x PX box for the latent noise mask (ComfyUI's "
                        "VAEEncodeForInpaint grow_mask_by, 0-64; a sampler spelt as ComfyUI spells it)")
    p.add_argument("--only-masked", action=argparse.BooleanOptionalAction,
                   help="draw only the mask's region, at --width x --height, and put it back into the picture "
                        "(A1111's Inpaint area \"Only masked\"; default: the whole picture); --no-only-masked "
                        "turns off a --from-png picture's")
    p.add_argument("--only-masked-padding", type=int, metavar="N",
                   help="pixels the --only-masked region reaches past the mask (default 32)")
    p.add_argument(
        "--outpaint", metavar="L,R,T,B",
        help="grow the canvas by these many pixels left,right,top,bottom and paint the new area "
             "(trimmed so that the canvas is a multiple of 8 pixels)",
    )


def _add_hires_flags(p: argparse.ArgumentParser, from_png: bool = True) -> None:
    """The hires fix options (`from_png`: the command has --from-png and --models-dir, which --hr-upscaler's name
    lookup then reads)."""
    p.add_argument("--hr-scale", type=float, metavar="S",
                   help="hires fix (A1111): draw at --width x --height, upscale by S (>= 1), redraw with img2img")
    p.add_argument("--hr-size", metavar="WxH", help="hires fix to this size instead of --hr-scale (0 for a side keeps "
                                                   "the aspect ratio; both: cover, then a centred crop)")
    p.add_argument("--hr-upscaler", metavar="NAME|FILE",
                   help='"Latent" (default), "Latent (bicubic)", "Latent (antialiased)", "Latent (nearest)", ..., '
                        "Lanczos, Nearest, or an upscaler model file (ESRGAN / Real-ESRGAN): a path, or a name "
                        "(the file's stem, or A1111's 'R-ESRGAN 4x+') "
                        + ("beside the --from-png picture, in the current folder or in a --models-dir's ESRGAN / "
                           "RealESRGAN folder" if from_png else "in the current folder"))
    p.add_argument("--hr-steps", type=int, metavar="N", help="second-pass steps (default 0: as many as the first pass)")
    p.add_argument("--hr-denoise", type=float, metavar="D",
                   help="second-pass denoising strength above 0; above 1 draws as 1 (default 0.7)")
    p.add_argument("--hr-sampler", metavar="NAME", help="second-pass sampler (A1111's Hires sampler; default: --sampler)")
    p.add_argument("--hr-eta", type=float, help="second-pass eta (default: --eta)")
    p.add_argument("--hr-schedule", metavar="NAME",
                   help="second-pass schedule (A1111's Hires schedule type; default: --schedule, unset: the sampler's)")
    p.add_argument("--hr-prompt", type=utf8_text("--hr-prompt"), metavar="TEXT",
                   help="second-pass prompt, with its own prompt editing and <lora:...> tags (A1111's Hires prompt; "
                        "default: the prompt)")
    p.add_argument("--hr-negative-prompt", type=utf8_text("--hr-negative-prompt"), metavar="TEXT",
                   help="second-pass negative prompt (default: the negative)")
    p.add_argument("--hr-seed", type=int, metavar="N", help="second-pass seed (-1: a random one; default: --seed)")
    p.add_argument("--hr-cfg-scale", type=float, metavar="C", help="second-pass CFG scale (default: --cfg-scale)")
    p.add_argument("--hr-convention", choices=("a1111", "comfyui"),
                   help="a1111 (default): A1111's hires fix; comfyui: ComfyUI's two-pass graph (KSampler -> "
                        "LatentUpscale(By) -> KSampler): --hr-upscaler one of nearest-exact (default), bilinear, area, "
                        "bicubic, bislerp, no crop box, --hr-denoise the second KSampler's (default 1)")
    p.add_argument("--hr-crop", choices=("disabled", "center"),
                   help="comfyui: LatentUpscale's crop to the --hr-size aspect (default disabled: stretched)")
    p.add_argument("--token-merging-ratio-hr", type=float, metavar="R",
                   help="second-pass token merging ratio (A1111's Token merging ratio hr; default 0: "
                        "--token-merging-ratio's)")


# the hires flags (`_add_hires_flags`), by their argparse names
_HIRES_FLAGS = ("hr_scale", "hr_size", "hr_upscaler", "hr_steps", "hr_denoise", "hr_sampler", "hr_eta", "hr_schedule",
                "hr_prompt", "hr_negative_prompt", "hr_seed", "hr_cfg_scale", "hr_convention", "hr_crop")


def _is_comfyui_img2img_two_pass(picture: dict[str, Any]) -> bool:
    """Whether a --from-png picture's fields (`from_parameters`, before any flag is put over them) are a ComfyUI
    img2img two-pass: hr_convention comfyui with both its Denoising strength (the first pass's) and Hires denoising
    strength. A txt2img hires picture records the one Denoising strength, read as hr_denoise alone."""
    return picture.get("hr_convention") == "comfyui" and None not in (picture.get("strength"),
                                                                      picture.get("hr_denoise"))


def _hires_options(args: argparse.Namespace, options: dict[str, Any], picture_two_pass: bool = False) -> None:
    """Put the hires flags into `options` (txt2img; img2img under ComfyUI's two-pass graph from a VAEEncode:
    --hr-convention comfyui, or a --from-png img2img two-pass picture's, `picture_two_pass`, judged from its own
    recorded fields; img2img's hires flags otherwise go to the request, which refuses A1111's hires fix there).
    Otherwise a --from-png picture's hires fields are dropped, its Denoising strength the strength."""
    from sdlab.cli.models_dirs import find_upscaler_in
    from sdlab.pipeline.infotext import HIRES_FIELDS

    comfyui = getattr(args, "hr_convention", None) == "comfyui" or picture_two_pass
    flagged = any(getattr(args, name, None) is not None for name in _HIRES_FLAGS)   # kept: the request says what
    if args.mode == "inpaint" or args.mode == "img2img" and not (comfyui or flagged):
        if options.get("hr_denoise") is not None:
            options.setdefault("strength", options["hr_denoise"])
        for name in HIRES_FIELDS:
            options.pop(name, None)
        return
    if not hasattr(args, "hr_size"):               # a command without the hires flags (sdlab grid)
        return
    if args.hr_size is not None:
        try:
            width, height = (int(v) for v in args.hr_size.lower().split("x"))
        except ValueError:
            raise UserError(f"--hr-size wants WIDTHxHEIGHT (e.g. 1024x768, or 1024x0), got {args.hr_size!r}") from None
        if min(width, height) < 0 or max(width, height) == 0:
            raise UserError(f"--hr-size wants pixel counts >= 0, not both 0, got {args.hr_size!r}")
        options.update(hr_width=width, hr_height=height)
        options.pop("hr_scale", None)
    elif args.hr_scale is not None:
        options.update(hr_scale=args.hr_scale)
        options.pop("hr_width", None)
        options.pop("hr_height", None)
    given = {"hr_upscaler": args.hr_upscaler, "hr_steps": args.hr_steps, "hr_denoise": args.hr_denoise,
             **{name: getattr(args, name) for name in ("hr_sampler", "hr_schedule", "hr_eta", "hr_prompt",
                                                       "hr_negative_prompt", "hr_seed", "hr_cfg_scale",
                                                       "hr_convention", "hr_crop")}}
    options.update({k: v for k, v in given.items() if v is not None})
    if options.get("hr_upscaler") is not None:     # a recorded name: the model file beside the picture, here, or
        folders = [Path(args.from_png).resolve().parent] if args.from_png else []    # in A1111's models folders
        options["hr_upscaler"] = find_upscaler_in(options["hr_upscaler"], [*folders, Path(".")],
                                                  getattr(args, "models_dir", []))


def _recorded_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed parameters of `--from-png` ({} without it); another program's metadata in their place (JSON,
    ComfyUI's chunks, ...) is a UserError naming it, a text without a settings line a warning."""
    from sdlab.pipeline.png_info import NEGATIVE_PROMPT, PROMPT, foreign_metadata, parse_parameters, read_parameters

    if not args.from_png:
        return {}
    try:
        text = read_parameters(args.from_png)
    except FileNotFoundError:
        raise UserError(f"the --from-png file {args.from_png!r} does not exist") from None
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {args.from_png}: {err}") from None
    foreign = foreign_metadata(args.from_png, text)
    if foreign:
        raise UserError(f"{args.from_png} holds {foreign}, not the A1111 parameters text sdlab regenerates from")
    if not text:
        raise UserError(f"{args.from_png} has no 'parameters' chunk to regenerate from")
    parsed = parse_parameters(text)
    if parsed.keys() == {PROMPT, NEGATIVE_PROMPT}:
        logger.warning("the parameters of %s have no settings line (Steps: ..., Sampler: ..., Seed: ...): its text "
                       "is the prompt, drawn with the default settings", args.from_png)
    if getattr(args, "mode", None) == "txt2img" and _drawn_from_a_picture(parsed):
        logger.warning("%s was drawn from a picture (img2img or inpaint: its %s): txt2img draws another picture; "
                       "redraw it with 'sdlab img2img --from-png %s --init PICTURE' ('sdlab inpaint' with --mask "
                       "for an inpainting)", args.from_png, _drawn_from_a_picture(parsed), args.from_png)
    return parsed


def _drawn_from_a_picture(parsed: dict[str, Any]) -> str | None:
    """The label that shows a picture's parameters are an img2img's or an inpainting's (sdlab's `Img2img steps`;
    A1111's `Denoising strength` without a hires fix's labels), None for a txt2img's."""
    if "Img2img steps" in parsed:
        return "'Img2img steps' label"
    hires = ("Hires upscale", "Hires upscaler", "Hires resize", "Hires resize-1", "First pass size")
    if "Denoising strength" in parsed and not any(label in parsed for label in hires):
        return "'Denoising strength' without a hires fix"
    return None


# GenerationRequest fields whose flag has the same name (a flag a subcommand lacks reads None: not given)
_FIELDS_NAMED_AS_FLAGS = (
    "prompt_2", "negative_prompt_2",
    "subseed", "subseed_strength", "tiling", "strength", "resize_mode", "mask_blur", "invert_mask", "mask_round", "mask_grow",
    "token_merging_ratio", "token_merging_ratio_hr",
    "guidance_rescale", "s_min_uncond", "s_min_uncond_all", "skip_early_cond", "pad_cond_uncond", "pad_cond_uncond_v0",
    "pag_scale", "pag_adaptive_scale", "pag_layers",
    "emphasis", "old_prompt_editing", "downcast_alphas_cumprod", "zero_terminal_snr",
    "s_churn", "s_tmin", "s_tmax", "s_noise", "schedule_sigma_min", "schedule_sigma_max", "schedule_rho",
    "discard_penultimate_sigma", "init_noise", "batch_noise", "quantize_timesteps", "unipc_variant", "unipc_order",
    "unipc_lower_order_final",
    "beta_alpha", "beta_beta", "sgm_noise_multiplier", "extra_noise", "inpainting_mask_weight", "image_cfg_scale",
)


def _drop_second_prompts_of_another(options: dict[str, Any], given: dict[str, Any]) -> None:
    """Leave a --from-png picture's Prompt 2 (Negative prompt 2) out where the line gives another prompt (negative
    prompt), as the web UI drops it when the prompt is edited: SDXL's second encoder then reads the new text (or
    --prompt-2), not the old picture's second prompt under it."""
    for text, second in (("prompt", "prompt_2"), ("negative_prompt", "negative_prompt_2")):
        if given[text] is not None and given[text] != options.get(text):
            options.pop(second, None)


def _options_from_args(args: argparse.Namespace, recorded: dict[str, Any] | None = None,
                       with_preset: bool = True) -> dict[str, Any]:
    """GenerationRequest keyword arguments: the PNG's parameters, then --preset's settings (its name checked;
    left out without `with_preset`: `sdlab grid` puts them under each cell's), then every option given on the line."""
    from sdlab.pipeline.infotext import from_parameters

    options: dict[str, Any] = {}
    recorded = _recorded_parameters(args) if recorded is None else recorded
    if recorded:
        try:
            options.update(from_parameters(recorded))
        except ValueError as err:
            raise UserError(str(err)) from None
    picture_two_pass = _is_comfyui_img2img_two_pass(options)      # the picture's, before --strength and the rest
    if getattr(args, "threads", None) is not None and not 1 <= args.threads <= 1024:
        raise UserError(f"--threads must be 1 to 1024, got {args.threads}")
    from sdlab.pipeline.request import MAX_BATCH_COUNT

    if not 1 <= getattr(args, "batch_count", 1) <= MAX_BATCH_COUNT:
        raise UserError(f"--batch-count must be 1 to {MAX_BATCH_COUNT}, got {args.batch_count}")
    for flag, value in (("--width", args.width), ("--height", args.height)):
        if value is not None and value <= 0:
            raise UserError(f"{flag} must be a positive number of pixels (a multiple of 8), got {value}")
    padding = getattr(args, "only_masked_padding", None)
    if padding is not None and padding < 0:
        raise UserError(f"--only-masked-padding must be 0 or more pixels, got {padding}")
    if getattr(args, "preset", None):                # over --from-png's values, under the options given here
        from sdlab.pipeline.presets import get_preset
        from sdlab.pipeline.request import RequestError

        try:
            preset = get_preset(args.preset)
        except RequestError as err:
            raise UserError(str(err)) from None
        if with_preset:
            options.update(preset.options(getattr(args, "mode", "txt2img"), args.sampler))
    masked_content = getattr(args, "masked_content", None)           # the flag's spelling: "latent-noise"
    given = {
        "prompt": args.prompt,
        "negative_prompt": args.negative,
        "sampler": args.sampler,
        "schedule": args.schedule,
        "steps": args.steps,
        "cfg_scale": args.cfg,
        "seed": args.seed,
        "rng": args.rng and args.rng.upper(),
        **_seed_resize_options(args.seed_resize_from),
        "width": args.width,
        "height": args.height,
        "batch_size": args.batch,
        "clip_skip": args.clip_skip,
        "eta": args.eta,
        "eta_noise_seed_delta": getattr(args, "ensd", None),
        "inpaint_fill": masked_content and masked_content.replace("-", " "),
        "inpaint_only_masked": getattr(args, "only_masked", None),
        "inpaint_padding": padding,
        **{name: getattr(args, name, None) for name in _FIELDS_NAMED_AS_FLAGS},
    }
    _drop_second_prompts_of_another(options, given)
    options.update({k: v for k, v in given.items() if v is not None})
    if isinstance(options.get("image_cfg_scale"), str):         # --image-cfg-scale none: no image guidance
        options["image_cfg_scale"] = None
    if given["mask_blur"] is not None:               # --mask-blur blurs both ways: not a --from-png picture's y
        options.pop("mask_blur_y", None)
    if given["eta"] is not None:                     # --eta draws both passes (--hr-eta the second)
        options.pop("hr_eta", None)
    if options.get("prompt") is None:
        raise UserError("a prompt is needed (or --from-png FILE)")
    if args.mode == "txt2img":
        options.pop("strength", None)
    _hires_options(args, options, picture_two_pass)
    _freeu_options(args, options)
    _deep_cache_options(args, options)
    return options


def _add_freeu_flags(p: argparse.ArgumentParser, from_png: bool) -> None:
    p.add_argument("--freeu", metavar="B1,B2,S1,S2",
                   help="FreeU (Si et al. 2023): the U-Net decoder's backbone features of its two deepest stages times "
                        "B1 / B2, their skip features' lowest frequencies times S1 / S2 (ComfyUI's FreeU_V2 node: "
                        "1.3,1.4,0.9,0.2, also FreeU's README for SD1.4 and SDXL; its README's SD1.5 1.5,1.6,0.9,0.2, "
                        "SD2.1 1.4,1.6,0.9,0.2; Forge's sliders 1.01,1.02,0.99,0.95); the base model only, not a "
                        "refiner; recorded with Forge's freeu_* labels"
                        + _if_from_png(from_png, "; over a --from-png picture's"))
    p.add_argument("--freeu-version", type=int, choices=(1, 2),
                   help="FreeU's version: 2 (the default; ComfyUI's FreeU_V2, Forge's FreeU Integrated) scales the "
                        "backbone by each position's normalised channel mean, 1 (the paper's, diffusers' enable_freeu, "
                        "ComfyUI's FreeU) by the constant factor")
    p.add_argument("--freeu-convention", choices=("comfyui", "diffusers", "sd-webui-freeu"),
                   help="which decoder blocks are FreeU's stages 1 and 2: comfyui (the default; the original code's, "
                        "ComfyUI's and Forge's: by channel count) or diffusers (enable_freeu's: by up block); they "
                        "differ on SD1 and SDXL (README); sd-webui-freeu (A1111's FreeU extension): comfyui's "
                        "stages, the backbone factor on one channel more than half")
    p.add_argument("--freeu-start", type=float, metavar="FRACTION",
                   help="the fraction of the sampler steps where FreeU starts (Forge's Start step; default 0): it acts "
                        "on each pass's steps whose fraction lies in [start, end], counted as Forge counts them "
                        "(README)")
    p.add_argument("--freeu-end", type=float, metavar="FRACTION",
                   help="the fraction of the sampler steps after which FreeU stops (Forge's End step; default 1)")
    if from_png:
        p.add_argument("--no-freeu", action="store_true", help="draw without a --from-png picture's FreeU")


def _freeu_options(args: argparse.Namespace, options: dict[str, Any]) -> None:
    """The request's `freeu` from --freeu B1,B2,S1,S2, --freeu-version, --freeu-convention, --freeu-start and
    --freeu-end, over a --from-png picture's (`options["freeu"]`), or none with --no-freeu. A version, convention
    or window without a FreeU to set, or factors that are not four numbers, is a UserError."""
    from sdlab.pipeline.request import FREEU_FACTORS, FREEU_WINDOW
    text = getattr(args, "freeu", None)
    others = {name: getattr(args, f"freeu_{name}", None) for name in ("version", "convention", *FREEU_WINDOW)}
    if getattr(args, "no_freeu", False):
        if text is not None:
            raise UserError("--freeu and --no-freeu contradict each other")
        options.pop("freeu", None)
        return
    setting = dict(options.get("freeu") or {})
    if text is not None:
        try:
            factors = [float(part) for part in text.split(",")]
        except ValueError:
            factors = []
        if len(factors) != 4:
            raise UserError(f"--freeu takes four numbers B1,B2,S1,S2 (e.g. 1.3,1.4,0.9,0.2), got {text!r}")
        setting.update(zip(FREEU_FACTORS, factors))
    given = {name: value for name, value in others.items() if value is not None}
    if not setting:
        if given:
            raise UserError(f"{', '.join('--freeu-' + name for name in given)} set FreeU's --freeu B1,B2,S1,S2, "
                            "which is not given")
        return
    setting.update(given)
    options["freeu"] = setting


def _add_deep_cache_flags(p: argparse.ArgumentParser, from_png: bool) -> None:
    p.add_argument("--deepcache-interval", type=int, metavar="N",
                   help="DeepCache (Ma et al. 2023): the whole U-Net runs every N-th sampler step of each pass (the "
                        "first included), the steps between rerun only its shallow branch on the deep features the "
                        "last whole step left; 3 is diffusers' DeepCache example (speed and picture change: "
                        "docs/performance.md), 1 runs every step whole; the base model only, not a refiner"
                        + _if_from_png(from_png, "; over a --from-png picture's"))
    p.add_argument("--deepcache-branch", type=int, metavar="B",
                   help="DeepCache's cache_branch_id: the skip the shallow branch reaches, 0 (the default, cheapest: "
                        "the first convolution and the last decoder block) up to 11 (SD1 / SD2) or 8 (SDXL); "
                        "deeper is slower and closer to the plain picture; alone it turns DeepCache on at interval 3")
    if from_png:
        p.add_argument("--no-deepcache", action="store_true", help="draw without a --from-png picture's DeepCache")


def _deep_cache_options(args: argparse.Namespace, options: dict[str, Any]) -> None:
    """The request's `deep_cache` from --deepcache-interval and --deepcache-branch, over a --from-png picture's
    (`options["deep_cache"]`), or none with --no-deepcache. A branch alone turns DeepCache on at `DeepCache`'s
    interval 3, as the native API's `deep_cache` object with a branch only does."""
    interval, branch = getattr(args, "deepcache_interval", None), getattr(args, "deepcache_branch", None)
    if getattr(args, "no_deepcache", False):
        if interval is not None or branch is not None:
            raise UserError("--deepcache-interval / --deepcache-branch and --no-deepcache contradict each other")
        options.pop("deep_cache", None)
        return
    setting = dict(options.get("deep_cache") or {})
    if interval is None and branch is None and not setting:
        return
    setting.update({name: value for name, value in (("interval", interval), ("branch", branch)) if value is not None})
    options["deep_cache"] = setting


def _seed_resize_options(value: str | None) -> dict[str, int]:
    """--seed-resize-from WxH as the request's seed_resize_from_w / _h ({} when not given)."""
    if value is None:
        return {}
    try:
        width, height = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise UserError(f"--seed-resize-from wants WIDTHxHEIGHT (e.g. 512x768, 0x0 for off), got {value!r}") from None
    return {"seed_resize_from_w": width, "seed_resize_from_h": height}


def _open_image(path: str, what: str):
    from sdlab.pipeline.request import RequestError, input_image

    try:
        return input_image(path, what)
    except RequestError as err:
        raise UserError(str(err)) from None


def _parse_outpaint(text: str) -> tuple[int, int, int, int]:
    parts = text.split(",")
    try:
        values = tuple(int(v) for v in parts)
    except ValueError:
        values = ()
    if len(values) != 4 or min(values) < 0 or max(values) == 0:
        raise UserError(f"--outpaint wants four pixel counts LEFT,RIGHT,TOP,BOTTOM (>= 0, not all 0), got {text!r}")
    return values  # type: ignore[return-value]


def _fit_outpaint(pads: tuple[int, int, int, int], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Pads LEFT,RIGHT,TOP,BOTTOM trimmed (right / bottom first) so that the canvas is a multiple of 8 pixels
    (the VAE's grid): a canvas off the grid would be resized to it, squashing the original picture that
    inpainting keeps. A picture itself off the grid is resized as any init image is."""
    left, right, top, bottom = pads
    fitted = []
    for side, first, second in ((size[0], right, left), (size[1], bottom, top)):
        excess = (side + first + second) % 8
        cut = min(excess, first)
        first, second = first - cut, second - min(excess - cut, second)
        fitted.append((second, first))
    (left, right), (top, bottom) = fitted
    if (left, right, top, bottom) != pads:
        logger.warning("--outpaint %s: trimmed to %d,%d,%d,%d so that the canvas is a multiple of 8 pixels",
                       ",".join(map(str, pads)), left, right, top, bottom)
    if max(left, right, top, bottom) == 0:
        raise UserError(f"--outpaint {','.join(map(str, pads))} adds less than the 8-pixel grid; pad by 8 or more")
    return left, right, top, bottom


def _output_target(out: str) -> tuple[Path, str | None]:
    """(folder, image format) for `--out`: a file name with a known extension, else a folder (format None)."""
    from sdlab.pipeline.png_info import IMAGE_SUFFIXES, image_format

    target = Path(out)
    if out.endswith(("/", os.sep)) or os.path.isdir(out) or not target.suffix:    # isdir: False on any OSError
        return target, None
    fmt = image_format(target)
    if fmt is None:
        raise UserError(f"--out {out!r}: sdlab writes {', '.join(IMAGE_SUFFIXES)} files; name one of these, "
                        "or a folder (without an extension, or ending in '/')")
    return (target.parent if str(target.parent) else Path(".")), fmt


def _slug(prompt: str) -> str:
    """The prompt in a file name: its letters and digits in any script (A1111 keeps a prompt's non-ASCII words
    too), every run of anything else one '-', at most 48 characters."""
    return re.sub(r"[\W_]+", "-", prompt.lower()).strip("-")[:48].rstrip("-") or "image"


def _next_number(folder: Path) -> int:
    """A1111's counter: one more than the largest number that starts a file name in `folder` (0 if none)."""
    numbers = [int(m.group(1)) for entry in os.scandir(folder) if (m := re.match(r"(\d+)-", entry.name))]
    return max(numbers, default=-1) + 1


def _folder_paths(folder: Path, prompt: str, seeds: list[int], grid: bool = False) -> list[Path]:
    """00012-SEED-PROMPT.png for each seed, then with `grid` 00015-grid-PROMPT.png."""
    start = _next_number(folder)
    grids = [folder / f"{start + len(seeds):05d}-grid-{_slug(prompt)}.png"] if grid else []
    return [folder / f"{start + i:05d}-{seed}-{_slug(prompt)}.png" for i, seed in enumerate(seeds)] + grids


def _file_paths(target: Path, count: int, grid: bool = False) -> list[Path]:
    """`target` for one picture, else NAME-0, NAME-1, ...; then with `grid` NAME-grid."""
    paths = [target] if count == 1 else [target.with_name(f"{target.stem}-{i}{target.suffix}") for i in range(count)]
    return paths + ([target.with_name(f"{target.stem}-grid{target.suffix}")] if grid else [])


def _output_paths(out: str, target: tuple[Path, str | None], prompt: str, seeds: list[int],
                  grid: bool = False) -> list[Path]:
    """Where each image goes (`target`: `_output_target(out)`), and with `grid` a grid of them after; checks the
    folder is writable and the names fit before any work is done."""
    folder, fmt = target
    make_output_folder(folder)
    paths = _file_paths(Path(out), len(seeds), grid) if fmt else _folder_paths(folder, prompt, seeds, grid)
    try:
        name_max = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        name_max = 255
    for path in paths:
        if len(os.fsencode(path.name)) > name_max:
            raise UserError(f"the output file name {path.name[:40]!r}... is {len(os.fsencode(path.name))} bytes "
                            f"long; this file system allows {name_max}")
    return paths


def _save_images(in_folder: bool, paths: list[Path], images: list, texts: list[str | None], prompt: str,
                 seeds: list[int], grid: bool = False) -> list[Path]:
    """Write the batch (`_output_paths`' pictures; a text None: no parameters) all or nothing; in a folder,
    renumber and retry when another run took the numbers."""
    from sdlab.pipeline.png_info import ParametersError, encode_image, image_format, write_files_all_or_nothing

    try:
        blobs = [encode_image(image, image_format(path) or "PNG", text) for image, path, text in zip(images, paths, texts)]
    except ParametersError as err:
        raise UserError(str(err)) from None
    for _ in range(100):
        try:
            write_files_all_or_nothing(list(zip(paths, blobs)), overwrite=not in_folder)
            return paths
        except FileExistsError:
            if not in_folder:
                raise
            paths = _folder_paths(paths[0].parent, prompt, seeds, grid)
        except OSError as err:
            detail = f" ({len(blobs)} image(s), {sum(map(len, blobs))} bytes)"
            named = next((path for path in paths if str(path) in (err.filename, err.filename2)), paths[0].parent)
            raise write_error(err, named, detail) from None
    raise UserError(f"cannot find free file names in {paths[0].parent}")


DEFAULT_REFINER_SWITCH = 0.8


def _refiner_handoff(args: argparse.Namespace, recorded: dict[str, Any]) -> tuple[float, str]:
    """Where the refiner takes over (`plan.handoff_index`): --refiner-switch, else the --from-png picture's
    `Refiner switch at`, else 0.8; by the rule the picture was drawn with (A1111's for a picture A1111 drew,
    `infotext.refiner_handoff`), else diffusers'."""
    from sdlab.pipeline.infotext import refiner_handoff
    from sdlab.pipeline.plan import check_refiner_convention
    from sdlab.pipeline.request import RequestError, check_refiner_switch

    try:
        recorded_switch, convention = refiner_handoff(recorded) if recorded else (None, "diffusers")
        if args.refiner_switch is not None:
            switch = check_refiner_switch(args.refiner_switch, "--refiner-switch")
        else:
            switch = check_refiner_switch(DEFAULT_REFINER_SWITCH if recorded_switch is None else recorded_switch,
                                          "the PNG's Refiner switch at")
        return switch, check_refiner_convention(convention)
    except (RequestError, ValueError) as err:
        raise UserError(str(err)) from None


def _load_pipeline(args: argparse.Namespace, model: str | os.PathLike | None = None,
                   loras: list[tuple[str, float]] | None = None, finder: Callable[[str], Path | None] | None = None,
                   recorded: dict[str, Any] | None = None):
    """The pipeline of `model` (else --model, else the shipped one) with the `loras` merged (else --lora's),
    finding its prompts' LoRA tags with `finder` (the run's `_lora_finder`, else a new one), and the model."""
    from sdlab.api import RequestError, load, shipped_model_path

    dtype = requested_dtype(args.dtype)
    model = model or args.model or shipped_model_path()
    if model is None:
        raise UserError("no --model given and this sdlab install has no built-in model; pass --model PATH")
    finder = finder or _lora_finder(args)
    if loras is None:
        loras = [_parse_lora(spec, finder) for spec in args.lora]
    refiner_switch, refiner_convention = _refiner_handoff(args, recorded or {})
    try:
        pipe = load(model, device=args.device, dtype=dtype, vae=args.vae, sidecar_vae=args.sidecar_vae,
                    family=args.family,
                    prediction=args.prediction, refiner=args.refiner, refiner_switch=refiner_switch,
                    refiner_convention=refiner_convention, loras=loras,
                    find_lora=finder,                   # prompt tags: as `_resolve_loras` found them, once
                    embeddings=getattr(args, "embeddings_dir", []), compile=getattr(args, "compile", False))
    except RequestError as err:     # e.g. a --device this torch cannot use
        raise UserError(str(err)) from None
    use_threads_for(pipe.bundle.unet, pipe.bundle.device, getattr(args, "threads", None))
    return pipe, model


def _with_model_preset(options: dict[str, Any], preset: str, mode: str) -> dict[str, Any]:
    """The request options over the settings of the preset the model file names (or of --preset, checked by
    `_options_from_args`, under `sdlab grid`'s cells)."""
    from sdlab.pipeline.presets import apply_preset
    from sdlab.pipeline.request import RequestError

    try:
        return apply_preset(preset, options, mode)
    except RequestError as err:
        raise UserError(f"the model names the preset {preset!r}: {err}") from None


def _parse_lora(spec: str, find: Callable[[str], Path | None] | None = None) -> tuple[str, float]:
    """``FILE[:WEIGHT]`` or ``NAME[:WEIGHT]`` -> (file, weight). The text after the last colon is the weight
    unless the whole spec is an existing file or that text is a path or file name ("C:\\x.safetensors",
    "C:x.safetensors"). A NAME that is no file is looked up with ``find`` (`_lora_finder`: the LoRA folders,
    as a prompt's ``<lora:NAME:WEIGHT>`` tag is)."""
    path, colon, weight = spec.rpartition(":")
    if not colon or not path or os.path.isfile(spec) or re.search(r"[/\\]|\.[A-Za-z]\w*$", weight):
        path, weight = spec, "1"
    message = f"--lora {spec!r}: the weight {weight!r} is not a finite number (FILE:WEIGHT, e.g. style.safetensors:0.8)"
    value = finite_float(weight, UserError, message, message)
    if not os.path.isfile(path):
        found = find(path) if find is not None and not re.search(r"[/\\]", path) else None
        if found is None:
            raise UserError(f"the LoRA file {path!r} does not exist (nor a LoRA of that name in the LoRA folders)")
        path = str(found)
    return path, value


def _control_paths(parts: list[str]) -> tuple[str, str | None]:
    """(file, image) of a --control spec's `parts` (split at colons, its numbers taken off): split where both
    sides exist, else the whole an existing file without an image (``FILE``), else an empty image part
    (``FILE:`` or ``FILE::STRENGTH``) none, else at the first colon."""
    splits = [(":".join(parts[:i]), ":".join(parts[i:])) for i in range(1, len(parts))]
    found = next((s for s in splits if os.path.exists(s[0]) and os.path.exists(s[1])), None)
    if found is not None:
        return found
    if len(parts) == 1 or os.path.exists(":".join(parts)):
        return ":".join(parts), None
    if parts[-1] == "":
        return ":".join(parts).rstrip(":"), None
    return splits[0]


def _control_fields(spec: str) -> list[str]:
    """A --control spec split at its colons, a Windows drive's colon (a single letter, then ':' and '/' or '\\',
    at the start of FILE or IMAGE: ``C:/nets/canny.pth``) kept in its path."""
    fields: list[str] = []
    for part in spec.split(":"):
        if fields and re.fullmatch(r"[A-Za-z]", fields[-1]) and part[:1] in ("/", "\\"):
            fields[-1] += ":" + part
        else:
            fields.append(part)
    return fields


def _parse_control(spec: str, convention: str, takes_init: bool = True, **settings: Any):
    """``FILE[:IMAGE[:STRENGTH[:START:END]]]`` -> a `ControlInput` checked under the request's control
    `convention`, with the image (and a `mask`) read and `settings` (`ControlInput`'s fields: module, modes,
    thresholds, and strength / start / end where the spec leaves them out). Numbers are taken from the end, so
    the file and image paths may contain colons (`_control_paths`; a drive's, `_control_fields`). Without an image
    (``FILE``, ``FILE::STRENGTH[:START:END]``) the control is drawn on the init picture (`control.drawn_on_init`);
    `takes_init` False (txt2img: no init picture), a number where the image goes says that a picture is needed."""
    from sdlab.pipeline.control import ControlInput, check_control
    from sdlab.pipeline.request import RequestError

    parts, numbers = _control_fields(spec), []
    while len(parts) > 2 and len(numbers) < 3 and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", parts[-1]):
        numbers.insert(0, float(parts.pop()))
    if not parts[0] or len(numbers) == 2:
        raise UserError(f"--control {spec!r}: expected {CONTROL_SYNTAX}")
    file, image = _control_paths(parts)
    if not os.path.exists(file):
        raise UserError(f"the ControlNet {file!r} does not exist")
    if image is not None and not os.path.exists(image) and re.fullmatch(r"[-+.\deE]+", image):
        instead = (f"to leave the image out (the init picture) write FILE::{image}" if takes_init else
                   f"txt2img has no init picture, so the control needs one: FILE:IMAGE:{image}")
        raise UserError(f"--control {spec!r}: the image {image!r} does not exist; {instead}")
    if settings.get("mask") is not None:
        settings["mask"] = _open_image(settings["mask"], "control mask")
    try:
        control = ControlInput(file, None if image is None else _open_image(image, "control image"),
                               **{**settings, **dict(zip(("strength", "start", "end"), numbers))})
        return check_control(control, convention=convention)
    except RequestError as err:
        raise UserError(f"--control {spec!r}: {err}") from None


def _ip_adapter_scale(text: str) -> float | str:
    """An --ip-adapter-scale: a number, else per-layer scales (a preset, JSON or the compact text), checked."""
    from sdlab.pipeline.image_prompt import MAX_SCALE
    from sdlab.pipeline.ip_adapter_layers import LayerScaleError, check_layer_scales

    try:
        return float(text)
    except ValueError:
        pass
    try:
        check_layer_scales(text, MAX_SCALE)
    except LayerScaleError as err:
        raise argparse.ArgumentTypeError(f"not a number, and {err}") from None
    return text.strip()


def _face_shortcut(text: str) -> float | None:
    """An --ip-adapter-face-shortcut: a number, or none / empty (None: the default, `image_prompt.face_shortcut`)."""
    if text.strip().lower() in ("", "none"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or none") from None


def _no_face(value: str | None) -> str | None:
    """An --ip-adapter-face-embedding's or --ip-adapter-image's value: None for none / empty (an adapter that reads
    no face embedding; one that draws on the init picture)."""
    return None if value is None or value.strip().lower() in ("", "none") else value


def _ip_adapters(args: argparse.Namespace, recorded: dict[str, Any], convention: str = "diffusers") -> tuple:
    """The --ip-adapter `IPAdapterInput`s, each with the --ip-adapter-image / -scale / -encoder / -start / -end of
    its place, checked (the window by the request's `convention`: a --from-png picture's Control steps). A scale not given is the Weight
    (and Layers) the --from-png picture records for the adapter of its place (its `IP-Adapter N` lines, then the
    IP-Adapter units of the ControlNet extension and Forge: `recorded_ip_adapters`), else 1, a start / end not given
    its Guidance Start / End, else 0 / 1, a FaceID Plus shortcut its Face shortcut, an encoder not given the one an IP-Adapter unit's Module names
    (`unit_image_encoder`; the redraw records the unit's line again); per-layer scales given (`_ip_adapter_scale`) draw at scale 1. Those past
    the adapters given are named in a warning (the picture is not recorded: each needs its image again). An adapter
    without an --ip-adapter-image (none, empty, or past those given) draws on the --init picture
    (`image_prompt.prompts_on_init`); in txt2img it is refused (`image_prompt.prompt_on_init`)."""
    from sdlab.pipeline.image_prompt import (IPAdapterInput, check_ip_adapter, prompt_on_init,
                                             recorded_face_shortcut, recorded_ip_adapters, recorded_layer_scales,
                                             recorded_resize_mode, recorded_weight, recorded_window,
                                             takes_face_shortcut)
    from sdlab.pipeline.ip_adapter_units import unit_image_encoder
    from sdlab.pipeline.request import RequestError

    count = len(args.ip_adapter)
    for flag, values in (("--ip-adapter-image", args.ip_adapter_image), ("--ip-adapter-scale", args.ip_adapter_scale),
                         ("--ip-adapter-face-embedding", args.ip_adapter_face_embedding),
                         ("--ip-adapter-face-shortcut", args.ip_adapter_face_shortcut),
                         ("--ip-adapter-encoder", args.ip_adapter_encoder), ("--ip-adapter-start", args.ip_adapter_start),
                         ("--ip-adapter-end", args.ip_adapter_end)):
        if len(values) > count:
            raise UserError(f"{len(values)} {flag} for {count} --ip-adapter")
    lines = recorded_ip_adapters(recorded)
    if lines[count:]:
        logger.warning("the picture was drawn with %s; pass --ip-adapter and --ip-adapter-image for each to "
                       "redraw it", ", ".join(f"{label} ({line})" for label, line in lines[count:]))
    prompts = []
    images = [_no_face(image) for image in args.ip_adapter_image] + [None] * (count - len(args.ip_adapter_image))
    for index, (file, image) in enumerate(zip(args.ip_adapter, images)):
        scale = args.ip_adapter_scale[index] if index < len(args.ip_adapter_scale) else None
        layers = None
        if isinstance(scale, str):
            scale, layers = 1.0, scale
        elif scale is None and index < len(lines):
            label, line = lines[index]
            try:
                scale, layers = recorded_weight(line), recorded_layer_scales(line)
            except ValueError as err:
                raise UserError(f"{label}: {err}; pass --ip-adapter-scale") from None
        encoder = args.ip_adapter_encoder[index] if index < len(args.ip_adapter_encoder) else None
        module = _recorded_ip_module(lines[index]) if index < len(lines) else None
        if module is not None and encoder is None:
            try:
                encoder = unit_image_encoder(module, file)
            except RequestError as err:
                raise UserError(f"--ip-adapter {file!r} ({lines[index][0]}): {err}; pass --ip-adapter-encoder") from None
        window, shortcut, resize = {"start": 0.0, "end": 1.0}, None, None
        if index < len(lines):
            try:
                window.update(recorded_window(lines[index][1]))
            except ValueError as err:
                raise UserError(f"{lines[index][0]}: {err}; pass --ip-adapter-start / --ip-adapter-end") from None
            try:
                shortcut = recorded_face_shortcut(lines[index][1])          # a FaceID Plus drawn from Python
                resize = recorded_resize_mode(lines[index][1])              # how "Only masked" fits its picture
            except ValueError as err:
                raise UserError(f"{lines[index][0]}: {err}") from None
        for key, given in (("start", args.ip_adapter_start), ("end", args.ip_adapter_end)):
            if index < len(given):
                window[key] = given[index]
        given_shortcut = args.ip_adapter_face_shortcut[index] if index < len(args.ip_adapter_face_shortcut) else None
        if given_shortcut is not None:
            shortcut = given_shortcut
        elif shortcut is not None:
            try:
                applies = takes_face_shortcut(file)
            except RequestError as err:
                raise UserError(f"--ip-adapter {file!r}: {err}") from None
            if not applies:         # recorded for a FaceID Plus; this place's adapter is another kind
                logger.warning("%s records Face shortcut: %g, which only a FaceID Plus adapter takes; %s is not "
                               "one, so it is left out", lines[index][0], shortcut, file)
                shortcut = None
        face = _no_face(args.ip_adapter_face_embedding[index] if index < len(args.ip_adapter_face_embedding) else None)
        picture = image if image is None or image.lower().endswith(".npy") \
            else _open_image(image, "IP-Adapter image")                   # a FaceID's face embedding as its file
        prompt = IPAdapterInput(file, picture, 1.0 if scale is None else scale, encoder, layer_scales=layers,
                                module=module, face_embedding=face, face_shortcut=shortcut, resize_mode=resize,
                                **window)
        try:
            if getattr(args, "mode", None) == "txt2img":        # no init picture: refused before the model loads
                prompt_on_init(prompt, index, None)
            prompts.append(check_ip_adapter(prompt, index, convention))
        except RequestError as err:
            raise UserError(f"--ip-adapter {file!r}: {err}") from None
    return tuple(prompts)


def _recorded_ip_module(labelled: tuple[str, str]) -> str | None:
    """The Module of a --from-png picture's IP-Adapter unit line (None: an `IP-Adapter N` line): the redraw takes
    the image encoder it names, as the unit did, and records the unit's line again; one sdlab does not draw is a
    UserError naming it."""
    from sdlab.pipeline.image_prompt import check_recorded_module

    label, line = labelled
    try:
        return check_recorded_module(line)
    except ValueError as err:
        raise UserError(f"{label}: {err}") from None


def _per_control(values: list[Any], flag: str, count: int) -> list[Any]:
    """A per-control option's values (`--control-module`, ...), one for each of the `count` --control in
    order: the first for the first, ...; None for the controls past the last given."""
    if len(values) > count:
        raise UserError(f"{len(values)} {flag} for {count} --control")
    return [*values, *[None] * (count - len(values))]


def _control_units(recorded: dict[str, Any]) -> list[str]:
    """The --from-png picture's `ControlNet N` labels of ControlNet / T2I-Adapter units, in N's order: the N-th
    --control redraws the N-th of them. The extension's IP-Adapter units are --ip-adapter's
    (`image_prompt.is_ip_adapter_unit`)."""
    from sdlab.pipeline.image_prompt import is_ip_adapter_unit

    labels = [key for key in recorded if key.startswith("ControlNet ") and key[len("ControlNet "):].isdigit()]
    return [key for key in sorted(labels, key=lambda key: int(key[len("ControlNet "):]))
            if not is_ip_adapter_unit(recorded[key])]


def _recorded_unit(recorded: dict[str, Any], index: int, source: str | None) -> dict[str, Any]:
    """The settings the --from-png picture's `index`-th ControlNet unit records ({} without it)."""
    from sdlab.pipeline.control import recorded_unit

    units = _control_units(recorded)
    if index >= len(units):
        return {}
    line = units[index]
    try:
        return recorded_unit(recorded[line])
    except ValueError as err:
        raise UserError(f"{source}: {line}: {err}; pass the --control-* option that sets it") from None


_CONTROL_OPTIONS = (("module", "control_module"), ("control_mode", "control_mode"),
                    ("resize_mode", "control_resize"), ("threshold_a", "control_threshold_a"),
                    ("threshold_b", "control_threshold_b"), ("mask", "control_mask"),
                    ("processor_res", "control_processor_res"), ("pixel_perfect", "control_pixel_perfect"))
"""The per-control options: `ControlInput`'s field, the argparse attribute (--control-module, ...)."""


def _given_setting(key: str, value: Any) -> Any:
    """A per-control option's value as `ControlInput` takes it: None (the default, also over a --from-png
    picture's) for a threshold or processor resolution below 0 (A1111's -1) and for the mask `none`;
    pixel_perfect's true / false as a bool."""
    if key == "pixel_perfect":
        return value == "true"
    if (key.startswith("threshold") or key == "processor_res") and value < 0:
        return None
    return None if key == "mask" and value.lower() == "none" else value


def _controls(args: argparse.Namespace, recorded: dict[str, Any], convention: str) -> tuple:
    """The --control `ControlInput`s with their per-control options, checked under the request's control
    `convention`. A setting a control is not given (on its spec or by an option) takes the one the --from-png
    picture's `ControlNet N` line records for it (`recorded_unit`: module, weight, guidance start / end,
    thresholds, processor resolution, Pixel Perfect, modes; `_kept_settings`), as A1111's paste sets its N-th unit.
    In txt2img a control without an image is refused (`control.drawn_on_init`)."""
    from sdlab.pipeline.control import drawn_on_init
    from sdlab.pipeline.request import RequestError

    count = len(args.control)
    columns = [_per_control(getattr(args, attr), "--" + attr.replace("_", "-"), count) for _, attr in _CONTROL_OPTIONS]
    controls = []
    for index, spec in enumerate(args.control):
        given = {key: _given_setting(key, column[index]) for (key, _), column in zip(_CONTROL_OPTIONS, columns)
                 if column[index] is not None}
        settings = {**_kept_settings(_recorded_unit(recorded, index, args.from_png), given), **given}
        controls.append(_parse_control(spec, convention, getattr(args, "mode", None) != "txt2img", **settings))
    if getattr(args, "mode", None) == "txt2img":    # no init picture: a control without an image refused before the
        for index, (spec, control) in enumerate(zip(args.control, controls)):      # model loads
            try:
                drawn_on_init(control, index, None, "resize")
            except RequestError as err:
                raise UserError(f"--control {spec!r}: {err}") from None
    return tuple(controls)


def _kept_settings(unit: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """The recorded `unit`'s settings a control keeps: all, but its thresholds and Processor Res only while the
    control runs the recorded module; another module's start at their defaults (its thresholds unset, a
    recorded Processor Res the slider's 512), as A1111's UI `build_sliders` resets the sliders when the
    module changes (canny's 100 is no tile_resample rate)."""
    from sdlab.pipeline.preprocess import RESOLUTION_SLIDER

    if given.get("module", unit.get("module")) == unit.get("module", "none"):
        return unit
    kept = {key: value for key, value in unit.items() if not key.startswith("threshold")}
    return {**kept, "processor_res": RESOLUTION_SLIDER["value"]} if "processor_res" in unit else kept


_LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")


def _lora_search_dirs(args: argparse.Namespace) -> tuple[list[Path], list[Path], list[Path]]:
    """The folders prompt tags are looked up in, in this order: (folders searched with their subfolders:
    --lora-dir, then A1111's models/Lora beside the model; folders searched for the file alone: the --from-png
    file's folder and the current one; folders searched with their subfolders last: each --models-dir's Lora /
    loras folder (A1111's and ComfyUI's models folder, where the --from-png picture's model is found; `sdlab
    serve --models-dir` reads its LoRAs there too)). The --models-dir folders come after the ones searched
    without --models-dir, as the picture's model and an upscaler are looked up, so adding it never changes a
    file found without it; among them the first --models-dir given that holds a name wins
    (`models_dirs.first_in_models_dirs`)."""
    from sdlab.api import shipped_model_path
    from sdlab.pipeline.prompt_loras import LORA_FOLDER_NAMES, default_lora_dirs

    from_png = getattr(args, "from_png", None)
    flat = [Path(from_png).resolve().parent] if from_png else []
    model = getattr(args, "model", None) or shipped_model_path()     # the shipped model's: its own adapters
    models_dirs = [Path(d) / name for d in getattr(args, "models_dir", []) for name in LORA_FOLDER_NAMES]
    deep = [Path(d) for d in getattr(args, "lora_dir", [])] + default_lora_dirs(model)
    return deep, [*flat, Path(".")], [d for d in models_dirs if d.is_dir() and d not in deep]


def _lora_finder(args: argparse.Namespace, recorded_hashes: dict[str, str] | None = None):
    """NAME -> its file: by name in the search folders, else (for --from-png) the file under the folders
    searched with subfolders whose LoRA hash is the one recorded for NAME (A1111 finds renamed files so).
    A run makes one finder: it looks its LoRAs up more than once (the prompt, the preset, the request, the
    draw), and the finder searches each NAME by hash, and says what it found, once."""
    from sdlab.cli.models_dirs import first_in_models_dirs
    from sdlab.pipeline.prompt_loras import find_lora

    deep, flat, later = _lora_search_dirs(args)
    hashes = recorded_hashes or {}
    found_by_hash: dict[str, Path | None] = {}
    found_in_models_dirs: dict[str, Path | None] = {}

    def by_hash(name: str) -> Path | None:
        wanted = hashes.get(name, "").lower()[:12]
        if wanted and name not in found_by_hash:
            found_by_hash[name] = _lora_by_hash(name, wanted, [*deep, *later])
        return found_by_hash.get(name)

    def in_models_dirs(name: str) -> Path | None:        # the first --models-dir's Lora / loras holding it
        if name not in found_in_models_dirs:
            found_in_models_dirs[name] = first_in_models_dirs(
                getattr(args, "models_dir", []),
                lambda models_dir: find_lora(name, [folder for folder in later if folder.parent == models_dir]),
                f"the LoRA {name!r}")
        return found_in_models_dirs[name]

    return lambda name: (find_lora(name, deep) or find_lora(name, flat, recursive=False) or in_models_dirs(name)
                         or by_hash(name))


def _lora_by_hash(name: str, wanted: str, folders: list[Path]) -> Path | None:
    """The first LoRA file under `folders` (subfolders too) whose hash starts with `wanted` (lower case; a
    metadata hash may be upper case), said as NAME's."""
    from sdlab.pipeline.png_info import readable_lora_hash

    for folder in folders:
        for path in sorted(folder.rglob("*")) if folder.is_dir() else ():
            if (path.suffix.lower() in _LORA_SUFFIXES and path.is_file()
                    and (readable_lora_hash(path) or "").lower().startswith(wanted)):   # unreadable: skipped
                logger.warning("the LoRA %r is %s (found by its recorded hash %s)", name, path, wanted)
                return path
    return None


def _resolve_loras(args: argparse.Namespace, prompt: str, recorded: dict[str, Any],
                   finder: Callable[[str], Path | None]):
    """(prompt for the pipeline, `--lora` (file, weight) pairs merged at load, `LoraRef`s to record, prompt
    to record).

    `--lora FILE:WEIGHT` files are merged when the model loads; each `<lora:NAME:...>` tag of the prompt is
    merged by the pipeline for the run (`Pipeline.run`), found by `finder` (the run's `_lora_finder`, with the
    `recorded` Lora hashes) in `_lora_search_dirs`, unless a `--lora`
    file has that name (the command line wins: the tag is left out of the pipeline's prompt). A tag whose
    file cannot be found or is not a LoRA is an error before any work, never silently dropped; a file
    whose hash differs from the recorded `Lora hashes` is a warning. The prompt is recorded as typed.
    """
    from sdlab.pipeline.infotext import LoraRef, parse_lora_hashes, tag_loras
    from sdlab.pipeline.png_info import lora_hash
    from sdlab.pipeline.prompt_loras import split_prompt_loras
    from sdlab.pipeline.request import RequestError

    try:
        split_prompt_loras(prompt)
    except ValueError as err:
        raise UserError(str(err)) from None
    recorded_hashes = parse_lora_hashes(recorded.get("Lora hashes"))
    files = [_parse_lora(spec, finder) for spec in args.lora]     # one search set for --lora names and tags
    try:
        for_pipeline, to_record, tag_refs = tag_loras(prompt, {Path(path).stem: weight for path, weight in files},
                                                      finder, lora_hash)
    except RequestError as err:
        raise _missing_tag_lora(args, err) from None
    refs = [LoraRef(Path(path).stem, weight, lora_hash(path)) for path, weight in files] + tag_refs
    for ref in refs:
        wanted = recorded_hashes.get(ref.name, "").lower()
        if wanted and not ref.hash.lower().startswith(wanted[:12]):
            logger.warning("the LoRA %r found has hash %s but the picture was drawn with one of hash %s",
                           ref.name, ref.hash, wanted)
    return for_pipeline, files, refs, to_record


def _missing_tag_lora(args: argparse.Namespace, err: Exception) -> UserError:
    """A prompt tag's LoRA that is missing or unreadable (`err`), with the folders searched and what to do."""
    where = ", ".join(str(d) for folders in _lora_search_dirs(args) for d in folders)
    return UserError(f"{err} (searched {where}); pass --lora FILE:WEIGHT or --lora-dir DIR "
                     "(or a prompt without the tag)")


def _identify_model(model: str | os.PathLike) -> tuple[str, str | None]:
    """(name, short hash) written as `Model` / `Model hash`; a diffusers folder has no hash."""
    from sdlab.pipeline.png_info import model_hash, model_name

    return model_name(model), (model_hash(model) if os.path.isfile(model) else None)


def _refiner_ref(args: argparse.Namespace, pipe):
    """The --refiner as `to_parameters` records it (name, hash, the switch and handoff rule the pipeline runs)."""
    from sdlab.pipeline.infotext import RefinerRef

    if args.refiner is None:
        return None
    return RefinerRef(*_identify_model(args.refiner), pipe.refiner_switch, pipe.refiner_convention)


def _recorded_model(args: argparse.Namespace, recorded: dict[str, Any]) -> str | None:
    """Without --model: the model the PNG names, when NAME.safetensors / .ckpt / NAME/ is beside it, here or in
    a --models-dir; else the file under a --models-dir whose hash is the recorded `Model hash` (A1111's
    lookup; hashes are cached per file, so only new or changed files are read). Of the --models-dir folders,
    the first given that holds the name wins (`models_dirs.first_in_models_dirs`)."""
    from sdlab.cli.models_dirs import first_in_models_dirs
    from sdlab.pipeline.png_info import model_hash

    if args.model:
        return None
    name = str(recorded.get("Model") or "")
    models_dirs = [Path(d) for d in getattr(args, "models_dir", [])]

    def by_name(folder: Path) -> Path | None:
        for candidate in (folder / f"{name}.safetensors", folder / f"{name}.ckpt", folder / name):
            if candidate.is_file() or (candidate / "model_index.json").is_file():
                return candidate
        return None

    if name and not any(sep in name for sep in ("/", "\\", "\0")) and name not in (".", ".."):
        found = (by_name(Path(args.from_png).resolve().parent) or by_name(Path("."))
                 or first_in_models_dirs(models_dirs, by_name, f"the model {name!r}"))
        if found is not None:
            return str(found)
    wanted = str(recorded.get("Model hash") or "").lower()
    if wanted:
        for folder in models_dirs:
            for candidate in sorted(folder.rglob("*")):
                if candidate.suffix.lower() in (".safetensors", ".ckpt") and candidate.is_file() \
                        and model_hash(candidate).startswith(wanted):
                    return str(candidate)
    return None


def _check_model(recorded: dict[str, Any], name: str, hash_: str | None) -> None:
    """Warn when the model drawing differs from the one the --from-png picture was drawn with."""
    wanted_name, wanted_hash = str(recorded.get("Model") or ""), str(recorded.get("Model hash") or "").lower()
    differs = (wanted_hash != hash_[:len(wanted_hash)]) if wanted_hash and hash_ else bool(wanted_name) and wanted_name != name
    if differs:
        logger.warning("the picture was drawn with the model %r%s; drawing with %r%s instead (pass --model to choose)",
                       wanted_name or "?", f" (hash {wanted_hash})" if wanted_hash else "",
                       name, f" (hash {hash_})" if hash_ else "")


# A1111's settings of its own for the hires pass that sdlab does not draw (its checkpoint), with the first pass's
# label: sdlab's second pass runs with the first pass's (Forge's Hires CFG Scale it draws: `hr_cfg_scale`)
HIRES_PASS_SETTINGS = {"Hires checkpoint": "Model"}


def _own_hires_settings(recorded: dict[str, Any]) -> list[str]:
    """The `HIRES_PASS_SETTINGS` labels the picture records with a value of their own ("Use same ..." and
    the first pass's value are not)."""
    own = []
    for label, first in HIRES_PASS_SETTINGS.items():
        value = _comparable(recorded.get(label, ""))
        if value and not value.startswith("Use same") and value != _comparable(recorded.get(first, "")):
            own.append(label)
    return own


def _comparable(value: Any) -> str:
    """A recorded value as text to compare: a number by its value (7 and 7.0 alike), else stripped."""
    try:
        return repr(float(value))
    except (TypeError, ValueError):
        return str(value).strip()


def _same_vae(recorded: tuple[str, str | None], drawn: tuple[str, str | None]) -> bool:
    """Whether the VAE a picture records (A1111's `VAE`, `VAE hash`) is the one a run draws with: the same hash
    where both have one, else the same file name."""
    (name, short_hash), (drawn_name, drawn_hash) = recorded, drawn
    return short_hash == drawn_hash if short_hash and drawn_hash else name == drawn_name


def _vae_label(name: str, short_hash: str | None) -> str:
    return f"{name} [{short_hash}]" if short_hash else name


def _undrawn_unit_labels(recorded: dict[str, Any], request) -> list[str]:
    """"ControlNet N: Label: value, ..." for each --control whose picture's `ControlNet N` line records settings
    it does not draw (`control.undrawn_unit_labels`: Hr Option)."""
    from sdlab.pipeline.control import undrawn_unit_labels

    found = []
    for line in _control_units(recorded)[:len(request.controls)]:
        labels = undrawn_unit_labels(recorded[line], bool(request.hires))
        if labels:
            found.append(f"{line}: {', '.join(labels)}")
    return found


def _warn_what_is_not_given(recorded: dict[str, Any], refiner, vae: tuple | None, pipe, request) -> None:
    """Warn about what the --from-png picture was drawn with that this run does not have: its refiner, its
    standalone VAE (or another than the one this run draws with: --vae, the sidecar), its textual-inversion
    embeddings (not found in --embeddings-dir), its ControlNet units past the --controls given and the units'
    settings sdlab does not draw (`_undrawn_unit_labels`), its hires pass's own CFG or checkpoint, the A1111 settings sdlab does not draw (`infotext.undrawn_labels`)."""
    from sdlab.pipeline.infotext import parse_lora_hashes, undrawn_labels

    if recorded.get("VAE") and vae is None:
        logger.warning("the picture was decoded with the VAE %r; pass --vae FILE to redraw it", recorded["VAE"])
    elif recorded.get("VAE") and not _same_vae((recorded["VAE"], recorded.get("VAE hash")), vae):
        logger.warning("the picture was decoded with the VAE %r, this run decodes with %r; pass --vae FILE to "
                       "redraw it with its own", _vae_label(recorded["VAE"], recorded.get("VAE hash")),
                       _vae_label(*vae))
    if recorded.get("Refiner") and refiner is None:
        logger.warning("the picture was finished by the refiner %r (switch at %s); pass --refiner FILE to "
                       "redraw it", recorded["Refiner"], recorded.get("Refiner switch at", "?"))
    loaded = {embedding.name for embedding in pipe.embeddings}
    missing = sorted(set(parse_lora_hashes(recorded.get("TI hashes"))) - loaded)
    if missing:
        logger.warning("the picture used the embeddings %s, which are not loaded; pass --embeddings-dir with "
                       "them to redraw it", ", ".join(missing))
    left_out = _control_units(recorded)[len(request.controls):]     # the N-th --control redraws the N-th unit
    if left_out:
        logger.warning("the picture was drawn with %s; pass a --control for each to redraw it", ", ".join(left_out))
    unit_labels = _undrawn_unit_labels(recorded, request)
    if unit_labels:
        logger.warning("the picture's ControlNet units were drawn with settings sdlab does not draw (%s); the "
                       "redraw differs", "; ".join(unit_labels))
    own = _own_hires_settings(recorded)
    if own and request.hires:
        logger.warning("the picture's hires pass had its own %s; sdlab's second pass runs with the first pass's, "
                       "so the redraw differs", ", ".join(f"{label} {recorded[label]!r}" for label in own))
    undrawn = undrawn_labels(recorded)
    if undrawn:
        logger.warning("the picture was drawn with settings sdlab does not draw (%s); the redraw differs",
                       ", ".join(undrawn))


def _pipeline(args: argparse.Namespace, model, loras, finder, recorded, pipelines: dict | None):
    """`_load_pipeline`'s pipeline; with `pipelines` (--prompts-file's lines) the one loaded last is kept for the
    next run of the same model file, and let go before another loads: one model held at a time, as A1111's
    default Maximum number of checkpoints loaded at the same time (1)."""
    if pipelines is None:
        return _load_pipeline(args, model, loras, finder, recorded)
    from sdlab.api import shipped_model_path

    chosen = model or args.model or shipped_model_path()
    key = chosen and os.path.realpath(chosen)
    if key not in pipelines:
        pipelines.clear()
        _free_memory()
        pipelines[key] = _load_pipeline(args, model, loras, finder, recorded)
    return pipelines[key]


def _free_memory() -> None:
    """Give back what the pipelines let go held (CUDA memory too) before the next model loads."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _add_input_pictures(args: argparse.Namespace, options: dict[str, Any]) -> None:
    """img2img's and inpaint's pictures into `options`: the --init image, and the --mask or the --outpaint canvas
    and its mask (errors before any work)."""
    from sdlab.pipeline.images import pad_for_outpaint
    from sdlab.pipeline.request import DEFAULT_IMAGE_CFG_SCALE, MAX_SIDE

    if args.mode == "txt2img":
        return
    if not args.init:
        raise UserError(f"{args.mode} needs --init IMAGE")
    options["init_image"] = _open_image(args.init, "init image")
    options.setdefault("image_cfg_scale", DEFAULT_IMAGE_CFG_SCALE)     # A1111's slider's; read by edit models alone
    if args.mode != "inpaint":
        return
    if args.outpaint:
        if args.mask:
            raise UserError("give either --mask or --outpaint, not both")
        left, right, top, bottom = _fit_outpaint(_parse_outpaint(args.outpaint), options["init_image"].size)
        canvas = (options["init_image"].width + left + right, options["init_image"].height + top + bottom)
        if max(canvas) > MAX_SIDE:       # refused before the canvas is allocated
            raise UserError(f"--outpaint {args.outpaint} makes a {canvas[0]}x{canvas[1]} canvas; "
                            f"the largest side is {MAX_SIDE}")
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


@contextlib.contextmanager
def progress_bar(args: argparse.Namespace, total: int) -> Iterator[Callable[[Any], None] | None]:
    """A counter of `total` sampler steps on stderr, as `pipe.run`'s `progress` (None with --no-progress); closed
    at the end."""
    if args.no_progress:
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(total=total, desc=args.mode, unit="step", file=sys.stderr, leave=False)
    try:
        yield lambda info: bar.update(1)
    finally:
        bar.close()


def run_generate(args: argparse.Namespace, pipelines: dict | None = None) -> int:
    """Draw and write the pictures of `args`; `pipelines` keeps the models loaded across runs (--prompts-file)."""
    check_script_flags(args)
    if getattr(args, "prompts_file", None):
        return run_prompts_file(args)
    check_without_prompts_file(args)
    from sdlab.pipeline.hires import hires_steps
    from sdlab.pipeline.infotext import drawn_hires_prompt, hires_tag_refs, parse_lora_hashes, to_parameters
    from sdlab.pipeline.png_info import embedding_hash, format_parameters, lora_hash, vae_ref
    from sdlab.pipeline.prompt_loras import resolve_prompt_loras
    from sdlab.pipeline.request import GenerationRequest, RequestError, check_batch_seeds, next_batch
    from sdlab.pipeline.styles import styled_options

    target = _output_target(args.out)                         # a bad --out is refused before any work
    styles = styles_of(args)
    recorded, recorded_styles = _picture_styles(_recorded_parameters(args), styles)
    take_recorded_script_settings(args, recorded)             # Loopback's / SD upscale's fields (img2img_scripts)
    options = styled_options(_options_from_args(args, recorded), styles, args.style or recorded_styles)
    finder = _lora_finder(args, parse_lora_hashes(recorded.get("Lora hashes")))
    options["prompt"], loras, lora_refs, prompt_to_record = _resolve_loras(args, options["prompt"], recorded, finder)
    if options.get("hr_prompt"):
        options["hr_prompt"] = drawn_hires_prompt(options["hr_prompt"], {Path(path).stem: w for path, w in loras})
        try:                                                  # its tags found as the prompt's, before any work
            resolve_prompt_loras(options["hr_prompt"], finder, "hires prompt")
        except RequestError as err:
            raise _missing_tag_lora(args, err) from None
    _add_input_pictures(args, options)

    controls = _controls(args, recorded, options.get("control_convention", GenerationRequest.control_convention))
    if controls:
        options["controls"] = controls
    ip_adapters = _ip_adapters(args, recorded, options.get("control_convention", GenerationRequest.control_convention))
    if ip_adapters:
        options["ip_adapters"] = ip_adapters
    try:
        request = GenerationRequest(**options)
    except TypeError as err:
        raise UserError(str(err)) from None
    model = _recorded_model(args, recorded) if recorded else None
    if model is not None:
        logger.warning("using %s, the model the picture names (pass --model to choose another)", model)
    pipe, model = _pipeline(args, model, loras, finder, recorded, pipelines)
    preset = pipe.preset_for(options["prompt"])        # the model's, a --lora file's or a prompt tag's LoRA's
    if preset and not recorded and not getattr(args, "preset", None):
        request = GenerationRequest(**_with_model_preset(options, preset, args.mode))
    name, hash_ = _identify_model(model)
    refiner = _refiner_ref(args, pipe)
    vae = vae_ref(pipe.bundle.report)      # --vae, or the <name>.vae.* beside it: A1111's VAE / VAE hash
    if recorded:
        _check_model(recorded, name, hash_)
        _warn_what_is_not_given(recorded, refiner, vae, pipe, request)
    request = script_request(args, request, pipe)             # SD upscale: the tiles' size
    try:
        plan = pipe.resolve(request)                          # resolved once: the run and the infotext use it
    except RequestError as err:
        raise UserError(str(err)) from None
    used = [(e.name, embedding_hash(e.path)) for e in pipe.embeddings_used(plan.request)]
    hires_refs = hires_tag_refs(plan.request, pipe.find_lora, lora_hash)

    def parameters(result, index: int) -> dict[str, Any]:
        """The labelled parameters of picture `index` of `result` (a `GenerationResult` of this run)."""
        return to_parameters(result.request, index=index, model_name=name, model_hash=hash_, loras=lora_refs,
                             prompt=prompt_to_record, embeddings=used, refiner=refiner if result.refined else None,
                             vae=vae, hires_loras=hires_refs, family=pipe.bundle.family)

    if script_chosen(args):
        return run_script(args, pipe, request, plan, target, parameters)
    try:
        check_batch_seeds(plan.request, args.batch_count)
        plans = [plan] + [pipe.resolve(next_batch(plan.request, k)) for k in range(1, args.batch_count)]
    except RequestError as err:
        raise UserError(str(err)) from None
    seeds = [seed for p in plans for seed in p.request.seeds()]
    paths = _output_paths(args.out, target, plan.request.prompt, seeds)

    total = sum(p.steps_run + (hires_steps(p.request) if p.request.hires else 0) for p in plans)
    try:
        with progress_bar(args, total) as progress:
            results = [pipe.run(p, progress=progress) for p in plans]
    except RequestError as err:
        raise UserError(str(err)) from None

    images, texts = [], []
    for result in results:
        images += result.images
        texts += [format_parameters(parameters(result, i)) for i in range(len(result.images))]
    in_folder = target[1] is None
    if not getattr(args, "write", True):             # a --prompts-file line's --do_not_save_samples true
        return 0
    for path in _save_images(in_folder, paths, images, texts, plan.request.prompt, seeds):
        print(path)
    return 0
