"""Convert an NVILA / NVILA-Lite checkpoint between its two layouts.

* original: ``config.json`` plus ``llm/``, ``vision_tower/``, ``mm_projector/``, each with its config and weights;
* single-folder (``-hf``, e.g. Efficient-Large-Model/NVILA-8B-hf): one ``config.json`` with ``text_config`` and
  ``vision_config`` nested, one weight set whose names start with ``llm.``, ``vision_tower.``, ``mm_projector.``,
  and the tokenizer next to it.

The direction follows SRC's layout; ``--to hf|original`` forces it. Tensors are copied as stored (same dtype), one
at a time; the written checkpoint is parsed back and must give the same settings as SRC.

    python scripts/convert_checkpoint.py Efficient-Large-Model/NVILA-Lite-2B ./NVILA-Lite-2B-hf
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from vila.checkpoint import ComponentSource, close_all, open_safetensors, resolve_checkpoint
from vila.config import SINGLE_FOLDER_COMMON, SINGLE_FOLDER_FAMILIES, VilaConfig, parse_config
from vila.errors import UsageError, VilaError
from vila.prompt import IMAGE_TOKEN, VIDEO_TOKEN
from vila.tokenizer import load_tokenizer

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
ARCHITECTURES = {"nvila": "NVILAForConditionalGeneration", "nvila_lite": "NVILALiteForConditionalGeneration"}
# Settings a single-folder config may carry as flat keys when they differ from the family's (see vila.config).
FLAT_SETTINGS = (
    "min_tiles",
    "max_tiles",
    "video_max_tiles",
    "num_video_frames",
    "fps",
    "num_time_tokens",
    "time_token_format",
)
DEFAULTS = {
    "min_tiles": 1,
    "max_tiles": 12,
    "video_max_tiles": 1,
    "num_video_frames": 8,
    "fps": 0.0,
    "num_time_tokens": None,
    "time_token_format": None,
}
# Fields that name where things are, not how the model runs: they differ between layouts by design.
LAYOUT_FIELDS = {
    "root",
    "model_type",
    "llm_source",
    "vision_source",
    "projector_source",
    "layout",
    "media_token_ids",
    "name_or_path",
    "training_conv_version",
    "chat_template",
}


def family_of(cfg: VilaConfig) -> str:
    """The single-folder family whose fixed settings this checkpoint has."""
    for family, settings in SINGLE_FOLDER_FAMILIES.items():
        if (
            cfg.vision.kind == "siglip"
            and cfg.projector_type == settings["mm_projector_type"]
            and cfg.image_aspect_ratio == settings["image_aspect_ratio"]
        ):
            return family
    raise UsageError(
        f"only NVILA (dynamic_s2, mlp_downsample) and NVILA-Lite (dynamic, mlp_downsample_3x3_fix) checkpoints have a "
        f"single-folder layout; this one is {cfg.image_aspect_ratio} with {cfg.projector_type}"
    )


# Bytes per element of the safetensors dtypes, to plan shards from the headers before reading any tensor.
ELEMENT_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}


def copy_tensors(sources: list[tuple[ComponentSource, str]], dst: Path, shard_bytes: int, drop: set[str]) -> None:
    """Write the sources' tensors (renamed: prefix removed, the new one added) into ``dst`` as safetensors shards.
    Shards are planned from the files' headers first, then written one at a time, so memory holds one shard."""
    from safetensors.torch import save_file

    opened = [(open_safetensors(source), new_prefix) for source, new_prefix in sources]
    try:
        shards: list[list[tuple[str, Any]]] = [[]]  # (new name, lazy slice) per shard
        sizes = [0]
        for (state, _), new_prefix in opened:
            for key in sorted(state):
                name = new_prefix + key
                if name in drop:
                    continue
                lazy = state[key]
                count = 1
                for d in lazy.get_shape():
                    count *= d
                nbytes = count * ELEMENT_BYTES.get(lazy.get_dtype(), 1)
                if shards[-1] and sizes[-1] + nbytes > shard_bytes:
                    shards.append([])
                    sizes.append(0)
                shards[-1].append((name, lazy))
                sizes[-1] += nbytes
        dst.mkdir(parents=True, exist_ok=True)
        names = (
            ["model.safetensors"]
            if len(shards) == 1
            else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
        )
        weight_map = {}
        for shard, file_name in zip(shards, names):
            save_file(
                {name: lazy[...].contiguous() for name, lazy in shard}, dst / file_name, metadata={"format": "pt"}
            )
            weight_map.update(dict.fromkeys((name for name, _ in shard), file_name))
    finally:
        for (_, handles), _ in opened:
            close_all(handles)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": dict(sorted(weight_map.items()))}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def copy_files(src: Path, dst: Path, names: tuple[str, ...]) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def to_single_folder(cfg: VilaConfig, dst: Path, shard_bytes: int) -> None:
    family = family_of(cfg)
    tokenizer = load_tokenizer(cfg.llm_source.folder)
    text = dict(cfg.llm_source.config)
    top: dict[str, Any] = {
        "architectures": [ARCHITECTURES[family]],
        "model_type": family,
        "text_config": text,
        "vision_config": dict(cfg.vision_source.config),
        "image_token_id": tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        "video_token_id": tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
    }
    top.update({k: getattr(cfg, k) for k in FLAT_SETTINGS if getattr(cfg, k) != DEFAULTS[k]})
    write_json(dst / "config.json", top)
    copy_files(cfg.llm_source.folder, dst, TOKENIZER_FILES)
    copy_files(cfg.vision_source.folder, dst, ("preprocessor_config.json",))
    tied = bool(text.get("tie_word_embeddings"))
    parts = [(cfg.llm_source, "llm."), (cfg.vision_source, "vision_tower."), (cfg.projector_source, "mm_projector.")]
    copy_tensors(parts, dst, shard_bytes, drop={"llm.lm_head.weight"} if tied else set())


def to_original(cfg: VilaConfig, dst: Path, shard_bytes: int) -> None:
    family = family_of(cfg)
    settings = {**SINGLE_FOLDER_COMMON, **SINGLE_FOLDER_FAMILIES[family]}
    projector = {
        "architectures": ["MultimodalProjector"],
        "mm_projector_type": cfg.projector_type,
        "model_type": "v2l_projector",
    }
    top: dict[str, Any] = {
        "architectures": ["LlavaLlamaModel"],
        "model_type": "llava_llama",
        **{k: v for k, v in settings.items() if k != "mm_projector_type"},
        "s2": False,
        "dynamic_s2": cfg.vision.dynamic_s2,
        "mm_vision_select_layer": cfg.vision.select_layer,
        "mm_vision_select_feature": cfg.vision.select_feature,
        "mm_hidden_size": cfg.vision.mm_hidden_size,
        "hidden_size": cfg.llm_hidden_size,
        **{k: getattr(cfg, k) for k in FLAT_SETTINGS},
        "llm_cfg": dict(cfg.llm_source.config),
        "vision_tower_cfg": dict(cfg.vision_source.config),
        "mm_projector_cfg": projector,
    }
    write_json(dst / "config.json", top)
    write_json(dst / "llm" / "config.json", dict(cfg.llm_source.config))
    write_json(dst / "vision_tower" / "config.json", dict(cfg.vision_source.config))
    write_json(dst / "mm_projector" / "config.json", projector)
    copy_files(cfg.root, dst / "llm", TOKENIZER_FILES)
    copy_files(cfg.root, dst / "vision_tower", ("preprocessor_config.json",))
    copy_tensors([(cfg.llm_source, "")], dst / "llm", shard_bytes, set())
    copy_tensors([(cfg.vision_source, "")], dst / "vision_tower", shard_bytes, set())
    copy_tensors([(cfg.projector_source, "")], dst / "mm_projector", shard_bytes, set())


def differences(a: VilaConfig, b: VilaConfig) -> list[str]:
    """The settings in which two parsed checkpoints differ (where their files are aside)."""

    def settings(cfg: VilaConfig, name: str) -> Any:
        value = getattr(cfg, name)
        if name == "vision" and not (value.s2 or value.dynamic_s2):
            # S2 scales are stored but unused without S2 / Dynamic-S2.
            value = dataclasses.replace(value, scales=(), max_split_size=0, resize_output_to_scale_idx=0)
        return value

    return [
        f.name
        for f in dataclasses.fields(VilaConfig)
        if f.name not in LAYOUT_FIELDS and settings(a, f.name) != settings(b, f.name)
    ]


def convert(src: str | Path, dst: str | Path, to: str | None = None, shard_gb: float = 5.0) -> Path:
    """Write SRC in the other layout (or ``to``) at DST; returns DST."""
    cfg = parse_config(resolve_checkpoint(src))
    target = to or ("original" if cfg.layout == "hf" else "hf")
    if target not in ("hf", "original"):
        raise UsageError(f"--to must be hf or original, got {target!r}")
    if target == cfg.layout:
        raise UsageError(f"{src} is already in the {target} layout; pass --to to pick the other one")
    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise UsageError(f"{dst} exists and is not empty; pass a new folder")
    shard_bytes = int(shard_gb * (1 << 30))
    (to_single_folder if target == "hf" else to_original)(cfg, dst, shard_bytes)
    diff = differences(cfg, parse_config(dst))
    if diff:
        raise UsageError(
            f"the converted checkpoint would run differently ({', '.join(diff)}); this checkpoint's settings have no "
            f"place in the {target} layout"
        )
    return dst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="checkpoint folder or hub id")
    ap.add_argument("dst", help="new folder to write")
    ap.add_argument("--to", choices=("hf", "original"), help="target layout (default: the other one)")
    ap.add_argument("--shard-gb", type=float, default=5.0, help="largest weight file in GB (default 5)")
    args = ap.parse_args(argv)
    try:
        out = convert(args.src, args.dst, args.to, args.shard_gb)
    except VilaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
