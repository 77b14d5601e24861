"""`python -m training.musicality`: the command of training/eval/musicality.py."""

import sys

from training.eval.musicality import main

if __name__ == "__main__":
    sys.exit(main())
