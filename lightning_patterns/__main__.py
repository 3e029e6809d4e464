"""``python -m lightning_patterns`` runs the ``lightning-patterns`` command."""

import sys

from lightning_patterns.cli import main

sys.exit(main())
