"""``python -m retain``: the ``retain`` command (``torchrun --nproc_per_node=2 -m retain run``)."""

import sys

from .cli import main

sys.exit(main())
