"""Stable Diffusion XL (Stability AI, sgm layout): base, refiner and inpainting.

Base: CLIP ViT-L/14 (`conditioner.embedders.0.transformer.*`, HF layout) and OpenCLIP ViT-bigG/14
(`conditioner.embedders.1.model.*`, OpenCLIP layout); both penultimate hidden states without the final norm,
concatenated to 768 + 1280 = 2048 wide. The U-Net's added vector (`label_emb`) is 2816 wide: the bigG pooled
projection (1280) + six 256-wide Fourier embeddings of original size, crop corner and target size.
Refiner: bigG only (`conditioner.embedders.0.model.*`), context 1280, vector 2560 (1280 + five 256-wide
embeddings: original size, crop corner, aesthetic score). Latents are scaled by 0.13025.
An empty negative prompt is a zero context and pooled vector (`zero_empty_negative`: A1111's rule and diffusers'
default), unless a diffusers folder sets `force_zeros_for_empty_prompt` to false (`ModelBundle.zero_empty_negative`).
"""

from __future__ import annotations

from dataclasses import replace

from sdlab.diffusion.denoiser import Prediction
from sdlab.families.base import ConditionerSpec, FamilySpec, KohyaNames, Signature, TextEncoderSpec
from sdlab.families.latent_format import SDXL_LATENTS
from sdlab.families.sd1 import CLIP_L, SD_VAE
from sdlab.models.clip import CLIPTextConfig
from sdlab.models.unet import UNetConfig

OPENCLIP_BIGG = CLIPTextConfig(
    width=1280, layers=32, heads=20, mlp_width=5120, activation="gelu", projection_dim=1280
)

SDXL_CLIP_L = TextEncoderSpec(
    name="clip_l",
    config=CLIP_L,
    prefix="conditioner.embedders.0.transformer.",
    layout="hf",
    hidden_state="penultimate",
    pad_token_id=49407,
    diffusers_folder="text_encoder",
)

SDXL_BIGG = TextEncoderSpec(
    name="openclip_bigg",
    config=OPENCLIP_BIGG,
    prefix="conditioner.embedders.1.model.",
    layout="openclip",
    hidden_state="penultimate",
    pad_token_id=0,
    diffusers_folder="text_encoder_2",
)

SDXL_REFINER_BIGG = replace(SDXL_BIGG, prefix="conditioner.embedders.0.model.")

SDXL_UNET = UNetConfig(
    in_channels=4,
    out_channels=4,
    model_channels=320,
    channel_mult=(1, 2, 4),
    num_res_blocks=2,
    transformer_depth=(0, 2, 10),
    transformer_depth_middle=10,
    num_heads=None,
    head_dim=64,
    context_dim=2048,
    use_linear_proj=True,
    adm_in_channels=2816,
)

SDXL_REFINER_UNET = UNetConfig(
    in_channels=4,
    out_channels=4,
    model_channels=384,
    channel_mult=(1, 2, 4, 4),
    num_res_blocks=2,
    transformer_depth=(0, 4, 4, 0),
    transformer_depth_middle=4,
    num_heads=None,
    head_dim=64,
    context_dim=1280,
    use_linear_proj=True,
    adm_in_channels=2560,
)

SDXL = FamilySpec(
    name="sdxl",
    description="Stable Diffusion XL base (CLIP-L + OpenCLIP bigG, 1024 px, eps)",
    unet=SDXL_UNET,
    vae=SD_VAE,
    text_encoders=(SDXL_CLIP_L, SDXL_BIGG),
    latent_format=SDXL_LATENTS,
    prediction=Prediction.EPS,
    default_size=1024,
    diffusers_pipeline="StableDiffusionXLPipeline",
    signature=Signature(says="conditioner.embedders.0.transformer.* + conditioner.embedders.1.model.* (CLIP-L + OpenCLIP bigG)"),
    kohya=KohyaNames(
        base_model_version="sdxl_base_v1-0", architecture="stable-diffusion-xl-v1-base/lora", v_suffix=False,
        implementation="https://github.com/Stability-AI/generative-models",
    ),
    conditioner=ConditionerSpec(
        pooled=True, size_conds=("original_size", "crop_top_left", "target_size"), zero_empty_negative=True,
    ),
)

SDXL_REFINER = replace(
    SDXL,
    name="sdxl-refiner",
    description="Stable Diffusion XL refiner (OpenCLIP bigG only, aesthetic-score conditioning)",
    unet=SDXL_REFINER_UNET,
    text_encoders=(SDXL_REFINER_BIGG,),
    diffusers_pipeline="StableDiffusionXLImg2ImgPipeline",
    signature=Signature(says="conditioner.embedders.0.model.* (OpenCLIP bigG alone)"),
    conditioner=ConditionerSpec(
        pooled=True, size_conds=("original_size", "crop_top_left", "aesthetic_score"), zero_empty_negative=True,
    ),
)

SDXL_INPAINT = replace(
    SDXL,
    name="sdxl-inpaint",
    description="Stable Diffusion XL inpainting (9-channel U-Net)",
    unet=replace(SDXL_UNET, in_channels=9),
    diffusers_pipeline="StableDiffusionXLInpaintPipeline",
)

RELEASED = "2023-07"
SDXL_EDIT = replace(
    SDXL,
    name="sdxl-edit",
    description="Stable Diffusion XL InstructPix2Pix edit model (8-channel U-Net: latent, latent of the picture edited)",
    unet=replace(SDXL_UNET, in_channels=8),
    diffusers_pipeline="StableDiffusionXLInstructPix2PixPipeline",
)
FAMILIES = (SDXL, SDXL_REFINER, SDXL_INPAINT, SDXL_EDIT)
