"""`sdlab train`: argument parsing and the run set-up (no tensor code of its own).

The lead wires `add_train_parser(subparsers)` and `run_train(args)` into `sdlab/cli.py`; for direct use
(tests, ``torchrun``) this module is runnable: ``python -m sdlab.train.cli --model M --data-dir D ...`` or
``torchrun --nproc_per_node=2 -m sdlab.train.cli ...``.

Tasks are plug-ins: ``--task NAME`` imports ``sdlab.train.<NAME>_task`` and calls its
``build_task(config: TrainConfig, bundle: ModelBundle) -> TrainTask``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path

import torch

from sdlab.checkpoints.load import load_bundle
from sdlab.train.config import TrainConfig, add_config_arguments, config_from_args
from sdlab.train.data import LatentCache, TrainData, scan_dataset
from sdlab.train.distributed import DistContext, init_distributed, shutdown_distributed
from sdlab.train.loop import RunResult, train

logger = logging.getLogger(__name__)

__all__ = ["add_train_parser", "build_parser", "main", "run_from_config", "run_train"]

TASK_MODULES = {"unet": "sdlab.train.unet_task", "vae": "sdlab.train.vae_task", "text": "sdlab.train.text_task"}


def add_train_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train", help="train or fine-tune (U-Net, LoRA, ...) with resumable checkpoints; torchrun for DDP",
        description="Train a model. Settings come from --config (TOML/JSON) and the options below.",
    )
    add_config_arguments(parser)
    parser.set_defaults(run=run_train)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdlab-train")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    return parser


def _build_task(cfg: TrainConfig, bundle):
    module_name = TASK_MODULES.get(cfg.task, f"sdlab.train.{cfg.task}_task")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise SystemExit(f"unknown training task {cfg.task!r} ({exc})") from None
    return module.build_task(cfg, bundle)


def run_from_config(cfg: TrainConfig, ctx: DistContext | None = None) -> RunResult:
    """Load the model, build task and data, train. Joins / leaves the torchrun process group when needed."""
    own_group = ctx is None
    ctx = ctx or init_distributed(cfg.device)
    try:
        if cfg.model is None or cfg.data_dir is None:
            raise SystemExit("sdlab train needs --model and --data-dir")
        torch.manual_seed(cfg.seed)  # LoRA initialisation and anything else drawn at set-up
        bundle = load_bundle(cfg.model, device=ctx.device, dtype=torch.float32, family=cfg.family,
                             prediction=cfg.prediction, vae=cfg.vae)
        task = _build_task(cfg, bundle)
        scan = scan_dataset(cfg.data_dir)
        if scan.skipped:
            logger.warning("skipped while scanning %s: %s", cfg.data_dir, dict(scan.skipped))
        cache = None
        if cfg.cache_latents:
            cache = LatentCache(bundle.vae, bundle.scaling_factor, Path(cfg.cache_dir or Path(cfg.output_dir) / "latent_cache"),
                                cfg.resolution, ctx.device)
        data = TrainData(scan, resolution=cfg.resolution, center_crop=cfg.center_crop, random_flip=cfg.random_flip,
                         seed=cfg.seed, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, rank=ctx.rank,
                         world_size=ctx.world_size, num_workers=cfg.num_workers, latent_cache=cache)
        data.prepare_cache()
        ctx.barrier()
        result = train(task, data, cfg, ctx)
        if ctx.is_main:
            summary = {"step": result.step, "interrupted": result.interrupted, "last_loss": result.last_loss,
                       "checkpoint": str(result.checkpoint) if result.checkpoint else None,
                       "weights": str(result.weights) if result.weights else None,
                       "ema_weights": str(result.ema_weights) if result.ema_weights else None,
                       "skipped": result.skipped, "images_per_second": result.images_per_second}
            Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
            (Path(cfg.output_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
        return result
    finally:
        if own_group:
            shutdown_distributed()


def run_train(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    result = run_from_config(cfg)
    return 130 if result.interrupted else 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m sdlab.train.cli", description="sdlab train")
    add_config_arguments(parser)
    return run_train(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
