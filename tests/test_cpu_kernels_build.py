"""Building sdlab's CPU kernels (`sdlab.models.cpu_kernels`) where it cannot be done: no compiler, a failing
build. One line says why, once; later runs with the same tools neither build again nor repeat it."""

from __future__ import annotations

import logging

import pytest
import torch.utils.cpp_extension as cpp_extension

from sdlab.models import cpu_kernels


@pytest.fixture
def fresh(monkeypatch, tmp_path, caplog):
    """No build in this process yet, an empty build folder, warnings captured."""
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    caplog.set_level(logging.INFO)
    return caplog


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_without_a_compiler_nothing_is_built_and_one_line_says_so_once(fresh, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: pytest.fail("no compiler: torch is never asked"))
    assert cpu_kernels.extension() is None
    [line] = _warnings(fresh)
    assert "no C++ compiler" in line and "'no-such-compiler-here'" in line and "install g++" in line
    fresh.clear()
    monkeypatch.setattr(cpu_kernels, "_state", {})                   # the next run: quiet
    assert cpu_kernels.extension() is None and _warnings(fresh) == []


def test_a_failed_build_is_said_in_one_line_and_not_tried_again_with_the_same_tools(fresh, monkeypatch):
    calls = []

    def failing_load(**kwargs):
        calls.append(kwargs["name"])
        logging.getLogger(cpp_extension.__name__).warning("!! WARNING !!\n\nYour compiler (c++) is not compatible")
        raise RuntimeError("Error building extension\n[1/5] c++ ...\ncpu_norm.cpp:3:10: error: 'x' was not "
                           "declared\nninja: build stopped: subcommand failed.")

    monkeypatch.setenv("CXX", "sh")                                  # a program that is on PATH
    monkeypatch.setattr(cpp_extension, "load", failing_load)
    assert cpu_kernels.extension() is None
    lines = _warnings(fresh)
    assert len(lines) == 2 and "building" in lines[0] and "!! WARNING" not in "".join(lines)   # no torch banner
    assert "cpu_norm.cpp:3:10: error: 'x' was not declared" in lines[1] and cpu_kernels.FAILED_MARKER in lines[1]
    fresh.clear()
    monkeypatch.setattr(cpu_kernels, "_state", {})
    assert cpu_kernels.extension() is None and calls == [cpu_kernels.name()] and _warnings(fresh) == []
    monkeypatch.setenv("CXX", "bash")                                # another compiler: tried again
    monkeypatch.setattr(cpu_kernels, "_state", {})
    assert cpu_kernels.extension() is None and len(calls) == 2
