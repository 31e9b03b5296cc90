"""`sdlab serve`'s A1111 API where it follows A1111 in the small things clients read: old sampler names with
any scheduler, the routes A1111 clients call besides txt2img, the `info` JSON of a hires job, options a
request leaves in place, drawn subseeds, png-info's defaults, the eta label, the Extras defaults and the
error messages and answers of the control routes. The session server runs the shipped model."""

from __future__ import annotations

import base64
import dataclasses
import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from server_fixtures import b64_png, sdlab_server  # noqa: F401  (sdlab_server: a session fixture)
from sdlab.server.inputs import BadRequest, sampler_and_schedule


@pytest.fixture
def client(sdlab_server):
    with httpx.Client(base_url=sdlab_server.url + "/sdapi/v1", timeout=120) as c:
        yield c


def txt2img(client: httpx.Client, **fields) -> tuple[dict, dict]:
    answer = client.post("/txt2img", json={"prompt": "a cat", "steps": 2, "seed": 3, **fields})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    return body, json.loads(body["info"])


# ---------------------------------------------------------------- 1. old sampler names with any scheduler


@pytest.mark.parametrize("name, split", [
    ("DPM++ 2M Karras", ("DPM++ 2M", "karras")),
    ("Euler SGM Uniform", ("Euler", "sgm_uniform")),        # the longest suffix, not "Uniform"
    ("Euler a sgm_uniform", ("Euler a", "sgm_uniform")),
    ("euler a simple", ("Euler a", "simple")),              # any case
    ("DPM++ 2M Uniform", ("DPM++ 2M", "uniform")),
    ("Euler Normal", ("Euler", "normal")),
    ("DPM++ 2M DDIM", ("DPM++ 2M", "ddim_uniform")),
    ("Euler SGMUniform", ("Euler", "sgm_uniform")),         # A1111's alias
    ("DPM++ 2M SDE Exponential", ("DPM++ 2M SDE", "exponential")),
    ("DPM++ 2M SDE", ("DPM++ 2M SDE", None)),               # a sampler's own name is never split
    ("Euler a Beta", ("Euler a", "a1111_beta")),            # A1111's Beta and KL Optimal, not ComfyUI's
    ("Euler kl_optimal", ("Euler", "a1111_kl_optimal")),
])
def test_old_sampler_names_take_any_a1111_scheduler(name, split):
    assert sampler_and_schedule(name, None) == split


def test_an_explicit_scheduler_wins_over_the_names_suffix():
    assert sampler_and_schedule("Euler SGM Uniform", "karras") == ("Euler", "karras")
    assert sampler_and_schedule("Euler Karras", "Automatic") == ("Euler", None)    # A1111 keeps "Automatic" too
    with pytest.raises(BadRequest) as err:
        sampler_and_schedule("Nope SGM Uniform", None)
    assert err.value.status == 404 and err.value.detail == "Sampler not found"


@pytest.mark.parametrize("scheduler, schedule", [
    ("beta", "a1111_beta"), ("Beta", "a1111_beta"), ("kl_optimal", "a1111_kl_optimal"),
    ("KL Optimal", "a1111_kl_optimal"), ("sgm_uniform", "sgm_uniform"), ("linear_quadratic", "linear_quadratic"),
])
def test_the_scheduler_field_takes_a1111s_keys_as_a1111s_schedules(scheduler, schedule):
    """A1111's API key "beta" is its Beta (linear in sigma), not ComfyUI's beta that sdlab's own name is."""
    assert sampler_and_schedule("Euler", scheduler) == ("Euler", schedule)


def test_a_suffixed_sampler_draws_as_sampler_and_scheduler(client):
    joined, info = txt2img(client, sampler_name="Euler a SGM Uniform")
    split, _ = txt2img(client, sampler_name="Euler a", scheduler="sgm_uniform")
    assert joined["images"] == split["images"]
    assert info["sampler_name"] == "Euler a" and info["extra_generation_params"]["Schedule type"] == "SGM Uniform"


def _native_job(base: str, **fields) -> dict:
    """A job of the native API (/api/jobs) with `fields`, finished."""
    from test_server_http import wait

    with httpx.Client(base_url=base, timeout=120) as native:
        created = native.post("/api/jobs", json={"prompt": "a cat", **fields})
        assert created.status_code == 202, created.text
        job = wait(native, created.json()["id"])
        assert job["status"] == "done", job
        return {**job, "picture": np.asarray(Image.open(io.BytesIO(native.get(job["images"][0]).content)))}


def _picture(answer: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["images"][0]))))


@pytest.mark.parametrize("sampler", ["euler_ancestral_cfg_pp", "euler_ancestral", "dpmpp_2s_ancestral_cfg_pp"])
def test_a_comfyui_spelling_brings_comfyuis_conventions_as_on_the_native_api(client, sdlab_server, sampler):
    """One rule on every route: a sampler spelt as ComfyUI spells it draws under ComfyUI's conventions (ENSD 1,
    its initial noise; img2img: its denoise steps), whether or not it has an A1111 / Forge twin
    (`euler_ancestral_cfg_pp`: "Euler a CFG++"); the A1111 API's picture is the native API's. Before, a name
    with a twin was swapped for it first and drew under A1111's (max 157 / 255 off)."""
    fields = {"steps": 4, "seed": 3, "width": 64, "height": 64, "cfg_scale": 4}
    answer, info = txt2img(client, sampler_name=sampler, scheduler="karras", **fields)
    job = _native_job(sdlab_server.url, sampler=sampler, schedule="karras", **fields)
    assert np.array_equal(_picture(answer), job["picture"])
    assert "ENSD: 1, " in info["infotexts"][0] and "Initial noise: comfyui" in info["infotexts"][0]

    init = png_b64((64, 64), (90, 20, 200))
    answer = client.post("/img2img", json={"prompt": "a cat", "sampler_name": sampler, "scheduler": "karras",
                                           "denoising_strength": 0.5, "init_images": [init], **fields})
    assert answer.status_code == 200, answer.text
    job = _native_job(sdlab_server.url, mode="img2img", sampler=sampler, schedule="karras", strength=0.5,
                      init_image=init, **fields)
    assert job["request"]["img2img_convention"] == "comfyui" and np.array_equal(_picture(answer.json()), job["picture"])


# ---------------------------------------------------------------- 2. A1111's other routes


def png_b64(size: tuple[int, int], colour: tuple[int, int, int]) -> str:
    return b64_png(Image.new("RGB", size, colour))


@pytest.mark.parametrize("route", ["prompt-styles", "face-restorers", "hypernetworks", "realesrgan-models",
                                   "extensions"])                   # realesrgan-models: no R-ESRGAN file here
def test_lists_of_what_sdlab_has_none_of_are_empty(client, route):
    answer = client.get("/" + route)
    assert answer.status_code == 200 and answer.json() == []


def test_cmd_flags_and_memory_have_a1111s_shapes(client, sdlab_server):
    flags = client.get("/cmd-flags").json()
    assert flags["max_batch"] == 8 and flags["max_queue"] == 4 and flags["device"] == "cpu"
    assert flags["max_images"] == 100
    assert flags["output_dir"] == str(sdlab_server.output_dir) and flags["models_dir"] is None
    assert not {"auth", "basic_auth", "token"} & flags.keys()
    memory = client.get("/memory").json()
    ram = memory["ram"]
    assert 0 < ram["used"] < ram["total"] and ram["free"] == ram["total"] - ram["used"]
    assert memory["cuda"] == {"error": "unavailable"}          # A1111's answer off CUDA


def test_interrogate_says_sdlab_has_no_interrogator(client):
    answer = client.post("/interrogate", json={"image": png_b64((8, 8), (1, 2, 3)), "model": "clip"})
    assert answer.status_code == 501
    assert answer.json()["detail"] == "sdlab has no interrogator" and "interrogat" in answer.json()["errors"]


def test_extra_batch_images_upscales_each_as_extra_single_image(client):
    pictures = [png_b64((16, 8), (200, 10, 10)), png_b64((8, 8), (10, 200, 10))]
    fields = {"upscaler_1": "Lanczos", "upscaling_resize": 2}
    batch = client.post("/extra-batch-images", json={**fields, "imageList": [{"data": p, "name": f"{i}.png"}
                                                                             for i, p in enumerate(pictures)]})
    assert batch.status_code == 200, batch.text
    singles = [client.post("/extra-single-image", json={**fields, "image": p}).json()["image"] for p in pictures]
    assert batch.json()["images"] == singles
    sizes = [Image.open(io.BytesIO(base64.b64decode(b))).size for b in batch.json()["images"]]
    assert sizes == [(32, 16), (16, 16)] and "Lanczos" in batch.json()["html_info"]
    bad = client.post("/extra-batch-images", json={**fields, "imageList": [{"data": "not base64!", "name": "x"}]})
    assert bad.status_code == 400 and "imageList[0].data" in bad.json()["errors"]


def test_refresh_embeddings_unload_and_reload_checkpoint(tmp_path):
    import torch

    from server_fixtures import start_server
    from sdlab.api import shipped_model_path
    from sdlab.checkpoints.load import load_bundle

    folder = tmp_path / "embeddings"
    folder.mkdir()
    server = start_server(tmp_path / "served", "--embeddings-dir", str(folder))
    try:
        with httpx.Client(base_url=server.url + "/sdapi/v1", timeout=120) as api:
            assert api.post("/reload-checkpoint").json() == {}
            assert api.get("/embeddings").json() == {"loaded": {}, "skipped": {}}
            width = load_bundle(shipped_model_path()).text_encoders[0].config.width
            torch.save({"string_to_param": {"*": torch.zeros(2, width)}, "name": "zqstyle"}, folder / "zqstyle.pt")
            assert list(api.get("/embeddings").json()["loaded"]) == ["zqstyle"]     # the folder as it is now
            refreshed = api.post("/refresh-embeddings")
            assert refreshed.status_code == 200 and refreshed.json() is None
            assert list(api.get("/embeddings").json()["loaded"]) == ["zqstyle"]
            assert api.post("/refresh-vae").status_code == 200
            assert api.post("/unload-checkpoint").json() == {}
            assert api.get("/embeddings").json()["loaded"] == {}          # no model held
            _, info = txt2img(api, prompt="a zqstyle cat")                # the next job loads it again
            assert "TI hashes: " in info["infotexts"][0]
    finally:
        server.stop()


def test_an_embedding_file_added_replaced_or_removed_counts_from_the_next_job(tmp_path):
    """As A1111 reads its embeddings folder again before a generation when it changed, a file added while the
    server runs draws the picture of a server started with it there; replaced, its new vectors draw (its new
    TI hash recorded); removed, its word is plain text again. No model reload, no refresh-embeddings."""
    import torch

    from server_fixtures import picture, start_server
    from sdlab.api import shipped_model_path
    from sdlab.checkpoints.load import load_bundle
    from sdlab.pipeline.png_info import embedding_hash

    folder = tmp_path / "embeddings"
    folder.mkdir()
    width = load_bundle(shipped_model_path()).text_encoders[0].config.width
    vectors = [torch.randn(n, width, generator=torch.Generator().manual_seed(n)) for n in (2, 3)]

    def write(index: int) -> None:
        torch.save({"string_to_param": {"*": vectors[index]}, "name": "zqstyle"}, folder / "zqstyle.pt")

    def draw(api: httpx.Client) -> tuple[np.ndarray, str]:
        body, info = txt2img(api, prompt="a zqstyle cat", steps=3, width=64, height=64)
        return np.asarray(picture(body["images"][0])), info["infotexts"][0]

    drawn = []
    server = start_server(tmp_path / "served", "--embeddings-dir", str(folder))
    try:
        with httpx.Client(base_url=server.url + "/sdapi/v1", timeout=120) as api:
            drawn.append(draw(api))                                     # the model loads: no embeddings
            for change in (lambda: write(0), lambda: write(1), lambda: (folder / "zqstyle.pt").unlink()):
                change()
                listed = api.get("/embeddings").json()["loaded"]
                drawn.append(draw(api))
                assert listed == ({"zqstyle": listed["zqstyle"]} if (folder / "zqstyle.pt").exists() else {})
                if listed:
                    assert listed["zqstyle"]["vectors"] == len(vectors[len(drawn) - 2])
                    assert f"zqstyle: {embedding_hash(folder / 'zqstyle.pt')}" in drawn[-1][1]
    finally:
        server.stop()
    write(0)
    started_with_it = start_server(tmp_path / "served-2", "--embeddings-dir", str(folder))
    try:
        with httpx.Client(base_url=started_with_it.url + "/sdapi/v1", timeout=120) as api:
            reference = draw(api)
    finally:
        started_with_it.stop()
    (empty, _), (added, _), (replaced, _), (removed, removed_info) = drawn
    assert np.array_equal(added, reference[0])
    assert not np.array_equal(replaced, added) and not np.array_equal(added, empty)
    assert np.array_equal(removed, empty) and "TI hashes" not in removed_info


# ---------------------------------------------------------------- 3. the info JSON of a hires job


@pytest.mark.parametrize("hires, labels", [
    ({"hr_scale": 2, "hr_second_pass_steps": 2, "hr_upscaler": "Latent (nearest-exact)"},
     {"Hires upscale": 2.0, "Hires steps": 2, "Hires upscaler": "Latent (nearest-exact)"}),
    ({"hr_resize_x": 96, "hr_upscaler": "Lanczos"}, {"Hires resize": "96x0", "Hires upscaler": "Lanczos"}),
])
def test_info_carries_the_hires_labels_of_the_infotext(client, hires, labels):
    """A1111 puts the hires labels into `p.extra_generation_params` (`Processed.js()`), beside the
    denoising strength of the second pass."""
    from sdlab.pipeline.png_info import parse_parameters

    _, info = txt2img(client, enable_hr=True, denoising_strength=0.5, styles=["ink", "noir"], **hires)
    extra = info["extra_generation_params"]
    assert extra == {"Schedule type": "Uniform", "Denoising strength": 0.5, **labels}
    written = parse_parameters(info["infotexts"][0])
    assert {label: written[label] for label in extra} == extra
    assert info["denoising_strength"] == 0.5 and info["styles"] == ["ink", "noir"]
    _, plain = txt2img(client)
    assert plain["extra_generation_params"] == {"Schedule type": "Uniform"} and plain["denoising_strength"] == 0.75
    assert plain["styles"] == []


@pytest.mark.parametrize("sent, answered", [({}, 0.75), ({"denoising_strength": 0.3}, 0.3),
                                            ({"denoising_strength": None}, None)])
def test_a_plain_txt2img_answers_the_requests_denoising_strength_as_a1111(client, sent, answered):
    """A1111 1.10's `Processed.denoising_strength` is `getattr(p, 'denoising_strength', None)` and txt2img's p keeps
    the request's (`StableDiffusionProcessingTxt2Img.denoising_strength: float = 0.75`) with or without the hires
    fix; only the hires fix writes it into the pictures. Before, sdlab answered null without the hires fix."""
    _, info = txt2img(client, **sent)
    assert info["denoising_strength"] == answered and "Denoising strength" not in info["infotexts"][0]


# ---------------------------------------------------------------- 4. override_settings_restore_afterwards


def test_overrides_stay_when_the_request_says_not_to_restore_them(tmp_path):
    """A1111's `process_images` restores the overridden options only `if p.override_settings_restore_afterwards`:
    with false, the model, clip skip and ENSD stay for later requests and `GET options` shows them."""
    import shutil

    from server_fixtures import start_server
    from sdlab.api import shipped_model_path

    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(shipped_model_path(), models / "plain.safetensors")      # a second model to switch to
    server = start_server(tmp_path / "served", "--models-dir", str(models))
    try:
        with httpx.Client(base_url=server.url + "/sdapi/v1", timeout=120) as api:
            startup = api.get("/options").json()["sd_model_checkpoint"]
            overrides = {"sd_model_checkpoint": "plain", "CLIP_stop_at_last_layers": 2, "eta_noise_seed_delta": 31337}
            _, info = txt2img(api, sampler_name="Euler a", override_settings=overrides,
                              override_settings_restore_afterwards=False)
            assert info["sd_model_name"] == "plain" and "Clip skip: 2" in info["infotexts"][0]
            options = api.get("/options").json()
            assert options["sd_model_checkpoint"].startswith("plain.safetensors [") and options["sd_model_checkpoint"] != startup
            assert (options["CLIP_stop_at_last_layers"], options["eta_noise_seed_delta"]) == (2, 31337)
            _, later = txt2img(api, sampler_name="Euler a")
            assert later["sd_model_name"] == "plain" and "Clip skip: 2, " in later["infotexts"][0]
            assert "ENSD: 31337" in later["infotexts"][0]
            _, restored = txt2img(api, override_settings={"CLIP_stop_at_last_layers": 3})
            assert "Clip skip: 3" in restored["infotexts"][0]
            assert api.get("/options").json()["CLIP_stop_at_last_layers"] == 2       # restored: the default
            refused = api.post("/txt2img", json={"prompt": "x", "override_settings": {"CLIP_stop_at_last_layers": 0},
                                                 "override_settings_restore_afterwards": False})
            assert refused.status_code == 422 and api.get("/options").json()["CLIP_stop_at_last_layers"] == 2
    finally:
        server.stop()


# ---------------------------------------------------------------- 5. the subseed is drawn


def test_info_subseed_is_drawn_for_minus_one_as_a1111s_get_fixed_seed(client):
    """A1111 `process_images_inner`: subseed = get_fixed_seed(p.subseed) and all_subseeds = subseed + i,
    whatever subseed_strength is; never -1."""
    _, info = txt2img(client, batch_size=2, subseed=-1)
    assert info["subseed"] >= 0 and info["all_subseeds"] == [info["subseed"], info["subseed"] + 1]
    _, kept = txt2img(client, batch_size=2, subseed=40)
    assert kept["all_subseeds"] == [40, 41]
    _, varied = txt2img(client, batch_size=2, subseed=-1, subseed_strength=0.5)
    assert varied["subseed"] >= 0 and f"Variation seed: {varied['subseed']}," in varied["infotexts"][0]


# ---------------------------------------------------------------- 6. png-info's defaults


def a1111_defaults(res: dict) -> dict:
    """The defaults A1111 1.10's `infotext_utils.parse_generation_parameters` fills in, transcribed (its
    emphasis test reduced to whether a bracket weighs a word)."""
    res = dict(res)
    res.setdefault("Clip skip", "1")
    if "Hires resize-1" not in res:
        res["Hires resize-1"] = 0
        res["Hires resize-2"] = 0
    for key, value in (("Hires sampler", "Use same sampler"), ("Hires schedule type", "Use same scheduler"),
                       ("Hires checkpoint", "Use same checkpoint"), ("Hires prompt", ""),
                       ("Hires negative prompt", ""), ("Mask mode", "Inpaint masked"), ("Masked content", "original"),
                       ("Inpaint area", "Whole picture"), ("Masked area padding", 32), ("RNG", "GPU"),
                       ("Schedule type", "Automatic"), ("Schedule max sigma", 0), ("Schedule min sigma", 0),
                       ("Schedule rho", 0), ("VAE Encoder", "Full"), ("VAE Decoder", "Full"), ("FP8 weight", "Disable")):
        res.setdefault(key, value)
    if "Cache FP16 weight for LoRA" not in res and res["FP8 weight"] != "Disable":
        res["Cache FP16 weight for LoRA"] = False
    if "Emphasis" not in res and any(c in res["Prompt"] + res["Negative prompt"] for c in "()[]"):
        res["Emphasis"] = "Original"
    res.setdefault("Refiner switch by sampling steps", False)
    return res


@pytest.mark.parametrize("text", [
    "a cat\nNegative prompt: ugly\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 9, "
    "Size: 512x768, Denoising strength: 0.5, Hires upscale: 2, Hires upscaler: Latent, Version: v1.10.1",
    "a (cat:1.2)\nNegative prompt: [ugly]\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 9, Size: 64x64, "
    "FP8 weight: Enable for SDXL, Mask mode: Inpaint not masked, Masked area padding: 8",
    "a cat BREAK a dog\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 9, Size: 64x64",
])
def test_png_info_fills_in_a1111s_defaults(client, text):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG", pnginfo=info)
    answer = client.post("/png-info", json={"image": base64.b64encode(buffer.getvalue()).decode()}).json()
    parameters = answer["parameters"]
    labels = {"Prompt", "Negative prompt"} | {item.split(":")[0] for item in text.splitlines()[-1].split(", ")}
    written = {key: value for key, value in parameters.items() if key in labels or key[:-2] in labels}   # Size-1
    assert parameters == a1111_defaults(written)


# ---------------------------------------------------------------- 7. the eta label


@pytest.mark.parametrize("sampler, eta, label", [
    ("Euler", 1.0, None), ("DPM++ 2M", 1.0, None), ("LMS", 1.0, None), ("Heun", 1.0, None),   # take no eta
    ("Euler a", 1.0, None), ("DPM++ SDE", 1.0, None),            # k-diffusion's default, 1
    ("Euler a", 0.5, "Eta"), ("DPM++ 2M SDE", 0.0, "Eta"),
    ("DDIM", 0.0, None), ("DDIM", 1.0, "Eta DDIM"), ("Ddim", 0.3, "Eta DDIM"),
    ("ddim", 0.3, None),                                         # ComfyUI's ddim: Euler, which takes no eta
    ("PLMS", 0.5, None), ("UniPC", 0.5, None),                   # A1111's plms / unipc take no eta
])
def test_the_eta_label_is_a1111s(sampler, eta, label):
    """A1111's `Sampler.initialize`: `if 'eta' in inspect.signature(self.func).parameters: if self.eta !=
    self.eta_default: p.extra_generation_params[self.eta_infotext_field] = self.eta`, the field "Eta"
    (default 1.0) for k-diffusion samplers and "Eta DDIM" (default 0.0) for its timestep samplers."""
    from sdlab.pipeline.infotext import to_parameters
    from sdlab.pipeline.request import GenerationRequest

    request = GenerationRequest("x", sampler=sampler, eta=eta, seed=1, steps=2, width=64, height=64, cfg_scale=5)
    written = {key: value for key, value in to_parameters(request).items() if key.startswith("Eta") and value is not None}
    assert written == ({} if label is None else {label: eta})


@pytest.mark.parametrize("sampler, eta, options, drawn", [
    ("DDIM", None, {"eta_ddim": 0.5}, 0.5), ("DDIM", 0.2, {"eta_ddim": 0.5}, 0.2),     # the request's first
    ("DDIM", None, {}, None), ("Euler a", None, {"eta_ddim": 0.5}, None), ("ddim", None, {"eta_ddim": 0.5}, None),
])
def test_ddims_eta_is_a1111s_eta_ddim_option(sampler, eta, options, drawn):
    """A1111's `Sampler.initialize`: `self.eta = p.eta if p.eta is not None else getattr(opts, self.eta_option_field,
    0.0)`, the field `eta_ddim` (default 0) for its timestep samplers, of which only DDIM takes an eta."""
    from sdlab.server.a1111 import OPTION_DEFAULTS, Txt2ImgIn, _request

    assert OPTION_DEFAULTS["eta_ddim"] == 0.0
    body = Txt2ImgIn(prompt="x", sampler_name=sampler, eta=eta, override_settings=options)
    assert _request(body).eta == drawn
    assert _request(Txt2ImgIn(prompt="x", sampler_name=sampler, eta=eta), options=options).eta == drawn
    with pytest.raises(BadRequest, match="eta_ddim"):
        _request(Txt2ImgIn(prompt="x", sampler_name=sampler, override_settings={"eta_ddim": "high"}))


@pytest.mark.parametrize("sampler, eta, options, drawn", [
    ("Euler a", None, {"eta_ancestral": 0.5}, 0.5), ("DPM++ 2M SDE", None, {"eta_ancestral": 0.0}, 0.0),
    ("DPM fast", None, {"eta_ancestral": 0.3}, 0.3), ("DPM2 a", 0.2, {"eta_ancestral": 0.5}, 0.2),
    ("Euler a", None, {}, None), ("Euler a", None, {"eta_ancestral": 1.0}, None),     # the default: the sampler's
    ("Euler", None, {"eta_ancestral": 0.5}, None), ("DDIM", None, {"eta_ancestral": 0.5}, None),
    ("DDIM", None, {"eta_ancestral": 0.5, "eta_ddim": 0.2}, 0.2),
])
def test_ancestral_and_sde_samplers_eta_is_a1111s_eta_ancestral_option(sampler, eta, options, drawn):
    """A1111 1.10's `Sampler.__init__` (sd_samplers_common.py): `self.eta_option_field = 'eta_ancestral'`,
    `self.eta_infotext_field = 'Eta'`, `self.eta_default = 1.0` for k-diffusion's samplers (the timestep ones set
    `eta_ddim`), read by `initialize` where the request sets no eta, for a function that takes one. Before, the
    option was stored and ignored: every such sampler drew at 1."""
    from sdlab.server.a1111 import OPTION_DEFAULTS, Txt2ImgIn, _request

    assert OPTION_DEFAULTS["eta_ancestral"] == 1.0
    assert _request(Txt2ImgIn(prompt="x", sampler_name=sampler, eta=eta, override_settings=options)).eta == drawn
    assert _request(Txt2ImgIn(prompt="x", sampler_name=sampler, eta=eta), options=options).eta == drawn
    with pytest.raises(BadRequest, match="eta_ancestral"):
        _request(Txt2ImgIn(prompt="x", sampler_name=sampler, override_settings={"eta_ancestral": -1}))


@pytest.mark.parametrize("sampler, eta, label", [("DDIM", 1.0, "Eta DDIM"), ("Euler a", 0.5, "Eta")])
def test_pictures_with_either_eta_label_draw_again_from_png(tmp_path, capsys, client, sampler, eta, label):
    from cli_helpers import pixels, run
    from sdlab.pipeline.png_info import read_parameters

    first, again = tmp_path / "first.png", tmp_path / "again.png"
    code, _, err = run(["txt2img", "a cat", "--sampler", sampler, "--eta", str(eta), "--steps", "3", "--seed", "5",
                        "--out", str(first), "--no-progress"], capsys)
    assert code == 0, err
    text = read_parameters(first)
    assert f", {label}: {eta:g}," in text
    code, _, err = run(["txt2img", "--from-png", str(first), "--out", str(again), "--no-progress"], capsys)
    assert code == 0, err
    assert (pixels(first) == pixels(again)).all() and read_parameters(again) == text
    shown = client.post("/png-info", json={"image": base64.b64encode(first.read_bytes()).decode()}).json()
    assert shown["parameters"][label] == eta


# ---------------------------------------------------------------- 8. the Extras defaults


def test_extras_take_a1111s_defaults_and_resize_modes(client):
    """A1111's `ExtrasBaseRequest`: `resize_mode: Literal[0, 1] = 0`, `upscaling_resize_w` / `_h` 512."""
    picture = png_b64((64, 32), (90, 20, 200))
    answer = client.post("/extra-single-image", json={"image": picture, "upscaler_1": "Lanczos", "resize_mode": 1})
    assert answer.status_code == 200, answer.text
    assert Image.open(io.BytesIO(base64.b64decode(answer.json()["image"]))).size == (512, 512)   # cropped to it
    for mode in (2, 3, -1):
        refused = client.post("/extra-single-image", json={"image": picture, "upscaler_1": "Lanczos", "resize_mode": mode})
        assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["body", "resize_mode"]


# ---------------------------------------------------------------- 8b. samples_format


def a1111_encode_pil_to_base64(image: Image.Image, samples_format: str, jpeg_quality: int) -> Image.Image:
    """A1111's `api.encode_pil_to_base64` (its JPEG / WebP branch, without piexif's EXIF), decoded again."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG" if samples_format.lower() in ("jpg", "jpeg") else "WEBP", quality=jpeg_quality)
    return Image.open(buffer)


def test_samples_format_sets_the_base64_pictures_format_as_a1111s_encode_pil_to_base64(client):
    """A1111 answers every picture in `opts.samples_format` (jpg / jpeg / webp at `opts.jpeg_quality`, the
    parameters in the EXIF UserComment; png with its text chunk), read after the request's own overrides
    are restored, as its txt2img encodes once `process_images` has restored them."""
    from sdlab.pipeline.png_info import read_parameters

    png, _ = txt2img(client, seed=11)
    drawn = Image.open(io.BytesIO(base64.b64decode(png["images"][0])))
    try:
        for samples_format, quality, magic in (("jpg", 80, b"\xff\xd8"), ("WEBP", 60, b"RIFF")):
            assert client.post("/options", json={"samples_format": samples_format, "jpeg_quality": quality}).status_code == 200
            assert client.get("/options").json()["samples_format"] == samples_format
            body, info = txt2img(client, seed=11)
            raw = base64.b64decode(body["images"][0])
            assert raw.startswith(magic) and read_parameters(io.BytesIO(raw)) == info["infotexts"][0]
            expected = a1111_encode_pil_to_base64(drawn.convert("RGB"), samples_format, quality)
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(raw))), np.asarray(expected))
            extras = client.post("/extra-single-image", json={"image": png["images"][0]}).json()["image"]
            assert base64.b64decode(extras).startswith(magic)
        overridden, _ = txt2img(client, seed=11, override_settings={"samples_format": "png"})
        assert base64.b64decode(overridden["images"][0]).startswith(b"RIFF")        # restored before encoding
        kept, _ = txt2img(client, seed=11, override_settings={"samples_format": "png"},
                          override_settings_restore_afterwards=False)
        assert kept["images"] == png["images"] and client.get("/options").json()["samples_format"] == "png"
        for body in ({"samples_format": "gif"}, {"samples_format": 3}, {"jpeg_quality": 0}):
            refused = client.post("/options", json=body)
            assert refused.status_code == 422 and next(iter(body)) in refused.json()["errors"]
            refused = client.post("/txt2img", json={"prompt": "x", "override_settings": body})
            assert refused.status_code == 422 and f"override_settings.{next(iter(body))}" in refused.json()["errors"]
        assert client.get("/options").json()["samples_format"] == "png"
    finally:
        client.post("/options", json={"samples_format": "png", "jpeg_quality": 80})


def test_a_jpeg_whose_parameters_overflow_its_exif_is_answered_without_them(client, caplog):
    """Prompts within sdlab's limits can make a parameters text past a JPEG's 64 KiB EXIF block (A1111's
    encode_pil_to_base64 fails there: "EXIF data is too long"). The job ran and was stored, so its pictures are
    answered, as JPEGs without the text (a logged warning); the PNG in images/ keeps the text."""
    from sdlab.pipeline.png_info import read_parameters
    from sdlab.server.a1111 import _base64_picture

    prompts = {"prompt": "photograph " * 1800, "negative_prompt": "landscape " * 1900}
    try:
        assert client.post("/options", json={"samples_format": "jpg"}).status_code == 200
        body, info = txt2img(client, steps=1, **prompts)
    finally:
        client.post("/options", json={"samples_format": "png"})
    raw = base64.b64decode(body["images"][0])
    assert raw.startswith(b"\xff\xd8") and read_parameters(io.BytesIO(raw)) is None
    assert len(info["infotexts"][0]) > 32_500 and info["infotexts"][0].startswith("photograph")
    with caplog.at_level("WARNING", logger="sdlab.server"):
        answer = _base64_picture(Image.new("RGB", (8, 8)), info["infotexts"][0], {"samples_format": "jpg",
                                                                                   "jpeg_quality": 80})
    assert base64.b64decode(answer).startswith(b"\xff\xd8") and "does not fit a JPEG's 64 KiB EXIF" in caplog.text


# ---------------------------------------------------------------- 8c. the parameters echo


@dataclasses.dataclass
class A1111Processing:                  # modules/processing.py StableDiffusionProcessing (1.10), its init fields
    sd_model: object = None
    outpath_samples: str = None
    outpath_grids: str = None
    prompt: str = ""
    prompt_for_display: str = None
    negative_prompt: str = ""
    styles: list = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    seed_enable_extras: bool = True
    sampler_name: str = None
    scheduler: str = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: bool = None
    tiling: bool = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    extra_generation_params: dict = None
    overlay_images: list = None
    eta: float = None
    do_not_reload_embeddings: bool = False
    denoising_strength: float = None
    ddim_discretize: str = None
    s_min_uncond: float = None
    s_churn: float = None
    s_tmax: float = None
    s_tmin: float = None
    s_noise: float = None
    override_settings: dict = None
    override_settings_restore_afterwards: bool = True
    sampler_index: int = None
    refiner_checkpoint: str = None
    refiner_switch_at: float = None
    disable_extra_networks: bool = False
    firstpass_image: object = None
    comments: dict = None


@dataclasses.dataclass
class A1111Img2Img(A1111Processing):     # StableDiffusionProcessingImg2Img
    init_images: list = None
    resize_mode: int = 0
    denoising_strength: float = 0.75
    image_cfg_scale: float = None
    mask: object = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int = None                # a property in A1111: the API model's default is None
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float = None
    latent_mask: object = None
    force_task_id: str = None


A1111_API_NOT_ALLOWED = ["self", "kwargs", "sd_model", "outpath_samples", "outpath_grids", "sampler_index",
                         "extra_generation_params", "overlay_images", "do_not_reload_embeddings", "seed_enable_extras",
                         "prompt_for_display", "sampler_noise_scheduler_override", "ddim_discretize"]
A1111_IMG2IMG_ADDED = {"sampler_index": "Euler", "init_images": None, "denoising_strength": 0.75, "mask": None,
                       "include_init_images": False, "script_name": None, "script_args": [], "send_images": True,
                       "save_images": False, "alwayson_scripts": {}, "force_task_id": None, "infotext": None}


def a1111_img2img_request_defaults() -> dict:
    """modules/api/models.py `PydanticModelGenerator` of StableDiffusionImg2ImgProcessingAPI: the processing
    class's __init__ arguments but the API_NOT_ALLOWED, then the added fields, with their defaults."""
    import inspect

    fields = {name: p.default for name, p in inspect.signature(A1111Img2Img.__init__).parameters.items()
              if name not in A1111_API_NOT_ALLOWED}
    return {**fields, **A1111_IMG2IMG_ADDED}


def test_parameters_echo_a1111s_whole_request_model(client):
    """A1111 answers `parameters=vars(img2imgreq)`: every field of its request model, as sent (null too) or
    at its default (sampler_index "Euler", steps 50, cfg_scale 7.0, width 512, ...), none it lacks."""
    sent = {"prompt": "a cat", "steps": 2, "seed": 3, "sampler_name": "Euler a", "cfg_scale": None, "tiling": False,
            "restore_faces": False, "enable_hr": True, "not_a1111s": 1, "init_images": [png_b64((64, 64), (9, 9, 9))]}
    answer = client.post("/img2img", json=sent)
    assert answer.status_code == 200, answer.text
    a1111s = {key: value for key, value in sent.items() if key not in ("enable_hr", "not_a1111s")}
    expected = {**a1111_img2img_request_defaults(), **a1111s, "init_images": None}     # not include_init_images
    assert answer.json()["parameters"] == expected
    body, _ = txt2img(client)
    assert body["parameters"]["sampler_index"] == "Euler" and body["parameters"]["hr_negative_prompt"] == ""
    assert body["parameters"]["denoising_strength"] == 0.75 and "mask" not in body["parameters"]


# ---------------------------------------------------------------- 8d. progress by A1111's batches


def a1111_progress_states(n_iter: int, passes: tuple[int, ...]):
    """A1111's `shared.state` after each sampler step: `process_images_inner` runs n_iter batches and calls
    `state.nextjob()` after each, the hires fix's `sample_hr_pass` calls it before its pass (and `init`
    doubles job_count), the sampler sets `sampling_steps` and counts `sampling_step`; `progressapi`'s progress."""
    job_count = n_iter * len(passes)
    job_no = 0
    for _ in range(n_iter):
        for steps in passes:
            for step in range(1, steps + 1):
                progress = 0.01 + job_no / job_count + 1 / job_count * step / steps
                yield (job_count, job_no, step, steps), min(progress, 1)
            job_no += 1


@pytest.mark.parametrize("fields, n_iter, passes", [
    ({"steps": 4}, 3, (4,)), ({"steps": 3, "hr_scale": 2, "hr_steps": 5}, 2, (3, 5)),
    ({"steps": 10, "init_image": Image.new("RGB", (64, 64)), "strength": 0.5, "img2img_convention": "a1111"}, 2,
     (6,)),                                                                    # int(10 x 0.5) + 1
])
def test_progress_counts_a1111s_batches_and_passes(fields, n_iter, passes):
    """The passes' steps are the resolved plan's (`jobs.pass_steps`), as the worker counts them."""
    import sdlab
    from sdlab.pipeline.request import GenerationRequest
    from sdlab.server.a1111 import _a1111_jobs
    from sdlab.server.inputs import JobSpec
    from sdlab.server.jobs import pass_steps

    spec = JobSpec(GenerationRequest("x", **fields), batch_count=n_iter)
    assert pass_steps(sdlab.load().resolve(spec.request)) == passes
    assert _a1111_jobs(spec, (), 0) == (n_iter * len(passes), 0, 0, 0)        # not resolved yet
    for step, (state, _) in enumerate(a1111_progress_states(n_iter, passes), start=1):
        assert _a1111_jobs(spec, passes, step) == state, step


def test_progress_during_n_iter_is_a1111s(client):
    """A1111's progressapi during an n_iter job: job_count = n_iter, job_no the batch, sampling_steps a batch's
    steps, progress = 0.01 + job_no / job_count + sampling_step / sampling_steps / job_count."""
    import threading

    result = {}
    body = {"prompt": "batches", "steps": 60, "n_iter": 3, "width": 64, "height": 64}
    worker = threading.Thread(target=lambda: result.update(r=client.post("/txt2img", json=body)))
    worker.start()
    seen = []
    while worker.is_alive():
        progress = client.get("/progress").json()
        if progress["state"]["sampling_steps"]:
            seen.append(progress)
    worker.join()
    assert result["r"].status_code == 200 and seen
    for progress in seen:
        state = progress["state"]
        assert (state["job_count"], state["sampling_steps"]) == (3, 60) and 0 <= state["job_no"] < 3
        expected = 0.01 + state["job_no"] / 3 + state["sampling_step"] / 60 / 3
        assert progress["progress"] == pytest.approx(min(expected, 1))
    assert len({progress["state"]["job_no"] for progress in seen}) >= 2


# ---------------------------------------------------------------- 8e. options that change img2img


def test_img2img_fix_steps_and_initial_noise_multiplier_options_are_a1111s(client, sdlab_server):
    """A1111 reads opts.img2img_fix_steps as it samples (`setup_img2img_steps`: all the steps run, on a
    stretched schedule), so a request's override_settings of it count; it reads opts.initial_noise_multiplier
    for a request that leaves it unset as it makes the processing object (`__post_init__`), before a
    request's override_settings apply."""
    body = {"prompt": "x", "steps": 10, "seed": 4, "denoising_strength": 0.5,
            "init_images": [png_b64((64, 64), (90, 20, 200))]}

    def img2img(**fields) -> tuple[list, str, int]:
        answer = client.post("/img2img", json={**body, **fields})
        assert answer.status_code == 200, answer.text
        job = httpx.get(sdlab_server.url + "/api/jobs?limit=1").json()["jobs"][0]
        return answer.json()["images"], json.loads(answer.json()["info"])["infotexts"][0], job["steps"]

    plain, text, steps = img2img()
    assert steps == 6 and "Noise multiplier" not in text                # int(10 x 0.5) + 1
    try:
        assert client.post("/options", json={"img2img_fix_steps": True, "initial_noise_multiplier": 0.5}).status_code == 200
        fixed, text, steps = img2img()
        assert steps == 10 and "Noise multiplier: 0.5" in text and fixed != plain
        own, text, _ = img2img(initial_noise_multiplier=1.0)                  # the request's own value wins
        assert "Noise multiplier" not in text and own != fixed
        client.post("/options", json={"img2img_fix_steps": False, "initial_noise_multiplier": 1.0})
        overridden, text, steps = img2img(override_settings={"img2img_fix_steps": True, "initial_noise_multiplier": 0.5})
        assert steps == 10 and overridden == own                              # the noise multiplier: not yet set
        for bad in ({"img2img_fix_steps": 1}, {"initial_noise_multiplier": -1}, {"initial_noise_multiplier": True}):
            refused = client.post("/options", json=bad)
            assert refused.status_code == 422 and next(iter(bad)) in refused.json()["errors"]
    finally:
        client.post("/options", json={"img2img_fix_steps": False, "initial_noise_multiplier": 1.0})


# A1111 1.10's modules/shared_options.py, "Sampler parameters": the OptionInfo defaults of these options
A1111_SIGMA_OPTION_DEFAULTS = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": 0.0, "s_noise": 1.0, "sigma_min": 0.0,
                               "sigma_max": 0.0, "rho": 0.0, "always_discard_next_to_last_sigma": False}


def test_options_list_the_churn_and_schedule_options_with_a1111s_defaults(client):
    """`GET options` lists the sampler parameters the API draws with (A1111's defaults until set), and what
    `POST options` sets."""
    listed = client.get("/options").json()
    assert {key: listed.get(key) for key in A1111_SIGMA_OPTION_DEFAULTS} == A1111_SIGMA_OPTION_DEFAULTS
    assert all(type(listed[key]) is type(value) for key, value in A1111_SIGMA_OPTION_DEFAULTS.items())
    chosen = {"s_churn": 0.5, "rho": 3.0, "always_discard_next_to_last_sigma": True}
    try:
        assert client.post("/options", json=chosen).status_code == 200
        listed = client.get("/options").json()
        assert {key: listed[key] for key in A1111_SIGMA_OPTION_DEFAULTS} == {**A1111_SIGMA_OPTION_DEFAULTS, **chosen}
    finally:
        client.post("/options", json={key: A1111_SIGMA_OPTION_DEFAULTS[key] for key in chosen})


# ---------------------------------------------------------------- 9. A1111's names in errors, interrupt's answer


@pytest.mark.parametrize("route, fields, named", [
    ("txt2img", {"enable_hr": True, "hr_second_pass_steps": -1}, "hr_second_pass_steps must be"),
    ("txt2img", {"enable_hr": True, "hr_second_pass_steps": 2000}, "hr_second_pass_steps must be"),  # --max-steps
    ("txt2img", {"enable_hr": True, "denoising_strength": -0.5}, "denoising_strength (the second pass's"),
    ("txt2img", {"enable_hr": True, "hr_resize_x": -5}, "hr_resize_x must be"),
    ("txt2img", {"cfg_scale": 1e9}, "cfg_scale must lie in"),
    ("txt2img", {"subseed_strength": 2}, "subseed_strength (variation strength) must"),   # its own name kept
    ("img2img", {"denoising_strength": -0.5}, "denoising_strength must lie in"),
    ("img2img", {"initial_noise_multiplier": -1}, "initial_noise_multiplier must lie in"),
    ("img2img", {"mask_blur": 1e9}, "mask_blur must lie in"),
])
def test_errors_name_the_a1111_field_the_client_sent(client, route, fields, named):
    if route == "img2img":
        fields = {"init_images": [png_b64((64, 64), (9, 9, 9))], "mask": png_b64((64, 64), (255, 255, 255)), **fields}
    answer = client.post(f"/{route}", json={"prompt": "x", "steps": 2, **fields})
    assert answer.status_code == 400 and answer.json()["errors"].startswith(named), answer.text
    assert answer.json()["detail"] == answer.json()["errors"]


@pytest.mark.parametrize("fix_steps, strength, message", [
    (True, 0, "denoising_strength must lie in (0, inf) with the option img2img_fix_steps, got 0.0"),
    (False, -0.5, "denoising_strength must lie in [0, inf), got -0.5"),
])
def test_errors_name_the_img2img_step_rule_by_a1111s_option(client, fix_steps, strength, message):
    """The client chose the step rule with A1111's option img2img_fix_steps, never by sdlab's convention names."""
    answer = client.post("/img2img", json={"prompt": "x", "steps": 2, "denoising_strength": strength,
                                           "init_images": [png_b64((64, 64), (9, 9, 9))],
                                           "override_settings": {"img2img_fix_steps": fix_steps}})
    assert answer.status_code == 400 and answer.json()["errors"] == message, answer.text


def test_img2img_steps_past_a_floats_range_are_refused_naming_steps(client):
    """JSON's 10**400 steps: the request's check names them (a 400), where img2img's FreeU step count
    (`_alwayson_freeu`'s `steps_run`, min(strength, 0.999) * steps) was a 500 (OverflowError)."""
    answer = client.post("/img2img", json={"prompt": "x", "steps": 10**400,
                                           "init_images": [png_b64((64, 64), (9, 9, 9))]})
    assert answer.status_code == 400 and answer.json()["errors"].startswith("steps must be an integer"), answer.text


@pytest.mark.parametrize("strength", [1.0000001, 1.5])
def test_img2img_denoising_strength_above_1_draws_as_1_as_a1111(client, strength):
    """A1111 takes any denoising_strength: setup_img2img_steps reads min(denoising_strength, 0.999), and the
    value itself is recorded (extra_generation_params["Denoising strength"])."""
    body = {"prompt": "x", "steps": 3, "seed": 2, "init_images": [png_b64((64, 64), (90, 20, 200))]}
    above = client.post("/img2img", json={**body, "denoising_strength": strength})
    assert above.status_code == 200, above.text
    one = client.post("/img2img", json={**body, "denoising_strength": 1})
    pictures = [np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))) for r in (above, one)]
    assert np.array_equal(*pictures)
    info = json.loads(above.json()["info"])
    assert info["denoising_strength"] == strength and f"Denoising strength: {strength}," in info["infotexts"][0]


def test_hires_denoising_strength_above_1_draws_as_1_as_a1111(client):
    """A1111's hires pass takes any denoising_strength too: `sample_hr_pass` -> `setup_img2img_steps` reads
    min(denoising_strength, 0.999); the value sent is recorded."""
    body = {"prompt": "x", "steps": 2, "seed": 1, "enable_hr": True, "hr_scale": 1.5, "hr_second_pass_steps": 2}
    above, info = txt2img(client, **body, denoising_strength=1.0000001)
    one, _ = txt2img(client, **body, denoising_strength=1)
    pictures = [np.asarray(Image.open(io.BytesIO(base64.b64decode(r["images"][0])))) for r in (above, one)]
    assert np.array_equal(*pictures)
    assert info["denoising_strength"] == 1.0000001 and "Denoising strength: 1.0000001," in info["infotexts"][0]


@pytest.mark.parametrize("field", ["init_images", "mask"])
def test_an_image_url_is_refused_by_name(client, field):
    """A1111's decode_base64_to_image fetches an http(s) URL (opts.api_enable_requests); sdlab fetches
    nothing and says so, with A1111's detail for a server that does not fetch."""
    url = "https://example.com/picture.png"
    body = {"prompt": "x", "steps": 2, "init_images": [png_b64((64, 64), (9, 9, 9))]}
    body[field] = [url] if field == "init_images" else url
    answer = client.post("/img2img", json=body)
    assert answer.status_code == 400 and answer.json()["detail"] == "Requests not allowed"
    assert "is an http(s) URL: this server does not fetch pictures" in answer.json()["errors"]


def test_interrupt_answers_as_a1111(client):
    """A1111's `interruptapi` returns {}; its `skip` returns None (null)."""
    assert client.post("/interrupt").json() == {}
    assert client.post("/skip").json() is None


def test_n_iter_draws_its_batches_one_after_another(client, sdlab_server):
    """A1111's `process_images_inner` draws `n_iter` batches of `batch_size` in turn, the seeds numbered
    across them (`all_seeds`, `all_subseeds`); so `--max-batch` (8 here) bounds `batch_size` alone."""
    body, info = txt2img(client, batch_size=3, n_iter=3, seed=100)
    assert len(body["images"]) == 9 and info["all_seeds"] == list(range(100, 109)) and info["batch_size"] == 3
    first, _ = txt2img(client, batch_size=3, seed=100)
    second, _ = txt2img(client, batch_size=3, seed=103)
    assert body["images"][:3] == first["images"] and body["images"][3:6] == second["images"]   # parameters too
    job = httpx.get(sdlab_server.url + "/api/jobs?limit=1").json()["jobs"][0]
    assert job["steps"] == 2 and job["request"]["batch_size"] == 3        # the later request
    varied, info = txt2img(client, batch_size=2, n_iter=2, seed=7, subseed=50, subseed_strength=0.3)
    assert info["all_seeds"] == [7] * 4 and info["all_subseeds"] == [50, 51, 52, 53]
    later, _ = txt2img(client, batch_size=2, seed=7, subseed=52, subseed_strength=0.3)
    assert varied["images"][2:] == later["images"]
    job = httpx.get(sdlab_server.url + "/api/jobs?limit=2").json()["jobs"][1]
    assert job["steps"] == 2 * 2 and job["request"]["batch_count"] == 2 and len(job["images"]) == 4
    refused = client.post("/txt2img", json={"prompt": "x", "batch_size": 9})
    assert refused.status_code == 400 and "at most 8 images" in refused.json()["errors"]
    refused = client.post("/txt2img", json={"prompt": "x", "batch_size": 8, "n_iter": 1000})
    assert refused.status_code == 400, refused.text
    assert refused.json()["errors"] == ("at most 100 images per request on this server (--max-images), got "
                                        "batch_size 8 x n_iter 1000")


@pytest.mark.parametrize("options", [{"uni_pc_variant": "bh2", "uni_pc_order": 2, "uni_pc_lower_order_final": False},
                                     {}])
def test_a1111s_unipc_options_reach_its_unipc_and_its_labels(options):
    """A1111's `unipc` reads `uni_pc_variant`, `uni_pc_order` and `uni_pc_lower_order_final` (GET options lists its
    defaults): they draw its UniPC, and a text labels those that are not the defaults, under the names A1111 reads
    them from (`UniPC variant`, ...), which read back to the same request."""
    from sdlab.pipeline.infotext import from_parameters, to_parameters
    from sdlab.pipeline.png_info import format_parameters, parse_parameters
    from sdlab.pipeline.request import GenerationRequest
    from sdlab.server.a1111 import OPTION_DEFAULTS, Txt2ImgIn, _request

    defaults = {"uni_pc_variant": "bh1", "uni_pc_order": 3, "uni_pc_lower_order_final": True}
    assert {key: OPTION_DEFAULTS[key] for key in (*defaults, "uni_pc_skip_type")} == {
        **defaults, "uni_pc_skip_type": "time_uniform"}
    request = _request(Txt2ImgIn(prompt="x", sampler_name="UniPC", override_settings=options))
    fields = {"unipc_" + key[len("uni_pc_"):]: value for key, value in {**defaults, **options}.items()}
    assert {name: getattr(request, name) for name in fields} == fields
    drawn = dataclasses.replace(request, seed=1, schedule="ddim_uniform", width=64, height=64)
    labels = {key: value for key, value in to_parameters(drawn).items() if key.startswith("UniPC")}
    assert labels == {"UniPC " + key[len("uni_pc_"):].replace("_", " "): value for key, value in options.items()}
    back = from_parameters(parse_parameters(format_parameters(to_parameters(drawn))))
    assert {name: back.get(name, getattr(GenerationRequest, name)) for name in fields} == fields
    for refused in ({"uni_pc_variant": "vary_coeff"}, {"uni_pc_skip_type": "logSNR"}, {"uni_pc_order": 0}):
        with pytest.raises(BadRequest, match=next(iter(refused))):
            _request(Txt2ImgIn(prompt="x", sampler_name="UniPC", override_settings=refused))
