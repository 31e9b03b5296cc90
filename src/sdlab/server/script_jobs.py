"""A native job that runs one of A1111's selectable scripts: `POST /api/jobs` with `script_name` + `script_args`.

The script runs through the A1111 route's runner (`a1111_scripts`, `a1111._script_host`) on the A1111 request the
job's fields make (`a1111_body`), and each request it makes draws the job itself with what the script changed in it
(`ScriptJob.job_of`), as the job without a script would draw with those changes: each of its requests is a job of
the queue (its history row tagged `script_job`, which `GET /api/jobs` leaves out),
and the job itself (`ScriptJob`) follows them: queued until the first starts, its steps counted over all of them,
cancel / interrupt / skip passed to the one drawing (a cancel or interrupt also stops the script, as A1111's
Interrupt does), and its pictures the script's answer (its grid first where it makes one), written as a job's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

from PIL import Image

from sdlab.pipeline.control import on_init
from sdlab.pipeline.png_info import save_png_atomic
from sdlab.pipeline.request import DEFAULT_HR_DENOISE, MASKED_CONTENT, RESIZE_MODES, GenerationRequest, check_freeu
from sdlab.pipeline.styles import PROMPT_FIELDS
from sdlab.server.a1111_scripts import (
    RUNNABLE_SCRIPTS, SelectableScript, alwayson_args, axis_types, script_args, sdlab_field,
)
from sdlab.server.controls import takes_init
from sdlab.server.inputs import BadRequest, JobSpec, refiner_choice, sampler_and_schedule, spec_with_preset
from sdlab.server.jobs import Job, QueueFull, Unavailable
from sdlab.server.service import Service, recorded_controls
from sdlab.server.store import INTERRUPTED_ERROR, StoreError
from sdlab.server.vae_files import AUTOMATIC_VAE

if TYPE_CHECKING:
    from sdlab.server.a1111 import ScriptRun

logger = logging.getLogger("sdlab.server")

REQUEST_FIELDS = {      # the job's field -> A1111's request field
    "prompt": "prompt", "negative_prompt": "negative_prompt", "seed": "seed", "steps": "steps",
    "sampler": "sampler_name", "schedule": "scheduler", "cfg_scale": "cfg_scale", "width": "width",
    "height": "height", "batch_size": "batch_size", "batch_count": "n_iter", "eta": "eta", "tiling": "tiling",
    "subseed": "subseed", "subseed_strength": "subseed_strength", "seed_resize_from_w": "seed_resize_from_w",
    "seed_resize_from_h": "seed_resize_from_h", "s_churn": "s_churn", "s_tmin": "s_tmin", "s_tmax": "s_tmax",
    "s_noise": "s_noise", "s_min_uncond": "s_min_uncond", "refiner": "refiner_checkpoint",
    "refiner_switch": "refiner_switch_at", "styles": "styles",
}
HIRES_FIELDS = {        # ... with the hires fix (txt2img)
    "hr_scale": "hr_scale", "hr_width": "hr_resize_x", "hr_height": "hr_resize_y", "hr_upscaler": "hr_upscaler",
    "hr_steps": "hr_second_pass_steps", "hr_sampler": "hr_sampler_name", "hr_schedule": "hr_scheduler",
    "hr_prompt": "hr_prompt", "hr_negative_prompt": "hr_negative_prompt", "hr_denoise": "denoising_strength",
}
OPTION_FIELDS = {       # the job's field -> the A1111 option that sets it (`override_settings`)
    "clip_skip": "CLIP_stop_at_last_layers", "rng": "randn_source", "sdxl_clip_l_skip": "sdxl_clip_l_skip",
    "emphasis": "emphasis", "old_prompt_editing": "use_old_scheduling",
    "downcast_alphas_cumprod": "use_downcasted_alpha_bar", "schedule_sigma_min": "sigma_min",
    "schedule_sigma_max": "sigma_max", "schedule_rho": "rho", "discard_penultimate_sigma":
    "always_discard_next_to_last_sigma", "old_karras_sigmas": "use_old_karras_scheduler_sigmas",
    "beta_alpha": "beta_dist_alpha", "beta_beta": "beta_dist_beta",
    "sgm_noise_multiplier": "sgm_noise_multiplier", "extra_noise": "img2img_extra_noise",
    "inpainting_mask_weight": "inpainting_mask_weight", "s_min_uncond_all": "s_min_uncond_all",
    "skip_early_cond": "skip_early_cond", "pad_cond_uncond": "pad_cond_uncond",
    "pad_cond_uncond_v0": "pad_cond_uncond_v0", "unipc_variant": "uni_pc_variant", "unipc_order": "uni_pc_order",
    "unipc_lower_order_final": "uni_pc_lower_order_final",
}
AS_SENT = frozenset({"img2img_convention", "clip_skip_convention", "control_convention", "size_convention"})
"""The request's drawing conventions: a cell draws under the job's, whatever A1111's request of it says."""
SET_BY = {      # an A1111 request field a script sets -> the request fields it sets, even to A1111's fill of them
    "sampler_name": ("sampler",), "sampler_index": ("sampler",), "hr_sampler_name": ("hr_sampler",),
}
OWN_VALUES = ("s_churn", "s_tmin", "s_tmax", "s_noise")
"""Fields a cell sets as the script set them: A1111 gives a sampler only those it takes (`a1111._sigma_options`)."""
DERIVED = frozenset({"schedule", "hr_schedule", "hr_eta"})
"""Fields A1111's rules derive from others (a timestep sampler's own schedule, a hires sampler's "Automatic" one and
its eta): a cell takes them only where the script named them (`_named_schedules`), the job's own rules deriving them
from the fields the script changed."""
MASK_FIELDS = ("mask_blur", "mask_blur_y", "invert_mask", "mask_round", "inpaint_fill", "inpaint_only_masked",
               "inpaint_padding")
"""How a mask draws: a job without a mask does not use its own, a script's mask draws with the script's."""


def _choice_index(value: str, names: tuple[str, ...], field: str) -> int:
    if value not in names:
        raise BadRequest(f"{field} must be one of {', '.join(names)}, got {value!r}", 422)
    return names.index(value)


def _options(service: Service, body: Any) -> dict[str, Any]:
    """The job's drawing options as A1111's `override_settings`: A1111's defaults under every one the job sets
    (so the server's A1111 options do not change a native job's cells), its model and VAE."""
    from sdlab.server.a1111 import OPTION_DEFAULTS      # here: a1111 imports the native routes
    options = {**OPTION_DEFAULTS, **{option: getattr(body, name) for name, option in OPTION_FIELDS.items()}}
    options["sd_noise_schedule"] = "Zero Terminal SNR" if body.zero_terminal_snr else "Default"
    options["img2img_fix_steps"] = body.img2img_convention == "a1111_fix_steps"
    options["eta_noise_seed_delta"] = body.eta_noise_seed_delta or 0
    options["sd_model_checkpoint"] = service.checkpoint(body.model).title
    options["sd_vae"] = "Automatic" if body.vae in (None, *AUTOMATIC_VAE) else body.vae
    return options


def a1111_body(service: Service, body: Any) -> Any:
    """The A1111 request (`a1111.Txt2ImgIn` / `Img2ImgIn`) of the native job `body`, for its script to run on: the
    script changes it, and each of its requests draws the job with those changes (`ScriptJob.job_of`). The job's
    ControlNet units and IP-Adapters are not in it: no script changes them, so each request keeps the job's (as
    A1111 applies its always-on units to every picture a script draws), each unit with its own picture, its hint
    drawn at that request's size."""
    from sdlab.server import a1111      # here: a1111 imports the native routes, which import this module
    fields = {a1111_name: getattr(body, name) for name, a1111_name in REQUEST_FIELDS.items()
              if getattr(body, name) is not None}
    if body.mode == "txt2img" and (body.hr_scale is not None or body.hr_width or body.hr_height):
        fields.update({a1111_name: getattr(body, name) for name, a1111_name in HIRES_FIELDS.items()
                       if getattr(body, name) is not None}, enable_hr=True)
        fields["denoising_strength"] = DEFAULT_HR_DENOISE if body.hr_denoise is None else body.hr_denoise
    fields.update(override_settings=_options(service, body), script_name=body.script_name,
                  script_args=body.script_args, alwayson_scripts=_alwayson(body))
    if body.mode == "txt2img":
        return a1111.Txt2ImgIn(**fields)
    if body.init_image is None:
        raise BadRequest(f"{body.mode} needs init_image (a base64 PNG or data URL)", 422)
    fields.update(init_images=[body.init_image], resize_mode=_choice_index(body.resize_mode, RESIZE_MODES,
                                                                           "resize_mode"),
                  denoising_strength=body.strength if body.strength is not None else
                  (1.0 if body.mode == "inpaint" else 0.75), initial_noise_multiplier=1.0)  # the job's: no field
    if body.mode == "inpaint":
        if body.mask_image is None:
            raise BadRequest("inpaint needs mask_image (white = repaint)", 422)
        if body.inpaint_fill == "grey" or body.mask_grow:    # A1111's request, which its scripts draw, has neither
            raise BadRequest("inpaint_fill 'grey' and mask_grow are ComfyUI's VAEEncodeForInpaint options; a job "
                             f"with a script ({body.script_name}) draws A1111's request, which has neither", 422)
        fields.update(mask=body.mask_image, mask_blur=body.mask_blur, inpainting_mask_invert=int(body.invert_mask),
                      mask_round=body.mask_round, inpaint_full_res=body.inpaint_only_masked,
                      inpaint_full_res_padding=body.inpaint_padding,
                      inpainting_fill=_choice_index(body.inpaint_fill, MASKED_CONTENT, "inpaint_fill"))
    return a1111.Img2ImgIn(**fields)


def _alwayson(body: Any) -> dict[str, Any]:
    """The job's FreeU and PAG scale as Forge's always-on scripts' args (`alwayson_args`), which the X/Y/Z plot's
    FreeU and PAG axes start from."""
    own = {"freeu": check_freeu(body.freeu.model_dump())} if body.freeu is not None else {}
    if body.pag_scale:
        own["pag_scale"] = body.pag_scale
    return alwayson_args({}, own)


def _differs(a: Any, b: Any) -> bool:
    return a is not b and a != b


def _named_schedules(body: Any) -> dict[str, str | None]:
    """The schedules the A1111 request `body` names, as the native job's fields take them: `schedule` its scheduler
    (unset, an old sampler name's: "DPM++ 2M Karras"), `hr_schedule` its hires scheduler (unset or "Use same
    scheduler" the first pass's: None; "Automatic" the hires sampler's own), neither through A1111's rules."""
    hires = getattr(body, "hr_scheduler", None)
    return {"schedule": sampler_and_schedule(body.sampler_name or body.sampler_index, body.scheduler)[1],
            "hr_schedule": None if hires in (None, "", "Use same scheduler")
            else sampler_and_schedule(None, hires)[1] or "automatic"}


def cell_request(job: GenerationRequest, base: tuple[Any, GenerationRequest],
                 cell: tuple[Any, GenerationRequest]) -> tuple[GenerationRequest, set[str]]:
    """The native job's request `job` with what a script changed: `base` is the job's A1111 request body and the
    request A1111's rules make of it, `cell` the script's request body and its request. A field the two
    requests differ in takes the cell's value (the conventions `AS_SENT` and the `DERIVED` fields excepted), and so
    do those `SET_BY` names where the script set them, the schedules the script named (`_named_schedules`),
    `OWN_VALUES` (the body's) and, where the script gives a job without a mask one, the `MASK_FIELDS`. Returns it
    and the fields changed."""
    (base_body, base_request), (body, request) = base, cell
    changed = {field.name: getattr(request, field.name) for field in dataclasses.fields(request)
               if field.name not in AS_SENT | DERIVED and field.name not in OWN_VALUES
               and _differs(getattr(request, field.name), getattr(base_request, field.name))}
    if job.mask_image is None and request.mask_image is not None:
        changed.update({name: getattr(request, name) for name in MASK_FIELDS})
    if changed.get("freeu") is not None and job.freeu is not None:     # Forge's args carry neither: the job's
        own = check_freeu(job.freeu)
        changed["freeu"] = {**changed["freeu"], "version": own.version, "convention": own.convention}
    for name, fields in SET_BY.items():
        if getattr(body, name) != getattr(base_body, name):
            changed.update({field: getattr(request, field) for field in fields})
    named, base_named = _named_schedules(body), _named_schedules(base_body)
    changed.update({field: value for field, value in named.items() if value != base_named[field]})
    changed.update({name: getattr(body, name) for name in OWN_VALUES
                    if getattr(body, name) != getattr(base_body, name)})
    return dataclasses.replace(job, **changed), set(changed)


def on_own_init(request: GenerationRequest, sent: Any) -> GenerationRequest:
    """`request` (one the script draws) with each ControlNet unit and IP-Adapter the job `sent` without a picture
    (its `controls`, `ip_adapters`) drawn on this request's own init picture by the pipeline's rule
    (`control.on_init`): a Loopback pass's picture, an SD upscale tile, an outpainting canvas, as A1111's scripts
    hand the extension each request's `init_images`."""
    if request.init_image is None:
        return request

    def own(units: tuple, items: list[Any]) -> tuple:
        return tuple(on_init(unit, request.init_image, request.resize_mode) if takes_init(item.model_dump()) else unit
                     for unit, item in zip(units, items))

    return dataclasses.replace(request, controls=own(request.controls, sent.controls),
                               ip_adapters=own(request.ip_adapters, sent.ip_adapters))


def recorded_settings(body: Any, spec: JobSpec, model: str) -> dict[str, Any]:
    """The job's settings as its history records them: the fields it was sent with (pictures left out; its
    ControlNet units and IP-Adapters as a plain job's record them, `recorded_controls` of its request `spec`), its
    mode, model and script."""
    sent = body.model_dump(include=body.model_fields_set - {"init_image", "mask_image", "controls", "ip_adapters"})
    return {**sent, **recorded_controls(spec.request), "mode": body.mode, "model": model,
            "script_name": body.script_name, "script_args": body.script_args}


class ScriptJob:
    """A job drawn by a selectable script: its `job` (never in the queue itself) follows the script's requests'
    jobs, as `JobQueue` runs a job."""

    def __init__(self, service: Service, job: Job, script: SelectableScript, sent: Any, spec: JobSpec) -> None:
        self.service, self.job, self.script, self.sent, self.spec = service, job, script, sent, spec
        self.body = a1111_body(service, sent)   # the A1111 request the script runs on
        self.base: tuple[JobSpec, str | None] | None = None    # the job and model A1111's rules make of `body`
        self.run: ScriptRun | None = None
        self.current: Job | None = None         # the request's job being drawn (or queued)
        self.requests: list[Job] = []           # the requests' jobs queued so far
        self.queued: asyncio.Future | None = None   # the first request's job queued: its queue position
        self.stopped = False                    # cancelled or interrupted: no later request is drawn
        self.steps_before = 0                   # the steps of the requests drawn before `current`
        self.names: list[str] = []
        self.texts: list[str] = []

    # -- what the native routes do to it

    def cancel(self) -> str:
        """A1111's Interrupt of the script: the request drawing stops (its batch's pictures dropped) and no later
        one is drawn; the job ends cancelled with what was drawn. Returns its status after, as `JobQueue.cancel`
        does, decided here rather than read from the job, which the script's task ends on the event loop while
        this runs: `cancelled` where no request had started (a job cancelled while queued ends so at once),
        `running` while a request draws (it stops before its next step), else the job's own."""
        self._stop()
        drawing = self.current is not None and self.service.queue.cancel(self.current) == "running"
        if drawing:
            return "running"
        if all(job.started is None for job in self.requests):
            return "cancelled"
        return self.job.status

    def interrupt(self) -> bool:
        """`cancel`, the request drawing ending with its pictures as far as they got (`JobQueue.interrupt`)."""
        if self.job.status != "running" or self.current is None:
            return False
        self._stop()
        return self.service.queue.interrupt(self.current)

    def skip(self) -> bool:
        """A1111's Skip: the batch being drawn ends so, the script goes on."""
        return self.job.status == "running" and self.current is not None and self.service.queue.skip(self.current)

    def _stop(self) -> None:
        self.stopped = True
        if self.run is not None:
            self.run.interrupted = True

    # -- the script's run

    def on_job(self, run: ScriptRun, job: Job) -> None:
        """A request's job (tagged as this job's, `job_of`) is queued: follow its events."""
        self.run, self.current = run, job
        self.requests.append(job)
        if self.queued is not None and not self.queued.done():
            self.job.settings = {**self.job.settings, "seed": job.settings.get("seed", self.job.settings.get("seed"))}
            self.queued.set_result(self.service.queue.position(job))
        if self.stopped:
            run.interrupted = True
            self.service.queue.cancel(job)
        asyncio.get_running_loop().create_task(self._follow(run, job))

    async def _follow(self, run: ScriptRun, job: Job) -> None:
        """The request's events as this job's: started (its first), steps counted over the script's requests."""
        events = job.subscribe(asyncio.get_running_loop())
        try:
            while True:
                name, data = await events.get()
                if name == "started" and self.job.status == "queued":
                    self.job.status, self.job.started = "running", time.time()
                    await asyncio.to_thread(self._save)
                    self.job.publish("started", self.job._started_data())
                elif name == "step":
                    left = len(run.job_counts) - run.drawn
                    self.job.step = self.steps_before + data["i"]
                    self.job.steps = self.steps_before + job.steps * left
                    self.job.preview = job.preview
                    self.job.publish("step", {"i": self.job.step, "n": self.job.steps})
                elif name in ("done", "failed", "cancelled"):
                    self.steps_before += job.step
                    return
        finally:
            job.unsubscribe(events)

    def job_of(self, body: Any, spec: JobSpec, model: str | None) -> tuple[JobSpec, str | None]:
        """The job of a script's request `body` (`spec` and `model` A1111's rules make of it): the native job
        (`self.spec`, its preset not yet applied) with what the script changed in the A1111 request
        (`cell_request`), then the job's preset over the fields left unset, the model, VAE, refiner and batch
        count it changed, so that it draws as the plain job with those changes; its styles and prompts as sent
        those of `body` (`JobSpec.recorded`), its row tagged as this job's (`GET /api/jobs` leaves it out)."""
        assert self.base is not None
        base, base_model = self.base
        request, changed = cell_request(self.spec.request, (self.body, base.request), (body, spec.request))
        request = on_own_init(request, self.sent)
        typed = {key: getattr(body, key) for key in PROMPT_FIELDS if hasattr(body, key)}
        job = dataclasses.replace(self.spec, request=request, model_preset_fills=self.spec.model_preset_fills - changed,
                                  styles=tuple(body.styles), typed_prompts=typed, script_job=self.job.id)
        if self.sent.preset:
            job = spec_with_preset(job, self.sent.preset, self.sent.mode)
        own = {name: getattr(spec, name) for name in ("batch_count", "sidecar_vae", "vae")
               if getattr(spec, name) != getattr(base, name)}
        if spec.refiner != base.refiner:        # under the job's refiner convention
            own["refiner"] = spec.refiner and refiner_choice(spec.refiner.name, spec.refiner.switch_at,
                                                             self.sent.refiner_convention, "refiner_switch")
        return dataclasses.replace(job, **own), self.sent.model if model == base_model else model

    def keep_picture(self, image: Image.Image, text: str | None) -> str:
        """A picture of the script's answer written as this job's (`host.encode`): its file name; none when it
        was cancelled before any request started (a job cancelled while queued draws nothing)."""
        if self.stopped and all(job.started is None for job in self.requests):
            return ""
        name = f"{self.job.id}-{len(self.names)}.png"
        save_png_atomic(image, self.service.images_dir / name, text)
        self.names.append(name)
        self.texts.append(text or "")
        return name

    async def draw(self, mode: str) -> None:
        """Run the script; the job ends done with its pictures, cancelled (with those drawn) after a cancel or an
        interrupt, failed with its error."""
        from sdlab.server import a1111      # here: a1111 imports the native routes, which import this module
        prepare = a1111._txt2img_request if mode == "txt2img" else a1111._img2img_request
        host = dataclasses.replace(a1111._script_host(self.service, prepare, self.on_job, self.job_of),
                                   encode=self.keep_picture, files=True)
        status, error = "done", None
        try:
            _, request = await prepare(self.service, self.body)
            self.base = a1111._job_spec(self.service, self.body, request)
            await self.script.run(host, self.body, mode)
            if self.stopped or (self.run is not None and self.run.interrupted):
                status = "cancelled"
        except (BadRequest, QueueFull, Unavailable) as err:
            if self.queued is not None and not self.queued.done():
                raise                           # refused before anything was queued: the submission's answer
            if isinstance(err, Unavailable):
                status, error = "interrupted", INTERRUPTED_ERROR
            else:
                status, error = ("cancelled", None) if self.stopped else ("failed", str(err))
        except Exception as err:                # reported in the job, the server keeps serving
            logger.exception("script job %s failed", self.job.id)
            status, error = "failed", f"internal error: {type(err).__name__}: {err}"
        await self._finish(status, error)

    async def _finish(self, status: str, error: str | None) -> None:
        job = self.job
        job.images, job.infotexts = list(self.names), list(self.texts)
        job.status, job.error, job.finished = status, error, time.time()
        job.preview = None
        saved = await asyncio.to_thread(self._save)
        name, data = job.final_event() or ("failed", {"error": status})
        job.publish(name, data)
        job.finished_event.set()
        if saved:
            self.service.script_jobs.pop(job.id, None)

    def _save(self) -> bool:
        try:
            self.service.store.save_job(self.job.record())
            return True
        except StoreError as err:
            logger.error("script job %s goes on without its history row: %s", self.job.id, err)
            return False


async def start(service: Service, body: Any, spec: JobSpec, script: SelectableScript) -> dict[str, Any]:
    """Start the script of the native job `body` (`spec` its request checked as a plain job's, its `preset` left to
    each request, `ScriptJob.job_of`); answered once its first request is queued: a refusal before that (a bad
    script argument, a cell the route refuses) is the submission's own error."""
    model = service.checkpoint(body.model).title
    mode = "txt2img" if body.mode == "txt2img" else "img2img"
    job = Job(id=uuid.uuid4().hex, mode=body.mode, model=model, spec=spec, created=time.time(),
              settings=recorded_settings(body, spec, model))
    running = ScriptJob(service, job, script, body, spec)
    running.queued = asyncio.get_running_loop().create_future()
    service.script_jobs[job.id] = running
    task = asyncio.create_task(running.draw(mode))
    try:
        await asyncio.wait([running.queued, task], return_when=asyncio.FIRST_COMPLETED)
        if not running.queued.done():
            task.result()                       # its refusal
            raise BadRequest("the script queued nothing to draw", 422)
    except BaseException:
        service.script_jobs.pop(job.id, None)
        raise
    await asyncio.to_thread(running._save)
    return {"id": job.id, "status": job.status, "position": running.queued.result()}


def live_job(service: Service, job_id: str) -> Job | None:
    """The job `job_id` while it is queued or running: the queue's, or a script's."""
    running = service.script_jobs.get(job_id)
    return running.job if running is not None else service.queue.get(job_id)


def axis_values(service: Service) -> dict[str, list[str]]:
    """The values each X/Y/Z axis with choices offers on this server, as A1111 1.10's `AxisOption.choices`
    (scripts/xyz_grid.py) list them for its dropdown and fill button: the samplers, the schedule types' labels, the
    checkpoints' titles (any case order), the hires upscalers (the latent modes, then the upscalers), the VAEs
    (Automatic, None, then the files), the styles of `--styles-file` as the files now are, the RNG sources and a
    yes / no option's two words."""
    from sdlab.server import a1111      # here: a1111 imports the native routes, which import this module
    samplers = [row["name"] for row in a1111.samplers()]
    titles = sorted((checkpoint.title for checkpoint in service.registry.checkpoints), key=str.casefold)
    booleans = ["False", "True"]        # A1111's `boolean_choice(reverse=True)`
    return {"Sampler": samplers, "Hires sampler": samplers, "Checkpoint name": titles,
            "Schedule type": [row["label"] for row in a1111.schedulers()],
            "Hires upscaler": [*a1111.LATENT_UPSCALE_MODES, *a1111.upscaler_names(service)],
            "VAE": ["Automatic", "None", *service.registry.vaes.names()], "Styles": list(service.styles.styles),
            "Always discard next-to-last sigma": booleans, "SGM noise multiplier": booleans,
            "Refiner checkpoint": ["None", *titles], "RNG source": ["GPU", "CPU", "NV"],
            "[FreeU] Enabled": ["False", "True"]}     # sd-webui-freeu's lib_free_u/xyz_grid.py `choices_bool`


def native_scripts(service: Service) -> dict[str, Any]:
    """The scripts each tab offers (A1111's titles and `ScriptInfo.args` as `GET /sdapi/v1/script-info` gives
    them: SD upscale's upscalers the server's) and the X/Y/Z plot axes sdlab draws, each with its index in A1111's
    axis list of the tab (its `x_type` / `y_type` / `z_type`), whether it has choices (its values then come from
    the `*_values_dropdown` argument unless `csv_mode`) and, for one that has, the values it offers (`values`,
    `axis_values`)."""
    from sdlab.server import a1111      # here: a1111 imports the native routes, which import this module
    upscalers = a1111.upscaler_names(service)
    values = axis_values(service)
    out: dict[str, Any] = {}
    for mode, img2img in (("txt2img", False), ("img2img", True)):
        out[mode] = {"scripts": [{"title": s.title, "args": [vars(arg) for arg in script_args(s, img2img, upscalers)]}
                                 for s in RUNNABLE_SCRIPTS if mode in s.modes],
                     "axes": [{"index": i, "label": axis.label, "choices": axis.choices,
                               **({"values": values[axis.label]} if axis.choices else {})}
                              for i, axis in enumerate(axis_types(mode))
                              if sdlab_field(axis) is not None]}
    return out
