"""Run NVIDIA's VILA / NVILA vision-language models from their published checkpoints.

    import vila
    model = vila.load("Efficient-Large-Model/NVILA-8B")
    print(model.generate_content([vila.Image("photo.jpg"), "Describe the image."]))

Strings in a prompt are text; media are ``vila.Image(...)`` / ``vila.Video(...)`` (path, URL, bytes, PIL image,
frames), a ``pathlib.Path`` or a PIL image.
"""

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from . import errors
from .media import Image, Video

if TYPE_CHECKING:
    from .engine import GenerationResult
    from .loading import load
    from .model.vila import VilaModel

__version__ = "0.1.0"
__all__ = ["GenerationResult", "Image", "Video", "VilaModel", "errors", "load", "__version__"]

# These pull in torch and transformers; importing them on first use keeps `import vila` (and `vila-infer --help`)
# instant. The hook lives on the module's class, so help(vila) shows the API and not the machinery.
_LAZY = {"load": "loading", "VilaModel": "model.vila", "GenerationResult": "engine"}


class _Module(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name not in _LAZY:
            raise AttributeError(f"module 'vila' has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        setattr(self, name, value)
        return value

    def __dir__(self) -> list[str]:  # help(vila) and tab completion list the lazy names too
        return sorted(set(super().__dir__()) | set(_LAZY))


sys.modules[__name__].__class__ = _Module
