"""AUTOMATIC1111 prompt syntax: comments, emphasis weights, ``BREAK``, 75-token chunks, and the emphasis math.

First ``strip_comments`` takes A1111's comments out of a prompt (A1111 1.8+, on by default: a ``#`` hides the
rest of its line; ``modules/processing_scripts/comments.py``), before anything else reads it (LoRA tags,
``AND``, prompt editing) and before it is recorded. Then three steps, none of which needs a model:

1. ``parse_weighted(prompt)`` reads the emphasis syntax into ``[(text, weight), ...]``, behaving exactly
   like A1111's ``modules/prompt_parser.py::parse_prompt_attention``:

   - ``(text)`` multiplies the weight of ``text`` by 1.1, ``((text))`` by 1.1 ** 2 = 1.21;
   - ``(text:1.3)`` multiplies it by 1.3 (spaces allowed around the number: ``(text : 1.3 )``);
   - ``[text]`` divides it by 1.1;
   - ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are the literal characters; a lone ``\\`` is dropped;
   - an unmatched ``)`` or ``]`` is literal text; a bracket still open at the end of the prompt applies to
     everything after it (``(unbalanced`` -> 1.1); ``(a:1.3`` with no ``)`` is ``a:1.3`` at weight 1.1;
   - the uppercase word ``BREAK`` (whole word) becomes the marker ``("BREAK", -1.0)``;
   - adjacent runs with exactly equal weight are merged; an empty prompt is ``[("", 1.0)]``;
   - a weight such as ``(a:1.2.3)`` is a ``PromptError`` (A1111's ``float()`` fails on it too).

   Limits A1111 does not have, each a ``PromptError`` (a ``RequestError``: ``sdlab: error:``, exit 2):
   a run weight beyond ``MAX_EMPHASIS_WEIGHT`` (100) in size, or not finite (``(a:999...9)`` is inf, and
   ``(((...(a`` 10,000 deep is 1.1 ** 10000: A1111's sample turns NaN); text inside more than
   ``MAX_BRACKET_DEPTH`` (64) open brackets. Brackets left open with no text after them are harmless, as in
   A1111. With the depth bounded, parsing is linear in the prompt's length.

   A1111 quirk kept for parity: brackets multiply the BREAK marker too, so ``(a BREAK b)`` yields
   ``("BREAK", -1.1)``, which is no longer a marker and is then tokenized as the word "break" at weight
   -1.1, exactly as A1111 does. Write ``(a) BREAK (b)`` instead.

2. ``chunk_tokens(pieces, encode)`` tokenizes each piece on its own and packs the ids into chunks of 75
   (A1111 ``FrozenCLIPEmbedderWithCustomWordsBase.tokenize_line``): every token carries the weight of
   its piece; ``BREAK`` closes the current chunk; a textual-inversion embedding's n vectors stay together
   (when they do not fit in the current chunk, it closes and they start the next one); when a chunk is
   full and a comma was seen within its last ``comma_padding_backtrack`` (20) tokens, the tokens after that
   comma move to the next chunk so that a phrase is not cut in two. An empty prompt gives one chunk of
   padding. More than ``MAX_CHUNKS`` (32 chunks, 2,400 tokens) is a ``PromptError``: each chunk adds 77
   tokens to every cross-attention. The text encoder wraps
   each chunk as ``[begin] + 75 ids + [end]`` (77 positions, weight 1 at both ends), encodes each chunk
   separately and concatenates the results along the sequence axis (a prompt of n chunks conditions the
   U-Net with 77 * n tokens).

3. ``apply_emphasis(hidden, weights)`` is A1111's default ("Original") emphasis, applied to the text
   encoder's output z of one batch of chunks, z of shape (B, 77, D) and weights w of shape (B, 77):

       z' = z * w[..., None]
       z'' = z' * (mean(z) / mean(z'))

   Each token's hidden state is scaled by its weight, then the whole batch is rescaled so that the mean
   over all of its elements is what it was before weighting (A1111 ``sd_emphasis.EmphasisOriginal``;
   without the rescale, large weights push the conditioning out of the range the U-Net was trained on).
   The batch is what A1111 encodes together: one chunk of a prompt alone, or the same chunk of each text
   of one prompt's schedule (``conditioning.encode_schedule``); the prompts of different pictures never
   share a mean, so each picture of a batch stays independent of the others.

A1111 1.8+ has four emphasis modes (its ``emphasis`` option, ``modules/sd_emphasis.py``; ``request.EMPHASIS_MODES``):
"Original" (the above), "No norm" (``z' = z * w``, the mean not restored), "Ignore" (the syntax is read, so
brackets and weights leave the text and BREAK still breaks, but no weight is applied) and "None" (nothing is
read: the whole prompt is one run of weight 1, brackets, weights, backslashes and the word BREAK are text the
tokenizer sees; A1111 ``tokenize_line`` with ``parsed = [[line, 1.0]]``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

from sdlab.pipeline.comfy_prompt import comfy_weighted_runs
from sdlab.pipeline.request import RequestError

ROUND_BRACKET_MULTIPLIER = 1.1
SQUARE_BRACKET_MULTIPLIER = 1 / 1.1
BREAK_MARKER: tuple[str, float] = ("BREAK", -1.0)

CHUNK_LENGTH = 75                # prompt tokens per chunk; begin + 75 + end = the encoder's 77 positions
CLIP_COMMA_ID = 267              # ",</w>" in the CLIP BPE vocabulary shared by CLIP-L, OpenCLIP H and bigG
CLIP_END_ID = 49407              # <|endoftext|>: A1111 fills an unfinished chunk with it

# One alternative per syntax element, tried left to right (the same token classes as A1111's re_attention):
_ATTENTION_TOKEN = re.compile(
    r"""
    \\\( | \\\) | \\\[ | \\\] | \\\\ | \\     # escapes, and a lone backslash
    | \( | \[                                 # openers
    | :\s*([+-]?[.\d]+)\s*\)                  # ":1.3)" closes a round bracket with an explicit weight
    | \) | \]                                 # closers
    | [^\\()\[\]:]+                           # plain text
    | :                                       # a colon that is not part of a weight
    """,
    re.X,
)
_BREAK_WORD = re.compile(r"\bBREAK\b")
_COMMENT_LINE = re.compile("(^|\n)#[^\n]*(\n|$)")          # A1111's two patterns, in its order
_COMMENT_END = re.compile("#[^\n]*(\n|$)")

MAX_EMPHASIS_WEIGHT = 100.0      # |weight| of a run after its brackets multiply; more is an error
MAX_BRACKET_DEPTH = 64           # brackets open around a run of text; more is an error (A1111 has no limit)
MAX_CHUNKS = 32                  # 75-token chunks per prompt (2,400 tokens); more is an error


class PromptError(RequestError):
    """A prompt sdlab cannot encode: a malformed or absurd emphasis weight, or too many chunks."""


def strip_comments(prompt: str) -> str:
    """``prompt`` without its comments, as A1111's ``strip_comments``: a line that starts with ``#``, with the
    newlines around it, becomes one newline, then the text from any other ``#`` to the end of its line (its
    newline included) becomes one. No ``#`` is left, so stripping twice changes nothing.

    >>> strip_comments("a red apple # TODO: green\\n# a line of its own\\n(masterpiece)")
    'a red apple \\n(masterpiece)'
    """
    return _COMMENT_END.sub("\n", _COMMENT_LINE.sub("\n", prompt))


def _excerpt(text: str, limit: int = 40) -> str:
    """``text`` quoted, cut to ``limit`` characters, for error messages."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _to_weight(number: str, position: int) -> float:
    """The explicit weight of ``(text:number)``; A1111 calls ``float`` on it and fails the same way."""
    try:
        weight = float(number)
    except ValueError:                            # "1.2.3" matches [.\d]+ but is no number
        raise PromptError(f"emphasis weight {_excerpt(number)} at character {position} is not a number") from None
    if not math.isfinite(weight):                 # "9" * 400: float() gives inf (A1111: NaN)
        raise PromptError(f"emphasis weight {_excerpt(number)} at character {position} is too large")
    return weight


def _split_breaks(text: str) -> list[str]:
    r"""``re.split(r"\s*\bBREAK\b\s*", text)`` (A1111's split) in linear time.

    That pattern backtracks over every run of whitespace not followed by BREAK (quadratic on a long blank
    prompt); finding the word alone and stripping the whitespace around it gives the same parts.
    """
    parts, start = [], 0
    for match in _BREAK_WORD.finditer(text):
        parts.append(text[start : match.start()])
        start = match.end()
    parts.append(text[start:])
    for i in range(len(parts)):
        if i > 0:
            parts[i] = parts[i].lstrip()          # str.strip's whitespace is exactly re's \s
        if i < len(parts) - 1:
            parts[i] = parts[i].rstrip()
    return parts


def parse_weighted(prompt: str) -> list[tuple[str, float]]:
    """Split an A1111 prompt into ``(text, weight)`` runs; ``("BREAK", -1.0)`` marks a chunk break.

    Linear in the length of the prompt: a run is multiplied once per bracket around it, and at most
    ``MAX_BRACKET_DEPTH`` brackets may be open around a run. Raises ``PromptError`` for a weight that is
    not a number, a run nested too deep, or a weight beyond ``MAX_EMPHASIS_WEIGHT`` in size.

    >>> parse_weighted("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    runs: list[list] = []                         # [text, weight], mutable while brackets close
    open_round: list[int] = []                    # index in runs where each open "(" started
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for i in range(start, len(runs)):         # in A1111's order, so weights equal its to the last bit
            runs[i][1] *= factor

    def add_run(text: str, weight: float, position: int) -> None:
        depth = len(open_round) + len(open_square)    # each bracket open now scales this run once
        if depth > MAX_BRACKET_DEPTH:
            raise PromptError(
                f"the text at character {position} is inside {depth} brackets; "
                f"sdlab allows at most {MAX_BRACKET_DEPTH}"
            )
        runs.append([text, weight])

    for match in _ATTENTION_TOKEN.finditer(prompt):
        token, explicit_weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            add_run(token[1:], 1.0, match.start())
        elif token == "(":
            open_round.append(len(runs))
        elif token == "[":
            open_square.append(len(runs))
        elif explicit_weight is not None and open_round:
            scale_from(open_round.pop(), _to_weight(explicit_weight, match.start(1)))
        elif token == ")" and open_round:
            scale_from(open_round.pop(), ROUND_BRACKET_MULTIPLIER)
        elif token == "]" and open_square:
            scale_from(open_square.pop(), SQUARE_BRACKET_MULTIPLIER)
        else:                                     # text, a stray closer, a colon, or ":1.3)" with no "("
            for i, part in enumerate(_split_breaks(token)):
                if i > 0:
                    add_run(*BREAK_MARKER, match.start())
                add_run(part, 1.0, match.start())

    for start in open_round:                      # brackets left open act as if closed at the end
        scale_from(start, ROUND_BRACKET_MULTIPLIER)
    for start in open_square:
        scale_from(start, SQUARE_BRACKET_MULTIPLIER)
    _check_weights(runs)

    if not runs:
        return [("", 1.0)]

    merged: list[list] = [runs[0]]
    for text, weight in runs[1:]:
        if weight == merged[-1][1]:
            merged[-1][0] += text
        else:
            merged.append([text, weight])
    return [(text, weight) for text, weight in merged]


def _check_weights(runs: list[list]) -> None:
    """Refuse a run whose brackets multiply its weight past ``MAX_EMPHASIS_WEIGHT`` (or to inf): the
    emphasis would overflow the text encoding (A1111 draws a black image)."""
    for text, weight in runs:
        if not abs(weight) <= MAX_EMPHASIS_WEIGHT:
            raise PromptError(
                f"the brackets around {_excerpt(text)} give it an emphasis weight of {weight:.4g}; "
                f"sdlab allows at most {MAX_EMPHASIS_WEIGHT:g} in size"
            )


def is_break(piece: tuple[str, float]) -> bool:
    """True for the chunk-break marker (and only the exact marker, as in A1111)."""
    return piece[0] == BREAK_MARKER[0] and piece[1] == BREAK_MARKER[1]


@dataclass(frozen=True)
class Chunk:
    """One chunk of a prompt: ``ids`` and ``weights`` are ``chunk_len`` long, padded after ``length``.

    The text encoder turns it into ``[begin] + ids + [end]`` with weights ``[1] + weights + [1]``; for
    towers that pad with a different id (OpenCLIP pads with 0), everything after the real tokens is
    padding: position ``length + 1`` gets the end token and the rest the pad id.
    """

    ids: tuple[int, ...]
    weights: tuple[float, ...]
    length: int                                   # number of real prompt tokens, the rest is padding


def chunk_tokens(
    weighted_pieces: Iterable[tuple[str, float]],
    encode: Callable[[str], Sequence[int | Sequence[int]]],
    chunk_len: int = CHUNK_LENGTH,
    *,
    pad_id: int = CLIP_END_ID,
    comma_id: int | None = CLIP_COMMA_ID,
    comma_padding_backtrack: int = 20,
    max_chunks: int = MAX_CHUNKS,
) -> list[Chunk]:
    """Pack the tokens of ``weighted_pieces`` (from ``parse_weighted``) into chunks of ``chunk_len``.

    ``encode(text)`` returns the token ids of one piece, without begin/end tokens; an item may also be a
    sequence of ids that stays in one chunk (``CLIPTokenizer.encode_units``: a textual-inversion embedding's
    vectors), moved whole to the next chunk when it does not fit in the current one, as A1111's
    ``tokenize_line`` moves an embedding. Each piece is encoded on its own, as A1111 does.
    ``comma_padding_backtrack=0`` (or ``comma_id=None``) disables moving the
    words after the last comma of a full chunk into the next one. An embedding among the moved words moves
    with its vectors; A1111's ``tokenize_line`` leaves its ``fixes`` in the old chunk (its vectors land on
    that chunk's padding and the moved placeholders read as token 0), a bug sdlab does not copy. More than
    ``max_chunks`` chunks (the text encoder and the U-Net's cross-attention grow with each) is a
    ``PromptError``.
    """
    chunks: list[Chunk] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1                               # index in the current chunk of its last comma, or -1

    def close_chunk() -> None:
        nonlocal ids, weights, last_comma
        if len(chunks) == max_chunks:
            raise PromptError(
                f"more than {max_chunks} chunks of {chunk_len} tokens (BREAK starts a new chunk); "
                f"sdlab encodes at most {max_chunks}"
            )
        length = len(ids)
        padding = chunk_len - length
        chunks.append(Chunk(tuple(ids + [pad_id] * padding), tuple(weights + [1.0] * padding), length))
        ids, weights, last_comma = [], [], -1

    for piece in weighted_pieces:
        if is_break(piece):
            close_chunk()
            continue
        text, weight = piece
        for unit in encode(text):
            unit = [unit] if isinstance(unit, int) else list(unit)
            if not unit:
                continue
            token = unit[0]
            if comma_id is not None and token == comma_id:
                last_comma = len(ids)
            elif (
                comma_padding_backtrack != 0
                and len(ids) == chunk_len
                and last_comma != -1
                and len(ids) - last_comma <= comma_padding_backtrack
            ):
                cut = last_comma + 1              # the comma stays; the words after it move on
                moved_ids, moved_weights = ids[cut:], weights[cut:]
                ids, weights = ids[:cut], weights[:cut]
                close_chunk()
                ids, weights = moved_ids, moved_weights
            if len(ids) + len(unit) > chunk_len:
                close_chunk()                     # full, or an embedding's ids would cross the chunk's end
            ids.extend(unit)
            weights.extend([weight] * len(unit))

    if ids or not chunks:
        close_chunk()
    return chunks


def weighted_runs(prompt: str, mode: str = "Original") -> list[tuple[str, float]]:
    """The ``(text, weight)`` runs the tokenizer reads under an emphasis ``mode`` (``request.EMPHASIS_MODES``):
    ``parse_weighted``, or, for "None", the whole prompt as one run of weight 1, for "ComfyUI" ComfyUI's
    parentheses (``comfy_prompt``)."""
    if mode == "ComfyUI":
        return comfy_weighted_runs(prompt)
    return [(prompt, 1.0)] if mode == "None" else parse_weighted(prompt)


def apply_emphasis(hidden: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor | None = None, *,
                   restore_mean: bool = True) -> torch.Tensor:
    """A1111 "Original" emphasis on one batch: scale each token's hidden state, then restore the batch's mean
    (without ``restore_mean``: A1111's "No norm", the scaling alone).

    hidden: (B, T, D) text-encoder output of one batch of chunks (T = 77); weights: (B, T) per-token
    multipliers; counts: (B,) how many rows of A1111's batch each row stands for (a text that several
    entries of a prompt schedule share), 1 each when None. Returns (B, T, D) in the dtype of ``hidden``;
    the means are computed in float32.
    """
    if hidden.shape[:2] != weights.shape:
        raise ValueError(f"weights {tuple(weights.shape)} do not match hidden states {tuple(hidden.shape)}")
    z = hidden.float()                                                        # (B, T, D)
    if not restore_mean:
        return (z * weights.to(device=z.device, dtype=z.dtype).unsqueeze(-1)).to(hidden.dtype)   # (B, T, D)
    counts = torch.ones(len(z)) if counts is None else counts
    counts = counts.to(device=z.device, dtype=z.dtype)                        # (B,)
    original_mean = (z.mean(dim=(1, 2)) * counts).sum() / counts.sum()       # ()
    weighted = z * weights.to(device=z.device, dtype=z.dtype).unsqueeze(-1)   # (B, T, D)
    new_mean = (weighted.mean(dim=(1, 2)) * counts).sum() / counts.sum()     # ()
    return (weighted * (original_mean / new_mean)).to(hidden.dtype)          # (B, T, D)
