"""Latent consistency distillation (Luo et al. 2023, "Latent Consistency Models", Algorithm 1), as a `TrainTask`.

Three copies of the loaded model's U-Net: the *teacher* (frozen), the *student* (trainable, starts as the
teacher; it is the bundle's U-Net, so the delivered file is a full model) and the *target* network, an
EMA of the student (``lcd_target_decay``, 0.95, updated after every optimiser step with no warm-up; it is
not the loop's optional ``--ema-decay`` average, which only shapes the delivered weights, and it is
saved in every run checkpoint through ``extra_state``).

Per image, with the skipping-step DDIM grid ``tau_n = (n + 1) k - 1``, ``k = T // N`` (N =
``lcd_ddim_timesteps``, 50; T = 1000 training steps), ``n ~ U{0..N-1}``:

    x_s  = q_sample(z0, eps, tau_n)                                    s = tau_n, the noisier time
    x0^, eps^ = cond + w (cond - uncond)  of the teacher's x0 / eps    w ~ U[w_min, w_max]
    x_e  = sqrt(ac_e) x0^ + sqrt(1 - ac_e) eps^                       e = max(tau_n - k, 0): one DDIM step
    f(x, t) = c_skip(t) x + c_out(t) x0(net(x, t))                     the consistency function
    loss = d(f_student(x_s, s), f_target(x_e, e))                      d = L2 or pseudo-Huber

where the unconditional branch is what the generate pipeline makes of an empty negative prompt: the empty
caption through the same text tower (SD1 / SD2, as diffusers' ``train_lcm_distill_sd_wds.py``), or a zero
context and pooled vector where the model's rule says so (SDXL's ``force_zeros_for_empty_prompt``, as
diffusers' ``train_lcm_distill_sdxl_wds.py`` / ``train_lcm_distill_lora_sdxl.py``), with the image's size
numbers, ``w`` is the Imagen-form guidance (a CFG scale of ``w + 1``) and the
boundary scalings are those of diffusers' ``LCMScheduler``: ``c_skip = sd^2 / ((10 t)^2 + sd^2)``,
``c_out = 10 t / sqrt((10 t)^2 + sd^2)`` with ``sd = 0.5`` (so f(x, 0) = x). The x0 / eps of a network
output and the forward process come from the model's `ModelSampling` (eps, v and x0 prediction).

The U-Net has no guidance-scale input, so a range of w trains one average behaviour: a fixed w (the
default: the family's CFG scale - 1) is what sampling at CFG 1 then reproduces. Captions are never dropped.

LCM-LoRA (Luo et al. 2023, "LCM-LoRA: A Universal Stable-Diffusion Acceleration Module"; ``--lora-rank``, with
``--lora-conv`` for its layer set): the student is the frozen model plus a trainable LoRA, the teacher is the
same model with the LoRA switched off (no copy), and the target is the model with an EMA of the LoRA's
weights (``lcd_target_decay``; the LoRA is small, so the EMA is a copy of its tensors that is swapped in for
the target's forward pass). ``lcd_target_decay = 0`` makes the target the student itself without gradients,
as in diffusers' train_lcm_distill_lora_sd. The deliverable is the LoRA file (kohya format), a few-step
adapter that ships beside the base model instead of a second U-Net.

Sampling: sdlab's "LCM" sampler (``sample_lcm``). At its timesteps (999, 759, 499, 259 for 4 steps) c_skip
is below 4e-8, so what it uses is the student's plain x0 prediction; sample at CFG scale 1 (the teacher's
guidance is distilled in). Both deliverables name the ``lcm`` preset (``sdlab.preset``: LCM, its trailing
grid, 4 steps, CFG 1), so they are drawn so when the request does not say otherwise.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from sdlab.diffusion.loss import per_sample_normal
from sdlab.diffusion.model_sampling import DiscreteModelSampling
from sdlab.families.loaded import ModelBundle
from sdlab.pipeline.conditioning import _zero_negative, encode_captions
from sdlab.train.data import generator_for, sample_seeds
from sdlab.train.errors import TrainError
from sdlab.train.task import Batch
from sdlab.train.unet_task import UNetTask, UNetTaskOptions

__all__ = ["LCDOptions", "LCDTask", "DDIMGrid", "LCDPair", "boundary_scalings", "build_task"]

SIGMA_DATA = 0.5          # the consistency parameterisation's sigma_data (LCMScheduler's)
TIMESTEP_SCALING = 10.0   # t is scaled by this in the boundary scalings (LCMScheduler's timestep_scaling)


def boundary_scalings(t: Tensor, sigma_data: float = SIGMA_DATA,
                      timestep_scaling: float = TIMESTEP_SCALING) -> tuple[Tensor, Tensor]:
    """(c_skip, c_out) of integer timesteps ``t`` (B,), float32: c_skip(0) = 1, c_out(0) = 0."""
    scaled = t.to(torch.float32) * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2).sqrt()
    return c_skip, c_out


def _per_image(values: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) in ``like``'s dtype and device."""
    return values.to(like.device, like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


class DDIMGrid:
    """The skipping-step solver grid: ``start[n] = (n + 1) k - 1`` and ``end[n] = max(start[n] - k, 0)``,
    ``k = num_train_timesteps // steps`` (diffusers' ``DDIMSolver`` of the LCD example)."""

    def __init__(self, num_train_timesteps: int, steps: int):
        if not 1 <= steps <= num_train_timesteps:
            raise TrainError(f"--lcd-ddim-timesteps must be between 1 and the model's {num_train_timesteps} "
                             f"training steps; got {steps}")
        self.steps = steps
        self.skip = num_train_timesteps // steps
        self.start = torch.arange(1, steps + 1, dtype=torch.int64) * self.skip - 1  # (N,)
        self.end = (self.start - self.skip).clamp(min=0)                          # (N,)


@dataclass
class LCDPair:
    """One batch's draws and the two sides of the consistency loss (all (B, ...) tensors)."""

    index: Tensor       # (B,) grid position n
    t_start: Tensor     # (B,) int64 tau_n
    t_end: Tensor       # (B,) int64 max(tau_n - k, 0)
    w: Tensor           # (B,) float32 teacher guidance (Imagen form)
    noise: Tensor       # (B, C, h, w)
    x_start: Tensor     # (B, C, h, w) q_sample(z0, noise, t_start)
    x_end: Tensor       # (B, C, h, w) the teacher's guided DDIM step to t_end
    prediction: Tensor  # (B, C, h, w) f_student(x_start, t_start), with grad
    target: Tensor      # (B, C, h, w) f_target(x_end, t_end), no grad


class LCDOptions:
    """The subset of `TrainConfig` the distillation reads (kept explicit so tests can build a task)."""

    def __init__(self, *, ddim_timesteps: int = 50, w_min: float | None = None, w_max: float | None = None,
                 loss: str = "l2", huber_c: float = 0.001, target_decay: float = 0.95,
                 unet: UNetTaskOptions | None = None):
        self.ddim_timesteps = ddim_timesteps
        self.w_min = w_min
        self.w_max = w_max
        self.loss = loss
        self.huber_c = huber_c
        self.target_decay = target_decay
        self.unet = unet or UNetTaskOptions(caption_dropout=0.0)

    @classmethod
    def from_config(cls, cfg) -> LCDOptions:
        """The options of a `TrainConfig` (which has refused the settings lcd does not read: `TASK_SETTINGS`)."""
        unet = UNetTaskOptions(caption_dropout=0.0, prediction=cfg.prediction, lora_rank=cfg.lora_rank,
                               lora_alpha=cfg.lora_alpha, lora_conv=cfg.lora_conv,
                               gradient_checkpointing=cfg.gradient_checkpointing, save_dtype=cfg.save_dtype,
                               sample_prompts=cfg.sample_prompts, sample_steps=cfg.sample_steps,
                               sample_cfg=cfg.sample_cfg, sample_seed=cfg.sample_seed, resolution=cfg.resolution)
        return cls(ddim_timesteps=cfg.lcd_ddim_timesteps, w_min=cfg.lcd_w_min, w_max=cfg.lcd_w_max, loss=cfg.lcd_loss,
                   huber_c=cfg.lcd_huber_c, target_decay=cfg.lcd_target_decay, unet=unet)


class LCDTask(UNetTask):
    """Latent consistency distillation of a loaded model (module docstring). Reuses the U-Net task's
    latents, conditioning, DDP routing, deliverable (`save_bundle` of the student) and set-up."""

    name = "lcd"
    ddp_names = ("unet", "lora_unet")
    preset = "lcm"        # the distilled model or LCM-LoRA is drawn with the LCM sampler, trailing, 4 steps, CFG 1

    def __init__(self, bundle: ModelBundle, options: LCDOptions | None = None):
        self.lcd = options or LCDOptions()
        opts = self.lcd
        if opts.loss not in ("l2", "huber"):
            raise TrainError(f"--lcd-loss must be l2 or huber; got {opts.loss!r}")
        # copies before the U-Net task wraps the student's blocks for gradient checkpointing; LCM-LoRA needs none
        lora = opts.unet.lora_rank is not None
        teacher = None if lora else copy.deepcopy(bundle.unet).requires_grad_(False).eval()
        target = None if lora else copy.deepcopy(bundle.unet).requires_grad_(False).eval()
        super().__init__(bundle, opts.unet)
        if not isinstance(self.sampling, DiscreteModelSampling):
            raise TrainError(f"--task lcd distils discrete-time (DDPM) models; {bundle.family.name} samples with "
                             f"{type(self.sampling).__name__}")
        self.teacher, self.target = teacher, target
        # LCM-LoRA's target: an EMA copy of the LoRA's modules (none at decay 0: the target is the student)
        self.lora_target: nn.Module | None = None
        if self.unet_lora is not None and opts.target_decay > 0:
            self.lora_target = copy.deepcopy(self.unet_lora.loras).requires_grad_(False)
        default_w = bundle.family.default_cfg - 1.0
        self.w_min = opts.w_min if opts.w_min is not None else (opts.w_max if opts.w_max is not None else default_w)
        self.w_max = opts.w_max if opts.w_max is not None else self.w_min
        if self.w_min > self.w_max:
            raise TrainError(f"--lcd-w-min {self.w_min:g} is above --lcd-w-max {self.w_max:g}")
        self.grid = DDIMGrid(self.sampling.num_timesteps, opts.ddim_timesteps)
        self._uncond: tuple[Tensor, Tensor | None] | None = None

    # -- TrainTask ------------------------------------------------------------------------------------
    def loss(self, batch: Batch, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        pair = self.pair(batch, generator)
        diff = pair.prediction.float() - pair.target.float()  # (B, C, h, w)
        if self.lcd.loss == "l2":
            per_sample = diff.pow(2).mean(dim=(1, 2, 3))
        else:  # pseudo-Huber
            c = self.lcd.huber_c
            per_sample = ((diff.pow(2) + c * c).sqrt() - c).mean(dim=(1, 2, 3))  # (B,)
        loss = per_sample.mean()
        return loss, {"loss": float(loss.detach()), "t_mean": float(pair.t_start.float().mean())}

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """target <- decay * target + (1 - decay) * student (the whole U-Net, or the LoRA's tensors)."""
        weight = 1.0 - self.lcd.target_decay
        for t, s in self._target_pairs():
            t.lerp_(s.detach().to(t.dtype), weight)

    def _ema(self) -> tuple[str, nn.Module, nn.Module] | None:
        """(checkpoint key, EMA copy, the student's module it follows); None when the target is the student."""
        if self.target is not None:
            return "target", self.target, self.bundle.unet
        if self.lora_target is not None:
            return "lora_target", self.lora_target, self.unet_lora.loras
        return None

    def _target_pairs(self) -> list[tuple[Tensor, Tensor]]:
        """(target tensor, student parameter) pairs; empty when the target is the student itself."""
        ema = self._ema()
        if ema is None:
            return []
        _, target, student = ema
        return list(zip(target.parameters(), student.parameters(), strict=True))

    def extra_state(self) -> dict[str, dict[str, Tensor]]:
        ema = self._ema()
        if ema is None:
            return {}
        key, target, _ = ema
        return {key: {k: v.detach().cpu().clone() for k, v in target.state_dict().items()}}

    def load_extra_state(self, state: dict[str, dict[str, Tensor]]) -> None:
        ema = self._ema()
        if ema is None:
            return
        key, target, _ = ema
        if key not in state:
            raise TrainError(f"the run checkpoint has no lcd target {'network' if key == 'target' else 'LoRA'} "
                             f"(not a --task lcd run with this --lora-rank and --lcd-target-decay?)")
        try:
            target.load_state_dict(state[key])
        except RuntimeError as exc:
            raise TrainError(f"the run checkpoint's lcd target does not match the model (another --model or "
                             f"--lora-rank?): {str(exc).splitlines()[-1].strip()[:200]}") from None

    @contextlib.contextmanager
    def _lora_target_swapped_in(self):
        """The LoRA's parameters hold the target EMA inside the block, the student's after: the two tensors'
        storages are exchanged (no copies), so the hooked U-Net runs the target."""
        pairs = self._target_pairs() if self.lora_target is not None else []

        def swap() -> None:
            for t, p in pairs:
                p.data, t.data = t.data, p.data

        swap()
        try:
            yield
        finally:
            swap()

    def preview(self, out_dir: Path, step: int) -> None:
        """Each fixed prompt with the LCM sampler at ``sample_steps`` / ``sample_cfg`` (1 suits a distilled model)."""
        opts = self.lcd.unet
        if not opts.sample_prompts:
            return
        from sdlab.pipeline.generate import generate  # the pipeline layer; imported when previews are asked for
        from sdlab.pipeline.png_info import save_png_atomic
        from sdlab.pipeline.request import GenerationRequest

        out_dir.mkdir(parents=True, exist_ok=True)
        was_training = self.bundle.unet.training
        self.bundle.unet.eval()
        try:
            for i, prompt in enumerate(opts.sample_prompts):
                request = GenerationRequest(prompt=prompt, steps=opts.sample_steps, sampler="LCM",
                                            cfg_scale=opts.sample_cfg, seed=opts.sample_seed + i,
                                            width=opts.resolution, height=opts.resolution)
                save_png_atomic(generate(self.bundle, request).images[0], out_dir / f"step-{step:08d}-{i:02d}.png", None)
        finally:
            self.bundle.unet.train(was_training)

    # -- the distillation step ------------------------------------------------------------------------
    def pair(self, batch: Batch, generator: torch.Generator) -> LCDPair:
        """Draw n, w and the noise per image (from the sample's seed), run the teacher's guided DDIM step and
        return the student's and the target's consistency outputs."""
        seeds = sample_seeds(batch, generator)
        gens = [generator_for(s, "lcd") for s in seeds]
        device = self.device
        z0 = self.latents(batch, seeds)  # (B, C, h, w) float32, scaled
        index = torch.cat([torch.randint(0, self.grid.steps, (1,), generator=g) for g in gens])  # (B,)
        u = torch.cat([torch.rand((1,), generator=g, dtype=torch.float64) for g in gens])  # (B,)
        w = (self.w_min + (self.w_max - self.w_min) * u).to(torch.float32)
        noise = per_sample_normal(z0.shape, gens, device=device)  # (B, C, h, w)
        t_start, t_end = self.grid.start[index].to(device), self.grid.end[index].to(device)  # (B,), (B,)
        x_start = self.sampling.q_sample(z0, noise, t_start)

        with torch.no_grad():
            context, pooled = encode_captions(self.bundle.text_encoders, list(batch.captions),
                                              with_pooled=self.bundle.family.is_sdxl)
            y = self._y(pooled, batch, z0)
            uncond, uncond_y = self._unconditional(batch, z0)
            x_end = self.teacher_step(x_start, t_start, t_end, w, (context, y), (uncond, uncond_y))
            target_net = self.target if self.target is not None else self.bundle.unet   # LCM-LoRA: hooked LoRA
            with self._lora_target_swapped_in():
                target = self.consistency(target_net(x_end, t_end.to(torch.float32), context, y), x_end, t_end)
        out = self._unet_call(x_start, t_start.to(torch.float32), context, y)  # (B, C, h, w)
        prediction = self.consistency(out, x_start, t_start)
        return LCDPair(index=index, t_start=t_start, t_end=t_end, w=w, noise=noise, x_start=x_start, x_end=x_end,
                       prediction=prediction, target=target)

    @torch.no_grad()
    def teacher_step(self, x_start: Tensor, t_start: Tensor, t_end: Tensor, w: Tensor,
                     cond: tuple[Tensor, Tensor | None], uncond: tuple[Tensor, Tensor | None]) -> Tensor:
        """One DDIM step of the guided teacher from ``t_start`` to ``t_end``: x0 and eps each guided as
        ``cond + w (cond - uncond)``, then ``sqrt(ac_end) x0 + sqrt(1 - ac_end) eps``."""
        n = x_start.shape[0]
        y = None if cond[1] is None else torch.cat([cond[1], uncond[1]])
        with contextlib.ExitStack() as stack:
            teacher = self.teacher
            if teacher is None:  # LCM-LoRA: the model itself with its LoRA off
                stack.enter_context(self.unet_lora.disabled())
                teacher = self.bundle.unet
            out = teacher(torch.cat([x_start, x_start]), torch.cat([t_start, t_start]).to(torch.float32),
                          torch.cat([cond[0], uncond[0]]), y)  # (2B, C, h, w)
        x0, eps = self.x0_and_eps(out, torch.cat([x_start, x_start]), torch.cat([t_start, t_start]))
        w = _per_image(w, x_start)
        x0 = x0[:n] + w * (x0[:n] - x0[n:])
        eps = eps[:n] + w * (eps[:n] - eps[n:])
        return self.sampling.q_sample(x0, eps, t_end)

    def x0_and_eps(self, out: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """The x0 and eps a network output stands for at the VP sample ``x_t`` and integer timesteps ``t``,
        through the model sampling's scalings on the VE sample ``x_t * sqrt(1 + sigma^2)``."""
        sigma = _per_image(self.sampling.schedule.sigmas.to(t.device)[t], x_t)  # (B, 1, 1, 1)
        x_ve = x_t * (1 + sigma**2).sqrt()
        c_skip, c_out, _ = self.sampling.scalings(sigma)
        x0 = c_skip * x_ve + c_out * out.to(x_t.dtype)
        return x0, (x_ve - x0) / sigma

    def consistency(self, out: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """f = c_skip(t) x_t + c_out(t) x0(out)."""
        c_skip, c_out = boundary_scalings(t)
        x0, _ = self.x0_and_eps(out, x_t, t)
        return _per_image(c_skip, x_t) * x_t + _per_image(c_out, x_t) * x0

    # -- helpers ------------------------------------------------------------------------------------------
    def _y(self, pooled: Tensor | None, batch: Batch, z0: Tensor) -> Tensor | None:
        return self._vector(pooled, batch, z0) if self.bundle.unet_config.adm_in_channels is not None else None

    def _unconditional(self, batch: Batch, z0: Tensor) -> tuple[Tensor, Tensor | None]:
        """The context (B, L, D) and SDXL vector of an empty negative prompt, made once by the generate pipeline's
        rule (`_zero_negative`): the encoded empty caption, or zeros of its shapes where the model says so."""
        if self._uncond is None:
            context, pooled = encode_captions(self.bundle.text_encoders, [""], with_pooled=self.bundle.family.is_sdxl)
            if _zero_negative(self.bundle.family, "", True, self.bundle.zero_empty_negative):
                context, pooled = torch.zeros_like(context), None if pooled is None else torch.zeros_like(pooled)
            self._uncond = context, pooled
        context, pooled = self._uncond
        n = len(batch)
        pooled = None if pooled is None else pooled.expand(n, -1)
        return context.expand(n, -1, -1), self._y(pooled, batch, z0)


def build_task(config, bundle: ModelBundle) -> LCDTask:
    """The task-registry entry point (`sdlab.train.cli`): an `LCDTask` from a `TrainConfig`."""
    return LCDTask(bundle, LCDOptions.from_config(config))
