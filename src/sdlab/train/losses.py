"""Image losses for autoencoder training that need no pretrained weights.

No LPIPS / VGG weights can be downloaded here, so the "perceptual" part of the VAE objective is built from
two weight-free structural terms and an optional learned critic:

- ``ms_ssim``: multi-scale structural similarity (Wang, Simoncelli & Bovik 2003). Compares local means,
  variances and covariances in Gaussian windows at several scales; ``1 - ms_ssim`` penalises lost contrast
  and structure that a per-pixel L1/L2 forgives when it averages a blurry guess.
- ``gradient_l1``: L1 distance between the Sobel gradients of the two images; rewards edges at the right
  place with the right strength (blur lowers gradient magnitude, which this term sees directly).
- ``PatchDiscriminator`` + ``hinge_discriminator_loss`` / ``hinge_generator_loss``: the PatchGAN critic of
  pix2pix (Isola et al. 2017) used by taming-transformers / LDM, with the adaptive weight of Esser et al.
  2021 (eq. 7, ``adaptive_adversarial_weight``).

Images are (B, C, H, W) in [-1, 1] (data range 2) throughout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Wang et al. 2003, table 1 (five scales, finest first)
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
SSIM_K1, SSIM_K2 = 0.01, 0.03


# ----------------------------------------------------------------------------------------------------------
# Structural similarity


def _gaussian_window(size: int, sigma: float, channels: int, like: Tensor) -> Tensor:
    coords = torch.arange(size, dtype=torch.float32, device=like.device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    window = g[:, None] * g[None, :]  # (size, size), sums to 1
    return window.to(like.dtype).expand(channels, 1, size, size)  # depthwise kernel (C, 1, k, k)


def _local_mean(x: Tensor, window: Tensor) -> Tensor:
    pad = window.shape[-1] // 2
    x = F.pad(x, (pad, pad, pad, pad), mode="replicate")  # 'same' size at any scale, even below the window
    return F.conv2d(x, window, groups=x.shape[1])  # (B, C, H, W)


def _ssim_terms(x: Tensor, y: Tensor, window: Tensor, data_range: float) -> tuple[Tensor, Tensor]:
    """Per-image mean luminance term and contrast-structure term of SSIM (Wang et al. 2004, eq. 13):

    l = (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1),  cs = (2 sigma_xy + C2) / (sigma_x^2 + sigma_y^2 + C2),
    C1 = (K1 L)^2, C2 = (K2 L)^2. Returns (mean over pixels of l * cs, mean over pixels of cs), each (B,).
    """
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    mu_x, mu_y = _local_mean(x, window), _local_mean(y, window)  # (B, C, H, W)
    var_x = _local_mean(x * x, window) - mu_x**2
    var_y = _local_mean(y * y, window) - mu_y**2
    cov_xy = _local_mean(x * y, window) - mu_x * mu_y
    cs = (2 * cov_xy + c2) / (var_x + var_y + c2)  # (B, C, H, W)
    luminance = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    return (luminance * cs).flatten(1).mean(1), cs.flatten(1).mean(1)  # (B,), (B,)


def ssim(x: Tensor, y: Tensor, *, window_size: int = 11, sigma: float = 1.5, data_range: float = 2.0) -> Tensor:
    """Single-scale SSIM per image, (B,). 1 for identical images."""
    window = _gaussian_window(window_size, sigma, x.shape[1], x)
    return _ssim_terms(x.float(), y.float(), window.float(), data_range)[0]


def ms_ssim(
    x: Tensor,
    y: Tensor,
    *,
    scales: int = 3,
    window_size: int = 11,
    sigma: float = 1.5,
    data_range: float = 2.0,
) -> Tensor:
    """Multi-scale SSIM per image, (B,) (Wang et al. 2003, eq. 7):

    MS-SSIM = l_M^{w_M} * prod_{j=1..M} cs_j^{w_j}, halving the resolution (2x2 average) between scales.

    ``scales`` takes the first M of the paper's five weights, renormalised to sum to 1 (small images cannot
    be halved four times). Terms are clamped to >= 1e-6 before the fractional powers, so anti-correlated
    patches give a small value with a finite gradient instead of NaN. Computed in fp32.
    """
    if not 1 <= scales <= len(MS_SSIM_WEIGHTS):
        raise ValueError(f"scales={scales} outside 1..{len(MS_SSIM_WEIGHTS)}")
    if min(x.shape[-2:]) < 2 ** (scales - 1):
        raise ValueError(f"image size {tuple(x.shape[-2:])} too small for {scales} scales")
    weights = torch.tensor(MS_SSIM_WEIGHTS[:scales], dtype=torch.float32, device=x.device)
    weights = weights / weights.sum()
    x, y = x.float(), y.float()
    window = _gaussian_window(window_size, sigma, x.shape[1], x)
    result = torch.ones(x.shape[0], device=x.device)
    for j in range(scales):
        full, cs = _ssim_terms(x, y, window, data_range)  # (B,), (B,)
        term = full if j == scales - 1 else cs  # the luminance term counts at the coarsest scale only
        result = result * term.clamp(min=1e-6) ** weights[j]
        if j < scales - 1:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    return result  # (B,)


# ----------------------------------------------------------------------------------------------------------
# Edges


def sobel_gradients(x: Tensor) -> tuple[Tensor, Tensor]:
    """Horizontal and vertical Sobel derivatives per channel, 'same' size with replicate padding.

    Kernels are divided by 8 so that a unit step per pixel gives a unit response. Returns two (B, C, H, W).
    """
    gx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=x.device, dtype=x.dtype) / 8
    kernel = torch.stack([gx, gx.T])[:, None].repeat(x.shape[1], 1, 1, 1)  # (2C, 1, 3, 3): dx, dy per channel
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    grads = F.conv2d(padded, kernel, groups=x.shape[1])  # (B, 2C, H, W), channels interleaved dx0 dy0 dx1...
    return grads[:, 0::2], grads[:, 1::2]


def gradient_l1(x: Tensor, y: Tensor) -> Tensor:
    """Mean |Sobel_x(x) - Sobel_x(y)| + |Sobel_y(x) - Sobel_y(y)| per image, (B,)."""
    x_dx, x_dy = sobel_gradients(x)
    y_dx, y_dy = sobel_gradients(y)
    return ((x_dx - y_dx).abs() + (x_dy - y_dy).abs()).flatten(1).mean(1)  # (B,)


# ----------------------------------------------------------------------------------------------------------
# Adversarial critic


class PatchDiscriminator(nn.Module):
    """PatchGAN critic (pix2pix's ``NLayerDiscriminator``, as in taming-transformers / LDM).

    conv4x4/2 -> LeakyReLU(0.2), then ``layers - 1`` blocks of conv4x4/2 -> norm -> LeakyReLU with the width
    doubling (at most 8x), one conv4x4/1 block, and a conv4x4/1 to one logit per patch. GroupNorm replaces
    pix2pix's BatchNorm, so that each image is judged on its own (no batch statistics, nothing to sync
    under DDP). Weights start as N(0, 0.02) as in pix2pix.
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64, layers: int = 3, norm_groups: int = 32):
        super().__init__()
        modules: list[nn.Module] = [nn.Conv2d(in_channels, base_channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = base_channels
        for n in range(1, layers + 1):
            out = base_channels * min(2**n, 8)
            stride = 2 if n < layers else 1
            modules += [
                nn.Conv2d(width, out, 4, stride, 1, bias=False),
                nn.GroupNorm(min(norm_groups, out), out),
                nn.LeakyReLU(0.2),
            ]
            width = out
        modules.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.main = nn.Sequential(*modules)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W)
        return self.main(x)  # (B, 1, h, w) patch logits


def hinge_discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """L_D = 1/2 (E[relu(1 - D(x))] + E[relu(1 + D(x_hat))]) (Lim & Ye 2017; taming's ``hinge_d_loss``)."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def hinge_generator_loss(fake_logits: Tensor) -> Tensor:
    """L_G = -E[D(x_hat)]."""
    return -fake_logits.mean()


def adaptive_adversarial_weight(
    reconstruction_loss: Tensor, generator_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4
) -> Tensor:
    """lambda = ||grad_{G_L} L_rec|| / (||grad_{G_L} L_G|| + 1e-4), clamped to [0, max_weight], detached
    (Esser et al. 2021, eq. 7): balances the two gradients at the decoder's last layer ``last_layer``."""
    rec_grad = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)[0]
    gen_grad = torch.autograd.grad(generator_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (gen_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


# ----------------------------------------------------------------------------------------------------------
# Metric


def psnr(x: Tensor, y: Tensor, data_range: float = 2.0) -> Tensor:
    """Peak signal-to-noise ratio per image in dB, (B,): 10 log10(L^2 / MSE). Both clamped to [-1, 1] first
    (what a saved picture holds); with L = 2 this equals PSNR of the same pictures on a 0..1 scale."""
    mse = (x.float().clamp(-1, 1) - y.float().clamp(-1, 1)).pow(2).flatten(1).mean(1)  # (B,)
    return 10.0 * torch.log10(data_range**2 / mse.clamp(min=1e-12))
