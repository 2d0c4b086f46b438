"""The registry of families (``vila.families``): every registered tower, projector and media encoder has all its
hooks, an unknown one fails with one line naming the registered ones, and a family registered from outside the
library (here, a toy tower, projector and encoder in this test module) is found by config parsing, meta
construction, preprocessing and LoRA name mapping without any library change."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import TINY
from torch import nn

from vila import families
from vila.config import EncoderConfig, ProcessorConfig, VisionConfig, config_from_dicts, vision_kind
from vila.errors import UnsupportedModelError
from vila.families import (
    EncoderFamily,
    PixelRules,
    ProjectorFamily,
    TowerFamily,
    encoder_families,
    projector_families,
    recognise_tower,
    register_encoder,
    register_projector,
    register_tower,
    tower_families,
    tower_family,
)
from vila.lora import _NameMap
from vila.meta import build_meta
from vila.model.encoders import encode_video
from vila.model.projector import MultimodalProjector
from vila.model.vision import build_tower
from vila.preprocess import preprocess_images

CKPT = TINY / "vila15-tiny"


def checkpoint_dicts() -> tuple[dict[str, Any], ...]:
    def read(rel: str) -> dict[str, Any]:
        return json.loads((CKPT / rel).read_text())

    return (
        read("config.json"),
        read("llm/config.json"),
        read("vision_tower/config.json"),
        read("mm_projector/config.json"),
        read("vision_tower/preprocessor_config.json"),
    )


# -- every registered family is complete -------------------------------------------------------------------


@pytest.mark.parametrize("family", tower_families(), ids=lambda f: f.kind)
def test_every_tower_family_has_all_hooks(family):
    for hook in ("parse_processor", "build", "stored", "lora_name", "check"):
        assert callable(getattr(family, hook)), hook
    assert isinstance(family.pixels, PixelRules)
    assert family.architectures or family.config_flag, "a tower must be recognisable from a config"
    assert family.processor_types or family.default_processor
    for ptype in family.processor_types:  # each processor it claims parses to its own kind
        proc = ProcessorConfig.from_dict({"image_processor_type": ptype}, default_size=28)
        assert proc.kind == family.kind and proc.size > 0


def test_builtin_towers_are_recognised_as_the_reference_does():
    assert tower_family("SiglipVisionModel").kind == "siglip"
    assert tower_family("InternVisionModel").kind == "intern"
    assert recognise_tower({"architectures": ["SiglipVisionModel"]}, {"ps3": True}).kind == "ps3"
    assert recognise_tower({"model_type": "siglip_vision_model"}, {}).kind == "siglip"
    assert ProcessorConfig.from_dict({}, default_size=28).kind == "siglip"  # no processor type: transformers' keys


@pytest.mark.parametrize("family", projector_families(), ids=lambda f: f.name)
def test_every_projector_builds(family):
    kind = "mlp2x_gelu" if family.pattern else family.name
    assert family.matches(kind)
    projector = MultimodalProjector(kind, 12, 12)  # identity keeps the width
    side = 3 * 2  # a grid both the 2x2 and the 3x3 downsample divide
    out = projector(torch.randn(1, side * side, 12))
    assert out.shape == (1, side * side // projector.downsample**2, 12)


@pytest.mark.parametrize("family", encoder_families(), ids=lambda f: f.kind)
def test_every_encoder_encodes(family):
    cfg = EncoderConfig(family.kind, end_tokens="\n", pool_sizes=((2, 1, 1),))
    family.check(cfg)
    features = torch.randn(2, 4, 3)  # (T, N, D)

    def embed(text: str | None) -> torch.Tensor | None:
        return None if text is None else torch.zeros(1, 3)

    block = encode_video(features, cfg, embed)
    assert block.dim() == 2 and block.shape[1] == 3
    assert (
        EncoderConfig.parse({"_target_": family.target, "pool_sizes": [[2, 1, 1]]}, family.target).kind == family.kind
    )


def test_ps3_projectors_are_the_registered_ones_with_ps3():
    from vila.model.vila_hd import PS3_PROJECTORS

    assert set(PS3_PROJECTORS) == {
        "identity",
        "linear",
        "mlp_downsample",
        "mlp_downsample_2x2_fix",
        "mlp_downsample_3x3_fix",
    }


# -- unknown names: one line naming the registered ones ----------------------------------------------------


def one_line_naming(excinfo: pytest.ExceptionInfo, names: list[str]) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    assert all(name in message for name in names), message


def test_unknown_architecture_names_the_registered_towers():
    with pytest.raises(UnsupportedModelError, match="FooVisionModel") as e:
        vision_kind({"architectures": ["FooVisionModel"]}, {})
    one_line_naming(e, [f.kind for f in tower_families()])


def test_radio_and_clip_say_not_supported_yet():
    with pytest.raises(UnsupportedModelError, match="not supported yet"):
        vision_kind({"architectures": ["RADIOModel"]}, {})


def test_unknown_projector_names_the_registered_projectors():
    with pytest.raises(UnsupportedModelError, match="mlp_downsample_9x9") as e:
        MultimodalProjector("mlp_downsample_9x9", 4, 4)
    one_line_naming(e, ["identity", "linear", "mlpNx_gelu", "mlp_downsample_3x3_s2_new"])


def test_unknown_encoder_names_the_registered_encoders():
    with pytest.raises(UnsupportedModelError, match="MyEncoder") as e:
        EncoderConfig.parse({"_target_": "my.MyEncoder"}, "llava.model.encoders.BasicVideoEncoder")
    one_line_naming(e, [f.target for f in encoder_families()])


def test_registering_a_name_twice_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register_tower(tower_family("siglip"))


# -- a family registered outside the library ---------------------------------------------------------------


class ToyTower(nn.Module):
    """Patchify with one conv: ``(B, 3, s, s)`` -> ``(B, (s/p)^2, C)``."""

    def __init__(self, cfg: VisionConfig, num_layers: int):
        super().__init__()
        p = cfg.patch_size
        self.patch = nn.Conv2d(3, cfg.hidden_size, p, p)
        self.blocks = nn.ModuleList(nn.Linear(cfg.hidden_size, cfg.hidden_size) for _ in range(num_layers))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        h = self.patch(pixels).flatten(2).transpose(1, 2)
        for block in self.blocks:
            h = block(h)
        return h


def toy_build(cfg: VisionConfig, source: Any, dtype: torch.dtype, device: Any) -> nn.Module:
    assert source is None  # meta construction only in these tests
    with torch.device("meta"):
        return ToyTower(cfg, cfg.num_layers_to_run)


def toy_stored(cfg: VisionConfig) -> tuple[nn.Module, str]:
    with torch.device("meta"):
        return ToyTower(cfg, cfg.num_hidden_layers), "toy."


def toy_lora_name(tower: nn.Module, name: str) -> str | None:
    name = name.removeprefix("toy.")
    if name.startswith("blocks.") and int(name.split(".")[1]) >= len(tower.blocks):
        return None
    return name


def toy_processor(d: dict[str, Any], default_size: int) -> ProcessorConfig:
    return ProcessorConfig(
        size=int(d.get("side", default_size)), image_mean=(0.25,) * 3, image_std=(0.5,) * 3, kind="toy"
    )


@pytest.fixture
def toy():
    tower = register_tower(
        TowerFamily(
            kind="toy",
            architectures=("toyvit",),
            processor_types=("ToyImageProcessor",),
            parse_processor=toy_processor,
            build=toy_build,
            stored=toy_stored,
            lora_name=toy_lora_name,
            pixels=PixelRules(float32_rescale=True),
        )
    )
    projector = register_projector(ProjectorFamily("toy_half", lambda kind, m, d: nn.Linear(m, d, bias=False)))
    encoder = register_encoder(
        EncoderFamily("toys.ReverseVideoEncoder", "toy_reverse", lambda feats, cfg, embed: feats.flip(0).flatten(0, 1))
    )
    yield tower
    families.TOWERS.pop(tower.kind)
    families.PROJECTORS.pop(projector.name)
    families.ENCODERS.pop(encoder.target)


def toy_dicts() -> tuple[dict[str, Any], ...]:
    top, llm, vision, projector, _ = checkpoint_dicts()
    top = top | {"video_encoder": {"_target_": "toys.ReverseVideoEncoder"}}
    vision = vision | {"architectures": ["ToyViTModel"], "image_size": 28, "patch_size": 14, "num_hidden_layers": 3}
    projector = projector | {"mm_projector_type": "toy_half"}
    return top, llm, vision, projector, {"image_processor_type": "ToyImageProcessor", "side": 28}


def test_toy_family_is_found_by_config_parsing(toy):
    cfg = config_from_dicts(*toy_dicts())
    assert cfg.vision.kind == "toy" and cfg.processor.kind == "toy" and cfg.processor.size == 28
    assert cfg.projector_type == "toy_half" and cfg.video_encoder.kind == "toy_reverse"


def test_toy_family_builds_on_meta(toy):
    meta = build_meta(*toy_dicts())
    assert isinstance(meta.vision_tower, ToyTower) and isinstance(meta.mm_projector.layers, nn.Linear)
    names = meta.stored_tensors()["vision_tower"]
    assert "toy.patch.weight" in names and "toy.blocks.2.weight" in names
    tower = build_tower(meta.config.vision, None, torch.float32, "cpu")
    assert isinstance(tower, ToyTower) and len(tower.blocks) == meta.config.vision.num_layers_to_run == 2


def test_toy_family_preprocessing_rules(toy):
    cfg = config_from_dicts(*toy_dicts())
    pixels = np.arange(28 * 28 * 3, dtype=np.uint8).reshape(28, 28, 3)
    got = preprocess_images([PIL.Image.fromarray(pixels)], cfg).pixel_values[0]
    # the toy's rule: torchvision's float32 x / 255, then its own mean and std
    want = (torch.from_numpy(pixels).permute(2, 0, 1).float().div(255) - 0.25) / 0.5
    assert torch.equal(got, want)


def test_toy_family_lora_names(toy):
    cfg = config_from_dicts(*toy_dicts())
    model = SimpleNamespace(config=cfg, vision_tower=build_tower(cfg.vision, None, torch.float32, "cpu"))
    names = _NameMap(model)
    assert names("vision_tower.vision_tower.toy.blocks.1.lora_A.weight") == ("vision_tower", "blocks.1.lora_A.weight")
    assert names("vision_tower.vision_tower.toy.blocks.2.lora_A.weight") is None  # after the selected layer
    assert names("llm.model.layers.0.q_proj.lora_A.weight") == ("llm", "model.layers.0.q_proj.lora_A.weight")


def test_toy_encoder_runs_through_encode_video(toy):
    cfg = config_from_dicts(*toy_dicts())
    features = torch.arange(12.0).reshape(3, 2, 2)
    assert torch.equal(encode_video(features, cfg.video_encoder, lambda text: None), features.flip(0).flatten(0, 1))
