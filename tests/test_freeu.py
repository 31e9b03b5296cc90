"""FreeU (models/freeu.py) against its references on the same random weights.

- the Fourier filter against diffusers' `fourier_filter` (fp32, and bf16 / fp16 inputs, which both upcast);
- the U-Net under the "comfyui" convention against diffusers' U-Net run with a transcription of ComfyUI's FreeU and
  FreeU_V2 `output_block_patch` applied where each up-block resnet joins its backbone and skip features (the patch
  keyed by channel count, as ComfyUI's and the original's), SD1- and SDXL-shaped, with ControlNet residuals;
- the U-Net under the "diffusers" convention against diffusers' own `enable_freeu`, SD1- and SDXL-shaped; and the
  two conventions differing on both shapes (the difference the docs state);
- the pipeline: the setting reaches every U-Net call of both hires passes and none of an SDXL refiner's, and the
  infotext (Forge's labels) draws the picture again.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from bundle_fixtures import init_picture, lower_right_mask, tiny_bundle
from cli_helpers import assert_from_png_redraws, draw_with_and_without, pixels, run
from controlnet_fixtures import diffusers_controlnet, write_layout
from diffusers import UNet2DConditionModel
from diffusers.utils.torch_utils import fourier_filter as diffusers_fourier_filter

from sdlab.checkpoints.diffusers_unet import unet_config_to_diffusers, unet_state_dict_from_diffusers
from sdlab.models.freeu import FreeU, fourier_filter
from sdlab.models.layers import sdxl_vector
from sdlab.models.unet import UNet, UNetConfig
from sdlab.pipeline.control import ControlInput
from sdlab.pipeline.generate import generate, generate_with_refiner
from sdlab.pipeline.hires import generate_hires
from sdlab.pipeline.infotext import FREEU_LABELS, from_parameters, to_parameters
from sdlab.pipeline.plan import make_plan
from sdlab.pipeline.png_info import format_parameters, parse_parameters, read_parameters
from sdlab.pipeline.request import GenerationRequest, RequestError

POOLED = 32
SHAPES = {
    # SD1: two levels of 4 x model_channels (ComfyUI's stage 1 spans both; diffusers' stage 2 is the second)
    "sd1": UNetConfig(model_channels=32, channel_mult=(1, 2, 4, 4), transformer_depth=(1, 1, 1, 0), num_heads=8,
                      context_dim=48),
    # SDXL: no attention at the first level, 64-wide heads, the added vector
    "sdxl": UNetConfig(model_channels=32, channel_mult=(1, 2, 4), transformer_depth=(0, 1, 2),
                       transformer_depth_middle=2, num_heads=None, head_dim=32, context_dim=64,
                       use_linear_proj=True, adm_in_channels=POOLED + 6 * 256),
}
SETTINGS = [FreeU(b1=1.3, b2=1.4, s1=0.9, s2=0.2, version=1), FreeU(b1=1.3, b2=1.4, s1=0.9, s2=0.2, version=2)]


# --- ComfyUI's patch, transcribed from comfyanonymous/ComfyUI comfy_extras/nodes_freelunch.py
# (commit 2e49b5582ff1f5812eec5526a1fe13f8fe0137cf; code originally from ChenyangSi/FreeU, MIT) ---
def comfy_fourier_filter(x, threshold, scale):
    x_freq = torch.fft.fftn(x.float(), dim=(-2, -1))
    x_freq = torch.fft.fftshift(x_freq, dim=(-2, -1))
    B, C, H, W = x_freq.shape
    mask = torch.ones((B, C, H, W), device=x.device)
    crow, ccol = H // 2, W // 2
    mask[..., crow - threshold:crow + threshold, ccol - threshold:ccol + threshold] = scale
    x_freq = x_freq * mask
    x_freq = torch.fft.ifftshift(x_freq, dim=(-2, -1))
    x_filtered = torch.fft.ifftn(x_freq, dim=(-2, -1)).real
    return x_filtered.to(x.dtype)


def comfy_freeu_patch(model_channels, b1, b2, s1, s2):          # FreeU.execute's output_block_patch
    scale_dict = {model_channels * 4: (b1, s1), model_channels * 2: (b2, s2)}

    def output_block_patch(h, hsp, transformer_options):
        scale = scale_dict.get(int(h.shape[1]), None)
        if scale is not None:
            h[:, :h.shape[1] // 2] = h[:, :h.shape[1] // 2] * scale[0]
            hsp = comfy_fourier_filter(hsp, threshold=1, scale=scale[1])
        return h, hsp
    return output_block_patch


def comfy_freeu_v2_patch(model_channels, b1, b2, s1, s2):       # FreeU_V2.execute's output_block_patch
    scale_dict = {model_channels * 4: (b1, s1), model_channels * 2: (b2, s2)}

    def output_block_patch(h, hsp, transformer_options):
        scale = scale_dict.get(int(h.shape[1]), None)
        if scale is not None:
            hidden_mean = h.mean(1).unsqueeze(1)
            B = hidden_mean.shape[0]
            hidden_max, _ = torch.max(hidden_mean.view(B, -1), dim=-1, keepdim=True)
            hidden_min, _ = torch.min(hidden_mean.view(B, -1), dim=-1, keepdim=True)
            hidden_mean = (hidden_mean - hidden_min.unsqueeze(2).unsqueeze(3)) / (hidden_max - hidden_min).unsqueeze(2).unsqueeze(3)
            h[:, :h.shape[1] // 2] = h[:, :h.shape[1] // 2] * ((scale[0] - 1) * hidden_mean + 1)
            hsp = comfy_fourier_filter(hsp, threshold=1, scale=scale[1])
        return h, hsp
    return output_block_patch
# --- end of the transcription ---


def _reference(cfg: UNetConfig, seed: int = 0) -> UNet2DConditionModel:
    model = UNet2DConditionModel.from_config(unet_config_to_diffusers(cfg)).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def _sdlab(reference: UNet2DConditionModel, cfg: UNetConfig) -> UNet:
    with torch.device("meta"):
        model = UNet(cfg)
    model.load_state_dict(unet_state_dict_from_diffusers(reference.state_dict(), cfg), assign=True)
    return model.eval()


def _inputs(cfg: UNetConfig, size: tuple[int, int] = (8, 8)):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg.in_channels, *size, generator=gen)
    t = torch.tensor([3.0, 731.5])
    context = torch.randn(2, 7, cfg.context_dim, generator=gen)
    added, y = {}, None
    if cfg.adm_in_channels is not None:
        pooled = torch.randn(2, POOLED, generator=gen)
        sizes = torch.tensor([[1024.0, 768.0, 0.0, 16.0, 1024.0, 1024.0], [512.0, 512.0, 32.0, 0.0, 768.0, 1344.0]])
        added = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": sizes}}
        y = sdxl_vector(pooled, sizes)
    return x, t, context, y, added


def _control_residuals(reference: UNet2DConditionModel, x, t, context, added):
    """Random residuals shaped like every down-block output and the middle block's, as a ControlNet gives them."""
    shapes = []
    hooks = [block.register_forward_hook(lambda m, i, o: shapes.append([s.shape for s in o[1]]))
             for block in reference.down_blocks]
    mids = []
    hooks.append(reference.mid_block.register_forward_hook(lambda m, i, o: mids.append(o.shape)))
    with torch.no_grad():
        reference(x, t, context, **added)
    for hook in hooks:
        hook.remove()
    gen = torch.Generator().manual_seed(5)
    skips = [torch.randn(reference.conv_in(x).shape, generator=gen) * 0.5]
    skips += [torch.randn(shape, generator=gen) * 0.5 for block in shapes for shape in block]
    return skips, torch.randn(mids[0], generator=gen) * 0.5


def patched_and_plain(reference, hooks, x, t, context, control, added) -> tuple[torch.Tensor, torch.Tensor]:
    """The diffusers U-Net's output with a FreeU patch's `hooks` on, then with them removed: (patched, plain)."""
    skips, middle = control
    with torch.no_grad():
        patched = reference(x, t, context, down_block_additional_residuals=skips,
                            mid_block_additional_residual=middle, **added).sample
        for hook in hooks:
            hook.remove()
        plain = reference(x, t, context, down_block_additional_residuals=skips,
                          mid_block_additional_residual=middle, **added).sample
    return patched, plain


def _with_comfy_patch(reference: UNet2DConditionModel, patch):
    """Pre-hooks on every up-block resnet that split its input cat([h, hsp]) and apply ComfyUI's `patch` to it, as
    ComfyUI's UNetModel calls output_block_patch before each output block's concatenation. h's width is the
    previous block's output (tracked from the middle block on)."""
    width = {}
    hooks = [reference.mid_block.register_forward_hook(lambda m, i, o: width.update(h=o.shape[1]))]

    def before(module, args):
        joined, temb = args
        h, hsp = joined[:, : width["h"]].clone(), joined[:, width["h"]:]
        h, hsp = patch(h, hsp, {})
        return torch.cat([h, hsp], dim=1), temb

    def after(module, args, output):
        width["h"] = output.shape[1]

    for block in reference.up_blocks:
        for resnet in block.resnets:
            hooks += [resnet.register_forward_pre_hook(before), resnet.register_forward_hook(after)]
    return hooks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("size", [(8, 8), (12, 10), (1, 1)])
def test_fourier_filter_matches_diffusers(dtype, size):
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0)).to(dtype)
    expected = diffusers_fourier_filter(x, threshold=1, scale=0.2)
    actual = fourier_filter(x, 1, 0.2)
    assert actual.dtype == dtype
    torch.testing.assert_close(actual, expected, atol=0, rtol=0)
    if size != (1, 1):
        assert (actual.float() - x.float()).abs().max() > 0.01        # the filter changed something


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("version", [1, 2])
def test_comfyui_convention_matches_comfyuis_patch(shape, version):
    cfg = SHAPES[shape]
    reference = _reference(cfg)
    model = _sdlab(reference, cfg)
    x, t, context, y, added = _inputs(cfg, (8, 12))          # levels 8x12 .. 1x2: odd and power-of-2 sizes
    skips, middle = _control_residuals(reference, x, t, context, added)
    setting = SETTINGS[version - 1]
    make = comfy_freeu_patch if version == 1 else comfy_freeu_v2_patch
    hooks = _with_comfy_patch(reference, make(cfg.model_channels, setting.b1, setting.b2, setting.s1, setting.s2))
    expected, plain = patched_and_plain(reference, hooks, x, t, context, (skips, middle), added)
    with torch.no_grad():
        actual = model(x, t, context, y, control=(skips, middle), freeu=setting)
    assert (expected - plain).abs().max() > 0.05                     # FreeU changed the output
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_diffusers_convention_matches_enable_freeu(shape):
    cfg = SHAPES[shape]
    reference = _reference(cfg, seed=3)
    model = _sdlab(reference, cfg)
    x, t, context, y, added = _inputs(cfg)
    setting = FreeU(b1=1.3, b2=1.4, s1=0.9, s2=0.2, version=1, convention="diffusers")
    with torch.no_grad():
        plain = reference(x, t, context, **added).sample
        reference.enable_freeu(s1=setting.s1, s2=setting.s2, b1=setting.b1, b2=setting.b2)
        expected = reference(x, t, context, **added).sample
        actual = model(x, t, context, y, freeu=setting)
        comfyui = model(x, t, context, y, freeu=FreeU(b1=1.3, b2=1.4, s1=0.9, s2=0.2, version=1))
    assert (expected - plain).abs().max() > 0.05
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)
    # the conventions pick other blocks on both shapes (docs: SD1 both 1280 levels vs one; SDXL the first block
    # of the 640 and 320 levels)
    assert (comfyui - expected).abs().max() > 0.01


@pytest.mark.parametrize("zero", ["b1", "s2"])
def test_diffusers_convention_with_a_zero_factor_is_off_as_in_diffusers(zero):
    """diffusers' up blocks apply FreeU only where `is_freeu_enabled` (s1 and s2 and b1 and b2, by truth), so one
    factor of 0 turns it off everywhere; the "comfyui" convention still scales by 0 there."""
    cfg = SHAPES["sd1"]
    reference = _reference(cfg, seed=3)
    model = _sdlab(reference, cfg)
    x, t, context, y, added = _inputs(cfg)
    factors = {"b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2, zero: 0.0}
    with torch.no_grad():
        plain = reference(x, t, context, **added).sample
        reference.enable_freeu(**factors)
        expected = reference(x, t, context, **added).sample
        actual = model(x, t, context, y, freeu=FreeU(**factors, version=1, convention="diffusers"))
        comfyui = model(x, t, context, y, freeu=FreeU(**factors, version=1))
    torch.testing.assert_close(expected, plain, atol=0, rtol=0)          # diffusers: off
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)
    assert (comfyui - plain).abs().max() > 0.05


@pytest.mark.parametrize("version", [1, 2])
def test_neutral_factors_and_no_setting_leave_the_output(version):
    cfg = SHAPES["sd1"]
    model = _sdlab(_reference(cfg), cfg)
    x, t, context, y, _ = _inputs(cfg)
    with torch.no_grad():
        plain = model(x, t, context, y)
        neutral = model(x, t, context, y, freeu=FreeU(1.0, 1.0, 1.0, 1.0, version=version))
    torch.testing.assert_close(neutral, plain, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_runs_close_to_fp32(dtype):
    cfg = SHAPES["sdxl"]
    model = _sdlab(_reference(cfg), cfg)
    x, t, context, y, _ = _inputs(cfg)
    with torch.no_grad():
        expected = model(x, t, context, y, freeu=FreeU(1.3, 1.4, 0.9, 0.2))
        actual = model.to(dtype)(x, t, context, y, freeu=FreeU(1.3, 1.4, 0.9, 0.2))
    assert actual.dtype == dtype
    # measured: bf16 0.0056, fp16 0.0019 from fp32; the same run without FreeU is 0.081 away, so 0.02 sees it
    torch.testing.assert_close(actual.float(), expected, atol=0.02, rtol=0)


# ---------------------------------------------------------------- the pipeline: passes, refiner, infotext
SIZE = 32


def _request(**changes) -> GenerationRequest:
    options = dict(prompt="a red apple", negative_prompt="blurry", steps=3, cfg_scale=5.0, seed=7, width=SIZE,
                   height=SIZE, sampler="Euler", schedule="karras")
    return GenerationRequest(**{**options, **changes})


def _settings_seen(bundle) -> list:
    """The `freeu` argument of every call of the bundle's U-Net, recorded as it runs."""
    seen, forward = [], bundle.unet.forward

    def recording(*args, **kwargs):
        seen.append(kwargs.get("freeu"))
        return forward(*args, **kwargs)

    bundle.unet.forward = recording
    return seen


def test_txt2img_draws_with_freeu_and_its_infotext_draws_it_again():
    bundle = tiny_bundle("sd1", seed=3)
    setting = FreeU(b1=1.3, b2=1.6, s1=0.9, s2=0.2, version=1)
    plain = generate(bundle, make_plan(bundle, _request())).images[0]
    result = generate(bundle, make_plan(bundle, _request(freeu=setting)))
    assert np.abs(np.asarray(result.images[0], float) - np.asarray(plain, float)).max() > 8   # FreeU drew another
    text = format_parameters(to_parameters(result.request))
    assert ("freeu_enabled: True, freeu_b1: 1.3, freeu_b2: 1.6, freeu_s1: 0.9, freeu_s2: 0.2, freeu_start: 0, "
            "freeu_end: 1, FreeU version: 1") in text
    fields = from_parameters(parse_parameters(text))
    assert fields["freeu"] == {"b1": 1.3, "b2": 1.6, "s1": 0.9, "s2": 0.2, "start": 0.0, "end": 1.0, "version": 1,
                               "convention": "comfyui"}
    again = generate(bundle, make_plan(bundle, GenerationRequest(**fields)))
    assert again.request.freeu == setting
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(result.images[0]))


def test_forges_infotext_reads_as_freeu_v2():
    """Forge's FreeU Integrated writes its labels and draws ComfyUI's FreeU_V2: five before its PR #1689 (no step
    window: every step), seven since (freeu_start, freeu_end)."""
    p = parse_parameters("a house\nSteps: 20, Sampler: Euler, Seed: 1, Size: 512x512, freeu_enabled: True, "
                         "freeu_b1: 1.01, freeu_b2: 1.02, freeu_s1: 0.99, freeu_s2: 0.95")
    assert from_parameters(p)["freeu"] == {"b1": 1.01, "b2": 1.02, "s1": 0.99, "s2": 0.95, "version": 2,
                                           "convention": "comfyui"}
    p = parse_parameters("a house\nSteps: 20, Sampler: Euler, Seed: 1, Size: 512x512, freeu_enabled: True, "
                         "freeu_b1: 1.3, freeu_b2: 1.4, freeu_s1: 0.9, freeu_s2: 0.2, freeu_start: 0.3, freeu_end: 0.8")
    assert from_parameters(p)["freeu"] == {"b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2, "start": 0.3, "end": 0.8,
                                           "version": 2, "convention": "comfyui"}
    assert "freeu" not in from_parameters(parse_parameters("a house\nSteps: 20, freeu_enabled: False"))


# --- Forge's step window, transcribed: lllyasviel/stable-diffusion-webui-forge after PR #1689 (as in
# MisterChief95/stable-diffusion-webui-forge@3fc342f extensions-builtin/sd_forge_freeu/scripts/forge_freeu.py,
# FreeUForForge.denoiser_callback), fed A1111's state.sampling_step: 0 from `launch_sampling`, then the k-diffusion
# callback's i once step i's model calls are made (modules/sd_samplers_common.py / sd_samplers_kdiffusion.py) ---
def forge_freeu_calls(calls_per_step, start, end):
    """Whether Forge's FreeU acts at each model call of a pass whose step i makes calls_per_step[i] calls."""
    total_sampling_steps, sampling_step, acts = len(calls_per_step), 0, []
    for i, calls in enumerate(calls_per_step):
        for _ in range(calls):
            thisStep = sampling_step / (total_sampling_steps - 1)
            acts.append(thisStep >= start and thisStep <= end)
        sampling_step = i                                       # callback_state after step i
    return acts
# --- end of the transcription ---


@pytest.mark.parametrize("case", ["euler", "heun", "img2img"])
def test_the_step_window_acts_on_forges_steps(case):
    """FreeU with start..end reaches the U-Net calls of the steps Forge's FreeU Integrated acts on (one call a
    step for Euler; Heun two but on the last step; img2img counting the steps it runs, as A1111's t_enc + 1)."""
    bundle = tiny_bundle("sd1", seed=3)
    setting = FreeU(b1=1.3, b2=1.6, s1=0.9, s2=0.2, start=0.3, end=0.8)
    changes = {"euler": dict(steps=6), "heun": dict(steps=4, sampler="Heun"),
               "img2img": dict(steps=8, init_image=init_picture(SIZE), strength=0.6)}[case]
    seen = _settings_seen(bundle)
    generate(bundle, make_plan(bundle, _request(freeu=setting, **changes)))
    steps = changes["steps"] if case != "img2img" else len(seen)
    calls = [2] * (steps - 1) + [1] if case == "heun" else [1] * steps
    expected = forge_freeu_calls(calls, setting.start, setting.end)
    assert [s is not None for s in seen] == expected and any(expected) and not all(expected)
    assert {s for s in seen if s is not None} == {setting}


def test_a_windowed_picture_redraws_from_its_infotext():
    bundle = tiny_bundle("sd1", seed=3)
    full = generate(bundle, make_plan(bundle, _request(steps=4, freeu=FreeU(1.3, 1.6, 0.9, 0.2))))
    result = generate(bundle, make_plan(bundle, _request(steps=4, freeu=FreeU(1.3, 1.6, 0.9, 0.2, start=0.5))))
    assert np.abs(np.asarray(result.images[0], float) - np.asarray(full.images[0], float)).max() > 4
    text = format_parameters(to_parameters(result.request))
    assert "freeu_start: 0.5, freeu_end: 1" in text
    again = generate(bundle, make_plan(bundle, GenerationRequest(**from_parameters(parse_parameters(text)))))
    assert again.request.freeu == result.request.freeu
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(result.images[0]))


def test_both_hires_passes_use_freeu():
    bundle = tiny_bundle("sd1", seed=3)
    seen = _settings_seen(bundle)
    setting = FreeU(b1=1.3, b2=1.6, s1=0.9, s2=0.2)
    generate_hires(bundle, make_plan(bundle, _request(freeu=setting, hr_scale=1.5, hr_steps=2, hr_denoise=0.5)))
    assert len(seen) > 3 and set(seen) == {setting}          # the first pass's calls and the second's


def test_the_refiner_draws_without_freeu():
    """FreeU patches the base model's U-Net, as ComfyUI's node the model it is given and diffusers' enable_freeu
    one pipeline's U-Net; the SDXL refiner's calls run plain."""
    base, refiner = tiny_bundle("sdxl", seed=1), tiny_bundle("sdxl-refiner", seed=2)
    base_seen, refiner_seen = _settings_seen(base), _settings_seen(refiner)
    setting = FreeU(b1=1.3, b2=1.4, s1=0.9, s2=0.2)
    result = generate_with_refiner(base, refiner, _request(steps=4, freeu=setting), switch_at=0.5)
    assert base_seen and set(base_seen) == {setting}
    assert refiner_seen and set(refiner_seen) == {None}
    assert result.request.freeu == setting                    # recorded: the base drew with it


def test_bad_settings_are_one_clear_error():
    bundle = tiny_bundle("sd1", seed=3)
    for bad, message in (({"b1": float("inf")}, "FreeU b1 must be a finite number"),
                         ({"version": 3}, "FreeU version must be 1 or 2"),
                         ({"b0": 1.0}, "freeu takes b1, b2, s1, s2, version, convention, start, end, got b0"),
                         ({"convention": "a1111"}, "unknown FreeU convention 'a1111'"),
                         ({"start": -0.1}, r"FreeU start must lie in \[0, 1\]"),
                         ({"end": float("nan")}, "FreeU end must be a finite number"),
                         ({"start": 0.8, "end": 0.3}, r"FreeU start \(0.8\) must not come after its end \(0.3\)")):
        with pytest.raises(RequestError, match=message):
            make_plan(bundle, _request(freeu=bad))


# ---------------------------------------------------------------- the command line
def test_the_command_line_draws_records_and_redraws_freeu(tmp_path, capsys):
    draws = draw_with_and_without(tmp_path, capsys, ["--freeu", "1.3,1.6,0.9,0.2", "--freeu-version", "1"], steps=2)
    model, fast, freeu, plain = draws.model, draws.fast, draws.drawn, draws.plain
    again, python = tmp_path / "again.png", tmp_path / "python.png"
    recorded = parse_parameters(read_parameters(freeu))
    assert {key: recorded[key] for key in ("freeu_enabled", *FREEU_LABELS, "FreeU version")} == {
        "freeu_enabled": "True", "freeu_b1": "1.3", "freeu_b2": "1.6", "freeu_s1": "0.9", "freeu_s2": "0.2",
        "freeu_start": "0", "freeu_end": "1", "FreeU version": "1"}
    assert not any(key.lower().startswith("freeu") for key in parse_parameters(read_parameters(plain)))
    assert np.abs(pixels(freeu) - pixels(plain)).max() > 8
    # the Python API draws the same picture
    import sdlab
    pipe = sdlab.load(model)
    drawn = pipe.txt2img("a wall", steps=2, width=32, height=32, seed=3, freeu=FreeU(1.3, 1.6, 0.9, 0.2, version=1))
    drawn.images[0].save(python)
    assert np.array_equal(pixels(python), pixels(freeu))
    assert_from_png_redraws(draws, "--no-freeu", tmp_path, capsys)
    # one flag over the picture's: version 2 with the picture's factors
    assert run(["txt2img", "--from-png", str(freeu), "--freeu-version", "2", "--out", str(again), *fast],
               capsys)[0] == 0
    assert parse_parameters(read_parameters(again))["freeu_b2"] == "1.6"
    assert "FreeU version" not in parse_parameters(read_parameters(again))
    # the step window: drawn as the Python API draws it, recorded, and redrawn from the picture
    windowed = tmp_path / "windowed.png"
    assert run(["txt2img", "a wall", "--freeu", "1.3,1.6,0.9,0.2", "--freeu-start", "0.5", "--freeu-end", "1",
                "--out", str(windowed), *fast, "--steps", "3"], capsys)[0] == 0     # FreeU on the third step only
    assert parse_parameters(read_parameters(windowed))["freeu_start"] == "0.5"
    pipe.txt2img("a wall", steps=3, width=32, height=32, seed=3,
                 freeu=FreeU(1.3, 1.6, 0.9, 0.2, start=0.5)).images[0].save(python)
    assert np.array_equal(pixels(python), pixels(windowed))
    assert run(["txt2img", "--from-png", str(windowed), "--out", str(again), *fast, "--steps", "3"],
               capsys)[0] == 0
    assert np.array_equal(pixels(again), pixels(windowed))


@pytest.mark.parametrize("flags, message", [
    (["--freeu", "1.2,1.4,0.9"], "--freeu takes four numbers B1,B2,S1,S2"),
    (["--freeu", "a,b,c,d"], "--freeu takes four numbers"),
    (["--freeu-version", "1"], "--freeu-version set FreeU's --freeu B1,B2,S1,S2, which is not given"),
    (["--freeu-start", "0.5", "--freeu-end", "0.9"], "--freeu-start, --freeu-end set FreeU's --freeu"),
    (["--freeu", "1.3,1.4,0.9,0.2", "--freeu-start", "1.5"], r"FreeU start must lie in \[0, 1\]"),
    (["--freeu", "1.3,1.4,0.9,0.2", "--freeu-start", "0.6", "--freeu-end", "0.2"], "must not come after its end"),
    (["--freeu", "1.2,1.4,0.9,nan"], "FreeU s2 must be a finite number"),
    (["--freeu", "20,1.4,0.9,0.2"], r"FreeU b1 must lie in \[-10, 10\]"),
])
def test_bad_freeu_flags_are_one_line(flags, message, tmp_path, capsys):
    code, out, err = run(["txt2img", "a wall", "--steps", "1", "--width", "32", "--height", "32", "--no-progress",
                          "--out", str(tmp_path / "x.png"), *flags], capsys)
    assert code != 0 and re.search(message, err) and "Traceback" not in err, err
    assert not (tmp_path / "x.png").exists()


def test_a_grids_cells_draw_freeu_as_txt2img(tmp_path, capsys):
    """`sdlab grid` takes txt2img's FreeU flags: each cell is txt2img with them (the shipped model)."""
    flags = ["--seed", "4", "--freeu", "1.3,1.6,0.9,0.2", "--no-progress"]
    cells = tmp_path / "cells"
    assert run(["grid", "a red house", "--x", "Steps=2,3", "--out", str(tmp_path / "g.png"), "--keep-cells",
                str(cells), *flags], capsys)[0] == 0
    assert run(["txt2img", "a red house", "--steps", "3", "--out", str(tmp_path / "t.png"), *flags], capsys)[0] == 0
    assert np.array_equal(pixels(cells / "001-x1-y0-z0.png"), pixels(tmp_path / "t.png"))
    assert parse_parameters(read_parameters(cells / "001-x1-y0-z0.png"))["freeu_b2"] == "1.6"


@pytest.mark.parametrize("mode", ["img2img", "inpaint", "controlnet"])
def test_every_mode_draws_with_freeu(mode, tmp_path):
    """img2img, inpainting and a ControlNet run (whose U-Net calls go through `ControlledUNet`) pass the setting
    to every U-Net call, and FreeU changes their picture."""
    bundle = tiny_bundle("sd1", seed=3)
    changes = {
        "img2img": lambda: dict(init_image=init_picture(SIZE), strength=0.8),
        "inpaint": lambda: dict(init_image=init_picture(SIZE), mask_image=lower_right_mask(SIZE), strength=0.9),
        "controlnet": lambda: dict(controls=(ControlInput(write_layout(
            diffusers_controlnet(bundle.unet_config, seed=3, hint_widths=(16, 32), std=0.05), "original", tmp_path),
            init_picture(SIZE), 0.8),)),
    }[mode]()
    setting = FreeU(b1=1.3, b2=1.6, s1=0.9, s2=0.2)
    plain = generate(bundle, make_plan(bundle, _request(**changes))).images[0]
    seen = _settings_seen(bundle)
    drawn = generate(bundle, make_plan(bundle, _request(freeu=setting, **changes))).images[0]
    assert seen and set(seen) == {setting}
    assert np.abs(np.asarray(drawn, float) - np.asarray(plain, float)).max() > 4
