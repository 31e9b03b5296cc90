"""Circular padding of a network's convolutions for the length of a block: A1111's "Tiling".

A convolution that pads with zeros sees a picture that ends at its border. One that pads circularly
(`nn.Conv2d`'s padding_mode "circular") reads the last rows and columns before the first ones and the first
after the last, so it sees a torus:

    zeros:     0    0  | x0 x1 ... xn |  0    0
    circular:  xn-1 xn | x0 x1 ... xn |  x0   x1

When every padded convolution of the U-Net and the VAE wraps around, nothing in the networks knows where
the picture ends (attention and GroupNorm see all positions alike), so the picture's left edge continues its
right edge and its top its bottom: copies of it tile a plane without a seam. A1111 does this for a run with
Tiling on (`sd_hijack.apply_circular`: padding_mode "circular" on every `Conv2d` of the SD model, "zeros"
again after). sdlab wraps the ControlNets' convolutions too while they run (`ControlledUNet`), so that the
hint's edges wrap with the picture's; that is sdlab's choice: the models of A1111's ControlNet extension are
not part of the SD model that `apply_circular` walks, so they keep zero padding there.

Convolutions that do not pad are left as they are: a 1x1 convolution has nothing to wrap, and the VAE
encoder's downsampling pads its right and bottom with zeros itself before an unpadded convolution, in
A1111 and diffusers alike, so it stays so. sdlab's faster paths for a convolution (`patch_conv`'s product
over few pixels and its add inside oneDNN's convolution, `upsampled_conv`'s transposed convolution) take
zero padding only; a circular convolution runs `nn.Conv2d`'s own: the input padded circularly, then the
convolution without padding.

The padding mode is a property of the modules, so the change is seen by every thread that runs them: the
caller holds them for the block, as a pipeline run holds its model (`Pipeline.run`: runs on one model take
turns).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


def padded_convolutions(*modules: nn.Module) -> list[nn.Conv2d]:
    """Every `nn.Conv2d` in `modules` (each once, in order) that pads its input."""
    found: dict[int, nn.Conv2d] = {}
    for module in modules:
        for layer in module.modules():
            # the (left, right, top, bottom) amounts nn.Conv2d pads by, also for padding="same"
            if isinstance(layer, nn.Conv2d) and any(layer._reversed_padding_repeated_twice):
                found.setdefault(id(layer), layer)
    return list(found.values())


@contextmanager
def circular_padding(*modules: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Within the block every padded convolution of `modules` pads circularly (module docstring); each gets
    its own padding mode back when the block ends, also when it raises (an error, a cancelled run). Blocks
    nest. `enabled=False` changes nothing (a run without Tiling)."""
    convolutions = padded_convolutions(*modules) if enabled else []
    modes = [conv.padding_mode for conv in convolutions]
    for conv in convolutions:
        conv.padding_mode = "circular"
    try:
        yield
    finally:
        for conv, mode in zip(convolutions, modes):
            conv.padding_mode = mode


__all__ = ["circular_padding", "padded_convolutions"]
