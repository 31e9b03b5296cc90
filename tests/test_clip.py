"""sdlab's CLIPTextModel against transformers' CLIPTextModel / CLIPTextModelWithProjection with the same
random weights, on real prompts tokenized by sdlab's tokenizer with SD1 (end token) and OpenCLIP (0) padding;
then the OpenCLIP key conversion (sdlab.checkpoints.openclip) against open_clip's own TextTransformer and an
independent nn.MultiheadAttention reference. Reduced width (128 = 2 heads of 64, 3 layers, MLP 512) keeps
every code path of the real towers; real tower shapes are checked on the meta device (no memory)."""

from __future__ import annotations

import importlib.util
import math
import sys
import types
from pathlib import Path
from unittest import mock

import pytest
import torch
import transformers
from torch import nn

from sdlab.checkpoints.openclip import (
    UnknownKeysError,
    config_from_hf,
    config_from_openclip,
    openclip_to_sdlab,
    sdlab_to_openclip,
)
from sdlab.models.clip import CLIPTextConfig, CLIPTextModel, CLIPTextOutput
from sdlab.models.tokenizer import CLIPTokenizer

WIDTH, HEADS, LAYERS, MLP = 128, 2, 3, 512
PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "",
    "masterpiece, best quality, (detailed eyes:1.2), café 東京 🐱 &amp; friends",
    "a photo of " * 40,                                             # truncated, no padding at all
]
TOL = 1e-4


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """O(1) activations: std 1/sqrt(fan_in) matrices, std 0.5 embeddings, 1 +- 0.1 norm scales, std 0.1 biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() == 0:                                            # logit_scale
                continue
            if p.dim() == 1 and not name.endswith("bias"):              # LayerNorm scale (ln_1, layer_norm1...)
                p.copy_(1 + 0.1 * noise)
            elif p.dim() == 1:
                p.copy_(0.1 * noise)
            elif "embedding" in name:
                p.copy_(0.5 * noise)
            else:
                p.copy_(noise / math.sqrt(p.shape[1]))


def _hf_model(activation: str, projection_dim: int | None, pad_token_id: int, attn: str):
    cfg = transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=WIDTH, intermediate_size=MLP, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, max_position_embeddings=77, hidden_act=activation,
        projection_dim=projection_dim or WIDTH, bos_token_id=49406, eos_token_id=49407, pad_token_id=pad_token_id,
        attn_implementation=attn,
    )
    cls = transformers.CLIPTextModelWithProjection if projection_dim else transformers.CLIPTextModel
    model = cls(cfg).eval()
    _randomize(model, seed=1234)
    return model


def _to_sdlab(hf_model, activation: str, projection_dim: int | None) -> CLIPTextModel:
    cfg = CLIPTextConfig(width=WIDTH, layers=LAYERS, heads=HEADS, mlp_width=MLP, activation=activation,
                         projection_dim=projection_dim)
    model = CLIPTextModel(cfg).eval()
    state = {k.removeprefix("text_model."): v for k, v in hf_model.state_dict().items() if "position_ids" not in k}
    assert ("text_projection.weight" in state) == (projection_dim is not None)
    model.load_state_dict(state, strict=True)                   # same names and shapes, none missing or extra
    assert config_from_hf(state, activation=activation) == cfg
    return model


@pytest.mark.parametrize(
    "activation, projection_dim, pad_token_id, attn",
    [
        ("quick_gelu", None, 49407, "eager"),      # SD1 CLIP-L
        ("quick_gelu", 96, 49407, "sdpa"),         # SDXL CLIP-L with projection (diffusers text_encoder)
        ("gelu", None, 0, "sdpa"),                 # SD2 OpenCLIP-H (in HF layout)
        ("gelu", 96, 0, "eager"),                  # SDXL bigG
    ],
)
def test_matches_transformers(activation, projection_dim, pad_token_id, attn):
    hf = _hf_model(activation, projection_dim, pad_token_id, attn)
    ours = _to_sdlab(hf, activation, projection_dim)
    ids = CLIPTokenizer(pad_token_id=pad_token_id)(PROMPTS)                       # (4, 77)
    with torch.no_grad():
        ref = hf(input_ids=ids, output_hidden_states=True)
        out = ours(ids)
    assert isinstance(out, CLIPTextOutput)
    assert len(out.hidden_states) == len(ref.hidden_states) == LAYERS + 1
    errors = {f"hidden_states[{i}]": (a - b).abs().max().item()
              for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states))}
    errors["last_hidden_state"] = (out.last_hidden_state - ref.last_hidden_state).abs().max().item()
    ref_pooled = ref.text_embeds if projection_dim else ref.pooler_output
    assert out.pooled.shape == (len(PROMPTS), projection_dim or WIDTH)
    errors["pooled"] = (out.pooled - ref_pooled).abs().max().item()
    print(f"max abs error {activation} proj={projection_dim} pad={pad_token_id} {attn}: {max(errors.values()):.2e}")
    assert max(errors.values()) < TOL, errors
    assert out.last_hidden_state.abs().max() > 0.5                                 # outputs are not trivially small


def test_stop_after_layer_matches_full_run():
    torch.manual_seed(0)
    cfg = CLIPTextConfig(width=WIDTH, layers=LAYERS, heads=HEADS, mlp_width=MLP, activation="gelu", projection_dim=64)
    model = CLIPTextModel(cfg).eval()
    _randomize(model, seed=7)
    ids = CLIPTokenizer(pad_token_id=0)(PROMPTS)
    with torch.no_grad():
        full = model(ids)
        short = model(ids, num_layers=LAYERS - 1)                                  # SD2 / clip skip 2
    assert full.pooled is not None and short.pooled is None
    assert len(short.hidden_states) == LAYERS
    for a, b in zip(short.hidden_states, full.hidden_states):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(short.last_hidden_state, model.final_layer_norm(full.hidden_states[-2]))
    with pytest.raises(ValueError):
        model(ids, num_layers=LAYERS + 1)


def test_pooling_uses_first_eos_then_argmax():
    cfg = CLIPTextConfig(width=WIDTH, layers=1, heads=HEADS, mlp_width=MLP)
    model = CLIPTextModel(cfg).eval()
    ids = torch.tensor([[49406, 320, 49407, 49407, 49407], [5, 320, 900, 322, 500]])   # second row: no eos
    with torch.no_grad():
        out = model(ids)
    torch.testing.assert_close(out.pooled[0], out.last_hidden_state[0, 2])
    torch.testing.assert_close(out.pooled[1], out.last_hidden_state[1, 2])            # argmax of the ids


def test_rejects_too_many_tokens_and_bad_config():
    model = CLIPTextModel(CLIPTextConfig(width=WIDTH, layers=1, heads=HEADS, mlp_width=MLP, max_positions=8))
    with pytest.raises(ValueError, match="positions"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="activation"):
        CLIPTextModel(CLIPTextConfig(width=WIDTH, layers=1, heads=HEADS, mlp_width=MLP, activation="relu6"))


def test_bfloat16_close_to_float32():
    cfg = CLIPTextConfig(width=WIDTH, layers=LAYERS, heads=HEADS, mlp_width=MLP, projection_dim=64)
    model = CLIPTextModel(cfg).eval()
    _randomize(model, seed=3)
    ids = CLIPTokenizer()(PROMPTS[:2])
    with torch.no_grad():
        ref = model(ids).last_hidden_state
        low = model.to(torch.bfloat16)(ids)
    assert low.last_hidden_state.dtype == torch.bfloat16 and low.pooled.dtype == torch.bfloat16
    assert (low.last_hidden_state.float() - ref).abs().max() < 0.25


# ---------------------------------------------------------------------------------------------------------
# OpenCLIP towers (SD2 ViT-H, SDXL bigG): key conversion and numerical parity with OpenCLIP's own code

PROJ = 96


def _load_open_clip_transformer_module():
    """open_clip/transformer.py by file path. Its sibling utils.py imports torchvision (absent here) for a
    vision-only class, so a stand-in torchvision is visible only while the three modules execute."""
    spec = importlib.util.find_spec("open_clip")
    assert spec is not None and spec.submodule_search_locations, "open_clip_torch must be installed for tests"
    folder = Path(spec.submodule_search_locations[0])
    package = types.ModuleType("_open_clip_reference")
    package.__path__ = [str(folder)]
    misc = types.ModuleType("torchvision.ops.misc")
    misc.FrozenBatchNorm2d = type("FrozenBatchNorm2d", (nn.Module,), {})
    stand_ins = {"_open_clip_reference": package, "torchvision": types.ModuleType("torchvision"),
                 "torchvision.ops": types.ModuleType("torchvision.ops"), "torchvision.ops.misc": misc}
    with mock.patch.dict(sys.modules, stand_ins):
        for name in ("utils", "pos_embed", "transformer"):
            module_spec = importlib.util.spec_from_file_location(f"_open_clip_reference.{name}", folder / f"{name}.py")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_spec.name] = module
            module_spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def open_clip_text_tower():
    """open_clip's TextTransformer as SD2 / SDXL build it (GELU, causal mask, argmax pooling, projection)."""
    transformer = _load_open_clip_transformer_module()
    torch.manual_seed(0)
    tower = transformer.TextTransformer(context_length=77, vocab_size=49408, width=WIDTH, heads=HEADS, layers=LAYERS,
                                        mlp_ratio=MLP / WIDTH, output_dim=PROJ, act_layer=nn.GELU).eval()
    _randomize(tower, seed=99)
    return tower


class _MHATextTower(nn.Module):
    """Independent reference written from OpenCLIP's layout: torch.nn.MultiheadAttention (fused in_proj),
    ResidualAttentionBlock = x + attn(ln_1(x)); x + mlp(ln_2(x)), argmax pooling, x @ text_projection."""

    def __init__(self):
        super().__init__()
        self.token_embedding = nn.Embedding(49408, WIDTH)
        self.positional_embedding = nn.Parameter(torch.empty(77, WIDTH))
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList()
        for _ in range(LAYERS):
            block = nn.Module()
            block.ln_1, block.ln_2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
            block.attn = nn.MultiheadAttention(WIDTH, HEADS, batch_first=True)
            block.mlp = nn.Sequential()
            block.mlp.add_module("c_fc", nn.Linear(WIDTH, MLP))
            block.mlp.add_module("gelu", nn.GELU())
            block.mlp.add_module("c_proj", nn.Linear(MLP, WIDTH))
            self.transformer.resblocks.append(block)
        self.ln_final = nn.LayerNorm(WIDTH)
        self.text_projection = nn.Parameter(torch.empty(WIDTH, PROJ))
        self.logit_scale = nn.Parameter(torch.tensor(4.6052))

    def forward(self, ids):
        T = ids.shape[1]
        mask = torch.full((T, T), float("-inf")).triu(1)
        x = self.token_embedding(ids) + self.positional_embedding[:T]
        states = [x]
        for block in self.transformer.resblocks:
            h = block.ln_1(x)
            x = x + block.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
            x = x + block.mlp(block.ln_2(x))
            states.append(x)
        x = self.ln_final(x)
        pooled = x[torch.arange(ids.shape[0]), ids.argmax(dim=-1)] @ self.text_projection
        return states, x, pooled


def _sdlab_from_openclip(state) -> CLIPTextModel:
    cfg = config_from_openclip(state)
    model = CLIPTextModel(cfg).eval()
    model.load_state_dict(openclip_to_sdlab(state), strict=True)
    return model


def test_openclip_config_inference(open_clip_text_tower):
    state = open_clip_text_tower.state_dict()
    cfg = config_from_openclip(state)
    assert cfg == CLIPTextConfig(width=WIDTH, layers=LAYERS, heads=HEADS, mlp_width=MLP, activation="gelu",
                                 projection_dim=PROJ)
    assert config_from_hf(openclip_to_sdlab(state), activation="gelu") == cfg
    assert config_from_hf(openclip_to_sdlab(state)).activation == "quick_gelu"


def test_openclip_round_trip_is_bit_identical(open_clip_text_tower):
    state = dict(open_clip_text_tower.state_dict())
    assert "text_projection" in state and "transformer.resblocks.0.attn.in_proj_weight" in state
    ours = openclip_to_sdlab({**state, "logit_scale": torch.tensor(4.6), "attn_mask": torch.zeros(77, 77)})
    assert set(ours) == set(CLIPTextModel(config_from_openclip(state)).state_dict())   # key-complete
    assert ours["text_projection.weight"].shape == (PROJ, WIDTH)
    back = sdlab_to_openclip({**ours, "embeddings.position_ids": torch.arange(77)[None]})
    assert set(back) == set(state)
    for key, value in state.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key


def test_openclip_unknown_keys_are_reported(open_clip_text_tower, caplog):
    state = dict(open_clip_text_tower.state_dict())
    extra = {**state, "visual.proj": torch.zeros(1), "transformer.resblocks.0.attn.q_norm.weight": torch.zeros(1)}
    with pytest.raises(UnknownKeysError) as info:
        openclip_to_sdlab(extra)
    assert info.value.keys == ["transformer.resblocks.0.attn.q_norm.weight", "visual.proj"]
    assert set(openclip_to_sdlab(extra, ignore_unknown=True)) == set(openclip_to_sdlab(state))
    assert "visual.proj" in caplog.text
    ours = openclip_to_sdlab(state)
    with pytest.raises(UnknownKeysError, match="encoder.layers.0.foo"):
        sdlab_to_openclip({**ours, "encoder.layers.0.foo": torch.zeros(1)})
    del ours["encoder.layers.1.self_attn.k_proj.bias"]
    with pytest.raises(KeyError, match="k_proj.bias"):
        sdlab_to_openclip(ours)


@pytest.mark.parametrize("pad_token_id", [0, 49407])
def test_matches_open_clip_text_transformer(open_clip_text_tower, pad_token_id):
    """sdlab (after conversion) vs open_clip's own TextTransformer: every block output, final tokens, pooled."""
    ours = _sdlab_from_openclip(open_clip_text_tower.state_dict())
    ids = CLIPTokenizer(pad_token_id=pad_token_id)(PROMPTS)                      # (4, 77)
    with torch.no_grad():
        ref = open_clip_text_tower.forward_intermediates(ids, indices=None, output_fmt="NLC")
        open_clip_text_tower.output_tokens = True
        ref_pooled, ref_tokens = open_clip_text_tower(ids)
        open_clip_text_tower.output_tokens = False
        out = ours(ids)
    errors = [(a - b).abs().max().item() for a, b in zip(out.hidden_states[1:], ref["text_intermediates"])]
    assert len(errors) == LAYERS
    errors += [(out.last_hidden_state - ref_tokens).abs().max().item(), (out.pooled - ref_pooled).abs().max().item()]
    print(f"max abs error vs open_clip TextTransformer (pad {pad_token_id}): {max(errors):.2e}")
    assert max(errors) < 1e-5, errors


def test_matches_multihead_attention_reference():
    """sdlab (after conversion) vs a reference built on torch.nn.MultiheadAttention with OpenCLIP names."""
    ref_model = _MHATextTower().eval()
    _randomize(ref_model, seed=5)
    state = ref_model.state_dict()
    assert "logit_scale" in state
    ours = _sdlab_from_openclip(state)
    ids = CLIPTokenizer(pad_token_id=0)(PROMPTS)
    with torch.no_grad():
        states, tokens, pooled = ref_model(ids)
        out = ours(ids)
    errors = [(a - b).abs().max().item() for a, b in zip(out.hidden_states, states)]
    errors += [(out.last_hidden_state - tokens).abs().max().item(), (out.pooled - pooled).abs().max().item()]
    print(f"max abs error vs nn.MultiheadAttention reference: {max(errors):.2e}")
    assert len(out.hidden_states) == len(states) == LAYERS + 1
    assert max(errors) < 1e-5, errors


def _meta_openclip_state(width: int, layers: int, projection: int) -> dict[str, torch.Tensor]:
    """An OpenCLIP text-tower state dict with real shapes on the meta device, as in SD2 / SDXL files."""
    def t(*shape):
        return torch.empty(*shape, device="meta")
    state = {"token_embedding.weight": t(49408, width), "positional_embedding": t(77, width),
             "ln_final.weight": t(width), "ln_final.bias": t(width), "text_projection": t(width, projection),
             "logit_scale": t(())}
    for i in range(layers):
        p = f"transformer.resblocks.{i}."
        state |= {p + "ln_1.weight": t(width), p + "ln_1.bias": t(width), p + "ln_2.weight": t(width),
                  p + "ln_2.bias": t(width), p + "attn.in_proj_weight": t(3 * width, width),
                  p + "attn.in_proj_bias": t(3 * width), p + "attn.out_proj.weight": t(width, width),
                  p + "attn.out_proj.bias": t(width), p + "mlp.c_fc.weight": t(4 * width, width),
                  p + "mlp.c_fc.bias": t(4 * width), p + "mlp.c_proj.weight": t(width, 4 * width),
                  p + "mlp.c_proj.bias": t(width)}
    return state


@pytest.mark.parametrize(
    "width, layers, heads, projection",
    [(1024, 24, 16, 1024), (1280, 32, 20, 1280)],                   # SD2 OpenCLIP ViT-H/14, SDXL bigG/14
)
def test_real_openclip_shapes_load_strictly(width, layers, heads, projection):
    state = _meta_openclip_state(width, layers, projection)
    cfg = config_from_openclip(state)
    assert cfg == CLIPTextConfig(width=width, layers=layers, heads=heads, mlp_width=4 * width, activation="gelu",
                                 projection_dim=projection)
    with torch.device("meta"):
        model = CLIPTextModel(cfg)
    model.load_state_dict(openclip_to_sdlab(state), strict=True, assign=True)
    assert model.text_projection.weight.shape == (projection, width)


@pytest.mark.slow
def test_full_size_clip_l_matches_transformers():
    """Real CLIP ViT-L/14 text shapes (SD1): 12 layers of width 768, random weights, against transformers."""
    cfg = transformers.CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                      num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                                      bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
                                      attn_implementation="eager")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, cfg.vocab_size) == (768, 12, 3072, 49408)
    hf = transformers.CLIPTextModel(cfg).eval()
    _randomize(hf, seed=11)
    state = {k.removeprefix("text_model."): v for k, v in hf.state_dict().items() if "position_ids" not in k}
    ours = CLIPTextModel(config_from_hf(state)).eval()
    assert ours.cfg == CLIPTextConfig()                                           # the SD1 defaults
    ours.load_state_dict(state, strict=True)
    ids = CLIPTokenizer()(PROMPTS)
    with torch.no_grad():
        ref = hf(input_ids=ids, output_hidden_states=True)
        out = ours(ids)
    errors = [(a - b).abs().max().item() for a, b in zip(out.hidden_states, ref.hidden_states)]
    errors += [(out.last_hidden_state - ref.last_hidden_state).abs().max().item(),
               (out.pooled - ref.pooler_output).abs().max().item()]
    print(f"max abs error full-size CLIP-L: {max(errors):.2e}")
    assert max(errors) < TOL, errors
