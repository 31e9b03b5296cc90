"""Applying ControlNets (sdlab.pipeline.control): diffusers' hint preprocessing, its start / end step rule and
A1111's, MultiControlNet sums scaled by strength, the step of each sampler call, the checks of a ControlInput,
and the A1111 infotext lines."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel
from diffusers.image_processor import VaeImageProcessor
from PIL import Image
from safetensors.torch import save_file

from bundle_fixtures import tiny_bundle
from controlnet_fixtures import controlnet_config, diffusers_controlnet, write_layout
from sdlab.checkpoints.controlnet import load_controlnet
from sdlab.pipeline.control import (
    ControlInput,
    ControlledUNet,
    PreparedControl,
    check_control,
    control_input,
    hint_tensor,
    infotext_lines,
    prepare_controls,
    step_of,
    tag_steps,
)
from sdlab.pipeline.request import RequestError


def _picture(width=40, height=24, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_hint_matches_diffusers_control_image_processor():
    processor = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False)
    for image in (_picture(), _picture().convert("L"), _picture(64, 64).convert("RGBA")):
        expected = processor.preprocess(image, height=32, width=48)
        torch.testing.assert_close(hint_tensor(image, 48, 32), expected, atol=1e-6, rtol=0)


def test_resize_modes_fit_the_hint_as_a1111s_detectmap_proc():
    """A1111's geometry: "Crop and Resize" scales by max(h / H, w / W) (rounded to whole pixels) and cuts the
    middle; "Resize and Fill" scales by the min and centres it on the median colour of the border pixels."""
    from sdlab.pipeline.control import fit_hint

    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (24, 48, 3), dtype=np.uint8)
    pixels[:12, [0, -1]], pixels[0] = (10, 200, 30), (10, 200, 30)           # half the border each colour
    pixels[12:, [0, -1]], pixels[-1] = (13, 203, 33), (13, 203, 33)
    image = Image.fromarray(pixels)
    lanczos = Image.Resampling.LANCZOS
    crop = np.asarray(image.resize((64, 32), resample=lanczos))[:, 16:48]          # k = 32 / 24
    assert np.array_equal(np.asarray(fit_hint(image, 32, 32, "crop")), crop)
    fill = np.asarray(fit_hint(image, 32, 32, "fill"))                            # k = 32 / 48
    assert np.array_equal(fill[8:24], np.asarray(image.resize((32, 16), resample=lanczos)))
    assert (fill[:8] == (11, 201, 31)).all() and (fill[24:] == (11, 201, 31)).all()   # the median, truncated
    assert np.array_equal(np.asarray(fit_hint(image, 32, 32, "resize")),
                          np.asarray(image.resize((32, 32), resample=lanczos)))
    assert fit_hint(image, 48, 24, "fill") is image
    assert np.array_equal(np.asarray(fit_hint(image, 30, 40, "crop")),               # k = 40 / 24: 80 x 40
                          np.asarray(image.resize((80, 40), resample=lanczos))[:, 25:55])


def test_a1111_thresholds_reach_the_preprocessor(tmp_path):
    """threshold_a / threshold_b are canny's low / high thresholds and threshold's level; unset: 100 / 200 and
    127 (A1111's slider defaults); other preprocessors ignore them."""
    from sdlab.pipeline.preprocess import canny, preprocess, threshold

    picture = _picture(32, 32, seed=4)
    assert preprocess(picture, "canny", 30, 90).tobytes() == canny(picture, 30, 90).tobytes()
    assert preprocess(picture, "canny").tobytes() == canny(picture, 100, 200).tobytes()
    assert preprocess(picture, "canny", None, 90).tobytes() == canny(picture, 90, 100).tobytes()
    assert preprocess(picture, "threshold", 40).tobytes() == threshold(picture, 40).tobytes()
    assert preprocess(picture, "invert", 40, 50).tobytes() == preprocess(picture, "invert").tobytes()
    [control] = _controls(tmp_path, tiny_bundle("sd1"), strengths=(1.0,), ranges=((0.0, 1.0),))
    edges = ControlInput(control.net.origin, picture, module="canny", threshold_a=30, threshold_b=90)
    [prepared] = prepare_controls(tiny_bundle("sd1"), [edges], 32, 32)
    assert torch.equal(prepared.hint, hint_tensor(canny(picture, 30, 90), 32, 32))
    for bad in (-1.0, float("nan"), "50"):
        with pytest.raises(RequestError, match="threshold_a must be a number >= 0"):
            check_control(replace(edges, threshold_a=bad))


def test_a_transparent_hint_is_laid_on_white_as_a1111s_hwc3(tmp_path):
    """A drawing on a transparent canvas keeps its strokes: A1111's HWC3 computes color * alpha + 255 * (1 -
    alpha); dropping the alpha would leave the canvas's (black) colour everywhere."""
    from sdlab.pipeline.preprocess import preprocess

    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, (24, 40, 4), dtype=np.uint8)
    rgba[:12, :, 3] = 0                                                         # half the canvas transparent
    [control] = _controls(tmp_path, tiny_bundle("sd1"), strengths=(1.0,), ranges=((0.0, 1.0),))
    color, alpha = rgba[..., :3].astype(np.float64), rgba[..., 3:].astype(np.float64) / 255.0
    hwc3 = (color * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)       # A1111 annotator.util.HWC3
    for image, expected in ((Image.fromarray(rgba), hwc3),
                            (Image.fromarray(rgba[..., [0, 3]], "LA"), np.repeat(hwc3[..., :1], 3, axis=2))):
        picture = ControlInput(control.net.origin, image)
        [prepared] = prepare_controls(tiny_bundle("sd1"), [picture], 40, 24)
        assert np.abs(prepared.hint[0].permute(1, 2, 0).numpy() * 255 - expected).max() <= 1
        assert torch.equal(hint_tensor(image, 40, 24), prepared.hint)
    strokes = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    strokes.paste((0, 0, 0, 255), (14, 0, 18, 32))
    [edges] = prepare_controls(tiny_bundle("sd1"), [ControlInput(control.net.origin, strokes, module="canny")], 32, 32)
    assert torch.equal(edges.hint, hint_tensor(preprocess(Image.alpha_composite(
        Image.new("RGBA", (32, 32), "white"), strokes).convert("RGB"), "canny"), 32, 32))
    assert edges.hint.max() == 1.0
    assert preprocess(strokes, "canny").getextrema()[0] == (0, 255)


def _extensions_inpaint_hint(color: np.ndarray, mask: np.ndarray) -> torch.Tensor:
    """sd-webui-controlnet's inpaint hint at the picture's size, its lines transcribed: the unit's RGBA input
    (`np.concatenate([color, mask[:, :, 0:1]], axis=2)`), `detectmap_proc`'s mask threshold
    (`(inpaint_mask > 127).astype(np.float32) * 255.0`), `get_pytorch_control` (/ 255), and the hook's
    "ControlNet inpaint protocol": `m = (m > 0.5).float(); hint = c * (1 - m) - m`."""
    rgba = np.concatenate([color, mask[:, :, 0:1]], axis=2).astype(np.float32)
    rgba[:, :, 3] = (rgba[:, :, 3] > 127).astype(np.float32) * 255.0
    hint = torch.from_numpy(rgba / 255.0).permute(2, 0, 1)[None]
    c, m = hint[:, 0:3], hint[:, 3:4]
    m = (m > 0.5).float()
    return c * (1 - m) - m


def _extensions_prepare_mask(mask: Image.Image, invert: bool, blur_x: float, blur_y: float) -> np.ndarray:
    """sd-webui-controlnet's `prepare_mask` (scripts/controlnet.py) for an A1111 with mask_blur_x, transcribed."""
    import cv2
    from PIL import ImageOps

    mask = mask.convert("L")
    if invert:
        mask = ImageOps.invert(mask)
    if blur_x > 0:
        np_mask = np.array(mask)
        kernel_size = 2 * int(2.5 * blur_x + 0.5) + 1
        np_mask = cv2.GaussianBlur(np_mask, (kernel_size, 1), blur_x)
        mask = Image.fromarray(np_mask)
    if blur_y > 0:
        np_mask = np.array(mask)
        kernel_size = 2 * int(2.5 * blur_y + 0.5) + 1
        np_mask = cv2.GaussianBlur(np_mask, (1, kernel_size), blur_y)
        mask = Image.fromarray(np_mask)
    return np.asarray(mask)


def test_inpaint_mask_is_the_extensions_prepare_mask():
    """The run's mask an inpaint unit reads is the extension's `prepare_mask` of it: greyscale of the picture as
    given (an RGBA mask's colour, not its alpha), inverted for "Inpaint not masked", blurred by OpenCV's
    Gaussian along x by mask_blur_x, then along y by mask_blur_y (not PIL's blur of one radius)."""
    from sdlab.pipeline.control import inpaint_mask

    mask = np.zeros((24, 40), dtype=np.uint8)
    mask[7:17, 12:28] = 255
    rgba = Image.new("RGBA", (40, 24), (0, 0, 0, 0))
    rgba.paste((255, 255, 255, 255), (2, 2, 12, 12))
    rgba.paste((0, 0, 0, 255), (20, 10, 36, 20))                      # opaque black: no mask to the extension
    for picture in (Image.fromarray(mask), Image.fromarray(mask).convert("RGB"), rgba):
        for blur_x, blur_y in ((0, 8), (4, 4), (3, 1.5), (2.5, 0), (0, 0)):
            for invert in (False, True):
                ours = np.asarray(inpaint_mask(picture, invert, blur_x, blur_y))
                assert np.array_equal(ours, _extensions_prepare_mask(picture, invert, blur_x, blur_y)), \
                    (picture.mode, blur_x, blur_y, invert)
    assert np.array_equal(np.asarray(inpaint_mask(Image.fromarray(mask), blur=3)),
                          _extensions_prepare_mask(Image.fromarray(mask), False, 3, 3))       # blur_y None: blur


def test_inpaint_hints_are_the_extensions(tmp_path):
    """inpaint (inpaint_global_harmonious) and inpaint_only: -1 where the mask (the unit's, else an inpainting
    run's as the extension's prepare_mask reads it) is above 127, the control image's [0, 1] colour elsewhere;
    an RGBA control image is laid on white (its alpha is no mask to the extension). inpaint_only outside an
    inpainting run is refused: there the extension also pastes the control image back after decoding."""
    from sdlab.pipeline.control import inpaint_mask

    [control] = _controls(tmp_path, tiny_bundle("sd1"), strengths=(1.0,), ranges=((0.0, 1.0),))
    bundle, picture = tiny_bundle("sd1"), _picture(40, 24, seed=5)
    mask = np.zeros((24, 40), dtype=np.uint8)
    mask[5:15, 10:30], mask[0, 0], mask[1, 1] = 255, 127, 128          # 127 is not masked, 128 is
    expected = _extensions_inpaint_hint(np.asarray(picture), np.stack([mask] * 3, axis=2))
    assert float(expected.min()) == -1.0 and float(expected[expected >= 0].max()) <= 1.0
    for module in ("inpaint", "inpaint_only"):
        unit = ControlInput(control.net.origin, picture, module=module, mask=Image.fromarray(mask))
        [prepared] = prepare_controls(bundle, [unit], 40, 24, mask=Image.new("L", (40, 24)))
        assert torch.equal(prepared.hint, expected)
    run_mask = Image.fromarray(mask).convert("RGB")                  # the run's mask, inverted and blurred
    inverted = Image.fromarray(_extensions_prepare_mask(run_mask, invert=True, blur_x=4, blur_y=4))
    assert np.array_equal(np.asarray(inpaint_mask(run_mask, invert=True, blur=4)), np.asarray(inverted))
    unit = ControlInput(control.net.origin, picture, module="inpaint")
    [prepared] = prepare_controls(bundle, [unit], 40, 24, mask=inpaint_mask(run_mask, invert=True, blur=4))
    assert torch.equal(prepared.hint, _extensions_inpaint_hint(np.asarray(picture), np.asarray(inverted)[..., None]))
    [plain] = prepare_controls(bundle, [unit], 40, 24)                # no mask anywhere: nothing masked
    assert torch.equal(plain.hint, hint_tensor(picture, 40, 24))
    rgba = np.concatenate([np.asarray(picture), np.full((24, 40, 1), 255, np.uint8)], axis=2)
    rgba[:12, :, 3] = 0
    [transparent] = prepare_controls(bundle, [replace(unit, image=Image.fromarray(rgba))], 40, 24)
    assert float(transparent.hint.min()) >= 0.0 and torch.equal(transparent.hint[..., :12, :], torch.ones(1, 3, 12, 40))
    with pytest.raises(RequestError, match="inpaint_only outside an inpainting run"):
        prepare_controls(bundle, [replace(unit, module="inpaint_only", mask=Image.fromarray(mask))], 40, 24)


@pytest.mark.parametrize("start,end", [(0.0, 1.0), (0.2, 0.8), (0.5, 1.0), (0.0, 0.3), (0.34, 0.66)])
def test_active_steps_follow_diffusers_controlnet_keep(start, end):
    control = PreparedControl(net=None, hint=torch.zeros(1), strength=1.0, start=start, end=end)
    for steps in (1, 3, 7, 20):
        keep = [1.0 - float(i / steps < start or (i + 1) / steps > end) for i in range(steps)]
        assert [float(control.active(i, steps)) for i in range(steps)] == keep


def test_active_steps_under_a1111s_convention_follow_the_extensions_schedule():
    """sd-webui-controlnet's guidance_schedule_handler: stopped when s / N < start or s / N > end, with s the
    shared.state.sampling_step its sampler callback sets after each step's model calls (0 before the first)."""
    def a1111(start, end, steps):
        reported = [0] + list(range(steps - 1))             # what step i's calls read
        return [i for i in range(steps) if not (reported[i] / steps < start or reported[i] / steps > end)]

    for start, end in ((0.25, 0.5), (0.0, 0.3), (0.5, 1.0), (0.2, 0.2), (0.0, 0.0), (0.34, 0.66)):
        control = PreparedControl(net=None, hint=torch.zeros(1), strength=1.0, start=start, end=end,
                                  convention="a1111")
        for steps in (1, 3, 7, 10, 20):
            assert [i for i in range(steps) if control.active(i, steps)] == a1111(start, end, steps)
    control = PreparedControl(net=None, hint=torch.zeros(1), strength=1.0, start=0.25, end=0.5, convention="a1111")
    assert [i for i in range(10) if control.active(i, 10)] == [4, 5, 6]


def test_each_call_gets_its_step_also_between_sigmas():
    sigmas = torch.tensor([14.6, 7.0, 3.1, 1.0, 0.3, 0.0])
    assert [step_of(s, sigmas) for s in sigmas[:-1]] == [0, 1, 2, 3, 4]
    assert step_of(torch.full((2,), 2.0), sigmas) == 2             # a second-order sampler's midpoint
    assert step_of(0.1, sigmas) == 4
    seen = []
    model = tag_steps(lambda x, sigma, **cond: seen.append(cond["control_step"]) or x, sigmas)
    model(torch.zeros(1), sigmas[3] * torch.ones(1), context=None)
    assert seen == [(3, 5)]


@pytest.mark.parametrize("name, steps_of_calls", [
    ("Heun", [0, 0, 1, 1, 2, 2, 3]),        # the corrector of step i runs at sigma_{i+1}; the last step has none
    ("PLMS", [0, 0, 1, 2, 3]),              # the improved-Euler call of the first step, at sigma_1
    ("DPM2", [0, 0, 1, 1, 2, 2, 3]),        # midpoints lie between the sigmas
])
def test_a_call_at_the_next_sigma_belongs_to_the_step_that_makes_it(name, steps_of_calls):
    """A step's extra call at the next step's sigma (`steps.within_step`) is tagged with its own step, so a
    ControlNet starting or ending there acts on whole steps ("calls inside a step belong to that step")."""
    from sdlab.diffusion.samplers import get_sampler

    sigmas = torch.tensor([14.6, 7.0, 3.1, 1.0, 0.0])
    seen = []
    model = tag_steps(lambda x, sigma, **cond: seen.append(cond["control_step"][0]) or x * 0, sigmas)
    get_sampler(name).fn(model, torch.ones(1, 1, 2, 2), sigmas)
    assert seen == steps_of_calls


def _controls(tmp_path, bundle, strengths=(0.6, 1.3), ranges=((0.0, 1.0), (0.0, 1.0))):
    cfg = bundle.unet_config
    prepared = []
    for k, (strength, (start, end)) in enumerate(zip(strengths, ranges)):
        folder = tmp_path / f"c{k}"
        folder.mkdir(parents=True)
        path = write_layout(diffusers_controlnet(cfg, seed=10 + k, hint_widths=(16, 32)), "diffusers-file", folder)
        control = ControlInput(path, _picture(64, 64, seed=k), strength, start, end)
        prepared += prepare_controls(bundle, [control], 64, 64)
    return prepared


def test_multicontrolnet_sums_scaled_residuals(tmp_path):
    bundle = tiny_bundle("sd1")
    controls = _controls(tmp_path, bundle)
    net = ControlledUNet(bundle.unet, controls)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 32, 32, generator=gen)
    t = torch.tensor([500.0, 500.0])
    context = torch.randn(2, 77, bundle.unet_config.context_dim, generator=gen)
    with torch.no_grad():
        expected_skips, expected_mid = None, None
        for c in controls:
            res, mid = c.net.model(x, t, context, c.hint.expand(2, -1, -1, -1))
            res = [r * c.strength for r in res]
            expected_skips = res if expected_skips is None else [a + b for a, b in zip(expected_skips, res)]
            expected_mid = mid * c.strength if expected_mid is None else expected_mid + mid * c.strength
        expected = bundle.unet(x, t, context, control=(expected_skips, expected_mid))
        actual = net(x, t, context)
        plain = bundle.unet(x, t, context)
        assert (expected - plain).abs().max() > 1e-3
        torch.testing.assert_close(actual, expected, atol=1e-6, rtol=0)
        # at a step outside both ranges nothing is added
        late = ControlledUNet(bundle.unet, _controls(tmp_path / "late", bundle, ranges=((0.0, 0.5), (0.0, 0.5))))
        torch.testing.assert_close(late(x, t, context, control_step=(9, 10)), plain, atol=0, rtol=0)


@pytest.mark.parametrize("mode, hires_pass, module", [
    ("balanced", False, "none"), ("prompt", False, "none"), ("control", False, "none"),
    ("balanced", True, "canny"), ("balanced", True, "none"), ("control", True, "canny"),
])
def test_control_modes_and_the_hires_pass_scale_residuals_as_a1111(tmp_path, mode, hires_pass, module):
    """sd-webui-controlnet's hook.py: control_scales = [weight] * 13, or with soft injection ("My prompt is more
    important", "ControlNet is more important", and a canny unit in the hires fix's second pass)
    [weight * 0.825 ** (12 - i) for i in range(13)] (SDXL: the first 10); "ControlNet is more important" also
    multiplies the control by cond_mark (0 on the negative prompt's rows)."""
    bundle = tiny_bundle("sd1")
    [control] = _controls(tmp_path, bundle, strengths=(0.7,), ranges=((0.0, 1.0),))
    control = replace(control, control_mode=mode, hires_pass=hires_pass, module=module)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 32, 32, generator=gen)
    t = torch.tensor([500.0, 500.0])
    context = torch.randn(2, 77, bundle.unet_config.context_dim, generator=gen)
    cond_mark = torch.tensor([0.0, 1.0])                                   # [uncond, cond], as CFG batches them
    with torch.no_grad():
        skips, middle = control.net.model(x, t, context, control.hint.expand(2, -1, -1, -1))
        control_list = [*skips, middle]
        soft = mode != "balanced" or (hires_pass and module == "canny")
        scales = [0.7 * 0.825 ** float(12 - i) for i in range(13)] if soft else [0.7] * 13
        if mode == "control":
            control_list = [c * cond_mark.view(-1, 1, 1, 1) for c in control_list]
        control_list = [c * scale for c, scale in zip(control_list, scales)]
        expected = bundle.unet(x, t, context, control=(control_list[:-1], control_list[-1]))
        actual = ControlledUNet(bundle.unet, [control])(x, t, context, cond_mark=cond_mark)
        torch.testing.assert_close(actual, expected, atol=1e-6, rtol=0)
    assert control.scales(10) == (scales[:10] if soft else [0.7] * 10)       # SDXL's 9 skips and middle


def test_control_input_checks(tmp_path):
    assert control_input(("a.safetensors", "hint.png", 0.5)).strength == 0.5
    assert control_input(["a", "b", 1.0, 0.1, 0.9]).end == 0.9
    with pytest.raises(RequestError):
        control_input("a.safetensors")
    for bad in (dict(strength=float("nan")), dict(strength=-1), dict(start=0.5, end=0.5), dict(end=1.5),
                dict(module="depth"), dict(control_mode="Balanced")):
        with pytest.raises(RequestError):
            check_control(ControlInput("a", "b", **bad))
    (tmp_path / "a").write_bytes(b"")
    one_step = ControlInput(tmp_path / "a", _picture(), start=0.5, end=0.5)     # A1111 takes start == end
    assert check_control(one_step, convention="a1111") is one_step
    with pytest.raises(RequestError, match=r"start <= end"):
        check_control(ControlInput(tmp_path / "a", _picture(), start=0.6, end=0.5), convention="a1111")


def test_check_control_reads_the_sizes_of_its_image_and_mask_files_from_their_headers(tmp_path, monkeypatch):
    """check_control (run on every resolve: each grid cell, each submit) compares a control's mask with its image
    by the sizes their files' headers give, upright as `read_image` turns them (EXIF orientation), never decoding
    the pixels; a file that is no picture is a RequestError naming it."""
    from PIL import ImageFile

    from sdlab.pipeline.images import read_image

    (tmp_path / "cn").write_bytes(b"")
    image, mask, turned, wide = (tmp_path / name for name in ("image.png", "mask.png", "turned.jpg", "wide.png"))
    Image.new("RGB", (24, 16)).save(image)
    Image.new("L", (24, 16), 255).save(mask)
    exif = Image.Exif()
    exif[0x0112] = 6                                                             # stored sideways: turned upright
    Image.new("L", (16, 24), 255).save(turned, exif=exif)
    Image.new("L", (16, 24), 255).save(wide)
    assert read_image(turned).size == (24, 16)
    decoded, load = [], ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self) or load(self))
    for fitting in (mask, turned):
        check_control(ControlInput(tmp_path / "cn", image, module="inpaint", mask=fitting))
    with pytest.raises(RequestError, match="the mask is 16x24 but its image 24x16"):
        check_control(ControlInput(tmp_path / "cn", image, module="inpaint", mask=wide))
    assert decoded == []
    (tmp_path / "junk.png").write_bytes(b"not a picture")
    with pytest.raises(RequestError, match="cannot read the control 0 mask"):
        check_control(ControlInput(tmp_path / "cn", image, module="inpaint", mask=tmp_path / "junk.png"))


def test_prepare_refuses_wrong_family_missing_files_and_images(tmp_path):
    sd1 = tiny_bundle("sd1")
    sdxl_path = write_layout(diffusers_controlnet(tiny_bundle("sdxl").unet_config, 0, hint_widths=(16, 32)),
                             "diffusers-file", tmp_path)
    with pytest.raises(RequestError, match="control 0: .*this ControlNet is for SDXL models .* the model is sd1"):
        prepare_controls(sd1, [ControlInput(sdxl_path, _picture())], 64, 64)
    with pytest.raises(RequestError, match="control 0: the ControlNet .*missing.safetensors' does not exist"):
        prepare_controls(sd1, [ControlInput(tmp_path / "missing.safetensors", _picture())], 64, 64)
    (tmp_path / "x").mkdir()
    sd1_path = write_layout(diffusers_controlnet(sd1.unet_config, 0, hint_widths=(16, 32)), "diffusers-file",
                            tmp_path / "x")
    (tmp_path / "hint.png").write_bytes(b"not a picture")
    with pytest.raises(RequestError, match="cannot read the control 0 image"):
        prepare_controls(sd1, [ControlInput(sd1_path, tmp_path / "hint.png")], 64, 64)
    with pytest.raises(RequestError, match="control 0: the image .*nothing.png' does not exist"):
        prepare_controls(sd1, [ControlInput(sd1_path, tmp_path / "nothing.png")], 64, 64)
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, tmp_path / "sd.safetensors")
    with pytest.raises(RequestError, match="control 0: .*a Stable Diffusion checkpoint .* not a ControlNet"):
        prepare_controls(sd1, [ControlInput(tmp_path / "sd.safetensors", _picture())], 64, 64)
    eight = write_layout(diffusers_controlnet(sd1.unet_config, 0), "diffusers-file", tmp_path)
    with pytest.raises(RequestError, match="maps hints 8x down"):
        prepare_controls(sd1, [ControlInput(eight, _picture())], 64, 64)
    grey = ControlNetModel(**controlnet_config(sd1.unet_config, (16, 32)), conditioning_channels=1)
    save_file({k: v.contiguous() for k, v in grey.state_dict().items()}, tmp_path / "grey.safetensors")
    with pytest.raises(RequestError, match=r"control 0: .*grey.safetensors reads 1-channel hints; only RGB"):
        prepare_controls(sd1, [ControlInput(tmp_path / "grey.safetensors", _picture())], 64, 64)


def test_infotext_lines_are_a1111s(tmp_path):
    bundle = tiny_bundle("sd1")
    prepared = _controls(tmp_path, bundle, strengths=(1.0, 0.55), ranges=((0.0, 1.0), (0.1, 0.75)))
    controls = [ControlInput(c.net.origin, "x.png", c.strength, c.start, c.end) for c in prepared]
    lines = infotext_lines(controls)
    assert list(lines) == ["ControlNet 0", "ControlNet 1"]
    assert lines["ControlNet 1"].startswith("Module: none, Model: cn [")
    assert lines["ControlNet 1"].endswith("], Weight: 0.55, Resize Mode: Just Resize, Guidance Start: 0.1, "
                                          "Guidance End: 0.75")
    model = lines["ControlNet 1"].split(", ")[1]
    a1111 = replace(controls[1], module="canny", control_mode="prompt", threshold_a=50.0, threshold_b=120.0)
    assert infotext_lines([a1111], "a1111")["ControlNet 0"] == (   # in the order of A1111's infotext_fields
        f"Module: canny, {model}, Weight: 0.55, Resize Mode: Crop and Resize, Processor Res: 512, Threshold A: 50, "
        "Threshold B: 120, "
        "Guidance Start: 0.1, Guidance End: 0.75, Control Mode: My prompt is more important")
    assert "Resize Mode: Resize and Fill" in infotext_lines([replace(a1111, resize_mode="fill")])["ControlNet 0"]
    assert load_controlnet(controls[0].model_path).name == "cn"


def test_a_control_given_as_a_record_is_written_as_its_controlinput():
    """A request's controls may be (file, image[, strength[, start, end]]) records; its parameters name
    them as the `ControlInput`s they stand for."""
    from sdlab.pipeline.infotext import to_parameters
    from sdlab.pipeline.request import GenerationRequest

    def parameters(control):
        request = GenerationRequest("a house", seed=1, width=64, height=64, controls=(control,))
        return to_parameters(request)["ControlNet 0"]

    assert parameters(("cn.safetensors", "x.png", 0.5, 0.1, 0.6)) == parameters(
        ControlInput("cn.safetensors", "x.png", 0.5, 0.1, 0.6))


def test_the_step_convention_is_recorded_and_read_back():
    """The parameters name the rule the controls' steps followed (`Control steps`), so `--from-png` redraws a
    picture of the A1111 API by it; a file A1111 wrote reads as A1111's rule."""
    from sdlab.pipeline.infotext import from_parameters, to_parameters
    from sdlab.pipeline.request import GenerationRequest

    request = GenerationRequest("a house", seed=1, width=64, height=64, sampler="Euler", schedule="normal",
                                cfg_scale=5.0, steps=4, controls=(ControlInput("cn.safetensors", "x.png", 0.5, 0.0, 0.5),),
                                control_convention="a1111")
    written = {label: value for label, value in to_parameters(request).items() if value is not None}
    assert written["Control steps"] == "a1111"
    assert from_parameters({**written, "Version": "sdlab 0.1.0"})["control_convention"] == "a1111"
    assert to_parameters(GenerationRequest("a house", seed=1, width=64, height=64))["Control steps"] is None
    assert from_parameters({"Steps": "20", "Version": "v1.10.1"})["control_convention"] == "a1111"
    assert "control_convention" not in from_parameters({"Steps": "20", "Version": "sdlab 0.1.0"})
