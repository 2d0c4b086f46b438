"""What ``vila-infer`` writes besides the answer: repeated flags, a quiet stderr, and ``--debug`` logs."""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import INPUTS, TINY

import vila
import vila.loading
from vila.cli import build_parser
from vila.cli import main as cli_main

DEMO = str(INPUTS / "demo_img.png")
OTHER = str(INPUTS / "syn_640x480.png")
VIDEO = str(INPUTS / "video_160x120_64f_16fps.mp4")


def run_to_files(tmp_path: Path, *args: str) -> tuple[int, str, bytes]:
    """Run the CLI with stdout and stderr redirected to files, as in a script or a cron job."""
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with open(out, "wb") as o, open(err, "wb") as e:
        rc = subprocess.run(
            [sys.executable, "-m", "vila.cli", *args],
            stdout=o,
            stderr=e,
            timeout=300,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        ).returncode
    return rc, out.read_text(), err.read_bytes()


# -- repeated flags ------------------------------------------------------------------------------------------


def test_repeated_media_flags_accumulate():
    parse = build_parser().parse_args
    assert parse(["-m", "x", "--media", "a.png", "--media", "b.png"]).media == ["a.png", "b.png"]
    assert parse(["-m", "x", "--media", "a.png", "b.png", "--media", "c.mp4"]).media == ["a.png", "b.png", "c.mp4"]
    assert parse(["-m", "x"]).media == []


def test_two_media_flags_reach_the_model(capsys):
    argv = ["-m", str(TINY / "nvila-tiny"), "--device", "cpu", "--media", DEMO, "--media", OTHER]
    assert cli_main([*argv, "--text", "Compare them.", "--max-new-tokens", "2", "--output-format", "json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert len(row["media_tokens"]) == 2  # both images are in the prompt, not just the last


def _two_values(action: argparse.Action) -> tuple[str, str]:
    if action.choices:
        first, second = list(action.choices)[:2]
        return str(first), str(second)
    if action.type is int:
        return "1", "2"
    if action.type is float:
        return "0.5", "0.25"
    return "one", "two"


def _single_value_flags() -> list[argparse.Action]:
    return [
        a
        for a in build_parser()._actions
        if a.option_strings and a.nargs is None and type(a).__name__ not in ("_HelpAction", "_VersionAction")
    ]


@pytest.mark.parametrize("action", _single_value_flags(), ids=lambda a: a.option_strings[0])
def test_a_single_value_flag_given_twice_is_a_one_line_usage_error(action, capsys):
    first, second = _two_values(action)
    flag = action.option_strings[-1]  # an alias and the main name are the same flag
    model = [] if action.dest == "model_path" else ["-m", "x"]
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([*model, action.option_strings[0], first, flag, second])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "twice" in err[0] and first in err[0] and second in err[0], err


def test_a_flag_repeated_with_the_same_value_is_accepted():
    args = build_parser().parse_args(["-m", "x", "--text", "hi", "--text", "hi", "-nf", "4", "--num-video-frames", "4"])
    assert (args.text, args.num_video_frames) == ("hi", 4)


# -- a quiet stderr by default ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_plain_run_writes_nothing_to_stderr(tmp_path, fmt):
    argv = ["-m", str(TINY / "nvila-tiny"), "--text", "hi", "--media", DEMO, "--max-new-tokens", "4"]
    rc, out, err = run_to_files(tmp_path, *argv, "--output-format", fmt)
    assert rc == 0, err
    assert err == b"", err  # no "Loading weights" bars, no carriage returns in a log file
    assert out.strip()


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_one_load_bar_on_a_terminal_for_a_big_checkpoint(monkeypatch):
    stderr = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", stderr)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    vila.load(TINY / "nvila-tiny", device="cpu")
    assert stderr.getvalue() == ""  # small checkpoints load in a blink: no bar
    monkeypatch.setattr(vila.loading, "BIG_CHECKPOINT_BYTES", 0)
    vila.load(TINY / "nvila-tiny", device="cpu")
    shown = stderr.getvalue()
    assert shown.count("Loading nvila-tiny") >= 1 and "Loading weights" not in shown
    assert "tensors" in shown and shown.rstrip(" ").endswith("\r")  # one bar, erased when done (no blank line)
    quiet = io.StringIO()  # not a terminal: no bar, however big
    monkeypatch.setattr(sys, "stderr", quiet)
    vila.load(TINY / "nvila-tiny", device="cpu")
    assert quiet.getvalue() == ""


@pytest.mark.parametrize("variant", ["nvila-tiny", "vila15-tiny", "vilahd-tiny"])
def test_the_load_bar_counts_every_stored_tensor(variant, monkeypatch):
    """The bar reaches its total: each tensor is counted when it is read, and stored layers past the selected one
    (never read) are counted too."""
    import tqdm

    bars = []

    class Recording:
        def __init__(self, total=None, **kwargs):
            self.total, self.n = total, 0
            bars.append(self)

        def update(self, n=1):
            self.n += n

        def close(self):
            pass

    monkeypatch.setattr(sys, "stderr", FakeTerminal())
    monkeypatch.setattr(vila.loading, "BIG_CHECKPOINT_BYTES", 0)
    monkeypatch.setattr(tqdm, "tqdm", Recording)
    vila.load(TINY / variant, device="cpu")
    assert len(bars) == 1 and bars[0].total and bars[0].n == bars[0].total


# -- --debug ---------------------------------------------------------------------------------------------------


def debug_lines(err: bytes) -> str:
    text = err.decode()
    assert "\r" not in text
    assert "PIL" not in text  # other libraries' debug chatter stays off
    return text.lower()


def test_debug_logs_the_decisions_behind_an_image_answer(tmp_path):
    argv = ["-m", str(TINY / "nvila-tiny"), "--text", "hi", "--media", DEMO, "--max-new-tokens", "2", "--debug"]
    rc, out, err = run_to_files(tmp_path, *argv, "--device", "cpu")  # the same lines on a GPU machine
    assert rc == 0, err
    text = debug_lines(err)
    for needle in ("template", "device cpu", "dtype float32", "tiles", "visual tokens"):
        assert needle in text, (needle, text)
    assert all(line.startswith("vila") for line in err.decode().splitlines()), err


def test_debug_logs_frames_decoded_for_a_video(tmp_path):
    argv = ["-m", str(TINY / "nvila-video-tiny"), "--text", "hi", "--media", VIDEO, "-nf", "4", "--debug"]
    rc, out, err = run_to_files(tmp_path, *argv, "--max-new-tokens", "2")
    assert rc == 0, err
    text = debug_lines(err)
    assert "4 frames decoded" in text and "visual tokens" in text, text
