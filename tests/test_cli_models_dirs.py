"""A name held by more than one `--models-dir` (repeatable): the first folder given wins, as a PATH (and ComfyUI's
extra model paths) are searched, and a different file of the name in a later one is one warning naming both; a
copy of the same bytes is no other file. LoRAs (a prompt's tag), upscalers (--upscaler, --hr-upscaler) and
--from-png's model by name alike."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _warnings(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]


@pytest.fixture
def two_models_dirs(tmp_path, monkeypatch):
    """Folders a and b of A1111's layout, each with a LoRA, an upscaler and a model of one name, of other bytes."""
    monkeypatch.chdir(tmp_path)
    for folder, data in (("a", b"first"), ("b", b"second!")):
        _write(tmp_path / folder / "Lora" / "detail.safetensors", data)
        _write(tmp_path / folder / "ESRGAN" / "4x-Sharp.pth", data)
        _write(tmp_path / folder / "m.safetensors", data)
    return tmp_path / "a", tmp_path / "b"


def _lora_finder(models_dirs, tmp_path):
    from sdlab.cli.generate import _lora_finder

    args = argparse.Namespace(models_dir=[str(d) for d in models_dirs], lora_dir=[], from_png=None,
                              model=str(tmp_path / "elsewhere" / "model.safetensors"))
    return _lora_finder(args)


def test_a_lora_in_two_models_dirs_is_the_first_ones_with_a_warning_naming_both(two_models_dirs, tmp_path, caplog):
    a, b = two_models_dirs
    with caplog.at_level(logging.WARNING, logger="sdlab"):
        find = _lora_finder([a, b], tmp_path)
        assert find("detail") == a / "Lora" / "detail.safetensors"
        assert find("detail") == a / "Lora" / "detail.safetensors"
    warnings = _warnings(caplog)
    assert len(warnings) == 1, warnings             # once, though the run looks the name up again
    assert "the LoRA 'detail' is in more than one --models-dir" in warnings[0]
    assert str(a / "Lora" / "detail.safetensors") in warnings[0] and str(b / "Lora" / "detail.safetensors") in warnings[0]
    assert _lora_finder([b, a], tmp_path)("detail") == b / "Lora" / "detail.safetensors"


def test_the_first_models_dir_wins_over_a_later_ones_top_level(two_models_dirs, tmp_path, caplog):
    """The first --models-dir holding the name wins, in a subfolder too (each folder searched whole in turn)."""
    a, b = two_models_dirs
    (a / "Lora" / "sub").mkdir()
    nested = (a / "Lora" / "detail.safetensors").rename(a / "Lora" / "sub" / "detail.safetensors")
    assert _lora_finder([a, b], tmp_path)("detail") == nested


def test_a_copy_of_the_same_bytes_is_no_other_file(two_models_dirs, tmp_path, caplog):
    a, b = two_models_dirs
    (b / "Lora" / "detail.safetensors").write_bytes(b"first")
    with caplog.at_level(logging.WARNING, logger="sdlab"):
        assert _lora_finder([a, b, a], tmp_path)("detail") == a / "Lora" / "detail.safetensors"
    assert _warnings(caplog) == []


def test_an_upscaler_in_two_models_dirs_is_the_first_ones_with_a_warning(two_models_dirs, caplog):
    from sdlab.cli.img2img_scripts import _upscaler
    from sdlab.cli.models_dirs import find_upscaler_in

    a, b = two_models_dirs
    with caplog.at_level(logging.WARNING, logger="sdlab"):
        name, found = _upscaler(argparse.Namespace(upscaler="4x-Sharp", models_dir=[str(a), str(b)]))
    assert Path(found) == a / "ESRGAN" / "4x-Sharp.pth"
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "the upscaler '4x-Sharp' is in more than one --models-dir" in warnings[0], warnings
    assert str(b / "ESRGAN" / "4x-Sharp.pth") in warnings[0]
    assert Path(find_upscaler_in("4x-Sharp", [Path(".")], [b, a])) == b / "ESRGAN" / "4x-Sharp.pth"
    assert find_upscaler_in("Latent", [Path(".")], [a, b]) == "Latent"           # a name, not a file
    assert find_upscaler_in("4x-None", [Path(".")], [a, b]) == "4x-None"         # found nowhere: left as given


def test_from_pngs_model_in_two_models_dirs_is_the_first_ones_with_a_warning(two_models_dirs, tmp_path, caplog):
    from sdlab.cli.generate import _recorded_model

    a, b = two_models_dirs
    args = argparse.Namespace(model=None, from_png=str(tmp_path / "p.png"), models_dir=[str(a), str(b)])
    with caplog.at_level(logging.WARNING, logger="sdlab"):
        assert Path(_recorded_model(args, {"Model": "m"})) == a / "m.safetensors"
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "the model 'm' is in more than one --models-dir" in warnings[0], warnings
