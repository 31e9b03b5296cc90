"""SDXL's second prompts, diffusers' `prompt_2` / `negative_prompt_2`: the first text encoder (CLIP-L) reads the
prompt, the second (OpenCLIP bigG, whose pooled output starts the added vector) reads prompt_2, each defaulting to
the prompt / the negative; the pictures equal StableDiffusionXLPipeline's with the same texts."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch
from bundle_fixtures import as_released, tiny_bundle, write_diffusers_folder
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
from picture_parity import CFG, MAX_PIXEL_DIFF, PROMPT, SEED, SIZE, max_pixel_diff

import sdlab
from sdlab.pipeline.infotext import from_parameters, to_parameters
from sdlab.pipeline.request import GenerationRequest, RequestError
from server_fixtures import sdlab_server  # noqa: F401  (a session fixture)

PROMPT_2 = "an oil painting of a lighthouse at night, dramatic clouds"
NEGATIVE = "blurry, low quality"
NEGATIVE_2 = "cartoon, watermark, text"
STEPS, BATCH = 4, 2

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    folder = as_released(write_diffusers_folder(tiny_bundle("sdxl", seed=11), tmp_path_factory.mktemp("sdxl") / "p"),
                         SIZE // 2)
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    return sdlab.load(folder), pipe


@pytest.mark.parametrize(("prompt_2", "negative_2"), [(PROMPT_2, NEGATIVE_2), (PROMPT_2, ""), ("", NEGATIVE_2)])
def test_second_prompts_draw_diffusers_picture(sdxl, prompt_2, negative_2):
    ours, pipe = sdxl
    reference = pipe(PROMPT, prompt_2=prompt_2 or None, negative_prompt=NEGATIVE, negative_prompt_2=negative_2 or None,
                     num_images_per_prompt=BATCH, num_inference_steps=STEPS, guidance_scale=CFG, width=SIZE,
                     height=SIZE, generator=[torch.Generator("cpu").manual_seed(SEED + i) for i in range(BATCH)],
                     output_type="np").images
    request = GenerationRequest(PROMPT, NEGATIVE, prompt_2=prompt_2, negative_prompt_2=negative_2, steps=STEPS,
                                cfg_scale=CFG, seed=SEED, width=SIZE, height=SIZE, batch_size=BATCH, sampler="Euler",
                                schedule="leading", init_noise="vp")
    result = ours.run(request)
    assert max_pixel_diff(result.images, reference) <= MAX_PIXEL_DIFF
    plain = ours.run(GenerationRequest(PROMPT, NEGATIVE, steps=STEPS, cfg_scale=CFG, seed=SEED, width=SIZE,
                                       height=SIZE, batch_size=BATCH, sampler="Euler", schedule="leading",
                                       init_noise="vp"))
    assert max_pixel_diff(result.images, plain.images) > MAX_PIXEL_DIFF
    parameters = {key: value for key, value in to_parameters(result.request).items() if value is not None}
    read = from_parameters(parameters)
    assert (read.get("prompt_2", ""), read.get("negative_prompt_2", "")) == (prompt_2, negative_2)


@pytest.mark.parametrize(("chunks", "chunks_2"), [([PROMPT], ["a lighthouse", "a cliff at night", "stormy sea"]),
                                                 (["a lighthouse", "a cliff at night"], [PROMPT])])
def test_a_longer_prompt_pads_the_other_encoder_with_empty_chunks(sdxl, chunks, chunks_2):
    """Where one side has more 75-token chunks (here split by BREAK), the other encoder is padded with its
    chunks of "" (ComfyUI's CLIPTextEncodeSDXL): the reference is diffusers' pipeline drawing the context made of
    each chunk pair as its `encode_prompt` encodes it (CLIP-L's text, bigG's text; " " for a chunk of "",
    which prompt_2="" would replace by the prompt), the chunks side by side and the first chunk's pooled vector
    (A1111's and ComfyUI's). CFG 1 draws the prompt alone, as diffusers does there."""
    from sdlab.pipeline.conditioning import make_cond_schedule

    ours, pipe = sdxl
    count = max(len(chunks), len(chunks_2))
    pairs = [(texts + [" "] * (count - len(texts))) for texts in (chunks, chunks_2)]
    encoded = [pipe.encode_prompt(text, prompt_2=text_2, do_classifier_free_guidance=False)
               for text, text_2 in zip(*pairs)]
    context = torch.cat([embeds for embeds, _, _, _ in encoded], dim=1)
    reference = pipe(prompt_embeds=context, pooled_prompt_embeds=encoded[0][2], guidance_scale=1.0,
                     num_inference_steps=STEPS, width=SIZE, height=SIZE,
                     generator=torch.Generator("cpu").manual_seed(SEED), output_type="np").images
    text, text_2 = " BREAK ".join(chunks), " BREAK ".join(chunks_2)
    bundle = ours.bundle
    cond = make_cond_schedule(bundle.text_encoders, bundle.family, text, steps=STEPS, guidance=False,
                              prompt_2=text_2, width=SIZE, height=SIZE)[0][1]
    assert context.shape[1] == 77 * count and (cond["context"] - context).abs().max() < 1e-4
    request = GenerationRequest(text, prompt_2=text_2, steps=STEPS, cfg_scale=1.0, seed=SEED, width=SIZE, height=SIZE,
                                sampler="Euler", schedule="leading", init_noise="vp")
    assert max_pixel_diff(ours.run(request).images, reference) <= MAX_PIXEL_DIFF


def test_a_one_encoder_model_refuses_them(tmp_path_factory):
    ours = sdlab.load(write_diffusers_folder(tiny_bundle("sd1", seed=1), tmp_path_factory.mktemp("sd1") / "p"))
    with pytest.raises(RequestError, match="prompt_2 is the second text encoder's"):
        ours.resolve(GenerationRequest("a cat", prompt_2="a dog"))


def test_lora_tags_belong_in_the_prompt(sdxl):
    with pytest.raises(RequestError, match="negative_prompt_2 holds a <lora"):
        sdxl[0].resolve(GenerationRequest("a cat", negative_prompt_2="ugly <lora:style:1>"))



@pytest.mark.parametrize("name", ["prompt_2", "negative_prompt_2"])
def test_second_prompts_are_checked_when_resolved_as_the_prompt(sdxl, name, caplog):
    """A second text past the chunk limit is refused when the request is resolved, not when it is drawn, and the
    error names its field; an `embedding:NAME` it holds that names nothing loaded is warned of, as in the prompt."""
    long = " BREAK ".join(["a lighthouse"] * 40)                                     # 40 chunks
    with pytest.raises(RequestError, match=f"^{name}: prompt 'a lighthouse BREAK .*more than 32 chunks"):
        sdxl[0].resolve(GenerationRequest("a cat", "blurry", steps=2, **{name: long}))
    with caplog.at_level(logging.WARNING):
        sdxl[0].resolve(GenerationRequest("a cat", "blurry", steps=2, **{name: "a embedding:nosuch cat"}))
    assert "embedding:nosuch is not loaded" in caplog.text


def test_and_or_a_weight_in_prompt_2_is_refused(sdxl):
    """Composable diffusion splits the prompt alone (each part's bigG reads prompt_2 whole), so an AND or a trailing
    :WEIGHT in prompt_2 would be encoded as words: a RequestError that names what A1111's split (re_AND, re_weight)
    read, where it splits; text it leaves whole passes. The negative's AND is text in A1111 too."""
    refused = {"a red apple AND a blue sky :0.5": "holds AND", "a red apple  AND": "holds AND",
               "a red apple :2": "ends in ':2'", "a red apple :1": "ends in ':1'", "ratio 16:9": "ends in ':9'",
               "at 12 : 30.5  ": "ends in ': 30.5'"}
    for prompt_2, read in refused.items():
        with pytest.raises(RequestError, match=f"^prompt_2 {read}"):
            sdxl[0].resolve(GenerationRequest("a red apple AND a blue sky", steps=2, prompt_2=prompt_2))
    for prompt_2 in ("a red apple  ", "ratio 16:9,", "ANDROID", "a red apple and a pear", "a:b"):
        sdxl[0].resolve(GenerationRequest("a red apple AND a blue sky", steps=2, prompt_2=prompt_2,
                                          negative_prompt_2="cartoon AND text"))


def test_a_hires_prompt_is_both_encoders_text_as_the_prompt_is(sdxl):
    """A hires prompt replaces the prompt in the second pass, and prompt_2 defaults to the prompt: so a prompt_2 (a
    negative_prompt_2) that is the prompt's (the negative's) own text draws as none, its second pass's bigG and pooled
    vector reading the hires prompt too. Before, they read prompt_2: 81/255 off."""
    import numpy as np

    hires = GenerationRequest("a red apple", "blurry", steps=2, seed=SEED, width=32, height=32, sampler="Euler",
                              hr_scale=2, hr_denoise=0.7, hr_upscaler="Latent", hr_prompt="a green pear",
                              hr_negative_prompt="cartoon")
    unset = np.asarray(sdxl[0].run(hires).images[0], dtype=np.int16)
    both = np.asarray(sdxl[0].run(replace(hires, prompt_2="a red apple", negative_prompt_2="blurry")).images[0],
                      dtype=np.int16)
    assert np.array_equal(both, unset)


def test_a_hires_prompt_that_is_the_prompt_but_for_a_load_loras_tag_keeps_prompt_2(sdxl):
    """A hires prompt that is the prompt once a load-LoRA's tag is left out (`drawn_hires_prompt`) and its
    whitespace is collapsed counts as unset: the second pass keeps prompt_2. Before, the space the tag left made
    it a hires prompt of its own and the second pass's bigG read 'a cat ' instead of prompt_2."""
    from sdlab.pipeline.hires import second_pass_request
    from sdlab.pipeline.infotext import drawn_hires_prompt

    hr_prompt = drawn_hires_prompt("a cat <lora:box:0.6>", {"box": 0.6})
    request = sdxl[0].resolve(GenerationRequest("a cat", prompt_2="watercolour", steps=2, width=32, height=32,
                                                hr_scale=2, hr_prompt=hr_prompt, hr_negative_prompt=" blurry\n",
                                                negative_prompt="blurry", negative_prompt_2="ink")).request
    assert (request.hr_prompt, request.hr_negative_prompt) == ("", "")
    second = second_pass_request(request, 8)
    assert (second.prompt, second.prompt_2, second.negative_prompt_2) == ("a cat", "watercolour", "ink")


def test_a_hires_prompt_replacing_prompt_2_is_logged_once(sdxl, caplog):
    """A hires prompt of its own replaces prompt_2 in the second pass: one warning line says so."""
    hires = GenerationRequest("a red apple", steps=2, seed=SEED, width=32, height=32, sampler="Euler", hr_scale=2,
                              hr_denoise=0.7, hr_upscaler="Latent", hr_prompt="a green pear", prompt_2="watercolour")
    with caplog.at_level(logging.WARNING, logger="sdlab"):
        sdxl[0].run(hires)
    lines = [r.getMessage() for r in caplog.records if "prompt_2" in r.getMessage()]
    assert lines == ["the hires prompt replaces prompt_2 in the second pass (a hires prompt is every text "
                     "encoder's)"], lines
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sdlab"):
        sdxl[0].run(replace(hires, prompt_2=""))
    assert not [r for r in caplog.records if "prompt_2" in r.getMessage()]


def test_the_native_api_draws_them_as_the_python_api(tmp_path):
    """The native API's prompt_2 / negative_prompt_2 on an SDXL model draw the Python API's picture for the same
    request, and the picture records them."""
    import io

    import httpx
    import numpy as np
    from bundle_fixtures import write_original
    from PIL import Image
    from server_fixtures import run_job, start_server

    from sdlab.pipeline.png_info import parse_parameters, read_parameters

    model = tmp_path / "models" / "sdxl.safetensors"
    model.parent.mkdir()
    write_original(tiny_bundle("sdxl", seed=11), model, junk=False)
    body = {"prompt": "a red apple", "negative_prompt": "blurry", "prompt_2": PROMPT_2, "negative_prompt_2": NEGATIVE_2,
            "steps": 2, "width": 32, "height": 32, "seed": 7, "sampler": "Euler"}
    server = start_server(tmp_path / "outputs", "--model", str(model))
    try:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            job = run_job(client, body)
            assert job["status"] == "done", job
            png = client.get(job["images"][0]).content
    finally:
        server.stop()
    expected = sdlab.load(model).run(GenerationRequest(**body)).images[0]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), np.asarray(expected))
    (tmp_path / "drawn.png").write_bytes(png)
    recorded = parse_parameters(read_parameters(tmp_path / "drawn.png"))
    assert (recorded["Prompt 2"], recorded["Negative prompt 2"]) == (PROMPT_2, NEGATIVE_2)


def test_the_native_api_takes_them(sdlab_server):
    """The native API's prompt_2 reaches the request: on the server's one-encoder model it is refused as the job
    is posted with the request's error (before, the job was queued and then failed with it), not a 422 for an
    unknown field."""
    import httpx

    with httpx.Client(base_url=sdlab_server.url, timeout=120) as client:
        body = {"prompt": "a red apple", "steps": 2, "width": 32, "height": 32}
        assert client.post("/api/jobs", json=body).status_code == 202        # the model is loaded
        for name in ("prompt_2", "negative_prompt_2"):
            answer = client.post("/api/jobs", json={**body, name: "a lighthouse"})
            assert answer.status_code == 422, answer.text
            assert f"{name} is the second text encoder's text" in answer.json()["detail"]


def test_a_second_prompt_for_a_model_not_loaded_is_refused_from_its_file(tmp_path):
    """A one-encoder model that is not loaded is read from its file's header (`model_shapes.planned_bundle`), as for
    the clip skip: prompt_2 is a 422 as the job is posted, nothing queued."""
    import httpx
    from bundle_fixtures import write_original
    from server_fixtures import start_server

    models = tmp_path / "models"
    models.mkdir()
    write_original(tiny_bundle("sd1"), models / "loaded.safetensors", junk=False)
    write_original(tiny_bundle("sd1", seed=3), models / "other.safetensors", junk=False)
    server = start_server(tmp_path / "outputs", "--models-dir", str(models),
                          "--model", str(models / "loaded.safetensors"))
    try:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            answer = client.post("/api/jobs", json={"prompt": "a red apple", "prompt_2": "a lighthouse",
                                                    "model": "other", "steps": 2, "width": 32, "height": 32})
            assert answer.status_code == 422, answer.text
            assert "prompt_2 is the second text encoder's text" in answer.json()["detail"]
            assert client.get("/api/jobs").json()["jobs"] == []
    finally:
        server.stop()


def test_the_cli_flags_draw_them_and_the_png_draws_them_again(tmp_path, capsys):
    import numpy as np
    from bundle_fixtures import write_original
    from cli_helpers import pixels, run

    model, flagged, again = tmp_path / "sdxl.safetensors", tmp_path / "flagged.png", tmp_path / "again.png"
    write_original(tiny_bundle("sdxl", seed=11), model, junk=False)
    draw = ["a red apple", "--model", str(model), "--seed", "7", "--steps", "2", "--width", "32", "--height", "32",
            "--negative", "blurry", "--no-progress"]
    assert run(["txt2img", *draw, "--prompt-2", PROMPT_2, "--negative-prompt-2", NEGATIVE_2, "--out", str(flagged)],
               capsys)[0] == 0
    assert run(["txt2img", "--from-png", str(flagged), "--model", str(model), "--no-progress", "--out", str(again)],
               capsys)[0] == 0
    request = GenerationRequest("a red apple", "blurry", prompt_2=PROMPT_2, negative_prompt_2=NEGATIVE_2, seed=7,
                                steps=2, width=32, height=32)
    expected = np.asarray(sdlab.load(model).run(request).images[0], dtype=np.int16)
    assert np.array_equal(pixels(flagged), expected) and np.array_equal(pixels(again), expected)


def test_a_new_prompt_on_the_line_drops_the_pictures_prompt_2(tmp_path, capsys):
    """`--from-png` with another prompt (another --negative) leaves the picture's Prompt 2 (Negative prompt 2) out,
    as the web UI drops it when the prompt is edited: the second encoder reads the new text, not the old picture's
    second prompt under it. The prompt given as recorded, or --prompt-2 on the line, keeps one."""
    import numpy as np
    from bundle_fixtures import write_original
    from cli_helpers import pixels, run

    from sdlab.pipeline.png_info import parse_parameters, read_parameters

    model, flagged = tmp_path / "sdxl.safetensors", tmp_path / "flagged.png"
    write_original(tiny_bundle("sdxl", seed=11), model, junk=False)
    fast = ["--model", str(model), "--seed", "7", "--steps", "2", "--width", "32", "--height", "32", "--no-progress"]
    assert run(["txt2img", "a red apple", *fast, "--negative", "blurry", "--prompt-2", PROMPT_2,
                "--negative-prompt-2", NEGATIVE_2, "--out", str(flagged)], capsys)[0] == 0
    pipe = sdlab.load(model)
    for index, (line, drawn) in enumerate([
        (["a dog"], dict(prompt="a dog", negative_prompt="blurry", negative_prompt_2=NEGATIVE_2)),
        (["a dog", "--negative", "cartoon"], dict(prompt="a dog", negative_prompt="cartoon")),
        (["a dog", "--prompt-2", "a cliff"], dict(prompt="a dog", negative_prompt="blurry", prompt_2="a cliff",
                                                  negative_prompt_2=NEGATIVE_2)),
        (["a red apple", "--negative", "blurry"], dict(prompt="a red apple", negative_prompt="blurry",
                                                       prompt_2=PROMPT_2, negative_prompt_2=NEGATIVE_2)),
    ]):
        out = tmp_path / f"again{index}.png"
        assert run(["txt2img", *line, "--from-png", str(flagged), *fast, "--out", str(out)], capsys)[0] == 0, line
        expected = pipe.run(GenerationRequest(**drawn, seed=7, steps=2, width=32, height=32)).images[0]
        assert np.array_equal(pixels(out), np.asarray(expected, dtype=np.int16)), line
        recorded = from_parameters(parse_parameters(read_parameters(out)))
        assert (recorded.get("prompt_2"), recorded.get("negative_prompt_2")) == (
            drawn.get("prompt_2"), drawn.get("negative_prompt_2")), line


def test_a_grid_takes_them_and_prompt_sr_replaces_in_them(tmp_path, capsys):
    """`sdlab grid` takes --prompt-2 / --negative-prompt-2, and each Prompt S/R cell is the picture txt2img draws
    with the word replaced in every prompt text, the second ones too."""
    import numpy as np
    from bundle_fixtures import write_original
    from cli_helpers import pixels, run

    model, out, cells = tmp_path / "sdxl.safetensors", tmp_path / "grid.png", tmp_path / "cells"
    write_original(tiny_bundle("sdxl", seed=11), model, junk=False)
    fast = ["--model", str(model), "--seed", "7", "--steps", "2", "--width", "32", "--height", "32", "--no-progress"]
    code, _, err = run(["grid", "a red apple", "--x", "prompt_sr=red,green", "--prompt-2", "a red lighthouse",
                        "--negative-prompt-2", "red text", *fast, "--out", str(out), "--keep-cells", str(cells)],
                       capsys)
    assert code == 0, err
    pipe = sdlab.load(model)
    for index, word in enumerate(("red", "green")):
        request = GenerationRequest(f"a {word} apple", prompt_2=f"a {word} lighthouse",
                                    negative_prompt_2=f"{word} text", seed=7, steps=2, width=32, height=32)
        expected = np.asarray(pipe.run(request).images[0], dtype=np.int16)
        assert np.array_equal(pixels(cells / f"{index:03d}-x{index}-y0-z0.png"), expected), word
