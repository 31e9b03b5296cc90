"""ComfyUI's HTTP / WebSocket API (a subset) over the server's job queue, at `/` and under `/api` as ComfyUI serves it.

    POST /prompt            {prompt: API-format graph, client_id?, extra_data?, front?, number?, prompt_id?} ->
                            {prompt_id, number, node_errors}; a graph sdlab does not draw: 400 {error, node_errors}
                            (`comfy_graph`); `front` / `number` place it in the queue (`jobs.Place`)
    GET  /prompt            {exec_info: {queue_remaining}}
    GET  /ws?clientId=      WebSocket: status, execution_start, execution_cached, executing, progress, executed,
                            execution_success, execution_error, execution_interrupted ({type, data} JSON frames);
                            a binary preview frame after each progress where extra_data.preview_method asks
    GET  /history[/{id}]    {prompt_id: {prompt, outputs: {node: {images: [{filename, subfolder, type}]}}, status}}
    POST /history           {clear: true} | {delete: [prompt_id, ...]}
    GET  /view              ?filename&subfolder&type=output|temp|input: a picture drawn or uploaded
    POST /upload/image      multipart image (+ overwrite, subfolder, type=input|temp|output) -> {name, subfolder, type}
    POST /upload/mask       the same with original_ref {filename, subfolder?, type?}: that picture, its alpha the
                            uploaded mask's alpha
    GET  /queue             {queue_running, queue_pending: in the order drawn}; POST /queue {clear: true} |
                            {delete: [prompt_id, ...]}
    POST /interrupt         {prompt_id?}: the prompt drawing now stops at its next step, nothing of it kept
    POST /free              {unload_models?, free_memory?}: the model let go after the prompt drawing now
    GET  /object_info[/{class}], /system_stats, /embeddings, /models[/{folder}]

A prompt is one job of the server's queue (`Service.submit`, as a native job), drawn by the one worker beside the
A1111 and native APIs' jobs. Its pictures are the job's files: `filename` is the job's picture name, `subfolder`
"", `type` "output" for a SaveImage, "temp" for a PreviewImage (ComfyUI's own file names and prefixes are not
kept). The pictures LoadImage reads are those `POST /upload/image` put in the server's input folder
(`<output dir>/comfy_input`); an upload of type output or temp goes to `comfy_output` / `comfy_temp` beside it, which
/view and LoadImage's "name [output]" / "name [temp]" read after the jobs' pictures (`ComfyState.picture_file`). The routes' references: ComfyUI's server.py (routes, `send_json`), execution.py
(`PromptExecutor`'s messages, `validate_prompt`), script_examples/websockets_api_example.py (comfyanonymous/ComfyUI).
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import math
import os
import platform
import struct
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from fastapi import APIRouter, FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, JSONResponse, Response
import numpy as np
from PIL import Image, ImageOps, PngImagePlugin
from torch import Tensor

from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.upscaler import read_upscaler
from sdlab.diffusion.samplers import SAMPLER_TABLE
from sdlab.pipeline.control import ControlInput
from sdlab.pipeline.images import comfyui_encoded_mask
from sdlab.pipeline.comfy_image_upscale import ThroughModel, steps_size
from sdlab.pipeline.png_info import encode_image, write_files_all_or_nothing
from sdlab.pipeline.hires import pass_sizes
from sdlab.pipeline.request import HIRES_SIZE, SIZE_MULTIPLE, GenerationRequest
from sdlab.pipeline.upscale import MAX_OUTPUT_PIXELS
from sdlab.server.comfy_graph import (Choices, GraphError, GraphPlan, annotated_file, check_graph, node_refusal,
                                      object_info, run_order, second_pass_nodes)
from sdlab.server.inputs import (BadRequest, JobSpec, LoraChoice, image_from_bytes, opened_picture, read_json,
                                 without_paths)
from sdlab.server.jobs import IN_TURN, Job, Place, ServerFault
from sdlab.server.model_folders import ModelFile
from sdlab.server.native import IMAGE_NAME, opened_file
from sdlab.server.service import Service

INPUT_FOLDER = "comfy_input"
UPLOAD_FOLDERS = {"input": INPUT_FOLDER, "output": "comfy_output", "temp": "comfy_temp"}
"""The folder, under the output folder, of each upload `type` (ComfyUI's folder_paths.get_directory_by_type)."""
COMFY_SAMPLERS = [name for spec in SAMPLER_TABLE for name in (spec.comfy, *spec.comfy_aliases) if name]
"""ComfyUI's KSampler sampler names, in sdlab's table order (`GET /object_info`'s KSampler sampler_name)."""
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
MAX_HISTORY = 10_000                        # ComfyUI's MAXIMUM_HISTORY_SIZE
PREVIEW_METHODS = ("auto", "latent2rgb", "taesd")
"""The `extra_data.preview_method` values that ask ComfyUI for step previews (execution.py `set_preview_method`;
"none", "default" or none at all: ComfyUI's default --preview-method, none). sdlab sends its own previews
(`server/previews.py`) for each."""
PREVIEW_IMAGE, JPEG_PREVIEW = 1, 1          # ComfyUI's BinaryEventTypes.PREVIEW_IMAGE, send_image's JPEG type
MAX_PREVIEW_SIDE = 512                      # ComfyUI's MAX_PREVIEW_RESOLUTION (--preview-size's default)
UPSCALE_MODEL = "upscale model"             # `BadRequest.refused` of the upscale model's file
PICTURE_NODE = "picture node "              # + a node id: `BadRequest.refused` of a picture step's output size
MODEL_FOLDERS = {"checkpoints": "checkpoints", "loras": "loras", "vae": "vaes", "controlnet": "controlnets",
                 "diffusion_models": "unets", "upscale_models": "upscale_models", "embeddings": ""}
"""ComfyUI's model folders (folder_paths.folder_names_and_paths) `GET /models` lists, each to its `Choices` list
(the embeddings: the loaded model's)."""

router = APIRouter()


@dataclass
class Prompt:
    """A queued graph: ComfyUI's queue item [number, prompt_id, prompt, extra_data, outputs_to_execute] and the
    job drawing it."""

    number: float                           # the number the queue sorts it by (`jobs.Place`)
    prompt_id: str
    graph: dict[str, Any]
    extra_data: dict[str, Any]
    plan: GraphPlan
    client_id: str | None
    job: Job
    messages: list[list[Any]] = field(default_factory=list)
    outputs: dict[str, Any] = field(default_factory=dict)
    first_pass: list[str] = field(default_factory=list)     # a two-pass graph's first-pass pictures, once written
    upscale_failed: list[str] = field(default_factory=list)  # the picture node whose work failed, if one did
    executing: str | None = None            # the node shown as executing now
    ended: bool = False                     # its job ended and its last message was sent: in the history

    def item(self) -> list[Any]:
        return [self.number, self.prompt_id, self.graph, self.extra_data, list(self.plan.outputs)]


class ComfyState:
    """The prompts of this server (queued, running and their history), the WebSockets by client id, the input
    folder."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.upload_dirs = {kind: service.config.output_dir / name for kind, name in UPLOAD_FOLDERS.items()}
        self.input_dir = self.upload_dirs["input"]
        self.prompts: dict[str, Prompt] = {}        # in the order they were queued, the finished kept as history
        self.sockets: dict[str, WebSocket] = {}
        self.tasks: set[asyncio.Task] = set()
        self.lock = threading.Lock()
        self.claimed: set[str] = set()              # client-chosen prompt ids of POST /prompt being checked, queued

    def claim(self, prompt_id: str) -> bool:
        """Hold `prompt_id` for a POST /prompt until its prompt is saved (`release`): False where a prompt of it is
        queued or running, or another POST holds it (two posts of one id at once: one is queued, one refused)."""
        with self.lock:
            queued = self.prompts.get(prompt_id)
            if prompt_id in self.claimed or (queued is not None and not queued.ended):
                return False
            self.claimed.add(prompt_id)
            return True

    def release(self, prompt_id: str) -> None:
        with self.lock:
            self.claimed.discard(prompt_id)

    def choices(self) -> Choices:
        registry = self.service.registry
        loras = sorted(self.lora_files())                             # sorted, as ComfyUI's folder_paths
        return Choices(checkpoints=sorted(c.name for c in registry.checkpoints), loras=loras,
                       input_images=self.input_images(), samplers=COMFY_SAMPLERS, vaes=sorted(self.vae_files()),
                       controlnets=sorted(self.controlnet_files()), upscale_models=sorted(self.upscale_model_files()),
                       output_images=lambda folder, name: self.picture_file(folder, name) is not None)

    def picture_file(self, kind: str, name: str, subfolder: str = "") -> Path | None:
        """The file of a picture of ComfyUI's folder `kind` (input, output, temp; any other: None) as /view and
        LoadImage name it: for output and temp a job's picture ("<job id>-<n>.png", no subfolder, as /history names
        it), else an upload of that type; for input an upload. None where there is no such file or the name leaves
        the folder."""
        if kind in ("output", "temp") and not subfolder and IMAGE_NAME.match(name):
            job_picture = self.service.images_dir / name
            if job_picture.is_file():
                return job_picture
        if kind not in self.upload_dirs:
            return None
        path = _inside(self.upload_dirs[kind], f"{subfolder}/{name}" if subfolder else name)
        return path if path is not None and path.is_file() else None

    def lora_files(self) -> dict[str, str]:
        """ComfyUI's lora_name list, each to the server's LoRA name: a LoRA by its path under the LoRA folder it
        was found in, with its suffix ("sub/detail.safetensors", as ComfyUI's folder_paths names a file in a
        subfolder), every file of a stem two folders hold too (`ModelRegistry.lora_names`)."""
        return self.service.registry.lora_names()

    def vae_files(self) -> dict[str, str]:
        """ComfyUI's vae_name list, each to the server's VAE name: a file of the VAE folder by its path there
        ("sub/kl-f8.safetensors", as ComfyUI's folder_paths names a file in a subfolder; every file of a name two
        folders hold, `VaeFiles.folder_names`), any other file of the server's VAE list (a checkpoint's sidecar)
        by its name."""
        vaes = self.service.registry.vaes
        folder = vaes.vae_folder
        others = {f.name: f.name for f in list(vaes.files) if folder is None or not f.path.is_relative_to(folder)}
        return {**others, **vaes.folder_names()}

    def controlnet_files(self) -> dict[str, Path]:
        """ComfyUI's control_net_name list: the ControlNets and T2I-Adapters of the server's ControlNet folder by
        their path under it (ComfyUI's folder_paths names), each to its file."""
        folder = self.service.controlnets
        return {f.path.relative_to(folder.folder).as_posix(): f.path for f in list(folder.files)
                if f.kind == "controlnet" and folder.folder is not None and f.path.is_relative_to(folder.folder)}

    def upscale_model_files(self) -> dict[str, ModelFile]:
        """ComfyUI's UpscaleModelLoader model_name list: the upscaler models of the server's upscalers folder by their
        path under it (ComfyUI's folder_paths names), each to its file."""
        folder = self.service.upscalers
        return {f.path.relative_to(folder.folder).as_posix(): f for f in list(folder.files)
                if folder.folder is not None and f.path.is_relative_to(folder.folder)}

    def input_images(self) -> list[str]:
        if not self.input_dir.is_dir():
            return []
        return sorted(p.relative_to(self.input_dir).as_posix() for p in self.input_dir.rglob("*")
                      if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)

    def listed(self) -> list[Prompt]:
        """The prompts, oldest first (a copy: routes read them in threads while the event loop adds one)."""
        with self.lock:
            return list(self.prompts.values())

    def queue_remaining(self) -> int:
        queued, running = self.service.queue.counts()
        return queued + running

    def listeners(self, sid: str | None) -> list[WebSocket]:
        """The open sockets a message to `sid` goes to: its own (none where it is not connected), every one for
        None."""
        if sid is None:
            return list(self.sockets.values())
        return [self.sockets[sid]] if sid in self.sockets else []

    async def send(self, event: str, data: dict[str, Any] | bytes, sid: str | None) -> None:
        """ComfyUI's `send_json` (`send_bytes` for a binary frame, `data` bytes): to the socket of `sid`, or to every
        socket when `sid` is None."""
        for socket in self.listeners(sid):
            try:
                if isinstance(data, bytes):
                    await socket.send_bytes(data)
                else:
                    await socket.send_json({"type": event, "data": data})
            except Exception:                       # the client went away meanwhile
                self.sockets = {k: v for k, v in self.sockets.items() if v is not socket}

    async def send_status(self) -> None:
        await self.send("status", {"status": {"exec_info": {"queue_remaining": self.queue_remaining()}}}, None)


def attach(app: FastAPI, service: Service) -> None:
    """Serve the routes at `/` and under `/api` (ComfyUI's `add_routes`), with the state they share."""
    app.state.comfy = ComfyState(service)
    app.include_router(router)
    app.include_router(router, prefix="/api")


def state_of(request: Request | WebSocket) -> ComfyState:
    return request.app.state.comfy


def _bad_prompt(kind: str, message: str, details: str = "") -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message, "details": details, "extra_info": {}},
                         "node_errors": {}}, status_code=400)


@router.post("/prompt")
async def post_prompt(request: Request) -> JSONResponse:
    state = state_of(request)
    try:
        body = read_json(await request.body())
    except ValueError:
        return _bad_prompt("invalid_prompt", "Invalid prompt: the body is not JSON")
    if not isinstance(body, dict) or "prompt" not in body:
        return _bad_prompt("no_prompt", "No prompt provided", "No prompt provided")
    try:
        place = _place(body)
    except ValueError as err:
        return _bad_prompt("invalid_prompt", str(err))
    prompt_id = _prompt_id(body)
    if prompt_id is None:
        return await _queued(state, body, place, None)
    if not state.claim(prompt_id):
        return _bad_prompt("invalid_prompt", f"prompt_id {prompt_id!r} is a prompt queued or running")
    try:
        return await _queued(state, body, place, prompt_id)
    finally:
        state.release(prompt_id)


async def _queued(state: ComfyState, body: dict[str, Any], place: Place, prompt_id: str | None) -> JSONResponse:
    """POST /prompt's graph checked and queued as the prompt `prompt_id` (None: the job's id as a UUID), with its
    answer; a graph sdlab does not draw, ComfyUI's 400."""
    extra_data = dict(body["extra_data"]) if isinstance(body.get("extra_data"), dict) else {}
    if "client_id" in body:                 # ComfyUI's post_prompt: the queue item's extra_data names its client
        extra_data["client_id"] = body["client_id"]
    client_id = body.get("client_id")
    client_id = client_id if isinstance(client_id, str) and client_id else None
    try:
        # off the event loop: a large graph's check must not hold up every other route
        plan = await asyncio.to_thread(lambda: check_graph(body["prompt"], state.choices()))
    except GraphError as err:
        return JSONResponse(err.body(), status_code=400)
    first_pass: list[str] = []
    upscale_failed: list[str] = []
    try:
        job = await asyncio.to_thread(_submit, state, plan, place, first_pass, upscale_failed)
    except BadRequest as err:
        # request.py's hires size checks: the LatentUpscale's; the upscale model's file: its node's; a picture
        # node's output size: that node's (`PICTURE_NODE` + its id)
        refused = err.refused or ""
        node = {HIRES_SIZE: plan.upscale_node, UPSCALE_MODEL: plan.model_upscale_node}.get(refused) or (
            refused.removeprefix(PICTURE_NODE) if refused.startswith(PICTURE_NODE) else "")
        if node:
            return JSONResponse(node_refusal(body["prompt"], node, err.message, list(plan.outputs)).body(),
                                status_code=400)
        return _bad_prompt("invalid_prompt", err.message, err.detail if isinstance(err.detail, str) else "")
    number = job.number                     # ComfyUI answers the number its queue sorts the prompt by
    with state.lock:
        prompt_id = prompt_id or str(uuid.UUID(job.id))
        prompt = Prompt(number, prompt_id, body["prompt"], extra_data, plan, client_id, job, first_pass=first_pass,
                        upscale_failed=upscale_failed)
        state.prompts.pop(prompt_id, None)          # a finished prompt of that id leaves the history
        state.prompts[prompt_id] = prompt
        _forget_old(state)
    task = asyncio.get_running_loop().create_task(_follow(state, prompt))
    state.tasks.add(task)
    task.add_done_callback(state.tasks.discard)
    await state.send_status()
    return JSONResponse({"prompt_id": prompt.prompt_id, "number": number, "node_errors": {}})


def _prompt_id(body: dict[str, Any]) -> str | None:
    """The id the client chose: the body's `prompt_id` as str() gives it (ComfyUI's server.py ``post_prompt``: its
    script_examples/websockets_api_example.py makes one, sends it and waits for it on the socket); None (null,
    "" or none sent) for the job's own id as a UUID."""
    given = body.get("prompt_id")
    return None if given is None or given == "" else str(given)


def _place(body: dict[str, Any]) -> Place:
    """The queue place a POST /prompt asks for (ComfyUI's server.py ``post_prompt``): `front` (any true value)
    before every prompt pending, `number` (float() of it, as ComfyUI reads it) the number its queue sorts by; a
    `number` that is no finite number (NaN, an infinity, an integer beyond a float's range), a ValueError: the
    answer and GET /queue carry the number as JSON, which has no infinity."""
    number = body.get("number")
    if number is not None:
        try:
            number = float(number)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"number must be a finite number, got {_shown(number)}") from None
        if not math.isfinite(number):
            raise ValueError(f"number must be a finite number, got {number}")
    return Place(front=bool(body.get("front")), number=number)


def _shown(value: Any) -> str:
    """`value` for a one-line message: its repr, cut to 40 characters."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _submit(state: ComfyState, plan: GraphPlan, place: Place = IN_TURN, first_pass: list[str] | None = None,
            upscale_failed: list[str] | None = None) -> Job:
    """Queue the generation `plan` describes, as a native job (`Service.submit`), at its `place`; the names of the
    first-pass pictures of a two-pass graph that saves them go to `first_pass` as they are written
    (`_first_pass_writer`), the id of a picture node (or UpscaleModelLoader) whose work fails to
    `upscale_failed`."""
    service = state.service
    init = loaded = None
    if plan.init_image is not None:
        loaded = _input_picture(state, plan.init_image).convert("RGB")      # LoadImage's IMAGE
        init = _vae_cropped(loaded, plan.init_image)                        # the pixels VAEEncode encodes
    width, height = (init.size if init is not None else (plan.width, plan.height))
    mask = None if plan.mask_image is None else _load_mask(state, plan, loaded.size)
    request = GenerationRequest(
        prompt=plan.prompt, negative_prompt=plan.negative_prompt, sampler=plan.sampler, schedule=plan.schedule,
        cfg_scale=plan.cfg_scale, seed=plan.seed, steps=plan.steps, width=width, height=height,
        batch_size=plan.batch_size, batch_noise="comfyui", emphasis="ComfyUI", clip_skip=plan.clip_skip or 1,
        # CLIPSetLastLayer counts from every encoder's last layer (ComfyUI's rule); without one, the usual layers
        clip_skip_convention="diffusers" if plan.clip_skip is None else "comfyui",
        init_image=init, strength=plan.strength if init is not None else 1.0, area_prompts=plan.area_prompts,
        **plan.hires,
        # SetLatentNoiseMask: ComfyUI's soft mask as it is (no rounding, no blur), the picture not pasted back;
        # VAEEncodeForInpaint: the mask rounded, its pixels grey as encoded, the noise mask grown by grow_mask_by
        **({} if mask is None else {"mask_image": mask, "mask_round": False, "paste_back": False}
           if plan.mask_grow is None else {"mask_image": mask, "mask_round": True, "paste_back": False,
                                           "inpaint_fill": "grey", "mask_grow": plan.mask_grow}))
    if plan.controls:       # ControlNetApply nodes: ComfyUI's hint resize and sigma windows (`control.py`)
        request = dataclasses.replace(request, controls=_controls(state, plan), control_convention="comfyui")
    files = state.lora_files()
    missing = [name for name, _ in plan.loras if name not in files]
    if missing:                 # removed since the graph was checked
        raise BadRequest(f"no LoRA {missing[0]!r}", 400)
    loras = tuple(LoraChoice(files[name], weight) for name, weight in plan.loras)
    spec = JobSpec(request, loras=loras, extra_networks=False, typed_prompts={
        "prompt": plan.prompt, "negative_prompt": plan.negative_prompt},
        # CheckpointLoaderSimple's VAE is the checkpoint's own (no sidecar found near it, as A1111's Automatic)
        sidecar_vae=False, vae=None if plan.vae is None else state.vae_files().get(plan.vae, plan.vae),
        first_pass=_first_pass_writer(state, plan, [] if first_pass is None else first_pass),
        picture_upscaler=_upscale_model(state, plan, request), picture_steps=tuple(plan.picture_steps),
        picture_upscaler_failed=None if upscale_failed is None else _failed_node(plan, upscale_failed))
    job, _ = service.submit(spec, plan.mode, plan.model, place)
    return job


def _upscale_model(state: ComfyState, plan: GraphPlan, request: GenerationRequest) -> ModelFile | None:
    """The upscalers-folder file of the graph's UpscaleModelLoader, if it has one (else None), after its picture
    steps' sizes are checked: each step's pictures (from `request`'s size, the second pass's in a two-pass graph;
    the model's times the network's scale) must have sides of at least 1 px and lie within the server's upscale
    limit, 4 x --max-pixels as the Extras' (and `upscale.MAX_OUTPUT_PIXELS`): else a `BadRequest` refusing
    `PICTURE_NODE` + the node that makes them, which the answer names, before anything is drawn."""
    found, scale = None, 1
    if plan.upscale_model is not None:
        found = state.upscale_model_files().get(plan.upscale_model)
        if found is None:           # removed since the graph was checked
            raise BadRequest(f"no upscale model {plan.upscale_model!r}", 400)
        try:
            scale = read_upscaler(found.path).config.scale          # from its names and shapes, on the meta device
        except (CheckpointError, OSError) as err:
            raise BadRequest(f"the upscale model {plan.upscale_model!r} cannot be read: "
                             f"{without_paths(str(err), [(found.path, plan.upscale_model)])}", 400,
                             refused=UPSCALE_MODEL) from None
    width, height = pass_sizes(request, SIZE_MULTIPLE)[1] if plan.hires else (request.width, request.height)
    limit = min(4 * state.service.config.limits.max_pixels, MAX_OUTPUT_PIXELS)
    for step, node, (new_width, new_height) in zip(plan.picture_steps, plan.picture_nodes,
                                                   steps_size(width, height, plan.picture_steps, scale)):
        what = (f"the upscale model {plan.upscale_model!r} (x{scale})" if isinstance(step, ThroughModel)
                else f"{_picture_kind(plan, node)} #{node}")
        if new_width * new_height > limit:
            raise BadRequest(f"{what} would make {width}x{height} pictures {new_width}x{new_height}, past this "
                             f"server's limit of {limit} pixels (4 x --max-pixels); draw smaller pictures or use a "
                             "smaller scale", 400, refused=PICTURE_NODE + node)
        if min(new_width, new_height) < 1:
            raise BadRequest(f"{what} would make {width}x{height} pictures {new_width}x{new_height}, an empty "
                             "picture; use a larger scale", 400, refused=PICTURE_NODE + node)
        width, height = new_width, new_height
    return found


def _picture_kind(plan: GraphPlan, node: str) -> str:
    """The node's class as the plan's picture steps name it: ImageUpscaleWithModel, ImageScale or ImageScaleBy."""
    step = plan.picture_steps[plan.picture_nodes.index(node)]
    if isinstance(step, ThroughModel):
        return "ImageUpscaleWithModel"
    return "ImageScaleBy" if step.scale_by is not None else "ImageScale"


def _failed_node(plan: GraphPlan, failed: list[str]) -> Callable[[int | None], None]:
    """The job's `JobSpec.picture_upscaler_failed`: the id of the node whose work failed added to `failed` (a
    picture step's node, None: the UpscaleModelLoader feeding the ImageUpscaleWithModel)."""
    def tell(step: int | None) -> None:
        if step is not None:
            failed.append(plan.picture_nodes[step])
        else:
            failed.append(plan.model_loader_node)
    return tell


def _first_pass_writer(state: ComfyState, plan: GraphPlan,
                       names: list[str]) -> Callable[[list[Image.Image], list[str]], None] | None:
    """The job's `JobSpec.first_pass` of a two-pass graph whose first KSampler's pictures an output takes
    (ComfyUI's 2-pass example's "Save Intermediate Image"): the pictures written with their parameters, all or
    nothing, into the output folder of each such output's type (`UPLOAD_FOLDERS`: comfy_output for a SaveImage,
    comfy_temp for a PreviewImage, as ComfyUI's SaveImage and PreviewImage write theirs), their names added to
    `names`; None for any other graph."""
    kinds = sorted(set(plan.first_pass_outputs.values()))
    if not kinds:
        return None
    stem = uuid.uuid4().hex

    def write(images: list[Image.Image], texts: list[str]) -> None:
        files = [f"{stem}-first-pass-{len(names) + i}.png" for i in range(len(images))]
        blobs = [encode_image(image, "PNG", text) for image, text in zip(images, texts)]
        try:
            for kind in kinds:
                state.upload_dirs[kind].mkdir(parents=True, exist_ok=True)
                write_files_all_or_nothing([(state.upload_dirs[kind] / f, b) for f, b in zip(files, blobs)],
                                           overwrite=False)
        except OSError as err:
            raise ServerFault("cannot write the first KSampler's pictures into the server's output folder: "
                              f"{err.strerror or err}") from None
        names.extend(files)

    return write


def _input_picture(state: ComfyState, name: str) -> Image.Image:
    """An input-folder picture as ComfyUI's LoadImage reads it: turned upright (RGB: an alpha channel dropped, not
    composited, where the caller converts it)."""
    return image_from_bytes(_input_bytes(state, name), f"LoadImage {name!r}", state.service.config.limits)


def _input_bytes(state: ComfyState, name: str) -> bytes:
    """The bytes of the picture a LoadImage names: an input-folder file ("file [input]" too), or a picture of the
    output folder ("file [output]" / "[temp]", `comfy_graph.annotated_file`); a 400 where there is none."""
    path = state.picture_file(*annotated_file(name))
    if path is None:
        raise BadRequest(f"no input picture {name!r}", 400)
    return path.read_bytes()


def _vae_cropped(picture: Image.Image, name: str) -> Image.Image:
    """The pixels VAEEncode encodes of a LoadImage picture: cropped to multiples of 8 about its centre."""
    box = _crop_box(picture.size, name)
    return picture.crop(box) if box != (0, 0, *picture.size) else picture


def _crop_box(size: tuple[int, int], name: str) -> tuple[int, int, int, int]:
    """The box (left, top, right, bottom) VAEEncode and VAEEncodeForInpaint keep of pixels of `size` (w, h):
    multiples of 8, the offsets (side % 8) // 2 (comfy/sd.py `vae_encode_crop_pixels`, nodes.py
    ``VAEEncodeForInpaint.encode``)."""
    width, height = size
    keep_w, keep_h = width // 8 * 8, height // 8 * 8
    if keep_w < 8 or keep_h < 8:
        raise BadRequest(f"the input picture {name!r} is smaller than 8 x 8 pixels", 400)
    left, top = (width % 8) // 2, (height % 8) // 2
    return left, top, left + keep_w, top + keep_h


def _controls(state: ComfyState, plan: GraphPlan) -> tuple[ControlInput, ...]:
    """The graph's ControlNets as the request's controls: each ControlNetLoader's file, its LoadImage picture as
    ComfyUI's LoadImage reads it (upright, RGB: an alpha channel dropped), strength and percents."""
    files = state.controlnet_files()
    controls = []
    for control in plan.controls:
        if control.model not in files:
            raise BadRequest(f"no ControlNet {control.model!r}", 400)
        picture = _input_picture(state, control.image).convert("RGB")
        controls.append(ControlInput(files[control.model], picture, control.strength, control.start, control.end))
    return tuple(controls)


def _load_mask(state: ComfyState, plan: GraphPlan, size: tuple[int, int]) -> Image.Image:
    """The MASK of the graph's mask picture as a mask picture ("L", white = repaint): LoadImage's, 1 - its alpha
    (255 - alpha), or LoadImageMask's channel of the picture made RGBA, 1 - alpha for "alpha", the channel / 255
    for red, green, blue (comfyanonymous/ComfyUI nodes.py, e60e19b); `size` is the LoadImage pixels' (w, h) before
    VAEEncode's crop. VAEEncodeForInpaint's mask is resized bilinearly to the pixels, cropped with them and rounded
    (`images.comfyui_encoded_mask`). SetLatentNoiseMask's is kept at its own size, any size: ComfyUI resizes it
    bilinearly straight to the latent of the picture VAEEncode crops (comfy/sampler_helpers.py `prepare_mask`), as
    the inpaint job under ComfyUI's convention does (`init_picture`). A LoadImage picture without alpha (ComfyUI's
    empty 64 x 64 mask), or any mask that is 0 everywhere, repaints nothing: a 400."""
    name = plan.mask_image
    data = _input_bytes(state, name)
    image = image_from_bytes(data, f"LoadImage {name!r}", state.service.config.limits)
    with Image.open(io.BytesIO(data)) as stored:     # ComfyUI reads the file's own bands: a palette's
        has_alpha = "A" in stored.getbands()          # transparency is no alpha to it (nodes.py LoadImage)
    if plan.mask_node == "LoadImage" and not has_alpha:
        raise BadRequest(f"the mask picture {name!r} has no alpha channel: its MASK repaints nothing", 400)
    band = image.convert("RGBA").getchannel(plan.mask_channel[0].upper())
    mask = ImageOps.invert(band) if plan.mask_channel == "alpha" else band
    if mask.getextrema()[1] == 0:
        raise BadRequest(f"the {plan.mask_channel} mask of {name!r} is 0 everywhere: it repaints nothing", 400)
    if plan.mask_grow is not None:          # VAEEncodeForInpaint: LoadImage's MASK in float32, as ComfyUI's
        values = np.asarray(band, dtype=np.float32) / np.float32(255.0)                # (h, w)
        return comfyui_encoded_mask(1.0 - values if plan.mask_channel == "alpha" else values, size,
                                    _crop_box(size, plan.init_image))
    return mask


def preview_frame(rgb: Tensor) -> bytes:
    """A step preview (h, w, 3) uint8 as ComfyUI's binary WebSocket frame (server.py ``send_image`` and
    ``encode_bytes``): the event type PREVIEW_IMAGE and the image type JPEG, each 4 bytes big-endian, then the
    picture fitted to MAX_PREVIEW_SIDE (``ImageOps.contain``, bilinear: a latent-sized preview is scaled up) as a
    JPEG of quality 95."""
    image = ImageOps.contain(Image.fromarray(rgb.numpy(), "RGB"), (MAX_PREVIEW_SIDE, MAX_PREVIEW_SIDE),
                             Image.Resampling.BILINEAR)
    data = io.BytesIO()
    data.write(struct.pack(">I", PREVIEW_IMAGE) + struct.pack(">I", JPEG_PREVIEW))
    image.save(data, format="JPEG", quality=95)
    return data.getvalue()


def _forget_old(state: ComfyState) -> None:
    """ComfyUI's history keeps its newest MAX_HISTORY prompts."""
    finished = [pid for pid, p in state.prompts.items() if p.ended]
    for pid in finished[:max(0, len(finished) - MAX_HISTORY)]:
        del state.prompts[pid]


async def _follow(state: ComfyState, prompt: Prompt) -> None:
    """The job's events as ComfyUI's executor sends them (execution.py `PromptExecutor.execute`), to the prompt's
    client, and its history entry."""
    job, plan, pid, sid = prompt.job, prompt.plan, prompt.prompt_id, prompt.client_id

    async def send(event: str, data: dict[str, Any], keep: bool = False) -> None:
        if keep:
            prompt.messages.append([event, {**data, "timestamp": int(time.time() * 1000)}])
        await state.send(event, data, sid)

    async def executing(node: str | None) -> None:
        prompt.executing = node
        await send("executing", {"node": node, "display_node": node, "prompt_id": pid})

    async def executed(node: str, images: list[dict[str, str]], kind: str) -> None:
        """The output node's pictures (`kind`: their /view type) in the history and its `executed` message."""
        output = {"images": [{**image, "type": kind} for image in images]}
        prompt.outputs[node] = output
        await send("executed", {"node": node, "display_node": node, "output": output, "prompt_id": pid})

    previews = prompt.extra_data.get("preview_method") in PREVIEW_METHODS
    events = job.subscribe(asyncio.get_running_loop(), previews=previews)
    begun = False
    second_pass: list[str] = []             # a two-pass graph's nodes after the first KSampler, once run
    try:
        while True:
            name, data = await events.get()
            if name in ("started", "step") and not begun:
                begun = True
                await send("execution_start", {"prompt_id": pid}, keep=True)
                await send("execution_cached", {"nodes": [], "prompt_id": pid}, keep=True)
                for node in run_order(plan, before_sampler=True):
                    await executing(node)
            if name == "step":
                first = job.passes[0] if plan.second_node and job.passes else data["n"]
                if data["i"] > first and not second_pass:           # a two-pass graph: the first KSampler's
                    second_pass = second_pass_nodes(plan)            # outputs, the upscale, the second KSampler,
                    for node in second_pass:                         # counting its own steps
                        await executing(node)
                        if node in plan.first_pass_outputs:
                            await executed(node, [{"filename": name, "subfolder": ""} for name in prompt.first_pass],
                                           plan.first_pass_outputs[node])
                await send("progress", {"value": data["i"] - first if second_pass else data["i"],
                                        "max": data["n"] - first if second_pass else first, "prompt_id": pid,
                                        "node": plan.second_node if second_pass else plan.sampler_node})
                # after its progress, as ComfyUI's hook; encoded only where a socket will get it
                if previews and data.get("preview") is not None and state.listeners(sid):
                    await send("preview", await asyncio.to_thread(preview_frame, data["preview"]))
            elif name == "done":
                images = [{"filename": Path(url).name, "subfolder": ""} for url in data["images"]]
                for node in run_order(plan, before_sampler=False)[len(second_pass):]:
                    await executing(node)
                    if node in plan.outputs and node not in plan.first_pass_outputs:
                        await executed(node, images, plan.outputs[node])
                await send("execution_success", {"prompt_id": pid}, keep=True)
                break
            elif name in ("failed", "cancelled"):
                node = second_pass[-1] if second_pass else plan.sampler_node
                if prompt.upscale_failed:           # the upscale-model node whose work failed, after the nodes before
                    node = prompt.upscale_failed[0]                                 # it shown as executing
                    after = plan.order[plan.order.index(plan.sampler_node) + 1:plan.order.index(node) + 1]
                    for ran in (after if begun else []):
                        if ran not in second_pass:
                            await executing(ran)
                executed = plan.order[:plan.order.index(node)] if begun else []
                kind = prompt.graph[node]["class_type"]
                if name == "cancelled" or data.get("status") == "interrupted":
                    await send("execution_interrupted", {"prompt_id": pid, "node_id": node,
                                                         "node_type": kind, "executed": executed}, keep=True)
                else:
                    await send("execution_error", {
                        "prompt_id": pid, "node_id": node, "node_type": kind, "executed": executed,
                        "exception_message": data.get("error") or name, "exception_type": "RuntimeError",
                        "traceback": [], "current_inputs": {}, "current_outputs": {}}, keep=True)
                break
    finally:
        job.unsubscribe(events)
        prompt.ended = True                 # in the history before its client hears it ended
    await executing(None)                   # ComfyUI's main.py, after the executor: the prompt's end
    await state.send_status()


def _history_entry(prompt: Prompt) -> dict[str, Any]:
    status = prompt.job.status
    return {"prompt": prompt.item(), "outputs": prompt.outputs,
            "status": {"status_str": "success" if status == "done" else "error",
                       "completed": status == "done", "messages": prompt.messages},
            "meta": {node: {"node_id": node, "display_node": node, "parent_node": None, "real_node_id": node}
                     for node in prompt.outputs}}


def _finished(state: ComfyState) -> list[Prompt]:
    """The prompts whose job ended and whose messages were all sent, oldest first."""
    return [p for p in state.listed() if p.ended]


@router.get("/history")
def get_history(request: Request, max_items: int | None = None) -> dict[str, Any]:
    finished = _finished(state_of(request))
    if max_items is not None:
        finished = finished[-max_items:] if max_items > 0 else []
    return {p.prompt_id: _history_entry(p) for p in finished}


@router.get("/history/{prompt_id}")
def get_history_item(prompt_id: str, request: Request) -> dict[str, Any]:
    return {p.prompt_id: _history_entry(p) for p in _finished(state_of(request)) if p.prompt_id == prompt_id}


@router.post("/history")
async def post_history(request: Request) -> JSONResponse:
    state, body = state_of(request), await _json_object(request)
    finished = {p.prompt_id for p in _finished(state)}
    with state.lock:
        if body.get("clear"):
            for pid in finished:
                state.prompts.pop(pid, None)
        for pid in _ids(body):
            if pid in finished:
                state.prompts.pop(pid, None)
    return JSONResponse({})


def _ids(body: dict[str, Any]) -> list[str]:
    """The body's `delete`: a list of prompt ids, else a 400."""
    ids = body.get("delete") or []
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise BadRequest("delete must be a list of prompt ids", 400)
    return ids


async def _json_object(request: Request) -> dict[str, Any]:
    try:
        body = read_json(await request.body())
    except ValueError:
        raise BadRequest("the body is not JSON", 400) from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object", 400)
    return body


@router.get("/prompt")
def get_prompt(request: Request) -> dict[str, Any]:
    return {"exec_info": {"queue_remaining": state_of(request).queue_remaining()}}


@router.get("/queue")
def get_queue(request: Request) -> dict[str, Any]:
    """The prompts running, and those pending in the order the worker draws them (`front` / `number`)."""
    state = state_of(request)
    prompts = state.listed()
    by_job = {id(p.job): p for p in prompts}
    pending = [by_job[id(job)] for job in state.service.queue.queued() if id(job) in by_job]
    return {"queue_running": [p.item() for p in prompts if p.job.status == "running"],
            "queue_pending": [p.item() for p in pending]}


@router.post("/queue")
async def post_queue(request: Request) -> JSONResponse:
    """`{clear: true}` cancels every queued prompt, `{delete: [prompt_id, ...]}` those (the one drawing goes on:
    `POST /interrupt` stops it)."""
    state, body = state_of(request), await _json_object(request)
    wanted = set(_ids(body))
    for prompt in state.listed():
        if prompt.job.status == "queued" and (body.get("clear") or prompt.prompt_id in wanted):
            await asyncio.to_thread(state.service.queue.cancel, prompt.job)
    return JSONResponse({})


@router.post("/interrupt")
async def interrupt(request: Request) -> JSONResponse:
    """Stop the job drawing now at its next step, its pictures not written (ComfyUI's interrupt keeps no output);
    with `{prompt_id}`, only when that prompt is the one drawing."""
    state = state_of(request)
    try:
        body = read_json(await request.body())
    except ValueError:
        body = {}
    wanted = body.get("prompt_id") if isinstance(body, dict) else None
    job = state.service.queue.current
    if job is not None:
        running = next((p for p in state.listed() if p.job is job), None)
        if wanted is None or (running is not None and running.prompt_id == wanted):
            await asyncio.to_thread(state.service.queue.cancel, job)
    return JSONResponse({})


@router.websocket("/ws")
async def websocket(socket: WebSocket) -> None:
    state = state_of(socket)
    sid = socket.query_params.get("clientId") or uuid.uuid4().hex
    await socket.accept()
    state.sockets[sid] = socket
    try:
        await socket.send_json({"type": "status", "data": {
            "status": {"exec_info": {"queue_remaining": state.queue_remaining()}}, "sid": sid}})
        running = next((p for p in state.listed() if p.client_id == sid and p.executing), None)
        if running is not None:             # a client that reconnects learns the node drawing
            await socket.send_json({"type": "executing", "data": {"node": running.executing,
                                                                  "prompt_id": running.prompt_id}})
        while True:
            await socket.receive_text()     # clients send nothing sdlab reads
    except WebSocketDisconnect:
        pass
    finally:
        if state.sockets.get(sid) is socket:
            del state.sockets[sid]


@router.get("/view")
def view(request: Request, filename: str, subfolder: str = "", type: str = "output") -> Response:
    state = state_of(request)
    type, filename = _annotated_or(filename, type)
    if type not in UPLOAD_FOLDERS:
        raise BadRequest(f"type must be output, temp or input, got {type!r}", 400)
    path = state.picture_file(type, filename, subfolder)
    if path is not None and path.parent == state.service.images_dir:
        # a job's picture opened now: a job deleted meanwhile is a 404, not a broken answer
        picture = opened_file(path, "image/png", {"Content-Disposition": f'inline; filename="{filename}"'})
        if picture is not None:
            return picture
        path = None
    if path is None:
        raise BadRequest("Not Found", 404)
    return FileResponse(path, filename=filename, content_disposition_type="inline")


def _annotated_or(name: str, kind: str) -> tuple[str, str]:
    """(folder, file) of a picture `name` whose type is `kind` unless its ComfyUI annotation ("x.png [input]") says
    another, as /view and upload_mask read a filename (folder_paths.annotated_filepath before the `type`)."""
    folder, file = annotated_file(name)
    return (folder, file) if file != name else (kind, name)


def _inside(folder: Path, name: str) -> Path | None:
    """`folder / name` when it lies inside `folder` (no `..`, no absolute path), else None."""
    if not name or "\\" in name or "\0" in name or Path(name).is_absolute():
        return None
    path = (folder / name).resolve()
    root = folder.resolve()
    return path if path != root and root in path.parents else None


@router.post("/upload/image")
async def upload_image(request: Request) -> JSONResponse:
    """ComfyUI's `upload_image`: the file of the form's `image` to the folder of its `type` (input, the default;
    temp or output: `UPLOAD_FOLDERS`), `subfolder` in it, renamed "name (1).png" where one of its name is there and
    `overwrite` is not true."""
    form = await request.form()
    upload, raw = await _uploaded_picture(request, form)
    return await _stored(state_of(request), form, upload.filename, raw)


@router.post("/upload/mask")
async def upload_mask(request: Request) -> JSONResponse:
    """ComfyUI's `upload_mask` (its mask editor's save): the picture `original_ref` names ({filename, subfolder?,
    type?: output by default}; "name [input]"-style names as LoadImage's) made RGBA, its alpha replaced by the
    uploaded `image`'s alpha (an image without one: opaque, as Pillow's RGBA conversion gives it), its PNG text kept,
    stored as /upload/image stores a file. A mask of another size than the picture, or an original_ref naming no
    picture, is a 400 (ComfyUI fails on the first and writes nothing for the second)."""
    state = state_of(request)
    form = await request.form()
    upload, raw = await _uploaded_picture(request, form)
    original = _original_ref(state, form.get("original_ref"))
    merged = await anyio.to_thread.run_sync(_with_mask_alpha, original, raw, state.service.config.limits)
    return await _stored(state, form, upload.filename, merged)


async def _uploaded_picture(request: Request, form: Any) -> tuple[Any, bytes]:
    """(the form's `image` file, its bytes), checked to be a picture Pillow decodes whole (else a 400 now, not when
    a graph loads it)."""
    upload = form.get("image")
    if upload is None or isinstance(upload, str):
        raise BadRequest("the form has no image file", 400)
    raw = await upload.read()
    with opened_picture(raw, "image", state_of(request).service.config.limits) as picture:
        picture.load()
    return upload, raw


async def _stored(state: ComfyState, form: Any, filename: str | None, raw: bytes) -> JSONResponse:
    """ComfyUI's `image_upload`: `raw` written to the folder of the form's `type` as the file `filename` (in its
    `subfolder`), the answer naming it."""
    kind = form.get("type") or "input"
    if kind not in UPLOAD_FOLDERS:
        raise BadRequest(f"type must be input, temp or output, got {kind!r}", 400)
    subfolder = str(form.get("subfolder") or "")
    name = Path(filename or "image.png").name
    if name in ("", "."):
        raise BadRequest(f"the uploaded file's name {filename!r} names no file", 400)
    relative = f"{subfolder}/{name}" if subfolder else name
    target = _inside(state.upload_dirs[kind], relative)
    if target is None:
        raise BadRequest(f"the file name or subfolder leaves the {kind} folder", 400)
    if target.is_dir() or any(p.exists() and not p.is_dir() for p in target.parents):
        # ComfyUI's makedirs / open() of such a path fails (a 500); here the rename left a partial file
        raise BadRequest(f"{relative!r} cannot be a file of the {kind} folder: it is a folder, or under a file",
                         400)
    overwrite = str(form.get("overwrite") or "").lower() in ("true", "1")
    target = await anyio.to_thread.run_sync(_write_upload, target, raw, overwrite)
    return JSONResponse({"name": target.name, "subfolder": subfolder, "type": kind})


def _original_ref(state: ComfyState, given: Any) -> Path:
    """The file of the picture a mask upload's `original_ref` names (ComfyUI's upload_mask: JSON {filename,
    subfolder?, type?}, the type output where neither it nor the filename's annotation says); a 400 where it is
    malformed or names no picture."""
    try:
        ref = json.loads(given) if isinstance(given, str) else None
    except ValueError:
        ref = None
    if not isinstance(ref, dict) or not isinstance(ref.get("filename"), str) or not ref["filename"]:
        raise BadRequest('original_ref must be the JSON {"filename": ..., "subfolder": ..., "type": ...} of the '
                         "picture the mask is for", 400)
    kind, file = _annotated_or(ref["filename"], str(ref.get("type") or "output"))
    path = state.picture_file(kind, file, str(ref.get("subfolder") or ""))
    if path is None:
        raise BadRequest(f"original_ref names no picture: {ref['filename']!r} (type {kind!r}) is not there", 400)
    return path


def _with_mask_alpha(original: Path, mask: bytes, limits: Any) -> bytes:
    """The picture `original` as RGBA with the alpha of the picture `mask` (ComfyUI's upload_mask: both converted
    to RGBA, `putalpha` of the mask's A), as a PNG keeping the original's text chunks."""
    with opened_picture(original.read_bytes(), "original_ref", limits) as picture:
        text = dict(getattr(picture, "text", {}) or {})
        merged = picture.convert("RGBA")
    with opened_picture(mask, "image", limits) as picture:
        alpha = picture.convert("RGBA").getchannel("A")
    if alpha.size != merged.size:
        raise BadRequest(f"the mask is {alpha.size[0]}x{alpha.size[1]} px, the picture original_ref names "
                         f"{merged.size[0]}x{merged.size[1]}", 400)
    merged.putalpha(alpha)
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    data = io.BytesIO()
    merged.save(data, format="PNG", compress_level=4, pnginfo=info)
    return data.getvalue()


def _write_upload(target: Path, raw: bytes, overwrite: bool) -> Path:
    """Write `raw` to `target` (or the first free "stem (n)" beside it) whole: a partial file renamed into place. A
    file of that name holding the same bytes is the upload, not written again (ComfyUI's `compare_image_hash`, its
    fix of duplicates: a client uploading one picture for each prompt leaves one file)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    stem, suffix, n = target.stem, target.suffix, 1
    while target.exists() and not overwrite:
        if target.is_file() and target.read_bytes() == raw:
            return target
        target = target.with_name(f"{stem} ({n}){suffix}")
        n += 1
    partial = target.with_name(f".{target.name}.part")
    partial.write_bytes(raw)
    os.replace(partial, target)
    return target


@router.post("/free")
async def free(request: Request) -> Response:
    """ComfyUI's `post_free`: a true `unload_models` or `free_memory` lets the model go (`ModelHost.unload`, A1111's
    unload-checkpoint: the next prompt loads it again) once the prompt drawing now ends; the answer does not wait
    for it, as ComfyUI's queue flags act between prompts. ComfyUI sets each flag only where it is true and its
    main.py unloads on `flags.get("unload_models", free_memory)`, so {unload_models: false, free_memory: true}
    unloads there too. sdlab keeps no node outputs, so `free_memory` has nothing else to free."""
    state, body = state_of(request), await _json_object(request)
    if body.get("unload_models") or body.get("free_memory"):
        host = state.service.host
        task = asyncio.get_running_loop().create_task(asyncio.to_thread(host.between_jobs, host.unload))
        state.tasks.add(task)
        task.add_done_callback(state.tasks.discard)
    return Response(status_code=200)


@router.get("/object_info")
def get_object_info(request: Request) -> dict[str, Any]:
    return object_info(state_of(request).choices())


@router.get("/object_info/{node_class}")
def get_object_info_of(node_class: str, request: Request) -> dict[str, Any]:
    return object_info(state_of(request).choices(), node_class)


@router.get("/models")
def model_folders(request: Request) -> list[str]:
    """ComfyUI's model folder names (server.py ``list_model_types``): those whose files sdlab lists."""
    return list(MODEL_FOLDERS)


@router.get("/models/{folder}")
def model_files(folder: str, request: Request) -> list[str]:
    """The files of a model folder as ComfyUI's ``get_models`` lists them (the names its nodes take: a checkpoint's
    path under the models folder, a LoRA's file name, ...); a folder sdlab does not list, a 404 as ComfyUI's."""
    if folder not in MODEL_FOLDERS:
        raise BadRequest(f"no model folder {folder!r}: sdlab lists {', '.join(MODEL_FOLDERS)}", 404)
    state = state_of(request)
    if folder == "embeddings":      # the files' paths under the folder, as `embedding:` names them, and suffixes
        found = state.service.host.listed_embeddings()
        return sorted(f"{e.path_in_folder or e.name}{e.path.suffix}" for e in found.loaded)
    return state.choices().of(MODEL_FOLDERS[folder])


@router.get("/embeddings")
def embeddings(request: Request) -> list[str]:
    """ComfyUI's embedding names (server.py ``get_embeddings``: the folder's files without their suffixes), each
    the path under its folder that `embedding:` takes ("styles/ink"), of the embeddings the loaded model draws."""
    found = state_of(request).service.host.listed_embeddings()
    return sorted(e.path_in_folder or e.name for e in found.loaded)


@router.get("/system_stats")
def system_stats(request: Request) -> dict[str, Any]:
    import torch

    from sdlab import __version__

    device = str(state_of(request).service.config.device)
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        ram_total, ram_free = page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")
    except (OSError, ValueError):
        ram_total = ram_free = 0
    vram_total = vram_free = 0
    if device.startswith("cuda") and torch.cuda.is_available():
        vram_free, vram_total = torch.cuda.mem_get_info(device)
    return {"system": {"os": os.name, "ram_total": ram_total, "ram_free": ram_free,
                       "comfyui_version": f"sdlab {__version__}", "python_version": sys.version,
                       "pytorch_version": torch.__version__, "embedded_python": False, "argv": sys.argv,
                       "platform": platform.platform()},
            "devices": [{"name": device, "type": device.split(":")[0], "index": 0 if ":" not in device else
                         int(device.split(":")[1]), "vram_total": vram_total, "vram_free": vram_free,
                         "torch_vram_total": vram_total, "torch_vram_free": vram_free}]}
