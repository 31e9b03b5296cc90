"""The `sdlab` console script and `python -m sdlab`: `sdlab.cli.main` as a process, start to exit.

Two costs of a short process that the command line itself does not need to pay:

- Garbage collection of the import-time objects. `import torch` and sdlab's modules leave about a million
  objects that live as long as the process; Python's cyclic collector walks all of them at every full
  collection, three of which fall inside one `sdlab txt2img` with the shipped model (0.2 - 0.4 s here).
  The collector is off while the command line is imported, and those objects are then frozen
  (`gc.freeze`: kept out of every later collection); it runs as usual on everything the command creates.
- Interpreter teardown: Python's shutdown clears the modules one by one, and after `import torch` that
  takes about 0.5 s. Nothing is lost by skipping it (`os._exit`): every file sdlab writes is complete
  (renamed into place) before `main` returns, no sdlab code registers exit handlers, and the standard
  streams and logging are flushed first. While another thread still runs (a server's worker finishing its
  job) the exit is the ordinary one, which waits for it.

Ctrl-C outside the command itself (`main` reports it while the command runs, removing any half-written
file) ends the process the same way: one line, `sdlab: error: interrupted`, exit 130, no traceback. While
torch and the command line are imported (one to three seconds) and once `main` has returned, SIGINT ends
the process at once: nothing has been written yet, or everything has. No exception is raised inside an
import, where a C extension interrupted halfway cannot be imported again. A Ctrl-C while the arguments are
parsed, before `main`'s own handler, is caught here. A SIGINT the parent ignores (`nohup`, a background job
of a script) stays ignored.

This module imports nothing heavy itself, so that the collector is off before torch is imported, and it
imports `logging` and `threading` only once the SIGINT handler is in place. `sdlab.cli.main` stays an
ordinary function for callers in Python.
"""

from __future__ import annotations

import gc
import os
import signal
import sys

from sdlab.utils.interrupt import EXIT_INTERRUPTED, report_interrupted


def run() -> None:
    sigint_is_default = signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if sigint_is_default:
        signal.signal(signal.SIGINT, _exit_interrupted)
    gc.disable()
    try:
        from sdlab.cli import main
    finally:
        gc.freeze()
        gc.enable()
    if sigint_is_default:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code = main()
    except KeyboardInterrupt:   # while the arguments were parsed, before main's own handler
        code = report_interrupted()
    if sigint_is_default:
        signal.signal(signal.SIGINT, _exit_interrupted)
    _exit(code)


def _exit_interrupted(signum: int, frame: object) -> None:
    """SIGINT outside the command: nothing to clean up, so the process ends here."""
    try:
        report_interrupted()
    finally:
        os._exit(EXIT_INTERRUPTED)


def _exit(code: int) -> None:
    """End the process with `code`, skipping the interpreter's teardown unless another thread still runs."""
    import logging
    import threading

    if any(t is not threading.main_thread() and not t.daemon for t in threading.enumerate()):
        sys.exit(code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (BrokenPipeError, ValueError):   # the reader left / the stream was closed
            pass
    os._exit(code)
