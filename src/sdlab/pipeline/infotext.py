"""A generation request <-> the A1111-style `parameters` text stored in sdlab's PNGs.

`to_parameters` writes A1111's labels (Steps, Sampler, Schedule type, CFG scale, Seed, Size, ...) plus
sdlab's own exactness settings under their own labels, so `--from-png` reproduces the picture;
`from_parameters` reads the fields back as `GenerationRequest` keyword arguments, and also reads
the common fields of files written by A1111.
"""

from __future__ import annotations

from typing import Any

from sdlab.pipeline.png_info import NEGATIVE_PROMPT, PROMPT, version_label
from sdlab.pipeline.request import GenerationRequest

# A1111 label -> (request field, parser)
_FIELDS: dict[str, tuple[str, type]] = {
    "Steps": ("steps", int),
    "Sampler": ("sampler", str),
    "Schedule type": ("schedule", str),
    "CFG scale": ("cfg_scale", float),
    "Seed": ("seed", int),
    "Clip skip": ("clip_skip", int),
    "Denoising strength": ("strength", float),
    "Eta": ("eta", float),
    "CFG rescale": ("guidance_rescale", float),
    "Mask blur": ("mask_blur", float),
    "Initial noise": ("init_noise", str),
    "Img2img steps": ("img2img_convention", str),
    "Timestep rounding": ("quantize_timesteps", bool),
}


def to_parameters(req: GenerationRequest, *, index: int = 0, model_name: str | None = None,
                  model_hash: str | None = None) -> dict[str, Any]:
    """The labelled parameters of image `index` of a resolved request (its seed is seed + index)."""
    p: dict[str, Any] = {
        PROMPT: req.prompt,
        NEGATIVE_PROMPT: req.negative_prompt,
        "Steps": req.steps,
        "Sampler": req.sampler,
        "Schedule type": req.schedule,
        "CFG scale": req.cfg_scale,
        "Seed": req.seeds()[index],
        "Size": f"{req.width}x{req.height}",
        "Model hash": model_hash,
        "Model": model_name,
        "Clip skip": req.clip_skip if req.clip_skip != 1 else None,
        "Denoising strength": req.strength if req.init_image is not None else None,
        "Eta": req.eta,
        "CFG rescale": req.guidance_rescale or None,
        "Mask blur": req.mask_blur or None,
        "Initial noise": req.init_noise if req.init_noise != "sigma_max" else None,
        "Img2img steps": req.img2img_convention if req.init_image is not None else None,
        "Timestep rounding": "true" if req.quantize_timesteps else None,
        "Version": version_label(),
    }
    return p


def from_parameters(p: dict[str, Any]) -> dict[str, Any]:
    """`GenerationRequest` keyword arguments from parsed parameters (unknown labels are ignored)."""
    fields: dict[str, Any] = {"prompt": str(p.get(PROMPT, "")), "negative_prompt": str(p.get(NEGATIVE_PROMPT, ""))}
    for label, (name, kind) in _FIELDS.items():
        if label not in p:
            continue
        value = p[label]
        if kind is bool:
            fields[name] = str(value).lower() in ("true", "1", "yes")
        else:
            try:
                fields[name] = kind(value)
            except (TypeError, ValueError):
                raise ValueError(f"the PNG's {label!r} value {value!r} is not a valid {kind.__name__}") from None
    if "Size" in p:
        try:
            width, height = (int(v) for v in str(p["Size"]).lower().split("x"))
        except ValueError:
            raise ValueError(f"the PNG's Size value {p['Size']!r} is not WIDTHxHEIGHT") from None
        fields["width"], fields["height"] = width, height
    sampler = fields.get("sampler", "")
    for suffix in (" Karras", " Exponential"):  # older A1111 files name the schedule in the sampler
        if sampler.endswith(suffix) and "schedule" not in fields:
            fields["sampler"], fields["schedule"] = sampler[: -len(suffix)], suffix.strip()
    if "schedule" in fields:
        fields["schedule"] = fields["schedule"].strip().lower().replace(" ", "_")
        if fields["schedule"] == "automatic":  # A1111: the sampler's own default
            del fields["schedule"]
    return fields
