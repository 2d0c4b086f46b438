"""The checkpoint tokenizer, loaded verbatim, plus media tokens and stop tokens (NVlabs/VILA
``llava/model/language_model/builder.py``, ``build_llm_and_tokenizer``; ``llava/utils/tokenizer.py``,
``infer_stop_tokens``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import CheckpointError
from .prompt import IMAGE_TOKEN, SENTINEL_TOKEN, VIDEO_TOKEN, Template

# A dummy conversation whose assistant turns are the sentinel: the token after each sentinel is a stop token.
_DUMMY_TURNS = 10


def load_tokenizer(folder: Path) -> Any:
    """Load the tokenizer in ``folder`` (the LLM source's side-file folder: ``llm/`` in the original layout, the
    checkpoint itself in the single-folder one) exactly as saved and add the media tokens.

    transformers 5.x ``AutoTokenizer`` rebuilds Llama/SentencePiece tokenizers and drops the saved
    normalizer, which removes the ``▁`` after every special token and shifts all later ids;
    ``PreTrainedTokenizerFast`` runs the saved pipeline unchanged.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = folder if (folder / "tokenizer_config.json").exists() else folder / "llm"
    try:
        if (path / "tokenizer.json").exists():
            tok = PreTrainedTokenizerFast.from_pretrained(path, padding_side="right")
        elif (path / "tokenizer_config.json").exists():
            # Only a SentencePiece model was saved: there is no verbatim pipeline to load.
            tok = AutoTokenizer.from_pretrained(path, padding_side="right")
        else:
            raise CheckpointError(f"no tokenizer in {folder}; the checkpoint is incomplete (re-download it)")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load the tokenizer from {path}: {e}") from e
    if tok.eos_token is None:
        raise CheckpointError(f"the tokenizer in {path} has no EOS token; generation could never stop")
    # Same order as the reference (the sentinel first, for stop-token inference, then the media tokens), so a
    # tokenizer without them gets the same new ids.
    tok.add_tokens([SENTINEL_TOKEN, IMAGE_TOKEN, VIDEO_TOKEN], special_tokens=True)
    return tok


def media_token_ids(tok: Any) -> dict[str, int]:
    return {"image": tok.convert_tokens_to_ids(IMAGE_TOKEN), "video": tok.convert_tokens_to_ids(VIDEO_TOKEN)}


def infer_stop_token_ids(tok: Any, template: Template) -> tuple[int, ...]:
    """The tokens that follow an assistant turn in this template, plus EOS (the reference's
    ``infer_stop_tokens``, NVlabs/VILA ``llava/utils/tokenizer.py``)."""
    stops = {tok.eos_token}
    if template.style != "plain":  # plain has no turn terminator (the reference crashes here)
        turns = [("user", "question"), ("assistant", SENTINEL_TOKEN)] * _DUMMY_TURNS
        ids = tok(template.render(turns, tok)).input_ids
        sentinel = tok.convert_tokens_to_ids(SENTINEL_TOKEN)
        stops |= {tok.decode([ids[k + 1]]) for k in range(len(ids) - 1) if ids[k] == sentinel}
    return tuple(sorted({tok.convert_tokens_to_ids(s) for s in stops}))
