"""ComfyUI's API-format graph -> one sdlab generation (`GraphPlan`), or ComfyUI's validation errors.

An API-format graph is `{node_id: {"class_type": ..., "inputs": {...}}}`, an input linked to another node's output
written `[source_id, output_index]` (ComfyUI's script_examples/websockets_api_example.py). sdlab draws the graphs of
the standard txt2img / img2img pictures: one KSampler fed by

    CheckpointLoaderSimple -> (LoraLoader ...) -> KSampler.model
                           -> (LoraLoader ... / CLIPSetLastLayer) -> CLIPTextEncode -> KSampler.positive / negative
    EmptyLatentImage -> KSampler.latent_image                                  (txt2img)
    LoadImage -> VAEEncode -> KSampler.latent_image                            (img2img, KSampler's denoise)
    LoadImage -> VAEEncode -> SetLatentNoiseMask -> KSampler.latent_image      (inpainting: the mask a LoadImage's
    LoadImage.MASK ---------> SetLatentNoiseMask.mask                           MASK, 1 - its alpha, or a
                                                                               LoadImageMask's channel)
    LoadImage (+ MASK) -> VAEEncodeForInpaint -> KSampler.latent_image          (inpainting as ComfyUI's
                                                                               VAEEncodeForInpaint: masked pixels
                                                                               grey, the noise mask grown)
    KSampler -> VAEDecode -> SaveImage / PreviewImage
    VAEDecode -> ImageUpscaleWithModel -> SaveImage / PreviewImage              (the pictures through an upscaler
    UpscaleModelLoader -> .upscale_model                                         network as ComfyUI tiles it)
    VAEDecode -> (ImageUpscaleWithModel / ImageScale / ImageScaleBy ...) -> SaveImage   (ComfyUI's "upscale x4, then
                                                                               scale by 0.5": the pictures through
                                                                               one model and any scales, in order)
    KSampler -> LatentUpscale / LatentUpscaleBy -> KSampler -> VAEDecode       (ComfyUI's two-pass hires fix, from
                                                                               an EmptyLatentImage or a VAEEncode,
                                                                               both KSamplers with the same
                                                                               ControlNets: the request's hires
                                                                               fix, hr_convention comfyui)
    (the VAE of VAEEncode / VAEDecode: the checkpoint's own, or a VAELoader's file)
    CLIPTextEncode -> ControlNetApply / ControlNetApplyAdvanced ... -> KSampler.positive / negative
    ControlNetLoader -> .control_net, LoadImage -> .image         (ControlNets in a row, drawn as the request's
                                                                   controls by ComfyUI's rules: `_Plan.controls`)
    CLIPTextEncode -> ConditioningSetArea / ConditioningSetAreaPercentage / ConditioningSetAreaStrength
                   -> ConditioningCombine ... -> KSampler.positive    (ComfyUI's area composition: the request's
                                                                       area prompts, `_Plan.positive_areas`)

`NODES` is the table of those nodes: their inputs (ComfyUI's `INPUT_TYPES`, the lists a server fills in at
`Choices`), outputs and whether they are output nodes, as `GET /object_info` shows them. Checking follows ComfyUI's
`execution.validate_inputs` / `validate_prompt` (comfyanonymous/ComfyUI execution.py): the same error types
(`required_input_missing`, `bad_linked_input`, `return_type_mismatch`, `value_not_in_list`, `value_smaller_than_min`,
`value_bigger_than_max`, `invalid_input_type`, `prompt_no_outputs`, `prompt_outputs_failed_validation`), with
sdlab's own for a node it does not draw (`unsupported_node`) and for a graph of supported nodes wired in a way one
generation does not draw (`unsupported_graph`).

The KSampler's sampler_name is ComfyUI's spelling, which brings ComfyUI's conventions to the request
(`pipeline.request`'s module docstring: its start-noise scale, its step noise, its `denoise`, its empty negative).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from sdlab.diffusion.samplers import comfyui_spelling
from sdlab.pipeline.comfy_image_upscale import COMFY_IMAGE_UPSCALE_METHODS, PictureScale, PictureStep, ThroughModel
from sdlab.pipeline.comfy_latent_upscale import COMFY_CROPS, COMFY_LATENT_UPSCALE_METHODS
from sdlab.pipeline.comfy_prompt import AreaPrompt

MAX_SEED = 0xFFFFFFFFFFFFFFFF           # ComfyUI's KSampler seed range
MAX_RESOLUTION = 16384                  # ComfyUI's nodes.MAX_RESOLUTION
COMFY_SCHEDULERS = ("simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
                    "linear_quadratic", "kl_optimal")
"""ComfyUI's KSampler.SCHEDULERS, each an sdlab schedule of the same name and rule (tests/test_comfyui_ksampler.py)."""
LISTED_OUTPUTS = 20
"""The most outputs a node error's `dependent_outputs` lists. ComfyUI lists every failed output on each node error
(execution.py `validate_prompt`): a graph of N bad outputs would answer N^2 ids."""
CLIP_LAYERS = (-1, -2)                  # the CLIPSetLastLayer values sdlab draws (its clip skip 1, 2)
MASK_CHANNELS = ("alpha", "red", "green", "blue")   # ComfyUI's LoadImageMask._color_channels
ANNOTATIONS = ("[output]", "[input]", "[temp]")     # folder_paths.annotated_filepath's folder tags, in its order


def annotated_file(name: str) -> tuple[str, str]:
    """(folder, file) of the picture a LoadImage / LoadImageMask `image` names, as ComfyUI's
    folder_paths.annotated_filepath reads it: "file [output]" / "[input]" / "[temp]" a file of that folder (the
    tag and the character before it cut off: its frontend names a pasted or mask-edited picture
    "clipspace/clipspace-mask-1.png [input]"); any other name a file of the input folder."""
    for tag in ANNOTATIONS:
        if name.endswith(tag):
            return tag[1:-1], name[:-len(tag) - 1]
    return "input", name


@dataclass(frozen=True)
class NodeSpec:
    """One node class as `GET /object_info` shows it. An input is (type,) for a link, ("INT" / "FLOAT" /
    "STRING" / "BOOLEAN", options) for a value, or (list name,) for a value of a list `Choices` fills in (with
    ComfyUI's options after it: LoadImage's image_upload)."""

    inputs: dict[str, tuple]
    outputs: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ()
    output_node: bool = False
    category: str = ""
    display_name: str = ""
    optional: dict[str, tuple] = field(default_factory=dict)     # ComfyUI's "optional" inputs: may be left out
    deprecated: bool = False                                      # ComfyUI's DEPRECATED: /object_info says so


NODES: dict[str, NodeSpec] = {
    "CheckpointLoaderSimple": NodeSpec({"ckpt_name": ("checkpoints",)}, ("MODEL", "CLIP", "VAE"),
                                       category="loaders", display_name="Load Checkpoint"),
    "LoraLoader": NodeSpec({"model": ("MODEL",), "clip": ("CLIP",), "lora_name": ("loras",),
                            "strength_model": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}),
                            "strength_clip": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01})},
                           ("MODEL", "CLIP"), category="loaders", display_name="Load LoRA"),
    "CLIPSetLastLayer": NodeSpec({"clip": ("CLIP",),
                                  "stop_at_clip_layer": ("INT", {"default": -1, "min": -24, "max": -1, "step": 1})},
                                 ("CLIP",), category="conditioning", display_name="CLIP Set Last Layer"),
    "CLIPTextEncode": NodeSpec({"text": ("STRING", {"multiline": True, "dynamicPrompts": True}), "clip": ("CLIP",)},
                               ("CONDITIONING",), category="conditioning", display_name="CLIP Text Encode (Prompt)"),
    "ConditioningSetArea": NodeSpec({
        "conditioning": ("CONDITIONING",),
        "width": ("INT", {"default": 64, "min": 64, "max": MAX_RESOLUTION, "step": 8}),
        "height": ("INT", {"default": 64, "min": 64, "max": MAX_RESOLUTION, "step": 8}),
        "x": ("INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 8}),
        "y": ("INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 8}),
        "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01})},
        ("CONDITIONING",), category="conditioning", display_name="Conditioning (Set Area)"),
    "ConditioningSetAreaPercentage": NodeSpec({
        "conditioning": ("CONDITIONING",), "width": ("FLOAT", {"default": 1.0, "min": 0, "max": 1.0, "step": 0.01}),
        "height": ("FLOAT", {"default": 1.0, "min": 0, "max": 1.0, "step": 0.01}),
        "x": ("FLOAT", {"default": 0, "min": 0, "max": 1.0, "step": 0.01}),
        "y": ("FLOAT", {"default": 0, "min": 0, "max": 1.0, "step": 0.01}),
        "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01})},
        ("CONDITIONING",), category="conditioning", display_name="Conditioning (Set Area with Percentage)"),
    "ConditioningSetAreaStrength": NodeSpec({
        "conditioning": ("CONDITIONING",),
        "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01})},
        ("CONDITIONING",), category="conditioning", display_name="ConditioningSetAreaStrength"),
    "ConditioningCombine": NodeSpec({"conditioning_1": ("CONDITIONING",), "conditioning_2": ("CONDITIONING",)},
                                    ("CONDITIONING",), category="conditioning", display_name="Conditioning (Combine)"),
    "ControlNetLoader": NodeSpec({"control_net_name": ("controlnets",)}, ("CONTROL_NET",), category="loaders",
                                 display_name="Load ControlNet Model"),
    "ControlNetApply": NodeSpec({"conditioning": ("CONDITIONING",), "control_net": ("CONTROL_NET",),
                                 "image": ("IMAGE",),
                                 "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01})},
                                ("CONDITIONING",), category="conditioning/controlnet",
                                display_name="Apply ControlNet (OLD)", deprecated=True),
    "ControlNetApplyAdvanced": NodeSpec({
        "positive": ("CONDITIONING",), "negative": ("CONDITIONING",), "control_net": ("CONTROL_NET",),
        "image": ("IMAGE",), "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01}),
        "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001}),
        "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001})},
        ("CONDITIONING", "CONDITIONING"), ("positive", "negative"), category="conditioning/controlnet",
        display_name="Apply ControlNet", optional={"vae": ("VAE",)}),
    "EmptyLatentImage": NodeSpec({"width": ("INT", {"default": 512, "min": 16, "max": MAX_RESOLUTION, "step": 8}),
                                  "height": ("INT", {"default": 512, "min": 16, "max": MAX_RESOLUTION, "step": 8}),
                                  "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096})},
                                 ("LATENT",), category="latent", display_name="Empty Latent Image"),
    "VAELoader": NodeSpec({"vae_name": ("vaes",)}, ("VAE",), category="loaders", display_name="Load VAE"),
    "UNETLoader": NodeSpec({"unet_name": ("unets",), "weight_dtype": (["default", "fp8_e4m3fn", "fp8_e5m2"],)},
                           ("MODEL",), category="advanced/loaders", display_name="Load Diffusion Model"),
    "LoadImage": NodeSpec({"image": ("input_images", {"image_upload": True})}, ("IMAGE", "MASK"), category="image",
                          display_name="Load Image"),
    "LoadImageMask": NodeSpec({"image": ("input_images", {"image_upload": True}), "channel": (list(MASK_CHANNELS),)},
                              ("MASK",),
                              category="mask", display_name="Load Image (as Mask)"),
    "VAEEncode": NodeSpec({"pixels": ("IMAGE",), "vae": ("VAE",)}, ("LATENT",), category="latent",
                          display_name="VAE Encode"),
    "SetLatentNoiseMask": NodeSpec({"samples": ("LATENT",), "mask": ("MASK",)}, ("LATENT",),
                                   category="latent/inpaint", display_name="Set Latent Noise Mask"),
    "VAEEncodeForInpaint": NodeSpec({"pixels": ("IMAGE",), "vae": ("VAE",), "mask": ("MASK",),
                                     "grow_mask_by": ("INT", {"default": 6, "min": 0, "max": 64, "step": 1})},
                                    ("LATENT",), category="latent/inpaint", display_name="VAE Encode (for Inpainting)"),
    "KSampler": NodeSpec({"model": ("MODEL",),
                          "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True}),
                          "steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
                          "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
                          "sampler_name": ("samplers",), "scheduler": ("schedulers",),
                          "positive": ("CONDITIONING",), "negative": ("CONDITIONING",), "latent_image": ("LATENT",),
                          "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01})},
                         ("LATENT",), category="sampling", display_name="KSampler"),
    "KSamplerAdvanced": NodeSpec({
        "model": ("MODEL",), "add_noise": (["enable", "disable"],),
        "noise_seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True}),
        "steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
        "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
        "sampler_name": ("samplers",), "scheduler": ("schedulers",), "positive": ("CONDITIONING",),
        "negative": ("CONDITIONING",), "latent_image": ("LATENT",),
        "start_at_step": ("INT", {"default": 0, "min": 0, "max": 10000}),
        "end_at_step": ("INT", {"default": 10000, "min": 0, "max": 10000}),
        "return_with_leftover_noise": (["disable", "enable"],)},
        ("LATENT",), category="sampling", display_name="KSampler (Advanced)"),
    "LatentUpscale": NodeSpec({"samples": ("LATENT",), "upscale_method": (list(COMFY_LATENT_UPSCALE_METHODS),),
                               "width": ("INT", {"default": 512, "min": 0, "max": MAX_RESOLUTION, "step": 8}),
                               "height": ("INT", {"default": 512, "min": 0, "max": MAX_RESOLUTION, "step": 8}),
                               "crop": (list(COMFY_CROPS),)},
                              ("LATENT",), category="latent", display_name="Upscale Latent"),
    "LatentUpscaleBy": NodeSpec({"samples": ("LATENT",), "upscale_method": (list(COMFY_LATENT_UPSCALE_METHODS),),
                                 "scale_by": ("FLOAT", {"default": 1.5, "min": 0.01, "max": 8.0, "step": 0.01})},
                                ("LATENT",), category="latent", display_name="Upscale Latent By"),
    "VAEDecode": NodeSpec({"samples": ("LATENT",), "vae": ("VAE",)}, ("IMAGE",), category="latent",
                          display_name="VAE Decode"),
    "UpscaleModelLoader": NodeSpec({"model_name": ("upscale_models",)}, ("UPSCALE_MODEL",), category="loaders",
                                   display_name="Load Upscale Model"),
    "ImageUpscaleWithModel": NodeSpec({"upscale_model": ("UPSCALE_MODEL",), "image": ("IMAGE",)}, ("IMAGE",),
                                      category="image/upscaling", display_name="Upscale Image (using Model)"),
    "ImageScale": NodeSpec({"image": ("IMAGE",), "upscale_method": (list(COMFY_IMAGE_UPSCALE_METHODS),),
                            "width": ("INT", {"default": 512, "min": 0, "max": MAX_RESOLUTION, "step": 1}),
                            "height": ("INT", {"default": 512, "min": 0, "max": MAX_RESOLUTION, "step": 1}),
                            "crop": (list(COMFY_CROPS),)},
                           ("IMAGE",), category="image/upscaling", display_name="Upscale Image"),
    "ImageScaleBy": NodeSpec({"image": ("IMAGE",), "upscale_method": (list(COMFY_IMAGE_UPSCALE_METHODS),),
                              "scale_by": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 8.0, "step": 0.01})},
                             ("IMAGE",), category="image/upscaling", display_name="Upscale Image By"),
    "SaveImage": NodeSpec({"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "ComfyUI"})},
                          output_node=True, category="image", display_name="Save Image"),
    "PreviewImage": NodeSpec({"images": ("IMAGE",)}, output_node=True, category="image",
                             display_name="Preview Image"),
}
SAMPLER_NODES = ("KSampler", "KSamplerAdvanced")
UPSCALE_NODES = ("LatentUpscale", "LatentUpscaleBy")
PICTURE_NODES = ("ImageUpscaleWithModel", "ImageScale", "ImageScaleBy")
"""The nodes sdlab runs on the decoded pictures before they are written (`GraphPlan.picture_steps`)."""
AREA_NODES = ("ConditioningSetArea", "ConditioningSetAreaPercentage", "ConditioningSetAreaStrength",
              "ConditioningCombine")
"""The nodes of ComfyUI's area composition, drawn on a KSampler's positive conditioning (`GraphPlan.area_prompts`)."""
CONTROL_NODES = {"ControlNetApply": ("conditioning",), "ControlNetApplyAdvanced": ("positive", "negative")}
"""The nodes that put a ControlNet on a conditioning: the input each output (by index) passes on."""
OUTPUT_TYPE = {"SaveImage": "output", "PreviewImage": "temp"}     # the `type` of their pictures in /history, /view


@dataclass(frozen=True)
class Choices:
    """The lists of a server a graph's values are checked against: `checkpoints` (ComfyUI's ckpt_name: the path
    under the models folder), `loras` (file names), `vaes` (the server's VAE list), `samplers`, `schedulers`,
    `input_images` (the upload folder's files), `unets`: none, UNETLoader listed for the clients that read its
    list (sdlab draws whole checkpoints, so no graph of it is drawn), `controlnets` (ComfyUI's control_net_name:
    the path under the server's ControlNet folder of its ControlNets and T2I-Adapters), `upscale_models` (ComfyUI's
    UpscaleModelLoader model_name: the path under the server's upscalers folder)."""

    checkpoints: list[str]
    loras: list[str]
    input_images: list[str]
    vaes: list[str] = field(default_factory=list)
    unets: list[str] = field(default_factory=list)
    controlnets: list[str] = field(default_factory=list)
    upscale_models: list[str] = field(default_factory=list)
    samplers: list[str] = field(default_factory=list)
    schedulers: list[str] = field(default_factory=lambda: list(COMFY_SCHEDULERS))
    output_images: Callable[[str, str], bool] = lambda folder, name: False  # whether that folder holds the picture

    def of(self, name: str) -> list[str]:
        return getattr(self, name)

    def has_image(self, name: str) -> bool:
        """Whether the picture a LoadImage names exists (ComfyUI's folder_paths.exists_annotated_filepath): a file
        of `input_images`, or of the output or temp folder ("[output]" / "[temp]": a job's picture or an upload of
        that type)."""
        folder, file = annotated_file(name)
        return file in self.input_images if folder == "input" else self.output_images(folder, file)


@dataclass(frozen=True)
class GraphControl:
    """One ControlNet a graph applies (a ControlNetApply or ControlNetApplyAdvanced): a ControlNetLoader's file
    (under the ControlNet folder), a LoadImage's picture, strength and the fractions of the schedule it acts on
    (ControlNetApply: 0 to 1)."""

    model: str
    image: str
    strength: float
    start: float = 0.0
    end: float = 1.0


@dataclass
class GraphPlan:
    """One generation a valid graph asks for, named as the native job fields name them, and the nodes that
    show it: `order` (the nodes run, in an order ComfyUI could run them), `sampler_node` (KSampler's id, whose
    progress the steps are), `outputs` ({output node id: "output" | "temp"})."""

    model: str
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    cfg_scale: float
    sampler: str
    schedule: str
    width: int | None = None
    height: int | None = None
    batch_size: int = 1
    strength: float = 1.0
    init_image: str | None = None           # an input-folder file name: img2img
    mask_image: str | None = None           # an input-folder file whose alpha is the noise mask (1 - alpha): inpaint
    mask_channel: str = "alpha"             # the file's channel read: LoadImage's alpha, or LoadImageMask's channel
    mask_node: str = "LoadImage"            # the node reading it: LoadImage, or LoadImageMask (bands made RGBA)
    mask_grow: int | None = None            # VAEEncodeForInpaint's grow_mask_by; None: SetLatentNoiseMask's mask
    vae: str | None = None                  # a VAELoader's file; None: the checkpoint's own VAE
    clip_skip: int | None = None            # CLIPSetLastLayer's -stop_at_clip_layer; None: no CLIPSetLastLayer
    loras: list[tuple[str, float]] = field(default_factory=list)
    order: list[str] = field(default_factory=list)
    sampler_node: str = ""
    outputs: dict[str, str] = field(default_factory=dict)
    controls: list[GraphControl] = field(default_factory=list)     # the ControlNets on both rows, in applied order
    area_prompts: tuple[AreaPrompt, ...] = ()   # the positive's area composition (ConditioningSetArea ...,
                                            # ConditioningCombine) in ComfyUI's list order; (): one plain prompt
    hires: dict[str, Any] = field(default_factory=dict)             # a two-pass graph: the request's hires fields
    second_node: str = ""                   # a two-pass graph's second KSampler, whose steps follow the first's
    upscale_node: str = ""                  # a two-pass graph's LatentUpscale(By), whose size the hires fix draws
    first_pass_outputs: dict[str, str] = field(default_factory=dict)   # the outputs of a two-pass graph's first
                                            # KSampler's pictures ("Save Intermediate Image"), as `outputs`
    upscale_model: str | None = None        # an UpscaleModelLoader's file every picture of `outputs` is run through
                                            # (ImageUpscaleWithModel); None: no model step
    model_upscale_node: str = ""            # that ImageUpscaleWithModel
    model_loader_node: str = ""             # and the UpscaleModelLoader feeding it
    picture_steps: list[PictureStep] = field(default_factory=list)   # what the decoded pictures of `outputs` pass
                                            # through, in order (the model, ImageScale / ImageScaleBy)
    picture_nodes: list[str] = field(default_factory=list)   # the node of each of `picture_steps`

    @property
    def mode(self) -> str:
        if self.init_image is None:
            return "txt2img"
        return "img2img" if self.mask_image is None else "inpaint"


def node_refusal(graph: dict[str, Any], node_id: str, message: str, outputs: list[str]) -> GraphError:
    """ComfyUI's failed validation of the graph's node `node_id` (its `node_errors` entry), whose `outputs` fail."""
    class_type = graph[node_id]["class_type"]
    error = _error("unsupported_graph", message, f"{class_type} #{node_id}: {message}")
    return GraphError(_error("prompt_outputs_failed_validation", "Prompt outputs failed validation", message),
                      {node_id: {"errors": [error], "dependent_outputs": outputs[:LISTED_OUTPUTS],
                                 "class_type": class_type}})


class GraphError(Exception):
    """A graph ComfyUI (or sdlab) refuses: `error` ({type, message, details, extra_info}) and `node_errors`
    ({node_id: {errors, dependent_outputs, class_type}}), the body of ComfyUI's 400 answer."""

    def __init__(self, error: dict[str, Any], node_errors: dict[str, Any] | None = None) -> None:
        super().__init__(error["message"])
        self.error = error
        self.node_errors = node_errors or {}

    def body(self) -> dict[str, Any]:
        return {"error": self.error, "node_errors": self.node_errors}


def _title(node: dict[str, Any]) -> Any:
    """The node's title as the ComfyUI frontend exports it (`_meta.title`), None without one."""
    meta = node.get("_meta")
    return meta.get("title") if isinstance(meta, dict) else None


def _error(kind: str, message: str, details: str = "", **extra: Any) -> dict[str, Any]:
    return {"type": kind, "message": message, "details": details, "extra_info": extra}


def object_info(choices: Choices, only: str | None = None) -> dict[str, Any]:
    """`GET /object_info` (ComfyUI's `node_info` for each node of `NODES`), the lists filled from `choices`."""
    def info(name: str, spec: NodeSpec) -> dict[str, Any]:
        required = {key: ([choices.of(value[0]), *value[1:]] if isinstance(value[0], str) and value[0] in _LISTS
                          else list(value))
                    for key, value in spec.inputs.items()}
        optional = {"optional": {key: list(value) for key, value in spec.optional.items()}} if spec.optional else {}
        return {"input": {"required": required, **optional},
                "input_order": {"required": list(spec.inputs), **{k: list(v) for k, v in optional.items()}},
                "output": list(spec.outputs), "output_is_list": [False] * len(spec.outputs),
                "output_name": list(spec.output_names or spec.outputs), "name": name,
                "display_name": spec.display_name or name, "description": "", "python_module": "nodes",
                "category": spec.category, "output_node": spec.output_node,
                **({"deprecated": True} if spec.deprecated else {})}

    return {name: info(name, spec) for name, spec in NODES.items() if only is None or name == only}


_LISTS = ("checkpoints", "loras", "vaes", "unets", "samplers", "schedulers", "input_images", "controlnets",
          "upscale_models")


class _Checker:
    """ComfyUI's `validate_inputs` over the nodes an output reaches: each node's errors in `node_errors`."""

    def __init__(self, graph: dict[str, Any], choices: Choices) -> None:
        self.graph = graph
        self.choices = choices
        self.valid: dict[str, bool] = {}
        self.errors: dict[str, list[dict[str, Any]]] = {}
        self.walking: set[str] = set()           # nodes begun and not finished: the path from the output
        self.pending: dict[str, list[dict[str, Any]]] = {}      # their own errors, kept until they finish

    def check(self, root: str) -> bool:
        """Whether `root` and the nodes it reaches are valid: a depth-first walk on a stack of its own (a chain of
        any length, not Python's recursion limit), each node finished after its sources, as ComfyUI's recursion."""
        stack: list[tuple[str, list[str] | None]] = [(root, None)]
        while stack:
            node_id, sources = stack.pop()
            if sources is None:                     # first visit: the node's own errors, then its sources
                if node_id in self.valid:
                    continue
                self.valid[node_id] = False         # until finished: a link back here is a cycle
                self.walking.add(node_id)
                errors, sources = self._inputs(node_id)
                self.pending[node_id] = errors
                stack.append((node_id, sources))
                stack.extend((source, None) for source in reversed(sources) if source not in self.valid)
                continue
            self.walking.discard(node_id)
            errors = self.pending.pop(node_id)
            if not all(self.valid[source] for source in sources):
                self.errors.setdefault(node_id, [])
            if errors:
                self.errors[node_id] = errors
            self.valid[node_id] = not errors and node_id not in self.errors
        return self.valid[root]

    def _inputs(self, node_id: str) -> tuple[list[dict[str, Any]], list[str]]:
        """(the errors of the node's own inputs, the nodes its well-formed links come from)."""
        node = self.graph[node_id]
        class_type = node.get("class_type")
        spec = NODES.get(class_type)
        errors: list[dict[str, Any]] = []
        sources: list[str] = []
        inputs = node.get("inputs")
        if spec is None:
            errors.append(_error("unsupported_node", f"sdlab does not draw the node {class_type!r}",
                                 f"{class_type}: sdlab draws {', '.join(NODES)}", class_type=class_type))
        elif not isinstance(inputs, dict):
            errors.append(_error("invalid_prompt", "Node inputs must be an object", str(node_id)))
        else:
            for name, declared in {**spec.inputs, **spec.optional}.items():
                if name not in inputs and name in spec.optional:
                    continue
                if name not in inputs:
                    errors.append(_error("required_input_missing", "Required input is missing", name,
                                         input_name=name))
                    continue
                value = inputs[name]
                if isinstance(declared[0], str) and declared[0] in _TYPES_OF_LINKS:
                    source = self._link(node_id, name, declared[0], value, errors)
                    if source is not None:
                        sources.append(source)
                else:
                    inputs[name] = self._value(name, declared, value, errors)
        return errors, sources

    def _link(self, node_id: str, name: str, wanted: str, value: Any, errors: list) -> str | None:
        """The node the link `value` comes from, to be checked; None for a link in error (in `errors`)."""
        if not (isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)
                and not isinstance(value[1], bool) and isinstance(value[0], (str, int))):
            errors.append(_error("bad_linked_input", "Bad linked input, must be a length-2 list of [node_id, "
                                 "slot_index]", name, input_name=name, received_value=value))
            return None
        source = str(value[0])
        if source not in self.graph or not isinstance(self.graph[source], dict):
            errors.append(_error("bad_linked_input", "Linked node does not exist", f"{name}: node {source!r}",
                                 input_name=name, linked_node=value))
            return None
        spec = NODES.get(self.graph[source].get("class_type"))
        if spec is not None:
            given = spec.outputs[value[1]] if 0 <= value[1] < len(spec.outputs) else None
            if given != wanted:
                errors.append(_error("return_type_mismatch", "Return type mismatch between linked nodes",
                                     f"{name}, {given} != {wanted}", input_name=name, received_type=given,
                                     linked_node=value))
                return None
        if source in self.walking:
            errors.append(_error("dependency_cycle_detected", "Dependency cycle detected",
                                 f"{name}: node #{source} depends on #{node_id}", input_name=name,
                                 linked_node=value))
            return None
        return source

    def _value(self, name: str, declared: tuple, value: Any, errors: list) -> Any:
        """The value as the node reads it, converted as ComfyUI converts it (execution.py `validate_inputs`:
        int(val) for an INT, float(val) for a FLOAT, str(val) for a STRING, the graph's input replaced by it), so
        "3", 3.0 and 3.7 are steps 3; the errors of a value ComfyUI refuses (and of a FLOAT nan) in `errors`."""
        kind = declared[0]
        if isinstance(kind, list) or kind in _LISTS:
            allowed = kind if isinstance(kind, list) else self.choices.of(kind)
            if kind == "input_images":          # LoadImage's VALIDATE_INPUTS: the file named must exist
                if not isinstance(value, str) or not self.choices.has_image(value):
                    errors.append(_error("custom_validation_failed", "Custom validation failed for node",
                                         f"{name} - Invalid image file: {value}", input_name=name,
                                         received_value=value))
                return value
            if not isinstance(value, str) or value not in allowed:
                shown = str(allowed) if len(allowed) <= 20 else f"(list of length {len(allowed)})"
                errors.append(_error("value_not_in_list", "Value not in list", f"{name}: '{value}' not in {shown}",
                                     input_name=name, received_value=value))
            return value
        options = declared[1]
        try:
            converted = {"INT": int, "FLOAT": float, "STRING": str}[kind](value)
            if converted != converted:                  # nan: ComfyUI's min / max let it by; no picture is drawn
                raise ValueError("not a number")
        except (TypeError, ValueError, OverflowError) as err:
            errors.append(_error("invalid_input_type", f"Failed to convert an input value to a {kind} value",
                                 f"{name}, {value!r}, {err}", input_name=name, received_value=value,
                                 exception_message=str(err)))
            return value
        if "min" in options and converted < options["min"]:
            errors.append(_error("value_smaller_than_min", f"Value {converted} smaller than min of "
                                 f"{options['min']}", name, input_name=name, received_value=converted))
        if "max" in options and converted > options["max"]:
            errors.append(_error("value_bigger_than_max", f"Value {converted} bigger than max of {options['max']}",
                                 name, input_name=name, received_value=converted))
        return converted


_TYPES_OF_LINKS = frozenset(t for spec in NODES.values() for t in spec.outputs)


def check_graph(graph: Any, choices: Choices) -> GraphPlan:
    """The generation `graph` asks for; `GraphError` with ComfyUI's errors (and sdlab's for what it does not
    draw) otherwise."""
    if not isinstance(graph, dict) or not all(isinstance(node, dict) for node in graph.values()):
        raise GraphError(_error("invalid_prompt", "Invalid prompt: the prompt must be an object of nodes", ""))
    graph = {str(key): node for key, node in graph.items()}
    for node_id, node in graph.items():
        if "class_type" not in node:
            title = _title(node)
            raise GraphError(_error("missing_node_type", f"Node '{title or f'ID #{node_id}'}' has no class_type. The "
                                    "workflow may be corrupted or a custom node is missing.", f"Node ID '#{node_id}'",
                                    node_id=node_id, class_type=None, node_title=title))
    unknown = {node_id: node["class_type"] for node_id, node in graph.items()
               if not isinstance(node["class_type"], str) or node["class_type"] not in NODES}
    if unknown:
        # ComfyUI's execution.validate_prompt names the first (by its title); sdlab's node_errors list each one
        node_id, class_type = next(iter(unknown.items()))
        title = _title(graph[node_id]) or class_type
        raise GraphError(
            _error("missing_node_type", f"Node '{title}' not found. The custom node may not be installed.",
                   f"Node ID '#{node_id}'", node_id=node_id, class_type=class_type, node_title=title),
            {nid: {"errors": [_error("unsupported_node", f"sdlab does not draw the node {ct!r}",
                                     f"{ct}: sdlab draws {', '.join(NODES)}", class_type=ct)],
                   "dependent_outputs": [], "class_type": ct} for nid, ct in unknown.items()})
    outputs = [node_id for node_id, node in graph.items() if NODES[node["class_type"]].output_node]
    if not outputs:
        raise GraphError(_error("prompt_no_outputs", "Prompt has no outputs"))
    checker = _Checker(graph, choices)
    bad = [o for o in outputs if not checker.check(o)]
    if bad:
        node_errors = {node_id: {"errors": errors, "dependent_outputs": bad[:LISTED_OUTPUTS],
                                 "class_type": graph[node_id]["class_type"]}
                       for node_id, errors in checker.errors.items() if errors}
        details = "\n".join(f"{e['message']}: {e['details']}" for errors in checker.errors.values() for e in errors)
        raise GraphError(_error("prompt_outputs_failed_validation", "Prompt outputs failed validation", details),
                         node_errors)
    return _Plan(graph, outputs).plan()


class _Plan:
    """The generation of a checked graph: the one chain of nodes `GraphPlan` describes, else `unsupported_graph`
    naming the node where the graph leaves it."""

    def __init__(self, graph: dict[str, Any], outputs: list[str]) -> None:
        self.graph = graph
        self.outputs = outputs
        self.order: dict[str, None] = {}         # the nodes run, in order (a dict: a linear walk of N outputs)

    def refuse(self, node_id: str, message: str) -> GraphError:
        return node_refusal(self.graph, node_id, message, self.outputs)

    def source(self, node_id: str, name: str) -> tuple[str, int, str]:
        """(source id, output index, source class_type) of the link `name` of `node_id`."""
        source, index = self.graph[node_id]["inputs"][name]
        source = str(source)
        return source, index, self.graph[source]["class_type"]

    def inputs(self, node_id: str) -> dict[str, Any]:
        return self.graph[node_id]["inputs"]

    def visit(self, node_id: str) -> None:
        self.order.setdefault(node_id, None)

    def plan(self) -> GraphPlan:
        pictures = {o: self.pictures(o) for o in self.outputs}
        decoders = {decoder for decoder, _ in pictures.values()}
        samplers = set()
        for decoder in decoders:
            if self.graph[decoder]["class_type"] != "VAEDecode":
                raise self.refuse(decoder, "sdlab draws an output's images from a VAEDecode")
            sampler, _, kind = self.source(decoder, "samples")
            if kind not in SAMPLER_NODES:
                raise self.refuse(decoder, "sdlab decodes the latent of a KSampler")
            samplers.add(sampler)
        second, first_decoders = self.last_sampler(decoders, samplers)
        decoders -= first_decoders
        chain = self.picture_chain(pictures, first_decoders)
        sampler = second
        upscale = self.upscale(second)
        if upscale is not None:                                 # ComfyUI's hires fix: the first KSampler's chain
            sampler = self.source(upscale, "samples")[0]
        values = self.inputs(sampler)
        if not comfyui_spelling(values["sampler_name"]):       # the list holds ComfyUI's spellings alone
            raise self.refuse(sampler, f"sampler_name {values['sampler_name']!r} is not a ComfyUI sampler")
        checkpoint, loras = self.model_chain(sampler)
        areas, clip_skip = self.positive_areas(sampler, checkpoint, loras)
        prompt = areas[0].prompt
        negative, negative_skip = self.text(sampler, "negative", checkpoint, loras)
        if clip_skip != negative_skip:
            raise self.refuse(sampler, "sdlab encodes the positive and negative prompts at one CLIP layer")
        controls = self.controls(sampler)
        drawn_areas = () if len(areas) == 1 and areas[0] == AreaPrompt(prompt) else tuple(areas)
        if drawn_areas and (controls or upscale is not None):
            raise self.refuse(sampler, "sdlab draws area conditioning (ConditioningSetArea ..., ConditioningCombine) "
                                       "in one KSampler without ControlNets")
        seed, denoise = self.seed_and_denoise(sampler)
        plan = GraphPlan(model=self.inputs(checkpoint)["ckpt_name"], prompt=prompt, negative_prompt=negative,
                         seed=seed, steps=int(values["steps"]), cfg_scale=float(values["cfg"]),
                         sampler=values["sampler_name"], schedule=values["scheduler"],
                         strength=denoise, clip_skip=clip_skip, area_prompts=drawn_areas,
                         loras=[(self.inputs(n)["lora_name"], float(self.inputs(n)["strength_model"]))
                                for n in loras])
        vae = self.vae(sorted(decoders)[0], checkpoint)
        plan.vae = None if vae == checkpoint else self.inputs(vae)["vae_name"]
        self.latent(sampler, checkpoint, vae, plan)
        self.visit(sampler)
        for decoder in sorted(first_decoders):      # runnable once the first KSampler ends: before the upscale
            if self.vae(decoder, checkpoint) != vae:
                raise self.refuse(decoder, "sdlab encodes and decodes a picture with one VAE")
            self.visit(decoder)
            for output in self.outputs:
                if pictures[output][0] == decoder:
                    self.visit(output)
                    plan.first_pass_outputs[output] = OUTPUT_TYPE[self.graph[output]["class_type"]]
        if upscale is not None:
            plan.hires = self.second_pass(second, upscale, (checkpoint, loras), controls, plan)
            plan.second_node, plan.upscale_node = second, upscale
        for decoder in sorted(decoders):
            if self.vae(decoder, checkpoint) != vae:
                raise self.refuse(decoder, "sdlab encodes and decodes a picture with one VAE")
            self.visit(decoder)
        for node in chain:
            plan.picture_steps.append(self.picture_step(node, plan))
            plan.picture_nodes.append(node)
        for output in self.outputs:
            self.visit(output)
        plan.order, plan.sampler_node, plan.controls = list(self.order), sampler, controls
        plan.outputs = {o: OUTPUT_TYPE[self.graph[o]["class_type"]] for o in self.outputs}
        return plan

    def pictures(self, output: str) -> tuple[str, tuple[str, ...]]:
        """(the node whose pictures an output node's chain starts from, a VAEDecode where sdlab draws it; the
        ImageUpscaleWithModel / ImageScale / ImageScaleBy nodes they pass through, from it to the output)."""
        chain: list[str] = []
        node, _, kind = self.source(output, "images")
        while kind in PICTURE_NODES:
            chain.insert(0, node)
            node, _, kind = self.source(node, "image")
        if chain and kind != "VAEDecode":
            raise self.refuse(chain[0], "sdlab upscales and scales the pictures of a VAEDecode after a KSampler "
                                        f"(not of a {kind}: a picture is upscaled only as a KSampler's output)")
        return node, tuple(chain)

    def picture_chain(self, pictures: dict[str, tuple[str, tuple[str, ...]]],
                      first_decoders: set[str]) -> tuple[str, ...]:
        """The ImageUpscaleWithModel / ImageScale(By) nodes every last output takes its pictures through (none
        where they take the decoded pictures): sdlab writes one set of pictures, so a graph saving both the decoded
        and the upscaled pictures (or two chains, or a two-pass graph's first pictures upscaled or scaled) is
        refused, as is a chain of two ImageUpscaleWithModel (the job runs one model)."""
        chains = {chain for decoder, chain in pictures.values() if decoder not in first_decoders}
        first = sorted(c[0] for decoder, c in pictures.values() if decoder in first_decoders and c)
        if first:
            raise self.refuse(first[0], "sdlab upscales and scales the pictures of a graph's last KSampler only")
        if len(chains) > 1:
            raise self.refuse(sorted(c[-1] for c in chains if c)[0],
                              "sdlab saves a graph's pictures either all through one ImageUpscaleWithModel (and the "
                              "same ImageScale / ImageScaleBy nodes) or none")
        chain = next(iter(chains))
        models = [n for n in chain if self.graph[n]["class_type"] == "ImageUpscaleWithModel"]
        if len(models) > 1:
            raise self.refuse(models[1], "sdlab runs a graph's pictures through one ImageUpscaleWithModel")
        return chain

    def picture_step(self, node: str, plan: GraphPlan) -> PictureStep:
        """What a node of the picture chain does, its nodes visited in ComfyUI's order (an ImageUpscaleWithModel's
        UpscaleModelLoader before it); the model's file and node go to `plan`."""
        values = self.inputs(node)
        kind = self.graph[node]["class_type"]
        if kind == "ImageUpscaleWithModel":
            loader = self.source(node, "upscale_model")[0]
            self.visit(loader)
            self.visit(node)
            plan.upscale_model, plan.model_upscale_node = self.inputs(loader)["model_name"], node
            plan.model_loader_node = loader
            return ThroughModel()
        self.visit(node)
        if kind == "ImageScaleBy":
            return PictureScale(values["upscale_method"], scale_by=float(values["scale_by"]))
        return PictureScale(values["upscale_method"], int(values["width"]), int(values["height"]), values["crop"])

    def last_sampler(self, decoders: set[str], samplers: set[str]) -> tuple[str, set[str]]:
        """(the KSampler whose pictures the graph ends with, the decoders of the first KSampler of a two-pass graph):
        one KSampler, or the two of ComfyUI's two-pass graph, whose 2-pass example saves the first's pictures too
        ("Save Intermediate Image": ComfyUI runs every output node); any other graph of several KSamplers is
        refused."""
        if len(samplers) == 1:
            return next(iter(samplers)), set()
        for second in sorted(samplers):
            upscale = self.upscale(second)
            first = self.source(upscale, "samples")[0] if upscale is not None else None
            if first in samplers and samplers == {first, second}:
                return second, {d for d in decoders if self.source(d, "samples")[0] == first}
        raise self.refuse(sorted(samplers)[1], "sdlab draws a graph of one KSampler, or ComfyUI's two-pass graph")

    def upscale(self, sampler: str) -> str | None:
        """The LatentUpscale(By) whose latent the KSampler samples, of another KSampler's (a two-pass graph); None
        where it samples another latent."""
        node, _, kind = self.source(sampler, "latent_image")
        if kind not in UPSCALE_NODES:
            return None
        if self.source(node, "samples")[2] not in SAMPLER_NODES:
            raise self.refuse(node, "sdlab upscales the latent of a KSampler (ComfyUI's two-pass hires fix)")
        if self.graph[sampler]["class_type"] != "KSampler":
            raise self.refuse(sampler, "sdlab draws a two-pass graph's second pass with a KSampler")
        return node

    def second_pass(self, second: str, upscale: str, model: tuple[str, list[str]], controls: list[GraphControl],
                    plan: GraphPlan) -> dict[str, Any]:
        """The request's hires fields (hr_convention comfyui) of a two-pass graph: the upscale node's method, crop
        and size (LatentUpscale's width / height, 0 = unset; LatentUpscaleBy's scale_by, at least 1: sdlab's hires
        fix draws larger), the second KSampler's seed, steps, CFG, sampler, scheduler, denoise and prompts (where
        they differ), its model and CLIP layer the first's. Its ControlNets are the first's `controls` (the
        request's controls act in both passes, each KSampler's hint cut and resized to its own latent as ComfyUI's
        get_control does: `control.comfyui_hint`); a graph whose KSamplers apply other ones is refused. The first
        KSampler starts from an EmptyLatentImage or a VAEEncode (img2img at its denoise, the hires fix's first
        pass); a noise mask, which ComfyUI's latent carries on through LatentUpscale to the second KSampler, is
        not drawn."""
        if plan.mask_image is not None:
            raise self.refuse(second, "sdlab draws a two-pass graph from an EmptyLatentImage or a VAEEncode "
                                      "without a noise mask")
        values = self.inputs(second)
        if not comfyui_spelling(values["sampler_name"]):
            raise self.refuse(second, f"sampler_name {values['sampler_name']!r} is not a ComfyUI sampler")
        if self.model_chain(second) != model:
            raise self.refuse(second, "sdlab draws both KSamplers of a two-pass graph with one model and its LoRAs")
        prompt, clip_skip = self.text(second, "positive", *model)
        negative, negative_skip = self.text(second, "negative", *model)
        if {clip_skip, negative_skip} != {plan.clip_skip}:
            raise self.refuse(second, "sdlab encodes both KSamplers' prompts at one CLIP layer")
        if self.controls(second) != controls:
            raise self.refuse(second, "sdlab draws a two-pass graph's KSamplers with the same ControlNets (net, "
                                      "picture, strength and window), or none on either")
        if float(values["denoise"]) <= 0:
            raise self.refuse(second, "sdlab draws a two-pass graph's second KSampler at a denoise above 0")
        up = self.inputs(upscale)
        size: dict[str, Any]
        if self.graph[upscale]["class_type"] == "LatentUpscaleBy":
            if float(up["scale_by"]) < 1:
                raise self.refuse(upscale, "sdlab's hires fix upscales by a scale_by of at least 1")
            size = {"hr_scale": float(up["scale_by"])}
        else:
            if int(up["width"]) == int(up["height"]) == 0:
                raise self.refuse(upscale, "sdlab's hires fix upscales to a width or a height above 0")
            size = {"hr_width": int(up["width"]), "hr_height": int(up["height"]), "hr_crop": up["crop"]}
        self.visit(upscale)
        self.visit(second)
        return {"hr_convention": "comfyui", "hr_upscaler": up["upscale_method"], **size,
                "hr_seed": int(values["seed"]), "hr_steps": int(values["steps"]), "hr_cfg_scale": float(values["cfg"]),
                "hr_sampler": values["sampler_name"], "hr_schedule": values["scheduler"],
                "hr_denoise": float(values["denoise"]),
                "hr_prompt": "" if prompt == plan.prompt else prompt,
                "hr_negative_prompt": "" if negative == plan.negative_prompt else negative}

    def seed_and_denoise(self, sampler: str) -> tuple[int, float]:
        """(seed, denoise) of the sampler node. KSamplerAdvanced is drawn where it is ComfyUI's KSampler at denoise 1
        (nodes.py `common_ksampler`: noise added, steps 0 to the end, no leftover noise), its noise_seed the seed."""
        values = self.inputs(sampler)
        if self.graph[sampler]["class_type"] == "KSampler":
            return int(values["seed"]), float(values["denoise"])
        if (values["add_noise"], values["start_at_step"], values["return_with_leftover_noise"]) != ("enable", 0,
                                                                                                   "disable") \
                or values["end_at_step"] < values["steps"]:
            raise self.refuse(sampler, "sdlab draws a KSamplerAdvanced with add_noise enable, start_at_step 0, "
                                       "end_at_step >= steps and return_with_leftover_noise disable (a KSampler)")
        return int(values["noise_seed"]), 1.0

    def model_chain(self, sampler: str) -> tuple[str, list[str]]:
        """(CheckpointLoaderSimple id, LoraLoader ids from the checkpoint on) of the KSampler's model."""
        loras: list[str] = []
        node, index, kind = self.source(sampler, "model")
        while kind == "LoraLoader":
            values = self.inputs(node)
            if float(values["strength_model"]) != float(values["strength_clip"]):
                raise self.refuse(node, "sdlab merges a LoRA into the U-Net and the text encoder at one strength "
                                        "(strength_model = strength_clip)")
            loras.insert(0, node)
            node, index, kind = self.source(node, "model")
        for at in (node, *loras):
            self.visit(at)
        return node, loras

    def text(self, sampler: str, which: str, checkpoint: str, loras: list[str]) -> tuple[str, int | None]:
        """(the text, clip skip: CLIPSetLastLayer's -stop_at_clip_layer, None without one) of the CLIPTextEncode
        of the KSampler's `which`, whose CLIP must be the checkpoint's through the model's LoRAs (and a
        CLIPSetLastLayer)."""
        encoder, _, kind = self.under_controls(sampler, which)[0]
        if kind in AREA_NODES:
            raise self.refuse(encoder, "sdlab draws area conditioning on the positive of a graph's one KSampler")
        if kind != "CLIPTextEncode":
            raise self.refuse(sampler, f"sdlab reads {which} from a CLIPTextEncode")
        return self.encoded(encoder, checkpoint, loras)

    def positive_areas(self, sampler: str, checkpoint: str, loras: list[str]) -> tuple[list[AreaPrompt], int | None]:
        """(the KSampler's positive conditioning list as ComfyUI builds it: CLIPTextEncodes put together by
        ConditioningCombine (conditioning_1's entries, then conditioning_2's), each entry's area and strength set
        by the ConditioningSetArea / ConditioningSetAreaPercentage / ConditioningSetAreaStrength nodes it passes
        (nodes.py: each sets its values on every entry, an area replacing the area before it), the clip skip of
        its encoders (one for all))."""
        entries: list[AreaPrompt] = []
        skips: set[int | None] = set()
        start = self.under_controls(sampler, "positive")[0]
        stack: list[tuple[tuple[str, int, str], list[str], bool]] = [(start, [], False)]
        while stack:                # depth first, conditioning_1 before conditioning_2, a node run after its inputs
            (node, index, kind), setters, inputs_done = stack.pop()
            if inputs_done:
                self.visit(node)
            elif kind in AREA_NODES:
                stack.append(((node, index, kind), setters, True))
                names = ("conditioning_2", "conditioning_1") if kind == "ConditioningCombine" else ("conditioning",)
                stack.extend((self.source(node, name), setters + [node], False) for name in names)
            elif kind == "CLIPTextEncode":
                text, skip = self.encoded(node, checkpoint, loras)
                skips.add(skip)
                entry = AreaPrompt(text)
                for setter in reversed(setters):        # the node nearest the encoder acts first
                    entry = self.area_set(setter, entry)
                entries.append(entry)
            else:
                raise self.refuse(node, "sdlab reads the positive from CLIPTextEncodes, through ConditioningSetArea, "
                                        "ConditioningSetAreaPercentage, ConditioningSetAreaStrength or "
                                        "ConditioningCombine nodes")
        if len(skips) > 1:
            raise self.refuse(sampler, "sdlab encodes the positive prompts at one CLIP layer")
        return entries, skips.pop()

    def area_set(self, node: str, entry: AreaPrompt) -> AreaPrompt:
        """`entry` as the area node `node` leaves it (ConditioningCombine: unchanged)."""
        values = self.inputs(node)
        kind = self.graph[node]["class_type"]
        if kind == "ConditioningSetArea":
            return AreaPrompt(entry.prompt, pixels=(int(values["width"]), int(values["height"]), int(values["x"]),
                                                    int(values["y"])), strength=float(values["strength"]))
        if kind == "ConditioningSetAreaPercentage":
            return AreaPrompt(entry.prompt, fractions=(float(values["width"]), float(values["height"]),
                                                       float(values["x"]), float(values["y"])),
                              strength=float(values["strength"]))
        if kind == "ConditioningSetAreaStrength":
            return replace(entry, strength=float(values["strength"]))
        return entry

    def encoded(self, encoder: str, checkpoint: str, loras: list[str]) -> tuple[str, int | None]:
        """(the text, clip skip) of a CLIPTextEncode whose CLIP must be the checkpoint's through the model's LoRAs
        (and a CLIPSetLastLayer)."""
        node, index, kind = self.source(encoder, "clip")
        clip_skip = None
        if kind == "CLIPSetLastLayer":
            layer = self.inputs(node)["stop_at_clip_layer"]
            if layer not in CLIP_LAYERS:
                raise self.refuse(node, f"sdlab draws stop_at_clip_layer {' or '.join(map(str, CLIP_LAYERS))}")
            clip_skip = -int(layer)
            setter = node
            node, index, kind = self.source(node, "clip")
        else:
            setter = None
        chain: list[str] = []
        while kind == "LoraLoader":
            chain.insert(0, node)
            node, index, kind = self.source(node, "clip")
        if node != checkpoint or chain != loras:
            raise self.refuse(encoder, "sdlab encodes the prompts with the CLIP of the KSampler's model, through "
                                       "the same LoraLoaders")
        if setter is not None:
            self.visit(setter)
        self.visit(encoder)
        return self.inputs(encoder)["text"], clip_skip

    def under_controls(self, sampler: str, which: str) -> tuple[tuple[str, int, str], list[str]]:
        """(the source of the KSampler's `which` conditioning past its ControlNet nodes, those nodes from the
        encoder on): each output passes on the input of its index (`CONTROL_NODES`)."""
        chain: list[str] = []
        source = self.source(sampler, which)
        while source[2] in CONTROL_NODES:
            chain.insert(0, source[0])
            source = self.source(source[0], CONTROL_NODES[source[2]][source[1]])
        return source, chain

    def controls(self, sampler: str) -> list[GraphControl]:
        """The ControlNets of the KSampler's rows, as ComfyUI gives them (nodes.py ControlNetApply /
        ControlNetApplyAdvanced, comfy/samplers.py `apply_empty_x_to_equal_area`): a node of strength 0 passes its
        conditioning on untouched; the positive's chain; the negative's its own, or where it has none and the
        positive's last node is a ControlNetApply (control_apply_to_uncond) the positive's. sdlab draws one set of
        ControlNets for every row, so the two must apply the same (`applied`: net, picture, strength, window; the
        same nodes, or one node on each side as the old ControlNetApply pattern has it, whose controls ComfyUI
        draws alike); one whose start_percent > end_percent never acts and is left out."""
        chains = {which: self.under_controls(sampler, which)[1] for which in ("positive", "negative")}
        for node in dict.fromkeys(chains["positive"] + chains["negative"]):
            self.control_inputs(node)
        acting = {which: [n for n in chain if float(self.inputs(n)["strength"]) != 0]
                  for which, chain in chains.items()}
        positive, negative = acting["positive"], acting["negative"]
        if not negative and positive and self.graph[positive[-1]]["class_type"] == "ControlNetApply":
            negative = positive
        found, other = ([c for c in map(self.applied, nodes) if c.start <= c.end] for nodes in (positive, negative))
        if found != other:
            raise self.refuse(sampler, "sdlab draws the same ControlNets on the positive and the negative "
                                       "conditioning (a ControlNetApply on the positive alone, or ControlNet "
                                       "nodes applying the same net, picture, strength and window on both)")
        return found

    def applied(self, node: str) -> GraphControl:
        """What a ControlNet node applies: its ControlNetLoader's file, its LoadImage's picture, its strength and
        window (ControlNetApply: 0 to 1)."""
        values = self.inputs(node)
        loader, image = self.source(node, "control_net")[0], self.source(node, "image")[0]
        return GraphControl(self.inputs(loader)["control_net_name"], self.inputs(image)["image"],
                            float(values["strength"]), float(values.get("start_percent", 0.0)),
                            float(values.get("end_percent", 1.0)))

    def control_inputs(self, node: str) -> None:
        """Check and run (in order) a ControlNet node's ControlNetLoader, LoadImage (and VAELoader: its VAE is
        read only by ControlNets of a latent format, none of SD's), then the node."""
        loader, _, loader_kind = self.source(node, "control_net")
        image, _, image_kind = self.source(node, "image")
        if loader_kind != "ControlNetLoader":
            raise self.refuse(node, "sdlab applies the ControlNet of a ControlNetLoader")
        if image_kind != "LoadImage":
            raise self.refuse(node, "sdlab applies a ControlNet to the picture of a LoadImage")
        if "vae" in self.inputs(node) and self.source(node, "vae")[2] == "VAELoader":
            self.visit(self.source(node, "vae")[0])
        for at in (loader, image, node):
            self.visit(at)

    def vae(self, node_id: str, checkpoint: str) -> str:
        """The node whose VAE `node_id` uses: the KSampler's CheckpointLoaderSimple or a VAELoader."""
        source, index, kind = self.source(node_id, "vae")
        if kind == "VAELoader":
            self.visit(source)
            return source
        if (source, index) != (checkpoint, 2):
            raise self.refuse(node_id, "sdlab draws with the VAE of the KSampler's CheckpointLoaderSimple or of a "
                                       "VAELoader")
        return source

    def latent(self, sampler: str, checkpoint: str, vae: str, plan: GraphPlan) -> None:
        node, _, kind = self.source(sampler, "latent_image")
        masker = None
        if kind in ("SetLatentNoiseMask", "VAEEncodeForInpaint"):
            masker = node
            loader, _, loader_kind = self.source(masker, "mask")
            if loader_kind not in ("LoadImage", "LoadImageMask"):
                raise self.refuse(masker, "sdlab reads a noise mask from a LoadImage's MASK (1 - its alpha) or a "
                                          "LoadImageMask")
            plan.mask_node = loader_kind
            plan.mask_channel = self.inputs(loader).get("channel", "alpha")
            if kind == "VAEEncodeForInpaint":       # the encoder itself: its pixels and VAE read as VAEEncode's
                plan.mask_grow = int(self.inputs(masker)["grow_mask_by"])
                kind = "VAEEncode"
            else:
                node, _, kind = self.source(masker, "samples")
                if kind != "VAEEncode":
                    raise self.refuse(masker, "sdlab sets the noise mask of a VAEEncode's latent")
            plan.mask_image = self.inputs(loader)["image"]
            self.visit(loader)
        values = self.inputs(node)
        if kind == "EmptyLatentImage":
            if plan.strength != 1.0:
                raise self.refuse(sampler, "sdlab draws an EmptyLatentImage at denoise 1")
            plan.width, plan.height, plan.batch_size = (int(values["width"]), int(values["height"]),
                                                        int(values["batch_size"]))
        elif kind == "VAEEncode":
            image, index, image_kind = self.source(node, "pixels")
            if image_kind != "LoadImage":
                if image_kind in PICTURE_NODES or image_kind == "VAEDecode":
                    encoder = self.graph[node]["class_type"]        # VAEEncode or VAEEncodeForInpaint
                    raise self.refuse(node, "sdlab does not draw a second KSampler from a decoded or upscaled "
                                            f"picture ({encoder} of an ImageUpscaleWithModel / ImageScale / "
                                            "VAEDecode); ComfyUI's two-pass graph upscales the latent "
                                            "(LatentUpscale / LatentUpscaleBy), or save the upscaled pictures")
                raise self.refuse(node, "sdlab encodes the picture of a LoadImage")
            if self.vae(node, checkpoint) != vae:
                raise self.refuse(node, "sdlab encodes and decodes a picture with one VAE")
            if plan.strength <= 0:
                raise self.refuse(sampler, "sdlab draws img2img at a denoise above 0")
            plan.init_image = self.inputs(image)["image"]
            self.visit(image)
        else:
            raise self.refuse(node, "sdlab starts a KSampler from an EmptyLatentImage, a VAEEncode (or its "
                                    "SetLatentNoiseMask) or a VAEEncodeForInpaint")
        self.visit(node)
        if masker is not None:
            self.visit(masker)


def run_order(plan: GraphPlan, before_sampler: bool) -> list[str]:
    """The nodes shown as executing before the KSampler's steps (`before_sampler`), or after them."""
    at = plan.order.index(plan.sampler_node)
    return plan.order[:at + 1] if before_sampler else plan.order[at + 1:]


def second_pass_nodes(plan: GraphPlan) -> list[str]:
    """The nodes of a two-pass graph shown as executing once the first KSampler's steps end: from after it to the
    second KSampler (the first KSampler's decoders and their outputs, the upscale node, then the second
    KSampler)."""
    order = plan.order
    return order[order.index(plan.sampler_node) + 1:order.index(plan.second_node) + 1]
