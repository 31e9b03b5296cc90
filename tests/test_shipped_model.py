"""The model that ships inside the package (sdlab-tiny, trained by `recipes/sdlab-tiny/`).

- it is there, within the 40 MB budget together with its four-step adapter, stored in fp16, and loads as the
  sdlab-tiny family;
- `sdlab txt2img PROMPT` with no `--model` draws with it (a 64 x 64 PNG whose parameters name it);
- it still draws what prompts say: a regression guard on the committed weights, scored by the evaluation's
  own scorer on prompts that are not in `prompts/eval_prompts.txt` (one per background colour, emoji and
  shapes, canonical and paraphrased wording). The bounds sit well below what the committed weights reach
  (measured numbers in the module constants), so they catch a broken loader, sampler or conditioning
  path, not a change of a few images;
- its four-step adapter (an LCM-LoRA, `recipes/sdlab-tiny/lcd_lora.toml`) is found by name, draws with the
  LCM preset (4 steps, CFG 1) and passes the same guard with its own bounds.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import sdlab
from sdlab.api import shipped_model_path
from sdlab.cli import main
from sdlab.tiny.datasets.captions import read_prompt
from sdlab.tiny.evaluation.scoring import score_image
from sdlab.pipeline.png_info import read_parameters

PROMPTS = (
    "a large yellow star in the center on a dark blue background",
    "a medium cat face, top right, white background",
    "a large green heart on the left on a black background",
    "a light green background with a large mushroom in the center",
    "a small red square in the bottom right on a light yellow background",
    "a large panda face at the bottom on a light pink background",
    "a medium blue diamond in the center on a light blue background",
    "a large orange circle on the right on a dark green background",
    # free phrasing and the background colours sdlab-tiny v2 added
    "a big white circle in front of a red wall",
    "a large yellow star, purple backdrop",
    "a green heart with a brown background",
    "a cat face on blue",
)
SEEDS = (0, 1)
# share of the scored attributes the scorer finds right: (measured on the committed weights, bound).
# Emoji identity is uneven per emoji (top-5 0.88 on the public eval file, recipe README; 8 of these 8 images
# at the default 14 steps), so its bound asks for half of them among the top 5 of 259 names (chance: about
# 1 in 50 per image)
BOUNDS = {"background": (1.0, 0.75), "size + position": (1.0, 0.75), "shape + colour": (0.875, 0.6),
          "emoji top-5": (1.0, 0.5)}
ADAPTER = shipped_model_path().parent / "loras" / "sdlab-tiny-lcm.safetensors"
# the four-step adapter's measured shares and bounds (the recipe README compares it with 20 steps)
ADAPTER_BOUNDS = {"background": (0.917, 0.6), "size + position": (0.972, 0.75), "shape + colour": (0.938, 0.5),
                  "emoji top-5": (1.0, 0.4)}


def test_the_shipped_model_is_packaged_in_fp16_within_budget() -> None:
    path = shipped_model_path()
    assert path is not None and path.is_file(), "the package has no shipped model"
    assert path.stat().st_size <= 40_000_000
    tensors = load_file(str(path))
    assert {t.dtype for t in tensors.values() if t.is_floating_point()} == {torch.float16}
    pipe = sdlab.load(path)
    assert pipe.bundle.family.name == "sdlab-tiny"


def test_the_package_data_with_the_four_step_adapter_fits_the_budget() -> None:
    data = shipped_model_path().parent
    assert ADAPTER.is_file(), "the package has no four-step adapter"
    assert sum(p.stat().st_size for p in data.rglob("*") if p.is_file()) <= 40_000_000
    assert {t.dtype for t in load_file(str(ADAPTER)).values() if t.is_floating_point()} == {torch.float16}


def test_txt2img_without_model_uses_the_shipped_model(tmp_path, capsys, one_thread) -> None:
    out = tmp_path / "apple.png"
    code = main(["txt2img", "a red apple on a light blue background", "--out", str(out), "--no-progress"])
    capsys.readouterr()
    assert code == 0 and out.is_file()
    image = Image.open(out)
    assert image.size == (64, 64)
    parameters = read_parameters(out)
    assert "sdlab-tiny" in parameters, parameters
    # its defaults: 14 steps of DPM++ 2M on the sgm_uniform schedule at CFG 5 (families/sdlab_tiny)
    for setting in ("Steps: 14,", "Sampler: DPM++ 2M,", "Schedule type: SGM Uniform,", "CFG scale: 5,"):
        assert setting in parameters, parameters


def _shares_correct(pipe, **options) -> dict[str, float]:
    """Share of each scored attribute (`BOUNDS`' names) right over `PROMPTS` x `SEEDS`."""
    scores: dict[str, list[bool]] = {name: [] for name in BOUNDS}
    for prompt in PROMPTS:
        spec, _ = read_prompt(prompt)
        for seed in SEEDS:
            correct = score_image(pipe.txt2img(prompt, seed=seed, **options).images[0], spec)["correct"]
            scores["background"].append(correct["background"])
            scores["size + position"] += [correct[k] for k in ("size", "position") if k in correct]
            if spec.kind == "shape":
                scores["shape + colour"] += [correct["shape"], correct["colour"]]
            else:
                scores["emoji top-5"].append(correct["top5"])
    shares = {name: float(np.mean(values)) for name, values in scores.items()}
    print("shares correct:", shares)
    return shares


def test_the_shipped_model_draws_what_prompts_say(one_thread) -> None:
    shares = _shares_correct(sdlab.load(shipped_model_path()))             # the defaults: 14 steps, CFG 5
    for name, (_, bound) in BOUNDS.items():
        assert shares[name] >= bound, (name, shares)


def test_the_four_step_adapter_is_found_by_name_and_draws_with_the_lcm_preset(tmp_path, capsys, one_thread) -> None:
    out = tmp_path / "apple.png"
    code = main(["txt2img", "a red apple on a light blue background", "--lora", "sdlab-tiny-lcm", "--seed", "1",
                 "--out", str(out), "--no-progress"])
    capsys.readouterr()
    assert code == 0 and out.is_file()
    parameters = read_parameters(out)
    assert "Steps: 4" in parameters and "Sampler: LCM" in parameters and "CFG scale: 1" in parameters, parameters
    assert "sdlab-tiny-lcm" in parameters, parameters
    pipe = sdlab.load(shipped_model_path(), loras=[(ADAPTER, 1.0)])
    assert pipe.bundle.preset == "lcm"
    shares = _shares_correct(pipe)                              # the preset: LCM, 4 steps, CFG 1
    for name, (_, bound) in ADAPTER_BOUNDS.items():
        assert shares[name] >= bound, (name, shares)



RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "sdlab-tiny"


@pytest.mark.parametrize("where", ["train.sh", "README.md"])
def test_the_recipe_starts_from_an_fp32_init(where, tmp_path, capsys) -> None:
    """The shipped model was trained from an fp32 random init; `new-model` writes fp16 by default, so the recipe's
    step 2 (train.sh and its README) asks for fp32. Before: no --dtype, an fp16-rounded init."""
    lines = [line for line in (RECIPE / where).read_text().splitlines() if " new-model " in f" {line} "]
    assert len(lines) == 1, lines
    words = shlex.split(lines[0].partition("new-model")[2])
    out = tmp_path / "init.safetensors"
    assert main(["new-model", str(out), *words[1:]]) == 0, capsys.readouterr().err
    assert {tensor.dtype for tensor in load_file(out).values()} == {torch.float32}
