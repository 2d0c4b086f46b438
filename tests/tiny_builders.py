"""Builders of tiny checkpoints in the released layouts, shared by the tests (written to tmp folders)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from conftest import HF_CONFIGS, TINY
from safetensors.torch import save_file

from vila.model.intern_vit import InternVisionConfig, InternVisionModel
from vila.model.projector import MultimodalProjector

REAL_TOWER = HF_CONFIGS / "Efficient-Large-Model__VILA1.5-40b" / "vision_tower"
YI_CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
LLAMA3_TOKENS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|end_of_text|>")


def make_llm(dst: Path, extra_tokens: tuple[str, ...] = YI_CHAT_TOKENS) -> None:
    """The tiny Llama of vila15-tiny with extra special tokens (Yi's chat tokens by default) appended to its
    tokenizer and embedding table."""
    from transformers import LlamaForCausalLM

    src = TINY / "vila15-tiny" / "llm"
    shutil.copytree(src, dst)
    tok = json.loads((src / "tokenizer.json").read_text())
    tok_cfg = json.loads((src / "tokenizer_config.json").read_text())
    first = max(t["id"] for t in tok["added_tokens"]) + 1
    for i, content in enumerate(extra_tokens):
        entry = {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        tok["added_tokens"].append({"id": first + i, **entry})
        tok_cfg["added_tokens_decoder"][str(first + i)] = entry
    (dst / "tokenizer.json").write_text(json.dumps(tok))
    (dst / "tokenizer_config.json").write_text(json.dumps(tok_cfg))

    llm = LlamaForCausalLM.from_pretrained(src, dtype=torch.float32)
    old = llm.get_input_embeddings().weight.shape[0]
    llm.resize_token_embeddings(first + len(extra_tokens), mean_resizing=False)
    with torch.no_grad():  # deterministic new rows
        g = torch.Generator().manual_seed(1)
        for w in (llm.get_input_embeddings().weight, llm.get_output_embeddings().weight):
            w[old:] = 0.1 * torch.randn(w[old:].shape, generator=g)
    for f in dst.glob("model*.safetensors"):
        f.unlink()
    llm.save_pretrained(dst, safe_serialization=True)


def make_tower(dst: Path) -> InternVisionConfig:
    """A 3-layer InternViT at the real 448 px, saved as 2 shards + index like the released 3-shard tower."""
    cfg = json.loads((REAL_TOWER / "config.json").read_text())
    cfg.update(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
    dst.mkdir()
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    shutil.copy(REAL_TOWER / "preprocessor_config.json", dst / "preprocessor_config.json")
    config = InternVisionConfig.from_dict(cfg)
    torch.manual_seed(0)
    model = InternVisionModel(config)
    g = torch.Generator().manual_seed(2)
    state = {}
    for k, v in model.state_dict().items():
        if k.endswith(("norm1.weight", "norm2.weight", "q_norm.weight", "k_norm.weight")):
            state[k] = 1.0 + 0.2 * torch.randn(v.shape, generator=g)
        else:
            state[k] = 0.2 * torch.randn(v.shape, generator=g)
    names = sorted(state)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    weight_map = {}
    for file, keys in shards.items():
        save_file(
            {k: state[k].to(torch.bfloat16).contiguous() for k in keys}, str(dst / file), metadata={"format": "pt"}
        )
        weight_map.update(dict.fromkeys(keys, file))
    total = sum(v.numel() * 2 for v in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return config


def make_projector(dst: Path, mm_hidden: int, hidden: int) -> None:
    dst.mkdir()
    cfg = {
        "architectures": ["MultimodalProjector"],
        "mm_projector_type": "mlp_downsample",
        "model_type": "v2l_projector",
    }
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    torch.manual_seed(3)
    proj = MultimodalProjector("mlp_downsample", mm_hidden, hidden)
    save_file(
        {k: v.to(torch.bfloat16).contiguous() for k, v in proj.state_dict().items()}, str(dst / "model.safetensors")
    )


def make_intern_checkpoint(root: Path) -> Path:
    """A tiny VILA1.5-40b: InternViT tower (sharded), mlp_downsample projector, Llama LLM with Yi chat tokens."""
    root.mkdir(parents=True)
    make_llm(root / "llm")
    tower = make_tower(root / "vision_tower")
    llm_cfg = json.loads((root / "llm" / "config.json").read_text())
    make_projector(root / "mm_projector", tower.hidden_size, llm_cfg["hidden_size"])
    top = json.loads((TINY / "vila15-tiny" / "config.json").read_text())
    top.update(
        _name_or_path="vila1.5-34b",
        hidden_size=llm_cfg["hidden_size"],
        mm_hidden_size=tower.hidden_size,
        image_aspect_ratio="resize",
        mm_vision_select_feature="patch",  # 32x32 patches without CLS: a square grid for the 2x2 downsample
        mm_vision_select_layer=-2,
        llm_cfg=llm_cfg,
        vision_tower_cfg=json.loads((root / "vision_tower" / "config.json").read_text()),
    )
    top.pop("version", None)  # published configs carry no training conv version
    (root / "config.json").write_text(json.dumps(top, indent=2))
    return root


def make_llama3_checkpoint(root: Path) -> Path:
    """vila15-tiny with a Llama-3-style tokenizer (``<|eot_id|>`` etc.), as Llama-3-VILA1.5-8B."""
    shutil.copytree(TINY / "vila15-tiny", root, ignore=shutil.ignore_patterns("llm"))
    make_llm(root / "llm", LLAMA3_TOKENS)
    top = json.loads((root / "config.json").read_text())
    top.pop("version", None)
    top["llm_cfg"] = json.loads((root / "llm" / "config.json").read_text())
    (root / "config.json").write_text(json.dumps(top, indent=2))
    return root
