"""IP-Adapter FaceID / FaceID Plus through the CLI and the A1111 unit's encoder choice: the per-adapter
--ip-adapter-face-embedding / --ip-adapter-face-shortcut flags with `none` places, a recorded Face shortcut over
an adapter that is not FaceID Plus, the Plus v2 shortcut recorded for a redraw of a renamed file, a text file
given as a .npy embedding, and the A1111 route's message for a FaceID model. Pictures compared with the Python
API's, pixel for pixel (the same code draws both)."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from cli_helpers import pixels, run
from ip_adapter_fixtures import write_ip_adapter
from sdlab.models.ip_adapter import cross_attentions
from sdlab.pipeline.image_prompt import IPAdapterInput
from sdlab.pipeline.infotext import to_parameters
from sdlab.pipeline.png_info import format_parameters, parse_parameters, read_parameters
from sdlab.pipeline.request import RequestError
from test_ip_adapter import FAST, cli_files  # noqa: F401  (cli_files: the tiny SD1 file, an adapter, its encoder)
from test_ip_adapter_faceid_plus import _face, face_id_plus_state
from test_ip_adapter_layers import face_id_state

pytestmark = pytest.mark.usefixtures("one_thread")

API = dict(steps=3, width=32, height=32, seed=3)


@pytest.fixture(scope="module")
def faces(cli_files, tmp_path_factory):
    """The loaded tiny model, a FaceID Plus v2 file, the same file renamed (no 'plusv2'), a FaceID file and a face
    embedding (.npy)."""
    import sdlab

    bundle = sdlab.load(cli_files["model"])
    widths = [attn.to_q.weight.shape[0] for attn in cross_attentions(bundle.bundle.unet)]
    context = bundle.bundle.unet_config.context_dim
    models = cli_files["adapter"].parent
    v2 = write_ip_adapter(models / "ip-adapter-faceid-plusv2_doors.bin", face_id_plus_state(widths, context, 128))
    renamed = models / "my-face-adapter.bin"
    shutil.copyfile(v2, renamed)
    face_id = write_ip_adapter(models / "ip-adapter-faceid-portrait_doors.bin", face_id_state(widths, context))
    face = tmp_path_factory.mktemp("face") / "face.npy"
    np.save(face, _face(7).numpy())
    return dict(bundle=bundle, v2=v2, renamed=renamed, face_id=face_id, face=face)


def _save_with_infotext(result, path):
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", format_parameters(to_parameters(result.request)))
    result.images[0].save(path, pnginfo=info)
    return path


def test_a_face_id_plus_may_follow_a_plain_adapter_with_a_none_face_embedding(cli_files, faces, tmp_path, capsys):
    """--ip-adapter-face-embedding none keeps the plain adapter's place; the FaceID Plus after it takes the
    second value. The API's picture with both, pixel for pixel; a FaceID Plus given `none` is refused."""
    picture = str(cli_files["picture"])
    base = ["txt2img", "a red apple", "--model", str(cli_files["model"]), *FAST]
    out = tmp_path / "both.png"
    code, _, stderr = run([*base, "--ip-adapter", str(cli_files["adapter"]), "--ip-adapter-image", picture,
                           "--ip-adapter", str(faces["v2"]), "--ip-adapter-image", picture,
                           "--ip-adapter-face-embedding", "none", "--ip-adapter-face-embedding", str(faces["face"]),
                           "--ip-adapter-scale", "0.7", "--ip-adapter-scale", "0.8", "--out", str(out)], capsys)
    assert code == 0, stderr
    api = faces["bundle"].txt2img("a red apple", **API, ip_adapters=[
        IPAdapterInput(cli_files["adapter"], Image.open(picture), 0.7),
        IPAdapterInput(faces["v2"], Image.open(picture), 0.8, face_embedding=faces["face"])])
    assert np.abs(pixels(out) - np.asarray(api.images[0], dtype=np.int16)).max() == 0
    bad = tmp_path / "bad.png"
    code, _, stderr = run([*base, "--ip-adapter", str(faces["v2"]), "--ip-adapter-image", picture,
                           "--ip-adapter-face-embedding", "", "--out", str(bad)], capsys)
    assert code != 0 and "an IP-Adapter FaceID Plus reads a picture and an InsightFace face embedding" in stderr
    assert "Traceback" not in stderr and not bad.exists()


def test_a_recorded_face_shortcut_is_left_out_for_a_plain_adapter(cli_files, faces, tmp_path, capsys, caplog):
    """A picture recording 'Face shortcut: 1.6' redrawn with a plain --ip-adapter in that place: drawn (the
    shortcut left out with a warning naming it), as the API draws the plain adapter."""
    picture = str(cli_files["picture"])
    drawn = faces["bundle"].txt2img("a red apple", **API, ip_adapters=[
        IPAdapterInput(faces["v2"], Image.open(picture), 0.8, face_embedding=faces["face"], face_shortcut=1.6)])
    assert "Face shortcut: 1.6" in to_parameters(drawn.request)["IP-Adapter 0"]
    recorded = _save_with_infotext(drawn, tmp_path / "drawn.png")
    again = tmp_path / "plain.png"
    with caplog.at_level(logging.WARNING):
        code, _, stderr = run(["txt2img", "--model", str(cli_files["model"]), "--no-progress", "--from-png",
                               str(recorded), "--ip-adapter", str(cli_files["adapter"]), "--ip-adapter-image",
                               picture, "--out", str(again)], capsys)
    assert code == 0, stderr
    assert "records Face shortcut: 1.6, which only a FaceID Plus adapter takes" in caplog.text + stderr
    api = faces["bundle"].txt2img("a red apple", **API, ip_adapters=[
        IPAdapterInput(cli_files["adapter"], Image.open(picture), 0.8)])
    assert np.abs(pixels(again) - np.asarray(api.images[0], dtype=np.int16)).max() == 0


def test_a_plus_v2_records_its_shortcut_so_a_renamed_file_redraws_the_same(cli_files, faces, tmp_path, capsys):
    """A Plus v2 file (named 'plusv2') drawn with no face_shortcut takes 1 and records 'Face shortcut: 1'; the
    same file renamed draws without it unless told: --from-png reads the recorded 1 back, and
    --ip-adapter-face-shortcut 1 says it, both the v2 picture pixel for pixel; 'none' is the default."""
    picture = str(cli_files["picture"])
    drawn = faces["bundle"].txt2img("a red apple", **API, ip_adapters=[
        IPAdapterInput(faces["v2"], Image.open(picture), 0.8, face_embedding=faces["face"])])
    assert "Face shortcut: 1" in to_parameters(drawn.request)["IP-Adapter 0"]
    recorded = _save_with_infotext(drawn, tmp_path / "v2.png")
    v2 = np.asarray(drawn.images[0], dtype=np.int16)
    given = ["--ip-adapter", str(faces["renamed"]), "--ip-adapter-image", picture,
             "--ip-adapter-face-embedding", str(faces["face"])]
    redraw = tmp_path / "redraw.png"
    code, _, stderr = run(["txt2img", "--model", str(cli_files["model"]), "--no-progress", "--from-png",
                           str(recorded), *given, "--out", str(redraw)], capsys)
    assert code == 0, stderr
    assert np.abs(pixels(redraw) - v2).max() == 0
    base = ["txt2img", "a red apple", "--model", str(cli_files["model"]), *FAST, *given, "--ip-adapter-scale", "0.8"]
    told, default = tmp_path / "told.png", tmp_path / "default.png"
    code, _, stderr = run([*base, "--ip-adapter-face-shortcut", "1", "--out", str(told)], capsys)
    assert code == 0, stderr
    assert np.abs(pixels(told) - v2).max() == 0
    assert "Face shortcut: 1" in parse_parameters(read_parameters(told))["IP-Adapter 0"]
    code, _, stderr = run([*base, "--ip-adapter-face-shortcut", "none", "--out", str(default)], capsys)
    assert code == 0, stderr
    assert np.abs(pixels(default) - v2).max() > 5                 # a renamed v2 without the shortcut: v1's rule
    assert "Face shortcut" not in parse_parameters(read_parameters(default))["IP-Adapter 0"]
    bad = tmp_path / "bad.png"
    code, _, stderr = run([*base, "--ip-adapter-face-shortcut", "x", "--out", str(bad)], capsys)
    assert code != 0 and "'x' is not a number or none" in stderr and not bad.exists()


def test_a_text_file_named_npy_is_named_as_not_an_npy_file(cli_files, faces, tmp_path, capsys):
    """A text file named .npy as a FaceID embedding: one line saying it is no .npy array file (not numpy's
    allow_pickle text)."""
    text = tmp_path / "face.npy"
    text.write_text("0.1 0.2 0.3\n")
    out = tmp_path / "out.png"
    code, _, stderr = run(["txt2img", "a red apple", "--model", str(cli_files["model"]), *FAST, "--ip-adapter",
                           str(faces["face_id"]), "--ip-adapter-image", str(text), "--out", str(out)], capsys)
    assert code != 0 and f"the face embedding {str(text)!r} is not a .npy array file" in stderr, stderr
    assert "allow_pickle" not in stderr and "Traceback" not in stderr and not out.exists()


def _npy_with_header(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    """A .npy file whose header declares `shape` of `descr`, followed by 16 bytes of data."""
    import io

    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue() + bytes(16)


@pytest.mark.parametrize("content, words", [
    (lambda: _npy_with_header((10 ** 13,)), "its header declares shape (10000000000000,), 10000000000000 numbers"),
    (lambda: _npy_with_header((600,)), "its header declares shape (600,) (2400 bytes of <f4); the file holds 16"),
    (lambda: np.array(["a"] * 512), "its dtype '<U1' is not numbers"),
    (lambda: np.zeros(512, dtype=[("a", "f4")]), "its dtype '|V4' is not numbers"),
    (lambda: np.ones(512, bool), "its dtype '|b1' is not numbers"),
])
def test_a_npy_file_of_no_small_numeric_array_is_one_line(cli_files, faces, tmp_path, capsys, content, words):
    """A .npy face embedding whose header declares a huge shape (read from the header: nothing allocated), more
    bytes than the file holds, text, records or booleans: one line saying so, exit non-zero, no picture."""
    face = tmp_path / "face.npy"
    given = content()
    if isinstance(given, bytes):
        face.write_bytes(given)
    else:
        np.save(face, given)
    out = tmp_path / "out.png"
    code, _, stderr = run(["txt2img", "a red apple", "--model", str(cli_files["model"]), *FAST, "--ip-adapter",
                           str(faces["face_id"]), "--ip-adapter-image", str(face), "--out", str(out)], capsys)
    assert code != 0 and f"the face embedding {str(face)!r} is not a small numeric .npy array: {words}" in stderr, \
        stderr
    assert "Traceback" not in stderr and "MemoryError" not in stderr and not out.exists()


def test_a_big_endian_npy_face_draws_as_the_native_one(cli_files, faces, tmp_path, capsys):
    """A big-endian '>f4' .npy of the face (np.save on such an array) is the same embedding: the picture equals
    the native float32 file's, pixel for pixel."""
    big = tmp_path / "big.npy"
    np.save(big, np.load(faces["face"]).astype(">f4"))
    pictures = []
    for face in (faces["face"], big):
        out = tmp_path / f"{face.stem}.png"
        code, _, stderr = run(["txt2img", "a red apple", "--model", str(cli_files["model"]), *FAST, "--ip-adapter",
                               str(faces["face_id"]), "--ip-adapter-image", str(face), "--out", str(out)], capsys)
        assert code == 0, stderr
        pictures.append(pixels(out))
    assert np.array_equal(*pictures)


@pytest.mark.parametrize("which", ["face_id", "v2"])
def test_the_a1111_route_says_a_face_id_model_needs_a_face_embedding(faces, which):
    """An A1111 IP-Adapter unit with a FaceID / FaceID Plus model and a CLIP module: the encoder choice says the
    model reads an InsightFace face embedding and names the FaceID module to give it with (not a CLIP encoder to
    pick); the FaceID module gives FaceID no encoder (test_server_ip_adapter_faceid draws both)."""
    from sdlab.pipeline.ip_adapter_units import unit_image_encoder

    with pytest.raises(RequestError) as raised:
        unit_image_encoder("ip-adapter_clip_sd15", faces[which])
    message = str(raised.value)
    assert "reads an InsightFace face embedding (512 numbers)" in message
    module = "ip-adapter_face_id_plus" if which == "v2" else "ip-adapter_face_id"
    assert f"give it the module {module} with the embedding" in message and "ip-adapter_clip_h" not in message
    if which == "face_id":
        assert unit_image_encoder("ip-adapter_face_id", faces[which]) is None


def test_inspect_names_the_cli_flags_of_face_id_files(faces):
    from sdlab.checkpoints.other_kinds import describe_other_kind

    assert describe_other_kind(faces["face_id"])["use"].startswith("--ip-adapter FILE --ip-adapter-image FACE.npy")
    assert describe_other_kind(faces["v2"])["use"].startswith(
        "--ip-adapter FILE --ip-adapter-image PICTURE --ip-adapter-face-embedding FACE.npy")
