"""A1111's embedding pictures (`sdlab.checkpoints.image_embedding`): the `.png` its textual-inversion training
writes beside each `.pt`, with the embedding in a `sd-ti-embedding` text chunk and in the pixels, read as the
`.pt` with the same vectors is (same vectors, same picture drawn), named by the name they record; a picture
without one (a preview) is skipped quietly. The pictures are made with A1111's own writer, transcribed below."""

from __future__ import annotations

import base64
import json
import logging
import zlib

import numpy as np
import pytest
import torch
from bundle_fixtures import tiny_bundle, write_original
from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo

from sdlab.checkpoints.embeddings import embedding_files, load_embedding, scan_embeddings_dir
from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.image_embedding import _lcg_stream, _unmask


# --- A1111's writer, transcribed from AUTOMATIC1111/stable-diffusion-webui
# modules/textual_inversion/image_embedding.py (commit 011bac41dffaaf4b24d3e1e760d1236ce0fa61ab) -------------

class _EmbeddingEncoder(json.JSONEncoder):
    def default(self, obj):
        if isinstance(obj, torch.Tensor):
            return {"TORCHTENSOR": obj.cpu().detach().numpy().tolist()}
        return json.JSONEncoder.default(self, obj)


def _embedding_to_b64(data):
    return base64.b64encode(json.dumps(data, cls=_EmbeddingEncoder).encode())


def _lcg(m=2**32, a=1664525, c=1013904223, seed=0):
    while True:
        seed = (a * seed + c) % m
        yield seed % 255


def _xor_block(block):
    g = _lcg()
    randblock = np.array([next(g) for _ in range(np.prod(block.shape))]).astype(np.uint8).reshape(block.shape)
    return np.bitwise_xor(block.astype(np.uint8), randblock & 0x0F)


def _style_block(block, sequence):
    im = Image.new("RGB", (block.shape[1], block.shape[0]))
    draw = ImageDraw.Draw(im)
    i = 0
    for x in range(-6, im.size[0], 8):
        for yi, y in enumerate(range(-6, im.size[1], 8)):
            offset = 0
            if yi % 2 == 0:
                offset = 4
            shade = sequence[i % len(sequence)]
            i += 1
            draw.ellipse((x + offset, y, x + 6 + offset, y + 6), fill=(shade, shade, shade))
    fg = np.array(im).astype(np.uint8) & 0xF0
    return block ^ fg


def _insert_image_data_embed(image, data):
    d = 3
    data_compressed = zlib.compress(json.dumps(data, cls=_EmbeddingEncoder).encode(), level=9)
    data_np_ = np.frombuffer(data_compressed, np.uint8).copy()
    data_np_high = data_np_ >> 4
    data_np_low = data_np_ & 0x0F
    h = image.size[1]
    next_size = data_np_low.shape[0] + (h - (data_np_low.shape[0] % h))
    next_size = next_size + ((h * d) - (next_size % (h * d)))
    data_np_low = np.resize(data_np_low, next_size).reshape((h, -1, d))
    data_np_high = np.resize(data_np_high, next_size).reshape((h, -1, d))
    edge_style = list(data["string_to_param"].values())[0].cpu().detach().numpy().tolist()[0][:1024]
    edge_style = (np.abs(edge_style) / np.max(np.abs(edge_style)) * 255).astype(np.uint8)
    data_np_low = _xor_block(_style_block(data_np_low, sequence=edge_style))
    data_np_high = _xor_block(_style_block(data_np_high, sequence=edge_style[::-1]))
    im_low = Image.fromarray(data_np_low, mode="RGB")
    im_high = Image.fromarray(data_np_high, mode="RGB")
    background = Image.new("RGB", (image.size[0] + im_low.size[0] + im_high.size[0] + 2, image.size[1]), (0, 0, 0))
    background.paste(im_low, (0, 0))
    background.paste(image, (im_low.size[0] + 1, 0))
    background.paste(im_high, (im_low.size[0] + 1 + image.size[0] + 1, 0))
    return background

# --- end of the transcription ------------------------------------------------------------------------------


def _data(name: str, vectors: torch.Tensor) -> dict:
    """What A1111's `Embedding.save` pickles (and its training stores in the picture)."""
    return {"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": name, "step": 1500,
            "sd_checkpoint": "abcd1234", "sd_checkpoint_name": "model"}


def _vectors(n: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed)) * 0.1


def _caption_picture() -> Image.Image:
    """A stand-in for the preview A1111 draws under the data (lit everywhere, as its captioned previews are)."""
    y, x = np.mgrid[0:48, 0:48]
    rgb = np.stack([40 + 3 * x, 40 + 3 * y, 200 - 2 * x], axis=-1).astype(np.uint8)     # (48, 48, 3), no zeros
    return Image.fromarray(rgb)


def _text_chunk_png(path, data) -> None:
    """A1111's training picture: the data in the pixels and in the `sd-ti-embedding` text chunk."""
    info = PngInfo()
    info.add_text("sd-ti-embedding", _embedding_to_b64(data))
    _insert_image_data_embed(_caption_picture(), data).save(path, pnginfo=info)


def test_the_lcg_is_a1111s():
    """The first values of A1111's stream, as its own self-test lists them (`reference_random`)."""
    reference = [253, 242, 127, 44, 157, 27, 239, 133, 38, 79, 167, 4, 177, 95, 130, 79, 78, 14, 52, 215]
    assert (_unmask(np.zeros(20, dtype=np.uint8)) == np.array(reference, dtype=np.uint8) & 0x0F).all()
    g = _lcg()                                                  # past the first run of values made one by one
    whole = np.array([next(g) for _ in range(3 * 4096 + 77)]).astype(np.uint8)
    assert np.array_equal(_lcg_stream(whole.size), whole)
    assert _lcg_stream(0).size == 0


@pytest.mark.parametrize("where", ["text chunk", "pixels", "pixels, lossless webp"])
def test_a_picture_reads_as_the_pt_with_its_vectors(tmp_path, where):
    vectors = _vectors(3, 64, 1)
    data = _data("inkstyle", vectors)
    if where == "text chunk":
        path = tmp_path / "inkstyle-1500.png"
        _text_chunk_png(path, data)
    else:                                   # the text is gone (an image host, a re-save): the pixels still hold it
        path = tmp_path / ("inkstyle-1500.webp" if "webp" in where else "inkstyle-1500.png")
        _insert_image_data_embed(_caption_picture(), data).save(path, lossless=True)
        assert "sd-ti-embedding" not in getattr(Image.open(path), "text", {})
    embedding = load_embedding(path)
    assert embedding.name == "inkstyle"                                     # the recorded name, as A1111's
    assert torch.equal(embedding.vectors[0], vectors)                       # float32 values survive the JSON
    assert (embedding.step, embedding.sd_checkpoint, embedding.sd_checkpoint_name) == (1500, "abcd1234", "model")


def test_a_folder_with_pictures_draws_as_with_the_pt(tmp_path, caplog):
    import sdlab

    model = write_original(tiny_bundle("sd1", seed=3), tmp_path / "tiny.safetensors", junk=False)
    vectors = _vectors(2, 64, 7) * 5
    pictures, pts = tmp_path / "pictures", tmp_path / "pts"
    pictures.mkdir(), pts.mkdir()
    _text_chunk_png(pictures / "zqstyle-500.png", _data("zqstyle", vectors))
    _caption_picture().save(pictures / "zqstyle-500.preview.png")                  # a preview: never read
    _caption_picture().save(pictures / "sample.png")                               # a picture without an embedding
    torch.save(_data("zqstyle", vectors), pts / "zqstyle.pt")

    assert [p.name for p in embedding_files(pictures)] == ["sample.png", "zqstyle-500.png"]
    bundle = sdlab.load(model).bundle
    with caplog.at_level(logging.WARNING):
        found = scan_embeddings_dir(pictures, bundle)
    assert [e.name for e in found.loaded] == ["zqstyle"] and not found.skipped
    assert not caplog.records                                                      # previews pass quietly

    prompt, options = "a zqstyle apple", dict(steps=2, seed=4, width=32, height=32)
    drawn = {folder.name: np.asarray(sdlab.load(model, embeddings=[folder]).txt2img(prompt, **options).images[0])
             for folder in (pictures, pts)}
    plain = np.asarray(sdlab.load(model).txt2img(prompt, **options).images[0])
    assert np.array_equal(drawn["pictures"], drawn["pts"])
    assert np.abs(drawn["pictures"].astype(int) - plain).max() > 0


def test_damaged_pictures_are_one_clear_error(tmp_path):
    path = tmp_path / "bad.png"
    info = PngInfo()
    info.add_text("sd-ti-embedding", "bm90IGpzb24=")                                # base64 of 'not json'
    _caption_picture().save(path, pnginfo=info)
    with pytest.raises(CheckpointError, match="not A1111's embedding JSON"):
        load_embedding(path)
    (tmp_path / "fake.png").write_bytes(b"not a picture at all")
    with pytest.raises(CheckpointError, match="not a readable picture"):
        load_embedding(tmp_path / "fake.png")
    # pixels whose data blocks hold no zlib stream
    noise = np.random.default_rng(0).integers(1, 255, (16, 20, 3), dtype=np.uint8)
    noise[:, 5] = noise[:, 14] = 16                                                # two columns black in the low nibble
    Image.fromarray(noise).save(tmp_path / "noise.png")
    with pytest.raises(CheckpointError, match="embedding data is damaged"):
        load_embedding(tmp_path / "noise.png")


def test_a_lossless_avif_picture_reads_where_pillow_reads_avif(tmp_path):
    """A1111's embeddings folder also loads `.avif` (and `.jxl`) pictures (textual_inversion.py `load_from_file`,
    1.10): a lossless AVIF keeps the pixels' data. Read where this Pillow reads AVIF (11.3+); where it does not,
    the file is not listed (A1111 would log an error for it). Before: `.avif` files were never listed or read."""
    from sdlab.checkpoints.image_embedding import image_embedding_suffixes

    vectors = _vectors(2, 64, 5)
    rgb = np.asarray(_insert_image_data_embed(_caption_picture(), _data("inkstyle", vectors)).convert("RGB"))
    path = tmp_path / "inkstyle-1500.avif"
    (tmp_path / "inkstyle-1500.preview.avif").write_bytes(b"")
    if ".avif" not in image_embedding_suffixes():
        path.write_bytes(b"")
        assert embedding_files(tmp_path) == []
        return
    cv2 = pytest.importorskip("cv2")
    if not cv2.haveImageWriter(str(path)):
        pytest.skip("this OpenCV writes no AVIF (the lossless writer the test uses)")
    assert cv2.imwrite(str(path), rgb[:, :, ::-1], [cv2.IMWRITE_AVIF_QUALITY, 100])     # libavif lossless, BGR in
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), rgb)           # lossless: the data is kept
    assert embedding_files(tmp_path) == [path]                                          # the preview passed over
    embedding = load_embedding(path)
    assert embedding.name == "inkstyle" and embedding.step == 1500
    assert torch.equal(embedding.vectors[0], vectors)
