"""8-/4-bit loading (vila.quantization): the configs handed to transformers, the one-line errors where bitsandbytes
cannot run, and, on a CUDA machine with bitsandbytes, real 8-/4-bit layers in the LLM with a 16-bit vision side."""

from __future__ import annotations

import importlib.machinery
from importlib.util import find_spec

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
CAN_QUANTIZE = torch.cuda.is_available() and find_spec("bitsandbytes") is not None


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
    """Record what vila passes to ``AutoModelForCausalLM.from_pretrained``, then load as asked."""
    calls: list[dict] = []
    original = transformers.AutoModelForCausalLM.from_pretrained

    def spy(path, **kwargs):
        calls.append(dict(kwargs))
        return original(path, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    return calls


@pytest.mark.skipif(CAN_QUANTIZE, reason="this machine can quantise (CUDA and bitsandbytes)")
def test_this_machine_gets_one_clear_line_before_any_weight_is_read(spy_from_pretrained):
    with pytest.raises(DeviceError) as e:
        vila.load(BASE, quantization="8bit")
    assert "\n" not in str(e.value) and ("bitsandbytes" in str(e.value) or "CUDA" in str(e.value))
    assert spy_from_pretrained == []


@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_cpu_device_gets_one_clear_line_on_any_machine(mode, spy_from_pretrained):
    """``device="cpu"`` cannot quantise with or without a GPU in the machine; no weight is read."""
    with pytest.raises(DeviceError, match="bitsandbytes|CUDA") as e:
        vila.load(BASE, device="cpu", dtype="bfloat16", quantization=mode)
    assert "\n" not in str(e.value) and spy_from_pretrained == []


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


@pytest.mark.skipif(not CAN_QUANTIZE, reason="needs CUDA and bitsandbytes")
@pytest.mark.parametrize("mode, layer", [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_quantised_load_builds_bitsandbytes_layers_and_a_16_bit_vision_side(mode, layer, spy_from_pretrained):
    import bitsandbytes as bnb

    model = vila.load(BASE, device="cuda", dtype="bfloat16", quantization=mode)
    (kwargs,) = spy_from_pretrained
    q = kwargs["quantization_config"]
    assert q.load_in_4bit == (mode == "4bit") and q.load_in_8bit == (mode == "8bit")
    assert sum(isinstance(m, getattr(bnb.nn, layer)) for m in model.llm.modules()) > 0
    plain = [name for name, m in model.llm.model.layers.named_modules() if type(m) is torch.nn.Linear]
    assert plain == []  # every projection of the decoder layers is quantised
    assert {p.dtype for p in model.vision_tower.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.mm_projector.parameters()} == {torch.bfloat16}
    assert model.generate([vila.Image(INPUTS / "demo_img.png"), "Hi"], max_new_tokens=2).token_ids


def test_cli_flags(monkeypatch, spy_from_pretrained, capsys):
    image = str(INPUTS / "demo_img.png")
    argv = ["-m", str(BASE), "--device", "cpu", "--media", image, "--text", "Hi"]
    assert cli_main([*argv, "--load-4bit"]) == DeviceError.exit_code  # on the CPU whatever the machine
    err = capsys.readouterr().err.strip()
    assert err.startswith("vila-infer: error:") and "\n" not in err and spy_from_pretrained == []
    with pytest.raises(SystemExit) as e:
        cli_main(["-m", str(BASE), "--load-4bit", "--load-8bit", "--text", "Hi"])
    assert e.value.code == 2

    seen: list = []

    def load(*args, **kwargs):
        seen.append(kwargs.get("quantization"))
        raise DeviceError("stop here")

    monkeypatch.setattr(vila, "load", load)
    for flags, mode in ((["--load-8bit"], "8bit"), (["--load-4bit"], "4bit"), ([], None)):
        assert cli_main([*argv, *flags]) == DeviceError.exit_code
        assert seen.pop() == mode, flags
