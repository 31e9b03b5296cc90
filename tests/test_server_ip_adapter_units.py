"""IP-Adapter units of A1111's ControlNet extension through `/sdapi/v1/txt2img` / `img2img`
(`alwayson_scripts.controlnet.args`, a unit's module an ip-adapter preprocessor): the picture equals the native
`ip_adapters` job of the same settings (read back from the picture's infotext by `/api/parameters`), mixed with a
ControlNet unit and a disabled one; the encoder the module names (clip_h / clip_g) is found beside the adapter
and must fit it; the face modules, a model that is no IP-Adapter and bad numbers are 4xx naming the module; the
`ControlNet N` line is the extension's form; `/controlnet/module_list` lists the modules."""

from __future__ import annotations

import base64
import json

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw

from controlnet_fixtures import diffusers_controlnet, write_layout
from ip_adapter_fixtures import (SAMPLE_PICTURE, ip_adapter_plus_state, ip_adapter_state, write_image_encoder,
                                 write_ip_adapter)
from server_fixtures import b64_png, drawn_job, file_b64, job_pixels, png_picture, start_server
from test_ip_adapter_layers import face_id_state

GEN = {"prompt": "a red apple", "negative_prompt": "blurry", "steps": 4, "seed": 11, "width": 64, "height": 64,
       "cfg_scale": 5, "sampler_name": "Euler"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    import sdlab
    from sdlab.models.ip_adapter import cross_attentions

    root = tmp_path_factory.mktemp("server-ip-adapter-units")
    models = root / "models"
    (models / "ControlNet" / "lone").mkdir(parents=True)
    bundle = sdlab.load().bundle
    context = bundle.unet_config.context_dim
    widths = [attn.to_q.weight.shape[0] for attn in cross_attentions(bundle.unet)]
    write_image_encoder(models / "image_encoder", seed=2, width=128, projection=32)       # h94's layout: ViT-H's
    write_image_encoder(models / "clip_vision" / "clip_g", seed=4, width=128, projection=48)   # the extension's
    controlnet = models / "ControlNet"
    write_ip_adapter(controlnet / "ip-adapter_tiny.safetensors", ip_adapter_state(widths, context, 32, seed=3, std=0.3))
    write_ip_adapter(controlnet / "ip-adapter-plus_tiny.safetensors",
                     ip_adapter_plus_state(widths, context, 128, width=64, depth=2, seed=5, std=0.2))
    write_ip_adapter(controlnet / "lone" / "ip-adapter_lone.safetensors", ip_adapter_state(widths, context, 32))
    # reads clip_g's 48-wide embeddings: drawn by ip-adapter_clip_g only (its own image_encoder is 32 wide)
    write_ip_adapter(controlnet / "ip-adapter_g48.safetensors", ip_adapter_state(widths, context, 48, seed=9, std=0.3))
    write_ip_adapter(controlnet / "ip-adapter-faceid_tiny.bin", face_id_state(widths, context))   # face embedding
    factor = bundle.vae_config.downsample_factor
    net = write_layout(diffusers_controlnet(bundle.unet_config, 3, hint_widths=(16, 32, 96, 256)[: factor.bit_length()],
                                            std=0.05), "diffusers-file", controlnet)
    net.rename(controlnet / "tiny_canny.safetensors")
    picture = root / "reference.png"
    Image.open(SAMPLE_PICTURE).convert("RGB").crop((0, 0, 200, 160)).save(picture)
    hint = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(hint).rectangle([10, 10, 50, 50], outline="white", width=4)
    server = start_server(root / "outputs", "--models-dir", str(models))
    client = httpx.Client(base_url=server.url, timeout=300)
    yield {"client": client, "picture": file_b64(picture), "hint": b64_png(hint), "models": models,
           "picture_file": picture}
    client.close()
    server.stop()


def _unit(setup, **change) -> dict:
    return {"enabled": True, "module": "ip-adapter_clip_sd15", "model": "ip-adapter_tiny", "weight": 0.7,
            "image": setup["picture"], "guidance_start": 0.0, "guidance_end": 1.0, **change}


def _txt2img(setup, *units, **body) -> httpx.Response:
    return setup["client"].post("/sdapi/v1/txt2img", json={
        **GEN, **body, "alwayson_scripts": {"controlnet": {"args": list(units)}}})


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(png_picture(base64.b64decode(b64)).convert("RGB"), dtype=np.int16)


def _redrawn(setup, answer: httpx.Response, images: dict[str, list[str]]) -> np.ndarray:
    """The native job of the settings the answer's picture records (`/api/parameters`), given the pictures the
    text does not hold (`images`: per entry list, in order)."""
    from sdlab.server.native import JobIn

    client = setup["client"]
    settings = client.post("/api/parameters", json={"image": answer.json()["images"][0]}).json()["settings"]
    body = {key: value for key, value in settings.items()
            if value is not None and key in JobIn.model_fields and key != "model"}
    for key, pictures in images.items():
        assert len(body[key]) == len(pictures), body
        body[key] = [{**entry, "image": image} for entry, image in zip(body[key], pictures)]
    return job_pixels(client, drawn_job(client, body))


def _extension_parse_unit(text: str) -> dict:
    """sd-webui-controlnet scripts/infotext.py (v1.1.455) `parse_unit` and `parse_value`, transcribed: the
    fields a pasted `ControlNet N` line gives a unit."""
    def parse_value(value: str):
        if value in ("True", "False"):
            return value == "True"
        try:
            return int(value)
        except ValueError:
            try:
                return float(value)
            except ValueError:
                return value

    return {"_".join(word.lower() for word in key.split(" ")): parse_value(value)
            for item in text.split(",") for (key, value) in (item.strip().split(": "),)}


def test_an_ip_adapter_unit_draws_the_native_ip_adapter_of_its_settings(setup):
    client = setup["client"]
    model = next(title for title in client.get("/controlnet/model_list").json()["model_list"]
                 if title.startswith("ip-adapter_tiny ["))
    unit = _unit(setup, model=model, guidance_start=0.25, guidance_end=0.8, resize_mode="Just Resize",
                 processor_res=256, pixel_perfect=True, control_mode="My prompt is more important")
    drawn = _txt2img(setup, unit)
    assert drawn.status_code == 200, drawn.text
    plain = _txt2img(setup)
    assert np.abs(_pixels(drawn.json()["images"][0]) - _pixels(plain.json()["images"][0])).max() > 10
    text = json.loads(drawn.json()["info"])["infotexts"][0]
    line = text.split('ControlNet 0: "')[1].split('"')[0]
    assert line == (f"Module: ip-adapter_clip_sd15, Model: {model}, Weight: 0.7, Resize Mode: Just Resize, "
                    "Guidance Start: 0.25, Guidance End: 0.8")        # the resize mode fits an "Only masked" cut
    assert _extension_parse_unit(line) == {"module": "ip-adapter_clip_sd15", "model": model, "weight": 0.7,
                                           "resize_mode": "Just Resize", "guidance_start": 0.25, "guidance_end": 0.8}
    assert "Control steps: a1111" in text
    native = _redrawn(setup, drawn, {"ip_adapters": [setup["picture"]]})
    assert np.array_equal(native, _pixels(drawn.json()["images"][0]))
    # the same unit with every step: the window acts (0.25 .. 0.8 of 4 steps leaves the first and last out)
    full = _txt2img(setup, _unit(setup, model=model))
    assert np.abs(_pixels(full.json()["images"][0]) - _pixels(drawn.json()["images"][0])).max() > 0


def test_units_mixed_with_a_controlnet_and_a_disabled_one_equal_the_native_job(setup):
    ip = _unit(setup, module="ip-adapter-auto", weight=0.9, guidance_end=0.5)
    off = _unit(setup, enabled=False, model="not there", module="ip-adapter_face_id")
    control = {"enabled": True, "module": "none", "model": "tiny_canny", "image": setup["hint"], "weight": 0.8}
    drawn = _txt2img(setup, control, off, ip)
    assert drawn.status_code == 200, drawn.text
    text = json.loads(drawn.json()["info"])["infotexts"][0]
    assert 'ControlNet 0: "Module: none, Model: tiny_canny [' in text
    assert 'ControlNet 1: "Module: ip-adapter-auto, Model: ip-adapter_tiny [' in text
    native = _redrawn(setup, drawn, {"controls": [setup["hint"]], "ip_adapters": [setup["picture"]]})
    assert np.array_equal(native, _pixels(drawn.json()["images"][0]))
    alone = _txt2img(setup, control)
    assert np.abs(_pixels(alone.json()["images"][0]) - _pixels(drawn.json()["images"][0])).max() > 0
    # the image prompt first: its line is ControlNet 0, as the extension numbers its enabled units; the same picture
    first = _txt2img(setup, ip, off, control)
    text = json.loads(first.json()["info"])["infotexts"][0]
    assert 'ControlNet 0: "Module: ip-adapter-auto, Model: ip-adapter_tiny [' in text
    assert 'ControlNet 1: "Module: none, Model: tiny_canny [' in text
    assert np.array_equal(_pixels(first.json()["images"][0]), _pixels(drawn.json()["images"][0]))
    assert np.array_equal(_redrawn(setup, first, {"controls": [setup["hint"]], "ip_adapters": [setup["picture"]]}),
                          _pixels(drawn.json()["images"][0]))


def test_a_plus_unit_and_an_img2img_unit_without_an_image(setup):
    plus = _unit(setup, module="ip-adapter_clip_h", model="ip-adapter-plus_tiny", input_image=setup["picture"],
                 image=None, weight=0.6)
    drawn = _txt2img(setup, plus)
    assert drawn.status_code == 200, drawn.text
    assert np.array_equal(_redrawn(setup, drawn, {"ip_adapters": [setup["picture"]]}),
                          _pixels(drawn.json()["images"][0]))
    # img2img: a unit without an image takes the init picture, as the extension's `choose_input_image`
    client = setup["client"]
    body = {**GEN, "init_images": [setup["picture"]], "denoising_strength": 0.6}
    bare = client.post("/sdapi/v1/img2img", json={**body, "alwayson_scripts": {"controlnet": {"args": [
        _unit(setup, image="")]}}})
    given = client.post("/sdapi/v1/img2img", json={**body, "alwayson_scripts": {"controlnet": {"args": [
        _unit(setup, image={"image": setup["picture"], "mask": None})]}}})
    assert bare.status_code == 200 and given.status_code == 200, (bare.text, given.text)
    assert np.array_equal(_pixels(bare.json()["images"][0]), _pixels(given.json()["images"][0]))


@pytest.mark.parametrize("change, status, words", [
    ({"module": "ip-adapter_face_id_plus"}, 422, "computes this module's face embedding with InsightFace, which "
     "sdlab does not have; send the embedding as the unit's ipadapter_input"),
    ({"module": "InsightFace+CLIP-H (IPAdapter)"}, 422, "'InsightFace+CLIP-H (IPAdapter)' reads faces"),
    ({"module": "ip-adapter_clip_sdxl"}, 422, "module 'ip-adapter_clip_sdxl' draws with the image encoder"),
    ({"module": "CLIP-ViT-bigG (IPAdapter)"}, 422, "reads 32-wide image embeddings"),
    ({"model": "ip-adapter_lone"}, 422, "ViT-H/14 (clip_h / CLIP-ViT-H-14) image encoder, and there is none"),
    ({"model": "tiny_canny"}, 422, "this is a ControlNet, not an IP-Adapter"),
    ({"model": "ip-adapter-faceid_tiny"}, 422, "is a FaceID model: it reads an InsightFace face embedding (512 "
     "numbers), which sdlab does not compute, not a CLIP module's picture; give it the module ip-adapter_face_id "
     "with the embedding (an A1111 unit's ipadapter_input"),
    ({"model": "nothing such"}, 404, "unknown ControlNet model 'nothing such'"),
    ({"weight": 20}, 422, "scale must be a number in [0, 10]"),
    ({"guidance_start": 0.8, "guidance_end": 0.2}, 422, "need 0 <= start <= end <= 1"),
    ({"module": "ip-adapter_clip_x"}, 422, "unknown IP-Adapter module 'ip-adapter_clip_x'"),
    ({"image": None}, 422, "needs an image"),
])
def test_bad_units_are_refused_naming_the_module(setup, change, status, words):
    refused = _txt2img(setup, _unit(setup, **change))
    assert refused.status_code == status and words in refused.text, refused.text
    if status == 422:
        assert f"module {change.get('module', 'ip-adapter_clip_sd15')!r}" in refused.text


def _job_count(client: httpx.Client) -> int:
    return len(client.get("/api/jobs").json()["jobs"])


@pytest.mark.parametrize("module", ["none", "canny", "Canny"])
def test_an_ip_adapter_model_under_a_controlnet_module_is_a_422_at_submit(setup, module):
    """sd-webui-controlnet (v1.1.455) hands an IP-Adapter the unit's preprocessor output as its CLIP vision output,
    so a ControlNet preprocessor under an IP-Adapter model fails as it draws; sdlab refuses it before queueing, naming
    the unit, the model and the module (it failed its job at load with a 400 before)."""
    client = setup["client"]
    before = _job_count(client)
    refused = _txt2img(setup, _unit(setup, module=module))
    assert refused.status_code == 422, refused.text
    detail = refused.json()["detail"]
    assert detail.startswith(f"control 0 (module {module!r}): ip-adapter_tiny ["), detail
    assert "is an IP-Adapter, not a ControlNet or T2I-Adapter" in detail and "ip-adapter_clip_h" in detail
    assert _job_count(client) == before
    # the second unit, after a ControlNet unit, is named by its place
    refused = _txt2img(setup, {"module": "canny", "model": "tiny_canny", "image": setup["hint"]},
                       _unit(setup, module=module))
    assert refused.status_code == 422 and refused.json()["detail"].startswith(f"control 1 (module {module!r})")


def test_the_three_pairings_of_model_and_module_on_both_routes(setup):
    """(a) the canonical pairing (an IP-Adapter module, an IP-Adapter model) draws; (b) an IP-Adapter model under a
    ControlNet module and (c) a ControlNet under an IP-Adapter module are each one 422 at submit naming the unit, the
    model and the module; the native route's counterparts (an entry of the other field's kind, or a module of the
    other kind) are 422s too, and no job is queued by any of them."""
    client, picture = setup["client"], setup["picture"]
    drawn = _txt2img(setup, _unit(setup), steps=2)                                              # (a)
    assert drawn.status_code == 200, drawn.text
    after_draw = _job_count(client)
    wrong_model = _txt2img(setup, _unit(setup, module="canny"))                                  # (b)
    assert wrong_model.status_code == 422 and "control 0 (module 'canny'): ip-adapter_tiny [" in wrong_model.text
    wrong_module = _txt2img(setup, _unit(setup, model="tiny_canny"))                            # (c)
    assert wrong_module.status_code == 422, wrong_module.text
    assert "control 0 (module 'ip-adapter_clip_sd15')" in wrong_module.text and "tiny_canny [" in wrong_module.text
    assert "this is a ControlNet, not an IP-Adapter" in wrong_module.text
    job = {"prompt": "a red apple", "steps": 2, "width": 64, "height": 64}
    native = [
        ({"controls": [{"model": "ip-adapter_tiny", "image": picture, "module": "canny"}]}, "is an IP-Adapter"),
        ({"ip_adapters": [{"model": "tiny_canny", "image": picture}]}, "is a ControlNet or T2I-Adapter"),
        ({"ip_adapters": [{"model": "ip-adapter_tiny", "image": picture, "module": "canny"}]},
         "unknown IP-Adapter module 'canny'"),
        ({"controls": [{"model": "tiny_canny", "image": picture, "module": "ip-adapter_clip_sd15"}]},
         "ip-adapter_clip_sd15"),
    ]
    for fields, words in native:
        refused = client.post("/api/jobs", json={**job, **fields})
        assert refused.status_code == 422 and words in refused.text, (fields, refused.text)
    assert _job_count(client) == after_draw


def test_module_list_and_control_types_list_the_ip_adapter_modules(setup):
    client = setup["client"]
    listed = client.get("/controlnet/module_list").json()               # the extension's names
    aliased = client.get("/controlnet/module_list", params={"alias_names": True}).json()      # its labels
    for module in ("ip-adapter-auto", "ip-adapter_clip_sd15", "ip-adapter_clip_sdxl", "ip-adapter_clip_sdxl_plus_vith",
                   "ip-adapter_face_id", "ip-adapter_face_id_plus"):
        assert module in listed["module_list"] and listed["module_detail"][module] == {"model_free": False,
                                                                                        "sliders": []}
    for module in ("ip-adapter-auto", "ip-adapter_clip_h", "ip-adapter_clip_g", "ip-adapter_clip_sdxl_plus_vith",
                   "ip-adapter_face_id", "ip-adapter_face_id_plus"):
        assert module in aliased["module_list"] and aliased["module_detail"][module] == {"model_free": False,
                                                                                          "sliders": []}
    assert "ip-adapter_pulid" not in listed["module_list"]            # a face module sdlab does not draw
    kind = client.get("/controlnet/control_types").json()["control_types"]["IP-Adapter"]
    assert kind["default_option"] == "ip-adapter-auto"            # the extension's: the first after none
    assert kind["module_list"] == ["none", "ip-adapter-auto", "ip-adapter_clip_h", "ip-adapter_face_id_plus",
                                   "ip-adapter_face_id", "ip-adapter_clip_sdxl_plus_vith", "ip-adapter_clip_g"]
    assert any(model.startswith("ip-adapter_tiny [") for model in kind["model_list"])


def test_a_unit_prepares_its_picture_as_the_extension_and_takes_its_mask(setup):
    """The unit's picture is squashed as the extension's CLIP preprocessor squashes it (control_convention a1111,
    `clip_image.extension_clip_pixels`), not cut as diffusers' CLIPImageProcessor: the native job with the
    diffusers convention draws another picture, with a1111 the same; its mask ({image, mask}, mask or
    mask_image) scales the pixels: all black is no mask, a white half acts, one of another size is a 422."""
    from sdlab.server.native import JobIn

    answer = _txt2img(setup, _unit(setup))
    drawn = _pixels(answer.json()["images"][0])
    settings = setup["client"].post("/api/parameters", json={"image": answer.json()["images"][0]}).json()["settings"]
    native = {key: value for key, value in settings.items()
              if value is not None and key in JobIn.model_fields and key != "model"}
    native["ip_adapters"] = [{**native["ip_adapters"][0], "image": setup["picture"]}]
    assert native["control_convention"] == "a1111"               # the text records it ("Control steps: a1111")
    client = setup["client"]
    assert np.array_equal(job_pixels(client, drawn_job(client, native)), drawn)
    diffusers = job_pixels(client, drawn_job(client, {**native, "control_convention": "diffusers"}))
    assert np.abs(diffusers - drawn).max() > 0
    black, half = Image.new("L", (200, 160)), Image.new("L", (200, 160))
    ImageDraw.Draw(half).rectangle([100, 0, 199, 159], fill=255)
    unmasked = _txt2img(setup, _unit(setup, image={"image": setup["picture"], "mask": b64_png(black)}))
    assert np.array_equal(_pixels(unmasked.json()["images"][0]), drawn)
    for unit in (_unit(setup, image={"image": setup["picture"], "mask": b64_png(half)}),
                 _unit(setup, mask=b64_png(half)), _unit(setup, mask_image=b64_png(half))):
        masked = _txt2img(setup, unit)
        assert masked.status_code == 200, masked.text
        assert np.abs(_pixels(masked.json()["images"][0]) - drawn).max() > 0
    wrong = _txt2img(setup, _unit(setup, mask=b64_png(Image.new("L", (64, 64)))))
    assert wrong.status_code == 422 and "the mask is 64x64 but its image 200x160" in wrong.text, wrong.text


def test_a_clip_g_unit_redraws_with_its_modules_encoder_through_parameters_and_from_png(setup, tmp_path, capsys):
    """A unit whose module names another encoder than the adapter's own image_encoder folder (ip-adapter_clip_g:
    clip_vision/clip_g) is read back with its module: /api/parameters' ip_adapters entry carries it, and the native
    job of those settings draws with that encoder and records the unit's line again; --from-png does the same.
    Both redraw the unit's picture (the native job exactly; before, both took the 32-wide image_encoder, which
    the adapter does not read, and were refused)."""
    from cli_helpers import pixels, run
    from sdlab.pipeline.png_info import read_parameters

    drawn = _txt2img(setup, _unit(setup, module="ip-adapter_clip_g", model="ip-adapter_g48", guidance_start=0.25))
    assert drawn.status_code == 200, drawn.text
    settings = setup["client"].post("/api/parameters", json={"image": drawn.json()["images"][0]}).json()["settings"]
    assert [entry.get("module") for entry in settings["ip_adapters"]] == ["ip-adapter_clip_g"]
    assert np.array_equal(_redrawn(setup, drawn, {"ip_adapters": [setup["picture"]]}), _pixels(drawn.json()["images"][0]))
    saved, again = tmp_path / "unit.png", tmp_path / "again.png"
    saved.write_bytes(base64.b64decode(drawn.json()["images"][0]))
    code, _, stderr = run(["txt2img", "--no-progress", "--from-png", str(saved), "--ip-adapter",
                           str(setup["models"] / "ControlNet" / "ip-adapter_g48.safetensors"),
                           "--ip-adapter-image", str(setup["picture_file"]), "--out", str(again)], capsys)
    assert code == 0, stderr
    assert read_parameters(again) == read_parameters(saved)        # the unit's line again, module and all
    # this process against the server's: float sums may round apart (seen: 3 values off by 1 of 12288)
    assert np.abs(pixels(again) - _pixels(drawn.json()["images"][0])).max() <= 1


def test_a_native_entry_with_a_module_is_checked_as_the_unit(setup):
    client, job = setup["client"], {"prompt": "a red apple", "steps": 2, "width": 64, "height": 64}
    entry = {"model": "ip-adapter_g48", "image": setup["picture"], "module": "ip-adapter_clip_h"}
    refused = client.post("/api/jobs", json={**job, "ip_adapters": [entry]})
    assert refused.status_code == 422 and "module 'ip-adapter_clip_h'" in refused.text, refused.text
    both = {**entry, "module": "ip-adapter_clip_g", "layer_scales": "style"}
    refused = client.post("/api/jobs", json={**job, "ip_adapters": [both]})
    assert refused.status_code == 422 and "layer_scales and module" in refused.text, refused.text


@pytest.mark.parametrize("change, field", [
    ({"effective_region_mask": "MASK"}, "effective_region_mask"),
    ({"advanced_weighting": [0.0] * 16}, "advanced_weighting"),
    ({"ipadapter_input": ["AAAA"]}, "ipadapter_input"),
    ({"input_mode": "batch", "batch_images": "/pictures"}, "input_mode 'batch'"),
    ({"input_mode": "merge"}, "input_mode 'merge'"),
])
def test_unit_fields_sdlab_does_not_draw_are_refused_naming_them(setup, change, field):
    """Fields that change the extension's picture of an IP-Adapter unit are a 422 naming the field, not a
    picture drawn without them; their defaults (null, empty, input_mode "simple") draw as a unit without them."""
    if "effective_region_mask" in change:
        mask = Image.new("L", (64, 64), 0)
        mask.paste(255, (0, 0, 32, 64))
        change = {"effective_region_mask": b64_png(mask.convert("RGB"))}
    refused = _txt2img(setup, _unit(setup, **change))
    assert refused.status_code == 422, refused.text
    assert field in refused.text and "module 'ip-adapter_clip_sd15'" in refused.text, refused.text


def test_unit_fields_at_their_defaults_draw_as_without_them(setup):
    plain = _txt2img(setup, _unit(setup))
    defaults = _txt2img(setup, _unit(setup, effective_region_mask=None, advanced_weighting=None, ipadapter_input=None,
                                     input_mode="simple", batch_images=""))
    assert defaults.status_code == 200, defaults.text
    assert np.array_equal(_pixels(plain.json()["images"][0]), _pixels(defaults.json()["images"][0]))
