"""Dataset builders: caption grammar round trip and parser, palettes, emoji font and subset,
held-out pairs never built, determinism from a seed."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from sdlab.tiny.datasets import build, emoji
from sdlab.tiny.datasets.captions import (CAPTION_TEMPLATES, SHAPES, SceneSpec, caption, parse_caption,
                                         phrasing_family, read_prompt)
from sdlab.tiny.datasets.phrasing import DISTRACTOR_WORDS
from sdlab.tiny.datasets.vocabulary import EMOJI_ALIASES
from sdlab.tiny.datasets.colours import BACKGROUND_COLOURS, PALETTE, SUBJECT_COLOURS, contrasting, delta_e, nearest_colour
from sdlab.tiny.datasets.emoji_subset import EMOJI, EMOJI_NAMES
from sdlab.tiny.datasets.layout import POSITIONS, SIZES, position_centre, sample_placement
from sdlab.tiny.datasets.scene import render_scene
from sdlab.tiny.datasets.shapes import HELD_OUT_SHAPE_COLOURS, is_held_out


def _all_specs(emoji_stride: int = 7) -> list[SceneSpec]:
    specs = []
    for index, (size, position, background) in enumerate(itertools.product(SIZES, POSITIONS, BACKGROUND_COLOURS)):
        specs.append(
            SceneSpec("emoji", EMOJI_NAMES[(index * emoji_stride) % len(EMOJI_NAMES)], None, size, position, background)
        )
        shape = SHAPES[index % len(SHAPES)]
        colours = [c for c in SUBJECT_COLOURS if contrasting(c, background)]
        colour = colours[index % len(colours)]
        specs.append(SceneSpec("shape", shape, colour, size, position, background))
    return specs


def test_caption_round_trip_every_template() -> None:
    for spec in _all_specs():
        for template in range(CAPTION_TEMPLATES):
            assert parse_caption(caption(spec, template)) == spec, caption(spec, template)


def test_every_emoji_name_round_trips() -> None:
    for name in EMOJI_NAMES:
        spec = SceneSpec("emoji", name, None, "medium", "bottom left", "dark blue")
        assert parse_caption(caption(spec)) == spec


def test_canonical_caption_text() -> None:
    assert caption(SceneSpec("emoji", "red apple", None, "small", "top left", "light blue")) == (
        "a small red apple in the top left on a light blue background"
    )
    assert caption(SceneSpec("shape", "star", "blue", "large", "bottom right", "white"), 1) == (
        "a large blue star, bottom right, white background"
    )


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        (
            "a large blue star, bottom right, white background",
            SceneSpec("shape", "star", "blue", "large", "bottom right", "white"),
        ),
        ("Big grey circle in the upper-left corner.", SceneSpec("shape", "circle", "gray", "large", "top left", None)),
        ("a cat face on dark green background", SceneSpec("emoji", "cat face", None, None, None, "dark green")),
        (
            "A light blue background with a medium pink heart on the right side",
            SceneSpec("shape", "heart", "pink", "medium", "right", "light blue"),
        ),
        ("tiny rocket at the top of the image", SceneSpec("emoji", "rocket", None, "small", "top", None)),
        (
            "a medium-sized green hexagon in the middle, black background",
            SceneSpec("shape", "hexagon", "green", "medium", "center", "black"),
        ),
        ("red apple", SceneSpec("emoji", "red apple")),
        ("an apple with a blue background", SceneSpec("emoji", "red apple", background="blue")),
        ("a cat in front of a pink wall", SceneSpec("emoji", "cat face", background="pink")),
        ("a red star on orange", SceneSpec("shape", "star", "red", background="orange")),
        ("two apples, purple backdrop", SceneSpec("emoji", "red apple", background="purple", count=2)),
        ("3 tiny blue stars", SceneSpec("shape", "star", "blue", "small", count=3)),
        ("a pair of pizzas", SceneSpec("emoji", "slice of pizza", count=2)),
        ("hearts on a brown background", SceneSpec("shape", "heart", background="brown", count=None)),
        ("a star in green on a solid grey background", SceneSpec("shape", "star", "green", background="gray")),
        (
            "a small square that is yellow, lower right, on a navy background",
            SceneSpec("shape", "square", "yellow", "small", "bottom right", "dark blue"),
        ),
    ],
)
def test_parser_reads_paraphrases(prompt: str, expected: SceneSpec) -> None:
    assert parse_caption(prompt) == expected


@pytest.mark.parametrize(
    "prompt",
    [
        "a purple elephant",
        "a red star on a red background",
        "a star on a mauve background",
        "two large apples",
        "a star at the top bottom",
        "a small red circle wearing a hat",
    ],
)
def test_parser_rejects_what_it_cannot_read(prompt: str) -> None:
    with pytest.raises(ValueError):
        parse_caption(prompt)


def test_spec_validates_vocabulary() -> None:
    with pytest.raises(ValueError, match="trained emoji"):
        SceneSpec("emoji", "purple elephant")
    with pytest.raises(ValueError, match="no separate colour"):
        SceneSpec("emoji", "red apple", colour="red")
    with pytest.raises(ValueError, match="background"):
        SceneSpec("shape", "star", "red", "small", "top", "red")


def test_palettes_are_separated_in_lab() -> None:
    for palette, minimum in ((SUBJECT_COLOURS, 25.0), (BACKGROUND_COLOURS, 25.0)):
        for a, b in itertools.combinations(palette, 2):
            assert float(delta_e(PALETTE[a], PALETTE[b])) >= minimum, (a, b)
    for name in PALETTE:
        assert nearest_colour(PALETTE[name]) == name
    assert nearest_colour((250, 250, 250), BACKGROUND_COLOURS) == "white"
    assert nearest_colour((200, 20, 20), SUBJECT_COLOURS) == "red"


def test_emoji_subset_renders_and_names_are_unambiguous() -> None:
    assert 200 <= len(EMOJI) <= 400
    assert len(set(EMOJI_NAMES)) == len(EMOJI_NAMES)
    for codepoint, name in EMOJI:
        assert emoji.caption_name(codepoint) == name
        assert not emoji.NAME_EXCLUSIONS.intersection(name.split())
        assert name not in PALETTE and name not in SHAPES
        glyph = emoji.emoji_glyph(codepoint)
        assert glyph.mode == "RGBA" and min(glyph.size) >= 40, name
        colours = np.asarray(glyph)[..., :3].reshape(-1, 3)
        assert len(np.unique(colours[::7], axis=0)) > 8, f"{name} does not render in colour"


def test_font_search_and_its_error(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    assert emoji.find_emoji_font().name == emoji.EMOJI_FONT_FILE
    monkeypatch.setattr(emoji, "FONT_DIRS", (str(tmp_path),))
    monkeypatch.delenv(emoji.FONT_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match="fonts-noto-color-emoji"):
        emoji.find_emoji_font()


def test_placement_stays_inside_the_margin() -> None:
    rng = np.random.default_rng(0)
    for size, position in itertools.product(SIZES, POSITIONS):
        for _ in range(20):
            side, cx, cy = sample_placement(size, position, rng)
            assert min(cx - side / 2, cy - side / 2, 1 - cx - side / 2, 1 - cy - side / 2) >= 0.049
    assert position_centre("center", 0.3) == (0.5, 0.5)


def test_held_out_pairs_cover_each_shape_once_and_never_appear_in_training(tmp_path) -> None:
    assert {s for s, _ in HELD_OUT_SHAPE_COLOURS} == set(SHAPES)
    assert len({c for _, c in HELD_OUT_SHAPE_COLOURS}) == len(HELD_OUT_SHAPE_COLOURS)
    pairs = build.shape_pairs_for_training()
    assert not set(pairs) & HELD_OUT_SHAPE_COLOURS
    assert {s for s, _ in pairs} == set(SHAPES) and {c for _, c in pairs} == set(SUBJECT_COLOURS)
    seen = set()
    for index in range(3000):
        spec = build.sample_spec(np.random.default_rng([5, index]), "shapes")
        assert not is_held_out(spec.subject, spec.colour)
        assert float(delta_e(PALETTE[spec.colour], PALETTE[spec.background])) >= build.MIN_CONTRAST
        seen.add((spec.subject, spec.colour))
    assert seen == set(pairs)


def test_build_writes_pairs_and_is_deterministic(tmp_path) -> None:
    first = build.build_dataset(tmp_path / "a", 24, seed=3, paraphrase_prob=0.5)
    again = build.build_dataset(tmp_path / "b", 24, seed=3, paraphrase_prob=0.5)
    prefix = build.build_dataset(tmp_path / "c", 10, seed=3, paraphrase_prob=0.5)
    other = build.build_dataset(tmp_path / "d", 24, seed=4)
    assert first == again and first[:10] == prefix
    assert [r["caption"] for r in first] != [r["caption"] for r in other]
    for record in first:
        png = (tmp_path / "a" / record["file"]).read_bytes()
        assert png == (tmp_path / "b" / record["file"]).read_bytes()
        text = (tmp_path / "a" / record["file"]).with_suffix(".txt").read_text()
        assert text == record["caption"]
        assert parse_caption(text) == SceneSpec(**record["spec"])
    lines = (tmp_path / "a" / "metadata.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == first
    assert {r["spec"]["kind"] for r in first} == {"emoji", "shape"}


def test_captions_leave_fields_out_without_changing_the_images(tmp_path) -> None:
    omit = {"size": 0.5, "position": 0.5, "background": 0.3}
    plain = build.build_dataset(tmp_path / "plain", 40, seed=5)
    varied = build.build_dataset(tmp_path / "varied", 40, seed=5, paraphrase_prob=0.3, omit_probs=omit)
    assert [r["spec"] for r in plain] == [r["spec"] for r in varied]  # the full scene is kept
    left_out = {name: 0 for name in omit}
    for a, b in zip(plain, varied):
        assert (tmp_path / "plain" / a["file"]).read_bytes() == (tmp_path / "varied" / b["file"]).read_bytes()
        full, said = SceneSpec(**b["spec"]), parse_caption(b["caption"])
        assert (said.kind, said.subject, said.colour) == (full.kind, full.subject, full.colour)
        for name in omit:
            stated = getattr(said, name)
            assert stated in (None, getattr(full, name)), b["caption"]
            left_out[name] += stated is None
    assert all(5 <= n <= 35 for n in left_out.values()), left_out  # 40 draws at p = 0.3 / 0.5
    with pytest.raises(ValueError, match="unknown fields"):
        build.build_dataset(tmp_path / "bad", 1, omit_probs={"colour": 0.5})


def test_unsaid_defaults_draw_what_the_caption_leaves_out_at_its_default(tmp_path) -> None:
    from PIL import Image

    from sdlab.tiny.evaluation.scoring import score_image

    omit = {"size": 0.5, "position": 0.5, "background": 0.5}
    random = build.build_dataset(tmp_path / "random", 60, seed=9, omit_probs=omit, free_prob=0.5, plural_prob=0.1)
    framed = build.build_dataset(tmp_path / "framed", 60, seed=9, omit_probs=omit, free_prob=0.5, plural_prob=0.1,
                                 unsaid_defaults=True)
    assert [r["caption"] for r in random] == [r["caption"] for r in framed]  # the wording does not change
    defaulted = 0
    for before, after in zip(random, framed):
        drawn, said = SceneSpec(**after["spec"]), read_prompt(after["caption"])[0]
        for name in ("size", "position", "background"):
            stated, default = getattr(said, name), build.UNSAID_DEFAULTS[name]
            if stated is not None:
                assert getattr(drawn, name) == stated == before["spec"][name], after
            elif drawn.count == 1 or name == "background":
                expected = "black" if name == "background" and not contrasting(drawn.colour or "red", default) \
                    else default
                assert getattr(drawn, name) == expected, after
                defaulted += getattr(drawn, name) != before["spec"][name]
        result = score_image(Image.open(tmp_path / "framed" / after["file"]), drawn)  # drawn as recorded
        assert result["correct"]["background"], after
    assert defaulted >= 20  # the defaults changed many scenes
    white_shape = build.with_unsaid_defaults(SceneSpec("shape", "star", "white", "small", "top", "black"),
                                             SceneSpec("shape", "star", "white", None, None, None))
    assert (white_shape.size, white_shape.position, white_shape.background) == ("large", "center", "black")


def test_render_is_deterministic_and_sized() -> None:
    spec = SceneSpec("emoji", "cat face", None, "large", "right", "light green")
    a = render_scene(spec, np.random.default_rng(1))
    b = render_scene(spec, np.random.default_rng(1))
    assert a.size == (64, 64) and a.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(b))
    big = render_scene(spec, np.random.default_rng(1), image_size=128)
    assert big.size == (128, 128)
    border = np.asarray(a)[:2].reshape(-1, 3)
    assert (border == PALETTE["light green"]).all()


# --- free phrasing, plurals, words the model does not know ---------------------------------------------


def test_free_captions_read_back_to_what_they_state(tmp_path) -> None:
    omit = {"size": 0.3, "position": 0.3, "background": 0.15}
    records = build.build_dataset(tmp_path / "free", 300, seed=7, omit_probs=omit, free_prob=1.0, plural_prob=0.15)
    families = set()
    for record in records:
        full, text = SceneSpec(**record["spec"]), record["caption"]
        said, unknown = read_prompt(text)
        assert (said.kind, said.subject, said.colour) == (full.kind, full.subject, full.colour), text
        assert said.count in (full.count, None if full.count != 1 else 1), text
        for name in ("size", "position", "background"):
            assert getattr(said, name) in (None, getattr(full, name)), text
        assert all(word in " ".join(DISTRACTOR_WORDS).split() for word in unknown), (text, unknown)
        families.add(phrasing_family(text))
    assert families == {"free"} or families == {"free", "template"}
    texts = " ".join(r["caption"] for r in records)
    for phrase in ("backdrop", "wall", "with a", "two", "three"):
        assert phrase in texts, phrase  # the variety is there
    assert sum(r["spec"]["count"] > 1 for r in records) >= 20


def test_free_captions_write_colours_in_every_spelling_the_parser_reads(tmp_path) -> None:
    from sdlab.tiny.datasets.colours import COLOUR_SYNONYMS

    plain = build.build_dataset(tmp_path / "plain", 40, seed=8, free_prob=1.0)
    again = build.build_dataset(tmp_path / "again", 40, seed=8, free_prob=1.0, synonym_prob=0.0)
    assert [r["caption"] for r in plain] == [r["caption"] for r in again]   # 0: the seed's captions unchanged
    records = build.build_dataset(tmp_path / "spelt", 400, seed=8, free_prob=1.0, synonym_prob=1.0)
    words = set()
    for record in records:
        full, text = SceneSpec(**record["spec"]), record["caption"]
        said, _ = read_prompt(text)
        assert (said.colour, said.background) == (full.colour, full.background), text
        words |= {word for word in COLOUR_SYNONYMS if f" {word} " in f" {text.replace(',', ' ')} "}
    assert {"grey", "violet", "navy"} <= words, words


def test_free_captions_call_emoji_by_their_everyday_names_with_alias_prob(tmp_path) -> None:
    def alias_share(records) -> float:
        """The share of emoji with everyday names whose caption does not say the emoji's own name."""
        named = [r for r in records if r["spec"]["kind"] == "emoji" and r["spec"]["subject"] in EMOJI_ALIASES.values()]
        assert len(named) >= 20
        return sum(r["spec"]["subject"] not in r["caption"] for r in named) / len(named)

    default = build.build_dataset(tmp_path / "default", 300, seed=9, emoji_fraction=1.0, free_prob=1.0)
    same = build.build_dataset(tmp_path / "same", 300, seed=9, emoji_fraction=1.0, free_prob=1.0, alias_prob=0.6)
    assert [r["caption"] for r in default] == [r["caption"] for r in same]    # the default: a seed's captions kept
    always = build.build_dataset(tmp_path / "always", 300, seed=9, emoji_fraction=1.0, free_prob=1.0, alias_prob=1.0)
    never = build.build_dataset(tmp_path / "never", 300, seed=9, emoji_fraction=1.0, free_prob=1.0, alias_prob=0.0)
    assert alias_share(always) == 1.0 and alias_share(never) == 0.0 and 0.3 < alias_share(default) < 0.9
    for record in always:
        assert read_prompt(record["caption"])[0].subject == record["spec"]["subject"], record["caption"]


def test_plural_scenes_draw_that_many_small_copies() -> None:
    from sdlab.tiny.evaluation.scoring import score_image

    for count in (2, 3):
        for index, kind in enumerate(("shape", "emoji")):
            spec = (SceneSpec("shape", "star", "red", "small", None, "white", count) if kind == "shape"
                    else SceneSpec("emoji", "red apple", None, "small", None, "light blue", count))
            image = render_scene(spec, np.random.default_rng([count, index]))
            result = score_image(image, spec)
            assert result["measured"]["count"] == count, (spec, result["measured"])
            assert all(result["correct"].values()), result
    with pytest.raises(ValueError, match="several copies"):
        SceneSpec("emoji", "red apple", None, "large", None, "white", 2)


def test_read_prompt_ignores_words_it_does_not_know() -> None:
    spec, unknown = read_prompt("a cute red apple on a blue background, high quality, 4k")
    assert spec == SceneSpec("emoji", "red apple", background="blue")
    assert unknown == ["cute", "high", "quality", "k"]
    with pytest.raises(ValueError, match="cute"):
        parse_caption("a cute red apple")


def test_phrasing_family_tells_templates_from_free_prompts() -> None:
    assert phrasing_family("a small red apple in the top left on a white background") == "template"
    assert phrasing_family("a large blue star, bottom right, white background") == "template"
    assert phrasing_family("an apple on blue") == "free"
    assert phrasing_family("a red apple with a white background") == "free"


def test_every_named_colour_is_a_background_and_aliases_name_trained_emoji() -> None:
    assert set(SUBJECT_COLOURS) <= set(BACKGROUND_COLOURS)
    assert set(EMOJI_ALIASES.values()) <= set(EMOJI_NAMES)
    assert not set(EMOJI_ALIASES) & set(EMOJI_NAMES)
    assert EMOJI_ALIASES["apple"] == "red apple" and EMOJI_ALIASES["cat"] == "cat face"
