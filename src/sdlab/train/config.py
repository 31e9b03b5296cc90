"""`TrainConfig`: every setting of a training run, one frozen dataclass.

Values come from three layers, later ones winning: the dataclass defaults, an optional config file
(TOML or JSON, keys are the field names) and command-line overrides (``--field-name value``; booleans
as ``--flag`` / ``--no-flag``). The resolved config is stored in every run checkpoint; ``--resume``
checks that the settings that define the data stream and the optimisation did not change.

Batch terms: ``batch_size`` is the micro-batch of one process; one optimiser step consumes the *global*
batch ``batch_size * grad_accum * world_size`` images.
"""

from __future__ import annotations

import argparse
import json
import tomllib
import types
import typing
from dataclasses import MISSING, asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

__all__ = ["RESUME_INVARIANTS", "TrainConfig", "add_config_arguments", "config_from_args", "load_config_file"]


@dataclass(frozen=True)
class TrainConfig:
    # what to train
    task: str = "unet"                          # "unet"; "vae" and "text" when those tasks are installed
    model: str | None = None                    # checkpoint to start from (single file or diffusers folder)
    family: str | None = None                   # override family detection
    prediction: str | None = None               # override the checkpoint's prediction type ("eps", "v")
    vae: str | None = None                      # replace the checkpoint's VAE

    # data
    data_dir: str | None = None                 # images with same-name .txt captions, or a metadata.jsonl
    output_dir: str = "runs/train"
    resolution: int = 512                       # square training size in pixels
    center_crop: bool = True                    # False: random crop
    random_flip: bool = False
    caption_dropout: float = 0.1                # probability of training on the empty prompt (CFG)
    cache_latents: bool = False                 # encode every image once with the frozen VAE
    cache_dir: str | None = None                # default: <output_dir>/latent_cache
    num_workers: int = 2                        # image decoding threads

    # objective (U-Net task)
    min_snr_gamma: float | None = None          # 5.0 in Hang et al. 2023
    offset_noise: float = 0.0                   # 0.05 .. 0.1 typical
    lora_rank: int | None = None                # None: full fine-tune; else LoRA of this rank
    lora_alpha: float | None = None             # default: the rank (scale 1)
    lora_text_encoder: bool = False             # also put LoRA on the text encoders' attention / MLP

    # objective (VAE task)
    vae_decoder_only: bool = False              # freeze the encoder: the latent space (and U-Nets on it) stay valid

    # optimisation
    max_steps: int = 1000
    batch_size: int = 1                         # per process, per micro-step
    grad_accum: int = 1
    learning_rate: float = 1e-4
    lr_schedule: str = "cosine"                 # "cosine" or "constant" (both after linear warm-up)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0                   # cosine ends at learning_rate * min_lr_ratio
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 1e-2
    max_grad_norm: float | None = 1.0
    ema_decay: float | None = None              # e.g. 0.9999; None disables EMA
    mixed_precision: str = "no"                 # "no" or "bf16" (autocast)
    gradient_checkpointing: bool = False
    seed: int = 0
    device: str = "auto"                        # "auto", "cpu", "cuda", "cuda:1", ...

    # checkpoints, logging, previews
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    resume: str | None = None                   # "latest" or a run-checkpoint path
    save_dtype: str = "fp32"                    # dtype of the delivered weights: fp32, fp16, bf16
    log_every: int = 1
    sample_every: int | None = None
    sample_prompts: tuple[str, ...] = ()
    sample_steps: int = 20
    sample_cfg: float = 7.0
    sample_seed: int = 0
    progress: bool = True                       # tqdm bar on rank 0

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("batch_size and grad_accum must be at least 1")
        if self.max_steps < 0:
            raise ValueError("max_steps must be >= 0")
        if self.mixed_precision not in ("no", "bf16"):
            raise ValueError(f"mixed_precision must be 'no' or 'bf16', got {self.mixed_precision!r}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}")
        if self.save_dtype not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"save_dtype must be fp32, fp16 or bf16, got {self.save_dtype!r}")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError("caption_dropout must lie in [0, 1]")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise ValueError("lora_rank must be >= 1")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError("ema_decay must lie in (0, 1)")
        if self.cache_latents and not self.center_crop:
            raise ValueError("cache_latents needs center_crop (a random crop changes the latent every epoch)")
        if self.checkpoint_every < 1 or self.log_every < 1:
            raise ValueError("checkpoint_every and log_every must be >= 1")

    def global_batch(self, world_size: int) -> int:
        return self.batch_size * self.grad_accum * world_size

    def to_json(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


# Settings that must match when resuming: they define the data stream, the objective or the parameters.
RESUME_INVARIANTS = (
    "task", "resolution", "center_crop", "random_flip", "caption_dropout", "lora_rank", "lora_alpha",
    "lora_text_encoder", "seed", "batch_size", "grad_accum", "min_snr_gamma", "offset_noise", "cache_latents",
)


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(the non-None type of an annotation, whether None is allowed)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _coerce(name: str, value: Any) -> Any:
    """A file or CLI value converted to the field's type (strings "none"/"null" -> None where allowed)."""
    tp, optional = _base_type(_field_types()[name])
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if not optional:
            raise ValueError(f"{name} cannot be empty")
        return None
    if typing.get_origin(tp) is tuple:
        if isinstance(value, str):
            value = [value]
        return tuple(str(v) for v in value)
    if tp is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"{name}: not a boolean: {value!r}")
        return bool(value)
    if tp is int and isinstance(value, float) and not value.is_integer():
        raise ValueError(f"{name}: expected an integer, got {value}")
    return tp(value)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Field values from a `.toml` or `.json` file (unknown keys are an error). A TOML `[train]` table is
    accepted as well as top-level keys."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    if "train" in data and isinstance(data["train"], dict):
        data = data["train"]
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown training settings {unknown}")
    return {k: _coerce(k, v) for k, v in data.items()}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--field-name`` option per TrainConfig field, default None (= not given), plus ``--config``."""
    parser.add_argument("--config", help="TOML or JSON file with training settings (CLI options override it)")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        tp, _ = _base_type(_field_types()[f.name])
        default = f.default if f.default is not MISSING else None
        help_text = f"(default: {default!r})"
        if tp is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typing.get_origin(tp) is tuple:
            parser.add_argument(flag, dest=f.name, action="append", default=None, metavar="TEXT",
                                help=help_text + "; repeat for several")
        else:
            parser.add_argument(flag, dest=f.name, default=None, metavar=f.name.split("_")[-1].upper(), help=help_text)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """defaults < --config file < explicit CLI options."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(load_config_file(args.config))
    for f in fields(TrainConfig):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = _coerce(f.name, given)
    return replace(TrainConfig(), **values) if values else TrainConfig()
