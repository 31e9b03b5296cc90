"""The img2img resize mode, Masked content and Inpaint area on both APIs: A1111's `resize_mode`,
`inpainting_fill`, `inpaint_full_res` and `inpaint_full_res_padding` with A1111's API defaults (fill, Only
masked, padding 0), the native API's `resize_mode`, `inpaint_fill`, `inpaint_only_masked`, `inpaint_padding`
(the request's defaults), and a bad value as one 422. One real server (the shipped model, 64 px)."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from server_fixtures import b64_png, picture, start_server, wait_for_job
from sdlab.pipeline.inpaint_area import inpaint_region
from sdlab.pipeline.overlay import blurred_mask
from sdlab.server.a1111 import Img2ImgIn, _check_init_count, _request
from sdlab.server.config import Limits
from sdlab.server.inputs import BadRequest


def _picture() -> Image.Image:
    return Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))


def _mask() -> Image.Image:
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (36, 8, 52, 20))
    return mask


def _body(**fields) -> dict:
    return {"prompt": "x", "steps": 2, "seed": 1, "init_images": [b64_png(_picture())], "mask": b64_png(_mask()),
            **fields}


# ---------------------------------------------------------------------------------------------------------
# the A1111 fields -> the request


def test_a1111_defaults_are_fill_only_masked_padding_0_and_just_resize():
    """A1111's API model takes StableDiffusionProcessingImg2Img's defaults: inpainting_fill 0 (fill),
    inpaint_full_res True (Only masked), inpaint_full_res_padding 0, resize_mode 0."""
    request = _request(Img2ImgIn(prompt="x"), inits=(_picture(),), mask=_mask())
    assert (request.inpaint_fill, request.inpaint_only_masked, request.inpaint_padding, request.resize_mode) == (
        "fill", True, 0, "resize")
    img2img = _request(Img2ImgIn(prompt="x"), inits=(_picture(),))
    assert img2img.resize_mode == "resize" and img2img.inpaint_fill == "original"        # no mask: no inpainting


@pytest.mark.parametrize("index, content", enumerate(["fill", "original", "latent noise", "latent nothing"]))
def test_a1111_inpainting_fill_indices(index, content):
    request = _request(Img2ImgIn(prompt="x", inpainting_fill=index, inpaint_full_res=False,
                                 inpaint_full_res_padding=16), inits=(_picture(),), mask=_mask())
    assert (request.inpaint_fill, request.inpaint_only_masked, request.inpaint_padding) == (content, False, 16)


@pytest.mark.parametrize("index, mode", enumerate(["resize", "crop", "fill", "latent"]))
def test_a1111_resize_mode_indices(index, mode):
    assert _request(Img2ImgIn(prompt="x", resize_mode=index), inits=(_picture(),)).resize_mode == mode


@pytest.mark.parametrize("fields, message", [
    ({"inpainting_fill": 4},
     "inpainting_fill must be 0 (fill), 1 (original), 2 (latent noise), 3 (latent nothing); got 4"),
    ({"resize_mode": -1}, "resize_mode must be 0 (Just resize), 1 (Crop and resize), 2 (Resize and fill), "
                          "3 (Just resize (latent upscale)); got -1"),
    ({"inpaint_full_res_padding": -8}, "inpaint_full_res_padding must be >= 0, got -8"),
])
def test_a1111_bad_values_are_a_422(fields, message):
    with pytest.raises(BadRequest) as err:
        _request(Img2ImgIn(prompt="x", **fields), inits=(_picture(),), mask=_mask())
    assert err.value.status == 422 and err.value.message == message


def test_a1111_latent_mask_with_a_mask_is_a_422_and_without_one_ignored():
    """A1111's API passes latent_mask on as the base64 string it was sent (it decodes `mask` alone), so with a mask
    its `init` fails on it (``masking.fill(image, latent_mask)``, ``latent_mask.convert``); without, it is unused."""
    body = Img2ImgIn(prompt="x", latent_mask=b64_png(_mask()))
    with pytest.raises(BadRequest) as err:
        _request(body, inits=(_picture(),), mask=_mask())
    assert err.value.status == 422 and err.value.message.startswith("latent_mask is not drawn")
    assert _request(body, inits=(_picture(),)).mask_image is None
    assert _request(Img2ImgIn(prompt="x", latent_mask=None), inits=(_picture(),), mask=_mask()).mask_image is not None


# ---------------------------------------------------------------------------------------------------------
# over HTTP


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory):
    server = start_server(tmp_path_factory.mktemp("inpaint-options") / "outputs")
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c
    server.stop()


def test_a1111_inpainting_with_default_fields_fills_and_draws_only_the_masked_region(client):
    response = client.post("/sdapi/v1/img2img", json=_body(width=32, height=32))
    assert response.status_code == 200, response.text
    infotext = json.loads(response.json()["info"])["infotexts"][0]
    assert "Inpaint area: Only masked, Masked area padding: 0, Masked content: fill" in infotext
    out = np.asarray(picture(response.json()["images"][0]))
    assert out.shape == (64, 64, 3)                                          # the picture's size, not 32 x 32
    x1, y1, x2, y2 = inpaint_region(blurred_mask(_mask(), 4.0), 0, (32, 32))   # A1111's mask_blur default: 4
    assert (x2 - x1, y2 - y1) < (64, 64)
    outside = np.ones((64, 64), dtype=bool)
    outside[y1:y2, x1:x2] = False
    assert np.array_equal(out[outside], np.asarray(_picture())[outside])
    assert not np.array_equal(out[8:20, 36:52], np.asarray(_picture())[8:20, 36:52])


def test_a1111_whole_picture_with_original_content_writes_neither_label(client):
    response = client.post("/sdapi/v1/img2img", json=_body(inpainting_fill=1, inpaint_full_res=False, resize_mode=1))
    assert response.status_code == 200, response.text
    infotext = json.loads(response.json()["info"])["infotexts"][0]
    assert "Masked content" not in infotext and "Inpaint area" not in infotext


def test_a1111_bad_masked_content_is_a_422(client):
    response = client.post("/sdapi/v1/img2img", json=_body(inpainting_fill=7))
    assert response.status_code == 422 and "inpainting_fill must be 0 (fill)" in response.text
    assert client.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0          # nothing was queued


def test_native_api_takes_the_request_fields(client):
    job = {"mode": "inpaint", "prompt": "x", "steps": 2, "seed": 1, "init_image": b64_png(_picture()),
           "mask_image": b64_png(_mask()), "inpaint_fill": "latent nothing", "inpaint_only_masked": True,
           "inpaint_padding": 8, "resize_mode": "crop", "width": 32, "height": 32}
    created = client.post("/api/jobs", json=job)
    assert created.status_code == 202, created.text
    done = wait_for_job(client, created.json()["id"])
    assert done["status"] == "done", done
    assert "Inpaint area: Only masked, Masked area padding: 8, Masked content: latent nothing" in done["infotexts"][0]
    bad = client.post("/api/jobs", json={**job, "inpaint_fill": "noise"})
    assert bad.status_code in (400, 422) and "unknown masked content 'noise'" in bad.text


def test_native_invert_mask_repaints_the_black_part(client):
    job = {"mode": "inpaint", "prompt": "x", "steps": 2, "seed": 1, "init_image": b64_png(_picture())}
    drawn = []
    for mask, invert in ((_mask(), True), (Image.eval(_mask(), lambda v: 255 - v), False)):
        created = client.post("/api/jobs", json={**job, "mask_image": b64_png(mask), "invert_mask": invert})
        assert created.status_code == 202, created.text
        done = wait_for_job(client, created.json()["id"])
        assert done["status"] == "done" and done["request"]["invert_mask"] is invert, done
        drawn.append(client.get(done["images"][0]).content)
        assert ("Mask mode: Inpaint not masked" in done["infotexts"][0]) is invert
    assert np.array_equal(*(np.asarray(Image.open(io.BytesIO(png))) for png in drawn))


def test_native_mask_round_false_repaints_a_semi_transparent_mask(client):
    """A1111's mask_round: a brush of alpha 90 rounds to nothing (the picture comes back as it was); off, it
    repaints at its own level."""
    brush = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    brush.paste((255, 255, 255, 90), (36, 8, 52, 20))
    job = {"mode": "inpaint", "prompt": "x", "steps": 2, "seed": 1, "init_image": b64_png(_picture()),
           "mask_image": b64_png(brush), "img2img_convention": "a1111"}
    drawn = {}
    for mask_round in (True, False):
        created = client.post("/api/jobs", json={**job, "mask_round": mask_round})
        assert created.status_code == 202, created.text
        done = wait_for_job(client, created.json()["id"])
        assert done["status"] == "done" and done["request"]["mask_round"] is mask_round, done
        drawn[mask_round] = np.asarray(Image.open(io.BytesIO(client.get(done["images"][0]).content)).convert("RGB"))
    assert np.array_equal(drawn[True], np.asarray(_picture()))
    assert not np.array_equal(drawn[False], np.asarray(_picture()))


# ---------------------------------------------------------------------------------------------------------
# several init images, mask blur x / y, inverted masks, the initial noise multiplier, extra_generation_params


@pytest.mark.parametrize("fields, blur", [({}, (4, 4)), ({"mask_blur_x": 0, "mask_blur_y": 0}, (0, 0)),
                                          ({"mask_blur_x": 8, "mask_blur_y": 0}, (8, 0)),
                                          ({"mask_blur": 3, "mask_blur_x": 8, "mask_blur_y": 0}, (3, 3))])
def test_a1111_mask_blur_x_and_y_unless_mask_blur_sets_both(fields, blur):
    request = _request(Img2ImgIn(prompt="x", **fields), inits=(_picture(),), mask=_mask())
    assert (request.mask_blur, request.mask_blur_y) == blur


def test_a1111_noise_multiplier_and_mask_invert_reach_the_request():
    request = _request(Img2ImgIn(prompt="x", initial_noise_multiplier=0.5, inpainting_mask_invert=1),
                       inits=(_picture(),), mask=_mask())
    assert request.noise_multiplier == 0.5 and request.invert_mask is True
    assert np.array_equal(np.asarray(request.mask_image), np.asarray(_mask()))   # inverted by the pipeline
    assert _request(Img2ImgIn(prompt="x"), inits=(_picture(),)).noise_multiplier == 1.0


def test_a1111_several_init_images_make_the_batch_and_more_than_batch_size_is_a_422():
    inits = (_picture(), Image.new("RGB", (64, 64), (0, 200, 0)))
    request = _request(Img2ImgIn(prompt="x", batch_size=4, n_iter=2), inits=inits)
    assert request.batch_size == 2 and request.init_images == inits          # one per image, in each iteration
    with pytest.raises(BadRequest) as err:
        _check_init_count(Img2ImgIn(prompt="x", batch_size=1, init_images=["a", "b"]), Limits())
    assert err.value.status == 422 and "bad number of images passed: 2; expecting 1 or less" in str(err.value)


def test_a1111_each_init_image_draws_its_own_picture(client):
    green = Image.new("RGB", (64, 64), (0, 200, 0))
    response = client.post("/sdapi/v1/img2img", json=_body(init_images=[b64_png(_picture()), b64_png(green)],
                                                           batch_size=2, inpaint_full_res=False))
    assert response.status_code == 200, response.text
    outside = np.asarray(blurred_mask(_mask(), 4.0)) == 0
    pictures = [np.asarray(picture(b)) for b in response.json()["images"]]
    assert np.array_equal(pictures[0][outside], np.asarray(_picture())[outside])
    assert np.array_equal(pictures[1][outside], np.asarray(green)[outside])
    assert json.loads(response.json()["info"])["batch_size"] == 2


@pytest.mark.parametrize("resize_mode", [0, 1, 2])
def test_a1111_init_images_of_several_sizes_are_each_resized_to_width_x_height(client, resize_mode):
    """A1111 resizes each init image to width x height before batching them (`StableDiffusionProcessingImg2Img
    .init`): picture i is what init image i alone draws with seed + i."""
    wide = Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 96, 3), dtype=np.uint8))
    body = {"prompt": "x", "steps": 2, "seed": 1, "width": 64, "height": 64, "resize_mode": resize_mode}
    response = client.post("/sdapi/v1/img2img", json={**body, "batch_size": 2,
                                                      "init_images": [b64_png(_picture()), b64_png(wide)]})
    assert response.status_code == 200, response.text
    alone = client.post("/sdapi/v1/img2img", json={**body, "seed": 2, "init_images": [b64_png(wide)]})
    pictures = [np.asarray(picture(b)).astype(int) for b in response.json()["images"] + alone.json()["images"]]
    assert [p.shape for p in pictures] == [(64, 64, 3)] * 3 and np.abs(pictures[1] - pictures[2]).max() <= 1


def test_a1111_img2img_without_a_size_draws_at_the_models_default_size(client):
    """docs/server.md: unset width / height take the loaded model's defaults (64 px for the shipped model), as
    A1111's API takes its 512 for any init image; the native API keeps the init image's size."""
    wide = Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 96, 3), dtype=np.uint8))
    response = client.post("/sdapi/v1/img2img", json={"prompt": "x", "steps": 2, "init_images": [b64_png(wide)]})
    assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    assert (info["width"], info["height"]) == (64, 64) and "Size: 64x64" in info["infotexts"][0]
    assert Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]))).size == (64, 64)
    mixed = client.post("/sdapi/v1/img2img", json={"prompt": "x", "steps": 2, "batch_size": 2,
                                                   "init_images": [b64_png(wide), b64_png(_picture())]})
    assert mixed.status_code == 200, mixed.text
    native = client.post("/api/jobs", json={"mode": "img2img", "prompt": "x", "steps": 2, "init_image": b64_png(wide)})
    job = wait_for_job(client, native.json()["id"])
    assert (job["request"]["width"], job["request"]["height"]) == (96, 40)


def test_a1111_latent_resize_of_init_images_of_several_sizes_is_a_400_naming_it(client):
    wide = Image.new("RGB", (96, 64), (0, 200, 0))
    response = client.post("/sdapi/v1/img2img", json={"prompt": "x", "steps": 2, "batch_size": 2, "resize_mode": 3,
                                                      "width": 64, "height": 64,
                                                      "init_images": [b64_png(_picture()), b64_png(wide)]})
    assert response.status_code == 400 and "resize mode 'latent' encodes each init image at its own size" in response.text


def test_a1111_info_lists_the_img2img_generation_params_and_the_mask_mode(client):
    response = client.post("/sdapi/v1/img2img", json=_body(inpainting_mask_invert=1, initial_noise_multiplier=0.9))
    assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    assert info["extra_generation_params"] == {
        "Schedule type": info["extra_generation_params"]["Schedule type"], "Denoising strength": 0.75,
        "Mask mode": "Inpaint not masked", "Mask blur": 4.0, "Inpaint area": "Only masked",
        "Masked area padding": 0, "Masked content": "fill", "Noise multiplier": 0.9}
    assert type(info["extra_generation_params"]["Mask blur"]) is int             # A1111's mask_blur_x: an int
    assert "Mask mode: Inpaint not masked" in info["infotexts"][0] and "Noise multiplier: 0.9" in info["infotexts"][0]
