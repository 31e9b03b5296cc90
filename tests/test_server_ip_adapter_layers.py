"""The native API's `ip_adapters[].layer_scales` (InstantStyle's per-layer scales): the picture equals
`sdlab txt2img --ip-adapter-scale LAYERS`, the job records the compact text, POST /api/parameters reads a picture's
Layers back, and bad layer scales are 4xx as the job is posted."""

from __future__ import annotations

import httpx
import numpy as np

from ip_adapter_fixtures import ADAPTER_JOB, adapter_server, cli_adapter_picture  # noqa: F401  (a module fixture)
from server_fixtures import drawn_picture, file_b64

LAYERS = "mid=1 up.block_1=0/1"           # the shipped model: up_blocks.1 has 2 transformers, as every up block
EACH_UP_BLOCK = "up.block_0=0/1 up.block_1=0/1 up.block_2=0/1"      # the shipped model's up blocks, each [0, 1]


def test_native_layer_scales_equal_the_cli_and_are_recorded_and_read_back(adapter_server, tmp_path):  # noqa: F811
    cli = cli_adapter_picture(adapter_server, tmp_path, LAYERS)
    entry = {"model": "ip-adapter_tiny", "image": file_b64(adapter_server["picture"])}
    with httpx.Client(base_url=adapter_server["server"].url, timeout=300) as client:
        job, served = drawn_picture(client, {**ADAPTER_JOB, "ip_adapters": [{**entry, "layer_scales": LAYERS}]})
        _, as_dict = drawn_picture(client, {**ADAPTER_JOB, "ip_adapters": [
            {**entry, "layer_scales": {"up": {"block_1": [0, 1]}, "mid": 1}}]})
        _, whole = drawn_picture(client, {**ADAPTER_JOB, "ip_adapters": [entry]})
        read = client.post("/api/parameters", json={"image": file_b64(tmp_path / "cli.png")})   # the same parameters
    assert job["request"]["ip_adapters"] == [{"model": "ip-adapter_tiny.safetensors", "scale": 1.0,
                                              "layer_scales": LAYERS}]
    pictures = [np.asarray(p.convert("RGB"), dtype=np.int16) for p in (served, cli, as_dict, whole)]
    assert (pictures[0] == pictures[1]).all() and (pictures[0] == pictures[2]).all()
    assert np.abs(pictures[0] - pictures[3]).max() > 10
    assert served.info["parameters"] == cli.info["parameters"]
    assert f"Weight: 1, Layers: {LAYERS}" in served.info["parameters"]
    assert read.status_code == 200, read.text
    assert [{k: v for k, v in a.items() if k != "model"} for a in read.json()["settings"]["ip_adapters"]] == [
        {"scale": 1.0, "layer_scales": LAYERS}]


def test_bad_layer_scales_are_refused_as_the_job_is_posted(adapter_server):  # noqa: F811
    entry = {"model": "ip-adapter_tiny", "image": file_b64(adapter_server["picture"])}
    for layers, status, message in [
            ("style", 400, "IP-Adapter 0: layer scales: up.block_0 takes 2 numbers (one per transformer) or 1, got 3"),
            ("down.block_7=1", 400, "down.block_7, which has no transformer in this model"),
            ({"middle": 1}, 422, "unknown part 'middle'"),
            ("up=1/x", 422, "'up=1/x' is not part=NUMBERS"),
            ({"down": {"block_01": 1}}, 422, "IP-Adapter 0: layer scales: down.block_01 is not a block name"),
            ("down.block_01=1", 422, "down.block_01 is not a block name"),
            ("up=0/1/0", 400, "layer scales: up (for each of its blocks) takes 2 numbers (one per transformer) or 1"),
            (["up"], 422, "layer_scales")]:
        response = httpx.post(adapter_server["server"].url + "/api/jobs", timeout=60,
                              json={**ADAPTER_JOB, "ip_adapters": [{**entry, "layer_scales": layers}]})
        assert response.status_code == status and message in response.text, (layers, response.text)


def test_a_part_given_no_blocks_is_recorded_so_the_job_and_the_picture_draw_again(adapter_server):  # noqa: F811
    """{"down": {}}: every down block at 0, as "down=0"; the job records that text (not ""), so its request and the
    picture's parameters post again and draw the same picture; {"up": [0, 1]} (each up block [0, 1]) draws as the
    blocks named one by one."""
    entry = {"model": "ip-adapter_tiny", "image": file_b64(adapter_server["picture"])}
    with httpx.Client(base_url=adapter_server["server"].url, timeout=300) as client:
        job, drawn = drawn_picture(client, {**ADAPTER_JOB, "ip_adapters": [{**entry, "layer_scales": {"down": {}}}]})
        recorded = job["request"]["ip_adapters"][0]["layer_scales"]
        _, again = drawn_picture(client, {**ADAPTER_JOB, "ip_adapters": [{**entry, "layer_scales": recorded}]})
        read = client.post("/api/parameters", json={"image": file_b64_bytes(client.get(job["images"][0]).content)})
        assert read.status_code == 200, read.text
        from_picture = read.json()["settings"]["ip_adapters"][0]["layer_scales"]
        _, each = drawn_picture(client, {**ADAPTER_JOB, "ip_adapters": [{**entry, "layer_scales": {"up": [0, 1]}}]})
        _, named = drawn_picture(client, {**ADAPTER_JOB, "ip_adapters": [{**entry, "layer_scales": EACH_UP_BLOCK}]})
    assert recorded == from_picture == "down=0"
    assert "Layers: down=0" in drawn.info["parameters"]
    pictures = [np.asarray(p.convert("RGB"), dtype=np.int16) for p in (drawn, again, each, named)]
    assert (pictures[0] == pictures[1]).all() and (pictures[2] == pictures[3]).all()


def file_b64_bytes(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()
