"""What the worker thread does with one job: load the model it names (with its LoRAs), draw with
per-step previews and cancellation, and write the pictures as `sdlab txt2img` writes them. The settings
a client left unset come from the preset the model names, if any, then from the model's family
(`_take_model_defaults`).

`ModelHost` keeps one model loaded (the worker thread alone touches it), and the SDXL refiner of the
job's pair beside it. A job with another checkpoint or another set of `loras` entries reloads it: LoRAs are
merged into the weights, so a different set needs fresh weights. A job that draws it with another VAE
(`VaeChoice`: the sidecar beside it, a file of the server's VAE list, or its own) has that VAE alone read into the
loaded model (`Pipeline.with_vae`, as `load` would load it with that VAE). The prompt's `<lora:...>` tags are the
pipeline's, as in `sdlab txt2img`: merged for the run at their text-encoder and U-Net weights, the model's
own weights back after it (`Pipeline.run`), found among the server's LoRAs (`ModelHost.lora_file`); their
merged tensors are let go after the job (`ModelHost.forget_tag_loras`), the files read once nothing is queued or
running (`JobQueue.release_if_idle`): a queued job's files, read when it was submitted, are not read again. A job
with another refiner, or none, lets the held one go first, and so does a reload of the base (the refiner
takes the base's device, dtype and embeddings), so at most a base model and a refiner are in memory. A hires upscaler named from
`--upscalers-dir` is read from its file for the run only; the job and the pictures name it as the server
lists it. The pictures carry the same `parameters` text as the
CLI's (model name and hash, LoRA tags and hashes), are written batch by batch as each is drawn (A1111's
n_iter), each batch all or nothing, and are named `<job id>-<index>.png` in `<output>/images/`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from sdlab.api import Pipeline, load, load_refiner
from sdlab.checkpoints.embeddings import (Embedding, FoundEmbeddings, embedding_files, find_embeddings,
                                          install_fitting_embeddings, load_embedding)
from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.sidecar import vae_beside
from sdlab.checkpoints.upscaler import Upscaler
from sdlab.diffusion.steps import StepInfo
from sdlab.families.loaded import ModelBundle
from sdlab.pipeline.comfy_image_upscale import comfy_pictures
from sdlab.pipeline.generate import ProgressFn, SamplingStopped
from sdlab.pipeline.image_prompt import forget_image_prompt_models
from sdlab.pipeline.images import pil_to_unit_tensor
from sdlab.pipeline.infotext import LoraRef, RefinerRef, to_parameters
from sdlab.pipeline.plan import GenerationPlan
from sdlab.pipeline.png_info import embedding_hash, encode_image, format_parameters, vae_ref, write_files_all_or_nothing
from sdlab.pipeline.prompt_loras import patcher_for
from sdlab.pipeline.request import GenerationRequest, GenerationResult, RequestError, next_batch
from sdlab.server.config import Limits
from sdlab.server.inputs import (
    HIRES_UPSCALER, PICTURE_UPSCALER, BadRequest, JobSpec, LoraChoice, RefinerChoice, check_request, load_upscaler_file, upscaler_file, with_preset, with_upscaler_file,
    hires_upscaler_name, load_failure, without_paths,
)
from sdlab.server.jobs import Job, JobCancelled, ServerFault
from sdlab.server.model_folders import ModelFile, ModelFolder
from sdlab.server.previews import LatentPreviewer
from sdlab.server.registry import Checkpoint, ModelRegistry
from sdlab.server.vae_files import VaeChoice, vae_to_load
from sdlab.utils.allocator import trim
from sdlab.utils.file_hashes import file_version
from sdlab.utils.threads import use_threads_for

logger = logging.getLogger("sdlab.server")


class ModelHost:
    """The loaded pipeline (one at a time) and its previewer; `selected` is the model new jobs get."""

    def __init__(self, registry: ModelRegistry, device: str, embeddings_dir: Path | None = None) -> None:
        self.registry = registry
        self.device = device
        self.embeddings = [embeddings_dir] if embeddings_dir is not None else []
        self.selected: Checkpoint = registry.default
        self._key: tuple | None = None
        self._vae_key: tuple | None = None         # `load`'s (vae, sidecar_vae) the loaded model was drawn with,
                                                   # and the version of the VAE file read (`_vae_version`)
        self.pipe: Pipeline | None = None
        self._embeddings_version: tuple | None = None   # the embedding files (`_embedding_files`) installed in `pipe`
        self._embedding_reads: dict[tuple, Embedding] = {}   # by (path, file version): a file is read once
        self._reads_lock = threading.Lock()     # `_embedding_reads`: the worker and GET embeddings both read files
        self._refiner_key: tuple | None = None
        self._refiner: ModelBundle | None = None
        self.previewer: LatentPreviewer | None = None
        self.loading = threading.Event()
        self.timings: dict[str, float] = {}
        self.busy = threading.Lock()            # held by whatever uses the device: a job, an extras upscale

    def loaded_bundle(self, checkpoint: Checkpoint) -> ModelBundle | None:
        """The model of ``checkpoint`` when it is the one loaded now, else None."""
        key, pipe = self._key, self.pipe
        return pipe.bundle if pipe is not None and key is not None and key[0] == checkpoint.path else None

    def loaded_preset(self, checkpoint: Checkpoint) -> str | None:
        """The preset ``checkpoint`` names when it is the model loaded now (without LoRAs); None when it names
        none or is not loaded (then the worker fills the preset in when it loads it, `_take_model_defaults`)."""
        key, pipe = self._key, self.pipe                 # `pipeline` clears the key while it loads another
        loaded = pipe is not None and key is not None and key[:2] == (checkpoint.path, ())
        return pipe.bundle.preset if loaded else None

    def pipeline(self, checkpoint: Checkpoint, loras: tuple[tuple[Path, float], ...] = (),
                 refiner: Checkpoint | None = None, handoff: RefinerChoice | None = None,
                 vae: VaeChoice = VaeChoice()) -> Pipeline:
        """The pipeline of `checkpoint` with `loras` merged and, with an SDXL `refiner`, that model loaded
        beside it, taking over as the job's `handoff` says (its switch_at and convention:
        `Pipeline.with_refiner`); each drawn with the VAE `vae` picks for its file (`vae_to_load`).
        What is loaded
        stays while later jobs name the same; another VAE is read into it alone; a model the job does not name
        is let go before another is loaded, so at most a base model and a refiner are held."""
        for model in (checkpoint, refiner):     # A1111 hashes a model as it loads it
            if model is not None:
                model.calculate_hash()
        files = (checkpoint.path, *(path for path, _ in loras))    # a file replaced since it loaded: loaded again
        key, vae_key = (checkpoint.path, loras, tuple(map(file_version, files))), self.vae_for(checkpoint.path, vae)
        drawn_vae = (*vae_key, _vae_version(checkpoint.path, vae_key))     # a VAE file replaced: read again
        if key != self._key or self.pipe is None:
            with self._loading():
                self._embeddings_version = None                 # before the model: never the new one's
                self.pipe, self._key = None, None
                self._refiner, self._refiner_key = None, None       # loaded for the base let go (`_loaded_refiner`)
                trim()                                  # the model let go: its memory back to the system
                started = time.perf_counter()
                pipe = load(checkpoint.path, device=self.device, loras=[(str(p), w) for p, w in loras],
                            find_lora=self.lora_file,                       # tags: the server's LoRAs alone
                            vae=vae_key[0], sidecar_vae=vae_key[1])
                previewer = LatentPreviewer.for_bundle(pipe.bundle)
                self.pipe, self.previewer, self._key, self._vae_key = pipe, previewer, key, drawn_vae
                self.timings["load_s"] = time.perf_counter() - started
        elif drawn_vae != self._vae_key:
            with self._loading():
                pipe = self.pipe.with_vae(vae_key[0], sidecar_vae=vae_key[1])
                self.pipe, self.previewer, self._vae_key = pipe, LatentPreviewer.for_bundle(pipe.bundle), drawn_vae
        self._fresh_embeddings()
        refined = self._loaded_refiner(refiner, self.pipe, vae)
        if refined is None:
            return self.pipe
        return self.pipe.with_refiner(refined, handoff.switch_at, handoff.convention)

    def _embedding_files(self) -> tuple[tuple[Path, tuple | None], ...]:
        """(path, `file_version`) of each file of the embeddings folders: a file added, removed or replaced
        changes it."""
        return tuple((path, file_version(path)) for folder in self._embedding_folders()
                     for path in embedding_files(folder))

    def _embedding_folders(self) -> list[Path]:
        """The embeddings folders that exist now (A1111 passes over one that does not)."""
        return [Path(folder) for folder in self.embeddings if Path(folder).is_dir()]

    def _fresh_embeddings(self) -> None:
        """Install in the loaded model and refiner the embeddings of the folders as they are now, when their
        files changed since: A1111 reads its embeddings folder again before a generation when the folder
        changed (`EmbeddingDatabase.load_textual_inversion_embeddings`). The files are looked at (stat); only
        those not read before are read. Called while `busy` is held."""
        files = self._embedding_files()
        if self.pipe is None or files == self._embeddings_version:
            return
        found = self.embeddings_in_folders(self.pipe.bundle)
        self.pipe = self.pipe.with_embeddings(found)
        if self._refiner is not None:
            self._refiner = install_fitting_embeddings(self._refiner, found.loaded, replace=True)
        with self._reads_lock:
            self._embedding_reads = {key: e for key, e in self._embedding_reads.items() if key in files}
        self._embeddings_version = files

    def embeddings_in_folders(self, bundle: ModelBundle) -> FoundEmbeddings:
        """The embeddings the folders hold now, sorted for `bundle` (`find_embeddings`), nothing installed."""
        return find_embeddings(self._embedding_folders(), bundle, self._read_embedding)

    def listed_embeddings(self) -> FoundEmbeddings:
        """What the next job draws with: the loaded model's embeddings, or the folders' when they changed since
        they were installed (the next job installs them); nothing without a loaded model. The version is read
        before the model: `_fresh_embeddings` sets the model first, so a version it installed comes with its model,
        and `pipeline` clears it before it lets the model go, so a newly loaded one never comes with the old's."""
        version, pipe = self._embeddings_version, self.pipe
        if pipe is None:
            return FoundEmbeddings([], [])
        if self._embedding_files() == version:
            return FoundEmbeddings(pipe.embeddings, pipe.skipped_embeddings)
        return self.embeddings_in_folders(pipe.bundle)

    def refresh_embeddings(self) -> None:
        """Read every embedding file again and install them (A1111's forced reload). Called while `busy` is held."""
        with self._reads_lock:
            self._embedding_reads, self._embeddings_version = {}, None
        self._fresh_embeddings()

    def _read_embedding(self, path: Path) -> Embedding:
        """The embedding file `path` as read once per version, by the worker or by GET embeddings
        (`listed_embeddings`, in a request thread): one at a time (`_reads_lock`)."""
        key = (path, file_version(path))
        with self._reads_lock:
            if key not in self._embedding_reads:
                self._embedding_reads[key] = load_embedding(path)
            return self._embedding_reads[key]

    def vae_for(self, model: Path, vae: VaeChoice) -> tuple[Path | None, bool]:
        """`load`'s (`vae`, `sidecar_vae`) arguments for `model` drawn with the VAE `vae` picks (`vae_to_load`)."""
        return vae_to_load(model, vae, self._vae_file(vae), self.registry.vaes.near(model))

    def _vae_file(self, vae: VaeChoice) -> Path | None:
        """The file of the VAE list `vae` names; None for none, or for a name the list no longer has (A1111's
        `resolve_vae_from_setting`: "Couldn't find VAE named ...; using None instead", logged)."""
        if vae.name is None:
            return None
        found = self.registry.vaes.find(vae.name)
        if found is None:
            logger.warning("the VAE %r is no longer in the server's VAE list: drawn with the checkpoint's own VAE",
                           vae.name)
        return None if found is None else found.path

    def lora_file(self, name: str) -> Path | None:
        """The file of the LoRA a prompt tag names, from the server's list (`registry.loras`); None for one
        not there."""
        lora = self.registry.lora(name)
        return None if lora is None else lora.path

    def forget_tag_loras(self) -> None:
        """Let go the merged tensors a job's prompt-tag LoRAs leave behind (`Pipeline.run` has put the model's
        own weights back), which the model's patcher keeps for the last set beside every layer they change. The
        files read go once the queue is idle (`JobQueue.release_if_idle`)."""
        if self.pipe is not None:
            patcher_for(self.pipe.bundle).forget()

    def between_jobs(self, action: Callable[[], None]) -> None:
        """`action()` while `busy` is held: after the job drawing now, never beside a generation (the A1111 API's
        unload / reload / refresh routes, ComfyUI's POST /free)."""
        with self.busy:
            action()

    def unload(self) -> None:
        """Let the model and the refiner go (A1111's unload-checkpoint), and the IP-Adapters and image encoders
        kept for image prompts: the next job, or `pipeline`, loads its model again from the file, its embeddings
        folder read anew. Called while `busy` is held."""
        self.pipe, self._key, self._vae_key, self.previewer = None, None, None, None
        self._refiner, self._refiner_key, self._embeddings_version = None, None, None
        forget_image_prompt_models()
        trim()
        if str(self.device).startswith("cuda"):
            torch.cuda.empty_cache()

    def refiner_let_go(self, refiner: Path | None) -> int:
        """The bytes a job drawing with the refiner file `refiner` (None: none) frees before its run-time memory
        check (`make_plan`): the held refiner's weights where the job names another or none (`_loaded_refiner`
        lets it go first); 0 where none is held or the job keeps it. The submit-time check counts them as free,
        so that both checks decide alike."""
        held, key = self._refiner, self._refiner_key
        if held is None or key is None or key[0] == refiner:
            return 0
        return bundle_bytes(held)

    def _loaded_refiner(self, refiner: Checkpoint | None, base: Pipeline, vae: VaeChoice) -> ModelBundle | None:
        """The bundle of `refiner` for `base` (its device, dtype and embeddings: `load_refiner`) with the VAE
        `vae` picks for its file (`vae_for`), loaded unless it is held already; None (and nothing held) without
        one. The one held was loaded for this `base`: `pipeline` lets it go whenever it loads another."""
        drawn = None if refiner is None else self.vae_for(refiner.path, vae)
        key = None if refiner is None else (refiner.path, drawn, file_version(refiner.path),
                                            _vae_version(refiner.path, drawn))
        if key != self._refiner_key:
            let_go = self._refiner is not None
            self._refiner, self._refiner_key = None, None
            if let_go:
                trim()                  # its memory back to the system before the job's memory check
            if refiner is not None:
                with self._loading():
                    self._refiner = load_refiner(refiner.path, base.bundle, base.embeddings, sidecar_vae=drawn[1],
                                                 vae=drawn[0])
                    self._refiner_key = key
        return self._refiner

    @contextmanager
    def _loading(self) -> Iterator[None]:
        """`loading` set while a model loads (the status the server reports), cleared however the load ends."""
        self.loading.set()
        try:
            yield
        finally:
            self.loading.clear()


def bundle_bytes(bundle: ModelBundle) -> int:
    """The bytes of `bundle`'s weights: its U-Net's, VAE's and text encoders' parameters and buffers, each
    tensor's memory counted once."""
    seen: dict[int, int] = {}
    for module in (bundle.unet, bundle.vae, *(encoder.model for encoder in bundle.text_encoders)):
        for tensor in (*module.parameters(), *module.buffers()):
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _vae_version(model: Path, vae_key: tuple[Path | None, bool]) -> tuple | None:
    """The version (`file_version`) of the VAE file `load` reads for `model` given `vae_key`, its (`vae`,
    `sidecar_vae`) arguments: the named file or the sidecar beside the model; None for the model's own VAE."""
    vae, sidecar = vae_key
    read = vae if vae is not None else vae_beside(model) if sidecar else None
    return None if read is None else file_version(read)


class Runner:
    """`run(job)`, the worker's job function."""

    def __init__(self, host: ModelHost, images_dir: Path, limits: Limits | None = None,
                 upscalers: ModelFolder | None = None, controlnets: ModelFolder | None = None) -> None:
        self.host = host
        self.images_dir = images_dir
        self.limits = limits            # checked again once the model's default size is known
        self.upscalers = upscalers      # the models a hires upscaler may name (`--upscalers-dir`)
        self.controlnets = controlnets  # the ControlNets and IP-Adapters a job may name (`--controlnet-dir`)
        images_dir.mkdir(parents=True, exist_ok=True)

    def warm(self) -> None:
        self.host.pipeline(self.host.selected)

    def run(self, job: Job) -> None:
        with self.host.busy:
            try:
                self._run(job)
            finally:
                self.host.forget_tag_loras()

    def _run(self, job: Job) -> None:
        registry = self.host.registry
        checkpoint = registry.find(job.model)
        if checkpoint is None:
            raise RequestError(f"the model {job.model!r} is no longer in the models folder")
        loras, refs = [], []
        for choice in job.spec.loras:
            lora = registry.lora(choice.name)
            if lora is None:
                raise RequestError(f"the LoRA {choice.name!r} is no longer in the models folder")
            loras.append((lora.path, choice.weight))
            refs.append(LoraRef(registry.recorded_name(lora), choice.weight, lora.read_hash()))
        choice = job.spec.refiner
        refiner = None if choice is None else registry.find(choice.name)
        if choice is not None and refiner is None:
            raise RequestError(f"the refiner {choice.name!r} is no longer in the models folder")
        try:
            pipe = self.host.pipeline(checkpoint, tuple(loras), refiner, choice,
                                      VaeChoice(job.spec.sidecar_vae, job.spec.vae))
        except CheckpointError as err:      # a file the client chose: its error, without the server's paths
            vaes = [(f.path, f.name) for f in registry.vaes.files]
            raise RequestError(_load_error(CheckpointError(without_paths(str(err), vaes)), checkpoint, loras,
                                           job.spec.loras, refiner)) from None
        previewer = self.host.previewer
        job.previewer = previewer.rgb if previewer is not None else None
        _take_model_defaults(job, pipe)
        upscaler = self._hires_upscaler(job.spec.request, pipe.bundle, job.spec.batch_count)
        use_threads_for(pipe.bundle.unet, pipe.bundle.device)     # the cores free now (utils/threads)

        def stop() -> None:
            if job.interrupt.is_set() or job.skip.is_set():   # A1111's: the batch ends with its pictures as far as
                raise SamplingStopped(skipped=not job.interrupt.is_set())                       # they got

        def progress(info: StepInfo) -> None:
            stop()
            if job.cancel.is_set():
                raise JobCancelled
            job.step += 1
            job.store_latent(info.denoised)         # drawn as a preview only where a client asks for one
            job.preview = previewer.rgb(job.latent[0]) if previewer is not None and job.followed() else None
            job.publish("step", {"i": job.step, "n": job.steps})

        refs += job.spec.tag_loras
        used = [(e.name, embedding_hash(e.path)) for e in pipe.embeddings_used(job.spec.request)]

        def parameters(result: GenerationResult) -> list[str]:
            shown = job.spec.shown(result.request)      # the prompts as written (A1111's disable_extra_networks)
            return [format_parameters(to_parameters(shown, index=i, model_name=checkpoint.infotext_name,
                                                    model_hash=checkpoint.hash, loras=refs,
                                                    prompt=job.spec.prompt_to_record, embeddings=used,
                                                    refiner=_refiner_ref(refiner, choice) if result.refined else None,
                                                    vae=vae_ref(pipe.bundle.report), hires_loras=job.spec.hires_tag_loras,
                                                    family=pipe.bundle.family))
                    for i in range(len(result.images))]

        kept = job.spec.first_pass
        first_pass = None if kept is None else lambda result: kept(result.images, parameters(result))
        try:
            plan = _resolved(pipe, job.spec.request, upscaler)
            job.count_steps(plan)               # the steps it runs, as resolved: its progress and step events
            job.settings = {**job.settings, **job.spec.recorded(job.spec.shown(plan.request).parameters())}
            pictures = self._picture_upscaler(job.spec, pipe.bundle)
            for result in _batches(pipe, job, plan.request, upscaler, progress, stop, first_pass):
                shown = _upscaled(job.spec, pictures, result) if job.spec.picture_steps else result
                self._write_batch(job, shown, parameters(result))
        except RequestError as err:        # a tagged LoRA's or a control's file: named as the server lists it, not
            text = without_paths(str(err), [(lora.path, lora.name) for lora in registry.loras])      # by its path
            raise RequestError(self.controlnets.without_paths(text) if self.controlnets else text) from None

    def _write_batch(self, job: Job, result: GenerationResult, texts: list[str]) -> None:
        """A drawn batch's pictures written with their parameters `texts` (all or nothing) as the job's next files
        and added to the job, and its row (`Job.saved`), so a crash keeps them in the history: no batch's
        pictures stay in memory while the next is drawn."""
        start = len(job.images)
        names = [f"{job.id}-{start + i}.png" for i in range(len(texts))]
        blobs = [encode_image(image, "PNG", text) for image, text in zip(result.images, texts)]
        try:
            write_files_all_or_nothing([(self.images_dir / n, b) for n, b in zip(names, blobs)], overwrite=False)
        except OSError as err:          # a full disk, a read-only folder: named for the client without its path
            logger.error("job %s: cannot write its pictures into %s: %s", job.id, self.images_dir, err)
            raise ServerFault("cannot write the pictures into images/ of the server's output folder: "
                              f"{err.strerror or err}") from None
        job.images, job.infotexts = job.images + names, job.infotexts + texts
        job.seeds = job.seeds + result.seeds
        if job.saved is not None:
            job.saved()

    def _picture_upscaler(self, spec: JobSpec, bundle: ModelBundle) -> Upscaler | None:
        """The network of the job's `JobSpec.picture_upscaler` on the model's device, if it names one."""
        if spec.picture_upscaler is None:
            return None
        with _failing_node(spec, None):
            if not spec.picture_upscaler.path.is_file():
                raise RequestError(f"the upscale model {spec.picture_upscaler.title!r} is no longer in the upscalers "
                                   "folder")
            try:
                return load_upscaler_file(spec.picture_upscaler, PICTURE_UPSCALER, bundle.device)
            except BadRequest as err:
                raise RequestError(err.message) from None

    def _hires_upscaler(self, request: GenerationRequest, bundle: ModelBundle,
                        batch_count: int) -> HiresUpscaler | None:
        """The model a hires upscaler names in `request` (read from its file), after the request of `batch_count`
        batches is checked against the limits at the model's size; None for a latent mode or a plain resize. A
        problem with either is the job's `RequestError`."""
        try:
            upscaler = upscaler_file(hires_upscaler_name(request), self.upscalers)
            if self.limits is not None:     # the model's size and VAE factor: known only now when it was not loaded at submit
                check_request(request, self.limits, model=bundle, upscaler=upscaler, batch_count=batch_count)
            if upscaler is None:
                return None
            return HiresUpscaler(upscaler, load_upscaler_file(upscaler, HIRES_UPSCALER, bundle.device))
        except BadRequest as err:           # an IP-Adapter that does not fit: by its title, as at submit
            raise RequestError(self.controlnets.without_paths(str(err)) if self.controlnets else str(err)) from None


def _refiner_ref(refiner: Checkpoint | None, choice: RefinerChoice | None) -> RefinerRef | None:
    """The refiner as the pictures' parameters name it (A1111's `Refiner: name [hash]`, `Refiner switch at`)."""
    if refiner is None or choice is None:
        return None
    return RefinerRef(refiner.infotext_name, refiner.hash, choice.switch_at, choice.convention)


def _load_error(err: CheckpointError, checkpoint: Checkpoint, loras: list[tuple[Path, float]],
                choices: tuple[LoraChoice, ...], refiner: Checkpoint | None) -> str:
    """Why a job's model (with its LoRAs) or its refiner cannot be loaded, naming them by title and the files
    beside them by name, not path."""
    if refiner is not None and str(refiner.path) in str(err):
        err = CheckpointError(refiner.without_paths(str(err)))
        return load_failure(err, f"the refiner {refiner.title!r}", refiner.title, [])
    lora_names = [(path, f"LoRA {path.name}") for path, _ in loras]
    err = CheckpointError(checkpoint.without_paths(without_paths(str(err), lora_names)))
    named = ", ".join(repr(c.name) for c in choices)
    what = f"the model {checkpoint.title!r}" + (f" with the LoRAs {named}" if loras else "")
    return load_failure(err, what, checkpoint.title, [])


@dataclass(frozen=True)
class HiresUpscaler:
    """An `--upscalers-dir` model a job's hires fix names, and its network."""
    file: ModelFile
    network: Upscaler


def _run_with_upscaler(pipe: Pipeline, request: GenerationRequest, upscaler: HiresUpscaler | None,
                       progress: ProgressFn, stop: Callable[[], None] | None = None,
                       first_pass: Callable[[GenerationResult], None] | None = None) -> GenerationResult:
    """`pipe.run(request)` (`progress`, `stop`, `first_pass` as there), with the hires upscaler model `upscaler`
    where the request names one; the result's request names it as `/sdapi/v1/upscalers` lists it, as the pictures'
    parameters do (A1111's `Hires upscaler`)."""
    if upscaler is None:
        return pipe.run(request, progress=progress, stop=stop, first_pass=first_pass)

    def named(result: GenerationResult) -> GenerationResult:
        return replace(result, request=replace(result.request, hr_upscaler=upscaler.file.title))

    try:
        return named(pipe.run(with_upscaler_file(request, upscaler.file), progress=progress, stop=stop,
                              upscaler=upscaler.network,
                              first_pass=None if first_pass is None else lambda result: first_pass(named(result))))
    except SamplingStopped as stop:
        stop.result = named(stop.result)
        raise


def _upscaled(spec: JobSpec, upscaler: Upscaler | None, result: GenerationResult) -> GenerationResult:
    """`result` with its pictures through the job's picture steps (ComfyUI's ImageUpscaleWithModel with its picture
    upscaler, ImageScale, ImageScaleBy), fed their float decode where the result has one, else the 8-bit
    pictures."""
    pixels = result.pixels if result.pixels is not None else pil_to_unit_tensor(result.images)     # (B, 3, H, W)
    images = comfy_pictures(pixels, spec.picture_steps, upscaler, spec.picture_upscaler_failed)
    return replace(result, images=images, pixels=None)


@contextmanager
def _failing_node(spec: JobSpec, step: int | None) -> Iterator[None]:
    """Tell the job's `JobSpec.picture_upscaler_failed` that the picture step `step`'s work (None: reading the
    picture upscaler) failed, where it does, and let the error go on."""
    try:
        yield
    except Exception:
        if spec.picture_upscaler_failed is not None:
            spec.picture_upscaler_failed(step)
        raise


def _resolved(pipe: Pipeline, request: GenerationRequest, upscaler: HiresUpscaler | None) -> GenerationPlan:
    """The plan of the job's first batch, `request` as `pipe` resolves it (`Pipeline.resolve`), its request's
    hires upscaler model named as `/sdapi/v1/upscalers` lists it: the request its pictures record."""
    plan = pipe.resolve(with_upscaler_file(request, None if upscaler is None else upscaler.file))
    return plan if upscaler is None else replace(plan, request=replace(plan.request, hr_upscaler=upscaler.file.title))


def _batches(pipe: Pipeline, job: Job, first: GenerationRequest, upscaler: HiresUpscaler | None,
             progress: ProgressFn, stop: Callable[[], None],
             first_pass: Callable[[GenerationResult], None] | None = None) -> Iterator[GenerationResult]:
    """The job's batches drawn one after another (`JobSpec.batch_count`, A1111's n_iter) from the first's
    resolved request `first`, the seeds continuing (`next_batch`, as `sdlab txt2img --batch-count`). As in
    A1111's `process_images_inner`, a cancel stops them (between steps: `JobCancelled` from `progress`; before a
    batch starts); an interrupt and a skip end the running batch with its pictures as far as they got (A1111's
    sampler returns its latest x0 estimate: `SamplingStopped`; its steps counted as run), after which an
    interrupt stops the job and a skip goes on with the next batch, one that comes between batches skipping
    nothing. `first_pass`: called with each batch's hires first-pass pictures (`Pipeline.run`)."""
    for k in range(job.spec.batch_count):
        if _stopping(job):
            raise JobCancelled
        job.skip.clear()
        try:
            result = _run_with_upscaler(pipe, next_batch(first, k), upscaler, progress, stop, first_pass)
        except SamplingStopped as stopped:
            if not job.interrupt.is_set():      # skipped: the next batch counts on from this one's end
                job.step = job.steps * (k + 1) // job.spec.batch_count
            yield stopped.result
            if _stopping(job):
                raise JobCancelled from None
            continue
        yield result


def _stopping(job: Job) -> bool:
    """Whether the job is cancelled or interrupted (`JobQueue.interrupt` sets the interrupt before the cancel)."""
    return job.cancel.is_set() or job.interrupt.is_set()


def _take_model_defaults(job: Job, pipe: Pipeline) -> None:
    """The settings the client left unset (`JobSpec.model_preset_fills`) from the preset the model's file
    names (`ModelBundle.preset`: `sdlab.preset`, or "lcm-model" for an LCM model) or else one of its LoRAs
    (`Pipeline.preset_for`), then an unset step count from the model family's default, as `sdlab txt2img`
    does, and an unset schedule from `JobSpec.unset_schedule`; known once the model is loaded (the preset at
    submission when it already was, `Service.submit`). The job's request and recorded settings follow."""
    spec = job.spec
    request = spec.request
    preset = pipe.preset_for(request.prompt)
    if preset and spec.model_preset_fills:
        try:
            request = with_preset(request, preset, job.mode, spec.model_preset_fills)
        except RequestError as err:
            raise RequestError(f"the model names the preset {preset!r}: {err}") from None
    if request.steps is None:
        request = replace(request, steps=pipe.bundle.family.default_steps)
    if request.schedule is None and spec.unset_schedule is not None:
        request = replace(request, schedule=spec.unset_schedule)
    if request is spec.request:
        return
    job.spec = replace(spec, request=request, model_preset_fills=frozenset())
    job.settings = {**job.settings, **job.spec.recorded(job.spec.shown(request).parameters())}
