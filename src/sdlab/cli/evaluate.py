"""`sdlab eval PROMPTS`: prompt fidelity of a model on a prompt file (the shipped model by default).

Every prompt is drawn with several seeds; each image is scored against what its prompt states (background
colour, emoji identity top-1 / top-5, shape, colour, size, position; see `sdlab.tiny.evaluation`), and the
scores are pooled per split (emoji, seen and held-out shape/colour pairs) with their targets beside
them. Writes ``report.json`` and ``grid.png`` (one row per prompt, one column per seed) to ``--out``, and
prints the summary table. A progress bar on stderr counts the images (``--no-progress`` hides it).

Prompts are read by the grammar of the training data (`sdlab.tiny.datasets.captions.read_prompt`), which is
what can be scored: a subject (an emoji by its Unicode name or an everyday word for it, or one of the shapes
with an optional colour; "two" / "three" of them), optional size and position words, and a background colour
in any of the usual phrasings. Words it does not know are ignored; a prompt with no subject it knows is
refused before any picture is drawn. Scores are also given per phrasing family (template vs free).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sdlab.cli.errors import UserError
from sdlab.utils.dtypes import DTYPE_CHOICES, requested_dtype
from sdlab.utils.files import make_output_folder

__all__ = ["add_evaluate", "format_summary", "run_evaluate"]

GRAMMAR = (
    "Prompts are scored against what they state, read with the grammar of sdlab-tiny's training data "
    "(sdlab.tiny.datasets.captions.read_prompt): a subject (an emoji by its Unicode name, e.g. 'red apple', or "
    "an everyday word such as 'apple', 'cat', 'car'; or a shape: circle, square, triangle, star, hexagon, "
    "heart, diamond, cross, with an optional colour; 'two' / 'three' of them), optional size words (small, "
    "tiny, medium, large, big), position words (top, upper, bottom, lower, left, right, center, middle) and "
    "a background colour ('on a blue background', 'with a pink backdrop', 'in front of a gray wall', "
    "'on orange'). Example: 'a small pink triangle at the top on a black background'. Words it does not "
    "know are ignored; a prompt without a subject it knows is refused before any drawing."
)


def add_evaluate(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="score a model's prompt fidelity on a prompt file (report.json + grid.png)",
        description="Generate every prompt of PROMPTS with several seeds, score each image against its prompt, "
                    "write report.json and grid.png. " + GRAMMAR,
    )
    p.add_argument("prompts", help="prompt file in the caption grammar below: one prompt per line, '#' starts "
                                   "a comment (prompts/eval_prompts.txt)")
    p.add_argument("--model", help="checkpoint file or diffusers folder (default: the model shipped with sdlab)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE:WEIGHT",
                   help="merge a LoRA file or the LoRA of that name in the model's LoRA folders (e.g. a few-step "
                        "adapter) at WEIGHT (default 1); repeatable")
    p.add_argument("--seeds", type=int, default=4, help="seeds per prompt: 0, 1, ..., N-1 (default 4)")
    p.add_argument("--first-seed", type=int, default=0, metavar="S",
                   help="start the seeds at S: S, ..., S+N-1 (default 0; e.g. 4 scores a second set of seeds "
                        "when choosing between checkpoints, keeping seeds 0-3 for the report)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's, as `sdlab txt2img`)")
    p.add_argument("--sampler", default=None, help="sampler name (default: the model's, as `sdlab txt2img`)")
    p.add_argument("--schedule", default=None, help="sigma schedule (default: the model's, as `sdlab txt2img`)")
    p.add_argument("--cfg", "--cfg-scale", type=float, dest="cfg", default=None,
                   help="classifier-free guidance scale (default: the model's)")
    p.add_argument("--preset", metavar="NAME",
                   help="few-step settings (sampler, schedule, steps, CFG, eta) of a distilled model or LoRA: turbo, "
                        "lcm, lightning, hyper, tcd, lcm-model; options given here win (default: the one the model "
                        "or LoRA names, as `sdlab txt2img`)")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's)")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts, N >= 1 (a quick look)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="weight dtype; auto (default): the one `sdlab txt2img` draws the model with (bf16 for SD1.5 / "
                        "SDXL-size models on a CPU with native bf16 or on CUDA, fp32 for small ones such as the "
                        "shipped model)")
    p.add_argument("--out", required=True, help="output folder for report.json and grid.png (made before the "
                                                "model loads)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(run=run_evaluate)


def format_summary(summary: dict) -> str:
    """The summary of `sdlab.tiny.evaluation.summarise` as a text table: one line per metric with its accuracy,
    image count and, where one is set, the target and whether it is met; then the diversity."""
    width = max(len(name) for name in ("diversity across seeds", *summary["accuracy"]))   # the longest name's
    lines = [f"{'metric':<{width}} {'accuracy':>8} {'images':>6}  target"]
    for key, accuracy in summary["accuracy"].items():
        target = summary["targets"].get(key)
        goal = f">= {target['target']:.2f} {'met' if target['met'] else 'not met'}" if target else ""
        lines.append(f"{key:<{width}} {accuracy:>8.3f} {summary['counts'][key]:>6}  {goal}")
    diversity = summary.get("diversity")
    lines.append(f"{'diversity across seeds':<{width}} {diversity:>8.3f}" if diversity is not None
                 else "diversity: n/a (one seed)")
    return "\n".join(lines)


def _check_drawing_options(args: argparse.Namespace) -> None:
    """--steps, --sampler, --schedule, --cfg and --size through the request's model-free checks
    (`request.resolve`), so that a bad one is refused before the model loads, --out is made and the progress bar
    starts, as `sdlab grid` checks its cells. A --size off the 8 px grid is checked as the size it draws (rounded
    down), so that its "not a multiple of 8" warning is said by each picture alone, not once more here."""
    from sdlab.pipeline.request import GenerationRequest, RequestError, resolve

    size = args.size if args.size is None else (args.size - args.size % 8 or args.size)   # under 8: refused as given
    given = {"steps": args.steps, "sampler": args.sampler, "schedule": args.schedule, "cfg_scale": args.cfg,
             "width": size, "height": size}
    try:
        resolve(GenerationRequest(prompt="", **{k: v for k, v in given.items() if v is not None}),
                default_size=64, default_sampler="Euler", default_schedule="karras", factor=8)
    except RequestError as err:
        raise UserError(str(err)) from None


def run_evaluate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from sdlab.api import RequestError, load
    from sdlab.cli.generate import _lora_finder, _parse_lora
    from sdlab.pipeline.presets import get_preset
    from sdlab.tiny.datasets.captions import read_prompt
    from sdlab.tiny.evaluation import evaluate, read_prompt_file
    from sdlab.utils.threads import use_threads_for

    if args.seeds < 1 or (args.steps is not None and args.steps < 1):
        raise UserError("--seeds and --steps must be at least 1")
    if args.first_seed < 0:
        raise UserError("--first-seed must be 0 or more")
    if args.limit is not None and args.limit < 1:
        raise UserError("--limit must be at least 1")
    if args.preset is not None:
        try:
            get_preset(args.preset)
        except RequestError as err:
            raise UserError(f"--preset: {err}") from None
    _check_drawing_options(args)
    try:
        prompts = read_prompt_file(args.prompts)
    except OSError as err:
        raise UserError(f"cannot read the prompt file {args.prompts!r}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise UserError(f"cannot read the prompt file {args.prompts!r}: it is not UTF-8 text (byte "
                        f"{err.start}); save it as UTF-8") from None
    if args.limit is not None:
        prompts = prompts[: args.limit]
    if not prompts:
        raise UserError(f"{args.prompts} holds no prompts")
    unreadable = []                # refused before the model loads and the progress bar starts, all at once
    for number, prompt in enumerate(prompts, 1):
        try:
            read_prompt(prompt)
        except ValueError as err:
            unreadable.append(f"prompt {number}: {err}")
    if unreadable:
        listed = "; ".join(unreadable[:10]) + (f"; and {len(unreadable) - 10} more" if len(unreadable) > 10 else "")
        raise UserError(f"{listed}; `sdlab eval --help` gives the prompt grammar it scores")
    dtype = requested_dtype(args.dtype)
    finder = _lora_finder(args)
    loras = [_parse_lora(spec, finder) for spec in args.lora]
    make_output_folder(args.out, "--out")
    try:
        pipe = load(args.model, dtype=dtype, loras=loras)  # no --model: the shipped model
    except RequestError as err:
        raise UserError(str(err)) from None
    use_threads_for(pipe.bundle.unet, pipe.bundle.device)
    bar = tqdm(total=len(prompts) * args.seeds, desc="eval", unit="image", file=sys.stderr,
               disable=args.no_progress)

    def generate(prompt: str, seed: int):
        given = {"steps": args.steps, "sampler": args.sampler, "schedule": args.schedule, "cfg_scale": args.cfg,
                 "width": args.size, "height": args.size, "preset": args.preset}
        options = {"seed": seed, **{k: v for k, v in given.items() if v is not None}}
        try:
            image = pipe.txt2img(prompt, **options).images[0]
        except RequestError as err:
            raise UserError(str(err)) from None
        bar.update(1)
        return image

    try:
        report = evaluate(generate, prompts, list(range(args.first_seed, args.first_seed + args.seeds)), args.out)
    finally:
        bar.close()
    print(format_summary(report["summary"]))
    print(f"wrote {Path(args.out) / 'report.json'} and {Path(args.out) / 'grid.png'}")
    return 0
