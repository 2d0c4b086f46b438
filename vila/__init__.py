"""Run NVIDIA's VILA / NVILA vision-language models from their published checkpoints."""

from . import errors
from .load import load
from .media import Image, Video

__version__ = "0.1.0"
__all__ = ["Image", "Video", "errors", "load", "__version__"]
