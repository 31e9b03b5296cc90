"""`sdlab train --task embedding`: textual inversion with the U-Net objective, only the word's vectors learn.

Checked: the vectors move and nothing else does; the delivered file is one every loader reads (sdlab's
`load_embedding`, the shapes A1111 / diffusers read: `emb_params`, or `clip_l` + `clip_g` for SDXL); the
word in a prompt then changes the conditioning; bad settings are one clear error before any work.
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from train_fixtures import run_in_process, write_caption_folder, write_tiny_model

from sdlab.checkpoints.embeddings import install_embeddings, load_embedding
from sdlab.checkpoints.load import load_bundle
from sdlab.pipeline.conditioning import encode_prompt, make_cond
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
    assert not (out / "final.safetensors").exists()                 # named by its word: "zqstyle" in prompts
    delivered = load_file(str(out / "zqstyle.safetensors"))
    assert sorted(delivered) == keys
    assert all(v.shape[0] == 2 for v in delivered.values())

    bundle = load_bundle(model)
    red_rows = [te.model.embeddings.token_embedding.weight[te.tokenizer.encode("red")[0]] for te in bundle.text_encoders]
    learned = load_embedding(out / "zqstyle.safetensors")
    assert learned.name == "zqstyle"
    for start, vectors in zip(red_rows, sorted(learned.vectors, key=lambda v: v.shape[1])):
        assert (vectors - start).abs().max() > 1e-3                               # the vectors trained

    embedded = install_embeddings(bundle, [learned])
    size = {"width": 16, "height": 16} if family == "sdxl" else {}
    with_word, _ = make_cond(embedded.text_encoders, embedded.family, "a zqstyle picture", "", **size)
    without, _ = make_cond(embedded.text_encoders, embedded.family, "a picture", "", **size)
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
    (("--embedding-word", "w", "--lora-rank", "4"), "--lora-rank 4 does not apply"),
    (("--embedding-word", "cat/toy"), "names the embedding's file, and no file name on this system holds '/'"),
    (("--embedding-word", "cat\0toy"), r"no file name on this system holds '\\x00'"),
    (("--embedding-word", "w" * 240), "at most 255 bytes"),
    # a word no prompt reaches even escaped: '#' always starts a comment
    (("--embedding-word", "my#style"),
     r"cannot be written in a prompt, even escaped: the prompt syntax reads it as '#' starts a comment .* 'my'"),
    # ComfyUI's lookup of the embedding file 'foo', made on the unescaped prompt
    (("--embedding-word", "embedding:foo"), "holds ComfyUI's embedding:NAME, .* could never be used"),
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


@pytest.mark.parametrize("word, caption", [
    ("<cat-toy>", "a photo of <cat-toy>."),     # BPE merges ">." into one token
    ("<cat-toy>", "a red square"),              # the word put in front must not merge with its comma (">,")
    ("cat", "a category"),                      # the text holds "cat", its tokens do not: the word goes in front
    ("MyStyle", "in mystyle!"),                 # any case, punctuation after it
])
def test_the_word_reaches_its_vectors_whatever_surrounds_it(word, caption):
    """Every caption the loss encodes holds the word's own token ids (A1111's rule for finding an embedding),
    so each sample's gradient reaches the vectors."""
    from bundle_fixtures import tiny_bundle

    task = build_task(TrainConfig(task="embedding", embedding_word=word, caption_dropout=0.0), tiny_bundle("sd1", 0))
    tokenizer = task.bundle.text_encoders[0].tokenizer
    encoded = tokenizer.encode_units(task.caption_with_word(caption))
    assert tokenizer.added_words[word] in encoded
    batch = Batch(images=torch.zeros(1, 3, 16, 16), captions=[caption], seeds=[1])
    task.loss(batch, torch.Generator().manual_seed(0))[0].backward()
    (vectors,) = task.trainable_modules()["embedding"].vectors
    assert vectors.grad is not None and vectors.grad.abs().max() > 0


def test_a_batch_of_dropped_captions_trains_without_error():
    """Caption dropout can empty every caption of a batch (1 in 10 steps at batch size 1): the step gets a
    zero gradient instead of an internal error from backward()."""
    from bundle_fixtures import tiny_bundle

    config = TrainConfig(task="embedding", embedding_word="zqstyle", caption_dropout=1.0)
    task = build_task(config, tiny_bundle("sd1", 0))
    batch = Batch(images=torch.zeros(1, 3, 16, 16), captions=["zqstyle, a red square"], seeds=[1])
    task.loss(batch, torch.Generator().manual_seed(0))[0].backward()
    (vectors,) = task.trainable_modules()["embedding"].vectors
    assert vectors.grad is not None and not vectors.grad.any()


def test_diffusers_placeholder_word_trains(tmp_path, data):
    """`--embedding-word "<cat-toy>"` (diffusers' textual-inversion example) through the command's entry point."""
    from train_fixtures import cli_args

    from sdlab.train.cli import main

    model = write_tiny_model(tmp_path / "sd1.safetensors")
    out = tmp_path / "run"
    code = main(cli_args(out, model, data, "--task", "embedding", "--embedding-word", "<cat-toy>", "--max-steps", "2",
                         "--learning-rate", "0.05")[2:])
    assert code == 0
    delivered = out / "<cat-toy>.safetensors"          # named by the word: the prompt's "<cat-toy>" (A1111, sdlab)
    assert sorted(p.name for p in out.glob("*.safetensors")) == [delivered.name]
    learned = load_embedding(delivered)
    with safe_open(str(delivered), "pt") as f:
        assert f.metadata()["name"] == "<cat-toy>"
    start = load_bundle(model).text_encoders[0]
    star = start.model.embeddings.token_embedding.weight[start.tokenizer.encode("*")[0]]
    assert (learned.vectors[0] - star).abs().max() > 1e-3
    # a prompt reads the delivered file as training read the word: the same context
    task = build_task(TrainConfig(task="embedding", embedding_word="<cat-toy>"), load_bundle(model))
    with torch.no_grad():
        task.embedding.vectors[0].copy_(learned.vectors[0])
        task._use_vectors()
    prompt = "a photo of <cat-toy> ."
    trained = encode_prompt(task.bundle.text_encoders, prompt).context
    used = encode_prompt(install_embeddings(load_bundle(model), [learned]).text_encoders, prompt).context
    assert torch.equal(trained, used)


@pytest.mark.parametrize("word, spelling, read_as", [
    ("(mystyle)", r"\(mystyle\)", "'mystyle' at emphasis weight 1.1"),
    ("a\\b", r"a\\b", "'ab' at emphasis weight 1"),
    ("BREAK", r"B\REAK", "a BREAK"),
    ("<x:y>", r"<\x:y>", "an extra-network tag"),
    ("x:-1", r"x:\-1", "the part 'x' at composable (AND) weight -1"),
])
def test_a_word_a_prompt_reaches_escaped_trains_and_says_how_to_write_it(word, spelling, read_as, caplog):
    """Such a word trains (A1111 unescapes before it looks embeddings up); one warning gives the escaped form, and
    that form in a prompt reads the trained vectors: the context differs from the prompt without the file."""
    from bundle_fixtures import tiny_bundle

    bundle = tiny_bundle("sd1", 0)
    with caplog.at_level("WARNING", logger="sdlab.train.embedding_task"):
        task = build_task(TrainConfig(task="embedding", embedding_word=word, caption_dropout=0.0), bundle)
    (line,) = [r.getMessage() for r in caplog.records if "--embedding-word" in r.getMessage()]
    assert read_as in line and line.endswith(f"write it {spelling} in a prompt to use the embedding")
    with torch.no_grad():
        task.embedding.vectors[0].normal_(generator=torch.Generator().manual_seed(0))
        task._use_vectors()
    prompt = f"{spelling} photo"
    trained = encode_prompt(task.bundle.text_encoders, prompt).context
    without = encode_prompt(tiny_bundle("sd1", 0).text_encoders, prompt).context
    assert (trained - without).abs().max() > 1e-2


def test_an_internal_error_is_one_line_from_the_module_entry_point(tmp_path, data, capsys, monkeypatch):
    """`python -m sdlab.train.cli` / torchrun report a bug as `sdlab train` does: one line, exit status 1."""
    import sdlab.train.cli as train_cli
    from train_fixtures import cli_args

    def broken(*args, **kwargs):
        raise RuntimeError("element 0 of tensors does not require grad")

    monkeypatch.delenv("SDLAB_DEBUG", raising=False)
    monkeypatch.setattr(train_cli, "run_from_config", broken)
    code = train_cli.main(cli_args(tmp_path / "run", tmp_path / "m.safetensors", data, "--max-steps", "1")[2:])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err == ["sdlab: error: internal error: RuntimeError: element 0 of tensors does not require grad "
                   "(set SDLAB_DEBUG=1 for the traceback)"]
