"""Errors the command line reports as one line."""


class UserError(Exception):
    """An error caused by the input (bad arguments, unreadable files): printed as one line, exit status 2."""


class Terminated(BaseException):
    """SIGTERM arrived: unwinds like KeyboardInterrupt (cleaning up on the way), exit status 143."""
