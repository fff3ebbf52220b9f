"""``python -m dynattn.bench BENCH.json`` is ``python -m dynattn.bench.report BENCH.json``."""

import sys

from .report import main

sys.exit(main())
