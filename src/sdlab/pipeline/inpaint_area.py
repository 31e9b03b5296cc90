"""A1111's Inpaint area "Only masked": the region of the picture that is drawn (``modules/masking.py``).

The region is the bounding box of the (blurred) mask's non-zero pixels, grown by ``padding`` pixels on
every side and clipped to the picture (``get_crop_region_v2``), then grown along one side to the aspect
ratio of the size it is drawn at, shifted back inside the picture where it sticks out
(``expand_crop_region``). A1111 then crops the picture and the mask to it, draws the crop at the request's
size, and puts the result back into the region (``pipeline/init_picture.py``, ``overlay.uncrop``).

Regions are (x1, y1, x2, y2) in pixels, x2 and y2 exclusive (PIL's boxes).
"""

from __future__ import annotations

from PIL import Image

__all__ = ["expand_region", "inpaint_region", "mask_region"]

Region = tuple[int, int, int, int]


def mask_region(mask: Image.Image, padding: int) -> Region | None:
    """The bounding box of the mask's non-zero pixels grown by `padding` on each side, inside the picture;
    None for a blank mask (A1111's ``get_crop_region_v2``)."""
    box = mask.getbbox()
    if box is None:
        return None
    x1, y1, x2, y2 = box
    width, height = mask.size
    return max(x1 - padding, 0), max(y1 - padding, 0), min(x2 + padding, width), min(y2 + padding, height)


def expand_region(region: Region, size: tuple[int, int], picture_size: tuple[int, int]) -> Region:
    """`region` grown to the aspect ratio of `size` (width, height) inside a picture of `picture_size`, as
    A1111's ``expand_crop_region`` grows it: the short side by int(missing length), half of it (rounded down)
    before and the rest after; a region then past the picture's end is shifted back, one past its start
    shifted forward, and what is still too long is cut at the end."""
    x1, y1, x2, y2 = region
    if (x2 - x1) / (y2 - y1) > size[0] / size[1]:
        y1, y2 = _grown(y1, y2, (x2 - x1) / (size[0] / size[1]), picture_size[1])
    else:
        x1, x2 = _grown(x1, x2, (y2 - y1) * (size[0] / size[1]), picture_size[0])
    return x1, y1, x2, y2


def _grown(start: int, end: int, length: float, limit: int) -> tuple[int, int]:
    """One side of `expand_region`: [start, end) grown to `length`, kept inside [0, limit)."""
    missing = int(length - (end - start))
    start -= missing // 2
    end += missing - missing // 2
    if end >= limit:
        start -= end - limit
        end = limit
    if start < 0:
        end -= start
        start = 0
    return start, min(end, limit)


def inpaint_region(mask: Image.Image, padding: int, size: tuple[int, int]) -> Region | None:
    """The region "Only masked" draws at `size` (width, height) for `mask` (the blurred mask at the picture's
    size, "L"), or None for a blank mask, which A1111 draws as img2img of the whole picture."""
    region = mask_region(mask, padding)
    return None if region is None else expand_region(region, size, mask.size)
