"""User errors end a command with one `error: ...` line; bugs keep their traceback.

Library calls raise ordinary exceptions with messages that say what is wrong and how to fix
it (`ValueError("sequence of 4100 tokens exceeds ...")`). A command line wraps its `main` in
`command_line`, which turns those into one line on stderr and exit status 2, the way argparse
reports a bad option. What counts as the user's mistake:

- any `UserError` (a marker class: `UserTypeError` is a TypeError raised for a config value of
  the wrong type, `UserRuntimeError` a RuntimeError such as "this machine has no GPU");
- a ValueError, FileNotFoundError, FileExistsError, NotADirectoryError or FloatingPointError
  raised by the zoo's own code (the innermost frame of its traceback is in a file of this
  repository): our checks raise those on purpose. The same type raised inside torch or the
  standard library is a bug of ours that reached a library with bad arguments, and keeps its
  traceback.

Everything else (IndexError, KeyError, AttributeError, a plain TypeError, ...) is a bug and
shows its traceback. `ZOO_DEBUG=1` shows the traceback of user errors too.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[2]  # the repository (or installed tree) root
_PACKAGES = tuple(str(_ROOT / name) + os.sep for name in ("architectures", "training", "inference", "fundamentals"))
_CHECKED_TYPES = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, FloatingPointError)


class UserError(Exception):
    """Marker: raised because of what the user asked for, never because of a bug."""


class UserTypeError(UserError, TypeError):
    """A value of the wrong type given by the user (a config field, a prompt that is not ids)."""


class UserRuntimeError(UserError, RuntimeError):
    """The user asked for something this machine or installation cannot do."""


def is_user_error(e: BaseException) -> bool:
    if isinstance(e, UserError):
        return True
    if not isinstance(e, _CHECKED_TYPES):
        return False
    tb = e.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_code.co_filename.startswith(_PACKAGES)


def one_line(e: BaseException) -> str:
    """The exception's message on one line (an OSError's str includes the file name)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text.removeprefix("error: ")


INTERRUPTED = 130  # the exit status of a command stopped by Ctrl-C, as shells report SIGINT (128 + 2)


class Interrupted(UserError):
    """The user stopped the command with Ctrl-C; its message says what was kept and how to go on."""


def command_line(main):
    """Decorator for a command's `main(argv=None)`: user errors become `error: ...` and exit 2; Ctrl-C
    becomes one line and exit 130 (`Interrupted` says what was saved; a bare Ctrl-C, "interrupted")."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except SystemExit:
            raise
        except BaseException as e:
            interrupted = isinstance(e, (Interrupted, KeyboardInterrupt))
            if os.environ.get("ZOO_DEBUG") or not (interrupted or is_user_error(e)):
                raise
            line = "interrupted (Ctrl-C)" if isinstance(e, KeyboardInterrupt) else one_line(e)
            print(f"{'stopped' if interrupted else 'error'}: {line}", file=sys.stderr, flush=True)
            raise SystemExit(INTERRUPTED if interrupted else 2) from None

    return wrapped


class _DefaultsFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help, except where there is no default to show."""

    def _get_help_string(self, action):
        text = action.help or ""
        flag = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
        if "%(default)" in text or action.required or action.default is argparse.SUPPRESS or flag:
            return text
        return text + " (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (`error: ... (see --help)`, no usage block) and defaults in --help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        # "argument --lr: expects float, got 'fast'" reads as "--lr expects float, got 'fast'"
        message = re.sub(r"^argument (--[\w-]+)(?:/\S+)?: expects ", r"\1 expects ", message)
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr, flush=True)
        raise SystemExit(2)
