"""The `sdlab` command tunes glibc's malloc for its own process (`sdlab.utils.allocator`): freed
activation-sized blocks are reused instead of being handed back to the kernel and faulted in again."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

import sdlab.cli
from sdlab.utils import allocator

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# three 12 MiB blocks taken, touched and freed three times; prints the page faults of the third round
CYCLES = textwrap.dedent("""
    import ctypes, resource, sys
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
    if sys.argv[1] == "tuned":
        from sdlab.utils import allocator
        assert allocator.tune()
    size = 12 * 2**20

    def cycle():
        blocks = [libc.malloc(size) for _ in range(3)]
        for block in blocks:
            ctypes.memset(block, 1, size)
        for block in reversed(blocks):
            libc.free(block)

    cycle()
    cycle()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    cycle()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt")
def test_tuned_process_reuses_freed_blocks_without_page_faults():
    faults = {mode: int(subprocess.run([sys.executable, "-c", CYCLES, mode], capture_output=True, text=True,
                                       check=True).stdout) for mode in ("plain", "tuned")}
    assert faults["plain"] > 3000      # 36 MiB handed back and faulted in again (9,216 pages at most)
    assert faults["tuned"] < 100


def test_the_command_tunes_its_process_and_a_library_import_does_not(monkeypatch, tmp_path):
    imported = subprocess.run([sys.executable, "-c", "import sdlab, sdlab.api, sdlab.utils.allocator as a; "
                               "print(a.tune.cache_info().currsize)"], capture_output=True, text=True, check=True)
    assert imported.stdout.strip() == "0"   # importing (and sdlab.api) left malloc alone
    calls = []
    monkeypatch.setattr(allocator, "tune", lambda: calls.append("tuned"))
    assert sdlab.cli.main(["inspect", str(tmp_path / "missing.safetensors")]) == 2   # a user error, after tuning
    assert calls == ["tuned"]


# 64 blocks of 4 MiB (heap blocks once tuned) taken, touched and freed; prints the RSS (KiB) then, and after trim()
HELD_AFTER_FREE = textwrap.dedent("""
    import ctypes
    from sdlab.utils import allocator
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
    assert allocator.tune()

    def rss():
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS:"))

    blocks = [libc.malloc(4 * 2**20) for _ in range(64)]
    for block in blocks:
        ctypes.memset(block, 1, 4 * 2**20)
    for block in blocks:
        libc.free(block)
    held = rss()
    assert allocator.trim()
    print(held, rss())
""")


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc_trim")
def test_trim_gives_the_kept_free_heap_back():
    held, trimmed = map(int, subprocess.run([sys.executable, "-c", HELD_AFTER_FREE], capture_output=True, text=True,
                                            check=True).stdout.split())
    assert held - trimmed > 200 * 1024          # of the 256 MiB freed, kept by the tuned heap until trimmed


def test_the_server_trims_once_a_model_is_let_go(monkeypatch):
    from sdlab.api import shipped_model_path
    from sdlab.server import worker
    from sdlab.server.registry import ModelRegistry

    calls = []
    monkeypatch.setattr(worker, "trim", lambda: calls.append("trim"))
    host = worker.ModelHost(ModelRegistry(shipped_model_path(), None), "cpu")
    host.unload()
    assert calls == ["trim"]
