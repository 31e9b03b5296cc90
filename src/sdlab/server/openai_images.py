"""OpenAI's images API on `sdlab serve`, for the clients that speak it (the `openai` Python package, Open WebUI's
"openai" image engine, the AI SDK), beside A1111's and the native one:

    POST /v1/images/generations   JSON {prompt, model?, n, size, response_format, output_format, seed, ...}
                                  -> {created, data: [{b64_json} | {url}], output_format, size}
    POST /v1/images/edits         multipart: image (PNG, JPEG, WebP; several: image[]), mask? (PNG,
                                  transparent = repaint), prompt, n, size, ... -> the same answer; img2img, or
                                  inpaint with a mask (or the image's transparency); or JSON: images
                                  [{image_url}], mask? {image_url}, each a data: URL of an image/png,
                                  image/jpeg or image/webp (a mask's image/png) (`json_edit`)
    with `stream: true`           Server-Sent Events instead: `partial_images` (0..3) `*.partial_image` events,
                                  the job's step previews, then one `*.completed` event per picture (openai_stream)
    GET  /v1/models               {object: "list", data: [{id, object: "model", created, owned_by}]}
    GET  /v1/models/{id}          one of them

A request becomes a native job (`native.job_spec`: the native API's defaults, checks and preset) queued by
`Service.submit`, so its pictures are the native route's for the same seed, written with their infotext. Errors
answer in OpenAI's shape `{"error": {message, type, param, code}}` (`error_body`; app.py's handlers call it for
every path under `/v1/`). A dall-e-3 request's pictures carry OpenAI's `revised_prompt`: the prompt as drawn.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request
from PIL import Image, ImageOps
from pydantic import ConfigDict, ValidationError
from starlette.datastructures import UploadFile

from sdlab.pipeline.images import open_image, upright_8bit
from sdlab.pipeline.png_info import ParametersError, encode_image
from sdlab.pipeline.request import SIZE_MULTIPLE
from sdlab.server.config import Limits
from sdlab.server.inputs import BadRequest, NullsAreDefaults, opened_picture, read_json
from sdlab.server.jobs import Job, Unavailable, image_url
from sdlab.server.native import JobIn, job_spec, service_of
from sdlab.server.openai_stream import DISCONNECT_POLL_S, PARTIAL_IMAGES, JobEventsResponse, event_stream
from sdlab.server.registry import Checkpoint
from sdlab.server.service import Service
from sdlab.server.store import INTERRUPTED_ERROR

router = APIRouter(prefix="/v1")
PREFIX = "/v1/"
MAX_N = 10                                  # OpenAI's bound of `n`
OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
RESPONSE_FORMATS = ("b64_json", "url")
OWNER = "sdlab"


class ImagesError(BadRequest):
    """A refusal naming the request field it concerns (`param`) and OpenAI's error `code`, where there is one."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message, status)
        self.param = param
        self.code = code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error answer: `type` invalid_request_error for a refusal, server_error for a fault of the server."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_status(status: int) -> int:
    """The status OpenAI answers for sdlab's: a refused body is a 400 there (OpenAI answers no 422)."""
    return 400 if status == 422 else status


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """(message, param) of pydantic's errors as OpenAI words them: an unknown field is an "Unrecognized request
    argument", a missing one a "Missing required parameter"; the first error's field is the `param`."""
    first = errors[0] if errors else {}
    where = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = where[0] if where else None
    if first.get("type") == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}", param
    if first.get("type") == "missing":
        return f"Missing required parameter: '{param}'.", param
    if first.get("type") == "json_invalid" or param is None:
        return "We could not parse the JSON body of your request: " + first.get("msg", "invalid body"), None
    return f"Invalid '{param}': {first.get('msg', 'invalid value')}", param


class GenerationIn(NullsAreDefaults):
    """`POST /v1/images/generations`' body: OpenAI's fields, and the extensions LlamaEdge's sd-api-server documents
    that map onto a native job: `seed`, `negative_prompt`, `cfg_scale`, `steps`, `sample_method` (its
    stable-diffusion.cpp sampler names, `SAMPLE_METHODS`, or any of sdlab's), `width` / `height` (read where
    `size` is unset, as LlamaEdge ignores them beside a size). `quality`, `style`, `user` and `moderation` are
    taken and not read."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    prompt: str
    model: str | None = None
    n: int | None = None                    # unset: 1, an edit's one picture per image
    size: str = "auto"
    response_format: str = "b64_json"
    output_format: str = "png"
    output_compression: int = 100           # JPEG / WebP quality, 0..100
    background: str = "auto"
    quality: str | None = None
    style: str | None = None
    user: str | None = None
    moderation: str | None = None
    stream: bool = False
    partial_images: int = 0
    seed: int = -1                          # LlamaEdge's: -1 random; picture i draws seed + i
    negative_prompt: str = ""               # LlamaEdge's, and cfg_scale, steps, sample_method, width, height
    cfg_scale: float | None = None          # None: the native job's (the model's preset)
    steps: int | None = None
    sample_method: str | None = None
    width: int | None = None
    height: int | None = None


class EditIn(GenerationIn):
    """`POST /v1/images/edits`' text fields (its pictures are the form's files); `input_fidelity` is not read."""

    input_fidelity: str | None = None
    strength: float | None = None           # LlamaEdge's: img2img's denoising strength (None: the native 0.75)


def _checked(body: GenerationIn) -> tuple[int | None, int | None]:
    """The (width, height) of `body.size` (None, None for "auto": the model's size, an edit's picture's), once its
    options are ones sdlab draws; else `ImagesError` naming the field."""
    if not body.prompt.strip():
        raise ImagesError("Invalid 'prompt': the prompt is empty.", param="prompt")
    if not 1 <= body.n <= MAX_N:
        raise ImagesError(f"Invalid 'n': {body.n} is not in 1..{MAX_N}.", param="n")
    if body.response_format not in RESPONSE_FORMATS:
        raise ImagesError(f"Invalid 'response_format': {body.response_format!r}; use 'b64_json' or 'url'.",
                          param="response_format")
    if body.output_format not in OUTPUT_FORMATS:
        raise ImagesError(f"Invalid 'output_format': {body.output_format!r}; use 'png', 'jpeg' or 'webp'.",
                          param="output_format")
    if body.response_format == "url" and body.output_format != "png":
        raise ImagesError("'output_format' jpeg and webp are answered as b64_json only: a 'url' names the PNG the "
                          "server keeps.", param="output_format")
    if not 0 <= body.output_compression <= 100:
        raise ImagesError(f"Invalid 'output_compression': {body.output_compression} is not in 0..100.",
                          param="output_compression")
    if body.background not in ("auto", "opaque"):
        raise ImagesError(f"Invalid 'background': {body.background!r}; sdlab draws 'opaque' pictures ('auto').",
                          param="background")
    if not 0 <= body.partial_images <= PARTIAL_IMAGES:
        raise ImagesError(f"Invalid 'partial_images': {body.partial_images} is not in 0..{PARTIAL_IMAGES}.",
                          param="partial_images")
    if body.partial_images and not body.stream:
        raise ImagesError("'partial_images' is read with 'stream': true only.", param="partial_images")
    if body.stream and body.response_format == "url":
        raise ImagesError("A stream's pictures are b64_json events: 'response_format' 'url' is not taken with "
                          "'stream'.", param="response_format")
    if body.size != "auto":
        return _size(body.size)
    for side in ("width", "height"):
        value = getattr(body, side)
        if value is not None and (value < SIZE_MULTIPLE or value % SIZE_MULTIPLE):
            raise ImagesError(f"Invalid '{side}': {value}; a multiple of {SIZE_MULTIPLE} from {SIZE_MULTIPLE} on.",
                              param=side)
    return body.width, body.height


# LlamaEdge's `sample_method` values (stable-diffusion.cpp's sampler names) as sdlab's sampler table names them;
# sd.cpp's dpm++2mv2, its own variant of DPM++ 2M, has no row there and is refused by name
SAMPLE_METHODS = {"euler_a": "euler_ancestral", "dpm++2s_a": "dpmpp_2s_ancestral", "dpm++2m": "dpmpp_2m"}


def sampler_name(sample_method: str | None) -> str | None:
    """sdlab's sampler for a `sample_method` (None: the native job's); `euler`, `heun`, `dpm2`, `ipndm`,
    `ipndm_v` and `lcm` are names sdlab's table has as they are."""
    if sample_method == "dpm++2mv2":
        raise ImagesError("Invalid 'sample_method': 'dpm++2mv2' (stable-diffusion.cpp's own DPM++ 2M variant) is "
                          "not one of sdlab's samplers; 'dpm++2m' is.", param="sample_method")
    return SAMPLE_METHODS.get(sample_method, sample_method) if sample_method else None


def _size(size: str) -> tuple[int | None, int | None]:
    if size == "auto":
        return None, None
    width, sep, height = size.partition("x")
    if not (sep and width.isdigit() and height.isdigit()):
        raise ImagesError(f"Invalid 'size': {size!r}; use 'WIDTHxHEIGHT' (e.g. '512x512') or 'auto'.", param="size")
    w, h = int(width), int(height)
    if w < SIZE_MULTIPLE or h < SIZE_MULTIPLE or w % SIZE_MULTIPLE or h % SIZE_MULTIPLE:
        raise ImagesError(f"Invalid 'size': {size!r}; each side is a multiple of {SIZE_MULTIPLE} from "
                          f"{SIZE_MULTIPLE} on.", param="size")
    return w, h


OPENAI_MODELS = ("dall-e-2", "dall-e-3", "gpt-image-1", "gpt-image-1-mini")   # the `openai` package's ImageModel


def sdlab_model(name: str | None) -> str | None:
    """The checkpoint name a request's `model` asks for: OpenAI's own model names (Open WebUI's openai engine sends
    dall-e-2 unless set) and an empty one mean the selected model (None); any other name as it is."""
    return None if name is None or name == "" or name in OPENAI_MODELS else name


def _checkpoint(service: Service, name: str | None) -> Checkpoint:
    """The model `name` asks for (none: the selected one); an unknown one OpenAI's 404 `model_not_found`."""
    try:
        return service.checkpoint(name)
    except BadRequest as err:
        raise ImagesError(f"The model {name!r} does not exist on this server; GET /v1/models lists them.",
                          err.status, "model", "model_not_found") from None


async def _submitted(service: Service, body: GenerationIn, pictures: list[Image.Image],
                     mask: Image.Image | None, images_param: str = "image") -> Job:
    """The queued job of `body` (an edit's init `pictures`, its field `images_param`: a multipart edit's image, a
    JSON one's images; and sdlab `mask`, white = repaint), once its fields are checked (a refusal `ImagesError`)."""
    n = body.n if body.n is not None else max(len(pictures), 1)        # unset: one picture per image
    body = body.model_copy(update={"model": sdlab_model(body.model), "n": n})
    width, height = _checked(body)
    _checkpoint(service, body.model)
    mode = "txt2img" if not pictures else "inpaint" if mask is not None else "img2img"
    if len(pictures) > body.n:
        raise ImagesError(f"{len(pictures)} images for n = {body.n} pictures: picture i starts from image i % "
                          "count, so send at most n images.", param=images_param)
    batch_size, batch_count = batches(body.n, service.config.limits.max_batch, max(len(pictures), 1))
    job_in = JobIn(mode=mode, model=body.model, prompt=body.prompt, negative_prompt=body.negative_prompt,
                   seed=body.seed, width=width, height=height, batch_size=batch_size, batch_count=batch_count,
                   steps=body.steps, cfg_scale=body.cfg_scale, sampler=sampler_name(body.sample_method),
                   strength=getattr(body, "strength", None))
    spec = job_spec(service, job_in, pictures[0] if pictures else None, mask)
    if len(pictures) > 1:
        spec = replace(spec, request=replace(spec.request, init_images=tuple(pictures)))
    job, _ = await asyncio.to_thread(service.submit, spec, mode, body.model)
    return job


def job_error(job: Job) -> ImagesError | Unavailable | None:
    """The refusal of an ended job that drew no picture (None: it drew); its status is OpenAI's for it."""
    if job.status == "interrupted":
        return Unavailable(job.error or INTERRUPTED_ERROR)
    if job.status == "failed":
        return ImagesError(job.error or "failed", 500 if job.server_fault else 400)
    if not job.images:                      # cancelled before its first picture
        return ImagesError("the job was cancelled before it drew a picture", 503)
    return None


def stream_error(job: Job) -> dict[str, Any] | None:
    """OpenAI's error body for an ended job that drew no picture (None: it drew), as a stream's `error` event
    sends it."""
    error = job_error(job)
    if isinstance(error, Unavailable):
        return error_body(503, str(error))
    return None if error is None else error_body(error.status, error.message, error.param, error.code)


async def _drawn(service: Service, request: Request, body: GenerationIn, pictures: list[Image.Image],
                 mask: Image.Image | None, images_param: str) -> Job:
    """The job of `body` once it ended; one that drew nothing its refusal (`job_error`)."""
    job = await _submitted(service, body, pictures, mask, images_param)
    await _until_finished(service, job, request)
    error = job_error(job)
    if error is not None:
        raise error
    return job


async def _answered(service: Service, request: Request, body: GenerationIn, pictures: list[Image.Image],
                    mask: Image.Image | None, kind: str, images_param: str = "image") -> Any:
    """The route's answer: the ended job's pictures as one JSON answer, or with `stream` the events of the job
    (`kind` image_generation / image_edit) as it draws."""
    if not body.stream:
        job = await _drawn(service, request, body, pictures, mask, images_param)
        return await asyncio.to_thread(_answer, service, body, job, _base_url(request))
    job = await _submitted(service, body, pictures, mask, images_param)

    def completed() -> list[tuple[bytes, str]]:
        return [(data, size) for data, size, _ in _pictures(service, body, job)]

    return JobEventsResponse(service, job, event_stream(request, job, kind, _stream_fields(body),
                                                        body.partial_images, completed, stream_error))


def _stream_fields(body: GenerationIn) -> dict[str, Any]:
    """The request's settings each stream event repeats: OpenAI's `quality`, `background`, `output_format`, and
    the encoder's quality for JPEG / WebP."""
    return {"quality": body.quality or "auto", "background": body.background, "output_format": body.output_format,
            "pillow_format": OUTPUT_FORMATS[body.output_format], "compression": body.output_compression}


def batches(n: int, max_batch: int, images: int) -> tuple[int, int]:
    """(batch_size, batch_count) drawing `n` pictures: one batch where `max_batch` allows, else the largest batch
    size that divides n (10 at --max-batch 8: 2 batches of 5), the native job of that batch count (picture i draws
    seed + i either way). With several images (picture i from image i % images, each batch starting again from
    image 0) the batch size is a multiple of their count; none fits: `ImagesError`."""
    for size in range(min(n, max_batch), 0, -1):
        if n % size == 0 and (size % images == 0 or size == n):
            return size, n // size
    raise ImagesError(f"n = {n} pictures from {images} images cannot be split into batches of at most {max_batch} "
                      "(--max-batch) that each start from the first image: ask for fewer pictures.", param="n")


async def _until_finished(service: Service, job: Job, request: Request) -> None:
    """Wait for the job's final event; cancelled (the server stops while it waits) a 503. A client that gives up
    (disconnects, or its timeout closes the connection) cancels its job as the native `DELETE /api/jobs/ID` does:
    a queued one is removed, a running one stops at its next step (so the `openai` package's retries after a
    timeout do not leave copies drawing)."""
    queue = job.subscribe(asyncio.get_running_loop(), steps=False)
    try:
        while True:
            try:
                event = await asyncio.wait_for(queue.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    await asyncio.to_thread(service.queue.cancel, job)
                    raise Unavailable("the client disconnected; its job was cancelled") from None
                continue
            if event[0] in ("done", "failed", "cancelled"):
                return
    except asyncio.CancelledError:
        raise Unavailable(INTERRUPTED_ERROR) from None
    finally:
        job.unsubscribe(queue)


REVISING_MODELS = ("dall-e-3",)            # the models whose pictures OpenAI answers with their `revised_prompt`


def _answer(service: Service, body: GenerationIn, job: Job, base_url: str) -> dict[str, Any]:
    """OpenAI's answer: each picture as `url` (the server's `/api/images/NAME`, the PNG it keeps) or `b64_json`
    (`_pictures`); asked of dall-e-3, each with its `revised_prompt` (OpenAI's rewrite of the prompt, which it
    drew; sdlab draws the prompt as given, so it is that prompt)."""
    pictures = _pictures(service, body, job)
    data: list[dict[str, Any]] = [{"url": base_url + image_url(name)} if raw is None else {"b64_json": _b64(raw)}
                                  for raw, _, name in pictures]
    if body.model in REVISING_MODELS:
        for item in data:
            item["revised_prompt"] = body.prompt
    return {"created": int(time.time()), "data": data, "output_format": body.output_format,
            "size": pictures[-1][1]}


def _pictures(service: Service, body: GenerationIn, job: Job) -> list[tuple[bytes | None, str, str]]:
    """Each picture of the ended job as (its file in `output_format`: the PNG as written, with its `parameters`,
    or a JPEG / WebP with them in its EXIF UserComment; None for a `url` answer, "WxH", its name)."""
    pictures = []
    for name, text in zip(job.images, job.infotexts):
        path = service.images_dir / name
        with open_image(path) as image:
            size = f"{image.width}x{image.height}"
            if body.response_format == "url":
                raw = None
            elif body.output_format == "png":
                raw = path.read_bytes()
            else:
                raw = _encoded(image, OUTPUT_FORMATS[body.output_format], text, body.output_compression)
        pictures.append((raw, size, name))
    return pictures


def _encoded(image: Image.Image, fmt: str, parameters: str, quality: int) -> bytes:
    try:
        return encode_image(image, fmt, parameters, quality=quality)
    except ParametersError:                 # past a JPEG's EXIF block: the PNG kept has the text
        return encode_image(image, fmt, None, quality=quality)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


@router.post("/images/generations")
async def generations(body: GenerationIn, request: Request) -> Any:
    return await _answered(service_of(request), request, body, [], None, "image_generation")


PICTURE_FIELDS = ("image", "image[]", "mask")
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")     # an edit's images (gpt-image-1's png, jpg, webp); its mask a PNG
DATA_URL_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}   # a data: URL's, as Pillow's


@router.post("/images/edits")
async def edits(request: Request) -> Any:
    service = service_of(request)
    content_type = request.headers.get("content-type", "").lower()
    if content_type.startswith("multipart/form-data"):
        body, images, masks = await multipart_edit(request)
        param = "image"
    elif content_type.startswith("application/json"):        # parsed and decoded off the event loop
        body, images, masks = await asyncio.to_thread(json_edit, await request.body())
        param = "images"
    else:
        raise ImagesError("Edits take a multipart/form-data body (the image files and the fields), or a JSON one "
                          "(its 'images' data: URLs).")
    if not images:
        raise ImagesError("Missing required parameter: 'image' (a PNG, JPEG or WebP file).", param="image")
    if len(masks) > 1:
        raise ImagesError("Invalid 'mask': send one mask.", param="mask")
    limits = service.config.limits
    pictures = [await asyncio.to_thread(png_picture, raw, f"{param}[{i}]", param, limits, declared)
                for i, (raw, declared) in enumerate(images)]
    mask = None
    if masks:
        mask_raw, mask_declared = masks[0]
        openai_mask = await asyncio.to_thread(png_picture, mask_raw, "mask", "mask", limits, mask_declared)
        if openai_mask.size != pictures[0].size:
            raise ImagesError(f"Invalid 'mask': it is {openai_mask.width}x{openai_mask.height}, the image "
                              f"{pictures[0].width}x{pictures[0].height}; they must be the same size.", param="mask")
        mask = repaint_mask(openai_mask)
    elif has_transparency(pictures[0]):     # OpenAI: without a mask the image's transparency is the mask
        mask = repaint_mask(pictures[0])
    return await _answered(service, request, body, pictures, mask, "image_edit", param)


Upload = tuple[bytes, str | None]           # a picture file sent and the Pillow format its data: URL says (None: any)


async def multipart_edit(request: Request) -> tuple[EditIn, list[Upload], list[Upload]]:
    """A multipart edit's (fields, image files, mask files)."""
    try:
        form = await request.form()
    except Exception as err:            # a malformed multipart body
        raise ImagesError(f"The multipart body could not be read: {err}") from None
    try:
        files: dict[str, list[bytes]] = {}
        fields: dict[str, str] = {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key not in PICTURE_FIELDS:
                    raise ImagesError(f"Unrecognized file field supplied: {key}", param=key)
                files.setdefault(key, []).append(await value.read())
            elif key in PICTURE_FIELDS:
                raise ImagesError(f"Invalid '{key}': send it as a file, not as text.", param=key)
            else:
                fields[key] = value
    finally:
        await form.close()
    images, masks = files.get("image", []) + files.get("image[]", []), files.get("mask", [])
    return edit_fields(fields), [(raw, None) for raw in images], [(raw, None) for raw in masks]


def edit_fields(fields: dict[str, Any]) -> EditIn:
    try:
        return EditIn.model_validate(fields)
    except ValidationError as err:
        message, param = validation_message(err.errors())
        raise ImagesError(message, param=param) from None


def json_edit(raw: bytes) -> tuple[EditIn, list[Upload], list[Upload]]:
    """A JSON edit's (fields, image files, mask files): OpenAI's JSON edit body, `images` a list of image
    references `{"image_url": URL}` (or `{"file_id": ID}`) and `mask` one, beside the multipart edit's fields.
    Only a data: URL's picture is taken (`data_url_bytes`): the server fetches nothing."""
    try:
        fields = read_json(raw)
    except ValueError as err:
        raise ImagesError(f"We could not parse the JSON body of your request: {err}") from None
    if not isinstance(fields, dict):
        raise ImagesError("We could not parse the JSON body of your request: it is not an object of fields.")
    if "image" in fields:
        raise ImagesError("Invalid 'image': a JSON edit's pictures are its 'images', [{\"image_url\": \"data:...\"}]; "
                          "'image' files are a multipart edit's.", param="image")
    refs = fields.pop("images", None)
    if refs is None:
        raise ImagesError("Missing required parameter: 'images'.", param="images")
    if not isinstance(refs, list) or not refs:
        raise ImagesError("Invalid 'images': a list of image references, [{\"image_url\": \"data:...\"}].",
                          param="images")
    mask = fields.pop("mask", None)
    body = edit_fields(fields)
    images = [data_url_bytes(ref, f"images[{i}]", "images") for i, ref in enumerate(refs)]
    return body, images, [] if mask is None else [data_url_bytes(mask, "mask", "mask")]


def data_url_bytes(ref: Any, what: str, param: str) -> Upload:
    """The bytes of an image reference `{"image_url": "data:TYPE;base64,DATA"}` and the Pillow format of its TYPE
    (image/png, image/jpeg or image/webp, a mask's image/png: what the multipart edit takes); another TYPE, a remote
    URL (the server reaches no network), a `file_id` (OpenAI's Files API, not served here) or a malformed one
    `ImagesError`."""
    if not (isinstance(ref, dict) and len(ref) == 1 and set(ref) <= {"image_url", "file_id"}):
        raise ImagesError(f"Invalid '{what}': an image reference is {{\"image_url\": \"data:...\"}}.", param=param)
    if "file_id" in ref:
        raise ImagesError(f"Invalid '{what}': a 'file_id' names a file of OpenAI's Files API, which this server does "
                          "not keep; send the picture as an 'image_url' data: URL.", param=param)
    url = ref["image_url"]
    if not isinstance(url, str):
        raise ImagesError(f"Invalid '{what}': its 'image_url' is a string, the data: URL itself "
                          f"({{\"image_url\": \"data:image/png;base64,...\"}}), not {_json_kind(url)}.", param=param)
    if not url[:5].lower() == "data:":
        raise ImagesError(f"Invalid '{what}': only data: URLs (data:image/png;base64,...) are taken; this server "
                          "does not fetch remote URLs.", param=param)
    header, comma, payload = url.partition(",")
    if not (comma and header.lower().endswith(";base64")):
        raise ImagesError(f"Invalid '{what}': its data: URL is not base64 (data:image/png;base64,...).", param=param)
    mime = header[5:].partition(";")[0].strip().lower()
    types = ("image/png",) if param == "mask" else tuple(DATA_URL_TYPES)
    if mime not in types:
        kinds = "a PNG (image/png)" if param == "mask" else "image/png, image/jpeg or image/webp"
        said = f"has the type {mime!r}" if mime else "has no type"
        raise ImagesError(f"Invalid '{what}': its data: URL {said}; it must be {kinds}.", param=param)
    try:
        return base64.b64decode("".join(payload.split()), validate=True), DATA_URL_TYPES[mime]
    except (binascii.Error, ValueError):
        raise ImagesError(f"Invalid '{what}': its data: URL's base64 is malformed.", param=param) from None


def _json_kind(value: Any) -> str:
    """How JSON names a value's kind: an object, a list, a number, ..."""
    kinds = {dict: "an object", list: "a list", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else kinds.get(type(value), "a " + type(value).__name__)


def png_picture(raw: bytes, what: str, param: str, limits: Limits, declared: str | None = None) -> Image.Image:
    """A PNG file's picture (for an image also a JPEG or WebP, as gpt-image-1 takes; of a data: URL the format its
    type says, `declared`), upright and in 8 bits (`upright_8bit`, as every door reads pictures); another format or
    no picture `ImagesError` naming `param`; past the server's pixel limit a 413 (`opened_picture`)."""
    try:
        with opened_picture(raw, what, limits) as image:
            formats = (declared,) if declared else ("PNG",) if param == "mask" else IMAGE_FORMATS
            if image.format not in formats:
                said = f" (its data: URL says {declared})" if declared else ""
                raise ImagesError(f"Invalid '{param}': {what} is a {image.format} file{said}; it must be a "
                                  f"{' or '.join(formats)}.", param=param)
            image.load()
            return upright_8bit(image)
    except ImagesError:
        raise
    except BadRequest as err:
        raise ImagesError(f"Invalid '{param}': {err.message}", err.status, param) from None


def has_transparency(image: Image.Image) -> bool:
    """Whether a picture has a pixel that is not fully opaque (an alpha channel, or a palette / colour key
    transparency)."""
    if "transparency" in image.info:
        image = image.convert("RGBA")
    return "A" in image.getbands() and image.getchannel("A").getextrema()[0] < 255


def repaint_mask(mask: Image.Image) -> Image.Image:
    """OpenAI's mask (its alpha: fully transparent = repaint, opaque = keep) as sdlab's ("L", white = repaint):
    255 - alpha, so a partly transparent pixel is a partial mask value, as a grey one of a native mask. A mask
    without transparency is refused: it would say nothing."""
    if mask.mode in ("P", "RGB", "L") and "transparency" in mask.info:
        mask = mask.convert("RGBA")
    if "A" not in mask.getbands():
        raise ImagesError("Invalid 'mask': it has no alpha channel; its fully transparent pixels say where the "
                          "image is repainted.", param="mask")
    return ImageOps.invert(mask.getchannel("A"))          # (H, W) uint8: 255 where alpha 0


def model_entry(checkpoint: Checkpoint) -> dict[str, Any]:
    """A checkpoint as OpenAI lists a model: its `id` the name a request gives as `model` (its path under the
    models folder, `/sdapi/v1/sd-models`' `name`; its title, file name or hash name it too), `created` its file's
    modification time."""
    try:
        created = int(checkpoint.path.stat().st_mtime)
    except OSError:
        created = 0
    return {"id": checkpoint.name, "object": "model", "created": created, "owned_by": OWNER}


@router.get("/models")
def models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [model_entry(c) for c in service_of(request).registry.checkpoints]}


@router.get("/models/{model_id:path}")
def model(model_id: str, request: Request) -> dict[str, Any]:
    return model_entry(_checkpoint(service_of(request), model_id))
