"""Device and dtype choice: CUDA (bf16, else fp16) -> Apple MPS (fp16) -> CPU (fp32)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .errors import DeviceError, UsageError

logger = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            logger.debug("device cuda: automatic choice, CUDA is available (%s)", torch.cuda.get_device_name(0))
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            logger.debug("device mps: automatic choice, no CUDA and Apple MPS is available")
            return torch.device("mps")
        logger.debug("device cpu: automatic choice, neither CUDA nor Apple MPS is available")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UsageError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {device!r} requested but CUDA is not available here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s) visible")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise DeviceError(f"device {device!r} requested but Apple MPS is not available here; use --device cpu")
    elif dev.type != "cpu":
        raise UsageError(f"unsupported device {device!r}; use auto, cpu, cuda, cuda:N or mps")
    logger.debug("device %s: as requested", dev)
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            bf16 = torch.cuda.is_bf16_supported()
            chosen = torch.bfloat16 if bf16 else torch.float16
            why = "the GPU supports bfloat16" if bf16 else "the GPU has no bfloat16"
        else:
            chosen = torch.float16 if device.type == "mps" else torch.float32
            why = f"the default on {device.type}"
        logger.debug("dtype %s: automatic choice, %s", _name(chosen), why)
        return chosen
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise UsageError(f"unsupported dtype {dtype}; use float32, float16 or bfloat16")
        logger.debug("dtype %s: as requested", _name(dtype))
        return dtype
    key = str(dtype).removeprefix("torch.")
    if key not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; use auto, float32, float16 or bfloat16")
    logger.debug("dtype %s: as requested", _name(DTYPES[key]))
    return DTYPES[key]


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_devices(devices: str | Sequence[int | str]) -> list[int]:
    """``"0,1"`` or ``[0, 1]`` -> CUDA device indices (the reference's ``devices=`` argument)."""
    items = devices.split(",") if isinstance(devices, str) else list(devices)
    try:
        ids = [int(str(d).strip().removeprefix("cuda:")) for d in items if str(d).strip()]
    except ValueError as e:
        raise UsageError(f"devices must be GPU indices like 0,1; got {devices!r}") from e
    if not ids or len(set(ids)) != len(ids) or min(ids) < 0:
        raise UsageError(f"devices must be distinct GPU indices like 0,1; got {devices!r}")
    return ids


def parse_max_memory(max_memory: str | Mapping[Any, Any]) -> dict[int | str, int | str]:
    """``"0=20GiB,1=20GiB,cpu=64GiB"`` or a dict -> accelerate's ``max_memory`` (GPU keys as ints)."""
    if isinstance(max_memory, str):
        pairs = [p.split("=", 1) for p in max_memory.split(",") if p.strip()]
        if not pairs or any(len(p) != 2 or not p[1].strip() for p in pairs):
            raise UsageError(f"max_memory must look like 0=20GiB,1=20GiB,cpu=64GiB; got {max_memory!r}")
        max_memory = {k.strip(): v.strip() for k, v in pairs}
    out: dict[int | str, int | str] = {}
    for key, value in max_memory.items():
        k = str(key).strip().removeprefix("cuda:")
        if k.isdigit():
            out[int(k)] = value
        elif k in ("cpu", "disk", "mps"):
            out[k] = value
        else:
            raise UsageError(f"max_memory key {key!r} is not a GPU index, 'cpu' or 'disk'")
    if not out:
        raise UsageError("max_memory is empty; give at least one device, e.g. 0=20GiB")
    return out


def plan_placement(
    device: str | torch.device | None,
    device_map: Any,
    devices: str | Sequence[int | str] | None,
    max_memory: str | Mapping[Any, Any] | None,
) -> tuple[torch.device, Any, dict[int | str, int | str] | None]:
    """Where the weights go: ``(first device, LLM device_map, max_memory)``.

    The vision tower and projector live on the first device (where the LLM's embeddings are); with several GPUs
    accelerate shards the LLM over them. ``devices=[0, 1]`` is the reference's shortcut for
    ``device_map="auto"`` plus ``max_memory`` = each listed GPU's full memory (``llava.load``, NVlabs/VILA
    ``llava/entry.py``).
    """
    if device is not None and (device_map is not None or devices is not None or max_memory is not None):
        raise UsageError("pass either device or device_map/devices/max_memory, not both")
    if devices is not None:
        if max_memory is not None:
            raise UsageError("pass either devices or max_memory, not both (devices sets max_memory)")
        if device_map not in (None, "auto"):
            raise UsageError("devices= implies device_map='auto'; do not pass another device_map")
        ids = parse_devices(devices)
        if not torch.cuda.is_available():
            raise DeviceError(f"devices {ids} requested but CUDA is not available here; use --device cpu")
        count = torch.cuda.device_count()
        if max(ids) >= count:
            raise DeviceError(f"GPU {max(ids)} does not exist: {count} CUDA device(s) visible")
        memory: dict[int | str, int | str] = {i: torch.cuda.get_device_properties(i).total_memory for i in ids}
        return torch.device("cuda", ids[0]), "auto", memory
    if max_memory is not None:
        memory = parse_max_memory(max_memory)
        gpus = sorted(k for k in memory if isinstance(k, int))
        if gpus and not torch.cuda.is_available():
            raise DeviceError(f"max_memory names GPU(s) {gpus} but CUDA is not available here")
        first = torch.device("cuda", gpus[0]) if gpus else resolve_device("mps" if "mps" in memory else "cpu")
        return first, device_map if device_map is not None else "auto", memory
    if device_map is not None:
        if isinstance(device_map, Mapping) and device_map:
            first_value = next(iter(device_map.values()))
            target = f"cuda:{first_value}" if isinstance(first_value, int) else first_value
            return resolve_device(target), device_map, None
        return resolve_device(None), device_map, None
    dev = resolve_device(device)
    return dev, {"": dev}, None
