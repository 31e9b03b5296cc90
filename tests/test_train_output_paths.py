"""Every folder and file a training run writes is checked once its --output-dir is made, before the model loads:
a `checkpoints` file, a --cache-dir naming a file, a folder named log.csv are each one error line, nothing trained
and nothing left behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdlab.cli import main as sdlab_main
from test_train_run_folders import _kohya_folder
from train_fixtures import CLI_RES, pattern_image, write_caption_folder, write_tiny_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("paths") / "tiny-sd1.safetensors")


def _train(capsys, model: Path, data: Path, out: Path, *extra: str) -> tuple[int, str]:
    code = sdlab_main([str(a) for a in ("train", "--model", model, "--data-dir", data, "--output-dir", out,
                                        "--resolution", CLI_RES, "--no-progress", "--num-workers", "1",
                                        "--device", "cpu", "--lora-rank", "2", "--max-steps", "1", *extra)])
    return code, capsys.readouterr().err


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("sdlab: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("setup,extra,message", [
    (lambda out: (out / "checkpoints").write_text(""), (),
     "the run checkpoints' folder {out}/checkpoints exists and is not a folder"),
    (lambda out: (out / "samples").write_text(""), ("--sample-every", "1", "--sample-prompts", "a cat"),
     "the previews' folder {out}/samples exists and is not a folder"),
    (lambda out: (out.parent / "cache").write_text(""), ("--cache-latents", "--cache-dir", "{out}/../cache"),
     "--cache-dir {out}/../cache exists and is not a folder"),
    (lambda out: (out / "log.csv").mkdir(), (),
     "{out}/log.csv is a folder where the run writes a file of that name: move it out of --output-dir {out}"),
])
def test_every_output_path_is_checked_before_the_model_loads(model, tmp_path, capsys, monkeypatch, setup, extra,
                                                             message):
    """Before, a `checkpoints` file in --output-dir, or a --cache-dir naming a file, failed after the model had
    loaded (at the first checkpoint, or in the latent cache with 'cachefile/vae-...: Not a directory')."""
    import sdlab.train.cli as train_cli

    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded before the output paths were checked")

    monkeypatch.setattr(train_cli, "load_bundle", no_model)
    data = write_caption_folder(tmp_path / "data", n=2, size=24)
    out = tmp_path / "run"
    out.mkdir()
    setup(out)
    before = sorted(out.iterdir())
    code, err = _train(capsys, model, data, out, *(a.format(out=out) for a in extra))
    assert code == 2 and _error_line(err) == "sdlab: error: " + message.format(out=out)
    assert sorted(out.iterdir()) == before                    # nothing written, nothing left behind


def test_a_run_whose_output_dir_is_inside_its_data_dir_leaves_it_out(model, tmp_path, capsys, monkeypatch):
    """The new run's own --output-dir below --data-dir holds its lock when the scan runs: left out, said once."""
    import sdlab.train.cli as train_cli

    scans = []
    real_scan = train_cli.scan_dataset
    monkeypatch.setattr(train_cli, "scan_dataset", lambda *a: scans.append(real_scan(*a)) or scans[-1])
    data = _kohya_folder(tmp_path / "data")
    out = data / "run"
    out.mkdir()
    pattern_image(3, 24).save(out / "leftover.png")
    (out / "checkpoints").write_text("")                      # stops the run once the scan is done
    code, err = _train(capsys, model, data, out)
    assert code == 2 and "checkpoints' folder" in _error_line(err)
    assert scans[0].layout == "kohya" and len(scans[0].samples) == 3
    assert f"left out {out}, a run folder of sdlab train" in err


@pytest.mark.parametrize("alias", ["same", "dotdot", "link"])
def test_an_output_dir_that_is_the_data_dir_is_refused_before_anything_is_read(model, tmp_path, capsys, monkeypatch,
                                                                               alias):
    """Before, --output-dir equal to --data-dir trained, writing samples/ among the training images: a later
    --resume scanned the previews (in a kohya dataset, `auto` then read the folders as plain)."""
    import sdlab.train.cli as train_cli

    def no_scan(*args, **kwargs):
        raise AssertionError("the data was read")

    monkeypatch.setattr(train_cli, "scan_dataset", no_scan)
    data = _kohya_folder(tmp_path / "data")
    out = {"same": data, "dotdot": data / "10_sks dog" / "..", "link": tmp_path / "link"}[alias]
    if alias == "link":
        out.symlink_to(data)
    before = sorted(data.rglob("*"))
    code, err = _train(capsys, model, data, out)
    assert code == 2 and _error_line(err) == (
        f"sdlab: error: --output-dir {out} is --data-dir {data}: the run's previews and weights would lie among "
        f"its training images; give the run a folder of its own (one inside --data-dir, such as "
        f"{data / 'runs' / 'first'}, is left out of the scan)")
    assert sorted(data.rglob("*")) == before                 # no lock, no folder made
