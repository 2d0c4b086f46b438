"""From pixels to the embedding blocks that replace media tokens (NVlabs/VILA ``llava/model/encoders/``:
``BasicImageEncoder``, ``BasicVideoEncoder``, ``TSPVideoEncoder``).

``encode_images`` joins tower, multi-scale merge and projector. The image encoder wraps each image's
projected tokens with the start/end token embeddings; the video encoders do the same per frame (Basic) or
after temporal/spatial pooling (TSP).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..config import EncoderConfig, VisionConfig
from .projector import MultimodalProjector
from .vision import (
    BlockSize,
    map_to_tokens,
    merge_chessboard,
    merge_dynamic_s2,
    run_tower,
    s2_features,
    split_chessboard,
)

TokenEmbedder = Callable[[str | None], torch.Tensor | None]


def encode_images(
    tower: nn.Module,
    projector: MultimodalProjector,
    vision: VisionConfig,
    pixels: torch.Tensor,
    block_sizes: list[BlockSize | None] | None = None,
    chunk: int = 0,
) -> list[torch.Tensor]:
    """Pixels ``(B, 3, s, s)`` -> one ``(tokens, D)`` tensor per image (per tile outside Dynamic-S2)."""
    if vision.dynamic_s2:
        blocks = block_sizes if block_sizes is not None else [None] * pixels.shape[0]
        maps, new_blocks = merge_dynamic_s2(run_tower(tower, pixels, chunk), blocks, vision)
        # Project per 448 tile, then re-merge so tokens run in raster order over the whole grid, not tile by
        # tile, as the reference's `encode_images` does.
        tiles = torch.cat([map_to_tokens(split_chessboard(m, r, c)) for m, (r, c) in zip(maps, new_blocks)])
        projected = projector(tiles)  # (sum r*c, h*w, D)
        out, pos = [], 0
        for r, c in new_blocks:
            merged = merge_chessboard(projected[pos : pos + r * c], r, c)  # (1, D, r*h, c*w)
            out.append(map_to_tokens(merged)[0])
            pos += r * c
        return out
    feats = s2_features(tower, pixels, vision, chunk) if vision.s2 else run_tower(tower, pixels, chunk)
    return list(projector(feats).unbind(0))


def wrap(features: torch.Tensor, start: torch.Tensor | None, end: torch.Tensor | None) -> torch.Tensor:
    """``[start] + features + [end]`` along the sequence for ``(N, D)``, or per frame for ``(T, N, D)``."""
    if features.dim() == 2:
        features = features[None]
    t = features.shape[0]
    parts = []
    if start is not None:
        parts.append(start[None].expand(t, -1, -1))
    parts.append(features)
    if end is not None:
        parts.append(end[None].expand(t, -1, -1))
    return torch.cat(parts, dim=1).flatten(0, 1)


def pool(x: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """Mean over consecutive groups of ``size`` along ``dim``."""
    return x.unflatten(dim, (-1, size)).mean(dim + 1)


def pad_frames(features: torch.Tensor, multiple: int) -> torch.Tensor:
    """Repeat the last frame until the frame count is a multiple of the temporal pool size.

    The reference raises when a TSP checkpoint gets e.g. 12 frames for a pool size of 8 (fps sampling on a
    short clip, decode failures). Repeating the last frame keeps every decoded frame and changes nothing
    when the count already fits (every released setting samples a multiple).
    """
    t = features.shape[0]
    if t % multiple == 0:
        return features
    extra = multiple - t % multiple
    return torch.cat([features, features[-1:].expand(extra, *features.shape[1:])])


def tsp_pool(features: torch.Tensor, pool_size: tuple[int, int, int]) -> torch.Tensor:
    """``(T, N, D)`` frame features -> ``(T/pt, (g/ph)*(g/pw), D)``."""
    t, n, d = features.shape
    g = int(n**0.5)
    pt, ph, pw = pool_size
    if g % ph or g % pw:
        raise ValueError(f"TSP pool size {pool_size} does not divide the {g}x{g} token grid")
    x = pad_frames(features, pt).reshape(-1, g, g, d)  # (T', g, g, D)
    for dim, p in enumerate(pool_size):
        x = pool(x, p, dim)
    return x.flatten(1, 2)


def encode_video(frame_features: torch.Tensor, cfg: EncoderConfig, embed: TokenEmbedder) -> torch.Tensor:
    """One video's frame features ``(T, N, D)`` -> its embedding block (Basic or TSP encoder)."""
    start, end = embed(cfg.start_tokens), embed(cfg.end_tokens)
    if cfg.kind == "basic_video":
        return wrap(frame_features, start, end)
    sep = embed(cfg.sep_tokens)
    blocks = []
    for size in cfg.pool_sizes:
        blocks.append(wrap(tsp_pool(frame_features, size), start, end))
        if sep is not None:
            blocks.append(sep)
    return torch.cat(blocks)
