"""A1111's sidecar VAE: `<name>.vae.ckpt` / `.vae.pt` / `.vae.safetensors` beside a model, which A1111 draws it
with under its default `sd_vae` "Automatic" and never lists as a checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdlab.checkpoints.errors import CheckpointError


def _a1111_vae_near_checkpoint(checkpoint: Path, vae_files: list[Path]) -> Path | None:
    """A1111 1.10 sd_vae.find_vae_near_checkpoint over its VAE list (`refresh_vae_list`: the models folder's
    **/*.vae.ckpt, then *.vae.pt, then *.vae.safetensors), as resolve_vae takes it under sd_vae "Automatic"."""
    checkpoint_path = checkpoint.name.rsplit(".", 1)[0]
    ordered = [v for suffix in (".vae.ckpt", ".vae.pt", ".vae.safetensors") for v in vae_files if v.name.endswith(suffix)]
    return next((v for v in ordered if v.name.startswith(checkpoint_path)), None)


@pytest.fixture(scope="module")
def sidecar_models(tmp_path_factory):
    from bundle_fixtures import randomize_, tiny_bundle, write_original

    folder = tmp_path_factory.mktemp("sidecar")
    bundle = tiny_bundle("sd1", seed=3)
    write_original(bundle, folder / "anime.safetensors", junk=False)
    write_original(bundle, folder / "novae.safetensors", junk=False, drop=("first_stage_model.",))
    shipped = randomize_(tiny_bundle("sd1", seed=9).vae, 99)               # the VAE its author ships beside it
    for name in ("anime.vae.safetensors", "novae.vae.pt"):
        state = {k: v.contiguous() for k, v in shipped.state_dict().items()}
        save_file(state, str(folder / name)) if name.endswith(".safetensors") else torch.save(state, folder / name)
    return folder, bundle.vae, shipped


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    b_state = b.state_dict()
    return all(torch.equal(t, b_state[k]) for k, t in a.state_dict().items())


@pytest.mark.parametrize("model", ["anime.safetensors", "novae.safetensors"])
def test_the_vae_beside_the_model_is_drawn_with(sidecar_models, model):
    """Before: anime.safetensors decoded with its own VAE (max 2.96 from A1111's), novae.safetensors was refused
    ("sd1 checkpoint has no VAE ...; pass a VAE file")."""
    from sdlab.checkpoints.load import load_bundle

    folder, own, shipped = sidecar_models
    expected = _a1111_vae_near_checkpoint(folder / model, sorted(folder.glob("*.vae.*")))
    loaded = load_bundle(folder / model, dtype=torch.float32)
    assert loaded.report.vae_file == str(expected) and "beside the model" in loaded.report.vae_file_source
    assert _same_weights(loaded.vae, shipped) and not _same_weights(own, shipped)


def test_an_explicit_vae_wins_over_the_one_beside_the_model(sidecar_models, tmp_path):
    from sdlab.checkpoints.load import load_bundle

    folder, own, _ = sidecar_models
    explicit = tmp_path / "mine.safetensors"
    save_file({k: v.contiguous() for k, v in own.state_dict().items()}, str(explicit))
    loaded = load_bundle(folder / "anime.safetensors", dtype=torch.float32, vae=explicit)
    assert (loaded.report.vae_file, loaded.report.vae_file_source) == (str(explicit), "argument")
    assert _same_weights(loaded.vae, own)


def test_pictures_record_the_vae_beside_the_model_as_a1111_does(sidecar_models, tmp_path, capsys):
    """A1111's `VAE` (sd_vae.get_loaded_vae_name: the file's name) and `VAE hash` (its sha256[:10])."""
    from cli_helpers import run
    from sdlab.pipeline.png_info import model_hash, parse_parameters, read_parameters

    folder, _, _ = sidecar_models
    out = tmp_path / "a.png"
    code, _, err = run(["txt2img", "a pear", "--model", str(folder / "anime.safetensors"), "--seed", "1", "--out",
                        str(out), "--steps", "1", "--width", "32", "--height", "32", "--no-progress"], capsys)
    assert code == 0, err
    params = parse_parameters(read_parameters(out))
    vae = folder / "anime.vae.safetensors"
    assert (params["VAE"], params["VAE hash"]) == ("anime.vae.safetensors", model_hash(vae))


def test_the_server_does_not_list_a_sidecar_vae_as_a_checkpoint(sidecar_models):
    """A1111's list_models: ext_blacklist=[".vae.ckpt", ".vae.safetensors"]."""
    from sdlab.server.registry import ModelRegistry

    folder, _, _ = sidecar_models
    registry = ModelRegistry(folder / "anime.safetensors", folder)
    assert [c.name for c in registry.checkpoints] == ["anime.safetensors", "novae.safetensors"]


def _a1111_resolve_vae(sd_vae: object, checkpoint: Path, vae_files: list[Path]) -> Path | None:
    """A1111 1.10 sd_vae.resolve_vae under its default sd_vae_overrides_per_model_preferences=True (no
    --vae-path, no user metadata): a setting other than Automatic / auto goes to resolve_vae_from_setting ("None":
    VaeResolution(); a name of no file: "Couldn't find VAE named ...; using None instead"), and None is the
    checkpoint's own VAE."""
    vae_dict = {v.name: v for v in vae_files}
    if sd_vae not in {"Automatic", "auto"}:                                  # not is_automatic()
        return None if sd_vae == "None" else vae_dict.get(sd_vae)
    return _a1111_vae_near_checkpoint(checkpoint, vae_files)


def test_without_the_sidecar_the_checkpoints_own_vae_is_drawn(sidecar_models):
    from sdlab.checkpoints.load import load_bundle

    folder, own, _ = sidecar_models
    loaded = load_bundle(folder / "anime.safetensors", dtype=torch.float32, sidecar_vae=False)
    assert loaded.report.vae_file is None and _same_weights(loaded.vae, own)


def test_a1111_sd_vae_none_null_and_unknown_names_draw_the_checkpoints_own_vae(sidecar_models, tmp_path):
    """Before: "None", null and "" drew the sidecar too (max 255 from A1111's picture), "auto" and a name of no
    VAE file were 400s."""
    import base64
    import io
    import json

    import httpx
    import numpy as np
    from PIL import Image

    from server_fixtures import start_server
    from sdlab.pipeline.png_info import parse_parameters

    folder, _, _ = sidecar_models
    model = folder / "anime.safetensors"
    server = start_server(tmp_path / "out", "--model", str(model), "--models-dir", str(folder))
    body = {"prompt": "a pear", "steps": 1, "width": 32, "height": 32, "seed": 1, "sampler_name": "Euler"}
    drawn = {}
    try:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            for sd_vae in ["Automatic", "auto", "None", None, "", "other.vae.pt"]:
                answer = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"sd_vae": sd_vae}})
                assert answer.status_code == 200, answer.text
                text = json.loads(answer.json()["info"])["infotexts"][0]
                picture = Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0])))
                drawn[sd_vae] = (parse_parameters(text).get("VAE"), np.asarray(picture))
            assert client.post("/sdapi/v1/options", json={"sd_vae": "None"}).status_code == 200
            answer = client.post("/sdapi/v1/txt2img", json=body)
            assert parse_parameters(json.loads(answer.json()["info"])["infotexts"][0]).get("VAE") is None
    finally:
        server.stop()
    vae_files = sorted(folder.glob("*.vae.*"))
    for sd_vae, (label, picture) in drawn.items():
        expected = _a1111_resolve_vae(sd_vae, model, vae_files)
        assert label == (None if expected is None else expected.name), sd_vae
        assert np.array_equal(picture, drawn["Automatic" if expected else "None"][1]), sd_vae
    assert not np.array_equal(drawn["Automatic"][1], drawn["None"][1])


def test_no_sidecar_vae_keeps_the_checkpoints_own_vae_on_the_command_line(sidecar_models, tmp_path, capsys):
    from cli_helpers import run
    from sdlab.pipeline.png_info import parse_parameters, read_parameters

    folder, _, _ = sidecar_models
    out = tmp_path / "a.png"
    code, _, err = run(["txt2img", "a pear", "--model", str(folder / "anime.safetensors"), "--no-sidecar-vae",
                        "--seed", "1", "--out", str(out), "--steps", "1", "--width", "32", "--height", "32",
                        "--no-progress"], capsys)
    assert code == 0, err
    assert "VAE" not in parse_parameters(read_parameters(out))


def test_a1111_info_names_the_vae_drawn_with(sidecar_models, tmp_path):
    """A1111's Processed: sd_vae_name = get_loaded_vae_name() (the file's name), sd_vae_hash =
    get_loaded_vae_hash() (its sha256[:10]), null with the checkpoint's own VAE. Before: always null."""
    import json

    import httpx

    from server_fixtures import start_server
    from sdlab.pipeline.png_info import model_hash

    folder, _, _ = sidecar_models
    server = start_server(tmp_path / "out", "--model", str(folder / "anime.safetensors"))
    body = {"prompt": "a pear", "steps": 1, "width": 32, "height": 32, "seed": 1}
    try:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            infos = [json.loads(client.post("/sdapi/v1/txt2img", json={
                **body, "override_settings": {"sd_vae": sd_vae}}).json()["info"]) for sd_vae in ("Automatic", "None")]
    finally:
        server.stop()
    vae = folder / "anime.vae.safetensors"
    assert (infos[0]["sd_vae_name"], infos[0]["sd_vae_hash"]) == (vae.name, model_hash(vae))
    assert (infos[1]["sd_vae_name"], infos[1]["sd_vae_hash"]) == (None, None)


LFS_POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 334643238\n"


def test_an_unreadable_sidecar_vae_is_named_with_the_way_around_it(tmp_path, capsys):
    """Before: '<full path>/anime.vae.safetensors: not a readable safetensors file ...', with no word that it was
    picked as the model's sidecar, no switch to skip it, and the server's 400 showing the sidecar's full path."""
    from bundle_fixtures import tiny_bundle, write_original
    from cli_helpers import run
    from sdlab.server.registry import ModelRegistry

    write_original(tiny_bundle("sd1", seed=1), tmp_path / "anime.safetensors", junk=False)
    (tmp_path / "anime.vae.safetensors").write_text(LFS_POINTER)
    args = ["txt2img", "a pear", "--model", str(tmp_path / "anime.safetensors"), "--steps", "1", "--width", "32",
            "--height", "32", "--out", str(tmp_path / "a.png"), "--no-progress"]
    code, _, err = run(args, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "sidecar VAE anime.vae.safetensors" in err and "Git LFS pointer" in err and "--no-sidecar-vae" in err
    assert not (tmp_path / "a.png").exists()
    code, _, err = run([*args, "--no-sidecar-vae"], capsys)
    assert code == 0, err

    checkpoint = ModelRegistry(tmp_path / "anime.safetensors", tmp_path).default
    with pytest.raises(CheckpointError) as refused:
        checkpoint.check_loadable()
    assert str(refused.value).startswith(f"{checkpoint.title}: its sidecar VAE anime.vae.safetensors")
    assert str(tmp_path) not in str(refused.value)
    checkpoint.check_loadable(sidecar_vae=False)


def test_a_bad_file_beside_a_model_is_named_without_the_servers_folder(tmp_path):
    from bundle_fixtures import tiny_bundle, write_original
    from sdlab.server.registry import ModelRegistry

    write_original(tiny_bundle("sd1", seed=1), tmp_path / "anime.safetensors", junk=False)
    (tmp_path / "anime.yaml").write_text("model: [unclosed\n")
    checkpoint = ModelRegistry(tmp_path / "anime.safetensors", tmp_path).default
    with pytest.raises(CheckpointError) as refused:
        checkpoint.check_loadable()
    assert "anime.yaml: not valid YAML" in str(refused.value) and str(tmp_path) not in str(refused.value)


def test_from_png_warns_when_the_picture_names_another_vae_than_the_one_drawn_with(sidecar_models, tmp_path, capsys):
    """Before: a picture decoded with other.vae.pt, redrawn with a model that has a sidecar VAE, was redrawn with the
    sidecar without a word (the warning came only where no VAE was drawn)."""
    from cli_helpers import png_with_parameters, run

    folder, _, _ = sidecar_models
    model = folder / "anime.safetensors"
    common = ["--model", str(model), "--steps", "1", "--width", "32", "--height", "32", "--no-progress"]
    text = "a pear\nSteps: 1, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 32x32, VAE hash: {}, VAE: {}"
    for vae, short_hash, warned in (("other.vae.pt", "0123456789", True),
                                    ("anime.vae.safetensors", "0123456789", True),      # same name, another file
                                    ("anime.vae.safetensors", None, False)):
        recorded = png_with_parameters(tmp_path / "in.png", text.format(short_hash or "", vae).replace(
            "VAE hash: , ", ""), (32, 32))
        code, _, err = run(["txt2img", "--from-png", str(recorded), *common, "--out", str(tmp_path / "o.png")],
                           capsys)
        assert code == 0, err
        assert ("this run decodes with 'anime.vae.safetensors [" in err) == warned, (vae, short_hash, err)


class _Loaded(Exception):
    """Raised by the stand-in loader once the training run has loaded its model: the test stops there."""


@pytest.mark.parametrize("extra, keeps_own", [((), False), (("--no-sidecar-vae",), True)])
def test_train_no_sidecar_vae_keeps_the_checkpoints_own_vae(sidecar_models, tmp_path, monkeypatch, extra, keeps_own):
    """`sdlab train` loads a model with its sidecar VAE as txt2img does, and `--no-sidecar-vae` keeps its own (before,
    the flag was refused and the sidecar always replaced the VAE trained or encoded with)."""
    from train_fixtures import cli_args, write_caption_folder

    from sdlab.train import cli

    folder, own, shipped = sidecar_models
    loaded = {}

    def load_and_stop(*args, **kwargs):
        loaded["vae"] = real(*args, **kwargs).vae
        raise _Loaded

    real = cli.load_bundle
    monkeypatch.setattr(cli, "load_bundle", load_and_stop)
    data = write_caption_folder(tmp_path / "data", n=2)
    argv = cli_args(tmp_path / "run", folder / "anime.safetensors", data, "--max-steps", "1", *extra)[2:]
    with pytest.raises(_Loaded):
        cli.run_train(_parsed(argv))
    assert _same_weights(loaded["vae"], own if keeps_own else shipped)
    assert not _same_weights(loaded["vae"], shipped if keeps_own else own)


def _parsed(argv):
    import argparse

    from sdlab.train.config import add_config_arguments

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return parser.parse_args(argv)
