"""`python -m training.bench_daemon`: the command of training/bench/daemon.py."""

import sys

from training.bench.daemon import main

if __name__ == "__main__":
    sys.exit(main())
