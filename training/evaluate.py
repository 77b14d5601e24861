"""`python -m training.evaluate`: the command of training/eval/evaluate.py."""

import sys

from training.eval.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
