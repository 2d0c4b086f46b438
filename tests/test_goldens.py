"""Every public golden the reference produced on the tiny checkpoints, reproduced in fp32 on CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import INPUTS, assert_close_to_golden, golden_files, read_golden

import vila

GOLDENS = [p for p in golden_files() if read_golden(p)["status"] == "ok"]


def prompt_parts(golden: dict) -> list:
    parts = []
    for p in golden["parts"]:
        if p["type"] == "text":
            parts.append(p["text"])
        elif p["type"] == "image":
            parts.append(vila.Image(INPUTS / p["file"]))
        else:
            parts.append(vila.Video(INPUTS / p["file"]))
    return parts


@pytest.mark.parametrize("path", GOLDENS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_golden(path, tiny_model):
    golden = read_golden(path)
    model = tiny_model(golden["variant"], golden["call"]["load"].get("conv_mode", "auto"))
    gen = dict(golden["call"]["generate"])
    parts = prompt_parts(golden)

    prepared = model.prepare(vila_turns(parts), num_video_frames=gen.get("num_video_frames"), fps=gen.get("fps"))
    assert prepared.input_ids.tolist() == golden["input_ids"]
    assert prepared.inputs_embeds.shape[0] == golden["num_llm_input_positions"]
    if golden["variant"] != "nvila-lite-tiny":  # `dynamic` expands one image into per-tile blocks
        assert prepared.media_tokens == [m["num_embeddings"] for m in golden["media"]]

    # first-step logits, relative to their scale (the goldens carry fp32 noise of ~2e-4 at |logit| ~ 1e3)
    want = np.load(path.with_suffix(".npz"))["first_step_logits"]
    with torch.no_grad():
        logits = model.llm(inputs_embeds=prepared.inputs_embeds[None]).logits[0, -1].numpy()
    assert_close_to_golden(logits[: len(want)], want)

    result = model.generate(parts, **gen)
    assert result.token_ids == golden["generated_ids"]
    assert result.text == golden["generated_text"]


def vila_turns(parts):
    from vila.model.vila import to_turns

    return to_turns(parts)


ERROR_GOLDENS = [p for p in golden_files() if read_golden(p)["status"] == "error"]


@pytest.mark.parametrize("path", ERROR_GOLDENS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_reference_errors_are_clear_errors(path, tiny_model):
    """Where the reference crashed (VILA-HD without an image), we raise a one-line library error."""
    golden = read_golden(path)
    model = tiny_model(golden["variant"], golden["call"]["load"].get("conv_mode", "auto"))
    with pytest.raises(vila.errors.VilaError) as info:
        model.generate(prompt_parts(golden), **golden["call"]["generate"])
    assert "\n" not in str(info.value)
