"""The multimodal projector module (NVlabs/VILA ``llava/model/multimodal_projector/base_projector.py``,
``MultimodalProjector``) and the space-to-channel downsample its recipes start with. The recipe per
``mm_projector_type`` is registered in :mod:`vila.families.projectors`; its ``layers`` module is stored as
``layers`` so that parameter names equal the checkpoint's (``layers.{i}.weight``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..families import projector_family


def _pad_grid(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad rows (bottom) then columns (right) of ``(B, R, C, M)`` up to a multiple.

    The zeros enter the following LayerNorm's statistics (a 32x32 tile becomes 33x33 before a 3x3 downsample);
    the released weights were trained that way, so the padding is reproduced.
    """
    b, r, c, m = x.shape
    if r % multiple:
        x = torch.cat([x, x.new_zeros(b, multiple - r % multiple, c, m)], dim=1)
    if c % multiple:
        x = torch.cat([x, x.new_zeros(b, x.shape[1], multiple - c % multiple, m)], dim=2)
    return x


class DownSample(nn.Module):
    """Space-to-channel downsample of a square token grid by ``k`` (2 or 3).

    Output token ``(p, q)`` is the concatenation of ``x[k*p + dr, k*q + dc]`` over ``dr`` (outer) and
    ``dc`` (inner), row-major inside each block, the order the reference's ``DownSampleBlock`` /
    ``DownSample3x3BlockFix`` reshapes produce.
    """

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, m = x.shape
        g = int(n**0.5)
        x = _pad_grid(x.reshape(b, g, g, m), self.k)  # (B, R, C, M), R and C multiples of k
        r, c, k = x.shape[1], x.shape[2], self.k
        x = x.reshape(b, r // k, k, c // k, k, m)  # (B, R/k, dr, C/k, dc, M)
        x = x.permute(0, 1, 3, 2, 4, 5)  # (B, R/k, C/k, dr, dc, M)
        return x.reshape(b, (r // k) * (c // k), k * k * m)


def build_layers(kind: str, mm_hidden: int, hidden: int) -> nn.Module:
    """The ``layers`` module of a projector type, from its registered recipe (:mod:`vila.families.projectors`)."""
    return projector_family(kind).build(kind, mm_hidden, hidden)


class MultimodalProjector(nn.Module):
    """Vision features ``(B, N, mm_hidden)`` -> LLM embeddings ``(B, N', hidden)``."""

    def __init__(self, kind: str, mm_hidden: int, hidden: int):
        super().__init__()
        self.kind = kind
        self.layers = build_layers(kind, mm_hidden, hidden)

    @property
    def downsample(self) -> int:
        """Spatial reduction per side (1, 2 or 3), used to count tokens without running the model."""
        first = self.layers[0] if isinstance(self.layers, nn.Sequential) else self.layers
        return first.k if isinstance(first, DownSample) else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
