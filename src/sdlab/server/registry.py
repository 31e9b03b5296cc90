"""The checkpoints and LoRAs a client may choose, named and hashed as AUTOMATIC1111 names them.

Checkpoints: the model the server started with, plus every `.safetensors` / `.ckpt` file and diffusers
folder under `--models-dir` (its `Stable-diffusion/` folder when it is an A1111 `models` folder), but for a
model's sidecar VAE (`<name>.vae.safetensors` / `.vae.ckpt`: drawn with its model, as A1111 lists it apart). LoRAs:
the files in `<models-dir>/Lora` or `<models-dir>/loras`, then those in the startup model's own LoRA folders
(`Lora` / `loras` beside or inside its folder, `default_lora_dirs`: the shipped model's are the adapters that
ship with it). VAE files: `vaes`, the sidecars and the VAE folder's files (`vae_files`, A1111's `sd_vae` list).
Clients pick by name from these lists only, never by path, so nothing outside them can be
loaded; symlinks that leave the models folder are skipped.

A1111's identity of a checkpoint: `title` = `"<path under the folder> [<hash>]"`, `hash` = the first 10 hex
digits of the whole file's SHA-256 (`sdlab.pipeline.png_info.model_hash`), `sha256` the full digest.
Hashes come from `sdlab.pipeline.png_info` (`file_sha256`, `lora_hash`), cached per file version by
`sdlab.utils.file_hashes`, so each file is read once until it changes. As A1111 1.10 lists them, a listing
reads no file whole: a hash the cache lacks is None (the title is then the bare name) until the model is
loaded or a job names it (`Checkpoint.calculate_hash`, A1111's `calculate_shorthash`), a LoRA's until a job
uses it (`Lora.read_hash`). A LoRA file whose safetensors header does not read is left out of the list with
a warning, as A1111 lists what it can read.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from sdlab.checkpoints.diffusers_folder import MODEL_INDEX, read_config_json
from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.io import read_safetensors_header
from sdlab.checkpoints.sidecar import is_sidecar_vae
from sdlab.pipeline.png_info import (
    file_sha256, known_file_sha256, known_lora_hash, lora_hash, model_name, safetensors_metadata, without_checksum,
)
from sdlab.pipeline.prompt_loras import default_lora_dirs
from sdlab.server.vae_files import VaeFiles
from sdlab.utils.file_hashes import file_version, read_per_version

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")
LORA_FOLDERS = ("Lora", "lora", "loras", "LoRA", "LyCORIS")     # LyCORIS: A1111's --lyco-dir-backcompat
logger = logging.getLogger(__name__)
# folders of other models, never checkpoints, at any depth
_NOT_CHECKPOINT_FOLDERS = {name.lower() for name in (*LORA_FOLDERS, "VAE", "ESRGAN", "RealESRGAN", "embeddings",
                                                   "ControlNet")}
# the IP-Adapters' image encoders, where `ip_adapter_units.ENCODER_PLACES` and the adapter's `image_encoder` rule
# find them: directly under --models-dir, one folder up from ControlNet/ (a folder of that name deeper is the user's)
_ENCODER_FOLDERS = {name.lower() for name in ("image_encoder", "clip_vision", "ControlNetPreprocessor")}
_HASH_LOCKS: dict[Path, threading.Lock] = {}
_HASH_LOCKS_LOCK = threading.Lock()


@dataclass
class Checkpoint:
    path: Path
    name: str                       # path under the models folder ("sub/model.safetensors"), A1111's `name`
    sha256: str | None = field(default=None, compare=False)     # None until known; always for a diffusers folder
    version: tuple[int, ...] | None = field(default=None, compare=False, repr=False)   # the file's, as sha256 was read

    def __hash__(self) -> int:
        return hash((self.path, self.name))

    @property
    def hash(self) -> str | None:
        return self.sha256[:10] if self.sha256 else None

    @property
    def title(self) -> str:
        return f"{self.name} [{self.hash}]" if self.hash else self.name

    def calculate_hash(self) -> str | None:
        """The short hash, the file read whole unless its hash is cached: A1111's `calculate_shorthash`, run as
        a model loads and, here, as a job names it, whose pictures' parameters carry it. Requests naming it at
        once wait for one read of the file."""
        if self.sha256 is None and self.path.is_file():
            with _hash_lock(self.path):
                if self.sha256 is None:
                    version = file_version(self.path)
                    self.sha256, self.version = file_sha256(self.path), version
        return self.hash

    @property
    def model_name(self) -> str:
        """A1111's `model_name`: the name without its extension, folders joined by '_'."""
        stem = self.name[: -len(self.path.suffix)] if self.path.suffix else self.name
        return stem.replace("/", "_").replace("\\", "_")

    @property
    def name_for_extra(self) -> str:
        """A1111's `name_for_extra`, its `info.sd_model_name`: the file's name without its extension, no folders."""
        return self.path.name if self.path.is_dir() else self.path.stem

    @property
    def infotext_name(self) -> str:
        """The `Model` written into the pictures' parameters, as `sdlab txt2img` writes it."""
        return model_name(self.path)

    def names(self) -> set[str]:
        return {self.title, self.name, self.model_name, self.path.name, self.path.stem} | (
            {self.hash, self.sha256} if self.sha256 else set()
        )

    def as_a1111(self) -> dict:
        return {"title": self.title, "model_name": self.model_name, "hash": self.hash, "sha256": self.sha256,
                "filename": str(self.path), "config": None}

    def check_loadable(self, sidecar_vae: bool = True, vae: Path | None = None) -> None:
        """Raise the one-line `CheckpointError` of a file or folder sdlab cannot draw with (unreadable, a LoRA or
        a VAE, a Flux model, ...), named by its title, not its path: what planning it finds from its names,
        shapes, metadata and configs (`plan_checkpoint`, which reads no weight, with the VAE file `vae`, else the
        VAE beside it or not: `sidecar_vae`), as A1111 loads a model chosen in `POST options` and refuses one it
        cannot load; `vae` is named by its file name."""
        from sdlab.checkpoints.load import plan_checkpoint

        try:
            plan_checkpoint(self.path, vae=vae, sidecar_vae=sidecar_vae)
        except CheckpointError as err:
            text = str(err) if vae is None else str(err).replace(str(vae), vae.name)
            raise CheckpointError(self.without_paths(text)) from None

    def without_paths(self, text: str) -> str:
        """`text` with the model's path as its title and the files beside it (a sidecar VAE or config) by their
        names: what clients are shown of where the server keeps them."""
        return text.replace(str(self.path), self.title).replace(f"{self.path.parent}{os.sep}", "")


@dataclass
class Lora:
    path: Path
    hash: str | None = field(default=None, compare=False)   # A1111's 12-hex "addnet" hash (`png_info.lora_hash`),
                                                            # None until known

    def __hash__(self) -> int:
        return hash(self.path)

    @property
    def name(self) -> str:
        return self.path.stem

    def read_hash(self) -> str:
        """The hash, the file read unless it is cached: A1111's `NetworkOnDisk.read_hash`, run as a job uses it."""
        if self.hash is None:
            with _hash_lock(self.path):
                if self.hash is None:
                    self.hash = lora_hash(self.path)
        return self.hash

    def as_a1111(self) -> dict:
        metadata = read_per_version(self.path, safetensors_metadata) if self.path.suffix == ".safetensors" else {}
        return {"name": self.name, "alias": metadata.get("ss_output_name") or self.name, "path": str(self.path),
                "metadata": metadata}


class ModelRegistry:
    def __init__(self, startup_model: Path, models_dir: Path | None, vae_dir: Path | None = None) -> None:
        self.startup_model = startup_model.resolve()
        self.models_dir = models_dir.resolve() if models_dir is not None else None
        self._lock = threading.Lock()
        self.checkpoints: list[Checkpoint] = []
        self.loras: list[Lora] = []
        self.lora_paths: dict[str, Lora] = {}     # every LoRA file by its path under the LoRA folder it is in
        self.refresh()
        self.vaes = VaeFiles(self._checkpoints_root() if self.models_dir is not None else None, vae_dir)

    def refresh(self) -> None:
        """Rescan the models folder (A1111's refresh-checkpoints / refresh-loras), reading no file whole but the
        startup model's, which the server loads at once (`Checkpoint.calculate_hash`). A hash already computed for
        a file's version is kept, if the hash cache lacks it (not writable, or never written)."""
        with self._lock:
            self._hashed = {(c.path, c.version): c.sha256 for c in self.checkpoints if c.sha256 and c.version}
        checkpoints = [self._checkpoint(self.startup_model, self._relative_name(self.startup_model))]
        checkpoints[0].calculate_hash()
        loras: list[tuple[Path, Lora]] = []             # (its LoRA folder, the LoRA)
        if self.models_dir is not None:
            for path in self._checkpoint_files():
                if path != self.startup_model:
                    checkpoints.append(self._checkpoint(path, self._relative_name(path)))
            for folder in LORA_FOLDERS:
                base = self.models_dir / folder
                if base.is_dir():
                    loras += [(base, lora) for lora in
                              _readable_loras(p for p in sorted(base.rglob("*")) if self._inside(p))]
        for base in default_lora_dirs(self.startup_model):
            loras += [(base, lora) for lora in _readable_loras(sorted(base.glob("*")))]
        paths: dict[str, Lora] = {}
        for base, lora in loras:
            paths.setdefault(lora.path.relative_to(base).as_posix(), lora)
        with self._lock:
            self.checkpoints, self.loras = checkpoints, _unique_names([lora for _, lora in loras])
            self.lora_paths = paths

    @property
    def default(self) -> Checkpoint:
        return self.checkpoints[0]

    def find(self, name: str) -> Checkpoint | None:
        """The checkpoint a client names by title, name, file name, model name or hash; None if unknown. A title
        whose model is not hashed yet, or whose hash is another, is found by its name, as A1111's
        `get_closet_checkpoint_match` strips the " [hash]" when no title matches."""
        wanted = name.strip()
        with self._lock:
            for candidate in (wanted, without_checksum(wanted)):
                for checkpoint in self.checkpoints:
                    if candidate in checkpoint.names():
                        return checkpoint
        return None

    def lora(self, name: str) -> Lora | None:
        """The LoRA of `name` (A1111's: the file's stem, the first file of it found), else the LoRA file whose path
        under its LoRA folder `name` is ("sub/inked.safetensors", "./" before it or not: ComfyUI's lora_name),
        the way to a file whose stem an earlier file has; None for neither."""
        with self._lock:
            named = next((lora for lora in self.loras if lora.name == name), None)
            return named or self.lora_paths.get(name.removeprefix("./"))

    def recorded_name(self, lora: Lora) -> str:
        """The name a picture's parameters give `lora` (its `<lora:NAME:w>` tag, `Lora hashes`), one `lora` finds it
        by again: A1111's, the stem, where that is this file; else its path under its LoRA folder, ComfyUI's
        lora_name ("b/inked.safetensors": an earlier file has the stem, which would draw another picture)."""
        with self._lock:
            if next((found for found in self.loras if found.name == lora.name), None) == lora:
                return lora.name
            return next((path for path, found in self.lora_paths.items() if found == lora), lora.name)

    def lora_names(self) -> dict[str, str]:
        """Each LoRA file by its path under its LoRA folder (ComfyUI's lora_name), to the name `lora` finds it by:
        its stem, or "./" and that path for a file whose stem an earlier file has (two folders each holding an
        inked.safetensors)."""
        with self._lock:
            named = {lora.name: lora for lora in self.loras}
            return {path: lora.name if named.get(lora.name) == lora else f"./{path}"
                    for path, lora in self.lora_paths.items()}

    def _checkpoints_root(self) -> Path:
        """The folder checkpoints are found in: `--models-dir`, or its `Stable-diffusion/` folder."""
        assert self.models_dir is not None
        return self.models_dir / "Stable-diffusion" if (self.models_dir / "Stable-diffusion").is_dir() else self.models_dir

    def _checkpoint_files(self) -> list[Path]:
        """The checkpoint files and diffusers folders under the checkpoints folder; the files inside a diffusers
        folder's component folders (its unet/, text_encoder/, ... weights) are parts of that one model, not listed
        apart. A whole checkpoint beside `model_index.json` (a cloned Hugging Face repo's
        v1-5-pruned-emaonly.safetensors) is a model of its own and is listed, as A1111 lists it."""
        root = self._checkpoints_root()
        found, components = [], []
        for path in sorted(root.rglob("*")):                # a folder comes before the paths inside it
            folders = [part.lower() for part in path.relative_to(root).parts[:-1]]
            encoders = root == self.models_dir and folders[:1] and folders[0] in _ENCODER_FOLDERS
            if set(folders) & _NOT_CHECKPOINT_FOLDERS or encoders or not self._inside(path):
                continue
            if any(path.is_relative_to(component) for component in components):
                continue
            if path.is_file() and path.suffix.lower() in CHECKPOINT_SUFFIXES and not is_sidecar_vae(path):
                found.append(path.resolve())
            elif path.is_dir() and (path / MODEL_INDEX).is_file():
                found.append(path.resolve())
                components.extend(_component_folders(path))
        return found

    def _inside(self, path: Path) -> bool:
        return self.models_dir is not None and path.resolve().is_relative_to(self.models_dir)

    def _relative_name(self, path: Path) -> str:
        if self.models_dir is not None and path.is_relative_to(self.models_dir):
            root = self.models_dir / "Stable-diffusion"
            base = root if path.is_relative_to(root) else self.models_dir
            return path.relative_to(base).as_posix()
        return path.name

    def _checkpoint(self, path: Path, name: str) -> Checkpoint:
        if not path.is_file():
            return Checkpoint(path, name)
        version = file_version(path)
        return Checkpoint(path, name, known_file_sha256(path) or self._hashed.get((path, version)), version)


def _component_folders(pipeline: Path) -> list[Path]:
    """The folders of a diffusers folder's components: each entry of its `model_index.json` that names a
    (library, class) pair, ``[null, null]`` too (a slot the folder may still hold weights in). Every sub-folder
    where `model_index.json` does not read as one (the folder is not loadable then anyway)."""
    try:
        index = read_config_json(pipeline / MODEL_INDEX)
    except CheckpointError:
        return [path for path in pipeline.iterdir() if path.is_dir()]
    return [pipeline / name for name, entry in index.items()
            if name and not name.startswith(("_", ".")) and "/" not in name and "\\" not in name
            and isinstance(entry, list) and len(entry) == 2]


def _hash_lock(path: Path) -> threading.Lock:
    """The lock held while the file at `path` is hashed, so that requests for its hash at once read it once."""
    with _HASH_LOCKS_LOCK:
        return _HASH_LOCKS.setdefault(path, threading.Lock())


def _readable_loras(paths: Iterable[Path]) -> list[Lora]:
    """The LoRA files among `paths` with their cached hashes; a `.safetensors` file whose header does not read
    is left out with a warning, as A1111 lists the LoRAs it can read and still starts."""
    return [Lora(path, known_lora_hash(path)) for path in paths
            if path.suffix.lower() in LORA_SUFFIXES and path.is_file() and _readable_header(path)]


def _readable_header(path: Path) -> bool:
    """Whether `path` is not safetensors or its header reads (once per version of the file); else False, warned."""
    if path.suffix.lower() != ".safetensors":
        return True
    problem = read_per_version(path, _header_problem)
    if problem is not None:
        logger.warning("skipping %s", problem)
    return problem is None


def _header_problem(path: Path) -> str | None:
    try:
        with open(path, "rb") as file:
            read_safetensors_header(file, path)
    except (OSError, CheckpointError) as err:
        return str(err)
    return None


def _unique_names(loras: list[Lora]) -> list[Lora]:
    """One LoRA per name (the first found), as a `<lora:NAME:W>` tag can name only one."""
    seen: dict[str, Lora] = {}
    for lora in loras:
        seen.setdefault(lora.name, lora)
    return list(seen.values())
