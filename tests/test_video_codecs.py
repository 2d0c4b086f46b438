"""Colour and orientation of videos made by real encoders (PyAV's libx264 / libx265 / libvpx-vp9).

The reference's OpenCV 4 converts YUV to RGB with the BT.601 matrix whatever the stream's colour tags say, full
range only for the "yuvj" pixel formats, and (4.8.0.76, the reference's pin) turns frames by the container's display
matrix. Every backend must give those pixels. The expected colours are computed here from the decoded Y, U, V planes
with the textbook BT.601 formula, independently of vila's code.
"""

from __future__ import annotations

import fractions
import warnings
from pathlib import Path

import numpy as np
import pytest

from vila.errors import MediaError
from vila.video import load_video

av = pytest.importorskip("av")
cv2 = pytest.importorskip("cv2")

W, H, N = 64, 48, 6
X264_709 = "colorprim=bt709:transfer=bt709:colormatrix=bt709"
# swscale's integer YUV->RGB truncates: its pixels sit up to 3 levels below the exact formula, about 1 on average.
TOLERANCE, MEAN_TOLERANCE = 3, 1.5


def backends() -> list[str | None]:
    found: list[str | None] = [None, "pyav", "opencv"]
    try:
        import decord  # noqa: F401

        found.append("decord")
    except ImportError:
        pass
    return found


def picture(i: int) -> np.ndarray:
    """Saturated gradients (where the BT.601 and BT.709 matrices differ most) and a red corner block."""
    y, x = np.mgrid[0:H, 0:W]
    img = np.stack([(x * 4 + i * 9) % 256, (y * 5 + i * 3) % 256, ((x + y) * 3 + i * 20) % 256], -1)
    img = img.astype(np.uint8)
    img[: H // 3, : W // 4] = (255, 0, 0)
    return img


def encode(
    path: Path,
    codec: str = "libx264",
    *,
    pix_fmt: str = "yuv420p",
    container: str | None = None,
    colorspace: int | None = None,
    color_range: int | None = None,
    options: dict[str, str] | None = None,
    rotation: float | None = None,
    frame_ms: list[int] | None = None,
) -> Path:
    out = av.open(str(path), "w", format=container)
    stream = out.add_stream(codec, rate=10)
    stream.width, stream.height, stream.pix_fmt = W, H, pix_fmt
    if colorspace is not None:
        stream.codec_context.colorspace = colorspace
    if color_range is not None:
        stream.codec_context.color_range = color_range
    stream.options = options or {}
    if rotation is not None:
        stream.set_display_rotation(rotation)
    if frame_ms is not None:
        stream.codec_context.time_base = fractions.Fraction(1, 1000)
    for i in range(N):
        frame = av.VideoFrame.from_ndarray(picture(i), format="rgb24")
        if frame_ms is not None:
            frame.pts, frame.time_base = frame_ms[i], fractions.Fraction(1, 1000)
        for packet in stream.encode(frame):
            out.mux(packet)
    for packet in stream.encode():
        out.mux(packet)
    out.close()
    return path


def encoder_available(name: str) -> bool:
    try:
        av.codec.Codec(name, "w")
    except Exception:  # noqa: BLE001 - not built into this PyAV
        return False
    return True


# (name, encode keyword arguments). AVColorSpace 1 = BT.709; AVColorRange 1 = limited, 2 = full.
CLIPS = {
    "untagged": dict(),
    "untagged_yuvj": dict(pix_fmt="yuvj420p", options={"x264-params": "fullrange=on"}),
    "bt709": dict(colorspace=1, color_range=1, options={"x264-params": X264_709}),
    "bt709_yuvj": dict(pix_fmt="yuvj420p", options={"x264-params": X264_709 + ":fullrange=on"}),
    "bt709_mkv": dict(container="matroska", colorspace=1, color_range=1, options={"x264-params": X264_709}),
    "hevc_bt709": dict(
        codec="libx265",
        colorspace=1,
        color_range=1,
        options={"x265-params": X264_709 + ":log-level=error"},
    ),
    # VP9 flags full range on plain yuv420p; swscale, told nothing, takes it as limited.
    "vp9_bt709_fullflag": dict(codec="libvpx-vp9", container="webm", colorspace=1, color_range=2),
    # Not a constant frame rate: PyAV's frame numbers may not be OpenCV's, so OpenCV picks the frames.
    "vfr_bt709": dict(
        colorspace=1, color_range=1, options={"x264-params": X264_709}, frame_ms=[0, 80, 120, 240, 280, 400]
    ),
}
SUFFIX = {"container": {"matroska": ".mkv", "webm": ".webm"}}


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("codecs")
    out = {}
    for name, kwargs in CLIPS.items():
        if not encoder_available(kwargs.get("codec", "libx264")):
            continue
        suffix = SUFFIX["container"].get(kwargs.get("container"), ".mp4")
        out[name] = encode(d / f"{name}{suffix}", **kwargs)
    return out


# ---------------------------------------------------------------------------------------------- expected colours


def yuv_planes(frame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Y, U, V of an 8-bit 4:2:0 frame as float arrays at full resolution (chroma repeated 2x2)."""

    def plane(k: int, h: int, w: int) -> np.ndarray:
        p = frame.planes[k]
        return np.frombuffer(bytes(p), np.uint8).reshape(-1, p.line_size)[:h, :w].astype(np.float64)

    y = plane(0, frame.height, frame.width)
    u = plane(1, frame.height // 2, frame.width // 2).repeat(2, 0).repeat(2, 1)
    v = plane(2, frame.height // 2, frame.width // 2).repeat(2, 0).repeat(2, 1)
    return y, u, v


def to_rgb(y: np.ndarray, u: np.ndarray, v: np.ndarray, kr: float, kb: float, full: bool) -> np.ndarray:
    """ITU-R BT.601 (kr 0.299, kb 0.114) or BT.709 (0.2126, 0.0722) YCbCr -> RGB, limited or full range."""
    if full:
        luma, cb, cr = y, u - 128, v - 128
    else:
        luma, cb, cr = (y - 16) * 255 / 219, (u - 128) * 255 / 224, (v - 128) * 255 / 224
    r = luma + 2 * (1 - kr) * cr
    b = luma + 2 * (1 - kb) * cb
    g = (luma - kr * r - kb * b) / (1 - kr - kb)
    return np.clip(np.rint(np.stack([r, g, b], -1)), 0, 255)


def expected(path: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Every frame of the file in BT.601 and in BT.709, with the reference's range rule (full only for yuvj)."""
    bt601, bt709 = [], []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            assert frame.format.name in ("yuv420p", "yuvj420p"), frame.format.name
            full = frame.format.name == "yuvj420p"
            planes = yuv_planes(frame)
            bt601.append(to_rgb(*planes, 0.299, 0.114, full))
            bt709.append(to_rgb(*planes, 0.2126, 0.0722, full))
    return bt601, bt709


def closest(image: np.ndarray, candidates: list[np.ndarray]) -> np.ndarray:
    """Per-pixel differences to the candidate frame it is closest to (frame choice is not tested here)."""
    diffs = [image - c for c in candidates if c.shape == image.shape]
    assert diffs, f"no frame of shape {image.shape}"
    return min(diffs, key=lambda d: np.abs(d).max())


def decode_all(path: Path, backend: str | None) -> list[np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        video = load_video(path, num_frames=N, backend=backend, progress=False)
    return [np.asarray(f, dtype=np.float64) for f in video.frames]


# --------------------------------------------------------------------------------------------------------- tests


def test_clips_carry_the_tags_they_are_made_with(clips):
    """The fixtures really are what the tests below take them for."""
    want = {"bt709": (1, "yuv420p"), "bt709_yuvj": (1, "yuvj420p"), "untagged": (2, "yuv420p")}
    for name, (colorspace, pix_fmt) in want.items():
        with av.open(str(clips[name])) as container:
            frame = next(container.decode(video=0))
            assert (int(frame.colorspace), frame.format.name) == (colorspace, pix_fmt), name
    if "vp9_bt709_fullflag" in clips:
        with av.open(str(clips["vp9_bt709_fullflag"])) as container:
            frame = next(container.decode(video=0))
            assert (frame.format.name, int(frame.color_range)) == ("yuv420p", 2)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("name", list(CLIPS))
def test_colours_are_bt601_whatever_the_tags(clips, name, backend):
    if name not in clips:
        pytest.skip(f"this PyAV cannot encode {CLIPS[name].get('codec')}")
    path = clips[name]
    bt601, bt709 = expected(path)
    tagged = name not in ("untagged", "untagged_yuvj")
    if backend == "decord" and tagged:
        # decord converts by the tags and cannot be told otherwise: it says so when forced on such a stream.
        with pytest.warns(UserWarning, match="BT.601"):
            load_video(path, num_frames=1, backend="decord", progress=False)
        return
    frames = decode_all(path, backend)
    assert len(frames) == N
    for image in frames:
        diff = closest(image, bt601)
        assert np.abs(diff).max() <= TOLERANCE and np.abs(diff).mean() <= MEAN_TOLERANCE, (name, backend)
        if tagged:
            # The BT.709 matrix (what a tag-honouring decoder uses) is far from what came out.
            off = closest(image, bt709)
            assert np.abs(off).max() >= 15 and np.abs(off).mean() >= 3, (name, backend)


@pytest.mark.parametrize("name", ["bt709", "bt709_yuvj", "vfr_bt709"])
def test_backends_give_the_same_pixels(clips, name):
    """PyAV's conversion and OpenCV's frames (re-decoded by PyAV where OpenCV would follow the tags) agree
    bit for bit, so a file that falls back from one to the other keeps the reference's colours."""
    frames = {b: decode_all(clips[name], b) for b in (None, "pyav", "opencv")}
    for image in frames["opencv"]:
        assert min(np.abs(image - other).max() for other in frames["pyav"]) == 0
    for a, b in zip(frames[None], frames["opencv" if name == "vfr_bt709" else "pyav"]):
        assert np.array_equal(a, b)


def test_opencv_reader_opens_the_file_with_pyav_once_for_turns_and_tags(clips, monkeypatch):
    """OpenCV's frames of a BT.709 file are decoded again by PyAV: one PyAV opening finds both the display matrix and
    the colour tags, and a reader reopened for another decoding thread is told them, so each reader adds only the
    opening its re-decoding needs."""
    import vila.video

    opens, readers = [], []
    real_open, real_init = av.open, vila.video._OpenCVReader.__init__

    def counting_open(*args, **kwargs):
        opens.append(args[0])
        return real_open(*args, **kwargs)

    def counting_init(self, *args, **kwargs):
        readers.append(self)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(av, "open", counting_open)
    monkeypatch.setattr(vila.video._OpenCVReader, "__init__", counting_init)
    decode_all(clips["bt709"], "opencv")
    assert readers and len(opens) == len(readers) + 1, (len(opens), len(readers))


# ------------------------------------------------------------------------------------------------------ rotation

# Counter-clockwise quarter turns (np.rot90's k) opencv-python-headless 4.8.0.76, the reference's pin, gives a frame
# whose display matrix is set with ``set_display_rotation(angle)`` (checked against it in MP4, MKV and MOV): its angle
# is -round(rotation) mod 360, and only 90, 180 and 270 turn the frame; 89.6 rounds to a quarter turn, 45 is left as is.
QUARTER_TURNS = {90: 1, 180: 2, 270: 3, -90: 3, 89.6: 1, 45: 0}
CONTAINERS = {"mp4": None, "mkv": "matroska", "mov": "mov"}


@pytest.fixture(scope="module")
def rotated(tmp_path_factory) -> dict[tuple[str, float], Path]:
    d = tmp_path_factory.mktemp("rotated")
    return {
        (kind, angle): encode(d / f"rot{angle}.{kind}", container=fmt, rotation=angle)
        for kind, fmt in CONTAINERS.items()
        for angle in QUARTER_TURNS
    }


def stored_frames(path: Path) -> list[np.ndarray]:
    """The frames as stored, by OpenCV with its own turning off (the colours are checked by the tests above)."""
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    cap.set(cv2.CAP_PROP_ORIENTATION_AUTO, 0)
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame[..., ::-1].astype(np.float64))
    cap.release()
    return frames


@pytest.mark.parametrize("angle", list(QUARTER_TURNS))
@pytest.mark.parametrize("kind", list(CONTAINERS))
def test_rotated_videos_turn_as_opencv_4_8(rotated, kind, angle):
    path, k = rotated[kind, angle], QUARTER_TURNS[angle]
    with av.open(str(path)) as container:
        frame = next(container.decode(video=0))
        if hasattr(frame, "rotation"):  # PyAV 14 and later; it truncates the angle
            assert frame.rotation % 360 == int(angle) % 360, "the file does not carry the rotation"
    stored = stored_frames(path)
    assert len(stored) == N and stored[0].shape == (H, W, 3)
    for backend in backends():
        if backend == "decord" and kind != "mkv" and k % 2:
            # decord 0.6 turns such MP4 / MOV frames into garbage: it refuses them, automatic mode skips it.
            with pytest.raises(MediaError, match="decord cannot decode .* turned by 90 degrees"):
                load_video(path, num_frames=2, backend="decord", progress=False)
            continue
        frames = decode_all(path, backend)
        assert len(frames) == N, (kind, backend)
        for image, original in zip(frames, stored):
            assert np.array_equal(image, np.rot90(original, k)), (kind, angle, backend)


@pytest.mark.parametrize("backend", [None, "opencv"])
def test_frames_are_turned_before_the_frame_transform(rotated, backend):
    """The transform (each frame reduced to its tile as soon as it is decoded) sees the whole turned frame."""
    seen = []

    def transform(image):
        seen.append(image.size)
        return image

    load_video(rotated["mp4", 90], num_frames=N, backend=backend, progress=False, transform=transform)
    assert seen == [(H, W)] * N
