"""`python -m sdlab ...` is the `sdlab` command."""

from sdlab.command import run

run()
