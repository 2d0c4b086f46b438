"""One small exception hierarchy.

Every error the library raises on purpose is a :class:`VilaError`. Its message is one line that says
what is wrong and what to do; ``exit_code`` is what ``vila-infer`` exits with (documented in the README).
"""

from __future__ import annotations


class VilaError(Exception):
    """Base class of every error raised on purpose by `vila`."""

    exit_code = 1


class UsageError(VilaError, ValueError):
    """A bad argument: an option value out of range, an unknown conversation mode, an empty prompt."""

    exit_code = 2


class CheckpointError(VilaError):
    """The model path or hub id cannot be resolved, or the checkpoint is incomplete or malformed."""

    exit_code = 3


class UnsupportedModelError(CheckpointError):
    """The checkpoint is well formed but uses a layout, tower or projector this library does not run."""


class MediaError(VilaError):
    """An image or video cannot be found, downloaded or decoded."""

    exit_code = 4


class PromptTooLongError(VilaError):
    """The prompt (text plus media embeddings) does not fit the model's context."""

    exit_code = 5


class DeviceError(VilaError):
    """The requested device or dtype is not available on this machine."""

    exit_code = 6
