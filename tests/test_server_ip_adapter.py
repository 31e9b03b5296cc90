"""`sdlab serve` with the native API's `ip_adapters`: the picture equals `sdlab txt2img --ip-adapter`, the adapter is
chosen by name from the server's ControlNet folder only (its image encoder in `models/image_encoder`), the job's
record names it, and bad entries are 4xx."""

from __future__ import annotations

import httpx
import numpy as np

from ip_adapter_fixtures import ADAPTER_JOB, adapter_server, cli_adapter_picture  # noqa: F401  (a module fixture)
from server_fixtures import drawn_picture, file_b64


def test_native_ip_adapter_equals_the_cli_and_is_recorded(adapter_server, tmp_path):  # noqa: F811
    cli = cli_adapter_picture(adapter_server, tmp_path, "0.7")
    with httpx.Client(base_url=adapter_server["server"].url, timeout=300) as client:
        _, plain = drawn_picture(client, ADAPTER_JOB)
        job, served = drawn_picture(client, {**ADAPTER_JOB, "ip_adapters": [
            {"model": "ip-adapter_tiny", "image": file_b64(adapter_server["picture"]), "scale": 0.7}]})
    assert job["request"]["ip_adapters"] == [{"model": "ip-adapter_tiny.safetensors", "scale": 0.7}]
    assert (np.asarray(served.convert("RGB")) == np.asarray(cli.convert("RGB"))).all()
    assert served.info["parameters"] == cli.info["parameters"]
    assert 'IP-Adapter 0: "Model: ip-adapter_tiny [' in served.info["parameters"]
    plain = np.asarray(plain.convert("RGB"), dtype=np.int16)
    assert np.abs(plain - np.asarray(served.convert("RGB"), dtype=np.int16)).max() > 10


def test_bad_ip_adapters_are_refused(adapter_server):  # noqa: F811
    entry = {"model": "ip-adapter_tiny", "image": file_b64(adapter_server["picture"])}

    def post(**change):
        return httpx.post(adapter_server["server"].url + "/api/jobs", timeout=60, json={**ADAPTER_JOB, "ip_adapters": [{**entry, **change}]})

    missing = post(model="nope")
    assert missing.status_code == 404 and "nope" in missing.json()["detail"]
    assert post(model=str(adapter_server["adapter"])).status_code == 404             # never a path
    assert post(image="bm90IGFuIGltYWdl").status_code == 400                # base64 of "not an image"
    scale = post(scale=20)
    assert scale.status_code == 422 and "scale must be" in scale.json()["detail"]
    assert post(extra=1).status_code == 422
    lone = post(model="ip-adapter_lone")
    assert lone.status_code == 422 and "no image encoder for the IP-Adapter" in lone.json()["detail"]
