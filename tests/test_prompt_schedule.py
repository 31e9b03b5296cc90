"""A1111 prompt editing `[from:to:when]` and alternation `[a|b]` (`sdlab.pipeline.prompt_schedule`), and the
conditioning switching during sampling (`make_cond_schedule`, `guidance.switch_at_calls`, `generate`).

References: the doctests of A1111's `modules/prompt_parser.py::get_learned_conditioning_prompt_schedules`
(checked by hand here), and A1111's own lark grammar and schedule code (ported into this file as the reference,
run with the `lark` package, a test dependency) on random prompts.
"""

from __future__ import annotations

import logging
import random
import re

import numpy as np
import pytest
import torch
from bundle_fixtures import tiny_bundle

from sdlab.diffusion.guidance import cfg, switch_at_calls
from sdlab.pipeline.conditioning import encode_prompt, make_cond_schedule, prompt_chunks
from sdlab.pipeline.generate import generate
from sdlab.pipeline.hires import generate_hires
from sdlab.pipeline.plan import make_plan
from sdlab.pipeline.prompt_schedule import composable_parts, prompt_schedule
from sdlab.pipeline.request import GenerationRequest

# A1111's doctests (get_learned_conditioning_prompt_schedules([p], 10)[0]), as (end_at_step, text) pairs
A1111_DOCTESTS = {
    "test": [(10, "test")],
    "a [b:3]": [(3, "a "), (10, "a b")],
    "a [b: 3]": [(3, "a "), (10, "a b")],
    "a [[[b]]:2]": [(2, "a "), (10, "a [[b]]")],
    "[(a:2):3]": [(3, ""), (10, "(a:2)")],
    "a [b : c : 1] d": [(1, "a b  d"), (10, "a  c  d")],
    "a[b:[c:d:2]:1]e": [(1, "abe"), (2, "ace"), (10, "ade")],
    "a [unbalanced": [(10, "a [unbalanced")],
    "a [b:.5] c": [(5, "a  c"), (10, "a b c")],
    "((a][:b:c [d:3]": [(3, "((a][:b:c "), (10, "((a][:b:c d")],
    "[a|(b:1.1)]": [(s, "a" if s % 2 else "(b:1.1)") for s in range(1, 11)],
    "[fe|]male": [(s, "female" if s % 2 else "male") for s in range(1, 11)],
    "[fe|||]male": [(s, "female" if s % 4 == 1 else "male") for s in range(1, 11)],
}
# ... with hires_steps=10 after 10 first-pass steps
A1111_HIRES_DOCTESTS = {"a [b:.5] c": [(10, "a b c")], "a [b:1.5] c": [(5, "a  c"), (10, "a b c")]}


@pytest.mark.parametrize("prompt", list(A1111_DOCTESTS))
def test_a1111_doctests(prompt):
    assert prompt_schedule(prompt, 10) == A1111_DOCTESTS[prompt]


@pytest.mark.parametrize("prompt", list(A1111_HIRES_DOCTESTS))
def test_a1111_hires_doctests(prompt):
    assert prompt_schedule(prompt, 10, hires_steps=10) == A1111_HIRES_DOCTESTS[prompt]


def test_unparsable_prompts_are_used_as_written():
    for prompt in ["a | b [c:d:3]", "a [b:c:3] \\", "[x (a:b:c) y:3]", "[a:b 3]"]:
        assert prompt_schedule(prompt, 10) == [(10, prompt)]
    assert prompt_schedule("[a:3:4]", 10) == [(4, "a"), (10, "3")]         # from "a" to "3" after step 4
    assert prompt_schedule("[a:b:25]", 20) == [(20, "a")]                   # past the end: never switches


# ---------------------------------------------------------------------------------------------------------
# A1111's lark grammar as the reference (its get_learned_conditioning_prompt_schedules, new scheduling)

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


def a1111_schedule(lark, parser, prompt: str, base_steps: int, hires_steps: int | None = None):
    int_offset, float_offset, steps = (0, 0.0, base_steps) if hires_steps is None else (base_steps, 1.0, hires_steps)
    try:
        tree = parser.parse(prompt)
    except lark.exceptions.LarkError:
        return [(steps, prompt)]
    ends = [steps]

    class CollectSteps(lark.Visitor):
        def scheduled(self, tree):
            s = tree.children[-2]
            v = (float(s) - float_offset) * steps if "." in s else float(s) - int_offset
            tree.children[-2] = min(steps, int(v))
            if tree.children[-2] >= 1:
                ends.append(tree.children[-2])

        def alternate(self, tree):
            ends.extend(range(1, steps + 1))

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

    return [(t, at_step(t)) for t in sorted(set(ends))]


def test_random_prompts_schedule_as_a1111():
    import lark
    parser = lark.Lark(A1111_GRAMMAR)
    rng = random.Random(0)
    atoms = ["a", "b", "cat", " ", "[", "]", "(", ")", ":", "|", "\\", "\\[", "3", ".5", "0.25", "12", "-1", "1e1",
             "1.", ":1.2)", ",", "{"]
    for prompt in list(A1111_DOCTESTS) + ["".join(rng.choice(atoms) for _ in range(rng.randint(0, 14))) for _ in range(1500)]:
        steps, hires = rng.choice([1, 4, 10, 20]), rng.choice([None, None, 6])
        assert prompt_schedule(prompt, steps, hires) == a1111_schedule(lark, parser, prompt, steps, hires), prompt


# ---------------------------------------------------------------------------------------------------------
# conditioning at each step


@pytest.fixture(scope="module")
def sd1():
    return tiny_bundle("sd1", seed=0)


@pytest.fixture(scope="module")
def sdxl():
    return tiny_bundle("sdxl", seed=0)


@torch.no_grad()
def test_schedule_conds_equal_each_prompt_alone(sd1):
    schedule = make_cond_schedule(sd1.text_encoders, sd1.family, "a [red cat:blue dog:0.5] on a sofa", "[ugly|blurry]",
                                  steps=4)
    assert [end for end, _, _ in schedule] == [1, 2, 3, 4]
    texts = [("a red cat on a sofa", "ugly"), ("a red cat on a sofa", "blurry"), ("a blue dog on a sofa", "ugly"),
             ("a blue dog on a sofa", "blurry")]
    for (_, cond, uncond), (positive, negative) in zip(schedule, texts):
        assert torch.allclose(cond["context"], encode_prompt(sd1.text_encoders, positive).context, atol=1e-6)
        assert torch.allclose(uncond["context"], encode_prompt(sd1.text_encoders, negative).context, atol=1e-6)
    assert schedule[0][2] is schedule[2][2]                     # a text pair is encoded once, its tensors shared
    plain = make_cond_schedule(sd1.text_encoders, sd1.family, "a red cat", "ugly", steps=4)
    assert len(plain) == 1 and plain[0][0] == 4


def _a1111_schedule_contexts(encoders, prompt: str, steps: int) -> list[tuple[int, torch.Tensor]]:
    """A1111 `prompt_parser.get_learned_conditioning` for one prompt: the texts of its schedule
    (`prompt_schedule` = A1111's `get_learned_conditioning_prompt_schedules`, checked above) as one batch of
    `sd_hijack_clip.FrozenCLIPEmbedderWithCustomWordsBase.forward`, per text encoder (SDXL's towers are two
    embedders): chunk i of every text, `empty_chunk()` where a text has none, then
    `sd_emphasis.EmphasisOriginal` on that chunk's batch. `encode_with_transformers` is the tower's plain
    hidden state, sdlab's `encode_prompt(..., emphasis=False)` (checked against transformers elsewhere)."""
    schedule = prompt_schedule(prompt, steps)
    texts = [text for _, text in schedule]
    batch_chunks = [prompt_chunks(text, encoders[0].tokenizer) for text in texts]
    chunk_count = max(len(x) for x in batch_chunks)
    towers = []
    for encoder in encoders:
        def plain(text, i):
            return encode_prompt([encoder], text, emphasis=False).context[:, 77 * i : 77 * (i + 1)]   # (1, 77, D)
        zs = []
        for i in range(chunk_count):
            z = torch.cat([plain(text, i) if i < len(chunks) else plain("", 0)
                           for text, chunks in zip(texts, batch_chunks)])
            multipliers = torch.tensor([[1.0, *chunks[i].weights, 1.0] if i < len(chunks) else [1.0] * 77
                                        for chunks in batch_chunks])
            original_mean = z.mean()                                                    # EmphasisOriginal
            z = z * multipliers.reshape(multipliers.shape + (1,)).expand(z.shape)
            new_mean = z.mean()
            z = z * (original_mean / new_mean)
            zs.append(z)
        towers.append(torch.hstack(zs))                                                 # (len(texts), 77 n, D)
    z = torch.cat(towers, dim=-1)
    return [(end, z[j : j + 1]) for j, (end, _) in enumerate(schedule)]


def _a1111_at(schedule: list[tuple[int, torch.Tensor]], step: int) -> torch.Tensor:
    return next((z for end, z in schedule if step <= end), schedule[0][1])


LONG = ", ".join(["a red apple"] * 30)                                   # 2 chunks
SCHEDULED_PROMPTS = [
    ("a (red:1.5) apple on a [blue:green:0.5] background", "[ugly|(blurry:1.3)]", 10),
    ("a (cat:1.4) [on a dark blue background|]", "", 5),                  # alternation: entries counted
    (f"[{LONG}:a cat:0.5]", f"[(bad hands:1.2)|{LONG}]", 4),              # an empty chunk pads the short texts
    (f"[({LONG}:1.1):a (cat:0.7):3] BREAK x [y|z]", "lowres", 6),
]


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("prompt, negative, steps", SCHEDULED_PROMPTS,
                         ids=["edit-emphasis", "alternation", "chunk-counts", "break-nested"])
@torch.no_grad()
def test_schedule_texts_are_encoded_as_one_a1111_batch(family, prompt, negative, steps, sd1, sdxl):
    """Each side's schedule texts as A1111 encodes them together: padded with the encoded empty chunk to the
    longest one's chunk count, one emphasis mean per chunk over all of them (an alternation's text counting
    once per step it lasts), on each tower; the pooled vector (SDXL) stays each text's first chunk's."""
    bundle = {"sd1": sd1, "sdxl": sdxl}[family]
    encoders = bundle.text_encoders
    schedule = make_cond_schedule(encoders, bundle.family, prompt, negative, steps=steps, width=64, height=64)
    cond_ref = _a1111_schedule_contexts(encoders, prompt, steps)
    uncond_ref = _a1111_schedule_contexts(encoders, negative, steps) if negative else None
    def check(context, expected):            # a context may be repeated to the other side's length (unchanged)
        assert context.shape[1] % expected.shape[1] == 0
        torch.testing.assert_close(context, expected.repeat(1, context.shape[1] // expected.shape[1], 1),
                                   rtol=0, atol=2e-5)

    for end, cond, uncond in schedule:
        check(cond["context"], _a1111_at(cond_ref, end))
        if uncond_ref is not None:
            check(uncond["context"], _a1111_at(uncond_ref, end))
        if family == "sdxl":
            text = next(text for e, text in prompt_schedule(prompt, steps) if end <= e)
            alone = encode_prompt(encoders, text, with_pooled=True).pooled
            torch.testing.assert_close(cond["y"][:, : alone.shape[1]], alone, rtol=0, atol=1e-6)


@torch.no_grad()
def test_schedule_texts_are_encoded_one_chunk_position_at_a_time(sd1):
    """A1111's forward runs one chunk position at a time over the batch's texts: a 3-chunk prompt with 2 x 3
    alternations (6 distinct texts) makes encoder calls of 6 rows, not one call of 6 texts x 3 chunks."""
    rows = []
    handle = sd1.text_encoders[0].model.register_forward_pre_hook(lambda module, args: rows.append(len(args[0])))
    try:
        prompt = f"{', '.join(['a red apple'] * 40)} [a|b] [c|d|e]"
        assert len(prompt_chunks(prompt, sd1.text_encoders[0].tokenizer)) == 3
        make_cond_schedule(sd1.text_encoders, sd1.family, prompt, "ugly", steps=12)
    finally:
        handle.remove()
    assert rows == [6, 6, 6, 1]                                   # the prompt's 3 positions, then the negative


def test_switch_at_calls_counts_calls_as_a1111():
    seen = []
    models = [(2, lambda x, sigma: seen.append("a") or x), (5, lambda x, sigma: seen.append("b") or x)]
    model = switch_at_calls(models)
    for _ in range(7):
        model(torch.zeros(1), torch.ones(1))
    assert seen == ["a", "a", "a", "b", "b", "b", "a"]         # calls 0-2, 3-5, then past the end: the first
    assert switch_at_calls(models[:1]) is models[0][1]


@torch.no_grad()
def test_generation_switches_the_prompt_at_the_step(sd1):
    """Euler, 6 steps, `[red cat:blue dog:0.5]`: the U-Net sees "red cat" at calls 0-3 (A1111: step <= 3), then
    "blue dog"; cond and uncond run batched, the cond in the second half."""
    contexts = []
    hook = sd1.unet.register_forward_pre_hook(lambda module, args, kwargs: contexts.append(kwargs.get("context", args[2] if len(args) > 2 else None)), with_kwargs=True)
    try:
        generate(sd1, GenerationRequest("a [red cat:blue dog:0.5]", negative_prompt="ugly", steps=6, seed=1,
                                        width=64, height=64, sampler="Euler", schedule="karras"))
    finally:
        hook.remove()
    cat = encode_prompt(sd1.text_encoders, "a red cat").context
    dog = encode_prompt(sd1.text_encoders, "a blue dog").context
    assert len(contexts) == 6
    drawn = ["cat" if torch.allclose(c[1:], cat, atol=1e-6) else "dog" if torch.allclose(c[1:], dog, atol=1e-6) else "?"
             for c in contexts]
    assert drawn == ["cat"] * 4 + ["dog"] * 2


@torch.no_grad()
def test_alternation_never_gets_a_stale_cached_key_or_value(sd1):
    """`[a|b]` alternates every call; the generation memo keeps each prompt's cross-attention k / v. Every U-Net
    output of the run must equal the same call made afresh outside the memo's scope."""
    calls = []
    hook = sd1.unet.register_forward_hook(
        lambda module, args, kwargs, out: calls.append((args, dict(kwargs), out.clone())), with_kwargs=True)
    try:
        generate(sd1, GenerationRequest("a [red cat|blue dog]", negative_prompt="ugly", steps=4, seed=1, width=64,
                                        height=64, sampler="Euler", schedule="karras"))
    finally:
        hook.remove()
    assert len(calls) == 4
    for args, kwargs, out in calls:
        assert torch.allclose(sd1.unet(*args, **kwargs), out, atol=1e-5)


def test_memo_keeps_a_few_sources_per_shape():
    from torch import nn

    from sdlab.models.generation_memo import reused, reusing_generation_work

    layer, made = nn.Linear(4, 4, bias=False), []
    a, b = torch.randn(1, 3, 4), torch.randn(1, 3, 4)
    with torch.no_grad(), reusing_generation_work():
        for source in (a, b, a, b, a):
            out = reused((layer,), source, lambda s=source: made.append(1) or layer(s))
            assert torch.equal(out, layer(source))
    assert len(made) == 2


def test_composable_parts_follow_a1111s_split_and_weights():
    """A1111 `get_multicond_prompt_list`: `re_AND` splits, `re_weight` reads a trailing `:WEIGHT` off each part
    (also with no AND at all) and drops the part's trailing whitespace, weight or none; an emphasis's weight
    inside brackets is not a part weight."""
    assert composable_parts("a cat AND a dog :0.5") == [("a cat", 1.0), (" a dog", 0.5)]
    assert composable_parts("a cat:1.5") == [("a cat", 1.5)]
    assert composable_parts("(cat:1.5)") == [("(cat:1.5)", 1.0)]
    assert composable_parts("x AND y AND z: -2") == [("x", 1.0), (" y", 1.0), (" z", -2.0)]
    assert composable_parts("ANDROID and candy") == [("ANDROID and candy", 1.0)]


def _a1111_multicond_parts(prompt: str) -> list[tuple[str, float]]:
    """A1111 `prompt_parser.get_multicond_prompt_list` for one prompt (its `re_AND`, `re_weight` and loop)."""
    re_and = re.compile(r"\bAND\b")
    re_weight = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")
    parts = []
    for subprompt in re_and.split(prompt):
        match = re_weight.search(subprompt)
        text, weight = match.groups() if match is not None else (subprompt, 1.0)
        parts.append((text, float(weight) if weight is not None else 1.0))
    return parts


@pytest.mark.parametrize("prompt", ["a AND b", "a cat \n AND\tdog\t\n", "  ", "x :2  AND y:  ", "a\nAND b :-1 \n",
                                    "[cat:dog:3] c\\ ", "(a:1.2) \t"])
def test_composable_parts_drop_trailing_whitespace_as_a1111(prompt):
    """A part's trailing whitespace goes, weight or none: `[cat:dog:3] c\\ ` is `[cat:dog:3] c\\` in A1111, whose
    final backslash leaves it without a schedule (the brackets then are emphasis)."""
    parts = composable_parts(prompt)
    assert parts == _a1111_multicond_parts(prompt)
    if prompt.startswith("[cat"):
        assert prompt_schedule(parts[0][0], 10) == [(10, "[cat:dog:3] c\\")]


def _pixels(bundle, prompt: str, cfg_scale: float, **options) -> torch.Tensor:
    request = GenerationRequest(prompt, negative_prompt="ugly", steps=3, seed=1, width=64, height=64,
                                sampler="Euler", schedule="karras", cfg_scale=cfg_scale, **options)
    return torch.tensor(np.asarray(generate(bundle, request).images[0]), dtype=torch.int16)


@torch.no_grad()
def test_a_part_weight_scales_its_guidance(sd1):
    """One part at weight w and CFG s is x0_u + s w (x0_c - x0_u): CFG s w on the part's text."""
    assert (_pixels(sd1, "a red cat :2", 3.0) - _pixels(sd1, "a red cat", 6.0)).abs().max() <= 1


@torch.no_grad()
def test_and_guides_toward_each_part(sd1):
    """`a red cat AND a blue dog :0.5`: the U-Net runs on the negative and on each part (their own passes), and
    the step's x0 is x0_u + s (1 (x0_cat - x0_u) + 0.5 (x0_dog - x0_u)) (A1111 `combine_denoised`)."""
    contexts, outputs = [], []

    def record(module, args, kwargs, out):
        contexts.append(kwargs.get("context", args[2] if len(args) > 2 else None))
        outputs.append(out)

    hook = sd1.unet.register_forward_hook(record, with_kwargs=True)
    try:
        _pixels(sd1, "a red cat AND a blue dog :0.5", 5.0)
    finally:
        hook.remove()
    cat = encode_prompt(sd1.text_encoders, "a red cat").context
    dog = encode_prompt(sd1.text_encoders, " a blue dog").context
    ugly = encode_prompt(sd1.text_encoders, "ugly").context
    names = ["cat" if torch.allclose(c, cat, atol=1e-6) else "dog" if torch.allclose(c, dog, atol=1e-6)
             else "ugly" if torch.allclose(c, ugly, atol=1e-6) else "?" for c in contexts]
    assert names == ["ugly", "cat", "dog"] * 3


@torch.no_grad()
def test_and_parts_of_different_lengths_are_padded_with_their_last_token_as_a1111(sd1):
    """A part over 75 tokens makes a longer context: A1111 stacks the parts into one batch, padding the
    shorter ones by repeating their last token vector (`reconstruct_multicond_batch`), which changes their
    attention; the negative keeps its own length (its own pass). A part's text is encoded alone."""
    contexts = []
    hook = sd1.unet.register_forward_pre_hook(
        lambda module, args, kwargs: contexts.append(kwargs.get("context", args[2] if len(args) > 2 else None)),
        with_kwargs=True)
    long_part = " ".join(["a tall red house"] * 25)
    try:
        _pixels(sd1, f"a cat AND {long_part}", 5.0)
    finally:
        hook.remove()
    cat = encode_prompt(sd1.text_encoders, "a cat").context                       # (1, 77, D)
    house = encode_prompt(sd1.text_encoders, f" {long_part}").context             # (1, 154, D)
    ugly = encode_prompt(sd1.text_encoders, "ugly").context
    assert house.shape[1] == 154 and [c.shape[1] for c in contexts] == [77, 154, 154] * 3
    padded_cat = torch.cat([cat, cat[:, -1:].expand(-1, 77, -1)], dim=1)
    for seen, expected in zip(contexts, [ugly, padded_cat, house]):
        assert torch.allclose(seen, expected, atol=1e-6)


def test_merged_part_schedules_switch_at_every_parts_steps():
    from sdlab.pipeline.conditioning import merge_part_schedules

    def cond(tokens: int, value: float):
        return {"context": torch.full((1, tokens, 2), value)}
    a1, a2, b = cond(1, 1.0), cond(3, 2.0), cond(2, 3.0)
    merged = merge_part_schedules([[(1, a1, None), (4, a2, None)], [(4, b, None)]])
    assert [end for end, _ in merged] == [1, 4]
    (_, first), (_, second) = merged
    assert first[1] is b and first[0]["context"][0, :, 0].tolist() == [1.0, 1.0]   # a1 padded to b's 2 tokens
    assert second[0] is a2 and second[1]["context"].shape[1] == 3
    assert second[1]["context"][0, :, 0].tolist() == [3.0, 3.0, 3.0]


def test_composable_cfg_sums_the_parts_guidance_in_order():
    from sdlab.diffusion.guidance import composable_cfg

    x, sigma = torch.ones(1, 1, 2, 2), torch.ones(1)
    const = lambda value: (lambda x, sigma, **_: torch.full_like(x, value))            # noqa: E731
    model = composable_cfg([(const(3.0), 1.0), (const(-1.0), 0.5)], const(1.0), 7.0)
    assert torch.equal(model(x, sigma), torch.full_like(x, 1.0 + 7.0 * (1.0 * 2.0 + 0.5 * -2.0)))


@torch.no_grad()
def test_a_hires_pass_counts_prompt_edits_on_from_the_first_pass(sd1):
    """A1111: a hires second pass is scheduled as steps after the first pass's; `[red cat:blue dog:0.5]` has
    switched by then, so the second pass draws "blue dog" throughout (not from its own half-way point)."""
    contexts = []
    hook = sd1.unet.register_forward_pre_hook(
        lambda module, args, kwargs: contexts.append(kwargs.get("context", args[2] if len(args) > 2 else None)),
        with_kwargs=True)
    try:
        generate_hires(sd1, make_plan(sd1, GenerationRequest(
            "a [red cat:blue dog:0.5]", negative_prompt="ugly", steps=4, seed=1, width=64, height=64,
            sampler="Euler", schedule="karras", hr_scale=1.5, hr_steps=4, hr_denoise=1.0)))
    finally:
        hook.remove()
    cat = encode_prompt(sd1.text_encoders, "a red cat").context
    drawn = ["cat" if torch.allclose(c[1:], cat, atol=1e-6) else "dog" for c in contexts]
    assert drawn == ["cat"] * 3 + ["dog"] + ["dog"] * 4


@torch.no_grad()
def test_a_refiner_counts_prompt_edits_on_from_the_base():
    """A1111 swaps in the refiner under the same step counter: with the switch at half of 4 Euler steps,
    `[red cat:blue dog:0.5]` (cat up to call 2) is still "red cat" at the refiner's first call."""
    from sdlab.pipeline.generate import generate_with_refiner

    base, refiner = tiny_bundle("sdxl"), tiny_bundle("sdxl-refiner", seed=5)
    contexts = []
    hook = refiner.unet.register_forward_pre_hook(
        lambda module, args, kwargs: contexts.append(kwargs.get("context", args[2] if len(args) > 2 else None)),
        with_kwargs=True)
    try:
        generate_with_refiner(base, refiner, GenerationRequest(
            "a [red cat:blue dog:0.5]", negative_prompt="ugly", steps=4, seed=1, width=32, height=32,
            sampler="Euler", schedule="karras"), switch_at=0.5)
    finally:
        hook.remove()
    cat = encode_prompt(refiner.text_encoders, "a red cat").context
    assert ["cat" if torch.allclose(c[1:], cat, atol=1e-6) else "dog" for c in contexts] == ["cat", "dog"]
