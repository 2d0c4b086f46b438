"""Smoke test of scripts/bench_video.py: it runs and reports a ratio (no timing assertions: machines differ)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_video.py"


def test_bench_video_quick_runs_and_prints_a_ratio():
    run = subprocess.run([sys.executable, str(SCRIPT), "--quick"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert re.search(r"ratio ours/baseline at \d+ frames: \d+\.\d+", run.stdout), run.stdout
    assert "same pixels as the baseline: True" in run.stdout


def test_bench_video_quick_json():
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", "--frames", "8"], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout)
    (row,) = report["timing"]
    assert row["frames"] == 8 and row["ours_identical_to_baseline"]
    assert row["baseline"]["ratio"] == 1.0 and row["ours"]["ratio"] > 0
    assert report["info"]["auto_backend"] == "PyAV"  # the automatic backend takes OpenCV's mp4v files
    assert {"ours_opencv", "ours_decord", "ours_1_thread"} <= row.keys()
