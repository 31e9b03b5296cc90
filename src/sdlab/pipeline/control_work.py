"""What a ControlNet adds to a generation's U-Net work, counted before anything loads.

A ControlNet is a copy of its U-Net's encoder half and middle block (`models.controlnet`) that runs beside the U-Net
at every model call of the steps its window takes (`control.in_window`), over the same rows (CFG's negative, PAG's
row and each AND part included: `ControlledUNet`). Its cost relative to one U-Net row, `controlnet_share`, is the
ratio of the two forwards' floating-point operations at the latent's size, counted by `torch.utils.flop_counter` on
the meta device from the configs (no weight, no arithmetic): attention grows with the square of the positions and
the encoder holds most of the finest, attending level, so the share moves with the size (SD 1.x at 512 px: 0.33 of
the U-Net; SDXL at 1024 px: 0.44). The hint block is left out: it runs once per generation
(`generation_memo`). A T2I-Adapter runs once before sampling and adds nothing per step.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from sdlab.checkpoints.controlnet import LoadedControlNet, read_controlnet
from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.t2i_adapter import LoadedT2IAdapter
from sdlab.models.controlnet import ControlNet, ControlNetConfig
from sdlab.models.unet import UNet, UNetConfig
from sdlab.pipeline.control import ControlInput, in_window
from sdlab.utils.file_hashes import read_per_version

__all__ = ["active_steps", "controlnet_config", "controlnet_share"]

CONTEXT_TOKENS = 77         # one prompt chunk: the cross-attention's keys


def controlnet_config(control: ControlInput) -> ControlNetConfig | None:
    """The config of the ControlNet `control` runs, read from its file's names and shapes (kept per file version);
    None for a T2I-Adapter, or a file that is no ControlNet (loading it names the problem)."""
    if isinstance(control.model, LoadedControlNet):
        return control.model.config
    if isinstance(control.model, LoadedT2IAdapter):
        return None
    return read_per_version(Path(control.model), _read_config)


def _read_config(path: Path) -> ControlNetConfig | None:
    try:
        return read_controlnet(path, shapes_only=True).config
    except (CheckpointError, OSError, ValueError):
        return None


def active_steps(control: ControlInput, steps: int, convention: str) -> int:
    """The steps of a pass of `steps` sampler steps whose calls run the control (`control.in_window` under the
    request's `control_convention`)."""
    return sum(in_window(control.start, control.end, i, steps, convention) for i in range(steps))


@lru_cache(maxsize=64)
def controlnet_share(unet: UNetConfig, controlnet: ControlNetConfig, height: int, width: int) -> float:
    """FLOPs of one ControlNet forward (its hint block left out) over FLOPs of one forward of the U-Net of config
    `unet`, one row each over a latent of `height` x `width`."""
    return _flops(controlnet, height, width) / _flops(unet, height, width)


def _flops(config: UNetConfig | ControlNetConfig, height: int, width: int) -> int:
    """Floating-point operations of one row's forward of the network `config` describes, built on the meta device; a
    ControlNet's without its hint block."""
    unet = config.unet if isinstance(config, ControlNetConfig) else config
    with torch.device("meta"):
        net = ControlNet(config) if isinstance(config, ControlNetConfig) else UNet(config)
        x = torch.zeros(1, unet.in_channels, height, width)                          # (1, C, h, w)
        t = torch.zeros(1)                                                           # (1,)
        context = torch.zeros(1, CONTEXT_TOKENS, unet.context_dim)                   # (1, T, C_ctx)
        y = None if unet.adm_in_channels is None else torch.zeros(1, unet.adm_in_channels)   # (1, adm)
        counted = FlopCounterMode(display=False)
        with torch.no_grad(), counted:
            if isinstance(config, ControlNetConfig):
                factor = config.hint_factor
                hint = torch.zeros(1, config.hint_channels, height * factor, width * factor)  # (1, 3, H, W)
                net(x, t, context, hint, y)
            else:
                net(x, t, context, y)
        total = counted.get_total_flops()
        if isinstance(config, ControlNetConfig):
            hint_block = FlopCounterMode(display=False)
            with torch.no_grad(), hint_block:
                net.input_hint_block(hint)
            total -= hint_block.get_total_flops()
    return total
