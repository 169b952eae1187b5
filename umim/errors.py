"""One error surface: a mistake in what the user gave (a path, a file, a setting, an argument) is a
:class:`UserError`; the command-line tools print it as one line (``error: ...``) and exit with
code 2. Anything else is a bug in UMIM and keeps its traceback. ``--debug`` (or ``UMIM_DEBUG=1``)
shows the traceback of user errors too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


class UserError(ValueError):
    """A user mistake that UMIM explains in one line (subclasses name the stage: corpus, rules, ...)."""


def one_line(e: BaseException) -> str:
    """The first line of an exception's message (library messages can span screens)."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def cli_entry(main: Callable[[list[str]], int | None], argv: list[str]) -> int:
    """Run ``main(argv)``; a :class:`UserError` becomes ``error: ...`` on stderr and exit code 2."""
    debug = "--debug" in argv or os.environ.get("UMIM_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    try:
        return main(argv) or 0
    except UserError as e:
        if debug:
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`umim --help | head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
