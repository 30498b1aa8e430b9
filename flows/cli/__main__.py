"""`python -m flows.cli ...`, the same as `fss ...`."""

import sys

from flows.cli import main

sys.exit(main())
