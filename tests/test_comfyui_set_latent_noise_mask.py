"""ComfyUI's SetLatentNoiseMask with a mask of any size and a picture off the 8-pixel grid: VAEEncode crops the picture
to multiples of 8 about its centre, and the KSampler resizes the noise mask, whatever its size, bilinearly straight to
the latent (no crop of the mask).

The reference is ComfyUI's code, transcribed below (comfyanonymous/ComfyUI comfy/sd.py ``VAE.vae_encode_crop_pixels``
with downscale_ratio 8, the SD VAEs'; comfy/sampler_helpers.py ``prepare_mask``, comfy/samplers.py
``KSamplerX0Inpaint`` in test_comfyui_conventions.py). sdlab's inpainting under ComfyUI's convention (a ComfyUI-spelt
sampler, mask_round off, no paste back) with masks of 29 x 41 and 70 x 67 on a 64 x 64 picture is the transcribed
KSampler's latent within 1e-5 (test_comfyui_conventions.py's `assert_same_latents`); through the API, a 70 x 67
LoadImage's own MASK (and a 29 x 41 LoadImage's) draws the native job of the transcribed crop and the whole mask pixel
for pixel, where sdlab answered a 400 before.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from bundle_fixtures import init_picture
from test_comfyui_conventions import SEED, assert_same_latents, prepare_mask, prepare_noise, sdlab_run, tiny
from test_comfyui_vae_encode_for_inpaint import caught, ksampler_inpaint
from sdlab.pipeline import generate as G

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
__all__ = ["caught", "tiny"]                         # the fixtures, shared


# -- ComfyUI, transcribed ----------------------------------------------------------------------------------------
def vae_encode_crop_pixels(pixels, downscale_ratio=8):
    """comfy/sd.py ``VAE.vae_encode_crop_pixels`` (comfyanonymous/ComfyUI; an SD VAE's downscale_ratio 8): pixels
    (B, H, W, C) cut to multiples of the ratio, (side % ratio) // 2 off the start of each side."""
    dims = pixels.shape[1:-1]
    for d in range(len(dims)):
        x = (dims[d] // downscale_ratio) * downscale_ratio
        x_offset = (dims[d] % downscale_ratio) // 2
        if x != dims[d]:
            pixels = pixels.narrow(d + 1, x_offset, x)
    return pixels


# -- the pipeline ------------------------------------------------------------------------------------------------
def soft_mask(size: tuple[int, int], seed: int) -> tuple[Image.Image, torch.Tensor]:
    """A mask picture of `size` (w, h) ("L", white = repaint) and ComfyUI's MASK of it (H, W) in [0, 1]: a
    rectangle whose edges fall off any latent grid, and a band of level 100."""
    width, height = size
    levels = np.zeros((height, width), dtype=np.uint8)
    levels[height // 5:height * 2 // 3, width // 3:width * 3 // 4] = 255
    levels[height * 3 // 4:height * 7 // 8, 1:width // 2] = 100
    levels[np.random.default_rng(seed).random((height, width)) > 0.97] = 200
    return Image.fromarray(levels, "L"), torch.from_numpy(levels.astype(np.float32) / 255.0)


@pytest.mark.parametrize("mask_size, sampler, schedule, denoise", [
    ((29, 41), "euler", "karras", 1.0),
    ((70, 67), "euler_ancestral", "normal", 0.7),
    ((128, 96), "euler", "normal", 0.8),
])
def test_a_noise_mask_of_another_size_is_resized_straight_to_the_latent(monkeypatch, caught, tiny, mask_size, sampler,
                                                                        schedule, denoise):
    """A mask of another size than the picture, under ComfyUI's convention: its noise mask is the mask resized
    bilinearly from its own size to the latent (prepare_mask), not first to the picture's size (Lanczos, as the
    other conventions fit it), and KSamplerX0Inpaint blends by it at every call."""
    init = init_picture(64)
    mask_picture, mask = soft_mask(mask_size, seed=mask_size[0])
    run = sdlab_run(monkeypatch, tiny, "inpaint", init, mask_picture, sampler=sampler, schedule=schedule, steps=10,
                    strength=denoise, mask_round=False, paste_back=False)
    latent = G.encode_image(tiny.bundle, G.pil_to_tensor(init))                  # VAEEncode, (1, 4, h, w)
    denoise_mask = prepare_mask(mask, latent.shape)                             # (1, 4, h, w), from (H', W')
    assert ((denoise_mask > 0) & (denoise_mask < 1)).any()
    via_picture = prepare_mask(torch.nn.functional.interpolate(mask[None, None], size=(64, 64), mode="bilinear"),
                               latent.shape)
    assert (via_picture - denoise_mask).abs().max() > 1e-2, "the two routes to the latent would not be told apart"
    reference = ksampler_inpaint(tiny.bundle, run, caught["inner"][-1], latent, prepare_noise(latent, SEED),
                                 denoise_mask, sampler)
    assert_same_latents(caught["kept"][-1], reference)


def test_other_conventions_still_fit_the_mask_to_the_picture(tiny):
    """The rule is ComfyUI's alone: under diffusers' convention a 29 x 41 mask draws as that mask resized to the
    picture first (`init_picture`'s Lanczos fit), the same picture either way."""
    from sdlab.pipeline.upscale import IMG2IMG_UPSCALER, resize_image
    init = init_picture(64)
    mask_picture, _ = soft_mask((29, 41), seed=3)
    fitted = resize_image(mask_picture, IMG2IMG_UPSCALER, (64, 64), mode="resize")
    options = dict(sampler="Euler", steps=2, seed=SEED)
    drawn = tiny.inpaint("x", init, mask_picture, **options).images[0]
    assert np.array_equal(np.asarray(drawn), np.asarray(tiny.inpaint("x", init, fitted, **options).images[0]))


def third_and_quarter(size: tuple[int, int]) -> Image.Image:
    """A mask picture of `size` (w, h): the left third and the top quarter white (repaint)."""
    width, height = size
    levels = np.zeros((height, width), dtype=np.uint8)
    levels[:, :width // 3] = 255
    levels[:height // 4, :] = 255
    return Image.fromarray(levels, "L")


@pytest.mark.parametrize("resize_mode", ["crop", "fill", "resize"])
def test_the_noise_mask_follows_a_picture_cut_or_padded(monkeypatch, tiny, resize_mode):
    """The straight resize is ComfyUI's rule where the picture reaches the latent stretched as the mask does. A 96 x 64
    picture with its mask drawn on it, drawn at 64 x 64 under ComfyUI's convention: "crop" cuts the picture's middle
    64 columns, "fill" pads it to 64 x 64, and the noise mask is prepare_mask of the mask cut / padded so (the left
    third of the picture: 16 of the 64 columns drawn, whole latent cells, after "crop"), not the whole 96 x 64 mask
    squeezed onto the latent; "resize" stretches both and keeps the straight resize."""
    from sdlab.pipeline.overlay import mask_tensor
    from sdlab.pipeline.upscale import IMG2IMG_UPSCALER, resize_image

    caught_masks = []
    real = G._latent_repaint
    monkeypatch.setattr(G, "_latent_repaint", lambda bundle, plan, mask: caught_masks.append(
        real(bundle, plan, mask)) or caught_masks[-1])
    picture = init_picture(96).crop((0, 16, 96, 80))                              # 96 x 64
    mask_picture = third_and_quarter((96, 64))
    tiny.inpaint("x", picture, mask_picture, width=64, height=64, resize_mode=resize_mode, sampler="euler",
                 steps=2, seed=SEED, mask_blur=0, mask_round=False, paste_back=False)
    noise_mask = caught_masks[-1]                                                  # (1, 1, h, w)
    shape = (1, 1, *noise_mask.shape[-2:])
    straight = prepare_mask(mask_tensor(mask_picture), shape)                      # ComfyUI's, of the whole mask
    followed = prepare_mask(mask_tensor(resize_image(mask_picture, IMG2IMG_UPSCALER, (64, 64), mode=resize_mode)),
                            shape)                                                 # of the mask cut as the picture
    if resize_mode == "resize":
        assert torch.equal(noise_mask, straight)
        return
    assert torch.equal(noise_mask, followed)
    assert (followed - straight).abs().max() > 0.3, "the two routes to the latent would not be told apart"
    if resize_mode == "crop":                       # 16 columns and 16 rows of the 64 drawn: whole latent cells
        cells = 16 * noise_mask.shape[-1] // 64
        assert (noise_mask[..., :cells, :] == 1).all() and (noise_mask[..., :, :cells] == 1).all()
        assert (noise_mask[..., cells:, cells:] == 0).all()


# -- the ComfyUI API -----------------------------------------------------------------------------------------------
from server_fixtures import b64_png  # noqa: E402
from test_comfyui_vae_encode_for_inpaint import _off_grid_upload  # noqa: E402
from test_server_comfy_api import NATIVE, drawn, graph, native_pixels, server, viewed  # noqa: E402

__all__ += ["server"]


@pytest.mark.parametrize("mask_size", [(70, 67), (29, 41)])
def test_an_off_grid_picture_and_a_mask_of_any_size_draw_the_native_job(server, mask_size):
    """LoadImage (70 x 67) -> VAEEncode -> SetLatentNoiseMask (the LoadImage's own MASK, or a 29 x 41 LoadImage's)
    -> KSampler: the picture cut as ComfyUI's VAEEncode cuts it (transcribed: 64 x 64 from (3, 1)), the mask kept
    whole; the graph's picture is the native inpaint job of that crop and the whole mask (255 - alpha) under
    ComfyUI's sampler spelling, mask_round false, pixel for pixel where the native job pastes nothing back (the
    graph pastes nothing back anywhere), and not the job of the mask fitted to the picture first."""
    rgb, alpha = _off_grid_upload(server, "off-grid-slnm.png", (70, 67), seed=5)
    prompt = graph(**{"3.denoise": 0.9, "3.latent_image": ["12", 0]})
    prompt["10"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["11", 0], "vae": ["4", 2]}}
    prompt["11"] = {"class_type": "LoadImage", "inputs": {"image": "off-grid-slnm.png"}}
    prompt["12"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["10", 0], "mask": ["11", 1]}}
    del prompt["5"]
    if mask_size != (70, 67):
        _, alpha = _off_grid_upload(server, "off-grid-slnm-mask.png", mask_size, seed=6)
        prompt["13"] = {"class_type": "LoadImage", "inputs": {"image": "off-grid-slnm-mask.png"}}
        prompt["12"]["inputs"]["mask"] = ["13", 1]
    _, entry = drawn(server, prompt)
    pixels = viewed(server, entry["outputs"]["9"]["images"][0])
    assert pixels.shape == (64, 64, 3)
    cropped = vae_encode_crop_pixels(torch.from_numpy(rgb)[None])[0].numpy()             # (64, 64, 3)
    assert np.array_equal(cropped, rgb[1:65, 3:67])
    native = native_pixels(server, {**NATIVE, "mode": "inpaint", "init_image": b64_png(Image.fromarray(cropped)),
                                    "mask_image": b64_png(Image.fromarray(255 - alpha)), "mask_round": False,
                                    "strength": 0.9})
    fitted = np.asarray(Image.fromarray(255 - alpha).resize((64, 64), Image.Resampling.LANCZOS))
    inside = (slice(16, 38), slice(25, 40))             # repainted whole: the native job pastes nothing back there
    assert (fitted[inside] == 255).all()
    assert np.array_equal(pixels[inside], native[inside])
    other = native_pixels(server, {**NATIVE, "mode": "inpaint", "init_image": b64_png(Image.fromarray(cropped)),
                                   "mask_image": b64_png(Image.fromarray(fitted)), "mask_round": False,
                                   "strength": 0.9})
    assert np.abs(other[inside] - native[inside]).max() > 0, "the mask fitted to the picture first draws otherwise"
