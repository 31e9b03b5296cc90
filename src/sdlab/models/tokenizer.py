"""CLIP's byte-level BPE tokenizer, written from the published recipe (Radford et al. 2021, openai/CLIP).

The pipeline for one prompt, in order:

0. split the raw text at each literal ``<|startoftext|>`` / ``<|endoftext|>``, which are their own token
   wherever they stand (Hugging Face's added-token split); each part between them then goes through 1-4;
1. clean: ``ftfy.fix_text`` (mojibake, NFC), ``html.unescape`` twice (``&amp;lt;`` -> ``<``), collapse
   every run of whitespace to one space, strip, lower-case;
2. pre-tokenize with CLIP's regex: English contractions, runs of letters, single digits, runs of other
   non-space symbols (so ``1024`` is four tokens and ``!!!`` is one piece);
3. map each piece's UTF-8 bytes to printable characters (``bytes_to_unicode``), mark the end of the piece
   with ``</w>`` and apply the BPE merges in rank order;
4. look the resulting symbols up in the 49,408-entry vocabulary: 256 byte symbols, the same 256 with
   ``</w>``, 48,894 merges, then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407).

A model input is ``[49406] + ids[:75] + [49407]`` padded to 77 positions. SD1 (CLIP ViT-L/14 through
Hugging Face) pads with the end token 49407; OpenCLIP towers (SD2, SDXL's bigG) pad with 0.

The vocabulary ``data/bpe_simple_vocab_16e6.txt.gz`` is OpenAI's, MIT licence (``data/LICENSE-clip-vocab.txt``).
Nothing is read at import time; :func:`default_tokenizer` loads it on first use.
"""

from __future__ import annotations

import copy
import gzip
import heapq
import html
import logging
import re
from collections.abc import Mapping, Sequence
from functools import cached_property, lru_cache
from importlib import resources
from pathlib import Path

import regex
import torch

from sdlab.utils.file_hashes import file_version

logger = logging.getLogger(__name__)

VOCAB_SIZE = 49408
BOS_TOKEN_ID = 49406               # <|startoftext|>
EOS_TOKEN_ID = 49407               # <|endoftext|>
CONTEXT_LENGTH = 77                # positions seen by the text encoder, begin and end tokens included

_BOS_TOKEN = "<|startoftext|>"
_EOS_TOKEN = "<|endoftext|>"
_NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2          # 48,894 merges are used out of the 262,144 in the file
_END_OF_WORD = "</w>"
_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"

# A literal "<|endoftext|>" / "<|startoftext|>" in a prompt is that one token wherever it stands, also glued to
# punctuation ("cat,<|endoftext|>"), as Hugging Face's CLIPTokenizer splits its added tokens out of the raw text
# (exact spelling) before anything else. openai/CLIP finds them only through the pre-tokenizer below.
_SPECIAL_TOKENS = regex.compile(r"(<\|startoftext\|>|<\|endoftext\|>)")

# CLIP's pre-tokenizer (openai/CLIP simple_tokenizer.py, Hugging Face's `pat`): the special tokens come first,
# so that one the cleaning spells out ("&lt;|endoftext|&gt;", upper case) is still the token at a piece start.
_PRETOKENIZE = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


# ComfyUI's way to name an embedding in a prompt: `embedding:NAME` (NAME may carry the file's extension and
# the subfolder it lies in: `embedding:styles/ink.pt`), read where ComfyUI reads it: lower-case `embedding:`
# at the start of a text or after a space or a newline (`SDTokenizer.tokenize_with_weights` splits a text
# there), NAME the first whitespace-separated token after it (`_try_get_embedding`'s `str.split()`: any
# whitespace, tab, CR, U+3000 too, ends it, and whitespace before it is skipped up to the next such
# `embedding:`), the rest text (`CLIPTokenizer._named_units`). Elsewhere ("myembedding:x", "EMBEDDING:x",
# "a,embedding:x") it is text; a bare "embedding:" names nothing and is left out. `re`, whose \s is
# `str.split()`'s whitespace (`regex`'s lacks U+001C..U+001F).
_EMBEDDING_SYNTAX = re.compile(r"(?<![^ \n])embedding:(?:(?![ \n]embedding:)\s)*(\S*)")
_EMBEDDING_SUFFIX = regex.compile(r"\.(pt|pth|bin|safetensors)$", regex.IGNORECASE)


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """Map each byte 0..255 to a printable character, so that BPE works on strings without control chars.

    Printable Latin-1 bytes map to themselves; the 68 others (controls, space, soft hyphen...) map in order
    to U+0100 onwards. This is GPT-2's table, reused by CLIP. The dict's order (printable bytes first,
    then the others) is the order of the first 256 vocabulary entries.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    next_code = 256
    for b in range(256):
        if b not in table:
            table[b] = chr(next_code)
            next_code += 1
    return table


#: characters ftfy.fix_text leaves as they are: printable ASCII without '&' (HTML entities), tab, newline
_FTFY_UNCHANGED = frozenset(chr(c) for c in range(32, 127)) - {"&"} | {"\t", "\n"}


def clean_text(text: str) -> str:
    """CLIP's text cleaning: ftfy, double HTML unescape, whitespace collapse, lower case.

    ftfy (whose import costs about a third of a second) is imported only for text it could change: anything
    beyond printable ASCII, tab and newline, or with '&'."""
    if not _FTFY_UNCHANGED.issuperset(text):
        import ftfy

        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return " ".join(text.split()).lower()       # str.split() splits on every Unicode whitespace run


def _read_merge_lines(vocab_path: str) -> list[str]:
    """The first ``_NUM_MERGES`` merge lines of the gzipped merges file (line 0 is the "#version" header).

    CLIP uses under a fifth of the file's 262,144 merges: the file is decompressed only as far as those lines
    reach, and nothing after them is decoded or split (a few tens of milliseconds per process)."""
    chunks: list[bytes] = []
    newlines = 0
    with gzip.open(vocab_path, "rb") as f:
        while newlines <= _NUM_MERGES:
            chunk = f.read(1 << 18)
            if not chunk:
                break
            chunks.append(chunk)
            newlines += chunk.count(b"\n")
    data = b"".join(chunks)
    if newlines > _NUM_MERGES:                     # cut after the last whole line (no split UTF-8 character)
        data = data[: data.rindex(b"\n")]
    return data.decode("utf-8").split("\n", _NUM_MERGES + 1)[1 : 1 + _NUM_MERGES]


@lru_cache(maxsize=4)
def _load_tables(vocab_path: str, version: tuple[int, ...] | None) -> tuple[dict[str, int], dict[str, int]]:
    """Read the merges file and build (symbol -> id, merge "left right" -> rank), kept per `version` of the file
    (`file_hashes.file_version`: another file at the same path is read).

    A merge is keyed by its line of the file ("t h"), not by a (left, right) tuple: no line is split, which
    makes this a third of the cost (it is paid by every process that draws a picture)."""
    merges = _read_merge_lines(vocab_path)
    byte_symbols = list(bytes_to_unicode().values())
    symbols = byte_symbols + [s + _END_OF_WORD for s in byte_symbols] + [m.replace(" ", "") for m in merges]
    symbols += [_BOS_TOKEN, _EOS_TOKEN]
    if len(symbols) != VOCAB_SIZE or len(set(symbols)) != VOCAB_SIZE:
        raise ValueError(f"{vocab_path}: expected {VOCAB_SIZE} distinct symbols, got {len(set(symbols))}")
    logger.debug("loaded CLIP BPE vocabulary from %s", vocab_path)
    return {s: i for i, s in enumerate(symbols)}, {m: r for r, m in enumerate(merges)}


def _default_vocab_path() -> Path:
    return Path(str(resources.files("sdlab.models").joinpath("data", _VOCAB_FILE)))


class CLIPTokenizer:
    """CLIP BPE tokenizer.

    ``encode`` gives the raw ids of a prompt (no begin/end, no truncation); calling the tokenizer gives the
    (B, 77) model input. ``pad_token_id`` is 49407 for SD1 / CLIP-L and 0 for OpenCLIP towers.
    """

    bos_token_id = BOS_TOKEN_ID
    eos_token_id = EOS_TOKEN_ID
    vocab_size = VOCAB_SIZE

    def __init__(
        self,
        vocab_path: str | Path | None = None,
        *,
        pad_token_id: int = EOS_TOKEN_ID,
        max_length: int = CONTEXT_LENGTH,
        cache_size: int = 100_000,
    ):
        path = str(vocab_path if vocab_path is not None else _default_vocab_path())
        self.encoder, self.merge_ranks = _load_tables(path, file_version(path))
        self.pad_token_id = pad_token_id
        self.max_length = max_length
        self._byte_to_char = bytes_to_unicode()
        self._char_to_byte = {c: b for b, c in self._byte_to_char.items()}
        self._cache_size = cache_size
        self._word_cache: dict[str, tuple[int, ...]] = {_BOS_TOKEN: (BOS_TOKEN_ID,), _EOS_TOKEN: (EOS_TOKEN_ID,)}
        self.added_words: dict[str, tuple[int, ...]] = {}          # see with_added_words
        self.added_paths: dict[str, str] = {}                      # added word -> its file's path, see there
        self._added_by_first: dict[int, list[tuple[tuple[int, ...], tuple[int, ...]]]] = {}

    @cached_property
    def decoder(self) -> dict[int, str]:
        """id -> symbol, built on the first `decode` (drawing a picture never needs it)."""
        return {i: s for s, i in self.encoder.items()}

    def _bpe(self, word: str) -> list[str]:
        """Merge the characters of one byte-mapped word, lowest-ranked pair first, until no pair is a merge.

        The same merges as openai/CLIP's loop (each round merges every occurrence of the best pair, left to
        right), but from a heap of the adjacent pairs over a linked list of symbols: O(n log n) in the
        word's length where rescanning the word each round is O(n^2) (17 s for 20,000 random letters).
        """
        symbols: list[str | None] = [*word[:-1], word[-1] + _END_OF_WORD]
        ranks = self.merge_ranks
        n = len(symbols)
        after = list(range(1, n + 1))                    # index of the next live symbol; n = none
        before = list(range(-1, n - 1))                  # index of the previous live symbol; -1 = none
        heap = [(ranks[pair], i) for i, pair in enumerate(map(" ".join, zip(symbols, symbols[1:]))) if pair in ranks]
        heapq.heapify(heap)

        def rank_at(i: int) -> int | None:
            """Rank of the pair starting at live symbol ``i``, None when it is no merge."""
            j = after[i]
            return ranks.get(f"{symbols[i]} {symbols[j]}") if j < n else None

        while heap:
            best = heap[0][0]
            merged_at = []
            while heap and heap[0][0] == best:           # one round: every occurrence, left to right
                i = heapq.heappop(heap)[1]
                if symbols[i] is None or rank_at(i) != best:
                    continue                             # a stale pair: one of its symbols merged since
                j = after[i]
                symbols[i], symbols[j] = symbols[i] + symbols[j], None
                after[i] = after[j]
                if after[j] < n:
                    before[after[j]] = i
                merged_at.append(i)
            for i in merged_at:                          # the pairs the round created, for later rounds
                for left in (before[i], i):
                    rank = rank_at(left) if left >= 0 else None
                    if rank is not None:
                        heapq.heappush(heap, (rank, left))
        return [symbol for symbol in symbols if symbol is not None]

    def _word_ids(self, piece: str) -> tuple[int, ...]:
        ids = self._word_cache.get(piece)
        if ids is None:
            chars = "".join(self._byte_to_char[b] for b in piece.encode("utf-8"))
            ids = tuple(self.encoder[s] for s in self._bpe(chars))
            if len(self._word_cache) >= self._cache_size:
                self._word_cache.clear()
                self._word_cache.update({_BOS_TOKEN: (BOS_TOKEN_ID,), _EOS_TOKEN: (EOS_TOKEN_ID,)})
            self._word_cache[piece] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text``: no begin/end tokens, no truncation (added words substituted, see
        ``with_added_words``)."""
        return [token for unit in self.encode_units(text) for token in unit]

    def encode_units(self, text: str) -> list[tuple[int, ...]]:
        """``encode(text)`` grouped into units: one 1-tuple per vocabulary token, and one tuple holding all the
        ids of each added word (a textual-inversion embedding's n vectors), which A1111 never splits
        between two 75-token chunks (``prompt_syntax.chunk_tokens``)."""
        units: list[tuple[int, ...]] = []
        for i, part in enumerate(_EMBEDDING_SYNTAX.split(text)):
            if i % 2 == 0:
                units.extend(self._substitute(self._bpe_ids(part)))
            else:
                units.extend(self._named_units(part))
        return units

    def _bpe_ids(self, text: str) -> list[int]:
        ids: list[int] = []
        for i, part in enumerate(_SPECIAL_TOKENS.split(text)):
            if i % 2:
                ids.append(self.encoder[part])
                continue
            for piece in _PRETOKENIZE.findall(clean_text(part)):
                ids.extend(self._word_ids(piece))
        return ids

    def with_added_words(self, words: Mapping[str, Sequence[int]],
                         paths: Mapping[str, str] | None = None, *, replace: bool = False) -> CLIPTokenizer:
        """A copy that reads each word of ``words`` (name -> its ids past the vocabulary, e.g. the vectors of a
        textual-inversion embedding) as those ids, where the name's own tokens occur in a prompt (A1111's
        rule, also inside other text) or where it is written ``embedding:name`` (ComfyUI's, see
        ``_named_word``). ``paths`` (name -> the word's file under its embeddings folder, '/'-separated,
        without suffix: ``styles/ink``) let ``embedding:styles/ink`` name it too; a word without one is its
        own path. ``replace``: the copy reads only ``words`` (those added before are forgotten). The copy shares
        the vocabulary tables; this tokenizer is unchanged."""
        twin = copy.copy(self)
        kept_words, kept_paths = ({}, {}) if replace else (self.added_words, self.added_paths)
        twin.added_words = {**kept_words, **{name: tuple(ids) for name, ids in words.items()}}
        twin.added_paths = {name: path for name, path in kept_paths.items() if name not in words}
        twin.added_paths.update(paths or {})
        by_first: dict[int, list[tuple[tuple[int, ...], tuple[int, ...]]]] = {}
        for name, ids in twin.added_words.items():
            tokens = tuple(self._bpe_ids(name))
            if tokens:
                by_first.setdefault(tokens[0], []).append((tokens, ids))
        for candidates in by_first.values():
            candidates.sort(key=lambda pair: -len(pair[0]))                   # longest name first
        twin._added_by_first = by_first
        return twin

    def _substitute(self, ids: list[int]) -> list[tuple[int, ...]]:
        """Units of ``ids`` with each added word's name (its tokens, longest name first) replaced by its ids."""
        out: list[tuple[int, ...]] = []
        i = 0
        while i < len(ids):
            for tokens, replacement in self._added_by_first.get(ids[i], ()):
                if tuple(ids[i : i + len(tokens)]) == tokens:
                    out.append(replacement)
                    i += len(tokens)
                    break
            else:
                out.append((ids[i],))
                i += 1
        return out

    def _named_word(self, name: str) -> list[tuple[int, ...]]:
        """The unit of ComfyUI's ``embedding:name``: the added word whose file ``name`` names, as ComfyUI's
        ``load_embed`` joins it to the embeddings folder and to each of its subfolders (so ``ink`` or
        ``styles/ink`` for ``styles/ink.pt``), with or without the file's suffix, any case. A name that
        names no loaded word is left out of the prompt, as ComfyUI does (`unloaded_names` finds them)."""
        written = name.lower()
        wanted = {written, _EMBEDDING_SUFFIX.sub("", written)}
        for word, ids in self.added_words.items():
            path = self.added_paths.get(word, word).lower()
            if any(path == key or path.endswith(f"/{key}") for key in wanted):
                return [ids]
        return []

    def _named_units(self, name: str) -> list[tuple[int, ...]]:
        """The units of the word ``embedding:name``, as ComfyUI's ``_try_get_embedding`` reads it: the word
        ``name`` names; else, where ``name`` has commas at either end, the word it names without them, followed
        by the text of its last ``len(commas)`` characters (``ink,,`` is ink then ",,"). So ``ink:1.2`` or
        ``ink,b`` names nothing, and the whole word is left out: a weight takes brackets, ``(embedding:ink:1.2)``."""
        found = self._named_word(name)
        stripped = name.strip(",")
        if found or stripped == name:
            return found
        return self._named_word(stripped) + self._substitute(self._bpe_ids(name[len(stripped):]))

    def unloaded_names(self, text: str) -> list[str]:
        """The names of ``text``'s ``embedding:name`` words that name no loaded word (left out of the
        prompt; without the commas at their ends, `_named_units`), each once, in order."""
        names = _EMBEDDING_SYNTAX.split(text)[1::2]
        missing = (name.strip(",") or name for name in names if not self._named_word(name))
        return list(dict.fromkeys(name for name in missing if not self._named_word(name)))

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        """Text of ``ids`` (cleaned and lower-cased, as the model saw it); word ends become spaces."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        chars = "".join(self.decoder.get(i) or self._added_name(i) for i in ids)
        data = bytes(self._char_to_byte.get(c, 32) for c in chars.replace(_END_OF_WORD, " "))
        text = data.decode("utf-8", errors="replace")
        for special in (_BOS_TOKEN, _EOS_TOKEN):                 # specials are not byte symbols
            text = text.replace(special, "")
        return text.strip()

    def _added_name(self, token_id: int) -> str:
        names = [name for name, ids in self.added_words.items() if token_id in ids]
        if not names:
            raise KeyError(f"token id {token_id} is neither in the vocabulary nor an added word")
        return "".join(self._byte_to_char[b] for b in names[0].encode("utf-8")) + _END_OF_WORD

    def pad(self, ids: list[int]) -> list[int]:
        """``[begin] + ids[:max_length-2] + [end]`` padded with ``pad_token_id`` to ``max_length``."""
        body = ids[: self.max_length - 2]
        row = [self.bos_token_id, *body, self.eos_token_id]
        return row + [self.pad_token_id] * (self.max_length - len(row))

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        """Model input ids, (B, max_length) int64: begin + ids truncated to max_length-2 + end + padding."""
        if isinstance(texts, str):
            texts = [texts]
        rows = [self.pad(self.encode(t)) for t in texts]
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), self.max_length)  # (B, 77)


@lru_cache(maxsize=4)
def default_tokenizer(pad_token_id: int = EOS_TOKEN_ID) -> CLIPTokenizer:
    """The shipped CLIP tokenizer, built once per ``pad_token_id`` (49407: SD1 / CLIP-L, 0: OpenCLIP)."""
    return CLIPTokenizer(pad_token_id=pad_token_id)
