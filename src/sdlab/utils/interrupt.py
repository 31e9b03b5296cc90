"""How a Ctrl-C ends sdlab: one line on stderr and exit status 130 (shared by the process and the command line)."""

from __future__ import annotations

import signal
import sys

EXIT_INTERRUPTED = 128 + signal.SIGINT      # 130


def report_interrupted() -> int:
    """Say that Ctrl-C ended the command (one line on stderr); the exit status that goes with it."""
    print("sdlab: error: interrupted", file=sys.stderr, flush=True)
    return EXIT_INTERRUPTED
