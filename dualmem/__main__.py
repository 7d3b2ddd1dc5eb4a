"""``python -m dualmem``: the same as the ``dualmem`` command."""

import sys

from dualmem.cli import main

sys.exit(main())
