"""The language model: a transformers causal LM built from its config, weights assigned from its source."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ..checkpoint import ComponentSource, assign_weights
from ..errors import CheckpointError


def llm_config(source: ComponentSource) -> Any:
    """The transformers config of the LLM, from the source's config dict (no file read)."""
    from transformers import CONFIG_MAPPING

    d = dict(source.config)
    model_type = d.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise CheckpointError(
            f"the {source.what} config has model_type {model_type!r}, which this transformers version does not know"
        )
    return CONFIG_MAPPING[model_type].from_dict(d)


def load_llm(
    source: ComponentSource, dtype: torch.dtype, device_map: Any, extra: dict[str, Any] | None = None
) -> nn.Module:
    """The LLM on one device: built with its parameters on the meta device, then each tensor read, converted
    and placed once (no random init, no key renaming, peak RSS ~ the weights). transformers' ``from_pretrained``
    is kept for what only it does: quantisation and a ``device_map`` over several devices."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    config = llm_config(source)
    single = isinstance(device_map, dict) and set(device_map) == {""} and not extra
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if single:
                llm = _build_and_assign(source, config, dtype, device_map[""])
            else:
                if source.prefix:
                    raise CheckpointError(
                        f"a single-folder checkpoint's {source.what} cannot be quantised or spread over devices yet; "
                        "use the original-layout repository (the name without -hf) or convert it with scripts/convert_checkpoint.py "
                        "--to original from the vila source tree"
                    )
                llm = AutoModelForCausalLM.from_pretrained(
                    source.folder, dtype=dtype, device_map=device_map, attn_implementation="sdpa", **(extra or {})
                )
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load the {source.what} from {source.folder}: {e}") from e
    # Never let a generation_config.json (e.g. Qwen2.5-Instruct's sampling defaults) leak into decoding: only the
    # special token ids are kept, and from the model config when the file is absent.
    g = llm.generation_config
    if (source.folder / "generation_config.json").exists():
        g = GenerationConfig.from_pretrained(source.folder)
    llm.generation_config = GenerationConfig(
        bos_token_id=g.bos_token_id, eos_token_id=g.eos_token_id, pad_token_id=g.pad_token_id
    )
    return llm.eval()


def _build_and_assign(source: ComponentSource, config: Any, dtype: torch.dtype, device: Any) -> nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    # Parameters on meta, buffers real: the rotary inv_freq is computed by the module's own constructor (in
    # fp32, as from_pretrained leaves it) instead of being left on meta.
    with init_empty_weights(include_buffers=False):
        llm = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    tie = bool(getattr(config.get_text_config(), "tie_word_embeddings", False))
    tied = {"lm_head.weight": "model.embed_tokens.weight"} if tie else {}
    assign_weights(llm, source, dtype=dtype, device=device, tied=tied)
    llm.to(device)  # the buffers; the parameters are already there
    if tie:
        llm.tie_weights()
    return llm
