"""``python -m vertebra`` (the entry point torchrun uses)."""

import sys

from .cli import main

sys.exit(main())
