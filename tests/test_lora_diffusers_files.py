"""LoRA files as diffusers and peft write them: merged by sdlab as diffusers' `load_lora_weights` applies them.

- `save_lora_weights` files keep no ``alpha`` tensors; the peft config sits in the ``lora_adapter_metadata``
  JSON (``unet.lora_alpha``, ``unet.r``, ``unet.alpha_pattern`` ...). With ``lora_alpha`` != ``r``, per-module
  patterns and rsLoRA, the scale must come from there (SD1 and SDXL; U-Net and every text encoder).
- diffusers' `convert_state_dict_to_kohya` names a single text encoder ``lora_te1_``.
The U-Net and text-encoder outputs of sdlab's merged model and diffusers' model with the adapter loaded
agree within 1e-4 of their scale (~2-3; fp32, merging rounds the weights once; measured ~1e-5), while the
LoRA moves the U-Net's by more than 1.
"""

from __future__ import annotations

import json

import pytest
import torch

import sdlab
from bundle_fixtures import tiny_bundle, write_diffusers_folder

peft = pytest.importorskip("peft")

IDS = torch.tensor([[49406, 320, 8853, 539, 550, 18376, 49407, 49407, 49407]])
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def _pipeline(family: str, folder):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    write_diffusers_folder(tiny_bundle(family, seed=11), folder)
    pipe_class = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    return pipe_class, pipe_class.from_pretrained(folder, local_files_only=True)


def _text_encoders(pipe):
    return [te for te in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if te is not None]


def _add_adapters(pipe, **config) -> dict:
    """Random peft LoRA adapters on the U-Net (alpha 8) and the text encoders (alpha 2), rank 4; `config`
    adds to (or overrides) both configs. Returns `save_lora_weights`' arguments."""
    g = torch.Generator().manual_seed(5)
    parts = {"unet": (pipe.unet, UNET_TARGETS, 8.0)}
    parts.update({name: (te, TEXT_TARGETS, 2.0) for name, te in zip(("text_encoder", "text_encoder_2"),
                                                                  _text_encoders(pipe))})
    arguments = {}
    for name, (model, targets, alpha) in parts.items():
        model.add_adapter(peft.LoraConfig(**{"r": 4, "lora_alpha": alpha, "target_modules": targets,
                                             "init_lora_weights": False, **config}))
        with torch.no_grad():
            for key, p in model.named_parameters():
                if "lora_" in key:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        arguments[f"{name}_lora_layers"] = peft.utils.get_peft_model_state_dict(model)
        arguments[f"{name}_lora_adapter_metadata"] = model.peft_config["default"].to_dict()
    return arguments


def _compare(folder, lora_file, reference_pipe, weight: float = 1.0):
    """Max differences (U-Net, each text encoder) between sdlab's merge at `weight` and diffusers' adapter,
    and the LoRA's effect on the reference U-Net output."""
    bundle = sdlab.load(folder, dtype=torch.float32, loras=[(str(lora_file), weight)]).bundle
    base = sdlab.load(folder, dtype=torch.float32).bundle
    g = torch.Generator().manual_seed(0)
    cfg = bundle.unet_config
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10.0, 500.0])
    context = torch.randn(2, 7, cfg.context_dim, generator=g)
    kwargs, y = {}, None
    if cfg.adm_in_channels is not None:
        text_embeds = torch.randn(2, reference_pipe.text_encoder_2.config.projection_dim, generator=g)
        time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2)
        kwargs = {"added_cond_kwargs": {"text_embeds": text_embeds, "time_ids": time_ids}}
        from sdlab.models.layers import sdxl_vector
        y = sdxl_vector(text_embeds, time_ids)
    with torch.no_grad():
        reference = reference_pipe.unet(x, t, context, **kwargs).sample
        effect = float((reference - base.unet(x, t, context, y)).abs().max())
        pairs = [(bundle.unet(x, t, context, y), reference)]
        pairs += [(ours.model(IDS).last_hidden_state, theirs(IDS).last_hidden_state)
                  for ours, theirs in zip(bundle.text_encoders, _text_encoders(reference_pipe))]
    return [float((a - b).abs().max() / max(1.0, b.abs().max())) for a, b in pairs], effect


@pytest.mark.parametrize("family, config", [
    ("sd1", {}),
    ("sd1", {"alpha_pattern": {"to_k": 1.0, "fc1": 6.0}, "rank_pattern": {"to_v": 2}}),
    ("sd1", {"use_rslora": True}),
    ("sdxl", {}),
])
def test_peft_lora_scales_come_from_its_metadata(family, config, tmp_path):
    pipe_class, pipe = _pipeline(family, tmp_path / "pipe")
    pipe_class.save_lora_weights(tmp_path / "lora", **_add_adapters(pipe, **config))
    lora_file = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    from safetensors import safe_open
    with safe_open(str(lora_file), "pt") as f:
        assert not any(k.endswith("alpha") for k in f.keys())
        assert json.loads(f.metadata()["lora_adapter_metadata"])["unet.lora_alpha"] == config.get("lora_alpha", 8.0)
    _, reference = _pipeline(family, tmp_path / "pipe")
    reference.load_lora_weights(str(lora_file))
    diffs, effect = _compare(tmp_path / "pipe", lora_file, reference)
    assert effect > 1.0
    assert max(diffs) < 1e-4, diffs


def test_kohya_file_with_lora_te1_for_the_only_text_encoder(tmp_path):
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    pipe_class, pipe = _pipeline("sd1", tmp_path / "pipe")
    arguments = _add_adapters(pipe, lora_alpha=4)   # alpha = rank: kohya's .alpha tensors say 4
    state = {f"{part}.{key}": value for part in ("unet", "text_encoder")
             for key, value in arguments[f"{part}_lora_layers"].items()}
    kohya = convert_state_dict_to_kohya(state)
    assert any(k.startswith("lora_te1_") for k in kohya) and not any(k.startswith("lora_te_") for k in kohya)
    lora_file = tmp_path / "kohya.safetensors"
    save_file({k: v.contiguous() for k, v in kohya.items()}, str(lora_file))
    _, reference = _pipeline("sd1", tmp_path / "pipe")
    reference.load_lora_weights(str(lora_file))
    diffs, effect = _compare(tmp_path / "pipe", lora_file, reference)
    assert effect > 1.0
    assert max(diffs) < 1e-4, diffs


def test_a_single_models_adapter_file(tmp_path):
    """`UNet2DConditionModel.save_lora_adapter`: bare module names, the config's fields without a prefix.
    The reference is the model that saved it (diffusers' `load_lora_adapter` leaves this metadata unread and
    scales by 1, though the adapter was made with lora_alpha 8 over rank 4)."""
    _, pipe = _pipeline("sd1", tmp_path / "pipe")
    _add_adapters(pipe)
    pipe.unet.save_lora_adapter(tmp_path / "adapter")
    lora_file = tmp_path / "adapter" / "pytorch_lora_weights.safetensors"
    diffs, effect = _compare(tmp_path / "pipe", lora_file, pipe)
    assert effect > 1.0
    assert diffs[0] < 1e-4, diffs


def test_unusable_peft_metadata_leaves_the_scale_at_one():
    from sdlab.checkpoints.lora import _peft_alpha

    config = {"unet": {"lora_alpha": 8, "r": 4, "alpha_pattern": {"([": 3.0}}}      # not a regular expression
    assert _peft_alpha(config, "unet.down.to_k", 4) == 8.0                           # 8 / 4 * rank 4
    assert _peft_alpha({"unet": {"lora_alpha": 8, "r": 4, "alpha_pattern": {"to_k": "x"}}}, "unet.a.to_k", 4) is None
    assert _peft_alpha({"unet": {"lora_alpha": 8, "rank_pattern": {"to_k": 0}}}, "unet.a.to_k", 4) is None
    assert _peft_alpha({"unet": {"lora_alpha": "8"}}, "unet.a.to_k", 4) is None


def test_peft_dora_file_merges_as_dora(tmp_path):
    """diffusers' training scripts with ``--use_dora`` save ``<module>.lora_magnitude_vector`` beside
    ``lora_A`` / ``lora_B`` ((out,) for a Linear, (1, out, 1, 1) for a conv), which diffusers and peft read
    as DoRA: ``W' = (W + s B A) * m / ||W + s B A||`` per output row. sdlab's merge at 1 gives the U-Net
    (attention, feed-forward, resnet convs) the outputs of diffusers' `load_lora_weights` + `fuse_lora`, and
    the U-Net and the text encoder those of the model that saved the adapter, within 1e-4 of their scale
    (measured ~2e-5); read as a plain LoRA (the magnitudes dropped) they differ by ~1. (diffusers 0.42 with
    transformers 5 leaves the text encoder's magnitudes unloaded, so it is not the text encoder's reference.)"""
    _, pipe = _pipeline("sd1", tmp_path / "pipe")
    arguments = _add_adapters(pipe, use_dora=True)
    assert any(k.endswith("lora_magnitude_vector") and v.ndim == 4 for k, v in arguments["unet_lora_layers"].items())
    assert any(k.endswith("lora_magnitude_vector") for k in arguments["text_encoder_lora_layers"])
    type(pipe).save_lora_weights(tmp_path / "lora", **arguments)
    lora_file = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    _, reference = _pipeline("sd1", tmp_path / "pipe")
    reference.load_lora_weights(str(lora_file))
    reference.fuse_lora(lora_scale=1.0)
    diffs, effect = _compare(tmp_path / "pipe", lora_file, reference)
    assert effect > 1.0
    assert diffs[0] < 1e-4, diffs
    diffs, _ = _compare(tmp_path / "pipe", lora_file, pipe)
    assert max(diffs) < 1e-4, diffs


@pytest.mark.parametrize("weight", [0.5, -0.5])
def test_peft_dora_file_at_a_weight_merges_as_peft_scales_it(tmp_path, weight):
    """At a weight w, peft scales the LoRA product before renormalising to the magnitude (diffusers'
    ``fuse_lora(lora_scale=w)``, ``set_adapters``: ``W' = m * (W + w s B A) / ||W + w s B A||``), where
    A1111 / ComfyUI's DoRA rule for ``dora_scale`` scales the whole change (neither reads
    ``lora_magnitude_vector``). sdlab's merge at w gives the U-Net diffusers' fused outputs and the U-Net and
    text encoder those of the saving model with its layers scaled by w, within 1e-4 of their scale
    (measured ~3e-5); A1111's rule is off by ~1.4 here."""
    from diffusers.utils.peft_utils import scale_lora_layers

    _, pipe = _pipeline("sd1", tmp_path / "pipe")
    type(pipe).save_lora_weights(tmp_path / "lora", **_add_adapters(pipe, use_dora=True))
    lora_file = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    _, reference = _pipeline("sd1", tmp_path / "pipe")
    reference.load_lora_weights(str(lora_file))
    reference.fuse_lora(lora_scale=weight)
    diffs, effect = _compare(tmp_path / "pipe", lora_file, reference, weight)
    assert effect > 1.0
    assert diffs[0] < 1e-4, diffs
    for model in (pipe.unet, pipe.text_encoder):
        scale_lora_layers(model, weight)
    diffs, _ = _compare(tmp_path / "pipe", lora_file, pipe, weight)
    assert max(diffs) < 1e-4, diffs


def test_old_diffusers_attention_processor_file(tmp_path):
    """diffusers <= 0.20 (``train_dreambooth_lora --train_text_encoder``) saved attention-processor names:
    ``unet.<path>.attn1.processor.to_q_lora.down.weight`` and, in the text encoder,
    ``text_encoder.<path>.self_attn.to_q_lora.down.weight`` (to_k / to_v / to_out), which diffusers' loader
    reads as ``q_proj`` / ``k_proj`` / ``v_proj`` / ``out_proj`` (state_dict_utils.py DIFFUSERS_OLD_TO_PEFT).
    sdlab's merge gives the U-Net's and the text encoder's outputs of `load_lora_weights` within 1e-4 of
    their scale (measured ~5e-6); with the text-encoder modules unmatched the text encoder was off by 1.45."""
    from safetensors.torch import save_file

    _, pipe = _pipeline("sd1", tmp_path / "pipe")
    g = torch.Generator().manual_seed(3)
    state = {}
    attention = [(f"unet.{path}.processor", {"to_q": m.to_q, "to_k": m.to_k, "to_v": m.to_v, "to_out": m.to_out[0]})
                 for path, m in pipe.unet.named_modules() if path.endswith((".attn1", ".attn2"))]
    attention += [(f"text_encoder.text_model.{path.removeprefix('text_model.')}",   # transformers 5 drops text_model
                   {"to_q": m.q_proj, "to_k": m.k_proj, "to_v": m.v_proj, "to_out": m.out_proj})
                  for path, m in pipe.text_encoder.named_modules() if path.endswith(".self_attn")]
    for module, projections in attention:
        for name, linear in projections.items():
            out, in_ = linear.weight.shape
            state[f"{module}.{name}_lora.down.weight"] = torch.randn(4, in_, generator=g) * 0.3
            state[f"{module}.{name}_lora.up.weight"] = torch.randn(out, 4, generator=g) * 0.3
    assert "text_encoder.text_model.encoder.layers.0.self_attn.to_out_lora.up.weight" in state
    lora_file = tmp_path / "old.safetensors"
    save_file(state, str(lora_file))
    _, reference = _pipeline("sd1", tmp_path / "pipe")
    reference.load_lora_weights(str(lora_file))
    with torch.no_grad():
        text_effect = (reference.text_encoder(IDS).last_hidden_state - pipe.text_encoder(IDS).last_hidden_state)
    diffs, effect = _compare(tmp_path / "pipe", lora_file, reference)
    assert effect > 1.0 and float(text_effect.abs().max()) > 0.5, (effect, text_effect.abs().max())
    assert max(diffs) < 1e-4, diffs
