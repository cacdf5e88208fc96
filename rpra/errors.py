"""The project's errors: one base class, a few meaningful kinds.

Every message says what went wrong *and* what to do about it; the CLI prints the message and
exits non-zero without a traceback.
"""

from __future__ import annotations


class RpraError(Exception):
    """Base class of every error rpra raises on purpose."""


class ConfigError(RpraError):
    """A configuration value is missing, malformed or out of range."""


class ModelError(RpraError):
    """A model cannot be found, fetched, verified or loaded."""


class ModelNotFoundError(ModelError):
    """No model by that name or path."""


class CorruptModelError(ModelError):
    """The model file exists but is not a complete, valid GGUF."""


class InputError(RpraError):
    """The request itself is unusable: empty, or longer than the model's context."""


class PromptTooLongError(InputError):
    """The prompt does not fit the local model's context window."""


class PrivacyError(InputError):
    """The request asks for something the privacy policy forbids (e.g. deferring under never-defer)."""


class RemoteError(RpraError):
    """The remote endpoint could not be reached or answered with something unusable."""
