"""Interrupted runs of `python -m sdlab.train.cli` (reduced-width SD1, CPU) resume to the weights of a
straight run: N steps straight == stopped part-way + ``--resume latest`` to N, for both ways a run ends
early. Stated tolerance 1e-6 absolute on every tensor of the final and EMA files (measured: 0.0, bit for
bit, in both cases).

- SIGKILL: nothing runs; the newest complete run checkpoint (every 4 steps) is the resume point.
- SIGTERM: the loop finishes its step, writes a checkpoint at the step it finished (on the 4-step cadence
  or not) and the weights so far as interrupted.safetensors (a model file `--model` loads), and exits with
  143 (128 + SIGTERM), without the final weights.
The settings exercise every stateful part: EMA, warm-up + cosine LR, random crop + flip, Min-SNR, offset
noise.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sdlab.checkpoints.load import load_bundle
from sdlab.train.run_checkpoint import list_checkpoints, load_run_checkpoint
from train_fixtures import cli_args, cli_env, max_weight_diff, run_cli, write_caption_folder, write_tiny_model

STEPS = 12
COMMON = ("--max-steps", str(STEPS), "--checkpoint-every", "4", "--batch-size", "2", "--learning-rate", "1e-3",
          "--warmup-steps", "2", "--ema-decay", "0.9", "--random-flip", "--no-center-crop", "--min-snr-gamma", "5",
          "--offset-noise", "0.05")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """(root, model, data, output of the uninterrupted run)."""
    root = tmp_path_factory.mktemp("resume")
    data = write_caption_folder(root / "data", n=4, size=24)
    model = write_tiny_model(root / "tiny-sd1.safetensors")
    out = root / "straight"
    run_cli(cli_args(out, model, data, *COMMON))
    return root, model, data, out


def _start(out: Path, model: Path, data: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *cli_args(out, model, data, *COMMON)], env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.005)


def _logged_steps(out: Path) -> list[int]:
    path = out / "log.csv"
    if not path.is_file():
        return []
    return [int(r.split(",")[0]) for r in path.read_text().strip().splitlines()[1:] if r]


def _resume_and_compare(out: Path, model: Path, data: Path, reference: Path) -> None:
    run_cli(cli_args(out, model, data, *COMMON, "--resume", "latest"))
    for name in ("final.safetensors", "final-ema.safetensors"):
        diff = max_weight_diff(reference / name, out / name)
        assert diff <= 1e-6, (name, diff)
    # the CSV log describes one history: one row per step
    assert _logged_steps(out) == list(range(1, STEPS + 1))
    assert (out / "loss.png").stat().st_size > 0


def test_resume_after_sigkill_matches_straight_run(straight):
    root, model, data, reference = straight
    killed = root / "killed"
    proc = _start(killed, model, data)
    _wait_for(lambda: bool(list_checkpoints(killed / "checkpoints")), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    found = list_checkpoints(killed / "checkpoints")
    assert found and found[-1][0] < STEPS, "the run must be killed before it finished"
    assert not (killed / "final.safetensors").exists()
    load_run_checkpoint(found[-1][1])  # complete and readable
    _resume_and_compare(killed, model, data, reference)


def test_resume_after_sigterm_matches_straight_run(straight):
    root, model, data, reference = straight
    stopped = root / "stopped"
    proc = _start(stopped, model, data)
    _wait_for(lambda: len(_logged_steps(stopped)) >= 1, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-3000:]  # a clean stop, reported as 128 + SIGTERM
    assert "received SIGTERM" in stderr
    summary = json.loads((stopped / "summary.json").read_text())
    assert summary["interrupted"] and 1 <= summary["step"] < STEPS
    assert not (stopped / "final.safetensors").exists()
    # the weights so far, as a model file: loadable by --model, and what the stop checkpoint holds
    assert summary["weights"] == str(stopped / "interrupted.safetensors")
    assert summary["ema_weights"] == str(stopped / "interrupted-ema.safetensors")
    bundle = load_bundle(stopped / "interrupted.safetensors")
    state = load_run_checkpoint(list_checkpoints(stopped / "checkpoints")[-1][1])
    for name, value in state["modules"]["unet"].items():
        assert torch.equal(bundle.unet.state_dict()[name], value), name
    found = list_checkpoints(stopped / "checkpoints")
    assert found[-1][0] == summary["step"]  # the stop wrote a checkpoint at the step it finished
    assert load_run_checkpoint(found[-1][1])["step"] == summary["step"]
    _resume_and_compare(stopped, model, data, reference)
