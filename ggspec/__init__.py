"""ggspec: exact speculative decoding for local GGUF models on llama.cpp."""

from importlib.metadata import PackageNotFoundError, version

try:  # before the imports below: ggspec.session reads it
    __version__ = version("ggspec")
except PackageNotFoundError:
    __version__ = "0.0.0+unknown"

from .config import BackendConfig, SamplingConfig, SpecConfig
from .engine import Engine, Result
from .errors import (BusyError, ContextOverflowError, DecodeError, DownloadError, EngineClosedError,
                     GgspecError, ModelFileError, SessionFileError, VocabMismatchError)
from .hub import pull
from .stats import Stats

__all__ = [
    "BackendConfig", "BusyError", "ContextOverflowError", "DecodeError", "DownloadError", "Engine",
    "EngineClosedError", "GgspecError", "ModelFileError", "Result", "SamplingConfig", "SessionFileError",
    "SpecConfig", "Stats", "VocabMismatchError", "pull", "__version__",
]
