"""`sdlab serve` with ControlNet units (A1111's `alwayson_scripts.controlnet`, the native `controls`) and
A1111's extras upscale: the pictures equal what `sdlab txt2img --control` and `upscale_by` make, models are
chosen by name from the server's folders only, bad units are 4xx."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from controlnet_fixtures import diffusers_controlnet, write_layout
from server_fixtures import cli_txt2img, b64_png, file_b64, png_picture, server_env, start_server
from test_upscale_models import new_arch_state

GEN = {"prompt": "a red apple", "steps": 3, "seed": 11, "width": 64, "height": 64, "cfg_scale": 5}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    import sdlab

    root = tmp_path_factory.mktemp("server-controlnet")
    models = root / "models"
    (models / "ControlNet").mkdir(parents=True)
    (models / "ESRGAN").mkdir()
    bundle = sdlab.load().bundle
    # hint_widths: one stride-2 stage per halving, so 2 ** (len - 1) must be the shipped VAE's factor
    factor = bundle.vae_config.downsample_factor
    widths = (16, 32, 96, 256)[: factor.bit_length()]
    net = write_layout(diffusers_controlnet(bundle.unet_config, 3, hint_widths=widths, std=0.05),
                       "diffusers-file", models / "ControlNet")
    net = net.rename(models / "ControlNet" / "tiny_canny.safetensors")
    save_file(new_arch_state(2), str(models / "ESRGAN" / "tinyx2.safetensors"))
    hint = root / "hint.png"
    image = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(image).rectangle([10, 10, 50, 50], outline="white", width=4)
    image.save(hint)
    server = start_server(root / "outputs", "--models-dir", str(models))
    yield {"server": server, "net": net, "hint": hint, "root": root, "upscaler": models / "ESRGAN" / "tinyx2.safetensors"}
    server.stop()


def _same(a: Image.Image, b: Image.Image) -> None:
    assert a.size == b.size
    assert (np.asarray(a.convert("RGB")) == np.asarray(b.convert("RGB"))).all()
    assert a.info["parameters"] == b.info["parameters"]


def test_controlnet_units_equal_the_cli(setup, tmp_path):
    url = setup["server"].url
    listed = httpx.get(url + "/controlnet/model_list", timeout=30).json()["model_list"]
    assert len(listed) == 1 and listed[0].startswith("tiny_canny [") and len(listed[0]) == len("tiny_canny [12345678]")
    assert "canny" in httpx.get(url + "/controlnet/module_list", timeout=30).json()["module_list"]

    cli = cli_txt2img(tmp_path, GEN["prompt"], "--steps", "3", "--seed", "11", "--width", "64", "--height", "64",
               "--cfg", "5", "--sampler", "Euler", "--control", f"{setup['net']}:{setup['hint']}:0.8:0:0.7")
    assert "ControlNet 0" in cli.info["parameters"]
    unit = {"enabled": True, "model": listed[0], "input_image": file_b64(setup["hint"]), "weight": 0.8,
            "guidance_start": 0.0, "guidance_end": 0.7, "module": "none", "pixel_perfect": False}
    off = {**unit, "enabled": False, "model": "not there"}
    response = httpx.post(url + "/sdapi/v1/txt2img", timeout=300, json={
        **GEN, "sampler_name": "Euler", "scheduler": "sgm_uniform",     # the CLI's default here (A1111's: uniform)
        "alwayson_scripts": {"controlnet": {"args": [unit, off]}}})
    assert response.status_code == 200, response.text
    served = png_picture(base64.b64decode(response.json()["images"][0]))
    # A1111's step rule: with 3 steps and end 0.7 the extension runs the ControlNet at every step (it reads
    # the step its callback last reported: 0, 0, 1), diffusers' at the first two; --from-png takes the rule
    assert "Control steps: a1111" in served.info["parameters"]
    assert not (np.asarray(served) == np.asarray(cli)).all()
    (tmp_path / "served.png").write_bytes(base64.b64decode(response.json()["images"][0]))
    _same(served, cli_txt2img(tmp_path, "--from-png", str(tmp_path / "served.png"),
                       "--control", f"{setup['net']}:{setup['hint']}:0.8:0:0.7"))
    echoed = response.json()["parameters"]["alwayson_scripts"]["controlnet"]["args"][0]
    assert echoed["input_image"] is None and echoed["weight"] == 0.8

    with httpx.Client(base_url=url, timeout=300) as client:          # the native API, model by stem
        job_id = client.post("/api/jobs", json={**GEN, "sampler": "Euler", "controls": [
            {"model": "tiny_canny", "image": file_b64(setup["hint"]), "strength": 0.8, "end": 0.7}]}).json()["id"]
        deadline = time.monotonic() + 300
        while (job := client.get(f"/api/jobs/{job_id}").json())["status"] in ("queued", "running"):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert job["status"] == "done", job
        assert job["request"]["controls"] == [{          # every setting it ran with, the image left out
            "model": "tiny_canny.safetensors", "strength": 0.8, "start": 0.0, "end": 0.7, "module": "none",
            "control_mode": "balanced", "resize_mode": "resize", "threshold_a": None, "threshold_b": None,
            "processor_res": None, "pixel_perfect": False}]
        _same(png_picture(client.get(job["images"][0]).content), cli)


def test_bad_units_are_refused(setup):
    url = setup["server"].url
    unit = {"model": "tiny_canny", "image": file_b64(setup["hint"])}

    def post(**change):
        return httpx.post(url + "/sdapi/v1/txt2img", timeout=60, json={
            **GEN, "alwayson_scripts": {"controlnet": {"args": [{**unit, **change}]}}})

    missing = post(model="nope [00000000]")
    assert missing.status_code == 404 and "ControlNet" in missing.json()["detail"]
    assert post(model=str(setup["net"])).status_code == 404                # never a path
    assert post(image="bm90IGFuIGltYWdl").status_code == 400               # base64 of "not an image"
    assert post(module="depth_zoe").status_code == 422
    assert post(guidance_start=0.8, guidance_end=0.2).status_code == 422
    native = httpx.post(url + "/api/jobs", timeout=60, json={**GEN, "controls": [{**unit, "model": "nope"}]})
    assert native.status_code == 404 and "nope" in native.json()["detail"]


def _finished_job(client: httpx.Client, body: dict) -> dict:
    """POST /api/jobs `body`, then the job once it has ended."""
    response = client.post("/api/jobs", json=body)
    assert response.status_code == 202, response.text
    deadline = time.monotonic() + 300
    while (job := client.get(f"/api/jobs/{response.json()['id']}").json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    return job


def test_native_controls_take_the_control_and_resize_modes(setup, tmp_path):
    """A native `controls` entry's control_mode / resize_mode (sdlab's names) draw what `sdlab txt2img
    --control-mode --control-resize` draws; another value is a 422 naming the field."""
    wide = tmp_path / "wide.png"
    Image.open(setup["hint"]).resize((96, 64)).save(wide)
    cli = cli_txt2img(tmp_path, GEN["prompt"], "--steps", "3", "--seed", "11", "--width", "64", "--height", "64",
               "--cfg", "5", "--sampler", "Euler", "--control", f"{setup['net']}:{wide}:0.8",
               "--control-mode", "control", "--control-resize", "fill")
    assert "Resize Mode: Resize and Fill" in cli.info["parameters"]
    assert "Control Mode: ControlNet is more important" in cli.info["parameters"]
    control = {"model": "tiny_canny", "image": file_b64(wide), "strength": 0.8}
    with httpx.Client(base_url=setup["server"].url, timeout=300) as client:
        job = _finished_job(client, {**GEN, "sampler": "Euler", "controls": [
            {**control, "control_mode": "control", "resize_mode": "fill"}]})
        assert job["status"] == "done", job
        _same(png_picture(client.get(job["images"][0]).content), cli)
        for field, bad in (("control_mode", "ControlNet is more important"), ("resize_mode", "Just Resize"),
                           ("resize_mode", 1)):
            refused = client.post("/api/jobs", json={**GEN, "controls": [{**control, field: bad}]})
            assert refused.status_code == 422 and field in refused.json()["detail"], refused.text


def test_extra_single_image_upscales(setup):
    from sdlab.checkpoints.upscaler import load_upscaler
    from sdlab.pipeline.upscale import upscale_by

    url = setup["server"].url
    names = [row["name"] for row in httpx.get(url + "/sdapi/v1/upscalers", timeout=30).json()]
    assert names[:3] == ["None", "Lanczos", "Nearest"] and "tinyx2" in names
    source = Image.open(setup["hint"]).convert("RGB").resize((20, 16))
    image = b64_png(source)

    response = httpx.post(url + "/sdapi/v1/extra-single-image", timeout=120,
                          json={"image": image, "upscaler_1": "tinyx2", "upscaling_resize": 3})
    assert response.status_code == 200, response.text
    served = png_picture(base64.b64decode(response.json()["image"]))
    expected = upscale_by(source, load_upscaler(setup["upscaler"]), 3)      # A1111: 60 x 48 rounded down to 8
    assert served.size == (56, 48)
    assert np.abs(np.asarray(served, dtype=np.int16) - np.asarray(expected, dtype=np.int16)).max() <= 1

    lanczos = httpx.post(url + "/sdapi/v1/extra-single-image", timeout=60, json={
        "image": image, "upscaler_1": "Lanczos", "resize_mode": 1, "upscaling_resize_w": 40, "upscaling_resize_h": 40})
    assert png_picture(base64.b64decode(lanczos.json()["image"])).size == (40, 40)
    unknown = httpx.post(url + "/sdapi/v1/extra-single-image", timeout=60,
                         json={"image": image, "upscaler_1": str(setup["upscaler"])})
    assert unknown.status_code == 404


def test_webuiapi_controlnet_units_and_extras(setup):
    """webuiapi's own payloads: a unit with an image (txt2img), one without (img2img: the init image is the
    hint, as in the extension), the extension's model list, and extra_single_image."""
    import webuiapi
    api = webuiapi.WebUIApi(baseurl=setup["server"].url + "/sdapi/v1", steps=3)
    model = api.controlnet_model_list()[0]
    hint = Image.open(setup["hint"])
    # webuiapi's alwayson_scripts default is one shared dict that it fills with the units: a fresh dict per
    # call keeps them out of the other tests' requests in this process
    result = api.txt2img(prompt="a cat", seed=2, width=64, height=64, sampler_name="Euler", alwayson_scripts={},
                         controlnet_units=[webuiapi.ControlNetUnit(image=hint, model=model, module="canny", weight=0.5)])
    assert "Module: canny, Model: tiny_canny [" in result.info["infotexts"][0]
    assert "Weight: 0.5" in result.info["infotexts"][0]
    result = api.img2img(images=[hint], prompt="a cat", seed=2, denoising_strength=0.6, alwayson_scripts={},
                         controlnet_units=[webuiapi.ControlNetUnit(model=model)])
    assert "ControlNet 0" in result.info["infotexts"][0]
    upscaled = api.extra_single_image(image=hint, upscaler_1="Nearest", upscaling_resize=2)
    assert upscaled.image.size == (128, 128)


def test_model_folder_names_and_symlinks(tmp_path):
    from sdlab.server.model_folders import CONTROLNET_SUFFIXES, ModelFolder

    folder, outside = tmp_path / "ControlNet", tmp_path / "elsewhere"
    (folder / "sub").mkdir(parents=True)
    outside.mkdir()
    (folder / "sub" / "depth.safetensors").write_bytes(b"x" * 2_000_000)
    (outside / "secret.pth").write_bytes(b"y" * 100)
    (folder / "link.pth").symlink_to(outside / "secret.pth")
    (folder / "notes.txt").write_text("not a model")
    models = ModelFolder(folder, CONTROLNET_SUFFIXES, hashed=True)
    assert [f.path.name for f in models.files] == ["depth.safetensors"]
    title = models.titles()[0]
    assert models.find(title) is models.find("depth") is models.find("depth.safetensors") is not None
    assert models.find("depth [ffffffff]") is not None            # another hash: matched by name
    assert models.find("link") is None and models.find(str(outside / "secret.pth")) is None
    assert ModelFolder(None, CONTROLNET_SUFFIXES, hashed=True).titles() == []


def test_missing_model_folders_are_one_error_line(tmp_path):
    for option in ("--controlnet-dir", "--upscalers-dir"):
        result = subprocess.run([sys.executable, "-m", "sdlab", "serve", option, str(tmp_path / "missing"), "--port", "0"],
                                capture_output=True, text=True, env=server_env(), timeout=120)
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [f"sdlab: error: the {option} {str(tmp_path / 'missing')!r} is not a folder"]


def _units(tmp_path: Path, **fields):
    """`a1111_controls` of one unit with `fields` on a folder holding one (unread) ControlNet file, `cn`."""
    from sdlab.server.config import Limits
    from sdlab.server.controls import a1111_controls
    from sdlab.server.model_folders import CONTROLNET_SUFFIXES, ModelFolder

    (tmp_path / "ControlNet").mkdir(exist_ok=True)
    (tmp_path / "ControlNet" / "cn.safetensors").write_bytes(b"x")
    folder = ModelFolder(tmp_path / "ControlNet", CONTROLNET_SUFFIXES, hashed=True)
    unit = {"model": "cn", "image": Image.new("RGB", (8, 8)), **fields}
    return a1111_controls({"controlnet": {"args": [unit]}}, folder, Limits())


def test_a1111_control_mode_by_value_or_index(tmp_path):
    """The extension's control_mode_from_value: a ControlMode value, or its index in the enum."""
    from sdlab.server.inputs import BadRequest

    for value, mode in ((None, "balanced"), (0, "balanced"), (1, "prompt"), (2, "control"), ("Balanced", "balanced"),
                        ("My prompt is more important", "prompt"), ("ControlNet is more important", "control")):
        assert _units(tmp_path, control_mode=value)[0].control_mode == mode
    assert _units(tmp_path)[0].control_mode == "balanced"
    for bad in (3, -1, True, "prompt", "balanced"):
        with pytest.raises(BadRequest, match="control_mode") as refused:
            _units(tmp_path, control_mode=bad)
        assert refused.value.status == 422


def test_a1111_module_names_mean_what_they_mean_in_the_extension(tmp_path):
    """A unit's module is the extension's preprocessor of that name (or its UI alias); one that runs a network
    sdlab has not (lineart: the LineartDetector) is a 422 naming it, never another operation."""
    from sdlab.server.inputs import BadRequest

    for module, name in (("scribble", "scribble"), ("threshold", "threshold"), ("Invert", "invert"),
                         ("invert (from white bg & black line)", "invert"), ("None", "none"), (None, "none")):
        assert _units(tmp_path, module=module)[0].module == name
    for module in ("lineart", "lineart_realistic", "depth_midas", 3, "shuffle", "blur_gaussian", "tile_colorfix",
                   "reference_only"):
        with pytest.raises(BadRequest, match=f"sdlab has no preprocessor {module!r}; it has none, canny") as refused:
            _units(tmp_path, module=module)
        assert (refused.value.status, refused.value.detail) == (422, "Module not found")
        assert "downloaded" not in str(refused.value)
    unit = _units(tmp_path, module="tile_resample", threshold_a=2.5)[0]
    assert (unit.module, unit.threshold_a) == ("tile_resample", 2.5)


def _extension_inpaint_alpha(unit_image: np.ndarray | None, unit_mask: np.ndarray | None, init: np.ndarray | None,
                             run_mask: np.ndarray | None) -> np.ndarray:
    """The mask (alpha) the ControlNet extension gives an inpaint unit's input: Mikubill/sd-webui-controlnet
    scripts/controlnet.py, transcribed: `image_dict_from_any` (no mask: zeros), `choose_input_image` (a unit
    image's mask counts when `have_mask`; none: the init image, three channels) and `process` (without a mask
    that `image_has_mask`, the run's `prepare_mask` of the same size)."""
    if unit_image is None:                                      # use img2img init_image as default
        input_image = init
    else:
        mask = np.zeros_like(unit_image, dtype=np.uint8) if unit_mask is None else unit_mask
        while len(mask.shape) < 3:
            mask = mask[..., np.newaxis]
        have_mask = not ((mask[:, :, 0] == 0).all() or (mask[:, :, 0] == 255).all())
        alpha = mask[:, :, 0:1] if have_mask else np.zeros_like(unit_image)[:, :, 0:1]
        input_image = np.concatenate([unit_image, alpha], axis=2)
    image_has_mask = input_image.ndim == 3 and input_image.shape[2] == 4 and np.max(input_image[:, :, 3]) > 127
    if not image_has_mask and run_mask is not None:
        if run_mask.shape[0] == input_image.shape[0] and run_mask.shape[1] == input_image.shape[1]:
            input_image = np.concatenate([input_image[:, :, 0:3], run_mask[:, :, None]], axis=2)
    return input_image[:, :, 3] if input_image.shape[2] == 4 else np.zeros(input_image.shape[:2], np.uint8)


def test_a1111_inpaint_units_take_their_mask_as_the_extension_does(tmp_path):
    """An inpaint unit's mask is its `mask` (or `mask_image`, or its `{image, mask}` object's) where the extension
    reads one there; without one, or with a uniform one (all black, all white) or one nowhere above 127, the
    inpainting run's mask where it has the unit image's size, else none: the pixels sdlab's hint masks (-1)
    are those above 127 in the extension's alpha (`_extension_inpaint_alpha`), inpaint_global_harmonious
    being the extension's UI name of `inpaint`."""
    from sdlab.pipeline.control import _masked_hint, hint_tensor, inpaint_mask
    from sdlab.server.config import Limits
    from sdlab.server.controls import a1111_controls
    from sdlab.server.model_folders import CONTROLNET_SUFFIXES, ModelFolder

    (tmp_path / "ControlNet").mkdir()
    (tmp_path / "ControlNet" / "cn.safetensors").write_bytes(b"x")
    folder = ModelFolder(tmp_path / "ControlNet", CONTROLNET_SUFFIXES, hashed=True)
    init = Image.new("RGB", (16, 16), (90, 90, 90))
    own = Image.new("RGB", (16, 16), (20, 160, 40))
    run_mask = Image.new("L", (16, 16), 0)
    ImageDraw.Draw(run_mask).rectangle((4, 4, 11, 11), fill=255)
    left = Image.new("L", (16, 16), 0)
    ImageDraw.Draw(left).rectangle((0, 0, 5, 15), fill=255)
    faint = Image.new("L", (16, 16), 0)
    ImageDraw.Draw(faint).rectangle((0, 0, 5, 15), fill=100)
    uniform = [Image.new("L", (16, 16), 255), Image.new("L", (16, 16), 0)]
    cases = [("", None, init, run_mask), (own, None, init, run_mask), (own, uniform[0], init, run_mask),
             (own, uniform[1], init, run_mask), (own, left, init, run_mask), (own, faint, init, run_mask),
             (own, left.convert("RGB"), init, run_mask), (own, None, None, None), (own, left, None, None),
             (Image.new("RGB", (24, 24)), None, init, run_mask), (init, uniform[0], init, None)]
    for image, mask, run_init, run in cases:
        for module in ("inpaint_global_harmonious", "inpaint_only"):
            fields = {} if mask is None else {"mask": mask}
            if mask is not None and image is init:
                fields = {"image": {"image": image, "mask": mask}}
            unit = {"model": "cn", "image": image, "module": module, **fields}
            [control] = a1111_controls({"controlnet": {"args": [unit]}}, folder, Limits(), init=run_init)
            if run is None and module == "inpaint_only":
                continue                                        # refused outside an inpainting run
            width, height = control.image.size
            hint = hint_tensor(control.image.convert("RGB"), width, height, "resize")
            masked = _masked_hint(hint, control, 0, inpaint_mask(run), None, None, "resize")[0, 0] == -1
            alpha = _extension_inpaint_alpha(None if image == "" else np.asarray(image),
                                             None if mask is None else np.asarray(mask),
                                             np.asarray(run_init) if run_init is not None else None,
                                             None if run is None else np.asarray(inpaint_mask(run)))
            assert np.array_equal(masked.numpy(), alpha > 127), (image, mask, module)
    assert _units(tmp_path, module="canny", mask=left)[0].mask is None


def test_a1111_resize_mode_and_thresholds(tmp_path):
    """The extension's resize_mode_from_value (values, older aliases, indices; 3 and past the last: Just
    Resize; unset: Crop and Resize, its default) and threshold_a / threshold_b (-1: the preprocessor's)."""
    from sdlab.server.inputs import BadRequest

    for value, mode in ((None, "crop"), (0, "resize"), (1, "crop"), (2, "fill"), (3, "resize"), (7, "resize"),
                        ("Just Resize", "resize"), ("Crop and Resize", "crop"), ("Resize and Fill", "fill"),
                        ("Inner Fit (Scale to Fit)", "crop"), ("Envelope (Outer Fit)", "fill")):
        assert _units(tmp_path, resize_mode=value)[0].resize_mode == mode
    assert _units(tmp_path)[0].resize_mode == "crop"
    for bad in (-1, "crop", True):
        with pytest.raises(BadRequest, match="resize_mode") as refused:
            _units(tmp_path, resize_mode=bad)
        assert refused.value.status == 422
    unit = _units(tmp_path, module="canny", threshold_a=50, threshold_b=-1)[0]
    assert (unit.threshold_a, unit.threshold_b) == (50, None)
    with pytest.raises(BadRequest, match="threshold_b must be a number") as refused:
        _units(tmp_path, module="canny", threshold_b="high")
    assert refused.value.status == 422


def _extensions_bound_check(module: str, threshold_a: float, threshold_b: float) -> tuple[float, float]:
    """sd-webui-controlnet's `ControlNetUnit.bound_check_params` (internal_controlnet/args.py), transcribed for
    the sliders of its canny (scripts/preprocessor/model_free_preprocessors.py), threshold and tile_resample
    (legacy/preprocessor_compiled.py): a value below the minimum or above the maximum is the slider's value."""
    sliders = {"canny": ((1, 255, 100), (1, 255, 200)), "threshold": ((0, 255, 127),),
               "tile_resample": ((1.0, 8.0, 1.0),)}[module]
    values = [threshold_a, threshold_b]
    for index, (minimum, maximum, default) in enumerate(sliders):
        if values[index] < minimum or values[index] > maximum:
            values[index] = default
    return values[0], values[1]


def test_a1111_thresholds_outside_the_sliders_are_their_defaults(tmp_path):
    """A unit's threshold_a / threshold_b outside the extension's slider range is the preprocessor's default, as
    the extension resets it, so canny 0 / 300, a threshold of 300 or a tile_resample rate of 16 draw the
    hint of canny 100 / 200, 127, rate 1; values inside the range are kept."""
    from sdlab.pipeline.preprocess import PARAMETERS, preprocess

    picture = Image.new("RGB", (48, 40), (30, 30, 30))
    ImageDraw.Draw(picture).ellipse((8, 6, 40, 34), fill=(150, 200, 90))
    cases = [("canny", 0, 0), ("canny", 100, 300), ("canny", 50, 150), ("canny", 256, 1), ("canny", 1, 255),
             ("threshold", 300, -1), ("threshold", 0, -1), ("threshold", 200, -1),
             ("tile_resample", 16, -1), ("tile_resample", 0.5, -1), ("tile_resample", 2, -1)]
    for module, a, b in cases:
        [unit] = _units(tmp_path, module=module, image=picture, threshold_a=a, threshold_b=b)
        expected_a, expected_b = _extensions_bound_check(module, a, b)
        defaults = PARAMETERS[module]
        ours = preprocess(picture, module, unit.threshold_a, unit.threshold_b)
        reference = preprocess(picture, module, expected_a, expected_b if len(defaults) > 1 else None)
        assert np.array_equal(np.asarray(ours), np.asarray(reference)), (module, a, b)
        assert (unit.threshold_a is None) == (expected_a != a), (module, a, b)


def _extensions_hidden_slider(value: float) -> float:
    """A threshold of a preprocessor without that slider after the extension's `bound_check_params`: its hidden
    slider is `PreprocessorParameter(visible=False)` (scripts/supported_preprocessor.py, legacy_preprocessors.py),
    range 0..1, value 0.5; the preprocessor never reads it."""
    return value if 0.0 <= value <= 1.0 else 0.5


def test_a1111_thresholds_of_a_preprocessor_without_sliders_are_neither_used_nor_recorded(tmp_path):
    """webuiapi sends threshold_a = threshold_b = 64 with every unit; on none, scribble, invert, inpaint (and
    tile_resample's threshold_b) the extension resets it to its hidden slider's 0.5, which nothing reads, so
    the unit takes none and the picture records no Threshold A / B for it; canny's stay recorded."""
    from dataclasses import replace

    from sdlab.pipeline.control import infotext_lines

    assert _extensions_hidden_slider(64) == 0.5
    for module in ("none", "scribble", "invert (from white bg & black line)", "inpaint_global_harmonious"):
        [unit] = _units(tmp_path, module=module, threshold_a=64, threshold_b=64)
        assert (unit.threshold_a, unit.threshold_b) == (None, None), module
        assert "Threshold" not in infotext_lines([unit], "a1111")["ControlNet 0"], module
        given = replace(unit, threshold_a=30.0, threshold_b=60.0)     # as the CLI or the native API give them
        assert "Threshold" not in infotext_lines([given])["ControlNet 0"], module
    [tile] = _units(tmp_path, module="tile_resample", threshold_a=2, threshold_b=64)
    assert (tile.threshold_a, tile.threshold_b) == (2, None)
    line = infotext_lines([replace(tile, threshold_b=64.0)], "a1111")["ControlNet 0"]
    assert "Threshold A: 2" in line and "Threshold B" not in line, line
    [canny] = _units(tmp_path, module="canny", threshold_a=64, threshold_b=64)
    assert "Threshold A: 64, Threshold B: 64" in infotext_lines([canny], "a1111")["ControlNet 0"]


def _extensions_combine_image_and_mask(image: Image.Image, mask: Image.Image) -> None:
    """sd-webui-controlnet's `ControlNetUnit.combine_image_and_mask` (internal_controlnet/args.py), transcribed:
    a unit's mask of another (height, width) than its image is a ValueError."""
    if np.asarray(image).shape[:2] != np.asarray(mask).shape[:2]:
        raise ValueError(f"image shape ({np.asarray(image).shape[:2]}) not aligned with mask shape "
                         f"({np.asarray(mask).shape[:2]})")


def test_a_units_own_mask_of_another_size_than_its_image_is_a_422(tmp_path):
    """An inpaint unit's own mask (`mask`, `mask_image`, `{image, mask}`; an all-black one too) or a native
    entry's `mask` of another size than its image is one 422 naming both sizes, as the extension refuses it
    (`combine_image_and_mask`); a mask of the image's size is taken."""
    import types

    from sdlab.server.config import Limits
    from sdlab.server.controls import native_controls
    from sdlab.server.inputs import BadRequest

    image, fitting = Image.new("RGB", (8, 6)), Image.new("L", (8, 6))
    ImageDraw.Draw(fitting).rectangle((0, 0, 3, 5), fill=255)
    wide, black = fitting.resize((16, 6)), Image.new("L", (16, 6))
    for mask in (wide, black):
        with pytest.raises(ValueError, match="not aligned"):
            _extensions_combine_image_and_mask(image, mask)
    for fields in ({"mask": wide}, {"mask_image": wide}, {"image": {"image": image, "mask": wide}},
                   {"image": [image, black]}):
        with pytest.raises(BadRequest, match="the mask is 16x6 but its image 8x6") as refused:
            _units(tmp_path, module="inpaint_global_harmonious", **{"image": image, **fields})
        assert refused.value.status == 422
    assert _units(tmp_path, module="inpaint", image=image, mask=fitting)[0].mask.size == (8, 6)
    net = tmp_path / "ControlNet" / "cn.safetensors"
    folder = types.SimpleNamespace(find=lambda name: types.SimpleNamespace(path=net, kind="controlnet"),
                                   titles=lambda: ["cn"], without_paths=lambda text: text)
    entry = {"model": "cn", "image": b64_png(image), "module": "inpaint"}
    with pytest.raises(BadRequest, match="the mask is 16x6 but its image 8x6") as refused:
        native_controls([{**entry, "mask": b64_png(wide)}], folder, Limits())
    assert refused.value.status == 422
    assert native_controls([{**entry, "mask": b64_png(fitting)}], folder, Limits())[0].mask.size == (8, 6)


def test_an_img2img_units_mask_of_another_size_than_the_init_it_takes_is_a_422(tmp_path):
    """A unit with no image of its own takes img2img's init image: its own mask is checked against that picture,
    as against a unit's own image, so a 16x16 mask over a 32x32 init is the same 422 naming both sizes, an
    all-black one (read as no mask) too; a mask of the init's size is taken."""
    from sdlab.server.config import Limits
    from sdlab.server.controls import a1111_controls
    from sdlab.server.inputs import BadRequest

    _units(tmp_path)                                            # the folder's ControlNet file
    from sdlab.server.model_folders import CONTROLNET_SUFFIXES, ModelFolder
    folder = ModelFolder(tmp_path / "ControlNet", CONTROLNET_SUFFIXES, hashed=True)
    init, small, fitting = Image.new("RGB", (32, 32)), Image.new("L", (16, 16)), Image.new("L", (32, 32))
    for mask in (small, fitting):
        ImageDraw.Draw(mask).rectangle((0, 0, 7, 7), fill=255)

    def units(mask):
        unit = {"model": "cn", "image": "", "module": "inpaint_only", "mask": mask}
        return a1111_controls({"controlnet": {"args": [unit]}}, folder, Limits(), init)
    for mask in (small, Image.new("L", (16, 16))):
        with pytest.raises(BadRequest, match="the mask is 16x16 but its image 32x32") as refused:
            units(mask)
        assert refused.value.status == 422
    assert units(fitting)[0].mask.size == (32, 32)


def test_native_thresholds_of_minus_one_are_the_defaults(tmp_path):
    """A native entry's threshold_a / threshold_b of -1 (any negative number) is the preprocessor's default, as
    `--control-threshold-a -1` and an A1111 unit's -1 are; a text is still a 422."""
    import types

    from sdlab.server.config import Limits
    from sdlab.server.controls import native_controls
    from sdlab.server.inputs import BadRequest

    _units(tmp_path)                                            # the folder's ControlNet file
    net = tmp_path / "ControlNet" / "cn.safetensors"
    folder = types.SimpleNamespace(find=lambda name: types.SimpleNamespace(path=net, kind="controlnet"),
                                   titles=lambda: ["cn"], without_paths=lambda text: text)
    entry = {"model": "cn", "image": b64_png(Image.new("RGB", (8, 8))), "module": "canny"}
    [control] = native_controls([{**entry, "threshold_a": -1, "threshold_b": -2.5}], folder, Limits())
    assert (control.threshold_a, control.threshold_b) == (None, None)
    assert native_controls([{**entry, "threshold_a": 0, "threshold_b": 30}], folder, Limits())[0].threshold_b == 30
    with pytest.raises(BadRequest, match="threshold_a must be a number"):
        native_controls([{**entry, "threshold_a": "low"}], folder, Limits())


def test_native_processor_res_stops_at_the_sliders_top(tmp_path):
    """A native entry's processor_res above 2048 (A1111's slider's top) is a 422 naming it, not a resize that
    takes gigabytes; 2048 and unset (the hint's own size) are taken."""
    import types

    from sdlab.server.config import Limits
    from sdlab.server.controls import native_controls
    from sdlab.server.inputs import BadRequest

    _units(tmp_path)
    net = tmp_path / "ControlNet" / "cn.safetensors"
    folder = types.SimpleNamespace(find=lambda name: types.SimpleNamespace(path=net, kind="controlnet"),
                                   titles=lambda: ["cn"], without_paths=lambda text: text)
    entry = {"model": "cn", "image": b64_png(Image.new("RGB", (8, 8))), "module": "canny"}
    for given in (2048, None, -1):
        assert native_controls([{**entry, "processor_res": given}], folder, Limits())[0].processor_res in (given, None)
    for given in (2049, 100000):
        with pytest.raises(BadRequest, match=r"processor_res must be a whole number in 1\.\.2048") as refused:
            native_controls([{**entry, "processor_res": given}], folder, Limits())
        assert refused.value.status == 422


def test_a1111_units_in_the_extensions_other_forms(tmp_path):
    """The extension's `legacy_field_alias` ("guidance" is guidance_end) and the image forms its
    `get_input_images_rgba` reads: [image, mask], (image, mask) and [{"image": ..., "mask": ...}] give the unit
    the picture and mask that {"image": ..., "mask": ...} gives it; a batch of pictures is a 422."""
    from sdlab.server.inputs import BadRequest

    assert _units(tmp_path, guidance=0.4)[0].end == 0.4
    assert _units(tmp_path, guidance=0.4, guidance_end=0.7)[0].end == 0.7
    root = tmp_path / "pictures"
    root.mkdir()
    picture, mask = Image.new("RGB", (16, 16), (20, 160, 40)), Image.new("L", (16, 16), 0)
    ImageDraw.Draw(mask).rectangle((2, 2, 9, 9), fill=255)
    picture.save(root / "picture.png")
    mask.save(root / "mask.png")
    image, mask = file_b64(root / "picture.png"), file_b64(root / "mask.png")
    [expected] = _units(tmp_path, module="inpaint", image={"image": image, "mask": mask})
    for form in ([image, mask], (image, mask), [{"image": image, "mask": mask}]):
        [unit] = _units(tmp_path, module="inpaint", image=form)
        assert np.array_equal(np.asarray(unit.image), np.asarray(expected.image))
        assert np.array_equal(np.asarray(unit.mask), np.asarray(expected.mask))
    for batch in ([{"image": image}, {"image": image}], [image, mask, image]):
        with pytest.raises(BadRequest, match="image must be one picture") as refused:
            _units(tmp_path, image=batch)
        assert refused.value.status == 422


def _extensions_resize_mode_from_value(value: int) -> str:
    """sd-webui-controlnet's `resize_mode_from_value` of an int (internal_controlnet/external_code.py), in
    sdlab's names of its ResizeMode members."""
    members = ["resize", "crop", "fill"]                    # RESIZE, INNER_FIT, OUTER_FIT
    if value == 3:                                          # 'Just resize (latent upscale)'
        return "resize"
    if value >= len(members):
        return "resize"
    return members[value]


def test_a1111_units_without_an_image_take_img2imgs_resize_mode(tmp_path):
    """The extension's `choose_input_image`: a unit without an image of its own reads img2img's init image with
    img2img's resize mode (`resize_mode_from_value(p.resize_mode)`), whatever mode the unit names, and keeps the
    one it names to record (its infotext is its unit's, `serialize_unit`); a unit with its own image runs with its
    own."""
    from sdlab.server.config import Limits
    from sdlab.server.controls import a1111_controls
    from sdlab.server.model_folders import CONTROLNET_SUFFIXES, ModelFolder

    (tmp_path / "ControlNet").mkdir()
    (tmp_path / "ControlNet" / "cn.safetensors").write_bytes(b"x")
    folder = ModelFolder(tmp_path / "ControlNet", CONTROLNET_SUFFIXES, hashed=True)
    init, own = Image.new("RGB", (32, 16), "gray"), Image.new("RGB", (16, 16), "white")
    for img2img_mode in range(4):
        for unit_mode in (None, "Crop and Resize", "Resize and Fill", 0):
            units = [{"model": "cn", "image": "", "resize_mode": unit_mode},
                     {"model": "cn", "image": own, "resize_mode": unit_mode}]
            taken, kept = a1111_controls({"controlnet": {"args": units}}, folder, Limits(), init, img2img_mode)
            runs = _extensions_resize_mode_from_value(img2img_mode)
            assert taken.image is init and taken.resize_mode_under("a1111") == runs
            assert kept.resize_mode == taken.resize_mode == _units(tmp_path, resize_mode=unit_mode)[0].resize_mode
            assert kept.resize_mode_under("a1111") == kept.recorded_resize_mode_under("a1111") \
                == taken.recorded_resize_mode_under("a1111")


def test_img2img_units_without_an_image_draw_with_img2imgs_resize_mode(setup, tmp_path):
    """/sdapi/v1/img2img gives a unit without an image its resize_mode (2: Resize and Fill) to draw with: the
    picture equals the unit given the init picture with Resize and Fill, and records the unit's own resize mode (the
    extension's default for units, Crop and Resize), as the extension's infotext (`serialize_unit` of its unit)."""
    init_picture = Image.new("RGB", (128, 64), "black")
    ImageDraw.Draw(init_picture).rectangle((40, 8, 90, 56), outline="white", width=4)
    init_picture.save(tmp_path / "init.png")
    response = httpx.post(setup["server"].url + "/sdapi/v1/img2img", timeout=300, json={
        **GEN, "steps": 2, "init_images": [file_b64(tmp_path / "init.png")], "resize_mode": 2, "denoising_strength": 0.5,
        "alwayson_scripts": {"controlnet": {"args": [{"model": "tiny_canny", "image": "", "module": "none"}]}}})
    assert response.status_code == 200, response.text
    assert "Resize Mode: Crop and Resize" in json.loads(response.json()["info"])["infotexts"][0]
    given = httpx.post(setup["server"].url + "/sdapi/v1/img2img", timeout=300, json={
        **GEN, "steps": 2, "init_images": [file_b64(tmp_path / "init.png")], "resize_mode": 2, "denoising_strength": 0.5,
        "alwayson_scripts": {"controlnet": {"args": [{"model": "tiny_canny", "image": file_b64(tmp_path / "init.png"),
                                                      "module": "none", "resize_mode": "Resize and Fill"}]}}})
    assert given.status_code == 200, given.text
    drawn, with_init = (np.asarray(png_picture(base64.b64decode(answer.json()["images"][0])).convert("RGB"))
                        for answer in (response, given))
    assert np.array_equal(drawn, with_init)


def test_native_controls_take_thresholds_and_a_mask(setup, tmp_path):
    """A native `controls` entry's threshold_a / threshold_b and an inpaint entry's mask draw what `sdlab
    txt2img --control-threshold-a / -b --control-mask` draws; the job records the thresholds."""
    mask = tmp_path / "mask.png"
    Image.new("L", (64, 64), 0).save(mask)
    ImageDraw.Draw(image := Image.open(mask)).rectangle((8, 8, 40, 30), fill=255)
    image.save(mask)
    settings = (("canny", "--control-threshold-a", 20, "--control-threshold-b", 60, None),
                ("inpaint", "--control-mask", str(mask), None, None, mask))
    with httpx.Client(base_url=setup["server"].url, timeout=300) as client:
        for module, flag_a, value_a, flag_b, value_b, entry_mask in settings:
            flags = [flag_a, str(value_a)] + ([flag_b, str(value_b)] if flag_b else [])
            cli = cli_txt2img(tmp_path, GEN["prompt"], "--steps", "3", "--seed", "11", "--width", "64", "--height", "64",
                       "--cfg", "5", "--sampler", "Euler", "--control", f"{setup['net']}:{setup['hint']}:0.8",
                       "--control-module", module, *flags)
            control = {"model": "tiny_canny", "image": file_b64(setup["hint"]), "strength": 0.8, "module": module}
            control.update({"threshold_a": value_a, "threshold_b": value_b} if entry_mask is None
                           else {"mask": file_b64(entry_mask)})
            job = _finished_job(client, {**GEN, "sampler": "Euler", "controls": [control]})
            assert job["status"] == "done", job
            _same(png_picture(client.get(job["images"][0]).content), cli)
            if entry_mask is None:
                recorded = job["request"]["controls"][0]
                assert (recorded["threshold_a"], recorded["threshold_b"]) == (value_a, value_b)


def _img2img(url: str, **fields) -> dict:
    response = httpx.post(url + "/sdapi/v1/img2img", timeout=300, json={
        **GEN, "sampler_name": "Euler", "denoising_strength": 0.5, "inpaint_full_res": False, **fields})
    assert response.status_code == 200, response.text
    return response.json()


def test_a_unit_without_an_image_takes_each_script_pass_own_init_picture(setup):
    """The extension's `get_input_data` reads `p.init_images[0]` at every `process_images`, so under SD upscale
    a unit without an image takes each tile, under Loopback each pass's picture: each is the single img2img of
    that tile / picture with the unit (before: the request's whole init picture)."""
    url, rng = setup["server"].url, np.random.default_rng(0)
    unit = {"alwayson_scripts": {"controlnet": {"args": [{"model": "tiny_canny", "image": "", "module": "none",
                                                          "resize_mode": "Just Resize"}]}}}
    init = Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8))
    upscaled = _img2img(url, init_images=[b64_png(init)], script_name="SD upscale", script_args=["", 32, "None", 1],
                        **unit)
    combined = np.asarray(png_picture(base64.b64decode(upscaled["images"][0])).convert("RGB"))
    tile = _img2img(url, init_images=[b64_png(init.crop((0, 0, 64, 64)))], **unit)["images"][0]
    alone = np.asarray(png_picture(base64.b64decode(tile)).convert("RGB"))
    assert np.array_equal(combined[:32, :32], alone[:32, :32])      # the corner only tile 0 covers

    looped = _img2img(url, init_images=[b64_png(init.resize((64, 64)))], script_name="Loopback",
                      script_args=[2, 0.5, "Linear", "None"], **unit)["images"]
    second = _img2img(url, init_images=[looped[1]], seed=GEN["seed"] + 1, **unit)["images"][0]
    assert np.array_equal(np.asarray(png_picture(base64.b64decode(looped[2])).convert("RGB")),
                          np.asarray(png_picture(base64.b64decode(second)).convert("RGB")))


def test_a1111_units_processor_res_and_pixel_perfect(tmp_path):
    """A unit's processor_res as the extension takes it (unset or null: its ControlNetUnit's -1; outside its
    slider 64..2048, -1 too: 512, `bound_check_params`) and its pixel_perfect; a processor_res that is no number
    is a 422."""
    from sdlab.server.inputs import BadRequest

    for fields, taken in (({}, (512, False)), ({"processor_res": None}, (512, False)), ({"processor_res": 256}, (256, False)),
                          ({"processor_res": -1, "pixel_perfect": True}, (512, True)),
                          ({"processor_res": 4096, "pixel_perfect": None}, (512, False))):
        [unit] = _units(tmp_path, module="canny", **fields)
        assert (unit.processor_res, unit.pixel_perfect) == taken, fields
    for bad in ({"processor_res": "big"}, {"processor_res": 300.5}, {"pixel_perfect": "yes"}):
        with pytest.raises(BadRequest) as refused:
            _units(tmp_path, module="canny", **bad)
        assert refused.value.status == 422


def test_processor_res_draws_in_detect_units_native_controls_and_the_cli(setup, tmp_path):
    """canny at processor_res 256: /controlnet/detect answers the 256 px map (unset: 512, the extension's); an A1111
    unit records `Processor Res: 256` and its picture is redrawn by --from-png; a native entry draws what
    `--control-processor-res 256` draws, and differs from the picture's own size."""
    from sdlab.pipeline.preprocess import preprocess

    url = setup["server"].url
    hint = Image.open(setup["hint"])
    for given, side in ((256, 256), (None, 512)):
        body = {"controlnet_module": "canny", "controlnet_input_images": [file_b64(setup["hint"])]}
        answer = httpx.post(url + "/controlnet/detect", timeout=60,
                            json={**body, **({} if given is None else {"controlnet_processor_res": given})})
        assert answer.status_code == 200, answer.text
        drawn = png_picture(base64.b64decode(answer.json()["images"][0]))
        assert drawn.size == (side, side)
        assert np.array_equal(np.asarray(drawn.convert("RGB")), np.asarray(preprocess(hint, "canny", resolution=given or 512)))

    unit = {"enabled": True, "model": "tiny_canny", "image": file_b64(setup["hint"]), "module": "canny",
            "processor_res": 256, "resize_mode": "Just Resize"}
    response = httpx.post(url + "/sdapi/v1/txt2img", timeout=300, json={
        **GEN, "sampler_name": "Euler", "scheduler": "sgm_uniform", "alwayson_scripts": {"controlnet": {"args": [unit]}}})
    assert response.status_code == 200, response.text
    served = base64.b64decode(response.json()["images"][0])
    assert "Processor Res: 256" in png_picture(served).info["parameters"]
    (tmp_path / "served.png").write_bytes(served)
    _same(png_picture(served), cli_txt2img(tmp_path, "--from-png", str(tmp_path / "served.png"),
                                 "--control", f"{setup['net']}:{setup['hint']}"))

    cli = cli_txt2img(tmp_path, GEN["prompt"], "--steps", "3", "--seed", "11", "--width", "64", "--height", "64", "--cfg",
               "5", "--sampler", "Euler", "--control", f"{setup['net']}:{setup['hint']}", "--control-module", "canny",
               "--control-processor-res", "256")
    with httpx.Client(base_url=url, timeout=300) as client:
        control = {"model": "tiny_canny", "image": file_b64(setup["hint"]), "module": "canny"}
        job = _finished_job(client, {**GEN, "sampler": "Euler", "controls": [{**control, "processor_res": 256}]})
        assert job["status"] == "done", job
        _same(png_picture(client.get(job["images"][0]).content), cli)
        own_size = _finished_job(client, {**GEN, "sampler": "Euler", "controls": [control]})
        assert not np.array_equal(np.asarray(png_picture(client.get(own_size["images"][0]).content)), np.asarray(cli))


def test_a_map_past_the_bound_is_one_line_in_detect_units_and_the_cli(setup, tmp_path):
    """A 1024 x 4 strip at the default processor_res 512 would be a 131072 x 512 map: /controlnet/detect answers a
    422, an A1111 unit fails its job with the message, the CLI says it in one line, none draws it."""
    url = setup["server"].url
    strip = tmp_path / "strip.png"
    Image.new("RGB", (1024, 4), "white").save(strip)
    message = "processor resolution 512 scales the 1024x4 picture to 131072x512, past the 16777216 pixels"
    answer = httpx.post(url + "/controlnet/detect", timeout=60,
                        json={"controlnet_module": "canny", "controlnet_input_images": [file_b64(strip)]})
    assert answer.status_code == 422 and message in answer.text
    unit = {"enabled": True, "model": "tiny_canny", "image": file_b64(strip), "module": "canny"}
    response = httpx.post(url + "/sdapi/v1/txt2img", timeout=300, json={
        **GEN, "steps": 1, "alwayson_scripts": {"controlnet": {"args": [unit]}}})
    assert response.status_code == 400 and message in response.text
    result = subprocess.run([sys.executable, "-m", "sdlab", "txt2img", "a cat", "--steps", "1", "--width", "64",
                             "--height", "64", "--control", f"{setup['net']}:{strip}", "--control-module", "canny",
                             "--control-processor-res", "512", "--out", str(tmp_path / "o.png"), "--no-progress"],
                            capture_output=True, text=True, env=server_env(), timeout=300)
    assert result.returncode != 0 and message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.png").exists()
