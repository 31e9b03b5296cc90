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

from bundle_fixtures import tiny_bundle, write_diffusers_folder, write_original
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


@pytest.mark.parametrize("family, layout", [("sd1", "file"), ("sdxl", "file"), ("sd1", "folder")])
def test_a_model_without_a_vae_is_described_and_the_vae_named_missing(tmp_path: Path, capsys, family, layout):
    """A checkpoint without VAE keys (a diffusers folder without vae/) is described with what it holds, its VAE
    named missing; drawing with it is still refused without --vae. Before: one error line, exit 2."""
    from sdlab.checkpoints.load import plan_checkpoint

    bundle = tiny_bundle(family)
    if layout == "file":
        path = write_original(bundle, tmp_path / "no-vae.safetensors", drop=("first_stage_model.",))
        reason = "no key starting with first_stage_model."
    else:
        path = write_diffusers_folder(bundle, tmp_path / "no-vae")
        shutil.rmtree(path / "vae")
        reason = "no vae/ folder"
    assert main(["inspect", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["family"] == family and report["missing_vae"] == reason
    expected = {"unet": sum(p.numel() for p in bundle.unet.parameters())} | {
        te.spec.name: sum(p.numel() for p in te.model.parameters()) for te in bundle.text_encoders}
    assert {c["name"]: c["parameters"] for c in report["components"]} == expected
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"family          {family} " in out and f"missing keys    the VAE's ({reason})" in out
    with pytest.raises(CheckpointError, match="has no (VAE|vae/)"):
        plan_checkpoint(path)


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



_TO_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


@pytest.mark.parametrize("name, tensors, message", [
    ("oft", {f"{_TO_Q}.oft_blocks": torch.randn(4, 8, 8), f"{_TO_Q}.alpha": torch.tensor(1.0)},
     "a LyCORIS OFT / BOFT file"),
    ("diag-oft", {f"{_TO_Q}.oft_diag": torch.randn(4, 8, 8)}, "a LyCORIS OFT / BOFT file"),
    ("no-down", {f"{_TO_Q}.lora_up.weight": torch.randn(32, 4), f"{_TO_Q}.alpha": torch.tensor(1.0)},
     f"module {_TO_Q}: a lora module without down"),
], ids=["oft", "diag-oft", "no-down"])
def test_a_lora_sdlab_cannot_merge_gets_the_lora_readers_error(tmp_path: Path, capsys, name, tensors, message):
    """An OFT / BOFT file or a LoRA module without its down is the error `--lora` gives, not the
    whole-model "no key starting with model.diffusion_model." error."""
    from sdlab.checkpoints.io import write_safetensors_atomic

    path = write_safetensors_atomic(tmp_path / f"{name}.safetensors", tensors)
    assert main(["inspect", str(path)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert captured.out == "" and len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert lines[0].startswith(f"sdlab: error: {path}: ") and message in lines[0], lines[0]
    assert "model.diffusion_model" not in lines[0]

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
    report = plan_checkpoint(path).report          # a config without the key: LDM's default, as A1111 reads it
    assert report.prediction.value == "eps" and report.prediction_source == (
        "sidecar model.yaml (no parameterization: eps, the CompVis default)")


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


def _real_esrgan_x4(features: int = 8, growth: int = 4) -> dict[str, torch.Tensor]:
    """A Real-ESRGAN x4 (new-arch) state dict of one RRDB, as `RealESRGAN_x4plus.pth` names its tensors."""
    convs = {name: (features, features) for name in ("conv_body", "conv_up1", "conv_up2", "conv_hr")}
    convs |= {"conv_first": (features, 3), "conv_last": (3, features)}
    convs |= {f"body.0.rdb{k}.conv{j}": (features if j == 5 else growth, features + (j - 1) * growth)
              for k in (1, 2, 3) for j in range(1, 6)}
    state = {}
    for name, (c_out, c_in) in convs.items():
        state[f"{name}.weight"], state[f"{name}.bias"] = torch.randn(c_out, c_in, 3, 3) * 0.01, torch.zeros(c_out)
    return state


@pytest.fixture(scope="module")
def other_kinds(tmp_path_factory) -> dict[str, Path]:
    """One file of each kind sdlab reads besides whole models, in the layouts people share them in."""
    from safetensors.torch import save_file

    from bundle_fixtures import write_diffusers_folder
    from controlnet_fixtures import diffusers_controlnet, write_layout

    folder = tmp_path_factory.mktemp("kinds")
    files = {"lora": folder / "style.safetensors", "a1111-embedding": folder / "cat-toy.pt",
             "sdxl-embedding": folder / "ink.safetensors", "vae": folder / "vae.safetensors",
             "upscaler": folder / "RealESRGAN_x4plus.pth"}
    save_file({"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.randn(4, 32),
               "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.randn(32, 4),
               "lora_unet_mid_block_attentions_0_proj_in.alpha": torch.tensor(2.0),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(4, 32),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(64, 4)},
              str(files["lora"]), {"ss_base_model_version": "sd_v1", "ss_network_dim": "4"})
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.randn(3, 768)}, "name": "cat-toy",
                "step": 500, "sd_checkpoint_name": "v1-5-pruned-emaonly"}, files["a1111-embedding"])
    save_file({"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}, str(files["sdxl-embedding"]))
    bundle = tiny_bundle("sd1")
    full = write_original(bundle, folder / "full.safetensors", junk=False)
    from safetensors import safe_open

    with safe_open(str(full), "pt") as f:
        save_file({k: f.get_tensor(k) for k in f.keys() if k.startswith("first_stage_model.")}, str(files["vae"]))
    torch.save({"params_ema": _real_esrgan_x4()}, files["upscaler"])
    (folder / "cn").mkdir()
    (folder / "cn-pth").mkdir()
    controlnet = diffusers_controlnet(bundle.unet_config, 5, hint_widths=(16, 32))
    files["controlnet"] = write_layout(controlnet, "original", folder / "cn")
    files["controlnet-pth"] = write_layout(controlnet, "original-pth", folder / "cn-pth")
    from t2i_adapter_fixtures import diffusers_adapter, write_adapter
    files["t2i-adapter"] = write_adapter(diffusers_adapter("full_adapter", (32, 64), 2), "original-pth",
                                         folder / "t2ia", name="t2iadapter_canny_sd15v2")
    files["compact-upscaler"] = folder / "realesr-general-x4v3.safetensors"
    save_file({"body.0.weight": torch.randn(8, 3, 3, 3), "body.0.bias": torch.zeros(8), "body.1.weight": torch.ones(8),
               "body.2.weight": torch.randn(48, 8, 3, 3), "body.2.bias": torch.zeros(48)}, str(files["compact-upscaler"]))
    write_diffusers_folder(bundle, folder / "pipeline")
    files["unet-folder"], files["vae-folder"] = folder / "pipeline" / "unet", folder / "pipeline" / "vae"
    return files


@pytest.mark.parametrize("name, kind, facts, use", [
    ("lora", "LoRA", ["modules         2 (U-Net 1, text encoder 1)", "rank            4", "alpha           2.0",
                      "trained for     sd_v1"], "--lora FILE"),
    ("a1111-embedding", "textual-inversion embedding", ["vectors         3", "width           768\nfor             sd1\n",
                                                        "trained steps   500", "trained on      v1-5-pruned-emaonly"],
     "--embeddings-dir"),
    ("sdxl-embedding", "textual-inversion embedding", ["vectors         2", "width           768 + 1280\nfor             sdxl\n"],
     "--embeddings-dir"),
    ("vae", "VAE", ["latent          4 channels\ndownsampling    1/2 of the picture's size"], "--vae"),
    ("upscaler", "upscaler", ["architecture    RRDBNet", "scale           4x", "features        8"], "sdlab upscale"),
    ("controlnet", "ControlNet", ["layout          original", "hint            3 channels"], "--control"),
    ("controlnet-pth", "ControlNet", ["layout          original", "hint            3 channels"], "--control"),
    ("t2i-adapter", "T2I-Adapter", ["for             SD1 / SD2 models", "kind            full",
                                    "layout          original", "hint            3 channels", "features        32, 64"],
     "--control"),
    ("compact-upscaler", "upscaler", ["architecture    SRVGGNetCompact", "scale           4x"], "sdlab upscale"),
    ("vae-folder", "VAE", ["latent          4 channels"], "--vae"),
    ("unet-folder", "diffusers UNet2DConditionModel folder (one part of a pipeline)", ["in_channels     4"],
     "--model with the whole pipeline: "),
])
def test_inspect_says_what_a_file_that_is_not_a_whole_model_is(other_kinds, capsys, name, kind, facts, use):
    """A LoRA, an embedding (an A1111 .pt nests its tensors), a VAE, a Real-ESRGAN .pth (under params_ema),
    a ControlNet or one folder of a diffusers pipeline: described as what the reader that loads it finds,
    with the option that takes it, not refused for lacking a U-Net."""
    assert main(["inspect", str(other_kinds[name])]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"kind            {kind}\n" in out and f"use             {use}" in out, out
    for fact in facts:
        assert fact in out, (fact, out)
    assert main(["inspect", "--json", str(other_kinds[name])]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == kind


@pytest.mark.parametrize("name, facts", [
    ("lora", {"modules": {"U-Net": 1, "text encoder": 1}, "module kinds": ["lora"], "parameters": 640, "rank": [4],
              "alpha": [2.0], "trained for": "sd_v1"}),
    ("a1111-embedding", {"vectors": 3, "width": [768], "for": ["sd1"], "trained steps": 500,
                         "trained on": "v1-5-pruned-emaonly"}),
    ("sdxl-embedding", {"vectors": 2, "width": [768, 1280], "for": ["sdxl"]}),
    ("vae", {"latent": 4, "downsampling": 2, "widths": [32, 64], "parameters": 658_375}),
    ("upscaler", {"architecture": "RRDBNet", "scale": 4, "features": 8}),
    ("compact-upscaler", {"architecture": "SRVGGNetCompact", "scale": 4, "features": 8, "parameters": 3_736}),
    ("controlnet", {"layout": "original", "hint": 3}),
    ("unet-folder", {"in_channels": 4}),
])
def test_inspect_json_gives_numbers_as_numbers(other_kinds, capsys, name, facts):
    """`inspect --json` on a file that is not a whole model: counts, sizes and scales are JSON numbers (lists of
    them where a file has several), as a whole model's parameter counts are."""
    assert main(["inspect", "--json", str(other_kinds[name])]) == 0
    given = json.loads(capsys.readouterr().out)["facts"]
    assert {key: given[key] for key in facts} == facts
    assert not [value for value in given.values() if isinstance(value, str) and value.replace(",", "").isdigit()]
    assert type(given.get("parameters", 0)) is int


@pytest.mark.parametrize("name", ["lora", "controlnet", "controlnet-pth", "upscaler", "compact-upscaler"])
def test_inspect_reads_names_shapes_and_metadata_not_weights(other_kinds, capsys, monkeypatch, name):
    """A LoRA, ControlNet or upscaler is described from names and shapes: no network gets weights, and of a
    safetensors file only a LoRA's alphas are read. Its parameter count is still every parameter's."""
    from sdlab.checkpoints import io

    read = []
    monkeypatch.setattr(io.LazyStateDict, "__getitem__", lambda self, key: read.append(key) or torch.zeros(()))
    monkeypatch.setattr(io.LazyStateDict, "read_as", lambda self, key, dtype: read.append(key) or torch.zeros(()))
    monkeypatch.setattr(torch.nn.Module, "load_state_dict", lambda *args, **kwargs: pytest.fail("weights loaded"))
    assert main(["inspect", "--json", str(other_kinds[name])]) == 0, capsys.readouterr().err
    assert all(key.endswith(".alpha") for key in read), read
    monkeypatch.undo()
    parameters = json.loads(capsys.readouterr().out)["facts"]["parameters"]
    if name.startswith("controlnet"):
        from sdlab.checkpoints.controlnet import load_controlnet

        expected = sum(p.numel() for p in load_controlnet(other_kinds[name]).model.parameters())
    elif name.endswith("upscaler"):
        from sdlab.checkpoints.upscaler import load_upscaler

        expected = sum(p.numel() for p in load_upscaler(other_kinds[name]).net.parameters())
    else:
        expected = 4 * 32 + 32 * 4 + 4 * 32 + 64 * 4
    assert parameters == expected


def test_a_loha_and_a_lokr_say_the_rank_their_alpha_is_divided_by(tmp_path: Path, capsys) -> None:
    """A LoHa's rank is its hada_w1_b's rows, a LoKr's its lokr_w2_b's (A1111's `dim`, what alpha is divided by),
    a GLoRA's its a2's rows (LyCORIS's layout, ComfyUI's rank), said as a LoRA's is (a LoRA's down rows)."""
    from safetensors.torch import save_file

    name = "lora_unet_mid_block_attentions_0_proj_in"
    files = {"loha": ({f"{name}.hada_w1_a": torch.randn(32, 6), f"{name}.hada_w1_b": torch.randn(6, 32),
                       f"{name}.hada_w2_a": torch.randn(32, 6), f"{name}.hada_w2_b": torch.randn(6, 32)}, 6),
             "lokr": ({f"{name}.lokr_w1": torch.randn(4, 4), f"{name}.lokr_w2_a": torch.randn(8, 3),
                       f"{name}.lokr_w2_b": torch.randn(3, 8)}, 3),
             "glora": ({f"{name}.a1.weight": torch.randn(32, 5), f"{name}.a2.weight": torch.randn(5, 32),  # LyCORIS's
                        f"{name}.b1.weight": torch.randn(32, 5), f"{name}.b2.weight": torch.randn(5, 32)}, 5)}
    for kind, (tensors, rank) in files.items():
        path = tmp_path / f"{kind}.safetensors"
        save_file({**tensors, f"{name}.alpha": torch.tensor(1.0)}, str(path))
        assert main(["inspect", "--json", str(path)]) == 0, capsys.readouterr().err
        facts = json.loads(capsys.readouterr().out)["facts"]
        assert (facts["module kinds"], facts["rank"]) == ([kind], [rank]), facts
