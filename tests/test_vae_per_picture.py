"""The VAE decodes (and encodes) one picture at a time, as A1111 does (`processing.decode_latent_batch`:
``for i in range(batch.shape[0]): decode_first_stage(model, batch[i:i + 1])``): the decode's memory is one
picture's whatever the batch, and each picture is the one a batch of one gives."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from bundle_fixtures import tiny_bundle

from sdlab.diffusion.noise import generators_for
from sdlab.pipeline.generate import decode_latents, encode_image

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _batch_sizes(bundle, method: str, calls: list[int]):
    real = getattr(bundle.vae, method)

    def spy(x, *args, **kwargs):
        calls.append(x.shape[0])
        return real(x, *args, **kwargs)
    return spy


@pytest.mark.parametrize("tiled", [False, True])
def test_a_batch_is_decoded_one_picture_at_a_time(monkeypatch, tiled):
    """A batch of 3 latents: the decoder is called with one picture each time (tiled or not), and the pictures
    are those of decoding each latent alone (before: one call with all 3)."""
    bundle = tiny_bundle("sd1", seed=5)
    latents = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    alone = [decode_latents(bundle, latents[i:i + 1], tiled=tiled) for i in range(3)]
    calls: list[int] = []
    monkeypatch.setattr(bundle.vae, "decode", _batch_sizes(bundle, "decode", calls))
    pictures = decode_latents(bundle, latents, tiled=tiled)
    assert calls and set(calls) == {1}
    assert torch.equal(pictures, torch.cat(alone))


def test_init_pictures_are_encoded_one_at_a_time(monkeypatch):
    """Two init pictures and a batch of 4: the encoder sees one picture per call, and the latents (posterior
    samples of picture i % 2 from seed i's generator, and the means) are those of encoding each alone."""
    bundle = tiny_bundle("sd1", seed=5)
    pixels = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(1)) * 2 - 1
    means = [encode_image(bundle, pixels[i:i + 1]) for i in range(2)]
    samples = [encode_image(bundle, pixels[i % 2:i % 2 + 1], generators_for([10 + i])) for i in range(4)]
    calls: list[int] = []
    monkeypatch.setattr(bundle.vae, "moments", _batch_sizes(bundle, "moments", calls))
    assert torch.equal(encode_image(bundle, pixels), torch.cat(means))
    assert torch.equal(encode_image(bundle, pixels, generators_for([10, 11, 12, 13])), torch.cat(samples))
    assert calls == [1, 1, 1, 1]


def test_the_memory_estimate_counts_one_picture_of_decode():
    """`estimate_bytes`: where the decode is the largest phase, a batch of 4 needs one picture's decode plus the 4
    decoded pictures, not 4 decodes (a request A1111 draws is not refused)."""
    from sdlab.pipeline.memory import PICTURE_BYTES_PER_PIXEL, estimate_bytes
    from sdlab.pipeline.request import GenerationRequest, resolve

    bundle = tiny_bundle("sd1", seed=5)
    bundle = replace(bundle, unet_config=replace(bundle.unet_config, model_channels=4))    # a light U-Net step

    def estimate(batch: int) -> int:
        req = resolve(GenerationRequest("x", cfg_scale=1.0, width=256, height=256, batch_size=batch),
                      default_size=64, default_sampler="Euler", default_schedule="normal", factor=2)
        return estimate_bytes(bundle, req)

    assert estimate(4) - estimate(1) == 3 * PICTURE_BYTES_PER_PIXEL * 256 * 256
