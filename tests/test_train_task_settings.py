"""Which settings apply to which `--task` (`sdlab.train.config.TASK_SETTINGS`): a setting the chosen task would
ignore is one ``sdlab: error:`` line and exit status 2 before anything is loaded or written (the model and data
paths below do not exist, so any later check would name them instead); the settings a task reads work.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import cli_args

from sdlab.train.cli import TASK_MODULES, main
from sdlab.train.config import TASK_SETTINGS, TrainConfig
from sdlab.train.errors import TrainError


def _refused(tmp_path, capsys, *extra: str) -> str:
    out = tmp_path / "run"
    code = main(cli_args(out, tmp_path / "missing.safetensors", tmp_path / "no-data", "--max-steps", "1", *extra)[2:])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("sdlab: error: "), err
    assert not out.exists()
    return err[0]


@pytest.mark.parametrize("task, extra, given", [
    ("vae", ("--lora-rank", "4"), "--lora-rank 4"),
    ("vae", ("--min-snr-gamma", "5"), "--min-snr-gamma 5.0"),
    ("vae", ("--train-text-encoder",), "--train-text-encoder"),
    ("vae", ("--gradient-checkpointing",), "--gradient-checkpointing"),
    ("embedding", ("--embedding-word", "zq", "--train-text-encoder"), "--train-text-encoder"),
    ("embedding", ("--embedding-word", "zq", "--vae-decoder-only"), "--vae-decoder-only"),
    ("unet", ("--embedding-word", "zq"), "--embedding-word zq"),
    ("unet", ("--vae-decoder-only",), "--vae-decoder-only"),
    ("unet", ("--lcd-loss", "huber"), "--lcd-loss huber"),
    ("text", ("--save-dtype", "fp16"), "--save-dtype fp16"),
    ("text", ("--sample-prompts", "a cat"), "--sample-prompts 'a cat'"),
    ("lcd", ("--caption-dropout", "0.5"), "--caption-dropout 0.5"),
])
def test_a_setting_the_task_ignores_is_refused(tmp_path, capsys, task, extra, given):
    line = _refused(tmp_path, capsys, "--task", task, *extra)
    assert f"--task {task} " in line and f"; {given} does not apply to it" in line, line


@pytest.mark.parametrize("task", ["vae", "text"])
def test_cached_latents_are_refused_for_tasks_that_train_on_images(tmp_path, capsys, task):
    line = _refused(tmp_path, capsys, "--task", task, "--cache-latents")
    assert "on images (not on latents)" in line and "--cache-latents does not apply to it" in line, line
    assert "--task unet / embedding / lcd" in line


def test_values_that_ask_for_nothing_are_accepted():
    """The defaults, and no caption dropout for tasks that never drop captions (what they do anyway)."""
    for task in TASK_SETTINGS:
        TrainConfig(task=task, embedding_word="zq" if task == "embedding" else None, caption_dropout=0.0)
    with pytest.raises(TrainError, match="--caption-dropout 0.2 does not apply"):
        TrainConfig(task="vae", caption_dropout=0.2)


def test_the_table_names_every_task_and_only_real_settings():
    assert set(TASK_SETTINGS) == set(TASK_MODULES)
    known = set(TrainConfig.__dataclass_fields__)
    for _, reads in TASK_SETTINGS.values():
        assert reads <= known


def test_save_dtype_shapes_the_vae_and_embedding_files(tmp_path):
    """--save-dtype, which the VAE and embedding tasks accept, is the dtype of the file they deliver."""
    from bundle_fixtures import tiny_bundle

    from sdlab.train import embedding_task, vae_task

    bundle = tiny_bundle("sd1", 0)
    vae = vae_task.build_task(TrainConfig(task="vae", save_dtype="fp16"), bundle)
    vae.save_weights(tmp_path / "vae.safetensors", ema=False)
    assert {t.dtype for t in load_file(str(tmp_path / "vae.safetensors")).values()} == {torch.float16}
    word = embedding_task.build_task(TrainConfig(task="embedding", embedding_word="zq", save_dtype="bf16"), bundle)
    word.save_weights(tmp_path / "zq.safetensors", ema=False)
    assert {t.dtype for t in load_file(str(tmp_path / "zq.safetensors")).values()} == {torch.bfloat16}


@pytest.mark.parametrize("extra, given", [(("--lora-alpha", "8"), "--lora-alpha"), (("--lora-conv",), "--lora-conv"),
                                          (("--lora-text-encoder",), "--lora-text-encoder")])
def test_lora_settings_without_a_lora_rank_are_refused(tmp_path, capsys, extra, given):
    assert f"{given} shapes a LoRA, but no LoRA is trained" in _refused(tmp_path, capsys, "--task", "unet", *extra)
