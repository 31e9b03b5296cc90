"""ComfyUI's latent upscale (pipeline/comfy_latent_upscale.py) against ComfyUI's code, transcribed below from
comfyanonymous/ComfyUI comfy/utils.py (``bislerp``, ``common_upscale``; 00728eb) and nodes.py (``LatentUpscale``,
``LatentUpscaleBy``; e60e19b): every method and crop on random latents (with zero cells, equal and opposite
neighbours for bislerp's edge cases), up and down, torch.equal for F.interpolate's modes, 1e-6 for bislerp."""

from __future__ import annotations

import pytest
import torch

from sdlab.pipeline.comfy_latent_upscale import (COMFY_LATENT_UPSCALE_METHODS, comfyui_upscale_latent,
                                                 latent_upscale_by_size, latent_upscale_size)


# -- ComfyUI, transcribed ----------------------------------------------------------------------------------------
def bislerp(samples, width, height):
    """comfy/utils.py ``bislerp``."""
    def slerp(b1, b2, r):
        c = b1.shape[-1]
        b1_norms = torch.norm(b1, dim=-1, keepdim=True)
        b2_norms = torch.norm(b2, dim=-1, keepdim=True)
        b1_normalized = b1 / b1_norms
        b2_normalized = b2 / b2_norms
        b1_normalized[b1_norms.expand(-1, c) == 0.0] = 0.0
        b2_normalized[b2_norms.expand(-1, c) == 0.0] = 0.0
        dot = (b1_normalized * b2_normalized).sum(1)
        omega = torch.acos(dot)
        so = torch.sin(omega)
        res = (torch.sin((1.0 - r.squeeze(1)) * omega) / so).unsqueeze(1) * b1_normalized + (
            torch.sin(r.squeeze(1) * omega) / so).unsqueeze(1) * b2_normalized
        res *= (b1_norms * (1.0 - r) + b2_norms * r).expand(-1, c)
        res[dot > 1 - 1e-5] = b1[dot > 1 - 1e-5]
        res[dot < 1e-5 - 1] = (b1 * (1.0 - r) + b2 * r)[dot < 1e-5 - 1]
        return res

    def generate_bilinear_data(length_old, length_new, device):
        coords_1 = torch.arange(length_old, dtype=torch.float32, device=device).reshape((1, 1, 1, -1))
        coords_1 = torch.nn.functional.interpolate(coords_1, size=(1, length_new), mode="bilinear")
        ratios = coords_1 - coords_1.floor()
        coords_1 = coords_1.to(torch.int64)
        coords_2 = torch.arange(length_old, dtype=torch.float32, device=device).reshape((1, 1, 1, -1)) + 1
        coords_2[:, :, :, -1] -= 1
        coords_2 = torch.nn.functional.interpolate(coords_2, size=(1, length_new), mode="bilinear")
        coords_2 = coords_2.to(torch.int64)
        return ratios, coords_1, coords_2

    orig_dtype = samples.dtype
    samples = samples.float()
    n, c, h, w = samples.shape
    h_new, w_new = (height, width)
    ratios, coords_1, coords_2 = generate_bilinear_data(w, w_new, samples.device)
    coords_1 = coords_1.expand((n, c, h, -1))
    coords_2 = coords_2.expand((n, c, h, -1))
    ratios = ratios.expand((n, 1, h, -1))
    pass_1 = samples.gather(-1, coords_1).movedim(1, -1).reshape((-1, c))
    pass_2 = samples.gather(-1, coords_2).movedim(1, -1).reshape((-1, c))
    ratios = ratios.movedim(1, -1).reshape((-1, 1))
    result = slerp(pass_1, pass_2, ratios)
    result = result.reshape(n, h, w_new, c).movedim(-1, 1)
    ratios, coords_1, coords_2 = generate_bilinear_data(h, h_new, samples.device)
    coords_1 = coords_1.reshape((1, 1, -1, 1)).expand((n, c, -1, w_new))
    coords_2 = coords_2.reshape((1, 1, -1, 1)).expand((n, c, -1, w_new))
    ratios = ratios.reshape((1, 1, -1, 1)).expand((n, 1, -1, w_new))
    pass_1 = result.gather(-2, coords_1).movedim(1, -1).reshape((-1, c))
    pass_2 = result.gather(-2, coords_2).movedim(1, -1).reshape((-1, c))
    ratios = ratios.movedim(1, -1).reshape((-1, 1))
    result = slerp(pass_1, pass_2, ratios)
    result = result.reshape(n, h_new, w_new, c).movedim(-1, 1)
    return result.to(orig_dtype)


def common_upscale(samples, width, height, upscale_method, crop):
    """comfy/utils.py ``common_upscale`` (no lanczos: not a latent method)."""
    if crop == "center":
        old_width = samples.shape[3]
        old_height = samples.shape[2]
        old_aspect = old_width / old_height
        new_aspect = width / height
        x = 0
        y = 0
        if old_aspect > new_aspect:
            x = round((old_width - old_width * (new_aspect / old_aspect)) / 2)
        elif old_aspect < new_aspect:
            y = round((old_height - old_height * (old_aspect / new_aspect)) / 2)
        s = samples[:, :, y:old_height - y, x:old_width - x]
    else:
        s = samples
    if upscale_method == "bislerp":
        return bislerp(s, width, height)
    return torch.nn.functional.interpolate(s, size=(height, width), mode=upscale_method)


def latent_upscale(samples, width, height):
    """nodes.py ``LatentUpscale.upscale``'s size rule: the (width, height) it hands common_upscale, None for 0 x 0."""
    if width == 0 and height == 0:
        return None
    if width == 0:
        height = max(64, height)
        width = max(64, round(samples.shape[3] * height / samples.shape[2]))
    elif height == 0:
        width = max(64, width)
        height = max(64, round(samples.shape[2] * width / samples.shape[3]))
    else:
        width = max(64, width)
        height = max(64, height)
    return width // 8, height // 8


def latent_upscale_by(samples, scale_by):
    """nodes.py ``LatentUpscaleBy.upscale``'s size rule."""
    return round(samples.shape[3] * scale_by), round(samples.shape[2] * scale_by)


# -- the comparisons ----------------------------------------------------------------------------------------------
def random_latent(seed: int, height: int = 9, width: int = 12) -> torch.Tensor:
    """(2, 4, h, w): Gaussian cells, one cell zero, a column pair equal and one opposite (bislerp's edge cases)."""
    z = torch.randn((2, 4, height, width), generator=torch.Generator().manual_seed(seed))
    z[0, :, 2, 3] = 0.0
    z[1, :, :, 5] = z[1, :, :, 4]
    z[1, :, :, 8] = -z[1, :, :, 7]
    return z


@pytest.mark.parametrize("method", COMFY_LATENT_UPSCALE_METHODS)
@pytest.mark.parametrize("crop", ["disabled", "center"])
@pytest.mark.parametrize("size", [(18, 13), (7, 5), (12, 9), (30, 10)])
def test_latent_upscale_is_comfyuis_common_upscale(method, crop, size):
    width, height = size
    z = random_latent(width * 100 + height)
    ours = comfyui_upscale_latent(z, width, height, method, crop)
    reference = common_upscale(z, width, height, method, crop)
    assert ours.shape == reference.shape == (2, 4, height, width)
    assert torch.isfinite(ours).all()
    if method == "bislerp":
        torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(ours, reference)


def test_bislerp_is_not_bilinear():
    """bislerp keeps the neighbours' norms where bilinear shrinks them: the two differ (the test can fail)."""
    z = random_latent(1)
    assert not torch.allclose(comfyui_upscale_latent(z, 20, 15, "bislerp"), comfyui_upscale_latent(z, 20, 15,
                                                                                                   "bilinear"))


def test_bislerp_keeps_half_precision():
    z = random_latent(2).half()
    ours = comfyui_upscale_latent(z, 16, 12, "bislerp")
    assert ours.dtype == torch.float16
    torch.testing.assert_close(ours, bislerp(z, 16, 12), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("width, height", [(0, 0), (0, 96), (160, 0), (40, 40), (1024, 768), (0, 8), (200, 0)])
def test_latent_upscale_sizes_are_comfyuis(width, height):
    z = random_latent(3, 9, 12)
    assert latent_upscale_size(9, 12, width, height) == latent_upscale(z, width, height)


@pytest.mark.parametrize("scale", [1.5, 2.0, 0.5, 1.33, 0.01, 8.0])
def test_latent_upscale_by_sizes_are_comfyuis(scale):
    z = random_latent(4, 9, 13)
    assert latent_upscale_by_size(9, 13, scale) == latent_upscale_by(z, scale)


def test_an_unknown_method_or_crop_is_one_error():
    z = random_latent(5)
    with pytest.raises(ValueError, match="upscale_method 'lanczos'"):
        comfyui_upscale_latent(z, 4, 4, "lanczos")
    with pytest.raises(ValueError, match="crop 'middle'"):
        comfyui_upscale_latent(z, 4, 4, "bilinear", "middle")
