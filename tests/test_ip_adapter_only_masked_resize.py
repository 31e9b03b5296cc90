"""Inpaint area "Only masked": an IP-Adapter's own picture is fitted to the init picture by the unit's resize mode
(Just Resize / Crop and Resize / Resize and Fill) before it is cut to the drawn region (`image_prompt.in_region`),
at the Python API, the native route (`ip_adapters[].resize_mode`), the A1111 route (a unit's `resize_mode`) and in
the infotext written and read back.

Reference, transcribed from Mikubill/sd-webui-controlnet scripts/controlnet.py (v1.1.455):
`choose_input_image` returns ``unit.resize_mode`` for a unit with a picture of its own, and
`try_crop_image_with_a1111_mask(p, unit, input_image, resize_mode)` cuts each channel as
``images.resize_image(resize_mode.int_value(), channel, mask.width, mask.height)``, ``.crop(crop_region)``, then
``images.resize_image(ResizeMode.OUTER_FIT.int_value(), channel, p.width, p.height)``, the channels stacked again
(only_masked_fixtures' `extension_crop`; `images.resize_image` is sdlab's `upscale.resize_image`, A1111's modes
0 / 1 / 2). The reference run is the adapter given that crop as its picture with sdlab's cut turned off: 0 of 255
apart."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from init_picture_fixtures import INIT, MASK, api_drawn, apart
from only_masked_fixtures import (  # noqa: F401  (fixture: seen)
    BLUR, ONLY_MASKED, PADDING, SIZE, a1111_only_masked, extension_crop, native_only_masked, patchable_setup, seen,
    uncut,
)
from server_fixtures import b64_png

OWN = Image.new("RGB", (48, 96), (30, 40, 220))                 # a unit's own picture, tall where the init is wide
ImageDraw.Draw(OWN).rectangle([4, 20, 40, 84], fill=(250, 250, 20))
ImageDraw.Draw(OWN).ellipse([10, 2, 30, 30], fill=(240, 20, 20))
CLIP_MASK = Image.new("L", OWN.size, 0)                         # an A1111 unit's CLIP mask of that picture
ImageDraw.Draw(CLIP_MASK).rectangle([0, 0, 20, 96], fill=255)
MODES = {"resize": "Just Resize", "crop": "Crop and Resize", "fill": "Resize and Fill"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    with patchable_setup(tmp_path_factory.mktemp("ip-adapter-only-masked-resize")) as made:
        yield made


def _inpaint(setup, *prompts):
    return api_drawn(setup["pipe"], "inpaint", control_convention="a1111", ip_adapters=list(prompts), **ONLY_MASKED)


def test_the_three_modes_cut_three_pictures():
    """The transcription gives each mode its own crop of the tall picture (so the tests below can tell them apart)."""
    crops = {mode: extension_crop(OWN, mode) for mode in MODES}
    assert min(apart(crops[a], crops[b]) for a, b in (("resize", "crop"), ("crop", "fill"), ("resize", "fill"))) > 20


@pytest.mark.parametrize("mode", list(MODES))
def test_the_api_cuts_by_the_prompts_resize_mode(setup, seen, monkeypatch, mode):
    """`IPAdapterInput(..., resize_mode=mode)` with a CLIP mask, A1111's convention: the encoder is given the
    extension's crop of the picture and of the mask by that mode, 0/255; the picture equals the adapter given those
    crops with sdlab's cut off, 0/255; the infotext line records the mode where the extension writes it."""
    from sdlab.pipeline.image_prompt import IPAdapterInput
    from sdlab.pipeline.infotext import to_parameters

    result = _inpaint(setup, IPAdapterInput(setup["adapter"], OWN, 0.8, mask=CLIP_MASK, resize_mode=mode,
                                            module="ip-adapter_clip_sd15"))
    (image, cut_mask), = seen
    crop, mask_crop = extension_crop(OWN, mode), extension_crop(CLIP_MASK, mode)
    assert image.size == SIZE and apart(image, crop) == 0
    assert np.array_equal(np.asarray(cut_mask.convert("L")), np.asarray(mask_crop))
    uncut(monkeypatch)
    reference = _inpaint(setup, IPAdapterInput(setup["adapter"], crop, 0.8, mask=mask_crop,
                                               module="ip-adapter_clip_sd15")).images[0]
    assert apart(result.images[0], reference) == 0
    line = to_parameters(result.request)["ControlNet 0"]
    assert line.startswith("Module: ip-adapter_clip_sd15, Model: ip-adapter_tiny [") and \
        line.endswith(f"Weight: 0.8, Resize Mode: {MODES[mode]}, Guidance Start: 0, Guidance End: 1"), line


def test_an_unset_mode_is_crop_and_resize_and_an_unknown_one_is_refused(setup, seen):
    from sdlab.pipeline.image_prompt import IPAdapterInput, check_ip_adapter
    from sdlab.pipeline.request import RequestError

    _inpaint(setup, IPAdapterInput(setup["adapter"], OWN, 0.8))
    assert apart(seen[0][0], extension_crop(OWN, "crop")) == 0
    with pytest.raises(RequestError, match=r"IP-Adapter 0: unknown resize_mode 'latent'; valid: resize, crop, fill"):
        check_ip_adapter(IPAdapterInput(setup["adapter"], OWN, resize_mode="latent"))


def _native(setup, entry: dict) -> tuple[dict, Image.Image]:
    return native_only_masked(setup["client"], entry)


def _a1111(setup, unit: dict) -> tuple[dict, Image.Image]:
    return a1111_only_masked(setup["client"], unit)


@pytest.mark.parametrize("mode", list(MODES))
def test_the_native_route_takes_the_entrys_resize_mode(setup, monkeypatch, mode):
    """A native `ip_adapters` entry with `resize_mode`: the picture equals the route's with the extension's crop by
    that mode and sdlab's cut off, 0/255; the job's record holds the mode, and reposting the record's entry draws
    the same picture."""
    job, drawn = _native(setup, {"image": b64_png(OWN), "resize_mode": mode})
    assert job["request"]["ip_adapters"][0]["resize_mode"] == mode
    again = job["request"]["ip_adapters"][0]
    _, redrawn = _native(setup, {**{k: v for k, v in again.items() if k not in ("model",)}, "image": b64_png(OWN)})
    assert apart(redrawn, drawn) == 0
    uncut(monkeypatch)
    _, reference = _native(setup, {"image": b64_png(extension_crop(OWN, mode))})
    assert apart(drawn, reference) == 0


@pytest.mark.parametrize("given", [0, 1, 2, "Just Resize", "Crop and Resize", "Resize and Fill",
                                   "Envelope (Outer Fit)", None])
def test_the_a1111_route_takes_the_units_resize_mode(setup, monkeypatch, given):
    """An A1111 unit's `resize_mode` (its index, its label, an older alias; none: Crop and Resize, the extension's
    default): the picture equals the route's with the extension's crop by that mode and sdlab's cut off, 0/255;
    the infotext writes the unit's Resize Mode and png-info reads it back as the native entry's `resize_mode`."""
    from sdlab.pipeline.png_info import parse_parameters
    from sdlab.server.picture_settings import recorded_units

    mode = {0: "resize", 1: "crop", 2: "fill", "Envelope (Outer Fit)": "fill", None: "crop"}.get(
        given, next((name for name, label in MODES.items() if label == given), None))
    info, drawn = _a1111(setup, {"image": b64_png(OWN), **({} if given is None else {"resize_mode": given})})
    text = info["infotexts"][0]
    assert f"Weight: 0.8, Resize Mode: {MODES[mode]}, Guidance Start: 0" in text, text
    _, adapters, unreadable = recorded_units(parse_parameters(text))
    assert unreadable == [] and adapters[0]["resize_mode"] == mode, adapters
    uncut(monkeypatch)
    _, reference = _a1111(setup, {"image": b64_png(extension_crop(OWN, mode))})
    assert apart(drawn, reference) == 0


def test_a_recorded_mode_is_read_back_and_a_bad_one_named():
    from sdlab.pipeline.image_prompt import recorded_resize_mode

    assert recorded_resize_mode("Model: a [1], Weight: 0.8, Resize Mode: Resize and Fill") == "fill"
    assert recorded_resize_mode("Model: a [1], Weight: 0.8, Resize Mode: Inner Fit (Scale to Fit)") == "crop"
    assert recorded_resize_mode("Model: a [1], Weight: 0.8") is None
    with pytest.raises(ValueError, match="Resize Mode 'Stretch' is not one of Just Resize, Crop and Resize"):
        recorded_resize_mode("Model: a [1], Resize Mode: Stretch")


def test_cli_from_png_draws_the_recorded_units_resize_mode(setup, tmp_path, capsys, monkeypatch):
    """`sdlab inpaint --from-png` of a picture whose IP-Adapter unit line records "Resize Mode: Resize and Fill":
    the redraw cuts the --ip-adapter-image by that mode (its picture equals the CLI's redraw given the extension's
    "fill" crop with sdlab's cut off, 0/255, and differs from the one whose line says Crop and Resize) and records
    the mode again."""
    from cli_helpers import png_with_parameters, run

    from sdlab.checkpoints.controlnet import legacy_hash
    from sdlab.pipeline.png_info import read_parameters

    INIT.save(tmp_path / "init.png")
    MASK.save(tmp_path / "mask.png")
    OWN.save(tmp_path / "own.png")
    extension_crop(OWN, "fill").save(tmp_path / "cut.png")

    def redraw(mode: str, picture: str) -> Image.Image:
        unit = (f'ControlNet 0: "Module: ip-adapter_clip_sd15, Model: ip-adapter_tiny [{legacy_hash(setup["adapter"])}]'
                f', Weight: 0.8, Resize Mode: {MODES[mode]}, Guidance Start: 0, Guidance End: 1"')
        text = ("a red apple\nNegative prompt: blurry\nSteps: 3, Sampler: Euler, CFG scale: 5, Seed: 7, Size: 64x64, "
                f"Mask blur: {BLUR}, Inpaint area: Only masked, Masked area padding: {PADDING}, {unit}")
        source, out = png_with_parameters(tmp_path / f"{mode}.png", text), tmp_path / f"out-{mode}-{picture}"
        code, _, err = run(["inpaint", "--from-png", str(source), "--init", str(tmp_path / "init.png"), "--mask",
                            str(tmp_path / "mask.png"), "--ip-adapter", str(setup["adapter"]), "--ip-adapter-image",
                            str(tmp_path / picture), "--no-progress", "--out", str(out)], capsys)
        assert code == 0, err
        assert f"Weight: 0.8, Resize Mode: {MODES[mode]}, Guidance Start: 0" in read_parameters(out)
        return Image.open(out).convert("RGB")

    fill, crop = redraw("fill", "own.png"), redraw("crop", "own.png")
    uncut(monkeypatch)
    assert apart(fill, redraw("fill", "cut.png")) == 0
    assert apart(fill, crop) > 5
