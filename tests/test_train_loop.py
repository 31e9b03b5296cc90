"""End-to-end runs of the training CLI on a reduced-width SD1 checkpoint (CPU; a subprocess where the
CLI's own output is checked, in-process otherwise).

- a dataset with a corrupt image and an empty caption trains and reports both;
- full fine-tune output is read by diffusers' `from_single_file` (U-Net outputs within 1e-4);
- the LoRA file merged at 1.0 reproduces the U-Net output of the LoRA model as trained (within 1e-5).
Resume after SIGKILL / SIGTERM: `test_train_resume.py`; torchrun and accumulation: `test_train_ddp.py`.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import sdlab
from bundle_fixtures import write_diffusers_folder
from sdlab.checkpoints.load import load_bundle
from sdlab.checkpoints.lora import apply_lora, load_lora_file
from sdlab.train.lora import LoRANetwork
from sdlab.train.run_checkpoint import list_checkpoints, load_run_checkpoint
from train_fixtures import cli_args, run_cli, run_in_process, write_caption_folder, write_tiny_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    data = write_caption_folder(root / "data", n=4, size=24)
    model = write_tiny_model(root / "tiny-sd1.safetensors")
    return root, model, data


def _probe():
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([900.0, 20.0]), torch.randn(2, 77, 64, generator=g)


def test_corrupt_image_and_empty_caption_are_skipped_and_counted(setup, tmp_path):
    _, model, _ = setup
    data = write_caption_folder(tmp_path / "data", n=3, size=24)
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    (data / "broken.txt").write_text("a broken file")
    (data / "img00.txt").write_text("   \n")
    out = tmp_path / "run"
    proc = run_cli(cli_args(out, model, data, "--max-steps", "2", "--batch-size", "2"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped"] == {"broken_image": 1, "empty_caption": 1}
    assert summary["step"] == 2 and (out / "final.safetensors").is_file()
    assert "broken.png" in proc.stderr and "empty or missing caption" in proc.stderr


def test_full_finetune_is_read_by_diffusers(setup, monkeypatch, one_thread):
    root, model, data = setup
    full = root / "full"
    run_in_process(full, model, data, "--max-steps", "3", "--batch-size", "2", "--learning-rate", "1e-3",
                   "--save-dtype", "fp32")
    tuned = load_bundle(full / "final.safetensors")
    base = load_bundle(model)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from diffusers import StableDiffusionPipeline

    config = write_diffusers_folder(tuned, root / "diffusers-config", weights=False)
    pipe = StableDiffusionPipeline.from_single_file(str(full / "final.safetensors"), config=str(config),
                                                    local_files_only=True, safety_checker=None, requires_safety_checker=False)
    x, t, ctx = _probe()
    with torch.no_grad():
        ours, theirs, before = tuned.unet(x, t, ctx), pipe.unet(x, t, encoder_hidden_states=ctx).sample, base.unet(x, t, ctx)
    assert float((ours - theirs).abs().max()) < 1e-4
    assert float((ours - before).abs().max()) > 1e-3  # the fine-tune changed the model


def test_lora_file_merged_reproduces_the_trained_lora(setup, one_thread):
    # compare the U-Net with live LoRA modules (restored from the run checkpoint) with the base model after
    # merging the saved file at weight 1.0
    root, model, data = setup
    lora_dir = root / "lora"
    run_in_process(lora_dir, model, data, "--max-steps", "3", "--batch-size", "2", "--learning-rate", "1e-2",
                   "--lora-rank", "4", "--lora-alpha", "2")
    lora_file = lora_dir / "final.safetensors"
    entries = load_lora_file(lora_file)
    # kohya's SD1 names (diffusers module paths): input_blocks.1.1 / output_blocks.2.1 in sdlab's layout
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in entries
    assert "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_2" in entries
    assert "lora_unet_down_blocks_0_attentions_0_proj_in" in entries
    with safe_open(str(lora_file), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_network_module"], meta["ss_network_dim"], meta["ss_network_alpha"]) == ("networks.lora", "4", "2.0")
    assert meta["ss_base_model_version"] == "sd_v1" and "sshs_model_hash" in meta
    assert all(set(e) == {"down", "up", "alpha"} and float(e["alpha"]) == 2.0 for e in entries.values())

    live = load_bundle(model)
    network = LoRANetwork.for_unet(live.unet, rank=4, alpha=2).attach()
    state = load_run_checkpoint(list_checkpoints(lora_dir / "checkpoints")[-1][1])
    network.load_state_dict(state["modules"]["lora_unet"])
    merged = load_bundle(model)
    assert apply_lora(merged, lora_file, 1.0) == len(entries)
    x, t, ctx = _probe()
    with torch.no_grad():
        before, live_out, merged_out = load_bundle(model).unet(x, t, ctx), live.unet(x, t, ctx), merged.unet(x, t, ctx)
    assert float((live_out - before).abs().max()) > 1e-4  # the LoRA changed the output
    assert float((live_out - merged_out).abs().max()) < 1e-5
    # the public API merges the same file: sdlab.load(..., loras=[(file, weight)]); at weight 0.5 the output
    # sits near the midpoint (the U-Net is not linear in its weights: 0.6 % of the change seen)
    with torch.no_grad():
        api_out = sdlab.load(model, loras=[(lora_file, 1.0)]).bundle.unet(x, t, ctx)
        half_out = sdlab.load(model, loras=[(lora_file, 0.5)]).bundle.unet(x, t, ctx)
    assert torch.equal(api_out, merged_out)
    assert float((half_out - (before + merged_out) / 2).abs().max()) < 0.05 * float((merged_out - before).abs().max())
