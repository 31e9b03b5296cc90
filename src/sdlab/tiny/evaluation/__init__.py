"""Prompt-fidelity evaluation of sdlab's shipped model: score generated images against their prompts.

Imports `sdlab.tiny.datasets` (caption grammar, palettes, reference renders) and nothing above it: the
image generator is passed in as a function.
"""

from sdlab.tiny.evaluation.report import TARGETS, evaluate, read_prompt_file, render_grid, summarise
from sdlab.tiny.evaluation.scoring import Measurement, measure_background, score_image

__all__ = [
    "TARGETS",
    "Measurement",
    "evaluate",
    "measure_background",
    "read_prompt_file",
    "render_grid",
    "score_image",
    "summarise",
]
