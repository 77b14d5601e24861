"""`python -m training.sweep_infills`: the command of training/eval/sweep_infills.py."""

import sys

from training.eval.sweep_infills import main

if __name__ == "__main__":
    sys.exit(main())
