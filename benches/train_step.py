"""Training-step benchmark on this machine (see crl/benchmarks/train_step.py):
`python benches/train_step.py [--model tiny] [--steps 8] [--backends auto,torch]`."""

import sys

from crl.benchmarks.train_step import main

if __name__ == "__main__":
    sys.exit(main())
