"""`sdlab.pipeline.outpainting_scripts` against A1111 1.10's scripts/poor_mans_outpainting.py and
scripts/outpainting_mk_2.py (AUTOMATIC1111/stable-diffusion-webui), their drawing code transcribed below with
`process_images` left out: the canvases, masks, latent masks, tiles, noise and pasted results must be equal on the
same inputs; and a request's latent mask (A1111's `p.latent_mask`) is what Masked content fills and the latent
blend repaints."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image, ImageDraw

from sdlab.pipeline.outpainting_scripts import (
    DIRECTIONS, match_histograms, matched_noise, mk2_passes, outpaint_sides, poor_mans_tiles,
)
from test_tile_grid import a1111_split_grid


# scikit-image 0.24 skimage/exposure/histogram_matching.py `_match_cumulative_cdf` (float path) and
# `match_histograms(..., channel_axis=1)` on (N, C) arrays, which A1111 calls
def skimage_match_histograms(image, reference):
    matched = np.empty(image.shape, dtype=image.dtype)
    for channel in range(image.shape[-1]):
        source, template = image[..., channel], reference[..., channel]
        src_values, src_lookup, src_counts = np.unique(source.reshape(-1), return_inverse=True, return_counts=True)
        tmpl_values, tmpl_counts = np.unique(template.reshape(-1), return_counts=True)
        src_quantiles = np.cumsum(src_counts) / source.size
        tmpl_quantiles = np.cumsum(tmpl_counts) / template.size
        interp_a_values = np.interp(src_quantiles, tmpl_quantiles, tmpl_values)
        matched[..., channel] = interp_a_values[src_lookup].reshape(source.shape)
    return matched


# A1111 1.10 scripts/outpainting_mk_2.py `get_matched_noise`, verbatim but for skimage's call (above)
def a1111_get_matched_noise(_np_src_image, np_mask_rgb, noise_q=1, color_variation=0.05):
    def _fft2(data):
        out_fft = np.zeros((data.shape[0], data.shape[1], data.shape[2]), dtype=np.complex128)
        for c in range(data.shape[2]):
            c_data = data[:, :, c]
            out_fft[:, :, c] = np.fft.fft2(np.fft.fftshift(c_data), norm="ortho")
            out_fft[:, :, c] = np.fft.ifftshift(out_fft[:, :, c])
        return out_fft

    def _ifft2(data):
        out_ifft = np.zeros((data.shape[0], data.shape[1], data.shape[2]), dtype=np.complex128)
        for c in range(data.shape[2]):
            c_data = data[:, :, c]
            out_ifft[:, :, c] = np.fft.ifft2(np.fft.fftshift(c_data), norm="ortho")
            out_ifft[:, :, c] = np.fft.ifftshift(out_ifft[:, :, c])
        return out_ifft

    def _get_gaussian_window(width, height, std=3.14, mode=0):
        window_scale_x = float(width / min(width, height))
        window_scale_y = float(height / min(width, height))
        window = np.zeros((width, height))
        x = (np.arange(width) / width * 2. - 1.) * window_scale_x
        for y in range(height):
            fy = (y / height * 2. - 1.) * window_scale_y
            if mode == 0:
                window[:, y] = np.exp(-(x ** 2 + fy ** 2) * std)
            else:
                window[:, y] = (1 / ((x ** 2 + 1.) * (fy ** 2 + 1.))) ** (std / 3.14)
        return window

    def _get_masked_window_rgb(np_mask_grey, hardness=1.):
        np_mask_rgb = np.zeros((np_mask_grey.shape[0], np_mask_grey.shape[1], 3))
        hardened = np_mask_grey[:] ** hardness if hardness != 1. else np_mask_grey[:]
        for c in range(3):
            np_mask_rgb[:, :, c] = hardened[:]
        return np_mask_rgb

    width = _np_src_image.shape[0]
    height = _np_src_image.shape[1]
    num_channels = _np_src_image.shape[2]
    np_mask_grey = (np.sum(np_mask_rgb, axis=2) / 3.)
    img_mask = np_mask_grey > 1e-6
    ref_mask = np_mask_grey < 1e-3
    windowed_image = _np_src_image * (1. - _get_masked_window_rgb(np_mask_grey))
    windowed_image /= np.max(windowed_image)
    windowed_image += np.average(_np_src_image) * np_mask_rgb
    src_fft = _fft2(windowed_image)
    src_dist = np.absolute(src_fft)
    src_phase = src_fft / src_dist
    rng = np.random.default_rng(0)
    noise_window = _get_gaussian_window(width, height, mode=1)
    noise_rgb = rng.random((width, height, num_channels))
    noise_grey = (np.sum(noise_rgb, axis=2) / 3.)
    noise_rgb *= color_variation
    for c in range(num_channels):
        noise_rgb[:, :, c] += (1. - color_variation) * noise_grey
    noise_fft = _fft2(noise_rgb)
    for c in range(num_channels):
        noise_fft[:, :, c] *= noise_window
    noise_rgb = np.real(_ifft2(noise_fft))
    shaped_noise_fft = _fft2(noise_rgb)
    shaped_noise_fft[:, :, :] = np.absolute(shaped_noise_fft[:, :, :]) ** 2 * (src_dist ** noise_q) * src_phase
    brightness_variation = 0.
    contrast_adjusted_np_src = _np_src_image[:] * (brightness_variation + 1.) - brightness_variation * 2.
    shaped_noise = np.real(_ifft2(shaped_noise_fft))
    shaped_noise -= np.min(shaped_noise)
    shaped_noise /= np.max(shaped_noise)
    shaped_noise[img_mask, :] = skimage_match_histograms(shaped_noise[img_mask, :] ** 1.,
                                                         contrast_adjusted_np_src[ref_mask, :])
    shaped_noise = _np_src_image[:] * (1. - np_mask_rgb) + shaped_noise * np_mask_rgb
    matched_noise = shaped_noise[:]
    return np.clip(matched_noise, 0., 1.)


# A1111 1.10 scripts/outpainting_mk_2.py `Script.run`'s sides and `expand`, verbatim but for `process_images`,
# which `draw(p, init_images, image_mask, latent_mask)` stands for (it returns the pictures drawn)
def a1111_mk2(init_img, pixels, mask_blur, direction, noise_q, color_variation, width, height, batch_size, draw):
    class P:
        pass
    p = P()
    p.width, p.height = width, height
    process_width = p.width
    process_height = p.height
    left = pixels if "left" in direction else 0
    right = pixels if "right" in direction else 0
    up = pixels if "up" in direction else 0
    down = pixels if "down" in direction else 0
    mask_blur_x = mask_blur if left > 0 or right > 0 else 0
    mask_blur_y = mask_blur if up > 0 or down > 0 else 0
    target_w = math.ceil((init_img.width + left + right) / 64) * 64
    target_h = math.ceil((init_img.height + up + down) / 64) * 64
    if left > 0:
        left = left * (target_w - init_img.width) // (left + right)
    if right > 0:
        right = target_w - init_img.width - left
    if up > 0:
        up = up * (target_h - init_img.height) // (up + down)
    if down > 0:
        down = target_h - init_img.height - up

    def expand(init, count, expand_pixels, is_left=False, is_right=False, is_top=False, is_bottom=False):
        is_horiz = is_left or is_right
        is_vert = is_top or is_bottom
        pixels_horiz = expand_pixels if is_horiz else 0
        pixels_vert = expand_pixels if is_vert else 0
        images_to_process = []
        output_images = []
        for n in range(count):
            res_w = init[n].width + pixels_horiz
            res_h = init[n].height + pixels_vert
            process_res_w = math.ceil(res_w / 64) * 64
            process_res_h = math.ceil(res_h / 64) * 64
            img = Image.new("RGB", (process_res_w, process_res_h))
            img.paste(init[n], (pixels_horiz if is_left else 0, pixels_vert if is_top else 0))
            mask = Image.new("RGB", (process_res_w, process_res_h), "white")
            draw_ = ImageDraw.Draw(mask)
            draw_.rectangle((
                expand_pixels + mask_blur_x if is_left else 0,
                expand_pixels + mask_blur_y if is_top else 0,
                mask.width - expand_pixels - mask_blur_x if is_right else res_w,
                mask.height - expand_pixels - mask_blur_y if is_bottom else res_h,
            ), fill="black")
            np_image = (np.asarray(img) / 255.0).astype(np.float64)
            np_mask = (np.asarray(mask) / 255.0).astype(np.float64)
            noised = a1111_get_matched_noise(np_image, np_mask, noise_q, color_variation)
            output_images.append(Image.fromarray(np.clip(noised * 255., 0., 255.).astype(np.uint8), mode="RGB"))
            target_width = min(process_width, init[n].width + pixels_horiz) if is_horiz else img.width
            target_height = min(process_height, init[n].height + pixels_vert) if is_vert else img.height
            p.width = target_width if is_horiz else img.width
            p.height = target_height if is_vert else img.height
            crop_region = (
                0 if is_left else output_images[n].width - target_width,
                0 if is_top else output_images[n].height - target_height,
                target_width if is_left else output_images[n].width,
                target_height if is_top else output_images[n].height,
            )
            mask = mask.crop(crop_region)
            p.image_mask = mask
            image_to_process = output_images[n].crop(crop_region)
            images_to_process.append(image_to_process)
        p.init_images = images_to_process
        latent_mask = Image.new("RGB", (p.width, p.height), "white")
        draw_ = ImageDraw.Draw(latent_mask)
        draw_.rectangle((
            expand_pixels + mask_blur_x * 2 if is_left else 0,
            expand_pixels + mask_blur_y * 2 if is_top else 0,
            mask.width - expand_pixels - mask_blur_x * 2 if is_right else res_w,
            mask.height - expand_pixels - mask_blur_y * 2 if is_bottom else res_h,
        ), fill="black")
        p.latent_mask = latent_mask
        proc_images = draw(p)
        for n in range(count):
            output_images[n].paste(proc_images[n], (0 if is_left else output_images[n].width - proc_images[n].width, 0 if is_top else output_images[n].height - proc_images[n].height))
            output_images[n] = output_images[n].crop((0, 0, res_w, res_h))
        return output_images

    imgs = [init_img] * batch_size
    if left > 0:
        imgs = expand(imgs, batch_size, left, is_left=True)
    if right > 0:
        imgs = expand(imgs, batch_size, right, is_right=True)
    if up > 0:
        imgs = expand(imgs, batch_size, up, is_top=True)
    if down > 0:
        imgs = expand(imgs, batch_size, down, is_bottom=True)
    return imgs


# A1111 1.10 scripts/poor_mans_outpainting.py `Script.run` up to `process_images`: the tiles it draws
def a1111_poor_mans_work(init_img, pixels, mask_blur, direction, width, height):
    left = pixels if "left" in direction else 0
    right = pixels if "right" in direction else 0
    up = pixels if "up" in direction else 0
    down = pixels if "down" in direction else 0
    target_w = math.ceil((init_img.width + left + right) / 64) * 64
    target_h = math.ceil((init_img.height + up + down) / 64) * 64
    if left > 0:
        left = left * (target_w - init_img.width) // (left + right)
    if right > 0:
        right = target_w - init_img.width - left
    if up > 0:
        up = up * (target_h - init_img.height) // (up + down)
    if down > 0:
        down = target_h - init_img.height - up
    img = Image.new("RGB", (target_w, target_h))
    img.paste(init_img, (left, up))
    mask = Image.new("L", (img.width, img.height), "white")
    ImageDraw.Draw(mask).rectangle((
        left + (mask_blur * 2 if left > 0 else 0), up + (mask_blur * 2 if up > 0 else 0),
        mask.width - right - (mask_blur * 2 if right > 0 else 0),
        mask.height - down - (mask_blur * 2 if down > 0 else 0)), fill="black")
    latent_mask = Image.new("L", (img.width, img.height), "white")
    ImageDraw.Draw(latent_mask).rectangle((
        left + (mask_blur // 2 if left > 0 else 0), up + (mask_blur // 2 if up > 0 else 0),
        mask.width - right - (mask_blur // 2 if right > 0 else 0),
        mask.height - down - (mask_blur // 2 if down > 0 else 0)), fill="black")
    grids = [a1111_split_grid(image, width, height, pixels) for image in (img, mask, latent_mask)]
    work = []
    for (y, h, row), (_, _, mask_row), (_, _, latent_row) in zip(*(grid.tiles for grid in grids)):
        for (x, w, tile), (_, _, tile_mask), (_, _, tile_latent) in zip(row, mask_row, latent_row):
            if x >= left and x + w <= img.width - right and y >= up and y + h <= img.height - down:
                continue
            work.append((x, y, tile, tile_mask, tile_latent))
    return work


def _picture(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(1, height // 4), max(1, width // 4), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BILINEAR)


def _same(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))


def test_matched_noise_is_a1111s_get_matched_noise():
    """Same noise (numpy's default_rng(0)) to the last bit on a picture with a grown band, several q / variation."""
    canvas = Image.new("RGB", (96, 64))
    canvas.paste(_picture(60, 64, 3), (36, 0))
    mask = Image.new("RGB", (96, 64), "white")
    ImageDraw.Draw(mask).rectangle((40, 0, 96, 64), fill="black")
    image = (np.asarray(canvas) / 255.0).astype(np.float64)
    mask_rgb = (np.asarray(mask) / 255.0).astype(np.float64)
    for noise_q, variation in ((1.0, 0.05), (0.3, 0.0), (2.5, 1.0)):
        ours = matched_noise(image.copy(), mask_rgb, noise_q, variation)
        theirs = a1111_get_matched_noise(image.copy(), mask_rgb, noise_q, variation)
        assert np.array_equal(ours, theirs)
        assert np.array_equal(ours[mask_rgb == 0], image[mask_rgb == 0])        # the kept picture stays


def test_match_histograms_is_scikit_images():
    skimage = pytest.importorskip("skimage")
    rng = np.random.default_rng(4)
    image, reference = rng.random((500, 3)), rng.random((300, 3)) ** 2
    assert np.array_equal(match_histograms(image, reference),
                          skimage.exposure.match_histograms(image, reference, channel_axis=1))


def test_outpaint_sides_round_the_canvas_to_64():
    assert outpaint_sides((40, 48), 16, ("left", "right", "down")) == (
        outpaint_sides((40, 48), 16, ("left", "right", "down"))[0], (128, 64))
    sides, size = outpaint_sides((100, 70), 24, DIRECTIONS)
    assert size == (192, 128) and (sides.left, sides.right, sides.up, sides.down) == (46, 46, 29, 29)


@pytest.mark.parametrize(("init", "pixels", "blur", "direction", "size", "batch"), [
    ((40, 48), 16, 0, ("left", "right", "down"), (64, 64), 1),
    ((64, 64), 32, 8, DIRECTIONS, (64, 64), 2),
    ((72, 40), 24, 3, ("up",), (128, 64), 1),
    ((56, 64), 8, 5, ("right", "up"), (32, 32), 1),
])
def test_mk2_passes_make_a1111s_pictures(init, pixels, blur, direction, size, batch):
    """Each pass's init pictures, mask, latent mask and size, and its pictures pasted back, as A1111's `expand`
    (the 'drawn' pictures: each init picture turned upside down, a stand-in for the model)."""
    picture = _picture(*init, seed=9)
    theirs_inputs = []

    def draw(p):
        theirs_inputs.append(([im.copy() for im in p.init_images], p.image_mask, p.latent_mask, (p.width, p.height)))
        return [im.transpose(Image.Transpose.ROTATE_180) for im in p.init_images]

    theirs = a1111_mk2(picture, pixels, blur, direction, 1.0, 0.05, *size, batch, draw)
    current, k = [picture] * batch, 0
    for one in mk2_passes(picture.size, pixels, blur, direction, size):
        canvases = one.canvases(current, 1.0, 0.05)
        inits, mask, latent = one.inputs(canvases, current[0].size)
        their_inits, their_mask, their_latent, their_size = theirs_inputs[k]
        assert one.drawn_size(current[0].size) == their_size
        assert all(_same(a, b) for a, b in zip(inits, their_inits)) and len(inits) == batch
        assert _same(mask, their_mask) and _same(latent, their_latent)
        current = one.merged(canvases, [im.transpose(Image.Transpose.ROTATE_180) for im in inits], current[0].size)
        k += 1
    assert k == len(theirs_inputs) and all(_same(a, b) for a, b in zip(current, theirs))


@pytest.mark.parametrize(("init", "pixels", "blur", "direction", "size"), [
    ((40, 48), 16, 4, DIRECTIONS, (64, 64)),
    ((100, 70), 24, 7, ("left", "down"), (64, 48)),
    ((64, 64), 32, 0, ("right",), (96, 64)),
])
def test_poor_mans_tiles_are_a1111s(init, pixels, blur, direction, size):
    picture = _picture(*init, seed=11)
    tiles = poor_mans_tiles(picture, pixels, blur, direction, size)
    work = a1111_poor_mans_work(picture, pixels, blur, direction, *size)
    assert len(tiles.work) == len(work) > 0
    for (tile, mask, latent), (_, _, their_tile, their_mask, their_latent) in zip(tiles.work, work):
        assert _same(tile.image, their_tile) and _same(mask, their_mask) and _same(latent, their_latent)


def test_a_latent_mask_is_what_masked_content_fills_and_the_latent_blend_repaints():
    """A1111's `p.latent_mask`: `masking.fill` by it, its latent cells the repainted ones (`latmask`), while the
    overlay weight stays the blurred mask's; the mask's own resized blur as latent mask changes nothing."""
    import torch

    from bundle_fixtures import tiny_bundle
    from sdlab.pipeline.generate import generate
    from sdlab.pipeline.masked_content import fill
    from sdlab.pipeline.plan import make_plan
    from sdlab.pipeline.request import GenerationRequest, RequestError

    torch.set_num_threads(1)
    bundle = tiny_bundle("sd1", seed=1)
    init = _picture(64, 64, 2)
    mask = Image.new("L", (64, 64))
    ImageDraw.Draw(mask).rectangle((0, 0, 24, 64), fill=255)
    latent = Image.new("L", (64, 64))
    ImageDraw.Draw(latent).rectangle((0, 0, 40, 64), fill=255)
    base = GenerationRequest("a red apple", init_image=init, mask_image=mask, mask_blur=2, steps=2, seed=3,
                             width=64, height=64, strength=0.8, inpaint_fill="fill", img2img_convention="a1111")
    plan = make_plan(bundle, GenerationRequest(**{**vars(base), "latent_mask_image": latent}))
    plain = make_plan(bundle, base)
    assert _same(plan.picture.image, fill(init, latent))
    assert torch.equal(plan.mask, plain.mask)                               # overlay / 9-channel: the mask's
    assert torch.equal(plan.picture.overlay.weight, plain.picture.overlay.weight)
    latent_weights = torch.from_numpy(np.asarray(latent, dtype=np.float32) / 255)[None, None]
    assert torch.equal(plan.picture.latent_mask, latent_weights)
    drawn = generate(bundle, plan).images[0]
    assert not _same(drawn, generate(bundle, plain).images[0])
    own_blur = Image.fromarray((plain.mask[0, 0].numpy() * 255).round().astype(np.uint8), "L")
    same = generate(bundle, GenerationRequest(**{**vars(base), "latent_mask_image": own_blur})).images[0]
    assert _same(same, generate(bundle, plain).images[0])
    with pytest.raises(RequestError, match="latent mask"):
        make_plan(bundle, GenerationRequest(**{**vars(base), "latent_mask_image": latent.resize((32, 32))}))
