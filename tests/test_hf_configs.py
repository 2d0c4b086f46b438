"""Every published VILA / NVILA / LongVILA configuration parses and builds (on the meta device), with the
parameter counts and tensor names the released weight files have.

Sources: ``tests/fixtures/hf_configs`` (README.md, LISTINGS.md). Hub sizes are what the Hub shows (3 significant
digits, kB/MB/GB = 1e3/1e6/1e9 bytes); weights are bf16 (2 bytes per parameter) plus the safetensors header.
Where a repo's config file could not be retrieved, the test assembles it from a sibling's published file or from
the base model's well-known architecture; every such piece is marked ``ASSUMED`` below and in docs/checkpoints.md.
"""

from __future__ import annotations

import copy
import json
import math
from functools import cache
from typing import Any

import pytest
import torch
from conftest import HF_CONFIGS, TINY
from safetensors import safe_open

from vila.config import config_from_dicts
from vila.errors import CheckpointError, UnsupportedModelError
from vila.meta import build_llm, build_meta, meta_from_folder


def read(rel: str) -> dict[str, Any]:
    return json.loads((HF_CONFIGS / rel).read_text())


# -- published component configs ---------------------------------------------------------------------------------
NVILA_8B = read("Efficient-Large-Model__NVILA-8B/config.json")
VILA15_3B = read("_secondary_sources/NVIDIA__TensorRT-LLM/VILA_1_5_3B_CONFIG.json")  # TensorRT-LLM's copy
VT_SIGLIP_448 = NVILA_8B["vision_tower_cfg"]
VT_SIGLIP_384 = read("Efficient-Large-Model__VILA1.5-3b/vision_tower/config.json")
QWEN25_7B = NVILA_8B["llm_cfg"]
QWEN2_7B_1M = read("Efficient-Large-Model__qwen2-7b-longvila-1M/llm/config.json")
LLAMA3_8B = read("Efficient-Large-Model__Llama-3-VILA1.5-8B/llm/config.json")
PROJ_DOWNSAMPLE = read("Efficient-Large-Model__VILA1.5-3b/mm_projector/config.json")


# -- ASSUMED base-model architectures (the VILA repo's own llm/config.json was not retrievable) -------------------
def base_llm(model_type: str, hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int, **kw: Any) -> dict:
    arch = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[model_type]
    return {
        "architectures": [arch],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": vocab,
        **kw,
    }


QWEN25_14B = base_llm("qwen2", 5120, 13824, 48, 40, 8, 151648, tie_word_embeddings=False)  # ASSUMED
QWEN25_1_5B = base_llm("qwen2", 1536, 8960, 28, 12, 2, 151648, tie_word_embeddings=True)  # ASSUMED
LLAMA2_13B = base_llm("llama", 5120, 13824, 40, 40, 40, 32000, tie_word_embeddings=False)  # ASSUMED
YI_34B = base_llm("llama", 7168, 20480, 60, 56, 8, 64000, tie_word_embeddings=False)  # ASSUMED


def top_from(base: dict, **changes: Any) -> dict:
    top = {k: v for k, v in copy.deepcopy(base).items() if k not in ("llm_cfg", "vision_tower_cfg", "mm_projector_cfg")}
    top.update(changes)
    return top


NVILA_TOP = top_from(NVILA_8B)
NVILA_LITE_TOP = top_from(NVILA_8B, image_aspect_ratio="dynamic", dynamic_s2=False)  # ASSUMED (scripts: dynamic)
VILA15_TOP = top_from(VILA15_3B)


# -- the families of hf_configs/README.md -----------------------------------------------------------------------
# sizes: component -> shown Hub sizes of its weight files (shards in order); index: (shown size, shards) of
# llm/ or vision_tower/ model.safetensors.index.json; lines: line count of that index on a commit page.
FAMILIES: dict[str, dict[str, Any]] = {
    "NVILA-8B": dict(
        top=NVILA_8B,
        sizes={"vision_tower": ["827 MB"], "mm_projector": ["125 MB"]},
    ),
    "NVILA-15B": dict(
        top=NVILA_TOP,
        llm=QWEN25_14B,
        vision=read("Efficient-Large-Model__NVILA-15B/vision_tower/config.json"),
        projector=PROJ_DOWNSAMPLE,  # ASSUMED: as NVILA-8B
        sizes={"vision_tower": ["827 MB"]},
        lines={"llm": 586},
    ),
    "NVILA-Lite-8B": dict(  # llm/ and vision_tower/ listings of NVILA-Lite-8B-stage2 (same training run family)
        top=NVILA_LITE_TOP,
        llm=QWEN25_7B,
        vision=VT_SIGLIP_448,
        projector=read("Efficient-Large-Model__NVILA-Lite-8B/mm_projector/config.json"),
        preprocessor=read("Efficient-Large-Model__NVILA-Lite-8B/vision_tower/preprocessor_config.json"),
        sizes={
            "llm": ["4.87 GB", "4.93 GB", "4.33 GB", "1.09 GB"],
            "vision_tower": ["827 MB"],
            "mm_projector": ["122 MB"],
        },
        index={"llm": ("27.8 kB", 4)},
    ),
    "NVILA-Lite-15B": dict(
        top=NVILA_LITE_TOP,
        llm=QWEN25_14B,
        vision=VT_SIGLIP_448,
        projector=read("Efficient-Large-Model__NVILA-Lite-15B-Video/mm_projector/config.json"),
        sizes={"vision_tower": ["827 MB"], "mm_projector": ["160 MB"]},
    ),
    "NVILA-Lite-2B-hf-preview": dict(
        top=top_from(NVILA_LITE_TOP, model_type="vila", architectures=["VILAForCausalLM"], version="2.0"),
        llm=QWEN25_1_5B,
        vision=read("Efficient-Large-Model__NVILA-Lite-2B-hf-preview/vision_tower/config.json"),
        projector=read("Efficient-Large-Model__NVILA-Lite-2B-hf-preview/mm_projector/config.json"),
        sizes={},
    ),
    "VILA1.5-3b": dict(
        top=VILA15_3B,
        llm=read("Ligeng-Zhu__VILA15_3b/llm/config.json"),
        vision=VT_SIGLIP_384,
        projector=PROJ_DOWNSAMPLE,
        sizes={"llm": ["4.97 GB", "429 MB"], "vision_tower": ["857 MB"], "mm_projector": ["36.7 MB"]},
        index={"llm": ("23.9 kB", 2)},
        lines={"llm": 298},
    ),
    "VILA1.5-3b-s2": dict(  # ASSUMED: 2 S2 scales, inferred from the projector size
        top=top_from(VILA15_3B, s2=True, s2_scales="384,768", s2_max_split_size=384),
        llm=read("Ligeng-Zhu__VILA15_3b/llm/config.json"),
        vision=VT_SIGLIP_384,
        projector=PROJ_DOWNSAMPLE,
        sizes={"llm": ["4.97 GB", "429 MB"], "vision_tower": ["857 MB"], "mm_projector": ["60.3 MB"]},
        index={"llm": ("23.9 kB", 2)},
    ),
    "Llama-3-VILA1.5-8B": dict(
        top=VILA15_TOP,
        llm=LLAMA3_8B,
        vision=read("Efficient-Large-Model__Llama-3-VILA1.5-8b-AWQ/vision_tower/config.json"),
        projector=PROJ_DOWNSAMPLE,  # ASSUMED: same 277-byte file as VILA1.5-3b's
        sizes={
            "llm": ["4.98 GB", "5 GB", "4.92 GB", "1.17 GB"],
            "vision_tower": ["857 MB"],
            "mm_projector": ["71.3 MB"],
        },
        index={"llm": ("24 kB", 4)},
    ),
    "VILA1.5-13b": dict(
        top=VILA15_TOP,
        llm=LLAMA2_13B,
        vision=VT_SIGLIP_384,  # ASSUMED
        projector=PROJ_DOWNSAMPLE,
        sizes={
            "llm": ["4.98 GB", "4.97 GB", "4.97 GB", "4.93 GB", "4.93 GB", "1.25 GB"],
            "mm_projector": ["99.7 MB"],
        },
        index={"llm": ("29.9 kB", 6)},
        lines={"llm": 370},
    ),
    "VILA1.5-40b": dict(
        top=top_from(VILA15_3B, _name_or_path="vila1.5-34b", hidden_size=7168, mm_vision_select_feature="patch"),
        llm=YI_34B,
        vision=read("Efficient-Large-Model__VILA1.5-40b/vision_tower/config.json"),
        projector=PROJ_DOWNSAMPLE,  # ASSUMED
        preprocessor=read("Efficient-Large-Model__VILA1.5-40b/vision_tower/preprocessor_config.json"),
        sizes={"vision_tower": ["4.99 GB", "4.94 GB", "1.15 GB"]},
        index={"vision_tower": ("43.8 kB", 3)},
    ),
    "qwen2-1.5b-longvila-256f": dict(
        top=top_from(NVILA_LITE_TOP, image_aspect_ratio="resize"),
        llm=read("Efficient-Large-Model__qwen2-1.5b-longvila-256f/llm/config.json"),
        vision=read("Efficient-Large-Model__qwen2-1.5b-longvila-256f/vision_tower/config.json"),
        projector=PROJ_DOWNSAMPLE,  # ASSUMED (263-byte file)
        sizes={"mm_projector": ["18.9 MB"]},
    ),
    "qwen2-7b-longvila-1M": dict(
        top=top_from(NVILA_LITE_TOP, image_aspect_ratio="resize"),
        llm=QWEN2_7B_1M,
        vision=VT_SIGLIP_384,  # ASSUMED: 384 px with head (484-byte config, 857 MB weights)
        projector=read("Efficient-Large-Model__qwen2-7b-longvila-1M/mm_projector/config.json"),
        sizes={"vision_tower": ["857 MB"]},
    ),
    "qwen2-7b-longvila-256f": dict(
        top=NVILA_LITE_TOP,
        llm={k: v for k, v in QWEN2_7B_1M.items() if k != "rope_scaling"},  # ASSUMED
        vision=VT_SIGLIP_448,  # ASSUMED (606-byte config, 827 MB weights)
        projector=PROJ_DOWNSAMPLE,
        sizes={"vision_tower": ["827 MB"]},
        lines={"llm": 346},
    ),
    "Llama-3-LongVILA-8B-1024Frames": dict(
        top=VILA15_TOP,
        llm=LLAMA3_8B,  # ASSUMED
        vision=VT_SIGLIP_384,  # ASSUMED
        projector=read("Efficient-Large-Model__Llama-3-LongVILA-8B-1024Frames/mm_projector/config.json"),
        sizes={},
    ),
    "LongVILA-R1-7B": dict(
        top=NVILA_LITE_TOP,
        llm={k: v for k, v in QWEN2_7B_1M.items() if k != "rope_scaling"},  # ASSUMED
        vision=VT_SIGLIP_448,  # ASSUMED
        projector=read("Efficient-Large-Model__LongVILA-R1-7B/mm_projector/config.json"),
        sizes={},
    ),
}


@cache
def built(family: str):
    f = FAMILIES[family]
    return build_meta(f["top"], f.get("llm"), f.get("vision"), f.get("projector"), f.get("preprocessor"))


def hub_interval(shown: str) -> tuple[float, float]:
    """Bytes a Hub size string stands for: 3 significant digits, trailing zeros dropped (``"5 GB"`` = 5.00 GB)."""
    value, unit = shown.split()
    v = float(value)
    scale = {"Bytes": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}[unit]
    half = 0.5 * 10 ** (math.floor(math.log10(v)) - 2)
    return (v - half) * scale, (v + half) * scale


def safetensors_header_bytes(shapes: dict[str, torch.Size]) -> int:
    """Size of the JSON header safetensors writes in front of the data (8-byte length, padded to 8)."""
    offset, entries = 0, {"__metadata__": {"format": "pt"}}
    for name in sorted(shapes):
        n = 2 * math.prod(shapes[name])
        entries[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + n]}
        offset += n
    header = len(json.dumps(entries, separators=(",", ":")))
    return 8 + header + (-header) % 8


def index_json(names: list[str], total_size: int, shards: int) -> str:
    """``model.safetensors.index.json`` as transformers writes it (sorted keys, indent 2, trailing newline)."""
    weight_map = {n: f"model-00001-of-{shards:05d}.safetensors" for n in names}  # shard names all have one length
    return (
        json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n"
    )


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_parses_and_builds(family):
    m = built(family)
    cfg, top = m.config, FAMILIES[family]["top"]
    assert cfg.llm_hidden_size == m.llm.get_input_embeddings().embedding_dim
    assert (
        cfg.vision.mm_hidden_size * {"mlp_downsample": 4, "mlp_downsample_2x2_fix": 4}.get(cfg.projector_type, 9)
        == next(p for p in m.mm_projector.parameters()).shape[0]
    )
    # Values the checkpoint itself records must agree with what we derive (the reference overwrites
    # mm_hidden_size at load, so a mismatch would go unnoticed there).
    if "mm_hidden_size" in top and top is NVILA_8B:
        assert cfg.vision.mm_hidden_size == top["mm_hidden_size"]
    if "hidden_size" in top and family in ("NVILA-8B", "VILA1.5-40b", "VILA1.5-3b"):
        assert cfg.llm_hidden_size == top["hidden_size"]
    assert all(t.is_meta for t in m.llm.state_dict().values())


@pytest.mark.parametrize(
    "family,component",
    sorted((fam, comp) for fam, f in FAMILIES.items() for comp in f["sizes"]),
)
def test_parameter_count_matches_published_file_sizes(family, component):
    m = built(family)
    shapes = m.stored_tensors()[component]
    shown = FAMILIES[family]["sizes"][component]
    predicted = m.nbytes()[component] + safetensors_header_bytes(shapes)  # headers of all shards together
    low = sum(hub_interval(s)[0] for s in shown)
    high = sum(hub_interval(s)[1] for s in shown)
    assert low <= predicted <= high, f"{family} {component}: {predicted / 1e6:.2f} MB vs shown {shown}"


@pytest.mark.parametrize(
    "family,component",
    sorted((fam, comp) for fam, f in FAMILIES.items() for comp in f.get("index", {})),
)
def test_tensor_names_match_published_index_size(family, component):
    """The index lists every stored tensor name: its byte size pins the names down (a prefix or a missing
    ``lm_head`` would change it by kilobytes)."""
    m = built(family)
    shown, shards = FAMILIES[family]["index"][component]
    names = list(m.stored_tensors()[component])
    text = index_json(names, m.nbytes()[component], shards)
    low, high = hub_interval(shown)
    assert low <= len(text.encode()) <= high
    prefixed = index_json(["model." + n for n in names], m.nbytes()[component], shards)
    assert not low <= len(prefixed.encode()) <= high  # the check is sharp enough to see a renamed tensor set


@pytest.mark.parametrize(
    "family,component",
    sorted((fam, comp) for fam, f in FAMILIES.items() for comp in f.get("lines", {})),
)
def test_tensor_count_matches_published_index_lines(family, component):
    m = built(family)
    names = list(m.stored_tensors()[component])
    text = index_json(names, m.nbytes()[component], 2)
    assert text.count("\n") == FAMILIES[family]["lines"][component]


def test_llm_tensor_names_are_the_standard_ones():
    names = set(built("VILA1.5-3b").stored_tensors()["llm"])
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= names
    assert "model.layers.31.self_attn.q_proj.weight" in names and "model.layers.32.mlp.up_proj.weight" not in names
    qwen = set(built("qwen2-1.5b-longvila-256f").stored_tensors()["llm"])
    assert "model.layers.0.self_attn.q_proj.bias" in qwen  # Qwen2: q/k/v biases (12 tensors per layer)
    assert "lm_head.weight" not in qwen  # tied embeddings are stored once


def test_vision_tower_head_only_where_the_config_keeps_it():
    """VILA1.5 towers (384 px) store SigLIP's pooling head, NVILA towers (448 px, vision_use_head false) do not."""
    vila15 = built("VILA1.5-3b").stored_tensors()["vision_tower"]
    nvila = built("NVILA-8B").stored_tensors()["vision_tower"]
    assert any(n.startswith("vision_model.head.") for n in vila15)
    assert not any(n.startswith("vision_model.head.") for n in nvila)
    assert all(n.startswith("vision_model.") for n in list(vila15) + list(nvila))
    intern = built("VILA1.5-40b").stored_tensors()["vision_tower"]
    assert "encoder.layers.44.attn.q_norm.weight" in intern and "encoder.layers.45.ls1" not in intern
    assert "embeddings.class_embedding" in intern


def test_projector_tensor_names_per_type():
    def names(family: str) -> set[str]:
        return set(built(family).stored_tensors()["mm_projector"])

    downsample = {f"layers.{i}.{p}" for i in (1, 2, 4) for p in ("weight", "bias")}
    assert names("VILA1.5-3b") == downsample
    assert names("LongVILA-R1-7B") == downsample  # mlp_downsample_2x2_fix stores the same tensors
    assert names("NVILA-Lite-8B") == {f"layers.{i}.{p}" for i in (1, 2, 4, 5, 7) for p in ("weight", "bias")}


def test_longvila_1m_keeps_linear_rope_scaling():
    m = built("qwen2-7b-longvila-1M")
    cfg = m.llm.config
    params = getattr(cfg, "rope_parameters", None) or cfg.rope_scaling
    assert params["rope_type"] == "linear" and params["factor"] == 4.0
    assert params.get("rope_theta", getattr(cfg, "rope_theta", None)) == 1062356830
    assert cfg.max_position_embeddings == 1048576


def test_vila15_40b_parses_as_intern_with_hermes_preprocessing():
    cfg = built("VILA1.5-40b").config
    assert cfg.vision.kind == "intern" and cfg.vision.num_hidden_layers == 45 and cfg.vision.hidden_size == 3200
    assert cfg.processor.kind == "intern" and cfg.processor.size == 448
    assert cfg.processor.image_mean == (0.485, 0.456, 0.406)
    assert cfg.vision.mm_hidden_size == 3200 and cfg.llm_hidden_size == 7168


def test_embedded_configs_agree_with_component_files():
    """TensorRT-LLM's copy of VILA1.5-3b embeds llm_cfg / vision_tower_cfg / mm_projector_cfg; they must give the
    same model as the component files published on the Hub."""
    embedded = build_meta(VILA15_3B).num_params()
    files = built("VILA1.5-3b").num_params()
    assert embedded == files


def test_meta_names_equal_the_tiny_checkpoints_files():
    """The names meta-built modules report are exactly the tensors real checkpoint files hold."""
    for variant in ("vila15-tiny", "nvila-tiny", "nvila-lite-tiny", "vila15-s2-tiny"):
        m = meta_from_folder(TINY / variant)
        for component, shapes in m.stored_tensors().items():
            stored = {}
            for path in (TINY / variant / component).glob("*.safetensors"):
                with safe_open(str(path), "pt") as f:
                    stored.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})  # noqa: SIM118
            assert stored == {k: tuple(v) for k, v in shapes.items()}, (variant, component)


# -- layouts that cannot be run: clear errors ------------------------------------------------------------------
@pytest.mark.parametrize("model_type", ["nvila", "nvila_lite"])
def test_single_folder_config_without_nested_configs_is_named(model_type):
    with pytest.raises(CheckpointError, match=f"model_type '{model_type}' needs text_config and vision_config"):
        config_from_dicts({"model_type": model_type, "architectures": ["NVILAForConditionalGeneration"]})


def test_single_folder_config_without_nested_configs_from_a_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "nvila", "architectures": ["X"]}))
    with pytest.raises(CheckpointError, match="needs text_config and vision_config"):
        meta_from_folder(tmp_path)


def test_vila_hd_ps3_is_refused_clearly():
    top = top_from(NVILA_8B, ps3=True, model_type="llava_topdown_llama")
    with pytest.raises(UnsupportedModelError, match="ps3"):
        build_meta(top, QWEN25_7B, VT_SIGLIP_448, PROJ_DOWNSAMPLE)


def test_not_a_vila_config_is_refused():
    with pytest.raises(CheckpointError, match="not a VILA checkpoint"):
        config_from_dicts({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]})


def test_missing_embedded_component_is_a_clear_error():
    with pytest.raises(CheckpointError, match="no llm_cfg dict embedded"):
        build_meta(NVILA_TOP)


def test_unknown_llm_type_is_a_clear_error():
    with pytest.raises(UnsupportedModelError, match="not known"):
        build_llm({"model_type": "no-such-llm", "hidden_size": 8})


def test_vila15_3b_s2_has_two_scales_not_three():
    """The published 60.3 MB projector fits 2 S2 scales (mm_hidden 2304); 3 scales would be far larger."""
    f = FAMILIES["VILA1.5-3b-s2"]
    three = build_meta(top_from(VILA15_3B, s2=True, s2_scales="384,768,1152"), f["llm"], f["vision"], f["projector"])
    low, high = hub_interval("60.3 MB")
    assert not low <= three.nbytes()["mm_projector"] <= high
    assert built("VILA1.5-3b-s2").config.vision.mm_hidden_size == 2304


# -- tiny checkpoints with the variations only meta-built above --------------------------------------------------
def tiny_copy(tmp_path, variant: str, edit_llm=None, edit_projector=None):
    import shutil

    root = tmp_path / variant
    shutil.copytree(TINY / variant, root)
    for sub, edit in (("llm", edit_llm), ("mm_projector", edit_projector)):
        if edit is not None:
            path = root / sub / "config.json"
            cfg = json.loads(path.read_text())
            edit(cfg)
            path.write_text(json.dumps(cfg, indent=2))
    return root


def test_longvila_1m_linear_rope_scaling_loads_and_answers(tmp_path):
    import vila

    root = tiny_copy(
        tmp_path, "nvila-tiny", edit_llm=lambda c: c.update(rope_scaling={"type": "linear", "factor": 4.0})
    )
    scaled = vila.load(root, device="cpu", dtype="float32")
    params = getattr(scaled.llm.config, "rope_parameters", None) or scaled.llm.config.rope_scaling
    assert params["rope_type"] == "linear" and params["factor"] == 4.0
    plain = vila.load(TINY / "nvila-tiny", device="cpu", dtype="float32")
    a = scaled.prepare(vila.model.vila.to_turns("Hi"))
    with torch.no_grad():
        la = scaled.llm(inputs_embeds=a.inputs_embeds[None]).logits
        lb = plain.llm(inputs_embeds=a.inputs_embeds[None]).logits
    assert not torch.allclose(la, lb)  # positions are really scaled
    assert scaled.generate("Hi", max_new_tokens=3).token_ids


def test_longvila_r1_2x2_fix_projector_computes_mlp_downsample(tmp_path):
    """LongVILA-R1-7B's ``mlp_downsample_2x2_fix`` loads the same tensors and gives the same answer."""
    import PIL.Image

    import vila

    root = tiny_copy(
        tmp_path, "vila15-tiny", edit_projector=lambda c: c.update(mm_projector_type="mlp_downsample_2x2_fix")
    )
    fix = vila.load(root, device="cpu", dtype="float32")
    base = vila.load(TINY / "vila15-tiny", device="cpu", dtype="float32")
    image = PIL.Image.new("RGB", (64, 48), (200, 30, 60))
    assert fix.config.projector_type == "mlp_downsample_2x2_fix"
    assert (
        fix.generate([image, "Hi"], max_new_tokens=4).token_ids
        == base.generate([image, "Hi"], max_new_tokens=4).token_ids
    )


def test_awq_checkpoint_is_refused_clearly(tmp_path):
    """*-AWQ repos keep TinyChat .pt weights in llm/ (never downloaded: *.pt is ignored)."""
    import vila

    root = tiny_copy(tmp_path, "vila15-tiny")
    (root / "llm" / "model.safetensors").unlink()
    with pytest.raises(UnsupportedModelError, match="AWQ / TinyChat"):
        vila.load(root, device="cpu")
