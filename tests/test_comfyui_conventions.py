"""A sampler named as ComfyUI spells it draws ComfyUI's picture: its KSampler's noise conventions, not sdlab's.

The reference is ComfyUI's code, transcribed below from Comfy-Org/ComfyUI (each function names its file):
``comfy/sample.py`` ``prepare_noise`` (the initial noise: the seed's first draw), ``comfy/samplers.py``
``KSAMPLER.sample`` / ``Sampler.max_denoise`` with ``comfy/model_sampling.py`` ``EPS.noise_scaling`` (the start),
``KSampler.set_steps`` (``comfy_reference.ksampler_sigmas``), ``comfy/k_diffusion/sampling.py``
``default_noise_sampler`` (the step noise: a generator seeded seed + 1 on the CPU), ``BatchedBrownianTree`` /
``BrownianTreeNoiseSampler(..., cpu=True)`` and the samplers that use them.

Two levels: the toy mixture denoiser for the pieces, and the shipped sdlab-tiny model for the whole run, where
sdlab's own guided denoiser (caught from its run) drives the transcribed KSampler, so the two runs differ only
in the conventions. Comparisons are of latents in float32 at 1e-5 (relative and absolute, on latents of size
~1; a batch against single runs at 1e-4, for batched rounding): the same operations in the same order, so any
convention change is orders of magnitude above it.
"""

from __future__ import annotations

import math

import pytest
import torch
import torchsde

import sdlab
from sdlab.diffusion.brownian import BrownianTreeNoise
from sdlab.diffusion.samplers import get_sampler
from sdlab.pipeline import generate as G

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# -- ComfyUI, transcribed ----------------------------------------------------------------------------------------
class BatchedBrownianTree:
    """comfy/k_diffusion/sampling.py ``BatchedBrownianTree`` (an int seed: one tree for the batch)."""

    def __init__(self, x, t0, t1, seed=None, **kwargs):
        self.cpu_tree = kwargs.pop("cpu", True)
        t0, t1, self.sign = self.sort(t0, t1)
        w0 = kwargs.pop('w0', None)
        if w0 is None:
            w0 = torch.zeros_like(x)
        self.batched = False
        if isinstance(seed, (tuple, list)):
            self.batched = True
            w0 = w0[0]
        else:
            seed = (seed,)
        if self.cpu_tree:
            t0, w0, t1 = t0.detach().cpu(), w0.detach().cpu(), t1.detach().cpu()
        self.trees = tuple(torchsde.BrownianTree(t0, w0, t1, entropy=s, **kwargs) for s in seed)

    @staticmethod
    def sort(a, b):
        return (a, b, 1) if a < b else (b, a, -1)

    def __call__(self, t0, t1):
        t0, t1, sign = self.sort(t0, t1)
        device, dtype = t0.device, t0.dtype
        if self.cpu_tree:
            t0, t1 = t0.detach().cpu().float(), t1.detach().cpu().float()
        w = torch.stack([tree(t0, t1) for tree in self.trees]).to(device=device, dtype=dtype) * (self.sign * sign)
        return w if self.batched else w[0]


class BrownianTreeNoiseSampler:
    """comfy/k_diffusion/sampling.py ``BrownianTreeNoiseSampler`` (identity transform)."""

    def __init__(self, x, sigma_min, sigma_max, seed=None, cpu=False):
        t0, t1 = torch.as_tensor(sigma_min), torch.as_tensor(sigma_max)
        self.tree = BatchedBrownianTree(x, t0, t1, seed, cpu=cpu)

    def __call__(self, sigma, sigma_next):
        t0, t1 = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        return self.tree(t0, t1) / (t1 - t0).abs().sqrt()


def prepare_noise(latent_image, seed):
    """comfy/sample.py ``prepare_noise`` (no batch_index): the seed's first draw, the whole batch at once."""
    generator = torch.manual_seed(seed)
    return torch.randn(latent_image.size(), dtype=latent_image.dtype, layout=latent_image.layout, generator=generator,
                       device="cpu")


def max_denoise(model_sigma_max, sigmas):
    """comfy/samplers.py ``Sampler.max_denoise``."""
    max_sigma = float(model_sigma_max)
    sigma = float(sigmas[0])
    return math.isclose(max_sigma, sigma, rel_tol=1e-05) or sigma > max_sigma


def ksampler(sampler_function, model, sigmas, seed, latent_image, model_sigma_max):
    """comfy/samplers.py ``KSAMPLER.sample`` as ``nodes.common_ksampler`` calls it (no mask): the noise of
    ``prepare_noise``, scaled by ``noise_scaling`` (with ``max_denoise``) and added to the latent, then the sampler
    with the seed in its extra_args."""
    noise = prepare_noise(latent_image, seed)
    x = eps_noise_scaling(sigmas[0], noise, latent_image.clone(), max_denoise(model_sigma_max, sigmas))
    return sampler_function(model, x, sigmas, extra_args={"seed": seed})


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None):
    """comfy/k_diffusion/sampling.py ``sample_euler`` (no churn, ComfyUI's KSampler default)."""
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


def default_noise_sampler(x, seed=None):
    """comfy/k_diffusion/sampling.py ``default_noise_sampler``: a generator of its own, seeded seed + 1 on the CPU
    (the seed itself on a GPU, whose numbers no CPU draws)."""
    if seed is not None:
        if x.device == torch.device("cpu"):
            seed += 1
        generator = torch.Generator(device=x.device)
        generator.manual_seed(seed)
    else:
        generator = None
    return lambda sigma, sigma_next: torch.randn(x.size(), dtype=x.dtype, layout=x.layout, device=x.device,
                                                 generator=generator)


def eps_noise_scaling(sigma, noise, latent_image, max_denoise=False):
    """comfy/model_sampling.py ``EPS.noise_scaling`` (V_PREDICTION inherits it)."""
    if max_denoise:
        noise = noise * torch.sqrt(1.0 + sigma ** 2.0)
    else:
        noise = noise * sigma
    noise += latent_image
    return noise


@torch.no_grad()
def sample_lcm(model, x, sigmas, extra_args=None, noise_sampler=None):
    """comfy/k_diffusion/sampling.py ``sample_lcm`` (s_noise 1, no noise clip): the denoiser's x0, re-noised."""
    extra_args = {} if extra_args is None else extra_args
    seed = extra_args.get("seed", None)
    noise_sampler = default_noise_sampler(x, seed=seed) if noise_sampler is None else noise_sampler
    s_in = x.new_ones([x.shape[0]])
    for i in range(max(1, len(sigmas) - 1)):
        denoised = model(x, sigmas[i] * s_in)
        x = denoised
        if sigmas[i + 1] > 0:
            noise = noise_sampler(sigmas[i], sigmas[i + 1])
            x = eps_noise_scaling(sigmas[i + 1], noise, x)
    return x


def get_ancestral_step(sigma_from, sigma_to, eta=1.):
    """comfy/k_diffusion/sampling.py ``get_ancestral_step``."""
    if not eta:
        return sigma_to, 0.
    sigma_up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
    return sigma_down, sigma_up


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, extra_args=None, eta=1., s_noise=1., noise_sampler=None):
    """comfy/k_diffusion/sampling.py ``sample_euler_ancestral`` (its EPS / V branch: not a CONST model)."""
    extra_args = {} if extra_args is None else extra_args
    seed = extra_args.get("seed", None)
    noise_sampler = default_noise_sampler(x, seed=seed) if noise_sampler is None else noise_sampler
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        if sigma_down == 0:
            x = denoised
        else:
            d = (x - denoised) / sigmas[i]
            dt = sigma_down - sigmas[i]
            x = x + d * dt + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def mixture_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The exact denoiser of data 0.5 N(-1, 0.3^2) + 0.5 N(1, 0.3^2) per element (nonlinear in x)."""
    s2 = sigma.reshape(-1, 1, 1, 1).to(x.dtype) ** 2
    means = torch.tensor([-1.0, 1.0], dtype=x.dtype).reshape(2, 1, 1, 1, 1)
    weights = torch.softmax(-((x - means) ** 2) / (2 * (0.09 + s2)), dim=0)           # (2, B, C, h, w)
    return (weights * (means * s2 + x * 0.09) / (0.09 + s2)).sum(0)


def unit_noise(seed: int, like: torch.Tensor):
    """Unit Gaussian noise from a generator of its own, one draw per call."""
    generator = torch.Generator().manual_seed(seed)
    return lambda sigma, sigma_next: torch.randn(like.shape, generator=generator, dtype=like.dtype)


# -- sdlab's run on the shipped sdlab-tiny, caught at its sampler ------------------------------------------------
PROMPT = "a red apple on a light blue background"
SEED = 1


@pytest.fixture(scope="module")
def tiny():
    return sdlab.load()                                  # the shipped sdlab-tiny: v-prediction, SD's schedule, 64 px


def sdlab_run(monkeypatch, pipe, mode: str = "txt2img", *args, **options) -> dict:
    """Run `pipe.<mode>` and catch what its sampler got: the guided denoiser, the start x, the sigmas, every noise
    draw the sampler made (in order) and the latent it returned."""
    caught: dict = {}
    real = G._run_sampler

    def spy(plan, model, x, sigmas, sampler_options, progress):
        draws = []
        noise = sampler_options.get("noise")
        if noise is not None:
            def recorded(sigma, sigma_next):
                draws.append(noise(sigma, sigma_next))
                return draws[-1]
            sampler_options = {**sampler_options, "noise": recorded}
        out = real(plan, model, x, sigmas, sampler_options, progress)
        caught.update(model=model, x=x.clone(), sigmas=sigmas.clone(), draws=draws, out=out.clone(), plan=plan)
        return out

    monkeypatch.setattr(G, "_run_sampler", spy)
    getattr(pipe, mode)(PROMPT, *args, **{"seed": SEED, "cfg_scale": 5.0, **options})
    return caught


def replayed(draws: list):
    """A noise source giving `draws` back in order."""
    it = iter(draws)
    return lambda sigma, sigma_next: next(it)


def assert_same_latents(ours: torch.Tensor, reference: torch.Tensor) -> None:
    assert ours.abs().max() > 0.1, "an empty latent would prove nothing"
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


# -- lcm: ComfyUI's sample_lcm, without LCMScheduler's boundary scalings --------------------------------------------
@pytest.mark.parametrize("schedule", ["karras", "normal", "exponential"])
def test_comfyuis_lcm_takes_the_denoisers_estimate(schedule):
    """ComfyUI's `lcm` (comfy/k_diffusion/sampling.py sample_lcm) steps x = denoised, re-noised to the next sigma:
    the consistency scalings c_skip / c_out of diffusers' LCMScheduler (and A1111's "LCM") are not applied, which on
    schedules ending at sigma_min (t = 0, c_out = 0) would return the noisy sample. "LCM" keeps them."""
    from sdlab.diffusion.discretization import discretize
    from sdlab.diffusion.schedules import NoiseSchedule

    schedule_table = NoiseSchedule.sd()
    sigmas = discretize(schedule, schedule_table, 8)
    x = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(3)) * sigmas[0]
    comfy, a1111 = get_sampler("lcm"), get_sampler("LCM")
    assert not comfy.wants_sigma_to_t and a1111.wants_sigma_to_t    # what the loop passes the row (_sampler_options)
    ours = comfy.fn(mixture_denoiser, x.clone(), sigmas, noise=unit_noise(7, x))
    reference = sample_lcm(mixture_denoiser, x.clone(), sigmas, noise_sampler=unit_noise(7, x))
    assert_same_latents(ours, reference)
    scaled = a1111.fn(mixture_denoiser, x.clone(), sigmas, noise=unit_noise(7, x), sigma_to_t=schedule_table.sigma_to_t)
    assert (scaled - reference).abs().max() > 1e-3


@pytest.mark.parametrize("schedule", ["karras", "sgm_uniform"])
def test_comfyuis_lcm_on_the_tiny_model(monkeypatch, tiny, schedule):
    """The shipped model, 8 steps at CFG 1: sdlab's `lcm` run is ComfyUI's sample_lcm on its denoiser, its start and
    its noise draws (the step scalings alone; the noise conventions are tested below). Before, karras ended 5/255
    (max) off ComfyUI's picture."""
    run = sdlab_run(monkeypatch, tiny, sampler="lcm", schedule=schedule, steps=8, cfg_scale=1.0)
    reference = sample_lcm(run["model"], run["x"].clone(), run["sigmas"], noise_sampler=replayed(run["draws"]))
    assert_same_latents(run["out"], reference)


# -- the start: ComfyUI's noise_scaling with max_denoise ------------------------------------------------------------
@pytest.mark.parametrize("schedule, denoise", [("karras", None), ("normal", None), ("ddim_uniform", None),
                                               ("karras", 0.6), ("simple", 1.0)])
def test_the_start_is_comfyuis_noise_scaling(schedule, denoise):
    """ComfyUI's KSAMPLER.sample starts from noise * sqrt(1 + sigma^2) + latent where sigmas[0] is the model's
    sigma_max (Sampler.max_denoise; denoise 1 with an init latent too), else noise * sigma + latent (ddim_uniform's
    first sigma, 14.37 at 20 steps, lies below 14.61; img2img below denoise 1). sdlab's "comfyui" convention."""
    import comfy_reference as C
    from sdlab.diffusion.model_sampling import DiscreteModelSampling
    from sdlab.diffusion.schedules import NoiseSchedule

    sampling = DiscreteModelSampling(NoiseSchedule.sd(), "v")
    sigmas = C.ksampler_sigmas(C.ModelSamplingDiscrete(), "euler", schedule, 20, denoise)
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(2))
    latent = torch.zeros_like(noise) if denoise is None else torch.randn(noise.shape, generator=torch.Generator())
    reference = eps_noise_scaling(sigmas[0], noise, latent.clone(), max_denoise(sampling.sigma_max, sigmas))
    ours = sampling.noise_scaling(sigmas[0], noise, None if denoise is None else latent, init_noise="comfyui")
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)


def test_comfyui_names_take_comfyuis_start_by_default():
    """The rule resolve applies: a ComfyUI spelling on a non-diffusers schedule starts by ComfyUI's rule; an A1111
    spelling at sigma_max; a diffusers spacing as its diffusers scheduler, whatever the spelling."""
    from sdlab.pipeline.request import GenerationRequest, resolve

    def init_noise(sampler, schedule):
        request = GenerationRequest("x", sampler=sampler, schedule=schedule, seed=1)
        return resolve(request, default_size=64, default_sampler="dpmpp_2m", default_schedule="karras",
                       factor=8).init_noise

    assert [init_noise("euler", "karras"), init_noise("Euler", "karras"), init_noise(None, "karras")] == \
        ["comfyui", "sigma_max", "sigma_max"]
    assert init_noise("euler", "leading") == init_noise("Euler", "leading") == "vp"


@pytest.mark.parametrize("schedule", ["karras", "ddim_uniform"])
def test_comfyuis_txt2img_on_the_tiny_model(monkeypatch, tiny, schedule):
    """`euler` on the shipped model, 20 steps at CFG 5: ComfyUI's whole KSampler (prepare_noise, noise_scaling
    with max_denoise, sample_euler) on sdlab's denoiser gives sdlab's latents. Before, sdlab started karras at
    noise * sigma_max: 1/255 max off ComfyUI's picture (the factor is 1.0023)."""
    run = sdlab_run(monkeypatch, tiny, sampler="euler", schedule=schedule, steps=20)
    reference = ksampler(sample_euler, run["model"], run["sigmas"], SEED, torch.zeros_like(run["x"]),
                         tiny.bundle.model_sampling.sigma_max)
    assert_same_latents(run["out"], reference)


# -- img2img: ComfyUI's denoise -----------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler, schedule, denoise", [("euler", "karras", 0.6), ("euler_ancestral", "normal", 0.5),
                                                         ("euler", "sgm_uniform", 0.75)])
def test_comfyuis_img2img_on_the_tiny_model(monkeypatch, tiny, sampler, schedule, denoise):
    """img2img with a ComfyUI name is ComfyUI's KSampler at `denoise`: all 20 steps on the last 21 sigmas of a
    int(20 / denoise)-step schedule (KSampler.set_steps), from latent + prepare_noise's first draw * sigmas[0]
    (not max_denoise), the step noise seeded seed + 1. The latent is the init picture's posterior mean: ComfyUI's
    VAE encode samples the posterior from torch's global state (DiagonalGaussianRegularizer(sample=True),
    DiagonalGaussianDistribution.sample), which no seed reproduces. Before, sdlab ran int(20 * denoise) steps of
    the 20-step schedule from its seed's second draw: 145/255 max off ComfyUI's picture (euler, karras, 0.6)."""
    import comfy_reference as C
    from bundle_fixtures import init_picture

    init = init_picture(64)
    run = sdlab_run(monkeypatch, tiny, "img2img", init, denoise, sampler=sampler, schedule=schedule, steps=20)
    sigmas = C.ksampler_sigmas(C.ModelSamplingDiscrete(), sampler, schedule, 20, denoise)
    torch.testing.assert_close(run["sigmas"], sigmas, rtol=2e-6, atol=0)
    latent = G.encode_image(tiny.bundle, G.pil_to_tensor(init))                  # (1, 4, h, w): the posterior mean
    sampler_function = {"euler": sample_euler, "euler_ancestral": sample_euler_ancestral}[sampler]
    reference = ksampler(sampler_function, run["model"], sigmas, SEED, latent, tiny.bundle.model_sampling.sigma_max)
    assert_same_latents(run["out"], reference)


def test_comfyui_names_take_comfyuis_denoise_rule():
    """resolve gives a ComfyUI spelling ComfyUI's step rule for img2img ("comfyui"), an A1111 spelling diffusers',
    and keeps A1111's when it is asked for (its API does)."""
    from PIL import Image

    from sdlab.pipeline.request import GenerationRequest, resolve

    def convention(sampler, **options):
        request = GenerationRequest("x", sampler=sampler, init_image=Image.new("RGB", (64, 64)), seed=1, **options)
        return resolve(request, default_size=64, default_sampler="dpmpp_2m", default_schedule="karras",
                       factor=8).img2img_convention

    assert [convention("dpmpp_2m"), convention("DPM++ 2M"), convention(None)] == ["comfyui", "diffusers", "diffusers"]
    assert convention("dpmpp_2m", img2img_convention="a1111") == "a1111"


def test_the_servers_progress_counts_comfyuis_denoise_steps(tiny):
    """The server counts a job's steps (progress, step events) from its resolved plan: a ComfyUI-named img2img
    job runs all its steps (ComfyUI's denoise), an A1111-named one diffusers' int(steps * strength)."""
    from PIL import Image

    from sdlab.pipeline.request import GenerationRequest
    from sdlab.server.jobs import pass_steps

    def steps(sampler):
        return pass_steps(tiny.resolve(GenerationRequest("x", sampler=sampler, steps=20, strength=0.5,
                                                         init_image=Image.new("RGB", (64, 64)))))

    assert (steps("euler"), steps("Euler"), steps(None)) == ((20,), (10,), (10,))


def test_comfyuis_inpainting_start_on_the_tiny_model(monkeypatch, tiny):
    """Inpainting at denoise 1 with a ComfyUI name starts as ComfyUI's KSampler does: the init latent (its posterior
    mean) plus the seed's first draw * sqrt(1 + sigma_max^2), not from pure noise as diffusers' pipelines."""
    from bundle_fixtures import init_picture, lower_right_mask

    init = init_picture(64)
    run = sdlab_run(monkeypatch, tiny, "inpaint", init, lower_right_mask(64), sampler="euler", schedule="karras",
                    steps=4, strength=1.0)
    latent = G.encode_image(tiny.bundle, G.pil_to_tensor(init))
    noise = prepare_noise(latent, SEED)
    expected = eps_noise_scaling(run["sigmas"][0], noise, latent.clone(), max_denoise=True)
    torch.testing.assert_close(run["x"], expected, rtol=1e-5, atol=1e-5)


# -- step noise: ComfyUI's default_noise_sampler, a CPU generator seeded seed + 1 ----------------------------------
def test_comfyuis_ancestral_step_noise_on_the_tiny_model(monkeypatch, tiny):
    """`euler_ancestral` on the shipped model, 20 karras steps at CFG 5: from sdlab's start, ComfyUI's
    sample_euler_ancestral with its step noise (extra_args seed: default_noise_sampler, seed + 1 on the CPU) gives
    sdlab's latents. Before, sdlab continued the seed's generator after the initial noise: 209/255 max off ComfyUI's
    picture (mean 5.1)."""
    run = sdlab_run(monkeypatch, tiny, sampler="euler_ancestral", schedule="karras", steps=20)
    reference = sample_euler_ancestral(run["model"], run["x"].clone(), run["sigmas"], extra_args={"seed": SEED})
    assert_same_latents(run["out"], reference)


@pytest.mark.parametrize("sampler", ["dpm_2_ancestral", "dpmpp_2s_ancestral", "ddpm", "lcm", "res_multistep_ancestral"])
def test_comfyui_spelt_samplers_draw_comfyuis_step_noise(monkeypatch, tiny, sampler):
    """Every ComfyUI sampler that takes default_noise_sampler(x, seed) draws its stream (a (B, C, h, w) draw per call
    from a generator seeded seed + 1) on the CPU; with batch 1 that is sdlab's image-0 stream, bit for bit."""
    run = sdlab_run(monkeypatch, tiny, sampler=sampler, schedule="karras", steps=4)
    comfy = default_noise_sampler(run["x"], SEED)
    assert run["draws"] and all(torch.equal(draw, comfy(None, None)) for draw in run["draws"])


def test_a_batch_is_comfyuis_one_picture_runs(monkeypatch, tiny):
    """docs/samplers.md: in a batch, image i is ComfyUI's one-picture run with seed + i (ComfyUI's own batch
    draws one tensor from the seed and one a step from seed + 1, which is none of them). sdlab's batch of 2 with
    euler_ancestral equals its runs with seeds 1 and 2 (each ComfyUI's picture, above), up to batched float
    rounding (1e-4)."""
    batch = sdlab_run(monkeypatch, tiny, sampler="euler_ancestral", schedule="karras", steps=6, batch_size=2)["out"]
    for i in range(2):
        single = sdlab_run(monkeypatch, tiny, sampler="euler_ancestral", schedule="karras", steps=6, seed=SEED + i)
        torch.testing.assert_close(batch[i:i + 1], single["out"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sampler, size", [("euler_ancestral", 64), ("euler", 64), ("ddpm", 64)])
def test_comfyui_batch_noise_is_comfyuis_batch(monkeypatch, tiny, sampler, size):
    """batch_noise "comfyui" (the ComfyUI API's graphs): a batch of 3 is ComfyUI's KSampler on a (3, 4, h, w) latent:
    prepare_noise's one draw of the batch from torch.manual_seed(seed) and, for a sampler with step noise, one
    (3, 4, h, w) draw a step from default_noise_sampler's generator (seed + 1). sdlab's latents equal ComfyUI's at
    1e-5. Before (a generator per image, seed + i) only image 0 matched."""
    run = sdlab_run(monkeypatch, tiny, sampler=sampler, schedule="karras", steps=6, batch_size=3, width=size,
                    height=size, batch_noise="comfyui")
    function = {"euler_ancestral": sample_euler_ancestral, "euler": sample_euler}.get(sampler)
    if function is None:                                    # ddpm: the caught step noise against ComfyUI's stream
        comfy = default_noise_sampler(run["x"], SEED)
        assert run["draws"] and all(torch.equal(draw, comfy(None, None)) for draw in run["draws"])
        start = ksampler(lambda model, x, sigmas, extra_args: x, run["model"], run["sigmas"], SEED,
                         torch.zeros_like(run["x"]), tiny.bundle.model_sampling.sigma_max)
        torch.testing.assert_close(run["x"], start, rtol=1e-5, atol=1e-5)
        return
    reference = ksampler(function, run["model"], run["sigmas"], SEED, torch.zeros_like(run["x"]),
                         tiny.bundle.model_sampling.sigma_max)
    assert run["x"].shape[0] == 3
    assert_same_latents(run["out"], reference)


def test_comfyui_batch_noise_draws_the_batch_as_one_tensor():
    """One generator for the batch draws it as one tensor: on a latent of 4 x 9 x 9 (a 72 px picture of a VAE of
    factor 8), no multiple of 16 numbers, torch's CPU normal gives other numbers for three draws of one image than
    for one draw of three; sdlab's start and step noise are ComfyUI's prepare_noise / default_noise_sampler bit for
    bit."""
    from sdlab.diffusion.noise import first_noise, generators_for, per_image_noise

    like = torch.zeros((3, 4, 9, 9))
    generators = generators_for([SEED, SEED + 1, SEED + 2], batch_noise="comfyui")
    start = first_noise(generators, like, [SEED] * 3, [0] * 3, 0.0)
    assert torch.equal(start, prepare_noise(like, SEED))
    ours = per_image_noise(generators_for([SEED + 1] * 3, batch_noise="comfyui"), like)
    comfy = default_noise_sampler(like, SEED)
    assert all(torch.equal(ours(None, None), comfy(None, None)) for _ in range(3))


def test_comfyui_batch_noise_draws_no_other_request_unknown():
    """An unknown batch_noise is refused at resolve, naming the valid ones."""
    from sdlab.pipeline.request import GenerationRequest, RequestError, resolve

    with pytest.raises(RequestError, match="unknown batch noise 'one'; valid: per_image, comfyui"):
        resolve(GenerationRequest("x", seed=1, batch_noise="one"), default_size=64, default_sampler="Euler",
                default_schedule="karras", factor=8)


def test_a1111_names_keep_the_seeds_stream(monkeypatch, tiny):
    """"Euler a" (A1111's spelling) keeps A1111's and diffusers' rule: the step noise continues the seed's generator
    after the initial noise."""
    run = sdlab_run(monkeypatch, tiny, sampler="Euler a", schedule="karras", steps=4)
    generator = torch.Generator().manual_seed(SEED)
    assert torch.equal(torch.randn(run["x"].shape, generator=generator) * run["sigmas"][0], run["x"])
    assert all(torch.equal(draw, torch.randn(draw.shape, generator=generator)) for draw in run["draws"])


def test_an_ensd_of_0_turns_comfyuis_step_noise_off(monkeypatch, tiny):
    """ENSD 0 given with a ComfyUI spelling is kept: the step noise continues the seed's generator, as with no
    ENSD under A1111's names (before, 0 read as unset and became 1)."""
    run = sdlab_run(monkeypatch, tiny, sampler="euler_ancestral", schedule="karras", steps=4, eta_noise_seed_delta=0)
    assert run["plan"].request.eta_noise_seed_delta == 0 and run["draws"]
    generator = torch.Generator().manual_seed(SEED)
    torch.randn(run["x"].shape, generator=generator)                                  # the initial noise
    assert all(torch.equal(draw, torch.randn(draw.shape, generator=generator)) for draw in run["draws"])


@pytest.mark.parametrize("sampler, eta, ensd", [
    ("euler_ancestral", None, 1), ("euler_ancestral", 0.0, 0), ("dpm_adaptive", None, 0), ("dpm_adaptive", 1.0, 1),
    ("res_multistep", None, 0), ("res_multistep_ancestral", None, 1), ("er_sde", None, 1), ("euler", None, 0),
    ("dpmpp_2m_sde", None, 0), ("Euler a", None, 0),
])
def test_comfyuis_ensd_of_1_goes_with_the_samplers_that_draw_step_noise(sampler, eta, ensd):
    """An unset ENSD resolves to 1 only for a ComfyUI spelling that draws Gaussian step noise at its eta (not a
    deterministic one, an eta of 0, or a Brownian tree, which the seeds seed)."""
    from sdlab.pipeline.request import GenerationRequest, resolve

    request = GenerationRequest("x", sampler=sampler, eta=eta, seed=1)
    resolved = resolve(request, default_size=64, default_sampler="Euler", default_schedule="karras", factor=8)
    assert resolved.eta_noise_seed_delta == ensd


@pytest.mark.parametrize("sampler, ensd, label", [
    ("euler_ancestral", None, 1), ("euler_ancestral", 0, None), ("euler_ancestral", 7, 7), ("er_sde", 0, 0),
    ("er_sde", None, 1), ("dpm_adaptive", None, None), ("res_multistep", None, None), ("Euler", 31337, None),
    ("Euler a", 31337, 31337),
])
def test_the_ensd_is_recorded_where_it_draws_and_read_back_to_the_same_picture(tiny, sampler, ensd, label):
    """The infotext's ENSD: where the sampler draws Gaussian step noise (A1111's is_sampler_using_eta_noise_seed_delta),
    unless it is 0 under an A1111 name (a ComfyUI-spelt sampler is recorded under its A1111 name where it has one);
    --from-png (`from_parameters`) reads it back to the same picture."""
    from sdlab.pipeline.infotext import from_parameters, to_parameters
    from sdlab.pipeline.png_info import format_parameters, parse_parameters

    given = {} if ensd is None else {"eta_noise_seed_delta": ensd}
    result = tiny.txt2img(PROMPT, sampler=sampler, steps=3, seed=SEED, width=64, height=64, **given)
    parameters = to_parameters(result.request)
    assert parameters.get("ENSD") == label
    again = tiny.txt2img(**from_parameters(parse_parameters(format_parameters(parameters))))
    assert all(a.tobytes() == b.tobytes() for a, b in zip(result.images, again.images))


def test_a_comfyui_spelling_encodes_an_empty_sdxl_negative_and_records_it():
    """ComfyUI's CLIPTextEncode encodes "" as any text (nodes.py: `clip.tokenize(text)`, then
    `encode_from_tokens`); it zeros a conditioning only in its ConditioningZeroOut node. So a ComfyUI spelling
    draws an SDXL picture with an empty negative from the encoded "" (the picture of a model whose rule is to
    encode it), where A1111's zeros, which `zero_empty_negative=True` asks for, draw another; the rule is
    recorded (`Empty negative: encoded`) and read back to the same picture."""
    from dataclasses import replace

    from bundle_fixtures import tiny_bundle
    from sdlab.api import Pipeline
    from sdlab.pipeline.infotext import from_parameters, to_parameters
    from sdlab.pipeline.png_info import format_parameters, parse_parameters

    bundle = tiny_bundle("sdxl", seed=11)
    pipe = Pipeline(bundle)
    run = dict(prompt="a cat", negative_prompt="", sampler="euler", schedule="normal", steps=3, seed=SEED, width=64,
               height=64, cfg_scale=7.0)
    comfy = pipe.txt2img(**run)
    # the A1111 name with the spelling's other conventions, on a model whose own rule encodes ""
    encoding = Pipeline(replace(bundle, zero_empty_negative=False)).txt2img(**{**run, "sampler": "Euler"},
                                                                            init_noise="comfyui")
    zeros = pipe.txt2img(**run, zero_empty_negative=True)
    assert comfy.request.zero_empty_negative is False
    assert comfy.images[0].tobytes() == encoding.images[0].tobytes() != zeros.images[0].tobytes()
    parameters = to_parameters(comfy.request)
    assert parameters["Sampler"] == "Euler" and parameters["Empty negative"] == "encoded"
    again = pipe.txt2img(**from_parameters(parse_parameters(format_parameters(parameters))))
    assert again.images[0].tobytes() == comfy.images[0].tobytes()


@pytest.mark.parametrize("options, label", [(dict(sampler="euler_ancestral"), None),
                                            (dict(sampler="Euler a", zero_empty_negative=False), None),
                                            (dict(sampler="euler_ancestral", zero_empty_negative=True), "zeros")])
def test_an_empty_negative_is_recorded_only_where_its_rule_is_not_the_familys(tiny, options, label):
    """A family that encodes an empty negative (SD1, SD2, sdlab-tiny: only SDXL's zero it, and a model of another
    family never changes that) draws the same picture under a ComfyUI spelling's "encoded" as under its own rule,
    so no `Empty negative` is written there; zeros, which change the picture, are; the text redraws the picture."""
    from sdlab.pipeline.infotext import from_parameters, to_parameters
    from sdlab.pipeline.png_info import format_parameters, parse_parameters

    run = dict(steps=3, seed=SEED, width=64, height=64, **options)
    drawn = tiny.txt2img(PROMPT, "", **run)
    plain = tiny.txt2img(PROMPT, "", **{**run, "zero_empty_negative": None})
    parameters = to_parameters(drawn.request)
    assert parameters.get("Empty negative") == label
    assert (drawn.images[0].tobytes() == plain.images[0].tobytes()) is (label is None)
    again = tiny.txt2img(**from_parameters(parse_parameters(format_parameters(parameters))))
    assert again.images[0].tobytes() == drawn.images[0].tobytes()


# -- the SDE samplers' Brownian tree ------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:Should have tb<=t1")   # ComfyUI queries its float32 sigma_max past the tree
def test_brownian_trees_are_cpu_trees_moved_to_the_latents_device(monkeypatch):
    """ComfyUI's plain SDE names (sample_dpmpp_sde, sample_dpmpp_2m_sde, sample_dpmpp_3m_sde) build their tree with
    ``cpu=True`` and move each increment to the latent's device, so a seed draws one picture on every device (a
    tree on a GPU draws from that device's generator: its ``_gpu`` names). sdlab's trees are built on the CPU
    whatever the latent's device: a latent on the "meta" device (any device but the CPU, without values) gets
    trees on the CPU and increments on its own device; on the CPU the increments are ComfyUI's at batch 1."""
    built_on = []

    def recording(*args, **kwargs):
        built_on.append(torch.device(kwargs["device"]))
        return real(*args, **kwargs)

    real = torchsde.BrownianInterval
    monkeypatch.setattr(torchsde, "BrownianInterval", recording)
    sigmas = torch.tensor([14.6146, 6.0, 1.5, 0.3, 0.0292, 0.0])
    meta = BrownianTreeNoise.for_sigmas(torch.empty((2, 4, 8, 8), device="meta"), sigmas, [5, 6])
    increment = meta(sigmas[0], sigmas[1])
    assert built_on == [torch.device("cpu")] * 2 and increment.device.type == "meta" and increment.shape == (2, 4, 8, 8)

    like = torch.zeros((1, 4, 8, 8))
    ours = BrownianTreeNoise.for_sigmas(like, sigmas, [5])
    comfy = BrownianTreeNoiseSampler(like, sigmas[sigmas > 0].min(), sigmas.max(), seed=5, cpu=True)
    for sigma, sigma_next in zip(sigmas[:-2], sigmas[1:-1]):
        torch.testing.assert_close(ours(sigma, sigma_next), comfy(sigma, sigma_next), rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:Should have tb<=t1")
def test_comfyui_batch_noise_is_one_brownian_tree_for_the_batch():
    """batch_noise "comfyui": ComfyUI's BatchedBrownianTree with an int seed is one tree of the whole (B, C, h, w);
    sdlab's increments equal it at 1e-5 for a batch of 3 (per image, image 0 alone matches nothing of it)."""
    sigmas = torch.tensor([14.6146, 6.0, 1.5, 0.3, 0.0292, 0.0])
    like = torch.zeros((3, 4, 9, 9))
    ours = BrownianTreeNoise.for_sigmas(like, sigmas, [5, 6, 7], batch_noise="comfyui")
    comfy = BrownianTreeNoiseSampler(like, sigmas[sigmas > 0].min(), sigmas.max(), seed=5, cpu=True)
    for sigma, sigma_next in zip(sigmas[:-2], sigmas[1:-1]):
        torch.testing.assert_close(ours(sigma, sigma_next), comfy(sigma, sigma_next), rtol=1e-5, atol=1e-5)


# -- inpainting: SetLatentNoiseMask's noise mask, KSamplerX0Inpaint's blend ---------------------------------------
def prepare_mask(noise_mask, shape):
    """comfy/sampler_helpers.py ``prepare_mask`` (comfyanonymous/ComfyUI 75e5d3d): the mask resized bilinearly to the
    latent, one copy per channel."""
    noise_mask = torch.nn.functional.interpolate(noise_mask.reshape((-1, 1, noise_mask.shape[-2],
                                                                     noise_mask.shape[-1])),
                                                 size=(shape[2], shape[3]), mode="bilinear")
    return torch.cat([noise_mask] * shape[1], dim=1)


class KSamplerX0Inpaint:
    """comfy/samplers.py ``KSamplerX0Inpaint.__call__`` (comfyanonymous/ComfyUI 002aefa / 75e5d3d; no
    denoise_mask_function): the kept region of x set to the init latent noised to sigma with the start noise, the
    kept region of the model's x0 set to the init latent."""

    def __init__(self, inner_model, latent_image, noise, denoise_mask):
        self.inner_model, self.latent_image, self.noise, self.denoise_mask = (inner_model, latent_image, noise,
                                                                              denoise_mask)

    def __call__(self, x, sigma):
        latent_mask = 1. - self.denoise_mask
        x = x * self.denoise_mask + eps_noise_scaling(sigma.reshape([sigma.shape[0]] + [1] * (self.noise.ndim - 1)),
                                                      self.noise, self.latent_image.clone()) * latent_mask
        out = self.inner_model(x, sigma)
        return out * self.denoise_mask + self.latent_image * latent_mask


def comfyui_noise_mask_picture(size: int = 64):
    """LoadImage's MASK of an RGBA picture (1 - alpha) as an "L" mask (255 - alpha): a fully transparent rectangle
    whose edges lie off the 8-pixel grid, and a half transparent band (alpha 100)."""
    import numpy as np
    from PIL import Image

    alpha = np.full((size, size), 255, dtype=np.uint8)
    alpha[13:45, 21:50] = 0
    alpha[50:59, 5:30] = 100
    return Image.fromarray(255 - alpha), torch.from_numpy(1.0 - alpha.astype(np.float32) / 255.0)


@pytest.mark.parametrize("sampler, schedule, denoise", [("euler", "karras", 1.0), ("euler_ancestral", "normal", 0.7)])
def test_comfyuis_set_latent_noise_mask_on_the_tiny_model(monkeypatch, tiny, sampler, schedule, denoise):
    """Inpainting with a ComfyUI name, mask_round off and no paste back is ComfyUI's VAEEncode -> SetLatentNoiseMask
    -> KSampler: the noise mask resized bilinearly to the latent (soft where an edge crosses a cell: prepare_mask),
    KSamplerX0Inpaint around the guided denoiser at every call, the sampler's latent returned as it is. Before,
    sdlab shrank the mask with nearest neighbour and pasted the init latent again after the last step."""
    import comfy_reference as C
    from bundle_fixtures import init_picture

    inner_models: list = []
    real_masked = G.masked

    def recording_masked(inner, *args, **kwargs):
        inner_models.append(inner)
        return real_masked(inner, *args, **kwargs)

    kept: list = []
    real_keep_known = G._keep_known
    monkeypatch.setattr(G, "masked", recording_masked)
    monkeypatch.setattr(G, "_keep_known", lambda *args: kept.append(real_keep_known(*args)) or kept[-1])
    init = init_picture(64)
    mask_picture, mask = comfyui_noise_mask_picture(64)
    run = sdlab_run(monkeypatch, tiny, "inpaint", init, mask_picture, sampler=sampler, schedule=schedule, steps=12,
                    strength=denoise, mask_round=False, paste_back=False)
    sigmas = C.ksampler_sigmas(C.ModelSamplingDiscrete(), sampler, schedule, 12, None if denoise == 1 else denoise)
    torch.testing.assert_close(run["sigmas"], sigmas, rtol=2e-6, atol=0)
    latent = G.encode_image(tiny.bundle, G.pil_to_tensor(init))                  # (1, 4, h, w): the posterior mean
    denoise_mask = prepare_mask(mask, latent.shape)                             # (1, 4, h, w)
    assert ((denoise_mask > 0) & (denoise_mask < 1)).any(), "a mask on the latent grid would not tell the rules apart"
    noise = prepare_noise(latent, SEED)
    model_k = KSamplerX0Inpaint(inner_models[-1], latent, noise, denoise_mask)
    x = eps_noise_scaling(sigmas[0], noise, latent.clone(), max_denoise(tiny.bundle.model_sampling.sigma_max, sigmas))
    if sampler == "euler":
        reference = sample_euler(model_k, x, sigmas)
    else:
        reference = sample_euler_ancestral(model_k, x, sigmas, noise_sampler=replayed(run["draws"]))
    assert_same_latents(kept[-1], reference)
