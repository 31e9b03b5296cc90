"""Token merging (ToMe for SD) against its reference, `tomesd` 0.1.3 (test-only, installed with --no-deps).

The matching alone is compared with `tomesd.merge.bipartite_soft_matching_random2d` on grids that the 2 x 2
cells divide and grids they do not; the U-Net with `tomesd.apply_patch` on diffusers' UNet2DConditionModel
holding the same random weights (reduced SD1 / SD2 / SDXL layouts of tests/test_unet.py), at ratios 0.3 and 0.5,
max_downsample 1 and 2, on latents of 16 x 16 (tokens divide), 18 x 14 and 17 x 13 (they do not), with A1111's
use_rand=False and with tomesd's random destinations from one seeded generator. Tolerance: 1e-5 on outputs of
about 1, where merging itself moves them by 3e-4 .. 4e-3 (measured; each case asserts its effect exceeds 1e-4,
so that a test that merged nothing could not pass).
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_unet import SMALL, _diffusers_unet, _inputs, _sdlab_from
from tomesd import apply_patch, remove_patch
from tomesd.merge import bipartite_soft_matching_random2d

from sdlab.models import cpu_attention
from sdlab.models.token_merging import MergingCall, TokenMerging, bipartite_soft_matching, merging_tokens

TOLERANCE = 1e-5
LEAST_EFFECT = 1e-4


@pytest.mark.parametrize("w, h", [(8, 8), (7, 5), (6, 9)])
@pytest.mark.parametrize("random", [False, True])
def test_matching_is_tomesds(w, h, random):
    gen = torch.Generator().manual_seed(0)
    metric = torch.randn(3, w * h, 16, generator=gen)
    values = torch.randn(3, w * h, 24, generator=gen)
    r = (w * h) // 2
    theirs = bipartite_soft_matching_random2d(metric, w, h, 2, 2, r, no_rand=not random,
                                              generator=torch.Generator().manual_seed(7))
    ours = bipartite_soft_matching(metric, w, h, 2, 2, r, torch.Generator().manual_seed(7) if random else None)
    merged, reference = ours[0](values), theirs[0](values)
    assert merged.shape == reference.shape == (3, w * h - min(r, w * h - (w // 2) * (h // 2)), 24)
    # the same merged tokens (tomesd's unstable argsort may list them in another order, which attention,
    # blind to token order, does not see), and each token given back the same row
    torch.testing.assert_close(_rows_sorted(merged), _rows_sorted(reference), atol=1e-6, rtol=0)
    torch.testing.assert_close(ours[1](merged), theirs[1](reference), atol=1e-6, rtol=0)


def _rows_sorted(x: torch.Tensor) -> torch.Tensor:
    """x (B, N, C) with each batch's rows in the order of their first value."""
    return x.gather(1, x[..., :1].argsort(dim=1).expand_as(x))


def test_unmerge_gives_every_merged_token_its_destinations_row():
    """Tokens that are copies of one another merge without loss: unmerge(merge(x)) is x where each 2 x 2 cell
    holds one value."""
    cell = torch.randn(1, 4, 4, 8)                                                   # (B, h/2, w/2, C)
    x = cell.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2).reshape(1, 64, 8)
    merge, unmerge = bipartite_soft_matching(x, 8, 8, 2, 2, 48)
    torch.testing.assert_close(unmerge(merge(x)), x)


_PAIRS: dict[str, tuple] = {}


def _pair(name: str):
    """(config, diffusers reference without tomesd's patch, sdlab U-Net of its weights), built once per module."""
    if name not in _PAIRS:
        cfg = SMALL[name]
        reference = _diffusers_unet(cfg, seed=0)
        _PAIRS[name] = cfg, reference, _sdlab_from(reference, cfg)
    cfg, reference, model = _PAIRS[name]
    remove_patch(reference)
    return cfg, reference, model


def _guided_inputs(cfg, height, width, batch=2):
    """A guided step's inputs: equal latent halves at one timestep (sdlab runs the halves once up to the first
    cross-attention: `shared_rows`), two prompts."""
    x, _, context, y, added = _inputs(cfg, height, width)
    rows = [i % 2 for i in range(batch)]
    x = x[:1].expand(batch, -1, -1, -1).contiguous()
    context = context[rows]
    if y is not None:
        y = y[rows]
        added = {"added_cond_kwargs": {k: v[rows] for k, v in added["added_cond_kwargs"].items()}}
    return x, torch.full((batch,), 500.0), context, y, added


@pytest.mark.parametrize("name, height, width, ratio, max_downsample", [
    *(("sd1", height, width, ratio, 1) for height, width in [(16, 16), (18, 14), (17, 13)] for ratio in (0.3, 0.5)),
    ("sd1", 17, 13, 0.5, 2), ("sd2", 16, 16, 0.5, 1), ("sd2", 17, 13, 0.3, 2),
    ("sdxl", 18, 14, 0.5, 1), ("sdxl", 18, 14, 0.5, 2),
])
def test_unet_matches_tomesd_on_diffusers(name, height, width, ratio, max_downsample):
    cfg, reference, model = _pair(name)
    x, t, context, y, added = _guided_inputs(cfg, height, width)
    with torch.no_grad():
        plain = reference(x, t, context, **added).sample
        apply_patch(reference, ratio=ratio, max_downsample=max_downsample, use_rand=False)
        expected = reference(x, t, context, **added).sample
        with merging_tokens(model, TokenMerging(ratio, max_downsample=max_downsample)):
            actual = model(x, t, context, y)
    torch.testing.assert_close(actual, expected, atol=TOLERANCE, rtol=0)
    effect = (expected - plain).abs().max()
    if name == "sdxl" and max_downsample == 1:
        assert effect == 0      # SDXL has no transformer at the full-resolution level (A1111's note)
    else:
        assert effect > LEAST_EFFECT


@pytest.mark.parametrize("batch", [2, 3])
def test_random_destinations_match_tomesd_with_one_generator(batch):
    """tomesd's use_rand draws each cell's destination from one generator, call after call; for a batch of odd
    size it takes the corner (its note: the prompt's and the negative's rows could not be told apart)."""
    cfg, reference, model = _pair("sd1")
    x, t, context, y, _ = _guided_inputs(cfg, 18, 14, batch)
    with torch.no_grad():
        apply_patch(reference, ratio=0.5, max_downsample=2, use_rand=True)
        reference._tome_info["args"]["generator"] = torch.Generator().manual_seed(5)
        expected = [reference(x, t, context).sample for _ in range(2)]
        with merging_tokens(model, TokenMerging(0.5, max_downsample=2, generator=torch.Generator().manual_seed(5))):
            actual = [model(x, t, context) for _ in range(2)]
        with merging_tokens(model, TokenMerging(0.5, max_downsample=2)):
            corner = model(x, t, context)
    for ours, theirs in zip(actual, expected):
        torch.testing.assert_close(ours, theirs, atol=TOLERANCE, rtol=0)
    if batch % 2 == 0:
        assert (expected[1] - expected[0]).abs().max() > LEAST_EFFECT      # the second call drew other cells
        assert (corner - expected[0]).abs().max() > LEAST_EFFECT
    else:
        torch.testing.assert_close(corner, expected[0], atol=TOLERANCE, rtol=0)


def test_bf16_cpu_attention_path_merges_as_fp32():
    """bf16 on the CPU, 48 x 48 latents where the CPU has sdlab's own bf16 attention kernel: 2,304 tokens merge to
    1,152, still enough for the kernel (`cpu_attention.MIN_TOKENS`); elsewhere bf16 attention is PyTorch's at any
    size, so 16 x 16 latents test that path (bf16 is emulated there, 9x the fp32 time). The bf16 U-Net with merging
    stays as close to the fp32 one with merging as bf16 without merging stays to fp32 without (within 2x), and
    merging moves both."""
    side = 48 if cpu_attention.runs_here() else 16
    cfg, _, model = _pair("sd1")
    x, t, context, y, _ = _guided_inputs(cfg, side, side)
    low = copy.deepcopy(model).to(torch.bfloat16)
    setting = TokenMerging(0.5)
    with torch.no_grad():
        fp32 = model(x, t, context)
        bf16 = low(x, t, context).float()
        with merging_tokens(model, setting), merging_tokens(low, setting):
            fp32_merged = model(x, t, context)
            bf16_merged = low(x, t, context).float()
    plain_error = (bf16 - fp32).abs().max()
    assert (bf16_merged - fp32_merged).abs().max() <= 2 * plain_error
    assert (fp32_merged - fp32).abs().max() > LEAST_EFFECT
    assert (bf16_merged - bf16).abs().max() > LEAST_EFFECT


def test_merging_tokens_holds_for_its_block():
    _, _, model = _pair("sd1")
    setting = TokenMerging(0.5)
    assert model.token_merging is None
    with pytest.raises(RuntimeError):
        with merging_tokens(model, setting):
            assert model.token_merging is setting
            with merging_tokens(model, TokenMerging(0.0)):
                assert model.token_merging is None          # ratio 0: no merging
            assert model.token_merging is setting
            raise RuntimeError
    assert model.token_merging is None


def test_a_level_coarser_than_max_downsample_does_not_merge():
    call = MergingCall(TokenMerging(0.5, max_downsample=2), (17, 13), 2)
    assert call.matching(torch.randn(2, 17 * 13, 8)) is not None            # full resolution
    assert call.matching(torch.randn(2, 9 * 7, 8)) is not None              # 1/2: ceil(sqrt(221 // 63)) = 2
    assert call.matching(torch.randn(2, 5 * 4, 8)) is None                  # 1/4


@pytest.mark.parametrize("changes, message", [
    ({"ratio": 1.0}, "ratio must lie in"), ({"ratio": -0.1}, "ratio must lie in"),
    ({"max_downsample": 3}, "max_downsample must be"), ({"sx": 0}, "sx and sy"),
])
def test_bad_settings_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        TokenMerging(**{"ratio": 0.5, **changes})


# ---------------------------------------------------------------------------------------------------------
# a sampled picture: diffusers' StableDiffusionPipeline with tomesd's patch, sdlab's pipeline with the request's
# ratio, on one diffusers folder of the tiny SD1 bundle (tests/test_pipeline_parity.py's setup), Euler, 5 steps


@pytest.mark.usefixtures("one_thread")
def test_a_sampled_picture_matches_diffusers_with_tomesd(tmp_path_factory):
    from diffusers import StableDiffusionPipeline
    from picture_parity import CFG, MAX_PIXEL_DIFF, PROMPT, SEED, STEPS, max_pixel_diff
    from test_pipeline_parity import _folder, _quiet, _schedulers

    import sdlab
    from sdlab.pipeline.generate import sample_latents
    from sdlab.pipeline.request import GenerationRequest

    folder = _folder(tmp_path_factory, "sd1")
    ours = sdlab.load(folder)
    pipe = _quiet(StableDiffusionPipeline.from_pretrained(folder, local_files_only=True))
    pipe.scheduler, options = _schedulers(pipe.scheduler.config)["euler"]
    size = 64                                       # 32 x 32 latents: 1,024 tokens at the full-resolution level

    def reference(output_type: str):
        return pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=CFG, width=size, height=size,
                    generator=[torch.Generator().manual_seed(SEED)], output_type=output_type).images

    def request(ratio: float) -> GenerationRequest:
        return GenerationRequest(PROMPT, steps=STEPS, cfg_scale=CFG, seed=SEED, width=size, height=size,
                                 token_merging_ratio=ratio, **options)

    plain = reference("latent")
    plain_diff = (sample_latents(ours.bundle, request(0.0)) - plain).abs().max()
    apply_patch(pipe.unet, ratio=0.5, use_rand=False)
    expected, pictures = reference("latent"), reference("np")
    actual = sample_latents(ours.bundle, request(0.5))
    merged_diff = (actual - expected).abs().max()
    # merging adds no disagreement of its own: sdlab and diffusers differ as much as without it (measured 1.41e-4
    # without, 1.36e-4 with, on latents up to 23.5, float32 over 5 steps), where merging moves them by 1.3e-2
    assert merged_diff <= 2 * plain_diff + 1e-5, (merged_diff, plain_diff)
    assert (expected - plain).abs().max() > 50 * merged_diff
    assert max_pixel_diff(ours.run(request(0.5)).images, pictures) <= MAX_PIXEL_DIFF
