"""The VAE and contrastive text-encoder training objectives: loss math, the one-optimiser critic arrangement,
the saved deliverables, and proofs that they learn (on synthetic pictures drawn here with Pillow).

The learning proofs drive the tasks with a minimal loop (AdamW for N steps, seeded batches), the same
calls `sdlab.train.loop` makes: `trainable_modules()`, `loss(batch, generator)`, backward, step.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter
from safetensors import safe_open

from sdlab.models.clip import CLIPTextConfig, CLIPTextModel
from sdlab.tiny.image_tower import ImageTowerConfig
from sdlab.models.vae import AutoencoderKL, VAEConfig
from sdlab.train.losses import (
    PatchDiscriminator,
    adaptive_adversarial_weight,
    gradient_l1,
    hinge_discriminator_loss,
    hinge_generator_loss,
    ms_ssim,
    psnr,
    sobel_gradients,
    ssim,
)
from sdlab.train.data import generator_for, posterior_generators, posterior_sample
from sdlab.train.task import Batch, TrainTask
from sdlab.tiny.text_task import (
    LogitScale,
    TextTask,
    contrastive_loss,
    image_tower_path,
    load_trained_image_tower,
    load_trained_text_encoder,
)
from sdlab.train.vae_task import VAELossConfig, VAETask, latent_scaling_factor, load_trained_vae

# ----------------------------------------------------------------------------------------------------------
# Synthetic data: coloured shapes on coloured backgrounds

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {"top left": (0, 0), "top right": (1, 0), "bottom left": (0, 1), "bottom right": (1, 1)}
ALL_CAPTIONS = [f"a {c} {s} in the {p}" for s in SHAPES for c in COLOURS for p in POSITIONS]


def draw_shape(shape: str, colour: str, position: str, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """One shape of a random size, jittered around the centre of its quadrant, on a random muted background."""
    background = tuple(int(v) for v in rng.integers(0, 256, 3) // 3 + 60)
    img = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(img)
    half = size // 2
    r = int(rng.integers(size // 6, size // 4 + 1))
    cx = POSITIONS[position][0] * half + half // 2 + int(rng.integers(-2, 3))
    cy = POSITIONS[position][1] * half + half // 2 + int(rng.integers(-2, 3))
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    array = np.stack([np.asarray(i, dtype=np.float32) for i in images]) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W) in [-1, 1]


def shapes_dataset(n: int, seed: int, size: int = 32) -> tuple[torch.Tensor, list[str]]:
    rng = np.random.default_rng(seed)
    images, captions = [], []
    for _ in range(n):
        shape = SHAPES[rng.integers(len(SHAPES))]
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        position = list(POSITIONS)[rng.integers(len(POSITIONS))]
        images.append(draw_shape(shape, colour, position, rng, size))
        captions.append(f"a {colour} {shape} in the {position}")
    return to_tensor(images), captions


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def train_steps(task: TrainTask, images: torch.Tensor, captions: list[str], steps: int, batch_size: int, lr: float):
    """The loop's calls in miniature: AdamW over trainable_modules(), seeded batches and loss generators."""
    params = [p for m in task.trainable_modules().values() for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    order = torch.Generator().manual_seed(1234)
    metrics: dict[str, float] = {}
    for step in range(steps):
        idx = torch.randint(0, len(images), (batch_size,), generator=order)
        batch = Batch(images=images[idx], captions=[captions[i] for i in idx])
        loss, metrics = task.loss(batch, torch.Generator().manual_seed(step))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
    return metrics


# ----------------------------------------------------------------------------------------------------------
# Losses


def test_ssim_and_ms_ssim_are_one_for_identical_images_and_fall_with_blur_and_noise():
    images, _ = shapes_dataset(4, seed=0)
    assert torch.allclose(ssim(images, images), torch.ones(4), atol=1e-5)
    assert torch.allclose(ms_ssim(images, images), torch.ones(4), atol=1e-5)
    blurred = to_tensor([Image.fromarray(((img.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8))
                         .filter(ImageFilter.GaussianBlur(1.5)) for img in images])
    noisy = images + 0.2 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    for damaged in (blurred, noisy):
        assert (ms_ssim(damaged, images) < 0.99).all() and (ssim(damaged, images) < 0.95).all()
        assert torch.allclose(ms_ssim(damaged, images), ms_ssim(images, damaged), atol=1e-6)  # symmetric
    more_noise = images + 0.4 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    assert (ms_ssim(more_noise, images) < ms_ssim(noisy, images)).all()


def test_ssim_matches_a_direct_evaluation_of_the_formula_at_one_pixel():
    x = torch.rand(1, 1, 11, 11, generator=torch.Generator().manual_seed(1)) * 2 - 1
    y = (x + 0.3 * torch.rand(x.shape, generator=torch.Generator().manual_seed(2))).clamp(-1, 1)
    coords = torch.arange(11.0) - 5
    g = torch.exp(-(coords**2) / (2 * 1.5**2))
    w = (g[:, None] * g[None, :]) / (g.sum() ** 2)  # the 11x11 window, centred on the middle pixel
    mx, my = (w * x[0, 0]).sum(), (w * y[0, 0]).sum()
    vx, vy = (w * x[0, 0] ** 2).sum() - mx**2, (w * y[0, 0] ** 2).sum() - my**2
    cxy = (w * x[0, 0] * y[0, 0]).sum() - mx * my
    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
    expected = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    # the middle pixel of an 11x11 image sees no padding; read it from a map built by the same code path
    from sdlab.train.losses import _gaussian_window, _local_mean  # noqa: PLC0415 (internal helpers)

    window = _gaussian_window(11, 1.5, 1, x)
    mu_x, mu_y = _local_mean(x, window), _local_mean(y, window)
    var_x = _local_mean(x * x, window) - mu_x**2
    var_y = _local_mean(y * y, window) - mu_y**2
    cov = _local_mean(x * y, window) - mu_x * mu_y
    ssim_map = (2 * mu_x * mu_y + c1) * (2 * cov + c2) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    assert abs(ssim_map[0, 0, 5, 5].item() - expected.item()) < 1e-5


def test_sobel_gives_unit_response_on_a_unit_ramp_and_gradient_l1_sees_blur():
    ramp = torch.arange(8.0).expand(1, 1, 8, 8).clone()  # +1 per pixel along x
    dx, dy = sobel_gradients(ramp)
    assert torch.allclose(dx[..., 1:-1], torch.ones(1, 1, 8, 6))
    assert torch.allclose(dy, torch.zeros(1, 1, 8, 8))
    images, _ = shapes_dataset(2, seed=3)
    assert torch.all(gradient_l1(images, images) == 0)
    blurred = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    assert (gradient_l1(blurred, images) > 0.005).all()


def test_hinge_losses_and_adaptive_weight():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.75))
    assert hinge_generator_loss(fake).item() == pytest.approx(0.75)
    w = torch.randn(3, 4, requires_grad=True)
    x = torch.randn(5, 4)
    out = x @ w.T  # (5, 3)
    rec, gen = out.pow(2).mean(), -out.sum()
    g_rec = torch.autograd.grad(rec, w, retain_graph=True)[0]
    g_gen = torch.autograd.grad(gen, w, retain_graph=True)[0]
    expected = g_rec.norm() / (g_gen.norm() + 1e-4)
    assert adaptive_adversarial_weight(rec, gen, w).item() == pytest.approx(expected.item(), rel=1e-6)


def test_psnr_of_known_error():
    x = torch.zeros(2, 3, 4, 4)
    y = x + 0.1  # MSE 0.01 on a range of 2: 10 log10(4 / 0.01)
    assert torch.allclose(psnr(y, x), torch.full((2,), 10 * math.log10(400.0)), atol=1e-4)


# ----------------------------------------------------------------------------------------------------------
# VAE task

TINY_VAE = VAEConfig(base_channels=32, channel_mult=(1, 2, 2), latent_channels=4, num_res_blocks=1, norm_groups=8)
VAE_CI_STEPS, VAE_CI_PSNR = 100, 17.5
VAE_SLOW_STEPS, VAE_SLOW_PSNR = 300, 20.0


def test_vae_loss_matches_its_formula():
    torch.manual_seed(0)
    lc = VAELossConfig(pixel_loss="l1", kl_weight=1e-3, ssim_weight=0.2, gradient_weight=0.3)
    task = VAETask(TINY_VAE, lc)
    images, captions = shapes_dataset(4, seed=0)
    seeds = [11, 12, 13, 14]
    calls = []
    hook = task.vae.register_forward_hook(lambda module, args, kwargs, out: calls.append(kwargs), with_kwargs=True)
    loss, metrics = task.loss(Batch(images=images, captions=captions, seeds=seeds), torch.Generator().manual_seed(7))
    hook.remove()
    assert len(calls) == 1                                 # the VAE's own forward: encode, posterior draw, decode
    # z ~ q(z|x) with each image's noise from its own seed, the U-Net task's latents' draw: the same whatever the split
    posterior = task.vae.encode(images)
    x_hat = task.vae.decode(posterior_sample(posterior.mean, posterior.std, seeds))
    expected = (
        (x_hat - images).abs().mean()
        + 0.2 * (1 - ms_ssim(x_hat, images)).mean()
        + 0.3 * gradient_l1(x_hat, images).mean()
        + 1e-3 * posterior.kl().mean() / images[0].numel()
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["loss"] == pytest.approx(loss.item())
    assert isinstance(task, TrainTask)


def test_the_posterior_draw_of_the_vae_is_the_one_of_training_latents():
    """One draw: the VAE's posterior sample from each image's generator (the VAE task's forward) is bit for bit
    the training latents' `posterior_sample` (the U-Net task, the latent cache), and diffusers' formula."""
    vae = AutoencoderKL(TINY_VAE)
    images, _ = shapes_dataset(3, seed=1)
    posterior = vae.encode(images)
    seeds = [5, 6, 7]
    drawn = posterior.sample(posterior_generators(seeds))
    assert torch.equal(drawn, posterior_sample(posterior.mean, posterior.std, seeds))
    eps = torch.cat([torch.randn((1, *posterior.mean.shape[1:]), generator=generator_for(s, "posterior")) for s in seeds])
    assert torch.equal(drawn, posterior.mean + posterior.std * eps)      # diffusers: self.mean + self.std * sample


def test_critic_and_vae_each_get_only_their_own_gradient_from_one_backward():
    """L_vae + L_D with one backward equals two separate objectives: the VAE sees L_rec + KL + lambda L_G
    (critic frozen), the critic sees L_D on the detached reconstruction."""
    torch.manual_seed(0)
    lc = VAELossConfig(ssim_weight=0.0, gradient_weight=0.0, adversarial_weight=0.5, adversarial_start=0,
                       critic_channels=16, critic_layers=2)
    task = VAETask(TINY_VAE, lc)
    vae, critic = task.trainable_modules()["vae"], task.trainable_modules()["critic"]
    images, captions = shapes_dataset(4, seed=0)
    loss, metrics = task.loss(Batch(images=images, captions=captions, seeds=[1, 2, 3, 4]), torch.Generator())
    loss.backward()
    assert metrics["adversarial_weight"] > 0
    got_vae = {k: p.grad.clone() for k, p in vae.named_parameters()}
    got_critic = {k: p.grad.clone() for k, p in critic.named_parameters()}

    # the same objectives, written out separately
    for p in [*vae.parameters(), *critic.parameters()]:
        p.grad = None
    x_hat, posterior = vae(images, generator=posterior_generators([1, 2, 3, 4]))
    rec = (x_hat - images).abs().mean()
    vae_loss = rec + lc.kl_weight * posterior.kl().mean() / images[0].numel()
    for p in critic.parameters():
        p.requires_grad_(False)
    gen = hinge_generator_loss(critic(x_hat))
    weight = lc.adversarial_weight * adaptive_adversarial_weight(rec, gen, vae.decoder.conv_out.weight)
    (vae_loss + weight * gen).backward()
    for p in critic.parameters():
        p.requires_grad_(True)
    logits = critic(torch.cat([images, x_hat.detach()]))
    hinge_discriminator_loss(*logits.chunk(2)).backward()
    for k, p in vae.named_parameters():
        torch.testing.assert_close(p.grad, got_vae[k], rtol=1e-4, atol=1e-7)
    for k, p in critic.named_parameters():
        torch.testing.assert_close(p.grad, got_critic[k], rtol=1e-4, atol=1e-7)


def test_adversarial_term_waits_for_its_start_in_optimizer_steps_and_the_count_is_a_saved_buffer():
    """The start counts optimiser steps, not ``loss`` calls: 2 accumulation micro-steps per step (or 2
    processes) start the adversarial term at the same step as 1."""
    lc = VAELossConfig(ssim_weight=0.0, gradient_weight=0.0, adversarial_weight=0.5, adversarial_start=2,
                       critic_channels=16, critic_layers=2)
    task = VAETask(TINY_VAE, lc)
    images, captions = shapes_dataset(2, seed=0)
    weights = []
    for step in range(3):
        weights.append([task.loss(Batch(images=images, captions=captions, seeds=[step, micro]), torch.Generator())[1]
                        ["adversarial_weight"] for micro in range(2)])
        task.after_optimizer_step()
    assert weights[0] == [0, 0] and weights[1] == [0, 0] and min(weights[2]) > 0
    assert int(task.trainable_modules()["critic"].state_dict()["updates"]) == 3
    assert PatchDiscriminator(3, 16, 2)(images).shape[1] == 1


def test_vae_save_weights_layout_metadata_and_scaling_factor(tmp_path):
    torch.manual_seed(0)
    task = VAETask(TINY_VAE, VAELossConfig(scaling_sample_size=6), seed=5)
    images, captions = shapes_dataset(8, seed=0)
    task.loss(Batch(images=images[:4], captions=captions[:4]), torch.Generator().manual_seed(0))
    task.loss(Batch(images=images[4:], captions=captions[4:]), torch.Generator().manual_seed(1))
    path = tmp_path / "vae.safetensors"
    task.save_weights(path, ema=False)
    assert [p.name for p in tmp_path.iterdir()] == ["vae.safetensors"]  # no temp file left behind
    with safe_open(str(path), "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    assert keys == set(AutoencoderKL(TINY_VAE).state_dict())  # original LDM names, no prefix
    assert "encoder.down.0.block.0.conv1.weight" in keys and "decoder.up.0.block.0.conv1.weight" in keys
    assert json.loads(metadata["sdlab.config"])["channel_mult"] == [1, 2, 2]
    # the factor is 1 / std of posterior samples over the first 6 training images, with the saved weights
    expected = latent_scaling_factor(task.vae.eval(), images[:6], torch.Generator().manual_seed(5))
    assert float(metadata["sdlab.scaling_factor"]) == pytest.approx(expected, rel=1e-6)
    vae, scaling = load_trained_vae(path)
    assert scaling == pytest.approx(expected, rel=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(vae.decode(vae.encode(images).mode()), task.vae.decode(task.vae.encode(images).mode()))
    fixed = VAETask(TINY_VAE, scaling_factor=0.18215)
    fixed.save_weights(tmp_path / "fixed.safetensors", ema=True)
    assert load_trained_vae(tmp_path / "fixed.safetensors")[1] == pytest.approx(0.18215)


def test_vae_preview_writes_originals_over_reconstructions(tmp_path, monkeypatch):
    task = VAETask(TINY_VAE)
    images, captions = shapes_dataset(3, seed=0)
    task.loss(Batch(images=images, captions=captions), torch.Generator().manual_seed(0))
    renamed = []                                             # written atomically: a temporary file renamed into place
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: renamed.append(Path(dst)) or real_replace(src, dst))
    task.preview(tmp_path, 12)
    assert Image.open(tmp_path / "vae_000012.png").size == (3 * 32, 2 * 32)
    assert renamed == [tmp_path / "vae_000012.png"]


def test_decoder_only_keeps_the_encoder_and_its_latents():
    torch.manual_seed(0)
    images, captions = shapes_dataset(16, seed=2)
    task = VAETask(TINY_VAE, VAELossConfig(), decoder_only=True)
    before = {k: v.clone() for k, v in task.vae.state_dict().items()}
    with torch.no_grad():
        latents = task.vae.encode(images).mean
    train_steps(task, images, captions, steps=3, batch_size=8, lr=1e-3)
    after = task.vae.state_dict()
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    trained = [k for k in before if k.startswith(("decoder.", "post_quant_conv."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in trained)
    with torch.no_grad():
        assert torch.equal(task.vae.encode(images).mean, latents)


def _vae_psnr_after_training(steps: int) -> tuple[float, float]:
    torch.manual_seed(0)
    train_images, train_captions = shapes_dataset(384, seed=0)
    test_images, _ = shapes_dataset(64, seed=1)
    task = VAETask(TINY_VAE, VAELossConfig())
    train_steps(task, train_images, train_captions, steps=steps, batch_size=8, lr=5e-4)
    vae = task.vae.eval()
    with torch.no_grad():
        reconstruction = vae.decode(vae.encode(test_images).mode())
    baseline = psnr(train_images.mean(0, keepdim=True).expand_as(test_images), test_images).mean().item()
    return psnr(reconstruction, test_images).mean().item(), baseline


def test_vae_learns_to_reconstruct_held_out_shapes():
    trained, mean_image = _vae_psnr_after_training(steps=VAE_CI_STEPS)
    assert mean_image < 17.0
    print(f"VAE {VAE_CI_STEPS} steps: held-out PSNR {trained:.2f} dB, mean image {mean_image:.2f} dB")
    assert trained > VAE_CI_PSNR, (trained, mean_image)


@pytest.mark.slow
def test_vae_reaches_higher_psnr_with_longer_training():
    trained, mean_image = _vae_psnr_after_training(steps=VAE_SLOW_STEPS)
    print(f"VAE {VAE_SLOW_STEPS} steps: held-out PSNR {trained:.2f} dB, mean image {mean_image:.2f} dB")
    assert trained > VAE_SLOW_PSNR, (trained, mean_image)


# ----------------------------------------------------------------------------------------------------------
# Text task

TINY_TEXT = CLIPTextConfig(width=64, layers=2, heads=1, mlp_width=256, projection_dim=64)
TINY_IMAGE = ImageTowerConfig(widths=(16, 32, 64), embed_dim=64)
TEXT_CI_STEPS, TEXT_CI_TIMES_CHANCE = 60, 10.0
TEXT_SLOW_STEPS, TEXT_SLOW_TIMES_CHANCE = 400, 30.0


def test_contrastive_loss_is_clips_symmetric_cross_entropy_for_distinct_captions():
    g = torch.Generator().manual_seed(0)
    i = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    t = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    scale = torch.tensor(1 / 0.07)
    logits = scale * i @ t.T
    labels = torch.arange(6)
    expected = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    got = contrastive_loss(i, t, scale, torch.eye(6, dtype=torch.bool))
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    # identical captions share the target: rows 0 and 1 carry the same caption
    same = torch.eye(6, dtype=torch.bool)
    same[0, 1] = same[1, 0] = True
    target = same.float() / same.sum(1, keepdim=True)
    soft = -(target * F.log_softmax(logits, 1)).sum(1).mean()
    soft_t = -(target * F.log_softmax(logits.T, 1)).sum(1).mean()
    assert contrastive_loss(i, t, scale, same).item() == pytest.approx(0.5 * (soft + soft_t).item(), rel=1e-6)


def test_logit_scale_starts_at_one_over_007_and_is_clamped_at_100():
    scale = LogitScale()
    assert scale().item() == pytest.approx(1 / 0.07, rel=1e-6)
    with torch.no_grad():
        scale.log_scale.fill_(10.0)
    assert scale().item() == pytest.approx(100.0, rel=1e-6)


def test_text_task_uses_the_real_tokenizer_and_saves_both_towers(tmp_path):
    torch.manual_seed(0)
    task = TextTask(TINY_TEXT, TINY_IMAGE)
    assert task.tokenizer.vocab_size == 49408 and task.tokenizer.max_length == 77
    images, captions = shapes_dataset(4, seed=0)
    loss, metrics = task.loss(Batch(images=images, captions=captions), torch.Generator())
    assert math.isfinite(loss.item()) and metrics["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-5)
    path = tmp_path / "text.safetensors"
    task.save_weights(path, ema=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text.image_tower.safetensors", "text.safetensors"]
    with safe_open(str(path), "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    assert keys == set(CLIPTextModel(TINY_TEXT).state_dict())
    assert "encoder.layers.0.self_attn.q_proj.weight" in keys and "text_projection.weight" in keys
    assert json.loads(metadata["sdlab.text_hidden_states"]) == ["last"]
    text = load_trained_text_encoder(path)
    ids = task.tokenizer(captions)  # (4, 77)
    with torch.no_grad():
        torch.testing.assert_close(text(ids).last_hidden_state, task.text_encoder(ids).last_hidden_state)
    tower, scale = load_trained_image_tower(image_tower_path(path))
    assert scale == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(tower(images), task.image_encoder(images))


def test_text_task_rejects_mismatched_embedding_widths():
    with pytest.raises(ValueError, match="projection_dim"):
        TextTask(CLIPTextConfig(width=64, layers=1, heads=1, mlp_width=128), TINY_IMAGE)
    with pytest.raises(ValueError, match="embed_dim"):
        TextTask(TINY_TEXT, ImageTowerConfig(embed_dim=32))


def _retrieval_accuracy_after_training(steps: int) -> float:
    torch.manual_seed(0)
    train_images, train_captions = shapes_dataset(1024, seed=0)
    test_images, test_captions = shapes_dataset(192, seed=1)
    task = TextTask(TINY_TEXT, TINY_IMAGE)
    train_steps(task, train_images, train_captions, steps=steps, batch_size=64, lr=1e-3)
    truth = torch.tensor([ALL_CAPTIONS.index(c) for c in test_captions])
    return (task.retrieve(test_images, ALL_CAPTIONS).best == truth).float().mean().item()


def test_text_encoder_retrieves_captions_of_held_out_images():
    """48 candidate captions (3 shapes x 4 colours x 4 positions): chance is 1/48."""
    accuracy = _retrieval_accuracy_after_training(steps=TEXT_CI_STEPS)
    print(f"text {TEXT_CI_STEPS} steps: top-1 {accuracy:.3f}, chance {1 / len(ALL_CAPTIONS):.3f}")
    assert accuracy >= TEXT_CI_TIMES_CHANCE / len(ALL_CAPTIONS), accuracy


@pytest.mark.slow
def test_text_encoder_retrieval_with_longer_training():
    accuracy = _retrieval_accuracy_after_training(steps=TEXT_SLOW_STEPS)
    print(f"text {TEXT_SLOW_STEPS} steps: top-1 {accuracy:.3f}, chance {1 / len(ALL_CAPTIONS):.3f}")
    assert accuracy >= TEXT_SLOW_TIMES_CHANCE / len(ALL_CAPTIONS), accuracy


# ----------------------------------------------------------------------------------------------------------
# Plug-ins of the real loop: `sdlab train --task vae|text` on a tiny SD1 checkpoint


@pytest.mark.parametrize("task_name", ["vae", "text"])
def test_tasks_run_in_the_training_loop(tmp_path, task_name):
    from sdlab.train.cli import run_from_config  # noqa: PLC0415
    from sdlab.train.config import TrainConfig  # noqa: PLC0415
    from train_fixtures import write_caption_folder, write_tiny_model  # noqa: PLC0415

    data = write_caption_folder(tmp_path / "data", n=4, size=32)
    model = write_tiny_model(tmp_path / "tiny-sd1.safetensors")
    cfg = TrainConfig(task=task_name, model=str(model), data_dir=str(data), output_dir=str(tmp_path / "run"),
                      resolution=32, max_steps=2, batch_size=2, num_workers=1, device="cpu", progress=False,
                      caption_dropout=0.0, learning_rate=1e-4)
    result = run_from_config(cfg)
    assert result.step == 2 and result.weights is not None and math.isfinite(result.last_loss)
    if task_name == "vae":
        vae, scaling = load_trained_vae(result.weights)
        assert scaling == pytest.approx(0.18215)  # fine-tuning keeps the family's factor
        assert vae.cfg.channel_mult == (1, 2)
    else:
        text = load_trained_text_encoder(result.weights)
        assert text.cfg.projection_dim == text.cfg.width  # SD1's tower got a projection for the contrastive loss
        assert image_tower_path(result.weights).is_file()
