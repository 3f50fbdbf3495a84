"""`python -m crl` (also what `accelerate launch -m crl train ...` runs)."""

import sys

from crl.cli import main

sys.exit(main())
