"""The registry of model families: vision towers, projectors and video encoders, each chosen by name.

One module per family registers everything the rest of the library needs to know about it, as timm's model
registry and mlx-vlm's per-model folders do: how its config is recognised and parsed, how it is built and its
weights loaded, the tensor names its checkpoint stores, how its image processor differs, and which modules
LoRA adapters name. The library looks families up here and never tests a kind string itself, so adding a family
is one new module (registered with :func:`register_tower`, :func:`register_projector` or
:func:`register_encoder`) plus its tests.

The built-in families are imported on the first lookup: they need :mod:`vila.config`'s dataclasses, while
``vila.config`` needs this registry to parse a checkpoint, so this module imports neither at import time.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import UnsupportedModelError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..config import EncoderConfig, ProcessorConfig, VilaConfig, VisionConfig

BUILTIN_MODULES = ("intern_vit", "ps3", "siglip", "projectors", "encoders")
# Towers the reference can build but no released VILA uses; named so the error says so instead of "unknown".
NOT_YET_SUPPORTED = ("radio", "clip")


@dataclass(frozen=True)
class PixelRules:
    """Where a family's image processor computes pixels differently from transformers' ``SiglipImageProcessor``."""

    # transformers' image processors guess the channel axis from the array shape, so an image 1 or 3 pixels high
    # is read as channels-first (``infer_channel_dimension_format``); torchvision pipelines do not guess.
    guesses_channel_axis: bool = False
    # torchvision's ``ToTensor`` rescales in float32 (``x / 255``) and is always followed by the normalisation;
    # transformers' processors rescale in float64 and normalise only with ``do_normalize``.
    float32_rescale: bool = False


@dataclass(frozen=True)
class TowerFamily:
    """A vision tower family. ``source`` is whatever the checkpoint layer hands over for the tower's weights
    (today its folder); families pass it through to the weight loaders unchanged."""

    kind: str  # VisionConfig.kind / ProcessorConfig.kind
    # Lower-cased substrings of ``vision_tower/config.json`` ``architectures[0]`` that select this family, as the
    # reference's ``build_vision_tower`` (NVlabs/VILA ``llava/model/multimodal_encoder/builder.py``) tests them.
    architectures: tuple[str, ...]
    # ``preprocessor_config.json`` ``image_processor_type`` values this family parses.
    processor_types: tuple[str, ...]
    parse_processor: Callable[[dict[str, Any], int], ProcessorConfig]
    # Inference tower, truncated to ``mm_vision_select_layer``: pixels ``(B, 3, s, s)`` -> features ``(B, N, C)``.
    # ``source=None`` builds it on the meta device from the config alone.
    build: Callable[[VisionConfig, Any, torch.dtype, torch.device | str], nn.Module]
    # The whole stored vision model on the meta device and the prefix the released files put before its names.
    stored: Callable[[VisionConfig], tuple[nn.Module, str]]
    # A reference tensor name below ``vision_tower.vision_tower.`` -> the name in the built tower, or None for
    # a module that never runs (layers after the selected one); raises CheckpointError when it cannot fit.
    lora_name: Callable[[nn.Module, str], str | None]
    pixels: PixelRules = PixelRules()
    # A top-level ``config.json`` key that selects this tower whatever ``architectures`` says (``ps3: true``).
    config_flag: str | None = None
    # Whether ``image_processor_type`` values no family names (or none at all) are parsed by this family.
    default_processor: bool = False
    # Extra checks of the whole config before loading (raise UnsupportedModelError).
    check: Callable[[VilaConfig], None] = lambda cfg: None


@dataclass(frozen=True)
class ProjectorFamily:
    """An ``mm_projector_type`` (or a pattern of them, such as ``mlp2x_gelu``) and its layer recipe."""

    name: str  # the type, or a regular expression matched in full
    # (type, mm_hidden, hidden) -> the ``layers`` module; indices must equal the checkpoint's ``layers.{i}``.
    build: Callable[[str, int, int], nn.Module]
    pattern: bool = False
    with_ps3: bool = False  # VILA-HD can combine it with PS3 (the reference's ``encode_images_ps3`` branches)

    def matches(self, kind: str) -> bool:
        return re.fullmatch(self.name, kind) is not None if self.pattern else kind == self.name


@dataclass(frozen=True)
class EncoderFamily:
    """A media encoder, chosen by the Hydra ``_target_`` of ``config.json`` ``image_encoder`` / ``video_encoder``."""

    target: str  # e.g. "llava.model.encoders.TSPVideoEncoder"
    kind: str  # EncoderConfig.kind
    # One medium's features ``(T, N, D)`` (or ``(N, D)``), its config and a text embedder -> its embedding block.
    encode: Callable[[torch.Tensor, EncoderConfig, Callable[[str | None], torch.Tensor | None]], torch.Tensor]
    check: Callable[[EncoderConfig], None] = lambda cfg: None


TOWERS: dict[str, TowerFamily] = {}
PROJECTORS: dict[str, ProjectorFamily] = {}
ENCODERS: dict[str, EncoderFamily] = {}
_builtins_loaded = False


def _load_builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    for name in BUILTIN_MODULES:
        importlib.import_module(f"{__name__}.{name}")


def _register(table: dict[str, Any], key: str, family: Any, what: str) -> Any:
    _load_builtins()
    if key in table:
        raise ValueError(f"a {what} {key!r} is already registered")
    table[key] = family
    return family


def register_tower(family: TowerFamily) -> TowerFamily:
    return _register(TOWERS, family.kind, family, "vision tower family")


def register_projector(family: ProjectorFamily) -> ProjectorFamily:
    return _register(PROJECTORS, family.name, family, "projector")


def register_encoder(family: EncoderFamily) -> EncoderFamily:
    return _register(ENCODERS, family.target, family, "media encoder")


def tower_families() -> list[TowerFamily]:
    _load_builtins()
    return list(TOWERS.values())


def projector_families() -> list[ProjectorFamily]:
    _load_builtins()
    return list(PROJECTORS.values())


def encoder_families() -> list[EncoderFamily]:
    _load_builtins()
    return list(ENCODERS.values())


def _names(items: Any) -> str:
    return ", ".join(sorted(items))


def tower_family(kind_or_arch: str) -> TowerFamily:
    """The family of a tower kind (``"siglip"``) or of an architecture name (``"SiglipVisionModel"``)."""
    _load_builtins()
    if kind_or_arch in TOWERS:
        return TOWERS[kind_or_arch]
    name = kind_or_arch.lower()
    for family in TOWERS.values():
        if any(a in name for a in family.architectures):
            return family
    if any(a in name for a in NOT_YET_SUPPORTED):
        raise UnsupportedModelError(
            f"vision tower {kind_or_arch!r} (RADIO/CLIP) is not supported yet; no released VILA uses it"
        )
    raise UnsupportedModelError(
        f"unknown vision tower {kind_or_arch!r} in vision_tower/config.json; registered: {_names(TOWERS)}"
    )


def recognise_tower(vision_cfg: dict[str, Any], top: dict[str, Any]) -> TowerFamily:
    """The reference's tower rule (``build_vision_tower``): a flag of ``config.json`` (``ps3``), else the
    lower-cased ``architectures[0]`` of ``vision_tower/config.json``."""
    _load_builtins()
    for family in TOWERS.values():
        if family.config_flag and top.get(family.config_flag):
            return family
    archs = vision_cfg.get("architectures") or [vision_cfg.get("model_type", "")]
    return tower_family(str(archs[0]))


def processor_family(image_processor_type: str | None) -> TowerFamily:
    """The family whose image processor ``preprocessor_config.json`` names (the default one when unnamed)."""
    _load_builtins()
    for family in TOWERS.values():
        if image_processor_type in family.processor_types:
            return family
    for family in TOWERS.values():
        if family.default_processor:
            return family
    raise UnsupportedModelError(
        f"unknown image_processor_type {image_processor_type!r} in preprocessor_config.json; "
        f"registered: {_names(t for f in TOWERS.values() for t in f.processor_types)}"
    )


def projector_family(kind: str) -> ProjectorFamily:
    """The projector registered for an ``mm_projector_type``."""
    _load_builtins()
    if kind in PROJECTORS and not PROJECTORS[kind].pattern:
        return PROJECTORS[kind]
    for family in PROJECTORS.values():
        if family.matches(kind):
            return family
    raise UnsupportedModelError(f"unknown mm_projector_type {kind!r}; registered: {_names(_projector_names())}")


def _projector_names() -> list[str]:
    # Patterns are shown by their example spelling (mlp2x_gelu -> mlpNx_gelu) so the line stays readable.
    return [f.name.replace(r"(\d+)", "N") if f.pattern else f.name for f in PROJECTORS.values()]


def ps3_projectors() -> tuple[str, ...]:
    """Projector types VILA-HD can combine with PS3."""
    return tuple(f.name for f in projector_families() if f.with_ps3)


def encoder_family(target_or_kind: str) -> EncoderFamily:
    """The media encoder of a ``_target_`` (or of an ``EncoderConfig.kind``)."""
    _load_builtins()
    if target_or_kind in ENCODERS:
        return ENCODERS[target_or_kind]
    for family in ENCODERS.values():
        if family.kind == target_or_kind:
            return family
    raise UnsupportedModelError(
        f"config.json: unknown media encoder {target_or_kind!r}; registered: {_names(ENCODERS)}"
    )
