"""Prompt -> U-Net conditioning, with AUTOMATIC1111's prompt semantics, as the family's conditioner says.

One prompt becomes ``context`` (the cross-attention tokens) and, for a family whose ``ConditionerSpec`` has
a pooled output (SDXL), a pooled text vector:

1. ``parse_weighted`` + ``chunk_tokens`` (``sdlab.pipeline.prompt_syntax``) turn the prompt into chunks of
   75 weighted token ids. This is done once: every CLIP tokenizer shares one vocabulary.
2. Each chunk becomes one 77-position encoder input ``[49406] + 75 ids + [49407]``; everything after the
   end token that follows the real tokens is the encoder's pad id (49407 for CLIP-L, 0 for OpenCLIP), as
   A1111's ``process_tokens`` does. As in A1111's ``forward``, the encoders run one chunk position at a
   time, every text's chunk at that position in one batch (``_encode_batches``).
3. The hidden state named by the encoder's ``TextEncoderSpec.hidden_state`` is taken, with A1111's clip
   skip ``n`` (1 = the family's usual layer, each step one layer further back):

   ================== ============================== ==============================================
   hidden_state        clip skip n uses               families
   ================== ============================== ==============================================
   "last"              final_ln(hidden_states[-n])    SD1 CLIP-L; SD2 towers stored as in diffusers
                                                      (23 layers, the last one dropped)
   "penultimate_norm"  final_ln(hidden_states[-n-1])  SD2 OpenCLIP-H with all 24 layers
   "penultimate"       hidden_states[-n-1], no norm   SDXL CLIP-L and bigG
   ================== ============================== ==============================================

   Layers past the one used are not run, unless the pooled output (which needs the whole tower) is
   wanted. So A1111 clip skip ``n`` equals diffusers' ``clip_skip=n-1`` (SD1, SDXL) for the prompt;
   diffusers encodes the negative prompt at the usual layer whatever its ``clip_skip``, A1111 at the same
   layer as the prompt (``make_cond``'s ``negative_clip_skip``). A clip skip may be each encoder's own
   (``ClipSkip``): A1111's Clip skip SDXL reads SDXL's CLIP-L at ``hidden_states[-n]``, its clip skip
   ``n - 1`` here (0: its last layer), and bigG at its usual layer (``plan.encoder_clip_skips``).
4. Emphasis (``apply_emphasis``, A1111 "Original"; ``emphasis`` names another of A1111's modes:
   ``request.EMPHASIS_MODES``) per chunk and per encoder, skipped for chunks whose weights are all 1,
   so an unweighted prompt gives exactly the plain encoding. The texts of one prompt's
   schedule (``[from:to:when]``, ``[a|b]``) are encoded together, as A1111 encodes them
   (``encode_schedule``): each padded to the longest one's chunk count with encodings of A1111's empty
   chunk, and emphasis restoring one mean per chunk position over all of them.
5. Chunks are concatenated along the tokens (77 * n_chunks); SDXL's two encoders along the features
   (768 + 1280 = 2048). The pooled vector is the last encoder's (bigG's) projected output of the FIRST
   chunk, as A1111 (``zs[0].pooled``).

``make_cond`` builds the keyword arguments of the U-Net (``context``, and the added vector ``y`` where the
family's conditioner has one: pooled text + size numbers, SDXL) for a prompt and its negative, each repeated
along the tokens to a common length where that is cheap, and repeated to the batch size. Nothing here names
a family: what differs is in ``FamilySpec.conditioner`` and each ``TextEncoderSpec.hidden_state``.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache, partial

import torch
from torch import Tensor

from sdlab.diffusion.guidance import took_effect
from sdlab.families import FamilySpec
from sdlab.families.loaded import TextEncoder
from sdlab.models.layers import sdxl_vector
from sdlab.models.tokenizer import BOS_TOKEN_ID, EOS_TOKEN_ID, CLIPTokenizer
from sdlab.pipeline.prompt_loras import without_prompt_loras
from sdlab.pipeline.prompt_schedule import PromptSchedule, prompt_schedule
from sdlab.pipeline.request import PROMPT_EMPHASIS
from sdlab.pipeline.prompt_syntax import (
    CHUNK_LENGTH,
    Chunk,
    PromptError,
    apply_emphasis,
    chunk_tokens,
    weighted_runs,
)

logger = logging.getLogger(__name__)

__all__ = [
    "Conditioning",
    "PromptEmbedding",
    "chunk_input_ids",
    "composed_schedule",
    "encode_captions",
    "encode_prompt",
    "encode_prompts",
    "encode_schedule",
    "encoder_skip",
    "empty_context_once",
    "empty_prompt_context",
    "hidden_state_layers",
    "make_cond",
    "make_cond_schedule",
    "merge_part_schedules",
    "pad_cond_uncond",
    "prompt_chunks",
    "repeat_to_common_length",
    "sdxl_size_conds",
]

TOKENS_PER_CHUNK = CHUNK_LENGTH + 2          # begin + 75 + end = 77 encoder positions
EMPTY_CHUNK = Chunk((EOS_TOKEN_ID,) * CHUNK_LENGTH, (1.0,) * CHUNK_LENGTH, 0)   # A1111's `empty_chunk()`
MAX_REPEAT_FACTOR = 4                         # make_cond repeats a context to at most 4x the shorter one (ComfyUI)
PAD_RULES = ("pad", "v0")                     # A1111's Pad conds and Pad conds v0 (`pad_cond_uncond`)

Conditioning = dict[str, Tensor]             # U-Net keyword arguments: "context" (B, T, D), SDXL "y" (B, adm)
CondSchedule = list[tuple[int, Conditioning, "Conditioning | None"]]   # (end_at_step, cond, uncond), by step
EmphasisBatches = Sequence[tuple[Sequence[int], Sequence[int]]]     # (rows, how many times each row counts)


@dataclass(frozen=True)
class PromptEmbedding:
    """One encoded prompt: ``context`` (1, 77 * n_chunks, D); ``pooled`` (1, P) for SDXL, else None."""

    context: Tensor
    pooled: Tensor | None = None

    @property
    def num_chunks(self) -> int:
        return self.context.shape[1] // TOKENS_PER_CHUNK


# ----------------------------------------------------------------------------------------------------------
# Tokens


def emphasis_mode(emphasis: bool | str) -> str:
    """The emphasis mode (``PROMPT_EMPHASIS``: A1111's, or "ComfyUI") of an ``emphasis`` argument: True is
    "Original", False "Ignore" (the syntax read, no weight applied)."""
    if isinstance(emphasis, bool):
        return "Original" if emphasis else "Ignore"
    if emphasis not in PROMPT_EMPHASIS:
        raise ValueError(f"unknown emphasis mode {emphasis!r}; valid: {', '.join(PROMPT_EMPHASIS)}")
    return emphasis


def prompt_chunks(prompt: str, tokenizer: CLIPTokenizer, emphasis: str = "Original") -> list[Chunk]:
    """The A1111 chunks of ``prompt`` (emphasis syntax, BREAK, 75 tokens each, comma backtracking; under the
    emphasis mode "None" the prompt is read as plain text: ``weighted_runs``).

    Raises ``PromptError`` naming the prompt when it cannot be encoded (see ``prompt_syntax``)."""
    try:
        return chunk_tokens(weighted_runs(prompt, emphasis), tokenizer.encode_units, pad_id=EOS_TOKEN_ID)
    except PromptError as err:
        shown = prompt if len(prompt) <= 60 else prompt[:60] + "..."
        raise PromptError(f"prompt {shown!r}: {err}") from None


def chunk_input_ids(chunks: Sequence[Chunk], pad_token_id: int) -> Tensor:
    """Encoder inputs of ``chunks``, (n, 77) int64: ``[begin] + ids + [end]``, with every position after the
    end token that closes the chunk's real tokens (index ``length + 1``) set to ``pad_token_id`` (A1111
    ``process_tokens``; a no-op when the pad is the end token). A literal ``<|endoftext|>`` among the
    prompt's own tokens is kept, and so is the text after it, as A1111 and diffusers keep it for SD1."""
    rows = []
    for chunk in chunks:
        real = [BOS_TOKEN_ID, *chunk.ids[: chunk.length], EOS_TOKEN_ID]
        rows.append(real + [pad_token_id] * (len(chunk.ids) + 2 - len(real)))
    return torch.tensor(rows, dtype=torch.long).reshape(len(rows), TOKENS_PER_CHUNK)   # (n, 77)


def _chunk_weights(chunks: Sequence[Chunk]) -> Tensor:
    """Per-position emphasis weights, (n, 77) float32; begin and end tokens weigh 1."""
    rows = [[1.0, *chunk.weights, 1.0] for chunk in chunks]
    return torch.tensor(rows, dtype=torch.float32).reshape(len(rows), TOKENS_PER_CHUNK)  # (n, 77)


# ----------------------------------------------------------------------------------------------------------
# Hidden states


ClipSkip = int | tuple[int, ...]
"""A clip skip for every text encoder, or each encoder's own (in the order of the model's encoders)."""


def encoder_skip(clip_skip: ClipSkip, i: int) -> int:
    """Encoder `i`'s clip skip."""
    return clip_skip[i] if isinstance(clip_skip, tuple) else clip_skip


def hidden_state_layers(encoder: TextEncoder, clip_skip: int) -> tuple[int, bool]:
    """(number of layers to run, whether the final LayerNorm applies) for the encoder's hidden-state rule and
    A1111's clip skip (0: the layer after the usual one, for a rule whose usual layer is not the last, as A1111's
    Clip skip SDXL reads SDXL's CLIP-L at its clip skip 1); a ValueError when the clip skip leaves no layer."""
    if clip_skip < 0 or (clip_skip == 0 and encoder.spec.hidden_state == "last"):
        raise ValueError(f"clip_skip must be >= 1 (A1111 numbering), got {clip_skip}")
    layers = encoder.model.cfg.layers
    rule = encoder.spec.hidden_state
    if rule == "last":
        used, norm = layers - (clip_skip - 1), True
    elif rule == "penultimate_norm":
        used, norm = layers - clip_skip, True
    elif rule == "penultimate":
        used, norm = layers - clip_skip, False
    else:
        raise ValueError(f"text encoder {encoder.spec.name}: unknown hidden_state {rule!r}")
    if used < 1:
        raise ValueError(
            f"clip_skip={clip_skip} leaves no layer of {encoder.spec.name} ({layers} layers, {rule!r} hidden state)"
        )
    return used, norm


def _encode_inputs(
    text_encoders: Sequence[TextEncoder],
    input_ids: Callable[[TextEncoder], Tensor],
    *,
    weighting: tuple[Tensor, EmphasisBatches, bool] | None,
    clip_skip: ClipSkip,
    with_pooled: bool,
) -> tuple[Tensor, Tensor | None]:
    """Run every encoder on its inputs ``input_ids(encoder)`` (n, 77): hidden states by the encoder's rule
    (``hidden_state_layers``), emphasis ``weighting`` (weights (n, 77), A1111's batches of rows and whether the
    mean is restored: ``_emphasized``), features concatenated, (n, 77, D_1 + D_2 ...); and with ``with_pooled``
    the last encoder's projected pooled output (n, P)."""
    if not text_encoders:
        raise ValueError("encoding a prompt needs at least one text encoder")
    hiddens, pooled = [], None
    for i, encoder in enumerate(text_encoders):
        model = encoder.model
        device = next(model.parameters()).device
        wants_pooled = with_pooled and i == len(text_encoders) - 1
        used, norm = hidden_state_layers(encoder, encoder_skip(clip_skip, i))
        out = model(input_ids(encoder).to(device), num_layers=None if wants_pooled else used)
        hidden = out.hidden_states[used]                                          # (n, 77, D)
        if norm:
            ran_exactly = len(out.hidden_states) - 1 == used
            hidden = out.last_hidden_state if ran_exactly else model.final_layer_norm(hidden)
        if weighting is not None:
            weights, batches, restore_mean = weighting
            hidden = _emphasized(hidden, weights.to(device), batches, restore_mean)
        hiddens.append(hidden.to(hiddens[0].dtype) if hiddens else hidden)
        if wants_pooled:
            if out.pooled is None:
                raise ValueError(f"text encoder {encoder.spec.name} gives no pooled output")
            pooled = out.pooled                                                    # (n, P)
    return torch.cat(hiddens, dim=-1), pooled                                      # (n, 77, D_1 + D_2 ...)


def _emphasized(hidden: Tensor, weights: Tensor, batches: EmphasisBatches, restore_mean: bool = True) -> Tensor:
    """A1111 emphasis on the rows (chunks) of ``hidden`` (n, 77, D) with ``weights`` (n, 77): one mean per
    batch of rows A1111 encodes together (``batches``: each one's rows and how many times each row counts in
    it; without ``restore_mean``, "No norm", the weights alone), a batch whose weights are all 1 left as it is."""
    out = hidden
    for rows, counts in batches:
        index = torch.tensor(rows, device=hidden.device)
        if (weights[index] == 1.0).all():
            continue
        emphasized = apply_emphasis(hidden[index], weights[index], torch.tensor(counts),
                                    restore_mean=restore_mean)                              # (k, 77, D)
        if not torch.isfinite(emphasized).all() and torch.isfinite(hidden[index]).all():
            raise PromptError("the prompt's emphasis weights make its text encoding overflow; use weights nearer 1")
        out = hidden.clone() if out is hidden else out
        out[index] = emphasized
    return out


def _comfy_weighted(hidden: Tensor, empty: Tensor, weights: Tensor) -> Tensor:
    """ComfyUI's token weights (comfy/sd1_clip.py ``encode_token_weights``): each token's encoding moved away from
    the empty prompt's at its position by its weight, ``z_empty + (z - z_empty) * w``; no mean is restored.
    hidden (k, 77, D), empty (77, D), weights (k, 77)."""
    w = weights.to(device=hidden.device, dtype=hidden.dtype).unsqueeze(-1)                 # (k, 77, 1)
    return torch.where(w == 1.0, hidden, (hidden - empty) * w + empty)                    # (k, 77, D)


def _encode_batches(
    text_encoders: Sequence[TextEncoder],
    batches: Sequence[Sequence[str]],
    *,
    clip_skip: ClipSkip,
    emphasis: bool | str,
    with_pooled: bool,
) -> list[dict[str, PromptEmbedding]]:
    """Each batch of texts encoded as A1111's ``FrozenCLIPEmbedderWithCustomWords.forward`` encodes a batch,
    and each distinct text's embedding, batch by batch:

    - every text of a batch gets the chunk count of the batch's longest, the chunks a shorter one lacks being
      the encoding of A1111's empty chunk (begin and 76 end tokens; the pad id after the first end token);
    - emphasis restores one mean per chunk position over the batch, a text counting once per time it is in
      the batch (``apply_emphasis``: every row is rescaled, unweighted texts and empty chunks too), or none
      is restored or no weight applied, as the ``emphasis`` mode says (``emphasis_mode``);
    - the pooled vector (``with_pooled``) is the first chunk's, as A1111 (``zs[0].pooled``).

    As in A1111, the encoders run one chunk position at a time, over the distinct texts of every batch that
    reaches it: the layers' hidden states held at once are one chunk's per distinct text, whatever the
    prompt's length. Only the first position runs the last encoder to its end for the pooled vector.
    """
    if not text_encoders:
        raise ValueError("encoding a prompt needs at least one text encoder")
    tokenizer = text_encoders[0].tokenizer       # one shared vocabulary; each encoder applies its own pad id
    mode = emphasis_mode(emphasis)
    weighted = mode in ("Original", "No norm")
    counts = [Counter(texts) for texts in batches]
    chunks = [{text: prompt_chunks(text, tokenizer, mode) for text in batch} for batch in counts]
    lengths = [max(len(text_chunks) for text_chunks in batch.values()) for batch in chunks]
    columns: list[list[Tensor]] = [[] for _ in batches]      # each batch's features, chunk position by position
    first_pooled: list[Tensor | None] = [None] * len(batches)
    for position in range(max(lengths, default=0)):
        live = [b for b, length in enumerate(lengths) if position < length]
        rows = [text_chunks[position] if position < len(text_chunks) else EMPTY_CHUNK
                for b in live for text_chunks in chunks[b].values()]
        sizes = [len(chunks[b]) for b in live]
        starts = [sum(sizes[:k]) for k in range(len(live))]
        emphasis_batches = [(range(start, start + size), list(counts[b].values()))
                            for b, start, size in zip(live, starts, sizes)]
        comfy = mode == "ComfyUI" and any(weight != 1.0 for row in rows for weight in row.weights)
        encoded = [*rows, EMPTY_CHUNK] if comfy else rows                  # ComfyUI's z_empty: the empty prompt's
        features, pooled = _encode_inputs(
            text_encoders, lambda encoder: chunk_input_ids(encoded, encoder.spec.pad_token_id),
            weighting=(_chunk_weights(rows), emphasis_batches, mode == "Original") if weighted else None,
            clip_skip=clip_skip,
            with_pooled=with_pooled and position == 0,
        )                                                                          # (k, 77, D), (k, P)
        if comfy:
            features = _comfy_weighted(features[:-1], features[-1], _chunk_weights(rows))   # (k, 77, D)
            pooled = None if pooled is None else pooled[:-1]
        for b, part in zip(live, features.split(sizes)):
            columns[b].append(part)
        if pooled is not None:
            for b, part in zip(live, pooled.split(sizes)):
                first_pooled[b] = part
    return [
        {text: PromptEmbedding(
            context=torch.cat([column[j : j + 1] for column in columns[b]], dim=1),      # (1, 77 n, D)
            pooled=None if first_pooled[b] is None else first_pooled[b][j : j + 1])       # (1, P)
         for j, text in enumerate(chunks[b])}
        for b in range(len(batches))
    ]


def encode_prompts(
    text_encoders: Sequence[TextEncoder],
    prompts: Sequence[str],
    *,
    clip_skip: ClipSkip = 1,
    emphasis: bool = True,
    with_pooled: bool = False,
    equal_length: bool = True,
) -> list[PromptEmbedding]:
    """Encode several prompts, each as A1111 encodes it alone, at its own chunk count (``_encode_batches``,
    one batch a prompt; see module docstring).

    ``equal_length`` repeats each prompt's context up to the least common multiple of the chunk counts
    (``repeat_to_common_length``), so that all contexts have the same number of tokens and attend exactly as
    each prompt alone does. Each distinct chunk is encoded once, whatever the repetition.
    ``with_pooled`` runs the last encoder to its end and returns its projected pooled output (SDXL): the
    first chunk's, as A1111 (``zs[0].pooled``).
    """
    encoded = _encode_batches(text_encoders, [[prompt] for prompt in prompts], clip_skip=clip_skip,
                              emphasis=emphasis, with_pooled=with_pooled)
    results = [by_text[prompt] for by_text, prompt in zip(encoded, prompts)]
    return repeat_to_common_length(results) if equal_length else results


def encode_schedule(
    text_encoders: Sequence[TextEncoder],
    texts: Sequence[str],
    *,
    clip_skip: ClipSkip = 1,
    emphasis: bool = True,
    with_pooled: bool = False,
) -> dict[str, PromptEmbedding]:
    """The texts of one prompt's schedule (every entry's text, in order: ``prompt_schedule``) encoded as A1111
    encodes them, as one batch (``prompt_parser.get_learned_conditioning`` hands them together to
    ``FrozenCLIPEmbedderWithCustomWords.forward``: ``_encode_batches``), and each distinct text's embedding.
    Each distinct text is encoded once. A single text (a prompt without schedule) is its ``encode_prompt``.
    """
    return _encode_batches(text_encoders, [texts], clip_skip=clip_skip, emphasis=emphasis,
                           with_pooled=with_pooled)[0]


def _encode_each(
    text_encoders: Sequence[TextEncoder], texts: Sequence[tuple[str, ClipSkip]], *, emphasis: bool, with_pooled: bool
) -> list[PromptEmbedding]:
    """``(prompt, clip_skip)`` pairs encoded at their own lengths (``encode_prompts``), in order: one batched
    pass per distinct clip skip."""
    encoded: dict[ClipSkip, Iterator[PromptEmbedding]] = {}
    for skip in dict.fromkeys(skip for _, skip in texts):
        prompts = [prompt for prompt, prompt_skip in texts if prompt_skip == skip]
        encoded[skip] = iter(encode_prompts(text_encoders, prompts, clip_skip=skip, emphasis=emphasis,
                                            with_pooled=with_pooled, equal_length=False))
    return [next(encoded[skip]) for _, skip in texts]


def repeat_to_common_length(
    embeddings: Sequence[PromptEmbedding], max_factor: int | None = None
) -> list[PromptEmbedding]:
    """Each context repeated along the tokens to the least common multiple of the chunk counts (ComfyUI's
    ``CONDCrossAttn.concat``), so that the prompt and its negative can share one batched U-Net call.

    Repeating changes no cross-attention output: SD's k / v projections have no bias, so a context repeated
    r times gives every key r times with its value, and softmax(q k^T) v is unchanged (the r equal weights
    of a key sum to its weight in the unrepeated softmax). This equals A1111's default, which encodes each
    prompt at its own length and runs the U-Net on cond and uncond separately when they differ
    (``CFGDenoiser.forward`` without ``pad_cond_uncond``). Padding with encodings of "" (A1111's opt-in
    "Pad prompt/negative prompt") would change the prediction.

    With ``max_factor``, when the common length would be more than ``max_factor`` times the shortest context
    (1 and 5 chunks, 3 and 5 chunks: ComfyUI's limit of 4), the contexts are returned unchanged: guidance then
    runs them as separate U-Net passes, which gives the same result with less attention work.
    Pooled vectors are unchanged (the first chunk's).
    """
    counts = [e.num_chunks for e in embeddings]
    if not counts:
        return []
    common = math.lcm(*counts)
    if max_factor is not None and common > max_factor * min(counts):
        return list(embeddings)
    return [
        PromptEmbedding(context=e.context.repeat(1, common // n, 1), pooled=e.pooled)   # (1, 77 common, D)
        for e, n in zip(embeddings, counts)
    ]


def encode_captions(
    text_encoders: Sequence[TextEncoder], captions: Sequence[str], *, with_pooled: bool = False
) -> tuple[Tensor, Tensor | None]:
    """Training captions: (context (B, 77, D), pooled (B, P) or None), one row per caption.

    A caption is taken literally, as the tokenizer reads it (no emphasis syntax, no BREAK, truncated to 75
    tokens, each encoder's own tokenizer and pad id), then encoded as a prompt is (the same hidden-state
    rule, clip skip 1, feature concatenation and pooled output), so a plain caption of at most 75 tokens
    conditions the U-Net in training exactly as the same prompt does in ``make_cond``."""
    return _encode_inputs(
        text_encoders, lambda encoder: encoder.tokenizer(list(captions)), weighting=None, clip_skip=1,
        with_pooled=with_pooled,
    )


def encode_prompt(
    text_encoders: Sequence[TextEncoder],
    prompt: str,
    *,
    clip_skip: ClipSkip = 1,
    emphasis: bool = True,
    with_pooled: bool = False,
) -> PromptEmbedding:
    """Encode one prompt: context (1, 77 * n_chunks, D) and, with ``with_pooled`` (SDXL), pooled (1, P)."""
    return encode_prompts(
        text_encoders, [prompt], clip_skip=clip_skip, emphasis=emphasis, with_pooled=with_pooled
    )[0]


# ----------------------------------------------------------------------------------------------------------
# U-Net conditioning


def sdxl_size_conds(
    family: FamilySpec,
    *,
    width: int | None,
    height: int | None,
    original_size: tuple[int, int] | None = None,
    crops_coords_top_left: tuple[int, int] = (0, 0),
    target_size: tuple[int, int] | None = None,
    aesthetic_score: float = 6.0,
) -> Tensor:
    """The size numbers of the family's added vector (``family.conditioner.size_conds``), (1, K) float32, in
    diffusers' ``add_time_ids`` order.

    SDXL base: original_size (h, w) + crops_coords_top_left (top, left) + target_size (h, w), K = 6.
    SDXL refiner: original_size + crops_coords_top_left + (aesthetic_score,), K = 5.
    Sizes default to the image size (height, width), the crop corner to (0, 0).
    """
    image_size = None if width is None or height is None else (height, width)
    values: list[float] = []
    for name in family.conditioner.size_conds:
        if name == "original_size":
            original = original_size or image_size
            if original is None:
                raise ValueError("SDXL conditioning needs width and height (or original_size and target_size)")
            values.extend(original)
        elif name == "crop_top_left":
            values.extend(crops_coords_top_left)
        elif name == "target_size":
            target = target_size or image_size
            if target is None:
                raise ValueError("SDXL conditioning needs width and height (or target_size)")
            values.extend(target)
        else:                                                                      # "aesthetic_score"
            values.append(aesthetic_score)
    return torch.tensor([values], dtype=torch.float32).reshape(1, len(values))    # (1, K)


def make_cond(
    encoders: Sequence[TextEncoder],
    family: FamilySpec,
    prompt: str,
    negative_prompt: str = "",
    *,
    adm_width: int | None = None,
    batch_size: int = 1,
    clip_skip: ClipSkip = 1,
    width: int | None = None,
    height: int | None = None,
    emphasis: bool = True,
    guidance: bool = True,
    original_size: tuple[int, int] | None = None,
    crops_coords_top_left: tuple[int, int] = (0, 0),
    target_size: tuple[int, int] | None = None,
    aesthetic_score: float = 6.0,
    negative_original_size: tuple[int, int] | None = None,
    negative_crops_coords_top_left: tuple[int, int] | None = None,
    negative_target_size: tuple[int, int] | None = None,
    negative_aesthetic_score: float = 2.5,
    negative_clip_skip: ClipSkip | None = None,
    zero_empty_negative: bool | None = None,
    encoded: Sequence[PromptEmbedding] | None = None,
    pad_rule: str | None = None,
    empty_context: Callable[[], Tensor] | None = None,
) -> tuple[Conditioning, Conditioning | None]:
    """U-Net conditioning ``(cond, uncond)`` for a prompt and its negative, each ``{"context": (B, T, D)}``
    plus ``"y": (B, adm)`` for SDXL (``sdxl_vector(pooled, size_conds)``); ``uncond`` is None without
    ``guidance`` (CFG scale 1). ``encoders`` and ``family`` are a loaded model's (``bundle.text_encoders``,
    ``bundle.family``); ``adm_width`` (``bundle.unet_config.adm_in_channels``) checks SDXL's vector width.

    Positive and negative of different chunk counts are repeated to a common length
    (``repeat_to_common_length``, at most ``MAX_REPEAT_FACTOR`` times the shorter, else left at their own
    lengths for two U-Net passes): either way the U-Net sees each prompt as if alone, as A1111 by default
    and ComfyUI do. An empty negative prompt is encoded as "" for SD1/SD2; for
    SDXL (``zero_empty_negative``, default: the family's ``conditioner.zero_empty_negative``; a diffusers
    folder's ``force_zeros_for_empty_prompt`` is the bundle's ``zero_empty_negative``) it becomes a zero
    context and a zero pooled vector (diffusers' ``force_zeros_for_empty_prompt``, A1111's
    ``force_zero_embeddings``); the size numbers stay.
    The zero context takes the positive's length. Its length does not matter: SD's cross-attention k / v
    projections have no bias, so zero tokens give zero keys and values and an attention output of 0 for
    any number of them (the same as A1111's 77 zero tokens run in a separate pass).

    The negative is encoded at ``negative_clip_skip`` (None: ``clip_skip``). Its size numbers are the
    ``negative_*`` ones, each None taking the positive's value, with ``negative_aesthetic_score`` for the
    refiner: which of them a diffusers pipeline uses is the caller's choice (``generate._negative_sizes``).
    ``encoded``: the prompt's embedding, then the negative's where one is encoded, when the caller has them
    (``make_cond_schedule``, which encodes each side's schedule texts together).
    ``pad_rule`` ("pad", "v0"; None: repeat as above): A1111's Pad conds options instead (``pad_cond_uncond``,
    padding with ``empty_context``, else ``empty_prompt_context`` of ``encoders``); a zero negative is then one chunk
    of zeros, as A1111's zeroed "".
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    conditioner = family.conditioner
    zero_negative = _zero_negative(family, negative_prompt, guidance, zero_empty_negative)

    if encoded is None:
        texts = [(prompt, clip_skip)]
        if guidance and not zero_negative:
            texts.append((negative_prompt, clip_skip if negative_clip_skip is None else negative_clip_skip))
        encoded = _encode_each(encoders, texts, emphasis=emphasis, with_pooled=conditioner.pooled)
    embeddings = list(encoded) if pad_rule else repeat_to_common_length(encoded, max_factor=MAX_REPEAT_FACTOR)
    positive = embeddings[0]
    if not guidance:
        negative = None
    elif zero_negative:
        pooled = torch.zeros_like(positive.pooled) if positive.pooled is not None else None
        zeros = positive.context[:, :TOKENS_PER_CHUNK] if pad_rule else positive.context      # (1, T, D)
        negative = PromptEmbedding(context=torch.zeros_like(zeros), pooled=pooled)
    else:
        negative = embeddings[1]

    def as_cond(embedding: PromptEmbedding, **sizes) -> Conditioning:
        cond = {"context": embedding.context.repeat(batch_size, 1, 1)}            # (B, T, D)
        if conditioner.added_vector:
            numbers = sdxl_size_conds(family, width=width, height=height, **sizes).to(embedding.pooled.device)  # (1, K)
            y = sdxl_vector(embedding.pooled, numbers)                             # (1, P + 256 K)
            if adm_width is not None and y.shape[1] != adm_width:
                raise ValueError(f"the added vector is {y.shape[1]} wide but the U-Net takes {adm_width}")
            cond["y"] = y.repeat(batch_size, 1)                                    # (B, adm)
        return cond

    cond = as_cond(positive, original_size=original_size, crops_coords_top_left=crops_coords_top_left,
                   target_size=target_size, aesthetic_score=aesthetic_score)
    uncond = None if negative is None else as_cond(
        negative, original_size=negative_original_size or original_size,
        crops_coords_top_left=negative_crops_coords_top_left or crops_coords_top_left,
        target_size=negative_target_size or target_size, aesthetic_score=negative_aesthetic_score,
    )
    if pad_rule and uncond is not None:
        [cond], uncond = pad_cond_uncond([cond], uncond, pad_rule, empty_context or empty_context_once(encoders))
    logger.debug(
        "conditioning: %s, %d chunk(s), context %s%s", family.name, positive.num_chunks,
        tuple(cond["context"].shape), ", zero uncond" if zero_negative else "",
    )
    return cond, uncond


def empty_prompt_context(encoders: Sequence[TextEncoder]) -> Tensor:
    """The context of "" (1, 77, D) that A1111's Pad conds pads with: its ``cond_stage_model_empty_prompt``, which
    A1111 encodes once, as it loads the model, at the clip skip then set: its default, 1 (the family's own layer),
    whatever clip skip a request draws with ("" weighs no word, so the emphasis mode does not matter), and with no
    extra network active: the model's own weights, whatever LoRAs a prompt has merged (`without_prompt_loras`)."""
    with without_prompt_loras(encoder.model for encoder in encoders):
        return _encode_each(encoders, [("", 1)], emphasis=True, with_pooled=False)[0].context


def empty_context_once(encoders: Sequence[TextEncoder]) -> Callable[[], Tensor]:
    """``empty_prompt_context`` of ``encoders``, encoded where it is first asked for and kept: "" encoded once for
    every entry of a pass's prompt schedules that Pad conds pads."""
    return cache(partial(empty_prompt_context, encoders))


def pad_cond_uncond(
    conds: Sequence[Conditioning], uncond: Conditioning, rule: str, empty_context: Callable[[], Tensor]
) -> tuple[list[Conditioning], Conditioning]:
    """A1111's padding of the prompt's contexts ``conds`` (its AND parts, all of one length) and the negative's
    ``uncond`` when their lengths differ (``CFGDenoiser.forward``; unchanged when they are equal), by ``rule``:

    - "pad" (Pad conds, ``pad_cond_uncond``): the shorter side gets ``(T_c - T_u) // 77`` chunks of the context of
      "" (``empty_context()``: ``empty_prompt_context``) appended, so the prompt and negative attend otherwise than
      alone;
    - "v0" (Pad conds v0, ``pad_cond_uncond_v0``, A1111's DDIM and PLMS before 1.6): the negative's last token vector
      repeated to the prompt's length, or the negative cut to it.

    Returns (the conds, the uncond); other keys (SDXL's ``y``) are kept. Padding notes its option (``took_effect``:
    A1111 writes its label only where it padded)."""
    if rule not in PAD_RULES:
        raise ValueError(f"pad rule must be one of {', '.join(PAD_RULES)}, got {rule!r}")
    c, u = conds[0]["context"], uncond["context"]                                      # (B, Tc, D), (B, Tu, D)
    if c.shape[1] == u.shape[1]:
        return list(conds), uncond
    took_effect("pad_cond_uncond_v0" if rule == "v0" else "pad_cond_uncond")
    if rule == "v0":
        if u.shape[1] < c.shape[1]:
            u = torch.cat([u, u[:, -1:].expand(-1, c.shape[1] - u.shape[1], -1)], dim=1)   # (B, Tc, D)
        return list(conds), {**uncond, "context": u[:, :c.shape[1]]}
    chunk = empty_context().to(device=u.device, dtype=u.dtype)                         # (1, 77, D)
    repeats = (c.shape[1] - u.shape[1]) // chunk.shape[1]

    def padded(cond: Conditioning, n: int) -> Conditioning:
        context = cond["context"]
        return {**cond, "context": torch.cat([context, chunk.repeat(context.shape[0], n, 1)], dim=1)}

    if repeats < 0:
        return [padded(cond, -repeats) for cond in conds], uncond
    return list(conds), padded(uncond, repeats)


def _zero_negative(family: FamilySpec, negative_prompt: str, guidance: bool, zero_empty_negative: bool | None) -> bool:
    """Whether the negative is a zero context (``make_cond``): an empty one under guidance, where the family (or
    ``zero_empty_negative``) says so."""
    zero_empty = family.conditioner.zero_empty_negative if zero_empty_negative is None else zero_empty_negative
    return guidance and negative_prompt == "" and zero_empty


def make_cond_schedule(
    encoders: Sequence[TextEncoder],
    family: FamilySpec,
    prompt: str,
    negative_prompt: str = "",
    *,
    steps: int,
    hires_steps: int | None = None,
    clip_skip: ClipSkip = 1,
    negative_clip_skip: ClipSkip | None = None,
    emphasis: bool | str = True,
    old_prompt_editing: bool = False,
    guidance: bool = True,
    zero_empty_negative: bool | None = None,
    prompt_2: str = "",
    negative_prompt_2: str = "",
    **options,
) -> CondSchedule:
    """``make_cond`` at every step of A1111's prompt schedules (``prompt_schedule``: ``[from:to:when]``,
    ``[a|b]``) of the prompt and of the negative prompt over ``steps`` (``hires_steps``: a hires second pass
    after ``steps``): ``[(end_at_step, cond, uncond), ...]``, one entry per run of steps whose texts are the
    same, the last ending at the schedule's length. The guided denoiser uses an entry up to and including
    model call ``end_at_step`` (counted from 0; ``guidance.switch_at_calls``). A prompt without that syntax
    gives one entry, the conditioning of ``make_cond``. The prompt's schedule texts are encoded together, as
    A1111 encodes them, and so are the negative's (``encode_schedule``: the chunk count of each side's
    longest text, one emphasis mean over each side's texts); each distinct text once, and the entries of a
    text share its tensors (the generation memo keeps their keys and values). A1111's ``AND`` is split off
    before (``prompt_schedule.composable_parts``, one schedule a part, encoded apart as A1111 does).
    ``emphasis``: A1111's emphasis mode (``emphasis_mode``); ``old_prompt_editing``: its rule before 1.6
    (``prompt_schedule(..., old=True)``). ``prompt_2`` / ``negative_prompt_2`` ("": the prompt / the negative):
    the second text encoder's texts, with their own schedules (``encode_second_texts``); the negative is zeros
    where both negatives are empty and the family zeros an empty one."""
    sides = [prompt_schedule(text, steps, hires_steps, old=old_prompt_editing)
             for text in (prompt, negative_prompt, prompt_2 or prompt, negative_prompt_2 or negative_prompt)]
    two_texts = _second_texts(encoders, prompt_2, negative_prompt_2)
    options.setdefault("empty_context", empty_context_once(encoders))      # "" encoded once for every entry
    encode = partial(encode_second_texts if two_texts else _encoded_schedule, encoders, emphasis=emphasis,
                     with_pooled=family.conditioner.pooled)
    prompt_texts = encode(*_texts_of(sides, 0, two_texts), clip_skip=clip_skip)
    negative_texts = None
    zero_negative = _zero_negative(family, negative_prompt + negative_prompt_2, guidance, zero_empty_negative)
    if guidance and not zero_negative:
        negative_texts = encode(*_texts_of(sides, 1, two_texts),
                                clip_skip=clip_skip if negative_clip_skip is None else negative_clip_skip)
    made: dict[tuple, tuple[Conditioning, Conditioning | None]] = {}
    shared: dict[tuple, Conditioning] = {}        # one dict (one set of tensors) per side, text and length
    schedule: CondSchedule = []
    last: tuple | None = None
    for end in sorted({end for side in sides for end, _ in side}):
        at = [_text_at(side, end) for side in sides]
        texts = ((at[0], at[2]), (at[1], at[3])) if two_texts else (at[0], at[1])
        if texts == last:
            schedule[-1] = (end, *schedule[-1][1:])
            continue
        if texts not in made:
            encoded = [prompt_texts(texts[0]), *([negative_texts(texts[1])] if negative_texts else [])]
            # two negatives are zeros only where both are empty: the first may be "" beside a second
            negative, zero_rule = ("" if zero_negative else at[1], zero_negative) if two_texts else (
                at[1], zero_empty_negative)
            cond, uncond = make_cond(encoders, family, at[0], negative, guidance=guidance,
                                     zero_empty_negative=zero_rule, encoded=encoded, **options)
            cond = shared.setdefault((0, texts[0], cond["context"].shape), cond)
            if uncond is not None:
                uncond = shared.setdefault((1, texts[1], uncond["context"].shape), uncond)
            made[texts] = cond, uncond
        schedule.append((end, *made[texts]))
        last = texts
    return schedule


def _second_texts(encoders: Sequence[TextEncoder], prompt_2: str, negative_prompt_2: str) -> bool:
    """Whether the second text encoder reads texts of its own (``prompt_2`` or ``negative_prompt_2`` set); a
    ValueError where the model has one encoder."""
    if not (prompt_2 or negative_prompt_2):
        return False
    if len(encoders) < 2:
        raise ValueError("prompt_2 / negative_prompt_2 are the second text encoder's texts; this model has one")
    return True


def _texts_of(sides: Sequence[PromptSchedule], side: int, two_texts: bool) -> tuple[list[str], ...]:
    """The texts of the prompt's (`side` 0) or the negative's (1) schedule, and with ``two_texts`` those of its
    second text (``sides``: prompt, negative, prompt_2, negative_prompt_2)."""
    first = [text for _, text in sides[side]]
    return (first, [text for _, text in sides[side + 2]]) if two_texts else (first,)


def _encoded_schedule(text_encoders: Sequence[TextEncoder], texts: Sequence[str], *, clip_skip: ClipSkip,
                      emphasis: bool | str, with_pooled: bool) -> Callable[[str], PromptEmbedding]:
    """``encode_schedule`` of ``texts``, as a lookup of each text's embedding."""
    return encode_schedule(text_encoders, texts, clip_skip=clip_skip, emphasis=emphasis,
                           with_pooled=with_pooled).__getitem__


def encode_second_texts(
    text_encoders: Sequence[TextEncoder],
    texts: Sequence[str],
    texts_2: Sequence[str],
    *,
    clip_skip: ClipSkip = 1,
    emphasis: bool | str = True,
    with_pooled: bool = False,
) -> Callable[[tuple[str, str]], PromptEmbedding]:
    """A two-encoder model (SDXL) reading its own text with each encoder, as diffusers' ``prompt`` / ``prompt_2``:
    the first encoder ``texts``, the second (and the pooled vector) ``texts_2``, each side's texts encoded
    together (``encode_schedule``). Returns a lookup of a (text, text_2) pair's embedding, the features side by
    side; where the two have different chunk counts the shorter is padded with its encoder's chunks of "", as
    ComfyUI's CLIPTextEncodeSDXL pads ``text_l`` / ``text_g`` (diffusers reads 77 tokens of each)."""
    skips = [encoder_skip(clip_skip, i) for i in range(len(text_encoders))]
    first = encode_schedule(text_encoders[:1], texts, clip_skip=skips[0], emphasis=emphasis)
    second = encode_schedule(text_encoders[1:], texts_2, clip_skip=tuple(skips[1:]), emphasis=emphasis,
                             with_pooled=with_pooled)
    empty = [encode_schedule(part, [""], clip_skip=skip, emphasis=emphasis)[""].context
             for part, skip in ((text_encoders[:1], skips[0]), (text_encoders[1:], tuple(skips[1:])))]

    def padded(context: Tensor, chunks: int, empty_chunk: Tensor) -> Tensor:
        missing = chunks - context.shape[1] // TOKENS_PER_CHUNK
        return torch.cat([context, empty_chunk.repeat(1, missing, 1)], dim=1) if missing else context

    pairs: dict[tuple[str, str], PromptEmbedding] = {}

    def pair(texts_12: tuple[str, str]) -> PromptEmbedding:
        if texts_12 not in pairs:
            a, b = first[texts_12[0]], second[texts_12[1]]
            chunks = max(a.num_chunks, b.num_chunks)
            context = torch.cat([padded(a.context, chunks, empty[0]), padded(b.context, chunks, empty[1])], dim=-1)
            pairs[texts_12] = PromptEmbedding(context=context, pooled=b.pooled)         # (1, 77 n, D_1 + D_2)
        return pairs[texts_12]
    return pair


def merge_part_schedules(schedules: Sequence[CondSchedule]) -> list[tuple[int, list[Conditioning]]]:
    """The conditionings of composable prompt parts (A1111's ``AND``; each part's ``make_cond_schedule``
    without guidance) as one schedule ``[(end_at_step, [cond of each part]), ...]`` over the union of the parts'
    switch points, each step's contexts padded to the longest by repeating its last token vector (A1111
    ``reconstruct_multicond_batch`` / ``stack_conds``: the parts are stacked into one batch). Unlike
    repeating a whole context, the padding changes a shorter part's attention, so this matches A1111 only
    because it does the same. A padded context is made once and shared by the steps that use it."""
    padded: dict[tuple[int, int], Conditioning] = {}

    def pad(cond: Conditioning, length: int) -> Conditioning:
        context = cond["context"]                                                  # (B, T, D)
        key = (id(cond), length)
        if context.shape[1] == length:
            return cond
        if key not in padded:
            tail = context[:, -1:].expand(-1, length - context.shape[1], -1)      # (B, length - T, D)
            padded[key] = {**cond, "context": torch.cat([context, tail], dim=1)}  # (B, length, D)
        return padded[key]

    merged: list[tuple[int, list[Conditioning]]] = []
    for end in sorted({end for schedule in schedules for end, _, _ in schedule}):
        conds = [_entry_at(schedule, end)[1] for schedule in schedules]
        length = max(cond["context"].shape[1] for cond in conds)
        merged.append((end, [pad(cond, length) for cond in conds]))
    return merged


def composed_schedule(
    parts: Sequence[CondSchedule], negative: CondSchedule, pad_rule: str | None = None,
    empty_context: Callable[[], Tensor] | None = None,
) -> list[tuple[int, list[Conditioning], Conditioning]]:
    """The schedule of a composable prompt (``merge_part_schedules`` of its ``parts``) with its negative prompt's
    uncond (``negative``: ``make_cond_schedule`` of "" and the negative), ``[(end_at_step, [cond of each part],
    uncond), ...]`` over the union of their switch points; with ``pad_rule``, A1111's Pad conds of the parts' length
    and the negative's at each (``pad_cond_uncond``, padding with the context of "", ``empty_context()``)."""
    merged = merge_part_schedules(parts)
    schedule = []
    for end in sorted({end for end, _ in merged} | {end for end, _, _ in negative}):
        conds, uncond = _entry_at(merged, end)[1], _entry_at(negative, end)[2]
        if pad_rule:
            conds, uncond = pad_cond_uncond(conds, uncond, pad_rule, empty_context)
        schedule.append((end, conds, uncond))
    return schedule


def _entry_at(schedule: Sequence[tuple], step: int) -> tuple:
    """The first entry that lasts to ``step``, else the first (A1111 ``reconstruct_cond_batch``)."""
    return next((entry for entry in schedule if step <= entry[0]), schedule[0])


def _text_at(schedule: PromptSchedule, step: int) -> str:
    """The text of the entry that lasts to ``step``."""
    return _entry_at(schedule, step)[1]
