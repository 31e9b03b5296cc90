"""Hostile prompts: linear-time parsing and tokenizing, bounded emphasis weights, nesting and chunks.

Each limit is a `PromptError` (a `RequestError`), which the command line prints as one `sdlab: error:`
line with exit status 2 and no file. Brackets, weights and BREAK otherwise parse exactly as A1111's
`parse_prompt_attention` does (the reference algorithm below is that algorithm, written plainly).
"""

from __future__ import annotations

import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bundle_fixtures import tiny_bundle, write_original
from sdlab.cli import main
from sdlab.models.tokenizer import default_tokenizer
from sdlab.pipeline.conditioning import prompt_chunks
from sdlab.pipeline.prompt_syntax import (
    MAX_BRACKET_DEPTH,
    MAX_CHUNKS,
    MAX_EMPHASIS_WEIGHT,
    PromptError,
    _split_breaks,
    chunk_tokens,
    parse_weighted,
)
from sdlab.pipeline.request import RequestError

A1111_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def a1111_reference(text: str) -> list[tuple[str, float]]:
    """A1111's parse_prompt_attention as the plain quadratic algorithm: each bracket rescales every run
    since it opened, in the order the brackets close (open ones at the end, round before square)."""
    pattern = re.compile(
        r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:"
    )
    runs, rounds, squares = [], [], []

    def scale(start, factor):
        for run in runs[start:]:
            run[1] *= factor

    for m in pattern.finditer(text):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\"):
            runs.append([token[1:], 1.0])
        elif token in "([":
            (rounds if token == "(" else squares).append(len(runs))
        elif weight is not None and rounds:
            scale(rounds.pop(), float(weight))
        elif token == ")" and rounds:
            scale(rounds.pop(), 1.1)
        elif token == "]" and squares:
            scale(squares.pop(), 1 / 1.1)
        else:
            for i, part in enumerate(A1111_BREAK.split(token)):
                if i:
                    runs.append(["BREAK", -1.0])
                runs.append([part, 1.0])
    for start in rounds:
        scale(start, 1.1)
    for start in squares:
        scale(start, 1 / 1.1)
    merged = [list(runs[0])] if runs else [["", 1.0]]
    for text_, weight in runs[1:]:
        if weight == merged[-1][1]:
            merged[-1][0] += text_
        else:
            merged.append([text_, weight])
    return [(t, w) for t, w in merged]


# --- parity with A1111 on random prompts -------------------------------------------------------------

_PIECES = ["(", ")", "[", "]", ":", ":1.3)", ": 0.5 )", ":-2)", "\\(", "\\]", "\\", "a", "cat ", " ",
           "\n", "BREAK", " BREAK ", "BREAKFAST", ",", "\u00a0", "1.2", "\t"]


def _random_prompt(rng: random.Random) -> str:
    return "".join(rng.choice(_PIECES) for _ in range(rng.randint(0, 40)))


def test_parse_equals_a1111_on_random_prompts_to_the_last_bit():
    rng = random.Random(0)
    for _ in range(3000):
        prompt = _random_prompt(rng)
        assert parse_weighted(prompt) == a1111_reference(prompt), prompt


def test_break_split_equals_a1111_regex_split():
    rng = random.Random(1)
    alphabet = [" ", "\n", "\u00a0", "\u2003", "B", "R", "E", "A", "K", "x", "_", "BREAK", ".", "é"]
    for _ in range(5000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        assert _split_breaks(text) == A1111_BREAK.split(text), repr(text)


# --- linear time ----------------------------------------------------------------------------------------

def _python_lines_run(prompt: str) -> int:
    """Lines of Python executed in prompt_syntax while parsing ``prompt``: a deterministic measure of work."""
    count = 0

    def tracer(frame, event, arg):
        nonlocal count
        if frame.f_code.co_filename.endswith("prompt_syntax.py"):
            if event == "line":
                count += 1
            return tracer
        return None

    sys.settrace(tracer)
    try:
        try:
            parse_weighted(prompt)
        except PromptError:
            pass
    finally:
        sys.settrace(None)
    return count


@pytest.mark.parametrize(
    "make",
    [
        lambda n: "(a" * n,                                   # each "(" stays open: was n ** 2 / 2 multiplies
        lambda n: "([a" * n,                                  # weights stay near 1, depth grows
        lambda n: "(" * MAX_BRACKET_DEPTH + "\\(x" * n,       # many runs at the deepest allowed level
        lambda n: "((a) [b] (c:1.2), BREAK " * n,
        lambda n: " " * n + "BREAK" + ": " * n,
    ],
    ids=["open-round", "alternating", "deepest-runs", "mixed", "blank"],
)
def test_parse_work_grows_linearly(make):
    small, large = _python_lines_run(make(400)), _python_lines_run(make(1600))
    assert large <= 4.5 * small + 200, (small, large)


def test_huge_prompts_parse_and_tokenize_in_linear_time():
    """Sizes a quadratic parser needs hours for (a blank 20,000-character prompt took 6 s; a 20,000-letter
    word 17 s to tokenize): linear code finishes in seconds, so a generous timeout tells them apart."""
    script = """
import random, string
from sdlab.models.tokenizer import default_tokenizer
from sdlab.pipeline.prompt_syntax import PromptError, parse_weighted
tok = default_tokenizer()
assert parse_weighted(" " * 1_000_000) == [(" " * 1_000_000, 1.0)]
assert parse_weighted("x \\n BREAK " * 100_000).count(("BREAK", -1.0)) == 100_000
for prompt in ("(a" * 500_000, "[a(" * 300_000):
    try:
        parse_weighted(prompt)
        raise SystemExit("no error")
    except PromptError:
        pass
rng = random.Random(0)
word = "".join(rng.choice(string.ascii_lowercase) for _ in range(100_000))
assert 10_000 < len(tok.encode(word)) < 100_000
assert tok.encode(" " * 1_000_000) == []
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


# --- weights ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "prompt, message",
    [
        ("a (x:1.2.3) b", "'1.2.3' at character 5 is not a number"),     # A1111's float() fails too
        ("(x:..)", "is not a number"),
        ("(cat:" + "9" * 400 + ")", "too large"),                       # float() gives inf
        ("(cat:1" + "0" * 308 + ")", "emphasis weight of 1e+308"),      # finite but absurd
        ("((cat:17" + "0" * 307 + "))", "emphasis weight of inf"),      # 1.7e308 x 1.1 overflows
        ("(" * 10_000 + "cat", "inside 10000 brackets"),
        ("(" * 60 + "cat", "emphasis weight of 304.5"),                  # 1.1 ** 60
        ("(cat:150)", "emphasis weight of 150"),
        ("(cat:-101)", "emphasis weight of -101"),
        ("[" * (MAX_BRACKET_DEPTH + 1) + "cat", f"inside {MAX_BRACKET_DEPTH + 1} brackets"),
    ],
)
def test_bad_weights_are_prompt_errors(prompt, message):
    with pytest.raises(PromptError, match=re.escape(message)) as caught:
        parse_weighted(prompt)
    assert isinstance(caught.value, RequestError) and isinstance(caught.value, ValueError)


def test_weights_within_the_limits_parse_as_in_a1111():
    assert parse_weighted("(cat:100)") == [("cat", 100.0)]
    assert parse_weighted("(cat:-100)") == [("cat", -100.0)]
    assert parse_weighted("((cat:150):0.5)") == [("cat", 75.0)]          # the bound is on the final weight
    assert parse_weighted("(cat:0)") == [("cat", 0.0)]
    deep = "[" * MAX_BRACKET_DEPTH + "cat"
    assert parse_weighted(deep) == a1111_reference(deep)
    # open brackets with no text after them scale nothing, however many (A1111 ignores them too)
    assert parse_weighted("a cat " + "(" * 10_000) == [("a cat ", 1.0)]
    assert parse_weighted("(" * 10_000) == [("", 1.0)]
    assert parse_weighted("a ((b) " + "]" * 1000) == a1111_reference("a ((b) " + "]" * 1000)


# --- chunks ----------------------------------------------------------------------------------------------

def _word_ids(text: str) -> list[int]:
    return [int(w[1:]) for w in re.findall(r"w\d+", text)]


def test_chunk_count_is_bounded():
    assert len(chunk_tokens(parse_weighted("w1 BREAK " * (MAX_CHUNKS - 1) + "w1"), _word_ids)) == MAX_CHUNKS
    with pytest.raises(PromptError, match=f"more than {MAX_CHUNKS} chunks"):
        chunk_tokens(parse_weighted("w1 BREAK " * MAX_CHUNKS + "w1"), _word_ids)
    exact = " ".join(["w5"] * (75 * MAX_CHUNKS))
    assert len(chunk_tokens([(exact, 1.0)], _word_ids)) == MAX_CHUNKS
    with pytest.raises(PromptError, match="chunks"):
        chunk_tokens([(exact + " w5", 1.0)], _word_ids)
    assert len(chunk_tokens([(exact, 1.0)], _word_ids, max_chunks=MAX_CHUNKS * 2)) == MAX_CHUNKS


def test_prompt_chunks_names_the_prompt():
    tok = default_tokenizer()
    with pytest.raises(PromptError, match=r"^prompt 'BREAK BREAK .*\.\.\.': more than 32 chunks"):
        prompt_chunks("BREAK " * 3333, tok)
    with pytest.raises(PromptError, match=r"^prompt 'a \(x:1\.2\.3\)': emphasis weight '1\.2\.3'"):
        prompt_chunks("a (x:1.2.3)", tok)


# --- refused when the request is resolved ---------------------------------------------------------------

CHUNKS_OF_CAT = "cat " * (75 * MAX_CHUNKS)         # "cat" is one token: exactly MAX_CHUNKS chunks


def test_a_prompt_past_the_chunks_is_refused_when_resolved_not_when_drawn(model):
    """`Pipeline.resolve` ("after every check") counts the chunks with the model's tokenizer, in every text the
    request encodes, the prompt's extra-network tags and comments left out as they are when it is encoded."""
    import sdlab
    from sdlab.pipeline.request import GenerationRequest

    pipe = sdlab.load(model)
    for prompt, negative in ((CHUNKS_OF_CAT + "cat", ""), ("a cat", CHUNKS_OF_CAT + "cat"),
                             ("[" + CHUNKS_OF_CAT + "cat:a dog:0.5]", "")):
        with pytest.raises(PromptError, match=f"more than {MAX_CHUNKS} chunks"):
            pipe.resolve(GenerationRequest(prompt, negative, steps=2))
    pipe.resolve(GenerationRequest(CHUNKS_OF_CAT + "<hypernet:style:1>\n# and a comment of many words", steps=2))
    breaks = "cat BREAK " * MAX_CHUNKS + "cat"          # MAX_CHUNKS + 1 chunks, or text under the emphasis "None"
    with pytest.raises(PromptError, match=f"more than {MAX_CHUNKS} chunks"):
        pipe.resolve(GenerationRequest(breaks, steps=2))
    pipe.resolve(GenerationRequest(breaks, steps=2, emphasis="None"))


LONG_EDIT = "[a dog:" + CHUNKS_OF_CAT + "cat:{when}]"          # a text of MAX_CHUNKS + 1 chunks from step `when`
HEUN_EDIT = dict(prompt=LONG_EDIT.format(when=15), steps=10, sampler="Heun")           # call 15 of 20
HIRES_EDIT = dict(prompt=LONG_EDIT.format(when=5), steps=4, sampler="Euler", hr_scale=1.5,   # step 1 of the
                  hr_upscaler="Latent")                                                       # second pass


def test_prompt_edits_are_counted_on_the_schedules_the_drawing_uses(model):
    """The check schedules the edits as the drawing does (`plan.prompt_schedule_steps`): over a second-order
    sampler's model calls (A1111's step_multiplier: Heun's 10 steps are 20 calls, so step 15 is reached) and, for
    a hires request, in its second pass too, whose edits count on from the first pass (step 5 of 4 + 4)."""
    import sdlab
    from sdlab.pipeline.request import GenerationRequest

    pipe = sdlab.load(model)
    for fields in (HEUN_EDIT, HIRES_EDIT):
        with pytest.raises(PromptError, match=f"more than {MAX_CHUNKS} chunks"):
            pipe.resolve(GenerationRequest(**fields))
    pipe.resolve(GenerationRequest(**{**HEUN_EDIT, "sampler": "Euler"}))        # step 15 of 10: never drawn
    pipe.resolve(GenerationRequest(**{**HIRES_EDIT, "hr_scale": None, "hr_upscaler": None}))  # no second pass


def test_a_guidance_embedded_unet_counts_its_whole_prompt(model):
    """A U-Net with a guidance embedding encodes the prompt whole, AND and all (`plan.prompt_parts`), so parts
    that fit each are refused together."""
    from dataclasses import replace

    from sdlab.pipeline.plan import check_prompt_chunks
    from sdlab.pipeline.request import GenerationRequest

    bundle = tiny_bundle("sd1")
    halves = GenerationRequest("cat " * 1200 + "AND " + "dog " * 1200, steps=2, sampler="Euler")
    check_prompt_chunks(bundle, halves)
    lcm = replace(bundle, unet_config=replace(bundle.unet_config, time_cond_proj_dim=32))
    with pytest.raises(PromptError, match=f"more than {MAX_CHUNKS} chunks"):
        check_prompt_chunks(lcm, halves)


def test_the_server_refuses_a_prompt_past_the_chunks_before_queueing_it(tmp_path):
    """The server's submit check counts them with the loaded model's tokenizer: a 400 at once, nothing queued."""
    from sdlab.pipeline.request import GenerationRequest
    from sdlab.server.config import ServerConfig
    from sdlab.server.inputs import BadRequest, JobSpec
    from sdlab.server.service import Service

    service = Service(ServerConfig(tmp_path / "served"))
    try:
        service.runner.warm()               # the startup model, loaded as `sdlab serve` loads it before listening
        with pytest.raises(BadRequest, match=f"more than {MAX_CHUNKS} chunks") as refused:
            service.submit(JobSpec(GenerationRequest(CHUNKS_OF_CAT + "cat", steps=2)), "txt2img", None)
        assert refused.value.status == 400 and service.queue.counts() == (0, 0)
        for fields in (HEUN_EDIT, HIRES_EDIT):          # edits on the drawing's schedules (the test above)
            with pytest.raises(BadRequest, match=f"more than {MAX_CHUNKS} chunks"):
                service.submit(JobSpec(GenerationRequest(**fields)), "txt2img", None)
        assert service.queue.counts() == (0, 0)
    finally:
        service.store.close()


# --- the command line ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny-sd1.safetensors"
    write_original(tiny_bundle("sd1"), path, junk=False)
    return path


@pytest.mark.parametrize(
    "prompt, negative, message",
    [
        ("(x:1.2.3)", "", "emphasis weight '1.2.3'"),
        ("a (cat:" + "9" * 400 + ")", "", "too large"),
        ("(" * 10_000 + "a cat", "", "brackets"),
        ("BREAK " * 3333, "", "chunks"),
        ("a cat", "(blurry:1.2.3)", "prompt '(blurry:1.2.3)'"),
    ],
    ids=["malformed", "overflow", "unclosed", "chunks", "negative"],
)
def test_cli_reports_bad_prompts_as_user_errors(model, tmp_path, capsys, prompt, negative, message):
    out = tmp_path / "x.png"
    code = main(["txt2img", prompt, "--negative", negative, "--model", str(model), "--out", str(out),
                 "--steps", "2", "--width", "32", "--height", "32", "--no-progress"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sdlab: error: ")]
    assert code == 2
    assert len(errors) == 1 and message in errors[0] and "internal error" not in errors[0], errors
    assert not out.exists()


def test_a_hires_prompts_comments_and_tags_are_not_counted_and_its_error_names_it(model):
    """The second pass encodes the hires prompts without their comments and extra-network tags, as the prompt (A1111's
    comments script strips `hr_prompt` / `hr_negative_prompt` too): long comments there pass the check, and a
    hires prompt past the chunks is refused naming its field."""
    import sdlab
    from sdlab.pipeline.request import GenerationRequest

    pipe = sdlab.load(model)
    hires = dict(steps=2, hr_scale=1.5, hr_upscaler="Latent")
    comment = "a dog\n# " + CHUNKS_OF_CAT + "cat\nin snow"
    pipe.resolve(GenerationRequest("a cat", hr_prompt=comment, hr_negative_prompt="ugly # " + CHUNKS_OF_CAT, **hires))
    for field in ("hr_prompt", "hr_negative_prompt"):
        with pytest.raises(PromptError, match=f"^{field}: prompt .*more than {MAX_CHUNKS} chunks"):
            pipe.resolve(GenerationRequest("a cat", **{field: "a dog " + CHUNKS_OF_CAT}, **hires))
