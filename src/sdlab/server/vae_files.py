"""The VAE files a client may name (A1111's `sd_vae`, `GET /sdapi/v1/sd-vae`), found as A1111 1.10's
`sd_vae.refresh_vae_list` finds them: the sidecar VAEs `*.vae.ckpt`, then `*.vae.pt`, then `*.vae.safetensors`
under the checkpoints folder, then every `*.ckpt`, `*.pt`, `*.safetensors` under the VAE folder (`--vae-dir`,
default `<models-dir>/VAE`), subfolders too. A file is named by its file name; a later file of the same name
takes the name over where the first one stood (A1111's `vae_dict[name] = filepath`); ComfyUI's API names a VAE
folder file by its path there (`find`'s second way, `folder_names`). Clients pick by these names only, never by a
path of their own, so nothing outside these folders is loaded; symlinks that leave their folder are skipped.

Which file a model is drawn with is A1111's `resolve_vae` (`VaeChoice`, `vae_to_load`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from sdlab.checkpoints.sidecar import VAE_SUFFIXES, vae_beside

VAE_FOLDER_SUFFIXES = (".ckpt", ".pt", ".safetensors")
AUTOMATIC_VAE = ("Automatic", "auto")
"""A1111's `sd_vae` values that draw a single-file model with the VAE beside it, if any (`sd_vae.is_automatic`;
"auto" from old configs); a name of `GET sd-vae` draws that file, "None", null, "" and a name of no VAE file the
checkpoint's own (`resolve_vae_from_setting`; `a1111._vae_choice`)."""


@dataclass(frozen=True)
class VaeFile:
    path: Path

    @property
    def name(self) -> str:
        """A1111's `model_name` of it: the file's name (`sd_vae.get_filename`)."""
        return self.path.name

    def as_a1111(self) -> dict[str, str]:
        return {"model_name": self.name, "filename": str(self.path)}


class VaeFiles:
    """The VAE list; `find(name)` is the only way from a name to a file."""

    def __init__(self, checkpoints_folder: Path | None, vae_folder: Path | None) -> None:
        self.checkpoints_folder = checkpoints_folder.resolve() if checkpoints_folder is not None else None
        self.vae_folder = vae_folder.resolve() if vae_folder is not None else None
        self._lock = threading.Lock()
        self.files: list[VaeFile] = []
        self.folder_files: dict[str, VaeFile] = {}   # every file of the VAE folder by its path there
        self.refresh()

    def refresh(self) -> None:
        """Rescan both folders (A1111's refresh-vae)."""
        found: dict[str, Path] = {}
        in_folder: dict[str, VaeFile] = {}
        for folder, suffixes in ((self.checkpoints_folder, VAE_SUFFIXES), (self.vae_folder, VAE_FOLDER_SUFFIXES)):
            for suffix in suffixes:
                for path in _files(folder, suffix):
                    found[path.name] = path
                    if folder == self.vae_folder and folder is not None:
                        in_folder[path.relative_to(folder).as_posix()] = VaeFile(path)
        with self._lock:
            self.files = [VaeFile(path) for path in found.values()]
            self.folder_files = dict(sorted(in_folder.items()))

    def find(self, name: str) -> VaeFile | None:
        """The file of the list named `name` (its file name, exactly as A1111's `vae_dict.get`), else the VAE
        folder's file whose path there `name` is ("sub/kl-f8.safetensors", "./" before it or not: ComfyUI's
        vae_name), the way to a file whose name a later one took."""
        with self._lock:
            named = next((f for f in self.files if f.name == name), None)
            return named or (self.folder_files.get(name.removeprefix("./")) if isinstance(name, str) else None)

    def folder_names(self) -> dict[str, str]:
        """Each file of the VAE folder by its path there (ComfyUI's vae_name), to the name `find` finds it by: its
        file name, or "./" and that path for a file whose name a later one took (VAE/a/x.safetensors beside
        VAE/b/x.safetensors)."""
        with self._lock:
            named = {f.name: f for f in self.files}
            return {path: f.name if named.get(f.name) == f else f"./{path}" for path, f in self.folder_files.items()}

    def names(self) -> list[str]:
        with self._lock:
            return [f.name for f in self.files]

    def near(self, model: Path) -> Path | None:
        """The VAE A1111 1.10 finds near the checkpoint `model` (`find_vae_near_checkpoint`): the first file of
        the list whose name starts with the model's file name up to its last dot, a sidecar `<stem>.vae.*` or a
        VAE folder's `<stem>...` file alike; else the sidecar beside it, for a model outside the listed folders (a
        `--model` file); None for a diffusers folder, which has its own."""
        if not model.is_file():
            return None
        stem = model.name.rsplit(".", 1)[0]
        with self._lock:
            listed = next((f.path for f in self.files if f.name.startswith(stem)), None)
        return listed or vae_beside(model)


def _files(folder: Path | None, suffix: str) -> list[Path]:
    """The files under `folder` whose names end in `suffix` (any case), in name order, none that leaves it."""
    if folder is None or not folder.is_dir():
        return []
    return [path for path in sorted(folder.rglob("*"))
            if path.name.lower().endswith(suffix) and path.is_file() and path.resolve().is_relative_to(folder)]


@dataclass(frozen=True)
class VaeChoice:
    """The VAE a job draws a model with, as A1111 1.10's `resolve_vae` picks it (no `--vae-path`, no user
    metadata): `sidecar`, the VAE of the list near the model where there is one (`resolve_vae_near_checkpoint`:
    sd_vae "Automatic", or any sd_vae with `sd_vae_overrides_per_model_preferences` off), else `name`, a file of
    the list (`resolve_vae_from_setting`), else the checkpoint's own VAE."""

    sidecar: bool = True
    name: str | None = None


def vae_to_load(model: Path, choice: VaeChoice, named: Path | None, near: Path | None) -> tuple[Path | None, bool]:
    """`load`'s (`vae`, `sidecar_vae`) arguments for `model` drawn as `choice` says, `named` the file of its
    `name`, `near` the VAE near it (`VaeFiles.near`): its own sidecar `<stem>.vae.*` (None, True), another file
    near it (near, False), else the named file (named, False), else its own (None, False)."""
    if choice.sidecar and near is not None:
        beside = vae_beside(model)
        return (None, True) if beside is not None and beside.resolve() == near.resolve() else (near, False)
    return named, False


__all__ = ["AUTOMATIC_VAE", "VAE_FOLDER_SUFFIXES", "VaeChoice", "VaeFile", "VaeFiles", "vae_to_load"]
