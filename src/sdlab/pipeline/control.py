"""Applying ControlNets while sampling: the request's `ControlInput`s, hint images, and the U-Net wrapper.

Semantics are diffusers' (`StableDiffusionControlNetPipeline`, `MultiControlNetModel`):

- the hint image is converted to RGB, resized to the output size with Lanczos (under A1111's convention as
  its ControlNet extension resizes a map, `scaled_hint`) and scaled to [0, 1]; one
  with transparency is first laid on white by its alpha (A1111's `HWC3`; diffusers drops the alpha, which
  turns a drawing on a transparent canvas black). A1111's other resize modes (`ControlInput.resize_mode`,
  `fit_hint`) crop or pad it to the output's aspect ratio instead of stretching it;
- with classifier-free guidance the hint conditions both the conditional and the unconditional half
  (diffusers' default `guess_mode=False`; also A1111's "Balanced" control mode), except for a ControlNet that
  pools its residuals (the shuffle model, `global_pool_conditions`): its residuals go to the conditional rows
  only, the unconditional rows get none (diffusers turns guess mode on for it; A1111 multiplies them by
  `cond_mark`);
- each ControlNet's residuals are multiplied by its strength; several ControlNets are summed;
- a T2I-Adapter (`checkpoints.t2i_adapter`) runs once on the hint, before sampling (`adapter_features`); its
  features, times the strength (under soft injection strength * (0.25, 0.62, 0.825, 1.0), A1111's), join the
  U-Net's encoder where diffusers adds its `down_intrablock_additional_residuals` (`unet.adapter_blocks`: SD1 /
  SD2 input blocks 2, 5, 8, 11, SDXL 3, 5, 8 and the middle block, where A1111's extension and ComfyUI add them
  too), on both CFG halves (diffusers' adapter pipelines; A1111's Balanced), several adapters summed. Start / end,
  control modes, preprocessors and resize modes act as for a ControlNet; diffusers' `adapter_conditioning_factor`
  f is end = f. Its average pooling rounds odd sizes up (diffusers); under A1111's convention down, as the
  extension's TencentARC `Adapter` does, and a feature that then misses the U-Net's grid is resized to it with
  nearest interpolation (the extension's `aligned_adding`; `UNet.forward`'s `adapter_nearest`);
- A1111's control modes (`ControlInput.control_mode`): "balanced" is the above; "prompt" ("My prompt is more
  important") scales residual k of the K residuals (the middle block's last: K = 13 for SD1 / SD2, 10 for
  SDXL) by strength * 0.825 ** (12 - k) ("soft injection"); "control" ("ControlNet is more important") does
  that on the prompt's rows only. In the hires fix's second pass a `canny` control is softly injected
  whatever its mode, as A1111 does;
- a ControlNet runs only on the steps i (0-based, of N sampler steps) with i / N >= start and
  (i + 1) / N <= end (`control_guidance_start` / `control_guidance_end`). N counts the steps actually run,
  so img2img counts from its first noised step, as diffusers' img2img ControlNet pipeline does. Model calls
  inside a step (second-order samplers) belong to that step. Under A1111's convention (a request's
  `control_convention="a1111"`, the A1111 API's units) the extension's rule holds instead:
  start <= max(i - 1, 0) / N <= end (`PreparedControl.active`);
- under Inpaint area "Only masked" the U-Net draws a region of the picture, so the hint is that region of
  the control image, as A1111's ControlNet extension cuts it (`cropped_to_region`);
- under ComfyUI's convention (`control_convention="comfyui"`, the ComfyUI API's ControlNetApply nodes) the rules of
  comfy/controlnet.py `ControlNet.get_control` hold: the picture is made RGB (an alpha dropped, as LoadImage
  drops it), cut about its centre to the drawing's aspect ratio and resized by nearest-exact (`comfyui_hint`:
  comfy/utils.py `common_upscale`, crop "center"; resize mode "resize" is its crop "disabled"); a control acts at
  each model call whose sigma lies in [percent_to_sigma(end), percent_to_sigma(start)] of the model's own
  schedule (`comfyui_sigma_window`, `ControlBase.pre_run`; in ComfyUI's float32 arithmetic, `comfy_sigmas`,
  where the pass follows it: `plan.comfyui_arithmetic`, else in sdlab's float64),
  whatever step it belongs to; a pooling ControlNet's residuals go to every row, as ComfyUI pools them without
  choosing rows.

The seam with the generate loop is two wrappers around the callables it already has:

    net = controlled_unet(bundle.unet, prepare_controls(bundle, controls, width, height))
    denoiser = tag_steps(Denoiser(net, ...), sigmas)    # passes control_step=(i, N) down to `net`
                                                        # (and control_sigma, ComfyUI's window: `with_sigma`)

and, when a control acts on the prompt's rows only, a `cond_mark` entry in the conditional and unconditional
condition dicts (`prompt_marks`), which CFG batches as it batches the prompts, so the wrapper knows which
rows are the prompt's.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import Tensor

from sdlab.checkpoints.controlnet import LoadedControlNet, legacy_hash, load_controlnet
from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.t2i_adapter import LoadedT2IAdapter, is_t2i_adapter, load_t2i_adapter
from sdlab.diffusion.comfy_sigmas import comfyui_percent_to_sigma
from sdlab.diffusion.denoiser import DenoiseFn
from sdlab.diffusion.steps import step_of_call
from sdlab.families.loaded import ModelBundle
from sdlab.models.circular_padding import circular_padding, padded_convolutions
from sdlab.models.t2i_adapter import hint_input
from sdlab.models.deep_cache import DeepCache, DeepCacheRun
from sdlab.models.freeu import FreeU
from sdlab.pipeline.hint_resize import high_quality_resize
from sdlab.pipeline.images import eight_bit, flattened
from sdlab.pipeline.overlay import axis_blurred
from sdlab.pipeline.preprocess import (
    INPAINT_MODULES, PARAMETERS, PREPROCESSORS, RESOLUTION_MODULES, RESOLUTION_SLIDER, a1111_module,
    pixel_perfect_resolution,
    preprocess, processor_resolution, unknown_preprocessor,
)
from sdlab.pipeline.request import RequestError, input_image, input_size
from sdlab.pipeline.upscale import IMG2IMG_UPSCALER, resize_image

MAX_STRENGTH = 10.0      # diffusers accepts any scale; A1111's slider stops at 2
CONTROL_MODES = {"balanced": "Balanced", "prompt": "My prompt is more important",
                 "control": "ControlNet is more important"}
"""sdlab's names of A1111's control modes -> A1111's (its `ControlMode` values, in its order)."""
SOFT_INJECTION_BASE = 0.825     # A1111: residual k of 13 scaled by 0.825 ** (12 - k)
ADAPTER_SOFT_SCALES = (0.25, 0.62, 0.825, 1.0)
"""A1111's soft injection of a T2I-Adapter's four features (its hook's `control_scales` for T2I_Adapter)."""
RESIZE_MODES = {"resize": "Just Resize", "crop": "Crop and Resize", "fill": "Resize and Fill"}
"""sdlab's names of A1111's resize modes -> A1111's (its `ResizeMode` values, in its order)."""
DEFAULT_RESIZE = {"diffusers": "resize", "a1111": "crop", "comfyui": "crop"}
"""The resize mode of a control that names none, by the request's `control_convention`: diffusers stretches
the hint; A1111's default is "Crop and Resize" (`ResizeMode.INNER_FIT`); ComfyUI cuts the centre
(`common_upscale`'s crop "center", `comfyui_hint`)."""
COMFYUI_RESIZE_MODES = ("resize", "crop")
"""The resize modes ComfyUI's `common_upscale` has: crop "disabled" (stretch) and "center"."""
A1111_RESIZE_ALIASES = {"Inner Fit (Scale to Fit)": "Crop and Resize", "Outer Fit (Shrink to Fit)": "Resize and Fill",
                        "Scale to Fit (Inner Fit)": "Crop and Resize", "Envelope (Outer Fit)": "Resize and Fill"}
"""The ControlNet extension's older names of its resize modes (`resize_mode_aliases`)."""


LOADED = (LoadedControlNet, LoadedT2IAdapter)
"""The loaded networks a control may carry: a ControlNet, or a T2I-Adapter (whose features join the U-Net's
encoder where diffusers adds them, `UNet.forward`'s `adapter`)."""


@dataclass(frozen=True)
class ControlInput:
    """One ControlNet or T2I-Adapter of a request: the network (a file, folder or loaded ControlNet / T2I-Adapter),
    its hint image (a path or PIL image), how strongly and on which fraction of the steps it acts, and an optional
    preprocessor (`module`, A1111's Module: "none", "canny", "scribble", "threshold", "invert", "tile_resample", or
    sdlab's "tile"; `PREPROCESSORS`)
    applied to the image first. `control_mode` and `resize_mode` are A1111's (`CONTROL_MODES`, `RESIZE_MODES`;
    `resize_mode` None: the request's convention's, `DEFAULT_RESIZE`), `threshold_a` / `threshold_b` its
    preprocessor parameters (None: the preprocessor's default; `preprocess.PARAMETERS`). `mask` (a picture or
    path, white = masked; its first channel) is the unit's mask of the inpaint preprocessors (`inpaint_hint`);
    without one an inpainting run's mask serves. `processor_res` (A1111's Processor Res) is the resolution
    canny, threshold and scribble run at (`preprocess.RESOLUTION_MODULES`; None: the picture's own size, under
    A1111's convention the extension's 512: `processor_res_under`);
    `pixel_perfect` picks it from the drawing's size instead (`resolution_of`). `image` None: an img2img /
    inpainting request's init picture (`drawn_on_init`), as A1111's ControlNet extension takes a unit without one;
    `init_resize_mode` is then the request's resize mode, which fits that picture in place of the control's own
    `resize_mode` (still the one recorded, as the extension writes its unit's: `recorded_resize_mode_under`)."""

    model: LoadedControlNet | LoadedT2IAdapter | str | os.PathLike[str]
    image: Image.Image | str | os.PathLike[str] | None = None
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0
    module: str = "none"
    control_mode: str = "balanced"
    resize_mode: str | None = None
    threshold_a: float | None = None
    threshold_b: float | None = None
    mask: Image.Image | str | os.PathLike[str] | None = None
    processor_res: int | None = None
    pixel_perfect: bool = False
    init_resize_mode: str | None = None     # set by `on_init`: the init picture's resize mode (`init_resize`)

    @property
    def model_path(self) -> str:
        return self.model.origin if isinstance(self.model, LOADED) else os.fspath(self.model)

    def resize_mode_under(self, convention: str) -> str:
        """The resize mode the control runs with under the request's `control_convention`: on the init picture
        the request's (`on_init`), else its own."""
        return self.init_resize_mode or self.recorded_resize_mode_under(convention)

    def recorded_resize_mode_under(self, convention: str) -> str:
        """The control's own resize mode under the request's `control_convention`, the one its infotext line and
        job record hold: sd-webui-controlnet writes its unit's `resize_mode` (scripts/infotext.py `serialize_unit`,
        called from `get_enabled_units` before `choose_input_image` picks img2img's for a unit without a
        picture), so a redraw without the picture again draws on the init picture as the first did."""
        return self.resize_mode or DEFAULT_RESIZE[convention]

    def processor_res_under(self, convention: str) -> int | None:
        """The processor resolution the control runs with under the request's `control_convention`: unset is the
        picture's own size, under A1111's the extension's 512 (its unit's -1 until `bound_check_params`)."""
        if self.processor_res is None and convention == "a1111":
            return processor_resolution(None)
        return self.processor_res


def control_input(value: Any) -> ControlInput:
    """A `ControlInput`, or a record (path, image[, strength[, start, end]]) turned into one."""
    if isinstance(value, ControlInput):
        return value
    if isinstance(value, (tuple, list)) and 2 <= len(value) <= 6:
        return ControlInput(*value)
    raise RequestError(f"a control must be a ControlInput or (file, image[, strength[, start, end]]), got {value!r}")


def check_control(control: ControlInput, index: int = 0, convention: str = "diffusers") -> ControlInput:
    """The control's numbers and preprocessor checked; a `RequestError` names what is wrong. A1111's
    convention takes start == end (one step or two), diffusers' refuses it (no step)."""
    name = f"control {index}"
    for what, value in (("strength", control.strength), ("start", control.start), ("end", control.end)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RequestError(f"{name}: {what} must be a finite number, got {value!r}")
    if not 0.0 <= control.strength <= MAX_STRENGTH:
        raise RequestError(f"{name}: strength must lie in [0, {MAX_STRENGTH:g}], got {control.strength}")
    strict = convention == "diffusers"                                      # diffusers: start < end
    ordered = control.start < control.end if strict else control.start <= control.end
    if not (0.0 <= control.start and control.end <= 1.0 and ordered):
        relation = "<" if strict else "<="
        raise RequestError(f"{name}: need 0 <= start {relation} end <= 1, got start {control.start}, "
                           f"end {control.end}")
    if control.control_mode not in CONTROL_MODES:
        raise RequestError(f"{name}: unknown control_mode {control.control_mode!r}; valid: {', '.join(CONTROL_MODES)}")
    for what, mode in (("resize_mode", control.resize_mode), ("init_resize_mode", control.init_resize_mode)):
        if mode is not None and mode not in RESIZE_MODES:
            raise RequestError(f"{name}: unknown {what} {mode!r}; valid: {', '.join(RESIZE_MODES)}")
    if convention == "comfyui" and control.resize_mode_under(convention) not in COMFYUI_RESIZE_MODES:
        raise RequestError(f"{name}: ComfyUI's control pictures are stretched or cut about the centre "
                           f"(resize_mode {' or '.join(COMFYUI_RESIZE_MODES)}), not "
                           f"{control.resize_mode_under(convention)!r}")
    for what, value in (("threshold_a", control.threshold_a), ("threshold_b", control.threshold_b)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value < 0):
            raise RequestError(f"{name}: {what} must be a number >= 0 or unset, got {value!r}")
    if control.module not in PREPROCESSORS:
        raise RequestError(f"{name}: {unknown_preprocessor(control.module)}")
    resolution, highest = control.processor_res, RESOLUTION_SLIDER["max"]
    if resolution is not None and (isinstance(resolution, bool) or not isinstance(resolution, int)
                                   or not 1 <= resolution <= highest):
        raise RequestError(f"{name}: processor_res must be a whole number in 1..{highest} (A1111's slider stops at "
                           f"{highest}) or unset, got {resolution!r}")
    if not isinstance(control.pixel_perfect, bool):
        raise RequestError(f"{name}: pixel_perfect must be true or false, got {control.pixel_perfect!r}")
    if not isinstance(control.model, LOADED) and not Path(control.model).exists():
        raise RequestError(f"{name}: the ControlNet {control.model_path!r} does not exist")
    if isinstance(control.image, (str, os.PathLike)) and not Path(control.image).exists():
        raise RequestError(f"{name}: the image {os.fspath(control.image)!r} does not exist")
    if control.image is not None and not isinstance(control.image, (Image.Image, str, os.PathLike)):
        raise RequestError(f"{name}: the image must be a picture, a file path or None (the init picture), got "
                           f"{type(control.image).__name__}")
    if isinstance(control.mask, (str, os.PathLike)) and not Path(control.mask).exists():
        raise RequestError(f"{name}: the mask {os.fspath(control.mask)!r} does not exist")
    if control.mask is not None and control.image is not None:      # an init picture's control: once drawn on it
        check_mask_size(input_size(control.image, f"{name} image"), input_size(control.mask, f"{name} mask"), name)
    return control


def init_resize(job_resize: str) -> str:
    """The resize mode a control without a picture of its own takes from its request's (`request.RESIZE_MODES`),
    as the extension's `choose_input_image` maps img2img's: its own, "latent" (Just resize (latent upscale)) as
    Just resize."""
    return "resize" if job_resize == "latent" else job_resize


def on_init(unit: Any, init: Image.Image, job_resize: str) -> Any:
    """`unit` (a `ControlInput`, or an `image_prompt.IPAdapterInput`) drawn on the init picture `init` of one
    request, as the extension's `choose_input_image` takes each request's `init_images[0]` for a unit without a
    picture (a Loopback pass's picture, an SD upscale tile, an outpainting canvas). A control fits it by the
    request's mode `job_resize` (`init_resize`), keeping its own `resize_mode` to record; an image prompt's CLIP
    preprocessing takes the picture as it is."""
    if isinstance(unit, ControlInput):
        return replace(unit, image=init, init_resize_mode=init_resize(job_resize))
    return replace(unit, image=init)


def unit_kind(unit: Any) -> str:
    """How a refusal names a request's `unit`: "control" (a `ControlInput`) or "IP-Adapter"."""
    return "control" if isinstance(unit, ControlInput) else "IP-Adapter"


def drawn_on_init(unit: Any, index: int, init: Image.Image | None, job_resize: str, name: str | None = None) -> Any:
    """`unit` (the request's `index`-th control or image prompt, `on_init`) as it is drawn: unchanged with a
    picture of its own, else on the request's init picture `init` (`on_init`). Without an init picture (txt2img)
    such a unit is a `RequestError` (named `name`, else "control N" / "IP-Adapter N"), as the extension refuses a
    unit without a picture there ("no input image is given")."""
    if unit.image is not None:
        return unit
    if init is None:
        kind = unit_kind(unit)
        raise RequestError(f"{name or f'{kind} {index}'}: needs an image; only an img2img or inpaint request's "
                           f"{kind} may leave it out, to draw on the init picture")
    return on_init(unit, init, job_resize)


def controls_on_init(controls: Sequence[ControlInput | Any], init: Image.Image | None,
                     job_resize: str) -> tuple[ControlInput, ...]:
    """Each of a request's `controls` as it is drawn (`drawn_on_init`): those without a picture of their own on
    the init picture `init`, resized by the request's mode `job_resize`. `controls` may hold (file, image[,
    strength[, start, end]]) records (`control_input`)."""
    return tuple(drawn_on_init(control_input(control), index, init, job_resize)
                 for index, control in enumerate(controls))


def check_mask_size(image: tuple[int, int], mask: tuple[int, int], name: str) -> None:
    """A control's own mask has its image's (width, height), as the extension's `combine_image_and_mask` requires
    (each is fitted to the picture by the resize mode on its own, so a mask of another size would mask other
    pixels); otherwise a `RequestError` naming both sizes."""
    if mask != image:
        raise RequestError(f"{name}: the mask is {mask[0]}x{mask[1]} but its image {image[0]}x{image[1]}; a "
                           "control's mask must have its image's size")


def resolution_of(control: ControlInput, image: Image.Image, width: int, height: int,
                  resize_mode: str, convention: str = "diffusers") -> int | None:
    """The resolution the control's preprocessor runs its (cut) `image` at for a width x height drawing: None
    for one that takes none (`RESOLUTION_MODULES`); Pixel Perfect's (`pixel_perfect_resolution`, by the
    control's resize mode) where it is on, else its `processor_res` (`processor_res_under` the convention)."""
    if control.module not in RESOLUTION_MODULES:
        return None
    if control.pixel_perfect:
        return pixel_perfect_resolution(image.size, width, height, resize_mode)
    return control.processor_res_under(convention)


def at_first_pass_resolution(controls: Sequence[ControlInput | Any], width: int, height: int,
                             convention: str) -> tuple[ControlInput, ...]:
    """The controls of a hires fix's second pass: Pixel Perfect's resolution fixed at the first pass's width x
    height (`resolution_of`), as the extension preprocesses once for both passes."""
    fixed = []
    for control in map(control_input, controls):
        if control.pixel_perfect and control.module in RESOLUTION_MODULES:
            size = input_size(control.image, "control image")
            resolution = pixel_perfect_resolution(size, width, height, control.resize_mode_under(convention))
            control = replace(control, processor_res=resolution, pixel_perfect=False)
        fixed.append(control)
    return tuple(fixed)


def scaled_hint(image: Image.Image, width: int, height: int, convention: str = "diffusers") -> Image.Image:
    """An RGB hint at width x height: under A1111's convention as the extension scales a control map
    (`hint_resize.high_quality_resize`: OpenCV's area, cubic or nearest, binary maps kept binary and
    one-pixel edges thin), else with Lanczos (diffusers' control image processor)."""
    if convention == "a1111":
        return Image.fromarray(high_quality_resize(np.asarray(image), width, height))
    return image.resize((width, height), resample=Image.Resampling.LANCZOS)


def fit_hint(image: Image.Image, width: int, height: int, resize_mode: str = "resize",
             background: tuple[int, int, int] | None = None, convention: str = "diffusers") -> Image.Image:
    """An RGB `image` at width x height by A1111's resize mode (`Script.detectmap_proc`): "resize" stretches it;
    "crop" scales it by the larger of the two ratios (to whole pixels, rounded) and cuts the middle out;
    "fill" scales it by the smaller and lays it in the middle of a canvas of `background`, by default the
    median colour of its border pixels. Scaling is the `convention`'s (`scaled_hint`)."""
    if image.size == (width, height):
        return image
    if resize_mode == "resize":
        return scaled_hint(image, width, height, convention)
    old_w, old_h = image.size
    scale = (max if resize_mode == "crop" else min)(height / old_h, width / old_w)
    new_w, new_h = round(old_w * scale), round(old_h * scale)
    scaled = scaled_hint(image, new_w, new_h, convention)
    if resize_mode == "crop":
        left, top = max(0, (new_w - width) // 2), max(0, (new_h - height) // 2)
        return scaled.crop((left, top, left + width, top + height))
    if background is None:
        pixels = np.asarray(image)                                                   # (H, W, 3)
        border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])   # (2W + 2H, 3)
        background = tuple(np.median(border, axis=0).astype(np.uint8).tolist())
    canvas = Image.new("RGB", (width, height), background)
    canvas.paste(scaled, (max(0, (width - new_w) // 2), max(0, (height - new_h) // 2)))
    return canvas


def comfyui_hint(image: Image.Image, width: int, height: int, resize_mode: str = "crop") -> Tensor:
    """ComfyUI's hint of a LoadImage picture, (1, 3, height, width) float32 in [0, 1]: the picture made RGB (an
    alpha channel dropped: nodes.py `LoadImage`'s convert("RGB")), / 255, for "crop" cut about its centre to the
    drawing's aspect ratio (the cut's offsets rounded as Python rounds), then resized to width x height by
    nearest-exact (comfy/utils.py `common_upscale(hint, W, H, "nearest-exact", "center")`, called by
    comfy/controlnet.py `ControlNet.get_control` at the latent's size times 8)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0                  # (h, w, 3)
    hint = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0)                       # (1, 3, h, w)
    old_h, old_w = hint.shape[-2:]
    if resize_mode == "crop":
        old_aspect, new_aspect = old_w / old_h, width / height
        left = round((old_w - old_w * (new_aspect / old_aspect)) / 2) if old_aspect > new_aspect else 0
        top = round((old_h - old_h * (old_aspect / new_aspect)) / 2) if old_aspect < new_aspect else 0
        hint = hint[..., top:old_h - top, left:old_w - left]                           # (1, 3, h', w')
    return F.interpolate(hint, size=(height, width), mode="nearest-exact").contiguous()  # (1, 3, H, W)


def hint_tensor(image: Image.Image, width: int, height: int, resize_mode: str = "resize",
                convention: str = "diffusers") -> Tensor:
    """Hint image -> (1, 3, height, width) float32 in [0, 1]: RGB (a transparent picture laid on white,
    `flattened`), fitted to the size by `resize_mode`, scaled by the request's `convention` (`fit_hint`;
    diffusers' "resize" is its control image processor with do_normalize=False); under ComfyUI's `comfyui_hint`."""
    if convention == "comfyui":
        return comfyui_hint(image, width, height, resize_mode)
    image = fit_hint(flattened(image).convert("RGB"), width, height, resize_mode, convention=convention)
    pixels = np.asarray(image, dtype=np.float32) / 255.0                    # (H, W, 3)
    return torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0).contiguous()


def inpaint_mask(mask_image: Image.Image | None, invert: bool = False, blur: float = 0.0,
                 blur_y: float | None = None) -> Image.Image | None:
    """An inpainting run's mask as the ControlNet extension reads it for its inpaint preprocessors
    (`prepare_mask`): greyscale (`convert("L")`: the extension reads the mask picture as given, so a
    transparent mask's alpha counts for the run but not for the ControlNet, as in A1111), inverted for
    "Inpaint not masked", blurred as A1111 blurs the run's mask (`overlay.axis_blurred`: `blur` pixels along
    x, `blur_y` along y, None: `blur`); None without a mask."""
    if mask_image is None:
        return None
    mask = eight_bit(mask_image).convert("L")
    return axis_blurred(ImageOps.invert(mask) if invert else mask, blur, blur_y)


def inpaint_hint(hint: Tensor, mask: Image.Image, resize_mode: str = "resize") -> Tensor:
    """The ControlNet extension's inpaint hint: `hint` (1, 3, H, W) in [0, 1] with -1 where `mask` (its first
    channel, fitted to the hint's size as the hint was, `fit_hint`) is above 127, as its `detectmap_proc`
    thresholds the mask and its hook forms `c * (1 - m) - m`; the other pixels keep their [0, 1] colour.
    "Resize and Fill" masks the bands it adds (the extension's border alpha of 255: outpainting)."""
    height, width = hint.shape[-2:]
    mask = eight_bit(mask).convert("RGB")
    fitted = fit_hint(mask, width, height, resize_mode, background=(255, 255, 255))
    masked = torch.from_numpy(np.asarray(fitted)[..., 0] > 127).to(hint.device)    # (H, W)
    return torch.where(masked, torch.tensor(-1.0, dtype=hint.dtype, device=hint.device), hint)


def cropped_to_region(image: Image.Image, picture_size: tuple[int, int], region: tuple[int, int, int, int],
                      size: tuple[int, int], resize_mode: str) -> Image.Image:
    """The part of a control image that an Inpaint area "Only masked" run draws, as A1111's ControlNet extension
    cuts it (`try_crop_image_with_a1111_mask`): the image (RGB, on white) fitted to the picture's size by the
    control's resize mode, cut to the drawn `region` (x1, y1, x2, y2) and resized to the drawing `size` by
    "Resize and fill" (A1111's `images.resize_image`, modes 0-2, then 2)."""
    image = resize_image(flattened(image).convert("RGB"), IMG2IMG_UPSCALER, picture_size, mode=resize_mode)
    return resize_image(image.crop(region), IMG2IMG_UPSCALER, size, mode="fill")


@dataclass(frozen=True)
class PreparedControl:
    """A control ready to run: the loaded network, its hint on the model's device, strength and step range,
    A1111's control mode, and whether it runs in a hires fix's second pass."""

    net: LoadedControlNet | LoadedT2IAdapter
    hint: Tensor                    # (1, 3, H, W) in [0, 1]; -1 at an inpaint hint's masked pixels
    strength: float
    start: float
    end: float
    module: str = "none"
    convention: str = "diffusers"   # the step rule: "diffusers" or "a1111"
    control_mode: str = "balanced"
    hires_pass: bool = False
    features: tuple[Tensor, ...] = ()   # a T2I-Adapter's, made once from the hint: (1, C_i, h_i, w_i) each
    sigma_window: tuple[float, float] | None = None     # ComfyUI's (highest, lowest) sigma: `comfyui_sigma_window`

    def active(self, step: int, steps: int) -> bool:
        """Whether step i of N runs the control (`in_window`)."""
        return in_window(self.start, self.end, step, steps, self.convention)

    def acts(self, control_step: tuple[int, int] | None, sigma: float | None) -> bool:
        """Whether a model call runs the control: with a sigma window (ComfyUI's) where the call's `sigma` lies in
        it (comfy/controlnet.py `get_control`: none where t[0] > highest or t[0] < lowest), else where its step
        `control_step` (i, N) is `active`; a call without either runs every control."""
        if self.sigma_window is not None and sigma is not None:
            highest, lowest = self.sigma_window
            return lowest <= sigma <= highest
        return control_step is None or self.active(*control_step)

    @property
    def cond_only(self) -> bool:
        """Whether the residuals go to the prompt's rows only: a pooling ControlNet's, or in A1111's "ControlNet
        is more important" mode (its `cfg_injection`)."""
        pools = isinstance(self.net, LoadedControlNet) and self.net.config.global_pool
        return (pools and self.convention != "comfyui") or self.control_mode == "control"

    @property
    def soft(self) -> bool:
        """Whether the residuals are softly injected: in A1111's modes other than "balanced", and for a canny
        control in a hires fix's second pass (A1111's `high_res_fix_forced_soft_injection`, which it also
        applies to mlsd, a preprocessor sdlab has not)."""
        return self.control_mode != "balanced" or (self.hires_pass and "canny" in self.module)

    def scales(self, count: int) -> list[float]:
        """The factors of the control's `count` residuals, the middle block's last: the strength, or with soft
        injection strength * 0.825 ** (12 - k) for residual k (A1111's 13 factors; SDXL takes the first 10); a
        T2I-Adapter's `count` features, softly injected: strength * (0.25, 0.62, 0.825, 1.0) (A1111's; a fifth
        or later feature, which no released adapter has, keeps the strength)."""
        if not self.soft:
            return [self.strength] * count
        if isinstance(self.net, LoadedT2IAdapter):
            return [self.strength * (ADAPTER_SOFT_SCALES[k] if k < len(ADAPTER_SOFT_SCALES) else 1.0)
                    for k in range(count)]
        return [self.strength * SOFT_INJECTION_BASE ** (12 - k) for k in range(count)]


def comfyui_sigma_window(start: float, end: float, t_to_sigma: Any) -> tuple[float, float]:
    """ComfyUI's sigma window of a control acting from `start` to `end` (fractions of the model's timesteps):
    (percent_to_sigma(start), percent_to_sigma(end)) (comfy/controlnet.py `ControlBase.pre_run`), percent_to_sigma(p)
    the model's sigma at the float32 timestep (1 - p) * 999 (`t_to_sigma`: `plan.pass_timestep_sigma`'s), above every
    sigma for p <= 0 and 0 for p >= 1 (comfy/model_sampling.py `ModelSamplingDiscrete.percent_to_sigma`:
    `comfy_sigmas.comfyui_percent_to_sigma`)."""
    return comfyui_percent_to_sigma(start, t_to_sigma), comfyui_percent_to_sigma(end, t_to_sigma)


def in_window(start: float, end: float, step: int, steps: int, convention: str) -> bool:
    """Whether step i (0-based) of N lies in the window [start, end] by `convention`'s rule. diffusers'
    controlnet_keep: i / N >= start and (i + 1) / N <= end. A1111's (the ControlNet extension's
    `UnetHook.guidance_schedule_handler`, which its IP-Adapter units read as `current_sampling_percent` too):
    start <= s / N <= end with s the sampler step its callback last reported, which is set after a step's model
    calls: i - 1 (0 at i = 0)."""
    if convention == "a1111":
        return start <= max(step - 1, 0) / steps <= end
    return not (step / steps < start or (step + 1) / steps > end)


def load_control_net(model: LoadedControlNet | LoadedT2IAdapter | str | os.PathLike[str],
                     bundle: ModelBundle) -> LoadedControlNet | LoadedT2IAdapter:
    """The ControlNet or T2I-Adapter (`is_t2i_adapter`) of `model` for `bundle` (loaded in its dtype on its
    device), checked to fit it."""
    family = bundle.family.name
    if isinstance(model, LoadedT2IAdapter) or (not isinstance(model, LoadedControlNet) and is_t2i_adapter(model)):
        return _load_adapter(model, bundle)
    if isinstance(model, LoadedControlNet):
        model.check_compatible(bundle.unet_config, family)
        param = next(bundle.unet.parameters())
        model.model.to(device=param.device, dtype=param.dtype)
        return model
    param = next(bundle.unet.parameters())
    loaded = load_controlnet(model, like=bundle.unet_config, like_family=family, dtype=param.dtype, device=param.device)
    loaded.check_compatible(bundle.unet_config, family)
    return loaded


def _load_adapter(model: LoadedT2IAdapter | str | os.PathLike[str], bundle: ModelBundle) -> LoadedT2IAdapter:
    param = next(bundle.unet.parameters())
    if isinstance(model, LoadedT2IAdapter):
        model.model.to(device=param.device, dtype=param.dtype)
    else:
        model = load_t2i_adapter(model, latent_factor=bundle.vae_config.downsample_factor, dtype=param.dtype,
                                 device=param.device)
    model.check_compatible(bundle.unet_config, bundle.vae_config.downsample_factor, bundle.family.name)
    return model


def adapter_features(net: LoadedT2IAdapter, hint: Tensor, index: int,
                     convention: str = "diffusers") -> tuple[Tensor, ...]:
    """A T2I-Adapter's features of a (1, 3, H, W) hint, made once for every step (as diffusers and A1111's
    extension make them), its average pooling rounding odd sizes up (diffusers), under A1111's `convention` down
    (the extension's), under ComfyUI's up with a zero on each end (its adapter `Downsample`); a one-channel
    adapter reads the hint by the convention (`hint_input`). A size its pixel-unshuffle cannot split, or one that
    rounding down pools to nothing, is a `RequestError` (ComfyUI's hint is made at a size it splits,
    `comfyui_adapter_size`)."""
    step = net.config.unshuffle
    height, width = hint.shape[-2:]
    if height % step or width % step:
        raise RequestError(f"control {index}: {net.origin} reads pictures in steps of {step} pixels; "
                           f"{width}x{height} is not one")
    pool = {"a1111": "floor", "comfyui": "pad"}.get(convention, "ceil")
    smallest = net.config.feature_factors()[-1]
    if pool == "floor" and not net.config.conv_downsample and min(height, width) < smallest:
        raise RequestError(f"control {index}: {net.origin} pools pictures down to 1/{smallest} of their size; "
                           f"{width}x{height} is smaller than that")
    with torch.no_grad():
        return tuple(net.model(hint_input(hint, net.config, convention), pool=pool))   # (1, C_i, h_i, w_i) each


def comfyui_adapter_size(net: LoadedT2IAdapter, width: int, height: int) -> tuple[int, int]:
    """The size ComfyUI draws a T2I-Adapter's hint at for a `width` x `height` picture: each side rounded up to a
    multiple of the adapter's pixel-unshuffle (comfy/controlnet.py `T2IAdapter.scale_image_to`), the picture
    then cut about its centre and stretched to it as any control picture."""
    step = net.config.unshuffle
    return math.ceil(width / step) * step, math.ceil(height / step) * step


def prepare_controls(
    bundle: ModelBundle, controls: Sequence[ControlInput | Any], width: int, height: int,
    convention: str = "diffusers", hires_pass: bool = False,
    region: tuple[int, int, int, int] | None = None, picture_size: tuple[int, int] | None = None,
    mask: Image.Image | None = None, t_to_sigma: Any = None,
) -> list[PreparedControl]:
    """Load (or take) each ControlNet, check it fits the bundle, read and preprocess its hint image.
    `controls` may hold (file, image[, strength[, start, end]]) records (`control_input`); `convention` is
    the request's `control_convention`; `hires_pass`: the controls act in a hires fix's second pass.
    `region` (x1, y1, x2, y2) of a picture of `picture_size`: the run draws that region (Inpaint area "Only
    masked"); each image (and inpaint mask) is cut to it before its preprocessor runs, as A1111 does
    (`cropped_to_region`). `mask`: an inpainting run's mask as the inpaint preprocessors read it
    (`inpaint_mask`), for the controls that bring none. `t_to_sigma`: the model's timestep -> sigma as this pass
    computes it (`plan.pass_timestep_sigma`), for ComfyUI's sigma windows (`comfyui_sigma_window`; needed under its
    convention)."""
    if convention == "comfyui" and t_to_sigma is None:
        raise ValueError("prepare_controls: ComfyUI's control windows need the model's t_to_sigma")
    prepared = []
    factor = bundle.vae_config.downsample_factor
    for index, control in enumerate(controls):
        control = check_control(control_input(control), index, convention)
        try:
            net = load_control_net(control.model, bundle)
        except CheckpointError as err:
            raise RequestError(f"control {index}: {err}") from None
        if isinstance(net, LoadedControlNet) and net.config.hint_channels != 3:
            raise RequestError(f"control {index}: {net.origin} reads {net.config.hint_channels}-channel hints; "
                               "only RGB hints are supported")
        if isinstance(net, LoadedControlNet) and net.config.hint_factor != factor:
            raise RequestError(
                f"control {index}: {net.origin} maps hints {net.config.hint_factor}x down, but this model's "
                f"latents are {factor}x smaller than the picture"
            )
        resize_mode = control.resize_mode_under(convention)
        image = input_image(control.image, f"control {index} image")
        if convention == "comfyui":                 # ComfyUI's LoadImage drops an alpha channel (`comfyui_hint`)
            image = image.convert("RGB")
        if region is not None:
            image = cropped_to_region(image, picture_size, region, (width, height), resize_mode)
        try:
            image = preprocess(image, control.module, control.threshold_a, control.threshold_b,
                               resolution_of(control, image, width, height, resize_mode, convention))
        except ValueError as err:
            raise RequestError(f"control {index}: {err}") from None
        size = (comfyui_adapter_size(net, width, height)
                if convention == "comfyui" and isinstance(net, LoadedT2IAdapter) else (width, height))
        hint = hint_tensor(image, *size, resize_mode, convention)
        if control.module in INPAINT_MODULES:
            hint = _masked_hint(hint, control, index, mask, region, picture_size, resize_mode)
        hint = hint.to(next(bundle.unet.parameters()).device)
        features = adapter_features(net, hint, index, convention) if isinstance(net, LoadedT2IAdapter) else ()
        window = (comfyui_sigma_window(float(control.start), float(control.end), t_to_sigma)
                  if convention == "comfyui" else None)
        prepared.append(PreparedControl(net, hint, float(control.strength), float(control.start),
                                        float(control.end), control.module, convention, control.control_mode,
                                        hires_pass, features, window))
    return prepared


def _masked_hint(hint: Tensor, control: ControlInput, index: int, run_mask: Image.Image | None,
                 region: tuple[int, int, int, int] | None, picture_size: tuple[int, int] | None,
                 resize_mode: str) -> Tensor:
    """An inpaint control's hint (`inpaint_hint`) under its own mask, else the run's; unmasked without either,
    as the extension's zero mask. `inpaint_only` stands for `inpaint` in an inpainting run (the extension falls
    back to it there); outside one it also blends the decoded picture with the control image, which sdlab
    does not, so it is refused."""
    if control.module == "inpaint_only" and run_mask is None:
        raise RequestError(f"control {index}: inpaint_only outside an inpainting run also pastes the control image "
                           "over the picture outside the mask, which sdlab does not do; use inpaint "
                           "(inpaint_global_harmonious), or give the run a mask")
    mask = run_mask if control.mask is None else input_image(control.mask, f"control {index} mask")
    if mask is None:
        return hint
    mask = eight_bit(mask).convert("RGB")
    if region is not None:
        mask = cropped_to_region(mask, picture_size, region, tuple(reversed(hint.shape[-2:])), resize_mode)
    return inpaint_hint(hint, mask, resize_mode)


def prompt_marks(controls: Sequence[PreparedControl], batch: int,
                 device: torch.device | str) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The `cond_mark` entries of the conditional and the unconditional condition dicts: (B,) ones and zeros
    (A1111's `cond_mark`), batched by CFG with the prompts; none when no control acts on the prompt's rows
    only (`PreparedControl.cond_only`)."""
    if not any(control.cond_only for control in controls):
        return {}, {}
    return ({"cond_mark": torch.ones(batch, device=device)},
            {"cond_mark": torch.zeros(batch, device=device)})


class ControlledUNet:
    """`net(x, t, context, y=None, control_step=(i, N), cond_mark=None)`: the U-Net with the residuals of
    every control active at step i added (`UNet.forward`'s `control`; a T2I-Adapter's features, made once before
    sampling, its `adapter`). Without `control_step` every control runs; `cond_mark` (B,) is 1 on the prompt's rows
    and 0 on the negative prompt's (`prompt_marks`), and without it every row counts as the prompt's. `circular`:
    under Tiling the ControlNets pad circularly while they run, as the U-Net does (`models.circular_padding`):
    sdlab's choice, A1111 leaves them zero-padded (a T2I-Adapter, run before sampling, keeps zero padding).
    `freeu`: the U-Net's FreeU setting (`UNet.forward`'s `freeu`) at the calls of the steps its window takes
    (`FreeU.active`; every call without `control_step`), None: off. `deep_cache`: DeepCache over the sampling pass
    this model serves (`models.deep_cache`; each call needs its `control_step`), None: off. `sigmas_chosen`: the
    pass's sampler calls the model at sigmas it chooses (`SamplerSpec.chooses_sigmas`): DeepCache's step of a call
    is then the place of its timesteps among those called at (`DeepCacheRun.timestep_place`), not its
    `control_step`."""

    def __init__(self, unet: torch.nn.Module, controls: Sequence[PreparedControl], circular: bool = False,
                 freeu: FreeU | None = None, deep_cache: DeepCache | None = None, sigmas_chosen: bool = False):
        self.unet = unet
        self.controls = list(controls)
        self.freeu = freeu
        self.sigmas_chosen = sigmas_chosen
        cfg = getattr(unet, "cfg", None)
        self.deep_cache = None if deep_cache is None else DeepCacheRun(
            deep_cache, deep_cache.skip_block(cfg.num_res_blocks, len(cfg.channel_mult)))
        # each control's padded convolutions, found once: the ones Tiling makes circular while it runs
        self.wrapped = [padded_convolutions(control.net.model) if circular and not control.features else []
                        for control in self.controls]

    def parameters(self):   # the Denoiser reads the net's dtype from its first parameter
        return self.unet.parameters()

    def __call__(
        self, x: Tensor, t: Tensor, context: Tensor, y: Tensor | None = None,
        control_step: tuple[int, int] | None = None, guidance_emb: Tensor | None = None,
        cond_mark: Tensor | None = None, identity_rows: Tensor | None = None, identity_layers: Sequence[str] = (),
        image_prompt: Any = None, control_sigma: float | None = None,
    ) -> Tensor:
        """`identity_rows`, `identity_layers`: PAG's perturbed rows and layers, for the U-Net alone (`UNet.forward`;
        the ControlNets attend as usual on every row, as in diffusers' PAG ControlNet pipelines). `image_prompt`:
        IP-Adapters' image tokens, for the U-Net alone too (the ControlNets attend to the text, as in diffusers).
        `control_sigma`: the call's sigma, for the controls of a sigma window (`PreparedControl.acts`)."""
        skips: list[Tensor] | None = None
        middle: Tensor | None = None
        adapter: list[Tensor] | None = None
        for control, wrapped in zip(self.controls, self.wrapped):
            if not control.acts(control_step, control_sigma):
                continue
            rows = cond_mark.view(-1, 1, 1, 1) if control.cond_only and cond_mark is not None else 1.0   # (B, 1, 1, 1)
            if control.features:       # a T2I-Adapter: its features, made once, on every row
                features = [f.expand(x.shape[0], -1, -1, -1) * (scale * rows)        # (B, C_i, h_i, w_i)
                            for f, scale in zip(control.features, control.scales(len(control.features)))]
                adapter = features if adapter is None else _summed(adapter, features)
                continue
            cfg = control.net.config
            hint = control.hint.expand(x.shape[0], -1, -1, -1)                     # (B, 3, H, W)
            with circular_padding(*wrapped):
                residuals, mid = control.net.model(x[:, : cfg.unet.in_channels], t, context, hint, y)
            outputs = [r * (scale * rows) for r, scale in zip([*residuals, mid], control.scales(len(residuals) + 1))]
            residuals, mid = outputs[:-1], outputs[-1]
            if skips is None:
                skips, middle = residuals, mid
            else:                                   # MultiControlNet: the sum of every ControlNet's residuals
                skips = [a + b for a, b in zip(skips, residuals)]
                middle = middle + mid
        control = None if skips is None else (skips, middle)
        adapted = {} if adapter is None else {"adapter": adapter}   # T2I-Adapter features (`UNet.forward`)
        if adapter is not None and any(c.features and c.convention == "a1111" for c in self.controls):
            adapted["adapter_nearest"] = True       # features pooled down: resized onto the U-Net's grid
        freeu = self.freeu
        if freeu is not None and control_step is not None and not freeu.active(*control_step):
            freeu = None
        if self.deep_cache is not None:
            if control_step is None and not self.sigmas_chosen:
                raise ValueError("ControlledUNet: DeepCache needs each call's control_step (`tag_steps`)")
            step = self.deep_cache.timestep_place(t) if self.sigmas_chosen else control_step[0]
            adapted["deep_cache"] = slot = self.deep_cache.slot(   # each pass keeps its own features
                step, len(x), (context, y, cond_mark, identity_rows))
        out = self.unet(x, t, context, y, control=control, guidance_emb=guidance_emb, freeu=freeu,
                        identity_rows=identity_rows, identity_layers=identity_layers,
                        image_prompt=image_prompt, **adapted)
        if self.deep_cache is not None:
            self.deep_cache.keep(slot)
        return out


def _summed(a: list[Tensor], b: list[Tensor]) -> list[Tensor]:
    """Two T2I-Adapters' features added level by level (the longer one's last levels kept)."""
    return [x + y for x, y in zip(a, b)] + (a[len(b):] if len(a) > len(b) else b[len(a):])


def controlled_unet(unet: torch.nn.Module, controls: Sequence[PreparedControl], circular: bool = False,
                    freeu: FreeU | None = None, deep_cache: DeepCache | None = None,
                    sigmas_chosen: bool = False) -> Any:
    """`unet` itself without controls, FreeU or DeepCache, else the `ControlledUNet` that applies them (`circular`,
    `freeu`, `deep_cache`, `sigmas_chosen`: see there)."""
    if controls or freeu is not None or deep_cache is not None:
        return ControlledUNet(unet, controls, circular, freeu, deep_cache, sigmas_chosen)
    return unet


def step_of(sigma: Tensor | float, sigmas: Tensor) -> int:
    """The sampler step (0-based) whose interval [sigmas[i], sigmas[i+1]) holds `sigma`."""
    value = float(torch.as_tensor(sigma).flatten()[0])
    steps = len(sigmas) - 1
    starts = sigmas[:steps].to(torch.float64).cpu()
    index = int((starts >= value * (1 - 1e-5)).sum()) - 1
    return min(max(index, 0), steps - 1)


def sigma_windowed(controls: Sequence[PreparedControl]) -> bool:
    """Whether a control acts by ComfyUI's sigma window (`PreparedControl.sigma_window`) on part of the schedule:
    then each call must bring its sigma (`tag_steps`'s `with_sigma`)."""
    return any(control.sigma_window is not None for control in controls if control.start > 0 or control.end < 1)


def spans_part(controls: Sequence[PreparedControl]) -> bool:
    """Whether any control runs for part of the schedule only (start > 0 or end < 1): only then must each
    model call learn its step (`tag_steps`, which reads the call's sigma: on a GPU a wait for the queue)."""
    return any(control.start > 0 or control.end < 1 for control in controls)


def tag_steps(model: DenoiseFn, sigmas: Tensor, with_sigma: bool = False) -> DenoiseFn:
    """`model` called with `control_step=(i, N)`, the step of `sigmas` each call belongs to: the one the
    sampler declares (`steps.within_step`: a call at the next step's sigma), else the one its sigma lies in;
    `with_sigma`: also `control_sigma`, the call's sigma (its first row's, as ComfyUI reads t[0]) as a Python
    float, for ComfyUI's sigma windows (`sigma_windowed`)."""
    steps = len(sigmas) - 1

    def denoise(x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        declared = step_of_call()
        step = step_of(sigma, sigmas) if declared is None else declared
        if with_sigma:
            cond["control_sigma"] = float(torch.as_tensor(sigma).flatten()[0])
        return model(x, sigma, **cond, control_step=(step, steps))

    return denoise


def _number(value: float) -> str:
    return f"{value:g}"


def _drawn_resolution(control: ControlInput, convention: str) -> dict[str, Any]:
    """The control's `Processor Res` and `Pixel Perfect: True` where its preprocessor runs at a processor
    resolution (`RESOLUTION_MODULES`): the one given, or Pixel Perfect's (which follows from the image and the
    size); None for the others and at the picture's own size (unrecorded). Under A1111's convention every line
    has its unit's Processor Res (given, else 512), as the extension serializes every unit's, Pixel Perfect or a
    module without a resolution too."""
    takes = control.module in RESOLUTION_MODULES
    resolution = control.processor_res_under(convention)
    every = convention == "a1111"
    return {"Processor Res": resolution if every or (takes and not control.pixel_perfect) else None,
            "Pixel Perfect": True if takes and control.pixel_perfect else None}


def _read_thresholds(control: ControlInput) -> dict[str, float | None]:
    """The control's `Threshold A` / `Threshold B` its preprocessor reads (`PARAMETERS`); None for the others,
    which mean nothing (and go unrecorded)."""
    count = len(PARAMETERS.get(control.module, ()))
    return {"Threshold A": control.threshold_a if count > 0 else None,
            "Threshold B": control.threshold_b if count > 1 else None}


def infotext_lines(controls: Sequence[ControlInput | Any], convention: str = "diffusers") -> dict[str, str]:
    """A1111 ControlNet extension labels and values, in its order, e.g. {"ControlNet 0": "Module: none, Model:
    NAME [hash], Weight: 1, Resize Mode: Just Resize, Guidance Start: 0, Guidance End: 1"}: NAME is the file
    name without its suffix, hash A1111's short model hash (`legacy_hash`); the resize mode is the control's own
    (`recorded_resize_mode_under`; `convention`: the request's `control_convention`), as the extension writes it;
    a processor resolution it ran at adds `Processor Res` or `Pixel Perfect: True` (`_drawn_resolution`), given
    thresholds its preprocessor reads
    `Threshold A` / `Threshold B` (`_read_thresholds`), a control mode other than Balanced `Control Mode`. The
    infotext writer quotes each value. `controls` may hold (file, image[, strength[, start, end]]) records
    (`control_input`)."""
    lines = {}
    for index, control in enumerate(map(control_input, controls)):
        path = control.model_path
        try:
            model = f"{(Path(path).stem if Path(path).is_file() else Path(path).name)} [{legacy_hash(path)}]"
        except OSError:
            model = Path(path).name
        resolution = _drawn_resolution(control, convention)
        fields = {"Module": control.module, "Model": model, "Weight": _number(control.strength),
                  "Resize Mode": RESIZE_MODES[control.recorded_resize_mode_under(convention)],
                  "Processor Res": resolution["Processor Res"], **_read_thresholds(control),
                  "Guidance Start": _number(control.start), "Guidance End": _number(control.end),
                  "Pixel Perfect": resolution["Pixel Perfect"],
                  "Control Mode": None if control.control_mode == "balanced" else CONTROL_MODES[control.control_mode]}
        lines[f"ControlNet {index}"] = ", ".join(f"{label}: {_number(value) if isinstance(value, float) else value}"
                                                 for label, value in fields.items() if value is not None)
    return lines


def a1111_mode(label: Any, modes: dict[str, str]) -> str | None:
    """sdlab's name (a key of `modes`: `CONTROL_MODES` or `RESIZE_MODES`) of the A1111 mode `label`, one of its
    values or an older name of a resize mode (`A1111_RESIZE_ALIASES`); None for any other label."""
    label = A1111_RESIZE_ALIASES.get(label, label) if isinstance(label, str) else None
    return next((name for name, known in modes.items() if known == label), None)


RECORDED_NUMBERS = {"Weight": "strength", "Guidance Start": "start", "Guidance End": "end",
                    "Threshold A": "threshold_a", "Threshold B": "threshold_b"}
"""The numbers of a ControlNet infotext line (`infotext_lines`, the extension's `serialize`) -> `ControlInput`'s
fields."""


def _line_fields(line: str) -> dict[str, str]:
    """A ControlNet infotext line's items, as the extension's `parse_unit` splits it: "Label: value" at commas."""
    return dict(item.strip().split(": ", 1) for item in str(line).split(",") if ": " in item)


def undrawn_unit_labels(line: str, hires: bool) -> list[str]:
    """The "Label: value" items of a ControlNet infotext line that sdlab does not draw: an Hr Option other than
    Both when the run has a hires pass (`hires`)."""
    option = _line_fields(line).get("Hr Option", "Both")
    return [f"Hr Option: {option}"] if hires and option != "Both" else []


def _recorded_resolution(value: str) -> int:
    """A ControlNet line's Processor Res as a whole number, the extension's bound check applied
    (`processor_resolution`); one that is not a whole number is a ValueError naming it."""
    try:
        number = int(float(value))
    except (ValueError, OverflowError):
        raise ValueError(f"Processor Res {value!r} is not a number") from None
    if number != float(value):
        raise ValueError(f"Processor Res {value!r} is not a whole number")
    return processor_resolution(number)


def recorded_model(line: str) -> str | None:
    """The Model a ControlNet (or IP-Adapter) infotext line names, "NAME [hash]" as `/controlnet/model_list`
    titles it; None where it names none."""
    return _line_fields(line).get("Model")


def recorded_unit(line: str) -> dict[str, Any]:
    """The `ControlInput` settings a ControlNet infotext line records (`infotext_lines`, or the extension's):
    `module` (A1111's name or UI alias, `a1111_module`), `strength`, `start`, `end`, `threshold_a` /
    `threshold_b` (a negative one, the extension's -1, is the default: absent), `processor_res` (one outside the
    extension's slider, -1 too, its 512: `processor_resolution`), `pixel_perfect`, `control_mode` /
    `resize_mode` by sdlab's names; a label the line lacks is absent. The line is read as the extension's
    `parse_unit` reads it: items split at commas, each "Label: value". A module or mode sdlab has not, or a number
    that is not one, is a ValueError naming it."""
    fields = _line_fields(line)
    unit: dict[str, Any] = {}
    if "Module" in fields:
        unit["module"] = a1111_module(fields["Module"])
    for label, key in RECORDED_NUMBERS.items():
        if label not in fields:
            continue
        try:
            value = float(fields[label])
        except ValueError:
            raise ValueError(f"{label} {fields[label]!r} is not a number") from None
        if not key.startswith("threshold") or value >= 0:
            unit[key] = value
    if "Processor Res" in fields:
        unit["processor_res"] = _recorded_resolution(fields["Processor Res"])
    if "Pixel Perfect" in fields:
        unit["pixel_perfect"] = fields["Pixel Perfect"] == "True"
    for label, key, names in (("Control Mode", "control_mode", CONTROL_MODES),
                              ("Resize Mode", "resize_mode", RESIZE_MODES)):
        if label not in fields:
            continue
        name = a1111_mode(fields[label], names)
        if name is None:
            raise ValueError(f"{label} {fields[label]!r} is not one of {', '.join(names.values())}")
        unit[key] = name
    return unit
