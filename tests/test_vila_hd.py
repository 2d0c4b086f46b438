"""VILA-HD (PS3 tower, top-down patch selection) on the tiny ``vilahd-tiny`` checkpoint.

Three kinds of ground truth: the reference's goldens (whole model, checkpoint defaults), outputs of the reference
PS3 tower itself (``fixtures/ps3_reference``: ps3-torch 0.1.3 under the settings the goldens do not cover), and
literal transcriptions of the reference's formulas for the parts in between.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import FIXTURES, GOLDENS, HF_CONFIGS, INPUTS, TINY, assert_close_to_golden, read_golden

import vila
from vila import cli
from vila.errors import UnsupportedModelError, UsageError
from vila.media import load_image
from vila.model.ps3 import PS3Config, PS3Tower, derive_budgets, plan_passes
from vila.model.vila import to_turns
from vila.model.vila_hd import VilaHDModel, context_floor, embed_images
from vila.preprocess import preprocess_images

VARIANT = "vilahd-tiny"
PS3_REFERENCE = FIXTURES / "ps3_reference" / "vilahd-tiny.json"
DEMO = ["Please describe the image"]


@pytest.fixture(scope="module")
def model(tiny_model) -> VilaHDModel:
    m = tiny_model(VARIANT)
    assert isinstance(m, VilaHDModel)
    return m


def demo_parts() -> list:
    return [vila.Image(INPUTS / "demo_img.png"), *DEMO]


def pixels_of(model: VilaHDModel, files: list[str]) -> torch.Tensor:
    images = [load_image(vila.Image(INPUTS / f)) for f in files]
    return preprocess_images(images, model.config).pixel_values


# -- the reference's goldens --------------------------------------------------------------------------------


def test_demo_image_golden(model):
    golden = read_golden(GOLDENS / VARIANT / "demo_image.json")
    assert golden["call"]["generate"] == {"max_new_tokens": 16, "do_sample": False}
    prepared = model.prepare(to_turns(demo_parts()))
    assert prepared.input_ids.tolist() == golden["input_ids"]
    assert prepared.inputs_embeds.shape[0] == golden["num_llm_input_positions"] == 708
    assert prepared.media_tokens == [m["num_embeddings"] for m in golden["media"]] == [677]

    # the top-down prompt pass: position, LLM length, prompt vector
    info = prepared.look_close
    top_down = golden["ps3"]["top_down"]
    assert [info.top_down_position] == top_down["look_close_position_in_input_ids"]
    assert info.prompt_pass_positions == top_down["prompt_pass_llm_positions"]
    assert_close_to_golden(info.prompt, top_down["prompt"][0], floor=0)

    # the selected patches, per scale, and the LLM tokens they became
    selections = golden["vision_tower_calls"][1]["ps3"]["per_image"][0]
    assert [s.tolist() for s in info.selected[0]] == [s["selected_flat_indices"] for s in selections]
    per_image = golden["ps3"]["per_image_tokens"][0]
    assert info.tokens == [(per_image["low_res_llm_tokens"], per_image["high_res_llm_tokens_per_scale"])]

    want = np.load(GOLDENS / VARIANT / "demo_image.npz")["first_step_logits"]
    with torch.no_grad():
        logits = model.llm(inputs_embeds=prepared.inputs_embeds[None]).logits[0, -1].numpy()
    assert_close_to_golden(logits[: len(want)], want)

    result = model.generate(demo_parts(), max_new_tokens=16, do_sample=False)
    assert result.token_ids == golden["generated_ids"]
    assert result.text == golden["generated_text"]


def test_text_only_golden_is_a_clear_error(model):
    golden = read_golden(GOLDENS / VARIANT / "text_only.json")
    assert golden["status"] == "error"  # the reference fails with an AssertionError
    text = golden["parts"][0]["text"]
    with pytest.raises(UsageError, match="at least one image"):
        model.generate_content(text, max_new_tokens=4)


# -- the PS3 tower against the reference ps3-torch -------------------------------------------------------------


def checksum(x: torch.Tensor) -> list[float]:
    """[sum, abs sum, 4 position-weighted sums] of ``(N, C)`` features, as fixtures/ps3_reference stores them."""
    x = x.double()
    n, c = x.shape
    i = torch.arange(n, dtype=torch.float64)[:, None]
    j = torch.arange(c, dtype=torch.float64)[None]
    sums = [float((x * torch.sin(i * (0.37 + k) + j * (1.13 + 0.5 * k))).sum()) for k in range(4)]
    return [float(x.sum()), float(x.abs().sum()), *sums]


def bitmap(m: torch.Tensor) -> str:
    return np.packbits(m.flatten().numpy().astype(np.uint8)).tobytes().hex()


REFERENCE = json.loads(PS3_REFERENCE.read_text())


@pytest.mark.parametrize("case", sorted(REFERENCE["cases"]))
def test_ps3_tower_matches_reference(model, case):
    spec = REFERENCE["cases"][case]
    tower = model.vision_tower
    pixels = pixels_of(model, [REFERENCE["inputs"][i] for i in spec["images"]])
    b = pixels.shape[0]
    prompt = None
    if spec["prompt"] is not None:
        prompt = torch.tensor([REFERENCE["prompts"][spec["prompt"]]] * b)
    budgets = spec["budgets"] or tower.config.max_select_num_each_scale
    with torch.no_grad():
        low = tower.low_res(pixels)
        probs = tower.selection_probs(pixels, low, prompt, spec["smooth"])
        plan = plan_passes(tower.total_cells(1512, 1512), budgets, spec["num_look_close"], spec["num_token_look_close"])
        look = tower.look_close(pixels, low, probs, budgets, plan)
    union = torch.cat([m.reshape(b, -1) for m in look.maps], dim=1).bool()
    high = torch.cat(look.features, dim=1)[union].reshape(b, -1, tower.width)
    feats = torch.cat([tower.low_res_features(low), high], dim=1)  # what the reference tower returns to VILA
    assert list(feats.shape) == spec["feature_shape"]
    for i in range(b):
        assert [int(m[i].sum()) for m in look.maps] == spec["selected_per_scale"][i]
        assert [bitmap(m[i]) for m in look.maps] == spec["selection_bitmaps"][i]
        want = spec["feature_checksums"][i]
        assert_close_to_golden(checksum(feats[i]), want, scale=want[1])  # relative to the features' abs sum


def reference_encode_images_ps3(
    model: VilaHDModel, tower_out: torch.Tensor, maps: list[torch.Tensor]
) -> list[torch.Tensor]:
    """``encode_images_ps3`` of the reference for ``mlp_downsample`` (concat_low_high_res_features), transcribed:
    projector over whole zero-filled high-res grids, then only fully selected 2x2 groups are kept."""
    proj, n_low = model.mm_projector, model.vision_tower.config.low_res_token_num
    low = proj(tower_out[:, :n_low])
    pe = proj.high_res_pos_embed.reshape(1, 27, 27, -1).permute(0, 3, 1, 2)
    low = low + F.interpolate(pe, 14, mode="area").flatten(2).transpose(1, 2) + proj.high_res_scale_embed[0]
    b, c = tower_out.shape[0], tower_out.shape[-1]
    sel = torch.cat([m.flatten(1, 2) for m in maps], dim=1)
    high = torch.zeros(b, sel.shape[1], c)
    for i in range(b):
        high[i][sel[i].bool()] = tower_out[i][n_low:]
    processed, prev = [], 0
    for m in maps:
        n = m.shape[1] * m.shape[2]
        processed.append(proj(high[:, prev : prev + n]))
        prev += n
    processed = torch.cat(processed, dim=1)
    sizes = [(math.ceil(m.shape[-2] / 2), math.ceil(m.shape[-1] / 2)) for m in maps]
    pos = [
        F.interpolate(pe, s, mode="area").flatten(2).transpose(1, 2) + proj.high_res_scale_embed[i + 1]
        for i, s in enumerate(sizes)
    ]
    processed = processed + torch.cat(pos, dim=1)
    keep = torch.cat([F.interpolate(m[:, None], s, mode="area")[:, 0].flatten(1) for m, s in zip(maps, sizes)], dim=1)
    kept = [x[k == 1] for x, k in zip(processed, keep)]
    kept = [x if x.shape[0] else low[i, :1] for i, x in enumerate(kept)]
    return [torch.cat([lo, hi]) for lo, hi in zip(low, kept)]


@pytest.mark.parametrize(
    "budgets,smooth,passes", [((128, 512), False, 2), ((100, 300), False, 2), ((50, 333), True, 1), ((0, 3), False, 1)]
)
def test_projection_equals_reference_full_grid(model, budgets, smooth, passes):
    """Only kept groups are projected; the reference projects every cell of every grid. Same tokens, including
    budgets that split 2x2 groups (partly selected groups are dropped) and a selection with no whole group."""
    tower = model.vision_tower
    pixels = pixels_of(model, ["demo_img.png", "syn_640x480.png"])
    with torch.no_grad():
        low = tower.low_res(pixels)
        probs = tower.selection_probs(pixels, low, None, smooth)
        look = tower.look_close(pixels, low, probs, budgets, [None] * passes)
        union = torch.cat([m.reshape(2, -1) for m in look.maps], dim=1).bool()
        high = torch.cat(look.features, dim=1)[union].reshape(2, -1, tower.width)
        tower_out = torch.cat([tower.low_res_features(low), high], dim=1)
        want = reference_encode_images_ps3(model, tower_out, look.maps)
        got, tokens = embed_images(model.mm_projector, tower.low_res_features(low), look)
    for g, w, (n_low, per_scale) in zip(got, want, tokens):
        assert g.shape == w.shape and n_low == 196
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-5)
        # every scale's share, or the first low-res token when no whole group was selected
        assert g.shape[0] == 196 + max(sum(per_scale), 1)
        if budgets == (0, 3):  # 3 cells cannot fill a 2x2 group
            assert per_scale == [0, 0] and torch.equal(g[196], g[0])


# -- the five settings through the model -----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["after_prompt", "after_image"])
def test_look_close_modes(model, mode):
    result = model.generate(demo_parts(), max_new_tokens=3, num_look_close=1, look_close_mode=mode)
    info = model.prepare(to_turns(demo_parts()), num_look_close=1, look_close_mode=mode).look_close
    assert info.settings.look_close_mode == mode and info.num_passes == 1
    # 196 low-res + 160 high-res (budgets of 128 + 512 cells, 4 cells per token) + 1 end token
    assert result.media_tokens == [196 + 160 + 1]
    assert len(result.token_ids) == 3
    if mode == "after_image":
        assert info.prompt is None and info.top_down_position is None  # PS3's prior prompt, no prompt pass
    else:
        assert info.prompt.shape == (32,) and info.top_down_position == 24


def test_settings_reach_the_tower(model):
    turns = to_turns(demo_parts())
    info = model.prepare(turns, num_token_look_close=1000, look_close_mode="after_image").look_close
    assert info.num_passes == 2 and [len(s) for s in info.selected[0]] == [200, 800]  # 640 + (72 + 288)
    info = model.prepare(turns, select_num_each_scale=[64, 256], smooth_selection_prob=True).look_close
    assert info.settings.smooth_selection_prob and info.num_passes == 3
    assert [len(s) for s in info.selected[0]] == [192, 768]
    assert info.settings.select_num_each_scale == (64, 256)


def test_two_images_share_the_prompt(model):
    parts = [vila.Image(INPUTS / "demo_img.png"), vila.Image(INPUTS / "syn_640x480.png"), "Compare them"]
    result = model.generate(parts, max_new_tokens=2, num_look_close=1)
    assert result.media_tokens == [357, 357]
    info = model.prepare(to_turns(parts), num_look_close=1).look_close
    assert len(info.selected) == 2 and info.prompt.shape == (32,)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_look_close": 0}, "num_look_close must be a positive integer"),
        ({"num_token_look_close": -5}, "num_token_look_close must be a positive integer"),
        ({"select_num_each_scale": [1, 2, 3]}, "2 non-negative integers"),
        ({"select_num_each_scale": [0, 0]}, "2 non-negative integers"),
        ({"look_close_mode": "before_image"}, "after_prompt' or 'after_image"),
        ({"smooth_selection_prob": "yes"}, "True or False"),
    ],
)
def test_bad_settings(model, kwargs, match):
    with pytest.raises(UsageError, match=match):
        model.generate_content(demo_parts(), max_new_tokens=1, **kwargs)


def test_after_prompt_needs_the_head(model):
    head = model.mm_projector.top_down_prompt_head
    del model.mm_projector.top_down_prompt_head
    try:
        assert model.look_close_settings(look_close_mode="after_image").look_close_mode == "after_image"
        with pytest.raises(UsageError, match="top-down prompt head"):
            model.look_close_settings()
    finally:
        model.mm_projector.top_down_prompt_head = head


def test_context_length_is_raised_like_the_reference_cli(model):
    assert context_floor(6) == 6 * 2560 // 4 + 1024 == 4864
    assert context_floor(None, 20000) == 20000 // 4 + 1024
    assert context_floor(2, 20000) == max(2304, 6024)
    assert model.look_close_settings(num_look_close=20).min_context == 13824
    assert model.look_close_settings().min_context == 0  # checkpoint defaults: no change
    base = model.context_length
    turns = to_turns(demo_parts())
    assert model.prepare(turns, num_look_close=20).context_length == max(base, 13824)
    assert model.prepare(turns).context_length == base
    assert model.context_length == base  # the request's floor stays with the request


def test_two_threads_with_different_settings_do_not_mix(model):
    """Each request's settings and passes travel with it: concurrent calls give the serial answers."""
    from concurrent.futures import ThreadPoolExecutor

    settings = [
        {"num_look_close": 1, "look_close_mode": "after_prompt"},
        {"num_token_look_close": 1000, "look_close_mode": "after_image", "smooth_selection_prob": True},
    ] * 2
    serial = [model.generate(demo_parts(), max_new_tokens=4, **s) for s in settings]
    with ThreadPoolExecutor(max_workers=2) as pool:
        together = list(pool.map(lambda s: model.generate(demo_parts(), max_new_tokens=4, **s), settings))
    assert serial[0].media_tokens != serial[1].media_tokens  # the two settings really select differently
    assert [r.token_ids for r in together] == [r.token_ids for r in serial]
    assert [r.media_tokens for r in together] == [r.media_tokens for r in serial]
    assert not {"_request", "_pending", "last_look_close"} & set(vars(model))


def test_multi_turn_uses_the_last_user_turn(model):
    turns = [
        {"role": "user", "content": [vila.Image(INPUTS / "demo_img.png"), "What is it?"]},
        {"role": "assistant", "content": "A picture."},
        {"role": "user", "content": "Describe it in detail."},
    ]
    prepared = model.prepare(to_turns(turns), num_look_close=1)
    ids = prepared.input_ids.tolist()
    p = prepared.look_close.top_down_position
    end = model.tokenizer("<|im_end|>\n<|im_start|>assistant").input_ids
    assert ids[p + 1 : p + 1 + len(end)] == end and p > len(ids) // 2


# -- the CLI ---------------------------------------------------------------------------------------------------


def cli_args(**flags) -> argparse.Namespace:
    return argparse.Namespace(**{k: flags.get(k) for k in cli.PS3_ENV})


def test_cli_settings_flags_win_over_environment():
    env = {"NUM_LOOK_CLOSE": "2", "SELECT_NUM_EACH_SCALE": "512+2048", "SMOOTH_SELECTION_PROB": "TRUE"}
    settings, from_flags = cli.ps3_settings(cli_args(num_look_close=5), env)
    assert settings == {"num_look_close": 5, "select_num_each_scale": [512, 2048], "smooth_selection_prob": True}
    assert from_flags
    settings, from_flags = cli.ps3_settings(cli_args(), {"LOOK_CLOSE_MODE": "after_image"})
    assert settings == {"look_close_mode": "after_image"} and not from_flags
    assert cli.ps3_settings(cli_args(), {}) == ({}, False)


@pytest.mark.parametrize(
    "env,match",
    [
        ({"NUM_LOOK_CLOSE": "many"}, "NUM_LOOK_CLOSE must be an integer"),
        ({"NUM_TOKEN_LOOK_CLOSE": "0"}, "NUM_TOKEN_LOOK_CLOSE must be at least 1"),
        ({"SELECT_NUM_EACH_SCALE": "512,2048"}, "'\\+'-separated integers"),
        ({"LOOK_CLOSE_MODE": "later"}, "after_prompt or after_image"),
        ({"SMOOTH_SELECTION_PROB": "1"}, "true or false"),
    ],
)
def test_cli_bad_environment(env, match):
    with pytest.raises(UsageError, match=match):
        cli.ps3_settings(cli_args(), env)


def test_cli_context_length_for_every_model(tiny_model):
    """The reference CLI raises the tokenizer limit for any model when NUM_LOOK_CLOSE is set
    (``configure_ps3_and_context_length`` runs for every model)."""

    class Tok:
        model_max_length = 8192

    class Plain:
        tokenizer = Tok()

    assert cli.apply_ps3_settings(Plain(), {"num_look_close": 6}, from_flags=False) == {}
    assert Plain.tokenizer.model_max_length == 8192  # 4864 < 8192
    assert cli.apply_ps3_settings(Plain(), {"num_look_close": 20}, from_flags=False) == {}
    assert Plain.tokenizer.model_max_length == 13824
    with pytest.raises(UsageError, match="only apply to VILA-HD"):
        cli.apply_ps3_settings(Plain(), {"num_look_close": 2}, from_flags=True)


def test_cli_environment_equals_api(model, monkeypatch, capsys):
    monkeypatch.setenv("NUM_LOOK_CLOSE", "1")
    monkeypatch.setenv("LOOK_CLOSE_MODE", "after_image")
    monkeypatch.setattr(vila, "load", lambda *a, **k: model)
    argv = [
        "-m",
        str(TINY / VARIANT),
        "--media",
        str(INPUTS / "demo_img.png"),
        "--text",
        DEMO[0],
        "--max-new-tokens",
        "8",
    ]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    assert "Num look close: 1" in err and "Look close mode: after_image" in err
    want = model.generate_content(demo_parts(), max_new_tokens=8, num_look_close=1, look_close_mode="after_image")
    assert out.strip() == want
    assert model.tokenizer.model_max_length == 8192  # max(8192, 1*640 + 1024)


# -- configs and real-size geometry ----------------------------------------------------------------------------


def test_budgets_and_passes():
    assert derive_budgets((378, 756, 1512), 2560) == (512, 2048)
    assert derive_budgets((378, 756, 1512, 3780), 2560) == (85, 341, 2133)  # the README rounds to 85+340+2125
    assert derive_budgets((378, 756, 1512), 640) == (128, 512)  # vilahd-tiny
    # released 1.5K, every cell: 54^2 + 108^2 = 14580 cells in ceil(14580 / 2560) = 6 passes
    assert plan_passes(14580, (512, 2048), 100, None) == [None] * 6
    assert plan_passes(14580, (128, 512), 3, None) == [None] * 3
    assert plan_passes(14580, (128, 512), None, 1000) == [None, 360]
    assert plan_passes(14580, (128, 512), None, 100) == [100]
    assert plan_passes(14580, (128, 512), None, 1280) == [None, 640]
    assert plan_passes(100, (128, 512), None, 5000) == [100]


def test_real_ps3_4k_builds_on_meta():
    cfg = PS3Config.from_dict(json.loads((HF_CONFIGS / "nvidia__PS3-4K-SigLIP2" / "config.json").read_text()))
    assert (cfg.width, cfg.depth, cfg.num_heads, cfg.mlp_hidden, cfg.patch_size) == (1152, 27, 16, 4304, 14)
    assert cfg.scales == (378, 756, 1512, 3780) and cfg.max_select_num_each_scale == (85, 341, 2133)
    tower = PS3Tower.build(cfg, None, torch.bfloat16, "cpu")
    params = dict(tower.named_parameters())
    assert all(p.is_meta for p in params.values())
    enc = "vision_model."
    assert params[enc + "trunk.pos_embed"].shape == (1, 729, 1152)
    assert [params[f"{enc}pos_emb_residual.{i}"].shape[1] for i in range(3)] == [54**2, 108**2, 270**2]
    assert params[enc + "selection_feature_proj.fc1.weight"].shape == (4 * 1152, 4 * 1152)
    assert params[enc + "selection_feature_proj.fc2.weight"].shape == (3 * 1152, 4 * 1152)
    assert params[enc + "highres_selection_feature_module.stem.0.weight"].shape == (512, 3, 28, 28)
    assert params[enc + "prompt_proj_for_highres.weight"].shape == (3 * 512, 1152)
    assert tower.total_cells(3780, 3780) == 54**2 + 108**2 + 270**2 == 87480
    assert tower.out_block == 25
    # SigLIP so400m trunk without its unused final norm and pooling head (~413 M), 101 M of per-scale position
    # residuals, 37 M of selection projection, ~10 M for the selection module and prompt projection
    residuals = sum(params[f"{enc}pos_emb_residual.{i}"].numel() for i in range(3))
    assert residuals == (54**2 + 108**2 + 270**2) * 1152
    assert 550e6 < sum(p.numel() for p in params.values()) < 570e6


def test_ps3_config_keys():
    raw = json.loads((TINY / VARIANT / "vision_tower" / "config.json").read_text())
    cfg = PS3Config.from_dict(raw)
    assert (cfg.width, cfg.depth, cfg.num_heads, cfg.mlp_hidden) == (32, 4, 2, 119)  # timm_model_kwargs
    old = {k: v for k, v in raw.items() if k != "ps3_scales"} | {"s3_scales": [1512, 378, 756]}  # ps3-torch <= 0.1.1
    assert PS3Config.from_dict(old).scales == (378, 756, 1512)
    with pytest.raises(UnsupportedModelError, match="C-RADIO"):
        PS3Config.from_dict(raw | {"radio": True})
    with pytest.raises(UnsupportedModelError, match="unknown PS3 trunk"):
        PS3Config.from_dict(raw | {"model_name": "vit_huge_patch14_224"})
