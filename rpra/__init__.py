"""rpra: an on-device self-deferral runtime.

A small local model predicts the score an LLM judge would give its own answer; a controller then
lets it answer locally or defers to a remote model. Importing this package loads no model, touches
no network and imports no heavy library.
"""

__version__ = "0.1.0"
