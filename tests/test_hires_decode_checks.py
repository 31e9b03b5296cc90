"""The hires fix's intermediate decodes (the first pass's pictures handed to `first_pass`, a 9-channel inpainting
model's upscaled pictures) are checked for NaN / Inf as the final pictures are: one `decode_latents`."""

from __future__ import annotations

import math

import pytest
import torch

from bundle_fixtures import tiny_bundle
from sdlab.pipeline.generate import NonFiniteError
from sdlab.pipeline.hires import generate_hires
from sdlab.pipeline.plan import make_plan
from sdlab.pipeline.request import GenerationRequest

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 32                   # pixels; the tiny VAE has factor 2


def _nan_at_first_decode(bundle) -> list[int]:
    """Make the bundle's VAE decode NaN at its first call only; the list counts the calls."""
    calls = []
    decode = bundle.vae.decode

    def first_nan(z: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        out = decode(z)                                                     # (1, 3, H, W)
        return out * math.nan if len(calls) == 1 else out

    bundle.vae.decode = first_nan
    return calls


def _request(**kwargs) -> GenerationRequest:
    return GenerationRequest("a cube", steps=2, seed=1, width=SIZE, height=SIZE, hr_scale=1.5, hr_denoise=0.5,
                             hr_upscaler="Latent", **kwargs)


def test_a_nan_first_pass_decode_is_refused_not_handed_to_first_pass():
    bundle = tiny_bundle("sd1", seed=3)
    calls = _nan_at_first_decode(bundle)
    handed = []
    with pytest.raises(NonFiniteError, match="the VAE decoded NaN or Inf"):
        generate_hires(bundle, make_plan(bundle, _request()), first_pass=handed.append)
    assert len(calls) == 1 and handed == []


def test_a_nan_decode_of_an_inpainting_models_upscaled_pictures_is_named_as_the_vaes():
    bundle = tiny_bundle("sd1-inpaint", seed=3)
    _nan_at_first_decode(bundle)                    # the upscaled latent's pictures (Conditional mask weight < 1)
    with pytest.raises(NonFiniteError, match="the VAE decoded NaN or Inf"):
        generate_hires(bundle, make_plan(bundle, _request(inpainting_mask_weight=0.5)))
