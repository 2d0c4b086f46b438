"""Media parts of a prompt (`Image`, `Video`) and image decoding.

Images are decoded exactly as the reference does: PIL, no EXIF transposition, ``convert("RGB")`` (alpha is
dropped, palettes expanded; spec quirks #18). Video decoding lives in :mod:`vila.video`.
"""

from __future__ import annotations

import io
import os
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PIL.Image

from .errors import MediaError

PathLike = str | os.PathLike

URL_TIMEOUT_S = 30
MIN_IMAGE_SIDE = 4  # pixels; smaller images (1x1, 1-pixel strips) carry nothing to describe


@dataclass(frozen=True, eq=False)
class Image:
    """An image given by path, URL, raw bytes or a PIL image."""

    source: Any

    def __repr__(self) -> str:
        return f"vila.Image({_describe(self.source)})"


@dataclass(frozen=True, eq=False)
class Video:
    """A video given by path, URL, a directory of frames, or a sequence of frames (PIL images or arrays)."""

    source: Any

    def __repr__(self) -> str:
        return f"vila.Video({_describe(self.source)})"


def _describe(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return repr(os.fspath(source))
    if isinstance(source, PIL.Image.Image):
        return f"<PIL {source.mode} {source.width}x{source.height}>"
    return f"<{type(source).__name__}>"


def is_url(source: Any) -> bool:
    return isinstance(source, str) and source.lower().startswith(("http://", "https://"))


def fetch_url(url: str) -> bytes:
    """Download a URL into memory, as one clear MediaError on any network failure."""
    try:
        req = urllib.request.Request(url, headers={"User-Agent": "vila"})
        with urllib.request.urlopen(req, timeout=URL_TIMEOUT_S) as resp:
            return resp.read()
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise MediaError(
            f"cannot download {url}: {reason}; check the URL and your network, or pass a local file"
        ) from e


def load_image(image: Image | PIL.Image.Image) -> PIL.Image.Image:
    """Decode an image to an RGB PIL image (the reference's only conversion)."""
    source = image.source if isinstance(image, Image) else image
    if isinstance(source, PIL.Image.Image):
        return _to_rgb(source, "the given PIL image")
    if isinstance(source, bytes):
        return _open(io.BytesIO(source), "the given bytes")
    if is_url(source):
        return _open(io.BytesIO(fetch_url(source)), source)
    if isinstance(source, str) and "://" in source:
        raise MediaError(f"unsupported URL scheme in {source!r}; use http(s):// or a local path")
    if not isinstance(source, (str, os.PathLike)):
        raise MediaError(f"cannot read an image from {type(source).__name__}; pass a path, URL, bytes or PIL image")
    path = Path(source).expanduser()
    if not path.exists():
        raise MediaError(f"image not found: {path}; check the path")
    if path.is_dir():
        raise MediaError(f"{path} is a directory, not an image; pass an image file (or vila.Video for frames)")
    if path.stat().st_size == 0:
        raise MediaError(f"image file is empty: {path}")
    return _open(path, str(path))


def _open(fp: Any, name: str) -> PIL.Image.Image:
    # PIL refuses images over 2x its MAX_IMAGE_PIXELS (~179 MP) as decompression bombs; between 1x and 2x it
    # only warns, which for a photo is noise (a 4K VILA-HD input is ~14 MP).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
        try:
            img = PIL.Image.open(fp)
            img.load()
        except PIL.Image.DecompressionBombError as e:
            raise MediaError(f"image {name} is too large to decode safely ({e}); resize it first") from e
        except PIL.UnidentifiedImageError as e:
            raise MediaError(
                f"{name} is not an image PIL can read; check the file (is it a video? use vila.Video)"
            ) from e
        except (OSError, SyntaxError, ValueError) as e:
            raise MediaError(f"cannot decode image {name}: {e}; the file may be truncated or corrupt") from e
    return _to_rgb(img, name)


def _to_rgb(img: PIL.Image.Image, name: str) -> PIL.Image.Image:
    if min(img.size) < MIN_IMAGE_SIDE:
        raise MediaError(
            f"image {name} is {img.width}x{img.height} pixels, too small to look at; "
            f"give an image of at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} pixels"
        )
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = _to_8bit(img)
    try:
        return img if img.mode == "RGB" else img.convert("RGB")
    except (OSError, ValueError) as e:
        raise MediaError(f"cannot convert image {name} (mode {img.mode}) to RGB: {e}") from e


def _to_8bit(img: PIL.Image.Image) -> PIL.Image.Image:
    """16-bit / 32-bit grayscale -> 8-bit. PIL's own ``convert("RGB")`` clips at 255, which turns a 16-bit
    image almost entirely white (the reference's behaviour); scaling keeps the picture."""
    import numpy as np

    a = np.asarray(img, dtype=np.float64)
    peak = a.max(initial=0)
    if img.mode.startswith("I;16"):
        top = 65535.0
    else:  # "I" (how PIL opens many 16-bit PNGs) or "F": guess the range from the data
        top = 1.0 if img.mode == "F" and peak <= 1.0 else 65535.0 if peak > 255 else 255.0
    return PIL.Image.fromarray(np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8), mode="L")
