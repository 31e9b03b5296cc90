"""A zip `.ckpt` is memory-mapped (`torch.load(mmap=True)`), but loading it costs one copy of the weights, as a
`.safetensors` file does: each tensor read for a model is copied out and its file pages are given back
(`io.MappedTensors`), and no loaded tensor aliases the map, so the map goes with the state dict.

Both checks read the process's own accounting (Linux): `RssFile` of /proc/self/status counts the mapped
file pages the process holds, /proc/self/maps lists the files it maps."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import pytest
import torch
from bundle_fixtures import tiny_bundle

from sdlab.checkpoints.io import MappedTensors, read_as, read_checkpoint
from sdlab.checkpoints.load import load_bundle
from sdlab.checkpoints.save import save_bundle

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")

MIB = 1 << 20


def _rss_file() -> int:
    """Bytes of mapped file pages this process holds."""
    status = Path("/proc/self/status").read_text()
    return int(status.split("RssFile:")[1].split()[0]) * 1024


def _maps(path: Path) -> bool:
    return str(path.resolve()) in Path("/proc/self/maps").read_text()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reading_a_ckpt_holds_about_one_tensor_of_its_pages(tmp_path, dtype):
    """16 fp16 tensors of 4 MiB in a stored zip: reading them one by one (converted, or in their own dtype)
    copies each and grows the mapped file pages held by less than two tensors', where converting kept all
    64 MiB and the own dtype gave the mapped tensors themselves."""
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "w.ckpt"
    torch.save({"state_dict": {f"w{i}": torch.randn(2 * MIB, generator=g).half() for i in range(16)}}, path)
    state, _ = read_checkpoint(path)
    assert isinstance(state, MappedTensors)
    before, most, out = _rss_file(), 0, {}
    for key in state:
        out[key] = read_as(state, key, dtype)
        most = max(most, _rss_file() - before)
    assert most < 8 * MIB, f"{most / MIB:.1f} MiB of the file's pages held"
    assert all(out[key].data_ptr() != state[key].data_ptr() for key in state)       # copies, never the map
    assert torch.equal(out["w3"].float(), state["w3"].to(dtype).float())


def test_a_model_loaded_from_a_ckpt_in_its_own_dtype_does_not_keep_the_file_mapped(tmp_path):
    """An fp16 `.ckpt` loaded in fp16: every weight is a copy, so once loading is done the file is no longer
    mapped (before, the weights that were not copied for other reasons aliased the map for the whole run)."""
    state, _ = read_checkpoint(save_bundle(tiny_bundle("sd1"), tmp_path / "m.safetensors", dtype=torch.float16))
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": {k: state[k] for k in state}}, path)
    bundle = load_bundle(path, device=torch.device("cpu"), dtype=torch.float16)
    gc.collect()
    assert not _maps(path)
    assert bundle.unet.out[2].weight.dtype == torch.float16
