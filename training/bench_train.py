"""`python -m training.bench_train`: the command of training/bench/train.py."""

import sys

from training.bench.train import main

if __name__ == "__main__":
    sys.exit(main())
