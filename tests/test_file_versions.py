"""What sdlab keeps of a file in memory is kept per version of the file (`file_hashes.file_version`: size,
modification time, inode, change time), never by its path alone: another file at the same path (a LoRA retrained
into the same `final.safetensors`, a checkpoint replaced, a copy that keeps the size and modification time of
the file before) is read again."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from bundle_fixtures import tiny_bundle, write_original


def _same_size_and_mtime_as(path: Path, before: os.stat_result) -> None:
    """Give `path` the modification time it had (`cp -p`, `rsync -t`, an unzip do) and check its size is too."""
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def test_a_vocabulary_file_replaced_at_its_path_is_read_again(tmp_path):
    from sdlab.models.tokenizer import _NUM_MERGES, CLIPTokenizer, _default_vocab_path

    with gzip.open(_default_vocab_path(), "rt", encoding="utf-8") as f:
        lines = [next(f) for _ in range(_NUM_MERGES + 1)]
    path = tmp_path / "vocab.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(lines)
    first = CLIPTokenizer(path)
    swapped = [lines[0], lines[2], lines[1], *lines[3:]]          # two merges in the other order: other ids
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(swapped)
    again = CLIPTokenizer(path)
    assert again.encoder != first.encoder and again.merge_ranks != first.merge_ranks


def test_a_preview_decoder_replaced_by_a_copy_of_the_same_size_and_mtime_is_read_again(tmp_path):
    from sdlab.models.preview_decoder import (
        PreviewDecoder, PreviewDecoderConfig, TinyDecoder, load_preview_decoder, save_preview_decoder,
    )

    network = TinyDecoder(PreviewDecoderConfig(widths=(8, 8, 8), blocks=(1, 0, 0))).eval()
    path, incoming = tmp_path / "d.safetensors", tmp_path / "incoming.safetensors"
    save_preview_decoder(path, PreviewDecoder(network, 0.25, None, None))
    save_preview_decoder(incoming, PreviewDecoder(network, 0.5, None, None))
    before = path.stat()
    assert load_preview_decoder(path).latent_scale == 0.25
    os.replace(incoming, path)
    _same_size_and_mtime_as(path, before)
    assert load_preview_decoder(path).latent_scale == 0.5


def test_a_lora_rewritten_with_the_same_size_and_mtime_is_read_again(tmp_path):
    from sdlab.pipeline.prompt_loras import read_lora

    path = tmp_path / "final.safetensors"

    def write(value: float) -> None:
        save_file({"lora_unet_x.lora_down.weight": torch.full((2, 4), value),
                   "lora_unet_x.lora_up.weight": torch.ones(4, 2)}, str(path))

    write(1.0)
    before = path.stat()
    assert read_lora(path)["lora_unet_x"]["down"][0, 0] == 1.0
    write(2.0)                                                        # a training run writing its file again
    _same_size_and_mtime_as(path, before)
    assert read_lora(path)["lora_unet_x"]["down"][0, 0] == 2.0


def test_the_server_loads_a_checkpoint_again_when_its_file_is_replaced(tmp_path):
    from sdlab.server.registry import ModelRegistry
    from sdlab.server.worker import ModelHost

    model = tmp_path / "Stable-diffusion" / "model.safetensors"
    model.parent.mkdir()
    write_original(tiny_bundle("sd1", seed=4), model, junk=False)
    registry = ModelRegistry(model, tmp_path, tmp_path / "VAE")
    host = ModelHost(registry, "cpu")
    first = host.pipeline(registry.default)
    assert host.pipeline(registry.default) is first                   # unchanged: kept
    write_original(tiny_bundle("sd1", seed=5), model, junk=False)
    replaced = host.pipeline(registry.default).bundle.unet.state_dict()
    expected = tiny_bundle("sd1", seed=5).unet.state_dict()
    assert all(torch.equal(replaced[name], expected[name].to(replaced[name].dtype)) for name in expected)


def test_get_embeddings_and_the_worker_read_an_embedding_file_once_between_them(tmp_path, monkeypatch):
    """GET embeddings (`listed_embeddings`, a request thread) and the worker (`_fresh_embeddings`) share the
    reads of the embeddings folder: while the request thread reads a file, the worker waits for it and takes
    that read, rather than reading the file again beside it (or rebuilding the reads while they grow)."""
    import threading
    import types

    import sdlab.server.worker as worker
    from sdlab.checkpoints.embeddings import load_embedding
    from sdlab.server.registry import ModelRegistry

    model = tmp_path / "Stable-diffusion" / "model.safetensors"
    model.parent.mkdir()
    write_original(tiny_bundle("sd1", seed=4), model, junk=False)
    folder = tmp_path / "embeddings"
    folder.mkdir()
    torch.save({"string_to_param": {"*": torch.randn(2, 64)}, "name": "zqread"}, folder / "zqread.pt")
    host = worker.ModelHost(ModelRegistry(model, tmp_path, tmp_path / "VAE"), "cpu", embeddings_dir=folder)
    pipe = types.SimpleNamespace(bundle=tiny_bundle("sd1", seed=4), embeddings=[], skipped_embeddings=[])
    pipe.with_embeddings = lambda found: pipe
    host.pipe = pipe
    reading, go, reads = threading.Event(), threading.Event(), []

    def slow_read(path):
        reads.append(threading.current_thread().name)
        if threading.current_thread().name == "get-embeddings":
            reading.set()
            go.wait(10)
        return load_embedding(path)

    monkeypatch.setattr(worker, "load_embedding", slow_read)
    listing = threading.Thread(target=host.listed_embeddings, name="get-embeddings")
    listing.start()
    assert reading.wait(10)
    job = threading.Thread(target=host._fresh_embeddings, name="worker")
    job.start()
    job.join(0.5)
    waited = job.is_alive()
    go.set()
    listing.join(10)
    job.join(10)
    assert waited and reads == ["get-embeddings"]
    assert host._embeddings_version == host._embedding_files()


def test_get_embeddings_while_a_model_loads_never_pairs_it_with_the_old_models_embeddings(tmp_path):
    """GET embeddings (`listed_embeddings`) at the moment a newly loaded model is set, before its embeddings are
    installed: it lists the folder's for the new model, not the new model's none under the old model's version."""
    from sdlab.server.registry import ModelRegistry
    from sdlab.server.worker import ModelHost

    model = tmp_path / "Stable-diffusion" / "model.safetensors"
    model.parent.mkdir()
    write_original(tiny_bundle("sd1", seed=4), model, junk=False)
    folder = tmp_path / "embeddings"
    folder.mkdir()
    torch.save({"string_to_param": {"*": torch.randn(2, 64)}, "name": "zqload"}, folder / "zqload.pt")
    listed_at_load = []

    class ListingHost(ModelHost):
        def __setattr__(self, name, value):
            super().__setattr__(name, value)
            if name == "pipe" and value is not None:
                listed_at_load.append([e.name for e in self.listed_embeddings().loaded])

    registry = ModelRegistry(model, tmp_path, tmp_path / "VAE")
    host = ListingHost(registry, "cpu", embeddings_dir=folder)
    assert [e.name for e in host.pipeline(registry.default).embeddings] == ["zqload"]
    listed_at_load.clear()
    write_original(tiny_bundle("sd1", seed=5), model, junk=False)            # loaded again: a new model
    assert [e.name for e in host.pipeline(registry.default).embeddings] == ["zqload"]
    assert listed_at_load and all(names == ["zqload"] for names in listed_at_load)
