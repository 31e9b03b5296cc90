"""The sd-webui-controlnet extension's Control Types over sdlab's preprocessors (`GET /controlnet/control_types`,
the web UI's Control Type radios).

The extension lists a type's preprocessors by tag: each preprocessor carries the types it serves
(`Preprocessor.tags`), the types are "All" and every tag any preprocessor carries (`get_all_preprocessor_tags`),
a type lists "none" and the preprocessors tagged with it (`get_filtered_preprocessors`), its default is the
first after "none" ("none" where it lists nothing else: `get_default_preprocessor`), and every list is in one
order: "none", then by `sorting_priority`, higher first, ties by label in reverse (`get_sorted_preprocessors`,
which sorts `str(priority).zfill(8) + label` descending). "All" lists every preprocessor, default "none".
A type's models are those whose names hold its lower-cased name or one of its other words
(`Preprocessor.tag_to_filters`; the family test is `a1111_controlnet._control_type`'s).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ListedPreprocessor:
    """One of sdlab's preprocessors as the extension registers it."""

    name: str                       # the extension's name (`Preprocessor.name`), the one a unit's module may give
    label: str                      # the name its lists show (`Preprocessor.label`)
    tags: tuple[str, ...]           # the control types that list it
    priority: int = 0               # `sorting_priority`: higher is listed first


LISTED_PREPROCESSORS = (
    ListedPreprocessor("none", "none", ("InstructP2P",), 10),
    ListedPreprocessor("canny", "canny", ("Canny",), 100),
    ListedPreprocessor("invert", "invert (from white bg & black line)", ("Canny", "Lineart", "Scribble", "MLSD"), 20),
    ListedPreprocessor("threshold", "threshold", ()),
    ListedPreprocessor("tile_resample", "tile_resample", ("Tile",), 100),
    ListedPreprocessor("inpaint", "inpaint_global_harmonious", ("Inpaint",)),
    ListedPreprocessor("inpaint_only", "inpaint_only", ("Inpaint",), 100),
    ListedPreprocessor("ip-adapter-auto", "ip-adapter-auto", ("IP-Adapter",), 1000),
    ListedPreprocessor("ip-adapter_clip_sd15", "ip-adapter_clip_h", ("IP-Adapter",), 100),
    ListedPreprocessor("ip-adapter_clip_sdxl", "ip-adapter_clip_g", ("IP-Adapter",)),
    ListedPreprocessor("ip-adapter_clip_sdxl_plus_vith", "ip-adapter_clip_sdxl_plus_vith", ("IP-Adapter",)),
    ListedPreprocessor("ip-adapter_face_id", "ip-adapter_face_id", ("IP-Adapter",)),
    ListedPreprocessor("ip-adapter_face_id_plus", "ip-adapter_face_id_plus", ("IP-Adapter",)),
    # sdlab's own (the extension has no preprocessor of these names), under the type whose models read their hint
    ListedPreprocessor("scribble", "scribble", ("Scribble",)),
    ListedPreprocessor("tile", "tile", ("Tile",)),
)
"""The extension's preprocessors that sdlab runs (`pipeline.preprocess.PREPROCESSORS`, the IP-Adapter modules of
`pipeline.ip_adapter_units.LISTED_MODULES`), with their labels, tags and sorting priorities in the extension
(`scripts/preprocessor/model_free_preprocessors.py`, `inpaint.py`, `ip_adapter_auto.py`,
`legacy/preprocessor_compiled.py`: the FaceID ones, which sdlab draws given their face embedding, priority 0), and
sdlab's own two."""

CONTROL_TYPES = (
    "All", "Canny", "Depth", "IP-Adapter", "Inpaint", "Instant-ID", "InstructP2P", "Lineart", "MLSD", "NormalMap",
    "OpenPose", "Recolor", "Reference", "Revision", "Scribble", "Segmentation", "Shuffle", "SoftEdge", "SparseCtrl",
    "T2I-Adapter", "Tile",
)
"""The extension's control types: "All", then the tags of all its preprocessors, sorted (those sdlab has not, such
as Depth, list "none" alone and keep their models)."""

TYPE_WORDS = {
    "instructp2p": ("ip2p",), "segmentation": ("seg",), "normalmap": ("normal",),
    "t2i-adapter": ("t2i_adapter", "t2iadapter", "t2ia"), "ip-adapter": ("ip_adapter", "ipadapter"),
    "openpose": ("openpose", "densepose"), "instant-id": ("instant_id", "instantid"), "scribble": ("sketch",),
    "tile": ("blur",),
}
"""The other words of a type (lower case) its models' names may hold (`Preprocessor.tag_to_filters`)."""


def type_words(control_type: str) -> list[str]:
    """The words a model's lower-cased name holds to be listed under `control_type`: its name, lower case, and
    its `TYPE_WORDS`."""
    pattern = control_type.lower()
    return [pattern, *TYPE_WORDS.get(pattern, ())]


def sorted_preprocessors() -> list[ListedPreprocessor]:
    """Every preprocessor in the extension's order (`get_sorted_preprocessors`): "none", then the others by priority
    and label, descending. `/controlnet/module_list` lists them so (`external_code.get_modules`: their names, or
    their labels with `alias_names`), as does the "All" type."""
    none, *others = LISTED_PREPROCESSORS
    return [none, *sorted(others, key=lambda p: str(p.priority).zfill(8) + p.label, reverse=True)]


def type_preprocessors(control_type: str) -> tuple[list[str], str]:
    """The labels `control_type` lists, in the extension's order, and its default preprocessor's: every one and
    "none" for "All"; else "none" and those tagged with the type, the first after "none" the default ("none"
    where it lists nothing else)."""
    if control_type.lower() == "all":
        return [p.label for p in sorted_preprocessors()], "none"
    listed = [p.label for p in sorted_preprocessors() if control_type in p.tags or p.label == "none"]
    return listed, listed[0] if len(listed) == 1 else listed[1]
