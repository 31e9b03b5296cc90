"""Image metadata beyond the PNG round trip: bounded, linear-time reading of hostile files, JPEG / WebP EXIF,
LoRA tags and hashes, model names, and all-or-nothing batch writes."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import re
import shutil
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from sdlab.diffusion.discretization import DISCRETIZATIONS
from sdlab.pipeline import png_info
from sdlab.pipeline.images import ImageTooLargeError, open_image
from sdlab.pipeline.infotext import (
    LoraRef,
    format_hashes,
    from_parameters,
    parse_lora_hashes,
    split_lora_tags,
    to_parameters,
    with_lora_tags,
)
from sdlab.pipeline.png_info import (
    MAX_PARAMETERS_CHARS,
    ParametersError,
    encode_image,
    format_parameters,
    lora_hash,
    model_name,
    parse_parameters,
    read_parameters,
    write_files_all_or_nothing,
)
from sdlab.pipeline.request import GenerationRequest

A1111_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')   # A1111's own pattern


def _image(width=16, height=8):
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _png_with_text(path: Path, key: str, text: str, *, compressed: bool) -> Path:
    info = PngImagePlugin.PngInfo()
    info.add_text(key, text, zip=compressed)
    _image(4, 4).save(path, pnginfo=info)
    return path


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A tiny PNG that declares width x height pixels (Pillow reads the size before any pixel)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))
    return path


# --- hostile parameters text --------------------------------------------------------------------------------

@pytest.mark.parametrize("tail", [
    "A: " + "a" * 200_000,                 # the reported ReDoS: a key-like run with no colon after it
    "a" * 200_000,
    "a-" * 100_000,
    "a:" * 100_000,
    'Ab: "x, ' * 25_000,
    '\\"' * 100_000,
])
def test_parse_is_linear_on_hostile_text(tail):
    start = time.process_time()                       # CPU time: a bound on the work, not on the machine's load
    parse_parameters("p\n" + tail)
    assert time.process_time() - start < 2.0          # A1111's pattern: > 60 s for the first case


def test_pair_scanner_finds_what_a1111s_pattern_finds():
    rng = np.random.default_rng(1)
    alphabet = list('ab :,"\\-/\tX1é')
    for _ in range(5_000):
        line = "".join(rng.choice(alphabet, size=int(rng.integers(0, 30))))
        assert png_info._pairs(line) == A1111_PARAM.findall(line), line


def test_redos_file_is_read_quickly_and_oversize_text_is_refused(tmp_path):
    bomb = _png_with_text(tmp_path / "redos.png", "parameters", "p\nA: " + "a" * 60_000, compressed=True)
    assert bomb.stat().st_size < 1_000
    start = time.process_time()
    assert parse_parameters(read_parameters(bomb))["Prompt"].startswith("p\nA: aaa")
    assert time.process_time() - start < 2.0

    big = _png_with_text(tmp_path / "big.png", "parameters", "p\nA: " + "a" * 200_000, compressed=True)
    with pytest.raises(ParametersError, match=f"limit is {MAX_PARAMETERS_CHARS}"):
        read_parameters(big)


def test_text_chunk_beyond_pillows_limit_is_a_parameters_error(tmp_path):
    huge = _png_with_text(tmp_path / "ztxt.png", "parameters", "a" * (2 << 20), compressed=True)   # 2 MiB
    with pytest.raises(ParametersError, match="cannot read the parameters"):
        read_parameters(huge)


@pytest.mark.parametrize("side", [10_000, 20_000])       # 100 Mpx: Pillow warns; 400 Mpx: Pillow raises
def test_decompression_bombs_are_refused_before_decoding(tmp_path, side):
    path = _png_header_only(tmp_path / "bomb.png", side, side)
    with pytest.raises(ImageTooLargeError, match="too large"):
        with open_image(path):
            pass
    with pytest.raises(ParametersError, match="too large"):
        read_parameters(path)


def test_a_picture_between_pillows_warning_and_its_error_is_refused_without_its_warning(tmp_path):
    """100 Mpx, between Image.MAX_IMAGE_PIXELS and twice it, where Pillow's own check in `Image.open` warns
    (DecompressionBombWarning, then its `warnings.warn` source line on stderr) before sdlab's error: the header is
    read and refused before that check runs, so no warning is issued (in process, every filter "always") and
    `sdlab upscale` prints its one error line only."""
    import subprocess
    import sys
    import warnings

    path = _png_header_only(tmp_path / "bomb.png", 10_000, 10_000)
    with warnings.catch_warnings(record=True) as issued:
        warnings.simplefilter("always")
        with pytest.raises(ImageTooLargeError, match="too large"):
            with open_image(path):
                pass
        with pytest.raises(ImageTooLargeError, match="too large"):
            with open_image(io.BytesIO(path.read_bytes())):     # a server's picture, read from the request
                pass
    assert [w.category.__name__ for w in issued] == []
    done = subprocess.run([sys.executable, "-W", "default", "-m", "sdlab", "upscale", str(path), "--scale", "2",
                           "--out", str(tmp_path / "out.png")], capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "too large to open safely" in lines[0], done.stderr
    assert not (tmp_path / "out.png").exists()


# --- JPEG / WebP ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_jpeg_and_webp_carry_the_parameters_in_exif_usercomment_as_a1111(tmp_path, fmt):
    text = "a cat, 日本語\nNegative prompt: dog\nSteps: 2, Sampler: Euler, Seed: 1"
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(encode_image(_image(), fmt, text))
    with Image.open(path) as image:
        assert image.format == fmt
        comment = image.getexif().get_ifd(0x8769)[0x9286]
    assert comment == b"UNICODE\0" + text.encode("utf-16-be")           # piexif's "unicode" UserComment
    assert read_parameters(path) == text
    assert _user_comment_type(image.info["exif"]) == 7   # UNDEFINED: piexif (A1111's reader) cannot read BYTE


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_a_usercomment_in_ifd0_is_read_as_fooocus_writes_it(tmp_path, fmt):
    """Fooocus's `meta_parser.get_exif` puts its text in IFD0's UserComment (Pillow writes it as ASCII)."""
    text = "a red cube\nNegative prompt: green sphere\nSteps: 6, Sampler: DPM++ 2M SDE Karras, Seed: 1234, Version: Fooocus v2.5.5"
    exif = Image.Exif()
    exif[0x9286], exif[0x0131], exif[0x927C] = text, "Fooocus v2.5.5", "a1111"
    path = tmp_path / f"x.{fmt.lower()}"
    _image().save(path, format=fmt, exif=exif)
    assert read_parameters(path) == text


def _user_comment_type(exif: bytes) -> int:
    """The TIFF type of the UserComment entry of raw EXIF bytes (a TIFF structure; JPEG's has "Exif\0\0" first)."""
    import struct

    tiff = exif.removeprefix(b"Exif\0\0")
    order = ">" if tiff[:2] == b"MM" else "<"

    def entries(offset):
        (count,) = struct.unpack_from(order + "H", tiff, offset)
        return [struct.unpack_from(order + "HHII", tiff, offset + 2 + 12 * i) for i in range(count)]

    exif_ifd = next(value for tag, _, _, value in entries(struct.unpack_from(order + "I", tiff, 4)[0]) if tag == 0x8769)
    return next(kind for tag, kind, _, _ in entries(exif_ifd) if tag == 0x9286)


def test_jpeg_too_long_for_exif_is_a_clear_error():
    with pytest.raises(ParametersError, match="64 KiB"):
        encode_image(_image(), "JPEG", "x" * 40_000)


# --- LoRA tags, hashes, model names ----------------------------------------------------------------------------

def test_lora_tags_split_and_added_like_a1111():
    bare, refs = split_lora_tags("a cat <lora:style:0.8>, <lora:detail> <lyco:x:0.5:0.2> <LORA:y:1>")
    assert bare == "a cat ,   " and refs == [LoraRef("style", 0.8), LoraRef("detail", 1.0), LoraRef("x", 0.5)]
    with pytest.raises(ValueError, match="WEIGHT"):
        split_lora_tags("a <lora:style:abc>")
    assert with_lora_tags("a cat <lora:style:0.8>", [LoraRef("style", 0.8), LoraRef("b", 0.25)]) == \
        "a cat <lora:style:0.8> <lora:b:0.25>"
    loras = [LoraRef("s,t:y", 0.5, "0123456789ab"), LoraRef("u", 1.0, "ba9876543210")]
    text = format_hashes((ref.name, ref.hash) for ref in loras)
    assert text == "sty: 0123456789ab, u: ba9876543210"
    assert parse_lora_hashes(text) == {"sty": "0123456789ab", "u": "ba9876543210"}


def test_parameters_record_the_loras_and_read_back():
    req = GenerationRequest(prompt="a cat", steps=3, sampler="Euler", schedule="karras", cfg_scale=7.0, seed=1,
                            width=64, height=64)
    text = format_parameters(to_parameters(req, loras=[LoraRef("style", 0.8, "0123456789ab")]))
    params = parse_parameters(text)
    assert params["Prompt"] == "a cat <lora:style:0.8>" and params["Lora hashes"] == "style: 0123456789ab"


@pytest.mark.parametrize("schedule", sorted(DISCRETIZATIONS))
def test_every_schedule_is_written_as_a1111_labels_it_and_reads_back(schedule):
    req = GenerationRequest(prompt="a cat", steps=3, sampler="Euler", schedule=schedule, cfg_scale=7.0, seed=1,
                            width=64, height=64)
    written = parse_parameters(format_parameters(to_parameters(req)))["Schedule type"]
    expected = {"karras": "Karras", "sgm_uniform": "SGM Uniform", "ddim_uniform": "DDIM", "uniform": "Uniform",
                "normal": "Normal", "simple": "Simple", "exponential": "Exponential",
                "polyexponential": "Polyexponential", "a1111_kl_optimal": "KL Optimal", "align_your_steps": "Align Your Steps", "a1111_beta": "Beta",
                "turbo": "Turbo", "align_your_steps_sdxl": "Align Your Steps"}
    assert written == expected.get(schedule, schedule)
    read = from_parameters({"Schedule type": written})["schedule"]   # A1111's one AYS label: SDXL's for SDXL
    assert read == ("align_your_steps" if schedule == "align_your_steps_sdxl" else schedule)


def test_a1111_schedule_labels_and_keys_read_as_sdlabs_names():
    read = {name: from_parameters({"Schedule type": name}).get("schedule")
            for name in ("SGM Uniform", "sgm_uniform", "DDIM", "Automatic", "Align Your Steps", "Beta", "beta")}
    assert read == {"SGM Uniform": "sgm_uniform", "sgm_uniform": "sgm_uniform", "DDIM": "ddim_uniform",
                    "Automatic": None, "Align Your Steps": "align_your_steps", "Beta": "a1111_beta", "beta": "beta"}


@pytest.mark.parametrize("recorded, schedule", [
    ({"Sampler": "Euler", "Schedule type": "Automatic"}, "uniform"),         # no scheduler option
    ({"Sampler": "DPM++ 2M", "Schedule type": "Automatic"}, "karras"),       # sd_samplers_kdiffusion options
    ({"Sampler": "DPM++ 2M SDE", "Schedule type": "Automatic"}, "exponential"),
    ({"Sampler": "DPM++ 3M SDE", "Schedule type": "Automatic"}, "exponential"),
    ({"Sampler": "DPM2 a", "Schedule type": "Automatic"}, "karras"),
    ({"Sampler": "DPM++ 2M"}, "uniform"),                   # before 1.9: Karras was named in the sampler
    ({"Sampler": "DPM++ 2M Karras"}, "karras"),
    ({"Sampler": "DPM++ 2M", "Schedule type": "Exponential", "Version": "v1.10.1"}, "exponential"),
    ({"Sampler": "DDIM", "Schedule type": "Karras", "Version": "v1.10.1"}, "ddim_uniform"),   # timestep samplers
    ({"Sampler": "PLMS"}, "ddim_uniform"),
])
def test_a_file_a1111_wrote_reads_as_the_schedule_a1111_ran(recorded, schedule):
    fields = from_parameters(recorded)
    assert fields["schedule"] == schedule and fields["img2img_convention"] == "a1111"


def test_ensd_and_a1111s_clip_skip_read_from_a1111_files_and_ensd_is_written():
    fields = from_parameters({"Sampler": "Euler a", "Clip skip": "2", "ENSD": "31337", "Version": "v1.10.1"})
    assert fields["eta_noise_seed_delta"] == 31337
    assert (fields["clip_skip"], fields["clip_skip_convention"]) == (2, "a1111")   # SD2 / SDXL ignore it there
    req = GenerationRequest(prompt="a cat", steps=3, sampler="Euler a", schedule="karras", cfg_scale=7.0, seed=1,
                            width=64, height=64, eta_noise_seed_delta=31337)
    assert parse_parameters(format_parameters(to_parameters(req)))["ENSD"] == 31337


@pytest.mark.parametrize("convention", ["diffusers", "a1111"])
def test_sdlabs_pictures_read_back_the_clip_skip_rule_they_were_drawn_with(convention):
    """A clip skip drawn under A1111's rule (the A1111 API's CLIP_stop_at_last_layers: both prompts move, SD1
    only) is recorded as such (`Clip skip rule: a1111`), so the picture's parameters draw it again; diffusers'
    rule, the default of sdlab's files, writes no label."""
    req = GenerationRequest(prompt="a cat", negative_prompt="ugly, blurry", steps=3, seed=1, width=64, height=64,
                            clip_skip=2, clip_skip_convention=convention)
    parameters = to_parameters(req)
    fields = from_parameters(parse_parameters(format_parameters(parameters)))
    assert (fields["clip_skip"], fields.get("clip_skip_convention", "diffusers")) == (2, convention)
    assert (parameters["Clip skip rule"] is not None) == (convention == "a1111")


SDXL_CONDITIONING = dict(original_size=(512, 768), target_size=(64, 72), crops_coords_top_left=(0, 32),
                         negative_original_size=(100, 200), negative_target_size=(300, 400),
                         negative_crops_coords_top_left=(8, 0), aesthetic_score=7.5, negative_aesthetic_score=1.0)


def test_sdxl_size_crop_and_aesthetic_conditioning_is_recorded_and_read_back():
    """SDXL's size, crop and aesthetic conditioning changes the picture, so the parameters record each value that
    is not the default under sdlab's labels (sizes as WIDTHxHEIGHT, as Size) and `--from-png` reads them back;
    the defaults write none of them."""
    base = dict(prompt="a cat", steps=3, seed=1, width=64, height=64)
    text = format_parameters(to_parameters(GenerationRequest(**base, **SDXL_CONDITIONING)))
    assert "SDXL original size: 768x512" in text and "SDXL crop top: 0, SDXL crop left: 32" in text
    fields = from_parameters(parse_parameters(text))
    assert {name: fields[name] for name in SDXL_CONDITIONING} == SDXL_CONDITIONING
    assert "SDXL" not in format_parameters(to_parameters(GenerationRequest(**base)))
    one_side = from_parameters({"SDXL negative crop left": "16", "Version": "sdlab 0.1.0"})
    assert one_side["negative_crops_coords_top_left"] == (0, 16) and "crops_coords_top_left" not in one_side
    with pytest.raises(ValueError, match="SDXL target size"):
        from_parameters({"SDXL target size": "64 by 64"})


def test_sdlabs_own_files_keep_the_models_default_for_an_unset_schedule():
    fields = from_parameters({"Sampler": "DPM++ 2M SDE", "Schedule type": "Automatic", "Version": "sdlab 0.1.0"})
    assert "schedule" not in fields and "img2img_convention" not in fields
    fields = from_parameters({"Sampler": "DDIM", "Schedule type": "Karras", "Version": "sdlab 0.1.0"})
    assert fields["schedule"] == "karras"


def test_a1111_eta_ddim_reads_as_eta():
    """A1111 records DDIM / PLMS / UniPC's eta as "Eta DDIM" (`sd_samplers_timesteps.py`)."""
    assert from_parameters({"Sampler": "DDIM", "Eta DDIM": "0.5"})["eta"] == 0.5
    assert from_parameters({"Sampler": "Euler a", "Eta": "0.7"})["eta"] == 0.7


def test_a_recorded_size_of_zero_is_refused():
    assert from_parameters({"Size": "64x32"})["width"] == 64
    for size in ("0x64", "64x0", "-8x64"):
        with pytest.raises(ValueError, match="positive"):
            from_parameters({"Size": size})


def test_lora_hash_is_a1111s_addnet_hash(tmp_path):
    header = json.dumps({"__metadata__": {"ss_output_name": "x"}}).encode()
    data = b"\x01\x02" * 1000
    path = tmp_path / "style.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    assert lora_hash(path) == hashlib.sha256(data).hexdigest()[:12]      # the header does not count
    other = tmp_path / "style.pt"
    other.write_bytes(data)
    assert lora_hash(other) == hashlib.sha256(data).hexdigest()[:12]


def test_lora_hash_is_the_sshs_model_hash_of_the_metadata_as_a1111_reads_it(tmp_path):
    """A1111 1.10's NetworkOnDisk: ``set_hash(metadata.get('sshs_model_hash') or sha256_from_cache(...) or '')``,
    ``shorthash = hash[0:12]``: the metadata's hash is taken as it is, whatever the data hash. Before, sdlab's
    ``Lora hashes`` held the data hash of a file whose metadata names another (a file re-saved after training)."""
    data = b"\x01\x02" * 1000
    for stored, expected in [("0123456789ABcdef" * 4, "0123456789AB"), ("", hashlib.sha256(data).hexdigest()[:12])]:
        header = json.dumps({"__metadata__": {"sshs_model_hash": stored}}).encode()
        path = tmp_path / f"style{len(stored)}.safetensors"
        path.write_bytes(struct.pack("<Q", len(header)) + header + data)
        assert png_info.known_lora_hash(path) == (expected if stored else None)    # listed without reading the data
        assert lora_hash(path) == expected


@pytest.mark.parametrize("content", [b"this is not a model", b"<!DOCTYPE html><html></html>",
                                     struct.pack("<Q", 1000) + b"{}", b"\x05\0\0"])
def test_lora_hash_of_a_file_that_is_not_safetensors_is_one_error_naming_it(tmp_path, content):
    """The header length is checked against the file's size before the hash seeks past it: an HTML page
    or text saved as .safetensors is a CheckpointError naming the file (not EINVAL from the seek, nor the
    hash of nothing), and a LoRA folder is searched around it."""
    from sdlab.checkpoints.errors import CheckpointError

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"junk\.safetensors: not a readable safetensors file"):
        lora_hash(junk)
    assert png_info.readable_lora_hash(junk) is None
    assert png_info.safetensors_metadata(junk) == {}


def _safetensors(path: Path, metadata: dict[str, str] | None = None) -> Path:
    header = {"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
    return path


def test_model_name_of_fine_tunes_is_the_run_or_the_files_title(tmp_path):
    assert model_name(_safetensors(tmp_path / "runs" / "cats" / "final.safetensors")) == "cats"
    assert model_name(_safetensors(tmp_path / "runs" / "cats" / "final-ema.safetensors")) == "cats-final-ema"
    assert model_name(_safetensors(tmp_path / "v1-5-pruned-emaonly.safetensors")) == "v1-5-pruned-emaonly"
    titled = _safetensors(tmp_path / "runs" / "dogs" / "final.safetensors", {"modelspec.title": "Dogs v2"})
    assert model_name(titled) == "Dogs v2"
    (tmp_path / "diffusers-model").mkdir()
    assert model_name(tmp_path / "diffusers-model") == "diffusers-model"


# --- all-or-nothing writes -------------------------------------------------------------------------------------

def test_full_disk_in_the_middle_of_a_batch_leaves_nothing(tmp_path, monkeypatch):
    real_fsync, calls = png_info.os.fsync, []

    def fsync_then_full(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(png_info.os, "fsync", fsync_then_full)
    files = [(tmp_path / f"b-{i}.png", b"data") for i in range(3)]
    with pytest.raises(OSError) as raised:
        write_files_all_or_nothing(files, overwrite=True)
    assert raised.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


def test_a_folder_that_refuses_the_write_raises_the_writes_error_not_the_cleanups(tmp_path, monkeypatch):
    """A read-only mount refuses the temporary file and then its removal too: the error raised is the first."""
    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    def removal_refused(path, missing_ok=False):
        raise OSError(errno.EBUSY, "the cleanup's error", str(path))

    monkeypatch.setattr(png_info, "open", read_only, raising=False)
    monkeypatch.setattr(Path, "unlink", removal_refused)
    with pytest.raises(OSError) as raised:
        write_files_all_or_nothing([(tmp_path / "a.png", b"data")], overwrite=False)
    assert raised.value.errno == errno.EROFS


def test_overwrite_takes_back_the_batch_and_restores_the_files_it_replaced(tmp_path, capsys):
    """`--out x.png` of a batch whose second name is a folder: before, x-0.png was written (and an old x-0.png
    lost) while the CLI said "cannot write <folder>: Is a directory; nothing was written"."""
    from cli_helpers import run

    (tmp_path / "a.png").write_bytes(b"old")
    (tmp_path / "b.png").mkdir()
    with pytest.raises(IsADirectoryError):
        write_files_all_or_nothing([(tmp_path / "a.png", b"new"), (tmp_path / "b.png", b"new"),
                                    (tmp_path / "c.png", b"new")], overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]
    assert (tmp_path / "a.png").read_bytes() == b"old"

    out = tmp_path / "cli"
    (out / "x-1.png").mkdir(parents=True)
    code, _, stderr = run(["txt2img", "a cat", "--steps", "1", "--batch", "2", "--out", str(out / "x.png")], capsys)
    assert code == 2 and stderr.strip().splitlines()[-1] == (f"sdlab: error: cannot write {out / 'x-1.png'}: Is a "
                                                             "directory; nothing was written"), stderr
    assert sorted(p.name for p in out.iterdir()) == ["x-1.png"]


def _old_names(folder: Path) -> dict[str, str]:
    """A folder for an overwriting batch of three: x-0.png a symlink to target.png, x-1.png and x-2.png files."""
    folder.mkdir()
    (folder / "target.png").write_bytes(b"target")
    (folder / "x-0.png").symlink_to("target.png")
    (folder / "x-1.png").write_bytes(b"old1")
    (folder / "x-2.png").write_bytes(b"old2")
    return _entries(folder)


def _entries(folder: Path) -> dict[str, str]:
    """Each name in ``folder``: '-> target' for a symlink, 'DIR' for a folder, else the file's bytes as text."""
    return {p.name: ("-> " + str(p.readlink()) if p.is_symlink() else "DIR" if p.is_dir() else p.read_text())
            for p in folder.iterdir()}


def _no_hard_links(monkeypatch) -> None:
    def refused(*args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(png_info.os, "link", refused)


@pytest.mark.parametrize("hard_links", [True, False])
def test_a_failed_overwrite_puts_back_a_symlink_it_replaced(tmp_path, monkeypatch, hard_links):
    """Before, only regular files were kept aside: a symlink at a name was gone after the take-back."""
    if not hard_links:
        _no_hard_links(monkeypatch)
    folder = tmp_path / "out"
    _old_names(folder)
    (folder / "x-1.png").unlink()
    (folder / "x-1.png").symlink_to(tmp_path)                    # a symlink to a folder is replaced as a link too
    (folder / "x-3.png").mkdir()
    before = _entries(folder)
    with pytest.raises(IsADirectoryError):
        write_files_all_or_nothing([(folder / f"x-{i}.png", b"new") for i in range(4)], overwrite=True)
    assert _entries(folder) == before


def test_without_hard_links_a_full_disk_while_keeping_a_file_aside_leaves_no_partial_copy(
        tmp_path, monkeypatch, capsys):
    """Before, the half-made ``.sdlab-<hex>.old`` copy stayed in the folder."""
    from cli_helpers import run

    _no_hard_links(monkeypatch)
    real_copy = shutil.copy2

    def copy_until_full(source, target):
        if Path(source).name == "x-1.png":
            Path(target).write_bytes(b"ol")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_copy(source, target)

    monkeypatch.setattr(png_info.shutil, "copy2", copy_until_full)
    folder = tmp_path / "out"
    before = _old_names(folder)
    with pytest.raises(OSError) as raised:
        write_files_all_or_nothing([(folder / f"x-{i}.png", b"new") for i in range(3)], overwrite=True)
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(folder / "x-1.png")
    assert _entries(folder) == before

    code, _, stderr = run(["txt2img", "a cat", "--steps", "1", "--batch", "3", "--out", str(folder / "x.png")], capsys)
    assert code == 2 and stderr.strip().splitlines()[-1].startswith(
        f"sdlab: error: the disk is full: cannot write {folder / 'x-1.png'}; nothing was written"), stderr
    assert _entries(folder) == before


@pytest.mark.parametrize("hard_links", [True, False])
def test_an_interrupt_at_any_step_of_an_overwrite_leaves_the_names_as_they_were(tmp_path, monkeypatch, hard_links):
    """Ctrl+C before or after each step that changes the folder (keeping an entry aside, renaming a new file
    over a name). Before, an interrupt after a rename but before it was recorded left the new file and lost the
    old one."""
    if not hard_links:
        _no_hard_links(monkeypatch)
    steps = {"replace": png_info.os.replace, "symlink": png_info.os.symlink, "copy2": png_info.shutil.copy2}
    if hard_links:
        steps["link"] = png_info.os.link
    count = {"steps": 0, "stop_at": None}

    def interruptible(step):
        def run_step(*args, **kwargs):
            count["steps"] += 1
            if count["steps"] == count["stop_at"] and count["when"] == "before":
                raise KeyboardInterrupt
            result = step(*args, **kwargs)
            if count["steps"] == count["stop_at"] and count["when"] == "after":
                raise KeyboardInterrupt
            return result
        return run_step

    monkeypatch.setattr(png_info.os, "replace", interruptible(steps["replace"]))
    monkeypatch.setattr(png_info.os, "symlink", interruptible(steps["symlink"]))
    monkeypatch.setattr(png_info.shutil, "copy2", interruptible(steps["copy2"]))
    if hard_links:
        monkeypatch.setattr(png_info.os, "link", interruptible(steps["link"]))
    write_files_all_or_nothing([(tmp_path / "count.png", b"new")], overwrite=True)   # no step: nothing there
    files = lambda folder: [(folder / f"x-{i}.png", f"new{i}".encode()) for i in range(3)]
    _old_names(tmp_path / "whole")
    count["steps"] = 0
    write_files_all_or_nothing(files(tmp_path / "whole"), overwrite=True)
    total = count["steps"]
    assert total >= 5 and _entries(tmp_path / "whole") == {"target.png": "target", "x-0.png": "new0",
                                                          "x-1.png": "new1", "x-2.png": "new2"}
    for stop_at in range(1, total + 1):
        for when in ("before", "after"):
            folder = tmp_path / f"{when}-{stop_at}"
            before = _old_names(folder)
            count.update(steps=0, stop_at=stop_at, when=when)
            with pytest.raises(KeyboardInterrupt):
                write_files_all_or_nothing(files(folder), overwrite=True)
            count["stop_at"] = None
            assert _entries(folder) == before, (when, stop_at)


def test_no_overwrite_refuses_existing_names_and_takes_back_the_batch(tmp_path):
    (tmp_path / "b.png").write_bytes(b"old")
    with pytest.raises(FileExistsError):
        write_files_all_or_nothing([(tmp_path / "a.png", b"new"), (tmp_path / "b.png", b"new")], overwrite=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.png"] and (tmp_path / "b.png").read_bytes() == b"old"
    write_files_all_or_nothing([(tmp_path / "b.png", b"new")], overwrite=True)
    assert (tmp_path / "b.png").read_bytes() == b"new"
