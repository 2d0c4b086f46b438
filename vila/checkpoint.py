"""Model path or Hugging Face hub id -> a local checkpoint folder, resolved as the reference's
``llava.load`` does (NVlabs/VILA ``llava/entry.py``).

Nothing downloaded is executed: ``*.py`` files are never fetched, and weights are read from safetensors.
"""

from __future__ import annotations

import json
import os
import re
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


def open_safetensors(folder: Path) -> tuple[dict[str, Any], list[Any]] | None:
    """Every tensor in ``folder``'s safetensors files as a lazy slice read with ``pread``, plus the open files.

    transformers memory-maps every shard and unmaps them only when loading ends, so when it converts dtypes
    (a bf16 checkpoint loaded in fp32 on CPU) or copies to a GPU, the file pages it read stay resident next to
    the result: peak RSS ~1.5x the weights. Slices read on demand keep the peak at the weights plus the few
    tensors in flight. Returns None when this safetensors version has no ``pread`` backend.
    """
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    handles, state = [], {}
    try:
        for f in files:
            handle = safe_open(f, framework="pt", device="cpu", backend="pread")
            handles.append(handle)
            state.update({k: handle.get_slice(k) for k in handle.keys()})
    except TypeError:  # safetensors < 0.7: no backend argument
        close_all(handles)
        return None
    return state, handles


def close_all(handles: list[Any]) -> None:
    for h in handles:
        h.__exit__(None, None, None)


def weight_files(folder: Path, what: str = "") -> list[Path]:
    """A component's safetensors files: the shards its index names, else every ``*.safetensors`` file."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            names = json.loads(index.read_text())["weight_map"].values()
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e}); re-download the checkpoint") from e
        files = sorted({folder / n for n in names})
        absent = [f.name for f in files if not f.exists()]
        if absent:
            raise CheckpointError(
                f"missing {what} weight shard {absent[0]} in {folder}; the checkpoint is incomplete (re-download it)".replace(
                    "  ", " "
                )
            )
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no safetensors weights in {folder}; the checkpoint is incomplete (re-download it)")
    return files


def assign_weights(
    module: Any, folder: Path, *, dtype: Any, device: Any, what: str, skip: tuple[str, ...] = (), hint: str = ""
) -> Any:
    """Read ``folder``'s safetensors into ``module`` (built on the meta device): names and shapes checked first,
    tensors cast one at a time, assigned in place, so nothing is randomly initialised and peak memory stays at
    the weights. Keys starting with a prefix in ``skip`` are stored weights inference never uses."""
    from safetensors import SafetensorError, safe_open

    expected = module.state_dict()
    state, unexpected = {}, []
    for path in weight_files(folder, what):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    if key.startswith(skip):
                        continue
                    if key not in expected:
                        unexpected.append(key)
                        continue
                    tensor = f.get_tensor(key)
                    if tuple(tensor.shape) != tuple(expected[key].shape):
                        raise CheckpointError(
                            f"{what} weight {key} in {path} has shape {tuple(tensor.shape)}, expected "
                            f"{tuple(expected[key].shape)}{hint}"
                        )
                    state[key] = tensor.to(device=device, dtype=dtype)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read {what} weights {path}: {e}; re-download the checkpoint") from None
    missing = sorted(set(expected) - set(state))
    if missing or unexpected:
        parts = [f"{len(missing)} missing (e.g. {missing[0]})"] if missing else []
        parts += [f"{len(unexpected)} unexpected (e.g. {min(unexpected)})"] if unexpected else []
        raise CheckpointError(f"{what} weights in {folder} do not match its config{hint}: {', '.join(parts)}")
    module.load_state_dict(state, strict=True, assign=True)
    return module.requires_grad_(False).eval()


def stored_keys(folder: Path) -> list[str]:
    """The tensor names a component folder stores (to decide what to build before loading)."""
    from safetensors import SafetensorError, safe_open

    keys: list[str] = []
    for path in weight_files(folder):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                keys += list(f.keys())
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read weights {path}: {e}; re-download the checkpoint") from None
    return keys
