"""onnxslim-fr: make ONNX models smaller by removing functionally redundant channels."""

from .api import SlimResult, analyze, slim
from .errors import (
    BadDataError,
    BadModelError,
    SlimError,
    UnsupportedError,
    ValidationError,
)

__version__ = "0.1.0"

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
