"""`sdlab serve`'s A1111 API as A1111 1.10 and the sd-webui-controlnet extension answer the clients that use it:
the `infotext` request field, override settings A1111 ignores, an unknown sampler, the extension's detect /
control_types / settings / module_detail routes, its model list and model name matching, and the
`extra_generation_params` of `info`. The session server runs the shipped model."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw

from server_fixtures import b64_png, picture, sdlab_server  # noqa: F401  (sdlab_server: a session fixture)

BASE = {"steps": 3, "width": 64, "height": 64}


@pytest.fixture
def client(sdlab_server):
    with httpx.Client(base_url=sdlab_server.url + "/sdapi/v1", timeout=120) as c:
        yield c


def post(client: httpx.Client, route: str, **fields) -> tuple[dict, dict]:
    answer = client.post(route, json=fields)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    return body, json.loads(body["info"])


def pixels(body: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(body["images"][0]))))


# ---------------------------------------------------------------- the infotext field (A1111 1.10 apply_infotext)

TEXT = ("a dog\nNegative prompt: blurry\nSteps: 3, Sampler: Euler Karras, CFG scale: 5, Seed: 9, Size: 64x64, "
        "Clip skip: 2, RNG: CPU")


def test_infotext_fills_the_txt2img_fields_left_unset_as_a1111s_apply_infotext(client):
    """A1111 1.10 reads the fields a request leaves unset from `infotext` (its txt2img paste fields, the Sampler
    and Seed scripts' fields, the options by their labels); before, sdlab drew with none of it."""
    filled, info = post(client, "/txt2img", infotext=TEXT)
    asked, _ = post(client, "/txt2img", prompt="a dog", negative_prompt="blurry", steps=3, sampler_name="Euler",
                    scheduler="Karras", cfg_scale=5, seed=9, width=64, height=64,
                    override_settings={"CLIP_stop_at_last_layers": 2})
    assert (info["prompt"], info["negative_prompt"], info["steps"], info["cfg_scale"], info["seed"]) == (
        "a dog", "blurry", 3, 5.0, 9)
    assert info["sampler_name"] == "Euler" and info["extra_generation_params"]["Schedule type"] == "Karras"
    assert info["clip_skip"] == 2 and np.array_equal(pixels(filled), pixels(asked))
    assert filled["parameters"]["prompt"] == "a dog" and filled["parameters"]["infotext"] == TEXT


def test_fields_the_request_sets_win_over_its_infotext(client):
    _, info = post(client, "/txt2img", infotext=TEXT, steps=2, seed=4, override_settings={"CLIP_stop_at_last_layers": 1})
    assert (info["steps"], info["seed"], info["clip_skip"], info["prompt"]) == (2, 4, 1, "a dog")


def test_an_infotext_without_rng_draws_a1111s_gpu_noise(client):
    """A1111's parser fills a missing RNG with its default, GPU, which differs from sdlab's option: an override."""
    filled, _ = post(client, "/txt2img", infotext="a dog\nSteps: 3, Sampler: Euler, Seed: 9, Size: 64x64")
    asked, _ = post(client, "/txt2img", prompt="a dog", steps=3, sampler_name="Euler", seed=9, width=64, height=64,
                    override_settings={"randn_source": "GPU"})
    assert np.array_equal(pixels(filled), pixels(asked))


def test_img2img_takes_only_a1111s_script_fields_from_its_infotext(client):
    """A1111 1.10's img2img paste fields name no API field but its scripts' (steps, sampler, seed, ...): the
    prompt stays the request's."""
    init = b64_png(Image.new("RGB", (64, 64), (90, 20, 200)))
    _, info = post(client, "/img2img", init_images=[init], prompt="a cat", infotext=TEXT, width=64, height=64)
    assert (info["prompt"], info["steps"], info["seed"], info["sampler_name"]) == ("a cat", 3, 9, "Euler")


def test_an_infotexts_eta_sets_a1111s_eta_ancestral_option(client):
    """A1111 1.10's `eta_ancestral` option (`infotext='Eta'`, default 1), which its ancestral and SDE samplers draw
    with where the request sets no eta: an Euler a picture drawn at eta 0.5 draws again from its text (before, the
    label was dropped and the text drew at eta 1)."""
    asked, info = post(client, "/txt2img", prompt="a dog", sampler_name="Euler a", seed=9, eta=0.5, **BASE)
    assert "Eta: 0.5" in info["infotexts"][0]
    filled, _ = post(client, "/txt2img", infotext=info["infotexts"][0])
    by_option, _ = post(client, "/txt2img", prompt="a dog", sampler_name="Euler a", seed=9, **BASE,
                        override_settings={"eta_ancestral": 0.5})
    assert np.array_equal(pixels(filled), pixels(asked)) and np.array_equal(pixels(by_option), pixels(asked))
    assert filled["parameters"]["override_settings"]["eta_ancestral"] == 0.5
    assert client.get("/options").json()["eta_ancestral"] == 1.0


@pytest.mark.parametrize("tab", ["txt2img", "img2img"])
def test_an_infotexts_refiner_is_read_as_a1111s_refiner_script(client, tab):
    """A1111 1.10's Refiner script (processing_scripts/refiner.py), whose fields `apply_infotext` reads in txt2img
    and img2img: `PasteField(refiner_checkpoint, lambda d: lookup_checkpoint(d.get('Refiner')),
    api="refiner_checkpoint")`, `PasteField(refiner_switch_at, 'Refiner switch at', api="refiner_switch_at")`, where
    `lookup_checkpoint` is `get_closet_checkpoint_match(title).title` (an alias, else the shortest title holding the
    text, else holding it without its checksum; None: the field stays unset). Before, both were dropped."""
    model = client.get("/sd-models").json()[0]
    fields = {"prompt": "a dog", "width": 64, "height": 64}
    if tab == "img2img":
        fields["init_images"] = [b64_png(Image.new("RGB", (64, 64), (90, 20, 200)))]
    text = "a dog\nSteps: 3, Sampler: Euler, Seed: 9, Size: 64x64, RNG: CPU, Refiner: {}, Refiner switch at: 0.5"
    for written in (f"{model['model_name']} [{model['hash']}]", f"{model['model_name']} [0123456789]"):
        filled, info = post(client, f"/{tab}", infotext=text.format(written), **fields)
        assert (filled["parameters"]["refiner_checkpoint"], filled["parameters"]["refiner_switch_at"]) == (
            model["title"], 0.5)
    asked, _ = post(client, f"/{tab}", steps=3, sampler_name="Euler", seed=9, refiner_checkpoint=model["title"],
                    refiner_switch_at=0.5, **fields)
    assert np.array_equal(pixels(filled), pixels(asked)) and info["infotexts"] == json.loads(asked["info"])["infotexts"]
    unknown, _ = post(client, f"/{tab}", infotext=text.format("juggernautXL_v9 [0123456789]"), **fields)
    assert unknown["parameters"]["refiner_checkpoint"] is None


def test_an_infotext_value_of_the_wrong_type_is_a_422(client):
    answer = client.post("/txt2img", json={"infotext": "a dog\nSteps: many, Sampler: Euler, Seed: 9"})
    assert answer.status_code == 422 and "steps" in answer.json()["detail"]


@pytest.mark.parametrize("labels, status, start", [
    ("Size: 0x0", 400, "infotext Size: width must be"), ("Steps: 0, Size: 64x64", 400, "infotext Steps: steps must"),
    ("Clip skip: 0, Size: 64x64", 422, "infotext Clip skip: override_settings.CLIP_stop_at_last_layers must"),
    ("RNG: bogus, Size: 64x64", 422, "infotext RNG: override_settings.randn_source must"),
    ("Hires upscale: 0, Denoising strength: 0.5, Size: 64x64", 400, "infotext Hires upscale: hr_scale must"),
    ("Sampler: Foo, Size: 64x64", 404, "infotext: unknown sampler 'Foo'"),
])
def test_a_refused_infotext_value_names_the_label_it_came_from(client, labels, status, start):
    """A value the infotext filled and a check refuses answers as if sent (the same status; A1111's detail of an
    unknown sampler, "Sampler not found", which A1111 1.10 would draw as DPM++ 2M), its message naming the label
    it was read from. Before, the messages named fields the client never sent."""
    answer = client.post("/txt2img", json={"infotext": "a dog\nSteps: 2, Seed: 9, Sampler: Euler, " + labels})
    body = answer.json()
    assert answer.status_code == status and body["errors"].startswith(start), body
    assert body["detail"] == ("Sampler not found" if status == 404 else body["errors"])
    sent = client.post("/txt2img", json={"prompt": "a dog", "width": 0, "override_settings": {"randn_source": "x"}})
    assert not sent.json()["errors"].startswith("infotext")


# ---------------------------------------------------------------- override settings A1111 takes without error


def test_an_override_checkpoint_not_in_the_list_draws_with_the_selected_model(client):
    """A1111's `process_images` drops an `sd_model_checkpoint` override it cannot find and draws with the loaded
    model (1.6+); before, sdlab answered 404 "Model not found"."""
    plain, _ = post(client, "/txt2img", prompt="a cat", seed=5, **BASE)
    for restore in (True, False):
        body, info = post(client, "/txt2img", prompt="a cat", seed=5, **BASE,
                          override_settings={"sd_model_checkpoint": "juggernautXL_v9.safetensors"},
                          override_settings_restore_afterwards=restore)
        assert np.array_equal(pixels(body), pixels(plain)) and "juggernaut" not in info["sd_model_name"]
    assert "juggernaut" not in client.get("/options").json()["sd_model_checkpoint"]


@pytest.mark.parametrize("vae", [None, "", "vae-ft-mse.safetensors"])
def test_an_sd_vae_of_no_vae_file_draws_with_the_checkpoints_vae(client, vae):
    """A1111's `resolve_vae` finds no VAE named null, "" or a name of no file ("Couldn't find VAE named ...; using
    None instead") and draws with the checkpoint's own: before, a 400 for null, "" and a name."""
    plain, _ = post(client, "/txt2img", prompt="a cat", seed=5, **BASE)
    body, _ = post(client, "/txt2img", prompt="a cat", seed=5, **BASE, override_settings={"sd_vae": vae})
    assert np.array_equal(pixels(body), pixels(plain))


# ---------------------------------------------------------------- info.extra_generation_params


def test_extra_generation_params_hold_every_a1111_extra_label_of_the_infotext(client):
    """A1111's `Processed.js()` answers `p.extra_generation_params`, which its samplers (`Eta DDIM`, `Sigma
    churn`), the Lora and ControlNet extensions (`Lora hashes`, `ControlNet 0`) fill: every label of the
    picture's text but `create_infotext`'s own fields; before, only the hires and img2img labels."""
    from sdlab.pipeline.png_info import parse_parameters

    _, info = post(client, "/txt2img", prompt="a cat", seed=5, sampler_name="DDIM", eta=0.5, **BASE)
    extra, written = info["extra_generation_params"], parse_parameters(info["infotexts"][0])
    assert extra["Eta DDIM"] == 0.5 and "Steps" not in extra and "RNG" not in extra and "Seed" not in extra
    assert {label for label in written if label not in extra} <= {
        "Prompt", "Negative prompt", "Steps", "Sampler", "CFG scale", "Seed", "Size", "Model hash", "Model", "RNG",
        "Version"}


def test_extra_generation_params_are_a1111s_python_values(client):
    """A1111's `Sampler.initialize` and `process_images` set `extra_generation_params` to the values they draw with
    (`p.extra_generation_params['Sigma churn'] = s_churn`, `['NGMS'] = s_min_uncond`, `['Discard penultimate
    sigma'] = True`, `['Hires prompt'] = self.hr_prompt`, ...), which `Processed.js()` answers as they are: numbers
    and booleans as JSON numbers and booleans, prompts and names as text. Before, the labels the parameters reader
    does not type were text ('0.5', '2', 'True')."""
    _, info = post(client, "/txt2img", prompt="a dog", seed=9, sampler_name="Euler", enable_hr=True, hr_scale=1.5,
                   hr_upscaler="Latent", denoising_strength=0.5, hr_prompt="7", **BASE,
                   override_settings={"s_churn": 0.5, "s_noise": 0.9, "s_min_uncond": 2.0,
                                      "always_discard_next_to_last_sigma": True})
    extra = info["extra_generation_params"]
    assert {label: extra[label] for label in ("Sigma churn", "Sigma noise", "NGMS", "Discard penultimate sigma",
                                              "Hires prompt", "Hires upscaler")} == {
        "Sigma churn": 0.5, "Sigma noise": 0.9, "NGMS": 2.0, "Discard penultimate sigma": True, "Hires prompt": "7",
        "Hires upscaler": "Latent"}
    assert all(isinstance(extra[label], float | int) for label in ("Sigma churn", "Sigma noise", "NGMS"))
    assert extra["Discard penultimate sigma"] is True and extra["Hires prompt"] == "7"


def test_sdlabs_own_labels_are_not_extra_generation_params():
    """Labels sdlab writes of settings A1111 has no label for (its Clip skip SDXL option has no `infotext=`; SDXL's
    second prompts and diffusers' CFG rescale are sdlab's) are not in `extra_generation_params`, which A1111 fills
    with its own labels; before, they were, and a Prompt 2 of "7" read as the integer 7."""
    from types import SimpleNamespace

    from sdlab.server.a1111 import _written_extra_parameters

    text = ("a red apple\nNegative prompt: blurry\nSteps: 4, Sampler: Euler, Schedule type: Automatic, CFG scale: 7, "
            "Seed: 5, Size: 64x64, Clip skip: 2, Clip skip rule: a1111, Clip skip SDXL: True, Prompt 2: 7, "
            "Negative prompt 2: cartoon, CFG rescale: 0.7, NGMS: 2, Version: sdlab 0.1.0")
    assert _written_extra_parameters(SimpleNamespace(infotexts=[text])) == {"Schedule type": "Automatic", "NGMS": 2}


# ---------------------------------------------------------------- the ControlNet extension's routes


@pytest.fixture
def cn(sdlab_server):
    with httpx.Client(base_url=sdlab_server.url + "/controlnet", timeout=120) as c:
        yield c


def test_detect_runs_sdlabs_preprocessors_in_the_extensions_shape(cn):
    """The extension's `POST /controlnet/detect` (scripts/api.py); before, a 404."""
    from sdlab.pipeline.preprocess import preprocess

    image = Image.new("RGB", (64, 48), "black")
    ImageDraw.Draw(image).rectangle([10, 10, 40, 30], outline="white", width=3)
    answer = cn.post("/detect", json={"controlnet_module": "canny", "controlnet_input_images": [b64_png(image)] * 2,
                                      "controlnet_threshold_a": 50, "controlnet_threshold_b": -1})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["info"] == "Success" and len(body["images"]) == 2
    drawn = np.asarray(picture(body["images"][0]))
    assert np.array_equal(drawn, np.asarray(preprocess(image, "canny", 50, resolution=512)))    # unset: the slider's 512
    inverted = cn.post("/detect", json={"controlnet_module": "invert (from white bg & black line)",
                                        "controlnet_input_images": [b64_png(image)]}).json()["images"][0]
    assert np.asarray(picture(inverted))[0, 0].tolist() == [255] * 3


@pytest.mark.parametrize("module, a, b", [
    ("tile_resample", 64, 64), ("threshold", 300, -1), ("canny", 100, 300), ("canny", 0, 0), ("canny", 50, 150),
])
def test_detect_resets_thresholds_outside_their_sliders_as_the_extension(cn, module, a, b):
    """The extension's detect builds a `ControlNetUnit`, whose `bound_check_params` (root_validator) resets a value
    outside its slider, as units do: `if value < cfg.minimum or value > cfg.maximum: values[unit_param] =
    cfg.value`, over the sliders `module_detail` lists. Before, only negative values were reset: webuiapi's
    default threshold 64 gave tile_resample a 1x1 picture, threshold 300 a black one."""
    from sdlab.pipeline.preprocess import preprocess

    sliders = cn.get("/module_list").json()["module_detail"][module]["sliders"][1:]
    checked = [value if slider["min"] <= value <= slider["max"] else slider["value"]
               for value, slider in zip((a, b), sliders)]
    image = Image.new("RGB", (64, 64), "black")
    for i in range(0, 64, 8):
        ImageDraw.Draw(image).line([(i, 0), (63 - i, 63)], fill=(255, 255 - 3 * i, 4 * i), width=2)
    answer = cn.post("/detect", json={"controlnet_module": module, "controlnet_input_images": [b64_png(image)],
                                      "controlnet_threshold_a": a, "controlnet_threshold_b": b})
    assert answer.status_code == 200, answer.text
    drawn = np.asarray(picture(answer.json()["images"][0]))
    assert np.array_equal(drawn, np.asarray(preprocess(image, module, *checked, resolution=512)))


@pytest.mark.parametrize("body, detail", [
    ({"controlnet_module": "depth_midas", "controlnet_input_images": ["x"]}, "Module not available"),
    ({"controlnet_module": "canny", "controlnet_images": ["x"]}, "No image selected"),   # webuiapi 0.9's old key
])
def test_detect_refuses_as_the_extension(cn, body, detail):
    answer = cn.post("/detect", json=body)
    assert answer.status_code == 422 and answer.json()["detail"] == detail


def test_settings_module_detail_and_control_types_have_the_extensions_shapes(cn):
    assert cn.get("/settings").json() == {"control_net_unit_count": 3}
    listed = cn.get("/module_list").json()
    assert listed["module_list"][:3] == ["none", "ip-adapter-auto", "tile_resample"]        # the extension's order
    assert list(listed["module_detail"]) == listed["module_list"]
    assert [s["name"] for s in listed["module_detail"]["canny"]["sliders"]] == [
        "Preprocessor Resolution", "Canny Low Threshold", "Canny High Threshold"]
    assert listed["module_detail"]["tile_resample"]["sliders"][0] is None
    aliased = cn.get("/module_list", params={"alias_names": True}).json()
    assert "invert (from white bg & black line)" in aliased["module_list"] and "invert" not in aliased["module_list"]
    types = cn.get("/control_types").json()["control_types"]
    assert types["Canny"]["module_list"] == ["none", "canny", "invert (from white bg & black line)"]
    assert types["Canny"]["default_option"] == "canny" and types["Depth"]["default_option"] == "none"
    assert types["All"]["default_model"] == "None" and types["All"]["model_list"][0] == "None"


def test_model_list_rescans_unless_asked_not_to(tmp_path):
    """The extension's `model_list(update=True)` rescans the folder; before, sdlab rescanned only with update."""
    from server_fixtures import start_server

    folder = tmp_path / "cn"
    folder.mkdir()
    (folder / "first.safetensors").write_bytes(b"\0" * 4096)
    server = start_server(tmp_path / "out", "--controlnet-dir", str(folder))
    try:
        (folder / "first.safetensors").unlink()
        (folder / "added_later.safetensors").write_bytes(b"\0" * 4096)
        stale = httpx.get(server.url + "/controlnet/model_list", params={"update": False}).json()["model_list"]
        fresh = httpx.get(server.url + "/controlnet/model_list").json()["model_list"]
        assert [t.split(" [")[0] for t in stale] == ["first"]
        assert [t.split(" [")[0] for t in fresh] == ["added_later"]
    finally:
        server.stop()
