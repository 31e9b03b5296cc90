"""IP-Adapter parity: sdlab's generate loop with `ip_adapters=` gives the pictures of diffusers'
StableDiffusionPipeline / StableDiffusionXLPipeline after `load_ip_adapter` with `ip_adapter_image`, on the same
random weights (U-Net, text encoders, VAE, a reduced-width CLIP image encoder, the adapter file), seed and
settings, within `MAX_PIXEL_DIFF` / 255 per pixel. The adapter is written in h94's two layouts (.safetensors with
`image_proj.` / `ip_adapter.` prefixes, and the .bin pickle); each side reads the file itself. Also: the decoupled
attention's unconditional rows (zero image embeddings), scale 0, ControlNet + IP-Adapter, and bad input."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from transformers import CLIPImageProcessor

import sdlab
from bundle_fixtures import as_released, tiny_bundle, write_diffusers_folder
from ip_adapter_fixtures import SAMPLE_PICTURE, ip_adapter_state, write_image_encoder, write_ip_adapter
from picture_parity import CFG, MAX_PIXEL_DIFF, PROMPT, SEED, SIZE, STEPS, max_pixel_diff
from PIL import Image
from sdlab.models.ip_adapter import cross_attentions
from sdlab.pipeline.image_prompt import IPAdapterInput
from sdlab.pipeline.request import RequestError

NEGATIVE = "blurry"
EULER = dict(sampler="Euler", schedule="leading", init_noise="vp")
EMBED = 32                                   # the reduced image encoder's projection width

pytestmark = pytest.mark.usefixtures("one_thread")


def _picture() -> Image.Image:
    return Image.open(SAMPLE_PICTURE).convert("RGB").crop((10, 0, 250, 180))


def _family(tmp_path_factory, name: str, pipeline_class, seed: int):
    bundle = tiny_bundle(name, seed=seed)
    root = tmp_path_factory.mktemp(name)
    folder = as_released(write_diffusers_folder(bundle, root / "pipe"), SIZE // 2)
    models = root / "models"
    encoder = write_image_encoder(models / "image_encoder", seed=seed + 1, projection=EMBED)
    ours = sdlab.load(folder)
    widths = [attn.to_q.weight.shape[0] for attn in cross_attentions(ours.bundle.unet)]
    state = ip_adapter_state(widths, ours.bundle.unet_config.context_dim, EMBED, seed=seed + 2)
    base = pipeline_class.from_pretrained(folder, local_files_only=True)
    return ours, base, encoder, models, state


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return _family(tmp_path_factory, "sd1", StableDiffusionPipeline, 11)


def _reference(base, pipeline_class, encoder, models, weight_name: str, scale: float, batch: int, **call):
    pipe = pipeline_class(**{**base.components, "image_encoder": encoder, "feature_extractor": CLIPImageProcessor()})
    pipe.scheduler = EulerDiscreteScheduler.from_config(base.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(str(models), subfolder="", weight_name=weight_name, image_encoder_folder=None)
    pipe.set_ip_adapter_scale(scale)
    generators = [torch.Generator().manual_seed(SEED + i) for i in range(batch)]
    return pipe(PROMPT, negative_prompt=NEGATIVE, ip_adapter_image=_picture(), num_inference_steps=STEPS,
                guidance_scale=CFG, width=SIZE, height=SIZE, num_images_per_prompt=batch, generator=generators,
                output_type="np", **call).images


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_sd1_pictures_match_diffusers(sd1, suffix):
    ours, base, encoder, models, state = sd1
    path = write_ip_adapter(models / f"ip-adapter_tiny{suffix}", state)
    reference = _reference(base, StableDiffusionPipeline, encoder, models, path.name, 0.7, batch=2)
    options = dict(steps=STEPS, cfg_scale=CFG, seed=SEED, width=SIZE, height=SIZE, batch_size=2, **EULER)
    plain = ours.txt2img(PROMPT, NEGATIVE, **options)
    result = ours.txt2img(PROMPT, NEGATIVE, ip_adapters=[IPAdapterInput(path, _picture(), 0.7)], **options)
    assert max_pixel_diff(plain.images, reference) > 5 * MAX_PIXEL_DIFF      # the adapter changes the picture
    assert max_pixel_diff(result.images, reference) <= MAX_PIXEL_DIFF


def test_scale_zero_draws_the_plain_picture(sd1):
    ours, _, _, models, state = sd1
    path = write_ip_adapter(models / "zero.safetensors", state)
    options = dict(steps=2, cfg_scale=CFG, seed=SEED, width=SIZE, height=SIZE, **EULER)
    plain = ours.txt2img(PROMPT, NEGATIVE, **options)
    result = ours.txt2img(PROMPT, NEGATIVE, ip_adapters=[IPAdapterInput(path, _picture(), 0.0)], **options)
    assert max_pixel_diff(result.images, plain.images) == 0


def test_bad_input_is_one_line(sd1, tmp_path):
    ours, _, _, models, state = sd1
    path = write_ip_adapter(models / "ok.safetensors", state)
    options = dict(steps=1, width=SIZE, height=SIZE)
    cases = [
        (IPAdapterInput(tmp_path / "nothere.safetensors", _picture()), "does not exist"),
        (IPAdapterInput(path, tmp_path / "nothere.png"), "image .* does not exist"),
        (IPAdapterInput(path, _picture(), scale=-1), "scale must be a number"),
        (IPAdapterInput(path, _picture(), image_encoder=tmp_path / "none"), "image encoder .* does not exist"),
    ]
    lone = tmp_path / "lone" / "ip.safetensors"
    lone.parent.mkdir()
    write_ip_adapter(lone, state)
    cases.append((IPAdapterInput(lone, _picture()), "no image encoder for the IP-Adapter"))
    wide = write_ip_adapter(models / "wide.safetensors", ip_adapter_state([64], 48, EMBED + 8))
    cases.append((IPAdapterInput(wide, _picture()), "IP-Adapter 0: .*48-wide text context"))
    other = dict(state, image_proj={**state["image_proj"], "proj.weight": torch.zeros(len(state["image_proj"]["proj.bias"]), 40)})
    mismatched = write_ip_adapter(models / "vith.safetensors", other)
    cases.append((IPAdapterInput(mismatched, _picture()),
                  "takes 40-wide image embeddings; the image encoder .* gives 32-wide ones"))
    from ip_adapter_fixtures import ip_adapter_plus_state

    widths = [attn.to_q.weight.shape[0] for attn in cross_attentions(ours.bundle.unet)]
    plus = write_ip_adapter(models / "plus-bigG.safetensors",
                            ip_adapter_plus_state(widths, ours.bundle.unet_config.context_dim, 1664))
    cases.append((IPAdapterInput(plus, _picture()), "Plus reads 1664-wide image encoder hidden states "
                  r"\(ViT-bigG/14\); the image encoder .* is 128 wide"))
    full = dict(state, image_proj={"proj.0.weight": torch.zeros(8, 8), **state["image_proj"]})
    cases.append((IPAdapterInput(write_ip_adapter(models / "full.safetensors", full), _picture()),
                  "an IP-Adapter FaceID without the projection sdlab knows"))
    for prompt, message in cases:
        with pytest.raises(RequestError, match=message):
            ours.txt2img(PROMPT, ip_adapters=[prompt], **options)


def test_sdxl_pictures_match_diffusers(tmp_path_factory):
    ours, base, encoder, models, state = _family(tmp_path_factory, "sdxl", StableDiffusionXLPipeline, 21)
    path = write_ip_adapter(models / "ip-adapter_tiny_sdxl.safetensors", state)
    reference = _reference(base, StableDiffusionXLPipeline, encoder, models, path.name, 0.6, batch=1)
    options = dict(steps=STEPS, cfg_scale=CFG, seed=SEED, width=SIZE, height=SIZE, **EULER)
    plain = ours.txt2img(PROMPT, NEGATIVE, **options)
    result = ours.txt2img(PROMPT, NEGATIVE, ip_adapters=[IPAdapterInput(path, _picture(), 0.6)], **options)
    assert max_pixel_diff(plain.images, reference) > 5 * MAX_PIXEL_DIFF
    assert max_pixel_diff(result.images, reference) <= MAX_PIXEL_DIFF


FAST = ["--steps", "3", "--width", "32", "--height", "32", "--no-progress", "--seed", "3"]


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    from bundle_fixtures import write_original

    folder = tmp_path_factory.mktemp("ip_cli")
    bundle = tiny_bundle("sd1")
    model = folder / "tiny-sd1.safetensors"
    write_original(bundle, model, junk=False)
    models = folder / "ipadapter"
    write_image_encoder(models / "image_encoder", seed=5, projection=EMBED)
    widths = [attn.to_q.weight.shape[0] for attn in cross_attentions(bundle.unet)]
    adapter = write_ip_adapter(models / "ip-adapter_tiny.safetensors",
                               ip_adapter_state(widths, bundle.unet_config.context_dim, EMBED, seed=6, std=0.3))
    picture = folder / "reference.png"
    _picture().save(picture)
    return {"model": model, "adapter": adapter, "picture": picture, "folder": folder}


def test_cli_draws_the_api_picture_records_it_and_redraws_from_png(cli_files, tmp_path, capsys):
    import numpy as np
    from cli_helpers import pixels, run
    from sdlab.pipeline.png_info import parse_parameters, read_parameters

    base = ["txt2img", "a red apple", "--model", str(cli_files["model"]), *FAST]
    plain, drawn, again = tmp_path / "plain.png", tmp_path / "ip.png", tmp_path / "again.png"
    assert run([*base, "--out", str(plain)], capsys)[0] == 0
    code, _, stderr = run([*base, "--ip-adapter", str(cli_files["adapter"]), "--ip-adapter-image",
                           str(cli_files["picture"]), "--ip-adapter-scale", "0.8", "--out", str(drawn)], capsys)
    assert code == 0, stderr
    assert np.abs(pixels(plain) - pixels(drawn)).max() > 10
    api = sdlab.load(cli_files["model"]).txt2img(
        "a red apple", steps=3, width=32, height=32, seed=3,
        ip_adapters=[IPAdapterInput(cli_files["adapter"], Image.open(cli_files["picture"]), 0.8)])
    assert np.abs(pixels(drawn) - np.asarray(api.images[0], dtype=np.int16)).max() == 0
    params = parse_parameters(read_parameters(drawn))
    assert params["IP-Adapter 0"].startswith("Model: ip-adapter_tiny [")
    assert params["IP-Adapter 0"].endswith("], Weight: 0.8")
    # --from-png: the Weight read back; without --ip-adapter the line is named in a warning
    code, _, stderr = run(["txt2img", "--model", str(cli_files["model"]), "--no-progress", "--from-png", str(drawn),
                           "--ip-adapter", str(cli_files["adapter"]), "--ip-adapter-image", str(cli_files["picture"]),
                           "--out", str(again)], capsys)
    assert code == 0, stderr
    assert np.abs(pixels(drawn) - pixels(again)).max() == 0
    code, _, stderr = run(["txt2img", "--model", str(cli_files["model"]), "--no-progress", "--from-png", str(drawn),
                           "--out", str(tmp_path / "without.png")], capsys)
    assert code == 0, stderr
    assert "the picture was drawn with IP-Adapter 0 (Model: ip-adapter_tiny [" in stderr


A1111_UNIT = ('ControlNet 0: "Module: ip-adapter_clip_sd15, Model: ip-adapter_tiny [{hash}], Weight: {weight}, '
              'Resize Mode: Crop and Resize, Low Vram: False, Processor Res: 512, Guidance Start: 0.0, '
              'Guidance End: 1.0, Pixel Perfect: False, Control Mode: Balanced"')
"""An IP-Adapter unit as A1111's ControlNet extension and Forge record it: an ordinary ControlNet unit line whose
Module is an ip-adapter preprocessor (sd-webui-controlnet's preprocessor table, tag "IP-Adapter")."""


def test_cli_from_png_reads_the_extensions_ip_adapter_unit(cli_files, tmp_path, capsys):
    """--from-png of a picture whose infotext records its IP-Adapter as the ControlNet extension writes it: the
    N-th --ip-adapter takes the unit's Weight (unless --ip-adapter-scale sets one), no --control is asked for it."""
    import numpy as np
    from cli_helpers import pixels, png_with_parameters, run
    from sdlab.checkpoints.controlnet import legacy_hash
    from sdlab.pipeline.png_info import read_parameters

    drawn = tmp_path / "ip.png"
    adapter = ["--ip-adapter", str(cli_files["adapter"]), "--ip-adapter-image", str(cli_files["picture"])]
    code, _, stderr = run(["txt2img", "a red apple", "--model", str(cli_files["model"]), *FAST, *adapter,
                           "--ip-adapter-scale", "0.4", "--out", str(drawn)], capsys)
    assert code == 0, stderr
    own = read_parameters(drawn)
    unit = A1111_UNIT.format(hash=legacy_hash(cli_files["adapter"]), weight=0.4)
    item = re.search(r'IP-Adapter 0: "[^"]*"', own).group(0)            # sdlab's line, the extension's instead
    a1111 = png_with_parameters(tmp_path / "a1111.png", own.replace(item, unit), size=(32, 32))
    again, scaled = tmp_path / "again.png", tmp_path / "scaled.png"
    base = ["txt2img", "--model", str(cli_files["model"]), "--no-progress", "--from-png", str(a1111), *adapter]
    code, _, stderr = run([*base, "--out", str(again)], capsys)
    assert code == 0, stderr
    assert "--control" not in stderr, stderr
    assert np.abs(pixels(drawn) - pixels(again)).max() == 0
    code, _, stderr = run([*base, "--ip-adapter-scale", "1", "--out", str(scaled)], capsys)
    assert code == 0, stderr
    assert np.abs(pixels(drawn) - pixels(scaled)).max() > 10            # the CLI's scale over the recorded one
    code, _, stderr = run(["txt2img", "--model", str(cli_files["model"]), "--no-progress", "--from-png", str(a1111),
                           "--out", str(tmp_path / "without.png")], capsys)
    assert code == 0, stderr
    assert "the picture was drawn with ControlNet 0 (Module: ip-adapter_clip_sd15" in stderr
    assert "pass --ip-adapter and --ip-adapter-image" in stderr


def test_parameters_read_the_extensions_ip_adapter_units():
    """POST /api/parameters' reading (picture_settings.recorded_units): the extension's IP-Adapter unit is an
    ip_adapters entry (model by its name, Weight -> scale, its module, which names its encoder), not a ControlNet;
    a FaceID one too (its face embedding, as the picture, given again); a face module sdlab does not draw (PuLID)
    is unread."""
    from sdlab.pipeline.png_info import parse_parameters
    from sdlab.server.picture_settings import recorded_units

    text = ("a red apple\nSteps: 3, Seed: 3, Size: 32x32, "
            + A1111_UNIT.format(hash="12345678", weight=0.7) + ", "
            + 'ControlNet 1: "Module: canny, Model: cn [87654321], Weight: 0.8, Resize Mode: Crop and Resize, '
              'Processor Res: 512, Threshold A: 100, Threshold B: 200, Guidance Start: 0.0, Guidance End: 1.0, '
              'Pixel Perfect: False, Control Mode: Balanced", '
            + 'ControlNet 2: "Module: ip-adapter_face_id_plus, Model: ip-adapter-faceid-plus_sd15 [11111111], '
              'Weight: 0.5", '
            + 'ControlNet 3: "Module: ip-adapter_pulid, Model: ip-adapter_pulid_sdxl_fp16 [22222222], Weight: 1"')
    controls, ip_adapters, unread = recorded_units(parse_parameters(text))
    assert [unit["model"] for unit in controls] == ["cn [87654321]"]
    assert ip_adapters == [{"model": "ip-adapter_tiny [12345678]", "scale": 0.7, "module": "ip-adapter_clip_sd15",
                            "resize_mode": "crop"},
                           {"model": "ip-adapter-faceid-plus_sd15 [11111111]", "scale": 0.5,
                            "module": "ip-adapter_face_id_plus"}]
    assert unread == ["ControlNet 3"]


def _controlnet_file(cli_files) -> Path:
    """A random-weight ControlNet of the CLI's model, in A1111's single-file layout, beside it."""
    from controlnet_fixtures import diffusers_controlnet, write_layout

    path = cli_files["folder"] / "control_cn.safetensors"
    if not path.exists():
        write_layout(diffusers_controlnet(tiny_bundle("sd1").unet_config, seed=4, hint_widths=(16, 32)), "original",
                     cli_files["folder"])
    return path


def test_cli_bad_input_is_one_line_and_no_file(cli_files, tmp_path, capsys):
    from cli_helpers import run

    base = ["txt2img", "a red apple", "--model", str(cli_files["model"]), *FAST]
    adapter, picture = str(cli_files["adapter"]), str(cli_files["picture"])
    lone = tmp_path / "lone.safetensors"
    lone.write_bytes(cli_files["adapter"].read_bytes())
    cases = [
        (["--ip-adapter", adapter], "IP-Adapter 0: needs an image; only an img2img or inpaint request's IP-Adapter "
         "may leave it out, to draw on the init picture"),
        (["--ip-adapter", adapter, "--ip-adapter-image", picture, "--ip-adapter-image", picture],
         "2 --ip-adapter-image for 1 --ip-adapter"),
        (["--ip-adapter", adapter, "--ip-adapter-image", picture, "--ip-adapter-scale", "1",
          "--ip-adapter-scale", "2"], "2 --ip-adapter-scale for 1 --ip-adapter"),
        (["--ip-adapter", adapter, "--ip-adapter-image", picture, "--ip-adapter-scale", "11"], "scale must be"),
        (["--ip-adapter", str(tmp_path / "no.safetensors"), "--ip-adapter-image", picture], "does not exist"),
        (["--ip-adapter", adapter, "--ip-adapter-image", str(tmp_path / "no.png")], "no.png"),
        (["--ip-adapter", str(lone), "--ip-adapter-image", picture], "no image encoder for the IP-Adapter"),
        (["--ip-adapter", adapter, "--ip-adapter-image", picture, "--ip-adapter-encoder", adapter],
         "not a CLIP image encoder"),
        (["--ip-adapter", str(cli_files["adapter"].parent), "--ip-adapter-image", picture],
         "is a folder, not an IP-Adapter file"),
        (["--ip-adapter", str(cli_files["model"]), "--ip-adapter-image", picture],
         "this is a Stable Diffusion checkpoint, not an IP-Adapter; use it with --model"),
        (["--ip-adapter", str(_controlnet_file(cli_files)), "--ip-adapter-image", picture],
         "this is a ControlNet, not an IP-Adapter; use it with --control"),
    ]
    for extra, message in cases:
        out = tmp_path / "bad.png"
        code, _, stderr = run([*base, *extra, "--out", str(out)], capsys)
        assert code != 0 and message in stderr, stderr
        errors = [line for line in stderr.splitlines() if "error" in line]
        assert "Traceback" not in stderr and len(errors) == 1, stderr
        assert "WARNING" not in stderr or message == "not a CLIP image encoder", stderr    # refused before any load
        assert not out.exists()


def test_grid_cells_are_txt2img_with_the_adapter(cli_files, tmp_path, capsys):
    import numpy as np
    from cli_helpers import pixels, run
    from sdlab.pipeline.png_info import parse_parameters, read_parameters

    options = ["--model", str(cli_files["model"]), "--seed", "3", "--width", "32", "--height", "32",
               "--ip-adapter", str(cli_files["adapter"]), "--ip-adapter-image", str(cli_files["picture"]),
               "--ip-adapter-scale", "0.5", "--no-progress"]
    cells = tmp_path / "cells"
    code, _, err = run(["grid", "a red apple", "--x", "steps=2,3", *options, "--out", str(tmp_path / "g.png"),
                        "--keep-cells", str(cells)], capsys)
    assert code == 0, err
    single = tmp_path / "single.png"
    assert run(["txt2img", "a red apple", "--steps", "3", *options, "--out", str(single)], capsys)[0] == 0
    kept = cells / "001-x1-y0-z0.png"
    assert np.array_equal(pixels(kept), pixels(single))
    assert parse_parameters(read_parameters(kept))["IP-Adapter 0"].endswith("Weight: 0.5")


def test_the_encoder_loads_and_encodes_a_picture_once(cli_files, tmp_path, capsys, monkeypatch):
    """The picture's tokens are the same in every pass, batch of a batch count, grid cell and request: the image
    encoder is loaded once and run once for them all; a changed encoder file is read again."""
    import sdlab.pipeline.image_prompt as image_prompt
    from cli_helpers import run
    from sdlab.models.clip_vision import CLIPVisionModel

    image_prompt.forget_image_prompt_models()
    loads, adapter_loads, encodes = [], [], []
    load, load_adapter, forward = image_prompt.load_image_encoder, image_prompt.load_ip_adapter, CLIPVisionModel.forward
    monkeypatch.setattr(image_prompt, "load_image_encoder", lambda *a, **k: loads.append(1) or load(*a, **k))
    monkeypatch.setattr(image_prompt, "load_ip_adapter", lambda *a, **k: adapter_loads.append(1) or load_adapter(*a, **k))
    monkeypatch.setattr(CLIPVisionModel, "forward", lambda self, x: encodes.append(x.shape[0]) or forward(self, x))
    options = ["--model", str(cli_files["model"]), "--seed", "3", "--width", "32", "--height", "32", "--steps", "2",
               "--ip-adapter", str(cli_files["adapter"]), "--ip-adapter-image", str(cli_files["picture"]),
               "--no-progress"]
    code, _, err = run(["txt2img", "a red apple", *options, "--batch-count", "3", "--hr-scale", "2",
                        "--out", str(tmp_path / "a.png")], capsys)     # 3 batches of 2 passes
    assert code == 0, err
    assert (len(loads), len(adapter_loads), len(encodes)) == (1, 1, 1)
    code, _, err = run(["grid", "a red apple", "--x", "steps=2,3", *options, "--out", str(tmp_path / "g.png")], capsys)
    assert code == 0, err
    assert (len(loads), len(adapter_loads), len(encodes)) == (1, 1, 1)    # the grid's cells: none again
    api = sdlab.load(cli_files["model"])
    prompt = IPAdapterInput(cli_files["adapter"], Image.open(cli_files["picture"]), 0.7)
    api.txt2img("a red apple", steps=1, width=32, height=32, ip_adapters=[prompt])
    assert (len(loads), len(encodes)) == (1, 1)                          # another request, another model object
    api.txt2img("a red apple", steps=1, width=32, height=32,
                ip_adapters=[IPAdapterInput(cli_files["adapter"], Image.open(cli_files["picture"]).rotate(90), 0.7)])
    assert (len(loads), len(encodes)) == (1, 2)                          # another picture: encoded
    weights = next((cli_files["adapter"].parent / "image_encoder").glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1_000_000_000))
    api.txt2img("a red apple", steps=1, width=32, height=32, ip_adapters=[prompt])
    assert (len(loads), len(encodes)) == (2, 3)                          # a changed encoder file: read again
    image_prompt.forget_image_prompt_models()


def test_unloading_the_servers_checkpoint_lets_the_encoder_go(cli_files):
    """A1111's unload-checkpoint (the server's `ModelHost.unload`) lets go the kept adapters, encoders and tokens
    with the model, so the encoder's memory goes with it."""
    from types import SimpleNamespace

    import sdlab.pipeline.image_prompt as image_prompt
    from sdlab.server.worker import ModelHost

    sdlab.load(cli_files["model"]).txt2img("a red apple", steps=1, width=32, height=32, ip_adapters=[
        IPAdapterInput(cli_files["adapter"], Image.open(cli_files["picture"]), 0.7)])
    assert image_prompt._LOADED and image_prompt._TOKENS
    ModelHost.unload(SimpleNamespace(device="cpu"))
    assert not image_prompt._LOADED and not image_prompt._TOKENS


def test_sd1_plus_adapter_matches_diffusers(sd1):
    """IP-Adapter Plus: the resampler over the encoder's penultimate hidden states, the negative rows a zero
    picture's (diffusers' encode_image with output_hidden_states)."""
    from ip_adapter_fixtures import ip_adapter_plus_state

    ours, base, encoder, models, _ = sd1
    widths = [attn.to_q.weight.shape[0] for attn in cross_attentions(ours.bundle.unet)]
    state = ip_adapter_plus_state(widths, ours.bundle.unet_config.context_dim, encoder.config.hidden_size, seed=31)
    path = write_ip_adapter(models / "ip-adapter-plus_tiny.bin", state)
    reference = _reference(base, StableDiffusionPipeline, encoder, models, path.name, 0.8, batch=1)
    options = dict(steps=STEPS, cfg_scale=CFG, seed=SEED, width=SIZE, height=SIZE, **EULER)
    plain = ours.txt2img(PROMPT, NEGATIVE, **options)
    result = ours.txt2img(PROMPT, NEGATIVE, ip_adapters=[IPAdapterInput(path, _picture(), 0.8)], **options)
    assert max_pixel_diff(plain.images, reference) > 5 * MAX_PIXEL_DIFF
    assert max_pixel_diff(result.images, reference) <= MAX_PIXEL_DIFF


def _adapted_pipe(pipe, models, names: list[str], scales: list[float]):
    """diffusers' pipeline `pipe` with the adapter files `names` of `models` loaded at `scales`."""
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter([str(models)] * len(names), subfolder=[""] * len(names), weight_name=names,
                         image_encoder_folder=None)
    pipe.set_ip_adapter_scale(scales)
    return pipe


def test_two_adapters_at_once_match_diffusers(sd1):
    """A base adapter and a Plus adapter on two pictures, batch 2: each adapter attends to its own tokens at its
    own scale (diffusers' list of adapters). Drawing with the first adapter alone is far from it."""
    from ip_adapter_fixtures import ip_adapter_plus_state

    ours, base, encoder, models, state = sd1
    widths = [attn.to_q.weight.shape[0] for attn in cross_attentions(ours.bundle.unet)]
    first = write_ip_adapter(models / "two_base.safetensors", state)
    second = write_ip_adapter(models / "two_plus.bin", ip_adapter_plus_state(
        widths, ours.bundle.unet_config.context_dim, encoder.config.hidden_size, seed=31))
    other = Image.open(SAMPLE_PICTURE).convert("RGB").crop((100, 40, 300, 200))
    pipe = _adapted_pipe(StableDiffusionPipeline(**{**base.components, "image_encoder": encoder,
                                                   "feature_extractor": CLIPImageProcessor()}),
                         models, [first.name, second.name], [0.6, 0.5])
    reference = pipe(PROMPT, negative_prompt=NEGATIVE, ip_adapter_image=[_picture(), other],
                     num_inference_steps=STEPS, guidance_scale=CFG, width=SIZE, height=SIZE, num_images_per_prompt=2,
                     generator=[torch.Generator().manual_seed(SEED + i) for i in range(2)], output_type="np").images
    options = dict(steps=STEPS, cfg_scale=CFG, seed=SEED, width=SIZE, height=SIZE, batch_size=2, **EULER)
    one = ours.txt2img(PROMPT, NEGATIVE, ip_adapters=[IPAdapterInput(first, _picture(), 0.6)], **options)
    both = ours.txt2img(PROMPT, NEGATIVE, ip_adapters=[IPAdapterInput(first, _picture(), 0.6),
                                                       IPAdapterInput(second, other, 0.5)], **options)
    assert max_pixel_diff(one.images, reference) > 5 * MAX_PIXEL_DIFF
    assert max_pixel_diff(both.images, reference) <= MAX_PIXEL_DIFF


def test_controlnet_and_adapter_together_match_diffusers(sd1):
    """A ControlNet and a Plus adapter in one run, batch 2 with a negative prompt: the U-Net attends to the
    picture, the ControlNet to the text alone (diffusers' StableDiffusionControlNetPipeline + load_ip_adapter)."""
    from controlnet_fixtures import diffusers_controlnet, write_layout
    from diffusers import StableDiffusionControlNetPipeline
    from ip_adapter_fixtures import ip_adapter_plus_state
    from PIL import ImageDraw
    from sdlab.pipeline.control import ControlInput

    ours, base, encoder, models, _ = sd1
    widths = [attn.to_q.weight.shape[0] for attn in cross_attentions(ours.bundle.unet)]
    plus = write_ip_adapter(models / "cn_plus.bin", ip_adapter_plus_state(
        widths, ours.bundle.unet_config.context_dim, encoder.config.hidden_size, seed=31))
    net = diffusers_controlnet(ours.bundle.unet_config, seed=20, hint_widths=(16, 32), std=0.05)
    control = write_layout(net, "folder", models.parent / "controlnet")
    hint = Image.new("RGB", (48, 40), "black")
    draw = ImageDraw.Draw(hint)
    draw.rectangle([5, 4, 30, 30], outline="white", width=3)
    draw.ellipse([20, 10, 44, 36], fill=(200, 0, 90))
    pipe = _adapted_pipe(StableDiffusionControlNetPipeline(**{**base.components, "image_encoder": encoder,
                                                             "feature_extractor": CLIPImageProcessor()},
                                                          controlnet=net), models, [plus.name], [0.7])
    reference = pipe(PROMPT, hint, negative_prompt=NEGATIVE, ip_adapter_image=[_picture()],
                     num_inference_steps=STEPS, guidance_scale=CFG, width=SIZE, height=SIZE,
                     controlnet_conditioning_scale=0.8, num_images_per_prompt=2,
                     generator=[torch.Generator().manual_seed(SEED + i) for i in range(2)], output_type="np").images
    options = dict(steps=STEPS, cfg_scale=CFG, seed=SEED, width=SIZE, height=SIZE, batch_size=2, **EULER)
    controls = [ControlInput(control, hint, 0.8)]
    plain = ours.txt2img(PROMPT, NEGATIVE, controls=controls, **options)
    result = ours.txt2img(PROMPT, NEGATIVE, controls=controls, ip_adapters=[IPAdapterInput(plus, _picture(), 0.7)],
                          **options)
    assert max_pixel_diff(plain.images, reference) > 5 * MAX_PIXEL_DIFF
    assert max_pixel_diff(result.images, reference) <= MAX_PIXEL_DIFF


def test_img2img_and_the_hires_pass_take_the_adapter(sd1, monkeypatch):
    """Every pass that draws with the base model attends to the picture: img2img's, and both of the hires fix's
    (each pass's U-Net calls carry the adapter's tokens)."""
    from sdlab.models.ip_adapter import ImagePrompt

    ours, _, _, models, state = sd1
    path = write_ip_adapter(models / "passes.safetensors", state)
    prompt = IPAdapterInput(path, _picture(), 0.7)
    options = dict(steps=2, cfg_scale=CFG, seed=SEED, width=SIZE, height=SIZE, **EULER)
    init = ours.txt2img(PROMPT, NEGATIVE, **options).images[0]
    calls, attended = [], ImagePrompt.attended
    monkeypatch.setattr(ImagePrompt, "attended", lambda self, attn, q: calls.append(q.shape[1]) or attended(self, attn, q))
    ours.img2img(PROMPT, init, 0.6, negative_prompt=NEGATIVE, **options)
    assert not calls
    ours.img2img(PROMPT, init, 0.6, negative_prompt=NEGATIVE, ip_adapters=[prompt], **options)
    assert calls and set(calls) <= {(SIZE // 2 // f) ** 2 for f in (1, 2, 4, 8)}
    calls.clear()
    ours.txt2img(PROMPT, NEGATIVE, hr_scale=2, hr_denoise=0.5, ip_adapters=[prompt], **options)
    assert (SIZE // 2) ** 2 in calls and SIZE ** 2 in calls          # the first pass's tokens and the second's


def test_inspect_names_adapters_and_encoders(cli_files, tmp_path, capsys):
    from cli_helpers import run
    from ip_adapter_fixtures import ip_adapter_plus_state

    code, out, err = run(["inspect", str(cli_files["adapter"])], capsys)
    assert code == 0, err
    assert "IP-Adapter" in out and "base" in out and "32-wide image embeddings" in out
    plus = write_ip_adapter(tmp_path / "plus.bin", ip_adapter_plus_state([64], 48, 1280))
    code, out, err = run(["inspect", str(plus)], capsys)
    assert code == 0, err
    assert "Plus (resampler)" in out and "1280-wide hidden states (ViT-H/14)" in out and "16" in out
    code, out, err = run(["inspect", str(cli_files["adapter"].parent / "image_encoder")], capsys)
    assert code == 0, err
    assert "CLIP image encoder" in out and "--ip-adapter-encoder" in out
    code, _, err = run(["txt2img", "x", "--model", str(cli_files["adapter"]), "--no-progress"], capsys)
    assert code != 0 and "not a whole model; use it with --ip-adapter FILE" in err
