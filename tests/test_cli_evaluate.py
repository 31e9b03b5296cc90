"""`sdlab eval PROMPTS`: every prompt x seed generated and scored, report.json + grid.png, bad input refused.

A reduced-width sdlab-tiny bundle with random weights draws the pictures (their scores are whatever they
are; the test checks the bookkeeping, not the model).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from sdlab.checkpoints.create import new_bundle
from sdlab.checkpoints.save import save_bundle
from sdlab.cli import main
from sdlab.tiny.evaluation.report import CELL, LABEL_WIDTH

PROMPTS = """# two prompts: an emoji and a held-out shape / colour pair
a large red apple in the center on a light blue background

a small pink triangle at the top on a black background
"""


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny-sdlab.safetensors"
    save_bundle(new_bundle("sdlab-tiny", tiny=True, seed=0), path)
    return path


@pytest.fixture()
def prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text(PROMPTS, encoding="utf-8")
    return path


def test_eval_writes_report_and_grid(model, prompts, tmp_path, capsys) -> None:
    out = tmp_path / "eval"
    code = main(["eval", str(prompts), "--model", str(model), "--seeds", "2", "--steps", "2", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["seeds"] == [0, 1]
    assert [r["prompt"] for r in report["prompts"]] == [
        "a large red apple in the center on a light blue background",
        "a small pink triangle at the top on a black background",
    ]
    assert [r["split"] for r in report["prompts"]] == ["emoji", "shape_held_out"]
    assert all(len(r["images"]) == 2 for r in report["prompts"])
    summary = report["summary"]
    assert summary["counts"]["any/background"] == 4  # 2 prompts x 2 seeds
    assert summary["counts"]["emoji/top1"] == 2
    assert "template phrasing/background" in summary["accuracy"]
    assert any(key.startswith("background=") for key in summary["targets"])
    assert 0.0 <= summary["accuracy"]["any/background"] <= 1.0
    assert summary["diversity"] is not None and summary["diversity"] > 0.0  # two seeds, two pictures
    with Image.open(out / "grid.png") as grid:
        assert grid.size == (LABEL_WIDTH + 2 * CELL, 2 * CELL)
    assert "any/background" in printed and "emoji/top1" in printed and "target" in printed


def test_eval_first_seed_scores_the_same_pictures_as_that_seed_in_a_longer_run(model, prompts, tmp_path, capsys) -> None:
    common = [str(prompts), "--model", str(model), "--steps", "1", "--limit", "1"]
    assert main(["eval", *common, "--seeds", "2", "--out", str(tmp_path / "both")]) == 0
    assert main(["eval", *common, "--seeds", "1", "--first-seed", "1", "--out", str(tmp_path / "second")]) == 0
    assert main(["eval", *common, "--first-seed", "-1", "--out", str(tmp_path / "bad")]) == 2
    assert "--first-seed must be 0 or more" in capsys.readouterr().err
    both = json.loads((tmp_path / "both" / "report.json").read_text())
    second = json.loads((tmp_path / "second" / "report.json").read_text())
    assert second["seeds"] == [1]
    assert second["prompts"][0]["images"] == [im for im in both["prompts"][0]["images"] if im["seed"] == 1]


def test_eval_limit_and_defaults_from_the_family(model, prompts, tmp_path, capsys) -> None:
    out = tmp_path / "eval"
    code = main(["eval", str(prompts), "--model", str(model), "--seeds", "1", "--steps", "1", "--limit", "1",
                 "--out", str(out)])
    capsys.readouterr()
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert len(report["prompts"]) == 1
    assert report["summary"]["diversity"] is None  # one seed: nothing to compare
    with Image.open(out / "grid.png") as grid:
        assert grid.size == (LABEL_WIDTH + CELL, CELL)


@pytest.mark.parametrize(
    ("text", "extra", "message"),
    [
        ("a purple elephant riding a bicycle\n", [], "no known emoji"),
        ("a red apple\na horse\na cat\nan octopus\n", [], "prompt 2: no known emoji name or shape in 'a horse'; "
                                                      "prompt 4: no known"),
        ("# nothing but a comment\n", [], "no prompts"),
        (PROMPTS, ["--seeds", "0"], "at least 1"),
        (PROMPTS, ["--limit", "0"], "--limit must be at least 1"),
        (PROMPTS, ["--limit", "-1"], "--limit must be at least 1"),
    ],
)
def test_bad_input_is_one_error_line_and_no_report(model, tmp_path, capsys, text, extra, message) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text(text, encoding="utf-8")
    out = tmp_path / "eval"
    code = main(["eval", str(path), "--model", str(model), "--steps", "1", "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("sdlab: error:") and err.count("\n") == 1
    assert message in err
    assert not (out / "report.json").exists()


def test_missing_prompt_file(model, tmp_path, capsys) -> None:
    code = main(["eval", str(tmp_path / "none.txt"), "--model", str(model), "--out", str(tmp_path / "eval")])
    assert code == 2
    assert "cannot read the prompt file" in capsys.readouterr().err


def test_prompt_file_that_is_not_utf8(model, tmp_path, capsys) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("a red apple on a blue background\ncaf\xe9 on a red background\n".encode("latin-1"))
    code = main(["eval", str(path), "--model", str(model), "--out", str(tmp_path / "eval")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"cannot read the prompt file {str(path)!r}: it is not UTF-8 text" in err


def test_an_out_that_cannot_be_a_folder_is_refused_before_the_model_loads(model, prompts, tmp_path, capsys,
                                                                          monkeypatch) -> None:
    import sdlab.api

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(sdlab.api, "load", no_load)
    taken = tmp_path / "taken"
    taken.write_text("")
    for out in (taken, taken / "eval"):
        code = main(["eval", str(prompts), "--model", str(model), "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("sdlab: error:") and err.count("\n") == 1, err
        assert f"--out {out}" in err
    assert taken.read_text() == ""


@pytest.mark.parametrize("extra, message", [
    (["--sampler", "Euler x"], "unknown sampler 'Euler x'"),
    (["--schedule", "karas"], "unknown schedule 'karas'"),
    (["--size", "7"], "width must be an integer in 8..8192, got 7"),
    (["--cfg", "nan"], "CFG scale must be a finite number"),
    (["--steps", "5000"], "steps must be an integer in 1..1000"),
])
def test_a_bad_drawing_option_is_refused_before_the_model_loads(model, prompts, tmp_path, capsys, monkeypatch,
                                                                extra, message) -> None:
    """Before, a misspelt sampler, a bad schedule, size, CFG or step count loaded the model, made --out and started
    the progress bar, then failed at the first picture (an empty --out folder left, the bar on stderr)."""
    import sdlab.api

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(sdlab.api, "load", no_load)
    out = tmp_path / "eval"
    code = main(["eval", str(prompts), "--model", str(model), "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("sdlab: error:") and err.count("\n") == 1, err
    assert message in err and not out.exists()


def test_a_size_off_the_grid_is_warned_of_once_a_picture(model, prompts, tmp_path, capsys) -> None:
    """--size 36 draws 32 px pictures, each saying so (2 prompts x 2 seeds: 4 warnings); the early check of the
    drawing options (before the model loads) says it no more. Before: 5."""
    code = main(["eval", str(prompts), "--model", str(model), "--seeds", "2", "--steps", "1", "--size", "36",
                 "--no-progress", "--out", str(tmp_path / "eval")])
    err = capsys.readouterr().err
    assert code == 0, err
    assert err.count("size 36x36 is not a multiple of 8; using 32x32") == 4, err


def test_eval_shows_a_progress_bar_on_stderr(model, prompts, tmp_path, capsys) -> None:
    code = main(["eval", str(prompts), "--model", str(model), "--seeds", "2", "--steps", "1", "--out",
                 str(tmp_path / "eval")])
    captured = capsys.readouterr()
    assert code == 0
    assert "4/4" in captured.err and "image" in captured.err      # 2 prompts x 2 seeds, counted on stderr
    assert "4/4" not in captured.out
    code = main(["eval", str(prompts), "--model", str(model), "--seeds", "1", "--steps", "1", "--no-progress",
                 "--out", str(tmp_path / "quiet")])
    assert code == 0 and "image" not in capsys.readouterr().err


def test_eval_help_states_the_prompt_grammar(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "grammar" in text and "read_prompt" in text
    assert "background" in text and "triangle" in text and "ignored" in text


def test_eval_with_a_lora_draws_the_merged_model(model, prompts, tmp_path, capsys) -> None:
    """`--lora FILE[:WEIGHT]` evaluates the model with a LoRA merged (a few-step adapter, a style)."""
    import numpy as np
    import torch

    from sdlab.checkpoints.load import load_bundle
    from sdlab.train.lora import LoRANetwork

    bundle = load_bundle(model)
    network = LoRANetwork.for_unet(bundle.unet, 4, convs=True)
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            if "lora_up" in name:
                parameter.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    lora = network.save(tmp_path / "adapter.safetensors", bundle.family)
    grids = {}
    for name, extra in (("plain", []), ("lora", ["--lora", f"{lora}:0.8"])):
        out = tmp_path / name
        args = ["eval", str(prompts), "--model", str(model), "--seeds", "1", "--steps", "2", "--out", str(out)]
        assert main([*args, *extra]) == 0
        with Image.open(out / "grid.png") as grid:
            grids[name] = np.asarray(grid.convert("RGB"), dtype=np.int16)
    assert np.abs(grids["plain"] - grids["lora"]).max() > 10
    capsys.readouterr()
    code = main(["eval", str(prompts), "--model", str(model), "--lora", str(tmp_path / "none.safetensors"),
                 "--out", str(tmp_path / "missing")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("sdlab: error:"), err
    assert not (tmp_path / "missing" / "report.json").exists()


def test_eval_preset_draws_at_the_preset_s_settings(model, prompts, tmp_path, capsys) -> None:
    """`--preset lcm` scores the pictures `--sampler LCM --schedule trailing --steps 4 --cfg 1` draws (an
    intermediate LCM-LoRA checkpoint is scored at the settings it is trained for, as txt2img's --preset);
    an unknown name is refused before the model loads."""
    import numpy as np

    grids = {}
    for name, extra in (("preset", ["--preset", "lcm"]),
                        ("given", ["--sampler", "LCM", "--schedule", "trailing", "--steps", "4", "--cfg", "1"]),
                        ("default", ["--steps", "4"])):
        out = tmp_path / name
        assert main(["eval", str(prompts), "--model", str(model), "--seeds", "1", "--limit", "1", "--no-progress",
                     "--out", str(out), *extra]) == 0
        with Image.open(out / "grid.png") as grid:
            grids[name] = np.asarray(grid.convert("RGB"), dtype=np.int16)
    assert np.array_equal(grids["preset"], grids["given"]) and not np.array_equal(grids["preset"], grids["default"])
    capsys.readouterr()
    code = main(["eval", str(prompts), "--model", str(model), "--preset", "fast", "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "unknown preset 'fast'" in err
    assert not (tmp_path / "bad").exists()


def test_cfg_scale_is_evals_cfg_as_txt2imgs(tmp_path) -> None:
    """`sdlab eval --cfg-scale C` as `sdlab txt2img --cfg-scale C` (before: 'sdlab eval has no --cfg-scale option')."""
    from sdlab.cli import build_parser

    args = build_parser().parse_args(["eval", "p.txt", "--out", str(tmp_path), "--cfg-scale", "3"])
    assert args.cfg == 3.0


def test_the_summary_tables_columns_line_up_past_long_metric_names() -> None:
    """A metric name longer than the first column's default (the report's 'template phrasing/background', 28
    characters) widens the column: every row's accuracy ends where the header's does."""
    from sdlab.cli.evaluate import format_summary

    names = ("any/shape", "template phrasing/background", "background=black")
    summary = {"accuracy": dict.fromkeys(names, 0.5), "counts": dict.fromkeys(names, 2),
               "targets": {"any/shape": {"target": 0.85, "accuracy": 0.5, "met": False}}, "diversity": 0.25}
    lines = format_summary(summary).splitlines()
    end = lines[0].index("accuracy") + len("accuracy")
    assert [line[end - 5:end] for line in lines[1:]] == ["0.500"] * 3 + ["0.250"], lines
