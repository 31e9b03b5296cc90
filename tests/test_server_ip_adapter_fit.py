"""An IP-Adapter of another family (an SDXL adapter's 192-wide context and cross-attention widths against a reduced
SD1 model's 64-wide ones) is refused as the job is posted, on the native route (`ip_adapters`) and the A1111 route
(an ip-adapter ControlNet unit), whether the job's model is loaded (its U-Net) or not (its U-Net built on the meta
device from the checkpoint's header, `model_shapes.planned_unet`): one 422 line naming the adapter by its title
(`name [hash]`, as the server's other ControlNet / IP-Adapter errors name files) and both widths, nothing queued. An adapter that fits the model not loaded is taken and drawn."""

from __future__ import annotations

import httpx
import pytest
from PIL import Image

from ip_adapter_fixtures import SAMPLE_PICTURE, ip_adapter_state, write_image_encoder, write_ip_adapter
from server_fixtures import file_b64, run_job, start_server, write_preset_models

GEN = {"prompt": "a red apple", "steps": 2, "seed": 11, "width": 32, "height": 32, "cfg_scale": 5}
WORDS = "IP-Adapter 0: {title}: this IP-Adapter is for a U-Net with a 192-wide text context"


def _widths(bundle) -> list[int]:
    from sdlab.models.ip_adapter import cross_attentions

    return [attn.to_q.weight.shape[0] for attn in cross_attentions(bundle.unet)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    from bundle_fixtures import tiny_bundle

    root = tmp_path_factory.mktemp("server-ip-adapter-fit")
    models = root / "models"
    write_preset_models(models)                          # plain.safetensors (loaded) and distilled.safetensors
    (models / "ControlNet").mkdir()
    write_image_encoder(models / "image_encoder", seed=2, projection=32)
    sd1, sdxl = tiny_bundle("sd1", seed=3), tiny_bundle("sdxl", seed=3)
    write_ip_adapter(models / "ControlNet" / "ip-adapter_sdxl_tiny.safetensors",
                     ip_adapter_state(_widths(sdxl), sdxl.unet_config.context_dim, 32, seed=3))
    write_ip_adapter(models / "ControlNet" / "ip-adapter_sd1_tiny.safetensors",
                     ip_adapter_state(_widths(sd1), sd1.unet_config.context_dim, 32, seed=4))
    picture = root / "reference.png"
    Image.open(SAMPLE_PICTURE).convert("RGB").crop((0, 0, 200, 160)).save(picture)
    server = start_server(root / "outputs", "--models-dir", str(models), "--model", str(models / "plain.safetensors"))
    with httpx.Client(base_url=server.url, timeout=300) as client:
        assert run_job(client, {**GEN, "model": "plain.safetensors"})["status"] == "done"     # loads plain
        title = next(t for t in client.get("/controlnet/model_list").json()["model_list"]
                     if t.startswith("ip-adapter_sdxl_tiny ["))
        yield {"client": client, "picture": file_b64(picture), "words": WORDS.format(title=title)}
    server.stop()


def _jobs(client: httpx.Client) -> int:
    return len(client.get("/api/jobs").json()["jobs"])


@pytest.mark.parametrize("model", ["plain.safetensors", "distilled.safetensors"])      # loaded, not loaded
def test_a_native_adapter_of_another_family_is_a_422_at_submit(setup, model):
    client, before = setup["client"], _jobs(setup["client"])
    refused = client.post("/api/jobs", json={**GEN, "model": model, "ip_adapters": [
        {"model": "ip-adapter_sdxl_tiny", "image": setup["picture"]}]})
    assert refused.status_code == 422, refused.text
    detail = refused.json()["detail"]
    assert setup["words"] in detail and "the model's is 64-wide" in detail and "Traceback" not in detail, detail
    assert "/" not in detail, detail                    # no path of the server's
    assert _jobs(client) == before


@pytest.mark.parametrize("model", ["plain.safetensors", "distilled.safetensors"])
def test_an_a1111_ip_adapter_unit_of_another_family_is_a_422_at_submit(setup, model):
    client, before = setup["client"], _jobs(setup["client"])
    unit = {"enabled": True, "module": "ip-adapter_clip_sd15", "model": "ip-adapter_sdxl_tiny",
            "image": setup["picture"]}
    refused = client.post("/sdapi/v1/txt2img", json={
        **GEN, "sampler_name": "Euler", "override_settings": {"sd_model_checkpoint": model},
        "alwayson_scripts": {"controlnet": {"args": [unit]}}})
    assert refused.status_code == 422, refused.text
    assert setup["words"] in refused.json()["detail"], refused.text
    assert _jobs(client) == before


def test_an_adapter_that_fits_a_model_not_loaded_is_taken_and_drawn(setup):
    job = run_job(setup["client"], {**GEN, "model": "distilled.safetensors", "ip_adapters": [
        {"model": "ip-adapter_sd1_tiny", "image": setup["picture"]}]}, timeout_s=300)
    assert job["status"] == "done", job
