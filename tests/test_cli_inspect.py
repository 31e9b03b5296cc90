"""`sdlab inspect`: what it prints for good files, and one line on stderr (no traceback) for bad ones."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bundle_fixtures import tiny_bundle, write_original
from sdlab.checkpoints.errors import CheckpointError
from sdlab.cli import main


class RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def sd2_file(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cli")
    path = write_original(tiny_bundle("sd2"), folder / "tiny-sd2-v.safetensors")
    (folder / "tiny-sd2-v.yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    return path


def test_inspect_text(sd2_file: Path, capsys):
    assert main(["inspect", str(sd2_file)]) == 0
    out = capsys.readouterr().out
    assert "family          sd2 (detected)" in out
    assert "prediction      v (sidecar tiny-sd2-v.yaml (parameterization))" in out
    assert "default size    768 px" in out
    for name in ("unet", "vae", "openclip_h"):
        assert f"\n  {name} " in out
    assert "float32" in out and "ignored: cond_stage_model.model.logit_scale" in out
    assert "model_ema.* (3 keys)" in out


def test_inspect_json_counts_every_parameter(sd2_file: Path, capsys):
    assert main(["inspect", str(sd2_file), "--json", "--prediction", "eps"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["family"] == "sd2" and report["prediction"] == "eps" and report["prediction_source"] == "argument"
    bundle = tiny_bundle("sd2")
    expected = {
        "unet": sum(p.numel() for p in bundle.unet.parameters()),
        "vae": sum(p.numel() for p in bundle.vae.parameters()),
        "openclip_h": sum(p.numel() for p in bundle.text_encoders[0].model.parameters()),
    }
    assert {c["name"]: c["parameters"] for c in report["components"]} == expected
    assert report["total_parameters"] == sum(expected.values())
    assert report["components"][0]["config"]["head_dim"] == 64 and report["components"][0]["dtypes"] == ["float32"]
    assert "betas" in report["ignored_keys"]


def test_inspect_family_override(sd2_file: Path, capsys):
    assert main(["inspect", str(sd2_file), "--family", "sd2-inpaint"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdlab: error: ") and "expects a 9-channel U-Net input, the file has 4" in err


def _bad_files(folder: Path) -> dict[str, Path]:
    files = {
        "empty": folder / "empty.safetensors",
        "random": folder / "random.ckpt",
        "truncated": folder / "truncated.safetensors",
        "evil": folder / "evil.ckpt",
        "missing": folder / "does-not-exist.safetensors",
        "not-a-model": folder / "lora.safetensors",
    }
    files["empty"].write_bytes(b"")
    files["random"].write_bytes(bytes(range(256)) * 8)
    good = write_original(tiny_bundle("sd1"), folder / "good.safetensors", junk=False)
    files["truncated"].write_bytes(good.read_bytes()[:5000])
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": RunsCode(folder / "pwned")}, files["evil"])
    from sdlab.checkpoints.io import write_safetensors_atomic

    write_safetensors_atomic(files["not-a-model"], {"lora_unet_down.weight": torch.zeros(2, 2)})
    return files


def test_bad_files_give_one_line_and_exit_2(tmp_path: Path, capsys):
    expected = {
        "empty": "file is empty",
        "random": "refused to unpickle",
        "truncated": "not a readable safetensors file",
        "evil": "refused to unpickle",
        "missing": "no such file or folder",
        "not-a-model": "no key starting with model.diffusion_model. (the U-Net); top-level prefixes: lora_unet_down. (1 keys)",
    }
    for name, path in _bad_files(tmp_path).items():
        assert main(["inspect", str(path)]) == 2, name
        captured = capsys.readouterr()
        assert captured.out == ""
        lines = captured.err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("sdlab: error: "), (name, captured.err)
        assert expected[name] in lines[0] and "Traceback" not in captured.err, (name, lines[0])
    assert not (tmp_path / "pwned").exists()


def test_debug_shows_the_exception(tmp_path: Path):
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="file is empty"):
        main(["--debug", "inspect", str(tmp_path / "empty.safetensors")])


def test_command_line_process(tmp_path: Path, sd2_file: Path):
    """The real entry point in a fresh interpreter: status codes and streams as a user sees them."""
    (tmp_path / "random.safetensors").write_bytes(os.urandom(2048))
    env = {**os.environ, "SDLAB_DEBUG": "0"}
    bad = subprocess.run([sys.executable, "-m", "sdlab.cli", "inspect", str(tmp_path / "random.safetensors")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.count("\n") == 1 and bad.stderr.startswith("sdlab: error: ") and "Traceback" not in bad.stderr
    good = subprocess.run([sys.executable, "-m", "sdlab.cli", "inspect", "--json", str(sd2_file)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout)["prediction"] == "v"


def test_inspect_without_a_path_describes_the_shipped_model(capsys):
    from sdlab.api import shipped_model_path

    shipped = shipped_model_path()
    assert shipped is not None, "the package ships sdlab-tiny"
    assert main(["inspect", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["source"] == str(shipped) and report["family"] == "sdlab-tiny"


def _with_sidecar(sd2_file: Path, folder: Path, yaml_text: str) -> Path:
    path = folder / "model.safetensors"
    shutil.copy(sd2_file, path)
    (folder / "model.yaml").write_text(yaml_text)
    return path


def test_sidecar_yaml_is_parsed_not_searched(sd2_file: Path, tmp_path: Path):
    """A `parameterization: v` line inside a block string is text, not the key (the real key says eps)."""
    from sdlab.checkpoints.load import plan_checkpoint

    path = _with_sidecar(sd2_file, tmp_path, (
        "model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n  params:\n    notes: |\n"
        "      parameterization: v\n    parameterization: eps\n"))
    report = plan_checkpoint(path).report
    assert report.prediction.value == "eps" and report.prediction_source == "sidecar model.yaml (parameterization)"
    path = _with_sidecar(sd2_file, tmp_path, "model:\n  params:\n    notes: 'parameterization: v'\n")
    assert plan_checkpoint(path).report.prediction_source.startswith("default of sd2")


def test_sidecar_yaml_with_tags_or_bad_syntax_is_refused(sd2_file: Path, tmp_path: Path, capsys):
    marker = tmp_path / "pwned"
    path = _with_sidecar(sd2_file, tmp_path,
                         f"model: !!python/object/apply:pathlib.Path.touch [!!python/object/apply:pathlib.Path ['{marker}']]\n")
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.yaml: not valid YAML" in err and not marker.exists()
    (tmp_path / "model.yaml").write_text("model: [unclosed\n")
    assert main(["inspect", str(path)]) == 2
    assert "model.yaml: not valid YAML" in capsys.readouterr().err
