"""InstructPix2Pix edit models (8-channel U-Nets: the noisy latent and the latent of the picture edited).

Loading: single files (A1111 reads an 8-channel conv_in as `instruct-pix2pix.yaml`) and diffusers folders (U-Net
in_channels 8) of SD1 and SDXL are the `sd1-edit` / `sdxl-edit` families. Drawing: diffusers'
`StableDiffusion(XL)InstructPix2PixPipeline` with the same random weights, scheduler and seeds gives the same
pictures (uint8, within `MAX_PIXEL_DIFF` = 2 / 255); the guidance is A1111's `combine_denoised_for_edit_model`
(transcribed below), with the batch it builds.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from bundle_fixtures import (as_released, full_size_shapes, init_picture, tiny_bundle, write_diffusers_folder,
                             write_original)
from diffusers import (
    DDIMScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionInstructPix2PixPipeline,
    StableDiffusionXLInstructPix2PixPipeline,
)
from picture_parity import MAX_PIXEL_DIFF, PROMPT, SEED, SIZE, STEPS, max_pixel_diff

import sdlab
from sdlab.checkpoints.detect import detect_family
from sdlab.checkpoints.errors import CheckpointError
from sdlab.diffusion.guidance import edit_cfg
from sdlab.pipeline.request import RequestError

NEGATIVE = "blurry, low quality"
INSTRUCTION = "make it winter"
BATCH = 2
CFG, IMAGE_CFG = 7.5, 1.5                           # diffusers' defaults

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _folder(tmp_path_factory, name: str) -> Path:
    bundle = tiny_bundle(name, seed=5)
    return as_released(write_diffusers_folder(bundle, tmp_path_factory.mktemp(name) / "pipe"), SIZE // 2)


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd1_edit(tmp_path_factory):
    folder = _folder(tmp_path_factory, "sd1-edit")
    return sdlab.load(folder), _quiet(StableDiffusionInstructPix2PixPipeline.from_pretrained(folder, local_files_only=True))


@pytest.fixture(scope="module")
def sdxl_edit(tmp_path_factory):
    folder = _folder(tmp_path_factory, "sdxl-edit")
    return sdlab.load(folder), _quiet(StableDiffusionXLInstructPix2PixPipeline.from_pretrained(folder,
                                                                                             local_files_only=True))


def _generators(batch: int = BATCH) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(SEED + i) for i in range(batch)]


def _scheduler(pipe, name: str):
    keys = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "steps_offset", "timestep_spacing",
            "prediction_type")
    config = {key: pipe.scheduler.config[key] for key in keys}
    return {
        "euler": (EulerDiscreteScheduler.from_config(config), dict(sampler="Euler", schedule="leading", init_noise="vp")),
        "euler_a": (EulerAncestralDiscreteScheduler.from_config(config),
                    dict(sampler="Euler a", schedule="leading", init_noise="vp")),
        "ddim": (DDIMScheduler.from_config(config, clip_sample=False, set_alpha_to_one=False),
                 dict(sampler="DDIM", schedule="ddim_leading", init_noise="vp")),
    }[name]


def _without_the_picture(monkeypatch) -> None:
    """The edit conditioning replaced by zeros, for the runs that show a test sees the picture's conditioning."""
    import sdlab.pipeline.generate as generate_module

    real = generate_module._edit_image
    monkeypatch.setattr(generate_module, "_edit_image", lambda *args: torch.zeros_like(real(*args)))


# ---------------------------------------------------------------------------------------------------------
# loading


@pytest.mark.parametrize("name", ["sd1-edit", "sdxl-edit"])
def test_an_8_channel_single_file_is_an_edit_model(name, tmp_path):
    bundle = tiny_bundle(name, seed=3)
    path = write_original(bundle, tmp_path / "ip2p.safetensors")
    loaded = sdlab.load(path)
    assert loaded.bundle.family.name == name and loaded.bundle.family.is_edit
    assert loaded.bundle.unet_config.in_channels == 8
    for key, value in bundle.unet.state_dict().items():
        assert torch.equal(loaded.bundle.unet.state_dict()[key], value), key


@pytest.mark.parametrize("name", ["sd1-edit", "sdxl-edit"])
def test_the_unet_alone_and_under_family_are_the_edit_variant(name):
    """Full-size key / shape tables: the whole file, the U-Net alone and --family NAME give the edit family; the
    base's name under --family says the channels do not fit."""
    shapes = full_size_shapes(name)
    unet = {k: s for k, s in shapes.items() if k.startswith("model.diffusion_model.")}
    assert detect_family(shapes).name == detect_family(unet).name == name
    assert detect_family(shapes, override=name).name == name
    with pytest.raises(CheckpointError, match="expects a 4-channel U-Net input, the file has 8"):
        detect_family(shapes, override=name.removesuffix("-edit"))


@pytest.mark.parametrize("fixture", ["sd1_edit", "sdxl_edit"])
def test_a_diffusers_edit_folder_loads_as_the_edit_family(request, fixture):
    ours, _ = request.getfixturevalue(fixture)
    assert ours.bundle.family.name == fixture.replace("_", "-") and ours.bundle.unet_config.in_channels == 8


# ---------------------------------------------------------------------------------------------------------
# guidance


def _a1111_combine_denoised_for_edit_model(denoised, cond_scale, image_cfg_scale):
    # AUTOMATIC1111/stable-diffusion-webui v1.10.1, modules/sd_samplers_cfg_denoiser.py,
    # CFGDenoiser.combine_denoised_for_edit_model (transcribed)
    out_cond, out_img_cond, out_uncond = denoised.chunk(3)
    return out_uncond + cond_scale * (out_cond - out_img_cond) + image_cfg_scale * (out_img_cond - out_uncond)


def test_edit_guidance_is_a1111s_on_its_batch():
    """One forward pass of [prompt + picture, negative + picture, negative + zero picture], combined as A1111's
    `combine_denoised_for_edit_model`; at image scale 1, `cfg` with the picture in both passes (A1111's
    `is_edit_model` is off there), which the formula equals."""
    g = torch.Generator().manual_seed(0)
    x, image = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    cond, uncond = {"context": torch.randn(2, 5, 6, generator=g)}, {"context": torch.randn(2, 5, 6, generator=g)}
    weight = torch.randn(8 + 6, 4, generator=g)
    seen = []

    def denoiser(x, sigma, context, concat):                         # any function of all its inputs
        seen.append((x.shape[0], concat.clone()))
        pooled = torch.cat([x, concat], 1).mean((2, 3))                                        # (B, 8)
        return x * 0.3 + (torch.cat([pooled, context.mean(1)], 1) @ weight)[:, :, None, None]

    for image_scale in (1.5, 0.5, 1.0):
        seen.clear()
        ours = edit_cfg(denoiser, cond, uncond, image, 7.0, image_scale)(x, torch.tensor(2.0))
        three = denoiser(torch.cat([x] * 3), None, torch.cat([cond["context"], uncond["context"], uncond["context"]]),
                         torch.cat([image, image, torch.zeros_like(image)]))
        reference = _a1111_combine_denoised_for_edit_model(three, 7.0, image_scale)
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
        assert seen[0][0] == (6 if image_scale != 1.0 else 4)    # one batched pass; two rows a picture at scale 1
    assert edit_cfg(denoiser, cond, None, image, 7.0, 1.5)(x, 2.0).shape == x.shape


def _toy_guidance_inputs():
    g = torch.Generator().manual_seed(0)
    x, image = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    cond, uncond = {"context": torch.randn(2, 5, 6, generator=g)}, {"context": torch.randn(2, 5, 6, generator=g)}
    weight = torch.randn(8 + 6, 4, generator=g)

    def denoiser(x, sigma, context, concat):
        pooled = torch.cat([x, concat], 1).mean((2, 3))                                        # (B, 8)
        return x * 0.3 + (torch.cat([pooled, context.mean(1)], 1) @ weight)[:, :, None, None]

    return denoiser, x, image, cond, uncond


def _diffusers_edit_guidance(denoiser, x, image, cond, uncond, guidance_scale, image_guidance_scale):
    # diffusers 0.42 StableDiffusionInstructPix2PixPipeline.__call__ (transcribed): do_classifier_free_guidance is
    # guidance_scale > 1.0 and image_guidance_scale >= 1.0; without it one pass of [prompt + picture]
    if not (guidance_scale > 1.0 and image_guidance_scale >= 1.0):
        return denoiser(x, None, cond["context"], image)
    three = denoiser(torch.cat([x] * 3), None, torch.cat([cond["context"], uncond["context"], uncond["context"]]),
                     torch.cat([image, image, torch.zeros_like(image)]))
    text, image_only, neither = three.chunk(3)
    return neither + guidance_scale * (text - image_only) + image_guidance_scale * (image_only - neither)


@pytest.mark.parametrize("scale, image_scale", [(7.0, 0.5), (1.0, 1.5), (0.5, 0.5), (7.0, 1.5)])
def test_diffusers_convention_guides_as_diffusers_pipeline(scale, image_scale):
    """Under diffusers' convention an image scale below 1 (or CFG <= 1) turns guidance off: the conditional pass
    alone, as diffusers' edit pipelines; above, the image formula. Exact within 1e-5."""
    denoiser, x, image, cond, uncond = _toy_guidance_inputs()
    ours = edit_cfg(denoiser, cond, uncond, image, scale, image_scale, convention="diffusers")(x, torch.tensor(2.0))
    reference = _diffusers_edit_guidance(denoiser, x, image, cond, uncond, scale, image_scale)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("scale, image_scale", [(1.0, 1.5), (0.5, 1.5), (1.0, 0.5), (7.0, 0.5)])
def test_a1111_convention_applies_the_image_formula_at_every_cfg(scale, image_scale):
    """A1111's CFGDenoiser has no CFG 1 shortcut for an edit model (is_edit_model: image scale set and not 1):
    u + cfg * (c - i) + s_img * (i - u) at CFG 1 and below, and at image scales below 1. Within 1e-5."""
    denoiser, x, image, cond, uncond = _toy_guidance_inputs()
    ours = edit_cfg(denoiser, cond, uncond, image, scale, image_scale, convention="a1111")(x, torch.tensor(2.0))
    three = denoiser(torch.cat([x] * 3), None, torch.cat([cond["context"], uncond["context"], uncond["context"]]),
                     torch.cat([image, image, torch.zeros_like(image)]))
    torch.testing.assert_close(ours, _a1111_combine_denoised_for_edit_model(three, scale, image_scale), rtol=0,
                               atol=1e-5)


def test_ngms_skips_no_pass_of_the_image_formula_and_skip_early_cfg_does():
    """A1111's NGMS rule ends `and not is_edit_model`: a call NGMS would skip runs the whole image formula; Skip
    Early CFG's calls run the conditional pass alone (sdlab's `skipping_uncond`)."""
    from sdlab.diffusion.guidance import recording_effects, skipping_uncond

    denoiser, x, image, cond, uncond = _toy_guidance_inputs()
    guided = edit_cfg(denoiser, cond, uncond, image, 7.0, 1.5)
    full = guided(x, torch.tensor(2.0))
    with recording_effects() as effects:
        ngms = skipping_uncond(guided, lambda call, sigma: "s_min_uncond")(x, torch.tensor(2.0))
    assert torch.equal(ngms, full) and "s_min_uncond" not in effects
    early = skipping_uncond(guided, lambda call, sigma: "skip_early_cond")(x, torch.tensor(2.0))
    torch.testing.assert_close(early, denoiser(x, None, cond["context"], image), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# parity with diffusers' InstructPix2Pix pipelines


@pytest.mark.parametrize("scheduler", ["euler", "ddim", "euler_a"])
def test_sd1_edit_matches_diffusers(sd1_edit, scheduler):
    ours_pipe, pipe = sd1_edit
    pipe.scheduler, options = _scheduler(pipe, scheduler)
    image = init_picture(SIZE)
    reference = pipe(INSTRUCTION, image=image, negative_prompt=NEGATIVE, num_images_per_prompt=BATCH,
                     num_inference_steps=STEPS, guidance_scale=CFG, image_guidance_scale=IMAGE_CFG,
                     generator=_generators(), output_type="np").images
    ours = ours_pipe.img2img(INSTRUCTION, image, negative_prompt=NEGATIVE, steps=STEPS, cfg_scale=CFG,
                             image_cfg_scale=IMAGE_CFG, seed=SEED, batch_size=BATCH, **options)
    assert max_pixel_diff(ours.images, reference) <= MAX_PIXEL_DIFF
    assert ours.request.strength == 1.0 and ours.request.image_cfg_scale == IMAGE_CFG


def test_the_image_scale_changes_the_picture(sd1_edit):
    """The comparison sees the image scale: at 1.5 and at 1 (no image guidance) the pictures differ past the tolerance."""
    ours_pipe, pipe = sd1_edit
    _, options = _scheduler(pipe, "euler")
    image = init_picture(SIZE)
    a, b = (ours_pipe.img2img(INSTRUCTION, image, negative_prompt=NEGATIVE, steps=STEPS, cfg_scale=CFG,
                              image_cfg_scale=scale, seed=SEED, **options).images for scale in (1.5, 1.0))
    assert max_pixel_diff(a, b) > 4 * MAX_PIXEL_DIFF


def test_below_image_scale_1_diffusers_convention_matches_diffusers(sd1_edit):
    """diffusers turns guidance off at image_guidance_scale < 1 (do_classifier_free_guidance); so does sdlab under
    its convention (A1111's formula under A1111's: another picture)."""
    ours_pipe, pipe = sd1_edit
    pipe.scheduler, options = _scheduler(pipe, "euler")
    image = init_picture(SIZE)
    reference = pipe(INSTRUCTION, image=image, negative_prompt=NEGATIVE, num_inference_steps=STEPS,
                     guidance_scale=CFG, image_guidance_scale=0.5, generator=_generators(1), output_type="np").images
    ours = ours_pipe.img2img(INSTRUCTION, image, negative_prompt=NEGATIVE, steps=STEPS, cfg_scale=CFG,
                             image_cfg_scale=0.5, seed=SEED, **options)
    assert max_pixel_diff(ours.images, reference) <= MAX_PIXEL_DIFF
    a1111 = ours_pipe.img2img(INSTRUCTION, image, negative_prompt=NEGATIVE, steps=STEPS, cfg_scale=CFG,
                              image_cfg_scale=0.5, seed=SEED, **options, img2img_convention="a1111", strength=1.0)
    assert max_pixel_diff(a1111.images, reference) > 4 * MAX_PIXEL_DIFF


def test_sdxl_edit_matches_diffusers(sdxl_edit):
    ours_pipe, pipe = sdxl_edit
    pipe.scheduler, options = _scheduler(pipe, "euler")
    image = init_picture(SIZE)
    reference = pipe(INSTRUCTION, image=image, negative_prompt=NEGATIVE, num_images_per_prompt=BATCH,
                     num_inference_steps=STEPS, guidance_scale=CFG, image_guidance_scale=IMAGE_CFG,
                     height=SIZE, width=SIZE, generator=_generators(), output_type="np").images
    ours = ours_pipe.img2img(INSTRUCTION, image, negative_prompt=NEGATIVE, steps=STEPS, cfg_scale=CFG,
                             image_cfg_scale=IMAGE_CFG, seed=SEED, batch_size=BATCH, width=SIZE, height=SIZE,
                             **options)
    assert max_pixel_diff(ours.images, reference) <= MAX_PIXEL_DIFF


# ---------------------------------------------------------------------------------------------------------
# what an edit model refuses


def test_txt2img_on_an_edit_model_is_refused(sd1_edit):
    ours_pipe, _ = sd1_edit
    with pytest.raises(RequestError, match=r"sd1-edit is an edit \(InstructPix2Pix\) model: .*give it an init image"):
        ours_pipe.txt2img(INSTRUCTION, steps=2, width=SIZE, height=SIZE)


def test_a_composed_prompt_on_an_edit_model_is_refused(sd1_edit):
    ours_pipe, _ = sd1_edit
    with pytest.raises(RequestError, match="composable diffusion"):
        ours_pipe.img2img("snow AND night", init_picture(SIZE), steps=2)


def test_a_composed_prompt_draws_without_image_guidance(sd1_edit, monkeypatch):
    """A1111 asserts against AND only where its edit path is on (image scale set and not 1): with the image scale
    unset (its API's default) or 1 the prompt with AND draws, each pass with the picture; the two are one picture."""
    ours_pipe, _ = sd1_edit
    draw = lambda scale: ours_pipe.img2img("snow AND night", init_picture(SIZE), steps=3, seed=SEED,  # noqa: E731
                                           image_cfg_scale=scale, img2img_convention="a1111")
    unset, one = draw(None), draw(1.0)
    assert max_pixel_diff(unset.images, one.images) == 0
    assert unset.request.image_cfg_scale is None and one.request.image_cfg_scale == 1.0
    _without_the_picture(monkeypatch)
    assert max_pixel_diff(draw(None).images, unset.images) > MAX_PIXEL_DIFF


# ---------------------------------------------------------------------------------------------------------
# doors: Python API, infotext, CLI


def test_the_api_default_is_diffusers_image_scale_and_infotext_records_it(sd1_edit):
    """`img2img` without image_cfg_scale draws at diffusers' 1.5; the picture's parameters say `Image CFG scale: 1.5`
    (A1111's label, after CFG scale) and read back into the request."""
    from sdlab.pipeline.infotext import from_parameters, to_parameters
    from sdlab.pipeline.png_info import format_parameters, parse_parameters

    ours_pipe, pipe = sd1_edit
    _, options = _scheduler(pipe, "euler")
    image = init_picture(SIZE)
    default = ours_pipe.img2img(INSTRUCTION, image, steps=STEPS, cfg_scale=CFG, seed=SEED, **options)
    explicit = ours_pipe.img2img(INSTRUCTION, image, steps=STEPS, cfg_scale=CFG, seed=SEED, image_cfg_scale=1.5,
                                 **options)
    assert max_pixel_diff(default.images, explicit.images) == 0
    text = format_parameters(to_parameters(default.request))
    assert "CFG scale: 7.5, Image CFG scale: 1.5, Seed:" in text
    assert from_parameters(parse_parameters(text))["image_cfg_scale"] == 1.5


def test_other_models_record_no_image_scale(tmp_path):
    from sdlab.pipeline.infotext import to_parameters
    from sdlab.pipeline.png_info import format_parameters

    pipe = sdlab.load(write_original(tiny_bundle("sd1", seed=3), tmp_path / "sd1.safetensors"))
    result = pipe.img2img(INSTRUCTION, init_picture(SIZE), steps=2, seed=SEED, image_cfg_scale=2.0)
    assert result.request.image_cfg_scale is None
    assert "Image CFG scale" not in format_parameters(to_parameters(result.request))


@pytest.fixture(scope="module")
def edit_file(tmp_path_factory) -> Path:
    return write_original(tiny_bundle("sd1-edit", seed=3), tmp_path_factory.mktemp("edit") / "ip2p.safetensors",
                          junk=False)


def test_cli_image_cfg_scale_is_drawn_recorded_and_redrawn(edit_file, tmp_path, capsys):
    from cli_helpers import pixels, run
    from sdlab.pipeline.png_info import read_parameters

    init = tmp_path / "init.png"
    init_picture(SIZE).save(init)
    fast = ["--steps", "3", "--seed", "3", "--sampler", "Euler", "--no-progress", "--model", str(edit_file),
            "--init", str(init)]
    out, default, again = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    code, _, err = run(["img2img", INSTRUCTION, "--image-cfg-scale", "1.2", "--out", str(out), *fast], capsys)
    assert code == 0, err
    assert "Image CFG scale: 1.2" in read_parameters(out)
    code, _, err = run(["img2img", INSTRUCTION, "--out", str(default), *fast], capsys)
    assert code == 0, err
    assert "Image CFG scale: 1.5" in read_parameters(default)
    assert np.abs(pixels(out) - pixels(default)).max() > MAX_PIXEL_DIFF
    code, _, err = run(["img2img", "--from-png", str(out), "--out", str(again), *fast[6:]], capsys)
    assert code == 0, err
    assert np.array_equal(pixels(again), pixels(out))


def _no_image_guidance_picture(edit_file, path: Path):
    """An edit model's picture drawn under A1111's convention without image guidance (A1111's API default): no
    `Image CFG scale` label (as A1111), sdlab's `Image guidance: none`."""
    from sdlab.pipeline.infotext import to_parameters
    from sdlab.pipeline.png_info import format_parameters, save_png_atomic

    pipe = sdlab.load(edit_file)
    result = pipe.img2img(INSTRUCTION, init_picture(SIZE), steps=3, seed=3, sampler="Euler", image_cfg_scale=None,
                          img2img_convention="a1111")
    text = format_parameters(to_parameters(result.request, family=pipe.bundle.family))
    assert "Image CFG scale" not in text and "Image guidance: none" in text and "Img2img steps: a1111" in text
    save_png_atomic(result.images[0], path, text)
    return np.asarray(result.images[0], dtype=np.int16)


def test_cli_from_png_redraws_a_picture_drawn_without_image_guidance(edit_file, tmp_path, capsys):
    """A picture drawn under A1111's convention without image guidance (`Image guidance: none`): --from-png draws
    it so (not at the CLI's default 1.5) and records it so; --image-cfg-scale still overrides. The picture is
    drawn by the Python API in this process and the CLI's run may use other threads: within 1/255."""
    from cli_helpers import pixels, run
    from sdlab.pipeline.png_info import read_parameters

    drawn = _no_image_guidance_picture(edit_file, tmp_path / "none.png")
    init, again, guided = tmp_path / "init.png", tmp_path / "again.png", tmp_path / "guided.png"
    init_picture(SIZE).save(init)
    line = ["img2img", "--from-png", str(tmp_path / "none.png"), "--model", str(edit_file), "--init", str(init),
            "--no-progress"]
    code, _, err = run([*line, "--out", str(again)], capsys)
    assert code == 0, err
    assert np.abs(pixels(again) - drawn).max() <= 1 and "Image CFG scale" not in read_parameters(again)  # 16 at 1.5
    assert "Image guidance: none" in read_parameters(again)
    code, _, err = run([*line, "--image-cfg-scale", "1.5", "--out", str(guided)], capsys)
    assert code == 0, err
    assert "Image CFG scale: 1.5" in read_parameters(guided) and np.abs(pixels(guided) - drawn).max() > MAX_PIXEL_DIFF


def _non_edit_picture(tmp_path: Path, capsys) -> Path:
    """An img2img picture the CLI drew with a plain SD1 model, which records no image scale."""
    from cli_helpers import run
    from sdlab.pipeline.png_info import read_parameters

    model, init, out = tmp_path / "sd1.safetensors", tmp_path / "init.png", tmp_path / "nonedit.png"
    write_original(tiny_bundle("sd1", seed=3), model)
    init_picture(SIZE).save(init)
    code, _, err = run(["img2img", INSTRUCTION, "--steps", "3", "--seed", "3", "--sampler", "Euler", "--no-progress",
                        "--model", str(model), "--init", str(init), "--out", str(out)], capsys)
    assert code == 0, err
    assert "Image CFG scale" not in read_parameters(out) and "Image guidance" not in read_parameters(out)
    return out


def test_cli_from_png_of_a_picture_without_an_image_scale_draws_the_default(edit_file, tmp_path, capsys):
    """A picture without `Image CFG scale` or `Image guidance` (another model's, or A1111's) read into an edit model
    draws at the default image scale 1.5, as A1111's paste leaves its slider (before: no image guidance)."""
    from cli_helpers import pixels, run
    from sdlab.pipeline.infotext import from_parameters
    from sdlab.pipeline.png_info import parse_parameters, read_parameters

    plain = _non_edit_picture(tmp_path, capsys)
    line = ["img2img", "--from-png", str(plain), "--model", str(edit_file), "--init", str(tmp_path / "init.png"),
            "--no-progress"]
    again, guided, none = tmp_path / "again.png", tmp_path / "guided.png", tmp_path / "none.png"
    for out, extra in ((again, []), (guided, ["--image-cfg-scale", "1.5"]), (none, ["--image-cfg-scale", "none"])):
        code, _, err = run([*line, *extra, "--out", str(out)], capsys)
        assert code == 0, err
    assert "Image CFG scale: 1.5" in read_parameters(again) and np.array_equal(pixels(again), pixels(guided))
    assert np.abs(pixels(again) - pixels(none)).max() > MAX_PIXEL_DIFF
    a1111 = ("make it winter\nSteps: 3, Sampler: Euler, CFG scale: 7.5, Seed: 3, Size: 32x32, "
             "Denoising strength: 0.75, Model hash: 0123456789")
    assert "image_cfg_scale" not in from_parameters(parse_parameters(a1111))
    assert from_parameters(parse_parameters(a1111 + ", Image guidance: none"))["image_cfg_scale"] is None
    with pytest.raises(ValueError, match="the PNG's 'Image guidance' value 'off' is not 'none'"):
        from_parameters(parse_parameters(a1111 + ", Image guidance: off"))


def test_cli_image_cfg_scale_none_draws_records_and_redraws_without_image_guidance(edit_file, tmp_path, capsys):
    """`--image-cfg-scale none` (the request's None, A1111's unset field) under diffusers' convention, the CLI's:
    plain CFG with the picture in both passes, as the Python API's image_cfg_scale=None (within 1/255: other
    threads), which image scale 1 draws too; no `Image CFG scale` label, and --from-png of it draws it again without
    image guidance (before: at the CLI's default 1.5, 16/255 away). A word other than none is one error line."""
    from cli_helpers import pixels, run
    from sdlab.pipeline.png_info import read_parameters

    init, none, again, one = tmp_path / "init.png", tmp_path / "none.png", tmp_path / "again.png", tmp_path / "1.png"
    init_picture(SIZE).save(init)
    fast = ["--steps", "3", "--seed", "3", "--sampler", "Euler", "--no-progress", "--model", str(edit_file),
            "--init", str(init)]
    code, _, err = run(["img2img", INSTRUCTION, "--image-cfg-scale", "None", "--out", str(none), *fast], capsys)
    assert code == 0, err
    assert "Image CFG scale" not in read_parameters(none) and "Image guidance: none" in read_parameters(none)
    python = sdlab.load(edit_file).img2img(INSTRUCTION, init_picture(SIZE), steps=3, seed=3, sampler="Euler",
                                           image_cfg_scale=None)
    assert np.abs(pixels(none) - np.asarray(python.images[0], dtype=np.int16)).max() <= 1
    code, _, err = run(["img2img", INSTRUCTION, "--image-cfg-scale", "1", "--out", str(one), *fast], capsys)
    assert code == 0, err
    assert np.array_equal(pixels(one), pixels(none)) and "Image CFG scale: 1" in read_parameters(one)
    assert "Image guidance" not in read_parameters(one)
    code, _, err = run(["img2img", "--from-png", str(none), "--out", str(again), *fast[6:]], capsys)
    assert code == 0, err
    assert np.array_equal(pixels(again), pixels(none)) and "Image CFG scale" not in read_parameters(again)
    bad = tmp_path / "bad.png"
    code, _, err = run(["img2img", INSTRUCTION, "--image-cfg-scale", "off", "--out", str(bad), *fast], capsys)
    assert code != 0 and not bad.exists() and "expected a number or none, got 'off'" in err
    assert "Traceback" not in err


def test_cli_txt2img_on_an_edit_model_is_one_error(edit_file, tmp_path, capsys):
    from cli_helpers import run

    out = tmp_path / "a.png"
    code, _, err = run(["txt2img", INSTRUCTION, "--model", str(edit_file), "--steps", "2", "--no-progress",
                        "--out", str(out)], capsys)
    assert code != 0 and not out.exists()
    assert "is an edit (InstructPix2Pix) model" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------------------
# doors: the servers


def test_a1111_image_cfg_scale_reaches_the_request_unset_none():
    """A1111's img2img field (StableDiffusionProcessingImg2Img.image_cfg_scale, default None: its edit path off)."""
    from sdlab.server.a1111 import Img2ImgIn, _request

    assert _request(Img2ImgIn(prompt="x", image_cfg_scale=1.25), inits=(init_picture(SIZE),)).image_cfg_scale == 1.25
    assert _request(Img2ImgIn(prompt="x"), inits=(init_picture(SIZE),)).image_cfg_scale is None


@pytest.fixture(scope="module")
def edit_server(tmp_path_factory, edit_file):
    from server_fixtures import start_server

    server = start_server(tmp_path_factory.mktemp("edit-serve") / "outputs", "--model", str(edit_file))
    yield server
    server.stop()


def test_servers_draw_an_edit_model_and_refuse_its_txt2img(edit_server):
    """A1111's API: Image CFG scale as sent is recorded (none when unset, as A1111); its txt2img is a 4xx with the
    reason. The native API: unset is 1.5 for img2img, recorded."""
    import httpx
    from server_fixtures import b64_png, run_job

    image = b64_png(init_picture(SIZE))
    with httpx.Client(base_url=edit_server.url, timeout=120) as client:
        body = {"prompt": INSTRUCTION, "steps": 2, "seed": 1, "width": SIZE, "height": SIZE, "init_images": [image]}
        sent = client.post("/sdapi/v1/img2img", json={**body, "image_cfg_scale": 1.25})
        assert sent.status_code == 200, sent.text
        assert "Image CFG scale: 1.25" in sent.json()["info"]
        unset = client.post("/sdapi/v1/img2img", json=body)
        assert unset.status_code == 200 and "Image CFG scale" not in unset.json()["info"]
        assert "Image guidance: none" in unset.json()["info"] and "Image guidance" not in sent.json()["info"]
        assert "Image guidance" not in json.loads(unset.json()["info"])["extra_generation_params"]   # sdlab's label
        refused = client.post("/sdapi/v1/txt2img", json={"prompt": INSTRUCTION, "steps": 2})
        assert 400 <= refused.status_code < 500 and "edit (InstructPix2Pix) model" in refused.text
        job = run_job(client, {"mode": "img2img", "prompt": INSTRUCTION, "steps": 2, "seed": 1, "init_image": image})
        assert job["status"] == "done", job
        assert "Image CFG scale: 1.5" in json.dumps(job)


def test_api_parameters_of_a_picture_drawn_without_image_guidance_redraw_it(edit_server, edit_file, tmp_path):
    """`/api/parameters` (the web UI's drop, Reuse) of a picture A1111's convention drew without image guidance
    gives image_cfg_scale "none", the native API's no image guidance; a native job of those settings redraws it
    pixel for pixel (a job's unset image scale would be 1.5)."""
    import base64

    import httpx
    from server_fixtures import b64_png, picture, run_job

    drawn = _no_image_guidance_picture(edit_file, tmp_path / "none.png")
    png = base64.b64encode((tmp_path / "none.png").read_bytes()).decode()
    with httpx.Client(base_url=edit_server.url, timeout=120) as client:
        settings = client.post("/api/parameters", json={"image": png}).json()["settings"]
        assert settings["image_cfg_scale"] == "none"
        job = run_job(client, {**{key: value for key, value in settings.items() if value is not None},
                               "mode": "img2img", "init_image": b64_png(init_picture(SIZE))})
        assert job["status"] == "done", job
        again = np.asarray(picture(base64.b64encode(client.get(job["images"][0]).content).decode()), dtype=np.int16)
    assert np.abs(again - drawn).max() <= 1          # the server's threads may differ from this process's


def test_api_parameters_of_a_picture_without_an_image_scale_leave_the_default(edit_server, tmp_path, capsys):
    """`/api/parameters` of an img2img picture another model drew (no `Image CFG scale`, no `Image guidance`) gives
    no image_cfg_scale (before: "none"), so a native job of those settings on an edit model draws at 1.5."""
    import base64

    import httpx
    from server_fixtures import b64_png, run_job

    png = base64.b64encode(_non_edit_picture(tmp_path, capsys).read_bytes()).decode()
    with httpx.Client(base_url=edit_server.url, timeout=120) as client:
        settings = client.post("/api/parameters", json={"image": png}).json()["settings"]
        assert settings.get("image_cfg_scale") is None
        job = run_job(client, {**{key: value for key, value in settings.items() if value is not None and key != "model"},
                               "mode": "img2img", "init_image": b64_png(init_picture(SIZE))})   # the other model's
        assert job["status"] == "done", job
        assert "Image CFG scale: 1.5" in job["infotexts"][0] and "Image guidance" not in job["infotexts"][0]


def test_the_native_api_says_no_image_guidance_with_none(edit_server):
    """A native job's image_cfg_scale "none": no image guidance (the picture in both passes), as image scale 1 draws
    it, recorded as sent and without `Image CFG scale`; unset and null are 1.5; `/api/parameters` of its picture
    gives "none" back, and that job draws it again. Another word is a 422."""
    import base64

    import httpx
    from server_fixtures import b64_png, run_job

    body = {"mode": "img2img", "prompt": INSTRUCTION, "steps": 2, "seed": 1, "sampler": "Euler",
            "init_image": b64_png(init_picture(SIZE))}
    with httpx.Client(base_url=edit_server.url, timeout=120) as client:
        def drawn(**fields):
            job = run_job(client, {**body, **fields})
            assert job["status"] == "done", job
            return job, client.get(job["images"][0]).content

        (none, none_png), (one, one_png) = drawn(image_cfg_scale="none"), drawn(image_cfg_scale=1.0)
        for spelling in ("None", " NONE "):                 # any case, as the CLI's --image-cfg-scale
            same, same_png = drawn(image_cfg_scale=spelling)
            assert same_png == none_png and same["request"]["image_cfg_scale"] == "none"
        (null, null_png), (unset, unset_png) = drawn(image_cfg_scale=None), drawn()
        assert none["request"]["image_cfg_scale"] == "none" and "Image CFG scale" not in none["infotexts"][0]
        assert "Image guidance: none" in none["infotexts"][0] and "Image guidance" not in one["infotexts"][0]
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(none_png))), np.asarray(Image.open(io.BytesIO(one_png))))
        assert "Image CFG scale: 1.5" in null["infotexts"][0] and "Image CFG scale: 1.5" in unset["infotexts"][0]
        assert null_png == unset_png != none_png
        settings = client.post("/api/parameters", json={"image": base64.b64encode(none_png).decode()}).json()
        assert settings["settings"]["image_cfg_scale"] == "none"
        again = run_job(client, {**{k: v for k, v in settings["settings"].items() if v is not None},
                                 "mode": "img2img", "init_image": body["init_image"]})
        assert again["status"] == "done", again
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(client.get(again["images"][0]).content))),
                              np.asarray(Image.open(io.BytesIO(none_png))))
        refused = client.post("/api/jobs", json={**body, "image_cfg_scale": "off"})
        assert refused.status_code == 422 and "image_cfg_scale" in refused.text


# ---------------------------------------------------------------------------------------------------------
# A1111's convention: any model's img2img strength; inpainting with the latent blend; sdlab inspect


def test_under_a1111s_convention_the_strength_is_img2imgs(sd1_edit, monkeypatch):
    """A1111 runs an edit model's img2img as any model's (the noised init latent at the strength's step), with the
    edit conditioning; diffusers' convention ignores the strength (pure noise, all steps)."""
    ours_pipe, pipe = sd1_edit
    _, options = _scheduler(pipe, "euler")
    image = init_picture(SIZE)
    draw = lambda strength, convention: ours_pipe.img2img(  # noqa: E731
        INSTRUCTION, image, strength=strength, steps=STEPS, cfg_scale=CFG, seed=SEED, img2img_convention=convention,
        **options)
    half, full = draw(0.5, "a1111"), draw(1.0, "a1111")
    assert half.request.strength == 0.5 and max_pixel_diff(half.images, full.images) > MAX_PIXEL_DIFF
    assert max_pixel_diff(draw(0.5, "diffusers").images, draw(1.0, "diffusers").images) == 0
    _without_the_picture(monkeypatch)
    assert max_pixel_diff(draw(0.5, "a1111").images, half.images) > MAX_PIXEL_DIFF    # the picture conditions it


def test_under_a1111s_convention_cfg_1_and_ngms_keep_the_image_formula(sd1_edit):
    """At CFG 1 A1111 still runs the edit formula (the negative prompt's passes included): CFG 1 draws what CFG
    1.000001 draws, not the conditional pass alone. NGMS skips no call of an edit model (`and not is_edit_model`):
    NGMS 100 draws the plain picture and, having skipped nothing, writes no NGMS label (A1111 sets it where a call
    skipped)."""
    from sdlab.pipeline.infotext import to_parameters
    from sdlab.pipeline.png_info import format_parameters

    ours_pipe, _ = sd1_edit
    image = init_picture(SIZE)
    draw = lambda **options: ours_pipe.img2img(INSTRUCTION, image, steps=4, seed=SEED, sampler="Euler",  # noqa: E731
                                               img2img_convention="a1111", **{"image_cfg_scale": 1.5, **options})
    one, near, plain = draw(cfg_scale=1.0), draw(cfg_scale=1.0 + 1e-6), draw(cfg_scale=1.0, image_cfg_scale=None)
    assert max_pixel_diff(one.images, near.images) <= 1 and max_pixel_diff(one.images, plain.images) > MAX_PIXEL_DIFF
    base, ngms = draw(cfg_scale=7.0), draw(cfg_scale=7.0, s_min_uncond=100.0)
    assert max_pixel_diff(base.images, ngms.images) == 0
    assert "NGMS" not in format_parameters(to_parameters(ngms.request))


def test_inpainting_with_an_edit_model_keeps_the_unmasked_picture(sd1_edit, monkeypatch):
    """A1111's img2img_image_conditioning gives an edit model its picture's conditioning with a mask too, and
    CFGDenoiser blends the latent as for any 4-channel model; the picture outside the mask is pasted back."""
    from bundle_fixtures import lower_right_mask

    ours_pipe, _ = sd1_edit
    image, mask = init_picture(SIZE), lower_right_mask(SIZE)
    result = ours_pipe.inpaint(INSTRUCTION, image, mask, steps=3, seed=SEED, image_cfg_scale=1.5,
                               img2img_convention="a1111")
    kept = np.asarray(mask) == 0
    assert np.array_equal(np.asarray(result.images[0])[kept], np.asarray(image)[kept])
    assert result.request.image_cfg_scale == 1.5
    _without_the_picture(monkeypatch)
    blind = ours_pipe.inpaint(INSTRUCTION, image, mask, steps=3, seed=SEED, image_cfg_scale=1.5,
                              img2img_convention="a1111")
    assert max_pixel_diff(blind.images, result.images) > MAX_PIXEL_DIFF          # the picture conditions it


def test_inspect_names_the_edit_kind(edit_file, capsys):
    from cli_helpers import run

    code, out, err = run(["inspect", str(edit_file)], capsys)
    assert code == 0, err
    assert "sd1-edit (detected): Stable Diffusion 1.x InstructPix2Pix edit model" in out and "in_channels=8" in out


def test_an_image_cfg_scale_axis_draws_single_edits(monkeypatch):
    """A1111's X/Y/Z axis Image CFG Scale (img2img, `apply_field("image_cfg_scale")`): each cell is the img2img
    run with that image scale on the edit model."""
    from functools import partial

    from PIL import Image as PILImage

    from sdlab.pipeline.generate import generate
    from sdlab.pipeline.grid import Plot, draw_plot, parse_axis
    from sdlab.pipeline.request import GenerationRequest

    run = partial(generate, tiny_bundle("sd1-edit", seed=3))
    shared = {"prompt": INSTRUCTION, "steps": 3, "seed": 2, "sampler": "Euler", "width": SIZE, "height": SIZE,
              "init_image": init_picture(SIZE)}
    axis = parse_axis("Image CFG Scale=1.5,1")
    assert axis.labels == ("Image CFG Scale: 1.5", "Image CFG Scale: 1.0")
    _, results = draw_plot(run, shared, Plot(axis))
    cells = [np.asarray(results[(i, 0, 0)].images[0], dtype=np.int16) for i in range(2)]
    for scale, cell in zip((1.5, 1.0), cells):
        single = run(GenerationRequest(**shared, image_cfg_scale=scale)).images[0]
        assert np.array_equal(cell, np.asarray(single, dtype=np.int16))
    assert np.abs(cells[0] - cells[1]).max() > 0
    assert isinstance(results[(0, 0, 0)].images[0], PILImage.Image)
    _without_the_picture(monkeypatch)
    blind = np.asarray(run(GenerationRequest(**shared, image_cfg_scale=1.5)).images[0], dtype=np.int16)
    assert np.abs(blind - cells[0]).max() > MAX_PIXEL_DIFF                        # the picture conditions the cells
