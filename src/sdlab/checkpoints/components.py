"""One network's tensors on their way from a file to a module: `ComponentSource` and its mapping views.

Single files and diffusers folders both end up as one `ComponentSource` per network: the file-layout
tensors (prefix removed, read lazily), the function that renames them to sdlab names, the config, the
module factory the family names for it (`FamilySpec.components`), and the keys that were deliberately
skipped. `plan` runs the renaming on `meta` tensors to check every key and
shape against a `meta`-device module without reading any weight; `materialize` then reads each tensor once,
converts it to the target dtype and device, and hands it to `load_state_dict(strict=True, assign=True)`, so
peak memory stays near one copy of the weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.io import KeyedEntries, LazyMapping, dtypes_of, read_as, shapes_of
from sdlab.models.clip import CLIPTextConfig
from sdlab.models.unet import UNet, UNetConfig
from sdlab.models.vae import AutoencoderKL, VAEConfig

ComponentConfig = UNetConfig | VAEConfig | CLIPTextConfig

# Initialisers that modules call in their constructors. On the meta device they would compute nothing, and
# `normal_` there goes through torch's reference implementations, whose first use imports torch._dynamo
# (about 1 s of start-up); every weight is replaced from the file anyway. Those that dispatch to a torch
# function mode are skipped whole; the others reach their tensor's `normal_` / `uniform_` / fills, skipped on meta.
_INITIALISERS = frozenset({nn.init.normal_, nn.init.uniform_, nn.init.kaiming_uniform_, nn.init.constant_})
_META_FILLS = frozenset({Tensor.normal_, Tensor.uniform_, Tensor.zero_, Tensor.fill_, Tensor.erfinv_})


class _SkipInit(TorchFunctionMode):
    """Initialisers and fills of meta tensors returned untouched. A torch function mode, so it holds only in
    the thread that entered it: patching `torch.nn.init` (a module shared by every thread) would leave another
    thread's new modules uninitialised while it holds, and for good where two threads' holds overlap."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _INITIALISERS or func in _META_FILLS:
            tensor = args[0] if args else kwargs.get("tensor", kwargs.get("self"))
            if isinstance(tensor, Tensor) and tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


@contextmanager
def meta_device_without_init() -> Iterator[None]:
    """Build modules on the meta device with the `torch.nn.init` initialisers turned into no-ops (this thread only)."""
    with torch.device("meta"), _SkipInit():
        yield

def hf_text_to_sdlab(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Hugging Face CLIPTextModel(WithProjection) keys, with or without `text_model.`, -> sdlab names."""
    return {k.removeprefix("text_model."): state[k] for k in state}


class RenamedView(KeyedEntries):
    """`state` seen under other names (new name -> file name); tensors fetched on access."""

    def __init__(self, state: Mapping[str, Tensor], names: Mapping[str, str]):
        self._state, self._entries = state, dict(names)

    def __getitem__(self, key: str) -> Tensor:
        return self._state[self._entries[key]]

    def file_key(self, key: str) -> str:
        return self._entries[key]


class SubStateDict(RenamedView, LazyMapping):
    """The keys of `state` listed in `keys` (local name -> file name), fetched on access, their shapes and dtypes
    known without reading them (`state`'s own where it is a `LazyMapping`, which may also convert as it reads)."""

    def read_as(self, key: str, dtype: torch.dtype) -> Tensor:
        return read_as(self._state, self._entries[key], dtype)

    def shape(self, key: str) -> torch.Size:
        file_key = self._entries[key]
        return self._state.shape(file_key) if isinstance(self._state, LazyMapping) else self._state[file_key].shape

    def dtype(self, key: str) -> torch.dtype:
        file_key = self._entries[key]
        return self._state.dtype(file_key) if isinstance(self._state, LazyMapping) else self._state[file_key].dtype


def meta_view(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Same keys and shapes as `state`, as `meta` tensors (no data read)."""
    shapes, dtypes = shapes_of(state), dtypes_of(state)
    return {k: torch.empty(s, dtype=dtypes[k], device="meta") for k, s in shapes.items()}


class CastingView(KeyedEntries):
    """`state` with every floating tensor converted to `dtype` on `device` as it is read.

    Tensors that do not start on a 64-byte boundary (memory-mapped from a file at whatever offset it gives)
    are copied: CPU kernels take other paths on unaligned data, moving outputs by ~1e-6.
    """

    def __init__(self, state: Mapping[str, Tensor], dtype: torch.dtype, device: torch.device | str):
        self._entries, self._dtype, self._device = state, dtype, torch.device(device)     # `state`'s keys

    def __getitem__(self, key: str) -> Tensor:
        state = self._entries
        if isinstance(state, LazyMapping) and self._device.type == "cpu":   # converted as it is read
            stored = state.dtype(key)
            out = state.read_as(key, self._dtype if stored.is_floating_point else stored)
        else:
            t = state[key]
            out = t.to(device=self._device, dtype=self._dtype if t.is_floating_point() else t.dtype)
        return out.clone(memory_format=torch.contiguous_format) if out.data_ptr() % 64 else out


@dataclass(frozen=True)
class ComponentSource:
    """One network as stored: where, in which layout, with which config."""

    name: str                                               # "unet", "vae", or a text encoder's spec name
    build: Callable[[ComponentConfig], nn.Module]           # the module of a config (`ComponentSpec.build`)
    origin: str                                             # file (or folder) the tensors come from
    state: Mapping[str, Tensor]                             # file layout, prefix removed, lazily read
    to_sdlab: Callable[[Mapping[str, Tensor]], dict[str, Tensor]]
    config: ComponentConfig
    ignored: tuple[str, ...] = ()                           # file keys skipped on purpose (position_ids...)
    # the `meta` module `check` built, handed to the next `materialize` (building one costs ~0.1 s for a U-Net)
    _checked: list[nn.Module] = field(default_factory=list, compare=False, repr=False)

    def build_meta(self) -> nn.Module:
        with meta_device_without_init():
            return self.build(self.config)

    def convert(self, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        try:
            return self.to_sdlab(state)
        except (KeyError, ValueError) as exc:
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            raise CheckpointError(f"{self.origin}: {self.name}: {message}") from None

    def check(self) -> tuple[dict[str, torch.Size], int]:
        """Compare the converted keys and shapes with the module's; returns (sdlab shapes, parameter count).

        Raises `CheckpointError` naming the missing, unexpected and mis-shaped keys.
        """
        converted = {k: v.shape for k, v in self.convert(meta_view(self.state)).items()}
        module = self.build_meta()
        expected = {k: v.shape for k, v in module.state_dict().items()}
        problems = key_problems(expected, converted)
        if problems:
            raise CheckpointError(f"{self.origin}: {self.name} ({type(self.config).__name__}): " + "; ".join(problems))
        self._checked[:] = [module]
        return converted, sum(s.numel() for s in converted.values())

    def materialize(self, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
        """Build the module on `meta`, then assign the converted tensors (read once, cast once)."""
        module = self._checked.pop() if self._checked else self.build_meta()
        module.load_state_dict(self.convert(CastingView(self.state, dtype, device)), strict=True, assign=True)
        left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.device.type == "meta"]
        if left:
            raise CheckpointError(f"{self.origin}: {self.name}: tensors without data after loading: {_listing(left)}")
        if isinstance(module, (UNet, AutoencoderKL)):
            # assigned tensors arrive contiguous; convs run fastest channels-last (SD1.5's VAE decode at 512 px,
            # 2 threads: 7.8 -> 6.6 s in bf16, 14.6 -> 13.2 s in fp32; sdlab-tiny's at 16x16 latents 24 -> 21 ms)
            module.to(memory_format=torch.channels_last)
        return module.eval()


def key_problems(expected: Mapping[str, torch.Size], shapes: Mapping[str, torch.Size],
                 shown: Callable[[str], str] = str) -> list[str]:
    """What keeps a state dict of `shapes` from loading into a module whose own is `expected`: missing,
    unexpected and mis-shaped keys (named through `shown`), one phrase each; empty when it fits."""
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(shown(k) for k in set(shapes) - set(expected))
    wrong = sorted(k for k in set(expected) & set(shapes) if expected[k] != shapes[k])
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} keys: {_listing(unexpected)}")
    if wrong:
        listed = ", ".join(f"{k} {tuple(shapes[k])} (expected {tuple(expected[k])})" for k in wrong[:5])
        problems.append(f"{len(wrong)} keys with the wrong shape: {listed}")
    return problems


def _listing(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")
