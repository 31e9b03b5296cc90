"""DeepCache (`models.deep_cache`): sdlab's cached U-Net against DeepCache's own `DeepCacheSDHelper` (PyPI DeepCache
0.1.1, `DeepCache/extension/deepcache.py`) wrapped around diffusers' pipelines on the same random reduced-width
weights, seed and sampler; the uint8 pictures agree within `MAX_PIXEL_DIFF` (2/255), as the plain pipelines do
(tests/test_pipeline_parity.py). The helper counts a step as the index of the call's timestep in the scheduler's
list, so DDIM and Euler (one model call a step) are the samplers both sides count alike."""

from __future__ import annotations

import re
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from bundle_fixtures import (
    as_released, init_picture, lower_right_mask, tiny_bundle, write_diffusers_folder, write_original,
)
from cli_helpers import assert_from_png_redraws, draw_with_and_without, pixels, run
from controlnet_fixtures import diffusers_controlnet, write_layout
from DeepCache import DeepCacheSDHelper
from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from picture_parity import CFG, MAX_PIXEL_DIFF, PROMPT, SEED, SIZE, max_pixel_diff, uint8_pictures

import sdlab
from sdlab.api import DeepCache
from sdlab.models.deep_cache import DeepCacheRun, DeepFeature
from sdlab.models.unet import UNet
from sdlab.pipeline.control import ControlInput
from sdlab.pipeline.generate import generate, sample_latents
from sdlab.pipeline.infotext import DEEP_CACHE_LABELS, from_parameters, to_parameters
from sdlab.pipeline.plan import make_plan
from sdlab.pipeline.png_info import format_parameters, parse_parameters, read_parameters
from sdlab.pipeline.request import GenerationRequest, RequestError, check_deep_cache

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

NEGATIVE = "blurry, low quality"
STEPS = 7                                  # interval 3: full steps 0, 3, 6; 2: 0, 2, 4, 6
SCHEDULER_KEYS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "steps_offset",
                  "timestep_spacing", "prediction_type")


def _pipes(tmp_path_factory, name: str, pipeline):
    folder = as_released(write_diffusers_folder(tiny_bundle(name, seed=11), tmp_path_factory.mktemp(name) / "pipe"),
                         SIZE // 2)
    pipe = pipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return sdlab.load(folder), pipe


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return _pipes(tmp_path_factory, "sd1", StableDiffusionPipeline)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return _pipes(tmp_path_factory, "sdxl", StableDiffusionXLPipeline)


def _scheduler(pipe, name: str):
    """diffusers' scheduler `name` and the sdlab options that draw the same sampler and sigmas."""
    config = {key: pipe.scheduler.config[key] for key in SCHEDULER_KEYS}
    if name == "ddim":
        return (DDIMScheduler.from_config(config, clip_sample=False, set_alpha_to_one=False),
                dict(sampler="DDIM", schedule="ddim_leading", init_noise="vp"))
    return EulerDiscreteScheduler.from_config(config), dict(sampler="Euler", schedule="leading", init_noise="vp")


def _reference(pipe, interval: int, branch: int, batch: int = 1) -> np.ndarray:
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    try:
        generators = [torch.Generator("cpu").manual_seed(SEED + i) for i in range(batch)]
        return pipe(PROMPT, negative_prompt=NEGATIVE, num_images_per_prompt=batch, num_inference_steps=STEPS,
                    guidance_scale=CFG, width=SIZE, height=SIZE, generator=generators, output_type="np").images
    finally:
        helper.disable()


def _ours(ours_pipe, options, deep_cache, batch: int = 1, **changes):
    return ours_pipe.txt2img(PROMPT, NEGATIVE, steps=STEPS, cfg_scale=CFG, seed=SEED, width=SIZE, height=SIZE,
                             batch_size=batch, deep_cache=deep_cache, **options, **changes).images


# the tiny U-Nets have 2 levels of 1 ResBlock (2 decoder ResBlocks a level): branches 0, 1 (level 0), 3, 4 (level 1)
@pytest.mark.parametrize("scheduler, interval, branch", [
    ("ddim", 3, 0), ("ddim", 2, 1), ("euler", 3, 3), ("euler", 5, 4),
])
def test_sd1_matches_deepcache_helper(sd1, scheduler, interval, branch):
    ours_pipe, pipe = sd1
    pipe.scheduler, options = _scheduler(pipe, scheduler)
    reference = _reference(pipe, interval, branch, batch=2)
    ours = _ours(ours_pipe, options, DeepCache(interval=interval, branch=branch), batch=2)
    assert max_pixel_diff(ours, reference) <= MAX_PIXEL_DIFF
    plain = _ours(ours_pipe, options, None, batch=2)
    assert max_pixel_diff(plain, reference) > 2 * MAX_PIXEL_DIFF     # the bound sees what the cache changes


@pytest.mark.parametrize("branch", [0, 3])
def test_sdxl_matches_deepcache_helper(sdxl, branch):
    ours_pipe, pipe = sdxl
    pipe.scheduler, options = _scheduler(pipe, "euler")
    reference = _reference(pipe, 3, branch)
    ours = _ours(ours_pipe, options, DeepCache(interval=3, branch=branch))
    assert max_pixel_diff(ours, reference) <= MAX_PIXEL_DIFF
    assert max_pixel_diff(_ours(ours_pipe, options, None), reference) > 2 * MAX_PIXEL_DIFF


@pytest.mark.parametrize("sampler", ["Euler", "Heun"])
def test_interval_1_is_off_bit_for_bit(sd1, sampler):
    """Every step a full step: the same latents to the bit as without DeepCache (the cached seam changes nothing)."""
    ours_pipe, _ = sd1
    request = GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE, steps=STEPS, cfg_scale=CFG, seed=SEED,
                                width=SIZE, height=SIZE, sampler=sampler, batch_size=2)
    off = sample_latents(ours_pipe.bundle, request)
    assert torch.equal(sample_latents(ours_pipe.bundle, replace(request, deep_cache=DeepCache(1, 0))), off)
    assert not torch.equal(sample_latents(ours_pipe.bundle, replace(request, deep_cache=DeepCache(2, 0))), off)


@pytest.fixture
def calls(monkeypatch):
    """Each U-Net call's kind while the test runs: "F" (whole U-Net) or "s" (DeepCache's shallow branch)."""
    seen: list[str] = []
    forward = UNet.forward

    def watched(self, *args, deep_cache=None, **kwargs):
        seen.append("s" if deep_cache is not None and deep_cache.feature is not None else "F")
        return forward(self, *args, deep_cache=deep_cache, **kwargs)

    monkeypatch.setattr(UNet, "forward", watched)
    return seen


@pytest.mark.parametrize("sampler, expected", [
    ("Euler", "FssFssF"),
    ("Heun", "FF" "ss" "ss" "FF" "ss" "ss" "F"),     # both calls of a step alike; Heun's last step calls once
    ("DPM2 a", "FF" "ss" "ss" "FF" "ss" "ss" "F"),   # the midpoint call (below sigma_next) is its own step's
    ("DPM++ 2S a", "FF" "ss" "ss" "FF" "ss" "ss" "F"),
])
def test_a_step_is_a_sampler_step(sd1, calls, sampler, expected):
    ours_pipe, _ = sd1
    _ours(ours_pipe, dict(sampler=sampler), DeepCache(interval=3, branch=0), batch=2)
    assert "".join(calls) == expected             # CFG's negative and positive prompt: one call, one cache


@pytest.fixture
def timed_calls(monkeypatch):
    """Each U-Net call while the test runs: its timesteps (B,) and whether it ran whole."""
    seen: list[tuple[torch.Tensor, bool]] = []
    forward = UNet.forward

    def watched(self, x, t, *args, deep_cache=None, **kwargs):
        seen.append((t.detach().clone(), deep_cache is None or deep_cache.feature is None))
        return forward(self, x, t, *args, deep_cache=deep_cache, **kwargs)

    monkeypatch.setattr(UNet, "forward", watched)
    return seen


def _helper_runs_whole(timesteps: list[float], interval: int) -> list[bool]:
    """DeepCacheSDHelper's own decision for U-Net calls at `timesteps` (in call order), its scheduler's list being
    the distinct timesteps called at in the order first called: a call runs whole where the helper does not skip
    the middle block (its `is_skip_step`, after its U-Net forward wrapper set `cur_timestep` from the list)."""
    helper = DeepCacheSDHelper(pipe=SimpleNamespace(unet=SimpleNamespace(), scheduler=SimpleNamespace(
        timesteps=list(dict.fromkeys(timesteps)))))
    helper.set_params(cache_interval=interval, cache_branch_id=0)
    helper.reset_states()
    decided: list[bool] = []
    helper.pipe.unet.forward = lambda x, t: decided.append(not helper.is_skip_step(0, 0, "mid"))
    helper.wrap_unet_forward()
    for t in timesteps:
        helper.pipe.unet.forward(None, torch.tensor(t))
    return decided


@pytest.mark.parametrize("sampler", ["DPM fast", "dpm_fast", "DPM adaptive"])
@pytest.mark.parametrize("interval", [2, 3])
def test_a_sampler_that_chooses_its_sigmas_steps_by_timestep(sd1, timed_calls, sampler, interval):
    """DPM fast and DPM adaptive call the model at sigmas of their own, not the list's: a call's step is the place
    of its timestep among those called at, as DeepCacheSDHelper's is (the index of the call's timestep in its
    scheduler's list), so the whole calls are the helper's, call for call. Tagged by the list's steps before, DPM
    fast's 7 calls at interval 3 ran "FsFsFss" (whole at 0, 2, 4: calls landing in steps 0, 3, 6 of the list)."""
    ours_pipe, _ = sd1
    _ours(ours_pipe, dict(sampler=sampler), DeepCache(interval=interval, branch=0))
    timesteps = [float(t.flatten()[0]) for t, _ in timed_calls]
    ours = [whole for _, whole in timed_calls]
    assert all(len(set(t.flatten().tolist())) == 1 for t, _ in timed_calls)     # one picture: one timestep a call
    assert ours == _helper_runs_whole(timesteps, interval)
    assert not all(ours) and ours[0]
    if sampler.lower().replace(" ", "_") == "dpm_fast":     # a new sigma at every call: every interval-th call
        assert len(ours) == STEPS and ours == [i % interval == 0 for i in range(STEPS)]
    else:
        assert len(ours) > STEPS                                     # its own count of calls


def test_dpm_fast_with_a_batch_runs_every_interval_th_call_whole(sd1, calls):
    """CFG's rows and a batch's pictures share a call's timesteps: the batch runs as one picture does."""
    ours_pipe, _ = sd1
    _ours(ours_pipe, dict(sampler="DPM fast"), DeepCache(interval=3, branch=0), batch=2)
    assert "".join(calls) == "FssFssF"


def test_a_repeated_timestep_is_its_first_calls_step():
    """DPM adaptive repeats a refused try's first call at the same sigma: that call is the step of the timestep's
    first call, and a new timestep the next step."""
    run = DeepCacheRun(DeepCache(interval=2), skip_block=0)
    places = [run.timestep_place(torch.tensor([t, t])) for t in (900.0, 700.0, 650.0, 700.0, 500.0)]
    assert places == [0, 1, 2, 1, 3]
    assert run.timestep_place(torch.tensor([500.0, 480.0])) == 4     # a batch's rows at their own timesteps


def test_every_pass_counts_its_steps_from_its_first(sd1, calls):
    """The hires fix's second pass and img2img's shortened schedule start with a full step. (This cannot tell a
    fresh `DeepCacheRun` from one shared by the passes, since a full step forgets every kept feature:
    `test_a_pass_after_a_one_step_pass_starts_empty` can.)"""
    ours_pipe, _ = sd1
    _ours(ours_pipe, dict(sampler="Euler"), DeepCache(interval=2, branch=1), hr_scale=1.5, hr_steps=3,
          hr_upscaler="Latent")
    assert "".join(calls) == "FsFsFsF" + "FsF"
    calls.clear()
    ours_pipe.img2img(PROMPT, init_picture(SIZE), 0.5, NEGATIVE, steps=8, seed=SEED,
                      sampler="Euler", cfg_scale=CFG, deep_cache=DeepCache(interval=3, branch=0))
    assert "".join(calls) == "FssF"


def test_a_pass_after_a_one_step_pass_starts_empty(sd1, monkeypatch):
    """A one-step first pass ends on step 0, the step the hires fix's second pass (at the same size) starts on:
    without a fresh `DeepCacheRun` the second pass's step 1 would run on the first pass's step 0 features."""
    made: list[torch.Tensor] = []          # each whole call's features, in call order
    origins: list[int | None] = []         # each call: the whole call whose features it ran on (None: whole)
    forward = UNet.forward

    def watched(self, *args, deep_cache=None, **kwargs):
        origin = next((i for i, f in enumerate(made) if f is deep_cache.feature), -1) \
            if deep_cache is not None and deep_cache.feature is not None else None
        out = forward(self, *args, deep_cache=deep_cache, **kwargs)
        origins.append(origin)
        made.append(deep_cache.feature if origin is None else None)
        return out

    monkeypatch.setattr(UNet, "forward", watched)
    ours_pipe, _ = sd1
    ours_pipe.txt2img(PROMPT, NEGATIVE, steps=1, cfg_scale=CFG, seed=SEED, width=SIZE, height=SIZE,
                      deep_cache=DeepCache(interval=2, branch=1), sampler="Euler", hr_scale=1.0, hr_steps=3,
                      hr_upscaler="Latent")
    assert origins == [None] + [None, 1, None]      # pass 2's step 1 runs on pass 2's step 0 (call 1)


@pytest.fixture
def sources(monkeypatch):
    """Each U-Net call while the test runs: "F" (whole), "s" (shallow on features a whole call on the same
    context left) or "X" (shallow on the features of a call on another context: another prompt's)."""
    made: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}      # id(feature) -> (feature, its call's context)
    seen: list[str] = []
    forward = UNet.forward

    def watched(self, x, t, context, *args, deep_cache=None, **kwargs):
        shallow = deep_cache is not None and deep_cache.feature is not None
        source = made.get(id(deep_cache.feature)) if shallow else None
        out = forward(self, x, t, context, *args, deep_cache=deep_cache, **kwargs)
        if shallow:
            seen.append("s" if source is not None and torch.equal(source[1], context) else "X")
        elif deep_cache is not None:
            made[id(deep_cache.feature)] = (deep_cache.feature, context)
            seen.append("F")
        return out

    monkeypatch.setattr(UNet, "forward", watched)
    return seen


@pytest.mark.parametrize("changes, interval, expected", [
    # composable prompt (negative, part 1, part 2 each its own call); NGMS drops the negative at odd steps
    (dict(prompt="a red apple AND a green pear"), 2, "FFF" "sss" "FFF" "sss" "FFF" "sss"),
    (dict(prompt="a red apple AND a green pear", s_min_uncond=100.0), 2, "FFF" "ss" "FFF" "ss" "FFF" "ss"),
    # NGMS on a plain prompt (the conditional rows alone where it skips: at 100 steps 0, 2, 4, at 1.0 step 4): a
    # pass the last full step did not run runs whole, and the other pass's features outlive it
    (dict(s_min_uncond=100.0), 3, "F" "F" "s" "F" "F" "s"),
    (dict(s_min_uncond=1.0), 3, "F" "s" "s" "F" "F" "s"),
])
def test_each_pass_keeps_its_own_features(sources, changes, interval, expected):
    """A cached call reuses the features its own pass (its conditioning) left since the last full step, whatever
    calls a step leaves out; a pass the last full step did not run runs whole and keeps its own."""
    bundle = tiny_bundle("sd1", seed=3)
    request = GenerationRequest(prompt="a red apple", negative_prompt="blurry", steps=6, cfg_scale=5.0, seed=7,
                                width=32, height=32, sampler="Euler", deep_cache=DeepCache(interval, 0))
    sample_latents(bundle, replace(request, **changes))
    assert "".join(sources) == expected


def test_a_call_whose_rows_differ_runs_whole():
    run = DeepCacheRun(DeepCache(interval=3, branch=0), skip_block=0)
    slot = run.slot(0, rows=4)
    slot.feature = torch.zeros(4, 8, 2, 2)
    run.keep(slot)
    assert run.slot(1, rows=4).feature is not None
    assert run.slot(2, rows=2).feature is None       # a pass with the negative prompt skipped: 2 rows, not 4


def _tiny_unet(name: str) -> UNet:
    return tiny_bundle(name, seed=3).unet


@pytest.mark.parametrize("name", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("branch", [0, 1, 3, 4])
@torch.no_grad()
def test_the_shallow_branch_on_its_own_features_is_the_whole_unet(name, branch):
    """A shallow call on the features a whole call left, with that call's inputs, gives the whole call's output:
    the shallow branch recomputes exactly the blocks the cached features do not stand for. ControlNet residuals
    of the blocks it skips (deeper skips, the middle block) are not read."""
    unet = _tiny_unet(name)
    cfg = unet.cfg
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.in_channels, 8, 8, generator=gen)
    t = torch.tensor([500.0, 500.0])
    context = torch.randn(2, 5, cfg.context_dim, generator=gen)
    y = None if cfg.adm_in_channels is None else torch.randn(2, cfg.adm_in_channels, generator=gen)
    skip = DeepCache(interval=2, branch=branch).skip_block(cfg.num_res_blocks, len(cfg.channel_mult))
    full = DeepFeature(skip)
    whole = unet(x, t, context, y, deep_cache=full)
    assert full.feature is not None
    assert torch.equal(unet(x, t, context, y), whole)                          # keeping costs nothing
    shallow = unet(x, t, context, y, deep_cache=DeepFeature(skip, full.feature))
    torch.testing.assert_close(shallow, whole, rtol=0, atol=1e-6)

    residuals = _control_residuals(unet, x, t, context, y)
    deeper = [r if i <= skip else r + 5.0 for i, r in enumerate(residuals[0])], residuals[1] + 5.0
    controlled = DeepFeature(skip)
    unet(x, t, context, y, control=residuals, deep_cache=controlled)
    expected = unet(x, t, context, y, control=residuals, deep_cache=DeepFeature(skip, controlled.feature))
    assert torch.equal(unet(x, t, context, y, control=deeper, deep_cache=DeepFeature(skip, controlled.feature)),
                       expected)
    assert not torch.equal(unet(x, t, context, y, control=deeper), unet(x, t, context, y, control=residuals))


def _control_residuals(unet: UNet, x, t, context, y):
    """Random residuals shaped like each input block's output and the middle block's (what a ControlNet gives)."""
    shapes = []
    hooks = [block.register_forward_hook(lambda _m, _i, out: shapes.append(out.shape)) for block in unet.input_blocks]
    hooks.append(unet.middle_block.register_forward_hook(lambda _m, _i, out: shapes.append(out.shape)))
    unet(x, t, context, y)
    for hook in hooks:
        hook.remove()
    gen = torch.Generator().manual_seed(5)
    tensors = [torch.randn((len(x), *shape[1:]), generator=gen) * 0.1 for shape in shapes]
    return tensors[:-1], tensors[-1]


@pytest.mark.parametrize("setting, message", [
    (DeepCache(interval=0), "interval must be a whole number 1..1000"),
    (DeepCache(interval=2.5), "interval must be a whole number"),
    (DeepCache(interval=True), "interval must be a whole number"),
    (DeepCache(branch=-1), "branch must be a whole number >= 0"),
    (DeepCache(branch=6), "branch 6 (level 2, layer 0) is not in this U-Net: 2 levels of 2 decoder ResBlocks"),
    (DeepCache(branch=2), "branch 2 (level 0, layer 2) is not in this U-Net"),
    ({"interval": 3, "depth": 2}, "deep_cache takes interval, branch, got depth"),
])
def test_bad_settings_are_one_clear_error(sd1, setting, message):
    ours_pipe, _ = sd1
    with pytest.raises(RequestError, match=re.escape(message)):
        _ours(ours_pipe, {}, setting)


# ---------------------------------------------------------------- the command line and the infotext
def test_the_command_line_draws_records_and_redraws_deep_cache(tmp_path, capsys):
    draws = draw_with_and_without(tmp_path, capsys, ["--deepcache-interval", "2", "--deepcache-branch", "1"], steps=5)
    model, fast, cached, plain = draws.model, draws.fast, draws.drawn, draws.plain
    again, python = tmp_path / "again.png", tmp_path / "python.png"
    recorded = parse_parameters(read_parameters(cached))
    assert {label: recorded[label] for label in DEEP_CACHE_LABELS} == {"DeepCache interval": "2",
                                                                       "DeepCache branch": "1"}
    assert not any(key.startswith("DeepCache") for key in parse_parameters(read_parameters(plain)))
    assert np.abs(pixels(cached) - pixels(plain)).max() > 4
    pipe = sdlab.load(model)        # the Python API draws the same picture
    pipe.txt2img("a wall", steps=5, width=32, height=32, seed=3,
                 deep_cache=DeepCache(interval=2, branch=1)).images[0].save(python)
    assert np.array_equal(pixels(python), pixels(cached))
    assert_from_png_redraws(draws, "--no-deepcache", tmp_path, capsys)
    assert run(["txt2img", "--from-png", str(cached), "--deepcache-branch", "0", "--out", str(again), *fast],
               capsys)[0] == 0         # one flag over the picture's: its interval, branch 0
    assert {label: parse_parameters(read_parameters(again))[label] for label in DEEP_CACHE_LABELS} == {
        "DeepCache interval": "2", "DeepCache branch": "0"}
    init = tmp_path / "init.png"
    init_picture(32).save(init)
    for mode, extra in (("img2img", []), ("inpaint", ["--mask", str(init)])):
        out = tmp_path / f"{mode}.png"
        assert run([mode, "a wall", "--init", str(init), *extra, "--deepcache-interval", "3", "--out", str(out),
                    *fast], capsys)[0] == 0
        assert parse_parameters(read_parameters(out))["DeepCache interval"] == "3"


def test_the_infotext_reads_back_into_the_request():
    bundle = tiny_bundle("sd1", seed=3)
    request = GenerationRequest(prompt="a", steps=2, width=SIZE, height=SIZE, deep_cache=DeepCache(4, 3))
    text = format_parameters(to_parameters(make_plan(bundle, request).request))
    assert "DeepCache interval: 4, DeepCache branch: 3" in text
    parsed = from_parameters(parse_parameters(text))
    assert parsed["deep_cache"] == {"interval": 4, "branch": 3}
    assert make_plan(bundle, GenerationRequest(**parsed)).request.deep_cache == DeepCache(4, 3)
    with pytest.raises(ValueError, match="DeepCache values"):
        from_parameters({"DeepCache interval": "three"})


def test_a_branch_alone_is_deep_cache_at_interval_3_at_every_door(tmp_path, capsys):
    """The CLI's --deepcache-branch alone, the native API's {"branch": B} and DeepCache(branch=B): interval 3."""
    model = tmp_path / "tiny-sd1.safetensors"
    write_original(tiny_bundle("sd1", seed=3), model, junk=False)
    out = tmp_path / "x.png"
    assert run(["txt2img", "a wall", "--model", str(model), "--steps", "1", "--width", "32", "--height", "32",
                "--no-progress", "--out", str(out), "--deepcache-branch", "1"], capsys)[0] == 0
    recorded = parse_parameters(read_parameters(out))
    assert {label: recorded[label] for label in DEEP_CACHE_LABELS} == {"DeepCache interval": "3",
                                                                       "DeepCache branch": "1"}
    assert check_deep_cache({"branch": 1}) == DeepCache(3, 1)       # the native API's object, as a request reads it


@pytest.mark.parametrize("flags, message", [
    (["--deepcache-interval", "0"], "DeepCache interval must be a whole number 1..1000"),
    (["--deepcache-interval", "2", "--deepcache-branch", "12"], r"DeepCache branch 12 \(level 4, layer 0\)"),
    (["--deepcache-interval", "x"], "invalid int value"),
])
def test_bad_deep_cache_flags_are_one_line(flags, message, tmp_path, capsys):
    model = tmp_path / "tiny-sd1.safetensors"
    write_original(tiny_bundle("sd1", seed=3), model, junk=False)
    code, out, err = run(["txt2img", "a wall", "--model", str(model), "--steps", "1", "--width", "32", "--height",
                          "32", "--no-progress", "--out", str(tmp_path / "x.png"), *flags], capsys)
    assert code != 0 and re.search(message, err) and "Traceback" not in err, err
    assert not (tmp_path / "x.png").exists()


def test_a_grids_cells_draw_deep_cache_as_txt2img(tmp_path, capsys):
    model = tmp_path / "tiny-sd1.safetensors"
    write_original(tiny_bundle("sd1", seed=3), model, junk=False)
    flags = ["--model", str(model), "--seed", "4", "--width", "32", "--height", "32", "--deepcache-interval", "2",
             "--no-progress"]
    cells = tmp_path / "cells"
    assert run(["grid", "a red house", "--x", "Steps=3,4", "--out", str(tmp_path / "g.png"), "--keep-cells",
                str(cells), *flags], capsys)[0] == 0
    for path in sorted(cells.glob("*.png")):
        assert parse_parameters(read_parameters(path))["DeepCache interval"] == "2"
    assert len(list(cells.glob("*.png"))) == 2


@pytest.mark.parametrize("mode", ["controlnet", "inpaint"])
def test_a_controlnet_or_inpainting_run_reads_the_cache_and_interval_1_changes_nothing(mode, tmp_path, calls):
    """With a ControlNet (its residuals through `ControlledUNet`) and in inpainting the cached steps run shallow, and
    interval 1 draws the plain picture to the bit."""
    bundle = tiny_bundle("sd1", seed=3)
    changes = {
        "controlnet": lambda: dict(controls=(ControlInput(write_layout(
            diffusers_controlnet(bundle.unet_config, seed=3, hint_widths=(16, 32), std=0.05), "original", tmp_path),
            init_picture(SIZE), 0.8),)),
        "inpaint": lambda: dict(init_image=init_picture(SIZE), mask_image=lower_right_mask(SIZE), strength=0.9),
    }[mode]()
    request = GenerationRequest(prompt="a red apple", negative_prompt="blurry", steps=4, cfg_scale=5.0, seed=7,
                                width=SIZE, height=SIZE, sampler="Euler", **changes)
    plain = np.asarray(generate(bundle, make_plan(bundle, request)).images[0])
    calls.clear()
    cached = np.asarray(generate(bundle, make_plan(bundle, replace(request, deep_cache=DeepCache(2)))).images[0])
    assert "s" in calls and np.abs(cached.astype(int) - plain).max() > 0
    same = generate(bundle, make_plan(bundle, replace(request, deep_cache=DeepCache(1)))).images[0]
    assert np.array_equal(np.asarray(same), plain)
