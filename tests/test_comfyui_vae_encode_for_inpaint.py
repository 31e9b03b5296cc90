"""ComfyUI's VAEEncodeForInpaint: sdlab's inpainting with `inpaint_fill="grey"`, `mask_grow` and a ComfyUI-spelt
sampler draws ComfyUI's VAEEncodeForInpaint -> KSampler, for a 4-channel model and a 9-channel inpainting model.

The reference is ComfyUI's code, transcribed below (comfyanonymous/ComfyUI, nodes.py ``VAEEncodeForInpaint.encode``
at e60e19b; comfy/model_base.py ``BaseModel.concat_cond``; comfy/samplers.py ``KSamplerX0Inpaint`` and
comfy/sampler_helpers.py ``prepare_mask`` in test_comfyui_conventions.py). The grown mask is compared exactly; the
latents in float32 at 1e-5 (test_comfyui_conventions.py's `assert_same_latents`; for the random 9-channel model, whose
latents reach ~65, 1e-5 of the largest), its extra input channels at 1e-6. Through the API: the graph's node_errors, and a server's VAEEncodeForInpaint graph drawing the
native job of the same options pixel for pixel.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from PIL import Image

from bundle_fixtures import init_picture, tiny_bundle
from test_comfyui_conventions import (SEED, KSamplerX0Inpaint, assert_same_latents, comfyui_noise_mask_picture,
                                      eps_noise_scaling, max_denoise, prepare_mask, prepare_noise, replayed,
                                      sample_euler, sample_euler_ancestral, sdlab_run, tiny)
from sdlab.api import Pipeline
from sdlab.pipeline import generate as G
from sdlab.pipeline.images import comfyui_grown_mask
from sdlab.pipeline.request import GenerationRequest, RequestError

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
__all__ = ["tiny"]                                   # the module fixture, shared


# -- ComfyUI, transcribed ----------------------------------------------------------------------------------------
def vae_encode_for_inpaint(encode, pixels, mask, grow_mask_by=6):
    """comfyanonymous/ComfyUI nodes.py ``VAEEncodeForInpaint.encode`` (e60e19b; vae.downscale_ratio 8), `encode`
    standing for ``vae.encode`` then the KSampler's ``process_latent_in``: pixels (B, H, W, 3) in [0, 1], mask
    (H, W) or (B, H, W) -> {samples, noise_mask}."""
    x = (pixels.shape[1] // 8) * 8
    y = (pixels.shape[2] // 8) * 8
    mask = torch.nn.functional.interpolate(mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1])),
                                           size=(pixels.shape[1], pixels.shape[2]), mode="bilinear")
    pixels = pixels.clone()
    if pixels.shape[1] != x or pixels.shape[2] != y:
        x_offset = (pixels.shape[1] % 8) // 2
        y_offset = (pixels.shape[2] % 8) // 2
        pixels = pixels[:, x_offset:x + x_offset, y_offset:y + y_offset, :]
        mask = mask[:, :, x_offset:x + x_offset, y_offset:y + y_offset]
    if grow_mask_by == 0:
        mask_erosion = mask
    else:
        kernel_tensor = torch.ones((1, 1, grow_mask_by, grow_mask_by))
        padding = math.ceil((grow_mask_by - 1) / 2)
        mask_erosion = torch.clamp(torch.nn.functional.conv2d(mask.round(), kernel_tensor, padding=padding), 0, 1)
    m = (1.0 - mask.round()).squeeze(1)
    for i in range(3):
        pixels[:, :, :, i] -= 0.5
        pixels[:, :, :, i] *= m
        pixels[:, :, :, i] += 0.5
    t = encode(pixels)
    return {"samples": t, "noise_mask": (mask_erosion[:, :, :x, :y].round())}


def concat_cond(noise, latent_image, denoise_mask):
    """comfy/model_base.py ``BaseModel.concat_cond`` for concat_keys ("mask", "masked_image") with no
    concat_latent_image / concat_mask in the conditioning (a VAEEncodeForInpaint graph): the KSampler's prepared
    noise mask, rounded, then its latent_image."""
    concat_latent_image = latent_image
    if concat_latent_image.shape[1:] != noise.shape[1:]:
        raise AssertionError("the latent is the noise's size here")
    if len(denoise_mask.shape) == len(noise.shape):
        denoise_mask = denoise_mask[:, :1]
    denoise_mask = denoise_mask.reshape((-1, 1, denoise_mask.shape[-2], denoise_mask.shape[-1]))
    denoise_mask = denoise_mask.round()
    return torch.cat([denoise_mask, concat_latent_image], dim=1)


# -- the grown mask ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grow", [0, 1, 2, 3, 6, 7, 64])
def test_the_grown_mask_is_vae_encode_for_inpaints(grow):
    """`images.comfyui_grown_mask` is the noise mask VAEEncodeForInpaint puts on its latent (an odd and an even
    box: the even one grows one pixel more up and left), on soft masks whose levels round both ways."""
    generator = torch.Generator().manual_seed(grow)
    for height, width in ((64, 64), (40, 72)):
        mask = (torch.rand((height // 8, width // 8), generator=generator) > 0.7).float()
        mask = torch.nn.functional.interpolate(mask[None, None], size=(height, width), mode="bilinear")[0, 0]
        mask = mask * torch.rand((height, width), generator=generator).add(0.5).clamp(max=1)      # soft levels
        reference = vae_encode_for_inpaint(lambda p: p, torch.zeros((1, height, width, 3)), mask, grow)
        ours = comfyui_grown_mask(mask[None, None], grow)
        assert ours.shape == (1, 1, height, width)
        assert torch.equal(ours, reference["noise_mask"])
        assert ours.sum() >= mask.round().sum()


# -- whole runs on tiny models -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_inpainting():
    return Pipeline(tiny_bundle("sd1-inpaint", seed=3))            # a 9-channel U-Net, random weights


def comfyui_pixels(picture: Image.Image) -> torch.Tensor:
    """LoadImage's IMAGE of an RGB picture: (1, H, W, 3) in [0, 1]."""
    return torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0)[None]


def _encoder(bundle):
    """ComfyUI's vae.encode of (B, H, W, 3) in [0, 1] (its ``process_input``: 2x - 1), scaled to the model's latent
    space as the KSampler scales it: sdlab's `encode_image` (its posterior mean, sdlab's rule for ComfyUI)."""
    return lambda pixels: G.encode_image(bundle, pixels.movedim(-1, 1) * 2.0 - 1.0)


@pytest.fixture
def caught(monkeypatch) -> dict[str, list]:
    """What an inpaint run hands the pieces ComfyUI's KSampler has, in order: the guided models `G.masked` wraps
    ("inner"), a 9-channel model's extra input channels ("concats") and the latents `G._keep_known` blends
    ("kept")."""
    caught: dict[str, list] = {"inner": [], "concats": [], "kept": []}
    real_masked, real_extra, real_keep_known = G.masked, G._inpaint_extra, G._keep_known
    monkeypatch.setattr(G, "masked",
                        lambda inner, *a, **k: caught["inner"].append(inner) or real_masked(inner, *a, **k))
    monkeypatch.setattr(G, "_inpaint_extra",
                        lambda *a: caught["concats"].append(real_extra(*a)) or caught["concats"][-1])
    monkeypatch.setattr(G, "_keep_known",
                        lambda *a: caught["kept"].append(real_keep_known(*a)) or caught["kept"][-1])
    return caught


def ksampler_inpaint(bundle, run: dict, inner, latent, noise, denoise_mask, sampler: str) -> torch.Tensor:
    """ComfyUI's KSampler on an inpainting latent, driven by sdlab's guided model `inner` and `run`'s sigmas: its
    start x (eps_noise_scaling of the latent; sdlab's run starts there, within 1e-5), then k-diffusion's `sampler`
    (euler, or euler_ancestral replaying the run's noise draws) on KSamplerX0Inpaint's blend with `denoise_mask`:
    the final latent."""
    sigmas = run["sigmas"]
    x = eps_noise_scaling(sigmas[0], noise, latent.clone(), max_denoise(bundle.model_sampling.sigma_max, sigmas))
    torch.testing.assert_close(run["x"], x, rtol=1e-5, atol=1e-5)
    model_k = KSamplerX0Inpaint(inner, latent, noise, denoise_mask)
    if sampler == "euler":
        return sample_euler(model_k, x, sigmas)
    return sample_euler_ancestral(model_k, x, sigmas, noise_sampler=replayed(run["draws"]))


@pytest.mark.parametrize("model, grow, sampler, schedule, denoise", [
    ("plain", 6, "euler", "karras", 1.0),
    ("plain", 3, "euler_ancestral", "normal", 0.8),
    ("inpainting", 6, "euler", "karras", 1.0),
    ("inpainting", 0, "euler_ancestral", "normal", 1.0),
])
def test_vae_encode_for_inpaint_on_tiny_models(monkeypatch, caught, tiny, tiny_inpainting, model, grow, sampler,
                                               schedule, denoise):
    """inpaint_fill "grey", mask_grow and mask_round on a ComfyUI-spelt sampler is VAEEncodeForInpaint -> KSampler:
    the KSampler starts from (and KSamplerX0Inpaint keeps) the latent of the picture greyed under the rounded mask,
    its noise mask the grown mask resized bilinearly; a 9-channel model's extra channels are that noise mask rounded
    and that same latent (concat_cond). The soft mask picture has an edge off the latent grid and a band below 1/2."""
    pipe = tiny if model == "plain" else tiny_inpainting
    bundle = pipe.bundle
    inner_models, concats, kept = caught["inner"], caught["concats"], caught["kept"]
    init = init_picture(64)
    mask_picture, mask = comfyui_noise_mask_picture(64)
    run = sdlab_run(monkeypatch, pipe, "inpaint", init, mask_picture, sampler=sampler, schedule=schedule, steps=10,
                    strength=denoise, inpaint_fill="grey", mask_grow=grow, mask_round=True, paste_back=False)
    encoded = vae_encode_for_inpaint(_encoder(bundle), comfyui_pixels(init), mask, grow)
    latent = encoded["samples"]                                                          # (1, 4, h, w)
    denoise_mask = prepare_mask(encoded["noise_mask"], latent.shape)                     # (1, 4, h, w)
    assert ((denoise_mask > 0) & (denoise_mask < 1)).any(), "a mask on the latent grid would not tell the rules apart"
    noise = prepare_noise(latent, SEED)
    if model == "inpainting":
        assert len(concats) == 1
        torch.testing.assert_close(concats[0], concat_cond(noise, latent, denoise_mask), rtol=1e-6, atol=1e-6)
    else:
        assert not concats
    reference = ksampler_inpaint(bundle, run, inner_models[-1], latent, noise, denoise_mask, sampler)
    if model == "plain":
        assert_same_latents(kept[-1], reference)
    else:                   # the random 9-channel U-Net's latents reach ~65: float32 rounding of 1e-5 of that
        torch.testing.assert_close(kept[-1], reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))


@pytest.mark.parametrize("sampler, schedule, denoise", [("euler", "karras", 1.0), ("euler_ancestral", "normal", 0.7)])
def test_set_latent_noise_mask_on_a_9_channel_model(monkeypatch, caught, tiny_inpainting, sampler, schedule,
                                                     denoise):
    """A 9-channel inpainting model under ComfyUI's convention (a ComfyUI-spelt sampler, mask_round off, no paste
    back) is VAEEncode -> SetLatentNoiseMask -> KSampler: its extra channels are concat_cond's, the KSampler's soft
    noise mask (prepare_mask: bilinear to the latent) rounded and the picture's own latent, not greyed; every model
    call blended by KSamplerX0Inpaint with the soft mask. Latents at 1e-5 relative and 1e-5 of the largest latent
    absolute (the random U-Net's reach ~65), the channels at 1e-6."""
    bundle = tiny_inpainting.bundle
    inner_models, concats, kept = caught["inner"], caught["concats"], caught["kept"]
    init = init_picture(64)
    mask_picture, mask = comfyui_noise_mask_picture(64)
    run = sdlab_run(monkeypatch, tiny_inpainting, "inpaint", init, mask_picture, sampler=sampler, schedule=schedule,
                    steps=10, strength=denoise, mask_round=False, paste_back=False)
    latent = _encoder(bundle)(comfyui_pixels(init))                                      # VAEEncode, (1, 4, h, w)
    denoise_mask = prepare_mask(mask[None, None], latent.shape)                          # SetLatentNoiseMask's, soft
    assert ((denoise_mask > 0) & (denoise_mask < 1)).any(), "a mask on the latent grid would not tell the rules apart"
    noise = prepare_noise(latent, SEED)
    assert len(concats) == 1
    torch.testing.assert_close(concats[0], concat_cond(noise, latent, denoise_mask), rtol=1e-6, atol=1e-6)
    reference = ksampler_inpaint(bundle, run, inner_models[-1], latent, noise, denoise_mask, sampler)
    assert reference.abs().max() > 0.1
    assert kept, "KSamplerX0Inpaint blends a 9-channel model's latent too (the kept cells the picture's latent)"
    torch.testing.assert_close(kept[-1], reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))


def test_mask_grow_needs_comfyuis_convention_and_a_box_comfyui_takes(tiny):
    mask_picture, _ = comfyui_noise_mask_picture(64)
    with pytest.raises(RequestError, match="comfyui img2img convention"):
        tiny.inpaint("x", init_picture(64), mask_picture, sampler="Euler", steps=2, mask_grow=6)
    with pytest.raises(RequestError, match="0..64"):
        tiny.resolve(GenerationRequest("x", sampler="euler", steps=2, mask_grow=65, init_image=init_picture(64),
                                       mask_image=mask_picture))
    with pytest.raises(RequestError, match="grey"):
        tiny.resolve(GenerationRequest("x", sampler="euler", steps=2, inpaint_fill="gray",
                                       init_image=init_picture(64), mask_image=mask_picture))


def test_mask_grow_without_a_mask_is_ignored_as_a1111s_inpainting_fields_are(tiny):
    """A txt2img or img2img job with a leftover mask_grow draws as without it, under any convention, and records
    no Mask grow: A1111's own inpainting-only fields (mask_blur, inpainting_fill, inpaint_full_res) are taken
    and left unused without a mask (modules/processing.py StableDiffusionProcessingImg2Img.init reads them only
    under ``if image_mask is not None``), as sdlab's mask_blur and inpaint_fill are."""
    from sdlab.pipeline.infotext import to_parameters
    for mode, args in (("txt2img", ()), ("img2img", (init_picture(64), 0.6))):
        plain = getattr(tiny, mode)("x", *args, sampler="Euler", steps=2, seed=3)
        grown = getattr(tiny, mode)("x", *args, sampler="Euler", steps=2, seed=3, mask_grow=6)
        assert np.array_equal(np.asarray(grown.images[0]), np.asarray(plain.images[0]))
        assert "Mask grow" not in to_parameters(grown.request)


def test_grey_and_mask_grow_through_the_cli_are_recorded_and_redrawn_from_png(tmp_path, capsys):
    """`sdlab inpaint --masked-content grey --mask-grow N` with a ComfyUI-spelt sampler records "Masked content:
    grey, Mask grow: N" and --from-png redraws the picture; without the grow the picture differs."""
    from cli_helpers import pixels, run
    from sdlab.pipeline.png_info import read_parameters
    from bundle_fixtures import write_original

    model = tmp_path / "tiny-sd1.safetensors"
    write_original(tiny_bundle("sd1"), model, junk=False)
    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    init_picture(64).save(init)
    comfyui_noise_mask_picture(64)[0].save(mask)
    common = ["--init", str(init), "--mask", str(mask), "--model", str(model), "--steps", "2", "--seed", "3",
              "--sampler", "euler", "--no-progress"]
    grown, again, plain = (tmp_path / f"{name}.png" for name in ("grown", "again", "plain"))
    code, _, err = run(["inpaint", "a hat", *common, "--masked-content", "grey", "--mask-grow", "5", "--out",
                        str(grown)], capsys)
    assert code == 0, err
    assert "Masked content: grey" in read_parameters(grown) and "Mask grow: 5" in read_parameters(grown)
    code, _, err = run(["inpaint", "--from-png", str(grown), *common, "--out", str(again)], capsys)
    assert code == 0, err
    assert np.array_equal(pixels(again), pixels(grown))
    code, _, err = run(["inpaint", "a hat", *common, "--masked-content", "grey", "--out", str(plain)], capsys)
    assert code == 0, err
    assert "Mask grow" not in read_parameters(plain) and not np.array_equal(pixels(plain), pixels(grown))
    code, _, err = run(["inpaint", "a hat", *common[:-3], "--sampler", "Euler", "--no-progress", "--mask-grow", "5",
                        "--out", str(tmp_path / "bad.png")], capsys)
    assert code != 0 and "comfyui img2img convention" in err and "Traceback" not in err


# -- the ComfyUI API -------------------------------------------------------------------------------------------------
from test_server_comfy_api import (  # noqa: E402
    NATIVE, drawn, graph, native_pixels, server, upload, upload_holed, viewed,
)

__all__ += ["server"]


def _inpaint_graph(grow: int = 6) -> dict:
    prompt = graph(**{"3.latent_image": ["12", 0]})
    prompt["11"] = {"class_type": "LoadImage", "inputs": {"image": "holed-vefi.png"}}
    prompt["12"] = {"class_type": "VAEEncodeForInpaint",
                    "inputs": {"pixels": ["11", 0], "vae": ["4", 2], "mask": ["11", 1], "grow_mask_by": grow}}
    del prompt["5"]
    return prompt


@pytest.fixture()
def holed(server) -> tuple[np.ndarray, np.ndarray]:
    """(RGB, alpha) of the input picture holed-vefi.png, uploaded: a transparent rectangle off the 8-pixel grid and a
    band of alpha 100."""
    return upload_holed(server, "holed-vefi.png", seed=11)


def test_vae_encode_for_inpaint_graph_draws_the_native_grey_grown_job(server, holed):
    """LoadImage -> VAEEncodeForInpaint (LoadImage's MASK) -> KSampler is the native inpaint job of the mask
    255 - alpha with masked content grey, mask_grow grow_mask_by, ComfyUI's sampler spelling: inside the mask the
    pictures are one (the native job pastes the original back outside it, ComfyUI does not)."""
    rgb, alpha = holed
    prompt = _inpaint_graph(6)
    messages, entry = drawn(server, prompt)
    assert [d["node"] for k, d in messages if k == "executing"][:-1].count("12") == 1
    pixels = viewed(server, entry["outputs"]["9"]["images"][0])
    native = native_pixels(server, {**NATIVE, "mode": "inpaint", "init_image": b64_png(Image.fromarray(rgb)),
                                    "mask_image": b64_png(Image.fromarray(255 - alpha)), "strength": 1.0,
                                    "inpaint_fill": "grey", "mask_grow": 6})
    inside = (slice(13, 45), slice(21, 50))
    assert np.array_equal(pixels[inside], native[inside])
    set_latent = native_pixels(server, {**NATIVE, "mode": "inpaint", "init_image": b64_png(Image.fromarray(rgb)),
                                        "mask_image": b64_png(Image.fromarray(255 - alpha)), "strength": 1.0,
                                        "mask_round": False})
    assert not np.array_equal(pixels[inside], set_latent[inside])      # not SetLatentNoiseMask's picture


def _off_grid_upload(server, name: str, size: tuple[int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(RGB, alpha) of an RGBA input picture of `size` (w, h) off the 8-pixel grid, uploaded as `name`: a
    transparent rectangle, a band of alpha 100 and levels 127 / 128 at the rounding's edge."""
    width, height = size
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    alpha = np.full((height, width), 255, dtype=np.uint8)
    alpha[height // 5:height * 2 // 3, width // 3:width * 3 // 4] = 0
    alpha[height * 3 // 4:height * 7 // 8, 2:width // 2] = 100
    alpha[1:4, 1:5], alpha[height // 2:height // 2 + 3, width - 6:width - 1] = 127, 128
    upload(server, name, Image.fromarray(np.dstack([rgb, alpha]), "RGBA"))
    return rgb, alpha


@pytest.mark.parametrize("mask_size", [(70, 67), (29, 41)])
def test_a_picture_off_the_8_pixel_grid_is_cropped_with_its_mask_as_comfyui_crops_them(server, mask_size):
    """A 70 x 67 LoadImage into VAEEncodeForInpaint, its MASK its own alpha or another picture's (29 x 41, resized
    bilinearly to the pixels): ComfyUI crops pixels and mask by the same offsets to 64 x 64 and rounds the mask.
    sdlab's mask (`images.comfyui_encoded_mask`) is the transcribed encode's exactly, and the graph draws the
    native job of the transcribed crop's pixels and mask pixel for pixel inside the mask."""
    from sdlab.pipeline.images import comfyui_encoded_mask

    rgb, alpha = _off_grid_upload(server, "off-grid.png", (70, 67), seed=5)
    prompt = _inpaint_graph(6)
    prompt["11"]["inputs"]["image"] = "off-grid.png"
    if mask_size != (70, 67):
        _, alpha = _off_grid_upload(server, "off-grid-mask.png", mask_size, seed=6)
        prompt["13"] = {"class_type": "LoadImage", "inputs": {"image": "off-grid-mask.png"}}
        prompt["12"]["inputs"]["mask"] = ["13", 1]
    comfy_mask = 1.0 - torch.from_numpy(alpha.astype(np.float32) / 255.0)             # LoadImage's MASK
    reference = vae_encode_for_inpaint(lambda pixels: pixels, comfyui_pixels(Image.fromarray(rgb)), comfy_mask, 0)
    rounded = reference["noise_mask"][0, 0]                                            # (64, 64), the crop rounded
    assert rounded.shape == (64, 64) and 0 < rounded.sum() < 64 * 64
    ours = comfyui_encoded_mask(comfy_mask.numpy(), (70, 67), (3, 1, 67, 65))
    assert torch.equal(torch.from_numpy(np.asarray(ours) / 255.0).float(), rounded)
    messages, entry = drawn(server, prompt)
    pixels = viewed(server, entry["outputs"]["9"]["images"][0])
    assert pixels.shape == (64, 64, 3)
    cropped = rgb[1:65, 3:67]                                                          # ComfyUI's offsets
    kept = rounded == 0                                                                # not greyed: (x - .5) + .5
    torch.testing.assert_close(reference["samples"][0][kept], comfyui_pixels(Image.fromarray(cropped))[0][kept],
                               rtol=0, atol=1e-7)
    native = native_pixels(server, {**NATIVE, "mode": "inpaint", "init_image": b64_png(Image.fromarray(cropped)),
                                    "mask_image": b64_png(Image.fromarray((rounded.numpy() * 255).astype(np.uint8))),
                                    "strength": 1.0, "inpaint_fill": "grey", "mask_grow": 6})
    inside = rounded.numpy() == 1
    assert np.array_equal(pixels[inside], native[inside])


def test_a_script_job_refuses_grey_and_mask_grow_alike(server, holed):
    """A native inpaint job with a script (Loopback) draws A1111's request, which has neither ComfyUI option:
    inpaint_fill "grey" and mask_grow are each refused with the same 422, before anything is drawn."""
    rgb, alpha = holed
    body = {**NATIVE, "mode": "inpaint", "init_image": b64_png(Image.fromarray(rgb)),
            "mask_image": b64_png(Image.fromarray(255 - alpha)), "strength": 1.0, "script_name": "Loopback",
            "script_args": [2, 0.5]}
    for options in ({"inpaint_fill": "grey"}, {"mask_grow": 6}, {"inpaint_fill": "grey", "mask_grow": 6}):
        answer = server.post("/api/jobs", json={**body, **options})
        assert answer.status_code == 422, answer.text
        assert "inpaint_fill 'grey' and mask_grow are ComfyUI's VAEEncodeForInpaint options" in answer.text
        assert "Traceback" not in answer.text


def b64_png(image: Image.Image) -> str:
    from server_fixtures import b64_png as encoded
    return encoded(image)


@pytest.mark.parametrize("change, where, message", [
    (lambda g: g["12"]["inputs"].update(grow_mask_by=65), "12", "Value 65 bigger than max of 64"),
    (lambda g: g.update({"20": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64,
                                                                              "batch_size": 1}},
                         "21": {"class_type": "VAEDecode", "inputs": {"samples": ["20", 0], "vae": ["4", 2]}}})
     or g["12"]["inputs"].update(pixels=["21", 0]), "12",
     "sdlab does not draw a second KSampler from a decoded"),
    (lambda g: g.update({"13": {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["12", 0],
                                                                               "mask": ["11", 1]}}})
     or g["3"]["inputs"].update(latent_image=["13", 0]), "13", "sdlab sets the noise mask of a VAEEncode's latent"),
    (lambda g: g["12"]["inputs"].update(mask=["11", 0]), "12", "return_type_mismatch"),
])
def test_graphs_sdlab_does_not_draw_get_comfyuis_node_errors(server, holed, change, where, message):
    """A VAEEncodeForInpaint graph ComfyUI refuses, or one sdlab does not draw (its picture decoded from a
    KSampler, its latent given a second noise mask), answers a 400 with ComfyUI's node_errors on the node."""
    prompt = copy.deepcopy(_inpaint_graph())
    change(prompt)
    answer = server.post("/prompt", json={"prompt": prompt})
    assert answer.status_code == 400
    body = answer.json()
    assert set(body["node_errors"]) == {where}
    error = body["node_errors"][where]
    assert set(error) == {"errors", "dependent_outputs", "class_type"} and error["dependent_outputs"] == ["9"]
    assert message in str(error["errors"])


def test_object_info_lists_vae_encode_for_inpaint(server):
    info = server.get("/object_info/VAEEncodeForInpaint").json()["VAEEncodeForInpaint"]
    assert info["input"]["required"]["grow_mask_by"] == ["INT", {"default": 6, "min": 0, "max": 64, "step": 1}]
    assert (info["output"], info["category"]) == (["LATENT"], "latent/inpaint")


# -- the web UI ------------------------------------------------------------------------------------------------------
from test_webui import (  # noqa: E402  (fixtures: base_url, browser, page; the session's sdlab_server)
    base_url, browser, drop_file, page, png_with_parameters, sdlab_server, text, value, wait,
)

__all__ += ["base_url", "browser", "page", "sdlab_server"]
GREY_PICTURE = ("a hat\nSteps: 2, Sampler: Euler, Schedule type: Karras, CFG scale: 5, Seed: 3, Size: 64x64, "
                "ENSD: 1, Initial noise: comfyui, Img2img steps: comfyui, Denoising strength: 1, "
                "Masked content: grey, Mask grow: 5, Version: sdlab 0.1.0")


def test_a_dropped_picture_keeps_its_grey_masked_content_and_mask_grow(page):
    """In real chromium: a dropped picture's Masked content grey is the form's choice, its Mask grow (no control:
    ComfyUI's VAEEncodeForInpaint option) is kept and sent with the form's requests."""
    drop_file(page, png_with_parameters(GREY_PICTURE), "grey.png")
    wait(page, lambda d: text(d, "notice") == "Settings read from grey.png", 20, "the PNG was not read cleanly")
    assert value(page, "inpaint_fill") == "grey"
    assert page.execute_script("return keptRequest()")["mask_grow"] == 5


def test_a_kept_mask_grow_goes_with_the_sampler_as_comfyuis_convention_does(page):
    """In real chromium: choosing another sampler lets the dropped picture's Mask grow go with its Img2img steps
    (comfyui), which the grow needs: kept, every later job of an A1111 sampler's would be refused."""
    drop_file(page, png_with_parameters(GREY_PICTURE), "grey.png")
    wait(page, lambda d: text(d, "notice") == "Settings read from grey.png", 20, "the PNG was not read cleanly")
    kept = page.execute_script("return keptRequest()")
    assert (kept["mask_grow"], kept["img2img_convention"]) == (5, "comfyui")
    page.execute_script("const s = document.getElementById('sampler'); s.value = 'DPM++ 2M';"
                        "s.dispatchEvent(new Event('change'));")
    kept = page.execute_script("return keptRequest()")
    assert "mask_grow" not in kept and "img2img_convention" not in kept


def test_a_ksampler_fed_straight_by_another_is_refused_with_comfyuis_node_errors(server):
    """A KSampler fed straight by another's latent (no LatentUpscale(By) between: ComfyUI's two-pass hires graph,
    drawn since, is tests/test_server_comfy_hires.py's) is an unsupported_graph on the first KSampler, where the
    graph leaves the one chain sdlab draws."""
    prompt = graph()
    prompt["11"] = {"class_type": "KSampler", "inputs": {**prompt["3"]["inputs"], "latent_image": ["3", 0],
                                                         "denoise": 0.5, "seed": 7}}
    prompt["8"]["inputs"]["samples"] = ["11", 0]
    body = server.post("/prompt", json={"prompt": prompt}).json()
    assert set(body["node_errors"]) == {"3"}                   # where the graph leaves the chain sdlab draws
    error = body["node_errors"]["3"]["errors"][0]
    assert error["type"] == "unsupported_graph" and "EmptyLatentImage" in error["message"]
