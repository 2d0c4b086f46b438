"""Files that are not media say what they are; too many video frames fail before any frame is decoded."""

from __future__ import annotations

import io
import warnings
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

import vila
from vila.errors import MediaError, PromptTooLongError
from vila.media import Image, load_image, media_kind, sniff_unsupported
from vila.model.vila import VilaModel, to_turns
from vila.video import load_video

INPUTS = Path(__file__).parent / "fixtures" / "inputs"
VIDEO = INPUTS / "video_160x120_64f_16fps.mp4"


def zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("word/document.xml", "<w:document/>")
    return buf.getvalue()


def wav_bytes() -> bytes:
    import wave

    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\x00\x01" * 800)
    return buf.getvalue()


NOT_MEDIA = {
    "PDF document": b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n",
    "text file": "Meeting notes\n- résumé the plan\n".encode() * 20,
    "ZIP archive": zip_bytes(),
    "WAV audio": wav_bytes(),
    "MP3 audio": b"ID3\x04\x00\x00\x00\x00\x00\x00" + bytes(200),
    "HTML page": b"<!DOCTYPE html>\n<html><body>hi</body></html>\n",
}


@pytest.mark.parametrize("kind", list(NOT_MEDIA))
@pytest.mark.parametrize("suffix", [".mp4", ".png", ".bin"])
def test_non_media_files_say_what_they_are(tmp_path, kind, suffix):
    path = tmp_path / f"upload{suffix}"
    path.write_bytes(NOT_MEDIA[kind])
    attempts = [
        lambda: load_video(path, num_frames=2, progress=False),
        lambda: load_image(Image(str(path))),
        lambda: load_image(Image(path.read_bytes())),
        lambda: media_kind(str(path)),
    ]
    for attempt in attempts:
        with warnings.catch_warnings(), pytest.raises(MediaError) as err:
            warnings.simplefilter("ignore")
            attempt()
        message = str(err.value)
        assert kind in message and "images (JPEG" in message and "videos (MP4" in message, message
        assert "re-encode" not in message and "corrupt" not in message and "\n" not in message


def test_real_media_are_not_taken_for_something_else():
    for fmt in ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"):
        buf = io.BytesIO()
        PIL.Image.new("RGB", (16, 16), (200, 10, 10)).save(buf, fmt)
        assert sniff_unsupported(buf.getvalue()[:4096]) is None, fmt
    assert sniff_unsupported(VIDEO.read_bytes()[:4096]) is None
    assert sniff_unsupported(b"\x1aE\xdf\xa3" + bytes(60)) is None  # Matroska / WebM
    assert sniff_unsupported(b"RIFF\x00\x00\x00\x00AVI LIST" + bytes(60)) is None
    assert sniff_unsupported(np.random.default_rng(0).bytes(4096)) is None


def test_corrupt_video_still_says_corrupt(tmp_path):
    path = tmp_path / "cut.mp4"
    path.write_bytes(VIDEO.read_bytes()[:64])
    with pytest.raises(MediaError, match="truncated or corrupt"):
        load_video(path, num_frames=2, progress=False)


# -------------------------------------------------------------------------------------- too many video frames


def test_too_many_frames_fail_before_decoding(tiny_model, monkeypatch):
    model = tiny_model("nvila-tiny")
    assert model.context_length == 8192  # 500 frames x 257 positions cannot fit

    def no_decoding(*args, **kwargs):
        raise AssertionError("a frame was decoded before the length check")

    monkeypatch.setattr("vila.video.load_video", no_decoding)
    with pytest.raises(PromptTooLongError, match=r"needs 128500 positions \(media: 128500\) or more.*num_video_frames"):
        model.generate([vila.Video(VIDEO), "What happens?"], num_video_frames=500, max_new_tokens=1)


@pytest.mark.parametrize("variant", ["nvila-tiny", "nvila-video-tiny", "vila15-s2-tiny"])
def test_traced_video_positions_are_the_encoded_ones(tiny_model, variant):
    """The early check's count equals what encoding the frames gives (Basic, TSP and S2 checkpoints)."""
    model = tiny_model(variant)
    clip = [np.full((48, 64, 3), 40 * i, np.uint8) for i in range(5)]
    for frames in (3, 5):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            encoded = model.prepare(to_turns([vila.Video(clip), "x"]), num_video_frames=frames).media_tokens
        assert encoded == [model._video_positions(model.config, frames)]


def test_a_prompt_that_fits_is_not_refused_early(tiny_model, monkeypatch):
    model = tiny_model("nvila-tiny")
    checks = []
    original = VilaModel._check_video_positions
    monkeypatch.setattr(VilaModel, "_check_video_positions", lambda *a: checks.append(a) or original(*a))
    assert model.prepare(to_turns([vila.Video(VIDEO), "x"]), num_video_frames=8).media_tokens == [8 * 257]
    assert checks


def test_more_frames_than_the_video_has_warns_and_repeats(tmp_path):
    frames = [np.full((8, 8, 3), 30 * i, np.uint8) for i in range(3)]
    with pytest.warns(UserWarning, match="has 3 frames but 5 were asked for"):
        video = load_video(frames, num_frames=5)
    assert video.indices == [0, 0, 1, 2, 2]  # round(linspace(0, 2, 5)), as the reference samples
    with pytest.warns(UserWarning, match="has 64 frames but 100 were asked for"):
        assert len(load_video(VIDEO, num_frames=100, progress=False).frames) == 100
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_video(VIDEO, num_frames=64, progress=False)
