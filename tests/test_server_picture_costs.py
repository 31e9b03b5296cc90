"""What a request's pictures may cost before it is refused: img2img's init pictures are counted before any is
decoded (each may decode to 4 x --max-pixels), only A1111's first ControlNet units are read, and png-info /
the native parameters route check a picture's size from its header before its text chunks decode it. No
server process: the route functions with a stand-in service, decoding counted by a spy."""

from __future__ import annotations

import asyncio
import base64
import io
from types import SimpleNamespace

import pytest
from PIL import Image, PngImagePlugin

from sdlab.pipeline.styles import StyleDatabase
from sdlab.server import a1111, native
from sdlab.server.config import Limits
from sdlab.server.controls import CONTROLNET_UNIT_COUNT, a1111_controls
from sdlab.server.inputs import BadRequest


def _png_b64(width: int, height: int, parameters: str | None = None) -> str:
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode()


def _service(limits: Limits) -> SimpleNamespace:
    return SimpleNamespace(config=SimpleNamespace(limits=limits), options={}, controlnets=None, styles=StyleDatabase())


@pytest.fixture
def decoded(monkeypatch) -> list[str]:
    """The fields img2img decodes, in order (the real decoding still runs)."""
    names: list[str] = []
    real = a1111.decode_image

    def spy(data, what, limits):
        names.append(what)
        return real(data, what, limits)

    monkeypatch.setattr(a1111, "decode_image", spy)
    return names


def _img2img(body: a1111.Img2ImgIn, limits: Limits = Limits()) -> tuple[str, object]:
    return asyncio.run(a1111._img2img_request(_service(limits), body))


def test_more_init_images_than_batch_size_is_a_422_before_any_is_decoded(decoded):
    """A1111's `StableDiffusionProcessingImg2Img.init`: `if self.batch_size < len(imgs): raise
    RuntimeError(f"bad number of images passed: {len(imgs)}; expecting {self.batch_size} or less")`."""
    body = a1111.Img2ImgIn(prompt="x", batch_size=1, init_images=[_png_b64(4096, 4096)] * 12)
    with pytest.raises(BadRequest) as err:
        _img2img(body)
    assert err.value.status == 422 and str(err.value) == "bad number of images passed: 12; expecting 1 or less"
    assert decoded == []


def test_more_init_images_than_max_batch_is_refused_before_any_is_decoded(decoded):
    body = a1111.Img2ImgIn(prompt="x", batch_size=6, init_images=[_png_b64(8, 8)] * 5)
    with pytest.raises(BadRequest) as err:
        _img2img(body, Limits(max_batch=4))
    assert err.value.status == 400 and "--max-batch" in str(err.value) and "got 5" in str(err.value)
    assert decoded == []


def test_init_images_within_the_limits_are_all_decoded(decoded):
    body = a1111.Img2ImgIn(prompt="x", batch_size=2, init_images=[_png_b64(8, 8)] * 2, mask=_png_b64(8, 8))
    mode, request = _img2img(body)
    assert mode == "inpaint" and request.batch_size == 2 and len(request.init_images) == 2
    assert decoded == ["init_images[0]", "init_images[1]", "mask"]


def _a1111_units_read(args: list) -> list:
    """A1111 1.10 `Api.init_script_args`: `for idx in range(0, min((alwayson_script.args_to -
    alwayson_script.args_from), len(request.alwayson_scripts[alwayson_script_name]["args"]))): script_args[
    alwayson_script.args_from + idx] = ...["args"][idx]`; the extension's args are one per unit."""
    return args[:min(CONTROLNET_UNIT_COUNT, len(args))]


def test_only_the_first_controlnet_units_are_read():
    """Units past the extension's unit count are neither checked nor decoded: a disabled unit fills each of
    the first slots, then a unit that would be refused (unknown model, an image that is not base64)."""
    bad_unit = {"model": "nowhere", "image": "not base64!", "module": "none"}
    args = [{"enabled": False}] * CONTROLNET_UNIT_COUNT + [bad_unit] * 50
    assert all(unit == {"enabled": False} for unit in _a1111_units_read(args))
    assert a1111_controls({"controlnet": {"args": args}}, None, Limits()) == ()
    with pytest.raises(BadRequest):     # the same unit among the first is read
        a1111_controls({"controlnet": {"args": [bad_unit]}}, None, Limits())


def _request(limits: Limits) -> SimpleNamespace:
    return SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(service=_service(limits))))


@pytest.fixture
def no_pixel_decoding(monkeypatch) -> None:
    """Fails a test in which any PNG's pixels are decoded."""
    def refuse(self, *args, **kwargs):
        raise AssertionError("a picture was decoded")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load_read", refuse)


@pytest.mark.parametrize("route", [
    lambda data, limits: a1111.png_info(a1111.PngInfoIn(image=data), _request(limits)),
    lambda data, limits: native.picture_parameters(native.PictureIn(image=data), _request(limits)),
], ids=["png-info", "api-parameters"])
def test_picture_text_routes_check_the_size_before_decoding(route, no_pixel_decoding):
    limits = Limits(max_pixels=32 * 32)                 # pictures up to 4 x 1024 pixels
    with pytest.raises(BadRequest) as err:
        route(_png_b64(65, 64, "a cat\nSteps: 20, Seed: 1"), limits)
    assert err.value.status == 413 and "65x64" in str(err.value)


def test_png_info_reads_a_picture_within_the_limit():
    limits = Limits(max_pixels=32 * 32)
    answer = a1111.png_info(a1111.PngInfoIn(image=_png_b64(64, 64, "a cat\nSteps: 20, Seed: 1")), _request(limits))
    assert answer["info"] == "a cat\nSteps: 20, Seed: 1"
