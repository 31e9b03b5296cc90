"""`sdlab txt2img` outputs: numbered files that never overwrite, JPEG / WebP, all-or-nothing batches, a full
disk, long names, LoRAs and the model recorded and re-applied by `--from-png`, hostile input images,
`--version`, `python -m sdlab`, and the exit status of SIGTERM."""

from __future__ import annotations

import errno
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin
from safetensors.torch import load_file, save_file

from bundle_fixtures import tiny_bundle, write_original
from cli_helpers import pixels, run
from sdlab.pipeline import png_info
from sdlab.pipeline.png_info import lora_hash, parse_parameters, read_parameters

FAST = ["--steps", "2", "--width", "32", "--height", "32", "--no-progress", "--seed", "5"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    paths = {"a": folder / "tiny-a.safetensors", "b": folder / "tiny-b.safetensors"}
    write_original(tiny_bundle("sd1"), paths["a"], junk=False)
    write_original(tiny_bundle("sd1", seed=3), paths["b"], junk=False)
    return paths


def _lora(path: Path, scale: float = 0.5) -> Path:
    """A kohya-format LoRA on the first text-encoder layer of the tiny SD1 model (width 64)."""
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for module in ("self_attn_q_proj", "self_attn_v_proj", "mlp_fc1"):
        name = f"lora_te_text_model_encoder_layers_0_{module}"
        out_features = 128 if module == "mlp_fc1" else 64
        tensors[f"{name}.lora_down.weight"] = torch.randn(4, 64, generator=g) * scale
        tensors[f"{name}.lora_up.weight"] = torch.randn(out_features, 4, generator=g) * scale
        tensors[f"{name}.alpha"] = torch.tensor(4.0)
    save_file(tensors, str(path))
    return path


def test_folder_outputs_are_numbered_like_a1111_and_never_overwritten(models, tmp_path, capsys):
    out = tmp_path / "outputs"
    args = ["txt2img", "two cats", "--model", str(models["a"]), "--out", str(out), *FAST]
    assert run([*args, "--batch", "2"], capsys)[0] == 0
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(first) == ["00000-5-two-cats.png", "00001-6-two-cats.png"]
    code, stdout, _ = run(args, capsys)                      # the same seed and prompt again
    assert code == 0 and stdout.strip() == str(out / "00002-5-two-cats.png")
    assert sorted(p.name for p in out.iterdir()) == [*sorted(first), "00002-5-two-cats.png"]
    assert all((out / name).read_bytes() == data for name, data in first.items())


def test_folder_output_names_keep_a_prompts_words_in_any_script(models, tmp_path, capsys):
    """A1111 keeps a prompt's non-ASCII words in its file names; sdlab dropped them ('猫 on blue' -> 'on-blue')."""
    out = tmp_path / "outputs"
    code, stdout, _ = run(["txt2img", "猫 on blue, café_au_lait", "--model", str(models["a"]), "--out", str(out),
                           *FAST], capsys)
    assert code == 0 and [p.name for p in out.iterdir()] == ["00000-5-猫-on-blue-café-au-lait.png"]
    assert stdout.strip() == str(out / "00000-5-猫-on-blue-café-au-lait.png")

@pytest.mark.parametrize("suffix, fmt", [(".jpg", "JPEG"), (".webp", "WEBP")])
def test_out_jpg_and_webp_write_those_formats_with_the_parameters(models, tmp_path, capsys, suffix, fmt):
    out = tmp_path / f"x{suffix}"
    code, stdout, _ = run(["txt2img", "a red apple", "--model", str(models["a"]), "--out", str(out), *FAST], capsys)
    assert code == 0 and stdout.strip() == str(out) and out.is_file()
    with Image.open(out) as image:
        assert image.format == fmt
    params = parse_parameters(read_parameters(out))
    assert params["Prompt"] == "a red apple" and params["Seed"] == 5
    again = tmp_path / "again.png"
    assert run(["txt2img", "--from-png", str(out), "--model", str(models["a"]), "--out", str(again), "--no-progress"],
               capsys)[0] == 0
    assert parse_parameters(read_parameters(again))["Seed"] == 5


@pytest.mark.parametrize("name", ["x.gif", "x.bmp", "run.v2"])
def test_unknown_extensions_are_refused_before_any_work(models, tmp_path, capsys, name):
    code, _, err = run(["txt2img", "p", "--model", str(models["a"]), "--out", str(tmp_path / name), *FAST], capsys)
    assert code == 2 and err.count("sdlab: error:") == 1 and ".png, .jpg, .jpeg, .webp" in err
    assert list(tmp_path.iterdir()) == []


def test_full_disk_while_saving_a_batch_writes_nothing_and_says_so(models, tmp_path, capsys, monkeypatch):
    real_fsync, calls = png_info.os.fsync, []

    def fsync_then_full(fd):
        calls.append(fd)
        if len(calls) == 2:                                # the second image of the batch
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(png_info.os, "fsync", fsync_then_full)
    for out in (tmp_path / "b.png", tmp_path / "folder"):
        calls.clear()
        code, _, err = run(["txt2img", "p", "--model", str(models["a"]), "--batch", "2", "--out", str(out), *FAST],
                           capsys)
        assert code == 2 and err.count("sdlab: error:") == 1 and "disk is full" in err and "Traceback" not in err
    assert list(tmp_path.rglob("*.png")) == [] and list(tmp_path.rglob("*.tmp")) == []


def test_output_name_too_long_is_refused_before_generating(models, tmp_path, capsys, monkeypatch):
    from sdlab.api import Pipeline

    monkeypatch.setattr(Pipeline, "run", lambda *a, **k: pytest.fail("generated before checking the name"))
    out = tmp_path / ("a" * 300 + ".png")
    code, _, err = run(["txt2img", "p", "--model", str(models["a"]), "--out", str(out), *FAST], capsys)
    assert code == 2 and err.count("sdlab: error:") == 1 and "bytes" in err and "Traceback" not in err, err


def test_width_zero_is_an_error_like_other_bad_sizes(models, tmp_path, capsys):
    for flag in ("--width", "--height"):
        code, _, err = run(["txt2img", "p", "--model", str(models["a"]), "--out", str(tmp_path / "z.png"),
                            "--steps", "1", flag, "0", "--no-progress"], capsys)
        assert code == 2 and flag in err and not (tmp_path / "z.png").exists()


def test_loras_are_recorded_and_reapplied_by_from_png(models, tmp_path, capsys):
    lora = _lora(tmp_path / "style.safetensors")
    plain, styled, again = tmp_path / "plain.png", tmp_path / "styled.png", tmp_path / "again.png"
    common = ["txt2img", "a red apple", "--model", str(models["a"]), *FAST]
    assert run([*common, "--out", str(plain)], capsys)[0] == 0
    assert run([*common, "--lora", f"{lora}:0.7", "--out", str(styled)], capsys)[0] == 0
    assert not np.array_equal(pixels(plain), pixels(styled))
    params = parse_parameters(read_parameters(styled))
    assert params["Prompt"] == "a red apple <lora:style:0.7>"
    assert params["Lora hashes"] == f"style: {lora_hash(lora)}"

    # the tag is taken out of the prompt and the LoRA found beside the picture: the same picture again
    assert run(["txt2img", "--from-png", str(styled), "--model", str(models["a"]), "--out", str(again),
                "--no-progress"], capsys)[0] == 0
    assert np.array_equal(pixels(styled), pixels(again))
    assert parse_parameters(read_parameters(again))["Prompt"] == "a red apple <lora:style:0.7>"

    # the same prompt typed with the tag (A1111 style) and a --lora-dir
    elsewhere = tmp_path / "loras"
    elsewhere.mkdir()
    lora.rename(elsewhere / lora.name)
    typed = tmp_path / "typed.png"
    code, _, err = run(["txt2img", "a red apple <lora:style:0.7>", "--model", str(models["a"]), *FAST,
                        "--lora-dir", str(elsewhere), "--out", str(typed)], capsys)
    assert code == 0 and np.array_equal(pixels(styled), pixels(typed))

    # renamed and moved into a folder of LoRAs: --from-png finds it by its recorded hash
    library = tmp_path / "library" / "styles"
    library.mkdir(parents=True)
    (elsewhere / lora.name).rename(library / "ink-v2.safetensors")
    (library / "aaa-download.safetensors").write_bytes(b"<!DOCTYPE html>")     # searched first, skipped
    by_hash = tmp_path / "by-hash.png"
    code, _, err = run(["txt2img", "--from-png", str(typed), "--model", str(models["a"]), "--lora-dir",
                        str(tmp_path / "library"), "--out", str(by_hash), "--no-progress"], capsys)
    assert code == 0, err
    assert "ink-v2.safetensors" in err and np.array_equal(pixels(styled), pixels(by_hash))
    assert err.count("found by its recorded hash") == 1                  # said once, however often it is looked up

    # a LoRA that cannot be found is an error, never a silent redraw without it
    code, _, err = run(["txt2img", "--from-png", str(styled), "--model", str(models["a"]),
                        "--out", str(tmp_path / "missing.png"), "--no-progress"], capsys)
    assert code == 2 and err.count("sdlab: error:") == 1 and "<lora:style:0.7>" in err and "--lora-dir" in err
    assert not (tmp_path / "missing.png").exists()


def test_a_lora_search_by_hash_starts_afresh_each_run(models, tmp_path, capsys):
    """What a run found (or did not find) by a recorded hash is its own: a LoRA put into the folder after a run
    that missed it is found by the next run in the same process (sdlab.api users, tests, a long-lived host)."""
    lora = _lora(tmp_path / "style.safetensors")
    pictures, library = tmp_path / "pictures", tmp_path / "library"
    pictures.mkdir()
    library.mkdir()
    styled = pictures / "styled.png"
    assert run(["txt2img", "a red apple", "--model", str(models["a"]), *FAST, "--lora", f"{lora}:0.7",
                "--out", str(styled)], capsys)[0] == 0
    redraw = ["txt2img", "--from-png", str(styled), "--model", str(models["a"]), "--lora-dir", str(library),
              "--no-progress", "--out"]
    code, _, err = run([*redraw, str(tmp_path / "missed.png")], capsys)
    assert code == 2 and "<lora:style:0.7>" in err, err
    lora.rename(library / "style-renamed.safetensors")
    code, _, err = run([*redraw, str(tmp_path / "found.png")], capsys)
    assert code == 0, err
    assert err.count("found by its recorded hash") == 1 and np.array_equal(pixels(styled), pixels(tmp_path / "found.png"))


def test_a_lora_with_an_upper_case_metadata_hash_is_found_by_it(models, tmp_path, capsys):
    """kohya-style `sshs_model_hash` metadata may be upper case; `Lora hashes` records it as it is (A1111's
    shorthash), and the search by recorded hash and the "hash differs" check read it whatever its case. Before:
    the renamed file was not found (the recorded hash was lower-cased, the file's not) and the same file by name
    warned that its hash 0123456789AB differs from 0123456789ab."""
    tensors = load_file(str(_lora(tmp_path / "plain.safetensors")))
    lora = tmp_path / "style.safetensors"
    save_file(tensors, str(lora), metadata={"sshs_model_hash": "0123456789ABCDEF" * 4})
    styled, again = tmp_path / "styled.png", tmp_path / "again.png"
    assert run(["txt2img", "a red apple", "--model", str(models["a"]), *FAST, "--lora", f"{lora}:0.7",
                "--out", str(styled)], capsys)[0] == 0
    assert parse_parameters(read_parameters(styled))["Lora hashes"] == "style: 0123456789AB"
    library = tmp_path / "library"
    library.mkdir()
    lora.rename(library / "renamed.safetensors")
    code, _, err = run(["txt2img", "--from-png", str(styled), "--model", str(models["a"]), "--lora-dir",
                        str(library), "--out", str(again), "--no-progress"], capsys)
    assert code == 0, err
    assert err.count("found by its recorded hash") == 1 and "drawn with one of hash" not in err
    assert np.array_equal(pixels(styled), pixels(again))


def test_a_lora_that_is_not_safetensors_is_one_error_naming_it(models, tmp_path, capsys):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a model")
    out = tmp_path / "o.png"
    code, _, err = run(["txt2img", "a red apple", "--model", str(models["a"]), *FAST, "--lora", str(junk),
                        "--out", str(out)], capsys)
    assert code == 2 and err.count("sdlab: error:") == 1 and not out.exists(), err
    assert f"{junk}: not a readable safetensors file" in err and "internal error" not in err


def test_from_png_warns_when_the_model_differs(models, tmp_path, capsys):
    first = tmp_path / "first.png"
    assert run(["txt2img", "a cat", "--model", str(models["a"]), "--out", str(first), *FAST], capsys)[0] == 0
    code, _, err = run(["txt2img", "--from-png", str(first), "--model", str(models["b"]),
                        "--out", str(tmp_path / "second.png"), "--no-progress"], capsys)
    assert code == 0 and "drawn with the model 'tiny-a'" in err and "drawing with 'tiny-b'" in err
    code, _, err = run(["txt2img", "--from-png", str(first), "--model", str(models["a"]),
                        "--out", str(tmp_path / "third.png"), "--no-progress"], capsys)
    assert code == 0 and "drawn with the model" not in err


def test_from_png_without_model_uses_the_recorded_model_when_it_is_beside_the_picture(models, tmp_path, capsys):
    first = tmp_path / "first.png"
    assert run(["txt2img", "a cat", "--model", str(models["b"]), "--out", str(first), *FAST], capsys)[0] == 0
    (tmp_path / models["b"].name).symlink_to(models["b"])
    again = tmp_path / "again.png"
    code, _, err = run(["txt2img", "--from-png", str(first), "--out", str(again), "--no-progress"], capsys)
    assert code == 0 and "tiny-b" in err and np.array_equal(pixels(first), pixels(again))


def test_from_png_finds_the_model_by_its_hash_in_a_models_dir(models, tmp_path, capsys):
    first = tmp_path / "first.png"
    assert run(["txt2img", "a cat", "--model", str(models["b"]), "--out", str(first), *FAST], capsys)[0] == 0
    library = tmp_path / "library" / "sub"
    library.mkdir(parents=True)
    (library / "renamed.safetensors").write_bytes(models["b"].read_bytes())     # another name, same hash
    (library / "other.safetensors").write_bytes(models["a"].read_bytes())
    again = tmp_path / "again.png"
    code, _, err = run(["txt2img", "--from-png", str(first), "--models-dir", str(tmp_path / "library"),
                        "--out", str(again), "--no-progress"], capsys)
    assert code == 0 and "renamed.safetensors" in err and np.array_equal(pixels(first), pixels(again))


def test_fine_tune_is_recorded_under_its_run_name(models, tmp_path, capsys):
    run_dir = tmp_path / "runs" / "apples"
    run_dir.mkdir(parents=True)
    (run_dir / "final.safetensors").symlink_to(models["a"])
    out = tmp_path / "ft.png"
    assert run(["txt2img", "p", "--model", str(run_dir / "final.safetensors"), "--out", str(out), *FAST], capsys)[0] == 0
    assert parse_parameters(read_parameters(out))["Model"] == "apples"


def _png_header_only(path: Path, side: int) -> Path:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def test_hostile_images_are_one_error_line(models, tmp_path, capsys):
    bomb = _png_header_only(tmp_path / "bomb.png", 20_000)
    warn = _png_header_only(tmp_path / "warn.png", 10_000)
    picture = tmp_path / "ok.png"
    Image.new("RGB", (32, 32)).save(picture)
    ztxt = tmp_path / "ztxt.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a" * (2 << 20), zip=True)
    Image.new("RGB", (4, 4)).save(ztxt, pnginfo=info)
    redos = tmp_path / "redos.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "p\nA: " + "a" * 200_000, zip=True)
    Image.new("RGB", (4, 4)).save(redos, pnginfo=info)
    cases = [
        (["img2img", "p", "--init", str(bomb)], "too large"),
        (["img2img", "p", "--init", str(warn)], "too large"),
        (["inpaint", "p", "--init", str(picture), "--mask", str(bomb)], "too large"),
        (["txt2img", "--from-png", str(bomb)], "too large"),
        (["txt2img", "--from-png", str(ztxt)], "cannot read"),
        (["txt2img", "--from-png", str(redos)], "limit"),
    ]
    for args, message in cases:
        start = time.process_time()                   # CPU time: a bound on the work, not on the machine's load
        code, _, err = run([*args, "--model", str(models["a"]), "--out", str(tmp_path / "out"), "--no-progress"], capsys)
        assert code == 2 and err.count("sdlab: error:") == 1 and message in err and "Traceback" not in err, (args, err)
        assert time.process_time() - start < 10
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def _sdlab(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return _sdlab_python("-m", *args, **kwargs)


def _sdlab_python(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """`python ARGS...` with the source tree's sdlab."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300, **kwargs)


def test_version_and_python_dash_m_sdlab():
    from sdlab import __version__

    for module in ("sdlab", "sdlab.cli"):
        result = _sdlab(module, "--version")
        assert result.returncode == 0 and result.stdout.strip() == f"sdlab {__version__}", result


def test_the_command_exits_with_its_status_and_complete_files_without_interpreter_teardown(models, tmp_path):
    """`python -m sdlab` (and the console script, `sdlab.command:run`) ends with os._exit once the command is done:
    the picture is whole, what was printed arrives, and the exit status is the command's."""
    out = tmp_path / "apple.png"
    result = _sdlab("sdlab", "txt2img", "a red apple", "--model", str(models["a"]), *FAST, "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("apple.png")
    assert "Steps: 2" in read_parameters(out) and Image.open(out).size == (32, 32)
    missing = _sdlab("sdlab", "txt2img", "a red apple", "--model", str(tmp_path / "none.safetensors"), *FAST)
    assert missing.returncode == 2 and missing.stderr.count("sdlab: error:") == 1, missing.stderr
    scripts = (ROOT / "pyproject.toml").read_text()
    assert 'sdlab = "sdlab.command:run"' in scripts


@pytest.fixture
def sigint_kept() -> None:
    """`sdlab.command.run` in this process: SIGINT's handler is put back afterwards."""
    previous = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, previous)


def test_the_command_line_is_imported_without_collections_and_runs_with_those_objects_frozen(monkeypatch, sigint_kept):
    """The console script turns the cyclic collector off while torch and the command line are imported, then
    freezes what they created (`gc.freeze`) and runs the command with the collector on."""
    import gc
    import logging

    import sdlab.cli
    import sdlab.command

    seen = {}

    def main() -> int:
        seen.update(enabled=gc.isenabled(), frozen=gc.get_freeze_count())
        return 3

    def exit_now(code: int) -> None:
        raise SystemExit(code)

    monkeypatch.setattr(sdlab.cli, "main", main)
    monkeypatch.setattr(sdlab.command.os, "_exit", exit_now)
    monkeypatch.setattr(logging, "shutdown", lambda: None)
    gc.unfreeze()
    try:
        with pytest.raises(SystemExit) as stop:
            sdlab.command.run()
    finally:
        gc.unfreeze()
    assert stop.value.code == 3
    assert seen["enabled"] and seen["frozen"] > 10_000, seen


INTERRUPT_IMPORTING_TORCH = """
import os, signal, sys

signal.signal(signal.SIGINT, signal.default_int_handler)    # a shell's Ctrl-C, whatever the test runner left

class InterruptOnTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            os.kill(os.getpid(), signal.SIGINT)      # Ctrl-C while torch is being imported
        return None


sys.meta_path.insert(0, InterruptOnTorch())
sys.argv = ["sdlab", "--help"]
from sdlab.command import run

run()
"""


def test_ctrl_c_while_the_command_line_is_imported_exits_130_with_one_line():
    result = _sdlab_python("-c", INTERRUPT_IMPORTING_TORCH)
    assert result.returncode == 130 and result.stderr == "sdlab: error: interrupted\n", result
    assert result.stdout == ""


def test_ctrl_c_while_the_arguments_are_parsed_exits_130_with_one_line(monkeypatch, capsys, sigint_kept):
    import logging

    import sdlab.cli
    import sdlab.command

    def parser_interrupted() -> None:
        raise KeyboardInterrupt

    def exit_now(code: int) -> None:
        raise SystemExit(code)

    monkeypatch.setattr(sdlab.cli, "build_parser", parser_interrupted)
    monkeypatch.setattr(sdlab.command.os, "_exit", exit_now)
    monkeypatch.setattr(logging, "shutdown", lambda: None)
    with pytest.raises(SystemExit) as stop:
        sdlab.command.run()
    assert stop.value.code == 130 and capsys.readouterr().err == "sdlab: error: interrupted\n"


def test_a_sigint_the_parent_ignores_stays_ignored(monkeypatch, sigint_kept):
    import logging

    import sdlab.cli
    import sdlab.command

    seen = []
    monkeypatch.setattr(logging, "shutdown", lambda: None)
    monkeypatch.setattr(sdlab.cli, "main", lambda: seen.append(signal.getsignal(signal.SIGINT)) or 0)
    monkeypatch.setattr(sdlab.command.os, "_exit", lambda code: seen.append(signal.getsignal(signal.SIGINT)))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sdlab.command.run()
    assert seen == [signal.SIG_IGN, signal.SIG_IGN]


def test_sigterm_during_generation_exits_143_and_leaves_no_file(models, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    process = subprocess.Popen(
        [sys.executable, "-m", "sdlab", "txt2img", "p", "--model", str(models["a"]), "--steps", "400",
         "--width", "32", "--height", "32", "--out", str(out)],
        stderr=subprocess.PIPE, text=True, env=env,
    )
    seen = []
    reader = threading.Thread(target=lambda: seen.extend(iter(lambda: process.stderr.read(1), "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while "step" not in "".join(seen) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.1)                                     # wait for the progress bar: sampling has started
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 143
    reader.join(timeout=5)
    assert "sdlab: error: terminated" in "".join(seen)
    assert not out.exists() or [p for p in out.iterdir()] == []
