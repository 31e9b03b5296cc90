"""The hires pass's own sampler, schedule and prompts (A1111's `hr_sampler_name`, `hr_scheduler`, `hr_prompt`,
`hr_negative_prompt`): the second pass draws with them as A1111 1.10's `sample_hr_pass` does (its schedule, sigmas
and k-diffusion sampler transcribed below on a tiny factor-8 SD1 model), a hires prompt's LoRA tags act in the
second pass alone, the labels are written and read as A1111 writes and pastes them, and the A1111 API, the native
API and the CLI take them."""

from __future__ import annotations

import inspect
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from bundle_fixtures import randomize_, tiny_bundle
from cli_helpers import pixels, run
from sampler_harness import load_k_diffusion_external, load_k_diffusion_sampling
from sdlab.api import Pipeline
from sdlab.checkpoints import create
from sdlab.models.vae import VAEConfig
from sdlab.pipeline import generate as generate_module
from sdlab.pipeline.generate import decode_latents, sample_latents
from sdlab.pipeline.images import tensor_to_pil
from sdlab.pipeline.infotext import from_parameters, to_parameters
from sdlab.pipeline.plan import make_plan
from sdlab.pipeline.png_info import format_parameters, parse_parameters, read_parameters
from sdlab.pipeline.prompt_loras import LoraUse, patcher_for
from sdlab.pipeline.request import GenerationRequest, RequestError
from sdlab.pipeline.upscale import upscale_latent
from sdlab.server.a1111 import Txt2ImgIn, _request
from test_prompt_loras import _lora_file, _small_lora

pytestmark = pytest.mark.usefixtures("one_thread")

KD = load_k_diffusion_sampling()
KX = load_k_diffusion_external()
PROMPT, NEGATIVE = "a red cat, [blue:green:0.5]", "ugly"
HR_PROMPT, HR_NEGATIVE = "a [dog:fox:2] in the snow", "blurry, (low:1.2)"


# --- A1111 1.10, transcribed -------------------------------------------------------------------------------------

def setup_img2img_steps(denoising_strength: float, steps: int) -> tuple[int, int]:
    """modules/sd_samplers_common.py `setup_img2img_steps(p, steps)` with steps given (the hires pass: the
    img2img_fix_steps path) -> (the stretched schedule's steps, t_enc)."""
    return int(steps / min(denoising_strength, 0.999)), steps - 1


def a1111_karras_sigmas(alphas_cumprod: torch.Tensor, steps: int) -> torch.Tensor:
    """sd_samplers_kdiffusion.py `KDiffusionSampler.get_sigmas` for DPM++ 2M on "Automatic" (its row's scheduler:
    karras) between the model's `DiscreteSchedule` sigmas."""
    ks = KX.DiscreteSchedule(((1 - alphas_cumprod) / alphas_cumprod) ** 0.5, quantize=True)
    return KD.get_sigmas_karras(n=steps, sigma_min=ks.sigmas[0].item(), sigma_max=ks.sigmas[-1].item())


def get_hr_sampler_and_scheduler(d: dict) -> tuple[str, str]:
    """modules/sd_samplers.py `get_hr_sampler_and_scheduler` (the paste of Hires sampler / schedule type), with
    `get_sampler_and_scheduler` reduced to the names used here (already split)."""
    hr_sampler = d.get("Hires sampler", "Use same sampler")
    sampler = d.get("Sampler") if hr_sampler == "Use same sampler" else hr_sampler
    hr_scheduler = d.get("Hires schedule type", "Use same scheduler")
    scheduler = d.get("Schedule type") if hr_scheduler == "Use same scheduler" else hr_scheduler
    sampler = sampler if sampler != d.get("Sampler") else "Use same sampler"
    scheduler = scheduler if scheduler != d.get("Schedule type") else "Use same scheduler"
    return sampler, scheduler


def a1111_hires_labels(sampler: str, hr_sampler: str | None, prompt: str, hr_prompt: str) -> dict:
    """processing.py `StableDiffusionProcessingTxt2Img.init`: Hires sampler where it differs from the sampler, Hires
    prompt where it differs from the prompt (`get_hr_prompt`; "" is the prompt: `setup_prompts`)."""
    labels = {}
    if hr_sampler is not None and hr_sampler != sampler:
        labels["Hires sampler"] = hr_sampler
    hr_prompt = hr_prompt or prompt
    if hr_prompt != prompt:
        labels["Hires prompt"] = hr_prompt
    return labels


# --- models ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipe8() -> Pipeline:
    bundle = create.new_bundle("sd1", tiny=True, seed=3,
                               vae=VAEConfig(base_channels=32, channel_mult=(1, 1, 1, 1), num_res_blocks=1))
    for i, module in enumerate([bundle.unet, bundle.vae, *(te.model for te in bundle.text_encoders)]):
        randomize_(module, 3 + i)
    return Pipeline(bundle)


def _runs(monkeypatch) -> list[dict]:
    """Every sampler run of the generate loop: its model, start x, sigmas and result."""
    runs, real = [], generate_module._run_sampler

    def spy(plan, model, x, sigmas, options, progress, first_call=0):
        out = real(plan, model, x, sigmas, options, progress, first_call)
        runs.append(dict(plan=plan, model=model, x=x.clone(), sigmas=sigmas.clone(), out=out.clone()))
        return out

    monkeypatch.setattr(generate_module, "_run_sampler", spy)
    return runs


# --- drawing -----------------------------------------------------------------------------------------------------

def test_the_second_pass_runs_a1111s_hires_sampler_schedule_and_prompts(pipe8: Pipeline, monkeypatch):
    """A1111 API request: Euler first (uniform), `hr_sampler_name` DPM++ 2M with the scheduler unset (its
    Automatic: Karras), `hr_prompt` / `hr_negative_prompt`. The second pass's sigmas are A1111's stretched Karras
    tail, k-diffusion's own `sample_dpmpp_2m` from its start gives its latent, and the picture is the two passes by
    hand with the hires prompts (prompt editing counting on from the first pass)."""
    body = Txt2ImgIn(prompt=PROMPT, negative_prompt=NEGATIVE, sampler_name="Euler", steps=4, seed=7, width=64,
                     height=64, cfg_scale=6, enable_hr=True, hr_scale=1.5, hr_upscaler="Latent",
                     denoising_strength=0.6, hr_second_pass_steps=3, hr_sampler_name="DPM++ 2M",
                     hr_prompt=HR_PROMPT, hr_negative_prompt=HR_NEGATIVE)
    request = _request(body)
    runs = _runs(monkeypatch)
    result = pipe8.run(replace(request, schedule="uniform"))
    resolved = result.request
    assert (resolved.hr_sampler, resolved.hr_schedule) == ("DPM++ 2M", "karras")
    first, second = runs
    steps, t_enc = setup_img2img_steps(0.6, 3)
    sigmas = a1111_karras_sigmas(second["plan"].sampling.schedule.alphas_cumprod.float(), steps)[steps - t_enc - 1:]
    assert torch.allclose(second["sigmas"], sigmas, atol=1e-5)
    with torch.no_grad():
        reference = KD.sample_dpmpp_2m(second["model"], second["x"], second["sigmas"], disable=True)
    assert (reference - second["out"]).abs().max() <= 1e-4

    bundle = pipe8.bundle
    z = upscale_latent(first["out"], 12, 12, "Latent")
    by_hand = GenerationRequest(HR_PROMPT, HR_NEGATIVE, steps=3, seed=7, sampler="DPM++ 2M", schedule="karras",
                                cfg_scale=6, width=96, height=96, strength=0.6, img2img_convention="a1111_fix_steps",
                                first_pass_steps=4, rng=resolved.rng, eta_noise_seed_delta=resolved.eta_noise_seed_delta,
                                original_size=(96, 96), target_size=(96, 96))
    plan = make_plan(bundle, by_hand, from_latent=True)
    pictures = tensor_to_pil(decode_latents(bundle, sample_latents(bundle, plan, init_latent=z)))
    assert np.array_equal(np.asarray(pictures[0]), np.asarray(result.images[0]))


def test_a_hires_prompts_lora_tags_act_in_the_second_pass_alone(tmp_path: Path):
    """A1111 activates `hr_extra_network_data` (the hires prompt's tags) for the second pass: its LoRA there
    only, the model's own weights back afterwards."""
    lora = _lora_file(tmp_path / "loras" / "ink.safetensors", _small_lora(5))
    pipe = Pipeline(tiny_bundle("sd1", seed=2), lora_dirs=[tmp_path / "loras"])
    before = {k: v.clone() for k, v in pipe.bundle.unet.state_dict().items()}
    options = dict(steps=3, seed=4, hr_scale=2, hr_steps=2, hr_denoise=0.5)
    tagged = pipe.txt2img("a cat", hr_prompt="a dog <lora:ink:0.8>", **options)
    assert all(torch.equal(before[k], v) for k, v in pipe.bundle.unet.state_dict().items())
    assert tagged.request.hr_prompt == "a dog <lora:ink:0.8>"

    bundle = pipe.bundle
    plan = pipe.resolve(GenerationRequest("a cat", hr_prompt="a dog", **options))
    first = sample_latents(bundle, plan)
    z = upscale_latent(first, first.shape[-2] * 2, first.shape[-1] * 2, "Latent")
    from sdlab.pipeline.hires import second_pass_request
    second = make_plan(bundle, second_pass_request(plan.request, bundle.vae_config.downsample_factor), from_latent=True)
    with patcher_for(bundle).using([LoraUse(lora, 0.8, 0.8, "ink")]):
        by_hand = tensor_to_pil(decode_latents(bundle, sample_latents(bundle, second, init_latent=z)))
    untagged = pipe.txt2img("a cat", hr_prompt="a dog", **options)
    assert np.array_equal(np.asarray(by_hand[0]), np.asarray(tagged.images[0]))
    assert not np.array_equal(np.asarray(untagged.images[0]), np.asarray(tagged.images[0]))


# --- parameters --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("hr_sampler, hr_schedule, hr_prompt", [
    ("DPM++ 2M", None, HR_PROMPT), (None, "exponential", ""), ("Euler", None, PROMPT), ("Heun", "karras", "a fox")])
def test_labels_are_a1111s_and_read_back_to_the_same_picture(pipe8: Pipeline, hr_sampler, hr_schedule, hr_prompt):
    result = pipe8.txt2img(PROMPT, NEGATIVE, sampler="Euler", schedule="karras", steps=3, seed=2, hr_scale=1.5,
                           hr_denoise=0.5, hr_sampler=hr_sampler, hr_schedule=hr_schedule, hr_prompt=hr_prompt)
    parameters = to_parameters(result.request)
    labels = {k: v for k, v in parameters.items() if k in ("Hires sampler", "Hires prompt") and v is not None}
    assert labels == a1111_hires_labels("Euler", hr_sampler, PROMPT, hr_prompt)
    assert parameters.get("Hires schedule type") == {"exponential": "Exponential"}.get(hr_schedule)
    text = format_parameters(parameters)
    again = pipe8.run(GenerationRequest(**from_parameters(parse_parameters(text))))
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(result.images[0]))


@pytest.mark.parametrize("labels", [
    "Sampler: Euler, Schedule type: Automatic, Hires sampler: DPM++ 2M",
    "Sampler: DPM++ 2M, Schedule type: Karras, Hires sampler: Euler",
    "Sampler: Euler a, Schedule type: Automatic, Hires schedule type: Karras",
    "Sampler: Euler, Schedule type: Automatic, Hires sampler: Use same sampler, Hires schedule type: Use same scheduler",
    "Sampler: DPM++ 2M, Schedule type: Exponential, Hires sampler: DPM++ SDE, Hires schedule type: Karras",
])
def test_a1111_texts_paste_the_hires_sampler_and_schedule_as_a1111(labels: str):
    """`get_hr_sampler_and_scheduler`'s pick, then the schedule A1111 runs that sampler on (`a1111_schedule`)."""
    from sdlab.diffusion.samplers import a1111_schedule
    from sdlab.diffusion.schedule_names import schedule_from_a1111

    text = f"a cat\nSteps: 20, {labels}, CFG scale: 7, Seed: 1, Size: 64x64, Denoising strength: 0.5, " \
           f"Hires upscale: 2, Hires prompt: \"a dog, snow\", Version: v1.10.1"
    parsed = parse_parameters(text)
    sampler, scheduler = get_hr_sampler_and_scheduler(parsed)
    hr_sampler = parsed["Sampler"] if sampler == "Use same sampler" else sampler
    label = parsed["Schedule type"] if scheduler == "Use same scheduler" else scheduler
    request = GenerationRequest(**from_parameters(parsed))
    assert (request.hr_sampler or request.sampler) == hr_sampler and request.hr_prompt == "a dog, snow"
    assert (request.hr_schedule or request.schedule) == a1111_schedule(hr_sampler, schedule_from_a1111(label))


def test_bad_or_stray_hires_pass_settings_are_one_request_error(pipe8: Pipeline):
    with pytest.raises(RequestError, match="hr_sampler: unknown sampler"):
        pipe8.resolve(GenerationRequest("a cat", hr_scale=2, hr_sampler="Euler z"))
    with pytest.raises(RequestError, match="unknown schedule"):
        pipe8.resolve(GenerationRequest("a cat", hr_scale=2, hr_schedule="zigzag"))
    with pytest.raises(RequestError, match="hr_prompt needs hr_scale"):
        pipe8.resolve(GenerationRequest("a cat", hr_prompt="a dog"))


# --- native API and CLI ------------------------------------------------------------------------------------------

def test_both_server_apis_draw_the_hires_pass_settings_as_the_cli(tmp_path: Path):
    """The native API's hr_sampler / hr_schedule / hr_prompt / hr_negative_prompt and the A1111 API's
    hr_sampler_name / hr_scheduler / hr_prompt / hr_negative_prompt (no longer ignored) draw the CLI's picture."""
    import base64
    import io
    import subprocess
    import sys

    import httpx
    from PIL import Image
    from server_fixtures import run_job, server_env, start_server

    out = tmp_path / "cli.png"                   # a process as the server's (one thread): the same floats
    cli = subprocess.run([sys.executable, "-m", "sdlab", "txt2img", "a cat", "--steps", "3", "--seed", "5", "--sampler",
                          "Euler", "--schedule", "karras", "--cfg", "5", "--hr-scale", "1.5", "--hr-steps", "2",
                          "--hr-sampler", "DPM++ 2M", "--hr-schedule", "exponential", "--hr-prompt", "a dog",
                          "--hr-negative-prompt", "blurry", "--out", str(out), "--no-progress"],
                         capture_output=True, text=True, env=server_env(), timeout=300)
    assert cli.returncode == 0, cli.stderr
    server = start_server(tmp_path / "outputs")
    try:
        with httpx.Client(base_url=server.url, timeout=300) as client:
            job = run_job(client, {"prompt": "a cat", "steps": 3, "seed": 5, "sampler": "Euler", "schedule": "karras",
                                   "cfg_scale": 5, "hr_scale": 1.5, "hr_steps": 2, "hr_sampler": "DPM++ 2M",
                                   "hr_schedule": "exponential", "hr_prompt": "a dog", "hr_negative_prompt": "blurry"},
                          timeout_s=300)
            assert job["status"] == "done", job
            native = Image.open(io.BytesIO(client.get(job["images"][0]).content))
            assert native.info["parameters"] == read_parameters(out)
            assert np.array_equal(np.asarray(native, dtype=np.int16), pixels(out))
            answer = client.post("/sdapi/v1/txt2img", json={
                "prompt": "a cat", "steps": 3, "seed": 5, "sampler_name": "Euler", "scheduler": "karras",
                "cfg_scale": 5, "width": 64, "height": 64, "enable_hr": True, "hr_scale": 1.5,
                "hr_second_pass_steps": 2, "denoising_strength": 0.7, "hr_sampler_name": "DPM++ 2M",
                "hr_scheduler": "Exponential", "hr_prompt": "a dog", "hr_negative_prompt": "blurry"})
            assert answer.status_code == 200, answer.text
            a1111 = Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0])))
            assert np.array_equal(np.asarray(a1111.convert("RGB"), dtype=np.int16), pixels(out))
            info = answer.json()["info"]
            assert '"Hires sampler": "DPM++ 2M"' in info and '"Hires prompt": "a dog"' in info
    finally:
        server.stop()


def test_cli_flags_equal_the_python_api_and_read_back(tmp_path: Path, capsys):
    import sdlab

    out = tmp_path / "a.png"
    flags = ["--hr-sampler", "Euler a", "--hr-schedule", "exponential", "--hr-prompt", "a dog, [snow:rain:2]",
             "--hr-negative-prompt", "blurry"]
    code, _, err = run(["txt2img", "a cat", "--steps", "3", "--seed", "5", "--hr-scale", "1.5", "--hr-steps", "2",
                        *flags, "--out", str(out), "--no-progress"], capsys)
    assert code == 0, err
    text = read_parameters(out)
    assert 'Hires sampler: Euler a, Hires prompt: "a dog, [snow:rain:2]", Hires negative prompt: blurry, ' \
           "Hires schedule type: Exponential, Hires upscale: 1.5" in text
    api = sdlab.load().txt2img("a cat", steps=3, seed=5, hr_scale=1.5, hr_steps=2, hr_sampler="Euler a",
                               hr_schedule="exponential", hr_prompt="a dog, [snow:rain:2]", hr_negative_prompt="blurry")
    assert np.array_equal(pixels(out), np.asarray(api.images[0], dtype=np.int16))
    code, _, err = run(["txt2img", "--from-png", str(out), "--out", str(tmp_path / "b.png"), "--no-progress"], capsys)
    assert code == 0, err
    assert np.array_equal(pixels(tmp_path / "b.png"), pixels(out))


A1111_SECOND_ORDER = {"Heun", "DPM2", "DPM2 a", "DPM++ 2S a", "DPM++ SDE"}   # sd_samplers_kdiffusion's second_order


def a1111_hr_prompt_steps(sampler: str, steps: int, hr_sampler: str, hr_steps: int) -> tuple[int, int]:
    """processing.py: `setup_conds`'s ``firstpass_steps = find_sampler_config(sampler_name).total_steps(steps)`` and
    `calculate_hr_conds`'s ``hr_sampler_config.total_steps(hr_second_pass_steps or steps)``, the (steps,
    hires_steps) the second pass's prompt edits are scheduled over (`SamplerData.total_steps`: twice the steps for
    a second-order sampler)."""
    def total_steps(name: str, n: int) -> int:
        return n * 2 if name in A1111_SECOND_ORDER else n
    return total_steps(sampler, steps), total_steps(hr_sampler, hr_steps)


@pytest.mark.parametrize("sampler, hr_sampler", [("Euler", "Heun"), ("Heun", "Euler"), ("DPM2", "DPM2"),
                                                 ("Heun", None)])
def test_the_second_pass_counts_the_first_pass_by_the_first_samplers_calls(pipe8: Pipeline, sampler, hr_sampler):
    """The second pass schedules its prompt edits over the first pass's model calls as the first pass's sampler
    makes them and its own steps by the hires sampler's, as A1111 (`a1111_hr_prompt_steps`); the drawing and the
    chunk check share `prompt_schedule_steps`."""
    from sdlab.pipeline.hires import second_pass_request
    from sdlab.diffusion.samplers import get_sampler
    from sdlab.pipeline.plan import prompt_schedule_steps

    plan = pipe8.resolve(GenerationRequest("a [cat:dog:6] in snow", steps=4, sampler=sampler, hr_sampler=hr_sampler,
                                           hr_scale=1.5, hr_upscaler="Latent", hr_steps=3, hr_denoise=0.6))
    second = second_pass_request(plan.request, pipe8.bundle.vae_config.downsample_factor)
    calls = get_sampler(second.sampler).calls_per_step
    assert prompt_schedule_steps(second, calls) == a1111_hr_prompt_steps(sampler, 4, hr_sampler or sampler, 3)


def test_a_hires_prompt_equal_to_the_prompt_but_for_comments_is_the_prompt(pipe8: Pipeline):
    """A1111's comments script strips `hr_prompt` / `hr_negative_prompt` before `init` compares them with the prompts
    for the Hires prompt / Hires negative prompt labels: the same text but for its comments is no hires prompt."""
    plan = pipe8.resolve(GenerationRequest("a cat # first", "ugly\n# a line", steps=2, hr_scale=1.5,
                                           hr_upscaler="Latent", hr_prompt="a cat # second",
                                           hr_negative_prompt="ugly\n# another line"))
    assert (plan.request.hr_prompt, plan.request.hr_negative_prompt) == ("", "")
    labels = to_parameters(plan.request)
    assert labels["Hires prompt"] is None and labels["Hires negative prompt"] is None


# --- the hires sampler's own eta (A1111's eta options) -----------------------------------------------------------

A1111_ETA_SAMPLERS = {"DDIM": ("eta_ddim", "Eta DDIM", 0.0), "Euler a": ("eta_ancestral", "Eta", 1.0)}
"""A1111's samplers here whose function takes an eta: `Sampler`'s eta_option_field, eta_infotext_field and
eta_default (sd_samplers_timesteps.py sets the DDIM ones; Euler takes no eta)."""


def a1111_pass_eta(sampler: str, p_eta: float | None, opts: dict, params: dict) -> float | None:
    """sd_samplers_common.py `Sampler.initialize`, which each pass runs with its own sampler (None: no eta):
    `self.eta = p.eta if p.eta is not None else getattr(opts, self.eta_option_field, 0.0)`;
    `if self.eta != self.eta_default: p.extra_generation_params[self.eta_infotext_field] = self.eta`."""
    if sampler not in A1111_ETA_SAMPLERS:
        return None
    option, label, default = A1111_ETA_SAMPLERS[sampler]
    eta = p_eta if p_eta is not None else opts.get(option, {"eta_ddim": 0.0, "eta_ancestral": 1.0}[option])
    if eta != default:
        params[label] = eta
    return eta


@pytest.mark.parametrize("sampler, hr_sampler, eta, opts", [
    ("Euler a", "DDIM", None, {"eta_ddim": 0.5}), ("Euler", "DDIM", None, {"eta_ddim": 0.3}),
    ("DDIM", "Euler a", None, {"eta_ddim": 0.5}), ("DDIM", "Euler", None, {"eta_ddim": 0.5}),
    ("Euler a", "DDIM", 0.4, {"eta_ddim": 0.5}), ("DDIM", "DDIM", None, {"eta_ddim": 0.5}),
    ("Euler a", "DDIM", None, {}),
    ("DDIM", "Euler a", None, {"eta_ancestral": 0.5}),
    ("Euler a", "DDIM", None, {"eta_ancestral": 0.3, "eta_ddim": 0.5}),
    ("Euler", "Euler a", None, {"eta_ancestral": 0.3}), ("Euler a", "Euler a", None, {"eta_ancestral": 0.3}),
])
def test_a_hires_sampler_draws_with_its_own_eta_option_as_a1111(pipe8: Pipeline, sampler, hr_sampler, eta, opts):
    """A1111's second pass initializes its own sampler: a hires DDIM behind another sampler draws at `eta_ddim`,
    a hires Euler a behind a DDIM at `eta_ancestral` (1); each pass's eta is labelled under its sampler's label,
    and the labels read back draw both passes the same."""
    from sdlab.diffusion.samplers import get_sampler
    from sdlab.pipeline.hires import second_pass_request

    params: dict = {}
    first_eta, second_eta = (a1111_pass_eta(s, eta, opts, params) for s in (sampler, hr_sampler))
    body = Txt2ImgIn(prompt="a cat", sampler_name=sampler, steps=3, seed=1, width=64, height=64, eta=eta,
                     enable_hr=True, hr_scale=1.5, hr_sampler_name=hr_sampler, denoising_strength=0.5,
                     override_settings=opts)

    def drawn_etas(request: GenerationRequest) -> tuple:
        """Each pass's eta as its sampler draws it (None: it takes none)."""
        resolved = pipe8.resolve(request).request
        taken = (inspect.signature(get_sampler(r.sampler).fn).parameters.get("eta")
                 for r in (resolved, second_pass_request(resolved, 8)))
        return tuple(None if t is None else t.default if r.eta is None else r.eta
                     for t, r in zip(taken, (resolved, second_pass_request(resolved, 8))))

    request = _request(body)
    assert drawn_etas(request) == (first_eta, second_eta)
    labels = to_parameters(pipe8.resolve(request).request)
    assert {k: v for k, v in labels.items() if k.startswith(("Eta", "Hires eta")) and v is not None} == params
    again = GenerationRequest(**from_parameters(parse_parameters(format_parameters(labels))))
    assert drawn_etas(again) == (first_eta, second_eta)


def test_a_hires_ddims_eta_ddim_changes_its_picture_and_draws_again_from_its_labels(pipe8: Pipeline):
    body = dict(prompt="a cat", sampler_name="Euler a", steps=6, seed=1, width=64, height=64, enable_hr=True,
                hr_scale=1.5, hr_sampler_name="DDIM", hr_second_pass_steps=4, denoising_strength=0.6)
    drawn = pipe8.run(_request(Txt2ImgIn(**body, override_settings={"eta_ddim": 0.7})))
    plain = pipe8.run(_request(Txt2ImgIn(**body)))
    assert not np.array_equal(np.asarray(drawn.images[0]), np.asarray(plain.images[0]))
    text = format_parameters(to_parameters(drawn.request))
    assert "Eta DDIM: 0.7" in text and ", Eta:" not in text
    again = pipe8.run(GenerationRequest(**from_parameters(parse_parameters(text))))
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(drawn.images[0]))


def test_hr_eta_is_checked_and_needs_the_hires_fix(pipe8: Pipeline):
    with pytest.raises(RequestError, match="hr_eta needs hr_scale"):
        pipe8.resolve(GenerationRequest("a cat", hr_eta=0.5))
    with pytest.raises(RequestError, match="hr_eta must lie in"):
        pipe8.resolve(GenerationRequest("a cat", hr_scale=1.5, hr_eta=-1))
    with pytest.raises(RequestError, match="TCD .the hires sampler. takes eta in"):
        pipe8.resolve(GenerationRequest("a cat", sampler="Euler a", hr_sampler="TCD", hr_scale=1.5, hr_eta=2))


def test_cli_hr_eta_draws_the_second_pass_and_eta_both(tmp_path: Path, capsys):
    """--hr-eta is the second pass's eta (written as its sampler's label, read back by --from-png); --eta given
    with --from-png draws both passes, as A1111's `p.eta` does."""
    out, again, both = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    code, _, err = run(["txt2img", "a cat", "--sampler", "Euler a", "--steps", "6", "--seed", "5", "--hr-scale", "1.5",
                        "--hr-steps", "4", "--hr-sampler", "DDIM", "--hr-eta", "0.6", "--out", str(out), "--no-progress"], capsys)
    assert code == 0, err
    assert "Eta DDIM: 0.6" in read_parameters(out)
    code, _, err = run(["txt2img", "--from-png", str(out), "--out", str(again), "--no-progress"], capsys)
    assert code == 0, err
    assert np.array_equal(pixels(again), pixels(out))
    code, _, err = run(["txt2img", "--from-png", str(out), "--eta", "0.2", "--out", str(both), "--no-progress"], capsys)
    assert code == 0, err
    assert "Eta DDIM: 0.2" in read_parameters(both) and "Eta: 0.2" in read_parameters(both)


def test_sdlabs_hires_eta_label_is_documented_and_the_web_uis_chip_names_the_value():
    """`Hires eta`, the label sdlab writes of a hires eta under the first pass's label (`_eta_parameters`), is in
    README's list of the labels pictures carry; the web UI's chip of `hr_eta`, which an A1111 picture's `Eta DDIM`
    or `Eta` fills too, names the value, not one of those labels. Before: README had no `Hires eta`, the chip
    said "Hires eta" whatever label the value came from."""
    import re

    root = Path(__file__).resolve().parents[1]
    assert "as `Hires eta`" in (root / "README.md").read_text()
    app = (root / "src/sdlab/server/static/app.js").read_text()
    assert re.search(r'hr_eta: \{ name: "([^"]+)"', app).group(1) not in {"Hires eta", "Eta", "Eta DDIM"}
