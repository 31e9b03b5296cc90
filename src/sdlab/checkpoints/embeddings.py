"""Textual-inversion embeddings: read the file shapes users have, match them to a model's text encoders,
and give the model their words.

File shapes (`.safetensors`, or weights-only `.pt` / `.bin` pickles; nothing pickled is executed):
- A1111: `string_to_param` = {"*": (n, d)} beside `name`, `step`, ... (its `.pt` files);
- kohya / A1111 safetensors: `emb_params` (n, d);
- SDXL (both towers): `clip_l` (n, 768) and `clip_g` (n, 1280);
- diffusers' `learned_embeds.bin` and other one-key files: {"<token>": (d,) or (n, d)};
- A1111's embedding pictures (`.png`, `.webp`, `.avif` / `.jxl` where Pillow reads them): an A1111 `.pt`'s dict
  stored in the picture
  (`sdlab.checkpoints.image_embedding`), named by the `name` it records, as A1111 names them; a picture
  without one (a preview image, `<name>.preview.png`) is skipped quietly in a folder.

A loaded embedding is named by its file's stem and used by writing that name in a prompt (A1111) or
`embedding:name` / `embedding:subfolder/name` (ComfyUI), in negative prompts too; each of its n vectors
takes one of the 75 token places of a chunk. Installing gives every text encoder the vectors of its own width as token ids past the
vocabulary (as diffusers' `load_textual_inversion` appends rows to the token table) and a tokenizer that
reads the name as those ids.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.image_embedding import (NoEmbeddingInPicture, image_embedding_suffixes, is_preview_picture,
                                               read_image_embedding)
from sdlab.checkpoints.io import read_checkpoint
from sdlab.families.loaded import ModelBundle, TextEncoder

logger = logging.getLogger(__name__)

EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")       # and the pictures Pillow reads (image_embedding_suffixes)
MAX_VECTORS = 75                    # one chunk: more could never be written in a prompt


class EmbeddingError(CheckpointError):
    """A file that is not a usable textual-inversion embedding for this model."""


@dataclass(frozen=True)
class Embedding:
    """`vectors` are the tensors of the file, (n, d) each: one per text-encoder width it was trained for.
    `path_in_folder`: the file's path under the embeddings folder it was found in, '/'-separated, without
    suffix (`styles/ink`, for ComfyUI's `embedding:styles/ink`); empty for a file loaded alone.
    `step`, `sd_checkpoint` (hash) and `sd_checkpoint_name`: what an A1111 `.pt` records of its training."""

    name: str
    vectors: tuple[Tensor, ...]
    path: Path
    path_in_folder: str = ""
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None

    @property
    def num_vectors(self) -> int:
        return self.vectors[0].shape[0]

    def widths(self) -> tuple[int, ...]:
        return tuple(v.shape[1] for v in self.vectors)


def _vector_tensors(tensors: Mapping[str, Tensor], path: Path) -> tuple[Tensor, ...]:
    """The embedding's vector tensors, in the order of the towers (CLIP-L before bigG for SDXL files)."""
    if "clip_l" in tensors and "clip_g" in tensors:
        return tensors["clip_l"], tensors["clip_g"]
    for key in ("emb_params", "string_to_param.*"):
        if key in tensors:
            return (tensors[key],)
    params = [k for k in tensors if k.startswith("string_to_param.")]
    if len(params) == 1:
        return (tensors[params[0]],)
    if len(tensors) == 1:
        return (next(iter(tensors.values())),)
    keys = ", ".join(sorted(tensors)[:6])
    raise EmbeddingError(
        f"{path}: not a textual-inversion embedding (expected string_to_param, emb_params, clip_l + clip_g or "
        f"a single tensor; found {len(tensors)} tensors: {keys})"
    )


def load_embedding(path: str | os.PathLike[str]) -> Embedding:
    """Read one embedding file; the name is the file's stem (a picture's: the name it records, else the stem)."""
    path = Path(path)
    picture = path.suffix.lower() in image_embedding_suffixes()
    tensors, metadata = read_image_embedding(path) if picture else read_checkpoint(path, nested=True)
    vectors = []
    for tensor in _vector_tensors(tensors, path):
        tensor = tensor.detach()
        if tensor.ndim == 1:
            tensor = tensor.unsqueeze(0)                                          # (1, d)
        if tensor.ndim != 2 or not torch.is_floating_point(tensor):
            raise EmbeddingError(f"{path}: embedding vectors must be a float (n, d) tensor, got {tuple(tensor.shape)} "
                                 f"{str(tensor.dtype).removeprefix('torch.')}")
        vectors.append(tensor.to(torch.float32))
    counts = {v.shape[0] for v in vectors}
    if len(counts) != 1:
        raise EmbeddingError(f"{path}: its towers have different numbers of vectors ({sorted(counts)})")
    n = counts.pop()
    if not 1 <= n <= MAX_VECTORS:
        raise EmbeddingError(f"{path}: {n} vectors; an embedding has 1 to {MAX_VECTORS}")
    if not all(bool(torch.isfinite(v).all()) for v in vectors):
        raise EmbeddingError(f"{path}: embedding holds NaN or infinite values")
    step = metadata.get("step", "")
    name = metadata.get("name") or path.stem if picture else path.stem
    return Embedding(name=name, vectors=tuple(vectors), path=path, step=int(step) if step.isdigit() else None,
                     sd_checkpoint=metadata.get("sd_checkpoint"), sd_checkpoint_name=metadata.get("sd_checkpoint_name"))


def vectors_for(embedding: Embedding, encoders: Iterable[TextEncoder], *, partial: bool = False) -> list[Tensor]:
    """For each text encoder in order, the embedding's vectors of that encoder's width, or an
    `EmbeddingError` saying which model the embedding was made for. `partial`: vectors for towers the model
    lacks may be left over (an SDXL embedding's `clip_g` in the refiner, which has only that tower)."""
    encoders = list(encoders)
    chosen = []
    unused = list(embedding.vectors)
    for encoder in encoders:
        index = next((i for i, v in enumerate(unused) if v.shape[1] == encoder.config.width), None)
        if index is None:
            break
        chosen.append(unused.pop(index))             # by position: `==` on tensors would compare elements
    if len(chosen) != len(encoders) or (unused and not partial):
        have = " + ".join(str(w) for w in embedding.widths())
        need = " + ".join(str(e.config.width) for e in encoders)
        raise EmbeddingError(
            f"{embedding.path}: embedding {embedding.name!r} was made for {have}-wide text encoder(s); "
            f"this model's are {need} wide"
        )
    return chosen


def install_embeddings(bundle: ModelBundle, embeddings: Iterable[Embedding], *, partial: bool = False,
                       replace: bool = False) -> ModelBundle:
    """`bundle` whose text encoders read each embedding's name as its vectors. The towers get the vectors as
    added token rows; each encoder gets its own tokenizer copy (the shared default tokenizer is unchanged).
    A name loaded again replaces the earlier vectors' words; with `replace` the words installed before are
    forgotten (`embeddings` is the whole set). `partial` as in `vectors_for`."""
    embeddings = list(embeddings)
    per_encoder = [vectors_for(e, bundle.text_encoders, partial=partial) for e in embeddings]   # checked first
    paths = {e.name: e.path_in_folder for e in embeddings if e.path_in_folder}
    encoders = []
    for index, encoder in enumerate(bundle.text_encoders):
        table = encoder.model.embeddings
        weight = table.token_embedding.weight
        vocab = weight.shape[0]
        words = {}
        for embedding, vectors in zip(embeddings, per_encoder):
            block = vectors[index].to(device=weight.device, dtype=weight.dtype)   # (n, d)
            first = _row_of(table.added_tokens, block)
            if first is None:                    # new vectors: appended rows (the modules may be shared)
                first = 0 if table.added_tokens is None else table.added_tokens.shape[0]
                table.added_tokens = block if table.added_tokens is None else torch.cat([table.added_tokens, block])
            words[embedding.name] = tuple(range(vocab + first, vocab + first + block.shape[0]))
        tokenizer = encoder.tokenizer.with_added_words(words, paths, replace=replace)
        encoders.append(dataclasses.replace(encoder, tokenizer=tokenizer))
    for embedding in embeddings:
        logger.info("embedding %s: %d vector(s) from %s", embedding.name, embedding.num_vectors, embedding.path)
    return dataclasses.replace(bundle, text_encoders=tuple(encoders))


def install_fitting_embeddings(bundle: ModelBundle, embeddings: Iterable[Embedding], *,
                               replace: bool = False) -> ModelBundle:
    """`install_embeddings(bundle, ..., partial=True)` of those `embeddings` that have vectors for each of
    `bundle`'s text encoders (a refiner's); the others are skipped for it, logged, as A1111 skips an embedding
    whose shape does not fit the model (`EmbeddingDatabase.register_embedding`'s `skipped_embeddings`)."""
    fitting = []
    for embedding in embeddings:
        try:
            vectors_for(embedding, bundle.text_encoders, partial=True)
        except EmbeddingError as err:
            logger.info("skipped for the refiner: %s", err)
            continue
        fitting.append(embedding)
    return install_embeddings(bundle, fitting, partial=True, replace=replace)


def _row_of(rows: Tensor | None, block: Tensor) -> int | None:
    """Index of the first row where `rows` (K, d) holds `block` (n, d), if it does: installing an embedding
    again reuses its ids instead of growing the table."""
    if rows is None:
        return None
    n = block.shape[0]
    return next((i for i in range(rows.shape[0] - n + 1) if torch.equal(rows[i : i + n], block)), None)


def embeddings_used(bundle: ModelBundle, embeddings: Iterable[Embedding], *texts: str) -> list[Embedding]:
    """The installed `embeddings` whose words occur in any of `texts` (either syntax), in the given order."""
    tokenizer = bundle.text_encoders[0].tokenizer
    units = {unit for text in texts for unit in tokenizer.encode_units(text)}       # an embedding is one unit
    return [e for e in embeddings if tokenizer.added_words.get(e.name) in units]


def embedding_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The embedding files under `folder` (recursively, as A1111 scans its embeddings folder), sorted; preview
    pictures (`<name>.preview.png`) left out."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EmbeddingError(f"{folder}: no such folder of embeddings")
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and p.suffix.lower() in (*EMBEDDING_SUFFIXES, *image_embedding_suffixes())
                  and not is_preview_picture(p))


class FoundEmbeddings(NamedTuple):
    """Embeddings as A1111 sorts them: `loaded` fit the model (their names are words of prompts), `skipped`
    were made for another model (A1111's /sdapi/v1/embeddings lists both)."""

    loaded: list[Embedding]
    skipped: list[Embedding]


def find_embeddings(sources: Iterable[str | os.PathLike[str]], bundle: ModelBundle,
                    read: Callable[[Path], Embedding] = load_embedding) -> FoundEmbeddings:
    """The embeddings of `sources`: a file is read and must fit `bundle`; a folder gives its files
    (`scan_embeddings_dir`, each read with `read`). One embedding per name: of files with the same name (in
    two subfolders), the last one is kept."""
    loaded, skipped = [], []
    for source in sources:
        if Path(source).is_dir():
            found = scan_embeddings_dir(source, bundle, read)
            loaded += found.loaded
            skipped += found.skipped
        else:
            embedding = load_embedding(source)
            vectors_for(embedding, bundle.text_encoders)
            loaded.append(embedding)
    return FoundEmbeddings(_last_per_name(loaded, warn=True), _last_per_name(skipped, warn=False))


def _last_per_name(embeddings: Iterable[Embedding], *, warn: bool) -> list[Embedding]:
    """`embeddings` with each name once, at its last file (a later file of a name replaces the earlier one,
    as in A1111's `register_embedding_by_name`); with `warn`, a warning names the file left out."""
    by_name: dict[str, Embedding] = {}
    for embedding in embeddings:
        earlier = by_name.pop(embedding.name, None)
        if earlier is not None and warn:
            logger.warning("two embeddings are named %s: %s is used, %s is left out", embedding.name,
                           embedding.path, earlier.path)
        by_name[embedding.name] = embedding
    return list(by_name.values())


def scan_embeddings_dir(folder: str | os.PathLike[str], bundle: ModelBundle,
                        read: Callable[[Path], Embedding] = load_embedding) -> FoundEmbeddings:
    """The embeddings in `folder`, each file read with `read`: those that fit `bundle`'s text encoders, and
    those made for another model (skipped with a warning). Files that are not embeddings are left out with a
    warning, pictures without an embedding in them (previews) quietly."""
    found = FoundEmbeddings([], [])
    for path in embedding_files(folder):
        try:
            embedding = dataclasses.replace(read(path), path_in_folder=_path_in_folder(path, folder))
        except NoEmbeddingInPicture as err:
            logger.debug("skipping %s", err)
            continue
        except CheckpointError as err:
            logger.warning("skipping %s", err)
            continue
        try:
            vectors_for(embedding, bundle.text_encoders)
        except EmbeddingError as err:
            logger.warning("skipping %s", err)
            found.skipped.append(embedding)
            continue
        found.loaded.append(embedding)
    return found


def _path_in_folder(path: Path, folder: str | os.PathLike[str]) -> str:
    """`path` under `folder`, '/'-separated, without suffix: `styles/ink` for `folder/styles/ink.pt`."""
    return path.relative_to(folder).with_suffix("").as_posix()


__all__ = [
    "Embedding",
    "EmbeddingError",
    "FoundEmbeddings",
    "embedding_files",
    "embeddings_used",
    "find_embeddings",
    "install_embeddings",
    "load_embedding",
    "scan_embeddings_dir",
    "vectors_for",
]
