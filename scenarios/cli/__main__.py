"""`python -m scenarios.cli ...` is `cpcheck ...`."""

import sys

from scenarios.cli import main

sys.exit(main())
