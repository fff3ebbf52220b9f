"""``python -m dynattn.fer``: the ``dynattn-fer`` command (works under ``torchrun ... -m dynattn.fer train``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
