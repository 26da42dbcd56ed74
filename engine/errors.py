"""Typed errors the engine raises; the CLI turns each into a one-line message."""

from __future__ import annotations


class EngineError(Exception):
    """Base class. `hint` says what the user can do about it."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class ModelNotFound(EngineError):
    pass


class ModelFormatError(EngineError):
    """A checkpoint that cannot be read: wrong tensors, shapes, or metadata."""


class ContextOverflow(EngineError):
    pass


class FetchError(EngineError):
    pass
