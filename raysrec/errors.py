"""Errors that reach users: each names what was wrong and what was expected."""

from __future__ import annotations


class RaysrecError(Exception):
    """Base class of errors raysrec reports to users (the CLI prints them without a traceback)."""


class InputError(RaysrecError):
    """Bad input data: names the file, the line (when known), the field and what was expected."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None,
                 field: str | None = None) -> None:
        self.path, self.line, self.field = path, line, field
        where = ""
        if path is not None:
            where = f"{path}"
            if line is not None:
                where += f", line {line}"
            if field is not None:
                where += f", field '{field}'"
            where += ": "
        super().__init__(where + message)


class ConfigError(RaysrecError):
    """A configuration value is missing, of the wrong type or out of range."""


class CheckpointError(RaysrecError):
    """A checkpoint folder is missing a file, truncated or otherwise unreadable."""
