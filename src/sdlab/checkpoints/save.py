"""Save a `ModelBundle` as one `.safetensors` file in the original single-file layout.

The layout is the one the family's release used (and every SD tool reads): the U-Net under
`model.diffusion_model.`, the VAE under `first_stage_model.`, CLIP-L as a Hugging Face `text_model.*` state
dict under its prefix, OpenCLIP towers converted back to OpenCLIP names (fused `in_proj`, `(D, P)`
`text_projection`). The metadata records the family, the prediction type, the latent scaling and every
config as JSON (`sdlab.config`), so that loading it back needs no inference and no guessing: loading what
this writes gives the same configs and bit-identical tensors. The file is written atomically.

A v-prediction model also carries ComfyUI's empty marker tensors, as ComfyUI's checkpoint saver writes them
(`comfy_extras/nodes_model_merging.save_checkpoint`): `v_pred`, and `ztsnr` beside it when the model's
schedule has zero terminal SNR. A model on a continuous EDM noise model carries ComfyUI's `edm_mean` /
`edm_std` (Playground v2.5) or `edm_vpred.sigma_max` / `sigma_min` keys instead, where ComfyUI
(`supported_models.SDXL.model_type`, SDXL base models only) reads this very model from them
(`noise_model.noise_model_keys`); sdlab reads its own metadata (`sdlab.noise_model`, `sdlab.latent_stats`) first.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from sdlab.checkpoints.file_format import COMFY_V_PRED_KEY, COMFY_ZTSNR_KEY, bundle_metadata
from sdlab.checkpoints.io import write_safetensors_atomic
from sdlab.checkpoints.noise_model import noise_model_keys
from sdlab.checkpoints.openclip import sdlab_to_openclip
from sdlab.diffusion.prediction import Prediction
from sdlab.families import TextEncoderSpec
from sdlab.families.loaded import ModelBundle


def text_file_state(spec: TextEncoderSpec, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """sdlab text-encoder names -> the family's file layout, with the checkpoint prefix."""
    if spec.layout == "openclip":
        return {spec.prefix + k: v for k, v in sdlab_to_openclip(state).items()}
    return {
        spec.prefix + (k if k == "text_projection.weight" else "text_model." + k): v for k, v in state.items()
    }


def bundle_parts(bundle: ModelBundle) -> list[tuple[nn.Module, Callable[[dict[str, Tensor]], dict[str, Tensor]]]]:
    """Each network of `bundle` (text encoders, U-Net, VAE: the order `new_bundle` builds them in) with the function
    that puts its state dict, or the part of it one layer or text-encoder block holds, under the file's keys."""
    family = bundle.family
    parts: list[tuple[nn.Module, Callable[[dict[str, Tensor]], dict[str, Tensor]]]] = [
        (te.model, functools.partial(text_file_state, te.spec)) for te in bundle.text_encoders]
    for module, prefix in ((bundle.unet, family.unet_prefix), (bundle.vae, family.vae_prefix)):
        parts.append((module, lambda state, prefix=prefix: {prefix + k: v for k, v in state.items()}))
    return parts


def bundle_state_dict(bundle: ModelBundle, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Every tensor of `bundle` under its original single-file key, optionally cast to `dtype`."""
    out: dict[str, Tensor] = {}
    for module, file_state in bundle_parts(bundle):
        out |= file_state(module.state_dict())
    if dtype is not None:
        out = {k: v.to(dtype) if v.is_floating_point() else v for k, v in out.items()}
    return out


def prediction_markers(bundle: ModelBundle) -> dict[str, Tensor]:
    """ComfyUI's marker keys for `bundle`'s prediction and schedule (empty for an eps or x0 model), or for its
    continuous EDM noise model (`noise_model_keys`: ComfyUI's saver writes no `v_pred` beside those)."""
    if bundle.noise_model is not None:
        return noise_model_keys(bundle)
    if bundle.prediction is not Prediction.V:
        return {}
    markers = {COMFY_V_PRED_KEY: torch.tensor([])}                                  # (0,) float32
    if bundle.schedule is not None and bundle.schedule.zero_terminal_snr:
        markers[COMFY_ZTSNR_KEY] = torch.tensor([])
    return markers


def save_bundle(bundle: ModelBundle, path: str | os.PathLike[str], *, dtype: torch.dtype | None = None) -> Path:
    """Write `bundle` to `path` (`.safetensors`) in the original layout with its prediction markers, atomically.
    Returns the path."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{path}: sdlab saves only .safetensors files")
    tensors = bundle_state_dict(bundle, dtype) | prediction_markers(bundle)
    return write_safetensors_atomic(path, tensors, bundle_metadata(bundle))
