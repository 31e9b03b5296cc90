"""The hires fix (A1111 semantics) on the shipped model, 64 px -> 128 px: the result equals the two passes run
by hand through the public API, the sizes follow A1111's target resolution, the second pass's schedule is
A1111's fix-steps tail, and the infotext carries A1111's keys."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import sdlab
from sdlab.checkpoints.upscaler import load_upscaler
from sdlab.diffusion.brownian import BrownianTreeNoise
from sdlab.diffusion.discretization import discretize
from sdlab.pipeline import generate as generate_module
from sdlab.pipeline import plan as plan_module
from sdlab.pipeline.generate import decode_latents, encode_image, sample_latents
from sdlab.pipeline.hires import find_upscaler, hires_upscaler, is_latent_upscaler
from sdlab.pipeline.images import pil_to_tensor, tensor_to_pil
from sdlab.pipeline.infotext import from_parameters, to_parameters
from sdlab.pipeline.memory import estimate_bytes
from sdlab.pipeline.plan import make_plan
from sdlab.pipeline.png_info import format_parameters, parse_parameters
from sdlab.pipeline.request import GenerationRequest, RequestError, hires_sizes
from sdlab.pipeline.upscale import resize_image, upscale_latent
from test_upscale_models import new_arch_state

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a red apple on a table"
FIRST = dict(steps=4, seed=7, batch_size=2)


@pytest.fixture(scope="module")
def pipe():
    return sdlab.load()


@pytest.fixture
def esrgan_x2(tmp_path: Path) -> Path:
    path = tmp_path / "RealESRGAN_x2_random.safetensors"
    save_file(new_arch_state(2, seed=3), path)
    return path


def _array(images) -> np.ndarray:
    return np.stack([np.asarray(image.convert("RGB"), dtype=np.int16) for image in images])


def _second_request(first: GenerationRequest, steps: int, denoise: float, size: tuple[int, int]) -> GenerationRequest:
    """The second pass as a user would write it: img2img at `size`, every `steps` run (A1111's fix-steps path)."""
    return GenerationRequest(PROMPT, steps=steps, seed=first.seed, batch_size=first.batch_size, sampler=first.sampler,
                             schedule=first.schedule, cfg_scale=first.cfg_scale, width=size[0], height=size[1],
                             strength=denoise, img2img_convention="a1111_fix_steps")


@pytest.mark.parametrize("mode", ["Latent", "Latent (bicubic antialiased)", "Latent (nearest)"])
def test_latent_hires_equals_the_two_passes_by_hand(pipe, mode: str) -> None:
    calls = []
    result = pipe.txt2img(PROMPT, **FIRST, hr_scale=2, hr_upscaler=mode, hr_steps=3, hr_denoise=0.6,
                          progress=lambda info: calls.append(info.i))
    assert [image.size for image in result.images] == [(128, 128)] * 2
    assert result.seeds == [7, 8] and result.request.width == 64 and result.request.hr_upscaler == mode
    assert calls == [0, 1, 2, 3, 4, 5, 6]                              # 4 first-pass steps, then 3

    bundle = pipe.bundle
    first = pipe.resolve(GenerationRequest(PROMPT, **FIRST))
    z = sample_latents(bundle, first)                                  # (2, 4, 16, 16)
    z = upscale_latent(z, 32, 32, mode)                                # (2, 4, 32, 32)
    second = make_plan(bundle, _second_request(first.request, 3, 0.6, (128, 128)), from_latent=True)
    by_hand = tensor_to_pil(decode_latents(bundle, sample_latents(bundle, second, init_latent=z)))
    assert np.array_equal(_array(result.images), _array(by_hand))


@pytest.mark.parametrize("upscaler", ["Lanczos", "esrgan"])
def test_pixel_hires_equals_txt2img_resize_encode_and_latent_second_pass_by_hand(pipe, esrgan_x2: Path,
                                                                                 upscaler: str) -> None:
    """A1111's pixel path: decode, resize, encode (sdlab: the posterior mean), then the same second pass as after
    a latent upscale, noised with each seed's first fresh draw."""
    name = str(esrgan_x2) if upscaler == "esrgan" else upscaler
    result = pipe.txt2img(PROMPT, **FIRST, hr_scale=2, hr_upscaler=name, hr_denoise=0.5)
    assert result.request.hr_steps == 0                                # 0: as many steps as the first pass

    network = load_upscaler(esrgan_x2) if upscaler == "esrgan" else upscaler
    firsts = pipe.txt2img(PROMPT, **FIRST)
    pixels = pil_to_tensor([resize_image(image, network, (128, 128)) for image in firsts.images])  # (2, 3, 128, 128)
    z = encode_image(pipe.bundle, pixels)                             # (2, 4, 32, 32) posterior means
    second = make_plan(pipe.bundle, _second_request(firsts.request, 4, 0.5, (128, 128)), from_latent=True)
    by_hand = tensor_to_pil(decode_latents(pipe.bundle, sample_latents(pipe.bundle, second, init_latent=z)))
    assert np.array_equal(_array(result.images), _array(by_hand))


def test_pixel_second_pass_noise_is_each_seeds_first_fresh_draw(pipe, monkeypatch) -> None:
    """A1111 `sample_hr_pass`: `noise = ImageRNG(shape, seeds, ...).next()` after the encode, for every upscaler."""
    starts = []
    real = generate_module._start
    monkeypatch.setattr(generate_module, "_start", lambda *a, **k: starts.append(real(*a, **k)) or starts[-1])
    pipe.txt2img(PROMPT, **FIRST, hr_scale=2, hr_upscaler="Lanczos", hr_steps=2)
    noise = torch.stack([torch.randn((4, 32, 32), generator=torch.Generator().manual_seed(seed)) for seed in (7, 8)])
    assert torch.equal(starts[-1].noise.cpu(), noise)


def test_the_hires_upscaler_runs_in_fp32_whatever_the_models_dtype(esrgan_x2: Path) -> None:
    """The hires fix's upscaler network runs in its own ``auto`` dtype, fp32, as `sdlab upscale --dtype auto`
    runs it (README): in a bf16 model's dtype (``auto`` for SD1.5 / SDXL on a bf16 CPU or CUDA) a Real-ESRGAN-size
    RRDBNet moves its pixels by up to 8/255 (mean 0.13-0.48, PSNR 48-54 dB), more than bf16 moves an SD1.5 picture."""
    bundle = sdlab.load(dtype="bf16").bundle
    request = GenerationRequest(PROMPT, hr_upscaler=str(esrgan_x2))
    network = hires_upscaler(request, bundle)
    assert bundle.dtype == torch.bfloat16
    assert {p.dtype for p in network.net.parameters()} == {torch.float32}


def test_the_upscaler_changes_the_picture(pipe, esrgan_x2: Path) -> None:
    pictures = [_array(pipe.txt2img(PROMPT, steps=4, seed=7, hr_scale=2, hr_upscaler=name).images)
                for name in ("Latent", "Lanczos", str(esrgan_x2))]
    assert not np.array_equal(pictures[0], pictures[1]) and not np.array_equal(pictures[1], pictures[2])


def test_nearest_is_a1111s_pixel_upscaler(pipe, tmp_path: Path) -> None:
    """A1111's "Nearest" (`UpscalerNearest`) resizes the picture; "Latent (nearest)" is its latent mode."""
    fields = from_parameters(parse_parameters("an apple\nSteps: 4, Seed: 7, Size: 64x64, Denoising strength: 0.5, "
                                              "Hires upscale: 2, Hires upscaler: Nearest"))
    assert fields["hr_upscaler"] == "Nearest" and find_upscaler("Nearest", [tmp_path]) == "Nearest"
    resolved = pipe.resolve(GenerationRequest(PROMPT, steps=4, seed=7, hr_scale=2, hr_upscaler="Nearest")).request
    assert resolved.hr_upscaler == "Nearest" and not is_latent_upscaler(resolved.hr_upscaler)
    pictures = [_array(pipe.txt2img(PROMPT, steps=4, seed=7, hr_scale=2, hr_steps=2, hr_upscaler=name).images)
                for name in ("Nearest", "Latent (nearest)")]
    assert not np.array_equal(pictures[0], pictures[1])


def test_hires_at_scale_1_starts_from_the_first_pictures_whatever_the_upscaler(pipe, esrgan_x2: Path) -> None:
    """A1111's `resize_image` runs the upscaler only to grow the picture: a scale-1 pass redraws the first one."""
    options = dict(steps=4, seed=7, hr_scale=1, hr_steps=2, hr_denoise=0.5)
    pictures = [_array(pipe.txt2img(PROMPT, **options, hr_upscaler=name).images)
                for name in ("Lanczos", "Nearest", str(esrgan_x2))]
    assert np.array_equal(pictures[0], pictures[1]) and np.array_equal(pictures[0], pictures[2])


def test_variation_seeds_carry_into_the_second_pass(pipe) -> None:
    options = dict(steps=4, seed=7, subseed=100, subseed_strength=0.5, batch_size=2, hr_scale=2, hr_upscaler="Lanczos")
    result = pipe.txt2img(PROMPT, **options)
    second = pipe.txt2img(PROMPT, **{**options, "batch_size": 1, "subseed": 101}).images[0]
    # image 1 (seed 7, subseed 101) is the picture drawn alone, up to batch rounding (1/255 on a few pixels);
    # a wrong subseed in the second pass would change it everywhere
    difference = np.abs(_array(result.images[1:]).astype(int) - _array([second]).astype(int))
    assert difference.max() <= 1 and difference.mean() < 0.01, (difference.max(), difference.mean())


def test_second_pass_schedule_is_a1111s_fix_steps_tail(pipe) -> None:
    """A1111 hands the second pass its steps: a schedule of int(steps / denoise) steps whose last `steps` run."""
    request = GenerationRequest(PROMPT, steps=6, seed=1, width=64, height=64, strength=0.4,
                                img2img_convention="a1111_fix_steps")
    plan = make_plan(pipe.bundle, request, from_latent=True)
    full = discretize(plan.request.schedule, pipe.bundle.model_sampling.schedule, 15, final=plan.sampler.final_sigma,
                      scheduler=plan.sampler.spacing)
    assert plan.steps_run == 6
    assert torch.allclose(plan.sigmas.cpu(), full[-7:])


@pytest.mark.parametrize("denoise, stretched", [(0.5, 6), (1.5, 3)])
def test_the_second_pass_brownian_tree_spans_a1111s_whole_stretched_schedule(pipe, monkeypatch, denoise,
                                                                             stretched) -> None:
    """A1111's `sample_hr_pass` calls `sample_img2img(..., steps=hr_second_pass_steps)`, whose
    `setup_img2img_steps` stretches the schedule to int(steps / min(denoising_strength, 0.999)) and whose SDE
    noise sampler spans all of it (`create_noise_sampler(x, sigmas, p)` with `sigmas = self.get_sigmas(p,
    steps)`: `sigma_min, sigma_max = sigmas[sigmas > 0].min(), sigmas.max()`), not only the steps that run."""
    spans, for_sigmas = [], BrownianTreeNoise.for_sigmas
    spy = lambda like, sigmas, *rest: spans.append(sigmas) or for_sigmas(like, sigmas, *rest)    # noqa: E731
    monkeypatch.setattr(BrownianTreeNoise, "for_sigmas", staticmethod(spy))
    pipe.txt2img(PROMPT, steps=4, seed=7, sampler="DPM++ 2M SDE", hr_scale=2, hr_steps=3, hr_denoise=denoise)
    plan = pipe.resolve(GenerationRequest(PROMPT, steps=4, seed=7, sampler="DPM++ 2M SDE"))
    a1111 = discretize(plan.request.schedule, pipe.bundle.model_sampling.schedule, stretched,
                       final=plan.sampler.final_sigma, scheduler=plan.sampler.spacing)
    second = spans[1].cpu().double()
    assert [float(second[second > 0].min()), float(second.max())] == \
        pytest.approx([float(a1111[a1111 > 0].min()), float(a1111.max())])


def test_hr_denoise_above_1_draws_as_1_and_is_recorded_as_given(pipe) -> None:
    """A1111's hires pass reads min(denoising_strength, 0.999) (`setup_img2img_steps`) and records the value sent,
    as its img2img does."""
    options = dict(steps=3, seed=2, hr_scale=1.5, hr_steps=2)
    above = pipe.txt2img(PROMPT, **options, hr_denoise=1.0000001)
    one = pipe.txt2img(PROMPT, **options, hr_denoise=1.0)
    assert np.array_equal(_array(above.images), _array(one.images))
    assert above.request.hr_denoise == 1.0000001
    assert "Denoising strength: 1.0000001, " in format_parameters(to_parameters(above.request))


def test_sizes_follow_a1111s_target_resolution() -> None:
    assert hires_sizes(512, 768, 1.5, None, None) == ((768, 1152), (768, 1152))
    assert hires_sizes(512, 768, 2.0, 1024, 0) == ((1024, 1536), (1024, 1536))      # one side keeps the aspect
    assert hires_sizes(512, 768, None, 0, 1000) == ((664, 1000), (664, 1000))      # 666 snapped down to 8
    assert hires_sizes(512, 512, None, 1024, 768) == ((1024, 1024), (1024, 768))   # cover, then crop
    assert hires_sizes(100, 60, 1.5, None, None) == ((144, 88), (144, 88))         # int(150), int(90), snapped


def _a1111_hr_upscale_to(width: int, height: int, hr_scale: float | None, hr_resize_x: int,
                         hr_resize_y: int) -> tuple[int, int]:
    """A1111 processing.py `calculate_target_resolution`'s (hr_upscale_to_x, hr_upscale_to_y), transcribed."""
    if hr_resize_x == 0 and hr_resize_y == 0:
        return int(width * hr_scale), int(height * hr_scale)
    if hr_resize_y == 0:
        return hr_resize_x, hr_resize_x * height // width
    if hr_resize_x == 0:
        return hr_resize_y * width // height, hr_resize_y
    if width / height < hr_resize_x / hr_resize_y:
        return hr_resize_x, hr_resize_x * height // width
    return hr_resize_y * width // height, hr_resize_y


@pytest.fixture(scope="module")
def sdxl_pipe():
    from bundle_fixtures import tiny_bundle
    from sdlab.api import Pipeline

    return Pipeline(tiny_bundle("sdxl", seed=11))


@pytest.mark.parametrize("hires", [dict(hr_scale=1.3), dict(hr_width=96, hr_height=64), dict(hr_width=0, hr_height=72),
                                   dict(hr_scale=1.5, original_size=(1024, 1024))])
def test_sdxl_second_pass_is_conditioned_on_a1111s_upscaled_size(sdxl_pipe, monkeypatch, hires) -> None:
    """A1111's `calculate_hr_conds` conditions the second pass on (hr_upscale_to_y, hr_upscale_to_x), the size
    before the centred crop and unsnapped, as original and target size of the prompt and the negative
    (`sd_models_xl.get_learned_conditioning`); a size the request sets stays."""
    from sdlab.pipeline import conditioning

    seen, real = [], conditioning.sdxl_size_conds
    monkeypatch.setattr(conditioning, "sdxl_size_conds",
                        lambda *args, **kwargs: seen.append(real(*args, **kwargs).flatten().tolist()) or real(*args, **kwargs))
    sdxl_pipe.txt2img("a cat", "ugly", width=64, height=48, steps=2, seed=1, hr_upscaler="Latent", hr_denoise=0.5,
                      **hires)
    x, y = _a1111_hr_upscale_to(64, 48, hires.get("hr_scale"), hires.get("hr_width", 0), hires.get("hr_height", 0))
    original = hires.get("original_size", (y, x))
    assert seen[-2:] == [[*original, 0, 0, y, x]] * 2                              # the prompt's, the negative's
    assert seen[0] == [*hires.get("original_size", (48, 64)), 0, 0, 48, 64]      # the first pass: its own size


@pytest.mark.parametrize("spelling", ["A1111 API", "Euler a", "euler_ancestral", None])
def test_sdxl_hires_conditioning_is_a1111s_under_every_spelling(sdxl_pipe, monkeypatch, spelling) -> None:
    """The hires fix is A1111's whatever the sampler's spelling and the request's conventions (diffusers ships no
    hires fix; its SDXL img2img would condition on the 96x80 it draws): a hires size that crops conditions the second
    pass on A1111's hr_upscale_to, 96x96, through the A1111 API (`_request` of A1111's fields) as through the
    Python API under A1111's, ComfyUI's and the default (diffusers') conventions."""
    from sdlab.pipeline import conditioning
    from sdlab.server.a1111 import Txt2ImgIn, _request

    seen, real = [], conditioning.sdxl_size_conds
    monkeypatch.setattr(conditioning, "sdxl_size_conds",
                        lambda *args, **kwargs: seen.append(real(*args, **kwargs).flatten().tolist()) or real(*args, **kwargs))
    run = dict(width=64, height=64, steps=2, seed=1)
    if spelling == "A1111 API":
        body = Txt2ImgIn(prompt="a cat", negative_prompt="ugly", sampler_name="Euler a", cfg_scale=7, enable_hr=True,
                         hr_resize_x=96, hr_resize_y=80, hr_upscaler="Latent", denoising_strength=0.5, **run)
        result = sdxl_pipe.run(_request(body))
    else:
        result = sdxl_pipe.txt2img("a cat", "ugly", sampler=spelling, hr_width=96, hr_height=80, hr_upscaler="Latent",
                                   hr_denoise=0.5, **run)
    x, y = _a1111_hr_upscale_to(64, 64, None, 96, 80)
    assert (x, y) == (96, 96) and result.images[0].size == (96, 80)
    assert seen[-2:] == [[y, x, 0, 0, y, x]] * 2


def test_hires_size_crops_the_centre(pipe) -> None:
    result = pipe.txt2img(PROMPT, steps=4, seed=7, hr_width=128, hr_height=96, hr_steps=2)
    assert result.images[0].size == (128, 96)
    bundle = pipe.bundle
    first = pipe.resolve(GenerationRequest(PROMPT, steps=4, seed=7))
    z = upscale_latent(sample_latents(bundle, first), 32, 32, "Latent")[..., 4:28, :]   # 8 latent rows off, centred
    second = make_plan(bundle, _second_request(first.request, 2, 0.7, (128, 96)), from_latent=True)
    by_hand = tensor_to_pil(decode_latents(bundle, sample_latents(bundle, second, init_latent=z.contiguous())))
    assert np.array_equal(_array(result.images), _array(by_hand))


def test_infotext_has_a1111s_keys_and_reads_back(pipe, esrgan_x2: Path) -> None:
    plan = pipe.resolve(GenerationRequest(PROMPT, steps=4, seed=7, hr_scale=2, hr_steps=3, hr_denoise=0.45,
                                          hr_upscaler="bicubic"))
    text = format_parameters(to_parameters(plan.request))
    assert "Size: 64x64, " in text and "Denoising strength: 0.45, Hires upscale: 2, Hires steps: 3, " \
        "Hires upscaler: Latent (bicubic)" in text
    fields = from_parameters(parse_parameters(text))
    assert {k: fields[k] for k in ("hr_scale", "hr_steps", "hr_upscaler", "hr_denoise")} == \
        {"hr_scale": 2.0, "hr_steps": 3, "hr_upscaler": "Latent (bicubic)", "hr_denoise": 0.45}
    assert "strength" not in fields

    sized = pipe.resolve(GenerationRequest(PROMPT, steps=4, seed=7, hr_width=128, hr_upscaler=str(esrgan_x2)))
    text = format_parameters(to_parameters(sized.request))
    assert "Hires resize: 128x0, Hires upscaler: RealESRGAN_x2_random" in text and "Hires upscale:" not in text
    assert "Hires steps" not in text                                    # A1111 leaves out 0 (as many as the first)
    fields = from_parameters(parse_parameters(text))
    assert (fields["hr_width"], fields["hr_height"], fields["hr_denoise"]) == (128, 0, 0.7)


@pytest.mark.parametrize("options, message", [
    (dict(hr_scale=2, hr_upscaler="Latent (sharp)"), "unknown hires upscaler"),
    (dict(hr_scale=2, hr_upscaler="missing.pth"), "unknown hires upscaler"),
    (dict(hr_scale=0.5), "hr_scale must be at least 1"),
    (dict(hr_scale=float("nan")), "hr_scale must be a finite number"),
    (dict(hr_scale=200), "each side must lie in"),
    (dict(hr_width=9000), "each side must lie in"),
    (dict(hr_scale=2, hr_denoise=0.0), "hr_denoise"),
    (dict(hr_scale=2, hr_denoise=-0.5), "hr_denoise"),
    (dict(hr_scale=2, hr_steps=-1), "hr_steps"),
    (dict(hr_steps=5), "need hr_scale"),
    (dict(hr_upscaler="Lanczos"), "need hr_scale"),
])
def test_bad_hires_values_are_one_request_error(pipe, options, message) -> None:
    with pytest.raises(RequestError, match=message):
        pipe.resolve(GenerationRequest(PROMPT, steps=4, **options))


def test_hires_is_for_txt2img(pipe) -> None:
    image = pipe.txt2img(PROMPT, steps=2, seed=1).images[0]
    with pytest.raises(RequestError, match="for txt2img"):
        pipe.img2img(PROMPT, image, hr_scale=2)


def test_memory_of_the_second_pass_is_checked_up_front(pipe, monkeypatch) -> None:
    request = GenerationRequest(PROMPT, steps=4, seed=1, hr_scale=8)
    first = pipe.resolve(GenerationRequest(PROMPT, steps=4, seed=1)).request
    free = estimate_bytes(pipe.bundle, replace(first, width=96, height=96))   # 64 and 96 px fit, 512 px does not
    assert estimate_bytes(pipe.bundle, replace(first, width=512, height=512)) > free
    monkeypatch.setattr(plan_module, "available_bytes", lambda device: free)
    with pytest.raises(RequestError, match="512x512"):
        pipe.resolve(request)
    pipe.resolve(replace(request, hr_scale=1.5))                       # 96 px fits


def test_latent_second_pass_starts_from_the_upscaled_latent_plus_fresh_seed_noise(pipe) -> None:
    """A1111: x = upscaled latent + sigma_0 * noise, the noise drawn first from a fresh generator on each seed."""
    seen = []
    pipe.txt2img(PROMPT, **FIRST, hr_scale=2, hr_steps=3, hr_denoise=0.6, sampler="Euler",
                 progress=lambda info: seen.append(info))
    first = pipe.resolve(GenerationRequest(PROMPT, **FIRST, sampler="Euler"))
    z = upscale_latent(sample_latents(pipe.bundle, first), 32, 32, "Latent")          # (2, 4, 32, 32)
    second = make_plan(pipe.bundle, _second_request(first.request, 3, 0.6, (128, 128)), from_latent=True)
    noise = torch.stack([torch.randn(z.shape[1:], generator=torch.Generator().manual_seed(seed)) for seed in (7, 8)])
    start = seen[4]                                                    # the second pass's first step
    assert start.sigma == pytest.approx(float(second.sigmas[0]))
    assert torch.allclose(start.x, z + float(second.sigmas[0]) * noise, atol=1e-5)


def test_hires_with_a_refiner_is_refused_before_drawing(pipe) -> None:
    with_refiner = sdlab.api.Pipeline(pipe.bundle, refiner=pipe.bundle)
    with pytest.raises(RequestError, match="refiner"):
        with_refiner.txt2img(PROMPT, steps=2, hr_scale=2)
