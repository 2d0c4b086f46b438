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
    assert s["load"]["param_bytes_in_memory"] > 0 and s["load"]["peak_rss"]["median"] > 0
    req = s["request"]
    assert req["decode"]["unit"] == "tok/s" and req["decode"]["median"] > 0 and req["llm_input_positions"] > 0
    for key in (
        "media_decode",
        "preprocess",
        "vision_encode_incl_projector",
        "projector_incl_s2_merge",
        "prefill",
        "ttft",
    ):
        assert req[key]["n"] == 1 and req[key]["median"] >= 0, key
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


def test_reference_preprocessing_baseline_matches_ours_on_odd_sizes():
    """The benchmark's reference baseline and vila.preprocess agree bit for bit beyond the benchmark's image."""
    import torch

    from vila.config import parse_config
    from vila.preprocess import preprocess_images

    for fixture in ("nvila-tiny", "nvila-lite-tiny"):
        cfg = parse_config(TINY / fixture)
        for size in ((333, 777), (1000, 450)):
            image = benchmark.test_image(size, seed=1)
            assert torch.equal(preprocess_images([image], cfg).pixel_values, benchmark.reference_preprocess(image, cfg))
