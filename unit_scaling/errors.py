"""Errors a user can fix (a config field, an input file, a run directory), and how the
command-line programs report them: one `error: ...` line, exit status 2, no traceback.

`UserError` marks an error whose message names the cause and the fix; the programs
(`train.py`, `python -m unit_scaling.generate`, `... .analysis`, `... .data`) catch it
and print it short. Set `UNIT_SCALING_VERBOSE=1` (or pass `--verbose` where a program
has it) for the full traceback. Anything else is a bug and keeps its traceback.

This module imports only the standard library, so every layer can raise these.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from typing import Callable, Sequence

EXIT_USER_ERROR = 2  # a configuration or input error (as argparse/absl usage errors)
VERBOSE_ENV = "UNIT_SCALING_VERBOSE"


class UserError(Exception):
    """An error in what the user gave (config, input, run directory); the message names
    the field or file and the fix."""


class ConfigError(UserError, ValueError):
    """A config field has a value that cannot work."""


class InputError(UserError, OSError):
    """An input (corpus, run directory, checkpoint, prompt) cannot be used as given."""


def verbose() -> bool:
    """Whether full tracebacks were asked for (`UNIT_SCALING_VERBOSE=1`)."""
    return os.environ.get(VERBOSE_ENV, "").lower() not in ("", "0", "false", "no")


def fail(message: str) -> None:
    """Prints `error: message` (and how to get a traceback) to stderr; exits 2."""
    # One write, flushed: a library's background threads (tensorstore after a failed
    # save) may still be printing, and must not split the line.
    sys.stderr.write(f"error: {message}\n(full traceback: {VERBOSE_ENV}=1)\n")
    sys.stderr.flush()
    sys.exit(EXIT_USER_ERROR)


def reported(main: Callable) -> Callable:
    """Wraps a program's `main`: a `UserError` becomes `error: ...` and exit status 2."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            if verbose():
                raise
            fail(str(e))

    return wrapped


def flags_parser(argv: Sequence[str]):
    """An absl `flags_parser` for `app.run`: a bad flag or config override (unknown
    field, wrong type, unknown preset) is reported as one `error:` line, exit 2,
    instead of a traceback through ml_collections."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        if verbose():
            raise
        fail(_flag_message(e, argv))


def _flag_message(e: BaseException, argv: Sequence[str]) -> str:
    raw = str(e.args[0]) if e.args else str(e)
    if "Traceback (most recent call last)" in raw:  # an error inside get_config()
        flag = re.match(r"flag (--\S+): ", raw)
        last = [line for line in raw.splitlines() if re.match(r"^\w+(Error|Exception): ", line)]
        reason = last[-1].split(": ", 1)[1] if last else raw.splitlines()[-1]
        return f"{flag.group(1)}: {reason}" if flag else reason
    text = (raw.strip("'\"") if isinstance(e, KeyError) or raw.startswith("'") else raw).replace("\\n", " ").replace("\n", " ").replace("\\'", "'")
    key = re.match(r"'?([A-Za-z_]\w*)'?", text)
    if isinstance(e, (AttributeError, KeyError)) and key:
        name = key.group(1)
        offending = [a.split("=")[0] for a in argv
                     if re.search(rf"\.{re.escape(name)}$", a.split("=")[0])]
        hint = text[key.end():].strip(" '")
        return f"{offending[0] if offending else name}: no such config field. {hint}".strip()
    return text
