"""The Python API: `sdlab.load(path) -> Pipeline`, then `txt2img`, `img2img`, `inpaint`.

    import sdlab
    pipe = sdlab.load("v1-5-pruned-emaonly.safetensors")            # or a diffusers folder;
                                                                   # sdlab.load() loads the shipped model
    result = pipe.txt2img("a red apple on a table", steps=20, seed=1)   # at the model's native size
    result.images[0].save("apple.png")
    print(result.request)                                          # every setting actually used

Each call takes the fields of `GenerationRequest` as keyword arguments and returns a
`GenerationResult` (PIL images, their seeds and the resolved request). `Pipeline.resolve(request)` checks a
request and returns its `GenerationPlan` (resolved request, sampler, sigmas, sizes) without drawing;
`Pipeline.run` takes that plan (or a request, which it resolves once).

FreeU (`sdlab.api.FreeU`) is one such field: `pipe.txt2img("a house", freeu=FreeU(b1=1.3, b2=1.4, s1=0.9, s2=0.2))`;
DeepCache (`sdlab.api.DeepCache`) another: `pipe.txt2img("a house", deep_cache=DeepCache(interval=3, branch=0))`.
"""

from __future__ import annotations

import numbers
import os
from dataclasses import fields, replace
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import Any

import torch

from sdlab.checkpoints.embeddings import (Embedding, FoundEmbeddings, embeddings_used, find_embeddings,
                                          install_embeddings, install_fitting_embeddings)
from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.load import load_bundle, with_vae
from sdlab.checkpoints.lora import apply_lora, lora_preset
from sdlab.checkpoints.upscaler import Upscaler
from sdlab.families.loaded import ModelBundle
from sdlab.models.deep_cache import DeepCache as DeepCache  # re-exported: the `deep_cache` field's setting
from sdlab.models.freeu import FreeU as FreeU  # re-exported: the `freeu` field's setting
from sdlab.pipeline.generate import ProgressFn, SamplingStopped, generate, generate_with_refiner
from sdlab.pipeline.hires import generate_hires
from sdlab.pipeline.image_prompt import adapter_loras
from sdlab.pipeline.memory import is_out_of_memory
from sdlab.pipeline.plan import GenerationPlan, check_refiner_convention, make_plan
from sdlab.pipeline.presets import apply_preset
from sdlab.pipeline.prompt_loras import (
    LoraUse,
    default_lora_dirs,
    find_lora,
    lora_to_merge,
    patcher_for,
    request_loras,
    resolve_prompt_loras,
    split_prompt_loras,
)
from sdlab.pipeline.request import (
    DEFAULT_IMAGE_CFG_SCALE,
    GenerationRequest,
    GenerationResult,
    ImageLike,
    RequestError,
    check_refiner_switch,
    input_image,
)
from sdlab.utils.compile import compile_module
from sdlab.utils.dtypes import DTYPE_CHOICES, requested_dtype

_REQUEST_FIELDS = {f.name for f in fields(GenerationRequest)}


class Pipeline:
    """A loaded model and the three ways to draw with it."""

    def __init__(self, bundle: ModelBundle, refiner: ModelBundle | None = None, refiner_switch: float = 0.8,
                 embeddings: Sequence[Embedding] = (), skipped_embeddings: Sequence[Embedding] = (),
                 refiner_convention: str = "diffusers", lora_dirs: Sequence[str | os.PathLike[str]] = (),
                 find_lora: Callable[[str], Path | None] | None = None) -> None:
        """`refiner` (an SDXL refiner) takes over after the first `refiner_switch` of every schedule, at the
        step `refiner_convention` picks ("diffusers": diffusers' `denoising_end`; "a1111": A1111's
        `Refiner switch at`; "a1111_steps": A1111's switch by sampling steps; `plan.handoff_index`);
        `embeddings` are the textual-inversion embeddings installed in `bundle` (their words),
        `skipped_embeddings` those of its folders that were made for another model;
        `lora_dirs` are where prompt `<lora:NAME:W>` tags find NAME, unless `find_lora` (NAME -> its file, or
        None) looks them up instead (`find_lora`)."""
        check_refiner_switch(refiner_switch)
        self.bundle = bundle
        self.refiner = refiner
        self.refiner_switch = refiner_switch
        self.refiner_convention = check_refiner_convention(refiner_convention)
        self.lora_dirs = [Path(d) for d in lora_dirs]
        self._find_lora = find_lora
        self.embeddings = list(embeddings)
        self.skipped_embeddings = list(skipped_embeddings)

    def with_refiner(self, refiner: ModelBundle | None, refiner_switch: float = 0.8,
                     refiner_convention: str = "diffusers") -> Pipeline:
        """This pipeline's model (its embeddings, LoRA folders and lookup) with `refiner` taking over after
        `refiner_switch` by `refiner_convention` (`__init__`), or with no refiner (None)."""
        return Pipeline(self.bundle, refiner, refiner_switch, self.embeddings, self.skipped_embeddings,
                        refiner_convention, self.lora_dirs, self._find_lora)

    def with_embeddings(self, found: FoundEmbeddings) -> Pipeline:
        """This pipeline with `found.loaded` as its model's whole set of embeddings (the words of those installed
        before and not found are forgotten), its refiner's too."""
        refiner = None if self.refiner is None else install_fitting_embeddings(self.refiner, found.loaded,
                                                                               replace=True)
        return Pipeline(install_embeddings(self.bundle, found.loaded, replace=True), refiner, self.refiner_switch,
                        found.loaded, found.skipped, self.refiner_convention, self.lora_dirs, self._find_lora)

    def with_vae(self, vae: str | os.PathLike[str] | None = None, *, sidecar_vae: bool = True) -> Pipeline:
        """This pipeline with its model's VAE, and its refiner's, as `load(path, vae=vae, sidecar_vae=sidecar_vae,
        refiner=...)` loads them, only the VAE files read (`checkpoints.load.with_vae`); the `family` / `prediction`
        given to `load`, embeddings and LoRA lookup kept."""
        refiner = None if self.refiner is None else with_vae(self.refiner, vae, sidecar_vae=sidecar_vae)
        return Pipeline(with_vae(self.bundle, vae, sidecar_vae=sidecar_vae), refiner, self.refiner_switch,
                        self.embeddings, self.skipped_embeddings, self.refiner_convention, self.lora_dirs,
                        self._find_lora)

    def embeddings_used(self, request: GenerationRequest) -> list[Embedding]:
        """The installed embeddings whose words occur in the text encoded for the request: the prompt and the
        hires prompt without their `<lora:...>` tags (A1111 takes them out before encoding) and the negative
        prompts (whose tags stay text)."""
        hires = (request.hr_prompt, request.hr_negative_prompt) if request.hires else ("", "")
        prompts = [split_prompt_loras(text)[0] for text in (request.prompt, hires[0])]
        return embeddings_used(self.bundle, self.embeddings, *prompts, request.negative_prompt, hires[1])

    def find_lora(self, name: str) -> Path | None:
        """The file a `<lora:NAME:...>` tag names: the lookup the pipeline was made with (e.g. a server's own
        list of LoRAs), else NAME.safetensors (.pt, .ckpt) in `lora_dirs` or their subfolders, or the file whose
        kohya `ss_output_name` is NAME (`prompt_loras.find_lora`)."""
        if self._find_lora is not None:
            return self._find_lora(name)
        return find_lora(name, self.lora_dirs)

    def preset_for(self, prompt: str) -> str | None:
        """The few-step preset a request with `prompt` draws with when it asks for none: the model's (its file's,
        or a LoRA's merged at load: `load`), else the first one a LoRA of the prompt's tags names (an
        LCM-LoRA's "lcm"), so an adapter that names how it draws is drawn so whether it comes from `--lora`,
        a native `loras` entry or a `<lora:...>` tag. None where none names one; a bad tag is `resolve`'s to
        report."""
        if self.bundle.preset is not None:
            return self.bundle.preset
        if not isinstance(prompt, str):         # `resolve` refuses it
            return None
        try:
            _, tags = split_prompt_loras(prompt)
            paths = [self.find_lora(tag.name) for tag in tags]
            return next(filter(None, (lora_preset(path) for path in paths if path is not None)), None)
        except (ValueError, CheckpointError):
            return None

    def __repr__(self) -> str:
        return f"Pipeline({self.bundle.family.name}, {self.bundle.prediction.value}, {self.bundle.dtype})"

    def resolve(self, request: GenerationRequest) -> GenerationPlan:
        """Resolve `request` once for this pipeline: its `GenerationPlan` (`plan.request` is the request with
        this model's defaults filled in; sampler, sigmas, sizes) after every check (sizes, sampler, schedule,
        clip skip and memory of the model and the refiner, the prompt's LoRA tags found and read; input pictures
        given as file paths read: `init_image`, `mask_image`, each of `init_images`). A `RequestError` names the
        first bad value."""
        if self.refiner is not None and request.hires:
            raise RequestError("the hires fix does not run with an SDXL refiner; leave one of them out")
        request = _pictures_read(request)
        plan = make_plan(self.bundle, request, refiner=self.refiner, switch_at=self.refiner_switch,
                         refiner_convention=self.refiner_convention)
        resolve_prompt_loras(plan.request.prompt, self.find_lora)
        if plan.request.hr_prompt:
            resolve_prompt_loras(plan.request.hr_prompt, self.find_lora, "hires prompt")
        return plan

    def run(self, request: GenerationRequest | GenerationPlan, *, progress: ProgressFn | None = None,
            loras: Sequence[LoraUse] = (), upscaler: Upscaler | None = None,
            stop: Callable[[], None] | None = None,
            first_pass: Callable[[GenerationResult], None] | None = None) -> GenerationResult:
        """Draw a plan from `resolve` (or a request, resolved here once). `progress(StepInfo)` is called once per
        step; an exception it raises stops the run and propagates, a `SamplingStopped` with the pictures of that
        step's x0 estimate as its `result` (A1111's interrupt and skip: `pipeline.generate`). Running out of
        memory (past the estimate checked up front) is a `RequestError`. `upscaler`: the network of the hires
        upscaler file the request names, loaded by the caller (else read from the file here). `stop`: called where
        the hires fix checks for a stop between its passes (`generate_hires`); it raises `SamplingStopped` to stop.
        `first_pass`: called with a hires run's first-pass pictures once that pass ends (`generate_hires`).

        The prompt's `<lora:NAME:WEIGHT>` / `<lora:NAME:TE:UNET>` tags (A1111) are taken out of the encoded
        text, with every other extra-network tag (not applied, as A1111 skips a kind it does not know:
        `prompt_loras.split_prompt_loras`), and their files, with `loras`, merged into the model for this
        run only: the model's own tensors are back afterwards, and the same set next time reuses its merged
        tensors (`prompt_loras.LoraPatcher`). The result's request keeps the prompt as written.

        A pipeline may be shared by threads: runs on one loaded model take turns (each holds the model from
        its first step to its last), so every run draws with exactly its own LoRAs."""
        plan = request if isinstance(request, GenerationPlan) else self.resolve(request)
        bare, uses = request_loras(plan.request.prompt, plan.request.negative_prompt, self.find_lora)
        uses = [*uses, *adapter_loras(plan.request.ip_adapters)]          # a FaceID file's U-Net LoRA
        drawn = plan if bare == plan.request.prompt else replace(plan, request=replace(plan.request, prompt=bare))
        second = None                               # a hires prompt's own tags: its LoRAs in the second pass
        if plan.request.hr_prompt:
            hr_bare, hr_uses = request_loras(plan.request.hr_prompt, plan.request.hr_negative_prompt, self.find_lora)
            drawn = replace(drawn, request=replace(drawn.request, hr_prompt=hr_bare or " "))   # " ": "" encoded
            second = [*loras, *hr_uses, *adapter_loras(plan.request.ip_adapters)]
        try:
            with patcher_for(self.bundle).using([*loras, *uses]):
                result = self._draw(drawn, progress, upscaler, second, stop, first_pass)
        except SamplingStopped as stop:
            stop.result = _as_asked(stop.result, plan.request, drawn.request)
            raise
        return _as_asked(result, plan.request, drawn.request)

    def _draw(self, plan: GenerationPlan, progress: ProgressFn | None, upscaler: Upscaler | None,
              second: Sequence[LoraUse] | None = None, stop: Callable[[], None] | None = None,
              first_pass: Callable[[GenerationResult], None] | None = None) -> GenerationResult:
        """Draw `plan` with the weights now in the model (`second`: the LoRAs of a hires prompt's second pass);
        running out of memory is a `RequestError`."""
        try:
            if plan.request.hires:
                return generate_hires(self.bundle, plan, upscaler, progress=progress, second_loras=second, stop=stop,
                                      first_pass=first_pass)
            if self.refiner is not None:
                return generate_with_refiner(self.bundle, self.refiner, plan, progress=progress)
            return generate(self.bundle, plan, progress=progress)
        except (MemoryError, RuntimeError) as err:      # torch.OutOfMemoryError is a RuntimeError
            if not is_out_of_memory(err):
                raise
            req = plan.request
            raise RequestError(
                f"out of memory on {self.bundle.device.type} drawing {req.width}x{req.height} x {req.batch_size}; "
                "draw smaller or fewer images"
            ) from None

    def _call(self, prompt: str, options: dict[str, Any], progress: ProgressFn | None) -> GenerationResult:
        # few-step settings (pipeline/presets.py): the preset asked for, else the one the model file or a LoRA
        # names (`preset_for`; preset=None: none); the options given win
        preset = options.pop("preset") if "preset" in options else self.preset_for(prompt)
        if preset is not None:
            options = apply_preset(preset, options, "img2img" if "init_image" in options else "txt2img")
        unknown = sorted(set(options) - _REQUEST_FIELDS)
        if unknown:
            raise TypeError(f"unknown generation option(s) {', '.join(unknown)}; valid: {', '.join(sorted(_REQUEST_FIELDS))}")
        return self.run(GenerationRequest(prompt=prompt, **options), progress=progress)

    def txt2img(self, prompt: str, negative_prompt: str = "", *, progress: ProgressFn | None = None, **options: Any) -> GenerationResult:
        """Draw from text. Options: steps, sampler, schedule, cfg_scale, seed, width, height, batch_size, ...;
        the hires fix with hr_scale=2 (or hr_width / hr_height), hr_upscaler, hr_steps, hr_denoise; preset="turbo"
        (lcm, lightning, hyper, tcd: a few-step model's settings, under the options given; docs/few-step.md)."""
        return self._call(prompt, {"negative_prompt": negative_prompt, **options}, progress)

    def img2img(
        self,
        prompt: str,
        init_image: ImageLike,
        strength: float = 0.75,
        negative_prompt: str = "",
        *,
        image_cfg_scale: float | None = DEFAULT_IMAGE_CFG_SCALE,
        progress: ProgressFn | None = None,
        **options: Any,
    ) -> GenerationResult:
        """Redraw `init_image`; `strength` in (0, 1] is how much of the schedule runs (1 = from pure noise).
        An edit (InstructPix2Pix) model edits it by the prompt's instruction, `image_cfg_scale` its image guidance
        (diffusers' image_guidance_scale, default 1.5); under diffusers' img2img convention it draws from pure
        noise over all the steps, as diffusers' pipelines (`strength` unused). Other models do not read it."""
        return self._call(prompt, {"negative_prompt": negative_prompt, "init_image": init_image, "strength": strength,
                                   "image_cfg_scale": image_cfg_scale, **options}, progress)

    def inpaint(
        self,
        prompt: str,
        init_image: ImageLike,
        mask_image: ImageLike,
        negative_prompt: str = "",
        *,
        strength: float = 1.0,
        image_cfg_scale: float | None = DEFAULT_IMAGE_CFG_SCALE,
        progress: ProgressFn | None = None,
        **options: Any,
    ) -> GenerationResult:
        """Repaint the white area of `mask_image` (one of another size than `init_image` is resized with it, as
        diffusers and A1111 resize it); black is kept. An edit model reads `image_cfg_scale` as `img2img` does."""
        return self._call(
            prompt,
            {"negative_prompt": negative_prompt, "init_image": init_image, "mask_image": mask_image, "strength": strength,
             "image_cfg_scale": image_cfg_scale, **options},
            progress,
        )


def _as_asked(result: GenerationResult, asked: GenerationRequest, drawn: GenerationRequest) -> GenerationResult:
    """`result` with the fields `Pipeline.run` changed to draw (`drawn`: the prompts without their LoRA tags) back as
    `asked` wrote them; the rest of its request is as drawn (`generate.drawn_request`)."""
    kept = {f.name: getattr(asked, f.name) for f in fields(asked) if getattr(asked, f.name) is not getattr(drawn, f.name)}
    return replace(result, request=replace(result.request, **kept))


def _pictures_read(request: GenerationRequest) -> GenerationRequest:
    """`request` with the input pictures given as file paths read (`input_image`): `init_image`, `mask_image`
    and each of `init_images`; anything else stays for `resolve` to check."""
    def read(image: Any, what: str) -> Any:
        return input_image(image, what) if isinstance(image, (str, os.PathLike)) else image

    images = request.init_images
    return replace(request, init_image=read(request.init_image, "init image"), mask_image=read(request.mask_image, "mask"),
                   init_images=[read(image, "init image") for image in images] if isinstance(images, (list, tuple)) else images)


SHIPPED_MODEL = Path(__file__).parent / "models" / "data" / "sdlab-tiny.safetensors"


def shipped_model_path() -> Path | None:
    """The small model that ships inside the package, or None when this install has none."""
    return SHIPPED_MODEL if SHIPPED_MODEL.is_file() else None


def resolve_device(device: str | torch.device) -> torch.device:
    """`device` as a `torch.device` this torch can use, or a `RequestError` that says why not."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise RequestError(f"unknown device {str(device)!r}; use cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cpu":
        return parsed
    backend = getattr(torch, parsed.type, None) if parsed.type in ("cuda", "mps", "xpu") else None
    if backend is None:
        raise RequestError(f"device {str(device)!r} is not supported; use cpu, cuda, cuda:N or mps")
    if not backend.is_available():
        build = f"torch {torch.__version__}" + (" (a CPU-only build)" if parsed.type == "cuda" and torch.version.cuda is None else "")
        raise RequestError(f"device {str(device)!r} is not available with {build} on this machine; use cpu")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if parsed.index is not None and parsed.index >= count:
        raise RequestError(f"device {str(device)!r} does not exist: this machine has {count} {parsed.type} device(s)")
    return parsed


LOAD_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)   # the float dtypes a model runs in


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """`load`'s `dtype` as a torch dtype, or None to choose it per model: None or "auto", a name the CLI's
    --dtype takes ("fp32", "fp16", "bf16"), or one of `LOAD_DTYPES`; anything else is a `RequestError`."""
    if dtype is None or dtype in LOAD_DTYPES:
        return dtype
    if isinstance(dtype, str) and dtype in DTYPE_CHOICES:
        return requested_dtype(dtype)
    names = ", ".join(str(d) for d in LOAD_DTYPES)
    raise RequestError(f"dtype must be one of {', '.join(DTYPE_CHOICES)} or a torch dtype ({names}), got {dtype!r}")


def load(
    path: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    vae: str | os.PathLike[str] | None = None,
    *,
    sidecar_vae: bool = True,
    family: str | None = None,
    prediction: str | None = None,
    refiner: str | os.PathLike[str] | None = None,
    refiner_switch: float = 0.8,
    refiner_convention: str = "diffusers",
    loras: Sequence[str | os.PathLike[str] | tuple[str | os.PathLike[str], float]] = (),
    lora_dirs: Sequence[str | os.PathLike[str]] | None = None,
    find_lora: Callable[[str], Path | None] | None = None,
    embeddings: Sequence[str | os.PathLike[str]] = (),
    compile: bool = False,
) -> Pipeline:
    """Load a checkpoint (`.safetensors`, `.ckpt`, or a diffusers folder) into a `Pipeline`; without `path`,
    the model that ships with sdlab (sdlab-tiny, 64 px).

    `dtype` None or "auto" (the default) picks it for the model and the device: bf16 for SD1.5 / SD2 /
    SDXL-size U-Nets on a CPU with native bf16 or on CUDA (faster, with the pixel difference measured in
    docs/performance.md), fp32 for small models such as the shipped one (`sdlab.utils.dtypes.auto_dtype`);
    else "fp32", "fp16", "bf16" (the CLI's names) or a torch dtype of `LOAD_DTYPES` (`resolve_dtype`).
    `vae` replaces the checkpoint's VAE with a standalone VAE file (by default, a single file's A1111 sidecar
    `<name>.vae.*` beside it; `sidecar_vae=False` keeps the file's own, as A1111's `sd_vae` "None"), the
    refiner's too (A1111 resolves `sd_vae` for it as well, so `vae` decodes refined pictures); `family` and `prediction`
    override detection (e.g. `prediction="v"` for SD 2.x 768 models whose file does not say).
    `refiner` (an SDXL refiner checkpoint) finishes the last `1 - refiner_switch` of each schedule, from the
    step `refiner_convention` picks: "diffusers" (`denoising_end`), "a1111" (A1111's `Refiner switch at`) or
    "a1111_steps" (A1111's switch by sampling steps).
    `loras` are LoRA / LyCORIS files merged into the base model's weights, in order, for good, each a
    (file, weight) pair or a file alone (weight 1); `lora_dirs` are where prompt tags (`<lora:NAME:WEIGHT>`, merged per run) find their files,
    searched before the model's own (A1111's `models/Lora` / ComfyUI's `models/loras` beside the model's folder, when
    they exist; the shipped model's adapters), as the CLI's `--lora-dir` adds to them, or
    `find_lora` finds them instead: NAME -> its file, or None (a server's list, the CLI's search).
    `embeddings` are textual-inversion files or folders of them (a folder's files made for another model
    are skipped: `Pipeline.skipped_embeddings`); their names are then words of prompts (`Pipeline.embeddings`
    lists them).
    `compile=True` compiles the U-Net(s) with `torch.compile` on the first draw of each size, with a compile
    cache on disk that later processes reuse (`sdlab.utils.compile`).
    """
    device = resolve_device(device)
    dtype = resolve_dtype(dtype)
    if path is None:
        path = shipped_model_path()
        if path is None:
            raise FileNotFoundError("this sdlab install has no built-in model; pass the path of a checkpoint")
    lora_files = [(lora_path, lora_to_merge(lora_path), weight) for lora_path, weight in _lora_entries(loras)]  # bad ones first
    bundle = load_bundle(Path(path), device=device, dtype=dtype, family=family, prediction=prediction, vae=vae,
                         sidecar_vae=sidecar_vae)
    for lora_path, lora, weight in lora_files:
        apply_lora(bundle, lora_path, weight, lora=lora)
    if bundle.preset is None:  # an adapter that names how it draws (an LCM-LoRA: "lcm") sets the model's preset
        bundle = replace(bundle, preset=next(filter(None, (lora_preset(p) for p, _, _ in lora_files)), None))
    found = find_embeddings(embeddings, bundle)
    bundle = install_embeddings(bundle, found.loaded)
    refined = None if refiner is None else load_refiner(refiner, bundle, found.loaded, sidecar_vae, vae)
    for loaded in (bundle, refined) if compile else ():
        if loaded is not None:
            compile_module(loaded.unet)
    return Pipeline(bundle, refined, refiner_switch, found.loaded, found.skipped, refiner_convention,
                    [*(lora_dirs or ()), *default_lora_dirs(path)], find_lora)


def _lora_entries(loras: Any) -> list[tuple[str | os.PathLike[str], float]]:
    """`load`'s `loras` as (file, weight) pairs: a file alone (or `loras` a single file) at weight 1, as diffusers'
    `load_lora_weights` merges one; anything else is a `RequestError`."""
    if isinstance(loras, (str, os.PathLike)):
        loras = [loras]
    entries = []
    for entry in loras:
        if isinstance(entry, (str, os.PathLike)):
            entry = (entry, 1.0)
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], (str, os.PathLike))
                and isinstance(entry[1], numbers.Real) and not isinstance(entry[1], bool)):
            raise RequestError(f"loras takes LoRA files or (file, weight) pairs, got {entry!r}")
        entries.append((entry[0], float(entry[1])))
    return entries


def load_refiner(path: str | os.PathLike[str], base: ModelBundle, embeddings: Sequence[Embedding] = (),
                 sidecar_vae: bool = True, vae: str | os.PathLike[str] | None = None) -> ModelBundle:
    """An SDXL refiner checkpoint loaded to go with `base`: on its device, in its dtype, with those of the
    base's textual-inversion `embeddings` that have vectors for the refiner's text encoder; its VAE (`vae`, else
    its sidecar) as `load_bundle` takes it."""
    refiner = load_bundle(Path(path), device=base.device, dtype=base.dtype, vae=vae, sidecar_vae=sidecar_vae)
    return install_fitting_embeddings(refiner, embeddings)
