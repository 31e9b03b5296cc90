"""`sdlab serve`'s hires fix with an upscaler model of `--upscalers-dir`, named as `/sdapi/v1/upscalers` lists
it (A1111's `hr_upscaler`): both APIs draw what `sdlab txt2img --hr-upscaler FILE` draws, the pictures and
the job name the model (never its path); a path, an unknown name or a listed file that is gone is a 400
and a file that cannot be loaded fails the job, without the server's paths. Extras' upscale
(`/sdapi/v1/extra-single-image`) refuses a listed file that is gone or cannot be loaded alike."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.upscaler import load_upscaler
from sdlab.pipeline.request import GenerationRequest, RequestError
from sdlab.server.model_folders import UPSCALER_SUFFIXES, ModelFolder
from sdlab.server.worker import HiresUpscaler, _run_with_upscaler
from server_fixtures import b64_png, png_picture, run_job, server_env, start_server
from test_upscale_models import new_arch_state

PROMPT = "a hires red apple"
NATIVE = {"prompt": PROMPT, "steps": 3, "seed": 11, "width": 64, "height": 64, "cfg_scale": 5, "sampler": "Euler",
          "hr_scale": 2, "hr_steps": 2, "hr_denoise": 0.6}
A1111 = {"prompt": PROMPT, "steps": 3, "seed": 11, "width": 64, "height": 64, "cfg_scale": 5, "sampler_name": "Euler",
         "scheduler": "sgm_uniform",            # the CLI's default here (A1111's Automatic for Euler: uniform)
         "enable_hr": True, "hr_scale": 2, "hr_second_pass_steps": 2, "denoising_strength": 0.6}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("server-hires-upscaler")
    upscalers = root / "upscalers"
    (upscalers / "sub").mkdir(parents=True)
    save_file(new_arch_state(2), str(upscalers / "sub" / "tinyx2.safetensors"))
    (upscalers / "broken.pth").write_bytes(b"not a pickle")
    save_file(new_arch_state(2), str(upscalers / "removed.safetensors"))
    server = start_server(root / "outputs", "--upscalers-dir", str(upscalers))
    (upscalers / "removed.safetensors").unlink()                # listed at start, gone when a job runs
    server.upscaler = upscalers / "sub" / "tinyx2.safetensors"
    yield server
    server.stop()


def cli_txt2img(tmp_path: Path, upscaler: Path) -> Image.Image:
    out = tmp_path / "cli.png"
    result = subprocess.run([sys.executable, "-m", "sdlab", "txt2img", PROMPT, "--steps", "3", "--seed", "11",
                             "--width", "64", "--height", "64", "--cfg", "5", "--sampler", "Euler", "--hr-scale", "2",
                             "--hr-steps", "2", "--hr-denoise", "0.6", "--hr-upscaler", str(upscaler),
                             "--out", str(out), "--no-progress"],
                            capture_output=True, text=True, env=server_env(), timeout=300)
    assert result.returncode == 0, result.stderr
    return png_picture(out.read_bytes())


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def test_both_apis_draw_the_hires_fix_with_a_listed_upscaler_model_as_the_cli(server, tmp_path):
    names = [row["name"] for row in httpx.get(server.url + "/sdapi/v1/upscalers", timeout=30).json()]
    assert names == ["None", "Lanczos", "Nearest", "broken", "removed", "tinyx2"]
    cli = cli_txt2img(tmp_path, server.upscaler)
    assert cli.size == (128, 128) and "Hires upscaler: tinyx2" in cli.info["parameters"]

    with httpx.Client(base_url=server.url, timeout=300) as client:
        job = run_job(client, {**NATIVE, "hr_upscaler": "tinyx2"}, timeout_s=300)
        assert job["status"] == "done", job
        assert job["request"]["hr_upscaler"] == "tinyx2"
        native = png_picture(client.get(job["images"][0]).content)
        assert (_pixels(native) == _pixels(cli)).all()
        assert native.info["parameters"] == cli.info["parameters"]
        lanczos = run_job(client, {**NATIVE, "hr_upscaler": "Lanczos"}, timeout_s=300)
        assert not (_pixels(png_picture(client.get(lanczos["images"][0]).content)) == _pixels(cli)).all()

    response = httpx.post(server.url + "/sdapi/v1/txt2img", timeout=300, json={**A1111, "hr_upscaler": "tinyx2"})
    assert response.status_code == 200, response.text
    served = png_picture(base64.b64decode(response.json()["images"][0]))
    assert (_pixels(served) == _pixels(cli)).all()
    infotext = response.json()["info"]
    assert "Hires upscaler: tinyx2" in served.info["parameters"] and "Hires upscaler: tinyx2" in infotext
    assert str(server.upscaler.parent) not in infotext


@pytest.mark.parametrize("api", ["native", "a1111"])
def test_a_path_or_an_unknown_upscaler_is_refused_listing_the_models(server, api):
    for name in (str(server.upscaler), "sub/tinyx2.safetensors", "../upscalers/sub/tinyx2", "tinyx4"):
        if api == "native":
            response = httpx.post(server.url + "/api/jobs", timeout=60, json={**NATIVE, "hr_upscaler": name})
            message = response.json()["detail"]
        else:
            response = httpx.post(server.url + "/sdapi/v1/txt2img", timeout=60, json={**A1111, "hr_upscaler": name})
            message = response.json()["errors"]
        assert response.status_code == 400, (name, response.text)
        assert f"unknown hires upscaler {name!r}" in message
        assert message.endswith("Latent (nearest-exact), None, Lanczos, Nearest, broken, removed, tinyx2")


def test_an_upscaler_model_that_cannot_be_loaded_or_is_gone_is_refused_without_the_servers_path(server):
    with httpx.Client(base_url=server.url, timeout=300) as client:
        broken = run_job(client, {**NATIVE, "hr_upscaler": "broken"}, timeout_s=300)
        removed = client.post("/api/jobs", json={**NATIVE, "hr_upscaler": "removed"})
    assert broken["status"] == "failed"
    assert broken["error"].startswith("the hires upscaler 'broken' cannot be loaded: ")
    assert str(server.upscaler.parents[1]) not in broken["error"], broken["error"]
    assert removed.status_code == 400
    assert removed.json()["detail"] == "the hires upscaler 'removed' is no longer in the upscalers folder"


def test_extras_refuses_a_listed_upscaler_that_cannot_be_loaded_or_is_gone_without_the_servers_path(server):
    image = b64_png(Image.new("RGB", (16, 16), (200, 40, 40)))
    answers = {name: httpx.post(server.url + "/sdapi/v1/extra-single-image", timeout=120,
                                json={"image": image, "upscaler_1": name, "upscaling_resize": 2})
               for name in ("broken", "removed")}
    assert all(answer.status_code == 400 for answer in answers.values()), answers
    broken, removed = (answers[name].json()["errors"] for name in ("broken", "removed"))
    assert broken.startswith("the upscaler 'broken' cannot be loaded: ") and str(server.upscaler.parents[1]) not in broken
    assert removed == "the upscaler 'removed' is no longer in the upscalers folder"


def test_a_model_file_error_of_the_run_itself_is_not_blamed_on_the_hires_upscaler(tmp_path):
    save_file(new_arch_state(2), str(tmp_path / "tinyx2.safetensors"))
    folder = ModelFolder(tmp_path, UPSCALER_SUFFIXES, hashed=False)
    upscaler = HiresUpscaler(folder.find("tinyx2"), load_upscaler(tmp_path / "tinyx2.safetensors"))

    class FailingPipe:                  # a file the run reads past the upscaler (a prompt's LoRA, say) is broken
        def run(self, request, progress=None, stop=None, upscaler=None, first_pass=None):
            raise CheckpointError("other.safetensors: not a checkpoint")

    request = GenerationRequest(prompt=PROMPT, hr_scale=2, hr_upscaler="tinyx2")
    with pytest.raises(CheckpointError, match="other.safetensors"):
        _run_with_upscaler(FailingPipe(), request, upscaler, progress=lambda info: None)


@pytest.mark.usefixtures("one_thread")
def test_the_esrgan_tile_options_set_the_hires_upscalers_tiles(tmp_path, monkeypatch):
    """A1111's ESRGAN upscalers read `opts.ESRGAN_tile` / `ESRGAN_tile_overlap` at every use (`upscale_with_model(...,
    tile_size=opts.ESRGAN_tile, tile_overlap=opts.ESRGAN_tile_overlap)`), so the hires fix's upscale runs in the
    options' tiles, a request's `override_settings` first; unset, sdlab's 192 / 32. Before: always 192 / 32."""
    import sdlab
    from sdlab.pipeline import upscale
    from sdlab.server.a1111 import Txt2ImgIn, _request

    save_file(new_arch_state(2), str(tmp_path / "tinyx2.safetensors"))
    folder = ModelFolder(tmp_path, UPSCALER_SUFFIXES, hashed=False)
    upscaler = HiresUpscaler(folder.find("tinyx2"), load_upscaler(tmp_path / "tinyx2.safetensors"))
    pipe = sdlab.load()
    tiles, run_upscaler = [], upscale.run_upscaler
    monkeypatch.setattr(upscale, "run_upscaler", lambda net, image, **given: tiles.append(given) or
                        run_upscaler(net, image, **given))
    tile_options = {"ESRGAN_tile": 48, "ESRGAN_tile_overlap": 8}
    for options, overrides, used in ((None, {}, (192, 32)), (tile_options, {}, (48, 8)),
                                     (tile_options, {"ESRGAN_tile": 0, "ESRGAN_tile_overlap": 0}, (0, 0))):
        tiles.clear()
        body = Txt2ImgIn(**{**A1111, "steps": 1, "hr_second_pass_steps": 1, "hr_upscaler": "tinyx2",
                            "override_settings": overrides})
        result = _run_with_upscaler(pipe, _request(body, options=options), upscaler, progress=lambda info: None)
        assert result.images[0].size == (128, 128)
        assert tiles == [{"tile": used[0], "overlap": used[1]}], (options, overrides)
    with pytest.raises(RequestError, match="hr_upscaler_tile must be an integer >= 0, got -1"):
        pipe.resolve(GenerationRequest(prompt=PROMPT, hr_scale=2, hr_upscaler="Lanczos", hr_upscaler_tile=-1))


def test_the_upscalers_list_gives_each_files_network_scale(tmp_path):
    """`/sdapi/v1/upscalers` gives a model file the scale of the network it holds (A1111's `upscaler.scale`: its
    R-ESRGAN 2x+ lists 2), read from its names and shapes as the upscaler loader reads them; none for a file that
    is not an upscaler, and A1111's default 4 for the plain resizes."""
    from types import SimpleNamespace

    from sdlab.server.a1111 import upscalers
    from test_upscale_models import old_arch_state

    for scale in (1, 2, 4):
        save_file(new_arch_state(scale), str(tmp_path / f"RealESRGAN_x{scale}plus.safetensors"))
    torch.save(old_arch_state(4), tmp_path / "ESRGAN_4x.pth")
    (tmp_path / "broken.pth").write_bytes(b"not a pickle")
    service = SimpleNamespace(upscalers=ModelFolder(tmp_path, UPSCALER_SUFFIXES, hashed=False))
    rows = upscalers(SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(service=service))))
    assert {row["name"]: row["scale"] for row in rows} == {
        "None": 4, "Lanczos": 4, "Nearest": 4, "ESRGAN_4x": 4, "broken": None,
        "R-ESRGAN 2x+": 2, "R-ESRGAN 4x+": 4, "RealESRGAN_x1plus": 1}
