"""Checks that a checkpoint which loads can also run, made at load time, each naming what is wrong.

A file can have every key and shape right and still draw nothing: integer or boolean weights, a token
embedding with fewer rows than the tokenizer has tokens, a latent scaling factor that is zero or NaN, or NaN /
infinite weights (each turns every image black). `check_plan` looks at what `plan_checkpoint` learned (no
weight read, so `sdlab inspect` refuses these files too); `check_weights` looks at the loaded tensors once,
after they are cast to the dtype they run in (a float32 weight beyond float16's range becomes infinite there).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from sdlab.checkpoints.components import (CastingView, ComponentSource, key_problems, meta_device_without_init,
                                          meta_view)
from sdlab.checkpoints.errors import CheckpointError
from sdlab.models.clip import CLIPTextConfig
from sdlab.models.tokenizer import CONTEXT_LENGTH, VOCAB_SIZE

if TYPE_CHECKING:
    from sdlab.checkpoints.load import CheckpointPlan
    from sdlab.families.loaded import ModelBundle

SCALING_RANGE = (1e-3, 1e3)    # released VAEs: 0.13025 (SDXL) .. 1.5305 (SD3); outside this is a broken file


def check_scaling_factor(value: object, origin: str) -> float:
    """The VAE latent scaling factor as a float; refuses NaN, infinities, zero, negatives and absurd sizes."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise CheckpointError(f"{origin}: latent scaling factor {value!r} is not a number") from None
    low, high = SCALING_RANGE
    if not (math.isfinite(number) and low <= number <= high):
        raise CheckpointError(f"{origin}: latent scaling factor {value!r} is unusable "
                              f"(it must be a finite number between {low:g} and {high:g}; SD1/SD2 use 0.18215)")
    return number


def check_dtypes(source: ComponentSource) -> None:
    """Refuse integer / boolean (or complex) tensors where the network holds floating-point weights."""
    converted = source.convert(meta_view(source.state))            # sdlab names, file dtypes, no data read
    odd = {k: t.dtype for k, t in converted.items() if not t.is_floating_point()}
    if not odd:
        return
    expected = source.build_meta().state_dict()                    # only built when something looks wrong
    wrong = sorted(k for k in odd if k in expected and expected[k].is_floating_point())
    if wrong:
        shown = ", ".join(f"{k} ({str(odd[k]).removeprefix('torch.')})" for k in wrong[:5])
        more = f" and {len(wrong) - 5} more" if len(wrong) > 5 else ""
        raise CheckpointError(f"{source.origin}: {source.name}: weights must be floating point, "
                              f"found {len(wrong)} that are not: {shown}{more}")


def check_text_config(source: ComponentSource) -> None:
    """A text encoder must embed every token id the CLIP tokenizer produces, at every one of its positions."""
    cfg = source.config
    if not isinstance(cfg, CLIPTextConfig):
        return
    if cfg.vocab_size < VOCAB_SIZE:
        raise CheckpointError(f"{source.origin}: {source.name}: token embedding has {cfg.vocab_size} rows; "
                              f"the CLIP tokenizer needs {VOCAB_SIZE}")
    if cfg.max_positions < CONTEXT_LENGTH:
        raise CheckpointError(f"{source.origin}: {source.name}: position embedding has {cfg.max_positions} rows; "
                              f"prompts need {CONTEXT_LENGTH}")


def check_plan(plan: CheckpointPlan) -> CheckpointPlan:
    """Refuse a planned checkpoint that could not run (see module docstring); returns `plan`."""
    check_scaling_factor(plan.report.scaling_factor, plan.report.source)
    for source in (plan.unet, *(() if plan.vae is None else (plan.vae,)), *(src for _, src in plan.text_encoders)):
        check_dtypes(source)
        check_text_config(source)
    return plan


def nonfinite_tensors(module: nn.Module) -> list[str]:
    """Names of the floating-point tensors of `module` holding a NaN or an infinity.

    One read per tensor and nothing allocated its size: `aminmax` propagates NaN, and an infinity is the
    minimum or the maximum. The flags are gathered on the tensors' device and read back once.
    """
    named = [(n, t) for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_floating_point() and t.numel()]
    if not named:
        return []
    with torch.no_grad():
        flags = [_finite(t) for _, t in named]
        flags = torch.stack([f.to(flags[0].device) for f in flags]).tolist()
    return [name for (name, _), ok in zip(named, flags) if not ok]


def check_builds(build: Callable[[], nn.Module], shapes: Mapping[str, torch.Size], path: object, what: str,
                 shown: Callable[[str], str] = str) -> None:
    """Raise a one-line `CheckpointError` ("{path}: not {what} sdlab can build: ...") where a file's tensor
    `shapes` are not the state of the module `build()` makes (made on the meta device: no memory)."""
    with meta_device_without_init():
        expected = {k: v.shape for k, v in build().state_dict().items()}
    problems = key_problems(expected, shapes, shown=shown)
    if problems:
        raise CheckpointError(f"{path}: not {what} sdlab can build: " + "; ".join(problems))


def load_checked(build: Callable[[], nn.Module], tensors: Mapping[str, torch.Tensor], dtype: torch.dtype,
                 device: torch.device | str, path: object, what: str) -> nn.Module:
    """The module `build()` makes, its tensors taken from `tensors` as `dtype` on `device` (no second copy),
    in eval mode; a one-line `CheckpointError` where any of them holds a NaN or an infinity (`what`: the
    kind named in it, e.g. "IP-Adapter")."""
    with meta_device_without_init():
        model = build()
    model.load_state_dict(CastingView(tensors, dtype, device), strict=True, assign=True)
    model.eval()
    bad = nonfinite_tensors(model)
    if bad:
        raise CheckpointError(f"{path}: {len(bad)} {what} tensors hold NaN or infinite values ({', '.join(bad[:3])})")
    return model


def _finite(t: torch.Tensor) -> torch.Tensor:
    """A 0-d bool tensor: every value of `t` is finite."""
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        t = t.permute(0, 2, 3, 1)                                     # memory order: reads as one flat run
    try:
        lo, hi = torch.aminmax(t.reshape(-1) if t.is_contiguous() else t)
    except (RuntimeError, NotImplementedError):                      # dtypes without the kernel (float8)
        return torch.isfinite(t.float()).all()
    return torch.isfinite(torch.stack([lo, hi])).all()


def check_weights(bundle: ModelBundle, only: str | None = None) -> ModelBundle:
    """Refuse a loaded bundle with NaN or infinite weights, naming the component and tensors; returns it.
    `only` ("vae", ...) looks at that component alone (one just read into a bundle already checked)."""
    parts = [("unet", bundle.unet), ("vae", bundle.vae), *((te.spec.name, te.model) for te in bundle.text_encoders)]
    for name, module in parts:
        if only is not None and name != only:
            continue
        bad = nonfinite_tensors(module)
        if bad:
            first = dict(module.named_parameters()) | dict(module.named_buffers())
            t = first[bad[0]]
            nans, infs = int(t.isnan().sum()), int(t.isinf().sum())
            listed = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise CheckpointError(
                f"{bundle.source or 'checkpoint'}: {name}: {len(bad)} tensors hold NaN or infinite values "
                f"({listed}; {bad[0]}: {nans} NaN, {infs} infinite, as {str(t.dtype).removeprefix('torch.')}); "
                "the file is damaged or was saved from a diverged training run"
            )
    return bundle
