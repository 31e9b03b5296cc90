"""Stable Diffusion 2.x (Stability AI): OpenCLIP ViT-H/14 text, 64-wide heads, Linear projections.

The text tower sits at `cond_stage_model.model.*` in OpenCLIP layout (`conditioner.embedders.0.model.*` in a
file saved by Stability's generative-models code, the SDXL refiner's prefix; ComfyUI reads both as SD2, and
the U-Net without the refiner's `label_emb` tells them apart); the U-Net sees the penultimate layer
after the final LayerNorm, and padding is token 0. SD2 768-v models predict v and SD2-base predicts eps, but
nothing in the weights says which: the loader asks the user, the file's metadata or a sidecar `.yaml`, and
falls back to eps (`Prediction.EPS`) with a logged note. SD 2.1 computes attention in fp32
(`upcast_attention`), which changes nothing in fp32 and prevents overflow in fp16.
"""

from __future__ import annotations

from dataclasses import replace

from sdlab.diffusion.denoiser import Prediction
from sdlab.families.base import FamilySpec, KohyaNames, Signature, TextEncoderSpec
from sdlab.families.latent_format import SD_LATENTS
from sdlab.families.sd1 import SD_VAE
from sdlab.models.clip import CLIPTextConfig
from sdlab.models.unet import UNetConfig

OPENCLIP_H = CLIPTextConfig(
    width=1024, layers=24, heads=16, mlp_width=4096, activation="gelu", projection_dim=1024
)

SD2_OPENCLIP_H = TextEncoderSpec(
    name="openclip_h",
    config=OPENCLIP_H,
    prefix="cond_stage_model.model.",
    layout="openclip",
    hidden_state="penultimate_norm",
    pad_token_id=0,
    diffusers_folder="text_encoder",
    other_prefixes=("conditioner.embedders.0.model.",),
)

SD2_UNET = UNetConfig(
    in_channels=4,
    out_channels=4,
    model_channels=320,
    channel_mult=(1, 2, 4, 4),
    num_res_blocks=2,
    transformer_depth=(1, 1, 1, 0),
    transformer_depth_middle=1,
    num_heads=None,
    head_dim=64,
    context_dim=1024,
    use_linear_proj=True,
    upcast_attention=True,
)

SD2 = FamilySpec(
    name="sd2",
    description="Stable Diffusion 2.x (OpenCLIP ViT-H/14; 512 px eps base or 768 px v)",
    unet=SD2_UNET,
    vae=SD_VAE,
    text_encoders=(SD2_OPENCLIP_H,),
    latent_format=SD_LATENTS,
    prediction=Prediction.EPS,
    default_size=512,
    default_size_v=768,
    diffusers_pipeline="StableDiffusionPipeline",
    signature=Signature(says="cond_stage_model.model.* (OpenCLIP ViT-H)"),
    kohya=KohyaNames(
        base_model_version="sd_v2", architecture="stable-diffusion-v2-512/lora",
        architecture_v="stable-diffusion-v2-768-v/lora", v2=True,
    ),
)

SD2_INPAINT = replace(
    SD2,
    name="sd2-inpaint",
    description="Stable Diffusion 2.x inpainting (9-channel U-Net, 512 px, eps)",
    unet=replace(SD2_UNET, in_channels=9, upcast_attention=False),
    default_size_v=None,
    diffusers_pipeline="StableDiffusionInpaintPipeline",
)

RELEASED = "2022-11"
FAMILIES = (SD2, SD2_INPAINT)
