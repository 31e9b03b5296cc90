"""Hostile and broken checkpoint files: refused early with one clear error, or read correctly; saves are
deterministic and created like any other file."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from bundle_fixtures import tiny_bundle, write_original
from sdlab.checkpoints import io as ckpt_io
from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.io import read_checkpoint, write_safetensors_atomic
from sdlab.checkpoints.load import load_bundle, plan_checkpoint
from sdlab.checkpoints.runnable import check_scaling_factor, nonfinite_tensors
from sdlab.checkpoints.save import bundle_state_dict, save_bundle


@pytest.fixture(scope="module")
def sd1():
    return tiny_bundle("sd1")


def _rewrite_zip(src: Path, dst: Path, change=lambda name, data: data, deflate=lambda name: False) -> Path:
    """Copy a torch zip checkpoint record by record, optionally changing records or deflating them."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            entry = zipfile.ZipInfo(info.filename)
            entry.compress_type = zipfile.ZIP_DEFLATED if deflate(info.filename) else zipfile.ZIP_STORED
            zout.writestr(entry, change(info.filename, zin.read(info)))
    return dst


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdlab", *args], capture_output=True, text=True, timeout=600)


def _assert_one_error_line(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("sdlab: error: "), result.stderr
    assert all(n in lines[0] for n in needles), lines[0]


# --- writing: mode and determinism (issue 12, item 12) ----------------------------------------------------


def test_safetensors_files_are_created_like_other_files(tmp_path: Path, sd1):
    old = os.umask(0o022)
    try:
        path = write_safetensors_atomic(tmp_path / "w.safetensors", {"w": torch.ones(2)})
        saved = save_bundle(sd1, tmp_path / "model.safetensors")
        os.umask(0o027)
        strict = write_safetensors_atomic(tmp_path / "strict.safetensors", {"w": torch.ones(2)})
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777) == 0o644 and (saved.stat().st_mode & 0o777) == 0o644
    assert (strict.stat().st_mode & 0o777) == 0o640


def test_same_weights_give_the_same_bytes(tmp_path: Path, sd1):
    first = save_bundle(sd1, tmp_path / "a.safetensors").read_bytes()
    second = save_bundle(sd1, tmp_path / "b.safetensors").read_bytes()
    assert first == second
    tensors = {f"t{i}": torch.full((i + 1,), float(i)) for i in range(6)} | {"h": torch.ones(3, dtype=torch.float16)}
    metadata = {f"key{i}": str(i) for i in range(8)}
    one = write_safetensors_atomic(tmp_path / "one.safetensors", tensors, metadata).read_bytes()
    reordered = write_safetensors_atomic(tmp_path / "two.safetensors", dict(reversed(tensors.items())),
                                         dict(reversed(metadata.items()))).read_bytes()
    assert one == reordered
    state, read_metadata = read_checkpoint(tmp_path / "two.safetensors")
    assert read_metadata == metadata and all(torch.equal(state[k], tensors[k]) for k in tensors)


def test_written_files_are_what_safetensors_itself_reads(tmp_path: Path):
    from safetensors.torch import load_file
    base = torch.randn(5, 3)
    tensors = {"view": base[1:3], "t": base.t(), "bf": torch.ones(4, dtype=torch.bfloat16), "flag": torch.tensor([True, False]),
               "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3), "i8": torch.arange(3, dtype=torch.int8)}
    path = write_safetensors_atomic(tmp_path / "x.safetensors", tensors, {"note": "é"})
    loaded = load_file(str(path))
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k], tensors[k]) and loaded[k].dtype == tensors[k].dtype for k in tensors)
    assert int.from_bytes(path.read_bytes()[:8], "little") % 8 == 0        # tensor data starts 8-byte aligned


# --- decompression bombs and compressed / big-endian records (items 23, 25) ---------------------------------


def _bomb(src: Path, dst: Path, target: str, extra: int) -> Path:
    """`src` with record `target` deflated and padded with `extra` zero bytes (the pickle stops before them)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            entry = zipfile.ZipInfo(info.filename)
            data = zin.read(info)
            if not info.filename.endswith(target):
                zout.writestr(entry, data)
                continue
            entry.compress_type = zipfile.ZIP_DEFLATED
            with zout.open(entry, "w", force_zip64=True) as out:
                out.write(data)
                zeros = bytes(1 << 22)
                for _ in range(extra // len(zeros)):
                    out.write(zeros)
    return dst


@pytest.mark.parametrize("target", ["data.pkl", "data/0"])
def test_decompression_bombs_are_refused_before_unpacking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: str):
    src = tmp_path / "src.ckpt"
    torch.save({"w": torch.ones(4)}, src)
    bomb = _bomb(src, tmp_path / "bomb.ckpt", target, 96 << 20)                # 96 MiB from about 100 kB
    assert bomb.stat().st_size < 1 << 20

    def unpacks(*args, **kwargs):
        raise AssertionError("torch.load reached: the file was not refused before unpacking")

    monkeypatch.setattr(ckpt_io.torch, "load", unpacks)
    with pytest.raises(CheckpointError, match=r"bomb.ckpt: refused: .*unpack") as err:
        read_checkpoint(bomb)
    assert "\n" not in str(err.value)


def test_deflated_records_load_the_same_weights(tmp_path: Path, sd1):
    state = bundle_state_dict(sd1)
    stored = tmp_path / "stored.ckpt"
    torch.save({"state_dict": state}, stored)
    deflated = _rewrite_zip(stored, tmp_path / "deflated.ckpt", deflate=lambda name: True)
    assert any(i.compress_type == zipfile.ZIP_DEFLATED and "/data/" in i.filename
               for i in zipfile.ZipFile(deflated).infolist())
    loaded, _ = read_checkpoint(deflated)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    from sdlab.api import load
    images = [load(path).txt2img("a red apple", steps=2, seed=1, width=64, height=64).images[0]
              for path in (write_original(sd1, tmp_path / "same.safetensors"), deflated)]
    assert images[0].tobytes() == images[1].tobytes()                   # the same picture, not a black one


def test_big_endian_records_are_refused(tmp_path: Path):
    src = tmp_path / "src.ckpt"
    torch.save({"w": torch.arange(6, dtype=torch.float32)}, src)
    flipped = _rewrite_zip(src, tmp_path / "big.ckpt",
                           change=lambda name, data: b"big" if name.endswith("/byteorder") else data)
    with pytest.raises(CheckpointError, match="big.ckpt: refused: its byteorder record says 'big'.*little-endian"):
        read_checkpoint(flipped)


def test_unreadable_compression_and_damaged_zips(tmp_path: Path):
    src = tmp_path / "src.ckpt"
    torch.save({"w": torch.ones(3)}, src)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp_path / "lzma.ckpt", "w") as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info), compress_type=zipfile.ZIP_LZMA)
    with pytest.raises(CheckpointError, match="compression method 14, which PyTorch cannot read"):
        read_checkpoint(tmp_path / "lzma.ckpt")
    damaged = tmp_path / "damaged.ckpt"
    damaged.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="damaged.ckpt: (damaged zip|not a readable)"):
        read_checkpoint(damaged)


# --- files that load but cannot run (items 24, 26) ---------------------------------------------------------


def _poisoned(bundle, path: Path, key: str, value: float) -> Path:
    state = bundle_state_dict(bundle)
    tensor = state[key].clone(memory_format=torch.contiguous_format)
    tensor.view(-1)[1] = value
    return write_safetensors_atomic(path, {**state, key: tensor})


@pytest.mark.parametrize(("key", "value", "component"), [
    ("model.diffusion_model.input_blocks.1.0.in_layers.2.weight", math.nan, "unet"),
    ("first_stage_model.decoder.conv_out.weight", math.inf, "vae"),
    ("cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight", -math.inf, "clip_l"),
])
def test_nonfinite_weights_are_refused_naming_the_tensor(tmp_path: Path, sd1, key: str, value: float, component: str):
    path = _poisoned(sd1, tmp_path / "poisoned.safetensors", key, value)
    plan_checkpoint(path)                                                  # shapes are fine: inspect shows it
    local = key.split(".", 2)[-1] if component == "unet" else key.removeprefix("first_stage_model.")
    if component == "clip_l":
        local = "encoder.layers.0.mlp.fc1.weight"
    with pytest.raises(CheckpointError, match=rf"poisoned.safetensors: {component}: 1 tensors hold NaN or infinite") as err:
        load_bundle(path)
    assert local in str(err.value) and "\n" not in str(err.value)


def test_weights_that_overflow_the_run_dtype_are_refused(tmp_path: Path, sd1):
    path = _poisoned(sd1, tmp_path / "huge.safetensors", "model.diffusion_model.out.2.weight", 1e6)
    load_bundle(path)                                                      # finite in float32
    with pytest.raises(CheckpointError, match=r"unet: 1 tensors .*out.2.weight: 0 NaN, 1 infinite, as float16"):
        load_bundle(path, dtype=torch.float16)


def test_finiteness_check_sees_every_kind_of_bad_value():
    module = torch.nn.Linear(3, 2)
    assert nonfinite_tensors(module) == []
    for value in (math.nan, math.inf, -math.inf):
        with torch.no_grad():
            module.bias[0] = value
        assert nonfinite_tensors(module) == ["bias"]
    with torch.no_grad():
        module.bias.fill_(3e38)                                            # large but finite: not flagged
        module.weight.fill_(-3e38)
    assert nonfinite_tensors(module) == []
    assert nonfinite_tensors(module.half().float()) == ["weight", "bias"]


@pytest.mark.parametrize("value", ["nan", "0", "0.0", "-0.18215", "inf", "1e300"])
def test_unusable_scaling_factors_are_refused(tmp_path: Path, sd1, value: str):
    path = write_original(sd1, tmp_path / "scale.safetensors", metadata={"sdlab.scaling_factor": value})
    with pytest.raises(CheckpointError, match="scale.safetensors: .*scaling"):
        plan_checkpoint(path)
    assert check_scaling_factor(0.13025, "x") == 0.13025
    with pytest.raises(CheckpointError, match="not a number"):
        check_scaling_factor(None, "x")


def test_diffusers_folder_scaling_factor_is_checked(tmp_path: Path, sd1):
    import json
    from bundle_fixtures import write_diffusers_folder
    folder = write_diffusers_folder(sd1, tmp_path / "folder")
    config = folder / "vae" / "config.json"
    data = json.loads(config.read_text())
    data["scaling_factor"] = 0.0
    config.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="folder: .*scaling factor"):
        plan_checkpoint(folder)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool])
def test_integer_and_boolean_weights_are_refused(tmp_path: Path, sd1, dtype: torch.dtype):
    state = bundle_state_dict(sd1)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    state[key] = state[key].to(dtype)
    path = write_safetensors_atomic(tmp_path / "ints.safetensors", state)
    with pytest.raises(CheckpointError, match=rf"ints.safetensors: unet: weights must be floating point, found 1 "
                                              rf"that are not: input_blocks.0.0.weight \({str(dtype)[6:]}\)"):
        plan_checkpoint(path)


def test_token_embedding_smaller_than_the_tokenizer_is_refused(tmp_path: Path, sd1):
    state = bundle_state_dict(sd1)
    key = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
    state[key] = state[key][:1].clone()                                      # (1, D): one token
    path = write_safetensors_atomic(tmp_path / "onetoken.safetensors", state)
    with pytest.raises(CheckpointError, match="onetoken.safetensors: .*(token embedding has 1 rows|49407 is not a token id)"):
        plan_checkpoint(path)


def test_lora_reader_refuses_empty_and_garbage_files(tmp_path: Path):
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\x80\x02not a checkpoint at all" * 10)
    for path, message in ((empty, "file is empty"), (garbage, "not a readable|refused")):
        with pytest.raises(CheckpointError, match=message):
            read_checkpoint(path)


# --- the command line: one error line, exit 2 ---------------------------------------------------------------


def test_cli_refuses_broken_checkpoints_with_one_line(tmp_path: Path, sd1):
    nan = _poisoned(sd1, tmp_path / "nan.safetensors", "model.diffusion_model.out.2.weight", math.nan)
    result = _cli("txt2img", "a red apple", "--model", str(nan), "--steps", "1", "--width", "64", "--height", "64",
                  "--out", str(tmp_path / "out"))
    _assert_one_error_line(result, "nan.safetensors", "unet", "out.2.weight", "NaN")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())

    state = bundle_state_dict(sd1)
    state["model.diffusion_model.out.2.weight"] = state["model.diffusion_model.out.2.weight"].to(torch.int32)
    ints = write_safetensors_atomic(tmp_path / "ints.safetensors", state)
    _assert_one_error_line(_cli("inspect", str(ints)), "ints.safetensors", "floating point", "out.2.weight")

    src = tmp_path / "src.ckpt"
    torch.save({"w": torch.ones(4)}, src)
    bomb = _bomb(src, tmp_path / "bomb.ckpt", "data.pkl", 80 << 20)
    _assert_one_error_line(_cli("inspect", str(bomb)), "bomb.ckpt", "refused")
    big = _rewrite_zip(src, tmp_path / "big.ckpt", change=lambda n, d: b"big" if n.endswith("/byteorder") else d)
    _assert_one_error_line(_cli("inspect", str(big)), "big.ckpt", "byteorder")


# --- a storage record cut short: refused at the load, the CLI and the server ------------------------------------


def _cut_ckpt(bundle, folder: Path) -> tuple[Path, str]:
    """`bundle` as a torch.save `.ckpt` whose U-Net output convolution's record is cut to half its bytes (its zip
    directory says so; the whole read gave that weight's first half and then the zip's next header as weights),
    and the words that name the record in the refusal."""
    state = bundle_state_dict(bundle)
    source = folder / "model.ckpt"
    torch.save({"state_dict": state}, source)
    record = f"model/data/{list(state).index('model.diffusion_model.out.2.weight')}"   # torch.save's keys: 0, 1, ...
    nbytes = state["model.diffusion_model.out.2.weight"].nbytes
    cut = _rewrite_zip(source, folder / "cut.ckpt",
                       change=lambda name, data: data[: nbytes // 2] if name == record else data)
    source.unlink()
    return cut, f"(its record {record} holds {nbytes // 2} bytes, fewer than the {nbytes} of its storage)"


def test_a_record_cut_short_is_refused_by_the_load_the_cli_and_the_server(tmp_path: Path, sd1):
    import httpx

    from server_fixtures import start_server

    models = tmp_path / "models"
    models.mkdir()
    cut, record = _cut_ckpt(sd1, models)
    with pytest.raises(CheckpointError) as err:
        load_bundle(cut)
    assert str(err.value) == f"{cut}: not a readable PyTorch checkpoint {record}"
    result = _cli("txt2img", "a red apple", "--model", str(cut), "--steps", "1", "--width", "64", "--height", "64",
                  "--out", str(tmp_path / "out"))
    _assert_one_error_line(result, f"{cut}: not a readable PyTorch checkpoint {record}")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())

    write_original(sd1, models / "tiny.safetensors")
    server = start_server(tmp_path / "outputs", "--models-dir", str(models),
                          "--model", str(models / "tiny.safetensors"))
    try:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            refused = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "cut"})
            sized = client.get("/api/model-size", params={"model": "cut"})
    finally:
        server.stop()
    assert (refused.status_code, sized.status_code) == (400, 422), (refused.text, sized.text)
    for answer in (refused, sized):
        assert record in answer.text and str(models) not in answer.text, answer.text
