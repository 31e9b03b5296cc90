"""Where a command writes is checked before its work (`sdlab.utils.files.make_output_folder`): an output
folder behind a file, an existing file, or a read-only one is one `sdlab: error:` line naming the option,
exit status 2, before any model is built or loaded and before any picture is drawn. Any other error the
system gives about a path is a user error too, never an internal one."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from PIL import Image

from cli_helpers import run
from sdlab.utils import files
from sdlab.utils.files import OutputFolderError, check_output_folder, make_output_folder
from train_fixtures import write_caption_folder

PROMPT = "a red apple on a blue background"


def _read_only(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """Creating a file in `folder` fails as on a read-only file system."""
    create = files.tempfile.NamedTemporaryFile

    def refuse(*args, dir=None, **kwargs):
        if Path(dir).absolute() == folder.absolute():
            raise OSError(errno.EROFS, "Read-only file system", str(dir))
        return create(*args, dir=dir, **kwargs)

    monkeypatch.setattr(files.tempfile, "NamedTemporaryFile", refuse)


def _never(what: str):
    def called(*args, **kwargs):
        raise AssertionError(f"{what} before the output folder was checked")

    return called


# --- the check itself -------------------------------------------------------------------------------------

def test_make_output_folder_makes_the_folder_and_leaves_no_file(tmp_path: Path) -> None:
    folder = make_output_folder(tmp_path / "a" / "b")
    assert folder.is_dir() and list(folder.iterdir()) == []


@pytest.mark.parametrize(("under", "message"), [
    ("taken", "exists and is not a folder"),
    ("taken/sub", "cannot write to --out {}: Not a directory"),
])
def test_a_file_in_the_way_is_named(tmp_path: Path, under: str, message: str) -> None:
    (tmp_path / "taken").write_text("keep")
    folder = tmp_path / under
    with pytest.raises(OutputFolderError, match="--out") as error:
        make_output_folder(folder, "--out")
    assert message.format(folder) in str(error.value) and str(folder) in str(error.value)
    assert (tmp_path / "taken").read_text() == "keep"


def test_a_read_only_folder_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _read_only(monkeypatch, tmp_path)
    with pytest.raises(OutputFolderError, match="cannot write to --output-dir .*: Read-only file system"):
        make_output_folder(tmp_path, "--output-dir")


def test_check_output_folder_leaves_no_folder_it_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "kept").mkdir()
    check_output_folder(tmp_path / "kept" / "new" / "deeper")
    assert list(tmp_path.iterdir()) == [tmp_path / "kept"] and list((tmp_path / "kept").iterdir()) == []
    _read_only(monkeypatch, tmp_path / "new" / "deeper")
    with pytest.raises(OutputFolderError):
        check_output_folder(tmp_path / "new" / "deeper")
    assert list(tmp_path.iterdir()) == [tmp_path / "kept"]


# --- every command that writes ----------------------------------------------------------------------------

def _new_model(tmp_path: Path, out: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    import sdlab.checkpoints.create

    monkeypatch.setattr(sdlab.checkpoints.create, "new_bundle", _never("the model was built"))
    return ["new-model", str(out / "m.safetensors"), "--tiny"]


def _train(tmp_path: Path, out: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    import sdlab.train.cli

    monkeypatch.setattr(sdlab.train.cli, "load_bundle", _never("the model was loaded"))
    data = write_caption_folder(tmp_path / "data", n=1, size=16)
    return ["train", "--model", str(tmp_path / "m.safetensors"), "--data-dir", str(data), "--output-dir", str(out),
            "--max-steps", "1", "--resolution", "64", "--num-workers", "0"]


def _eval(tmp_path: Path, out: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    import sdlab.api

    monkeypatch.setattr(sdlab.api, "load", _never("the model was loaded"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPT + "\n")
    return ["eval", str(prompts), "--out", str(out), "--no-progress"]


def _serve(tmp_path: Path, out: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    import sdlab.cli.serve

    monkeypatch.setattr(sdlab.cli.serve, "_listen", _never("the server started"))
    return ["serve", "--output-dir", str(out), "--port", "0"]


def _grid(tmp_path: Path, out: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    import sdlab.api

    monkeypatch.setattr(sdlab.api.Pipeline, "run", _never("a cell was drawn"))
    return ["grid", PROMPT, "--x", "steps=1,2", "--out", str(tmp_path / "g.png"), "--keep-cells", str(out),
            "--no-progress"]


def _txt2img(tmp_path: Path, out: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    import sdlab.api

    monkeypatch.setattr(sdlab.api.Pipeline, "run", _never("the picture was drawn"))
    return ["txt2img", PROMPT, "--steps", "2", "--out", f"{out}/", "--no-progress"]


def _upscale(tmp_path: Path, out: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    import sdlab.checkpoints.upscaler
    import sdlab.pipeline.upscale

    monkeypatch.setattr(sdlab.checkpoints.upscaler, "load_upscaler", _never("the upscaler was loaded"))
    monkeypatch.setattr(sdlab.pipeline.upscale, "upscale_image", _never("the picture was upscaled"))
    picture = tmp_path / "small.png"
    Image.new("RGB", (16, 16)).save(picture)
    model = tmp_path / "4x.safetensors"
    model.write_bytes(b"never read")
    return ["upscale", str(picture), "--model", str(model), "--out", str(out / "big.png")]


COMMANDS = {"new-model": (_new_model, "the output file's folder"), "train": (_train, "--output-dir"),
            "eval": (_eval, "--out"), "serve": (_serve, "--output-dir"), "grid": (_grid, "--keep-cells"),
            "txt2img": (_txt2img, "the output folder"), "upscale": (_upscale, "the folder of --out")}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("where", ["a file", "under a file", "read-only"])
def test_an_unwritable_output_is_one_error_line_before_any_work(tmp_path: Path, capsys, monkeypatch, command: str,
                                                               where: str) -> None:
    arguments, name = COMMANDS[command]
    taken = tmp_path / "taken"
    taken.write_text("keep")
    out = {"a file": taken, "under a file": taken / "sub", "read-only": tmp_path / "out"}[where]
    if where == "read-only":
        _read_only(monkeypatch, out)
    args = arguments(tmp_path, out, monkeypatch)
    if command == "new-model" and where == "a file":
        args[1] = str(taken / "m.safetensors")               # its folder is the file
    code, _, err = run(args, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("sdlab: error:"), err
    assert name in lines[0] and "internal error" not in lines[0], lines
    assert taken.read_text() == "keep"


def test_the_grid_names_an_unwritable_out_folder_before_drawing(tmp_path: Path, capsys, monkeypatch) -> None:
    import sdlab.api

    monkeypatch.setattr(sdlab.api.Pipeline, "run", _never("a cell was drawn"))
    (tmp_path / "taken").write_text("keep")
    code, _, err = run(["grid", PROMPT, "--x", "steps=1,2", "--out", str(tmp_path / "taken" / "g.png"),
                        "--no-progress"], capsys)
    assert code == 2 and f"the folder of --out {tmp_path / 'taken'} exists and is not a folder" in err, err


# --- the top-level handler --------------------------------------------------------------------------------

@pytest.mark.parametrize(("error", "code", "line"), [
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/x/file.png/run"), 2,
     "sdlab: error: /x/file.png/run: Not a directory"),
    (FileExistsError(errno.EEXIST, "File exists", "/x/file.png"), 2, "sdlab: error: /x/file.png: File exists"),
    (OSError(errno.EROFS, "Read-only file system", "/mnt/ro/out"), 2,
     "sdlab: error: /mnt/ro/out: Read-only file system"),
    (OSError(errno.EXDEV, "Invalid cross-device link", "/a", None, "/b"), 2,
     "sdlab: error: /a -> /b: Invalid cross-device link"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/x/in.png"), 2,
     "sdlab: error: /x/in.png: No such file or directory\n"),
    (PermissionError(errno.EACCES, "Permission denied", "/x/out.png"), 2,
     "sdlab: error: /x/out.png: Permission denied\n"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/x/folder"), 2, "sdlab: error: /x/folder: Is a directory\n"),
    (FileNotFoundError("the hint is gone"), 2, "sdlab: error: the hint is gone\n"),
    (OSError(errno.EIO, "Input/output error"), 1, "sdlab: error: internal error: OSError:"),
])
def test_an_os_error_about_a_path_is_a_user_error(capsys, monkeypatch, error: OSError, code: int, line: str) -> None:
    import sdlab.cli.inspect

    def fail(args) -> int:
        raise error

    monkeypatch.setattr(sdlab.cli.inspect, "run_inspect", fail)
    status, _, err = run(["inspect", "model.safetensors"], capsys)
    assert status == code and err.startswith(line) and err.count("\n") == 1, err
