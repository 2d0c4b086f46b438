"""Several GPUs: ``devices=`` / ``--devices``, ``max_memory``, ``device_map`` (vila.device.plan_placement).

No GPU here: CUDA is faked where a test needs it, and the tests check what is handed to transformers /
accelerate and where the vision tower and projector go (the first device, where the LLM's embeddings are).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import transformers
from conftest import TINY

import vila
from vila.cli import main as cli_main
from vila.device import parse_devices, parse_max_memory, plan_placement
from vila.errors import DeviceError, UsageError

BASE = TINY / "vila15-tiny"
GIB = 1024**3


def load_module():
    """The module that defines ``vila.load`` (its name differs, so importing it never shadows the function)."""
    import vila.loading

    assert callable(vila.load) and vila.load is vila.loading.load
    return vila.loading


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
    """The reference's ``devices=[0, 1]``: ``max_memory`` = total memory of each listed GPU (spec §9.3)."""
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


def test_no_cuda_is_a_device_error():
    with pytest.raises(DeviceError, match="CUDA is not available"):
        plan_placement(None, None, "0,1", None)
    with pytest.raises(DeviceError, match="names GPU"):
        plan_placement(None, None, None, "0=1GiB")


def test_missing_gpu_is_a_device_error(two_gpus):
    with pytest.raises(DeviceError, match="GPU 2 does not exist: 2 CUDA device"):
        plan_placement(None, None, [0, 2], None)


def test_parse_devices_accepts_cuda_names():
    assert parse_devices("cuda:0,cuda:1") == [0, 1] and parse_devices([2, "3"]) == [2, 3]


@pytest.fixture
def spy_load(monkeypatch):
    """Record the LLM kwargs and the devices the tower and projector are built on; load everything on CPU."""
    seen: dict = {"llm": None, "tower": None, "projector": None}
    original_llm = transformers.AutoModelForCausalLM.from_pretrained
    module = load_module()
    original_tower, original_projector = module.build_tower, module.load_projector

    def llm(path, **kwargs):
        seen["llm"] = dict(kwargs)
        kwargs.update(device_map={"": "cpu"}, dtype=torch.float32)
        kwargs.pop("max_memory", None)
        return original_llm(path, **kwargs)

    def tower(cfg, folder, dtype, device):
        seen["tower"] = device
        return original_tower(cfg, folder, torch.float32, "cpu")

    def projector(cfg, folder, dtype, device):
        seen["projector"] = device
        return original_projector(cfg, folder, torch.float32, torch.device("cpu"))

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", llm)
    monkeypatch.setattr(module, "build_tower", tower)
    monkeypatch.setattr(module, "load_projector", projector)
    return seen


def test_load_with_devices_passes_auto_map_and_max_memory(two_gpus, spy_load, monkeypatch):
    # Pretend accelerate put the embeddings (hence the first shard) on cuda:0; stop before the model is assembled.
    cuda0 = SimpleNamespace(weight=SimpleNamespace(device=torch.device("cuda", 0)))
    monkeypatch.setattr(transformers.LlamaForCausalLM, "get_input_embeddings", lambda self: cuda0)
    monkeypatch.setattr(load_module(), "VilaModel", lambda *parts: parts)
    cfg, tokenizer, llm, tower, projector, conv_mode = vila.load(BASE, devices=[0, 1])
    assert spy_load["llm"]["device_map"] == "auto"
    assert spy_load["llm"]["max_memory"] == {0: 80 * GIB, 1: 81 * GIB}
    assert spy_load["llm"]["dtype"] == torch.bfloat16  # CUDA default
    assert spy_load["tower"] == torch.device("cuda", 0) and spy_load["projector"] == torch.device("cuda", 0)
    assert conv_mode == "vicuna_v1"


def test_load_with_max_memory_on_cpu_runs_through_accelerate(spy_load, monkeypatch):
    """``max_memory`` alone means ``device_map="auto"``; on CPU accelerate places everything on the CPU."""
    model = vila.load(BASE, max_memory={"cpu": "2GiB"}, dtype="float32")
    assert spy_load["llm"]["device_map"] == "auto" and spy_load["llm"]["max_memory"] == {"cpu": "2GiB"}
    assert spy_load["tower"] == torch.device("cpu") and model.generate("Hi", max_new_tokens=2).token_ids


def test_accelerate_shards_the_llm_and_keeps_embeddings_on_the_first_gpu():
    """What ``device_map="auto"`` + ``max_memory`` does inside ``from_pretrained``: accelerate splits the layers
    over the GPUs in order, so the embeddings (and with them tower and projector) are on the first one."""
    from accelerate import infer_auto_device_map

    from vila.meta import meta_from_folder

    llm = meta_from_folder(BASE).llm
    size = sum(p.numel() * 4 for p in llm.parameters())
    device_map = infer_auto_device_map(
        llm, max_memory={0: size // 2, 1: size}, no_split_module_classes=llm._no_split_modules, dtype=torch.float32
    )
    assert device_map["model.embed_tokens"] == 0
    assert set(device_map.values()) == {0, 1}


def test_cli_devices_and_max_memory(capsys):
    argv = ["-m", str(BASE), "--text", "Hi", "--max-new-tokens", "2"]
    assert cli_main([*argv, "--devices", "0,1"]) == DeviceError.exit_code
    assert "CUDA is not available" in capsys.readouterr().err
    assert cli_main([*argv, "--devices", "0", "--device", "cpu"]) == UsageError.exit_code
    assert cli_main([*argv, "--max-memory", "cpu=2GiB", "--dtype", "float32"]) == 0
    assert capsys.readouterr().out.strip() != ""
