"""Model path or Hugging Face hub id -> a local checkpoint folder, resolved as the reference's
``llava.load`` does (NVlabs/VILA ``llava/entry.py``).

Nothing downloaded is executed: ``*.py`` files are never fetched, and weights are read from safetensors.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointError

# Files a training run leaves next to the weights that inference never reads (some are hundreds of MB),
# plus code (never executed here) and pickled weights (the released checkpoints ship safetensors).
IGNORE_PATTERNS = [
    "trainer_state.json",
    "training_args.bin",
    "optimizer*",
    "scheduler*",
    "rng_state*",
    "global_step*",
    "*.pt",
    "*.pth",
    "*.bin",
    "*.py",
    "*.ipynb",
]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and not name.startswith((".", "/", "~"))


def resolve_checkpoint(
    path_or_id: str | os.PathLike, *, revision: str | None = None, cache_dir: str | os.PathLike | None = None
) -> Path:
    """A local folder holding ``config.json``: the path itself, its ``model/`` subfolder, or a hub snapshot."""
    name = os.fspath(path_or_id)
    local = Path(name).expanduser()
    if local.exists():
        return _checkpoint_root(local)
    if not looks_like_hub_id(name):
        raise CheckpointError(
            f"model path not found: {name}; pass an existing folder or a hub id like Efficient-Large-Model/NVILA-8B"
        )
    return _checkpoint_root(download(name, revision=revision, cache_dir=cache_dir))


def _checkpoint_root(path: Path) -> Path:
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file; pass the checkpoint folder that holds config.json")
    # Training output directories nest everything under model/, and the reference's `load` looks there first.
    if (path / "model").is_dir():
        path = path / "model"
    if not (path / "config.json").exists():
        raise CheckpointError(
            f"{path} is not a VILA checkpoint (no config.json); pass the folder with config.json, llm/, vision_tower/, mm_projector/"
        )
    return path


def download(repo_id: str, *, revision: str | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """``snapshot_download`` with the hub's progress bars, the cache and ``HF_HUB_OFFLINE`` honoured."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, ignore_patterns=IGNORE_PATTERNS)
    except GatedRepoError as e:
        raise CheckpointError(
            f"{repo_id} is gated: accept its licence on huggingface.co, then log in (`hf auth login`) or set HF_TOKEN"
        ) from e
    except RepositoryNotFoundError as e:
        raise CheckpointError(
            f"model {repo_id!r} not found on the Hugging Face Hub (or it is private); check the id, e.g. Efficient-Large-Model/NVILA-8B"
        ) from e
    except RevisionNotFoundError as e:
        raise CheckpointError(
            f"revision {revision!r} does not exist for {repo_id}; check the branch, tag or commit"
        ) from e
    except LocalEntryNotFoundError as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        why = "offline mode is on (HF_HUB_OFFLINE)" if offline else "the Hub cannot be reached"
        raise CheckpointError(
            f"{repo_id} is not in the local cache and {why}; download it once with network access, or pass a local folder"
        ) from e
    except (HfHubHTTPError, OSError) as e:
        raise CheckpointError(f"cannot download {repo_id}: {e}; check your network or pass a local folder") from e
    return Path(folder)


@dataclass(frozen=True)
class ComponentSource:
    """Where one component (LLM, vision tower or projector) of a checkpoint lives, whatever the layout.

    ``files`` are the safetensors files holding its tensors, whose names there start with ``prefix`` (``""`` in
    the original three-folder layout, ``"llm."`` / ``"vision_tower."`` / ``"mm_projector."`` in the single-folder
    ``-hf`` one); ``config`` is its config dict and ``folder`` holds its side files (tokenizer, chat template,
    preprocessor and generation configs). Loaders take a source, so every layout loads through one path.
    """

    what: str  # "language model" | "vision tower" | "projector": names it in errors
    files: tuple[Path, ...]
    prefix: str
    config: dict[str, Any] = field(compare=False, repr=False, hash=False)
    folder: Path

    def weight_files(self) -> tuple[Path, ...]:
        """``files``, checked: at least one, none missing."""
        if not self.files:
            raise CheckpointError(
                f"no safetensors weights for the {self.what} in {self.folder}; the checkpoint is incomplete (re-download it)"
            )
        absent = [f for f in self.files if not f.exists()]
        if absent:
            raise CheckpointError(
                f"missing {self.what} weight shard {absent[0].name} in {absent[0].parent}; the checkpoint is incomplete (re-download it)"
            )
        return self.files

    def stored_name(self, key: str) -> str:
        """A tensor's name as the checkpoint stores it (for error messages)."""
        return self.prefix + key


def component_files(folder: Path, prefix: str = "") -> tuple[Path, ...]:
    """The safetensors files of ``folder`` that hold tensors starting with ``prefix``: the shards its index names
    (only those holding such tensors), else every ``*.safetensors`` file. Missing shards are kept, so that loading
    names them."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = {f for k, f in weight_map.items() if k.startswith(prefix)}
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e}); re-download the checkpoint") from e
        return tuple(sorted(folder / n for n in names))
    return tuple(sorted(folder.glob("*.safetensors")))


def open_safetensors(source: ComponentSource | Path) -> tuple[dict[str, Any], list[Any]]:
    """Every tensor of ``source`` as a lazy slice read with ``pread``, named without the source's prefix, plus the
    open files (close them with :func:`close_all`).

    transformers memory-maps every shard and unmaps them only when loading ends, so when it converts dtypes
    (a bf16 checkpoint loaded in fp32 on CPU) or copies to a GPU, the file pages it read stay resident next to
    the result: peak RSS ~1.5x the weights. Slices read on demand keep the peak at the weights plus the few
    tensors in flight. safetensors < 0.7 has no ``pread`` backend and memory-maps instead.
    """
    located, handles = _locate(source)
    return {k: h.get_slice(name) for k, (h, name) in located.items()}, handles


def _locate(source: ComponentSource | Path) -> tuple[dict[str, tuple[Any, str]], list[Any]]:
    """Each tensor of ``source``, named without its prefix -> (open file, stored name); plus the open files."""
    from safetensors import SafetensorError, safe_open

    if not isinstance(source, ComponentSource):
        source = ComponentSource("component", component_files(Path(source)), "", {}, Path(source))
    handles, state = [], {}
    prefix, cut = source.prefix, len(source.prefix)
    try:
        for f in source.weight_files():
            try:
                handle = safe_open(f, framework="pt", device="cpu", backend="pread")
            except TypeError:  # safetensors < 0.7: no backend argument
                handle = safe_open(f, framework="pt", device="cpu")
            handles.append(handle)
            state.update({k[cut:]: (handle, k) for k in handle.keys() if k.startswith(prefix)})  # noqa: SIM118
    except (SafetensorError, OSError) as e:
        close_all(handles)
        raise CheckpointError(
            f"cannot read {source.what} weights in {source.folder}: {e}; re-download the checkpoint"
        ) from None
    except BaseException:
        close_all(handles)
        raise
    return state, handles


def close_all(handles: list[Any]) -> None:
    for h in handles:
        h.__exit__(None, None, None)


# Told how many of a component's stored tensors a loader has dealt with (read, or stored but never used), so
# that vila.load can show one progress bar over every component (see vila.loading.quiet_load).
LOAD_PROGRESS: ContextVar[Callable[[int], Any] | None] = ContextVar("vila_load_progress", default=None)


def assign_weights(
    module: Any,
    source: ComponentSource,
    *,
    dtype: Any,
    device: Any,
    what: str = "",
    skip: tuple[str, ...] = (),
    hint: str = "",
    tied: dict[str, str] | None = None,
) -> Any:
    """Read ``source``'s tensors into ``module`` (built on the meta device): names and shapes checked first,
    tensors cast one at a time, assigned in place, so nothing is randomly initialised and peak memory stays at
    the weights. Keys starting with a prefix in ``skip`` are stored weights inference never uses; ``tied`` maps a
    weight that may be absent to the one it shares (tied embeddings)."""
    what = what or source.what
    expected = module.state_dict()
    tied = tied or {}
    state, handles = _locate(source)
    advance = LOAD_PROGRESS.get()
    try:
        unexpected = sorted(k for k in state if k not in expected and not k.startswith(skip))
        missing = sorted(k for k in expected if k not in state and k not in tied)
        if missing or unexpected:
            parts = [f"{len(missing)} missing (e.g. {source.stored_name(missing[0])})"] if missing else []
            parts += [f"{len(unexpected)} unexpected (e.g. {source.stored_name(unexpected[0])})"] if unexpected else []
            raise CheckpointError(
                f"{what} weights in {source.folder} do not match its config{hint}: {', '.join(parts)}"
            )
        for key, param in expected.items():
            if key not in state:
                continue
            handle, name = state[key]
            shape = tuple(handle.get_slice(name).get_shape())
            if shape != tuple(param.shape):
                raise CheckpointError(
                    f"{what} weight {source.stored_name(key)} in {source.folder} has shape {shape}, expected "
                    f"{tuple(param.shape)}{hint}"
                )
        loaded = {}
        for key in expected:
            if key in state:
                # One tensor read, converted and placed at a time: the file's bytes are never all resident.
                handle, name = state[key]
                cast = dtype if expected[key].is_floating_point() else None
                loaded[key] = handle.get_tensor(name).to(device=device, dtype=cast)
                if advance is not None:
                    advance(1)
        if advance is not None and len(state) > len(loaded):
            advance(len(state) - len(loaded))  # stored, never used (layers past the selected one)
    finally:
        close_all(handles)
    for key, target in tied.items():
        if key not in loaded:
            loaded[key] = loaded[target]
    module.load_state_dict(loaded, strict=True, assign=True)
    return module.requires_grad_(False).eval()


def stored_keys(source: ComponentSource) -> list[str]:
    """The tensor names (without the prefix) a component stores, to decide what to build before loading."""
    state, handles = _locate(source)
    close_all(handles)
    return list(state)
