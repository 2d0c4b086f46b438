"""Video frame sampling and decoding, and the CLI's time-token rewrite.

Frames are chosen exactly as the reference llava loader chooses them (``_load_video``, NVlabs/VILA
``llava/utils/media.py``): uniform ``round(linspace(0, n - 1, num_frames))`` or, with ``fps > 0``, timestamp
sampling; the frame count is the last decodable frame, as the reference finds it. What differs is how the frames are
decoded: only the distinct sampled frames, in index order, by PyAV seeking to the keyframe at or before each frame (an
OpenCV seek restarts decoding at the keyframe before ``i - 16``) and decoding forward inside a group of pictures
instead of seeking, with several decoders in threads for many frames, and without the reference's separate last-frame
seek when the last frame is sampled anyway. Frame metadata (count, fps) comes from OpenCV whenever it is installed, and
PyAV is only used where its timestamp-derived frame numbers are OpenCV's, so the indices are the reference's whichever
backend decodes.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import queue
import re
import sys
import tempfile
import threading
import urllib.parse
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import PIL.Image

from .download import fetch_to
from .errors import MediaError, UsageError
from .media import Image, Video, is_url, load_image, sniff_file, sniff_unsupported, unsupported_message

logger = logging.getLogger(__name__)

BACKENDS = ("pyav", "opencv", "decord")
# backend=None tries these in order. PyAV first: it seeks to the keyframe at or before a frame (OpenCV restarts ~16
# frames earlier), and it is only taken for a constant-frame-rate file whose frame count and fps agree with OpenCV's,
# so its pts-derived frame numbers are OpenCV's (the reference's). Then OpenCV, what the reference decodes with; decord
# last: on the benchmark (scripts/bench_video.py) it spent more CPU per frame than OpenCV.
AUTO_BACKENDS = ("pyav", "opencv", "decord")
# More frames than this get a progress bar when ``progress`` is None.
PROGRESS_MIN_FRAMES = 64
# OpenCV seeks to the keyframe before ``i - 16`` and decodes forward, so grabbing forward is cheaper over shorter gaps.
OPENCV_MAX_GRAB_GAP = 32
# PyAV decodes forward instead of seeking when the next frame is in the current group of pictures (the keyframe
# interval is learnt while decoding), or at most this many frames ahead.
PYAV_MIN_GRAB_GAP = 4
# FFmpeg's own decoding threads (frame and slice threads; the GIL is released while decoding).
PYAV_THREAD_TYPE = "AUTO"
# PyAV is taken automatically only when its average frame rate equals OpenCV's fps to this relative tolerance.
PYAV_FPS_RTOL = 1e-6
# A container that reports no (or a negative) frame count is counted by decoding; this bounds that count.
MAX_COUNTED_FRAMES = 10_000_000
# Parallel decoding of many frames: contiguous runs of at least this many frames, one decoder each.
MAX_DECODE_WORKERS = 8
MIN_FRAMES_PER_WORKER = 4

FrameTransform = Callable[[PIL.Image.Image], PIL.Image.Image]


@dataclass(frozen=True)
class DecodedVideo:
    """The sampled frames of one video, with the metadata the CLI's time-token rewrite needs."""

    frames: list[PIL.Image.Image]  # RGB, in sampled order; a repeated index repeats the same frame object
    indices: list[int]  # frame index of each entry of ``frames``
    duration: float  # seconds: frame_count / fps; 0.0 when the fps is unknown and for frame dirs / lists
    source: str  # printable description


# --------------------------------------------------------------------------------------------------------------------
# Index rules (pure)


def sample_indices(frame_count: int, num_frames: int, *, fps: float = 0.0, video_fps: float = 0.0) -> list[int]:
    """The reference's frame indices (``_load_video``), numpy formulas kept verbatim so rounding matches exactly.

    ``fps > 0``: timestamps ``arange(0, frame_count / video_fps, 1 / fps)[:num_frames]``, index ``int(t * video_fps)``
    (empty when ``video_fps`` is unknown, as in the reference). Otherwise ``round(linspace(0, frame_count - 1,
    num_frames))`` with numpy's round-half-to-even. Duplicates are kept: they repeat a frame.
    """
    if num_frames < 1:
        raise UsageError(f"num_frames must be at least 1, got {num_frames}")
    if frame_count <= 0:
        return []
    if fps > 0:
        duration = frame_count / video_fps if video_fps > 0 else 0
        timestamps = np.arange(0, duration, 1 / fps)[:num_frames]
        return [int(t * video_fps) for t in timestamps]
    return np.round(np.linspace(0, frame_count - 1, num_frames)).astype(int).tolist()


def last_decodable_count(decodable: Callable[[int], bool], frame_count: int) -> int:
    """The largest ``n <= frame_count`` whose frame ``n - 1`` decodes, 0 if none: the reference trusts no
    container frame count until its last frame grabs.

    The reference decrements one frame at a time; galloping down and then bisecting gives the same answer (frames
    decode up to some point and not after it) in a logarithmic number of seeks when the container's count is far off.
    """
    if frame_count <= 0:
        return 0
    bad = frame_count - 1
    if decodable(bad):
        return frame_count
    step = 1
    while True:
        probe = max(bad - step, 0)
        if decodable(probe):
            good = probe
            break
        if probe == 0:
            return 0
        bad, step = probe, step * 2
    while bad - good > 1:
        mid = (good + bad) // 2
        if decodable(mid):
            good = mid
        else:
            bad = mid
    return good + 1


def natural_key(name: str) -> list[Any]:
    """Sort key that orders embedded numbers by value (``frame2`` before ``frame10``); text parts compare as text."""
    parts = re.split(r"(\d+)", name)
    return [int(p) if i % 2 else p for i, p in enumerate(parts)] + [name]


# --------------------------------------------------------------------------------------------------------------------
# Time tokens (CLI only, as NVlabs/VILA ``llava/cli/infer.py``)

_OUT_OF_RANGE_TIME_TOKEN = re.compile(r"<t(\d+)>")


def rewrite_time_tokens(text: str, *, duration: float, num_time_tokens: int, time_token_format: str) -> str:
    """Replace time tokens by timestamps in seconds, as the reference CLI prints them (``llava/cli/infer.py``).

    Token ``k`` becomes ``"<" + str(round(k * duration / (N - 1), 2)) + ">"`` (plain sequential ``str.replace`` in
    token order, like the reference), then every ``<tK>`` with ``K >= N`` (hard-coded spelling, whatever the format)
    becomes ``<round(duration, 2)>``. The reference divides by zero for ``N == 1``; here the single token 0 means the
    start of the video, ``<0.0>``. ``N <= 0`` only runs the out-of-range step, so every ``<tK>`` becomes the duration.
    """
    duration = float(duration)
    for k in range(num_time_tokens):
        value = round(k * duration / (num_time_tokens - 1), 2) if num_time_tokens > 1 else 0.0
        text = text.replace(time_token_format.format(t=k), f"<{value}>")
    end = f"<{round(duration, 2)}>"
    return _OUT_OF_RANGE_TIME_TOKEN.sub(lambda m: end if int(m.group(1)) >= num_time_tokens else m.group(0), text)


# --------------------------------------------------------------------------------------------------------------------
# Entry point


def load_video(
    source: Any,
    *,
    num_frames: int,
    fps: float = 0.0,
    backend: str | None = None,
    progress: bool | None = None,
    transform: FrameTransform | None = None,
) -> DecodedVideo:
    """Sample and decode the frames of a video file, URL, directory of frames or in-memory frame sequence.

    ``backend``: None tries ``AUTO_BACKENDS`` in order (PyAV where it numbers frames as OpenCV does: constant frame
    rate, same frame count and fps; then OpenCV; then decord for files OpenCV cannot open, only where it agrees with
    OpenCV's frame count); ``"pyav"`` / ``"opencv"`` / ``"decord"`` force one. ``progress``: None
    shows a bar (stderr) when more than ``PROGRESS_MIN_FRAMES`` frames are decoded, and for downloads. ``transform``
    (optional) is applied to each decoded RGB frame at once, e.g. the preprocessing resize, so a long video never
    holds every frame at full resolution; it may run in decoder threads. Many frames are decoded by several decoders
    in threads (``$VILA_VIDEO_THREADS`` caps them). Frames that fail to decode are skipped with a warning; none at all raises
    MediaError. ``bytes`` (or a binary file object) are the encoded video itself.
    """
    if isinstance(source, Video):
        source = source.source
    if num_frames < 1:
        raise UsageError(f"num_frames must be at least 1, got {num_frames}")
    if fps < 0:
        raise UsageError(f"fps must be 0 (uniform sampling) or positive, got {fps}")
    if backend is not None and backend not in BACKENDS:
        raise UsageError(f"unknown video backend {backend!r}; use one of {', '.join(BACKENDS)} or None (automatic)")
    transform = transform or _identity

    if isinstance(source, (bytes, bytearray, memoryview)) or hasattr(source, "read"):
        return _load_bytes(source, num_frames, fps, backend, progress, transform)
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if isinstance(text, str) and is_url(text):
            path = download_video(text, progress=progress)
            return _load_file(path, num_frames, fps, backend, progress, transform, name=text)
        if isinstance(text, str) and "://" in text:
            raise MediaError(f"unsupported URL scheme in {text!r}; use an http(s):// URL or a local path")
        return _load_path(Path(os.fsdecode(text)).expanduser(), num_frames, fps, backend, progress, transform)
    if isinstance(source, PIL.Image.Image):
        raise MediaError("a single PIL image is not a video; pass a list of frames, or use vila.Image for an image")
    if isinstance(source, np.ndarray) or (hasattr(source, "__array__") and not isinstance(source, Sequence)):
        frames = np.asarray(source)
        if frames.ndim != 4:
            raise MediaError(f"a video array must be T x H x W x 3 (uint8 RGB), got shape {tuple(frames.shape)}")
        return _load_sequence(frames, num_frames, progress, transform, f"<array of {len(frames)} frames>")
    if isinstance(source, Iterable):
        items = list(source)
        return _load_sequence(items, num_frames, progress, transform, f"<{len(items)} frames>")
    raise MediaError(
        f"cannot read a video from {type(source).__name__}; pass a path, an http(s) URL, a directory of frames, "
        "or a list of frames (PIL images or uint8 arrays)"
    )


def _identity(image: PIL.Image.Image) -> PIL.Image.Image:
    return image


def _load_path(
    path: Path, num_frames: int, fps: float, backend: str | None, progress: bool | None, transform: FrameTransform
) -> DecodedVideo:
    if not path.exists():
        raise MediaError(f"video not found: {path}; check the path")
    if path.is_dir():
        return _load_frame_dir(path, num_frames, progress, transform)
    if not path.is_file():
        raise MediaError(
            f"{path} is not a regular file (a pipe or device?); pass a video file or a directory of frames"
        )
    return _load_file(path, num_frames, fps, backend, progress, transform, name=str(path))


def _load_bytes(
    data: Any, num_frames: int, fps: float, backend: str | None, progress: bool | None, transform: FrameTransform
) -> DecodedVideo:
    """Encoded video bytes (or a binary file object) go through a temporary file: OpenCV only reads paths."""
    payload = data.read() if hasattr(data, "read") else bytes(data)
    if not isinstance(payload, bytes):
        raise MediaError(f"the video file object returned {type(payload).__name__}, not bytes; open it in binary mode")
    fd, tmp = tempfile.mkstemp(prefix="vila-video-", suffix=".bin")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        return _load_file(Path(tmp), num_frames, fps, backend, progress, transform, name=f"<{len(payload)} bytes>")
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


# --------------------------------------------------------------------------------------------------------------------
# Frame directories and in-memory frames


def _image_extensions() -> frozenset[str]:
    return frozenset(ext.lower() for ext in PIL.Image.registered_extensions())


def list_frame_files(directory: Path) -> list[Path]:
    """Image files of a frame directory in natural order; hidden files (like the reference's glob) and non-images are
    skipped, extensions compared case-insensitively."""
    extensions = _image_extensions()
    files = [
        p for p in directory.iterdir() if not p.name.startswith(".") and p.suffix.lower() in extensions and p.is_file()
    ]
    return sorted(files, key=lambda p: natural_key(p.name))


def _load_frame_dir(directory: Path, num_frames: int, progress: bool | None, transform: FrameTransform) -> DecodedVideo:
    files = list_frame_files(directory)
    if not files:
        raise MediaError(f"no image files in {directory}; a frame directory must hold images (.jpg, .png, ...)")
    return _load_sequence(files, num_frames, progress, transform, f"{directory} ({len(files)} frames)")


def _load_sequence(
    items: Sequence[Any], num_frames: int, progress: bool | None, transform: FrameTransform, name: str
) -> DecodedVideo:
    """Frames given one by one (images of a directory, PIL images, arrays): uniform rule, fps ignored, as the
    reference does for a directory of frames."""
    indices = sample_indices(len(items), num_frames)
    if not indices:
        raise MediaError(f"{name} holds no frames; pass at least one frame")
    _warn_repeats(name, len(items), num_frames)
    wanted = sorted(set(indices))
    decoded: dict[int, PIL.Image.Image] = {}
    with _progress_bar(len(wanted), progress, "reading frames") as bar:
        for i in wanted:
            item = items[i]
            if isinstance(item, (str, os.PathLike)):
                try:
                    decoded[i] = transform(load_image(Image(item)))
                except MediaError as e:  # like a frame of a video file that fails to decode
                    warnings.warn(f"skipping frame {i} of {name}: {e}", stacklevel=4)
            else:
                decoded[i] = transform(_frame_to_pil(item, i))
            bar.update(1)
    return _result(decoded, indices, [], duration=0.0, name=name)


def _frame_to_pil(item: Any, index: int) -> PIL.Image.Image:
    if isinstance(item, PIL.Image.Image):
        return item if item.mode == "RGB" else item.convert("RGB")
    array = np.asarray(item)
    if array.dtype != np.uint8:
        raise MediaError(f"frame {index} is a {array.dtype} array; frames must be uint8 RGB (H x W x 3)")
    if array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3, 4)):
        image = PIL.Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[2] == 1 else array)
        return image if image.mode == "RGB" else image.convert("RGB")
    raise MediaError(f"frame {index} has shape {array.shape}; frames must be H x W x 3 uint8 RGB arrays")


# --------------------------------------------------------------------------------------------------------------------
# Colour and orientation, as the reference's OpenCV gives them
#
# The reference reads frames with OpenCV 4 (NVlabs/VILA llava/utils/media.py, _load_video), whose FFmpeg backend
# converts with swscale's defaults (opencv modules/videoio/src/cap_ffmpeg_impl.hpp, retrieveFrame: SWS_BICUBIC and no
# colour details): the BT.601 matrix whatever matrix the stream is tagged with, full range only for the "yuvj" pixel
# formats and grey, limited otherwise even where the stream says full range. PyAV is told exactly that (bit-exact
# with opencv-python-headless 4.8 and 4.11 on 8-bit streams). OpenCV 5 and decord follow the stream's tags and cannot
# be told otherwise: OpenCV's frames of a stream they would colour differently are decoded again by PyAV, and decord,
# which is only chosen when neither PyAV nor OpenCV opens the file, warns when forced on such a stream.
#
# Frames are turned by the container's display matrix as OpenCV 4.8 turns them: the reference pins
# opencv-python-headless 4.8.0.76, whose FFmpeg backend applies the display matrix (newer OpenCV 4.11 stopped finding
# it, and decord turns some files itself). OpenCV's angle (cap_ffmpeg_impl.hpp, get_rotation_angle) is
# -cvRound(av_display_rotation_get(matrix)) taken into [0, 360); only 90, 180 and 270 turn the frame (cv::rotate,
# rotateFrame), any other angle leaves it as stored, and a flip only counts through the angle it gives. Every backend
# decodes frames as stored and turns them the same way, before the frame transform, so tiles see the turned frame.

# AVColorSpace values a tag-honouring decoder converts like the reference: unspecified, reserved and the BT.601 pair.
_REFERENCE_MATRICES = frozenset({2, 3, 5, 6})
_AVCOL_RANGE_JPEG = 2


def _full_range_format(name: str) -> bool:
    """swscale's own range for a pixel format when it is told nothing: full for yuvj* and grey, else limited."""
    return name.startswith(("yuvj", "gray", "ya"))


def reference_rgb(frame: Any) -> np.ndarray:
    """A decoded PyAV frame as the reference's OpenCV converts it: H x W x 3 uint8 RGB."""
    fmt = frame.format
    if fmt.is_rgb or fmt.has_palette:
        return frame.to_ndarray(format="rgb24", interpolation="BICUBIC")
    return frame.to_ndarray(
        format="rgb24",
        src_colorspace="ITU601",
        src_color_range="JPEG" if _full_range_format(fmt.name) else "MPEG",
        interpolation="BICUBIC",
    )


def _tags_change_colour(stream: Any) -> bool:
    """Whether a decoder that follows the stream's colour tags (OpenCV 5, decord) gives other colours than the
    reference's: a matrix other than BT.601, or full range flagged on a pixel format swscale takes as limited."""
    import av

    cc = stream.codec_context
    if cc.pix_fmt is None:
        return False
    fmt = av.VideoFormat(cc.pix_fmt)
    if fmt.is_rgb or fmt.has_palette:
        return False
    full_flag = int(cc.color_range) == _AVCOL_RANGE_JPEG
    return int(cc.colorspace) not in _REFERENCE_MATRICES or (full_flag and not _full_range_format(fmt.name))


def _stream_tags_change_colour(path: Path) -> bool:
    """``_tags_change_colour`` for a file's first video stream; False when PyAV cannot read it."""
    if not _importable("av"):
        return False
    import av

    try:
        with av.open(str(path)) as container:
            return bool(container.streams.video) and _tags_change_colour(container.streams.video[0])
    except Exception:  # noqa: BLE001 - unreadable for PyAV: nothing to compare with
        return False


def _opencv_quarter_turns(rotation: float) -> int:
    """Counter-clockwise quarter turns (``np.rot90``'s k) OpenCV 4.8 gives a frame whose display matrix has
    ``av_display_rotation_get`` = ``rotation`` (counter-clockwise degrees): its clockwise angle
    ``-cvRound(rotation) mod 360`` (cvRound rounds halves to even, as ``round``) turns the frame at 90, 180 and 270."""
    if not math.isfinite(rotation):
        return 0
    return {90: 3, 180: 2, 270: 1}.get(-round(rotation) % 360, 0)


def _display_rotation(matrix: Sequence[int]) -> float:
    """FFmpeg's av_display_rotation_get in the same double arithmetic: counter-clockwise degrees, NaN when degenerate."""
    a, b, c, d = (v / 65536 for v in (matrix[0], matrix[1], matrix[3], matrix[4]))
    scale0, scale1 = math.hypot(a, c), math.hypot(b, d)
    if scale0 == 0.0 or scale1 == 0.0:
        return math.nan
    return -(math.atan2(b / scale1, a / scale0) * 180 / math.pi)


def _quarter_turns(stream: Any, frame: Any | None) -> int:
    """OpenCV 4.8's quarter turns for a PyAV stream: the display matrix PyAV attaches to a decoded frame (PyAV 14 and
    later), else the stream's own rotation (PyAV 13 and older expose ``av_display_rotation_get`` on the stream)."""
    for data in getattr(frame, "side_data", None) or ():
        if str(getattr(data.type, "name", data.type)).endswith("DISPLAYMATRIX"):
            matrix = np.frombuffer(bytes(data), np.int32)
            return _opencv_quarter_turns(_display_rotation(matrix)) if matrix.size == 9 else 0
    side = getattr(stream, "side_data", None)
    rotation = side.get("DISPLAYMATRIX") if isinstance(side, dict) else None
    return _opencv_quarter_turns(float(rotation)) if isinstance(rotation, (int, float)) else 0


def _first_frame(path: Path, pixels: bool = False) -> tuple[int | None, np.ndarray | None, bool]:
    """A file's quarter turns, read with PyAV, where asked its first frame as stored (the reference's colours), and
    whether its colour tags change colour (``_tags_change_colour``), all from one opening of the file;
    (None, None, False) when PyAV is missing or cannot decode the file."""
    if not _importable("av"):
        return None, None, False
    import av

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            frame = next(container.decode(stream), None)
            rgb = reference_rgb(frame) if pixels and frame is not None else None
            return _quarter_turns(stream, frame), rgb, _tags_change_colour(stream)
    except Exception:  # noqa: BLE001 - unreadable for PyAV: the other decoder's frames stand
        return None, None, False


_TRANSPOSE = {1: PIL.Image.Transpose.ROTATE_90, 2: PIL.Image.Transpose.ROTATE_180, 3: PIL.Image.Transpose.ROTATE_270}


def _turn(image: PIL.Image.Image, quarter_turns: int) -> PIL.Image.Image:
    """``image`` turned counter-clockwise by ``quarter_turns`` quarter turns (a pixel permutation, as cv::rotate)."""
    return image.transpose(_TRANSPOSE[quarter_turns % 4]) if quarter_turns % 4 else image


class _PtsFrames:
    """PyAV frames found by the timestamp OpenCV reports for the frame it just returned, converted as the reference.

    OpenCV's frame timestamp is the frame's pts, or its packet dts where the pts is missing or 0
    (cap_ffmpeg_impl.hpp, grabFrame), so the same rule picks the frame here. Frames are asked for in increasing order:
    decoding goes on from the last one, and seeks back to the keyframe before a frame that is behind or far ahead.
    """

    FORWARD_S = 2.0  # decode forward rather than seek up to this far ahead

    def __init__(self, path: Path) -> None:
        import av

        self._container = av.open(str(path))
        self._stream = self._container.streams.video[0]
        self._stream.thread_type = PYAV_THREAD_TYPE
        self._time_base = float(self._stream.time_base or 0)
        self._start = self._stream.start_time or 0
        self._frames: Iterator[Any] | None = None
        self._last: int | None = None

    @staticmethod
    def _key(frame: Any) -> int | None:
        return frame.pts if frame.pts not in (None, 0) else frame.dts

    def rgb(self, msec: float) -> np.ndarray | None:
        if self._time_base <= 0 or not math.isfinite(msec):
            return None
        target = self._start + round(msec / 1000 / self._time_base)
        ahead = self.FORWARD_S / self._time_base
        try:
            if self._frames is None or self._last is None or not 0 < target - self._last <= ahead:
                self._container.seek(max(target, self._start), stream=self._stream, backward=True, any_frame=False)
                self._frames = self._container.decode(self._stream)
            for frame in self._frames:
                key = self._key(frame)
                if key is None:
                    continue
                self._last = key
                if key == target:
                    return reference_rgb(frame)
                if key > target and frame.pts not in (None, 0):
                    break
        except Exception:  # noqa: BLE001 - a seek or decoding error: OpenCV's own pixels are kept
            pass
        self._frames = None
        return None

    def close(self) -> None:
        self._frames = None
        self._container.close()


# --------------------------------------------------------------------------------------------------------------------
# Video files


class _Reader(Protocol):
    """A decoder positioned on one file. ``read`` yields each requested index with its RGB image, or None."""

    name: str
    frame_count: int
    fps: float

    def decodable(self, index: int) -> bool: ...

    def read(self, indices: Sequence[int]) -> Iterator[tuple[int, PIL.Image.Image | None]]: ...

    def close(self) -> None: ...


class _OpenCVReader:
    """OpenCV (FFmpeg) decoder; also the source of the frame count and fps the reference uses."""

    name = "opencv"

    def __init__(
        self, path: Path, threads: int = 0, *, quarter_turns: int | None = None, recolour: bool | None = None
    ) -> None:
        import cv2

        self._cv2 = cv2
        self._path = str(path)
        params = [cv2.CAP_PROP_N_THREADS, threads] if threads > 0 else []
        self._cap = cv2.VideoCapture(self._path, cv2.CAP_FFMPEG, params)
        if not self._cap.isOpened():
            self._cap.release()
            raise MediaError(f"{path} is not a video OpenCV can open")
        # Whether OpenCV turns frames itself depends on its version (4.8 to 4.10 and 5 do, 4.11 does not find the
        # display matrix): frames are taken as stored and turned here, the same way whatever the version.
        if hasattr(cv2, "CAP_PROP_ORIENTATION_AUTO"):
            self._cap.set(cv2.CAP_PROP_ORIENTATION_AUTO, 0)
        # Both found with one PyAV opening at the first frame read when not given (a reopened reader is given them).
        self._turns = quarter_turns
        self._tags_change_colour = recolour
        self._recolour: _PtsFrames | bool | None = None  # PyAV's frames where the tags change colour
        self._own_colour = 0  # frames whose pixels could not be recoloured
        count = self._cap.get(cv2.CAP_PROP_FRAME_COUNT)
        self.frame_count = int(count) if np.isfinite(count) else 0
        self.fps = float(self._cap.get(cv2.CAP_PROP_FPS))
        self._next = 0  # index the next grab() returns; None when unknown (after a failure)

    def decodable(self, index: int) -> bool:
        """The reference's check: seek to ``index`` and grab."""
        self._cap.set(self._cv2.CAP_PROP_POS_FRAMES, index)
        ok = bool(self._cap.grab())
        self._next = index + 1 if ok else None
        return ok

    def count_frames(self) -> int:
        """Count by decoding, for containers without a usable frame count. A second capture does the counting:
        some demuxers (a still image) cannot seek back after the end."""
        counter = self._cv2.VideoCapture(self._path, self._cv2.CAP_FFMPEG)
        try:
            count = 0
            while count < MAX_COUNTED_FRAMES and counter.grab():
                count += 1
            return count
        finally:
            counter.release()

    def read(self, indices: Sequence[int]) -> Iterator[tuple[int, PIL.Image.Image | None]]:
        cap, cv2 = self._cap, self._cv2
        for i in indices:
            if self._next is None or i < self._next or i - self._next > OPENCV_MAX_GRAB_GAP:
                cap.set(cv2.CAP_PROP_POS_FRAMES, i)
                self._next = i
            ok = True
            while ok and self._next < i:  # grab() decodes without the colour conversion that retrieve() adds
                ok = cap.grab()
                self._next += 1
            frame = None
            if ok and cap.grab():
                ok, frame = cap.retrieve()
            if not ok or frame is None:
                self._next = None
                yield i, None
                continue
            self._next = i + 1
            yield i, self._pixels(i, frame)

    def _probe(self) -> None:
        turns, _, self._tags_change_colour = _first_frame(Path(self._path))
        if self._turns is None:
            if turns is None and hasattr(self._cv2, "CAP_PROP_ORIENTATION_META"):
                turns = _opencv_quarter_turns(-self._cap.get(self._cv2.CAP_PROP_ORIENTATION_META))
            self._turns = turns or 0

    def quarter_turns(self) -> int:
        """The display matrix's quarter turns: PyAV's reading of it, else OpenCV's own (0 where OpenCV 4.11 misses it)."""
        if self._turns is None:
            self._probe()
        return self._turns

    def tags_change_colour(self) -> bool:
        """Whether OpenCV 5 would colour this file other than the reference (then PyAV decodes its frames)."""
        if self._tags_change_colour is None:
            self._probe()
        return bool(self._tags_change_colour)

    def _pixels(self, index: int, frame: np.ndarray) -> PIL.Image.Image:
        """OpenCV's frame, or where OpenCV would colour it by the stream's tags, the same frame decoded by PyAV;
        turned by the display matrix."""
        return _turn(self._stored_pixels(index, frame), self.quarter_turns())

    def _stored_pixels(self, index: int, frame: np.ndarray) -> PIL.Image.Image:
        if self._recolour is None:
            self._recolour = False
            if self.tags_change_colour():
                with contextlib.suppress(Exception):
                    self._recolour = _PtsFrames(Path(self._path))
        if self._recolour:
            rgb = self._recolour.rgb(self._cap.get(self._cv2.CAP_PROP_POS_MSEC))
            if rgb is not None and rgb.shape == frame.shape:
                return PIL.Image.fromarray(rgb)
            if not self._own_colour:
                warnings.warn(
                    f"frame {index} of {self._path} keeps OpenCV's colours (PyAV could not find it): OpenCV follows the "
                    "stream's colour tags where the reference converts with BT.601, so its colours may differ",
                    stacklevel=2,
                )
            self._own_colour += 1
        return _bgr_to_pil(frame)

    def close(self) -> None:
        self._cap.release()
        if self._recolour:
            self._recolour.close()


def _bgr_to_pil(frame: np.ndarray) -> PIL.Image.Image:
    """BGR -> RGB in the one copy PIL makes anyway (same pixels as cvtColor + fromarray)."""
    frame = np.ascontiguousarray(frame)
    height, width = frame.shape[:2]
    return PIL.Image.frombuffer("RGB", (width, height), frame, "raw", "BGR", 0, 1)


class _PyAVReader:
    """PyAV (FFmpeg) decoder that seeks to the keyframe at or before a frame and decodes forward to it.

    Frame ``i`` is the frame whose pts is ``i`` frame durations after the first frame's, in OpenCV's own arithmetic
    (``floor(seconds * fps + 0.5)`` from the stream start, minus the first frame's number), so on a constant-frame-rate
    stream the numbering is OpenCV's. Every decoded frame's pts is checked against the wanted index; a frame that cannot
    be located exactly (no pts, a gap, a decoding error, past the end) is read by OpenCV instead, like the whole file
    when ``_open_reader`` finds PyAV's frame count, fps or rate disagreeing with OpenCV's.
    """

    name = "pyav"

    def __init__(
        self, path: Path, threads: int = 0, *, origin: int | None = None, quarter_turns: int | None = None
    ) -> None:
        import av

        self._path = path
        self._threads = threads
        try:
            self._container = av.open(str(path))
        except Exception as e:  # av.error.InvalidDataError and friends; FileNotFoundError is caught earlier
            raise MediaError(f"{path} is not a video PyAV can open: {_first_line(e)}") from e
        try:
            if not self._container.streams.video:
                raise MediaError(f"{path} has no video stream")
            stream = self._container.streams.video[0]
            stream.thread_type = PYAV_THREAD_TYPE
            if threads > 0:
                stream.thread_count = threads
            self._stream = stream
            self.frame_count = int(stream.frames or 0)
            rate = stream.average_rate
            self._rate = Fraction(rate) if rate else Fraction(0)
            self.fps = float(self._rate)
            # Constant frame rate: FFmpeg's guessed (r_frame_rate-based) rate, which OpenCV reports, is the average.
            self.constant_rate = bool(rate) and stream.guessed_rate == rate
            self._time_base = Fraction(stream.time_base) if stream.time_base else Fraction(0)
            self._start = stream.start_time or 0
            self._frames: Iterator[Any] | None = None  # the decoding after the last seek
            self._next: int | None = None  # index of the frame ``self._frames`` yields next; None when unknown
            self._last_key: int | None = None
            self._gop = 0  # keyframe interval seen while decoding; 0 until two keyframes were seen
            self._fallback: _OpenCVReader | None = None
            self._held: tuple[int, Any] | None = None  # a frame decoded ahead (the first one)
            if not self._rate or not self._time_base:
                raise MediaError(f"{path} has no frame rate or time base PyAV can number frames with")
            if origin is None:
                # OpenCV numbers frames from the first decoded frame's pts: decode it once (it is frame 0).
                self._frames = self._container.decode(stream)
                first = next(self._frames, None)
                if first is None or first.pts is None:
                    raise MediaError(f"{path} has no frame PyAV can decode with a timestamp")
                origin = self._number(first.pts)
                self._held, self._next = (0, first), 1
                self._note_key(0, first)
                quarter_turns = _quarter_turns(stream, first)
            self.origin = origin
            self.quarter_turns = quarter_turns if quarter_turns is not None else _first_frame(path)[0] or 0
        except MediaError:
            self._container.close()
            raise
        except Exception as e:
            self._container.close()
            raise MediaError(f"{path} is not a video PyAV can decode: {_first_line(e)}") from e

    def reopen(self, threads: int) -> _PyAVReader:
        """Another decoder on the same file (for a decoding thread), numbering frames like this one."""
        return _PyAVReader(self._path, threads, origin=self.origin, quarter_turns=self.quarter_turns)

    def _number(self, pts: int) -> int:
        # OpenCV's dts_to_frame_number, floor((pts - start_time) * time_base * fps + 0.5), in exact integers.
        scale = self._time_base * self._rate
        return (2 * (pts - self._start) * scale.numerator + scale.denominator) // (2 * scale.denominator)

    def _index(self, frame: Any) -> int | None:
        return None if frame.pts is None else self._number(frame.pts) - self.origin

    def _note_key(self, index: int, frame: Any) -> None:
        if frame.key_frame:
            if self._last_key is not None and index > self._last_key:
                self._gop = index - self._last_key
            self._last_key = index

    def _seek(self, index: int) -> None:
        # Half a frame early: the keyframe at or before frame ``index`` even when its pts is rounded down.
        seconds = Fraction(2 * (index + self.origin) - 1, 2) / self._rate
        target = self._start + math.floor(seconds / self._time_base)
        self._container.seek(max(target, self._start), stream=self._stream, backward=True, any_frame=False)
        self._frames = self._container.decode(self._stream)
        self._next = None
        self._held = None
        self._last_key = None  # keyframe intervals are only learnt from uninterrupted decoding

    def _forward(self, index: int) -> bool:
        """Whether decoding on reaches ``index`` at least as cheaply as a seek (it is in the current group)."""
        if self._frames is None or self._next is None or index < self._next:
            return False
        if index - self._next <= PYAV_MIN_GRAB_GAP:
            return True
        return self._gop > 0 and self._last_key is not None and index < self._last_key + self._gop

    def _decode(self, index: int) -> Any | None:
        """The decoded frame numbered ``index``, or None where PyAV cannot find exactly that frame."""
        if self._held is not None:
            held_index, frame = self._held
            if held_index == index:
                return frame
            if index < held_index:
                self._frames = None  # behind the decoding: seek
        self._held = None
        try:
            if not self._forward(index):
                self._seek(index)
            assert self._frames is not None
            for frame in self._frames:
                k = self._index(frame)
                if k is None:
                    break
                self._next = k + 1
                self._note_key(k, frame)
                if k == index:
                    return frame
                if k > index:  # a gap in the timestamps, or the seek landed after the frame
                    self._held = (k, frame)
                    return None
        except Exception:  # a seek or decoding error (corrupt data): start over with a seek next time
            pass
        self._frames, self._next = None, None  # the end of the stream, or lost
        return None

    def _opencv(self) -> _OpenCVReader | None:
        if self._fallback is None and _importable("cv2"):
            with contextlib.suppress(MediaError):
                self._fallback = _OpenCVReader(self._path, self._threads, quarter_turns=self.quarter_turns)
        return self._fallback

    def decodable(self, index: int) -> bool:
        if index < 0:
            return False
        if self._decode(index) is not None:
            return True
        fallback = self._opencv()
        return fallback is not None and fallback.decodable(index)

    def read(self, indices: Sequence[int]) -> Iterator[tuple[int, PIL.Image.Image | None]]:
        for i in indices:
            frame = self._decode(i) if i >= 0 else None
            if frame is not None:
                yield i, _turn(PIL.Image.fromarray(reference_rgb(frame)), self.quarter_turns)
                continue
            fallback = self._opencv()
            yield next(iter(fallback.read([i]))) if fallback is not None else (i, None)

    def close(self) -> None:
        self._frames = None
        self._held = None
        self._container.close()
        if self._fallback is not None:
            self._fallback.close()


class _DecordCannotTurn(MediaError):
    """decord's frames of a file it turns by 90 degrees are unusable."""


class _DecordReader:
    """decord decoder (frame by frame, not ``get_batch``: progress, per-frame failures, bounded memory). It knows the
    keyframes, so a frame costs at most one group of pictures, but each decoded frame costs more CPU than OpenCV's."""

    name = "decord"

    def __init__(self, path: Path, threads: int = 0, *, extra_turns: int | None = None) -> None:
        import decord

        try:
            self._vr = decord.VideoReader(str(path), num_threads=threads)
        except Exception as e:  # decord raises RuntimeError / DECORDError / AssertionError for unreadable files
            raise MediaError(f"{path} is not a video decord can open: {_first_line(e)}") from e
        self.frame_count = len(self._vr)
        self.fps = float(self._vr.get_avg_fps())
        # decord 0.6 turns a 90 / 270 degree MP4 / MOV into 4-channel frames of garbage: such a file is left to
        # PyAV or OpenCV.
        try:
            first = self._vr[0] if self.frame_count > 0 else None
            if first is not None:
                first = first.asnumpy() if hasattr(first, "asnumpy") else np.asarray(first)
        except Exception as e:  # noqa: BLE001 - decord's RuntimeError / DECORDError on undecodable data
            self._vr = None
            raise MediaError(f"{path} is not a video decord can decode: {_first_line(e)}") from e
        if first is not None and (first.ndim != 3 or first.shape[2] != 3):
            self._vr = None
            raise _DecordCannotTurn(
                f"decord cannot decode {path} correctly (a video turned by 90 degrees?); use backend='pyav' or 'opencv'"
            )
        self.extra_turns = extra_turns if extra_turns is not None else self._extra_turns(path, first)

    @staticmethod
    def _extra_turns(path: Path, first: np.ndarray | None) -> int:
        """Quarter turns still to apply to decord's frames: decord turns some files itself (a 180 degree MP4 / MOV,
        by its own FFmpeg's reading of the container) and not others (MKV), so what it did is found by comparing
        its first frame with PyAV's, as stored."""
        turns, stored, _ = _first_frame(path, pixels=True)
        if not turns or first is None or stored is None:
            return 0
        done = [k for k in range(4) if np.rot90(stored, k).shape == first.shape]
        errors = {k: np.abs(np.rot90(stored, k).astype(np.int16) - first).mean() for k in done}
        return (turns - min(errors, key=errors.__getitem__)) % 4 if errors else 0

    def _decode(self, index: int) -> Any:
        # seek_accurate skips forward inside the current group of pictures and seeks to the keyframe otherwise.
        self._vr.seek_accurate(index)
        return self._vr.next()

    def decodable(self, index: int) -> bool:
        if not 0 <= index < self.frame_count:
            return False
        try:
            self._decode(index)
        except Exception:
            return False
        return True

    def read(self, indices: Sequence[int]) -> Iterator[tuple[int, PIL.Image.Image | None]]:
        for i in indices:
            if not 0 <= i < self.frame_count:
                yield i, None
                continue
            try:
                frame = self._decode(i)
            except Exception:
                yield i, None
                continue
            # asnumpy for decord's own arrays; np.asarray when a global decord bridge returns another type.
            image = PIL.Image.fromarray(frame.asnumpy() if hasattr(frame, "asnumpy") else np.asarray(frame))
            yield i, _turn(image, self.extra_turns)

    def close(self) -> None:
        self._vr = None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[-1][:200] if text else type(error).__name__


@contextlib.contextmanager
def _open_reader(path: Path, backend: str | None, name: str) -> Iterator[tuple[_Reader, int, float]]:
    """Open the decoding backend and read the frame count / fps (OpenCV's when available, as the reference)."""
    have = {"pyav": _importable("av"), "opencv": _importable("cv2"), "decord": _importable("decord")}
    if backend == "pyav" and not have["pyav"]:
        raise MediaError("video backend 'pyav' is not installed: pip install av, or use backend='opencv'")
    if backend == "opencv" and not have["opencv"]:
        raise MediaError("video backend 'opencv' needs OpenCV: pip install opencv-python-headless")
    if backend == "decord" and not have["decord"]:
        raise MediaError("video backend 'decord' is not installed: pip install decord, or use backend='opencv'")
    if not any(have.values()):
        raise MediaError("decoding videos needs OpenCV, PyAV or decord: pip install opencv-python-headless av")
    meta: _OpenCVReader | None = None
    reader: _Reader | None = None
    failed: list[str] = []  # backends that cannot open the file
    try:
        if have["opencv"]:
            try:
                meta = _OpenCVReader(path)
            except MediaError:
                failed.append("OpenCV")
        for candidate_name in [backend] if backend else AUTO_BACKENDS:
            if candidate_name == "opencv" and meta is not None:
                reader = meta
            elif candidate_name == "pyav" and have["pyav"]:
                try:
                    pyav = _PyAVReader(path)
                except MediaError:
                    failed.append("PyAV")
                    continue
                # PyAV numbers frames by their timestamps; automatic mode takes it only where that numbering is
                # OpenCV's: a constant frame rate, and the same frame count and fps.
                if backend == "pyav" or meta is None or _pyav_agrees(pyav, meta):
                    reader = pyav
                else:
                    pyav.close()
            elif candidate_name == "decord" and have["decord"]:
                try:
                    candidate = _DecordReader(path)
                except MediaError as e:
                    if backend == "decord" and isinstance(e, _DecordCannotTurn):
                        raise  # forced on such a file: say why rather than that the file looks corrupt
                    failed.append("decord")
                    continue
                # decord numbers frames its own way when the container's count is missing or wrong; indices must mean
                # what they mean to the reference's OpenCV, so automatic mode only takes decord when both agree.
                if backend == "decord" or meta is None or candidate.frame_count == meta.frame_count:
                    reader = candidate
                    if _stream_tags_change_colour(path):
                        warnings.warn(
                            f"decord converts {name} by its colour tags where the reference uses BT.601, so colours "
                            "differ by up to ~40 levels; use backend='pyav' or the automatic choice",
                            stacklevel=3,
                        )
                else:
                    candidate.close()
            if reader is not None:
                break
        if reader is None:
            raise MediaError(
                f"cannot decode {name}: not a video, or truncated or corrupt ({' and '.join(failed)} cannot open it); "
                "check that it plays, or re-encode it (e.g. ffmpeg -i in.mp4 -c:v libx264 out.mp4)"
            )
        frame_count, fps = (meta.frame_count, meta.fps) if meta is not None else (reader.frame_count, reader.fps)
        if frame_count <= 0:
            # No usable count (a PNG through FFmpeg's image demuxer, a stream without one): the reference stops with
            # "no frames"; decord's own count, else counting by decoding, makes such a file usable.
            frame_count = reader.frame_count if reader is not meta else 0
            if frame_count <= 0 and meta is not None:
                frame_count = meta.count_frames()
        logger.debug("%s: decoder %s, %d frames at %.3f fps", name, type(reader).__name__.strip("_"), frame_count, fps)
        yield reader, frame_count, fps if np.isfinite(fps) else 0.0
    finally:
        if reader is not None and reader is not meta:
            reader.close()
        if meta is not None:
            meta.close()


def _pyav_agrees(pyav: _PyAVReader, meta: _OpenCVReader) -> bool:
    return (
        pyav.constant_rate
        and pyav.origin == 0
        and pyav.frame_count == meta.frame_count
        and abs(pyav.fps - meta.fps) <= PYAV_FPS_RTOL * abs(meta.fps)
    )


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def _load_file(
    path: Path,
    num_frames: int,
    fps: float,
    backend: str | None,
    progress: bool | None,
    transform: FrameTransform,
    *,
    name: str,
) -> DecodedVideo:
    if path.stat().st_size == 0:
        raise MediaError(f"video file is empty: {name}; check the file (an interrupted copy or download?)")
    with _say_what_it_is(path, name), _open_reader(path, backend, name) as (reader, frame_count, video_fps):
        if fps > 0 and video_fps <= 0:
            warnings.warn(
                f"{name} has no frame rate; sampling {num_frames} frames uniformly instead of at {fps} fps",
                stacklevel=2,
            )
            fps = 0.0
        indices = sample_indices(frame_count, num_frames, fps=fps, video_fps=video_fps)
        if indices and frame_count - 1 not in indices:
            # The reference's last-decodable-frame check; when the last frame is sampled, decoding it is the check.
            frame_count = last_decodable_count(reader.decodable, frame_count)
            indices = sample_indices(frame_count, num_frames, fps=fps, video_fps=video_fps)
        decoded: dict[int, PIL.Image.Image] = {}
        failed: set[int] = set()
        while indices:
            todo = sorted(set(indices) - decoded.keys() - failed)
            with _progress_bar(len(todo), progress, "decoding frames") as bar:
                for i, frame in _read_frames(reader, path, todo, transform):
                    if frame is None:
                        failed.add(i)
                    else:
                        decoded[i] = frame
                    bar.update(1)
            if frame_count - 1 not in failed:
                break
            # The container's count was too high: the reference's count is the last frame that seeks and decodes.
            corrected = last_decodable_count(reader.decodable, frame_count)
            if corrected == frame_count:
                break
            frame_count = corrected
            indices = sample_indices(frame_count, num_frames, fps=fps, video_fps=video_fps)
        duration = frame_count / video_fps if video_fps > 0 else 0.0
        if fps <= 0:
            _warn_repeats(name, frame_count, num_frames)
        return _result(decoded, indices, sorted(failed.intersection(indices)), duration=duration, name=name)


@contextlib.contextmanager
def _say_what_it_is(path: Path, name: str) -> Iterator[None]:
    """A PDF, a text file, audio...: say what it is rather than that it is a corrupt video. Only asked once the
    decoders have failed, so nothing FFmpeg reads (a text playlist, say) is turned away."""
    try:
        yield
    except MediaError as e:
        kind = sniff_file(path)
        if kind is not None:
            raise MediaError(unsupported_message(name, kind)) from e
        raise


def _warn_repeats(name: str, frame_count: int, num_frames: int) -> None:
    """More frames asked for than there are: uniform sampling repeats frames, as the reference's does."""
    if 0 < frame_count < num_frames:
        warnings.warn(
            f"{name} has {frame_count} frames but {num_frames} were asked for, so frames repeat; "
            f"ask for at most {frame_count} (num_video_frames / --num-video-frames)",
            stacklevel=4,
        )


def video_cpus() -> int:
    """CPUs the decoders may use: ``$VILA_VIDEO_THREADS`` when set, else the CPUs this process may run on."""
    env = os.environ.get("VILA_VIDEO_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def decode_workers(frames: int, cpus: int) -> int:
    """Parallel decoders for ``frames`` frames: one per CPU, at most ``MAX_DECODE_WORKERS``, each with at least
    ``MIN_FRAMES_PER_WORKER`` frames (opening a decoder and its first seek have a cost)."""
    return max(1, min(cpus, frames // MIN_FRAMES_PER_WORKER, MAX_DECODE_WORKERS))


def _read_frames(
    reader: _Reader, path: Path, todo: list[int], transform: FrameTransform
) -> Iterator[tuple[int, PIL.Image.Image | None]]:
    """Decode the sorted indices ``todo``, transformed, as they arrive.

    Many frames are split into contiguous runs, each decoded by its own decoder in a thread (OpenCV and decord
    release the GIL while decoding), so the seeks and decoding of the runs overlap.
    """
    cpus = video_cpus()
    workers = decode_workers(len(todo), cpus)
    if workers == 1:
        for i, frame in reader.read(todo):
            yield i, None if frame is None else transform(frame)
        return
    threads = max(1, cpus // workers)
    chunks = [chunk.tolist() for chunk in np.array_split(np.asarray(todo), workers)]
    results: queue.Queue[tuple[int, PIL.Image.Image | None, BaseException | None]] = queue.Queue()
    stop = threading.Event()

    def work(k: int, chunk: list[int]) -> None:
        own: _Reader | None = None
        try:
            # The first run reuses the reader that is already open; the others open their own.
            source = reader if k == 0 else (own := _reopen(reader, path, threads))
            for i, frame in source.read(chunk):
                if stop.is_set():
                    return
                results.put((i, None if frame is None else transform(frame), None))
        except BaseException as e:  # handed to the caller's thread, which re-raises it
            results.put((-1, None, e))
        finally:
            if own is not None:
                own.close()

    with ThreadPoolExecutor(workers, thread_name_prefix="vila-video") as pool:
        for k, chunk in enumerate(chunks):
            pool.submit(work, k, chunk)
        try:
            for _ in range(len(todo)):
                i, frame, error = results.get()
                if error is not None:
                    raise error
                yield i, frame
        finally:
            stop.set()


def _reopen(reader: _Reader, path: Path, threads: int) -> _Reader:
    if isinstance(reader, _PyAVReader):
        return reader.reopen(threads)
    if isinstance(reader, _OpenCVReader):
        return _OpenCVReader(path, threads, quarter_turns=reader.quarter_turns(), recolour=reader.tags_change_colour())
    if isinstance(reader, _DecordReader):
        return _DecordReader(path, threads, extra_turns=reader.extra_turns)
    return type(reader)(path, threads)


def _result(
    decoded: dict[int, PIL.Image.Image], indices: list[int], failed: Sequence[int], *, duration: float, name: str
) -> DecodedVideo:
    kept = [i for i in indices if i in decoded]
    if not kept:
        raise MediaError(f"no frame of {name} could be decoded; the file may be truncated or corrupt, re-encode it")
    if failed:
        warnings.warn(f"skipped {len(failed)} frame(s) of {name} that failed to decode: {list(failed)}", stacklevel=3)
    logger.debug("%s: %d frames decoded (indices %d to %d), %.2f s", name, len(kept), kept[0], kept[-1], duration)
    return DecodedVideo(frames=[decoded[i] for i in kept], indices=kept, duration=float(duration), source=name)


@contextlib.contextmanager
def _progress_bar(total: int, progress: bool | None, desc: str) -> Iterator[Any]:
    from tqdm import tqdm

    # By default only on a terminal: in a log file a bar is one long line of carriage returns.
    show = progress if progress is not None else (total > PROGRESS_MIN_FRAMES and sys.stderr.isatty())
    with tqdm(total=total, desc=desc, unit="frame", file=sys.stderr, disable=not show, leave=False) as bar:
        yield bar


# --------------------------------------------------------------------------------------------------------------------
# URLs


def video_cache_dir() -> Path:
    """Where downloaded videos are kept: ``$VILA_CACHE/videos``, else ``~/.cache/vila/videos``."""
    root = os.environ.get("VILA_CACHE")
    return Path(root).expanduser() / "videos" if root else Path.home() / ".cache" / "vila" / "videos"


def cached_video_path(url: str, cache_dir: Path | None = None) -> Path:
    """``sha256(url)`` plus the URL's extension: stable across runs, safe as a file name."""
    suffix = Path(urllib.parse.urlsplit(url).path).suffix.lower()
    suffix = suffix if re.fullmatch(r"\.[a-z0-9]{1,8}", suffix) else ""
    return (cache_dir or video_cache_dir()) / (hashlib.sha256(url.encode()).hexdigest() + suffix)


def download_video(url: str, *, progress: bool | None = None, cache_dir: Path | None = None) -> Path:
    """Download a video once into the cache; a temporary file is renamed into place only when complete."""
    target = cached_video_path(url, cache_dir)
    if target.is_file() and target.stat().st_size > 0:
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".part")
    except OSError as e:
        raise MediaError(
            f"cannot write the video cache {target.parent}: {e}; set VILA_CACHE to a writable folder"
        ) from e
    try:
        with os.fdopen(fd, "wb") as out:
            fetch_to(
                url, out, refuse=lambda head: _refuse_web_page(head, url), progress=progress, desc="downloading video"
            )
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return target


def _refuse_web_page(head: bytes, url: str) -> None:
    """A web page (a login or error page) is never a video; refused before it lands in the cache. Other
    content is left to the decoders, which read more than the signatures know (a text playlist, say)."""
    if sniff_unsupported(head) == "an HTML page":
        raise MediaError(unsupported_message(url, "an HTML page"))
