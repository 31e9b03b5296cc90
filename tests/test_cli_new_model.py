"""`sdlab new-model OUT`: bad arguments are one error line, before any network is built or file written; the file
holds `new_bundle`'s model in the dtype asked (fp16 by default), made one layer at a time as it is written."""

from __future__ import annotations

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from sdlab.checkpoints.create import _file_groups, new_bundle
from sdlab.checkpoints.save import bundle_parts, save_bundle
from sdlab.cli import main
from sdlab.families import family_names


@pytest.mark.parametrize(("extra", "message"), [
    (["--seed", str(2**64)], "--seed must be an integer in 0..18446744073709551615"),
    (["--seed", "-1"], "--seed must be an integer in 0..18446744073709551615"),
])
def test_bad_arguments_are_one_error_line(tmp_path, capsys, extra, message) -> None:
    out = tmp_path / "model.safetensors"
    code = main(["new-model", str(out), "--tiny", *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("sdlab: error:") and err.count("\n") == 1, err
    assert message in err
    assert not out.exists()


def test_an_existing_file_is_kept_unless_overwrite_is_given(tmp_path, capsys) -> None:
    """A mistyped name must not put random weights over a trained checkpoint: an existing OUT is one error line
    and stays as it was; --overwrite replaces it."""
    out = tmp_path / "trained.safetensors"
    out.write_bytes(b"the user's weights")
    code = main(["new-model", str(out), "--tiny", "--family", "sdlab-tiny"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "exists; pass --overwrite" in err, err
    assert out.read_bytes() == b"the user's weights"
    assert main(["new-model", str(out), "--tiny", "--family", "sdlab-tiny", "--overwrite"]) == 0
    assert out.stat().st_size > 1000


def test_the_largest_seed_makes_a_model(tmp_path, capsys) -> None:
    out = tmp_path / "model.safetensors"
    assert main(["new-model", str(out), "--tiny", "--family", "sdlab-tiny", "--seed", str(2**64 - 1)]) == 0
    assert out.exists()


def test_a_full_disk_names_the_file_that_could_not_be_written(tmp_path, capsys, monkeypatch) -> None:
    """The write's own OSError names no file (ENOSPC from a write call): the line names the output."""
    import errno

    import sdlab.checkpoints.create

    def full_disk(path, family, **options):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sdlab.checkpoints.create, "write_new_model", full_disk)
    out = tmp_path / "model.safetensors"
    code = main(["new-model", str(out), "--tiny"])
    err = capsys.readouterr().err
    assert code == 2 and err == f"sdlab: error: the disk is full: cannot write {out}; nothing was written\n"


@pytest.mark.parametrize("family, dtype", [(name, "fp32") for name in family_names()]
                         + [("sd1", None), ("sdxl", None), ("sd2", "bf16")])
def test_the_file_is_new_bundles_model_in_the_dtype_asked(tmp_path, capsys, family, dtype) -> None:
    """Byte for byte the file `save_bundle` writes of `new_bundle(family, seed)` (cast to fp16 without --dtype, as
    released checkpoints are shared): the init of a seed is the one `new_bundle` draws."""
    out = tmp_path / "model.safetensors"
    assert main(["new-model", str(out), "--tiny", "--family", family, "--seed", "7",
                 *(["--dtype", dtype] if dtype else [])]) == 0
    cast = {None: torch.float16, "bf16": torch.bfloat16, "fp32": None}[dtype]
    reference = save_bundle(new_bundle(family, tiny=True, seed=7), tmp_path / "reference.safetensors", dtype=cast)
    assert out.read_bytes() == reference.read_bytes()


class LiveBytes(TorchDispatchMode):
    """The most bytes of CPU tensor storage that torch operators made and that were alive at once."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        made = [t.untyped_storage() for t in torch.utils._pytree.tree_leaves(out)
                if isinstance(t, torch.Tensor) and t.device.type == "cpu"]
        if any(s.data_ptr() not in self.live for s in made):
            self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
            self.live |= {s.data_ptr(): (StorageWeakRef(s), s.nbytes()) for s in made}
            self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def test_the_model_is_made_one_layer_at_a_time(tmp_path, capsys) -> None:
    """At most the largest layer (here the bigG-shaped text tower's token table) in fp32 and in fp16 at once, and
    each layer's generator state (5 KB), never the whole model (before: 64.3 MiB here; a full-size SD1.5 file:
    4.4 GiB peak RSS before, 0.4 GiB; SDXL's fp32 weights are 14 GB)."""
    groups = [group for root, _ in bundle_parts(new_bundle("sdxl", tiny=True, device="meta")) for group in _file_groups(root)]
    sizes = [sum(p.numel() for _, layer in group for p in layer.parameters()) for group in groups]
    with LiveBytes() as memory:
        assert main(["new-model", str(tmp_path / "model.safetensors"), "--tiny", "--family", "sdxl"]) == 0
    print(f"peak {memory.peak / 2**20:.1f} MiB of tensors; largest layer {max(sizes) * 4 / 2**20:.1f} MiB in fp32, "
          f"the model {sum(sizes) * 4 / 2**20:.1f} MiB")
    assert memory.peak <= max(sizes) * (4 + 2) + len(sizes) * 5056 + 2**20
