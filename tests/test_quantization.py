"""8-/4-bit loading (vila.quantization): the configs handed to transformers, the 16-bit vision side, and the one-line
errors on a machine where bitsandbytes cannot run (this CPU-only test machine)."""

from __future__ import annotations

import importlib.machinery

import pytest
import torch
import transformers
from conftest import INPUTS, TINY
from transformers import BitsAndBytesConfig

import vila
from vila.cli import main as cli_main
from vila.errors import DeviceError, UsageError
from vila.quantization import check_runtime, quantization_config

BASE = TINY / "vila15-tiny"


def test_4bit_is_the_reference_recipe():
    q = quantization_config("4bit", torch.float16)
    assert q.load_in_4bit and not q.load_in_8bit
    assert q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.float16
    assert quantization_config("nf4", torch.bfloat16).bnb_4bit_compute_dtype == torch.bfloat16


def test_8bit_and_passthrough():
    q = quantization_config("8bit", torch.bfloat16)
    assert q.load_in_8bit and not q.load_in_4bit
    mine = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4")
    assert quantization_config(mine, torch.float16) is mine
    assert quantization_config(None, torch.float16) is None


def test_unknown_mode_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown quantization '3bit'"):
        quantization_config("3bit", torch.float16)


@pytest.fixture
def spy_from_pretrained(monkeypatch):
    """Record what vila passes to ``AutoModelForCausalLM.from_pretrained``; load unquantised weights on CPU."""
    calls: list[dict] = []
    original = transformers.AutoModelForCausalLM.from_pretrained

    def spy(path, **kwargs):
        calls.append(dict(kwargs))
        kwargs.pop("quantization_config", None)
        return original(path, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    return calls


def test_this_machine_gets_one_clear_line_before_any_weight_is_read(spy_from_pretrained):
    with pytest.raises(DeviceError) as e:
        vila.load(BASE, quantization="8bit")
    assert "\n" not in str(e.value) and ("bitsandbytes" in str(e.value) or "CUDA" in str(e.value))
    assert spy_from_pretrained == []


def test_without_cuda_even_with_bitsandbytes_installed(monkeypatch):
    monkeypatch.setattr("vila.quantization.find_spec", lambda name: importlib.machinery.ModuleSpec(name, None))
    with pytest.raises(DeviceError, match="needs a CUDA GPU"):
        check_runtime(torch.device("cpu"), torch.float16)


def test_bitsandbytes_missing(monkeypatch):
    monkeypatch.setattr("vila.quantization.find_spec", lambda name: None)
    with pytest.raises(DeviceError, match=r"pip install 'vila\[quant\]'"):
        check_runtime(torch.device("cuda"), torch.float16)


def test_fp32_is_refused_because_the_vision_side_stays_16_bit(monkeypatch):
    monkeypatch.setattr("vila.quantization.find_spec", lambda name: object())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(UsageError, match="16-bit"):
        check_runtime(torch.device("cuda"), torch.float32)


def test_plumbing_llm_quantised_tower_and_projector_16_bit(monkeypatch, spy_from_pretrained):
    """With the runtime check passed (as on a GPU), the LLM gets the bitsandbytes config and nothing else does."""
    monkeypatch.setattr("vila.quantization.check_runtime", lambda device, dtype: None)
    model = vila.load(BASE, device="cpu", dtype="bfloat16", quantization="4bit")
    (kwargs,) = spy_from_pretrained
    q = kwargs["quantization_config"]
    assert q.load_in_4bit and q.bnb_4bit_compute_dtype == torch.bfloat16
    assert kwargs["dtype"] == torch.bfloat16 and kwargs["device_map"] == {"": torch.device("cpu")}
    assert {p.dtype for p in model.vision_tower.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.mm_projector.parameters()} == {torch.bfloat16}
    assert model.generate("Hi", max_new_tokens=2).token_ids  # the rest of the pipeline is unchanged


def test_cli_flags(monkeypatch, spy_from_pretrained, capsys):
    image = str(INPUTS / "demo_img.png")
    assert cli_main(["-m", str(BASE), "--load-4bit", "--media", image, "--text", "Hi"]) == DeviceError.exit_code
    err = capsys.readouterr().err.strip()
    assert err.startswith("vila-infer: error:") and "\n" not in err
    with pytest.raises(SystemExit) as e:
        cli_main(["-m", str(BASE), "--load-4bit", "--load-8bit", "--text", "Hi"])
    assert e.value.code == 2
    monkeypatch.setattr("vila.quantization.check_runtime", lambda device, dtype: None)
    argv = ["-m", str(BASE), "--load-8bit", "--device", "cpu", "--dtype", "bfloat16", "--text", "Hi"]
    assert cli_main([*argv, "--max-new-tokens", "2"]) == 0
    assert spy_from_pretrained[-1]["quantization_config"].load_in_8bit
