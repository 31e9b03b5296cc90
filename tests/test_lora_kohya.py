"""LoRA files in kohya-ss' convention: what sdlab writes, diffusers reads and draws identically; what kohya
writes (either U-Net naming), sdlab reads; what is not a LoRA is one clear error.

- A LoRA written by sdlab's training code (`LoRANetwork` over the U-Net and the text encoders, random
  weights), loaded by diffusers' `pipe.load_lora_weights`, draws the picture `sdlab.load(..., loras=...)`
  draws, within 2/255 (SD1 and SDXL, reduced-width models as in `test_pipeline_parity.py`).
- Names follow kohya per family (diffusers module paths for SD1/SD2, SGM paths for SDXL), with kohya's
  ``ss_*`` metadata and ``sshs_*`` hashes; files in the other naming apply to the same layers.
- `--lora` with a full checkpoint, a .ckpt, an empty file or a LoRA of another family: one `sdlab: error:`
  line naming the file, exit 2; `--lora F:abc` is a bad weight; Windows paths keep working.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import sdlab
from bundle_fixtures import tiny_bundle, write_diffusers_folder, write_original
from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.lora import apply_lora, kohya_metadata, load_lora_file
from sdlab.cli import main
from sdlab.cli.errors import UserError
from sdlab.cli.generate import _parse_lora
from sdlab.train.lora import LoRANetwork, save_lora_networks

MAX_PIXEL_DIFF = 2                      # out of 255
PROMPT = "a photograph of an astronaut riding a horse"
NEGATIVE = "blurry, low quality"
SEED = 1234
SIZE = 32
STEPS = 4
CFG = 7.0

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _diffusers_folder(bundle, folder: Path) -> Path:
    """A diffusers folder of `bundle` with the `sample_size` released folders carry."""
    write_diffusers_folder(bundle, folder)
    config_path = folder / "unet" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "sample_size": SIZE // 2}))
    return folder


def _random_lora(bundle, path: Path, rank: int = 4, alpha: float = 2.0, seed: int = 5) -> Path:
    """A LoRA over the U-Net and every text encoder, with random (non-zero) weights, written by the same
    function training uses."""
    g = torch.Generator().manual_seed(seed)
    unet = LoRANetwork.for_unet(bundle.unet, rank, alpha)
    text = LoRANetwork.for_text_encoders([te.model for te in bundle.text_encoders], rank, alpha)
    with torch.no_grad():
        for p in [*unet.parameters(), *text.parameters()]:
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return save_lora_networks(path, [unet, text], bundle.family, bundle.prediction)


def _uint8(images) -> np.ndarray:
    if isinstance(images, np.ndarray):
        return (images * 255).round().astype(np.uint8)
    return np.stack([np.asarray(image) for image in images])


def _max_diff(a, b) -> int:
    return int(np.abs(_uint8(a).astype(np.int16) - _uint8(b).astype(np.int16)).max())


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_sdlab_lora_is_drawn_by_diffusers_as_by_sdlab(family, tmp_path, monkeypatch):
    pytest.importorskip("peft")
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    bundle = tiny_bundle(family, seed=11)
    folder = _diffusers_folder(bundle, tmp_path / "pipe")
    lora = _random_lora(bundle, tmp_path / "style.safetensors")

    pipe_class = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    pipe = pipe_class.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(str(lora))
    reference = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=CFG, width=SIZE,
                     height=SIZE, generator=[torch.Generator("cpu").manual_seed(SEED)], output_type="np").images

    options = dict(steps=STEPS, cfg_scale=CFG, seed=SEED, width=SIZE, height=SIZE, sampler="Euler",
                   schedule="leading", init_noise="vp")
    ours = sdlab.load(folder, loras=[(lora, 1.0)]).txt2img(PROMPT, NEGATIVE, **options).images
    without = sdlab.load(folder).txt2img(PROMPT, NEGATIVE, **options).images
    assert _uint8(reference).std() > 20, "the reference picture is nearly flat: the comparison would prove little"
    assert _max_diff(without, reference) > 10 * MAX_PIXEL_DIFF  # the LoRA changes the picture
    assert _max_diff(ours, reference) <= MAX_PIXEL_DIFF


@pytest.mark.parametrize("family, example, version", [
    ("sd1", "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", "sd_v1"),
    ("sd2", "lora_unet_down_blocks_0_attentions_0_proj_in", "sd_v2"),
    ("sdxl", "lora_unet_input_blocks_3_1_transformer_blocks_0_attn2_to_k", "sdxl_base_v1-0"),
])
def test_names_and_metadata_follow_kohya(family, example, version, tmp_path):
    bundle = tiny_bundle(family)
    path = _random_lora(bundle, tmp_path / "l.safetensors", rank=4, alpha=2.0)
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert f"{example}.lora_down.weight" in keys and f"{example}.alpha" in keys
    unet_names = {k.split(".")[0] for k in keys if k.startswith("lora_unet_")}
    sgm = {n for n in unet_names if "input_blocks" in n or "output_blocks" in n or "middle_block" in n}
    assert sgm == (unet_names if family == "sdxl" else set())  # one convention per file
    te_prefixes = {k.split("_text_model_")[0] for k in keys if not k.startswith("lora_unet_")}
    assert te_prefixes == ({"lora_te1", "lora_te2"} if family == "sdxl" else {"lora_te"})
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "2.0")
    assert meta["ss_base_model_version"] == version and meta["ss_v2"] == str(family == "sd2")
    assert meta["ss_training_comment"]
    assert kohya_metadata(bundle.family, "v", 4, 2.0)["ss_base_model_version"] == version + ("" if family == "sdxl" else "_v")
    data = path.read_bytes()
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()


def _swap_convention(path: Path, out: Path, renames: dict[str, str]) -> Path:
    """Copy a LoRA file with its module names rewritten by `renames` (old name -> new name)."""
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    renamed = {}
    for key, value in tensors.items():
        name, _, field = key.partition(".")
        renamed[f"{renames.get(name, name)}.{field}"] = value
    save_file(renamed, str(out))
    return out


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_both_unet_conventions_apply_to_the_same_layers(family, tmp_path):
    from sdlab.checkpoints.lora import _diffusers_module_paths, kohya_name

    bundle = tiny_bundle(family)
    written = _random_lora(bundle, tmp_path / "kohya.safetensors")
    paths = _diffusers_module_paths(bundle.unet_config)      # sdlab path -> diffusers path
    if family == "sdxl":   # kohya writes SGM names: rewrite them as diffusers names
        renames = {kohya_name("lora_unet_", p): kohya_name("lora_unet_", d) for p, d in paths.items()}
    else:                  # kohya writes diffusers names: rewrite them as SGM (old sdlab) names
        renames = {kohya_name("lora_unet_", d): kohya_name("lora_unet_", p) for p, d in paths.items()}
    other = _swap_convention(written, tmp_path / "other.safetensors", renames)
    assert set(load_lora_file(other)) != set(load_lora_file(written))

    merged = [tiny_bundle(family), tiny_bundle(family)]
    assert apply_lora(merged[0], written, 0.7) == apply_lora(merged[1], other, 0.7) == len(load_lora_file(written))
    for a, b in zip(merged[0].unet.state_dict().values(), merged[1].unet.state_dict().values()):
        assert torch.equal(a, b)
    for te_a, te_b in zip(merged[0].text_encoders, merged[1].text_encoders):
        for a, b in zip(te_a.model.state_dict().values(), te_b.model.state_dict().values()):
            assert torch.equal(a, b)
    base = tiny_bundle(family)
    assert not torch.equal(merged[0].text_encoders[-1].model.encoder.layers[0].mlp.fc1.weight,
                           base.text_encoders[-1].model.encoder.layers[0].mlp.fc1.weight)


# --- bad input -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny-sd1.safetensors"
    write_original(tiny_bundle("sd1"), path, junk=False)
    return path


def _txt2img_with_lora(model: Path, spec: str, out: Path, capsys) -> tuple[int, str]:
    code = main(["txt2img", "an apple", "--model", str(model), "--lora", spec, "--steps", "1", "--width", "32",
                 "--height", "32", "--no-progress", "--out", str(out)])
    return code, capsys.readouterr().err


def test_full_checkpoint_as_lora_is_one_error(model, tmp_path, capsys):
    out = tmp_path / "a.png"
    code, err = _txt2img_with_lora(model, str(model), out, capsys)
    assert code == 2 and not out.exists()
    assert err.startswith("sdlab: error: ") and err.count("\n") == 1  # no "ignoring key" warnings before it
    assert str(model) in err and "not a LoRA file" in err


@pytest.mark.parametrize("kind", ["ckpt", "empty", "other-family", "garbage"])
def test_unusable_lora_files_are_one_error(kind, model, tmp_path, capsys):
    if kind == "ckpt":
        path = tmp_path / "model.ckpt"
        torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)}}, path)
    elif kind == "empty":
        path = tmp_path / "empty.safetensors"
        path.write_bytes(b"")
    elif kind == "garbage":
        path = tmp_path / "garbage.safetensors"
        path.write_bytes(b"\x00" * 64)
    else:  # a LoRA for SDXL given to an SD1 model: no name matches
        path = _random_lora(tiny_bundle("sdxl"), tmp_path / "xl.safetensors")
    out = tmp_path / "a.png"
    code, err = _txt2img_with_lora(model, str(path), out, capsys)
    assert code == 2 and not out.exists(), err
    assert err.startswith("sdlab: error: ") and err.count("\n") == 1 and str(path) in err


def test_lora_that_fits_no_layer_leaves_the_model_unchanged(tmp_path):
    bundle = tiny_bundle("sd1")
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    good = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
    save_file({f"{good}.lora_down.weight": torch.ones(2, 32), f"{good}.lora_up.weight": torch.ones(32, 2),
               f"{name}.lora_down.weight": torch.ones(2, 7), f"{name}.lora_up.weight": torch.ones(32, 2)},
              str(tmp_path / "bad.safetensors"))
    before = {k: v.clone() for k, v in bundle.unet.state_dict().items()}
    with pytest.raises(CheckpointError, match="bad.safetensors.*do not fit"):
        apply_lora(bundle, tmp_path / "bad.safetensors")
    assert all(torch.equal(before[k], v) for k, v in bundle.unet.state_dict().items())


def test_lora_weight_parsing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("style.safetensors").write_bytes(b"x")
    Path("C:\\x.safetensors").write_bytes(b"x")          # a Windows path, as a file name here
    assert _parse_lora("style.safetensors") == ("style.safetensors", 1.0)
    assert _parse_lora("style.safetensors:0.5") == ("style.safetensors", 0.5)
    assert _parse_lora("style.safetensors:-1e-1") == ("style.safetensors", -0.1)
    assert _parse_lora("C:\\x.safetensors") == ("C:\\x.safetensors", 1.0)
    assert _parse_lora("C:\\x.safetensors:0.8") == ("C:\\x.safetensors", 0.8)
    for spec, weight in [("F:abc", "abc"), ("style.safetensors:abc", "abc"), ("style.safetensors:", ""),
                         ("style.safetensors:nan", "nan"), ("style.safetensors:inf", "inf")]:
        with pytest.raises(UserError, match=f"the weight '{weight}' is not a finite number"):
            _parse_lora(spec)
    with pytest.raises(UserError, match="LoRA file 'missing.safetensors' does not exist"):
        _parse_lora("missing.safetensors:0.5")


def test_nonfinite_lora_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
    path = tmp_path / "nan.safetensors"
    save_file({f"{name}.lora_down.weight": torch.full((2, 32), float("nan")),
               f"{name}.lora_up.weight": torch.ones(32, 2)}, str(path))
    with pytest.raises(CheckpointError, match="nan.safetensors.*NaN or infinite"):
        load_lora_file(path)

    def no_model_expected(*args, **kwargs):
        raise AssertionError("the model was loaded before the LoRA file was checked")

    monkeypatch.setattr(sdlab.api, "load_bundle", no_model_expected)
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        sdlab.load("any-model.safetensors", loras=[(path, 1.0)])
