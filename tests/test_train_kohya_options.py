"""kohya-ss/sd-scripts' training options in `sdlab train`, against kohya's functions transcribed below.

Each reference function is kohya's code (kohya-ss/sd-scripts ``library/train_util.py`` and
``library/custom_train_functions.py``, functions named in each docstring) with one change: the random draws
come from an explicit ``torch.Generator`` (Python's ``random.random()`` from the same generator as a float64)
instead of the global RNGs, so sdlab's per-image draws can be fed the same numbers. sdlab draws every random
number of an image from that image's generator, so the comparisons are per image (batch 1) or image by image;
where kohya draws one number for the whole batch (the random input-perturbation strength, the std that
normalises pyramid noise) sdlab draws / computes it per image, which is the same at batch 1.

Then: the U-Net task's loss with all of them at once equals the loss composed from the transcriptions; each
option (and its combinations with Min-SNR-gamma, v-prediction, offset noise, LoRA, the embedding task) runs
1-2 steps of the tiny model; settings that make no sense are one error line; a resumed run keeps them.
"""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest
import torch
from diffusers import DDPMScheduler

from bundle_fixtures import tiny_bundle
from sdlab.diffusion import loss as sdl
from sdlab.diffusion.prediction import Prediction
from sdlab.pipeline.conditioning import encode_captions
from sdlab.train.config import TrainConfig
from sdlab.train.data import generator_for, shuffle_tags
from sdlab.train.errors import TrainError
from sdlab.train.run_checkpoint import list_checkpoints, load_run_checkpoint
from sdlab.train.task import Batch
from sdlab.train.unet_task import UNetTask, UNetTaskOptions
from train_fixtures import run_in_process, write_caption_folder, write_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


# --- kohya's functions, transcribed -------------------------------------------------------------------------

def kohya_get_timesteps(min_timestep, max_timestep, b_size, g):
    """train_util.get_timesteps."""
    if min_timestep < max_timestep:
        timesteps = torch.randint(min_timestep, max_timestep, (b_size,), device="cpu", generator=g)
    else:
        timesteps = torch.full((b_size,), max_timestep, device="cpu")
    return timesteps.long()


def kohya_pyramid_noise_like(noise, g, iterations=6, discount=0.4):
    """custom_train_functions.pyramid_noise_like."""
    b, c, w, h = noise.shape
    u = torch.nn.Upsample(size=(w, h), mode="bilinear")
    for i in range(iterations):
        r = torch.rand((), generator=g, dtype=torch.float64).item() * 2 + 2    # random.random() * 2 + 2
        wn, hn = max(1, int(w / (r**i))), max(1, int(h / (r**i)))
        noise += u(torch.randn(b, c, wn, hn, generator=g)) * discount**i
        if wn == 1 or hn == 1:
            break
    return noise / noise.std()


def kohya_apply_noise_offset(latents, noise, noise_offset, g):
    """custom_train_functions.apply_noise_offset (adaptive_noise_scale None)."""
    return noise + noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=g)


def kohya_ip_noisy_latents(scheduler, latents, noise, timesteps, ip_noise_gamma, random_strength, g):
    """train_util.get_noise_noisy_latents_and_timesteps, its input-perturbation branch."""
    if random_strength:
        strength = torch.rand(1, generator=g) * ip_noise_gamma
    else:
        strength = ip_noise_gamma
    return scheduler.add_noise(latents, noise + strength * torch.randn(latents.shape, generator=g), timesteps)


def kohya_all_snr(scheduler):
    """custom_train_functions.prepare_scheduler_for_custom_training."""
    alphas_cumprod = scheduler.alphas_cumprod
    alpha, sigma = torch.sqrt(alphas_cumprod), torch.sqrt(1.0 - alphas_cumprod)
    return (alpha / sigma) ** 2


def kohya_apply_snr_weight(loss, timesteps, all_snr, gamma, v_prediction=False):
    """custom_train_functions.apply_snr_weight."""
    snr = torch.stack([all_snr[t] for t in timesteps])
    min_snr_gamma = torch.minimum(snr, torch.full_like(snr, gamma))
    if v_prediction:
        snr_weight = torch.div(min_snr_gamma, snr + 1).float().to(loss.device)
    else:
        snr_weight = torch.div(min_snr_gamma, snr).float().to(loss.device)
    return loss * snr_weight


def kohya_apply_debiased_estimation(loss, timesteps, all_snr, v_prediction=False):
    """custom_train_functions.apply_debiased_estimation."""
    snr_t = torch.stack([all_snr[t] for t in timesteps])
    snr_t = torch.minimum(snr_t, torch.ones_like(snr_t) * 1000)
    if v_prediction:
        weight = 1 / (snr_t + 1)
    else:
        weight = 1 / torch.sqrt(snr_t)
    return weight * loss


def kohya_huber_threshold(loss_type, huber_schedule, huber_c, timesteps, scheduler, huber_scale=1.0):
    """train_util.get_huber_threshold_if_needed."""
    if not (loss_type == "huber" or loss_type == "smooth_l1"):
        return None
    b_size = timesteps.shape[0]
    if huber_schedule == "exponential":
        alpha = -math.log(huber_c) / scheduler.config.num_train_timesteps
        result = torch.exp(-alpha * timesteps) * huber_scale
    elif huber_schedule == "snr":
        alphas_cumprod = torch.index_select(scheduler.alphas_cumprod, 0, timesteps.cpu())
        sigmas = ((1.0 - alphas_cumprod) / alphas_cumprod) ** 0.5
        result = (1 - huber_c) / (1 + sigmas) ** 2 + huber_c
    else:
        result = torch.full((b_size,), huber_c * huber_scale, device=timesteps.device)
    return result


def kohya_conditional_loss(model_pred, target, loss_type, reduction, huber_c=None):
    """train_util.conditional_loss."""
    if loss_type == "l2":
        loss = torch.nn.functional.mse_loss(model_pred, target, reduction=reduction)
    elif loss_type == "l1":
        loss = torch.nn.functional.l1_loss(model_pred, target, reduction=reduction)
    elif loss_type == "huber":
        huber_c = huber_c.view(-1, *([1] * (model_pred.ndim - 1)))
        loss = 2 * huber_c * (torch.sqrt((model_pred - target) ** 2 + huber_c**2) - huber_c)
    else:  # smooth_l1
        huber_c = huber_c.view(-1, *([1] * (model_pred.ndim - 1)))
        loss = 2 * (torch.sqrt((model_pred - target) ** 2 + huber_c**2) - huber_c)
    return loss


def kohya_shuffle_caption(caption, keep_tokens, caption_separator, shuffle):
    """train_util.BaseDataset.process_caption, its shuffle_caption branch (no keep_tokens_separator, warm-up or
    tag dropout); ``shuffle`` stands for ``random.shuffle``."""
    tokens = [t.strip() for t in caption.strip().split(caption_separator)]
    flex_tokens = tokens[:]
    fixed_tokens = []
    if keep_tokens > 0:
        fixed_tokens = flex_tokens[:keep_tokens]
        flex_tokens = tokens[keep_tokens:]
    shuffle(flex_tokens)
    return ", ".join(fixed_tokens + flex_tokens)


def _scheduler(bundle) -> DDPMScheduler:
    """kohya's noise_scheduler: diffusers' DDPM scheduler on SD's schedule (the tiny sd1 model's)."""
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              num_train_timesteps=1000)
    assert torch.allclose(scheduler.alphas_cumprod.double(), bundle.model_sampling.schedule.alphas_cumprod.double(),
                          rtol=1e-6)
    return scheduler


# --- function by function -----------------------------------------------------------------------------------

@pytest.mark.parametrize("low, high", [(0, 1000), (200, 800), (500, 500), (999, 1000)])
def test_timestep_range_is_kohya_get_timesteps(low, high):
    for seed in range(20):
        ours = sdl.sample_timesteps([torch.Generator().manual_seed(seed)], 1000, low=low, high=high)
        assert torch.equal(ours, kohya_get_timesteps(low, high, 1, torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("iterations, discount, size", [(6, 0.3, 8), (10, 0.8, 16), (1, 0.3, 8), (3, 0.5, 5)])
def test_multires_noise_is_kohya_pyramid_noise_like(iterations, discount, size):
    noise = torch.randn(3, 4, size, size + 3, generator=torch.Generator().manual_seed(0))
    gens = [torch.Generator().manual_seed(10 + i) for i in range(3)]
    ours = sdl.pyramid_noise(noise.clone(), gens, iterations, discount)
    for i in range(3):
        ref = kohya_pyramid_noise_like(noise[i:i + 1].clone(), torch.Generator().manual_seed(10 + i), iterations, discount)
        assert torch.allclose(ours[i:i + 1], ref, atol=1e-6, rtol=0)
    assert float(ours[0].std()) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("random_strength", [False, True])
def test_input_perturbation_is_kohya_ip_noise_gamma(random_strength):
    bundle = tiny_bundle("sd1", 0)
    scheduler = _scheduler(bundle)
    z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    for t in (0, 411, 999):
        ts = torch.tensor([t])
        perturbed = sdl.input_perturbation(noise, 0.1, [torch.Generator().manual_seed(t)], random_strength)
        ours = bundle.model_sampling.q_sample(z0, perturbed, ts)
        ref = kohya_ip_noisy_latents(scheduler, z0, noise, ts, 0.1, random_strength, torch.Generator().manual_seed(t))
        assert torch.allclose(ours, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("prediction", [Prediction.EPS, Prediction.V])
def test_debiased_estimation_is_kohya_s(prediction):
    bundle = tiny_bundle("sd1", 0)
    all_snr = kohya_all_snr(_scheduler(bundle))
    t = torch.tensor([0, 1, 5, 50, 400, 999])
    loss = torch.rand(6, generator=torch.Generator().manual_seed(0))
    ours = loss * sdl.debiased_weights(t, bundle.model_sampling.schedule.alphas_cumprod, prediction)
    ref = kohya_apply_debiased_estimation(loss, t, all_snr, prediction is Prediction.V)
    assert torch.allclose(ours, ref, rtol=1e-5, atol=0)


@pytest.mark.parametrize("loss_type", ["l2", "l1", "huber", "smooth_l1"])
@pytest.mark.parametrize("schedule", ["snr", "exponential", "constant"])
def test_losses_and_huber_schedules_are_kohya_s(loss_type, schedule):
    bundle = tiny_bundle("sd1", 0)
    scheduler = _scheduler(bundle)
    t = torch.tensor([0, 3, 250, 999])
    pred = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    target = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    c_ref = kohya_huber_threshold(loss_type, schedule, 0.1, t, scheduler)
    c_ours = (sdl.huber_thresholds(t, schedule, 0.1, 1000, bundle.model_sampling.schedule.alphas_cumprod)
              if loss_type in ("huber", "smooth_l1") else None)
    if c_ref is not None:
        assert torch.allclose(c_ours, c_ref.float(), rtol=1e-6, atol=0)
    ours = sdl.elementwise_loss(pred, target, loss_type, c_ours)
    # atol: Huber's 2c(sqrt(d^2 + c^2) - c) cancels in fp32 for small d, an absolute error up to ~2c^2 x 2 ulp
    # (4e-7 at c = 0.95), and c itself is computed on each side with its own rounding (7e-7 relative apart here)
    assert torch.allclose(ours, kohya_conditional_loss(pred, target, loss_type, "none", c_ref), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("keep_tokens, separator", [(0, ","), (1, ","), (2, ","), (5, ","), (1, "|")])
def test_caption_shuffle_is_kohya_process_caption(keep_tokens, separator):
    caption = f" sks dog{separator} red collar {separator}grass{separator} sunny day{separator}photo "
    for seed in range(30):
        ours = shuffle_tags(caption, random.Random(seed), keep_tokens, separator)
        random.seed(seed)
        assert ours == kohya_shuffle_caption(caption, keep_tokens, separator, random.shuffle)
    assert shuffle_tags("a, b, c", random.Random(0), 3) == "a, b, c"


# --- the U-Net task's loss, all options at once -------------------------------------------------------------

@pytest.mark.parametrize("prediction, loss_type", [("eps", "huber"), ("v", "smooth_l1"), ("eps", "l1")])
def test_unet_loss_with_every_option_is_kohya_s_composition(prediction, loss_type):
    """One image: sdlab's draws (caption dropout, t, noise, offset, pyramid, input perturbation) from the image's
    generator, fed in the same order to kohya's functions, give the same loss (1e-6 relative)."""
    bundle = replace(tiny_bundle("sd1", 2), prediction=Prediction.parse(prediction))
    opts = UNetTaskOptions(caption_dropout=0.0, min_snr_gamma=5.0, offset_noise=0.1, min_timestep=100,
                           max_timestep=900, ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True,
                           multires_noise_iterations=6, multires_noise_discount=0.3, debiased_estimation_loss=True,
                           loss_type=loss_type, huber_schedule="snr", huber_c=0.1)
    task = UNetTask(bundle, opts)
    z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    caption = "a red square"
    batch = Batch(images=None, captions=[caption], latents=z0, seeds=[77])
    with torch.no_grad():
        ours, _ = task.loss(batch, torch.Generator())

        scheduler = _scheduler(bundle)
        g = generator_for(77, "unet")
        torch.rand((), generator=g)                                        # the caption-dropout draw
        t = kohya_get_timesteps(100, 900, 1, g)
        noise = torch.randn(z0.shape, generator=g)
        noise = kohya_apply_noise_offset(z0, noise, 0.1, g)
        noise = kohya_pyramid_noise_like(noise, g, 6, 0.3)
        noisy = kohya_ip_noisy_latents(scheduler, z0, noise, t, 0.1, True, g)
        target = noise if prediction == "eps" else scheduler.get_velocity(z0, noise, t)
        context, _ = encode_captions(bundle.text_encoders, [caption])
        pred = bundle.unet(noisy, t.float(), context, None)
        c = kohya_huber_threshold(loss_type, "snr", 0.1, t, scheduler)
        loss = kohya_conditional_loss(pred.float(), target.float(), loss_type, "none", c).mean([1, 2, 3])
        all_snr = kohya_all_snr(scheduler)
        loss = kohya_apply_snr_weight(loss, t, all_snr, 5.0, prediction == "v")
        loss = kohya_apply_debiased_estimation(loss, t, all_snr, prediction == "v").mean()
    assert float(ours) == pytest.approx(float(loss), rel=1e-5)


def test_defaults_leave_the_loss_unchanged():
    """The new options at their defaults draw nothing more and compute the same squared error."""
    bundle = tiny_bundle("sd1", 2)
    z0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    batch = Batch(images=None, captions=["a", "b"], latents=z0, seeds=[5, 6])
    task = UNetTask(bundle, UNetTaskOptions(offset_noise=0.05, min_snr_gamma=5.0))
    with torch.no_grad():
        loss, _ = task.loss(batch, torch.Generator())
        gens = [generator_for(s, "unet") for s in (5, 6)]
        captions = ["" if float(torch.rand((), generator=g)) < 0.1 else c for c, g in zip(["a", "b"], gens)]
        t = torch.cat([torch.randint(0, 1000, (1,), generator=g) for g in gens])
        noise = sdl.offset_noise(sdl.per_sample_normal(z0.shape, gens), 0.05, gens)
        ac = bundle.model_sampling.schedule.alphas_cumprod
        x_t = sdl.q_sample(z0, t, noise, ac)
        pred = bundle.unet(x_t, t.float(), encode_captions(bundle.text_encoders, captions)[0], None)
        ref = ((pred - noise).pow(2).mean((1, 2, 3)) * sdl.min_snr_weights(t, ac, 5.0, Prediction.EPS)).mean()
    assert torch.equal(loss, ref)


def test_shuffled_captions_reach_the_batch_from_each_sample_s_seed(tmp_path):
    from sdlab.train.data import TrainData, scan_dataset

    folder = tmp_path / "d"
    write_caption_folder(folder, n=2, size=16)
    for i in range(2):
        (folder / f"img{i:02d}.txt").write_text("sks, one, two, three, four")
    data = TrainData(scan_dataset(folder), resolution=16, center_crop=True, random_flip=False, seed=0, batch_size=2,
                     grad_accum=1, num_workers=1, shuffle_caption=True, keep_tokens=1)
    batches = [batch for _, _, batch in data.iterate(0, 4)]
    data.close()
    captions = [c for b in batches for c in b.captions]
    assert all(c.startswith("sks, ") and sorted(c.split(", ")) == sorted("sks, one, two, three, four".split(", "))
               for c in captions)
    assert len(set(captions)) > 1
    assert captions == [shuffle_tags("sks, one, two, three, four", random.Random(generator_seed), 1)
                        for b in batches for generator_seed in _caption_seeds(b)]


def _caption_seeds(batch):
    from sdlab.train.data import derive_seed
    return [derive_seed(seed, "caption") for seed in batch.seeds]


# --- runs of the tiny model ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("kohya")
    return write_tiny_model(root / "tiny-sd1.safetensors"), write_caption_folder(root / "data", n=4, size=16)


RUNS = {
    "timestep range": ("--min-timestep", "200", "--max-timestep", "700"),
    "one timestep": ("--min-timestep", "500", "--max-timestep", "500"),
    "input perturbation": ("--ip-noise-gamma", "0.1", "--ip-noise-gamma-random-strength", "--offset-noise", "0.05"),
    "multires": ("--multires-noise-iterations", "6", "--multires-noise-discount", "0.3", "--offset-noise", "0.1"),
    "debiased + min-snr": ("--debiased-estimation-loss", "--min-snr-gamma", "5"),
    "huber v-pred": ("--loss-type", "huber", "--prediction", "v", "--min-snr-gamma", "5"),
    "smooth_l1 exponential": ("--loss-type", "smooth_l1", "--huber-schedule", "exponential", "--huber-c", "0.2"),
    "l1 LoRA": ("--loss-type", "l1", "--lora-rank", "2", "--debiased-estimation-loss"),
    "shuffle": ("--shuffle-caption", "--keep-tokens", "1", "--caption-separator", " "),
    "embedding": ("--task", "embedding", "--embedding-word", "zq", "--shuffle-caption", "--loss-type", "huber",
                  "--ip-noise-gamma", "0.1", "--multires-noise-iterations", "4"),
    "lcd shuffle": ("--task", "lcd", "--shuffle-caption", "--keep-tokens", "1"),
}


@pytest.mark.parametrize("name", list(RUNS))
def test_each_option_trains_the_tiny_model(run_inputs, tmp_path, name):
    model, data = run_inputs
    result = run_in_process(tmp_path / "run", model, data, "--max-steps", "2", "--checkpoint-every", "100",
                            "--batch-size", "2", *RUNS[name])
    assert result.step == 2 and math.isfinite(result.last_loss) and result.weights.is_file()


def test_a_resumed_run_keeps_its_kohya_settings(run_inputs, tmp_path, capsys):
    """``--resume latest`` without the options trains on with the checkpoint's; changing one is refused."""
    from sdlab.train.cli import main

    model, data = run_inputs
    out = tmp_path / "run"
    settings = ("--loss-type", "huber", "--huber-schedule", "constant", "--ip-noise-gamma", "0.05",
                "--shuffle-caption", "--keep-tokens", "2", "--min-timestep", "10", "--checkpoint-every", "1")
    run_in_process(out, model, data, "--max-steps", "1", *settings)
    assert main(["--output-dir", str(out), "--resume", "latest", "--max-steps", "2", "--no-progress"]) == 0
    stored = load_run_checkpoint(list_checkpoints(out / "checkpoints")[-1][1])
    assert stored["step"] == 2
    config = stored["config"]
    assert (config["loss_type"], config["huber_schedule"], config["ip_noise_gamma"], config["shuffle_caption"],
            config["keep_tokens"], config["min_timestep"]) == ("huber", "constant", 0.05, True, 2, 10)
    capsys.readouterr()
    assert main(["--output-dir", str(out), "--resume", "latest", "--max-steps", "3", "--no-progress",
                 "--ip-noise-gamma", "0.2"]) == 2
    assert "--ip-noise-gamma was 0.05, now 0.2" in capsys.readouterr().err


@pytest.mark.parametrize("settings, message", [
    (dict(task="lcd", loss_type="huber"), "--loss-type huber does not apply to it"),
    (dict(task="lcd", ip_noise_gamma=0.1), "--ip-noise-gamma 0.1 does not apply to it"),
    (dict(task="vae", shuffle_caption=True), "--shuffle-caption does not apply to it"),
    (dict(huber_c=0.2), "--huber-c 0.2 shapes --loss-type huber or smooth_l1"),
    (dict(loss_type="l2", huber_schedule="constant"), "--huber-schedule 'constant' shapes --loss-type huber"),
    (dict(keep_tokens=2), "--keep-tokens 2 shapes --shuffle-caption"),
    (dict(ip_noise_gamma_random_strength=True), "--ip-noise-gamma-random-strength shapes --ip-noise-gamma"),
    (dict(multires_noise_discount=0.5), "--multires-noise-discount 0.5 shapes --multires-noise-iterations"),
    (dict(min_timestep=600, max_timestep=300), "--min-timestep 600 is above --max-timestep 300"),
    (dict(huber_c=0.0, loss_type="huber"), "--huber-c must be in (0, 1]"),
    (dict(loss_type="l3"), "--loss-type must be one of l2, l1, huber, smooth_l1"),
])
def test_settings_that_make_no_sense_are_refused(settings, message):
    with pytest.raises(TrainError, match=message.replace("(", r"\(").replace(")", r"\)").replace("|", r"\|")):
        TrainConfig(**settings)


@pytest.mark.parametrize("options, message", [
    (("--huber-c", "0.1"), "--huber-c 0.1 shapes --loss-type huber or smooth_l1"),
    (("--huber-schedule", "snr"), "--huber-schedule 'snr' shapes --loss-type huber"),
    (("--multires-noise-discount", "0.3"), "--multires-noise-discount 0.3 shapes --multires-noise-iterations"),
    (("--keep-tokens", "0"), "--keep-tokens 0 shapes --shuffle-caption"),
    (("--caption-separator", ","), "--caption-separator ',' shapes --shuffle-caption"),
    (("--no-ip-noise-gamma-random-strength",),
     "--no-ip-noise-gamma-random-strength shapes --ip-noise-gamma, which is not given: give it too, or drop "
     "--no-ip-noise-gamma-random-strength"),
])
def test_a_shaping_option_given_at_its_default_is_refused_too(options, message):
    """Given is given: the docs' "a shaping option without the one it shapes is one error line" holds for its
    default value too (the command line and a --config file name it)."""
    import argparse

    from sdlab.train.config import add_config_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    with pytest.raises(TrainError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_from_args(parser.parse_args(list(options)))
    config_from_args(parser.parse_args([*options, "--loss-type", "huber", "--multires-noise-iterations", "6",
                                        "--shuffle-caption", "--ip-noise-gamma", "0.1"]))


def test_model_dependent_refusals():
    with pytest.raises(TrainError, match="within the model's 1000 training steps"):
        UNetTask(tiny_bundle("sd1", 0), UNetTaskOptions(max_timestep=1001))
    with pytest.raises(TrainError, match="within the model's 1000 training steps"):
        UNetTask(tiny_bundle("sd1", 0), UNetTaskOptions(min_timestep=1000, max_timestep=1000))
    bundle = replace(tiny_bundle("sd1", 0), prediction=Prediction.X0)
    with pytest.raises(TrainError, match="defined for eps and v prediction; this model predicts x0"):
        UNetTask(bundle, UNetTaskOptions(debiased_estimation_loss=True))
