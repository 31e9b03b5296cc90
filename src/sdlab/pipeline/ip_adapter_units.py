"""IP-Adapter units of A1111's ControlNet extension (sd-webui-controlnet) and Forge: which preprocessors
("modules") sdlab draws, and the CLIP image encoder each one names.

The extension's IP-Adapter preprocessors are CLIP vision towers (`annotator/clipvision`, `ClipVisionDetector`):

    ip-adapter_clip_h, ip-adapter_clip_sd15, ip-adapter_clip_sdxl_plus_vith    clip_h.pth   OpenCLIP ViT-H/14
    ip-adapter_clip_g, ip-adapter_clip_sdxl                                   clip_g.pth   OpenCLIP ViT-bigG/14
    CLIP-ViT-H (IPAdapter), CLIP-ViT-bigG (IPAdapter)  (Forge)               CLIP-ViT-H-14 / CLIP-ViT-bigG
    ip-adapter-auto: the module of the model's preset (`scripts/ipadapter/presets.py`, by the file's stem)

(the later names clip_h / clip_g are those of `scripts/ipadapter/presets.py`; the older ones those of
`preprocessor_compiled.py`). sdlab looks for the encoder a module names by the extension's and Forge's file
names (`ENCODER_NAMES`: a file with a checkpoint suffix, or a Hugging Face folder of that name) in a
`clip_vision` folder beside the adapter or one up (the extension's `models/clip_vision`, Forge's and ComfyUI's),
or Forge's `ControlNetPreprocessor` one up; where none is there, it takes the adapter's own `image_encoder`
folder (`image_prompt.image_encoder_of`, as sdlab's other doors do), unless that one is the other tower by its
width.
The encoder must fit the adapter (its image embeddings, or a Plus adapter's hidden states, as wide as the
adapter reads): a module whose encoder does not is refused by name, as is a module whose encoder is nowhere.
For ip-adapter-auto without a preset sdlab takes the first encoder that fits (ViT-H's places first).

The face preprocessors (InsightFace: FaceID, FaceID Plus, PuLID, InstantID) need a face-analysis network
sdlab does not have: a unit with one is refused naming it (`FACE_MODULES`), but for the FaceID ones given the
embedding the preprocessor would compute (`FACE_ID_MODULES`: the extension's API-only `ipadapter_input`, the
native `face_embedding`): ip-adapter_face_id draws a FaceID adapter with no image encoder, ip-adapter_face_id_plus
a FaceID Plus adapter with the ViT-H encoder (the extension's `face_id_plus` preprocessor reads the picture with
clip_h), each refused naming the other for the other kind of file.
"""

from __future__ import annotations

from pathlib import Path

from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.image_encoder import TOWERS_BY_WIDTH, image_encoder_config
from sdlab.checkpoints.ip_adapter import read_ip_adapter
from sdlab.models.clip_vision import CLIPVisionConfig
from sdlab.models.ip_adapter import IPAdapterConfig
from sdlab.pipeline.request import RequestError

CLIP_H, CLIP_G = "clip_h", "clip_g"
TOWER_NAMES = {CLIP_H: "ViT-H/14", CLIP_G: "ViT-bigG/14"}
MODULE_ENCODERS: dict[str, str | None] = {
    "ip-adapter_clip_h": CLIP_H, "ip-adapter_clip_sd15": CLIP_H, "ip-adapter_clip_sdxl_plus_vith": CLIP_H,
    "ip-adapter_clip_g": CLIP_G, "ip-adapter_clip_sdxl": CLIP_G,
    "clip-vit-h (ipadapter)": CLIP_H, "clip-vit-bigg (ipadapter)": CLIP_G,
    "ip-adapter-auto": None,
}
"""The IP-Adapter modules sdlab draws (lower case) -> the encoder each names (None: the model's, ip-adapter-auto)."""
FACE_MODULES = ("ip-adapter_face_id", "ip-adapter_face_id_plus", "ip-adapter_pulid", "instant_id_face_embedding",
                "instant_id_face_keypoints", "insightface+clip-h (ipadapter)", "insightface (instantid)")
"""The extension's and Forge's IP-Adapter / InstantID modules that read faces with InsightFace (refused)."""
FACE_ID_MODULES: dict[str, str | None] = {"ip-adapter_face_id": None, "ip-adapter_face_id_plus": CLIP_H}
"""The face modules sdlab draws given the face embedding their InsightFace would compute -> the encoder each names
(None: FaceID reads no picture)."""
LISTED_MODULES = tuple(sorted([*(name for name in MODULE_ENCODERS if not name.endswith("(ipadapter)")),
                               *FACE_ID_MODULES]))
"""The extension's names and labels of them and of the FaceID modules (ip-adapter_clip_sd15 and its label
ip-adapter_clip_h, ..., ip-adapter_face_id, ip-adapter_face_id_plus; Forge's own are not the extension's): those a
unit may name by the extension's spelling. `/controlnet/module_list` lists each once, by name or label, as
`server/control_types.LISTED_PREPROCESSORS` has it (so the web UI's IP-Adapter box offers them, and Reuse of an
A1111 FaceID picture finds its module there)."""
PRESET_ENCODERS = {
    "ip-adapter_sd15": CLIP_H, "ip-adapter_sd15_light": CLIP_H, "ip-adapter_sd15_light_v11": CLIP_H,
    "ip-adapter_sd15_vit-G": CLIP_G, "ip-adapter-plus_sd15": CLIP_H, "ip-adapter_sd15_plus": CLIP_H,
    "ip-adapter_plus_composition_sd15": CLIP_H, "ip-adapter-plus-face_sd15": CLIP_H,
    "ip-adapter-full-face_sd15": CLIP_H, "ip-adapter_sdxl": CLIP_G, "ip-adapter_sdxl_vit-h": CLIP_H,
    "ip-adapter-plus_sdxl_vit-h": CLIP_H, "ip-adapter_plus_composition_sdxl": CLIP_H,
    "ip-adapter-plus-face_sdxl_vit-h": CLIP_H,
}
"""ip-adapter-auto's presets (the extension's `ipadapter_presets`): a model's file stem -> its module's encoder."""
ENCODER_NAMES = {CLIP_H: ("clip_h", "CLIP-ViT-H-14"), CLIP_G: ("clip_g", "CLIP-ViT-bigG")}
ENCODER_PLACES = ("clip_vision", "../clip_vision", "../ControlNetPreprocessor")
"""Where a module's encoder is looked for, relative to the adapter file's folder."""
ENCODER_SUFFIXES = (".safetensors", ".pth", ".bin", ".pt")


def is_ip_adapter_module(module: object) -> bool:
    """Whether a unit's module is one of the extension's or Forge's IP-Adapter (or InstantID) preprocessors."""
    name = module.strip().lower() if isinstance(module, str) else ""
    return name.startswith("ip-adapter") or name.endswith("(ipadapter)") or name in FACE_MODULES


def check_module(module: str) -> str:
    """The module's name in lower case; a RequestError for a face module or one sdlab does not know."""
    name = module.strip().lower()
    if name in FACE_ID_MODULES:
        return name
    if name in FACE_MODULES:
        raise RequestError(f"the IP-Adapter module {module!r} reads faces with InsightFace, which sdlab does not "
                           f"have; sdlab draws the CLIP modules: {', '.join(MODULE_ENCODERS)}")
    if name not in MODULE_ENCODERS:
        raise RequestError(f"unknown IP-Adapter module {module!r}; sdlab draws: {', '.join(MODULE_ENCODERS)}")
    return name


def _named_places(adapter: Path, tower: str) -> list[Path]:
    """The files and folders where the encoder `tower` is looked for beside `adapter`, in order."""
    places = []
    for folder in ENCODER_PLACES:
        base = (adapter.parent / folder).resolve()
        for stem in ENCODER_NAMES[tower]:
            places += [base / stem, *(base / f"{stem}{suffix}" for suffix in ENCODER_SUFFIXES)]
    return places


def _own_encoder(adapter: Path) -> Path | None:
    """The adapter's own `image_encoder` folder (`image_prompt.image_encoder_of`), None where there is none."""
    from sdlab.pipeline.image_prompt import image_encoder_of

    try:
        return image_encoder_of(adapter)
    except RequestError:
        return None


def _config(path: Path) -> CLIPVisionConfig:
    try:
        return image_encoder_config(path)
    except CheckpointError as err:
        raise RequestError(str(err)) from None


def _reads_hidden_states(adapter: IPAdapterConfig) -> bool:
    """Whether the adapter reads the encoder's hidden states (a Plus or FaceID Plus adapter), not its embeddings."""
    return adapter.resampler is not None or adapter.face_id_plus


def _read_width(adapter: IPAdapterConfig) -> int:
    """The width of what the adapter reads from its encoder (FaceID Plus: `clip_width`; `embed_dim` is its face's)."""
    return adapter.clip_width if adapter.face_id_plus else adapter.embed_dim


def _reads(adapter: IPAdapterConfig) -> str:
    """What width of the encoder the adapter reads, in words."""
    return (f"{_read_width(adapter)}-wide hidden states" if _reads_hidden_states(adapter)
            else f"{adapter.embed_dim}-wide image embeddings")


def _fits(adapter: IPAdapterConfig, encoder: CLIPVisionConfig) -> bool:
    """Whether the encoder gives what the adapter reads (a Plus adapter: hidden states; a base one: embeddings)."""
    width = encoder.width if _reads_hidden_states(adapter) else encoder.projection_dim
    return width == _read_width(adapter)


def _gives(adapter: IPAdapterConfig, encoder: CLIPVisionConfig) -> str:
    return (f"{encoder.width}-wide hidden states" if _reads_hidden_states(adapter)
            else f"{encoder.projection_dim}-wide image embeddings")


def _candidates(adapter: Path, tower: str) -> list[tuple[Path, CLIPVisionConfig]]:
    """The encoders found for `tower` beside `adapter`: its named files and folders, else the adapter's own
    `image_encoder` unless its width is the other tower's."""
    found = [(place, _config(place)) for place in _named_places(adapter, tower) if place.exists()]
    own = None if found else _own_encoder(adapter)
    if own is not None:
        config = _config(own)
        known = TOWERS_BY_WIDTH.get(config.width, ("", None))[0]
        if known not in (name for key, name in TOWER_NAMES.items() if key != tower):
            found.append((own, config))
    return found


def _face_id_towers(name: str, module: str, adapter: Path, config: IPAdapterConfig) -> list[str]:
    """The encoder a FaceID module names for a FaceID (Plus) file (none for FaceID); a RequestError where the module
    and the file are not of one kind (a CLIP module, or the other FaceID module, or a FaceID module for a file that
    is not FaceID)."""
    kind = f"FaceID{' Plus' if config.face_id_plus else ''}"
    wanted = "ip-adapter_face_id_plus" if config.face_id_plus else "ip-adapter_face_id"
    if not config.face_id:
        raise RequestError(f"module {module!r} reads a face embedding for an IP-Adapter FaceID, and {adapter.name} "
                           "is none (it reads a picture): choose a CLIP module (ip-adapter_clip_h, ip-adapter_clip_g "
                           "or ip-adapter-auto)")
    if name not in FACE_ID_MODULES:
        flag = "--ip-adapter-face-embedding" if config.face_id_plus else "--ip-adapter-image"
        raise RequestError(f"the IP-Adapter {adapter.name} is a {kind} model: it reads an InsightFace face embedding "
                           f"({config.embed_dim} numbers), which sdlab does not compute, not a CLIP module's "
                           f"picture; give it the module {wanted} with the embedding (an A1111 unit's "
                           "ipadapter_input, the native face_embedding, the CLI's "
                           f"{flag} FILE.npy)")
    if name != wanted:
        raise RequestError(f"module {module!r} is not for the IP-Adapter {adapter.name}, a {kind} model: choose "
                           f"{wanted}")
    tower = FACE_ID_MODULES[name]
    return [] if tower is None else [tower]


def unit_image_encoder(module: str, adapter: str | Path) -> Path | None:
    """The image encoder a unit's `module` names for the IP-Adapter file `adapter` (module docstring; None: a FaceID
    adapter under ip-adapter_face_id, which reads no picture); a RequestError naming the module where it is
    missing or does not fit the adapter."""
    name = check_module(module)
    adapter = Path(adapter)
    try:
        config = read_ip_adapter(adapter)[0]
    except CheckpointError as err:
        from sdlab.pipeline.image_prompt import _check_adapter_file

        _check_adapter_file(adapter, "IP-Adapter")      # names the kind of file it is, and the option that takes it
        raise RequestError(str(err)) from None
    if config.face_id or name in FACE_ID_MODULES:
        towers = _face_id_towers(name, module, adapter, config)
        if not towers:
            return None
    else:
        towers = [MODULE_ENCODERS[name]] if MODULE_ENCODERS[name] else \
            [PRESET_ENCODERS[adapter.stem]] if adapter.stem in PRESET_ENCODERS else [CLIP_H, CLIP_G]
    found = [(tower, path, encoder) for tower in towers for path, encoder in _candidates(adapter, tower)]
    if not found:
        wanted = " or ".join(f"{TOWER_NAMES[t]} ({' / '.join(ENCODER_NAMES[t])})" for t in towers)
        raise RequestError(f"module {module!r} draws with the {wanted} image encoder, and there is none: looked "
                           f"in {', '.join(str((adapter.parent / p).resolve()) for p in ENCODER_PLACES)} for a "
                           "file (.safetensors, .pth, .bin) or folder of that name, and for the adapter's "
                           "image_encoder folder")
    fitting = [path for _, path, encoder in found if _fits(config, encoder)]
    if fitting:
        return fitting[0]
    _, path, encoder = found[0]
    raise RequestError(f"module {module!r} draws with the image encoder {path} ({_gives(config, encoder)}), but "
                       f"the IP-Adapter {adapter.name} reads {_reads(config)}: choose the module of the encoder "
                       f"it was trained with (ip-adapter_clip_h or ip-adapter_clip_g, or ip-adapter-auto)")
