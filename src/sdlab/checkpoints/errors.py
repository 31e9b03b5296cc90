"""The one error type of the checkpoint layer: a file sdlab cannot read, recognize or load.

Its message is a single line that says what was found and what was expected, so that the CLI can print it
as `sdlab: error: <message>` without a traceback.
"""

from __future__ import annotations


class CheckpointError(Exception):
    """A checkpoint file or folder that cannot be read, recognized or loaded."""
