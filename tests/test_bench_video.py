"""Smoke test of scripts/bench_video.py: it runs and reports a ratio (no timing assertions: machines differ)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_video.py"


def test_bench_video_quick_runs_and_prints_a_ratio():
    run = subprocess.run([sys.executable, str(SCRIPT), "--quick"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    # --quick samples 8 and 32 frames; the verdict line is for 32, where the goal is set
    assert re.search(r"ratio ours/baseline at 32 frames: \d+\.\d+", run.stdout), run.stdout
    assert "same pixels as the baseline: True" in run.stdout


def test_bench_video_quick_json():
    """The report's shape and the relations between its numbers; never a timing itself (machines differ)."""
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", "--frames", "8", "--runs", "3"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout)
    info = report["info"]
    assert info["frame_count"] == 3 * 30 and info["size"] == [320, 240] and info["runs"] == 3  # --quick's video
    assert info["auto_backend"] == "PyAV"  # the automatic backend takes OpenCV's mp4v files
    assert report["memory"] == [] and report["memory_frames"] == 0  # --quick skips the memory check
    (row,) = report["timing"]
    assert row["frames"] == 8 and row["ours_identical_to_baseline"] is True
    loaders = {"baseline", "ours", "ours_opencv", "ours_decord", "ours_1_thread"}
    assert row.keys() == loaders | {"frames", "ours_identical_to_baseline"}
    base = row["baseline"]["median_s"]
    for name in loaders:
        t = row[name]
        assert t.keys() == {"median_s", "min_s", "max_s", "cpu_median_s", "ratio"}, name
        assert t["min_s"] <= t["median_s"] <= t["max_s"], name
        assert t["ratio"] == pytest.approx(t["median_s"] / base), name  # every ratio is against the baseline
