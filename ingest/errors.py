"""Typed errors the ingest layer raises; the CLI turns each into a one-line message."""

from __future__ import annotations


class IngestError(Exception):
    """Base class. `hint` says what the user can do about it."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class SourceNotFound(IngestError):
    pass


class PathOutsideSource(IngestError):
    """A listed path (--files-from) that leads out of the directory it is relative to."""


class NotAGitRepository(IngestError):
    pass


class ConversionError(IngestError):
    """A document (PDF, HTML, man page) could not be turned into text; the file is listed."""


class SourcePermissionDenied(IngestError):
    pass
