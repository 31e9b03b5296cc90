"""Diffusers folders under hostile or broken input: configs checked against the tensors before anything is
built, JSON read from regular files only with a size cap, shard indexes confined to their folder.

Each case is one `CheckpointError` naming the file and the bad field (exit 2 from the CLI), in well under a
second: never a MemoryError, a read of /dev/zero, a blocked FIFO or a file outside the folder.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
from PIL import Image
from bundle_fixtures import tiny_bundle, write_diffusers_folder

from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.load import plan_checkpoint
from sdlab.cli import main


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return write_diffusers_folder(tiny_bundle("sd1", seed=4), tmp_path_factory.mktemp("diffusers") / "pipe")


@pytest.fixture
def folder(pristine, tmp_path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "pipe"))


def _edit(folder: Path, file: str, **changes) -> Path:
    path = folder / file
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return path


BAD_FIELDS = [
    ("unet/config.json", {"layers_per_block": 100_000}, r"num_res_blocks \(layers_per_block\): declares 100000 but the weights have 1"),
    ("unet/config.json", {"transformer_layers_per_block": 1000}, r"transformer_depth .*declares \[1000, 1000\] but the weights have \[1, 1\]"),
    ("unet/config.json", {"block_out_channels": [32, 64, 64], "down_block_types": ["CrossAttnDownBlock2D"] * 3,
                          "up_block_types": ["CrossAttnUpBlock2D"] * 3}, r"channel_mult \(block_out_channels\): declares \[1, 2, 2\]"),
    ("unet/config.json", {"block_out_channels": "abc"}, r"block_out_channels must be a non-empty list"),
    ("unet/config.json", {"block_out_channels": [0, 64]}, r"block_out_channels: 0 is out of range"),
    ("unet/config.json", {"block_out_channels": [-32, 64]}, r"block_out_channels: -32 is out of range"),
    ("unet/config.json", {"attention_head_dim": 0}, r"attention_head_dim: 0 is out of range"),
    ("unet/config.json", {"attention_head_dim": "8"}, r"attention_head_dim: expected an integer, got '8'"),
    ("unet/config.json", {"attention_head_dim": 3}, r"num_heads=3 does not divide the attention width 32"),
    ("unet/config.json", {"norm_num_groups": 0}, r"norm_num_groups: 0 is out of range"),
    ("unet/config.json", {"norm_num_groups": 7}, r"norm_groups=7 does not divide"),
    ("unet/config.json", {"in_channels": "4"}, r"in_channels: expected an integer, got '4'"),
    ("unet/config.json", {"layers_per_block": None}, r"layers_per_block: expected an integer, got None"),
    ("unet/config.json", {"cross_attention_dim": [64, 32]}, r"sdlab needs one cross_attention_dim for all levels"),
    ("unet/config.json", {"cross_attention_dim": 65}, r"context_dim \(cross_attention_dim\): declares 65 but the weights have 64"),
    ("unet/config.json", {"down_block_types": "CrossAttnDownBlock2D"}, r"down_block_types must be a non-empty list"),
    ("unet/config.json", {"use_linear_projection": "yes"}, r"use_linear_projection must be true or false"),
    ("vae/config.json", {"layers_per_block": 100_000}, r"num_res_blocks \(layers_per_block\): declares 100000 but the weights have 1"),
    ("vae/config.json", {"block_out_channels": []}, r"block_out_channels must be a non-empty list"),
    ("vae/config.json", {"norm_num_groups": "32"}, r"norm_num_groups: expected an integer"),
    ("vae/config.json", {"latent_channels": -4}, r"latent_channels: -4 is out of range"),
    ("vae/config.json", {"scaling_factor": "big"}, r"scaling_factor must be a number"),
    ("text_encoder/config.json", {"num_attention_heads": 0}, r"num_attention_heads: 0 is out of range"),
    ("text_encoder/config.json", {"num_attention_heads": 7}, r"heads=7 does not divide the text encoder width 64"),
    ("text_encoder/config.json", {"hidden_act": "relu"}, r"text_encoder/config.json hidden_act 'relu'"),
    ("text_encoder/config.json", {"layer_norm_eps": "small"}, r"layer_norm_eps: expected a positive finite number"),
    ("scheduler/scheduler_config.json", {"prediction_type": 5}, r"prediction_type must be a string"),
]


@pytest.mark.parametrize(("file", "changes", "pattern"), BAD_FIELDS, ids=[f"{f}:{next(iter(c))}" for f, c, _ in BAD_FIELDS])
def test_malformed_config_is_one_error_naming_file_and_field(folder, file, changes, pattern):
    path = _edit(folder, file, **changes)
    start = time.process_time()                       # CPU time: a bound on the work, not on the machine's load
    with pytest.raises(CheckpointError, match=pattern) as err:
        plan_checkpoint(folder)
    assert time.process_time() - start < 5
    assert str(folder) in str(err.value) and file in str(err.value) and "\n" not in str(err.value)


def test_cli_exit_2_for_a_folder_declaring_huge_layers(folder, capsys):
    _edit(folder, "unet/config.json", layers_per_block=100_000)
    assert main(["inspect", str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sdlab: error: ") and "layers_per_block" in err[0]


@pytest.mark.parametrize("family", [None, "sd1"])
def test_missing_text_encoder_is_named_before_family_detection(folder, capsys, family):
    """An SD1 folder without text_encoder/ (an incomplete download) is one error naming it, with or without
    --family (before, without it: "cannot tell the family ... pass the family explicitly")."""
    shutil.rmtree(folder / "text_encoder")
    assert main(["inspect", str(folder), *(["--family", family] if family else [])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"sdlab: error: {folder}: model_index.json lists text_encoder, but text_encoder/config.json "
                   "is missing"]


def _other_vae(kind: str, path: Path) -> Path:
    """A tiny diffusers VAE of a class other than AutoencoderKL, saved as diffusers saves it."""
    from diffusers import AsymmetricAutoencoderKL, AutoencoderTiny

    if kind == "AutoencoderTiny":
        vae = AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                              num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), upsampling_scaling_factor=2)
    else:
        vae = AsymmetricAutoencoderKL(down_block_out_channels=(32, 64), up_block_out_channels=(32, 64),
                                      down_block_types=("DownEncoderBlock2D",) * 2,
                                      up_block_types=("UpDecoderBlock2D",) * 2, layers_per_down_block=1,
                                      layers_per_up_block=1, norm_num_groups=32)
    vae.save_pretrained(path)
    return path


@pytest.mark.parametrize(("kind", "known"), [("AutoencoderTiny", "TAESD"), ("AsymmetricAutoencoderKL", "asymmetric")])
@pytest.mark.parametrize("where", ["vae/", "--vae"])
def test_a_vae_of_another_class_is_named(folder, tmp_path, capsys, kind, known, where):
    """A TAESD or asymmetric VAE in vae/ or given as --vae is one error naming its class (before: act_fn='relu'
    for TAESD, "10 unexpected keys ... is the VAE config right?" for the asymmetric VAE)."""
    if where == "vae/":
        shutil.rmtree(folder / "vae")
        _other_vae(kind, folder / "vae")
        args = ["inspect", str(folder)]
    else:
        args = ["inspect", str(folder), "--vae", str(_other_vae(kind, tmp_path / "vae"))]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"config.json: _class_name {kind} (" in err[0] and known in err[0], err
    assert "sdlab loads only AutoencoderKL VAEs" in err[0]


def test_model_index_not_an_object(folder):
    (folder / "model_index.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"model_index.json: expected a JSON object"):
        plan_checkpoint(folder)


# --- unbounded reads (item 21) -----------------------------------------------------------------------------


def test_config_linked_to_dev_zero_is_refused(folder):
    config = folder / "unet" / "config.json"
    config.unlink()
    config.symlink_to("/dev/zero")
    start = time.process_time()                       # CPU time: reading /dev/zero would spend it
    with pytest.raises(CheckpointError, match=r"unet/config.json: not a regular file"):
        plan_checkpoint(folder)
    assert time.process_time() - start < 5


def test_model_index_fifo_does_not_block(folder):
    index = folder / "model_index.json"
    index.unlink()
    os.mkfifo(index)
    outcome: list[BaseException | None] = []

    def plan() -> None:
        try:
            plan_checkpoint(folder)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            outcome.append(exc)

    worker = threading.Thread(target=plan, daemon=True)
    worker.start()
    worker.join(timeout=20)
    if worker.is_alive():  # unblock the reader so the test process can finish, then fail
        with open(index, "w"):
            pass
        pytest.fail("reading a FIFO model_index.json blocked")
    assert isinstance(outcome[0], CheckpointError) and "not a regular file" in str(outcome[0])


def test_oversized_config_is_refused_without_reading_it(folder):
    config = folder / "vae" / "config.json"
    with open(config, "r+b") as f:
        f.truncate(64 << 20)   # sparse: 64 MiB of zeros after the JSON
    with pytest.raises(CheckpointError, match=r"vae/config.json: larger than 16 MiB"):
        plan_checkpoint(folder)


@pytest.mark.parametrize("shard", ["../../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_shard_index_may_not_point_outside_its_folder(folder, shard):
    unet = folder / "unet"
    (unet / "diffusion_pytorch_model.safetensors").rename(folder / "outside.safetensors")
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"conv_in.weight": shard}}))
    with pytest.raises(CheckpointError, match=r"is not a file name inside"):
        plan_checkpoint(folder)


def test_shard_index_inside_the_folder_still_loads(folder):
    unet = folder / "unet"
    (unet / "diffusion_pytorch_model.safetensors").rename(unet / "part-1.safetensors")
    from safetensors import safe_open

    with safe_open(unet / "part-1.safetensors", "pt") as f:
        names = list(f.keys())
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {name: "part-1.safetensors" for name in names}}))
    assert plan_checkpoint(folder).report.family.name == "sd1"


@pytest.fixture(scope="module")
def sdxl_refiner_folder(tmp_path_factory) -> Path:
    return write_diffusers_folder(tiny_bundle("sdxl-refiner", seed=4), tmp_path_factory.mktemp("refiner") / "pipe")


@pytest.mark.parametrize(("value", "read"), [(False, False), (True, True), (None, None)])
def test_force_zeros_for_empty_prompt_is_read_from_model_index(sdxl_refiner_folder, tmp_path, value, read):
    folder = Path(shutil.copytree(sdxl_refiner_folder, tmp_path / "pipe"))
    index = json.loads((folder / "model_index.json").read_text())
    index.pop("force_zeros_for_empty_prompt")
    if value is not None:                                       # None: the folder does not say
        index["force_zeros_for_empty_prompt"] = value
    (folder / "model_index.json").write_text(json.dumps(index))
    assert plan_checkpoint(folder).report.zero_empty_negative is read


def test_force_zeros_for_empty_prompt_must_be_true_or_false(sdxl_refiner_folder, tmp_path):
    folder = Path(shutil.copytree(sdxl_refiner_folder, tmp_path / "pipe"))
    _edit(folder, "model_index.json", force_zeros_for_empty_prompt="no")
    with pytest.raises(CheckpointError, match=r"model_index.json: force_zeros_for_empty_prompt must be true or false"):
        plan_checkpoint(folder)


def test_force_zeros_for_empty_prompt_is_not_read_for_a_family_that_never_zeroes(folder):
    """SD1 / SD2 encode an empty negative prompt as "": diffusers' StableDiffusionPipeline has no such setting."""
    _edit(folder, "model_index.json", force_zeros_for_empty_prompt=True)
    assert plan_checkpoint(folder).report.zero_empty_negative is None


@pytest.mark.parametrize("given, says", [
    ("unet", "this is a diffusers UNet2DConditionModel folder (one part of a pipeline), not a whole model; use it "
             "with --model with the whole pipeline: {pipe}"),
    ("text_encoder", "this is a diffusers CLIPTextModel folder (one part of a pipeline), not a whole model; use it "
                     "with --model with the whole pipeline: {pipe}"),
    ("vae", "this is a VAE, not a whole model; use it with --vae PATH (in place of the model's own VAE)"),
    ("models", "not a diffusers pipeline folder (no model_index.json); it holds 1 checkpoint file(s), pass one: "
               "a.safetensors"),
    ("empty", "not a diffusers pipeline folder (no model_index.json)"),
])
def test_a_folder_that_is_no_pipeline_says_what_it_is(folder, tmp_path, capsys, given, says):
    """A pipeline's unet/ (or text_encoder/, vae/) given as the model names the pipeline folder to pass (or --vae),
    as `sdlab inspect` describes it; a models folder names its checkpoint files. Before: one line for all,
    '<folder>/model_index.json: missing'."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "a.safetensors").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    path = folder / given if (folder / given).is_dir() else tmp_path / given
    with pytest.raises(CheckpointError) as err:
        plan_checkpoint(path)
    assert str(err.value) == f"{path}: " + says.format(pipe=folder.resolve())
    code = main(["txt2img", "a cat", "--model", str(path), "--out", str(tmp_path / "a.png"), "--steps", "1"])
    assert code == 2 and capsys.readouterr().err.strip() == f"sdlab: error: {err.value}"
    assert not (tmp_path / "a.png").exists()


def test_a_folder_without_vae_draws_with_the_vae_given(folder, pristine, tmp_path, capsys):
    """A pipeline folder without vae/ and a --vae (diffusers' `from_pretrained(folder, vae=...)`): drawn with that
    VAE, the picture of the whole folder with the same --vae; without one, one error naming vae/ and --vae.
    Before: '<folder>/vae/config.json: missing' either way."""
    import numpy as np

    import sdlab

    shutil.rmtree(folder / "vae")
    vae = pristine / "vae"
    with pytest.raises(CheckpointError) as err:
        plan_checkpoint(folder)
    assert str(err.value) == f"{folder}: sd1 folder has no vae/; pass a VAE file or folder (vae=... / --vae)"
    assert plan_checkpoint(folder, vae=vae).report.to_json()["default_size"] == plan_checkpoint(pristine).report.to_json()["default_size"]
    options = dict(steps=2, width=32, height=32, seed=5)
    ours = sdlab.load(folder, vae=vae).txt2img("a red house", **options).images[0]
    whole = sdlab.load(pristine, vae=vae).txt2img("a red house", **options).images[0]
    assert np.array_equal(np.asarray(ours), np.asarray(whole))
    out = tmp_path / "cli.png"
    assert main(["txt2img", "a red house", "--model", str(folder), "--vae", str(vae), "--steps", "2", "--width", "32",
                 "--height", "32", "--seed", "5", "--no-progress", "--out", str(out)]) == 0, capsys.readouterr().err
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(whole.convert("RGB")))
