"""Shared fixtures: paths to the tiny checkpoints and goldens, and a cache of loaded tiny models."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "tiny"
GOLDENS = FIXTURES / "goldens"
INPUTS = FIXTURES / "inputs"
HF_CONFIGS = FIXTURES / "hf_configs"


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
