"""ComfyUI's two-pass "hires fix" graph over the ComfyUI API (/prompt): KSampler -> LatentUpscale(By) -> KSampler ->
VAEDecode drawn as the native job's hires fix under hr_convention comfyui (server/comfy_graph.py `second_pass`), pixel
for pixel; ComfyUI's messages across both KSamplers; its /object_info entries; the graphs sdlab refuses. The latents
of the two passes are proven against ComfyUI's two common_ksampler calls in tests/test_comfyui_hires.py."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
from PIL import Image

from sdlab.pipeline.request import HIRES_SIZE
from sdlab.server.inputs import BadRequest
from test_server_comfy_api import NATIVE, drawn, graph, native_batch, native_pixels, server, viewed  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def two_pass(upscale: dict, **second) -> dict:
    """The basic graph with ComfyUI's hires fix: node 3's latent upscaled by node 10 (`upscale`: its class_type and
    inputs), sampled again by node 11 (node 3's inputs with `second` changed), decoded by node 8."""
    prompt = graph()
    prompt["10"] = {"class_type": upscale.pop("class_type"), "inputs": {"samples": ["3", 0], **upscale}}
    prompt["11"] = {"class_type": "KSampler", "inputs": {**prompt["3"]["inputs"], "latent_image": ["10", 0],
                                                         **second}}
    prompt["8"]["inputs"]["samples"] = ["11", 0]
    return prompt


BY = dict(class_type="LatentUpscaleBy", upscale_method="bislerp", scale_by=1.5)
SECOND = dict(seed=7, steps=2, cfg=4.5, sampler_name="euler_ancestral", scheduler="karras", denoise=0.5)
NATIVE_HIRES = dict(hr_convention="comfyui", hr_upscaler="bislerp", hr_scale=1.5, hr_seed=7, hr_steps=2,
                    hr_cfg_scale=4.5, hr_sampler="euler_ancestral", hr_schedule="karras", hr_denoise=0.5)


def test_the_two_pass_graph_draws_the_native_comfyui_hires_job(server):
    """LatentUpscaleBy bislerp x1.5 + a second KSampler of its own seed, steps, CFG, sampler, scheduler and denoise:
    the native job with those as hr_* fields, pixel for pixel; ComfyUI's messages: the first KSampler's 3 steps, then
    the upscale and the second KSampler executing, its own 2 steps; the picture's infotext records the hires."""
    messages, entry = drawn(server, two_pass(dict(BY), **SECOND))
    executing = [data["node"] for kind, data in messages if kind == "executing"]
    assert executing == ["4", "6", "7", "5", "3", "10", "11", "8", "9", None]
    assert [(d["value"], d["max"], d["node"]) for k, d in messages if k == "progress"] == [
        (1, 3, "3"), (2, 3, "3"), (3, 3, "3"), (1, 2, "11"), (2, 2, "11")]
    pixels = viewed(server, entry["outputs"]["9"]["images"][0])
    assert pixels.shape == (96, 96, 3)
    native = native_pixels(server, {**NATIVE, **NATIVE_HIRES})
    assert np.array_equal(pixels, native)
    plain = native_pixels(server, {**NATIVE, **NATIVE_HIRES, "hr_seed": 8})
    assert np.abs(plain - native).max() > 10                      # the second pass's own seed draws
    picture = Image.open(io.BytesIO(server.get("/view", params=entry["outputs"]["9"]["images"][0]).content))
    infotext = picture.info["parameters"]
    assert "Hires convention: comfyui" in infotext and "Hires seed: 7" in infotext


def test_a_latent_upscale_with_a_centre_crop_draws_the_native_job(server):
    """LatentUpscale to 160 x 96 px with crop center, the second KSampler with other prompts (hr_prompt /
    hr_negative_prompt) and the first's seed: the native job, pixel for pixel."""
    prompt = two_pass(dict(class_type="LatentUpscale", upscale_method="bicubic", width=160, height=96,
                           crop="center"), steps=2, denoise=0.6, positive=["12", 0], negative=["13", 0])
    prompt["12"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "a castle"}}
    prompt["13"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "fog"}}
    _, entry = drawn(server, prompt)
    pixels = viewed(server, entry["outputs"]["9"]["images"][0])
    assert pixels.shape == (96, 160, 3)
    native = native_pixels(server, {**NATIVE, "hr_convention": "comfyui", "hr_upscaler": "bicubic", "hr_width": 160,
                                    "hr_height": 96, "hr_crop": "center", "hr_steps": 2, "hr_denoise": 0.6,
                                    "hr_seed": NATIVE["seed"], "hr_prompt": "a castle", "hr_negative_prompt": "fog"})
    assert np.array_equal(pixels, native)


def test_the_first_ksamplers_pictures_are_saved_as_comfyuis_two_pass_example_saves_them(server):
    """ComfyUI's 2-pass example saves the first KSampler's pictures too ("Save Intermediate Image": VAEDecode of
    node 3 -> SaveImage 13, here also a PreviewImage 15): ComfyUI runs every output node. Both outputs are in the
    history by node id, node 13's of type output and 15's of type temp, each the native txt2img job of the first
    KSampler's settings pixel for pixel (a batch of 2), node 9's the native hires job's; /view serves them; the
    intermediate decoder and outputs execute once the first KSampler ends, before the upscale."""
    prompt = two_pass(dict(BY), **SECOND)
    prompt["5"]["inputs"]["batch_size"] = 2
    prompt["12"] = {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}}
    prompt["13"] = {"class_type": "SaveImage", "inputs": {"images": ["12", 0], "filename_prefix": "intermediate"}}
    prompt["15"] = {"class_type": "PreviewImage", "inputs": {"images": ["12", 0]}}
    messages, entry = drawn(server, prompt)
    executing = [data["node"] for kind, data in messages if kind == "executing"]
    assert executing == ["4", "6", "7", "5", "3", "12", "13", "15", "10", "11", "8", "9", None]
    assert [data["node"] for kind, data in messages if kind == "executed"] == ["13", "15", "9"]
    assert sorted(entry["outputs"]) == ["13", "15", "9"]
    first = native_batch(server, {**NATIVE, "batch_size": 2, "batch_noise": "comfyui"})
    final = native_batch(server, {**NATIVE, **NATIVE_HIRES, "batch_size": 2, "batch_noise": "comfyui"})
    for node, kind, expected in (("13", "output", first), ("15", "temp", first), ("9", "output", final)):
        images = entry["outputs"][node]["images"]
        assert [image["type"] for image in images] == [kind, kind]
        for image, pixels in zip(images, expected):
            assert np.array_equal(viewed(server, image), pixels), node
    assert first[0].shape == (64, 64, 3) and final[0].shape == (96, 96, 3)
    png = server.get("/view", params=entry["outputs"]["13"]["images"][0]).content
    assert "Seed: 8566257" in Image.open(io.BytesIO(png)).info["parameters"]


def test_object_info_lists_the_upscale_nodes_as_comfyui(server):
    info = server.get("/object_info/LatentUpscaleBy").json()["LatentUpscaleBy"]
    assert info["input"]["required"]["upscale_method"] == [["nearest-exact", "bilinear", "area", "bicubic",
                                                            "bislerp"]]
    assert info["input"]["required"]["scale_by"][1] == {"default": 1.5, "min": 0.01, "max": 8.0, "step": 0.01}
    assert info["output"] == ["LATENT"] and info["display_name"] == "Upscale Latent By"
    info = server.get("/object_info/LatentUpscale").json()["LatentUpscale"]
    assert info["input"]["required"]["crop"] == [["disabled", "center"]]
    assert info["input"]["required"]["width"][1] == {"default": 512, "min": 0, "max": 16384, "step": 8}


@pytest.mark.parametrize("change, node, words", [
    (lambda p: p["10"]["inputs"].update(scale_by=0.5), "10", "at least 1"),
    (lambda p: p["11"]["inputs"].update(denoise=0), "11", "denoise above 0"),
    (lambda p: p.update({"10": {"class_type": "LatentUpscale", "inputs": {
        "samples": ["3", 0], "upscale_method": "area", "width": 0, "height": 0, "crop": "disabled"}}}),
     "10", "above 0"),
    (lambda p: p["10"]["inputs"].update(samples=["5", 0]), "10", "latent of a KSampler"),
    (lambda p: p["11"]["inputs"].update(model=["14", 0]) or p.update({"14": {
        "class_type": "LoraLoader", "inputs": {"model": ["4", 0], "clip": ["4", 1], "lora_name": "style.safetensors",
                                               "strength_model": 1.0, "strength_clip": 1.0}}}), "11", "one model"),
    # the first KSampler's pictures decoded by another VAE than the second's: sdlab decodes both with one
    (lambda p: p.update({"12": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["14", 0]}},
                         "13": {"class_type": "SaveImage", "inputs": {"images": ["12", 0], "filename_prefix": "x"}},
                         "14": {"class_type": "VAELoader", "inputs": {"vae_name": "other.safetensors"}}}),
     "12", "with one VAE"),
])
def test_two_pass_graphs_sdlab_does_not_draw_are_refused(server, change, node, words):
    prompt = two_pass(dict(BY), **SECOND)
    change(prompt)
    answer = server.post("/prompt", json={"prompt": prompt})
    assert answer.status_code == 400, answer.text
    errors = answer.json()["node_errors"]
    assert list(errors) == [node] and words in errors[node]["errors"][0]["message"], errors


def test_a_bad_upscale_method_is_comfyuis_value_not_in_list(server):
    prompt = two_pass(dict(BY, upscale_method="lanczos"), **SECOND)
    errors = server.post("/prompt", json={"prompt": copy.deepcopy(prompt)}).json()["node_errors"]
    assert errors["10"]["errors"][0]["type"] == "value_not_in_list"


def test_an_upscale_to_part_of_an_8_px_side_is_refused_at_submit(server):
    """The server's tiny model's VAE of factor 2: LatentUpscaleBy x1.37 of 72 x 40 px is 49 x 27 latent cells, 98 x 54
    px, no side a multiple of 8 px: refused when queued (the native job 400, the graph's node_errors naming the upscale node), not a
    failed job."""
    body = {**NATIVE, **NATIVE_HIRES, "width": 72, "height": 40, "hr_scale": 1.37}
    answer = server.post("/api/jobs", json=body)
    assert answer.status_code == 400 and "would draw 98x54 px from 72x40" in answer.text, answer.text
    prompt = two_pass(dict(BY, scale_by=1.37), **SECOND)
    prompt["5"]["inputs"].update(width=72, height=40)
    answer = server.post("/prompt", json={"prompt": prompt})
    assert answer.status_code == 400, answer.text
    errors = answer.json()["node_errors"]
    assert list(errors) == ["10"] and "would draw 98x54 px" in errors["10"]["errors"][0]["message"], errors


@pytest.mark.parametrize("refused, message, named", [
    (HIRES_SIZE, "the hires pass's size is refused", True),
    (None, "a refusal that says it would draw 98x54 px", False),
])
def test_the_upscale_node_is_named_by_the_refusals_field_not_its_text(server, monkeypatch, refused, message, named):
    """The queued job's refusal names the upscale node where its `refused` field is the hires size (request.py's
    HIRES_SIZE), whatever its text says; any other refusal is ComfyUI's invalid_prompt without node_errors."""
    from sdlab.server import comfy_api

    def refuse(state, plan, place, *lists):           # _submit's first_pass / upscale_failed lists
        raise BadRequest(message, 400, refused=refused)

    monkeypatch.setattr(comfy_api, "_submit", refuse)
    answer = server.post("/prompt", json={"prompt": two_pass(dict(BY), **SECOND)})
    assert answer.status_code == 400, answer.text
    body = answer.json()
    assert (list(body["node_errors"]) == ["10"]) == named, body
    assert (body["error"]["type"] == "invalid_prompt") != named and message in answer.text, body


def test_forges_hr_cfg_is_the_a1111_doors_hires_cfg_scale(server):
    """/sdapi/v1/txt2img takes Forge's `hr_cfg` (modules/processing.py StableDiffusionProcessingTxt2Img.hr_cfg,
    lllyasviel/stable-diffusion-webui-forge 70d6e10) as the second pass's CFG scale: hr_cfg 20 draws another picture,
    recorded as Forge's `Hires CFG Scale: 20`; hr_cfg equal to cfg_scale draws what no hr_cfg (A1111's) draws."""
    import base64
    import json

    body = dict(prompt="a cat", negative_prompt="bad hands, blurry", steps=2, width=64, height=64, seed=3, cfg_scale=7,
                enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", sampler_name="Euler", denoising_strength=0.5)

    def a1111(**more) -> tuple[np.ndarray, str]:
        answer = server.post("/sdapi/v1/txt2img", json={**body, **more})
        assert answer.status_code == 200, answer.text
        picture = Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0]))).convert("RGB")
        return np.asarray(picture, dtype=int), json.loads(answer.json()["info"])["infotexts"][0]

    plain, plain_text = a1111()
    own, text = a1111(hr_cfg=20.0)
    assert "Hires CFG Scale: 20" in text and "Hires CFG Scale" not in plain_text
    assert not np.array_equal(own, plain)        # the tiny random model's CFG moves few pixels, by 1-2 levels
    assert np.array_equal(a1111(hr_cfg=7.0)[0], plain)


def from_picture(prompt: dict, denoise: float, masked: bool = False) -> dict:
    """`prompt` with its first KSampler (node 3) started from LoadImage "start-2pass.png" -> VAEEncode at `denoise`
    (through a SetLatentNoiseMask of the picture's MASK where `masked`) instead of the EmptyLatentImage."""
    prompt = copy.deepcopy(prompt)
    prompt["3"]["inputs"].update(denoise=denoise, latent_image=["20", 0])
    prompt["20"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["21", 0], "vae": ["4", 2]}}
    prompt["21"] = {"class_type": "LoadImage", "inputs": {"image": "start-2pass.png"}}
    if masked:
        prompt["22"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["20", 0], "mask": ["21", 1]}}
        prompt["3"]["inputs"]["latent_image"] = ["22", 0]
    del prompt["5"]
    return prompt


def test_a_two_pass_graph_from_a_vae_encode_draws_the_native_img2img_hires_job(server):
    """LoadImage -> VAEEncode -> KSampler at denoise 0.7 -> LatentUpscaleBy -> KSampler: the native img2img job at
    strength 0.7 with the hires fields (hr_convention comfyui), pixel for pixel; ComfyUI's messages: the first
    KSampler's 3 steps (its denoise rule runs them all), the second's 2. The latents are ComfyUI's two KSamplers'
    (tests/test_comfyui_two_pass.py)."""
    import base64

    from server_fixtures import b64_png
    from test_server_comfy_api import upload

    picture = Image.fromarray(np.random.default_rng(5).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    upload(server, "start-2pass.png", picture)
    messages, entry = drawn(server, from_picture(two_pass(dict(BY), **SECOND), 0.7))
    executing = [data["node"] for kind, data in messages if kind == "executing"]
    assert executing == ["4", "6", "7", "21", "20", "3", "10", "11", "8", "9", None]
    assert [(d["value"], d["max"], d["node"]) for k, d in messages if k == "progress"] == [
        (1, 3, "3"), (2, 3, "3"), (3, 3, "3"), (1, 2, "11"), (2, 2, "11")]
    pixels = viewed(server, entry["outputs"]["9"]["images"][0])
    assert pixels.shape == (96, 96, 3)
    body = {**NATIVE, **NATIVE_HIRES, "mode": "img2img", "init_image": b64_png(picture), "strength": 0.7}
    assert np.array_equal(pixels, native_pixels(server, body))
    assert np.abs(pixels - native_pixels(server, {**NATIVE, **NATIVE_HIRES})).max() > 10    # not txt2img's
    png = server.get("/view", params=entry["outputs"]["9"]["images"][0]).content
    text = Image.open(io.BytesIO(png)).info["parameters"]
    assert "Hires convention: comfyui" in text and "Denoising strength: 0.7," in text
    assert "Hires denoising strength: 0.5," in text
    read = server.post("/api/parameters", json={"image": base64.b64encode(png).decode()})     # Reuse, --from-png
    assert read.status_code == 200, read.text
    settings = read.json()["settings"]
    assert (settings["strength"], settings["hr_denoise"], settings["hr_convention"]) == (0.7, 0.5, "comfyui")
    assert np.array_equal(pixels, native_pixels(server, {**settings, "mode": "img2img", "init_image": b64_png(picture)}))


def test_a_two_pass_graph_from_a_noise_mask_is_one_node_error(server):
    """ComfyUI's latent carries a SetLatentNoiseMask's mask on through LatentUpscale to the second KSampler, which
    sdlab does not draw: one node error on the second KSampler, nothing queued."""
    from test_server_comfy_api import upload_holed

    upload_holed(server, "start-2pass.png", 4)
    answer = server.post("/prompt", json={"prompt": from_picture(two_pass(dict(BY), **SECOND), 0.7, masked=True)})
    assert answer.status_code == 400, answer.text
    errors = answer.json()["node_errors"]
    assert list(errors) == ["11"] and "without a noise mask" in errors["11"]["errors"][0]["message"], errors
    assert server.get("/queue").json() == {"queue_running": [], "queue_pending": []}
