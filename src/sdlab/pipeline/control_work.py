"""What a ControlNet adds to a generation's U-Net work, counted before anything loads.

A ControlNet is a copy of its U-Net's encoder half and middle block (`models.controlnet`) that runs beside the U-Net
at every model call of the steps its window takes (`control.in_window`), over the same rows (CFG's negative, PAG's
row and each AND part included: `ControlledUNet`). Its cost relative to one U-Net row, `controlnet_share`, is the
ratio of the two forwards' floating-point operations at the latent's size. Each network's operations are counted
once, by `torch.utils.flop_counter` on the meta device from its config (no weight, no arithmetic), at a small
reference latent and kept apart by how they grow (`FlopProfile`): a constant part (the timestep and SDXL vector
embeddings, the text context's keys and values), a part linear in each level's positions (convolutions, linear
layers, cross-attention's scores and weighted sums over the 77 context tokens) and a part growing with their square
(self-attention's scores and weighted sums), level by level; any size is then that sum at its own level positions
(each level ceil(h / 2) x ceil(w / 2) of the one above, as the stride-2 convs give), equal to a count at that size.
Attention grows with the square of the positions and the encoder holds most of the finest, attending level, so the
share moves with the size (SD 1.x at 512 px: 0.33 of the U-Net; SDXL at 1024 px: 0.44). The hint block is left
out: it runs once per generation (`generation_memo`). A T2I-Adapter runs once before sampling and adds nothing per
step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from sdlab.checkpoints.controlnet import LoadedControlNet, read_controlnet
from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.t2i_adapter import LoadedT2IAdapter
from sdlab.models.controlnet import ControlNet, ControlNetConfig
from sdlab.models.unet import UNet, UNetConfig
from sdlab.pipeline.control import ControlInput, in_window
from sdlab.utils.file_hashes import read_per_version

__all__ = ["FlopProfile", "active_steps", "controlnet_config", "controlnet_share", "flop_profile"]

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


def active_steps(control: ControlInput, steps: int, convention: str, until: int | None = None) -> int:
    """The steps of a pass of `steps` sampler steps whose calls run the control (`control.in_window` under the
    request's `control_convention`), among its first `until` (an SDXL refiner's handoff: the base's steps) or all."""
    return sum(in_window(control.start, control.end, i, steps, convention)
               for i in range(steps if until is None else min(until, steps)))


def controlnet_share(unet: UNetConfig, controlnet: ControlNetConfig, height: int, width: int) -> float:
    """FLOPs of one ControlNet forward (its hint block left out) over FLOPs of one forward of the U-Net of config
    `unet`, one row each over a latent of `height` x `width` (each network counted once, `flop_profile`)."""
    return flop_profile(controlnet).at(height, width) / flop_profile(unet).at(height, width)


@dataclass(frozen=True)
class FlopProfile:
    """One row's forward FLOPs of a network as a function of its latent's size: `constant` + sum over levels l of
    `linear[l]` * N_l + `quadratic[l]` * N_l^2, N_l the positions of level l (level 0 the latent's own)."""

    constant: int
    linear: tuple[int, ...]         # per level: FLOPs per position
    quadratic: tuple[int, ...]      # per level: FLOPs per position squared (self-attention)

    def at(self, height: int, width: int) -> int:
        """The FLOPs over a `height` x `width` latent."""
        positions = level_positions(height, width, len(self.linear))
        return self.constant + sum(a * n + b * n * n for a, b, n in zip(self.linear, self.quadratic, positions))


def level_positions(height: int, width: int, levels: int) -> list[int]:
    """The positions of each level of a `height` x `width` latent: each stride-2 conv (padding 1) takes h to
    ceil(h / 2); the decoder's upsampling lands on its skip's size, so the same levels."""
    found = []
    for _ in range(levels):
        found.append(height * width)
        height, width = math.ceil(height / 2), math.ceil(width / 2)
    return found


REFERENCE = 16      # the reference latent's side, doubled for the second count: 2^(levels - 1) divides both


@lru_cache(maxsize=32)
def flop_profile(config: UNetConfig | ControlNetConfig) -> FlopProfile:
    """The `FlopProfile` of the U-Net or ControlNet (hint block left out) `config` describes. Its operations are
    counted at a REFERENCE x REFERENCE latent (times 2^levels where it has more levels) and at twice that side; an
    operation whose FLOPs grow 1x, 4x or 16x is constant, linear or quadratic in the positions of the level of its
    output's rows (a conv's h x w, a linear layer's tokens, attention's queries)."""
    levels = len((config.unet if isinstance(config, ControlNetConfig) else config).channel_mult)
    side = max(REFERENCE, 2 ** levels)
    small, large = _tallies(config, side, 2 * side)
    if [op for (op, _), _ in small] != [op for (op, _), _ in large]:
        raise ValueError("FLOP profile: the two counts ran different operations")
    per_level = {n: level for level, n in enumerate(level_positions(side, side, levels))}
    constant, linear, quadratic = 0, [0] * levels, [0] * levels
    for ((op, rows), flops), ((_, _), flops_large) in zip(small, large):
        power = {flops: 0, 4 * flops: 1, 16 * flops: 2}.get(flops_large)  # 1x, 4x, 16x: positions^0, ^1, ^2
        if power == 0:
            constant += flops
        elif power is None or rows not in per_level or flops % rows ** power:
            raise ValueError(f"FLOP profile: {op} over {rows} rows grows {flops_large / flops}x, not as a level's "
                             "positions")
        else:
            (linear if power == 1 else quadratic)[per_level[rows]] += flops // rows ** power
    return FlopProfile(constant, tuple(linear), tuple(quadratic))


ROWS = {"aten.convolution": lambda out: out.shape[-2] * out.shape[-1],     # (B, C, h, w)
        "aten.mm": lambda out: out.shape[0], "aten.addmm": lambda out: out.shape[0],        # (B * N, C)
        "aten.bmm": lambda out: out.shape[1], "aten.baddbmm": lambda out: out.shape[1]}     # (B * heads, N, X)


class _OpTally(TorchDispatchMode):
    """Each operation `flop_registry` counts, in order: ((its name, its output's rows: `ROWS`), its FLOPs); while
    `paused` (the hint block) none."""

    def __init__(self) -> None:
        super().__init__()
        self.counted: list[tuple[tuple[str, int], int]] = []
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        if packet in flop_registry and not self.paused:
            name = str(packet)
            if name not in ROWS:
                raise ValueError(f"FLOP profile: no rule for the rows of {name}")
            self.counted.append(((name, ROWS[name](out)), flop_registry[packet](*args, **kwargs, out_val=out)))
        return out


def _tallies(config: UNetConfig | ControlNetConfig, *sides: int) -> list[list[tuple[tuple[str, int], int]]]:
    """The operations of one row's forward of the network `config` describes over a square latent of each of
    `sides` (`_OpTally`), built once on the meta device; a ControlNet's without its hint block."""
    counted = []
    with torch.device("meta"):
        net = ControlNet(config) if isinstance(config, ControlNetConfig) else UNet(config)
        for side in sides:
            tally = _OpTally()
            if isinstance(net, ControlNet):
                hooks = (net.input_hint_block.register_forward_pre_hook(lambda *_: setattr(tally, "paused", True)),
                         net.input_hint_block.register_forward_hook(lambda *_: setattr(tally, "paused", False)))
            with torch.no_grad(), tally:
                net(*_inputs(config, side, side))
            if isinstance(net, ControlNet):
                for hook in hooks:
                    hook.remove()
            counted.append(tally.counted)
    return counted


def _inputs(config: UNetConfig | ControlNetConfig, height: int, width: int) -> tuple:
    """One row's forward inputs of the U-Net or ControlNet of `config` over a `height` x `width` latent (on the
    current device)."""
    unet = config.unet if isinstance(config, ControlNetConfig) else config
    x = torch.zeros(1, unet.in_channels, height, width)                              # (1, C, h, w)
    t = torch.zeros(1)                                                               # (1,)
    context = torch.zeros(1, CONTEXT_TOKENS, unet.context_dim)                       # (1, T, C_ctx)
    y = None if unet.adm_in_channels is None else torch.zeros(1, unet.adm_in_channels)   # (1, adm)
    if isinstance(config, ControlNetConfig):
        factor = config.hint_factor
        hint = torch.zeros(1, config.hint_channels, height * factor, width * factor)  # (1, 3, H, W)
        return x, t, context, hint, y
    return x, t, context, y
