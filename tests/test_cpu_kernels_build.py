"""Building sdlab's CPU kernels (`sdlab.models.cpu_kernels`) where it cannot be done: no compiler, a failing
build. One line says why; later runs with the same build inputs do not build again, and each says in one
line that the kernels are off, why, and which file remembers it. A new compiler, ninja or Python's headers,
or a day, and the build is tried again."""

from __future__ import annotations

import logging
import os
import sysconfig

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


def _next_process(caplog, monkeypatch) -> None:
    caplog.clear()
    monkeypatch.setattr(cpu_kernels, "_state", {})


def _marker() -> str:
    return str(cpu_kernels.build_folder() / cpu_kernels.name() / cpu_kernels.FAILED_MARKER)


def _failing_load(calls: list[str]):
    def load(**kwargs):
        calls.append(kwargs["name"])
        logging.getLogger(cpp_extension.__name__).warning("!! WARNING !!\n\nYour compiler (c++) is not compatible")
        raise RuntimeError("Error building extension\n[1/5] c++ ...\ncpu_norm.cpp:3:10: error: 'x' was not "
                           "declared\nninja: build stopped: subcommand failed.")

    return load


def test_without_a_compiler_nothing_is_built_until_one_is_installed(fresh, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    calls: list[str] = []
    monkeypatch.setattr(cpp_extension, "load", _failing_load(calls))
    assert cpu_kernels.extension() is None and calls == []          # torch is never asked
    [line] = _warnings(fresh)
    assert "no C++ compiler" in line and "'no-such-compiler-here'" in line and "install g++" in line
    _next_process(fresh, monkeypatch)                                # the next run: one line, from the marker
    assert cpu_kernels.extension() is None and calls == []
    [line] = _warnings(fresh)
    assert "no C++ compiler" in line and f"remembered in {_marker()}" in line
    monkeypatch.setenv("CXX", "sh")                                  # g++ installed: built now
    _next_process(fresh, monkeypatch)
    assert cpu_kernels.extension() is None and calls == [cpu_kernels.name()]


def test_a_failed_build_is_said_in_one_line_and_not_tried_again_with_the_same_tools(fresh, monkeypatch):
    calls: list[str] = []
    monkeypatch.setenv("CXX", "sh")                                  # a program that is on PATH
    monkeypatch.setattr(cpp_extension, "load", _failing_load(calls))
    assert cpu_kernels.extension() is None
    lines = _warnings(fresh)
    assert len(lines) == 2 and "building" in lines[0] and "!! WARNING" not in "".join(lines)   # no torch banner
    assert "cpu_norm.cpp:3:10: error: 'x' was not declared" in lines[1] and _marker() in lines[1]
    _next_process(fresh, monkeypatch)
    assert cpu_kernels.extension() is None and calls == [cpu_kernels.name()]
    [line] = _warnings(fresh)
    assert "could not be built" in line and "'x' was not declared" in line and f"remembered in {_marker()}" in line
    monkeypatch.setenv("CXX", "bash")                                # another compiler: tried again
    _next_process(fresh, monkeypatch)
    assert cpu_kernels.extension() is None and len(calls) == 2


def test_a_failed_build_is_tried_again_once_pythons_headers_appear_or_after_a_day(fresh, monkeypatch, tmp_path):
    """A Python without its headers (python3-dev) fails to build; installing them changes no compiler or ninja
    path, and neither does a fix nothing here can see (OpenMP installed, disk space freed)."""
    calls: list[str] = []
    monkeypatch.setenv("CXX", "sh")
    monkeypatch.setattr(cpp_extension, "load", _failing_load(calls))
    include = tmp_path / "include"
    include.mkdir()
    paths = sysconfig.get_paths()
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {**paths, "include": str(include)})
    assert cpu_kernels.extension() is None and len(calls) == 1
    _next_process(fresh, monkeypatch)
    assert cpu_kernels.extension() is None and len(calls) == 1
    (include / "Python.h").write_text("")                            # python3-dev installed
    _next_process(fresh, monkeypatch)
    assert cpu_kernels.extension() is None and len(calls) == 2
    _next_process(fresh, monkeypatch)
    assert cpu_kernels.extension() is None and len(calls) == 2
    day_ago = os.path.getmtime(_marker()) - cpu_kernels.RETRY_AFTER
    os.utime(_marker(), (day_ago, day_ago))
    _next_process(fresh, monkeypatch)
    assert cpu_kernels.extension() is None and len(calls) == 3
