"""The single-folder ``-hf`` layout: tiny checkpoints converted with scripts/convert_checkpoint.py load to the same
model as their original layout (same weights, logits and greedy ids), and a broken one fails naming the key."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import TINY

import vila
from vila.config import parse_config
from vila.errors import CheckpointError, UsageError
from vila.model.vila import to_turns

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "convert_checkpoint.py"
VARIANTS = ["nvila-tiny", "nvila-lite-tiny"]


def converter():
    spec = importlib.util.spec_from_file_location("convert_checkpoint", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def image() -> PIL.Image.Image:
    rng = np.random.default_rng(0)
    return PIL.Image.fromarray(rng.integers(0, 256, (500, 700, 3), dtype=np.uint8))


PROMPT = ["Describe the image."]


def logits(model) -> torch.Tensor:
    prepared = model.prepare(to_turns([image(), *PROMPT]))
    with torch.no_grad():
        return model.forward(inputs_embeds=prepared.inputs_embeds[None])


def greedy_ids(model) -> list[int]:
    return model.generate([image(), *PROMPT], max_new_tokens=6).token_ids


@pytest.mark.parametrize("variant", VARIANTS)
def test_round_trip_loads_the_same_model(variant, tmp_path):
    convert = converter().convert
    hf = convert(TINY / variant, tmp_path / "hf")
    back = convert(hf, tmp_path / "back")

    top = json.loads((hf / "config.json").read_text())
    assert top["model_type"] == ("nvila" if variant == "nvila-tiny" else "nvila_lite")
    assert {"text_config", "vision_config", "image_token_id", "video_token_id"} <= set(top)
    assert not (hf / "llm").exists() and (hf / "tokenizer.json").exists()
    from safetensors import safe_open

    with safe_open(str(hf / "model.safetensors"), "pt") as f:
        prefixes = {k.split(".")[0] for k in f.keys()}  # noqa: SIM118
    assert prefixes == {"llm", "vision_tower", "mm_projector"}

    original = vila.load(TINY / variant, device="cpu")
    single = vila.load(hf, device="cpu")
    again = vila.load(back, device="cpu")
    assert parse_config(hf).layout == "hf" and parse_config(back).layout == "original"
    models = (original, single, again)
    for model in models[1:]:
        for part in ("llm", "vision_tower", "mm_projector"):
            got, want = getattr(model, part).state_dict(), getattr(original, part).state_dict()
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), part
    want_logits, *others = [logits(m) for m in models]
    assert all(torch.equal(got, want_logits) for got in others)
    want_ids, *others = [greedy_ids(m) for m in models]
    assert all(got == want_ids for got in others) and want_ids


def test_tied_embeddings_are_left_out_and_tied_again(tmp_path):
    """A tied LLM has no ``llm.lm_head.weight`` in the single-folder layout; loading ties it to the embeddings."""
    src = tmp_path / "tied"
    convert = converter().convert
    hf = convert(TINY / "nvila-lite-tiny", tmp_path / "hf")
    top = json.loads((hf / "config.json").read_text())
    top["text_config"]["tie_word_embeddings"] = True
    from safetensors.torch import load_file, save_file

    state = load_file(hf / "model.safetensors")
    state["llm.model.embed_tokens.weight"] = state["llm.lm_head.weight"].clone()
    del state["llm.lm_head.weight"]
    src.mkdir()
    for f in hf.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            (src / f.name).write_bytes(f.read_bytes())
    (src / "config.json").write_text(json.dumps(top))
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})

    model = vila.load(src, device="cpu")
    assert model.llm.lm_head.weight.data_ptr() == model.llm.model.embed_tokens.weight.data_ptr()
    want = state["llm.model.embed_tokens.weight"].float()
    assert torch.equal(model.llm.lm_head.weight, want)
    assert model.llm.model.rotary_emb.inv_freq.device.type == "cpu"  # recomputed, not left on meta
    back = convert(src, tmp_path / "back")
    from safetensors import safe_open

    with safe_open(str(back / "llm" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()  # noqa: SIM118


@pytest.mark.parametrize(
    ("key", "component"),
    [
        ("llm.model.norm.weight", "language model"),
        ("vision_tower.vision_model.embeddings.patch_embedding.weight", "vision tower"),
        ("mm_projector.layers.4.weight", "projector"),
    ],
)
def test_missing_key_is_named_in_one_line(key, component, tmp_path):
    hf = converter().convert(TINY / "nvila-tiny", tmp_path / "hf")
    from safetensors.torch import load_file, save_file

    state = load_file(hf / "model.safetensors")
    del state[key]
    save_file(state, hf / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"{component} weights .*missing \\(e.g. {key}\\)") as info:
        vila.load(hf, device="cpu")
    assert "\n" not in str(info.value)


def test_config_key_missing_or_wrong_is_named(tmp_path):
    hf = converter().convert(TINY / "nvila-tiny", tmp_path / "hf")
    top = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**top, "image_token_id": top["image_token_id"] + 7}))
    with pytest.raises(CheckpointError, match="image_token_id") as info:
        vila.load(hf, device="cpu")
    assert "\n" not in str(info.value)
    for key, bad, said in (
        ("text_config", "x", "text_config must be an object, got str"),
        ("vision_config", [1], "vision_config must be an object, got list"),
        ("image_token_id", "abc", "image_token_id must be an integer, got 'abc'"),
    ):
        (hf / "config.json").write_text(json.dumps({**top, key: bad}))
        with pytest.raises(CheckpointError, match=said):
            parse_config(hf)
    del top["vision_config"]
    (hf / "config.json").write_text(json.dumps(top))
    with pytest.raises(CheckpointError, match="vision_config is missing"):
        parse_config(hf)


def test_converter_refuses_what_it_cannot_write(tmp_path):
    convert = converter().convert
    with pytest.raises(UsageError, match="already in the original layout"):
        convert(TINY / "nvila-tiny", tmp_path / "x", to="original")
    with pytest.raises(UsageError, match="single-folder layout"):
        convert(TINY / "vila15-tiny", tmp_path / "y")
    assert converter().main([str(TINY / "nvila-tiny"), str(tmp_path / "z"), "--to", "original"]) == 2


def test_single_folder_llm_refuses_quantisation_and_device_maps(tmp_path):
    """transformers' from_pretrained (8-/4-bit, several devices) reads a folder, not a prefix inside one file."""
    from vila.model.llm import load_llm

    hf = converter().convert(TINY / "nvila-tiny", tmp_path / "hf")
    source = parse_config(hf).llm_source
    assert source.prefix == "llm."
    with pytest.raises(CheckpointError, match=r"cannot be quantised or spread over devices yet; use the original"):
        load_llm(source, torch.float32, {"": "cpu"}, {"max_memory": {"cpu": "1GiB"}})


def test_sharded_conversion_loads_the_same_weights(tmp_path):
    """Shards planned from the headers (a tiny shard size forces several) hold every tensor once, and the index
    names the shard of each."""
    convert = converter().convert
    hf = convert(TINY / "nvila-lite-tiny", tmp_path / "hf", shard_gb=2e-4)  # ~200 kB shards
    shards = sorted(hf.glob("model-*-of-*.safetensors"))
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    assert len(shards) > 2 and set(index["weight_map"].values()) == {p.name for p in shards}
    original, single = vila.load(TINY / "nvila-lite-tiny", device="cpu"), vila.load(hf, device="cpu")
    for part in ("llm", "vision_tower", "mm_projector"):
        got, want = getattr(single, part).state_dict(), getattr(original, part).state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want), part


def test_meta_build_of_a_single_folder_checkpoint(tmp_path):
    """vila.meta reads the nested configs of an -hf checkpoint: the same shapes as its original layout."""
    from vila.meta import meta_from_folder

    hf = converter().convert(TINY / "nvila-tiny", tmp_path / "hf")
    want, got = meta_from_folder(TINY / "nvila-tiny"), meta_from_folder(hf)
    for part in ("llm", "vision_tower", "mm_projector"):
        a, b = getattr(want, part).state_dict(), getattr(got, part).state_dict()
        assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}, part
