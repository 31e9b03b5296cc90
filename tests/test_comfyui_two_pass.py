"""ComfyUI's two-pass graph (KSampler -> LatentUpscale(By) -> KSampler, the request's hires fix under hr_convention
"comfyui") with ControlNets on its KSamplers' conditionings, and from an init picture (VAEEncode -> KSampler at its
denoise -> LatentUpscale(By) -> KSampler).

The references are ComfyUI's code, transcribed (comfyanonymous/ComfyUI a0b45478 / e60e19b):

- ControlNets: each KSampler runs its conditionings' ControlNets (comfy/samplers.py ``sampling_function`` ->
  ``get_control`` at each model call). ``ControlBase.pre_run`` sets the sigma window at each KSampler's start from
  the model's percent_to_sigma (the same window in both passes), and ``ControlNet.get_control`` upscales the
  original hint with ``common_upscale(..., x_noisy.shape[3] * 8, x_noisy.shape[2] * 8, "nearest-exact",
  "center")`` whenever the latent's size is not the hint's: the second KSampler's hint is cut and resized from the
  picture afresh at the upscaled size (``cleanup`` drops the first pass's). The transcription
  (test_comfyui_controlnet.ComfyControlNet, its hint sized by the latent of each call) is put into the U-Net of a run
  without sdlab's controls; latents compared bit for bit, as test_comfyui_controlnet compares one pass.
- img2img: nodes.py ``VAEEncode`` -> ``common_ksampler`` at the first KSampler's denoise (comfy/samplers.py
  ``KSampler.set_steps``: the last steps + 1 sigmas of int(steps / denoise)), ``LatentUpscale(By)`` of its
  samples (``common_upscale``), the second ``common_ksampler`` (test_comfyui_hires: ``comfyui_graph``); the init
  latent is the picture's posterior mean (test_comfyui_conventions' img2img). Latents at 1e-5.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import comfy_reference as C
from picture_parity import uint8_pictures
from sdlab.pipeline import generate as G
from sdlab.pipeline.control import ControlInput
from test_comfyui_controlnet import comfyui_control_chain, control_picture, sd1  # noqa: F401
from test_comfyui_conventions import ksampler, sample_euler, sample_euler_ancestral
from test_comfyui_hires import caught_runs
from test_comfyui_latent_upscale import common_upscale, latent_upscale_by

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

PROMPT, NEGATIVE, SEED, HIRES_SEED, CFG = "a red cube", "blurry", 7, 11, 6.0
HIRES = dict(hr_convention="comfyui", hr_upscaler="bislerp", hr_scale=1.5, hr_seed=HIRES_SEED, hr_steps=4,
             hr_cfg_scale=4.0, hr_sampler="euler_ancestral", hr_schedule="karras", hr_denoise=0.6)


# -- ControlNets on both KSamplers ---------------------------------------------------------------------------------
def two_pass(pipe, **options):
    return pipe.txt2img(PROMPT, NEGATIVE, steps=5, cfg_scale=CFG, seed=SEED, width=48, height=32, sampler="euler",
                        schedule="karras", **HIRES, **options).images


def comfyui_controlled(monkeypatch, pipe, units):
    """The two-pass picture of `pipe` without sdlab's controls, its U-Net given ComfyUI's transcribed control chain
    of `units` (path, picture, strength, start_percent, end_percent) at each call of either pass: the window by the
    call's sigma (pre_run at each KSampler: one window), the hint cut and resized to the call's latent size."""
    with comfyui_control_chain(monkeypatch, pipe, units) as sizes:
        runs, images = caught_runs(monkeypatch, lambda: two_pass(pipe, control_convention="comfyui"))
    assert sizes == {(16, 24), (24, 36)}            # both passes' latents (factor 2), the hint at each
    return runs, images


def test_controlnets_on_both_ksamplers_draw_comfyuis_two_passes(monkeypatch, sd1):  # noqa: F811
    """Two ControlNets in a row on both KSamplers' conditionings (a 60 x 30 picture cut to each pass's aspect and
    size; windows 0-0.55 and 0.3-1 cross the second pass's sigmas): sdlab's hires fix with the request's controls
    under control_convention comfyui is ComfyUI's two KSamplers, the second's hint cut from the picture at the
    upscaled size, bit for bit."""
    pipe, (first, second, _) = sd1
    units = [(first, control_picture(0), 0.8, 0.0, 0.55), (second, control_picture(1), 0.6, 0.3, 1.0)]
    controls = [ControlInput(path, picture, strength, start, end) for path, picture, strength, start, end in units]
    ours, ours_images = caught_runs(monkeypatch, lambda: two_pass(pipe, controls=controls,
                                                                 control_convention="comfyui"))
    reference, reference_images = comfyui_controlled(monkeypatch, pipe, units)
    plain, _ = caught_runs(monkeypatch, lambda: two_pass(pipe))
    assert len(ours) == len(reference) == 2
    assert (plain[1]["out"] - reference[1]["out"]).abs().max() > 0.1       # the controls change the second pass
    for run, expected in zip(ours, reference):
        assert torch.equal(run["out"], expected["out"])
    assert np.array_equal(uint8_pictures(ours_images), uint8_pictures(reference_images))


# -- from an init picture ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    import sdlab

    return sdlab.load()                                  # the shipped sdlab-tiny: v-prediction, VAE factor 4


@pytest.mark.parametrize("first, second", [
    (dict(sampler="euler", denoise=0.7), dict(sampler="euler_ancestral", denoise=0.6, method="bislerp", scale=1.5)),
    (dict(sampler="euler_ancestral", denoise=0.45), dict(sampler="euler", denoise=0.5, method="nearest-exact",
                                                         scale=2.0)),
])
def test_a_two_pass_graph_from_a_vae_encode_is_comfyuis_two_ksamplers(monkeypatch, tiny, first, second):
    """VAEEncode -> KSampler (denoise 0.7 / 0.45) -> LatentUpscaleBy -> KSampler (its own seed, CFG, sampler,
    denoise): img2img with hr_convention comfyui is ComfyUI's two common_ksampler calls, the first on the init
    picture's latent + its seed's noise at the first of its denoise sigmas, the second on the upscaled samples;
    latents within 1e-5. The first pass is the plain img2img's, and the second pass starts from it, not from
    txt2img's."""
    from bundle_fixtures import init_picture

    init = init_picture(64)
    options = dict(seed=SEED, cfg_scale=5.0, steps=5, sampler=first["sampler"], schedule="karras")
    hires = dict(hr_convention="comfyui", hr_upscaler=second["method"], hr_scale=second["scale"], hr_seed=HIRES_SEED,
                 hr_steps=4, hr_cfg_scale=3.0, hr_sampler=second["sampler"], hr_schedule="karras",
                 hr_denoise=second["denoise"])
    runs, result = caught_runs(monkeypatch, lambda: tiny.img2img(PROMPT, init, first["denoise"], **options, **hires))
    assert len(runs) == 2
    ms, bundle = C.ModelSamplingDiscrete(), tiny.bundle
    scale, sigma_max = bundle.scaling_factor, bundle.model_sampling.sigma_max
    samplers = {"euler": sample_euler, "euler_ancestral": sample_euler_ancestral}
    sigmas = C.ksampler_sigmas(ms, first["sampler"], "karras", 5, first["denoise"])
    torch.testing.assert_close(runs[0]["sigmas"], sigmas, rtol=2e-6, atol=0)
    latent = G.encode_image(bundle, G.pil_to_tensor(init))                 # (1, 4, 16, 16): the posterior mean
    samples = ksampler(samplers[first["sampler"]], runs[0]["model"], sigmas, SEED, latent, sigma_max)
    torch.testing.assert_close(runs[0]["out"], samples, rtol=1e-5, atol=1e-5)
    samples = samples / scale                                                          # process_latent_out
    width, height = latent_upscale_by(samples, second["scale"])
    upscaled = common_upscale(samples, width, height, second["method"], "disabled")  # (1, 4, 24, 24) / (32, 32)
    sigmas = C.ksampler_sigmas(ms, second["sampler"], "karras", 4, second["denoise"])
    torch.testing.assert_close(runs[1]["sigmas"], sigmas, rtol=2e-6, atol=0)
    reference = ksampler(samplers[second["sampler"]], runs[1]["model"], sigmas, HIRES_SEED, upscaled * scale,
                         sigma_max)
    assert runs[1]["out"].shape == reference.shape and reference.abs().max() > 0.1
    torch.testing.assert_close(runs[1]["out"], reference, rtol=1e-5, atol=1e-5)
    assert result.images[0].size == (64 * second["scale"],) * 2
    plain, _ = caught_runs(monkeypatch, lambda: tiny.img2img(PROMPT, init, first["denoise"], **options))
    assert torch.equal(plain[0]["out"], runs[0]["out"])
    from_noise, _ = caught_runs(monkeypatch, lambda: tiny.txt2img(PROMPT, width=64, height=64, **options, **hires))
    assert (from_noise[1]["out"] - runs[1]["out"]).abs().max() > 0.1


def test_the_hires_fix_from_an_init_picture_is_comfyuis_alone(tiny):
    """A1111's hires fix is txt2img's (its img2img has none); ComfyUI's graph carries a noise mask on to its second
    KSampler, which sdlab does not draw: both one RequestError."""
    from bundle_fixtures import init_picture, lower_right_mask
    from sdlab.pipeline.request import RequestError

    init = init_picture(64)
    with pytest.raises(RequestError, match="the hires fix is for txt2img"):
        tiny.img2img(PROMPT, init, 0.5, steps=2, hr_scale=1.5)
    with pytest.raises(RequestError, match="hr_convention comfyui.* without a mask"):
        tiny.inpaint(PROMPT, init, lower_right_mask(64), steps=2, sampler="euler", hr_convention="comfyui",
                     hr_scale=1.5)


IMG2IMG_HIRES = dict(sampler="euler_ancestral", schedule="karras", steps=3, seed=SEED, cfg_scale=5.0,
                     hr_convention="comfyui", hr_scale=1.5, hr_upscaler="bislerp", hr_denoise=0.6,
                     hr_seed=HIRES_SEED, hr_cfg_scale=2.5, hr_steps=2)


def test_the_infotext_of_an_img2img_hires_keeps_both_strengths_and_draws_it_again(tiny):
    """An img2img hires picture's Denoising strength is its first pass's (img2img's), its second pass's sdlab's
    Hires denoising strength; read back (`from_parameters`) with the init picture they draw it again. A txt2img
    hires keeps A1111's one Denoising strength, the second pass's."""
    from bundle_fixtures import init_picture
    from sdlab.pipeline.infotext import from_parameters, to_parameters
    from sdlab.pipeline.png_info import format_parameters, parse_parameters
    from sdlab.pipeline.request import GenerationRequest

    init = init_picture(64)
    result = tiny.img2img(PROMPT, init, 0.7, **IMG2IMG_HIRES)
    text = format_parameters(to_parameters(result.request))
    assert "Denoising strength: 0.7," in text and "Hires denoising strength: 0.6," in text, text
    fields = from_parameters(parse_parameters(text))
    assert (fields["strength"], fields["hr_denoise"]) == (0.7, 0.6)
    again = tiny.run(GenerationRequest(**fields, init_image=init))
    assert again.images[0].size == (96, 96)
    assert again.images[0].tobytes() == result.images[0].tobytes()
    plain = tiny.txt2img(PROMPT, width=64, height=64, **IMG2IMG_HIRES)
    plain_text = format_parameters(to_parameters(plain.request))
    assert "Denoising strength: 0.6," in plain_text and "Hires denoising strength" not in plain_text
    assert "strength" not in from_parameters(parse_parameters(plain_text))


def test_the_cli_draws_an_img2img_hires_and_its_picture_again(tmp_path, capsys, tiny):
    """sdlab img2img --hr-convention comfyui --hr-scale ...: the Python API's picture; --from-png of it (with the
    init picture) draws it again; A1111's hires fix on img2img is one error, nothing written."""
    from bundle_fixtures import init_picture
    from cli_helpers import pixels, run

    init = init_picture(64)
    init.save(tmp_path / "init.png")
    flags = ["--steps", "3", "--seed", str(SEED), "--sampler", "euler_ancestral", "--schedule", "karras",
             "--cfg-scale", "5", "--hr-convention", "comfyui", "--hr-scale", "1.5", "--hr-upscaler", "bislerp",
             "--hr-denoise", "0.6", "--hr-seed", str(HIRES_SEED), "--hr-cfg-scale", "2.5", "--hr-steps", "2",
             "--no-progress"]
    code, _, err = run(["img2img", PROMPT, "--init", str(tmp_path / "init.png"), "--strength", "0.7", *flags,
                        "--out", str(tmp_path / "a.png")], capsys)
    assert code == 0, err
    drawn = tiny.img2img(PROMPT, init, 0.7, **IMG2IMG_HIRES)
    assert pixels(tmp_path / "a.png").shape == (96, 96, 3)
    assert np.array_equal(pixels(tmp_path / "a.png"), np.asarray(drawn.images[0]))
    code, _, err = run(["img2img", "--from-png", str(tmp_path / "a.png"), "--init", str(tmp_path / "init.png"),
                        "--out", str(tmp_path / "b.png"), "--no-progress"], capsys)
    assert code == 0, err
    assert np.array_equal(pixels(tmp_path / "b.png"), pixels(tmp_path / "a.png"))
    code, _, err = run(["img2img", PROMPT, "--init", str(tmp_path / "init.png"), "--steps", "2", "--hr-scale", "1.5",
                        "--out", str(tmp_path / "c.png"), "--no-progress"], capsys)
    assert code == 2 and "the hires fix is for txt2img" in err and "Traceback" not in err, err
    assert not (tmp_path / "c.png").exists()


def test_strength_on_the_line_does_not_make_a_txt2img_hires_picture_an_img2img_two_pass(tmp_path, capsys, tiny):
    """img2img --from-png of a ComfyUI *txt2img* hires picture with --strength: the picture's one Denoising strength
    is its second pass's, so it is no img2img two-pass and the redraw is the plain img2img at --strength (the hires
    fields dropped), not a two-pass picture because the line's --strength sat beside the picture's hr_denoise."""
    from bundle_fixtures import init_picture
    from cli_helpers import pixels, run
    from sdlab.pipeline.infotext import HIRES_FIELDS, from_parameters
    from sdlab.pipeline.png_info import parse_parameters, read_parameters
    from sdlab.pipeline.request import GenerationRequest

    init = init_picture(64)
    init.save(tmp_path / "init.png")
    code, _, err = run(["txt2img", PROMPT, "--steps", "3", "--seed", str(SEED), "--sampler", "euler", "--width", "64",
                        "--height", "64", "--hr-convention", "comfyui", "--hr-scale", "1.5", "--hr-denoise", "0.55",
                        "--no-progress", "--out", str(tmp_path / "t.png")], capsys)
    assert code == 0, err
    code, _, err = run(["img2img", "--from-png", str(tmp_path / "t.png"), "--init", str(tmp_path / "init.png"),
                        "--strength", "0.4", "--no-progress", "--out", str(tmp_path / "i.png")], capsys)
    assert code == 0, err
    assert pixels(tmp_path / "i.png").shape == (64, 64, 3)
    assert "Hires" not in read_parameters(tmp_path / "i.png")
    fields = from_parameters(parse_parameters(read_parameters(tmp_path / "t.png")))
    plain = {k: v for k, v in fields.items() if k not in HIRES_FIELDS}
    drawn = tiny.run(GenerationRequest(**plain, strength=0.4, init_image=init))
    assert np.array_equal(pixels(tmp_path / "i.png"), np.asarray(drawn.images[0]))
