"""`python -m sdlab ...` is the `sdlab` command."""

import sys

from sdlab.cli import main

sys.exit(main())
