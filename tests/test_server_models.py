"""`sdlab serve --models-dir`: the model list with A1111's titles and hashes, switching models by
options or per job (only among the folder's files), LoRAs by name or `<lora:...>` tag recorded as the CLI
records them, pictures equal to `sdlab txt2img`'s, and HTTP Basic auth as webuiapi sends it."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys

import httpx
import numpy as np
import pytest
from PIL import Image

from bundle_fixtures import tiny_bundle, write_original
from sdlab.pipeline.png_info import lora_hash, model_hash
from server_fixtures import run_job, server_env, start_server
from test_cli_outputs import _lora

AUTH = ("painter", "pa:ss word")
SMALL = {"steps": 3, "seed": 5, "width": 32, "height": 32}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("models-server")
    models = root / "models"
    (models / "Lora").mkdir(parents=True)
    (models / "sub").mkdir()
    write_original(tiny_bundle("sd1"), models / "tiny-a.safetensors", junk=False)
    write_original(tiny_bundle("sd1", seed=3), models / "sub" / "tiny-b.safetensors", junk=False)
    _lora(models / "Lora" / "style.safetensors")
    (root / "outside.safetensors").write_bytes((models / "tiny-a.safetensors").read_bytes())
    (models / "escape.safetensors").symlink_to(root / "outside.safetensors")
    server = start_server(root / "outputs", "--models-dir", str(models), "--model", str(models / "tiny-a.safetensors"),
                          "--auth", ":".join(AUTH), auth=AUTH)
    yield server, models
    server.stop()


@pytest.fixture
def client(served):
    server, _ = served
    with httpx.Client(base_url=server.url, auth=AUTH, timeout=120) as c:
        yield c




def _picture(client: httpx.Client, url: str) -> tuple[np.ndarray, str]:
    response = client.get(url)
    image = Image.open(io.BytesIO(response.content))
    return np.asarray(image.convert("RGB")), image.info["parameters"]


def test_model_list_titles_hashes_and_no_escape(client, served):
    _, models = served
    listed = {m["title"]: m for m in client.get("/sdapi/v1/sd-models").json()}
    a = model_hash(models / "tiny-a.safetensors")
    # the startup model hashed, tiny-b listed as A1111 1.10 lists a model not hashed yet: by name, hash null
    assert set(listed) == {f"tiny-a.safetensors [{a}]", "sub/tiny-b.safetensors"}   # the symlink out is not
    assert listed["sub/tiny-b.safetensors"]["model_name"] == "sub_tiny-b"
    assert listed["sub/tiny-b.safetensors"]["hash"] is None and listed["sub/tiny-b.safetensors"]["sha256"] is None
    loras = client.get("/sdapi/v1/loras").json()
    assert [(l["name"], l["path"]) for l in loras] == [("style", str((models / "Lora" / "style.safetensors").resolve()))]
    missing = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": str(models.parent / "outside.safetensors")})
    assert missing.status_code == 404 and missing.json()["detail"] == "Model not found"


def test_switching_models_by_options_and_per_job(client, served):
    _, models = served
    b_title = f"sub/tiny-b.safetensors [{model_hash(models / 'sub' / 'tiny-b.safetensors')}]"
    try:        # named before it is hashed; hashed as it is selected, as A1111 hashes a model it loads
        assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "sub/tiny-b.safetensors"}).status_code == 200
        assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == b_title
        assert b_title in [m["title"] for m in client.get("/sdapi/v1/sd-models").json()]
        job = run_job(client, {"prompt": "x", **SMALL})
        assert job["model"] == b_title and "Model: tiny-b" in job["infotexts"][0]
        assert f"Model hash: {model_hash(models / 'sub' / 'tiny-b.safetensors')}" in job["infotexts"][0]
        job_a = run_job(client, {"prompt": "x", "model": "tiny-a", **SMALL})
        assert job_a["model"].startswith("tiny-a.safetensors [") and "Model: tiny-a" in job_a["infotexts"][0]
        assert client.post("/api/jobs", json={"prompt": "x", "model": "nope"}).status_code == 404
    finally:
        client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-a.safetensors"})


def test_info_names_a_model_in_a_sub_folder_as_a1111_by_its_file_stem(client):
    """A1111 1.10 (processing.py) sets `info.sd_model_name` from `sd_checkpoint_info.name_for_extra`, the file's
    name without extension or folders, the same name as the pictures' `Model:`; before, sdlab answered the
    listed `model_name`, 'sub_tiny-b'."""
    body = {"prompt": "x", **SMALL, "override_settings": {"sd_model_checkpoint": "sub/tiny-b.safetensors"}}
    answer = client.post("/sdapi/v1/txt2img", json=body)
    assert answer.status_code == 200, answer.text
    info = json.loads(answer.json()["info"])
    assert info["sd_model_name"] == "tiny-b" and "Model: tiny-b," in info["infotexts"][0]


def test_lora_by_name_or_tag_matches_the_cli(client, served, tmp_path):
    server, models = served
    by_name = run_job(client, {"prompt": "two cats", "loras": [{"name": "style", "weight": 0.7}], **SMALL})
    by_tag = run_job(client, {"prompt": "two cats <lora:style:0.7>", **SMALL})
    plain = run_job(client, {"prompt": "two cats", **SMALL})
    pixels_name, text_name = _picture(client, by_name["images"][0])
    pixels_tag, text_tag = _picture(client, by_tag["images"][0])
    pixels_plain, _ = _picture(client, plain["images"][0])
    assert (pixels_name == pixels_tag).all() and not (pixels_name == pixels_plain).all()
    assert "two cats <lora:style:0.7>" in text_name and text_name == text_tag
    assert f'Lora hashes: "style: {lora_hash(models / "Lora" / "style.safetensors")}"' in text_name
    assert client.post("/api/jobs", json={"prompt": "x <lora:missing:1>"}).status_code == 404

    out = tmp_path / "cli.png"
    cli = subprocess.run(
        [sys.executable, "-m", "sdlab", "txt2img", "two cats", "--model", str(models / "tiny-a.safetensors"),
         "--lora", f"{models / 'Lora' / 'style.safetensors'}:0.7", "--steps", "3", "--seed", "5",
         "--width", "32", "--height", "32", "--out", str(out), "--no-progress"],
        capture_output=True, text=True, env=server_env(), timeout=300,
    )
    assert cli.returncode == 0, cli.stderr
    with Image.open(out) as image:
        assert (np.asarray(image.convert("RGB")) == pixels_name).all()
        assert image.info["parameters"] == text_name


def test_basic_auth_with_webuiapi(served):
    webuiapi = pytest.importorskip("webuiapi")
    server, _ = served
    api = webuiapi.WebUIApi(baseurl=server.url + "/sdapi/v1", username=AUTH[0], password=AUTH[1])
    result = api.txt2img(prompt="x", steps=2, width=32, height=32, seed=1)
    assert result.image.size == (32, 32)
    assert httpx.get(server.url + "/sdapi/v1/options", auth=(AUTH[0], "wrong")).status_code == 401


def test_a_loras_entry_tagged_in_the_hires_prompt_draws_at_its_entry_weight_in_both_passes(client):
    """As `sdlab txt2img --lora`: the hires prompt's tag of a `loras` entry is left out (the entry's weight wins, the
    LoRA is not merged twice), so the job draws the picture of the bare hires prompt, and its text read back
    (`/api/parameters`, then a job of its settings: a PNG drop and Generate) draws it again."""
    hires = {"prompt": "a cat", "loras": [{"name": "style", "weight": 0.6}], "hr_scale": 1.5, "hr_steps": 1, **SMALL}
    bare = run_job(client, {**hires, "hr_prompt": "a dog"})
    tagged = run_job(client, {**hires, "hr_prompt": "a dog <lora:style:0.3>"})
    pixels_bare, pixels_tagged = _picture(client, bare["images"][0])[0], _picture(client, tagged["images"][0])[0]
    assert (pixels_tagged == pixels_bare).all()
    png = base64.b64encode(client.get(tagged["images"][0]).content).decode()
    settings = client.post("/api/parameters", json={"image": png}).json()["settings"]
    again = run_job(client, {key: value for key, value in settings.items() if value is not None})
    assert (_picture(client, again["images"][0])[0] == pixels_tagged).all()
