"""The A1111 routes' `info.is_using_inpainting_conditioning` says whether the model drew with an inpainting model's
masked-picture conditioning, as A1111 1.10 sets it (modules/processing.py):

    StableDiffusionProcessing.txt2img_image_conditioning:
        self.is_using_inpainting_conditioning = self.sd_model.model.conditioning_key in {'hybrid', 'concat'}
    StableDiffusionProcessing.inpainting_image_conditioning:
        self.is_using_inpainting_conditioning = True
    img2img_image_conditioning: ... conditioning_key in {'hybrid', 'concat'} or is_sdxl_inpaint
        -> inpainting_image_conditioning
    sample_hr_pass: a latent upscale at inpainting_mask_weight < 1 and every pixel upscale
        -> img2img_image_conditioning; a latent upscale at weight 1 -> txt2img_image_conditioning

create_infotext writes "Conditional mask weight" wherever the flag is set, at 1 too:
    getattr(p, "inpainting_mask_weight", shared.opts.inpainting_mask_weight) if p.is_using_inpainting_conditioning

SD1's and SD2's 9-channel models have the key 'hybrid' (v1-inpainting-inference.yaml); SDXL's inpainting model
'crossattn' (sd_models_xl.extend_sdxl) with `is_sdxl_inpaint`. In-process app (TestClient), tiny random-weight SD1,
SD1-inpainting and SDXL-inpainting files in a --models-dir."""

from __future__ import annotations

import json

import pytest

from server_fixtures import b64_png, tiny_models_client

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

BODY = {"prompt": "a harbour", "seed": 2, "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler"}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory):
    with tiny_models_client(tmp_path_factory.mktemp("inpainting-conditioning"), ("sd1", "sd1-inpaint", "sdxl-inpaint"),
                            seed=3) as c:
        yield c


def _flag(client, route: str, model: str, options: dict | None = None, **fields) -> bool:
    body = {**BODY, **fields, "override_settings": {"sd_model_checkpoint": model, **(options or {})}}
    answer = client.post(f"/sdapi/v1/{route}", json=body)
    assert answer.status_code == 200, answer.text
    info = json.loads(answer.json()["info"])
    flag = info["is_using_inpainting_conditioning"]
    weight = (options or {}).get("inpainting_mask_weight", 1.0)
    for text in info["infotexts"]:      # create_infotext: the weight wherever the flag is set, at 1 too
        assert ("Conditional mask weight" in text) is flag and (f"Conditional mask weight: {weight:g}," in text) is flag
    assert "Conditional mask weight" not in info["extra_generation_params"]     # not p.extra_generation_params'
    return flag


def _img2img(masked: bool = False) -> dict:
    from bundle_fixtures import init_picture, lower_right_mask

    return {"init_images": [b64_png(init_picture(64))], "denoising_strength": 0.5,
            **({"mask": b64_png(lower_right_mask(64))} if masked else {})}


@pytest.mark.parametrize("model, txt2img, img2img", [
    ("sd1", False, False),
    ("sd1-inpaint", True, True),            # conditioning_key 'hybrid': txt2img's conditioning sets it too
    ("sdxl-inpaint", False, True),          # 'crossattn': only img2img's inpainting conditioning sets it
])
def test_the_flag_follows_the_model(client, model, txt2img, img2img):
    assert _flag(client, "txt2img", model) is txt2img
    assert _flag(client, "img2img", model, **_img2img()) is img2img
    assert _flag(client, "img2img", model, **_img2img(masked=True)) is img2img


@pytest.mark.parametrize("upscaler, weight, flag", [
    ("Latent", 1.0, False),                 # txt2img_image_conditioning again: SDXL's key is not 'hybrid'
    ("Latent", 0.5, True),                  # img2img_image_conditioning of the decoded latent
    ("Lanczos", 1.0, True),                 # a pixel upscale: img2img_image_conditioning of the pictures
])
def test_sdxl_inpainting_txt2img_sets_it_in_the_hires_pass(client, upscaler, weight, flag):
    hires = {"enable_hr": True, "hr_scale": 1.5, "hr_upscaler": upscaler, "denoising_strength": 0.5}
    assert _flag(client, "txt2img", "sdxl-inpaint", options={"inpainting_mask_weight": weight}, **hires) is flag
    assert _flag(client, "txt2img", "sd1-inpaint", options={"inpainting_mask_weight": weight}, **hires) is True
