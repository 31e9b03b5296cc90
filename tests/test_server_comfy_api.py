"""ComfyUI's API on `sdlab serve` (server/comfy_api.py, server/comfy_graph.py): the basic graph of ComfyUI's
script_examples/websockets_api_example.py queued, followed over /ws, read back through /history and /view, drawn as
the native API draws the same settings with ComfyUI's sampler spelling (ComfyUI's conventions, proven against
ComfyUI's code in test_comfyui_ksampler.py / test_comfyui_conventions.py); img2img (LoadImage + VAEEncode, denoise
< 1), LoRA, the graphs it refuses with ComfyUI's node_errors, interrupt. In-process app (TestClient), a tiny SD1
model."""

from __future__ import annotations

import copy
import io
import random
import time

import numpy as np
import pytest
from PIL import Image

from server_fixtures import b64_png
from test_cli_outputs import _lora
from test_server_vae_files import _vae_file

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# comfyanonymous/ComfyUI script_examples/websockets_api_example.py's prompt_text, at the tiny model's size and steps
BASIC = {
    "3": {"class_type": "KSampler", "inputs": {"cfg": 8, "denoise": 1, "latent_image": ["5", 0], "model": ["4", 0],
                                               "negative": ["7", 0], "positive": ["6", 0], "sampler_name": "euler",
                                               "scheduler": "normal", "seed": 8566257, "steps": 3}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "plain.safetensors"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"batch_size": 1, "height": 64, "width": 64}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "masterpiece best quality girl"}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "bad hands"}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
}
NATIVE = {"model": "plain.safetensors", "prompt": "masterpiece best quality girl", "negative_prompt": "bad hands",
          "sampler": "euler", "schedule": "normal", "cfg_scale": 8, "seed": 8566257, "steps": 3, "width": 64,
          "height": 64}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    from fastapi.testclient import TestClient
    from server_fixtures import write_preset_models

    from sdlab.server.app import create_app
    from sdlab.server.config import ServerConfig

    root = tmp_path_factory.mktemp("comfy-api")
    models = root / "models"
    write_preset_models(models)
    (models / "Lora").mkdir()
    _lora(models / "Lora" / "style.safetensors")
    _vae_file(models / "VAE" / "other.safetensors", seed=97)
    app = create_app(ServerConfig(output_dir=root / "outputs", model=models / "plain.safetensors",
                                  models_dir=models, vae_dir=models / "VAE"), preload=True)
    with TestClient(app) as client:
        yield client


def graph(**changes) -> dict:
    """BASIC with `changes` ({"3.steps": 5, ...}) made."""
    out = copy.deepcopy(BASIC)
    for key, value in changes.items():
        node, name = key.split(".")
        out[node]["inputs"][name] = value
    return out


def follow(socket, prompt_id: str) -> list[tuple[str, dict]]:
    """The socket's messages of `prompt_id` until ComfyUI's end of it (`executing` with node null)."""
    seen = []
    while True:
        message = socket.receive_json()
        data = message["data"]
        if data.get("prompt_id") != prompt_id:
            continue
        seen.append((message["type"], data))
        if message["type"] == "executing" and data["node"] is None:
            return seen


def drawn(client, prompt: dict) -> tuple[list[tuple[str, dict]], dict]:
    """Queue `prompt` with a client id, follow it over /ws; (its messages, its /history entry)."""
    with client.websocket_connect("/ws?clientId=tester") as socket:
        status = socket.receive_json()
        assert status["type"] == "status" and status["data"]["sid"] == "tester"
        answer = client.post("/prompt", json={"prompt": prompt, "client_id": "tester"})
        assert answer.status_code == 200, answer.text
        assert answer.json()["node_errors"] == {}
        prompt_id = answer.json()["prompt_id"]
        messages = follow(socket, prompt_id)
    history = client.get(f"/history/{prompt_id}").json()
    return messages, history[prompt_id]


def native_pixels(client, body: dict) -> np.ndarray:
    job = client.post("/api/jobs", json=body).json()
    deadline = time.monotonic() + 120
    while (state := client.get(f"/api/jobs/{job['id']}").json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert state["status"] == "done", state
    return np.asarray(Image.open(io.BytesIO(client.get(state["images"][0]).content)).convert("RGB"), np.int16)


def viewed(client, image: dict, prefix: str = "") -> np.ndarray:
    response = client.get(f"{prefix}/view", params=image)
    assert response.status_code == 200 and response.content[:8] == b"\x89PNG\r\n\x1a\n"
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"), np.int16)


def upload(client, name: str, picture: Image.Image, **save) -> None:
    """`picture` uploaded as the input picture `name` (a PNG, `save` its writer's options), overwriting one of that
    name."""
    data = io.BytesIO()
    picture.save(data, format="PNG", **save)
    answer = client.post("/upload/image", files={"image": (name, data.getvalue(), "image/png")},
                         data={"overwrite": "true"})
    assert answer.status_code == 200, answer.text


def upload_holed(client, name: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(RGB, alpha) of a 64 x 64 RGBA input picture uploaded as `name`: random pixels drawn from `seed`, a
    transparent rectangle off the 8-pixel grid (rows 13..44, columns 21..49) and a band of alpha 100."""
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    alpha = np.full((64, 64), 255, dtype=np.uint8)
    alpha[13:45, 21:50] = 0
    alpha[50:59, 5:30] = 100
    upload(client, name, Image.fromarray(np.dstack([rgb, alpha]), "RGBA"))
    return rgb, alpha


def test_the_basic_graph_runs_with_comfyuis_messages_and_draws_the_native_apis_picture(server):
    messages, entry = drawn(server, BASIC)
    kinds = [kind for kind, _ in messages]
    assert kinds[:2] == ["execution_start", "execution_cached"]
    executing = [data["node"] for kind, data in messages if kind == "executing"]
    assert executing == ["4", "6", "7", "5", "3", "8", "9", None]
    assert [(d["value"], d["max"], d["node"]) for k, d in messages if k == "progress"] == [
        (1, 3, "3"), (2, 3, "3"), (3, 3, "3")]
    executed = [data for kind, data in messages if kind == "executed"]
    assert [d["node"] for d in executed] == ["9"]
    assert "execution_success" in kinds
    assert entry["status"]["status_str"] == "success" and entry["status"]["completed"] is True
    image = entry["outputs"]["9"]["images"][0]
    assert image["type"] == "output" and image["subfolder"] == "" and executed[0]["output"]["images"] == [image]
    assert entry["prompt"][1] in server.get("/history").json()
    pixels = viewed(server, image)
    assert pixels.shape == (64, 64, 3)
    assert np.array_equal(pixels, viewed(server, image, "/api"))     # ComfyUI's /api prefix
    assert np.array_equal(pixels, native_pixels(server, NATIVE))
    other_seed = native_pixels(server, {**NATIVE, "seed": 1})
    assert np.abs(pixels - other_seed).max() > 10                    # the comparison can fail


def test_img2img_from_an_uploaded_picture(server):
    rng = np.random.default_rng(3)
    picture = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    data = io.BytesIO()
    picture.save(data, format="PNG")
    uploaded = server.post("/upload/image", files={"image": ("start.png", data.getvalue(), "image/png")}).json()
    assert uploaded == {"name": "start.png", "subfolder": "", "type": "input"}
    again = server.post("/api/upload/image", files={"image": ("start.png", data.getvalue(), "image/png")}).json()
    assert again["name"] == "start.png"         # the same bytes: the file there (ComfyUI's compare_image_hash)
    other = io.BytesIO()
    Image.fromarray(255 - np.asarray(picture)).save(other, format="PNG")
    renamed = server.post("/api/upload/image", files={"image": ("start.png", other.getvalue(), "image/png")}).json()
    assert renamed["name"] == "start (1).png"                       # no overwrite asked: renamed as ComfyUI does
    assert [n for n in server.get("/object_info/LoadImage").json()["LoadImage"]["input"]["required"][
        "image"][0] if n.startswith("start")] == ["start (1).png", "start.png"]
    assert np.array_equal(viewed(server, {"filename": "start.png", "type": "input"}), np.asarray(picture, np.int16))
    prompt = graph(**{"3.denoise": 0.6, "3.latent_image": ["10", 0]})
    prompt["10"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["11", 0], "vae": ["4", 2]}}
    prompt["11"] = {"class_type": "LoadImage", "inputs": {"image": "start.png"}}
    del prompt["5"]
    messages, entry = drawn(server, prompt)
    assert [d["max"] for k, d in messages if k == "progress"] == [3, 3, 3]   # ComfyUI's denoise: all steps run
    pixels = viewed(server, entry["outputs"]["9"]["images"][0])
    native = native_pixels(server, {**NATIVE, "mode": "img2img", "init_image": b64_png(picture), "strength": 0.6})
    assert np.array_equal(pixels, native)
    txt2img = viewed(server, drawn(server, BASIC)[1]["outputs"]["9"]["images"][0])
    assert np.abs(pixels - txt2img).max() > 10


def test_set_latent_noise_mask_inpaints_by_the_pictures_alpha(server):
    """LoadImage -> VAEEncode -> SetLatentNoiseMask (LoadImage's MASK: 1 - alpha) -> KSampler is the native inpaint
    job of the mask 255 - alpha, its levels kept (mask_round false), drawn with ComfyUI's noise mask and blend
    (test_comfyui_conventions.py::test_comfyuis_set_latent_noise_mask_on_the_tiny_model), the picture not pasted
    back: inside the transparent rectangle the two pictures are one, outside the native job keeps the original.
    A LoadImageMask's red channel holding 255 - alpha draws the same picture."""
    rgb, alpha = upload_holed(server, "holed.png", seed=5)
    prompt = graph(**{"3.denoise": 0.9, "3.latent_image": ["12", 0]})
    prompt["10"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["11", 0], "vae": ["4", 2]}}
    prompt["11"] = {"class_type": "LoadImage", "inputs": {"image": "holed.png"}}
    prompt["12"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["10", 0], "mask": ["11", 1]}}
    del prompt["5"]
    messages, entry = drawn(server, prompt)
    assert [d["node"] for k, d in messages if k == "executing"][:-1].count("12") == 1
    pixels = viewed(server, entry["outputs"]["9"]["images"][0])
    native = native_pixels(server, {**NATIVE, "mode": "inpaint", "init_image": b64_png(Image.fromarray(rgb)),
                                    "mask_image": b64_png(Image.fromarray(255 - alpha)), "mask_round": False,
                                    "strength": 0.9})
    inside = (slice(13, 45), slice(21, 50))
    assert np.array_equal(pixels[inside], native[inside])
    assert np.array_equal(native[:8], rgb[:8]) and np.abs(pixels[:8] - rgb[:8]).max() > 10

    # LoadImageMask's red channel / 255: the same mask
    upload(server, "red.png", Image.fromarray(np.dstack([255 - alpha, rgb[..., 1], rgb[..., 0]])))
    by_channel = copy.deepcopy(prompt)
    by_channel["12"]["inputs"]["mask"] = ["13", 0]
    by_channel["13"] = {"class_type": "LoadImageMask", "inputs": {"image": "red.png", "channel": "red"}}
    assert np.array_equal(viewed(server, drawn(server, by_channel)[1]["outputs"]["9"]["images"][0]), pixels)
    by_channel["13"]["inputs"]["channel"] = "alpha"                 # an RGB picture's alpha: 255, a mask of 0
    assert "0 everywhere" in server.post("/prompt", json={"prompt": by_channel}).json()["error"]["message"]

    upload(server, "opaque.png", Image.fromarray(rgb))
    opaque = copy.deepcopy(prompt)
    opaque["11"]["inputs"]["image"] = "opaque.png"
    answer = server.post("/prompt", json={"prompt": opaque})
    assert answer.status_code == 400 and "has no alpha channel" in answer.json()["error"]["message"]
    # a palette's transparency is no 'A' band: ComfyUI's empty MASK
    upload(server, "palette.png", Image.fromarray(rgb).quantize(16), transparency=0)
    opaque["11"]["inputs"]["image"] = "palette.png"
    assert "has no alpha channel" in refused(server, opaque)["error"]["message"]
    from_empty = graph(**{"3.latent_image": ["12", 0]})
    from_empty["12"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["5", 0], "mask": ["11", 1]}}
    from_empty["11"] = {"class_type": "LoadImage", "inputs": {"image": "holed.png"}}
    assert refused(server, from_empty)["node_errors"]["12"]["errors"][0]["type"] == "unsupported_graph"


def test_a_prompt_id_the_client_chose_names_the_prompt(server):
    """ComfyUI's script_examples/websockets_api_example.py makes a prompt_id, posts it with the graph and waits on
    the socket for `executing` {node: null} of that id, then reads /history/{id}: the prompt is known by it. The id
    of a prompt still queued or running is a 400; of a finished one, the prompt takes its history entry over."""
    chosen = "5d7c8bd6-2f5c-4c45-9a4e-0f1f3e2d6a11"
    with server.websocket_connect("/ws?clientId=chooser") as socket:
        socket.receive_json()
        answer = server.post("/prompt", json={"prompt": BASIC, "client_id": "chooser", "prompt_id": chosen})
        assert answer.status_code == 200 and answer.json()["prompt_id"] == chosen
        messages = follow(socket, chosen)
    assert messages[-1] == ("executing", {"node": None, "display_node": None, "prompt_id": chosen})
    entry = server.get(f"/history/{chosen}").json()[chosen]
    assert entry["prompt"][1] == chosen and entry["status"]["completed"] is True
    assert np.array_equal(viewed(server, entry["outputs"]["9"]["images"][0]), native_pixels(server, NATIVE))
    assert drawn(server, graph(**{"3.seed": 1}))[1]["prompt"][1] != chosen     # no prompt_id: a new one

    with server.websocket_connect("/ws?clientId=chooser") as socket:
        socket.receive_json()
        long = graph(**{"3.steps": 150})
        assert server.post("/prompt", json={"prompt": long, "client_id": "chooser", "prompt_id": 7}).status_code == 200
        while socket.receive_json()["type"] != "progress":
            pass
        again = server.post("/prompt", json={"prompt": BASIC, "prompt_id": "7"})       # str() of 7: running
        assert again.status_code == 400 and "queued or running" in again.json()["error"]["message"]
        assert server.post("/interrupt").status_code == 200
        follow(socket, "7")
        assert server.post("/prompt", json={"prompt": graph(**{"3.seed": 1}), "client_id": "chooser",
                                             "prompt_id": chosen}).status_code == 200
        follow(socket, chosen)
    history = server.get("/history").json()
    assert list(history).count(chosen) == 1 and history[chosen]["prompt"][2]["3"]["inputs"]["seed"] == 1


def test_two_posts_of_one_prompt_id_at_once_queue_one_prompt(server, monkeypatch):
    """The id a client chose is held from the first post's check until its prompt is queued: a second post of it
    meanwhile (its graph still being checked) is the 400 of an id queued or running, and draws nothing."""
    import threading

    from sdlab.server import comfy_api

    checking, answered = threading.Event(), threading.Event()

    def check(graph, choices):                  # the first post waits in its check until the second is answered
        if not checking.is_set():
            checking.set()
            assert answered.wait(60)
        return check_graph(graph, choices)

    check_graph = comfy_api.check_graph
    monkeypatch.setattr(comfy_api, "check_graph", check)
    jobs_before = len(server.get("/api/jobs?limit=1000").json()["jobs"])
    first = []
    poster = threading.Thread(target=lambda: first.append(server.post("/prompt", json={
        "prompt": graph(**{"3.seed": 1}), "prompt_id": "twice"})))
    poster.start()
    try:
        assert checking.wait(60)
        second = server.post("/prompt", json={"prompt": graph(**{"3.seed": 2}), "prompt_id": "twice"})
    finally:
        answered.set()
        poster.join(60)
    assert second.status_code == 400 and "queued or running" in second.json()["error"]["message"]
    assert first[0].status_code == 200 and first[0].json()["prompt_id"] == "twice"
    deadline = time.monotonic() + 120
    while not (entry := server.get("/history/twice").json()):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert entry["twice"]["prompt"][2]["3"]["inputs"]["seed"] == 1
    jobs = server.get("/api/jobs?limit=1000").json()["jobs"]
    assert len(jobs) == jobs_before + 1 and jobs[0]["request"]["seed"] == 1


def test_the_queue_items_extra_data_names_the_client(server):
    """ComfyUI's post_prompt puts the body's client_id in the queue item's extra_data (/queue, /history's
    `prompt[3]`), beside the extra_data sent."""
    _, entry = drawn(server, BASIC)             # posted with client_id "tester", no extra_data
    assert entry["prompt"][3] == {"client_id": "tester"}
    answer = server.post("/prompt", json={"prompt": BASIC, "extra_data": {"extra_pnginfo": {"workflow": {}}}})
    prompt_id = answer.json()["prompt_id"]
    deadline = time.monotonic() + 120
    while not (entry := server.get(f"/history/{prompt_id}").json()):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert entry[prompt_id]["prompt"][3] == {"extra_pnginfo": {"workflow": {}}}


def test_a_load_image_reads_comfyuis_annotated_input_name(server):
    """ComfyUI's frontend names a pasted or mask-edited picture "clipspace/<file> [input]" (folder_paths'
    annotated name, which LoadImage's VALIDATE_INPUTS and load_image read as the input folder's <file>): the
    SetLatentNoiseMask graph of a mask-editor export draws the picture of the plain name. LoadImage's
    VALIDATE_INPUTS checks that the file exists, not the list (ComfyUI's execution.py skips the list check of an
    input it validates): a file no folder holds is custom_validation_failed "Invalid image file"; "name [output]"
    is a picture of the output folder, as /history names a drawn one."""
    rgb, alpha = upload_holed(server, "edited.png", seed=11)
    data = io.BytesIO()
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(data, format="PNG")
    answer = server.post("/upload/image", files={"image": ("clipspace-mask-1.png", data.getvalue(), "image/png")},
                         data={"subfolder": "clipspace", "overwrite": "true"})
    assert answer.json() == {"name": "clipspace-mask-1.png", "subfolder": "clipspace", "type": "input"}
    prompt = graph(**{"3.denoise": 0.9, "3.latent_image": ["12", 0]})
    prompt["10"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["11", 0], "vae": ["4", 2]}}
    prompt["11"] = {"class_type": "LoadImage", "inputs": {"image": "clipspace/clipspace-mask-1.png [input]"}}
    prompt["12"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["10", 0], "mask": ["11", 1]}}
    del prompt["5"]
    annotated = viewed(server, drawn(server, prompt)[1]["outputs"]["9"]["images"][0])
    prompt["11"]["inputs"]["image"] = "edited.png"
    assert np.array_equal(annotated, viewed(server, drawn(server, prompt)[1]["outputs"]["9"]["images"][0]))
    for missing in ("edited.png [output]", "edited.png [temp]", "gone.png", "gone.png [input]"):
        prompt["11"]["inputs"]["image"] = missing
        assert refused(server, prompt)["node_errors"]["11"]["errors"] == [{
            "type": "custom_validation_failed", "message": "Custom validation failed for node",
            "details": f"image - Invalid image file: {missing}",
            "extra_info": {"input_name": "image", "received_value": missing}}]
    image = drawn(server, graph(**{"3.seed": 5}))[1]["outputs"]["9"]["images"][0]
    again = graph(**{"3.denoise": 0.6, "3.latent_image": ["10", 0]})
    again["10"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["11", 0], "vae": ["4", 2]}}
    again["11"] = {"class_type": "LoadImage", "inputs": {"image": f"{image['filename']} [output]"}}
    del again["5"]
    from_output = viewed(server, drawn(server, again)[1]["outputs"]["9"]["images"][0])
    picture = Image.fromarray(viewed(server, image).astype(np.uint8))
    native = native_pixels(server, {**NATIVE, "mode": "img2img", "init_image": b64_png(picture), "strength": 0.6})
    assert np.array_equal(from_output, native)


def test_a_lora_loader_draws_as_a_native_loras_entry(server):
    prompt = graph(**{"3.model": ["10", 0], "6.clip": ["10", 1], "7.clip": ["10", 1]})
    prompt["10"] = {"class_type": "LoraLoader", "inputs": {"model": ["4", 0], "clip": ["4", 1], "strength_model": 0.8,
                                                           "strength_clip": 0.8, "lora_name": "style.safetensors"}}
    _, entry = drawn(server, prompt)
    pixels = viewed(server, entry["outputs"]["9"]["images"][0])
    assert np.array_equal(pixels, native_pixels(server, {**NATIVE, "loras": [{"name": "style", "weight": 0.8}]}))
    assert np.abs(pixels - native_pixels(server, NATIVE)).max() > 3
    lora_info = server.get("/object_info/LoraLoader").json()["LoraLoader"]["input"]["required"]["lora_name"]
    assert lora_info == [["style.safetensors"]]


def test_a_lora_in_a_subfolder_is_named_by_its_path_as_comfyui_names_it(server):
    """ComfyUI's lora_name of a LoRA in a subfolder of the LoRA folder is its path there ("sub/inked.safetensors",
    folder_paths' names): listed so, and a LoraLoader of it draws as the native job's LoRA of that file."""
    folder = server.app.state.comfy.service.config.models_dir / "Lora" / "sub"
    folder.mkdir()
    nested = _lora(folder / "inked.safetensors", scale=0.7)
    try:
        assert server.post("/sdapi/v1/refresh-loras").status_code == 200
        names = server.get("/object_info/LoraLoader").json()["LoraLoader"]["input"]["required"]["lora_name"][0]
        assert names == ["style.safetensors", "sub/inked.safetensors"] == server.get("/models/loras").json()
        prompt = graph(**{"3.model": ["10", 0], "6.clip": ["10", 1], "7.clip": ["10", 1]})
        prompt["10"] = {"class_type": "LoraLoader", "inputs": {"model": ["4", 0], "clip": ["4", 1],
                                                               "strength_model": 0.8, "strength_clip": 0.8,
                                                               "lora_name": "sub/inked.safetensors"}}
        pixels = viewed(server, drawn(server, prompt)[1]["outputs"]["9"]["images"][0])
        assert np.array_equal(pixels, native_pixels(server, {**NATIVE, "loras": [{"name": "inked", "weight": 0.8}]}))
        assert np.abs(pixels - native_pixels(server, NATIVE)).max() > 3
    finally:
        nested.unlink()
        folder.rmdir()
        server.post("/sdapi/v1/refresh-loras")


def test_a_vae_loader_draws_as_a_native_vae(server):
    prompt = graph(**{"8.vae": ["10", 0]})
    prompt["10"] = {"class_type": "VAELoader", "inputs": {"vae_name": "other.safetensors"}}
    _, entry = drawn(server, prompt)
    pixels = viewed(server, entry["outputs"]["9"]["images"][0])
    assert np.array_equal(pixels, native_pixels(server, {**NATIVE, "vae": "other.safetensors"}))
    assert np.abs(pixels - native_pixels(server, NATIVE)).max() > 10
    two_vaes = graph(**{"3.latent_image": ["11", 0], "3.denoise": 0.5, "8.vae": ["10", 0]})
    two_vaes["10"] = prompt["10"]
    two_vaes["11"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["12", 0], "vae": ["4", 2]}}
    two_vaes["12"] = {"class_type": "LoadImage", "inputs": {"image": "start.png"}}
    assert refused(server, two_vaes)["node_errors"]["11"]["errors"][0]["type"] == "unsupported_graph"


def test_a_vae_in_a_subfolder_is_named_by_its_path_as_comfyui_names_it(server):
    """ComfyUI's vae_name of a file in a subfolder of the VAE folder is its path there: listed so, and a VAELoader of
    it draws the native job's VAE of that file."""
    folder = server.app.state.comfy.service.config.vae_dir / "sub"
    folder.mkdir()
    nested = folder / "nested.safetensors"
    _vae_file(nested, seed=98)
    try:
        assert server.post("/sdapi/v1/refresh-vae").status_code == 200
        names = server.get("/object_info/VAELoader").json()["VAELoader"]["input"]["required"]["vae_name"][0]
        assert names == ["other.safetensors", "sub/nested.safetensors"] == server.get("/models/vae").json()
        prompt = graph(**{"8.vae": ["10", 0]})
        prompt["10"] = {"class_type": "VAELoader", "inputs": {"vae_name": "sub/nested.safetensors"}}
        pixels = viewed(server, drawn(server, prompt)[1]["outputs"]["9"]["images"][0])
        assert np.array_equal(pixels, native_pixels(server, {**NATIVE, "vae": "nested.safetensors"}))
        assert np.abs(pixels - native_pixels(server, {**NATIVE, "vae": "other.safetensors"})).max() > 10
    finally:
        nested.unlink()
        folder.rmdir()
        server.post("/sdapi/v1/refresh-vae")


def test_files_of_one_name_in_two_subfolders_are_each_listed_and_drawn_as_comfyui(server):
    """ComfyUI lists and loads every file of its LoRA and VAE folders by its path there: Lora/a/inked.safetensors
    and Lora/b/inked.safetensors are two lora_names, each drawn with its own file (the A1111 list keeps one
    "inked", the first; the other is the native API's "./b/inked.safetensors"); VAE/a/x and VAE/b/x likewise (A1111's
    list keeps the later, b/x)."""
    lora_dir = server.app.state.comfy.service.config.models_dir / "Lora"
    vae_dir = server.app.state.comfy.service.config.vae_dir
    for folder in (lora_dir / "a", lora_dir / "b", vae_dir / "a", vae_dir / "b"):
        folder.mkdir()
    made = [_lora(lora_dir / "a" / "inked.safetensors", scale=0.7), _lora(lora_dir / "b" / "inked.safetensors",
                                                                          scale=1.3)]
    for sub, seed in (("a", 97), ("b", 5)):
        _vae_file(vae_dir / sub / "x.safetensors", seed=seed)
        made.append(vae_dir / sub / "x.safetensors")
    try:
        assert server.post("/sdapi/v1/refresh-loras").status_code == 200
        assert server.post("/sdapi/v1/refresh-vae").status_code == 200
        assert server.get("/models/loras").json() == ["a/inked.safetensors", "b/inked.safetensors", "style.safetensors"]
        assert server.get("/models/vae").json() == ["a/x.safetensors", "b/x.safetensors", "other.safetensors"]
        assert [l["name"] for l in server.get("/sdapi/v1/loras").json()].count("inked") == 1
        assert [v["model_name"] for v in server.get("/sdapi/v1/sd-vae").json()].count("x.safetensors") == 1
        lora_pixels = {}
        for sub, native_name in (("a", "inked"), ("b", "./b/inked.safetensors")):
            prompt = graph(**{"3.model": ["10", 0], "6.clip": ["10", 1], "7.clip": ["10", 1]})
            prompt["10"] = {"class_type": "LoraLoader", "inputs": {"model": ["4", 0], "clip": ["4", 1],
                                                                   "strength_model": 0.8, "strength_clip": 0.8,
                                                                   "lora_name": f"{sub}/inked.safetensors"}}
            lora_pixels[sub] = viewed(server, drawn(server, prompt)[1]["outputs"]["9"]["images"][0])
            assert np.array_equal(lora_pixels[sub], native_pixels(
                server, {**NATIVE, "loras": [{"name": native_name, "weight": 0.8}]}))
        assert np.abs(lora_pixels["a"] - lora_pixels["b"]).max() > 3
        vae_pixels = {}
        for sub, native_name in (("a", "./a/x.safetensors"), ("b", "x.safetensors")):
            prompt = graph(**{"8.vae": ["10", 0]})
            prompt["10"] = {"class_type": "VAELoader", "inputs": {"vae_name": f"{sub}/x.safetensors"}}
            vae_pixels[sub] = viewed(server, drawn(server, prompt)[1]["outputs"]["9"]["images"][0])
            assert np.array_equal(vae_pixels[sub], native_pixels(server, {**NATIVE, "vae": native_name}))
        assert np.abs(vae_pixels["a"] - vae_pixels["b"]).max() > 10
    finally:
        for path in made:
            path.unlink()
            path.parent.rmdir()
        server.post("/sdapi/v1/refresh-loras")
        server.post("/sdapi/v1/refresh-vae")


def test_a_lora_another_file_shadows_is_recorded_by_the_name_that_finds_it(server):
    """A LoRA whose stem an earlier file has (Lora/a/inked and Lora/b/inked: "inked" is a's) is recorded in the
    picture's parameters by its path under the LoRA folder, ComfyUI's lora_name ("<lora:b/inked.safetensors:0.8>",
    `Lora hashes` naming it so), which the server finds it by: the parameters read back (Reuse) draw the picture
    again. a's own stays A1111's "inked". Before, b was recorded "inked", which draws a's."""
    import base64

    lora_dir = server.app.state.comfy.service.config.models_dir / "Lora"
    for sub in ("a", "b"):
        (lora_dir / sub).mkdir()
    made = [_lora(lora_dir / "a" / "inked.safetensors", scale=0.7), _lora(lora_dir / "b" / "inked.safetensors",
                                                                          scale=1.3)]
    try:
        assert server.post("/sdapi/v1/refresh-loras").status_code == 200
        for sub, recorded in (("a", "inked"), ("b", "b/inked.safetensors")):
            prompt = graph(**{"3.model": ["10", 0], "6.clip": ["10", 1], "7.clip": ["10", 1]})
            prompt["10"] = {"class_type": "LoraLoader", "inputs": {"model": ["4", 0], "clip": ["4", 1],
                                                                   "strength_model": 0.8, "strength_clip": 0.8,
                                                                   "lora_name": f"{sub}/inked.safetensors"}}
            image = drawn(server, prompt)[1]["outputs"]["9"]["images"][0]
            png = server.get("/view", params=image).content
            text = Image.open(io.BytesIO(png)).info["parameters"]
            assert f"<lora:{recorded}:0.8>" in text and f'Lora hashes: "{recorded}: ' in text, text
            read = server.post("/api/parameters", json={"image": base64.b64encode(png).decode()})
            assert read.status_code == 200, read.text
            assert np.array_equal(viewed(server, image), native_pixels(server, read.json()["settings"]))
    finally:
        for path in made:
            path.unlink()
            path.parent.rmdir()
        server.post("/sdapi/v1/refresh-loras")


def test_a_ksampler_advanced_that_is_a_ksampler_draws_as_one(server):
    advanced = graph()
    advanced["3"] = {"class_type": "KSamplerAdvanced", "inputs": {
        **{k: v for k, v in BASIC["3"]["inputs"].items() if k not in ("seed", "denoise")}, "noise_seed": 8566257,
        "add_noise": "enable", "start_at_step": 0, "end_at_step": 10000, "return_with_leftover_noise": "disable"}}
    _, entry = drawn(server, advanced)
    assert np.array_equal(viewed(server, entry["outputs"]["9"]["images"][0]), native_pixels(server, NATIVE))
    advanced["3"]["inputs"]["start_at_step"] = 1                     # a part of the steps: not drawn
    assert refused(server, advanced)["node_errors"]["3"]["errors"][0]["type"] == "unsupported_graph"


def native_batch(client, body: dict) -> list[np.ndarray]:
    job = client.post("/api/jobs", json=body).json()
    deadline = time.monotonic() + 120
    while (state := client.get(f"/api/jobs/{job['id']}").json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert state["status"] == "done", state
    return [np.asarray(Image.open(io.BytesIO(client.get(url).content)).convert("RGB"), np.int16)
            for url in state["images"]]


def test_a_batch_draws_comfyuis_batch_noise(server):
    """EmptyLatentImage batch_size 2 with euler_ancestral: the batch's noise from one generator of the seed (start
    and step noise, ComfyUI's prepare_noise and default_noise_sampler; test_comfyui_conventions.py proves
    batch_noise "comfyui" against them): both pictures equal the native job's with batch_noise comfyui pixel for
    pixel, the second > 10/255 off the per-image seeds' second picture; the pictures record `Batch noise: comfyui`."""
    prompt = graph(**{"5.batch_size": 2, "3.sampler_name": "euler_ancestral"})
    _, entry = drawn(server, prompt)
    images = entry["outputs"]["9"]["images"]
    pixels = [viewed(server, image) for image in images]
    body = {**NATIVE, "sampler": "euler_ancestral", "batch_size": 2}
    comfy = native_batch(server, {**body, "batch_noise": "comfyui"})
    per_image = native_batch(server, body)
    assert len(pixels) == 2 and all(np.array_equal(a, b) for a, b in zip(pixels, comfy))
    assert np.abs(pixels[1] - per_image[1]).max() > 10
    text = Image.open(io.BytesIO(server.get("/view", params=images[1]).content)).info["parameters"]
    assert "Batch noise: comfyui" in text


def test_prompt_weights_are_comfyuis(server):
    """A weighted prompt is read and weighted as ComfyUI's CLIPTextEncode (emphasis "ComfyUI", test_comfy_prompt.py
    against ComfyUI's sd1_clip.py): the graph's picture equals the native job's with emphasis ComfyUI pixel for
    pixel, and is off A1111's rule's (Original, the mean restored) by more than 2/255."""
    text = "masterpiece (best quality:1.6) ((girl)) \\(solo\\)"
    _, entry = drawn(server, graph(**{"6.text": text}))
    pixels = viewed(server, entry["outputs"]["9"]["images"][0])
    assert np.array_equal(pixels, native_pixels(server, {**NATIVE, "prompt": text, "emphasis": "ComfyUI"}))
    assert np.abs(pixels - native_pixels(server, {**NATIVE, "prompt": text})).max() > 2     # 8/255 here


def refused(client, prompt) -> dict:
    answer = client.post("/prompt", json={"prompt": prompt})
    assert answer.status_code == 400, answer.text
    return answer.json()


def test_bad_graphs_get_comfyuis_node_errors(server):
    missing = graph()
    del missing["3"]["inputs"]["model"]
    body = refused(server, missing)
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    assert body["node_errors"]["3"]["class_type"] == "KSampler"
    assert body["node_errors"]["3"]["errors"][0]["type"] == "required_input_missing"
    assert body["node_errors"]["3"]["errors"][0]["details"] == "model"

    body = refused(server, graph(**{"3.sampler_name": "Euler a"}))
    error = body["node_errors"]["3"]["errors"][0]
    assert error["type"] == "value_not_in_list" and error["details"].startswith("sampler_name: 'Euler a' not in")
    assert refused(server, graph(**{"3.scheduler": "Karras"}))["node_errors"]["3"]["errors"][0]["type"] == \
        "value_not_in_list"
    assert refused(server, graph(**{"4.ckpt_name": "nothere.safetensors"}))["node_errors"]["4"]["errors"][0][
        "details"] == "ckpt_name: 'nothere.safetensors' not in ['distilled.safetensors', 'plain.safetensors']"

    unknown = graph(**{"8.samples": ["12", 0]})
    unknown["12"] = {"class_type": "LatentFlip", "inputs": {"samples": ["3", 0], "flip_method": "x-axis: vertically"}}
    body = refused(server, unknown)       # ComfyUI's execution.validate_prompt (2025-): missing_node_type
    assert body["error"] == {
        "type": "missing_node_type", "message": "Node 'LatentFlip' not found. The custom node may not be installed.",
        "details": "Node ID '#12'", "extra_info": {"node_id": "12", "class_type": "LatentFlip",
                                                   "node_title": "LatentFlip"}}
    assert body["node_errors"]["12"]["class_type"] == "LatentFlip"
    assert body["node_errors"]["12"]["errors"][0]["type"] == "unsupported_node"
    unknown["12"]["_meta"] = {"title": "Flip it"}                     # the frontend's title names it
    assert refused(server, unknown)["error"]["message"] == "Node 'Flip it' not found. The custom node may not be " \
        "installed."
    del unknown["12"]["class_type"]
    assert refused(server, unknown)["error"] == {
        "type": "missing_node_type", "message": "Node 'Flip it' has no class_type. The workflow may be corrupted or "
        "a custom node is missing.", "details": "Node ID '#12'",
        "extra_info": {"node_id": "12", "class_type": None, "node_title": "Flip it"}}

    body = refused(server, graph(**{"3.positive": ["5", 0]}))       # a LATENT where CONDITIONING goes
    assert body["node_errors"]["3"]["errors"][0] == {
        "type": "return_type_mismatch", "message": "Return type mismatch between linked nodes",
        "details": "positive, LATENT != CONDITIONING",
        "extra_info": {"input_name": "positive", "received_type": "LATENT", "linked_node": ["5", 0]}}
    assert refused(server, graph(**{"3.steps": 0}))["node_errors"]["3"]["errors"][0]["type"] == \
        "value_smaller_than_min"
    assert refused(server, graph(**{"3.model": ["99", 0]}))["node_errors"]["3"]["errors"][0]["type"] == \
        "bad_linked_input"
    no_output = graph()
    del no_output["9"]
    assert refused(server, no_output)["error"]["type"] == "prompt_no_outputs"
    assert refused(server, graph(**{"3.denoise": 0.5}))["node_errors"]["3"]["errors"][0]["type"] == \
        "unsupported_graph"                                           # an empty latent is drawn at denoise 1
    assert server.post("/prompt", json={"nothing": 1}).json()["error"]["type"] == "no_prompt"
    assert refused(server, {**graph(), "12": {"class_type": ["x"], "inputs": {}}})["node_errors"]["12"]["errors"][0][
        "type"] == "unsupported_node"
    assert server.get("/queue").json() == {"queue_running": [], "queue_pending": []}


def test_a_graph_is_checked_off_the_event_loop(server, monkeypatch):
    import asyncio

    from sdlab.server import comfy_api

    on_loop = []

    def check(graph, choices):
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:                        # no loop in this thread: the check waits no other route
            on_loop.append(False)
        return check_graph(graph, choices)

    check_graph = comfy_api.check_graph
    monkeypatch.setattr(comfy_api, "check_graph", check)
    refused(server, graph(**{"3.steps": 0}))
    assert on_loop == [False]


def test_interrupt_stops_the_prompt_drawing_and_keeps_no_output(server):
    with server.websocket_connect("/ws?clientId=stopper") as socket:
        socket.receive_json()
        answer = server.post("/api/prompt", json={"prompt": graph(**{"3.steps": 150}),
                                                     "client_id": "stopper"})
        prompt_id = answer.json()["prompt_id"]
        while True:
            message = socket.receive_json()
            if message["type"] == "progress":
                break
        running = server.get("/queue").json()["queue_running"]
        assert [item[1] for item in running] == [prompt_id]
        assert server.post("/interrupt", json={"prompt_id": "another"}).status_code == 200   # not this one
        assert server.post("/interrupt").status_code == 200
        kinds = [kind for kind, _ in follow(socket, prompt_id)]
    assert "execution_interrupted" in kinds and "executed" not in kinds
    entry = server.get(f"/history/{prompt_id}").json()[prompt_id]
    assert entry["outputs"] == {} and entry["status"]["status_str"] == "error"


def test_free_unloads_the_model_as_comfyuis_flags_do(server):
    """POST /free (ComfyUI's post_free, scripts call it to hand the GPU to another program): a true unload_models or
    free_memory lets the model go, {unload_models: false, free_memory: true} too (ComfyUI's post_free sets a flag
    only where it is true, and main.py unloads on flags.get("unload_models", free_memory)); the next prompt loads
    it again and draws the same picture. Both false, nothing goes. A body that is not a JSON object is a 400."""
    host = server.app.state.comfy.service.host
    assert host.pipe is not None
    before = viewed(server, drawn(server, BASIC)[1]["outputs"]["9"]["images"][0])
    for body in ({"unload_models": True}, {"free_memory": True}, {"unload_models": False, "free_memory": True}):
        assert server.post("/free", json=body).status_code == 200
        deadline = time.monotonic() + 60
        while host.pipe is not None:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert np.array_equal(viewed(server, drawn(server, BASIC)[1]["outputs"]["9"]["images"][0]), before)
    assert server.post("/free", json={"unload_models": False, "free_memory": False}).status_code == 200
    assert server.post("/free", json={}).status_code == 200
    assert host.pipe is not None and server.post("/api/free", content=b"[").status_code == 400


def test_discovery_routes_read_as_clients_read_them(server):
    info = server.get("/object_info").json()
    assert "KSampler" in info and "CheckpointLoaderSimple" in info
    required = info["KSampler"]["input"]["required"]
    samplers, schedulers = required["sampler_name"][0], required["scheduler"][0]  # as SillyTavern reads them
    assert "euler" in samplers and "dpmpp_2m" in samplers and "Euler a" not in samplers
    assert schedulers[:2] == ["simple", "sgm_uniform"] and "karras" in schedulers
    assert info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] == [
        "distilled.safetensors", "plain.safetensors"]
    assert info["SaveImage"]["output_node"] is True and info["KSampler"]["output"] == ["LATENT"]
    assert info["VAELoader"]["input"]["required"]["vae_name"] == [["other.safetensors"]]
    assert info["UNETLoader"]["input"]["required"]["unet_name"] == [[]]     # read by SillyTavern's comfy mode
    uploaded = server.get("/object_info/LoadImage").json()["LoadImage"]["input"]["required"]["image"]
    assert uploaded[1] == {"image_upload": True} and uploaded[0] == sorted(uploaded[0])   # ComfyUI's INPUT_TYPES
    masks = info["LoadImageMask"]["input"]["required"]
    assert masks["image"] == uploaded and masks["channel"] == [["alpha", "red", "green", "blue"]]
    assert server.get("/api/object_info/KSampler").json().keys() == {"KSampler"}
    stats = server.get("/system_stats").json()
    assert stats["devices"][0]["type"] == "cpu" and stats["system"]["ram_total"] > 0
    assert server.get("/embeddings").json() == []
    assert server.get("/prompt").json() == {"exec_info": {"queue_remaining": 0}}


def test_model_folders_list_the_files_comfyuis_nodes_take(server, tmp_path):
    """GET /models and /models/{folder} (ComfyUI's app/model_manager.py): the folder names, each folder's files as
    its nodes take them (CheckpointLoaderSimple's, LoraLoader's, VAELoader's lists; an embedding's path under its
    folder with its suffix, as `embedding:` names it without); another folder a 404, as ComfyUI's."""
    import torch
    from fastapi.testclient import TestClient

    from sdlab.server.app import create_app
    from sdlab.server.config import ServerConfig

    assert server.get("/models").json() == ["checkpoints", "loras", "vae", "controlnet", "diffusion_models",
                                            "upscale_models", "embeddings"]
    info = server.get("/object_info").json()
    assert server.get("/models/checkpoints").json() == info["CheckpointLoaderSimple"]["input"]["required"][
        "ckpt_name"][0] == ["distilled.safetensors", "plain.safetensors"]
    assert server.get("/api/models/loras").json() == ["style.safetensors"]
    assert server.get("/models/vae").json() == ["other.safetensors"]
    assert server.get("/models/controlnet").json() == server.get("/models/diffusion_models").json() == []
    assert server.get("/models/unet").status_code == 404            # a legacy name, no key of ComfyUI's folders
    assert server.get("/models/upscale_models").json() == []      # no upscalers folder
    folder = tmp_path / "embeddings"
    (folder / "styles").mkdir(parents=True)
    torch.save({"string_to_param": {"*": torch.randn(2, 64)}, "name": "zqink"}, folder / "styles" / "zqink.pt")
    torch.save({"string_to_param": {"*": torch.randn(1, 64)}, "name": "zqplain"}, folder / "zqplain.pt")
    models = server.app.state.comfy.service.config.models_dir
    app = create_app(ServerConfig(output_dir=tmp_path / "outputs", model=models / "plain.safetensors",
                                  models_dir=models, embeddings_dir=folder), preload=True)
    with TestClient(app) as client:
        assert client.get("/models/embeddings").json() == ["styles/zqink.pt", "zqplain.pt"]
        # ComfyUI's /embeddings: the same paths without suffixes, the names `embedding:` takes
        assert client.get("/embeddings").json() == ["styles/zqink", "zqplain"]


def test_view_and_upload_stay_in_their_folders(server):
    assert server.get("/view", params={"filename": "../outputs/jobs.sqlite", "type": "input"}).status_code == 404
    assert server.get("/view", params={"filename": "x.png", "subfolder": "..", "type": "input"}).status_code == 404
    assert server.get("/view", params={"filename": "anything.png"}).status_code == 404
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    answer = server.post("/upload/image", data={"subfolder": "../.."}, files={"image": ("a.png", png.getvalue())})
    assert answer.status_code == 400 and "leaves the input folder" in answer.text
    assert server.post("/upload/image", files={"image": ("a.png", b"not a picture", "image/png")}).status_code == 400
    noise = io.BytesIO()
    Image.frombytes("L", (64, 64), random.Random(0).randbytes(64 * 64)).save(noise, format="PNG")   # ~4 KB
    cut = server.post("/upload/image", files={"image": ("cut.png", noise.getvalue()[:200], "image/png")})  # header whole
    assert cut.status_code == 400 and "not a readable image" in cut.text


def test_a_websocket_from_another_sites_page_is_refused(server):
    """The guard's Origin rule (that of a loopback `sdlab serve`) holds for /ws's handshake: close code 1008."""
    from fastapi.testclient import TestClient
    from starlette.websockets import WebSocketDisconnect

    from sdlab.server.guard import Guard

    guarded = TestClient(Guard(server.app.app, basic=None, token=None, max_body=1 << 20,
                               hosts=frozenset({"testserver"}), origins=frozenset()))
    with pytest.raises(WebSocketDisconnect) as refusal:
        with guarded.websocket_connect("/ws?clientId=x", headers={"origin": "http://elsewhere.example"}):
            pass
    assert refusal.value.code == 1008
    with guarded.websocket_connect("/api/ws?clientId=x", headers={"origin": "http://testserver"}) as socket:
        assert socket.receive_json()["type"] == "status"


def test_sdlab_serve_answers_the_websocket_handshake(tmp_path):
    """uvicorn serves /ws in a real `sdlab serve` (its WebSocket library, wsproto, is a dependency): a raw RFC 6455
    handshake gets 101 and the first frame is ComfyUI's status message."""
    import base64
    import json
    import os
    import socket

    from server_fixtures import start_server

    served = start_server(tmp_path / "outputs")
    try:
        port = int(served.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
            key = base64.b64encode(os.urandom(16)).decode()
            conn.sendall(f"GET /ws?clientId=raw HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                         f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                         .encode())
            received = b""
            while b"\r\n\r\n" not in received:
                received += conn.recv(4096)
            head, _, frame = received.partition(b"\r\n\r\n")
            assert head.split(b"\r\n")[0].split(b" ")[1] == b"101", head
            while len(frame) < 4:
                frame += conn.recv(4096)
            assert frame[0] == 0x81                         # one unfragmented text frame
            length, start = (frame[1], 2) if frame[1] < 126 else (int.from_bytes(frame[2:4], "big"), 4)
            while len(frame) < start + length:
                frame += conn.recv(4096)
            message = json.loads(frame[start:start + length])
        assert message == {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": "raw"}}
    finally:
        served.stop()
