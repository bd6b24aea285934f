"""``python -m magicanimate`` (and ``torchrun ... -m magicanimate``) runs the command line."""

import sys

from .cli import main

sys.exit(main())
