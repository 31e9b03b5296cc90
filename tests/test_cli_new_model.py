"""`sdlab new-model OUT`: bad arguments are one error line, before any network is built or file written."""

from __future__ import annotations

import pytest

from sdlab.cli import main


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


def test_the_largest_seed_makes_a_model(tmp_path, capsys) -> None:
    out = tmp_path / "model.safetensors"
    assert main(["new-model", str(out), "--tiny", "--family", "sdlab-tiny", "--seed", str(2**64 - 1)]) == 0
    assert out.exists()


def test_a_full_disk_names_the_file_that_could_not_be_written(tmp_path, capsys, monkeypatch) -> None:
    """The write's own OSError names no file (ENOSPC from a write call): the line names the output."""
    import errno

    import sdlab.checkpoints.save

    def full_disk(bundle, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sdlab.checkpoints.save, "save_bundle", full_disk)
    out = tmp_path / "model.safetensors"
    code = main(["new-model", str(out), "--tiny"])
    err = capsys.readouterr().err
    assert code == 2 and err == f"sdlab: error: the disk is full: cannot write {out}; nothing was written\n"
