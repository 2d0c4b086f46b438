"""From pixels to the embedding blocks that replace media tokens.

``encode_images`` joins tower, multi-scale merge and projector; ``wrap`` puts the start/end token embeddings
around a block; ``encode_video`` applies the video encoder the checkpoint names, registered in
:mod:`vila.families.encoders` (NVlabs/VILA ``llava/model/encoders/``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..config import EncoderConfig, VisionConfig
from ..families import encoder_family
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


def encode_video(frame_features: torch.Tensor, cfg: EncoderConfig, embed: TokenEmbedder) -> torch.Tensor:
    """One video's frame features ``(T, N, D)`` -> its embedding block, by the registered encoder of
    ``cfg.kind`` (:mod:`vila.families.encoders`)."""
    return encoder_family(cfg.kind).encode(frame_features, cfg, embed)
