"""The training loop shared by every `TrainTask`: optimiser, LR schedule, accumulation, clipping, bf16
autocast, EMA, DistributedDataParallel, run checkpoints and resume, signals, logging, previews.

One optimiser step = ``grad_accum`` micro-steps of ``batch_size`` images on each of ``world_size`` ranks.
Each micro-step's loss is divided by ``grad_accum`` and gradients are averaged over ranks (DDP), so the
update equals that of one process on the whole global batch (up to float summation order).

Resume: the run checkpoint restores the weights, Adam's moments, the EMA and the RNG streams; the settings in
force are this run's. The optimiser's learning rate, weight decay, betas and epsilon are this config's, and step
s trains at ``learning_rate * lr_multiplier(s, cfg)``, the rate a run started with this config would use at
step s (so extending ``max_steps`` stretches the cosine from the step reached, and a finished cosine run that
is resumed with a larger ``max_steps`` trains again at that schedule's rate instead of at its final 0).

Interruption: SIGINT / SIGTERM only set a flag (nothing is written from a signal handler); the loop
finishes the current optimiser step, writes a run checkpoint and the weights so far
(``interrupted.safetensors``, a file ``--model`` / ``--lora`` read), and returns. A checkpoint write that is
already running when the signal arrives simply completes. A second signal stops at once (`StopFlag`): under the
`sdlab train` command it ends the process; called from Python (a notebook) it raises KeyboardInterrupt, once a
checkpoint being written is complete.
SIGKILL cannot be caught: the run then loses the steps since its last checkpoint, and the atomic write
guarantees that checkpoint is complete.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sdlab.train.config import TrainConfig, flag, resume_changes
from sdlab.train.data import TrainData, generator_for
from sdlab.train.distributed import DistContext, all_reduce_grads
from sdlab.train.ema import EMA
from sdlab.train.errors import TrainError
from sdlab.train.run_checkpoint import (
    DiskFull,
    ResumePoint,
    capture_rng_state,
    clean_orphans,
    disk_full_as_error,
    find_resume_point,
    prune_checkpoints,
    restore_rng_state,
    save_run_checkpoint,
)
from sdlab.train.run_log import RUN_LOG_COLUMNS, CSVLog, draw_loss_curve, read_log
from sdlab.train.task import TrainTask

logger = logging.getLogger(__name__)

__all__ = ["RunResult", "StopFlag", "apply_optimizer_settings", "check_resume", "flush_denormals", "lr_multiplier",
           "peak_memory", "reset_peak_memory", "train"]


@dataclass
class RunResult:
    step: int                                   # optimiser steps completed
    interrupted: bool                           # stopped by SIGINT / SIGTERM before max_steps
    last_loss: float | None
    checkpoint: Path | None                     # newest run checkpoint
    weights: Path | None                        # the task's deliverable (interrupted.safetensors when stopped)
    ema_weights: Path | None
    skipped: dict[str, int] = field(default_factory=dict)
    images_per_second: float | None = None      # mean over the steps of this process's run
    peak_memory: tuple[float, str] | None = None  # the peak in GiB while it trained, and of what: "GPU" or "RAM"
    start_step: int = 0                         # the step it resumed from
    seconds_per_step: float | None = None
    stop_signal: int | None = None              # the signal that stopped it (any rank's)


class StopFlag:
    """SIGINT / SIGTERM -> a flag the loop polls (installed only in the main thread). A second signal stops at
    once. With ``hard_exit`` (the `sdlab train` command) it ends the process, killed by that signal (exit status
    128 + its number) after the log is flushed: neither a KeyboardInterrupt, which waits for a data thread whose
    read hangs, nor the interpreter's exit, which joins every thread. Without it (training called from Python,
    where the process is the caller's: a notebook's kernel) it raises KeyboardInterrupt, inside `holding` once
    the block is done."""

    def __init__(self, hard_exit: bool = False) -> None:
        self.requested: int | None = None
        self.hard_exit = hard_exit
        self._previous: dict[int, Any] = {}
        self._holding = False
        self._held = False

    def _handler(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.requested is None:
            logger.warning("received %s: stopping after this step with a checkpoint (again: stop at once)", name)
            self.requested = signum
            return
        if self.hard_exit:
            logger.warning("received %s again: stopping at once; the checkpoints written so far are intact", name)
            _end_process(signum)
        if self._holding:
            logger.warning("received %s again: stopping once the checkpoint being written is complete", name)
            self._held = True
            return
        logger.warning("received %s again: stopping at once (KeyboardInterrupt); the checkpoints written so far are "
                       "intact", name)
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        """A second signal's KeyboardInterrupt waits for the end of the block (a checkpoint write)."""
        self._holding = True
        try:
            yield
        finally:
            self._holding = False
        if self._held:
            raise KeyboardInterrupt

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def _end_process(signum: int) -> None:
    """Flush the log and the standard streams, then die of ``signum`` as without a handler (``os._exit`` where
    that default does not end the process)."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    signal.signal(signum, signal.SIG_DFL)
    signal.raise_signal(signum)
    os._exit(128 + signum)


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then constant or cosine decay to ``min_lr_ratio`` at max_steps
    (``step`` = optimiser steps already taken): diffusers' ``get_scheduler`` ("constant_with_warmup" /
    "cosine_with_warmup", 0.5 cycles), whose warm-up trains step 0 at rate 0 and reaches the peak at step
    ``warmup_steps``; ``min_lr_ratio`` lifts the cosine's floor (0: diffusers' exactly)."""
    if step < cfg.warmup_steps:
        return step / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def apply_optimizer_settings(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> None:
    """Put ``cfg``'s AdamW settings into every parameter group: after ``load_state_dict``, which restores the
    saved run's, a resumed run trains with the learning rate, weight decay, betas and epsilon it was given.
    ``initial_lr`` is the peak the LR schedule scales (``LambdaLR`` reads it when built at a later step)."""
    for group in optimizer.param_groups:
        group.update(lr=cfg.learning_rate, initial_lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                     betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)


def _trainable_named(modules: dict[str, nn.Module]) -> dict[str, nn.Parameter]:
    return {f"{name}.{k}": p for name, m in modules.items() for k, p in m.named_parameters() if p.requires_grad}


def _run_state(modules: dict[str, nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
    """Trainable parameters and buffers of each module (frozen weights come back from the base model)."""
    out = {}
    for name, m in modules.items():
        keep = {k for k, p in m.named_parameters() if p.requires_grad} | {k for k, _ in m.named_buffers()}
        out[name] = {k: v.detach().cpu().clone() for k, v in m.state_dict().items() if k in keep}
    return out


def _load_run_state(modules: dict[str, nn.Module], state: dict[str, dict[str, torch.Tensor]]) -> None:
    if set(state) != set(modules):
        raise TrainError(f"the run checkpoint holds modules {sorted(state)}, this run trains {sorted(modules)}")
    for name, m in modules.items():
        try:
            missing, unexpected = m.load_state_dict(state[name], strict=False)
        except RuntimeError as exc:  # shapes differ
            raise TrainError(f"the run checkpoint does not match the model's {name} (another --model?): "
                             f"{str(exc).splitlines()[-1].strip()[:200]}") from None
        trainable = {k for k, p in m.named_parameters() if p.requires_grad}
        lost = sorted(trainable & set(missing))
        if lost or unexpected:
            raise TrainError(f"the run checkpoint does not match the model's {name} (another --model?): missing "
                             f"{lost[:3]}, unexpected {unexpected[:3]}")


def check_resume(point: ResumePoint, cfg: TrainConfig, global_batch: int) -> None:
    """A `TrainError` when ``cfg`` changes a setting that defines the run: the model trained, its data stream or
    objective (`resume_changes`)."""
    changed = resume_changes(point.config, cfg)
    if changed:
        what = ", ".join(f"{flag(k)} was {then!r}, now {now!r}" for k, (then, now) in changed.items())
        raise TrainError(f"cannot resume from {point.path}: {what} (these define the run; leave them out to keep "
                         f"the checkpoint's, or start a new --output-dir)")
    if point.global_batch != global_batch:
        raise TrainError(f"cannot resume from {point.path}: {_batch_change(point, cfg, global_batch)}")
    if cfg.max_steps < point.step:
        raise TrainError(f"--max-steps {cfg.max_steps} is below step {point.step} of {point.path}, which a run cannot "
                         f"go back from: give --max-steps {point.step} (its weights) or more")


def _warn_of_another_dataset(then: dict | None, now: dict, path: Path, data_dir: str) -> None:
    """Warn when the images, captions or repeats of ``--data-dir`` differ from those the checkpoint trained on
    (`DatasetScan.digest`; a checkpoint written before it was stored says nothing): the run goes on with the
    data as it is now, and no longer equals an uninterrupted run."""
    if then is None or then.get("digest") == now["digest"]:
        return
    logger.warning("--data-dir %s is not the dataset %s trained on (%s images then, %d now; files, sizes, captions or "
                   "repeats changed): the run goes on with it as it is now, so it will not give the weights of an "
                   "uninterrupted run", data_dir, path.name, then.get("images", "?"), now["images"])


def _processes(n: int) -> str:
    return f"{n} process" if n == 1 else f"{n} processes"


def _batch_change(point: ResumePoint, cfg: TrainConfig, global_batch: int) -> str:
    """What changed the images per step (the process count, or --batch-size / --grad-accum) and the
    --batch-size or --grad-accum that keeps the checkpoint's."""
    stored_batch, stored_accum = point.config.get("batch_size", 1), point.config.get("grad_accum", 1)
    stored_world = point.global_batch // (stored_batch * stored_accum)
    world = global_batch // (cfg.batch_size * cfg.grad_accum)
    trained = (f"it trained on {point.global_batch} images per step (--batch-size {stored_batch} x --grad-accum "
               f"{stored_accum} x {_processes(stored_world)})")
    keep = f"to keep {point.global_batch} images per step"
    if world == stored_world:
        return (f"{trained}, this run would take {global_batch} (--batch-size {cfg.batch_size} x --grad-accum "
                f"{cfg.grad_accum}); give it {_batch_advice(point.global_batch // world, cfg)} (or leave "
                f"--batch-size and --grad-accum out) {keep}")
    if point.global_batch % world:
        return (f"{trained}, which {_processes(world)} cannot split evenly; resume it with {_processes(stored_world)} "
                f"(or start a new --output-dir)")
    return f"{trained}; this run has {_processes(world)}: give it {_batch_advice(point.global_batch // world, cfg)} {keep}"


def _batch_advice(per_process: int, cfg: TrainConfig) -> str:
    """The --batch-size (for this --grad-accum) or the --grad-accum (for this --batch-size) that makes
    ``per_process`` images per step and process; both where both can."""
    options = [f"--batch-size {per_process // cfg.grad_accum}"] if per_process % cfg.grad_accum == 0 else []
    if per_process % cfg.batch_size == 0 and per_process // cfg.batch_size != cfg.grad_accum:
        options.append(f"--grad-accum {per_process // cfg.batch_size}")
    if not options:
        return f"--batch-size {per_process} --grad-accum 1"
    return options[0] + (f" (or {options[1]})" if len(options) > 1 else "")


def _broadcast_params(modules: list[nn.Module]) -> None:
    for m in modules:
        for p in m.parameters():
            if p.requires_grad:
                dist.broadcast(p.data, src=0)


def train(task: TrainTask, data: TrainData, cfg: TrainConfig, ctx: DistContext,
          resume: ResumePoint | None = None, hard_exit: bool = False) -> RunResult:
    """Run (or resume) training to ``cfg.max_steps``; see the module docstring. Only rank 0 writes files.
    ``resume``: an already verified checkpoint (else ``cfg.resume`` is looked up here); ``hard_exit``: a second
    stop signal ends the process (`StopFlag`), for the `sdlab train` command."""
    out_dir = Path(cfg.output_dir)
    ckpt_dir = out_dir / "checkpoints"
    modules = task.trainable_modules()
    named = _trainable_named(modules)
    params = list(named.values())
    if not params:
        raise ValueError(f"task {task.name} has no trainable parameters")
    reset_peak_memory(ctx.device)
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    ema = EMA(named, cfg.ema_decay) if cfg.ema_decay is not None else None
    global_batch = data.global_batch
    dataset = {"images": len(data.scan), "digest": data.scan.digest(cfg.data_dir or os.curdir)}  # in each checkpoint

    # -- resume ---------------------------------------------------------------------------------------
    start_step = 0
    if ctx.is_main:
        clean_orphans(ckpt_dir)
    ctx.barrier()
    if resume is None and cfg.resume is not None:
        resume = find_resume_point(ckpt_dir, cfg.resume)
        if resume is None:
            logger.info("no run checkpoint in %s: starting from step 0", ckpt_dir)
    if resume is not None:
        check_resume(resume, cfg, global_batch)
        state = resume.take_state()
        _load_run_state(modules, state["modules"])
        optimizer.load_state_dict(state["optimizer"])  # Adam's moments, and the saved hyper-parameters ...
        apply_optimizer_settings(optimizer, cfg)       # ... replaced by this run's
        if ema is not None:
            if state.get("ema") is None:
                raise TrainError(f"cannot resume {resume.path} with --ema-decay: the checkpoint has no EMA state")
            ema.load_state_dict(state["ema"])
        if hasattr(task, "load_extra_state"):  # e.g. the lcd task's target network
            task.load_extra_state(state.get("task_state") or {})
        restore_rng_state(state["rng"])
        start_step = int(state["step"])
        _warn_of_another_dataset(state.get("dataset"), dataset, resume.path, cfg.data_dir)
        del state
        logger.info("resumed from %s at step %d", resume.path, start_step)
    # the lr of step s is learning_rate * lr_multiplier(s, cfg) under the settings in force, also after a resume
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, cfg), last_epoch=start_step - 1)

    # -- distributed ----------------------------------------------------------------------------------
    manual_sync: list[nn.Module] = []
    wrapped: list[DistributedDataParallel] = []
    if ctx.enabled:
        routed = set(getattr(task, "ddp_names", ()))
        for name, m in modules.items():
            if not any(p.requires_grad for p in m.parameters()):
                continue
            if name in routed and hasattr(task, "bind_wrapped"):
                ddp = DistributedDataParallel(m, device_ids=[ctx.device] if ctx.device.type == "cuda" else None,
                                              forward_sync_buffers=False)
                task.bind_wrapped(name, ddp)
                wrapped.append(ddp)
            else:
                manual_sync.append(m)
        _broadcast_params(manual_sync)

    # -- logging --------------------------------------------------------------------------------------
    log: CSVLog | None = None
    if ctx.is_main:
        log = CSVLog(out_dir / "log.csv", RUN_LOG_COLUMNS,
                     resume_step=start_step if cfg.resume is not None else None)
    bar = None
    if ctx.is_main and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.max_steps, initial=start_step, desc=f"train {task.name}", dynamic_ncols=True)

    autocast = torch.autocast(device_type=ctx.device.type, dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16")
    skipped = dict(data.scan.skipped)
    last_checkpoint: Path | None = resume.path if resume is not None else None
    checkpoint_step: int | None = start_step if resume is not None else None  # the same on every rank
    step = start_step
    last_loss: float | None = None
    rate: float | None = None
    interrupted = False
    stop_signal = 0
    timed_seconds, timed_steps = 0.0, 0

    def write_checkpoint(done: int) -> None:
        nonlocal last_checkpoint, checkpoint_step
        checkpoint_step = done
        if ctx.is_main:
            state = {
                "step": done,
                "global_batch": global_batch,
                "world_size": ctx.world_size,
                "config": cfg.to_json(),
                "task": task.name,
                "modules": _run_state(modules),
                "ema": ema.state_dict() if ema is not None else None,
                "task_state": task.extra_state() if hasattr(task, "extra_state") else None,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": capture_rng_state(),
                "skipped": skipped | {"broken_at_load": sum(data.broken_at_load.values())},
                "dataset": dataset,
            }
            try:
                last_checkpoint = save_run_checkpoint(state, ckpt_dir, done)
            except DiskFull as full:
                raise DiskFull(f"{full}{_deliver_despite_full_disk(task, ema, out_dir, done)}") from None
            del state
            prune_checkpoints(ckpt_dir, cfg.keep_checkpoints, done)
            _draw_curve(out_dir)
        ctx.barrier()

    micro_losses: list[float] = []
    since_row = _LogWindow()
    step_start = time.perf_counter()
    # the stop handlers stay installed until the weights are written (a second signal waits for them, or ends the
    # process under `sdlab train`); the batches are closed here, not by the garbage collector, which drops a
    # KeyboardInterrupt raised while their end waits for a read
    with StopFlag(hard_exit) as stop:
        with flush_denormals(ctx.device), contextlib.closing(data.iterate(start_step, cfg.max_steps)) as batches:
            for step_i, micro, batch in batches:
                if micro == 0:
                    optimizer.zero_grad(set_to_none=True)
                    micro_losses.clear()
                    step_start = time.perf_counter()
                last_micro = micro == cfg.grad_accum - 1
                sync = contextlib.ExitStack()
                if not last_micro:
                    for ddp in wrapped:
                        sync.enter_context(ddp.no_sync())
                generator = generator_for(cfg.seed, "step", step_i, ctx.rank, micro)
                with sync, autocast:
                    loss, _metrics = task.loss(batch.to(ctx.device), generator)
                if not torch.isfinite(loss):
                    raise TrainError(f"the loss became {float(loss.detach())} at step {step_i + 1} (images "
                                     f"{batch.paths}); a lower --learning-rate or --max-grad-norm may help")
                (loss / cfg.grad_accum).backward()
                micro_losses.append(float(loss.detach()))
                if not last_micro:
                    continue

                all_reduce_grads(manual_sync, ctx.world_size)
                max_norm = cfg.max_grad_norm if cfg.max_grad_norm is not None else float("inf")
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                if ema is not None:
                    ema.update()
                if hasattr(task, "after_optimizer_step"):
                    task.after_optimizer_step()
                step = step_i + 1

                last_loss = ctx.all_mean(sum(micro_losses) / len(micro_losses))
                elapsed = time.perf_counter() - step_start
                rate = global_batch / elapsed if elapsed > 0 else None
                if step > start_step + 1 or step == cfg.max_steps:  # the first step pays for warming up
                    timed_seconds, timed_steps = timed_seconds + elapsed, timed_steps + 1
                since_row.add(last_loss, grad_norm, elapsed)
                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    means = since_row.take(global_batch)
                    if log is not None:
                        log.append({"step": step, "lr": f"{lr:.6g}", "epoch": data.epoch_at(step_i),
                                    "time": f"{time.time():.3f}", **means})
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{rate:.2f}" if rate else "-")

                stop_signal = ctx.all_max(stop.requested or 0)
                stop_now = stop_signal > 0
                if step % cfg.checkpoint_every == 0 or stop_now:
                    with stop.holding():
                        write_checkpoint(step)
                if cfg.sample_every and step % cfg.sample_every == 0 and ctx.is_main:
                    _preview(task, ema, out_dir, step)
                if stop_now:
                    interrupted = step < cfg.max_steps
                    break
        if bar is not None:
            bar.close()
        data.close()

        weights = ema_weights = None
        with stop.holding():
            if not interrupted and checkpoint_step != step:
                write_checkpoint(step)
            if ctx.is_main and (step > start_step or not interrupted):
                weights, ema_weights = _deliver(task, ema, out_dir, "interrupted" if interrupted else "final")
                _draw_curve(out_dir)
    ctx.barrier()
    skipped = skipped | ({"broken_at_load": sum(data.broken_at_load.values())} if data.broken_at_load else {})
    mean_rate = global_batch * timed_steps / timed_seconds if timed_seconds > 0 else rate
    return RunResult(step=step, interrupted=interrupted, last_loss=last_loss, checkpoint=last_checkpoint,
                     weights=weights, ema_weights=ema_weights, skipped=skipped, images_per_second=mean_rate,
                     start_step=start_step, seconds_per_step=timed_seconds / timed_steps if timed_steps else None,
                     stop_signal=stop_signal or None, peak_memory=peak_memory(ctx.device))


@dataclass
class _LogWindow:
    """The steps since the previous log.csv row, which holds their mean loss and gradient norm (one step's
    loss swings with its timesteps) and the images per second over them."""

    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, loss: float, grad_norm: float, seconds: float) -> None:
        self.losses.append(loss)
        self.grad_norms.append(grad_norm)
        self.seconds += seconds

    def take(self, global_batch: int) -> dict[str, str]:
        """The row's columns of these steps; the window starts again empty."""
        n = len(self.losses)
        row = {"loss": f"{sum(self.losses) / n:.6g}", "grad_norm": f"{sum(self.grad_norms) / n:.6g}",
               "images_per_s": f"{global_batch * n / self.seconds:.4g}" if self.seconds > 0 else ""}
        self.losses, self.grad_norms, self.seconds = [], [], 0.0
        return row


_HIGH_WATER = Path("/proc/self/status")   # Linux: VmHWM, the peak resident memory, which clear_refs 5 resets


def reset_peak_memory(device: torch.device) -> None:
    """Start `peak_memory` again from what is in use now: the CUDA allocator's peak, or on Linux the process's
    resident high-water mark (elsewhere the CPU peak is the process's)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif device.type == "cpu":
        with contextlib.suppress(OSError):
            _HIGH_WATER.with_name("clear_refs").write_text("5")


def peak_memory(device: torch.device) -> tuple[float, str] | None:
    """The peak memory in GiB since `reset_peak_memory`, rounded to the MiB so that every place that shows it
    (the final line, summary.json) shows one number, and of what: the CUDA memory allocated on ``device``
    ("GPU"), or on the CPU the peak resident RAM ("RAM"); None where neither is known."""
    peak = _peak_memory(device)
    return peak and (round(peak[0], 3), peak[1])


def _peak_memory(device: torch.device) -> tuple[float, str] | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "GPU"
    if device.type != "cpu":
        return None
    with contextlib.suppress(OSError):
        for line in _HIGH_WATER.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20, "RAM"      # kB
    try:
        import resource
    except ImportError:                                           # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss    # KiB on Linux, bytes on macOS
    return peak * (1 if sys.platform == "darwin" else 1024) / 2**30, "RAM"


def _deliver_despite_full_disk(task: TrainTask, ema: EMA | None, out_dir: Path, step: int) -> str:
    """What the error of a run checkpoint that did not fit adds: the weights of ``step``, written as
    ``interrupted.safetensors`` when they fit (a LoRA or an embedding is far smaller than the run state)."""
    try:
        weights, ema_weights = _deliver(task, ema, out_dir, "interrupted")
    except DiskFull:
        return ""
    return f"; the weights of step {step} were written: {', '.join(str(p) for p in (weights, ema_weights) if p)}"


def _deliver(task: TrainTask, ema: EMA | None, out_dir: Path, name: str) -> tuple[Path, Path | None]:
    """The task's weights as ``<name>.safetensors`` (and ``<name>-ema.safetensors`` with EMA); a task with a
    ``deliverable_stem(name)`` names its files itself (an embedding: its word, the prompt's name for it)."""
    name = task.deliverable_stem(name) if hasattr(task, "deliverable_stem") else name
    weights = out_dir / f"{name}.safetensors"
    with disk_full_as_error(out_dir, f"the weights {weights}"):
        task.save_weights(weights, ema=False)
        if ema is None:
            return weights, None
        ema_weights = out_dir / f"{name}-ema.safetensors"
        with ema.swapped_in():
            task.save_weights(ema_weights, ema=True)
    return weights, ema_weights


@contextlib.contextmanager
def flush_denormals(device: torch.device):
    """On CPU, treat subnormal floats (|x| < 1.2e-38 in fp32) as zero while the block runs (x86 FTZ / DAZ).

    x86 cores compute on subnormals in microcode, about 100x slower; training produces them (AdamW's second
    moment of tiny gradients, attention probabilities that underflow), and one optimiser step of a small
    U-Net was measured at 29 s instead of 1.3 s. Values that small are zero for training purposes. The flag
    is per thread and has no getter: PyTorch's default (off) is restored afterwards."""
    if device.type != "cpu" or not torch.set_flush_denormal(True):
        yield
        return
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def _preview(task: TrainTask, ema: EMA | None, out_dir: Path, step: int) -> None:
    try:
        with ema.swapped_in() if ema is not None else contextlib.nullcontext():
            task.preview(out_dir / "samples", step)
    except ImportError as exc:  # the generate pipeline is an optional layer for training
        logger.warning("preview at step %d skipped: %s", step, exc)


def _draw_curve(out_dir: Path) -> None:
    path = out_dir / "log.csv"
    if not path.is_file():
        return
    rows = [r for r in read_log(path) if r.get("loss")]
    draw_loss_curve([float(r["step"]) for r in rows], [float(r["loss"]) for r in rows], out_dir / "loss.png")
