"""Errors a user can act on: each carries one line that says what is wrong.

Exit codes (the CLI's contract): 0 success, 1 validation failed and nothing was written
(ValidationError only), 2 a refusal that says what to change (every other SlimError),
3 an internal error (a bug in onnxslim-fr), 130 / 143 interrupted by SIGINT / SIGTERM.
"""

from __future__ import annotations


class SlimError(Exception):
    """Base class: the CLI turns it into one line on stderr and a non-zero exit."""

    exit_code = 2


class BadModelError(SlimError):
    """The model file cannot be read or is not a valid ONNX model."""


class BadDataError(SlimError):
    """Calibration or hold-out data does not fit the model's inputs."""


class UsageError(SlimError):
    """An option value, a combination of options or a path cannot work (out of range,
    missing a partner option, unwritable, or it would overwrite the input)."""


class UnsupportedError(SlimError):
    """The model uses something onnxslim-fr refuses to touch (never guessed)."""


class ValidationError(SlimError):
    """The slimmed model does not match the original within tolerance; nothing is written."""

    exit_code = 1


class InternalError(SlimError):
    """A check of our own output failed: a bug in onnxslim-fr, not in the user's input."""

    exit_code = 3
