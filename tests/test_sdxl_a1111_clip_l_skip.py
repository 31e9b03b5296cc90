"""A1111's Clip skip SDXL option (`sdxl_clip_l_skip`) draws SDXL as A1111 draws it.

Reference, transcribed from AUTOMATIC1111/stable-diffusion-webui modules/sd_hijack_clip.py,
`FrozenCLIPEmbedderForSDXLWithCustomWords.encode_with_transformers` (1.10), for SDXL's CLIP-L (layer "hidden"):

    outputs = self.wrapped.transformer(input_ids=tokens, output_hidden_states=self.wrapped.layer == "hidden")
    if self.wrapped.layer == "last":
        z = outputs.last_hidden_state
    elif opts.sdxl_clip_l_skip is True:
        z = outputs.hidden_states[-opts.CLIP_stop_at_last_layers]
    else:
        z = outputs.hidden_states[self.wrapped.layer_idx]

and its bigG (modules/sd_hijack_open_clip.py `FrozenOpenCLIPEmbedder2WithCustomWords`) at its penultimate layer
whatever the clip skip, the pooled vector from its last. The prompt and the negative are encoded alike. The test
builds those embeddings with transformers' towers of a tiny SDXL diffusers folder (3 layers, so that clip skip 1,
2 and 3 read three different layers) and hands them to diffusers' StableDiffusionXLPipeline; sdlab draws the
same picture within `MAX_PIXEL_DIFF`.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from bundle_fixtures import as_released, randomize_, write_diffusers_folder
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
from picture_parity import CFG, MAX_PIXEL_DIFF, PROMPT, SEED, SIZE, max_pixel_diff, uint8_pictures
from server_fixtures import sdlab_server  # noqa: F401  (a session fixture)

import sdlab
from sdlab.checkpoints import create
from sdlab.families import get_family
from sdlab.pipeline.infotext import from_parameters, to_parameters
from sdlab.pipeline.request import GenerationRequest, RequestError

NEGATIVE = "blurry, low quality"
STEPS = 4

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def sdxl3(tmp_path_factory):
    """A tiny SDXL whose text towers have 3 layers, as sdlab and as diffusers load it."""
    texts = tuple(replace(config, layers=3) for config in create.tiny_text_configs(get_family("sdxl")))
    bundle = create.new_bundle("sdxl", tiny=True, text=texts, seed=11)
    randomize_(bundle.unet, 11)
    randomize_(bundle.vae, 12)
    for i, encoder in enumerate(bundle.text_encoders):
        randomize_(encoder.model, 13 + i)
    folder = as_released(write_diffusers_folder(bundle, tmp_path_factory.mktemp("sdxl3") / "pipe"), SIZE // 2)
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    return sdlab.load(folder), pipe


def _a1111_embeddings(pipe, text: str, clip_skip: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(context (1, 77, 2048-ish), pooled) of `text` as A1111 encodes it with sdxl_clip_l_skip on."""
    def ids(tokenizer):
        return tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids

    with torch.no_grad():
        clip_l = pipe.text_encoder(ids(pipe.tokenizer), output_hidden_states=True)
        big_g = pipe.text_encoder_2(ids(pipe.tokenizer_2), output_hidden_states=True)
    context = torch.cat([clip_l.hidden_states[-clip_skip], big_g.hidden_states[-2]], dim=-1)
    return context, big_g.text_embeds


def _a1111_picture(pipe, clip_skip: int):
    context, pooled = _a1111_embeddings(pipe, PROMPT, clip_skip)
    negative, negative_pooled = _a1111_embeddings(pipe, NEGATIVE, clip_skip)
    return pipe(prompt_embeds=context, negative_prompt_embeds=negative, pooled_prompt_embeds=pooled,
                negative_pooled_prompt_embeds=negative_pooled, num_inference_steps=STEPS, guidance_scale=CFG,
                width=SIZE, height=SIZE, generator=torch.Generator("cpu").manual_seed(SEED),
                output_type="np").images


def _request(clip_skip: int, on: bool = True) -> GenerationRequest:
    return GenerationRequest(PROMPT, NEGATIVE, steps=STEPS, cfg_scale=CFG, seed=SEED, width=SIZE, height=SIZE,
                             sampler="Euler", schedule="leading", init_noise="vp", clip_skip=clip_skip,
                             clip_skip_convention="a1111", sdxl_clip_l_skip=on)


@pytest.mark.parametrize("clip_skip", [1, 2, 3])
def test_clip_skip_sdxl_draws_a1111s_clip_l_layer(sdxl3, clip_skip):
    ours, pipe = sdxl3
    result = ours.run(_request(clip_skip))
    assert max_pixel_diff(result.images, _a1111_picture(pipe, clip_skip)) <= MAX_PIXEL_DIFF
    parameters = to_parameters(result.request)
    assert (parameters["Clip skip SDXL"], parameters["Clip skip rule"]) == (True, "a1111")
    read = from_parameters({key: value for key, value in parameters.items() if value is not None})
    assert (read["sdxl_clip_l_skip"], read["clip_skip_convention"], read.get("clip_skip", 1)) == (True, "a1111",
                                                                                                  clip_skip)


def test_clip_skip_sdxl_off_is_a1111s_default(sdxl3):
    """Off (A1111's default), A1111's clip skip leaves SDXL as it is: clip skip 3 draws clip skip 1's picture,
    and no option is recorded."""
    ours, _ = sdxl3
    off, plain = ours.run(_request(3, on=False)), ours.run(_request(1, on=False))
    assert (uint8_pictures(off.images) == uint8_pictures(plain.images)).all()
    assert to_parameters(off.request)["Clip skip SDXL"] is None
    on = ours.run(_request(1))
    assert max_pixel_diff(on.images, off.images) > MAX_PIXEL_DIFF      # its clip skip 1 reads CLIP-L's last layer


def test_clip_skip_sdxl_needs_a1111s_rule(sdxl3):
    ours, _ = sdxl3
    with pytest.raises(RequestError, match="sdxl_clip_l_skip"):
        ours.resolve(replace(_request(2), clip_skip_convention="diffusers"))


def test_a1111_api_takes_the_option():
    """`sdxl_clip_l_skip` from the options or a request's override_settings reaches the request; not a bool: a 422."""
    from sdlab.server.a1111 import Txt2ImgIn, _request
    from sdlab.server.inputs import BadRequest

    assert _request(Txt2ImgIn(prompt="x")).sdxl_clip_l_skip is False
    assert _request(Txt2ImgIn(prompt="x"), options={"sdxl_clip_l_skip": True}).sdxl_clip_l_skip is True
    body = Txt2ImgIn(prompt="x", override_settings={"sdxl_clip_l_skip": True, "CLIP_stop_at_last_layers": 2})
    assert (_request(body).sdxl_clip_l_skip, _request(body).clip_skip) == (True, 2)
    with pytest.raises(BadRequest, match="sdxl_clip_l_skip"):
        _request(Txt2ImgIn(prompt="x", override_settings={"sdxl_clip_l_skip": "yes"}))


def test_native_api_takes_the_option(sdlab_server):
    """The native API's `sdxl_clip_l_skip` reaches the request (the server's one-encoder model draws without it, as
    A1111 does on SD1) and is checked as the request checks it, not refused as an unknown field."""
    import httpx
    from server_fixtures import run_job

    body = {"prompt": "a red apple", "steps": 2, "seed": 7, "width": 32, "height": 32, "clip_skip": 2,
            "clip_skip_convention": "a1111", "sdxl_clip_l_skip": True}
    with httpx.Client(base_url=sdlab_server.url, timeout=120) as client:
        assert run_job(client, body)["status"] == "done"
        refused = client.post("/api/jobs", json={**body, "clip_skip_convention": "diffusers"})
        assert refused.status_code == 400 and "needs clip_skip_convention" in refused.text, refused.text
