"""Videos through the model: the configured video encoder, frame counts, mixing with images, limits."""

from __future__ import annotations

import re

import PIL.Image
import pytest
import torch
from conftest import INPUTS

import vila
from vila.errors import PromptTooLongError
from vila.model.vila import to_turns

VIDEO = INPUTS / "video_160x120_64f_16fps.mp4"


def frames(n: int) -> list[PIL.Image.Image]:
    return [PIL.Image.new("RGB", (160, 120), (20 * i % 256, 90, 255 - 20 * i % 256)) for i in range(n)]


def test_basic_encoder_equals_frames_as_images(tiny_model):
    """For Basic-encoder checkpoints the project path gives the reference HEAD's embeddings (HEAD feeds
    video frames as images, ignoring the video encoder; with the Basic encoder the result is the same)."""
    model = tiny_model("nvila-tiny")
    clip = frames(4)
    as_video = model.prepare(to_turns([vila.Video(clip), "Describe"]), num_video_frames=4)
    as_images = model.prepare(to_turns([*clip, "Describe"]))
    video_block = as_video.inputs_embeds
    # The video's one <vila/video> token and the four <image> tokens sit at the same place in the prompt.
    start = int((as_video.input_ids == model.media_token_ids["video"]).nonzero()[0])
    n = 4 * (256 + 1)
    assert as_video.media_tokens == [n] and as_images.media_tokens == [257] * 4
    assert torch.equal(video_block[start : start + n], as_images.inputs_embeds[start : start + n])


def test_tsp_pools_and_pads_frame_count(tiny_model):
    model = tiny_model("nvila8b-video-tiny")  # TSP [[8, 1, 1]], 256 tokens per frame, "\n" end token

    def count(n: int) -> list[int]:
        return model.prepare(to_turns([vila.Video(frames(n)), "x"]), num_video_frames=n).media_tokens

    assert count(16) == [2 * 257]
    assert count(12) == [2 * 257]  # the reference crashes; we repeat the last frame up to 16 (2 pooled frames)
    assert count(3) == [257]


def test_embeddings_follow_frames_actually_decoded(tiny_model):
    model = tiny_model("nvila-tiny")
    # fps sampling on a 4 s clip: 2 fps -> 8 timestamps, capped by num_video_frames
    prepared = model.prepare(to_turns([vila.Video(VIDEO), "x"]), num_video_frames=5, fps=2.0)
    assert prepared.media_tokens == [5 * 257]
    prepared = model.prepare(to_turns([vila.Video(VIDEO), "x"]), num_video_frames=20, fps=1.0)
    # only 4 timestamps in 4 s: no crash (the reference HEAD emits num_video_frames tokens and fails)
    assert prepared.media_tokens == [4 * 257]


def test_image_and_video_in_one_prompt_still_tiles_the_image(tiny_model):
    model = tiny_model("nvila-tiny")
    turns = to_turns([vila.Image(INPUTS / "demo_img.png"), vila.Video(frames(2)), "Compare"])
    prepared = model.prepare(turns, num_video_frames=2)
    assert prepared.media_tokens == [2305, 2 * 257]  # dynamic-S2 3x3 grid for the single image


def test_video_max_tiles_tiles_each_frame(tiny_model):
    model = tiny_model("nvila-lite-tiny")  # dynamic, 448 tiles, 121 tokens + "\n" per tile
    clip = [PIL.Image.new("RGB", (900, 450))] * 2  # 2:1 -> a 2x1 grid plus a thumbnail per frame
    one = model.prepare(to_turns([vila.Video(clip), "x"]), num_video_frames=2).media_tokens
    tiled = model.prepare(to_turns([vila.Video(clip), "x"]), num_video_frames=2, video_max_tiles=4).media_tokens
    assert one == [2 * 122]
    assert tiled == [2 * 3 * 122]


def test_prompt_longer_than_context_is_a_clear_error(tiny_model):
    model = tiny_model("nvila-tiny")  # context 8192; 40 frames x 257 positions do not fit
    with pytest.raises(PromptTooLongError, match=r"needs \d+ positions \(media: 10280\).*num_video_frames"):
        model.generate([vila.Video(VIDEO), "x"], num_video_frames=40, max_new_tokens=1)


def test_time_tokens_decoded_in_the_api(tiny_model):
    """``<tK>`` becomes ``<round(K * duration / 99, 2)>`` seconds of the last video (100 time tokens in this
    checkpoint), as the reference CLI prints it; tokens past the last become the duration."""
    model = tiny_model("nvila8b-video-tiny")
    assert model.decode_time_tokens("at <t25> and <t99>", [4.0]) == "at <1.01> and <4.0>"
    assert model.decode_time_tokens("<t0>, <t33>, <t150>", [10.0]) == "<0.0>, <3.33>, <10.0>"
    assert model.decode_time_tokens("<t50>", [4.0, 9.9]) == "<5.0>"  # the last video's duration
    assert model.decode_time_tokens("at <t25>", []) == "at <t25>"  # no video: untouched
    # This prompt makes the tiny checkpoint emit one time token; the video lasts 64 frames / 16 fps = 4 s.
    plain = model.generate([vila.Video(VIDEO), "What happens?"], max_new_tokens=16)
    assert re.findall(r"<t\d+>", plain.text) == ["<t25>"], plain.text
    decoded = model.generate([vila.Video(VIDEO), "What happens?"], max_new_tokens=16, decode_time_tokens=True)
    assert decoded.token_ids == plain.token_ids and decoded.text == plain.text.replace("<t25>", "<1.01>")


def test_video_positions_are_traced_once_per_setting(tiny_model, monkeypatch):
    """The early length check traces the tower with fake tensors; that is a constant per frame count, not per call."""
    from vila.model.vila import VilaModel

    model = tiny_model("nvila-tiny")
    model._video_position_counts.clear()
    traced = []
    original = VilaModel._video_positions
    monkeypatch.setattr(VilaModel, "_video_positions", lambda self, cfg, n: traced.append(n) or original(self, cfg, n))
    video = vila.Video(INPUTS / "video_160x120_64f_16fps.mp4")
    for frames in (2, 2, 3):
        model.prepare(to_turns([video, "What happens?"]), num_video_frames=frames)
    assert traced == [2, 3]
