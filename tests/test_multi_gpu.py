"""Several GPUs: ``devices=`` / ``--devices``, ``max_memory``, ``device_map`` (vila.device.plan_placement).

Without GPUs, CUDA is faked where a test needs it, and the tests check what is handed to transformers and where
the vision tower and projector go (the first device, where the LLM's embeddings are); with two GPUs, a real split
answers like one GPU. Tests that need CUDA to be absent are skipped on a CUDA host.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import transformers
from conftest import INPUTS, TINY

import vila
from vila.cli import main as cli_main
from vila.device import parse_devices, parse_max_memory, plan_placement
from vila.errors import DeviceError, UsageError

BASE = TINY / "vila15-tiny"
GIB = 1024**3


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=(80 + i) * GIB))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


def test_single_device_default():
    dev, device_map, memory = plan_placement("cpu", None, None, None)
    assert dev == torch.device("cpu") and device_map == {"": torch.device("cpu")} and memory is None


def test_devices_is_auto_map_with_each_gpus_full_memory(two_gpus):
    """The reference's ``devices=[0, 1]``: ``max_memory`` = total memory of each listed GPU
    (``llava.load``, NVlabs/VILA ``llava/entry.py``)."""
    dev, device_map, memory = plan_placement(None, None, "0,1", None)
    assert dev == torch.device("cuda", 0) and device_map == "auto"
    assert memory == {0: 80 * GIB, 1: 81 * GIB}
    dev, _, memory = plan_placement(None, None, [1], None)
    assert dev == torch.device("cuda", 1) and memory == {1: 81 * GIB}


def test_max_memory_strings_and_dicts(two_gpus):
    dev, device_map, memory = plan_placement(None, None, None, "0=20GiB, 1=30GiB, cpu=64GiB")
    assert (
        memory == {0: "20GiB", 1: "30GiB", "cpu": "64GiB"} and device_map == "auto" and dev == torch.device("cuda", 0)
    )
    assert parse_max_memory({"cuda:1": "10GiB", "cpu": 5}) == {1: "10GiB", "cpu": 5}
    _, device_map, _ = plan_placement(None, "balanced", None, {1: "10GiB"})
    assert device_map == "balanced"


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(device="cpu", devices="0,1"), "either device or"),
        (dict(devices="0,1", max_memory="0=1GiB"), "either devices or max_memory"),
        (dict(devices="0,1", device_map={"": 0}), "implies device_map='auto'"),
        (dict(devices="a,b"), "GPU indices"),
        (dict(devices="0,0"), "distinct"),
        (dict(max_memory="0:20GiB"), "0=20GiB"),
        (dict(max_memory={"tpu": 1}), "not a GPU index"),
    ],
)
def test_bad_combinations_are_usage_errors(kwargs, message, two_gpus):
    args = dict(device=None, device_map=None, devices=None, max_memory=None) | kwargs
    with pytest.raises(UsageError, match=message):
        plan_placement(**args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_no_cuda_is_a_device_error():
    with pytest.raises(DeviceError, match="CUDA is not available"):
        plan_placement(None, None, "0,1", None)
    with pytest.raises(DeviceError, match="names GPU"):
        plan_placement(None, None, None, "0=1GiB")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_devices_on_a_cuda_host_take_each_gpus_full_memory():
    total = torch.cuda.get_device_properties(0).total_memory
    assert plan_placement(None, None, "0", None) == (torch.device("cuda", 0), "auto", {0: total})
    with pytest.raises(DeviceError, match="does not exist"):
        plan_placement(None, None, [torch.cuda.device_count()], None)


def test_missing_gpu_is_a_device_error(two_gpus):
    with pytest.raises(DeviceError, match="GPU 2 does not exist: 2 CUDA device"):
        plan_placement(None, None, [0, 2], None)


def test_parse_devices_accepts_cuda_names():
    assert parse_devices("cuda:0,cuda:1") == [0, 1] and parse_devices([2, "3"]) == [2, 3]


@pytest.fixture
def llm_kwargs(monkeypatch):
    """Record the keyword arguments vila passes to ``AutoModelForCausalLM.from_pretrained`` (a list, one per
    call); ``cpu_only`` loads the LLM on the CPU whatever the placement asked, for the faked GPUs."""
    calls: list[dict] = []
    original = transformers.AutoModelForCausalLM.from_pretrained

    def spy(path, **kwargs):
        calls.append({k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()})  # transformers edits them
        if spy.cpu_only:
            kwargs.pop("max_memory", None)
            kwargs["device_map"] = {"": "cpu"}
        return original(path, **kwargs)

    spy.cpu_only = False
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    return calls, spy


def devices_of(module: torch.nn.Module) -> set[torch.device]:
    return {p.device for p in module.parameters()}


def test_load_with_devices_passes_the_plan_and_puts_the_vision_side_with_the_embeddings(two_gpus, llm_kwargs):
    """``devices=[0, 1]`` reaches ``from_pretrained`` as ``device_map="auto"`` + each GPU's full memory, in bf16
    (the CUDA default); the tower and projector are then built where the loaded LLM's embeddings are (here the
    CPU, as the faked GPUs cannot hold weights), and the assembled model answers."""
    calls, spy = llm_kwargs
    spy.cpu_only = True
    model = vila.load(BASE, devices=[0, 1])
    (kwargs,) = calls
    assert kwargs["device_map"] == "auto" and kwargs["max_memory"] == {0: 80 * GIB, 1: 81 * GIB}
    assert kwargs["dtype"] == torch.bfloat16
    first = model.llm.get_input_embeddings().weight.device
    assert devices_of(model.vision_tower) == devices_of(model.mm_projector) == {first}
    assert {p.dtype for p in model.vision_tower.parameters()} == {torch.bfloat16}
    assert model.conv_mode == "vicuna_v1" and model.generate("Hi", max_new_tokens=2).token_ids


def test_load_with_max_memory_on_cpu_runs_through_accelerate(llm_kwargs, tiny_model):
    """``max_memory`` alone means ``device_map="auto"``; with only a CPU budget accelerate places every weight on
    the CPU, and the answer is the plain CPU load's."""
    calls, _ = llm_kwargs
    model = vila.load(BASE, max_memory={"cpu": "2GiB"}, dtype="float32")
    assert calls[-1]["device_map"] == "auto" and calls[-1]["max_memory"] == {"cpu": "2GiB"}
    cpu = {torch.device("cpu")}
    assert devices_of(model.llm) == devices_of(model.vision_tower) == devices_of(model.mm_projector) == cpu
    image = vila.Image(INPUTS / "demo_img.png")
    plain = tiny_model("vila15-tiny")
    assert (
        model.generate([image, "Hi"], max_new_tokens=4).token_ids
        == plain.generate([image, "Hi"], max_new_tokens=4).token_ids
    )


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_llm_split_over_two_gpus_answers_like_one_gpu():
    """A GPU 0 budget of less than the LLM makes accelerate put the rest on GPU 1; the vision side follows the
    embeddings and the greedy answer is the single-GPU one."""
    one = vila.load(BASE, device="cuda:0", dtype="float32")
    llm_bytes = sum(p.numel() * p.element_size() for p in one.llm.parameters())
    split = vila.load(BASE, max_memory={0: int(llm_bytes * 0.45), 1: 4 * llm_bytes}, dtype="float32")
    assert devices_of(split.llm) == {torch.device("cuda", 0), torch.device("cuda", 1)}
    first = split.llm.get_input_embeddings().weight.device
    assert first == torch.device("cuda", 0)
    assert devices_of(split.vision_tower) == devices_of(split.mm_projector) == {first}
    prompt = [vila.Image(INPUTS / "demo_img.png"), "Describe."]
    assert split.generate(prompt, max_new_tokens=6).token_ids == one.generate(prompt, max_new_tokens=6).token_ids


def test_cli_devices_and_max_memory(capsys):
    argv = ["-m", str(BASE), "--text", "Hi", "--max-new-tokens", "2"]
    missing = str(torch.cuda.device_count())  # one past the last GPU; GPU 0 when there is no CUDA
    assert cli_main([*argv, "--devices", missing]) == DeviceError.exit_code
    err = capsys.readouterr().err
    assert ("CUDA is not available" if not torch.cuda.is_available() else "does not exist") in err, err
    assert cli_main([*argv, "--devices", "0", "--device", "cpu"]) == UsageError.exit_code
    assert cli_main([*argv, "--max-memory", "cpu=2GiB", "--dtype", "float32"]) == 0
    assert capsys.readouterr().out.strip() != ""
