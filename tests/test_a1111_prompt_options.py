"""A1111's prompt-side options: Emphasis (its four modes) and Old prompt editing timelines.

References, transcribed from AUTOMATIC1111/stable-diffusion-webui (1.10) below:
- modules/sd_emphasis.py: EmphasisNone, EmphasisIgnore, EmphasisOriginal, EmphasisOriginalNoNorm
  (`after_transformers`), and modules/sd_hijack_clip.py FrozenCLIPEmbedderWithCustomWordsBase.tokenize_line
  (`parsed = [[line, 1.0]]` when `opts.emphasis == "None"`) / process_tokens / forward (`Emphasis` infotext);
- modules/prompt_parser.py get_learned_conditioning_prompt_schedules(prompts, base_steps, hires_steps,
  use_old_scheduling) with A1111's lark grammar (the `lark` package, a test dependency);
- modules/processing.py StableDiffusionProcessing.get_conds_with_caching (`Old prompt editing timelines: True`
  where the old and new schedules differ) and calculate_hr_conds (the hires pass's schedule over the first pass's
  steps); modules/infotext_versions.py backcompat (texts before 1.6 with a `[`: old timelines).
The tokenizer and the tower's plain hidden states are sdlab's, checked against A1111 / transformers elsewhere
(tests/test_prompt_syntax.py, tests/test_conditioning.py).
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from bundle_fixtures import tiny_bundle

from sdlab.pipeline.conditioning import _encode_inputs, chunk_input_ids, encode_prompt, prompt_chunks
from sdlab.pipeline.generate import generate
from sdlab.pipeline.hires import generate_hires
from sdlab.pipeline.infotext import from_parameters, to_parameters, undrawn_labels
from sdlab.pipeline.plan import make_plan
from sdlab.pipeline.prompt_schedule import old_rule_differs, prompt_schedule
from sdlab.pipeline.prompt_syntax import chunk_tokens, parse_weighted
from sdlab.pipeline.request import EMPHASIS_MODES, GenerationRequest, RequestError
from sdlab.server.a1111 import OPTION_DEFAULTS, Txt2ImgIn, _request
from sdlab.server.inputs import BadRequest

TOL = 1e-6


@pytest.fixture(scope="module")
def bundles():
    return {name: tiny_bundle(name) for name in ("sd1", "sd2", "sdxl")}


# ---------------------------------------------------------------------------------------------------------
# Emphasis


def _a1111_chunks(line: str, mode: str, tokenizer):
    """A1111 `tokenize_line`: the prompt read by `parse_prompt_attention` (sdlab's `parse_weighted`, its port),
    or with the emphasis "None" as `[[line, 1.0]]`, packed into 75-token chunks (sdlab's `chunk_tokens`, the port
    of the rest of `tokenize_line`)."""
    parsed = [(line, 1.0)] if mode == "None" else parse_weighted(line)
    return chunk_tokens(parsed, tokenizer.encode_units)


def _a1111_after_transformers(mode: str, z: torch.Tensor, multipliers: torch.Tensor) -> torch.Tensor:
    """modules/sd_emphasis.py: each class's `after_transformers` on one chunk's batch z (B, 77, D)."""
    if mode in ("None", "Ignore"):                     # EmphasisNone, EmphasisIgnore: the base class's no-op
        return z
    if mode == "No norm":                              # EmphasisOriginalNoNorm
        return z * multipliers.reshape(multipliers.shape + (1,)).expand(z.shape)
    original_mean = z.mean()                           # EmphasisOriginal
    z = z * multipliers.reshape(multipliers.shape + (1,)).expand(z.shape)
    new_mean = z.mean()
    return z * (original_mean / new_mean)


def _a1111_context(encoders, prompt: str, mode: str) -> torch.Tensor:
    """A1111 `FrozenCLIPEmbedderWithCustomWordsBase.forward` on one prompt, per tower (SDXL's two embedders), the
    towers' features side by side: each chunk's plain hidden state (`encode_with_transformers`, the tower run by
    sdlab at the family's layer with no weighting), then the mode's `after_transformers`."""
    chunks = _a1111_chunks(prompt, mode, encoders[0].tokenizer)
    towers = []
    for encoder in encoders:
        zs = []
        for chunk in chunks:
            z, _ = _encode_inputs([encoder], lambda e: chunk_input_ids([chunk], e.spec.pad_token_id), weighting=None,
                                  clip_skip=1, with_pooled=False)                      # (1, 77, D)
            multipliers = torch.tensor([[1.0, *chunk.weights, 1.0]])
            zs.append(_a1111_after_transformers(mode, z, multipliers))
        towers.append(torch.hstack(zs))
    return torch.cat(towers, dim=-1)


EMPHASIS_PROMPTS = [
    "a (red:1.5) apple on a [blue] table, ((masterpiece))",
    "a \\(literal\\) cat BREAK (a dog:0.7) in the snow",
    ", ".join(["a (red apple:1.2)"] * 25),                 # two chunks
]


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("mode", EMPHASIS_MODES)
@pytest.mark.parametrize("prompt", EMPHASIS_PROMPTS, ids=["weights", "escapes-break", "two-chunks"])
@torch.no_grad()
def test_each_emphasis_mode_conditions_as_a1111(bundles, family, mode, prompt):
    encoders = bundles[family].text_encoders
    ours = encode_prompt(encoders, prompt, emphasis=mode).context
    expected = _a1111_context(encoders, prompt, mode)
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max() <= TOL


def test_the_modes_differ_where_a1111s_do(bundles):
    """Original and No norm differ only by the restored mean; Ignore is the unweighted encoding of the parsed text;
    None reads brackets, the weight's digits and BREAK as words (one chunk, where BREAK made two)."""
    encoders = bundles["sd1"].text_encoders
    prompt = "a (red:1.5) apple BREAK on a table"
    contexts = {mode: encode_prompt(encoders, prompt, emphasis=mode).context for mode in EMPHASIS_MODES}
    assert (contexts["Original"] - contexts["No norm"]).abs().max() > 1e-3
    assert torch.equal(contexts["Ignore"], encode_prompt(encoders, "a red apple BREAK on a table").context)
    assert contexts["Ignore"].shape[1] == 154 and contexts["None"].shape[1] == 77
    tokenizer = encoders[0].tokenizer
    literal = prompt_chunks(prompt, tokenizer, "None")[0]
    assert list(literal.ids[: literal.length]) == tokenizer.encode(prompt) and set(literal.weights) == {1.0}


@torch.no_grad()
def test_sdxl_keeps_its_pooled_vector_under_every_mode(bundles):
    """The pooled vector (bigG's projection of the first chunk) is the plain tower's output: A1111 keeps
    `z.pooled` past the emphasis; "None" pools the literal text's first chunk."""
    encoders = bundles["sdxl"].text_encoders
    prompt = "a (red:1.5) apple"
    for mode in ("Original", "No norm", "Ignore"):
        pooled = encode_prompt(encoders, prompt, emphasis=mode, with_pooled=True).pooled
        assert torch.equal(pooled, encode_prompt(encoders, "a red apple", with_pooled=True).pooled)
    literal = encode_prompt(encoders, prompt, emphasis="None", with_pooled=True).pooled
    assert not torch.allclose(literal, encode_prompt(encoders, "a red apple", with_pooled=True).pooled)


def test_emphasis_is_written_as_a1111_writes_it_and_read_back():
    """A1111 writes `Emphasis` when not "Original" and a text has a bracket (`sd_hijack_clip.forward`); sdlab also
    where "None" keeps a BREAK as a word. Any case is taken; another name is one error listing A1111's four."""
    def labels(**kw):
        req = GenerationRequest(**{"prompt": "a cat", "steps": 4, "seed": 1, "sampler": "Euler", **kw})
        return {k: v for k, v in to_parameters(_resolved(req)).items() if v is not None}
    assert "Emphasis" not in labels(prompt="a (cat:1.2)")
    assert "Emphasis" not in labels(emphasis="No norm")                  # no bracket: nothing it changes
    assert labels(prompt="a (cat:1.2)", emphasis="no NORM")["Emphasis"] == "No norm"
    assert labels(negative_prompt="[ugly]", emphasis="Ignore")["Emphasis"] == "Ignore"
    assert labels(prompt="a BREAK cat", emphasis="None")["Emphasis"] == "None"
    assert from_parameters(labels(prompt="a (cat:1.2)", emphasis="None"))["emphasis"] == "None"
    assert not undrawn_labels({"Prompt": "a (cat)", "Emphasis": "No norm", "Version": "v1.10.1"})
    with pytest.raises(RequestError, match="Original, No norm, Ignore, None"):
        _resolved(GenerationRequest("a cat", emphasis="Strong"))


def _resolved(req: GenerationRequest) -> GenerationRequest:
    from sdlab.pipeline.request import resolve
    return resolve(req, default_size=64, default_sampler="Euler", default_schedule="karras", factor=8)


def test_an_emphasis_mode_changes_the_picture_and_redraws_from_its_text(bundles):
    bundle = bundles["sd1"]
    base = dict(prompt="a (red:1.6) [apple]", steps=3, seed=5, width=64, height=64, sampler="Euler", cfg_scale=5)
    pictures = {mode: generate(bundle, GenerationRequest(**base, emphasis=mode)) for mode in EMPHASIS_MODES}
    arrays = {mode: np.asarray(r.images[0], dtype=np.int16) for mode, r in pictures.items()}
    assert all(np.abs(arrays[mode] - arrays["Original"]).max() > 0 for mode in ("No norm", "Ignore", "None"))
    text = {k: v for k, v in to_parameters(pictures["None"].request).items() if v is not None}
    again = generate(bundle, GenerationRequest(**from_parameters(text)))
    assert np.array_equal(np.asarray(again.images[0], dtype=np.int16), arrays["None"])


# ---------------------------------------------------------------------------------------------------------
# Old prompt editing timelines

A1111_GRAMMAR = r"""
!start: (prompt | /[][():]/+)*
prompt: (emphasized | scheduled | alternate | plain | WHITESPACE)*
!emphasized: "(" prompt ")"
        | "(" prompt ":" prompt ")"
        | "[" prompt "]"
scheduled: "[" [prompt ":"] prompt ":" [WHITESPACE] NUMBER [WHITESPACE] "]"
alternate: "[" prompt ("|" [prompt])+ "]"
WHITESPACE: /\s+/
plain: /([^\\\[\]():|]|\\.)+/
%import common.SIGNED_NUMBER -> NUMBER
"""


def a1111_schedules(lark, parser, prompt: str, base_steps: int, hires_steps=None, use_old_scheduling=False):
    """modules/prompt_parser.py get_learned_conditioning_prompt_schedules (A1111 1.6+), one prompt."""
    if hires_steps is None or use_old_scheduling:
        int_offset, flt_offset, steps = 0, 0, base_steps
    else:
        int_offset, flt_offset, steps = base_steps, 1.0, hires_steps
    try:
        tree = parser.parse(prompt)
    except lark.exceptions.LarkError:
        return [(steps, prompt)]
    res = [steps]

    class CollectSteps(lark.Visitor):
        def scheduled(self, tree):
            s = tree.children[-2]
            v = float(s)
            if use_old_scheduling:
                v = v * steps if v < 1 else v
            else:
                v = (v - flt_offset) * steps if "." in s else (v - int_offset)
            tree.children[-2] = min(steps, int(v))
            if tree.children[-2] >= 1:
                res.append(tree.children[-2])

        def alternate(self, tree):
            res.extend(range(1, steps + 1))

    CollectSteps().visit(tree)

    def at_step(step):
        class AtStep(lark.Transformer):
            def scheduled(self, args):
                before, after, _, when, _ = args
                yield before or () if step <= when else after

            def alternate(self, args):
                args = ["" if not arg else arg for arg in args]
                yield args[(step - 1) % len(args)]

            def start(self, args):
                def flatten(x):
                    if isinstance(x, str):
                        yield x
                    else:
                        for gen in x:
                            yield from flatten(gen)
                return "".join(flatten(args))

            def plain(self, args):
                yield args[0].value

            def __default__(self, data, children, meta):
                yield from children

        return AtStep().transform(tree)

    return [(t, at_step(t)) for t in sorted(set(res))]


OLD_RULE_CASES = ["a [b:c:1.0] d", "a [b:c:2.5] d", "a [b:c:0.5] d", "a [b:c:3] d", "[a:b:1.5]", "[x:.3]",
                  "[a:b:-0.5]", "[a|b] [c:d:1.]", "a [b : c : 0.25 ] [d::2.0]", "a[b:[c:d:2.0]:0.4]e"]


def test_the_old_rule_schedules_as_a1111_first_pass_and_hires():
    import lark
    parser = lark.Lark(A1111_GRAMMAR)
    rng = random.Random(1)
    atoms = ["a", "b", " ", "[", "]", "(", ")", ":", "|", "3", ".5", "0.25", "1.0", "2.5", "1.", "12", "-1", "0",
             "1e1", ":1.2)"]
    prompts = OLD_RULE_CASES + ["".join(rng.choice(atoms) for _ in range(rng.randint(0, 14))) for _ in range(1500)]
    for prompt in prompts:
        steps, hires = rng.choice([1, 4, 10, 20]), rng.choice([None, None, 6])
        expected = a1111_schedules(lark, parser, prompt, steps, hires, use_old_scheduling=True)
        assert prompt_schedule(prompt, steps, hires, old=True) == expected, prompt
        new = a1111_schedules(lark, parser, prompt, steps, hires)
        assert old_rule_differs([prompt], steps, hires) == (new != expected), prompt


def test_the_old_rule_changes_the_conditioning_steps(bundles):
    """`[red:blue:1.0]` over 6 steps: the old rule switches after step 1 (A1111's call counter, from 0, up to 1),
    the new one never (1.0 is all 6 steps)."""
    bundle = bundles["sd1"]
    contexts = []
    hook = bundle.unet.register_forward_pre_hook(
        lambda module, args, kwargs: contexts.append(kwargs.get("context", args[2] if len(args) > 2 else None)),
        with_kwargs=True)
    red = encode_prompt(bundle.text_encoders, "a red cat").context
    try:
        for old in (False, True):
            generate(bundle, GenerationRequest("a [red:blue:1.0] cat", negative_prompt="x", steps=6, seed=1, width=64,
                                               height=64, sampler="Euler", old_prompt_editing=old))
    finally:
        hook.remove()
    drawn = ["red" if torch.allclose(c[1:], red, atol=1e-6) else "blue" for c in contexts]
    assert drawn == ["red"] * 6 + ["red"] * 2 + ["blue"] * 4     # model calls 0..1 are up to step 1


@torch.no_grad()
def test_a_hires_pass_reuses_the_first_pass_timeline_under_the_old_rule(bundles):
    """A1111's calculate_hr_conds with use_old_scheduling: the hires pass's schedule is the first pass's, its
    steps counted from 0 again (`[red cat:blue dog:0.5]` over 4 steps: 'cat' for 3 model calls, then 'dog' -- in
    both passes; the new rule draws 'dog' throughout the hires pass)."""
    sd1 = bundles["sd1"]
    contexts = []
    hook = sd1.unet.register_forward_pre_hook(
        lambda module, args, kwargs: contexts.append(kwargs.get("context", args[2] if len(args) > 2 else None)),
        with_kwargs=True)
    try:
        result = generate_hires(sd1, make_plan(sd1, GenerationRequest(
            "a [red cat:blue dog:0.5]", negative_prompt="ugly", steps=4, seed=1, width=64, height=64,
            sampler="Euler", schedule="karras", hr_scale=1.5, hr_steps=4, hr_denoise=1.0, old_prompt_editing=True)))
    finally:
        hook.remove()
    cat = encode_prompt(sd1.text_encoders, "a red cat").context
    drawn = ["cat" if torch.allclose(c[1:], cat, atol=1e-6) else "dog" for c in contexts]
    assert drawn == ["cat"] * 3 + ["dog"] + ["cat"] * 3 + ["dog"]
    assert to_parameters(result.request)["Old prompt editing timelines"] is True     # the hires pass's differs


def test_old_timelines_are_written_where_they_change_a_schedule_and_read_back():
    req = _resolved(GenerationRequest("a [b:c:1.0]", steps=10, seed=1, sampler="Euler", old_prompt_editing=True))
    p = {k: v for k, v in to_parameters(req).items() if v is not None}
    assert p["Old prompt editing timelines"] is True and from_parameters(p)["old_prompt_editing"] is True
    same = _resolved(GenerationRequest("a [b:c:0.5]", steps=10, seed=1, sampler="Euler", old_prompt_editing=True))
    assert to_parameters(same)["Old prompt editing timelines"] is None
    # a text of A1111 before 1.6 with a '[' was drawn by the old rule (infotext_versions.backcompat)
    old_text = {"Prompt": "a [b:c:1.0]", "Steps": "10", "Sampler": "Euler", "Version": "v1.5.2"}
    assert from_parameters(old_text)["old_prompt_editing"] is True
    assert "old_prompt_editing" not in from_parameters({**old_text, "Version": "v1.6.0"})
    assert not [label for label in undrawn_labels(old_text) if label.startswith("Old prompt")]


# ---------------------------------------------------------------------------------------------------------
# the A1111 API


def test_the_api_lists_and_takes_the_prompt_options_as_a1111():
    """GET options lists A1111 1.10's defaults (modules/shared_options.py); POST options / override_settings set
    them for the request; a value A1111 has no choice for is a 422."""
    assert {key: OPTION_DEFAULTS[key] for key in ("emphasis", "use_old_scheduling", "use_downcasted_alpha_bar",
                                                  "sd_noise_schedule")} == {
        "emphasis": "Original", "use_old_scheduling": False, "use_downcasted_alpha_bar": False,
        "sd_noise_schedule": "Default"}
    plain = _request(Txt2ImgIn(prompt="x"))
    assert (plain.emphasis, plain.old_prompt_editing, plain.downcast_alphas_cumprod, plain.zero_terminal_snr) == (
        "Original", False, False, False)
    req = _request(Txt2ImgIn(prompt="x", override_settings={"emphasis": "No norm", "use_old_scheduling": True}),
                   options={"use_downcasted_alpha_bar": True})
    assert (req.emphasis, req.old_prompt_editing, req.downcast_alphas_cumprod) == ("No norm", True, True)
    assert _request(Txt2ImgIn(prompt="x", override_settings={"sd_noise_schedule": "Zero Terminal SNR"})
                    ).zero_terminal_snr is True
    for bad in ({"emphasis": "none"}, {"sd_noise_schedule": "ZTSNR"}, {"use_old_scheduling": "yes"}):
        with pytest.raises(BadRequest) as err:
            _request(Txt2ImgIn(prompt="x", override_settings=bad))
        assert err.value.status == 422
