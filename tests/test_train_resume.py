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
import os
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


def _logged_lrs(out: Path) -> dict[int, float]:
    rows = [r.split(",") for r in (out / "log.csv").read_text().strip().splitlines()]
    at = rows[0].index("lr")
    return {int(r[0]): float(r[at]) for r in rows[1:] if r}


def test_resume_applies_new_optimizer_settings_and_schedule(tmp_path, one_thread):
    """Settings given again on resume are the ones trained with: the AdamW hyper-parameters of the optimiser
    (not those its saved state carried) and an lr that follows the new schedule at each step, also when a
    finished cosine run (lr 0 at its end) is extended."""
    from train_fixtures import run_in_process

    from sdlab.train.config import TrainConfig
    from sdlab.train.loop import lr_multiplier

    data = write_caption_folder(tmp_path / "data", n=4, size=16)
    model = write_tiny_model(tmp_path / "tiny-sd1.safetensors")
    out = tmp_path / "run"
    first = ("--learning-rate", "1e-3", "--weight-decay", "0.01", "--lr-schedule", "cosine", "--checkpoint-every", "1")
    run_in_process(out, model, data, *first, "--max-steps", "2")
    changed = ("--learning-rate", "1e-2", "--weight-decay", "0.5", "--adam-beta1", "0.8", "--adam-beta2", "0.99",
               "--adam-eps", "1e-6", "--lr-schedule", "cosine", "--checkpoint-every", "1")
    run_in_process(out, model, data, *changed, "--max-steps", "4", "--resume", "latest")

    new = TrainConfig(learning_rate=1e-2, max_steps=4)
    lrs = _logged_lrs(out)
    assert lrs[3] == pytest.approx(1e-2 * lr_multiplier(2, new), rel=1e-5)   # 5e-3: not the finished run's 0
    assert lrs[4] == pytest.approx(1e-2 * lr_multiplier(3, new), rel=1e-5)
    (group,) = load_run_checkpoint(out / "checkpoints" / "step-00000004.pt")["optimizer"]["param_groups"]
    assert (group["weight_decay"], tuple(group["betas"]), group["eps"]) == (0.5, (0.8, 0.99), 1e-6)
    assert group["initial_lr"] == 1e-2


def _resume_point(tmp_path, stored):
    from sdlab.train.run_checkpoint import ResumePoint

    return ResumePoint(path=tmp_path / "step-00000002.pt", step=2, config=stored.to_json(), global_batch=1, state=None)


@pytest.mark.parametrize("base, setting, value", [
    ({"task": "embedding", "embedding_word": "zq"}, "embedding_init", "red"),
    ({"task": "vae"}, "vae_decoder_only", True),
    # the model trained and the objective's target: another file, family, prediction type or VAE
    ({"model": "base.safetensors"}, "model", "other.safetensors"),
    ({"model": "base.safetensors"}, "family", "sd2"),
    ({"family": "sd1"}, "family", "sdxl"),
    ({}, "prediction", "v"),
    ({"prediction": "v"}, "prediction", "eps"),
    ({"prediction": "v"}, "prediction", None),
    ({}, "vae", "other-vae.safetensors"),
    ({"vae": "vae.safetensors"}, "vae", None),
    ({"data_dir": "images"}, "data_dir", "other-images"),
])
def test_resume_refuses_settings_it_cannot_apply(tmp_path, base, setting, value):
    """A setting that defines what is trained (the model, its prediction type, the data) or only shapes the
    run's start (or its set of parameters) cannot change on resume: it is refused, naming it, rather than
    reported as changed and then ignored or trained on for the rest of the run."""
    from sdlab.train.config import TrainConfig
    from sdlab.train.errors import TrainError
    from sdlab.train.loop import check_resume

    point = _resume_point(tmp_path, TrainConfig(**base))
    with pytest.raises(TrainError, match=f"--{setting.replace('_', '-')} was"):
        check_resume(point, TrainConfig(**base | {setting: value}), global_batch=1)


def test_resume_with_another_process_count_says_what_changed_and_the_batch_that_fits(tmp_path):
    """A run made by 2 processes x --batch-size 2, resumed by 1 process with the checkpoint's --batch-size (what
    leaving it out gives): the error names the process counts and the --batch-size / --grad-accum that keep 4
    images per step, not "leave --batch-size out" (which is what was done)."""
    from dataclasses import replace

    from sdlab.train.config import TrainConfig
    from sdlab.train.errors import TrainError
    from sdlab.train.loop import check_resume

    point = replace(_resume_point(tmp_path, TrainConfig(batch_size=2)), global_batch=4)
    with pytest.raises(TrainError) as err:
        check_resume(point, TrainConfig(batch_size=2), global_batch=2)
    message = str(err.value)
    assert "x 2 processes" in message and "this run has 1 process" in message
    assert "--batch-size 4 (or --grad-accum 2)" in message and "leave --batch-size out" not in message
    check_resume(point, TrainConfig(batch_size=4), global_batch=4)                        # what it advises
    check_resume(point, TrainConfig(batch_size=2, grad_accum=2), global_batch=4)
    with pytest.raises(TrainError, match="3 processes cannot split evenly; resume it with 2 processes"):
        check_resume(point, TrainConfig(batch_size=1), global_batch=3)
    with pytest.raises(TrainError, match="leave --batch-size and --grad-accum out"):       # same processes
        check_resume(point, TrainConfig(batch_size=4), global_batch=8)


def test_resume_with_another_batch_names_the_batch_size_or_grad_accum_that_keeps_it(tmp_path):
    """Same processes, another --batch-size or --grad-accum: the error names the value that keeps the global
    batch with the other one as given (README: "the `--batch-size` or `--grad-accum` that keeps it")."""
    from dataclasses import replace

    from sdlab.train.config import TrainConfig
    from sdlab.train.errors import TrainError
    from sdlab.train.loop import check_resume

    point = replace(_resume_point(tmp_path, TrainConfig(batch_size=2, grad_accum=2)), global_batch=4)
    for given, advice in (({"batch_size": 4}, "give it --batch-size 2 (or --grad-accum 1)"),
                          ({"grad_accum": 4}, "give it --batch-size 1 (or --grad-accum 2)"),
                          ({"batch_size": 3}, "give it --batch-size 2 (or leave"),
                          ({"batch_size": 3, "grad_accum": 3}, "give it --batch-size 4 --grad-accum 1")):
        cfg = TrainConfig(**{"batch_size": 2, "grad_accum": 2} | given)
        with pytest.raises(TrainError) as err:
            check_resume(point, cfg, global_batch=cfg.batch_size * cfg.grad_accum)
        assert advice in str(err.value) and "to keep 4 images per step" in str(err.value)


def test_resume_takes_a_setting_spelled_otherwise_but_read_alike(tmp_path, monkeypatch):
    """The same prediction type or family under another name, and the same file or folder under another path
    (relative, absolute, through a symlink), are no change."""
    from sdlab.train.config import TrainConfig
    from sdlab.train.loop import check_resume

    monkeypatch.chdir(tmp_path)
    (tmp_path / "base.safetensors").write_bytes(b"")
    (tmp_path / "link.safetensors").symlink_to(tmp_path / "base.safetensors")
    (tmp_path / "images").mkdir()
    stored = TrainConfig(model="base.safetensors", data_dir="images", prediction="v", family="sd2")
    now = TrainConfig(model=str(tmp_path / "link.safetensors"), data_dir="./images/", prediction="v_prediction",
                      family="SD2")
    check_resume(_resume_point(tmp_path, stored), now, global_batch=1)


def test_resume_from_another_directory_reads_the_files_the_run_started_with(tmp_path, monkeypatch):
    """A run checkpoint stores its paths as the files and folders the run read, so a resume from another
    directory keeps the run's data when --data-dir is left out, takes it given as another path, and refuses
    a folder of the same relative name there; a checkpoint that stored a relative path reads it from here."""
    from dataclasses import replace

    from sdlab.train.config import TrainConfig, merge_resumed
    from sdlab.train.errors import TrainError
    from sdlab.train.loop import check_resume

    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    for folder in (start / "images", elsewhere / "images"):
        folder.mkdir(parents=True)
    images = os.path.realpath(start / "images")
    monkeypatch.chdir(start)
    point = _resume_point(tmp_path, TrainConfig(data_dir="images"))            # the run starts here
    monkeypatch.chdir(elsewhere)
    check_resume(point, TrainConfig(data_dir=images), global_batch=1)
    cfg, changed = merge_resumed(point.config, {"data_dir": images})
    assert (cfg.data_dir, changed) == (images, {})
    assert merge_resumed(point.config, {})[0].data_dir == images
    with pytest.raises(TrainError, match="--data-dir was"):
        check_resume(point, TrainConfig(data_dir="images"), global_batch=1)    # elsewhere/images
    older = replace(point, config=point.config | {"data_dir": "images"})       # stored as typed
    check_resume(older, TrainConfig(data_dir=str(elsewhere / "images")), global_batch=1)


# settings the run checkpoints of older versions do not store (kohya's options)
KOHYA_SETTINGS = ("min_timestep", "max_timestep", "ip_noise_gamma", "ip_noise_gamma_random_strength",
                  "multires_noise_iterations", "multires_noise_discount", "debiased_estimation_loss", "loss_type",
                  "huber_schedule", "huber_c", "shuffle_caption", "keep_tokens", "caption_separator")


def _stored_by_older_versions(stored: dict) -> dict:
    """A run checkpoint's config as versions before kohya's options and the per-task --caption-dropout default
    stored it: no kohya settings, and caption dropout at the one default it then had, 0.1, for every task."""
    return {k: v for k, v in stored.items() if k not in KOHYA_SETTINGS} | {"caption_dropout": 0.1}


@pytest.mark.parametrize("task", ["lcd", "vae", "text"])
def test_an_older_run_of_a_task_without_caption_dropout_resumes(tmp_path, task):
    """Its stored caption dropout 0.1 did nothing (the task never dropped a caption): the run resumes as it
    ran, with or without --caption-dropout 0; another value is refused as a setting the task ignores."""
    from dataclasses import replace

    from sdlab.train.config import TrainConfig, merge_resumed
    from sdlab.train.errors import TrainError
    from sdlab.train.loop import check_resume

    point = _resume_point(tmp_path, TrainConfig(task=task))
    point = replace(point, config=_stored_by_older_versions(point.config))
    for given in ({"max_steps": 5}, {"max_steps": 5, "caption_dropout": 0.0}):
        cfg, changed = merge_resumed(point.config, given)
        assert (cfg.caption_dropout, changed) == (0.0, {"max_steps": (1000, 5)})
        check_resume(point, cfg, global_batch=1)
    with pytest.raises(TrainError, match="--caption-dropout 0.1 does not apply to it"):
        merge_resumed(point.config, {"caption_dropout": 0.1})


def test_an_older_run_keeps_the_defaults_of_newer_settings(tmp_path):
    """A setting newer than the checkpoint is its default, what the run did: left out it stays so, given
    another value it is refused as a change (docs/training.md: "--resume keeps them ... and refuses a change")."""
    from dataclasses import replace

    from sdlab.train.config import TrainConfig, merge_resumed
    from sdlab.train.errors import TrainError
    from sdlab.train.loop import check_resume

    point = _resume_point(tmp_path, TrainConfig())
    point = replace(point, config=_stored_by_older_versions(point.config))
    cfg, changed = merge_resumed(point.config, {"loss_type": "l2", "debiased_estimation_loss": False})
    assert (cfg.caption_dropout, cfg.loss_type, changed) == (0.1, "l2", {})
    check_resume(point, cfg, global_batch=1)
    cfg, changed = merge_resumed(point.config, {"ip_noise_gamma": 0.1, "loss_type": "huber"})
    assert changed == {"ip_noise_gamma": (None, 0.1), "loss_type": ("l2", "huber")}
    with pytest.raises(TrainError, match="--ip-noise-gamma was None, now 0.1, --loss-type was 'l2', now 'huber'"):
        check_resume(point, cfg, global_batch=1)


def test_a_minimum_lr_ratio_the_schedule_ignores_needs_no_option_on_resume(tmp_path):
    """An older constant-schedule run stored --min-lr-ratio, which did nothing: it resumes without it. A cosine run
    resumed with --lr-schedule constant leaves its ratio behind (and says so). Only a ratio given now is refused
    with the constant schedule."""
    from sdlab.train.config import TrainConfig, merge_resumed
    from sdlab.train.errors import TrainError

    older = _stored_by_older_versions(TrainConfig(lr_schedule="constant").to_json()) | {"min_lr_ratio": 0.1}
    cfg, changed = merge_resumed(older, {})
    assert (cfg.lr_schedule, cfg.min_lr_ratio, changed) == ("constant", 0.0, {})
    cosine = TrainConfig(min_lr_ratio=0.1).to_json()
    cfg, changed = merge_resumed(cosine, {"lr_schedule": "constant"})
    assert changed == {"lr_schedule": ("cosine", "constant"), "min_lr_ratio": (0.1, 0.0)}
    with pytest.raises(TrainError, match="--min-lr-ratio 0.2 is the floor of the cosine schedule"):
        merge_resumed(older, {"min_lr_ratio": 0.2})


def test_an_older_lcd_run_checkpoint_resumes_with_latest(tmp_path, one_thread, capsys):
    """End to end: a --task lcd run checkpoint whose stored config is the older versions' resumes with
    ``--resume latest`` alone."""
    from train_fixtures import run_in_process

    from sdlab.train.cli import main
    from sdlab.train.run_checkpoint import checkpoint_path, save_run_checkpoint

    out = tmp_path / "run"
    run_in_process(out, write_tiny_model(tmp_path / "tiny-sd1.safetensors"), write_caption_folder(tmp_path / "data",
                   n=2, size=16), "--task", "lcd", "--max-steps", "1", "--checkpoint-every", "1")
    state = load_run_checkpoint(checkpoint_path(out / "checkpoints", 1))
    state["config"] = _stored_by_older_versions(state["config"])
    save_run_checkpoint({k: v for k, v in state.items() if k != "format"}, out / "checkpoints", 1)
    assert main(["--output-dir", str(out), "--resume", "latest", "--max-steps", "2", "--no-progress"]) == 0, \
        capsys.readouterr().err
    assert load_run_checkpoint(checkpoint_path(out / "checkpoints", 2))["config"]["caption_dropout"] == 0.0


def test_resume_warns_when_the_dataset_changed_since_the_checkpoint(tmp_path, one_thread, caplog):
    """The checkpoints keep a digest of the samples (path below --data-dir, size, caption, repeats): a resume
    over the same data says nothing; over a folder whose images or captions changed it warns once that the
    run goes on with the new data and will not equal an uninterrupted run."""
    from train_fixtures import run_in_process

    data = write_caption_folder(tmp_path / "data", n=4, size=16)
    model = write_tiny_model(tmp_path / "tiny-sd1.safetensors")
    out = tmp_path / "run"
    common = ("--batch-size", "2", "--checkpoint-every", "1")
    run_in_process(out, model, data, *common, "--max-steps", "1")
    caplog.clear()
    run_in_process(out, model, data, *common, "--max-steps", "2", "--resume", "latest")
    assert "is not the dataset" not in caplog.text
    (data / "img01.txt").write_text("a blue circle, recaptioned")
    caplog.clear()
    run_in_process(out, model, data, *common, "--max-steps", "3", "--resume", "latest")
    warned = [r.getMessage() for r in caplog.records if "is not the dataset" in r.getMessage()]
    assert len(warned) == 1 and "step-00000002.pt trained on (4 images then, 4 now" in warned[0], warned


def test_resume_from_a_deleted_step_names_the_checkpoints_kept(tmp_path):
    """`--resume .../step-00000002.pt` after the run deleted it (it keeps its newest --keep-checkpoints): one
    error line naming the steps the folder holds and why the older ones are gone."""
    data = write_caption_folder(tmp_path / "data", n=2, size=16)
    model = write_tiny_model(tmp_path / "tiny-sd1.safetensors")
    out = tmp_path / "run"
    run_cli(cli_args(out, model, data, "--max-steps", "4", "--checkpoint-every", "1"))
    gone = out / "checkpoints" / "step-00000002.pt"
    assert not gone.exists()
    proc = subprocess.run([sys.executable, "-m", "sdlab.train.cli", "--resume", str(gone), "--output-dir",
                           str(tmp_path / "at-2"), "--max-steps", "2"], env=cli_env(), capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"sdlab: error: --resume {gone}: no such run checkpoint (or use --resume latest); {out / 'checkpoints'} "
        f"holds those of step 3, 4: a run keeps its newest --keep-checkpoints (2 by default) and deletes the older ones")
    for folder in (out / "checkpoints", out):      # the checkpoints folder, or the run's folder
        proc = subprocess.run([sys.executable, "-m", "sdlab.train.cli", "--resume", str(folder), "--output-dir",
                               str(tmp_path / "at-2"), "--max-steps", "2"],
                              env=cli_env(), capture_output=True, text=True)
        assert proc.returncode == 2
        assert proc.stderr.strip().splitlines()[-1] == (
            f"sdlab: error: --resume {folder}: a folder, not a run checkpoint (name one of its steps' files, or use "
            f"--resume latest); {out / 'checkpoints'} holds those of step 3, 4")
