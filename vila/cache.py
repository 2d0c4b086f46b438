"""A bounded LRU cache of encoded media, keyed by what the media *contain*.

Why: a chat re-renders the whole conversation on every turn, and batch files often repeat images. On CPU,
decoding, preprocessing and the vision tower dominate a request; running them again for pixels already
seen is waste. The cache stores the final embedding blocks of each image / video, so a hit skips decode,
preprocess and encode entirely.

API::

    from vila.cache import FeatureCache

    cache = FeatureCache(max_items=256, max_bytes=1 << 30)
    model.generate(prompt, cache=cache)          # also model.prepare(turns, cache=cache), model.stream_content
    model.generate(prompt, cache=cache)          # the same media again: no decode, no vision tower
    cache.hits, cache.misses, len(cache), cache.nbytes, cache.stats(), cache.clear()

``model.chat()`` sessions and ``vila-infer --batch`` use a cache automatically; one-shot ``generate`` calls
use none unless one is passed.

Keys are ``media_key(kind, digest, context)``: ``digest`` is :func:`content_digest` of the media (sha256
over file bytes, raw bytes, decoded pixels or frames: renaming or copying a file still hits, editing it
misses), and ``context`` holds everything else that changes the features (the model, its config, dtype and
device, whether the image is tiled, video frame count and fps). Media that cannot be hashed cheaply
(video URLs, opaque objects) get no key and are never cached. Values are whatever the model stores (tuples
of tensors); their size counts towards ``max_bytes``.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

_CHUNK = 1 << 20


class FeatureCache:
    """Least-recently-used map from media keys to encoded features, bounded by entry count and bytes."""

    def __init__(self, max_items: int = 256, max_bytes: int = 1 << 30):
        if max_items < 1 or max_bytes < 1:
            raise ValueError("max_items and max_bytes must be positive")
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._data: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: str | None) -> Any | None:
        """The stored value (marking it recently used), or None. ``key=None`` (uncacheable) always misses."""
        if key is None or key not in self._data:
            self.misses += 1
            return None
        self._data.move_to_end(key)
        self.hits += 1
        return self._data[key][0]

    def put(self, key: str | None, value: Any) -> None:
        """Store ``value``; evicts least-recently-used entries beyond the bounds. A value larger than
        ``max_bytes`` on its own is not stored."""
        if key is None:
            return
        size = _nbytes(value)
        if size > self.max_bytes:
            return
        if key in self._data:
            self.nbytes -= self._data.pop(key)[1]
        self._data[key] = (value, size)
        self.nbytes += size
        while len(self._data) > self.max_items or self.nbytes > self.max_bytes:
            _, (_, old) = self._data.popitem(last=False)
            self.nbytes -= old

    def clear(self) -> None:
        self._data.clear()
        self.nbytes = 0

    def stats(self) -> dict[str, int]:
        return {"items": len(self._data), "bytes": self.nbytes, "hits": self.hits, "misses": self.misses}

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __repr__(self) -> str:
        s = self.stats()
        return f"FeatureCache(items={s['items']}, bytes={s['bytes']}, hits={s['hits']}, misses={s['misses']})"


def media_key(kind: str, digest: str | None, context: str) -> str | None:
    """The cache key of one media item; None when the media has no digest."""
    if digest is None:
        return None
    return f"{kind}:{digest}:{hashlib.sha256(context.encode()).hexdigest()[:32]}"


def content_digest(source: Any) -> str | None:
    """sha256 of a media source's content: a file or a directory of frames (by path), bytes, a PIL image,
    an array or tensor, or a sequence of frames. None for URLs and anything else (not cached)."""
    h = hashlib.sha256()
    if isinstance(source, (bytes, bytearray, memoryview)):
        h.update(source)  # same digest as the file holding these bytes
    elif isinstance(source, PIL.Image.Image):
        _update_pil(h, source)
    elif isinstance(source, (np.ndarray, torch.Tensor)):
        _update_array(h, source)
    elif isinstance(source, (str, os.PathLike)):
        if "://" in os.fspath(source):
            return None
        path = Path(source).expanduser()
        if path.is_file():
            _update_file(h, path)
        elif path.is_dir():
            h.update(b"dir")
            for child in sorted(p for p in path.iterdir() if p.is_file()):
                h.update(child.name.encode())
                _update_file(h, child)
        else:
            return None  # missing: let the decoder raise its own error
    elif isinstance(source, (list, tuple)) and source:
        h.update(b"frames")
        for frame in source:
            sub = content_digest(frame)
            if sub is None:
                return None
            h.update(sub.encode())
    else:
        return None
    return h.hexdigest()


def _update_file(h: Any, path: Path) -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)


def _update_pil(h: Any, img: PIL.Image.Image) -> None:
    h.update(f"pil:{img.mode}:{img.width}x{img.height}".encode())
    h.update(img.tobytes())


def _update_array(h: Any, x: Any) -> None:
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x
    a = np.ascontiguousarray(a)
    h.update(f"array:{a.dtype}:{a.shape}".encode())
    h.update(a.tobytes())


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0
