"""A1111 1.10's Prompt matrix script (scripts/prompt_matrix.py): a picture for every combination of a prompt's
`|`-separated parts, in one labelled grid.

    "a cat|red|in the snow"  ->  "a cat", "a cat, red", "a cat, in the snow", "a cat, red, in the snow"

The text before the first `|` is in every picture; combination n holds part i (1-based after it) where bit
i - 1 of n is set, so the first picture is the first part alone. Each part is stripped of spaces and commas, and
the parts are joined with ", " (Joining char comma) or " " (space), the first part last with `at_start` (Set at
prompt start). The negative prompt is split instead with `negative` (Prompt type negative). Every picture draws
the request's seed (fixed once, as A1111's `fix_seed`), or seed + n with `different_seeds` (Random seeds), and
the variation seed + n (A1111's `all_subseeds` of a seed list).

The grid (`PromptMatrix.sheet`): 2 ** (k // 2) rows for k parts after the first, the first ceil(k / 2) parts
across (one column per combination of them), the rest down; each column's legend lists its parts, those it
holds black and the others grey and struck through (A1111's `draw_prompt_matrix`), `margin` px of white between
the pictures (Grid margins). A `PromptMatrix` draws as an X/Y/Z `Plot` does (`cells`, `labels`, `sheet`,
`parameters`), so `sdlab grid --prompt-matrix` runs it as a plot.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from PIL import Image

from sdlab.pipeline.grid import MAX_CELLS, Annotation, GridError, Index, draw_grid, fix_seeds

DELIMITERS = {"comma": ", ", "space": " "}      # A1111's Joining char (`variations_delimiter`)
PROMPT_TYPES = ("positive", "negative")         # A1111's Prompt type


@dataclass(frozen=True)
class PromptMatrix:
    """The matrix of `text` (the prompt, or with `negative` the negative prompt, as typed)."""

    text: str
    negative: bool = False
    at_start: bool = False
    delimiter: str = ", "
    different_seeds: bool = False
    margin: int = 0
    keep_random_seeds: bool = False             # A1111 always fixes the seeds first

    def __post_init__(self) -> None:
        if self.count() > MAX_CELLS:                # counted from the parts: no prompt is built for a refusal
            bars = self.text.count("|")
            raise GridError(f"the prompt matrix of {bars + 1} parts makes 2^{bars} pictures; "
                            f"a grid holds at most {MAX_CELLS} (8 `|`)")

    def parts(self) -> list[str]:
        return self.text.split("|")

    def count(self) -> int:
        """The number of combinations, 2 ** (the parts after the first)."""
        return 1 << self.text.count("|")

    def prompt(self, n: int) -> str:
        """Combination n's prompt: the first part with part i (1-based after it) where bit i - 1 of n is set."""
        first, *rest = self.parts()
        selected = [text.strip().strip(",") for i, text in enumerate(rest) if n & (1 << i)]
        return self.delimiter.join(selected + [first] if self.at_start else [first] + selected)

    def prompts(self) -> list[str]:
        """Every combination's prompt, in A1111's order (`Script.run`)."""
        return [self.prompt(n) for n in range(self.count())]

    def shape(self) -> Index:
        """(columns, rows, 1) of the grid: A1111's `image_grid(..., rows=1 << ((len(parts) - 1) // 2))`."""
        rows = 1 << ((len(self.parts()) - 1) // 2)
        return math.ceil(self.count() / rows), rows, 1

    def axes(self) -> list:
        return []                               # no X/Y/Z axis (`grid.check_unipc_order_axis`)

    def drawing_order(self) -> list[Index]:
        """Every combination's index in A1111's order (`cells`), as `Plot.drawing_order` gives a plot's."""
        columns = self.shape()[0]
        return [(n % columns, n // columns, 0) for n in range(self.count())]

    def cells(self, options: Mapping[str, Any]) -> list[tuple[Index, dict[str, Any]]]:
        """((column, row, 0), request options) of every combination n in order: its prompt (or negative prompt),
        the seed (fixed once, `fix_seeds`) plus n with `different_seeds`, the variation seed plus n."""
        options = fix_seeds(options)
        columns = self.shape()[0]
        key = "negative_prompt" if self.negative else "prompt"
        return [((n % columns, n // columns, 0),
                 {**options, key: prompt, "seed": options["seed"] + (n if self.different_seeds else 0),
                  "subseed": options["subseed"] + n})
                for n, prompt in enumerate(self.prompts())]

    def labels(self, index: Index) -> list[str]:
        """The prompt of the combination at `index` (for messages)."""
        return [self.prompt(index[0] + index[1] * self.shape()[0])]

    def legends(self) -> tuple[list[tuple[Annotation, ...]], list[tuple[Annotation, ...]]]:
        """Each column's and each row's legend: A1111's `draw_prompt_matrix` `hor_texts` / `ver_texts`."""
        rest = [text.strip() for text in self.parts()[1:]]
        boundary = math.ceil(len(rest) / 2)
        across, down = rest[:boundary], rest[boundary:]
        return ([tuple(Annotation(text, bool(pos & (1 << i))) for i, text in enumerate(across))
                 for pos in range(1 << len(across))],
                [tuple(Annotation(text, bool(pos & (1 << i))) for i, text in enumerate(down))
                 for pos in range(1 << len(down))])

    def sheet(self, images: Mapping[Index, Image.Image]) -> Image.Image:
        """The grid of `images` (one per combination, by `cells`' index) with the legends."""
        columns, rows, _ = self.shape()
        across, down = self.legends()
        cells = [[images[(i, j, 0)] for i in range(columns)] for j in range(rows)]
        return draw_grid(cells, across, down, self.margin)

    def parameters(self) -> dict[str, str]:
        """A1111 writes its first picture's parameters on the grid, with no field of its own."""
        return {}


def prompt_matrix(options: Mapping[str, Any], prompt_type: str = "positive", at_start: bool = False,
                  variations_delimiter: str = "comma", different_seeds: bool = False,
                  margin: int = 0) -> PromptMatrix:
    """The matrix of the request `options` (GenerationRequest keyword arguments) with A1111's settings, named as
    its `Script.run` arguments; a GridError for a prompt type or joining char A1111 refuses (its ValueError)."""
    if prompt_type not in PROMPT_TYPES:
        raise GridError(f"Unknown prompt type {prompt_type}")
    if variations_delimiter not in DELIMITERS:
        raise GridError(f"Unknown variations delimiter {variations_delimiter}")
    text = options.get("negative_prompt" if prompt_type == "negative" else "prompt") or ""
    return PromptMatrix(text, prompt_type == "negative", at_start, DELIMITERS[variations_delimiter], different_seeds,
                        margin)
