"""``python -m favor ...`` (also what ``torchrun -m favor`` runs)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
