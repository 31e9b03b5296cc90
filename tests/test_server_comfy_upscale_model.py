"""ComfyUI's upscale-model graph over the ComfyUI API: VAEDecode -> ImageUpscaleWithModel (an UpscaleModelLoader's
file of the upscalers folder) -> SaveImage. The pictures equal ComfyUI's: its tiled_scale (comfy/utils.py
`tiled_scale_multidim`, transcribed below as the reference) of the decoded picture with a tiny random-weight
Real-ESRGAN x4, clamped and written as its SaveImage writes (255 * x truncated). Tolerance: 1 of 255 (the network
runs under the server's thread count, so float sums may round the other way at a truncation edge)."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sdlab.checkpoints.upscaler import load_upscaler
from sdlab.pipeline.comfy_image_upscale import ThroughModel, comfy_pictures, tiled_scale
from test_server_comfy_api import BASIC, NATIVE, drawn, native_pixels, viewed
from test_upscale_models import new_arch_state, old_arch_state

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

MODEL = "sub/tinyx4.safetensors"
X2 = "tinyx2.safetensors"               # Real-ESRGAN x2: pixel-unshuffled input, 64 px feathers
X1 = "restore/tinyx1.safetensors"       # Real-ESRGAN x1 (a restoration model): input unshuffled by 4, 32 px feathers
X8 = "tinyx8.pth"                       # ESRGAN old arch x8: three upsample stages, 256 px feathers


def comfy_tiled_scale(samples, function, tile=(64, 64), overlap=8, upscale_amount=4, out_channels=3):
    """ComfyUI's comfy/utils.py tiled_scale_multidim (2-D, a number upscale_amount), transcribed."""
    dims = len(tile)
    overlap = [overlap] * dims
    output = torch.empty([samples.shape[0], out_channels] + [round(a * upscale_amount) for a in samples.shape[2:]])
    for b in range(samples.shape[0]):
        s = samples[b:b + 1]
        if all(s.shape[d + 2] <= tile[d] for d in range(dims)):
            output[b:b + 1] = function(s)
            continue
        out = torch.zeros([s.shape[0], out_channels] + [round(a * upscale_amount) for a in s.shape[2:]])
        out_div = torch.zeros_like(out)
        positions = [range(0, s.shape[d + 2] - overlap[d], tile[d] - overlap[d]) if s.shape[d + 2] > tile[d] else [0]
                     for d in range(dims)]
        for it in itertools.product(*positions):
            s_in = s
            upscaled = []
            for d in range(dims):
                pos = max(0, min(s.shape[d + 2] - overlap[d], it[d]))
                length = min(tile[d], s.shape[d + 2] - pos)
                s_in = s_in.narrow(d + 2, pos, length)
                upscaled.append(round(upscale_amount * pos))
            ps = function(s_in)
            mask = torch.ones_like(ps)
            for d in range(2, dims + 2):
                feather = round(upscale_amount * overlap[d - 2])
                if feather >= mask.shape[d]:
                    continue
                for t in range(feather):
                    a = (t + 1) / feather
                    mask.narrow(d, t, 1).mul_(a)
                    mask.narrow(d, mask.shape[d] - 1 - t, 1).mul_(a)
            o, o_d = out, out_div
            for d in range(dims):
                o = o.narrow(d + 2, upscaled[d], mask.shape[d + 2])
                o_d = o_d.narrow(d + 2, upscaled[d], mask.shape[d + 2])
            o += ps * mask
            o_d += mask
        output[b:b + 1] = out / out_div
    return output


def comfy_upscale_with_model(net, pixels: np.ndarray, scale: int = 4) -> np.ndarray:
    """ComfyUI's ImageUpscaleWithModel (tile 512, overlap 32) of (H, W, 3) pixels (8-bit, or float in [0, 1] as its
    VAEDecode gives them), then its SaveImage's np.clip(255. * i, 0, 255).astype(np.uint8)."""
    unit = pixels if pixels.dtype.kind == "f" else pixels.astype(np.float32) / 255.0
    image = torch.from_numpy(unit.astype(np.float32))[None]                      # (1, H, W, 3), ComfyUI's IMAGE
    with torch.inference_mode():
        s = comfy_tiled_scale(image.movedim(-1, -3), net, tile=(512, 512), overlap=32, upscale_amount=scale)
    s = torch.clamp(s.movedim(-3, -1), min=0, max=1.0)
    return np.clip(255.0 * s[0].numpy(), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    from fastapi.testclient import TestClient
    from server_fixtures import write_preset_models

    from sdlab.server.app import create_app
    from sdlab.server.config import ServerConfig

    root = tmp_path_factory.mktemp("comfy-upscale-model")
    models = root / "models"
    write_preset_models(models)
    upscalers = root / "upscalers"
    (upscalers / "sub").mkdir(parents=True)
    save_file(new_arch_state(4, seed=3), str(upscalers / MODEL))
    save_file(new_arch_state(2, seed=4), str(upscalers / X2))
    (upscalers / "restore").mkdir()
    save_file(new_arch_state(1, seed=6), str(upscalers / X1))
    torch.save(old_arch_state(8, seed=7), upscalers / X8)
    app = create_app(ServerConfig(output_dir=root / "outputs", model=models / "plain.safetensors",
                                  models_dir=models, upscalers_dir=upscalers), preload=True)
    with TestClient(app) as client:
        client.upscaler = load_upscaler(upscalers / MODEL)
        client.upscalers = {name: load_upscaler(upscalers / name) for name in (MODEL, X2, X1, X8)}
        yield client


def upscale_graph(model: str = MODEL) -> dict:
    """ComfyUI's upscale-model example on the basic graph: node 8's pictures through node 11's model, saved by 9."""
    prompt = copy.deepcopy(BASIC)
    prompt["10"] = {"class_type": "UpscaleModelLoader", "inputs": {"model_name": model}}
    prompt["11"] = {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["10", 0], "image": ["8", 0]}}
    prompt["9"]["inputs"]["images"] = ["11", 0]
    return prompt


def test_the_upscale_model_graph_saves_comfyuis_upscaled_pictures(server):
    """The graph is drawn (it was refused: missing_node_type); node 9's picture in the history (type output) is
    ComfyUI's ImageUpscaleWithModel of the native job's picture; the nodes execute in ComfyUI's order."""
    messages, entry = drawn(server, upscale_graph())
    executing = [data["node"] for kind, data in messages if kind == "executing"]
    assert executing == ["4", "6", "7", "5", "3", "8", "10", "11", "9", None]
    [image] = entry["outputs"]["9"]["images"]
    assert image["type"] == "output"
    pixels = viewed(server, image)
    assert pixels.shape == (256, 256, 3)
    decoded = native_pixels(server, NATIVE)
    expected = comfy_upscale_with_model(server.upscaler.net, decoded.astype(np.uint8)).astype(np.int16)
    assert np.abs(pixels - expected).max() <= 1


@pytest.mark.parametrize("model, scale", [(MODEL, 4), (X2, 2), (X1, 1), (X8, 8)])
def test_tiled_scale_blends_tiles_as_comfyui(server, model, scale):
    """A picture wider than ComfyUI's 512 px tile (two tiles, the last a short one, 32 px shared): sdlab's
    tiled_scale equals ComfyUI's to float precision, the written picture to 1 of 255; untiled it would differ.
    x4, x2, x1 and x8 (feathers of 128, 64, 32 and 256 output px)."""
    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 256, (24, 600, 3), dtype=np.uint8)
    upscaler = server.upscalers[model]
    assert upscaler.scale == scale
    net = upscaler.net
    x = torch.from_numpy(pixels.astype(np.float32) / 255.0).permute(2, 0, 1)[None]   # (1, 3, 24, 600)
    with torch.inference_mode():
        ours = tiled_scale(x, net, scale)
        reference = comfy_tiled_scale(x, net, tile=(512, 512), overlap=32, upscale_amount=scale)
        untiled = net(x)
    assert ours.shape == (1, 3, 24 * scale, 600 * scale)
    assert torch.allclose(ours, reference, atol=1e-5)
    assert (untiled - reference).abs().max() > 1e-3             # the blend is what is tested
    [written] = comfy_pictures(x, [ThroughModel()], upscaler)
    assert np.abs(np.asarray(written, np.int16) - comfy_upscale_with_model(net, pixels, scale)).max() <= 1


@pytest.mark.parametrize("model, scale", [(MODEL, 4), (X2, 2), (X1, 1), (X8, 8)])
def test_the_network_is_fed_the_float_decode_as_comfyuis_vaedecode_gives_it(server, monkeypatch, model, scale):
    """ComfyUI's ImageUpscaleWithModel reads VAEDecode's float IMAGE ((decode + 1) / 2 clamped, unrounded), not the
    8-bit picture (up to 0.5 / 255 apart): the network's input equals the VAE's decode to float precision, and the
    saved picture is ComfyUI's upscale of that float decode. Every scale spandrel's ESRGAN loads: x4, x2, a x1
    restoration model (same size out), an old-arch x8."""
    import sdlab.pipeline.comfy_image_upscale as comfy_image_upscale
    import sdlab.pipeline.generate as generate

    decodes, inputs = [], []
    decode, tiled = generate.decode_latents, comfy_image_upscale.tiled_scale
    monkeypatch.setattr(generate, "decode_latents", lambda *a, **k: decodes.append(decode(*a, **k)) or decodes[-1])
    monkeypatch.setattr(comfy_image_upscale, "tiled_scale",
                        lambda x, *a, **k: inputs.append(x.detach().cpu().float()) or tiled(x, *a, **k))
    prompt = upscale_graph(model)
    prompt["3"]["inputs"]["seed"] = 77 + scale + 10 * (model == X1)     # not the other tests' picture
    _, entry = drawn(server, prompt)
    [decoded], [fed] = decodes, inputs                          # (1, 3, 64, 64) in [-1, 1]; (1, 3, 64, 64)
    unit = ((decoded.float().cpu() + 1.0) / 2.0).clamp(0, 1)    # comfy/sd.py VAE.decode's process_output
    assert (unit * 255 - (unit * 255).round()).abs().max() > 0.1     # the float decode is not its 8-bit picture
    assert torch.allclose(fed, unit, atol=1e-6)
    [image] = entry["outputs"]["9"]["images"]
    expected = comfy_upscale_with_model(server.upscalers[model].net, unit[0].permute(1, 2, 0).numpy(), scale)
    pixels = viewed(server, image)
    assert pixels.shape == (64 * scale, 64 * scale, 3)
    assert np.abs(pixels - expected.astype(np.int16)).max() <= 1


def test_object_info_and_models_list_the_upscale_models(server):
    """/object_info's UpscaleModelLoader lists the upscalers folder's files by their path under it, as ComfyUI's
    folder_paths; GET /models/upscale_models lists them too."""
    info = server.get("/object_info/UpscaleModelLoader").json()["UpscaleModelLoader"]
    assert info["input"]["required"]["model_name"][0] == sorted([MODEL, X2, X1, X8])
    assert info["output"] == ["UPSCALE_MODEL"]
    upscale = server.get("/object_info/ImageUpscaleWithModel").json()["ImageUpscaleWithModel"]
    assert upscale["input"]["required"] == {"upscale_model": ["UPSCALE_MODEL"], "image": ["IMAGE"]}
    assert "upscale_models" in server.get("/models").json()
    assert server.get("/models/upscale_models").json() == sorted([MODEL, X2, X1, X8])


def test_graphs_the_upscale_does_not_draw_are_refused_naming_the_node(server):
    """Saving both the decoded and the upscaled pictures (sdlab writes one set), an unknown model name."""
    both = upscale_graph()
    both["12"] = {"class_type": "SaveImage", "inputs": {"filename_prefix": "plain", "images": ["8", 0]}}
    answer = server.post("/prompt", json={"prompt": both})
    assert answer.status_code == 400
    [error] = answer.json()["node_errors"]["11"]["errors"]
    assert error["type"] == "unsupported_graph" and "either all through one ImageUpscaleWithModel" in error["message"]
    unknown = upscale_graph()
    unknown["10"]["inputs"]["model_name"] = "other.pth"
    answer = server.post("/prompt", json={"prompt": unknown})
    assert answer.status_code == 400
    assert answer.json()["node_errors"]["10"]["errors"][0]["type"] == "value_not_in_list"


def test_an_upscale_past_the_servers_upscale_limit_is_refused_at_submit_naming_the_node(server):
    """x4 of 1024 x 1152 pictures is 4096 x 4608, past 4 x --max-pixels (the Extras' limit, 16.8 M at the default):
    a 400 on the ImageUpscaleWithModel before anything is queued (it was queued and drawn, then upscaled)."""
    prompt = upscale_graph()
    prompt["5"]["inputs"].update(width=1024, height=1152)
    answer = server.post("/prompt", json={"prompt": prompt})
    assert answer.status_code == 400, answer.text
    [error] = answer.json()["node_errors"]["11"]["errors"]
    assert error["type"] == "unsupported_graph"
    assert "4096x4608" in error["message"] and str(4 * 2048 * 2048) in error["message"]
    assert server.get("/queue").json() == {"queue_running": [], "queue_pending": []}


@pytest.mark.parametrize("fails, node, kind", [("upscale_with_model", "11", "ImageUpscaleWithModel"),
                                               ("load_upscaler_file", "10", "UpscaleModelLoader")])
def test_an_upscale_failure_names_the_upscale_node_not_the_ksampler(server, monkeypatch, fails, node, kind):
    """The network (or reading its file) failing: execution_error names that node, as ComfyUI's executor names the
    node that raised, with the nodes before it executed; it named the KSampler."""
    import sdlab.pipeline.comfy_image_upscale as comfy_image_upscale
    import sdlab.server.worker as worker

    def broken(*args, **kwargs):
        raise RuntimeError("the upscaler broke")

    monkeypatch.setattr(comfy_image_upscale if fails == "upscale_with_model" else worker, fails, broken)
    prompt = upscale_graph()
    prompt["3"]["inputs"]["seed"] = 78
    messages, entry = drawn(server, prompt)
    [error] = [data for name, data in messages if name == "execution_error"]
    assert (error["node_id"], error["node_type"]) == (node, kind)
    assert "the upscaler broke" in error["exception_message"]
    order = ["4", "6", "7", "5", "3", "8", "10", "11", "9"]
    assert error["executed"] == order[:order.index(node)]
    assert entry["status"]["status_str"] == "error"


def comfy_common_upscale(samples, width, height, upscale_method, crop):
    """ComfyUI's comfy/utils.py common_upscale (with its lanczos) of (B, C, H, W), transcribed."""
    if crop == "center":
        old_width, old_height = samples.shape[3], samples.shape[2]
        old_aspect, new_aspect = old_width / old_height, width / height
        x = y = 0
        if old_aspect > new_aspect:
            x = round((old_width - old_width * (new_aspect / old_aspect)) / 2)
        elif old_aspect < new_aspect:
            y = round((old_height - old_height * (old_aspect / new_aspect)) / 2)
        s = samples.narrow(-2, y, old_height - y * 2).narrow(-1, x, old_width - x * 2)
    else:
        s = samples
    if upscale_method == "lanczos":
        images = [Image.fromarray(np.clip(255. * image.movedim(0, -1).cpu().numpy(), 0, 255).astype(np.uint8))
                  for image in s]
        images = [image.resize((width, height), resample=Image.Resampling.LANCZOS) for image in images]
        images = [torch.from_numpy(np.array(image).astype(np.float32) / 255.0).movedim(-1, 0) for image in images]
        return torch.stack(images)
    return torch.nn.functional.interpolate(s, size=(height, width), mode=upscale_method)


def comfy_image_scale(image, upscale_method, width, height, crop):
    """ComfyUI's nodes.py ImageScale.upscale of an IMAGE (B, H, W, C), transcribed."""
    if width == 0 and height == 0:
        return image
    samples = image.movedim(-1, 1)
    if width == 0:
        width = max(1, round(samples.shape[3] * height / samples.shape[2]))
    elif height == 0:
        height = max(1, round(samples.shape[2] * width / samples.shape[3]))
    return comfy_common_upscale(samples, width, height, upscale_method, crop).movedim(1, -1)


def comfy_image_scale_by(image, upscale_method, scale_by):
    """ComfyUI's nodes.py ImageScaleBy.upscale, transcribed."""
    samples = image.movedim(-1, 1)
    width, height = round(samples.shape[3] * scale_by), round(samples.shape[2] * scale_by)
    return comfy_common_upscale(samples, width, height, upscale_method, "disabled").movedim(1, -1)


def comfy_steps(net, image, steps, scale=4):
    """ComfyUI's run of a chain of ImageUpscaleWithModel ("model") / ImageScale / ImageScaleBy nodes over an IMAGE
    (B, H, W, C) float, then its SaveImage's 8 bits (B, H', W', C)."""
    for kind, values in steps:
        if kind == "model":
            with torch.inference_mode():
                s = comfy_tiled_scale(image.movedim(-1, -3), net, tile=(512, 512), overlap=32, upscale_amount=scale)
            image = torch.clamp(s.movedim(-3, -1), min=0, max=1.0)
        elif kind == "ImageScale":
            image = comfy_image_scale(image, values["upscale_method"], values["width"], values["height"],
                                      values["crop"])
        else:
            image = comfy_image_scale_by(image, values["upscale_method"], values["scale_by"])
    return np.clip(255.0 * image.numpy(), 0, 255).astype(np.uint8)


def chain_graph(steps, model: str = MODEL) -> dict:
    """The basic graph with node 8's pictures through `steps` (("model", {}) an ImageUpscaleWithModel of `model`,
    ("ImageScale" / "ImageScaleBy", inputs)) in order, nodes 11, 12, ..., saved by 9."""
    prompt = copy.deepcopy(BASIC)
    prompt["10"] = {"class_type": "UpscaleModelLoader", "inputs": {"model_name": model}}
    source = ["8", 0]
    for number, (kind, values) in enumerate(steps, start=11):
        if kind == "model":
            prompt[str(number)] = {"class_type": "ImageUpscaleWithModel",
                                   "inputs": {"upscale_model": ["10", 0], "image": source}}
        else:
            prompt[str(number)] = {"class_type": kind, "inputs": {"image": source, **values}}
        source = [str(number), 0]
    if not any(kind == "model" for kind, _ in steps):
        del prompt["10"]
    prompt["9"]["inputs"]["images"] = source
    return prompt


SCALES = [
    ("model then by 0.5 bicubic", [("model", {}), ("ImageScaleBy", {"upscale_method": "bicubic", "scale_by": 0.5})]),
    ("model then by 0.75 lanczos", [("model", {}), ("ImageScaleBy", {"upscale_method": "lanczos", "scale_by": 0.75})]),
    ("model then by 0.3 area", [("model", {}), ("ImageScaleBy", {"upscale_method": "area", "scale_by": 0.3})]),
    ("model then 200x120 nearest centre", [("model", {}), ("ImageScale", {"upscale_method": "nearest-exact",
                                                                          "width": 200, "height": 120,
                                                                          "crop": "center"})]),
    ("model then height 100 bilinear", [("model", {}), ("ImageScale", {"upscale_method": "bilinear", "width": 0,
                                                                       "height": 100, "crop": "disabled"})]),
    ("scale 48x80 centre then model", [("ImageScale", {"upscale_method": "bicubic", "width": 48, "height": 80,
                                                       "crop": "center"}), ("model", {})]),
    ("no model: by 1.5 lanczos", [("ImageScaleBy", {"upscale_method": "lanczos", "scale_by": 1.5})]),
]


@pytest.mark.parametrize("case", range(len(SCALES)), ids=[name for name, _ in SCALES])
def test_image_scale_nodes_around_the_upscale_are_drawn_as_comfyui(server, monkeypatch, case):
    """ComfyUI's "upscale x4, then scale by 0.5" graph and its kin (ImageScale / ImageScaleBy before or after the
    ImageUpscaleWithModel, or alone; each method, crop center): the saved picture is ComfyUI's run of the same nodes
    over the float decode, to 1 of 255; the nodes execute in the graph's order. They were refused
    (missing_node_type)."""
    import sdlab.pipeline.generate as generate

    decodes = []
    decode = generate.decode_latents
    monkeypatch.setattr(generate, "decode_latents", lambda *a, **k: decodes.append(decode(*a, **k)) or decodes[-1])
    steps = SCALES[case][1]
    prompt = chain_graph(steps)
    prompt["3"]["inputs"]["seed"] = 200 + case                  # not the other tests' picture
    messages, entry = drawn(server, prompt)
    executing = [data["node"] for kind, data in messages if kind == "executing"]
    chain = [str(n) for n in range(11, 11 + len(steps))]
    loader = ["10"] if "10" in prompt else []
    at = next((i for i, (kind, _) in enumerate(steps) if kind == "model"), None)
    expected_chain = chain if at is None else chain[:at] + loader + chain[at:]
    assert executing == ["4", "6", "7", "5", "3", "8", *expected_chain, "9", None]
    [decoded] = decodes
    unit = ((decoded.float().cpu() + 1.0) / 2.0).clamp(0, 1).permute(0, 2, 3, 1)       # (1, 64, 64, 3) IMAGE
    expected = comfy_steps(server.upscaler.net, unit, steps)[0].astype(np.int16)
    [image] = entry["outputs"]["9"]["images"]
    pixels = viewed(server, image)
    assert pixels.shape == expected.shape
    assert np.abs(pixels - expected).max() <= 1


@pytest.mark.parametrize("method", ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"])
@pytest.mark.parametrize("width, height, crop", [(150, 90, "center"), (90, 150, "center"), (0, 70, "disabled"),
                                                 (33, 0, "disabled"), (0, 0, "disabled")])
def test_scale_pictures_is_comfyuis_image_scale(method, width, height, crop):
    """sdlab's ImageScale / ImageScaleBy equal ComfyUI's (float, no clamp: bicubic overshoots) on a 100 x 120
    picture: every method, both crops, a side of 0, both 0 (the picture as it is)."""
    from sdlab.pipeline.comfy_image_upscale import PictureScale, scale_pictures

    image = torch.rand(2, 120, 100, 3, generator=torch.Generator().manual_seed(3))       # (B, H, W, C)
    ours = scale_pictures(image.movedim(-1, 1), PictureScale(method, width, height, crop)).movedim(1, -1)
    theirs = comfy_image_scale(image, method, width, height, crop)
    assert ours.shape == theirs.shape
    assert torch.allclose(ours, theirs, atol=1e-6)
    for scale_by in (0.37, 2.5):
        ours = scale_pictures(image.movedim(-1, 1), PictureScale(method, scale_by=scale_by)).movedim(1, -1)
        assert torch.allclose(ours, comfy_image_scale_by(image, method, scale_by), atol=1e-6)


def test_object_info_lists_the_image_scale_nodes_as_comfyui(server):
    info = server.get("/object_info/ImageScale").json()["ImageScale"]
    required = info["input"]["required"]
    assert required["upscale_method"] == [["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]]
    assert required["width"] == ["INT", {"default": 512, "min": 0, "max": 16384, "step": 1}]
    assert required["crop"] == [["disabled", "center"]]
    by = server.get("/object_info/ImageScaleBy").json()["ImageScaleBy"]
    assert by["input"]["required"]["scale_by"] == ["FLOAT", {"default": 1.0, "min": 0.01, "max": 8.0, "step": 0.01}]
    assert by["output"] == ["IMAGE"] and by["category"] == "image/upscaling"


def test_an_image_scale_past_the_limit_or_to_nothing_is_refused_at_submit_naming_it(server):
    """ImageScale to 16384 x 16384 after the x4 (past 4 x --max-pixels), ImageScaleBy 0.01 of 16 px (0 px): a 400
    on that node before anything is queued."""
    huge = chain_graph([("model", {}), ("ImageScale", {"upscale_method": "bilinear", "width": 16384,
                                                      "height": 16384, "crop": "disabled"})])
    answer = server.post("/prompt", json={"prompt": huge})
    assert answer.status_code == 400, answer.text
    [error] = answer.json()["node_errors"]["12"]["errors"]
    assert "16384x16384" in error["message"] and "ImageScale #12" in error["message"]
    empty = chain_graph([("ImageScaleBy", {"upscale_method": "area", "scale_by": 0.01})])
    empty["5"]["inputs"].update(width=16, height=16)             # 0.16 px: round() makes 0
    answer = server.post("/prompt", json={"prompt": empty})
    assert answer.status_code == 400, answer.text
    assert "0x0" in answer.json()["node_errors"]["11"]["errors"][0]["message"]
    assert server.get("/queue").json() == {"queue_running": [], "queue_pending": []}


def test_picture_chains_sdlab_does_not_run_are_refused_naming_the_node(server):
    """Two ImageUpscaleWithModel in a row (one model per job), outputs through different scales: a 400 naming the
    node, never a 500."""
    twice = chain_graph([("model", {}), ("model", {})])
    answer = server.post("/prompt", json={"prompt": twice})
    assert answer.status_code == 400, answer.text
    assert "one ImageUpscaleWithModel" in answer.json()["node_errors"]["12"]["errors"][0]["message"]
    split = chain_graph([("model", {}), ("ImageScaleBy", {"upscale_method": "area", "scale_by": 0.5})])
    split["13"] = {"class_type": "SaveImage", "inputs": {"filename_prefix": "big", "images": ["11", 0]}}
    answer = server.post("/prompt", json={"prompt": split})
    assert answer.status_code == 400, answer.text
    assert answer.json()["node_errors"]["11"]["errors"][0]["type"] == "unsupported_graph"


def test_upscale_graphs_without_a_ksampler_before_them_are_refused_naming_the_node(server):
    """ComfyUI's "upscale a loaded picture" graph (LoadImage -> ImageUpscaleWithModel -> SaveImage, no sampling) and
    its "hires fix with a model" graph (upscaled pictures -> VAEEncode -> a second KSampler at denoise 0.5): a 400
    unsupported_graph naming the ImageUpscaleWithModel / the VAEEncode (the second said only 'sdlab encodes the
    picture of a LoadImage'), nothing queued."""
    from test_server_comfy_api import upload

    upload(server, "to-upscale.png", Image.new("RGB", (40, 24), (200, 30, 90)))
    loaded = {"1": {"class_type": "LoadImage", "inputs": {"image": "to-upscale.png"}},
              "2": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": MODEL}},
              "3": {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["2", 0], "image": ["1", 0]}},
              "4": {"class_type": "SaveImage", "inputs": {"filename_prefix": "up", "images": ["3", 0]}}}
    answer = server.post("/prompt", json={"prompt": loaded})
    assert answer.status_code == 400, answer.text
    [error] = answer.json()["node_errors"]["3"]["errors"]
    assert error["type"] == "unsupported_graph" and "not of a LoadImage" in error["message"]
    second = chain_graph([("model", {}), ("ImageScaleBy", {"upscale_method": "lanczos", "scale_by": 0.5})])
    second["13"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["12", 0], "vae": ["4", 2]}}
    second["14"] = copy.deepcopy(second["3"])
    second["14"]["inputs"].update(latent_image=["13", 0], denoise=0.5)
    second["15"] = {"class_type": "VAEDecode", "inputs": {"samples": ["14", 0], "vae": ["4", 2]}}
    second["9"]["inputs"]["images"] = ["15", 0]
    answer = server.post("/prompt", json={"prompt": second})
    assert answer.status_code == 400, answer.text
    [error] = answer.json()["node_errors"]["13"]["errors"]
    assert error["type"] == "unsupported_graph" and "second KSampler from a decoded or upscaled" in error["message"]
    assert server.get("/queue").json() == {"queue_running": [], "queue_pending": []}
