"""Prompts on the command line must be UTF-8 text, as every file sdlab records them in is: a byte that is not
(a Latin-1 "é" from a script, `"$(cat latin1.txt)"`) reaches Python as a lone surrogate, and is one
`sdlab: error:` line naming the argument, exit status 2, while the arguments are parsed, before any model
loads. `sdlab train`'s free text (preview prompts, the embedding's word and its start text) too, from the
command line or a config file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli_helpers import run
from sdlab.cli.errors import UserError, utf8_text

LATIN1 = os.fsdecode(b"caf\xe9 au lait")        # what Python makes of that argv byte: "caf\udce9 au lait"
ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["train", "--model", "m.safetensors", "--data-dir", "data", "--max-steps", "1"]


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    import sdlab.api
    import sdlab.train.cli

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(sdlab.api, "load", load)
    monkeypatch.setattr(sdlab.train.cli, "load_bundle", load)


def test_utf8_text_keeps_any_unicode_text_and_names_the_byte_that_is_not() -> None:
    assert utf8_text("the prompt")("café 🍎 (red:1.2)") == "café 🍎 (red:1.2)"
    with pytest.raises(UserError, match="the prompt is not UTF-8 text: the byte 0xE9 at character 4; convert"):
        utf8_text("the prompt")(LATIN1)
    with pytest.raises(UserError, match="--negative is not UTF-8 text: the character U\\+D800 at character 1"):
        utf8_text("--negative")("\ud800")


@pytest.mark.parametrize(("args", "named"), [
    (["txt2img", LATIN1], "the prompt"),
    (["txt2img", "a cat", "--negative", LATIN1], "--negative"),
    (["img2img", LATIN1, "--init", "photo.png"], "the prompt"),
    (["inpaint", "a cat", "--negative", LATIN1, "--init", "photo.png", "--outpaint", "8,8,8,8"], "--negative"),
    (["grid", LATIN1, "--x", "steps=1,2", "--out", "g.png"], "the prompt"),
    (["grid", "a cat", "--negative", LATIN1, "--x", "steps=1,2", "--out", "g.png"], "--negative"),
    (["grid", "a cat", "--y", f"prompt_sr={LATIN1}", "--x", "steps=1,2", "--out", "g.png"], "--y"),
    ([*TRAIN, "--sample-every", "1", "--sample-prompts", "a cat", "--sample-prompts", LATIN1], "--sample-prompts"),
    ([*TRAIN, "--task", "embedding", "--embedding-word", LATIN1], "--embedding-word"),
    ([*TRAIN, "--task", "embedding", "--embedding-word", "<cat>", "--embedding-init", LATIN1], "--embedding-init"),
])
def test_a_prompt_that_is_not_utf8_is_one_error_line_before_the_model_loads(tmp_path, capsys, monkeypatch, no_model,
                                                                           args, named) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = run(args, capsys)
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert err.startswith(f"sdlab: error: {named} is not UTF-8 text: the byte 0xE9 at character "), err
    assert list(tmp_path.iterdir()) == []


def test_a_train_config_file_holding_a_lone_surrogate_is_one_error_line(tmp_path, capsys, monkeypatch,
                                                                        no_model) -> None:
    monkeypatch.chdir(tmp_path)
    Path("run.json").write_text(json.dumps({"sample_every": 1, "sample_prompts": ["a cat", LATIN1]}))   # "\udce9"
    code, out, err = run([*TRAIN, "--config", "run.json"], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert err.startswith("sdlab: error: --sample-prompts is not UTF-8 text: the byte 0xE9 at character 4"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


def test_the_command_refuses_a_latin1_argv_byte(tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run([sys.executable, "-m", "sdlab", "txt2img", b"caf\xe9 au lait", "--out", str(tmp_path)],
                            capture_output=True, env=env, timeout=300)
    assert result.returncode == 2 and result.stdout == b"", result
    assert result.stderr == b"sdlab: error: the prompt is not UTF-8 text: the byte 0xE9 at character 4; convert it " \
                            b"to UTF-8 first (e.g. iconv -f latin1 -t utf-8)\n"
    assert list(tmp_path.iterdir()) == []
