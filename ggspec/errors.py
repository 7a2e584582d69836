"""Exceptions that ggspec raises for problems a user can fix.

The CLI prints any GgspecError as one line; the API lets them propagate.
"""


class GgspecError(Exception):
    """Base class: the message says what is wrong and what to do."""


class ModelFileError(GgspecError, ValueError):
    """A model file is missing, truncated, not GGUF, or cannot be loaded."""


class DownloadError(GgspecError):
    """A model could not be fetched or failed its size / checksum check."""


class VocabMismatchError(GgspecError, ValueError):
    """Target and draft do not share a tokenizer."""


class ContextOverflowError(GgspecError, ValueError):
    """A prompt does not fit in the context window."""


class DecodeError(GgspecError, RuntimeError):
    """llama_decode returned an error code."""


class BusyError(GgspecError, RuntimeError):
    """The engine is already generating and the caller asked not to wait."""


class EngineClosedError(GgspecError, RuntimeError):
    """The engine was closed; its models and contexts are freed."""


class SessionFileError(GgspecError, ValueError):
    """A saved session cannot be written, or read into this engine (another model, a
    truncated or corrupted file, another format version)."""
