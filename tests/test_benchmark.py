"""The benchmark and the GPU check run end to end in their fast modes, so neither can rot.

No timing is asserted (shared CI machines are noisy); what is asserted is what the scripts check themselves:
our preprocessing is bit-identical to the reference's, the feature cache and the static KV cache leave the
greedy tokens unchanged, the random-weight checkpoint loads completely.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
sys.path.insert(0, str(SCRIPTS))

import benchmark  # noqa: E402
import gpu_check  # noqa: E402


def run_script(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert out.returncode == 0, f"{args[0]} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def test_benchmark_fast_modes(tmp_path):
    path = tmp_path / "bench.json"
    run_script(
        str(SCRIPTS / "benchmark.py"),
        "--model",
        "nvila-tiny",
        "--runs",
        "1",
        "--warmup",
        "0",
        "--new-tokens",
        "2",
        "--json",
        str(path),
    )
    out = json.loads(path.read_text())
    s = out["sections"]
    assert set(s) >= {
        "load",
        "preprocess_dynamic_s2",
        "preprocess_dynamic",
        "ceilings",
        "request",
        "vision",
        "cache",
        "static",
    }
    assert (
        s["preprocess_dynamic_s2"]["tiles"] == 17 and s["preprocess_dynamic"]["tiles"] == 7
    )  # 1344x896: 1+4+12, 3x2+1
    assert s["preprocess_dynamic_s2"]["bit_identical"] and s["preprocess_dynamic"]["bit_identical"]
    load = s["load"]
    # Every parameter is read from the checkpoint (unused tower layers are dropped, never added), and the peak
    # RSS (a high-water mark) is at least the RSS after the imports (rounded to 1e-3 GiB).
    assert 0 < load["param_bytes_in_memory"] <= load["weight_bytes_at_dtype"]
    assert load["peak_rss"]["unit"] == "GiB" and load["peak_rss"]["median"] >= load["rss_after_import_gib"] - 1e-3
    req = s["request"]
    assert req["decode"]["unit"] == "tok/s" and req["decode"]["median"] > 0 and req["llm_input_positions"] > 0
    stages = ("media_decode", "preprocess", "vision_encode_incl_projector", "prefill")
    for key in (*stages, "projector_incl_s2_merge", "ttft", "total"):
        assert req[key].keys() == {"median", "min", "max", "n", "unit"} and req[key]["unit"] == "s", key
        assert req[key]["n"] == 1 and req[key]["min"] == req[key]["median"] == req[key]["max"], key  # --runs 1
    # The media stages run before the LLM starts and the TTFT spans them and the prefill; the first token
    # comes before the request ends.
    assert sum(req[key]["median"] for key in stages) == pytest.approx(req["ttft"]["median"])
    assert req["prefill"]["median"] > 0 and req["ttft"]["median"] <= req["total"]["median"]
    for key in ("vision_encode_over_kernels", "prefill_over_kernels", "decode_over_kernels", "decode_over_bound"):
        assert req[key] > 0, key
    assert s["video"]["llm_input_positions"] > 0 and s["video"]["decode"]["median"] > 0
    assert s["vision"]["tiles"] == 17 and s["vision"]["max_rel_diff_vs_baseline"] < 1e-4  # eager vs SDPA
    assert s["vision"]["ours_over_kernels"] > 0
    assert s["cache"]["same_tokens"] is True
    assert s["static"]["status"].startswith("skipped")  # CUDA only
    assert out["machine"]["cpu_count"] >= 1 and out["setup"]["device"] == "cpu"


def test_random_weight_checkpoint_is_complete(tmp_path):
    """Every parameter of the real-size layout is written, so vila.load never has to initialise one."""
    from vila.checkpoint import close_all, open_safetensors

    root = benchmark.skeleton_checkpoint("nvila-8b-smoke", tmp_path / "ckpt")
    benchmark.write_random_weights(root, benchmark.torch.bfloat16, shard_bytes=8 << 20)  # force several shards
    assert len(list((root / "llm").glob("model-*-of-*.safetensors"))) > 1
    for folder, module in benchmark.component_modules(root).items():
        state, handles = open_safetensors(root / folder)
        try:
            tied = bool(getattr(getattr(module, "config", None), "tie_word_embeddings", False))
            assert set(state) == set(benchmark.saved_tensors(module, tied)), folder
        finally:
            close_all(handles)
    from vila.loading import load

    model = load(root, device="cpu", dtype="float32")
    assert model.config.vision.dynamic_s2 and model.llm.get_input_embeddings().num_embeddings == 151648
    assert len(model.tokenizer) < 2000  # the tiny fixture's tokenizer: the rest of the vocabulary is padding


def test_gpu_check_smoke(tmp_path):
    path = tmp_path / "gpu.json"
    run_script(
        str(SCRIPTS / "gpu_check.py"),
        "--smoke",
        "--new-tokens",
        "3",
        "--runs",
        "1",
        "--warmup",
        "0",
        "--json",
        str(path),
    )
    out = json.loads(path.read_text())
    assert out["same_greedy_tokens"] is True
    assert set(out["results"]) == {"default", "static_compiled"}
    assert all(r["decode_tok_s"] > 0 and r["ttft_s"] > 0 for r in out["results"].values())
    assert out["bound_tok_s"] > 0 and out["prompt_text_tokens"] == 32


@pytest.mark.parametrize(
    "name, tb_s",
    [("NVIDIA H100 80GB HBM3", 3.35), ("NVIDIA H100 PCIe", 2.0), ("NVIDIA H200", 4.8), ("NVIDIA H100 NVL", 3.9)],
)
def test_datasheet_bandwidth_by_card_name(name, tb_s):
    assert gpu_check.datasheet_bandwidth(name) == pytest.approx(tb_s * 1e12)


@pytest.mark.parametrize(
    "size, min_num, grid",
    [
        ((1344, 896), 1, (3, 2)),  # dynamic: 3:2 exactly
        ((1344, 896), 9, (4, 3)),  # dynamic_s2's last scale (at least 3x3 tiles): 4:3 is the closest to 3:2
        ((100, 100), 1, (1, 1)),  # square ties 1x1, 2x2, 3x3: a small image keeps the first
        ((900, 900), 1, (2, 2)),  # 810000 px > half of 2x2 tiles (401408) but not of 3x3 (903168)
        ((1000, 1000), 1, (3, 3)),  # 1000000 px > half of 3x3 tiles
    ],
)
def test_reference_grid_by_hand(size, min_num, grid):
    """The baseline's own grid choice (448 px tiles, at most 12), against grids worked out by hand."""
    assert benchmark.reference_grid(*size, min_num, 12, 448) == grid


def test_reference_preprocessing_baseline_matches_ours_on_odd_sizes():
    """The benchmark's reference baseline (no vila code) and vila.preprocess agree bit for bit beyond the
    benchmark's image, including the sizes where grids tie."""
    import torch

    from vila.config import parse_config
    from vila.preprocess import preprocess_images

    for fixture in ("nvila-tiny", "nvila-lite-tiny"):
        cfg = parse_config(TINY / fixture)
        for size in ((333, 777), (1000, 450), (100, 100), (1000, 1000)):
            image = benchmark.test_image(size, seed=1)
            assert torch.equal(preprocess_images([image], cfg).pixel_values, benchmark.reference_preprocess(image, cfg))
