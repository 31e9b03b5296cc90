"""End-to-end ControlNet parity: sdlab's generate loop with `controls=` gives the pictures of diffusers'
StableDiffusionControlNetPipeline (one ControlNet, and MultiControlNet with per-net strength and start / end),
its img2img variant, and the SDXL ControlNet pipeline, on the same random weights, seed and settings (within
2/255 per pixel). The ControlNet files are written in the original layout and in diffusers' own layout; each
side loads its own. Also: the CLI's --control option, the infotext lines, and bad input.

The reduced bundles have a factor-2 VAE, so their ControlNets map hints down 2x (hint widths (16, 32)).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetModel,
    EulerDiscreteScheduler,
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image, ImageDraw

import sdlab
from bundle_fixtures import as_released, tiny_bundle, write_diffusers_folder
from controlnet_fixtures import diffusers_controlnet, write_layout
from picture_parity import CFG, MAX_PIXEL_DIFF, PROMPT, SEED, SIZE, STEPS, max_pixel_diff
from sdlab.pipeline.control import ControlInput
from sdlab.pipeline.request import GenerationRequest

NEGATIVE = "blurry"

pytestmark = pytest.mark.usefixtures("one_thread")


def _released(folder):
    return as_released(folder, SIZE // 2)


def _hint(seed: int) -> Image.Image:
    image = Image.new("RGB", (48, 40), "black")          # another size: both sides resize it to SIZE
    draw = ImageDraw.Draw(image)
    draw.rectangle([5 + seed * 7, 4, 30, 30], outline="white", width=3)
    draw.ellipse([20, 10 + seed * 3, 44, 36], fill=(200, 60 * seed, 90))
    return image


def _controlnet_files(tmp_path, unet_config, count, layout, pooled=False):
    """`count` ControlNets with random weights: (diffusers model, the file sdlab reads)."""
    nets = []
    for k in range(count):
        folder = tmp_path / f"cn{k}"
        folder.mkdir(parents=True)
        model = diffusers_controlnet(unet_config, seed=20 + k, hint_widths=(16, 32), std=0.05, pooled=pooled)
        nets.append((model, write_layout(model, layout, folder)))
    return nets


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    bundle = tiny_bundle("sd1", seed=11)
    folder = _released(write_diffusers_folder(bundle, tmp_path_factory.mktemp("sd1") / "pipe"))
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    return sdlab.load(folder), pipe, bundle.unet_config


def _max_diff(ours, reference, against=None) -> int:
    if against is not None:   # the ControlNet changes the picture well beyond the tolerance: not vacuous
        assert max_pixel_diff(against, reference) > 5 * MAX_PIXEL_DIFF
    return max_pixel_diff(ours, reference)


def _euler(pipe):
    return EulerDiscreteScheduler.from_config(pipe.scheduler.config)


EULER = dict(sampler="Euler", schedule="leading", init_noise="vp")


def _generators(batch):
    return [torch.Generator().manual_seed(SEED + i) for i in range(batch)]


@pytest.mark.parametrize("layout", ["original", "folder"])
def test_single_controlnet_txt2img(sd1, tmp_path, layout):
    ours, base, unet_config = sd1
    [(net, path)] = _controlnet_files(tmp_path, unet_config, 1, layout)
    pipe = StableDiffusionControlNetPipeline(**base.components, controlnet=net)
    pipe.scheduler = _euler(base)
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(PROMPT, _hint(0), negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=CFG,
                     width=SIZE, height=SIZE, controlnet_conditioning_scale=0.8, num_images_per_prompt=2,
                     generator=_generators(2), output_type="np").images
    plain = ours.txt2img(PROMPT, NEGATIVE, steps=STEPS, cfg_scale=CFG, seed=SEED, width=SIZE, height=SIZE,
                         batch_size=2, **EULER)
    result = ours.txt2img(PROMPT, NEGATIVE, steps=STEPS, cfg_scale=CFG, seed=SEED, width=SIZE, height=SIZE,
                          batch_size=2, controls=[ControlInput(path, _hint(0), 0.8)], **EULER)
    assert _max_diff(result.images, reference, against=plain.images) <= MAX_PIXEL_DIFF


@pytest.mark.parametrize("batch", [1, 2])
def test_pooling_controlnet_conditions_the_prompt_rows_only(sd1, tmp_path, batch):
    """A shuffle-like ControlNet (`global_pool_conditions`): diffusers forces guess mode for it, so its residuals
    reach the conditional half of CFG only (A1111: multiplied by `cond_mark`)."""
    ours, base, unet_config = sd1
    [(net, path)] = _controlnet_files(tmp_path, unet_config, 1, "folder", pooled=True)
    pipe = StableDiffusionControlNetPipeline(**base.components, controlnet=net)
    pipe.scheduler = _euler(base)
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(PROMPT, _hint(0), negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=CFG,
                     width=SIZE, height=SIZE, num_images_per_prompt=batch, generator=_generators(batch),
                     output_type="np").images
    plain = ours.txt2img(PROMPT, NEGATIVE, steps=STEPS, cfg_scale=CFG, seed=SEED, width=SIZE, height=SIZE,
                         batch_size=batch, **EULER)
    result = ours.txt2img(PROMPT, NEGATIVE, steps=STEPS, cfg_scale=CFG, seed=SEED, width=SIZE, height=SIZE,
                          batch_size=batch, controls=[ControlInput(path, _hint(0))], **EULER)
    assert _max_diff(result.images, reference, against=plain.images) <= MAX_PIXEL_DIFF


def test_a_canny_control_is_softly_injected_in_the_hires_pass_only(sd1, tmp_path, monkeypatch):
    """A1111's hook.py forces soft injection for a canny unit in the hires fix's second pass (is_in_high_res_fix:
    high_res_fix_forced_soft_injection); other preprocessors, and the first pass, keep their mode."""
    from sdlab.pipeline.control import PreparedControl

    ours, _, unet_config = sd1
    [(_, path)] = _controlnet_files(tmp_path, unet_config, 1, "original")
    seen, scales = [], PreparedControl.scales
    monkeypatch.setattr(PreparedControl, "scales",
                        lambda self, count: seen.append((self.hint.shape[-1], self.soft)) or scales(self, count))
    for module, soft in (("canny", True), ("none", False)):
        seen.clear()
        ours.txt2img(PROMPT, NEGATIVE, steps=2, cfg_scale=CFG, seed=SEED, width=SIZE, height=SIZE, hr_scale=2,
                     hr_denoise=0.5, controls=[ControlInput(path, _hint(0), module=module)], **EULER)
        assert sorted(set(seen)) == [(SIZE, False), (2 * SIZE, soft)]


def test_only_part_schedule_controls_read_each_calls_step(sd1, tmp_path, monkeypatch):
    """A control over the whole schedule (start 0, end 1) runs at every call without asking which step it
    is (that reads the call's sigma: a wait for the queue on a GPU); one limited to part of it asks."""
    from sdlab.pipeline import control

    ours, _, unet_config = sd1
    [(_, path)] = _controlnet_files(tmp_path, unet_config, 1, "original")
    asked, step_of = [], control.step_of
    monkeypatch.setattr(control, "step_of", lambda *args: asked.append(args) or step_of(*args))
    for start, calls in ((0.0, 0), (0.3, STEPS)):
        asked.clear()
        ours.txt2img(PROMPT, NEGATIVE, steps=STEPS, cfg_scale=CFG, seed=SEED, width=SIZE, height=SIZE,
                     controls=[ControlInput(path, _hint(0), 0.8, start, 1.0)], **EULER)
        assert len(asked) == calls


def test_hint_features_are_made_once_per_generation(sd1, tmp_path, monkeypatch):
    """The hint block's output depends on the hint and its weights only: made at the first step, reused."""
    from sdlab.models.controlnet import ControlNet

    ours, _, unet_config = sd1
    [(_, path)] = _controlnet_files(tmp_path, unet_config, 1, "original")
    made, real = [], ControlNet._hint_features
    monkeypatch.setattr(ControlNet, "_hint_features", lambda self, *a: made.append(1) or real(self, *a))
    for _ in range(2):   # one generation each
        ours.txt2img(PROMPT, NEGATIVE, steps=STEPS, cfg_scale=CFG, seed=SEED, width=SIZE, height=SIZE,
                     controls=[ControlInput(path, _hint(0), 0.8)], **EULER)
    assert len(made) == 2


def test_multicontrolnet_with_start_end(sd1, tmp_path):
    ours, base, unet_config = sd1
    nets = _controlnet_files(tmp_path, unet_config, 2, "diffusers-file")
    pipe = StableDiffusionControlNetPipeline(**base.components, controlnet=[n for n, _ in nets])
    pipe.scheduler = _euler(base)
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(PROMPT, [_hint(0), _hint(1)], negative_prompt=NEGATIVE, num_inference_steps=STEPS,
                     guidance_scale=CFG, width=SIZE, height=SIZE, controlnet_conditioning_scale=[1.0, 0.6],
                     control_guidance_start=[0.0, 0.2], control_guidance_end=[0.6, 1.0],
                     generator=_generators(1), output_type="np").images
    controls = [ControlInput(nets[0][1], _hint(0), 1.0, 0.0, 0.6), (str(nets[1][1]), _hint(1), 0.6, 0.2, 1.0)]
    result = ours.txt2img(PROMPT, NEGATIVE, steps=STEPS, cfg_scale=CFG, seed=SEED, width=SIZE, height=SIZE,
                          controls=controls, **EULER)
    only_first = ours.txt2img(PROMPT, NEGATIVE, steps=STEPS, cfg_scale=CFG, seed=SEED, width=SIZE, height=SIZE,
                              controls=controls[:1], **EULER)
    assert _max_diff(result.images, reference, against=only_first.images) <= MAX_PIXEL_DIFF


def test_controlnet_img2img(sd1, tmp_path):
    ours, base, unet_config = sd1
    [(net, path)] = _controlnet_files(tmp_path, unet_config, 1, "original")
    pipe = StableDiffusionControlNetImg2ImgPipeline(**base.components, controlnet=net)
    pipe.scheduler = _euler(base)
    pipe.set_progress_bar_config(disable=True)
    init = _hint(1).resize((SIZE, SIZE)).convert("RGB")
    reference = pipe(PROMPT, init, _hint(0), negative_prompt=NEGATIVE, strength=0.7, num_inference_steps=8,
                     guidance_scale=CFG, width=SIZE, height=SIZE, control_guidance_start=0.3,
                     controlnet_conditioning_scale=1.0,    # this pipeline's default is 0.8
                     generator=_generators(1), output_type="np").images
    result = ours.img2img(PROMPT, init, 0.7, NEGATIVE, steps=8, cfg_scale=CFG, seed=SEED, width=SIZE, height=SIZE,
                          controls=[ControlInput(path, _hint(0), 1.0, 0.3, 1.0)], sampler="Euler", schedule="leading")
    assert _max_diff(result.images, reference) <= MAX_PIXEL_DIFF


def test_inpaint_units_read_the_runs_mask_blurred_along_each_axis(sd1, tmp_path, monkeypatch):
    """An inpainting run gives its inpaint units the mask the extension's prepare_mask makes of it: blurred by
    mask_blur along x and mask_blur_y along y (`inpaint_mask`), not mask_blur both ways."""
    from sdlab.pipeline import generate
    from sdlab.pipeline.control import inpaint_mask
    from sdlab.pipeline.plan import make_plan

    ours, _, unet_config = sd1
    [(_, path)] = _controlnet_files(tmp_path, unet_config, 1, "original")
    picture, mask = _hint(1), Image.new("L", (48, 40), 0)
    mask.paste(255, (16, 10, 32, 20))
    seen = []

    def recording_masks(*args, **kwargs):
        seen.append(kwargs["mask"])
        raise KeyboardInterrupt                                         # the mask is all this test needs

    monkeypatch.setattr(generate, "prepare_controls", recording_masks)
    request = GenerationRequest(PROMPT, init_image=picture, mask_image=mask, width=SIZE, height=SIZE, steps=2,
                                seed=SEED, sampler="Euler", mask_blur=0, mask_blur_y=8,
                                controls=(ControlInput(path, picture, module="inpaint"),))
    with pytest.raises(KeyboardInterrupt):
        ours.run(make_plan(ours.bundle, request))
    assert np.array_equal(np.asarray(seen[0]), np.asarray(inpaint_mask(mask, blur=0, blur_y=8)))
    assert int((np.asarray(seen[0]) > 127).sum()) == 0                  # the extension's: nothing left above 127


@pytest.mark.parametrize("resize_mode", ["resize", "crop", "fill"])
def test_only_masked_inpainting_hints_with_the_drawn_region(sd1, tmp_path, monkeypatch, resize_mode):
    """Inpaint area "Only masked" draws a region of the picture at width x height; A1111's ControlNet extension
    cuts the control image to that region (`try_crop_image_with_a1111_mask`): a control image that is the init
    picture itself gives a hint that is the drawn crop, whatever the control's resize mode."""
    from sdlab.pipeline import generate
    from sdlab.pipeline.plan import make_plan

    ours, _, unet_config = sd1
    [(_, path)] = _controlnet_files(tmp_path, unet_config, 1, "original")
    picture = _hint(1)                                                          # 48 x 40
    mask = Image.new("L", picture.size, 0)
    mask.paste(255, (28, 6, 40, 14))
    hints, prepare = [], generate.prepare_controls

    def recording_hints(*args, **kwargs):
        prepared = prepare(*args, **kwargs)
        hints.extend(control.hint for control in prepared)
        return prepared

    monkeypatch.setattr(generate, "prepare_controls", recording_hints)
    request = GenerationRequest(PROMPT, init_image=picture, mask_image=mask, width=SIZE, height=SIZE, steps=2,
                                seed=SEED, sampler="Euler", inpaint_only_masked=True, inpaint_padding=4,
                                inpaint_fill="original", controls=(ControlInput(path, picture, 0.8,
                                                                                resize_mode=resize_mode),))
    plan = make_plan(ours.bundle, request)
    assert plan.picture.overlay.region != (0, 0, *picture.size)
    ours.run(plan)
    crop = torch.from_numpy(np.asarray(plan.picture.image, dtype=np.float32) / 255).permute(2, 0, 1)   # (3, H, W)
    torch.testing.assert_close(hints[0][0], crop, atol=1e-6, rtol=0)


def test_sdxl_controlnet(tmp_path):
    bundle = tiny_bundle("sdxl", seed=11)
    folder = _released(write_diffusers_folder(bundle, tmp_path / "pipe"))
    base = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    [(net, path)] = _controlnet_files(tmp_path, bundle.unet_config, 1, "original")
    pipe = StableDiffusionXLControlNetPipeline(**base.components, controlnet=net)
    pipe.scheduler = _euler(base)
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(PROMPT, image=_hint(0), negative_prompt=NEGATIVE, num_inference_steps=STEPS,
                     guidance_scale=CFG, width=SIZE, height=SIZE, generator=_generators(1), output_type="np").images
    ours = sdlab.load(folder)
    result = ours.txt2img(PROMPT, NEGATIVE, steps=STEPS, cfg_scale=CFG, seed=SEED, width=SIZE, height=SIZE,
                          controls=[ControlInput(path, _hint(0))], **EULER)
    assert _max_diff(result.images, reference) <= MAX_PIXEL_DIFF


def test_request_parameters_leave_controls_out(tmp_path):
    request = GenerationRequest(PROMPT, controls=(("a.safetensors", _hint(0)),))
    assert "controls" not in request.parameters()
    assert "controls" not in repr(request)
