"""Conversation templates (exact strings), stop tokens, and prompt assembly."""

from __future__ import annotations

import pytest
from conftest import TINY

from vila.errors import UsageError
from vila.prompt import CONV_MODES, build_user_text, detect_conv_mode, get_template
from vila.tokenizer import infer_stop_token_ids, load_tokenizer

ONE_TURN = [("user", "<image>Hi"), ("assistant", None)]
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def test_vicuna_v1_single_and_multi_turn():
    t = get_template("vicuna_v1")
    assert t.render(ONE_TURN) == VICUNA_SYSTEM + " USER: <image>Hi ASSISTANT:"
    turns = [("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", None)]
    assert t.render(turns) == VICUNA_SYSTEM + " USER: a ASSISTANT: b</s>USER: c ASSISTANT:"
    assert get_template("v1") is t


def test_llama_3():
    t = get_template("llama_3")
    assert t.render(ONE_TURN) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful language and vision "
        "assistant. You are able to understand the visual content that the user provides, and assist the user with "
        "a variety of tasks using natural language.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n<image>Hi"
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_hermes_2():
    assert get_template("hermes-2").render(ONE_TURN) == (
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>Hi<|im_end|><|im_start|>assistant\n"
    )


def test_plain():
    assert get_template("plain").render(ONE_TURN) == "<image>Hi\n"


def test_auto_uses_the_checkpoint_chat_template():
    tok = load_tokenizer(TINY / "nvila-tiny" / "llm")
    assert get_template("auto").render(ONE_TURN, tok) == (
        "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\n<image>Hi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_auto_without_chat_template_is_a_clear_error():
    tok = load_tokenizer(TINY / "vila15-tiny" / "llm")
    with pytest.raises(UsageError, match="no chat template"):
        get_template("auto").render(ONE_TURN, tok)


def test_unknown_mode():
    with pytest.raises(UsageError, match="unknown conversation mode 'vicuna'"):
        get_template("vicuna")
    assert {"auto", "vicuna_v1", "llama_3", "hermes-2", "plain"} <= set(CONV_MODES)


@pytest.mark.parametrize(
    "variant, mode, want",
    [
        ("nvila-tiny", "auto", {"<|im_end|>"}),
        ("vila15-tiny", "vicuna_v1", {"</s>"}),
        ("nvila-tiny", "hermes-2", {"<|im_end|>"}),
        ("vila15-tiny", "plain", {"</s>"}),
    ],
)
def test_stop_tokens(variant, mode, want):
    tok = load_tokenizer(TINY / variant / "llm")
    ids = infer_stop_token_ids(tok, get_template(mode))
    assert set(tok.convert_ids_to_tokens(list(ids))) == want


def test_llama_tokenizer_keeps_saved_normalizer():
    """tokenizer.json verbatim: a ▁ after every special token, also before a leading space, as the
    saved normalizer does."""
    tok = load_tokenizer(TINY / "vila15-tiny" / "llm")
    assert tok.convert_ids_to_tokens(tok("USER: <image>Please").input_ids) == [
        "<s>",
        "▁",
        "US",
        "ER",
        ":",
        "▁",
        "<image>",
        "▁",
        "P",
        "lease",
    ]
    assert tok.convert_ids_to_tokens(tok("<image> Please").input_ids)[2] == "▁▁P"
    assert tok("\n").input_ids == [1, 351, 13]  # <s> ▁ <0x0A>: 3 end-token positions (BOS included, as the reference)


def test_media_tokens_are_single_ids():
    tok = load_tokenizer(TINY / "nvila-tiny" / "llm")
    assert tok("<image><vila/video>").input_ids == [1154, 1155]


def test_user_text_concatenates_without_separator_and_strips_typed_media_tokens():
    parts = ["Compare ", "IMG", "with", "IMG", "  typed <image> token  "]
    text = build_user_text(parts, is_text=lambda p: p != "IMG", media_token=lambda p: "<image>")
    assert text == "Compare <image>with<image>typed  token"


@pytest.mark.parametrize(
    "path, chat, markers, version, want",
    [
        ("Efficient-Large-Model/VILA1.5-3b", False, (), None, "vicuna_v1"),
        ("Efficient-Large-Model/Llama-3-VILA1.5-8B", False, ("<|eot_id|>",), None, "llama_3"),
        ("Efficient-Large-Model/VILA1.5-40b", False, ("<|im_start|>",), None, "hermes-2"),
        ("Efficient-Large-Model/NVILA-15B", True, (), None, "auto"),  # 'nvila-15b' != 'nvila15b'
        ("Efficient-Large-Model/NVILA-8B", True, (), None, "auto"),
        ("/models/my-copy", False, (), "v1", "vicuna_v1"),  # renamed folder: the saved training version
        ("/models/my-copy", False, ("<|eot_id|>",), None, "llama_3"),  # renamed Llama-3: vocabulary
        ("/models/my-copy", False, ("<|im_start|>",), None, "hermes-2"),  # renamed Yi (40b)
        ("/models/my-copy", False, (), None, "vicuna_v1"),
    ],
)
def test_detect_conv_mode(path, chat, markers, version, want):
    assert (
        detect_conv_mode(path, has_chat_template=chat, vocab_markers=frozenset(markers), training_version=version)
        == want
    )
