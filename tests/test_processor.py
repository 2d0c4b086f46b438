"""The processor: prompt text, token ids, media items and their placements, without a model."""

from __future__ import annotations

import PIL.Image
import pytest
import torch
from conftest import INPUTS, TINY

import vila
from vila.cache import FeatureCache
from vila.config import parse_config
from vila.errors import UsageError
from vila.preprocess import ImageBatch
from vila.processor import (
    MediaPlan,
    Turn,
    concat_image_batches,
    continuation_ids,
    media_placements,
    plan_media,
    render_prompt,
    to_turns,
)
from vila.prompt import get_template
from vila.tokenizer import load_tokenizer, media_token_ids

QWEN = get_template("hermes-2")  # the tiny Qwen2 checkpoints' ChatML turns, with a system prompt
DEMO = INPUTS / "demo_img.png"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TINY / "nvila-tiny" / "llm")


def test_prompt_text_and_ids(tok):
    img = PIL.Image.new("RGB", (8, 8))
    text, ids = render_prompt(to_turns(["Compare", img, "with", vila.Image(DEMO), " "]), QWEN, tok)
    assert text == (
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\nCompare<image>with<image><|im_end|>"
        "<|im_start|>assistant\n"
    )
    assert ids == tok(text).input_ids
    assert [kind for _, kind in media_placements(ids, media_token_ids(tok))] == ["image", "image"]


def test_a_tiled_image_is_one_image_token_per_tile(tok):
    text, ids = render_prompt(to_turns([vila.Image(DEMO), "Describe"]), QWEN, tok, tiles=3)
    assert "user\n<image>\n<image>\n<image>\nDescribe<|im_end|>" in text
    places = media_placements(ids, media_token_ids(tok))
    assert len(places) == 3 and [ids[p] for p, _ in places] == [media_token_ids(tok)["image"]] * 3
    newline = tok("\n").input_ids
    assert all(ids[p + 1 : p + 1 + len(newline)] == newline for p, _ in places)


def test_a_single_tile_keeps_its_newline(tok):
    """The reference writes ``"<image>\\n" * tiles`` for a lone image in dynamic mode, so one tile is
    ``"<image>\\n"``, not ``"<image>"`` as an untiled image."""
    text, _ = render_prompt(to_turns([vila.Image(DEMO), "Describe"]), QWEN, tok, tiles=1)
    assert "user\n<image>\nDescribe<|im_end|>" in text
    text, _ = render_prompt(to_turns([vila.Image(DEMO), "Describe"]), QWEN, tok)
    assert "user\n<image>Describe<|im_end|>" in text


def test_one_tile_image_end_to_end_has_the_newline(tiny_model):
    """A 448x448 image is one tile in dynamic mode (nvila-lite-tiny); dynamic_s2 never adds the newline."""
    square = PIL.Image.new("RGB", (448, 448), (90, 140, 200))
    lite = tiny_model("nvila-lite-tiny")
    assert lite.config.image_aspect_ratio == "dynamic"
    p = lite.prepare(to_turns([square, "Describe"]))
    assert len(p.media_tokens) == 1 and "<image>\nDescribe" in p.prompt_text
    s2 = tiny_model("nvila-tiny")
    assert s2.config.image_aspect_ratio == "dynamic_s2"
    assert "<image>Describe" in s2.prepare(to_turns([square, "Describe"])).prompt_text


def test_placements_keep_prompt_order_and_kind(tok):
    turns = [
        {"role": "user", "content": [vila.Video(INPUTS / "video_160x120_64f_16fps.mp4"), "and", vila.Image(DEMO)]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [vila.Image(DEMO), "again"]},
    ]
    text, ids = render_prompt(to_turns(turns), QWEN, tok)
    places = media_placements(ids, media_token_ids(tok))
    assert [kind for _, kind in places] == ["video", "image", "image"]
    assert [p for p, _ in places] == sorted(p for p, _ in places)
    assert text.endswith("<|im_start|>user\n<image>again<|im_end|><|im_start|>assistant\n")


def test_typed_media_tokens_are_dropped_from_text(tok):
    text, ids = render_prompt([Turn("user", ["look <image> here"])], QWEN, tok)
    assert "<image>" not in text and media_placements(ids, media_token_ids(tok)) == []


def test_empty_prompts_are_refused(tok):
    with pytest.raises(UsageError, match="empty"):
        render_prompt([Turn("user", ["  "])], QWEN, tok)
    with pytest.raises(UsageError, match="last turn"):
        to_turns([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])


def test_continuation_ids_are_the_tail_of_the_joint_encoding(tok):
    prompt = "<|im_start|>user\nSay hello<|im_end|>\n<|im_start|>assistant\nHel"
    tail = continuation_ids(tok, prompt, "lo world")
    joint = tok(prompt + "lo world").input_ids
    assert tail == joint[len(tok(prompt).input_ids) :] and tail
    assert tok.decode(joint[: len(joint) - len(tail)]) + tok.decode(tail) == prompt + "lo world"
    assert continuation_ids(tok, prompt, "") == []


@pytest.mark.parametrize("variant,lone_tiles", [("nvila-lite-tiny", True), ("vila15-tiny", False)])
def test_only_a_lone_image_is_tiled(variant, lone_tiles):
    cfg = parse_config(TINY / variant)
    image = vila.Image(DEMO)
    lone = plan_media([image, "x"], cfg, num_frames=1, fps=0)
    lone.preprocess(cfg)
    assert lone.tiled is lone_tiles
    assert (lone.batch.tokens_per_image[0] > 1) is lone_tiles  # dynamic: one <image> token per tile
    pair = plan_media([image, "x", image], cfg, num_frames=1, fps=0)
    pair.preprocess(cfg)
    assert not pair.tiled and pair.batch.tokens_per_image == (1, 1)


def test_fill_hands_out_blocks_in_order_and_caches_them():
    cfg = parse_config(TINY / "vila15-tiny")
    cache = FeatureCache()
    plans = [plan_media([vila.Image(DEMO), "x"], cfg, num_frames=1, fps=0, cache=cache, cache_context="t")]
    plans.append(plan_media([vila.Image(DEMO), vila.Image(DEMO), "y"], cfg, num_frames=1, fps=0))
    for p in plans:
        p.preprocess(cfg)
    batch = concat_image_batches([p.batch for p in plans])
    assert batch.pixel_values.shape[0] == 3 and batch.tokens_per_image == (1, 1, 1)
    blocks = iter([torch.full((2, 4), float(i)) for i in range(3)])
    for p in plans:
        p.fill(blocks, iter(()), cache if p is plans[0] else None)
    assert [b[0, 0].item() for b in plans[0].image_blocks] == [0.0]
    assert [b[0, 0].item() for b in plans[1].image_blocks] == [1.0, 2.0]
    assert plans[0].batch is None and plans[0].images[0].image is None
    again = plan_media([vila.Image(DEMO), "x"], cfg, num_frames=1, fps=0, cache=cache, cache_context="t")
    assert again.images[0].blocks is not None and again.images[0].image is None  # a hit: nothing decoded


def test_concat_of_one_batch_is_that_batch():
    b = ImageBatch(torch.zeros(2, 3, 4, 4), (2,), None, (2,))
    assert concat_image_batches([b]) is b and concat_image_batches([]) is None
    assert isinstance(MediaPlan(tiled=False).image_blocks, list)
