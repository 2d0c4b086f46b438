#!/usr/bin/env python
"""Time vila against the NVlabs/VILA reference on the same checkpoint: load, and one image request.

Both sides run in fresh processes, alternating (the order flips every run, so drift on a shared machine hits
both alike), ``--runs`` times each; every figure is the median. In each process: the imports (torch,
transformers, the model code) are timed apart, then the load, then two identical requests (the first one pays
lazy initialisation; the second is the steady state). A request is one fixed synthetic 448x448 JPEG and a short
prompt, ``--new-tokens`` greedy tokens with no reachable stop token, timed from the prompt to the text. Both
sides must give the same text, the same new token ids and the same number of LLM input positions (the reference's
are read by wrapping its ``model.llm.generate``, which changes nothing); the script reports any difference.

The reference is never imported here: it runs as a small snippet (``REFERENCE_CHILD``) in its own Python, with
``--ref-src`` on ``PYTHONPATH``. It loads as its CLI does (``llava.load(path)``, NVlabs/VILA ``llava/entry.py``
and ``llava/cli/infer.py``) with four run-time patches that only make its GPU-only path run on a CPU in fp32,
all listed in the reference's own code as GPU-only: ``load_pretrained_model`` forces fp16
(``llava/model/builder.py``), so its fp16 becomes fp32; SigLIP is forced to flash-attention-2
(``llava/model/multimodal_encoder/siglip_encoder.py``), so it gets ``sdpa``, as ours does; ``generate_content``
calls ``.cuda()`` on the prompt ids, a no-op here; and the pixels are rounded through fp16 as the reference does
(``.half()``) but reach the tower as fp32 — on a GPU the whole model is fp16, so its tower output (cast back to
the pixels' dtype) meets a projector of the same dtype, which fp32 weights need too.

The reference environment (nothing of it is a dependency of this project; build it outside the repository)::

    # source: github NVlabs/VILA, any recent commit, unpacked to /tmp/ref/VILA
    python3.11 -m venv /tmp/ref/venv
    /tmp/ref/venv/bin/pip install -c <(echo torch==2.13.0) torch==2.13.0 transformers==4.46.0 \\
        accelerate==0.34.2 tokenizers safetensors pillow einops==0.6.1 einops-exts==0.0.4 \\
        opencv-python-headless==4.8.0.76 hydra-core numpy==1.26.4 sentencepiece shortuuid loguru termcolor \\
        'pydantic<2,>=1' matplotlib triton
    /tmp/ref/venv/bin/pip install --no-deps <github bfshi/scaling_on_scales checkout>   # s2wrapper
    # stubs for modules the reference imports at module level but never calls on this path, in a folder put on
    # the venv's path with a .pth file: deepspeed (deepspeed.comm), flash_attn (+ flash_attn_interface,
    # bert_padding), torchvision (transforms, transforms.v2, transforms.functional, tv_tensors, utils: PyPI's
    # torchvision does not import beside the CPU torch 2.13 build), timm (models.layers.Mlp), datasets
    # (+ distributed), ps3 (PS3Config / PS3VisionConfig as PretrainedConfig subclasses).

The checkpoint: a random-weight real-size one in the published layout (``vision_model.`` tensor names), e.g.::

    HF_HUB_OFFLINE=1 python scripts/benchmark.py --model nvila-lite-2b --workdir /tmp/vbench/ck --keep \\
        --only load --runs 1 --warmup 0

Then::

    HF_HUB_OFFLINE=1 python scripts/bench_reference.py --ref-python /tmp/ref/venv/bin/python \\
        --ref-src /tmp/ref/VILA --checkpoint /tmp/vbench/ck/nvila-lite-2b-bfloat16 --runs 3

Each reference process also checks that its vision tower, projector and LLM hold the file's weights (one tensor
each, compared with the safetensors file) and that transformers reported no newly initialised weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROMPT = "Describe the image in detail."
IMAGE_SIDE = 448

# One tensor per component, as (component folder, tensor name in its file): the reference's module paths are
# mapped to these names inside the reference child.
CHECKED_TENSORS = {
    "vision_tower": "vision_model.encoder.layers.0.self_attn.q_proj.weight",
    "mm_projector": "layers.2.weight",
    "llm": "model.layers.0.self_attn.q_proj.weight",
}

# Runs in the reference's Python (argv: checkpoint, image, prompt, new tokens, JSON of CHECKED_TENSORS).
REFERENCE_CHILD = r"""
import json, sys, time, types
t0 = time.perf_counter()
import torch
import transformers
import transformers.models.qwen2.modeling_qwen2, transformers.models.siglip.modeling_siglip  # code, not weights
from transformers import GenerationConfig
import llava
import llava.model.builder as builder
from llava import conversation as clib
from llava.cli.infer import configure_ps3_and_context_length
from llava.model.multimodal_encoder.siglip import SiglipVisionModel

class _Fp32Torch(types.ModuleType):  # load_pretrained_model hard-codes torch.float16
    def __getattr__(self, name):
        return torch.float32 if name == "float16" else getattr(torch, name)

builder.torch = _Fp32Torch("torch")
_from_pretrained = SiglipVisionModel.from_pretrained.__func__

def _sdpa(cls, *a, **k):  # flash-attention-2 is forced for the tower and is CUDA-only
    if k.get("attn_implementation") == "flash_attention_2":
        k["attn_implementation"] = "sdpa"
    return _from_pretrained(cls, *a, **k)

SiglipVisionModel.from_pretrained = classmethod(_sdpa)
if not torch.cuda.is_available():
    torch.Tensor.cuda = lambda self, *a, **k: self  # generate_content moves the prompt ids with .cuda()
import_s = time.perf_counter() - t0

root, image, prompt, new_tokens, checked = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), json.loads(sys.argv[5])
t0 = time.perf_counter()
model = llava.load(root, model_base=None, device="cpu")
load_s = time.perf_counter() - t0
import resource
load_rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
configure_ps3_and_context_length(model)
clib.default_conversation = clib.conv_templates["auto"].copy()

def _fp32_pixels(m, args):  # pixels stay fp16-rounded (.half()) but reach the tower in its dtype
    x = args[0]
    x = [t.to(m.dtype) for t in x] if isinstance(x, (list, tuple)) else x.to(m.dtype)
    return (x,) + tuple(args[1:])

model.vision_tower.register_forward_pre_hook(_fp32_pixels)
never = model.llm.get_output_embeddings().weight.shape[0]
gen = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=[never])
seen = {}
_llm_generate = model.llm.generate

def _record(*a, **k):  # the new token ids and the LLM's input positions, for the comparison
    out = _llm_generate(*a, **k)
    seen.update(positions=k["inputs_embeds"].shape[1], ids=out[0].tolist())
    return out

model.llm.generate = _record
requests = []
for _ in range(2):
    t0 = time.perf_counter()
    text = model.generate_content([llava.Image(image), prompt], generation_config=gen)
    requests.append({"s": time.perf_counter() - t0, "text": text, "token_ids": seen["ids"], "positions": seen["positions"]})

from safetensors import safe_open
modules = {
    "vision_tower": model.vision_tower.vision_tower,
    "mm_projector": model.mm_projector,
    "llm": model.llm,
}
weights = {}
for comp, name in checked.items():
    files = sorted((__import__("pathlib").Path(root) / comp).glob("*.safetensors"))
    for f in files:
        with safe_open(str(f), "pt") as sf:
            if name in sf.keys():
                want = sf.get_tensor(name).float()
    got = modules[comp].state_dict()[name].float()
    weights[comp] = bool(torch.equal(got, want))
print(json.dumps({
    "import_s": import_s, "load_s": load_s, "load_rss_gib": load_rss_gib, "requests": requests,
    "weights_equal_file": weights,
    "dtype": str(model.llm.dtype), "threads": torch.get_num_threads(),
    "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version.split()[0]},
}))
"""


def ours_child(root: str, image: str, new_tokens: int) -> None:
    """Runs in a fresh process (this script in this Python): the same steps as ``REFERENCE_CHILD``."""
    t0 = time.perf_counter()
    import torch
    import transformers
    import transformers.models.qwen2.modeling_qwen2  # noqa: F401  (code, not weights, as on the other side)
    import transformers.models.siglip.modeling_siglip  # noqa: F401
    from transformers import GenerationConfig

    import vila

    import_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = vila.load(root, dtype="float32", device="cpu")
    load_s = time.perf_counter() - t0
    load_rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak, before any request (KiB)
    never = model.llm.get_output_embeddings().weight.shape[0]
    gen = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=[never])
    requests = []
    for _ in range(2):
        t0 = time.perf_counter()
        result = model.generate([vila.Image(image), PROMPT], generation_config=gen)
        s = time.perf_counter() - t0
        requests.append(
            {"s": s, "text": result.text, "token_ids": result.token_ids, "positions": result.num_prompt_tokens}
        )
    versions = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    out = {"import_s": import_s, "load_s": load_s, "load_rss_gib": load_rss_gib, "requests": requests}
    out["dtype"] = str(model.dtype)
    print(json.dumps({**out, "threads": torch.get_num_threads(), "versions": versions}))


def write_image(path: Path) -> None:
    """A fixed photo-like JPEG: smooth gradients plus seeded noise (no flat areas for the codec)."""
    import numpy as np
    import PIL.Image

    n = IMAGE_SIDE
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    base = np.stack([xx / n * 255, yy / n * 255, (xx + yy) / (2 * n) * 255], axis=-1)
    pixels = np.clip(base + rng.normal(0, 25, size=(n, n, 3)), 0, 255).astype(np.uint8)
    PIL.Image.fromarray(pixels).save(path, quality=90)


def run_child(cmd: list[str], env: dict[str, str], what: str) -> dict[str, Any]:
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # transformers names every weight it had to initialise because the file lacked it.
    result["init_warnings"] = [
        line for line in out.stderr.splitlines() if "newly initialized" in line or "were not initialized" in line
    ]
    return result


def median(values: list[float]) -> float:
    return statistics.median(values)


def summarise(ours: list[dict[str, Any]], ref: list[dict[str, Any]]) -> dict[str, Any]:
    def row(key: str) -> dict[str, float]:
        get = {
            "import": lambda r: r["import_s"],
            "load": lambda r: r["load_s"],
            "load_peak_rss_gib": lambda r: r["load_rss_gib"],
            "request_first": lambda r: r["requests"][0]["s"],
            "request_warm": lambda r: r["requests"][1]["s"],
        }[key]
        o, b = median([get(r) for r in ours]), median([get(r) for r in ref])
        return {"ours_s": round(o, 3), "reference_s": round(b, 3), "ratio": round(o / b, 3)}

    def distinct(runs: list[dict[str, Any]], key: str) -> list[Any]:
        return sorted({json.dumps(q[key]) for r in runs for q in r["requests"]})

    return {
        "rows": {k: row(k) for k in ("load", "load_peak_rss_gib", "request_warm", "request_first", "import")},
        "same_text": distinct(ours, "text") == distinct(ref, "text") and len(distinct(ours, "text")) == 1,
        "same_tokens": distinct(ours, "token_ids") == distinct(ref, "token_ids"),
        "same_positions": distinct(ours, "positions") == distinct(ref, "positions"),
        **{
            f"{key}_{side}": distinct(runs, key)
            for key in ("text", "token_ids", "positions")
            for side, runs in (("ours", ours), ("reference", ref))
        },
        "reference_weights_equal_file": ref[0]["weights_equal_file"],
        "reference_init_warnings": ref[0]["init_warnings"],
        "versions": {"ours": ours[0]["versions"], "reference": ref[0]["versions"]},
        "threads": {"ours": ours[0]["threads"], "reference": ref[0]["threads"]},
        "raw": {"ours": ours, "reference": ref},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ref-python", help="the reference environment's python (required)")
    parser.add_argument("--ref-src", help="an unpacked NVlabs/VILA source tree holding llava/ (required)")
    parser.add_argument("--checkpoint", required=True, help="a checkpoint folder in the published layout")
    parser.add_argument("--runs", type=int, default=3, help="fresh processes per side (default 3)")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--json", help="also write the figures and every run here")
    parser.add_argument("--ours-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--image", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    root = str(Path(args.checkpoint).resolve())
    if args.ours_child:
        ours_child(root, args.image, args.new_tokens)
        return 0
    if not args.ref_python or not args.ref_src:
        parser.error("--ref-python and --ref-src are required: see this script's docstring to build them")
    if not (Path(args.ref_src) / "llava" / "entry.py").is_file():
        parser.error(f"--ref-src {args.ref_src} holds no llava/entry.py; point it at an NVlabs/VILA source tree")

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    ref_env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [args.ref_src, env.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "request.jpg"
        write_image(image)
        ours_cmd = [sys.executable, __file__, "--ours-child", "--image", str(image), "--checkpoint", root]
        ours_cmd += ["--new-tokens", str(args.new_tokens)]
        checked = json.dumps(CHECKED_TENSORS)
        ref_cmd = [args.ref_python, "-W", "ignore", "-c", REFERENCE_CHILD, root, str(image), PROMPT]
        ref_cmd += [str(args.new_tokens), checked]
        ours, ref = [], []
        for i in range(args.runs):
            order = [("ours", ours_cmd, env, ours), ("reference", ref_cmd, ref_env, ref)]
            for name, cmd, e, into in order if i % 2 == 0 else order[::-1]:
                t0 = time.perf_counter()
                into.append(run_child(cmd, e, f"{name} run {i + 1}"))
                r = into[-1]
                print(
                    f"run {i + 1} {name:9s}: load {r['load_s']:.2f} s, request {r['requests'][0]['s']:.2f} s "
                    f"then {r['requests'][1]['s']:.2f} s ({time.perf_counter() - t0:.0f} s in all)",
                    flush=True,
                )
    summary = summarise(ours, ref)
    print(f"\n{args.runs} fresh processes per side, medians; machine: {platform.machine()}, {os.cpu_count()} CPUs")
    print(f"{'':22s}{'ours':>10s}{'reference':>12s}{'ratio':>8s}")
    labels = {
        "load": "load (fp32, CPU)",
        "load_peak_rss_gib": "load peak RSS (GiB)",
        "request_warm": "one request (2nd)",
        "request_first": "one request (1st)",
        "import": "imports",
    }
    for key, label in labels.items():
        r = summary["rows"][key]
        unit = "" if key.endswith("gib") else "s"
        print(f"{label:22s}{r['ours_s']:>9.2f}{unit:1s}{r['reference_s']:>11.2f}{unit:1s}{r['ratio']:>8.2f}")
    yes = {True: "yes", False: "NO"}
    print(
        f"same greedy text: {yes[summary['same_text']]}; same token ids: {yes[summary['same_tokens']]}; "
        f"same LLM input length: {yes[summary['same_positions']]}"
    )
    if not (summary["same_text"] and summary["same_tokens"] and summary["same_positions"]):
        for key in ("text", "token_ids", "positions"):
            print(f"  {key}: ours {summary[key + '_ours']} reference {summary[key + '_reference']}")
    print(f"reference weights equal the file: {summary['reference_weights_equal_file']}")
    if summary["reference_init_warnings"]:
        print("reference initialised weights the file lacks:", *summary["reference_init_warnings"], sep="\n  ")
    print(f"versions: {summary['versions']}; threads: {summary['threads']}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
