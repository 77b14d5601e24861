"""`python -m training.simulate_users`: the command of training/eval/simulate_users.py."""

import sys

from training.eval.simulate_users import main

if __name__ == "__main__":
    sys.exit(main())
