"""A1111 1.10's `alwayson_scripts` on txt2img / img2img (`sdlab.server.alwayson`).

The reference, AUTOMATIC1111/stable-diffusion-webui 1.10, transcribed:

modules/api/api.py `init_script_args`, for each key of `request.alwayson_scripts`:
    alwayson_script = self.get_script(alwayson_script_name, script_runner)
        # -> script_name_to_index: [s.title().lower() for s in runner.scripts].index(name.lower()),
        #    else HTTPException(status_code=422, detail=f"Script '{name}' not found")
    if alwayson_script.alwayson is False:
        raise HTTPException(status_code=422, detail="Cannot have a selectable script in the always on scripts params")
    script_args[alwayson_script.args_from + idx] = request.alwayson_scripts[name]["args"][idx]   # for each idx
then `p.is_api = True` ... `p.script_args = tuple(script_args)` -> `setup_scripts` -> `setup_scrips(p, is_ui=False)`,
which skips `ScriptBuiltinUI` scripts (`setup_for_ui_only = True`): Seed / Sampler / Refiner
(modules/processing_scripts, `def setup(self, p, seed, ...): p.seed = seed ...`) never touch `p` through the API.
"""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from server_fixtures import b64_png, sdlab_server  # noqa: F401  (sdlab_server: a session fixture)

FIELDS = {"prompt": "a red apple", "seed": 7, "steps": 2, "sampler_name": "Euler", "width": 64, "height": 64}
BUILT_IN_ARGS = {        # A1111 1.10's own always-on scripts, with args that would change the picture if applied
    "Seed": {"args": [99, True, 5, 0.5, 32, 48]},
    "sampler": {"args": [4, "DPM++ 2M", "Karras"]},
    "REFINER": {"args": [True, "no_such_model.safetensors", 0.5]},
    "Comments": {}, "Hypertile": {"args": []}, "Extra options": {"args": [1]},
}


@pytest.fixture
def client(sdlab_server):
    with httpx.Client(base_url=sdlab_server.url + "/sdapi/v1", timeout=120) as c:
        yield c


def png_b64(colour: tuple[int, int, int], mode: str = "RGB") -> str:
    return b64_png(Image.new(mode, (64, 64), colour))


def tab_fields(route: str, masked: bool = False) -> dict:
    fields = dict(FIELDS)
    if route == "img2img":
        fields.update(init_images=[png_b64((90, 20, 200))], denoising_strength=0.6)
        if masked:
            fields["mask"] = png_b64((255,), "L")
    return fields


def picture(answer: httpx.Response) -> np.ndarray:
    assert answer.status_code == 200, answer.text
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0]))))


@pytest.mark.parametrize("route", ["txt2img", "img2img"])
def test_a1111s_own_scripts_draw_what_the_request_fields_say(client, route):
    """Seed / Sampler / Refiner args are A1111's web UI's only: the request's fields draw, pixel for pixel."""
    plain = client.post(f"/{route}", json=tab_fields(route))
    scripted = client.post(f"/{route}", json={**tab_fields(route), "alwayson_scripts": BUILT_IN_ARGS})
    assert np.array_equal(picture(scripted), picture(plain))
    info = json.loads(scripted.json()["info"])
    assert (info["seed"], info["sampler_name"], info["subseed_strength"]) == (7, "Euler", 0)
    assert scripted.json()["parameters"]["alwayson_scripts"] == BUILT_IN_ARGS


@pytest.mark.parametrize("route", ["txt2img", "img2img"])
@pytest.mark.parametrize("name", ["ADetailer", "adetailer", "Dynamic Prompts", "Custom code", ""])
def test_a_script_a1111_has_not_loaded_is_its_422(client, route, name):
    """A1111 without the extension (or Custom code without --allow-code) answers `Script '<name>' not found`."""
    answer = client.post(f"/{route}", json={**tab_fields(route), "alwayson_scripts": {
        "Seed": {"args": [1]}, name: {"args": [True]}}})
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"] == f"Script '{name}' not found"


@pytest.mark.parametrize("route, name, detail", [
    ("txt2img", "X/Y/Z plot", "Cannot have a selectable script in the always on scripts params"),
    ("img2img", "prompt matrix", "Cannot have a selectable script in the always on scripts params"),
    ("img2img", "Loopback", "Cannot have a selectable script in the always on scripts params"),
    ("txt2img", "Loopback", "Script 'Loopback' not found"),               # an img2img script
    ("txt2img", "Soft Inpainting", "Script 'Soft Inpainting' not found"),  # its `show` is `is_img2img`-only
])
def test_a_selectable_or_other_tabs_script_is_a1111s_422(client, route, name, detail):
    answer = client.post(f"/{route}", json={**tab_fields(route), "alwayson_scripts": {name: {"args": []}}})
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"] == detail


@pytest.mark.parametrize("script", [None, 5, [1, 2], {"args": 5}, {"args": {"seed": 1}}])
def test_a_script_that_is_not_an_args_object_is_a_422(client, script):
    answer = client.post("/txt2img", json={**FIELDS, "alwayson_scripts": {"Seed": script}})
    assert answer.status_code == 422, answer.text
    assert answer.json()["errors"].startswith('alwayson_scripts.Seed must be an object {"args": [...]}')


def test_soft_inpainting_enabled_on_a_mask_is_refused_and_otherwise_changes_nothing(client):
    """A1111's Soft Inpainting acts only when enabled (`if not enabled: return`) on an inpainting job
    (`processing_uses_inpainting`: a mask); sdlab does not draw it, so that case is a 422."""
    on = {"soft inpainting": {"args": [True, 1, 0.5, 4, 0, 0.5, 2]}}
    answer = client.post("/img2img", json={**tab_fields("img2img", masked=True), "alwayson_scripts": on})
    assert answer.status_code == 422 and "Soft Inpainting is not drawn by sdlab" in answer.json()["errors"]
    off = {"Soft Inpainting": {"args": [False, 1, 0.5]}}
    masked = tab_fields("img2img", masked=True)
    assert np.array_equal(picture(client.post("/img2img", json={**masked, "alwayson_scripts": off})),
                          picture(client.post("/img2img", json=masked)))
    unmasked = tab_fields("img2img")
    assert np.array_equal(picture(client.post("/img2img", json={**unmasked, "alwayson_scripts": on})),
                          picture(client.post("/img2img", json=unmasked)))


def test_the_controlnet_key_is_still_taken_in_any_case(client):
    answer = client.post("/txt2img", json={**FIELDS, "alwayson_scripts": {"ControlNet": {"args": []}}})
    assert answer.status_code == 200, answer.text


@pytest.mark.parametrize("name", ["controlnet", "ControlNet", "Seed", "Extra options"])
def test_a_script_without_args_runs_on_its_defaults(client, name):
    """`init_script_args` copies a script's args only `if "args" in request.alwayson_scripts[name]`: without them
    it runs on its defaults (the ControlNet extension's: no unit enabled), drawing the plain request."""
    answer = client.post("/txt2img", json={**FIELDS, "alwayson_scripts": {name: {}}})
    assert np.array_equal(picture(answer), picture(client.post("/txt2img", json=FIELDS)))
