"""Inpaint area "Only masked": an IP-Adapter's picture is cut to the drawn region, as a ControlNet's image is
(`image_prompt.in_region`, `control.cropped_to_region`), at the Python API, the native route and the A1111 route.

A1111's ControlNet extension crops every unit's input in `get_control` (`Script.try_crop_image_with_a1111_mask`,
sd-webui-controlnet scripts/controlnet.py, v1.1.455): for a unit whose module holds no "reference" in an img2img
with `inpaint_full_res` and a mask, when `unit.inpaint_crop_input_image` (default True,
internal_controlnet/external_code.py ControlNetUnit) is set, an IP-Adapter unit's too; the picture is the unit's
own, else `p.init_images[0]` (`choose_input_image`). `extension_crop` (only_masked_fixtures) transcribes its
lines: each channel ``images.resize_image(resize_mode, channel, mask.width, mask.height)``, ``.crop(crop_region)``,
then ``images.resize_image(OUTER_FIT, channel, p.width, p.height)``, stacked again (`resize_image` is sdlab's
`images.resize_image`). The reference run is the reviewer's construction: the adapter given that crop as its
picture with sdlab's cut turned off; the runs agree 0 of 255."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from init_picture_fixtures import INIT, MASK, api_drawn, apart, listed_model
from only_masked_fixtures import (  # noqa: F401  (fixture: seen)
    BLUR, ONLY_MASKED, PADDING, SIZE, a1111_only_masked, extension_crop, native_only_masked, patchable_setup, seen,
    uncut,
)
from server_fixtures import b64_png

OWN = Image.new("RGB", (80, 72), (30, 40, 220))                 # a unit's own picture, of another size
ImageDraw.Draw(OWN).rectangle([20, 4, 60, 60], fill=(250, 250, 20))
CLIP_MASK = Image.new("L", (80, 72), 0)                         # an A1111 unit's CLIP mask of that picture
ImageDraw.Draw(CLIP_MASK).rectangle([0, 0, 30, 72], fill=255)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    with patchable_setup(tmp_path_factory.mktemp("ip-adapter-only-masked"), face_id=True) as made:
        yield made


def _inpaint(setup, convention: str, *prompts) -> Image.Image:
    return api_drawn(setup["pipe"], "inpaint", control_convention=convention, ip_adapters=list(prompts),
                     **ONLY_MASKED).images[0]


def test_the_crop_transcription_is_the_drawn_region():
    """The transcribed cut of the init picture is the picture "Only masked" draws, whatever the resize mode
    (the init picture has the mask's size): what the extension hands an IP-Adapter unit without a picture."""
    from sdlab.pipeline.init_picture import init_picture
    from sdlab.pipeline.request import GenerationRequest

    request = GenerationRequest("a", init_image=INIT, mask_image=MASK, width=64, height=64, mask_blur=BLUR,
                                inpaint_only_masked=True, inpaint_padding=PADDING, inpaint_fill="original")
    drawn = init_picture(request).image
    for mode in ("resize", "crop", "fill"):
        assert apart(extension_crop(INIT, mode), drawn) == 0


@pytest.mark.parametrize("convention", ["diffusers", "a1111"])
@pytest.mark.parametrize("own", [False, True], ids=["init-picture", "own-picture"])
def test_the_api_draws_the_adapter_on_the_extensions_crop(setup, seen, monkeypatch, convention, own):
    """`pipe.inpaint(..., inpaint_only_masked=True)` with an IP-Adapter without a picture (the init picture) or with
    its own (80x72, fitted by Crop and Resize, the extension's default unit's mode; under A1111's convention with a
    CLIP mask): the encoder is given the extension's crop 0/255, and the picture equals the adapter given that
    crop with sdlab's cut off, 0/255; the whole picture given instead (the cut off) draws another picture."""
    from sdlab.pipeline.image_prompt import IPAdapterInput

    mask = CLIP_MASK if own and convention == "a1111" else None
    source = OWN if own else INIT
    drawn = _inpaint(setup, convention, IPAdapterInput(setup["adapter"], OWN if own else None, 0.8, mask=mask))
    (image, cut_mask), = seen
    crop = extension_crop(source, "crop")
    assert image.size == SIZE and apart(image, crop) == 0
    if mask is not None:
        assert np.array_equal(np.asarray(cut_mask.convert("L")), np.asarray(extension_crop(mask, "crop")))
    uncut(monkeypatch)
    reference = _inpaint(setup, convention, IPAdapterInput(setup["adapter"], crop, 0.8,
                                                           mask=None if mask is None else extension_crop(mask, "crop")))
    assert apart(drawn, reference) == 0
    whole = _inpaint(setup, convention, IPAdapterInput(setup["adapter"], source, 0.8, mask=mask))
    assert apart(whole, reference) > 5, apart(whole, reference)


def _native(setup, entry: dict) -> Image.Image:
    return native_only_masked(setup["client"], entry)[1]


def _a1111(setup, unit: dict) -> Image.Image:
    return a1111_only_masked(setup["client"], unit)[1]


@pytest.mark.parametrize("route", ["native", "a1111"])
def test_both_server_routes_draw_the_adapter_on_the_extensions_crop(setup, monkeypatch, route):
    """A native `ip_adapters` entry without `image` (and with `"image": ""`) and an A1111 unit without one, and
    each with its own picture, in an "Only masked" inpaint: each picture equals the same route's with the adapter
    given the extension's crop and sdlab's cut off, 0/255."""
    draw = _native if route == "native" else _a1111
    none = draw(setup, {})
    empty = draw(setup, {"image": ""})
    own = draw(setup, {"image": b64_png(OWN)})
    uncut(monkeypatch)
    assert apart(none, draw(setup, {"image": b64_png(extension_crop(INIT, "crop"))})) == 0
    assert apart(empty, none) == 0
    assert apart(own, draw(setup, {"image": b64_png(extension_crop(OWN, "crop"))})) == 0
    assert apart(draw(setup, {"image": b64_png(INIT)}), none) > 5            # the whole init picture


def test_a_face_id_adapter_without_a_face_embedding_in_txt2img_gets_the_face_id_message_at_every_door(
        setup, tmp_path, capsys):
    """A FaceID adapter without an image: txt2img refuses it with the message img2img gives it (the init picture
    is no face embedding), not the generic "needs an image" one, at the API, the native route (422), the A1111
    route (422: its own refusal of a FaceID file, in both modes) and the CLI (one line, exit 2)."""
    from cli_helpers import run

    from sdlab.pipeline.image_prompt import IPAdapterInput
    from sdlab.pipeline.request import RequestError

    pipe, client, face = setup["pipe"], setup["client"], setup["face"]
    INIT.save(tmp_path / "init.png")
    messages = {}
    for mode in ("img2img", "txt2img"):
        with pytest.raises(RequestError) as refused:
            if mode == "img2img":
                pipe.img2img("a", INIT, 0.7, steps=2, width=64, height=64, ip_adapters=[IPAdapterInput(face)])
            else:
                pipe.txt2img("a", steps=2, width=64, height=64, ip_adapters=[IPAdapterInput(face)])
        native = {"prompt": "a", "steps": 2, "width": 64, "height": 64, "mode": mode,
                  "ip_adapters": [{"model": "ip-adapter-faceid_tiny"}],
                  **({"init_image": b64_png(INIT)} if mode == "img2img" else {})}
        native = client.post("/api/jobs", json=native)
        model = listed_model(client, "ip-adapter-faceid_tiny")
        a1111 = {"prompt": "a", "steps": 2, "width": 64, "height": 64,
                 **({"init_images": [b64_png(INIT)]} if mode == "img2img" else {}),
                 "alwayson_scripts": {"controlnet": {"args": [{"module": "ip-adapter_clip_sd15", "model": model}]}}}
        a1111 = client.post(f"/sdapi/v1/{mode}", json=a1111)
        assert native.status_code == a1111.status_code == 422, (native.text, a1111.text)
        code, out, err = run([mode, "a", "--steps", "2", "--width", "64", "--height", "64", "--ip-adapter", str(face),
                              *(["--init", str(tmp_path / "init.png")] if mode == "img2img" else []),
                              "--out", str(tmp_path / "out.png")], capsys)
        assert (code, out) == (2, ""), err
        messages[mode] = (str(refused.value), native.status_code, native.json()["detail"], a1111.json()["detail"],
                          err.strip())
    assert messages["txt2img"] == messages["img2img"], messages
    api, _, native, a1111, cli = messages["txt2img"]
    assert api.startswith("IP-Adapter 0: an IP-Adapter FaceID reads an InsightFace face embedding"), api
    assert native == api and messages["txt2img"][1] == 422
    assert a1111.startswith("control 0 (module 'ip-adapter_clip_sd15'): the IP-Adapter ip-adapter-faceid_tiny.bin "
                            "is a FaceID model"), a1111
    assert cli.splitlines() == [f"sdlab: error: --ip-adapter {str(face)!r}: {api}"]
    assert not (tmp_path / "out.png").exists()
