"""Typed configuration, parsed once from a checkpoint's JSON files.

The reference keeps a loose ``LlavaConfig`` whose attributes are read all over the model code. Here the
top-level ``config.json``, ``vision_tower/config.json``, ``vision_tower/preprocessor_config.json`` and
``mm_projector/config.json`` become frozen dataclasses at the edge; the model code never reads JSON.
Defaults are those of the reference's ``LlavaConfig`` (NVlabs/VILA ``llava/model/configuration_llava.py``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .checkpoint import ComponentSource, component_files
from .errors import CheckpointError, UnsupportedModelError
from .families import encoder_family, processor_family, recognise_tower

ASPECT_RATIO_MODES = ("resize", "pad", "dynamic", "dynamic_s2", None)
VISION_FEATURES = ("patch", "cls_patch")


@dataclass(frozen=True)
class EncoderConfig:
    """An ``image_encoder`` / ``video_encoder`` entry (Hydra ``_target_`` style in the checkpoint)."""

    kind: str  # "basic_image" | "basic_video" | "tsp_video"
    start_tokens: str | None = None
    end_tokens: str | None = "\n"
    sep_tokens: str | None = None
    pool_sizes: tuple[tuple[int, int, int], ...] = ()

    @classmethod
    def parse(cls, value: Any, default_target: str) -> EncoderConfig:
        if value is None:
            value = {"_target_": default_target}
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise CheckpointError(f"config.json: encoder entry {value!r} is not valid JSON") from e
        value = dict(value)
        target = value.pop("_target_", default_target)
        family = encoder_family(target)
        pool_sizes = tuple(tuple(int(x) for x in p) for p in value.pop("pool_sizes", ()) or ())
        cfg = cls(
            kind=family.kind,
            start_tokens=value.pop("start_tokens", None),
            end_tokens=value.pop("end_tokens", "\n"),
            sep_tokens=value.pop("sep_tokens", None),
            pool_sizes=pool_sizes,
        )
        if value:
            raise UnsupportedModelError(f"config.json: unknown arguments {sorted(value)} for encoder {target}")
        family.check(cfg)
        return cfg


@dataclass(frozen=True)
class ProcessorConfig:
    """The image processor of the vision tower (``preprocessor_config.json``), after the S2 size override."""

    size: int  # square tile size in pixels
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    resample: int = 3  # PIL.Image.BICUBIC
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    kind: str = "siglip"  # the tower family whose processor this is: "siglip" | "intern" | "ps3"

    @classmethod
    def from_dict(cls, d: dict[str, Any], default_size: int) -> ProcessorConfig:
        """Parsed by the tower family that registers its ``image_processor_type`` (:mod:`vila.families`)."""
        return processor_family(d.get("image_processor_type")).parse_processor(d, default_size)


@dataclass(frozen=True)
class VisionConfig:
    """Which tower, how its features are selected, and how multi-scale (S2 / Dynamic-S2) works."""

    kind: str  # "siglip" | "intern" | "ps3"
    hidden_size: int
    image_size: int
    patch_size: int
    num_hidden_layers: int
    select_layer: int
    select_feature: str
    s2: bool
    dynamic_s2: bool
    scales: tuple[int, ...]
    max_split_size: int
    resize_output_to_scale_idx: int
    raw: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @property
    def num_scales(self) -> int:
        return len(self.scales) if (self.s2 or self.dynamic_s2) else 1

    @property
    def mm_hidden_size(self) -> int:
        """Channels the projector sees: tower width times the number of S2 scales, as the reference overwrites
        ``mm_hidden_size`` at load."""
        return self.hidden_size * self.num_scales

    @property
    def num_layers_to_run(self) -> int:
        """Encoder layers needed for ``hidden_states[select_layer]`` (entry 0 is the embedding output)."""
        n = self.select_layer if self.select_layer >= 0 else self.num_hidden_layers + 1 + self.select_layer
        if not 0 <= n <= self.num_hidden_layers:
            raise CheckpointError(
                f"config.json: mm_vision_select_layer {self.select_layer} is out of range for a "
                f"{self.num_hidden_layers}-layer vision tower"
            )
        return n


@dataclass(frozen=True)
class TopDownConfig:
    """VILA-HD (``llava_topdown_llama`` + PS3 tower) settings of ``config.json``. The
    PS3 tower's own settings are parsed from ``vision.raw`` by :mod:`vila.model.ps3`."""

    look_close_mode: str | None  # "after_prompt" | "after_image" | None (generation then needs one)
    num_look_close: int = 1
    num_token_look_close: int | None = None
    prompt_head_type: str = "linear"  # top_down_prompt_head: "linear" | "mlp"
    high_res_pos_embed: bool = False

    @classmethod
    def parse(cls, top: dict[str, Any]) -> TopDownConfig:
        if not (top.get("ps3") and "topdown" in str(top.get("model_type", ""))):
            raise UnsupportedModelError(
                "config.json: VILA-HD needs both model_type llava_topdown_llama and ps3: true; this mix is not supported"
            )
        head = top.get("top_down_prompt_head_type") or "linear"
        if head not in ("linear", "mlp"):
            raise UnsupportedModelError(
                f"config.json: unknown top_down_prompt_head_type {head!r}; supported: linear, mlp"
            )
        token = top.get("num_token_look_close")
        return cls(
            look_close_mode=top.get("look_close_mode"),
            num_look_close=_int(top, "num_look_close", 1),
            num_token_look_close=None if token is None else int(token),
            prompt_head_type=head,
            high_res_pos_embed=bool(top.get("high_res_pos_embed", False)),
        )


@dataclass(frozen=True)
class VilaConfig:
    """Everything inference needs from a checkpoint, parsed once."""

    root: Path
    model_type: str
    llm_source: ComponentSource
    vision_source: ComponentSource
    projector_source: ComponentSource
    llm_model_type: str
    llm_hidden_size: int
    llm_vocab_size: int
    vision: VisionConfig
    processor: ProcessorConfig
    projector_type: str
    image_aspect_ratio: str | None
    min_tiles: int = 1
    max_tiles: int = 12
    video_max_tiles: int = 1
    num_video_frames: int = 8
    fps: float = 0.0
    num_time_tokens: int | None = None
    time_token_format: str | None = None
    image_encoder: EncoderConfig = EncoderConfig("basic_image")
    video_encoder: EncoderConfig = EncoderConfig("basic_video")
    training_conv_version: str | None = None  # the training run's ``--version`` (a conv-mode name), if saved
    name_or_path: str = ""
    top_down: TopDownConfig | None = None  # set for VILA-HD checkpoints only
    layout: str = "original"  # "original" (llm/, vision_tower/, mm_projector/) | "hf" (one folder, one weight set)
    # The single-folder layout names the ids its tokenizer gives <image> and <vila/video>; checked at load.
    media_token_ids: dict[str, int] | None = None
    chat_template: str | None = None  # config.json's chat_template (a remote-code checkpoint's template name)

    def with_overrides(self, **changes: Any) -> VilaConfig:
        """A copy with per-request settings changed (num_video_frames, fps, video_max_tiles...)."""
        return replace(self, **changes)


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError as e:
        raise CheckpointError(f"missing {path}; the checkpoint is incomplete (re-download it)") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the checkpoint is corrupt (re-download it)") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return data


def _int(d: dict[str, Any], key: str, default: int) -> int:
    v = d.get(key)
    return default if v is None else int(v)


def parse_scales(value: Any) -> tuple[int, ...]:
    """``s2_scales`` is a comma-separated string (or a list); the reference sorts it ascending."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else value
    try:
        return tuple(sorted(int(x) for x in items))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"config.json: s2_scales {value!r} is not a list of integers") from e


def vision_kind(vision_cfg: dict[str, Any], top: dict[str, Any]) -> str:
    """The registered tower family the checkpoint names (:func:`vila.families.recognise_tower`)."""
    return recognise_tower(vision_cfg, top).kind


# Single-folder (``-hf``) checkpoints keep only the LLM and tower configs; the VILA settings are fixed per family
# (SGLang's ``nvila.py`` / ``nvila_lite.py`` hard-code them): the tower's second-to-last layer with its class token
# kept, NVILA's Dynamic-S2 at 448/896/1344 with a 2x2-downsample projector, Lite's dynamic tiles with a 3x3 one.
# A flat key in config.json (the ``-hf-0626`` checkpoints save some) overrides the family's value.
SINGLE_FOLDER_FAMILIES: dict[str, dict[str, Any]] = {
    "nvila": {
        "image_aspect_ratio": "dynamic_s2",
        "dynamic_s2": True,
        "s2_scales": "448,896,1344",
        "s2_max_split_size": 448,
        "s2_resize_output_to_scale_idx": -1,
        "mm_projector_type": "mlp_downsample",
    },
    "nvila_lite": {"image_aspect_ratio": "dynamic", "mm_projector_type": "mlp_downsample_3x3_fix"},
}
SINGLE_FOLDER_COMMON = {"mm_vision_select_layer": -2, "mm_vision_select_feature": "cls_patch"}
# -hf-0626 (model_type "vila") holds NVILA-Lite models.
SINGLE_FOLDER_MODEL_TYPES = {"nvila": "nvila", "nvila_lite": "nvila_lite", "vila": "nvila_lite"}


def is_single_folder(top: dict[str, Any]) -> bool:
    """The ``-hf`` layout: one config with the LLM's and the tower's configs nested, one weight set."""
    return "text_config" in top or "vision_config" in top


def single_folder_settings(top: dict[str, Any]) -> dict[str, Any]:
    """The top-level VILA settings a single-folder config implies: its family's values under its own flat keys."""
    model_type = str(top.get("model_type", ""))
    family = SINGLE_FOLDER_MODEL_TYPES.get(model_type)
    if family is None:
        raise UnsupportedModelError(
            f"config.json: single-folder checkpoint with model_type {model_type!r}; supported: nvila, nvila_lite, vila"
        )
    for key in ("text_config", "vision_config", "image_token_id", "video_token_id"):
        if top.get(key) is None:
            raise CheckpointError(f"config.json: {key} is missing; the single-folder checkpoint is incomplete")
    for key, kind, name in (("text_config", dict, "an object"), ("vision_config", dict, "an object")):
        if not isinstance(top[key], kind):
            raise CheckpointError(
                f"config.json: {key} must be {name}, got {type(top[key]).__name__}; the file is malformed"
            )
    for key in ("image_token_id", "video_token_id"):
        if isinstance(top[key], bool) or not isinstance(top[key], int):
            raise CheckpointError(f"config.json: {key} must be an integer, got {top[key]!r}; the file is malformed")
    return {**SINGLE_FOLDER_COMMON, **SINGLE_FOLDER_FAMILIES[family], **top}


def single_folder_components(settings: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The LLM, vision tower and projector configs a single-folder config (after :func:`single_folder_settings`)
    nests or implies: a Qwen2 ``text_config``, a SigLIP ``vision_config``, the family's projector type."""
    return (
        {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], **settings["text_config"]},
        {"architectures": ["SiglipVisionModel"], **settings["vision_config"]},
        {"mm_projector_type": settings["mm_projector_type"]},
    )


def check_model_type(top: dict[str, Any], where: Path | str) -> str:
    """The reference's ``is_mm_model`` test (NVlabs/VILA ``llava/model/utils/utils.py``), plus the single-folder
    layout's model types."""
    model_type = str(top.get("model_type", ""))
    archs = [str(a) for a in top.get("architectures") or []]
    if is_single_folder(top):
        return model_type
    if model_type in ("nvila", "nvila_lite"):
        raise CheckpointError(
            f"{where}: model_type {model_type!r} needs text_config and vision_config in config.json; the "
            "single-folder checkpoint is incomplete (re-download it)"
        )
    if not (model_type in ("llava_llama", "llava_topdown_llama", "vila") or any("llava" in a.lower() for a in archs)):
        raise CheckpointError(
            f"{where} is not a VILA checkpoint (config.json model_type {model_type!r}); "
            "pass a VILA/NVILA checkpoint folder or hub id"
        )
    return model_type


def parse_config(root: Path) -> VilaConfig:
    """Parse ``root/config.json`` and the component configs into a :class:`VilaConfig`, whichever the layout:
    the original one (``llm/``, ``vision_tower/``, ``mm_projector/``, each with its config and weights) or the
    single-folder ``-hf`` one (nested configs, one weight set with ``llm.`` / ``vision_tower.`` /
    ``mm_projector.`` prefixes). Both give the same component sources; nothing after this reads JSON."""
    top = read_json(root / "config.json")
    check_model_type(top, root)
    if is_single_folder(top):
        settings = single_folder_settings(top)
        llm_cfg, vision_cfg, projector_cfg = single_folder_components(settings)
        pre_path = root / "preprocessor_config.json"
        pre = read_json(pre_path) if pre_path.exists() else {}
        sources = (
            ComponentSource("language model", component_files(root, "llm."), "llm.", llm_cfg, root),
            ComponentSource("vision tower", component_files(root, "vision_tower."), "vision_tower.", vision_cfg, root),
            ComponentSource("projector", component_files(root, "mm_projector."), "mm_projector.", projector_cfg, root),
        )
        return config_from_dicts(settings, llm_cfg, vision_cfg, projector_cfg, pre, root=root, sources=sources)

    def component(key: str, folder: str) -> Path:
        value = top.get(key)
        if key == "vision_tower_cfg" and value is None:
            value = top.get("mm_vision_tower")
        if isinstance(value, str) and value and (root / value).is_dir():
            return root / value
        path = root / folder
        if not path.is_dir():
            raise CheckpointError(f"{root} has no {folder}/ folder; the checkpoint is incomplete (re-download it)")
        return path

    llm_dir = component("llm_cfg", "llm")
    vision_dir = component("vision_tower_cfg", "vision_tower")
    projector_dir = component("mm_projector_cfg", "mm_projector")

    sources = (
        folder_source(llm_dir, "language model"),
        folder_source(vision_dir, "vision tower"),
        folder_source(projector_dir, "projector"),
    )
    pre_path = vision_dir / "preprocessor_config.json"
    pre = read_json(pre_path) if pre_path.exists() else {}
    return config_from_dicts(
        top,
        *(s.config for s in sources),
        pre,
        root=root,
        sources=sources,  # type: ignore[arg-type]
    )


def folder_source(folder: Path, what: str) -> ComponentSource:
    """A component of the original layout: ``folder/config.json`` and the folder's safetensors."""
    return ComponentSource(what, component_files(folder), "", read_json(folder / "config.json"), folder)


def config_from_dicts(
    top: dict[str, Any],
    llm_cfg: dict[str, Any] | None = None,
    vision_cfg: dict[str, Any] | None = None,
    projector_cfg: dict[str, Any] | None = None,
    preprocessor: dict[str, Any] | None = None,
    *,
    root: Path = Path("."),
    sources: tuple[ComponentSource, ComponentSource, ComponentSource] | None = None,
) -> VilaConfig:
    """A :class:`VilaConfig` from config dicts alone (no files): used by :mod:`vila.meta` to check shapes of
    published configs. A component config left out is taken from the dict the top-level config embeds
    (``llm_cfg`` / ``vision_tower_cfg`` / ``mm_projector_cfg``, saved by the reference's ``LlavaConfig``; a
    single-folder config's ``text_config`` / ``vision_config``)."""
    check_model_type(top, root)
    single = is_single_folder(top)
    if single:
        top = single_folder_settings(top)
        nested = single_folder_components(top)
        llm_cfg, vision_cfg, projector_cfg = (
            given if given is not None else default
            for given, default in zip((llm_cfg, vision_cfg, projector_cfg), nested)
        )

    def embedded(given: dict[str, Any] | None, key: str) -> dict[str, Any]:
        if given is not None:
            return given
        value = top.get(key)
        if not isinstance(value, dict):
            raise CheckpointError(f"config.json: no {key} dict embedded and no {key[:-4]}/config.json given")
        return value

    llm_cfg = embedded(llm_cfg, "llm_cfg")
    vision_cfg = embedded(vision_cfg, "vision_tower_cfg")
    projector_cfg = embedded(projector_cfg, "mm_projector_cfg")
    pre = preprocessor or {}
    if sources is None:
        sources = (
            ComponentSource("language model", (), "", llm_cfg, root / "llm"),
            ComponentSource("vision tower", (), "", vision_cfg, root / "vision_tower"),
            ComponentSource("projector", (), "", projector_cfg, root / "mm_projector"),
        )
    model_type = str(top.get("model_type", ""))

    kind = vision_kind(vision_cfg, top)
    s2, dynamic_s2 = bool(top.get("s2")), bool(top.get("dynamic_s2"))
    scales = parse_scales(top.get("s2_scales"))
    if (s2 or dynamic_s2) and not scales:
        raise CheckpointError("config.json: s2/dynamic_s2 is set but s2_scales is missing")
    select_feature = top.get("mm_vision_select_feature") or "patch"
    if select_feature not in VISION_FEATURES:
        raise UnsupportedModelError(f"config.json: unknown mm_vision_select_feature {select_feature!r}")
    if top.get("mm_vision_select_layer") is None:
        raise CheckpointError("config.json: mm_vision_select_layer is missing; the checkpoint is incomplete")
    image_size = int(vision_cfg.get("image_size", 0) or 0)
    vision = VisionConfig(
        kind=kind,
        hidden_size=int(vision_cfg.get("hidden_size", 0) or 0),
        image_size=image_size,
        patch_size=int(vision_cfg.get("patch_size", 14) or 14),
        num_hidden_layers=int(vision_cfg.get("num_hidden_layers", 0) or 0),
        select_layer=int(top["mm_vision_select_layer"]),
        select_feature=select_feature,
        s2=s2,
        dynamic_s2=dynamic_s2,
        scales=scales,
        max_split_size=_int(top, "s2_max_split_size", 0),
        resize_output_to_scale_idx=_int(top, "s2_resize_output_to_scale_idx", 0),
        raw=vision_cfg,
    )

    # S2 towers see the largest scale, Dynamic-S2 tiles are the smallest scale: the reference's towers overwrite
    # the processor size at load, whatever preprocessor_config.json says.
    processor = ProcessorConfig.from_dict(pre, default_size=image_size)
    if dynamic_s2:
        processor = replace(processor, size=scales[0])
    elif s2:
        processor = replace(processor, size=scales[-1])

    projector_type = projector_cfg.get("mm_projector_type")
    if not projector_type:
        raise CheckpointError(f"{sources[2].folder}/config.json has no mm_projector_type")

    aspect = top.get("image_aspect_ratio")
    num_time_tokens = top.get("num_time_tokens")
    fps = top.get("fps")
    return VilaConfig(
        root=root,
        model_type=model_type,
        llm_source=sources[0],
        vision_source=sources[1],
        projector_source=sources[2],
        llm_model_type=str(llm_cfg.get("model_type", "")),
        llm_hidden_size=int(llm_cfg.get("hidden_size", 0) or 0),
        llm_vocab_size=int(llm_cfg.get("vocab_size", 0) or 0),
        vision=vision,
        processor=processor,
        projector_type=str(projector_type),
        image_aspect_ratio=aspect,
        min_tiles=_int(top, "min_tiles", 1),
        max_tiles=_int(top, "max_tiles", 12),
        video_max_tiles=_int(top, "video_max_tiles", 1),
        num_video_frames=_int(top, "num_video_frames", 8),
        fps=float(fps or 0.0),
        num_time_tokens=None if num_time_tokens is None else int(num_time_tokens),
        time_token_format=top.get("time_token_format"),
        image_encoder=EncoderConfig.parse(top.get("image_encoder"), "llava.model.encoders.BasicImageEncoder"),
        video_encoder=EncoderConfig.parse(top.get("video_encoder"), "llava.model.encoders.BasicVideoEncoder"),
        training_conv_version=top.get("version") if isinstance(top.get("version"), str) else None,
        name_or_path=str(top.get("_name_or_path") or ""),
        top_down=TopDownConfig.parse(top) if kind == "ps3" or "topdown" in model_type else None,
        layout="hf" if single else "original",
        media_token_ids={"image": int(top["image_token_id"]), "video": int(top["video_token_id"])} if single else None,
        chat_template=top.get("chat_template") if isinstance(top.get("chat_template"), str) else None,
    )
