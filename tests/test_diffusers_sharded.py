"""Sharded diffusers folders as `save_pretrained(max_shard_size=...)` writes them (an fp32 SDXL U-Net is over
diffusers' default 10 GB shard size): safetensors and `.bin` shards, with and without the fp16 variant
(whose index is `*.safetensors.index.fp16.json`). sdlab reads the same weights as from the unsharded folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from bundle_fixtures import tiny_bundle, write_diffusers_folder

import sdlab


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from diffusers import StableDiffusionPipeline

    folder = write_diffusers_folder(tiny_bundle("sd1", seed=4), tmp_path_factory.mktemp("plain") / "pipe")
    return folder, StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)


@pytest.mark.parametrize("safe", [True, False])
@pytest.mark.parametrize("variant", [None, "fp16"])
def test_sharded_folders_load_the_same_weights(pipeline, safe, variant, tmp_path):
    folder, pipe = pipeline
    sharded = tmp_path / "sharded"
    pipe.save_pretrained(sharded, safe_serialization=safe, variant=variant, max_shard_size="300KB")
    indexes = sorted(p.name for p in (sharded / "unet").glob("*.index*.json"))
    assert len(indexes) == 1 and len(list((sharded / "unet").iterdir())) > 3   # really sharded
    if variant:
        assert indexes[0].endswith(".index.fp16.json")
    expected, ours = sdlab.load(folder).bundle, sdlab.load(sharded).bundle
    for a, b in ((expected.unet, ours.unet), (expected.vae, ours.vae), (expected.text_encoders[0].model,
                                                                         ours.text_encoders[0].model)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for key in sa:
            torch.testing.assert_close(sb[key], sa[key].to(sb[key].dtype), rtol=0, atol=0)


def test_the_plain_weights_are_read_before_a_variant_and_named(pipeline, tmp_path, caplog):
    """A U-Net folder with the plain `.bin` and a `.fp16.safetensors` variant (different weights here): sdlab
    reads the `.bin`, as diffusers does without `variant=` (before, it took the fp16 safetensors), logs which
    file it reads and which it leaves, and the report's origin (`sdlab inspect`) is that file."""
    import logging
    import shutil

    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file, save_file

    from sdlab.checkpoints.load import plan_checkpoint

    folder, _ = pipeline
    both = Path(shutil.copytree(folder, tmp_path / "both"))
    plain = load_file(both / "unet" / "diffusion_pytorch_model.safetensors")
    (both / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(plain, both / "unet" / "diffusion_pytorch_model.bin")
    save_file({k: (v + 1).half() for k, v in plain.items()}, both / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    with caplog.at_level(logging.INFO, logger="sdlab"):
        plan = plan_checkpoint(both)
    assert plan.unet.origin == str(both / "unet" / "diffusion_pytorch_model.bin")
    assert any("reading diffusion_pytorch_model.bin (also there, not read: diffusion_pytorch_model.fp16.safetensors)"
               in r.getMessage() for r in caplog.records)
    theirs = UNet2DConditionModel.from_pretrained(both / "unet").state_dict()
    key = "conv_in.weight"
    torch.testing.assert_close(plan.unet.state[key], plain[key], rtol=0, atol=0)
    torch.testing.assert_close(theirs[key], plain[key], rtol=0, atol=0)
