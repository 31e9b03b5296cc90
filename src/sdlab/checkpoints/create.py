"""New models: a bundle of freshly initialised networks for a family, full size or reduced width.

Training from scratch starts here, and so do tests and demos that need a checkpoint without
downloading one. Reduced-width ("tiny") configs follow the family conventions (SD1 U-Net: 8 heads;
SD2 / SDXL U-Net and every text encoder: 64-wide heads; 32 GroupNorm groups), so a saved tiny model
loads exactly as a released file of its family does. A tiny model's native size is `TINY_SIZE` (64 px, as
sdlab-tiny), not its family's 512 / 768 / 1024: it is recorded in the file (`modelspec.resolution`), so
drawing and training with it default to 64 px.

`write_new_model` writes such a model without building it (`sdlab new-model`): a full-size SDXL is 14 GB in
fp32, more than the machines that draw it with its 7 GB fp16 file hold.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.modules.module import register_module_parameter_registration_hook

from sdlab.checkpoints.file_format import bundle_metadata
from sdlab.checkpoints.io import LazyMapping, write_safetensors_atomic
from sdlab.checkpoints.save import bundle_parts, prediction_markers
from sdlab.families import FamilySpec, get_family
from sdlab.families.loaded import ModelBundle, TextEncoder
from sdlab.models.clip import CLIPTextConfig
from sdlab.models.layers import SDXL_SIZE_EMBED_DIM
from sdlab.models.tokenizer import default_tokenizer
from sdlab.models.unet import UNetConfig
from sdlab.models.vae import VAEConfig

TINY_VAE = VAEConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=1)
TINY_SIZE = 64                                                      # pixels per side


def _tiny_text_width(full_width: int) -> int:
    """64 for towers up to 1024 wide (CLIP-L, OpenCLIP-H), 128 for wider ones (OpenCLIP bigG)."""
    return 64 if full_width <= 1024 else 128


def tiny_text_configs(family: FamilySpec) -> tuple[CLIPTextConfig, ...]:
    """Two-layer text towers, 64 or 128 wide, one per text encoder of the family."""
    configs = []
    for te in family.text_encoders:
        width = _tiny_text_width(te.config.width)
        configs.append(replace(
            te.config, width=width, layers=2, heads=width // 64, mlp_width=2 * width,
            projection_dim=width if te.config.projection_dim is not None else None,
        ))
    return tuple(configs)


def tiny_unet_config(family: FamilySpec) -> UNetConfig:
    """A two-level U-Net with every code path of the family (attention, linear proj, added vector)."""
    texts = tiny_text_configs(family)
    context = sum(c.width for c in texts)
    base = family.unet
    conditioner = family.conditioner
    if conditioner.added_vector:                       # pooled text + size/crop (+ aesthetic) embeddings, 256 each
        pooled = texts[-1].projection_dim if conditioner.pooled else 0
        return replace(
            base, model_channels=64, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(0, 2),
            transformer_depth_middle=2, context_dim=context,
            adm_in_channels=pooled + conditioner.num_size_numbers * SDXL_SIZE_EMBED_DIM,
        )
    width = 32 if base.num_heads is not None else 64                 # SD1: 8 heads of 4; SD2: one 64-wide head
    return replace(
        base, model_channels=width, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(1, 1),
        transformer_depth_middle=1, context_dim=context,
    )


def new_bundle(
    family: FamilySpec | str,
    *,
    tiny: bool = False,
    unet: UNetConfig | None = None,
    vae: VAEConfig | None = None,
    text: tuple[CLIPTextConfig, ...] | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> ModelBundle:
    """Freshly initialised networks (PyTorch's default init, seeded) for `family`.

    Configs default to the family's full size, or its reduced-width variant with `tiny=True` (native size
    `TINY_SIZE`).
    """
    family = get_family(family) if isinstance(family, str) else family
    text = text or (tiny_text_configs(family) if tiny else tuple(te.config for te in family.text_encoders))
    unet = unet or (tiny_unet_config(family) if tiny else family.unet)
    vae = vae or (TINY_VAE if tiny else family.vae)
    if len(text) != len(family.text_encoders):
        raise ValueError(f"family {family.name} has {len(family.text_encoders)} text encoders, got {len(text)} configs")
    torch.manual_seed(seed)
    with torch.device(device):
        encoders = tuple(
            TextEncoder(spec=spec, config=cfg, model=family.text_module(cfg).eval(),
                        tokenizer=default_tokenizer(spec.pad_token_id))
            for spec, cfg in zip(family.text_encoders, text)
        )
        return ModelBundle(
            family=family,
            unet=family.unet_module(unet).eval(),
            vae=family.vae_module(vae).eval(),
            text_encoders=encoders,
            prediction=family.prediction,
            scaling_factor=family.latent_scaling_factor,
            unet_config=unet,
            vae_config=vae,
            native_size=TINY_SIZE if tiny else None,
        )


_TEXT_BLOCK = re.compile(r"encoder\.layers\.\d+\.")   # a text tower's block: OpenCLIP fuses its q, k, v in one tensor


@contextlib.contextmanager
def _recording_build_order() -> Iterator[list[nn.Module]]:
    """The modules that register a parameter while inside, in the order they do: the order in which the layers
    are built, and so initialised (a layer's init runs as it is built; the VAE decoder, for one, builds its levels
    in the reverse of the order it holds them in). Only this thread's: the hook is called for every thread's."""
    order: list[nn.Module] = []
    thread = threading.get_ident()

    def record(module: nn.Module, name: str, param: nn.Parameter) -> None:
        if threading.get_ident() == thread:
            order.append(module)

    handle = register_module_parameter_registration_hook(record)
    try:
        yield order
    finally:
        handle.remove()


def _file_groups(root: nn.Module) -> list[list[tuple[str, nn.Module]]]:
    """The layers of ``root`` that hold parameters, grouped into what one file tensor can need together: a text
    tower's block, otherwise one layer."""
    groups: dict[str, list[tuple[str, nn.Module]]] = {}
    for path, module in root.named_modules():
        if next(module.parameters(recurse=False), None) is not None:
            block = _TEXT_BLOCK.match(path + ".")
            groups.setdefault(block.group(0) if block else path, []).append((path, module))
    return list(groups.values())


def _made(layer: nn.Module) -> nn.Module:
    """A CPU copy of a `meta` layer initialised as building it does (``reset_parameters``, which its constructor
    runs), from the generator's current state."""
    made = copy.deepcopy(layer).to_empty(device="cpu")
    made.reset_parameters()
    return made


class _FreshTensors(LazyMapping):
    """The file tensors of a bundle built on `meta` (`new_bundle`'s, seeded with ``seed``), each made when it is
    read, in ``dtype``: the layers it comes from are initialised from the generator states they were built with,
    recorded by one pass over the layers in ``build_order``. The last group made is kept, so reading in the file's
    order (by name) makes each group once."""

    def __init__(self, bundle: ModelBundle, build_order: list[nn.Module], seed: int, dtype: torch.dtype):
        self._dtype = dtype
        layers = list(dict.fromkeys(build_order))
        self._index = {id(layer): i for i, layer in enumerate(layers)}
        torch.manual_seed(seed)
        # the generator state each layer starts from, in one block made first: a small tensor kept from between two
        # layers' large ones would split the heap's free space, which then grows by a layer now and then
        self._states = torch.empty((len(layers), torch.get_rng_state().numel()), dtype=torch.uint8)
        for i, layer in enumerate(layers):
            self._states[i] = torch.get_rng_state()
            _made(layer)                                        # moves the generator on as building the layer did
        self._groups: list[tuple[list[tuple[str, nn.Module]], Callable[[dict[str, Tensor]], dict[str, Tensor]]]] = []
        self._group_of: dict[str, int] = {}
        self._meta: dict[str, Tensor] = {}
        for root, file_state in bundle_parts(bundle):
            for group in _file_groups(root):
                meta = file_state(self._state(group, lambda layer: layer))
                self._group_of |= dict.fromkeys(meta, len(self._groups))
                self._groups.append((group, file_state))
                self._meta |= meta
        self._extra = prediction_markers(bundle)
        self._made: tuple[int, dict[str, Tensor]] | None = None

    def _state(self, group: list[tuple[str, nn.Module]], make: Callable[[nn.Module], nn.Module]) -> dict[str, Tensor]:
        return {f"{path}.{name}": value for path, layer in group for name, value in make(layer).state_dict().items()}

    def _initialised(self, layer: nn.Module) -> nn.Module:
        torch.set_rng_state(self._states[self._index[id(layer)]].clone())   # a row of its own: its view is refused
        return _made(layer)

    def shape(self, key: str) -> torch.Size:
        return self._extra[key].shape if key in self._extra else self._meta[key].shape

    def dtype(self, key: str) -> torch.dtype:
        return self._extra[key].dtype if key in self._extra else self._dtype

    def __getitem__(self, key: str) -> Tensor:
        if key in self._extra:
            return self._extra[key]
        index = self._group_of[key]
        if self._made is None or self._made[0] != index:
            group, file_state = self._groups[index]
            self._made = None                                   # the last group's tensors go before these are made
            made = file_state(self._state(group, self._initialised))
            self._made = index, {k: v.to(self._dtype) for k, v in made.items()}
        return self._made[1][key]

    def __iter__(self) -> Iterator[str]:
        return iter([*self._meta, *self._extra])

    def __len__(self) -> int:
        return len(self._meta) + len(self._extra)


def write_new_model(path: str | os.PathLike[str], family: FamilySpec | str, *, tiny: bool = False, seed: int = 0,
                    dtype: torch.dtype = torch.float16) -> Path:
    """Write the model ``new_bundle(family, tiny=tiny, seed=seed)`` makes to ``path`` (a `.safetensors` single file,
    as `save_bundle` writes it), its tensors in ``dtype``, without building it: the networks are built on `meta`
    and each tensor is made as it is written, so memory holds one layer (or text-encoder block) at a time. In
    fp32 the file is `save_bundle`'s of `new_bundle`'s model byte for byte; in fp16 / bf16, of that model cast.
    The caller's random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        with _recording_build_order() as build_order:
            bundle = new_bundle(family, tiny=tiny, seed=seed, device="meta")
        tensors = _FreshTensors(bundle, build_order, seed, dtype)
        return write_safetensors_atomic(path, tensors, bundle_metadata(bundle))
