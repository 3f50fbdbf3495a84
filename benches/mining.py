"""Exact top-k mining benchmark (same as `crl bench mining`); see crl.benchmarks.mining."""

import sys

from crl.benchmarks.mining import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
