"""8-/4-bit LLM weights through bitsandbytes (new in this library: the reference's multimodal path crashes on
it, since ``load_pretrained_model`` in NVlabs/VILA ``llava/model/builder.py`` loses the ``torch_dtype`` argument).

Only the LLM is quantised; the vision tower and projector stay in 16-bit (the reference casts them to fp16),
since they are a small part of the weights and sensitive to rounding. The 4-bit recipe is the reference's:
NF4, double quantisation, 16-bit compute.
"""

from __future__ import annotations

from importlib.util import find_spec
from typing import Any

import torch

from .errors import DeviceError, UsageError

MODES = ("8bit", "4bit")
_ALIASES = {"int8": "8bit", "8": "8bit", "int4": "4bit", "nf4": "4bit", "4": "4bit"}


def quantization_config(quantization: str | Any | None, compute_dtype: torch.dtype) -> Any | None:
    """``"8bit"`` / ``"4bit"`` -> a ``transformers.BitsAndBytesConfig``; a config object is used as is."""
    if quantization is None:
        return None
    from transformers import BitsAndBytesConfig

    if isinstance(quantization, BitsAndBytesConfig):
        return quantization
    mode = _ALIASES.get(str(quantization).lower(), str(quantization).lower())
    if mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if mode == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_quant_type="nf4",
        )
    raise UsageError(f"unknown quantization {quantization!r}; use '8bit', '4bit' or a transformers.BitsAndBytesConfig")


def check_runtime(device: torch.device, dtype: torch.dtype) -> None:
    """Fail in one line, before any weight is read, where bitsandbytes cannot run."""
    if find_spec("bitsandbytes") is None:
        raise DeviceError("8-/4-bit loading needs the bitsandbytes package: pip install 'vila[quant]' (CUDA GPU only)")
    if device.type != "cuda" or not torch.cuda.is_available():
        raise DeviceError(
            f"8-/4-bit loading needs a CUDA GPU (bitsandbytes) but the model would load on {device.type}; "
            "drop --load-8bit/--load-4bit (quantization=) or run on a machine with an NVIDIA GPU"
        )
    if dtype == torch.float32:
        raise UsageError(
            "8-/4-bit loading keeps the vision tower and projector in 16-bit; use dtype float16 or bfloat16"
        )
