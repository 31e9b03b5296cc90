"""`sdlab train --task embedding`: textual inversion with the U-Net objective, only the word's vectors learn.

Checked: the vectors move and nothing else does; the delivered file is one every loader reads (sdlab's
`load_embedding`, the shapes A1111 / diffusers read: `emb_params`, or `clip_l` + `clip_g` for SDXL); the
word in a prompt then changes the conditioning; bad settings are one clear error before any work.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import run_in_process, write_caption_folder, write_tiny_model

from sdlab.checkpoints.embeddings import install_embeddings, load_embedding
from sdlab.checkpoints.load import load_bundle
from sdlab.pipeline.conditioning import make_cond
from sdlab.train.config import TrainConfig
from sdlab.train.embedding_task import build_task
from sdlab.train.errors import TrainError
from sdlab.train.task import Batch


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_caption_folder(tmp_path_factory.mktemp("ti") / "data", n=4, size=16)


@pytest.mark.parametrize("family, keys", [("sd1", ["emb_params"]), ("sdxl", ["clip_g", "clip_l"])])
def test_embedding_training_moves_only_the_vectors(tmp_path, data, family, keys):
    model = write_tiny_model(tmp_path / f"{family}.safetensors", family)
    out = tmp_path / "run"
    run_in_process(out, model, data, "--task", "embedding", "--embedding-word", "zqstyle", "--embedding-vectors", "2",
                   "--embedding-init", "red", "--max-steps", "3", "--learning-rate", "0.05", "--batch-size", "2")
    delivered = load_file(str(out / "final.safetensors"))
    assert sorted(delivered) == keys
    assert all(v.shape[0] == 2 for v in delivered.values())

    bundle = load_bundle(model)
    red_rows = [te.model.embeddings.token_embedding.weight[te.tokenizer.encode("red")[0]] for te in bundle.text_encoders]
    learned = load_embedding(out / "final.safetensors")
    for start, vectors in zip(red_rows, sorted(learned.vectors, key=lambda v: v.shape[1])):
        assert (vectors - start).abs().max() > 1e-3                               # the vectors trained

    embedded = install_embeddings(bundle, [learned])
    size = {"width": 16, "height": 16} if family == "sdxl" else {}
    with_word, _ = make_cond(embedded.text_encoders, embedded.family, "a final zqstyle picture", "", **size)
    without, _ = make_cond(embedded.text_encoders, embedded.family, "a final picture", "", **size)
    assert not torch.allclose(with_word["context"], without["context"])


def test_only_the_vectors_get_gradients(tmp_path):
    bundle = load_bundle(write_tiny_model(tmp_path / "sd1.safetensors"))
    config = TrainConfig(model="unused", data_dir="unused", task="embedding", embedding_word="zqstyle",
                         embedding_vectors=2)
    task = build_task(config, bundle)
    batch = Batch(images=torch.zeros(2, 3, 16, 16), captions=["a red square", "zqstyle, a blue circle"], seeds=[1, 2])
    loss, _ = task.loss(batch, torch.Generator().manual_seed(0))
    loss.backward()
    (vectors,) = task.trainable_modules()["embedding"].vectors
    assert vectors.grad is not None and vectors.grad.abs().max() > 0
    frozen = [*bundle.unet.parameters(), *bundle.vae.parameters(), *bundle.text_encoders[0].model.parameters()]
    assert all(p.grad is None for p in frozen)


@pytest.mark.parametrize("extra, message", [
    ((), "needs --embedding-word"),
    (("--embedding-word", "two words"), "one word"),
    (("--embedding-word", "w", "--embedding-vectors", "0"), "between 1 and 75"),
    (("--embedding-word", "w", "--lora-rank", "4"), "trains no LoRA"),
])
def test_bad_settings_are_one_clear_error(tmp_path, data, extra, message):
    model = write_tiny_model(tmp_path / "sd1.safetensors")
    with pytest.raises(TrainError, match=message):
        run_in_process(tmp_path / "run", model, data, "--task", "embedding", "--max-steps", "1", *extra)


@pytest.mark.parametrize("family, init, n, words", [
    ("sd1", "red apple", 4, ["red", "red", "apple", "apple"]),      # fewer tokens than vectors: stretched
    ("sd1", "a red apple tree", 2, ["a", "red"]),                   # CLIP-L: truncated to n tokens first
    ("sd2", "a red apple tree", 2, ["a", "apple"]),                 # OpenCLIP: every token, sampled evenly
    ("sd2", "red apple", 3, ["red", "red", "apple"]),
])
def test_initial_vectors_follow_a1111(family, init, n, words):
    """A1111 `create_embedding`: vec[i] = embedded[i * len(embedded) // n] of the init text's tokens."""
    from bundle_fixtures import tiny_bundle

    from sdlab.train.embedding_task import initial_vectors

    bundle = tiny_bundle(family, 0)
    (encoder,) = bundle.text_encoders
    (vectors,) = initial_vectors(bundle, init, n)
    table = encoder.model.embeddings.token_embedding.weight.detach()
    expected = torch.stack([table[encoder.tokenizer.encode(w)[0]] for w in words])
    assert torch.equal(vectors, expected)
