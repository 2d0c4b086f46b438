"""VILA1.5-40b end to end on a tiny checkpoint in the released layout: InternViT tower in sharded safetensors with
an index, the 57-byte ``InternVisionPreprocessor`` stub, ``mlp_downsample`` projector, a Llama LLM whose tokenizer
has Yi's ``<|im_start|>`` / ``<|im_end|>``, and the ``hermes-2`` template."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import INPUTS
from safetensors.torch import load_file
from test_intern_vit import ref_forward
from tiny_builders import make_intern_checkpoint

import vila
from vila.cli import main as cli_main


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


def reference_image_embeddings(ckpt: Path, image: PIL.Image.Image) -> torch.Tensor:
    """The reference's image path in float64 from the raw safetensors, with none of vila's loaders or modules:
    ``InternVisionPreprocessor`` (bicubic resize to 448, /255, ImageNet mean/std), InternViT hidden state -2
    (the checkpoint's ``mm_vision_select_layer``), CLS dropped, then ``mlp_downsample``: the 2x2 ``flat_square``
    of ``DownSampleBlock``, LayerNorm, Linear, GELU, Linear (NVlabs/VILA
    ``llava/model/multimodal_projector/base_projector.py``)."""
    tower_cfg = json.loads((ckpt / "vision_tower" / "config.json").read_text())
    tower = {}
    for shard in sorted((ckpt / "vision_tower").glob("model-*.safetensors")):
        tower.update(load_file(shard))
    proj = {k: v.to(torch.float64) for k, v in load_file(ckpt / "mm_projector" / "model.safetensors").items()}

    size = tower_cfg["image_size"]
    rgb = np.asarray(image.convert("RGB").resize((size, size), PIL.Image.BICUBIC), dtype=np.float64) / 255
    rgb = (rgb - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    pixels = torch.from_numpy(rgb).permute(2, 0, 1)[None]  # (1, 3, 448, 448)

    states = ref_forward(tower, SimpleNamespace(**tower_cfg), pixels)  # every hidden state, float64
    x = states[-2][:, 1:]  # (1, 1024, 32)
    n, c = 1, tower_cfg["hidden_size"]
    h = w = size // tower_cfg["patch_size"]  # a 32x32 grid of patches
    x = x.reshape(n, h, w, c)
    x = x.reshape(n, w, h // 2, c * 2).permute(0, 2, 1, 3).reshape(n, h // 2, w // 2, c * 4).permute(0, 2, 1, 3)
    x = x.reshape(n, -1, c * 4)  # (1, 256, 128)
    x = torch.nn.functional.layer_norm(x, (c * 4,), proj["layers.1.weight"], proj["layers.1.bias"], eps=1e-5)
    x = x @ proj["layers.2.weight"].T + proj["layers.2.bias"]
    x = 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
    return (x @ proj["layers.4.weight"].T + proj["layers.4.bias"])[0]


def test_image_embeddings_equal_a_hand_computation(model, ckpt, image):
    """The image's embeddings in the LLM input equal :func:`reference_image_embeddings`."""
    prepared = model.prepare(vila.model.vila.to_turns([image, "Describe the image."]))
    expected = reference_image_embeddings(ckpt, image)
    assert expected.shape == (256, 64)
    end = len(model.tokenizer("\n").input_ids)  # the end-token embedding keeps its BOS, as the reference
    assert prepared.media_tokens == [256 + end]
    ids = prepared.input_ids.tolist()
    pos = ids.index(model.media_token_ids["image"])
    got = prepared.inputs_embeds[pos : pos + 256]
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)
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
    argv = ["-m", str(ckpt), "--device", "cpu", "--media", str(path), "--text", "Describe the image."]
    rc = cli_main([*argv, "--max-new-tokens", "6"])  # the CPU, as the fixture model: the same answer on a GPU machine
    out = capsys.readouterr().out.strip()
    assert rc == 0
    assert out == model.generate([image, "Describe the image."], max_new_tokens=6).text
