"""What a user asks for (`GenerationRequest`) and what they get back (`GenerationResult`).

One request type serves txt2img, img2img and inpainting: an `init_image` makes it img2img, an
`init_image` with a `mask_image` makes it inpainting. `resolve` fills the family's defaults and checks
every value once, so the generate loop can trust what it reads. What it does with values that are not
plainly right:

- width / height: sides that are not a multiple of `SIZE_MULTIPLE` (8, the VAE factor of every released
  model; the VAE factor itself when that is larger) are rounded DOWN to one, with a logged warning
  (A1111's and diffusers' grid; rounding down never grows the picture); a side smaller than one
  multiple, or above `MAX_SIDE`, is an error. img2img / inpainting default to the init image's size
  (then snapped; `size_convention="a1111"`: the family's, as A1111's API), txt2img to the family's size.
- prompts: any length up to `MAX_PROMPT_CHARS` characters is accepted. Long prompts are encoded in
  chunks of 75 tokens (A1111's behaviour; diffusers would truncate at 77 tokens); longer text is refused,
  as it is almost always a pasted file, not a prompt.
- seed: None or -1 draws a random seed (A1111's `get_fixed_seed`); image i of a batch uses seed + i. Other
  negative seeds are seeds, as A1111 hands them to `torch.manual_seed` (which reads them modulo 2**64).
- sampler: a name spelt as ComfyUI spells it (`euler_ancestral`, not "Euler a": `samplers.comfyui_spelling`)
  asks for ComfyUI's KSampler conventions, so that image i is ComfyUI's one-picture run with seed + i: a
  sampler that draws Gaussian step noise at its eta draws it from a generator seeded seed + 1 (ComfyUI's
  `default_noise_sampler` on the CPU: A1111's ENSD of 1, `default_ensd`) unless an ENSD is given, 0 included;
  the start noise is scaled by ComfyUI's rule (`init_noise="comfyui"`, for a schedule not named the diffusers
  way) unless one is given; img2img's strength is ComfyUI's `denoise` (`img2img_convention="comfyui"`) unless
  A1111's is asked for; an empty negative prompt is encoded as "" (`zero_empty_negative=False`: ComfyUI's
  CLIPTextEncode, which zeros nothing) unless the request sets the rule.
- numbers: NumPy's scalars (`np.int64`, `np.float32`, `np.bool_`, ...; any `numbers.Integral` /
  `numbers.Real`) count as Python ints, floats and bools, converted once as the request is resolved, so the
  resolved request, the infotext and the PNG hold plain numbers. Numbers must be finite and inside bounds far
  beyond any useful setting (`MAX_STEPS`, `MAX_CFG`, `MAX_ETA`, `MAX_MASK_BLUR`, ...): past them a picture is
  black or noise, or the run cannot fit in memory.
- every other out-of-range value is a `RequestError` naming the value, what was given and what is valid.
"""

from __future__ import annotations

import math
import numbers
import os
import random
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from typing import Any

import numpy as np
from PIL import Image
from torch import Tensor

from sdlab.diffusion.discretization import (
    A1111_IMG2IMG,
    IMG2IMG_CONVENTIONS,
    INIT_NOISE_CONVENTIONS,
    SPACINGS,
    default_init_noise,
    steps_run,
)
from sdlab.diffusion.noise import BATCH_NOISE, RNG_SOURCES
from sdlab.diffusion.samplers import (
    A1111_TIMESTEP_SAMPLERS, SamplerSpec, UnknownSamplerError, comfyui_spelling, get_sampler, runs_a1111_timesteps,
)
from sdlab.diffusion.schedule_names import schedule_from_a1111
from sdlab.models.deep_cache import MAX_DEEP_CACHE_INTERVAL, DeepCache
from sdlab.models.freeu import (
    FREEU_CONVENTIONS, FREEU_FACTORS, FREEU_VERSIONS, FREEU_WINDOW, MAX_FREEU_FACTOR, FreeU,
)
from sdlab.pipeline.comfy_latent_upscale import COMFY_CROPS, COMFY_LATENT_UPSCALE_METHODS, comfyui_hires_size
from sdlab.pipeline.comfy_prompt import check_area_prompts
from sdlab.pipeline.images import on_white, read_image, snap_size, upright_size
from sdlab.pipeline.perturbed_attention import DEFAULT_LAYERS, PagLayerError, check_layer_patterns
from sdlab.pipeline.upscale import (
    DEFAULT_OVERLAP, DEFAULT_TILE, LATENT_UPSCALE_MODES, PLAIN_UPSCALERS, UpscaleError, canonical_latent_name,
    MIN_TILE, missing_upscaler, tile_overlap_limit, tile_too_small,
)

MAX_PROMPT_CHARS = 20_000   # longer prompts are refused: they are almost always a mistake (a pasted file)
MAX_BATCH = 64
MAX_BATCH_COUNT = 1000                      # batches drawn one after another (A1111's n_iter, --batch-count)
MAX_SIDE = 8192
SIZE_MULTIPLE = 8                           # pixel sides snap to multiples of lcm(8, VAE factor)
MAX_SEED = 2**64 - 1                        # torch.Generator.manual_seed's range: MIN_SEED..MAX_SEED
MIN_SEED = -(2**63)
MAX_STEPS = 1000                            # the training schedule's 1000 timesteps; more repeats them
HIRES_CONVENTIONS = ("a1111", "comfyui")     # `hr_convention`: A1111's hires fix or ComfyUI's two-pass graph
HIRES_IMG2IMG = "a1111_fix_steps"           # the hires pass's img2img convention: A1111's setup_img2img_steps
MAX_SCHEDULE = 10_000                       # img2img "comfyui" stretches the schedule to steps / strength
MAX_CFG = 100.0                             # |CFG|; useful values are 1..30
DEFAULT_IMAGE_CFG_SCALE = 1.5               # an edit model's image guidance: diffusers' default, A1111's slider's
NO_IMAGE_GUIDANCE = "none"                  # how the CLI and the native API say image_cfg_scale None (A1111's unset)
MAX_ETA = 10.0                              # eta and s_noise; useful values are 0..1
MAX_CHURN = 1000.0                          # s_churn: A1111's slider ends at 100
MAX_MASK_BLUR = 256.0                       # pixels (A1111's slider stops at 64)
MAX_NOISE_MULTIPLIER = 10.0                 # A1111's slider: 0.5..1.5
MAX_BETA = 100.0                            # the beta schedules' alpha / beta; A1111's sliders: 0.01..1
MAX_AESTHETIC = 100.0                       # |aesthetic score|; the SDXL refiner was trained on 0..10
MAX_SIZE_CONDITION = 2**127                 # SDXL's size / crop numbers: what its float32 tensor holds
RESIZE_MODES = ("resize", "crop", "fill", "latent")  # A1111's img2img resize_mode 0..3: Just resize, Crop and
                                                    # resize, Resize and fill, Just resize (latent upscale)
MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")   # A1111's inpainting_fill 0..3
INPAINT_FILLS = (*MASKED_CONTENT, "grey")   # a request's: A1111's, then ComfyUI's VAEEncodeForInpaint mid-grey
MAX_MASK_GROW = 64                          # ComfyUI's VAEEncodeForInpaint grow_mask_by maximum
LIBRARY_CONVENTIONS = ("diffusers", "a1111")  # the rules a setting follows where the two libraries differ
CLIP_SKIP_CONVENTIONS = (*LIBRARY_CONVENTIONS, "comfyui")   # "comfyui": CLIPSetLastLayer's -clip_skip
EMPHASIS_MODES = ("Original", "No norm", "Ignore", "None")   # A1111's emphasis modes (modules/sd_emphasis.py)
PROMPT_EMPHASIS = (*EMPHASIS_MODES, "ComfyUI")  # a request's: A1111's, then ComfyUI's weights (comfy_prompt.py)
CONTROL_CONVENTIONS = (*LIBRARY_CONVENTIONS, "comfyui")  # "comfyui": ComfyUI's hint resize and sigma windows
SIZE_CONVENTIONS = LIBRARY_CONVENTIONS


HIRES_SIZE = "hires size"
"""`RequestError.refused` of a refusal of the size the hires fix would draw (its sides past the limits, or not whole
multiples): the ComfyUI API names the graph's upscale node for it."""


class RequestError(ValueError):
    """A request that cannot be run; the message says which value is wrong and why, `refused` (where a caller
    tells refusals apart) what it refuses: `HIRES_SIZE`, else None."""

    def __init__(self, message: str, refused: str | None = None) -> None:
        super().__init__(message)
        self.refused = refused


ImageLike = Image.Image | str | os.PathLike[str]


def check_refiner_switch(switch: float, name: str = "refiner_switch") -> float:
    """`switch`, the fraction of each schedule the base model runs before an SDXL refiner takes over, if it
    lies strictly between 0 and 1; otherwise a `RequestError` that calls it `name` (the caller's spelling)."""
    if not 0.0 < float(switch) < 1.0:
        raise RequestError(f"{name} must lie strictly between 0 and 1, got {switch}")
    return float(switch)


def _not_a_picture(what: str, image: object) -> RequestError:
    return RequestError(f"the {what} must be a PIL image or a file path, got {type(image).__name__}")


def input_image(image: ImageLike, what: str) -> Image.Image:
    """An input picture (`what`: "init image", "mask") as a PIL image, read if given as a path; a file that
    is missing or unreadable is a `RequestError` naming it."""
    if isinstance(image, Image.Image):
        return image
    if not isinstance(image, (str, os.PathLike)):
        raise _not_a_picture(what, image)
    return _read(read_image, image, what)


def input_size(image: ImageLike, what: str) -> tuple[int, int]:
    """The (width, height) of `input_image(image, what)`, a file's from its header (`upright_size`), not decoded;
    the same `RequestError`s."""
    if isinstance(image, Image.Image):
        return image.size
    if not isinstance(image, (str, os.PathLike)):
        raise _not_a_picture(what, image)
    return _read(upright_size, image, what)


def _read(read: Callable[[str | os.PathLike[str]], Any], path: str | os.PathLike[str], what: str) -> Any:
    """`read(path)`, a missing or unreadable file a `RequestError` naming the `what` it is."""
    try:
        return read(path)
    except FileNotFoundError:
        raise RequestError(f"the {what} {os.fspath(path)!r} does not exist") from None
    except (OSError, ValueError) as err:
        raise RequestError(f"cannot read the {what} {os.fspath(path)!r}: {err}") from None


@dataclass(frozen=True)
class GenerationRequest:
    """Everything that decides the picture. `None` means "the model family's default"."""

    prompt: str
    negative_prompt: str = ""
    prompt_2: str = ""                      # SDXL's second text encoder's (OpenCLIP bigG's, the pooled vector's) prompt
    negative_prompt_2: str = ""             # and negative, diffusers' prompt_2 / negative_prompt_2; "": the prompt's
    steps: int | None = None                # None = the family's (FamilySpec.default_steps: 14 sdlab-tiny, 20 SD)
    sampler: str | None = None              # A1111 or ComfyUI name, e.g. "DPM++ 2M", "euler_ancestral"
    schedule: str | None = None             # discretization: "karras", "normal", "leading", ...
    cfg_scale: float | None = None          # None = the family's (FamilySpec.default_cfg: 5 sdlab-tiny, 7 SD)
    guidance_rescale: float = 0.0
    s_min_uncond: float = 0.0               # A1111's NGMS: no unconditional pass at every other model call (every
    s_min_uncond_all: bool = False          # call: NGMS all steps) whose sigma is below this (guidance.a1111_skips)
    skip_early_cond: float = 0.0            # A1111's Skip Early CFG: no unconditional pass in this fraction of calls
    pad_cond_uncond: bool = False           # A1111's Pad conds: the shorter of prompt / negative padded with
                                            # chunks of "" (conditioning.pad_conds)
    pad_cond_uncond_v0: bool = False        # A1111's Pad conds v0: the negative's last vector repeated, or the
                                            # negative cut, to the prompt's length; wins over pad_cond_uncond
    pag_scale: float = 0.0                  # perturbed-attention guidance (diffusers' pag_scale, Forge's PAG Scale);
                                            # 0: off. One more U-Net row per image (guidance.PerturbedGuidance)
    pag_adaptive_scale: float = 0.0         # diffusers' pag_adaptive_scale: the scale at timestep t is
                                            # max(pag_scale - this * (1000 - t), 0)
    pag_layers: tuple[str, ...] = DEFAULT_LAYERS   # diffusers' pag_applied_layers (pipeline/perturbed_attention.py)
    seed: int | None = None                 # image i uses seed + i; None draws a random seed
    subseed: int | None = None              # A1111's variation seed (image i: subseed + i); None = random
    subseed_strength: float = 0.0           # 0 = off; the initial noise moves toward the subseed's by this
    rng: str = "CPU"                        # the noise's random source, A1111's randn_source: "CPU", "GPU" (the
                                            # CUDA device's generator; elsewhere "NV"'s numbers) or "NV" (CUDA's
                                            # numbers on any device); any case (diffusion/noise.py)
    seed_resize_from_w: int = 0             # A1111's "Seed resize from" width x height in pixels: the noise the
    seed_resize_from_h: int = 0             # seeds draw at that size, centred in this one's (noise.first_noise);
                                            # 0 or less on either side: off
    width: int | None = None
    height: int | None = None
    size_convention: str = "diffusers"      # img2img / inpainting's unset width / height: the init image's
                                            # ("diffusers"), or the family's default size as txt2img's ("a1111":
                                            # A1111's API, whose width / height default to 512 for any picture)
    batch_size: int = 1
    clip_skip: int = 1                      # A1111 numbering: 1 = the family's usual layer, 2 = one back
    clip_skip_convention: str = "diffusers"  # "a1111": only encoders whose usual layer is the last (SD1's) move
                                            # back, as A1111 does; SD2 / SDXL ignore it there (plan._resolve);
                                            # "comfyui": ComfyUI's CLIPSetLastLayer -clip_skip, counted from every
                                            # encoder's last layer (1: the last; plan.encoder_clip_skips)
    sdxl_clip_l_skip: bool = False          # A1111's Clip skip SDXL (sdxl_clip_l_skip), with the "a1111" rule only:
                                            # SDXL's CLIP-L reads hidden_states[-clip_skip] (1: its last layer, no
                                            # norm), bigG its usual layer (plan.encoder_clip_skips)
    zero_empty_negative: bool | None = None  # an empty negative prompt as a zero conditioning (SDXL's rule) or
                                            # encoded as "" (False); None: the model's (checkpoints/load.py), and
                                            # False for a ComfyUI spelling (module docstring)
    emphasis: str = "Original"              # A1111's emphasis mode: "Original", "No norm", "Ignore", "None"
                                            # (PROMPT_EMPHASIS, any case: A1111's or "ComfyUI")
    old_prompt_editing: bool = False        # A1111's Old prompt editing timelines (use_old_scheduling): its
                                            # [from:to:when] rule before 1.6 (prompt_schedule)
    eta_noise_seed_delta: int | None = None  # A1111's ENSD: step noise drawn from seed + this after the initial
                                            # noise; None: `default_ensd` (1 for a ComfyUI spelling that draws it)
    batch_noise: str = "per_image"          # "per_image": image i from its seed + i's generator (A1111's, diffusers');
                                            # "comfyui": the batch's noise from one generator of the seed, as
                                            # ComfyUI's KSampler draws it (noise.generators_for, BATCH_NOISE)
    eta: float | None = None                # ancestral / DDIM noise amount; None = the sampler's default
    s_noise: float = 1.0
    s_churn: float = 0.0                    # k-diffusion's churn (Euler, Heun, DPM2: A1111's Sigma churn): noise
    s_tmin: float = 0.0                     # added back at each step whose sigma lies in [s_tmin, s_tmax]
    s_tmax: float | None = None             # None: no upper end (inf); 0 too, as A1111 reads it
    schedule_sigma_min: float = 0.0         # A1111's Schedule min sigma / max sigma / rho (its sigma_min, sigma_max,
    schedule_sigma_max: float = 0.0         # rho settings): the schedule's ends and rho; 0 = the model's / the
    schedule_rho: float = 0.0               # schedule's (discretization.schedule_overrides)
    discard_penultimate_sigma: bool = False  # A1111's always_discard_next_to_last_sigma (plan.request_sigmas)
    old_karras_sigmas: bool = False         # A1111's use_old_karras_scheduler_sigmas: the ends 0.1 / 10 where
                                            # Schedule min / max sigma leave them (plan.a1111_schedule_ends)
    beta_alpha: float = 0.6                 # the beta schedules' Beta(alpha, beta): A1111's Beta schedule alpha /
    beta_beta: float = 0.6                  # beta, ComfyUI's BetaSamplingScheduler's (discretization.schedule_overrides)
    sgm_noise_multiplier: bool = False      # A1111's SGM noise multiplier: txt2img's start noise times
                                            # sqrt(1 + sigma^2), init_noise "vp" (not for DDIM, PLMS, UniPC)
    init_noise: str | None = None           # "sigma_max" (A1111), "vp" or "comfyui"; None = the schedule's
                                            # convention (discretization.default_init_noise)
    quantize_timesteps: bool = False        # round t to integers before the U-Net (diffusers' DPM-Solver)
    downcast_alphas_cumprod: bool = False   # A1111's Downcast alphas_cumprod (use_downcasted_alpha_bar): the
                                            # schedule's sigmas from float16 alphas_cumprod
    zero_terminal_snr: bool = False         # A1111's Noise Schedule "Zero Terminal SNR" (sd_noise_schedule): the
                                            # model's alphas_cumprod rescaled (schedules.a1111_schedule_override)
    unipc_variant: str = "bh1"              # A1111's uni_pc_variant, uni_pc_order and uni_pc_lower_order_final,
    unipc_order: int = 3                    # its defaults: how its UniPC on ddim_uniform steps
    unipc_lower_order_final: bool = True    # (samplers.a1111_run)
    # img2img / inpainting
    init_image: Image.Image | None = field(default=None, repr=False, compare=False)
    init_images: tuple[Image.Image, ...] = field(default=(), repr=False, compare=False)   # A1111's several
                                            # init_images, each resized to width x height: picture i starts from
                                            # init_images[i % len], at most batch_size of them; resolve makes
                                            # init_image the first
    strength: float = 0.75
    noise_multiplier: float = 1.0           # img2img: the initial noise times this (A1111's initial noise multiplier)
    extra_noise: float = 0.0                # img2img and the hires pass: the start noise added once more times this
                                            # (A1111's img2img_extra_noise, Extra noise)
    inpainting_mask_weight: float = 1.0     # a 9-channel inpainting model's masked picture: lerp(picture, masked
                                            # picture, this) (A1111's inpainting_mask_weight, Conditional mask weight)
    image_cfg_scale: float | None = None    # an edit (InstructPix2Pix) model's image guidance scale (diffusers'
                                            # image_guidance_scale, A1111's Image CFG scale); None: none (as 1,
                                            # A1111's API without it); recorded where an edit model drew with it
    img2img_convention: str = "diffusers"   # how strength maps to steps: "diffusers", "a1111", "comfyui", "lcm",
                                            # "a1111_fix_steps" (A1111's img2img_fix_steps option)
    resize_mode: str = "resize"             # the init image to width x height: "resize", "crop", "fill", "latent"
                                            # (A1111's resize modes; pipeline/init_picture.py)
    mask_image: Image.Image | None = field(default=None, repr=False, compare=False)
    mask_blur: float = 0.0                  # Gaussian sigma in pixels (A1111's mask blur; pipeline/overlay.py)
    mask_blur_y: float | None = None        # the sigma along y where it differs from mask_blur's, which is then
                                            # x's alone (A1111's mask_blur_x / mask_blur_y); None: mask_blur
    invert_mask: bool = False               # repaint where the mask is black (A1111's Mask mode "Inpaint not
                                            # masked", inpainting_mask_invert)
    mask_round: bool = True                 # False: A1111's mask_round off: a transparent mask's alpha kept soft,
                                            # the latent blend, latent noise / nothing and a 9-channel model's mask
                                            # by the blurred mask's levels, not rounded to repaint / keep
    inpaint_fill: str = "original"          # the masked area starts as "fill", "original", "latent noise" or
                                            # "latent nothing" (A1111's Masked content; pipeline/masked_content.py),
                                            # or "grey": the masked pixels (the mask rounded) mid-grey before
                                            # encoding (ComfyUI's VAEEncodeForInpaint)
    mask_grow: int = 0                      # ComfyUI's VAEEncodeForInpaint grow_mask_by: the latent noise mask is
                                            # the rounded mask grown by a box of this many pixels
                                            # (`images.comfyui_grown_mask`); the comfyui img2img convention alone
    latent_mask_image: Image.Image | None = field(default=None, repr=False, compare=False)
                                            # A1111's `p.latent_mask` (set by its outpainting scripts, not its API):
                                            # at width x height, white = the area Masked content paints and the
                                            # latent blend and latent noise / nothing repaint, in place of the
                                            # blurred mask's; the overlay and a 9-channel model keep the mask's
    latent_noise_seed: int | None = None    # "latent noise" drawn from this seed's images (+ i, as `seeds`) instead
                                            # of the request's; `next_batch` sets batch 0's under A1111's img2img
                                            # convention (A1111 fills the init latent once per job)
    inpaint_only_masked: bool = False       # draw the mask's region alone at width x height, put back into the
                                            # picture (A1111's Inpaint area "Only masked"; pipeline/inpaint_area.py)
    inpaint_padding: int = 32               # pixels the region reaches past the mask (A1111's Only masked padding)
    paste_back: bool = True                 # inpainting: composite the original outside the mask (A1111);
                                            # False returns the decoded picture as diffusers' pipelines do
    # SDXL size conditioning, (height, width) / (top, left) in pixels; None = the image size / (0, 0)
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    aesthetic_score: float = 6.0            # SDXL refiner
    # the negative prompt's, used where diffusers' pipelines use them (generate._negative_sizes): the sizes
    # (None = the positive's) in img2img / inpainting, and in txt2img when both are given; the crop corner
    # with them in txt2img and for the refiner
    negative_original_size: tuple[int, int] | None = None
    negative_crops_coords_top_left: tuple[int, int] = (0, 0)
    negative_target_size: tuple[int, int] | None = None
    negative_aesthetic_score: float = 2.5
    tiled_vae: bool | None = None           # None = tile above `tiling.DEFAULT_TILE_THRESHOLD_PIXELS` (never
                                            # with `tiling`: a VAE tile cannot wrap around the picture)
    tiling: bool = False                    # A1111's Tiling: a seamless picture, whose edges wrap around
                                            # (every padded convolution pads circularly: models/circular_padding.py)
    freeu: FreeU | None = None              # FreeU's decoder feature scaling (models/freeu.py); None: off. The base
                                            # model's U-Net only, in every pass (the hires fix's too), not a refiner's
    deep_cache: DeepCache | None = None     # DeepCache's reuse of the U-Net's deep features across steps
                                            # (models/deep_cache.py); None: off. The base model's U-Net only, its
                                            # cache started afresh in every pass (the hires fix's too)
    token_merging_ratio: float = 0.0        # A1111's Token merging ratio (tomesd, use_rand off): the fraction of the
                                            # full-resolution level's tokens merged before each self-attention, in
                                            # [0, 1) (models/token_merging.py); 0: none. The base model's U-Net only
    token_merging_ratio_hr: float = 0.0     # the hires pass's; 0: token_merging_ratio's (A1111's
                                            # get_token_merging_ratio(for_hr=True))
    # ControlNets: `pipeline.control.ControlInput`s or (file, image[, strength[, start, end]]) records
    controls: tuple[Any, ...] = field(default=(), repr=False)
    control_convention: str = "diffusers"   # the steps a control's start / end select: diffusers', A1111's or
                                            # ComfyUI's (its sigma window and hint resize, control.py)
                                            # (`PreparedControl.active`)
    # ComfyUI's area composition: its positive conditioning list (`pipeline.comfy_prompt.AreaPrompt`s: a prompt, an
    # area, a strength), each drawn on its area and averaged by weight (`diffusion.area_conds`) in place of `prompt`
    # (which records the first's); the negative prompt drawn on the whole picture and on each of their areas
    area_prompts: tuple[Any, ...] = field(default=(), repr=False)
    # image prompts (IP-Adapter): `pipeline.image_prompt.IPAdapterInput`s
    ip_adapters: tuple[Any, ...] = field(default=(), repr=False)
    # hires fix (A1111, txt2img; pipeline/hires.py): on when hr_scale or hr_width / hr_height is set
    hr_scale: float | None = None           # the second pass at this multiple (>= 1) of the first's size
    hr_width: int | None = None             # or at this size (A1111's hr_resize_x / y; one side alone keeps
    hr_height: int | None = None            # the aspect ratio; both: cover, then a centred crop); wins over hr_scale
    hr_upscaler: str | None = None          # latent mode ("Latent", "Latent (bicubic)", ...), "Lanczos", "Nearest"
                                            # or an upscaler model file; None = "Latent"
    hr_upscaler_tile: int = DEFAULT_TILE    # an upscaler model file's tiles, input pixels a side (A1111's ESRGAN_tile;
                                            # 0: the whole picture at once: `upscale.run_upscaler`)
    hr_upscaler_tile_overlap: int = DEFAULT_OVERLAP     # the pixels they share (A1111's ESRGAN_tile_overlap)
    hr_steps: int | None = None             # second-pass steps; None / 0 = the first pass's
    hr_denoise: float | None = None         # second-pass denoising strength in (0, 1] (above 1 draws as 1, as
                                            # A1111's); None = 0.7 (A1111's UI)
    hr_sampler: str | None = None           # the second pass's sampler (A1111's hr_sampler_name); None: the first's
    hr_schedule: str | None = None          # its schedule (A1111's hr_scheduler); None: the first pass's as asked
                                            # (unset there: the second pass sampler's default)
    hr_eta: float | None = None             # its eta where it differs from the first pass's (A1111's eta option of
                                            # a hires sampler of its own: `eta_ddim` for DDIM); None: `eta`
    hr_seed: int | None = None              # the second pass's seed; None: the first pass's
    hr_cfg_scale: float | None = None       # the second pass's CFG scale; None: the first pass's
    hr_convention: str = "a1111"            # "comfyui": ComfyUI's two-pass graph (KSampler -> LatentUpscale(By) ->
                                            # KSampler): its latent sizes, no crop box, hr_upscaler one of its
                                            # methods (`COMFY_LATENT_UPSCALE_METHODS`), the second pass on its denoise
                                            # rule from the upscaled latent + its seed's noise (`pipeline/hires.py`);
                                            # the first pass txt2img or img2img (a VAEEncode's KSampler)
    hr_crop: str = "disabled"               # comfyui: LatentUpscale's crop, "disabled" or "center"
    hr_prompt: str = ""                     # the second pass's prompts (A1111's hr_prompt / hr_negative_prompt,
    hr_negative_prompt: str = ""            # encoded for it with their own prompt editing and LoRA tags); "": the
                                            # first pass's
    hr_base_size: tuple[int, int] | None = None  # set by resolve where it snapped a hires request's width x height:
                                            # the (width, height) asked, which A1111 sizes the hires fix from
                                            # (`hires_base_size`) and records as Size
    first_pass_steps: int | None = None     # set on a hires second pass: its first pass's model calls (A1111's
                                            # firstpass_steps), which its prompt edits count on from

    @property
    def mode(self) -> str:
        if self.init_image is None:
            return "txt2img"
        return "img2img" if self.mask_image is None else "inpaint"

    @property
    def hires(self) -> bool:
        """Whether the hires fix runs: a request with hr_scale or hr_width / hr_height (txt2img; under
        hr_convention "comfyui" img2img too, ComfyUI's two-pass graph from a VAEEncode)."""
        return self.hr_scale is not None or bool(self.hr_width) or bool(self.hr_height)

    def init_pictures(self) -> tuple[Image.Image, ...]:
        """The init pictures the batch draws from, picture i from the (i % len)-th: `init_images`, else
        `init_image` alone; none for txt2img."""
        return self.init_images or (() if self.init_image is None else (self.init_image,))

    def seeds(self) -> list[int]:
        """Image i's seed: seed + i; with a variation seed, as in A1111, every image keeps `seed` and the
        subseeds count up instead."""
        assert self.seed is not None, "resolve() the request first"
        step = 0 if self.subseed_strength else 1
        return [self.seed + i * step for i in range(self.batch_size)]

    def subseeds(self) -> list[int]:
        assert self.subseed is not None or not self.subseed_strength, "resolve() the request first"
        return [(self.subseed or 0) + i for i in range(self.batch_size)]

    def step_noise_seeds(self) -> list[int]:
        """The seeds of the per-step noise generators: each image's seed, moved by A1111's ENSD when set
        (A1111 `ImageRNG.first` reseeds its generators with seed + ENSD once the initial noise is drawn)."""
        return [(seed + (self.eta_noise_seed_delta or 0)) % (MAX_SEED + 1) for seed in self.seeds()]

    def parameters(self) -> dict[str, Any]:
        """The request as plain values (images left out), for metadata and logs."""
        values = asdict(replace(self, init_image=None, init_images=(), mask_image=None, latent_mask_image=None,
                                controls=(), ip_adapters=()))
        values.pop("init_image")
        values.pop("init_images")
        values.pop("mask_image")
        values.pop("latent_mask_image")
        values.pop("controls")
        values.pop("ip_adapters")
        return values


@dataclass(frozen=True)
class GenerationResult:
    images: list[Image.Image]
    seeds: list[int]
    request: GenerationRequest              # resolved: every default filled in
    refined: bool = False                   # an SDXL refiner drew part of the schedule (its parameters record it)
    pixels: Tensor | None = None
    """The pictures as the VAE decoded them, (B, 3, H, W) float32 in [0, 1] on the CPU (`images.unit_pixels`), where
    `images` are them rounded and nothing else (None where a picture was pasted back or resized after decoding)."""


OFF_UNLESS_DRAWN: dict[str, dict[str, Any]] = {
    "pag_scale": {"pag_scale": 0.0, "pag_adaptive_scale": 0.0, "pag_layers": DEFAULT_LAYERS},
    "s_min_uncond": {"s_min_uncond": 0.0, "s_min_uncond_all": False},
    "skip_early_cond": {"skip_early_cond": 0.0},
    "pad_cond_uncond": {"pad_cond_uncond": False},
    "pad_cond_uncond_v0": {"pad_cond_uncond_v0": False},
    "extra_noise": {"extra_noise": 0.0},
    "inpainting_mask_weight": {"inpainting_mask_weight": 1.0},
    "mask_round": {"mask_round": True},
    "guidance_rescale": {"guidance_rescale": 0.0},
    "image_cfg_scale": {"image_cfg_scale": None},
}
"""The options a drawing notes where they change it (`guidance.took_effect`), each with its fields' values off: NGMS
and Skip Early CFG where a call ran without the negative prompt, Pad conds / v0 where they padded, Extra noise where
it was added to an init latent, Conditional mask weight where an inpainting model drew (A1111's masked-picture
conditioning; its label: `infotext.uses_inpainting_conditioning`), mask_round
off where the mask kept a level rounding would have changed. A1111 writes their labels only there (NGMS, Skip Early
CFG and Pad conds as its sampler runs; Conditional mask weight only with inpainting conditioning; mask_round has
none: sdlab's Mask round), Image CFG scale where an edit model drew (A1111 sets it for edit models only), and
guidance rescale (sdlab's CFG rescale) where it rescaled a guided prediction (not under
composable diffusion, nor at a call without the negative prompt's pass)."""


def drawn_request(req: GenerationRequest, effects: set[str]) -> GenerationRequest:
    """`req` as drawn: the options of `OFF_UNLESS_DRAWN` that the drawing's `effects` (`guidance.recording_effects`)
    do not name set off, which draws the same picture, so that their labels are written only where they changed it."""
    off = {name: value for option, values in OFF_UNLESS_DRAWN.items() if option not in effects
           for name, value in values.items()}
    return replace(req, **off)


def _plain_number(value: Any) -> Any:
    """A bool, integer or real scalar of any type (NumPy's too) as a Python bool / int / float; a tuple or list
    of them element by element; anything else as it is."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, np.floating):
        return float(str(value))                 # its shortest decimal: np.float32(0.7) is 0.7, not 0.69999998...
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_plain_number(item) for item in value)
    return value


def _plain_control(control: Any) -> Any:
    """A control record (a tuple or a `ControlInput`) with its numbers plain (`_plain_number`)."""
    if is_dataclass(control) and not isinstance(control, type):
        return replace(control, **{f.name: _plain_number(getattr(control, f.name)) for f in fields(control) if f.init})
    return _plain_number(control)


def _plain_numbers(request: GenerationRequest) -> GenerationRequest:
    """`request` with every number a Python bool, int or float (NumPy scalars converted), controls included."""
    values = {f.name: _plain_number(getattr(request, f.name)) for f in fields(request)
              if f.name not in ("controls", "freeu", "deep_cache")}
    controls = tuple(_plain_control(control) for control in request.controls)
    settings = {}
    for name in ("freeu", "deep_cache"):
        setting = getattr(request, name)
        if isinstance(setting, Mapping):
            setting = {key: _plain_number(value) for key, value in setting.items()}
        elif setting is not None:
            setting = _plain_control(setting)
        settings[name] = setting
    return replace(request, **values, controls=controls, **settings)


def _checked_pag(r: GenerationRequest) -> GenerationRequest:
    """The request's PAG fields checked (scales 0..`MAX_CFG`, layers a list of regular expressions), its layers a
    tuple of stripped entries."""
    _bounded("PAG scale", r.pag_scale, 0.0, MAX_CFG)
    _bounded("PAG adaptive scale", r.pag_adaptive_scale, 0.0, MAX_CFG)
    try:
        return replace(r, pag_layers=check_layer_patterns(r.pag_layers))
    except PagLayerError as exc:
        raise RequestError(str(exc)) from None


def finite_number(name: str, value: Any) -> float:
    """`value` as a float, or a `RequestError` naming `name` unless it is a finite number: NaN, an infinity, a bool,
    another type, and an int past a float's range (JSON's 10**400, which float() cannot take) are not."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"{name} must be a finite number, got {value!r:.80}")
    try:
        number = float(value)
    except OverflowError:
        raise RequestError(f"{name} must be a finite number, got an integer past a float's range") from None
    if not math.isfinite(number):
        raise RequestError(f"{name} must be a finite number, got {value!r}")
    return number



def _bounded(name: str, value: float, low: float, high: float) -> float:
    """`value` as a float, or a `RequestError` unless it is finite and in [low, high]."""
    if not low <= finite_number(name, value) <= high:
        raise RequestError(f"{name} must lie in [{low:g}, {high:g}], got {value!r}")
    return float(value)


def _as_setting(name: str, setting: Any, kind: type) -> Any:
    """`setting` (a `kind` dataclass, or a mapping of its fields as the native API and the infotext reader give it)
    as a `kind`, or a `RequestError` naming a field `kind` lacks or another type; the request field's `name`."""
    if isinstance(setting, Mapping):
        names = [f.name for f in fields(kind)]
        unknown = sorted(set(setting) - set(names))
        if unknown:
            raise RequestError(f"{name} takes {', '.join(names)}, got {', '.join(map(str, unknown))}")
        setting = kind(**setting)
    if not isinstance(setting, kind):
        raise RequestError(f"{name} must be a {kind.__name__} setting or None, got {type(setting).__name__}")
    return setting


def check_freeu(freeu: Any) -> FreeU | None:
    """`freeu` (a `FreeU`, a mapping of its fields as the native API and the infotext reader give it, or None) as a
    `FreeU` with float factors, or a `RequestError` naming what is wrong: another field, a factor that is not finite
    or past +-`MAX_FREEU_FACTOR`, a version other than 1 or 2, an unknown convention, a step window start / end
    outside [0, 1] or with start after end."""
    if freeu is None:
        return None
    freeu = _as_setting("freeu", freeu, FreeU)
    factors = {name: _bounded(f"FreeU {name}", getattr(freeu, name), -MAX_FREEU_FACTOR, MAX_FREEU_FACTOR)
               for name in FREEU_FACTORS}
    window = {name: _bounded(f"FreeU {name}", getattr(freeu, name), 0.0, 1.0) for name in FREEU_WINDOW}
    if window["start"] > window["end"]:
        raise RequestError(f"FreeU start ({window['start']:g}) must not come after its end ({window['end']:g})")
    if isinstance(freeu.version, bool) or freeu.version not in FREEU_VERSIONS:
        raise RequestError(f"FreeU version must be 1 or 2, got {freeu.version!r}")
    if freeu.convention not in FREEU_CONVENTIONS:
        raise RequestError(f"unknown FreeU convention {freeu.convention!r}; valid: {', '.join(FREEU_CONVENTIONS)}")
    return replace(freeu, **factors, **window, version=int(freeu.version))


def check_deep_cache(deep_cache: Any) -> DeepCache | None:
    """`deep_cache` (a `DeepCache`, a mapping of its fields as the native API and the infotext reader give it, or
    None) as a `DeepCache` with int fields, or a `RequestError` naming what is wrong: another field, an interval that
    is not a whole number in 1..`MAX_DEEP_CACHE_INTERVAL`, a branch that is not a whole number >= 0 (whether the
    model has that branch is checked with the model, `generate`)."""
    if deep_cache is None:
        return None
    deep_cache = _as_setting("deep_cache", deep_cache, DeepCache)
    values = {}
    for name, low, high in (("interval", 1, MAX_DEEP_CACHE_INTERVAL), ("branch", 0, None)):
        value = getattr(deep_cache, name)
        whole = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) \
            and value == int(value)
        if not whole or value < low or (high is not None and value > high):
            span = f"{low}..{high}" if high is not None else f">= {low}"
            raise RequestError(f"DeepCache {name} must be a whole number {span}, got {value!r}")
        values[name] = int(value)
    return DeepCache(**values)


A1111_UNIPC_VARIANTS = ("bh1", "bh2")
"""A1111's uni_pc_variant choices sdlab draws (its third, "vary_coeff", it does not)."""
MAX_UNIPC_ORDER = 50                        # A1111's uni_pc_order slider: 1..50


def runs_a1111_unipc(r: GenerationRequest) -> bool:
    """Whether A1111's UniPC (`runs_a1111_timesteps`: UniPC on ddim_uniform) draws either pass of `r`: only then
    do its options (`unipc_order`, `unipc_variant`, `unipc_lower_order_final`) act. False for an unknown sampler."""
    passes = ((r.sampler, r.schedule), (r.hr_sampler, r.hr_schedule or r.schedule))
    try:
        specs = [(get_sampler(name), schedule) for name, schedule in passes if name]
    except UnknownSamplerError:
        return False
    return any(spec.a1111 == "UniPC" and runs_a1111_timesteps(spec, schedule) for spec, schedule in specs)


def _check_unipc_options(r: GenerationRequest) -> None:
    """A RequestError for A1111's UniPC options (`unipc_variant`, `unipc_order`, `unipc_lower_order_final`) that
    are not values its UniPC takes."""
    if r.unipc_variant not in A1111_UNIPC_VARIANTS:
        raise RequestError(f"UniPC variant must be one of {', '.join(A1111_UNIPC_VARIANTS)}, got {r.unipc_variant!r}")
    if not _integer(r.unipc_order) or not 1 <= r.unipc_order <= MAX_UNIPC_ORDER:
        raise RequestError(f"UniPC order must be an integer in 1..{MAX_UNIPC_ORDER}, got {r.unipc_order!r}")
    if not isinstance(r.unipc_lower_order_final, bool):
        raise RequestError(f"UniPC lower order final must be true or false, got {r.unipc_lower_order_final!r}")


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _pair(name: str, value: Any, minimum: int) -> None:
    """`value` (None: unset) as SDXL's size conditioning reads it: two integers in minimum..`MAX_SIZE_CONDITION`,
    which its float32 tensor holds (JSON's 10**400 was an OverflowError there, 10**300 an infinity)."""
    if value is None:
        return
    if not (isinstance(value, (tuple, list)) and len(value) == 2
            and all(_integer(v) and minimum <= v <= MAX_SIZE_CONDITION for v in value)):
        raise RequestError(f"{name} must be two integers in {minimum}..2**127 (height, width / top, left), "
                           f"got {value!r:.80}")


def check_sdxl_conditioning(r: GenerationRequest) -> None:
    """SDXL's size and aesthetic conditioning checked; a `RequestError` names the first bad field."""
    _bounded("aesthetic_score", r.aesthetic_score, -MAX_AESTHETIC, MAX_AESTHETIC)
    _bounded("negative_aesthetic_score", r.negative_aesthetic_score, -MAX_AESTHETIC, MAX_AESTHETIC)
    _pair("original_size", r.original_size, 1)
    _pair("target_size", r.target_size, 1)
    _pair("crops_coords_top_left", r.crops_coords_top_left, 0)
    _pair("negative_original_size", r.negative_original_size, 1)
    _pair("negative_target_size", r.negative_target_size, 1)
    _pair("negative_crops_coords_top_left", r.negative_crops_coords_top_left, 0)


DEFAULT_HR_DENOISE = 0.7                   # A1111's UI default for the hires fix's denoising strength
DEFAULT_HR_UPSCALER = "Latent"


def hires_sizes(width: int, height: int, scale: float | None, hr_width: int | None, hr_height: int | None,
                multiple: int = SIZE_MULTIPLE) -> tuple[tuple[int, int], tuple[int, int]]:
    """A1111's hires fix sizes in whole latent pixels of `multiple` pixels (its opt_f): ((width, height) the
    first pass is upscaled to, `hires_targets`' snapped down; (width, height) of the result after a centred
    crop of `(up - target) // multiple` latent pixels from the upscaled latent (A1111's truncate_x / _y), which
    keeps a target side that is not a multiple rounded up, as `sample_hr_pass` cuts)."""
    up, target = hires_targets(width, height, scale, hr_width, hr_height)
    snapped = tuple(side - side % multiple for side in up)
    final = tuple(side - multiple * ((u - t) // multiple) for side, u, t in zip(snapped, up, target))
    return snapped, final


def hires_base_size(req: GenerationRequest) -> tuple[int, int]:
    """(width, height) A1111 sizes a hires request's passes from: as asked (`hr_base_size`, where `resolve`
    snapped them; A1111 draws the first pass at their multiples of 8 but upscales from them), else the request's."""
    return req.hr_base_size or (req.width, req.height)


def hires_targets(width: int, height: int, scale: float | None, hr_width: int | None,
                  hr_height: int | None) -> tuple[tuple[int, int], tuple[int, int]]:
    """A1111's hires fix sizes as `calculate_target_resolution` computes them, unsnapped: ((hr_upscale_to_x,
    hr_upscale_to_y), the first pass's upscaled size, which also conditions SDXL's second pass; (width, height)
    of the result after a centred crop).

    hr_width / hr_height (0 or None = unset) win over `scale`: one side alone keeps the aspect ratio; both
    give the smallest size of the first pass's aspect that covers them, cropped to them. Else width * scale."""
    if hr_width or hr_height:
        if not hr_height:
            up = (hr_width, hr_width * height // width)
        elif not hr_width:
            up = (hr_height * width // height, hr_height)
        elif width / height < hr_width / hr_height:
            up = (hr_width, hr_width * height // width)
        else:
            up = (hr_height * width // height, hr_height)
        return up, (hr_width or up[0], hr_height or up[1])
    up = (int(width * scale), int(height * scale))
    return up, up


def rng_source(value: Any) -> str:
    """A random source as A1111 labels it (`RNG_SOURCES`: "CPU", "GPU", "NV") from any case; else a
    `RequestError`."""
    key = value.strip().upper() if isinstance(value, str) else value
    if key not in RNG_SOURCES:
        raise RequestError(f"unknown random source (rng) {value!r}; valid: {', '.join(RNG_SOURCES)}")
    return key


def _seed_resize(r: GenerationRequest, factor: int) -> dict[str, int]:
    """The checked "Seed resize from" sides: both 0 when either is 0 or less (off, as A1111's ``ImageRNG``), else
    integers in factor..MAX_SIDE (the noise is drawn at side // factor latent pixels)."""
    for name in ("seed_resize_from_w", "seed_resize_from_h"):
        if not _integer(getattr(r, name)):
            raise RequestError(f"{name} must be a number of pixels (0 = off), got {getattr(r, name)!r}")
    if r.seed_resize_from_w <= 0 or r.seed_resize_from_h <= 0:
        return dict(seed_resize_from_w=0, seed_resize_from_h=0)
    for name in ("seed_resize_from_w", "seed_resize_from_h"):
        if not factor <= getattr(r, name) <= MAX_SIDE:
            raise RequestError(f"{name} must lie in {factor}..{MAX_SIDE} pixels (0 = off), got {getattr(r, name)!r}")
    return dict(seed_resize_from_w=r.seed_resize_from_w, seed_resize_from_h=r.seed_resize_from_h)


def fixed_seed(seed: int | None) -> int:
    """The seed a run uses: None or -1 draw one now (A1111 `processing.get_fixed_seed`); any other is kept."""
    return random.randrange(2**32) if seed is None or seed == -1 else seed


def next_batch(request: GenerationRequest, k: int) -> GenerationRequest:
    """Batch `k` of a batch count (A1111's n_iter, `sdlab txt2img --batch-count`) after the resolved
    `request`, batch 0: its seeds (or, with a variation seed, its subseeds) continue after those of the
    batches before, as A1111 numbers `all_seeds` / `all_subseeds`; under A1111's img2img convention "latent noise"
    stays batch 0's (`latent_noise_seed`), as A1111 draws it once per job from ``all_seeds[0:batch_size]``. A hires
    seed follows the seed's rule (moves on with it, stays with it), so that hr_seed set to the seed draws as unset."""
    step = k * request.batch_size
    if request.img2img_convention in A1111_IMG2IMG and request.latent_noise_seed is None:
        request = replace(request, latent_noise_seed=request.seed)     # A1111's `init`, before its n_iter loop
    if request.subseed_strength:
        return replace(request, subseed=request.subseed + step)
    if request.hr_seed is not None:
        request = replace(request, hr_seed=request.hr_seed + step)
    return replace(request, seed=request.seed + step)


def check_batch_seeds(request: GenerationRequest, batch_count: int) -> None:
    """The seeds of `batch_count` batches of the resolved `request` (batch 0), checked before any is drawn: seed
    + 0 .. seed + batch_count x batch_size - 1 (`next_batch`; with a variation seed the subseeds, the seed
    being every picture's) must be seeds torch's generators take, else a `RequestError` as `resolve`'s for
    one batch."""
    name = "subseed" if request.subseed_strength else "seed"
    _batch_seed(name, getattr(request, name), batch_count * request.batch_size)


def _batch_seed(name: str, seed: int, batch_size: int) -> int:
    """`seed`, checked so that every image's seed + i is one torch's generators take."""
    if not MIN_SEED <= seed <= MAX_SEED - (batch_size - 1):
        raise RequestError(f"{name} {seed} + {batch_size - 1} is outside the seeds {MIN_SEED}..{MAX_SEED}")
    return seed


def _hires_base(r: GenerationRequest, asked: tuple[int, int], size: tuple[int, int],
                 multiple: int) -> tuple[int, int] | None:
    """The `hr_base_size` of a hires request asked at `asked` and drawn at `size`: the one it carries where that
    still snaps to `size` (a resolved request), else `asked` where it is not `size`; None otherwise."""
    if not r.hires:
        return None
    carried = r.hr_base_size
    if (isinstance(carried, (tuple, list)) and len(carried) == 2 and all(_integer(side) for side in carried)
            and tuple(side - side % multiple for side in carried) == size):
        return tuple(carried)
    return asked if asked != size else None


def _resolve_hires(r: GenerationRequest, width: int, height: int, multiple: int,
                   base: tuple[int, int] | None, factor: int) -> dict[str, Any]:
    """The checked hires fields (defaults filled in) of a request drawn at width x height and sized from `base`
    (`hires_base_size`)."""
    if not r.hires:
        if r.hr_upscaler is not None or r.hr_steps or r.hr_denoise is not None:
            raise RequestError("hr_upscaler, hr_steps and hr_denoise need hr_scale or hr_width / hr_height "
                               "(the hires fix)")
        given = [name for name, unset in (("hr_seed", None), ("hr_cfg_scale", None), ("hr_convention", "a1111"),
                                          ("hr_crop", "disabled")) if getattr(r, name) != unset]
        if given:
            raise RequestError(f"{', '.join(given)} {'need' if len(given) > 1 else 'needs'} hr_scale or hr_width / "
                               "hr_height (the hires fix)")
        if r.token_merging_ratio_hr != 0:
            raise RequestError(f"token_merging_ratio_hr ({r.token_merging_ratio_hr!r}) needs hr_scale or hr_width / "
                               "hr_height (the hires fix)")
        return {}
    if r.init_image is not None and r.hr_convention != "comfyui":
        raise RequestError("the hires fix is for txt2img; for img2img, upscale the init image instead, or draw "
                           "ComfyUI's two-pass graph (hr_convention comfyui)")
    if r.mask_image is not None:        # ComfyUI's graph carries the noise mask on to its second KSampler
        raise RequestError("the hires fix (hr_convention comfyui) draws from an init picture without a mask")
    for name, side in (("hr_width", r.hr_width), ("hr_height", r.hr_height)):
        if side is not None and (not _integer(side) or side < 0):
            raise RequestError(f"{name} must be a number of pixels (0 = unset), got {side!r}")
    scale = None
    if not (r.hr_width or r.hr_height):
        scale = finite_number("hr_scale", r.hr_scale)
        if scale < 1.0:
            raise RequestError(f"hr_scale must be at least 1 (the hires fix draws larger), got {r.hr_scale!r}")
    second = _second_pass_options(r)
    if r.hr_convention not in HIRES_CONVENTIONS:
        raise RequestError(f"unknown hr_convention {r.hr_convention!r}; valid: {', '.join(HIRES_CONVENTIONS)}")
    if r.hr_convention == "comfyui":
        return {**_resolve_comfyui_hires(r, width, height, scale, multiple, factor), **second}
    if r.hr_crop != "disabled":
        raise RequestError(f"hr_crop is ComfyUI's LatentUpscale crop: it needs hr_convention comfyui, got {r.hr_crop!r}")
    width, height = base or (width, height)
    _check_hires_scale(scale, width, height, multiple)
    up, final = hires_sizes(width, height, scale, r.hr_width, r.hr_height, multiple)
    _check_hires_sizes((up, final), width, height, multiple)
    steps = _hires_steps(r)
    denoise = DEFAULT_HR_DENOISE if r.hr_denoise is None else finite_number("hr_denoise", r.hr_denoise)
    if not denoise > 0.0:           # above 1 draws as 1 (A1111's min(strength, 0.999): `HIRES_IMG2IMG`)
        raise RequestError(f"hr_denoise (the second pass's denoising strength) must be above 0, got {r.hr_denoise}")
    _check_hires_schedule(r, steps, denoise, HIRES_IMG2IMG)
    upscaler = DEFAULT_HR_UPSCALER if r.hr_upscaler is None else r.hr_upscaler
    if not isinstance(upscaler, (str, os.PathLike)):
        raise RequestError(f"hr_upscaler must be a name or a file, got {upscaler!r}")
    upscaler = os.fspath(upscaler)
    try:
        upscaler = canonical_latent_name(upscaler)
    except UpscaleError:
        if upscaler.strip().lower() not in PLAIN_UPSCALERS and not os.path.isfile(upscaler):
            missing = missing_upscaler(upscaler, "beside the --from-png picture or in the current folder (sdlab "
                                                 "txt2img), or give its path")
            if missing:
                raise RequestError(missing)
            raise RequestError(
                f"unknown hires upscaler {upscaler!r}: name a latent mode ({', '.join(LATENT_UPSCALE_MODES)}), "
                "Lanczos, Nearest, or an upscaler model file that exists"
            ) from None
    return dict(hr_scale=scale, hr_width=r.hr_width or None, hr_height=r.hr_height or None, hr_upscaler=upscaler,
                hr_steps=steps, hr_denoise=denoise, hr_base_size=base, **second)


def _second_pass_options(r: GenerationRequest) -> dict[str, Any]:
    """The checked hr_seed (-1: one drawn now, as `fixed_seed`) and hr_cfg_scale of a hires request."""
    if r.hr_seed is not None and not _integer(r.hr_seed):
        raise RequestError(f"hr_seed must be an integer (-1: a random one), got {r.hr_seed!r}")
    seed = None if r.hr_seed is None else int(_batch_seed("hr_seed", fixed_seed(r.hr_seed), r.batch_size))
    cfg = None if r.hr_cfg_scale is None else _bounded("hr_cfg_scale", r.hr_cfg_scale, -MAX_CFG, MAX_CFG)
    return dict(hr_seed=seed, hr_cfg_scale=cfg)


def _resolve_comfyui_hires(r: GenerationRequest, width: int, height: int, scale: float | None,
                           multiple: int, factor: int) -> dict[str, Any]:
    """The checked hires fields of a request drawn at width x height under ComfyUI's two-pass graph
    (hr_convention "comfyui"): sizes by LatentUpscale / LatentUpscaleBy (`comfyui_hires_size`), hr_upscaler one of
    their methods (default "nearest-exact", ComfyUI's first), hr_crop one of their crops, hr_denoise in (0, 1]
    (default 1, KSampler's) by ComfyUI's denoise rule."""
    if r.hr_width is not None and r.hr_width >= MAX_SIDE + multiple or (
            r.hr_height is not None and r.hr_height >= MAX_SIDE + multiple):
        raise RequestError(f"hr_width / hr_height must lie in 0..{MAX_SIDE}")
    _check_hires_scale(scale, width, height, multiple)
    cells = comfyui_hires_size(height // factor, width // factor, scale, r.hr_width or 0, r.hr_height or 0, factor)
    size = (cells[0] * factor, cells[1] * factor)
    _check_hires_sizes((size,), width, height, multiple)
    if size[0] % multiple or size[1] % multiple:      # a VAE of factor 4: whole latent cells, not whole 8 px
        raise RequestError(f"the hires fix (hr_convention comfyui) would draw {size[0]}x{size[1]} px from "
                           f"{width}x{height} (LatentUpscale's whole latent cells of {factor} px); each side must be "
                           f"a multiple of {multiple} px: choose another hr_scale, hr_width or hr_height",
                           HIRES_SIZE)
    steps = _hires_steps(r)
    denoise = 1.0 if r.hr_denoise is None else _bounded("hr_denoise", r.hr_denoise, 0.0, 1.0)
    if denoise == 0.0:
        raise RequestError("hr_denoise (the second KSampler's denoise) must be above 0")
    _check_hires_schedule(r, steps, denoise, "comfyui")
    upscaler = COMFY_LATENT_UPSCALE_METHODS[0] if r.hr_upscaler is None else r.hr_upscaler
    if upscaler not in COMFY_LATENT_UPSCALE_METHODS:
        raise RequestError(f"hr_upscaler {upscaler!r} is not one of ComfyUI's latent upscale methods: "
                           f"{', '.join(COMFY_LATENT_UPSCALE_METHODS)}")
    if r.hr_crop not in COMFY_CROPS:
        raise RequestError(f"unknown hr_crop {r.hr_crop!r}; valid: {', '.join(COMFY_CROPS)}")
    return dict(hr_scale=scale, hr_width=r.hr_width or None, hr_height=r.hr_height or None, hr_upscaler=upscaler,
                hr_steps=steps, hr_denoise=denoise, hr_base_size=None)



def _check_hires_scale(scale: float | None, width: int, height: int, multiple: int) -> None:
    """An hr_scale that would draw past `MAX_SIDE` from width x height is refused (before any int(): 1e308 -> inf)."""
    if scale is not None and max(width, height) * scale >= MAX_SIDE + multiple:
        raise RequestError(f"hr_scale {scale:g} would draw {width * scale:.6g}x{height * scale:.6g} px from "
                           f"{width}x{height}; each side must lie in {multiple}..{MAX_SIDE}", HIRES_SIZE)


def _check_hires_sizes(sizes: tuple[tuple[int, int], ...], width: int, height: int, multiple: int) -> None:
    """Each size the hires fix draws from width x height has its sides in multiple..MAX_SIDE."""
    for size in sizes:
        if not (multiple <= min(size) and max(size) <= MAX_SIDE):
            raise RequestError(f"the hires fix would draw {size[0]}x{size[1]} px from {width}x{height}; "
                               f"each side must lie in {multiple}..{MAX_SIDE}", HIRES_SIZE)


def _hires_steps(r: GenerationRequest) -> int:
    """The checked hr_steps (0: the first pass's)."""
    steps = r.hr_steps or 0
    if not _integer(steps) or not 0 <= steps <= MAX_STEPS:
        raise RequestError(f"hr_steps must be an integer in 0..{MAX_STEPS} (0 = the first pass's), got {r.hr_steps!r}")
    return steps


def _check_hires_schedule(r: GenerationRequest, steps: int, denoise: float, rule: str) -> None:
    """The second pass's schedule (`steps_run` under the img2img `rule`) stays within `MAX_SCHEDULE`."""
    total, _ = steps_run(steps or r.steps, denoise, rule)
    if total > MAX_SCHEDULE:
        raise RequestError(f"{steps or r.steps} hires steps at hr_denoise {denoise} make a {total}-step schedule; "
                           f"the limit is {MAX_SCHEDULE}: raise hr_denoise")

def _schedule_asked(name: str | None) -> str | None:
    """sdlab's name of a schedule asked for by sdlab's or A1111's name ("SGM Uniform"); "Automatic" or unset: None."""
    try:
        return schedule_from_a1111(name) if name else None
    except ValueError as err:
        raise RequestError(str(err).replace("scheduler", "schedule", 1)) from None


_SAME = ("", "Use same sampler", "Use same scheduler")          # A1111's UI choices of the first pass's


def _resolve_hires_pass(r: GenerationRequest, spec: SamplerSpec, schedule: str, asked: str | None,
                        default_schedule: str) -> dict[str, Any]:
    """The checked sampler, schedule and prompts of a hires request's second pass, each None / "" where it is the
    first pass's (`spec`, drawn on `schedule`, asked as `asked`): A1111's `hr_sampler_name or sampler_name` and
    `hr_scheduler`, which is the first pass's scheduler as asked when unset ("Automatic": the sampler's own); a
    hires prompt that is the first pass's once both are compared as drawn (`_as_compared`) is "", so SDXL's
    prompt_2 stays the second pass's (A1111's comments script strips the comments before it compares them)."""
    names = ("hr_sampler", "hr_schedule", "hr_prompt", "hr_negative_prompt")
    if not r.hires:
        given = [name for name in (*names, "hr_eta") if getattr(r, name) not in (None, "")]
        if given:
            raise RequestError(f"{', '.join(given)} {'need' if len(given) > 1 else 'needs'} hr_scale or hr_width / "
                               "hr_height (the hires fix)")
        return {}
    for name in names:
        if not isinstance(getattr(r, name), (str, type(None))):
            raise RequestError(f"{name} must be text, got {type(getattr(r, name)).__name__}")
    second = spec
    if r.hr_sampler not in (None, *_SAME):
        try:
            second = get_sampler(r.hr_sampler)
        except ValueError as err:
            raise RequestError(f"hr_sampler: {err}") from None
    eta = r.eta if r.hr_eta is None else _bounded("hr_eta", r.hr_eta, 0.0, MAX_ETA)
    if eta is not None and second.max_eta is not None and eta > second.max_eta:
        raise RequestError(f"{second.name} (the hires sampler) takes eta in [0, {second.max_eta:g}], got {eta}")
    hr_asked = asked if r.hr_schedule in (None, *_SAME) else _schedule_asked(r.hr_schedule)
    hr_schedule = hr_asked or second.default_schedule or default_schedule
    prompts = {}
    for name, first in (("hr_prompt", r.prompt), ("hr_negative_prompt", r.negative_prompt)):
        text = getattr(r, name) or ""
        if len(text) > MAX_PROMPT_CHARS:
            raise RequestError(f"{name} is {len(text)} characters long; the limit is {MAX_PROMPT_CHARS}")
        prompts[name] = "" if _as_compared(text) == _as_compared(first) else text
    return dict(hr_sampler=None if second.name == spec.name else second.name,
                hr_schedule=None if hr_schedule == schedule else hr_schedule, **prompts)


def _as_compared(prompt: str) -> str:
    """`prompt` without its comments (`prompt_syntax.strip_comments`, which imports this module) and its whitespace
    collapsed, as the CLIP tokenizer reads it (`whitespace_clean`): the space a load-LoRA's tag left behind
    (`infotext.drawn_hires_prompt`) makes no other prompt."""
    from sdlab.pipeline.prompt_syntax import strip_comments
    return " ".join(strip_comments(prompt).split())


def _check_area_prompts(r: GenerationRequest, width: int, height: int, factor: int) -> None:
    """Area prompts (`comfy_prompt.check_area_prompts`) of a single pass: not with the hires fix, whose second
    pass would need them at its size."""
    if not r.area_prompts:
        return
    try:
        check_area_prompts(r.area_prompts, width, height, factor)
    except ValueError as err:
        raise RequestError(str(err)) from None
    if r.hr_scale is not None or r.hr_width is not None or r.hr_height is not None:
        raise RequestError("area prompts are drawn in one pass; the hires fix is not drawn with them")


def _check_latent_mask(r: GenerationRequest, size: tuple[int, int]) -> None:
    """A latent mask goes with a mask, the whole picture drawn, at the size drawn (A1111 fills the picture by it
    at that size, `masking.fill`)."""
    if r.latent_mask_image is None:
        return
    if not isinstance(r.latent_mask_image, Image.Image):
        raise _not_a_picture("latent mask", r.latent_mask_image)
    if r.mask_image is None or r.inpaint_only_masked:
        raise RequestError("a latent mask goes with a mask, inpainting the whole picture (not 'Only masked')")
    if r.latent_mask_image.size != size:
        raise RequestError(f"the latent mask is {r.latent_mask_image.width}x{r.latent_mask_image.height}; it must be "
                           f"the size drawn, {size[0]}x{size[1]}")


def _check_picture_options(r: GenerationRequest) -> None:
    """The img2img / inpainting options A1111 names Resize mode, Masked content and Inpaint area."""
    if r.resize_mode not in RESIZE_MODES:
        raise RequestError(f"unknown resize mode {r.resize_mode!r}; valid: {', '.join(RESIZE_MODES)}")
    if r.inpaint_fill not in INPAINT_FILLS:
        raise RequestError(f"unknown masked content {r.inpaint_fill!r}; valid: {', '.join(INPAINT_FILLS)}")
    if not _integer(r.mask_grow) or not 0 <= r.mask_grow <= MAX_MASK_GROW:
        raise RequestError(f"mask_grow must be a number of pixels in 0..{MAX_MASK_GROW}, got {r.mask_grow!r}")
    if not isinstance(r.inpaint_only_masked, bool):
        raise RequestError(f"inpaint_only_masked must be True or False, got {r.inpaint_only_masked!r}")
    if not _integer(r.inpaint_padding) or not 0 <= r.inpaint_padding <= MAX_SIDE:
        raise RequestError(f"inpaint_padding must be a number of pixels in 0..{MAX_SIDE}, got {r.inpaint_padding!r}")


def _with_init_images(r: GenerationRequest) -> GenerationRequest:
    """`r` with its several init pictures checked (pictures, at most one per picture of the batch: A1111's
    "bad number of images passed"; of several sizes only where they can be drawn at one) and `init_image` the
    first of them."""
    if not isinstance(r.init_images, (list, tuple)):
        raise RequestError(f"init_images must be a list of pictures, got {type(r.init_images).__name__}")
    if not r.init_images:
        return r
    for image in r.init_images:
        if not isinstance(image, Image.Image):
            raise _not_a_picture("init image", image)
    if len(r.init_images) > r.batch_size:
        raise RequestError(f"{len(r.init_images)} init images for a batch of {r.batch_size}: "
                           "one init image per picture at most")
    r = replace(r, init_images=tuple(r.init_images), init_image=r.init_images[0])
    sizes = {image.size for image in r.init_images}
    if len(sizes) > 1:
        _check_several_sizes(r, sizes)
    return r


def _check_several_sizes(r: GenerationRequest, sizes: set[tuple[int, int]]) -> None:
    """Init pictures of several `sizes` are each brought to width x height (A1111's
    `StableDiffusionProcessingImg2Img.init`: resize modes "resize", "crop", "fill", or "Only masked"'s crop of
    each), so the request must name that size; "latent" keeps each picture's own size, which one batch
    cannot hold (A1111 fails there too), unless "Only masked" crops them (`check_one_size` checks the blank
    mask's case)."""
    listed = ", ".join(f"{w}x{h}" for w, h in sorted(sizes))
    if _size_of_init(r) and (r.width is None or r.height is None):
        raise RequestError(f"init images of several sizes ({listed}) need width and height, the size to draw "
                           "them all at; an unset side is the first init image's")
    if r.resize_mode == "latent" and not (r.mask_image is not None and r.inpaint_only_masked):
        check_one_size(sizes)


def check_one_size(sizes: set[tuple[int, int]]) -> None:
    """The pictures the resize mode "latent" encodes at their own `sizes` must share one."""
    if len(sizes) > 1:
        listed = ", ".join(f"{w}x{h}" for w, h in sorted(sizes))
        raise RequestError(f"resize mode 'latent' encodes each init image at its own size, and these differ "
                           f"({listed}): use resize mode 'resize', 'crop' or 'fill', or init images of one size")


def _size_of_init(request: GenerationRequest) -> bool:
    """Whether an unset side is the init image's (img2img / inpainting under the "diffusers" size convention)."""
    return request.init_image is not None and request.size_convention == "diffusers"


def requested_size(request: GenerationRequest, default_size: int | None) -> tuple[Any, Any]:
    """(width, height) as `request` asks for them, unchecked: an unset side is the init image's (img2img /
    inpaint under the "diffusers" size convention), else `default_size`."""
    width, height = request.width, request.height
    if _size_of_init(request):
        width = request.init_image.width if width is None else width
        height = request.init_image.height if height is None else height
    return (default_size if width is None else width), (default_size if height is None else height)


def img2img_convention_for(r: GenerationRequest, spec: SamplerSpec, schedule: str, guidance_embedding: bool,
                           comfyui: bool) -> str:
    """The img2img convention `r` runs under: the one it names, except diffusers' for a model with a guidance
    embedding (a full LCM model) drawn by the LCM sampler (`spec`, diffusers' LCMScheduler) on its grid (a
    diffusers spacing `schedule`) without a mask: diffusers draws such a model with
    `LatentConsistencyModelImg2ImgPipeline`, whose LCMScheduler takes the strength itself ("lcm",
    `discretization.steps_run`). "lcm" does not inpaint. A sampler spelt as ComfyUI spells it (`comfyui`) asks for
    ComfyUI's denoise (`img2img_convention_asked`)."""
    r = replace(r, img2img_convention=img2img_convention_asked(r.img2img_convention, comfyui))
    if r.img2img_convention == "lcm" and r.mask_image is not None:
        raise RequestError("the lcm img2img convention (LatentConsistencyModelImg2ImgPipeline's) does not inpaint; "
                           "use diffusers, a1111 or comfyui")
    if r.mask_grow and r.mask_image is not None and r.img2img_convention != "comfyui":
        raise RequestError("mask_grow is ComfyUI's VAEEncodeForInpaint rule: it needs the comfyui img2img convention "
                           "(or a sampler spelt as ComfyUI spells it)")
    if (guidance_embedding and r.img2img_convention == "diffusers" and r.mask_image is None
            and spec.name == "LCM" and schedule in SPACINGS):
        return "lcm"
    return r.img2img_convention


def sampler_init_noise(spec: SamplerSpec, schedule: str) -> str | None:
    """The start noise `spec` on `schedule` brings with it, which an unset init_noise resolves to and no text
    labels: A1111's timestep samplers' unit noise as a VP latent ("vp", `runs_a1111_timesteps`); None where the
    schedule's convention decides (`discretization.default_init_noise`)."""
    return "vp" if runs_a1111_timesteps(spec, schedule) else None


def implied_init_noise(spec: SamplerSpec, schedule: str, comfyui: bool) -> str:
    """The start noise an unset init_noise resolves to for `spec` on `schedule`: the one the sampler brings
    (`sampler_init_noise`), else the schedule's convention (`discretization.default_init_noise`; `comfyui`: under
    ComfyUI's conventions, its KSampler rule "comfyui" on a schedule not named the diffusers way)."""
    return sampler_init_noise(spec, schedule) or default_init_noise(schedule, spec.spacing, comfyui=comfyui)


def sgm_noise_multiplied(r: GenerationRequest, spec: SamplerSpec) -> bool:
    """Whether A1111's SGM noise multiplier scales the request's start noise: txt2img (the hires fix's first pass)
    with a k-diffusion sampler, whose `KDiffusionSampler.sample` starts at noise * sqrt(1 + sigmas[0]^2); its
    img2img (`sample_img2img`) and its timestep samplers (DDIM, PLMS, UniPC) leave the noise as it is."""
    return (r.sgm_noise_multiplier and r.init_image is None and not r.init_images
            and spec.a1111 not in A1111_TIMESTEP_SAMPLERS)


def _emphasis_mode(mode: Any) -> str:
    """The emphasis mode of `mode`, any case (`PROMPT_EMPHASIS`); a RequestError listing them otherwise."""
    by_key = {name.lower(): name for name in PROMPT_EMPHASIS}
    if not isinstance(mode, str) or mode.strip().lower() not in by_key:
        raise RequestError(f"unknown emphasis mode {mode!r}; valid: {', '.join(PROMPT_EMPHASIS)}")
    return by_key[mode.strip().lower()]


def default_ensd(comfyui: bool, spec: SamplerSpec, eta: float | None) -> int:
    """The ENSD of a request that sets none: 1 for a sampler spelt as ComfyUI spells it (`comfyui`, the name asked
    for) that draws Gaussian step noise at `eta` (`SamplerSpec.draws_step_noise`; ComfyUI's
    `default_noise_sampler`, seeded seed + 1), else 0: the step noise continues the seeds' generators."""
    return 1 if comfyui and spec.draws_step_noise(eta) else 0


def img2img_convention_asked(convention: str, comfyui: bool) -> str:
    """The img2img convention a request asks for: the one it names, `convention`, or ComfyUI's ("comfyui", its
    `denoise`) where it names diffusers' (the default) and its sampler is spelt as ComfyUI spells it (`comfyui`,
    module docstring)."""
    return "comfyui" if comfyui and convention == "diffusers" else convention


def resolve(
    request: GenerationRequest,
    *,
    default_size: int,
    default_sampler: str,
    default_schedule: str,
    factor: int,
    default_cfg: float = 7.0,
    default_steps: int = 20,
    guidance_embedding: bool = False,
) -> GenerationRequest:
    """Fill defaults and validate; raises `RequestError` with one clear message per problem.

    `factor` is the VAE's downsampling factor; sizes snap to multiples of lcm(8, factor) (module docstring).
    `guidance_embedding`: the model takes the CFG scale as an input (a full LCM model), whose img2img under
    diffusers' convention is diffusers' own pipeline for it (`img2img_convention_for`).
    """
    request = _plain_numbers(request)
    r = request if request.steps is not None else replace(request, steps=default_steps)
    texts = (("prompt", r.prompt), ("negative prompt", r.negative_prompt), ("prompt_2", r.prompt_2),
             ("negative_prompt_2", r.negative_prompt_2))
    for name, text in texts:
        if not isinstance(text, str):
            several = "; one prompt a request (batch_size draws several pictures of it)" if isinstance(text, (list, tuple)) else ""
            raise RequestError(f"the {name} must be text, got {type(text).__name__}{several}")
    for name, text in texts:
        if len(text) > MAX_PROMPT_CHARS:
            raise RequestError(f"the {name} is {len(text)} characters long; the limit is {MAX_PROMPT_CHARS}")
    if not _integer(r.steps) or not 1 <= r.steps <= MAX_STEPS:
        raise RequestError(f"steps must be an integer in 1..{MAX_STEPS}, got {r.steps!r}")
    if not _integer(r.batch_size) or not 1 <= r.batch_size <= MAX_BATCH:
        raise RequestError(f"batch size must be an integer in 1..{MAX_BATCH}, got {r.batch_size!r}")
    if r.first_pass_steps is not None and (not _integer(r.first_pass_steps) or r.first_pass_steps < 1):
        raise RequestError(f"first_pass_steps must be an integer >= 1, got {r.first_pass_steps!r}")
    if not _integer(r.clip_skip) or r.clip_skip < 1:
        raise RequestError(f"clip skip must be an integer >= 1, got {r.clip_skip!r}")
    if r.clip_skip_convention not in CLIP_SKIP_CONVENTIONS:
        raise RequestError(f"unknown clip skip convention {r.clip_skip_convention!r}; valid: "
                           f"{', '.join(CLIP_SKIP_CONVENTIONS)}")
    if not isinstance(r.sdxl_clip_l_skip, bool):
        raise RequestError(f"sdxl_clip_l_skip must be True or False, got {r.sdxl_clip_l_skip!r}")
    if r.sdxl_clip_l_skip and r.clip_skip_convention != "a1111":
        raise RequestError("sdxl_clip_l_skip is A1111's Clip skip SDXL option: it needs clip_skip_convention "
                           "'a1111' (under 'diffusers' clip skip moves both SDXL encoders back)")
    r = replace(r, emphasis=_emphasis_mode(r.emphasis))
    for name in ("old_prompt_editing", "downcast_alphas_cumprod", "zero_terminal_snr"):
        if not isinstance(getattr(r, name), bool):
            raise RequestError(f"{name} must be True or False, got {getattr(r, name)!r}")
    if r.downcast_alphas_cumprod and r.zero_terminal_snr:
        raise RequestError("downcast_alphas_cumprod and zero_terminal_snr cannot be used together: zero terminal "
                           "SNR on float16 alphas_cumprod gives infinite sigmas (A1111 draws NaN there)")
    if r.size_convention not in SIZE_CONVENTIONS:
        raise RequestError(f"unknown size convention {r.size_convention!r}; valid: {', '.join(SIZE_CONVENTIONS)}")
    if r.control_convention not in CONTROL_CONVENTIONS:
        raise RequestError(f"unknown ControlNet step convention {r.control_convention!r}; valid: "
                           f"{', '.join(CONTROL_CONVENTIONS)}")
    if r.batch_noise not in BATCH_NOISE:
        raise RequestError(f"unknown batch noise {r.batch_noise!r}; valid: {', '.join(BATCH_NOISE)}")
    if r.eta_noise_seed_delta is not None and (
            not _integer(r.eta_noise_seed_delta) or not 0 <= r.eta_noise_seed_delta <= MAX_SEED):
        raise RequestError(f"eta noise seed delta (ENSD) must be an integer in 0..{MAX_SEED}, "
                           f"got {r.eta_noise_seed_delta!r}")
    cfg_scale = _bounded("CFG scale", default_cfg if r.cfg_scale is None else r.cfg_scale, -MAX_CFG, MAX_CFG)
    _bounded("guidance rescale", r.guidance_rescale, 0.0, 1.0)
    r = _checked_pag(r)
    _bounded("s_min_uncond (NGMS)", r.s_min_uncond, 0.0, math.inf)
    _bounded("skip_early_cond (Skip Early CFG)", r.skip_early_cond, 0.0, 1.0)
    _bounded("s_noise", r.s_noise, 0.0, MAX_ETA)
    _bounded("s_churn", r.s_churn, 0.0, MAX_CHURN)
    _check_unipc_options(r)
    _bounded("s_tmin", r.s_tmin, 0.0, math.inf)
    if r.s_tmax is not None:
        _bounded("s_tmax", r.s_tmax, 0.0, math.inf)
        if r.s_tmax == 0:                   # A1111's s_tmax 0: no upper end (`Sampler.initialize`)
            r = replace(r, s_tmax=None)
    for name in ("schedule_sigma_min", "schedule_sigma_max", "schedule_rho"):
        _bounded(name, getattr(r, name), 0.0, math.inf)
    _bounded("mask blur", r.mask_blur, 0.0, MAX_MASK_BLUR)
    if r.mask_blur_y is not None:
        _bounded("mask blur y", r.mask_blur_y, 0.0, MAX_MASK_BLUR)
    _bounded("noise multiplier", r.noise_multiplier, 0.0, MAX_NOISE_MULTIPLIER)
    _bounded("extra noise", r.extra_noise, 0.0, MAX_NOISE_MULTIPLIER)
    _bounded("inpainting mask weight", r.inpainting_mask_weight, 0.0, 1.0)
    for name in ("token_merging_ratio", "token_merging_ratio_hr"):
        if not 0.0 <= finite_number(name, getattr(r, name)) < 1.0:
            raise RequestError(f"{name} must lie in [0, 1) (the fraction of tokens merged), got {getattr(r, name)!r}")
    if r.image_cfg_scale is not None:
        _bounded("image CFG scale", r.image_cfg_scale, 0.0, MAX_CFG)
    for name in ("beta_alpha", "beta_beta"):
        if _bounded(name, getattr(r, name), 0.0, MAX_BETA) == 0:
            raise RequestError(f"{name} must be above 0 (a Beta distribution's parameter), got 0")
    if not isinstance(r.sgm_noise_multiplier, bool):
        raise RequestError(f"sgm_noise_multiplier must be True or False, got {r.sgm_noise_multiplier!r}")
    if not isinstance(r.old_karras_sigmas, bool):
        raise RequestError(f"old_karras_sigmas must be True or False, got {r.old_karras_sigmas!r}")
    if not isinstance(r.invert_mask, bool):
        raise RequestError(f"invert_mask must be True or False, got {r.invert_mask!r}")
    if not isinstance(r.mask_round, bool):
        raise RequestError(f"mask_round must be True or False, got {r.mask_round!r}")
    for name in ("hr_upscaler_tile", "hr_upscaler_tile_overlap"):
        if not _integer(getattr(r, name)) or getattr(r, name) < 0:
            raise RequestError(f"{name} must be an integer >= 0, got {getattr(r, name)!r}")
    if tile_too_small(r.hr_upscaler_tile):
        raise RequestError(f"hr_upscaler_tile {r.hr_upscaler_tile} is too small; use {MIN_TILE} or more pixels "
                           "(0 = no tiles)")
    overlap_limit = tile_overlap_limit(r.hr_upscaler_tile, r.hr_upscaler_tile_overlap)
    if overlap_limit is not None:
        raise RequestError(f"hr_upscaler_tile_overlap must be at most half of hr_upscaler_tile: "
                           f"{r.hr_upscaler_tile_overlap} with a tile of {r.hr_upscaler_tile} "
                           f"(at most {overlap_limit})")
    if r.tiled_vae is not None and not isinstance(r.tiled_vae, bool):
        raise RequestError(f"tiled_vae must be True, False or None (tile large pictures), got {r.tiled_vae!r}")
    if not isinstance(r.paste_back, bool):
        raise RequestError(f"paste_back must be True or False, got {r.paste_back!r}")
    if r.zero_empty_negative is not None and not isinstance(r.zero_empty_negative, bool):
        raise RequestError(f"zero_empty_negative must be True, False or None (the model's rule), "
                           f"got {r.zero_empty_negative!r}")
    if not isinstance(r.tiling, bool):
        raise RequestError(f"tiling must be True or False, got {r.tiling!r}")
    if r.tiling and r.tiled_vae:
        raise RequestError("a tiling picture's edges wrap around, which a tiled VAE cannot draw (each tile would "
                           "wrap on itself); leave tiled_vae unset: the VAE then decodes the whole picture")
    check_sdxl_conditioning(r)
    if r.seed is not None and not _integer(r.seed):
        raise RequestError(f"seed must be an integer (or None / -1 for a random one), got {r.seed!r}")
    if r.subseed is not None and not _integer(r.subseed):
        raise RequestError(f"subseed must be an integer (or None / -1 for a random one), got {r.subseed!r}")
    if r.latent_noise_seed is not None and not _integer(r.latent_noise_seed):
        raise RequestError(f"latent_noise_seed must be an integer (or None: the seed), got {r.latent_noise_seed!r}")
    if not 0.0 <= finite_number("subseed_strength", r.subseed_strength) <= 1.0:
        raise RequestError(f"subseed_strength (variation strength) must lie in [0, 1], got {r.subseed_strength}")
    rng = rng_source(r.rng)
    seed_resize = _seed_resize(r, factor)
    if r.eta is not None:
        _bounded("eta", r.eta, 0.0, MAX_ETA)
    if not isinstance(r.sampler, (str, type(None))) or not isinstance(r.schedule, (str, type(None))):
        raise RequestError(f"sampler and schedule must be names (text), got {r.sampler!r} and {r.schedule!r}")
    sampler = r.sampler or default_sampler
    try:
        spec = get_sampler(sampler)
    except ValueError as err:
        raise RequestError(str(err)) from None
    if r.eta is not None and spec.max_eta is not None and r.eta > spec.max_eta:
        raise RequestError(f"{spec.name} takes eta in [0, {spec.max_eta:g}], got {r.eta}")
    asked_schedule = _schedule_asked(r.schedule)
    schedule = asked_schedule or spec.default_schedule or default_schedule      # LCM, TCD: their own grid
    comfyui = r.sampler is not None and comfyui_spelling(r.sampler)       # ComfyUI's conventions (module docstring)
    init_noise = r.init_noise
    if init_noise is None:
        init_noise = implied_init_noise(spec, schedule, comfyui)
    if sgm_noise_multiplied(r, spec):
        if r.init_noise not in (None, "vp"):
            raise RequestError(f"the SGM noise multiplier starts from init_noise 'vp', not {r.init_noise!r}")
        init_noise = "vp"
    if init_noise not in INIT_NOISE_CONVENTIONS:
        raise RequestError(f"unknown initial-noise convention {r.init_noise!r}; valid: {', '.join(INIT_NOISE_CONVENTIONS)}")
    if r.eta_noise_seed_delta is None:
        r = replace(r, eta_noise_seed_delta=default_ensd(comfyui, spec, r.eta))
    if r.zero_empty_negative is None and comfyui:
        r = replace(r, zero_empty_negative=False)                       # ComfyUI's CLIPTextEncode encodes ""
    if r.img2img_convention not in IMG2IMG_CONVENTIONS:
        raise RequestError(
            f"unknown img2img convention {r.img2img_convention!r}; valid: {', '.join(IMG2IMG_CONVENTIONS)}"
        )
    r = replace(r, img2img_convention=img2img_convention_for(r, spec, schedule, guidance_embedding, comfyui))
    r = _with_init_images(r)
    if r.init_image is None and r.mask_image is not None:
        raise RequestError("a mask needs an init image to inpaint")
    _check_picture_options(r)
    for what, image in (("init image", r.init_image), ("mask", r.mask_image)):
        if image is not None and not isinstance(image, Image.Image):   # `input_image` reads paths
            raise _not_a_picture(what, image)
    if r.init_image is not None:
        finite_number("strength", r.strength)
        try:
            total, _ = steps_run(r.steps, r.strength, r.img2img_convention)
        except ValueError as err:       # out of range, or so low that no step runs
            hint = "; raise the strength or the steps" if "runs no step" in str(err) else ""
            raise RequestError(f"{err}{hint}") from None
        if total > MAX_SCHEDULE:
            raise RequestError(
                f"{r.steps} steps at strength {r.strength} make a {total}-step schedule under the "
                f"{r.img2img_convention} convention; the limit is {MAX_SCHEDULE}: raise the strength"
            )

    width, height = requested_size(r, default_size)
    multiple = math.lcm(SIZE_MULTIPLE, factor)
    for name, side in (("width", width), ("height", height)):
        if not _integer(side) or not multiple <= side <= MAX_SIDE:
            taken = (f" (the init image's {name}, as the {name} was not given: set width and height to draw it at "
                     "another size)") if getattr(r, name) is None and _size_of_init(r) else ""
            raise RequestError(f"{name} must be an integer in {multiple}..{MAX_SIDE}, got {side!r}{taken}")
    asked = (width, height)
    width, height = snap_size(width, height, multiple)
    _check_latent_mask(r, (width, height))
    if r.mask_image is not None and r.resize_mode == "latent" and not r.inpaint_only_masked and (
            (width, height) != r.init_image.size):
        raise RequestError(
            f"resize mode 'latent' cannot inpaint a {r.init_image.width}x{r.init_image.height} picture at "
            f"{width}x{height}: the mask and the picture pasted back are pixels, not latents (A1111 fails there "
            "too); draw at the picture's size, or use resize mode 'resize', 'crop' or 'fill'"
        )
    seed = _batch_seed("seed", fixed_seed(r.seed), r.batch_size)
    subseed = _batch_seed("subseed", fixed_seed(r.subseed), r.batch_size) if r.subseed_strength else None
    if r.latent_noise_seed is not None:
        _batch_seed("latent_noise_seed", r.latent_noise_seed, r.batch_size)
    _check_area_prompts(r, width, height, factor)
    hires = _resolve_hires(r, width, height, multiple, _hires_base(r, asked, (width, height), multiple), factor)
    hires.update(_resolve_hires_pass(r, spec, schedule, asked_schedule, default_schedule))
    init_images = tuple(on_white(image) for image in r.init_images)
    init_image = init_images[0] if init_images else None if r.init_image is None else on_white(r.init_image)
    return replace(
        r, sampler=spec.name, schedule=schedule, cfg_scale=cfg_scale, init_noise=init_noise,
        width=width, height=height, seed=int(seed), subseed=None if subseed is None else int(subseed), rng=rng,
        **seed_resize, **hires,
        init_image=init_image, init_images=init_images,
        tiled_vae=False if r.tiling else r.tiled_vae, freeu=check_freeu(r.freeu),
        deep_cache=check_deep_cache(r.deep_cache),
    )
