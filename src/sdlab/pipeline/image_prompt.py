"""Image prompts (IP-Adapter) of a request: the `IPAdapterInput`s, their tokens, and the U-Net wrapper.

Semantics are diffusers' (`load_ip_adapter`, `ip_adapter_image`, `set_ip_adapter_scale`):

- the picture goes through CLIP's preprocessing (`clip_image.clip_pixels`; under the request's control_convention
  "a1111" A1111's ControlNet extension's, `clip_image.extension_clip_pixels`: squashed to 224 x 224 by OpenCV's
  INTER_AREA, no crop, an A1111 unit's mask applied) and the adapter's image encoder; its
  projected class token (`image_embeds`; a Plus adapter: the penultimate hidden states) is turned into tokens by
  the adapter's `image_proj`;
- with classifier-free guidance the negative rows get the adapter's tokens of zero image embeddings
  (`prepare_ip_adapter_image_embeds` / `encode_image`: ``uncond_image_embeds = zeros_like(image_embeds)``); a
  Plus adapter's, those of the hidden states of a zero picture (``image_encoder(zeros_like(image))``);
- every cross-attention of the U-Net adds `scale` times its attention to the tokens (`models.ip_adapter`); a
  ControlNet attends to the text alone, as in diffusers' ControlNet pipelines; `layer_scales` (diffusers'
  per-layer dict, InstantStyle's presets: `ip_adapter_layers`) give each cross-attention its own factor of `scale`;
- a FaceID adapter reads no picture but an InsightFace face embedding, which sdlab does not compute: `image` is
  that embedding (a tensor or NumPy array, E or N x E numbers for N faces, or a .npy file), as diffusers'
  `ip_adapter_image_embeds`; each face gives T tokens, the negative rows those of zero embeddings (under the
  A1111 ControlNet extension's convention, an A1111 unit's, several faces' tokens are averaged, as the extension
  averages its inputs' embeds: `average_face_tokens`);
- a FaceID Plus adapter reads both: `image` is the picture (its encoder's penultimate hidden states, as a Plus
  adapter's) and `face_embedding` the face's embedding (one face: diffusers pairs each face with a picture); the
  negative rows are those of a zero embedding and a zero picture's hidden states (diffusers' FaceID Plus example:
  ``zeros_like`` of the faces, `prepare_ip_adapter_image_embeds`' ``clip_embeds``). A Plus v2 file (its name holds
  "plusv2") adds its face tokens times `face_shortcut` (default 1; diffusers' ``shortcut`` /
  ``shortcut_scale``); `face_shortcut` given turns the shortcut on for any FaceID Plus file;
- the image encoder is the one named, else an `image_encoder` folder beside the adapter file or one folder up
  (h94/IP-Adapter's layout: `models/ip-adapter_sd15.safetensors` with `models/image_encoder/`);
- an adapter acts on the steps of its window [start, end] alone (A1111's ControlNet extension's Guidance Start /
  End of an IP-Adapter unit; diffusers has none), chosen by the request's `control_convention` as a ControlNet's
  steps are (`control.in_window`); outside it the cross-attentions attend to the text alone.

A picture's tokens are the same in every pass, batch of a batch count, grid cell and request: the adapters and
encoders read from files are kept while their files are unchanged (the last `KEPT["encoder"]` encoders and
`KEPT["adapter"]` adapters, per dtype and device), and the tokens of the last `KEPT_TOKENS` (adapter, encoder,
picture) triples, so a picture is encoded once (`forget_image_prompt_models` lets them all go).

The seam with the generate loop: the tokens ride in the conditional and unconditional condition dicts as
`image_tokens` (CFG batches them as it batches the prompts), and `image_prompted` wraps the network the
Denoiser calls, turning them into the U-Net's `image_prompt`.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from sdlab.checkpoints.controlnet import legacy_hash
from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.image_encoder import LoadedImageEncoder, load_image_encoder
from sdlab.checkpoints.ip_adapter import (LoadedIPAdapter, check_fits, check_fits_unet, is_face_id_plus_v2,
                                          load_ip_adapter)
from sdlab.families.loaded import ModelBundle
from sdlab.models.ip_adapter import ImagePrompt, IPAdapter, IPAdapterConfig, cross_attentions, embeds_tokens
from sdlab.pipeline.clip_image import clip_pixels, extension_clip_pixels
from sdlab.pipeline.ip_adapter_layers import LayerScaleError, check_layer_scales, expand_layer_scales, layer_scales_text
from sdlab.pipeline.control import RESIZE_MODES, _line_fields, a1111_mode, cropped_to_region, drawn_on_init, in_window
from sdlab.pipeline.images import eight_bit
from sdlab.pipeline.npy_arrays import NPY_MAGIC, NUMBER_KINDS, NpyError, read_npy
from sdlab.pipeline.ip_adapter_units import FACE_ID_MODULES, MODULE_ENCODERS, is_ip_adapter_module
from sdlab.pipeline.prompt_loras import LoraUse
from sdlab.pipeline.request import RequestError, input_image
from sdlab.utils.file_hashes import stat_version

MAX_SCALE = 10.0         # diffusers takes any scale; A1111's weight slider stops at 2
ENCODER_FOLDERS = ("image_encoder", "../image_encoder")
"""Where an adapter's image encoder is looked for, relative to the adapter file's folder."""


@dataclass(frozen=True)
class IPAdapterInput:
    """One image prompt: the adapter (a file or a loaded one), the picture (a path or PIL image), the scale of its
    attention (diffusers' `set_ip_adapter_scale`, A1111's Weight), the CLIP image encoder (a folder, a file, a
    loaded one; None: found beside the adapter, `ENCODER_FOLDERS`), the fractions of the steps it acts from and
    to (A1111's Guidance Start / End; the request's `control_convention` picks the steps) and `module`: the
    ControlNet extension's preprocessor of the A1111 unit it came from (its infotext is then that unit's
    "ControlNet N" line, `infotext_lines`), None for sdlab's own image prompts ("IP-Adapter N"). `image` None: an
    img2img / inpainting request's init picture, by a control's rule (`prompts_on_init`, `control.drawn_on_init`),
    as the extension takes an IP-Adapter unit without one."""

    model: LoadedIPAdapter | str | os.PathLike[str]
    # FaceID: the face embedding (`face_embeds`); None: the init picture (`prompts_on_init`)
    image: Image.Image | str | os.PathLike[str] | Tensor | np.ndarray | None = None
    scale: float = 1.0
    image_encoder: LoadedImageEncoder | str | os.PathLike[str] | None = None
    # per-layer scales multiplying `scale` (None: every cross-attention): diffusers' `set_ip_adapter_scale` dict,
    # a preset "style" / "style+layout" or their compact text (`ip_adapter_layers`)
    layer_scales: Mapping[str, Any] | str | None = None
    start: float = 0.0
    end: float = 1.0
    module: str | None = None
    unit: int | None = None         # an A1111 unit's place among its request's enabled units (None: after them)
    # an A1111 unit's mask: the extension's CLIP mask (`clip_image.extension_clip_pixels`; control_convention "a1111")
    mask: Image.Image | str | os.PathLike[str] | None = None
    # FaceID Plus: the face's InsightFace embedding (`image` is then the picture) and the Plus v2 shortcut's scale
    # (None: 1 for a "plusv2" file, no shortcut for another)
    face_embedding: Tensor | np.ndarray | str | os.PathLike[str] | None = None
    face_shortcut: float | None = None
    # how an Inpaint area "Only masked" run fits the picture to the init picture before cutting it (`in_region`):
    # A1111's resize modes by sdlab's names (`control.RESIZE_MODES`); None: "crop", the extension's default unit's
    resize_mode: str | None = None

    @property
    def windowed(self) -> bool:
        """Whether the adapter acts on part of the steps only (start > 0 or end < 1)."""
        return self.start > 0 or self.end < 1

    @property
    def model_path(self) -> str:
        return self.model.origin if isinstance(self.model, LoadedIPAdapter) else os.fspath(self.model)


def image_encoder_of(adapter: str | os.PathLike[str]) -> Path:
    """The image encoder folder beside an adapter file (`ENCODER_FOLDERS`); a RequestError naming where it looked."""
    folder = Path(adapter).parent
    places = [(folder / name).resolve() for name in ENCODER_FOLDERS]
    for place in places:
        if place.is_dir():
            return place
    raise RequestError(f"no image encoder for the IP-Adapter {os.fspath(adapter)!r}: looked for "
                       f"{' and '.join(map(str, places))}; name one (image_encoder / --ip-adapter-encoder)")


def check_ip_adapter(prompt: IPAdapterInput, index: int = 0, convention: str = "diffusers") -> IPAdapterInput:
    """The input's numbers and paths checked; a RequestError names what is wrong. Its window as a control's
    (`control.check_control`): A1111's `convention` takes start == end, diffusers' refuses it (no step)."""
    name = f"IP-Adapter {index}"
    if not isinstance(prompt, IPAdapterInput):
        raise RequestError(f"{name}: expected an IPAdapterInput, got {type(prompt).__name__}")
    scale = prompt.scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) \
            or not 0.0 <= scale <= MAX_SCALE:
        raise RequestError(f"{name}: scale must be a number in [0, {MAX_SCALE:g}], got {scale!r}")
    _check_window(prompt, name, convention)
    if prompt.resize_mode is not None and prompt.resize_mode not in RESIZE_MODES:
        raise RequestError(f"{name}: unknown resize_mode {prompt.resize_mode!r}; valid: {', '.join(RESIZE_MODES)}")
    if prompt.layer_scales is not None:
        try:
            check_layer_scales(prompt.layer_scales, MAX_SCALE)
        except LayerScaleError as err:
            raise RequestError(f"{name}: {err}") from None
    config = prompt.model.config if isinstance(prompt.model, LoadedIPAdapter) \
        else _check_adapter_file(Path(prompt.model), name)
    _check_face_input(prompt, config, name)
    image = prompt.image                                    # None: the init picture, once drawn on it
    if image is not None and not isinstance(image, (Image.Image, str, os.PathLike)) and not _is_face_embedding(image):
        raise RequestError(f"{name}: the image must be a picture, a file path or None (the init picture), got "
                           f"{type(image).__name__}")
    if isinstance(image, (str, os.PathLike)) and not _is_face_embedding(image) and not Path(image).is_file():
        raise RequestError(f"{name}: the image {os.fspath(image)!r} does not exist")
    encoder = prompt.image_encoder
    if isinstance(encoder, (str, os.PathLike)) and not Path(encoder).exists():
        raise RequestError(f"{name}: the image encoder {os.fspath(encoder)!r} does not exist")
    if encoder is None and _reads_picture(config):
        image_encoder_of(prompt.model_path)                   # found beside the adapter, else refused now
    return prompt


def prompts_on_init(prompts: Sequence[IPAdapterInput], init: Image.Image | None) -> tuple[IPAdapterInput, ...]:
    """Each of a request's image prompts as it is drawn, by the rule a control follows (`control.drawn_on_init`):
    one without a picture of its own on the init picture `init` as it is (its CLIP preprocessing fits it); in
    txt2img (`init` None) such a prompt is a RequestError (`prompt_on_init`)."""
    return tuple(prompt_on_init(prompt, index, init) for index, prompt in enumerate(prompts))


def prompt_on_init(prompt: IPAdapterInput, index: int, init: Image.Image | None,
                   name: str | None = None) -> IPAdapterInput:
    """`prompt` (the request's `index`-th) as it is drawn (`control.drawn_on_init`, refusals named `name`). A FaceID
    adapter without a face embedding in txt2img is refused with the FaceID message it gets in img2img, where the
    init picture it takes is no embedding (`check_face_on_init`), not with the rule's."""
    check_face_on_init(prompt, index, init)
    return drawn_on_init(prompt, index, init, "resize", name)


def check_face_on_init(prompt: IPAdapterInput, index: int, init: Image.Image | None) -> None:
    """Where `prompt` has no image and its request no init picture (txt2img): a FaceID (Plus) adapter's refusal
    for what it lacks (`_check_face_input`, named "IP-Adapter `index`"), as img2img gives it; nothing for another
    adapter, nor where there is an image or an init picture."""
    if prompt.image is None and init is None:
        name = f"IP-Adapter {index}"
        config = prompt.model.config if isinstance(prompt.model, LoadedIPAdapter) \
            else _check_adapter_file(Path(prompt.model), name)
        _check_face_input(prompt, config, name)


def _check_window(prompt: IPAdapterInput, name: str, convention: str) -> None:
    for what, value in (("start", prompt.start), ("end", prompt.end)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RequestError(f"{name}: {what} must be a finite number, got {value!r}")
    strict = convention != "a1111"                                          # diffusers: start < end
    ordered = prompt.start < prompt.end if strict else prompt.start <= prompt.end
    if not (0.0 <= prompt.start and prompt.end <= 1.0 and ordered):
        raise RequestError(f"{name}: need 0 <= start {'<' if strict else '<='} end <= 1, got start "
                           f"{prompt.start}, end {prompt.end}")


def _is_face_embedding(image: Any) -> bool:
    """Whether an input's `image` is a face embedding: a tensor, a NumPy array or a .npy file."""
    return isinstance(image, (Tensor, np.ndarray)) or (
        isinstance(image, (str, os.PathLike)) and os.fspath(image).lower().endswith(".npy"))


def takes_face_shortcut(model: LoadedIPAdapter | str | os.PathLike[str]) -> bool:
    """Whether the adapter is a FaceID Plus, the one kind a `face_shortcut` acts on (its file's names and shapes
    read, no weight); a RequestError names a file that is no IP-Adapter."""
    config = model.config if isinstance(model, LoadedIPAdapter) else _check_adapter_file(Path(model), "IP-Adapter")
    return config.face_id_plus


def _reads_picture(config: IPAdapterConfig) -> bool:
    """Whether the adapter reads a picture through an image encoder (every one but FaceID)."""
    return not config.face_id or config.face_id_plus


def _check_face_input(prompt: IPAdapterInput, config: IPAdapterConfig, name: str) -> None:
    """A RequestError where a FaceID adapter is given a picture, another adapter a face embedding as its image,
    a FaceID Plus adapter no face embedding or no picture, or a face embedding or shortcut is given to another."""
    image, face = prompt.image, prompt.face_embedding
    shortcut = prompt.face_shortcut
    if config.face_id_plus:
        if face is None or not _is_face_embedding(face):
            raise RequestError(f"{name}: an IP-Adapter FaceID Plus reads a picture and an InsightFace face embedding, "
                               f"which sdlab does not compute; give the picture as the image and the embedding "
                               f"({config.embed_dim} numbers: a tensor, a NumPy array or a .npy file) as "
                               "face_embedding (Python API; the CLI's --ip-adapter-face-embedding FILE.npy; the "
                               "server's ip_adapters[].face_embedding)")
        if _is_face_embedding(image):
            raise RequestError(f"{name}: an IP-Adapter FaceID Plus reads a picture as its image (its face "
                               "embedding is face_embedding)")
        if shortcut is not None and (isinstance(shortcut, bool) or not isinstance(shortcut, (int, float))
                                     or not math.isfinite(shortcut) or not 0.0 <= shortcut <= MAX_SCALE):
            raise RequestError(f"{name}: face_shortcut must be a number in [0, {MAX_SCALE:g}], got {shortcut!r}")
        _check_face_file(face, name)
        faces = len(face_embeds(face, config.embed_dim, name))
        if faces != 1:
            raise RequestError(f"{name}: an IP-Adapter FaceID Plus takes one face with its one picture; the face "
                               f"embedding holds {faces}")
        return
    if face is not None or shortcut is not None:
        raise RequestError(f"{name}: face_embedding and face_shortcut are for an IP-Adapter FaceID Plus"
                           + ("; a FaceID adapter's face embedding is its image" if config.face_id else ""))
    if config.face_id and not _is_face_embedding(image):
        raise RequestError(f"{name}: an IP-Adapter FaceID reads an InsightFace face embedding, which sdlab does not "
                           f"compute from a picture; give the embedding ({config.embed_dim} numbers per face: a "
                           "tensor, a NumPy array or a .npy file) as the image (Python API; the CLI's "
                           "--ip-adapter-image FILE.npy; the server's ip_adapters[].face_embedding)")
    if not config.face_id and _is_face_embedding(image):
        raise RequestError(f"{name}: a face embedding is for an IP-Adapter FaceID; this adapter reads a picture")
    if config.face_id:
        _check_face_file(image, name)
        face_embeds(image, config.embed_dim, name)              # its shape and values, before any model loads


def with_face_embedding(prompt: IPAdapterInput, face: Tensor | np.ndarray, name: str) -> IPAdapterInput:
    """`prompt` given the face embedding `face` where its adapter reads it: a FaceID adapter's `image` (it reads no
    picture: one given besides is a RequestError), a FaceID Plus adapter's `face_embedding` (its `image` the
    picture); an adapter of another kind given one is a RequestError. The server's doors send the embedding apart
    from the picture whatever the adapter (`face_embedding`, an A1111 unit's `ipadapter_input`)."""
    config = _adapter_config(prompt, name)
    if not config.face_id:
        raise RequestError(f"{name}: a face embedding is for an IP-Adapter FaceID; this adapter reads a picture")
    if config.face_id_plus:
        return replace(prompt, face_embedding=face)
    if prompt.image is not None:
        raise RequestError(f"{name}: an IP-Adapter FaceID reads the face embedding alone, no picture; leave the "
                           "image out")
    return replace(prompt, image=face)


def _adapter_config(prompt: IPAdapterInput, name: str) -> IPAdapterConfig:
    """The sizes of the prompt's adapter: a loaded one's, else its file's names and shapes (`_check_adapter_file`)."""
    return prompt.model.config if isinstance(prompt.model, LoadedIPAdapter) \
        else _check_adapter_file(Path(prompt.model), name)


def _check_face_file(face: Any, name: str) -> None:
    if isinstance(face, (str, os.PathLike)) and not Path(face).is_file():
        raise RequestError(f"{name}: the face embedding {os.fspath(face)!r} does not exist")


def face_embeds(image: Tensor | np.ndarray | str | os.PathLike[str], width: int, name: str) -> Tensor:
    """A FaceID input's face embeddings as (N, width) float32: a tensor or array of `width` numbers per face
    (E, N x E or 1 x N x E, diffusers' `ip_adapter_image_embeds` without its negative half) or a .npy file of
    one (read without pickles, its header checked first: `npy_arrays.read_npy`); a RequestError names another
    shape, numbers that are not floats, a sparse tensor, or values that are not finite."""
    if isinstance(image, (str, os.PathLike)):
        image = _read_face_file(os.fspath(image), name)
    if isinstance(image, np.ndarray):
        if image.dtype.kind not in NUMBER_KINDS or image.dtype.fields is not None or image.dtype.itemsize > 8:
            raise RequestError(f"{name}: the face embedding is an array of {image.dtype.str!r}; this FaceID adapter "
                               f"takes {width} floats per face (float16, 32 or 64: InsightFace's normed_embedding)")
        image = image.astype(image.dtype.newbyteorder("="), copy=False)        # torch reads native order alone
    if isinstance(image, Tensor) and image.layout != torch.strided:
        raise RequestError(f"{name}: the face embedding is a {image.layout} tensor; a dense one is read")
    embeds = torch.as_tensor(image).detach()
    if not embeds.is_floating_point() or embeds.ndim not in (1, 2, 3) or embeds.shape[-1] != width \
            or embeds.numel() == 0 or (embeds.ndim == 3 and len(embeds) != 1):
        raise RequestError(f"{name}: the face embedding has shape {tuple(embeds.shape)} ({embeds.dtype}); this "
                           f"FaceID adapter takes {width} floats per face (InsightFace's normed_embedding): "
                           f"({width},) or (faces, {width})")
    embeds = embeds.float().reshape(-1, width)                                                 # (N, E)
    if not torch.isfinite(embeds).all():
        raise RequestError(f"{name}: the face embedding holds NaN or infinite values")
    return embeds


def _read_face_file(path: str, name: str) -> np.ndarray:
    """The array of a face embedding's .npy file (`npy_arrays.read_npy`), or a RequestError saying why not."""
    try:
        with open(path, "rb") as file:
            is_npy = file.read(len(NPY_MAGIC)) == NPY_MAGIC                # else np.load would read a pickle
            file.seek(0)
            array = read_npy(file, os.fstat(file.fileno()).st_size) if is_npy else None
    except OSError as err:
        raise RequestError(f"{name}: the face embedding {path!r} cannot be read: {err.strerror or err}") from None
    except NpyError as err:
        raise RequestError(f"{name}: the face embedding {path!r} is not a small numeric .npy array: {err}") from None
    if array is None:
        raise RequestError(f"{name}: the face embedding {path!r} is not a .npy array file (NumPy's np.save format)")
    return array


def _check_adapter_file(path: Path, name: str) -> IPAdapterConfig:
    """A RequestError unless `path` is an IP-Adapter file sdlab builds: a folder, a missing file, or a file of
    another kind named as `sdlab inspect` names it (`other_kinds.describe_other_kind`) with the option that
    takes it. Reads the file's names and shapes only, so it runs before any model loads."""
    from sdlab.checkpoints.ip_adapter import read_ip_adapter
    from sdlab.checkpoints.other_kinds import describe_other_kind

    if path.is_dir():
        raise RequestError(f"{name}: {os.fspath(path)!r} is a folder, not an IP-Adapter file (h94's "
                           "ip-adapter_*.safetensors / .bin)")
    if not path.is_file():
        raise RequestError(f"{name}: the IP-Adapter file {os.fspath(path)!r} does not exist")
    try:
        return read_ip_adapter(path)[0]
    except CheckpointError as err:
        problem = str(err)
    try:
        described = describe_other_kind(path)
    except CheckpointError:
        described = None
    if described is not None and described["kind"] != "IP-Adapter":
        problem = f"{os.fspath(path)}: this is a {described['kind']}, not an IP-Adapter; use it with {described['use']}"
    elif described is None and any(key.startswith("model.diffusion_model.") for key in _keys(path)):
        problem = f"{os.fspath(path)}: this is a Stable Diffusion checkpoint, not an IP-Adapter; use it with --model"
    raise RequestError(f"{name}: {problem}")


def _keys(path: Path) -> list[str]:
    """The tensor names of a checkpoint file (none where it cannot be read)."""
    from sdlab.checkpoints.io import read_checkpoint

    try:
        return list(read_checkpoint(path, shapes_only=True)[0])
    except CheckpointError:
        return []


@dataclass(frozen=True)
class PreparedImagePrompts:
    """The adapters with their scales and token counts, and the tokens of the prompt's rows and the negative
    prompt's, each (B, sum of the adapters' tokens, context_dim) in the adapters' order; each adapter's step
    window (start, end) and the rule that picks its steps (the request's `control_convention`)."""

    adapters: tuple[tuple[IPAdapter, float | tuple[float, ...], int], ...]      # scale: one, or per cross-attention
    cond_tokens: Tensor
    uncond_tokens: Tensor
    windows: tuple[tuple[float, float], ...] = ()
    convention: str = "diffusers"

    @property
    def windowed(self) -> bool:
        """Whether some adapter acts on part of the steps only: each model call must then learn its step
        (`control.tag_steps`)."""
        return any(start > 0 or end < 1 for start, end in self.windows)

    def active(self, step: tuple[int, int] | None) -> list[bool]:
        """Whether each adapter acts at sampler step (i, N) (`control.in_window`); every one where the step is
        not known (None: no adapter is windowed)."""
        if step is None or not self.windows:
            return [True] * len(self.adapters)
        return [in_window(start, end, *step, self.convention) for start, end in self.windows]


# --- loaded adapters / encoders and pictures' tokens, kept ------------------------------------------------

KEPT = {"encoder": 1, "adapter": 2}
"""How many loaded image encoders / adapters are kept (a ViT-H/14 encoder is 0.6 G parameters, bigG 1.8 G)."""
KEPT_TOKENS = 8
_LOADED: OrderedDict[tuple, Any] = OrderedDict()             # (kind, file version, dtype, device) -> loaded
_TOKENS: OrderedDict[tuple, tuple[Any, Any, Tensor, Tensor]] = OrderedDict()
_LOCK = threading.Lock()


def _file_version(path: str | os.PathLike[str]) -> tuple:
    """The file, or each file of the folder, at `path` in this version of it (`stat_version`)."""
    path = Path(path).resolve()
    files = sorted(f for f in path.iterdir() if f.is_file()) if path.is_dir() else [path]
    return (str(path), *((f.name, *stat_version(f.stat())) for f in files))


def _kept(kind: str, path: str | os.PathLike[str], param: Tensor, load: Callable[[], Any]) -> Any:
    """The `kind` loaded from `path` in `param`'s dtype and device: the kept one while its file is unchanged,
    else `load()` (the oldest of its kind let go first, so no more than `KEPT[kind]` are held)."""
    key = (kind, _file_version(path), param.dtype, str(param.device))
    with _LOCK:
        if key in _LOADED:
            _LOADED.move_to_end(key)
            return _LOADED[key]
        same = [k for k in _LOADED if k[0] == kind]
        for old in same[:max(len(same) - KEPT[kind] + 1, 0)]:
            del _LOADED[old]
    loaded = load()
    with _LOCK:
        _LOADED[key] = loaded
    return loaded


def forget_image_prompt_models() -> None:
    """Let go the kept adapters, image encoders and tokens (the next request loads and encodes again)."""
    with _LOCK:
        _LOADED.clear()
        _TOKENS.clear()


def weights_to_load(bundle: ModelBundle, prompts: Sequence[IPAdapterInput], convention: str = "diffusers") -> int:
    """The bytes that loading the adapters and image encoders of `prompts` (as `_loaded` loads them, in the U-Net's
    dtype) adds to what is held now: each file's tensors counted from its names and shapes (no weight read), none
    for one given loaded or kept, a file two prompts share once, less the kept ones of a kind that loading lets go
    (`_kept`: at most `KEPT[kind]` held). Each prompt is checked first (`check_ip_adapter` under the request's
    control `convention`). What `memory.estimate_bytes` counts for the image prompts."""
    from sdlab.checkpoints.diffusers_folder import weights_file
    from sdlab.checkpoints.io import read_checkpoint

    param = next(bundle.unet.parameters())
    wanted: dict[tuple, Path] = {}
    for index, prompt in enumerate(prompts):
        check_ip_adapter(prompt, index, convention)
        if isinstance(prompt.model, LoadedIPAdapter):
            config = prompt.model.config
        else:
            config = _check_adapter_file(Path(prompt.model), f"IP-Adapter {index}")
            wanted.setdefault(("adapter", _file_version(prompt.model), param.dtype, str(param.device)),
                              Path(prompt.model))
        encoder = prompt.image_encoder
        if _reads_picture(config) and not isinstance(encoder, LoadedImageEncoder):
            path = Path(image_encoder_of(prompt.model_path) if encoder is None else encoder)
            wanted.setdefault(("encoder", _file_version(path), param.dtype, str(param.device)), path)
    with _LOCK:
        held = [(key, sum(p.numel() * p.element_size() for p in loaded.model.parameters()))
                for key, loaded in _LOADED.items()]                            # (key, bytes), oldest first
    added = 0
    for key, path in wanted.items():
        if any(k == key for k, _ in held):
            continue
        tensors = read_checkpoint(weights_file(path) if path.is_dir() else path, nested=True, shapes_only=True)[0]
        size = sum(t.numel() for t in tensors.values()) * param.element_size()
        same = [entry for entry in held if entry[0][0] == key[0]]
        for entry in same[:max(len(same) - KEPT[key[0]] + 1, 0)]:         # let go before the new one loads
            added -= entry[1]
            held.remove(entry)
        added += size
        held.append((key, size))
    return max(added, 0)


def _loaded(prompt: IPAdapterInput, bundle: ModelBundle) -> tuple[LoadedIPAdapter, LoadedImageEncoder | None]:
    """The adapter and its image encoder (None for a FaceID adapter), loaded or kept, checked to fit the model."""
    param = next(bundle.unet.parameters())
    adapter = prompt.model
    if not isinstance(adapter, LoadedIPAdapter):
        adapter = _kept("adapter", adapter, param,
                        lambda: load_ip_adapter(prompt.model, dtype=param.dtype, device=param.device))
    adapter.model.to(device=param.device, dtype=param.dtype)
    if not _reads_picture(adapter.config):
        check_fits(adapter, bundle.unet, None, "")
        return adapter, None
    encoder = prompt.image_encoder
    if not isinstance(encoder, LoadedImageEncoder):
        path = image_encoder_of(prompt.model_path) if encoder is None else encoder
        encoder = _kept("encoder", path, param, lambda: load_image_encoder(path, dtype=param.dtype,
                                                                           device=param.device))
    encoder.model.to(device=param.device, dtype=param.dtype)
    check_fits(adapter, bundle.unet, encoder.config, encoder.origin)
    return adapter, encoder


def _kept_tokens(adapter: IPAdapter, encoder: torch.nn.Module, pixels: Tensor,
                 face: tuple[Tensor, float | None] | None = None) -> tuple[Tensor, Tensor]:
    """`_tokens`, kept for the last `KEPT_TOKENS` (adapter, encoder, picture) triples: the same objects (held
    weakly) in the same dtype and device, and the same preprocessed pixels (and FaceID Plus' face embedding and
    shortcut, `face`). pixels: (1, 3, 224, 224)"""
    digest = hashlib.sha256(pixels.detach().float().cpu().numpy().tobytes()).hexdigest()
    if face is not None:
        digest += hashlib.sha256(face[0].detach().float().cpu().numpy().tobytes()).hexdigest() + repr(face[1])
    key = (id(adapter), id(encoder), pixels.dtype, str(pixels.device), tuple(pixels.shape), digest)
    with _LOCK:
        kept = _TOKENS.get(key)
        if kept is not None and kept[0]() is adapter and kept[1]() is encoder:
            _TOKENS.move_to_end(key)
            return kept[2], kept[3]
    tokens, negative = _tokens(adapter, encoder, pixels, face)
    with _LOCK:
        _TOKENS[key] = (weakref.ref(adapter), weakref.ref(encoder), tokens, negative)
        while len(_TOKENS) > KEPT_TOKENS:
            _TOKENS.popitem(last=False)
    return tokens, negative


def prepare_image_prompts(bundle: ModelBundle, prompts: Sequence[IPAdapterInput], batch: int,
                          convention: str = "diffusers", region: tuple[int, int, int, int] | None = None,
                          picture_size: tuple[int, int] | None = None,
                          size: tuple[int, int] | None = None) -> PreparedImagePrompts | None:
    """Load (or take) each adapter and its image encoder, check they fit the model, encode each picture; None
    without image prompts. `convention`: the request's `control_convention`, the rule of the adapters' step
    windows. `region` (x1, y1, x2, y2) of a picture of `picture_size`: the run draws that region at `size` (Inpaint
    area "Only masked"); each picture (and its mask) is cut to it first, as a control's image is
    (`in_region`). Errors are RequestErrors naming the adapter."""
    if not prompts:
        return None
    adapters, cond, uncond = [], [], []
    for index, prompt in enumerate(prompts):
        prompt = check_ip_adapter(prompt, index, convention)
        try:
            adapter, encoder = _loaded(prompt, bundle)
        except CheckpointError as err:
            raise RequestError(f"IP-Adapter {index}: {err}") from None
        if region is not None and encoder is not None:        # a FaceID adapter's image is its face embedding
            prompt = in_region(prompt, index, region, picture_size, size)
        tokens, negative = _prompt_tokens(prompt, adapter, encoder, index, convention)       # 2 x (1, T, C)
        adapters.append((adapter.model, _scales(prompt, bundle, index), tokens.shape[1]))
        cond.append(tokens.expand(batch, -1, -1))                                             # (B, T, C)
        uncond.append(negative.expand(batch, -1, -1))                                         # (B, T, C)
    return PreparedImagePrompts(tuple(adapters), torch.cat(cond, dim=1), torch.cat(uncond, dim=1),
                                tuple((float(p.start), float(p.end)) for p in prompts), convention)


REGION_RESIZE = "crop"
"""The resize mode that fits an image prompt's picture to the picture's size before an "Only masked" run cuts it
(`in_region`) where the prompt names none (`IPAdapterInput.resize_mode`): the ControlNet extension's default
unit's, "Crop and Resize" (`ResizeMode.INNER_FIT`). The init picture an adapter without its own takes has that
size, and is the same under every mode."""


def in_region(prompt: IPAdapterInput, index: int, region: tuple[int, int, int, int],
              picture_size: tuple[int, int], size: tuple[int, int]) -> IPAdapterInput:
    """`prompt` with its picture (and an A1111 unit's mask) cut to the `region` an Inpaint area "Only masked" run
    draws of a picture of `picture_size`, resized to the drawing `size` (`control.cropped_to_region`), as the
    ControlNet extension's `get_control` cuts every unit's input, an IP-Adapter's too
    (`try_crop_image_with_a1111_mask`, for a unit whose module is no reference one and whose
    `inpaint_crop_input_image`, default True, is set; sd-webui-controlnet scripts/controlnet.py, v1.1.455): fitted
    to the picture's size first by the unit's own resize mode (`resize_mode`; None: `REGION_RESIZE`), the mode
    `choose_input_image` hands it for a unit with a picture of its own."""
    picture = input_image(prompt.image, f"IP-Adapter {index} image")
    mask = None if prompt.mask is None else input_image(prompt.mask, f"IP-Adapter {index} mask")
    if mask is not None and mask.size != picture.size:
        raise RequestError(f"IP-Adapter {index}: the mask is {mask.width}x{mask.height}, the picture "
                           f"{picture.width}x{picture.height}")
    mode = prompt.resize_mode or REGION_RESIZE
    picture = cropped_to_region(picture, picture_size, region, size, mode)
    if mask is not None:
        mask = cropped_to_region(eight_bit(mask).convert("RGB"), picture_size, region, size, mode)
    return replace(prompt, image=picture, mask=mask)


def check_image_prompt_layers(bundle: ModelBundle, prompts: Sequence[IPAdapterInput]) -> None:
    """Each image prompt's per-layer scales against the model's U-Net, before it loads an adapter (the server
    checks a job as it is posted); a RequestError names the first block it lacks or list of the wrong length."""
    for index, prompt in enumerate(prompts):
        _scales(prompt, bundle, index)


def check_image_prompts_fit(unet: torch.nn.Module, prompts: Sequence[IPAdapterInput]) -> None:
    """Each image prompt's adapter against `unet` (the loaded model's, or one built on the meta device from its
    checkpoint's names and shapes): its text context and cross-attention widths (`check_fits_unet`; the adapter
    file's names and shapes read, no weight); a RequestError naming the first adapter that does not fit, by its
    path, as the check of the adapter loaded names it (`check_fits`; the server shows its title). What the server
    checks as a job is posted, so that an adapter of another family (an SDXL one on an SD1 model) is refused
    before it queues."""
    for index, prompt in enumerate(prompts):
        if isinstance(prompt.model, LoadedIPAdapter):
            config, name = prompt.model.config, prompt.model.origin
        else:
            config, name = _check_adapter_file(Path(prompt.model), f"IP-Adapter {index}"), os.fspath(prompt.model)
        try:
            check_fits_unet(config, name, unet)
        except CheckpointError as err:
            raise RequestError(f"IP-Adapter {index}: {err}") from None


def _prompt_tokens(prompt: IPAdapterInput, adapter: LoadedIPAdapter, encoder: LoadedImageEncoder | None,
                   index: int, convention: str = "diffusers") -> tuple[Tensor, Tensor]:
    """The prompt's tokens and the negative rows', (1, T, C) each: its picture's through the encoder (kept,
    `_kept_tokens`; prepared as `convention` says, `picture_pixels`), or a FaceID adapter's of its N face
    embeddings and of zero ones: the faces' T tokens one after another (diffusers' N x T), or under `convention`
    "a1111" their average, (1, T, C) (`average_face_tokens`)."""
    if encoder is None:
        param = next(adapter.model.parameters())
        embeds = face_embeds(prompt.image, adapter.config.embed_dim, f"IP-Adapter {index}")       # (N, E)
        faces, negative = embeds_tokens(adapter.model, embeds.to(device=param.device, dtype=param.dtype))
        if convention == "a1111":
            return average_face_tokens(faces), average_face_tokens(negative)                  # 2 x (1, T, C)
        return faces.reshape(1, -1, faces.shape[-1]), negative.reshape(1, -1, negative.shape[-1])  # 2 x (1, N*T, C)
    pixels = picture_pixels(prompt, encoder.config.image_size, index, convention).unsqueeze(0)  # (1, 3, 224, 224)
    param = next(encoder.model.parameters())
    pixels = pixels.to(device=param.device, dtype=param.dtype)
    if adapter.config.face_id_plus:
        face = face_embeds(prompt.face_embedding, adapter.config.embed_dim, f"IP-Adapter {index}")  # (N, E)
        if len(face) != 1:
            raise RequestError(f"IP-Adapter {index}: an IP-Adapter FaceID Plus takes one face with its one "
                               f"picture; the face embedding holds {len(face)}")
        return _kept_tokens(adapter.model, encoder.model, pixels, (face.to(param.device), face_shortcut(prompt)))
    return _kept_tokens(adapter.model, encoder.model, pixels)


def average_face_tokens(tokens: Tensor) -> Tensor:
    """The mean of N faces' tokens (N, T, C) -> (1, T, C), as A1111's ControlNet extension takes several inputs of
    one FaceID unit: each input's embeds projected alone, then averaged (sd-webui-controlnet
    scripts/ipadapter/plugable_ipadapter.py `hook`: ``ImageEmbed.average_of(...)``, the sum of the stacked
    tensors over their count), the negative rows as the positive ones."""
    return tokens.sum(dim=0, keepdim=True) / len(tokens)                                       # (1, T, C)


def face_shortcut(prompt: IPAdapterInput) -> float | None:
    """The scale of a FaceID Plus input's shortcut: `face_shortcut`, else 1 for a Plus v2 file
    (`is_face_id_plus_v2`), else None (no shortcut)."""
    if prompt.face_shortcut is not None:
        return float(prompt.face_shortcut)
    return 1.0 if is_face_id_plus_v2(prompt.model_path) else None


def picture_pixels(prompt: IPAdapterInput, size: int, index: int, convention: str) -> Tensor:
    """The prompt's picture as its encoder takes it, (3, size, size): transformers' `CLIPImageProcessor`
    (diffusers'), or under `convention` "a1111" A1111's ControlNet extension's squash with its unit's mask
    (`clip_image`). A mask under diffusers' convention, or one not the picture's size, is a RequestError."""
    picture = input_image(prompt.image, f"IP-Adapter {index} image")
    if convention != "a1111":
        if prompt.mask is not None:
            raise RequestError(f"IP-Adapter {index}: a mask is the A1111 ControlNet extension's (control_convention "
                               f"'a1111'), not diffusers'")
        return clip_pixels(picture, size)
    mask = None if prompt.mask is None else input_image(prompt.mask, f"IP-Adapter {index} mask")
    try:
        return extension_clip_pixels(picture, size, mask)
    except ValueError as err:
        raise RequestError(f"IP-Adapter {index}: {err}") from None


def adapter_loras(prompts: Sequence[IPAdapterInput]) -> list[LoraUse]:
    """The U-Net LoRAs the prompts' FaceID files hold (`IPAdapterConfig.unet_lora`), each merged at weight 1 for
    the whole run as diffusers' `load_ip_adapter` merges it (``set_adapters([faceid_i], [1.0])``, whatever the
    adapter's scale or step window); a file two prompts share once.

    Two FaceID files with LoRAs: sdlab merges both, as diffusers' ``set_adapters(["faceid_0", "faceid_1"],
    [1.0, 1.0])`` does. diffusers' `load_ip_adapter` itself calls ``set_adapters([faceid_k], [1.0])`` once per
    file in its loading loop, so only the last file's LoRA stays active: each call replaces the active set, which
    makes loading the earlier LoRAs pointless and the picture depend on the adapters' order, so sdlab takes it as
    an accident of that loop rather than a rule (ComfyUI and A1111 apply each FaceID LoRA the user loads)."""
    uses: dict[Path, LoraUse] = {}
    for index, prompt in enumerate(prompts):
        config = prompt.model.config if isinstance(prompt.model, LoadedIPAdapter) \
            else _check_adapter_file(Path(prompt.model), f"IP-Adapter {index}")
        if config.unet_lora:
            path = Path(prompt.model_path)
            uses.setdefault(path.resolve(), LoraUse(path, 0.0, 1.0, path.stem))
    return list(uses.values())


def _scales(prompt: IPAdapterInput, bundle: ModelBundle, index: int) -> float | tuple[float, ...]:
    """The prompt's scale, or with layer scales its product with each cross-attention's (`ip_adapter_layers`)."""
    if prompt.layer_scales is None:
        return float(prompt.scale)
    try:
        layers = expand_layer_scales(prompt.layer_scales, bundle.unet.cfg, MAX_SCALE)
    except LayerScaleError as err:
        raise RequestError(f"IP-Adapter {index}: {err}") from None
    return tuple(float(prompt.scale) * layer for layer in layers)


def _tokens(adapter: IPAdapter, encoder: torch.nn.Module, pixels: Tensor,
            face: tuple[Tensor, float | None] | None = None) -> tuple[Tensor, Tensor]:
    """The picture's tokens and the negative rows' (1, T, C), as diffusers' `encode_image`: a base adapter
    projects image_embeds and zero embeddings; a Plus or Full-face adapter the penultimate hidden states of the
    picture and of a zero picture (zeros in CLIP's normalised space); a FaceID Plus adapter those hidden states
    with the face embedding (1, E) and a zero one, and its shortcut's scale (`face`). pixels: (1, 3, 224, 224)"""
    with torch.no_grad():
        if face is not None:
            both = encoder(torch.cat([pixels, torch.zeros_like(pixels)])).hidden_states[-2]     # (2, N, W)
            embeds = face[0].to(both.dtype)                                                    # (1, E)
            tokens = adapter.image_proj(torch.cat([embeds, torch.zeros_like(embeds)]), both, face[1])  # (2, T, C)
            return tokens[:1], tokens[1:]
        if adapter.reads_hidden_states:
            both = encoder(torch.cat([pixels, torch.zeros_like(pixels)])).hidden_states[-2]     # (2, N, W)
            tokens = adapter.image_proj(both)                                                  # (2, T, C)
            return tokens[:1], tokens[1:]
        return embeds_tokens(adapter, encoder(pixels).image_embeds)                            # 2 x (1, T, C)


class ImagePromptedNet:
    """`net(x, t, context, ..., image_tokens=None, control_step=None)`: the wrapped network (the U-Net, or the
    `ControlledUNet` around it) called with the U-Net's `image_prompt` built from `image_tokens` (B, sum T_i,
    C_ctx), each adapter's slice of them with its scale, the adapters outside their step window at
    `control_step` (i, N) left out (none left: no image prompt). `control_step` goes on to a `ControlledUNet`,
    not to a bare U-Net."""

    def __init__(self, net: Any, unet: torch.nn.Module, prepared: PreparedImagePrompts):
        self.net = net
        self.attentions = cross_attentions(unet)
        self.prepared = prepared
        self.adapters = prepared.adapters
        self.takes_step = net is not unet

    def parameters(self):   # the Denoiser reads the net's dtype from its first parameter
        return self.net.parameters()

    def __call__(self, x: Tensor, t: Tensor, *args: Any, image_tokens: Tensor | None = None,
                 control_step: tuple[int, int] | None = None, **kwargs: Any) -> Tensor:
        if self.takes_step and control_step is not None:
            kwargs["control_step"] = control_step
        if image_tokens is None:
            return self.net(x, t, *args, **kwargs)
        bound, start = [], 0
        for (adapter, scale, count), active in zip(self.adapters, self.prepared.active(control_step)):
            if active:
                bound.append((adapter, image_tokens[:, start:start + count], scale))         # (B, T_i, C)
            start += count
        if not bound:
            return self.net(x, t, *args, **kwargs)
        return self.net(x, t, *args, image_prompt=ImagePrompt(self.attentions, bound), **kwargs)


def image_prompted(net: Any, unet: torch.nn.Module, prepared: PreparedImagePrompts | None) -> Any:
    """`net` itself without image prompts, else the `ImagePromptedNet` around it."""
    return net if prepared is None else ImagePromptedNet(net, unet, prepared)


def image_prompt_conds(prepared: PreparedImagePrompts | None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The `image_tokens` entries of the conditional and unconditional condition dicts; none without prompts."""
    if prepared is None:
        return {}, {}
    return {"image_tokens": prepared.cond_tokens}, {"image_tokens": prepared.uncond_tokens}


def _number(value: float) -> str:
    return f"{value:g}"


def infotext_lines(prompts: Sequence[IPAdapterInput], first_unit: int = 0) -> dict[str, str]:
    """sdlab's infotext lines of the image prompts, {"IP-Adapter 0": "Model: NAME [hash], Weight: 0.7"}: NAME is
    the adapter file's name without its suffix, hash A1111's short model hash (as a ControlNet line names its
    model); per-layer scales add "Layers: style" or their compact text ("Layers: down.block_2=0/1 up.block_0=0/1/0"),
    a step window other than every step `Guidance Start` / `Guidance End`. An A1111 unit's (`module` set) is the
    line the ControlNet extension writes for it (`serialize_unit`), "ControlNet N": "Module: ip-adapter_clip_sd15,
    Model: NAME [hash], Weight: 0.7, Guidance Start: 0, Guidance End: 1", numbered by its `unit` place, else on
    from `first_unit` (after the request's ControlNet units); a resize mode given (`resize_mode`: an A1111 unit's
    always) adds "Resize Mode: Crop and Resize" after the Weight, where the extension writes it (it fits the picture
    an "Only masked" run cuts, `in_region`); the unit's processor resolution and control mode, which do not act on
    an IP-Adapter, are left out. The picture itself is not recorded: a redraw is given it again
    (`--ip-adapter-image`)."""
    lines, own, unit = {}, 0, first_unit
    for prompt in prompts:
        path = prompt.model_path
        try:
            model = f"{Path(path).stem} [{legacy_hash(path)}]"
        except OSError:
            model = Path(path).stem
        window = f", Guidance Start: {_number(float(prompt.start))}, Guidance End: {_number(float(prompt.end))}"
        resize = "" if prompt.resize_mode is None else f", Resize Mode: {RESIZE_MODES[prompt.resize_mode]}"
        if prompt.module is not None:
            number, unit = (unit, unit + 1) if prompt.unit is None else (prompt.unit, unit)
            lines[f"ControlNet {number}"] = (f"Module: {prompt.module}, Model: {model}, "
                                             f"Weight: {_number(float(prompt.scale))}{resize}{window}")
            continue
        label, own = f"IP-Adapter {own}", own + 1
        lines[label] = f"Model: {model}, Weight: {_number(float(prompt.scale))}{resize}"
        if prompt.layer_scales is not None:
            lines[label] += f", Layers: {layer_scales_text(prompt.layer_scales)}"
        shortcut = face_shortcut(prompt) if prompt.face_embedding is not None else None   # FaceID Plus only
        if shortcut is not None:            # given, or a Plus v2 file's by its name: a renamed file redraws the same
            lines[label] += f", Face shortcut: {_number(shortcut)}"
        if prompt.windowed:
            lines[label] += window
    return lines


A1111_MODULES = (*MODULE_ENCODERS, *FACE_ID_MODULES)
"""The preprocessors of an IP-Adapter unit of A1111's ControlNet extension (and Forge's) that sdlab draws: the
picture's CLIP image embeddings, which the adapter file decides how to read (`ip_adapter_units`: sd-webui-controlnet
scripts/preprocessor/legacy/preprocessor_compiled.py, tag "IP-Adapter": ip-adapter_clip_sd15 and _sdxl_plus_vith
with ViT-H, _sdxl with bigG; its later names ip-adapter_clip_h / _clip_g and ip-adapter-auto; Forge's CLIP-ViT-H /
CLIP-ViT-bigG (IPAdapter)); and its FaceID ones (ip-adapter_face_id, _face_id_plus), whose face embedding the
extension computes with InsightFace and sdlab is given (`ip_adapter_units.FACE_ID_MODULES`: a redraw is given it
again, as the picture). Its other face preprocessors (ip-adapter_pulid, InstantID's) it does not draw."""


def is_ip_adapter_unit(line: str) -> bool:
    """Whether a "ControlNet N" infotext line is an IP-Adapter unit (its Module an ip-adapter preprocessor), as
    the ControlNet extension and Forge record one: "Module: ip-adapter_clip_sd15, Model: ip-adapter_sd15 [hash],
    Weight: 0.7, ..." (`ip_adapter_units.is_ip_adapter_module`)."""
    return is_ip_adapter_module(_line_fields(line).get("Module", ""))


def recorded_ip_adapters(recorded: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, line) of each image prompt parsed infotext `recorded` holds, in the order a redraw's adapters take
    them: sdlab's "IP-Adapter N" lines, then the ControlNet extension's IP-Adapter units ("ControlNet N" lines,
    `is_ip_adapter_unit`)."""
    def numbered(prefix: str) -> list[str]:
        labels = [label for label in recorded if label.startswith(prefix) and label[len(prefix):].isdigit()]
        return sorted(labels, key=lambda label: int(label[len(prefix):]))

    own = [(label, str(recorded[label])) for label in numbered("IP-Adapter ")]
    units = [(label, str(recorded[label])) for label in numbered("ControlNet ") if is_ip_adapter_unit(recorded[label])]
    return own + units


def check_recorded_module(line: str) -> str | None:
    """The Module an IP-Adapter unit's "ControlNet N" line records (None: an "IP-Adapter N" line, which has none);
    one sdlab does not draw (`A1111_MODULES`) is a ValueError naming it. A redraw takes the image encoder the
    module names (`ip_adapter_units.unit_image_encoder`), as the unit did."""
    module = _line_fields(line).get("Module")
    if module is not None and module.strip().lower() not in A1111_MODULES:
        raise ValueError(f"Module {module!r} is not one sdlab draws ({', '.join(A1111_MODULES)})")
    return None if module is None else module.strip()


def recorded_window(line: str) -> dict[str, float]:
    """The `start` / `end` an image prompt's infotext line records (its Guidance Start / End; a label it lacks
    is 0 / 1), none where they are every step; one that is not a number is a ValueError naming it."""
    fields, window = _line_fields(line), {"start": 0.0, "end": 1.0}
    for label, key in (("Guidance Start", "start"), ("Guidance End", "end")):
        if label in fields:
            try:
                window[key] = float(fields[label])
            except ValueError:
                raise ValueError(f"{label} {fields[label]!r} is not a number") from None
    return {} if window == {"start": 0.0, "end": 1.0} else window


def recorded_resize_mode(line: str) -> str | None:
    """The resize mode (sdlab's name, `control.RESIZE_MODES`) an image prompt's infotext line records ("Resize
    Mode: Crop and Resize", or an older name of the extension's); None where it records none. Another label is a
    ValueError naming it."""
    label = _line_fields(line).get("Resize Mode")
    if label is None:
        return None
    name = a1111_mode(label, RESIZE_MODES)
    if name is None:
        raise ValueError(f"Resize Mode {label!r} is not one of {', '.join(RESIZE_MODES.values())}")
    return name


def recorded_weight(line: str) -> float | None:
    """The Weight an "IP-Adapter N" infotext line (`infotext_lines`) or an IP-Adapter unit's "ControlNet N" line
    records; None where it records none. One that is not a number is a ValueError naming it."""
    fields = _line_fields(line)
    if "Weight" not in fields:
        return None
    try:
        return float(fields["Weight"])
    except ValueError:
        raise ValueError(f"Weight {fields['Weight']!r} is not a number") from None


def recorded_face_shortcut(line: str) -> float | None:
    """The FaceID Plus shortcut scale an "IP-Adapter N" infotext line records ("Face shortcut: X",
    `infotext_lines`); None where it records none. One that is not a number is a ValueError naming it."""
    value = _line_fields(line).get("Face shortcut")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"Face shortcut {value!r} is not a number") from None


def recorded_layer_scales(line: str) -> str | None:
    """The per-layer scales an "IP-Adapter N" infotext line records ("Layers: ..."), checked; None where it records
    none. Ones sdlab cannot read are a ValueError naming them."""
    layers = _line_fields(line).get("Layers")
    if layers is None:
        return None
    try:
        check_layer_scales(layers, MAX_SCALE)
    except LayerScaleError as err:
        raise ValueError(f"Layers {layers!r}: {err}") from None
    return layers.strip()


def layer_settings(layer_scales: Mapping[str, Any] | str | None) -> dict[str, str]:
    """The `layer_scales` entry of a native `ip_adapters` item (their compact text, `layer_scales_text`); none
    without per-layer scales."""
    return {} if layer_scales is None else {"layer_scales": layer_scales_text(layer_scales)}
