"""`python -m sdlab.cli ...` is the `sdlab` command."""

import sys

from sdlab.cli import main

sys.exit(main())
