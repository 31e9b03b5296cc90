"""`sdlab eval PROMPTS`: prompt fidelity of a model on a prompt file (the shipped model by default).

Every prompt is drawn with several seeds; each image is scored against what its prompt states (background
colour, emoji identity top-1 / top-5, shape, colour, size, position; see `sdlab.evaluation`), and the
scores are pooled per split (emoji, seen and held-out shape/colour pairs) with the issue's targets beside
them. Writes ``report.json`` and ``grid.png`` (one row per prompt, one column per seed) to ``--out``, and
prints the summary table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sdlab.cli.errors import UserError

__all__ = ["add_evaluate", "format_summary", "run_evaluate"]

DTYPES = ("fp32", "bf16", "fp16")


def add_evaluate(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="score a model's prompt fidelity on a prompt file (report.json + grid.png)",
        description="Generate every prompt of PROMPTS with several seeds, score each image against its prompt, "
                    "write report.json and grid.png.",
    )
    p.add_argument("prompts", help="prompt file: one prompt per line, '#' starts a comment (prompts/eval_prompts.txt)")
    p.add_argument("--model", help="checkpoint file or diffusers folder (default: the model shipped with sdlab)")
    p.add_argument("--seeds", type=int, default=4, help="seeds per prompt: 0, 1, ..., N-1 (default 4)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    p.add_argument("--sampler", default="DPM++ 2M", help="sampler name (default 'DPM++ 2M')")
    p.add_argument("--schedule", default=None, help="sigma schedule (default: the model family's)")
    p.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance scale (default 5)")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's)")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts (a quick look)")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="weight dtype (default fp32)")
    p.add_argument("--out", required=True, help="output folder for report.json and grid.png")
    p.set_defaults(run=run_evaluate)


def format_summary(summary: dict) -> str:
    """The summary of `sdlab.evaluation.summarise` as a text table: one line per metric with its accuracy,
    image count and, where the issue sets one, the target and whether it is met; then the diversity."""
    lines = [f"{'metric':<26} {'accuracy':>8} {'images':>6}  target"]
    for key, accuracy in summary["accuracy"].items():
        target = summary["targets"].get(key)
        goal = f">= {target['target']:.2f} {'met' if target['met'] else 'not met'}" if target else ""
        lines.append(f"{key:<26} {accuracy:>8.3f} {summary['counts'][key]:>6}  {goal}")
    diversity = summary.get("diversity")
    lines.append(f"{'diversity across seeds':<26} {diversity:>8.3f}" if diversity is not None else "diversity: n/a (one seed)")
    return "\n".join(lines)


def run_evaluate(args: argparse.Namespace) -> int:
    import torch

    from sdlab.api import load, shipped_model_path
    from sdlab.evaluation import evaluate, read_prompt_file

    if args.seeds < 1 or args.steps < 1:
        raise UserError("--seeds and --steps must be at least 1")
    try:
        prompts = read_prompt_file(args.prompts)
    except OSError as err:
        raise UserError(f"cannot read the prompt file {args.prompts!r}: {err.strerror or err}") from None
    if args.limit is not None:
        prompts = prompts[: args.limit]
    if not prompts:
        raise UserError(f"{args.prompts} holds no prompts")
    model = args.model or shipped_model_path()
    if model is None:
        raise UserError("no --model given and this sdlab install has no built-in model; pass --model PATH")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    pipe = load(model, dtype=dtype)

    def generate(prompt: str, seed: int):
        options = {"steps": args.steps, "sampler": args.sampler, "cfg_scale": args.cfg, "seed": seed}
        if args.schedule is not None:
            options["schedule"] = args.schedule
        if args.size is not None:
            options["width"] = options["height"] = args.size
        return pipe.txt2img(prompt, **options).images[0]

    try:
        report = evaluate(generate, prompts, list(range(args.seeds)), args.out)
    except ValueError as err:  # a prompt outside the caption grammar
        raise UserError(str(err)) from None
    print(format_summary(report["summary"]))
    print(f"wrote {Path(args.out) / 'report.json'} and {Path(args.out) / 'grid.png'}")
    return 0

