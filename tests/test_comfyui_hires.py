"""ComfyUI's two-pass "hires fix" graph (KSampler -> LatentUpscale(By) -> KSampler -> VAEDecode) as the request's
hr_convention "comfyui" (pipeline/hires.py), against ComfyUI's two ``common_ksampler`` calls.

The reference is ComfyUI's code, transcribed from comfyanonymous/ComfyUI (e60e19b): nodes.py ``common_ksampler``
(``prepare_noise`` of the KSampler's own seed, the whole batch at once), comfy/samplers.py ``KSampler`` (``set_steps``
with denoise: ``comfy_reference.ksampler_sigmas``) and ``KSAMPLER.sample`` (the latent ``process_latent_in``, plus
the noise times ``noise_scaling`` at the first of its sigmas, max_denoise only at the model's sigma_max), the
samplers of comfy/k_diffusion/sampling.py (euler, euler_ancestral, heun), ``process_latent_out`` after each
KSampler, and LatentUpscale(By) / ``common_upscale`` (tests/test_comfyui_latent_upscale.py). sdlab's guided denoiser
of each pass (caught from its run) drives the transcribed KSamplers, so the runs differ only in the conventions:
latents compared at 1e-5 (relative and absolute, latents of size ~1).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import comfy_reference as C
import sdlab
from sdlab.pipeline import generate as G
from sdlab.pipeline.request import HIRES_SIZE, GenerationRequest, RequestError
from test_comfyui_conventions import ksampler, sample_euler, sample_euler_ancestral
from test_comfyui_latent_upscale import common_upscale, latent_upscale, latent_upscale_by

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

PROMPT = "a red apple on a light blue background"
SEED, HIRES_SEED = 1, 7


# -- ComfyUI, transcribed ----------------------------------------------------------------------------------------
def to_d(x, sigma, denoised):
    """comfy/k_diffusion/sampling.py ``to_d``."""
    return (x - denoised) / sigma


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None):
    """comfy/k_diffusion/sampling.py ``sample_heun`` (no churn, ComfyUI's KSampler default): two model calls a step,
    one on the last."""
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma_hat = sigmas[i]
        denoised = model(x, sigma_hat * s_in)
        d = to_d(x, sigma_hat, denoised)
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = model(x_2, sigmas[i + 1] * s_in)
            d_2 = to_d(x_2, sigmas[i + 1], denoised_2)
            x = x + (d + d_2) / 2 * dt
    return x


SAMPLERS = {"euler": sample_euler, "euler_ancestral": sample_euler_ancestral, "heun": sample_heun}


# -- sdlab's run on the shipped sdlab-tiny, both passes caught at the sampler --------------------------------------
@pytest.fixture(scope="module")
def tiny():
    return sdlab.load()                                  # the shipped sdlab-tiny: v-prediction, VAE factor 4


def caught_runs(monkeypatch, draw) -> tuple[list[dict], object]:
    """Each sampler run of `draw()` (its guided denoiser, start, sigmas and returned latent, in order) and what
    `draw()` returns."""
    runs: list[dict] = []
    real = G._run_sampler

    def spy(plan, model, x, sigmas, sampler_options, progress):
        out = real(plan, model, x, sigmas, sampler_options, progress)
        runs.append(dict(model=model, x=x.clone(), sigmas=sigmas.clone(), out=out.clone()))
        return out

    monkeypatch.setattr(G, "_run_sampler", spy)
    try:
        return runs, draw()
    finally:
        monkeypatch.setattr(G, "_run_sampler", real)


def both_passes(monkeypatch, pipe, **options) -> tuple[list[dict], object]:
    """`pipe.txt2img` with `options`; each sampler run's guided denoiser, sigmas and returned latent, in order."""
    return caught_runs(monkeypatch, lambda: pipe.txt2img(PROMPT, **{"seed": SEED, "cfg_scale": 5.0, "width": 64,
                                                                    "height": 64, **options}))


def comfyui_graph(tiny, runs, first: dict, second: dict, size) -> torch.Tensor:
    """ComfyUI's two common_ksampler calls with LatentUpscale(By) between, on sdlab's denoisers: the second pass's
    latent, in the model's space (sdlab's)."""
    scale = tiny.bundle.scaling_factor
    sigma_max = tiny.bundle.model_sampling.sigma_max
    ms = C.ModelSamplingDiscrete()
    sigmas = C.ksampler_sigmas(ms, first["sampler"], "karras", first["steps"])
    torch.testing.assert_close(runs[0]["sigmas"], sigmas, rtol=2e-6, atol=0)
    empty = torch.zeros_like(runs[0]["x"])                                         # EmptyLatentImage
    samples = ksampler(SAMPLERS[first["sampler"]], runs[0]["model"], sigmas, SEED, empty * scale, sigma_max)
    samples = samples / scale                                                      # process_latent_out
    width, height = size(samples)
    upscaled = common_upscale(samples, width, height, second["method"], second.get("crop", "disabled"))
    sigmas = C.ksampler_sigmas(ms, second["sampler"], "karras", second["steps"], second["denoise"])
    torch.testing.assert_close(runs[1]["sigmas"], sigmas, rtol=2e-6, atol=0)
    return ksampler(SAMPLERS[second["sampler"]], runs[1]["model"], sigmas, HIRES_SEED, upscaled * scale, sigma_max)


CASES = [
    # first pass, second pass (LatentUpscaleBy: scale; LatentUpscale: width x height)
    (dict(sampler="euler", steps=6), dict(sampler="euler", steps=5, denoise=0.5, method="bislerp", scale=1.5)),
    (dict(sampler="euler", steps=5), dict(sampler="euler_ancestral", steps=4, denoise=0.6, method="nearest-exact",
                                          scale=2.0)),
    (dict(sampler="heun", steps=4), dict(sampler="heun", steps=4, denoise=0.75, method="bicubic", scale=1.25)),
    (dict(sampler="euler", steps=4), dict(sampler="euler", steps=4, denoise=0.55, method="bilinear", width=112,
                                          height=64, crop="center")),
    (dict(sampler="euler", steps=4), dict(sampler="heun", steps=3, denoise=0.4, method="area", width=0, height=96)),
]


@pytest.mark.parametrize("first, second", CASES)
def test_the_two_pass_graph_is_comfyuis_two_ksamplers(monkeypatch, tiny, first, second):
    """The whole two-pass graph: first KSampler (seed, denoise 1), LatentUpscale(By) with its method and crop on the
    VAE's latents, second KSampler with its own seed, CFG, sampler, steps and denoise on the upscaled latent + its
    seed's noise at the first of its sigmas (ancestral step noise from its seed + 1). LatentUpscale's pixel sizes
    are ComfyUI's for a VAE of factor 8; on the factor-4 tiny model sdlab takes pixels // 4, which is ComfyUI's rule
    at twice the pixels (asserted below)."""
    factor = tiny.bundle.vae_config.downsample_factor
    options = dict(hr_scale=second.get("scale"), hr_width=second.get("width"), hr_height=second.get("height"),
                   hr_crop=second.get("crop", "disabled"))
    runs, result = both_passes(monkeypatch, tiny, sampler=first["sampler"], schedule="karras", steps=first["steps"],
                               hr_convention="comfyui", hr_upscaler=second["method"], hr_denoise=second["denoise"],
                               hr_sampler=second["sampler"], hr_steps=second["steps"], hr_seed=HIRES_SEED,
                               hr_cfg_scale=3.0, **options)
    assert len(runs) == 2

    def size(samples):
        if "scale" in second:
            return latent_upscale_by(samples, second["scale"])
        return latent_upscale(samples, second["width"] * 8 // factor, second["height"] * 8 // factor)

    reference = comfyui_graph(tiny, runs, first, second, size)
    assert runs[1]["out"].shape == reference.shape
    assert runs[1]["out"].abs().max() > 0.1, "an empty latent would prove nothing"
    torch.testing.assert_close(runs[1]["out"], reference, rtol=1e-5, atol=1e-5)
    assert result.images[0].size == (reference.shape[-1] * factor, reference.shape[-2] * factor)
    assert (result.request.hr_seed, result.request.hr_cfg_scale) == (HIRES_SEED, 3.0)


def test_the_second_pass_takes_its_own_seed_and_cfg(monkeypatch, tiny):
    """The second KSampler's seed and CFG are its own: another hr_seed or hr_cfg_scale draws another picture; unset,
    the first pass's (a graph with the same values in both KSamplers)."""
    base = dict(sampler="euler_ancestral", schedule="karras", steps=4, hr_convention="comfyui", hr_scale=1.5,
                hr_denoise=0.5, hr_upscaler="bislerp")
    out = lambda **more: both_passes(monkeypatch, tiny, **base, **more)[0][1]["out"]   # noqa: E731
    same = out(hr_seed=SEED, hr_cfg_scale=5.0)
    assert torch.equal(out(), same)
    assert (out(hr_seed=SEED + 1) - same).abs().max() > 1e-2
    assert (out(hr_cfg_scale=2.0) - same).abs().max() > 1e-2


@pytest.mark.parametrize("options, message", [
    (dict(hr_convention="comfyui", hr_scale=1.5, hr_upscaler="Latent (bicubic)"), "ComfyUI's latent upscale methods"),
    (dict(hr_convention="comfyui", hr_scale=1.5, hr_crop="middle"), "unknown hr_crop"),
    (dict(hr_scale=1.5, hr_crop="center"), "needs hr_convention comfyui"),
    (dict(hr_convention="comfyui", hr_scale=1.5, hr_denoise=1.5), "hr_denoise"),
    (dict(hr_convention="hires"), "hr_convention needs hr_scale"),
    (dict(hr_seed=3), "hr_seed needs hr_scale"),
    (dict(hr_seed=3, hr_cfg_scale=2.0), "hr_seed, hr_cfg_scale need hr_scale"),
    (dict(hr_convention="forge", hr_scale=1.5), "unknown hr_convention"),
    (dict(hr_scale=1.5, hr_seed="x"), "hr_seed must be an integer"),
    (dict(hr_scale=1.5, hr_cfg_scale=1e9), "hr_cfg_scale"),
    # the tiny VAE's factor 4: 16 cells x 1.3 = 21 cells, 84 px, drawn by no 8-px plan
    (dict(hr_convention="comfyui", hr_scale=1.3), "would draw 84x84 px from 64x64 .* multiple of 8 px"),
])
def test_bad_comfyui_hires_options_are_one_error(tiny, options, message):
    with pytest.raises(RequestError, match=message):
        tiny.txt2img(PROMPT, seed=SEED, steps=2, sampler="euler", width=64, height=64, **options)


@pytest.mark.parametrize("options, refused", [
    (dict(hr_convention="comfyui", hr_scale=1.3), HIRES_SIZE),                  # 84 px: no whole 8 px
    (dict(hr_convention="comfyui", hr_scale=400.0), HIRES_SIZE),                # past the largest side
    (dict(hr_scale=400.0), HIRES_SIZE),                                         # A1111's rule alike
    (dict(hr_convention="comfyui", hr_scale=1.5, hr_crop="middle"), None),
    (dict(hr_convention="comfyui", hr_scale=1.5, hr_denoise=1.5), None),
])
def test_a_hires_size_refusal_says_so_in_its_refused_field(tiny, options, refused):
    """The hires size checks' RequestError names what it refuses (`refused` HIRES_SIZE, which the ComfyUI API turns
    into a node error of the upscale node), the other refusals none; the texts are the messages as they were."""
    request = GenerationRequest(PROMPT, seed=SEED, steps=2, sampler="euler", width=64, height=64, **options)
    with pytest.raises(RequestError) as caught:
        tiny.resolve(request)
    assert caught.value.refused == refused
    assert ("would draw" in str(caught.value)) == (refused is not None), str(caught.value)


def test_the_infotext_records_the_comfyui_hires_and_draws_it_again(tiny):
    """Hires convention, Hires crop, Hires seed and Hires CFG Scale are written and read back (`from_parameters`)
    to the same picture; an A1111 hires records none of them."""
    from sdlab.pipeline.infotext import from_parameters, to_parameters
    from sdlab.pipeline.png_info import format_parameters, parse_parameters
    from sdlab.pipeline.request import GenerationRequest

    result = tiny.txt2img(PROMPT, seed=SEED, steps=3, sampler="euler_ancestral", schedule="karras", width=64,
                          height=64, hr_convention="comfyui", hr_width=112, hr_height=64, hr_crop="center",
                          hr_upscaler="bislerp", hr_denoise=0.6, hr_seed=HIRES_SEED, hr_cfg_scale=2.5, hr_steps=2)
    text = format_parameters(to_parameters(result.request))
    for label in ("Hires convention: comfyui", "Hires crop: center", f"Hires seed: {HIRES_SEED}",
                  "Hires CFG Scale: 2.5", "Hires upscaler: bislerp", "Hires resize: 112x64"):
        assert label in text
    again = tiny.run(GenerationRequest(**from_parameters(parse_parameters(text))))
    assert again.images[0].size == result.images[0].size == (112, 64)
    assert again.images[0].tobytes() == result.images[0].tobytes()
    plain = tiny.txt2img(PROMPT, seed=SEED, steps=3, width=64, height=64, hr_scale=1.5)
    assert "Hires convention" not in format_parameters(to_parameters(plain.request))


def test_the_cli_draws_the_comfyui_hires_and_its_picture_again(tmp_path, capsys):
    """sdlab txt2img --hr-convention comfyui --hr-upscaler bislerp --hr-seed --hr-cfg-scale --hr-size --hr-crop: the
    Python API's picture; --from-png of it draws it again."""
    from cli_helpers import pixels, run

    flags = ["--steps", "3", "--seed", str(SEED), "--sampler", "euler_ancestral", "--schedule", "karras", "--width",
             "64", "--height", "64", "--cfg-scale", "5", "--hr-convention", "comfyui", "--hr-size", "112x64",
             "--hr-crop", "center", "--hr-upscaler", "bislerp", "--hr-denoise", "0.6", "--hr-seed", str(HIRES_SEED),
             "--hr-cfg-scale", "2.5", "--no-progress"]
    code, _, err = run(["txt2img", PROMPT, *flags, "--out", str(tmp_path / "a.png")], capsys)
    assert code == 0, err
    code, _, err = run(["txt2img", "--from-png", str(tmp_path / "a.png"), "--out", str(tmp_path / "b.png"),
                        "--no-progress"], capsys)
    assert code == 0, err
    code, _, err = run(["txt2img", PROMPT, "--steps", "2", "--width", "72", "--height", "40", "--hr-convention",
                        "comfyui", "--hr-scale", "1.37", "--out", str(tmp_path / "c.png"), "--no-progress"], capsys)
    assert code == 2 and "would draw 100x56 px from 72x40" in err and "Traceback" not in err, err
    assert not (tmp_path / "c.png").exists()
    drawn = sdlab.load().txt2img(PROMPT, seed=SEED, steps=3, sampler="euler_ancestral", schedule="karras",
                                 width=64, height=64, cfg_scale=5.0, hr_convention="comfyui", hr_width=112,
                                 hr_height=64, hr_crop="center", hr_upscaler="bislerp", hr_denoise=0.6,
                                 hr_seed=HIRES_SEED, hr_cfg_scale=2.5)
    assert pixels(tmp_path / "a.png").shape == (64, 112, 3)
    assert np.array_equal(pixels(tmp_path / "a.png"), np.asarray(drawn.images[0]))
    assert np.array_equal(pixels(tmp_path / "b.png"), pixels(tmp_path / "a.png"))


def test_a_batch_of_the_graph_is_comfyuis_batch(monkeypatch, tiny):
    """batch_noise "comfyui" (the ComfyUI API's graphs): a batch of 2 through both KSamplers is ComfyUI's, each
    KSampler's noise one draw of the batch from its own seed and euler_ancestral's step noise one (2, 4, h, w) draw a
    step from its seed + 1; latents within 1e-5."""
    first = dict(sampler="euler_ancestral", steps=3)
    second = dict(sampler="euler_ancestral", steps=3, denoise=0.5, method="bislerp", scale=1.5)
    runs, _ = both_passes(monkeypatch, tiny, sampler="euler_ancestral", schedule="karras", steps=3, batch_size=2,
                          batch_noise="comfyui", hr_convention="comfyui", hr_upscaler="bislerp", hr_denoise=0.5,
                          hr_steps=3, hr_scale=1.5, hr_seed=HIRES_SEED, hr_cfg_scale=3.0)
    reference = comfyui_graph(tiny, runs, first, second, lambda samples: latent_upscale_by(samples, 1.5))
    assert reference.shape[0] == 2 and runs[1]["out"].abs().max() > 0.1
    torch.testing.assert_close(runs[1]["out"], reference, rtol=1e-5, atol=1e-5)


def test_each_picture_of_a_batch_records_its_own_hires_seed(tiny):
    """Picture i's second pass draws from hr_seed + i, as its first from seed + i: its infotext says so, and read back
    (`from_parameters`) draws picture i again; with a variation seed every picture's is hr_seed, as its seed."""
    from sdlab.pipeline.infotext import from_parameters, to_parameters
    from sdlab.pipeline.png_info import format_parameters, parse_parameters
    from sdlab.pipeline.request import GenerationRequest

    result = tiny.txt2img(PROMPT, seed=SEED, steps=2, sampler="euler", width=64, height=64, batch_size=2,
                          hr_convention="comfyui", hr_scale=1.5, hr_seed=HIRES_SEED)
    text = format_parameters(to_parameters(result.request, index=1))
    assert f"Seed: {SEED + 1}," in text and f"Hires seed: {HIRES_SEED + 1}," in text
    again = tiny.run(GenerationRequest(**from_parameters(parse_parameters(text))))
    off = np.abs(np.asarray(again.images[0], dtype=int) - np.asarray(result.images[1], dtype=int))
    assert off.max() <= 2           # a batch of 1 against one of 2: the matmuls' rounding only
    varied = tiny.txt2img(PROMPT, seed=SEED, steps=2, sampler="euler", width=64, height=64, batch_size=2,
                          subseed=9, subseed_strength=0.3, hr_scale=1.5, hr_seed=HIRES_SEED)
    assert f"Hires seed: {HIRES_SEED}," in format_parameters(to_parameters(varied.request, index=1))


@pytest.mark.parametrize("subseed_strength", [0.0, 0.3])
def test_a_hires_seed_set_to_the_seed_draws_every_batch_as_unset(tiny, subseed_strength):
    """Batch k of a batch count: hr_seed follows the seed's rule (moves on with it; with a variation seed, stays with
    it as A1111's seed does), so hr_seed == seed gives each batch's second pass the seeds an unset one gives."""
    from sdlab.pipeline.hires import second_pass_request
    from sdlab.pipeline.request import GenerationRequest, next_batch

    def second_seeds(**more):
        req = tiny.resolve(GenerationRequest(prompt=PROMPT, seed=5, steps=2, width=64, height=64, batch_size=2,
                                             subseed=9, subseed_strength=subseed_strength, hr_scale=1.5, **more)).request
        return [second_pass_request(next_batch(req, k), 8).seeds() for k in range(3)]

    assert second_seeds(hr_seed=5) == second_seeds()
