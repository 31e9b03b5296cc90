"""The server's work limit counts a ControlNet's forwards: a copy of the U-Net's encoder half and middle block run
beside the U-Net over the same rows on the steps its start / end window takes, at its share of a U-Net row's work
(`pipeline.control_work.controlnet_share`, counted in FLOPs from the configs and checked here against
torch.utils.flop_counter's count of sdlab's own networks and of diffusers' ControlNetModel and UNet2DConditionModel
on the meta device)."""

from __future__ import annotations

import math
from dataclasses import replace

import httpx
import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from sdlab.checkpoints.diffusers_unet import unet_config_to_diffusers
from sdlab.models.controlnet import ControlNet, ControlNetConfig
from sdlab.models.unet import UNet
from sdlab.pipeline.control import ControlInput
from sdlab.pipeline import control_work
from sdlab.pipeline.control_work import controlnet_share
from sdlab.pipeline.request import GenerationRequest
from sdlab.server.config import Limits
from sdlab.server.inputs import BadRequest, check_request, unet_work
from controlnet_fixtures import ENCODERS, controlnet_config, diffusers_controlnet, write_layout
from server_fixtures import b64_png, start_server

SMALL_SDXL = replace(ENCODERS["sdxl"], transformer_depth=(0, 1, 1), transformer_depth_middle=1)   # a "small" one


def _diffusers_share(unet_cfg, net_cfg, height: int, width: int) -> float:
    """FLOPs of diffusers' ControlNetModel for `net_cfg` without its hint embedding, over those of its
    UNet2DConditionModel for `unet_cfg`, one row over a height x width latent, on the meta device."""
    with torch.device("meta"), torch.no_grad():
        unet = UNet2DConditionModel(**unet_config_to_diffusers(unet_cfg))
        net = ControlNetModel(**controlnet_config(net_cfg))
        x, t = torch.zeros(1, unet_cfg.in_channels, height, width), torch.zeros(1)
        context = torch.zeros(1, 77, unet_cfg.context_dim)
        hint = torch.zeros(1, 3, height * 8, width * 8)
        added = {} if unet_cfg.adm_in_channels is None else {"added_cond_kwargs": {
            "text_embeds": torch.zeros(1, unet_cfg.adm_in_channels - 6 * 256), "time_ids": torch.zeros(1, 6)}}
        counts = []
        for run in (lambda: unet(x, t, context, **added), lambda: net(x, t, context, hint, **added),
                    lambda: net.controlnet_cond_embedding(hint)):
            with FlopCounterMode(display=False) as counted:
                run()
            counts.append(counted.get_total_flops())
    return (counts[1] - counts[2]) / counts[0]


@pytest.mark.parametrize("unet_cfg, net_cfg", [(ENCODERS["sd1"], ENCODERS["sd1"]), (ENCODERS["sd2"], ENCODERS["sd2"]),
                                               (ENCODERS["sdxl"], ENCODERS["sdxl"]), (ENCODERS["sdxl"], SMALL_SDXL)],
                         ids=["sd1", "sd2", "sdxl", "sdxl-small-controlnet"])
@pytest.mark.parametrize("height, width", [(8, 8), (16, 12), (9, 7), (40, 24), (13, 5)])
def test_the_controlnet_share_is_diffusers_flop_ratio(unet_cfg, net_cfg, height, width) -> None:
    """The share of a U-Net row equals diffusers' ratio of the two forwards' FLOPs (hint embedding left out: it runs
    once a generation), to 1e-12, at latents other than the reference ones the networks were counted at (16 and 32
    a side), odd ones included: the constant, linear and squared parts scaled to each level's positions are the
    count at that size. It moves with the size (attention)."""
    share = controlnet_share(unet_cfg, ControlNetConfig(unet=net_cfg), height, width)
    assert 0.2 < share < 0.6
    assert share == pytest.approx(_diffusers_share(unet_cfg, net_cfg, height, width), rel=1e-12)


def _counted(config, height: int, width: int) -> int:
    """torch.utils.flop_counter's FLOPs of one row's forward of sdlab's own U-Net or ControlNet of `config` (its hint
    block's left out, counted apart as the diffusers reference above does) over a height x width latent, built and
    run on the meta device: the count the work limit took before it counted from the config."""
    unet = config.unet if isinstance(config, ControlNetConfig) else config
    with torch.device("meta"), torch.no_grad():
        net = ControlNet(config) if isinstance(config, ControlNetConfig) else UNet(config)
        x, t = torch.zeros(1, unet.in_channels, height, width), torch.zeros(1)
        context = torch.zeros(1, 77, unet.context_dim)
        y = None if unet.adm_in_channels is None else torch.zeros(1, unet.adm_in_channels)
        if isinstance(config, ControlNetConfig):
            hint = torch.zeros(1, config.hint_channels, height * config.hint_factor, width * config.hint_factor)
            runs = (lambda: net(x, t, context, hint, y), lambda: net.input_hint_block(hint))
        else:
            runs = (lambda: net(x, t, context, y),)
        counts = []
        for run in runs:
            with FlopCounterMode(display=False) as counted:
                run()
            counts.append(counted.get_total_flops())
    return counts[0] - sum(counts[1:])


VARIANTS = {
    "sd1": ENCODERS["sd1"], "sd2": ENCODERS["sd2"], "sdxl": ENCODERS["sdxl"], "sdxl-small": SMALL_SDXL,
    "sd1-inpaint": replace(ENCODERS["sd1"], in_channels=9, out_channels=4),
    "sdxl-refiner-like": replace(ENCODERS["sdxl"], channel_mult=(1, 2, 2, 1), transformer_depth=(0, 1, 2, 0),
                                 adm_in_channels=2560),
    "ssd-1b-like": replace(ENCODERS["sdxl"], input_depths=(0, 0, 1, 2, 2, 3), output_depths=(3, 1, 2, 1, 0, 2, 0, 0, 0),
                           transformer_depth_middle=0, middle_transformer=False),
    "empty-transformer": replace(ENCODERS["sdxl"], empty_transformer_levels=(0,)),
    "lcm": replace(ENCODERS["sd1"], time_cond_proj_dim=32, num_res_blocks=1),
}


@pytest.mark.parametrize("config", VARIANTS.values(), ids=VARIANTS.keys())
def test_the_profile_from_the_config_is_the_flop_counters_count(config) -> None:
    """`flop_profile` counts each network from its config alone; at any latent (odd sizes included) its sum is,
    exactly, flop_counter's count of sdlab's U-Net and ControlNet (hint block left out) built and run on the meta
    device, for the SD 1.x / 2.x / XL shapes and those that change the block layout (an inpainting input, a
    refiner's four levels, SSD-1B's per-block depths and middle without transformer, a transformer without
    blocks, an LCM guidance embedding, one ResBlock a level)."""
    for net in (config, ControlNetConfig(unet=config)):
        profile = control_work.flop_profile(net)
        for height, width in ((9, 7), (13, 5)):
            assert profile.at(height, width) == _counted(net, height, width), (net, height, width)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_the_full_size_profiles_are_the_flop_counters_count(family) -> None:
    """The same at the families' own sizes: 64 x 64 (SD 1.x 512 px), 96 x 96, 128 x 128 and 75 x 57."""
    from sdlab.families import sd1, sd2, sdxl
    config = {"sd1": sd1.SD1_UNET, "sd2": sd2.SD2_UNET, "sdxl": sdxl.SDXL_UNET}[family]
    for net in (config, ControlNetConfig(unet=config)):
        for height, width in ((64, 64), (96, 96), (128, 128), (75, 57)):
            assert control_work.flop_profile(net).at(height, width) == _counted(net, height, width)


@pytest.fixture(scope="module")
def net_file(tmp_path_factory) -> str:
    """A reduced SD1 ControlNet file (diffusers names)."""
    folder = tmp_path_factory.mktemp("controlnet-work")
    return str(write_layout(diffusers_controlnet(ENCODERS["sd1"], 1), "diffusers-file", folder))


LIMITS = Limits(max_pixels=64 * 64, max_steps=4, max_batch=1, max_images=1)     # 2 x 2 x 4 x 4096
AT_LIMIT = {"prompt": "a AND b AND c", "seed": 1, "width": 64, "height": 64, "steps": 4, "cfg_scale": 5.0,
            "sampler": "Euler"}             # 4 rows: 3 parts and the negative


def _request(net_file: str, start: float = 0.0, end: float = 1.0, **fields) -> GenerationRequest:
    hint = Image.new("RGB", (64, 64))
    return GenerationRequest(**{**AT_LIMIT, **fields}, controls=(ControlInput(net_file, hint, 1.0, start, end),))


def test_a_controlnet_adds_its_share_on_the_steps_of_its_window(net_file) -> None:
    """4 rows x 4 steps x 4096 px is the largest one-part request's work; with a ControlNet beside every row, its
    share more on each step it runs (its window's steps: 2 of 4 for end 0.5 by diffusers' rule, 3 of 4 for end 0.25
    by A1111's, none for start 0.9), in each pass at that pass's size."""
    share = controlnet_share(ENCODERS["sd1"], ControlNetConfig(unet=ENCODERS["sd1"]), 8, 8)
    plain = GenerationRequest(**AT_LIMIT)
    assert unet_work(plain, 8, None) == 4 * 4 * 4096
    for end, convention, active in ((1.0, "diffusers", 4), (0.5, "diffusers", 2), (0.25, "a1111", 3)):
        request = _request(net_file, end=end, control_convention=convention)
        assert unet_work(request, 8, None) == pytest.approx(4 * 4096 * (4 + share * active), rel=1e-12)
    assert unet_work(_request(net_file, start=0.9), 8, None) == 4 * 4 * 4096
    hires = _request(net_file, hr_scale=2.0, hr_steps=2, width=32, height=32)      # 32 px, then 64 px
    at_32 = controlnet_share(ENCODERS["sd1"], ControlNetConfig(unet=ENCODERS["sd1"]), 4, 4)
    assert unet_work(hires, 8, None) == pytest.approx(4 * 1024 * (4 + at_32 * 4) + 4 * 4096 * (2 + share * 2),
                                                      rel=1e-12)


def test_the_work_limit_refuses_a_controlnet_past_it_and_names_it(net_file) -> None:
    """At the limit without a ControlNet the request is taken; with one it is past it (a 422 that names the
    ControlNet, its steps and its share, in one line), unless its window takes no step."""
    check_request(GenerationRequest(**AT_LIMIT), LIMITS)
    check_request(_request(net_file, start=0.9), LIMITS)
    with pytest.raises(BadRequest) as refused:
        check_request(_request(net_file, end=0.5), LIMITS)
    message = str(refused.value)
    assert refused.value.status == 422 and "\n" not in message
    assert "U-Net work (4 U-Net rows a step" in message and "is 1.2 times" in message, message
    assert "ControlNet 1 on 2 of 4 steps at 0.36 of a U-Net row" in message, message
    assert "start / end window" in message


@pytest.fixture(scope="module")
def limited_server(tmp_path_factory):
    """A server at LIMITS with the reduced SD1 ControlNet built for the shipped model's U-Net in its folder."""
    import sdlab

    root = tmp_path_factory.mktemp("controlnet-work-server")
    (root / "models" / "ControlNet").mkdir(parents=True)
    bundle = sdlab.load().bundle
    widths = (16, 32, 96, 256)[: bundle.vae_config.downsample_factor.bit_length()]
    net = write_layout(diffusers_controlnet(bundle.unet_config, 3, hint_widths=widths, std=0.05),
                       "diffusers-file", root / "models" / "ControlNet")
    net.rename(root / "models" / "ControlNet" / "tiny_canny.safetensors")
    server = start_server(root / "outputs", "--models-dir", str(root / "models"), "--max-pixels", "4096",
                          "--max-steps", "4", "--max-batch", "1", "--max-images", "1")
    yield server
    server.stop()


def test_both_routes_refuse_a_controlnet_past_the_work_limit(limited_server) -> None:
    """The native job route and A1111's txt2img take the request at the limit and refuse it with a ControlNet unit
    running on all its steps (422, the ControlNet named); nothing is queued."""
    hint = b64_png(Image.new("RGB", (64, 64)))
    body = dict(AT_LIMIT)
    with httpx.Client(base_url=limited_server.url, timeout=300) as client:
        jobs = len(client.get("/api/jobs", params={"limit": 1000}).json()["jobs"])
        native = client.post("/api/jobs", json={**body, "controls": [{"model": "tiny_canny", "image": hint}]})
        without_sampler = {k: v for k, v in AT_LIMIT.items() if k != "sampler"}
        unit = {"enabled": True, "model": "tiny_canny", "input_image": hint, "module": "none"}
        a1111 = client.post("/sdapi/v1/txt2img", json={**without_sampler, "sampler_name": "Euler",
                                                        "alwayson_scripts": {"controlnet": {"args": [unit]}}})
        for answer in (native, a1111):
            assert answer.status_code == 422, answer.text
            assert "U-Net work" in answer.text and "ControlNet 1 on 4 of 4 steps" in answer.text, answer.text
        assert len(client.get("/api/jobs", params={"limit": 1000}).json()["jobs"]) == jobs
        taken = client.post("/api/jobs", json={**body, "controls": [{"model": "tiny_canny", "image": hint,
                                                                      "start": 0.9}]})
        assert taken.status_code < 300, taken.text


@pytest.mark.parametrize("convention", ["diffusers", "a1111", "a1111_steps"])
@pytest.mark.parametrize("sampler, schedule, steps, switch_at", [("Euler", "normal", 10, 0.8),
                                                                 ("DPM++ 2M", "karras", 7, 0.5),
                                                                 ("Heun", "exponential", 5, 0.3)])
def test_the_base_steps_are_the_plans_split(convention, sampler, schedule, steps, switch_at) -> None:
    """The steps the work limit counts the ControlNets on before a refiner takes over are the plan's own split, on
    the loaded SDXL model (`model`) and, before it loads, on SDXL's schedule (the tiny SDXL's is SDXL's)."""
    from bundle_fixtures import tiny_bundle
    from sdlab.pipeline.plan import make_plan
    from sdlab.server.inputs import RefinerChoice, base_steps

    bundle = tiny_bundle("sdxl")
    request = GenerationRequest(prompt="x", seed=1, width=64, height=64, steps=steps, sampler=sampler,
                                schedule=schedule)
    plan = make_plan(bundle, request, refiner=bundle, switch_at=switch_at, refiner_convention=convention)
    choice = RefinerChoice("refiner", switch_at, convention)
    assert base_steps(plan.request, bundle, choice) == plan.refiner_split
    assert base_steps(plan.request, None, choice) == plan.refiner_split
    assert base_steps(plan.request, bundle, None) is None


def test_a_refiners_steps_run_no_controlnet_in_the_work_limit(net_file) -> None:
    """The pipeline runs the ControlNets on the base's steps only (`generate`'s refiner run drops them for the
    refiner): 4 rows x 3 steps with a ControlNet on all 3 is past the 4 x 4 steps limit (3 + 0.36 x 3 > 4), and with a
    refiner taking over after 2 steps (A1111's switch by sampling steps at 0.5: the first step whose 2 of 3 calls
    reach it) it fits (3 + 0.36 x 2 < 4) and is taken; the refusal's terms add up to its ratio."""
    from sdlab.pipeline.request import resolve
    from sdlab.server.inputs import RefinerChoice, base_steps

    request = _request(net_file, steps=3)
    refiner = RefinerChoice("refiner", 0.5, "a1111_steps")
    resolved = resolve(request, default_size=64, default_sampler="Euler", default_schedule="normal", factor=8)
    assert base_steps(resolved, None, refiner) == 2
    share = controlnet_share(ENCODERS["sd1"], ControlNetConfig(unet=ENCODERS["sd1"]), 8, 8)
    with pytest.raises(BadRequest) as refused:
        check_request(request, LIMITS)
    assert "4 x (3 + 0.36 x 3) x 1 x 4096 px" in str(refused.value), str(refused.value)
    check_request(request, LIMITS, refiner=refiner)
    assert unet_work(resolved, 8, None, refiner=refiner) == pytest.approx(4 * 4096 * (3 + share * 2), rel=1e-12)


def test_a_hires_refusal_names_each_passs_term(net_file) -> None:
    """With the hires fix the refusal names the ControlNet's steps and share in each pass and each pass's term,
    rows x (steps + share x ControlNet steps) x pictures x pixels, which add up to the ratio it gives."""
    request = _request(net_file, hr_scale=2.0, hr_steps=3, width=32, height=32, steps=4)   # 32 px, then 64 px
    with pytest.raises(BadRequest) as refused:
        check_request(request, LIMITS)
    message = str(refused.value)
    at_32 = controlnet_share(ENCODERS["sd1"], ControlNetConfig(unet=ENCODERS["sd1"]), 4, 4)
    at_64 = controlnet_share(ENCODERS["sd1"], ControlNetConfig(unet=ENCODERS["sd1"]), 8, 8)
    assert (f"ControlNet 1 on 4 of 4 steps at {at_32:.2f} of a U-Net row in the first pass, "
            f"ControlNet 1 on 3 of 3 steps at {at_64:.2f} of a U-Net row in the hires pass") in message, message
    terms = (f"first pass 4 x (4 + {at_32:.2f} x 4) x 1 x 1024 px + hires pass 4 x (3 + {at_64:.2f} x 3) x 1 x "
             "4096 px")
    assert terms in message, message
    work = 4 * 1024 * (4 + at_32 * 4) + 4 * 4096 * (3 + at_64 * 3)
    assert f"is {math.ceil(work / (2 * 2 * 4 * 4096) * 10) / 10:.1f} times" in message, message


@pytest.fixture(scope="module")
def refiner_server(tmp_path_factory):
    """A server at LIMITS with a tiny SDXL base and refiner and a reduced ControlNet for the base's U-Net."""
    from bundle_fixtures import tiny_bundle, write_original

    root = tmp_path_factory.mktemp("controlnet-work-refiner")
    models = root / "models"
    (models / "ControlNet").mkdir(parents=True)
    base = tiny_bundle("sdxl")
    write_original(base, models / "base.safetensors", junk=False)
    write_original(tiny_bundle("sdxl-refiner", seed=5), models / "refiner.safetensors", junk=False)
    widths = (16, 32, 96, 256)[: base.vae_config.downsample_factor.bit_length()]
    net = write_layout(diffusers_controlnet(base.unet_config, 3, hint_widths=widths, std=0.05), "diffusers-file",
                       models / "ControlNet")
    net.rename(models / "ControlNet" / "tiny_xl_canny.safetensors")
    server = start_server(root / "outputs", "--models-dir", str(models), "--model", str(models / "base.safetensors"),
                          "--max-pixels", "4096", "--max-steps", "4", "--max-batch", "1", "--max-images", "1")
    yield server
    server.stop()


def test_a_base_refiner_and_controlnet_job_that_fits_is_taken(refiner_server) -> None:
    """4 rows x 3 steps at 64 px with a ControlNet on every step is past the 4 x 4 steps limit (a 422 on the native
    route); with a refiner taking over after 2 of the 3 steps (A1111's switch by sampling steps at 0.5) the
    ControlNet runs on 2 steps only, as the pipeline runs it, so the same job fits and is queued."""
    hint = b64_png(Image.new("RGB", (64, 64)))
    body = {**AT_LIMIT, "steps": 3, "controls": [{"model": "tiny_xl_canny", "image": hint}]}
    handoff = {"refiner": "refiner", "refiner_switch": 0.5, "refiner_convention": "a1111_steps"}
    with httpx.Client(base_url=refiner_server.url, timeout=300) as client:
        alone = client.post("/api/jobs", json=body)
        assert alone.status_code == 422 and "ControlNet 1 on 3 of 3 steps" in alone.text, alone.text
        refined = client.post("/api/jobs", json={**body, **handoff})
        assert refined.status_code < 300, refined.text
        past = client.post("/api/jobs", json={**body, **handoff, "refiner_switch": 0.9})  # the base's 3 steps
        assert past.status_code == 422 and "before the refiner takes over" in past.text, past.text
