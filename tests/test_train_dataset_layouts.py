"""Dataset layouts of `sdlab train` that other trainers write: kohya-ss/sd-scripts' ``<N>_<class tokens>`` repeat
folders and ``.caption`` files, linked folders, a ``metadata.jsonl`` with a byte-order mark, truncated images.

The kohya reference below is kohya's code (``library/config_util.py``
``generate_dreambooth_subsets_config_by_subdirs`` and ``library/train_util.py`` ``DreamBoothDataset``'s
``read_caption`` / ``load_dreambooth_dir`` / ``glob_images``) reduced to what decides which images train, how
often and on which caption (no caching, face-crop names or wildcards).
"""

from __future__ import annotations

import codecs
import glob
import json
import logging
import os
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, features

from sdlab.train.data import SampleStream, TrainData, generator_for, scan_dataset
from sdlab.train.errors import TrainError
from train_fixtures import pattern_image

KOHYA_IMAGE_EXTENSIONS = [".png", ".jpg", ".jpeg", ".webp", ".bmp", ".PNG", ".JPG", ".JPEG", ".WEBP", ".BMP"]


def kohya_glob_images(directory, base="*"):
    """train_util.glob_images."""
    img_paths = []
    for ext in KOHYA_IMAGE_EXTENSIONS:
        img_paths.extend(glob.glob(os.path.join(glob.escape(directory), base + ext)))
    img_paths = list(set(img_paths))
    img_paths.sort()
    return img_paths


def kohya_dreambooth(train_data_dir: str, caption_extension: str) -> list[tuple[str, str, int]]:
    """(image path, caption, num_repeats) of every image kohya's DreamBooth dataset trains on."""
    def extract_dreambooth_params(name):
        tokens = name.split("_")
        try:
            n_repeats = int(tokens[0])
        except ValueError:
            return 0, ""
        caption_by_folder = "_".join(tokens[1:])
        return n_repeats, caption_by_folder

    def read_caption(img_path):
        cap_path = os.path.splitext(img_path)[0] + caption_extension
        if os.path.isfile(cap_path):
            with open(cap_path, "rt", encoding="utf-8") as f:
                return f.readlines()[0].strip()
        return None

    images = []
    for subdir in Path(train_data_dir).iterdir():
        if not subdir.is_dir():
            continue
        num_repeats, class_tokens = extract_dreambooth_params(subdir.name)
        if num_repeats < 1:
            continue
        for img_path in kohya_glob_images(str(subdir), "*"):
            caption = read_caption(img_path)
            images.append((img_path, class_tokens if caption is None else caption, num_repeats))
    return sorted(images)


def images(folder: Path, n: int, caption_ext: str | None = None, start: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        pattern_image(i, 16).save(folder / f"{i}.png")
        if caption_ext:
            (folder / f"{i}{caption_ext}").write_text(f"{folder.name} picture {i}")


@pytest.fixture
def kohya_folder(tmp_path):
    root = tmp_path / "img"
    images(root / "10_sks dog", 2, ".txt")
    images(root / "1_dog", 3, ".txt")
    images(root / "3_sks cat", 2)                      # no captions: "sks cat"
    images(root / "2_ohwx_woman", 1, ".txt")           # class tokens with "_" in them
    images(root / "2_ohwx_woman", 1, start=1)
    images(root / "10_sks dog" / "extra", 1, ".txt")   # deeper than kohya reads
    images(root / "notes", 2, ".txt")                  # no repeats: kohya ignores it
    images(root / "0_off", 1, ".txt")                  # 0 repeats: ignored
    images(root, 1, ".txt")                            # loose in the root: ignored
    (root / "10_sks dog" / "1.txt").write_text("sks dog, sitting\nsource: my notes, do not train\n")
    (root / "1_dog" / "2.txt").write_text("a dog\r\n\r\nmore")   # kohya reads the first line only
    return root


def test_kohya_repeat_folders_train_as_kohya_s_dreambooth_dataset(kohya_folder, caplog):
    with caplog.at_level(logging.WARNING):
        scan = scan_dataset(kohya_folder, layout="kohya")
    got = sorted((str(s.path), s.caption, s.repeats) for s in scan.samples)
    assert got == kohya_dreambooth(str(kohya_folder), ".txt")
    assert {s.path.name: s.caption for s in scan.samples if s.path.parent.name == "10_sks dog"}["1.png"] == \
        "sks dog, sitting"
    assert scan.layout == "kohya"
    for folder in ("10_sks dog", "1_dog"):             # one warning each: the later lines are not read
        assert sum(f"{folder}: 1 caption file(s) hold more than one line" in r.getMessage()
                   for r in caplog.records) == 1
    assert ("3_sks cat", "sks cat") in {(s.path.parent.name, s.caption) for s in scan.samples}
    assert ("2_ohwx_woman", "ohwx_woman") in {(s.path.parent.name, s.caption) for s in scan.samples}
    assert scan.skipped["outside_repeat_folders"] == 1 + 2 + 1 + 1     # extra/, notes/, 0_off/, the root's image
    for where in ("extra", "notes", "0_off", str(kohya_folder) + ":"):
        assert any(where in r.getMessage() for r in caplog.records), where

    # one epoch draws each image its folder's repeats times, as kohya's epoch does
    stream = SampleStream([s.repeats for s in scan.samples], seed=3)
    epoch = Counter(scan.samples[stream[i]].path.parent.name for i in range(stream.epoch_length))
    assert epoch == {"10_sks dog": 20, "1_dog": 3, "3_sks cat": 6, "2_ohwx_woman": 4}
    assert stream.epoch_of(stream.epoch_length) == 1


def _layout_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "--data-dir" in r.getMessage()]


def test_auto_reads_a_repeat_named_folder_beside_other_images_as_plain(tmp_path, caplog):
    """A plain dataset with one year-named folder keeps all of its images, at one draw each, and says why."""
    images(tmp_path / "2023_photos", 3, ".txt")
    images(tmp_path / "cats", 5, ".txt", start=3)
    images(tmp_path, 4, ".txt", start=8)
    (tmp_path / "log").mkdir()                         # holds no image: no part of the decision
    with caplog.at_level(logging.WARNING):
        scan = scan_dataset(tmp_path)
    assert (len(scan), {s.repeats for s in scan.samples}, scan.layout, scan.skipped) == (12, {1}, "plain", {})
    assert _layout_warnings(caplog) == [
        f"--data-dir {tmp_path}: '2023_photos' is named like kohya's <repeats>_<class tokens> folders, but 'cats' "
        f"and 4 image(s) beside them are not; read as plain folders (no repeats; images without a caption file are "
        f"skipped); --data-layout kohya reads only the repeat folders, as kohya does"]


def test_auto_reads_loose_images_beside_a_repeat_folder_as_plain(tmp_path, caplog):
    images(tmp_path / "10_x", 2, ".txt")
    images(tmp_path, 1, ".txt", start=2)
    with caplog.at_level(logging.WARNING):
        scan = scan_dataset(tmp_path)
    assert ([s.repeats for s in scan.samples], scan.layout) == ([1, 1, 1], "plain")
    assert len(_layout_warnings(caplog)) == 1 and "but 1 image(s) beside them is not" in _layout_warnings(caplog)[0]


def test_auto_reads_repeat_folders_alone_as_kohya_does(kohya_folder, caplog):
    """Only repeat folders hold images (folders without images, such as kohya_ss' log/ and model/ beside img/'s
    folders, do not count): kohya's layout, said in one warning with each folder's repeats and images."""
    for other in ("notes", "0_off"):
        for file in (kohya_folder / other).iterdir():
            file.unlink()
    (kohya_folder / "0.png").unlink()
    (kohya_folder / "model").mkdir()
    (kohya_folder / ".cache").mkdir()
    images(kohya_folder / ".cache", 1, ".txt")          # a hidden folder is no image folder
    with caplog.at_level(logging.WARNING):
        scan = scan_dataset(kohya_folder)
    assert scan.layout == "kohya"
    assert sorted((str(s.path), s.caption, s.repeats) for s in scan.samples) == \
        kohya_dreambooth(str(kohya_folder), ".txt")
    assert _layout_warnings(caplog) == [
        f"--data-dir {kohya_folder}: read as kohya's <repeats>_<class tokens> folders: '10_sks dog' x10 (2 images), "
        f"'1_dog' x1 (3 images), '2_ohwx_woman' x2 (2 images) and '3_sks cat' x3 (2 images); --data-layout plain "
        f"reads them as plain folders"]


def test_auto_says_when_a_repeat_count_reads_like_a_year(tmp_path, caplog):
    images(tmp_path / "2024_01_trip", 2)
    with caplog.at_level(logging.WARNING):
        scan = scan_dataset(tmp_path)
    assert [(s.caption, s.repeats) for s in scan.samples] == [("01_trip", 2024)] * 2
    assert "(a repeat count of 2024 reads like a year or a number in a folder name)" in _layout_warnings(caplog)[0]


def test_the_plain_layout_reads_repeat_folders_as_plain_folders(kohya_folder):
    scan = scan_dataset(kohya_folder, layout="plain")
    assert scan.layout == "plain" and {s.repeats for s in scan.samples} == {1}
    captioned = sorted(p for p in kohya_folder.rglob("*.png") if p.with_suffix(".txt").is_file())
    assert [s.path for s in scan.samples] == captioned
    assert scan.skipped == {"empty_caption": 3}         # 3_sks cat/ and 2_ohwx_woman/1.png: no class tokens


def test_the_kohya_layout_needs_a_repeat_folder_and_no_metadata_jsonl(tmp_path):
    from sdlab.train.errors import TrainError

    images(tmp_path / "cats", 2, ".txt")
    images(tmp_path / "0_off", 2, ".txt")
    with pytest.raises(TrainError, match="--data-layout kohya reads kohya's <repeats>_<class tokens> folders .* "
                                         "and it has none; --data-layout plain"):
        scan_dataset(tmp_path, layout="kohya")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "cats/0.png", "text": "a cat"}))
    with pytest.raises(TrainError, match="holds a metadata.jsonl, which is the whole dataset: --data-layout kohya"):
        scan_dataset(tmp_path, layout="kohya")
    assert [s.caption for s in scan_dataset(tmp_path, layout="plain").samples] == ["a cat"]


def test_a_kohya_folder_without_any_caption_file_trains_on_the_class_tokens(tmp_path):
    images(tmp_path / "5_zwx toy", 3)
    scan = scan_dataset(tmp_path)
    assert [(s.caption, s.repeats) for s in scan.samples] == [("zwx toy", 5)] * 3 and not scan.skipped


def test_a_kohya_folder_without_class_tokens_trains_its_uncaptioned_images_on_the_empty_caption(tmp_path, caplog):
    """kohya's class tokens of `3_` are "", which an image without a caption file trains on. Before, those images
    were skipped as having an empty caption."""
    images(tmp_path / "3_", 2)
    images(tmp_path / "2_dog", 1, ".txt", start=2)
    with caplog.at_level(logging.WARNING):
        scan = scan_dataset(tmp_path)
    got = sorted((str(s.path), s.caption, s.repeats) for s in scan.samples)
    assert got == kohya_dreambooth(str(tmp_path), ".txt")
    assert [caption for _, caption, _ in got] == ["2_dog picture 2", "", ""] and not scan.skipped
    assert any("2 image(s) without a .txt caption train on the empty caption" in r.getMessage() for r in caplog.records)
    images(tmp_path / "3_", 1, start=9)
    (tmp_path / "3_" / "9.txt").write_text("")        # an empty caption file stays skipped (kohya refuses it)
    assert scan_dataset(tmp_path).skipped == {"empty_caption": 1}


def test_a_kohya_caption_file_with_a_blank_first_line_trains_on_the_empty_caption(tmp_path, caplog):
    """kohya's ``read_caption`` asserts only that the file has a line (a 0-byte file fails); a line break alone, or
    a blank first line, is the caption "". Before, sdlab skipped those images as having an empty caption. An image
    that trains on its folder's caption while a caption file of another extension lies beside it is named."""
    images(tmp_path / "3_", 1)
    images(tmp_path / "2_sks dog", 2, start=1)
    (tmp_path / "3_" / "0.txt").write_text("\n")
    (tmp_path / "2_sks dog" / "1.txt").write_text("\nsecond line")
    (tmp_path / "2_sks dog" / "2.caption").write_text("a dog")
    with caplog.at_level(logging.WARNING):
        scan = scan_dataset(tmp_path)
    got = sorted((str(s.path), s.caption, s.repeats) for s in scan.samples)
    assert got == kohya_dreambooth(str(tmp_path), ".txt") and [c for _, c, _ in got] == ["", "sks dog", ""]
    assert not scan.skipped
    assert any("train on the class tokens 'sks dog'; 2: the caption file 2.caption beside it is read with "
               "--caption-extension .caption" in r.getMessage() for r in caplog.records)


def test_without_repeat_folders_the_stream_is_the_plain_permutation(tmp_path):
    """A dataset without repeats draws exactly what it drew before repeats existed, so older runs resume alike."""
    images(tmp_path / "a", 3, ".txt")
    images(tmp_path / "b", 2, ".txt", start=3)
    scan = scan_dataset(tmp_path)
    assert [s.repeats for s in scan.samples] == [1] * 5
    stream = SampleStream([1] * 5, seed=7)
    for epoch in range(3):
        assert [stream[epoch * 5 + i] for i in range(5)] == \
            torch.randperm(5, generator=generator_for(7, "epoch", epoch)).tolist()


def test_caption_extension_reads_kohya_s_caption_files(tmp_path, caplog):
    folder = tmp_path / "d"
    images(folder, 2, ".caption")
    (folder / "0.txt").write_text("the txt caption")
    with caplog.at_level(logging.WARNING):
        txt = scan_dataset(folder)
    assert [(s.path.name, s.caption) for s in txt.samples] == [("0.png", "the txt caption")]
    assert any("1.png: no .txt caption (the caption file 1.caption beside it is read with --caption-extension "
               ".caption)" in r.getMessage() for r in caplog.records)
    for extension in (".caption", "caption"):            # kohya adds the missing dot
        scan = scan_dataset(folder, extension)
        assert [(s.path.name, s.caption) for s in scan.samples] == [("0.png", "d picture 0"), ("1.png", "d picture 1")]
    root = tmp_path / "k"
    images(root / "4_sks", 1, ".caption")
    assert [s.caption for s in scan_dataset(root, ".caption").samples] == ["4_sks picture 0"]
    assert [(str(s.path), s.caption, s.repeats) for s in scan_dataset(root, ".caption").samples] == \
        kohya_dreambooth(str(root), ".caption")


def test_linked_folders_are_followed_and_link_loops_end(tmp_path):
    elsewhere = tmp_path / "set1"
    images(elsewhere, 2, ".txt")
    images(elsewhere / "deeper", 1, ".txt", start=2)
    (elsewhere / "deeper" / "loop").symlink_to(elsewhere, target_is_directory=True)
    plain = tmp_path / "plain"
    images(plain, 1, ".txt", start=3)
    (plain / "linked").symlink_to(elsewhere, target_is_directory=True)
    assert sorted(str(s.path.relative_to(plain)) for s in scan_dataset(plain).samples) == \
        ["3.png", "linked/0.png", "linked/1.png", "linked/deeper/2.png"]

    kohya = tmp_path / "img"
    kohya.mkdir()
    (kohya / "10_set1").symlink_to(elsewhere, target_is_directory=True)
    scan = scan_dataset(kohya)
    assert [(s.path.name, s.repeats) for s in scan.samples] == [("0.png", 10), ("1.png", 10)]
    assert [(Path(p).name, r) for p, _, r in kohya_dreambooth(str(kohya), ".txt")] == [("0.png", 10), ("1.png", 10)]


def test_a_metadata_jsonl_with_a_byte_order_mark_keeps_its_first_line(tmp_path):
    images(tmp_path, 2)
    lines = [json.dumps({"file_name": f"{i}.png", "text": f"picture {i}"}) for i in range(2)]
    (tmp_path / "metadata.jsonl").write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode())
    scan = scan_dataset(tmp_path)
    assert [s.caption for s in scan.samples] == ["picture 0", "picture 1"] and not scan.skipped


def test_a_metadata_csv_is_read_as_hugging_face_imagefolder_reads_it(tmp_path):
    """Before, a metadata.csv (imagefolder's other metadata file, as Excel or pandas write it) was passed over:
    every image was skipped as uncaptioned and the run refused its data."""
    images(tmp_path, 4)
    (tmp_path / "sub").mkdir()
    pattern_image(1, 16).save(tmp_path / "sub" / "4.png")
    rows = ('file_name,text,score\r\n0.png,"red, square",1\r\n1.png,"two\nlines ""quoted""",2\r\n'
            ',no file,3\r\n2.png,,4\r\n\r\nsub/4.png,café 猫,5\r\n')
    (tmp_path / "metadata.csv").write_bytes(b"\xef\xbb\xbf" + rows.encode())  # Excel's "CSV UTF-8"
    scan = scan_dataset(tmp_path)
    assert [(os.path.relpath(s.path, tmp_path), s.caption) for s in scan.samples] == [
        ("0.png", "red, square"), ("1.png", 'two\nlines "quoted"'), ("sub/4.png", "café 猫")]
    assert scan.skipped == {"bad_metadata_line": 1, "empty_caption": 1}


def test_metadata_files_that_cannot_be_read_say_why(tmp_path, caplog):
    images(tmp_path, 2)
    (tmp_path / "metadata.csv").write_bytes("file_name,text\n0.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(TrainError, match=r"metadata.csv is not UTF-8 text \(the byte 0xE9 at byte 25\); save it as CSV UTF-8"):
        scan_dataset(tmp_path)
    (tmp_path / "metadata.csv").write_text("image,text\n0.png,a\n")
    with pytest.raises(TrainError, match="a file_name column is needed \\(it has 'image', 'text'\\)"):
        scan_dataset(tmp_path)
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "text": "a"}))
    with pytest.raises(TrainError, match="holds both a metadata.jsonl and a metadata.csv"):
        scan_dataset(tmp_path)
    (tmp_path / "metadata.csv").unlink()
    with pytest.raises(TrainError, match="holds a metadata.jsonl, which is the whole dataset: --data-layout kohya"):
        scan_dataset(tmp_path, layout="kohya")


def test_a_malformed_metadata_csv_is_one_error_naming_its_line(tmp_path):
    """Before, the CSV was read leniently: a quote never closed took in every row after it (0.png trained on
    'unterminated\n1.png,y', 1.png dropped, no word); a cell over csv's field limit ended in 'internal error:
    Error: field larger than field limit'. pandas' read_csv, which Hugging Face imagefolder uses, refuses the first
    ('EOF inside string')."""
    images(tmp_path, 2)
    meta = tmp_path / "metadata.csv"
    meta.write_text('file_name,text\n\n0.png,"unterminated\n1.png,y\n')
    with pytest.raises(TrainError) as err:
        scan_dataset(tmp_path)
    assert str(err.value) == (f'{meta}: the row starting on line 3 is not well-formed CSV: a quoted cell is never '
                              f'closed (the file ends inside it); close it with ", and write a " inside a quoted '
                              f'cell twice ("")')
    meta.write_text('file_name,text\n0.png,"a "quoted" word"\n')
    with pytest.raises(TrainError, match="the row starting on line 2 is not well-formed CSV: \',\' expected after"):
        scan_dataset(tmp_path)
    meta.write_text('file_name,text\n0.png,"' + "x" * 131_073 + '"\n1.png,y\n')
    with pytest.raises(TrainError, match="line 2 is not well-formed CSV: a cell is over 131,072 characters"):
        scan_dataset(tmp_path)


def test_of_two_metadata_csv_columns_of_one_name_the_first_is_read(tmp_path):
    """As pandas' read_csv reads the header (pandas/io/parsers/base_parser.py ``_dedup_names``, pandas 2.2: the
    second 'text' becomes 'text.1'), so Hugging Face imagefolder trains on the first. Before: the last."""
    images(tmp_path, 2)
    (tmp_path / "metadata.csv").write_text("file_name,text,text\n0.png,first,second\n1.png,one\n")
    assert [s.caption for s in scan_dataset(tmp_path).samples] == ["first", "one"]


def test_metadata_rows_without_a_text_caption_are_named_with_their_keys(tmp_path, caplog):
    """Before, rows that name their caption otherwise (diffusers' --caption_column, "prompt") were each
    skipped as an "empty or missing caption", no line saying what the rows lacked."""
    images(tmp_path, 3)
    lines = [{"file_name": "0.png", "prompt": "a"}, {"file_name": "1.png", "text": "b"}, {"file_name": "2.png", "prompt": "c"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(map(json.dumps, lines)))
    with caplog.at_level(logging.WARNING):
        scan = scan_dataset(tmp_path)
    assert [s.caption for s in scan.samples] == ["b"] and scan.skipped == {"empty_caption": 2}
    assert ('metadata.jsonl: 2 line(s) have no "text" (the caption; "caption" is read too; line 1 has \'prompt\'): '
            'their images are skipped; name the caption "text"') in caplog.text


def test_avif_and_jfif_images_train_and_captions_of_no_read_image_are_named(tmp_path, caplog):
    """Before, a .avif picture (kohya's glob_images takes .avif where Pillow reads it: library/train_util.py,
    IMAGE_EXTENSIONS with pillow_avif) or a .jfif one (a JPEG as Windows browsers save it) was passed over, and
    the caption of a picture in a format not read (an iPhone's .heic) trained nothing, no line saying so."""
    pattern_image(0, 16).save(tmp_path / "a.jfif", format="JPEG")
    (tmp_path / "a.txt").write_text("a jfif")
    (tmp_path / "sub").mkdir()
    if features.check("avif"):
        pattern_image(1, 16).save(tmp_path / "sub" / "b.avif")
        (tmp_path / "sub" / "b.txt").write_text("an avif")
    (tmp_path / "sub" / "photo.heic").write_bytes(b"\0\0\0\x18ftypheic")
    (tmp_path / "sub" / "photo.txt").write_text("a phone photo")
    (tmp_path / "notes.txt").write_text("my notes")
    (tmp_path / "c.png.txt").write_text("a caption named after the whole file name")
    pattern_image(2, 16).save(tmp_path / "c.png")
    (tmp_path / "c.txt").write_text("c")
    with caplog.at_level(logging.WARNING):
        scan = scan_dataset(tmp_path)
    read = [("a.jfif", "a jfif"), ("c.png", "c")] + ([("b.avif", "an avif")] if features.check("avif") else [])
    assert sorted((s.path.name, s.caption) for s in scan.samples) == sorted(read) and not scan.skipped
    assert (f"3 .txt file(s) name no image that is read, and train nothing: {tmp_path / 'c.png.txt'}, "
            f"{tmp_path / 'notes.txt'} and {tmp_path / 'sub' / 'photo.txt'} (beside photo.heic, a format not read); the "
            f"images read are .png .jpg .jpeg .jfif .webp .avif .bmp .gif .tif .tiff files") in caplog.text
    caplog.clear()
    kohya = tmp_path / "kohya"
    (kohya / "3_sks").mkdir(parents=True)
    (kohya / "3_sks" / "photo.heic").write_bytes(b"\0\0\0\x18ftypheic")
    (kohya / "3_sks" / "photo.txt").write_text("sks")
    pattern_image(0, 16).save(kohya / "3_sks" / "0.png")
    with caplog.at_level(logging.WARNING):
        assert [s.caption for s in scan_dataset(kohya).samples] == ["sks"]
    assert f"1 .txt file(s) name no image that is read, and train nothing: {kohya / '3_sks' / 'photo.txt'}" in caplog.text


def test_metadata_files_below_the_data_dir_are_named(tmp_path, caplog):
    """Before, a Hugging Face dataset's split folders (train/metadata.jsonl, test/metadata.csv) given as their
    parent were read as plain folders: every image skipped as uncaptioned, no line naming the metadata files."""
    for split, name in (("train", "metadata.jsonl"), ("test", "metadata.csv")):
        images(tmp_path / split, 1)
    (tmp_path / "train" / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "text": "a"}))
    (tmp_path / "test" / "metadata.csv").write_text("file_name,text\n0.png,b\n")
    with caplog.at_level(logging.WARNING):
        scan = scan_dataset(tmp_path)
    assert not scan.samples and scan.skipped == {"empty_caption": 2}
    assert (f"--data-dir {tmp_path}: {tmp_path / 'test' / 'metadata.csv'} and {tmp_path / 'train' / 'metadata.jsonl'} "
            f"are not read (only a metadata file directly in --data-dir is); give --data-dir {tmp_path / 'train'} to "
            f"train on its images and captions") in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert [s.caption for s in scan_dataset(tmp_path / "train").samples] == ["a"]
    assert "not read" not in caplog.text


def test_caption_files_with_a_byte_order_mark_train_their_text(tmp_path, caplog):
    """Before, a caption saved by Windows Notepad as "Unicode" (UTF-16 with its byte-order mark) was skipped with
    the advice to convert it from Latin-1, and a UTF-8 byte-order mark stayed in the caption: a file holding that
    mark alone (an empty caption saved as UTF-8 with BOM) trained as a captioned image instead of being skipped."""
    images(tmp_path, 5)
    (tmp_path / "0.txt").write_bytes("a red square, café".encode("utf-16"))          # BOM + native order
    (tmp_path / "1.txt").write_bytes(codecs.BOM_UTF16_BE + "猫 cat".encode("utf-16-be"))
    (tmp_path / "2.txt").write_bytes(codecs.BOM_UTF8 + "a green stripe\r\n".encode())
    (tmp_path / "3.txt").write_bytes(codecs.BOM_UTF8 + b"\r\n")
    (tmp_path / "4.txt").write_bytes(codecs.BOM_UTF32_LE + "thirty-two".encode("utf-32-le"))
    with caplog.at_level(logging.WARNING):
        scan = scan_dataset(tmp_path)
    assert [(s.path.name, s.caption) for s in scan.samples] == [
        ("0.png", "a red square, café"), ("1.png", "猫 cat"), ("2.png", "a green stripe"), ("4.png", "thirty-two")]
    assert scan.skipped == {"empty_caption": 1} and f"skipping {tmp_path / '3.png'}: empty or missing caption" in caplog.text
    # kohya's layout: its read_caption keeps a UTF-8 mark, a first line that the tokenizer reads as the empty
    # caption, which trains (a 0-byte file does not)
    kohya = tmp_path / "kohya" / "2_sks"
    images(kohya, 2)
    (kohya / "0.txt").write_bytes(codecs.BOM_UTF8 + b"\nsecond line")
    (kohya / "1.txt").write_bytes(codecs.BOM_UTF8 + "first line\nsecond".encode())
    assert [(s.path.name, s.caption) for s in scan_dataset(tmp_path / "kohya").samples] == [("0.png", ""), ("1.png", "first line")]


def test_a_damaged_utf16_caption_is_named_so(tmp_path, caplog):
    """Before, a UTF-16 caption cut short (its byte-order mark kept) was called 'not UTF-8 text', with the advice
    to convert it from Latin-1 (iconv -f latin1), which would garble it."""
    images(tmp_path, 3)
    (tmp_path / "0.txt").write_bytes(codecs.BOM_UTF16_LE + b"a\x00b")                 # an odd byte last
    (tmp_path / "1.txt").write_bytes(codecs.BOM_UTF32_BE + b"\x00\x11\x00\x00")         # past U+10FFFF
    (tmp_path / "2.txt").write_text("fine")
    with caplog.at_level(logging.WARNING):
        scan = scan_dataset(tmp_path)
    assert [s.caption for s in scan.samples] == ["fine"] and scan.skipped == {"bad_caption": 2}
    assert (f"skipping {tmp_path / '0.png'}: its caption {tmp_path / '0.txt'} starts with a UTF-16 byte-order mark "
            f"but is damaged UTF-16 text (truncated data at byte 5 of 5); save it again (as UTF-8, or as "
            f'"Unicode")') in caplog.text
    assert "damaged UTF-32 text (code point not in range(0x110000) at byte 5 of 8)" in caplog.text
    assert "latin1" not in caplog.text


def _jpeg(path: Path, i: int) -> bytes:
    """A JPEG whose compressed data is most of the file (noise), so a cut lands in it, not in the headers."""
    noise = np.random.default_rng(i).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, quality=90)
    return path.read_bytes()


def test_a_truncated_jpeg_is_skipped_at_the_scan(tmp_path):
    whole = _jpeg(tmp_path / "whole.jpg", 0)
    (tmp_path / "cut.jpg").write_bytes(whole[: len(whole) * 2 // 3])
    (tmp_path / "tail.jpg").write_bytes(whole + b"camera trailer")        # bytes after EOI: PIL reads it whole
    for name in ("whole", "cut", "tail"):
        (tmp_path / f"{name}.txt").write_text(name)
    scan = scan_dataset(tmp_path)
    assert sorted(s.path.name for s in scan.samples) == ["tail.jpg", "whole.jpg"]
    assert scan.skipped == {"broken_image": 1}


def test_an_image_that_breaks_after_the_scan_is_warned_about_and_counted_once(tmp_path, caplog):
    for i in range(3):
        _jpeg(tmp_path / f"{i}.jpg", i)
        (tmp_path / f"{i}.txt").write_text(f"picture {i}")
    scan = scan_dataset(tmp_path)
    whole = (tmp_path / "1.jpg").read_bytes()
    (tmp_path / "1.jpg").write_bytes(whole[: len(whole) // 2])
    data = TrainData(scan, resolution=16, center_crop=True, random_flip=False, seed=0, batch_size=1, grad_accum=1,
                     num_workers=1)
    with caplog.at_level(logging.WARNING):
        paths = [batch.paths[0] for _, _, batch in data.iterate(0, 12)]       # four epochs
    data.close()
    assert all(not p.endswith("1.jpg") for p in paths) and len(paths) == 12
    assert sum("1.jpg" in r.getMessage() for r in caplog.records) == 1
    assert data.broken_at_load == {str(tmp_path / "1.jpg"): 1}


def test_an_older_run_checkpoint_reads_its_data_as_plain_and_auto_must_choose_alike(tmp_path):
    """A checkpoint from before --data-layout read its folders as plain ones: left out, the layout stays plain;
    auto is compared once the scan has chosen."""
    from sdlab.train.config import TrainConfig, merge_resumed, resume_changes

    older = {k: v for k, v in TrainConfig(data_dir=str(tmp_path)).to_json().items() if k != "data_layout"}
    cfg, changed = merge_resumed(older, {})
    assert (cfg.data_layout, changed) == ("plain", {})
    cfg, _ = merge_resumed(older, {"data_layout": "auto"})
    assert resume_changes(older, cfg) == {}                                   # not chosen yet
    assert resume_changes(older, replace(cfg, data_layout="kohya")) == {"data_layout": ("plain", "kohya")}


def test_the_layout_a_run_read_is_in_its_summary_and_checked_on_resume(tmp_path, one_thread, capsys):
    from sdlab.train.cli import main
    from train_fixtures import run_in_process, write_tiny_model

    model = write_tiny_model(tmp_path / "tiny.safetensors")
    data = tmp_path / "img"
    images(data / "10_sks dog", 2, ".txt")
    out = tmp_path / "run"
    run_in_process(out, model, data, "--max-steps", "1", "--checkpoint-every", "1", "--data-layout", "plain")
    assert json.loads((out / "summary.json").read_text())["data_layout"] == "plain"
    capsys.readouterr()
    assert main(["--output-dir", str(out), "--resume", "latest", "--max-steps", "2", "--no-progress",
                 "--data-layout", "auto"]) == 2
    assert "--data-layout was 'plain', now 'kohya'" in capsys.readouterr().err
    assert main(["--output-dir", str(out), "--resume", "latest", "--max-steps", "2", "--no-progress"]) == 0
    assert json.loads((out / "summary.json").read_text())["data_layout"] == "plain"
    run_in_process(tmp_path / "auto", model, data, "--max-steps", "1", "--checkpoint-every", "1")
    assert json.loads((tmp_path / "auto" / "summary.json").read_text())["data_layout"] == "kohya"


def test_the_data_layout_comes_from_a_config_file_too(tmp_path):
    from sdlab.train.config import config_from_settings, load_config_file
    from sdlab.train.errors import TrainError

    (tmp_path / "run.toml").write_text('data_layout = "kohya"\n')
    assert config_from_settings(load_config_file(tmp_path / "run.toml")).data_layout == "kohya"
    (tmp_path / "bad.toml").write_text('data_layout = "kohya_ss"\n')
    with pytest.raises(TrainError, match="--data-layout must be one of auto, plain, kohya; got 'kohya_ss'"):
        config_from_settings(load_config_file(tmp_path / "bad.toml"))
