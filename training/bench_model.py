"""`python -m training.bench_model`: the command of training/bench/model.py."""

import sys

from training.bench.model import main

if __name__ == "__main__":
    sys.exit(main())
