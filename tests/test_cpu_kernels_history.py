"""A bf16 picture on the CPU does not depend on what ran before it in the process.

sdlab's CPU kernels (`sdlab.models.cpu_kernels`: GroupNorm + SiLU, LayerNorm, attention, the AMX tile products)
round differently from PyTorch's operations. Where a small tensor took a kernel only once something larger had
loaded them, the same seed and settings on a small model drew a different picture after a larger model had
drawn in the same process (`sdlab serve`, an X/Y/Z plot over checkpoints, Python): the shipped model's 64 px
picture moved by up to 11/255 in 2,350 of its 4,096 pixels. Here each picture is drawn first with the kernels
not yet loaded in the process (as in the first process after the build, which found none when it began), then
again once they are (as after a larger model drew): bit-equal. It failed before: 2,801 pixels moved, by up to
14/255.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sdlab
from sdlab.models import cpu_kernels

pytestmark = pytest.mark.skipif(not torch.cpu._is_avx512_bf16_supported(), reason="the CPU has no AVX512-BF16")


def _pixels(pipe) -> np.ndarray:
    result = pipe.txt2img("a red apple on a light blue background", negative_prompt="blurry", seed=3, steps=4,
                          width=64, height=64)
    return np.asarray(result.images[0])


def test_a_bf16_picture_is_the_same_before_and_after_the_kernels_are_loaded(kernel, monkeypatch):
    pipe = sdlab.load(dtype="bf16")                                            # the shipped model, 64 px
    monkeypatch.setattr(cpu_kernels, "_state", {"looked": None})   # a process that found no build when it began
    first = _pixels(pipe)
    assert cpu_kernels.loaded()                                                # this picture's own norms did
    monkeypatch.setattr(cpu_kernels, "_state", {"module": kernel})             # as after a larger model drew
    again = _pixels(pipe)
    assert np.array_equal(first, again), (f"{int((first != again).any(-1).sum())} pixels moved, "
                                          f"by up to {int(np.abs(first.astype(int) - again).max())}")
