"""A prompt and a negative prompt with different chunk counts (`make_cond`, `repeat_to_common_length`).

Reference: A1111's default (`CFGDenoiser.forward` with `pad_cond_uncond` and `pad_cond_uncond_v0` off)
encodes each prompt at its own length and runs the U-Net on the uncond in a pass of its own when the lengths
differ; the U-Net prediction of each prompt alone is that reference here. sdlab repeats the shorter context
(ComfyUI's `CONDCrossAttn.concat`), which must give the same prediction up to float rounding: TOL = 1e-5 on
eps of magnitude ~1 (padding with encodings of "" instead differs by ~2e-2 on these tiny weights).
"""

from __future__ import annotations

import math

import pytest
import torch
from bundle_fixtures import tiny_bundle

from sdlab.diffusion.guidance import cfg
from sdlab.pipeline.conditioning import encode_prompt, make_cond

TOL = 1e-5
PHRASE = "a red house on a hill"                     # 6 tokens; ", " adds one


def _chunks(n: int, phrase: str = PHRASE) -> str:
    """A prompt of exactly `n` chunks (10 phrases of 7 tokens fill one chunk's 75 places with room to spare)."""
    return " BREAK ".join([", ".join([phrase] * 10)] * n)


@pytest.fixture(scope="module")
def sd1():
    return tiny_bundle("sd1", seed=0)


def _eps(bundle, context: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    x = torch.randn(context.shape[0], bundle.unet_config.in_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.full((context.shape[0],), 500.0)
    return bundle.unet(x, t, context, y)                                                  # (B, 4, 8, 8)


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.mark.parametrize("n_pos, n_neg", [(2, 1), (1, 2), (2, 3), (4, 2)])
@torch.no_grad()
def test_each_prompt_predicts_as_if_alone(sd1, n_pos, n_neg):
    prompt, negative = _chunks(n_pos), _chunks(n_neg, "blurry lowres watermark")
    cond, uncond = make_cond(sd1.text_encoders, sd1.family, prompt, negative, batch_size=2)
    common = 77 * math.lcm(n_pos, n_neg)
    assert cond["context"].shape[1] == uncond["context"].shape[1] == common
    for got, text in ((cond, prompt), (uncond, negative)):
        alone = encode_prompt(sd1.text_encoders, text).context                           # (1, 77 n, D)
        assert _max_err(_eps(sd1, got["context"]), _eps(sd1, alone.expand(2, -1, -1))) < TOL


@torch.no_grad()
def test_short_negative_is_not_padded_with_the_empty_prompt(sd1):
    """The audit's case: the repeated negative, not "" chunks, fills the second 77 tokens."""
    cond, uncond = make_cond(sd1.text_encoders, sd1.family, _chunks(2), "blurry, lowres")
    alone = encode_prompt(sd1.text_encoders, "blurry, lowres").context
    assert torch.equal(uncond["context"], alone.repeat(1, 2, 1))


@torch.no_grad()
def test_far_apart_lengths_run_as_two_passes(sd1):
    """1 and 5 chunks: repeating would make the negative 5x longer (ComfyUI's limit is 4x); the contexts keep
    their lengths and guidance runs two U-Net passes, with the same result as A1111's separate passes."""
    prompt, negative = _chunks(5), "blurry"
    cond, uncond = make_cond(sd1.text_encoders, sd1.family, prompt, negative)
    assert (cond["context"].shape[1], uncond["context"].shape[1]) == (5 * 77, 77)
    calls = []

    def denoiser(x, sigma, context, y=None):
        calls.append(context.shape)
        return _eps(sd1, context)

    x = torch.zeros(1, 4, 8, 8)
    guided = cfg(denoiser, cond, uncond, 7.0)(x, torch.tensor([1.0]))
    assert len(calls) == 2
    e_c = _eps(sd1, encode_prompt(sd1.text_encoders, prompt).context)
    e_u = _eps(sd1, encode_prompt(sd1.text_encoders, negative).context)
    assert _max_err(guided, e_u + 7.0 * (e_c - e_u)) < 1e-4


@torch.no_grad()
def test_sdxl_keeps_each_prompts_pooled_vector():
    bundle = tiny_bundle("sdxl", seed=0)
    prompt, negative = _chunks(2), "blurry, lowres"
    cond, uncond = make_cond(bundle.text_encoders, bundle.family, prompt, negative, width=64, height=64)
    assert cond["context"].shape == uncond["context"].shape
    for got, text in ((cond, prompt), (uncond, negative)):
        alone_cond, _ = make_cond(bundle.text_encoders, bundle.family, text, guidance=False, width=64, height=64)
        assert _max_err(got["y"], alone_cond["y"]) < 1e-6          # encoded in another batch: float rounding
        assert _max_err(_eps(bundle, got["context"], got["y"]), _eps(bundle, alone_cond["context"], alone_cond["y"])) < TOL


def test_repeat_to_common_length_shapes():
    from sdlab.pipeline.conditioning import PromptEmbedding, repeat_to_common_length

    embeddings = [PromptEmbedding(torch.randn(1, 77 * n, 8)) for n in (2, 3)]
    repeated = repeat_to_common_length(embeddings)
    assert [e.num_chunks for e in repeated] == [6, 6]
    assert torch.equal(repeated[1].context[:, 3 * 77 :], embeddings[1].context)
    far = [PromptEmbedding(torch.randn(1, 77 * n, 8)) for n in (3, 5)]
    assert [e.num_chunks for e in repeat_to_common_length(far, max_factor=4)] == [3, 5]
    assert [e.num_chunks for e in repeat_to_common_length(far)] == [15, 15]
