"""LoRAs made on a 4-channel U-Net that touch ``conv_in`` (LyCORIS' default ``full`` preset trains it) on an
inpainting U-Net, whose ``conv_in`` takes 9 channels (latent, mask, masked image's latent), as A1111 applies
them (extensions-builtin/Lora/networks.py `network_apply_weights`: ``updown`` of a 4-D weight with 9 input
channels is zero-padded, ``F.pad(updown, (0, 0, 0, 0, 0, 5))``): the latent's channels change, the others
not, and the rest of the file applies. An edit model's 8-channel conv_in is not padded: A1111's sum fails there. Where A1111's padding fails (a DoRA module) or the module is for 9
channels on a 4-channel model, A1111 logs an error and leaves that layer as it is: so does sdlab, with a
warning. The expected weights are A1111's formula; fp32, compared within 1e-6.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from bundle_fixtures import tiny_bundle
from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.lora import apply_lora

CONV_IN = "lora_unet_conv_in"
TO_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
RANK, ALPHA, MULTIPLIER = 4, 2.0, 0.7


def _to_q(bundle):
    return bundle.unet.input_blocks[1][1].transformer_blocks[0].attn1.to_q


def _file(path, conv_in: dict[str, torch.Tensor], q_weight: torch.Tensor, g) -> tuple:
    """A file with `conv_in`'s tensors (under ``lora_unet_conv_in.``) and a LoRA on one ``to_q``; the
    ``to_q`` change at `MULTIPLIER`."""
    down, up = torch.randn(RANK, q_weight.shape[1], generator=g) * 0.1, torch.randn(q_weight.shape[0], RANK, generator=g) * 0.1
    tensors = {**{f"{CONV_IN}.{k}": v for k, v in conv_in.items()}, f"{TO_Q}.lora_down.weight": down,
               f"{TO_Q}.lora_up.weight": up, f"{TO_Q}.alpha": torch.tensor(ALPHA)}
    save_file(tensors, str(path))
    return path, MULTIPLIER * ALPHA / RANK * up @ down


@pytest.mark.parametrize("kind", ["locon", "full"])
def test_a_4_channel_conv_in_module_is_zero_padded_on_an_inpainting_model(tmp_path, kind):
    g = torch.Generator().manual_seed(0)
    bundle = tiny_bundle("sd1-inpaint")
    conv_in = bundle.unet.input_blocks[0][0]
    out = conv_in.weight.shape[0]
    assert conv_in.weight.shape[1] == 9
    if kind == "locon":
        down, up = torch.randn(RANK, 4, 3, 3, generator=g) * 0.1, torch.randn(out, RANK, 1, 1, generator=g) * 0.1
        module = {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(ALPHA)}
        updown = MULTIPLIER * ALPHA / RANK * (up.flatten(1) @ down.flatten(1)).reshape(out, 4, 3, 3)
        bias_change = torch.zeros(out)
    else:
        module = {"diff": torch.randn(out, 4, 3, 3, generator=g) * 0.1, "diff_b": torch.randn(out, generator=g) * 0.1}
        updown, bias_change = MULTIPLIER * module["diff"], MULTIPLIER * module["diff_b"]
    path, q_change = _file(tmp_path / "l.safetensors", module, _to_q(bundle).weight, g)
    w0, b0, q0 = conv_in.weight.detach().clone(), conv_in.bias.detach().clone(), _to_q(bundle).weight.detach().clone()
    assert apply_lora(bundle, path, MULTIPLIER) == 2
    want = w0 + F.pad(updown, (0, 0, 0, 0, 0, 5))                                 # A1111 network_apply_weights
    torch.testing.assert_close(conv_in.weight, want, atol=1e-6, rtol=0)
    assert torch.equal(conv_in.weight[:, 4:], w0[:, 4:]) and (conv_in.weight - w0).abs().max() > 1e-2
    torch.testing.assert_close(conv_in.bias, b0 + bias_change, atol=1e-6, rtol=0)
    torch.testing.assert_close(_to_q(bundle).weight, q0 + q_change, atol=1e-6, rtol=0)


@pytest.mark.parametrize("model, channels, dora", [("sd1-inpaint", 4, True), ("sd1", 9, False), ("sd1-edit", 4, False),
                                                   ("sd1-edit", 4, True), ("sd1", 8, False)])
def test_conv_in_modules_a1111_cannot_apply_leave_the_layer_and_apply_the_rest(tmp_path, caplog, model, channels,
                                                                               dora):
    """A 4-channel DoRA module on a 9-channel conv_in; a module for 9 channels (made on an inpainting
    model) on a 4-channel one; a 4-channel module on an edit (InstructPix2Pix) model's 8-channel conv_in, which
    A1111 does not pad (weight + updown fails, networks.py counts an error and applies the rest); a module made on
    an edit model on a 4-channel one."""
    g = torch.Generator().manual_seed(1)
    bundle = tiny_bundle(model)
    conv_in = bundle.unet.input_blocks[0][0]
    out = conv_in.weight.shape[0]
    module = {"lora_down.weight": torch.randn(RANK, channels, 3, 3, generator=g) * 0.1,
              "lora_up.weight": torch.randn(out, RANK, 1, 1, generator=g) * 0.1}
    if dora:
        module["dora_scale"] = torch.rand(out, 1, 1, 1, generator=g) + 0.5
    path, q_change = _file(tmp_path / "l.safetensors", module, _to_q(bundle).weight, g)
    w0, q0 = conv_in.weight.detach().clone(), _to_q(bundle).weight.detach().clone()
    with caplog.at_level(logging.WARNING, logger="sdlab.checkpoints.lora"):
        apply_lora(bundle, path, MULTIPLIER)
    assert torch.equal(conv_in.weight, w0)
    assert "left as it is" in caplog.text and CONV_IN in caplog.text
    torch.testing.assert_close(_to_q(bundle).weight, q0 + q_change, atol=1e-6, rtol=0)


def test_a_conv_in_module_of_another_width_is_still_an_error(tmp_path):
    g = torch.Generator().manual_seed(2)
    bundle = tiny_bundle("sd1-inpaint")
    out = bundle.unet.input_blocks[0][0].weight.shape[0]
    module = {"lora_down.weight": torch.randn(RANK, 5, 3, 3, generator=g), "lora_up.weight": torch.randn(out, RANK, 1, 1, generator=g)}
    path, _ = _file(tmp_path / "l.safetensors", module, _to_q(bundle).weight, g)
    with pytest.raises(CheckpointError, match="conv_in"):
        apply_lora(bundle, path, 1.0)
