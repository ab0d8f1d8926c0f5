"""``python -m editor`` runs the ``pivot-edit`` command line."""

import sys

from .cli import main

sys.exit(main())
