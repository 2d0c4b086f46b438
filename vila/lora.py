"""LoRA adapters trained with VILA (``--lora_enable``), applied through ``peft``, as the reference's
``load_pretrained_model`` (NVlabs/VILA ``llava/model/builder.py``) does.

A VILA adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or ``.bin``), with tensor
names of the reference's whole model: ``base_model.model.llm.model.layers.0.self_attn.q_proj.lora_A.weight``,
``base_model.model.vision_tower.vision_tower.vision_model.encoder.layers.0...`` and ``...mm_projector.layers.2...``.
Training may also leave ``non_lora_trainables.bin``: full weights of the parts trained without LoRA (usually the
projector), with the same names. Names are mapped once to this library's three modules, adapters are injected
per module with ``peft.inject_adapter_in_model``, and by default merged into the weights (as the reference's
``merge_and_unload``), so inference runs at the base model's speed.

A plain LLM adapter (names ``base_model.model.model.layers...``) applies to the LLM.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, UnsupportedModelError, UsageError
from .families import tower_family

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
NON_LORA = ("non_lora_trainables.safetensors", "non_lora_trainables.bin")
_LORA_KEY = re.compile(r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)(\.|$)")


def _require_peft() -> Any:
    try:
        import peft
    except ImportError as e:
        raise UsageError("LoRA adapters need the peft package: pip install 'vila[lora]'") from e
    return peft


def resolve_adapter(path_or_id: str | os.PathLike, revision: str | None = None, cache_dir: str | None = None) -> Path:
    """A local adapter folder, or a hub repo downloaded the same way as checkpoints (code never fetched)."""
    from .checkpoint import download, looks_like_hub_id

    name = os.fspath(path_or_id)
    local = Path(name).expanduser()
    if not local.exists():
        if not looks_like_hub_id(name):
            raise CheckpointError(f"LoRA adapter not found: {name}; pass a folder with {ADAPTER_CONFIG} or a hub id")
        local = download(name, revision=revision, cache_dir=cache_dir)
    if not (local / ADAPTER_CONFIG).is_file():
        raise CheckpointError(f"{local} is not a LoRA adapter (no {ADAPTER_CONFIG}); pass the folder peft saved")
    return local


def _load_tensors(folder: Path, stems: tuple[str, ...]) -> dict[str, torch.Tensor] | None:
    """The first of ``stems`` present: safetensors, or a pickle read with ``weights_only=True`` (never code)."""
    from safetensors.torch import load_file

    for stem in stems:
        path = folder / stem
        if not path.is_file():
            continue
        try:
            if path.suffix == ".safetensors":
                return load_file(path)
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is one clear error
            raise CheckpointError(f"cannot read {path}: {e}") from e
    return None


def _strip_peft_prefix(key: str) -> str:
    # PeftModel saves names under base_model.model.; non_lora_trainables drop 'base_model.' (and a 'model.'
    # when names start with 'model.model.'), as the reference's `load_pretrained_model` strips them.
    for prefix in ("base_model.model.", "base_model."):
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


class _NameMap:
    """Reference whole-model names -> (component, name inside this library's module); ``None`` = not run here."""

    def __init__(self, model: Any):
        self.model = model
        self.tower_family = tower_family(model.config.vision.kind)

    def __call__(self, name: str) -> tuple[str, str] | None:
        if name.startswith("llm."):
            return "llm", name[4:]
        if name.startswith("mm_projector."):
            return "mm_projector", name[len("mm_projector.") :]
        if name.startswith("vision_tower.vision_tower."):
            return self._tower(name[len("vision_tower.vision_tower.") :])
        if name.startswith(("vision_tower.", "vision_resampler.")):
            raise CheckpointError(f"LoRA/adapter tensor {name!r} names a module this library does not have")
        return "llm", name  # an adapter of the bare LLM

    def _tower(self, name: str) -> tuple[str, str] | None:
        mapped = self.tower_family.lora_name(self.model.vision_tower, name)
        return None if mapped is None else ("vision_tower", mapped)


def _split(tensors: dict[str, torch.Tensor], names: _NameMap) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        target = names(_strip_peft_prefix(key))
        if target is not None:
            out.setdefault(target[0], {})[target[1]] = value
    return out


def _module_of(key: str) -> str:
    return key[: _LORA_KEY.search(key).start()]


def apply_lora(model: Any, path_or_id: str | os.PathLike, *, merge: bool = True, **hub: Any) -> Any:
    """Apply a LoRA adapter (and any ``non_lora_trainables``) to a loaded :class:`~vila.model.vila.VilaModel`.

    ``merge=True`` folds the adapter into the weights; ``merge=False`` keeps peft's LoRA layers (needed on top of
    8-/4-bit weights). Returns the same model object.
    """
    peft = _require_peft()
    folder = resolve_adapter(path_or_id, **hub)
    with open(folder / ADAPTER_CONFIG, encoding="utf-8") as f:
        raw = json.load(f)
    if str(raw.get("peft_type", "LORA")).upper() != "LORA":
        raise UnsupportedModelError(f"{folder}: adapter type {raw.get('peft_type')!r} is not supported; only LoRA")
    tensors = _load_tensors(folder, ("adapter_model.safetensors", "adapter_model.bin"))
    if tensors is None:
        raise CheckpointError(f"{folder} has no adapter_model.safetensors or adapter_model.bin; re-download it")
    names = _NameMap(model)
    modules = {"llm": model.llm, "vision_tower": model.vision_tower, "mm_projector": model.mm_projector}

    # The reference strips only 'base_model.' from these names, so for VILA's model class it silently loads none
    # of them (strict=False); the weights were trained to be used, so they are loaded here.
    extra = _load_tensors(folder, NON_LORA) or {}
    full = {k: v for k, v in tensors.items() if not _LORA_KEY.search(k)}  # bias="all", modules_to_save
    for component, state in _split({**extra, **full}, names).items():
        _load_full_weights(modules[component], state, component, folder)

    lora = {k: v for k, v in tensors.items() if _LORA_KEY.search(k)}
    if not lora:
        raise CheckpointError(f"{folder}: the adapter holds no LoRA tensors")
    # Targets are the exact modules the tensors name (mapped to this library's modules), nothing else.
    drop = ("target_modules", "layers_to_transform", "inference_mode", "modules_to_save", "exclude_modules")
    drop += ("target_parameters", "trainable_token_indices", "peft_type", "task_type", "base_model_name_or_path")
    fields = {k: v for k, v in raw.items() if k in peft.LoraConfig.__dataclass_fields__ and k not in drop}
    fields["lora_dropout"] = 0.0  # inference only
    for component, state in _split(lora, names).items():
        module = modules[component]
        targets = sorted({_module_of(k) for k in state})
        existing = dict(module.named_modules())
        missing = [t for t in targets if t not in existing]
        if missing:
            raise CheckpointError(
                f"{folder}: LoRA targets {missing[:3]} do not exist in the {component}; the adapter was trained "
                "for a different base model (check --model-path)"
            )
        for pattern in ("rank_pattern", "alpha_pattern"):
            if raw.get(pattern):
                fields[pattern] = _patterns_for(raw[pattern], component, names)
        config = peft.LoraConfig(
            **fields, target_modules="(?:" + "|".join(map(re.escape, targets)) + ")", inference_mode=True
        )
        peft.inject_adapter_in_model(config, module)
        try:
            result = peft.set_peft_model_state_dict(module, state)
        except RuntimeError as e:  # size mismatch
            raise CheckpointError(
                f"{folder}: adapter tensors do not fit the {component}: {str(e).splitlines()[-1].strip()}"
            ) from e
        if result.unexpected_keys or any(_LORA_KEY.search(k) for k in result.missing_keys):
            bad = result.unexpected_keys or [k for k in result.missing_keys if _LORA_KEY.search(k)]
            raise CheckpointError(f"{folder}: adapter tensors do not fit the {component} (e.g. {bad[0]})")
        module.requires_grad_(False).eval()  # new LoRA dropout layers start in training mode
        if merge:
            _merge_and_unload(module)
        logger.info(
            "LoRA: %d modules of the %s adapted (%s)", len(targets), component, "merged" if merge else "unmerged"
        )
    return model


def _patterns_for(patterns: dict[str, Any], component: str, names: _NameMap) -> dict[str, Any]:
    """``rank_pattern`` / ``alpha_pattern`` keys are names in the reference model (or bare suffixes such as
    ``q_proj``): keep those of ``component``, renamed."""
    out = {}
    for key, value in patterns.items():
        if "." not in key:
            out[key] = value
            continue
        target = names(key)
        if target is not None and target[0] == component:
            out[target[1]] = value
    return out


def _load_full_weights(module: nn.Module, state: dict[str, torch.Tensor], component: str, folder: Path) -> None:
    own = module.state_dict()
    bad = [k for k in state if k not in own or own[k].shape != state[k].shape]
    if bad:
        raise CheckpointError(f"{folder}: non-LoRA weight {bad[0]!r} does not fit the {component} of this base model")
    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(value.to(own[key].dtype))


def _merge_and_unload(module: nn.Module) -> None:
    """Fold every LoRA layer into its base weight and put the plain base layer back in its place."""
    from peft.tuners.lora import LoraLayer

    for name, sub in list(module.named_modules()):
        if isinstance(sub, LoraLayer):
            sub.merge()
            parent_name, _, child = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, child, sub.get_base_layer())
    if hasattr(module, "peft_config"):
        del module.peft_config
