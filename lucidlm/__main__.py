"""``python -m lucidlm ...`` (what ``torchrun -m lucidlm ...`` runs): the ``lucidlm`` command."""

import sys

from .cli import main

sys.exit(main())
