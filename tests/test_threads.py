"""The CPU thread count a model gets when the user has not chosen one (`sdlab.utils.threads`)."""

from __future__ import annotations

import torch
from torch import nn

from cli_helpers import run
from sdlab.utils import threads


def test_small_models_get_one_thread_large_ones_the_default(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "SMALL_MODEL_PARAMETERS", 1000)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 6)
    assert threads.threads_for(nn.Linear(10, 10)) == 1                 # 110 parameters
    assert threads.threads_for(nn.Linear(100, 100)) == 6               # 10,100 parameters
    assert threads.threads_for(nn.Linear(10, 10), explicit=3) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert threads.threads_for(nn.Linear(10, 10)) == 6                 # the user's setting stands


def test_cli_sets_threads_and_checks_the_flag(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        code, _, err = run(["txt2img", "a red apple", "--steps", "2", "--no-progress", "--out", str(tmp_path / "a.png")],
                           capsys)
        assert code == 0, err
        assert torch.get_num_threads() == 1                             # the shipped model is small
        code, _, err = run(["txt2img", "a red apple", "--steps", "2", "--threads", "2", "--no-progress",
                            "--out", str(tmp_path / "b.png")], capsys)
        assert code == 0 and torch.get_num_threads() == 2
        code, _, err = run(["txt2img", "x", "--threads", "0", "--out", str(tmp_path / "c.png")], capsys)
        assert code == 2 and "--threads" in err and not (tmp_path / "c.png").exists()
    finally:
        torch.set_num_threads(before)
