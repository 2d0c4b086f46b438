"""Tests for vila/video.py: index rules, decoding backends, frame sources, bad inputs, downloads, time tokens.

Synthetic videos are written here with OpenCV; frame ``i`` shows the bits of ``i`` as 8 black/white bars, so the
index of a decoded frame can be read back despite lossy compression. A port of the reference loader
(``_load_video``, NVlabs/VILA ``llava/utils/media.py``) is the oracle for indices, durations and pixels.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
import warnings
from pathlib import Path

import cv2
import numpy as np
import PIL.Image
import pytest

from vila.errors import MediaError, UsageError
from vila.media import Video
from vila.video import (
    DecodedVideo,
    decode_workers,
    last_decodable_count,
    list_frame_files,
    load_video,
    natural_key,
    rewrite_time_tokens,
    sample_indices,
)

GOLDEN_VIDEO = Path(__file__).parent / "fixtures" / "inputs" / "video_160x120_64f_16fps.mp4"
BARS, BAR_W, H = 8, 8, 48


def bars_frame(i: int) -> np.ndarray:
    """BGR frame whose bar ``b`` is white when bit ``b`` of ``i`` is set."""
    frame = np.zeros((H, BARS * BAR_W, 3), np.uint8)
    for b in range(BARS):
        if (i >> b) & 1:
            frame[:, b * BAR_W : (b + 1) * BAR_W] = 255
    return frame


def frame_id(image: PIL.Image.Image) -> int:
    a = np.asarray(image.convert("L"), dtype=float)
    return sum(1 << b for b in range(BARS) if a[8:-8, b * BAR_W + 2 : (b + 1) * BAR_W - 2].mean() > 128)


def write_video(path: Path, n: int, fps: float = 10.0, fourcc: str = "mp4v") -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (BARS * BAR_W, H))
    assert writer.isOpened(), f"OpenCV cannot write {fourcc}"
    for i in range(n):
        writer.write(bars_frame(i))
    writer.release()
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("videos")
    out = {
        "mp4": write_video(d / "bars.mp4", 30),
        "avi": write_video(d / "bars.avi", 40, fps=8.0, fourcc="MJPG"),
    }
    data = out["avi"].read_bytes()
    out["truncated_avi"] = d / "truncated.avi"  # header says 40 frames, the last ones are cut off
    out["truncated_avi"].write_bytes(data[: int(len(data) * 0.9)])
    return out


def reference_load(path: Path, num_frames: int, fps: float = 0.0) -> tuple[list[int], list[np.ndarray], float]:
    """The reference llava `_load_video` for a video file (NVlabs/VILA `llava/utils/media.py`), verbatim in spirit."""
    cap = cv2.VideoCapture(str(path))
    video_fps = cap.get(cv2.CAP_PROP_FPS)
    frame_count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    while frame_count > 0:
        cap.set(cv2.CAP_PROP_POS_FRAMES, frame_count - 1)
        if cap.grab():
            break
        frame_count -= 1
    duration = frame_count / video_fps if video_fps > 0 else 0
    if fps > 0:
        indices = [int(t * video_fps) for t in np.arange(0, duration, 1 / fps)[:num_frames]]
    else:
        indices = np.round(np.linspace(0, frame_count - 1, num_frames)).astype(int).tolist()
    frames: dict[int, np.ndarray] = {}
    for i in indices:
        if i not in frames:
            cap.set(cv2.CAP_PROP_POS_FRAMES, i)
            ok, frame = cap.read()
            if ok:
                frames[i] = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
    kept = [i for i in indices if i in frames]
    return kept, [frames[i] for i in kept], duration


def backends() -> list[str]:
    found = ["opencv"]
    for module, name in (("av", "pyav"), ("decord", "decord")):
        try:
            __import__(module)
        except ImportError:
            continue
        found.append(name)
    return found


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


# ---------------------------------------------------------------------------------------------------------- indices


def test_uniform_indices_follow_numpy_half_to_even():
    assert sample_indices(64, 8) == [0, 9, 18, 27, 36, 45, 54, 63]
    assert sample_indices(4, 3) == [0, 2, 3]  # linspace gives 1.5 -> 2
    assert sample_indices(6, 3) == [0, 2, 5]  # 2.5 -> 2, not 3
    assert sample_indices(10, 4) == [0, 3, 6, 9]
    assert sample_indices(3, 8) == [0, 0, 1, 1, 1, 1, 2, 2]  # more frames than the video: duplicates
    assert sample_indices(50, 1) == [0]
    for count in (1, 2, 7, 33, 64, 100, 1801):
        for n in (1, 2, 3, 8, 16, 32, 128):
            assert sample_indices(count, n) == np.round(np.linspace(0, count - 1, n)).astype(int).tolist()


def test_fps_indices_follow_the_reference_formula():
    assert sample_indices(64, 100, fps=2.0, video_fps=16.0) == [0, 8, 16, 24, 32, 40, 48, 56]
    assert sample_indices(64, 3, fps=2.0, video_fps=16.0) == [0, 8, 16]  # first num_frames timestamps
    assert sample_indices(300, 4, fps=1.0, video_fps=29.97) == [0, 29, 59, 89]  # int() truncates
    for count, n, fps, vfps in [(300, 64, 3.0, 29.97), (97, 16, 0.7, 24.0), (1000, 8, 5.0, 30.0)]:
        expected = [int(t * vfps) for t in np.arange(0, count / vfps, 1 / fps)[:n]]
        assert sample_indices(count, n, fps=fps, video_fps=vfps) == expected
    assert sample_indices(64, 8, fps=2.0, video_fps=0.0) == []  # unknown frame rate: no timestamps


def test_index_rule_edge_cases():
    assert sample_indices(0, 8) == []
    assert sample_indices(-5, 8) == []
    with pytest.raises(UsageError):
        sample_indices(10, 0)


def test_last_decodable_count_equals_the_reference_decrement_loop():
    for true_count in (0, 1, 2, 5, 37, 40, 1000):
        for reported in (0, 1, 3, 40, 41, 1000, 10**9):
            probes: list[int] = []

            def decodable(i: int, true_count: int = true_count, probes: list[int] = probes) -> bool:
                probes.append(i)
                return 0 <= i < true_count

            assert last_decodable_count(decodable, reported) == min(true_count, reported)
            assert len(probes) <= 2 * max(reported, 2).bit_length() + 2  # logarithmic, even for 10**9


def test_natural_sort():
    names = ["frame10.jpg", "frame2.jpg", "frame1.jpg", "frame01.jpg", "a.jpg", "frame100.jpg"]
    assert sorted(names, key=natural_key) == [
        "a.jpg",
        "frame01.jpg",
        "frame1.jpg",
        "frame2.jpg",
        "frame10.jpg",
        "frame100.jpg",
    ]


# ---------------------------------------------------------------------------------------------------- video files


@pytest.mark.parametrize("backend", [None, *backends()])
def test_golden_video(backend):
    video = load_video(GOLDEN_VIDEO, num_frames=8, backend=backend)
    assert isinstance(video, DecodedVideo)
    assert video.indices == [0, 9, 18, 27, 36, 45, 54, 63]
    assert len(video.frames) == 8
    assert all(f.mode == "RGB" and f.size == (160, 120) for f in video.frames)
    assert video.duration == 4.0
    ref_indices, ref_frames, _ = reference_load(GOLDEN_VIDEO, 8)
    assert ref_indices == video.indices
    for ours, ref in zip(video.frames, ref_frames):
        assert np.abs(np.asarray(ours, dtype=int) - ref).max() <= 2


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("num_frames", [1, 7, 8, 30, 45])
def test_frames_are_the_sampled_ones(videos, backend, num_frames):
    video = load_video(videos["mp4"], num_frames=num_frames, backend=backend)
    assert video.indices == sample_indices(30, num_frames)
    assert [frame_id(f) for f in video.frames] == video.indices
    assert video.duration == 3.0
    repeats = [j for j in range(1, num_frames) if video.indices[j] == video.indices[j - 1]]
    assert bool(repeats) == (num_frames > 30)
    assert all(video.frames[j] is video.frames[j - 1] for j in repeats)  # a repeated index repeats the frame


@pytest.mark.parametrize("backend", backends())
def test_fps_sampling(videos, backend):
    video = load_video(videos["mp4"], num_frames=100, fps=4.0, backend=backend)
    assert video.indices == [int(t * 10) for t in np.arange(0, 3.0, 0.25)]
    assert [frame_id(f) for f in video.frames] == video.indices


def test_decord_and_opencv_agree(videos):
    pytest.importorskip("decord")
    for path in (videos["mp4"], videos["avi"], GOLDEN_VIDEO):
        for num_frames, fps in ((8, 0.0), (16, 0.0), (5, 3.0)):
            a = load_video(path, num_frames=num_frames, fps=fps, backend="decord")
            b = load_video(path, num_frames=num_frames, fps=fps, backend="opencv")
            assert a.indices == b.indices and a.duration == b.duration
            for fa, fb in zip(a.frames, b.frames):
                assert np.abs(np.asarray(fa, dtype=int) - np.asarray(fb, dtype=int)).mean() < 1.0


def frames_equal(a: DecodedVideo, b: DecodedVideo) -> bool:
    return len(a.frames) == len(b.frames) and all(
        np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a.frames, b.frames)
    )


@pytest.fixture
def pyav_only(monkeypatch):
    """PyAV must find every frame itself: its per-frame OpenCV fallback fails the test."""
    pytest.importorskip("av")
    import vila.video as vv

    def no_fallback(self):
        raise AssertionError("PyAV fell back to OpenCV")

    monkeypatch.setattr(vv._PyAVReader, "_opencv", no_fallback)


@pytest.mark.parametrize("num_frames,fps", [(8, 0.0), (16, 0.0), (45, 0.0), (100, 0.0), (5, 3.0), (100, 4.0)])
def test_pyav_and_opencv_agree(videos, pyav_only, num_frames, fps):
    """Same indices and the same pixels: both decode with FFmpeg's decoders and convert to RGB with swscale's
    default conversion, so the frames are bit-identical (no tolerance needed). 45 / 100 frames repeat indices."""
    for path in (videos["mp4"], videos["avi"], GOLDEN_VIDEO):
        a = load_video(path, num_frames=num_frames, fps=fps, backend="pyav")
        b = load_video(path, num_frames=num_frames, fps=fps, backend="opencv")
        assert a.indices == b.indices and a.duration == b.duration
        assert frames_equal(a, b)
        if path != GOLDEN_VIDEO:
            assert [frame_id(f) for f in a.frames] == a.indices


def test_pyav_decodes_out_of_order_requests_and_repeats(videos, pyav_only, monkeypatch):
    """Backward jumps seek, forward steps inside a group of pictures decode on; every frame is the one asked for."""
    import vila.video as vv

    reader = vv._PyAVReader(videos["mp4"])
    try:
        order = [29, 0, 1, 2, 13, 12, 11, 25, 29, 5, 5, 28, 3]
        got = list(reader.read(order))
        assert [i for i, _ in got] == order
        assert [frame_id(f) for _, f in got] == order
        assert reader.decodable(29)
        monkeypatch.undo()  # past the end PyAV finds no frame and asks OpenCV, which finds none either
        assert not reader.decodable(30) and not reader.decodable(-1)
    finally:
        reader.close()


def test_pyav_seeks_to_the_keyframe_of_each_frame(tmp_path, pyav_only, monkeypatch):
    """A far frame costs at most one group of pictures (OpenCV's mp4v writer puts a keyframe every 12 frames)."""
    import vila.video as vv

    path = write_video(tmp_path / "long.mp4", 100)
    decoded: list[int] = []
    original = vv._PyAVReader._index

    def index(self, frame):
        decoded.append(original(self, frame))
        return decoded[-1]

    monkeypatch.setattr(vv._PyAVReader, "_index", index)
    reader = vv._PyAVReader(path)
    try:
        for i, expected in ((0, []), (50, [48, 49, 50]), (90, [84, 85, 86, 87, 88, 89, 90]), (92, [91, 92])):
            decoded.clear()
            ((k, frame),) = reader.read([i])
            assert k == i and frame_id(frame) == i
            assert decoded == expected
    finally:
        reader.close()


def spy_reads(monkeypatch) -> dict[str, int]:
    import vila.video as vv

    calls = {"pyav": 0, "opencv": 0}
    for cls in (vv._PyAVReader, vv._OpenCVReader):
        original = cls.read

        def read(self, indices, original=original, name=cls.name):
            calls[name] += len(indices)
            return original(self, indices)

        monkeypatch.setattr(cls, "read", read)
    return calls


def test_automatic_backend_is_pyav(videos, monkeypatch):
    pytest.importorskip("av")
    calls = spy_reads(monkeypatch)
    video = load_video(videos["mp4"], num_frames=8)
    assert calls == {"pyav": 8, "opencv": 0}
    assert [frame_id(f) for f in video.frames] == video.indices == sample_indices(30, 8)


@pytest.mark.parametrize("disagreement", ["frame_count", "fps", "variable_rate"])
def test_automatic_mode_falls_back_to_opencv_when_pyav_disagrees(videos, monkeypatch, disagreement):
    """A file whose PyAV count / fps / rate differ from OpenCV's metadata is decoded by OpenCV, as the reference."""
    pytest.importorskip("av")
    import vila.video as vv

    original = vv._PyAVReader.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if disagreement == "frame_count":
            self.frame_count += 1
        elif disagreement == "fps":
            self.fps *= 1.001
        else:
            self.constant_rate = False

    monkeypatch.setattr(vv._PyAVReader, "__init__", init)
    calls = spy_reads(monkeypatch)
    video = load_video(videos["mp4"], num_frames=8)
    assert calls == {"pyav": 0, "opencv": 8}
    ref_indices, ref_frames, _ = reference_load(videos["mp4"], 8)
    assert video.indices == ref_indices
    assert all(np.array_equal(np.asarray(a), b) for a, b in zip(video.frames, ref_frames))


def test_pyav_frames_it_cannot_locate_are_read_by_opencv(videos, monkeypatch):
    """Broken timestamps: frames whose pts does not map to the wanted index come from OpenCV, the others from PyAV."""
    pytest.importorskip("av")
    import vila.video as vv

    original = vv._PyAVReader._index
    monkeypatch.setattr(
        vv._PyAVReader, "_index", lambda self, frame: None if original(self, frame) == 10 else original(self, frame)
    )
    fallbacks: list[int] = []
    opencv_read = vv._OpenCVReader.read

    def read(self, indices):
        fallbacks.extend(indices)
        return opencv_read(self, indices)

    monkeypatch.setattr(vv._OpenCVReader, "read", read)
    video = load_video(videos["mp4"], num_frames=4, backend="pyav")  # indices 0, 10, 19, 29
    assert fallbacks == [10]
    assert [frame_id(f) for f in video.frames] == video.indices == [0, 10, 19, 29]
    # a frame whose pts says it is a later frame is not taken for the wanted one either
    monkeypatch.setattr(
        vv._PyAVReader, "_index", lambda self, frame: original(self, frame) + (original(self, frame) == 19)
    )
    fallbacks.clear()
    video = load_video(videos["mp4"], num_frames=4, backend="pyav")
    assert fallbacks == [19]
    assert [frame_id(f) for f in video.frames] == video.indices == [0, 10, 19, 29]


def test_without_pyav_automatic_mode_uses_opencv(videos, monkeypatch):
    import vila.video as vv

    real = vv._importable
    monkeypatch.setattr(vv, "_importable", lambda module: module != "av" and real(module))
    video = load_video(videos["mp4"], num_frames=4)
    assert [frame_id(f) for f in video.frames] == video.indices == [0, 10, 19, 29]
    with pytest.raises(MediaError, match="pip install av"):
        load_video(videos["mp4"], num_frames=4, backend="pyav")


@pytest.mark.parametrize("name", ["mp4", "avi", "truncated_avi"])
@pytest.mark.parametrize("num_frames,fps", [(8, 0.0), (1, 0.0), (33, 0.0), (50, 3.0)])
def test_matches_the_reference_loader(videos, name, num_frames, fps):
    """Indices, duration and pixels equal the reference's, also when the container's frame count is too high."""
    path = videos[name]
    ref_indices, ref_frames, ref_duration = reference_load(path, num_frames, fps)
    video = quiet(load_video, path, num_frames=num_frames, fps=fps)
    assert video.indices == ref_indices
    assert video.duration == pytest.approx(ref_duration)
    for ours, ref in zip(video.frames, ref_frames):
        assert np.array_equal(np.asarray(ours), ref)


def test_truncated_file_uses_the_last_decodable_frame(videos):
    path = videos["truncated_avi"]
    cap = cv2.VideoCapture(str(path))
    reported = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    ref_indices, _, _ = reference_load(path, 8)
    decodable = ref_indices[-1] + 1
    if decodable >= reported:
        pytest.skip("this OpenCV build reports the decodable frame count for the truncated file")
    video = quiet(load_video, path, num_frames=8)
    assert video.indices == sample_indices(decodable, 8)
    assert [frame_id(f) for f in video.frames] == video.indices
    assert video.duration == decodable / 8.0


def test_content_not_extension_decides(videos, tmp_path):
    for name in ("clip.png", "clip.TXT", "CLIP.MP4", "noext"):
        path = tmp_path / name
        path.write_bytes(videos["mp4"].read_bytes())
        video = load_video(path, num_frames=4)
        assert [frame_id(f) for f in video.frames] == video.indices == [0, 10, 19, 29]


def test_bytes_and_holder_sources(videos):
    data = videos["mp4"].read_bytes()
    assert load_video(data, num_frames=3).indices == [0, 14, 29]
    assert load_video(Video(str(videos["mp4"])), num_frames=3).indices == [0, 14, 29]
    with open(videos["mp4"], "rb") as f:
        assert [frame_id(x) for x in load_video(f, num_frames=2).frames] == [0, 29]


def test_failed_frames_are_skipped_with_a_warning(videos, monkeypatch):
    import vila.video as vv

    original = vv._OpenCVReader.read

    def flaky(self, indices):
        for i, frame in original(self, indices):
            yield i, None if i == 10 else frame

    monkeypatch.setattr(vv._OpenCVReader, "read", flaky)
    with pytest.warns(UserWarning, match=r"skipped 1 frame.*\[10\]"):
        video = load_video(videos["mp4"], num_frames=4, backend="opencv")
    assert video.indices == [0, 19, 29]
    assert [frame_id(f) for f in video.frames] == [0, 19, 29]

    monkeypatch.setattr(vv._OpenCVReader, "read", lambda self, indices: ((i, None) for i in indices))
    monkeypatch.setattr(vv._OpenCVReader, "decodable", lambda self, index: True)
    with pytest.raises(MediaError, match="no frame"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_video(videos["mp4"], num_frames=4, backend="opencv")


def test_decode_workers():
    assert decode_workers(1, 16) == 1
    assert decode_workers(8, 16) == 2  # at least MIN_FRAMES_PER_WORKER frames each
    assert decode_workers(32, 2) == 2  # at most one per CPU
    assert decode_workers(1024, 64) == 8  # and at most MAX_DECODE_WORKERS


@pytest.mark.parametrize("backend", backends())
def test_parallel_decoding_gives_the_serial_result(videos, backend, monkeypatch):
    monkeypatch.setenv("VILA_VIDEO_THREADS", "1")
    serial = load_video(videos["avi"], num_frames=40, backend=backend)
    monkeypatch.setenv("VILA_VIDEO_THREADS", "5")
    parallel = load_video(videos["avi"], num_frames=40, backend=backend)
    assert parallel.indices == serial.indices == list(range(40))
    assert [frame_id(f) for f in parallel.frames] == parallel.indices
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(serial.frames, parallel.frames))


def test_errors_in_decoder_threads_reach_the_caller(videos, monkeypatch):
    monkeypatch.setenv("VILA_VIDEO_THREADS", "4")

    def broken(image: PIL.Image.Image) -> PIL.Image.Image:
        raise ZeroDivisionError("from the transform")

    with pytest.raises(ZeroDivisionError, match="from the transform"):
        load_video(videos["mp4"], num_frames=30, transform=broken)


def test_transform_and_progress(videos, capsys):
    video = load_video(videos["mp4"], num_frames=5, transform=lambda im: im.resize((16, 16)), progress=True)
    assert all(f.size == (16, 16) for f in video.frames)
    assert "decoding frames" in capsys.readouterr().err
    load_video(videos["mp4"], num_frames=5)  # automatic: no bar for a few frames
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------------------------------------ bad inputs


def test_bad_files_raise_media_error(tmp_path, videos):
    cases = {
        "empty.mp4": b"",
        "text.mp4": b"this is not a video\n" * 20,
        "truncated.mp4": GOLDEN_VIDEO.read_bytes()[: GOLDEN_VIDEO.stat().st_size // 2],
        "header_only.mp4": videos["mp4"].read_bytes()[:64],
    }
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        for backend in (None, *backends()):
            with pytest.raises(MediaError) as err:
                load_video(path, num_frames=8, backend=backend)
            assert name in str(err.value) and "\n" not in str(err.value)


def test_missing_paths_and_empty_directories(tmp_path):
    with pytest.raises(MediaError, match="not found"):
        load_video(tmp_path / "missing.mp4", num_frames=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MediaError, match="no image files"):
        load_video(tmp_path / "empty", num_frames=8)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no frames here")
    with pytest.raises(MediaError, match="no image files"):
        load_video(tmp_path / "notes", num_frames=8)
    with pytest.raises(MediaError, match="not a regular file"):
        load_video("/dev/null", num_frames=8)


def test_bad_urls_raise_media_error(tmp_path, monkeypatch):
    monkeypatch.setenv("VILA_CACHE", str(tmp_path))
    with pytest.raises(MediaError, match="cannot download"):
        load_video("http://127.0.0.1:9/x.mp4", num_frames=8)
    with pytest.raises(MediaError, match="unsupported URL scheme"):
        load_video("ftp://example.com/x.mp4", num_frames=8)
    cache = tmp_path / "videos"
    assert not cache.exists() or not any(cache.iterdir())  # nothing half-written


def test_bad_arguments():
    with pytest.raises(UsageError):
        load_video(GOLDEN_VIDEO, num_frames=0)
    with pytest.raises(UsageError):
        load_video(GOLDEN_VIDEO, num_frames=8, fps=-1)
    with pytest.raises(UsageError):
        load_video(GOLDEN_VIDEO, num_frames=8, backend="ffmpeg")
    with pytest.raises(MediaError):
        load_video(PIL.Image.new("RGB", (4, 4)), num_frames=8)
    with pytest.raises(MediaError):
        load_video(12, num_frames=8)


# ------------------------------------------------------------------------------------------ frame dirs and lists


def test_frame_directory_natural_order(tmp_path):
    for i in range(12):
        PIL.Image.fromarray(bars_frame(i)[..., ::-1]).save(tmp_path / f"frame{i + 1}{'.PNG' if i == 3 else '.png'}")
    (tmp_path / "notes.txt").write_text("not a frame")
    (tmp_path / ".hidden.png").write_bytes(b"junk")
    (tmp_path / "sub").mkdir()
    files = list_frame_files(tmp_path)
    assert [p.name for p in files][:3] == ["frame1.png", "frame2.png", "frame3.png"]
    assert [p.name for p in files][-3:] == ["frame10.png", "frame11.png", "frame12.png"]
    video = load_video(tmp_path, num_frames=4, fps=5.0)  # fps is ignored for frames
    assert video.indices == [0, 4, 7, 11]
    assert [frame_id(f) for f in video.frames] == [0, 4, 7, 11]
    assert video.duration == 0.0


def test_unreadable_frame_in_a_directory_is_skipped(tmp_path):
    for i in range(3):
        PIL.Image.fromarray(bars_frame(i)).save(tmp_path / f"{i}.png")
    (tmp_path / "3.png").write_bytes(b"not a png")
    with pytest.warns(UserWarning):
        video = load_video(tmp_path, num_frames=4)
    assert video.indices == [0, 1, 2]


def test_in_memory_frames():
    arrays = [bars_frame(i)[..., ::-1].copy() for i in range(10)]
    for source in (arrays, np.stack(arrays), [PIL.Image.fromarray(a) for a in arrays], Video(arrays)):
        video = load_video(source, num_frames=3)
        assert video.indices == [0, 4, 9] and video.duration == 0.0
        assert [frame_id(f) for f in video.frames] == [0, 4, 9]
    rgba = [PIL.Image.new("RGBA", (4, 4), (10, 20, 30, 0))]
    assert load_video(rgba, num_frames=2).frames[0].getpixel((0, 0)) == (10, 20, 30)
    with pytest.raises(MediaError, match="uint8"):
        load_video([np.zeros((4, 4, 3), np.float32)], num_frames=1)
    with pytest.raises(MediaError, match="no frames"):
        load_video([], num_frames=1)


# -------------------------------------------------------------------------------------------------------- download


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep test output clean
        pass


def test_url_is_downloaded_once_into_the_cache(videos, tmp_path, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    (served / "clip.mp4").write_bytes(videos["mp4"].read_bytes())
    cache = tmp_path / "cache"
    monkeypatch.setenv("VILA_CACHE", str(cache))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        url = f"{base}/clip.mp4"
        video = load_video(url, num_frames=3, progress=False)
        assert video.indices == [0, 14, 29] and video.source == url
        with pytest.raises(MediaError, match="cannot download"):
            load_video(f"{base}/missing.mp4", num_frames=3, progress=False)
    finally:
        server.shutdown()
        server.server_close()
    cached = cache / "videos" / (hashlib.sha256(url.encode()).hexdigest() + ".mp4")
    assert cached.read_bytes() == videos["mp4"].read_bytes()
    assert [p.name for p in (cache / "videos").iterdir()] == [cached.name]  # nothing half-written
    assert load_video(url, num_frames=3).indices == [0, 14, 29]  # served from the cache, server gone


# ----------------------------------------------------------------------------------------------------- time tokens


def test_time_token_rewrite_reference_examples():
    kw = {"duration": 4.0, "num_time_tokens": 100, "time_token_format": "<t{t}>"}
    assert rewrite_time_tokens("<t25>", **kw) == "<1.01>"
    assert rewrite_time_tokens("<t99>", **kw) == "<4.0>"
    assert rewrite_time_tokens("<t150>", **kw) == "<4.0>"
    assert rewrite_time_tokens("start <t0> to <t1><t10>, calm<t55> ten", **kw) == (
        "start <0.0> to <0.04><0.4>, calm<2.22> ten"
    )
    assert rewrite_time_tokens("no tokens <t> here", **kw) == "no tokens <t> here"
    assert rewrite_time_tokens("<t99>", duration=4, num_time_tokens=100, time_token_format="<t{t}>") == "<4.0>"
    assert rewrite_time_tokens("<t3>", duration=12.3456, num_time_tokens=4, time_token_format="<t{t}>") == "<12.35>"


def test_time_token_rewrite_edge_cases():
    # N == 1: the reference divides by zero; the one token is the start of the video.
    assert rewrite_time_tokens("<t0> <t1>", duration=4.0, num_time_tokens=1, time_token_format="<t{t}>") == (
        "<0.0> <4.0>"
    )
    # N == 0 (NVILA-8B): every <tK> becomes the duration.
    assert rewrite_time_tokens("<t0> <t7>", duration=2.5, num_time_tokens=0, time_token_format="<t{t}>") == (
        "<2.5> <2.5>"
    )
    # Another format: its tokens are rewritten, the out-of-range step still only knows <tK>.
    assert rewrite_time_tokens("[T1] <t1> <t5>", duration=4.0, num_time_tokens=3, time_token_format="[T{t}]") == (
        "<2.0> <t1> <4.0>"
    )
