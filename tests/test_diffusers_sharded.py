"""Sharded diffusers folders as `save_pretrained(max_shard_size=...)` writes them (an fp32 SDXL U-Net is over
diffusers' default 10 GB shard size): safetensors and `.bin` shards, with and without the fp16 variant
(whose index is `*.safetensors.index.fp16.json`). sdlab reads the same weights as from the unsharded folder."""

from __future__ import annotations

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
