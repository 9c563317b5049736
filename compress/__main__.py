"""``python -m layerwise``: the command line, as torchrun starts it (``torchrun --nproc-per-node N -m layerwise``)."""

import sys

from layerwise.cli import main

sys.exit(main())
