"""A bad option value, choice or name is one `sdlab: error:` line naming the command whose --help lists the
options (exit status 2), not argparse's usage block; `--help` itself is unchanged."""

from __future__ import annotations

import pytest
from PIL import Image

from cli_helpers import run
from sdlab.cli import main


@pytest.mark.parametrize("args, message", [
    (["txt2img", "a", "--seed", "abc"], "argument --seed: invalid int value: 'abc' (sdlab txt2img --help"),
    (["img2img", "a", "--resize-mode", "zoom"], "argument --resize-mode: invalid choice: 'zoom'"),
    (["inpaint", "a", "--masked-content", "foo"], "argument --masked-content: invalid choice: 'foo'"),
    (["new-model", "--family", "sd3", "x.safetensors"], "invalid choice: 'sd3' (choose from 'sd1'"),
    (["txt2img", "a", "--stepz", "3"], "unrecognized arguments: --stepz 3 (sdlab txt2img --help lists the options)"),
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
