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
        "--caption-images",
        "3",
        "--caption-tokens",
        "3",
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
        "caption",
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
    cap = s["caption"]
    # Full-length decoding on both sides (random weights never stop early: the stop token is out of reach).
    assert cap["images"] == 3 and cap["tokens_generated_batched"] == cap["tokens_generated_one_by_one"] == 9
    assert cap["same_answers"] == "3/3"  # greedy batched answers equal one-by-one answers
    assert cap["decode_batch3"]["unit"] == cap["decode_batch1"]["unit"] == "tok/s"
    assert cap["decode_batch3"]["median"] > 0 and cap["decode_batch1"]["median"] > 0
    assert cap["total_batched_over_one_by_one"] > 0 and cap["decode_speedup"] > 0
    # The kernel bound is the ratio of the two matmul totals it reports (structure, not speed).
    t1, t3 = cap["linear_kernels_batch1"], cap["linear_kernels_batch3"]
    assert cap["decode_speedup_kernel_bound"] == pytest.approx(3 * t1 / t3, rel=0.02)
    assert load["baseline_read_and_convert"]["median"] > 0 and load["load_over_baseline"] > 0
    assert s["static"]["status"].startswith("skipped")  # CUDA only
    assert out["machine"]["cpu_count"] >= 1 and out["setup"]["device"] == "cpu"


def _hf(path: str) -> dict:
    return json.loads((benchmark.HF_CONFIGS / path).read_text())


def qwen2_or_llama_names(layers: int, bias: bool, lm_head: bool) -> set[str]:
    """transformers 4.x ``Qwen2ForCausalLM`` / ``LlamaForCausalLM`` state-dict names, written out by hand."""
    per_layer = [f"self_attn.{p}_proj.weight" for p in "qkvo"] + [f"self_attn.{p}_proj.bias" for p in "qkv"] * bias
    per_layer += [f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
    per_layer += ["input_layernorm.weight", "post_attention_layernorm.weight"]
    names = {f"model.layers.{i}.{n}" for i in range(layers) for n in per_layer}
    return names | {"model.embed_tokens.weight", "model.norm.weight"} | ({"lm_head.weight"} if lm_head else set())


def siglip_names(layers: int, head: bool) -> set[str]:
    """transformers 4.x ``SiglipVisionModel`` names, under the ``vision_model.`` level every published tower has."""
    wb = lambda p: {f"{p}.weight", f"{p}.bias"}  # noqa: E731
    names = wb("embeddings.patch_embedding") | {"embeddings.position_embedding.weight"} | wb("post_layernorm")
    for i in range(layers):
        for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"):
            names |= wb(f"encoder.layers.{i}.{p}")
        for p in ("layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"):
            names |= wb(f"encoder.layers.{i}.{p}")
    if head:
        names |= {"head.probe", "head.attention.in_proj_weight", "head.attention.in_proj_bias"}
        names |= wb("head.attention.out_proj") | wb("head.layernorm") | wb("head.mlp.fc1") | wb("head.mlp.fc2")
    return {f"vision_model.{n}" for n in names}


# Each case: the configs (tests/fixtures/hf_configs) and what the Hub listings in LISTINGS.md show for a checkpoint
# of that shape: LLM shard sizes in GB, index size in kB and its line count (a commit page's "+N"), tower and
# projector file sizes in MB. The Hub prints three significant figures.
# * NVILA-8B configs vs NVILA-Lite-8B-stage2's llm/ listing (both Qwen2-7B-shaped with the 151648 vocabulary):
#   4.87 / 4.93 / 4.33 / 1.09 GB, index 27.8 kB; 346 index lines as qwen2-7b-longvila-256f's (28 layers x 12 + 10);
#   NVILA-8B's vision_tower 827 MB and mm_projector 125 MB.
# * VILA1.5-3b (llm config of its clone Ligeng-Zhu/VILA15_3b, top config from the TensorRT-LLM copy): llm/ 4.97 GB +
#   429 MB, index 23.9 kB, 298 lines (VILA15_3b's commit page); 384 px tower with its head 857 MB; projector 36.7 MB.
# * Llama-3-VILA1.5-8B: llm/ 4.98 / 5 / 4.92 / 1.17 GB, index 24 kB; tower (same 502 B config as the AWQ repo's)
#   857 MB; projector 71.3 MB.
PUBLISHED = {
    "NVILA-8B": dict(
        configs=lambda: (
            (top := _hf("Efficient-Large-Model__NVILA-8B/config.json")),
            top["llm_cfg"],
            top["vision_tower_cfg"],
            top["mm_projector_cfg"],
        ),
        names=lambda: (qwen2_or_llama_names(28, True, True), siglip_names(27, False)),
        shards_gb=[4.87, 4.93, 4.33, 1.09],
        index_kb=27.8,
        index_lines=346,
        tower_mb=827,
        projector_mb=125,
    ),
    "VILA1.5-3b": dict(
        configs=lambda: (
            _hf("_secondary_sources/NVIDIA__TensorRT-LLM/VILA_1_5_3B_CONFIG.json"),
            _hf("Ligeng-Zhu__VILA15_3b/llm/config.json"),
            _hf("Efficient-Large-Model__VILA1.5-3b/vision_tower/config.json"),
            _hf("Efficient-Large-Model__VILA1.5-3b/mm_projector/config.json"),
        ),
        names=lambda: (qwen2_or_llama_names(32, False, True), siglip_names(27, True)),
        shards_gb=[4.97, 0.429],
        index_kb=23.9,
        index_lines=298,
        tower_mb=857,
        projector_mb=36.7,
    ),
    "Llama-3-VILA1.5-8B": dict(
        configs=lambda: (
            {"mm_hidden_size": 1152},
            _hf("Efficient-Large-Model__Llama-3-VILA1.5-8B/llm/config.json"),
            _hf("Efficient-Large-Model__Llama-3-VILA1.5-8b-AWQ/vision_tower/config.json"),
            {"mm_projector_type": "mlp_downsample"},
        ),
        names=lambda: (qwen2_or_llama_names(32, False, True), siglip_names(27, True)),
        shards_gb=[4.98, 5.0, 4.92, 1.17],
        index_kb=24.0,
        index_lines=None,
        tower_mb=857,
        projector_mb=71.3,
    ),
}


def hub_size(nbytes: int, unit: float) -> float:
    """A byte count as the Hub prints it: three significant figures in ``unit`` (1e9 GB, 1e6 MB, 1e3 kB), halves
    rounded up (the Llama-3-VILA1.5-8B index of 23,950 bytes shows as 24 kB)."""
    from decimal import ROUND_HALF_UP, Decimal

    value = Decimal(nbytes) / Decimal(int(unit))
    step = Decimal(1).scaleb(value.adjusted() - 2)  # the third significant digit
    return float(value.quantize(step, rounding=ROUND_HALF_UP))


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_written_layout_equals_published_checkpoints(name):
    """The files, tensor names, shard split and index the writer would write for a published config (computed on
    the meta device, nothing allocated) equal what that checkpoint publishes: names written out by hand from
    transformers 4.x's naming (the tower under ``vision_model.``, ``layers.{i}`` for the projector), shard and
    file sizes and index size / line count from the Hub listings in tests/fixtures/hf_configs/LISTINGS.md."""
    case = PUBLISHED[name]
    layout = benchmark.published_layout(benchmark.meta_components(*case["configs"]()))
    llm, tower, projector = layout["llm"], layout["vision_tower"], layout["mm_projector"]
    llm_names, tower_names = case["names"]()
    assert set(llm.shapes) == llm_names and set(tower.shapes) == tower_names
    assert all(n.startswith("layers.") for n in projector.shapes) and projector.shapes
    assert all(c.dtype == benchmark.torch.bfloat16 for c in layout.values())

    n = len(case["shards_gb"])
    assert list(llm.files) == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    sizes = llm.file_sizes()
    assert [hub_size(sizes[f], 1e9) for f in llm.files] == case["shards_gb"]
    index_text = llm.index_text()
    index = json.loads(index_text)
    assert set(index["weight_map"]) == llm_names and set(index["weight_map"].values()) == set(llm.files)
    assert index["metadata"]["total_size"] == sum(2 * benchmark.math.prod(s) for s in llm.shapes.values())
    assert hub_size(len(index_text), 1e3) == case["index_kb"]
    if case["index_lines"]:
        assert index_text.count("\n") == case["index_lines"]
    assert list(tower.files) == ["model.safetensors"] and tower.index_text() is None
    assert hub_size(tower.file_sizes()["model.safetensors"], 1e6) == case["tower_mb"]
    assert list(projector.files) == ["model.safetensors"]
    assert hub_size(projector.file_sizes()["model.safetensors"], 1e6) == case["projector_mb"]


def test_nvila_lite_2b_layout():
    """The benchmark's NVILA-Lite-2B size: the tied Qwen2-1.5B-shaped LLM (3.09 GB) fits one 5 GB shard, so
    ``save_pretrained`` writes a single ``llm/model.safetensors`` with no ``lm_head`` and no index; the 448 px
    tower without head is the 827 MB every NVILA tower listing shows."""
    root = benchmark.HF_CONFIGS
    components = benchmark.meta_components(
        {"mm_hidden_size": 1152},
        json.loads((root / "Efficient-Large-Model__qwen2-1.5b-longvila-256f/llm/config.json").read_text()),
        json.loads((root / "Efficient-Large-Model__NVILA-Lite-2B-hf-preview/vision_tower/config.json").read_text()),
        json.loads((root / "Efficient-Large-Model__NVILA-Lite-2B-hf-preview/mm_projector/config.json").read_text()),
    )
    layout = benchmark.published_layout(components)
    assert set(layout["llm"].shapes) == qwen2_or_llama_names(28, True, False)
    assert list(layout["llm"].files) == ["model.safetensors"] and layout["llm"].index_text() is None
    assert set(layout["vision_tower"].shapes) == siglip_names(27, False)
    assert hub_size(layout["vision_tower"].file_sizes()["model.safetensors"], 1e6) == 827


def test_written_checkpoint_is_byte_exact_and_loads(tmp_path):
    """A tiny-width checkpoint written by the same writer (sharded small to exercise the index): every file is
    byte-identical to ``safetensors.torch.save_file`` of its tensors, and ``vila.load`` (which refuses missing or
    unexpected keys) loads it with the file's values."""
    from safetensors.torch import load_file, save_file

    torch = benchmark.torch
    root = benchmark.skeleton_checkpoint("nvila-8b-smoke", tmp_path / "ckpt")
    sizes = benchmark.write_random_weights(root, torch.bfloat16, max_shard_bytes=8 << 20)
    layout = benchmark.published_layout(benchmark.checkpoint_components(root), torch.bfloat16, 8 << 20)
    assert len(layout["llm"].files) > 1 and (root / "llm" / "model.safetensors.index.json").exists()
    for folder, comp in layout.items():
        assert sizes[folder] == comp.total_size()
        on_disk = sorted(p.name for p in (root / folder).glob("*.safetensors"))
        assert on_disk == sorted(comp.files), folder
        for fname in comp.files:
            tensors = load_file(root / folder / fname)
            assert set(tensors) == set(comp.files[fname])
            save_file(tensors, tmp_path / "again.safetensors", metadata={"format": "pt"})
            assert (tmp_path / "again.safetensors").read_bytes() == (root / folder / fname).read_bytes()
    assert any(k.startswith("vision_model.encoder.layers.") for k in layout["vision_tower"].shapes)
    from vila.loading import load

    model = load(root, device="cpu", dtype="float32")
    assert model.config.vision.dynamic_s2 and model.llm.get_input_embeddings().num_embeddings == 151648
    assert len(model.tokenizer) < 2000  # the tiny fixture's tokenizer: the rest of the vocabulary is padding
    first = layout["llm"].index()["weight_map"]["model.embed_tokens.weight"]
    stored = load_file(root / "llm" / first)["model.embed_tokens.weight"].float()
    assert torch.equal(model.llm.get_input_embeddings().weight, stored)


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
        "--batch",
        "3",
        "--json",
        str(path),
    )
    out = json.loads(path.read_text())
    assert out["same_greedy_tokens"] is True  # eager and compiled, batch 1 and batch 3
    assert set(out["results"]) == {"eager", "fast"}
    for r in out["results"].values():
        assert r["decode_tok_s_b1"] > 0 and r["decode_tok_s_b3"] > 0 and r["ttft_s"] > 0
    assert out["bound_tok_s"] > 0 and out["ttft_floor_s"] > 0 and out["prompt_text_tokens"] == 32
    assert set(out["goals"]) == {"fast_b1_over_bound", "fast_ttft_over_floor", "fast_batch_over_b1"}
    assert out["vision_tiles"] > 0 and out["results"]["fast"]["positions"] > 32


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
