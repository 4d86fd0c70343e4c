"""``python -m qmpbackup``."""

import sys

from .cli import main

sys.exit(main())
