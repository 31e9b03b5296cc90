"""The memory a request needs, estimated before any network runs, against the memory the device has free.

A request that cannot fit is refused with a `RequestError` that says how much it needs and how much is
free, instead of running for minutes and then dying in the allocator (or pushing the machine into swap).
The estimate counts what dominates a run, in the bundle's dtype (``e`` bytes per element):

- U-Net, one forward over ``rows = B x unet_rows`` latents of ``N = h * w`` positions (`unet_rows`: the rows one
  step's guidance batches for a picture: the prompt, the negative, PAG's perturbed row, an edit model's image
  row): about ``UNET_PER_ELEMENT * rows * N * c0 * e`` where ``c0`` is the first level's width. Its widest moments are the transformer blocks' feed-forward (GEGLU holds 8 x the channels per
  position) and the skip connections kept for the decoder half; without attention at the first level (SDXL)
  the first level is lighter.
  Attention itself goes through fused kernels that never hold the ``N x N`` score matrix.
- VAE decode (and encode for an init image), one picture at a time: about ``VAE_PER_ELEMENT * H * W * c * e``
  at full resolution, where ``c`` is the VAE's top-level width, or that for one tile when the picture is
  tiled, plus the float32 output and its blend weights.
- the pictures: the decoded batch and its conversions to 8-bit (``PICTURE_BYTES_PER_PIXEL`` per pixel).
- ControlNets and T2I-Adapters: each file's tensors in the U-Net's dtype (counted from its names and shapes, no
  weight read; each control loads its own), held from before sampling to its end, on top of the largest phase;
  with a ControlNet, the U-Net phase also holds the residuals the ControlNets hand it (one per input block and the
  middle one, summed over the ControlNets, which run one after another; `controlnet_residual_elements`, counted
  from the U-Net's levels: 3.25 ``c0 x N`` a row for channel_mult (1, 2) with one ResBlock, 5.125 for SD1's and
  SDXL's layouts) and each ControlNet's hint features, kept for the generation (``c0 x N`` a row):
  `controlnet_held_bytes` (a ControlNet's own forward, the U-Net's encoder half, is over before the U-Net's starts
  and stays below it). T2I-Adapter features are made once, a few per-level maps.
- IP-Adapters: the adapters and CLIP image encoders the request loads (`image_prompt.weights_to_load`: their
  tensors in the U-Net's dtype, none for those kept from an earlier request), held from before sampling to its end,
  on top of the largest phase. Encoding a picture is one 224 px pass of the encoder, far below the U-Net's.

The constants were measured (peak resident memory on CPU, fp32) on sdlab-tiny and reduced-width SD1 / SDXL
models at 256 to 1024 px and rounded down, so the estimate errs low: only requests that clearly cannot fit
are refused. Free memory: ``MemAvailable`` of /proc/meminfo (``os.sysconf`` where there is none) on CPU,
``torch.cuda.mem_get_info`` plus the caching allocator's unused reserve on CUDA; other devices are not checked.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from sdlab.checkpoints.controlnet import LoadedControlNet
from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.t2i_adapter import LoadedT2IAdapter, is_t2i_adapter
from sdlab.diffusion.guidance import edit_guidance, needs_uncond
from sdlab.diffusion.samplers import get_sampler
from sdlab.families.loaded import ModelBundle
from sdlab.models.unet import UNetConfig
from sdlab.pipeline.control import ControlInput, control_input
from sdlab.pipeline.image_prompt import weights_to_load
from sdlab.pipeline.request import GenerationRequest, RequestError
from sdlab.pipeline.tiling import should_tile

__all__ = ["available_bytes", "check_memory", "control_weights", "controlnet_held_bytes",
           "controlnet_residual_elements", "estimate_bytes", "is_out_of_memory", "unet_row_names",
           "unet_rows"]

UNET_PER_ELEMENT = {True: 28, False: 16}    # first level with / without attention
VAE_PER_ELEMENT = 6
VAE_TILE = 64                               # latent pixels per tile side (tiling.decode_tiled's default)
PICTURE_BYTES_PER_PIXEL = 3 * 4 * 4         # float32 RGB: the decoded batch, [0, 1], x 255, rounded
PAG_ROW = "PAG's extra row"
EDIT_IMAGE_ROW = "the edit model's image pass"


def unet_rows(bundle: ModelBundle | None, req: GenerationRequest) -> int:
    """The U-Net rows a guided step runs for one picture of a resolved one-part-prompt request, in one batch, as
    `generate` batches them:

    - the prompt, and the negative where guidance runs it (`ModelBundle.runs_uncond`: CFG above 1, a CFG++ sampler);
    - perturbed-attention guidance (``pag_scale`` not 0): one row more, [uncond, cond, perturbed] or [cond, perturbed]
      (`guidance.cfg`); not on an edit model, which draws without it;
    - an edit (InstructPix2Pix) model: its guidance rule (`guidance.edit_guidance` at the sampler's guidance scale):
      the image formula 3 rows (prompt + picture, negative + picture, negative + zero picture) at any CFG, plain
      CFG with the picture in both passes 2 (1 where CFG runs no negative), the conditional pass alone 1.

    FreeU scales features inside the U-Net's pass and an IP-Adapter adds tokens to its cross-attention: no row (its
    adapter and image encoder are counted apart, `estimate_bytes`).

    `bundle` None: a model not loaded yet (the server's work limit of a job posted for another model): the negative
    where CFG runs it (`needs_uncond`), PAG's row, no edit model's rule."""
    return len(unet_row_names(bundle, req))


def unet_row_names(bundle: ModelBundle | None, req: GenerationRequest) -> tuple[str, ...]:
    """The rows `unet_rows` counts, each named as an error message names it: "the prompt", "the negative",
    "PAG's extra row", "the edit model's image pass" (the image formula's third pass)."""
    sampler = get_sampler(req.sampler)
    uncond = (bundle.runs_uncond(req.cfg_scale, sampler.cfg_pp) if bundle is not None
              else needs_uncond(req.cfg_scale, sampler.cfg_pp))
    guided = ("the prompt", "the negative") if uncond else ("the prompt",)
    if bundle is not None and bundle.family.is_edit:
        how = edit_guidance(req.cfg_scale * sampler.cfg_scale_factor, req.image_cfg_scale, req.img2img_convention)
        return {"image": ("the prompt", "the negative", EDIT_IMAGE_ROW), "plain": guided,
                "conditional": ("the prompt",)}[how]
    return guided + ((PAG_ROW,) if req.pag_scale else ())


def estimate_bytes(bundle: ModelBundle, req: GenerationRequest) -> int:
    """Bytes a resolved request needs beyond the loaded weights (the largest phase plus what persists)."""
    element = torch.finfo(bundle.dtype).bits // 8
    factor = bundle.vae_config.downsample_factor
    height, width, batch = req.height, req.width, req.batch_size
    positions = (height // factor) * (width // factor)
    rows = batch * unet_rows(bundle, req)
    unet = bundle.unet_config
    attends_first = unet.transformer_depth[0] > 0
    unet_bytes = UNET_PER_ELEMENT[attends_first] * rows * positions * unet.model_channels * element

    vae_width = bundle.vae_config.base_channels * bundle.vae_config.channel_mult[0]
    tiled = req.tiled_vae if req.tiled_vae is not None else should_tile(height, width)
    vae_pixels = min(height * width, (VAE_TILE * factor) ** 2) if tiled else height * width
    vae_bytes = VAE_PER_ELEMENT * vae_pixels * vae_width * element            # one picture at a time
    if tiled:
        vae_bytes += 4 * height * width * 4                                    # float32 output + weighted tile
    pictures = PICTURE_BYTES_PER_PIXEL * batch * height * width
    image_prompts = weights_to_load(bundle, req.ip_adapters, req.control_convention) if req.ip_adapters else 0
    controls = [control_input(control) for control in req.controls]
    controlnets = sum(not _is_t2i(control.model) for control in controls)
    unet_bytes += controlnet_held_bytes(unet, height // factor, width // factor, rows, controlnets, element)
    return max(unet_bytes, vae_bytes + pictures) + image_prompts + control_weights(bundle, controls)


def controlnet_residual_elements(unet: UNetConfig, height: int, width: int) -> int:
    """The elements of one row of the residuals a ControlNet hands a U-Net of config `unet` over a latent of
    `height` x `width`: one per input block, shaped as its output (conv_in's at ``c0``, each ResBlock's at its
    level's width, each Downsample's at the next level's size, ceil(h / 2) x ceil(w / 2)), and the middle
    block's at the last level's width."""
    widths = [unet.model_channels * mult for mult in unet.channel_mult]
    total = unet.model_channels * height * width                          # conv_in: (c0, h, w)
    for level, channels in enumerate(widths):
        total += unet.num_res_blocks * channels * height * width          # (c0 * mult, h_l, w_l) each
        if level != len(widths) - 1:
            height, width = -(-height // 2), -(-width // 2)
            total += channels * height * width                            # Downsample: (c0 * mult, h_l+1, w_l+1)
    return total + widths[-1] * height * width                            # middle block: (c0 * mult[-1], ...)


def controlnet_held_bytes(unet: UNetConfig, height: int, width: int, rows: int, nets: int, element: int) -> int:
    """The bytes `nets` ControlNets hold through the U-Net's call over `rows` latents of `height` x `width`: their
    residuals, summed into one set (`controlnet_residual_elements`), and each ControlNet's hint features
    ((c0, h, w) a row, kept for the generation: `ControlNet.forward`); 0 without a ControlNet."""
    if not nets:
        return 0
    hints = nets * unet.model_channels * height * width
    return (controlnet_residual_elements(unet, height, width) + hints) * rows * element


def control_weights(bundle: ModelBundle, controls: Sequence[ControlInput]) -> int:
    """The bytes the request's ControlNets and T2I-Adapters load (`control.load_control_net`, each control its own,
    in the U-Net's dtype): each file's tensors counted from its names and shapes, no weight read; none for one
    given loaded."""
    from sdlab.checkpoints.diffusers_folder import weights_file
    from sdlab.checkpoints.io import read_checkpoint

    element = torch.finfo(bundle.dtype).bits // 8
    total = 0
    for control in map(control_input, controls):
        if isinstance(control.model, (LoadedControlNet, LoadedT2IAdapter)):
            continue
        path = Path(control.model)
        try:
            tensors = read_checkpoint(weights_file(path) if path.is_dir() else path, shapes_only=True)[0]
        except (CheckpointError, OSError):      # loading it names the problem
            continue
        total += sum(t.numel() for t in tensors.values()) * element
    return total


def _is_t2i(model: object) -> bool:
    """Whether a control's network is a T2I-Adapter (its features made once: no residuals through the U-Net)."""
    if isinstance(model, LoadedT2IAdapter):
        return True
    try:
        return not isinstance(model, LoadedControlNet) and is_t2i_adapter(model)
    except (CheckpointError, OSError):
        return False


def available_bytes(device: torch.device) -> int | None:
    """Free memory on `device` in bytes, or None when it cannot be told. On CUDA the device's free memory and what
    PyTorch's caching allocator holds unused (reserved, not allocated: the tensors a run let go, a refiner or the
    last job's activations), which the next allocations take first."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free) + max(int(cached), 0)
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(bundle: ModelBundle, req: GenerationRequest, available: int | None = None) -> None:
    """Raise `RequestError` when the request's estimate is more than the memory free on the bundle's device."""
    free = available_bytes(bundle.device) if available is None else available
    if free is None:
        return
    need = estimate_bytes(bundle, req)
    if need > free:
        raise RequestError(
            f"{req.width}x{req.height} x {req.batch_size} image(s) needs about {_gib(need)} of memory on "
            f"{bundle.device.type} and {_gib(free)} is free; draw smaller or fewer images (this model's native "
            f"size is {bundle.default_size} px)"
        )


# PyTorch's CPU allocator reports a failed allocation as a plain RuntimeError with this text
# ("DefaultCPUAllocator: can't allocate memory: you tried to allocate N bytes"), not as a MemoryError.
_CPU_ALLOCATOR_FAILURE = "can't allocate memory"


def is_out_of_memory(err: BaseException) -> bool:
    """Whether `err` is the device running out of memory: Python's MemoryError, torch's OutOfMemoryError
    (CUDA and other accelerators), or the CPU allocator's RuntimeError."""
    if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(err, RuntimeError) and _CPU_ALLOCATOR_FAILURE in str(err)


def _gib(count: int) -> str:
    return f"{count / 2**30:.1f} GiB"
