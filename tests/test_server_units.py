"""The server's parts without HTTP: the hash cache, the preview projection (quality and cost), A1111's
sampler / scheduler names, image decoding and limits, and the store's restart rule."""

from __future__ import annotations

import base64
import hashlib
import io
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import sdlab
from sdlab.families.latent_format import LatentFormat
from sdlab.pipeline.png_info import model_hash
from sdlab.pipeline.request import GenerationRequest
from sdlab.server.config import Limits
from sdlab.server.inputs import BadRequest, check_request, decode_image, sampler_and_schedule, schedule_name
from sdlab.server.previews import LatentPreviewer, jpeg_data_url
from sdlab.server.registry import ModelRegistry
from sdlab.server.store import Store
from sdlab.utils import file_hashes

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    return sdlab.load()


def test_model_list_hashes_are_a1111s_and_read_once_per_file_version(tmp_path, monkeypatch):
    model = tmp_path / "m.safetensors"
    model.write_bytes(os.urandom(3 << 20))
    calls = []
    real = file_hashes._file_sha256
    monkeypatch.setattr(file_hashes, "_file_sha256", lambda path: calls.append(path) or real(path))
    first = ModelRegistry(model, None).default
    assert first.hash == model_hash(model) and first.sha256 == hashlib.sha256(model.read_bytes()).hexdigest()
    assert first.title == f"m.safetensors [{first.hash}]" and len(calls) == 1
    ModelRegistry(model, None).refresh()                 # a restart, a rescan: the cache answers
    assert len(calls) == 1
    stat = model.stat()
    os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))   # the file changed: hashed again
    ModelRegistry(model, None)
    assert len(calls) == 2


def test_the_startup_models_own_lora_folders_are_listed(tmp_path):
    """Without --models-dir the LoRAs are those in the startup model's own folders (A1111's `Lora` beside
    its folder, `loras` inside it: where the shipped model keeps the adapters that ship with it)."""
    from safetensors.torch import save_file

    model = tmp_path / "models" / "Stable-diffusion" / "m.safetensors"
    for path in (model, tmp_path / "models" / "Lora" / "style.safetensors",
                 tmp_path / "models" / "Stable-diffusion" / "loras" / "adapter.safetensors"):
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"x": torch.zeros(1)}, str(path))
    registry = ModelRegistry(model, None)
    assert sorted(lora.name for lora in registry.loras) == ["adapter", "style"]
    assert [c.name for c in registry.checkpoints] == ["m.safetensors"]


def test_a_lora_that_is_not_safetensors_is_skipped_and_the_others_listed(tmp_path, caplog):
    """A1111 lists the LoRAs it can read and still starts; a saved web page named .safetensors in the
    LoRA folder is left out with a warning naming it."""
    from safetensors.torch import save_file

    model = tmp_path / "models" / "Stable-diffusion" / "m.safetensors"
    model.parent.mkdir(parents=True)
    save_file({"x": torch.zeros(1)}, str(model))
    (tmp_path / "models" / "Lora").mkdir()
    save_file({"x": torch.zeros(1)}, str(tmp_path / "models" / "Lora" / "good.safetensors"))
    (tmp_path / "models" / "Lora" / "junk.safetensors").write_bytes(b"<!DOCTYPE html><html></html>")
    registry = ModelRegistry(model, tmp_path / "models")
    assert [lora.name for lora in registry.loras] == ["good"]
    assert "junk.safetensors: not a readable safetensors file" in caplog.text


def test_store_marks_unfinished_jobs_interrupted_on_reopen(tmp_path):
    store = Store(tmp_path)
    for i, status in enumerate(("done", "running", "queued")):
        store.save_job({"id": str(i), "status": status, "mode": "txt2img", "model": "m", "request": {"seed": i},
                        "images": [], "infotexts": [], "error": None, "created": float(i), "started": None,
                        "finished": None, "step": 0, "steps": 4})
    store.close()
    reopened = Store(tmp_path)
    assert [(j["id"], j["status"]) for j in reopened.jobs(10)] == [("2", "interrupted"), ("1", "interrupted"), ("0", "done")]
    assert reopened.job("0")["request"] == {"seed": 0}


def test_fitted_preview_follows_the_decoded_picture(pipe):
    """A map fitted against the VAE (for families without preview factors): across pictures of different
    colours, preview and picture (pooled to the latent grid) correlate strongly (0.88 on the shipped model;
    a linear map cannot follow its VAE much closer: 0.9 when fitted on the pictures themselves)."""
    previewer = LatentPreviewer.fitted(pipe.bundle)                 # not the family's map: the fit itself
    previews, pictures = [], []
    for seed, prompt in enumerate(("a red apple", "a blue square", "a green tree", "a yellow sun")):
        latents = []
        result = pipe.txt2img(prompt, steps=8, seed=seed, progress=lambda info: latents.append(info.denoised))
        preview = previewer.rgb(latents[-1][0]).float()                                # (h, w, 3)
        h, w = preview.shape[:2]
        pictures.append(np.asarray(result.images[0].resize((w, h), Image.Resampling.BOX), dtype=np.float32))
        previews.append(preview.numpy())
    correlation = np.corrcoef(np.stack(previews).ravel(), np.stack(pictures).ravel())[0, 1]
    assert correlation > 0.75, correlation


def test_family_rgb_factors_are_used_when_present(pipe):
    factors = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (0.0, 0.0, 0.0))
    latent_format = LatentFormat(channels=4, scaling_factor=1.0, rgb_factors=factors, rgb_bias=(0.0, 0.0, -1.0))
    bundle = SimpleNamespace(family=SimpleNamespace(latent_format=latent_format), scaling_factor=1.0, latent_stats=None)
    previewer = LatentPreviewer.for_bundle(bundle)                  # no VAE needed: nothing is fitted
    latent = torch.zeros(4, 2, 3)
    latent[0] = 1.0                                                  # red channel at +1, blue biased to -1
    assert previewer.rgb(latent)[0, 0].tolist() == [255, 128, 0]
    shipped = LatentPreviewer.for_bundle(pipe.bundle)                # sdlab-tiny ships its own preview decoder
    z = torch.randn(4, 16, 16)
    expected = pipe.bundle.family.latent_format.preview_decoder().preview(z[None], pipe.bundle.scaling_factor)[0]
    assert torch.equal(shipped.rgb(z), (expected.permute(1, 2, 0) * 255).round().to(torch.uint8))


def test_a_preview_never_runs_the_vae_and_its_decoder_is_small(pipe, monkeypatch):
    """Previews stay cheap by construction (benchmarks/bench_server.py times them; tests do not): no VAE decode,
    and sdlab-tiny's preview decoder has under a tenth of the VAE decoder's parameters."""
    previewer = LatentPreviewer.for_bundle(pipe.bundle)          # its probe check may decode; done here
    latents = []
    pipe.txt2img("a red apple", steps=4, seed=1, progress=lambda info: latents.append(info.denoised))

    def no_decode(*args, **kwargs):
        raise AssertionError("a preview ran the VAE decoder")

    monkeypatch.setattr(pipe.bundle.vae, "decode", no_decode)
    for latent in latents:
        assert jpeg_data_url(previewer.rgb(latent[0])).startswith("data:image/jpeg;base64,")
    decoder = pipe.bundle.family.latent_format.preview_decoder()
    assert decoder is not None
    vae_decoder = sum(p.numel() for p in pipe.bundle.vae.decoder.parameters())
    assert sum(p.numel() for p in decoder.network.parameters()) < vae_decoder / 10


def test_a1111_scheduler_and_sampler_names():
    assert [schedule_name(n) for n in ("Karras", "SGM Uniform", "automatic", "DDIM", "leading", None, "")] == \
        ["karras", "sgm_uniform", None, "ddim_uniform", "leading", None, None]
    assert sampler_and_schedule("DPM++ 2M Karras", None) == ("DPM++ 2M", "karras")
    assert sampler_and_schedule("DPM++ 2M Karras", "exponential") == ("DPM++ 2M", "exponential")
    assert sampler_and_schedule("euler a", "") == ("Euler a", None)                # an A1111 name: sdlab's spelling
    assert sampler_and_schedule("euler_ancestral", "") == ("euler_ancestral", None)  # ComfyUI's: kept, its conventions
    assert sampler_and_schedule("euler_ancestral Karras", None) == ("euler_ancestral", "karras")
    for call, detail in ((lambda: schedule_name("karras_exponential"), "Scheduler not found"),
                         (lambda: sampler_and_schedule("Nope Karras", None), "Sampler not found")):
        with pytest.raises(BadRequest) as err:
            call()
        assert err.value.status == 404 and err.value.detail == detail and "valid names" in err.value.message


def test_image_decoding_and_limits():
    buffer = io.BytesIO()
    Image.new("RGB", (16, 8), (1, 2, 3)).save(buffer, format="PNG")
    data = base64.b64encode(buffer.getvalue()).decode()
    assert decode_image("data:image/png;base64," + data, "init", Limits()).size == (16, 8)
    for bad in ("not base64!", base64.b64encode(b"text").decode(), 12):
        with pytest.raises(BadRequest) as err:
            decode_image(bad, "init", Limits())
        assert 400 <= err.value.status < 500
    big = io.BytesIO()
    Image.new("L", (300, 300)).save(big, format="PNG")
    with pytest.raises(BadRequest) as err:
        decode_image(base64.b64encode(big.getvalue()).decode(), "init", Limits(max_pixels=100 * 100))
    assert err.value.status == 413
    limits = Limits(max_pixels=128 * 128, max_steps=10, max_batch=2)
    for request, words in ((GenerationRequest("x", steps=5, width=256, height=256), "pixels"),
                           (GenerationRequest("x", steps=11), "steps"),
                           (GenerationRequest("x", steps=5, batch_size=3), "at most 2 images"),
                           (GenerationRequest("x", steps=5, sampler="nope"), "unknown sampler"),
                           (GenerationRequest("x", steps=5, width=12345678, height=8), "pixels")):
        with pytest.raises(BadRequest, match=words):
            check_request(request, limits)
    assert check_request(GenerationRequest("x", steps=5, width=64, height=64), limits).width == 64


@pytest.mark.parametrize("hires", [dict(hr_scale=4.0), dict(hr_width=256), dict(hr_height=256),
                                   dict(hr_width=256, hr_height=256), dict(hr_width=256, hr_height=64)],
                         ids=["scale", "width-alone", "height-alone", "both", "both-wide"])
def test_the_pixel_limit_holds_for_the_hires_pass_however_its_size_is_asked(hires):
    """One hires side alone keeps the aspect ratio (256 wide from 64 x 64: 256 x 256); two sides upscale to
    cover both, then crop (256 x 64 from 64 x 64: 256 x 256, then cropped)."""
    limits = Limits(max_pixels=128 * 128)
    with pytest.raises(BadRequest, match="hires pass at 256x256 is 65536 pixels") as err:
        check_request(GenerationRequest("x", steps=2, width=64, height=64, **hires), limits)
    assert err.value.status == 413
    model = SimpleNamespace(default_size=64, vae_config=SimpleNamespace(downsample_factor=8),
                            unet_config=SimpleNamespace(time_cond_proj_dim=None), text_encoders=(),
                            family=SimpleNamespace(text_encoders=(), is_sdxl=False))   # no encoder: no clip skip to check
    with pytest.raises(BadRequest, match="hires pass at 256x256"):      # the size left to the model
        check_request(GenerationRequest("x", steps=2, **hires), limits, model=model)
    assert check_request(GenerationRequest("x", steps=2, width=64, height=64, hr_width=128), limits).hr_width == 128


def test_the_hires_pixel_limit_uses_the_sizes_the_model_snaps_to():
    """A1111 upscales from the size asked (72 x 60 to 128 wide: 128 x 106), which a VAE of factor 16 snaps to
    128 x 96 and one of factor 8 to 128 x 104."""
    limits = Limits(max_pixels=128 * 100)
    request = GenerationRequest("x", steps=2, width=72, height=60, hr_width=128)
    with pytest.raises(BadRequest, match="hires pass at 128x104"):          # no model yet: released models' 8
        check_request(request, limits)
    model = SimpleNamespace(default_size=64, vae_config=SimpleNamespace(downsample_factor=16),
                            unet_config=SimpleNamespace(time_cond_proj_dim=None), text_encoders=(), unet=None,
                            family=SimpleNamespace(is_edit=False), runs_uncond=lambda cfg_scale, cfg_pp=False: True)
    assert check_request(request, limits, model=model) is request


def test_a1111_hires_fix_without_a_denoising_strength_takes_a1111s_api_default():
    """A1111's API model takes StableDiffusionProcessingTxt2Img's field default, 0.75 (0.7 is its UI's)."""
    from sdlab.server.a1111 import Txt2ImgIn, _request

    assert _request(Txt2ImgIn(prompt="x", enable_hr=True)).hr_denoise == 0.75
    assert _request(Txt2ImgIn(prompt="x", enable_hr=True, denoising_strength=0.4)).hr_denoise == 0.4


@pytest.mark.parametrize("restore", [True, False])
@pytest.mark.parametrize("override, named", [
    ({"CLIP_stop_at_last_layers": 0}, "override_settings.CLIP_stop_at_last_layers must be an integer >= 1, got 0"),
    ({"CLIP_stop_at_last_layers": "2"}, "override_settings.CLIP_stop_at_last_layers must be an integer >= 1"),
    ({"CLIP_stop_at_last_layers": 1.5}, "override_settings.CLIP_stop_at_last_layers must be an integer >= 1"),
    ({"eta_noise_seed_delta": -1}, "override_settings.eta_noise_seed_delta must be an integer in 0.."),
    ({"tiling": "yes"}, "override_settings.tiling must be true or false"),
])
def test_override_settings_have_one_check_whatever_restore_afterwards_says(override, named, restore):
    """A1111's override_settings are checked by `POST options`' rules for every request (a 422 naming the
    field as sent), not by those rules with `override_settings_restore_afterwards: false` and by the
    request's own (a 400 about "clip skip") with the default true."""
    from sdlab.server.a1111 import Txt2ImgIn, _request

    body = Txt2ImgIn(prompt="x", override_settings=override, override_settings_restore_afterwards=restore)
    with pytest.raises(BadRequest) as refused:
        _request(body)
    assert refused.value.status == 422 and str(refused.value).startswith(named), str(refused.value)
