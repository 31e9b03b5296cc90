"""The server's parts wired together (one per app): store, registry, model host, queue, and the job
submission both APIs share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from sdlab.api import shipped_model_path
from sdlab.pipeline.control import ControlInput
from sdlab.pipeline.image_prompt import layer_settings
from sdlab.pipeline.infotext import drawn_hires_prompt, hires_tag_refs, tag_loras
from sdlab.pipeline.prompt_loras import forget_read_loras, lora_file_problem, without_extra_networks
from sdlab.pipeline.prompt_syntax import strip_comments
from sdlab.pipeline.request import GenerationRequest, RequestError, fixed_seed
from sdlab.pipeline.styles import StyleDatabase, WatchedStyles
from sdlab.pipeline.upscale import A1111_REALESRGAN_STEMS
from sdlab.server import job_deletion
from sdlab.server.config import ServerConfig
from sdlab.server.inputs import (
    BadRequest, JobSpec, RefinerChoice, check_request, hires_upscaler_name, upscaler_file, with_preset, without_paths,
)
from sdlab.server.jobs import IN_TURN, Job, JobQueue, Place
from sdlab.server.model_shapes import planned_bundle, planned_unet
from sdlab.server.model_folders import CONTROLNET_SUFFIXES, UPSCALER_SUFFIXES, ModelFolder, control_file_kind
from sdlab.server.registry import Checkpoint, Lora, ModelRegistry
from sdlab.server.store import Store
from sdlab.server.worker import ModelHost, Runner

IMAGES_FOLDER = "images"


class Service:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        startup = config.model or shipped_model_path()
        if startup is None:
            raise FileNotFoundError("this sdlab install has no built-in model; pass --model FILE")
        self.watched_styles = WatchedStyles(config.styles_files,     # StylesError: before the store opens
                                            config.styles_candidates)
        self.store = Store(config.output_dir)
        self.registry = ModelRegistry(Path(startup), config.models_dir, config.vae_dir)
        self.controlnets = ModelFolder(config.controlnet_dir, CONTROLNET_SUFFIXES, hashed=True,
                                       kind_of=control_file_kind)
        self.upscalers = ModelFolder(config.upscalers_dir, UPSCALER_SUFFIXES, hashed=False,
                                     known_in=config.realesrgan_dir, known=A1111_REALESRGAN_STEMS)
        self.host = ModelHost(self.registry, config.device, config.embeddings_dir)
        self.images_dir = config.output_dir / IMAGES_FOLDER
        job_deletion.recover_deletions(self.store, self.images_dir)     # one stopped midway: all or nothing
        self.runner = Runner(self.host, self.images_dir, config.limits, self.upscalers, self.controlnets)
        self.queue = JobQueue(self.store, self.runner.run, config.max_queue, on_start=self.runner.warm,
                              on_idle=forget_read_loras)    # the tags' files, read when their jobs were submitted
        self.options: dict[str, Any] = {}           # A1111 options clients set that sdlab does not use
        self.script_runs: list[Any] = []            # A1111 selectable scripts drawing now (`a1111.ScriptRun`)
        self.script_jobs: dict[str, Any] = {}       # native jobs of a script, queued or running (`script_jobs`)

    @property
    def styles(self) -> StyleDatabase:
        """The prompt styles of `--styles-file` as the files now are (read again after an edit, `WatchedStyles`)."""
        return self.watched_styles.current()

    def start(self) -> None:
        self.queue.start()

    def stop(self) -> None:
        self.queue.stop()
        self.store.close()

    def _lora(self, name: str) -> Lora:
        """The LoRA a request names; `BadRequest` (404) for one not in the server's list."""
        lora = self.registry.lora(name)
        if lora is None:
            known = ", ".join(lora.name for lora in self.registry.loras) or "none"
            raise BadRequest(f"unknown LoRA {name!r}; this server has: {known}", 404, "LoRA not found")
        return lora

    def checkpoint(self, name: str | None, what: str = "model") -> Checkpoint:
        """The checkpoint a request names (None: the selected one); `BadRequest` (404) for an unknown one,
        calling it `what`."""
        if name is None or name == "":
            return self.host.selected
        if not isinstance(name, str):
            raise BadRequest(f"{what} must be a name, got {name!r}", 422)
        found = self.registry.find(name)
        if found is None:
            titles = ", ".join(c.title for c in self.registry.checkpoints)
            raise BadRequest(f"unknown {what} {name!r}; this server has: {titles}", 404, "Model not found")
        return found

    def refiner(self, choice: RefinerChoice | None, checkpoint: Checkpoint,
                request: GenerationRequest) -> RefinerChoice | None:
        """The refiner a job names, by the title of its checkpoint (a 404 for one not in the list); None for none
        or for the job's own model (A1111's `apply_refiner` does not switch to the model already drawing). The
        hires fix does not run with a refiner (a 400)."""
        if choice is None:
            return None
        found = self.checkpoint(choice.name, "refiner")
        if found == checkpoint:
            return None
        if request.hires:
            raise BadRequest("the hires fix does not run with an SDXL refiner; leave one of them out")
        found.calculate_hash()
        return replace(choice, name=found.title)

    def submit(self, spec: JobSpec, mode: str, model: str | None, place: Place = IN_TURN,
               on_queued: Callable[[Job], None] | None = None) -> tuple[Job, int]:
        """Check and queue a generation at its `place` in the queue (`jobs.Place`: its turn, unless ComfyUI's
        `front` / `number` ask for another): the seed fixed, the LoRAs looked up: `loras` entries, merged when the
        model loads, and the prompt's tags, which the pipeline merges for the run at both weights as
        `sdlab txt2img` does (a tag of a `loras` entry's LoRA left out, as with `--lora`), read and named for
        the parameters now (`infotext.tag_loras`). A refused job's files read are let go once nothing is
        queued or running (`JobQueue.release_if_idle`). `on_queued`: `JobQueue.submit`'s."""
        try:
            return self.queue.submit(*self._checked(spec, mode, model), place=place, on_queued=on_queued)
        except Exception:
            self.queue.release_if_idle()
            raise

    def check(self, spec: JobSpec, mode: str, model: str | None) -> None:
        """`submit`'s checks alone, queueing nothing (a script's requests, all checked before any is drawn)."""
        try:
            self._checked(spec, mode, model)
        except Exception:
            self.queue.release_if_idle()
            raise

    def _checked(self, spec: JobSpec, mode: str, model: str | None) -> tuple[JobSpec, str, str, dict[str, Any]]:
        """The job `submit` queues: its spec, mode, model title and settings (`_checked_job`). A refusal names the
        ControlNet folder's files by their titles (`ModelFolder.without_paths`), as the units' own checks do: an
        IP-Adapter for another U-Net, say, that the request checks find by its path."""
        try:
            return self._checked_job(spec, mode, model)
        except BadRequest as err:
            raise BadRequest(self.controlnets.without_paths(err.message), err.status,
                             self.controlnets.without_paths(err.detail), err.refused) from None

    def _checked_job(self, spec: JobSpec, mode: str, model: str | None) -> tuple[JobSpec, str, str, dict[str, Any]]:
        checkpoint = self.checkpoint(model)
        checkpoint.calculate_hash()                 # the job's title and its pictures' parameters carry it
        request = spec.request
        refiner = self.refiner(spec.refiner, checkpoint, request)
        if not isinstance(request.prompt, str):
            raise BadRequest("prompt must be text", 422)
        for choice in spec.loras:                   # a file that is no LoRA sdlab merges: refused now, not at load
            lora = self._lora(choice.name)
            problem = lora_file_problem(lora.path)  # the tags' check (`resolve_prompt_loras`), kept per version
            if problem is not None:
                raise BadRequest(without_paths(f"LoRA {choice.name!r}: {problem}", [(lora.path, lora.name)]))
        hashes: dict[Path, str] = {}

        def tag_lora(name: str) -> Path:
            lora = self._lora(name)
            hashes[lora.path] = lora.read_hash()
            return lora.path

        try:
            merged = {c.name: c.weight for c in spec.loras}
            if spec.extra_networks:
                drawn, to_record, tags = tag_loras(request.prompt, merged, tag_lora, hashes.get)
                request = replace(request, hr_prompt=drawn_hires_prompt(request.hr_prompt, merged))
                hires_tags, hr_to_record = hires_tag_refs(request, tag_lora, hashes.get), ""
            else:                                       # A1111's disable_extra_networks
                request, to_record, hr_to_record = _without_extra_networks(request)
                drawn, tags, hires_tags = request.prompt, [], []
        except (ValueError, RequestError) as err:       # a bad tag, a file that is not a LoRA
            names = [(lora.path, lora.name) for lora in self.registry.loras]
            raise BadRequest(without_paths(str(err), names)) from None
        preset = self.host.loaded_preset(checkpoint) if not spec.loras and not tags else None
        if preset and spec.model_preset_fills:     # known now: a queued job shows the settings it will run with
            try:
                request = with_preset(request, preset, mode, spec.model_preset_fills)
            except RequestError as err:
                raise BadRequest(f"the model names the preset {preset!r}: {err}", 422) from None
            spec = replace(spec, model_preset_fills=frozenset())
        loaded = self.host.loaded_bundle(checkpoint)
        request = check_request(replace(request, prompt=drawn, seed=fixed_seed(request.seed)), self.config.limits,
                                model=loaded, upscaler=upscaler_file(hires_upscaler_name(request), self.upscalers),
                                batch_count=spec.batch_count, unet=None if loaded is not None or not (
                                    request.deep_cache or request.ip_adapters or request.controls)
                                else planned_unet(checkpoint.path),
                                memory=not self.host.busy.locked(), let_go=self.host.refiner_let_go(
                                    None if refiner is None else self.checkpoint(refiner.name, "refiner").path),
                                refiner=refiner, planned=None if loaded is not None or (
                                    request.clip_skip == 1 and not (request.prompt_2 or request.negative_prompt_2))
                                else planned_bundle(checkpoint.path))
        spec = replace(spec, request=request, refiner=refiner, prompt_to_record=to_record, tag_loras=tuple(tags),
                       hires_tag_loras=tuple(hires_tags), hr_prompt_to_record=hr_to_record)
        settings = {"mode": mode, "model": checkpoint.title,
                    "loras": [{"name": c.name, "weight": c.weight} for c in spec.loras],
                    **spec.recorded(spec.shown(request).parameters())}
        if spec.batch_count > 1:
            settings["batch_count"] = spec.batch_count
        if not spec.extra_networks:             # the prompts keep their tags: a redraw takes them out again
            settings["disable_extra_networks"] = True
        if spec.script_job is not None:
            settings["script_job"] = spec.script_job
        if spec.vae is not None or not spec.sidecar_vae:
            settings["vae"] = spec.vae or "None"
        if refiner is not None:
            settings.update(refiner=refiner.name, refiner_switch=refiner.switch_at,
                            refiner_convention=refiner.convention)
        settings.update(recorded_controls(request))
        return spec, mode, checkpoint.title, settings


def recorded_controls(request: GenerationRequest) -> dict[str, Any]:
    """The `controls` and `ip_adapters` of `request` as a job's settings record them (those it has): every setting
    but the pictures (and an IP-Adapter FaceID's face embedding), each model by its file name."""
    recorded: dict[str, Any] = {}
    if request.controls:
        recorded["controls"] = [_control_settings(c, request.control_convention) for c in request.controls]
    if request.ip_adapters:                     # as the controls: the model by its file name, the picture left out
        recorded["ip_adapters"] = [{"model": Path(prompt.model_path).name, "scale": prompt.scale,
                                    **({"start": prompt.start, "end": prompt.end} if prompt.windowed else {}),
                                    **layer_settings(prompt.layer_scales),
                                    **({"module": prompt.module} if prompt.module else {}),
                                    **({"resize_mode": prompt.resize_mode} if prompt.resize_mode else {}),
                                    **({} if prompt.face_shortcut is None else {"face_shortcut": prompt.face_shortcut})}
                                   for prompt in request.ip_adapters]
    return recorded


def _without_extra_networks(request: GenerationRequest) -> tuple[GenerationRequest, str, str]:
    """A1111's `disable_extra_networks` of `request`: (the request with its prompt and hires prompt drawn without
    their comments and extra-network tags, none looked up or applied, the prompt and the hires prompt to record:
    without their comments, tags kept). A hires prompt of tags alone draws as an empty one (" "), not as the
    prompt; one that is the prompt character for character records none, as A1111's `init` writes `Hires prompt`
    only where `tuple(hr_prompt) != tuple(prompt)` (so a hires prompt spaced otherwise is recorded, though it
    draws as the prompt)."""
    prompt, hr_prompt = strip_comments(request.prompt), strip_comments(request.hr_prompt or "")
    drawn_hr = (without_extra_networks(hr_prompt) or " ") if hr_prompt else ""
    recorded_hr = "" if hr_prompt == prompt else hr_prompt
    return replace(request, prompt=without_extra_networks(prompt), hr_prompt=drawn_hr), prompt, recorded_hr


def _control_settings(control: ControlInput, convention: str) -> dict[str, Any]:
    """A control as the job's request records it: every setting but its pictures (image, mask), the model by its
    file name and its own resize mode (`convention`'s default when unset; on the init picture the request's fits
    it, `init_resize_mode`, as its infotext line: `recorded_resize_mode_under`); thresholds left unset stay
    null."""
    settings = {field.name: getattr(control, field.name) for field in fields(control)
                if field.name not in ("image", "mask", "init_resize_mode")}
    return {**settings, "model": Path(control.model_path).name,
            "resize_mode": control.recorded_resize_mode_under(convention)}
