"""Load a checkpoint (original single file or diffusers folder) into a `ModelBundle`.

Two stages:
  1. `plan_checkpoint(path, ...)` reads only names, shapes and metadata: it detects the family, splits the
     keys into components by prefix, infers every config (or takes the one stored by sdlab's saver in the
     safetensors metadata, `sdlab.config`), checks every key and shape against `meta`-device modules, and
     resolves the prediction type. Leftover keys are either known junk (listed in the plan's report) or an
     error naming them by component. `sdlab inspect` stops here. Opening the file is `single_file.py`'s job
     (`diffusers_folder.py`'s for a folder), the metadata sdlab writes is `file_format.py`'s.
     The plan and its report are the types of `plan.py`.
  2. `load_bundle(path, ...)` materializes the plan: each tensor is read once, cast to the target dtype and
     device and assigned into modules built on `meta`.

Prediction type (ambiguous where a family's releases differ and the weights do not say, as SD2's 768-v
models predict v and its base models eps: `FamilySpec.prediction_is_ambiguous`): the `prediction` argument,
then the file's metadata (`sdlab.prediction`, `modelspec.prediction_type`, ComfyUI's `modelspec.predict_key`), then a sidecar `<name>.yaml`, the
model config A1111 takes for the file (a CompVis config's `parameterization`, eps when it has none; an SGM
config's `VScaling`), then a `v_pred` marker key, then, for SD2 single
files, ComfyUI's reading of the weights (`SD20.model_type`: v when the last output block's first
transformer `norm1.bias` has a standard deviation above 0.09; released 768-v files do, 512 base files do not),
then the family default (eps), logged at INFO.

Training schedule (`ModelBundle.schedule`; None: the family's): a diffusers folder's
`scheduler_config.json` (betas, `rescale_betas_zero_snr`; `diffusers_scheduler`), the metadata sdlab's saver
writes (`sdlab.schedule`), or ComfyUI's `ztsnr` marker key (beside `v_pred`): zero terminal SNR with the last
alphas_cumprod at 4.897e-08, as ComfyUI and A1111 sample such files.

`steps_offset` (`ModelBundle.steps_offset`, what diffusers' leading spacing adds to the timesteps): a diffusers
folder's as its pipeline runs it (`spacing_offset`), a saved file's `sdlab.steps_offset`; else 1.

Continuous EDM noise model (`ModelBundle.noise_model`; None: discrete on the schedule above) and per-channel
latent statistics (`ModelBundle.latent_stats`): a folder's EDM scheduler / `vae/config.json`, a single file's
sdlab metadata or ComfyUI's `edm_mean` / `edm_std` / `edm_vpred.*` keys (`noise_model`; `edm_vpred.sigma_max`
also makes the prediction v, read just before `v_pred`). A `vae` override's own `scaling_factor` and, on the
families whose diffusers pipelines apply them (SDXL's, `noise_model.vae_stats_apply`), its `latents_mean` /
`latents_std` (its config, or sdlab metadata) replace the model's, as diffusers takes them from the VAE it
runs; what it does not declare stays the model's, as in ComfyUI.

VAE: the `vae` argument (a standalone VAE file or folder), else a single file's A1111 sidecar
`<name>.vae.ckpt` / `.vae.pt` / `.vae.safetensors` beside it (`sidecar.vae_beside`), which A1111 draws the model
with under its default `sd_vae` "Automatic" (not with `sidecar_vae` False, A1111's "None"), else the checkpoint's
own; a standalone one is named in the report (`LoadReport.vae_file`, which pictures record as A1111's `VAE` /
`VAE hash`).

Default picture size (`ModelBundle.native_size`): the metadata's `modelspec.resolution`, a diffusers folder's
`unet/config.json` `sample_size` x the VAE factor; else the family's.

Empty negative prompt (`ModelBundle.zero_empty_negative`; None: the family's, A1111's zeroing for SDXL): a
diffusers folder's `model_index.json` `force_zeros_for_empty_prompt` (false in the released SDXL refiner's).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sdlab.checkpoints import diffusers_folder
from sdlab.checkpoints.components import ComponentSource, meta_view
from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.file_format import (
    COMFY_EDM_VPRED_MAX_KEY,
    COMFY_V_PRED_KEY,
    COMFY_ZTSNR_KEY,
    META_COMFY_PREDICTION,
    META_MODELSPEC_PREDICTION,
    META_PREDICTION,
    META_SCHEDULE,
    named_preset,
    native_size,
    stored_schedule,
    stored_steps_offset,
)
from sdlab.checkpoints.plan import CheckpointPlan, ComponentReport, LoadReport
from sdlab.checkpoints.sidecar import model_params, sidecar_of, vae_beside
from sdlab.checkpoints.runnable import check_plan, check_weights
from sdlab.checkpoints.noise_model import file_latent_stats, file_noise_model, file_scaling_factor
from sdlab.checkpoints.single_file import declared_by_vae, load_vae_source, read_single_file
from sdlab.diffusion.denoiser import Prediction
from sdlab.diffusion.schedules import A1111_ZERO_SNR_TERMINAL_ALPHAS_CUMPROD
from sdlab.families import EDMSpec, FamilySpec, ScheduleSpec, TextEncoderSpec
from sdlab.families.latent_format import LatentStats
from sdlab.families.loaded import ModelBundle, TextEncoder
from sdlab.models.tokenizer import default_tokenizer
from sdlab.models.unet import UNetConfig
from sdlab.utils.dtypes import auto_dtype

logger = logging.getLogger(__name__)
SIDECAR_VAE_SOURCE = "beside the model (A1111's sd_vae Automatic)"   # `LoadReport.vae_file_source` of one


# ----------------------------------------------------------------------------------------------------------
# Prediction type


def resolve_prediction(
    family: FamilySpec,
    *,
    argument: str | Prediction | None,
    metadata: Mapping[str, str],
    path: Path | None,
    keys: Mapping[str, Any] | None = None,
    diffusers_value: str | None = None,
    unet_state: Mapping[str, Tensor] | None = None,
) -> tuple[Prediction, str]:
    """(prediction, where it came from), in the order given in the module docstring; `unet_state` is the
    single file's U-Net (file layout, read lazily)."""
    def parse(value: str, where: str) -> Prediction:
        try:
            return Prediction.parse(value)
        except ValueError as exc:
            raise CheckpointError(f"{where}: {exc}") from None

    if argument is not None:
        return parse(argument, "prediction argument"), "argument"
    if diffusers_value is not None:
        return parse(diffusers_value, "scheduler_config.json"), "scheduler/scheduler_config.json prediction_type"
    for key in (META_PREDICTION, META_MODELSPEC_PREDICTION, META_COMFY_PREDICTION):
        if key in metadata:
            return parse(metadata[key], f"metadata {key}"), f"metadata {key}"
    sidecar = sidecar_of(path) if path is not None else None
    read = _sidecar_prediction(sidecar) if sidecar is not None else None
    if read is not None:
        value, how = read
        return parse(value, str(sidecar)), f"sidecar {sidecar.name} ({how})"
    if keys is not None and COMFY_EDM_VPRED_MAX_KEY in keys:
        return Prediction.V, f"{COMFY_EDM_VPRED_MAX_KEY} key (EDM v-prediction)"
    if keys is not None and COMFY_V_PRED_KEY in keys:
        return Prediction.V, "v_pred marker key"
    if family.prediction_is_ambiguous:
        read = None if unet_state is None else _prediction_from_weights(unet_state)
        if read is not None:
            return read
        logger.info(
            "%s: %s checkpoint with no prediction type in its metadata or a sidecar .yaml; assuming %s "
            "(%d-px %s models need prediction='v')",
            path.name if path else "checkpoint", family.name, family.prediction.value, family.default_size_v,
            family.name,
        )
    else:
        logger.info("prediction type: %s (default of %s)", family.prediction.value, family.name)
    return family.prediction, f"default of {family.name}"


# the last output block's first transformer LayerNorm bias, in the original and in diffusers' U-Net layout
_V_TELLING_BIAS = ("output_blocks.11.1.transformer_blocks.0.norm1.bias",
                   "up_blocks.3.attentions.2.transformer_blocks.0.norm1.bias")
_V_BIAS_STD = 0.09


def _prediction_from_weights(unet_state: Mapping[str, Tensor]) -> tuple[Prediction, str] | None:
    """ComfyUI's rule for SD2 (`supported_models.SD20.model_type`): v-prediction when the standard deviation
    (biased) of that bias is above 0.09, else eps; None when the U-Net has no such layer (not SD2's layout)."""
    for key in _V_TELLING_BIAS:
        if key in unet_state:
            std = float(unet_state[key].float().std(unbiased=False))
            prediction = Prediction.V if std > _V_BIAS_STD else Prediction.EPS
            return prediction, f"weights ({key} std {std:.3f} {'>' if std > _V_BIAS_STD else '<='} {_V_BIAS_STD})"
    return None


def resolve_schedule(
    family: FamilySpec, prediction: Prediction, *, metadata: Mapping[str, str], keys: Mapping[str, Any]
) -> tuple[ScheduleSpec | None, str | None]:
    """(the single file's own training schedule or None for the family's, where it came from): sdlab's
    `sdlab.schedule` metadata, then ComfyUI's `ztsnr` marker key (ComfyUI `supported_models.SDXL.model_type`:
    `v_pred` and `ztsnr` make a v-prediction model on the zero-terminal-SNR schedule, whose last
    alphas_cumprod ComfyUI and A1111 set to 4.8973451890853435e-08). sdlab reads the marker on every family,
    as it reads `v_pred`."""
    stored = stored_schedule(metadata)
    if stored is not None:
        return (None if stored == family.schedule else stored), f"metadata {META_SCHEDULE}"
    if COMFY_ZTSNR_KEY not in keys:
        return None, None
    if prediction is not Prediction.V:
        logger.warning("the file carries the zero-terminal-SNR marker (ztsnr) but is drawn as %s-prediction: "
                       "a zero-SNR schedule needs v-prediction (prediction='v')", prediction.value)
    schedule = replace(family.schedule, zero_terminal_snr=True, terminal=A1111_ZERO_SNR_TERMINAL_ALPHAS_CUMPROD)
    logger.info("zero terminal SNR (ztsnr marker key): %s", schedule.describe())
    return schedule, "ztsnr marker key"


def warn_on_stored_schedule(path: Path, buffers: Mapping[str, Tensor], schedule: ScheduleSpec) -> None:
    """Warn when a single file's own DDPM buffers (`alphas_cumprod`, else `cumprod(1 - betas)`) are not the
    schedule it is drawn on beyond the rounding of fp16 (or of a coarser dtype they are stored in). sdlab
    keeps its schedule, as diffusers' `from_single_file` and ComfyUI do (they never read these buffers);
    A1111 1.10 samples SD 1.x / 2.x files on them (`load_state_dict(strict=False)` fills LDM's
    `alphas_cumprod` buffer, which its samplers read), so their pictures differ for such a file. A file
    holding SD's own schedule, in fp32 or rounded to fp16, draws the same everywhere and gets no warning."""
    stored = buffers.get("alphas_cumprod")
    if stored is None and "betas" in buffers:
        stored = torch.cumprod(1.0 - buffers["betas"].double(), 0).to(buffers["betas"].dtype)
    if stored is None:
        return
    expected = schedule.build().alphas_cumprod.double()
    name = "alphas_cumprod" if "alphas_cumprod" in buffers else "betas"
    if stored.shape != expected.shape:                  # not a schedule LDM's model could load (A1111 fails)
        logger.info("%s: its %s buffer holds %d values, not the %d timesteps of the schedule it is drawn on (%s)",
                    path.name, name, stored.numel(), expected.numel(), schedule.describe())
        return
    rtol = max(torch.finfo(torch.float16).eps, torch.finfo(stored.dtype).eps)
    error = (stored.double() - expected).abs() - rtol * expected
    if float(error.max()) > 1e-6:
        t = int(error.argmax())
        logger.warning("%s: the file stores its own training schedule (%s), which is not the one sdlab draws it on "
                       "(%s): alphas_cumprod[%d] is %.6g there, %.6g here%s. sdlab keeps its schedule, as diffusers "
                       "and ComfyUI do; A1111 samples SD 1.x / 2.x files on the stored one", path.name, name,
                       schedule.describe(), t, float(stored[t]), float(expected[t]),
                       " (its last is near 0: a zero-terminal-SNR schedule)" if float(stored[-1]) < 1e-4 else "")


def _sidecar_prediction(sidecar: Path) -> tuple[str, str] | None:
    """(prediction, how the config says it) of a model config `.yaml` beside a checkpoint, which A1111 takes as
    the file's config (`find_checkpoint_config`): a CompVis (LDM) config's `model.params.parameterization`,
    "eps" when it has none (LDM's default); an SGM config's denoiser scaling (v for `VScaling`, else eps, as
    A1111's `extend_sdxl` reads it). None for a `.yaml` without `model.params` (not a model config)."""
    params = model_params(sidecar)
    if not params:
        return None
    if "parameterization" in params:
        value = params["parameterization"]
        if not isinstance(value, str):
            raise CheckpointError(f"{sidecar}: model.params.parameterization must be a string, got {value!r}")
        return value, "parameterization"
    if "denoiser_config" in params:
        scaling = _nested(params, "denoiser_config", "params", "scaling_config", "target")
        name = str(scaling).rsplit(".", 1)[-1] if scaling is not None else "none"
        return ("v" if name == "VScaling" else "eps"), f"SGM scaling_config {name}"
    return "eps", "no parameterization: eps, the CompVis default"


def _nested(config: Mapping[str, Any], *names: str) -> Any:
    """config[names[0]][names[1]]..., None where a level is missing or not a mapping."""
    for name in names:
        if not isinstance(config, Mapping):
            return None
        config = config.get(name)
    return config


# ----------------------------------------------------------------------------------------------------------
# Plans


def _plan_single_file(
    path: Path, family: str | None, prediction: str | Prediction | None, vae: str | os.PathLike[str] | None,
    need_vae: bool = True,
) -> CheckpointPlan:
    file = read_single_file(path, family=family, vae=vae, need_vae=need_vae)
    spec = file.family
    pred, pred_source = resolve_prediction(spec, argument=prediction, metadata=file.metadata, path=path,
                                           keys=file.shapes, unet_state=file.unet.state)
    schedule, schedule_source = resolve_schedule(spec, pred, metadata=file.metadata, keys=file.shapes)
    noise_model, noise_source = file_noise_model(file.metadata, file.markers)
    if noise_model is None:
        warn_on_stored_schedule(path, file.schedule_buffers, schedule or spec.schedule)
    scaling = file_scaling_factor(file.metadata, file.markers, spec.latent_scaling_factor)
    scaling, stats = _vae_latents(vae, spec, scaling,
                                  file_latent_stats(file.metadata, file.markers, spec.latent_format.channels))
    return _finish_plan(str(path), spec, file.family_source, pred, pred_source, scaling, file.unet, file.vae,
                        list(file.text_encoders), file.ignored, file.total_keys, file.metadata,
                        native=native_size(file.metadata), schedule=schedule, schedule_source=schedule_source,
                        steps_offset=stored_steps_offset(file.metadata), noise_model=noise_model,
                        noise_model_source=noise_source, latent_stats=stats, missing_vae=file.missing_vae)


def _vae_latents(vae: str | os.PathLike[str] | None, spec: FamilySpec, scaling: float,
                 stats: LatentStats | None) -> tuple[float, LatentStats | None]:
    """The model's latent scaling and statistics, replaced by what a `vae` override declares about its own
    (`declared_by_vae`), as diffusers' pipelines take them from the VAE they run; each replacement is logged."""
    if vae is None:
        return scaling, stats
    declared = declared_by_vae(vae, spec)
    if declared.get("scaling_factor", scaling) != scaling:
        logger.info("%s: the VAE's own scaling_factor %g replaces the model's %g", vae, declared["scaling_factor"],
                    scaling)
    if declared.get("latent_stats", stats) != stats:
        logger.info("%s: the VAE's own latent statistics (%s) replace the model's (%s)", vae,
                    declared["latent_stats"].describe() if declared["latent_stats"] else "none",
                    stats.describe() if stats else "none")
    return declared.get("scaling_factor", scaling), declared.get("latent_stats", stats)


def _finish_plan(origin: str, spec: FamilySpec, family_source: str, pred: Prediction, pred_source: str,
                 scaling: float, unet: ComponentSource, vae: ComponentSource | None,
                 text: list[tuple[TextEncoderSpec, ComponentSource]], ignored: tuple[str, ...], total: int,
                 metadata: Mapping[str, str], *, native: int | None = None, schedule: ScheduleSpec | None = None,
                 schedule_source: str | None = None, sampler: Mapping[str, Any] | None = None, steps_offset: int = 1,
                 zero_empty_negative: bool | None = None, noise_model: EDMSpec | None = None,
                 noise_model_source: str | None = None, latent_stats: LatentStats | None = None,
                 missing_vae: str | None = None) -> CheckpointPlan:
    if unet.config.cross_attends and unet.config.context_dim != sum(src.config.width for _, src in text):
        raise CheckpointError(
            f"{origin}: U-Net cross-attention width {unet.config.context_dim} does not match the text encoder "
            f"width(s) {[src.config.width for _, src in text]} of {spec.name}"
        )
    if noise_model is not None:
        logger.info("%s: %s-prediction on a %s (%s)", origin, pred.value, noise_model.describe(), noise_model_source)
    reports = []
    for source in [unet, *([] if vae is None else [vae]), *(src for _, src in text)]:
        converted, count = source.check()
        stored_dtypes = {k: v.dtype for k, v in meta_view(source.state).items()}
        reports.append(ComponentReport(
            name=source.name, origin=source.origin, config=source.config, num_keys=len(converted),
            num_parameters=count, dtypes=tuple(sorted({str(d).removeprefix("torch.") for d in stored_dtypes.values()})),
            ignored=source.ignored,
        ))
    report = LoadReport(
        source=origin, family=spec, family_source=family_source, prediction=pred, prediction_source=pred_source,
        scaling_factor=scaling, components=tuple(reports), ignored=ignored, total_keys=total, metadata=dict(metadata),
        native_size=native, schedule=schedule, schedule_source=schedule_source if schedule is not None else None,
        sampler=dict(sampler or {}), steps_offset=steps_offset, zero_empty_negative=zero_empty_negative,
        noise_model=noise_model,
        noise_model_source=noise_model_source if noise_model is not None else None, latent_stats=latent_stats,
        missing_vae=missing_vae,
    )
    return CheckpointPlan(report=report, unet=unet, vae=vae, text_encoders=tuple(text))


def _plan_diffusers_folder(
    path: Path, family: str | None, prediction: str | Prediction | None, vae: str | os.PathLike[str] | None,
    need_vae: bool = True,
) -> CheckpointPlan:
    override = load_vae_source(vae) if vae is not None else None
    folder = diffusers_folder.read_diffusers_folder(path, family=family, vae_override=override, need_vae=need_vae)
    spec = folder.family
    pred, pred_source = resolve_prediction(
        spec, argument=prediction, metadata={}, path=None, diffusers_value=folder.prediction_type
    )
    scaling = folder.scaling_factor if folder.scaling_factor is not None else spec.latent_scaling_factor
    vae_source = override if override is not None else folder.vae
    scaling, stats = _vae_latents(vae, spec, scaling, folder.latent_stats)
    return _finish_plan(str(path), spec, folder.family_source, pred, pred_source, scaling, folder.unet, vae_source,
                        list(folder.text_encoders), folder.ignored, folder.total_keys, {},
                        native=folder.native_size, schedule=folder.schedule,
                        schedule_source="scheduler/scheduler_config.json", sampler=folder.sampler,
                        steps_offset=folder.steps_offset,
                        zero_empty_negative=folder.zero_empty_negative, noise_model=folder.noise_model,
                        noise_model_source="scheduler/scheduler_config.json", latent_stats=stats,
                        missing_vae="no vae/ folder" if vae_source is None else None)


# ----------------------------------------------------------------------------------------------------------
# Entry points


def plan_checkpoint(
    path: str | os.PathLike[str],
    *,
    family: str | None = None,
    prediction: str | Prediction | None = None,
    vae: str | os.PathLike[str] | None = None,
    sidecar_vae: bool = True,
    need_vae: bool = True,
) -> CheckpointPlan:
    """Detect, infer and check everything about `path` without reading a weight (see module docstring);
    `sidecar_vae` False keeps a single file's own VAE where a `<name>.vae.*` file lies beside it (A1111's
    `sd_vae` "None"). A model without a VAE (and no `vae`) is refused, or with `need_vae` False planned without
    one (the plan's `vae` None, its report's `missing_vae` saying why): it can be described, not built."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    vae_source = "argument"
    if vae is None and sidecar_vae and (vae := vae_beside(path)) is not None:
        vae_source = SIDECAR_VAE_SOURCE
        logger.info("%s: drawing with the VAE beside it, %s (as A1111's sd_vae Automatic)", path.name, vae.name)
    try:
        if path.is_dir():
            plan = check_plan(_plan_diffusers_folder(path, family, prediction, vae, need_vae))
        else:
            plan = check_plan(_plan_single_file(path, family, prediction, vae, need_vae))
    except CheckpointError as exc:
        if vae_source == SIDECAR_VAE_SOURCE and str(exc).startswith(str(vae)):
            raise _sidecar_vae_error(path, Path(vae), exc) from None
        if str(exc).startswith(str(path)) or (vae is not None and str(exc).startswith(str(vae))):
            raise
        raise CheckpointError(f"{path}: {exc}") from None
    if vae is None:
        return plan
    return replace(plan, report=replace(plan.report, vae_file=str(vae), vae_file_source=vae_source))


def _sidecar_vae_error(path: Path, vae: Path, exc: CheckpointError) -> CheckpointError:
    """The error of the sidecar VAE `vae` said of the model `path` it was picked for, the VAE by its name (the
    server shows the model by its title), with the ways around it."""
    reason = str(exc).removeprefix(f"{vae}: ").replace(str(vae), vae.name)
    return CheckpointError(
        f"{path}: its sidecar VAE {vae.name} (A1111's sd_vae Automatic draws the model with it) cannot be used: "
        f"{reason}; --no-sidecar-vae (sidecar_vae=False, a server's sd_vae \"None\") draws with the checkpoint's "
        f"own VAE, --vae FILE with another")


def load_bundle(
    path: str | os.PathLike[str],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    family: str | None = None,
    prediction: str | Prediction | None = None,
    vae: str | os.PathLike[str] | None = None,
    sidecar_vae: bool = True,
    vae_dtype: Callable[[LoadReport], torch.dtype | None] | None = None,
) -> ModelBundle:
    """Load an SD1 / SD2 / SDXL checkpoint (single file or diffusers folder) as a `ModelBundle`.

    Every floating tensor is converted to `dtype` on `device` as it is read (an fp16 file loaded as bf16
    never holds an fp32 copy); None picks it for the model's size and the device (`auto_dtype`: bf16 for a
    large U-Net on a CPU with native bf16, fp32 for a small one). `family` overrides detection, `prediction`
    ("eps", "v", ...) overrides the file, `vae` replaces the checkpoint's VAE with a standalone one (by default
    the `<name>.vae.*` file beside a single file, if any: module docstring; `sidecar_vae` False keeps the file's
    own). `vae_dtype` picks the VAE's own dtype from the planned checkpoint's report (which VAE, which family);
    None from it, or no `vae_dtype`, reads the VAE in `dtype` too.
    """
    plan = plan_checkpoint(path, family=family, prediction=prediction, vae=vae, sidecar_vae=sidecar_vae)
    return materialize(plan, device=device, dtype=plan_dtype(plan, device) if dtype is None else dtype,
                       vae_dtype=None if vae_dtype is None else vae_dtype(plan.report))


def plan_dtype(plan: CheckpointPlan, device: torch.device | str) -> torch.dtype:
    """The dtype `auto` picks for a planned checkpoint on `device`, from its U-Net's parameter count."""
    unet = next(c for c in plan.report.components if c.name == "unet")
    return auto_dtype(device, unet.num_parameters)


def materialize(plan: CheckpointPlan, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                vae_dtype: torch.dtype | None = None) -> ModelBundle:
    """Read the weights of a checked plan into modules (built on `meta`, assigned in place), each in `dtype`, the VAE
    in `vae_dtype` where given."""
    report = plan.report
    unet = plan.unet.materialize(dtype, device)
    vae = plan.vae.materialize(vae_dtype or dtype, device)
    encoders = tuple(
        TextEncoder(spec=spec, config=src.config, model=src.materialize(dtype, device),
                    tokenizer=default_tokenizer(spec.pad_token_id))
        for spec, src in plan.text_encoders
    )
    logger.info("loaded %s as %s (%s, %s)", report.source, report.family.name, report.prediction.value, dtype)
    return check_weights(_bundle(plan, unet, vae, encoders))


def meta_bundle(plan: CheckpointPlan) -> ModelBundle:
    """The `ModelBundle` `materialize` makes of a checked plan, its networks built on the `meta` device: no weight
    read, the configs, layer shapes and facts a request or a LoRA is checked against (all but memory)."""
    encoders = tuple(TextEncoder(spec=spec, config=src.config, model=src.build_meta(),
                                 tokenizer=default_tokenizer(spec.pad_token_id)) for spec, src in plan.text_encoders)
    return _bundle(plan, plan.unet.build_meta(), plan.vae.build_meta(), encoders)


def _bundle(plan: CheckpointPlan, unet: torch.nn.Module, vae: torch.nn.Module,
            encoders: tuple[TextEncoder, ...]) -> ModelBundle:
    """The `ModelBundle` of a plan with these networks."""
    report = plan.report
    return ModelBundle(
        family=report.family, unet=unet, vae=vae, text_encoders=encoders, prediction=report.prediction,
        scaling_factor=report.scaling_factor, unet_config=plan.unet.config, vae_config=plan.vae.config,
        source=report.source, report=report, native_size=report.native_size,
        preset=named_preset(report.metadata) or _own_preset(plan.unet.config), schedule=report.schedule,
        zero_empty_negative=report.zero_empty_negative, noise_model=report.noise_model,
        steps_offset=report.steps_offset,
        latent_stats=report.latent_stats,
    )


def with_vae(bundle: ModelBundle, vae: str | os.PathLike[str] | None = None, *,
             sidecar_vae: bool = True) -> ModelBundle:
    """`bundle` (loaded from its file by `load_bundle`) with the VAE that `load_bundle(bundle.source, vae=vae,
    sidecar_vae=sidecar_vae)`, given the `family` / `prediction` overrides it was loaded with (`_overrides`), gives
    it: planned as that plans it, its tensors alone read, in the bundle's dtype and on its device; its config, the
    latent scaling and statistics it declares and the report follow. The U-Net and text encoders (LoRAs merged,
    embeddings installed) stay."""
    plan = plan_checkpoint(bundle.source, vae=vae, sidecar_vae=sidecar_vae, **_overrides(bundle.report))
    report = plan.report
    logger.info("%s: VAE %s", report.source, Path(report.vae_file).name if report.vae_file else "its own")
    return check_weights(replace(
        bundle, vae=plan.vae.materialize(bundle.dtype, bundle.device), vae_config=plan.vae.config,
        scaling_factor=report.scaling_factor, latent_stats=report.latent_stats, report=report), only="vae")


def _overrides(report: LoadReport) -> dict[str, Any]:
    """The `family` / `prediction` arguments a checkpoint was planned with, as its report records them (source
    "argument"); None for each it detected."""
    return {"family": report.family.name if report.family_source == "argument" else None,
            "prediction": report.prediction if report.prediction_source == "argument" else None}


def _own_preset(unet: UNetConfig) -> str | None:
    """The preset a model's structure asks for when its file names none: "lcm-model" (LCM sampler, 4 steps,
    CFG 8.5 embedded as w = 7.5) for an LCM-distilled U-Net, which takes its guidance as an input."""
    return "lcm-model" if unet.time_cond_proj_dim is not None else None


__all__ = [
    "CheckpointPlan",
    "ComponentReport",
    "LoadReport",
    "load_bundle",
    "load_vae_source",
    "materialize",
    "meta_bundle",
    "plan_checkpoint",
    "plan_dtype",
    "resolve_prediction",
    "resolve_schedule",
    "warn_on_stored_schedule",
    "with_vae",
]
