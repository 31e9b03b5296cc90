"""`sdlab train` under user mistakes, damaged checkpoints and full disks, and what a new user needs from it:
every mistake is one `sdlab: error:` line with exit status 2 before the long work; `--resume latest` takes
the run's stored settings; a damaged newest checkpoint falls back to the newest valid one; a full disk is
named; the help describes every option; the model's native size is the default resolution.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sdlab.cli import main as sdlab_main
from sdlab.train.cli import _with_native_resolution
from sdlab.train.config import TrainConfig
from sdlab.train.data import scan_dataset
from sdlab.train.errors import TrainError
from sdlab.train.run_checkpoint import (
    checksum_path,
    find_resume_point,
    list_checkpoints,
    load_run_checkpoint,
    save_run_checkpoint,
)
from train_fixtures import CLI_RES, pattern_image, write_caption_folder, write_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _sdlab(capsys, *argv: str) -> tuple[int, str, str]:
    code = sdlab_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("sdlab: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --- settings ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("options", "named"), [
    (["--learning-rate", "abc"], "--learning-rate"),
    (["--max-steps", "-5"], "--max-steps"),
    (["--max-steps", "0"], "--max-steps must be at least 1; got 0"),           # no run that trains nothing
    (["--max-steps", "1.5"], "--max-steps"),
    (["--mixed-precision", "fp16"], "--mixed-precision"),
    (["--lr-schedule", "linear"], "--lr-schedule"),
    (["--save-dtype", "int8"], "--save-dtype"),
    (["--task", "bogus"], "--task"),
    (["--batch-size", "0"], "--batch-size"),
    (["--caption-dropout", "nan"], "--caption-dropout"),
    (["--resolution", "100"], "--resolution"),
    (["--device", "foo"], "--device"),
    (["--no-center-crop", "--cache-latents"], "--cache-latents"),
])
def test_bad_settings_are_one_error_line_before_loading(tmp_path, capsys, options, named):
    data = write_caption_folder(tmp_path / "data", n=1, size=16)
    missing_model = tmp_path / "never-read.safetensors"  # the settings are checked before the model is opened
    code, _, err = _sdlab(capsys, "train", "--model", missing_model, "--data-dir", data, "--output-dir",
                          tmp_path / "run", *options)
    assert code == 2
    assert named in _one_error_line(err)


def test_a_settings_word_is_read_in_any_case(tmp_path, capsys):
    """--device, --mixed-precision and the other choices read their word in any case, as the other subcommands'
    (`sdlab txt2img --device CPU`): the run gets past its settings to the model (here missing); a word that is no
    choice in any case is still refused naming the choices, FP16 as fp16."""
    data = write_caption_folder(tmp_path / "data", n=1, size=16)
    missing_model = tmp_path / "never-read.safetensors"
    code, _, err = _sdlab(capsys, "train", "--model", missing_model, "--data-dir", data, "--output-dir",
                          tmp_path / "run", "--device", "CPU", "--mixed-precision", "BF16", "--save-dtype", "FP16",
                          "--lr-schedule", "Cosine", "--data-layout", "Plain")
    assert code == 2 and "never-read.safetensors" in _one_error_line(err), err
    config = TrainConfig(device="Cuda:1", mixed_precision="BF16", task="UNet", loss_type="Huber")
    assert (config.device, config.mixed_precision, config.task, config.loss_type) == ("cuda:1", "bf16", "unet", "huber")
    assert TrainConfig(device="CPU").to_json()["device"] == "cpu"
    with pytest.raises(TrainError, match="--mixed-precision fp16 is not supported"):
        TrainConfig(mixed_precision="FP16")
    with pytest.raises(TrainError, match="--mixed-precision must be one of no, bf16; got 'BF17'"):
        TrainConfig(mixed_precision="BF17")


def test_config_file_mistakes_name_the_file_and_key(tmp_path, capsys):
    data = write_caption_folder(tmp_path / "data", n=1, size=16)
    cases = {"unknown.toml": ("max_steps = 3\nlearning_rat = 1e-4\n", "learning_rat"),
             "broken.toml": ("max_steps = \n", "broken.toml"),
             "typed.json": ('{"max_steps": "many"}', "--max-steps"),
             "list.json": ("[1, 2]", "list.json")}
    for name, (text, named) in cases.items():
        (tmp_path / name).write_text(text)
        code, _, err = _sdlab(capsys, "train", "--config", tmp_path / name, "--model", tmp_path / "m.safetensors",
                              "--data-dir", data)
        assert code == 2 and named in _one_error_line(err), (name, err)
    with pytest.raises(TrainError, match="--adam-beta1"):
        TrainConfig(adam_beta1=1.5)  # the Python API checks every field the same way
    with pytest.raises(TrainError, match="--max-steps must be an integer"):
        TrainConfig(max_steps="10")


def test_a_data_dir_that_is_a_file_is_named_as_not_a_folder(tmp_path, capsys):
    picture = tmp_path / "red.png"
    pattern_image(0, 16).save(picture)
    code, _, err = _sdlab(capsys, "train", "--model", tmp_path / "never-read.safetensors", "--data-dir", picture)
    assert code == 2 and f"dataset folder {picture} is not a folder" in _one_error_line(err)


def test_resume_latest_of_an_empty_run_without_a_model_is_one_error(tmp_path, capsys):
    """Nothing to resume and nothing to start from: one line saying both, not a 'starting at step 0' warning
    followed by an error that asks for --model."""
    code, _, err = _sdlab(capsys, "train", "--output-dir", tmp_path / "run", "--resume", "latest")
    line = _one_error_line(err)
    assert code == 2 and "--resume latest: no run checkpoint in" in line and "needs --model and --data-dir" in line
    assert "starting at step 0" not in err


def test_empty_dataset_is_an_error_before_the_model_loads(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.png").write_bytes(b"not a png")
    (empty / "a.txt").write_text("a caption")
    code, _, err = _sdlab(capsys, "train", "--model", tmp_path / "never-read.safetensors", "--data-dir", empty)
    line = _one_error_line(err)
    assert code == 2 and "no usable training images" in line and "broken_image" in line


def test_jsonl_lines_with_bad_names_or_bytes_are_skipped_and_counted(tmp_path):
    for i in range(2):
        pattern_image(i, 16).save(tmp_path / f"p{i}.png")
    lines = [json.dumps({"file_name": "p0.png", "text": "a red square"}).encode(),
             json.dumps({"file_name": 5, "text": "a number"}).encode(),
             json.dumps({"file_name": ["p1.png"], "text": "a list"}).encode(),
             b'{"file_name": "p1.png", "text": "caf\xe9"}',  # Latin-1, not UTF-8
             b'{"file_name": "p1.png", "text": "caf\\udce9"}',  # JSON's escape of a lone surrogate, not UTF-8
             json.dumps([1, 2]).encode(),
             json.dumps({"file_name": "p1.png", "text": "a blue circle"}).encode()]
    (tmp_path / "metadata.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    scan = scan_dataset(tmp_path)
    assert [(s.path.name, s.caption) for s in scan.samples] == [("p0.png", "a red square"), ("p1.png", "a blue circle")]
    assert scan.skipped["bad_metadata_line"] == 5


def test_caption_files_that_are_not_utf8_are_skipped_and_named(tmp_path, caplog):
    folder = write_caption_folder(tmp_path / "data", n=3, size=16)
    (folder / "img00.txt").write_bytes("café au lait".encode())
    (folder / "img01.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    with caplog.at_level(logging.WARNING):
        scan = scan_dataset(folder)
    assert [(s.path.name, s.caption) for s in scan.samples] == [("img00.png", "café au lait"),
                                                                 ("img02.png", "a green stripe")]
    assert scan.skipped == {"bad_caption": 1}
    assert f"its caption {folder / 'img01.txt'} is not UTF-8 text: the byte 0xE9 at byte 4" in caplog.text


def test_a_dataset_without_utf8_captions_is_an_error_before_the_model_loads(tmp_path, capsys):
    folder = write_caption_folder(tmp_path / "data", n=3, size=16)
    for caption in folder.glob("*.txt"):
        caption.write_bytes(b"caf\xe9")
    code, _, err = _sdlab(capsys, "train", "--model", tmp_path / "never-read.safetensors", "--data-dir", folder)
    assert code == 2 and "no usable training images (skipped: 3 bad_caption)" in _one_error_line(err)


def test_native_resolution_is_the_default_and_far_sizes_warn(caplog):
    assert TrainConfig().resolution is None
    shipped_like = SimpleNamespace(default_size=64)
    assert _with_native_resolution(TrainConfig(model="m"), shipped_like).resolution == 64
    with caplog.at_level(logging.WARNING):
        assert _with_native_resolution(TrainConfig(model="m", resolution=512), shipped_like).resolution == 512
    assert "far from the model's native 64 px" in caplog.text


def test_help_describes_every_option_and_its_values(capsys):
    with pytest.raises(SystemExit) as exit_info:
        sdlab_main(["train", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for expected in ("peak AdamW learning rate", "(one of: unet, vae, text, embedding, lcd)", "(one of: no, bf16)",
                     "(one of: cosine, constant)", "(one of: fp32, fp16, bf16)", "'latest' takes the newest valid run",
                     "every setting stored in it except those given again", "the model's native size",
                     "interrupted.safetensors"):
        assert expected in text, expected
    for option in [f for f in TrainConfig.__dataclass_fields__.values()]:
        assert option.metadata.get("help"), option.name


# --- run checkpoints ---------------------------------------------------------------------------------------


def _state(step: int, value: float = 1.0) -> dict:
    return {"step": step, "config": {"batch_size": 1}, "global_batch": 1, "modules": {"m": {"w": torch.full((64,), value)}},
            "optimizer": {}, "scheduler": {}, "rng": {}}


def test_resume_latest_falls_back_past_damaged_checkpoints(tmp_path, caplog):
    folder = tmp_path / "checkpoints"
    for step in range(1, 6):
        save_run_checkpoint(_state(step), folder, step)
    paths = dict(list_checkpoints(folder))
    assert checksum_path(paths[5]).read_text().split()[1] == paths[5].name  # sha256sum -c format
    size = paths[5].stat().st_size
    paths[5].write_bytes(paths[5].read_bytes()[: size // 2])                    # truncated
    paths[4].write_bytes(bytes(paths[4].stat().st_size))                        # zeroed
    data = bytearray(paths[3].read_bytes())
    data[size // 2] ^= 0x10                                                     # one bit flipped
    paths[3].write_bytes(bytes(data))
    save_run_checkpoint(_state(2, float("nan")), folder, 2)                     # written non-finite
    with caplog.at_level(logging.WARNING):
        point = find_resume_point(folder, "latest")
    assert point.step == 1 and point.path == paths[1]
    for step in (5, 4, 3, 2):
        assert f"step-{step:08d}.pt is damaged" in caplog.text
    assert "resuming from step-00000001.pt, the newest valid run checkpoint" in caplog.text
    with pytest.raises(TrainError, match="is damaged"):
        find_resume_point(folder, str(paths[3]))  # a named checkpoint does not fall back
    # without its .sha256 (older runs), a checkpoint is checked by loading it
    checksum_path(paths[1]).unlink()
    assert load_run_checkpoint(paths[1])["step"] == 1
    paths[1].write_bytes(b"\0" * 100)
    with pytest.raises(TrainError, match="every run checkpoint .* is damaged"):
        find_resume_point(folder, "latest")


@pytest.mark.parametrize("floats", [64, 100_000])
def test_full_disk_during_a_checkpoint_write_says_so(tmp_path, monkeypatch, floats):
    folder = tmp_path / "checkpoints"
    save_run_checkpoint(_state(1), folder, 1)
    real_save = torch.save
    # what torch reports when the disk fills during the write (writing to /dev/full gives exactly that):
    # "[enforce fail at inline_container.cc:672] . unexpected pos ..." for a large file, "basic_ios::clear:
    # iostream error" for a small one
    monkeypatch.setattr(torch, "save", lambda obj, f: real_save(obj, "/dev/full"))
    big = _state(2) | {"modules": {"m": {"w": torch.ones(floats)}}}
    with pytest.raises(TrainError, match="the disk is full"):
        save_run_checkpoint(big, folder, 2)
    assert [s for s, _ in list_checkpoints(folder)] == [1] and not [p for p in folder.iterdir() if p.suffix == ".tmp"]
    monkeypatch.setattr(torch, "save", real_save)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: SimpleNamespace(total=10**9, used=10**9, free=100))
    with pytest.raises(TrainError, match=r"the disk is full \(it needs at least"):  # checked before writing
        save_run_checkpoint(_state(2), folder, 2)


# --- whole runs ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("robust")
    return write_tiny_model(root / "tiny-sd1.safetensors"), write_caption_folder(root / "data", n=4, size=24)


def test_resume_latest_takes_the_stored_settings(tiny, tmp_path, capsys):
    model, data = tiny
    out = tmp_path / "run"
    common = ("--resolution", CLI_RES, "--no-progress", "--num-workers", "1", "--device", "cpu")
    code, stdout, _ = _sdlab(capsys, "train", "--model", model, "--data-dir", data, "--output-dir", out, *common,
                             "--max-steps", "2", "--checkpoint-every", "1", "--batch-size", "2", "--ema-decay", "0.9")
    assert code == 0
    assert f"weights: {out / 'final.safetensors'}, EMA: {out / 'final-ema.safetensors'}" in stdout
    assert "s/step" in stdout and "images/s" in stdout

    # a different batch would change the data stream: refused, before loading anything
    code, _, err = _sdlab(capsys, "train", "--output-dir", out, "--resume", "latest", "--batch-size", "4")
    assert code == 2 and "images per step" in _one_error_line(err)
    assert "resuming" not in err                               # a refused resume is not announced first
    # another prediction type or model would change what the rest of the run trains: refused, naming it
    # (the checkpoint stores the family and prediction type the load detected)
    code, _, err = _sdlab(capsys, "train", "--output-dir", out, "--resume", "latest", "--prediction", "v")
    assert code == 2 and "--prediction was 'eps', now 'v'" in _one_error_line(err)
    code, _, err = _sdlab(capsys, "train", "--output-dir", out, "--resume", "latest", "--family", "sd2")
    assert code == 2 and "--family was 'sd1', now 'sd2'" in _one_error_line(err)

    # nothing but the run folder and a longer run: model, data, batch, EMA, resolution come from the checkpoint
    # the detected family and prediction named again, the run folder under another spelling: no change
    code, stdout, err = _sdlab(capsys, "train", "--output-dir", f"{out}/", "--resume", "latest", "--max-steps", "3",
                               "--no-progress", "--family", "sd1", "--prediction", "epsilon")
    assert code == 0, err
    assert "resuming" in err and "from step 2 " in err and "changed: --max-steps 2 -> 3" in err
    assert "--output-dir" not in err and "--family" not in err and "--prediction" not in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 3 and summary["resolution"] == CLI_RES and summary["ema_weights"]
    assert "to step 3" in stdout


def test_a_resume_from_another_working_directory_names_no_output_dir_change(tiny, tmp_path, capsys, monkeypatch):
    """Before, a run started with a relative --output-dir and resumed from another working directory was
    announced with 'changed: --output-dir runs/a -> /abs/runs/a', though it goes on in the same folder."""
    model, data = tiny
    (tmp_path / "first").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "first")
    common = ("--resolution", CLI_RES, "--no-progress", "--num-workers", "1", "--device", "cpu")
    code, _, err = _sdlab(capsys, "train", "--model", model, "--data-dir", data, "--output-dir", "runs/a", *common,
                          "--max-steps", "1", "--lora-rank", "2")
    assert code == 0, err
    monkeypatch.chdir(tmp_path / "elsewhere")
    out = tmp_path / "first" / "runs" / "a"
    code, _, err = _sdlab(capsys, "train", "--output-dir", out, "--resume", "latest", "--max-steps", "2")
    assert code == 0, err
    assert f"sdlab: resuming {out} from step 1 (step-00000001.pt) to step 2; changed: --max-steps 1 -> 2\n" in err
    # a checkpoint written into another folder is a change of it, named by the folder the checkpoint is in
    code, _, err = _sdlab(capsys, "train", "--resume", out / "checkpoints" / "step-00000001.pt", "--output-dir", "b",
                          "--max-steps", "1")
    assert code == 0, err
    assert f"changed: --output-dir {out} -> b\n" in err


def test_a_resume_whose_dataset_moved_says_what_to_do(tiny, tmp_path, capsys):
    """Before, 'sdlab: error: dataset folder /abs/data does not exist', no word that it is the folder the
    checkpoint names nor what to do (a changed --data-dir is refused: the path defines the run); and
    'sdlab: resuming ... to step 2' was printed before the error."""
    model, _ = tiny
    data = write_caption_folder(tmp_path / "data", n=2, size=24)
    out = tmp_path / "run"
    common = ("--resolution", CLI_RES, "--no-progress", "--num-workers", "1", "--device", "cpu")
    code, _, err = _sdlab(capsys, "train", "--model", model, "--data-dir", data, "--output-dir", out, *common,
                          "--max-steps", "1", "--lora-rank", "2")
    assert code == 0, err
    data.rename(tmp_path / "moved")
    code, _, err = _sdlab(capsys, "train", "--output-dir", out, "--resume", "latest", "--max-steps", "2")
    assert code == 2 and _one_error_line(err) == (
        f"sdlab: error: --data-dir {data}, which the run of {out / 'checkpoints' / 'step-00000001.pt'} trained on, "
        f"does not exist (moved?): a run resumes on the folder it trained on (its path defines the run); put the "
        f"dataset back there, or train a new run on it (another --output-dir)")
    assert "resuming" not in err              # a refused resume is not announced first (it was, before this error)


def test_a_loss_that_becomes_nan_is_one_error_line_without_a_warning(tiny, tmp_path, capsys):
    """The message reads the loss without autograd's 'Converting a tensor with requires_grad=True to a scalar'
    warning (one per process under torchrun) before it."""
    model, data = tiny
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        code, _, err = _sdlab(capsys, "train", "--model", model, "--data-dir", data, "--output-dir", tmp_path / "run",
                              "--resolution", CLI_RES, "--no-progress", "--num-workers", "1", "--device", "cpu",
                              "--max-steps", "6", "--learning-rate", "1e30", "--lr-schedule", "constant")
    assert code == 2 and "the loss became nan" in _one_error_line(err)
