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
import os
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

from sdlab.checkpoints.controlnet import legacy_hash
from sdlab.checkpoints.ip_adapter import is_ip_adapter_file
from sdlab.pipeline.upscale import a1111_upscaler_name
from sdlab.utils.file_hashes import read_per_version

CONTROLNET_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")
UPSCALER_SUFFIXES = (".pth", ".pt", ".safetensors")
CONTROL_KINDS = ("controlnet", "ip-adapter")     # ControlNets and T2I-Adapters; IP-Adapters


def control_file_kind(path: Path) -> str:
    """What a file of the ControlNet folder is (`CONTROL_KINDS`): an IP-Adapter by its tensors' names
    (`is_ip_adapter_file`), else a ControlNet or T2I-Adapter (whose loader refuses any other file)."""
    return "ip-adapter" if is_ip_adapter_file(path) else "controlnet"


@dataclass(frozen=True)
class ModelFile:
    path: Path
    title: str                      # what lists show ("name [hash]" for ControlNets, A1111's name for upscalers)
    kind: str = ""                  # what it holds where its folder tells kinds apart (`control_file_kind`)

    def names(self) -> set[str]:
        return {self.title, self.path.stem, self.path.name}


class ModelFolder:
    """The model files of one folder (recursively), then those of `known_in` whose stem is one of `known` (A1111's
    models/RealESRGAN, where it looks for the files of its own Real-ESRGAN names alone); `find(name)` is the only
    way from a name to a path. `kind_of` (a path -> its kind) sorts the files of a folder of several kinds, each
    read once per version of the file."""

    def __init__(self, folder: Path | None, suffixes: tuple[str, ...], hashed: bool, known_in: Path | None = None,
                 known: Collection[str] = (), kind_of: Callable[[Path], str] | None = None) -> None:
        self.folder = folder.resolve() if folder is not None else None
        self.known_in = known_in.resolve() if known_in is not None else None
        self.known = frozenset(known)
        self.suffixes = suffixes
        self.hashed = hashed
        self.kind_of = kind_of
        self._lock = threading.Lock()
        self.files: list[ModelFile] = []
        self.refresh()

    def refresh(self) -> None:
        paths = [*self._paths(self.folder), *(p for p in self._paths(self.known_in) if p.stem in self.known)]
        found = [ModelFile(path, f"{path.stem} [{read_per_version(path, legacy_hash)}]" if self.hashed
                           else a1111_upscaler_name(path.stem),
                           read_per_version(path, self.kind_of) if self.kind_of is not None else "")
                 for path in dict.fromkeys(paths)]
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

    def titles(self, kind: str | None = None) -> list[str]:
        """The files' titles, those of `kind` alone where it is given."""
        with self._lock:
            return [f.title for f in self.files if kind is None or f.kind == kind]

    def without_paths(self, text: str) -> str:
        """`text` with each file's path as its title and the folders beside this one (an IP-Adapter's image encoder
        in models/image_encoder) by their names under its parent: what clients are shown of where the server keeps
        them. The longest paths go first, so that a file's path is not cut by its folder's."""
        if self.folder is None:
            return text
        with self._lock:
            names = [(str(f.path), f.title) for f in self.files]
        for path, name in sorted(names, key=lambda pair: -len(pair[0])):
            text = text.replace(path, name)
        return text.replace(f"{self.folder.parent}{os.sep}", "")
