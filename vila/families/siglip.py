"""SigLIP, the vision tower of VILA1.5 and NVILA (transformers' ``SiglipVisionModel``), and the standard
transformers image processor (``SiglipImageProcessor``, also the default for any other processor type).

The S2 / Dynamic-S2 multi-scale merges (``vila.model.vision``) run on the features of whatever tower is built;
every released S2 checkpoint uses this one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import ProcessorConfig, VisionConfig
from ..errors import CheckpointError, UnsupportedModelError
from . import PixelRules, TowerFamily, register_tower


class SiglipTower(nn.Module):
    """SigLIP from transformers' ``SiglipVisionModel``, truncated to the selected layer."""

    def __init__(self, embeddings: nn.Module, layers: nn.ModuleList, select_feature: str):
        super().__init__()
        self.embeddings = embeddings
        self.layers = layers
        self.select_feature = select_feature

    @classmethod
    def build(cls, cfg: VisionConfig, source: Any, dtype: torch.dtype, device: torch.device | str) -> SiglipTower:
        from transformers import SiglipVisionConfig, SiglipVisionModel

        if source is None:  # meta-device construction from the config alone (shape checks)
            model = stored(cfg)[0]
        else:
            from dataclasses import replace

            from accelerate import init_empty_weights

            from ..checkpoint import assign_weights, stored_keys

            hf_cfg = SiglipVisionConfig.from_dict(source.config)
            hf_cfg.num_hidden_layers = cfg.num_layers_to_run
            # Parameters on meta, buffers (position ids) real; every stored weight is then read, converted and
            # placed once, and a missing one is an error instead of a random init.
            with init_empty_weights(include_buffers=False):
                model = SiglipVisionModel._from_config(hf_cfg, dtype=dtype, attn_implementation="sdpa")
            # Published towers store vision_model.*; transformers >= 5.6 flattened that module away.
            if any(k.startswith("vision_model.") for k in stored_keys(source)):
                source = replace(source, prefix=source.prefix + "vision_model.")
            # Layers past the selected one are stored but never run, so never read.
            unused = tuple(f"encoder.layers.{i}." for i in range(cfg.num_layers_to_run, cfg.num_hidden_layers))
            assign_weights(model, source, dtype=dtype, device=device, skip=unused)
            model.to(device)
        layers = nn.ModuleList(list(model.encoder.layers)[: cfg.num_layers_to_run])
        return cls(model.embeddings, layers, cfg.select_feature)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        h = self.embeddings(pixel_values)  # (B, N, C)
        for layer in self.layers:
            h = layer(h, attention_mask=None)
        return h[:, 1:] if self.select_feature == "patch" else h


def parse_processor(d: dict[str, Any], default_size: int) -> ProcessorConfig:
    """transformers' image processor keys (``size``, ``image_mean``, ``rescale_factor``...)."""
    size = d.get("size") or {}
    if isinstance(size, dict):
        h, w = size.get("height", default_size), size.get("width", default_size)
    else:
        h = w = int(size)
    if h != w:
        raise UnsupportedModelError(f"preprocessor_config.json: non-square size {w}x{h} is not supported")
    return ProcessorConfig(
        size=int(h),
        image_mean=tuple(d.get("image_mean", (0.5, 0.5, 0.5))),
        image_std=tuple(d.get("image_std", (0.5, 0.5, 0.5))),
        rescale_factor=float(d.get("rescale_factor", 1 / 255)),
        resample=int(d.get("resample", 3)),
        do_resize=bool(d.get("do_resize", True)),
        do_rescale=bool(d.get("do_rescale", True)),
        do_normalize=bool(d.get("do_normalize", True)),
        kind="siglip",
    )


def stored(cfg: VisionConfig) -> tuple[nn.Module, str]:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    hf_cfg = SiglipVisionConfig(**{k: v for k, v in cfg.raw.items() if k not in ("architectures", "_name_or_path")})
    with torch.device("meta"):
        model = SiglipVisionModel(hf_cfg)
    # transformers 5.x drops the `vision_model.` level from the module tree but the released files keep it,
    # and `from_pretrained` still loads those keys without renaming.
    return model, "vision_model."


def lora_name(tower: nn.Module, name: str) -> str | None:
    if not isinstance(tower, SiglipTower) or not name.startswith("vision_model."):
        raise CheckpointError(f"adapter tensor for the vision tower {name!r} does not match the loaded tower")
    name = name[len("vision_model.") :]
    if name.startswith("encoder.layers."):
        if int(name.split(".")[2]) >= len(tower.layers):
            return None  # a layer after mm_vision_select_layer: never run
        return name[len("encoder.") :]
    if name.startswith(("post_layernorm.", "head.")):
        return None  # after the selected layer: never run
    return name


FAMILY = register_tower(
    TowerFamily(
        kind="siglip",
        architectures=("siglip",),
        processor_types=("SiglipImageProcessor",),
        parse_processor=parse_processor,
        build=SiglipTower.build,
        stored=stored,
        lora_name=lora_name,
        pixels=PixelRules(guesses_channel_axis=True),
        default_processor=True,
    )
)
