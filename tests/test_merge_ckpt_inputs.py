"""`sdlab merge` reads zip `.ckpt` inputs tensor by tensor (`read_checkpoint(lazy=True)`): on reduced SD1 pairs and
triples (safetensors + ckpt, ckpt + ckpt; weighted sum, add difference; fp32 / fp16 / bf16; a `state_dict` nesting
or tensors at the top level; every tensor a view of one flat storage), the merged file is byte for byte the one the
whole read merges; and the mapped file pages the merge holds do not grow with its inputs."""

from __future__ import annotations

import functools
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bundle_fixtures import tiny_bundle, write_original
from cli_helpers import run
from crafted_ckpt_fixtures import crafted_state_dict
from sdlab.checkpoints import merge as merge_module
from sdlab.checkpoints.io import read_checkpoint, write_safetensors_atomic
from sdlab.checkpoints.merge import ADD_DIFFERENCE, WEIGHTED_SUM, MergeOptions, merge_checkpoints
from sdlab.checkpoints.zip_tensors import ZipTensors

pytestmark = pytest.mark.usefixtures("one_thread")

MIB = 1 << 20


def _as_flat_views(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with the tensors of each dtype cut out of one flat storage (as trainers that flatten their
    parameters save them): every tensor a view at its own offset."""
    out = dict(state)
    for dtype in {t.dtype for t in state.values()}:
        keys = [k for k, t in state.items() if t.dtype == dtype]
        flat = torch.cat([state[k].reshape(-1) for k in keys])
        offset = 0
        for key in keys:
            n = state[key].numel()
            out[key] = flat[offset:offset + n].view(state[key].shape)
            offset += n
    return out


@functools.cache
def _sd1_state(seed: int) -> dict[str, torch.Tensor]:
    """The tensors of a reduced SD1 single file as released (`write_original`)."""
    with tempfile.TemporaryDirectory() as folder:
        return load_file(str(write_original(tiny_bundle("sd1", seed), Path(folder) / "m.safetensors")))


def _sd1(tmp_path: Path, seed: int, kind: str, dtype: torch.dtype, layout: str = "state_dict") -> Path:
    """A reduced SD1 single file: `.safetensors`, or a `.ckpt` with its tensors under `state_dict`, at the top
    level, or as views of flat storages."""
    state = {k: v.to(dtype) if v.dtype == torch.float32 else v for k, v in _sd1_state(seed).items()}
    if kind == "safetensors":
        return write_safetensors_atomic(tmp_path / f"{seed}-{dtype}.safetensors", state)
    ckpt = tmp_path / f"{seed}-{dtype}-{layout}.ckpt"
    state = _as_flat_views(state) if layout == "views" else state
    torch.save(state if layout == "top level" else {"state_dict": state, "global_step": 100}, ckpt)
    return ckpt


def _merged_both_ways(paths: list[Path], out: Path, options: MergeOptions, monkeypatch) -> tuple[bytes, bytes, list]:
    """The merged file's bytes as `sdlab merge` writes it and as it wrote it reading every input whole, and the
    kinds of state the merge read its inputs as."""
    kinds = []

    def spy(path, **kwargs):
        state, metadata = read_checkpoint(path, **kwargs)
        kinds.append(type(state).__name__)
        return state, metadata

    monkeypatch.setattr(merge_module, "read_checkpoint", spy)
    lazy = merge_checkpoints(paths, out, options).path.read_bytes()
    read = kinds[:]
    monkeypatch.setattr(merge_module, "read_checkpoint", lambda path, **kwargs: read_checkpoint(path))
    whole = merge_checkpoints(paths, out, options).path.read_bytes()
    return lazy, whole, read


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kinds, layout", [(("safetensors", "ckpt"), "state_dict"), (("ckpt", "safetensors"), "top level"),
                                           (("ckpt", "ckpt"), "state_dict"), (("ckpt", "ckpt"), "views")])
def test_a_weighted_sum_of_ckpt_inputs_is_byte_for_byte_the_whole_reads(tmp_path, monkeypatch, dtype, kinds, layout):
    paths = [_sd1(tmp_path, seed, kind, dtype, layout) for seed, kind in zip((1, 2), kinds)]
    out = tmp_path / ("m.ckpt" if dtype == torch.bfloat16 else "m.safetensors")       # both outputs
    lazy, whole, read = _merged_both_ways(paths, out, MergeOptions(multiplier=0.37), monkeypatch)
    assert lazy == whole
    assert read == ["ZipTensors" if kind == "ckpt" else "LazyStateDict" for kind in kinds]


@pytest.mark.parametrize("layout", ["state_dict", "views"])
def test_an_add_difference_of_ckpt_inputs_with_fp16_output_is_byte_for_byte_the_whole_reads(tmp_path, monkeypatch,
                                                                                           layout):
    paths = [_sd1(tmp_path, 1, "ckpt", torch.float32, layout), _sd1(tmp_path, 2, "safetensors", torch.float16),
             _sd1(tmp_path, 3, "ckpt", torch.bfloat16, layout)]
    options = MergeOptions(method=ADD_DIFFERENCE, multiplier=0.8, save_as_half=True)
    lazy, whole, read = _merged_both_ways(paths, tmp_path / "m.safetensors", options, monkeypatch)
    assert lazy == whole and read == ["ZipTensors", "LazyStateDict", "ZipTensors"]
    merged = load_file(str(tmp_path / "m.safetensors"))
    assert {t.dtype for t in merged.values()} >= {torch.float16}


def _big_sd1(tmp_path: Path, seed: int, tensors: int) -> Path:
    """A reduced SD1 `.ckpt` with `tensors` more U-Net weights of 4 MiB (merged as any other)."""
    state = dict(_sd1_state(seed))
    g = torch.Generator().manual_seed(seed)
    state |= {f"model.diffusion_model.extra.{i}.weight": torch.randn(MIB, generator=g) for i in range(tensors)}
    path = tmp_path / f"big{seed}.ckpt"
    torch.save({"state_dict": state}, path)
    return path


def _rss_file() -> int:
    """Bytes of mapped file pages this process holds (Linux)."""
    return int(Path("/proc/self/status").read_text().split("RssFile:")[1].split()[0]) * 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def test_merging_two_ckpts_holds_none_of_their_pages(tmp_path, monkeypatch):
    """Two `.ckpt` of 64 MiB: sampled as each merged tensor is made, the mapped file pages the merge holds grow
    by less than 8 MiB, where the whole read (the inputs mapped) held more than 96 MiB of them."""
    paths = [_big_sd1(tmp_path, seed, 16) for seed in (1, 2)]
    made = merge_module.MergedState.__getitem__
    most = [0]

    def sampled(self, key):
        tensor = made(self, key)
        most[0] = max(most[0], _rss_file() - before)
        return tensor

    monkeypatch.setattr(merge_module.MergedState, "__getitem__", sampled)
    before = _rss_file()
    merge_checkpoints(paths, tmp_path / "m.safetensors", MergeOptions(add_recipe=False))
    lazy = most[0]
    monkeypatch.setattr(merge_module, "read_checkpoint", lambda path, **kwargs: read_checkpoint(path))
    most[0], before = 0, _rss_file()
    merge_checkpoints(paths, tmp_path / "w.safetensors", MergeOptions(add_recipe=False))
    assert lazy < 8 * MIB < 96 * MIB < most[0], f"{lazy / MIB:.1f} MiB lazily, {most[0] / MIB:.1f} MiB whole"
    assert (tmp_path / "m.safetensors").read_bytes() == (tmp_path / "w.safetensors").read_bytes()
    assert isinstance(read_checkpoint(paths[0], lazy=True)[0], ZipTensors)


def test_a_legacy_ckpt_is_read_whole_and_says_so(tmp_path, monkeypatch, caplog):
    """A pre-zip pickle cannot be read tensor by tensor: it is read whole, merged as the whole read merges it,
    and the log says why it takes the memory."""
    legacy = tmp_path / "legacy.ckpt"
    torch.save({"state_dict": _sd1_state(2)}, legacy, _use_new_zipfile_serialization=False)
    paths = [_sd1(tmp_path, 1, "ckpt", torch.float32), legacy]
    with caplog.at_level("INFO", logger="sdlab.checkpoints.merge"):
        lazy, whole, read = _merged_both_ways(paths, tmp_path / "m.safetensors", MergeOptions(), monkeypatch)
    assert lazy == whole and read == ["ZipTensors", "dict"]
    said = [r.getMessage() for r in caplog.records if "read whole" in r.getMessage()]
    assert len(said) == 2 and all(str(legacy) in line and "legacy (pre-zip)" in line for line in said)


def test_a_deflated_ckpt_read_whole_says_what_it_is(tmp_path, monkeypatch, caplog):
    """A zip `.ckpt` with deflated records that the lazy read leaves to the whole read (here made to) is logged
    as what it is, not as a legacy pickle."""
    saved = _sd1(tmp_path, 2, "ckpt", torch.float32)
    deflated = tmp_path / "deflated.ckpt"
    with zipfile.ZipFile(saved) as zin, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info))
    monkeypatch.setattr(ZipTensors, "of", classmethod(lambda cls, path, tensors, records: None))
    with caplog.at_level("INFO", logger="sdlab.checkpoints.merge"):
        merge_checkpoints([_sd1(tmp_path, 1, "safetensors", torch.float32), deflated], tmp_path / "m.safetensors",
                          MergeOptions())
    said = [r.getMessage() for r in caplog.records if "read whole" in r.getMessage()]
    assert said == [f"{deflated}: read whole into memory: a zip PyTorch checkpoint with compressed records, one of "
                    "whose tensors cannot be read from its record alone (read as torch.load reads it)"]


def test_a_ckpt_whose_strides_overflow_is_refused_before_anything_is_merged(tmp_path, capsys, monkeypatch):
    """A `.ckpt` whose pickle gives a tensor a stride of 1537228672809129302 (its span overflows int64): exit 2,
    the whole read's "not a readable PyTorch checkpoint", no tensor merged and no file written."""
    state = _sd1_state(2)
    key = "model.diffusion_model.out.2.bias"
    crafted = crafted_state_dict(tmp_path / "overflow.ckpt", state, {key: (1537228672809129302,)})
    merged = []
    made = merge_module.MergedState.__getitem__
    monkeypatch.setattr(merge_module.MergedState, "__getitem__", lambda self, k: merged.append(k) or made(self, k))
    out = tmp_path / "m.safetensors"
    code, _, err = run(["merge", str(_sd1(tmp_path, 1, "safetensors", torch.float32)), str(crafted),
                        "--out", str(out)], capsys)
    assert code == 2 and merged == [] and not out.exists()
    assert f"{crafted}: not a readable PyTorch checkpoint (Storage size calculation overflowed" in err
    assert "Traceback" not in err
