"""A1111's guidance options: NGMS (`s_min_uncond`, `s_min_uncond_all`), Skip Early CFG (`skip_early_cond`), Pad conds
(`pad_cond_uncond`) and Pad conds v0 (`pad_cond_uncond_v0`): drawn as A1111 1.10 draws them, written and read with
its labels, taken from its API and options.

The reference is A1111's `CFGDenoiser` (AUTOMATIC1111/stable-diffusion-webui modules/sd_samplers_cfg_denoiser.py,
`forward`, `pad_cond_uncond`, `pad_cond_uncond_v0`, `combine_denoised`; `Sampler.launch_sampling` and
`SamplerData.total_steps` of modules/sd_samplers_common.py), transcribed below without its callbacks, edit-model
and mask branches, run by k-diffusion's sampling functions on the tiny U-Net sdlab draws with."""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import numpy as np
import pytest
import torch

import sampler_harness as H
from bundle_fixtures import tiny_bundle, write_original
from cli_helpers import pixels, run
from sdlab.checkpoints.load import load_bundle
from sdlab.diffusion.denoiser import Denoiser
from sdlab.diffusion.guidance import a1111_skips, cfg, skipping_uncond
from sdlab.diffusion.noise import generators_for
from sdlab.pipeline.conditioning import (
    empty_context_once, empty_prompt_context, encode_prompt, make_cond, pad_cond_uncond,
)
from sdlab.pipeline.generate import _start, generate, sample_latents
from sdlab.pipeline.infotext import from_parameters, to_parameters, undrawn_labels
from sdlab.pipeline.plan import make_plan
from sdlab.pipeline.png_info import format_parameters, parse_parameters
from sdlab.pipeline.request import GenerationRequest, RequestError
from sdlab.server.a1111 import OPTION_DEFAULTS, Txt2ImgIn
from sdlab.server.a1111 import _request as _api_request
from sdlab.server.inputs import BadRequest

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

KD = H.load_k_diffusion_sampling()
TOL = 1e-6                     # measured: 0 (bit-equal) for every case here
PHRASE = "a red house on a hill"


def _chunks(n: int, phrase: str = PHRASE) -> str:
    """A prompt of exactly `n` chunks, each its own text (9 phrases of 8 tokens fill 72 of a chunk's 75 places)."""
    return " BREAK ".join(", ".join([f"{phrase} {i}"] * 9) for i in range(n))


# ---------------------------------------------------------------- A1111's CFGDenoiser, transcribed

def pad_cond(tensor, repeats, empty):
    return torch.cat([tensor, empty.repeat((tensor.shape[0], repeats, 1))], axis=1)


class A1111CFGDenoiser:
    """`CFGDenoiser` of A1111 1.10 (sd_samplers_cfg_denoiser.py): `forward` as written there for a plain text model
    (no edit model, no mask, no script callbacks), `opts` holding its options."""

    def __init__(self, inner_model, empty, opts, total_steps):
        self.inner_model = inner_model
        self.empty = empty                      # shared.sd_model.cond_stage_model_empty_prompt
        self.opts = opts
        self.total_steps = total_steps          # Sampler.launch_sampling: self.config.total_steps(steps)
        self.step = 0
        self.padded_cond_uncond = False
        self.padded_cond_uncond_v0 = False

    def combine_denoised(self, x_out, conds_list, uncond, cond_scale):
        denoised_uncond = x_out[-uncond.shape[0]:]
        denoised = torch.clone(denoised_uncond)

        for i, conds in enumerate(conds_list):
            for cond_index, weight in conds:
                denoised[i] += (x_out[cond_index] - denoised_uncond[i]) * (weight * cond_scale)

        return denoised

    def pad_cond_uncond(self, cond, uncond):
        empty = self.empty
        num_repeats = (cond.shape[1] - uncond.shape[1]) // empty.shape[1]

        if num_repeats < 0:
            cond = pad_cond(cond, -num_repeats, empty)
            self.padded_cond_uncond = True
        elif num_repeats > 0:
            uncond = pad_cond(uncond, num_repeats, empty)
            self.padded_cond_uncond = True

        return cond, uncond

    def pad_cond_uncond_v0(self, cond, uncond):
        uncond_vec = uncond
        if uncond_vec.shape[1] < cond.shape[1]:
            last_vector = uncond_vec[:, -1:]
            last_vector_repeated = last_vector.repeat([1, cond.shape[1] - uncond_vec.shape[1], 1])
            uncond_vec = torch.hstack([uncond_vec, last_vector_repeated])
            self.padded_cond_uncond_v0 = True
        elif uncond_vec.shape[1] > cond.shape[1]:
            uncond_vec = uncond_vec[:, :cond.shape[1]]
            self.padded_cond_uncond_v0 = True
        return cond, uncond_vec

    def __call__(self, x, sigma, uncond, cond, cond_scale, s_min_uncond):
        conds_list, tensor = cond                    # prompt_parser.reconstruct_multicond_batch's result
        batch_size = len(conds_list)
        repeats = [len(conds_list[i]) for i in range(batch_size)]
        x_in = torch.cat([torch.stack([x[i] for _ in range(n)]) for i, n in enumerate(repeats)] + [x])
        sigma_in = torch.cat([torch.stack([sigma[i] for _ in range(n)]) for i, n in enumerate(repeats)] + [sigma])
        skip_uncond = False

        if self.opts["skip_early_cond"] != 0. and self.step / self.total_steps <= self.opts["skip_early_cond"]:
            skip_uncond = True
        elif (self.step % 2 or self.opts["s_min_uncond_all"]) and s_min_uncond > 0 and sigma[0] < s_min_uncond:
            skip_uncond = True

        if skip_uncond:
            x_in = x_in[:-batch_size]
            sigma_in = sigma_in[:-batch_size]

        self.padded_cond_uncond = False
        self.padded_cond_uncond_v0 = False
        if self.opts["pad_cond_uncond_v0"] and tensor.shape[1] != uncond.shape[1]:
            tensor, uncond = self.pad_cond_uncond_v0(tensor, uncond)
        elif self.opts["pad_cond_uncond"] and tensor.shape[1] != uncond.shape[1]:
            tensor, uncond = self.pad_cond_uncond(tensor, uncond)

        if tensor.shape[1] == uncond.shape[1] or skip_uncond:
            if skip_uncond:
                cond_in = tensor
            else:
                cond_in = torch.cat([tensor, uncond])
            if self.opts["batch_cond_uncond"]:
                x_out = self.inner_model(x_in, sigma_in, cond={"c_crossattn": [cond_in]})
            else:
                x_out = torch.zeros_like(x_in)
                for batch_offset in range(0, x_out.shape[0], batch_size):
                    a = batch_offset
                    b = a + batch_size
                    x_out[a:b] = self.inner_model(x_in[a:b], sigma_in[a:b], cond={"c_crossattn": [cond_in[a:b]]})
        else:
            x_out = torch.zeros_like(x_in)
            batch_size = batch_size * 2 if self.opts["batch_cond_uncond"] else batch_size
            for batch_offset in range(0, tensor.shape[0], batch_size):
                a = batch_offset
                b = min(a + batch_size, tensor.shape[0])
                c_crossattn = tensor[a:b]
                x_out[a:b] = self.inner_model(x_in[a:b], sigma_in[a:b], cond={"c_crossattn": [c_crossattn]})

            if not skip_uncond:
                x_out[-uncond.shape[0]:] = self.inner_model(x_in[-uncond.shape[0]:], sigma_in[-uncond.shape[0]:],
                                                            cond={"c_crossattn": [uncond]})

        denoised_image_indexes = [x[0][0] for x in conds_list]
        if skip_uncond:
            fake_uncond = torch.cat([x_out[i:i + 1] for i in denoised_image_indexes])
            x_out = torch.cat([x_out, fake_uncond])

        if skip_uncond:
            denoised = self.combine_denoised(x_out, conds_list, uncond, 1.0)
        else:
            denoised = self.combine_denoised(x_out, conds_list, uncond, cond_scale)

        self.step += 1
        return denoised


A1111_OPTIONS = {"skip_early_cond": 0.0, "s_min_uncond_all": False, "pad_cond_uncond": False,
                 "pad_cond_uncond_v0": False}
BATCHED = True       # A1111's batch_cond_uncond: on, sdlab's one pass of cond and uncond; off for AND prompts, each
                     # of whose parts sdlab runs alone (batch composition moves the tiny U-Net's floats by ~1e-5)
SECOND_ORDER = {"Euler": False, "Heun": True, "DPM2": True}     # SamplerData options "second_order"


def stack_conds(tensors):
    """A1111's prompt_parser.stack_conds: the AND parts padded to the longest with their last vector."""
    token_count = max([x.shape[0] for x in tensors])
    for i in range(len(tensors)):
        if tensors[i].shape[0] != token_count:
            last_vector = tensors[i][-1:]
            last_vector_repeated = last_vector.repeat([token_count - tensors[i].shape[0], 1])
            tensors[i] = torch.vstack([tensors[i], last_vector_repeated])
    return torch.stack(tensors)


# ---------------------------------------------------------------- sdlab vs the transcription

@pytest.fixture(scope="module")
def sd1():
    return tiny_bundle("sd1", seed=0)


def _a1111_latents(bundle, req: GenerationRequest, parts: list[tuple[str, float]], function: str,
                   batched: bool = BATCHED):
    """A1111's picture of `req` (one image; its AND `parts` with weights), latents: the transcribed CFGDenoiser on
    sdlab's denoiser, run by k-diffusion's `function` over sdlab's sigmas from sdlab's first x."""
    plan = make_plan(bundle, req)
    start = _start(bundle, plan, generators_for(plan.request.seeds(), plan.request.rng, bundle.device))
    denoiser = Denoiser(bundle.unet, plan.sampling)

    def inner_model(x, sigma, cond):
        return denoiser(x, sigma, context=cond["c_crossattn"][0])

    encode = partial(encode_prompt, bundle.text_encoders, clip_skip=req.clip_skip)
    tensor = stack_conds([encode(text).context[0] for text, _ in parts])                 # (parts, T, D)
    conds_list = [[(i, weight) for i, (_, weight) in enumerate(parts)]]
    uncond = encode(req.negative_prompt).context                                         # (1, Tu, D)
    opts = {**{name: getattr(req, name) for name in A1111_OPTIONS}, "batch_cond_uncond": batched}
    total = (len(plan.sigmas) - 1) * (2 if SECOND_ORDER[req.sampler] else 1)
    empty = encode_prompt(bundle.text_encoders, "").context        # encoded as A1111 loads the model: clip skip 1
    model = A1111CFGDenoiser(inner_model, empty, opts, total)
    extra_args = dict(cond=(conds_list, tensor), uncond=uncond, cond_scale=req.cfg_scale,
                      s_min_uncond=req.s_min_uncond)
    return getattr(KD, function)(model, start.x, plan.sigmas, extra_args=extra_args, disable=True), model


def _request(prompt: str, negative: str, sampler: str = "Euler", **options) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, negative_prompt=negative, sampler=sampler, schedule="karras", steps=6,
                             cfg_scale=6.0, seed=11, width=32, height=32, init_noise="sigma_max", **options)


FUNCTIONS = {"Euler": "sample_euler", "Heun": "sample_heun", "DPM2": "sample_dpm_2"}
CASES = [
    ("Euler", dict(s_min_uncond=3.0)),
    ("Euler", dict(s_min_uncond=3.0, s_min_uncond_all=True)),
    ("Heun", dict(s_min_uncond=2.0)),
    ("Heun", dict(skip_early_cond=0.3)),
    ("DPM2", dict(skip_early_cond=0.5, s_min_uncond=1.0, s_min_uncond_all=True)),
    ("Euler", dict(skip_early_cond=1.0)),
]


@pytest.mark.parametrize("sampler, options", CASES)
@torch.no_grad()
def test_ngms_and_skip_early_cfg_draw_as_a1111(sd1, sampler, options):
    req = _request("a red cube", "blurry", sampler, **options)
    ours = sample_latents(sd1, req)
    reference, _ = _a1111_latents(sd1, replace(req, **{**A1111_OPTIONS, "s_min_uncond": 0.0, **options}),
                                  [("a red cube", 1.0)], FUNCTIONS[sampler])
    plain = sample_latents(sd1, replace(req, s_min_uncond=0.0, skip_early_cond=0.0))
    assert (ours - reference).abs().max().item() <= TOL
    assert (ours - plain).abs().max().item() > 1e-3            # the option changed the picture


@pytest.mark.parametrize("n_pos, n_neg", [(2, 1), (1, 3), (3, 2)])
@pytest.mark.parametrize("rule", ["pad_cond_uncond", "pad_cond_uncond_v0"])
@torch.no_grad()
def test_pad_conds_draw_as_a1111(sd1, n_pos, n_neg, rule):
    prompt, negative = _chunks(n_pos), _chunks(n_neg, "blurry lowres watermark")
    req = _request(prompt, negative, **{rule: True})
    ours = sample_latents(sd1, req)
    reference, model = _a1111_latents(sd1, replace(req, s_min_uncond=0.0), [(prompt, 1.0)], "sample_euler")
    plain = sample_latents(sd1, replace(req, **{rule: False}))
    assert (ours - reference).abs().max().item() <= TOL
    assert (ours - plain).abs().max().item() > 1e-3
    assert model.padded_cond_uncond or model.padded_cond_uncond_v0


@pytest.mark.parametrize("options", [dict(pad_cond_uncond=True, s_min_uncond=3.0),
                                     dict(pad_cond_uncond_v0=True, skip_early_cond=0.4),
                                     dict(pad_cond_uncond=True, pad_cond_uncond_v0=True),
                                     dict(pad_cond_uncond=True, clip_skip=2, clip_skip_convention="a1111")])
@torch.no_grad()
def test_and_prompts_skip_and_pad_as_a1111(sd1, options):
    """A composable prompt: A1111 stacks the parts (padded to the longest with their last vector), pads that stack
    against the negative, and at a skipped call takes the first part's prediction for the negative's at scale 1."""
    parts = [(_chunks(2), 1.0), ("a green tree", 0.7)]
    prompt = f"{parts[0][0]} AND {parts[1][0]} :0.7"
    req = _request(prompt, "blurry", **options)
    ours = sample_latents(sd1, req)
    reference, _ = _a1111_latents(sd1, replace(req, **{**A1111_OPTIONS, "s_min_uncond": 0.0, **options}), parts,
                                  "sample_euler", batched=False)
    assert (ours - reference).abs().max().item() <= TOL


@torch.no_grad()
def test_equal_lengths_are_not_padded(sd1):
    req = _request("a red cube", "blurry", pad_cond_uncond=True)
    assert torch.equal(sample_latents(sd1, req), sample_latents(sd1, replace(req, pad_cond_uncond=False)))


# ---------------------------------------------------------------- the rules themselves

def test_skip_early_cfg_counts_a1111s_total_steps():
    """Call k skips while k / total <= fraction (call 0 too); 0 skips none; NGMS only at odd calls unless all."""
    skips = a1111_skips(10, skip_early=0.25)
    assert [skips(k, torch.tensor([5.0])) for k in range(10)] == ["skip_early_cond"] * 3 + [None] * 7
    assert not any(a1111_skips(10)(k, torch.tensor([0.1])) for k in range(10))
    ngms = a1111_skips(6, s_min_uncond=1.0)
    sigmas = [4.0, 2.0, 0.9, 0.5, 0.2, 0.1]
    assert [bool(ngms(k, torch.tensor([s]))) for k, s in enumerate(sigmas)] == [False, False, False, True, False, True]
    every = a1111_skips(6, s_min_uncond=1.0, every_call=True)
    assert [every(k, torch.tensor([s])) for k, s in enumerate(sigmas)] == [None, None] + ["s_min_uncond"] * 4


@torch.no_grad()
def test_ddim_compares_its_timesteps(sd1):
    """A1111's timestep samplers hand CFGDenoiser the timestep for sigma: NGMS 60 skips DDIM's odd calls at t < 60
    (of 20 steps, 19 calls at t = 951, ..., 51: t = 51 is call 18, even), every one of them with NGMS all steps."""
    batches: list[int] = []
    hook = sd1.unet.register_forward_hook(lambda module, args, out: batches.append(args[0].shape[0]))
    req = GenerationRequest(prompt="a red cube", negative_prompt="blurry", sampler="DDIM", schedule="ddim_uniform",
                            steps=20, cfg_scale=6.0, seed=3, width=32, height=32, s_min_uncond=60.0)
    try:
        sample_latents(sd1, req)
        assert batches == [2] * 19
        batches.clear()
        sample_latents(sd1, replace(req, s_min_uncond_all=True))
        assert batches == [2] * 18 + [1]
    finally:
        hook.remove()


def test_cfg_skips_to_the_conditional_prediction():
    def denoiser(x, sigma, context):
        return x * context.mean() + sigma.reshape(-1, 1, 1, 1)

    cond, uncond = {"context": torch.full((1, 3, 2), 2.0)}, {"context": torch.full((1, 3, 2), 0.5)}
    x, sigma = torch.randn(1, 4, 2, 2), torch.tensor([1.5])
    skipped = skipping_uncond(cfg(denoiser, cond, uncond, 7.0), lambda call, sigma: call == 1)
    assert not torch.equal(skipped(x, sigma), denoiser(x, sigma, **cond))
    assert torch.equal(skipped(x, sigma), denoiser(x, sigma, **cond))


@torch.no_grad()
def test_pad_rules_on_contexts(sd1):
    """Pad conds appends whole chunks of "" to the shorter side; v0 repeats the negative's last vector or cuts it."""
    cond, uncond = make_cond(sd1.text_encoders, sd1.family, _chunks(2), "blurry", pad_rule="pad")
    empty = empty_prompt_context(sd1.text_encoders)
    negative = encode_prompt(sd1.text_encoders, "blurry").context
    assert torch.equal(uncond["context"], torch.cat([negative, empty], dim=1))
    assert torch.equal(cond["context"], encode_prompt(sd1.text_encoders, _chunks(2)).context)
    unasked = empty_context_once(sd1.text_encoders)
    _, cut = pad_cond_uncond([{"context": negative}], {"context": cond["context"]}, "v0", unasked)
    assert torch.equal(cut["context"], cond["context"][:, :77])
    _, longer = pad_cond_uncond([cond], {"context": negative}, "v0", unasked)
    assert torch.equal(longer["context"][:, 77:], negative[:, -1:].expand(-1, 77, -1))


@torch.no_grad()
def test_pad_conds_pads_with_the_empty_prompt_encoded_at_clip_skip_1(sd1):
    """A1111 encodes the "" it pads with (`cond_stage_model_empty_prompt`) once, as it loads the model, at its default
    clip skip 1: a request's clip skip encodes its prompts, not the padding, on the plain and the AND path alike."""
    cond, uncond = make_cond(sd1.text_encoders, sd1.family, _chunks(2), "blurry", pad_rule="pad", clip_skip=2)
    negative = encode_prompt(sd1.text_encoders, "blurry", clip_skip=2).context
    empty = encode_prompt(sd1.text_encoders, "").context
    assert torch.equal(empty_prompt_context(sd1.text_encoders), empty)
    assert torch.equal(uncond["context"], torch.cat([negative, empty], dim=1))
    assert not torch.equal(empty, encode_prompt(sd1.text_encoders, "", clip_skip=2).context)
    req = _request(_chunks(2), "blurry", clip_skip=2, clip_skip_convention="a1111", pad_cond_uncond=True)
    reference, model = _a1111_latents(sd1, replace(req, s_min_uncond=0.0), [(req.prompt, 1.0)], "sample_euler")
    assert model.padded_cond_uncond
    assert (sample_latents(sd1, req) - reference).abs().max().item() <= TOL


@torch.no_grad()
def test_pad_conds_pads_with_the_empty_prompt_of_the_models_own_weights(sd1, tmp_path):
    """A1111 encodes the "" it pads with once, as it loads the model, with no extra network active (`load_model`'s
    `get_empty_cond`): a prompt's text-encoder LoRA changes the prompts it pads, not the padding, and is merged
    again after it."""
    from sdlab.pipeline.prompt_loras import LoraUse, patcher_for
    from test_prompt_loras import _lora_file, _small_lora

    lora = _lora_file(tmp_path / "ink.safetensors", _small_lora(5))
    empty = encode_prompt(sd1.text_encoders, "").context
    with patcher_for(sd1).using([LoraUse(lora, 1.0, 1.0, "ink")]):
        merged = encode_prompt(sd1.text_encoders, "").context
        cond, uncond = make_cond(sd1.text_encoders, sd1.family, _chunks(2), "blurry", pad_rule="pad")
        negative = encode_prompt(sd1.text_encoders, "blurry").context
        assert torch.equal(encode_prompt(sd1.text_encoders, "").context, merged)
    assert (merged - empty).abs().max() > 0.1
    assert torch.equal(uncond["context"], torch.cat([negative, empty], dim=1))


@torch.no_grad()
@pytest.mark.parametrize("prompt", [f"[{_chunks(2)}:a cat:0.3] AND [a dog:{_chunks(2)}:0.6]",
                                    f"[{_chunks(2)}:a cat:0.5]"])
def test_pad_conds_encodes_the_empty_prompt_once_for_every_padded_entry(sd1, monkeypatch, prompt):
    """A1111 pads with the one "" it encoded (`cond_stage_model_empty_prompt`): a pass whose prompt schedules pad
    several entries encodes "" once, and draws what encoding it for each entry drew."""
    from sdlab.pipeline import conditioning, generate as generating

    encodes: list[int] = []
    real = conditioning.empty_prompt_context
    monkeypatch.setattr(conditioning, "empty_prompt_context", lambda encoders: encodes.append(1) or real(encoders))
    req = _request(prompt, "blurry", pad_cond_uncond=True)
    once = sample_latents(sd1, req)
    assert len(encodes) == 1
    monkeypatch.setattr(generating, "empty_context_once", lambda encoders: partial(real, encoders))
    assert torch.equal(sample_latents(sd1, req), once)


def test_bad_values_are_refused():
    from sdlab.pipeline.request import resolve
    for options in (dict(s_min_uncond=-1.0), dict(skip_early_cond=1.5), dict(s_min_uncond=float("nan"))):
        with pytest.raises(RequestError):
            resolve(GenerationRequest(prompt="x", **options), default_size=64, default_sampler="Euler",
                    default_schedule="karras", factor=8)


# ---------------------------------------------------------------- infotext, API, CLI

GUIDANCE = dict(s_min_uncond=2.5, s_min_uncond_all=True, skip_early_cond=0.25, pad_cond_uncond=True)
LABELS = {"NGMS": 2.5, "NGMS all steps": True, "Skip Early CFG": 0.25, "Pad conds": True}


def test_the_labels_are_a1111s_written_where_set_and_read_back():
    req = GenerationRequest(prompt="a cat", steps=4, seed=1, sampler="Euler", width=16, height=16, **GUIDANCE)
    written = to_parameters(req)
    assert {label: written[label] for label in LABELS} == LABELS and written["Pad conds v0"] is None
    read = from_parameters(parse_parameters(format_parameters(written)))
    assert {name: read[name] for name in GUIDANCE} == GUIDANCE
    plain = to_parameters(replace(req, s_min_uncond=0.0, skip_early_cond=0.0, pad_cond_uncond=False))
    assert not any(plain[label] for label in [*LABELS, "Pad conds v0"])
    both = to_parameters(replace(req, pad_cond_uncond_v0=True, s_min_uncond_all=False))
    assert (both["Pad conds"], both["Pad conds v0"], both["NGMS all steps"]) == (None, True, None)


@pytest.mark.parametrize("prompt, cfg_scale, options, labels", [
    ("a red cube", 6.0, dict(pad_cond_uncond=True), {}),                       # one chunk each: nothing to pad
    ("a red cube", 6.0, dict(pad_cond_uncond_v0=True), {}),
    (_chunks(2), 6.0, dict(pad_cond_uncond=True, pad_cond_uncond_v0=True), {"Pad conds v0": True}),
    ("a red cube", 6.0, dict(s_min_uncond=0.001), {}),                         # below every call's sigma
    ("a red cube", 1.0, dict(s_min_uncond=100.0, s_min_uncond_all=True), {}),  # CFG 1: no negative pass to skip
    ("a red cube", 1.0, dict(skip_early_cond=0.5), {}),
    ("a red cube", 6.0, dict(s_min_uncond=100.0, s_min_uncond_all=True), {"NGMS": 100.0, "NGMS all steps": True}),
    ("a red cube", 6.0, dict(skip_early_cond=1.0, s_min_uncond=100.0), {"Skip Early CFG": 1.0}),  # NGMS never decides
    ("a red cube AND a tree :0.5", 1.0, dict(s_min_uncond=100.0), {"NGMS": 100.0}),   # AND: its first part stands in
])
def test_the_labels_are_written_where_the_drawing_skipped_or_padded(sd1, prompt, cfg_scale, options, labels):
    """A1111 writes NGMS and Skip Early CFG where a call ran without the negative prompt and Pad conds where it
    padded: where an option changed nothing the picture is the one without it, and carries no label."""
    req = GenerationRequest(prompt=prompt, negative_prompt="blurry", sampler="Euler", schedule="karras", steps=4,
                            cfg_scale=cfg_scale, seed=11, width=32, height=32, **options)
    result = generate(sd1, req)
    written = {label: value for label, value in to_parameters(result.request).items()
               if label in [*LABELS, "Pad conds v0"] and value is not None}
    assert written == labels
    plain = generate(sd1, replace(req, **{name: GenerationRequest.__dataclass_fields__[name].default
                                          for name in options})).images[0]
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(plain)) is not bool(labels)


@pytest.mark.parametrize("v, sampler, v0", [("v1.5.2", "DDIM", True), ("v1.5.2", "PLMS", True),
                                            ("v1.5.2", "Euler", False), ("v1.6.0", "DDIM", False)])
def test_a1111_before_1_6_pads_ddim_and_plms_by_v0(v, sampler, v0):
    """A1111's `infotext_versions.backcompat`: a DDIM / PLMS text of a version before 1.6 draws with Pad conds v0."""
    p = parse_parameters(f"a cat\nNegative prompt: x\nSteps: 4, Sampler: {sampler}, Seed: 1, Size: 16x16, Version: {v}")
    assert from_parameters(p).get("pad_cond_uncond_v0", False) is v0
    assert undrawn_labels(p) == [label for label in undrawn_labels(p) if "Pad conds" not in label]


def test_an_a1111_picture_with_the_guidance_labels_is_redrawn_with_them():
    text = ("a cat\nNegative prompt: blurry\nSteps: 4, Sampler: Euler, Schedule type: Karras, CFG scale: 6, Seed: 3, "
            "Size: 16x16, NGMS: 2.5, NGMS all steps: True, Skip Early CFG: 0.25, Pad conds: True, Version: v1.10.1")
    p = parse_parameters(text)
    assert undrawn_labels(p) == []
    fields = from_parameters(p)
    assert {name: fields[name] for name in GUIDANCE} == GUIDANCE
    bundle = tiny_bundle("sd1", seed=5)
    req = GenerationRequest(**fields)
    first = np.asarray(generate(bundle, req).images[0], dtype=np.int16)
    again = np.asarray(generate(bundle, GenerationRequest(**from_parameters(parse_parameters(
        format_parameters(to_parameters(req)))))).images[0], dtype=np.int16)
    plain = np.asarray(generate(bundle, replace(req, s_min_uncond=0.0, skip_early_cond=0.0)).images[0],
                       dtype=np.int16)
    assert np.array_equal(first, again) and np.abs(first - plain).max() > 0


@pytest.mark.parametrize("body, opts, ours", [
    ({}, {}, {}),
    ({}, {"s_min_uncond": 3.0, "s_min_uncond_all": True}, {"s_min_uncond": 3.0, "s_min_uncond_all": True}),
    ({"s_min_uncond": 1.5}, {"s_min_uncond": 3.0}, {"s_min_uncond": 1.5}),      # the request's field wins
    ({"s_min_uncond": 0.0}, {"s_min_uncond": 3.0}, {"s_min_uncond": 0.0}),
    ({}, {"skip_early_cond": 0.4, "pad_cond_uncond": True, "pad_cond_uncond_v0": True},
     {"skip_early_cond": 0.4, "pad_cond_uncond": True, "pad_cond_uncond_v0": True}),
])
def test_the_api_takes_the_guidance_options_as_a1111_does(body, opts, ours):
    """`fill_fields_from_opts`: the request's s_min_uncond, else the option (after the overrides apply); the other
    four are read from the options by `CFGDenoiser.forward`."""
    defaults = dict(s_min_uncond=0.0, s_min_uncond_all=False, skip_early_cond=0.0, pad_cond_uncond=False,
                    pad_cond_uncond_v0=False)
    for overrides, options in ((opts, None), ({}, opts)):
        req = _api_request(Txt2ImgIn(prompt="x", sampler_name="Euler", override_settings=overrides, **body),
                           options=options)
        assert {name: getattr(req, name) for name in defaults} == {**defaults, **ours}
    assert {name: OPTION_DEFAULTS[name] for name in defaults} == defaults          # A1111 1.10's OptionInfo defaults


@pytest.mark.parametrize("body, overrides", [({"s_min_uncond": -2.0}, {}), ({}, {"s_min_uncond": -1}),
                                             ({"s_min_uncond": -2.0}, {"s_min_uncond": 3.0})])
def test_ngms_at_or_below_0_is_off_as_a1111s(body, overrides):
    """A1111 takes any number for `s_min_uncond` (field, option or override) and draws NGMS only where it is above 0:
    a negative value is off, not an error."""
    req = _api_request(Txt2ImgIn(prompt="x", sampler_name="Euler", override_settings=overrides, **body))
    assert req.s_min_uncond == 0.0


@pytest.mark.parametrize("key, value", [("s_min_uncond", "2"), ("skip_early_cond", 1.5),
                                        ("skip_early_cond", True), ("pad_cond_uncond", 1), ("s_min_uncond_all", "yes")])
def test_a_bad_guidance_option_is_a_422(key, value):
    with pytest.raises(BadRequest, match=f"override_settings.{key} must be"):
        _api_request(Txt2ImgIn(prompt="x", sampler_name="Euler", override_settings={key: value}))


def test_the_cli_flags_draw_the_api_picture_and_record_it(tmp_path, capsys):
    model = tmp_path / "tiny-sd1.safetensors"
    write_original(tiny_bundle("sd1"), model, junk=False)
    out, again = tmp_path / "cli.png", tmp_path / "again.png"
    common = ["--model", str(model), "--no-progress"]
    code, _, err = run(["txt2img", _chunks(2), "--negative", "blurry", "--steps", "4", "--seed", "3", "--sampler",
                        "Heun", "--schedule", "karras", "--cfg", "6", "--width", "32", "--height", "32", "--ngms", "2.5",
                        "--ngms-all-steps", "--skip-early-cfg", "0.25", "--pad-conds", *common, "--out", str(out)],
                       capsys)
    assert code == 0, err
    code, _, err = run(["txt2img", "--from-png", str(out), *common, "--out", str(again)], capsys)
    assert code == 0, err
    assert "does not draw" not in err
    assert np.array_equal(pixels(out), pixels(again))
    body = Txt2ImgIn(prompt=_chunks(2), negative_prompt="blurry", steps=4, seed=3, sampler_name="Heun",
                     scheduler="karras", cfg_scale=6, width=32, height=32, s_min_uncond=2.5,
                     override_settings={"s_min_uncond_all": True, "skip_early_cond": 0.25, "pad_cond_uncond": True})
    api = np.asarray(generate(load_bundle(model), _api_request(body)).images[0], dtype=np.int16)
    assert np.array_equal(api, pixels(out))
