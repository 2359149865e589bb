"""``python -m dipgo`` = the ``dipgo`` command."""

import sys

from dipgo.cli import main

sys.exit(main())
