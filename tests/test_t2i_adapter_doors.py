"""A T2I-Adapter through every door that takes a ControlNet file: the CLI's --control (its infotext line as A1111's
ControlNet extension writes it, and --from-png drawing the picture again), the A1111 API's ControlNet unit naming
it (`model: t2iadapter_canny_sd15v2`), /controlnet/model_list and /controlnet/control_types listing it, and the
native API's controls. Parity with diffusers is tests/test_t2i_adapter.py's."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw

from bundle_fixtures import tiny_bundle, write_original
from cli_helpers import pixels, run
from server_fixtures import cli_txt2img, png_picture, start_server
from t2i_adapter_fixtures import diffusers_adapter, write_adapter
from sdlab.checkpoints.controlnet import legacy_hash
from sdlab.pipeline.png_info import parse_parameters, read_parameters

NAME = "t2iadapter_canny_sd15v2"
FAST = ["--steps", "3", "--width", "32", "--height", "32", "--no-progress", "--seed", "3"]
GEN = {"prompt": "a red apple", "steps": 3, "seed": 11, "width": 64, "height": 64, "cfg_scale": 5}


def _hint(path: Path, size: int) -> Path:
    image = Image.new("RGB", (size, size), "black")
    ImageDraw.Draw(image).rectangle([size // 5, size // 5, size * 4 // 5, size * 4 // 5], outline="white", width=3)
    image.save(path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("t2ia-cli")
    model = write_original(tiny_bundle("sd1"), folder / "tiny-sd1.safetensors", junk=False)
    adapter = write_adapter(diffusers_adapter("full_adapter", (32, 64), 2, std=0.2), "original-pth", folder, NAME)
    return {"model": model, "adapter": adapter, "hint": _hint(folder / "hint.png", 32)}


def test_cli_control_takes_an_adapter_and_records_it_as_the_extension(files, tmp_path, capsys):
    plain, drawn, again = tmp_path / "plain.png", tmp_path / "drawn.png", tmp_path / "again.png"
    base = ["txt2img", "a red apple", "--model", str(files["model"]), *FAST]
    assert run([*base, "--out", str(plain)], capsys)[0] == 0
    spec = f"{files['adapter']}:{files['hint']}:0.9:0:0.6"
    code, _, stderr = run([*base, "--control", spec, "--out", str(drawn)], capsys)
    assert code == 0, stderr
    assert np.abs(pixels(plain) - pixels(drawn)).max() > 10
    line = parse_parameters(read_parameters(drawn))["ControlNet 0"]
    assert line == (f"Module: none, Model: {NAME} [{legacy_hash(files['adapter'])}], Weight: 0.9, Resize Mode: "
                    "Just Resize, Guidance Start: 0, Guidance End: 0.6")
    code, _, stderr = run(["txt2img", "--model", str(files["model"]), "--no-progress", "--from-png", str(drawn),
                           "--control", f"{files['adapter']}:{files['hint']}", "--out", str(again)], capsys)
    assert code == 0, stderr
    assert np.array_equal(pixels(drawn), pixels(again))
    assert read_parameters(drawn) == read_parameters(again)


def test_cli_refuses_an_adapter_of_another_family_in_one_line(files, tmp_path, capsys):
    xl = write_original(tiny_bundle("sdxl"), tmp_path / "tiny-xl.safetensors", junk=False)
    out = tmp_path / "x.png"
    code, _, stderr = run(["txt2img", "a red apple", "--model", str(xl), *FAST, "--control",
                           f"{files['adapter']}:{files['hint']}", "--out", str(out)], capsys)
    assert code != 0 and not out.exists()
    errors = [line for line in stderr.splitlines() if not line.startswith("WARNING")]
    assert len(errors) == 1 and "this T2I-Adapter gives features" in errors[0] and "Traceback" not in stderr, stderr


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    import sdlab

    root = tmp_path_factory.mktemp("t2ia-server")
    models = root / "models"
    bundle = sdlab.load().bundle          # the shipped model: VAE factor 4, widths 64, 128, 128
    unet = bundle.unet_config
    channels = tuple(unet.model_channels * m for m in unet.channel_mult)
    adapter = write_adapter(diffusers_adapter("full_adapter", channels, bundle.vae_config.downsample_factor, std=0.2),
                            "original", models / "ControlNet", NAME)
    process = start_server(root / "outputs", "--models-dir", str(models))
    yield {"server": process, "adapter": adapter, "hint": _hint(root / "hint.png", 64)}
    process.stop()


def _same(a: Image.Image, b: Image.Image) -> None:
    assert (np.asarray(a.convert("RGB")) == np.asarray(b.convert("RGB"))).all()
    assert a.info["parameters"] == b.info["parameters"]


def test_a1111_unit_and_native_control_name_an_adapter(server, tmp_path):
    url = server["server"].url
    title = f"{NAME} [{legacy_hash(server['adapter'])}]"
    assert httpx.get(url + "/controlnet/model_list", timeout=30).json()["model_list"] == [title]
    types = httpx.get(url + "/controlnet/control_types", timeout=30).json()["control_types"]
    assert title in types["T2I-Adapter"]["model_list"]
    hint = base64.b64encode(server["hint"].read_bytes()).decode("ascii")
    unit = {"enabled": True, "model": NAME, "image": hint, "weight": 0.8, "guidance_end": 0.7, "module": "none",
            "control_mode": "My prompt is more important"}
    response = httpx.post(url + "/sdapi/v1/txt2img", timeout=300, json={
        **GEN, "sampler_name": "Euler", "scheduler": "sgm_uniform",
        "alwayson_scripts": {"controlnet": {"args": [unit]}}})
    assert response.status_code == 200, response.text
    served = png_picture(base64.b64decode(response.json()["images"][0]))
    line = parse_parameters(served.info["parameters"])["ControlNet 0"]
    assert line.startswith(f"Module: none, Model: {title}, Weight: 0.8, Resize Mode: Crop and Resize")
    assert "Control Mode: My prompt is more important" in line
    (tmp_path / "served.png").write_bytes(base64.b64decode(response.json()["images"][0]))
    spec = f"{server['adapter']}:{server['hint']}"
    _same(served, cli_txt2img(tmp_path, "--from-png", str(tmp_path / "served.png"), "--control", spec))
    plain = cli_txt2img(tmp_path, "--from-png", str(tmp_path / "served.png"))
    assert np.abs(np.asarray(plain, dtype=int) - np.asarray(served, dtype=int)).max() > 10   # the adapter drew

    with httpx.Client(base_url=url, timeout=300) as client:          # the native API, model by stem
        job_id = client.post("/api/jobs", json={**GEN, "sampler": "Euler", "controls": [
            {"model": NAME, "image": hint, "strength": 0.8, "end": 0.7}]}).json()["id"]
        deadline = time.monotonic() + 300
        while (job := client.get(f"/api/jobs/{job_id}").json())["status"] in ("queued", "running"):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert job["status"] == "done", job
        native = png_picture(client.get(job["images"][0]).content)
    cli = cli_txt2img(tmp_path, GEN["prompt"], "--steps", "3", "--seed", "11", "--width", "64", "--height", "64", "--cfg",
               "5", "--sampler", "Euler", "--control", f"{spec}:0.8:0:0.7")
    _same(native, cli)
