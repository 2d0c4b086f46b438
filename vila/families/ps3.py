"""PS3, the VILA-HD vision tower (``ps3: true`` in ``config.json``), and ``ps3-torch``'s ``PS3ImageProcessor``.
The network is :mod:`vila.model.ps3`; VILA-HD's model (:mod:`vila.model.vila_hd`) drives its passes."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import ProcessorConfig, VisionConfig
from ..errors import UnsupportedModelError
from ..model.ps3 import UNUSED_PREFIXES, PS3Config, PS3Tower
from . import PixelRules, TowerFamily, register_tower

# OpenAI CLIP statistics: PS3ImageProcessor's default when preprocessor_config.json has no mean/std.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def parse_processor(d: dict[str, Any], default_size: int) -> ProcessorConfig:
    # Squash resize to `image_size`; mean/std from its own `mean`/`std` keys, else the OpenAI CLIP constants, as
    # `ps3-torch`'s PS3ImageProcessor does. ToTensor + Normalize equal the SigLIP path bit for bit.
    side = d.get("image_size") or default_size
    side = side[0] if isinstance(side, (list, tuple)) else side
    mean = d.get("mean") or CLIP_MEAN
    std = d.get("std") or CLIP_STD
    mean = tuple(mean) if isinstance(mean, (list, tuple)) else (float(mean),) * 3
    std = tuple(std) if isinstance(std, (list, tuple)) else (float(std),) * 3
    return ProcessorConfig(size=int(side), image_mean=mean, image_std=std, kind="ps3")


def build(cfg: VisionConfig, source: Any, dtype: torch.dtype, device: torch.device | str) -> PS3Tower:
    return PS3Tower.build(PS3Config.from_dict(cfg.raw), source, dtype, device, select_layer=cfg.select_layer)


def stored(cfg: VisionConfig) -> tuple[nn.Module, str]:
    raise UnsupportedModelError(
        "vila.meta cannot build the stored ps3 vision tower (VILA-HD): its trunk's final norm and pooling head "
        "are not modules of this library, so stored sizes cannot be checked"
    )


def lora_name(tower: nn.Module, name: str) -> str | None:
    # PS3Tower's parameter names are the checkpoint's.
    return None if name.startswith(UNUSED_PREFIXES) else name


FAMILY = register_tower(
    TowerFamily(
        kind="ps3",
        architectures=(),  # chosen by the `ps3` flag only, as the reference does
        processor_types=("PS3ImageProcessor",),
        parse_processor=parse_processor,
        build=build,
        stored=stored,
        lora_name=lora_name,
        pixels=PixelRules(),
        config_flag="ps3",
    )
)
