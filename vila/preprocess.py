"""Image preprocessing: pure functions from PIL images to normalised pixel tensors.

Everything here reproduces the reference bit for bit (NVlabs/VILA ``llava/mm_utils.py``: ``process_image``,
``dynamic_preprocess``, ``dynamic_s2_preprocess``; the slow ``SiglipImageProcessor``): Pillow's default
bicubic resize of the *original* image for every scale and thumbnail, the InternVL tile-grid search with
its tie rule and set-iteration candidate order, and the SigLIP processor's float64 rescale followed by a
float32 normalisation.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import TypeVar

import numpy as np
import PIL.Image
import torch

from .config import ProcessorConfig, VilaConfig
from .errors import MediaError
from .families import tower_family

logger = logging.getLogger(__name__)
Grid = tuple[int, int]  # (columns, rows), the order the reference's grid search works in
T = TypeVar("T")
R = TypeVar("R")


@lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="vila-preprocess")


def parallel_map(fn: Callable[[T], R], items: Sequence[T], cost: Callable[[T], int] | None = None) -> list[R]:
    """``[fn(x) for x in items]`` on a few threads: Pillow's resize and numpy's ``take`` release the GIL.

    Items are started costliest first (``cost``), so the longest resize never runs last; results keep
    their order, and each is computed exactly as it would be sequentially.
    """
    if len(items) < 2:
        return [fn(x) for x in items]
    order = sorted(range(len(items)), key=lambda i: -cost(items[i])) if cost else range(len(items))
    futures = {i: _pool().submit(fn, items[i]) for i in order}
    return [futures[i].result() for i in range(len(items))]


@lru_cache(maxsize=64)
def candidate_grids(min_num: int, max_num: int) -> tuple[Grid, ...]:
    """Tile grids ``(cols, rows)`` with ``min_num <= cols*rows <= max_num``, in the reference's order.

    The reference builds a Python set and sorts it stably by area, so within equal areas the order is
    CPython's set iteration order (``dynamic_preprocess`` in NVlabs/VILA ``llava/mm_utils.py``); building the
    very same set reproduces it.
    """
    grids = {
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    }
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def closest_grid(width: int, height: int, grids: tuple[Grid, ...], tile: int) -> Grid:
    """The grid whose aspect ratio is closest to the image's; a later grid wins an exact tie only when the
    image area exceeds half of the grid's pixel area (``find_closest_aspect_ratio`` in NVlabs/VILA
    ``llava/mm_utils.py``; the released models were trained with this rule)."""
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    return best


def grid_tiles(image: PIL.Image.Image, cols: int, rows: int, tile: int) -> np.ndarray:
    """Resize to ``(tile*cols, tile*rows)`` and cut row-major tiles: ``(cols*rows, tile, tile, 3)`` uint8.

    The same pixels as a PIL crop per tile; slicing one array avoids a crop and a conversion per tile.
    """
    a = np.asarray(image.resize((tile * cols, tile * rows)))
    rest = a.shape[2:]
    return a.reshape(rows, tile, cols, tile, *rest).swapaxes(1, 2).reshape(rows * cols, tile, tile, *rest)


def crop_tiles(image: PIL.Image.Image, cols: int, rows: int, tile: int) -> list[PIL.Image.Image]:
    """:func:`grid_tiles` as PIL images."""
    return [PIL.Image.fromarray(t) for t in grid_tiles(image, cols, rows, tile)]


def tiles_of_grids(image: PIL.Image.Image, grids: list[Grid], tile: int) -> np.ndarray:
    """:func:`grid_tiles` for several grids of the same image, concatenated; the resizes run in parallel."""
    image.load()  # a lazily opened file must not be decoded by two threads at once
    arrays = parallel_map(lambda g: grid_tiles(image, g[0], g[1], tile), grids, cost=lambda g: g[0] * g[1])
    return np.concatenate(arrays)


def dynamic_arrays(image: PIL.Image.Image, tile: int, min_num: int = 1, max_num: int = 12) -> np.ndarray:
    """InternVL-style tiles plus a thumbnail of the original when there is more than one tile (NVILA-Lite)."""
    cols, rows = closest_grid(image.width, image.height, candidate_grids(min_num, max_num), tile)
    # The thumbnail is the 1x1 grid: the original resized to (tile, tile).
    return tiles_of_grids(image, [(cols, rows)] + ([(1, 1)] if cols * rows > 1 else []), tile)


def dynamic_s2_arrays(image: PIL.Image.Image, scales: tuple[int, ...], max_num: int) -> tuple[np.ndarray, Grid]:
    """Dynamic-S2 tiles (NVILA): square grids for every scale but the last, an aspect-ratio grid for the last.

    Returns the tiles, smallest scale first, and the last scale's block size as ``(rows, cols)``.
    """
    tile = scales[0]
    min_num = (scales[-1] // tile) ** 2
    cols, rows = closest_grid(image.width, image.height, candidate_grids(min_num, max_num), tile)
    grids = [(scale // tile, scale // tile) for scale in scales[:-1]] + [(cols, rows)]
    return tiles_of_grids(image, grids, tile), (rows, cols)


def dynamic_tiles(image: PIL.Image.Image, tile: int, min_num: int = 1, max_num: int = 12) -> list[PIL.Image.Image]:
    """:func:`dynamic_arrays` as PIL images."""
    return [PIL.Image.fromarray(t) for t in dynamic_arrays(image, tile, min_num, max_num)]


def dynamic_s2_tiles(
    image: PIL.Image.Image, scales: tuple[int, ...], max_num: int
) -> tuple[list[PIL.Image.Image], Grid]:
    """:func:`dynamic_s2_arrays` as PIL images."""
    tiles, block = dynamic_s2_arrays(image, scales, max_num)
    return [PIL.Image.fromarray(t) for t in tiles], block


def pad_to_square(image: PIL.Image.Image, mean: tuple[float, float, float]) -> PIL.Image.Image:
    """``expand2square`` with the processor mean as fill colour (truncated to int, as the reference does)."""
    w, h = image.size
    if w == h:
        return image
    color = tuple(int(m * 255) for m in mean)
    side = max(w, h)
    canvas = PIL.Image.new(image.mode, (side, side), color)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def processor_resize(image: PIL.Image.Image, proc: ProcessorConfig) -> PIL.Image.Image:
    """The processor's own resize to ``(s, s)`` (a no-op at that size), as the reference's processor sees the image.

    transformers' image processors (4.x, which the reference pins) guess the channel axis from the array's shape
    (``infer_channel_dimension_format``): an ``(H, W, 3)`` image whose height is 1 or 3 is taken for channels-first.
    A 3-pixel-high image is therefore resized as the ``(W, 3)`` picture whose channels are its rows, and a
    1-pixel-high one ends with one channel against three means, an error in the reference. Images the reference
    tiles or resizes with PIL first never get here at another size, so only multi-image prompts of dynamic-resolution
    models, ``pad`` mode and video frames can meet this.
    """
    if not proc.do_resize or image.size == (proc.size, proc.size):
        return image
    if tower_family(proc.kind).pixels.guesses_channel_axis and image.height in (1, 3):
        if image.height == 1:
            raise MediaError(
                f"an image {image.width}x1 pixels cannot be read by this model's image processor in this mode (the "
                "reference fails on it too: it takes a 1-pixel height for the colour axis); use an image at least 2 "
                "pixels high"
            )
        image = PIL.Image.fromarray(np.ascontiguousarray(np.asarray(image.convert("RGB")).transpose(1, 2, 0)))
    return image.resize((proc.size, proc.size), resample=proc.resample)


def to_uint8(image: PIL.Image.Image, proc: ProcessorConfig) -> np.ndarray:
    """Processor resize (no-op at the target size) to an ``(s, s, 3)`` uint8 array."""
    return np.asarray(processor_resize(image, proc), dtype=np.uint8)


@lru_cache(maxsize=16)
def value_table(proc: ProcessorConfig) -> np.ndarray:
    """``(3, 256)`` float32: the processor's output for every uint8 value of every channel.

    Built with the processor's own operations (its family's :class:`~vila.families.PixelRules`): the SigLIP
    processor's float64 rescale cast to float32, then a float32 ``(x - mean) / std``; torchvision's float32
    ``x / 255`` (ToTensor, InternViT) then the same normalisation.
    Each output pixel depends only on its byte and channel, so a table lookup is bit-identical.
    """
    x = torch.arange(256, dtype=torch.uint8)[:, None].expand(256, 3)
    to_tensor = tower_family(proc.kind).pixels.float32_rescale
    if to_tensor:
        x = x.to(torch.float32).div(255)
    elif proc.do_rescale:
        x = (x.to(torch.float64) * proc.rescale_factor).to(torch.float32)
    else:
        x = x.to(torch.float32)
    if to_tensor or proc.do_normalize:
        mean = torch.tensor(proc.image_mean, dtype=torch.float32)
        std = torch.tensor(proc.image_std, dtype=torch.float32)
        x = (x - mean) / std
    return np.ascontiguousarray(x.T.numpy())


def normalize(pixels: np.ndarray, proc: ProcessorConfig) -> torch.Tensor:
    """``(n, s, s, 3)`` uint8 -> ``(n, 3, s, s)`` float32 exactly as the processor computes it.

    A lookup in :func:`value_table` per channel, written straight into channel-first layout: one pass over
    all tiles instead of the reference's per-tile float64 pipeline, and bit-identical to it.
    """
    table = value_table(proc)
    n, h, w, _ = pixels.shape
    out = np.empty((n, 3, h, w), dtype=np.float32)

    def tile(i: int) -> None:  # contiguous (h, w) destinations: ~2x faster than strided ones
        for c in range(3):
            np.take(table[c], pixels[i, ..., c], out=out[i, c])

    parallel_map(tile, range(n))
    return torch.from_numpy(out)


def to_pixels(tiles: list[PIL.Image.Image], proc: ProcessorConfig) -> torch.Tensor:
    """Tiles -> ``(n, 3, s, s)`` float32."""
    return normalize(np.stack([to_uint8(t, proc) for t in tiles]), proc)


def single_tile(image: PIL.Image.Image, mode: str | None, proc: ProcessorConfig) -> PIL.Image.Image:
    """The non-tiled path of one image (multi-image prompts, video frames, resize/pad models)."""
    if mode == "resize":
        return image.resize((proc.size, proc.size))
    if mode == "pad":
        return pad_to_square(image, proc.image_mean)
    return image


@dataclass(frozen=True)
class ImageBatch:
    """Preprocessed images of one prompt.

    ``pixel_values`` holds every tile of every image in prompt order; ``tiles_per_image`` says how many
    belong to each image. ``block_sizes`` is set only for a Dynamic-S2 single image; ``tokens_per_image``
    is how many ``<image>`` tokens each image occupies in the prompt (``dynamic`` expands one per tile).
    """

    pixel_values: torch.Tensor
    tiles_per_image: tuple[int, ...]
    block_sizes: tuple[Grid, ...] | None
    tokens_per_image: tuple[int, ...]


def preprocess_images(images: list[PIL.Image.Image], cfg: VilaConfig) -> ImageBatch:
    """Apply the reference's per-prompt decision (``generate_content``, NVlabs/VILA ``llava/model/llava_arch.py``):
    tiling only for a single image; any other image is resized to one tile."""
    proc, mode = cfg.processor, cfg.image_aspect_ratio
    # Tiles are cut at the processor's size, so its own resize is a no-op and they go straight to normalize.
    if len(images) == 1 and mode == "dynamic":
        tiles = dynamic_arrays(images[0], proc.size, cfg.min_tiles, cfg.max_tiles)
        logger.debug("tiles: %d for the %dx%d image (dynamic, up to %d)", len(tiles), *images[0].size, cfg.max_tiles)
        return ImageBatch(normalize(tiles, proc), (len(tiles),), None, (len(tiles),))
    if len(images) == 1 and mode == "dynamic_s2":
        tiles, block = dynamic_s2_arrays(images[0], cfg.vision.scales, cfg.max_tiles)
        logger.debug("tiles: %d for the %dx%d image (dynamic_s2, block %s)", len(tiles), *images[0].size, block)
        return ImageBatch(normalize(tiles, proc), (len(tiles),), (block,), (1,))
    tiles = [single_tile(img, mode, proc) for img in images]
    logger.debug("tiles: 1 per image, %d image(s) (%s; only a prompt's single image is tiled)", len(images), mode)
    ones = (1,) * len(images)
    return ImageBatch(to_pixels(tiles, proc), ones, None, ones)


def frame_transform(cfg: VilaConfig) -> Callable[[PIL.Image.Image], PIL.Image.Image] | None:
    """What each video frame can be reduced to as soon as it is decoded, or None when tiling needs the original.

    Without ``video_max_tiles`` tiling a frame only ever becomes one ``s x s`` tile, so keeping that tile
    instead of the full frame gives the very same pixels and bounds memory: 1024 frames of a 720p video hold
    ~2.8 GB as decoded RGB, ~0.6 GB as 448-px tiles.
    """
    if cfg.video_max_tiles > 1 and cfg.image_aspect_ratio in ("dynamic", "dynamic_s2"):
        return None
    proc, mode = cfg.processor, cfg.image_aspect_ratio

    def to_tile(frame: PIL.Image.Image) -> PIL.Image.Image:
        return processor_resize(single_tile(frame.convert("RGB"), mode, proc), proc)

    return to_tile


def preprocess_frames(frames: list[PIL.Image.Image], cfg: VilaConfig) -> torch.Tensor:
    """Video frames -> ``(T', 3, s, s)``.

    By default each frame is one tile, like an image of a multi-image prompt, as the reference's video path
    preprocesses frames. With ``video_max_tiles > 1`` dynamic-resolution models tile every frame, as its
    ``generate_content`` does: ``dynamic`` with at most ``video_max_tiles`` tiles, ``dynamic_s2`` with the image
    tiler (whose limit stays ``max_tiles``: ``dynamic_s2_preprocess`` ignores the per-call limit); the tiles of all
    frames are then encoded as independent frames, as in the reference.
    """
    proc, mode = cfg.processor, cfg.image_aspect_ratio
    if cfg.video_max_tiles > 1 and mode == "dynamic":
        tiles = [t for f in frames for t in dynamic_tiles(f, proc.size, cfg.min_tiles, cfg.video_max_tiles)]
    elif cfg.video_max_tiles > 1 and mode == "dynamic_s2":
        tiles = [t for f in frames for t in dynamic_s2_tiles(f, cfg.vision.scales, cfg.max_tiles)[0]]
    else:
        tiles = [single_tile(f, mode, proc) for f in frames]
    logger.debug("tiles: %d for %d frame(s) (%s)", len(tiles), len(frames), mode)
    return to_pixels(tiles, proc)
