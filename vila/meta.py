"""A whole VILA model built on the meta device from its configs alone (no weights, no memory).

Used to check published checkpoints without downloading them: the tensor names each component folder stores
(``llm/``, ``vision_tower/``, ``mm_projector/``) and their parameter counts, which times 2 bytes (bf16) must
equal the published weight-file sizes. The modules are the *stored* ones: the whole vision model (all layers,
post-LayerNorm and pooling head where the config has them), not the truncated tower inference runs.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import VilaConfig, check_model_type, config_from_dicts, is_single_folder, read_json
from .errors import CheckpointError, UnsupportedModelError
from .families import tower_family
from .model.projector import MultimodalProjector

COMPONENTS = ("llm", "vision_tower", "mm_projector")


@dataclass
class MetaVila:
    """The three component modules of a checkpoint, on the meta device."""

    config: VilaConfig
    llm: nn.Module
    vision_tower: nn.Module
    mm_projector: MultimodalProjector
    tie_word_embeddings: bool
    vision_prefix: str  # prefix the released tower files put before the module's own names

    def stored_tensors(self) -> dict[str, dict[str, torch.Size]]:
        """Per component folder: tensor name -> shape, as the released safetensors store them."""
        llm = {k: v.shape for k, v in self.llm.state_dict().items()}
        if self.tie_word_embeddings:  # transformers never saves the tied copy
            llm.pop("lm_head.weight", None)
        tower = {self.vision_prefix + k: v.shape for k, v in self.vision_tower.state_dict().items()}
        projector = {k: v.shape for k, v in self.mm_projector.state_dict().items()}
        return {"llm": llm, "vision_tower": tower, "mm_projector": projector}

    def num_params(self) -> dict[str, int]:
        """Stored parameter count per component folder."""
        return {name: sum(s.numel() for s in shapes.values()) for name, shapes in self.stored_tensors().items()}

    def nbytes(self, bytes_per_param: int = 2) -> dict[str, int]:
        """Weight bytes per component folder (bf16 by default, as every released VILA checkpoint)."""
        return {name: n * bytes_per_param for name, n in self.num_params().items()}


def build_llm(llm_cfg: dict[str, Any]) -> tuple[nn.Module, bool]:
    """``AutoModelForCausalLM.from_config`` under ``torch.device("meta")``; returns the model and whether the
    embeddings are tied."""
    from transformers import AutoConfig, AutoModelForCausalLM

    d = dict(llm_cfg)
    model_type = d.pop("model_type", None)
    if not model_type:
        raise CheckpointError("llm/config.json has no model_type")
    for key in ("_name_or_path", "transformers_version", "architectures", "auto_map"):
        d.pop(key, None)
    try:
        hf_cfg = AutoConfig.for_model(model_type, **d)
    except (KeyError, ValueError) as e:
        raise UnsupportedModelError(f"LLM type {model_type!r} is not known to this transformers version: {e}") from e
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        llm = AutoModelForCausalLM.from_config(hf_cfg)
    return llm, bool(getattr(hf_cfg, "tie_word_embeddings", False))


def build_vision(cfg: VilaConfig) -> tuple[nn.Module, str]:
    """The whole stored vision model and the prefix its checkpoint names carry, from the tower's family."""
    return tower_family(cfg.vision.kind).stored(cfg.vision)


def build_meta(
    top: dict[str, Any],
    llm_cfg: dict[str, Any] | None = None,
    vision_cfg: dict[str, Any] | None = None,
    projector_cfg: dict[str, Any] | None = None,
    preprocessor: dict[str, Any] | None = None,
) -> MetaVila:
    """Build every component of a checkpoint from config dicts (component configs default to those embedded in
    the top-level config)."""
    cfg = config_from_dicts(top, llm_cfg, vision_cfg, projector_cfg, preprocessor)
    llm, tied = build_llm(cfg.llm_source.config)
    tower, prefix = build_vision(cfg)
    with torch.device("meta"):
        projector = MultimodalProjector(cfg.projector_type, cfg.vision.mm_hidden_size, cfg.llm_hidden_size)
    return MetaVila(cfg, llm, tower, projector, tied, prefix)


def meta_from_folder(root: str | Path) -> MetaVila:
    """:func:`build_meta` from a checkpoint folder's JSON files only (weights are not read)."""
    root = Path(root)
    top = read_json(root / "config.json")
    check_model_type(top, root)
    if is_single_folder(top):  # the component configs are nested in config.json
        pre = root / "preprocessor_config.json"
        return build_meta(top, preprocessor=read_json(pre) if pre.exists() else None)
    pre = root / "vision_tower" / "preprocessor_config.json"
    return build_meta(
        top,
        read_json(root / "llm" / "config.json"),
        read_json(root / "vision_tower" / "config.json"),
        read_json(root / "mm_projector" / "config.json"),
        read_json(pre) if pre.exists() else None,
    )
