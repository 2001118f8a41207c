"""Errors with BIDS-Apps exit codes.

Every error that reaches the user carries an exit code from the BIDS-Apps execution spec and a
one-line message that names the offending file and how to fix it. The command line prints the
message alone (no traceback) unless ``--debug`` is given.
"""

from __future__ import annotations

from enum import IntEnum
from pathlib import Path


class ExitCode(IntEnum):
    """Exit codes of the BIDS-Apps execution spec (sysexits-style)."""

    OK = 0
    ERROR = 1
    VALIDATION = 16  # input dataset failed BIDS validation
    NOTHING_SELECTED = 18  # filters selected no data
    USAGE = 64  # command line usage error
    DATA = 65  # input data malformed
    NO_INPUT = 66  # input missing or unreadable
    CANT_CREATE = 73  # output cannot be created
    IO = 74  # input/output error


class BidsAppError(Exception):
    """An error the user can fix, with the exit code it maps to.

    Parameters
    ----------
    message : str
        What went wrong, in one line.
    path : str or Path, optional
        The file or folder at fault; prefixed to the message.
    fix : str, optional
        How to fix it; appended to the message.
    """

    code: ExitCode = ExitCode.ERROR

    def __init__(self, message: str, path: str | Path | None = None, fix: str | None = None):
        self.message = message
        self.path = None if path is None else str(path)
        self.fix = fix
        super().__init__(self.one_line())

    def one_line(self) -> str:
        parts = []
        if self.path:
            parts.append(f"{self.path}: ")
        parts.append(self.message.rstrip("."))
        if self.fix:
            parts.append(f". Fix: {self.fix.rstrip('.')}")
        return " ".join("".join(parts).split()) + "."


class UsageError(BidsAppError):
    code = ExitCode.USAGE


class ValidationError(BidsAppError):
    code = ExitCode.VALIDATION


class NothingSelectedError(BidsAppError):
    code = ExitCode.NOTHING_SELECTED


class DataError(BidsAppError):
    code = ExitCode.DATA


class MissingInputError(BidsAppError):
    code = ExitCode.NO_INPUT


class CantCreateError(BidsAppError):
    code = ExitCode.CANT_CREATE


class IOFailure(BidsAppError):
    code = ExitCode.IO
