"""`sdlab train`: argument parsing and the run set-up (no tensor code of its own).

`sdlab.cli` wires `add_train_parser(subparsers)` (whose action is `run_train(args)`) into the `sdlab`
command; for direct use (tests, ``torchrun``) this module is runnable: ``python -m sdlab.train.cli --model
M --data-dir D ...`` or ``torchrun --nproc_per_node=2 -m sdlab.train.cli ...``.

Set-up order: settings (and, with ``--resume``, the checkpoint's stored settings under those given), the
task, the resume compatibility check, the run folder made and locked (`run_lock`: a run started there meanwhile
is refused, and a run refused at its set-up removes the folders it made), the refusal of a run that would mix
with another in its folder, the dataset scan, the run folder (with ``--overwrite`` cleared of the other run,
and a file written in it), then the model and the long work. Every mistake found on the way is a `TrainError`: one ``sdlab: error:
...`` line and exit status 2. A run stopped by SIGINT / SIGTERM exits with 128 + the signal number (130 /
143) after writing its checkpoint and weights. Under torchrun one process reports a failure (the first to
fail; before the process group forms, each machine's first process for a set-up mistake, which every process
of a machine meets, and the failing process for anything else) and the others exit with its status saying
nothing, and only rank 0 logs what every process would log alike.

Tasks are plug-ins: ``--task NAME`` imports the module ``TASK_MODULES`` names (``sdlab.train.<NAME>_task``
otherwise) and calls its ``build_task(config: TrainConfig, bundle: ModelBundle) -> TrainTask``. The text
task lives in ``sdlab.tiny`` beside the image tower it trains against; it is named here, never imported.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import io
import json
import logging
import os
import re
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import torch

from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.load import load_bundle
from sdlab.checkpoints.plan import LoadReport
from sdlab.families.loaded import ModelBundle
from sdlab.train.config import (
    TRAIN_EPILOG,
    TrainConfig,
    add_config_arguments,
    bucket_bounds,
    config_from_settings,
    flag,
    given_settings,
    merge_resumed,
)
from sdlab.train.data import LatentCache, TrainData, make_bucket_resolutions, scan_dataset
from sdlab.train.distributed import DistContext, init_distributed, reporting_failure, shutdown_distributed
from sdlab.train.errors import TrainError
from sdlab.train.loop import RunResult, check_resume, train
from sdlab.train.run_checkpoint import (
    ResumePoint,
    checksum_path,
    disk_full_as_error,
    find_resume_point,
    list_checkpoints,
    stored_config,
)
from sdlab.train.run_lock import RunLock
from sdlab.utils.files import OutputFolderError, atomic_write, check_output_folder, make_output_folder

logger = logging.getLogger(__name__)

__all__ = ["main", "run_from_config", "run_train"]

TASK_MODULES = {"unet": "sdlab.train.unet_task", "vae": "sdlab.train.vae_task", "text": "sdlab.tiny.text_task",
                "embedding": "sdlab.train.embedding_task", "lcd": "sdlab.train.lcd_task"}
# what `main` reports as one line with exit status 2 (`_exit_status`); anything else is a bug (status 1)
USER_MISTAKES = (TrainError, CheckpointError, FileNotFoundError, PermissionError, IsADirectoryError)



def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


QUIET_EXIT_DELAY_S = 3.0
"""How long a process that leaves the report of a mistake met before the process group forms (which every
process meets at once) waits before it exits: torchrun stops every process once one has exited with a failure,
so a quiet process that exited at once could stop the reporting one before its line is written. After the
group forms a quiet process learns of the failure when the reporting one has already failed, and exits at once."""


class _AnotherProcessReports(Exception):
    """This torchrun process fails with (or because of) a failure another process reports: exit quietly."""

    def __init__(self, status: int, wait: bool):
        super().__init__(f"another process reports the failure (exit status {status})")
        self.status = status
        self.wait = wait   # before the group forms: let the reporting process write its line first


def _exit_status(exc: BaseException) -> int:
    """The exit status `main` gives ``exc``: 130 for an interrupt, 2 for a mistake, 1 for a bug."""
    if isinstance(exc, KeyboardInterrupt):
        return 130
    return 2 if isinstance(exc, USER_MISTAKES) else 1


def _quiet_unless_reporting(exc: BaseException) -> None:
    """Under torchrun, `_AnotherProcessReports` (from ``exc``) unless this process is the one to report a
    failure (`distributed.reporting_failure`)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    status = reporting_failure(int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")),
                               _exit_status(exc))
    if status is not None:
        raise _AnotherProcessReports(status, wait=not torch.distributed.is_initialized()) from exc


def _task_module(name: str) -> ModuleType:
    module_name = TASK_MODULES.get(name, f"sdlab.train.{name}_task")
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        raise TrainError(f"--task {name!r} is not a training task (one of: {', '.join(TASK_MODULES)})") from None


def _with_model_kind(cfg: TrainConfig, family: str | None, prediction: str | None) -> TrainConfig:
    """``family`` / ``prediction`` left out of ``cfg`` -> the ones given: a resumed run's checkpoint's, or what
    the load detected, so the run checkpoints store it and a resume that names the same family or prediction
    type again is no change (`config.resume_changes`)."""
    return replace(cfg, family=cfg.family or family, prediction=cfg.prediction or prediction)


def _with_native_resolution(cfg: TrainConfig, bundle: ModelBundle) -> TrainConfig:
    """``resolution`` None -> the model's native size; a warning when a given one is far from it."""
    native = bundle.default_size
    if cfg.resolution is None:
        logger.info("training at %d px, the native size of %s", native, cfg.model)
        return replace(cfg, resolution=native)
    if not native / 2 <= cfg.resolution <= native * 2:
        logger.warning("--resolution %d is far from the model's native %d px (each step costs about (%d/%d)^2 = "
                       "%.2g times as much, and the model learns a size it was not made for)",
                       cfg.resolution, native, cfg.resolution, native, (cfg.resolution / native) ** 2)
    return cfg


def _load_dtype(cfg: TrainConfig) -> torch.dtype:
    """The dtype the model loads in. A run that trains none of its weights (a LoRA, an embedding) under
    ``--mixed-precision bf16`` loads it in bf16, as diffusers' and kohya's trainers cast the frozen model to the
    mixed-precision dtype: autocast multiplies in bf16 anyway, and frozen fp32 weights would cost their bf16 copies
    besides (autograd keeps them for the backward pass). The trained parameters stay fp32; otherwise fp32 throughout."""
    frozen = cfg.lora_rank is not None or cfg.task == "embedding"
    return torch.bfloat16 if cfg.mixed_precision == "bf16" and frozen else torch.float32


def _vae_dtype(cfg: TrainConfig, report: LoadReport) -> torch.dtype | None:
    """fp32 for an SDXL checkpoint's own VAE where a LoRA / LCM-LoRA run loads the model in bf16 (`_load_dtype`),
    as diffusers' train_text_to_image_lora_sdxl.py and train_lcm_distill_lora_sdxl.py keep the model's VAE fp32 and
    cast only a separate one (``--vae`` or a sidecar file here) to weight_dtype; an embedding run's stays bf16, as
    textual_inversion_sdxl.py casts it. None (the load dtype) otherwise."""
    own_sdxl_vae = report.family.is_sdxl and report.vae_file is None
    frozen_in_bf16 = _load_dtype(cfg) == torch.bfloat16 and cfg.task != "embedding"
    return torch.float32 if own_sdxl_vae and frozen_in_bf16 else None


def _cast_frozen_parts(cfg: TrainConfig, bundle: ModelBundle, task, writes_the_model: bool) -> None:
    """Under ``--mixed-precision bf16``, each part of the model none of whose weights train (the VAE and text
    encoders of a U-Net fine-tune) moves to bf16, as diffusers' train_text_to_image.py casts the frozen modules
    to weight_dtype: they only run forward, where autocast multiplies in bf16 anyway. What trains keeps its fp32
    master weights (a text encoder under ``--train-text-encoder`` among them), and an SDXL model's VAE stays fp32,
    as train_text_to_image_sdxl.py and train_lcm_distill_sdxl_wds.py keep it. A task that delivers the whole
    model keeps each part it casts as loaded (``keep_as_loaded``), so the file holds it unrounded: in the process
    that writes the model (``writes_the_model``: torchrun's rank 0) alone."""
    if cfg.mixed_precision != "bf16":
        return
    keep = getattr(task, "keep_as_loaded", None) if writes_the_model else None
    vae = () if bundle.family.is_sdxl else (bundle.vae,)
    for module in (bundle.unet, *vae, *(te.model for te in bundle.text_encoders)):
        parameters = list(module.parameters())
        if any(p.requires_grad for p in parameters) or all(p.dtype == torch.bfloat16 for p in parameters):
            continue
        if keep is not None:
            keep(module)
        module.to(torch.bfloat16)


def _scan(cfg: TrainConfig):
    scan = scan_dataset(cfg.data_dir, cfg.caption_extension, cfg.data_layout)
    if scan.skipped:
        logger.warning("skipped while scanning %s: %s", cfg.data_dir, dict(scan.skipped))
    if not scan.samples:
        skipped = f" (skipped: {', '.join(f'{n} {k}' for k, n in scan.skipped.items())})" if scan.skipped else ""
        raise TrainError(f"--data-dir {cfg.data_dir}: no usable training images{skipped}; it needs images with "
                         f"same-name {cfg.caption_extension} captions, or a metadata.jsonl / metadata.csv with file_name "
                         f"and text")
    return scan


def _bucket_resolutions(cfg: TrainConfig) -> list[tuple[int, int]] | None:
    """kohya's --enable_bucket buckets around the (square) resolution; None without it."""
    if not cfg.enable_bucket:
        return None
    return make_bucket_resolutions((cfg.resolution, cfg.resolution), *bucket_bounds(cfg), cfg.bucket_reso_steps)


def _warn_of_unloaded_embeddings(task, samples) -> None:
    """One warning for each `embedding:NAME` of the captions that names no embedding of the tokenizer that reads
    them (the task's text tower's, with the embedding task's word): it is left out of them, as of a prompt."""
    bundle = getattr(task, "bundle", None)
    tokenizer = bundle.text_encoders[0].tokenizer if bundle is not None else getattr(task, "tokenizer", None)
    if tokenizer is None:                                  # the vae task reads no captions
        return
    names = (name for sample in samples for name in tokenizer.unloaded_names(sample.caption))
    for name in dict.fromkeys(names):
        logger.warning("embedding:%s in the captions is not loaded; it is left out of them", name)


def _make_output_dir(folder: str) -> None:
    """The run folder, made and written to once before the model loads."""
    try:
        make_output_folder(folder, "--output-dir")
    except OutputFolderError as err:
        raise TrainError(str(err)) from None


def _refuse_output_dir_as_data_dir(cfg: TrainConfig) -> None:
    """A run folder that is the dataset's folder itself is refused before anything is read: its previews
    (samples/) would lie among the training images, read as images on the next scan (--resume), where they would
    turn a kohya dataset read by `auto` into plain folders. A run folder inside --data-dir is fine: the scan
    leaves it out (`data.is_run_folder`)."""
    out, data = Path(cfg.output_dir), Path(cfg.data_dir)
    same = out.resolve() == data.resolve()
    if not same and out.is_dir() and data.is_dir():
        same = os.path.samefile(out, data)              # one folder by two names (a hard link, a bind mount)
    if same:
        raise TrainError(f"{_named_folder(cfg)} is --data-dir {cfg.data_dir}: the run's previews and weights would "
                         f"lie among its training images; give the run a folder of its own (one inside --data-dir, "
                         f"such as {data / 'runs' / 'first'}, is left out of the scan)")


def _check_output_paths(cfg: TrainConfig, ctx: DistContext) -> None:
    """Every path the run writes, checked by rank 0 once its folder is made and before the model loads (each rank
    raises its verdict), so that a ``checkpoints`` that is a file or a ``--cache-dir`` naming one is one error
    now, not a failure at the first checkpoint after minutes of training: each folder it writes into can be made
    and written (`check_output_folder`; the folders the check makes it removes again), and no folder takes the
    name of one of its files."""
    refusal = _output_path_fault(cfg) if ctx.is_main else None
    refusal = ctx.from_main(refusal)
    if refusal is not None:
        raise TrainError(refusal)


def _output_path_fault(cfg: TrainConfig) -> str | None:
    """Why the run cannot write one of its paths (`_check_output_paths`), or None."""
    out = Path(cfg.output_dir)
    folders = [(out / "checkpoints", "the run checkpoints' folder")]
    if cfg.sample_every is not None:
        folders.append((out / "samples", "the previews' folder"))
    if cfg.cache_latents:
        folders.append((Path(cfg.cache_dir), "--cache-dir") if cfg.cache_dir else
                       (out / "latent_cache", "the latent cache's folder"))
    for folder, name in folders:
        try:
            check_output_folder(folder, name)
        except OutputFolderError as err:
            return str(err)
    stems = ("final", "interrupted", *([cfg.embedding_word] if cfg.embedding_word else []))
    names = ("log.csv", "loss.png", "summary.json", *(f"{stem}{ema}.safetensors" for stem in stems
                                                      for ema in ("", "-ema")))
    taken = [str(out / name) for name in names if (out / name).is_dir()]
    if taken:
        return (f"{', '.join(taken)} {'is a folder' if len(taken) == 1 else 'are folders'} where the run writes a "
                f"file of that name: move {'it' if len(taken) == 1 else 'them'} out of {_named_folder(cfg)}")
    return None


def _own_history(cfg: TrainConfig, resume: ResumePoint | None) -> bool:
    """Whether ``resume`` is a checkpoint of ``--output-dir`` itself (the run goes on from one of its steps)."""
    return resume is not None and resume.path.resolve().parent == (Path(cfg.output_dir) / "checkpoints").resolve()


def _checkpoints_in_the_way(cfg: TrainConfig, resume: ResumePoint | None) -> list[tuple[int, Path]]:
    """The run checkpoints in ``--output-dir`` that this run's would mix with (the newest is what ``--resume
    latest`` takes, older ones are pruned): any there when it starts at step 0 or from another folder's
    checkpoint; those after the resumed step when it resumes from an earlier checkpoint of that folder (another
    history of the run). ``--resume latest`` passes over only damaged ones: it continues the folder's run."""
    found = list_checkpoints(Path(cfg.output_dir) / "checkpoints")
    if resume is None or not found or cfg.resume == "latest":
        return found if resume is None else []
    if not _own_history(cfg, resume):
        return found
    return [(step, path) for step, path in found if step > resume.step]


_PREVIEW = re.compile(r"^(?:step-(\d+)-\d+|vae_(\d+))\.png$")   # the prompted tasks' previews, the VAE task's


def _old_run_outputs(out_dir: Path, checkpoints: list[tuple[int, Path]], after: int | None) -> list[Path]:
    """The files besides its run checkpoints that an earlier run wrote in ``out_dir``, by the names sdlab gives
    them: its weights (final, interrupted, an embedding's word from ``checkpoints``; -ema, the text task's
    .image_tower), summary.json, loss.png, log.csv and previews. ``after``: the step of its own history a run
    resumes from, whose log.csv rows (`CSVLog` keeps them) and previews up to that step stay."""
    words = {stored_config(path).get("embedding_word") for _, path in checkpoints} - {None}
    names = [f"{stem}{ema}{tower}.safetensors" for stem in ("final", "interrupted", *sorted(words))
             for ema in ("", "-ema") for tower in ("", ".image_tower")]
    names += ["summary.json", "loss.png"] + (["log.csv"] if after is None else [])
    found = [out_dir / name for name in names if (out_dir / name).is_file()]
    samples = out_dir / "samples"
    if samples.is_dir():
        found += sorted(path for path in samples.iterdir()
                        if (m := _PREVIEW.match(path.name)) and int(m.group(1) or m.group(2)) > (after or 0))
    return found


def _named_folder(cfg: TrainConfig) -> str:
    """``--output-dir`` as given, or said to be the default."""
    return f"--output-dir {cfg.output_dir}" + (" (the default)" if cfg.output_dir == TrainConfig.output_dir else "")


def _another_run(cfg: TrainConfig, in_the_way: list[tuple[int, Path]], steps: str) -> str:
    """The refusal of a new run where another run's checkpoints are, with how to go on with that run: a finished
    one (its newest checkpoint at its --max-steps) trains further only with a higher --max-steps."""
    newest, path = in_the_way[-1]
    if stored_config(path).get("max_steps") == newest:
        state = f", finished at its --max-steps {newest}"
        go_on = f"train it further with --resume latest --max-steps N (N > {newest})"
    else:
        state, go_on = "", "continue it with --resume latest"
    return (f"{_named_folder(cfg)} holds another run{state} (its checkpoints of {steps}): {go_on}, choose another "
            f"--output-dir, or give --overwrite to delete them and start again")


def _steps(checkpoints: list[tuple[int, Path]]) -> str:
    return f"step {checkpoints[0][0]}" + (f" to {checkpoints[-1][0]}" if len(checkpoints) > 1 else "")


def _refuse_to_mix(cfg: TrainConfig, resume: ResumePoint | None) -> None:
    """Without ``--overwrite``, refuse a run whose checkpoints would mix with those in ``--output-dir``
    (`_checkpoints_in_the_way`); before the dataset scan, which a large dataset makes long."""
    in_the_way = _checkpoints_in_the_way(cfg, resume)
    if not in_the_way or cfg.overwrite:
        return
    if resume is None:
        raise TrainError(_another_run(cfg, in_the_way, _steps(in_the_way)))
    raise TrainError(f"{_named_folder(cfg)} holds checkpoints of {_steps(in_the_way)}, which a run from step "
                     f"{resume.step} of {resume.path} would mix with: choose another --output-dir, or give "
                     f"--overwrite to delete them")


def _claim_output_dir(cfg: TrainConfig, resume: ResumePoint | None, is_main: bool) -> None:
    """With ``--overwrite``, delete the run checkpoints in the way (`_checkpoints_in_the_way`) and the other
    outputs of their run (a new run's: also where no checkpoint is left), so that nothing of it stays beside
    this run's; once every check has passed."""
    in_the_way = _checkpoints_in_the_way(cfg, resume)
    if not (cfg.overwrite and is_main and (in_the_way or resume is None)):
        return
    out_dir = Path(cfg.output_dir)
    outputs = _old_run_outputs(out_dir, in_the_way, resume.step if _own_history(cfg, resume) else None)
    for _, path in in_the_way:
        path.unlink(missing_ok=True)
        checksum_path(path).unlink(missing_ok=True)
    for path in outputs:
        path.unlink(missing_ok=True)
    if in_the_way:
        logger.warning("--overwrite: deleted the run checkpoints of %s in %s", _steps(in_the_way), out_dir / "checkpoints")
    if outputs:
        named = [str(path.relative_to(out_dir)) for path in outputs]
        logger.warning("--overwrite: deleted the earlier run's %s%s in %s", ", ".join(named[:8]),
                       f" and {len(named) - 8} more" if len(named) > 8 else "", out_dir)


def _lock_run_folder(cfg: TrainConfig, ctx: DistContext) -> RunLock | None:
    """Rank 0 locks the run folder (`RunLock`; the other ranks get None). Every rank learns its verdict before
    anything is read or loaded: refused, each raises rank 0's `TrainError`, so that a torchrun run in use
    elsewhere stops with its one line and takes no memory of the device the other run trains on."""
    lock, refusal = None, None
    if ctx.is_main:
        lock = RunLock(cfg.output_dir, _named_folder(cfg))
        try:
            lock.acquire()
        except TrainError as err:
            refusal = str(err)
    refusal = ctx.from_main(refusal)
    if refusal is not None:
        raise TrainError(refusal)
    return lock


def run_from_config(cfg: TrainConfig, ctx: DistContext | None = None, resume: ResumePoint | None = None,
                    resuming: str | None = None, hard_exit: bool = False) -> RunResult:
    """Check, load the model, build task and data, train. Joins / leaves the torchrun process group when
    needed. ``resume``: the checkpoint ``cfg.resume`` names, when the caller has verified it already;
    ``resuming``: the line that announces it (`resolve_settings`), said once the checkpoint fits the run;
    ``hard_exit``: a second stop signal ends the process instead of raising KeyboardInterrupt (`loop.StopFlag`),
    for the `sdlab train` command."""
    own_group = ctx is None
    lock: RunLock | None = None
    try:
        ctx = ctx or init_distributed(cfg.device)
        if cfg.model is None or cfg.data_dir is None:
            missing = " and ".join(flag(k) for k in ("model", "data_dir") if getattr(cfg, k) is None)
            raise TrainError(f"sdlab train needs {missing} (or --resume latest with the run's --output-dir)")
        _refuse_output_dir_as_data_dir(cfg)
        task_module = _task_module(cfg.task)
        if resume is None and cfg.resume is not None:
            resume = find_resume_point(Path(cfg.output_dir) / "checkpoints", cfg.resume)
        if resume is not None:
            cfg = _with_model_kind(cfg, resume.config.get("family"), resume.config.get("prediction"))
            check_resume(resume, cfg, cfg.global_batch(ctx.world_size))
        lock = _lock_run_folder(cfg, ctx)
        _refuse_to_mix(cfg, resume)
        if resume is not None and not Path(cfg.data_dir).exists():
            raise TrainError(f"--data-dir {cfg.data_dir}, which the run of {resume.path} trained on, does not exist "
                             f"(moved?): a run resumes on the folder it trained on (its path defines the run); put "
                             f"the dataset back there, or train a new run on it (another --output-dir)")
        scan = _scan(cfg)
        cfg = replace(cfg, data_layout=scan.layout)     # what auto chose, stored in the run checkpoints
        if resume is not None:
            check_resume(resume, cfg, cfg.global_batch(ctx.world_size))
        if resuming and ctx.is_main:                    # announced once the checkpoint fits the run and its data
            print(resuming, file=sys.stderr)
        _claim_output_dir(cfg, resume, ctx.is_main)
        _make_output_dir(cfg.output_dir)
        _check_output_paths(cfg, ctx)
        torch.manual_seed(cfg.seed)  # LoRA initialisation and anything else drawn at set-up
        bundle = load_bundle(cfg.model, device=ctx.device, dtype=_load_dtype(cfg), family=cfg.family,
                             prediction=cfg.prediction, vae=cfg.vae, sidecar_vae=cfg.sidecar_vae,
                             vae_dtype=functools.partial(_vae_dtype, cfg))
        cfg = _with_model_kind(cfg, bundle.family.name, bundle.prediction.value)
        cfg = _with_native_resolution(cfg, bundle)
        task = task_module.build_task(cfg, bundle)
        _cast_frozen_parts(cfg, bundle, task, writes_the_model=ctx.is_main)
        _warn_of_unloaded_embeddings(task, scan.samples)
        cache = None
        if cfg.cache_latents:
            cache = LatentCache(bundle.vae, bundle.to_model_latents, Path(cfg.cache_dir or Path(cfg.output_dir) / "latent_cache"),
                                cfg.resolution, ctx.device)
        data = TrainData(scan, resolution=cfg.resolution, center_crop=cfg.center_crop, random_flip=cfg.random_flip,
                         seed=cfg.seed, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, rank=ctx.rank,
                         world_size=ctx.world_size, num_workers=cfg.num_workers, latent_cache=cache,
                         shuffle_caption=cfg.shuffle_caption, keep_tokens=cfg.keep_tokens,
                         caption_separator=cfg.caption_separator, bucket_resolutions=_bucket_resolutions(cfg))
        data.prepare_cache()
        ctx.barrier()
        with disk_full_as_error(Path(cfg.output_dir), f"the run's files in {cfg.output_dir}"):  # log.csv, loss.png, ...
            result = train(task, data, cfg, ctx, resume=resume, hard_exit=hard_exit)
        if ctx.is_main:
            summary = {"step": result.step, "interrupted": result.interrupted, "last_loss": result.last_loss,
                       "checkpoint": str(result.checkpoint) if result.checkpoint else None,
                       "weights": str(result.weights) if result.weights else None,
                       "ema_weights": str(result.ema_weights) if result.ema_weights else None,
                       "skipped": result.skipped, "images_per_second": result.images_per_second,
                       "seconds_per_step": result.seconds_per_step, "resolution": cfg.resolution,
                       "data_layout": cfg.data_layout,
                       "peak_memory_gib": result.peak_memory and result.peak_memory[0],
                       "peak_memory_of": result.peak_memory and result.peak_memory[1]}
            Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
            atomic_write(Path(cfg.output_dir) / "summary.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2)))
        return result
    except (Exception, KeyboardInterrupt) as exc:
        _quiet_unless_reporting(exc)  # decided before the group closes, while the other processes can learn it
        raise
    finally:
        if lock is not None:
            lock.release()
        if own_group:
            shutdown_distributed()


def resolve_settings(args: argparse.Namespace) -> tuple[TrainConfig, ResumePoint | None, str | None]:
    """The run's config from the command line; with ``--resume``, the checkpoint's stored settings under
    the ones given, and the line that announces the resume with each change."""
    given = given_settings(args)
    if given.get("resume") is None:
        return config_from_settings(given), None, None
    output_dir = Path(given.get("output_dir", TrainConfig.output_dir))
    point = find_resume_point(output_dir / "checkpoints", given["resume"])
    if point is None:
        missing = " and ".join(flag(k) for k in ("model", "data_dir") if given.get(k) is None)
        if missing:                          # nothing to resume and nothing to start from
            raise TrainError(f"--resume {given['resume']}: no run checkpoint in {output_dir / 'checkpoints'}; "
                             f"a new run there needs {missing}")
        logger.warning("no run checkpoint in %s: starting at step 0", output_dir / "checkpoints")
        return config_from_settings(given), None, None
    run_dir = point.path.parent.parent if point.path.parent.name == "checkpoints" else None
    if given["resume"] == "latest":
        given["output_dir"] = str(output_dir)  # where it was found, wherever the run was first written
    elif "output_dir" not in given:
        given["output_dir"] = str(run_dir or point.config.get("output_dir", TrainConfig.output_dir))
    # the run's folder is the one its checkpoint is in (the stored --output-dir may be relative to another
    # working directory), so that only another folder is said to be a change
    stored = point.config | ({"output_dir": str(run_dir)} if run_dir is not None else {})
    cfg, changed = merge_resumed(stored, given)
    note = "; changed: " + ", ".join(f"{flag(k)} {old} -> {new}" for k, (old, new) in changed.items()) if changed else ""
    return cfg, point, (f"sdlab: resuming {cfg.output_dir} from step {point.step} ({point.path.name}) to step "
                        f"{cfg.max_steps}{note}")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def final_line(result: RunResult, cfg: TrainConfig) -> str:
    """One line: how far the run got, where its weights are, the speed it reached."""
    speed = ""
    if result.seconds_per_step:
        speed = (f" at {result.seconds_per_step:.3g} s/step, {result.images_per_second:.3g} images/s"
                 f" ({_duration(result.seconds_per_step * (result.step - result.start_step))} of steps)")
    if result.peak_memory is not None:
        speed += f", peak {result.peak_memory[1]} {result.peak_memory[0]:.3g} GiB"
    weights = ", EMA: ".join(str(p) for p in (result.weights, result.ema_weights) if p is not None) or "none"
    if result.interrupted:
        name = signal.Signals(result.stop_signal).name if result.stop_signal else "a signal"
        return (f"sdlab: stopped by {name} at step {result.step} of {cfg.max_steps}{speed}; weights so far: {weights}; "
                f"continue with: sdlab train --output-dir {cfg.output_dir} --resume latest")
    return f"sdlab: trained {cfg.task} to step {result.step}{speed}; weights: {weights}"


def run_train(args: argparse.Namespace) -> int:
    """The `sdlab train` action: exit status 0, 2 (a `TrainError`, printed as one line) or 128 + signal. Under
    torchrun one process reports a failure; the others exit with its status and say nothing."""
    try:
        try:
            cfg, point, resuming = resolve_settings(args)
        except (Exception, KeyboardInterrupt) as exc:
            _quiet_unless_reporting(exc)
            raise
        result = run_from_config(cfg, resume=point, resuming=resuming, hard_exit=True)
    except _AnotherProcessReports as exc:
        if exc.wait:
            time.sleep(QUIET_EXIT_DELAY_S)
        return exc.status
    except TrainError as exc:
        if getattr(args, "debug", False) or os.environ.get("SDLAB_DEBUG", "") not in ("", "0"):
            raise
        print(f"sdlab: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    if _is_main_process():
        print(final_line(result, cfg), flush=True)
    return 128 + result.stop_signal if result.interrupted and result.stop_signal else 0


def _configure_logging() -> None:
    """INFO and up on stderr from rank 0. Another torchrun process logs only errors and what no other process
    sees (records with ``extra={"per_rank": True}``: an image of its share that fails to load), after its rank,
    so that the set-up messages every process logs appear once."""
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"rank {rank}: %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(lambda record: record.levelno >= logging.ERROR or getattr(record, "per_rank", False))
    logging.basicConfig(level=logging.INFO, handlers=[handler])


def main(argv: list[str] | None = None) -> int:
    """``python -m sdlab.train.cli`` / torchrun: `run_train` with the `sdlab` command's error reporting (exit
    status 2 for a mistake, 1 for an internal error, both one ``sdlab: error:`` line; ``SDLAB_DEBUG=1``
    raises instead)."""
    _configure_logging()
    parser = argparse.ArgumentParser(prog="python -m sdlab.train.cli", description="sdlab train", epilog=TRAIN_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    try:
        with contextlib.nullcontext() if _is_main_process() else contextlib.redirect_stderr(io.StringIO()):
            args = parser.parse_args(argv)  # a usage error: rank 0 prints it
        return run_train(args)
    except USER_MISTAKES as exc:
        print(f"sdlab: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return _exit_status(exc)
    except KeyboardInterrupt:  # before the training loop handles signals itself
        print("sdlab: error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: one line, as `sdlab train` gives, unless debugging
        if os.environ.get("SDLAB_DEBUG", "") not in ("", "0"):
            raise
        print(f"sdlab: error: internal error: {type(exc).__name__}: {' '.join(str(exc).split())} (set SDLAB_DEBUG=1 "
              f"for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
