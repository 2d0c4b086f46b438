"""Media parts of a prompt (`Image`, `Video`) and image decoding.

Images are decoded exactly as the reference does (``_extract_image``, NVlabs/VILA ``llava/utils/media.py``): PIL,
no EXIF transposition, ``convert("RGB")`` (alpha is dropped, palettes expanded). Video decoding lives in
:mod:`vila.video`.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PIL.Image

from .download import fetch
from .errors import MediaError, UsageError

PathLike = str | os.PathLike

ACCEPTED_MEDIA = (
    "images (JPEG, PNG, WebP, GIF, BMP, TIFF, ...), videos (MP4, MOV, MKV, WebM, AVI, ...) or a folder of video frames"
)
SNIFF_BYTES = 4096
VIDEO = "a video"
# What a file is, then the (offset, bytes) it starts with, first match wins: the common files that are neither
# images nor videos, and the containers that ``sniff_kind`` takes for a video whatever the extension says.
_SIGNATURES: tuple[tuple[Any, ...], ...] = (
    ("a PDF document", (0, b"%PDF-")),
    ("a ZIP archive (or a .docx / .xlsx / .pptx / .epub document)", (0, b"PK\x03\x04")),
    ("a Microsoft Office document", (0, b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1")),
    ("an RTF document", (0, b"{\\rtf")),
    ("a PostScript document", (0, b"%!PS")),
    ("a gzip archive", (0, b"\x1f\x8b")),
    ("a 7-Zip archive", (0, b"7z\xbc\xaf\x27\x1c")),
    ("a RAR archive", (0, b"Rar!\x1a\x07")),
    ("a tar archive", (257, b"ustar")),
    ("a program (ELF executable)", (0, b"\x7fELF")),
    ("an SQLite database", (0, b"SQLite format 3\x00")),
    ("an MP3 audio file", (0, b"ID3")),
    ("a FLAC audio file", (0, b"fLaC")),
    ("a WAV audio file", (0, b"RIFF"), (8, b"WAVE")),
    ("an M4A audio file", (4, b"ftyp"), (8, b"M4A ")),
    ("an M4A audio file", (4, b"ftyp"), (8, b"M4B ")),
    ("an M4A audio file", (4, b"ftyp"), (8, b"M4P ")),
    (VIDEO, (4, b"ftyp")),  # MP4 / MOV / 3GP, after the audio-only brands
    (VIDEO, (0, b"\x1aE\xdf\xa3")),  # Matroska / WebM
    (VIDEO, (0, b"RIFF"), (8, b"AVI ")),
)


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


def load_image(image: Image | PIL.Image.Image) -> PIL.Image.Image:
    """Decode an image to an RGB PIL image (the reference's only conversion)."""
    source = image.source if isinstance(image, Image) else image
    if isinstance(source, PIL.Image.Image):
        return _to_rgb(source, "the given PIL image")
    if isinstance(source, bytes):
        return _open(io.BytesIO(source), "the given bytes")
    if is_url(source):
        return _open(io.BytesIO(fetch(source, refuse=lambda head: refuse_non_media_head(head, source))), source)
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


def sniff_unsupported(head: bytes) -> str | None:
    """What a file is, from its first bytes, when it is a common kind that is neither an image nor a video
    ("a PDF document", "a text file", "a WAV audio file", ...); None for anything else, media included."""
    kind = _signature(head)
    if kind is not None:
        return None if kind == VIDEO else kind
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:  # MPEG audio / ADTS frame sync
        return "an MP3 or AAC audio file"
    if head and b"\x00" not in head:
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError as e:
            if e.start < len(head) - 3:  # a character cut by the end of the sample is still text
                return None
            text = head[: e.start].decode("utf-8")
        start = text.lstrip("\ufeff \t\r\n").lower()
        if start.startswith(("<!doctype html", "<html")):
            return "an HTML page"
        if "<svg" in start[:1000]:
            return "an SVG drawing (convert it to PNG first)"
        if start.startswith(("{", "[")):
            return "a JSON or text file"
        return "a text file"
    return None


def _signature(head: bytes) -> str | None:
    for kind, *marks in _SIGNATURES:
        if all(head[offset : offset + len(magic)] == magic for offset, magic in marks):
            return kind
    return None


def refuse_non_media_head(head: bytes, name: str) -> None:
    """MediaError when ``head``, the first bytes of ``name``, is a PDF, a web page, audio...: stops a download early."""
    kind = sniff_unsupported(head)
    if kind is not None:
        raise MediaError(unsupported_message(name, kind))


def sniff_file(path: PathLike) -> str | None:
    """``sniff_unsupported`` of a file's first bytes; None when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return sniff_unsupported(f.read(SNIFF_BYTES))
    except OSError:
        return None


def unsupported_message(name: str, kind: str) -> str:
    return f"{name} is {kind}, not an image or a video; vila reads {ACCEPTED_MEDIA}"


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
            kind = sniff_unsupported(fp.getvalue()[:SNIFF_BYTES]) if isinstance(fp, io.BytesIO) else sniff_file(fp)
            if kind is not None:
                raise MediaError(unsupported_message(name, kind)) from e
            raise MediaError(
                f"{name} is not an image PIL can read; check the file (is it a video? use vila.Video)"
            ) from e
        except (OSError, SyntaxError, ValueError) as e:
            raise MediaError(f"cannot decode image {name}: {e}; the file may be truncated or corrupt") from e
    return _to_rgb(img, name)


def _to_rgb(img: PIL.Image.Image, name: str) -> PIL.Image.Image:
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


# -- media kinds of paths and URLs (the CLI's --media, --batch rows, pathlib.Path prompt parts) ----------------

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
VIDEO_EXTENSIONS = {".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp", ".ts"}


def media_kind(item: str) -> str:
    """ "image" or "video", by extension (case-insensitive), then by content."""
    path = item.split("?")[0] if is_url(item) else item
    ext = os.path.splitext(path)[1].lower()
    if not is_url(item):
        if "://" in item:
            raise MediaError(f"unsupported URL scheme in {item!r}; use http(s):// or a local path")
        if not os.path.exists(item):
            raise MediaError(f"media not found: {item}; check the path")
    if os.path.isdir(item):
        return "video"  # a directory of frames
    if os.path.isfile(item) and ext in VIDEO_EXTENSIONS:
        refuse_non_media(item)
    if os.path.isfile(item) and ext not in VIDEO_EXTENSIONS:
        return sniff_kind(item, ext)
    return "video" if ext in VIDEO_EXTENSIONS else "image"


def refuse_non_media(path: str) -> None:
    """A PDF, a text file, audio...: say what it is before any decoder tries it (and calls it a corrupt video)."""
    kind = sniff_file(path)
    if kind is not None:
        raise MediaError(unsupported_message(path, kind))


def sniff_kind(path: str, ext: str) -> str:
    """Content detection for files whose extension is missing or lies (a .png that is really an mp4)."""
    try:
        with PIL.Image.open(path):
            return "image"
    except Exception:  # noqa: BLE001 - anything PIL cannot identify is examined further
        pass
    refuse_non_media(path)
    with open(path, "rb") as f:
        is_video = _signature(f.read(16)) == VIDEO
    if is_video or ext not in IMAGE_EXTENSIONS:
        return "video"
    return "image"  # a corrupt image: loading it gives the precise error


def build_prompt(
    text: str | None, media: Sequence[str | bytes], *, names: tuple[str, str] = ("--text", "--media")
) -> list[Any]:
    """Media first, then the text (the reference's order), unless the text places them with placeholders.
    Media are paths or URLs (kind by extension and content) or image bytes; ``names`` are the text's and the
    media's names in errors (the flags, or a request row's keys)."""
    items = [Image(m) if isinstance(m, bytes) or media_kind(m) == "image" else Video(m) for m in media]
    if text is None:
        return items
    pieces = re.split(r"(<image>|<video>)", text)
    holes = [p for p in pieces if p in ("<image>", "<video>")]
    if not holes:
        return [*items, text]
    if len(holes) != len(items):
        raise UsageError(
            f"{names[0]} has {len(holes)} media placeholder(s) but {len(items)} {names[1]} item(s) were given; "
            "make them match"
        )
    prompt: list[Any] = []
    it = iter(items)
    for piece in pieces:
        if piece in ("<image>", "<video>"):
            prompt.append(next(it))
        elif piece:
            prompt.append(piece)
    return prompt


def has_video_file(prompt: Sequence[Any]) -> bool:
    """Whether a prompt holds a video file (time tokens in its answer become seconds, as in the reference CLI)."""
    return any(
        isinstance(part, Video) and isinstance(part.source, (str, os.PathLike)) and not os.path.isdir(part.source)
        for part in prompt
    )


def prompt_part(part: Any) -> Any:
    """One part of a prompt as the model takes it: text (``str``), :class:`Image`, :class:`Video` or a PIL image.

    A ``pathlib.Path`` is a file, never text, so it becomes the image or video it is. A ``str`` is always text (a
    prompt may well mention a file name); when it is exactly the path of an existing image or video, a warning says
    how to pass the file itself.
    """
    if isinstance(part, (Image, Video, PIL.Image.Image)):
        return part
    if isinstance(part, str):
        _warn_if_media_path(part)
        return part
    if isinstance(part, os.PathLike):
        path = os.fsdecode(part)
        return Video(path) if media_kind(path) == "video" else Image(path)
    raise UsageError(
        f"unsupported prompt part {type(part).__name__}; use str (text), vila.Image, vila.Video, a pathlib.Path "
        "or a PIL image"
    )


def _warn_if_media_path(text: str) -> None:
    candidate = text.strip()
    if not candidate or len(candidate) > 4096 or "\n" in candidate:
        return
    if os.path.splitext(candidate)[1].lower() in IMAGE_EXTENSIONS | VIDEO_EXTENSIONS and os.path.isfile(candidate):
        kind = "Video" if os.path.splitext(candidate)[1].lower() in VIDEO_EXTENSIONS else "Image"
        # Python shows a warning once per place it is raised from: once per process here.
        warnings.warn(
            f"the prompt text {candidate!r} is the path of a file, but strings are text; pass "
            f"vila.{kind}({candidate!r}) or a pathlib.Path to give the model the file itself",
            UserWarning,
            stacklevel=4,
        )
