"""The hires fix and the refiner against AUTOMATIC1111 1.10's code, transcribed below (cited per function) and run on
a tiny SD1 model with a factor-8 VAE (released models' factor, so A1111's opt_f = 8 applies as is): A1111's
upscaler names and files, the hires sizes (`calculate_target_resolution` and the latent crop of `sample_hr_pass`),
the pixel upscaler's unsnapped resize, the paste rule that turns the hires fix on, and a refiner that never takes
over."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sdlab.api import Pipeline
from sdlab.checkpoints import create
from sdlab.models.vae import VAEConfig
from sdlab.pipeline import hires as hires_module
from sdlab.pipeline.generate import encode_image, generate, generate_with_refiner
from sdlab.pipeline.hires import find_upscaler, upscaler_name
from sdlab.pipeline.images import pil_to_tensor
from sdlab.pipeline.infotext import from_parameters, to_parameters
from sdlab.pipeline.plan import make_plan
from sdlab.pipeline.png_info import format_parameters, parse_parameters
from sdlab.pipeline.request import GenerationRequest, RequestError, hires_sizes, resolve
from sdlab.pipeline.upscale import A1111_UPSCALER_FILES, resize_image
from sdlab.server.inputs import BadRequest, upscaler_file
from sdlab.server.model_folders import UPSCALER_SUFFIXES, ModelFolder
from bundle_fixtures import randomize_, tiny_bundle
from test_upscale_models import new_arch_state

pytestmark = pytest.mark.usefixtures("one_thread")

OPT_F = 8                                   # A1111's processing.opt_f


# --- A1111 1.10, transcribed -------------------------------------------------------------------------------------

def a1111_realesrgan_models() -> dict[str, str]:
    """modules/realesrgan_model.py `get_realesrgan_models`: name -> the file `load_file_from_url` saves (the URL's
    basename); modules/esrgan_model.py `UpscalerESRGAN`: model_name "ESRGAN_4x", saved as "%s.pth" % model_name."""
    urls = {
        "R-ESRGAN General 4xV3": "https://github.com/xinntao/Real-ESRGAN/releases/download/v0.2.5.0/realesr-general-x4v3.pth",
        "R-ESRGAN General WDN 4xV3":
            "https://github.com/xinntao/Real-ESRGAN/releases/download/v0.2.5.0/realesr-general-wdn-x4v3.pth",
        "R-ESRGAN AnimeVideo": "https://github.com/xinntao/Real-ESRGAN/releases/download/v0.2.5.0/realesr-animevideov3.pth",
        "R-ESRGAN 4x+": "https://github.com/xinntao/Real-ESRGAN/releases/download/v0.1.0/RealESRGAN_x4plus.pth",
        "R-ESRGAN 4x+ Anime6B":
            "https://github.com/xinntao/Real-ESRGAN/releases/download/v0.2.2.4/RealESRGAN_x4plus_anime_6B.pth",
        "R-ESRGAN 2x+": "https://github.com/xinntao/Real-ESRGAN/releases/download/v0.2.1/RealESRGAN_x2plus.pth",
    }
    return {**{name: url.rsplit("/", 1)[1] for name, url in urls.items()}, "ESRGAN_4x": "ESRGAN_4x.pth"}


def calculate_target_resolution(width, height, hr_scale, hr_resize_x, hr_resize_y):
    """modules/processing.py StableDiffusionProcessingTxt2Img.calculate_target_resolution -> (hr_upscale_to_x,
    hr_upscale_to_y, truncate_x, truncate_y), from width / height as the request sends them."""
    truncate_x = truncate_y = 0
    if hr_resize_x == 0 and hr_resize_y == 0:
        return int(width * hr_scale), int(height * hr_scale), 0, 0
    if hr_resize_y == 0:
        x, y = hr_resize_x, hr_resize_x * height // width
    elif hr_resize_x == 0:
        x, y = hr_resize_y * width // height, hr_resize_y
    else:
        if width / height < hr_resize_x / hr_resize_y:
            x, y = hr_resize_x, hr_resize_x * height // width
        else:
            x, y = hr_resize_y * width // height, hr_resize_y
        truncate_x, truncate_y = (x - hr_resize_x) // OPT_F, (y - hr_resize_y) // OPT_F
    return x, y, truncate_x, truncate_y


def a1111_hires_latent(samples: torch.Tensor, truncate_x: int, truncate_y: int) -> torch.Tensor:
    """processing.py `sample_hr_pass`: the upscaled latent's centred crop."""
    return samples[:, :, truncate_y // 2:samples.shape[2] - (truncate_y + 1) // 2,
                   truncate_x // 2:samples.shape[3] - (truncate_x + 1) // 2]


def a1111_final_size(width, height, hr_scale, hr_resize_x, hr_resize_y) -> tuple[int, int]:
    """The picture A1111 draws: the latent of hr_upscale_to // 8 (either upscaler), cropped."""
    x, y, tx, ty = calculate_target_resolution(width, height, hr_scale, hr_resize_x, hr_resize_y)
    latent = a1111_hires_latent(torch.zeros(1, 1, y // OPT_F, x // OPT_F), tx, ty)
    return latent.shape[3] * OPT_F, latent.shape[2] * OPT_F


def a1111_enable_hr(d: dict) -> bool:
    """modules/ui.py (1.10) `PasteField(enable_hr, ...)`; `Hires resize-1` is what `parse_generation_parameters`
    splits `Hires resize: WxH` into."""
    return "Denoising strength" in d and ("Hires upscale" in d or "Hires upscaler" in d or "Hires resize-1" in d)


# --- models ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipe8() -> Pipeline:
    """A tiny SD1 model with a factor-8 VAE, random weights."""
    bundle = create.new_bundle("sd1", tiny=True, seed=3,
                               vae=VAEConfig(base_channels=32, channel_mult=(1, 1, 1, 1), num_res_blocks=1))
    for i, module in enumerate([bundle.unet, bundle.vae, *(te.model for te in bundle.text_encoders)]):
        randomize_(module, 3 + i)
    assert bundle.vae_config.downsample_factor == OPT_F
    return Pipeline(bundle)


# --- upscaler names ----------------------------------------------------------------------------------------------

def test_a1111s_upscaler_names_are_its_download_files():
    assert A1111_UPSCALER_FILES == a1111_realesrgan_models()


@pytest.mark.parametrize("name", sorted(a1111_realesrgan_models()))
def test_an_a1111_upscaler_name_finds_its_file_and_is_recorded_so(tmp_path: Path, name: str):
    stem = a1111_realesrgan_models()[name].rsplit(".", 1)[0]
    save_file(new_arch_state(2, seed=1), tmp_path / f"{stem}.safetensors")
    found = find_upscaler(name, [tmp_path])
    assert found == str(tmp_path / f"{stem}.safetensors") and upscaler_name(found) == name
    folder = ModelFolder(tmp_path, UPSCALER_SUFFIXES, hashed=False)
    assert folder.titles() == [name]                                   # /sdapi/v1/upscalers lists A1111's name
    assert upscaler_file(name, folder).path.name == f"{stem}.safetensors"
    assert upscaler_file(stem, folder).title == name                  # the stem still finds it


def test_a_missing_a1111_upscaler_names_the_file_to_place(tmp_path: Path):
    request = GenerationRequest("a cat", steps=2, hr_scale=2, hr_upscaler=find_upscaler("R-ESRGAN 4x+", [tmp_path]))
    with pytest.raises(RequestError, match=r"A1111's name of the file RealESRGAN_x4plus\.pth, which was not found"):
        resolve(request, default_size=64, default_sampler="Euler", default_schedule="karras", factor=8)
    with pytest.raises(BadRequest, match=r"RealESRGAN_x2plus\.pth, which was not found: place it .* --upscalers-dir"):
        upscaler_file("R-ESRGAN 2x+", ModelFolder(tmp_path, UPSCALER_SUFFIXES, hashed=False))
    for name in ("SwinIR 4x", "ScuNET GAN", "LDSR"):
        with pytest.raises(RequestError, match="a network sdlab does not run"):
            resolve(GenerationRequest("a cat", hr_scale=2, hr_upscaler=name), default_size=64,
                    default_sampler="Euler", default_schedule="karras", factor=8)


# --- sizes -------------------------------------------------------------------------------------------------------

def test_hires_sizes_are_a1111s_for_every_side():
    """Every final size of `calculate_target_resolution` and the crop, over sides that are and are not multiples
    of 8 (first pass and Hires resize): 0 px difference."""
    for width, height in [(512, 768), (512, 512), (500, 750), (832, 1216), (64, 64), (100, 60), (1000, 744)]:
        for scale, rx, ry in [(2.0, 0, 0), (1.5, 0, 0), (1.3, 0, 0), (1.0, 1024, 700), (1.0, 1000, 750),
                              (1.0, 100, 95), (1.0, 1500, 2000), (1.0, 0, 1000), (1.0, 777, 0)]:
            base = width, height
            _, final = hires_sizes(*base, None if rx or ry else scale, rx, ry)
            assert final == a1111_final_size(width, height, scale, rx, ry), (base, scale, rx, ry)


@pytest.mark.parametrize("size, hires", [((64, 64), dict(hr_width=100, hr_height=95)),
                                         ((60, 100), dict(hr_scale=2)), ((60, 100), dict(hr_scale=1.5)),
                                         ((68, 52), dict(hr_width=100, hr_height=70))])
def test_hires_draws_a1111s_size_and_records_the_size_asked(pipe8: Pipeline, size, hires):
    """A1111 upscales from width x height as sent (drawing the first pass at their multiples of 8) and writes
    them as Size: `--from-png` of sdlab's text draws the same size again."""
    result = pipe8.txt2img("a cat", width=size[0], height=size[1], steps=2, seed=1, hr_denoise=0.5, **hires)
    expected = a1111_final_size(*size, hires.get("hr_scale", 1), hires.get("hr_width", 0), hires.get("hr_height", 0))
    assert result.images[0].size == expected
    text = format_parameters(to_parameters(result.request))
    assert f"Size: {size[0]}x{size[1]}, " in text
    again = pipe8.resolve(GenerationRequest(**from_parameters(parse_parameters(text))))
    assert hires_module.pass_sizes(again.request, OPT_F)[1] == expected


@pytest.mark.parametrize("size, hires", [((64, 64), dict(hr_scale=1.3)), ((72, 56), dict(hr_scale=1.5)),
                                         ((64, 48), dict(hr_width=100)), ((60, 100), dict(hr_scale=1.4))])
def test_pixel_upscaler_resizes_to_a1111s_unsnapped_size(pipe8: Pipeline, monkeypatch, size, hires):
    """`sample_hr_pass`'s pixel branch: the first pass's picture resized to (hr_upscale_to_x, hr_upscale_to_y)
    unsnapped, VAE-encoded (the latent keeps floor(side / 8) pixels), then cropped: the second pass starts from
    exactly that latent (posterior means on both sides)."""
    seen = {}
    real_generate, real_sample = hires_module.generate, hires_module.sample_latents
    monkeypatch.setattr(hires_module, "generate",
                        lambda *a, **k: seen.setdefault("first", real_generate(*a, **k)))
    monkeypatch.setattr(hires_module, "sample_latents",
                        lambda *a, init_latent=None, **k: seen.setdefault("z", init_latent) if init_latent is not None
                        else real_sample(*a, **k))
    pipe8.txt2img("a red cat", width=size[0], height=size[1], steps=2, seed=4, hr_upscaler="Lanczos",   # second
                  hr_denoise=0.5, **hires)                                                           # pass stubbed
    x, y, tx, ty = calculate_target_resolution(*size, hires.get("hr_scale", 1), hires.get("hr_width", 0),
                                               hires.get("hr_height", 0))
    pixels = pil_to_tensor([resize_image(picture, "Lanczos", (x, y)) for picture in seen["first"].images])
    expected = a1111_hires_latent(encode_image(pipe8.bundle, pixels), tx, ty)
    assert seen["z"].shape == expected.shape and torch.equal(seen["z"], expected)


# --- paste rule --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("labels", [
    "Denoising strength: 0.45, Hires upscale: 1.5, Hires upscaler: Latent",
    "Denoising strength: 0.7, Hires upscale: 2",
    "Hires upscale: 2, Hires upscaler: Latent",
    "Denoising strength: 0.6, Hires upscaler: Latent",
    "Denoising strength: 0.6, Hires resize: 0x0",
    "Denoising strength: 0.6, Hires resize: 96x0, Hires steps: 3",
    "Hires resize: 96x0, Hires steps: 3",
    "Denoising strength: 0.6, Hires steps: 3",
    "Hires upscale: 1.5",
])
def test_hires_is_on_where_a1111s_paste_turns_it_on(labels: str):
    text = f"a cat\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64, {labels}, Version: v1.10.1"
    parsed = parse_parameters(text)
    d = {**parsed, **({"Hires resize-1": 0} if "Hires resize" in parsed else {})}
    request = GenerationRequest(**from_parameters(parsed))
    assert request.hires == a1111_enable_hr(d)
    if request.hires:
        assert request.hr_denoise == float(parsed["Denoising strength"]) and request.strength == 0.75
        sized = "Hires resize" in parsed and parsed["Hires resize"] != "0x0"
        assert request.hr_scale == (None if sized else float(parsed.get("Hires upscale", 2.0)))    # A1111's slider: 2
    else:
        assert request.hr_upscaler is None and request.hr_steps is None and request.hr_denoise is None


# --- refiner -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("convention", ["a1111", "diffusers"])
def test_a_refiner_that_never_takes_over_leaves_the_base_picture(convention: str):
    """A1111's `apply_refiner` swaps the model (and writes Refiner) only at a call that reaches the switch; DPM2,
    which drops the next-to-last sigma, never reaches 0.999: the base's picture, decoded by its VAE, unrefined."""
    base, refiner = tiny_bundle("sdxl", seed=25), tiny_bundle("sdxl-refiner", seed=45)
    request = GenerationRequest("a cat", steps=10, seed=3, width=32, height=32, sampler="DPM2", schedule="karras")
    plan = make_plan(base, request, refiner=refiner, switch_at=0.999, refiner_convention=convention)
    assert plan.refiner_split == len(plan.sigmas) - 1
    result = generate_with_refiner(base, refiner, plan)
    alone = generate(base, request)
    assert not result.refined
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(alone.images[0]))
    assert generate_with_refiner(base, refiner, make_plan(base, request, refiner=refiner, switch_at=0.5,
                                                          refiner_convention=convention)).refined
