"""VILA1.5-40b end to end on a tiny checkpoint in the released layout: InternViT tower in sharded safetensors with
an index, the 57-byte ``InternVisionPreprocessor`` stub, ``mlp_downsample`` projector, a Llama LLM whose tokenizer
has Yi's ``<|im_start|>`` / ``<|im_end|>``, and the ``hermes-2`` template."""

from __future__ import annotations

import shutil
from pathlib import Path

import PIL.Image
import pytest
import torch
from conftest import INPUTS
from tiny_builders import make_intern_checkpoint

import vila
from vila.cli import main as cli_main
from vila.model.intern_vit import load_intern_vit, preprocess_intern


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_intern_checkpoint(tmp_path_factory.mktemp("hub") / "VILA1.5-40b-tiny")


@pytest.fixture(scope="module")
def model(ckpt):
    return vila.load(ckpt, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def image() -> PIL.Image.Image:
    path = next(p for p in sorted(INPUTS.rglob("*")) if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    return PIL.Image.open(path).convert("RGB")


def test_loads_as_intern_with_hermes_2(model):
    assert model.config.vision.kind == "intern" and model.config.processor.kind == "intern"
    assert model.config.processor.size == 448
    assert model.conv_mode == "hermes-2"
    im_end = model.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in model.stop_token_ids and model.tokenizer.eos_token_id in model.stop_token_ids


def test_image_embeddings_equal_a_hand_computation(model, ckpt, image):
    """Preprocess (ImageNet stats, 448 px bicubic) -> InternViT layer -2 -> drop CLS -> mlp_downsample."""
    prepared = model.prepare(vila.model.vila.to_turns([image, "Describe the image."]))
    tower = load_intern_vit(ckpt / "vision_tower", dtype=torch.float32, device="cpu")
    with torch.no_grad():
        feats = tower(preprocess_intern(image, 448)[None], num_layers=-2)[:, 1:]  # (1, 1024, 32)
        expected = model.mm_projector(feats)[0]  # (256, 64)
    assert expected.shape == (256, 64)
    end = len(model.tokenizer("\n").input_ids)  # the end-token embedding keeps its BOS (quirk #4)
    assert prepared.media_tokens == [256 + end]
    ids = prepared.input_ids.tolist()
    pos = ids.index(model.media_token_ids["image"])
    got = prepared.inputs_embeds[pos : pos + 256]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert prepared.prompt_text.startswith(
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>"
    )
    assert prepared.prompt_text.endswith("<|im_end|><|im_start|>assistant\n")


def test_answers_end_to_end_deterministically(model, image):
    a = model.generate([image, "Describe the image."], max_new_tokens=6)
    b = model.generate([image, "Describe the image."], max_new_tokens=6)
    assert 1 <= len(a.token_ids) <= 6 and a.token_ids == b.token_ids
    assert a.num_prompt_tokens > 256
    assert isinstance(a.text, str) and a.text == b.text


def test_renamed_folder_still_gets_hermes_2(ckpt, tmp_path):
    """The reference detects hermes-2 only from 'vila1.5-40b' in the path; a renamed copy must still work."""
    renamed = tmp_path / "my-model"
    shutil.copytree(ckpt, renamed)
    m = vila.load(renamed, device="cpu", dtype="float32")
    assert m.conv_mode == "hermes-2"


def test_cli_answers(ckpt, image, tmp_path, capsys, model):
    path = tmp_path / "img.png"
    image.save(path)
    rc = cli_main(["-m", str(ckpt), "--media", str(path), "--text", "Describe the image.", "--max-new-tokens", "6"])
    out = capsys.readouterr().out.strip()
    assert rc == 0
    assert out == model.generate([image, "Describe the image."], max_new_tokens=6).text
