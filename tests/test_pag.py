"""Perturbed-attention guidance (PAG, Ahn et al. 2024) against diffusers 0.42.

- the layer names: sdlab's table of the U-Net's self-attentions under diffusers' names is the set of diffusers'
  self-attention modules (`Attention` with is_cross_attention False), and diffusers' own layer matcher
  (`PAGMixin._set_pag_attn_processor`) picks the same ones for every entry;
- the U-Net: a batch [uncond, cond, perturbed] with the perturbed rows' chosen self-attentions the identity equals
  diffusers' UNet2DConditionModel with `PAGCFGIdentitySelfAttnProcessor2_0` on the same random weights (fp32,
  within 2e-5), on sdlab's bf16 CPU attention kernel path too (within bf16's bound, the kernel seeing only the
  rows that attend);
- whole pictures: `StableDiffusionPAGPipeline` / `StableDiffusionXLPAGPipeline` on the same folder, scheduler, seeds,
  with and without CFG, with an adaptive scale, with a non-default layer list, with guidance rescale: within 2/255.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import (
    StableDiffusionPAGImg2ImgPipeline, StableDiffusionPAGInpaintPipeline, StableDiffusionPAGPipeline,
    StableDiffusionXLPAGPipeline,
)
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.pipelines.pag.pag_utils import PAGMixin
from picture_parity import MAX_PIXEL_DIFF, PROMPT, SEED, SIZE, STEPS, max_pixel_diff, uint8_pictures
from test_pipeline_parity import NEGATIVE, _generators, _quiet, _schedulers
from bundle_fixtures import init_picture, lower_right_mask, tiny_bundle, write_diffusers_folder
from test_pipeline_parity import sd1, sd1_inpaint, sdxl  # noqa: F401 (fixtures: sdlab's and diffusers' pipelines of one folder)
from test_unet import SMALL, _diffusers_unet, _inputs, _sdlab_from

from sdlab.models import cpu_attention
from sdlab.pipeline.perturbed_attention import PagLayerError, pag_layer_names, self_attention_names
from sdlab.pipeline.request import RequestError

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

LAYER_LISTS = [["mid"], ["down"], ["up"], ["down_blocks.1"], ["up_blocks.0.attentions.1"], ["mid", "up_blocks.1"],
               ["transformer_blocks.0"], ["down_blocks.(0|1)"]]


def _diffusers_choice(unet, layers: list[str], cfg: bool = True) -> dict[str, object]:
    """diffusers' own matcher: the modules `PAGMixin._set_pag_attn_processor` gives a PAG processor."""
    holder = SimpleNamespace(unet=unet)
    PAGMixin.set_pag_applied_layers(holder, layers)
    PAGMixin._set_pag_attn_processor(holder, layers, cfg)
    return {name: module for name, module in unet.named_modules()
            if isinstance(module, Attention) and type(module.processor).__name__.startswith("PAG")}


def _plain(unet) -> None:
    unet.set_attn_processor(AttnProcessor2_0())


# ---------------------------------------------------------------- layer names


@pytest.mark.parametrize("name", ["sd1", "sd2", "sdxl", "sdxl_refiner"])
def test_self_attention_names_are_diffusers_and_pick_the_same_layers(name):
    cfg = SMALL[name]
    reference = _diffusers_unet(cfg, seed=0)
    model = _sdlab_from(reference, cfg)
    names = self_attention_names(cfg)
    theirs = {n for n, m in reference.named_modules() if isinstance(m, Attention) and not m.is_cross_attention}
    assert set(names) == theirs
    for diffusers_name, ours in names.items():         # the same module: the same weights
        assert torch.equal(model.get_submodule(ours).to_v.weight, reference.get_submodule(diffusers_name).to_v.weight)
    for layers in LAYER_LISTS:
        try:
            chosen = _diffusers_choice(reference, layers)
        except ValueError:
            with pytest.raises(PagLayerError, match="selects no self-attention"):
                pag_layer_names(cfg, layers)
            continue
        finally:
            _plain(reference)
        assert set(pag_layer_names(cfg, layers)) == {names[n] for n in chosen}, layers


def test_a_layer_that_is_no_regular_expression_or_selects_nothing_is_refused():
    cfg = SMALL["sd1"]
    with pytest.raises(PagLayerError, match="not a regular expression"):
        pag_layer_names(cfg, ["mid("])
    with pytest.raises(PagLayerError, match="'nowhere' selects no self-attention.*mid_block.attentions.0"):
        pag_layer_names(cfg, ["mid", "nowhere"])
    with pytest.raises(PagLayerError, match="one or more"):
        pag_layer_names(cfg, [])


# ---------------------------------------------------------------- the U-Net's identity rows


def _three_rows(cfg, height: int = 16, width: int = 16):
    """[uncond, cond, perturbed] inputs: one latent, the negative's context then the prompt's twice."""
    x, t, context, y, added = _inputs(cfg, height, width)
    x3, t3 = x[:1].repeat(3, 1, 1, 1), t[1:].repeat(3)
    context3 = torch.cat([context[:1], context[1:], context[1:]])
    if y is None:
        return x3, t3, context3, None, {}
    y3 = torch.cat([y[:1], y[1:], y[1:]])
    cond = added["added_cond_kwargs"]
    added3 = {"added_cond_kwargs": {key: torch.cat([v[:1], v[1:], v[1:]]) for key, v in cond.items()}}
    return x3, t3, context3, y3, added3


@pytest.mark.parametrize("name,layers", [("sd1", ["mid"]), ("sd1", ["down_blocks.0", "up"]), ("sd2", ["mid"]),
                                         ("sdxl", ["mid"]), ("sdxl", ["down_blocks.1.attentions.1", "up_blocks.0"])])
def test_identity_rows_match_diffusers_pag_processor(name, layers):
    cfg = SMALL[name]
    reference = _diffusers_unet(cfg, seed=0)
    model = _sdlab_from(reference, cfg)
    x, t, context, y, added = _three_rows(cfg)
    rows = torch.tensor([False, False, True])
    with torch.no_grad():
        plain = reference(x, t, context, **added).sample
        _diffusers_choice(reference, layers)
        expected = reference(x, t, context, **added).sample
        actual = model(x, t, context, y, identity_rows=rows, identity_layers=pag_layer_names(cfg, layers))
    assert (expected[2] - plain[2]).abs().max() > 5e-4                 # the perturbation shows (past the bound)
    torch.testing.assert_close(actual, expected, atol=2e-5, rtol=0)
    torch.testing.assert_close(actual[:2], plain[:2], atol=2e-5, rtol=0)


def test_without_cfg_the_pair_matches_diffusers_processor():
    """diffusers' `PAGIdentitySelfAttnProcessor2_0` (no CFG): [cond, perturbed]. sdlab's shared-rows shortcut (equal
    halves run once until the first text context) must not share a perturbed row."""
    cfg = SMALL["sd1"]
    reference = _diffusers_unet(cfg, seed=0)
    model = _sdlab_from(reference, cfg)
    x, t, context, y, added = _three_rows(cfg)
    x, t, context = x[1:], t[1:], context[1:]
    layers = ["down_blocks.0"]                                          # the first transformer: the shared one
    with torch.no_grad():
        _diffusers_choice(reference, layers, cfg=False)
        expected = reference(x, t, context).sample
        actual = model(x, t, context, identity_rows=torch.tensor([False, True]),
                       identity_layers=pag_layer_names(cfg, layers))
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)


def test_identity_layers_must_be_self_attentions():
    cfg = SMALL["sd1"]
    model = _sdlab_from(_diffusers_unet(cfg, seed=0), cfg)
    x, t, context, _, _ = _three_rows(cfg)
    with pytest.raises(ValueError, match="not a self-attention"):
        model(x, t, context, identity_rows=torch.tensor([False, False, True]),
              identity_layers=["input_blocks.1.1.transformer_blocks.0.attn2"])


@pytest.mark.skipif(not cpu_attention.runs_here(), reason="needs a CPU with AVX512-BF16 (sdlab's bf16 attention kernel)")
def test_the_bf16_cpu_attention_kernel_sees_only_the_rows_that_attend(monkeypatch):
    """A perturbed layer at the finest level, 64 x 64 latent pixels (4096 tokens: the kernel's case), in bf16: the
    kernel runs on the two attending rows alone and the result stays within bf16's bound of diffusers' fp32 PAG."""
    monkeypatch.setenv("SDLAB_CPU_ATTENTION", "1")
    cfg = SMALL["sd1"]
    reference = _diffusers_unet(cfg, seed=0)
    model = _sdlab_from(reference, cfg)
    x, t, context, _, _ = _three_rows(cfg, 64, 64)
    layers = ["down_blocks.0"]
    seen: list[int] = []
    kernel = cpu_attention.attention

    def spy(q, k, v, heads):
        seen.append(len(q))
        return kernel(q, k, v, heads)

    monkeypatch.setattr(cpu_attention, "attention", spy)
    with torch.no_grad():
        _diffusers_choice(reference, layers)
        expected = reference(x, t, context).sample
        bf16 = model.to(torch.bfloat16)
        actual = bf16(x, t, context, identity_rows=torch.tensor([False, False, True]),
                      identity_layers=pag_layer_names(cfg, layers)).float()
    assert 2 in seen                                                    # the perturbed layer: 2 of the 3 rows
    scale = expected.abs().max()
    assert (actual - expected).abs().max() <= 0.03 * scale


# ---------------------------------------------------------------- pictures against diffusers' PAG pipelines


SD1_CASES = {
    "cfg": dict(cfg=7.0, pag=3.0),
    "no cfg": dict(cfg=1.0, pag=3.0),
    "adaptive": dict(cfg=7.0, pag=3.0, adaptive=0.004),
    "layers": dict(cfg=5.0, pag=2.0, layers=["down_blocks.1", "up_blocks.0.attentions.1"]),
    # rescale after PAG (diffusers) vs before it (ComfyUI's / Forge's order): 0 vs 10/255 from diffusers' picture here
    # (at cfg 7, pag 3, rescale 0.7 only 1 vs 3, too close to the 2/255 bound to tell the orders apart)
    "rescale": dict(cfg=7.0, pag=6.0, rescale=0.9),
}


@pytest.mark.parametrize("case", sorted(SD1_CASES))
def test_sd1_pictures_match_diffusers_pag_pipeline(sd1, case):  # noqa: F811
    ours_pipe, pipe = sd1
    options = SD1_CASES[case]
    layers = options.get("layers", ["mid"])
    pag = _quiet(StableDiffusionPAGPipeline(**pipe.components, pag_applied_layers=layers))
    pag.scheduler, sampler = _schedulers(pipe.scheduler.config)["euler"]
    reference = pag(PROMPT, negative_prompt=NEGATIVE, num_images_per_prompt=2, num_inference_steps=STEPS,
                    guidance_scale=options["cfg"], pag_scale=options["pag"],
                    pag_adaptive_scale=options.get("adaptive", 0.0), guidance_rescale=options.get("rescale", 0.0),
                    width=SIZE, height=SIZE, generator=_generators(2), output_type="np").images
    _plain(pipe.unet)
    ours = ours_pipe.txt2img(PROMPT, NEGATIVE, steps=STEPS, cfg_scale=options["cfg"], seed=SEED, width=SIZE,
                             height=SIZE, batch_size=2, pag_scale=options["pag"],
                             pag_adaptive_scale=options.get("adaptive", 0.0), pag_layers=layers,
                             guidance_rescale=options.get("rescale", 0.0), **sampler)
    plain = ours_pipe.txt2img(PROMPT, NEGATIVE, steps=STEPS, cfg_scale=options["cfg"], seed=SEED, width=SIZE,
                              height=SIZE, batch_size=2, guidance_rescale=options.get("rescale", 0.0), **sampler)
    assert max_pixel_diff(ours.images, reference) <= MAX_PIXEL_DIFF
    assert max_pixel_diff(plain.images, reference) > 3 * MAX_PIXEL_DIFF     # PAG changes the picture visibly
    assert ours.request.pag_scale == options["pag"]


def test_sdxl_pictures_match_diffusers_pag_pipeline(sdxl):  # noqa: F811
    ours_pipe, pipe = sdxl
    layers = ["mid", "up_blocks.0.attentions.1"]
    pag = _quiet(StableDiffusionXLPAGPipeline(**pipe.components, pag_applied_layers=layers))
    pag.scheduler, sampler = _schedulers(pipe.scheduler.config)["euler"]
    reference = pag(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=6.0, pag_scale=2.5,
                    pag_adaptive_scale=0.002, width=SIZE, height=SIZE, generator=_generators(1),
                    output_type="np").images
    _plain(pipe.unet)
    ours = ours_pipe.txt2img(PROMPT, NEGATIVE, steps=STEPS, cfg_scale=6.0, seed=SEED, width=SIZE, height=SIZE,
                             pag_scale=2.5, pag_adaptive_scale=0.002, pag_layers=layers, **sampler)
    assert max_pixel_diff(ours.images, reference) <= MAX_PIXEL_DIFF


def test_a_layer_the_model_lacks_is_a_request_error(sd1):  # noqa: F811
    ours_pipe, _ = sd1
    with pytest.raises(RequestError, match="'down_blocks.7' selects no self-attention"):
        ours_pipe.txt2img(PROMPT, steps=2, width=SIZE, height=SIZE, pag_scale=3.0, pag_layers=["down_blocks.7"])
    with pytest.raises(RequestError, match="PAG scale"):
        ours_pipe.txt2img(PROMPT, steps=2, width=SIZE, height=SIZE, pag_scale=-1.0)


def test_sd1_img2img_matches_diffusers_pag_img2img_pipeline(sd1):  # noqa: F811
    ours_pipe, pipe = sd1
    pag = _quiet(StableDiffusionPAGImg2ImgPipeline(**pipe.components, pag_applied_layers=["mid", "up_blocks.1"]))
    pag.scheduler, sampler = _schedulers(pipe.scheduler.config)["euler"]
    reference = pag(PROMPT, image=init_picture(SIZE), strength=0.6, negative_prompt=NEGATIVE, num_images_per_prompt=2,
                    num_inference_steps=STEPS, guidance_scale=6.0, pag_scale=3.0, generator=_generators(2),
                    output_type="np").images
    ours = ours_pipe.img2img(PROMPT, init_picture(SIZE), strength=0.6, negative_prompt=NEGATIVE, steps=STEPS,
                             cfg_scale=6.0, seed=SEED, batch_size=2, pag_scale=3.0, pag_layers=["mid", "up_blocks.1"],
                             **sampler)
    assert max_pixel_diff(ours.images, reference) <= MAX_PIXEL_DIFF


def test_sd1_9_channel_inpaint_matches_diffusers_pag_inpaint_pipeline(sd1_inpaint):  # noqa: F811
    ours_pipe, pipe = sd1_inpaint
    pag = _quiet(StableDiffusionPAGInpaintPipeline(**pipe.components))
    pag.scheduler, sampler = _schedulers(pipe.scheduler.config)["euler"]
    image, mask = init_picture(SIZE), lower_right_mask(SIZE)
    reference = pag(PROMPT, image=image, mask_image=mask, strength=0.75, negative_prompt=NEGATIVE,
                    num_inference_steps=STEPS, guidance_scale=7.0, pag_scale=3.0, pag_adaptive_scale=0.003,
                    width=SIZE, height=SIZE, generator=_generators(1), output_type="np").images
    ours = ours_pipe.inpaint(PROMPT, image, mask, NEGATIVE, strength=0.75, steps=STEPS, cfg_scale=7.0, seed=SEED,
                             paste_back=False, pag_scale=3.0, pag_adaptive_scale=0.003, **sampler)
    assert max_pixel_diff(ours.images, reference) <= MAX_PIXEL_DIFF


def test_controlnet_txt2img_matches_diffusers_pag_controlnet_pipeline(tmp_path):
    """diffusers' StableDiffusionControlNetPAGPipeline: the ControlNet runs on all three rows unperturbed, its
    residuals added to the perturbed row too."""
    from diffusers import StableDiffusionControlNetPAGPipeline, StableDiffusionPipeline
    from test_controlnet_pipeline import EULER, _controlnet_files, _euler, _hint, _released

    from sdlab.pipeline.control import ControlInput
    import sdlab

    bundle = tiny_bundle("sd1", seed=11)
    folder = _released(write_diffusers_folder(bundle, tmp_path / "pipe"))
    base = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    [(net, path)] = _controlnet_files(tmp_path, bundle.unet_config, 1, "original")
    pipe = _quiet(StableDiffusionControlNetPAGPipeline(**base.components, controlnet=net, pag_applied_layers=["mid"]))
    pipe.scheduler = _euler(base)
    reference = pipe(PROMPT, _hint(0), negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.0,
                     pag_scale=3.0, width=SIZE, height=SIZE, controlnet_conditioning_scale=0.8,
                     generator=_generators(1), output_type="np").images
    ours = sdlab.load(folder).txt2img(PROMPT, NEGATIVE, steps=STEPS, cfg_scale=7.0, seed=SEED, width=SIZE,
                                      height=SIZE, pag_scale=3.0, controls=[ControlInput(path, _hint(0), 0.8)], **EULER)
    assert max_pixel_diff(ours.images, reference) <= MAX_PIXEL_DIFF


def test_the_hires_pass_guides_with_pag_and_the_picture_redraws(sd1, monkeypatch):  # noqa: F811
    """The hires fix's second pass is guided with PAG too, and the parameters the picture records draw it again."""
    from sdlab.pipeline import generate as generate_module
    from sdlab.pipeline.infotext import from_parameters, to_parameters
    from sdlab.pipeline.png_info import format_parameters, parse_parameters

    ours_pipe, _ = sd1
    options = dict(steps=3, cfg_scale=5.0, seed=SEED, width=SIZE, height=SIZE, sampler="Euler", hr_scale=1.5,
                   hr_denoise=0.6)
    drawn = ours_pipe.txt2img(PROMPT, NEGATIVE, pag_scale=3.0, pag_layers=["mid", "up"], **options)
    text = format_parameters(to_parameters(drawn.request))
    assert "PerturbedAttentionGuidance_scale: 3" in text and 'PAG layers: "[\\"mid\\", \\"up\\"]"' in text
    again = ours_pipe.txt2img(**from_parameters(parse_parameters(text)))
    assert np.array_equal(uint8_pictures(again.images), uint8_pictures(drawn.images))
    calls = []
    cfg = generate_module.cfg

    def counting(*args, perturbed=None, **kwargs):
        calls.append(perturbed is not None)
        return cfg(*args, perturbed=perturbed, **kwargs)

    monkeypatch.setattr(generate_module, "cfg", counting)
    ours_pipe.txt2img(PROMPT, NEGATIVE, pag_scale=3.0, **options)
    assert calls == [True, True]                                        # the first pass's guidance and the hires pass's


def test_an_edit_model_draws_without_pag_and_says_so(tmp_path, caplog):
    """An InstructPix2Pix model's guidance (its image scale) takes no PAG: a warning, the picture without PAG, no PAG
    label."""
    import sdlab
    from bundle_fixtures import as_released

    from sdlab.pipeline.infotext import to_parameters

    folder = as_released(write_diffusers_folder(tiny_bundle("sd1-edit", seed=5), tmp_path / "pipe"), SIZE // 2)
    edit = sdlab.load(folder)
    options = dict(steps=2, cfg_scale=5.0, seed=SEED, sampler="Euler")
    plain = edit.img2img(PROMPT, init_picture(SIZE), **options)
    with caplog.at_level("WARNING"):
        pag = edit.img2img(PROMPT, init_picture(SIZE), pag_scale=3.0, **options)
    assert "not applied to an edit (InstructPix2Pix) model" in caplog.text
    assert np.array_equal(uint8_pictures(pag.images), uint8_pictures(plain.images))
    assert "PerturbedAttentionGuidance_scale" not in to_parameters(pag.request)


def test_a_layer_the_refiner_lacks_is_refused_before_either_model_samples(monkeypatch):
    """An SDXL refiner with transformers at one level only has no `up_blocks.0` self-attention (nor has the released
    refiner, whose deepest level has none): a request whose PAG layers select one on the base only is refused while
    the plan is made, naming the refiner and its transformers, before the base's U-Net is called; `mid` draws."""
    import dataclasses

    from sdlab.checkpoints.create import new_bundle, tiny_unet_config
    from sdlab.families import get_family
    from sdlab.pipeline.generate import generate_with_refiner
    from sdlab.pipeline.request import GenerationRequest

    from bundle_fixtures import randomize_

    base = tiny_bundle("sdxl", seed=3)
    family = get_family("sdxl-refiner")
    one_level = dataclasses.replace(tiny_unet_config(family), channel_mult=(1, 2, 2), transformer_depth=(0, 1, 0),
                                    transformer_depth_middle=1)
    refiner = new_bundle(family, tiny=True, unet=one_level, seed=4)
    randomize_(refiner.unet, 4)
    calls = []
    forward = type(base.unet).forward
    monkeypatch.setattr(type(base.unet), "forward", lambda unet, *a, **k: calls.append(unet) or forward(unet, *a, **k))
    request = GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE, steps=3, width=SIZE, height=SIZE, seed=SEED,
                                sampler="Euler", pag_scale=3.0, pag_layers=["up_blocks.0"])
    with pytest.raises(RequestError, match=r"'up_blocks.0' selects no self-attention of the refiner; its transformers: "
                                           r"down_blocks.1.attentions.0, mid_block.attentions.0, up_blocks.1"):
        generate_with_refiner(base, refiner, request, switch_at=0.5)
    assert calls == []                                                  # refused before the base sampled
    drawn = generate_with_refiner(base, refiner, dataclasses.replace(request, pag_layers=["mid"]), switch_at=0.5)
    assert drawn.refined and any(unet is refiner.unet for unet in calls)
