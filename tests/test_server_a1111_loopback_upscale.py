"""A1111 1.10's img2img scripts Loopback and SD upscale on /sdapi/v1/img2img (`script_name` + `script_args`): every
pass / tile batch is exactly the single img2img request it stands for, the SD upscale picture is A1111's
`combine_grid` (transcribed in test_tile_grid.py) of those tiles, and the answer is A1111's
`Processed(p, images, seed, initial_info)` of scripts/loopback.py and scripts/sd_upscale.py."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from sdlab.pipeline.loopback import loop_strength
from sdlab.pipeline.png_info import parse_parameters, read_parameters
from server_fixtures import b64_png, picture, sdlab_server  # noqa: F401  (sdlab_server: a session fixture)
from test_tile_grid import a1111_combine_grid, a1111_split_grid

BASE = {"prompt": "a red apple", "negative_prompt": "blurry", "steps": 4, "seed": 7, "cfg_scale": 5.0,
        "sampler_name": "Euler", "width": 64, "height": 64}


def pixels(b64: str) -> np.ndarray:
    return np.asarray(picture(b64))


def parameters(b64: str) -> dict:
    return parse_parameters(read_parameters(io.BytesIO(base64.b64decode(b64))))


INIT = Image.fromarray(np.stack([np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (64, 1)),
                                 np.tile(np.linspace(255, 0, 64, dtype=np.uint8), (64, 1)).T,
                                 np.full((64, 64), 90, dtype=np.uint8)], axis=-1))


@pytest.fixture
def client(sdlab_server):
    with httpx.Client(base_url=sdlab_server.url + "/sdapi/v1", timeout=300) as c:
        yield c


def img2img(client, **fields) -> dict:
    answer = client.post("/img2img", json={**BASE, "init_images": [b64_png(INIT)], **fields})
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_each_loopback_pass_is_the_single_img2img_of_the_last_picture(client) -> None:
    """3 loops, Lazy curve: pass k is img2img of pass k - 1's picture at seed 7 + k and A1111's strength; the
    answer is the row grid, then the passes with the script's fields, info the last pass's with the first seed."""
    answer = img2img(client, denoising_strength=0.6, script_name="loopback", script_args=[3, 0.2, "Lazy", "None"])
    images, info = answer["images"], json.loads(answer["info"])
    assert len(images) == 1 + 3
    init = b64_png(INIT)
    for k in range(3):
        strength = loop_strength(k, 3, 0.6, 0.2, "Lazy")
        single = img2img(client, init_images=[init], seed=7 + k, denoising_strength=strength)
        assert np.array_equal(pixels(images[1 + k]), pixels(single["images"][0])), k
        fields = parameters(images[1 + k])
        assert fields["Seed"] == 7 + k and fields["Final denoising strength"] == "0.2"
        assert fields["Denoising curve"] == "Lazy"
        init = images[1 + k]
    assert np.array_equal(pixels(images[0]), np.hstack([pixels(image) for image in images[1:]]))
    assert read_parameters(io.BytesIO(base64.b64decode(images[0]))) is None     # A1111's grid has no text
    assert info["seed"] == 7 and info["all_seeds"] == [9] and info["subseed"] == -1 and info["batch_size"] == 1
    assert info["denoising_strength"] == pytest.approx(loop_strength(3, 3, 0.6, 0.2, "Lazy"))
    assert list(info["extra_generation_params"])[:2] == ["Final denoising strength", "Denoising curve"]
    assert len(info["infotexts"]) == 1 and parse_parameters(info["infotexts"][0])["Seed"] == 7
    assert "Final denoising strength: 0.2, Denoising curve: Lazy" in info["infotexts"][0]


def test_loopback_batches_answer_each_batchs_last_picture(client) -> None:
    """n_iter 2 x 2 loops: seeds 7, 8 | 9, 10, each batch from the request's picture; the grid of the two last."""
    answer = img2img(client, n_iter=2, denoising_strength=0.5, script_name="Loopback", script_args=[2, 0.9])
    images = answer["images"]
    assert len(images) == 1 + 2
    assert [parameters(image)["Seed"] for image in images[1:]] == [8, 10]
    first = img2img(client, seed=9, denoising_strength=0.5)
    second = img2img(client, init_images=[first["images"][0]], seed=10, denoising_strength=0.9, inpainting_fill=1)
    assert np.array_equal(pixels(images[2]), pixels(second["images"][0]))


def test_loopback_passes_after_the_first_inpaint_with_the_original_content(client) -> None:
    """With a mask A1111 sets Masked content "original" (`inpainting_fill` 1) from the second pass on."""
    mask = Image.new("L", (64, 64))
    mask.paste(255, (16, 16, 48, 48))
    fields = {"mask": b64_png(mask), "inpainting_fill": 0, "inpaint_full_res": False, "denoising_strength": 0.7}
    answer = img2img(client, **fields, script_name="Loopback", script_args=[2, 0.7])
    first = img2img(client, **fields)
    assert np.array_equal(pixels(answer["images"][1]), pixels(first["images"][0]))
    second = img2img(client, **{**fields, "inpainting_fill": 1}, init_images=[answer["images"][1]], seed=8)
    assert np.array_equal(pixels(answer["images"][2]), pixels(second["images"][0]))


def a1111_lanczos_upscale(image: Image.Image, scale: float) -> Image.Image:
    """A1111 modules/upscaler.py `Upscaler.upscale` with `UpscalerLanczos.do_upscale`, transcribed."""
    dest_w, dest_h = int((image.width * scale) // 8 * 8), int((image.height * scale) // 8 * 8)
    for _ in range(3):
        if image.width >= dest_w and image.height >= dest_h and scale != 1:
            break
        shape = (image.width, image.height)
        image = image.resize((int(image.width * scale), int(image.height * scale)), resample=Image.Resampling.LANCZOS)
        if shape == (image.width, image.height):
            break
    if image.width != dest_w or image.height != dest_h:
        image = image.resize((int(dest_w), int(dest_h)), resample=Image.Resampling.LANCZOS)
    return image


def test_sd_upscale_is_a1111s_combine_grid_of_single_img2img_tile_batches(client) -> None:
    """48x48 by Lanczos x2 = 96x96, 64x64 tiles overlapping by 32: 4 tiles, batch size 3 -> a batch of 3 tiles at
    seed 5 and one of the last tile drawn 3 times at seed 6; put together as A1111's `combine_grid`."""
    small = INIT.resize((48, 48))
    body = {"init_images": [b64_png(small)], "seed": 5, "batch_size": 3, "denoising_strength": 0.4, "steps": 3,
            "script_name": "SD upscale", "script_args": ["", 32, 1, 2]}
    answer = client.post("/img2img", json={**BASE, **body})
    assert answer.status_code == 200, answer.text
    images, info = answer.json()["images"], json.loads(answer.json()["info"])
    grid = a1111_split_grid(a1111_lanczos_upscale(small, 2), tile_w=64, tile_h=64, overlap=32)
    tiles = [tile[2] for _, _, row in grid.tiles for tile in row]
    assert len(tiles) == 4
    drawn = []
    for seed, batch in ((5, tiles[:3]), (6, tiles[3:])):
        single = img2img(client, init_images=[b64_png(tile) for tile in batch], batch_size=3, seed=seed,
                         denoising_strength=0.4, steps=3)
        drawn += [picture(image) for image in single["images"]]
    index = 0
    for _, _, row in grid.tiles:
        for tile in row:
            tile[2] = drawn[index]
            index += 1
    assert len(images) == 1
    assert np.array_equal(pixels(images[0]), np.asarray(a1111_combine_grid(grid)))
    assert read_parameters(io.BytesIO(base64.b64decode(images[0]))) is None    # A1111's new picture has no text
    assert info["seed"] == 5 and info["all_seeds"] == [6, 7, 8] and info["batch_size"] == 3
    assert (info["width"], info["height"]) == (64, 64)
    assert "SD upscale overlap: 32, SD upscale upscaler: Lanczos" in info["infotexts"][0]
    assert parse_parameters(info["infotexts"][0])["Seed"] == 5


@pytest.mark.parametrize("name, args, message", [
    ("Loopback", [0], "loopback loops must be >= 1"),
    ("Loopback", [4, 1.5], "loopback final_denoising_strength must be 0..1, got 1.5"),
    ("Loopback", [4, 0.5, "Steep"], "loopback denoising_curve must be 'Aggressive' or 'Linear' or 'Lazy'"),
    ("Loopback", [4, 0.5, "Linear", "CLIP"], "sdlab has no CLIP or DeepBooru interrogator"),
    ("Loopback", [4, 0.5, "Linear", "None", 1], "at most 4 values"),
    ("SD upscale", ["", 64, 99, 2], "sd upscale upscaler_index must be 0..2"),
    ("SD upscale", ["", 64, "no such upscaler", 2], "unknown sd upscale upscaler 'no such upscaler'"),
    ("SD upscale", ["", 16, 1, 0], "sd upscale scale_factor must be above 0"),
    ("SD upscale", ["", 64, 1, 2], "sd upscale overlap must be 0..63 px"),
    ("SD upscale", ["", 8, "Lanczos", 2, "x"], "at most 4 values"),
])
def test_bad_script_args_are_a_422_before_anything_is_drawn(client, name, args, message) -> None:
    before = client.get("/progress").json()["state"]["job_count"]
    answer = client.post("/img2img", json={**BASE, "init_images": [b64_png(INIT)], "script_name": name,
                                           "script_args": args})
    assert answer.status_code == 422 and message in answer.json()["detail"], answer.text
    assert client.get("/progress").json()["state"]["job_count"] == before


@pytest.mark.parametrize("name", ["Loopback", "SD upscale"])
def test_the_img2img_scripts_are_not_in_txt2img(client, name: str) -> None:
    answer = client.post("/txt2img", json={**BASE, "script_name": name, "script_args": []})
    assert answer.status_code == 422 and answer.json()["detail"] == f"Script '{name}' not found"


def test_scripts_and_script_info_list_them_in_img2img(client) -> None:
    scripts = client.get("/scripts").json()
    assert "loopback" in scripts["img2img"] and "sd upscale" in scripts["img2img"]
    assert "loopback" not in scripts["txt2img"] and "sd upscale" not in scripts["txt2img"]
    infos = {(info["name"], info["is_img2img"]): info["args"] for info in client.get("/script-info").json()}
    assert ("loopback", False) not in infos and ("sd upscale", False) not in infos
    assert [arg["label"] for arg in infos[("loopback", True)]] == [
        "Loops", "Final denoising strength", "Denoising strength curve", "Append interrogated prompt at each iteration"]
    # A1111's `ui()` order, which is its `script_args` order: [info, overlap, upscaler_index, scale_factor]
    assert [arg["label"] for arg in infos[("sd upscale", True)]] == ["", "Tile overlap", "Upscaler", "Scale Factor"]


def test_script_info_lists_the_servers_upscalers_for_sd_upscale(tmp_path) -> None:
    """SD upscale's Upscaler choices are A1111's `shared.sd_upscalers` (scripts/sd_upscale.py `ui`: `choices=[x.name
    for x in shared.sd_upscalers]`, the first its value): the names `GET upscalers` gives, the server's model
    files after the plain resizes, not the plain resizes alone; GET /api/scripts lists the same args."""
    from types import SimpleNamespace

    from safetensors.torch import save_file

    from sdlab.pipeline.styles import StyleDatabase
    from sdlab.server.a1111 import scripts_info, upscalers
    from sdlab.server.model_folders import UPSCALER_SUFFIXES, ModelFolder
    from sdlab.server.native import scripts
    from test_upscale_models import new_arch_state

    save_file(new_arch_state(2), str(tmp_path / "RealESRGAN_x2plus.safetensors"))
    save_file(new_arch_state(4), str(tmp_path / "mine.safetensors"))
    service = SimpleNamespace(upscalers=ModelFolder(tmp_path, UPSCALER_SUFFIXES, hashed=False), styles=StyleDatabase(),
                              registry=SimpleNamespace(checkpoints=[], vaes=SimpleNamespace(names=list)))
    request = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(service=service)))
    [sd_upscale] = [info for info in scripts_info(request) if info["name"] == "sd upscale"]
    upscaler = sd_upscale["args"][2]
    assert upscaler["choices"] == [row["name"] for row in upscalers(request)]
    assert upscaler["choices"] == ["None", "Lanczos", "Nearest", "R-ESRGAN 2x+", "mine"]
    assert upscaler["value"] == "None"
    native = scripts(request)               # GET /api/scripts: each script's args as script-info gives them
    for info in scripts_info(request):
        tab = native["img2img" if info["is_img2img"] else "txt2img"]["scripts"]
        assert next(s["args"] for s in tab if s["title"].lower() == info["name"]) == info["args"], info["name"]


def stopped_at_first_step(sdlab_server, body: dict, route: str, job_count: int) -> tuple[httpx.Response, int]:
    """The answer to img2img `body` stopped by POST `route` (interrupt, skip) at its first job's third sampler step
    (`/progress` counting `job_count` jobs), and the jobs it queued."""
    with httpx.Client(base_url=sdlab_server.url, timeout=300) as server:
        def jobs() -> int:
            return len(server.get("/api/jobs", params={"limit": 1000}).json()["jobs"])
        before, answers = jobs(), []
        thread = threading.Thread(target=lambda: answers.append(server.post("/sdapi/v1/img2img", json=body)))
        thread.start()
        while thread.is_alive():
            state = server.get("/sdapi/v1/progress", params={"skip_current_image": True}).json()["state"]
            if state["sampling_step"] >= 3:
                assert state["job_count"] == job_count
                server.post(f"/sdapi/v1/{route}")
                break
            time.sleep(0.01)
        thread.join()
        return answers[0], jobs() - before


def test_an_interrupt_ends_the_loopback_without_the_pass_it_stops(sdlab_server) -> None:
    body = {**BASE, "steps": 150, "denoising_strength": 1.0, "init_images": [b64_png(INIT)],
            "script_name": "Loopback", "script_args": [3, 1.0]}
    answer, jobs = stopped_at_first_step(sdlab_server, body, "interrupt", 3)
    assert answer.status_code == 200, answer.text
    assert jobs == 1 and answer.json()["images"] == []
    info = json.loads(answer.json()["info"])
    assert info["seed"] == -1 and info["infotexts"] == [None] and info["all_seeds"] == [7]


def test_an_interrupt_leaves_the_sd_upscale_tiles_after_it_black(sdlab_server) -> None:
    body = {**BASE, "steps": 150, "denoising_strength": 1.0, "init_images": [b64_png(INIT.resize((32, 64)))],
            "script_name": "SD upscale", "script_args": ["", 0, "Nearest", 2]}      # 64x128: 2 tiles, 1 a batch
    answer, jobs = stopped_at_first_step(sdlab_server, body, "interrupt", 2)
    assert answer.status_code == 200, answer.text
    assert jobs == 1
    combined = pixels(answer.json()["images"][0])
    assert combined.shape == (128, 64, 3) and combined[:64].any() and not combined[64:].any()


def test_a_skip_drops_the_loopback_pass_it_stops_and_ends_its_batch(sdlab_server) -> None:
    """A1111's loopback.py: `if state.skipped: break` after the skipped pass's `process_images`, once its seed,
    text and strength are set: the pass is not kept, its batch's later loops are not drawn (3 loops, n_iter 1:
    no picture, one job), `info` the skipped pass's (seed 7, all_seeds [7], the strength after one loop)."""
    body = {**BASE, "steps": 150, "denoising_strength": 1.0, "init_images": [b64_png(INIT)],
            "script_name": "Loopback", "script_args": [3, 0.4]}
    answer, jobs = stopped_at_first_step(sdlab_server, body, "skip", 3)
    assert answer.status_code == 200, answer.text
    assert jobs == 1 and answer.json()["images"] == []
    info = json.loads(answer.json()["info"])
    assert info["seed"] == 7 and info["all_seeds"] == [7] and not info["interrupted"]
    assert info["denoising_strength"] == pytest.approx(loop_strength(1, 3, 1.0, 0.4, "Linear"))


def test_after_a_skipped_loopback_pass_the_next_batch_goes_on_from_its_seed(sdlab_server, client) -> None:
    """A1111's loopback.py sets `p.seed = processed.seed + 1` after each pass it draws, the skipped one too, and
    the passes it breaks out of draw nothing: 3 loops x n_iter 2, the first pass (seed 7) skipped, the second
    batch's passes are seeds 8, 9, 10 (not 10, 11, 12), its last picture that of the request at seed 8, n_iter 1."""
    body = {**BASE, "steps": 150, "denoising_strength": 1.0, "init_images": [b64_png(INIT)], "n_iter": 2,
            "script_name": "Loopback", "script_args": [3, 0.4]}
    answer, jobs = stopped_at_first_step(sdlab_server, body, "skip", 6)
    assert answer.status_code == 200, answer.text
    images, info = answer.json()["images"], json.loads(answer.json()["info"])
    assert jobs == 1 + 3 and len(images) == 1                   # each batch's last picture: the second's alone
    assert parameters(images[0])["Seed"] == 10 and info["all_seeds"] == [10] and info["seed"] == 7
    alone = img2img(client, **{**body, "seed": 8, "n_iter": 1, "init_images": [b64_png(INIT)]})
    assert np.array_equal(pixels(images[0]), pixels(alone["images"][-1]))
