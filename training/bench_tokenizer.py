"""`python -m training.bench_tokenizer`: the command of training/bench/tokenizer.py."""

import sys

from training.bench.tokenizer import main

if __name__ == "__main__":
    sys.exit(main())
