"""`sdlab serve` with the native API's `ip_adapters`: the picture equals `sdlab txt2img --ip-adapter`, the adapter is
chosen by name from the server's ControlNet folder only (its image encoder in `models/image_encoder`), the job's
record names it, and bad entries are 4xx."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from ip_adapter_fixtures import SAMPLE_PICTURE, ip_adapter_state, write_image_encoder, write_ip_adapter
from server_fixtures import file_b64, png_picture, server_env, start_server

GEN = {"prompt": "a red apple", "steps": 3, "seed": 11, "width": 64, "height": 64, "cfg_scale": 5, "sampler": "Euler"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    import sdlab
    from sdlab.models.ip_adapter import cross_attentions

    root = tmp_path_factory.mktemp("server-ip-adapter")
    models = root / "models"
    (models / "ControlNet").mkdir(parents=True)
    bundle = sdlab.load().bundle                    # the shipped model the server draws with
    write_image_encoder(models / "image_encoder", seed=2, projection=32)
    widths = [attn.to_q.weight.shape[0] for attn in cross_attentions(bundle.unet)]
    adapter = write_ip_adapter(models / "ControlNet" / "ip-adapter_tiny.safetensors",
                               ip_adapter_state(widths, bundle.unet_config.context_dim, 32, seed=3, std=0.3))
    (models / "ControlNet" / "lone").mkdir()                # no image_encoder beside it or one folder up
    (models / "ControlNet" / "lone" / "ip-adapter_lone.safetensors").write_bytes(adapter.read_bytes())
    picture = root / "reference.png"
    Image.open(SAMPLE_PICTURE).convert("RGB").crop((0, 0, 200, 160)).save(picture)
    server = start_server(root / "outputs", "--models-dir", str(models))
    yield {"server": server, "adapter": adapter, "picture": picture}
    server.stop()


def test_native_ip_adapter_equals_the_cli_and_is_recorded(setup, tmp_path):
    out = tmp_path / "cli.png"
    result = subprocess.run([sys.executable, "-m", "sdlab", "txt2img", GEN["prompt"], "--steps", "3", "--seed", "11",
                             "--width", "64", "--height", "64", "--cfg", "5", "--sampler", "Euler",
                             "--ip-adapter", str(setup["adapter"]), "--ip-adapter-image", str(setup["picture"]),
                             "--ip-adapter-scale", "0.7", "--out", str(out), "--no-progress"],
                            capture_output=True, text=True, env=server_env(), timeout=300)
    assert result.returncode == 0, result.stderr
    cli = png_picture(out.read_bytes())
    with httpx.Client(base_url=setup["server"].url, timeout=300) as client:
        bodies = {"plain": GEN, "ip": {**GEN, "ip_adapters": [
            {"model": "ip-adapter_tiny", "image": file_b64(setup["picture"]), "scale": 0.7}]}}
        jobs = {}
        for name, body in bodies.items():
            response = client.post("/api/jobs", json=body)
            assert response.status_code == 202, response.text
            deadline = time.monotonic() + 300
            while (job := client.get(f"/api/jobs/{response.json()['id']}").json())["status"] in ("queued", "running"):
                assert time.monotonic() < deadline
                time.sleep(0.1)
            assert job["status"] == "done", job
            jobs[name] = (job, png_picture(client.get(job["images"][0]).content))
    job, served = jobs["ip"]
    assert job["request"]["ip_adapters"] == [{"model": "ip-adapter_tiny.safetensors", "scale": 0.7}]
    assert (np.asarray(served.convert("RGB")) == np.asarray(cli.convert("RGB"))).all()
    assert served.info["parameters"] == cli.info["parameters"]
    assert 'IP-Adapter 0: "Model: ip-adapter_tiny [' in served.info["parameters"]
    plain = np.asarray(jobs["plain"][1].convert("RGB"), dtype=np.int16)
    assert np.abs(plain - np.asarray(served.convert("RGB"), dtype=np.int16)).max() > 10


def test_bad_ip_adapters_are_refused(setup):
    entry = {"model": "ip-adapter_tiny", "image": file_b64(setup["picture"])}

    def post(**change):
        return httpx.post(setup["server"].url + "/api/jobs", timeout=60, json={**GEN, "ip_adapters": [{**entry, **change}]})

    missing = post(model="nope")
    assert missing.status_code == 404 and "nope" in missing.json()["detail"]
    assert post(model=str(setup["adapter"])).status_code == 404             # never a path
    assert post(image="bm90IGFuIGltYWdl").status_code == 400                # base64 of "not an image"
    scale = post(scale=20)
    assert scale.status_code == 422 and "scale must be" in scale.json()["detail"]
    assert post(extra=1).status_code == 422
    lone = post(model="ip-adapter_lone")
    assert lone.status_code == 422 and "no image encoder for the IP-Adapter" in lone.json()["detail"]
