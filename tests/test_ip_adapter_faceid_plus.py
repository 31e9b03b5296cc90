"""IP-Adapter FaceID Plus and Plus v2 against diffusers 0.42, on the same random weights.

diffusers draws FaceID Plus (h94's ip-adapter-faceid-plus(v2)_sd15 / _sdxl layout: FaceID's ``image_proj.proj`` /
``norm`` beside ``image_proj.perceiver_resampler.*``) with `IPAdapterFaceIDPlusImageProjection`: the face
embedding goes in as ``ip_adapter_image_embeds`` ([zeros, face] stacked), the picture's CLIP hidden states as the
projection's ``clip_embeds`` (`prepare_ip_adapter_image_embeds` with classifier-free guidance: a zero picture's for
the negative rows) and Plus v2 sets ``shortcut`` / ``shortcut_scale`` (docs: using-diffusers/ip_adapter.md, "IP-Adapter
FaceID Plus"). sdlab is given the picture as `image` and the embedding as `face_embedding`; a file named
"...plusv2..." takes the shortcut at 1 unless `face_shortcut` says otherwise. Pictures within
`MAX_PIXEL_DIFF` / 255, SD1 and SDXL; the plain picture, and v1 against v2, more than 5 x that apart."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from transformers import CLIPImageProcessor

from ip_adapter_fixtures import write_ip_adapter
from picture_parity import CFG, MAX_PIXEL_DIFF, PROMPT, SEED, SIZE, STEPS, max_pixel_diff
from sdlab.models.ip_adapter import cross_attentions
from sdlab.pipeline.image_prompt import IPAdapterInput
from sdlab.pipeline.infotext import to_parameters
from sdlab.pipeline.request import RequestError
from test_ip_adapter import (  # noqa: F401  (cli_files: the tiny SD1 file, an adapter and its image encoder)
    EULER, NEGATIVE, _family, _picture, cli_files,
)

pytestmark = pytest.mark.usefixtures("one_thread")

OPTIONS = dict(steps=STEPS, cfg_scale=CFG, seed=SEED, width=SIZE, height=SIZE, **EULER)
FACE_WIDTH = 512                              # InsightFace's embedding


def face_id_plus_state(cross_widths: list[int], context_dim: int, clip_width: int, tokens: int = 4, depth: int = 4,
                       seed: int = 9, std: float = 0.05) -> dict[str, dict[str, torch.Tensor]]:
    """h94's FaceID Plus layout (IP-Adapter's ProjPlusModel: proj = Linear (E -> 2E), GELU, Linear (2E -> T x C),
    norm, perceiver_resampler = FacePerceiverResampler of width C: proj_in from the encoder's `clip_width`,
    layers.i.0 norm1 / norm2 / to_q / to_kv / to_out with 64-wide heads, layers.i.1 LayerNorm, Linear, GELU,
    Linear at 4x, proj_out, norm_out) with random weights; ip_adapter.{2k+1}.to_k_ip / to_v_ip. diffusers' loader
    builds 4 tokens, 4 layers and the 2x face MLP whatever the file holds, so these are those sizes."""
    gen = torch.Generator().manual_seed(seed)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    width, inner = context_dim, max(context_dim // 64, 1) * 64
    proj = {"proj.0.weight": draw(2 * FACE_WIDTH, FACE_WIDTH), "proj.0.bias": draw(2 * FACE_WIDTH),
            "proj.2.weight": draw(tokens * context_dim, 2 * FACE_WIDTH) * 4, "proj.2.bias": draw(tokens * context_dim),
            "norm.weight": 1 + draw(context_dim), "norm.bias": draw(context_dim)}
    resampler = {"proj_in.weight": draw(width, clip_width) * 4, "proj_in.bias": draw(width),
                 "proj_out.weight": draw(context_dim, width) * 4, "proj_out.bias": draw(context_dim),
                 "norm_out.weight": 1 + draw(context_dim), "norm_out.bias": draw(context_dim)}
    for i in range(depth):
        for norm in ("norm1", "norm2"):
            resampler[f"layers.{i}.0.{norm}.weight"] = 1 + draw(width)
            resampler[f"layers.{i}.0.{norm}.bias"] = draw(width)
        resampler[f"layers.{i}.0.to_q.weight"] = draw(inner, width) * 4
        resampler[f"layers.{i}.0.to_kv.weight"] = draw(2 * inner, width) * 4
        resampler[f"layers.{i}.0.to_out.weight"] = draw(width, inner) * 4
        resampler[f"layers.{i}.1.0.weight"], resampler[f"layers.{i}.1.0.bias"] = 1 + draw(width), draw(width)
        resampler[f"layers.{i}.1.1.weight"] = draw(4 * width, width) * 4
        resampler[f"layers.{i}.1.3.weight"] = draw(width, 4 * width) * 4
    proj.update({f"perceiver_resampler.{key}": value for key, value in resampler.items()})
    layers = {}
    for k, attn_width in enumerate(cross_widths):
        layers[f"{2 * k + 1}.to_k_ip.weight"] = draw(attn_width, context_dim) * 4
        layers[f"{2 * k + 1}.to_v_ip.weight"] = draw(attn_width, context_dim) * 4
    return {"image_proj": proj, "ip_adapter": layers}


def _face(seed: int = 1) -> torch.Tensor:
    """One face's embedding, unit length as InsightFace's normed_embedding: (1, 512)."""
    return torch.nn.functional.normalize(torch.randn(1, FACE_WIDTH, generator=torch.Generator().manual_seed(seed)),
                                         dim=-1)


def _diffusers_face_id_plus(base, pipeline_class, encoder, path, scale: float, face: torch.Tensor,
                            shortcut: float | None) -> np.ndarray:
    """diffusers' "IP-Adapter FaceID Plus" recipe: clip_embeds from prepare_ip_adapter_image_embeds (CFG), the
    face as ip_adapter_image_embeds [zeros, face], shortcut / shortcut_scale for Plus v2."""
    pipe = pipeline_class(**{**base.components, "image_encoder": encoder, "feature_extractor": CLIPImageProcessor()})
    pipe.scheduler = EulerDiscreteScheduler.from_config(base.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(str(path.parent), subfolder="", weight_name=path.name, image_encoder_folder=None)
    pipe.set_ip_adapter_scale(scale)
    projection = pipe.unet.encoder_hid_proj.image_projection_layers[0]
    projection.clip_embeds = pipe.prepare_ip_adapter_image_embeds([_picture()], None, torch.device("cpu"), 1, True)[0]
    projection.shortcut = shortcut is not None
    projection.shortcut_scale = 1.0 if shortcut is None else shortcut
    id_embeds = torch.cat([torch.zeros_like(face), face]).unsqueeze(1)                     # (2, 1, 512)
    return pipe(PROMPT, negative_prompt=NEGATIVE, ip_adapter_image_embeds=[id_embeds], num_inference_steps=STEPS,
                guidance_scale=CFG, width=SIZE, height=SIZE, generator=torch.Generator().manual_seed(SEED),
                output_type="np").images


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    ours, base, encoder, models, _ = _family(tmp_path_factory, "sd1", StableDiffusionPipeline, 31)
    widths = [attn.to_q.weight.shape[0] for attn in cross_attentions(ours.bundle.unet)]
    state = face_id_plus_state(widths, ours.bundle.unet_config.context_dim, encoder.config.hidden_size)
    return ours, base, encoder, models, state


def test_sd1_face_id_plus_and_plus_v2_match_diffusers(sd1, tmp_path):
    ours, base, encoder, models, state = sd1
    v1 = write_ip_adapter(models / "ip-adapter-faceid-plus_tiny.bin", state)
    v2 = write_ip_adapter(models / "ip-adapter-faceid-plusv2_tiny.bin", state)
    face = _face()
    npy = tmp_path / "face.npy"
    np.save(npy, face.numpy())
    reference_v1 = _diffusers_face_id_plus(base, StableDiffusionPipeline, encoder, v1, 0.8, face, None)
    reference_v2 = _diffusers_face_id_plus(base, StableDiffusionPipeline, encoder, v2, 0.8, face, 1.0)
    plain = ours.txt2img(PROMPT, NEGATIVE, **OPTIONS)
    drawn_v1 = ours.txt2img(PROMPT, NEGATIVE, ip_adapters=[IPAdapterInput(v1, _picture(), 0.8, face_embedding=face)],
                            **OPTIONS)
    drawn_v2 = ours.txt2img(PROMPT, NEGATIVE, ip_adapters=[IPAdapterInput(v2, _picture(), 0.8, face_embedding=npy)],
                            **OPTIONS)
    assert max_pixel_diff(drawn_v1.images, reference_v1) <= MAX_PIXEL_DIFF
    assert max_pixel_diff(drawn_v2.images, reference_v2) <= MAX_PIXEL_DIFF
    assert max_pixel_diff(plain.images, reference_v1) > 5 * MAX_PIXEL_DIFF
    assert max_pixel_diff(reference_v1, reference_v2) > 5 * MAX_PIXEL_DIFF
    assert to_parameters(drawn_v2.request)["IP-Adapter 0"].startswith("Model: ip-adapter-faceid-plusv2_tiny [")


def test_a_given_shortcut_scale_matches_diffusers_shortcut_scale(sd1):
    ours, base, encoder, models, state = sd1
    v1 = write_ip_adapter(models / "ip-adapter-faceid-plus_shortcut.safetensors", state)
    face = _face(2)
    reference = _diffusers_face_id_plus(base, StableDiffusionPipeline, encoder, v1, 0.7, face, 1.6)
    drawn = ours.txt2img(PROMPT, NEGATIVE, ip_adapters=[
        IPAdapterInput(v1, _picture(), 0.7, face_embedding=face[0].numpy(), face_shortcut=1.6)], **OPTIONS)
    unshortcut = ours.txt2img(PROMPT, NEGATIVE, ip_adapters=[
        IPAdapterInput(v1, _picture(), 0.7, face_embedding=face)], **OPTIONS)
    assert max_pixel_diff(drawn.images, reference) <= MAX_PIXEL_DIFF
    assert max_pixel_diff(unshortcut.images, reference) > 5 * MAX_PIXEL_DIFF
    assert to_parameters(drawn.request)["IP-Adapter 0"].endswith(", Weight: 0.7, Face shortcut: 1.6")


def test_sdxl_face_id_plus_v2_matches_diffusers(tmp_path_factory):
    ours, base, encoder, models, _ = _family(tmp_path_factory, "sdxl", StableDiffusionXLPipeline, 41)
    widths = [attn.to_q.weight.shape[0] for attn in cross_attentions(ours.bundle.unet)]
    state = face_id_plus_state(widths, ours.bundle.unet_config.context_dim, encoder.config.hidden_size)
    path = write_ip_adapter(models / "ip-adapter-faceid-plusv2_tiny_sdxl.bin", state)
    face = _face(3)
    reference = _diffusers_face_id_plus(base, StableDiffusionXLPipeline, encoder, path, 0.7, face, 1.0)
    plain = ours.txt2img(PROMPT, NEGATIVE, **OPTIONS)
    drawn = ours.txt2img(PROMPT, NEGATIVE, ip_adapters=[IPAdapterInput(path, _picture(), 0.7, face_embedding=face)],
                         **OPTIONS)
    assert max_pixel_diff(drawn.images, reference) <= MAX_PIXEL_DIFF
    assert max_pixel_diff(plain.images, reference) > 5 * MAX_PIXEL_DIFF


def test_face_id_plus_bad_input_is_one_line(sd1, tmp_path):
    ours, _, _, models, state = sd1
    path = write_ip_adapter(models / "ip-adapter-faceid-plus_refusals.bin", state)
    narrow = dict(state, image_proj={**state["image_proj"],
                                     "perceiver_resampler.proj_in.weight": torch.zeros(64, 40)})
    other_encoder = write_ip_adapter(models / "faceid-plus-40.bin", narrow)
    base_face = tmp_path / "base.npy"
    np.save(base_face, _face().numpy())
    cases = [
        (IPAdapterInput(path, _picture()), r"an IP-Adapter FaceID Plus reads a picture and an InsightFace face "
         r"embedding, which sdlab does not compute; give the picture as the image and the embedding \(512 numbers"),
        (IPAdapterInput(path, _face(), face_embedding=_face()), "reads a picture as its image"),
        (IPAdapterInput(path, _picture(), face_embedding=torch.cat([_face(), _face(2)])),
         "takes one face with its one picture; the face embedding holds 2"),
        (IPAdapterInput(path, _picture(), face_embedding=torch.zeros(1, 500)), r"has shape \(1, 500\)"),
        (IPAdapterInput(path, _picture(), face_embedding=tmp_path / "none.npy"), "none.npy' does not exist"),
        (IPAdapterInput(path, _picture(), face_embedding=_face(), face_shortcut=float("nan")),
         r"face_shortcut must be a number in \[0, 10\]"),
        (IPAdapterInput(other_encoder, _picture(), face_embedding=_face()),
         "FaceID Plus reads 40-wide image encoder hidden states; the image encoder .* is 128 wide"),
    ]
    for prompt, message in cases:
        with pytest.raises(RequestError, match=message):
            ours.txt2img(PROMPT, ip_adapters=[prompt], steps=1, width=SIZE, height=SIZE)


def test_inspect_names_the_face_id_plus_projection(sd1):
    from sdlab.checkpoints.other_kinds import describe_other_kind

    _, _, _, models, state = sd1
    described = describe_other_kind(write_ip_adapter(models / "ip-adapter-faceid-plusv2_inspect.bin", state))
    assert described["kind"] == "IP-Adapter"
    assert described["facts"]["image projection"] == "FaceID Plus (MLP, resampler)"
    assert described["facts"]["reads"] == ("512-wide face embeddings (InsightFace) and 128-wide image encoder "
                                           "hidden states")
    assert described["use"].startswith("--ip-adapter FILE --ip-adapter-image PICTURE --ip-adapter-face-embedding")


def test_cli_draws_face_id_and_face_id_plus_as_the_api_does(cli_files, tmp_path, capsys):
    """--ip-adapter-image FILE.npy (a FaceID adapter's embedding) and --ip-adapter-face-embedding FILE.npy (a FaceID
    Plus adapter's, beside its picture): the Python API's pictures, pixel for pixel; bad input one line, no file."""
    import sdlab
    from cli_helpers import pixels, run
    from PIL import Image
    from sdlab.pipeline.png_info import parse_parameters, read_parameters
    from test_ip_adapter import FAST
    from test_ip_adapter_layers import face_id_state

    bundle = sdlab.load(cli_files["model"])
    widths = [attn.to_q.weight.shape[0] for attn in cross_attentions(bundle.bundle.unet)]
    context = bundle.bundle.unet_config.context_dim
    models = cli_files["adapter"].parent
    plus = write_ip_adapter(models / "ip-adapter-faceid-plusv2_cli.bin", face_id_plus_state(widths, context, 128))
    face_id = write_ip_adapter(models / "ip-adapter-faceid-portrait_cli.bin", face_id_state(widths, context))
    face = tmp_path / "face.npy"
    np.save(face, _face(5).numpy())
    picture = str(cli_files["picture"])
    base = ["txt2img", "a red apple", "--model", str(cli_files["model"]), *FAST]
    for adapter, extra, image in ((plus, ["--ip-adapter-image", picture, "--ip-adapter-face-embedding", str(face)],
                                   Image.open(picture)), (face_id, ["--ip-adapter-image", str(face)], face)):
        out = tmp_path / f"{adapter.stem}.png"
        code, _, stderr = run([*base, "--ip-adapter", str(adapter), *extra, "--ip-adapter-scale", "0.8", "--out",
                               str(out)], capsys)
        assert code == 0, stderr
        face_embedding = face if adapter == plus else None
        api = bundle.txt2img("a red apple", steps=3, width=32, height=32, seed=3, ip_adapters=[
            IPAdapterInput(adapter, image, 0.8, face_embedding=face_embedding)])
        assert np.abs(pixels(out) - np.asarray(api.images[0], dtype=np.int16)).max() == 0
        assert parse_parameters(read_parameters(out))["IP-Adapter 0"].startswith(f"Model: {adapter.stem} [")
    cases = [
        (["--ip-adapter", str(plus), "--ip-adapter-image", picture], "give the picture as the image and the "
         "embedding (512 numbers: a tensor, a NumPy array or a .npy file) as face_embedding (Python API; the CLI's "
         "--ip-adapter-face-embedding FILE.npy; the server's ip_adapters[].face_embedding)"),
        (["--ip-adapter", str(plus), "--ip-adapter-image", picture, "--ip-adapter-face-embedding", str(face),
          "--ip-adapter-face-embedding", str(face)], "2 --ip-adapter-face-embedding for 1 --ip-adapter"),
        (["--ip-adapter", str(face_id), "--ip-adapter-image", picture], "(Python API; the CLI's --ip-adapter-image "
         "FILE.npy; the server's ip_adapters[].face_embedding)"),
        (["--ip-adapter", str(cli_files["adapter"]), "--ip-adapter-image", picture, "--ip-adapter-face-embedding",
          str(face)], "face_embedding and face_shortcut are for an IP-Adapter FaceID Plus"),
    ]
    for extra, message in cases:
        out = tmp_path / "bad.png"
        code, _, stderr = run([*base, *extra, "--out", str(out)], capsys)
        assert code != 0 and message in stderr, stderr
        assert "Traceback" not in stderr and len([line for line in stderr.splitlines() if "error" in line]) == 1
        assert not out.exists()


def test_cli_from_png_redraws_a_recorded_face_shortcut(cli_files, tmp_path, capsys):
    """A picture the Python API drew with face_shortcut=1.6 records "Face shortcut: 1.6"; `--from-png` with the
    adapter, picture and embedding given again draws it again (the shortcut read back), pixel for pixel."""
    import sdlab
    from cli_helpers import pixels, run
    from PIL import Image, PngImagePlugin
    from sdlab.pipeline.infotext import to_parameters
    from sdlab.pipeline.png_info import format_parameters

    bundle = sdlab.load(cli_files["model"])
    widths = [attn.to_q.weight.shape[0] for attn in cross_attentions(bundle.bundle.unet)]
    plus = write_ip_adapter(cli_files["adapter"].parent / "ip-adapter-faceid-plus_redraw.bin",
                            face_id_plus_state(widths, bundle.bundle.unet_config.context_dim, 128))
    face = tmp_path / "face.npy"
    np.save(face, _face(6).numpy())
    picture = str(cli_files["picture"])
    drawn = bundle.txt2img("a red apple", steps=3, width=32, height=32, seed=3, ip_adapters=[
        IPAdapterInput(plus, Image.open(picture), 0.8, face_embedding=face, face_shortcut=1.6)])
    recorded = tmp_path / "drawn.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", format_parameters(to_parameters(drawn.request)))
    drawn.images[0].save(recorded, pnginfo=info)
    again = tmp_path / "again.png"
    code, _, stderr = run(["txt2img", "--model", str(cli_files["model"]), "--no-progress", "--from-png",
                           str(recorded), "--ip-adapter", str(plus), "--ip-adapter-image", picture,
                           "--ip-adapter-face-embedding", str(face), "--out", str(again)], capsys)
    assert code == 0, stderr
    assert np.abs(pixels(recorded) - pixels(again)).max() == 0
