"""Run NVIDIA's VILA / NVILA vision-language models from their published checkpoints."""

from typing import TYPE_CHECKING, Any

from . import errors
from .media import Image, Video

if TYPE_CHECKING:
    from .loading import load

__version__ = "0.1.0"
__all__ = ["Image", "Video", "errors", "load", "__version__"]


def __getattr__(name: str) -> Any:
    # `load` pulls in torch and transformers; importing it lazily keeps `vila-infer --help` instant.
    if name == "load":
        from .loading import load

        return load
    raise AttributeError(f"module 'vila' has no attribute {name!r}")
