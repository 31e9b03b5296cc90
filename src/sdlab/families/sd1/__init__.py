"""Stable Diffusion 1.x (CompVis / RunwayML): CLIP ViT-L/14 text, 8-head U-Net with 1x1-conv projections.

Checkpoint layout (LDM): `model.diffusion_model.*` (U-Net), `first_stage_model.*` (VAE),
`cond_stage_model.transformer.text_model.*` (Hugging Face CLIPTextModel; files from before transformers 4.19
lack the `text_model.` level).
"""

from __future__ import annotations

from dataclasses import replace

from sdlab.diffusion.denoiser import Prediction
from sdlab.families.base import FamilySpec, KohyaNames, Signature, TextEncoderSpec
from sdlab.families.latent_format import SD_LATENTS
from sdlab.models.clip import CLIPTextConfig
from sdlab.models.unet import UNetConfig
from sdlab.models.vae import VAEConfig

CLIP_L = CLIPTextConfig(
    width=768, layers=12, heads=12, mlp_width=3072, activation="quick_gelu", projection_dim=None
)

SD1_CLIP_L = TextEncoderSpec(
    name="clip_l",
    config=CLIP_L,
    prefix="cond_stage_model.transformer.",
    layout="hf",
    hidden_state="last",
    pad_token_id=49407,
    diffusers_folder="text_encoder",
)

SD1_UNET = UNetConfig(
    in_channels=4,
    out_channels=4,
    model_channels=320,
    channel_mult=(1, 2, 4, 4),
    num_res_blocks=2,
    transformer_depth=(1, 1, 1, 0),
    transformer_depth_middle=1,
    num_heads=8,
    head_dim=None,
    context_dim=768,
    use_linear_proj=False,
)

SD_VAE = VAEConfig()

SD1 = FamilySpec(
    name="sd1",
    description="Stable Diffusion 1.x (CLIP ViT-L/14, 512 px, eps)",
    unet=SD1_UNET,
    vae=SD_VAE,
    text_encoders=(SD1_CLIP_L,),
    latent_format=SD_LATENTS,
    prediction=Prediction.EPS,
    default_size=512,
    diffusers_pipeline="StableDiffusionPipeline",
    signature=Signature(says="cond_stage_model.transformer.* (CLIP ViT-L)"),
    kohya=KohyaNames(base_model_version="sd_v1", architecture="stable-diffusion-v1/lora"),
)

SD1_INPAINT = replace(
    SD1,
    name="sd1-inpaint",
    description="Stable Diffusion 1.x inpainting (9-channel U-Net: latent, mask, masked-image latent)",
    unet=replace(SD1_UNET, in_channels=9),
    diffusers_pipeline="StableDiffusionInpaintPipeline",
)

SD1_EDIT = replace(
    SD1,
    name="sd1-edit",
    description="Stable Diffusion 1.x InstructPix2Pix edit model (8-channel U-Net: latent, latent of the picture edited)",
    unet=replace(SD1_UNET, in_channels=8),
    diffusers_pipeline="StableDiffusionInstructPix2PixPipeline",
)

RELEASED = "2022-08"
FAMILIES = (SD1, SD1_INPAINT, SD1_EDIT)
