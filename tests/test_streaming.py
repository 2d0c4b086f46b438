"""Streaming: ``model.stream_content`` pieces add up to ``generate_content``'s answer; the CLI streams to a TTY."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import threading

import pytest
from conftest import INPUTS, TINY

import vila
from vila.errors import MediaError
from vila.streaming import strip_pieces

IMAGE = INPUTS / "demo_img.png"


@pytest.mark.parametrize(
    "variant, parts, n",
    [
        ("nvila-tiny", [vila.Image(IMAGE), "Describe the image."], 24),
        ("nvila-tiny", ["Write a long story about a tiger."], 40),
        ("vila15-tiny", [vila.Image(IMAGE), "What is shown?"], 30),  # SentencePiece-style decoder with Strip
        ("vila15-tiny", ["hello"], 80),
        ("nvila-lite-tiny", ["Two words:"], 30),
    ],
)
def test_stream_joins_to_the_answer(tiny_model, variant, parts, n):
    model = tiny_model(variant)
    expected = model.generate(parts, max_new_tokens=n)
    stream = model.stream_content(parts, max_new_tokens=n)
    pieces = list(stream)
    assert "".join(pieces) == expected.text == model.generate_content(parts, max_new_tokens=n)
    assert len(pieces) > 1  # it did stream
    assert stream.result.token_ids == expected.token_ids


def test_stream_sampling_with_seed_matches(tiny_model):
    model = tiny_model("nvila-tiny")
    kw = dict(max_new_tokens=20, do_sample=True, temperature=0.9, seed=3)
    assert "".join(model.stream_content("Say something.", **kw)) == model.generate_content("Say something.", **kw)


def test_strip_pieces_matches_str_strip():
    pieces = ["  ", "\n Hello", " ", "world", "  ", "\t", "again ", " \n"]
    assert "".join(strip_pieces(pieces)) == "".join(pieces).strip()
    assert list(strip_pieces([" ", "\n"])) == []


def test_stream_errors_reach_the_caller(tiny_model):
    model = tiny_model("nvila-tiny")
    with pytest.raises(MediaError, match="not found"):
        list(model.stream_content([vila.Image(INPUTS / "nope.png"), "hi"], max_new_tokens=4))


def test_closing_a_stream_stops_generation(tiny_model):
    model = tiny_model("nvila-tiny")
    before = threading.active_count()
    stream = model.stream_content("Tell me everything.", max_new_tokens=2000)
    first = next(stream)
    stream.close()
    assert first
    assert threading.active_count() == before  # the worker thread ended instead of generating 2000 tokens
    assert stream.result is None


def test_stream_rejects_its_own_streamer(tiny_model):
    model = tiny_model("nvila-tiny")
    with pytest.raises(vila.errors.UsageError):
        model.stream_content("hi", streamer=object())


def _cli_in_a_terminal(args):
    """Runs vila-infer with stdout on a pseudo-terminal (so it streams) and returns what it printed."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    cmd = [sys.executable, "-m", "vila.cli", "-m", str(TINY / "nvila-tiny"), "--device", "cpu", *args]
    leader, follower = pty.openpty()
    proc = subprocess.Popen(cmd, stdout=follower, stderr=subprocess.DEVNULL, env=env)
    os.close(follower)
    out = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    proc.wait(timeout=300)
    os.close(leader)
    assert proc.returncode == 0
    return out.decode().replace("\r\n", "\n")


def test_cli_streams_to_a_terminal_and_prints_the_same_answer(tiny_model):
    args = ["--media", str(IMAGE), "--text", "Describe.", "--max-new-tokens", "12"]
    streamed = _cli_in_a_terminal(args)
    answer = tiny_model("nvila-tiny").generate_content([vila.Image(IMAGE), "Describe."], max_new_tokens=12)
    assert streamed == answer + "\n" and answer
