"""A1111's Tiling: every padded convolution of the U-Net, its ControlNets and the VAE pads circularly for a run.

The reference is built the way A1111 builds it (`sd_hijack.apply_circular`): diffusers' UNet2DConditionModel,
AutoencoderKL and ControlNetModel with every `Conv2d`'s padding_mode set to "circular", holding the same
random weights as sdlab's networks, on the same inputs. Then: sdlab's own faster convolution paths inside
such a block, the block's restoring of the modes, the picture of a tiling run (its edges wrap around: rolling
the starting noise rolls the picture) in every generation mode, the request's checks and the infotext.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from bundle_fixtures import init_picture, lower_right_mask, tiny_bundle, write_original
from cli_helpers import pixels, run
from controlnet_fixtures import ENCODERS, diffusers_controlnet, write_layout
from picture_parity import CFG, MAX_PIXEL_DIFF, PROMPT, SEED, STEPS, max_pixel_diff
from test_pipeline_parity import NEGATIVE, _generators, _schedulers
from test_pipeline_parity import sd1  # noqa: F401 (a fixture: sdlab's and diffusers' pipelines of one folder)
from test_unet import SMALL, _diffusers_unet, _inputs, _sdlab_from
from test_vae import DEEP, images, reference_pair
from torch import nn

import sdlab.pipeline.generate as generate_module
from sdlab.checkpoints.controlnet import load_controlnet
from sdlab.families.loaded import ModelBundle
from sdlab.models import cpu_kernels, patch_conv
from sdlab.models.circular_padding import circular_padding, padded_convolutions
from sdlab.models.upsampled_conv import upsampled_conv
from sdlab.pipeline.control import ControlInput
from sdlab.pipeline.generate import generate, generate_with_refiner
from sdlab.pipeline.hires import generate_hires
from sdlab.pipeline.infotext import from_parameters, to_parameters
from sdlab.pipeline.plan import make_plan
from sdlab.pipeline.png_info import format_parameters, parse_parameters, read_parameters
from sdlab.pipeline.request import GenerationRequest, RequestError

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SIZE = 32                                # pixels; the tiny VAE has factor 2, the tiny U-Net one downsampling
SHIFT = (6, 4)                           # latent pixels (multiples of the U-Net's 2): (12, 8) pixels


def as_a1111_tiles(*modules: nn.Module) -> None:
    """A1111's `apply_circular(True)`: padding_mode "circular" on every Conv2d of the reference."""
    for module in modules:
        for layer in module.modules():
            if isinstance(layer, nn.Conv2d):
                layer.padding_mode = "circular"


def modes(*modules: nn.Module) -> list[str]:
    return [layer.padding_mode for module in modules for layer in module.modules() if isinstance(layer, nn.Conv2d)]


# ---------------------------------------------------------------- the networks against A1111's way


@pytest.mark.parametrize("name", ["sd1", "sd2", "sdxl"])
def test_unet_matches_diffusers_with_circular_convolutions(name):
    cfg = SMALL[name]
    reference = _diffusers_unet(cfg, seed=0)
    model = _sdlab_from(reference, cfg)
    x, t, context, y, added = _inputs(cfg, 16, 24)              # not square: rows and columns wrap apart
    with torch.no_grad():
        zeros = reference(x, t, context, **added).sample
        with circular_padding(model):
            actual = model(x, t, context, y)
        after = model(x, t, context, y)
        as_a1111_tiles(reference)
        expected = reference(x, t, context, **added).sample
    assert (expected - zeros).abs().max() > 0.05                # the padding shows in the output
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(after, zeros, atol=1e-4, rtol=0)  # zero padding again after the block


def test_unet_in_bf16_stays_within_its_low_precision_bound():
    """As tests/test_unet.py's bound for bf16: max |diff| <= 2% of max |fp32 output|, here against A1111's way."""
    cfg = SMALL["sd1"]
    reference = _diffusers_unet(cfg, seed=4, std=0.05)
    model = _sdlab_from(reference, cfg).to(torch.bfloat16)
    x, t, context, y, added = _inputs(cfg, 8, 12)
    as_a1111_tiles(reference)
    with torch.no_grad(), circular_padding(model):
        expected = reference(x, t, context, **added).sample
        actual = model(x, t, context, y)
    assert actual.dtype == torch.bfloat16
    assert (actual.float() - expected).abs().max() <= 0.02 * expected.abs().max()


def test_vae_matches_diffusers_with_circular_convolutions():
    reference, ours = reference_pair(DEEP)
    img = images(2, 32)[..., :24]                               # 32 x 24 pixels, 4 x 3 latents
    with torch.no_grad():
        zeros = reference.decode(reference.encode(img).latent_dist.mean).sample
        with circular_padding(ours):
            ours_posterior = ours.encode(img)
            ours_picture = ours.decode(ours_posterior.mean)
        as_a1111_tiles(reference)
        theirs_posterior = reference.encode(img).latent_dist
        theirs_picture = reference.decode(theirs_posterior.mean).sample
    assert (theirs_picture - zeros).abs().max() > 0.05
    torch.testing.assert_close(ours_posterior.mean, theirs_posterior.mean, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours_posterior.logvar, theirs_posterior.logvar, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours_picture, theirs_picture, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_controlnet_residuals_match_diffusers_with_circular_convolutions(name, tmp_path):
    from test_controlnet import _inputs as controlnet_inputs

    reference = diffusers_controlnet(ENCODERS[name], seed=0)
    loaded = load_controlnet(write_layout(reference, "original", tmp_path))
    x, t, context, hint, y, added = controlnet_inputs(name)
    with torch.no_grad():
        with circular_padding(loaded.model):
            residuals, middle = loaded.model(x, t, context, hint, y)
        as_a1111_tiles(reference)
        down, mid = reference(x, t, context, hint, conditioning_scale=1.0, return_dict=False, **added)
    for ours, theirs in zip([*residuals, middle], [*down, mid]):
        assert (ours - theirs).abs().max() <= 1e-5 * max(1.0, float(theirs.abs().max()))


@pytest.mark.parametrize("mode", ["txt2img", "img2img"])
def test_pictures_match_diffusers_pipelines_with_circular_convolutions(sd1, mode):  # noqa: F811
    """Whole runs: diffusers' pipeline with A1111's circular convolutions in its U-Net and VAE, and sdlab's
    `tiling=True`, within tests/test_pipeline_parity.py's 2/255."""
    ours, pipe = sd1
    scheduler, options = _schedulers(pipe.scheduler.config)["euler"]
    common = dict(negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=CFG, generator=_generators(),
                  num_images_per_prompt=2, output_type="np")
    ours_common = dict(steps=STEPS, cfg_scale=CFG, seed=SEED, batch_size=2, **options)
    if mode == "txt2img":
        run = StableDiffusionPipeline(**pipe.components)
        reference = lambda: run(PROMPT, width=SIZE, height=SIZE + 16, **common).images   # noqa: E731
        draw = lambda tiling: ours.txt2img(PROMPT, NEGATIVE, width=SIZE, height=SIZE + 16,  # noqa: E731
                                           tiling=tiling, **ours_common)
    else:
        run = StableDiffusionImg2ImgPipeline(**pipe.components)
        reference = lambda: run(PROMPT, image=init_picture(SIZE), strength=0.6, **common).images  # noqa: E731
        draw = lambda tiling: ours.img2img(PROMPT, init_picture(SIZE), strength=0.6,  # noqa: E731
                                           negative_prompt=NEGATIVE, tiling=tiling, **ours_common)
    run.scheduler = scheduler
    run.set_progress_bar_config(disable=True)
    as_a1111_tiles(run.unet, run.vae)
    try:
        expected = reference()
    finally:
        for layer in [*run.unet.modules(), *run.vae.modules()]:
            if isinstance(layer, nn.Conv2d):
                layer.padding_mode = "zeros"
    assert max_pixel_diff(draw(True).images, expected) <= MAX_PIXEL_DIFF
    assert max_pixel_diff(draw(False).images, expected) > 2 * MAX_PIXEL_DIFF    # the bound sees the padding


# ---------------------------------------------------------------- sdlab's faster convolution paths


def _circular_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The convolution on the circularly padded input, written out."""
    p = conv.padding[0]
    return F.conv2d(F.pad(x, (p, p, p, p), mode="circular"), conv.weight, conv.bias, conv.stride)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("stride", [1, 2])
def test_the_product_over_few_pixels_pads_circularly(dtype, stride):
    """`patch_conv.Conv2d` takes its product over few pixels here (zero padding: patch_product_conv), and the
    convolution on the wrapped input within the block."""
    c = 96
    conv = patch_conv.Conv2d(c, c, 3, padding=1, stride=stride).to(dtype=dtype, memory_format=torch.channels_last)
    x = torch.randn(1, c, 2 * stride, 2 * stride).to(dtype=dtype, memory_format=torch.channels_last)
    assert conv._as_product(x, conv.bias)                       # what runs outside the block
    with torch.no_grad():
        with circular_padding(conv):
            wrapped = conv(x)
            with_bias = conv.forward_with_bias(x, conv.bias * 2)
        expected = _circular_conv(conv, x)
        doubled = F.conv2d(F.pad(x, (1,) * 4, mode="circular"), conv.weight, conv.bias * 2, conv.stride)
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0, rtol=0)
    torch.testing.assert_close(wrapped, expected, **tolerance)
    torch.testing.assert_close(with_bias, doubled, **tolerance)


def test_the_add_inside_the_convolution_pads_circularly():
    """`forward_add` (bf16, channels-last: the skip added inside oneDNN's convolution where it can) within the
    block is the circular convolution plus the skip."""
    c = 32
    conv = patch_conv.Conv2d(c, c, 3, padding=1).to(dtype=torch.bfloat16, memory_format=torch.channels_last)
    x = torch.randn(2, c, 8, 8).to(dtype=torch.bfloat16, memory_format=torch.channels_last)
    other = torch.randn(2, c, 8, 8).to(dtype=torch.bfloat16, memory_format=torch.channels_last)
    with torch.no_grad():
        # outside the block: the add inside oneDNN's convolution, or the product once sdlab's kernels are built
        assert conv._adds_inside(x, other) or conv._as_product(x, conv.bias) or not cpu_kernels.onednn_fuses()
        with circular_padding(conv):
            assert not conv._adds_inside(x, other)
            added = conv.forward_add(x, other.clone())
            into = conv.forward_add(x, other.clone(), into_other=True)
        expected = _circular_conv(conv, x) + other
    torch.testing.assert_close(added, expected, atol=0, rtol=0)
    torch.testing.assert_close(into, expected, atol=0, rtol=0)


def test_the_upsampling_convolution_pads_circularly():
    """`upsampled_conv` (one transposed convolution in bf16 CPU inference) within the block is the circular
    convolution of the nearest-upsampled input."""
    c = 16
    conv = nn.Conv2d(c, c, 3, padding=1).to(torch.bfloat16)
    x = torch.randn(1, c, 5, 7).to(dtype=torch.bfloat16, memory_format=torch.channels_last)
    with torch.no_grad():
        with circular_padding(conv):
            wrapped = upsampled_conv(x, conv)
        expected = _circular_conv(conv, F.interpolate(x, scale_factor=2.0, mode="nearest"))
    torch.testing.assert_close(wrapped, expected, atol=0, rtol=0)


# ---------------------------------------------------------------- the block


def test_only_padded_convolutions_wrap_and_every_mode_comes_back():
    vae = tiny_bundle("sd1").vae
    padded = padded_convolutions(vae, vae.decoder)               # each once
    assert len(padded) == len(set(map(id, padded)))
    assert vae.encoder.down[0].downsample.conv not in padded     # pads (0, 1, 0, 1) with zeros itself
    assert all(conv.kernel_size == (3, 3) for conv in padded)
    before = modes(vae)
    with circular_padding(vae):
        assert {conv.padding_mode for conv in padded} == {"circular"}
        assert vae.encoder.down[0].downsample.conv.padding_mode == "zeros"
        with circular_padding(vae.decoder):                      # blocks nest
            pass
        assert {conv.padding_mode for conv in padded} == {"circular"}
    assert modes(vae) == before
    with pytest.raises(KeyboardInterrupt), circular_padding(vae):
        raise KeyboardInterrupt                                  # a cancelled run
    assert modes(vae) == before
    with circular_padding(vae, enabled=False):
        assert modes(vae) == before


# ---------------------------------------------------------------- tiling runs


@pytest.fixture(scope="module")
def tiny_sd1() -> ModelBundle:
    return tiny_bundle("sd1", seed=11)


def _request(**changes) -> GenerationRequest:
    options = dict(prompt="a red apple", negative_prompt="blurry", steps=4, cfg_scale=5.0, seed=7, width=SIZE,
                   height=SIZE + 8, sampler="Euler", schedule="karras")
    return GenerationRequest(**{**options, **changes})


def _pixels(result) -> np.ndarray:
    return np.stack([np.asarray(image) for image in result.images]).astype(np.int16)   # (B, H, W, 3)


def _rolled_noise(monkeypatch) -> None:
    initial_noise = generate_module._initial_noise
    monkeypatch.setattr(generate_module, "_initial_noise",
                        lambda *args: initial_noise(*args).roll(SHIFT, dims=(-2, -1)))   # (B, 4, h, w)


@pytest.mark.parametrize("mode", ["txt2img", "controlnet"])
def test_a_tiling_picture_wraps_around(tiny_sd1, mode, monkeypatch, tmp_path):
    """The picture is one of a torus: the noise rolled by (6, 4) latent pixels gives the picture rolled by
    (12, 8) pixels, so its seams (moved inside by the roll) are drawn as any other place is. Without Tiling
    the borders show."""
    controls = ()
    if mode == "controlnet":
        net = diffusers_controlnet(tiny_sd1.unet_config, seed=3, hint_widths=(16, 32), std=0.05)
        controls = (ControlInput(write_layout(net, "original", tmp_path), init_picture(SIZE), 0.8),)
    tiling, plain = _request(tiling=True, controls=controls), _request(controls=controls)
    pictures = {req.tiling: _pixels(generate(tiny_sd1, req)) for req in (tiling, plain)}
    _rolled_noise(monkeypatch)
    rolled = {req.tiling: _pixels(generate(tiny_sd1, req)) for req in (tiling, plain)}
    shift = (2 * SHIFT[0], 2 * SHIFT[1])
    assert np.abs(rolled[True] - np.roll(pictures[True], shift, axis=(1, 2))).max() <= 1
    assert np.abs(rolled[False] - np.roll(pictures[False], shift, axis=(1, 2))).max() > 20
    assert pictures[True].std() > 20


def _padding_seen(bundle: ModelBundle, *controls: nn.Module) -> list[tuple[str, str]]:
    """(network, the padding mode of its first convolution) at each U-Net, ControlNet and VAE call of a run."""
    seen: list[tuple[str, str]] = []
    watched = {"unet": bundle.unet, "encode": bundle.vae.encoder, "decode": bundle.vae.decoder,
               **{f"control{i}": net for i, net in enumerate(controls)}}
    for name, net in watched.items():
        first = padded_convolutions(net)[0]
        net.register_forward_pre_hook(lambda _, args, name=name, conv=first: seen.append((name, conv.padding_mode)))
    return seen


@pytest.mark.parametrize("mode", ["img2img", "inpaint", "hires-latent", "hires-lanczos", "controlnet"])
def test_every_network_of_every_mode_wraps_in_a_tiling_run(mode, tmp_path):
    bundle = tiny_bundle("sd1", seed=11)
    controls, nets = (), ()
    if mode == "controlnet":
        net = diffusers_controlnet(bundle.unet_config, seed=3, hint_widths=(16, 32), std=0.05)
        loaded = load_controlnet(write_layout(net, "original", tmp_path))
        controls, nets = (ControlInput(loaded, init_picture(SIZE), 0.8),), (loaded.model,)
    changes = {
        "img2img": dict(init_image=init_picture(SIZE), strength=0.6),
        "inpaint": dict(init_image=init_picture(SIZE), mask_image=lower_right_mask(SIZE), strength=0.8),
        "hires-latent": dict(hr_scale=1.5, hr_denoise=0.5),
        "hires-lanczos": dict(hr_scale=1.5, hr_denoise=0.5, hr_upscaler="Lanczos"),
        "controlnet": dict(controls=controls),
    }[mode]
    seen = _padding_seen(bundle, *nets)
    for tiling in (True, False):
        seen.clear()
        plan = make_plan(bundle, _request(steps=2, height=SIZE, tiling=tiling, **changes))
        (generate_hires if plan.request.hires else generate)(bundle, plan)
        expected = {"circular" if tiling else "zeros"}
        assert {padding for _, padding in seen} == expected, seen
        networks = {name for name, _ in seen}
        assert {"unet", "decode"} <= networks
        assert ("encode" in networks) == (mode in ("img2img", "inpaint", "hires-lanczos"))
        assert ("control0" in networks) == (mode == "controlnet")
    assert set(modes(bundle.unet, bundle.vae, *nets)) == {"zeros"}


def test_a_cancelled_tiling_run_gives_the_model_its_padding_back(tiny_sd1):
    def cancel(info):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate(tiny_sd1, make_plan(tiny_sd1, _request(tiling=True)), progress=cancel)
    assert set(modes(tiny_sd1.unet, tiny_sd1.vae)) == {"zeros"}


def test_the_refiner_wraps_too():
    base, refiner = tiny_bundle("sdxl", seed=1), tiny_bundle("sdxl-refiner", seed=2)
    base_seen, refiner_seen = _padding_seen(base), _padding_seen(refiner)
    generate_with_refiner(base, refiner, _request(steps=4, height=SIZE, tiling=True), switch_at=0.5)
    assert {name for name, _ in base_seen} == {"unet"} and {name for name, _ in refiner_seen} == {"unet", "decode"}
    assert {padding for _, padding in base_seen + refiner_seen} == {"circular"}
    assert set(modes(base.unet, base.vae, refiner.unet, refiner.vae)) == {"zeros"}


# ---------------------------------------------------------------- the request and its infotext


def test_a_tiling_request_decodes_whole_pictures(tiny_sd1):
    plan = make_plan(tiny_sd1, _request(tiling=True, width=1088, height=1088, steps=1))
    assert plan.request.tiled_vae is False                      # a VAE tile cannot wrap around the picture
    assert make_plan(tiny_sd1, _request(width=1088, height=1088, steps=1)).request.tiled_vae is None
    with pytest.raises(RequestError, match="tiled VAE"):
        make_plan(tiny_sd1, _request(tiling=True, tiled_vae=True))
    with pytest.raises(RequestError, match="tiling must be True or False"):
        make_plan(tiny_sd1, _request(tiling="yes"))
    assert make_plan(tiny_sd1, _request(tiling=np.bool_(True))).request.tiling is True


def test_the_infotext_says_tiling_as_a1111_does_and_reads_it_back(tiny_sd1):
    req = make_plan(tiny_sd1, _request(tiling=True)).request
    text = format_parameters(to_parameters(req))
    assert "Tiling: True" in text.splitlines()[-1].split(", ")
    assert from_parameters(parse_parameters(text))["tiling"] is True
    plain = format_parameters(to_parameters(make_plan(tiny_sd1, _request()).request))
    assert "Tiling" not in plain and "tiling" not in from_parameters(parse_parameters(plain))
    a1111 = "a wall\nSteps: 20, Sampler: Euler, Seed: 1, Size: 512x512, Tiling: True, Version: v1.10.1"
    assert from_parameters(parse_parameters(a1111))["tiling"] is True


def test_the_a1111_apis_tiling_field_and_option_reach_the_request():
    from sdlab.server.a1111 import Txt2ImgIn, _check_options, _request as a1111_request
    from sdlab.server.inputs import BadRequest

    assert a1111_request(Txt2ImgIn(prompt="x")).tiling is False
    assert a1111_request(Txt2ImgIn(prompt="x", tiling=True)).tiling is True
    assert a1111_request(Txt2ImgIn(prompt="x", tiling=None), options={"tiling": True}).tiling is True   # opts
    assert a1111_request(Txt2ImgIn(prompt="x", override_settings={"tiling": True})).tiling is True
    assert a1111_request(Txt2ImgIn(prompt="x", tiling=False), options={"tiling": True}).tiling is False
    with pytest.raises(BadRequest, match="tiling"):
        _check_options({"tiling": "yes"})


def test_the_command_line_draws_records_and_redraws_a_tiling_picture(tmp_path, capsys):
    model = tmp_path / "tiny-sd1.safetensors"
    write_original(tiny_bundle("sd1"), model, junk=False)
    fast = ["--model", str(model), "--steps", "2", "--width", "32", "--height", "32", "--seed", "3", "--no-progress"]
    for mode, extra in (("txt2img", []), ("img2img", ["--init", str(tmp_path / "init.png")])):
        init_picture(SIZE).save(tmp_path / "init.png")
        tiled, plain, again = (tmp_path / f"{mode}-{name}.png" for name in ("tiled", "plain", "again"))
        assert run([mode, "a wall", "--tiling", "--out", str(tiled), *fast, *extra], capsys)[0] == 0
        assert run([mode, "a wall", "--out", str(plain), *fast, *extra], capsys)[0] == 0
        assert parse_parameters(read_parameters(tiled))["Tiling"] == "True"
        assert "Tiling" not in parse_parameters(read_parameters(plain))
        assert np.abs(pixels(tiled) - pixels(plain)).max() > 20
        assert run([mode, "--from-png", str(tiled), "--out", str(again), *fast, *extra], capsys)[0] == 0
        assert np.array_equal(pixels(again), pixels(tiled))
        assert run([mode, "--from-png", str(tiled), "--no-tiling", "--out", str(again), *fast, *extra], capsys)[0] == 0
        assert np.array_equal(pixels(again), pixels(plain))
