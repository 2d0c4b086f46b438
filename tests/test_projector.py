"""Projector layouts (parameter names and sizes) and downsample token order."""

from __future__ import annotations

import pytest
import torch

from vila.errors import UnsupportedModelError
from vila.families.encoders import pad_frames, tsp_pool
from vila.model.encoders import wrap
from vila.model.projector import DownSample, MultimodalProjector


def grid(n: int, m: int = 1) -> torch.Tensor:
    """``(1, n*n, m)`` tokens whose value is 10*row + col (channel c adds 100*c)."""
    rows = torch.arange(n)[:, None] * 10 + torch.arange(n)[None]
    x = rows.flatten().float()[None, :, None].repeat(1, 1, m)
    return x + 100 * torch.arange(m).float()


def test_downsample_2x2_order_and_odd_padding():
    out = DownSample(2)(grid(3))  # 3x3 -> padded 4x4 -> 2x2 tokens of 4 channels
    assert out.shape == (1, 4, 4)
    assert out[0, 0].tolist() == [0, 1, 10, 11]  # x[0,0] x[0,1] x[1,0] x[1,1]
    assert out[0, 1].tolist() == [2, 0, 12, 0]  # right column padded with zeros
    assert out[0, 2].tolist() == [20, 21, 0, 0]  # bottom row padded
    assert out[0, 3].tolist() == [22, 0, 0, 0]


def test_downsample_3x3_order_and_padding():
    out = DownSample(3)(grid(4, m=2))  # 4x4 -> padded 6x6 -> 2x2 tokens of 18 channels
    assert out.shape == (1, 4, 18)
    first = out[0, 0].reshape(9, 2)[:, 0].tolist()
    assert first == [0, 1, 2, 10, 11, 12, 20, 21, 22]  # row-major inside the 3x3 block
    assert out[0, 0].reshape(9, 2)[0].tolist() == [0, 100]  # channels of one token stay together
    assert out[0, 3].reshape(9, 2)[:, 0].tolist() == [33, 0, 0, 0, 0, 0, 0, 0, 0]


@pytest.mark.parametrize(
    "kind, names",
    [
        ("linear", ["layers.weight", "layers.bias"]),
        ("mlp2x_gelu", ["layers.0.weight", "layers.0.bias", "layers.2.weight", "layers.2.bias"]),
        (
            "mlp_downsample",
            [
                "layers.1.weight",
                "layers.1.bias",
                "layers.2.weight",
                "layers.2.bias",
                "layers.4.weight",
                "layers.4.bias",
            ],
        ),
        (
            "mlp_downsample_2x2_fix",
            [
                "layers.1.weight",
                "layers.1.bias",
                "layers.2.weight",
                "layers.2.bias",
                "layers.4.weight",
                "layers.4.bias",
            ],
        ),
        ("mlp_downsample_3x3_fix", [f"layers.{i}.{p}" for i in (1, 2, 4, 5, 7) for p in ("weight", "bias")]),
        (
            "mlp_downsample_3x3_s2",
            [f"layers.{i}.{p}" for i in (1, 2, 4, 5, 7, 8, 10, 11, 13) for p in ("weight", "bias")],
        ),
        (
            "mlp_downsample_3x3_s2_new",
            [f"layers.{i}.{p}" for i in (1, 2, 4, 5, 7, 8, 10, 11, 13, 14, 16) for p in ("weight", "bias")],
        ),
        ("identity", []),
    ],
)
def test_projector_parameter_names(kind, names):
    with torch.device("meta"):
        p = MultimodalProjector(kind, 12, 8)
    assert sorted(p.state_dict()) == sorted(names)


def test_projector_sizes_nvila8b():
    with torch.device("meta"):
        p = MultimodalProjector("mlp_downsample", 3456, 3584)  # NVILA-8B: 3 x 1152 channels, Qwen2-7B
    sizes = {k: tuple(v.shape) for k, v in p.state_dict().items()}
    assert sizes["layers.2.weight"] == (3584, 4 * 3456)
    assert sum(v.numel() for v in p.parameters()) * 2 == pytest.approx(125e6, rel=0.01)  # 125 MB published


def test_gelu_is_exact_erf():
    p = MultimodalProjector("mlp2x_gelu", 2, 2)
    assert p.layers[1].approximate == "none"


def test_unknown_projector_is_a_clear_error():
    with pytest.raises(UnsupportedModelError, match="mlp_downsample_fix"):
        MultimodalProjector("mlp_downsample_fix", 4, 4)


def test_tsp_pool_means_consecutive_frames():
    feats = torch.arange(8, dtype=torch.float32)[:, None, None].repeat(1, 4, 1)  # (T=8, 2x2 tokens, D=1)
    out = tsp_pool(feats, (4, 1, 1))
    assert out.shape == (2, 4, 1) and out[:, 0, 0].tolist() == [1.5, 5.5]
    spatial = tsp_pool(torch.arange(4.0)[None, :, None], (1, 2, 2))  # one frame, 2x2 grid -> 1 token
    assert spatial.flatten().tolist() == [1.5]


def test_tsp_pads_by_repeating_last_frame():
    feats = torch.arange(5, dtype=torch.float32)[:, None, None]  # 5 frames, pool 4 -> 8 frames
    assert pad_frames(feats, 4).flatten().tolist() == [0, 1, 2, 3, 4, 4, 4, 4]
    assert tsp_pool(feats, (4, 1, 1)).flatten().tolist() == [1.5, 4.0]


def test_wrap_per_frame():
    feats = torch.zeros(2, 3, 1)
    end = torch.ones(1, 1)
    out = wrap(feats, None, end)
    assert out.flatten().tolist() == [0, 0, 0, 1, 0, 0, 0, 1]
