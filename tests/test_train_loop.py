"""End-to-end runs of `python -m sdlab.train.cli` on a reduced-width SD1 checkpoint (CPU).

- resume: N steps straight == N/2-ish steps, SIGKILL, resume to N (same weights, bit for bit here; the
  stated tolerance is 1e-6 absolute);
- torchrun with 2 gloo processes == 1 process with the same global batch == 1 process with 2 accumulation
  micro-steps (U-Net outputs of the trained weights within 1e-4 absolute and 2 % of what training changed);
- a dataset with a corrupt image and an empty caption trains and reports both;
- full fine-tune output is read by diffusers' `from_single_file`; the LoRA file merged at 1.0 reproduces the
  U-Net output of the LoRA model as trained.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bundle_fixtures import write_diffusers_folder
from sdlab.checkpoints.load import load_bundle
from sdlab.train.lora import apply_lora, load_lora_file
from sdlab.train.run_checkpoint import list_checkpoints, load_run_checkpoint
from train_fixtures import write_caption_folder, write_tiny_model

RES = 16  # pixels; the tiny VAE halves it, so the U-Net sees 8x8 latents


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    return env


def _cli(out: Path, model: Path, data: Path, *extra: str) -> list[str]:
    return ["-m", "sdlab.train.cli", "--model", str(model), "--data-dir", str(data), "--output-dir", str(out),
            "--resolution", str(RES), "--no-progress", "--num-workers", "1", "--device", "cpu", *extra]


def _run(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    data = write_caption_folder(root / "data", n=4, size=24)
    model = write_tiny_model(root / "tiny-sd1.safetensors")
    return root, model, data


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


COMMON = ("--batch-size", "2", "--learning-rate", "1e-3", "--warmup-steps", "2", "--ema-decay", "0.9",
          "--random-flip", "--no-center-crop", "--min-snr-gamma", "5", "--offset-noise", "0.05")


def test_resume_after_sigkill_matches_straight_run(setup):
    root, model, data = setup
    steps = 24
    straight = root / "straight"
    _run(_cli(straight, model, data, "--max-steps", str(steps), "--checkpoint-every", "4", *COMMON))

    killed = root / "killed"
    proc = subprocess.Popen([sys.executable, *_cli(killed, model, data, "--max-steps", str(steps), "--checkpoint-every", "4", *COMMON)],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list_checkpoints(killed / "checkpoints") and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    found = list_checkpoints(killed / "checkpoints")
    assert found and found[-1][0] < steps, "the run must be killed before it finished"
    assert not (killed / "final.safetensors").exists()
    load_run_checkpoint(found[-1][1])  # complete and readable

    _run(_cli(killed, model, data, "--max-steps", str(steps), "--checkpoint-every", "4", "--resume", "latest", *COMMON))
    for name in ("final.safetensors", "final-ema.safetensors"):
        diff = _max_diff(_weights(straight / name), _weights(killed / name))
        assert diff <= 1e-6, (name, diff)
    # the CSV log describes one history: one row per step
    rows = (killed / "log.csv").read_text().strip().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, steps + 1))
    assert (killed / "loss.png").stat().st_size > 0


def test_torchrun_two_gloo_processes_match_one_process(setup):
    root, model, data = setup
    args = ("--max-steps", "4", "--checkpoint-every", "100", "--learning-rate", "1e-3", "--ema-decay", "0.9",
            "--random-flip", "--caption-dropout", "0.3")
    one = root / "one"
    _run(_cli(one, model, data, "--batch-size", "4", *args))
    two = root / "two"
    _run(["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", "29517",
          *_cli(two, model, data, "--batch-size", "2", *args)], timeout=180)
    # one process with 2 micro-steps of 2 (gradient accumulation) is the same global batch again
    accum = root / "accum"
    _run(_cli(accum, model, data, "--batch-size", "2", "--grad-accum", "2", *args))
    # Compared as functions: biases that feed a GroupNorm have a zero gradient in exact arithmetic, so their
    # float-noise gradients (~1e-9) differ with the summation order and Adam scales that noise up to
    # lr-sized steps in parameters that cannot change the output. Every other difference is float noise.
    # Adam also turns the float noise of any small gradient into a step of ~lr, so the tolerance is stated
    # against the change training made: within 1e-4 absolute (outputs are O(1)) and 2 % of that change.
    g = torch.Generator().manual_seed(5)
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([700.0, 30.0]), torch.randn(2, 77, 64, generator=g)
    with torch.no_grad():
        untrained = load_bundle(model).unet(x, t, ctx)
        for name in ("final.safetensors", "final-ema.safetensors"):
            ref = load_bundle(one / name).unet(x, t, ctx)
            change = float((ref - untrained).abs().max())
            assert change > 1e-3
            for other in (two, accum):
                diff = float((load_bundle(other / name).unet(x, t, ctx) - ref).abs().max())
                assert diff < 1e-4 and diff < 0.02 * change, (name, other.name, diff, change)
    assert _max_diff(_weights(one / "final.safetensors"), load_file(str(model))) > 1e-4  # it did train


def test_corrupt_image_and_empty_caption_are_skipped_and_counted(setup, tmp_path):
    _, model, _ = setup
    data = write_caption_folder(tmp_path / "data", n=3, size=24)
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    (data / "broken.txt").write_text("a broken file")
    (data / "img00.txt").write_text("   \n")
    out = tmp_path / "run"
    proc = _run(_cli(out, model, data, "--max-steps", "2", "--batch-size", "2"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped"] == {"broken_image": 1, "empty_caption": 1}
    assert summary["step"] == 2 and (out / "final.safetensors").is_file()
    assert "broken.png" in proc.stderr and "empty or missing caption" in proc.stderr


def test_full_finetune_is_read_by_diffusers_and_lora_merge_reproduces(setup, monkeypatch):
    root, model, data = setup
    full = root / "full"
    _run(_cli(full, model, data, "--max-steps", "3", "--batch-size", "2", "--learning-rate", "1e-3", "--save-dtype", "fp32"))
    tuned = load_bundle(full / "final.safetensors")
    base = load_bundle(model)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from diffusers import StableDiffusionPipeline

    config = write_diffusers_folder(tuned, root / "diffusers-config", weights=False)
    pipe = StableDiffusionPipeline.from_single_file(str(full / "final.safetensors"), config=str(config),
                                                    local_files_only=True, safety_checker=None, requires_safety_checker=False)
    g = torch.Generator().manual_seed(3)
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([900.0, 20.0]), torch.randn(2, 77, 64, generator=g)
    with torch.no_grad():
        ours, theirs, before = tuned.unet(x, t, ctx), pipe.unet(x, t, encoder_hidden_states=ctx).sample, base.unet(x, t, ctx)
    assert float((ours - theirs).abs().max()) < 1e-4
    assert float((ours - before).abs().max()) > 1e-3  # the fine-tune changed the model

    # LoRA: train, then compare the U-Net with live LoRA modules (restored from the run checkpoint) with the
    # base model after merging the saved file at weight 1.0
    lora_dir = root / "lora"
    _run(_cli(lora_dir, model, data, "--max-steps", "3", "--batch-size", "2", "--learning-rate", "1e-2",
              "--lora-rank", "4", "--lora-alpha", "2"))
    lora_file = lora_dir / "final.safetensors"
    entries = load_lora_file(lora_file)
    assert "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q" in entries
    assert "lora_unet_output_blocks_2_1_transformer_blocks_0_ff_net_2" in entries
    assert all(set(e) == {"down", "up", "alpha"} and float(e["alpha"]) == 2.0 for e in entries.values())

    from sdlab.train.lora import LoRANetwork

    live = load_bundle(model)
    network = LoRANetwork.for_unet(live.unet, rank=4, alpha=2).attach()
    state = load_run_checkpoint(list_checkpoints(lora_dir / "checkpoints")[-1][1])
    network.load_state_dict(state["modules"]["lora_unet"])
    merged = load_bundle(model)
    assert apply_lora(merged, lora_file, 1.0) == len(entries)
    with torch.no_grad():
        live_out, merged_out = live.unet(x, t, ctx), merged.unet(x, t, ctx)
    assert float((live_out - before).abs().max()) > 1e-4  # the LoRA changed the output
    assert float((live_out - merged_out).abs().max()) < 1e-5
