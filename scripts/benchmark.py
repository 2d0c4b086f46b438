#!/usr/bin/env python
"""Speed and memory benchmark for vila that anyone can rerun.

It runs on a tiny test checkpoint, on any local checkpoint, or on a *real-size architecture with random
weights* (shapes define the cost, so nothing is downloaded): the published NVILA configs in
``tests/fixtures/hf_configs`` are written to a temporary folder as a real checkpoint (config.json, llm/,
vision_tower/, mm_projector/, the tiny fixture's tokenizer) with the published checkpoints' tensor names, bf16
dtype, shard split and index files (:func:`published_layout`), and loaded through ``vila.load`` like any other.

    python scripts/benchmark.py                                  # tiny NVILA, every CPU sub-benchmark
    python scripts/benchmark.py --model nvila-lite-2b --runs 3   # NVILA-Lite-2B size, random weights
    python scripts/benchmark.py --model nvila-8b --device cuda --json bench.json
    python scripts/benchmark.py --only preprocess,vision --runs 10
    python scripts/benchmark.py --model nvila-lite-2b --only load,caption --runs 1 --warmup 0   # issue figures

Every figure is the median of ``--runs`` runs after ``--warmup`` runs, printed with min/max. Optimisations
are shown next to the straightforward code they replace, measured in the same process (ratio ours/baseline),
because shared machines are noisy. Each stage is also set against a lower bound measured on this machine
(matmul rate for FLOP-bound stages, memory bandwidth for decoding).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
TINY = FIXTURES / "tiny"
HF_CONFIGS = FIXTURES / "hf_configs"
SUB_BENCHMARKS = ("load", "preprocess", "request", "video", "vision", "cache", "caption", "static")
IMAGE_SIZE = (1344, 896)  # the preprocessing case: a 3:2 photo (dynamic_s2: 1 + 4 + 12 tiles)
PROMPT = "Describe the image in detail."


# -- real-size architectures -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Arch:
    """A real-size architecture: the published component configs on top of a tiny fixture's top config."""

    tiny: str  # fixture whose top config.json (mode flags), tokenizer and preprocessor config are reused
    llm: Callable[[], dict[str, Any]]
    vision: Callable[[], dict[str, Any]]
    projector: Callable[[], dict[str, Any]]
    about: str


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _nvila8b(key: str) -> Callable[[], dict[str, Any]]:
    return lambda: _json(HF_CONFIGS / "Efficient-Large-Model__NVILA-8B" / "config.json")[key]


def _shrunk(get: Callable[[], dict[str, Any]], **dims: Any) -> Callable[[], dict[str, Any]]:
    return lambda: {**get(), **dims}


_SMOKE_LLM = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)
_SMOKE_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2)

ARCHS = {
    "nvila-lite-2b": Arch(
        tiny="nvila-lite-tiny",
        llm=lambda: _json(HF_CONFIGS / "Efficient-Large-Model__qwen2-1.5b-longvila-256f/llm/config.json"),
        vision=lambda: _json(HF_CONFIGS / "Efficient-Large-Model__NVILA-Lite-2B-hf-preview/vision_tower/config.json"),
        projector=lambda: _json(
            HF_CONFIGS / "Efficient-Large-Model__NVILA-Lite-2B-hf-preview/mm_projector/config.json"
        ),
        about="NVILA-Lite-2B size: SigLIP-so400m 448px (27 layers), mlp_downsample_3x3_fix, Qwen2.5-1.5B-shaped LLM, dynamic tiling",
    ),
    "nvila-8b": Arch(
        tiny="nvila-tiny",
        llm=_nvila8b("llm_cfg"),
        vision=_nvila8b("vision_tower_cfg"),
        projector=_nvila8b("mm_projector_cfg"),
        about="NVILA-8B size: SigLIP-so400m 448px, mlp_downsample, Qwen2-7B-shaped LLM, dynamic_s2 (448/896/1344)",
    ),
    # NVILA-8B's structure (dynamic_s2, full vocabulary, tokenizer) at toy widths: the same code path in seconds.
    "nvila-8b-smoke": Arch(
        tiny="nvila-tiny",
        llm=_shrunk(_nvila8b("llm_cfg"), **_SMOKE_LLM),
        vision=_shrunk(_nvila8b("vision_tower_cfg"), **_SMOKE_VISION),
        projector=_nvila8b("mm_projector_cfg"),
        about="NVILA-8B structure at toy widths (tests and --smoke)",
    ),
}


def skeleton_checkpoint(arch: str, root: Path) -> Path:
    """Write an architecture's configs and the tiny fixture's tokenizer to ``root`` (no weights yet)."""
    spec = ARCHS[arch]
    tiny = TINY / spec.tiny
    llm, vision, projector = spec.llm(), spec.vision(), spec.projector()
    top = _json(tiny / "config.json")
    top.update(llm_cfg=llm, vision_tower_cfg=vision, mm_projector_cfg=projector, hidden_size=llm["hidden_size"])
    scales = len(str(top.get("s2_scales", "")).split(",")) if top.get("dynamic_s2") or top.get("s2") else 1
    top["mm_hidden_size"] = vision["hidden_size"] * scales
    top["_name_or_path"] = f"random-weights/{arch}"
    for name in ("llm", "vision_tower", "mm_projector"):
        (root / name).mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(top, indent=2) + "\n")
    (root / "llm" / "config.json").write_text(json.dumps(llm, indent=2) + "\n")
    (root / "vision_tower" / "config.json").write_text(json.dumps(vision, indent=2) + "\n")
    (root / "mm_projector" / "config.json").write_text(json.dumps(projector, indent=2) + "\n")
    shutil.copy(tiny / "vision_tower" / "preprocessor_config.json", root / "vision_tower")
    # The tiny tokenizer covers the first ~1.2k ids; the LLM's larger vocabulary is padding it never emits.
    for f in (tiny / "llm").iterdir():
        if f.name not in ("config.json", "model.safetensors", "generation_config.json"):
            shutil.copy(f, root / "llm" / f.name)
    return root


# Published checkpoints were saved by the reference's `save_pretrained` (NVlabs/VILA
# `llava/model/llava_arch.py`, `LlavaMetaModel.save_pretrained`) under transformers 4.x: every component
# folder through transformers' `save_pretrained` with its default `max_shard_size="5GB"`, split by
# huggingface_hub's `split_torch_state_dict_into_shards` in state-dict order. The published LLM listings
# agree: NVILA-Lite-8B-stage2's shards are 4.87 / 4.93 / 4.33 / 1.09 GB, the last holding `lm_head` alone.
MAX_SHARD_BYTES = 5_000_000_000
_ST_DTYPE = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


@dataclass
class ComponentLayout:
    """One component folder as transformers 4.x saves it: file name -> tensor names (state-dict order)."""

    shapes: dict[str, tuple[int, ...]]  # every stored tensor, in state-dict order
    files: dict[str, list[str]]
    dtype: torch.dtype = torch.bfloat16
    inits: dict[str, str] = field(default_factory=dict)  # name -> random_tensor init (default "normal")

    @property
    def sharded(self) -> bool:
        return len(self.files) > 1

    def nbytes(self, name: str) -> int:
        return math.prod(self.shapes[name]) * self.dtype.itemsize

    def total_size(self) -> int:
        return sum(self.nbytes(n) for n in self.shapes)

    def index(self) -> dict[str, Any] | None:
        """``model.safetensors.index.json`` (only written when there are several shards)."""
        if not self.sharded:
            return None
        weight_map = {n: f for f, names in self.files.items() for n in names}
        return {"metadata": {"total_size": self.total_size()}, "weight_map": weight_map}

    def index_text(self) -> str | None:
        index = self.index()
        # transformers 4.x writes the index with sorted keys, two-space indent and a final newline.
        return None if index is None else json.dumps(index, indent=2, sort_keys=True) + "\n"

    def header(self, fname: str) -> tuple[bytes, list[str]]:
        """The safetensors header of one file and its tensors in data order, as ``safetensors.torch.save``
        lays them out: sorted by name (all of one dtype), ``__metadata__`` first, padded to 8 bytes."""
        names = sorted(self.files[fname])
        head: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for n in names:
            size = self.nbytes(n)
            head[n] = {
                "dtype": _ST_DTYPE[self.dtype],
                "shape": list(self.shapes[n]),
                "data_offsets": [offset, offset + size],
            }
            offset += size
        raw = json.dumps(head, separators=(",", ":")).encode()
        return raw + b" " * (-len(raw) % 8), names

    def file_sizes(self) -> dict[str, int]:
        """Exact byte size of every file this layout writes (header + data)."""
        out = {}
        for fname, names in self.files.items():
            head, _ = self.header(fname)
            out[fname] = 8 + len(head) + sum(self.nbytes(n) for n in names)
        return out


def shard_layout(
    shapes: dict[str, tuple[int, ...]], dtype: torch.dtype = torch.bfloat16, max_shard_bytes: int = MAX_SHARD_BYTES
) -> ComponentLayout:
    """huggingface_hub's split (``split_state_dict_into_shards_factory``): walk the state dict in order, start
    a new shard when the next tensor would tip the current one over the limit; a tensor larger than the limit
    gets a shard of its own. One shard is ``model.safetensors``, several ``model-0000k-of-0000n.safetensors``."""
    shards: list[list[str]] = []
    current: list[str] = []
    used = 0
    for name, shape in shapes.items():
        size = math.prod(shape) * dtype.itemsize
        if size > max_shard_bytes:
            shards.append([name])
            continue
        if current and used + size > max_shard_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    if current:
        shards.append(current)
    if len(shards) == 1:
        files = {"model.safetensors": shards[0]}
    else:
        files = {f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors": s for i, s in enumerate(shards)}
    return ComponentLayout(dict(shapes), files, dtype)


def meta_components(
    top: dict[str, Any], llm: dict[str, Any], vision: dict[str, Any], projector: dict[str, Any]
) -> dict[str, tuple[torch.nn.Module, str, bool]]:
    """The three stored components built on the meta device from config dicts (nothing is allocated):
    ``folder -> (module, prefix of the published names, tied embeddings)``. The whole stored tower is built
    (every layer, post-LayerNorm, the pooling head where ``vision_use_head``), not the truncated one we run."""
    from transformers import AutoConfig, AutoModelForCausalLM, SiglipVisionConfig, SiglipVisionModel

    from vila.model.projector import MultimodalProjector

    drop = ("_name_or_path", "transformers_version", "architectures", "auto_map", "model_type")
    hf_llm = AutoConfig.for_model(llm["model_type"], **{k: v for k, v in llm.items() if k not in drop})
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(hf_llm)
        tower = SiglipVisionModel(SiglipVisionConfig(**{k: v for k, v in vision.items() if k not in drop}))
        proj = MultimodalProjector(projector["mm_projector_type"], top["mm_hidden_size"], llm["hidden_size"])
    # transformers 4.x (which saved every published tower) nests the tower under `vision_model`; 5.x dropped
    # that level from the module tree, so the published names are ours with the prefix put back.
    return {
        "llm": (lm, "", bool(getattr(hf_llm, "tie_word_embeddings", False))),
        "vision_tower": (tower, "vision_model.", False),
        "mm_projector": (proj, "", False),
    }


def published_layout(
    components: dict[str, tuple[torch.nn.Module, str, bool]],
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> dict[str, ComponentLayout]:
    """Per component folder, the files a published checkpoint holds (:func:`meta_components`): transformers
    4.x names, no tied ``lm_head`` (``save_pretrained`` drops the shared copy), ``dtype``, sharded as
    ``save_pretrained`` shards."""
    out = {}
    for folder, (module, prefix, tied) in components.items():
        shapes = {prefix + k: tuple(v.shape) for k, v in module.state_dict().items()}
        if tied:
            shapes.pop("lm_head.weight", None)
        layout = shard_layout(shapes, dtype, max_shard_bytes)
        layout.inits = {prefix + k: v for k, v in init_kinds(module).items()}
        out[folder] = layout
    return out


def checkpoint_components(root: Path) -> dict[str, tuple[torch.nn.Module, str, bool]]:
    """:func:`meta_components` from a checkpoint folder's JSON files."""
    return meta_components(
        _json(root / "config.json"),
        _json(root / "llm" / "config.json"),
        _json(root / "vision_tower" / "config.json"),
        _json(root / "mm_projector" / "config.json"),
    )


def init_kinds(module: torch.nn.Module) -> dict[str, str]:
    """``name -> "ones" | "zeros" | "normal"``: norm scales 1, biases 0, the rest small normal values."""
    kinds = {}
    for mname, mod in module.named_modules():
        for pname, _ in mod.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            if pname == "bias":
                kinds[full] = "zeros"
            elif "Norm" in type(mod).__name__:
                kinds[full] = "ones"
            else:
                kinds[full] = "normal"
    return kinds


def random_tensor(shape: tuple[int, ...], init: str, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """A CPU tensor; drawn on the generator's device (a GPU draws billions of values in milliseconds)."""
    if init == "ones":
        return torch.ones(shape, dtype=dtype)
    if init == "zeros":
        return torch.zeros(shape, dtype=dtype)
    # Small weights keep activations finite through dozens of layers; the values do not matter for speed.
    t = torch.empty(shape, dtype=torch.float32, device=gen.device).normal_(0.0, 0.02, generator=gen)
    return t.to(dtype).cpu()


def write_layout(folder: Path, layout: ComponentLayout, gen: torch.Generator) -> None:
    """Stream one component's random tensors to disk, one tensor in memory at a time, in exactly the bytes
    ``safetensors.torch.save_file`` would write; plus the index when sharded."""
    folder.mkdir(parents=True, exist_ok=True)
    for fname in layout.files:
        head, names = layout.header(fname)
        with open(folder / fname, "wb") as f:
            f.write(len(head).to_bytes(8, "little"))
            f.write(head)
            for n in names:
                t = random_tensor(layout.shapes[n], layout.inits.get(n, "normal"), layout.dtype, gen).contiguous()
                f.write(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    text = layout.index_text()
    if text is not None:
        (folder / "model.safetensors.index.json").write_text(text)


def write_random_weights(
    root: Path,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, int]:
    """Random weights for every component of a skeleton checkpoint, laid out as the published ones
    (:func:`published_layout`); returns the weight bytes per folder."""
    gen = torch.Generator(device=device).manual_seed(seed)
    layouts = published_layout(checkpoint_components(root), dtype, max_shard_bytes)
    for folder, layout in layouts.items():
        write_layout(root / folder, layout, gen)
    return {folder: layout.total_size() for folder, layout in layouts.items()}


def checkpoint_weight_bytes(root: Path, dtype: torch.dtype | None = None) -> int:
    """Bytes of every saved tensor (read from the safetensors headers), counted at ``dtype`` if given."""
    from safetensors import safe_open

    total = 0
    for f in sorted(root.glob("*/*.safetensors")):
        with safe_open(f, framework="pt") as st:
            for name in st.keys():
                s = st.get_slice(name)
                itemsize = dtype.itemsize if dtype is not None else _SAFETENSORS_ITEMSIZE[s.get_dtype()]
                total += math.prod(s.get_shape()) * itemsize
    return total


_SAFETENSORS_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "U8": 1, "I8": 1, "BOOL": 1}


def materialize(name: str, workdir: Path, dtype: torch.dtype, device: str = "cpu") -> Path:
    """A tiny fixture name, an architecture name (written once per dtype into ``workdir``) or a path."""
    if (TINY / name).is_dir():
        return TINY / name
    if name in ARCHS:
        root = workdir / f"{name}-{str(dtype).removeprefix('torch.')}"
        if not (root / ".complete").exists():
            shutil.rmtree(root, ignore_errors=True)
            skeleton_checkpoint(name, root)
            t0 = time.perf_counter()
            sizes = write_random_weights(root, dtype, device="cuda" if str(device).startswith("cuda") else "cpu")
            gb = sum(sizes.values()) / 1e9
            print(
                f"# wrote {name} with random {dtype} weights ({gb:.2f} GB) in {time.perf_counter() - t0:.0f} s to {root}"
            )
            (root / ".complete").write_text("ok\n")
        return root
    path = Path(name).expanduser()
    if not (path / "config.json").exists():
        known = ", ".join(sorted(ARCHS) + sorted(p.name for p in TINY.iterdir()))
        raise SystemExit(f"--model {name!r}: not a checkpoint folder; use a path or one of: {known}")
    return path


# -- measuring -------------------------------------------------------------------------------------------


@dataclass
class Stat:
    """Median / min / max of repeated measurements (seconds unless ``unit`` says otherwise)."""

    median: float
    min: float
    max: float
    n: int
    unit: str = "s"

    @classmethod
    def of(cls, values: list[float], unit: str = "s") -> Stat:
        return cls(statistics.median(values), min(values), max(values), len(values), unit)

    def fmt(self) -> str:
        if self.unit == "s":
            med, lo, hi = (_secs(v) for v in (self.median, self.min, self.max))
        else:
            med, lo, hi = (f"{v:.4g}" for v in (self.median, self.min, self.max))
            med += f" {self.unit}"
        return f"{med:>11}  [{lo} .. {hi}]" if self.n > 1 else f"{med:>11}"


def _secs(v: float) -> str:
    if v >= 1:
        return f"{v:.3f} s"
    if v >= 1e-3:
        return f"{v * 1e3:.2f} ms"
    return f"{v * 1e6:.1f} us"


class Timer:
    """Wall time of a block, synchronising the accelerator before and after."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.device.type == "mps":
            torch.mps.synchronize()

    @contextlib.contextmanager
    def __call__(self) -> Iterator[list[float]]:
        out: list[float] = []
        self.sync()
        t0 = time.perf_counter()
        yield out
        self.sync()
        out.append(time.perf_counter() - t0)


def repeat(fn: Callable[[], Any], timer: Timer, runs: int, warmup: int) -> tuple[Stat, Any]:
    """Median of ``runs`` timed calls after ``warmup`` untimed ones; also returns the last result."""
    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(runs):
        with timer() as t:
            result = fn()
        times.append(t[0])
    return Stat.of(times), result


def compare(fns: dict[str, Callable[[], Any]], timer: Timer, runs: int, warmup: int) -> dict[str, tuple[Stat, Any]]:
    """Like :func:`repeat` for several functions, interleaved run by run (A B C A B C ...): on a shared
    machine the load drifts, and interleaving exposes every variant to the same drift."""
    results: dict[str, Any] = {}
    for _ in range(warmup):
        for name, fn in fns.items():
            results[name] = fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            with timer() as t:
                results[name] = fn()
            times[name].append(t[0])
    return {name: (Stat.of(times[name]), results[name]) for name in fns}


@dataclass
class Report:
    """Every figure of a benchmark run, printed as it comes and saved as JSON at the end."""

    machine: dict[str, Any]
    setup: dict[str, Any]
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)

    def add(self, section: str, name: str, value: Any, note: str = "") -> None:
        self.sections.setdefault(section, {})[name] = asdict(value) if isinstance(value, Stat) else value
        shown = value.fmt() if isinstance(value, Stat) else (f"{value:.4g}" if isinstance(value, float) else str(value))
        print(f"  {name:<44} {shown}{'   ' + note if note else ''}", flush=True)

    def ratio(self, section: str, name: str, ours: Stat, base: Stat) -> float:
        r = ours.median / base.median
        self.add(section, name, round(r, 4), f"(ours/baseline; {1 / r:.2f}x faster)" if r < 1 else "(ours/baseline)")
        return r


def machine_info(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    with contextlib.suppress(ImportError):
        import transformers

        info["transformers"] = transformers.__version__
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def matmul_rate(device: torch.device, dtype: torch.dtype, m: int, k: int, n: int, timer: Timer) -> float:
    """FLOP/s of an ``(m, k) @ (k, n)`` product, the shape of the stage it bounds."""
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    c = torch.empty(m, n, device=device, dtype=dtype)
    reps = max(1, int((2e11 if device.type != "cpu" else 4e9) / (2 * m * k * n)))

    def products() -> None:
        for _ in range(reps):
            torch.mm(a, b, out=c)

    stat, _ = repeat(products, timer, runs=3, warmup=1)
    return 2 * m * k * n * reps / stat.min  # the machine's best moment: a conservative (low) bound


def memory_bandwidth(device: torch.device, timer: Timer) -> float:
    """Read bandwidth in bytes/s: a sum over a buffer far larger than any cache (decoding reads weights once)."""
    n = (1 << 30) // 4 if device.type != "cpu" else (256 << 20) // 4
    x = torch.ones(n, device=device)
    stat, _ = repeat(lambda: x.sum(), timer, runs=5, warmup=1)
    return n * 4 / stat.min


class Ceilings:
    """This machine's matmul rate at the tower's and the LLM's MLP shapes, and its read bandwidth.

    Sampled right before every timed run: on a shared machine the ceilings move with the load, so each run
    is set against the ceilings of its own moment, and the spread of the samples is reported too.
    """

    def __init__(self, model: Any, device: torch.device, dtype: torch.dtype, timer: Timer):
        v, s = model.config.vision, llm_shape(model.llm)
        n = (v.image_size // v.patch_size) ** 2
        inter = int(v.raw.get("intermediate_size", 4 * v.hidden_size))
        self.shapes = {"vision": (min(4 * n, 4096), v.hidden_size, inter), "llm": (1024, s["hidden"], s["inter"])}
        self.device, self.dtype, self.timer = device, dtype, timer
        self.samples: list[dict[str, float]] = []

    def sample(self) -> dict[str, float]:
        rates = {k: matmul_rate(self.device, self.dtype, *shape, self.timer) for k, shape in self.shapes.items()}
        rates["bandwidth"] = memory_bandwidth(self.device, self.timer)
        self.samples.append(rates)
        return rates

    def report(self, report: Report) -> None:
        if not self.samples:
            return
        print(f"machine ceilings ({len(self.samples)} samples taken between runs)")
        for key, name, unit, scale in (
            ("vision", "matmul_vision_shape", "GFLOP/s", 1e9),
            ("llm", "matmul_llm_shape", "GFLOP/s", 1e9),
            ("bandwidth", "read_bandwidth", "GB/s", 1e9),
        ):
            report.add(
                "ceilings",
                name,
                Stat.of([r[key] / scale for r in self.samples], unit),
                f"({self.dtype})" if key in ("vision", "llm") else "",
            )


def peak_rss_bytes() -> int:
    """Peak resident set of this process (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process (Linux >= 4.0), so a stage's own peak can be read."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def stage_peak_rss_bytes() -> int:
    """``VmHWM`` since the last :func:`reset_peak_rss` (``ru_maxrss``, the process peak, where unavailable)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return peak_rss_bytes()


def current_rss_bytes() -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return peak_rss_bytes()


# -- FLOP counts for the lower bounds ----------------------------------------------------------------------


def siglip_flops(vision: Any, tiles: int) -> float:
    """Forward FLOPs of the truncated SigLIP tower over ``tiles`` tiles (matmuls and attention)."""
    raw = vision.raw
    c, inter, p = vision.hidden_size, int(raw.get("intermediate_size", 4 * vision.hidden_size)), vision.patch_size
    n = (vision.image_size // p) ** 2
    per_layer = 2 * n * (4 * c * c + 2 * c * inter) + 4 * n * n * c
    return tiles * (2 * n * c * 3 * p * p + vision.num_layers_to_run * per_layer)


def llm_shape(llm: torch.nn.Module) -> dict[str, int]:
    conf = llm.config
    heads = conf.num_attention_heads
    return {
        "hidden": conf.hidden_size,
        "layers": conf.num_hidden_layers,
        "inter": conf.intermediate_size,
        "vocab": llm.get_output_embeddings().weight.shape[0],
        "q": conf.hidden_size,
        "kv": getattr(conf, "num_key_value_heads", heads) * (conf.hidden_size // heads),
    }


def llm_prefill_flops(llm: torch.nn.Module, positions: int) -> float:
    s = llm_shape(llm)
    c, n = s["hidden"], positions
    proj = c * (2 * s["q"] + 2 * s["kv"]) + 3 * c * s["inter"]
    attn = 2 * n * n * s["q"]  # causal: half of QK^T and PV
    return s["layers"] * (2 * n * proj + attn) + 2 * c * s["vocab"]


def llm_decode_bytes(llm: torch.nn.Module) -> int:
    """Bytes one decoding step must read: every weight except the input embedding table (one row is read),
    unless that table is also the (tied) LM head."""
    seen, total = set(), 0
    emb = llm.get_input_embeddings().weight
    head = llm.get_output_embeddings().weight
    for p in llm.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p is emb and p is not head:
            continue
        total += p.numel() * p.element_size()
    return total


# -- kernel floors: a stage's own matmuls on the model's own weights, timed next to the stage -------------------


def _linears(module: torch.nn.Module) -> list[torch.nn.Linear]:
    return [m for m in module.modules() if isinstance(m, torch.nn.Linear)]


def _run_linears(layers: list[torch.nn.Linear], rows: int) -> Callable[[], None]:
    """Every ``linear`` of ``layers`` on ``rows`` dummy rows: the stage's arithmetic and weight traffic."""
    w = layers[0].weight
    inputs = {m.in_features: torch.zeros(rows, m.in_features, dtype=w.dtype, device=w.device) for m in layers}

    def run() -> None:
        for m in layers:
            torch.nn.functional.linear(inputs[m.in_features], m.weight, m.bias)

    return run


def _run_attention(
    batch: int, heads: int, n: int, d: int, layers: int, causal: bool, like: torch.Tensor
) -> Callable[[], None]:
    q = torch.zeros(batch, heads, n, d, dtype=like.dtype, device=like.device)

    def run() -> None:
        for _ in range(layers):
            torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=causal)

    return run


def kernel_floors(model: Any, tiles: int, positions: int) -> dict[str, Callable[[], None]]:
    """The matmuls and attention each stage cannot avoid, run through the same kernels on the model's own
    weights with dummy activations: a lower bound measured at the same moment as the stage, so it moves with
    the machine's load. What a stage takes beyond it is everything else: norms, activations, copies, Python."""
    llm, conf = model.llm, model.llm.config
    head = llm.get_output_embeddings()
    body = [m for m in _linears(llm) if m is not head]
    heads, hidden = conf.num_attention_heads, conf.hidden_size
    w = head.weight
    prefill_linears, prefill_attn = (
        _run_linears(body, positions),
        _run_attention(1, heads, positions, hidden // heads, conf.num_hidden_layers, True, w),
    )
    lm_head = _run_linears([head], 1)
    floors = {
        "prefill": lambda: (prefill_linears(), prefill_attn(), lm_head()),
        "decode": _run_linears(body + [head], 1),  # every weight read once, as one decoding step does
    }
    v = model.config.vision
    if v.kind == "siglip":
        n, vheads = (v.image_size // v.patch_size) ** 2, int(v.raw.get("num_attention_heads", 16))
        tower = _linears(model.vision_tower)
        vw = tower[0].weight
        t_lin = _run_linears(tower, tiles * n)
        t_attn = _run_attention(tiles, vheads, n, v.hidden_size // vheads, v.num_layers_to_run, False, vw)
        floors["vision"] = lambda: (t_lin(), t_attn())
    return floors


def time_floors(floors: dict[str, Callable[[], None]], timer: Timer) -> dict[str, float]:
    out = {}
    for name, fn in floors.items():
        fn()  # first touch (allocations, caches)
        with timer() as t:
            fn()
        out[name] = t[0]
    return out


def report_kernel_floors(report: Report, sec: str, runs: list[dict[str, Any]]) -> None:
    """Each stage over its kernel floor, run by run (median of the ratios)."""
    med = lambda f: round(statistics.median(f(r) for r in runs), 3)  # noqa: E731
    if "vision" in runs[0]["kernels"]:
        report.add(
            sec, "vision_kernels", Stat.of([r["kernels"]["vision"] for r in runs]), "(tower matmuls + attention alone)"
        )
        report.add(
            sec,
            "vision_encode_over_kernels",
            med(lambda r: r["vision_encode_s"] / r["kernels"]["vision"]),
            "(incl. the projector)",
        )
    report.add(
        sec,
        "prefill_kernels",
        Stat.of([r["kernels"]["prefill"] for r in runs]),
        "(LLM matmuls + causal attention alone)",
    )
    report.add(sec, "prefill_over_kernels", med(lambda r: r["prefill_s"] / r["kernels"]["prefill"]))
    report.add(
        sec, "decode_step_kernels", Stat.of([r["kernels"]["decode"] for r in runs]), "(one token through every weight)"
    )
    report.add(
        sec,
        "decode_over_kernels",
        med(lambda r: (1 / r["decode_tok_s"]) / r["kernels"]["decode"]),
        "(time per token / kernel floor)",
    )


# -- sub-benchmark: loading --------------------------------------------------------------------------------


def load_child(root: str, device: str, dtype: str) -> None:
    """Runs in a fresh process: import, load, report times and peak RSS as one JSON line."""
    t0 = time.perf_counter()
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, SiglipVisionModel  # noqa: F401

    from vila.loading import load

    # Import the model code first (transformers imports it lazily): code is not weights.
    MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(Path(root) / "llm"))]
    import_s = time.perf_counter() - t0
    base = current_rss_bytes()
    t0 = time.perf_counter()
    model = load(root, device=device, dtype=dtype)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    peak = peak_rss_bytes()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    # Weights mapped from the files are resident only once read: touch every one, as the first request would.
    with torch.inference_mode():
        for p in model.parameters():
            p.sum()
    out = {"load_s": load_s, "import_s": import_s, "peak_rss": peak, "rss_after_import": base, "param_bytes": params}
    out["peak_rss_touched"] = peak_rss_bytes()
    print(json.dumps(out))


def read_and_convert(root: Path, dtype: torch.dtype) -> int:
    """The load baseline, no library code: read every weight file's bytes once (from the page cache once warm)
    and convert each tensor to ``dtype``. Returns the bytes read."""
    from safetensors.torch import load as load_bytes

    nbytes = 0
    for f in sorted(root.glob("*/*.safetensors")):
        data = f.read_bytes()
        nbytes += len(data)
        for t in load_bytes(data).values():
            t.to(dtype)
        del data
    return nbytes


def load_baseline_child(root: str, dtype: str) -> None:
    """Runs in a fresh process, like :func:`load_child`: :func:`read_and_convert` timed, as one JSON line."""
    from vila.device import resolve_dtype

    target = resolve_dtype(dtype, torch.device("cpu"))
    t0 = time.perf_counter()
    nbytes = read_and_convert(Path(root), target)
    print(json.dumps({"load_s": time.perf_counter() - t0, "bytes": nbytes}))


def _child(cmd: list[str], root: Path) -> dict[str, Any]:
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"loading {root} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_load(report: Report, root: Path, args: argparse.Namespace, dtype: torch.dtype) -> None:
    print("load (fresh process per run; page cache warm), interleaved with the read-and-convert baseline")
    runs, base_runs = [], []
    for i in range(args.warmup + args.runs):
        cmd = [sys.executable, __file__, "--load-child", str(root), "--device", args.device, "--dtype", str(dtype)]
        ours = _child(cmd, root)
        base = _child([*cmd, "--load-baseline"], root) if args.device == "cpu" else None
        if i >= args.warmup:
            runs.append(ours)
            if base is not None:
                base_runs.append(base)
    weights = checkpoint_weight_bytes(root, dtype)
    load = Stat.of([r["load_s"] for r in runs])
    peak = Stat.of([r["peak_rss"] / 2**30 for r in runs], "GiB")
    touched = Stat.of([r["peak_rss_touched"] / 2**30 for r in runs], "GiB")
    base = statistics.median(r["rss_after_import"] for r in runs)
    sec = "load"
    report.add(
        sec,
        "weight_bytes_at_dtype",
        weights,
        f"({weights / 1e9:.3f} GB; file {checkpoint_weight_bytes(root) / 1e9:.3f} GB)",
    )
    report.add(sec, "param_bytes_in_memory", runs[0]["param_bytes"], "(loaded modules; unused tower layers dropped)")
    report.add(
        sec,
        "import_time",
        Stat.of([r["import_s"] for r in runs]),
        "(torch, transformers and the model code; once per process)",
    )
    report.add(sec, "load_time", load, "(vila.load after the imports)")
    if base_runs:
        baseline = Stat.of([r["load_s"] for r in base_runs])
        report.add(
            sec, "baseline_read_and_convert", baseline, f"(every file's bytes read once, each tensor to {dtype})"
        )
        report.ratio(sec, "load_over_baseline", load, baseline)
    report.add(sec, "load_s_per_gb", round(load.median / (weights / 1e9), 4))
    report.add(sec, "peak_rss", peak)
    report.add(sec, "rss_after_import_gib", round(base / 2**30, 3), "(python, torch, transformers, the model code)")
    report.add(sec, "peak_rss_after_touching_weights", touched, "(every weight read once, as a request does)")
    worst = max(peak.median, touched.median) * 2**30
    report.add(sec, "peak_rss_over_weights", round(worst / weights, 4), "(target <= 1.15 at real size)")
    report.add(sec, "peak_rss_minus_import_over_weights", round((worst - base) / weights, 4))


# -- sub-benchmark: preprocessing (ours vs the reference's PIL + per-tile numpy) ------------------------------


def reference_grid(width: int, height: int, min_num: int, max_num: int, s: int) -> tuple[int, int]:
    """The reference's choice of tile grid, written out here so that the baseline shares no code with vila:
    the set of grids of ``dynamic_preprocess`` sorted by area, then the loop of ``find_closest_aspect_ratio``
    (NVlabs/VILA ``llava/mm_utils.py``). Returns ``(cols, rows)``."""
    target_ratios = {
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if i * j <= max_num and i * j >= min_num
    }
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])
    aspect_ratio = width / height
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        ratio_diff = abs(aspect_ratio - ratio[0] / ratio[1])
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff and area > 0.5 * s * s * ratio[0] * ratio[1]:
            best_ratio = ratio
    return best_ratio


def reference_tiles(image: PIL.Image.Image, cfg: Any) -> list[PIL.Image.Image]:
    """The reference's ``dynamic_preprocess`` / ``dynamic_s2_preprocess`` (NVlabs/VILA ``llava/mm_utils.py``):
    a PIL resize per scale, a PIL crop per tile, a thumbnail for ``dynamic``; no vila code."""

    def crop(img: PIL.Image.Image, cols: int, rows: int, s: int) -> list[PIL.Image.Image]:
        resized = img.resize((s * cols, s * rows))
        return [
            resized.crop(((i % cols) * s, (i // cols) * s, (i % cols + 1) * s, (i // cols + 1) * s))
            for i in range(cols * rows)
        ]

    s = cfg.processor.size
    if cfg.image_aspect_ratio == "dynamic":
        cols, rows = reference_grid(image.width, image.height, cfg.min_tiles, cfg.max_tiles, s)
        tiles = crop(image, cols, rows, s)
        return tiles + [image.resize((s, s))] if len(tiles) > 1 else tiles
    scales = cfg.vision.scales
    tiles = []
    for scale in scales[:-1]:
        tiles += crop(image, scale // scales[0], scale // scales[0], s)
    min_num = (scales[-1] // scales[0]) ** 2  # the largest scale's tile count is the least
    cols, rows = reference_grid(image.width, image.height, min_num, cfg.max_tiles, s)
    return tiles + crop(image, cols, rows, s)


def reference_processor(tile: PIL.Image.Image, proc: Any) -> torch.Tensor:
    """transformers' slow ``SiglipImageProcessor`` on one tile: numpy uint8, PIL resize, float64 rescale cast
    to float32, float32 normalisation, HWC -> CHW (transformers 4.46, the version the reference pins)."""
    arr = np.array(tile)
    arr = np.array(PIL.Image.fromarray(arr).resize((proc.size, proc.size), resample=proc.resample))
    arr = (arr.astype(np.float64) * proc.rescale_factor).astype(np.float32)
    mean, std = np.array(proc.image_mean, dtype=np.float32), np.array(proc.image_std, dtype=np.float32)
    arr = (arr - mean) / std
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def reference_preprocess(image: PIL.Image.Image, cfg: Any) -> torch.Tensor:
    return torch.stack([reference_processor(t, cfg.processor) for t in reference_tiles(image, cfg)])


def resize_floor(image: PIL.Image.Image, cfg: Any) -> None:
    """Only the PIL bicubic resizes that bit-exactness requires: the floor of any preprocessing."""
    s = cfg.processor.size
    if cfg.image_aspect_ratio == "dynamic":
        cols, rows = reference_grid(image.width, image.height, cfg.min_tiles, cfg.max_tiles, s)
        image.resize((s * cols, s * rows))
        if cols * rows > 1:
            image.resize((s, s))
        return
    for scale in cfg.vision.scales[:-1]:
        image.resize((scale, scale))
    scales = cfg.vision.scales
    cols, rows = reference_grid(image.width, image.height, (scales[-1] // scales[0]) ** 2, cfg.max_tiles, s)
    image.resize((s * cols, s * rows))


def test_image(size: tuple[int, int] = IMAGE_SIZE, seed: int = 0) -> PIL.Image.Image:
    """A deterministic photo-like RGB image: smooth gradients plus noise (no flat areas for the codec)."""
    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([xx / w * 255, yy / h * 255, (xx + yy) / (w + h) * 255], axis=-1)
    noise = rng.normal(0, 25, size=(h, w, 3))
    return PIL.Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def bench_preprocess(report: Report, args: argparse.Namespace, timer: Timer) -> None:
    from vila.config import parse_config
    from vila.preprocess import preprocess_images

    image = test_image()
    for mode, fixture in (("dynamic_s2", "nvila-tiny"), ("dynamic", "nvila-lite-tiny")):
        cfg = parse_config(TINY / fixture)  # both use 448 px SigLIP tiles, like the released checkpoints
        print(f"preprocess {image.width}x{image.height} image, {mode} (448 px tiles)")
        got = compare(
            {
                "ours": lambda cfg=cfg: preprocess_images([image], cfg),
                "base": lambda cfg=cfg: reference_preprocess(image, cfg),
                "floor": lambda cfg=cfg: resize_floor(image, cfg),
            },
            timer,
            args.runs,
            args.warmup,
        )
        (ours, batch), (base, ref), (floor, _) = got["ours"], got["base"], got["floor"]
        if not torch.equal(batch.pixel_values, ref):
            diff = (batch.pixel_values - ref).abs().max().item() if batch.pixel_values.shape == ref.shape else "shape"
            raise AssertionError(f"preprocessing ({mode}) is not bit-identical to the reference: max diff {diff}")
        sec = f"preprocess_{mode}"
        report.add(sec, "tiles", int(ref.shape[0]))
        report.add(sec, "ours", ours)
        report.add(sec, "baseline_reference", base, "(PIL crop + per-tile numpy normalise)")
        report.ratio(sec, "ours_over_baseline", ours, base)
        report.add(sec, "floor_pil_resizes", floor, "(the bicubic resizes alone, on one thread)")
        report.add(sec, "ours_over_floor", round(ours.median / floor.median, 4))
        report.add(sec, "bit_identical", True)


# -- sub-benchmark: vision tower, batched SDPA vs per-tile eager ---------------------------------------------


@contextlib.contextmanager
def attention_implementation(tower: torch.nn.Module, name: str) -> Iterator[None]:
    """Temporarily switch a transformers tower's attention kernel (the layers read it at call time)."""
    configs = {
        id(m.config): m.config
        for m in tower.modules()
        if hasattr(m, "config") and hasattr(m.config, "_attn_implementation")
    }
    old = {k: c._attn_implementation for k, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation = name
        yield
    finally:
        for k, c in configs.items():
            c._attn_implementation = old[k]


def request_pixels(model: Any, image: PIL.Image.Image) -> Any:
    from vila.preprocess import preprocess_images

    return preprocess_images([image], model.config)


def bench_vision(report: Report, model: Any, args: argparse.Namespace, timer: Timer, ceil: Ceilings) -> None:
    from vila.model.vila import VISION_CHUNK
    from vila.model.vision import run_tower

    batch = request_pixels(model, test_image())
    pixels = batch.pixel_values.to(model.device, model.dtype)
    n = pixels.shape[0]
    print(
        f"vision tower on all {n} tiles of a {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} image ({model.config.image_aspect_ratio})"
    )
    tower = model.vision_tower

    def batched() -> torch.Tensor:
        with torch.inference_mode():
            return run_tower(tower, pixels, VISION_CHUNK)

    def per_tile_eager() -> torch.Tensor:
        with torch.inference_mode(), attention_implementation(tower, "eager"):
            return torch.cat([tower(pixels[i : i + 1]) for i in range(n)])

    fns = {"ours": batched, "base": per_tile_eager}
    floors = kernel_floors(model, n, 1) if args.kernel_floors else {}
    if "vision" in floors:
        fns["kernels"] = floors["vision"]
    got = compare(fns, timer, args.runs, args.warmup)
    (ours, a), (base, b) = got["ours"], got["base"]
    rate = ceil.sample()["vision"]
    sec = "vision"
    report.add(sec, "tiles", n)
    report.add(sec, "ours_batched_sdpa", ours)
    report.add(sec, "baseline_per_tile_eager", base)
    report.ratio(sec, "ours_over_baseline", ours, base)
    rel = ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()
    report.add(sec, "max_rel_diff_vs_baseline", rel)
    if model.config.vision.kind == "siglip":
        flops = siglip_flops(model.config.vision, n)
        bound = flops / rate
        report.add(sec, "flops", flops, f"({flops / 1e12:.3f} TFLOP)")
        report.add(sec, "lower_bound_at_matmul_rate", bound)
        report.add(sec, "ours_over_lower_bound", round(ours.median / bound, 3))
    if "kernels" in got:
        report.add(
            sec, "kernels_alone", got["kernels"][0], "(the tower's matmuls + attention on its weights, interleaved)"
        )
        report.add(sec, "ours_over_kernels", round(ours.median / got["kernels"][0].median, 3))


# -- sub-benchmark: one image request, stage by stage --------------------------------------------------------


class TokenTimer:
    """A ``streamer`` that timestamps every generated token (the first ``put`` is the prompt)."""

    def __init__(self, timer: Timer):
        self.timer = timer
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        if value.numel() and self.times is not None:
            self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def greedy_config(model: Any, new_tokens: int, **extra: Any) -> Any:
    """Greedy decoding of exactly ``new_tokens`` tokens: random weights would stop at any time, so the only
    stop token is one past the vocabulary, which argmax can never pick (``min_new_tokens`` would add a
    vocabulary-sized mask to every step, which is not what users run)."""
    from transformers import GenerationConfig

    never = model.llm.get_output_embeddings().weight.shape[0]
    g = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=[never])
    for k, v in extra.items():
        setattr(g, k, v)
    return g


def timed_generate(model: Any, parts: list[Any], gen: Any, timer: Timer, **kwargs: Any) -> dict[str, Any]:
    streamer = TokenTimer(timer)
    timer.sync()
    t0 = time.perf_counter()
    result = model.generate(parts, generation_config=gen, streamer=streamer, **kwargs)
    timer.sync()
    total = time.perf_counter() - t0
    ticks = streamer.times
    media = sum(result.timings.get(k, 0.0) for k in ("media_decode_s", "preprocess_s", "vision_encode_s"))
    out = dict(result.timings)
    out.update(
        total_s=total,
        ttft_s=ticks[0] - t0,
        prefill_s=ticks[0] - t0 - media,
        decode_tok_s=(len(ticks) - 1) / (ticks[-1] - ticks[0]) if len(ticks) > 1 else float("nan"),
        tokens=result.token_ids,
        positions=result.num_prompt_tokens,
    )
    return out


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def bench_request(
    report: Report, model: Any, args: argparse.Namespace, timer: Timer, ceil: Ceilings, workdir: Path
) -> None:
    import vila
    from vila.model.encoders import encode_images
    from vila.model.vila import VISION_CHUNK
    from vila.model.vision import run_tower

    path = workdir / "request.jpg"
    test_image().save(path, quality=90)
    parts = [vila.Image(path), PROMPT]
    gen = greedy_config(model, args.new_tokens)
    print(f"image request: {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} JPEG + {PROMPT!r}, {args.new_tokens} greedy tokens")
    batch = request_pixels(model, vila.media.load_image(vila.Image(path)))
    runs = request_runs(model, parts, gen, timer, ceil, args, tiles=batch.pixel_values.shape[0])

    # The projector (and the S2 merge before it) alone, fed the tower features of the same image.
    pixels = batch.pixel_values.to(model.device, model.dtype)
    blocks = list(batch.block_sizes) if batch.block_sizes is not None else None
    with torch.inference_mode():
        feats = run_tower(model.vision_tower, pixels, VISION_CHUNK)

    def project() -> list[torch.Tensor]:
        with torch.inference_mode():
            return encode_images(lambda _: feats, model.mm_projector, model.config.vision, pixels, blocks)

    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        project()
    projector, _ = repeat(project, timer, args.runs, args.warmup)

    report_stages(report, "request", model, runs, pixels.shape[0], "(PIL decode of the JPEG)")
    report.add("request", "projector_incl_s2_merge", projector, "(alone, on the same image's tower features)")
    pb = counter.get_total_flops() / ceil.sample()["llm"]
    report.add("request", "projector_lower_bound", pb, "(projector FLOPs at the measured matmul rate)")


def request_runs(
    model: Any, parts: list[Any], gen: Any, timer: Timer, ceil: Ceilings, args: argparse.Namespace, tiles: int
) -> list[dict[str, Any]]:
    """Warm-up and timed requests; after each timed one the ceilings are sampled and the kernel floors timed
    (the peak memory is read during the first request, before those probes allocate anything)."""
    reset_peak_memory(model.device)
    reset_peak_rss()
    for _ in range(args.warmup):
        timed_generate(model, parts, gen, timer)
    runs = []
    for i in range(args.runs):
        r = timed_generate(model, parts, gen, timer)
        if i == 0:
            r["peak_rss"] = stage_peak_rss_bytes()
            if model.device.type == "cuda":
                r["peak_gpu"] = torch.cuda.max_memory_allocated(model.device)
        r["rates"] = ceil.sample()
        if args.kernel_floors:
            r["kernels"] = time_floors(kernel_floors(model, tiles, r["positions"]), timer)
        runs.append(r)
    return runs


def report_stages(
    report: Report, sec: str, model: Any, runs: list[dict[str, Any]], tiles: int, decode_note: str
) -> None:
    """Per-stage medians of ``timed_generate`` runs, and each stage against its lower bound at the moment of
    its run (median of the per-run ratios)."""
    stat = lambda key, unit="s": Stat.of([r[key] for r in runs], unit)  # noqa: E731
    # Three significant figures, not decimals: a tiny model's decode is ~1e-4 of the bandwidth bound.
    ratio = lambda f: float(f"{statistics.median(f(r) for r in runs):.3g}")  # noqa: E731
    positions = runs[0]["positions"]
    report.add(sec, "llm_input_positions", positions)
    report.add(sec, "media_decode", stat("media_decode_s"), decode_note)
    report.add(sec, "preprocess", stat("preprocess_s"))
    report.add(sec, "vision_encode_incl_projector", stat("vision_encode_s"), f"({tiles} tiles)")
    report.add(sec, "prefill", stat("prefill_s"), "(TTFT minus the media stages)")
    report.add(sec, "ttft", stat("ttft_s"), "(end to end: file -> first token)")
    report.add(sec, "decode", stat("decode_tok_s", "tok/s"))
    report.add(sec, "total", stat("total_s"))
    if "peak_gpu" in runs[0]:
        report.add(sec, "peak_gpu_memory_gib", round(runs[0]["peak_gpu"] / 2**30, 3))
    report.add(sec, "peak_rss_gib", round(runs[0]["peak_rss"] / 2**30, 3), "(high-water mark during a request)")
    if model.config.vision.kind == "siglip":
        flops = siglip_flops(model.config.vision, tiles)
        report.add(
            sec,
            "vision_lower_bound",
            Stat.of([flops / r["rates"]["vision"] for r in runs]),
            "(tower FLOPs at the matmul rate)",
        )
        report.add(
            sec, "vision_encode_over_bound", ratio(lambda r: r["vision_encode_s"] * r["rates"]["vision"] / flops)
        )
    flops = llm_prefill_flops(model.llm, positions)
    report.add(
        sec, "prefill_lower_bound", Stat.of([flops / r["rates"]["llm"] for r in runs]), "(LLM FLOPs at the matmul rate)"
    )
    report.add(sec, "prefill_over_bound", ratio(lambda r: r["prefill_s"] * r["rates"]["llm"] / flops))
    nbytes = llm_decode_bytes(model.llm)
    report.add(sec, "decode_bytes_per_token", nbytes, f"({nbytes / 1e9:.3f} GB)")
    bounds = Stat.of([r["rates"]["bandwidth"] / nbytes for r in runs], "tok/s")
    report.add(sec, "decode_bound", bounds, "(read bandwidth / weight bytes)")
    report.add(sec, "decode_over_bound", ratio(lambda r: r["decode_tok_s"] * nbytes / r["rates"]["bandwidth"]))
    if "kernels" in runs[0]:
        report_kernel_floors(report, sec, runs)


# -- sub-benchmark: one video request ------------------------------------------------------------------------

VIDEO = FIXTURES / "inputs" / "video_160x120_64f_16fps.mp4"


def bench_video(report: Report, model: Any, args: argparse.Namespace, timer: Timer, ceil: Ceilings) -> None:
    """The test video (64 frames, 160x120) at the checkpoint's frame count: decode, frames, tower, LLM."""
    import vila

    parts = [vila.Video(VIDEO), "What happens in the video?"]
    gen = greedy_config(model, args.new_tokens)
    frames = model.config.num_video_frames
    print(f"video request: {VIDEO.name}, {frames} frames + a question, {args.new_tokens} greedy tokens")
    runs = request_runs(model, parts, gen, timer, ceil, args, tiles=frames)
    report_stages(report, "video", model, runs, frames, "(decord/OpenCV decode + frame sampling)")


# -- sub-benchmark: feature cache (vila/cache.py), hit vs miss -----------------------------------------------


def bench_cache(report: Report, model: Any, args: argparse.Namespace, timer: Timer, workdir: Path) -> None:
    """The same image request twice: a miss decodes, preprocesses and encodes; a hit reuses the features."""
    if importlib.util.find_spec("vila.cache") is None:
        print("cache: pending (vila/cache.py does not exist yet)")
        report.add("cache", "status", "pending: vila/cache.py not present")
        return
    import vila
    from vila.cache import FeatureCache

    path = workdir / "request.jpg"
    test_image().save(path, quality=90)
    parts = [vila.Image(path), PROMPT]
    gen = greedy_config(model, args.new_tokens)
    print("repeated request on the same media: feature cache miss vs hit")
    cache = FeatureCache()

    def miss() -> dict[str, Any]:
        cache.clear()
        return timed_generate(model, parts, gen, timer, cache=cache)

    def hit() -> dict[str, Any]:
        return timed_generate(model, parts, gen, timer, cache=cache)

    m, h = [], []
    for i in range(args.warmup + args.runs):  # interleaved: each miss fills the cache for the hit after it
        pair = miss(), hit()
        if i >= args.warmup:
            m.append(pair[0])
            h.append(pair[1])
    if cache.hits != args.warmup + args.runs:
        raise AssertionError(f"expected {args.warmup + args.runs} cache hits, got {cache.hits}")
    if m[0]["tokens"] != h[0]["tokens"]:
        raise AssertionError("the feature cache changed the generated tokens")
    sec = "cache"
    for r in m + h:
        r["media_s"] = sum(r.get(k, 0.0) for k in ("media_decode_s", "preprocess_s", "vision_encode_s"))
    for key, label in (("media_s", "media_stages"), ("ttft_s", "ttft"), ("total_s", "total")):
        miss_s, hit_s = Stat.of([r[key] for r in m]), Stat.of([r[key] for r in h])
        report.add(sec, f"{label}_miss", miss_s)
        report.add(sec, f"{label}_hit", hit_s)
        report.ratio(sec, f"{label}_hit_over_miss", hit_s, miss_s)
    report.add(sec, "same_tokens", True)


# -- sub-benchmark: a captioning job, batched vs one by one through the library ---------------------------------


@contextlib.contextmanager
def full_length_decoding(model: Any) -> Iterator[None]:
    """Random weights reach a stop token at random points; the job must decode the same number of tokens on
    both sides. The only stop token becomes one past the vocabulary, which argmax never picks, so every
    request decodes exactly its budget (the library has no ``min_new_tokens``; a mask would add work)."""
    saved = model.stop_token_ids
    model.stop_token_ids = [model.llm.get_output_embeddings().weight.shape[0]]
    try:
        yield
    finally:
        model.stop_token_ids = saved


def caption_batched(model: Any, prompts: list[list[Any]], tokens: int) -> list[Any]:
    """The library's batched path, in one place: one call of the engine (:func:`vila.engine.run`), which
    decodes greedy requests together."""
    from vila import engine

    return engine.run(model, [engine.Request(p, {"max_new_tokens": tokens, "temperature": 0}) for p in prompts])


def caption_one_by_one(model: Any, prompts: list[list[Any]], tokens: int) -> list[Any]:
    """The same requests, one ``model.generate`` each."""
    return [model.generate(p, max_new_tokens=tokens, temperature=0) for p in prompts]


def decode_rate(results: list[Any], together: bool) -> tuple[float, float, int]:
    """Decode tokens/s from the timings the results carry: each request's tokens after its first, over its
    first-to-last token time. Requests decoded together overlap (the job's decode time is the longest one);
    one by one they add up."""
    tokens, times = 0, []
    for r in results:
        steps, rate = r.timings.get("num_generated_tokens", 0), r.timings.get("decode_tokens_per_s")
        if steps > 1 and rate:
            tokens += int(steps) - 1
            times.append((steps - 1) / rate)
    seconds = (max(times) if together else sum(times)) if times else 0.0
    return (tokens / seconds if seconds else float("nan")), seconds, tokens


def bench_caption(report: Report, model: Any, args: argparse.Namespace, timer: Timer, workdir: Path) -> None:
    """``--caption-images`` 448x448 images, ``--caption-tokens`` greedy tokens each: the batched path against
    one ``generate`` per image, alternating, with the decode phase timed from inside both."""
    n, tokens = args.caption_images, args.caption_tokens
    paths = []
    for i in range(n):
        paths.append(workdir / f"caption-{i}.jpg")
        test_image((448, 448), seed=100 + i).save(paths[-1], quality=90)
    import vila

    prompts = [[vila.Image(p), PROMPT] for p in paths]
    print(f"captioning job: {n} images 448x448, {tokens} greedy tokens each; batched vs one by one")
    res: dict[str, list[dict[str, Any]]] = {"batched": [], "one_by_one": []}
    with full_length_decoding(model):
        # Warm-up (first-call allocations, thread pools), short: at real size every token costs seconds.
        caption_one_by_one(model, prompts[:1], 2)
        for _ in range(args.caption_runs):
            for name, fn in (("batched", caption_batched), ("one_by_one", caption_one_by_one)):
                with timer() as t:
                    results = fn(model, prompts, tokens)
                rate, dec_s, _ = decode_rate(results, together=name == "batched")
                res[name].append({"total_s": t[0], "decode_tok_s": rate, "decode_s": dec_s, "results": results})
    sec = "caption"
    b, o = res["batched"], res["one_by_one"]
    report.add(sec, "images", n)
    report.add(sec, "new_tokens_per_image", tokens, "(stop token disabled on both sides: full-length decoding)")
    report.add(sec, "tokens_generated_batched", sum(len(r.token_ids) for r in b[0]["results"]))
    report.add(sec, "tokens_generated_one_by_one", sum(len(r.token_ids) for r in o[0]["results"]))
    total_b, total_o = Stat.of([r["total_s"] for r in b]), Stat.of([r["total_s"] for r in o])
    report.add(sec, "total_batched", total_b)
    report.add(sec, "total_one_by_one", total_o)
    report.ratio(sec, "total_batched_over_one_by_one", total_b, total_o)
    report.add(sec, "one_request_average", Stat.of([r["total_s"] / n for r in o]), "(one by one, per image)")
    rate_b = Stat.of([r["decode_tok_s"] for r in b], "tok/s")
    rate_o = Stat.of([r["decode_tok_s"] for r in o], "tok/s")
    report.add(sec, f"decode_batch{n}", rate_b, "(tokens after the first / first-to-last step time)")
    report.add(sec, "decode_batch1", rate_o)
    report.add(sec, "decode_speedup", round(rate_b.median / rate_o.median, 3), f"(batch {n} / batch 1 tok/s)")
    report.add(sec, "decode_time_batched", Stat.of([r["decode_s"] for r in b]))
    report.add(sec, "decode_time_one_by_one", Stat.of([r["decode_s"] for r in o]), "(sum over the requests)")
    same = [x.token_ids == y.token_ids for x, y in zip(b[0]["results"], o[0]["results"])]
    report.add(sec, "same_answers", f"{sum(same)}/{len(same)}", "(greedy tokens, batched vs one by one)")
    t1, tb = linear_batch_bound(model.llm, n, timer)
    report.add(sec, "linear_kernels_batch1", round(t1 * 1000, 4), "ms (every LLM matmul once, alone, 1 row)")
    report.add(sec, f"linear_kernels_batch{n}", round(tb * 1000, 4), f"ms (the same, {n} rows)")
    report.add(
        sec, "decode_speedup_kernel_bound", round(n * t1 / tb, 3), f"(batch {n} / batch 1 tok/s its matmuls allow)"
    )


def linear_batch_bound(llm: Any, batch: int, timer: Timer) -> tuple[float, float]:
    """How much more one decode step's matmuls cost at ``batch`` rows than at one, with the LLM's own weights:
    every ``nn.Linear`` of the LLM timed alone (``F.linear``, as the model calls it) at M = 1 and M = ``batch``.
    Returns (seconds at 1 row, seconds at ``batch`` rows) for all of them; ``batch * t1 / tb`` is the decode
    speedup the matmul kernels allow, whatever the decode loop does around them."""
    import torch.nn.functional as F

    t1 = tb = 0.0
    with torch.no_grad():
        for module in llm.modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            w, b = module.weight, module.bias
            for rows in (1, batch):
                x = torch.randn(rows, w.shape[1], dtype=w.dtype, device=w.device)
                stat, _ = repeat(lambda x=x, w=w, b=b: F.linear(x, w, b), timer, runs=3, warmup=1)
                if rows == 1:
                    t1 += stat.median
                else:
                    tb += stat.median
    return t1, tb


def print_summary(report: Report) -> None:
    """The headline figures as one table: ours, the baseline, the ratio and the goal, on this machine."""
    s = report.sections
    lines = []

    def row(what: str, ours: Any, base: Any, ratio: float, goal: str) -> None:
        lines.append(f"  {what:<34} {ours:>14} {base:>14} {ratio:>8.3f}  {goal}")

    med = lambda d: d["median"]  # noqa: E731
    if "load" in s and "baseline_read_and_convert" in s["load"]:
        ld = s["load"]
        row(
            "load (s)",
            f"{med(ld['load_time']):.2f}",
            f"{med(ld['baseline_read_and_convert']):.2f}",
            ld["load_over_baseline"],
            "<= 1.5 (baseline: read bytes + convert)",
        )
    if "caption" in s:
        c = s["caption"]
        n = c["images"]
        row(
            f"caption job, {n} images (s)",
            f"{med(c['total_batched']):.2f}",
            f"{med(c['total_one_by_one']):.2f}",
            c["total_batched_over_one_by_one"],
            "<= 0.45 (baseline: one by one)",
        )
        row(
            f"decode tok/s, batch {n} vs 1",
            f"{med(c[f'decode_batch{n}']):.3g}",
            f"{med(c['decode_batch1']):.3g}",
            c["decode_speedup"],
            ">= 4 (ratio = speedup)",
        )
        row(
            f"LLM matmuls alone, {n} rows vs 1 (ms)",
            f"{c[f'linear_kernels_batch{n}']:.4g}",
            f"{c['linear_kernels_batch1']:.4g}",
            c["decode_speedup_kernel_bound"],
            "(ratio = the decode speedup these kernels allow)",
        )
    if not lines:
        return
    m = report.machine
    print(
        f"summary on {m['cpu']} ({m['cpu_count']} CPUs, {m['torch_threads']} threads, {m['memory_gb']} GB), {report.setup['model']}, {report.setup['dtype']}"
    )
    print(f"  {'':<34} {'ours':>14} {'baseline':>14} {'ratio':>8}  goal")
    print("\n".join(lines))


# -- sub-benchmark: static KV cache + torch.compile vs dynamic cache (CUDA) ------------------------------------


def bench_static(
    report: Report, model: Any, parts: list[Any], args: argparse.Namespace, timer: Timer, compile_decode: bool = True
) -> dict[str, list[dict[str, Any]]]:
    """Default generation (dynamic KV cache) vs a static KV cache whose decode step transformers compiles
    (``torch.compile``, CUDA graphs) on CUDA; the greedy tokens must be identical."""
    gen = greedy_config(model, args.new_tokens)
    fast = greedy_config(model, args.new_tokens, cache_implementation="static")
    if not compile_decode:
        fast.disable_compile = True
    print(
        f"decode: dynamic cache vs static cache{' + torch.compile' if compile_decode else ''}, {args.new_tokens} tokens"
    )
    res = {}
    for name, g, warmup in (("dynamic_cache", gen, args.warmup), ("static_compiled", fast, max(args.warmup, 2))):
        for _ in range(warmup if compile_decode else args.warmup):  # the first static runs compile and record
            timed_generate(model, parts, g, timer)
        res[name] = [timed_generate(model, parts, g, timer) for _ in range(args.runs)]
    same = res["dynamic_cache"][0]["tokens"] == res["static_compiled"][0]["tokens"]
    sec = "static"
    for name, runs in res.items():
        report.add(sec, f"{name}_ttft", Stat.of([r["ttft_s"] for r in runs]))
        report.add(sec, f"{name}_prefill", Stat.of([r["prefill_s"] for r in runs]))
        report.add(sec, f"{name}_decode", Stat.of([r["decode_tok_s"] for r in runs], "tok/s"))
    d = Stat.of([r["decode_tok_s"] for r in res["dynamic_cache"]], "tok/s")
    s = Stat.of([r["decode_tok_s"] for r in res["static_compiled"]], "tok/s")
    report.add(sec, "decode_speedup", round(s.median / d.median, 3), "(static / dynamic tok/s)")
    report.add(sec, "same_greedy_tokens", same)
    return res


# -- driver --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model",
        default="nvila-tiny",
        help="tiny fixture name, nvila-lite-2b / nvila-8b (random weights), or a checkpoint path",
    )
    p.add_argument(
        "--only",
        default=",".join(SUB_BENCHMARKS),
        help=f"comma-separated sub-benchmarks from {','.join(SUB_BENCHMARKS)}",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps")
    p.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on CUDA), float32, bfloat16, float16")
    p.add_argument(
        "--checkpoint-dtype",
        default="bfloat16",
        help="dtype of the random weights written to disk (the published checkpoints are bf16)",
    )
    p.add_argument("--runs", type=int, default=5, help="timed runs per figure (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones")
    p.add_argument("--new-tokens", type=int, default=16, help="greedy tokens generated per request")
    p.add_argument("--caption-images", type=int, default=8, help="images of the captioning job (448x448)")
    p.add_argument("--caption-tokens", type=int, default=128, help="greedy tokens per image in the captioning job")
    p.add_argument("--caption-runs", type=int, default=1, help="timed runs of the captioning job (each side)")
    p.add_argument(
        "--workdir", default=None, help="where real-size random checkpoints are written (default: a temp dir, removed)"
    )
    p.add_argument("--keep", action="store_true", help="keep the written checkpoint (with --workdir, reused next time)")
    p.add_argument("--json", default=None, help="write every figure to this JSON file ('-' for stdout)")
    p.add_argument(
        "--no-kernel-floors",
        dest="kernel_floors",
        action="store_false",
        help="skip timing each stage's bare matmuls after every run (halves the time on big models)",
    )
    p.add_argument("--load-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--load-baseline", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = set(args.only.split(",")) - set(SUB_BENCHMARKS)
    if unknown:
        p.error(f"unknown sub-benchmarks {sorted(unknown)}; choose from {', '.join(SUB_BENCHMARKS)}")
    if args.runs < 1 or args.warmup < 0:
        p.error("--runs must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.load_child and args.load_baseline:
        load_baseline_child(args.load_child, args.dtype)
        return {}
    if args.load_child:
        load_child(args.load_child, args.device, args.dtype)
        return {}
    sys.path.insert(0, str(REPO))
    from vila.device import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    args.device = str(device)
    only = args.only.split(",")
    timer = Timer(device)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="vila-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        root = materialize(args.model, workdir, resolve_dtype(args.checkpoint_dtype, device), str(device))
        report = Report(
            machine_info(device),
            {
                "model": args.model,
                "checkpoint": str(root),
                "checkpoint_dtype": args.checkpoint_dtype,
                "device": str(device),
                "dtype": str(dtype),
                "runs": args.runs,
                "warmup": args.warmup,
                "new_tokens": args.new_tokens,
            },
        )
        if args.model in ARCHS:
            report.setup["architecture"] = ARCHS[args.model].about
        print(
            f"# vila benchmark: {args.model} on {device} ({dtype}); {report.machine['cpu']}, {report.machine['torch_threads']} threads"
            + (f"; {report.machine['gpu']}" if "gpu" in report.machine else "")
        )
        print(f"# each figure: median of {args.runs} runs after {args.warmup} warm-up, [min .. max]")
        if "load" in only:
            bench_load(report, root, args, dtype)
        if "preprocess" in only:
            bench_preprocess(report, args, timer)
        needs_model = {"request", "video", "vision", "cache", "caption", "static"} & set(only)
        if needs_model:
            from vila.loading import load

            model = load(root, device=device, dtype=dtype)
            ceil = Ceilings(model, device, dtype, timer)
            if "request" in only:
                bench_request(report, model, args, timer, ceil, workdir)
            if "video" in only:
                bench_video(report, model, args, timer, ceil)
            if "vision" in only:
                bench_vision(report, model, args, timer, ceil)
            if "cache" in only:
                bench_cache(report, model, args, timer, workdir)
            if "caption" in only:
                bench_caption(report, model, args, timer, workdir)
            if "static" in only:
                if device.type == "cuda":
                    import vila

                    square = workdir / "square.png"
                    test_image((448, 448)).save(square)
                    res = bench_static(report, model, [vila.Image(square), PROMPT], args, timer)
                    if res["dynamic_cache"][0]["tokens"] != res["static_compiled"][0]["tokens"]:
                        raise AssertionError("static-cache decoding changed the greedy tokens")
                else:
                    print("static: skipped (CUDA only: transformers compiles the static-cache decode step on CUDA)")
                    report.add("static", "status", "skipped: CUDA only")
            ceil.report(report)
        print_summary(report)
        out = asdict(report)
        if args.json == "-":
            print(json.dumps(out, indent=2))
        elif args.json:
            Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
            print(f"# wrote {args.json}")
        return out
    finally:
        if not args.workdir and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
