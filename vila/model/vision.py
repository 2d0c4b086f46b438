"""Running a vision tower, and the S2 / Dynamic-S2 multi-scale feature maps built from any tower's features
(``merge_features_for_dynamic_s2`` in NVlabs/VILA ``llava/model/llava_arch.py``, and ``s2wrapper`` from
bfshi/scaling_on_scales).

A tower (one per family, :mod:`vila.families`) maps pixels ``(B, 3, s, s)`` to the features the projector
expects, ``(B, N, C)``: the hidden state after ``mm_vision_select_layer`` layers, with the CLS token dropped for
``"patch"``. Only the layers that are needed are kept (the released configs select layer -2, so the last layer,
the post-LayerNorm and the pooling head are never run).
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig
from ..families import tower_family

BlockSize = tuple[int, int]  # (rows, cols)
PROGRESS_MIN_CHUNKS = 4


def build_tower(cfg: VisionConfig, source: Any, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    """The tower of ``cfg.kind`` from its registered family (:mod:`vila.families`); ``source=None`` builds it on
    the meta device from the config alone."""
    return tower_family(cfg.kind).build(cfg, source, dtype, device)


def run_tower(tower: nn.Module, pixels: torch.Tensor, chunk: int = 0) -> torch.Tensor:
    """Tower forward in bounded batches, so hundreds of video frames never hold all activations at once."""
    if chunk <= 0 or pixels.shape[0] <= chunk:
        return tower(pixels)
    from tqdm.auto import tqdm

    starts = range(0, pixels.shape[0], chunk)
    # A bar only when encoding takes more than a moment (long videos: hundreds of frames), and only on a terminal.
    quiet = len(starts) < PROGRESS_MIN_CHUNKS or not sys.stderr.isatty()
    bar = tqdm(starts, desc="vision encode", unit="chunk", leave=False, disable=quiet, file=sys.stderr)
    return torch.cat([tower(pixels[i : i + chunk]) for i in bar])


def tokens_to_map(x: torch.Tensor) -> torch.Tensor:
    """``(B, N, C)`` row-major tokens -> ``(B, C, g, g)``."""
    b, n, c = x.shape
    g = math.isqrt(n)
    return x.transpose(1, 2).reshape(b, c, g, g)


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, H*W, C)`` row-major."""
    return x.flatten(2).transpose(1, 2)


def split_chessboard(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(rows*cols*B, C, H/rows, W/cols)``; tile ``(i, j)`` at batch ``(i*cols + j)*B + b``."""
    h, w = x.shape[-2] // rows, x.shape[-1] // cols
    return torch.cat([x[..., i * h : (i + 1) * h, j * w : (j + 1) * w] for i in range(rows) for j in range(cols)])


def merge_chessboard(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`split_chessboard`; ``(B', N, C)`` token input is first made a square map."""
    if x.dim() == 3:
        x = tokens_to_map(x)
    b = x.shape[0] // (rows * cols)
    tiles = [x[t * b : (t + 1) * b] for t in range(rows * cols)]
    return torch.cat([torch.cat(tiles[i * cols : (i + 1) * cols], dim=-1) for i in range(rows)], dim=-2)


def area_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``interpolate(mode="area")`` in float32, cast back, as ``s2wrapper`` merges scales."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x.float(), size=size, mode="area").to(x.dtype)


def s2_features(tower: nn.Module, pixels: torch.Tensor, cfg: VisionConfig, chunk: int = 0) -> torch.Tensor:
    """S2 multi-scale features (VILA1.5-3b-s2): ``(B, 3, S, S)`` -> ``(B, T*T, C*len(scales))``."""
    b = pixels.shape[0]
    maps = []
    for scale in cfg.scales:
        n = math.ceil(scale / cfg.max_split_size)
        x = pixels
        if pixels.shape[-1] != scale:
            # s2wrapper resizes with bicubic without antialias, in float32: its aliasing when downscaling is
            # part of what the released weights saw, so it is reproduced
            x = F.interpolate(pixels.float(), size=(scale, scale), mode="bicubic").to(pixels.dtype)
        feats = run_tower(tower, split_chessboard(x, n, n), chunk)  # (n*n*B, N, C)
        maps.append(merge_chessboard(feats, n, n))  # (B, C, n*g, n*g)
    target = maps[cfg.resize_output_to_scale_idx].shape[-2:]
    merged = torch.cat([area_resize(m, tuple(target)) for m in maps], dim=1)  # (B, C*S, T, T)
    assert merged.shape[0] == b
    return map_to_tokens(merged)


def merge_dynamic_s2(
    feats: torch.Tensor, block_sizes: list[BlockSize | None], cfg: VisionConfig
) -> tuple[list[torch.Tensor], list[BlockSize]]:
    """Per image, merge Dynamic-S2 tile features into one multi-scale map (``merge_features_for_dynamic_s2``
    of NVlabs/VILA ``llava/model/llava_arch.py``).

    ``feats`` are the tower outputs of every tile of every image, ``(T_total, N, C)``. Returns per image a
    map ``(1, C*len(scales), H', W')`` and the block size the projector must split it into.
    """
    scales, s0 = cfg.scales, cfg.scales[0]
    idx = cfg.resize_output_to_scale_idx
    out_maps, out_blocks = [], []
    pos = 0
    for block in block_sizes:
        if block is None:
            # A plain single tile (multi-image prompt, video frame): its map repeated over the scales.
            m = tokens_to_map(feats[pos : pos + 1])
            pos += 1
            out_maps.append(torch.cat([m] * len(scales), dim=1))
            out_blocks.append((1, 1))
            continue
        maps = []
        for scale in scales[:-1]:
            k = scale // s0
            maps.append(merge_chessboard(feats[pos : pos + k * k], k, k))
            pos += k * k
        rows, cols = block
        maps.append(merge_chessboard(feats[pos : pos + rows * cols], rows, cols))
        pos += rows * cols
        target = tuple(maps[idx].shape[-2:])
        out_maps.append(torch.cat([area_resize(m, target) for m in maps], dim=1))
        if idx == -1 or idx == len(scales) - 1:
            out_blocks.append(block)
        else:
            k = scales[idx] // s0
            out_blocks.append((k, k))
    if pos != feats.shape[0]:
        raise RuntimeError(f"dynamic-S2 merge consumed {pos} of {feats.shape[0]} tiles")
    return out_maps, out_blocks
