"""What a model family is: the records a family folder (`sdlab/families/<name>/`) fills in.

A family spec is a constant that owns everything sdlab knows about one kind of model:
  - its components: full-size configs of the networks, the module each is built with, its checkpoint prefix
    and key layout (`components`); loaders use the configs for the conventions the tensors cannot show
    (heads per U-Net level, upcast attention, activations), the shapes are always read from the file;
  - its detection `Signature`: what a file of the family shows (matched by `sdlab.checkpoints.detect`);
  - its conditioner (`ConditionerSpec`, plus each text encoder's hidden-state rule): what a prompt becomes;
  - its latent format (`LatentFormat`: channels, scaling, shift, RGB preview), training schedule and model
    sampling (`model_sampling(prediction)`), default prediction type, sizes and sampling defaults, and the names other tools give it (`KohyaNames`).

Imports `models` (configs, modules) and `diffusion` (prediction types, schedules) only.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from sdlab.diffusion.denoiser import Prediction
from sdlab.diffusion.model_sampling import ContinuousEDMModelSampling, DiscreteModelSampling, ModelSampling
from sdlab.diffusion.schedules import ZERO_SNR_TERMINAL_ALPHAS_CUMPROD, NoiseSchedule
from sdlab.families.latent_format import LatentFormat
from sdlab.models.clip import CLIPTextConfig, CLIPTextModel
from sdlab.models.unet import UNet, UNetConfig
from sdlab.models.vae import AutoencoderKL, VAEConfig

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
    `other_prefixes`: where other tools' single files keep the same tower (SD2 as Stability's generative-models
    code saves it: `conditioner.embedders.0.model.`, which ComfyUI reads as SD2); a file uses one of them.
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
    other_prefixes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.layout not in TEXT_LAYOUTS:
            raise ValueError(f"TextEncoderSpec {self.name}: layout must be one of {TEXT_LAYOUTS}")
        if self.hidden_state not in HIDDEN_STATES:
            raise ValueError(f"TextEncoderSpec {self.name}: hidden_state must be one of {HIDDEN_STATES}")


@dataclass(frozen=True)
class ScheduleSpec:
    """The discrete training schedule (DDPM betas) of a family, or of one model that declares its own (a
    diffusers folder's `scheduler_config.json`, a single file's `ztsnr` marker: `ModelBundle.schedule`).

    `zero_terminal_snr`: betas rescaled so the last timestep is pure noise (Lin et al. 2023, diffusers'
    `rescale_betas_zero_snr`); its infinite sigma_max is made finite by `terminal`, the last alphas_cumprod
    (2**-24 as diffusers, 4.897e-08 as A1111 / ComfyUI; see `NoiseSchedule.from_betas`).
    """

    kind: str = "scaled_linear"     # betas linear in sqrt space, then squared
    num_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    zero_terminal_snr: bool = False
    terminal: float = ZERO_SNR_TERMINAL_ALPHAS_CUMPROD

    def build(self) -> NoiseSchedule:
        return NoiseSchedule.make(self.kind, self.num_timesteps, self.beta_start, self.beta_end,
                                  zero_terminal_snr=self.zero_terminal_snr, terminal=self.terminal)

    def describe(self) -> str:
        """In words, for logs and `sdlab inspect`: "scaled_linear 0.00085..0.012, 1000 steps, zero terminal SNR"."""
        betas = "" if self.kind in ("cosine", "squaredcos_cap_v2") else f" {self.beta_start:g}..{self.beta_end:g}"
        zsnr = f", zero terminal SNR (last alphas_cumprod {self.terminal:.4g})" if self.zero_terminal_snr else ""
        return f"{self.kind}{betas}, {self.num_timesteps} steps{zsnr}"


@dataclass(frozen=True)
class EDMSpec:
    """A continuous EDM noise model one model declares in place of its family's DDPM schedule
    (`ModelBundle.noise_model`): Playground v2.5 (EDM's F-prediction, sigma 0.002..80, sigma_data 0.5) and
    CosXL (v-prediction, sigma 0.002..120, sigma_data 1). Sampled by `ContinuousEDMModelSampling`."""

    sigma_min: float = 0.002
    sigma_max: float = 120.0
    sigma_data: float = 1.0

    def build(self, prediction: Prediction) -> ContinuousEDMModelSampling:
        return ContinuousEDMModelSampling(prediction, self.sigma_min, self.sigma_max, self.sigma_data)

    def describe(self) -> str:
        """In words, for logs and `sdlab inspect`: "continuous EDM, sigma 0.002..80, sigma_data 0.5"."""
        return f"continuous EDM, sigma {self.sigma_min:g}..{self.sigma_max:g}, sigma_data {self.sigma_data:g}"


SIZE_CONDS = {"original_size": 2, "crop_top_left": 2, "target_size": 2, "aesthetic_score": 1}  # name -> numbers


@dataclass(frozen=True)
class ConditionerSpec:
    """What a prompt becomes besides each encoder's hidden states (`TextEncoderSpec.hidden_state`, concatenated
    into the cross-attention context). The pipeline's `make_cond` and every training task follow it.

    `pooled`: the last encoder's projected pooled output starts an added vector `y` (SGM's `label_emb` input);
    `size_conds`: numbers appended to `y`, each as a 256-wide sinusoidal embedding, in this order (names from
    `SIZE_CONDS`: original_size (h, w), crop_top_left (top, left), target_size (h, w), aesthetic_score);
    `zero_empty_negative`: an empty negative prompt is a zero context and pooled vector, not the encoding of "".
    """

    pooled: bool = False
    size_conds: tuple[str, ...] = ()
    zero_empty_negative: bool = False

    def __post_init__(self) -> None:
        unknown = [name for name in self.size_conds if name not in SIZE_CONDS]
        if unknown:
            raise ValueError(f"ConditionerSpec: unknown size conditions {unknown}; known: {', '.join(SIZE_CONDS)}")

    @property
    def added_vector(self) -> bool:
        """Whether the U-Net takes the added vector `y`."""
        return self.pooled or bool(self.size_conds)

    @property
    def num_size_numbers(self) -> int:
        return sum(SIZE_CONDS[name] for name in self.size_conds)


Facts = tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class Signature:
    """What a checkpoint of the family shows, matched against the evidence `sdlab.checkpoints.detect` gathers
    from key names and shapes. Structure decides, widths never do:

    - a file with text-encoder keys is of a family whose text-tower prefixes are exactly the ones found and
      whose `requires` facts all hold (the most specific match wins: sdlab-tiny's Linear projections and f=4
      VAE beat SD1, which shares its text layout);
    - a file holding only a U-Net is of a family whose default U-Net has its structure (levels, attention
      projection kind, added vector), unless `from_unet_alone` is off;
    - a diffusers folder is of a family whose U-Net, text folders and text activation its configs match,
      unless `from_diffusers` is off.
    Variants (inpainting) share their base's signature; the U-Net's input channels pick one.
    Fact names are fields of `sdlab.checkpoints.detect.Evidence` (linear_proj, vae_factor, unet_levels, ...).
    """

    says: str                                   # what such a file looks like, in words (for messages)
    requires: Facts = ()
    from_unet_alone: bool = True
    from_diffusers: bool = True


@dataclass(frozen=True)
class KohyaNames:
    """How kohya-ss sd-scripts (and the SAI model spec) name a family in LoRA metadata."""

    base_model_version: str                     # ss_base_model_version: "sd_v1", "sd_v2", "sdxl_base_v1-0"
    architecture: str                           # modelspec.architecture of a LoRA
    v_suffix: bool = True                       # v-prediction models append "_v" to the base version
    architecture_v: str | None = None           # modelspec.architecture for v-prediction (None: the same)
    v2: bool = False                            # ss_v2 (OpenCLIP-H text: SD2)
    implementation: str = "diffusers"           # modelspec.implementation

    def version(self, prediction: Prediction) -> str:
        return self.base_model_version + ("_v" if self.v_suffix and prediction is Prediction.V else "")

    def architecture_for(self, prediction: Prediction) -> str:
        return self.architecture_v if prediction is Prediction.V and self.architecture_v else self.architecture


@dataclass(frozen=True)
class ComponentSpec:
    """One network of a family: its name, default config, the module built from a config, and where and how
    its tensors sit in an original single file (prefix; key layout: "ldm" as stored, "hf", "openclip")."""

    name: str                                   # "unet", "vae", or a text encoder's name
    config: UNetConfig | VAEConfig | CLIPTextConfig
    build: Callable[[Any], nn.Module]
    prefix: str
    layout: str


@dataclass(frozen=True)
class FamilySpec:
    """A model family: SD1, SD2, SDXL and their inpainting / edit / refiner variants, sdlab-tiny, or a plug-in."""

    name: str                                   # "sd1", "sd1-inpaint", "sd2", ..., "sdxl-refiner"
    description: str
    unet: UNetConfig                            # full-size default; also carries the head convention
    vae: VAEConfig
    text_encoders: tuple[TextEncoderSpec, ...]
    latent_format: LatentFormat                 # channels, scaling (0.18215 SD1/SD2, 0.13025 SDXL), RGB preview
    prediction: Prediction                      # default when nothing says otherwise
    default_size: int                           # pixels, square
    diffusers_pipeline: str                     # model_index.json `_class_name`
    signature: Signature
    kohya: KohyaNames
    conditioner: ConditionerSpec = field(default_factory=ConditionerSpec)
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    default_size_v: int | None = None           # SD2: the v-prediction release is the 768 px model
    default_sampler: str = "dpmpp_2m"
    default_sigma_schedule: str = "karras"
    default_cfg: float = 7.0                    # classifier-free guidance scale a request gets by default
    default_steps: int = 20                     # sampler steps a request gets by default
    unet_prefix: str = UNET_PREFIX
    vae_prefix: str = VAE_PREFIX
    unet_module: Callable[[UNetConfig], nn.Module] = UNet
    vae_module: Callable[[VAEConfig], nn.Module] = AutoencoderKL
    text_module: Callable[[CLIPTextConfig], nn.Module] = CLIPTextModel
    sampling: Callable[[FamilySpec, Prediction], ModelSampling] | None = None   # None: discrete on `schedule`

    def __post_init__(self) -> None:
        if self.conditioner.added_vector != (self.unet.adm_in_channels is not None):
            raise ValueError(f"FamilySpec {self.name}: the conditioner's added vector and the U-Net's "
                             f"adm_in_channels ({self.unet.adm_in_channels}) disagree")

    @property
    def latent_scaling_factor(self) -> float:
        """z_model = factor * z_vae; a file may store its own (`bundle.scaling_factor`)."""
        return self.latent_format.scaling_factor

    @property
    def is_inpaint(self) -> bool:
        return self.unet.in_channels == 9

    @property
    def is_edit(self) -> bool:
        """An InstructPix2Pix edit model: its U-Net reads the latent of the picture it edits as 4 more channels
        (8 in all), and guidance has an image scale (`guidance.edit_cfg`)."""
        return self.unet.in_channels == 8

    @property
    def is_sdxl(self) -> bool:
        """The U-Net takes an added vector (pooled text + size numbers), as SDXL's base, refiner and inpainting do."""
        return self.conditioner.added_vector

    @property
    def is_refiner(self) -> bool:
        """SDXL refiner: its added vector carries an aesthetic score (original size, crop corner, aesthetic
        score), where the base has original size, crop corner and target size."""
        return "aesthetic_score" in self.conditioner.size_conds

    @property
    def text_layouts(self) -> tuple[tuple[str, ...], ...]:
        """Each way a single file may lay out its text encoders, one checkpoint prefix per encoder: the family's
        own first, then those with encoders under their `other_prefixes`. Detection matches a file's text keys
        against these."""
        return tuple(itertools.product(*((te.prefix, *te.other_prefixes) for te in self.text_encoders)))

    def model_sampling(self, prediction: Prediction, schedule: ScheduleSpec | None = None) -> ModelSampling:
        """How the family's networks relate to the sampler's noisy sample: the DDPM `schedule` (the family's, or
        one a model declares) with the given prediction type (eps / v / x0), unless the family names another
        (`sampling`, e.g. flow matching), which then sees the family with that schedule."""
        if self.sampling is not None:
            family = self if schedule is None or schedule == self.schedule else replace(self, schedule=schedule)
            return self.sampling(family, prediction)
        return DiscreteModelSampling((schedule or self.schedule).build(), prediction)

    def size_for(self, prediction: Prediction) -> int:
        """Default image side in pixels for this family with the given prediction type."""
        if prediction is Prediction.V and self.default_size_v is not None:
            return self.default_size_v
        return self.default_size

    @property
    def prediction_is_ambiguous(self) -> bool:
        """Releases of this family differ in prediction type with nothing in the weights to tell (SD2 768-v vs
        512 base): loading without a stated type falls back to the default and says so."""
        return self.default_size_v is not None

    @property
    def components(self) -> tuple[ComponentSpec, ...]:
        """Every network: "unet", "vae", then each text encoder by its name."""
        return (
            ComponentSpec("unet", self.unet, self.unet_module, self.unet_prefix, "ldm"),
            ComponentSpec("vae", self.vae, self.vae_module, self.vae_prefix, "ldm"),
            *(ComponentSpec(te.name, te.config, self.text_module, te.prefix, te.layout) for te in self.text_encoders),
        )

    def component(self, name: str) -> ComponentSpec:
        for spec in self.components:
            if spec.name == name:
                return spec
        raise KeyError(f"family {self.name} has no component {name!r}")

    @property
    def prefixes(self) -> dict[str, str]:
        """Component name -> checkpoint prefix: "unet", "vae", then each text encoder by its name."""
        return {c.name: c.prefix for c in self.components}
