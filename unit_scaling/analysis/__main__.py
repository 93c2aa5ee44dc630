"""`python -m unit_scaling.analysis --config FILE.py:ARG --out DIR` (see `cli`)."""

from unit_scaling.analysis.cli import main

if __name__ == "__main__":
    main()
