"""``vila.load``: path or hub id -> a ready :class:`~vila.model.vila.VilaModel`."""

from __future__ import annotations

import os
from typing import Any

import torch

from .checkpoint import resolve_checkpoint
from .config import ASPECT_RATIO_MODES, parse_config
from .device import resolve_device, resolve_dtype
from .errors import UnsupportedModelError, UsageError
from .model.vila import VilaModel, load_llm, load_projector
from .model.vision import build_tower
from .prompt import detect_conv_mode, get_template
from .tokenizer import load_tokenizer


def load(
    path_or_id: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    device_map: Any = None,
    conv_mode: str = "auto",
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> VilaModel:
    """Load a VILA / NVILA checkpoint from a local folder or a Hugging Face hub id.

    ``device`` defaults to CUDA, then Apple MPS, then CPU; ``dtype`` to bf16 (fp16 where bf16 is not
    supported) on CUDA, fp16 on MPS and fp32 on CPU. ``device_map="auto"`` shards the LLM over all GPUs
    (vision tower and projector stay on the first). ``conv_mode="auto"`` picks the template the checkpoint
    was trained with; pass a name (``vicuna_v1``, ``llama_3``, ``hermes-2``, ``plain``) to override it.
    """
    if conv_mode != "auto":
        get_template(conv_mode)  # fail fast on a typo, before minutes of loading
    root = resolve_checkpoint(path_or_id, revision=revision, cache_dir=cache_dir)
    cfg = parse_config(root)
    if cfg.image_aspect_ratio not in ASPECT_RATIO_MODES:
        raise UnsupportedModelError(
            f"config.json: unknown image_aspect_ratio {cfg.image_aspect_ratio!r}; supported: resize, pad, dynamic, dynamic_s2"
        )
    if cfg.image_aspect_ratio == "pad" and cfg.processor.kind == "intern":
        raise UnsupportedModelError("image_aspect_ratio 'pad' cannot be used with the InternViT tower (it has no image mean)")

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if device_map is not None and device is not None:
        raise UsageError("pass either device or device_map, not both")

    tokenizer = load_tokenizer(cfg.llm_dir)
    if conv_mode == "auto":
        vocab = tokenizer.get_vocab()
        conv_mode = detect_conv_mode(
            os.fspath(path_or_id),
            has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
            vocab_markers=frozenset(t for t in ("<|eot_id|>", "<|im_start|>") if t in vocab),
            training_version=cfg.training_conv_version,
        )
    llm = load_llm(cfg, dt, device_map if device_map is not None else {"": dev})
    first = llm.get_input_embeddings().weight.device
    if cfg.top_down is not None:  # VILA-HD: PS3 tower + top-down projector (spec vila_hd.md)
        from .model.vila_hd import load_vila_hd

        return load_vila_hd(cfg, tokenizer, llm, dt, first, conv_mode)
    tower = build_tower(cfg.vision, cfg.vision_dir, dt, first).eval()
    projector = load_projector(cfg, cfg.projector_dir, dt, first)
    return VilaModel(cfg, tokenizer, llm, tower, projector, conv_mode)
