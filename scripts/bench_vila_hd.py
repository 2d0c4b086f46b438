#!/usr/bin/env python
"""What VILA-HD's high-resolution path costs: time and visual tokens per image, on CPU by default.

    python scripts/bench_vila_hd.py tiny                 # tests/fixtures/tiny/vilahd-tiny, whole requests
    python scripts/bench_vila_hd.py real --scales 1.5k   # real-size PS3 (SigLIP so400m) with random weights
    python scripts/bench_vila_hd.py real --scales 4k --passes 1 --json

``tiny`` runs ``generate`` on the demo image at the checkpoint's settings (after_prompt, 3 look-close passes)
and reports the timings the library records. ``real`` builds the PS3 tower from the published
``nvidia/PS3-4K-SigLIP2`` config (``--scales 1.5k`` keeps its first three scales, as VILA-HD-8B-PS3-1.5K) and
the VILA-HD-8B projector (mm_hidden 1152 -> Qwen2-7B hidden 3584, ``mlp_downsample``) with random weights, in
float32, and times each stage of one image: the low-res pass, the selection (probabilities of every patch),
each high-res pass, the projection to LLM tokens. The LLM is not run. Every pass selects the same number of
patches, so a pass costs the same whatever the scale set; ``--passes`` runs that many and reports the mean.
Visual token counts are exact for every pass count (selection alone, no ViT): they depend on which patches a
pass selects, since an LLM token is kept only where its 2x2 patch group was selected whole.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
PS3_4K = FIXTURES / "hf_configs" / "nvidia__PS3-4K-SigLIP2" / "config.json"
DEMO = FIXTURES / "inputs" / "demo_img.png"


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def bench_tiny(runs: int) -> dict:
    import vila

    model = vila.load(FIXTURES / "tiny" / "vilahd-tiny", device="cpu", dtype="float32")
    parts = [vila.Image(DEMO), "Please describe the image"]
    model.generate(parts, max_new_tokens=1)  # warm-up
    results = [model.generate(parts, max_new_tokens=16) for _ in range(runs)]
    keys = ("preprocess_s", "vision_encode_s", "top_down_s", "look_close_s", "generate_s")
    best = {k: min(r.timings[k] for r in results) for k in keys}
    from vila.processor import to_turns

    info = model.prepare(to_turns(parts)).look_close
    low, high = info.tokens[0]
    return {
        "model": "vilahd-tiny (ViT width 32, 4 blocks; LLM hidden 64, 2 layers)",
        "settings": {
            "look_close_mode": info.settings.look_close_mode,
            "num_look_close": info.num_passes,
            "select_num_each_scale": list(info.settings.select_num_each_scale),
        },
        "seconds_min_of_runs": {k: round(v, 4) for k, v in best.items()},
        "tower_tokens": 729 + sum(len(s) for s in info.selected[0]),
        "llm_visual_tokens": {
            "low_res": low,
            "high_res_per_scale": high,
            "end_token": 1,
            "total": results[0].media_tokens[0],
        },
        "llm_prompt_positions": results[0].num_prompt_tokens,
    }


def random_(module: torch.nn.Module, seed: int = 0) -> None:
    """Materialise a meta module on the CPU with random weights (LayerNorms as initialised)."""
    gen = torch.Generator().manual_seed(seed)
    module.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in module.named_parameters():
            if ("norm" in name or name.endswith("stem.1.weight")) and p.dim() == 1:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)


def bench_real(scales: str, passes: int, max_passes: int) -> dict:
    from vila.config import ProcessorConfig, TopDownConfig
    from vila.model.ps3 import PS3Config, PS3Tower, plan_passes
    from vila.model.vila_hd import TopDownProjector, embed_images
    from vila.preprocess import normalize

    raw = json.loads(PS3_4K.read_text())["vision_config"]
    if scales == "1.5k":
        raw = dict(raw, ps3_scales=[378, 756, 1512])
    cfg = PS3Config.from_dict(raw)
    tower = PS3Tower.build(cfg, None, torch.float32, "cpu")
    random_(tower)
    tower.eval()
    td = TopDownConfig(look_close_mode="after_prompt", prompt_head_type="mlp", high_res_pos_embed=True)
    with torch.device("meta"):
        proj = TopDownProjector(
            "mlp_downsample", cfg.width, 3584, td, cfg.low_res_token_num, len(cfg.scales), with_head=True
        )
    random_(proj, seed=1)
    proj.eval()

    side = cfg.scales[-1]
    image = PIL.Image.open(DEMO).convert("RGB").resize((side, side))  # VILA-HD's `resize` preprocessing
    pixels = normalize(np.asarray(image)[None], ProcessorConfig(size=side, kind="ps3"))
    prompt = torch.randn(1, cfg.width, generator=torch.Generator().manual_seed(2))
    budgets = cfg.max_select_num_each_scale
    total = tower.total_cells(side, side)
    out: dict = {
        "model": f"PS3 {cfg.model_name} (width {cfg.width}, {cfg.depth} blocks), scales {list(cfg.scales)}, random weights, float32",
        "select_num_each_scale": list(budgets),
        "high_res_cells": total,
    }
    with torch.no_grad():
        low, t_low = timed(tower.low_res, pixels)
        probs, t_sel = timed(tower.selection_probs, pixels, low, prompt, False)
        look, t_look = timed(tower.look_close, pixels, low, probs, budgets, [None] * passes)
        (_, tokens), t_proj = timed(embed_images, proj, tower.low_res_features(low), look)
        out["seconds"] = {
            "low_res_pass": round(t_low, 2),
            "selection": round(t_sel, 2),
            "high_res_pass_mean": round(t_look / passes, 2),
            f"projection_{passes}_passes": round(t_proj, 2),
        }
        out["passes_timed"] = passes
        # exact visual tokens per pass count: selection only (the ViT does not change which tokens are kept)
        counts = {}
        n_all = len(plan_passes(total, budgets, 10**6, None))
        for n in sorted({*range(1, max_passes + 1), n_all}):
            taken = None
            for _ in range(n):
                maps = tower.select(probs, budgets, taken)
                taken = maps if taken is None else [t + m for t, m in zip(taken, maps)]
            kept = []
            for m in taken:
                size = (math.ceil(m.shape[-2] / 2), math.ceil(m.shape[-1] / 2))
                kept.append(int((torch.nn.functional.interpolate(m[:, None], size=size, mode="area") == 1).sum()))
            low_tokens = tokens[0][0]
            counts[n] = {
                "tower_tokens": cfg.low_res_token_num + sum(int(m.sum()) for m in taken),
                "llm_high_res_per_scale": kept,
                "llm_visual_tokens": low_tokens + max(sum(kept), 1) + 1,
                "est_tower_seconds": round(t_low + t_sel + n * t_look / passes, 1),
            }
        out["per_num_look_close"] = counts
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("tiny", "real"))
    ap.add_argument("--scales", choices=("1.5k", "4k"), default="1.5k")
    ap.add_argument("--passes", type=int, default=1, help="high-res passes to time (real)")
    ap.add_argument("--max-passes", type=int, default=6, help="token counts for 1..N passes (real)")
    ap.add_argument("--runs", type=int, default=3, help="requests to time (tiny; the minimum is reported)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = bench_tiny(args.runs) if args.what == "tiny" else bench_real(args.scales, args.passes, args.max_passes)
    result["machine"] = {
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
