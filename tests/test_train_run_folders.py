"""A run folder of `sdlab train` inside --data-dir (the new run's own --output-dir, which holds its lock when the
scan runs, or an earlier run's) is left out of the dataset scan, and named once: its previews are no training
data and do not change how the folders are read."""

from __future__ import annotations

import logging
from pathlib import Path

from sdlab.train.data import is_run_folder, scan_dataset
from sdlab.train.run_lock import LOCK_NAME
from sdlab.train.run_log import RUN_LOG_COLUMNS
from train_fixtures import pattern_image, write_caption_folder


def _kohya_folder(root: Path) -> Path:
    """A kohya dataset: 3 uncaptioned images in ``10_sks dog`` (they train on the class tokens)."""
    (root / "10_sks dog").mkdir(parents=True)
    for i in range(3):
        pattern_image(i, 24).save(root / "10_sks dog" / f"{i}.png")
    return root


def _earlier_run(folder: Path) -> Path:
    """What a finished run leaves: previews, a run checkpoint, summary.json and log.csv."""
    (folder / "samples").mkdir(parents=True)
    (folder / "checkpoints").mkdir()
    pattern_image(1, 24).save(folder / "samples" / "step-100-0.png")
    (folder / "checkpoints" / "step-00000100.pt").write_bytes(b"state")
    (folder / "summary.json").write_text("{}")
    (folder / "log.csv").write_text(",".join(RUN_LOG_COLUMNS) + "\n100,0.1,1e-4,0.5,2.0,1,3.0\n")
    return folder


def test_run_folders_inside_the_data_dir_are_left_out_of_the_scan_and_named(tmp_path, caplog):
    """Before, a run folder beside kohya's repeat folders made `auto` read the dataset as plain folders (the run's
    previews were "other images"), so the uncaptioned repeat-folder images were all skipped; a plain dataset
    scanned the previews as images without captions."""
    data = _kohya_folder(tmp_path / "data")
    _earlier_run(data / "runs" / "first")
    (data / "second").mkdir()
    (data / "second" / LOCK_NAME).write_text("1 host")        # a run going on: its lock (a new run's own folder)
    pattern_image(2, 24).save(data / "second" / "stray.png")
    with caplog.at_level(logging.WARNING):
        scan = scan_dataset(data)
    assert scan.layout == "kohya" and len(scan.samples) == 3 and not scan.skipped
    assert {s.caption for s in scan.samples} == {"sks dog"}
    left_out = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(left_out) == 1 and str(data / "runs" / "first") in left_out[0] and str(data / "second") in left_out[0]

    plain = write_caption_folder(tmp_path / "plain", n=2, size=24)
    _earlier_run(plain / "run")
    (plain / "run" / "samples" / "step-100-0.txt").write_text("a caption")   # even a captioned preview
    scan = scan_dataset(plain)
    assert [s.path.parent for s in scan.samples] == [plain, plain] and not scan.skipped


def test_a_folder_is_a_run_folder_only_by_what_a_run_writes(tmp_path):
    for name in ("summary.json", "log.csv"):                  # one of the pair alone: any dataset may hold it
        (tmp_path / name).write_text("{}")
        assert not is_run_folder(tmp_path)
        (tmp_path / name).unlink()
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "notes.pt").write_bytes(b"x")
    assert not is_run_folder(tmp_path)
    (tmp_path / "checkpoints" / "step-00000002.pt").write_bytes(b"x")
    assert is_run_folder(tmp_path)


def test_a_datasets_own_summary_log_and_checkpoints_do_not_make_it_a_run_folder(tmp_path):
    """Before, any summary.json with any log.csv (a scraper's, a labelling tool's) or any checkpoints/step-N.pt
    (another trainer's) made a dataset folder a run folder, and its images were left out of the scan."""
    data = tmp_path / "data"
    own = write_caption_folder(data / "scraped", n=2, size=24)
    (own / "summary.json").write_text('{"images": 2}')
    (own / "log.csv").write_text("url,status\nhttp://x/0.png,200\n")
    other = write_caption_folder(data / "other", n=1, size=24)
    (other / "checkpoints").mkdir()
    (other / "checkpoints" / "step-100.pt").write_bytes(b"another trainer's")
    assert not is_run_folder(own) and not is_run_folder(other)
    scan = scan_dataset(data)
    assert sorted(s.path.parent.name for s in scan.samples) == ["other", "scraped", "scraped"]
    ended = tmp_path / "ended"                                # a run that ended before its first checkpoint
    ended.mkdir()
    (ended / "summary.json").write_text("{}")
    (ended / "log.csv").write_text(",".join(RUN_LOG_COLUMNS) + "\n")
    assert is_run_folder(ended)
