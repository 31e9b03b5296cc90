"""Training objective for the KL autoencoder (the SD VAE), from scratch or as a fine-tune.

Objective per batch, every term a mean over pixels (so that its size does not depend on the resolution)::

    L = pixel(x, x_hat)                                   L1 (LDM) or L2
      + ssim_weight     * (1 - MS-SSIM(x, x_hat))         structure and contrast, no weights
      + gradient_weight * |Sobel(x) - Sobel(x_hat)|_1     edge placement and sharpness, no weights
      + kl_weight * KL(q(z|x) || N(0, I)) / (C H W)
      + [adversarial_weight * lambda * L_G(D(x_hat))]     after ``adversarial_start`` critic updates
      + [L_D(D(x), D(sg(x_hat)))]                         the critic's own hinge loss

LDM (``LPIPSWithDiscriminator``) sums the reconstruction and the KL over pixels and uses kl_weight 1e-6;
dividing both by the same C*H*W keeps exactly that balance, so 1e-6 means the same here, while the loss
stays O(1) for gradient clipping. LDM's learned output log-variance is left out: with one scalar it only
rescales the reconstruction term, which Adam undoes.

What each perceptual choice buys and costs (no LPIPS/VGG weights can be had here):

- MS-SSIM + Sobel (default on): free of weights, deterministic, cheap (a few depthwise convs) and stable
  from step 0. They push against the blur that pixel losses settle for, mostly at edges and in flat
  regions' contrast, but they cannot invent texture: a VAE trained on them is sharper than L1 alone yet
  still smoother than LDM's LPIPS + GAN VAE on photographs. They slightly lower PSNR at equal steps
  when weighted heavily, since they are not the MSE optimum.
- PatchGAN + hinge (optional, ``adversarial_weight > 0``): the only term here that rewards realistic
  high-frequency texture; costs a second network (forward on real and fake every step, an extra backward
  through it), two autograd.grad calls for the adaptive weight lambda (Esser et al. 2021, eq. 7), and
  the usual GAN risks (needs a warm-up, can destabilise). Worth it for photographs at scale; not for
  the synthetic tests here.

How the critic trains inside a generic loop with ONE optimiser (the loop's AdamW over
``trainable_modules()``): the returned loss is ``L_vae + L_D``, arranged so that one backward gives each
network exactly its own gradient. The critic's verdict on x_hat for the VAE term is computed with
*detached* critic parameters (``torch.func.functional_call``), so L_G reaches the VAE only; L_D sees
``x_hat.detach()``, so it reaches the critic only. Adam normalises each parameter's step by its own
gradient statistics, so this equals two Adam optimisers with the loop's learning rate and betas (LDM uses
the same learning rate for both); only the loop's global gradient-norm clipping and weight decay are
shared. The critic trains from the first step (as a warm-up, it is ready when its verdict starts to
count); ``adversarial_start`` counts its updates (optimiser steps, `after_optimizer_step`, so the start does
not move with the number of processes or micro-steps) in a buffer of the critic module, so it survives run
checkpoints and resume with no help from the loop.

The deliverable (``save_weights``) is the bare AutoencoderKL state dict (original LDM names without the
``first_stage_model.`` prefix), its ``VAEConfig`` as JSON under ``sdlab.config`` and the latent scaling
factor under ``sdlab.scaling_factor``: for a new VAE, 1 / std of posterior samples over the first
``scaling_sample_size`` training images (Rombach et al. 2022, sec. 4.3.2 / appendix G, the recipe that gave
0.18215), computed with the weights being saved.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn
from torch.func import functional_call

from sdlab.checkpoints.file_format import (
    META_COMPONENT,
    META_CONFIG,
    META_SCALING,
    META_WEIGHTS,
    config_from_json,
    config_to_json,
)
from sdlab.checkpoints.io import read_checkpoint, write_safetensors_atomic
from sdlab.families.loaded import ModelBundle
from sdlab.models.vae import AutoencoderKL, VAEConfig
from sdlab.pipeline.images import tensor_to_pil
from sdlab.pipeline.png_info import save_png_atomic
from sdlab.train.config import TrainConfig
from sdlab.train.data import posterior_generators, sample_seeds
from sdlab.train.losses import (
    PatchDiscriminator,
    adaptive_adversarial_weight,
    gradient_l1,
    hinge_discriminator_loss,
    hinge_generator_loss,
    ms_ssim,
    psnr,
)
from sdlab.train.task import Batch
from sdlab.utils.dtypes import dtype_from_name

logger = logging.getLogger(__name__)

__all__ = ["Critic", "VAELossConfig", "VAETask", "build_task", "latent_scaling_factor", "load_trained_vae"]


@dataclass(frozen=True)
class VAELossConfig:
    pixel_loss: str = "l1"                   # "l1" (LDM) or "l2" (the PSNR optimum)
    kl_weight: float = 1e-6                  # LDM's weight, relative to the per-pixel reconstruction
    ssim_weight: float = 0.1                 # 0 disables MS-SSIM
    ssim_scales: int = 3                     # needs images of at least 2 ** (scales - 1) pixels
    gradient_weight: float = 0.1             # 0 disables the Sobel edge term
    adversarial_weight: float = 0.0          # 0: no critic at all; LDM uses 0.5
    adversarial_start: int = 50_001          # critic updates before its verdict reaches the VAE (LDM: 50001)
    critic_channels: int = 64
    critic_layers: int = 3
    sample_posterior: bool = True            # decode z ~ q(z|x) (LDM; `posterior_generators`) rather than its mean
    scaling_sample_size: int = 64            # training images kept to estimate the latent scaling factor

    def __post_init__(self) -> None:
        if self.pixel_loss not in ("l1", "l2"):
            raise ValueError(f"pixel_loss must be 'l1' or 'l2', got {self.pixel_loss!r}")
        if min(self.kl_weight, self.ssim_weight, self.gradient_weight, self.adversarial_weight) < 0:
            raise ValueError("loss weights must be >= 0")


class Critic(nn.Module):
    """The PatchGAN discriminator plus the count of its updates (a buffer, so run checkpoints keep it)."""

    def __init__(self, in_channels: int, base_channels: int, layers: int):
        super().__init__()
        self.net = PatchDiscriminator(in_channels, base_channels, layers)
        self.register_buffer("updates", torch.zeros((), dtype=torch.int64))

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W)
        return self.net(x)  # (B, 1, h, w)


def _unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel (or similar ``.module``) wrapper."""
    return getattr(module, "module", module)


@torch.no_grad()
def latent_scaling_factor(vae: AutoencoderKL, images: Tensor, generator: torch.Generator, batch_size: int = 16) -> float:
    """1 / std of z ~ q(z|x) over ``images`` (B, C, H, W) in [-1, 1], every latent element pooled (LDM)."""
    latents = [
        vae.encode(chunk.to(vae.quant_conv.weight.device)).sample(generator).float().cpu()
        for chunk in images.split(batch_size)
    ]
    return 1.0 / torch.cat(latents).flatten().std().item()


class VAETask:
    """Trains ``AutoencoderKL``; see the module docstring for the objective and the critic arrangement."""

    name = "vae"
    # No DDP wrappers: the loop averages every module's gradients itself (``all_reduce_grads``). DDP allows
    # one forward per backward, and the critic runs twice per loss (frozen for L_G, live for L_D).
    ddp_names: tuple[str, ...] = ()

    def __init__(
        self,
        vae: AutoencoderKL | VAEConfig,
        loss_config: VAELossConfig = VAELossConfig(),
        *,
        scaling_factor: float | None = None,
        seed: int = 0,
        decoder_only: bool = False,
        save_dtype: str = "fp32",
    ):
        """``vae``: a model to fine-tune or a config to train from scratch. ``scaling_factor``: keep this one
        (e.g. 0.18215 when fine-tuning an SD VAE, whose U-Nets expect it) instead of estimating it.
        ``decoder_only``: freeze the encoder (and its quant_conv), so the latents a U-Net was trained on do
        not change while the decoder learns to draw them better. ``save_dtype``: the dtype of the delivered
        file's floating-point tensors ("fp32", "fp16", "bf16"; the SDXL VAE overflows in fp16)."""
        self.vae = vae if isinstance(vae, AutoencoderKL) else AutoencoderKL(vae)
        self.vae.requires_grad_(True)
        if decoder_only:
            self.vae.encoder.requires_grad_(False)
            self.vae.quant_conv.requires_grad_(False)
        self.config = self.vae.cfg
        self.loss_config = loss_config
        self.fixed_scaling_factor = scaling_factor
        self.seed = seed
        self.save_dtype = dtype_from_name(save_dtype)
        self._modules: dict[str, nn.Module] = {"vae": self.vae}
        if loss_config.adversarial_weight > 0:
            lc = loss_config
            self._modules["critic"] = Critic(self.config.out_channels, lc.critic_channels, lc.critic_layers)
        self._sample: list[Tensor] = []  # first training images, kept on CPU

    # -- TrainTask ---------------------------------------------------------------------------------------
    def trainable_modules(self) -> dict[str, nn.Module]:
        return self._modules

    def after_optimizer_step(self) -> None:
        """Count the critic's update (what ``adversarial_start`` waits for)."""
        if "critic" in self._modules:
            _unwrap(self._modules["critic"]).updates += 1

    def loss(self, batch: Batch, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        if batch.images is None:
            raise ValueError("the VAE task needs images (cached latents cannot train a VAE)")
        lc = self.loss_config
        vae = self._modules["vae"]
        x = batch.images.to(_unwrap(vae).dtype)  # (B, 3, H, W)
        training = torch.is_grad_enabled()
        if training:
            self._remember(x)
        noise = posterior_generators(sample_seeds(batch, generator)) if lc.sample_posterior else None
        x_hat, posterior = vae(x, sample_posterior=lc.sample_posterior, generator=noise)  # (B, 3, H, W)

        if lc.pixel_loss == "l1":
            pixel = (x_hat - x).abs().flatten(1).mean(1)  # (B,)
        else:
            pixel = (x_hat - x).pow(2).flatten(1).mean(1)  # (B,)
        reconstruction = pixel
        metrics: dict[str, float] = {f"{lc.pixel_loss}": pixel.mean().item()}
        if lc.ssim_weight > 0:
            structural = ms_ssim(x_hat, x, scales=lc.ssim_scales)  # (B,)
            reconstruction = reconstruction + lc.ssim_weight * (1.0 - structural)
            metrics["ms_ssim"] = structural.mean().item()
        if lc.gradient_weight > 0:
            edges = gradient_l1(x_hat, x)  # (B,)
            reconstruction = reconstruction + lc.gradient_weight * edges
            metrics["gradient_l1"] = edges.mean().item()
        reconstruction = reconstruction.mean()
        kl = posterior.kl().mean() / x[0].numel()  # per pixel, see module docstring
        loss = reconstruction + lc.kl_weight * kl
        metrics |= {"reconstruction": reconstruction.item(), "kl": kl.item(), "psnr": psnr(x_hat, x).mean().item()}

        if "critic" in self._modules:
            loss = loss + self._adversarial_terms(x, x_hat, reconstruction, training, metrics)
        metrics["loss"] = loss.item()
        return loss, metrics

    def save_weights(self, path: Path, ema: bool) -> None:
        vae = _unwrap(self._modules["vae"])
        scaling = self.scaling_factor()
        metadata = {
            META_COMPONENT: "vae",
            META_WEIGHTS: "ema" if ema else "raw",
            META_CONFIG: json.dumps(config_to_json(vae.cfg), sort_keys=True),
            META_SCALING: repr(float(scaling)),
        }
        state = {k: v.to(self.save_dtype) if v.is_floating_point() else v for k, v in vae.state_dict().items()}
        write_safetensors_atomic(path, state, metadata)
        logger.info("saved VAE (%s weights, scaling factor %.5f) to %s", metadata[META_WEIGHTS], scaling, path)

    def preview(self, out_dir: Path, step: int) -> None:
        """Originals (top row) over reconstructions (posterior mean, bottom row) of up to 8 kept training
        images, as ``vae_{step:06d}.png``; logs their PSNR."""
        if not self._sample:
            return
        vae = _unwrap(self._modules["vae"])
        x = torch.cat(self._sample)[:8].to(vae.quant_conv.weight.device)  # (N, 3, H, W)
        was_training = vae.training
        vae.eval()
        with torch.no_grad():
            x_hat = vae.decode(vae.encode(x).mode()).clamp(-1, 1)  # (N, 3, H, W)
        vae.train(was_training)
        logger.info("step %d: preview PSNR %.2f dB", step, psnr(x_hat, x).mean().item())
        tiles = tensor_to_pil(torch.cat([x, x_hat]).float().cpu())
        w, h = tiles[0].size
        n = x.shape[0]
        grid = Image.new("RGB", (n * w, 2 * h))
        for i, tile in enumerate(tiles):
            grid.paste(tile, ((i % n) * w, (i // n) * h))
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_png_atomic(grid, out_dir / f"vae_{step:06d}.png", None)

    # -- latent scaling ----------------------------------------------------------------------------------
    def scaling_factor(self) -> float:
        """The fixed factor if one was given, else 1 / std of latents of the kept training images under the
        current weights (1.0, with a warning, if no image has been seen)."""
        if self.fixed_scaling_factor is not None:
            return self.fixed_scaling_factor
        if not self._sample:
            logger.warning("no training images seen; writing scaling factor 1.0")
            return 1.0
        vae = _unwrap(self._modules["vae"])
        was_training = vae.training
        vae.eval()
        generator = torch.Generator().manual_seed(self.seed)
        factor = latent_scaling_factor(vae, torch.cat(self._sample), generator)
        vae.train(was_training)
        return factor

    # -- internals ---------------------------------------------------------------------------------------
    def _remember(self, x: Tensor) -> None:
        kept = sum(len(t) for t in self._sample)
        room = self.loss_config.scaling_sample_size - kept
        if room > 0:
            self._sample.append(x[:room].detach().float().cpu())

    def _adversarial_terms(
        self, x: Tensor, x_hat: Tensor, reconstruction: Tensor, training: bool, metrics: dict[str, float]
    ) -> Tensor:
        """L_D on (x, sg(x_hat)) for the critic, plus (once started) the weighted L_G for the VAE."""
        lc = self.loss_config
        critic = self._modules["critic"]
        net = _unwrap(critic)
        # the VAE's term: the critic judges x_hat with frozen (detached) parameters, so L_G trains only the VAE
        frozen = {name: p.detach() for name, p in net.named_parameters()}
        frozen |= dict(net.named_buffers())
        generator_loss = hinge_generator_loss(functional_call(net, frozen, (x_hat,)))
        # the critic's term: one forward over real and detached fake (GroupNorm: no batch coupling)
        logits = critic(torch.cat([x, x_hat.detach()]))  # (2B, 1, h, w)
        real_logits, fake_logits = logits.chunk(2)
        critic_loss = hinge_discriminator_loss(real_logits, fake_logits)

        started = int(net.updates) >= lc.adversarial_start
        weight = torch.zeros((), device=x.device)
        if training and started:
            last_layer = _unwrap(self._modules["vae"]).decoder.conv_out.weight
            weight = lc.adversarial_weight * adaptive_adversarial_weight(reconstruction, generator_loss, last_layer)
        metrics |= {
            "critic_loss": critic_loss.item(),
            "generator_loss": generator_loss.item(),
            "adversarial_weight": float(weight),
            "logits_real": real_logits.mean().item(),
            "logits_fake": fake_logits.mean().item(),
        }
        return critic_loss + weight * generator_loss


def load_trained_vae(path: str | Path, device: torch.device | str = "cpu") -> tuple[AutoencoderKL, float]:
    """Read back what ``VAETask.save_weights`` wrote: (the VAE, its latent scaling factor)."""
    state, metadata = read_checkpoint(path)
    if META_CONFIG not in metadata:
        raise ValueError(f"{path}: no {META_CONFIG} metadata; not a VAE file written by sdlab")
    cfg = config_from_json(VAEConfig, json.loads(metadata[META_CONFIG]))
    vae = AutoencoderKL(cfg)
    vae.load_state_dict(dict(state))
    scaling = float(metadata.get(META_SCALING, "nan"))
    if not math.isfinite(scaling):
        raise ValueError(f"{path}: no usable {META_SCALING} metadata")
    return vae.to(device), scaling


def build_task(config: TrainConfig, bundle: ModelBundle) -> VAETask:
    """``sdlab train --task vae``: fine-tune the bundle's VAE with the default objective, keeping the family's
    scaling factor (its U-Net was trained on latents scaled by it)."""
    return VAETask(bundle.vae, VAELossConfig(), scaling_factor=bundle.scaling_factor, seed=config.seed,
                   decoder_only=config.vae_decoder_only, save_dtype=config.save_dtype)
