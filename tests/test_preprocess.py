"""Preprocessing pinned on hand-checkable cases and on the reference's recorded pixel statistics."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import GOLDENS, INPUTS, TINY, read_golden

from vila.config import ProcessorConfig, parse_config
from vila.media import load_image
from vila.preprocess import (
    candidate_grids,
    closest_grid,
    crop_tiles,
    dynamic_s2_tiles,
    dynamic_tiles,
    normalize,
    pad_to_square,
    preprocess_images,
)

# The reference's order: `dynamic_preprocess` (NVlabs/VILA `llava/mm_utils.py`) builds a set of grids and sorts it
# stably by area, so within equal areas the order is CPython's set iteration order (1..12 for `dynamic`, 9..12 for
# the last scale of `dynamic_s2`).
ORDER_1_12 = [(1, 1), (1, 2), (2, 1), (3, 1), (1, 3), (2, 2), (4, 1), (1, 4), (5, 1), (1, 5), (1, 6), (6, 1), (3, 2), (2, 3), (7, 1), (1, 7), (4, 2), (2, 4), (1, 8), (8, 1), (1, 9), (3, 3), (9, 1), (2, 5), (5, 2), (10, 1), (1, 10), (11, 1), (1, 11), (12, 1), (3, 4), (4, 3), (1, 12), (6, 2), (2, 6)]  # fmt: skip
ORDER_9_12 = [(3, 3), (9, 1), (1, 9), (10, 1), (1, 10), (2, 5), (5, 2), (11, 1), (1, 11), (1, 12), (6, 2), (12, 1), (3, 4), (4, 3), (2, 6)]  # fmt: skip


def test_candidate_order_matches_reference():
    assert list(candidate_grids(1, 12)) == ORDER_1_12
    assert list(candidate_grids(9, 12)) == ORDER_9_12


@pytest.mark.parametrize(
    "size, want",
    [
        ((448, 448), (1, 1)),  # area 1 tile: no tie-break beyond 1x1
        ((900, 900), (2, 2)),  # area 810000 > 0.5*448^2*4 = 401408, not > 903168
        ((1000, 1000), (3, 3)),  # area 1e6 > 0.5*448^2*9 = 903168
        ((600, 600), (1, 1)),  # 360000 is below half of a 2x2 grid's pixels (401408): 1x1 keeps the tie
        ((896, 448), (2, 1)),  # exact 2:1
        ((1344, 896), (3, 2)),  # 1.5 -> (3, 2) (cols, rows)
    ],
)
def test_closest_grid_tie_rule(size, want):
    w, h = size
    assert closest_grid(w, h, candidate_grids(1, 12), 448) == want


def test_dynamic_tiles_layout_and_thumbnail():
    # A 2x1 image whose left half is red and right half blue: tile 0 red, tile 1 blue, then a thumbnail.
    img = PIL.Image.new("RGB", (56, 28), (255, 0, 0))
    img.paste((0, 0, 255), (28, 0, 56, 28))
    tiles = dynamic_tiles(img, 28, 1, 12)
    assert len(tiles) == 3
    assert tiles[0].getpixel((5, 5)) == (255, 0, 0) and tiles[1].getpixel((20, 20)) == (0, 0, 255)
    assert tiles[2].size == (28, 28)
    assert len(dynamic_tiles(PIL.Image.new("RGB", (28, 28)), 28)) == 1  # one tile: no thumbnail


def test_crop_tiles_row_major():
    img = PIL.Image.fromarray(np.arange(4 * 6, dtype=np.uint8).reshape(4, 6).repeat(3, 0).repeat(3, 1))  # (12, 18)
    tiles = crop_tiles(img.convert("RGB"), cols=3, rows=2, tile=6)  # resize to 18x12 is a no-op
    firsts = [np.asarray(t)[0, 0, 0] for t in tiles]
    assert firsts == [0, 2, 4, 12, 14, 16]


def test_dynamic_s2_tiles_and_block_size():
    img = PIL.Image.new("RGB", (640, 480))
    tiles, block = dynamic_s2_tiles(img, (448, 896, 1344), 12)
    assert block == (3, 4)  # (rows, cols): 4:3 image -> 4 columns, 3 rows
    assert len(tiles) == 1 + 4 + 12
    assert all(t.size == (448, 448) for t in tiles)


def test_pad_to_square_uses_truncated_mean():
    img = PIL.Image.new("RGB", (4, 2), (10, 20, 30))
    out = pad_to_square(img, (0.5, 0.5, 0.5))
    assert out.size == (4, 4)
    assert out.getpixel((0, 0)) == (127, 127, 127) and out.getpixel((0, 1)) == (10, 20, 30)


def test_normalize_matches_processor_arithmetic():
    proc = ProcessorConfig(size=2)
    pixels = np.array([[[[0, 128, 255], [1, 2, 3]], [[254, 100, 7], [50, 60, 70]]]], dtype=np.uint8)
    want = ((pixels.astype(np.float64) * (1 / 255)).astype(np.float32) - np.float32(0.5)) / np.float32(0.5)
    got = normalize(pixels, proc)
    assert got.shape == (1, 3, 2, 2)
    assert np.array_equal(got.permute(0, 2, 3, 1).numpy(), want)


IMAGE_GOLDENS = [
    p
    for p in sorted(GOLDENS.glob("*/*.json"))
    if p.stem in ("demo_image", "syn_640x480") and p.parent.name != "vilahd-tiny"
]


@pytest.mark.parametrize("path", IMAGE_GOLDENS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_pixels_match_reference_statistics(path):
    """The reference recorded each tile's mean pixel value; ours agree to float32 rounding."""
    golden = read_golden(path)
    variant = path.parent.name
    cfg = parse_config(TINY / variant)
    images = [load_image(INPUTS / p["file"]) for p in golden["parts"] if p["type"] == "image"]
    batch = preprocess_images(images, cfg)
    call = golden["vision_tower_calls"][0]
    assert list(batch.pixel_values.shape) == call["input_shape"]
    means = batch.pixel_values.double().mean(dim=(1, 2, 3)).numpy()
    np.testing.assert_allclose(means, call["input_per_tile_mean"], atol=2e-6)
    blocks = golden["encoder_calls"][0].get("block_sizes") or None
    assert (list(map(list, batch.block_sizes)) if batch.block_sizes else None) == blocks


def test_multi_image_prompt_is_not_tiled():
    cfg = parse_config(TINY / "nvila-tiny")
    img = PIL.Image.new("RGB", (900, 600))
    batch = preprocess_images([img, img], cfg)
    assert batch.pixel_values.shape == (2, 3, 448, 448)
    assert batch.block_sizes is None and batch.tokens_per_image == (1, 1)


def test_rgba_alpha_is_dropped_not_composited():
    img = PIL.Image.new("RGBA", (4, 4), (200, 100, 50, 0))
    assert load_image(img).getpixel((0, 0)) == (200, 100, 50)
    assert torch.is_tensor(normalize(np.zeros((1, 2, 2, 3), np.uint8), ProcessorConfig(size=2)))


@pytest.mark.parametrize(
    "variant, mode", [("nvila-tiny", None), ("vila15-tiny", None), ("vila15-tiny", "pad"), ("nvila-lite-tiny", None)]
)
def test_frame_transform_keeps_pixels_exact(variant, mode):
    """Reducing frames to their tile at decode time (memory) gives the same pixels as preprocessing them later."""
    from dataclasses import replace

    from vila.preprocess import frame_transform, preprocess_frames

    cfg = parse_config(TINY / variant)
    if mode is not None:
        cfg = replace(cfg, image_aspect_ratio=mode)
    frame = load_image(INPUTS / "syn_640x480.png")
    small = frame_transform(cfg)(frame)
    assert small.size == (cfg.processor.size, cfg.processor.size)
    assert torch.equal(preprocess_frames([small], cfg), preprocess_frames([frame], cfg))
    assert frame_transform(replace(cfg, image_aspect_ratio="dynamic", video_max_tiles=4)) is None


# -- tiny images: the reference answers on them down to 1x1 ------------------------------------------------------

TINY_SIZES = [(1, 1), (1, 5), (2, 2), (3, 3), (2, 3), (7, 3), (5, 2)]  # (width, height)


def _random_image(width: int, height: int, seed: int = 0) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("variant", ["nvila-tiny", "nvila-lite-tiny", "vila15-tiny", "vila15-s2-tiny", "vilahd-tiny"])
@pytest.mark.parametrize("size", TINY_SIZES + [(9, 1)])
def test_tiny_single_image_in_every_mode(variant, size):
    """A single image is tiled or resized with PIL first, so any size works, a 1-pixel strip included."""
    cfg = parse_config(TINY / variant)
    batch = preprocess_images([_random_image(*size)], cfg)
    s = cfg.processor.size
    assert batch.pixel_values.shape[1:] == (3, s, s)
    if cfg.image_aspect_ratio == "dynamic_s2":  # 1 + 4 tiles, then the aspect-ratio grid of the last scale
        rows, cols = batch.block_sizes[0]
        assert batch.pixel_values.shape[0] == 5 + rows * cols and rows * cols >= 9
    elif cfg.image_aspect_ratio == "dynamic":
        cols, rows = closest_grid(*size, candidate_grids(cfg.min_tiles, cfg.max_tiles), s)
        assert batch.pixel_values.shape[0] == cols * rows + (cols * rows > 1)
    else:
        assert batch.pixel_values.shape[0] == 1


@pytest.mark.parametrize("variant", ["nvila-tiny", "nvila-lite-tiny", "vila15-tiny"])
@pytest.mark.parametrize("size", [(2, 2), (5, 2), (1, 5)])
def test_tiny_images_in_a_multi_image_prompt(variant, size):
    """Several images of a dynamic-resolution model go through the processor's own resize, one tile each."""
    cfg = parse_config(TINY / variant)
    batch = preprocess_images([_random_image(*size), _random_image(*size, seed=1)], cfg)
    assert batch.pixel_values.shape == (2, 3, cfg.processor.size, cfg.processor.size)
    assert batch.tiles_per_image == (1, 1)


def _processor_as_reference(image: PIL.Image.Image, size: int) -> torch.Tensor:
    """transformers 4.x ``SiglipImageProcessor`` on an (H, W, 3) array of height 3: ``infer_channel_dimension_format``
    says channels-first, ``to_pil_image`` moves that axis last, PIL bicubic resize, then rescale and normalise
    (mean = std = 0.5) in the processor's own arithmetic, channels-first out."""
    a = np.asarray(image)
    as_read = np.ascontiguousarray(np.moveaxis(a, 0, -1))  # (C=H, H'=W, W'=3) -> (W, 3, H)
    resized = np.asarray(PIL.Image.fromarray(as_read).resize((size, size), PIL.Image.BICUBIC))
    x = (resized.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.float32(0.5)) / np.float32(0.5)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


@pytest.mark.parametrize("variant", ["nvila-tiny", "nvila-lite-tiny"])
def test_three_pixel_high_image_is_read_channels_first_like_the_reference(variant):
    cfg = parse_config(TINY / variant)
    odd, normal = _random_image(7, 3), _random_image(5, 4, seed=1)
    batch = preprocess_images([odd, normal], cfg)
    want = _processor_as_reference(odd, cfg.processor.size)
    assert torch.equal(batch.pixel_values[0], want)
    # and not what a plain resize would give
    plain = preprocess_images([odd.resize((cfg.processor.size,) * 2, PIL.Image.BICUBIC), normal], cfg)
    assert not torch.equal(plain.pixel_values[0], want)


def test_one_pixel_high_image_fails_where_the_reference_fails():
    from vila.errors import MediaError

    cfg = parse_config(TINY / "nvila-tiny")  # dynamic_s2: two images -> the processor's own resize
    with pytest.raises(MediaError, match=r"9x1 .*2 pixels high"):
        preprocess_images([_random_image(9, 1), _random_image(4, 4)], cfg)
    pad = cfg.with_overrides(image_aspect_ratio="pad")  # 1x1 stays 1x1 after padding to a square
    with pytest.raises(MediaError, match="1x1"):
        preprocess_images([_random_image(1, 1)], pad)
    assert preprocess_images([_random_image(1, 2)], pad).pixel_values.shape[0] == 1  # padded to 2x2: fine


def test_tiny_image_end_to_end(tiny_model):
    model = tiny_model("nvila-lite-tiny")
    result = model.generate([_random_image(1, 1), "What is this?"], max_new_tokens=2)
    assert result.num_prompt_tokens > 121 and len(result.token_ids) >= 1
