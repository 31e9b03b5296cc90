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

This module imports nothing heavy itself, so that the collector is off before torch is imported.
`sdlab.cli.main` stays an ordinary function for callers in Python.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import threading


def run() -> None:
    gc.disable()
    try:
        from sdlab.cli import main
    finally:
        gc.freeze()
        gc.enable()
    code = main()
    if any(t is not threading.main_thread() and not t.daemon for t in threading.enumerate()):
        sys.exit(code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (BrokenPipeError, ValueError):   # the reader left / the stream was closed
            pass
    os._exit(code)
