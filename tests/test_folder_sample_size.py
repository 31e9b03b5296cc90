"""A diffusers folder's native size: `unet/config.json` `sample_size` x the VAE factor.

diffusers' pipelines draw at `unet.config.sample_size * vae_scale_factor` when no size is given
(`StableDiffusionXLPipeline.default_sample_size`); SDXL-Turbo's folder says 64, so it draws at 512 px, the
size it was distilled at, where the SDXL family default is 1024. sdlab's default size for a folder is the
same; a folder without `sample_size`, and a single file without `modelspec.resolution`, keep the family's.
"""

from __future__ import annotations

import json

import pytest
from bundle_fixtures import tiny_bundle, write_diffusers_folder

import sdlab
from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.load import plan_checkpoint
from sdlab.cli import main
from sdlab.pipeline.request import GenerationRequest

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    return write_diffusers_folder(tiny_bundle("sdxl", seed=5), tmp_path_factory.mktemp("sdxl") / "pipe")


def _with_sample_size(folder, value):
    path = folder / "unet" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "sample_size": value}))
    return folder


def test_turbo_sample_size_is_the_default_size_as_in_diffusers(sdxl_folder, capsys):
    from diffusers import StableDiffusionXLPipeline

    folder = _with_sample_size(sdxl_folder, 64)                     # stabilityai/sdxl-turbo's unet config
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    diffusers_default = pipe.default_sample_size * pipe.vae_scale_factor
    ours = sdlab.load(folder)
    assert ours.bundle.default_size == diffusers_default == 64 * 2          # tiny VAE: factor 2
    request = ours.resolve(GenerationRequest(prompt="a fox", steps=1)).request    # no size given
    assert (request.width, request.height) == (diffusers_default, diffusers_default)
    assert main(["inspect", str(folder), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["default_size"] == diffusers_default


def test_square_sample_size_pair_and_missing_sample_size(sdxl_folder):
    assert plan_checkpoint(_with_sample_size(sdxl_folder, [48, 48])).report.native_size == 96
    assert plan_checkpoint(_with_sample_size(sdxl_folder, [48, 32])).report.native_size is None   # not square
    bundle = sdlab.load(_with_sample_size(sdxl_folder, None)).bundle
    assert bundle.native_size is None and bundle.default_size == 1024                  # the family's


def test_bad_sample_size_is_refused(sdxl_folder):
    with pytest.raises(CheckpointError, match="sample_size"):
        plan_checkpoint(_with_sample_size(sdxl_folder, "big"))
