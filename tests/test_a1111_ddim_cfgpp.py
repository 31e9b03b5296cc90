"""A1111 1.10's "DDIM CFG++" (alias `ddim_cfgpp`): its DDIM step with the direction along the unguided eps and its
guidance at CFG / 12.5, on A1111's timesteps as its DDIM (`samplers.runs_a1111_timesteps`).

The reference is AUTOMATIC1111/stable-diffusion-webui 1.10, transcribed below without progress bars and callbacks:
- modules/sd_samplers_timesteps_impl.py `ddim_cfgpp` (its `k_diffusion.sampling.torch.randn_like`, A1111's
  per-image RNG, is the `randn_like` argument);
- modules/sd_samplers_cfg_denoiser.py `CFGDenoiser.forward` / `combine_denoised`: the rows it runs (each picture's
  prompt parts, then the negatives), `last_noise_uncond` kept where `need_last_noise_uncond`, the combination at
  `cond_scale * self.cond_scale_miltiplier` (1 / 12.5, which `ddim_cfgpp` sets); CFGDenoiserTimesteps' inner
  model is the U-Net's eps (v turned to eps by `CompVisTimestepsVDenoiser`);
- modules/sd_samplers_timesteps.py: the row ('DDIM CFG++', ddim_cfgpp, ['ddim_cfgpp'], {}), `get_timesteps`
  (test_a1111_timestep_samplers.get_timesteps) and `CompVisSampler`'s eta (`eta_ddim`, written `Eta DDIM`).
Tolerance: the same VP latent within 1e-5 (float32), relative to the latents' scale on the tiny SD1.
"""

from __future__ import annotations

import json
import math
import types
from dataclasses import replace

import numpy as np
import pytest
import torch

from bundle_fixtures import init_picture, tiny_bundle
from server_fixtures import sdlab_server  # noqa: F401  (a session fixture)
from sampler_harness import context, noise_for, sd_schedule, tiny_unet
from test_a1111_timestep_samplers import get_timesteps, img2img_start, setup_img2img_steps, v_model
from sdlab.diffusion.denoiser import Denoiser
from sdlab.diffusion.guidance import cfg
from sdlab.diffusion.model_sampling import DiscreteModelSampling
from sdlab.diffusion.noise import generators_for
from sdlab.diffusion.samplers import (
    A1111_TIMESTEP_SCHEDULE, a1111_run, a1111_schedule, comfyui_spelling, get_sampler, runs_a1111_timesteps,
)
from sdlab.diffusion.sampling_ldm import to_ddpm_latent
from sdlab.pipeline.conditioning import encode_prompt
from sdlab.pipeline.generate import _start, sample_latents
from sdlab.pipeline.plan import make_plan, request_sigmas
from sdlab.pipeline.request import GenerationRequest

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TOLERANCE = 1e-5
SCHEDULE = sd_schedule()


def _close(ours, reference) -> bool:
    """Within 1e-5 of the latents' scale (float32's rounding; the tiny SD1's random U-Net gives latents of ~40)."""
    return (ours - reference).abs().max().item() <= TOLERANCE * reference.abs().max().item()


# ---------------------------------------------------------------- A1111 1.10, transcribed

class CFGDenoiserTimesteps:
    """`CFGDenoiser.forward` for a batch whose picture i has the prompt parts `parts` [(eps_fn, weight)] (one part of
    weight 1 without AND) and the negative `uncond` (eps_fn), with the attributes `ddim_cfgpp` sets and reads, and
    Skip Early CFG (`skip_early_cond` over `total_steps` calls: the first part's rows as `fake_uncond`)."""

    def __init__(self, parts, uncond, alphas_cumprod, skip_early_cond=0.0, total_steps=1):
        self.parts, self.uncond = parts, uncond
        self.inner_model = types.SimpleNamespace(inner_model=types.SimpleNamespace(alphas_cumprod=alphas_cumprod))
        self.cond_scale_miltiplier = 1.0
        self.need_last_noise_uncond = False
        self.last_noise_uncond = None
        self.skip_early_cond, self.step, self.total_steps = skip_early_cond, 0, total_steps

    def __call__(self, x, sigma, cond_scale):
        batch, n = x.shape[0], len(self.parts)
        outs = [fn(x, sigma) for fn, _ in self.parts]
        x_out = torch.cat([torch.stack([outs[k][i] for k in range(n)]) for i in range(batch)])
        conds_list = [[(i * n + k, weight) for k, (_, weight) in enumerate(self.parts)] for i in range(batch)]
        skip_uncond = self.skip_early_cond != 0. and self.step / self.total_steps <= self.skip_early_cond
        if skip_uncond:
            denoised_image_indexes = [x[0][0] for x in conds_list]
            x_out = torch.cat([x_out, torch.cat([x_out[i:i + 1] for i in denoised_image_indexes])])
        else:
            x_out = torch.cat([x_out, self.uncond(x, sigma)])
        if self.need_last_noise_uncond:
            self.last_noise_uncond = torch.clone(x_out[-batch:])
        if skip_uncond:
            denoised = self.combine_denoised(x_out, conds_list, x_out[-batch:], 1.0)
        else:
            denoised = self.combine_denoised(x_out, conds_list, x_out[-batch:], cond_scale * self.cond_scale_miltiplier)
        self.step += 1
        return denoised

    def combine_denoised(self, x_out, conds_list, uncond, cond_scale):
        denoised_uncond = x_out[-uncond.shape[0]:]
        denoised = torch.clone(denoised_uncond)
        for i, conds in enumerate(conds_list):
            for cond_index, weight in conds:
                denoised[i] += (x_out[cond_index] - denoised_uncond[i]) * (weight * cond_scale)
        return denoised


@torch.no_grad()
def ddim_cfgpp(model, x, timesteps, extra_args=None, eta=0.0, randn_like=torch.randn_like):
    alphas_cumprod = model.inner_model.inner_model.alphas_cumprod
    alphas = alphas_cumprod[timesteps]
    alphas_prev = alphas_cumprod[torch.nn.functional.pad(timesteps[:-1], pad=(1, 0))].to(torch.float64)
    sqrt_one_minus_alphas = torch.sqrt(1 - alphas)
    sigmas = eta * np.sqrt((1 - alphas_prev.cpu().numpy()) / (1 - alphas.cpu()) * (1 - alphas.cpu() / alphas_prev.cpu().numpy()))  # noqa: E501

    model.cond_scale_miltiplier = 1 / 12.5
    model.need_last_noise_uncond = True

    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones((x.shape[0]))
    s_x = x.new_ones((x.shape[0], 1, 1, 1))
    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i

        e_t = model(x, timesteps[index].item() * s_in, **extra_args)
        last_noise_uncond = model.last_noise_uncond

        a_t = alphas[index].item() * s_x
        a_prev = alphas_prev[index].item() * s_x
        sigma_t = sigmas[index].item() * s_x
        sqrt_one_minus_at = sqrt_one_minus_alphas[index].item() * s_x

        pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
        dir_xt = (1. - a_prev - sigma_t ** 2).sqrt() * last_noise_uncond
        noise = sigma_t * randn_like(x)
        x = a_prev.sqrt() * pred_x0 + dir_xt + noise
    return x


# ---------------------------------------------------------------- the sampler on a toy eps model and a tiny U-Net

def toy_eps(z, t, *, context):
    """A toy eps model, nonlinear in z and moved by its condition (`context`: (B,) shifts) and the timestep."""
    shift = context.to(z.dtype).reshape(-1, 1, 1, 1)
    return torch.tanh(1.3 * z + shift) * 0.8 + 0.1 * z * (t.to(z.dtype).reshape(-1, 1, 1, 1) / 1000)


COND, UNCOND = torch.tensor([0.6, -0.4]), torch.tensor([-0.3, 0.2])


def _seeded_randn(seed: int):
    """A1111's step noise, `randn_like(x)`: one draw a step from one generator."""
    generator = torch.Generator().manual_seed(seed)
    return lambda like: torch.randn(like.shape, generator=generator)


def _ours(eps_net, prediction, cond, uncond, scale, steps, unit, eta=0.0, noise=None):
    """sdlab's DDIM CFG++ row on A1111's timesteps, guided at the request's CFG times its factor, as a VP latent."""
    spec = a1111_run(get_sampler("DDIM CFG++"))
    req = GenerationRequest(prompt="x", sampler="DDIM CFG++", schedule="ddim_uniform", steps=steps)
    sampling = DiscreteModelSampling(SCHEDULE, prediction)
    sigmas = request_sigmas(sampling, spec, req)
    denoiser = Denoiser(eps_net, sampling)
    model = cfg(denoiser, {"context": cond}, {"context": uncond}, scale * spec.cfg_scale_factor)
    x = unit * math.sqrt(1 + float(sigmas[0]) ** 2)
    options = {"eta": eta, "noise": noise} if eta else {}
    return to_ddpm_latent(spec.fn(model, x, sigmas, **options), sigmas[-1])


@pytest.mark.parametrize("steps, scale, eta", [(2, 7.0, 0.0), (10, 7.0, 0.0), (20, 12.5, 0.0), (20, 1.0, 0.0),
                                               (10, 3.0, 0.5), (7, 7.5, 1.0)])
@torch.no_grad()
def test_ddim_cfgpp_steps_as_a1111s_on_a_toy_model(steps, scale, eta):
    """The same VP latent within 1e-5 from the same unit noise, eta noise included (A1111's eta_ddim: one draw a
    step, sdlab's noise source in its place), at CFG 1 too (guided at 0.08 toward the prompt, not the prompt
    alone)."""
    unit, _ = noise_for((0, 1))
    draw = _seeded_randn(5)
    ours = _ours(toy_eps, "eps", COND, UNCOND, scale, steps, unit, eta, lambda sigma, sigma_next: draw(unit))
    model = CFGDenoiserTimesteps([(lambda x, t: toy_eps(x, t, context=COND), 1.0)],
                                 lambda x, t: toy_eps(x, t, context=UNCOND), SCHEDULE.alphas_cumprod)
    reference = ddim_cfgpp(model, unit, get_timesteps(steps), {"cond_scale": scale}, eta, _seeded_randn(5))
    assert _close(ours, reference)


def test_it_is_neither_ddim_nor_ddim_at_the_full_cfg():
    """Both parts matter: DDIM's step at CFG 7 and CFG++'s step at the full CFG 7 are other pictures."""
    unit, _ = noise_for((0, 1))
    ours = _ours(toy_eps, "eps", COND, UNCOND, 7.0, 10, unit)
    model = CFGDenoiserTimesteps([(lambda x, t: toy_eps(x, t, context=COND), 1.0)],
                                 lambda x, t: toy_eps(x, t, context=UNCOND), SCHEDULE.alphas_cumprod)
    full = ddim_cfgpp(model, unit, get_timesteps(10), {"cond_scale": 7.0 * 12.5})
    req = GenerationRequest(prompt="x", sampler="DDIM", schedule="ddim_uniform", steps=10)
    sampling = DiscreteModelSampling(SCHEDULE, "eps")
    sigmas = request_sigmas(sampling, get_sampler("DDIM"), req)
    ddim = to_ddpm_latent(get_sampler("DDIM").fn(cfg(Denoiser(toy_eps, sampling), {"context": COND},
                                                     {"context": UNCOND}, 7.0),
                                                 unit * math.sqrt(1 + float(sigmas[0]) ** 2), sigmas), sigmas[-1])
    assert (ours - full).abs().max().item() > 0.05 and (ours - ddim).abs().max().item() > 0.05


@pytest.fixture(scope="module")
def unet():
    return tiny_unet(0)


@pytest.mark.parametrize("prediction, steps", [("epsilon", 7), ("epsilon", 20), ("v_prediction", 7),
                                               ("v_prediction", 20)])
@torch.no_grad()
def test_ddim_cfgpp_steps_as_a1111s_on_a_tiny_unet(unet, prediction, steps):
    """The harness U-Net with two contexts (eps and v, v through A1111's `CompVisTimestepsVDenoiser`)."""
    cond, uncond = context(2, seed=7), context(2, seed=8)

    def net(x_in, t, *, context):
        return unet(x_in, t, encoder_hidden_states=context).sample

    unit, _ = noise_for((0, 1))
    ours = _ours(net, "eps" if prediction == "epsilon" else "v", cond, uncond, 7.5, steps, unit)

    def eps(ctx):
        return v_model(unet, ctx) if prediction == "v_prediction" else (lambda x, t: net(x, t, context=ctx))

    model = CFGDenoiserTimesteps([(eps(cond), 1.0)], eps(uncond), SCHEDULE.alphas_cumprod)
    reference = ddim_cfgpp(model, unit, get_timesteps(steps), {"cond_scale": 7.5})
    assert _close(ours, reference)


# ---------------------------------------------------------------- the pipeline on the tiny SD1

@pytest.fixture(scope="module")
def sd1():
    return tiny_bundle("sd1", seed=0)


def _a1111_model(bundle, parts, negative, **skip):
    """`CFGDenoiserTimesteps` on the tiny SD1's U-Net: each prompt part's eps with its weight, the negative's."""
    def eps(text):
        ctx = encode_prompt(bundle.text_encoders, text).context
        return lambda x, t: bundle.unet(x, t.float(), context=ctx.expand(x.shape[0], -1, -1))

    return CFGDenoiserTimesteps([(eps(text), weight) for text, weight in parts], eps(negative),
                                bundle.model_sampling.schedule.alphas_cumprod.float(), **skip)


@pytest.mark.parametrize("prompt, parts, skip_early", [
    ("a red cube", [("a red cube", 1.0)], 0.0),
    ("a red cube AND a blue ball :0.6", [("a red cube", 1.0), ("a blue ball", 0.6)], 0.0),
    ("a red cube", [("a red cube", 1.0)], 0.3),
])
@torch.no_grad()
def test_txt2img_draws_a1111s_ddim_cfgpp(sd1, prompt, parts, skip_early):
    """sample_latents at CFG 6 (composable diffusion too: A1111 combines every part at cond_scale / 12.5; Skip Early
    CFG: the skipped calls step along the prompt's eps, guided at 1)."""
    req = GenerationRequest(prompt=prompt, negative_prompt="blurry", sampler="DDIM CFG++", schedule="ddim_uniform",
                            steps=6, cfg_scale=6.0, seed=3, width=32, height=32, batch_size=2,
                            skip_early_cond=skip_early)
    plan = make_plan(sd1, req)
    start = _start(sd1, plan, generators_for(plan.request.seeds(), plan.request.rng, sd1.device))
    assert plan.request.init_noise == "vp"
    model = _a1111_model(sd1, parts, "blurry", skip_early_cond=skip_early, total_steps=6)
    reference = ddim_cfgpp(model, start.noise, get_timesteps(6), {"cond_scale": 6.0})
    assert _close(sample_latents(sd1, plan), reference)


@torch.no_grad()
def test_img2img_draws_a1111s_ddim_cfgpp(sd1):
    """`sample_img2img`: noised at timesteps[t_enc], sampled on timesteps[:t_enc]."""
    req = GenerationRequest(prompt="a red cube", negative_prompt="blurry", sampler="DDIM CFG++",
                            schedule="ddim_uniform", steps=10, cfg_scale=6.0, seed=3, width=32, height=32,
                            init_image=init_picture(32), strength=0.6, img2img_convention="a1111")
    plan = make_plan(sd1, req)
    start = _start(sd1, plan, generators_for(plan.request.seeds(), plan.request.rng, sd1.device))
    steps, t_enc = setup_img2img_steps(10, 0.6, False)
    timesteps = get_timesteps(steps)
    model = _a1111_model(sd1, [("a red cube", 1.0)], "blurry")
    xi = img2img_start(start.image_latent, start.noise, model.inner_model.inner_model.alphas_cumprod,
                       timesteps[t_enc])
    reference = ddim_cfgpp(model, xi, timesteps[:t_enc], {"cond_scale": 6.0})
    assert _close(sample_latents(sd1, plan), reference)


# ---------------------------------------------------------------- its names, lists and texts

def test_it_goes_by_a1111s_name_and_alias_as_a1111s_timestep_sampler():
    from sdlab.pipeline.infotext import eta_label
    from sdlab.server.a1111 import samplers

    spec = get_sampler("DDIM CFG++")
    assert get_sampler("ddim_cfgpp") is spec and get_sampler(" ddim cfg++ ") is spec
    assert get_sampler("DDIM_CFGPP") is spec
    assert not comfyui_spelling("ddim_cfgpp")                           # no ComfyUI sampler: A1111's conventions
    assert runs_a1111_timesteps(spec, A1111_TIMESTEP_SCHEDULE)
    assert a1111_schedule("DDIM CFG++", "karras") == "ddim_uniform"
    assert spec.cfg_pp and spec.cfg_scale_factor == 1 / 12.5 and spec.final_sigma == "first_alpha"
    assert eta_label("DDIM CFG++") == ("Eta DDIM", 0.0)
    assert {"name": "DDIM CFG++", "aliases": ["ddim_cfgpp"], "options": {}} in samplers()
    names = [row["name"] for row in samplers()]
    assert names.index("DDIM CFG++") == names.index("DDIM") + 1          # A1111's order: DDIM, DDIM CFG++, PLMS


def test_the_cli_draws_and_records_it_and_reads_it_back(tmp_path, capsys):
    """`--sampler "DDIM CFG++"` (or its alias) with --eta: the Python API's picture, recorded as `Sampler: DDIM CFG++`,
    `Eta DDIM: 0.3`, which --from-png draws again."""
    import sdlab
    from cli_helpers import pixels, run
    from sdlab.pipeline.png_info import parse_parameters, read_parameters

    args = ["txt2img", "a red circle", "--negative", "blue", "--schedule", "ddim_uniform", "--steps", "6", "--seed",
            "3", "--cfg", "7", "--eta", "0.3", "--no-progress"]
    code, _, err = run([*args, "--sampler", "DDIM CFG++", "--out", str(tmp_path / "a.png")], capsys)
    assert code == 0, err
    labels = parse_parameters(read_parameters(tmp_path / "a.png"))
    assert (labels["Sampler"], labels["Eta DDIM"]) == ("DDIM CFG++", 0.3)
    api = sdlab.load().txt2img("a red circle", negative_prompt="blue", sampler="DDIM CFG++", schedule="ddim_uniform",
                               steps=6, seed=3, cfg_scale=7, eta=0.3).images[0]
    assert np.array_equal(pixels(tmp_path / "a.png"), np.asarray(api, dtype=np.int16))
    code, _, err = run([*args, "--sampler", "ddim_cfgpp", "--out", str(tmp_path / "b.png")], capsys)
    assert code == 0, err
    assert parse_parameters(read_parameters(tmp_path / "b.png"))["Sampler"] == "DDIM CFG++"
    assert np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "b.png"))
    code, _, err = run(["txt2img", "--from-png", str(tmp_path / "a.png"), "--out", str(tmp_path / "c.png"),
                        "--no-progress"], capsys)
    assert code == 0, err
    assert np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "c.png"))
    code, _, err = run([*args, "--sampler", "DDIM", "--out", str(tmp_path / "d.png")], capsys)
    assert code == 0, err
    assert np.abs(pixels(tmp_path / "a.png") - pixels(tmp_path / "d.png")).mean() > 1


def test_a_novelai_ddim_cfgpp_picture_reads_as_a_drawable_request():
    """NovelAI's `ddim_cfgpp` is A1111's `samplers_map` alias of DDIM CFG++: png-info names it, and it draws."""
    from PIL import Image
    from test_a1111_infotext_compat import png_info_of

    from sdlab.pipeline.generate import generate
    from sdlab.pipeline.infotext import from_parameters
    from sdlab.pipeline.png_info import parse_parameters

    comment = {"steps": 28, "sampler": "ddim_cfgpp", "seed": 12345, "scale": 11.0, "uc": "lowres"}
    chunks = {"Description": "1girl", "Software": "NovelAI", "Comment": json.dumps(comment)}
    answer = png_info_of(Image.new("RGB", (32, 32)), chunks)
    assert answer["parameters"]["Sampler"] == "DDIM CFG++"
    req = GenerationRequest(**from_parameters(parse_parameters(answer["info"])))
    assert req.sampler == "DDIM CFG++" and req.schedule == "ddim_uniform"
    result = generate(tiny_bundle("sd1"), replace(req, steps=3))
    assert result.request.sampler == "DDIM CFG++"


def test_the_a1111_api_lists_draws_and_records_it(sdlab_server):
    """/sdapi/v1/samplers lists it with A1111's alias; txt2img with `sampler_name` "DDIM CFG++" and the option
    `eta_ddim` draws the native job's picture (on A1111's timesteps, `ddim_uniform`) and records its name and eta."""
    import base64
    import io

    import httpx
    from PIL import Image
    from server_fixtures import run_job

    with httpx.Client(base_url=sdlab_server.url, timeout=120) as client:
        rows = client.get("/sdapi/v1/samplers").json()
        assert {"name": "DDIM CFG++", "aliases": ["ddim_cfgpp"], "options": {}} in rows
        fields = {"prompt": "a red circle", "negative_prompt": "blue", "steps": 5, "seed": 3, "cfg_scale": 7}
        answer = client.post("/sdapi/v1/txt2img", json={**fields, "sampler_name": "DDIM CFG++",
                                                         "override_settings": {"eta_ddim": 0.3}})
        assert answer.status_code == 200, answer.text
        info = json.loads(answer.json()["info"])
        assert info["sampler_name"] == "DDIM CFG++"
        assert "Sampler: DDIM CFG++, " in info["infotexts"][0] and "Eta DDIM: 0.3, " in info["infotexts"][0]
        job = run_job(client, {**fields, "sampler": "DDIM CFG++", "schedule": "ddim_uniform", "eta": 0.3})
        assert job["status"] == "done", job
        native = np.asarray(Image.open(io.BytesIO(client.get(job["images"][0]).content)))
        ours = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0]))))
        assert np.array_equal(ours, native)
