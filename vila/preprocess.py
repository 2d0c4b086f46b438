"""Image preprocessing: pure functions from PIL images to normalised pixel tensors.

Everything here reproduces the reference bit for bit (spec image_preprocessing.md): Pillow's default
bicubic resize of the *original* image for every scale and thumbnail, the InternVL tile-grid search with
its tie rule and set-iteration candidate order, and the SigLIP processor's float64 rescale followed by a
float32 normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import PIL.Image
import torch

from .config import ProcessorConfig, VilaConfig

Grid = tuple[int, int]  # (columns, rows), the order the reference's grid search works in


@lru_cache(maxsize=64)
def candidate_grids(min_num: int, max_num: int) -> tuple[Grid, ...]:
    """Tile grids ``(cols, rows)`` with ``min_num <= cols*rows <= max_num``, in the reference's order.

    The reference builds a Python set and sorts it stably by area, so within equal areas the order is
    CPython's set iteration order; building the very same set reproduces it (spec §3.3 step 2, quirk #12).
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
    image area exceeds half of the grid's pixel area (spec §3.3 step 3)."""
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    return best


def crop_tiles(image: PIL.Image.Image, cols: int, rows: int, tile: int) -> list[PIL.Image.Image]:
    """Resize to ``(tile*cols, tile*rows)`` and cut row-major tiles."""
    resized = image.resize((tile * cols, tile * rows))
    return [
        resized.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile)) for r in range(rows) for c in range(cols)
    ]


def dynamic_tiles(image: PIL.Image.Image, tile: int, min_num: int = 1, max_num: int = 12) -> list[PIL.Image.Image]:
    """InternVL-style tiles plus a thumbnail of the original when there is more than one tile (NVILA-Lite)."""
    cols, rows = closest_grid(image.width, image.height, candidate_grids(min_num, max_num), tile)
    tiles = crop_tiles(image, cols, rows, tile)
    if len(tiles) > 1:
        tiles.append(image.resize((tile, tile)))
    return tiles


def dynamic_s2_tiles(image: PIL.Image.Image, scales: tuple[int, ...], max_num: int) -> tuple[list[PIL.Image.Image], Grid]:
    """Dynamic-S2 tiles (NVILA): square grids for every scale but the last, an aspect-ratio grid for the last.

    Returns the tiles, smallest scale first, and the last scale's block size as ``(rows, cols)``.
    """
    tile = scales[0]
    tiles: list[PIL.Image.Image] = []
    for scale in scales[:-1]:
        k = scale // tile
        tiles += crop_tiles(image, k, k, tile)
    min_num = (scales[-1] // tile) ** 2
    cols, rows = closest_grid(image.width, image.height, candidate_grids(min_num, max_num), tile)
    tiles += crop_tiles(image, cols, rows, tile)
    return tiles, (rows, cols)


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


def to_uint8(image: PIL.Image.Image, proc: ProcessorConfig) -> np.ndarray:
    """Processor resize (no-op at the target size) to an ``(s, s, 3)`` uint8 array."""
    if proc.do_resize and image.size != (proc.size, proc.size):
        image = image.resize((proc.size, proc.size), resample=proc.resample)
    return np.asarray(image, dtype=np.uint8)


def normalize(pixels: np.ndarray, proc: ProcessorConfig) -> torch.Tensor:
    """``(n, s, s, 3)`` uint8 -> ``(n, 3, s, s)`` float32 exactly as the processor computes it.

    One vectorised pass over all tiles instead of the reference's per-tile loop; every operation is an
    IEEE elementwise op, so the result is bit-identical.
    """
    x = torch.from_numpy(np.ascontiguousarray(pixels))
    if proc.do_rescale:
        x = (x.to(torch.float64) * proc.rescale_factor).to(torch.float32)
    else:
        x = x.to(torch.float32)
    if proc.do_normalize:
        mean = torch.tensor(proc.image_mean, dtype=torch.float32)
        std = torch.tensor(proc.image_std, dtype=torch.float32)
        x = (x - mean) / std
    return x.permute(0, 3, 1, 2).contiguous()  # (n, 3, s, s)


def to_pixels(tiles: list[PIL.Image.Image], proc: ProcessorConfig) -> torch.Tensor:
    """Tiles -> ``(n, 3, s, s)`` float32."""
    if proc.kind == "intern":
        # InternViT: torchvision Resize on a PIL image (= PIL bicubic), ToTensor, ImageNet mean/std.
        arrays = [np.asarray(t.resize((proc.size, proc.size), PIL.Image.BICUBIC), dtype=np.uint8) for t in tiles]
        x = torch.from_numpy(np.stack(arrays)).to(torch.float32).div(255)
        mean = torch.tensor(proc.image_mean, dtype=torch.float32)
        std = torch.tensor(proc.image_std, dtype=torch.float32)
        return ((x - mean) / std).permute(0, 3, 1, 2).contiguous()
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
    """Apply the reference's per-prompt decision (spec §3.0): tiling only for a single image."""
    proc, mode = cfg.processor, cfg.image_aspect_ratio
    if len(images) == 1 and mode == "dynamic":
        tiles = dynamic_tiles(images[0], proc.size, cfg.min_tiles, cfg.max_tiles)
        return ImageBatch(to_pixels(tiles, proc), (len(tiles),), None, (len(tiles),))
    if len(images) == 1 and mode == "dynamic_s2":
        tiles, block = dynamic_s2_tiles(images[0], cfg.vision.scales, cfg.max_tiles)
        return ImageBatch(to_pixels(tiles, proc), (len(tiles),), (block,), (1,))
    tiles = [single_tile(img, mode, proc) for img in images]
    ones = (1,) * len(images)
    return ImageBatch(to_pixels(tiles, proc), ones, None, ones)


def preprocess_frames(frames: list[PIL.Image.Image], cfg: VilaConfig) -> torch.Tensor:
    """Video frames -> ``(T', 3, s, s)``.

    By default each frame is one tile, like an image of a multi-image prompt (spec §5.8 item 4). With
    ``video_max_tiles > 1`` dynamic-resolution models tile every frame (spec §7.4): ``dynamic`` with at most
    ``video_max_tiles`` tiles, ``dynamic_s2`` with the image tiler (whose limit is ``max_tiles``, quirk #22);
    the tiles of all frames are then encoded as independent frames, as in the reference.
    """
    proc, mode = cfg.processor, cfg.image_aspect_ratio
    if cfg.video_max_tiles > 1 and mode == "dynamic":
        tiles = [t for f in frames for t in dynamic_tiles(f, proc.size, cfg.min_tiles, cfg.video_max_tiles)]
    elif cfg.video_max_tiles > 1 and mode == "dynamic_s2":
        tiles = [t for f in frames for t in dynamic_s2_tiles(f, cfg.vision.scales, cfg.max_tiles)[0]]
    else:
        tiles = [single_tile(f, mode, proc) for f in frames]
    return to_pixels(tiles, proc)
