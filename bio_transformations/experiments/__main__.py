"""``python -m bio_transformations.experiments``: see :mod:`bio_transformations.experiments.cli`."""

import sys

from .cli import main

sys.exit(main())
