"""LoRA adapters (as NVlabs/VILA ``llava/model/builder.py`` loads them) on the tiny VILA1.5 checkpoint: an adapter
in the layout VILA training writes (names of the reference's whole model), for the LLM, the vision tower and the
projector."""

from __future__ import annotations

import json
from pathlib import Path

import PIL.Image
import pytest
import torch
from conftest import INPUTS, TINY
from safetensors.torch import save_file

import vila
from vila.cli import main as cli_main
from vila.errors import CheckpointError, UnsupportedModelError
from vila.lora import apply_lora

BASE = TINY / "vila15-tiny"
R, ALPHA = 4, 8  # scale alpha / r = 2
LLM_TARGETS = [f"llm.model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
TOWER_TARGETS = [f"vision_tower.vision_tower.vision_model.encoder.layers.{i}.self_attn.q_proj" for i in range(2)]
PROJ_TARGETS = ["mm_projector.layers.2"]
PROMPT_TEXT = "Describe the image."


def shapes_of(model: vila.model.vila.VilaModel) -> dict[str, tuple[int, int]]:
    """(out, in) of every target, looked up in the reference names' equivalents."""
    out = {}
    for t in LLM_TARGETS:
        out[t] = tuple(model.llm.get_submodule(t[4:]).weight.shape)
    for t in TOWER_TARGETS:  # layer 1 is after the selected layer (-2) and not kept here: same shape as layer 0
        out[t] = tuple(model.vision_tower.layers[0].self_attn.q_proj.weight.shape)
    out[PROJ_TARGETS[0]] = tuple(model.mm_projector.layers[2].weight.shape)
    return out


def write_adapter(
    folder: Path, shapes: dict[str, tuple[int, int]], *, prefix: str = "base_model.model.", fmt: str = "safetensors"
) -> dict[str, torch.Tensor]:
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, (out_f, in_f) in shapes.items():
        tensors[f"{prefix}{name}.lora_A.weight"] = 0.2 * torch.randn(R, in_f, generator=g)
        tensors[f"{prefix}{name}.lora_B.weight"] = 0.2 * torch.randn(out_f, R, generator=g)
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "r": R,
        "lora_alpha": ALPHA,
        "lora_dropout": 0.05,
        "bias": "none",
        "target_modules": sorted(shapes),
        "fan_in_fan_out": False,
        "base_model_name_or_path": str(BASE),
        "inference_mode": True,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    if fmt == "safetensors":
        save_file(tensors, str(folder / "adapter_model.safetensors"))
    else:
        torch.save(tensors, folder / "adapter_model.bin")
    return tensors


def load_base() -> vila.model.vila.VilaModel:
    return vila.load(BASE, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def image() -> PIL.Image.Image:
    return PIL.Image.open(INPUTS / "demo_img.png").convert("RGB")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    folder = tmp_path_factory.mktemp("lora") / "vila15-tiny-lora"
    tensors = write_adapter(folder, shapes_of(load_base()))
    # The projector trained without LoRA: full weights in the (pickled) non_lora_trainables.bin.
    torch.save(
        {"base_model.model.mm_projector.layers.4.bias": torch.full((64,), 0.25)}, folder / "non_lora_trainables.bin"
    )
    return folder, tensors


def delta(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    a = tensors[f"base_model.model.{name}.lora_A.weight"]
    b = tensors[f"base_model.model.{name}.lora_B.weight"]
    return (ALPHA / R) * b @ a


def test_merged_weights_equal_base_plus_scaled_update(adapter):
    folder, tensors = adapter
    base = load_base()
    before = {
        "llm": base.llm.model.layers[1].self_attn.v_proj.weight.clone(),
        "tower": base.vision_tower.layers[0].self_attn.q_proj.weight.clone(),
        "proj": base.mm_projector.layers[2].weight.clone(),
    }
    model = vila.load(BASE, device="cpu", dtype="float32", lora=folder)
    torch.testing.assert_close(
        model.llm.model.layers[1].self_attn.v_proj.weight,
        before["llm"] + delta(tensors, "llm.model.layers.1.self_attn.v_proj"),
    )
    torch.testing.assert_close(
        model.vision_tower.layers[0].self_attn.q_proj.weight,
        before["tower"] + delta(tensors, TOWER_TARGETS[0]),
    )
    torch.testing.assert_close(
        model.mm_projector.layers[2].weight, before["proj"] + delta(tensors, "mm_projector.layers.2")
    )
    torch.testing.assert_close(model.mm_projector.layers[4].bias, torch.full((64,), 0.25))
    # merged: plain modules again, no peft layers left behind
    assert type(model.llm.model.layers[1].self_attn.v_proj) is torch.nn.Linear
    assert type(model.mm_projector.layers[2]) is torch.nn.Linear


def test_merged_and_unmerged_give_the_same_answer(adapter, image):
    folder, _ = adapter
    merged = vila.load(BASE, device="cpu", dtype="float32", lora=folder)
    unmerged = apply_lora(load_base(), folder, merge=False)
    from peft.tuners.lora import LoraLayer

    assert isinstance(unmerged.llm.model.layers[0].self_attn.q_proj, LoraLayer)
    prompt = [image, PROMPT_TEXT]
    a = merged.prepare(vila.model.vila.to_turns(prompt))
    b = unmerged.prepare(vila.model.vila.to_turns(prompt))
    torch.testing.assert_close(a.inputs_embeds, b.inputs_embeds, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        la = merged.llm(inputs_embeds=a.inputs_embeds[None]).logits
        lb = unmerged.llm(inputs_embeds=b.inputs_embeds[None]).logits
    torch.testing.assert_close(la, lb, rtol=1e-3, atol=1e-3)  # merge rounding, fp32
    assert merged.generate(prompt, max_new_tokens=8).token_ids == unmerged.generate(prompt, max_new_tokens=8).token_ids


def test_adapter_changes_the_model(adapter, image):
    folder, _ = adapter
    base, adapted = load_base(), vila.load(BASE, device="cpu", dtype="float32", lora=folder)
    a = base.prepare(vila.model.vila.to_turns([image, PROMPT_TEXT]))
    b = adapted.prepare(vila.model.vila.to_turns([image, PROMPT_TEXT]))
    assert not torch.allclose(a.inputs_embeds, b.inputs_embeds)  # tower + projector adapted
    with torch.no_grad():
        la = base.llm(inputs_embeds=a.inputs_embeds[None]).logits
        lb = adapted.llm(inputs_embeds=a.inputs_embeds[None]).logits
    assert not torch.allclose(la, lb)  # LLM adapted


def test_plain_llm_adapter_in_bin_format(tmp_path):
    """An adapter of the bare LLM (PeftModel over the causal LM) in the older pickled format."""
    base = load_base()
    shapes = {"model.layers.0.self_attn.q_proj": tuple(base.llm.model.layers[0].self_attn.q_proj.weight.shape)}
    tensors = write_adapter(tmp_path / "a", shapes, fmt="bin")
    w = base.llm.model.layers[0].self_attn.q_proj.weight.clone()
    apply_lora(base, tmp_path / "a")
    expected = (
        w
        + (ALPHA / R)
        * tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
        @ (tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"])
    )
    torch.testing.assert_close(base.llm.model.layers[0].self_attn.q_proj.weight, expected)


def test_cli_lora_path(adapter, image, tmp_path, capsys):
    folder, _ = adapter
    path = tmp_path / "img.png"
    image.save(path)
    argv = ["-m", str(BASE), "--device", "cpu", "--lora-path", str(folder), "--media", str(path), "--text", PROMPT_TEXT]
    assert cli_main([*argv, "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out.strip()
    merged = vila.load(BASE, device="cpu", dtype="float32", lora=folder)
    assert out == merged.generate([image, PROMPT_TEXT], max_new_tokens=6).text


def test_adapter_for_another_base_model_is_a_clear_error(tmp_path):
    write_adapter(tmp_path / "a", {"llm.model.layers.7.self_attn.q_proj": (64, 64)})
    with pytest.raises(CheckpointError, match="do not exist in the llm"):
        apply_lora(load_base(), tmp_path / "a")


def test_wrong_shapes_are_a_clear_error(tmp_path):
    write_adapter(tmp_path / "a", {"llm.model.layers.0.self_attn.q_proj": (64, 65)})
    with pytest.raises(CheckpointError, match="do not fit the llm"):
        apply_lora(load_base(), tmp_path / "a")


def test_not_an_adapter_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not a LoRA adapter"):
        apply_lora(load_base(), BASE)
    with pytest.raises(CheckpointError, match="LoRA adapter not found"):
        apply_lora(load_base(), tmp_path / "missing")


def test_other_peft_types_are_refused(adapter, tmp_path):
    folder, _ = adapter
    (tmp_path / "ia3").mkdir()
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (tmp_path / "ia3" / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(UnsupportedModelError, match="only LoRA"):
        apply_lora(load_base(), tmp_path / "ia3")
