"""The U-Net objective of latent diffusion (Rombach et al. 2022, eq. 2), as a `TrainTask`.

For each image: latent ``z0 = scaling_factor * vae.encode(image).sample()`` (frozen VAE, or a cached
posterior; `ModelBundle.to_model_latents`, which also applies a model's per-channel latent statistics),
caption replaced by the empty prompt with probability ``caption_dropout`` (what classifier-free guidance
needs at sampling time), text context and SDXL's added vector from the frozen text encoder(s) by the generate
pipeline's own conditioning code (`sdlab.pipeline.conditioning`: `encode_captions`,
`sdxl_size_conds`), ``t ~ U{0..T-1}`` (or kohya's ``U{min_timestep..max_timestep-1}``), ``eps ~ N(0, I)`` (+ offset noise, then
kohya's multi-resolution noise), ``x_t = q_sample(z0, t, eps)`` (from ``eps + gamma n`` under input
perturbation), and the loss ``w_t * l(net(x_t, t, context[, y]), target)`` averaged over the latent, then the
batch, with ``target`` given by the prediction type (eps / v / x0) from eps, ``l`` the squared error or kohya's
l1 / pseudo-Huber losses (`sdlab.diffusion.loss.elementwise_loss`), and ``w_t`` = 1, Min-SNR-gamma, debiased
estimation, or the product of both as kohya's trainers apply them. The timesteps,
``x_t``, the target and the weights come from the model's `ModelSampling` (`ModelBundle.model_sampling`), the
object whose forward process the generate pipeline samples with.

Every random draw of a sample comes from generators seeded by the sample's seed (`Batch.seeds`), in a
fixed order, so the loss of a global batch does not depend on how it is split over ranks / micro-steps.

Trainable parts: the whole U-Net (full fine-tune) or LoRA on the attention and feed-forward projections
of the U-Net (and optionally the text encoders). Deliverable: the full model in the original single-file
layout (`sdlab.checkpoints.save.save_bundle`), or the LoRA in kohya format (`sdlab.train.lora`).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from sdlab.checkpoints.file_format import META_EMA, META_FAMILY, META_PRESET
from sdlab.checkpoints.save import save_bundle
from sdlab.diffusion.denoiser import Prediction
from sdlab.diffusion import loss as diffusion_loss
from sdlab.diffusion.loss import offset_noise, per_sample_normal
from sdlab.diffusion.model_sampling import DiscreteModelSampling
from sdlab.families.loaded import ModelBundle
from sdlab.models.layers import sdxl_vector
from sdlab.models.unet import UNet
from sdlab.pipeline.conditioning import encode_captions, sdxl_size_conds
from sdlab.train.data import generator_for, posterior_sample, sample_seeds
from sdlab.train.errors import TrainError
from sdlab.train.lora import LoRANetwork, save_lora_networks
from sdlab.train.task import Batch
from sdlab.utils.dtypes import dtype_from_name

logger = logging.getLogger(__name__)

__all__ = ["UNetTask", "UNetTaskOptions", "build_task", "enable_gradient_checkpointing"]


def enable_gradient_checkpointing(unet: UNet) -> int:
    """Recompute every input / middle / output block in the backward pass instead of storing its
    activations (``torch.utils.checkpoint``, non-reentrant). Applied from outside by wrapping each block's
    ``forward``; a no-op when gradients are off. Returns the number of blocks wrapped."""
    blocks = [*unet.input_blocks, unet.middle_block, *unet.output_blocks]
    for block in blocks:
        original = block.forward

        def forward(*args, _original=original, **kwargs):
            if torch.is_grad_enabled():
                return torch.utils.checkpoint.checkpoint(_original, *args, use_reentrant=False, **kwargs)
            return _original(*args, **kwargs)

        block.forward = forward
    return len(blocks)


def cpu_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` on the CPU, made without a second copy on its device (on the CPU it shares the tensors,
    which a later ``module.to(dtype)`` replaces in `module` alone)."""
    memo = {id(p): nn.Parameter(p.detach().cpu(), requires_grad=False) for p in module.parameters()}
    memo |= {id(b): b.detach().cpu() for b in module.buffers()}
    return copy.deepcopy(module, memo)


class UNetTaskOptions:
    """The subset of `TrainConfig` the U-Net objective reads (kept explicit so tests can build a task)."""

    def __init__(self, *, caption_dropout: float = 0.1, min_snr_gamma: float | None = None,
                 offset_noise: float = 0.0, min_timestep: int | None = None, max_timestep: int | None = None,
                 ip_noise_gamma: float | None = None, ip_noise_gamma_random_strength: bool = False,
                 multires_noise_iterations: int | None = None, multires_noise_discount: float = 0.3,
                 debiased_estimation_loss: bool = False, loss_type: str = "l2", huber_schedule: str = "snr",
                 huber_c: float = 0.1, prediction: str | None = None, lora_rank: int | None = None,
                 lora_alpha: float | None = None, lora_text_encoder: bool = False, lora_conv: bool = False,
                 train_text_encoder: bool = False,
                 gradient_checkpointing: bool = False, save_dtype: str = "fp32", sample_prompts: Sequence[str] = (),
                 sample_steps: int = 20, sample_cfg: float = 7.0, sample_seed: int = 0, resolution: int | None = None):
        self.caption_dropout = caption_dropout
        self.min_snr_gamma = min_snr_gamma
        self.offset_noise = offset_noise
        self.min_timestep = min_timestep
        self.max_timestep = max_timestep
        self.ip_noise_gamma = ip_noise_gamma
        self.ip_noise_gamma_random_strength = ip_noise_gamma_random_strength
        self.multires_noise_iterations = multires_noise_iterations
        self.multires_noise_discount = multires_noise_discount
        self.debiased_estimation_loss = debiased_estimation_loss
        self.loss_type = loss_type
        self.huber_schedule = huber_schedule
        self.huber_c = huber_c
        self.prediction = prediction
        self.lora_rank = lora_rank
        self.lora_alpha = lora_alpha
        self.lora_text_encoder = lora_text_encoder
        self.lora_conv = lora_conv
        self.train_text_encoder = train_text_encoder
        self.gradient_checkpointing = gradient_checkpointing
        self.save_dtype = save_dtype
        self.sample_prompts = tuple(sample_prompts)
        self.sample_steps = sample_steps
        self.sample_cfg = sample_cfg
        self.sample_seed = sample_seed
        self.resolution = resolution

    @classmethod
    def from_config(cls, cfg) -> UNetTaskOptions:
        return cls(caption_dropout=cfg.caption_dropout, min_snr_gamma=cfg.min_snr_gamma, offset_noise=cfg.offset_noise,
                   min_timestep=cfg.min_timestep, max_timestep=cfg.max_timestep, ip_noise_gamma=cfg.ip_noise_gamma,
                   ip_noise_gamma_random_strength=cfg.ip_noise_gamma_random_strength,
                   multires_noise_iterations=cfg.multires_noise_iterations,
                   multires_noise_discount=cfg.multires_noise_discount,
                   debiased_estimation_loss=cfg.debiased_estimation_loss, loss_type=cfg.loss_type,
                   huber_schedule=cfg.huber_schedule, huber_c=cfg.huber_c, prediction=cfg.prediction, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                   lora_text_encoder=cfg.lora_text_encoder, lora_conv=cfg.lora_conv, train_text_encoder=cfg.train_text_encoder, gradient_checkpointing=cfg.gradient_checkpointing,
                   save_dtype=cfg.save_dtype, sample_prompts=cfg.sample_prompts, sample_steps=cfg.sample_steps,
                   sample_cfg=cfg.sample_cfg, sample_seed=cfg.sample_seed, resolution=cfg.resolution)


class UNetTask:
    """Latent-diffusion U-Net training on a loaded `ModelBundle` (see module docstring)."""

    name = "unet"
    ddp_names = ("unet", "lora_unet")  # trainable modules whose forward `loss` runs through `bind_wrapped`
    trains_text_input = False          # True when something before the text towers learns (embedding task)
    preset: str | None = None          # the preset the delivered model or LoRA names (`sdlab.preset`): how it is drawn

    def __init__(self, bundle: ModelBundle, options: UNetTaskOptions | None = None):
        self.options = options or UNetTaskOptions()
        opts = self.options
        if opts.prediction is not None:
            bundle = replace(bundle, prediction=Prediction.parse(opts.prediction))
        self.bundle = bundle
        self._as_loaded: dict[nn.Module, nn.Module] = {}   # a part the run casts to bf16 -> its weights as loaded
        self.prediction = bundle.prediction
        self.device = bundle.device
        self.sampling = bundle.model_sampling

        self._check_discrete_options(opts)
        if opts.train_text_encoder and opts.lora_rank is not None:
            raise TrainError("--train-text-encoder is for a full fine-tune; with --lora-rank use --lora-text-encoder")
        for module in (bundle.vae, *(te.model for te in bundle.text_encoders)):
            module.requires_grad_(False).eval()
        self.text_lora: LoRANetwork | None = None
        self.unet_lora: LoRANetwork | None = None
        if opts.lora_rank is None:
            bundle.unet.requires_grad_(True)
            self._modules: dict[str, nn.Module] = {"unet": bundle.unet}
            if opts.train_text_encoder:
                for i, te in enumerate(bundle.text_encoders):
                    te.model.requires_grad_(True).train()
                    self._modules[f"text_encoder{i}"] = te.model
        else:
            bundle.unet.requires_grad_(False)
            self.unet_lora = LoRANetwork.for_unet(bundle.unet, opts.lora_rank, opts.lora_alpha, opts.lora_conv).attach()
            self._modules = {"lora_unet": self.unet_lora}
            if opts.lora_text_encoder:
                self.text_lora = LoRANetwork.for_text_encoders(
                    [te.model for te in bundle.text_encoders], opts.lora_rank, opts.lora_alpha).attach()
                self._modules["lora_te"] = self.text_lora
        bundle.unet.train()
        if opts.gradient_checkpointing:
            enable_gradient_checkpointing(bundle.unet)
        # what the loss calls; replaced by the DDP wrapper of the trainable U-Net part under torchrun
        self._unet_call: nn.Module = self.unet_lora if self.unet_lora is not None else bundle.unet

    # -- TrainTask ------------------------------------------------------------------------------------
    def trainable_modules(self) -> dict[str, nn.Module]:
        return dict(self._modules)

    def bind_wrapped(self, name: str, wrapped: nn.Module) -> None:
        """Route the forward pass of trainable module ``name`` through its DDP wrapper."""
        if name in ("unet", "lora_unet"):
            self._unet_call = wrapped
        # the text LoRA runs inside the text encoders' forward; its gradients are averaged by the loop

    def loss(self, batch: Batch, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        seeds = sample_seeds(batch, generator)
        gens = [generator_for(s, "unet") for s in seeds]
        device = self.device

        captions = [
            "" if float(torch.rand((), generator=g)) < self.options.caption_dropout else c
            for c, g in zip(batch.captions, gens)
        ]
        z0 = self.latents(batch, seeds)  # (B, C, h, w) float32, scaled
        t = self._timesteps(gens)  # (B,)
        noise = per_sample_normal(z0.shape, gens, device=device)  # (B, C, h, w)
        noise = offset_noise(noise, self.options.offset_noise, gens)
        if self.options.multires_noise_iterations:
            noise = diffusion_loss.pyramid_noise(noise, gens, self.options.multires_noise_iterations,
                                                 self.options.multires_noise_discount)
        noised = noise
        if self.options.ip_noise_gamma:
            noised = diffusion_loss.input_perturbation(noise, self.options.ip_noise_gamma, gens,
                                                       self.options.ip_noise_gamma_random_strength)
        x_t = self.sampling.q_sample(z0, noised, t)
        target = self.sampling.training_target(z0, noise, t)

        text_learns = self.text_lora is not None or self.trains_text_input or self.options.train_text_encoder
        with torch.set_grad_enabled(text_learns and torch.is_grad_enabled()):
            context, pooled = encode_captions(self.bundle.text_encoders, captions, with_pooled=self.bundle.family.is_sdxl)
        y = self._vector(pooled, batch, z0) if self.bundle.unet_config.adm_in_channels is not None else None
        pred = self._unet_call(x_t, t.to(torch.float32), context, y)  # (B, C, h, w)

        per_sample = self._elementwise_loss(pred.float(), target.float(), t).mean(dim=(1, 2, 3))  # (B,)
        weights = self.sampling.loss_weights(t, self.options.min_snr_gamma)  # (B,) or None
        if weights is not None:
            per_sample = per_sample * weights
        if self.options.debiased_estimation_loss:
            per_sample = per_sample * diffusion_loss.debiased_weights(t, self.sampling.schedule.alphas_cumprod,
                                                                      self.sampling.prediction)
        loss = per_sample.mean()
        return loss, {"loss": float(loss.detach()), "t_mean": float(t.float().mean())}

    def save_weights(self, path: Path, ema: bool) -> None:
        dtype = dtype_from_name(self.options.save_dtype)
        if self.unet_lora is not None:
            networks = [n for n in (self.unet_lora, self.text_lora) if n is not None]
            save_lora_networks(path, networks, self.bundle.family, self.prediction, dtype=dtype,
                               resolution=self.options.resolution,
                               metadata={META_FAMILY: self.bundle.family.name, META_EMA: str(bool(ema)),
                                         **({META_PRESET: self.preset} if self.preset else {})})
        else:
            save_bundle(self._delivered_bundle(), path, dtype=dtype)

    def keep_as_loaded(self, module: nn.Module) -> None:
        """Keep `module`'s weights as they are now for the delivered file, before the run casts its own to bf16
        (`sdlab.train.cli`): the file holds the parts that do not train exactly as loaded."""
        self._as_loaded[module] = cpu_copy(module)

    def _delivered_bundle(self) -> ModelBundle:
        """The bundle the file holds: the run's, naming the task's preset, with each part kept as loaded in place
        of its bf16 run copy."""
        bundle, loaded = self.bundle, self._as_loaded
        encoders = tuple(replace(te, model=loaded.get(te.model, te.model)) for te in bundle.text_encoders)
        return replace(bundle, preset=self.preset or bundle.preset, vae=loaded.get(bundle.vae, bundle.vae),
                       text_encoders=encoders)

    def preview(self, out_dir: Path, step: int) -> None:
        """Sample each fixed prompt with the generate pipeline (EMA weights swapped in by the loop)."""
        if not self.options.sample_prompts:
            return
        from sdlab.pipeline.generate import generate  # the pipeline layer; imported when previews are asked for
        from sdlab.pipeline.png_info import save_png_atomic
        from sdlab.pipeline.request import GenerationRequest

        out_dir.mkdir(parents=True, exist_ok=True)
        was_training = self.bundle.unet.training
        self.bundle.unet.eval()
        try:
            for i, prompt in enumerate(self.options.sample_prompts):
                size = self.options.resolution
                request = GenerationRequest(prompt=prompt, steps=self.options.sample_steps, cfg_scale=self.options.sample_cfg,
                                            seed=self.options.sample_seed + i, width=size, height=size)
                result = generate(self.bundle, request)
                save_png_atomic(result.images[0], out_dir / f"step-{step:08d}-{i:02d}.png", None)
        finally:
            self.bundle.unet.train(was_training)

    # -- helpers ------------------------------------------------------------------------------------------
    def _check_discrete_options(self, opts: UNetTaskOptions) -> None:
        """A `TrainError` for kohya's timestep-indexed options on a model without discrete timesteps, or a
        timestep range outside the model's."""
        wanted = [name for name, on in (("--min-timestep", opts.min_timestep is not None),
                                        ("--max-timestep", opts.max_timestep is not None),
                                        ("--debiased-estimation-loss", opts.debiased_estimation_loss),
                                        (f"--huber-schedule {opts.huber_schedule}",
                                         opts.loss_type in ("huber", "smooth_l1") and opts.huber_schedule != "constant"))
                  if on]
        if not wanted:
            return
        if not isinstance(self.sampling, DiscreteModelSampling):
            raise TrainError(f"{wanted[0]} reads a discrete-time (DDPM) noise schedule; {self.bundle.family.name} "
                             f"trains with {type(self.sampling).__name__}" +
                             (" (--huber-schedule constant works on it)" if "huber" in wanted[0] else ""))
        if opts.debiased_estimation_loss and self.sampling.prediction not in (Prediction.EPS, Prediction.V):
            raise TrainError(f"--debiased-estimation-loss is defined for eps and v prediction; this model predicts "
                             f"{self.sampling.prediction.value}")
        steps = self.sampling.num_timesteps
        low, high = opts.min_timestep or 0, steps if opts.max_timestep is None else opts.max_timestep
        if high > steps or low >= steps or (low == high and high >= steps):
            raise TrainError(f"--min-timestep / --max-timestep must lie within the model's {steps} training steps "
                             f"(0 .. {steps - 1}, --max-timestep up to {steps}); got {low} .. {high}")

    def _timesteps(self, gens: Sequence[torch.Generator]) -> Tensor:
        """Each image's training timestep (B,): the model sampling's, or uniform on [min, max) (kohya's range)."""
        opts = self.options
        if opts.min_timestep is None and opts.max_timestep is None:
            return self.sampling.sample_timesteps(gens, device=self.device)
        return diffusion_loss.sample_timesteps(gens, self.sampling.num_timesteps, device=self.device,
                                               low=opts.min_timestep or 0, high=opts.max_timestep)

    def _elementwise_loss(self, pred: Tensor, target: Tensor, t: Tensor) -> Tensor:
        """``loss_type``'s loss of every latent element, with the pseudo-Huber constant of each image's timestep."""
        opts = self.options
        huber_c = None
        if opts.loss_type in ("huber", "smooth_l1"):
            alphas_cumprod = self.sampling.schedule.alphas_cumprod if opts.huber_schedule == "snr" else None
            huber_c = diffusion_loss.huber_thresholds(t, opts.huber_schedule, opts.huber_c,
                                                      self.sampling.num_timesteps, alphas_cumprod)
        return diffusion_loss.elementwise_loss(pred, target, opts.loss_type, huber_c)

    @torch.no_grad()
    def latents(self, batch: Batch, seeds: Sequence[int]) -> Tensor:
        """Scaled training latents: the cached ones, or a posterior sample of the frozen VAE (`posterior_sample`,
        the draw the latent cache uses too). The VAE encodes in its own dtype, outside the loop's autocast, as the
        latent cache does and diffusers' trainers encode (an SDXL VAE kept fp32 encodes in fp32)."""
        if batch.latents is not None:
            return batch.latents.to(self.device, torch.float32)
        if batch.images is None:
            raise ValueError("a batch needs images or cached latents")
        with torch.autocast(self.device.type, enabled=False):
            posterior = self.bundle.vae.encode(batch.images.to(self.device))
        return self.bundle.to_model_latents(posterior_sample(posterior.mean, posterior.std, seeds))  # (B, C, h, w)

    def _vector(self, pooled: Tensor | None, batch: Batch, z0: Tensor) -> Tensor:
        """SDXL's y: pooled text + the size / crop (/ aesthetic score) embeddings of `sdxl_size_conds`, per
        sample: its original size and crop corner (default: the training size and (0, 0)), the training size
        as target size (base) or the default aesthetic score (refiner)."""
        if pooled is None:
            raise ValueError("SDXL training needs a text encoder with a projection (pooled output)")
        n = len(batch)
        factor = self.bundle.vae_config.downsample_factor
        height, width = z0.shape[-2] * factor, z0.shape[-1] * factor
        sizes = batch.original_sizes or [(height, width)] * n
        crops = batch.crops_top_left or [(0, 0)] * n
        conds = torch.cat([
            sdxl_size_conds(self.bundle.family, width=width, height=height, original_size=tuple(size),
                            crops_coords_top_left=tuple(crop))
            for size, crop in zip(sizes, crops)
        ]).to(pooled.device)  # (B, 6) or (B, 5)
        return sdxl_vector(pooled, conds)  # (B, adm)


def build_task(config, bundle: ModelBundle) -> UNetTask:
    """The task-registry entry point (`sdlab.train.cli`): a `UNetTask` from a `TrainConfig`."""
    return UNetTask(bundle, UNetTaskOptions.from_config(config))
