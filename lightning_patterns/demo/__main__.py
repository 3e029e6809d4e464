"""``python -m lightning_patterns.demo ROOT PARENT_PID``: the child process of :class:`LocalHTTPServer`."""

import sys

from lightning_patterns.demo.server import main

sys.exit(main())
