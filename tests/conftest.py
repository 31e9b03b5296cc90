"""Shared pytest set-up: the opt-in marker for full-size models, a fixed thread count, a private hash cache."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    # File hashes are cached per user (sdlab.utils.file_hashes); tests keep theirs in a folder of their own,
    # shared by the xdist workers and the servers they start.
    # The process that makes the folder removes it when the run ends.
    if "SDLAB_CACHE_DIR" not in os.environ:
        os.environ["SDLAB_CACHE_DIR"] = config._sdlab_test_cache = tempfile.mkdtemp(prefix="sdlab-test-cache-")
    # Under pytest-xdist each worker gets one thread: the tiny test models gain nothing from more, and
    # oversubscribed cores make every small op wait.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


def pytest_unconfigure(config: pytest.Config) -> None:
    folder = getattr(config, "_sdlab_test_cache", None)
    if folder:
        shutil.rmtree(folder, ignore_errors=True)
        del os.environ["SDLAB_CACHE_DIR"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="also run full-size model tests (minutes, GBs of RAM)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip_slow = pytest.mark.skip(reason="full-size model test; opt in with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(autouse=True)
def _deterministic_torch(monkeypatch):
    """Every test starts from the same global RNG state, so failures reproduce; and commands run in a test
    keep the test's thread count instead of choosing one from the machine's load at each start (two runs
    that should draw the same pixels would round differently with different counts). tests/test_threads.py
    removes the pin where it tests that choice."""
    torch.manual_seed(0)
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))
    yield


@pytest.fixture
def one_thread():
    """One torch thread for a test (``pytestmark = pytest.mark.usefixtures("one_thread")``): tiny models are
    overhead-bound, a shared 2-core runner is not oversubscribed, and float reductions run in the same order
    on every machine, so measured numbers reproduce."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def kernel():
    """sdlab's built CPU kernels (`sdlab.models.cpu_kernels`); their test files skip CPUs without AVX512-BF16."""
    from sdlab.models import cpu_kernels

    module = cpu_kernels.extension()
    assert module is not None, "the kernels did not build (a C++ compiler and ninja are needed)"
    return module
