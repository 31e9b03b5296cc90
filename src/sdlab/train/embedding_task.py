"""Textual inversion (Gal et al. 2022) as a `TrainTask`: learn the vectors of one new word, everything
else frozen.

The objective is the U-Net task's (`sdlab.train.unet_task`: same latents, noise, timesteps, prediction
target and loss); only the word's vectors learn, one (n, d) tensor per text encoder, read through the
text towers as added token rows (`sdlab.checkpoints.embeddings`), so the gradient of the U-Net loss reaches
them through the frozen text encoders. Captions should contain the word (`--embedding-word`); a caption
without it gets it in front ("WORD, caption"), as A1111's templates put `[name]` in every prompt.

Finding the word: the text towers read it where its own tokens occur in a caption's tokens (A1111's rule,
`CLIPTokenizer.with_added_words`), so whether a caption holds it is decided on token ids, never on the text
("category" does not hold "cat"). BPE merges a run of punctuation into one token, so "<cat-toy>." or
"<cat-toy>," (diffusers' placeholder) would hide the word's closing ">" inside ">." / ">,": every occurrence
of the word is first set apart with spaces ("<cat-toy> ."), which keeps its tokens whole and changes no
other token of the caption.

Initialisation (A1111's `create_embedding`): the token vectors of `--embedding-init` ("*" by default) spread
over the n vectors, ``vector[i] = token[i * m // n]`` of the init text's m tokens, so fewer tokens than
vectors stretch ("red apple" over 4 vectors: red, red, apple, apple) and more are sampled evenly. A CLIP-L
tower first truncates the text to n tokens (A1111 reads it with the Hugging Face tokenizer and
``max_length=n``), an OpenCLIP tower (SD2's, SDXL's bigG) keeps them all (A1111's `open_clip` tokenizer has
no length argument). Deliverable: `<word>.safetensors`, named by the word itself (an embedding's name in prompts
is its file's stem, in A1111 and sdlab: ``<cat-toy>.safetensors`` is read by a prompt's "<cat-toy>"; the file's
metadata records the word too), holding `emb_params` (n, d) for one text encoder, or
`clip_l` and `clip_g` for SDXL's two, the shapes A1111, ComfyUI and diffusers read.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from sdlab.checkpoints.embeddings import Embedding, install_embeddings
from sdlab.checkpoints.file_format import META_EMA
from sdlab.checkpoints.io import write_safetensors_atomic
from sdlab.families.loaded import ModelBundle
from sdlab.pipeline.prompt_word import prompt_spelling, reading
from sdlab.train.errors import TrainError
from sdlab.train.task import Batch
from sdlab.train.unet_task import UNetTask, UNetTaskOptions
from sdlab.utils.dtypes import dtype_from_name

logger = logging.getLogger(__name__)

def occurrence_pattern(word: str) -> re.Pattern[str]:
    """The word in a caption, any case (the tokenizer lower-cases), not inside a longer run of letters:
    where the word begins or ends with a letter, a letter beside it would merge into the same BPE word."""
    letter = r"[^\W\d_]"
    before = f"(?<!{letter})" if word[:1].isalpha() else ""
    after = f"(?!{letter})" if word[-1:].isalpha() else ""
    return re.compile(before + re.escape(word) + after, re.IGNORECASE)


class EmbeddingVectors(nn.Module):
    """The trainable vectors of one word: `vectors[i]` (n, d_i) for text encoder i."""

    def __init__(self, inits: list[Tensor]):
        super().__init__()
        self.vectors = nn.ParameterList(nn.Parameter(v.clone()) for v in inits)


def initial_vectors(bundle: ModelBundle, init_text: str, num_vectors: int) -> list[Tensor]:
    """Per text encoder, the token vectors of `init_text` spread over `num_vectors` rows as A1111 does
    (module docstring): row i is token ``i * m // n`` of the m tokens (CLIP-L: the first n tokens only)."""
    vectors = []
    for encoder in bundle.text_encoders:
        ids = encoder.tokenizer.encode(init_text)
        if not ids:
            raise TrainError(f"--embedding-init {init_text!r} has no tokens")
        if encoder.spec.layout != "openclip":
            ids = ids[:num_vectors]
        rows = torch.tensor([ids[i * len(ids) // num_vectors] for i in range(num_vectors)])
        table = encoder.model.embeddings.token_embedding.weight                  # (V, d)
        vectors.append(table.detach()[rows].to(torch.float32))                  # (n, d)
    return vectors


class EmbeddingTask(UNetTask):
    """The U-Net objective with only the vectors of `word` trainable."""

    name = "embedding"
    ddp_names = ()
    trains_text_input = True                # the loss reaches the vectors through the text encoders

    def __init__(self, bundle: ModelBundle, options: UNetTaskOptions, word: str, num_vectors: int, init_text: str):
        if not word or any(ch.isspace() for ch in word):
            raise TrainError(f"--embedding-word must be one word without spaces, got {word!r}")
        if options.lora_rank is not None:
            raise TrainError("--task embedding trains no LoRA; drop --lora-rank")
        vectors = EmbeddingVectors(initial_vectors(bundle, init_text, num_vectors)).to(bundle.device)
        placeholder = Embedding(name=word, vectors=tuple(v.detach() for v in vectors.vectors), path=Path(word))
        super().__init__(install_embeddings(bundle, [placeholder]), options)
        self.bundle.unet.requires_grad_(False)
        self.word = word
        self.embedding = vectors
        self._modules = {"embedding": vectors}
        self._rows = [self._row_span(encoder) for encoder in self.bundle.text_encoders]
        self._occurrence = occurrence_pattern(word)
        self._tokenizer = self.bundle.text_encoders[0].tokenizer
        self._word_ids = self._tokenizer.added_words[word]
        if not self.has_word(self.caption_with_word("a picture")):
            raise TrainError(f"--embedding-word {word!r} cannot be found in a prompt again (its tokens "
                             f"{self._tokenizer.encode(word)} are not kept whole); choose another word")

    def has_word(self, caption: str) -> bool:
        """Whether the text towers read the word's vectors in ``caption`` (its ids, as one unit)."""
        return self._word_ids in self._tokenizer.encode_units(caption)

    def caption_with_word(self, caption: str) -> str:
        """``caption`` as the loss encodes it: every occurrence of the word set apart by spaces, and the word
        put in front when the caption still does not hold it (module docstring)."""
        spaced = self._occurrence.sub(lambda m: f" {m.group(0)} ", caption)
        if self.has_word(spaced):
            return spaced
        return f"{self.word} , {spaced}"          # the tokens of "WORD, caption" for a word of letters

    def _row_span(self, encoder) -> tuple[int, int]:
        ids = encoder.tokenizer.added_words[self.word]
        vocab = encoder.model.embeddings.token_embedding.num_embeddings
        return ids[0] - vocab, ids[-1] - vocab + 1

    def _use_vectors(self) -> None:
        """Put the current parameters into the towers' added token rows (graph-connected)."""
        for encoder, (start, end), vectors in zip(self.bundle.text_encoders, self._rows, self.embedding.vectors):
            table = encoder.model.embeddings
            rows = table.added_tokens.detach()                                   # (K, d)
            table.added_tokens = torch.cat([rows[:start], vectors.to(rows.dtype), rows[end:]])

    def loss(self, batch: Batch, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        self._use_vectors()
        captions = [self.caption_with_word(c) for c in batch.captions]
        loss, metrics = super().loss(Batch(**{**vars(batch), "captions": captions}), generator)
        # a batch whose every caption was dropped (caption_dropout) never reads the vectors: zero gradient
        loss = loss + 0.0 * sum(v.sum() for v in self.embedding.vectors)
        return loss, metrics

    def deliverable_stem(self, name: str) -> str:
        """The final file is named by the word: an embedding's file name is its word in a prompt (A1111,
        `--embeddings-dir`); other names as they are. `TrainConfig` refuses a word no file can be named by."""
        return self.word if name == "final" else name

    def save_weights(self, path: Path, ema: bool) -> None:
        dtype = dtype_from_name(self.options.save_dtype)
        vectors = [v.detach().to(dtype).cpu().contiguous() for v in self.embedding.vectors]
        names = ("emb_params",) if len(vectors) == 1 else ("clip_l", "clip_g")
        if len(vectors) > 2:
            raise TrainError(f"no embedding file shape holds {len(vectors)} text encoders")
        write_safetensors_atomic(path, dict(zip(names, vectors)), metadata={"name": self.word, META_EMA: str(bool(ema))})

    def preview(self, out_dir: Path, step: int) -> None:
        with torch.no_grad():
            self._use_vectors()
        super().preview(out_dir, step)


def build_task(config, bundle: ModelBundle) -> EmbeddingTask:
    """The task-registry entry point (`sdlab.train.cli`)."""
    if not config.embedding_word:
        raise TrainError("--task embedding needs --embedding-word (the new word, used in prompts)")
    task = EmbeddingTask(bundle, UNetTaskOptions.from_config(config), config.embedding_word,
                         config.embedding_vectors, config.embedding_init)
    spelling = prompt_spelling(config.embedding_word)        # TrainConfig refused a word with none
    if spelling is not None and spelling != config.embedding_word:
        logger.warning("--embedding-word %r: a prompt reads it as %s; write it %s in a prompt to use the embedding",
                       config.embedding_word, reading(config.embedding_word), spelling)
    return task
