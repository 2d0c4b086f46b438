"""S2 / Dynamic-S2 reshapes and merges pinned on small hand-checkable tensors."""

from __future__ import annotations

import torch

from vila.config import VisionConfig
from vila.model.vision import area_resize, merge_chessboard, merge_dynamic_s2, split_chessboard, tokens_to_map


def vision_cfg(**kw) -> VisionConfig:
    base = dict(
        kind="siglip", hidden_size=1, image_size=2, patch_size=1, num_hidden_layers=2, select_layer=-2,
        select_feature="cls_patch", s2=False, dynamic_s2=True, scales=(2, 4, 6), max_split_size=2,
        resize_output_to_scale_idx=-1,
    )  # fmt: skip
    base.update(kw)
    return VisionConfig(**base)


def test_split_chessboard_order_batch_innermost():
    x = torch.arange(2 * 16, dtype=torch.float32).reshape(2, 1, 4, 4)  # B=2, C=1, 4x4
    tiles = split_chessboard(x, 2, 2)
    assert tiles.shape == (8, 1, 2, 2)
    # tile (i, j) of image b sits at batch (i*2 + j)*2 + b
    assert torch.equal(tiles[(1 * 2 + 0) * 2 + 1], x[1, :, 2:4, 0:2])
    assert torch.equal(tiles[(0 * 2 + 1) * 2 + 0], x[0, :, 0:2, 2:4])
    assert torch.equal(merge_chessboard(tiles, 2, 2), x)


def test_merge_chessboard_from_tokens_row_major():
    # 2 tiles (1 row, 2 cols), each 2x2 tokens with value = 10*tile + token index
    tokens = torch.tensor([[0.0, 1, 2, 3], [10, 11, 12, 13]])[:, :, None]  # (2, 4, 1)
    merged = merge_chessboard(tokens, 1, 2)
    assert merged.shape == (1, 1, 2, 4)
    assert merged[0, 0].tolist() == [[0, 1, 10, 11], [2, 3, 12, 13]]


def test_tokens_to_map_is_row_major():
    x = torch.arange(6, dtype=torch.float32).reshape(1, 3, 2).repeat(1, 3, 1)[:, :4]  # (1, 4, 2)
    m = tokens_to_map(x)
    assert m.shape == (1, 2, 2, 2) and torch.equal(m[0, :, 0, 1], x[0, 1])


def test_area_resize_upsamples_by_window_rule():
    x = torch.tensor([[[[1.0, 3.0]]]])  # (1, 1, 1, 2) -> (1, 1, 1, 3)
    # output o covers input [floor(o*2/3), ceil((o+1)*2/3)): o0 -> [0,1), o1 -> [0,2), o2 -> [1,2)
    assert area_resize(x, (1, 3))[0, 0, 0].tolist() == [1.0, 2.0, 3.0]


def test_merge_dynamic_s2_tile_consumption_and_scales():
    cfg = vision_cfg()  # scales 2, 4, 6 with 2-px tiles; tower yields 1 token per tile (g = 1)
    # one image: 1 tile at scale 2, 4 tiles at scale 4, rows*cols = 2*3 = 6 tiles at scale 6; then a plain tile
    feats = torch.arange(1 + 4 + 6 + 1, dtype=torch.float32)[:, None, None]  # (12, N=1, C=1)
    maps, blocks = merge_dynamic_s2(feats, [(2, 3), None], cfg)
    assert blocks == [(2, 3), (1, 1)]
    assert maps[0].shape == (1, 3, 2, 3)  # channels = scales, resized to the last scale's 2x3 grid
    assert maps[0][0, 2].tolist() == [[5, 6, 7], [8, 9, 10]]  # last scale, row-major tiles
    assert maps[0][0, 0].tolist() == [[0, 0, 0], [0, 0, 0]]  # single 448 tile upsampled
    assert maps[1].shape == (1, 3, 1, 1) and maps[1].flatten().tolist() == [11, 11, 11]  # repeated over scales


def test_merge_dynamic_s2_resize_to_first_scale():
    cfg = vision_cfg(resize_output_to_scale_idx=0)
    feats = torch.arange(11, dtype=torch.float32)[:, None, None]
    maps, blocks = merge_dynamic_s2(feats, [(2, 3)], cfg)
    assert blocks == [(1, 1)] and maps[0].shape == (1, 3, 1, 1)
    assert maps[0].flatten().tolist() == [0.0, 2.5, 7.5]  # area means of each scale
