"""Merging a LoRA makes one layer's float32 copy at a time: each layer's update is computed in float32 and
written into it before the next layer's is computed, as A1111's Lora extension does (`network_apply_weights`
merges and copies each layer in turn), never the float32 merged weights of every layer together.

The check records every float32 tensor torch creates while merging (a `TorchDispatchMode` sees each
operator's outputs) and the largest amount of them alive at once; it looks at what was made, not at the
process's memory."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from sdlab.checkpoints.lora import lora_merges, merge_lora_, merged_layers


class LiveFloat32(TorchDispatchMode):
    """The largest number of bytes of float32 tensors created inside the mode that were alive at once (a
    storage is alive while any tensor made on it inside the mode, or a view of one, is)."""

    def __init__(self) -> None:
        super().__init__()
        self._made: dict[int, tuple[list[weakref.ref], int]] = {}     # storage address -> (its tensors, bytes)
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in _real_tensors((args, kwargs))}
        self._made = {ptr: (refs, size) for ptr, (refs, size) in self._made.items() if any(r() is not None for r in refs)}
        for t in _real_tensors(out):
            ptr = t.untyped_storage().data_ptr()
            if ptr in self._made:                                             # a view of a tensor made here
                self._made[ptr][0].append(weakref.ref(t))
            elif t.dtype == torch.float32 and ptr not in inputs:              # made, not written in place
                self._made[ptr] = ([weakref.ref(t)], t.untyped_storage().nbytes())
        self.peak = max(self.peak, sum(size for _, size in self._made.values()))
        return out


def _real_tensors(tree) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, torch.Tensor) and t.device.type != "meta"]


def _layers_and_lora(count: int, dtype: torch.dtype):
    """`count` Linear(64, 64) layers in `dtype` and a rank-4 LoRA (alpha 2) for each of them."""
    g = torch.Generator().manual_seed(0)
    layers, lora = {}, {}
    for i in range(count):
        layer = nn.Linear(64, 64).to(dtype)
        layers[f"lora_unet_layer_{i}"] = layer
        lora[f"lora_unet_layer_{i}"] = {"down": torch.randn(4, 64, generator=g), "up": torch.randn(64, 4, generator=g),
                                        "alpha": torch.tensor(2.0)}
    return layers, lora


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_merging_holds_one_layer_in_float32_at_a_time(dtype):
    """16 layers merged: at most the float32 tensors of one layer's merge (its weight, the update, the scaled
    update, the sum: 4 x 16 KiB) and the previous layer's result (until it is written) are alive at once, where
    holding every merged layer before writing them held all 16 (256 KiB and more)."""
    layers, lora = _layers_and_lora(16, dtype)
    layer_bytes = 64 * 64 * 4
    with LiveFloat32() as live:
        assert merge_lora_(layers, lora, 0.8) == []
    assert live.peak <= 5 * layer_bytes + 64 * 4 * 8, f"{live.peak / layer_bytes:.1f} layers of float32 alive at once"


def test_layer_by_layer_merge_is_the_float32_merge_cast_once():
    """Each layer gets ``W + m * scale * up @ down`` computed in float32 from its own weight and cast once to its
    dtype, and a stack of LoRAs adds up in float32 before that one cast."""
    layers, lora = _layers_and_lora(3, torch.bfloat16)
    _, second = _layers_and_lora(3, torch.bfloat16)
    second = {name: {**module, "up": module["up"].flip(0)} for name, module in second.items()}
    own = {name: layer.weight.detach().clone() for name, layer in layers.items()}
    merges, _ = lora_merges(layers, lora, 0.8)
    merges, _ = lora_merges(layers, second, -0.5, merges)
    merged = {layer: weight for layer, weight, _ in merged_layers(merges)}
    for name, layer in layers.items():
        want = own[name].float()
        for module, multiplier in ((lora[name], 0.8), (second[name], -0.5)):
            want = want + multiplier * (module["up"] @ module["down"] * 0.5)
        assert merged[layer].dtype == torch.float32
        assert torch.equal(merged[layer].to(torch.bfloat16), want.to(torch.bfloat16))
        assert torch.equal(layer.weight, own[name])                  # computing them writes nothing


def test_a_module_that_does_not_fit_writes_nothing():
    """Every module is checked against its layer (on the meta device, computing nothing) before any layer is
    written: a misfit last module leaves the first layers as they were."""
    layers, lora = _layers_and_lora(3, torch.bfloat16)
    lora["lora_unet_layer_2"]["down"] = torch.randn(4, 32)
    own = {name: layer.weight.detach().clone() for name, layer in layers.items()}
    with pytest.raises(ValueError, match="module lora_unet_layer_2: lora tensors"):
        merge_lora_(layers, lora, 1.0)
    assert all(torch.equal(layer.weight, own[name]) for name, layer in layers.items())
