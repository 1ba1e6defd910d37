"""``python -m fillmask`` is the ``fillmask`` command."""

import sys

from fillmask.cli import main

sys.exit(main())
