"""Chat sessions (API and ``vila-infer --chat``) and the media feature cache they use."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import PIL.Image
import pytest
import torch
from conftest import INPUTS, TINY

import vila
from vila.cache import FeatureCache, content_digest, media_key
from vila.errors import MediaError, UsageError
from vila.model.vila import to_turns

IMAGE = INPUTS / "demo_img.png"
OTHER = INPUTS / "syn_640x480.png"
VIDEO = INPUTS / "video_160x120_64f_16fps.mp4"


# -- the cache ------------------------------------------------------------------------------------------------


def test_cache_is_lru_and_bounded_by_items_and_bytes():
    cache = FeatureCache(max_items=2, max_bytes=3 * 400)
    t = torch.zeros(100)  # 400 bytes
    cache.put("a", [t])
    cache.put("b", (t,))
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("c", [t])  # evicts b, the least recently used
    assert "b" not in cache and "a" in cache and "c" in cache
    cache.put("big", [torch.zeros(1000)])  # larger than max_bytes on its own: not stored
    assert "big" not in cache and len(cache) == 2 and cache.nbytes == 800
    assert cache.get(None) is None and cache.get("b") is None
    assert cache.stats() == {"items": 2, "bytes": 800, "hits": 1, "misses": 2}
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0


def test_content_digest_follows_content_not_names(tmp_path):
    copy = tmp_path / "renamed.png"
    shutil.copy(IMAGE, copy)
    assert content_digest(str(IMAGE)) == content_digest(copy) == content_digest(IMAGE.read_bytes()) is not None
    img = PIL.Image.open(IMAGE).convert("RGB")
    assert content_digest(img) == content_digest(img.copy())
    img.putpixel((0, 0), (1, 2, 3))
    assert content_digest(img) != content_digest(PIL.Image.open(IMAGE).convert("RGB"))
    assert content_digest("https://example.com/a.png") is None and content_digest(tmp_path / "missing.png") is None
    frames = tmp_path / "frames"
    frames.mkdir()
    shutil.copy(IMAGE, frames / "0001.png")
    assert content_digest(frames) is not None and content_digest(frames) != content_digest(str(IMAGE))
    assert media_key("image", None, "ctx") is None
    assert media_key("image", "d", "ctx1") != media_key("image", "d", "ctx2")


def test_cache_hit_gives_the_same_answer_without_encoding(tiny_model):
    model = tiny_model("nvila-tiny")
    cache = FeatureCache()
    prompt = [vila.Image(IMAGE), "Describe."]
    plain = model.generate(prompt, max_new_tokens=8)
    miss = model.generate(prompt, max_new_tokens=8, cache=cache)
    calls = []
    original = model._encode_media
    model._encode_media = lambda batch, frames: calls.append(batch) or original(batch, frames)
    try:
        hit = model.generate(prompt, max_new_tokens=8, cache=cache)
    finally:
        del model._encode_media
    assert plain.token_ids == miss.token_ids == hit.token_ids
    assert calls == [None]  # nothing left to encode
    assert cache.stats()["hits"] == 1 and cache.stats()["misses"] == 1


def test_cached_images_keep_the_multi_image_rule(tiny_model):
    """One image alone is tiled (Dynamic-S2), the same image among others is not: different cache entries,
    and answers identical to uncached calls."""
    model = tiny_model("nvila-tiny")
    cache = FeatureCache()
    single = [vila.Image(IMAGE), "a"]
    double = [vila.Image(IMAGE), vila.Image(OTHER), "b"]
    for prompt in (single, double, single, double):
        assert (
            model.generate(prompt, max_new_tokens=6, cache=cache).token_ids
            == model.generate(prompt, max_new_tokens=6).token_ids
        )
    assert len(cache) == 3 and cache.hits == 3


def test_video_features_are_cached(tiny_model):
    model = tiny_model("nvila-video-tiny")
    cache = FeatureCache()
    prompt = [vila.Video(VIDEO), "What happens?"]
    first = model.generate(prompt, max_new_tokens=6, num_video_frames=4, cache=cache)
    second = model.generate(prompt, max_new_tokens=6, num_video_frames=4, cache=cache)
    other = model.generate(prompt, max_new_tokens=6, num_video_frames=2, cache=cache)  # other sampling: a miss
    assert first.token_ids == second.token_ids == model.generate(prompt, max_new_tokens=6, num_video_frames=4).token_ids
    assert first.video_durations == second.video_durations
    assert other.token_ids != first.token_ids  # the other frames give another answer
    assert cache.hits == 1 and cache.misses == 2 and len(cache) == 2


# -- the session ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["nvila-tiny", "vila15-tiny"])
def test_chat_keeps_history_and_encodes_media_once(tiny_model, variant):
    model = tiny_model(variant)
    chat = model.chat(max_new_tokens=8)
    first = chat.send(vila.Image(IMAGE), "What is this?")
    second = chat.send("And its colour?")
    # The same conversation through generate_content, as a list of turns: same answers.
    turns = [{"role": "user", "content": [vila.Image(IMAGE), "What is this?"]}]
    assert first == model.generate_content(turns, max_new_tokens=8)
    turns += [{"role": "assistant", "content": first}, {"role": "user", "content": "And its colour?"}]
    assert second == model.generate_content(turns, max_new_tokens=8)
    assert [t["role"] for t in chat.history] == ["user", "assistant", "user", "assistant"]
    assert chat.cache.misses == 1 and chat.cache.hits == 1  # the image was encoded once
    prompt = model.prepare(to_turns(chat.history[:-1])).prompt_text
    assert prompt.count("What is this?") == 1 and prompt.count("And its colour?") == 1


def test_chat_stream_adds_the_turn(tiny_model):
    model = tiny_model("nvila-tiny")
    chat = model.chat(max_new_tokens=10)
    streamed = "".join(chat.stream("Hello there."))
    assert chat.history[-1] == {"role": "assistant", "content": [streamed]}
    assert streamed == model.generate_content("Hello there.", max_new_tokens=10)
    chat.reset()
    assert chat.history == [] and chat.last_result is None


def test_chat_stream_left_early_adds_nothing(tiny_model):
    model = tiny_model("nvila-tiny")
    chat = model.chat(max_new_tokens=50)
    with chat.stream("Tell me everything.") as pieces:
        assert next(pieces)
    assert chat.history == [] and chat.last_result is None
    assert chat.send("hi") == model.generate_content("hi", max_new_tokens=50)


def test_chat_errors_leave_the_history_alone(tiny_model):
    model = tiny_model("nvila-tiny")
    chat = model.chat(max_new_tokens=4)
    chat.send("hi")
    with pytest.raises(MediaError):
        chat.send(vila.Image(INPUTS / "nope.png"), "what?")
    with pytest.raises(UsageError):
        chat.send("   ")
    assert len(chat.history) == 2


def test_cli_chat_session(tiny_model, tmp_path):
    shutil.copy(IMAGE, tmp_path / "a.png")
    script = "\n".join(
        [
            "/help",
            "/image a.png",
            "What is it?",
            "/frobnicate",
            "/image nope.png",
            "And then?",
            "/reset",
            "Hi",
            "/quit",
            "ignored",
        ]
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vila.cli",
            "-m",
            str(TINY / "nvila-tiny"),
            "--chat",
            "--max-new-tokens",
            "6",
            "--device",
            "cpu",
        ],
        input=script + "\n",
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    answers = proc.stdout.splitlines()
    assert len(answers) == 3
    model = tiny_model("nvila-tiny")
    chat = model.chat(max_new_tokens=6)
    assert answers[0] == chat.send(vila.Image(tmp_path / "a.png"), "What is it?")
    assert answers[1] == chat.send("And then?")
    assert answers[2] == model.generate_content("Hi", max_new_tokens=6)  # after /reset: a fresh conversation
    assert "unknown command /frobnicate" in proc.stderr and "nope.png not found" in proc.stderr
    assert "/image PATH" in proc.stderr  # /help
