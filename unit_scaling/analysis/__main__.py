"""`python -m unit_scaling.analysis --config FILE.py:ARG --out DIR` (see `cli`).

A configuration or input error is printed as one `error:` line, exit status 2
(`UNIT_SCALING_VERBOSE=1` for the traceback)."""

from unit_scaling import errors
from unit_scaling.analysis.cli import main


@errors.reported
def _main():
    try:
        main()
    except SystemExit as e:
        if isinstance(e.code, str):  # the CLI's own usage and input errors
            errors.fail(e.code.removeprefix("error: "))
        raise


if __name__ == "__main__":
    _main()
