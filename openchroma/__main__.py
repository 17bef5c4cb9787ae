"""``python -m openchroma`` (and ``torchrun -m openchroma train ...``)."""

import sys

from .cli import main

sys.exit(main())
