"""Conversation-mode auto-detection for every released family (the reference's name rule in
``llava.load``, NVlabs/VILA ``llava/entry.py``), including renamed copies.

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
from vila.errors import UnsupportedModelError
from vila.prompt import detect_conv_mode

QWEN = dict(has_chat_template=True, vocab_markers=frozenset({"<|im_start|>"}))  # NVILA / LongVILA / VILA-HD
LLAMA2 = dict(has_chat_template=False, vocab_markers=frozenset())  # VILA1.5-3b / 13b (Sheared-LLaMA, Vicuna)
LLAMA3 = dict(has_chat_template=True, vocab_markers=frozenset({"<|eot_id|>"}))  # Llama-3-Instruct tokenizer
YI = dict(has_chat_template=False, vocab_markers=frozenset({"<|im_start|>"}))  # VILA1.5-40b (Yi-34B)

RELEASED = [
    ("Efficient-Large-Model/NVILA-8B", QWEN, "auto"),
    ("Efficient-Large-Model/NVILA-15B", QWEN, "auto"),  # 'nvila-15b' does not contain 'nvila15b': a substring test
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
    assert eot in m.stop_token_ids  # stop tokens follow the detected template (`infer_stop_tokens`)
    prompt = m.prepare(vila.model.vila.to_turns("Hi")).prompt_text
    assert prompt.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n")
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    result = m.generate("Hi", max_new_tokens=3)  # Llama-3-VILA1.5-8B-style checkpoint answers
    assert 1 <= len(result.token_ids) <= 3


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


# -- remote-code layout (-hf-preview, model_type "vila"): config.json chat_template --------------------------------
# The Jinja files VILA's converter writes (llava/remote_code/modeling_vila.py, generate_jinja_template).
VICUNA_JINJA = """{% set system_prompt = "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions. " %}
{% set roles = ["user", "assistant"] %}
{% set sep = " " %}

{{ system_prompt }}

{% for message in messages %}
    {% if message['role'] == roles[0] %}
        {{ "USER: " }}{{ sep }}{{ message['content'] }}{{ sep }}
    {% else %}
        {{ "ASSISTANT: " }}{{ sep }}{{ message['content'] }}{{ sep }}
    {% endif %}
{% endfor %}
{% if messages[-1]['role'] == 'user' %}
    {{ "ASSISTANT:" }}
{% endif %}
"""
HERMES_JINJA = """{% set system_prompt = "<|im_start|>system
Answer the questions." %}
{% set roles = ["<|im_start|>user
", "<|im_start|>assistant
"] %}
{% set sep = "<|im_end|>" %}

{{ system_prompt }}{{ sep }}

{% for message in messages %}
    {% if message['role'] == 'user' %}
        {{ roles[0] }}{{ message['content'] }}{{ sep }}
    {% else %}
        {{ roles[1] }}{{ message['content'] }}{{ sep }}
    {% endif %}
{% endfor %}"""


def make_hf_preview(root: Path, chat_template: str | None, jinja: str | None) -> Path:
    """A checkpoint as ``convert_vila_dev_ckpt_to_remote`` leaves it: same folders, rewritten config.json, .py files."""
    shutil.copytree(TINY / "vila15-tiny", root)
    cfg = json.loads((root / "config.json").read_text())
    cfg.update(version="2.0", architectures=["VILAForCausalLM"], model_type="vila")
    cfg["auto_map"] = {"AutoConfig": "modeling_vila.VILAConfig", "AutoModel": "modeling_vila.VILAForCausalLM"}
    if chat_template is not None:
        cfg["chat_template"] = chat_template
        if jinja is not None:
            (root / f"{chat_template}.jinja").write_text(jinja)
    (root / "config.json").write_text(json.dumps(cfg, indent=2))
    marker = root / "EXECUTED"
    (root / "modeling_vila.py").write_text(f"open({str(marker)!r}, 'w').write('remote code ran')\n")
    return root


def test_remote_code_vicuna_jinja_is_installed_and_reproduced(tmp_path):
    root = make_hf_preview(tmp_path / "VILA15-3b-hf-preview", "vicuna_v1", VICUNA_JINJA)
    m = vila.load(root, device="cpu", dtype="float32")
    assert m.conv_mode == "auto" and "\n" not in m.tokenizer.chat_template and "    " not in m.tokenizer.chat_template
    prompt = m.prepare(vila.model.vila.to_turns("Describe")).prompt_text
    # The converted template's quirk, reproduced: a double space after "USER:" and a space before "ASSISTANT:".
    assert prompt.endswith("the user's questions. USER:  Describe ASSISTANT:")
    assert m.tokenizer.eos_token_id in m.stop_token_ids
    assert not (root / "EXECUTED").exists()  # the shipped .py files are never run


def test_remote_code_template_beats_the_name_rule(tmp_path):
    root = make_hf_preview(tmp_path / "Llama-3-VILA15-8B-hf-preview", "hermes_2", HERMES_JINJA)
    m = vila.load(root, device="cpu", dtype="float32")
    assert m.conv_mode == "auto"
    prompt = m.prepare(vila.model.vila.to_turns("Hi")).prompt_text
    # the remote code strips newlines on load, also those inside the template's strings
    assert prompt == "<|im_start|>systemAnswer the questions.<|im_end|><|im_start|>userHi<|im_end|>"


def test_remote_code_without_jinja_uses_the_named_legacy_template(tmp_path):
    root = make_hf_preview(tmp_path / "converted", "vicuna_v1", None)
    assert vila.load(root, device="cpu", dtype="float32").conv_mode == "vicuna_v1"
    bad = make_hf_preview(tmp_path / "converted-bad", "my_template", None)
    with pytest.raises(UnsupportedModelError, match="my_template.jinja is missing"):
        vila.load(bad, device="cpu", dtype="float32")


def test_remote_code_nvila_uses_the_tokenizer_template(tmp_path):
    """NVILA-Lite-2B-hf-preview: no chat_template key; the Qwen tokenizer's own template, as for NVILA."""
    root = tmp_path / "NVILA-Lite-2B-hf-preview"
    shutil.copytree(TINY / "nvila-lite-tiny", root)
    cfg = json.loads((root / "config.json").read_text())
    cfg.update(version="2.0", architectures=["VILAForCausalLM"], model_type="vila")
    (root / "config.json").write_text(json.dumps(cfg))
    m = vila.load(root, device="cpu", dtype="float32")
    assert m.conv_mode == "auto" and m.config.model_type == "vila"
