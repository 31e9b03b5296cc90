"""ControlNets under ComfyUI's convention (`control_convention="comfyui"`) act as ComfyUI's ControlNetApply nodes.

The reference is ComfyUI's code, transcribed below from comfyanonymous/ComfyUI (a0b45478): ``comfy/utils.py``
``common_upscale`` (crop "center", the hint's resize), ``comfy/controlnet.py`` ``ControlNet.get_control`` (the
hint at the latent's size times the VAE's factor, by nearest-exact; no control where t[0] > timestep_range[0] or
t[0] < timestep_range[1]; the previous ControlNet's residuals added to this one's, each times its strength:
``control_merge``) and ``ControlBase.pre_run`` with ``comfy/model_sampling.py``
``ModelSamplingDiscrete.percent_to_sigma`` (the window), ``nodes.py`` ``LoadImage`` (RGB: an alpha dropped, / 255).
ControlNetApply puts its control on the negative too (``control_apply_to_uncond`` and ``comfy/samplers.py``
``apply_empty_x_to_equal_area``), ControlNetApplyAdvanced on both: every row of the batch gets it.

ComfyUI hard-codes the factor 8 of SD's VAE; the tiny test model's VAE has factor 2, so the transcription sizes the
hint at the latent's size times 2 (the picture's size, as for SD at 8).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import sdlab
from bundle_fixtures import tiny_bundle, write_diffusers_folder
from comfy_reference import ModelSamplingDiscrete, normal_scheduler
from controlnet_fixtures import diffusers_controlnet, write_layout
from picture_parity import uint8_pictures
from sdlab.checkpoints.controlnet import load_controlnet
from sdlab.diffusion.comfy_sigmas import COMFYUI_ALWAYS, comfyui_percent_to_sigma
from sdlab.diffusion.denoiser import Denoiser
from sdlab.pipeline import generate as G
from sdlab.pipeline.control import ControlInput, comfyui_hint, comfyui_sigma_window
from sdlab.pipeline.request import RequestError
from test_comfyui_latent_upscale import common_upscale   # comfy/utils.py, transcribed there

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT, NEGATIVE, SEED, STEPS, CFG, WIDTH, HEIGHT = "a red cube", "blurry", 7, 6, 6.0, 48, 32


# -- ComfyUI, transcribed ----------------------------------------------------------------------------------------
def load_image(picture: Image.Image) -> torch.Tensor:
    """nodes.py ``LoadImage``: RGB, float32 / 255, (1, H, W, 3)."""
    image = np.array(picture.convert("RGB")).astype(np.float32) / 255.0
    return torch.from_numpy(image)[None,]


class ComfyControlNet:
    """comfy/controlnet.py ``ControlNet`` with ``set_cond_hint`` / ``set_previous_controlnet`` / ``pre_run`` /
    ``get_control`` / ``control_merge``, over sdlab's loaded ControlNet module (the network itself is proven equal to
    diffusers' in tests/test_controlnet.py). `factor`: ComfyUI's 8 (see the module docstring)."""

    def __init__(self, net, image, strength, percent_range, previous, factor, global_average_pooling=False):
        self.net, self.cond_hint_original, self.strength = net, image.movedim(-1, 1), strength
        self.timestep_percent_range, self.previous_controlnet, self.factor = percent_range, previous, factor
        self.global_average_pooling = global_average_pooling

    def pre_run(self, s):
        self.timestep_range = (s.percent_to_sigma(self.timestep_percent_range[0]),
                               s.percent_to_sigma(self.timestep_percent_range[1]))
        if self.previous_controlnet is not None:
            self.previous_controlnet.pre_run(s)

    def get_control(self, x_noisy, t, sigma, context, y):
        control_prev = None
        if self.previous_controlnet is not None:
            control_prev = self.previous_controlnet.get_control(x_noisy, t, sigma, context, y)
        if sigma[0] > self.timestep_range[0] or sigma[0] < self.timestep_range[1]:
            return control_prev
        cond_hint = common_upscale(self.cond_hint_original, x_noisy.shape[3] * self.factor,
                                   x_noisy.shape[2] * self.factor, "nearest-exact", "center")
        residuals, mid = self.net.model(x_noisy, t, context, cond_hint.expand(x_noisy.shape[0], -1, -1, -1), y)
        out = [*residuals, mid]
        if self.global_average_pooling:
            out = [torch.mean(x, dim=(2, 3), keepdim=True).repeat(1, 1, x.shape[2], x.shape[3]) for x in out]
        out = [x * self.strength for x in out]
        if control_prev is not None:
            out = [o + p for o, p in zip(out, control_prev)]
        return out


# -- the runs ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd1")
    bundle = tiny_bundle("sd1", seed=11)
    pipe = sdlab.load(write_diffusers_folder(bundle, folder / "pipe"))
    paths = []
    for k in range(2):
        model = diffusers_controlnet(bundle.unet_config, seed=30 + k, hint_widths=(16, 32), std=0.1)
        (folder / f"cn{k}").mkdir()
        paths.append(write_layout(model, "original", folder / f"cn{k}"))
    shuffle = folder / "cn1" / "control_cn_shuffle.safetensors"     # pooled by its name, as ComfyUI pools it
    shuffle.write_bytes(paths[1].read_bytes())
    return pipe, [*paths, shuffle]


def control_picture(seed: int, size=(60, 30)) -> Image.Image:
    """A picture of another aspect ratio than the drawing's (so the centre is cut) with a transparent band (which
    ComfyUI's LoadImage drops, where sdlab's other conventions lay it on white)."""
    image = Image.new("RGBA", size, (20, 40, 200, 255))
    draw = ImageDraw.Draw(image)
    draw.rectangle([3 + seed * 5, 2, 40, 25], outline=(255, 255, 255, 255), width=3)
    draw.ellipse([25, 5 + seed * 2, 58, 28], fill=(200, 60 * seed, 90, 255))
    draw.rectangle([0, 0, size[0] - 1, 6], fill=(250, 10, 10, 0))
    return image


@contextmanager
def comfyui_control_chain(monkeypatch, pipe, units) -> Iterator[set[tuple[int, int]]]:
    """`pipe`'s U-Net given ComfyUI's transcribed control chain of `units` (path, picture, strength, start_percent,
    end_percent; in the order the nodes apply them) at each call, by the sigma that call was made at (the window by
    the call's sigma; the hint cut and resized to the call's latent size), and no controls of sdlab's own; yields
    the latent sizes the U-Net is called at."""
    bundle = pipe.bundle
    chain = None
    for path, picture, strength, start, end in units:
        pooled = path.stem.endswith("_shuffle")                      # comfy/controlnet.py load_controlnet
        net = load_controlnet(path.with_name("control_cn.safetensors") if pooled else path)   # the same, unpooled
        chain = ComfyControlNet(net, load_image(picture), strength, (start, end), chain,
                                bundle.vae_config.downsample_factor, global_average_pooling=pooled)
    chain.pre_run(ModelSamplingDiscrete())
    seen, sizes = {}, set()

    class SigmaSpy(Denoiser):
        def __call__(self, x, sigma, **cond):
            seen["sigma"] = torch.as_tensor(sigma, dtype=torch.float32).flatten()
            return super().__call__(x, sigma, **cond)

    real = bundle.unet.forward

    def forward(x, t, context, y=None, **kwargs):
        sizes.add(tuple(x.shape[-2:]))
        out = chain.get_control(x, t, seen["sigma"], context, y)
        control = None if out is None else (out[:-1], out[-1])
        return real(x, t, context, y, control=control, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(G, "Denoiser", SigmaSpy)
        patch.setattr(bundle.unet, "forward", forward)
        yield sizes


def reference_run(monkeypatch, pipe, units, sampler, schedule):
    """The picture of `pipe` drawn with ComfyUI's control chain of `units` (`comfyui_control_chain`)."""
    sigmas = pipe.bundle.model_sampling.t_to_sigma(torch.arange(1000.0)).float()
    assert torch.equal(sigmas, ModelSamplingDiscrete().sigmas)                                   # SD's schedule
    with comfyui_control_chain(monkeypatch, pipe, units):
        return draw(pipe, sampler, schedule)


def draw(pipe, sampler, schedule, **options):
    """The latent the sampler returned and the pictures of one run."""
    caught = []
    real = G._run_sampler

    def spy(*args):
        caught.append(real(*args))
        return caught[-1]

    G._run_sampler = spy
    try:
        images = pipe.txt2img(PROMPT, NEGATIVE, steps=STEPS, cfg_scale=CFG, seed=SEED, width=WIDTH, height=HEIGHT,
                              sampler=sampler, schedule=schedule, **options).images
    finally:
        G._run_sampler = real
    return caught[-1], images


@pytest.mark.parametrize("sampler, schedule", [("euler", "karras"), ("heun", "normal")])
def test_a_chain_of_two_controlnets_draws_comfyuis_picture(monkeypatch, sd1, sampler, schedule):
    """Two ControlNets in a row, each on part of the schedule: ComfyUI's hint, window, strength and sum. heun calls
    the model at the next step's sigma inside a step: ComfyUI's window takes each call by its own sigma."""
    pipe, (first, second, _) = sd1
    units = [(first, control_picture(0), 0.8, 0.0, 0.55), (second, control_picture(1), 0.6, 0.3, 1.0)]
    controls = [ControlInput(path, picture, strength, start, end) for path, picture, strength, start, end in units]
    ours = draw(pipe, sampler, schedule, controls=controls, control_convention="comfyui")
    reference = reference_run(monkeypatch, pipe, units, sampler, schedule)
    plain = draw(pipe, sampler, schedule)
    diffusers = draw(pipe, sampler, schedule, controls=controls)
    assert (plain[0] - reference[0]).abs().max() > 0.1              # the controls change the latent
    assert (diffusers[0] - reference[0]).abs().max() > 0.01         # sdlab's other rules draw another one
    assert torch.equal(ours[0], reference[0])
    assert np.array_equal(uint8_pictures(ours[1]), uint8_pictures(reference[1]))


def test_an_edge_on_a_steps_sigma_acts_where_comfyuis_does(monkeypatch, sd1):
    """end_percent 0.4 on `normal` at 6 steps is the sigma of step 2 itself (timestep 599.4): the run's sigmas and
    the edge are ComfyUI's float32 ones bit for bit, so the control takes steps 0..2 as ComfyUI's get_control does
    (in float64 arithmetic the edge fell a last bit below that step's sigma and dropped step 2)."""
    pipe, (first, _, _) = sd1
    units = [(first, control_picture(0), 0.8, 0.0, 0.4)]
    seen = []

    class SigmaSpy(Denoiser):
        def __call__(self, x, sigma, **cond):
            seen.append(float(torch.as_tensor(sigma).flatten()[0]))
            return super().__call__(x, sigma, **cond)

    with monkeypatch.context() as patch:
        patch.setattr(G, "Denoiser", SigmaSpy)
        ours = draw(pipe, "euler", "normal", controls=[ControlInput(*units[0])], control_convention="comfyui")
    s = ModelSamplingDiscrete()
    sigmas = normal_scheduler(s, STEPS)
    assert seen == sigmas[:-1].tolist()                                     # ComfyUI's KSampler sigmas
    assert s.percent_to_sigma(0.4) == seen[2]
    reference = reference_run(monkeypatch, pipe, units, "euler", "normal")
    assert torch.equal(ours[0], reference[0])
    without_step_2 = draw(pipe, "euler", "normal", controls=[ControlInput(first, control_picture(0), 0.8, 0.0, 0.3)],
                          control_convention="comfyui")                     # steps 0..1: another latent
    assert not torch.equal(without_step_2[0], reference[0])


def caught_windows(monkeypatch, run) -> list[list[tuple[float, float] | None]]:
    """The sigma windows of the controls each pass of `run()` prepared (`generate.prepare_controls`)."""
    windows = []
    real = G.prepare_controls

    def spy(*args, **kwargs):
        controls = real(*args, **kwargs)
        windows.append([control.sigma_window for control in controls])
        return controls

    with monkeypatch.context() as patch:
        patch.setattr(G, "prepare_controls", spy)
        run()
    return windows


def test_the_windows_edges_are_the_passs_arithmetic(monkeypatch, sd1):
    """One seam (`plan.comfyui_arithmetic`) decides whether a pass follows ComfyUI's float32 arithmetic, for its
    sigmas and its control windows alike: under a sampler spelt as ComfyUI spells it the edge of end_percent 0.2 is
    ComfyUI's float32 percent_to_sigma (5.0924082); under A1111's `Euler` (float64 sigmas) it is sdlab's float64 one
    rounded (5.0924077), as before the float32 arithmetic came. A hires fix's
    second pass under hr_convention comfyui is ComfyUI's second KSampler: float32 edges after an `Euler` first pass."""
    pipe, (first, _, _) = sd1
    model_t_to_sigma = pipe.bundle.model_sampling.t_to_sigma
    comfy = ModelSamplingDiscrete()
    float32_edge, float64_edge = comfy.percent_to_sigma(0.2), comfyui_percent_to_sigma(0.2, model_t_to_sigma)
    assert float32_edge != float64_edge
    control = dict(controls=[ControlInput(first, control_picture(0), 0.8, 0.0, 0.2)], control_convention="comfyui")
    comfy_spelt = caught_windows(monkeypatch, lambda: draw(pipe, "euler", "normal", **control))
    a1111_spelt = caught_windows(monkeypatch, lambda: draw(pipe, "Euler", "normal", **control))
    assert comfy_spelt == [[(COMFYUI_ALWAYS, float32_edge)]]
    assert a1111_spelt == [[(COMFYUI_ALWAYS, float64_edge)]]
    hires = dict(hr_convention="comfyui", hr_upscaler="nearest-exact", hr_scale=1.5, hr_steps=4, hr_denoise=0.5)
    two_passes = caught_windows(monkeypatch, lambda: draw(pipe, "Euler", "normal", **control, **hires,
                                                          hr_sampler="euler"))
    assert two_passes == [[(COMFYUI_ALWAYS, float64_edge)], [(COMFYUI_ALWAYS, float32_edge)]]


def test_sa_solvers_interval_is_the_passs_arithmetic(monkeypatch, sd1):
    """SA-Solver's SDE interval reads the same seam: ComfyUI's float32 percent_to_sigma(0.2) on `normal` (its KSampler
    rule), sdlab's float64 one on a schedule named the diffusers way (`trailing`), as before."""
    pipe, _ = sd1
    comfy = ModelSamplingDiscrete()
    maps = []
    real = G._sampler_options

    def spy(*args):
        options = real(*args)
        maps.append(options["t_to_sigma"])
        return options

    with monkeypatch.context() as patch:
        patch.setattr(G, "_sampler_options", spy)
        draw(pipe, "sa_solver", "normal")
        draw(pipe, "sa_solver", "trailing")
    (normal, trailing), model_t_to_sigma = maps, pipe.bundle.model_sampling.t_to_sigma
    assert comfyui_percent_to_sigma(0.2, normal) == comfy.percent_to_sigma(0.2)
    assert comfyui_percent_to_sigma(0.2, trailing) == comfyui_percent_to_sigma(0.2, model_t_to_sigma)
    assert comfy.percent_to_sigma(0.2) != comfyui_percent_to_sigma(0.2, model_t_to_sigma)


def test_a_pooling_controlnet_acts_on_every_row_as_comfyuis(monkeypatch, sd1):
    """A shuffle ControlNet (pooled by its name, as ComfyUI's load_controlnet pools it): ComfyUI averages its
    residuals in control_merge and gives them to every row, where diffusers' rule keeps them to the prompt's."""
    pipe, (_, _, shuffle) = sd1
    units = [(shuffle, control_picture(1), 0.9, 0.0, 1.0)]
    ours = draw(pipe, "euler", "normal", controls=[ControlInput(*units[0])], control_convention="comfyui")
    reference = reference_run(monkeypatch, pipe, units, "euler", "normal")
    diffusers = draw(pipe, "euler", "normal", controls=[ControlInput(*units[0])])
    assert (diffusers[0] - reference[0]).abs().max() > 0.01                 # the prompt's rows alone: another
    assert torch.equal(ours[0], reference[0])


def test_the_hint_is_comfyuis_centre_cut_and_nearest_exact_resize():
    """`comfyui_hint` equals LoadImage + common_upscale(..., "nearest-exact", "center") bit for bit, for pictures
    wider, taller and of the drawing's aspect ratio, up and down; "resize" is crop "disabled"."""
    rng = np.random.default_rng(0)
    for size in ((60, 30), (17, 41), (96, 64), (24, 16), (33, 35)):
        picture = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8), "RGBA")
        for width, height, crop in ((48, 32, "center"), (32, 48, "center"), (64, 64, "center"),
                                    (40, 24, "disabled")):
            expected = common_upscale(load_image(picture).movedim(-1, 1), width, height, "nearest-exact", crop)
            got = comfyui_hint(picture, width, height, "crop" if crop == "center" else "resize")
            assert got.shape == (1, 3, height, width)
            assert torch.equal(got, expected), (size, width, height, crop)


def test_the_window_is_comfyuis_percent_to_sigma():
    """`comfyui_sigma_window` over sdlab's SD schedule equals ComfyUI's percent_to_sigma (float32 tables) within
    float32 rounding, 0 and 1 its special cases; a call is taken where ComfyUI takes it."""
    t_to_sigma = sdlab.load().bundle.model_sampling.t_to_sigma          # the shipped tiny model: SD's schedule
    s = ModelSamplingDiscrete()
    for start, end in ((0.0, 1.0), (0.0, 0.55), (0.3, 1.0), (0.125, 0.875), (0.5, 0.5)):
        high, low = comfyui_sigma_window(start, end, t_to_sigma)
        assert (high, low) == pytest.approx((s.percent_to_sigma(start), s.percent_to_sigma(end)), rel=1e-6)


def test_comfyuis_rule_refuses_resize_and_fill(sd1):
    pipe, (first, _, _) = sd1
    with pytest.raises(RequestError, match="resize_mode resize or crop"):
        draw(pipe, "euler", "karras", controls=[ControlInput(first, control_picture(0), resize_mode="fill")],
             control_convention="comfyui")
