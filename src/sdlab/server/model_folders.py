"""The ControlNet and upscaler model files a client may name: the files of one folder each
(`--controlnet-dir`, `--upscalers-dir`), chosen by name only, never by path; symlinks that leave the folder
are skipped.

ControlNets are named as A1111's ControlNet extension names them, `"<stem> [<legacy hash>]"`
(`GET /controlnet/model_list`); a request may give that title, the stem or the file name (a title whose hash
differs finds the file by its stem), or as the extension matches names: the stem in any case, else the
shortest stem holding the name in any case. Upscalers are named as A1111 lists them in `GET /sdapi/v1/upscalers`: a file it downloads by its own name ("R-ESRGAN 4x+" for
RealESRGAN_x4plus.pth: `upscale.a1111_upscaler_name`), any other by its stem; the stem and file name find it too.
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

from sdlab.checkpoints.controlnet import legacy_hash
from sdlab.pipeline.upscale import a1111_upscaler_name
from sdlab.utils.file_hashes import read_per_version

CONTROLNET_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")
UPSCALER_SUFFIXES = (".pth", ".pt", ".safetensors")


@dataclass(frozen=True)
class ModelFile:
    path: Path
    title: str                      # what lists show ("name [hash]" for ControlNets, A1111's name for upscalers)

    def names(self) -> set[str]:
        return {self.title, self.path.stem, self.path.name}


class ModelFolder:
    """The model files of one folder (recursively), then those of `known_in` whose stem is one of `known` (A1111's
    models/RealESRGAN, where it looks for the files of its own Real-ESRGAN names alone); `find(name)` is the only
    way from a name to a path."""

    def __init__(self, folder: Path | None, suffixes: tuple[str, ...], hashed: bool, known_in: Path | None = None,
                 known: Collection[str] = ()) -> None:
        self.folder = folder.resolve() if folder is not None else None
        self.known_in = known_in.resolve() if known_in is not None else None
        self.known = frozenset(known)
        self.suffixes = suffixes
        self.hashed = hashed
        self._lock = threading.Lock()
        self.files: list[ModelFile] = []
        self.refresh()

    def refresh(self) -> None:
        paths = [*self._paths(self.folder), *(p for p in self._paths(self.known_in) if p.stem in self.known)]
        found = [ModelFile(path, f"{path.stem} [{read_per_version(path, legacy_hash)}]" if self.hashed
                           else a1111_upscaler_name(path.stem)) for path in dict.fromkeys(paths)]
        with self._lock:
            self.files = found

    def _paths(self, folder: Path | None) -> Iterator[Path]:
        """The model files under `folder` (none if it is None or gone), symlinks out of it skipped."""
        if folder is None or not folder.is_dir():
            return
        for path in sorted(folder.rglob("*")):
            if path.suffix.lower() in self.suffixes and path.is_file() and path.resolve().is_relative_to(folder):
                yield path

    def find(self, name: str) -> ModelFile | None:
        """The file `name` names: its title, stem or file name ("stem [other hash]" by its stem), else for
        ControlNets as the extension's `find_closest_lora_model_name` matches: the stem in any case, then the
        shortest stem that holds `name` in any case."""
        with self._lock:
            files = list(self.files)
        bare = name.rsplit(" [", 1)[0] if name.endswith("]") else name     # "stem [other hash]": by stem
        for wanted in (lambda f: name == f.title, lambda f: name in f.names(), lambda f: bare in f.names()):
            match = next((f for f in files if wanted(f)), None)
            if match is not None:
                return match
        return self._closest(files, name.lower()) if self.hashed and name else None

    @staticmethod
    def _closest(files: list[ModelFile], lower: str) -> ModelFile | None:
        same = next((f for f in files if f.path.stem.lower() == lower), None)
        holding = [f for f in files if lower in f.path.stem.lower()]
        return same or min(holding, key=lambda f: len(f.path.stem), default=None)

    def titles(self) -> list[str]:
        with self._lock:
            return [f.title for f in self.files]
