"""``python -m eefast ...`` is the ``eefast`` command line."""

import sys

from eefast.cli import main

sys.exit(main())
