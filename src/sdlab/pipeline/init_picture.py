"""img2img and inpainting inputs as A1111 prepares them (``StableDiffusionProcessingImg2Img.init``).

In A1111's order:

1. the mask: its levels, inverted for Mask mode "Inpaint not masked", Gaussian-blurred by ``mask_blur`` (along y
   ``mask_blur_y`` when set) at the picture's size (``overlay.blurred_mask``);
2. Inpaint area "Whole picture": the mask is resized to width x height by the resize mode; the overlay
   weight is twice it, clipped (``overlay.overlay_weight``).
   "Only masked" (``inpaint_only_masked``): the region is the blurred mask's bounding box grown by
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
   encoded (``masked_content.masked_latent``, in ``pipeline/generate.py``).

After decoding, "Only masked" puts each picture back into its region and every inpainting pastes the
original over the result by the overlay weight (``overlay.apply_overlay``): the output then has the init
picture's size, outside the region the picture itself.

Several init pictures (A1111's ``init_images``, one per picture of the batch) are each prepared so, with the
one mask (``init_pictures``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from PIL import Image
from torch import Tensor

from sdlab.pipeline.inpaint_area import inpaint_region
from sdlab.pipeline.masked_content import fill
from sdlab.pipeline.overlay import Overlay, blurred_mask, mask_tensor, overlay_weight
from sdlab.pipeline.request import GenerationRequest
from sdlab.pipeline.upscale import resize_image

logger = logging.getLogger(__name__)

__all__ = ["InitPicture", "init_picture", "init_pictures"]

IMG2IMG_UPSCALER = "None"   # A1111's `upscaler_for_img2img` default: resize modes resize with Lanczos alone


@dataclass(frozen=True)
class InitPicture:
    """What an img2img / inpainting run encodes and pastes onto."""

    image: Image.Image               # RGB at width x height; the "latent" resize mode: at its own size
    mask: Tensor | None = None       # (1, 1, H, W) the blurred mask at width x height in [0, 1], 1 = repaint
    overlay: Overlay | None = None   # what the decoded pictures are pasted onto


def init_pictures(req: GenerationRequest) -> tuple[InitPicture, ...]:
    """The inputs of each init picture of a resolved img2img / inpainting request (`init_pictures`), all
    with its one mask."""
    return tuple(init_picture(req, image) for image in req.init_pictures())


def init_picture(req: GenerationRequest, image: Image.Image | None = None) -> InitPicture:
    """The inputs of a resolved img2img / inpainting request (module docstring) for its init picture `image`
    (None: `init_image`)."""
    size = (req.width, req.height)
    picture = (req.init_image if image is None else image).convert("RGB")
    if req.mask_image is None:
        return InitPicture(_resized(picture, req.resize_mode, size))
    mask = blurred_mask(req.mask_image, req.mask_blur, req.mask_blur_y, req.invert_mask)   # "L", the picture's size
    if not req.inpaint_only_masked:
        return _whole_picture(req, picture, mask)
    region = inpaint_region(mask, req.inpaint_padding, size)
    if region is None:
        logger.info("the mask is blank: Only masked has no region to draw; drawing img2img of the whole picture")
        return InitPicture(_resized(picture, req.resize_mode, size))
    return _only_masked(req, picture, mask, region)


def _whole_picture(req: GenerationRequest, picture: Image.Image, mask: Image.Image) -> InitPicture:
    size = (req.width, req.height)
    mask, picture = _resized(mask, req.resize_mode, size), _resized(picture, req.resize_mode, size)
    weights = mask_tensor(mask)                                                        # (1, 1, H, W)
    return InitPicture(_filled(req, picture, mask), weights, Overlay(picture, overlay_weight(weights)))


def _only_masked(req: GenerationRequest, picture: Image.Image, mask: Image.Image,
                 region: tuple[int, int, int, int]) -> InitPicture:
    size = (req.width, req.height)
    crop_mask = resize_image(mask.crop(region), IMG2IMG_UPSCALER, size, mode="fill")
    crop = resize_image(picture.crop(region), IMG2IMG_UPSCALER, size, mode="fill")
    overlay = Overlay(picture, mask_tensor(mask), region)
    return InitPicture(_filled(req, crop, crop_mask), mask_tensor(crop_mask), overlay)


def _resized(image: Image.Image, mode: str, size: tuple[int, int]) -> Image.Image:
    """`image` at `size` by an img2img resize mode; "latent" leaves it as it is (its latent is resized)."""
    return image if mode == "latent" else resize_image(image, IMG2IMG_UPSCALER, size, mode=mode)


def _filled(req: GenerationRequest, picture: Image.Image, mask: Image.Image) -> Image.Image:
    """The picture as Masked content has it encoded: every content but "original" fills it first (A1111:
    ``if self.inpainting_fill != 1``), "latent noise" and "latent nothing" then replace its latent."""
    return picture if req.inpaint_fill == "original" else fill(picture, mask)
