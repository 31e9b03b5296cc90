"""sdlab-tiny: the small latent diffusion model sdlab trains itself and ships inside the package.

64 x 64 pixels through an f=4 VAE (Rombach et al. 2022's f=4 models) gives 16 x 16 x 4 latents. The text
encoder is a CLIP-style tower on the real CLIP BPE tokenizer (49,408 tokens, 77 positions), trained
contrastively from scratch and used like SD1's CLIP-L: the last layer after the final LayerNorm, padded
with the end token 49407; it is stored in SD1's Hugging Face layout (`cond_stage_model.transformer.`), with
its `text_projection`. The latent scaling factor is measured on the training data when the bundle is
assembled (1 / std of the latents) and stored in the file's metadata; `SDLAB_TINY.latent_scaling_factor`
is only the fallback for a file without it. Sampling defaults: 14 steps of DPM++ 2M on the `sgm_uniform`
schedule (timesteps evenly spaced from 999) at CFG 5. On the public prompts (`sdlab eval
prompts/eval_prompts.txt`, seeds 0-3 and 4-7) that scores as 20 steps on the Karras schedule did (background
0.993 / 1.0, emoji top-5 0.858 / 0.852 against 0.864 / 0.852), while 12 Karras steps lose the background
(0.919: pink 0.12): Karras spends its steps at low noise, and this model settles the background early.

GroupNorm uses 8 groups, not SD's 32: a group normalises away its own spatial mean, so absolute colour
survives a norm only as differences between the channels of a group. SD's widths give 4 to 16 channels per
group; at these widths 32 groups would leave 1 to 3, and a VAE trained that way (1500 steps) reconstructed
dark blue and dark green backgrounds as the same teal. 8 groups give 4 to 16 again.

Files carry `sdlab.family = "sdlab-tiny"` in their metadata, which is how the loader recognises them;
without it, detection needs the structure only sdlab-tiny has in SD1's key layout: Linear attention
projections (SD1: 1x1 convs) and an f=4 VAE (SD1: f=8). Widths decide nothing: a reduced SD1 file with a
128-wide context is SD1.
"""

from __future__ import annotations

from sdlab.diffusion.denoiser import Prediction
from sdlab.families.base import FamilySpec, KohyaNames, Signature, TextEncoderSpec
from sdlab.families.latent_format import LatentFormat
from sdlab.models.clip import CLIPTextConfig
from sdlab.models.unet import UNetConfig
from sdlab.models.vae import VAEConfig

TINY_TEXT = CLIPTextConfig(
    width=128, layers=4, heads=2, mlp_width=512, activation="quick_gelu", projection_dim=128,
)

TINY_TEXT_ENCODER = TextEncoderSpec(
    name="clip_l",
    config=TINY_TEXT,
    prefix="cond_stage_model.transformer.",
    layout="hf",
    hidden_state="last",
    pad_token_id=49407,
    diffusers_folder="text_encoder",
)

TINY_UNET = UNetConfig(
    in_channels=4,
    out_channels=4,
    model_channels=64,
    channel_mult=(1, 2, 2),
    num_res_blocks=1,
    transformer_depth=(1, 1, 1),
    transformer_depth_middle=1,
    num_heads=None,
    head_dim=32,
    context_dim=TINY_TEXT.width,
    use_linear_proj=True,
    norm_groups=8,
)

# Latent -> RGB preview map, fitted by least squares against the shipped model's own VAE decoder
# (recipes/sdlab-tiny/fit_latent_preview.py: 30 pictures it draws, encoded and decoded again, the decoded
# pixels averaged over each latent's 4 x 4 patch; RMS error 0.23 of the [-1, 1] range), on model latents at
# the shipped file's measured scaling factor. The scaling factor itself is measured per file and stored in
# its metadata; 1.0 is only the fallback for a file without it.
TINY_RGB_FACTORS = (
    (-1.0718, -0.1044, -0.7356),
    (0.0079, 0.5669, -0.0636),
    (0.2795, -0.4170, -0.2976),
    (-0.7210, -0.0154, -0.3650),
)
TINY_RGB_BIAS = (0.0699, 0.3879, 0.2489)
TINY_LATENTS = LatentFormat(
    channels=4, scaling_factor=1.0, rgb_factors=TINY_RGB_FACTORS, rgb_bias=TINY_RGB_BIAS,
    rgb_fit_scaling=0.33216768928463836,
    preview_decoder_file="sdlab-tiny-preview.safetensors",  # sdlab.tiny.preview_decoder, distilled from its VAE
)

TINY_VAE = VAEConfig(base_channels=32, channel_mult=(1, 2, 3), num_res_blocks=1, norm_groups=8)  # f = 4: 16 x 16 x 4

SDLAB_TINY = FamilySpec(
    name="sdlab-tiny",
    description="sdlab's own small model (64 px, f=4 VAE, CLIP-style text tower trained from scratch, v)",
    unet=TINY_UNET,
    vae=TINY_VAE,
    text_encoders=(TINY_TEXT_ENCODER,),
    latent_format=TINY_LATENTS,
    prediction=Prediction.V,
    default_size=64,
    diffusers_pipeline="StableDiffusionPipeline",
    signature=Signature(
        says="cond_stage_model.transformer.* with Linear attention projections and an f=4 VAE (sdlab's own model)",
        requires=(("linear_proj", True), ("vae_factor", TINY_VAE.downsample_factor)),
        from_unet_alone=False,                  # only its metadata or its whole structure say sdlab-tiny
        from_diffusers=False,
    ),
    kohya=KohyaNames(base_model_version="sd_v1", architecture="stable-diffusion-v1/lora"),
    default_sampler="dpmpp_2m",
    default_sigma_schedule="sgm_uniform",       # 14 steps on it score as 20 on karras (module docstring)
    default_steps=14,
    default_cfg=5.0,                            # the CFG its evaluation and samples use
)

RELEASED = "2026"                                  # listed after the releases it follows
FAMILIES = (SDLAB_TINY,)
