"""Conversation templates, prompt rendering and conversation-mode detection (NVlabs/VILA
``llava/conversation.py``, ``llava/utils/tokenizer.py``).

Templates are immutable values passed to whoever renders a prompt; nothing here is global state (the
reference mutates a module-level ``default_conversation``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .errors import UsageError

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<vila/video>"
SENTINEL_TOKEN = "<vila/sentinel>"
MEDIA_TOKENS = (IMAGE_TOKEN, VIDEO_TOKEN)

Message = tuple[str, "str | None"]  # (role: "user" | "assistant", content; None = generation prompt)


@dataclass(frozen=True)
class Template:
    """One conversation format. ``style`` "auto" defers to the tokenizer's chat template."""

    name: str
    style: str  # "auto" | "two" | "llama_3" | "mpt" | "plain"
    system: str = ""
    roles: tuple[str, str] = ("", "")
    sep: str = ""
    sep2: str | None = None

    def render(self, messages: Sequence[Message], tokenizer: Any = None) -> str:
        """Render ``messages`` (the last may be ``("assistant", None)``, the generation prompt)."""
        if self.style == "auto":
            return render_chat_template(messages, tokenizer)
        role_of = {"user": self.roles[0], "assistant": self.roles[1]}
        seps = (self.sep, self.sep2)
        if self.style == "two":
            out = self.system + self.sep
            for k, (role, text) in enumerate(messages):
                out += f"{role_of[role]}: {text}{seps[k % 2]}" if text else f"{role_of[role]}:"
            return out
        if self.style == "llama_3":
            out = self.system + self.sep
            for k, (role, text) in enumerate(messages):
                if text:
                    out += role_of[role] + text + (self.sep if k < len(messages) - 1 else self.sep2)
                else:
                    out += role_of[role]
            return out
        if self.style == "mpt":
            out = self.system + self.sep
            for role, text in messages:
                out += role_of[role] + text + self.sep if text else role_of[role]
            return out
        if self.style == "plain":
            out = self.system
            for k, (_, text) in enumerate(messages):
                if text:
                    out += text + (seps[k % 2] or "")
            return out
        raise AssertionError(self.style)


_VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_LLAMA3_SYSTEM = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful language and vision "
    "assistant. You are able to understand the visual content that the user provides, and assist the user "
    "with a variety of tasks using natural language."
)

TEMPLATES: dict[str, Template] = {
    "auto": Template("auto", "auto"),
    "vicuna_v1": Template("vicuna_v1", "two", _VICUNA_SYSTEM, ("USER", "ASSISTANT"), " ", "</s>"),
    "llama_3": Template(
        "llama_3",
        "llama_3",
        _LLAMA3_SYSTEM,
        ("<|start_header_id|>user<|end_header_id|>\n\n", "<|start_header_id|>assistant<|end_header_id|>\n\n"),
        "<|eot_id|>",
        "<|end_of_text|>",
    ),
    "hermes-2": Template(
        "hermes-2",
        "mpt",
        "<|im_start|>system\nAnswer the questions.",
        ("<|im_start|>user\n", "<|im_start|>assistant\n"),
        "<|im_end|>",
    ),
    "plain": Template("plain", "plain", "", ("", ""), "\n", None),
}
ALIASES = {"v1": "vicuna_v1", "hermes_2": "hermes-2", "llama3": "llama_3"}
CONV_MODES = tuple(sorted(set(TEMPLATES) | set(ALIASES)))

# The reference's name-based detection (`llava.load`, NVlabs/VILA `llava/entry.py`): the first key that is a
# substring of the whole lower-cased path wins, parent folders included, so 'nvila15b' never matches 'NVILA-15B'.
# Kept in this order.
NAME_RULES = (
    ("nvila15b", "vicuna_v1"),
    ("vila1.5-3b", "vicuna_v1"),
    ("vila1.5-8b", "llama_3"),
    ("vila1.5-13b", "vicuna_v1"),
    ("vila1.5-40b", "hermes-2"),
    ("llama-3", "llama_3"),
    ("llama3", "llama_3"),
)


def get_template(name: str) -> Template:
    key = ALIASES.get(name, name)
    if key not in TEMPLATES:
        raise UsageError(f"unknown conversation mode {name!r}; choose one of: {', '.join(CONV_MODES)}")
    return TEMPLATES[key]


def render_chat_template(messages: Sequence[Message], tokenizer: Any) -> str:
    """The tokenizer's own chat template (NVILA); a trailing ``None`` message is the generation prompt."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise UsageError(
            "this checkpoint's tokenizer has no chat template, so conv_mode 'auto' cannot render a prompt; "
            "pass conv_mode (--conv-mode) vicuna_v1, llama_3 or hermes-2"
        )
    add_generation_prompt = bool(messages) and messages[-1][1] is None
    conversation = [{"role": role, "content": text} for role, text in messages if text is not None]
    return tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, tokenize=False)


def detect_conv_mode(
    path: str,
    *,
    has_chat_template: bool,
    vocab_markers: frozenset[str] = frozenset(),
    training_version: str | None = None,
) -> str:
    """Pick the template a checkpoint was trained with, so users never need ``--conv-mode``.

    Order: the reference's substring rules on the path as given (so every released hub id behaves as in
    the reference); then a Llama-3 vocabulary (``<|eot_id|>``) -> ``llama_3``, checked before the chat template
    because Llama-3-VILA1.5-8B's tokenizer ships Llama-3-Instruct's template but was trained with ``llama_3``
    (every released Llama-3 VILA has ``llama-3`` or ``vila1.5-8b`` in its id); then the tokenizer's chat
    template (NVILA, LongVILA); then the training run's saved ``version`` (a conv-mode name, present in
    checkpoints written by the training code); then ``<|im_start|>`` without a chat template: Yi ->
    ``hermes-2``; otherwise the Llama-2 era ``vicuna_v1``. The vocabulary rules make renamed local copies work,
    where the reference silently falls back to a template the model never saw.
    """
    lowered = path.lower()
    for key, mode in NAME_RULES:
        if key in lowered:
            logger.debug("template %s: the checkpoint name contains %r (the reference's rule)", mode, key)
            return mode
    if "<|eot_id|>" in vocab_markers:
        logger.debug("template llama_3: the tokenizer has <|eot_id|> (a Llama-3 LLM)")
        return "llama_3"
    if has_chat_template:
        logger.debug("template auto: the tokenizer's own chat template")
        return "auto"
    if training_version:
        key = ALIASES.get(training_version, training_version)
        if key in TEMPLATES and key not in ("auto", "plain"):
            logger.debug("template %s: the training run's saved version %r", key, training_version)
            return key
    if "<|im_start|>" in vocab_markers:
        logger.debug("template hermes-2: the tokenizer has <|im_start|> but no chat template (a Yi LLM)")
        return "hermes-2"
    logger.debug("template vicuna_v1: no name rule, chat template or saved version matched (the Llama-2 era default)")
    return "vicuna_v1"


def build_user_text(parts: Sequence[Any], is_text: Any, media_token: Any) -> str:
    """Concatenate prompt parts without separators, as the reference's ``extract_media`` does
    (NVlabs/VILA ``llava/utils/media.py``).

    ``is_text(part)`` says whether a part is text; ``media_token(part)`` gives a media part's token. A text
    part containing media tokens loses them and is stripped, as in the reference.
    """
    text = ""
    for part in parts:
        if is_text(part):
            if any(tok in part for tok in MEDIA_TOKENS):
                for tok in MEDIA_TOKENS:
                    part = part.replace(tok, "")
                part = part.strip()
            text += part
        else:
            text += media_token(part)
    return text
