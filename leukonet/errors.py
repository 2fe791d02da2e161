"""Errors caused by what the user gave us. Entry points print their message, no traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class LeukonetError(Exception):
    """A problem with the user's input, named with the file and what is wrong."""


class DataError(LeukonetError, ValueError):
    """A data folder, manifest or split file that cannot be used as it is."""


class WeightsNotFoundError(LeukonetError, RuntimeError):
    """No pretrained weights could be found for a backbone; the message says what to do."""


class RunExistsError(LeukonetError, FileExistsError):
    """The run directory already holds a run."""


def user_error(err: BaseException | None) -> LeukonetError | None:
    """The user-facing error behind ``err``, looking through Hydra's instantiation wrapper."""
    while err is not None:
        if isinstance(err, LeukonetError):
            return err
        err = err.__cause__
    return None


def exit_on_user_error(run: Callable[[], T]) -> T:
    """Run an entry point; a user error ends it with its message and exit status 2, bugs still raise."""
    try:
        return run()
    except Exception as err:
        if (cause := user_error(err)) is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        sys.exit(2)
