"""`python -m training.prepare`: the command of training/data/prepare.py."""

import sys

from training.data.prepare import main

if __name__ == "__main__":
    sys.exit(main())
