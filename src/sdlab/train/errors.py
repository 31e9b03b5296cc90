"""The one error type of training set-up: a setting, dataset, checkpoint or disk the user can fix.

Its message is one line naming the input at fault; `sdlab train` prints it as `sdlab: error: <message>` and
exits with status 2. It is a `ValueError`, so callers of the Python API that caught ValueError still do.
"""

from __future__ import annotations


class TrainError(ValueError):
    """A training run that cannot start or continue because of its input (settings, data, files, disk)."""
