"""ComfyUI's area composition (ConditioningSetArea / ConditioningSetAreaPercentage / ConditioningSetAreaStrength,
ConditioningCombine): each conditioning drawn on its area, averaged by feathered weight.

The reference is ComfyUI's code, transcribed below from comfyanonymous/ComfyUI comfy/samplers.py
(``get_area_and_mult``, ``calc_cond_batch``, ``create_cond_with_same_area_if_none``, ``process_conds``'s loop,
``resolve_areas_and_cond_masks``' percentages, ``cfg_function``) and nodes.py (ConditioningSetArea's ``// 8``).
It is run on the shipped sdlab-tiny model's own per-prompt denoisers (each caught from a CFG 1 run of that prompt),
so the two differ only in how the areas are composed; then through ComfyUI's KSampler (`ksampler`, euler).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from sdlab.diffusion.area_conds import Area, AreaPart, area_average, opposite_areas
from sdlab.pipeline.comfy_prompt import AreaPrompt
from sdlab.pipeline.request import RequestError
from test_comfyui_conventions import assert_same_latents, ksampler, sample_euler, sdlab_run, tiny  # noqa: F401
from test_server_comfy_api import drawn, graph, server, viewed  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# -- ComfyUI, transcribed -------------------------------------------------------------------------------------------
def get_area_and_mult(conds, x_in):
    """comfy/samplers.py ``get_area_and_mult`` (no mask, no timestep range): (input_x, mult, cond, area)."""
    dims = tuple(x_in.shape[2:])
    area = None
    strength = 1.0
    if 'area' in conds:
        area = list(conds['area'])
    if 'strength' in conds:
        strength = conds['strength']
    input_x = x_in
    if area is not None:
        for i in range(len(dims)):
            area[i] = min(input_x.shape[i + 2] - area[len(dims) + i], area[i])
            input_x = input_x.narrow(i + 2, area[len(dims) + i], area[i])
    mult = torch.ones_like(input_x) * strength
    if area is not None:
        fuzz = 8
        for i in range(len(dims)):
            rr = min(fuzz, mult.shape[2 + i] // 4)
            if area[len(dims) + i] != 0:
                for t in range(rr):
                    m = mult.narrow(i + 2, t, 1)
                    m *= ((1.0 / rr) * (t + 1))
            if (area[i] + area[len(dims) + i]) < x_in.shape[i + 2]:
                for t in range(rr):
                    m = mult.narrow(i + 2, area[i] - 1 - t, 1)
                    m *= ((1.0 / rr) * (t + 1))
    return input_x, mult, conds["text"], area


def calc_cond_batch(model_function, conds, x_in, sigma):
    """comfy/samplers.py ``calc_cond_batch``, each conditioning run alone (its batching changes no value)."""
    out_conds = [torch.zeros_like(x_in) for _ in conds]
    out_counts = [torch.ones_like(x_in) * 1e-37 for _ in conds]
    for i, side in enumerate(conds):
        for c in side:
            input_x, mult, text, area = get_area_and_mult(c, x_in)
            output = model_function(input_x, sigma, text)
            if area is None:
                out_conds[i] += output * mult
                out_counts[i] += mult
            else:
                out_c, out_cts = out_conds[i], out_counts[i]
                for d in range(len(area) // 2):
                    out_c = out_c.narrow(d + 2, area[d + len(area) // 2], area[d])
                    out_cts = out_cts.narrow(d + 2, area[d + len(area) // 2], area[d])
                out_c += output * mult
                out_cts += mult
    return [c / n for c, n in zip(out_conds, out_counts)]


def create_cond_with_same_area_if_none(conds, c):
    """comfy/samplers.py ``create_cond_with_same_area_if_none``."""
    if 'area' not in c:
        return
    c_area = c['area']
    smallest = None
    for x in conds:
        if 'area' in x:
            a = x['area']
            if c_area[2] >= a[2] and c_area[3] >= a[3]:
                if a[0] + a[2] >= c_area[0] + c_area[2]:
                    if a[1] + a[3] >= c_area[1] + c_area[3]:
                        if smallest is None:
                            smallest = x
                        elif 'area' not in smallest:
                            smallest = x
                        else:
                            if smallest['area'][0] * smallest['area'][1] > a[0] * a[1]:
                                smallest = x
        else:
            if smallest is None:
                smallest = x
    if smallest is None:
        return
    if 'area' in smallest:
        if smallest['area'] == c_area:
            return
    out = c.copy()
    out['text'] = smallest['text']
    conds += [out]


def resolve_areas(conditions, h, w):
    """comfy/samplers.py ``resolve_areas_and_cond_masks``' percentages."""
    for i, c in enumerate(conditions):
        if 'area' in c and c['area'][0] == "percentage":
            area = c['area']
            conditions[i] = {**c, 'area': (max(1, round(area[1] * h)), max(1, round(area[2] * w)),
                                           round(area[3] * h), round(area[4] * w))}


def comfyui_guided(model_function, positive, negative, cfg, h, w):
    """``sampling_function`` of a positive and a negative list: areas resolved, each side given the other's
    areas (``process_conds``), both averaged, ``uncond + (cond - uncond) * cfg``."""
    conds = {"positive": copy.deepcopy(positive), "negative": copy.deepcopy(negative)}
    for side in conds.values():
        resolve_areas(side, h, w)
    for k in conds:
        for c in conds[k]:
            for kk in conds:
                if k != kk:
                    create_cond_with_same_area_if_none(conds[kk], c)

    def guided(x, sigma):
        cond, uncond = calc_cond_batch(model_function, [conds["positive"], conds["negative"]], x, sigma)
        return uncond + (cond - uncond) * cfg
    return guided


def set_area(width, height, x, y, strength=1.0, factor=8):
    """nodes.py ConditioningSetArea's values: ``(height // 8, width // 8, y // 8, x // 8)``, 8 being ComfyUI's VAEs'
    downsampling factor (`factor`: the tiny model's 4)."""
    return {"area": (height // factor, width // factor, y // factor, x // factor), "strength": strength}


# -- the tests ------------------------------------------------------------------------------------------------------
PROMPTS = ("a red cube", "a blue ball", "green grass")
AREAS = (AreaPrompt(PROMPTS[0]), AreaPrompt(PROMPTS[1], pixels=(24, 40, 8, 16), strength=1.5),
         AreaPrompt(PROMPTS[2], fractions=(0.5, 0.3, 0.5, 0.7), strength=0.8))
COMFY_POSITIVE = [{"text": PROMPTS[0]}, {"text": PROMPTS[1], **set_area(24, 40, 8, 16, 1.5, factor=4)},
                  {"text": PROMPTS[2], "area": ("percentage", 0.3, 0.5, 0.7, 0.5), "strength": 0.8}]
NEGATIVE = "blurry"


def test_area_weights_and_opposites_are_comfyuis_on_a_toy_denoiser():
    """`area_average` + `opposite_areas` against the transcription on a denoiser that reads its crop's size and its
    conditioning, areas at every edge (touching the border or not, thin ones whose fade is side // 4, one past the
    bottom right cut there, overlapping, one holding another) and a negative area of its own."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 20, 28)
    sigma = torch.tensor(3.0)
    texts = {"a": 1.0, "b": -2.0, "c": 0.5, "d": 3.0, "n": 0.25, "m": -1.0}

    def toy(crop, s, text):
        return torch.tanh(crop * texts[text] / s) + crop.shape[-1] * 0.01 - crop.shape[-2] * 0.02

    positive = [dict(text="a"), dict(text="b", area=(10, 12, 0, 3), strength=1.5),
                dict(text="c", area=(3, 40, 15, 0), strength=0.7), dict(text="d", area=(6, 6, 12, 20)),
                dict(text="a", area=(4, 4, 2, 5))]
    negative = [dict(text="n"), dict(text="m", area=(8, 8, 4, 4), strength=2.0)]

    def part(c):
        area = c.get("area")
        return AreaPart({"text": c["text"]}, None if area is None else Area(*area), c.get("strength", 1.0))

    ours_pos, ours_neg = opposite_areas([part(c) for c in positive], [part(c) for c in negative])
    reference = comfyui_guided(toy, positive, negative, 1.0, 20, 28)
    cond, uncond = (area_average(parts, toy)(x, sigma)
                    for parts in (ours_pos, ours_neg))
    want_cond, want_uncond = calc_cond_batch(toy, [*_resolved(positive, negative)], x, sigma)
    torch.testing.assert_close(cond, want_cond, rtol=0, atol=1e-6)
    torch.testing.assert_close(uncond, want_uncond, rtol=0, atol=1e-6)
    torch.testing.assert_close(cond, reference(x, sigma), rtol=0, atol=1e-6)
    assert len(ours_neg) == 2 + 4 and len(ours_pos) == 5 + 1       # each side got the other's areas


def test_a_conditioning_laid_out_like_the_latent_is_cut_to_the_area():
    """An inpainting model's ``concat`` (B, 5, h, w), bound to a part or given at the call, reaches the denoiser cut
    to the part's area as x is (ComfyUI's CONDNoiseShape.process_cond); the pooled vector (B, 1280) as it is."""
    torch.manual_seed(1)
    x, concat, y = torch.randn(1, 4, 16, 24), torch.randn(1, 5, 16, 24), torch.randn(1, 1280)
    seen = []

    def model(crop, sigma, concat, y):
        assert concat.shape[-2:] == crop.shape[-2:] and y.shape == (1, 1280)
        seen.append(concat)
        return crop * 0 + concat[:, :4]

    area = Area(6, 10, 4, 8)
    parts = [AreaPart({"concat": concat}), AreaPart({"concat": concat}, area, 2.0)]
    out = area_average(parts, model)(x, torch.tensor(1.0), y=y)
    torch.testing.assert_close(seen[1], concat[:, :, 4:10, 8:18])
    torch.testing.assert_close(out, concat[:, :4])               # the same value under every weight: itself


def _resolved(positive, negative):
    conds = {"positive": copy.deepcopy(positive), "negative": copy.deepcopy(negative)}
    for k in conds:
        for c in conds[k]:
            for kk in conds:
                if k != kk:
                    create_cond_with_same_area_if_none(conds[kk], c)
    return conds["positive"], conds["negative"]


def test_area_prompts_draw_comfyuis_area_composition_on_the_tiny_model(monkeypatch, tiny):  # noqa: F811
    """A full prompt, a ConditioningSetArea one at 1.5 and a ConditioningSetAreaPercentage one at 0.8, CFG 5:
    sdlab's guided denoiser is ComfyUI's composition of the model's own per-prompt denoisers at two calls, and the
    whole euler run ComfyUI's KSampler on that composition, latent for latent."""
    import sdlab.pipeline.generate as G
    per_prompt = {}
    for text in (*PROMPTS, NEGATIVE):
        caught = {}
        real = G._run_sampler

        def spy(plan, model, x, sigmas, options, progress, caught=caught):
            caught["model"] = model
            return real(plan, model, x, sigmas, options, progress)
        monkeypatch.setattr(G, "_run_sampler", spy)
        tiny.txt2img(text, steps=1, cfg_scale=1.0, seed=1, sampler="euler", schedule="karras", width=64, height=64)
        per_prompt[text] = caught["model"]
        monkeypatch.setattr(G, "_run_sampler", real)
    run = sdlab_run(monkeypatch, tiny, "txt2img", NEGATIVE, steps=6, cfg_scale=5.0, sampler="euler",
                    schedule="karras", width=64, height=64, area_prompts=AREAS)
    h, w = run["x"].shape[-2:]
    reference = comfyui_guided(lambda crop, s, text: per_prompt[text](crop, s), COMFY_POSITIVE,
                               [{"text": NEGATIVE}], 5.0, h, w)
    for step in (0, 3):
        x = run["x"] * (run["sigmas"][step] / run["sigmas"][0]) + 0.1
        torch.testing.assert_close(run["model"](x, run["sigmas"][step]), reference(x, run["sigmas"][step]),
                                   rtol=1e-5, atol=1e-5)
    latents = ksampler(sample_euler, reference, run["sigmas"], 1, torch.zeros_like(run["x"]),
                       tiny.bundle.model_sampling.sigma_max)
    assert_same_latents(run["out"], latents)
    drawn_out = run["out"]                  # (a later sdlab_run's spy wraps this one's, which would catch it again)
    plain = sdlab_run(monkeypatch, tiny, "txt2img", NEGATIVE, steps=6, cfg_scale=5.0, sampler="euler",
                      schedule="karras", width=64, height=64)
    assert (plain["out"] - drawn_out).abs().max() > 1e-2            # the areas change the drawing


def test_an_area_over_the_whole_picture_draws_the_plain_picture(tiny):  # noqa: F811
    """One prompt on an area that covers the picture (ConditioningSetArea in pixels, the percentage's 1 x 1, or the
    whole at another strength) is the plain prompt's picture, batch of 2, 64 x 96: the weights cancel and the
    negative's copy on that area is the negative. The pixels are the picture's on a VAE of any factor (the tiny
    model's 4; ComfyUI's `// 8` is its VAEs' 8), where // 8 on the tiny model drew a quarter of the picture."""
    options = dict(steps=3, cfg_scale=5.0, seed=3, sampler="euler", schedule="karras", width=64, height=96,
                   negative_prompt="blurry", batch_size=2)

    def pixels(**extra):
        images = tiny.txt2img("a red cube", **options, **extra).images
        return np.stack([np.asarray(im, dtype=np.int16) for im in images])
    plain = pixels()
    for area in (AreaPrompt("a red cube", pixels=(64, 96, 0, 0)), AreaPrompt("a red cube", fractions=(1, 1, 0, 0)),
                 AreaPrompt("a red cube", strength=2.0)):
        assert np.abs(pixels(area_prompts=(area,)) - plain).max() <= 1, area


@pytest.mark.parametrize("areas, words", [
    ((AreaPrompt("a", pixels=(64, 64, 128, 0)),), "lies outside"),   # x // 4 past the 16 px latent
    ((AreaPrompt("a", fractions=(0.5, 0.5, 1.0, 0.0)),), "lies outside"),
    ((AreaPrompt("a", strength=11.0),), "strength"),
    (("a",), "AreaPrompt"),
])
def test_bad_area_prompts_are_refused_naming_the_fault(tiny, areas, words):  # noqa: F811
    with pytest.raises(RequestError, match=words):
        tiny.txt2img("a", steps=1, width=64, height=64, sampler="euler", area_prompts=areas)


def test_area_prompts_are_not_drawn_seamless(tiny):  # noqa: F811
    """Tiling runs the U-Net with circular padding: on an area's crop the crop's own edges would meet, seams inside
    the picture, so area prompts with tiling are refused naming it, not drawn."""
    with pytest.raises(RequestError, match="tiling"):
        tiny.txt2img("a", steps=1, width=64, height=64, sampler="euler", tiling=True,
                     area_prompts=(AreaPrompt("a"), AreaPrompt("b", pixels=(32, 32, 0, 0))))


# -- the graph ------------------------------------------------------------------------------------------------------
def area_graph() -> dict:
    """ComfyUI's area composition example, small: the whole-picture prompt 6 combined with a ConditioningSetArea of
    prompt 10 and (combined after) a ConditioningSetAreaPercentage of prompt 12 under a ConditioningSetAreaStrength."""
    prompt = graph(**{"5.width": 128, "5.height": 96})
    prompt["10"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "a blue ball"}}
    prompt["11"] = {"class_type": "ConditioningSetArea", "inputs": {"conditioning": ["10", 0], "width": 64,
                                                                     "height": 72, "x": 32, "y": 16, "strength": 1.5}}
    prompt["12"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "green grass"}}
    prompt["13"] = {"class_type": "ConditioningSetAreaPercentage", "inputs": {
        "conditioning": ["12", 0], "width": 0.5, "height": 0.3, "x": 0.5, "y": 0.7, "strength": 1.0}}
    prompt["14"] = {"class_type": "ConditioningSetAreaStrength", "inputs": {"conditioning": ["13", 0],
                                                                             "strength": 0.8}}
    prompt["15"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["6", 0],
                                                                     "conditioning_2": ["11", 0]}}
    prompt["16"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["15", 0],
                                                                     "conditioning_2": ["14", 0]}}
    prompt["3"]["inputs"]["positive"] = ["16", 0]
    return prompt


def checked(prompt):
    from sdlab.server.comfy_graph import Choices, check_graph
    return check_graph(prompt, Choices(checkpoints=["plain.safetensors"], loras=[], input_images=[],
                                       samplers=["euler"]))


def test_the_area_graph_is_comfyuis_conditioning_list():
    """ConditioningCombine lists conditioning_1's entries then conditioning_2's; each area node sets its values on
    the entries it passes (the percentage's strength replaced by the strength node after it); the nodes run after
    their inputs."""
    plan = checked(area_graph())
    assert plan.area_prompts == (AreaPrompt("masterpiece best quality girl"),
                                 AreaPrompt("a blue ball", pixels=(64, 72, 32, 16), strength=1.5),
                                 AreaPrompt("green grass", fractions=(0.5, 0.3, 0.5, 0.7), strength=0.8))
    assert plan.prompt == "masterpiece best quality girl"
    order = plan.order
    for node, inputs in (("11", ["10"]), ("13", ["12"]), ("14", ["13"]), ("15", ["6", "11"]), ("16", ["15", "14"]),
                         ("3", ["16"])):
        assert all(order.index(i) < order.index(node) for i in inputs), (node, order)
    assert checked(graph()).area_prompts == ()                          # a plain graph: no areas


def refused_node(prompt) -> tuple[str, str]:
    from sdlab.server.comfy_graph import GraphError
    with pytest.raises(GraphError) as caught:
        checked(prompt)
    [(node, error)] = caught.value.node_errors.items()
    return node, error["errors"][0]["message"]


def test_area_nodes_sdlab_does_not_draw_are_refused_naming_the_node():
    """An area on the negative, or an area node over a node sdlab does not read, is a 400 naming it."""
    prompt = area_graph()
    prompt["3"]["inputs"]["negative"] = ["11", 0]
    assert refused_node(prompt)[0] == "11"
    prompt = area_graph()
    prompt["15"]["inputs"]["conditioning_2"] = ["5", 0]                 # a LATENT: ComfyUI's type mismatch
    assert refused_node(prompt)[0] == "15"


def test_the_area_graph_is_drawn_over_the_comfyui_api(server):  # noqa: F811
    """The graph over /prompt draws a picture (the request carrying the graph's list), not the plain graph's; an
    area past the picture is a 400, nothing queued."""
    _, entry = drawn(server, area_graph())
    pixels = viewed(server, entry["outputs"]["9"]["images"][0])
    _, plain_entry = drawn(server, graph(**{"5.width": 128, "5.height": 96}))
    assert np.abs(pixels - viewed(server, plain_entry["outputs"]["9"]["images"][0])).max() > 10
    prompt = area_graph()
    prompt["11"]["inputs"]["x"] = 1024
    answer = server.post("/prompt", json={"prompt": prompt})
    assert answer.status_code == 400 and "lies outside" in answer.text, answer.text


# -- the server's work limit ------------------------------------------------------------------------------------------
def test_area_prompts_count_their_passes_in_the_servers_work_limit():
    """Each area prompt is a U-Net pass on its area (and, guided, the negative's pass on it too): the work limit counts
    them at their areas' shares of the picture, so many whole-picture areas at the most steps are a 422 naming
    them, where they were counted as one prompt and drawn."""
    from dataclasses import replace

    from sdlab.pipeline.request import GenerationRequest
    from sdlab.server.config import Limits
    from sdlab.server.inputs import BadRequest, check_work, unet_work

    base = GenerationRequest("a", sampler="euler", schedule="normal", cfg_scale=8.0, steps=10, width=512, height=512,
                             seed=1)
    areas = (AreaPrompt("a"), AreaPrompt("b", pixels=(256, 256, 0, 0)), AreaPrompt("c", fractions=(0.5, 1.0, 0.5, 0)))
    plain = unet_work(base, 8, None)                                  # the prompt and the negative: 2 rows
    # positive 1 + 1/4 + 1/2, the negative 1 (whole) + 1/4 + 1/2
    assert unet_work(replace(base, area_prompts=areas), 8, None) == pytest.approx(plain * 3.5 / 2)
    limits = Limits(max_pixels=512 * 512, max_steps=10, max_batch=1, max_images=1)
    check_work(replace(base, area_prompts=areas), limits, 8, None)     # within the limit (4 rows' worth)
    with pytest.raises(BadRequest) as caught:
        check_work(replace(base, area_prompts=(AreaPrompt("a"),) * 5), limits, 8, None)
    assert caught.value.status == 422 and "5 area prompts" in str(caught.value)
