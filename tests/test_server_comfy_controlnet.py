"""ComfyUI's API: ControlNetLoader, ControlNetApply and ControlNetApplyAdvanced (server/comfy_graph.py `_Plan.controls`,
server/comfy_api.py `_controls`). A graph's ControlNets are drawn as the native API's `controls` under
control_convention "comfyui" (ComfyUI's hint resize and sigma windows, proven against ComfyUI's code in
tests/test_comfyui_controlnet.py); /object_info lists the nodes with their inputs as ComfyUI does (comfyanonymous/ComfyUI
nodes.py ControlNetLoader / ControlNetApply / ControlNetApplyAdvanced); graphs sdlab does not draw get ComfyUI's
node_errors. In-process app (TestClient), a tiny SD1 model and two random ControlNets of its width."""

from __future__ import annotations

import base64
import copy
import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from bundle_fixtures import tiny_bundle
from controlnet_fixtures import diffusers_controlnet, write_layout
from server_fixtures import b64_png
from test_server_comfy_api import BASIC, NATIVE, drawn, native_pixels, refused, viewed

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

EDGES, DEPTH = "edges.safetensors", "sub/depth.safetensors"     # control_net_name: the path under the folder


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    from fastapi.testclient import TestClient
    from server_fixtures import write_preset_models

    from sdlab.server.app import create_app
    from sdlab.server.config import ServerConfig

    root = tmp_path_factory.mktemp("comfy-controlnet")
    models = root / "models"
    write_preset_models(models)
    unet = tiny_bundle("sd1", seed=3).unet_config
    folder = models / "ControlNet"
    for name, seed in ((EDGES, 5), (DEPTH, 6)):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        written = write_layout(diffusers_controlnet(unet, seed, hint_widths=(16, 32), std=0.1), "original",
                               (folder / name).parent)
        written.rename(folder / name)
    app = create_app(ServerConfig(output_dir=root / "outputs", model=models / "plain.safetensors",
                                  models_dir=models, controlnet_dir=folder), preload=True)
    with TestClient(app) as client:
        for name, picture in PICTURES.items():
            data = io.BytesIO()
            picture.save(data, format="PNG")
            assert client.post("/upload/image", files={"image": (name, data.getvalue(), "image/png")}).status_code \
                == 200
        yield client


def _picture(seed: int, size: tuple[int, int]) -> Image.Image:
    """A control picture of another aspect ratio than the drawing's 64 x 64 (ComfyUI cuts its centre), with a
    transparent band (which ComfyUI's LoadImage drops)."""
    image = Image.new("RGBA", size, (30, 30, 160, 255))
    draw = ImageDraw.Draw(image)
    draw.rectangle([4 + 6 * seed, 4, size[0] - 10, size[1] - 8], outline=(255, 255, 255, 255), width=4)
    draw.ellipse([10, 8 + 3 * seed, 40, 40], fill=(220, 80 * seed, 60, 255))
    draw.rectangle([0, 0, size[0] - 1, 5], fill=(255, 0, 0, 0))
    return image


PICTURES = {"edges.png": _picture(0, (96, 64)), "depth.png": _picture(1, (48, 72))}


def with_controls(nodes: dict, positive: list, negative: list) -> dict:
    """BASIC with `nodes` added and the KSampler's positive / negative linked to them."""
    prompt = copy.deepcopy(BASIC)
    prompt.update(copy.deepcopy(nodes))
    prompt["3"]["inputs"].update(positive=positive, negative=negative)
    return prompt


LOADERS = {"10": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": EDGES}},
           "11": {"class_type": "LoadImage", "inputs": {"image": "edges.png"}},
           "13": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": DEPTH}},
           "14": {"class_type": "LoadImage", "inputs": {"image": "depth.png"}}}


def advanced(positive, negative, loader, image, strength, start, end, **more) -> dict:
    return {"class_type": "ControlNetApplyAdvanced", "inputs": {
        "positive": positive, "negative": negative, "control_net": [loader, 0], "image": [image, 0],
        "strength": strength, "start_percent": start, "end_percent": end, **more}}


CHAIN = {**LOADERS, "12": advanced(["6", 0], ["7", 0], "10", "11", 0.8, 0.0, 0.6, vae=["4", 2]),
         "15": advanced(["12", 0], ["12", 1], "13", "14", 0.5, 0.3, 1.0)}


def native_control(name: str, strength: float, start: float = 0.0, end: float = 1.0) -> dict:
    return {"model": name.rsplit("/", 1)[-1].split(".")[0], "image": b64_png(PICTURES[name.replace(
        "safetensors", "png").rsplit("/", 1)[-1]]), "strength": strength, "start": start, "end": end}


def graph_pixels(client, prompt: dict) -> np.ndarray:
    return viewed(client, drawn(client, prompt)[1]["outputs"]["9"]["images"][0])


def test_two_controlnet_apply_advanced_in_a_row_draw_the_native_comfyui_controls(server):
    messages, entry = drawn(server, with_controls(CHAIN, ["15", 0], ["15", 1]))
    executing = [data["node"] for kind, data in messages if kind == "executing"]
    assert executing == ["4", "6", "7", "10", "11", "12", "13", "14", "15", "5", "3", "8", "9", None]
    image = entry["outputs"]["9"]["images"][0]
    pixels = viewed(server, image)
    native = native_pixels(server, {**NATIVE, "control_convention": "comfyui", "controls": [
        native_control(EDGES, 0.8, 0.0, 0.6), native_control(DEPTH, 0.5, 0.3, 1.0)]})
    assert np.array_equal(pixels, native)
    assert np.abs(pixels - graph_pixels(server, BASIC)).max() > 10          # the ControlNets change the picture
    png = server.get("/view", params=image).content
    written = Image.open(io.BytesIO(png)).info["parameters"]
    assert "Control steps: comfyui" in written and "ControlNet 1: " in written
    read = server.post("/api/parameters", json={"image": base64.b64encode(png).decode()})     # Reuse, --from-png
    assert read.status_code == 200, read.text
    settings = read.json()["settings"]
    assert settings["control_convention"] == "comfyui"
    assert [(c["strength"], c["start"], c["end"]) for c in settings["controls"]] == [(0.8, 0.0, 0.6), (0.5, 0.3, 1.0)]


def test_controlnet_apply_on_the_positive_acts_on_both_rows(server):
    """ControlNetApply sets control_apply_to_uncond: ComfyUI's sampler gives the negative the positive's control
    (comfy/samplers.py apply_empty_x_to_equal_area), so it is the native control on every row."""
    nodes = {**LOADERS, "12": {"class_type": "ControlNetApply", "inputs": {
        "conditioning": ["6", 0], "control_net": ["10", 0], "image": ["11", 0], "strength": 0.9}}}
    pixels = graph_pixels(server, with_controls(nodes, ["12", 0], ["7", 0]))
    native = native_pixels(server, {**NATIVE, "control_convention": "comfyui",
                                    "controls": [native_control(EDGES, 0.9)]})
    assert np.array_equal(pixels, native)
    other_rule = native_pixels(server, {**NATIVE, "controls": [native_control(EDGES, 0.9)]})   # diffusers' resize
    assert np.abs(pixels - other_rule).max() > 0


def test_controls_that_never_act_are_left_out(server):
    """Strength 0 returns the conditioning untouched (nodes.py); start_percent > end_percent is a window no sigma
    lies in: both draw the graph without them."""
    nodes = {**LOADERS, "12": advanced(["6", 0], ["7", 0], "10", "11", 0.0, 0.0, 1.0),
             "15": advanced(["12", 0], ["12", 1], "13", "14", 0.7, 0.8, 0.2)}
    assert np.array_equal(graph_pixels(server, with_controls(nodes, ["15", 0], ["15", 1])),
                          graph_pixels(server, BASIC))


def test_object_info_lists_the_controlnet_nodes_as_comfyui(server):
    info = server.get("/object_info").json()
    assert info["ControlNetLoader"]["input"] == {"required": {"control_net_name": [[EDGES, DEPTH]]}}
    assert info["ControlNetLoader"]["output"] == ["CONTROL_NET"] and info["ControlNetLoader"]["category"] == "loaders"
    advanced_info = server.get("/object_info/ControlNetApplyAdvanced").json()["ControlNetApplyAdvanced"]
    assert advanced_info["input"] == {
        "required": {"positive": ["CONDITIONING"], "negative": ["CONDITIONING"], "control_net": ["CONTROL_NET"],
                     "image": ["IMAGE"],
                     "strength": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01}],
                     "start_percent": ["FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001}],
                     "end_percent": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001}]},
        "optional": {"vae": ["VAE"]}}
    assert advanced_info["input_order"]["optional"] == ["vae"]
    assert advanced_info["output"] == ["CONDITIONING", "CONDITIONING"]
    assert advanced_info["output_name"] == ["positive", "negative"]
    assert "deprecated" not in advanced_info
    apply_info = info["ControlNetApply"]
    assert list(apply_info["input"]["required"]) == ["conditioning", "control_net", "image", "strength"]
    assert apply_info["deprecated"] is True and apply_info["category"] == "conditioning/controlnet"


def test_controlnet_graphs_sdlab_does_not_draw_get_comfyuis_node_errors(server):
    chain = with_controls(CHAIN, ["15", 0], ["15", 1])
    bad = copy.deepcopy(chain)
    bad["10"]["inputs"]["control_net_name"] = "nothere.safetensors"
    error = refused(server, bad)["node_errors"]["10"]["errors"][0]
    assert error["type"] == "value_not_in_list"
    assert error["details"] == f"control_net_name: 'nothere.safetensors' not in {[EDGES, DEPTH]}"
    bad = copy.deepcopy(chain)
    del bad["15"]["inputs"]["image"]
    body = refused(server, bad)
    assert body["node_errors"]["15"]["errors"][0]["type"] == "required_input_missing"
    assert body["node_errors"]["15"]["class_type"] == "ControlNetApplyAdvanced"
    bad = copy.deepcopy(chain)
    bad["15"]["inputs"]["strength"] = 11
    assert refused(server, bad)["node_errors"]["15"]["errors"][0]["type"] == "value_bigger_than_max"
    bad = copy.deepcopy(chain)
    bad["15"]["inputs"]["control_net"] = ["4", 0]                       # a MODEL where CONTROL_NET goes
    assert refused(server, bad)["node_errors"]["15"]["errors"][0]["details"] == "control_net, MODEL != CONTROL_NET"
    bad = copy.deepcopy(chain)
    bad["15"]["inputs"]["image"] = ["8", 0]                              # the picture this KSampler draws
    assert refused(server, bad)["node_errors"]["15"]["errors"][0]["type"] == "dependency_cycle_detected"
    bad = copy.deepcopy(chain)                                          # a picture not a LoadImage's
    bad["20"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["14", 0], "vae": ["4", 2]}}
    bad["21"] = {"class_type": "VAEDecode", "inputs": {"samples": ["20", 0], "vae": ["4", 2]}}
    bad["15"]["inputs"]["image"] = ["21", 0]
    body = refused(server, bad)
    assert body["node_errors"]["15"]["errors"][0]["type"] == "unsupported_graph"
    # an Advanced node's positive alone on the KSampler: the negative rows would be drawn without it
    body = refused(server, with_controls(CHAIN, ["15", 0], ["7", 0]))
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    assert body["node_errors"]["3"]["errors"][0]["type"] == "unsupported_graph"
    # a ControlNetApply after an Advanced node: the negative keeps the Advanced one's alone (ComfyUI gives the
    # positive's to a negative without any)
    after = {**CHAIN, "16": {"class_type": "ControlNetApply", "inputs": {
        "conditioning": ["15", 0], "control_net": ["10", 0], "image": ["11", 0], "strength": 0.4}}}
    assert refused(server, with_controls(after, ["16", 0], ["15", 1]))["node_errors"]["3"]["errors"][0][
        "type"] == "unsupported_graph"
    assert server.get("/queue").json() == {"queue_running": [], "queue_pending": []}


def test_a_native_comfyui_control_with_a_resize_comfyui_has_not_is_a_422(server):
    answer = server.post("/api/jobs", json={**NATIVE, "control_convention": "comfyui",
                                            "controls": [{**native_control(EDGES, 0.9), "resize_mode": "fill"}]})
    assert answer.status_code == 422, answer.text
    assert "resize_mode resize or crop" in answer.text


def test_a_native_comfyui_control_with_start_equal_to_end_draws_as_the_graphs(server):
    """ComfyUI's sigma window takes start_percent == end_percent (the steps on that one sigma), and so do the
    pipeline and the graph: a native job under comfyui draws it as the graph does; diffusers' rule refuses it."""
    nodes = {**LOADERS, "12": advanced(["6", 0], ["7", 0], "10", "11", 0.9, 0.5, 0.5)}
    graph = graph_pixels(server, with_controls(nodes, ["12", 0], ["12", 1]))
    native = native_pixels(server, {**NATIVE, "control_convention": "comfyui",
                                    "controls": [native_control(EDGES, 0.9, 0.5, 0.5)]})
    assert np.array_equal(graph, native)
    answer = server.post("/api/jobs", json={**NATIVE, "controls": [native_control(EDGES, 0.9, 0.5, 0.5)]})
    assert answer.status_code == 422 and "0 <= start < end <= 1" in answer.text, answer.text


def test_a_controlnet_apply_on_each_side_applying_the_same_draws_as_one(server):
    """The old workflows' pattern: a ControlNetApply on the positive and another, applying the same net, picture
    and strength, on the negative. ComfyUI gives each row its own control of equal settings, so it draws as the
    one native control; nodes that apply something else on each side are still refused."""
    def apply(conditioning: str, strength: float, loader: str = "10") -> dict:
        return {"class_type": "ControlNetApply", "inputs": {
            "conditioning": [conditioning, 0], "control_net": [loader, 0], "image": ["11", 0], "strength": strength}}

    twin_loader = {"16": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": EDGES}}}
    nodes = {**LOADERS, **twin_loader, "12": apply("6", 0.9), "17": apply("7", 0.9, "16")}   # its own loader node
    pixels = graph_pixels(server, with_controls(nodes, ["12", 0], ["17", 0]))
    native = native_pixels(server, {**NATIVE, "control_convention": "comfyui",
                                    "controls": [native_control(EDGES, 0.9)]})
    assert np.array_equal(pixels, native)
    for other in (apply("7", 0.8), apply("7", 0.9, "13")):                 # another strength, another net
        body = refused(server, with_controls({**LOADERS, "12": apply("6", 0.9), "17": other}, ["12", 0], ["17", 0]))
        assert body["node_errors"]["3"]["errors"][0]["type"] == "unsupported_graph"


HIRES_NODES = {"20": {"class_type": "LatentUpscaleBy", "inputs": {"samples": ["3", 0], "upscale_method": "bislerp",
                                                                 "scale_by": 1.5}},
               "21": {"class_type": "KSampler", "inputs": {
                   "model": ["4", 0], "positive": ["15", 0], "negative": ["15", 1], "latent_image": ["20", 0],
                   "seed": 7, "steps": 2, "cfg": 4.5, "sampler_name": "euler_ancestral", "scheduler": "karras",
                   "denoise": 0.5}}}
NATIVE_HIRES = dict(hr_convention="comfyui", hr_upscaler="bislerp", hr_scale=1.5, hr_seed=7, hr_steps=2,
                    hr_cfg_scale=4.5, hr_sampler="euler_ancestral", hr_schedule="karras", hr_denoise=0.5)


def two_pass_with_controls(nodes: dict = CHAIN, positive: list = ["15", 0], negative: list = ["15", 1],
                           first: tuple[list, list] = (["15", 0], ["15", 1])) -> dict:
    """The graph of `nodes` with its KSampler (on the conditionings `first`) drawn again: its latent upscaled (node
    20) and sampled (node 21, on the conditionings `positive` / `negative`), node 21's latent decoded."""
    prompt = with_controls(nodes, *first)
    prompt.update(copy.deepcopy(HIRES_NODES))
    prompt["21"]["inputs"].update(positive=positive, negative=negative)
    prompt["8"]["inputs"]["samples"] = ["21", 0]
    return prompt


def test_a_two_pass_graph_with_controlnets_on_both_ksamplers_draws_the_native_hires_job(server):
    """Two ControlNetApplyAdvanced in a row on the conditionings of both KSamplers of ComfyUI's hires graph: the
    native job's controls under control_convention comfyui with its hires fix (hr_convention comfyui), which act in
    both passes, each hint cut and resized to its pass's latent as ComfyUI's get_control does (proven against
    ComfyUI's code in tests/test_comfyui_two_pass.py), pixel for pixel; ComfyUI's messages across both KSamplers.
    A second KSampler on its own ControlNet nodes applying the same draws the same."""
    messages, entry = drawn(server, two_pass_with_controls())
    executing = [data["node"] for kind, data in messages if kind == "executing"]
    assert executing == ["4", "6", "7", "10", "11", "12", "13", "14", "15", "5", "3", "20", "21", "8", "9", None]
    assert [(d["value"], d["max"], d["node"]) for k, d in messages if k == "progress"] == [
        (1, 3, "3"), (2, 3, "3"), (3, 3, "3"), (1, 2, "21"), (2, 2, "21")]
    pixels = viewed(server, entry["outputs"]["9"]["images"][0])
    assert pixels.shape == (96, 96, 3)
    controls = [native_control(EDGES, 0.8, 0.0, 0.6), native_control(DEPTH, 0.5, 0.3, 1.0)]
    native = native_pixels(server, {**NATIVE, **NATIVE_HIRES, "control_convention": "comfyui", "controls": controls})
    assert np.array_equal(pixels, native)
    uncontrolled = native_pixels(server, {**NATIVE, **NATIVE_HIRES})
    assert np.abs(pixels - uncontrolled).max() > 10
    own = {**CHAIN, "16": advanced(["6", 0], ["7", 0], "10", "11", 0.8, 0.0, 0.6),
           "17": advanced(["16", 0], ["16", 1], "13", "14", 0.5, 0.3, 1.0)}
    assert np.array_equal(graph_pixels(server, two_pass_with_controls(own, ["17", 0], ["17", 1])), pixels)


@pytest.mark.parametrize("nodes, positive, negative, first", [
    (CHAIN, ["6", 0], ["7", 0], (["15", 0], ["15", 1])),               # the first KSampler's alone
    (CHAIN, ["15", 0], ["15", 1], (["6", 0], ["7", 0])),               # the second's alone
    ({**CHAIN, "16": advanced(["6", 0], ["7", 0], "10", "11", 0.8, 0.0, 0.6)}, ["16", 0], ["16", 1],
     (["15", 0], ["15", 1])),                                           # one of the two
    ({**CHAIN, "16": advanced(["12", 0], ["12", 1], "13", "14", 0.4, 0.3, 1.0)}, ["16", 0], ["16", 1],
     (["15", 0], ["15", 1])),                                           # another strength
    ({**CHAIN, "16": advanced(["12", 0], ["12", 1], "13", "11", 0.5, 0.3, 1.0)}, ["16", 0], ["16", 1],
     (["15", 0], ["15", 1])),                                           # another picture
])
def test_a_two_pass_graph_whose_ksamplers_apply_other_controlnets_is_one_node_error(server, nodes, positive,
                                                                                     negative, first):
    """The request's controls act in both passes: a second KSampler whose ControlNets are not the first's (none,
    these on it alone, one of the two, another strength or picture) is refused with one node error on it, nothing
    queued."""
    body = refused(server, two_pass_with_controls(nodes, positive, negative, first))
    assert list(body["node_errors"]) == ["21"], body
    error = body["node_errors"]["21"]["errors"][0]
    assert error["type"] == "unsupported_graph" and "the same ControlNets" in error["message"], error
    assert server.get("/queue").json() == {"queue_running": [], "queue_pending": []}
