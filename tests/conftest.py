"""Shared fixtures: paths to the tiny checkpoints and goldens, and a cache of loaded tiny models."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "tiny"
GOLDENS = FIXTURES / "goldens"
INPUTS = FIXTURES / "inputs"
HF_CONFIGS = FIXTURES / "hf_configs"


# fp32 kernels sum in a different order on different CPUs (AMD EPYC vs Intel Xeon) and GPUs, so values the
# reference computed agree with ours to about 1e-6 of their scale, not bit for bit; token ids must still match
# exactly. Real bugs move values by far more (the smallest top-1/top-2 logit gap in the goldens is ~0.2).
GOLDEN_RTOL = 1e-5


def assert_close_to_golden(got, want, *, scale: float | None = None, floor: float = 1e-3) -> None:
    """Max |got - want| within ``GOLDEN_RTOL`` x ``scale`` (default: max |want|), or ``floor`` absolute."""
    import numpy as np

    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    scale = float(np.abs(want).max()) if scale is None else scale
    diff = float(np.abs(got - want).max())
    assert diff <= max(GOLDEN_RTOL * scale, floor), f"max diff {diff:.3g} at scale {scale:.3g}"


# JSONL request / answer files of --batch, --ray and the shards.
def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def by_line(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: r["line"])


# Requests next to images a.png and b.png (the ``images`` fixture): answers, a bad line, a missing file and a
# duplicate id, so that the local, sharded and Ray runs can be compared row for row.
MIXED_REQUESTS = [
    {"id": "img-a", "text": "Describe the image.", "media": ["a.png"]},
    {"id": 7, "text": "Tell me a story."},
    "{not json",
    {"id": "img-b", "text": "What is this?", "media": ["b.png"], "max_new_tokens": 1},
    {"id": "gone", "text": "x", "media": ["missing.png"]},
    {"id": 7, "text": "a duplicate id"},
    {"id": "two", "text": "Compare <image> and <image>.", "media": ["a.png", "b.png"]},
]


@pytest.fixture
def images(tmp_path):
    """``tmp_path`` holding two small images, ``a.png`` and ``b.png``."""
    shutil.copy(INPUTS / "demo_img.png", tmp_path / "a.png")
    shutil.copy(INPUTS / "syn_640x480.png", tmp_path / "b.png")
    return tmp_path


def wait_for_lines(proc, path: Path, count: int, timeout: float = 300) -> None:
    """Until ``path`` has ``count`` lines, ``proc`` has exited, or ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists() and path.read_text().count("\n") >= count:
            return
        time.sleep(0.02)


def golden_files() -> list[Path]:
    return sorted(GOLDENS.glob("*/*.json"))


def read_golden(path: Path) -> dict:
    return json.loads(path.read_text())


_MODELS: dict[tuple[str, str], object] = {}


@pytest.fixture(scope="session")
def tiny_model():
    """``tiny_model(variant, conv_mode="auto")``: a tiny checkpoint loaded once per session (CPU, fp32)."""
    import vila

    def get(variant: str, conv_mode: str = "auto"):
        key = (variant, conv_mode)
        if key not in _MODELS:
            _MODELS[key] = vila.load(TINY / variant, device="cpu", dtype="float32", conv_mode=conv_mode)
        return _MODELS[key]

    return get
