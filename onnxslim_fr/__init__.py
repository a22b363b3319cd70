"""onnxslim-fr: make ONNX models smaller by removing functionally redundant channels."""

import logging
import os

# onnxruntime's telemetry (Linux builds from 1.2x) writes $TMPDIR/.ses when onnxruntime is
# imported: a run leaves nothing behind, so it is off unless the environment says otherwise
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from .api import SlimResult, analyze, slim
from .errors import (
    BadDataError,
    BadModelError,
    SlimError,
    UnsupportedError,
    ValidationError,
)

__version__ = "0.1.0"

# a library logs, it does not print: the CLI (or the application) decides where logs go
logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "BadDataError",
    "BadModelError",
    "SlimError",
    "SlimResult",
    "UnsupportedError",
    "ValidationError",
    "__version__",
    "analyze",
    "slim",
]
