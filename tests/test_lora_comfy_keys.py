"""LoRAs in ComfyUI's own naming apply to the layers ComfyUI maps them to (comfy/lora.py
`model_lora_keys_unet`: ``diffusion_model.<SGM path>`` for every U-Net weight, and ``lycoris_<diffusers
path>`` (SimpleTuner); `model_lora_keys_clip`: ``text_encoders.<clip_l | clip_h | clip_g>.transformer.<HF
path>``, ComfyUI's text-encoder attributes: CLIP-L for SD1 and SDXL's first, CLIP-H for SD2, CLIP-G for SDXL's
second). The same tensors under kohya's names and under ComfyUI's (fp16, no alpha, as its LoraSave node
writes: `comfy_extras/nodes_lora_extract.py`) give bit-identical merged models.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from bundle_fixtures import tiny_bundle
from sdlab.checkpoints.lora import apply_lora, kohya_name

COMFY_CLIP = {"sd1": ["clip_l"], "sd2": ["clip_h"], "sdxl": ["clip_l", "clip_g"]}
KOHYA_TE = {1: ["lora_te_text_model_"], 2: ["lora_te1_text_model_", "lora_te2_text_model_"]}


def _modules(bundle, g) -> list[tuple[str, str, dict[str, torch.Tensor]]]:
    """(kohya name, ComfyUI name, LoRA tensors) for some U-Net layers (attention, proj_in, a 3x3 conv, the
    time embedding) and two layers of each text encoder."""
    picked = []
    unet_paths = [p for p, m in bundle.unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    unet_paths = [p for p in unet_paths if p.endswith(("attn1.to_q", "attn2.to_k", "proj_in", "in_layers.2",
                                                        "time_embed.0"))]
    for path in unet_paths:
        picked.append((bundle.unet.get_submodule(path), kohya_name("lora_unet_", path), f"diffusion_model.{path}"))
    for te, kohya_prefix, clip in zip(bundle.text_encoders, KOHYA_TE[len(bundle.text_encoders)],
                                      COMFY_CLIP[bundle.family.name]):
        for path in ("encoder.layers.0.self_attn.q_proj", "encoder.layers.1.mlp.fc2"):
            picked.append((te.model.get_submodule(path), kohya_name(kohya_prefix, path),
                           f"text_encoders.{clip}.transformer.text_model.{path}"))
    modules = []
    for layer, kohya, comfy in picked:
        out, inp = layer.weight.shape[:2]
        kernel = tuple(layer.weight.shape[2:])
        down = (torch.randn(4, inp, *kernel, generator=g) * 0.1).half()
        up = (torch.randn(out, 4, *((1, 1) if kernel else ()), generator=g) * 0.1).half()
        modules.append((kohya, comfy, {"lora_down.weight": down, "lora_up.weight": up}))
    return modules


def _merged(family, tmp_path, name, tensors) -> dict[str, torch.Tensor]:
    bundle = tiny_bundle(family)
    save_file(tensors, str(tmp_path / name))
    changed = apply_lora(bundle, tmp_path / name, 0.8)
    return changed, {**{f"unet.{k}": v for k, v in bundle.unet.state_dict().items()},
                     **{f"te{i}.{k}": v for i, te in enumerate(bundle.text_encoders)
                        for k, v in te.model.state_dict().items()}}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_comfyui_names_apply_as_kohya_names(family, tmp_path):
    g = torch.Generator().manual_seed(3)
    modules = _modules(tiny_bundle(family), g)
    assert any(c.startswith("diffusion_model.") and "proj_in" in c for _, c, _ in modules)
    kohya = {f"{k}.{f}": t for k, _, m in modules for f, t in m.items()}
    comfy = {f"{c}.{f}": t for _, c, m in modules for f, t in m.items()}
    changed_k, want = _merged(family, tmp_path, "kohya.safetensors", kohya)
    changed_c, got = _merged(family, tmp_path, "comfy.safetensors", comfy)
    base = {**{f"unet.{k}": v for k, v in tiny_bundle(family).unet.state_dict().items()}}
    assert changed_k == changed_c == len(modules)
    assert sum(not torch.equal(base[k], want[k]) for k in base) >= 5          # the LoRA changes the U-Net
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_simpletuner_lycoris_prefix(tmp_path):
    g = torch.Generator().manual_seed(4)
    path = "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"         # diffusers path, as SimpleTuner
    q = tiny_bundle("sd1").unet.input_blocks[1][1].transformer_blocks[0].attn1.to_q
    tensors = {"hada_w1_a": torch.randn(q.weight.shape[0], 2, generator=g), "hada_w1_b": torch.randn(2, q.weight.shape[1], generator=g),
               "hada_w2_a": torch.randn(q.weight.shape[0], 2, generator=g), "hada_w2_b": torch.randn(2, q.weight.shape[1], generator=g),
               "alpha": torch.tensor(1.0)}
    _, want = _merged("sd1", tmp_path, "kohya.safetensors", {f"lora_unet_{path}.{f}": t for f, t in tensors.items()})
    changed, got = _merged("sd1", tmp_path, "st.safetensors", {f"lycoris_{path}.{f}": t for f, t in tensors.items()})
    assert changed == 1
    key = "unet.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    assert not torch.equal(got[key], tiny_bundle("sd1").unet.state_dict()[key.removeprefix("unet.")])
    for k in want:
        assert torch.equal(got[k], want[k]), k
