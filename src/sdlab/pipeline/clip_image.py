"""A picture as CLIP's image encoder takes it: transformers' `CLIPImageProcessor` defaults, with Pillow and torch.
Pixel-equal to transformers 5.23's Pillow backend (`CLIPImageProcessorPil`, which `CLIPImageProcessor` falls back
to without torchvision; tests/test_clip_vision.py); its torchvision backend, not compared, resizes with
torchvision's bicubic and may differ by a few levels.

1. RGB (an alpha channel is dropped, as `convert_rgb`);
2. the shortest side resized to 224 with Pillow's bicubic filter, the other to int(224 * long / short);
3. the centre 224 x 224 cut out, top = (h - 224) // 2, left = (w - 224) // 2;
4. scaled to [0, 1] (in float64, then float32) and normalised with OpenAI CLIP's mean and std.

A1111's ControlNet extension (sd-webui-controlnet, `annotator/clipvision/__init__.py` `ClipVisionDetector`)
prepares an IP-Adapter unit's picture otherwise (`extension_clip_pixels`, the request's control_convention
"a1111"): the whole picture squashed to 224 x 224 by OpenCV's INTER_AREA (`cv2.resize(image, (224, 224),
interpolation=cv2.INTER_AREA)`, no crop: a picture that is not square is stretched), then the same
`CLIPImageProcessor` (its resize and crop leave a 224 x 224 picture as it is; step 4 as above). The unit's mask
(its first channel, squashed with the picture) then scales the normalised pixels by (255 - mask) / 255: white
sets them to 0, CLIP's mean colour.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from sdlab.pipeline.preprocess import area_resize

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_pixels(image: Image.Image, size: int = 224) -> Tensor:
    """image -> (3, size, size) float32, CLIP-normalised."""
    image = image.convert("RGB")
    width, height = image.size
    short, long = min(width, height), max(width, height)
    longer = int(size * long / short)
    resized = image.resize((size, longer) if width <= height else (longer, size), Image.Resampling.BICUBIC)
    top, left = (resized.height - size) // 2, (resized.width - size) // 2
    cropped = np.asarray(resized.crop((left, top, left + size, top + size)))         # (size, size, 3) uint8
    scaled = (cropped.astype(np.float64) * (1 / 255)).astype(np.float32)
    mean, std = np.array(CLIP_MEAN, np.float32), np.array(CLIP_STD, np.float32)
    return torch.from_numpy(((scaled - mean) / std).transpose(2, 0, 1).copy())     # (3, size, size)


def extension_clip_pixels(image: Image.Image, size: int = 224, mask: Image.Image | None = None) -> Tensor:
    """image -> (3, size, size) float32 as A1111's ControlNet extension prepares an IP-Adapter unit's picture
    (module docstring): RGB squashed to size x size by OpenCV's INTER_AREA (`preprocess.area_resize`, bit for
    bit), CLIP-normalised; `mask` (the unit's, as large as the picture) squashed likewise, its first channel m
    scaling every channel by (255 - m) / 255."""
    squashed = area_resize(np.asarray(image.convert("RGB")), size, size)                # (size, size, 3) uint8
    pixels = clip_pixels(Image.fromarray(squashed), size)                              # (3, size, size)
    if mask is None:
        return pixels
    if mask.size != image.size:
        raise ValueError(f"the mask is {mask.width}x{mask.height}, the picture {image.width}x{image.height}")
    first = np.ascontiguousarray(np.asarray(mask.convert("RGB"))[:, :, :1])           # (H, W, 1) uint8
    kept = 255 - area_resize(first, size, size)                                       # (size, size, 1) uint8
    return pixels * (torch.from_numpy(kept.transpose(2, 0, 1).copy()).float() / 255.0)  # (3, size, size)
