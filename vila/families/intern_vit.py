"""InternViT-6B, the vision tower of VILA1.5-40b (``vision_tower/config.json`` names an ``intern``
architecture), with the reference's ``InternVisionPreprocessor``. The network is :mod:`vila.model.intern_vit`."""

from __future__ import annotations

from typing import Any

import PIL.Image
import torch
from torch import nn

from ..config import ProcessorConfig, VilaConfig, VisionConfig
from ..errors import UnsupportedModelError
from ..model.intern_vit import IMAGENET_MEAN, IMAGENET_STD, InternVisionConfig, InternVisionModel, load_intern_vit
from . import PixelRules, TowerFamily, register_tower


class InternTower(nn.Module):
    """InternViT returning the features of ``mm_vision_select_layer``."""

    def __init__(self, model: nn.Module, num_layers: int, select_feature: str):
        super().__init__()
        self.model = model
        self.num_layers = num_layers
        self.select_feature = select_feature

    @classmethod
    def build(cls, cfg: VisionConfig, source: Any, dtype: torch.dtype, device: torch.device | str) -> InternTower:
        if source is None:  # meta-device construction from the config alone (shape checks)
            model = stored(cfg)[0]
        else:
            model = load_intern_vit(source, dtype=dtype, device=device)
        return cls(model, cfg.num_layers_to_run, cfg.select_feature)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        h = self.model(pixel_values, num_layers=self.num_layers)
        return h[:, 1:] if self.select_feature == "patch" else h


def parse_processor(d: dict[str, Any], default_size: int) -> ProcessorConfig:
    # The reference preprocessor ignores preprocessor_config.json (a stub in the release): a bicubic resize to
    # the tower's image size and ImageNet statistics.
    return ProcessorConfig(
        size=default_size,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        resample=int(PIL.Image.BICUBIC),
        kind="intern",
    )


def stored(cfg: VisionConfig) -> tuple[nn.Module, str]:
    with torch.device("meta"):
        model = InternVisionModel(InternVisionConfig.from_dict(cfg.raw))
    return model, ""


def lora_name(tower: nn.Module, name: str) -> str | None:
    return "model." + name


def check(cfg: VilaConfig) -> None:
    if cfg.image_aspect_ratio == "pad":
        raise UnsupportedModelError(
            "image_aspect_ratio 'pad' cannot be used with the InternViT tower (it has no image mean)"
        )


FAMILY = register_tower(
    TowerFamily(
        kind="intern",
        architectures=("intern",),
        processor_types=("InternVisionPreprocessor",),
        parse_processor=parse_processor,
        build=InternTower.build,
        stored=stored,
        lora_name=lora_name,
        pixels=PixelRules(float32_rescale=True),
        check=check,
    )
)
