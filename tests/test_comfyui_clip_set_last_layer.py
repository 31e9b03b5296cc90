"""ComfyUI's CLIPSetLastLayer (``clip_skip_convention="comfyui"``, the ComfyUI API's graphs) on SD2 and SDXL.

Reference: comfyanonymous/ComfyUI (comfy/sd1_clip.py, comfy/sd2_clip.py, comfy/sdxl_clip.py at 01312a5; nodes.py
CLIPSetLastLayer). CLIPSetLastLayer(stop_at_clip_layer=-n) calls ``clip_layer(-n)`` on every CLIP tower, which
``SDClipModel`` reads as ``layer = "hidden"; layer_idx = -n`` (``abs(layer_idx) <= num_layers``), and encodes

    outputs = self.transformer(tokens, intermediate_output=self.layer_idx,
                               final_layer_norm_intermediate=self.layer_norm_hidden_state)
    z = outputs[0] if self.layer == "last" else outputs[1]        # outputs[2]: pooled, from the full run

SD2's tower (``SD2ClipHModel``) keeps ``layer_norm_hidden_state=True``: z = final_layer_norm(hidden_states[-n]);
SDXL's (``SDXLClipModel``: clip_l ``layer_norm_hidden_state=False``, ``SDXLClipG`` likewise) sets both towers
alike: z = cat(clip_l.hidden_states[-n], clip_g.hidden_states[-n]), pooled clip_g's of its last layer. Those
embeddings, built with transformers' towers of tiny diffusers folders (3 layers, so -1, -2 read different
layers), go to diffusers' pipelines; sdlab draws the same pictures within `MAX_PIXEL_DIFF` (2/255). The prompt
and the negative are encoded alike, as ComfyUI's KSampler gets both from CLIP nodes behind one CLIPSetLastLayer.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from bundle_fixtures import as_released, randomize_, write_diffusers_folder
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
from picture_parity import CFG, MAX_PIXEL_DIFF, PROMPT, SEED, SIZE, max_pixel_diff
from test_sdxl_a1111_clip_l_skip import sdxl3  # noqa: F401  (a module fixture: the tiny 3-layer SDXL)

from sdlab.api import Pipeline
from sdlab.checkpoints import create
from sdlab.families import get_family
from sdlab.pipeline.infotext import from_parameters, to_parameters
from sdlab.pipeline.request import GenerationRequest

NEGATIVE = "blurry, low quality"
STEPS = 4

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def sd2_3(tmp_path_factory):
    """A tiny SD2 whose text tower has 3 layers: sdlab's bundle as an original checkpoint loads it (the whole tower,
    read at its penultimate layer with the final LayerNorm, as ComfyUI's SD2ClipHModel), diffusers' pipeline."""
    texts = tuple(replace(config, layers=3) for config in create.tiny_text_configs(get_family("sd2")))
    bundle = create.new_bundle("sd2", tiny=True, text=texts, seed=21)
    randomize_(bundle.unet, 21)
    randomize_(bundle.vae, 22)
    randomize_(bundle.text_encoders[0].model, 23)
    folder = as_released(write_diffusers_folder(bundle, tmp_path_factory.mktemp("sd2_3") / "pipe"), SIZE // 2)
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    return Pipeline(bundle), pipe       # the bundle as a checkpoint loads it: its tower whole, rule penultimate


def _ids(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def _comfy_sd2(pipe, text: str, n: int) -> torch.Tensor:
    """SD2ClipHModel at layer_idx -n: the final LayerNorm of hidden_states[-n]."""
    with torch.no_grad():
        out = pipe.text_encoder(_ids(pipe.tokenizer, text), output_hidden_states=True)
        encoder = getattr(pipe.text_encoder, "text_model", pipe.text_encoder)     # transformers 4 or 5
        return encoder.final_layer_norm(out.hidden_states[-n])


def _comfy_sdxl(pipe, text: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXLClipModel at layer_idx -n: both towers' hidden_states[-n], no LayerNorm; clip_g's pooled."""
    with torch.no_grad():
        clip_l = pipe.text_encoder(_ids(pipe.tokenizer, text), output_hidden_states=True)
        clip_g = pipe.text_encoder_2(_ids(pipe.tokenizer_2, text), output_hidden_states=True)
    return torch.cat([clip_l.hidden_states[-n], clip_g.hidden_states[-n]], dim=-1), clip_g.text_embeds


def _request(n: int) -> GenerationRequest:
    return GenerationRequest(PROMPT, NEGATIVE, steps=STEPS, cfg_scale=CFG, seed=SEED, width=SIZE, height=SIZE,
                             sampler="Euler", schedule="leading", init_noise="vp", clip_skip=n,
                             clip_skip_convention="comfyui")


def _run(pipe, **embeds):
    return pipe(**embeds, num_inference_steps=STEPS, guidance_scale=CFG, width=SIZE, height=SIZE,
                generator=torch.Generator("cpu").manual_seed(SEED), output_type="np").images


@pytest.mark.parametrize("n", [1, 2])
def test_clip_set_last_layer_on_sd2_is_comfyuis(sd2_3, n):
    ours, pipe = sd2_3
    result = ours.run(_request(n))
    reference = _run(pipe, prompt_embeds=_comfy_sd2(pipe, PROMPT, n),
                     negative_prompt_embeds=_comfy_sd2(pipe, NEGATIVE, n))
    assert max_pixel_diff(result.images, reference) <= MAX_PIXEL_DIFF
    if n == 1:     # -1 is SD2's last layer, not its usual penultimate one (the A1111 rule's clip skip 1)
        usual = ours.run(replace(_request(1), clip_skip_convention="a1111"))
        assert max_pixel_diff(result.images, usual.images) > MAX_PIXEL_DIFF


@pytest.mark.parametrize("n", [1, 2])
def test_clip_set_last_layer_on_sdxl_is_comfyuis(sdxl3, n):  # noqa: F811
    ours, pipe = sdxl3
    result = ours.run(_request(n))
    context, pooled = _comfy_sdxl(pipe, PROMPT, n)
    negative, negative_pooled = _comfy_sdxl(pipe, NEGATIVE, n)
    reference = _run(pipe, prompt_embeds=context, negative_prompt_embeds=negative, pooled_prompt_embeds=pooled,
                     negative_pooled_prompt_embeds=negative_pooled)
    assert max_pixel_diff(result.images, reference) <= MAX_PIXEL_DIFF
    parameters = to_parameters(result.request)
    assert parameters["Clip skip rule"] == "comfyui"
    read = from_parameters({key: value for key, value in parameters.items() if value is not None})
    assert (read["clip_skip_convention"], read.get("clip_skip", 1)) == ("comfyui", n)
    if n == 1:
        usual = ours.run(replace(_request(1), clip_skip_convention="a1111"))
        assert max_pixel_diff(result.images, usual.images) > MAX_PIXEL_DIFF
