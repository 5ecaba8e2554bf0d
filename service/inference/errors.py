"""The inference layer's errors. They know nothing about HTTP: ``service/http/errors.py``
maps each class (by type) to a status.

Bad inputs are the model core's own errors (``model.errors``: ``InvalidInputError`` and
its subclasses), raised as they are with ``input_index`` set to the input's position in
the request; image URLs that cannot be fetched raise those too.
"""

from __future__ import annotations


class InferenceError(Exception):
    """Base class of the errors below."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class EngineUnavailableError(InferenceError):
    """The engine cannot take work: loading, restarting, dead, shutting down, or the
    request ran past its deadline. ``retry`` says whether retrying soon may succeed."""

    def __init__(self, message: str, *, retry: bool = True) -> None:
        super().__init__(message)
        self.retry = retry

    def __reduce__(self):  # keyword arguments survive pickling (IPC)
        return (_rebuild_unavailable, (self.message, self.retry))


def _rebuild_unavailable(message: str, retry: bool) -> EngineUnavailableError:
    return EngineUnavailableError(message, retry=retry)


class EngineDiedError(EngineUnavailableError):
    """The engine died (or its device did) with the request in flight. Embedding is
    idempotent: a front end with another engine retries the request there once."""

    def __init__(self, message: str = "the model engine stopped; it is being restarted") -> None:
        super().__init__(message, retry=True)

    def __reduce__(self):
        return (EngineDiedError, (self.message,))


class EngineOverloadedError(InferenceError):
    """The queue is full: retry later."""


class TooManyInputsError(InferenceError):
    """More inputs in one call than the queue can ever hold."""


class PixelsTooLargeError(InferenceError):
    """A request whose images could decode to more pixel bytes than a front end ever holds."""


class NoInputsError(InferenceError):
    """A call with no inputs."""


class PreprocessError(InferenceError):
    """Preprocessing an input failed in a way no input should cause (a bug, logged where it
    happened); raised in place of whatever was raised, so that the request fails at once."""


class ForwardError(InferenceError):
    """The forward pass of the batch holding this request failed (logged where it ran),
    or produced values that must not be returned (NaN, infinity)."""
