"""img2img and inpainting inputs as A1111 prepares them (``StableDiffusionProcessingImg2Img.init``).

In A1111's order:

1. the mask: its levels (a transparent mask's alpha kept soft with ``mask_round`` off), inverted for Mask mode
   "Inpaint not masked", Gaussian-blurred by ``mask_blur`` (along y
   ``mask_blur_y`` when set) at its own size (``overlay.blurred_mask``), which may differ from the picture's;
2. Inpaint area "Whole picture": the mask is resized to width x height by the resize mode (Lanczos, as diffusers
   resizes it; "latent": stretched); the overlay weight is twice it, clipped (``overlay.overlay_weight``).
   "Only masked" (``inpaint_only_masked``): the mask stretched to the picture's size (``images.fit_mask``), the
   region is the blurred mask's bounding box grown by
   ``inpaint_padding``, then to the aspect of width x height (``inpaint_area.inpaint_region``); the mask's
   crop is resized to width x height by "Resize and fill", and the overlay weight is the blurred mask
   itself, at the picture's size. A blank mask has no region: A1111 then draws img2img of the whole
   picture, and so does sdlab (the plan's request drops the mask);
3. the picture (on white): resized to width x height by the resize mode (`RESIZE_MODES`: "resize",
   "crop", "fill"; "latent" keeps its size, any size: its latent is interpolated to the size instead,
   bilinear, after encoding), or for "Only masked" cropped to the region and resized by "Resize and fill"; the overlay
   keeps the picture before this crop;
4. Masked content other than "original" paints the mask's area of that picture (``masked_content.fill``,
   by the mask of step 2); "latent noise" and "latent nothing" then replace that area of its latent once
   encoded (``masked_content.masked_latent``, in ``pipeline/generate.py``). A request's latent mask (A1111's
   ``p.latent_mask``, which its outpainting scripts set) takes the mask's place there and in the latent blend.
   Under ComfyUI's img2img convention (but for VAEEncodeForInpaint's "grey") with the resize mode "resize" or
   "latent" the latent blend's mask is the blurred mask at its own size, which ComfyUI's SetLatentNoiseMask noise
   mask is: resized bilinearly straight to the latent (comfy/sampler_helpers.py ``prepare_mask``), whatever its
   size; "crop" and "fill" cut or pad the picture, and its mask follows it (the mask of step 2).

After decoding, "Only masked" puts each picture back into its region and every inpainting pastes the
original over the result by the overlay weight (``overlay.apply_overlay``): the output then has the init
picture's size, outside the region the picture itself.

Several init pictures (A1111's ``init_images``, one per picture of the batch) are each prepared so, with the
one mask (``init_pictures``), whatever their sizes: each is resized to width x height by the resize mode, or for
"Only masked" cropped to the region (found on the first picture, the same coordinates on every picture, as
A1111 crops each at the mask's ``crop_region``), its overlay weight the blurred mask fitted to its own size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from PIL import Image
from torch import Tensor

from sdlab.pipeline.images import fit_mask
from sdlab.pipeline.inpaint_area import inpaint_region
from sdlab.pipeline.masked_content import fill
from sdlab.pipeline.overlay import Overlay, blurred_mask, mask_tensor, overlay_weight
from sdlab.pipeline.request import GenerationRequest, check_one_size
from sdlab.pipeline.upscale import IMG2IMG_UPSCALER, resize_image

logger = logging.getLogger(__name__)

__all__ = ["InitPicture", "init_picture", "init_pictures"]


@dataclass(frozen=True)
class InitPicture:
    """What an img2img / inpainting run encodes and pastes onto."""

    image: Image.Image               # RGB at width x height; the "latent" resize mode: at its own size
    mask: Tensor | None = None       # (1, 1, H, W) the blurred mask at width x height in [0, 1], 1 = repaint
    overlay: Overlay | None = None   # what the decoded pictures are pasted onto
    latent_mask: Tensor | None = None    # (1, 1, H', W') the request's latent mask, which the latent blend repaints
                                         # in place of `mask` (A1111's `p.latent_mask`; under ComfyUI's
                                         # convention its noise mask, any size); None: `mask`'s


@dataclass(frozen=True)
class _MaskSide:
    """The one mask's share of every init picture's inputs, prepared once per request."""

    fill_mask: Image.Image                          # "L" at width x height: the area Masked content paints
    mask: Tensor                                    # (1, 1, H, W) the mask at width x height, in [0, 1]
    weight: Tensor | None                           # (1, 1, H, W) the overlay weight; "Only masked": None,
                                                    # each picture's own (`_overlay_weight`)
    region: tuple[int, int, int, int] | None = None  # "Only masked": where the picture is cropped
    blurred: Image.Image | None = None              # "Only masked": the blurred mask ("L", its own size)
    latent: Tensor | None = None                    # (1, 1, H', W') the request's latent mask, or under ComfyUI's
                                                    # convention the blurred mask at its own size; None: `mask`


def init_pictures(req: GenerationRequest) -> tuple[InitPicture, ...]:
    """The inputs of each init picture of a resolved img2img / inpainting request (`init_pictures`), all
    with its one mask."""
    mask_side = _mask_side(req)
    pictures = tuple(_picture_inputs(req, image, mask_side) for image in req.init_pictures())
    check_one_size({picture.image.size for picture in pictures})     # "latent" with a blank "Only masked" mask
    return pictures


def init_picture(req: GenerationRequest, image: Image.Image | None = None) -> InitPicture:
    """The inputs of a resolved img2img / inpainting request (module docstring) for its init picture `image`
    (None: `init_image`)."""
    return _picture_inputs(req, req.init_image if image is None else image, _mask_side(req))


def _mask_side(req: GenerationRequest) -> _MaskSide | None:
    """The mask's inputs (steps 1 and 2); None without a mask, or for "Only masked" with a blank one."""
    if req.mask_image is None:
        return None
    size = (req.width, req.height)
    blurred = blurred_mask(req.mask_image, req.mask_blur, req.mask_blur_y, req.invert_mask,   # "L", its own size
                           req.mask_round)
    if not req.inpaint_only_masked:
        resized = (fit_mask(blurred, size) if req.resize_mode == "latent"
                   else _resized(blurred, req.resize_mode, size))
        weights = mask_tensor(resized)                                                 # (1, 1, H, W)
        if req.latent_mask_image is not None:       # A1111's `p.latent_mask`: what Masked content fills
            latent = req.latent_mask_image.convert("L")
            return _MaskSide(latent, weights, overlay_weight(weights), latent=mask_tensor(latent))
        if _straight_to_latent(req):    # SetLatentNoiseMask's noise mask, which ComfyUI resizes from its own size
            # straight to the latent (`prepare_mask`), of any size
            return _MaskSide(resized, weights, overlay_weight(weights), latent=mask_tensor(blurred))
        return _MaskSide(resized, weights, overlay_weight(weights))
    mask = fit_mask(blurred, req.init_image.size)                                       # the region's coordinates
    region = inpaint_region(mask, req.inpaint_padding, size)
    if region is None:
        logger.info("the mask is blank: Only masked has no region to draw; drawing img2img of the whole picture")
        return None
    crop_mask = resize_image(mask.crop(region), IMG2IMG_UPSCALER, size, mode="fill")
    return _MaskSide(crop_mask, mask_tensor(crop_mask), None, region, blurred)


def _straight_to_latent(req: GenerationRequest) -> bool:
    """Whether the latent noise mask is the blurred mask at its own size, resized straight to the latent as ComfyUI's
    SetLatentNoiseMask's (`prepare_mask`): under ComfyUI's img2img convention (but for VAEEncodeForInpaint's "grey")
    where the picture is stretched to the latent as the mask is ("resize", "latent"; the ComfyUI API's pictures are
    their own size). Where "crop" or "fill" cuts or pads the picture, the mask follows it (the mask at width x
    height), as ComfyUI's would had the graph cut both alike."""
    return (req.img2img_convention == "comfyui" and req.inpaint_fill != "grey"
            and req.resize_mode in ("resize", "latent"))


def _picture_inputs(req: GenerationRequest, image: Image.Image, mask_side: _MaskSide | None) -> InitPicture:
    """One init picture's inputs (steps 3 and 4) with the mask's share `mask_side`."""
    size = (req.width, req.height)
    picture = image.convert("RGB")
    if mask_side is None:
        return InitPicture(_resized(picture, req.resize_mode, size))
    if mask_side.region is None:
        picture = _resized(picture, req.resize_mode, size)
        drawn = picture
    else:
        drawn = resize_image(picture.crop(mask_side.region), IMG2IMG_UPSCALER, size, mode="fill")
    overlay = Overlay(picture, _overlay_weight(mask_side, picture.size), mask_side.region)
    return InitPicture(_filled(req, drawn, mask_side.fill_mask), mask_side.mask, overlay, mask_side.latent)


def _overlay_weight(mask_side: _MaskSide, size: tuple[int, int]) -> Tensor:
    """The overlay weight of a picture of `size`: "Only masked"'s is the blurred mask fitted to that size
    (A1111 resizes ``mask_for_overlay`` to each init picture), the whole picture's the shared one."""
    if mask_side.blurred is None:
        return mask_side.weight
    return mask_tensor(fit_mask(mask_side.blurred, size))


def _resized(image: Image.Image, mode: str, size: tuple[int, int]) -> Image.Image:
    """`image` at `size` by an img2img resize mode; "latent" leaves it as it is (its latent is resized)."""
    return image if mode == "latent" else resize_image(image, IMG2IMG_UPSCALER, size, mode=mode)


def _filled(req: GenerationRequest, picture: Image.Image, mask: Image.Image) -> Image.Image:
    """The picture as Masked content has it encoded: every content but "original" fills it first (A1111:
    ``if self.inpainting_fill != 1``), "latent noise" and "latent nothing" then replace its latent. "grey" (ComfyUI's
    VAEEncodeForInpaint) greys the masked pixels as they are encoded (`generate._start`)."""
    return picture if req.inpaint_fill in ("original", "grey") else fill(picture, mask)
