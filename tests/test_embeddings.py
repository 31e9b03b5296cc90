"""Textual-inversion embeddings (`sdlab.checkpoints.embeddings`) against diffusers' `load_textual_inversion`.

The same embedding file (each shape users have) is loaded into sdlab's reduced-width SD1 bundle and into a
diffusers StableDiffusionPipeline holding the same text-encoder weights (see tests/test_conditioning.py);
the prompt conditioning must agree to 1e-5. SDXL files route `clip_l` / `clip_g` to the tower of that width.
"""

from __future__ import annotations

import logging
import pickle
import re

import numpy as np

import pytest
import torch
from bundle_fixtures import tiny_bundle
from safetensors.torch import save_file
from test_conditioning import _hf_twin, _max_err, _sd_pipeline, hf_tokenizers  # noqa: F401 (fixture)

from sdlab.checkpoints.embeddings import (
    EmbeddingError,
    install_embeddings,
    load_embedding,
    scan_embeddings_dir,
)
from sdlab.checkpoints.errors import CheckpointError
from sdlab.models.tokenizer import default_tokenizer
from sdlab.pipeline.conditioning import make_cond

TOL = 1e-5


def _vectors(n: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed)) * 0.1


def _a1111_pt(path, vectors):
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": path.stem, "step": 500,
                "sd_checkpoint": "abcd", "sd_checkpoint_name": "model"}, path)
    return path


@pytest.fixture(scope="module")
def sd1():
    return tiny_bundle("sd1", seed=3)


@pytest.fixture(scope="module")
def sd1_pair(sd1, hf_tokenizers):
    """sdlab's bundle and a diffusers pipeline with the same text tower."""
    (encoder,) = sd1.text_encoders
    return sd1, _sd_pipeline(_hf_twin(encoder), hf_tokenizers[0])


@pytest.mark.parametrize("shape", ["a1111_pt", "kohya_safetensors", "diffusers_bin"])
@torch.no_grad()
def test_sd1_embedding_matches_diffusers(sd1_pair, tmp_path, shape):
    bundle, pipe = sd1_pair
    width = bundle.text_encoders[0].config.width
    n = 1 if shape == "diffusers_bin" else 3
    vectors = _vectors(n, width, seed=5)
    if shape == "a1111_pt":
        path = _a1111_pt(tmp_path / "mystyle.pt", vectors)
    elif shape == "kohya_safetensors":
        path = tmp_path / "mystyle.safetensors"
        save_file({"emb_params": vectors}, str(path))
    else:
        path = tmp_path / "mystyle.bin"
        torch.save({"<mystyle>": vectors[0]}, path)
    embedded = install_embeddings(bundle, [load_embedding(path)])
    pipe.load_textual_inversion(str(path), token="mystyle")
    try:
        prompt, negative = "a mystyle photo of a cat", "blurry, mystyle"
        cond, uncond = make_cond(embedded.text_encoders, embedded.family, prompt, negative)
        ref, ref_neg = pipe.encode_prompt(prompt, "cpu", 1, True, negative)
        assert _max_err(cond["context"], ref) < TOL
        assert _max_err(uncond["context"], ref_neg) < TOL
        plain, _ = make_cond(bundle.text_encoders, bundle.family, prompt, negative)
        assert _max_err(cond["context"], plain["context"]) > 1e-3        # the vectors did change the context
    finally:
        pipe.unload_textual_inversion()


@torch.no_grad()
def test_comfyui_syntax_and_weights_read_the_same_vectors(sd1, tmp_path):
    embedded = install_embeddings(sd1, [load_embedding(_a1111_pt(tmp_path / "mystyle.pt", _vectors(2, 64, 1)))])
    encoders, family = embedded.text_encoders, embedded.family
    a1111, _ = make_cond(encoders, family, "a mystyle photo", "")
    comfy, _ = make_cond(encoders, family, "a embedding:mystyle.pt photo", "")
    assert _max_err(a1111["context"], comfy["context"]) == 0
    weighted, _ = make_cond(encoders, family, "a (mystyle:1.3) photo", "")
    assert _max_err(a1111["context"], weighted["context"]) > 1e-4     # emphasis applies to embedding tokens


@torch.no_grad()
def test_comfyui_syntax_names_subfolders_and_drops_unknown_names(sd1, tmp_path, caplog):
    (tmp_path / "styles").mkdir()
    save_file({"emb_params": _vectors(2, 64, 1)}, str(tmp_path / "styles" / "ink.safetensors"))
    embedded = install_embeddings(sd1, scan_embeddings_dir(tmp_path, sd1).loaded)

    def context(bundle, prompt):
        return make_cond(bundle.text_encoders, bundle.family, prompt, "")[0]["context"]

    a1111 = context(embedded, "a ink house")
    for written in ("embedding:ink", "embedding:styles/ink", "embedding:Styles/ink.safetensors"):
        assert _max_err(context(embedded, f"a {written} house"), a1111) == 0, written
    plain = context(embedded, "a house")
    for missing in ("embedding:nothere", "embedding:other/ink", "embedding:yles/ink"):   # ComfyUI drops them
        assert _max_err(context(embedded, f"a {missing} house"), plain) == 0, missing
        assert embedded.text_encoders[0].tokenizer.unloaded_names(f"a {missing} house") == [missing[10:]]
    assert _max_err(context(sd1, "a embedding:ink house"), context(sd1, "a house")) == 0    # none loaded


def _comfyui_token_weights(text: str, weight: float = 1.0) -> list[tuple[str, float]]:
    """ComfyUI's emphasis reading (comfy/sd1_clip.py `token_weights` over `parse_parentheses`), transcribed:
    a top-level ``(...)`` whose text ends in ``:NUMBER`` is that text at that weight (else at 1.1 times the
    weight), everything else is text at the weight outside."""
    items, item, depth = [], "", 0
    for char in text:
        if char == "(":
            if depth == 0:
                if item:
                    items.append(item)
                item = "("
            else:
                item += char
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                items.append(item + ")")
                item = ""
            else:
                item += char
        else:
            item += char
    if item:
        items.append(item)
    out = []
    for x in items:
        if len(x) >= 2 and x[0] == "(" and x[-1] == ")":
            x, inner = x[1:-1], weight * 1.1
            colon = x.rfind(":")
            if colon > 0:
                try:
                    inner, x = float(x[colon + 1:]), x[:colon]
                except ValueError:
                    pass
            out += _comfyui_token_weights(x, inner)
        else:
            out.append((x, weight))
    return out


@torch.no_grad()
def test_a_weight_after_an_embedding_name_as_in_comfyui(sd1, tmp_path, caplog):
    """ComfyUI reads ``(embedding:ink:1.2)`` as the word embedding:ink at weight 1.2 (`token_weights`), and the
    bare word ``embedding:ink:1.2`` as the name "ink:1.2", which names no file: the whole word is left out with
    a warning (`_try_get_embedding`), not ink followed by the text ":1.2". sdlab reads both the same way."""
    from sdlab.pipeline.plan import warn_of_unloaded_embeddings
    from sdlab.pipeline.prompt_syntax import parse_weighted
    from sdlab.pipeline.request import GenerationRequest

    assert _comfyui_token_weights("a (embedding:ink:1.2) house") == [("a ", 1.0), ("embedding:ink", 1.2), (" house", 1.0)]
    assert parse_weighted("a (embedding:ink:1.2) house") == _comfyui_token_weights("a (embedding:ink:1.2) house")
    assert _comfyui_token_weights("a embedding:ink:1.2 house") == [("a embedding:ink:1.2 house", 1.0)]
    embedded = install_embeddings(sd1, [load_embedding(_a1111_pt(tmp_path / "ink.pt", _vectors(2, 64, 1)))])

    def context(prompt):
        return make_cond(embedded.text_encoders, embedded.family, prompt, "")[0]["context"]

    assert _max_err(context("a (embedding:ink:1.2) house"), context("a (ink:1.2) house")) == 0
    assert _max_err(context("a embedding:ink:1.2 house"), context("a house")) == 0
    with caplog.at_level(logging.WARNING):
        warn_of_unloaded_embeddings(embedded, GenerationRequest("a embedding:ink:1.2 house", steps=2, sampler="Euler"))
    assert [r.getMessage() for r in caplog.records] == ["embedding:ink:1.2 is not loaded; it is left out of the prompt"]


def _comfyui_ids(text: str, text_ids, embeddings: dict[str, list[int]]) -> list[int]:
    """ComfyUI's reading of one text (comfy/sd1_clip.py, `SDTokenizer.tokenize_with_weights` and
    `_try_get_embedding`, transcribed for one weight): the text split before each " embedding:" / "\nembedding:";
    a word that starts with "embedding:" names the embedding its first whitespace-separated token names
    (`str.split()`), the rest of it text (trailing commas are text when the name with them names none); one that
    names none is dropped, with a warning; every other word is text, `text_ids(word)`. A bare "embedding:"
    (ComfyUI's IndexError) names nothing here, as in sdlab."""
    split = re.split(" {0}|\n{0}".format("embedding:"), text)
    ids: list[int] = []
    for word in [w for w in [split[0], *("embedding:" + part for part in split[1:])] if w != ""]:
        if word.startswith("embedding:"):
            split_embed = word[len("embedding:"):].strip("\n").split() or [""]
            name, leftover = split_embed[0], " ".join(split_embed[1:])
            embed = embeddings.get(name)
            if embed is None:
                stripped = name.strip(",")
                if len(stripped) < len(name):
                    embed, leftover = embeddings.get(stripped), "{} {}".format(name[len(stripped):], leftover)
            ids += embed or []
            if leftover == "":
                continue
            word = leftover
        ids += text_ids(word)
    return ids


COMFYUI_WORDS = [
    "a photo, myembedding:ink", "EMBEDDING:ink landscape", "Embedding:ink", "text_embedding:ink diagram",
    "a,embedding:ink", "tab\tembedding:ink", "(embedding:ink", "embedding:ink, a cat", "a  embedding:ink,, b",
    "line\nembedding:ink", "embedding:ink embedding:ink", "embedding:nothere cat", "a embedding:nothere, b",
    "embedding:nothere,", "1girl embedding:ink.\nembedding:", "embedding:Ink embedding:ink",
    "a embedding:ink:1.2 cat", "embedding:ink,bar", "embedding:ink), b", "embedding:ink) b", "embedding:ink|x",
    "embedding:ink[b]", "a embedding:ink<x> c", "embedding:,ink,", "embedding:ink:", "embedding:ink\tb c",
    "a embedding:ink\r\nred", "a embedding:ink\u3000red", "a embedding:ink\x1fred", "a embedding:ink,\tred",
    "a embedding: ink red", "a embedding:\tink", "a embedding:\nink b", "x embedding:\u2003nothere red",
]


def test_embedding_syntax_is_read_where_comfyui_reads_it(hf_tokenizers):
    """Only a word that begins with lower-case `embedding:` names an embedding; mid-word or in another case it
    is text (Hugging Face's tokens, as ComfyUI tokenizes a word; with an embedding loaded, its name's tokens
    in text read as its vectors too, A1111's rule), loaded or not; a name that names no loaded embedding is
    left out. `embedding:Ink` is `ink` in both: sdlab looks names up in any case, and ComfyUI's file lookup
    finds ink.pt under that name on a case-insensitive disk; the test counts it as found."""
    ink = (49408, 49409)
    loaded = default_tokenizer().with_added_words({"ink": ink})

    def hf_ids(word: str) -> list[int]:
        return hf_tokenizers[0](word)["input_ids"][1:-1]

    def a1111_ids(word: str) -> list[int]:
        return [t for unit in loaded._substitute(hf_ids(word)) for t in unit]

    for text in COMFYUI_WORDS:
        assert loaded.encode(text) == _comfyui_ids(text, a1111_ids, {"ink": list(ink), "Ink": list(ink)}), text
        assert default_tokenizer().encode(text) == _comfyui_ids(text, hf_ids, {}), text
    assert default_tokenizer().unloaded_names("a, myembedding:x EMBEDDING:y,embedding:z embedding:w") == ["w"]


def test_only_runs_that_begin_a_comfyui_word_are_warned_of(caplog):
    """The prompt's warning reads the texts the tokenizer reads: an emphasis run begins a word
    ("(embedding:gone:1.2)", as ComfyUI's own brackets begin one), as do BREAK and each AND part; text glued
    to the name or in upper case is no embedding and no warning."""
    from sdlab.pipeline.plan import warn_of_unloaded_embeddings
    from sdlab.pipeline.request import GenerationRequest

    request = GenerationRequest("a (embedding:gone:1.2), myembedding:kept EMBEDDING:kept BREAK embedding:brk AND "
                                "[cat:dog:3] embedding:part :0.5", negative_prompt="x,embedding:kept embedding:neg",
                                steps=6, sampler="Euler")
    bundle = tiny_bundle("sd1")
    with caplog.at_level(logging.WARNING):
        warn_of_unloaded_embeddings(bundle, request)
    warned = [r.getMessage().split()[0] for r in caplog.records]
    assert warned == ["embedding:gone", "embedding:brk", "embedding:part", "embedding:neg"]


def test_an_edit_reached_in_a_second_order_samplers_calls_is_warned_of(caplog):
    """The warning reads the texts on the drawing's schedule: Heun's 10 steps are 20 model calls (A1111's
    step_multiplier), so an edit at step 15 is drawn and its embedding is warned of; Euler never reaches it."""
    from sdlab.pipeline.plan import warn_of_unloaded_embeddings
    from sdlab.pipeline.request import GenerationRequest

    bundle = tiny_bundle("sd1")
    for sampler, warned in (("Euler", []), ("Heun", ["embedding:late"])):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            request = GenerationRequest("[a cat:(embedding:late):15]", steps=10, sampler=sampler)
            warn_of_unloaded_embeddings(bundle, request)
        assert [r.getMessage().split()[0] for r in caplog.records] == warned, sampler


def test_training_captions_read_the_syntax_as_prompts_do_and_warn(caplog, tmp_path):
    """Captions (`encode_captions` calls the tokenizer on each) keep "text_embedding:v2" as text; a caption's
    `embedding:NAME` that names nothing loaded is left out with one warning for the run."""
    from types import SimpleNamespace

    from sdlab.train.cli import _warn_of_unloaded_embeddings
    from sdlab.train.data import ImageSample

    tokenizer = default_tokenizer()
    spaced = tokenizer.pad(tokenizer.encode("a diagram of text _ embedding : v 2"))
    assert tokenizer(["a diagram of text_embedding:v2"])[0].tolist() == spaced
    captions = ["a diagram of text_embedding:v2", "embedding:gone cat", "dog embedding:gone", "EMBEDDING:x"]
    task = SimpleNamespace(bundle=SimpleNamespace(text_encoders=[SimpleNamespace(tokenizer=tokenizer)]))
    with caplog.at_level(logging.WARNING):
        _warn_of_unloaded_embeddings(task, [ImageSample(tmp_path / f"{i}.png", c) for i, c in enumerate(captions)])
    assert [r.getMessage() for r in caplog.records] == [
        "embedding:gone in the captions is not loaded; it is left out of them"]


def test_an_unloaded_embedding_is_warned_of_once_per_run(caplog):
    """However often the prompts' text is encoded (each text encoder, prompt-editing step, AND part, the
    negative prompt), a run warns once of each name that names no loaded embedding."""
    from sdlab.pipeline.generate import generate
    from sdlab.pipeline.request import GenerationRequest

    request = GenerationRequest("a embedding:nothere [cat:dog:0.5] AND embedding:nothere:0.5 embedding:gone",
                                negative_prompt="embedding:gone", steps=2, seed=1, width=16, height=16)
    with caplog.at_level(logging.WARNING):
        generate(tiny_bundle("sdxl"), request)
    assert caplog.text.count("embedding:nothere is not loaded") == 1
    assert caplog.text.count("embedding:gone is not loaded") == 1


def test_the_shared_tokenizer_and_other_bundles_are_unchanged(sd1, tmp_path):
    before = default_tokenizer().encode("a mystyle photo")
    embedded = install_embeddings(sd1, [load_embedding(_a1111_pt(tmp_path / "mystyle.pt", _vectors(2, 64, 1)))])
    assert default_tokenizer().encode("a mystyle photo") == before
    assert sd1.text_encoders[0].tokenizer.encode("a mystyle photo") == before
    ids = embedded.text_encoders[0].tokenizer.encode("a mystyle photo")
    assert len(ids) == 4 and ids[1] >= 49408 and ids[2] == ids[1] + 1
    again = install_embeddings(embedded, [load_embedding(tmp_path / "mystyle.pt")])
    assert again.text_encoders[0].tokenizer.encode("a mystyle photo") == ids          # no new rows


def test_sdxl_file_routes_each_tower_its_width(tmp_path):
    bundle = tiny_bundle("sdxl", seed=4)
    widths = [te.config.width for te in bundle.text_encoders]
    clip_l, clip_g = _vectors(2, widths[0], 1), _vectors(2, widths[1], 2)
    path = tmp_path / "xlstyle.safetensors"
    save_file({"clip_g": clip_g, "clip_l": clip_l}, str(path))
    embedded = install_embeddings(bundle, [load_embedding(path)])
    for encoder, expected in zip(embedded.text_encoders, (clip_l, clip_g)):
        ids = encoder.tokenizer("xlstyle")                                        # (1, 77)
        rows = encoder.model.embeddings.token_vectors(ids)[0, 1:3]               # (2, width)
        assert torch.equal(rows, expected)
    cond, _ = make_cond(embedded.text_encoders, embedded.family, "an xlstyle house", "", width=64, height=64)
    assert torch.isfinite(cond["context"]).all() and torch.isfinite(cond["y"]).all()


def test_sdxl_file_gives_the_refiner_its_clip_g_vectors(tmp_path, capsys):
    from bundle_fixtures import write_original
    from cli_helpers import run

    import sdlab

    base, refiner = tmp_path / "base.safetensors", tmp_path / "refiner.safetensors"
    write_original(tiny_bundle("sdxl", seed=4), base, junk=False)
    write_original(tiny_bundle("sdxl-refiner", seed=5), refiner, junk=False)
    folder = tmp_path / "embeddings"
    folder.mkdir()
    clip_l, clip_g = _vectors(2, 64, 1), _vectors(2, 128, 2)
    save_file({"clip_l": clip_l, "clip_g": clip_g}, str(folder / "xlstyle.safetensors"))

    pipe = sdlab.load(base, refiner=refiner, embeddings=[folder])
    (encoder,) = pipe.refiner.text_encoders                                       # bigG only
    rows = encoder.model.embeddings.token_vectors(encoder.tokenizer("xlstyle"))[0, 1:3]   # (2, 128)
    assert torch.equal(rows, clip_g)
    code, _, err = run(["txt2img", "an xlstyle house", "--model", str(base), "--refiner", str(refiner),
                        "--embeddings-dir", str(folder), "--steps", "2", "--width", "32", "--height", "32",
                        "--out", str(tmp_path / "x.png"), "--no-progress"], capsys)
    assert code == 0, err


def test_wrong_model_and_bad_files_are_clear_errors(sd1, tmp_path):
    sdxl_file = tmp_path / "xl.safetensors"
    save_file({"clip_l": _vectors(1, 64, 1), "clip_g": _vectors(1, 128, 2)}, str(sdxl_file))
    with pytest.raises(EmbeddingError, match="64 \\+ 128-wide .* this model's are 64 wide"):
        install_embeddings(sd1, [load_embedding(sdxl_file)])
    wide = tmp_path / "wide.safetensors"
    save_file({"emb_params": _vectors(1, 768, 1)}, str(wide))
    with pytest.raises(EmbeddingError, match="768-wide"):
        install_embeddings(sd1, [load_embedding(wide)])
    many = tmp_path / "many.safetensors"
    save_file({"a": _vectors(1, 64, 1), "b": _vectors(1, 64, 1)}, str(many))
    with pytest.raises(EmbeddingError, match="not a textual-inversion embedding"):
        load_embedding(many)
    nan = tmp_path / "nan.safetensors"
    save_file({"emb_params": torch.full((1, 64), float("nan"))}, str(nan))
    with pytest.raises(EmbeddingError, match="NaN"):
        load_embedding(nan)
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(CheckpointError, match="refused to unpickle|not a readable"):
        load_embedding(evil)
    assert not (tmp_path / "boom").exists()


class _Boom:
    def __reduce__(self):
        return (open, ("boom", "w"))


def test_folder_loads_the_fitting_files_and_skips_the_rest(sd1, tmp_path):
    _a1111_pt(tmp_path / "good.pt", _vectors(1, 64, 1))
    (tmp_path / "sub").mkdir()
    save_file({"emb_params": _vectors(2, 64, 2)}, str(tmp_path / "sub" / "other.safetensors"))
    save_file({"emb_params": _vectors(1, 768, 3)}, str(tmp_path / "sd15.safetensors"))
    (tmp_path / "notes.txt").write_text("not an embedding")
    (tmp_path / "broken.pt").write_bytes(b"not a pickle")
    names = [e.name for e in scan_embeddings_dir(tmp_path, sd1).loaded]
    assert names == ["good", "other"]
    found = scan_embeddings_dir(tmp_path, sd1)                     # A1111's loaded / skipped
    assert [e.name for e in found.loaded] == names and [e.name for e in found.skipped] == ["sd15"]
    good = found.loaded[0]                                         # the .pt's own fields
    assert (good.step, good.sd_checkpoint, good.sd_checkpoint_name) == (500, "abcd", "model")
    assert found.loaded[1].step is None and found.skipped[0].widths() == (768,)


# --- the CLI and the Python API ----------------------------------------------------------------------------


def test_cli_uses_embeddings_dir_and_records_ti_hashes(tmp_path, capsys):
    from cli_helpers import pixels, run

    import sdlab
    from sdlab.pipeline.png_info import embedding_hash, parse_parameters, read_parameters

    shipped = sdlab.load()
    width = shipped.bundle.text_encoders[0].config.width
    folder = tmp_path / "embeddings"
    folder.mkdir()
    path = _a1111_pt(folder / "zqstyle.pt", _vectors(2, width, 7) * 5)
    save_file({"emb_params": _vectors(1, width + 64, 1)}, str(folder / "other-model.safetensors"))  # skipped
    prompt = "a zqstyle apple on a blue background"
    common = ["--steps", "3", "--seed", "4", "--no-progress"]
    code, _, err = run(["txt2img", prompt, "--embeddings-dir", str(folder), "--out", str(tmp_path / "ti.png"), *common], capsys)
    assert code == 0, err
    code, _, err = run(["txt2img", prompt, "--out", str(tmp_path / "plain.png"), *common], capsys)
    assert code == 0, err
    assert np.abs(pixels(tmp_path / "ti.png") - pixels(tmp_path / "plain.png")).max() > 0

    recorded = parse_parameters(read_parameters(tmp_path / "ti.png"))
    assert recorded["TI hashes"] == f"zqstyle: {embedding_hash(path)}"
    assert "TI hashes" not in parse_parameters(read_parameters(tmp_path / "plain.png"))

    pipe = sdlab.load(embeddings=[folder])
    assert [e.name for e in pipe.embeddings] == ["zqstyle"]
    image = pipe.txt2img(prompt, steps=3, seed=4).images[0]
    assert np.array_equal(np.asarray(image.convert("RGB"), dtype=np.int16), pixels(tmp_path / "ti.png"))


def test_ti_hashes_list_the_embeddings_the_encoded_text_used(tmp_path, capsys):
    from bundle_fixtures import write_original
    from cli_helpers import run

    from sdlab.pipeline.png_info import embedding_hash, parse_parameters, read_parameters

    model = write_original(tiny_bundle("sd1", seed=3), tmp_path / "tiny.safetensors", junk=False)
    folder = tmp_path / "embeddings"
    (folder / "v2").mkdir(parents=True)
    _a1111_pt(folder / "detail.pt", _vectors(2, 64, 1))
    save_file({"emb_params": _vectors(1, 64, 2)}, str(folder / "ink.safetensors"))
    save_file({"emb_params": _vectors(1, 64, 3)}, str(folder / "v2" / "ink.safetensors"))   # the one used
    lora = tmp_path / "loras" / "detail.safetensors"                                        # a LoRA named as an embedding
    lora.parent.mkdir()
    key = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    save_file({f"{key}.lora_down.weight": torch.zeros(4, 64), f"{key}.lora_up.weight": torch.zeros(64, 4)}, str(lora))

    out = tmp_path / "x.png"
    code, _, err = run(["txt2img", "a house, ink <lora:detail:0.5>", "--model", str(model), "--embeddings-dir",
                        str(folder), "--lora-dir", str(lora.parent), "--steps", "1", "--width", "32", "--height", "32",
                        "--out", str(out), "--no-progress"], capsys)
    assert code == 0, err
    assert parse_parameters(read_parameters(out))["TI hashes"] == f"ink: {embedding_hash(folder / 'v2' / 'ink.safetensors')}"
    assert "two embeddings are named ink" in err and str(folder / "ink.safetensors") in err   # the one left out


def test_cli_refuses_an_embedding_file_for_another_model(tmp_path, capsys):
    from cli_helpers import run

    wrong = tmp_path / "wrong.safetensors"
    save_file({"emb_params": _vectors(1, 1024, 1)}, str(wrong))
    for source, message in [(wrong, "1024-wide text encoder"), (tmp_path / "missing", "no such file")]:
        code, _, err = run(["txt2img", "a wrong apple", "--embeddings-dir", str(source),
                            "--out", str(tmp_path / "x.png"), "--steps", "2", "--no-progress"], capsys)
        assert code == 2 and message in err and err.count("\n") == 1
        assert not (tmp_path / "x.png").exists()
