"""Training and inference condition the U-Net the same way.

The U-Net training task (`sdlab.train.unet_task`) and the generate pipeline (`make_cond`) share one
conditioning code (`sdlab.pipeline.conditioning`). For each family's tiny bundle, what the task feeds the
U-Net for a caption (context, SDXL's added vector ``y`` with its pooled text part) must equal what
``make_cond`` computes for that caption as a prompt, with the same size / crop numbers, so a fine-tune
cannot drift from the model it is sampled with.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from bundle_fixtures import tiny_bundle
from sdlab.pipeline.conditioning import encode_prompt, make_cond
from sdlab.train.task import Batch
from sdlab.train.unet_task import UNetTask, UNetTaskOptions

CAPTIONS = ["a photo of a red cube on a wooden table", "two small dogs, watercolor"]
ORIGINAL_SIZES = [(40, 24), (16, 32)]     # (height, width) of the source images
CROPS = [(0, 4), (8, 0)]                  # (top, left)
LATENT_SIDE = 4


def _fed_to_unet(task: UNetTask, batch: Batch) -> tuple[Tensor, Tensor | None]:
    """(context, y) the task's loss passes to the U-Net for `batch`."""
    seen: dict[str, Tensor | None] = {}

    def recording_unet(x_t: Tensor, t: Tensor, context: Tensor, y: Tensor | None = None) -> Tensor:
        seen["context"], seen["y"] = context.detach(), None if y is None else y.detach()
        return torch.zeros_like(x_t)

    task._unet_call = recording_unet
    task.loss(batch, torch.Generator().manual_seed(0))
    return seen["context"], seen["y"]


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl", "sdxl-refiner"])
@pytest.mark.parametrize("with_sizes", [False, True], ids=["default-sizes", "batch-sizes"])
def test_training_feeds_the_unet_what_generate_computes(family, with_sizes):
    bundle = tiny_bundle(family, seed=3)
    task = UNetTask(bundle, UNetTaskOptions(caption_dropout=0.0))
    channels = bundle.unet_config.in_channels
    latents = torch.randn(len(CAPTIONS), channels, LATENT_SIDE, LATENT_SIDE, generator=torch.Generator().manual_seed(1))
    batch = Batch(images=None, captions=list(CAPTIONS), latents=latents, seeds=[11, 12],
                  original_sizes=list(ORIGINAL_SIZES) if with_sizes else [],
                  crops_top_left=list(CROPS) if with_sizes else [])
    with torch.no_grad():
        context, y = _fed_to_unet(task, batch)

    side = LATENT_SIDE * bundle.vae_config.downsample_factor          # the training image size in pixels
    assert (y is not None) == bundle.family.is_sdxl
    for i, caption in enumerate(CAPTIONS):
        sizes = {"original_size": ORIGINAL_SIZES[i], "crops_coords_top_left": CROPS[i]} if with_sizes else {}
        with torch.no_grad():
            cond, uncond = make_cond(bundle.text_encoders, bundle.family, caption, guidance=False, width=side,
                                     height=side, adm_width=bundle.unet_config.adm_in_channels, **sizes)
            pooled = encode_prompt(bundle.text_encoders, caption, with_pooled=bundle.family.is_sdxl).pooled
        assert uncond is None
        torch.testing.assert_close(context[i : i + 1], cond["context"])            # (1, 77, D)
        if bundle.family.is_sdxl:
            torch.testing.assert_close(y[i : i + 1], cond["y"])                    # (1, adm)
            torch.testing.assert_close(y[i : i + 1, : pooled.shape[1]], pooled)    # the pooled text part
        else:
            assert "y" not in cond


def test_refiner_is_one_predicate_of_the_family():
    """The refiner is the family whose added vector has the aesthetic score (5 size embeddings, not 6)."""
    from sdlab.families import get_family

    assert [n for n in ("sd1", "sd2", "sdxl", "sdxl-inpaint", "sdxl-refiner") if get_family(n).is_refiner] == [
        "sdxl-refiner"]
