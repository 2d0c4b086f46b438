"""The multimodal projectors, one registered recipe per ``mm_projector_type`` (NVlabs/VILA
``llava/model/multimodal_projector/base_projector.py``, ``MultimodalProjector``).

Each recipe builds the ``layers`` module of :class:`~vila.model.projector.MultimodalProjector`; parameter-free
modules keep their positional index so that parameter names equal the checkpoint's ``layers.{i}.weight``.
Exact GELU, LayerNorm eps 1e-5, every Linear with a bias.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn

from ..model.projector import DownSample
from . import ProjectorFamily, register_projector


def _mlp(widths: list[int], out: int) -> list[nn.Module]:
    """LN/Linear/GELU chains of the downsample projectors: ``LN(w0), Lin(w0,w1), GELU, LN(w1), ...``."""
    layers: list[nn.Module] = []
    for a, b in zip(widths, widths[1:] + [out]):
        layers += [nn.LayerNorm(a), nn.Linear(a, b), nn.GELU()]
    return layers


def identity(kind: str, m: int, d: int) -> nn.Module:
    return nn.Identity()


def linear(kind: str, m: int, d: int) -> nn.Module:
    return nn.Linear(m, d)


def mlp_gelu(kind: str, m: int, d: int) -> nn.Module:
    depth = int(re.fullmatch(r"mlp(\d+)x_gelu", kind).group(1))
    layers: list[nn.Module] = [nn.Linear(m, d)]
    for _ in range(1, depth):
        layers += [nn.GELU(), nn.Linear(d, d)]
    return nn.Sequential(*layers)


def downsample_2x2(kind: str, m: int, d: int) -> nn.Module:
    return nn.Sequential(DownSample(2), nn.LayerNorm(4 * m), nn.Linear(4 * m, d), nn.GELU(), nn.Linear(d, d))


def downsample_3x3(widths: Callable[[int], list[int]]) -> Callable[[str, int, int], nn.Module]:
    """A 3x3 downsample, then LN/Linear/GELU steps through ``widths(mm_hidden)``, then a last Linear."""

    def build(kind: str, m: int, d: int) -> nn.Module:
        return nn.Sequential(DownSample(3), *_mlp(widths(m), d), nn.Linear(d, d))

    return build


register_projector(ProjectorFamily("identity", identity, with_ps3=True))
register_projector(ProjectorFamily("linear", linear, with_ps3=True))
register_projector(ProjectorFamily(r"mlp(\d+)x_gelu", mlp_gelu, pattern=True))
register_projector(ProjectorFamily("mlp_downsample", downsample_2x2, with_ps3=True))
# The LongVILA-R1 name of the same module.
register_projector(ProjectorFamily("mlp_downsample_2x2_fix", downsample_2x2, with_ps3=True))
register_projector(ProjectorFamily("mlp_downsample_3x3_fix", downsample_3x3(lambda m: [9 * m, 3 * m]), with_ps3=True))
register_projector(ProjectorFamily("mlp_downsample_3x3_s2", downsample_3x3(lambda m: [9 * m, 3 * m, m, m // 3])))
register_projector(
    ProjectorFamily("mlp_downsample_3x3_s2_new", downsample_3x3(lambda m: [9 * m, 4 * m, 2 * m, m, m // 3]))
)
