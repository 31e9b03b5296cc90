"""LyCORIS module kinds (LoCon with a Tucker core, LoHa, LoKr, (IA)^3, full diff, DoRA) and the diffusers /
peft key layouts (LCM-LoRA's) merged by sdlab as A1111 / ComfyUI / peft merge them.

- Each kind, written as a kohya-named file and merged with `apply_lora` into a reduced-width SD1 model,
  changes the targeted Linear / 3x3 Conv2d / text-encoder layer by the formula written out here.
- peft's LoHa / LoKr / DoRA layers (random weights, `merge_and_unload`) give the weights sdlab's merge gives
  for the same tensors, on a Linear and a Conv2d.
- A LoRA in diffusers / peft layout (``unet.<path>.lora_A.weight``, as LCM-LoRA is published), loaded by
  diffusers' `load_lora_weights` and fused, gives the U-Net and text-encoder weights sdlab merges.
- Incomplete or mismatched modules are one `CheckpointError` naming the file; nothing is changed.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from bundle_fixtures import tiny_bundle
from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.lora import apply_lora, load_lora_file, lora_layer_tables, lora_merges, merged_layers
from sdlab.checkpoints.lycoris import merged_weight
from sdlab.pipeline.prompt_loras import with_dynamic_rank

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TO_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"                     # 3x3 conv
TE_Q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


def _layers(bundle) -> dict[str, nn.Module]:
    unet = bundle.unet
    return {TO_Q: unet.input_blocks[1][1].transformer_blocks[0].attn1.to_q,
            CONV: unet.input_blocks[1][0].in_layers[2],
            TE_Q: bundle.text_encoders[0].model.encoder.layers[0].self_attn.q_proj}


def _rand(*shape, g) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * 0.3


def _write(path, modules: dict[str, dict[str, torch.Tensor]]):
    save_file({f"{name}.{field}": t.contiguous() for name, m in modules.items() for field, t in m.items()}, str(path))
    return path


def _check_merge(tmp_path, modules, expected_delta, multiplier=0.7):
    """apply_lora of `modules` changes each layer by multiplier * expected_delta(name, W)."""
    bundle = tiny_bundle("sd1")
    layers = _layers(bundle)
    before = {name: layers[name].weight.detach().clone() for name in modules}
    assert apply_lora(bundle, _write(tmp_path / "l.safetensors", modules), multiplier) == len(modules)
    for name in modules:
        want = before[name] + multiplier * expected_delta(name, before[name])
        torch.testing.assert_close(layers[name].weight, want, atol=1e-5, rtol=1e-5)


def test_locon_with_tucker_core(tmp_path):
    g = torch.Generator().manual_seed(0)
    W = _layers(tiny_bundle("sd1"))[CONV].weight
    out, cin, kh, kw = W.shape
    r = 3
    up, mid, down = _rand(out, r, 1, 1, g=g), _rand(r, r, kh, kw, g=g), _rand(r, cin, 1, 1, g=g)
    mods = {CONV: {"lora_up.weight": up, "lora_mid.weight": mid, "lora_down.weight": down, "alpha": torch.tensor(1.5)},
            TO_Q: {"lora_up.weight": _rand(32, r, g=g), "lora_down.weight": _rand(r, 32, g=g), "alpha": torch.tensor(6.0)}}

    def delta(name, w):
        m = mods[name]
        if name == CONV:   # dW[o, i, k, l] = sum_{a, b} up[o, a] mid[a, b, k, l] down[b, i]
            full = torch.zeros_like(w)
            for a in range(r):
                for b in range(r):
                    full += up[:, a, 0, 0][:, None, None, None] * mid[a, b][None, None] * down[b, :, 0, 0][None, :, None, None]
            return full * 1.5 / r
        return m["lora_up.weight"] @ m["lora_down.weight"] * 6.0 / r

    _check_merge(tmp_path, mods, delta)


def test_loha_linear_conv_and_text_encoder(tmp_path):
    g = torch.Generator().manual_seed(1)
    out, cin, kh, kw = _layers(tiny_bundle("sd1"))[CONV].weight.shape
    r = 2
    mods = {
        TO_Q: {"hada_w1_a": _rand(32, r, g=g), "hada_w1_b": _rand(r, 32, g=g), "hada_w2_a": _rand(32, r, g=g),
               "hada_w2_b": _rand(r, 32, g=g), "alpha": torch.tensor(1.0)},
        CONV: {"hada_w1_a": _rand(out, r, g=g), "hada_w1_b": _rand(r, cin * kh * kw, g=g),
               "hada_w2_a": _rand(out, r, g=g), "hada_w2_b": _rand(r, cin * kh * kw, g=g)},      # no alpha: scale 1
        TE_Q: {"hada_w1_a": _rand(64, r, g=g), "hada_w1_b": _rand(r, 64, g=g), "hada_w2_a": _rand(64, r, g=g),
               "hada_w2_b": _rand(r, 64, g=g), "alpha": torch.tensor(4.0)},
    }

    def delta(name, w):
        m = mods[name]
        scale = float(m["alpha"]) / r if "alpha" in m else 1.0
        return ((m["hada_w1_a"] @ m["hada_w1_b"]) * (m["hada_w2_a"] @ m["hada_w2_b"])).reshape(w.shape) * scale

    _check_merge(tmp_path, mods, delta)


def test_loha_tucker_conv(tmp_path):
    g = torch.Generator().manual_seed(2)
    out, cin, kh, kw = _layers(tiny_bundle("sd1"))[CONV].weight.shape
    r = 2
    m = {"hada_t1": _rand(r, r, kh, kw, g=g), "hada_w1_a": _rand(r, out, g=g), "hada_w1_b": _rand(r, cin, g=g),
         "hada_t2": _rand(r, r, kh, kw, g=g), "hada_w2_a": _rand(r, out, g=g), "hada_w2_b": _rand(r, cin, g=g),
         "alpha": torch.tensor(1.0)}

    def rebuild(t, wa, wb):     # W[p, q, k, l] = sum_{i, j} t[i, j, k, l] wa[i, p] wb[j, q]
        return (t[:, :, None, None] * wa[:, None, :, None, None, None] * wb[None, :, None, :, None, None]).sum((0, 1))

    def delta(name, w):
        return rebuild(m["hada_t1"], m["hada_w1_a"], m["hada_w1_b"]) * rebuild(m["hada_t2"], m["hada_w2_a"], m["hada_w2_b"]) * 0.5

    _check_merge(tmp_path, {CONV: m}, delta)


def test_lokr_full_and_decomposed(tmp_path):
    g = torch.Generator().manual_seed(3)
    out, cin, kh, kw = _layers(tiny_bundle("sd1"))[CONV].weight.shape
    mods = {
        # both factors full: no alpha scaling even with an alpha in the file
        TO_Q: {"lokr_w1": _rand(4, 2, g=g), "lokr_w2": _rand(8, 16, g=g), "alpha": torch.tensor(3.0)},
        # w2 decomposed (rank 2): alpha / 2
        CONV: {"lokr_w1": _rand(2, 4, g=g), "lokr_w2_a": _rand(out // 2, 2, g=g),
               "lokr_w2_b": _rand(2, (cin // 4) * kh * kw, g=g), "alpha": torch.tensor(3.0)},
        # w1 decomposed (rank 1): alpha / 1
        TE_Q: {"lokr_w1_a": _rand(8, 1, g=g), "lokr_w1_b": _rand(1, 8, g=g), "lokr_w2": _rand(8, 8, g=g),
               "alpha": torch.tensor(0.5)},
    }

    def delta(name, w):
        m = mods[name]
        if name == TO_Q:
            return torch.kron(m["lokr_w1"], m["lokr_w2"])
        if name == CONV:
            w2 = (m["lokr_w2_a"] @ m["lokr_w2_b"]).reshape(out // 2, cin // 4, kh, kw)
            return torch.kron(m["lokr_w1"][:, :, None, None], w2) * 1.5
        return torch.kron(m["lokr_w1_a"] @ m["lokr_w1_b"], m["lokr_w2"]) * 0.5

    _check_merge(tmp_path, mods, delta)


def test_ia3_full_diff_and_bias(tmp_path):
    g = torch.Generator().manual_seed(4)
    bundle = tiny_bundle("sd1")
    out, cin, kh, kw = _layers(bundle)[CONV].weight.shape
    mods = {TO_Q: {"weight": _rand(32, g=g), "on_input": torch.tensor(True)},
            TE_Q: {"weight": _rand(64, g=g), "on_input": torch.tensor(False)},
            CONV: {"diff": _rand(out, cin, kh, kw, g=g), "diff_b": _rand(out, g=g)}}

    def delta(name, w):
        m = mods[name]
        if name == TO_Q:
            return w * m["weight"][None, :]           # scales input columns
        if name == TE_Q:
            return w * m["weight"][:, None]           # scales output rows
        return m["diff"]

    bias_before = _layers(bundle)[CONV].bias.detach().clone()
    _check_merge(tmp_path, mods, delta, multiplier=0.5)
    b2 = tiny_bundle("sd1")
    apply_lora(b2, tmp_path / "l.safetensors", 0.5)
    torch.testing.assert_close(_layers(b2)[CONV].bias, bias_before + 0.5 * mods[CONV]["diff_b"])


@pytest.mark.parametrize("axis", ["output", "input"])
def test_dora_scale(tmp_path, axis):
    g = torch.Generator().manual_seed(5)
    r = 2
    up, down = _rand(32, r, g=g), _rand(r, 32, g=g)
    dora = torch.rand(32, 1, generator=g) + 0.5 if axis == "output" else torch.rand(1, 32, generator=g) + 0.5
    mods = {TO_Q: {"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(1.0), "dora_scale": dora}}

    def delta(name, w):
        merged = w + up @ down * 0.5
        norm = merged.norm(dim=1, keepdim=True) if axis == "output" else merged.norm(dim=0, keepdim=True)
        return merged * dora / norm - w

    _check_merge(tmp_path, mods, delta, multiplier=0.8)


@pytest.mark.parametrize("dyn", [0, 1])
def test_dora_scale_at_a_dynamic_rank(dyn):
    """``<lora:...:dyn=N>`` on a DoRA module as A1111 merges it: ``rebuild_conventional`` cuts the product to
    ``up[:, :N] @ down[:N]``, scaled by alpha over the *full* rank, then `apply_weight_decompose` renormalises
    ``W + dW`` (at N = 0: W itself, the module still rescales the layer's rows)."""
    g = torch.Generator().manual_seed(6)
    r, alpha, multiplier = 3, 2.0, 0.7
    w, up, down = _rand(32, 24, g=g), _rand(32, r, g=g), _rand(r, 24, g=g)
    dora = torch.rand(32, 1, generator=g) + 0.5
    module = {"up": up, "down": down, "alpha": torch.tensor(alpha), "dora_scale": dora}
    merged = w + up[:, :dyn] @ down[:dyn] * (alpha / r)
    expected = w + multiplier * (merged * dora / merged.norm(dim=1, keepdim=True) - w)
    cut = with_dynamic_rank({"m": module}, dyn)["m"]
    torch.testing.assert_close(merged_weight(cut, w, multiplier)[0], expected)
    assert not torch.allclose(expected, w)


# --- peft as the reference for the math -------------------------------------------------------------


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(48, 64)
        self.conv = nn.Conv2d(16, 32, 3, padding=1)


def _peft_merge(config):
    """(base weights, merged weights, the adapter's tensors by layer and peft's field name)."""
    import peft
    torch.manual_seed(0)
    net = _Net()
    base = {name: getattr(net, name).weight.detach().clone() for name in ("lin", "conv")}
    model = peft.get_peft_model(net, config)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    tensors: dict[str, dict[str, torch.Tensor]] = {"lin": {}, "conv": {}}
    for key, value in model.state_dict().items():
        parts = key.split(".")
        layer = next((p for p in parts if p in tensors), None)
        field = next((p for p in parts if p.startswith(("hada_", "lokr_", "lora_A", "lora_B", "lora_magnitude"))), None)
        if layer and field:
            tensors[layer][field] = value.detach().clone()
    merged_net = model.merge_and_unload()
    merged = {name: getattr(merged_net, name).weight.detach().clone() for name in ("lin", "conv")}
    return base, merged, tensors


def _sdlab_merge(base, modules):
    layers = {}
    for name, w in base.items():
        layer = nn.Linear(1, 1) if w.ndim == 2 else nn.Conv2d(1, 1, 1)
        layer.weight = nn.Parameter(w.clone())
        layers[f"lora_unet_{name}"] = layer
    merges, unmatched = lora_merges(layers, {f"lora_unet_{k}": v for k, v in modules.items()}, 1.0)
    assert unmatched == []
    weights = {layer: weight for layer, weight, _ in merged_layers(merges)}
    return {name[len("lora_unet_"):]: weights[layer] for name, layer in layers.items()}


@pytest.mark.parametrize("tucker", [False, True])
def test_loha_matches_peft(tucker):
    import peft
    config = peft.LoHaConfig(r=4, alpha=6, target_modules=["lin", "conv"], use_effective_conv2d=tucker, init_weights=False)
    base, merged, tensors = _peft_merge(config)
    modules = {name: {**t, "alpha": torch.tensor(6.0)} for name, t in tensors.items()}
    ours = _sdlab_merge(base, modules)
    for name in base:
        torch.testing.assert_close(ours[name], merged[name], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tucker", [False, True])
def test_lokr_matches_peft(tucker):
    import peft
    config = peft.LoKrConfig(r=2, alpha=3, target_modules=["lin", "conv"], use_effective_conv2d=tucker, init_weights=False)
    base, merged, tensors = _peft_merge(config)
    assert "lokr_w2_a" in tensors["lin"] and "lokr_w1" in tensors["lin"]   # the case where alpha / r applies
    modules = {name: {**t, "alpha": torch.tensor(3.0)} for name, t in tensors.items()}
    ours = _sdlab_merge(base, modules)
    for name in base:
        torch.testing.assert_close(ours[name], merged[name], atol=1e-5, rtol=1e-5)


def test_dora_matches_peft():
    import peft
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lin"], use_dora=True, init_lora_weights=False)
    base, merged, tensors = _peft_merge(config)
    t = tensors["lin"]
    module = {"down": t["lora_A"], "up": t["lora_B"], "alpha": torch.tensor(8.0),
              "dora_scale": t["lora_magnitude_vector"].reshape(-1, 1)}       # LyCORIS' per-output layout
    ours = merged_weight(module, base["lin"], 1.0)[0]
    torch.testing.assert_close(ours, merged["lin"], atol=1e-5, rtol=1e-5)


# --- diffusers / peft layout (LCM-LoRA) ---------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_peft_layout_lora_matches_diffusers_fuse(tmp_path, monkeypatch, family):
    """A LoRA saved by diffusers' `save_lora_weights` from peft adapters (the layout LCM-LoRA is published
    in: ``unet.<diffusers path>.lora_A.weight``, ``text_encoder(_2).<HF path>.lora_B.weight``) merges into the
    weights diffusers' `load_lora_weights` + `fuse_lora` give (SD1, and SDXL with both text encoders)."""
    import peft  # noqa: F401
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from bundle_fixtures import write_diffusers_folder
    from sdlab.checkpoints.diffusers_unet import unet_key_map

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    extra = {} if family == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    bundle = tiny_bundle(family)
    folder = write_diffusers_folder(bundle, tmp_path / "model")
    pipe = cls.from_pretrained(str(folder), **extra)
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    for encoder in encoders:
        encoder.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj", "fc1"], init_lora_weights=False))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for model in (pipe.unet, *encoders):
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    layers = {"unet_lora_layers": get_peft_model_state_dict(pipe.unet),
              "text_encoder_lora_layers": get_peft_model_state_dict(pipe.text_encoder)}
    if family == "sdxl":
        layers["text_encoder_2_lora_layers"] = get_peft_model_state_dict(pipe.text_encoder_2)
    cls.save_lora_weights(tmp_path / "lcm", **layers, safe_serialization=True)
    lora_file = tmp_path / "lcm" / "pytorch_lora_weights.safetensors"
    keys = list(load_lora_file(lora_file))
    assert any(k.startswith("lora_unet_down_blocks_") for k in keys) and any(k.startswith("lora_te_") for k in keys)

    ref = cls.from_pretrained(str(folder), **extra)
    ref.load_lora_weights(str(lora_file))
    ref.fuse_lora(lora_scale=0.6)
    ref_unet = {k.replace(".base_layer", ""): v for k, v in ref.unet.state_dict().items() if "lora" not in k}

    changed = apply_lora(bundle, lora_file, 0.6)
    assert changed == len(keys)
    ours = bundle.unet.state_dict()
    compared = 0
    for ldm, hf in unet_key_map(bundle.unet_config).items():
        if hf in ref_unet and ldm in ours and ref_unet[hf].shape == ours[ldm].shape:
            torch.testing.assert_close(ours[ldm], ref_unet[hf].reshape(ours[ldm].shape), atol=1e-5, rtol=1e-5)
            compared += 1
    assert compared > 20
    ref_encoders = [ref.text_encoder] + ([ref.text_encoder_2] if family == "sdxl" else [])
    for ours_te, ref_te in zip(bundle.text_encoders, ref_encoders):
        want = {k.replace(".base_layer", "").removeprefix("text_model."): v     # transformers 5: no text_model level
                for k, v in ref_te.state_dict().items() if "lora" not in k}
        layer = ours_te.model.encoder.layers[0]
        torch.testing.assert_close(layer.self_attn.q_proj.weight, want["encoder.layers.0.self_attn.q_proj.weight"],
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.mlp.fc1.weight, want["encoder.layers.0.mlp.fc1.weight"], atol=1e-5, rtol=1e-5)


def test_attention_processor_names_map_to_layers(tmp_path):
    """diffusers' older ``unet.<...>.attn1.processor.to_q_lora.down.weight`` and bare ``<path>.lora.up.weight``
    names reach the same layers as kohya's."""
    bundle = tiny_bundle("sd1")
    layer = _layers(bundle)[TO_Q]
    out_layer = bundle.unet.input_blocks[1][1].transformer_blocks[0].attn1.to_out[0]
    before, out_before = layer.weight.detach().clone(), out_layer.weight.detach().clone()
    g = torch.Generator().manual_seed(8)
    down, up, down2, up2 = _rand(2, 32, g=g), _rand(32, 2, g=g), _rand(2, 32, g=g), _rand(32, 2, g=g)
    base = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor."
    save_file({base + "to_q_lora.down.weight": down, base + "to_q_lora.up.weight": up,
               base + "to_out_lora.down.weight": down2, base + "to_out_lora.up.weight": up2},
              str(tmp_path / "procs.safetensors"))
    assert apply_lora(bundle, tmp_path / "procs.safetensors", 1.0) == 2
    torch.testing.assert_close(layer.weight, before + up @ down)
    torch.testing.assert_close(out_layer.weight, out_before + up2 @ down2)


@pytest.mark.parametrize("module, message", [
    ({"hada_w1_a": torch.ones(32, 2), "hada_w1_b": torch.ones(2, 32), "hada_w2_a": torch.ones(32, 2)}, "hada_w2_b"),
    ({"lokr_w1_a": torch.ones(4, 1), "lokr_w2": torch.ones(8, 16)}, "lokr_w1_b"),
    ({"lora_down.weight": torch.ones(2, 32), "hada_w1_a": torch.ones(32, 2)}, "not one"),
])
def test_incomplete_modules_are_one_error(tmp_path, module, message):
    path = _write(tmp_path / "bad.safetensors", {TO_Q: module})
    with pytest.raises(CheckpointError, match=message):
        load_lora_file(path)


def test_mismatched_module_changes_nothing(tmp_path):
    bundle = tiny_bundle("sd1")
    layers = _layers(bundle)
    before = {n: layers[n].weight.detach().clone() for n in layers}
    g = torch.Generator().manual_seed(9)
    path = _write(tmp_path / "mismatch.safetensors", {
        TE_Q: {"lokr_w1": _rand(8, 8, g=g), "lokr_w2": _rand(8, 8, g=g)},                # fits (64, 64)
        TO_Q: {"hada_w1_a": _rand(48, 2, g=g), "hada_w1_b": _rand(2, 32, g=g),            # 48 rows: does not fit
               "hada_w2_a": _rand(48, 2, g=g), "hada_w2_b": _rand(2, 32, g=g)}})
    with pytest.raises(CheckpointError, match="mismatch.safetensors.*do not fit"):
        apply_lora(bundle, path)
    for name, layer in layers.items():
        assert torch.equal(layer.weight, before[name])


def test_sdxl_lokr_on_both_text_encoders(tmp_path):
    bundle = tiny_bundle("sdxl")
    unet_layers, text_layers = lora_layer_tables(bundle)
    te1 = "lora_te1_text_model_encoder_layers_0_mlp_fc1"
    te2 = "lora_te2_text_model_encoder_layers_0_mlp_fc1"
    shapes = {n: text_layers[n].weight.shape for n in (te1, te2)}
    g = torch.Generator().manual_seed(10)
    mods = {n: {"lokr_w1": _rand(2, 1, g=g), "lokr_w2": _rand(s[0] // 2, s[1], g=g)} for n, s in shapes.items()}
    before = {n: text_layers[n].weight.detach().clone() for n in mods}
    assert apply_lora(bundle, _write(tmp_path / "xl.safetensors", mods), 1.0) == 2
    for n, m in mods.items():
        torch.testing.assert_close(text_layers[n].weight, before[n] + torch.kron(m["lokr_w1"], m["lokr_w2"]))


# --- LyCORIS itself as the reference: its files, its merge ----------------------------------------------


@pytest.mark.parametrize("algo, options", [
    ("locon", {}), ("locon", {"use_tucker": True}), ("locon", {"weight_decompose": True}),
    ("loha", {}), ("loha", {"use_tucker": True}), ("loha", {"weight_decompose": True, "wd_on_out": False}),
    ("lokr", {}), ("lokr", {"decompose_both": True, "factor": 4}), ("lokr", {"use_tucker": True}),
    ("lokr", {"weight_decompose": True}), ("lokr", {"full_matrix": True}),
    ("loha", {"use_tucker": True, "weight_decompose": True}),
    ("ia3", {}), ("full", {}), ("glora", {}), ("glora", {"weight_decompose": True}),
])
def test_lycoris_files_merge_as_lycoris_draws_them(tmp_path, algo, options):
    """A file written by the LyCORIS library (`LycorisNetwork.save_weights`, random weights) merged by sdlab
    gives a Linear and a 3x3 Conv2d the outputs LyCORIS's own modules give (its forward: the semantics a
    file was trained with; its `merge_to` applies alpha / rank twice for LoHa and decomposed LoKr in
    lycoris-lora 4.1.3, where A1111 and ComfyUI apply it once, as the forward does). DoRA at multiplier 1:
    LyCORIS scales the DoRA rescaling by the multiplier, A1111 / ComfyUI the merged change."""
    import lycoris
    import torch.nn.functional as F

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(48, 64)
            self.conv = nn.Conv2d(16, 32, 3, padding=1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blk = Block()

    multiplier = 1.0 if options.get("weight_decompose") else 0.7
    g = torch.Generator().manual_seed(1)
    x_lin, x_conv = torch.randn(3, 48, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    saved = {k: v for k, v in vars(lycoris.LycorisNetwork).items() if k.isupper()}
    try:
        lycoris.LycorisNetwork.apply_preset({"target_module": ["Block"], "lora_prefix": "lora_unet"})
        torch.manual_seed(0)
        net = Net()
        base = {name: (m.weight.detach().clone(), m.bias.detach().clone()) for name, m in (("lin", net.blk.lin), ("conv", net.blk.conv))}
        network = lycoris.LycorisNetwork(net, multiplier=multiplier, lora_dim=4, conv_lora_dim=2, alpha=2,
                                         conv_alpha=1, network_module=algo, **options)
        network.apply_to()
        with torch.no_grad():
            for name, p in network.named_parameters():
                noise = torch.randn(p.shape, generator=g) * 0.2
                p.copy_(p + noise if algo == "full" or "dora_scale" in name else noise)
            network.save_weights(str(tmp_path / "l.safetensors"), torch.float32, {})
            network.set_multiplier(multiplier)
            want = {"lin": net.blk.lin(x_lin), "conv": net.blk.conv(x_conv)}
    finally:
        for k, v in saved.items():
            setattr(lycoris.LycorisNetwork, k, v)
    layers = {}
    for name, (weight, bias) in base.items():
        layer = nn.Linear(1, 1) if weight.ndim == 2 else nn.Conv2d(1, 1, 1)
        layer.weight, layer.bias = nn.Parameter(weight.clone()), nn.Parameter(bias.clone())
        layers[f"lora_unet_blk_{name}"] = layer
    merges, unmatched = lora_merges(layers, load_lora_file(tmp_path / "l.safetensors"), multiplier)
    weights = {layer: (weight, bias) for layer, weight, bias in merged_layers(merges)}
    assert unmatched == [] and len(weights) == 2
    w, b = weights[layers["lora_unet_blk_lin"]]
    torch.testing.assert_close(F.linear(x_lin, w, base["lin"][1] if b is None else b), want["lin"], atol=1e-5, rtol=1e-4)
    w, b = weights[layers["lora_unet_blk_conv"]]
    torch.testing.assert_close(F.conv2d(x_conv, w, base["conv"][1] if b is None else b, padding=1), want["conv"],
                               atol=1e-5, rtol=1e-4)


def test_lycoris_norm_layer_diffs(tmp_path):
    """LyCORIS with ``train_norm=True`` writes ``<name>.w_norm`` / ``<name>.b_norm`` for LayerNorm and
    GroupNorm layers: full diffs of the weight and bias (A1111 network_norm.py: ``updown = w_norm``,
    ``ex_bias = b_norm``, times the multiplier). Merged at 0.8 they give the outputs of LyCORIS's own forward
    within 1e-5 (measured ~2e-7; dropped, the outputs differ by ~1)."""
    import lycoris
    import torch.nn.functional as F

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(16, 16)
            self.ln = nn.LayerNorm(16)
            self.gn = nn.GroupNorm(4, 16)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blk = Block()

    multiplier = 0.8
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 4, 4, generator=g)
    saved = {k: v for k, v in vars(lycoris.LycorisNetwork).items() if k.isupper()}
    try:
        lycoris.LycorisNetwork.apply_preset({"target_module": ["Block"], "lora_prefix": "lora_unet"})
        torch.manual_seed(0)
        net = Net()
        base = {name: (m.weight.detach().clone(), m.bias.detach().clone()) for name, m in net.blk.named_children()}
        network = lycoris.LycorisNetwork(net, multiplier=multiplier, lora_dim=4, alpha=2, network_module="locon",
                                         train_norm=True)
        network.apply_to()
        with torch.no_grad():
            for p in network.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            network.save_weights(str(tmp_path / "l.safetensors"), torch.float32, {})
            want = {"ln": net.blk.ln(x.permute(0, 2, 3, 1)), "gn": net.blk.gn(x)}
    finally:
        for k, v in saved.items():
            setattr(lycoris.LycorisNetwork, k, v)
    lora = load_lora_file(tmp_path / "l.safetensors")
    assert lora["lora_unet_blk_ln"].keys() == {"diff", "diff_b"}
    layers = {"lora_unet_blk_ln": nn.LayerNorm(16), "lora_unet_blk_gn": nn.GroupNorm(4, 16)}
    for name, layer in layers.items():
        layer.weight, layer.bias = (nn.Parameter(t.clone()) for t in base[name.rsplit("_", 1)[1]])
    merges, unmatched = lora_merges(layers, lora, multiplier)
    weights = {layer: (weight, bias) for layer, weight, bias in merged_layers(merges)}
    assert unmatched == ["lora_unet_blk_lin"]
    w, b = weights[layers["lora_unet_blk_ln"]]
    torch.testing.assert_close(F.layer_norm(x.permute(0, 2, 3, 1), (16,), w, b), want["ln"], atol=1e-5, rtol=1e-5)
    w, b = weights[layers["lora_unet_blk_gn"]]
    torch.testing.assert_close(F.group_norm(x, 4, w, b), want["gn"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("keys, kind", [
    ({"lora_unet_blk_lin.oft_blocks": torch.zeros(4, 16, 16), "lora_unet_blk_lin.alpha": torch.tensor(0.0)}, "OFT / BOFT"),
])
def test_unsupported_lycoris_kinds_are_named(tmp_path, keys, kind):
    """OFT / BOFT files (A1111 network_oft.py reads them) are refused naming the
    kind, not with the hint that a full model goes to --model."""
    save_file(keys, str(tmp_path / "l.safetensors"))
    with pytest.raises(CheckpointError, match=f"LyCORIS {kind} file") as err:
        load_lora_file(tmp_path / "l.safetensors")
    assert "--model" not in str(err.value)


@pytest.mark.parametrize("kind", ["OFT", "BOFT", "(IA)^3", "VeRA"])
def test_peft_adapter_kinds_sdlab_does_not_merge_are_named(tmp_path, kind):
    """Files of peft adapter kinds other than LoRA / DoRA (its state dict as diffusers' `save_lora_weights`
    writes it: ``unet.<path>.oft_R.weight``, ``boft_R``, ``ia3_l``, ``vera_lambda_b``) are one error naming
    the file and the kind, not the hint that a full model goes to --model."""
    import peft
    from peft.utils import get_peft_model_state_dict

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.to_q, self.to_k = nn.Linear(32, 32), nn.Linear(32, 32)

    targets = ["to_q", "to_k"]
    config = {"OFT": lambda: peft.OFTConfig(r=0, oft_block_size=8, target_modules=targets),
              "BOFT": lambda: peft.BOFTConfig(boft_block_size=8, target_modules=targets),
              "(IA)^3": lambda: peft.IA3Config(target_modules=targets, feedforward_modules=["to_k"]),
              "VeRA": lambda: peft.VeraConfig(r=4, target_modules=targets)}[kind]()
    state = get_peft_model_state_dict(peft.get_peft_model(Attention(), config))
    path = tmp_path / "adapter.safetensors"
    save_file({"unet." + k.removeprefix("base_model.model."): v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(CheckpointError) as err:
        load_lora_file(path)
    assert str(path) in str(err.value) and f"a peft {kind} file" in str(err.value), err.value
    assert "--model" not in str(err.value)


@pytest.mark.parametrize("layout", ["lycoris", "older"])
def test_glora_layouts_merge_as_comfyui_merges_them(layout):
    """GLoRA in LyCORIS's layout (a1 (in, r), a2 (r, in), b1 (out, r), b2 (r, in)): ``W + m * alpha / r *
    (W a1 a2 + b1 b2)``; in the older layout (a1 (r, in), a2 (in, r), b1 (r, in), b2 (out, r)):
    ``W + m * alpha / r * (b2 b1 + W a2 a1)`` (ComfyUI weight_adapter/glora.py), told apart by the shapes."""
    g = torch.Generator().manual_seed(8)
    out, in_, r, alpha, multiplier = 32, 24, 4, 2.0, 0.6
    w = _rand(out, in_, g=g)
    if layout == "lycoris":
        a1, a2, b1, b2 = _rand(in_, r, g=g), _rand(r, in_, g=g), _rand(out, r, g=g), _rand(r, in_, g=g)
        delta = w @ a1 @ a2 + b1 @ b2
    else:
        a1, a2, b1, b2 = _rand(r, in_, g=g), _rand(in_, r, g=g), _rand(r, in_, g=g), _rand(out, r, g=g)
        delta = b2 @ b1 + w @ a2 @ a1
    module = {"glora_a1": a1, "glora_a2": a2, "glora_b1": b1, "glora_b2": b2, "alpha": torch.tensor(alpha)}
    torch.testing.assert_close(merged_weight(module, w, multiplier)[0], w + multiplier * alpha / r * delta)
    with pytest.raises(ValueError, match="glora tensors"):
        merged_weight(module, _rand(out, in_ + 8, g=g), multiplier)
