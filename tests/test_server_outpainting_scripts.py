"""A1111 1.10's img2img scripts Poor man's outpainting and Outpainting mk2 on /sdapi/v1/img2img (`script_name`,
`script_args` in their `Script.run` order): every pass is the single inpainting request it stands for (with a mask
blur of 0 its latent mask is its mask, so a plain /img2img request draws it; with a blur, drawn in process
with its latent mask), the picture is put together as
`sdlab.pipeline.outpainting_scripts` puts it, the answer is A1111's `Processed`, and bad arguments are 422s
before anything is drawn."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
from PIL import Image

from sdlab.pipeline.grid import cell_picture
from sdlab.pipeline.outpainting_scripts import mk2_passes, outpaint_sides, poor_mans_tiles
from server_fixtures import b64_png, picture, sdlab_server  # noqa: F401  (sdlab_server: a session fixture)

BASE = {"prompt": "a red apple", "negative_prompt": "blurry", "steps": 2, "seed": 7, "cfg_scale": 5.0,
        "sampler_name": "Euler", "denoising_strength": 0.8, "width": 64, "height": 64}
FILLS = ("fill", "original", "latent noise", "latent nothing")


@pytest.fixture
def client(sdlab_server):
    with httpx.Client(base_url=sdlab_server.url + "/sdapi/v1", timeout=300) as c:
        yield c


def _init() -> Image.Image:
    rng = np.random.default_rng(5)
    return Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).resize((40, 48), Image.NEAREST)


def _post(client, **fields) -> dict:
    answer = client.post("/img2img", json={**BASE, "init_images": [b64_png(_init())], **fields})
    assert answer.status_code == 200, answer.text
    return answer.json()


def _inpainting(client, init: list[Image.Image], mask: Image.Image, fill: int, **fields) -> dict:
    """The answer to the plain inpainting request a pass stands for (mask blur 0, whole picture)."""
    return _post(client, init_images=[b64_png(image) for image in init], mask=b64_png(mask), mask_blur=0,
                 inpainting_fill=fill, inpaint_full_res=False, **fields)


def _inpainted(client, init: list[Image.Image], mask: Image.Image, fill: int, **fields) -> list[Image.Image]:
    """The pictures of `_inpainting`."""
    return [picture(image) for image in _inpainting(client, init, mask, fill, **fields)["images"]]


def test_scripts_and_script_info_list_them_in_img2img_only(client) -> None:
    scripts = client.get("/scripts").json()
    assert "poor man's outpainting" in scripts["img2img"] and "outpainting mk2" in scripts["img2img"]
    assert "poor man's outpainting" not in scripts["txt2img"] and "outpainting mk2" not in scripts["txt2img"]
    infos = {(i["name"], i["is_img2img"]): i["args"] for i in client.get("/script-info").json()}
    assert ("outpainting mk2", False) not in infos
    assert [a["label"] for a in infos[("poor man's outpainting", True)]] == [
        "Pixels to expand", "Mask blur", "Masked content", "Outpainting direction"]
    assert [a["label"] for a in infos[("outpainting mk2", True)]] == [       # its HTML note's label: A1111's ""
        "", "Pixels to expand", "Mask blur", "Outpainting direction", "Fall-off exponent (lower=higher detail)",
        "Color variation"]
    answer = client.post("/txt2img", json={**BASE, "script_name": "Outpainting mk2"})
    assert answer.status_code == 422 and "Script 'Outpainting mk2' not found" in answer.text


@pytest.mark.parametrize("fill", [0, 2])
def test_poor_mans_outpainting_tiles_are_single_inpaintings(client, fill) -> None:
    args = [16, 0, fill, ["left", "up", "down"]]              # pixels, mask_blur, inpainting_fill, direction
    body = _post(client, script_name="Poor man's outpainting", script_args=args)
    info = json.loads(body["info"])
    tiles = poor_mans_tiles(_init(), 16, 0, args[3], (64, 64))
    assert len(body["images"]) == 1 and len(tiles.work) > 1
    drawn = [_inpainted(client, [tile.image], mask, fill, seed=7 + k)[0]
             for k, (tile, mask, _) in enumerate(tiles.work)]
    assert np.array_equal(np.asarray(picture(body["images"][0])), np.asarray(tiles.combined(drawn)))
    last = _post(client, init_images=[b64_png(tiles.work[-1][0].image)], mask=b64_png(tiles.work[-1][1]), mask_blur=0,
                 inpainting_fill=fill, inpaint_full_res=False, seed=7 + len(tiles.work) - 1)
    first = json.loads(_post(client, init_images=[b64_png(tiles.work[0][0].image)], mask=b64_png(tiles.work[0][1]),
                             mask_blur=0, inpainting_fill=fill, inpaint_full_res=False)["info"])
    assert info["seed"] == 7 and info["subseed"] == -1 and info["index_of_first_image"] == 0
    assert info["infotexts"] == first["infotexts"][:1]
    assert info["all_seeds"] == json.loads(last["info"])["all_seeds"] == [7 + len(tiles.work) - 1]
    assert (info["width"], info["height"], info["batch_size"]) == (64, 64, 1)


def test_outpainting_mk2_passes_are_single_inpaintings(client) -> None:
    args = [None, 16, 0, ["left", "right", "down"], 1.0, 0.05]
    body = _post(client, script_name="Outpainting mk2", script_args=args, batch_size=2, n_iter=2)
    info = json.loads(body["info"])
    passes = mk2_passes(_init().size, 16, 0, args[3], (64, 64))
    pictures, texts = [], []
    for _ in range(2):                                        # each batch from the request's picture again
        current = [_init()] * 2
        for one in passes:
            canvases = one.canvases(current, 1.0, 0.05)
            inits, mask, latent = one.inputs(canvases, current[0].size)
            assert np.array_equal(np.asarray(mask.convert("L")), np.asarray(latent.convert("L")))   # blur 0
            width, height = one.drawn_size(current[0].size)
            answer = _inpainting(client, inits, mask, 1, width=width, height=height, batch_size=2)
            texts.append(json.loads(answer["info"])["infotexts"][0])
            current = one.merged(canvases, [picture(image) for image in answer["images"]], current[0].size)
        pictures += current
    images = [picture(image) for image in body["images"]]
    assert len(images) == 5 and images[1].size == outpaint_sides(_init().size, 16, args[3])[1] == (128, 64)
    for ours, theirs in zip(images, [cell_picture(pictures)] + pictures):
        assert np.array_equal(np.asarray(ours), np.asarray(theirs))
    assert info["seed"] == 7 and info["all_seeds"] == [7, 8] and info["index_of_first_image"] == 0
    assert info["infotexts"] == texts[:1]           # A1111's initial_info: the first pass's text, byte for byte


@pytest.mark.parametrize(("name", "args", "words"), [
    ("Poor man's outpainting", [0], "pixels must be 1.."),
    ("Poor man's outpainting", [64], "must be below the width and height"),
    ("Poor man's outpainting", [16, 4, 4], "inpainting_fill must be 0..3"),
    ("Poor man's outpainting", [16, 4, 0, ["left", "sideways"]], "list of some of left, right, up, down"),
    ("Poor man's outpainting", [16, 4, 0, []], "list of some of"),
    ("Poor man's outpainting", [16, 4, 0, [["left"]]], "list of some of"),       # a list in the list: no 500
    ("Poor man's outpainting", [float("inf")], "pixels must be an integer"),     # JSON's Infinity: no 500
    ("Poor man's outpainting", [16, 1.5], "mask_blur must be an integer"),
    ("Outpainting mk2", [None, 16, 8, ["up"], -1.0], "noise_q must be a number >= 0"),
    ("Outpainting mk2", [None, 16, 8, ["up"], 1.0, 2.0], "color_variation must be 0..1"),
    ("Outpainting mk2", [None, 16, 8, ["up"], 1.0, 0.05, 1], "at most 6 values"),
    # masks inset past the picture (Pillow's inverted rectangle): 2 x 40 px on each side of a 40 px wide picture,
    # 2 x 64 px above a 48 px high one; mk2's down pass grows by 80 px but draws a 64 px band (after a left pass)
    ("Poor man's outpainting", [16, 40, 0, ["left", "right"]], "mask_blur 40 insets the 40x48 picture by 2 x 40"),
    ("Poor man's outpainting", [8, 64, 0, ["up"]], "mask_blur 64 insets the 40x48 picture"),
    ("Outpainting mk2", [None, 32, 8, ["left", "down"]], "the down pass draws 128x64 of a 128x128 picture"),
])
def test_bad_arguments_are_422_before_drawing(sdlab_server, client, name, args, words) -> None:
    def jobs() -> int:
        return len(httpx.get(sdlab_server.url + "/api/jobs", params={"limit": 1000}).json()["jobs"])
    before = jobs()
    body = {**BASE, "init_images": [b64_png(_init())], "script_name": name, "script_args": args}
    answer = client.post("/img2img", content=json.dumps(body), headers={"Content-Type": "application/json"})
    assert answer.status_code == 422 and words in answer.text, answer.text
    assert jobs() == before


@pytest.mark.parametrize(("name", "args", "size"), [
    ("Poor man's outpainting", [16, 3, 1, ["right", "up"]], (64, 64)),
    ("Outpainting mk2", [None, 16, 4, ["left", "up"]], (64, 64)),
])
def test_a_mask_blur_draws_with_a_latent_mask_of_its_own(client, name, args, size) -> None:
    """With a mask blur the latent mask differs from the mask (A1111's insets): the scripts draw, the picture the
    canvas's size."""
    images = _post(client, script_name=name, script_args=args)["images"]
    assert len(images) == 1 and picture(images[0]).size == size


def _drawn_in_process(body: dict, init: Image.Image, mask: Image.Image, latent_mask: Image.Image) -> Image.Image:
    """The inpainting `body` asks for, drawn here as the server draws it (its A1111 request, the schedule its
    worker sets when unset), with `latent_mask` as the latent mask, which no plain request can send."""
    import dataclasses

    import torch

    import sdlab
    from sdlab.diffusion.samplers import a1111_schedule
    from sdlab.pipeline.generate import generate
    from sdlab.server.a1111 import Img2ImgIn, _request

    request = _request(Img2ImgIn(**body), (), (init,), mask)
    request = dataclasses.replace(request, latent_mask_image=latent_mask,
                                  schedule=a1111_schedule(request.sampler, None))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                     # as the server here (OMP_NUM_THREADS=1): the same sums
    try:
        return generate(sdlab.load().bundle, request).images[0]
    finally:
        torch.set_num_threads(threads)


def test_with_a_mask_blur_each_tile_is_drawn_with_its_latent_mask(client) -> None:
    """Poor man's outpainting with mask_blur 3: each tile is its inpainting (mask blur 6) given A1111's latent
    mask (inset mask_blur // 2, not blurred), which differs from its mask here; drawn without it the picture
    differs. The answer equals the tiles drawn in process with their latent masks, put back together."""
    args = [16, 3, 0, ["left", "right", "up"]]      # 3 tiles to draw
    scripted = _post(client, script_name="Poor man's outpainting", script_args=args)
    answer = picture(scripted["images"][0])
    tiles = poor_mans_tiles(_init(), 16, 3, args[3], (64, 64))
    body = {**BASE, "mask_blur_x": 6, "mask_blur_y": 6, "inpainting_fill": 0, "inpaint_full_res": False}
    drawn = [_drawn_in_process({**body, "seed": BASE["seed"] + k}, tile.image, mask, latent)
             for k, (tile, mask, latent) in enumerate(tiles.work)]
    assert np.array_equal(np.asarray(answer), np.asarray(tiles.combined(drawn)))
    without = _post(client, **body, init_images=[b64_png(tiles.work[0][0].image)], mask=b64_png(tiles.work[0][1]))
    assert not np.array_equal(np.asarray(picture(without["images"][0])), np.asarray(drawn[0]))
    # the first tile's text, byte for byte (its "Mask blur: 6": the latent mask is in no text)
    assert json.loads(scripted["info"])["infotexts"] == json.loads(without["info"])["infotexts"][:1]
