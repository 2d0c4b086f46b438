"""Conversation-mode auto-detection for every released family (spec prompt.md §6.4), including renamed copies.

The reference only looks at the path string, so a renamed local copy of a VILA1.5 model silently gets the
wrong template; here the tokenizer decides when the name does not.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import TINY
from tiny_builders import make_llama3_checkpoint

import vila
from vila.prompt import detect_conv_mode

QWEN = dict(has_chat_template=True, vocab_markers=frozenset({"<|im_start|>"}))  # NVILA / LongVILA / VILA-HD
LLAMA2 = dict(has_chat_template=False, vocab_markers=frozenset())  # VILA1.5-3b / 13b (Sheared-LLaMA, Vicuna)
LLAMA3 = dict(has_chat_template=True, vocab_markers=frozenset({"<|eot_id|>"}))  # Llama-3-Instruct tokenizer
YI = dict(has_chat_template=False, vocab_markers=frozenset({"<|im_start|>"}))  # VILA1.5-40b (Yi-34B)

RELEASED = [
    ("Efficient-Large-Model/NVILA-8B", QWEN, "auto"),
    ("Efficient-Large-Model/NVILA-15B", QWEN, "auto"),  # 'nvila-15b' does not contain 'nvila15b' (quirk #8)
    ("Efficient-Large-Model/NVILA-Lite-2B", QWEN, "auto"),
    ("Efficient-Large-Model/NVILA-Lite-8B", QWEN, "auto"),
    ("Efficient-Large-Model/NVILA-Lite-15B", QWEN, "auto"),
    ("Efficient-Large-Model/NVILA-8B-Video", QWEN, "auto"),
    ("Efficient-Large-Model/VILA1.5-3b", LLAMA2, "vicuna_v1"),
    ("Efficient-Large-Model/VILA1.5-3b-s2", LLAMA2, "vicuna_v1"),
    ("Efficient-Large-Model/Llama-3-VILA1.5-8B", LLAMA3, "llama_3"),
    ("Efficient-Large-Model/VILA1.5-13b", LLAMA2, "vicuna_v1"),
    ("Efficient-Large-Model/VILA1.5-40b", YI, "hermes-2"),
    ("Efficient-Large-Model/qwen2-1.5b-longvila-256f", QWEN, "auto"),
    ("Efficient-Large-Model/qwen2-7b-longvila-256f", QWEN, "auto"),
    ("Efficient-Large-Model/qwen2-7b-longvila-1M", QWEN, "auto"),
    ("Efficient-Large-Model/Llama-3-LongVILA-8B-1024Frames", LLAMA3, "llama_3"),
    ("Efficient-Large-Model/LongVILA-R1-7B", QWEN, "auto"),
    ("nvidia/VILA-HD-8B-PS3-4K-SigLIP2", QWEN, "auto"),
]


@pytest.mark.parametrize("hub_id,tok,want", RELEASED, ids=[r[0].split("/")[1] for r in RELEASED])
def test_released_ids(hub_id, tok, want):
    assert detect_conv_mode(hub_id, **tok) == want


@pytest.mark.parametrize("hub_id,tok,want", RELEASED, ids=[r[0].split("/")[1] for r in RELEASED])
def test_renamed_copies_get_the_same_template(hub_id, tok, want):
    """A copy in ``/data/ckpt-final`` must be prompted as the original was trained."""
    assert detect_conv_mode("/data/ckpt-final", **tok) == want


def test_parent_directories_count_like_the_reference():
    assert detect_conv_mode("/runs/VILA1.5-3b/checkpoint-900", **QWEN) == "vicuna_v1"  # name rule wins
    assert detect_conv_mode("~/Llama3-finetune/model", **LLAMA2) == "llama_3"


def link(tmp_path: Path, name: str, target: Path) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target.resolve(), target_is_directory=True)
    return path


def conv_mode_of(path: Path) -> str:
    return vila.load(path, device="cpu", dtype="float32").conv_mode


@pytest.mark.parametrize(
    "name,variant,want",
    [
        ("Efficient-Large-Model/NVILA-8B", "nvila-tiny", "auto"),
        ("Efficient-Large-Model/NVILA-15B", "nvila-tiny", "auto"),
        ("my-nvila", "nvila-lite-tiny", "auto"),
        ("LongVILA/qwen2-7b-longvila-256f", "nvila-tiny", "auto"),
        ("Efficient-Large-Model/VILA1.5-3b", "vila15-tiny", "vicuna_v1"),
        ("Efficient-Large-Model/VILA1.5-13b", "vila15-tiny", "vicuna_v1"),
        ("renamed-vila15", "vila15-tiny", "vicuna_v1"),
        ("Efficient-Large-Model/Llama-3-VILA1.5-8B", "vila15-tiny", "llama_3"),  # the name rule alone decides
    ],
)
def test_loaded_folders(tmp_path, name, variant, want):
    assert conv_mode_of(link(tmp_path, name, TINY / variant)) == want


@pytest.fixture(scope="module")
def llama3_ckpt(tmp_path_factory) -> Path:
    return make_llama3_checkpoint(tmp_path_factory.mktemp("l3") / "Llama-3-VILA1.5-8B")


def test_llama3_by_name_and_renamed(llama3_ckpt, tmp_path):
    assert conv_mode_of(llama3_ckpt) == "llama_3"
    renamed = link(tmp_path, "final", llama3_ckpt)
    m = vila.load(renamed, device="cpu", dtype="float32")
    assert m.conv_mode == "llama_3"
    eot = m.tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert eot in m.stop_token_ids  # stop tokens follow the detected template (spec §6.8)
    prompt = m.prepare(vila.model.vila.to_turns("Hi")).prompt_text
    assert prompt.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n")
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_renamed_llama3_with_instruct_chat_template_still_gets_llama_3(llama3_ckpt, tmp_path):
    """Llama-3-VILA1.5-8B's 51 kB tokenizer_config carries Llama-3-Instruct's chat template; the model was
    trained with the ``llama_3`` conv mode, so the template must not switch it to ``auto``."""
    copy = tmp_path / "copy"
    shutil.copytree(llama3_ckpt, copy)
    cfg_path = copy / "llm" / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>{% endfor %}"
    cfg_path.write_text(json.dumps(cfg))
    m = vila.load(copy, device="cpu", dtype="float32")
    assert m.tokenizer.chat_template and m.conv_mode == "llama_3"


def test_explicit_conv_mode_wins(tmp_path):
    path = link(tmp_path, "VILA1.5-3b", TINY / "vila15-tiny")
    assert vila.load(path, device="cpu", dtype="float32", conv_mode="hermes-2").conv_mode == "hermes-2"
