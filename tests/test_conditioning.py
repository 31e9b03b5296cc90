"""Prompt -> U-Net conditioning (`sdlab.pipeline.conditioning`) against diffusers' `encode_prompt`.

References: transformers' CLIPTextModel / CLIPTextModelWithProjection holding the same seeded random
weights as sdlab's reduced-width towers (64-wide heads, 4 layers so clip skip has layers to skip), inside
diffusers' StableDiffusionPipeline / StableDiffusionXLPipeline / StableDiffusionXLImg2ImgPipeline built from
tiny U-Net / VAE configs. The HF tokenizer files are generated from sdlab's vocabulary.

Conventions checked:
- A1111 clip skip n == diffusers `clip_skip=n-1` (SD1, SDXL). diffusers applies clip skip to the prompt only
  and encodes the negative at the usual layer (`make_cond(..., negative_clip_skip=1)`, sdlab's diffusers
  convention); A1111 applies it to both (`negative_clip_skip` left unset), compared with the negative
  encoded as a diffusers prompt.
- diffusers' SD2 text encoder is OpenCLIP-H without its last layer, read at `last_hidden_state`; a full
  sdlab tower read at "penultimate_norm" must give the same context.
- SDXL's `y` equals the input of diffusers' `unet.add_embedding` (pooled text embedding + 256-wide
  embeddings of `add_time_ids`), captured with a hook while the diffusers U-Net runs.
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from bundle_fixtures import hf_text_config, randomize_, tiny_bundle, write_tokenizer_files
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig as HFTextConfig
from transformers import CLIPTextModel as HFTextModel
from transformers import CLIPTextModelWithProjection as HFTextModelWithProjection
from transformers import CLIPTokenizer as HFTokenizer

from sdlab.families.loaded import TextEncoder
from sdlab.families import get_family
from sdlab.families.sd1 import SD1_CLIP_L
from sdlab.families.sd2 import SD2_OPENCLIP_H
from sdlab.families.sdxl import SDXL_BIGG, SDXL_CLIP_L, SDXL_REFINER_BIGG
from sdlab.models.clip import CLIPTextConfig, CLIPTextModel
from sdlab.models.tokenizer import default_tokenizer
from sdlab.pipeline.conditioning import (
    chunk_input_ids,
    encode_prompt,
    encode_prompts,
    make_cond,
    prompt_chunks,
)

TOL = 1e-5
LAYERS = 4
ASTRONAUT = "a photograph of an astronaut riding a horse"
PROMPTS = [ASTRONAUT, "masterpiece, best quality, a red fox in the snow at dawn, highly detailed"]
NEGATIVES = ["", "blurry, low quality, watermark"]
ONE_TOKEN_WORDS = "cat dog red blue house tree river sky sun moon car road".split()   # one CLIP token each


def _tiny(base: CLIPTextConfig, width: int, projection: bool) -> CLIPTextConfig:
    return replace(base, width=width, layers=LAYERS, heads=width // 64, mlp_width=2 * width,
                   projection_dim=width if projection else None)


def _encoder(spec, width: int, seed: int) -> TextEncoder:
    cfg = _tiny(spec.config, width, spec.config.projection_dim is not None)
    return TextEncoder(spec=replace(spec, config=cfg), config=cfg, model=randomize_(CLIPTextModel(cfg), seed),
                       tokenizer=default_tokenizer(spec.pad_token_id))


def _hf_twin(encoder: TextEncoder, layers: int | None = None, projection: bool | None = None):
    """transformers tower with the weights of `encoder`: only its first `layers` blocks when given, and without
    `text_projection` when `projection` is False (diffusers' SD2 `text_encoder` is a plain CLIPTextModel)."""
    projection = encoder.config.projection_dim is not None if projection is None else projection
    cfg = replace(encoder.config, layers=layers or encoder.config.layers,
                  projection_dim=encoder.config.projection_dim if projection else None)
    hf = (HFTextModelWithProjection if projection else HFTextModel)(HFTextConfig(**hf_text_config(cfg)))
    state = {}
    for key, value in encoder.model.state_dict().items():
        if key.startswith("encoder.layers.") and int(key.split(".")[2]) >= cfg.layers:
            continue                                                  # dropped blocks (diffusers' SD2 tower)
        if key == "text_projection.weight" and not projection:
            continue
        state[key] = value
    if projection:                         # transformers 5 keeps `text_model.` only in the projection class
        state = {k if k == "text_projection.weight" else "text_model." + k: v for k, v in state.items()}
    hf.load_state_dict(state, strict=True)
    if not projection:
        # diffusers 0.42's SD1 clip-skip path reads `text_encoder.text_model.final_layer_norm`, which transformers
        # 5 moved to the top level; a plain (unregistered) attribute restores the path it expects.
        object.__setattr__(hf, "text_model", SimpleNamespace(final_layer_norm=hf.final_layer_norm))
    return hf.eval()


@pytest.fixture(scope="module")
def hf_tokenizers(tmp_path_factory):
    """(pads with the end token, pads with "!" = id 0), as the SD1 / OpenCLIP tokenizer folders."""
    root = tmp_path_factory.mktemp("tokenizers")
    write_tokenizer_files(root / "eos", "<|endoftext|>")
    write_tokenizer_files(root / "zero", "!")
    eos, zero = HFTokenizer.from_pretrained(str(root / "eos")), HFTokenizer.from_pretrained(str(root / "zero"))
    assert (eos.pad_token_id, zero.pad_token_id, eos.model_max_length) == (49407, 0, 77)
    return eos, zero


def _vae() -> AutoencoderKL:
    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                         block_out_channels=(32,), layers_per_block=1, latent_channels=4, norm_num_groups=32)


def _unet(context_dim: int, adm_extra: int | None = None) -> UNet2DConditionModel:
    sdxl = {} if adm_extra is None else dict(
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=adm_extra,
    )
    torch.manual_seed(1)
    return UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=context_dim, attention_head_dim=8, use_linear_projection=adm_extra is not None, **sdxl,
    ).eval()


def _sd_pipeline(text_encoder, tokenizer) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=_unet(text_encoder.config.hidden_size),
        scheduler=EulerDiscreteScheduler(steps_offset=1), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


# ---------------------------------------------------------------------------------------------------------
# SD1 / SD2 against StableDiffusionPipeline.encode_prompt


@pytest.fixture(scope="module")
def sd1(hf_tokenizers):
    encoder = _encoder(SD1_CLIP_L, 64, seed=11)
    return encoder, _sd_pipeline(_hf_twin(encoder), hf_tokenizers[0])


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("negative", NEGATIVES)
@torch.no_grad()
def test_sd1_matches_diffusers(sd1, prompt, negative):
    encoder, pipe = sd1
    cond, uncond = make_cond([encoder], get_family("sd1"), prompt, negative, batch_size=2)
    ref, ref_neg = pipe.encode_prompt(prompt, "cpu", 2, True, negative)
    assert cond.keys() == uncond.keys() == {"context"}
    assert cond["context"].shape == (2, 77, 64)
    assert _max_err(cond["context"], ref) < TOL
    assert _max_err(uncond["context"], ref_neg) < TOL


@pytest.mark.parametrize("clip_skip", [2, 3])
@torch.no_grad()
def test_sd1_clip_skip_is_diffusers_clip_skip_minus_one(sd1, clip_skip):
    encoder, pipe = sd1
    negative = NEGATIVES[1]
    cond, uncond = make_cond([encoder], get_family("sd1"), ASTRONAUT, negative, clip_skip=clip_skip,
                             negative_clip_skip=1)
    ref, ref_neg = pipe.encode_prompt(ASTRONAUT, "cpu", 1, True, negative, clip_skip=clip_skip - 1)
    assert _max_err(cond["context"], ref) < TOL
    assert _max_err(uncond["context"], ref_neg) < TOL               # the negative at the usual layer
    _, a1111_uncond = make_cond([encoder], get_family("sd1"), ASTRONAUT, negative, clip_skip=clip_skip)
    moved, _ = pipe.encode_prompt(negative, "cpu", 1, False, clip_skip=clip_skip - 1)   # see module docstring
    assert _max_err(a1111_uncond["context"], moved) < TOL
    plain, _ = pipe.encode_prompt(ASTRONAUT, "cpu", 1, False)
    assert _max_err(cond["context"], plain) > 1e-2                 # clip skip did change the conditioning


@torch.no_grad()
def test_skipped_layers_are_not_run(sd1):
    encoder, _ = sd1
    calls = []
    handle = encoder.model.encoder.layers[-1].register_forward_hook(lambda *a: calls.append(1))
    try:
        encode_prompt([encoder], ASTRONAUT, clip_skip=2)
        assert calls == []
        encode_prompt([encoder], ASTRONAUT, clip_skip=1)
        assert calls == [1]
    finally:
        handle.remove()
    with pytest.raises(ValueError, match="clip_skip"):
        encode_prompt([encoder], ASTRONAUT, clip_skip=LAYERS + 1)


@pytest.fixture(scope="module")
def sd2(hf_tokenizers):
    """A full (LAYERS) sdlab tower as in original files, and diffusers' tower with one layer fewer."""
    encoder = _encoder(SD2_OPENCLIP_H, 64, seed=21)
    return encoder, _sd_pipeline(_hf_twin(encoder, layers=LAYERS - 1, projection=False), hf_tokenizers[1])


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("negative", NEGATIVES)
@torch.no_grad()
def test_sd2_full_tower_matches_diffusers_truncated_tower(sd2, prompt, negative):
    encoder, pipe = sd2
    assert encoder.spec.hidden_state == "penultimate_norm" and encoder.spec.pad_token_id == 0
    cond, uncond = make_cond([encoder], get_family("sd2"), prompt, negative)
    ref, ref_neg = pipe.encode_prompt(prompt, "cpu", 1, True, negative)
    assert _max_err(cond["context"], ref) < TOL
    assert _max_err(uncond["context"], ref_neg) < TOL


@torch.no_grad()
def test_sd2_truncated_tower_read_at_last_is_the_same(sd2):
    """What the loader builds from a diffusers SD2 folder: LAYERS-1 blocks with hidden_state "last"."""
    encoder, pipe = sd2
    short_cfg = replace(encoder.config, layers=LAYERS - 1)
    short = CLIPTextModel(short_cfg)
    short.load_state_dict({k: v for k, v in encoder.model.state_dict().items()
                           if not k.startswith(f"encoder.layers.{LAYERS - 1}.")})
    truncated = TextEncoder(spec=replace(encoder.spec, hidden_state="last", config=short_cfg), config=short_cfg,
                            model=short.eval(), tokenizer=encoder.tokenizer)
    for clip_skip in (1, 2):
        full = encode_prompt([encoder], PROMPTS[1], clip_skip=clip_skip).context
        cut = encode_prompt([truncated], PROMPTS[1], clip_skip=clip_skip).context
        ref, _ = pipe.encode_prompt(PROMPTS[1], "cpu", 1, False, clip_skip=clip_skip - 1 or None)
        assert _max_err(full, cut) < TOL
        assert _max_err(full, ref) < TOL


def test_chunk_ids_pad_after_the_first_end_token(hf_tokenizers):
    eos_tok, zero_tok = hf_tokenizers
    chunks = prompt_chunks(ASTRONAUT, default_tokenizer())
    for pad, hf in ((49407, eos_tok), (0, zero_tok)):
        ids = chunk_input_ids(chunks, pad)
        ref = hf(ASTRONAUT, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        assert torch.equal(ids, ref)
    ids = chunk_input_ids(chunks, 0)[0].tolist()
    assert ids[:10] == [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407] and set(ids[10:]) == {0}


# ---------------------------------------------------------------------------------------------------------
# SDXL base and refiner against StableDiffusionXL(Img2Img)Pipeline


@pytest.fixture(scope="module")
def sdxl(hf_tokenizers):
    clip_l, bigg = _encoder(SDXL_CLIP_L, 64, seed=31), _encoder(SDXL_BIGG, 128, seed=32)
    pipe = StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=_hf_twin(clip_l), text_encoder_2=_hf_twin(bigg), tokenizer=hf_tokenizers[0],
        tokenizer_2=hf_tokenizers[1], unet=_unet(64 + 128, adm_extra=128 + 6 * 256),
        scheduler=EulerDiscreteScheduler(steps_offset=1),
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )
    return (clip_l, bigg), pipe


def _add_embedding_input(unet: UNet2DConditionModel, context, pooled, time_ids) -> torch.Tensor:
    """The vector diffusers' U-Net feeds `add_embedding` (pooled + embedded time ids), captured by a hook."""
    seen = []
    handle = unet.add_embedding.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        latent = torch.zeros(context.shape[0], 4, 8, 8)
        unet(latent, torch.tensor(500.0), encoder_hidden_states=context,
             added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize(("negative", "sizes"), [
    ("", {}),
    (NEGATIVES[1], {"original_size": (1024, 768), "crops_coords_top_left": (16, 32), "target_size": (512, 640)}),
])
@torch.no_grad()
def test_sdxl_matches_diffusers(sdxl, negative, sizes):
    encoders, pipe = sdxl
    width, height = 832, 1216
    cond, uncond = make_cond(encoders, get_family("sdxl"), PROMPTS[1], negative, batch_size=2, width=width, height=height,
                             **sizes)
    ref, ref_neg, pooled, pooled_neg = pipe.encode_prompt(
        PROMPTS[1], device="cpu", num_images_per_prompt=2,
        negative_prompt=negative or None,                                  # None: force_zeros_for_empty_prompt
    )
    assert cond["context"].shape == (2, 77, 192) and cond["y"].shape == (2, 128 + 6 * 256)
    assert _max_err(cond["context"], ref) < TOL
    assert _max_err(uncond["context"], ref_neg) < TOL
    if negative == "":
        assert not uncond["context"].any() and not uncond["y"][:, :128].any()    # zero context and pooled

    time_ids = pipe._get_add_time_ids(
        sizes.get("original_size", (height, width)), sizes.get("crops_coords_top_left", (0, 0)),
        sizes.get("target_size", (height, width)), torch.float32, text_encoder_projection_dim=128,
    ).repeat(2, 1)
    for ours, context, text_embeds in ((cond, ref, pooled), (uncond, ref_neg, pooled_neg)):
        y_ref = _add_embedding_input(pipe.unet, context, text_embeds, time_ids)
        assert _max_err(ours["y"], y_ref) < TOL


@torch.no_grad()
def test_sdxl_clip_skip_is_diffusers_clip_skip_minus_one(sdxl):
    encoders, pipe = sdxl
    ours = encode_prompt(encoders, ASTRONAUT, clip_skip=2, with_pooled=True)
    ref, _, pooled, _ = pipe.encode_prompt(ASTRONAUT, device="cpu", do_classifier_free_guidance=False,
                                              clip_skip=1)
    assert _max_err(ours.context, ref) < TOL
    assert _max_err(ours.pooled, pooled) < TOL            # the pooled output always comes from the full tower


@torch.no_grad()
def test_sdxl_clip_skip_leaves_the_negative_at_the_usual_layer(sdxl):
    encoders, pipe = sdxl
    cond, uncond = make_cond(encoders, get_family("sdxl"), ASTRONAUT, NEGATIVES[1], clip_skip=2, negative_clip_skip=1,
                             width=64, height=64)
    ref, ref_neg, _, pooled_neg = pipe.encode_prompt(ASTRONAUT, device="cpu", negative_prompt=NEGATIVES[1],
                                                     clip_skip=1)
    assert _max_err(cond["context"], ref) < TOL
    assert _max_err(uncond["context"], ref_neg) < TOL
    assert _max_err(uncond["y"][:, :pooled_neg.shape[1]], pooled_neg) < TOL


@torch.no_grad()
def test_sdxl_pooled_needs_the_whole_bigg_tower_only(sdxl):
    (clip_l, bigg), _ = sdxl
    calls = []
    hooks = [te.model.encoder.layers[-1].register_forward_hook(lambda *a, n=te.spec.name: calls.append(n))
             for te in (clip_l, bigg)]
    try:
        encode_prompt([clip_l, bigg], ASTRONAUT, with_pooled=True)
    finally:
        for h in hooks:
            h.remove()
    assert calls == ["openclip_bigg"]


@pytest.fixture(scope="module")
def sdxl_refiner(hf_tokenizers):
    bigg = _encoder(SDXL_REFINER_BIGG, 128, seed=41)
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=_vae(), text_encoder=None, text_encoder_2=_hf_twin(bigg), tokenizer=None, tokenizer_2=hf_tokenizers[1],
        unet=_unet(128, adm_extra=128 + 5 * 256), scheduler=EulerDiscreteScheduler(steps_offset=1),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )
    return bigg, pipe


@pytest.mark.parametrize("negative", NEGATIVES)
@torch.no_grad()
def test_sdxl_refiner_matches_diffusers(sdxl_refiner, negative):
    bigg, pipe = sdxl_refiner
    size = (768, 1024)
    cond, uncond = make_cond([bigg], get_family("sdxl-refiner"), ASTRONAUT, negative, width=size[1], height=size[0])
    ref, ref_neg, pooled, pooled_neg = pipe.encode_prompt(ASTRONAUT, device="cpu",
                                                           negative_prompt=negative or None)
    assert _max_err(cond["context"], ref) < TOL and _max_err(uncond["context"], ref_neg) < TOL
    time_ids, neg_time_ids = pipe._get_add_time_ids(size, (0, 0), size, 6.0, 2.5, size, (0, 0), size, torch.float32,
                                                    text_encoder_projection_dim=128)
    assert _max_err(cond["y"], _add_embedding_input(pipe.unet, ref, pooled, time_ids)) < TOL
    assert _max_err(uncond["y"], _add_embedding_input(pipe.unet, ref_neg, pooled_neg, neg_time_ids)) < TOL


# ---------------------------------------------------------------------------------------------------------
# A1111 semantics: long prompts, BREAK, emphasis, padding to equal length, batch


def _words(n: int, start: int = 0) -> str:
    return " ".join(ONE_TOKEN_WORDS[(start + i) % len(ONE_TOKEN_WORDS)] for i in range(n))


@torch.no_grad()
def test_long_prompt_is_split_into_chunks(sd1):
    encoder, pipe = sd1
    assert len(default_tokenizer().encode(_words(90))) == 90
    long = encode_prompt([encoder], _words(90)).context
    first = encode_prompt([encoder], _words(75)).context
    rest = encode_prompt([encoder], _words(15, start=75)).context
    assert long.shape == (1, 154, 64)
    assert _max_err(long[:, :77], first) < 1e-6
    assert _max_err(long[:, 77:], rest) < 1e-6
    truncated, _ = pipe.encode_prompt(_words(90), "cpu", 1, False)    # diffusers keeps the first 75 tokens
    assert _max_err(long[:, :77], truncated) < TOL


@torch.no_grad()
def test_sdxl_long_prompt_pooled_is_the_first_chunks(sdxl):
    encoders, _ = sdxl
    long = encode_prompt(encoders, _words(90), with_pooled=True)
    first = encode_prompt(encoders, _words(75), with_pooled=True)
    assert long.context.shape == (1, 154, 192)
    assert _max_err(long.context[:, :77], first.context) < 1e-6
    assert _max_err(long.pooled, first.pooled) < 1e-6


@torch.no_grad()
def test_break_starts_a_new_chunk(sd1):
    encoder, _ = sd1
    both = encode_prompt([encoder], "a red cat BREAK a blue dog").context
    assert both.shape == (1, 154, 64)
    assert _max_err(both[:, :77], encode_prompt([encoder], "a red cat").context) < 1e-6
    assert _max_err(both[:, 77:], encode_prompt([encoder], "a blue dog").context) < 1e-6


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@torch.no_grad()
def test_emphasis_scales_the_weighted_tokens_and_keeps_the_mean(sd1, sdxl, family):
    encoders = [sd1[0]] if family == "sd1" else list(sdxl[0])
    plain_text, weighted_text = "a cat on a mat", "a (cat:1.5) on a mat"
    plain = encode_prompt(encoders, plain_text).context
    assert torch.equal(plain, encode_prompt(encoders, weighted_text, emphasis=False).context)   # same tokens
    emphasized = encode_prompt(encoders, weighted_text).context
    weights = torch.ones(1, 77)
    weights[0, 2] = 1.5                                   # [begin, a, cat, ...]: only "cat" is weighted
    start = 0
    for te in encoders:                                   # emphasis is applied to each encoder's output
        width = te.config.width
        z, e = plain[..., start : start + width], emphasized[..., start : start + width]
        scaled = z * weights[..., None]
        expected = scaled * (z.mean() / scaled.mean())
        assert _max_err(e, expected) < 2e-6
        assert abs(e.mean().item() - z.mean().item()) < 2e-6
        start += width
    changed = (emphasized != plain).any(dim=-1)[0]
    assert changed[2]


@pytest.mark.parametrize("prompt", [ASTRONAUT, "a (cat:1.0) on a mat", _words(90)])
@torch.no_grad()
def test_unit_weights_are_bit_identical_to_no_emphasis(sdxl, prompt):
    encoders, _ = sdxl
    on = encode_prompt(encoders, prompt, emphasis=True, with_pooled=True)
    off = encode_prompt(encoders, prompt, emphasis=False, with_pooled=True)
    assert torch.equal(on.context, off.context) and torch.equal(on.pooled, off.pooled)


@torch.no_grad()
def test_emphasis_only_touches_weighted_chunks(sd1):
    encoder, _ = sd1
    prompt = f"{_words(10)} BREAK ({_words(5)}:1.3)"
    on, off = encode_prompt([encoder], prompt).context, encode_prompt([encoder], prompt, emphasis=False).context
    assert torch.equal(on[:, :77], off[:, :77])
    assert not torch.equal(on[:, 77:], off[:, 77:])


@torch.no_grad()
def test_shorter_prompt_is_repeated_not_padded_with_empty_chunks(sd1):
    encoder, _ = sd1
    cond, uncond = make_cond([encoder], get_family("sd1"), "a cat", _words(90), batch_size=3)
    assert cond["context"].shape == uncond["context"].shape == (3, 154, 64)
    alone = encode_prompt([encoder], "a cat").context
    assert _max_err(cond["context"], alone.repeat(3, 2, 1)) < 1e-6                 # tests/test_cond_uncond_lengths.py
    assert _max_err(uncond["context"][:1], encode_prompt([encoder], _words(90)).context) < 1e-6
    cond, uncond = make_cond([encoder], get_family("sd1"), _words(90), "", batch_size=1)
    assert _max_err(uncond["context"], encode_prompt([encoder], "").context.repeat(1, 2, 1)) < 1e-6
    padded = encode_prompts([encoder], ["a cat", _words(160)])
    assert [p.num_chunks for p in padded] == [3, 3]


@torch.no_grad()
def test_sdxl_empty_negative_is_zero_at_every_length(sdxl):
    encoders, _ = sdxl
    cond, uncond = make_cond(encoders, get_family("sdxl"), _words(90), "", width=1024, height=1024, batch_size=2)
    assert uncond["context"].shape == cond["context"].shape == (2, 154, 192)
    assert not uncond["context"].any()
    _, encoded = make_cond(encoders, get_family("sdxl"), ASTRONAUT, "", width=1024, height=1024, zero_empty_negative=False)
    assert _max_err(encoded["context"], encode_prompt(encoders, "").context) < 1e-6
    assert encoded["y"][:, :128].abs().sum() > 0


@torch.no_grad()
def test_batch_rows_and_no_guidance(sdxl):
    encoders, _ = sdxl
    cond, uncond = make_cond(encoders, get_family("sdxl"), ASTRONAUT, "ugly", width=512, height=512, batch_size=4,
                             guidance=False)
    assert uncond is None
    assert cond["context"].shape == (4, 77, 192) and cond["y"].shape == (4, 128 + 6 * 256)
    assert all(torch.equal(cond[k][0], cond[k][i]) for k in cond for i in range(4))
    with pytest.raises(ValueError, match="width and height"):
        make_cond(encoders, get_family("sdxl"), ASTRONAUT, "")


@pytest.mark.parametrize("name", ["sdxl", "sdxl-refiner"])
@torch.no_grad()
def test_bundle_conditioning_feeds_its_unet(name):
    """From a loaded bundle the family and U-Net widths come along; the refiner's vector uses the aesthetic score."""
    bundle = tiny_bundle(name)
    cond, uncond = make_cond(bundle.text_encoders, bundle.family, _words(80), "", width=64, height=64,
                             adm_width=bundle.unet_config.adm_in_channels)
    assert cond["context"].shape == (1, 154, bundle.unet_config.context_dim)
    assert cond["y"].shape == uncond["y"].shape == (1, bundle.unet_config.adm_in_channels)
    x = torch.zeros(1, 4, 8, 8)
    assert bundle.unet(x, torch.tensor(10.0), **cond).shape == x.shape


@torch.no_grad()
def test_emphasis_that_overflows_the_encoding_is_a_prompt_error(sd1, monkeypatch):
    from sdlab.pipeline import conditioning
    from sdlab.pipeline.prompt_syntax import PromptError

    encoder, _ = sd1
    # fp16 weights: a weight the parser allows can still overflow after the mean rescale; simulate it
    monkeypatch.setattr(conditioning, "apply_emphasis", lambda hidden, weights, counts, **kw: hidden * float("inf"))
    with pytest.raises(PromptError, match="overflow"):
        encode_prompt([encoder], "a (red:1.3) cat")
    encode_prompt([encoder], "a red cat")                          # unweighted chunks skip emphasis
