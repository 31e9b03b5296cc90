"""The X/Y/Z plot's axis types from A1111's `axis_options` (scripts/xyz_grid.py, AUTOMATIC1111/stable-diffusion-webui
02d5a43) that map onto request fields: each cell is the picture of a separate generation with that field set
(tiny model, 64 px, 2 steps), the axis names and legend labels are A1111's, and the values are checked as A1111
checks them."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdlab.pipeline.grid import GridError, Plot, draw_plot, field_named, parse_axis
from sdlab.pipeline.request import GenerationRequest

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a red apple on a light blue background"
BASE = {"prompt": PROMPT, "steps": 2, "width": 64, "height": 64, "seed": 5, "cfg_scale": 4.0}
HIRES = {"hr_scale": 1.5}


def _init_picture() -> Image.Image:
    ramp = np.linspace(0, 255, 64, dtype=np.uint8)
    return Image.fromarray(np.stack([np.tile(ramp, (64, 1)), np.tile(ramp[:, None], (1, 64)),
                                     np.full((64, 64), 128, np.uint8)], axis=-1))


IMG2IMG = {"init_image": _init_picture(), "strength": 0.6}
CHURN = {"sampler": "Euler", "s_churn": 1.0}

# (axis as typed, the options every cell shares, the request field each value sets, its values, A1111's legend
#  labels, whether the two cells differ)
CASES = [
    ("Var. seed=5,6", {"subseed_strength": 0.5}, "subseed", [5, 6], ["Var. seed: 5", "Var. seed: 6"], True),
    ("Var. strength=0,0.6", {"subseed": 11}, "subseed_strength", [0.0, 0.6],
     ["Var. strength: 0.0", "Var. strength: 0.6"], True),
    ("Hires steps=1,2", HIRES, "hr_steps", [1, 2], ["Hires steps: 1", "Hires steps: 2"], True),
    ("Hires upscaler=Latent,Lanczos", HIRES, "hr_upscaler", ["Latent", "Lanczos"],
     ["Hires upscaler: Latent", "Hires upscaler: Lanczos"], True),
    ("Hires sampler=Euler,DPM++ 2M", {**HIRES, "hr_steps": 3}, "hr_sampler", ["Euler", "DPM++ 2M"],
     ["Hires sampler: Euler", "Hires sampler: DPM++ 2M"], True),
    ("Denoising=0.3,0.6", HIRES, "hr_denoise", [0.3, 0.6], ["Denoising: 0.3", "Denoising: 0.6"], True),
    ("Denoising=0.3,0.6", {**IMG2IMG, "steps": 4}, "strength", [0.3, 0.6], ["Denoising: 0.3", "Denoising: 0.6"], True),
    ("Eta=0,1", {"sampler": "Euler a"}, "eta", [0.0, 1.0], ["Eta: 0.0", "Eta: 1.0"], True),
    ("Sigma Churn=0,1", {"sampler": "Euler"}, "s_churn", [0.0, 1.0], ["Sigma Churn: 0.0", "Sigma Churn: 1.0"], True),
    ("Sigma min=0,5", CHURN, "s_tmin", [0.0, 5.0], ["Sigma min: 0.0", "Sigma min: 5.0"], True),
    ("Sigma max=0,5", CHURN, "s_tmax", [0.0, 5.0], ["Sigma max: 0.0", "Sigma max: 5.0"], True),
    ("Sigma noise=1,0.5", CHURN, "s_noise", [1.0, 0.5], ["Sigma noise: 1.0", "Sigma noise: 0.5"], True),
    ("Negative Guidance minimum sigma=0,20", {"steps": 3}, "s_min_uncond", [0.0, 20.0],
     ["Negative Guidance minimum sigma: 0.0", "Negative Guidance minimum sigma: 20.0"], True),
    ("Schedule min sigma=0,0.5", {"schedule": "karras"}, "schedule_sigma_min", [0.0, 0.5],
     ["Schedule min sigma: 0.0", "Schedule min sigma: 0.5"], True),
    ("Schedule max sigma=0,5", {"schedule": "karras"}, "schedule_sigma_max", [0.0, 5.0],
     ["Schedule max sigma: 0.0", "Schedule max sigma: 5.0"], True),
    ("Schedule rho=0,3", {"schedule": "karras", "steps": 3}, "schedule_rho", [0.0, 3.0],
     ["Schedule rho: 0.0", "Schedule rho: 3.0"], True),
    ("Initial noise multiplier=1,0.8", IMG2IMG, "noise_multiplier", [1.0, 0.8],
     ["Initial noise multiplier: 1.0", "Initial noise multiplier: 0.8"], True),
    ("Extra noise=0,0.5", IMG2IMG, "extra_noise", [0.0, 0.5], ["Extra noise: 0.0", "Extra noise: 0.5"], True),
    ("UniPC Order=1,3", {"sampler": "UniPC", "schedule": "ddim_uniform", "steps": 5}, "unipc_order", [1, 3],
     ["UniPC Order: 1", "UniPC Order: 3"], True),
    ("Always discard next-to-last sigma=False,True", {"sampler": "Euler", "steps": 3}, "discard_penultimate_sigma",
     [False, True], ["Always discard next-to-last sigma: False", "Always discard next-to-last sigma: True"], True),
    ("SGM noise multiplier=false,TRUE", {}, "sgm_noise_multiplier", [False, True],
     ["SGM noise multiplier: False", "SGM noise multiplier: True"], True),
    ("RNG source=CPU,NV", {}, "rng", ["CPU", "NV"], ["RNG source: CPU", "RNG source: NV"], True),
    ("Clip skip=1,2", {}, "clip_skip", [1, 2], ["Clip skip: 1", "Clip skip: 2"], True),
    ("Schedule type=Karras,SGM Uniform", {"sampler": "DPM++ 2M"}, "schedule", ["Karras", "SGM Uniform"],
     ["Schedule type: Karras", "Schedule type: SGM Uniform"], True),
]


@pytest.fixture(scope="module")
def pipe():
    import sdlab

    return sdlab.load()


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=int)


@pytest.mark.parametrize("spec, shared, name, values, labels, differ", CASES, ids=[c[0] for c in CASES])
def test_each_cell_is_a_single_generation_with_that_setting(pipe, spec, shared, name, values, labels, differ) -> None:
    axis = parse_axis(spec)
    assert list(axis.values) == values and list(axis.labels) == labels
    _, results = draw_plot(pipe.run, {**BASE, **shared}, Plot(axis))
    cells = [_pixels(results[(i, 0, 0)].images[0]) for i in range(len(values))]
    for value, cell in zip(values, cells):
        single = pipe.run(GenerationRequest(**{**BASE, **shared, name: value})).images[0]
        assert np.array_equal(cell, _pixels(single)), (spec, value)
    assert (np.abs(cells[0] - cells[1]).max() > 0) == differ


def test_cond_image_mask_weight_is_a_single_inpainting_generation() -> None:
    """Cond. Image Mask Weight (img2img) conditions a 9-channel inpainting model (the tiny one here)."""
    from functools import partial

    from bundle_fixtures import tiny_bundle
    from sdlab.pipeline.generate import generate

    run = partial(generate, tiny_bundle("sd1-inpaint"))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (32, 32, 64, 64))
    shared = {**BASE, **IMG2IMG, "mask_image": mask}
    axis = parse_axis("Cond. Image Mask Weight=1,0.5")
    assert axis.labels == ("Cond. Image Mask Weight: 1.0", "Cond. Image Mask Weight: 0.5")
    _, results = draw_plot(run, shared, Plot(axis))
    cells = [_pixels(results[(i, 0, 0)].images[0]) for i in range(2)]
    for weight, cell in zip((1.0, 0.5), cells):
        assert np.array_equal(cell, _pixels(run(GenerationRequest(**shared, inpainting_mask_weight=weight)).images[0]))
    assert np.abs(cells[0] - cells[1]).max() > 0


def a1111_apply_order(prompt: str, x: tuple[str, ...]) -> str:
    """AUTOMATIC1111/stable-diffusion-webui scripts/xyz_grid.py `apply_order`, transcribed (p.prompt -> prompt)."""
    token_order = []
    for token in x:
        token_order.append((prompt.find(token), token))
    token_order.sort(key=lambda t: t[0])
    prompt_parts = []
    for _, token in token_order:
        n = prompt.find(token)
        prompt_parts.append(prompt[0:n])
        prompt = prompt[n + len(token):]
    prompt_tmp = ""
    for idx, part in enumerate(prompt_parts):
        prompt_tmp += part
        prompt_tmp += x[idx]
    return prompt_tmp + prompt


def test_prompt_order_is_every_permutation_reordered_as_a1111(pipe) -> None:
    axis = parse_axis("Prompt order=light blue, red apple, background")
    assert len(axis.values) == 6 and axis.values[0] == ("light blue", "red apple", "background")
    assert axis.labels[1] == "light blue, background, red apple"                 # format_value_join_list
    for order in axis.values:
        cell = axis.apply({"prompt": PROMPT}, axis.values.index(order))
        assert cell["prompt"] == a1111_apply_order(PROMPT, order)
    assert axis.apply({"prompt": PROMPT}, 5)["prompt"] == "a background on a red apple light blue"
    plot = Plot(parse_axis("Prompt order=red apple,light blue"))
    _, results = draw_plot(pipe.run, BASE, plot)
    single = pipe.run(GenerationRequest(**{**BASE, "prompt": "a light blue on a red apple background"})).images[0]
    assert np.array_equal(_pixels(results[(1, 0, 0)].images[0]), _pixels(single))
    assert plot.parameters()["X Type"] == "Prompt order"
    with pytest.raises(GridError, match="Prompt order did not find 'pear'"):
        Plot(parse_axis("Prompt order=apple,pear")).cells({"prompt": PROMPT})
    with pytest.raises(GridError, match="at most 256"):
        parse_axis("Prompt order=a,b,c,d,e,f")                                  # 720 permutations


def test_nothing_axis_draws_the_other_axes_alone(pipe) -> None:
    plot = Plot(parse_axis("steps=1,2"), parse_axis("Nothing"), parse_axis("nothing="))
    sheet, results = draw_plot(pipe.run, BASE, plot)
    alone, _ = draw_plot(pipe.run, BASE, Plot(parse_axis("steps=1,2")))
    assert sorted(results) == [(0, 0, 0), (1, 0, 0)]
    assert np.array_equal(_pixels(sheet), _pixels(alone))                       # no Y band, no Z title
    assert "Y Type" not in plot.parameters() and "Z Type" not in plot.parameters()   # as A1111 leaves them out


@pytest.mark.parametrize("name, field", [
    ("var. seed", "subseed"), ("VAR. STRENGTH", "subseed_strength"), ("hires_steps", "hr_steps"),
    ("Hires upscaler", "hr_upscaler"), ("hr_sampler", "hr_sampler"), ("Sigma Churn", "s_churn"),
    ("sigma min", "s_tmin"), ("s_tmax", "s_tmax"), ("Sigma noise", "s_noise"), ("eta", "eta"),
    ("Schedule min sigma", "schedule_sigma_min"), ("Schedule max sigma", "schedule_sigma_max"),
    ("Schedule rho", "schedule_rho"), ("Negative Guidance minimum sigma", "s_min_uncond"),
    ("Initial noise multiplier", "noise_multiplier"), ("Extra noise", "extra_noise"),
    ("Cond. Image Mask Weight", "inpainting_mask_weight"), ("UniPC Order", "unipc_order"),
    ("Always discard next-to-last sigma", "discard_penultimate_sigma"),
    ("SGM noise multiplier", "sgm_noise_multiplier"),
    ("RNG source", "rng"), ("Denoising", "strength"), ("Prompt order", "prompt_order"), ("Nothing", "nothing"),
])
def test_a1111_axis_names_in_any_case(name: str, field: str) -> None:
    assert field_named(name).name == field
    assert field_named(name.upper()).name == field


def test_var_seed_minus_one_is_drawn_once_and_recorded() -> None:
    plot = Plot(parse_axis("Var. seed=-1,3"))
    assert plot.x.values[0] != -1 and plot.x.values[1] == 3
    assert plot.parameters()["Fixed X Values"] == f"{plot.x.values[0]}, 3"


@pytest.mark.parametrize("spec, match", [
    ("Hires sampler=Euler,Eulr", "unknown sampler 'Eulr'"),
    ("RNG source=CPU,TPU", "unknown RNG source 'TPU'"),
    ("SGM noise multiplier=yes", "'yes' is not True or False"),
    ("Var. strength=0.5,2", r"Var. strength must lie in \[0, 1\]"),
    ("UniPC Order=0", "UniPC Order must be at least 1"),
])
def test_a1111_axis_values_are_checked(spec: str, match: str) -> None:
    with pytest.raises(GridError, match=match):
        parse_axis(spec)


def test_unipc_order_is_at_most_the_steps_less_one_as_a1111() -> None:
    axis = parse_axis("UniPC Order=3,5")
    assert axis.labels == ("UniPC Order: 3", "UniPC Order: 5")                  # the value as typed
    assert [axis.apply({"prompt": "a", "steps": 4}, i)["unipc_order"] for i in range(2)] == [3, 3]
    assert [axis.apply({"prompt": "a", "steps": steps}, 0)["unipc_order"] for steps in (1, 2)] == [1, 1]  # not 0


def test_a_unipc_order_axis_that_no_cell_runs_is_refused() -> None:
    """The order acts on A1111's UniPC (UniPC on ddim_uniform) only; "UniPC" on another schedule is diffusers'
    UniPCMultistepScheduler, which has none: every cell would be the same picture."""
    from sdlab.pipeline.request import GenerationResult

    drawn = []

    def run(request):
        drawn.append(request)
        return GenerationResult([Image.new("RGB", (8, 8))], [request.seed], request)

    order = parse_axis("UniPC Order=1,3")
    for shared in ({"sampler": "UniPC"}, {"sampler": "UniPC", "schedule": "karras"}, {"schedule": "ddim_uniform"}):
        with pytest.raises(GridError, match="acts on A1111's UniPC only"):
            draw_plot(run, {**BASE, **shared}, Plot(order))
    assert drawn == []
    draw_plot(run, {**BASE, "schedule": "ddim_uniform"}, Plot(order, parse_axis("Sampler=Euler,UniPC")))
    draw_plot(run, {**BASE, **HIRES, "hr_sampler": "UniPC", "hr_schedule": "ddim_uniform"}, Plot(order))
    assert len(drawn) == 6
