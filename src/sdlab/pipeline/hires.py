"""The hires fix (A1111's txt2img "Hires. fix"): draw small, upscale, redraw the larger picture with img2img.

    first pass   the txt2img request at its width x height (the plan's)
    upscale      to `request.hires_sizes`' upscaled size, then a centred crop (whole latent pixels) to the final size
                 - a latent upscaler ("Latent", "Latent (bicubic)", ...): the first pass's latent interpolated
                   (`upscale_latent`); the second pass starts from it, noised at the img2img start level
                 - a pixel upscaler ("Lanczos", "Nearest", an ESRGAN-family file): the first pass's pictures
                   (8-bit, as `generate` returns them) resized as A1111's `resize_image` does (`resize_image`:
                   the upscaler runs only when the size grows, so a scale-1 pass starts from the first
                   pass's own pictures; a model runs in tiles of `hr_upscaler_tile`, A1111's ESRGAN_tile)
                   to A1111's upscaled size unsnapped (`upscaled_to`); the VAE encodes them (the posterior
                   mean), keeping floor(side / f) latent pixels, the top-left ones
    second pass  img2img at the final size with strength `hr_denoise` and `hr_steps` steps (0: the first pass's),
                 SDXL conditioned on the upscaled size before the crop (A1111's `hr_upscale_to_x` / `_y`), a
                 9-channel inpainting model at a Conditional mask weight below 1 on the upscaled pictures
                 (`_conditions_on_pictures`),
                 all of which run on a schedule stretched to steps / min(hr_denoise, 0.999): A1111 hands the
                 second pass its step count, which takes its "img2img_fix_steps" path (sdlab's "a1111_fix_steps"
                 convention, `HIRES_IMG2IMG`): hr_denoise above 1 draws as 1, and the SDE samplers' Brownian
                 tree spans the whole stretched schedule (A1111's `create_noise_sampler` of `get_sigmas`)

ComfyUI's two-pass graph (hr_convention "comfyui": KSampler -> LatentUpscale / LatentUpscaleBy -> KSampler): the
upscaled size is the final one (LatentUpscale's pixel rule for hr_width / hr_height, LatentUpscaleBy's rounding for
hr_scale: `comfyui_hires_size`), the first pass's latent upscaled as the VAE's latents by ComfyUI's method and crop
(`comfyui_upscale_latent`, hr_upscaler / hr_crop), no crop box; the first pass is txt2img (an EmptyLatentImage)
or img2img at the request's strength (a VAEEncode: the KSampler's denoise; no mask); the second pass is the second
KSampler: its own seed (`hr_seed`) and CFG (`hr_cfg_scale`), its denoise rule (img2img convention "comfyui":
int(steps / denoise) sigmas, the last steps + 1 run) from the upscaled latent + its seed's noise at the first of its
sigmas, its step noise from its seed + 1 (`_second_pass_ensd`).

Seeds: A1111 draws the second pass's noise from fresh generators on the same seeds and subseeds
(`sample_hr_pass`: a new `ImageRNG`, whose first draw is the noise and whose later draws are the step
noise). Both upscaler kinds therefore end in the same run: `second_pass_request` started `from_latent` on
the upscaled latent, so the noise is each generator's first draw. A1111 samples the posterior of the
upscaled pictures from its global random state, apart from the seeds' generators; sdlab takes the
posterior mean and so draws nothing there. A pixel upscale differs from A1111 in one small way: the first
pass's pictures are rounded to 8 bits (A1111 truncates).

Stops (`SamplingStopped`, from `progress` or from `stop`, A1111's interrupt and skip): an interrupt in the first pass
or before the upscaler ends with the first pass's pictures at its size (A1111's `sample_hr_pass` returns them); one
after the upscaler, or a skip (in the first pass too: A1111 checks for no skip before the upscaler), ends with the
upscaled pictures at the final size, no second-pass step taken (A1111's second pass stops at its first model call
and returns its init latent); one in the second pass with the second pass's pictures.
"""

from __future__ import annotations

import dataclasses
import math
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from sdlab.checkpoints.upscaler import Upscaler, load_upscaler
from sdlab.diffusion.guidance import recording_effects
from sdlab.diffusion.samplers import get_sampler
from sdlab.families.loaded import ModelBundle
from sdlab.pipeline.comfy_latent_upscale import comfyui_hires_size, comfyui_upscale_latent
from sdlab.pipeline.control import at_first_pass_resolution
from sdlab.pipeline.generate import (
    ProgressFn,
    SamplingStopped,
    decode_latents,
    encode_image,
    generate,
    pictures_if_stopped,
    sample_latents,
    tiling_padding,
)
from sdlab.pipeline.images import pil_to_tensor, pil_to_unit_tensor, tensor_to_pil, unit_pixels
from sdlab.pipeline.plan import GenerationPlan, make_plan
from sdlab.pipeline.prompt_loras import LoraUse, patcher_for
from sdlab.pipeline.request import (
    HIRES_IMG2IMG,
    SIZE_MULTIPLE,
    GenerationRequest,
    default_ensd,
    GenerationResult,
    implied_init_noise,
    drawn_request,
    hires_base_size,
    hires_sizes,
    hires_targets,
)
from sdlab.pipeline.upscale import (
    LATENT_UPSCALE_MODES,
    PLAIN_UPSCALERS,
    UpscaleError,
    a1111_upscaler_name,
    a1111_upscaler_stem,
    canonical_latent_name,
    resize_image,
    upscale_latent,
)

__all__ = ["find_upscaler", "generate_hires", "hires_steps", "hires_upscaler", "is_latent_upscaler", "second_pass_request", "upscaler_name"]

logger = logging.getLogger(__name__)


def is_latent_upscaler(name: str) -> bool:
    """Whether a resolved `hr_upscaler` is one of A1111's latent modes."""
    return name in LATENT_UPSCALE_MODES


def upscaler_name(name: str) -> str:
    """What the parameters call a resolved `hr_upscaler`: a model file by A1111's name of it (`a1111_upscaler_name`:
    its own name of a file it downloads, else the stem), else the name."""
    if is_latent_upscaler(name) or not os.path.isfile(name):
        return name
    return a1111_upscaler_name(os.path.splitext(os.path.basename(name))[0])


def hires_upscaler(req: GenerationRequest, bundle: ModelBundle) -> Upscaler | str:
    """The resolved request's upscaler: its name (a latent mode, "Lanczos", "Nearest") or the network of its file,
    read safely on the bundle's device in the upscaler's own ``auto`` dtype (fp32, as `sdlab upscale` runs it,
    whatever the model's; a bad file is a `CheckpointError`)."""
    name = req.hr_upscaler
    if req.hr_convention == "comfyui" or is_latent_upscaler(name) or not os.path.isfile(name):
        return name
    return load_upscaler(name, device=bundle.device)


def second_pass_request(req: GenerationRequest, factor: int) -> GenerationRequest:
    """The img2img request of the second pass (run `from_latent`) of a resolved hires request: the final size,
    `hr_steps` (or the first pass's) steps at strength `hr_denoise`, the hires sampler, schedule, eta and prompts
    where set (A1111's `sample_hr_pass` and `calculate_hr_conds`; a hires prompt is every text encoder's, SDXL's
    prompt_2 / negative_prompt_2 giving way to it as to the prompt), the hires token merging ratio where set (else
    the first pass's, A1111's `get_token_merging_ratio(for_hr=True)`), the same seeds and CFG scale (`hr_seed`,
    `hr_cfg_scale` where set), no hires fields, and
    the first pass's model calls by the first pass's sampler (A1111's `firstpass_steps`: prompt edits count on from
    it). SDXL's original and target sizes the request
    leaves unset are the upscaled size before the crop and unsnapped, (hr_upscale_to_y, hr_upscale_to_x), for
    the prompt and the negative, as A1111's `calculate_hr_conds` conditions its second pass. A ControlNet's Pixel
    Perfect resolution stays the first pass's (`at_first_pass_resolution`), as the extension preprocesses once.
    ComfyUI's graph (hr_convention "comfyui"): the second KSampler's denoise rule (img2img convention "comfyui"),
    start-noise rule (`_second_pass_init_noise`) and step-noise seed (`_second_pass_ensd`), SDXL conditioned on its
    own size (ComfyUI's width / height of the latent it samples); a first pass from an init picture (img2img) hands
    on its upscaled latent alone, no init picture."""
    comfyui = req.hr_convention == "comfyui"
    _, (width, height) = pass_sizes(req, factor)
    (up_width, up_height), _ = pass_sizes(req, factor) if comfyui else upscaled_to(req)
    return replace(req, width=width, height=height, steps=hires_steps(req), strength=req.hr_denoise,
                   init_image=None, init_images=(),      # from a VAEEncode (comfyui): the upscaled latent alone
                   seed=req.seed if req.hr_seed is None else req.hr_seed,
                   cfg_scale=req.cfg_scale if req.hr_cfg_scale is None else req.hr_cfg_scale,
                   hr_seed=None, hr_cfg_scale=None, hr_convention="a1111", hr_crop="disabled",
                   eta_noise_seed_delta=_second_pass_ensd(req) if comfyui else req.eta_noise_seed_delta,
                   init_noise=_second_pass_init_noise(req) if comfyui else req.init_noise,
                   sampler=req.hr_sampler or req.sampler, schedule=req.hr_schedule or req.schedule,
                   eta=req.eta if req.hr_eta is None else req.hr_eta,
                   prompt=req.hr_prompt or req.prompt, negative_prompt=req.hr_negative_prompt or req.negative_prompt,
                   prompt_2="" if req.hr_prompt else req.prompt_2,
                   negative_prompt_2="" if req.hr_negative_prompt else req.negative_prompt_2,
                   img2img_convention="comfyui" if comfyui else HIRES_IMG2IMG,
                   hr_scale=None, hr_width=None, hr_height=None, hr_upscaler=None,
                   hr_steps=None, hr_denoise=None, hr_sampler=None, hr_schedule=None, hr_eta=None, hr_prompt="",
                   hr_negative_prompt="", hr_base_size=None,
                   first_pass_steps=req.steps * get_sampler(req.sampler).calls_per_step,
                   token_merging_ratio=req.token_merging_ratio_hr or req.token_merging_ratio, token_merging_ratio_hr=0.0,
                   controls=at_first_pass_resolution(req.controls, req.width, req.height, req.control_convention),
                   original_size=req.original_size or (up_height, up_width),
                   target_size=req.target_size or (up_height, up_width))


def _second_pass_ensd(req: GenerationRequest) -> int:
    """The ENSD of a ComfyUI graph's second KSampler: ComfyUI seeds every sampler's step noise seed + 1
    (`default_ensd` of a ComfyUI name), so where the first pass took its sampler's default the second takes its own
    sampler's (a first `euler`, which draws no step noise, took 0); one set for the request stays."""
    eta = req.eta if req.hr_eta is None else req.hr_eta
    if req.eta_noise_seed_delta != default_ensd(True, get_sampler(req.sampler), req.eta):
        return req.eta_noise_seed_delta
    return default_ensd(True, get_sampler(req.hr_sampler or req.sampler), eta)


def _second_pass_init_noise(req: GenerationRequest) -> str:
    """The start-noise rule of a ComfyUI graph's second KSampler: the one its own sampler brings on its schedule under
    ComfyUI's conventions (`implied_init_noise`: ComfyUI's KSampler rule, "comfyui", on a schedule not named the
    diffusers way), whatever the first pass's. It scales the noise of a second pass at denoise 1 by ComfyUI's
    max_denoise rule, and the pass follows ComfyUI's float32 arithmetic (`plan.comfyui_arithmetic`: its sigmas,
    ControlNet windows and SA-Solver's interval) as ComfyUI's KSampler does, a first pass spelt as A1111 spells its
    sampler or not."""
    second = get_sampler(req.hr_sampler or req.sampler)
    return implied_init_noise(second, req.hr_schedule or req.schedule, comfyui=True)


def _warn_second_prompts_replaced(req: GenerationRequest) -> None:
    """One warning where a resolved request's hires prompt (negative) replaces SDXL's prompt_2 (negative_prompt_2)
    in the second pass (`second_pass_request`)."""
    replaced = [name for name, hires in (("prompt_2", req.hr_prompt), ("negative_prompt_2", req.hr_negative_prompt))
                if hires and getattr(req, name)]
    if replaced:
        logger.warning("the hires prompt replaces %s in the second pass (a hires prompt is every text encoder's)",
                       " and ".join(replaced))


def pass_sizes(req: GenerationRequest, factor: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(upscaled, final) (width, height) of a resolved hires request for a VAE of `factor` (`hires_sizes`; ComfyUI's
    graph: both its LatentUpscale(By)'s size, `comfyui_hires_size`)."""
    if req.hr_convention == "comfyui":
        cells = comfyui_hires_size(req.height // factor, req.width // factor, req.hr_scale, req.hr_width or 0,
                                   req.hr_height or 0, factor)
        size = (cells[0] * factor, cells[1] * factor)
        return size, size
    return hires_sizes(*hires_base_size(req), req.hr_scale, req.hr_width, req.hr_height,
                       math.lcm(SIZE_MULTIPLE, factor))


def upscaled_to(req: GenerationRequest) -> tuple[tuple[int, int], tuple[int, int]]:
    """A1111's unsnapped (hr_upscale_to_x, hr_upscale_to_y) and target size of a resolved hires request
    (`hires_targets`)."""
    return hires_targets(*hires_base_size(req), req.hr_scale, req.hr_width, req.hr_height)


def _crop_box(up: tuple[int, int], final: tuple[int, int], factor: int) -> tuple[int, int]:
    """(left, top) latent pixels cut so the upscaled size becomes the final one: half A1111's truncate (whole
    multiples of lcm(8, factor) pixels: `hires_sizes`), rounded down."""
    multiple = math.lcm(SIZE_MULTIPLE, factor)
    return tuple((u - f) // multiple // 2 * (multiple // factor) for u, f in zip(up, final))


def _offset(progress: ProgressFn | None, steps_done: int) -> ProgressFn | None:
    if progress is None:
        return None
    return lambda info: progress(dataclasses.replace(info, i=info.i + steps_done))


@torch.no_grad()
def generate_hires(bundle: ModelBundle, plan: GenerationPlan, upscaler: Upscaler | str | None = None, *,
                   progress: ProgressFn | None = None,
                   second_loras: Sequence[LoraUse] | None = None,
                   stop: Callable[[], None] | None = None,
                   first_pass: Callable[[GenerationResult], None] | None = None) -> GenerationResult:
    """Run a hires plan (`make_plan` of a request with hr_scale or hr_width / hr_height) on `bundle`: first
    pass, upscale, second pass (module docstring). `upscaler`: `hires_upscaler(plan.request, bundle)`, loaded
    once by the caller (read here when None). `second_loras`: the LoRAs the second pass draws with instead of
    the first's (a hires prompt's tags: A1111 activates `hr_extra_network_data` for it), put in by the bundle's
    `LoraPatcher` inside the caller's `using` block, which restores the model after. `stop`: raises `SamplingStopped`
    where the run is to stop, called before the upscaler and before the second pass (module docstring).
    `first_pass`: called with the first pass's pictures (its latents decoded, the resolved hires request) once it
    ends, before the upscaler (A1111's save_images_before_highres_fix; ComfyUI's VAEDecode of a two-pass graph's
    first KSampler); not where a stop ended the first pass. The result's request is the resolved hires request."""
    req = plan.request
    factor = bundle.vae_config.downsample_factor
    upscaler = hires_upscaler(req, bundle) if upscaler is None else upscaler
    up, final = pass_sizes(req, factor)
    left, top = _crop_box(up, final, factor)
    with recording_effects() as effects, tiling_padding(req, bundle):
        skipped = False
        if req.hr_convention == "comfyui" or isinstance(upscaler, str) and is_latent_upscaler(upscaler):
            try:
                with pictures_if_stopped(bundle, plan):            # stopped: the first pass's pictures, at its size
                    latents = sample_latents(bundle, plan, progress=progress)              # (B, C, h, w)
                    _interrupt_check(stop, latents=latents)
            except SamplingStopped as stopped:
                if not stopped.skipped:
                    raise
                latents, skipped = stopped.latents, True
            if first_pass is not None and not skipped:
                first_pass(GenerationResult(images=tensor_to_pil(decode_latents(bundle, latents, tiled=req.tiled_vae)),
                                            seeds=req.seeds(), request=req))
            z = _upscaled_latent(bundle, req, latents, up[0] // factor, up[1] // factor)  # (B, C, H/f, W/f)
            source = decode_latents(bundle, z, tiled=req.tiled_vae) if _conditions_on_pictures(bundle, req) else None
        else:
            try:
                first = generate(bundle, plan, progress=progress)
                _interrupt_check(stop, result=first)
            except SamplingStopped as stopped:
                if not stopped.skipped:
                    raise
                first, skipped = stopped.result, True
            if first_pass is not None and not skipped:
                first_pass(first)
            exact, _ = upscaled_to(req)                 # A1111 resizes to it unsnapped; the encoder floors
            upscaled = [resize_image(picture, upscaler, exact, tile=req.hr_upscaler_tile,
                                     overlap=req.hr_upscaler_tile_overlap) for picture in first.images]
            pixels = pil_to_tensor(upscaled)                                                   # (B, 3, H, W)
            z = encode_image(bundle, pixels.to(bundle.device), tiled=req.tiled_vae)      # (B, C, H/f, W/f)
            z = z[..., : up[1] // factor, : up[0] // factor]
            source = pil_to_unit_tensor(upscaled) if _conditions_on_pictures(bundle, req) else None
        z = z[..., top: top + final[1] // factor, left: left + final[0] // factor]        # (B, C, h2, w2)
        if source is not None:
            source = source[..., top * factor: top * factor + final[1], left * factor: left * factor + final[0]]
        _warn_second_prompts_replaced(req)
        second_plan = make_plan(bundle, second_pass_request(req, factor), from_latent=True)
        if second_loras is not None:
            patcher_for(bundle).apply(second_loras)
        with pictures_if_stopped(bundle, second_plan, req):    # stopped first: the upscaled pictures
            _second_pass_check(stop, skipped, z)
            z = sample_latents(bundle, second_plan, init_latent=z.contiguous(), init_pixels=source,
                               progress=_offset(progress, plan.steps_run))
        pixels = decode_latents(bundle, z, tiled=req.tiled_vae)                           # (B, 3, H2, W2)
    return GenerationResult(images=tensor_to_pil(pixels), seeds=req.seeds(), request=drawn_request(req, effects),
                            pixels=unit_pixels(pixels))


def _upscaled_latent(bundle: ModelBundle, req: GenerationRequest, latents: torch.Tensor, width: int,
                     height: int) -> torch.Tensor:
    """The first pass's `latents` (B, C, h, w) at (B, C, height, width): A1111's latent mode, or ComfyUI's
    LatentUpscale(By) with its method and crop (`comfyui_upscale_latent`) on the VAE's latents, as ComfyUI holds them
    between its nodes."""
    if req.hr_convention != "comfyui":
        return upscale_latent(latents, height, width, req.hr_upscaler)
    z_vae = bundle.to_vae_latents(latents)                                                 # (B, C, h, w)
    return bundle.to_model_latents(comfyui_upscale_latent(z_vae, width, height, req.hr_upscaler, req.hr_crop))


def _conditions_on_pictures(bundle: ModelBundle, req: GenerationRequest) -> bool:
    """Whether the second pass conditions a 9-channel inpainting model on the upscaled pictures: a Conditional mask
    weight below 1, as A1111's `sample_hr_pass` (its `img2img_image_conditioning`: lerp(pictures, 0, weight), all
    masked; at 1 that is txt2img's mid-grey). A latent upscale's pictures are its latent decoded, in [-1, 1]; a
    pixel upscaler's the upscaled pictures in [0, 1], which A1111 hands over as they are (as if in [-1, 1])."""
    return bundle.family.is_inpaint and req.inpainting_mask_weight < 1.0


def _interrupt_check(stop: Callable[[], None] | None, latents: torch.Tensor | None = None,
                     result: GenerationResult | None = None) -> None:
    """A1111's check before the upscaler (`sample_hr_pass`: `if shared.state.interrupted: return samples`): an
    interrupt `stop` raises leaves with the first pass's `latents` or `result`; a skip is not checked there."""
    try:
        if stop is not None:
            stop()
    except SamplingStopped as stopped:
        if not stopped.skipped:
            stopped.latents, stopped.result = latents, result
            raise


def _second_pass_check(stop: Callable[[], None] | None, skipped: bool, latents: torch.Tensor) -> None:
    """A1111's second pass stops at its first model call (`CFGDenoiser.forward`) on an interrupt or a skip, a first
    pass's skip included (`skipped`: its flag stays set), returning its init latent: the stop leaves with the
    upscaled `latents`."""
    try:
        if skipped:
            raise SamplingStopped(skipped=True)
        if stop is not None:
            stop()
    except SamplingStopped as stopped:
        stopped.latents, stopped.result = latents, None
        raise


def hires_steps(req: GenerationRequest) -> int:
    """Sampler steps the second pass takes for the whole batch (for progress totals): `hr_steps`, unset or 0
    the first pass's, whatever the upscaler (one run for the batch)."""
    return req.hr_steps or req.steps


UPSCALER_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")
UPSCALER_FOLDER_NAMES = ("ESRGAN", "RealESRGAN")    # A1111's models folders of upscaler model files


def models_upscaler_folders(models_dirs: list[str | os.PathLike[str]]) -> list[Path]:
    """Each models folder's upscaler folders (`UPSCALER_FOLDER_NAMES`, A1111's layout), in order: where
    `find_upscaler` looks for a name after the folders searched without a models folder."""
    return [Path(folder) / name for folder in models_dirs for name in UPSCALER_FOLDER_NAMES]


def find_upscaler(name: str, folders: list[str | os.PathLike[str]]) -> str:
    """`name` itself when it is an upscaler name sdlab knows or an existing file; else STEM.safetensors (.pth, .pt,
    .ckpt, .bin) in the first of `folders` that has one, STEM being the name (A1111's parameters name an upscaler by
    its file's stem) or, for A1111's own names, the file it runs (`a1111_upscaler_stem`: "R-ESRGAN 4x+" ->
    RealESRGAN_x4plus); else `name` unchanged (resolving the request then says it is unknown or which file to
    place)."""
    try:
        canonical_latent_name(name)
        return name
    except UpscaleError:
        pass
    if name.strip().lower() in PLAIN_UPSCALERS or os.path.isfile(name) or os.path.basename(name) != name:
        return name
    stem = a1111_upscaler_stem(name)
    for folder in folders:
        for suffix in UPSCALER_SUFFIXES:
            candidate = os.path.join(folder, stem + suffix)
            if os.path.isfile(candidate):
                return candidate
    return name
