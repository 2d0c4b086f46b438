"""Multimodal projectors, chosen by ``mm_projector_type`` (NVlabs/VILA
``llava/model/multimodal_projector/base_projector.py``, ``MultimodalProjector``).

The module is an ``nn.Sequential`` stored as ``layers`` so that parameter names equal the checkpoint's
(``layers.{i}.weight``); parameter-free modules keep their positional index.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..errors import UnsupportedModelError


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


def _mlp(widths: list[int], out: int) -> list[nn.Module]:
    """LN/Linear/GELU chains of the downsample projectors: ``LN(w0), Lin(w0,w1), GELU, LN(w1), ...``."""
    layers: list[nn.Module] = []
    for a, b in zip(widths, widths[1:] + [out]):
        layers += [nn.LayerNorm(a), nn.Linear(a, b), nn.GELU()]
    return layers


def build_layers(kind: str, mm_hidden: int, hidden: int) -> nn.Module:
    """The ``layers`` module for a projector type; exact GELU, LayerNorm eps 1e-5, all Linear with bias."""
    m, d = mm_hidden, hidden
    if kind == "identity":
        return nn.Identity()
    if kind == "linear":
        return nn.Linear(m, d)
    match = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if match:
        layers: list[nn.Module] = [nn.Linear(m, d)]
        for _ in range(1, int(match.group(1))):
            layers += [nn.GELU(), nn.Linear(d, d)]
        return nn.Sequential(*layers)
    if kind in ("mlp_downsample", "mlp_downsample_2x2_fix"):
        return nn.Sequential(DownSample(2), nn.LayerNorm(4 * m), nn.Linear(4 * m, d), nn.GELU(), nn.Linear(d, d))
    if kind == "mlp_downsample_3x3_fix":
        chain = _mlp([9 * m, 3 * m], d)  # LN, Lin(9m,3m), GELU, LN, Lin(3m,d), GELU
        return nn.Sequential(DownSample(3), *chain, nn.Linear(d, d))
    if kind == "mlp_downsample_3x3_s2":
        chain = _mlp([9 * m, 3 * m, m, m // 3], d)
        return nn.Sequential(DownSample(3), *chain, nn.Linear(d, d))
    if kind == "mlp_downsample_3x3_s2_new":
        chain = _mlp([9 * m, 4 * m, 2 * m, m, m // 3], d)
        return nn.Sequential(DownSample(3), *chain, nn.Linear(d, d))
    raise UnsupportedModelError(
        f"unknown mm_projector_type {kind!r}; supported: identity, linear, mlpNx_gelu, mlp_downsample, "
        "mlp_downsample_2x2_fix, mlp_downsample_3x3_fix, mlp_downsample_3x3_s2, mlp_downsample_3x3_s2_new"
    )


def _first_linear_index(layers: nn.Module) -> int:
    return next(i for i, mod in enumerate(layers) if isinstance(mod, nn.Linear))


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
