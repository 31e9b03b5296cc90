"""Putting a model together from separately trained parts, and delivering it.

Training from scratch runs in stages (see ``recipes/sdlab-tiny/README.md``): the VAE and the text tower are
trained first, each by its own task, then the U-Net learns on latents of that VAE, conditioned on that
text tower. Two steps join the stages:

``assemble_bundle``: a base bundle (``sdlab new-model``) with its VAE and/or text encoder replaced by the
files ``sdlab train --task vae`` / ``--task text`` delivered, and the latent scaling factor measured on the
training images under the new VAE (LDM's rule: ``1 / std`` of ``z ~ q(z|x)``, every latent element pooled),
so that the U-Net sees unit-variance latents.

``bundle_from_run``: a bundle whose U-Net weights come from a U-Net run checkpoint (the EMA weights by
default), so a model can be delivered at any point of a long run, not only when it ends; ``save_bundle``
with ``dtype=torch.float16`` writes the shipped file.

Command line::

    python -m sdlab.tiny.assemble assemble BASE OUT [--vae FILE] [--text FILE] [--data DIR] [--images N]
    python -m sdlab.tiny.assemble export BASE RUN OUT [--raw] [--dtype fp16|bf16|fp32]

``RUN`` is a run checkpoint (``.pt``) or a run folder (its newest checkpoint is taken).
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path

import torch

from sdlab.checkpoints.load import load_bundle
from sdlab.checkpoints.save import save_bundle
from sdlab.families.loaded import ModelBundle
from sdlab.tiny.text_task import load_trained_text_encoder
from sdlab.train.data import generator_for, load_training_image, scan_dataset
from sdlab.train.run_checkpoint import latest_checkpoint, load_run_checkpoint
from sdlab.train.vae_task import latent_scaling_factor, load_trained_vae
from sdlab.utils.dtypes import DTYPE_NAMES, dtype_from_name

logger = logging.getLogger(__name__)

__all__ = ["assemble_bundle", "bundle_from_run", "main", "measure_scaling_factor", "resolve_run_checkpoint"]


def measure_scaling_factor(bundle: ModelBundle, data_dir: str | Path, images: int = 256, seed: int = 0) -> float:
    """1 / std of the bundle VAE's latents over the first ``images`` training images of ``data_dir``, at the
    family's default size."""
    scan = scan_dataset(data_dir)
    samples = scan.samples[:images]
    if not samples:
        raise ValueError(f"{data_dir}: no training images to measure the latent scaling factor on")
    size = bundle.default_size
    pixels = torch.stack([
        load_training_image(s.path, size, center_crop=True, random_flip=False, generator=torch.Generator()).pixels
        for s in samples
    ])  # (N, 3, size, size)
    was_training = bundle.vae.training
    bundle.vae.eval()
    factor = latent_scaling_factor(bundle.vae, pixels.to(bundle.device), generator_for(seed, "scaling"))
    bundle.vae.train(was_training)
    logger.info("latent scaling factor %.5f (1 / std over %d images of %s)", factor, len(samples), data_dir)
    return factor


def _same_encoder(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Whether two VAEs encode identically: equal encoder and quant_conv weights."""
    first = {k: v for k, v in a.state_dict().items() if k.startswith(("encoder.", "quant_conv."))}
    second = {k: v for k, v in b.state_dict().items() if k.startswith(("encoder.", "quant_conv."))}
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k].to(first[k].dtype)) for k in first)


def assemble_bundle(
    base: str | Path,
    *,
    vae: str | Path | None = None,
    text: str | Path | None = None,
    data_dir: str | Path | None = None,
    images: int = 256,
    seed: int = 0,
) -> ModelBundle:
    """``base`` with its VAE / first text encoder replaced by trained ones (see the module docstring).

    With a new VAE the scaling factor is measured on ``data_dir`` (required then), unless the new VAE has the
    base's encoder exactly (a decoder-only run): then the latent space, and the U-Net trained on it, are
    unchanged and the base's factor is kept. The text tower must have the width the base's U-Net cross-attends to.
    """
    bundle = load_bundle(base, dtype=torch.float32)
    if text is not None:
        model = load_trained_text_encoder(text)
        first = bundle.text_encoders[0]
        if model.cfg.width != first.config.width:
            raise ValueError(f"{text}: text tower width {model.cfg.width}, the U-Net expects {first.config.width}")
        encoders = (replace(first, config=model.cfg, model=model.eval()), *bundle.text_encoders[1:])
        bundle = replace(bundle, text_encoders=encoders)
        logger.info("text encoder from %s", text)
    if vae is not None:
        model, _ = load_trained_vae(vae)
        if _same_encoder(bundle.vae, model):
            logger.info("VAE decoder from %s (same encoder: scaling factor kept)", vae)
            return replace(bundle, vae=model.eval(), vae_config=model.cfg)
        if data_dir is None:
            raise ValueError("a new VAE needs data_dir to measure its latent scaling factor on")
        bundle = replace(bundle, vae=model.eval(), vae_config=model.cfg)
        factor = measure_scaling_factor(bundle, data_dir, images, seed)
        bundle = replace(bundle, scaling_factor=factor)
        logger.info("VAE from %s", vae)
    return bundle


def resolve_run_checkpoint(run: str | Path) -> Path:
    """A run checkpoint file, or the newest one of a run folder (``<run>/checkpoints``)."""
    run = Path(run)
    if run.is_file():
        return run
    for folder in (run / "checkpoints", run):
        found = latest_checkpoint(folder) if folder.is_dir() else None
        if found is not None:
            return found
    raise FileNotFoundError(f"{run}: no run checkpoint")


def _bundle_modules(bundle: ModelBundle) -> dict[str, torch.nn.Module]:
    """The run-checkpoint module names of a bundle's parts: "unet", "text_encoder0", ..."""
    return {"unet": bundle.unet} | {f"text_encoder{i}": te.model for i, te in enumerate(bundle.text_encoders)}


def bundle_from_run(base: str | Path, run: str | Path, *, ema: bool = True, target: bool = False,
                    preset: str | None = None) -> tuple[ModelBundle, int]:
    """(``base`` with the weights of run checkpoint ``run``, the step it was saved at): the U-Net, and the text
    towers when the run trained them (``train_text_encoder``). ``ema``: take the EMA weights (an error if the
    run keeps none), else the raw ones. ``target``: an lcd run's target network (the student's EMA) as the
    U-Net. ``preset``: the few-step preset the delivered file names (e.g. "lcm" for a distilled model)."""
    path = resolve_run_checkpoint(run)
    state = load_run_checkpoint(path)
    if state.get("task") not in ("unet", "lcd") or "unet" not in state["modules"]:
        raise ValueError(f"{path}: not a full U-Net run checkpoint (task {state.get('task')!r})")
    bundle = load_bundle(base, dtype=torch.float32)
    parts = _bundle_modules(bundle)
    shadow = (state.get("ema") or {}).get("shadow", {})
    if ema and not target and not shadow:
        raise ValueError(f"{path}: the run keeps no EMA weights; export with ema=False (--raw)")
    for name, raw in state["modules"].items():
        if name not in parts:
            raise ValueError(f"{path}: trained module {name!r} is not a part of {base}")
        weights = dict(raw)
        if target and name == "unet":
            task_state = state.get("task_state") or {}
            if "target" not in task_state:
                raise ValueError(f"{path}: no target network (not an lcd run)")
            weights = dict(task_state["target"])
        elif ema:
            weights |= {k[len(name) + 1:]: v for k, v in shadow.items() if k.startswith(f"{name}.")}
        missing, unexpected = parts[name].load_state_dict(weights, strict=False)
        if unexpected or any(not k.endswith("position_ids") for k in missing):
            raise ValueError(f"{path}: {name} weights do not match {base}: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
    step = int(state["step"])
    logger.info("%s from %s (step %d, %s weights)", ", ".join(state["modules"]), path, step,
                "target" if target else "EMA" if ema else "raw")
    return replace(bundle, preset=preset), step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdlab.tiny.assemble", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    a = sub.add_parser("assemble", help="replace a bundle's VAE / text encoder by trained ones")
    a.add_argument("base")
    a.add_argument("out")
    a.add_argument("--vae", help="VAE file written by `sdlab train --task vae`")
    a.add_argument("--text", help="text tower written by `sdlab train --task text`")
    a.add_argument("--data", help="training images for the latent scaling factor (needed with --vae)")
    a.add_argument("--images", type=int, default=256, help="images to measure the scaling factor on")
    e = sub.add_parser("export", help="a bundle with the U-Net of a run checkpoint (EMA by default)")
    e.add_argument("base", help="the bundle the U-Net run started from")
    e.add_argument("run", help="run checkpoint (.pt) or run folder")
    e.add_argument("out")
    e.add_argument("--raw", action="store_true", help="the raw weights instead of the EMA")
    e.add_argument("--target", action="store_true", help="an lcd run: its target network as the U-Net")
    e.add_argument("--preset", help="few-step preset the file names for its users (e.g. lcm)")
    e.add_argument("--dtype", choices=DTYPE_NAMES, default="fp16")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.action == "assemble":
        bundle = assemble_bundle(args.base, vae=args.vae, text=args.text, data_dir=args.data, images=args.images)
        save_bundle(bundle, args.out)
    else:
        bundle, _ = bundle_from_run(args.base, args.run, ema=not args.raw, target=args.target, preset=args.preset)
        dtype = dtype_from_name(args.dtype)
        save_bundle(bundle, args.out, dtype=None if dtype == torch.float32 else dtype)
    logger.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
