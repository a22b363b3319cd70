"""Errors a user can act on: each carries one line that says what is wrong."""

from __future__ import annotations


class SlimError(Exception):
    """Base class: the CLI turns it into one line on stderr and a non-zero exit."""

    exit_code = 2


class BadModelError(SlimError):
    """The model file cannot be read or is not a valid ONNX model."""


class BadDataError(SlimError):
    """Calibration or hold-out data does not fit the model's inputs."""


class UnsupportedError(SlimError):
    """The model uses something onnxslim-fr refuses to touch (never guessed)."""


class ValidationError(SlimError):
    """The slimmed model does not match the original within tolerance; nothing is written."""

    exit_code = 1
