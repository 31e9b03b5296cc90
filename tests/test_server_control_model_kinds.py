"""The server's ControlNet folder holds ControlNets and IP-Adapters (A1111's models/ControlNet): it tells them apart
by their tensors (`model_folders.control_file_kind`). A1111's `/controlnet/model_list` lists both, as the extension
does (its units draw an IP-Adapter under an ip-adapter_* module); the native `/api/control-models` lists each under
the job field that takes it; a model of the other kind is a 422 at submit, not a job that fails when it loads. The
errors a client is shown name the models as it picked them, never the server's paths."""

from __future__ import annotations

import time

import httpx
import pytest
import torch
from safetensors.torch import save_file

from controlnet_fixtures import diffusers_controlnet, write_layout
from ip_adapter_fixtures import SAMPLE_PICTURE, ip_adapter_state, write_image_encoder, write_ip_adapter
from server_fixtures import file_b64, start_server

GEN = {"prompt": "a red apple", "steps": 2, "seed": 11, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    """A server whose ControlNet folder holds tiny_canny, ip-adapter_tiny (its encoder in models/image_encoder),
    ip-adapter_lone (in a subfolder: no encoder beside it) and broken.safetensors (a tensor no loader takes)."""
    import sdlab
    from sdlab.models.ip_adapter import cross_attentions

    root = tmp_path_factory.mktemp("server-control-kinds")
    folder = root / "models" / "ControlNet"
    folder.mkdir(parents=True)
    bundle = sdlab.load().bundle
    widths = (16, 32, 96, 256)[: bundle.vae_config.downsample_factor.bit_length()]
    net = write_layout(diffusers_controlnet(bundle.unet_config, 3, hint_widths=widths, std=0.05), "diffusers-file",
                       folder)
    net.rename(folder / "tiny_canny.safetensors")
    write_image_encoder(root / "models" / "image_encoder", seed=2, projection=32)
    attention_widths = [attn.to_q.weight.shape[0] for attn in cross_attentions(bundle.unet)]
    state = ip_adapter_state(attention_widths, bundle.unet_config.context_dim, 32, seed=3, std=0.3)
    write_ip_adapter(folder / "ip-adapter_tiny.safetensors", state)
    (folder / "lone").mkdir()
    write_ip_adapter(folder / "lone" / "ip-adapter_lone.bin", state)          # a pickle, as h94 ships .bin too
    save_file({"w": torch.zeros(4)}, str(folder / "broken.safetensors"))
    server = start_server(root / "outputs", "--models-dir", str(root / "models"))
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield {"client": client, "root": root, "picture": file_b64(SAMPLE_PICTURE)}
    server.stop()


def _stems(titles: list[str]) -> list[str]:
    return sorted(title.split(" [")[0] for title in titles)


def _jobs(client: httpx.Client) -> int:
    return len(client.get("/api/jobs").json()["jobs"])


def _a1111_unit(model: str, module: str, picture: str) -> dict:
    return {"alwayson_scripts": {"controlnet": {"args": [{"model": model, "module": module, "image": picture}]}}}


def test_the_native_list_sorts_the_folder_by_kind_and_a1111s_lists_both(setup):
    client = setup["client"]
    kinds = client.get("/api/control-models").json()
    assert _stems(kinds["controls"]) == ["broken", "tiny_canny"]
    assert _stems(kinds["ip_adapters"]) == ["ip-adapter_lone", "ip-adapter_tiny"]
    listed = client.get("/controlnet/model_list").json()["model_list"]
    assert sorted(listed) == sorted(kinds["controls"] + kinds["ip_adapters"])


def test_a_model_of_the_other_kind_is_a_422_at_submit(setup):
    client, picture = setup["client"], setup["picture"]
    before = _jobs(client)
    wrong = client.post("/api/jobs", json={**GEN, "controls": [{"model": "ip-adapter_tiny", "image": picture}]})
    assert wrong.status_code == 422, wrong.text
    detail = wrong.json()["detail"]
    assert detail.startswith("control 0: ip-adapter_tiny [") and "is an IP-Adapter, not a ControlNet" in detail
    assert "give it in ip_adapters" in detail
    wrong = client.post("/api/jobs", json={**GEN, "ip_adapters": [{"model": "tiny_canny", "image": picture}]})
    assert wrong.status_code == 422 and "is a ControlNet or T2I-Adapter, not an IP-Adapter" in wrong.json()["detail"]
    assert _jobs(client) == before
    # A1111's units are refused at submit too, naming the unit, the model (by its title) and the module: an
    # IP-Adapter module's reader refuses a ControlNet, a ControlNet module an IP-Adapter
    answer = client.post("/sdapi/v1/txt2img", json={"prompt": "a", "steps": 2, "width": 64, "height": 64,
                                                    **_a1111_unit("tiny_canny", "ip-adapter_clip_h", picture)})
    assert answer.status_code == 422 and "tiny_canny [" in answer.text and "not an IP-Adapter" in answer.text
    assert setup["root"].as_posix() not in answer.text
    answer = client.post("/sdapi/v1/txt2img", json={"prompt": "a", "steps": 2, "width": 64, "height": 64,
                                                    **_a1111_unit("ip-adapter_tiny", "canny", picture)})
    assert answer.status_code == 422 and "control 0 (module 'canny'): ip-adapter_tiny [" in answer.text
    assert setup["root"].as_posix() not in answer.text
    # each of its own kind is taken
    assert client.post("/api/jobs", json={**GEN, "ip_adapters": [{"model": "ip-adapter_tiny", "image": picture}],
                                          "controls": [{"model": "tiny_canny", "image": picture}]}).status_code == 202


def test_errors_name_the_models_not_the_servers_paths(setup):
    client, picture, root = setup["client"], setup["picture"], setup["root"].as_posix()
    lone = client.post("/api/jobs", json={**GEN, "ip_adapters": [{"model": "ip-adapter_lone", "image": picture}]})
    assert lone.status_code == 422 and "no image encoder for the IP-Adapter 'ip-adapter_lone [" in lone.text
    assert root not in lone.text
    unit = client.post("/sdapi/v1/txt2img", json={"prompt": "a", "steps": 2, "width": 64, "height": 64,
                                                  **_a1111_unit("ip-adapter_lone", "ip-adapter_clip_h", picture)})
    assert unit.status_code == 422 and "module 'ip-adapter_clip_h' draws with" in unit.text
    assert root not in unit.text and "ControlNet/lone" in unit.text       # the places it looked, by folder name
    # a file no loader takes fails its job when it loads: the error names it by its title
    job = client.post("/api/jobs", json={**GEN, "controls": [{"model": "broken", "image": picture}]})
    assert job.status_code == 202, job.text
    deadline = time.monotonic() + 120
    while (record := client.get(f"/api/jobs/{job.json()['id']}").json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert record["status"] == "failed" and record["error"].startswith("control 0: broken ["), record
    assert root not in record["error"]
