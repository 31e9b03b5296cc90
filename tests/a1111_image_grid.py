"""A1111's `images.image_grid`, transcribed as the reference for sdlab's batch grids (`pipeline.grid.cell_picture`:
the X/Y/Z plot's batch cells, the A1111 API's batch progress preview)."""

from __future__ import annotations

import math

from PIL import Image


def a1111_image_grid(imgs: list[Image.Image]) -> Image.Image:
    """AUTOMATIC1111/stable-diffusion-webui modules/images.py `image_grid(imgs, batch_size=1, rows=None)` (1.10) at
    its default options (n_rows -1, grid_prevent_empty_spots false, grid_background_color #ffffff), which
    `sd_samplers_common.samples_to_image_grid` calls on a batch's previews (State.do_set_current_image under the
    default `show_progress_grid`), without the script callback."""
    rows = round(math.sqrt(len(imgs)))
    if rows > len(imgs):
        rows = len(imgs)
    cols = math.ceil(len(imgs) / rows)
    w, h = map(max, zip(*(img.size for img in imgs)))
    grid = Image.new("RGB", size=(cols * w, rows * h), color=(255, 255, 255))
    for i, img in enumerate(imgs):
        img_w, img_h = img.size
        w_offset, h_offset = 0 if img_w == w else (w - img_w) // 2, 0 if img_h == h else (h - img_h) // 2
        grid.paste(img, box=(i % cols * w + w_offset, i // cols * h + h_offset))
    return grid
