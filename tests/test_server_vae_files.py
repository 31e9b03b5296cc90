"""The server's VAE files, as A1111 1.10 lists and draws them (modules/sd_vae.py): `GET /sdapi/v1/sd-vae`,
`POST /sdapi/v1/refresh-vae`, `sd_vae` by name in the options and `override_settings`, the native API's `vae`,
and a loaded model drawn with another VAE by reading that VAE alone."""

from __future__ import annotations

import base64
import glob
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file


def _a1111_refresh_vae_list(model_path: Path, vae_path: Path) -> dict[str, str]:
    """AUTOMATIC1111/stable-diffusion-webui modules/sd_vae.py refresh_vae_list (1.10), model_path its
    models/Stable-diffusion and vae_path its models/VAE; each glob's files in name order (A1111 takes the file
    system's order; its closing `vae_dict.update(dict(sorted(...)))` reorders no key that is already there)."""
    vae_dict: dict[str, str] = {}
    paths = [
        os.path.join(model_path, '**/*.vae.ckpt'),
        os.path.join(model_path, '**/*.vae.pt'),
        os.path.join(model_path, '**/*.vae.safetensors'),
        os.path.join(vae_path, '**/*.ckpt'),
        os.path.join(vae_path, '**/*.pt'),
        os.path.join(vae_path, '**/*.safetensors'),
    ]
    candidates = []
    for path in paths:
        candidates += sorted(glob.iglob(path, recursive=True))
    for filepath in candidates:
        vae_dict[os.path.basename(filepath)] = filepath
    return vae_dict


def _a1111_resolve_vae(sd_vae: str, overrides_per_model: bool, checkpoint_file: Path,
                       vae_dict: dict[str, str]) -> str | None:
    """modules/sd_vae.py resolve_vae (1.10) with no --vae-path and no user metadata: the file drawn with, None for
    the checkpoint's own VAE."""
    def is_automatic():
        return sd_vae in {"Automatic", "auto"}

    def resolve_vae_from_setting():
        if sd_vae == "None":
            return None
        return vae_dict.get(sd_vae, None)

    def find_vae_near_checkpoint():
        checkpoint_path = os.path.basename(checkpoint_file).rsplit('.', 1)[0]
        for vae_file in vae_dict.values():
            if os.path.basename(vae_file).startswith(checkpoint_path):
                return vae_file
        return None

    if overrides_per_model and not is_automatic():
        return resolve_vae_from_setting()
    near = find_vae_near_checkpoint()
    if near is not None and (not overrides_per_model or is_automatic()):
        return near
    return resolve_vae_from_setting()


def _vae_file(path: Path, seed: int) -> None:
    from bundle_fixtures import randomize_, tiny_bundle

    state = {k: v.contiguous() for k, v in randomize_(tiny_bundle("sd1", seed=9).vae, seed).state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path)) if path.suffix == ".safetensors" else torch.save(state, path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """An A1111 models folder: two checkpoints (anime with its sidecar VAE), VAE files in models/VAE (one in a
    subfolder, one a link out of the folder) and a sidecar of a model elsewhere in the tree."""
    from bundle_fixtures import tiny_bundle, write_original

    root = tmp_path_factory.mktemp("vaes")
    models = root / "models"
    checkpoints = models / "Stable-diffusion"
    checkpoints.mkdir(parents=True)
    write_original(tiny_bundle("sd1", seed=3), checkpoints / "anime.safetensors", junk=False)
    write_original(tiny_bundle("sd1", seed=4), checkpoints / "plain.safetensors", junk=False)
    _vae_file(checkpoints / "anime.vae.safetensors", 99)
    _vae_file(checkpoints / "sub" / "old.vae.pt", 98)
    _vae_file(models / "VAE" / "blue.safetensors", 97)
    _vae_file(models / "VAE" / "sub" / "red.pt", 96)
    (models / "VAE" / "notes.txt").write_text("not a VAE")
    _vae_file(root / "outside.safetensors", 95)
    (models / "VAE" / "linked.safetensors").symlink_to(root / "outside.safetensors")
    return models


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    from server_fixtures import start_server

    served = start_server(tmp_path_factory.mktemp("vae-serve") / "out", "--model",
                          str(models / "Stable-diffusion" / "anime.safetensors"), "--models-dir", str(models))
    yield served
    served.stop()


BODY = {"prompt": "a pear", "steps": 2, "width": 32, "height": 32, "seed": 5, "sampler_name": "DPM++ 2M",
        "scheduler": "Karras", "cfg_scale": 5}
CLI_ARGS = ["a pear", "--steps", "2", "--width", "32", "--height", "32", "--seed", "5", "--sampler", "DPM++ 2M",
            "--schedule", "karras", "--cfg", "5"]


def _expected_list(models: Path) -> dict[str, str]:
    """A1111's list, less the link that leaves the VAE folder (sdlab skips those, as for every model list)."""
    listed = _a1111_refresh_vae_list(models / "Stable-diffusion", models / "VAE")
    return {name: str(Path(path).resolve()) for name, path in listed.items() if not Path(path).is_symlink()}


def _cli(tmp_path: Path, *args: str) -> Image.Image:
    from server_fixtures import server_env

    out = tmp_path / f"cli-{time.monotonic_ns()}.png"
    done = subprocess.run([sys.executable, "-m", "sdlab", "txt2img", *args, "--out", str(out), "--no-progress"],
                          capture_output=True, text=True, env=server_env(), timeout=300)
    assert done.returncode == 0, done.stderr
    image = Image.open(out)
    image.load()
    return image


def _a1111(client: httpx.Client, **fields) -> tuple[Image.Image, dict]:
    answer = client.post("/sdapi/v1/txt2img", json={**BODY, **fields})
    assert answer.status_code == 200, answer.text
    image = Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0])))
    image.load()
    return image, json.loads(answer.json()["info"])


def _same(a: Image.Image, b: Image.Image) -> None:
    assert np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))
    assert a.info["parameters"] == b.info["parameters"]


def test_the_vae_list_is_a1111s(server, models):
    """Before: `GET sd-vae` was [] whatever the folders held."""
    with httpx.Client(base_url=server.url, timeout=60) as client:
        assert client.post("/sdapi/v1/refresh-vae").status_code == 200
        rows = client.get("/sdapi/v1/sd-vae").json()
    expected = _expected_list(models)
    assert [row["model_name"] for row in rows] == list(expected)
    assert {row["model_name"]: row["filename"] for row in rows} == expected
    assert list(expected) == ["old.vae.pt", "anime.vae.safetensors", "red.pt", "blue.safetensors"]


def test_refresh_vae_rescans_the_folders(server, models):
    added = models / "VAE" / "green.safetensors"
    _vae_file(added, 94)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            names = lambda: [row["model_name"] for row in client.get("/sdapi/v1/sd-vae").json()]  # noqa: E731
            assert "green.safetensors" not in names()
            client.post("/sdapi/v1/refresh-vae")
            assert names() == list(_expected_list(models)) and "green.safetensors" in names()
            added.unlink()
            client.post("/sdapi/v1/refresh-vae")
            assert "green.safetensors" not in names()
    finally:
        added.unlink(missing_ok=True)


def test_a_named_vae_file_draws_what_the_command_line_draws_with_it(server, models, tmp_path):
    """sd_vae by name, in override_settings and in the options, and the native API's vae, draw the pictures
    (pixels and parameters text) of `sdlab txt2img --vae FILE`; a sidecar's name draws it for any model. Before:
    each drew the checkpoint's own VAE (or the sidecar) with a warning."""
    from sdlab.pipeline.png_info import model_hash

    anime, plain = (models / "Stable-diffusion" / f"{name}.safetensors" for name in ("anime", "plain"))
    blue, red = models / "VAE" / "blue.safetensors", models / "VAE" / "sub" / "red.pt"
    sidecar = models / "Stable-diffusion" / "anime.vae.safetensors"
    with httpx.Client(base_url=server.url, timeout=120) as client:
        assert client.post("/sdapi/v1/refresh-vae").status_code == 200
        drawn_blue, info = _a1111(client, override_settings={"sd_vae": "blue.safetensors"})
        assert (info["sd_vae_name"], info["sd_vae_hash"]) == ("blue.safetensors", model_hash(blue))
        drawn_sidecar, _ = _a1111(client, override_settings={"sd_vae": "anime.vae.safetensors",
                                                             "sd_model_checkpoint": "plain.safetensors"})
        assert client.post("/sdapi/v1/options", json={"sd_vae": "red.pt"}).status_code == 200
        try:
            drawn_red, _ = _a1111(client)
        finally:
            client.post("/sdapi/v1/options", json={"sd_vae": "Automatic"})
        job = client.post("/api/jobs", json={"prompt": "a pear", "steps": 2, "width": 32, "height": 32, "seed": 5,
                                             "sampler": "DPM++ 2M", "schedule": "karras", "cfg_scale": 5,
                                             "vae": "blue.safetensors"}).json()
        while (state := client.get(f"/api/jobs/{job['id']}").json())["status"] in ("queued", "running"):
            time.sleep(0.05)
        assert state["status"] == "done", state
        native = Image.open(io.BytesIO(client.get(state["images"][0]).content))
    _same(drawn_blue, _cli(tmp_path, *CLI_ARGS, "--model", str(anime), "--vae", str(blue)))
    _same(native, drawn_blue)
    _same(drawn_red, _cli(tmp_path, *CLI_ARGS, "--model", str(anime), "--vae", str(red)))
    _same(drawn_sidecar, _cli(tmp_path, *CLI_ARGS, "--model", str(plain), "--vae", str(sidecar)))
    assert not np.array_equal(np.asarray(drawn_blue), np.asarray(drawn_red))


@pytest.mark.parametrize("overrides_per_model", [True, False])
def test_sd_vae_draws_the_file_a1111s_resolve_vae_picks(server, models, overrides_per_model):
    """Every sd_vae value (a listed file, a sidecar's name, Automatic, None, a name of no file) on a model with a
    sidecar and one without, under both values of sd_vae_overrides_per_model_preferences: the VAE label (the
    file drawn with) is A1111's resolve_vae's."""
    vae_dict = _a1111_refresh_vae_list(models / "Stable-diffusion", models / "VAE")
    with httpx.Client(base_url=server.url, timeout=120) as client:
        client.post("/sdapi/v1/refresh-vae")
        for model in ("anime.safetensors", "plain.safetensors"):
            for sd_vae in ("blue.safetensors", "old.vae.pt", "Automatic", "None", "nosuch.pt"):
                _, info = _a1111(client, override_settings={
                    "sd_vae": sd_vae, "sd_model_checkpoint": model,
                    "sd_vae_overrides_per_model_preferences": overrides_per_model})
                expected = _a1111_resolve_vae(sd_vae, overrides_per_model, models / "Stable-diffusion" / model,
                                              vae_dict)
                assert info["sd_vae_name"] == (expected and os.path.basename(expected)), (model, sd_vae)


def test_unknown_names_and_paths_draw_the_checkpoints_own_vae(server, models):
    """As A1111's resolve_vae_from_setting: a name of no listed file is the checkpoint's own VAE, logged
    ("Couldn't find VAE named ...; using None instead"); a path, inside the folders or out, is such a name, so no
    client loads a file the list does not hold. The native API answers 404 for it, as for an unknown LoRA."""
    outside = models.parent / "outside.safetensors"
    names = ["nosuch.safetensors", "blue", "VAE/blue.safetensors", str(models / "VAE" / "blue.safetensors"),
             "../outside.safetensors", str(outside), "linked.safetensors"]
    with httpx.Client(base_url=server.url, timeout=120) as client:
        client.post("/sdapi/v1/refresh-vae")
        own, _ = _a1111(client, override_settings={"sd_vae": "None"})
        for name in names:
            drawn, info = _a1111(client, override_settings={"sd_vae": name})
            assert info["sd_vae_name"] is None and "VAE" not in drawn.info["parameters"], name
            assert np.array_equal(np.asarray(drawn), np.asarray(own)), name
            answer = client.post("/api/jobs", json={"prompt": "a pear", "vae": name})
            assert answer.status_code == 404 and "unknown VAE" in answer.text, name
            assert str(models) not in answer.text.replace(name, "")        # the folder, but for what was sent
    assert f"Couldn't find VAE named {names[0]}; using None instead" in server.output()


def test_a_picture_s_vae_label_sets_sd_vae(server, models):
    """A1111's sd_vae has infotext='VAE': an `infotext` naming a listed VAE draws with it."""
    with httpx.Client(base_url=server.url, timeout=120) as client:
        client.post("/sdapi/v1/refresh-vae")
        _, info = _a1111(client, infotext="a pear\nSteps: 2, Seed: 5, VAE: blue.safetensors")
    assert info["sd_vae_name"] == "blue.safetensors"


def test_an_unreadable_vae_file_is_refused_without_the_servers_folder(server, models):
    broken = models / "VAE" / "broken.safetensors"
    broken.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 334643238\n")
    try:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            client.post("/sdapi/v1/refresh-vae")
            answer = client.post("/sdapi/v1/options", json={"sd_vae": "broken.safetensors"})
            assert answer.status_code == 400 and "broken.safetensors" in answer.text, answer.text
            assert "Git LFS pointer" in answer.text and str(models) not in answer.text
            assert client.get("/sdapi/v1/options").json()["sd_vae"] == "Automatic"
            answer = client.post("/sdapi/v1/txt2img", json={**BODY, "override_settings": {"sd_vae": "broken.safetensors"}})
            assert answer.status_code == 400 and str(models) not in answer.text, answer.text
    finally:
        broken.unlink()
        httpx.post(server.url + "/sdapi/v1/refresh-vae")


def test_another_vae_is_read_into_the_loaded_model_alone(models):
    """ModelHost draws a loaded model with another VAE by reading that VAE only (the U-Net stays the same
    object), and draws what a model loaded with that VAE from its file draws."""
    from sdlab import load
    from sdlab.pipeline.request import GenerationRequest
    from sdlab.server.registry import ModelRegistry
    from sdlab.server.vae_files import VaeChoice
    from sdlab.server.worker import ModelHost

    anime = models / "Stable-diffusion" / "anime.safetensors"
    registry = ModelRegistry(anime, models, models / "VAE")
    host = ModelHost(registry, "cpu")
    request = GenerationRequest(prompt="a pear", steps=2, width=32, height=32, seed=5, sampler="Euler")
    first = host.pipeline(registry.default)
    unet = first.bundle.unet
    for choice, vae in [(VaeChoice(False, "blue.safetensors"), models / "VAE" / "blue.safetensors"),
                        (VaeChoice(False, None), None), (VaeChoice(True, None), None)]:
        pipe = host.pipeline(registry.default, vae=choice)
        assert pipe.bundle.unet is unet
        fresh = load(anime, vae=vae, sidecar_vae=choice.sidecar)
        assert pipe.bundle.report == fresh.bundle.report
        assert np.array_equal(np.asarray(pipe.run(request).images[0]), np.asarray(fresh.run(request).images[0]))


def test_a_dropped_picture_s_vae_is_the_jobs_vae(server, models):
    """`POST /api/parameters` (the web UI's dropped PNG) reads `VAE` as the job's `vae`, which draws the picture
    again; before, the label was left unread."""
    with httpx.Client(base_url=server.url, timeout=120) as client:
        client.post("/sdapi/v1/refresh-vae")
        drawn, _ = _a1111(client, override_settings={"sd_vae": "blue.safetensors"})
        png = io.BytesIO()
        drawn.save(png, "PNG", pnginfo=_text_chunk(drawn.info["parameters"]))
        read = client.post("/api/parameters", json={"image": base64.b64encode(png.getvalue()).decode()}).json()
        assert read["settings"]["vae"] == "blue.safetensors" and not any(u.startswith("VAE:") for u in read["unread"])
        job = client.post("/api/jobs", json={k: v for k, v in read["settings"].items() if k != "size_convention"})
        assert job.status_code == 202, job.text
        while (state := client.get(f"/api/jobs/{job.json()['id']}").json())["status"] in ("queued", "running"):
            time.sleep(0.05)
        again = Image.open(io.BytesIO(client.get(state["images"][0]).content))
    assert np.array_equal(np.asarray(again.convert("RGB")), np.asarray(drawn.convert("RGB")))


def _text_chunk(text: str):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", text)
    return info


def test_the_web_ui_offers_the_vae_list(server, models):
    """The page's VAE select: Automatic, None, then `GET sd-vae`'s names (A1111's SD VAE setting); a file
    picked there is the job's `vae` and draws the picture."""
    from test_webui import (
        choose, job_by_prompt, open_page, option_values, severe_console_errors, set_value, start_browser, wait,
    )

    from selenium.webdriver.common.by import By

    httpx.post(server.url + "/sdapi/v1/refresh-vae")
    driver = start_browser()
    try:
        open_page(driver, server.url)
        wait(driver, lambda d: len(option_values(d, "vae")) > 2, 30, "the VAE list did not load")
        assert option_values(driver, "vae") == ["Automatic", "None", *_expected_list(models)]
        choose(driver, "vae", value="blue.safetensors")
        driver.find_element(By.ID, "prompt").send_keys("a pear in the page")
        for field, number in (("steps", 2), ("seed", 5), ("width", 32), ("height", 32)):
            set_value(driver, field, number)
        driver.find_element(By.ID, "generate").click()
        wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#results img.result"), message="no result")
        job = job_by_prompt(server.url, "a pear in the page")
        assert job["request"]["vae"] == "blue.safetensors" and "VAE: blue.safetensors" in job["infotexts"][0]
        assert severe_console_errors(driver) == []
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def sdxl_models(tmp_path_factory):
    """An A1111 models folder with a tiny SDXL base (with its sidecar VAE), an SDXL refiner and an SDXL VAE file."""
    from bundle_fixtures import randomize_, tiny_bundle, write_original

    models = tmp_path_factory.mktemp("sdxl-vaes") / "models"
    checkpoints = models / "Stable-diffusion"
    checkpoints.mkdir(parents=True)
    write_original(tiny_bundle("sdxl"), checkpoints / "base.safetensors", junk=False)
    write_original(tiny_bundle("sdxl-refiner", seed=5), checkpoints / "refiner.safetensors", junk=False)
    for path, seed in [(models / "VAE" / "blue.safetensors", 7), (checkpoints / "base.vae.safetensors", 8)]:
        path.parent.mkdir(exist_ok=True)
        save_file({k: v.contiguous() for k, v in randomize_(tiny_bundle("sdxl").vae, seed).state_dict().items()},
                  str(path))
    return models


def test_a_named_vae_decodes_the_refiners_pictures_as_on_the_server(sdxl_models):
    """A1111 resolves sd_vae for the refiner too, so the server draws a refined picture with the named VAE in both
    models; `sdlab.load(vae=FILE, refiner=R)` (the CLI's `--vae FILE --refiner R`) and `Pipeline.with_vae(FILE)`
    of a refined pipeline draw the same picture. Before, both decoded with the refiner's own VAE (max diff 255)."""
    from sdlab import load
    from sdlab.pipeline.request import GenerationRequest
    from sdlab.server.inputs import RefinerChoice
    from sdlab.server.registry import ModelRegistry
    from sdlab.server.vae_files import VaeChoice
    from sdlab.server.worker import ModelHost

    base, refiner = (sdxl_models / "Stable-diffusion" / f"{name}.safetensors" for name in ("base", "refiner"))
    blue = sdxl_models / "VAE" / "blue.safetensors"
    registry = ModelRegistry(base, sdxl_models, sdxl_models / "VAE")
    host = ModelHost(registry, "cpu")
    request = GenerationRequest(prompt="a pear", steps=4, width=64, height=64, seed=5, sampler="Euler")
    served = host.pipeline(registry.default, (), registry.find("refiner.safetensors"),
                           RefinerChoice("refiner.safetensors", 0.5, "diffusers"), VaeChoice(False, "blue.safetensors"))
    loaded = load(base, vae=blue, refiner=refiner, refiner_switch=0.5)
    swapped = load(base, refiner=refiner, refiner_switch=0.5).with_vae(blue)
    assert loaded.refiner.report.vae_file == swapped.refiner.report.vae_file == str(blue)
    pictures = [np.asarray(pipe.run(request).images[0]) for pipe in (served, loaded, swapped)]
    assert np.array_equal(pictures[0], pictures[1]) and np.array_equal(pictures[0], pictures[2])


def test_another_vae_keeps_the_family_and_prediction_the_model_was_loaded_with(models):
    """`Pipeline.with_vae` re-plans the file with `load`'s `family` / `prediction` overrides (its report's
    "argument" sources), so it equals a model loaded with that VAE and those overrides. Before, it planned with
    detection alone: the report said the prediction came from the file's metadata."""
    from sdlab import load

    anime, blue = models / "Stable-diffusion" / "anime.safetensors", models / "VAE" / "blue.safetensors"
    overrides = {"family": "sd1", "prediction": "v"}
    swapped = load(anime, **overrides).with_vae(blue)
    assert swapped.bundle.report == load(anime, vae=blue, **overrides).bundle.report
    assert swapped.with_vae(None).bundle.report == load(anime, **overrides).bundle.report
    assert load(anime).with_vae(blue).bundle.report == load(anime, vae=blue).bundle.report


NEAR_LAYOUTS = [   # (the model, files of the list); A1111 1.10 draws the first listed file starting with its stem
    ("anime.safetensors", ["Stable-diffusion/anime.vae.safetensors", "VAE/anime.safetensors"]),
    ("anime.safetensors", ["VAE/anime-v2.safetensors", "VAE/blue.pt"]),
    ("anime.safetensors", ["Stable-diffusion/anime.vae.safetensors", "Stable-diffusion/sub/anime2.vae.ckpt"]),
    ("sd.v1.ckpt", ["Stable-diffusion/sub/sd.v1-ema.vae.pt", "VAE/sd.v1.safetensors"]),
    ("sub/plain.safetensors", ["VAE/Plain.pt", "VAE/x/plain_vae.pt", "VAE/plain.ckpt"]),
    ("plain.safetensors", ["VAE/blue.pt", "Stable-diffusion/other.vae.pt"]),
]


@pytest.mark.parametrize("model, files", NEAR_LAYOUTS)
def test_automatic_draws_the_vae_a1111_finds_near_the_checkpoint(tmp_path, model, files):
    """sd_vae Automatic draws A1111 1.10's `find_vae_near_checkpoint` file (the first of the list whose name
    starts with the model's name up to its last dot), not only `<stem>.vae.*` beside it: before, the second,
    fourth and fifth layouts drew the checkpoint's own VAE and the third the sidecar beside it."""
    from sdlab.checkpoints.sidecar import vae_beside
    from sdlab.server.vae_files import VaeChoice, VaeFiles, vae_to_load

    for name in [f"Stable-diffusion/{model}", *files]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    checkpoint = tmp_path / "Stable-diffusion" / model
    vae_dict = _a1111_refresh_vae_list(tmp_path / "Stable-diffusion", tmp_path / "VAE")
    expected = _a1111_resolve_vae("Automatic", True, checkpoint, vae_dict)
    vaes = VaeFiles(tmp_path / "Stable-diffusion", tmp_path / "VAE")
    vae, sidecar = vae_to_load(checkpoint, VaeChoice(), None, vaes.near(checkpoint))
    drawn = vae_beside(checkpoint) if sidecar else vae
    assert (drawn and drawn.resolve()) == (expected and Path(expected).resolve())


def test_the_model_is_loaded_with_the_vae_found_near_it(tmp_path):
    """The worker loads the model with that file: a VAE folder's `plain-ema.safetensors` for `plain.safetensors`."""
    from bundle_fixtures import tiny_bundle, write_original
    from sdlab.server.registry import ModelRegistry
    from sdlab.server.worker import ModelHost

    model = tmp_path / "Stable-diffusion" / "plain.safetensors"
    model.parent.mkdir()
    write_original(tiny_bundle("sd1", seed=4), model, junk=False)
    _vae_file(tmp_path / "VAE" / "plain-ema.safetensors", 97)
    registry = ModelRegistry(model, tmp_path, tmp_path / "VAE")
    pipe = ModelHost(registry, "cpu").pipeline(registry.default)
    assert Path(pipe.bundle.report.vae_file).resolve() == (tmp_path / "VAE" / "plain-ema.safetensors").resolve()


@pytest.mark.parametrize("named", [True, False])
def test_a_vae_file_replaced_in_place_is_read_again(tmp_path, named):
    """The worker keys the loaded VAE by its file's version, as it keys checkpoints and LoRAs: a VAE file (a named
    one, or the sidecar beside the model) replaced in place is read again by the next job. Before, the VAE was
    keyed by its path alone and the model kept drawing with the old weights."""
    from bundle_fixtures import tiny_bundle, write_original
    from sdlab import load
    from sdlab.server.registry import ModelRegistry
    from sdlab.server.vae_files import VaeChoice
    from sdlab.server.worker import ModelHost

    model = tmp_path / "Stable-diffusion" / "plain.safetensors"
    model.parent.mkdir()
    write_original(tiny_bundle("sd1", seed=4), model, junk=False)
    vae = tmp_path / "VAE" / "blue.safetensors" if named else model.with_name("plain.vae.safetensors")
    _vae_file(vae, 97)
    choice = VaeChoice(False, "blue.safetensors") if named else VaeChoice()
    registry = ModelRegistry(model, tmp_path, tmp_path / "VAE")
    host = ModelHost(registry, "cpu")
    host.pipeline(registry.default, vae=choice)
    replacement = tmp_path / "replacement.safetensors"
    _vae_file(replacement, 96)
    os.replace(replacement, vae)
    pipe = host.pipeline(registry.default, vae=choice)
    fresh = load(model, vae=vae if named else None)
    for drawn, expected in zip(pipe.bundle.vae.state_dict().values(), fresh.bundle.vae.state_dict().values()):
        assert torch.equal(drawn, expected)
