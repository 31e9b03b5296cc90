"""A bad option value, choice or name is one `sdlab: error:` line naming the command whose --help lists the
options (exit status 2), not argparse's usage block; `--help` itself is unchanged."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cli_helpers import pixels, run
from sdlab.cli import main


@pytest.mark.parametrize("args, message", [
    (["txt2img", "a", "--seed", "abc"], "argument --seed: invalid int value: 'abc' (sdlab txt2img --help"),
    (["img2img", "a", "--resize-mode", "zoom"], "argument --resize-mode: invalid choice: 'zoom'"),
    (["inpaint", "a", "--masked-content", "foo"], "argument --masked-content: invalid choice: 'foo'"),
    (["new-model", "--family", "sd3", "x.safetensors"], "invalid choice: 'sd3' (choose from 'sd1'"),
    (["txt2img", "a", "--stepz", "3"],
     "unrecognized arguments: --stepz 3; did you mean --steps? (sdlab txt2img --help lists the options)"),
    (["grid", "a", "--x"], "argument --x: expected one argument (sdlab grid --help"),
    (["txt2imgg", "a"], "argument COMMAND: invalid choice: 'txt2imgg'"),
])
def test_a_bad_option_is_one_error_line(capsys, args, message):
    code, out, err = run(args, capsys)
    assert code == 2 and out == "" and len(err.splitlines()) == 1, err
    assert err.startswith("sdlab: error: ") and message in err and "usage:" not in err, err


def test_a_negative_outpaint_is_read_as_its_value(tmp_path, capsys):
    """`--outpaint -8,0,0,0` is the option's value (then refused for its negative count), not an unknown option."""
    Image.new("RGB", (64, 64)).save(tmp_path / "in.png")
    code, _, err = run(["inpaint", "a", "--init", str(tmp_path / "in.png"), "--outpaint", "-8,0,0,0",
                        "--out", str(tmp_path / "o.png")], capsys)
    assert code == 2 and "--outpaint wants four pixel counts" in err and "got '-8,0,0,0'" in err, err
    assert "expected one argument" not in err and not (tmp_path / "o.png").exists()


def test_help_still_prints_the_usage(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["txt2img", "--help"])
    assert stop.value.code == 0 and capsys.readouterr().out.startswith("usage: sdlab txt2img")


@pytest.mark.parametrize("args, message", [
    (["img2img", "a", "--init", "in.png", "--mask", "m.png"],
     "sdlab img2img has no --mask option (an option of sdlab inpaint)"),
    (["eval", "prompts.txt", "--out", "o", "--seed", "7"], "sdlab eval has no --seed option (an option of sdlab txt2img"),
    (["img2img", "a", "--init", "in.png", "--sd-upscale", "2", "--tile", "512"],
     "sdlab img2img has no --tile option (an option of sdlab upscale)"),
    (["txt2img", "a", "--init=in.png"], "sdlab txt2img has no --init option (an option of sdlab img2img, sdlab inpaint"),
])
def test_another_commands_option_is_refused_not_read_as_an_abbreviation(tmp_path, capsys, args, message):
    """An option of another subcommand is not argparse's abbreviation of a longer one it begins (`--mask` of
    `--mask-weight`, `--seed` of eval's `--seeds`, `--tile` of `--tile-overlap`, `--init` of `--init-noise`)."""
    code, out, err = run(args, capsys)
    assert code == 2 and out == "" and len(err.splitlines()) == 1, err
    assert err.startswith("sdlab: error: ") and message in err and "--help lists the options" in err, err
    assert "invalid" not in err and "could match" not in err, err


@pytest.mark.parametrize("args, meant", [
    (["train", "--out", "runs/x"], "sdlab train has no --out option (an option of sdlab txt2img"),
    (["train", "--batch", "4"], "sdlab train has no --batch option (an option of sdlab txt2img"),
    (["serve", "--out", "o"], "sdlab serve has no --out option (an option of sdlab txt2img"),
    (["serve", "--style", "s.csv"], "sdlab serve has no --style option (an option of sdlab txt2img"),
])
def test_a_refused_shortening_points_at_the_option_meant(capsys, args, meant):
    """A shortening of this command's option that is another command's option is refused (as f2fe386 made it)
    naming both: `sdlab train --out D` names txt2img's --out and train's --output-dir."""
    option = {"--out": "--output-dir", "--batch": "--batch-size", "--style": "--styles-file"}[args[1]]
    code, out, err = run(args, capsys)
    assert code == 2 and out == "" and len(err.splitlines()) == 1, err
    assert meant in err and f"did you mean {option}? sdlab {args[0]} --help lists the options" in err, err


def test_the_size_help_speaks_of_init_only_where_the_command_has_it() -> None:
    """--width / --height: an unset size is the init picture's in img2img, inpaint and a grid with --init;
    txt2img has no --init, so its help does not speak of one."""
    from sdlab.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    for name in ("txt2img", "img2img", "inpaint", "grid"):
        texts = {action.dest: action.help for action in commands[name]._actions}
        for dest in ("width", "height"):
            assert ("--init" in texts[dest]) == (name != "txt2img"), (name, texts[dest])


def test_an_abbreviation_of_the_commands_own_option_still_reads(capsys):
    """`--hr-scal` is --hr-scale: refused (for its value) as that option, not as another command's."""
    code, _, err = run(["txt2img", "a", "--hr-scal", "0.5"], capsys)
    assert code == 2 and "hr_scale must be at least 1" in err, err


def test_negative_prompt_is_the_negative_not_an_abbreviation_of_the_second_one(tmp_path, capsys):
    """`--negative-prompt` (diffusers' and A1111's negative_prompt) is --negative. Before, argparse read it as the
    abbreviation of --negative-prompt-2: on SDXL only bigG's negative was set (CLIP-L's left empty), on a model with
    one text encoder it was refused as a second prompt."""
    from sdlab.cli import build_parser
    from sdlab.pipeline.png_info import parse_parameters, read_parameters

    common = ["a cat", "--seed", "3", "--steps", "2", "--no-progress"]
    assert run(["txt2img", *common, "--negative", "ugly", "--out", str(tmp_path / "a.png")], capsys)[0] == 0
    code, _, err = run(["txt2img", *common, "--negative-prompt", "ugly", "--out", str(tmp_path / "b.png")], capsys)
    assert code == 0, err
    recorded = parse_parameters(read_parameters(tmp_path / "b.png"))
    assert recorded["Negative prompt"] == "ugly" and "Negative prompt 2" not in recorded
    assert np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "b.png"))
    grid = build_parser().parse_args(["grid", "a", "--x", "steps=1,2", "--out", "g.png", "--negative-prompt", "n"])
    assert grid.negative == "n" and grid.negative_prompt_2 is None


@pytest.mark.parametrize("command, option, dest", [
    ("txt2img", "--negative", "negative"), ("txt2img", "--negative-prompt", "negative"),
    ("img2img", "--prompt-2", "prompt_2"), ("inpaint", "--negative-prompt-2", "negative_prompt_2"),
    ("txt2img", "--hr-prompt", "hr_prompt"), ("txt2img", "--hr-negative-prompt", "hr_negative_prompt"),
    ("grid", "--negative", "negative"),
])
@pytest.mark.parametrize("text", ["-blurry", "--blurry", "-1", "-"])
def test_a_text_option_takes_a_value_that_starts_with_a_minus(command, option, dest, text):
    """`--negative -blurry` is the negative "-blurry", as `--negative=-blurry` is (getopt gives an option the word
    after it); before, argparse read -blurry as an option and refused --negative for its missing value."""
    from sdlab.cli import build_parser

    common = {"grid": ["--x", "steps=1,2", "--out", "g.png"], "img2img": ["--init", "i.png"],
              "inpaint": ["--init", "i.png"]}.get(command, [])
    args = build_parser().parse_args([command, "a cat", *common, option, text])
    assert getattr(args, dest) == text and args.prompt == "a cat"
    styles = build_parser().parse_args(["txt2img", "a", "--style", text, "--style", "-xl"]).style
    assert styles == [text, "-xl"]


@pytest.mark.parametrize("command, common", [("txt2img", []), ("img2img", ["--init", "i.png"]),
                                             ("grid", ["--x", "steps=1,2", "--out", "g.png"])])
def test_a_prompt_that_starts_with_a_minus_is_the_prompt(command, common):
    from sdlab.cli import build_parser

    assert build_parser().parse_args([command, "-blurry", *common, "--negative", "-ugly"]).prompt == "-blurry"
    assert build_parser().parse_args([command, *common, "-blurry"]).prompt == "-blurry"


@pytest.mark.parametrize("args, message", [
    (["txt2img", "a", "--negative", "--seed", "3"],
     "--negative has no text: the word after it, --seed, is an option of sdlab txt2img; give the text after "
     "--negative, or write --negative=--seed if that is the text"),
    (["txt2img", "a", "--negative", "--hr-scal", "2"], "--negative has no text: the word after it, --hr-scal, is an"),
    (["grid", "a", "--x", "steps=1,2", "--negative", "--out", "g.png"], "write --negative=--out if that is the text"),
    (["txt2img", "a", "--negative", "-s", "3"],
     "--negative -s: sdlab txt2img has no -s option (its options have long names), and --negative would take -s as "
     "its text; give the option's long name, or write --negative=-s for that text"),
    (["txt2img", "a", "--negative-prompt", "-W"], "sdlab txt2img has no -W option"),
    (["txt2img", "-s", "3", "a cat"], "sdlab txt2img has no -s option (its options have long names; sdlab txt2img"),
    (["txt2img", "a cat", "-n", "ugly"], "sdlab txt2img has no -n option"),
    (["img2img", "a", "--init", "i.png", "--prompt-2", "-n", "x"], "or write --prompt-2=-n for that text"),
    (["txt2img", "a", "--negative", "--noise"],
     "--noise looks like a mistyped --s-noise; give the option, or write --negative=--noise for that text"),
    (["txt2img", "a", "--negative", "--init", "i.png"], "sdlab txt2img has no --init option (an option of"),
    (["txt2img", "a", "-steps", "5"], "sdlab txt2img has no -steps option; did you mean --steps?"),
    (["txt2img", "--prompts-file", "p.txt", "-tiling"], "sdlab txt2img has no -tiling option; did you mean --tiling?"),
    (["txt2img", "a", "-vv"], "-vv is an option of sdlab, not of sdlab txt2img: give it before the command"),
    (["txt2img", "--debug"], "--debug is an option of sdlab"),
    (["txt2img", "a", "--stepz", "3"], "unrecognized arguments: --stepz 3"),
    (["txt2img", "a", "--stpes", "3"], "unrecognized arguments: --stpes 3; did you mean --steps? (sdlab txt2img"),
    (["upscale", "in.png", "--out", "o.png", "--tile-overlpa", "8"], "--tile-overlpa 8; did you mean --tile-overlap?"),
    (["txt2img", "a", "--negative", "-steps", "5"],
     "--negative -steps: -steps looks like a mistyped --steps; give the option, or write --negative=-steps"),
    (["txt2img", "a", "--negative", "--tilling"], "--tilling looks like a mistyped --tiling"),
    (["txt2img", "a", "--negative", "--stpes", "5"], "--stpes looks like a mistyped --steps"),
    (["grid", "a", "--x", "steps=1,2", "--negative", "--widht", "64"], "--widht looks like a mistyped --width"),
    (["img2img", "a", "--init", "i.png", "--prompt-2", "-seed", "3"], "-seed looks like a mistyped --seed"),
])
def test_a_word_that_names_an_option_is_not_read_as_text(capsys, args, message):
    """The words after a text option, or in the prompt's place, that name an option (this command's, a shortening
    of one, another command's, sdlab's own, or --steps with one minus) are still refused as options; after a text
    option, so is a word that looks like a mistyped option (`--tilling`), where it was taken silently as the text."""
    code, out, err = run(args, capsys)
    assert code == 2 and out == "" and len(err.splitlines()) == 1, err
    assert err.startswith("sdlab: error: ") and message in err, err


@pytest.mark.parametrize("device", ["CPU", "Cpu", "cpu:0", "CPU:0"])
def test_the_device_is_read_in_any_case(tmp_path, capsys, device):
    """`--device CPU` is torch's cpu (as cuda, cuda:1, mps in any case): before, torch refused 'CPU'."""
    from sdlab.cli import build_parser

    Image.new("RGB", (16, 16), "red").save(tmp_path / "in.png")
    code, _, err = run(["upscale", str(tmp_path / "in.png"), "--scale", "2", "--device", device,
                        "--out", str(tmp_path / "o.png")], capsys)
    assert code == 0 and Image.open(tmp_path / "o.png").size == (32, 32), err
    for command in (["txt2img", "a"], ["img2img", "a", "--init", "i.png"], ["inpaint", "a", "--init", "i.png"],
                    ["serve"], ["grid", "a", "--x", "steps=1,2", "--out", "g.png"]):
        assert build_parser().parse_args([*command, "--device", "Cuda:1"]).device == "cuda:1"


def test_a_device_torch_does_not_know_is_still_one_error_line(tmp_path, capsys):
    Image.new("RGB", (16, 16), "red").save(tmp_path / "in.png")
    code, out, err = run(["upscale", str(tmp_path / "in.png"), "--scale", "2", "--device", "GPU",
                          "--out", str(tmp_path / "o.png")], capsys)
    assert code == 2 and out == "" and len(err.splitlines()) == 1 and "unknown device 'gpu'" in err, err
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("args, dest, value", [
    (["inspect", "--family", "SDXL"], "family", "sdxl"), (["inspect", "--prediction", "V"], "prediction", "v"),
    (["new-model", "x.safetensors", "--family", "SD1", "--dtype", "FP32"], "dtype", "fp32"),
    (["txt2img", "a", "--dtype", "BF16"], "dtype", "bf16"),
    (["img2img", "a", "--init", "i.png", "--resize-mode", "Crop"], "resize_mode", "crop"),
    (["txt2img", "a", "--hr-convention", "ComfyUI"], "hr_convention", "comfyui"),
    (["merge", "a.safetensors", "--out", "o", "--format", "CKPT"], "format", "ckpt"),
])
def test_a_choice_is_read_in_any_case(args, dest, value):
    """Lower-case choices read in any case, as --sampler, --schedule and txt2img's --family: before, `sdlab inspect
    --family SDXL` was an invalid choice while `sdlab txt2img --family SDXL` drew."""
    from sdlab.cli import build_parser

    assert getattr(build_parser().parse_args(args), dest) == value


def test_a_choice_that_is_none_is_still_refused_naming_the_choices(capsys):
    code, _, err = run(["new-model", "x.safetensors", "--dtype", "FP17"], capsys)
    assert code == 2 and "argument --dtype: invalid choice: 'fp17' (choose from 'fp16', 'bf16', 'fp32')" in err, err


@pytest.mark.parametrize("flag, given, dest, value", [
    ("--unipc-variant", "BH2", "unipc_variant", "bh2"), ("--init-noise", "ComfyUI", "init_noise", "comfyui"),
    ("--control-mode", "Balanced", "control_mode", ["balanced"]), ("--control-resize", "Crop", "control_resize", ["crop"]),
    ("--control-module", "Canny", "control_module", ["canny"]),
])
def test_a_settings_word_is_read_in_any_case(flag, given, dest, value):
    """The words of --unipc-variant, --init-noise, --control-mode, --control-resize and --control-module (checked
    by the request, not argparse's choices) read in any case: before, 'BH2' was 'UniPC variant must be one of bh1,
    bh2', 'Canny' 'sdlab has no preprocessor'."""
    from sdlab.cli import build_parser

    assert getattr(build_parser().parse_args(["txt2img", "a", flag, given]), dest) == value
