"""Reading and writing checkpoint files: every bad input gives one clear `CheckpointError`, writes are atomic."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from bundle_fixtures import tiny_bundle, write_original
from sdlab.checkpoints import io as ckpt_io
from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.io import LazyStateDict, read_checkpoint, write_safetensors_atomic
from sdlab.checkpoints.load import load_bundle
from sdlab.checkpoints.save import bundle_state_dict


def _one_line_error(path: Path, match: str) -> str:
    with pytest.raises(CheckpointError, match=match) as err:
        read_checkpoint(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    return message


class WritesMarker:
    """Unpickling this object would create `marker`: the weights-only loader must refuse before it runs."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def tiny_file(tmp_path: Path) -> Path:
    state = {"a.weight": torch.randn(4, 3), "b.bias": torch.arange(5, dtype=torch.float16)}
    path = tmp_path / "tiny.safetensors"
    save_file(state, str(path), metadata={"sdlab.family": "sd1", "note": "x"})
    return path


# --- reading ---------------------------------------------------------------------------------------------


def test_reads_safetensors_lazily_with_metadata(tiny_file: Path):
    state, metadata = read_checkpoint(tiny_file)
    assert isinstance(state, LazyStateDict)
    assert metadata == {"sdlab.family": "sd1", "note": "x"}
    assert state.shape("a.weight") == torch.Size([4, 3]) and state.dtype("b.bias") == torch.float16
    assert sorted(state) == ["a.weight", "b.bias"] and len(state) == 2 and "a.weight" in state
    assert torch.equal(state["b.bias"], torch.arange(5, dtype=torch.float16))


def test_reads_weights_only_pickles_and_unwraps_state_dict(tmp_path: Path):
    tensors = {"x.weight": torch.randn(2, 2), "y": torch.ones(3)}
    for name, payload, plain in [
        ("lightning.ckpt", {"state_dict": tensors, "global_step": 7, "epoch": 1}, {"global_step": "7", "epoch": "1"}),
        ("plain.pt", tensors, {}),
        ("legacy.pth", tensors, {}),
    ]:
        path = tmp_path / name
        torch.save(payload, path, _use_new_zipfile_serialization=name != "legacy.pth")
        state, metadata = read_checkpoint(path)
        assert metadata == plain and state.keys() == tensors.keys()     # top-level numbers and text, as strings
        assert all(torch.equal(state[k], tensors[k]) for k in tensors)


def test_no_such_file_and_folder(tmp_path: Path):
    _one_line_error(tmp_path / "missing.safetensors", "no such file")
    with pytest.raises(CheckpointError, match="is a folder"):
        read_checkpoint(tmp_path)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt", ".pt", ".bin", ".weird"])
def test_empty_file(tmp_path: Path, suffix: str):
    path = tmp_path / f"empty{suffix}"
    path.write_bytes(b"")
    _one_line_error(path, "file is empty")


def test_read_as_converts_straight_from_the_file(tmp_path: Path):
    """`read_as`: another dtype converted from the mapped file pages into a fresh, aligned tensor; the file's own
    dtype read as `[key]` reads it; both equal `[key].to(dtype)`, at odd offsets in the file too."""
    g = torch.Generator().manual_seed(0)
    state = {"a": torch.randn(3, 5, generator=g).half(), "b": torch.randn(4097, generator=g).half(),
             "c": torch.randn(2, 3, generator=g), "d": torch.arange(7), "e": torch.zeros(0, 4).half()}
    path = tmp_path / "mixed.safetensors"
    save_file(state, str(path))
    lazy = LazyStateDict(path)
    for key, tensor in state.items():
        for dtype in (torch.bfloat16, torch.float32, torch.float16):
            want = tensor.to(dtype) if tensor.is_floating_point() else tensor
            got = lazy.read_as(key, dtype if tensor.is_floating_point() else tensor.dtype)
            assert got.dtype == want.dtype and torch.equal(got, want) and got.data_ptr() % 64 == 0, (key, dtype)
    data = path.read_bytes()
    path.write_bytes(data[:8 + int.from_bytes(data[:8], "little") + 10])   # cut after the header was read:
    # one clear error, not a crash on the mapped pages
    with pytest.raises(CheckpointError, match="file ended early"):
        lazy.read_as("b", torch.bfloat16)


def test_truncated_safetensors(tmp_path: Path, tiny_file: Path):
    data = tiny_file.read_bytes()
    for keep in (4, 20, len(data) - 7):
        path = tmp_path / f"truncated{keep}.safetensors"
        path.write_bytes(data[:keep])
        _one_line_error(path, "not a readable safetensors file")


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt", ".bin", ".weird"])
def test_random_bytes(tmp_path: Path, suffix: str):
    path = tmp_path / f"random{suffix}"
    path.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(3)).tolist()))
    _one_line_error(path, "not a readable|unknown checkpoint format|refused to unpickle")


LIGHTNING_MODULE = """
import os
class ModelCheckpoint:   # as the real one would be: code that must not run on load
    def __setstate__(self, state):
        open(os.environ["SDLAB_TEST_MARKER"], "w").close()
"""


def test_the_safetensors_header_length_is_checked_against_the_file_size(tmp_path: Path, tiny_file: Path):
    """One checked header reader: a length past the end of the file (or past safetensors' own 100 MB limit)
    is a CheckpointError naming the file before anything is sought or read."""
    with open(tiny_file, "rb") as f:
        header, data_start = ckpt_io.read_safetensors_header(f, tiny_file)
    assert data_start == 8 + int.from_bytes(tiny_file.read_bytes()[:8], "little") and header
    for content in (b"this is not a model", (200).to_bytes(8, "little") + b"{}", b"12345"):
        junk = tmp_path / "junk.safetensors"
        junk.write_bytes(content)
        with open(junk, "rb") as f, pytest.raises(CheckpointError, match=r"junk\.safetensors: not a readable safetensors"):
            ckpt_io.read_safetensors_header(f, junk)


def test_checkpoints_with_lightning_callbacks_numpy_values_and_parameter_dicts(tmp_path: Path, monkeypatch):
    """What CompVis' sd-v1-*.ckpt (a Lightning callback class as a key, numpy scalars) and the textual_inversion
    repo's embeddings (a ParameterDict) carry beside their tensors: read without importing or running any of
    it, and without leaving torch's allowlist changed."""
    import sys

    import numpy as np

    package = tmp_path / "fake" / "pytorch_lightning" / "callbacks"
    package.mkdir(parents=True)
    for folder in (package.parent, package):
        (folder / "__init__.py").write_text("")
    (package / "model_checkpoint.py").write_text(LIGHTNING_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path / "fake"))
    marker = tmp_path / "ran"
    monkeypatch.setenv("SDLAB_TEST_MARKER", str(marker))
    from pytorch_lightning.callbacks.model_checkpoint import ModelCheckpoint

    callback = ModelCheckpoint()
    callback.monitor = None                                       # state, so unpickling calls __setstate__
    tensors = {"x.weight": torch.randn(2, 2), "y": torch.ones(3)}
    compvis = tmp_path / "sd-v1-4.ckpt"
    torch.save({"state_dict": tensors, "global_step": np.int64(470000), "loss": np.float32(0.1),
                "history": np.zeros(3), "callbacks": {ModelCheckpoint: {"monitor": None, "best": np.float64(1)}},
                "callback_object": callback}, compvis)
    embedding = tmp_path / "rinongal.pt"
    vector = torch.randn(1, 8)
    torch.save({"string_to_token": {"*": torch.tensor(265)},
                "string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(vector)})}, embedding)
    plain = pickle.dumps(callback)
    for name in [m for m in sys.modules if m.startswith("pytorch_lightning")]:
        monkeypatch.delitem(sys.modules, name)
    allowed = set(map(str, torch.serialization.get_safe_globals()))

    state, _ = read_checkpoint(compvis)
    assert state.keys() == tensors.keys() and all(torch.equal(state[k], tensors[k]) for k in tensors)
    state, _ = read_checkpoint(embedding, nested=True)
    assert set(state) == {"string_to_token.*", "string_to_param.*"}
    assert torch.equal(state["string_to_param.*"], vector)
    assert not marker.exists() and "pytorch_lightning" not in sys.modules
    assert set(map(str, torch.serialization.get_safe_globals())) == allowed
    pickle.loads(plain)                                           # a plain unpickle would have run it
    assert marker.exists()


def test_malicious_pickles_never_run(tmp_path: Path):
    marker = tmp_path / "pwned"
    zip_ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": WritesMarker(marker)}, zip_ckpt)
    raw_pickle = tmp_path / "evil.bin"
    raw_pickle.write_bytes(pickle.dumps({"w": WritesMarker(marker)}))
    legacy = tmp_path / "evil.pt"
    torch.save({"w": WritesMarker(marker)}, legacy, _use_new_zipfile_serialization=False)
    for path in (zip_ckpt, raw_pickle, legacy):
        message = _one_line_error(path, "refused to unpickle")
        assert "weights-only" in message and "weights_only=False" not in message
    assert not marker.exists()
    # the payload really would have run: unpickling it outside the safe loader creates the marker
    pickle.loads(pickle.dumps(WritesMarker(marker)))
    assert marker.exists()


def test_pickle_without_tensors(tmp_path: Path):
    path = tmp_path / "nothing.ckpt"
    torch.save({"epoch": 3, "note": "no weights"}, path)
    _one_line_error(path, "no tensors at the top level")
    with pytest.raises(CheckpointError, match=r"nothing\.ckpt: no tensors \(its keys: epoch, note\)"):
        read_checkpoint(path, nested=True)                       # nested dicts read too: none anywhere
    path2 = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path2)
    _one_line_error(path2, "holds a list, not a dict of tensors")


# --- loading errors name the keys ------------------------------------------------------------------------


def test_checkpoint_missing_a_block_names_the_missing_keys(tmp_path: Path):
    bundle = tiny_bundle("sd1")
    path = write_original(bundle, tmp_path / "holey.safetensors", drop=("model.diffusion_model.output_blocks.2.",))
    with pytest.raises(CheckpointError) as err:
        load_bundle(path)
    message = str(err.value)
    assert "\n" not in message
    assert "unet (UNetConfig): missing" in message and "output_blocks.2.0.in_layers.0.weight" in message

    path = write_original(bundle, tmp_path / "novae.safetensors", drop=("first_stage_model.decoder.",))
    with pytest.raises(CheckpointError, match=r"vae \(VAEConfig\): missing \d+ keys: decoder\."):
        load_bundle(path)

    path = write_original(bundle, tmp_path / "notext.safetensors", drop=("cond_stage_model.",))
    with pytest.raises(CheckpointError, match="notext.safetensors: cannot tell the model family: .* context 64; "
                                              "text keys under no known prefix"):
        load_bundle(path)  # reduced width and no text encoder: nothing says which family
    with pytest.raises(CheckpointError, match="has no text encoder clip_l .no key starting with cond_stage_model.transformer."):
        load_bundle(path, family="sd1")


def test_unknown_and_misshapen_keys_are_errors(tmp_path: Path):
    bundle = tiny_bundle("sd1")
    state = bundle_state_dict(bundle)
    write_safetensors_atomic(tmp_path / "extra.safetensors", {**state, "lora_te_text_model.alpha": torch.ones(1)})
    with pytest.raises(CheckpointError, match="1 keys belong to no sd1 component .prefixes lora_te_text_model.."):
        load_bundle(tmp_path / "extra.safetensors")

    write_safetensors_atomic(tmp_path / "extra_unet.safetensors",
                             {**state, "model.diffusion_model.extra.weight": torch.ones(1)})
    with pytest.raises(CheckpointError, match=r"unet \(UNetConfig\): unexpected 1 keys: extra.weight"):
        load_bundle(tmp_path / "extra_unet.safetensors")

    bad = dict(state)
    key = "model.diffusion_model.output_blocks.1.0.out_layers.3.weight"
    bad[key] = torch.zeros(bad[key].shape[0], bad[key].shape[1], 1, 1)
    write_safetensors_atomic(tmp_path / "shape.safetensors", bad)
    with pytest.raises(CheckpointError, match=r"1 keys with the wrong shape: output_blocks.1.0.out_layers.3.weight"):
        load_bundle(tmp_path / "shape.safetensors")


# --- atomic writes ---------------------------------------------------------------------------------------


def test_atomic_write_round_trip(tmp_path: Path):
    base = torch.randn(6, 4)
    tensors = {"view": base[1:3], "t": base.t(), "same": base, "half": torch.ones(3, dtype=torch.bfloat16)}
    path = write_safetensors_atomic(tmp_path / "sub" / "out.safetensors", tensors, {"k": "v"})
    state, metadata = read_checkpoint(path)
    assert metadata == {"k": "v"}
    assert all(torch.equal(state[k], tensors[k]) for k in tensors)
    assert sorted(os.listdir(path.parent)) == ["out.safetensors"]


def test_atomic_write_leaves_nothing_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"previous contents")

    def fail_midway(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_io, "save_safetensors", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        write_safetensors_atomic(target, {"w": torch.zeros(2)})
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]
    assert target.read_bytes() == b"previous contents"
    monkeypatch.undo()

    with pytest.raises(CheckpointError, match="meta device"):
        write_safetensors_atomic(tmp_path / "meta.safetensors", {"w": torch.empty(2, device="meta")})
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]
