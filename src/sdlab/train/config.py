"""`TrainConfig`: every setting of a training run, one frozen dataclass.

Values come from layers, later ones winning: the dataclass defaults, the config stored in the run
checkpoint being resumed (``--resume``), an optional config file (TOML or JSON, keys are the field names)
and command-line options (``--field-name value``; booleans as ``--flag`` / ``--no-flag``). Each field
carries its description (shown by ``sdlab train --help``) and, where the set is closed, its valid values.
The resolved config is stored in every run checkpoint; ``--resume`` checks that the settings that define
the model trained, the data stream and the objective did not change (`RESUME_INVARIANTS`). Every bad value
is a `TrainError` naming the option.

Batch terms: ``batch_size`` is the micro-batch of one process; one optimiser step consumes the *global*
batch ``batch_size * grad_accum * world_size`` images.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import tomllib
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from sdlab.diffusion.loss import HUBER_SCHEDULES, LOSS_TYPES
from sdlab.diffusion.prediction import Prediction
from sdlab.train.errors import TrainError
from sdlab.utils.numbers import finite_float
from sdlab.utils.text import not_utf8

__all__ = ["RESUME_INVARIANTS", "TASK_SETTINGS", "TRAIN_EPILOG", "TrainConfig", "add_config_arguments",
           "bucket_bounds", "config_from_args", "config_from_settings", "flag", "given_settings", "load_config_file", "merge_resumed",
           "resume_changes"]


def setting(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A TrainConfig field with its ``--help`` text and, for closed sets, its valid values."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class TrainConfig:
    # what to train
    task: str = setting("unet", "what to train: the U-Net (full or LoRA), the VAE, the text encoder, a "
                                "textual-inversion embedding, or a few-step model by latent consistency "
                                "distillation (lcd)",
                        ("unet", "vae", "text", "embedding", "lcd"))
    model: str | None = setting(None, "checkpoint to start from: a single .safetensors / .ckpt file or a "
                                      "diffusers folder (required)")
    family: str | None = setting(None, "override family detection (sd1, sd2, sdxl, ...)")
    prediction: str | None = setting(None, "override the checkpoint's prediction type (eps, v)")
    vae: str | None = setting(None, "replace the checkpoint's VAE with this file")
    sidecar_vae: bool = setting(True, "without --vae, train a single file with the A1111 sidecar VAE beside it "
                                      "(<name>.vae.*), as txt2img draws it (--no-sidecar-vae: its own VAE)")

    # data
    data_dir: str | None = setting(None, "images with same-name .txt captions (kohya's <repeats>_<class tokens> "
                                         "folders too), or a metadata.jsonl / metadata.csv (required)")
    caption_extension: str = setting(".txt", "extension of an image's same-name caption file (kohya's "
                                             "--caption_extension, e.g. .caption)")
    data_layout: str = setting("auto", "how --data-dir's folders are read: plain (every image below it with its "
                                       "caption file), kohya (only kohya's <repeats>_<class tokens> folders, as "
                                       "kohya's trainers read them), auto (kohya when every first-level folder "
                                       "with images is named <N>_..., N >= 1, and no image lies beside them)",
                               ("auto", "plain", "kohya"))
    output_dir: str = setting("runs/train", "run folder: checkpoints/, log.csv, loss.png, summary.json, weights")
    resolution: int | None = setting(None, "square training size in pixels (with --enable-bucket: the buckets' "
                                           "area), a multiple of 8 (default: the "
                                           "model's native size: 512 for SD1, 64 for sdlab-tiny, ...)")
    center_crop: bool = setting(True, "crop the centre of each resized image (--no-center-crop: a random crop)")
    random_flip: bool = setting(False, "flip half of the images horizontally")
    enable_bucket: bool = setting(False, "aspect-ratio buckets (kohya's --enable_bucket): each image trains at the "
                                         "bucket of about --resolution squared pixels whose aspect ratio is nearest "
                                         "its own, resized to cover it and cropped; a step's images share a bucket")
    min_bucket_reso: int | None = setting(None, "with --enable-bucket: the shortest bucket side (default: half of "
                                                "--resolution, kohya's 256 at 512)")
    max_bucket_reso: int | None = setting(None, "with --enable-bucket: the longest bucket side (default: twice "
                                                "--resolution, kohya's 1024 at 512)")
    bucket_reso_steps: int = setting(64, "with --enable-bucket: bucket sides are multiples of this")
    shuffle_caption: bool = setting(False, "shuffle the tags of each caption (its parts between separators, "
                                           "joined again by ', ') every time the image is drawn")
    keep_tokens: int = setting(0, "with --shuffle-caption: the first N tags stay in front, in order")
    caption_separator: str = setting(",", "with --shuffle-caption: the text between tags")
    caption_dropout: float | None = setting(None, "probability of training on the empty prompt (what "
                                                  "classifier-free guidance needs; default: 0.1 for --task unet, "
                                                  "0 for --task embedding, whose frozen U-Net learns no guidance, "
                                                  "as in diffusers' and A1111's textual inversion)")
    cache_latents: bool = setting(False, "encode every image once with the frozen VAE, train on stored latents")
    cache_dir: str | None = setting(None, "latent cache folder (default: <output-dir>/latent_cache)")
    num_workers: int = setting(2, "image decoding threads")

    # objective (U-Net task)
    min_snr_gamma: float | None = setting(None, "Min-SNR loss weight with this gamma (5.0 in Hang et al. 2023; "
                                                "default: off)")
    offset_noise: float = setting(0.0, "offset-noise strength (0.05 .. 0.1 typical)")
    min_timestep: int | None = setting(None, "train on timesteps from this one on (kohya's min_timestep; default: 0)")
    max_timestep: int | None = setting(None, "train on timesteps below this one (kohya's max_timestep; default: the "
                                             "model's number of training steps, 1000); equal to --min-timestep: "
                                             "every step trains at that timestep")
    ip_noise_gamma: float | None = setting(None, "input perturbation (Ning et al. 2023): the noisy latent is made "
                                                 "from noise + gamma x another draw, the target from the noise "
                                                 "alone (about 0.1; default: off)")
    ip_noise_gamma_random_strength: bool = setting(False, "input perturbation of a strength drawn uniformly from "
                                                          "[0, --ip-noise-gamma) for each image")
    multires_noise_iterations: int | None = setting(None, "multi-resolution (pyramid) noise of this many levels "
                                                          "(6 .. 10 typical; default: off)")
    multires_noise_discount: float = setting(0.3, "weight ratio of each coarser level of multi-resolution noise")
    debiased_estimation_loss: bool = setting(False, "weight each image's loss by 1 / sqrt(SNR) (eps prediction) or "
                                                    "1 / (SNR + 1) (v), SNR capped at 1000 (Yu et al. 2024)")
    loss_type: str = setting("l2", "U-Net loss per latent element: l2 (squared error), l1, or the pseudo-Huber "
                                   "losses huber, 2c (sqrt(d^2 + c^2) - c), and smooth_l1, 2 (sqrt(d^2 + c^2) - c)",
                             LOSS_TYPES)
    huber_schedule: str = setting("snr", "the pseudo-Huber constant per timestep: snr, (1 - c) / (1 + sigma_t)^2 + c; "
                                         "exponential, c^(t / T); constant, c", HUBER_SCHEDULES)
    huber_c: float = setting(0.1, "the pseudo-Huber constant c of --huber-schedule")
    lora_rank: int | None = setting(None, "train a LoRA of this rank instead of the whole U-Net "
                                          "(default: full fine-tune)")
    lora_alpha: float | None = setting(None, "LoRA alpha (default: the rank, i.e. scale 1)")
    lora_text_encoder: bool = setting(False, "also put LoRA on the text encoders' attention / MLP")
    lora_conv: bool = setting(False, "also put LoRA (LoCon) on the U-Net's ResBlock and resampling convs and "
                                     "time-embedding projections (LCM-LoRA's set)")
    train_text_encoder: bool = setting(False, "U-Net task, full fine-tune: the text encoders learn too (new words "
                                              "and phrasings reach the U-Net through them)")

    # objective (latent consistency distillation task)
    lcd_ddim_timesteps: int = setting(50, "lcd task: steps of the teacher's DDIM solver grid (1000 / N apart; the LCM "
                                          "sampler's original_inference_steps)")
    lcd_w_min: float | None = setting(None, "lcd task: lowest teacher guidance w, as in x0 = cond + w (cond - uncond), "
                                            "i.e. a CFG scale of w + 1 (default: the family's CFG scale - 1)")
    lcd_w_max: float | None = setting(None, "lcd task: highest teacher guidance w (drawn uniformly per image; "
                                            "default: lcd_w_min)")
    lcd_loss: str = setting("l2", "lcd task: distance of student and target", ("l2", "huber"))
    lcd_huber_c: float = setting(0.001, "lcd task: pseudo-Huber constant c (sqrt(d^2 + c^2) - c)")
    lcd_target_decay: float = setting(0.95, "lcd task: EMA decay of the target network, or of the LoRA with "
                                      "--lora-rank (every step, no warm-up; 0: the target is the student)")

    # objective (embedding task)
    embedding_word: str | None = setting(None, "embedding task: the new word to learn (only its vectors train; "
                                               "captions without it get it in front)")
    embedding_vectors: int = setting(1, "embedding task: vectors (token places) the word takes, 1 to 75")
    embedding_init: str = setting("*", "embedding task: text whose token vectors start the word's vectors")

    # objective (VAE task)
    vae_decoder_only: bool = setting(False, "VAE task: freeze the encoder, so the latent space (and U-Nets on "
                                            "it) stay valid")

    # optimisation
    max_steps: int = setting(1000, "optimiser steps to train to (counted from the run's start, also on resume)")
    batch_size: int = setting(1, "images per process per micro-step")
    grad_accum: int = setting(1, "micro-steps per optimiser step (global batch = batch size x grad accum x "
                                 "processes)")
    learning_rate: float = setting(1e-4, "peak AdamW learning rate")
    lr_schedule: str = setting("cosine", "learning-rate schedule after the linear warm-up", ("cosine", "constant"))
    warmup_steps: int = setting(0, "steps of linear learning-rate warm-up from 0 (step s trains at s / N of the "
                                   "peak, as diffusers' get_scheduler)")
    min_lr_ratio: float = setting(0.0, "cosine ends at learning rate x this ratio (cosine schedule only)")
    adam_beta1: float = setting(0.9, "AdamW beta1")
    adam_beta2: float = setting(0.999, "AdamW beta2")
    adam_eps: float = setting(1e-8, "AdamW epsilon")
    weight_decay: float = setting(1e-2, "AdamW decoupled weight decay")
    max_grad_norm: float | None = setting(1.0, "clip the gradient norm to this ('none': no clipping)")
    ema_decay: float | None = setting(None, "keep an EMA of the weights with this decay, e.g. 0.9999, saved as "
                                            "final-ema.safetensors (default: no EMA)")
    mixed_precision: str = setting("no", "autocast: no (fp32) or bf16 (what does not train then also runs in bf16: "
                                         "the frozen model of a LoRA or embedding run, the VAE and text encoders "
                                         "of a full fine-tune; but an SDXL VAE stays fp32 and encodes in fp32, as "
                                         "diffusers' SDXL scripts keep it, except in an embedding run and a LoRA "
                                         "run's --vae / sidecar one; what trains stays fp32, the delivered model "
                                         "holds the parts that did not train as loaded, and previews draw with "
                                         "the run's parts: docs/training.md)", ("no", "bf16"))
    gradient_checkpointing: bool = setting(False, "recompute activations in the backward pass (less memory, "
                                                  "slower)")
    seed: int = setting(0, "seed of the data order, augmentation, noise and initialisation")
    device: str = setting("auto", "auto (CUDA when available, else CPU), cpu, cuda, cuda:1, ...")

    # checkpoints, logging, previews
    checkpoint_every: int = setting(500, "write a run checkpoint every N steps (also at the end and on "
                                         "SIGINT / SIGTERM)")
    keep_checkpoints: int = setting(2, "run checkpoints to keep (older ones are deleted)")
    resume: str | None = setting(None, "continue a run: 'latest' takes the newest valid run checkpoint in "
                                       "<output-dir>/checkpoints (an older one when the newest is damaged) and "
                                       "every setting stored in it except those given again (they apply from the "
                                       "resumed step; the lr follows the new schedule; those that define the "
                                       "run, such as the model, data and objective, cannot change); or the path "
                                       "of a run checkpoint (.pt). 'latest' with no checkpoint yet starts at step 0")
    overwrite: bool = setting(False, "delete the run checkpoints in --output-dir that this run would mix with "
                                     "(another run's, or a resumed one's after the resumed step; without it such a "
                                     "run is refused) and the other files of that run: weights, previews, log.csv, "
                                     "loss.png, summary.json (never other files or latent_cache/); for this command "
                                     "only (refused in a --config file)")
    save_dtype: str = setting("fp32", "dtype of the delivered weights", ("fp32", "fp16", "bf16"))
    log_every: int = setting(1, "write a log.csv row every N steps")
    sample_every: int | None = setting(None, "draw preview images every N steps (default: never)")
    sample_prompts: tuple[str, ...] = setting((), "prompt of a preview image")
    sample_steps: int = setting(20, "sampler steps of a preview image")
    sample_cfg: float = setting(7.0, "guidance scale of a preview image")
    sample_seed: int = setting(0, "seed of the first preview image (the next ones count up)")
    progress: bool = setting(True, "show a progress bar")

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name))
        _read_words_in_any_case(self)
        if self.caption_dropout is None:
            object.__setattr__(self, "caption_dropout", _TASK_CAPTION_DROPOUT.get(self.task, 0.0))
        if self.mixed_precision.lower() == "fp16":
            raise TrainError("--mixed-precision fp16 is not supported (fp16 training needs loss scaling): "
                             "use bf16, or no")
        for f in fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and f.name != "task" and value not in choices:  # tasks are plug-ins, checked on import
                raise TrainError(f"{flag(f.name)} must be one of {', '.join(choices)}; got {value!r}")
        for name, (holds, wanted) in _RANGES.items():
            value = getattr(self, name)
            if value is not None and not holds(value):
                raise TrainError(f"{flag(name)} must be {wanted}; got {value!r}")
        for name in _TEXTS:
            _check_text(name, getattr(self, name))
        _check_task_settings(self)
        _check_file_name(self.embedding_word)
        _check_prompt_word(self.embedding_word)
        _check_option_pairs(self)
        shaping = [name for name in ("lora_alpha", "lora_conv", "lora_text_encoder") if getattr(self, name)]
        if shaping and self.lora_rank is None:
            raise TrainError(f"{flag(shaping[0])} shapes a LoRA, but no LoRA is trained: give --lora-rank too")
        if self.min_lr_ratio and self.lr_schedule == "constant":
            raise TrainError(f"--min-lr-ratio {self.min_lr_ratio:g} is the floor of the cosine schedule; "
                             f"--lr-schedule constant has none: drop it, or use --lr-schedule cosine")
        if self.enable_bucket and self.resolution is not None:
            bucket_bounds(self)
        if self.cache_latents and not self.center_crop:
            raise TrainError("--cache-latents needs center cropping (a random crop changes the latent every "
                             "epoch): drop --no-center-crop or --cache-latents")

    def global_batch(self, world_size: int) -> int:
        return self.batch_size * self.grad_accum * world_size

    def to_json(self) -> dict[str, Any]:
        """The settings as a run checkpoint stores them; a path (`_PATH_SETTINGS`) as the absolute real path of
        the file or folder it names from this process's directory, so a resume from another directory reads,
        and compares against, the files this run read."""
        values = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}
        return values | {k: os.path.realpath(values[k]) for k in _PATH_SETTINGS if values[k] is not None}


def _read_words_in_any_case(cfg: TrainConfig) -> None:
    """Read `cfg`'s words in any case, as the other subcommands read theirs (`sdlab.cli`: choices, --device): a
    value that lower-cased is one of its setting's choices is that choice (--mixed-precision BF16 is bf16, --task
    UNet unet), and --device is lower-cased, as torch names devices (CPU is cpu, Cuda:1 cuda:1)."""
    for f in fields(cfg):
        choices, value = f.metadata.get("choices"), getattr(cfg, f.name)
        if choices and isinstance(value, str) and value.lower() in choices:
            object.__setattr__(cfg, f.name, value.lower())
    object.__setattr__(cfg, "device", cfg.device.lower())


def bucket_bounds(cfg: TrainConfig) -> tuple[int, int]:
    """(shortest, longest) bucket side of ``cfg`` (its resolution known), defaults filled in; a `TrainError` where
    the resolution is not between them (kohya's check) or the bucket step is above it."""
    low = cfg.min_bucket_reso or cfg.resolution // 16 * 8
    high = cfg.max_bucket_reso or cfg.resolution * 2
    if not low <= cfg.resolution <= high:
        raise TrainError(f"--resolution {cfg.resolution} must lie between the shortest and the longest bucket side "
                         f"(--min-bucket-reso {low}, --max-bucket-reso {high})")
    if cfg.bucket_reso_steps > cfg.resolution:
        raise TrainError(f"--bucket-reso-steps {cfg.bucket_reso_steps} is above --resolution {cfg.resolution}")
    return low, high


# field -> (check, what it must be); None always passes (optional settings)
_RANGES: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "task": (lambda v: v.isidentifier(), "a task name (unet, vae, text, embedding, lcd)"),
    "resolution": (lambda v: v >= 8 and v % 8 == 0, "a positive multiple of 8"),
    "caption_dropout": (lambda v: 0.0 <= v <= 1.0, "between 0 and 1"),
    "num_workers": (lambda v: v >= 0, "at least 0"),
    "min_snr_gamma": (lambda v: v > 0, "positive"),
    "offset_noise": (lambda v: v >= 0, "at least 0"),
    "min_timestep": (lambda v: v >= 0, "at least 0"),
    "max_timestep": (lambda v: v >= 0, "at least 0"),
    "ip_noise_gamma": (lambda v: v > 0, "positive"),
    "multires_noise_iterations": (lambda v: v >= 1, "at least 1"),
    "multires_noise_discount": (lambda v: v > 0, "positive"),
    "huber_c": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "keep_tokens": (lambda v: v >= 0, "at least 0"),
    "caption_extension": (lambda v: v.strip(".") != "" and not set(v) & set("/\\\0"), "a file extension (.txt, .caption)"),
    "min_bucket_reso": (lambda v: v >= 8 and v % 8 == 0, "a positive multiple of 8"),
    "max_bucket_reso": (lambda v: v >= 8 and v % 8 == 0, "a positive multiple of 8"),
    "bucket_reso_steps": (lambda v: v >= 8 and v % 8 == 0, "a positive multiple of 8"),
    "caption_separator": (lambda v: v != "", "a text that is not empty"),
    "lora_rank": (lambda v: v >= 1, "at least 1"),
    "lora_alpha": (lambda v: v > 0, "positive"),
    "embedding_vectors": (lambda v: 1 <= v <= 75, "between 1 and 75"),
    "lcd_ddim_timesteps": (lambda v: v >= 1, "at least 1"),
    "lcd_w_min": (lambda v: v >= 0, "at least 0"),
    "lcd_w_max": (lambda v: v >= 0, "at least 0"),
    "lcd_huber_c": (lambda v: v > 0, "positive"),
    "lcd_target_decay": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "max_steps": (lambda v: v >= 1, "at least 1"),
    "batch_size": (lambda v: v >= 1, "at least 1"),
    "grad_accum": (lambda v: v >= 1, "at least 1"),
    "learning_rate": (lambda v: v > 0, "positive"),
    "warmup_steps": (lambda v: v >= 0, "at least 0"),
    "min_lr_ratio": (lambda v: 0.0 <= v <= 1.0, "between 0 and 1"),
    "adam_beta1": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "adam_beta2": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "adam_eps": (lambda v: v > 0, "positive"),
    "weight_decay": (lambda v: v >= 0, "at least 0"),
    "max_grad_norm": (lambda v: v > 0, "positive (or 'none')"),
    "ema_decay": (lambda v: 0.0 < v < 1.0, "between 0 and 1 (exclusive)"),
    "checkpoint_every": (lambda v: v >= 1, "at least 1"),
    "keep_checkpoints": (lambda v: v >= 1, "at least 1"),
    "log_every": (lambda v: v >= 1, "at least 1"),
    "sample_every": (lambda v: v >= 1, "at least 1"),
    "sample_steps": (lambda v: v >= 1, "at least 1"),
}

# free text (prompts, the embedding's word and the name its file records): UTF-8 text only, as every prompt in sdlab
_TEXTS = ("embedding_word", "embedding_init", "sample_prompts", "caption_separator", "caption_extension")


def _check_text(name: str, value: str | tuple[str, ...] | None) -> None:
    """A `TrainError` naming the option when its text holds a byte that is not UTF-8 (`not_utf8`)."""
    for text in (value,) if isinstance(value, str) else value or ():
        problem = not_utf8(text, flag(name))
        if problem is not None:
            raise TrainError(problem)


# characters no file name holds on this system; the embedding task names its file by its word
_NOT_IN_FILE_NAMES = '<>:"/\\|?*' + "".join(map(chr, range(32))) if os.name == "nt" else "/\0"
_NAME_MAX = 255   # bytes in a file name (Linux, macOS, Windows)


def _check_file_name(word: str | None) -> None:
    """A `TrainError` when the embedding files ``<word>.safetensors`` / ``<word>-ema.safetensors`` cannot be
    named on this system, so the run stops before it trains instead of when it delivers."""
    if word is None:
        return
    refused = sorted({c for c in word if c in _NOT_IN_FILE_NAMES})
    if refused:
        raise TrainError(f"--embedding-word {word!r} names the embedding's file, and no file name on this system "
                         f"holds {', '.join(map(repr, refused))}: choose a word without them")
    if len(os.fsencode(f"{word}-ema.safetensors")) > _NAME_MAX:
        raise TrainError(f"--embedding-word names the embedding's file, and a file name holds at most {_NAME_MAX} "
                         f"bytes: choose a shorter word")



def _check_prompt_word(word: str | None) -> None:
    """A `TrainError` when no prompt can hold the embedding's word as itself, even escaped
    (`prompt_word.prompt_spelling`: a ``#`` always starts a comment), so the trained file could never be used
    (training reads captions literally and would not notice). A word a prompt reaches only escaped is
    trained; the task says how to write it (`embedding_task.build_task`)."""
    if word is None:
        return
    from sdlab.pipeline.prompt_word import prompt_spelling, reading

    from sdlab.models.tokenizer import _EMBEDDING_SYNTAX

    if prompt_spelling(word) is None:
        raise TrainError(f"--embedding-word {word!r} cannot be written in a prompt, even escaped: the prompt syntax "
                         f"reads it as {reading(word) or 'nothing'}, so the embedding could never be used; choose "
                         f"another word")
    if _EMBEDDING_SYNTAX.search(word):       # looked up after the prompt is unescaped: no spelling escapes it
        raise TrainError(f"--embedding-word {word!r} holds ComfyUI's embedding:NAME, which a prompt reads as the "
                         f"embedding file NAME (escaping does not change that), so this word could never be used; "
                         f"choose another word")


# What each task does, and the task-specific settings it reads (settings no task is listed with, such as the
# optimiser's, data and checkpoint settings, apply to every task). A setting one task reads is refused for the
# others, in `TrainConfig.__post_init__` and so before any loading, unless it has its default or a value that asks
# for nothing the task does not do anyway (`_INERT`): the task would ignore it. Tasks not named here (plug-ins)
# check their own settings.
_UNET_OBJECTIVE = ("caption_dropout", "min_snr_gamma", "offset_noise", "min_timestep", "max_timestep", "ip_noise_gamma",
                   "ip_noise_gamma_random_strength", "multires_noise_iterations", "multires_noise_discount",
                   "debiased_estimation_loss", "loss_type", "huber_schedule", "huber_c")
_CAPTIONS = ("shuffle_caption", "keep_tokens", "caption_separator")   # the captions the U-Net is conditioned on
_LATENTS = ("cache_latents", "cache_dir")                               # the frozen VAE's latents, not images
_BUCKETS = ("enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps")   # non-square latents
_LORA = ("lora_rank", "lora_alpha", "lora_conv")
_UNET_RUN = ("gradient_checkpointing", "save_dtype", "sample_every", "sample_prompts", "sample_steps", "sample_cfg",
             "sample_seed")
_LCD = ("lcd_ddim_timesteps", "lcd_w_min", "lcd_w_max", "lcd_loss", "lcd_huber_c", "lcd_target_decay")
_EMBEDDING = ("embedding_word", "embedding_vectors", "embedding_init")
TASK_SETTINGS: dict[str, tuple[str, frozenset[str]]] = {
    "unet": ("trains the U-Net (full or LoRA)",
             frozenset((*_UNET_OBJECTIVE, *_CAPTIONS, *_LATENTS, *_BUCKETS, *_LORA, "lora_text_encoder",
                        "train_text_encoder", *_UNET_RUN))),
    "embedding": ("learns the vectors of one new word, everything else frozen",
                  frozenset((*_UNET_OBJECTIVE, *_CAPTIONS, *_LATENTS, *_BUCKETS, *_EMBEDDING, *_UNET_RUN))),
    "lcd": ("distils the U-Net (or a LoRA of it) with a fixed objective",
            frozenset((*_CAPTIONS, *_LATENTS, *_BUCKETS, *_LORA, *_LCD, *_UNET_RUN))),
    "vae": ("trains the VAE on images (not on latents) with its own objective and previews",
            frozenset(("vae_decoder_only", "save_dtype", "sample_every"))),
    "text": ("trains the text encoder against an image tower on images (not on latents) with a contrastive "
             "objective", frozenset()),
}
_TASK_SPECIFIC = frozenset().union(*(reads for _, reads in TASK_SETTINGS.values()))
# --caption-dropout when not given: classifier-free guidance needs it where the U-Net learns (unet); textual
# inversion's frozen U-Net learns none (diffusers' textual_inversion.py and A1111 never drop the caption), and
# the other tasks do not read it (0 is their inert value)
_TASK_CAPTION_DROPOUT = {"unet": 0.1}
_INERT = {"caption_dropout": 0.0}   # no caption dropout: what the tasks without the setting do


def _check_task_settings(cfg: TrainConfig) -> None:
    """A `TrainError` for the first task-specific setting given to a task that does not read it (see
    `TASK_SETTINGS`)."""
    entry = TASK_SETTINGS.get(cfg.task)
    if entry is None:
        return
    what, reads = entry
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.name not in _TASK_SPECIFIC or f.name in reads or value in (f.default, _INERT.get(f.name, f.default)):
            continue
        if isinstance(value, bool):
            given = flag(f.name) if value else "--no-" + flag(f.name)[2:]
        elif isinstance(value, tuple):
            given = " ".join(f"{flag(f.name)} {v!r}" for v in value)
        else:
            given = f"{flag(f.name)} {value}"
        users = [task for task, (_, names) in TASK_SETTINGS.items() if f.name in names]
        raise TrainError(f"--task {cfg.task} {what}; {given} does not apply to it (only to --task "
                         f"{' / '.join(users)})")


# Settings that only shape another one: (setting, what it shapes, whether that one is on)
_SHAPING: tuple[tuple[str, str, typing.Callable[[TrainConfig], bool]], ...] = (
    ("ip_noise_gamma_random_strength", "--ip-noise-gamma", lambda c: c.ip_noise_gamma is not None),
    ("multires_noise_discount", "--multires-noise-iterations", lambda c: c.multires_noise_iterations is not None),
    ("huber_schedule", "--loss-type huber or smooth_l1", lambda c: c.loss_type in ("huber", "smooth_l1")),
    ("huber_c", "--loss-type huber or smooth_l1", lambda c: c.loss_type in ("huber", "smooth_l1")),
    ("keep_tokens", "--shuffle-caption", lambda c: c.shuffle_caption),
    ("caption_separator", "--shuffle-caption", lambda c: c.shuffle_caption),
    ("min_bucket_reso", "--enable-bucket", lambda c: c.enable_bucket),
    ("max_bucket_reso", "--enable-bucket", lambda c: c.enable_bucket),
    ("bucket_reso_steps", "--enable-bucket", lambda c: c.enable_bucket),
    ("sample_prompts", "--sample-every", lambda c: c.sample_every is not None),
)


def _check_option_pairs(cfg: TrainConfig, given: typing.Collection[str] = ()) -> None:
    """A `TrainError` for a setting set (off its default, or named in ``given`` unless as an empty list, which
    asks for nothing) without the one it shapes (it would do nothing), and for a timestep range that is empty."""
    defaults = {f.name: f.default for f in fields(cfg)}
    for name, shapes, applies in _SHAPING:
        value = getattr(cfg, name)
        if (value != defaults[name] or (name in given and value != ())) and not applies(cfg):
            option = flag(name) if value is not False else "--no-" + flag(name)[2:]
            text = option if isinstance(value, bool) else f"{option} {value!r}" if isinstance(value, str) else \
                f"{option} {value[0]!r}" if isinstance(value, tuple) else f"{option} {value:g}"
            raise TrainError(f"{text} shapes {shapes}, which is not given: give it too, or drop {option}")
    prompted = "sample_prompts" in TASK_SETTINGS.get(cfg.task, ("", ()))[1]     # its previews draw prompts
    if cfg.sample_every is not None and not cfg.sample_prompts and prompted:
        raise TrainError(f"--sample-every {cfg.sample_every} draws previews of --sample-prompts, which is not given: "
                         f"give a prompt (--sample-prompts TEXT, repeat for several), or drop --sample-every")
    low, high = cfg.min_timestep, cfg.max_timestep
    if low is not None and high is not None and low > high:
        raise TrainError(f"--min-timestep {low} is above --max-timestep {high}")


# Settings that must match when resuming: they define the model trained (its file, family, prediction type and
# VAE), the data stream, the objective, the parameters or their starting point. The batch counts as the global
# batch, --batch-size x --grad-accum x processes (`sdlab.train.loop.check_resume`): how it is split may change.
# Every other setting given again applies from the resumed step on (the optimiser's and the LR schedule's
# included: `sdlab.train.loop.apply_optimizer_settings`).
RESUME_INVARIANTS = (
    "task", "model", "family", "prediction", "vae", "sidecar_vae", "data_dir",
    "resolution", "center_crop", "random_flip", "caption_dropout", "lora_rank", "lora_alpha",
    "lora_text_encoder", "lora_conv", "train_text_encoder", "embedding_word", "embedding_vectors", "embedding_init",
    "vae_decoder_only", "seed", "min_snr_gamma", "offset_noise", "cache_latents",
    "lcd_ddim_timesteps", "lcd_w_min", "lcd_w_max", "lcd_loss", "lcd_huber_c", "lcd_target_decay",
    "min_timestep", "max_timestep", "ip_noise_gamma", "ip_noise_gamma_random_strength", "multires_noise_iterations",
    "multires_noise_discount", "debiased_estimation_loss", "loss_type", "huber_schedule", "huber_c",
    "shuffle_caption", "keep_tokens", "caption_separator", "caption_extension", "enable_bucket", "min_bucket_reso",
    "max_bucket_reso", "bucket_reso_steps", "data_layout",
)


_PATH_SETTINGS = ("model", "vae", "data_dir")     # compared as the files / folder they name


def _as_read(name: str, value: Any) -> Any:
    """A run-defining setting as the run reads it: a path as the file or folder it names (relative parts and
    symlinks resolved; a checkpoint stores it resolved, `TrainConfig.to_json`), a family or prediction type by
    what it names (``v`` and ``v_prediction`` alike)."""
    if not isinstance(value, str):
        return value
    if name in _PATH_SETTINGS or name == "output_dir":
        return os.path.realpath(value)
    if name == "family":
        return value.strip().lower()
    if name == "prediction":
        try:
            return Prediction.parse(value)
        except ValueError:      # not a prediction type: the load refuses it
            return value
    return value


# what a run did before the setting existed, where that is not its default
_BEFORE_IT_EXISTED = {"data_layout": "plain"}


def _run_settings(stored: dict[str, Any]) -> dict[str, Any]:
    """A run checkpoint's ``stored`` settings as its run read them: a setting newer than the checkpoint is what
    the run did before the setting existed (its default, or `_BEFORE_IT_EXISTED`), and one the run ignored is
    the value that asks for nothing (`_without_ignored`; checkpoints from before the per-task --caption-dropout
    default stored 0.1 for every task, also for lcd / vae / text, which never dropped a caption)."""
    values = {f.name: _BEFORE_IT_EXISTED.get(f.name, f.default) for f in fields(TrainConfig)} | stored
    return _without_ignored(values, given=())


def _without_ignored(values: dict[str, Any], given: typing.Collection[str]) -> dict[str, Any]:
    """``values`` with each setting the run they describe ignores, unless ``given`` (then it is checked as given),
    at the value that asks for nothing: a task-specific setting its task does not read (`TASK_SETTINGS`),
    --min-lr-ratio with the constant schedule, which has no floor, and one half of the preview pair without the
    other (runs from before the pair was checked drew nothing then)."""
    entry = TASK_SETTINGS.get(values["task"])
    ignored = {name for name in _TASK_SPECIFIC if entry and name not in entry[1]}
    if values["lr_schedule"] == "constant":
        ignored.add("min_lr_ratio")
    if values["sample_every"] is None:
        ignored.add("sample_prompts")
    elif entry and "sample_prompts" in entry[1] and not values["sample_prompts"]:
        ignored.add("sample_every")
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    return values | {name: _INERT.get(name, defaults[name]) for name in ignored - set(given)}


def resume_changes(stored: dict[str, Any], cfg: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """The `RESUME_INVARIANTS` ``cfg`` changes from a run checkpoint's ``stored`` settings as its run read them
    (`_run_settings`), as {setting: (then, now)}. A setting spelled otherwise but read alike is no change, nor one
    not yet resolved: a resolution None (the model's native size, filled in once it loads) or a data layout
    "auto" (the one the dataset scan takes)."""
    then, now = _run_settings(stored), cfg.to_json()
    unresolved = {"resolution": None, "data_layout": "auto"}
    return {k: (then[k], now[k]) for k in RESUME_INVARIANTS
            if _as_read(k, then[k]) != _as_read(k, now[k]) and not (k in unresolved and now[k] == unresolved[k])}


def flag(name: str) -> str:
    """The command-line option of a field: ``max_steps`` -> ``--max-steps``."""
    return "--" + name.replace("_", "-")


@functools.cache
def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(the non-None type of an annotation, whether None is allowed)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _check_type(name: str, value: Any) -> None:
    """A field value of the annotated type (ints where ints, finite numbers, no bools for numbers)."""
    tp, optional = _base_type(_field_types()[name])
    if value is None:
        if not optional:
            raise TrainError(f"{flag(name)} cannot be empty")
        return
    if typing.get_origin(tp) is tuple:
        ok = isinstance(value, tuple) and all(isinstance(v, str) for v in value)
    elif tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and not math.isfinite(value):
            raise TrainError(f"{flag(name)} must be a finite number; got {value!r}")
    else:
        ok = isinstance(value, tp)
    if not ok:
        raise TrainError(f"{flag(name)} must be {_TYPE_WORDS.get(tp, 'a list of texts')}; got {value!r}")


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a text"}


def _coerce(name: str, value: Any) -> Any:
    """A file or CLI value converted to the field's type (strings "none"/"null" -> None where allowed)."""
    tp, optional = _base_type(_field_types()[name])
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if not optional:
            raise TrainError(f"{flag(name)} cannot be empty")
        return None
    if typing.get_origin(tp) is tuple:
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) for v in values):
            raise TrainError(f"{flag(name)} must be a list of texts; got {value!r}")
        return tuple(values)
    if isinstance(value, str):
        return _parse_text(name, tp, value)
    if tp is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    _check_type(name, value)
    return float(value) if tp is float else value


def _parse_text(name: str, tp: Any, text: str) -> Any:
    """A command-line (or quoted config) string as the field's type; a `TrainError` naming the option."""
    if tp is str:
        return text
    if tp is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise TrainError(f"{flag(name)} must be true or false; got {text!r}")
    number = finite_float(text, TrainError, f"{flag(name)} must be {_TYPE_WORDS[tp]}; got {text!r}",
                          f"{flag(name)} must be a finite number; got {text!r}")
    if tp is int:
        if not number.is_integer():
            raise TrainError(f"{flag(name)} must be an integer; got {text!r}")
        return int(text) if text.strip().lstrip("+-").isdigit() else int(number)
    return number


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Field values from a `.toml` or `.json` file (unknown keys are an error). A TOML `[train]` table is
    accepted as well as top-level keys."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except FileNotFoundError:
        raise TrainError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError / TOMLDecodeError are ValueErrors
        raise TrainError(f"--config {path}: cannot read it ({exc})") from None
    if isinstance(data, dict) and isinstance(data.get("train"), dict):
        data = data["train"]
    if not isinstance(data, dict):
        raise TrainError(f"--config {path}: expected a table of settings, got {type(data).__name__}")
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise TrainError(f"--config {path}: unknown training setting(s) {', '.join(unknown)} "
                         f"(see sdlab train --help; keys are option names with _ for -)")
    if "overwrite" in data:     # it deletes a run's files: asked for by one command, never by every use of a file
        raise TrainError(f"--config {path}: overwrite is for one command only; give --overwrite on its command line")
    try:
        return {k: _coerce(k, v) for k, v in data.items()}
    except TrainError as exc:
        raise TrainError(f"--config {path}: {exc}") from None


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--field-name`` option per TrainConfig field, default None (= not given), plus ``--config``.
    Values are parsed by `config_from_args`, so a bad one is a `TrainError` (``sdlab: error: ...``)."""
    parser.add_argument("--config", metavar="FILE", help="TOML or JSON file with training settings, keys as the "
                                                         "option names with _ (options given here override it)")
    hints = _field_types()
    for f in fields(TrainConfig):
        tp, _ = _base_type(hints[f.name])
        choices = f.metadata.get("choices")
        help_text = f.metadata.get("help", "")
        if choices:
            help_text += f" (one of: {', '.join(choices)})"
        if f.default is not MISSING and f.default not in (None, ()) and tp is not bool:
            help_text += f" [default: {f.default}]"
        help_text = help_text.replace("%", "%%")
        if tp is bool:
            help_text += " [default: on]" if f.default else ""
            parser.add_argument(flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
        elif typing.get_origin(tp) is tuple:
            parser.add_argument(flag(f.name), dest=f.name, action="append", default=None, metavar="TEXT",
                                help=help_text + "; repeat for several")
        else:
            metavar = "{" + ",".join(choices) + "}" if choices else _METAVARS.get(f.name, f.name.split("_")[-1].upper())
            parser.add_argument(flag(f.name), dest=f.name, default=None, metavar=metavar, help=help_text)


_METAVARS = {"model": "PATH", "vae": "FILE", "resolution": "PIXELS", "resume": "latest|PATH", "prediction": "eps|v",
             "keep_checkpoints": "N", "checkpoint_every": "STEPS", "log_every": "STEPS", "sample_every": "STEPS",
             "lcd_ddim_timesteps": "N", "lcd_w_min": "W", "lcd_w_max": "W", "min_timestep": "T", "max_timestep": "T",
             "multires_noise_iterations": "N", "keep_tokens": "N", "caption_separator": "TEXT",
             "caption_extension": "EXT", "min_bucket_reso": "PIXELS", "max_bucket_reso": "PIXELS",
             "bucket_reso_steps": "PIXELS"}


def given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings a command line names: the --config file's, then the options given (parsed)."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(load_config_file(args.config))
    for f in fields(TrainConfig):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = _coerce(f.name, given)
    return values


_THIS_COMMAND = ("resume", "overwrite")   # what a command asks of its own start, never kept for a resume


def merge_resumed(stored: dict[str, Any], given: dict[str, Any]) -> tuple[TrainConfig, dict[str, tuple[Any, Any]]]:
    """The config of a resumed run: the checkpoint's stored settings as its run read them (`_run_settings`) with
    those given now on top. Returns (config, {field: (stored value, new value)} for every setting that changed)."""
    known = {f.name for f in fields(TrainConfig)}
    then = _run_settings({k: _coerce(k, v) for k, v in stored.items() if k in known and k not in _THIS_COMMAND})
    values = _without_ignored(then | given, given)
    changed = {k: (then[k], v) for k, v in values.items()
               if k not in _THIS_COMMAND and _as_read(k, then[k]) != _as_read(k, v)}
    return config_from_settings(values, given), changed


def config_from_settings(values: dict[str, Any], given: typing.Collection[str] | None = None) -> TrainConfig:
    """A `TrainConfig` of these (parsed) settings over the defaults; an unknown name is a `TrainError`, and so is
    a shaping setting among those ``given`` (default: all of ``values``) without the one it shapes, even at its
    default value."""
    try:
        cfg = TrainConfig(**values)
    except TypeError as exc:  # a field that does not exist (Python callers)
        raise TrainError(str(exc)) from None
    _check_option_pairs(cfg, values if given is None else given)
    return cfg


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """defaults < --config file < explicit CLI options (no resume merge; see `merge_resumed`)."""
    return config_from_settings(given_settings(args))


#: the examples under `sdlab train --help`
TRAIN_EPILOG = """\
examples:
  sdlab train --model base.safetensors --data-dir my_images/ --output-dir runs/ft --max-steps 2000
  sdlab train --output-dir runs/ft --resume latest            continue a stopped run with its own settings
  sdlab train --output-dir runs/ft --resume latest --max-steps 4000     ... and train it further

A run writes <output-dir>/checkpoints/step-N.pt every --checkpoint-every steps, log.csv, loss.png,
summary.json and, at the end, final.safetensors (final-ema.safetensors with --ema-decay): a model file
--model reads (a LoRA file --lora reads with --lora-rank; an embedding as <word>.safetensors, the name
--embeddings-dir gives it in prompts). SIGINT / SIGTERM stop it after the current step
with a checkpoint and interrupted.safetensors.
"""
