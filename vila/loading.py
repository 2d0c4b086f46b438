"""``vila.load``: path or hub id -> a ready :class:`~vila.model.vila.VilaModel`."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .checkpoint import LOAD_PROGRESS, ComponentSource, assign_weights, resolve_checkpoint
from .config import ASPECT_RATIO_MODES, VilaConfig, parse_config
from .device import plan_placement, resolve_dtype
from .errors import CheckpointError, UnsupportedModelError, UsageError
from .families import tower_family
from .model.llm import load_llm
from .model.projector import MultimodalProjector
from .model.vila import VilaModel
from .model.vision import build_tower
from .prompt import detect_conv_mode, get_template
from .tokenizer import load_tokenizer

logger = logging.getLogger(__name__)
# Loading takes seconds from here on (an 8B checkpoint is ~16 GB); smaller ones get no progress bar.
BIG_CHECKPOINT_BYTES = 1 << 30


def load(
    path_or_id: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    device_map: Any = None,
    conv_mode: str = "auto",
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    lora: str | os.PathLike | None = None,
    quantization: Any = None,
    devices: str | list[int] | None = None,
    max_memory: Any = None,
    compile: bool | str = "auto",
) -> VilaModel:
    """Load a VILA / NVILA checkpoint from a local folder or a Hugging Face hub id.

    ``device`` defaults to CUDA, then Apple MPS, then CPU; ``dtype`` to bf16 (fp16 where bf16 is not
    supported) on CUDA, fp16 on MPS and fp32 on CPU. ``device_map="auto"`` shards the LLM over all GPUs
    (vision tower and projector stay on the first). ``conv_mode="auto"`` picks the template the checkpoint
    was trained with; pass a name (``vicuna_v1``, ``llama_3``, ``hermes-2``, ``plain``) to override it.

    ``devices=[0, 1]`` shards the LLM over those GPUs (the reference's shortcut for ``device_map="auto"`` with
    their full memory); ``max_memory={0: "20GiB", 1: "20GiB"}`` caps each. ``quantization="8bit"`` / ``"4bit"``
    (or a ``BitsAndBytesConfig``) loads the LLM through bitsandbytes (CUDA only); tower and projector stay 16-bit.
    ``lora=`` a peft LoRA adapter folder or hub id trained on this base model: merged into the weights (kept
    unmerged on top of 8-/4-bit weights).

    ``compile`` sets how answers are decoded (``model.compile_mode``): ``"auto"`` (default) a static KV cache and
    a ``torch.compile``-d one-token step replayed as CUDA graphs on CUDA, the eager dynamic cache on CPU and MPS;
    ``True`` the compiled path everywhere; ``False`` always eager. Greedy tokens are the same either way. The
    first request of each new shape (cache of 256 positions more, or a batch past the next power of two)
    compiles and records its graph.
    """
    from .engine import compile_mode

    mode = compile_mode(compile)  # fail fast on a typo, before minutes of loading
    if conv_mode != "auto":
        get_template(conv_mode)  # fail fast on a typo, before minutes of loading
    root = resolve_checkpoint(path_or_id, revision=revision, cache_dir=cache_dir)
    cfg = parse_config(root)
    if cfg.image_aspect_ratio not in ASPECT_RATIO_MODES:
        raise UnsupportedModelError(
            f"config.json: unknown image_aspect_ratio {cfg.image_aspect_ratio!r}; supported: resize, pad, dynamic, dynamic_s2"
        )
    tower_family(cfg.vision.kind).check(cfg)
    if not cfg.llm_source.files:
        raise UnsupportedModelError(
            f"{cfg.llm_source.folder} holds no safetensors weights: AWQ / TinyChat checkpoints (*-AWQ, quantised .pt files) and "
            "pickled .bin weights are not supported; use the original checkpoint (e.g. without the -AWQ suffix)"
        )

    dev, llm_map, memory = plan_placement(device, device_map, devices, max_memory)
    if llm_map != {"": dev}:
        logger.debug("LLM device_map %s, max_memory %s; vision tower and projector on %s", llm_map, memory, dev)
    dt = resolve_dtype(dtype, dev)
    extra: dict[str, Any] = {} if memory is None else {"max_memory": memory}
    if quantization is not None:
        from .quantization import check_runtime, quantization_config

        if dtype is None and dt == torch.float32:
            dt = torch.float16  # the reference's dtype for the 16-bit vision side
            logger.debug("dtype float16 for the vision side: the LLM is quantised (%s)", quantization)
        extra["quantization_config"] = quantization_config(quantization, dt)  # validates before the runtime check
        check_runtime(dev, dt)

    if conv_mode != "auto":
        logger.debug("template %s: given by conv_mode (--conv-mode)", conv_mode)
    name = Path(os.fspath(path_or_id).rstrip("/\\")).name or os.fspath(path_or_id)
    with quiet_load(cfg, name):
        tokenizer = load_tokenizer(cfg.llm_source.folder)
        check_media_token_ids(cfg, tokenizer)
        remote_template, remote_mode = remote_chat_template(cfg) if conv_mode == "auto" else (None, None)
        if remote_template is not None:
            tokenizer.chat_template = remote_template  # rendered by transformers' sandboxed Jinja, as any chat template
            logger.debug("template: the checkpoint's Jinja chat template, named by config.json chat_template")
        elif remote_mode is not None:
            conv_mode = remote_mode
            logger.debug("template %s: named by config.json chat_template", conv_mode)
        elif conv_mode == "auto":
            vocab = tokenizer.get_vocab()
            conv_mode = detect_conv_mode(
                os.fspath(path_or_id),
                has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
                vocab_markers=frozenset(t for t in ("<|eot_id|>", "<|im_start|>") if t in vocab),
                training_version=cfg.training_conv_version,
            )
        llm = load_llm(cfg.llm_source, dt, llm_map, extra)
        first = llm.get_input_embeddings().weight.device
        if first.type == "meta":  # embeddings offloaded to disk by accelerate: keep the vision side on the device
            first = dev
        if cfg.top_down is not None:  # VILA-HD: PS3 tower + top-down projector
            from .model.vila_hd import load_vila_hd

            model = load_vila_hd(cfg, tokenizer, llm, dt, first, conv_mode)
        else:
            tower = build_tower(cfg.vision, cfg.vision_source, dt, first).eval()
            projector = load_projector(cfg, cfg.projector_source, dt, first)
            model = VilaModel(cfg, tokenizer, llm, tower, projector, conv_mode)
        if lora is not None:
            from .lora import apply_lora

            apply_lora(model, lora, merge=quantization is None, revision=None, cache_dir=cache_dir)
        model.compile_mode = mode
        return model


def checkpoint_files(cfg: VilaConfig) -> list[Path]:
    """The safetensors files the components load from."""
    sources = (cfg.llm_source, cfg.vision_source, cfg.projector_source)
    return sorted({f for s in sources for f in s.files if f.exists()})


def load_projector(
    cfg: VilaConfig, source: ComponentSource | None, dtype: torch.dtype, device: torch.device
) -> MultimodalProjector:
    """Built on the meta device, weights assigned straight from safetensors (no random init)."""
    with torch.device("meta"):
        projector = MultimodalProjector(cfg.projector_type, cfg.vision.mm_hidden_size, cfg.llm_hidden_size)
    if source is None:
        return projector
    hint = (
        f" (type {cfg.projector_type!r}, mm_hidden_size {cfg.vision.mm_hidden_size}, LLM hidden {cfg.llm_hidden_size})"
    )
    return assign_weights(projector, source, dtype=dtype, device=device, hint=hint)


def check_media_token_ids(cfg: VilaConfig, tokenizer: Any) -> None:
    """A single-folder checkpoint names the ids of its media tokens; they must be the tokenizer's, or the
    media embeddings would be spliced at the wrong positions."""
    if cfg.media_token_ids is None:
        return
    for kind, token in (("image", "<image>"), ("video", "<vila/video>")):
        ours = tokenizer.convert_tokens_to_ids(token)
        if ours != cfg.media_token_ids[kind]:
            raise CheckpointError(
                f"config.json: {kind}_token_id is {cfg.media_token_ids[kind]} but the tokenizer gives {token} id "
                f"{ours}; the checkpoint's config and tokenizer do not belong together"
            )


def _tensor_count(path: Path) -> int:
    """Tensors in a safetensors file, from its JSON header (the first 8 bytes give its length)."""
    try:
        with open(path, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    except (OSError, ValueError):
        return 0
    return sum(key != "__metadata__" for key in header)


class _Advance:
    """Stands in for one of transformers' "Loading weights" bars: iterating it advances ours (``bar``), if any."""

    def __init__(self, bar: Any, iterable: Any = None):
        self.bar, self.iterable = bar, iterable

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable:
            yield item
            if self.bar is not None:
                self.bar.update(1)

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def __enter__(self) -> _Advance:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def quiet_load(cfg: VilaConfig, name: str) -> Iterator[None]:
    """Keep stderr clean while the weights load.

    transformers draws a "Loading weights" bar per ``from_pretrained`` (LLM and vision tower: two per load, also
    in a log file, where each becomes one long line of carriage returns) and logs advice meant for its own API.
    Both stay off here (``--debug`` keeps transformers' log). A big checkpoint loading in a terminal gets one bar
    instead, counting the tensors loaded (our loaders report each one; transformers' bars are redirected to it); it is erased when done, so the answer starts on a clean line.
    """
    from transformers.utils import logging as hf_logging

    bar = None
    files = checkpoint_files(cfg) if sys.stderr.isatty() else []  # no bar off a terminal: nothing to look at
    if sum(os.stat(f).st_size for f in files) > BIG_CHECKPOINT_BYTES:
        from tqdm import tqdm

        total = sum(_tensor_count(f) for f in files) or None
        bar = tqdm(total=total, desc=f"Loading {name}", unit=" tensors", file=sys.stderr, leave=False)
    verbosity = hf_logging.get_verbosity()
    if not logger.isEnabledFor(logging.DEBUG):
        hf_logging.set_verbosity_error()
    set_hook = getattr(hf_logging, "set_tqdm_hook", None)  # transformers >= 5.x
    bars_were_on = hf_logging.is_progress_bar_enabled()
    if set_hook is not None:
        previous = set_hook(lambda factory, args, kwargs: _Advance(bar, args[0] if args else kwargs.get("iterable")))
    else:
        hf_logging.disable_progress_bar()
    # Our own loaders (assign_weights) report each tensor; transformers' bars (8-/4-bit, several devices) above.
    token = LOAD_PROGRESS.set(bar.update if bar is not None else None)
    try:
        yield
    finally:
        LOAD_PROGRESS.reset(token)
        if set_hook is not None:
            set_hook(previous)
        elif bars_were_on:
            hf_logging.enable_progress_bar()
        hf_logging.set_verbosity(verbosity)
        if bar is not None:
            bar.close()


def remote_chat_template(cfg: VilaConfig) -> tuple[str | None, str | None]:
    """``(jinja text, conv mode)`` named by a remote-code (``-hf-preview``, model_type ``vila``) config.

    Converted VILA1.5 checkpoints store a conv-mode name in ``config.json`` ``chat_template`` and the Jinja file
    ``<root>/<name>.jinja``, which the remote code installs after removing every 4-space run and newline
    (``build_llm_and_tokenizer``, NVlabs/VILA ``llava/remote_code/builder.py``; its output differs slightly from
    the legacy template, e.g. a double space after ``USER:``, and is reproduced). Only the Jinja text is used;
    the shipped ``.py`` files are never read. Without the file, a known conv-mode name selects that legacy
    template.
    """
    if cfg.model_type != "vila":
        return None, None
    name = cfg.chat_template
    if not name:
        return None, None
    path = cfg.root / f"{name}.jinja"
    if path.is_file():
        return path.read_text(encoding="utf-8").replace("    ", "").replace("\n", ""), None
    try:
        return None, get_template(name).name
    except UsageError as e:
        raise UnsupportedModelError(
            f"config.json names chat_template {name!r} but {path.name} is missing; re-download the checkpoint "
            "or pass conv_mode (--conv-mode)"
        ) from e
