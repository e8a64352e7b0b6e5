"""One base class for every error a user can cause, and how command-line entry points report it.

Every error class that reports bad input (data config, feature stores, annotations, ranklists, options,
model config, checkpoints, submissions) derives from `ConquerError`, a ValueError; each keeps its own
name, so callers can still catch the specific kind. Entry points run their `main` through `run_cli`,
which turns a ConquerError into one line `error: <message>` on stderr and exit status 2, without a
traceback: the message already names the file, key or flag and what was expected.
"""
import re
import sys

CLI_ERROR_EXIT_STATUS = 2  # what argparse uses for a bad command line
_WORKER_TRACEBACK = "\nOriginal Traceback (most recent call last):\n"


class ConquerError(ValueError):
    """Bad input or settings; the message names the file, key or flag, and what was expected vs found."""


class OptionError(ConquerError):
    """An option value, or a combination of options with each other or with the machine, cannot work; the
    message names the flags and what to change."""


def user_message(error):
    """The message of `error` as the user should read it.

    An error raised inside a DataLoader worker reaches the main process re-raised as the same class, with
    the worker's whole traceback as its message ("Caught DatasetError in DataLoader worker process 0.
    Original Traceback ... method.dataset.DatasetError: <message>"); only the original message is kept.
    """
    message = str(error)
    if _WORKER_TRACEBACK not in message:
        return message
    # The traceback's last entry is "<module>.<Class>: <message>" (the module is left out for __main__).
    final_line = re.compile(rf"^(?:[\w.]+\.)?{re.escape(type(error).__qualname__)}: ", flags=re.MULTILINE)
    matches = list(final_line.finditer(message))
    return message[matches[-1].end():].rstrip("\n") if matches else message


def run_cli(main, argv=None):
    """Run an entry point's `main(argv)` and return its result; a ConquerError is printed as
    `error: <message>` on stderr and ends the process with status 2."""
    try:
        return main(argv)
    except ConquerError as e:
        print(f"error: {user_message(e)}", file=sys.stderr)
        raise SystemExit(CLI_ERROR_EXIT_STATUS) from None
