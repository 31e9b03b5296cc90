"""Loading a half-precision file in half precision holds no float32 copy of any weight: each tensor is read in
the file's dtype and converted straight to the target dtype (`CastingView`), one tensor at a time.

The check records every tensor that torch creates while loading (a `TorchDispatchMode` sees each operator's
outputs) and looks at what was made, not at time or at the process's memory."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bundle_fixtures import tiny_bundle, write_diffusers_folder

from sdlab.checkpoints import components
from sdlab.checkpoints.io import read_checkpoint
from sdlab.checkpoints.load import load_bundle, plan_checkpoint
from sdlab.checkpoints.save import save_bundle


class CreatedTensors(TorchDispatchMode):
    """Counts the real (non-meta) floating tensors created by torch operators, by dtype, and their elements."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: Counter[torch.dtype] = Counter()
        self.largest: dict[torch.dtype, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_storage(t) for t in _tensors((args, kwargs))}
        for t in _tensors(out):
            if t.device.type != "meta" and t.is_floating_point() and _storage(t) not in inputs:   # not a view
                self.elements[t.dtype] += t.numel()
                self.largest[t.dtype] = max(self.largest.get(t.dtype, 0), t.numel())
        return out


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _storage(t: torch.Tensor) -> int:
    return 0 if t.device.type == "meta" else t.untyped_storage().data_ptr()


@pytest.fixture(scope="module")
def half_files(tmp_path_factory):
    """The same tiny SD1 and SDXL models saved in fp16: original single files, a .ckpt and a diffusers folder."""
    folder = tmp_path_factory.mktemp("half")
    files = {}
    for family in ("sd1", "sdxl"):
        bundle = tiny_bundle(family)
        files[f"{family}.safetensors"] = save_bundle(bundle, folder / f"{family}.safetensors", dtype=torch.float16)
    state, _ = read_checkpoint(files["sd1.safetensors"])
    files["sd1.ckpt"] = folder / "sd1.ckpt"
    torch.save({"state_dict": {k: state[k] for k in state}}, files["sd1.ckpt"])
    half = tiny_bundle("sd1")
    for module in (half.unet, half.vae, *(te.model for te in half.text_encoders)):
        module.to(torch.float16)
    torch.set_default_dtype(torch.float16)                  # diffusers / transformers build the saved modules
    try:
        files["sd1-diffusers"] = write_diffusers_folder(half, folder / "sd1-diffusers")
    finally:
        torch.set_default_dtype(torch.float32)
    for path in files.values():
        assert {d for c in plan_checkpoint(path).report.components for d in c.dtypes} == {"float16"}, path
    return files


def weight_elements(bundle) -> int:
    modules = (bundle.unet, bundle.vae, *(te.model for te in bundle.text_encoders))
    return sum(t.numel() for m in modules for t in [*m.parameters(), *m.buffers()] if t.is_floating_point())


@pytest.mark.parametrize("name, dtype", [
    ("sd1.safetensors", torch.bfloat16), ("sd1.safetensors", torch.float16), ("sdxl.safetensors", torch.bfloat16),
    ("sd1.ckpt", torch.bfloat16), ("sd1-diffusers", torch.bfloat16),
])
def test_half_file_loads_without_a_float32_copy(half_files, name, dtype):
    with CreatedTensors() as created:
        bundle = load_bundle(half_files[name], dtype=dtype)
    assert bundle.dtype == dtype
    assert created.elements[torch.float32] == 0, created.largest    # not one fp32 weight, not even briefly
    # what was made: each weight read once in the file's dtype and converted once (the U-Net's convolution
    # weights once more, to channels-last), nothing in any other floating dtype but the schedule's float64
    weights = weight_elements(bundle)
    schedule = created.elements.pop(torch.float64, 0)        # a folder's own noise schedule (1000 levels) only
    assert schedule <= 10 * 1000, schedule
    assert set(created.elements) <= {torch.float16, dtype}, created.elements
    assert created.elements[dtype] <= 1.5 * weights, (created.elements, weights)
    assert created.elements[torch.float16] <= (2.5 if dtype == torch.float16 else 1.05) * weights, created.elements


def test_the_check_sees_a_float32_round_trip(half_files, monkeypatch):
    """A loader that converts through float32 (fp16 -> fp32 -> bf16) is caught by the same check."""
    original = components.CastingView.__getitem__

    def through_float32(self, key):
        t = self._entries[key]
        return original(self, key) if not t.is_floating_point() else t.float().to(self._dtype)

    monkeypatch.setattr(components.CastingView, "__getitem__", through_float32)
    with CreatedTensors() as created:
        load_bundle(half_files["sd1.safetensors"], dtype=torch.bfloat16)
    assert created.elements[torch.float32] > 0
