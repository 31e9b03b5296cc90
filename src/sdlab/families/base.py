"""What a model family is: the record type shared by `sd1.py`, `sd2.py`, `sdxl.py`.

A family spec is a constant: full-size configs of the three networks, how each text encoder is stored in
an original single-file checkpoint (prefix and layout) and how its output is used, the latent scaling, the
training schedule, the default prediction type and sizes. Loaders use the default configs for the
conventions that the tensors cannot show (heads per U-Net level, upcast attention, activations); the
shapes themselves are always read from the file.

Imports `models` (configs) and `diffusion` (prediction types) only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sdlab.diffusion.denoiser import Prediction
from sdlab.diffusion.schedules import NoiseSchedule
from sdlab.families.latent_format import LatentFormat
from sdlab.models.clip import CLIPTextConfig
from sdlab.models.layers import SDXL_SIZE_EMBED_DIM
from sdlab.models.unet import UNetConfig
from sdlab.models.vae import VAEConfig

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

TEXT_LAYOUTS = ("hf", "openclip")
HIDDEN_STATES = ("last", "penultimate_norm", "penultimate")


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder of a family and how it sits in an original checkpoint.

    `prefix` is the checkpoint prefix of the tower's own state dict:
      - layout "hf": a Hugging Face `CLIPTextModel` state dict, i.e. `text_model.*` (older SD1 files omit the
        `text_model.` level) plus an optional top-level `text_projection.weight`;
      - layout "openclip": an OpenCLIP text tower (`transformer.resblocks.N.attn.in_proj_weight`, ...),
        converted to sdlab names by `sdlab.checkpoints.openclip`.
    `hidden_state` is what the U-Net is conditioned on:
      - "last": output of the final LayerNorm (SD1, CLIP-L);
      - "penultimate_norm": the second-to-last layer, then the final LayerNorm (SD2, OpenCLIP-H);
      - "penultimate": the second-to-last layer without the final norm (SDXL, both encoders).
    """

    name: str                       # "clip_l", "openclip_h", "openclip_bigg"
    config: CLIPTextConfig
    prefix: str
    layout: str                     # "hf" | "openclip"
    hidden_state: str               # "last" | "penultimate_norm" | "penultimate"
    pad_token_id: int               # 49407 (end token) for CLIP-L, 0 for OpenCLIP towers
    diffusers_folder: str           # "text_encoder" | "text_encoder_2"

    def __post_init__(self) -> None:
        if self.layout not in TEXT_LAYOUTS:
            raise ValueError(f"TextEncoderSpec {self.name}: layout must be one of {TEXT_LAYOUTS}")
        if self.hidden_state not in HIDDEN_STATES:
            raise ValueError(f"TextEncoderSpec {self.name}: hidden_state must be one of {HIDDEN_STATES}")


@dataclass(frozen=True)
class ScheduleSpec:
    """The discrete training schedule (DDPM betas) of a family."""

    kind: str = "scaled_linear"     # betas linear in sqrt space, then squared
    num_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012

    def build(self) -> NoiseSchedule:
        return NoiseSchedule.make(self.kind, self.num_timesteps, self.beta_start, self.beta_end)


@dataclass(frozen=True)
class FamilySpec:
    """A model family: SD1, SD2, SDXL and their inpainting / refiner variants."""

    name: str                                   # "sd1", "sd1-inpaint", "sd2", ..., "sdxl-refiner"
    description: str
    unet: UNetConfig                            # full-size default; also carries the head convention
    vae: VAEConfig
    text_encoders: tuple[TextEncoderSpec, ...]
    latent_format: LatentFormat                 # channels, scaling (0.18215 SD1/SD2, 0.13025 SDXL), RGB preview
    prediction: Prediction                      # default when nothing says otherwise
    default_size: int                           # pixels, square
    diffusers_pipeline: str                     # model_index.json `_class_name`
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    default_size_v: int | None = None           # SD2: the v-prediction release is the 768 px model
    default_sampler: str = "dpmpp_2m"
    default_sigma_schedule: str = "karras"
    default_cfg: float = 7.0                    # classifier-free guidance scale a request gets by default
    unet_prefix: str = UNET_PREFIX
    vae_prefix: str = VAE_PREFIX

    @property
    def latent_scaling_factor(self) -> float:
        """z_model = factor * z_vae; a file may store its own (`bundle.scaling_factor`)."""
        return self.latent_format.scaling_factor

    @property
    def is_inpaint(self) -> bool:
        return self.unet.in_channels == 9

    @property
    def is_sdxl(self) -> bool:
        return self.unet.adm_in_channels is not None

    @property
    def is_refiner(self) -> bool:
        """SDXL refiner: its added vector is the pooled text + 5 size embeddings (original size, crop corner,
        aesthetic score), where the base has 6 (original size, crop corner, target size)."""
        if not self.is_sdxl:
            return False
        pooled = self.text_encoders[-1].config.projection_dim or 0
        return self.unet.adm_in_channels - pooled == 5 * SDXL_SIZE_EMBED_DIM

    def size_for(self, prediction: Prediction) -> int:
        """Default image side in pixels for this family with the given prediction type."""
        if prediction is Prediction.V and self.default_size_v is not None:
            return self.default_size_v
        return self.default_size

    @property
    def prefixes(self) -> dict[str, str]:
        """Component name -> checkpoint prefix: "unet", "vae", then each text encoder by its name."""
        table = {"unet": self.unet_prefix, "vae": self.vae_prefix}
        table.update({te.name: te.prefix for te in self.text_encoders})
        return table
