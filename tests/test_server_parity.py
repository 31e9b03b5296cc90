"""The server draws what `sdlab txt2img` draws: the same pixels and the same parameters text for the same
settings, through the native jobs API and through A1111's `/sdapi/v1/txt2img`."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
import time

import httpx
import numpy as np
from PIL import Image

from server_fixtures import sdlab_server, server_env  # noqa: F401  (fixture)


def _cli(tmp_path, *args: str) -> Image.Image:
    out = tmp_path / "cli.png"
    result = subprocess.run([sys.executable, "-m", "sdlab", "txt2img", *args, "--out", str(out), "--no-progress"],
                            capture_output=True, text=True, env=server_env(), timeout=300)
    assert result.returncode == 0, result.stderr
    image = Image.open(out)
    image.load()
    return image


def _same(a: Image.Image, b: Image.Image) -> None:
    assert a.size == b.size
    assert (np.asarray(a.convert("RGB")) == np.asarray(b.convert("RGB"))).all()
    assert a.info["parameters"] == b.info["parameters"]


def test_native_job_equals_cli(sdlab_server, tmp_path):
    cli = _cli(tmp_path, "a red heart, blue sky", "--negative", "blurry", "--steps", "6", "--seed", "77",
               "--sampler", "Euler a", "--schedule", "exponential", "--cfg", "6.5", "--batch", "1")
    with httpx.Client(base_url=sdlab_server.url, timeout=120) as client:
        job_id = client.post("/api/jobs", json={"prompt": "a red heart, blue sky", "negative_prompt": "blurry",
                                                "steps": 6, "seed": 77, "sampler": "Euler a",
                                                "schedule": "exponential", "cfg_scale": 6.5}).json()["id"]
        deadline = time.monotonic() + 120
        while (job := client.get(f"/api/jobs/{job_id}").json())["status"] in ("queued", "running"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert job["status"] == "done", job
        served = Image.open(io.BytesIO(client.get(job["images"][0]).content))
    _same(served, cli)


def test_a1111_txt2img_equals_cli(sdlab_server, tmp_path):
    cli = _cli(tmp_path, "a green square", "--steps", "5", "--seed", "3", "--sampler", "DPM++ 2M",
               "--schedule", "karras", "--cfg", "5", "--width", "64", "--height", "64")
    response = httpx.post(sdlab_server.url + "/sdapi/v1/txt2img", timeout=120, json={
        "prompt": "a green square", "steps": 5, "seed": 3, "sampler_name": "DPM++ 2M", "scheduler": "Karras",
        "cfg_scale": 5, "width": 64, "height": 64})
    assert response.status_code == 200, response.text
    _same(Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]))), cli)


def test_embeddings_dir_words_and_ti_hashes_equal_cli(tmp_path):
    import torch
    from safetensors.torch import save_file

    from server_fixtures import start_server
    from sdlab.api import shipped_model_path
    from sdlab.checkpoints.load import load_bundle

    width = load_bundle(shipped_model_path()).text_encoders[0].config.width
    folder = tmp_path / "embeddings"
    folder.mkdir()
    vectors = torch.randn(2, width, generator=torch.Generator().manual_seed(3)) * 0.5
    torch.save({"string_to_param": {"*": vectors}, "name": "zqstyle", "step": 500, "sd_checkpoint": "abcd1234",
                "sd_checkpoint_name": "base"}, folder / "zqstyle.pt")
    (folder / "other").mkdir()                                              # made for other models: skipped
    torch.save({"string_to_param": {"*": torch.zeros(3, width + 64)}, "name": "wide", "step": 1500,
                "sd_checkpoint": None, "sd_checkpoint_name": "wider"}, folder / "other" / "wide.pt")
    save_file({"clip_l": torch.zeros(1, width), "clip_g": torch.zeros(1, 128)}, str(folder / "other" / "xl.safetensors"))
    prompt = "a zqstyle star on a black background"
    cli = _cli(tmp_path, prompt, "--steps", "4", "--seed", "9", "--sampler", "DPM++ 2M", "--schedule", "karras",
               "--cfg", "5", "--embeddings-dir", str(folder))
    assert "TI hashes: " in cli.info["parameters"]
    server = start_server(tmp_path / "served", "--embeddings-dir", str(folder))
    try:
        response = httpx.post(server.url + "/sdapi/v1/txt2img", timeout=120,
                              json={"prompt": prompt, "steps": 4, "seed": 9, "sampler_name": "DPM++ 2M",
                                    "scheduler": "Karras", "cfg_scale": 5, "width": 64, "height": 64})
        assert response.status_code == 200, response.text
        _same(Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]))), cli)
        listed = httpx.get(server.url + "/sdapi/v1/embeddings", timeout=30).json()
        assert listed == {   # A1111's get_embeddings: the files' own fields; an SDXL shape is clip_l + clip_g
            "loaded": {"zqstyle": {"step": 500, "sd_checkpoint": "abcd1234", "sd_checkpoint_name": "base",
                                   "shape": width, "vectors": 2}},
            "skipped": {"wide": {"step": 1500, "sd_checkpoint": None, "sd_checkpoint_name": "wider",
                                 "shape": width + 64, "vectors": 3},
                        "xl": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                               "shape": width + 128, "vectors": 1}}}
    finally:
        server.stop()


def _served(server_url: str, body: dict) -> Image.Image:
    with httpx.Client(base_url=server_url, timeout=120) as client:
        created = client.post("/api/jobs", json=body)
        assert created.status_code == 202, created.text
        deadline = time.monotonic() + 120
        while (job := client.get(f"/api/jobs/{created.json()['id']}").json())["status"] in ("queued", "running"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert job["status"] == "done", job
        return Image.open(io.BytesIO(client.get(job["images"][0]).content))


def test_a_prompt_tags_lora_draws_with_its_preset_in_the_cli_the_api_and_the_server(sdlab_server, tmp_path):
    import sdlab
    import torch

    # sdlab-tiny-lcm (beside the shipped model) names the "lcm" preset: a tag adds it as --lora does
    prompt = "a red circle <lora:sdlab-tiny-lcm:0.6>"
    cli = _cli(tmp_path, prompt, "--seed", "7")
    assert "Sampler: LCM" in cli.info["parameters"] and "CFG scale: 1," in cli.info["parameters"]
    _same(_served(sdlab_server.url, {"prompt": prompt, "seed": 7}), cli)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                     # as the CLI and the server here (OMP_NUM_THREADS=1): same sums
    try:
        drawn = sdlab.load().txt2img(prompt, seed=7)
    finally:
        torch.set_num_threads(threads)
    assert (drawn.request.sampler, drawn.request.steps, drawn.request.cfg_scale) == ("LCM", 4, 1.0)
    assert (np.asarray(drawn.images[0]) == np.asarray(cli.convert("RGB"))).all()


def test_a_tags_text_encoder_and_unet_weights_draw_as_in_the_cli(sdlab_server, tmp_path):
    # sdlab-tiny-lcm changes the U-Net alone: its tag's second weight (A1111's unet) decides the picture
    settings = ["--steps", "3", "--seed", "7", "--sampler", "Euler", "--schedule", "sgm_uniform", "--cfg", "5"]
    body = {"steps": 3, "seed": 7, "sampler": "Euler", "schedule": "sgm_uniform", "cfg_scale": 5}
    drawn = {}
    for tag in ("<lora:sdlab-tiny-lcm:0.2:1.5>", "<lora:sdlab-tiny-lcm:te=0.2:unet=1.5>", "<lora:sdlab-tiny-lcm:0.2>"):
        prompt = f"a red circle {tag}"
        drawn[tag] = _served(sdlab_server.url, {"prompt": prompt, **body})
        _same(drawn[tag], _cli(tmp_path, prompt, *settings))
        assert prompt in drawn[tag].info["parameters"]
    pixels = [np.asarray(image.convert("RGB")) for image in drawn.values()]
    assert (pixels[0] == pixels[1]).all() and not (pixels[0] == pixels[2]).all()
