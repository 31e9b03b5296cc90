"""`python -m sdlab ...` is the `sdlab` command."""

from sdlab.cli import run

run()
