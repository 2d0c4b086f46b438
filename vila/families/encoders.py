"""The media encoders of ``config.json`` ``image_encoder`` / ``video_encoder``, registered by their Hydra
``_target_`` (NVlabs/VILA ``llava/model/encoders/``: ``BasicImageEncoder``, ``BasicVideoEncoder``,
``TSPVideoEncoder``). Each wraps a medium's projected tokens with the start/end token embeddings: per image
or frame (Basic), or after temporal/spatial pooling (TSP)."""

from __future__ import annotations

import torch

from ..config import EncoderConfig
from ..errors import CheckpointError
from ..model.encoders import TokenEmbedder, wrap
from . import EncoderFamily, register_encoder


def basic(features: torch.Tensor, cfg: EncoderConfig, embed: TokenEmbedder) -> torch.Tensor:
    """``[start] + tokens + [end]`` per image or per frame."""
    return wrap(features, embed(cfg.start_tokens), embed(cfg.end_tokens))


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


def tsp(features: torch.Tensor, cfg: EncoderConfig, embed: TokenEmbedder) -> torch.Tensor:
    """One wrapped block per pool size, each followed by the separator tokens."""
    start, end, sep = embed(cfg.start_tokens), embed(cfg.end_tokens), embed(cfg.sep_tokens)
    blocks = []
    for size in cfg.pool_sizes:
        blocks.append(wrap(tsp_pool(features, size), start, end))
        if sep is not None:
            blocks.append(sep)
    return torch.cat(blocks)


def check_tsp(cfg: EncoderConfig) -> None:
    if not cfg.pool_sizes or any(len(p) != 3 or min(p) < 1 for p in cfg.pool_sizes):
        raise CheckpointError(f"config.json: TSPVideoEncoder needs pool_sizes [[t, h, w], ...], got {cfg.pool_sizes}")


register_encoder(EncoderFamily("llava.model.encoders.BasicImageEncoder", "basic_image", basic))
register_encoder(EncoderFamily("llava.model.encoders.BasicVideoEncoder", "basic_video", basic))
register_encoder(EncoderFamily("llava.model.encoders.TSPVideoEncoder", "tsp_video", tsp, check=check_tsp))
