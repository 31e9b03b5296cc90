"""What planning a checkpoint produces: a checked recipe (`CheckpointPlan`) and its report (`LoadReport`).

`sdlab.checkpoints.load.plan_checkpoint` makes them from names, shapes and metadata alone; `materialize`
turns a plan into a `ModelBundle`; `sdlab inspect` prints the report (`LoadReport.to_json`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sdlab.checkpoints.components import ComponentConfig, ComponentSource
from sdlab.checkpoints.file_format import config_to_json
from sdlab.diffusion.denoiser import Prediction
from sdlab.families import EDMSpec, FamilySpec, ScheduleSpec, TextEncoderSpec
from sdlab.families.latent_format import LatentStats



@dataclass(frozen=True)
class ComponentReport:
    """What `plan_checkpoint` found for one network."""

    name: str
    origin: str
    config: ComponentConfig
    num_keys: int                           # tensors loaded into the module (sdlab layout)
    num_parameters: int
    dtypes: tuple[str, ...]                 # dtypes stored in the file
    ignored: tuple[str, ...]


@dataclass(frozen=True)
class LoadReport:
    """Everything learned about a checkpoint without loading a weight."""

    source: str
    family: FamilySpec
    family_source: str                      # "argument", "metadata", "detected", "model_index.json"
    prediction: Prediction
    prediction_source: str
    scaling_factor: float
    components: tuple[ComponentReport, ...]
    ignored: tuple[str, ...]                # file keys outside every component, known to be unused
    total_keys: int
    metadata: Mapping[str, str] = field(default_factory=dict)
    native_size: int | None = None          # metadata `modelspec.resolution`, a folder's unet `sample_size`
    schedule: ScheduleSpec | None = None    # the model's own training schedule (None: the family's)
    schedule_source: str | None = None      # where it came from ("ztsnr marker key", "scheduler_config.json")
    sampler: Mapping[str, Any] = field(default_factory=dict)   # a folder's scheduler class, spacing, offset
    steps_offset: int = 1                   # what diffusers' leading spacing adds for it (a folder's, as its
                                            # pipeline runs it; a saved file's `sdlab.steps_offset`)
    zero_empty_negative: bool | None = None  # a folder's force_zeros_for_empty_prompt (None: the family's)
    noise_model: EDMSpec | None = None      # a continuous EDM noise model (None: discrete on the schedule)
    noise_model_source: str | None = None   # where it came from
    latent_stats: LatentStats | None = None  # per-channel latents mean / std (None: scaling alone)
    vae_file: str | None = None             # the standalone VAE drawn with (None: the checkpoint's own)
    vae_file_source: str | None = None      # "argument", or beside the model (A1111's sidecar)
    missing_vae: str | None = None          # why the model has no VAE ("no vae/ folder"; None: it has one)

    def to_json(self) -> dict[str, Any]:
        schedule = self.schedule or self.family.schedule
        return {
            "source": self.source,
            "family": self.family.name,
            "family_source": self.family_source,
            "prediction": self.prediction.value,
            "prediction_source": self.prediction_source,
            "scaling_factor": self.scaling_factor,
            "default_size": self.native_size or self.family.size_for(self.prediction),
            "schedule": schedule.describe(),
            "schedule_source": self.schedule_source or f"default of {self.family.name}",
            **({"noise_model": self.noise_model.describe(), "noise_model_source": self.noise_model_source}
               if self.noise_model is not None else {}),
            **({"latent_stats": config_to_json(self.latent_stats)} if self.latent_stats is not None else {}),
            "steps_offset": self.steps_offset,
            **({"vae_file": self.vae_file, "vae_file_source": self.vae_file_source} if self.vae_file else {}),
            **({"missing_vae": self.missing_vae} if self.missing_vae else {}),
            **({"diffusers_sampler": dict(self.sampler)} if self.sampler else {}),
            "description": self.family.description,
            "total_keys": self.total_keys,
            "components": [
                {
                    "name": c.name,
                    "origin": c.origin,
                    "config": config_to_json(c.config),
                    "keys": c.num_keys,
                    "parameters": c.num_parameters,
                    "dtypes": list(c.dtypes),
                    "ignored_keys": list(c.ignored),
                }
                for c in self.components
            ],
            "ignored_keys": list(self.ignored),
        }


@dataclass(frozen=True)
class CheckpointPlan:
    """A checked recipe for building a bundle: one `ComponentSource` per network, plus the report."""

    report: LoadReport
    unet: ComponentSource
    vae: ComponentSource | None             # None only from plan_checkpoint(need_vae=False): the model has none
    text_encoders: tuple[tuple[TextEncoderSpec, ComponentSource], ...]


__all__ = ["CheckpointPlan", "ComponentReport", "LoadReport"]
