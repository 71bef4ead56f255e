"""``python -m omniserve.train``: the training commands without the main CLI."""

import sys

from omniserve.train.cli import EXIT_INTERRUPTED, standalone_app

try:
    standalone_app()()
except KeyboardInterrupt:
    sys.exit(EXIT_INTERRUPTED)
