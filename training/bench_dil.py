"""`python -m training.bench_dil`: the command of training/bench/dil.py."""

import sys

from training.bench.dil import main

if __name__ == "__main__":
    sys.exit(main())
