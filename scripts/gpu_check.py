#!/usr/bin/env python
"""GPU check: NVILA-8B-size model with random bf16 weights, one 448x448 image and a 32-token prompt.

Reports time to first token and decode tokens/s for default generation (dynamic KV cache) and for the fast
path (static KV cache, decode step compiled by transformers), checks that both give the same greedy tokens,
and sets decode speed against the memory-bandwidth bound (bandwidth / LLM weight bytes), with the card's
bandwidth from a datasheet table and from a measured device-to-device copy.

    python scripts/gpu_check.py                 # on a CUDA machine (~16 GB written to a temp dir, then loaded)
    python scripts/gpu_check.py --smoke         # the same code path on CPU at toy sizes (what the tests run)

Goals (issue 6): fast-path decode >= 0.75 of the bound; TTFT <= 40 ms (NVILA README: 43 ms / 82 tok/s on A100).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchmark as bench  # noqa: E402

# Datasheet memory bandwidth (bytes/s) by a substring of torch.cuda.get_device_name(); first match wins.
BANDWIDTH = [
    ("H200", 4.8e12),
    ("H100 NVL", 3.9e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),  # SXM5 80 GB HBM3 ("NVIDIA H100 80GB HBM3")
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12),
    ("A100", 1.555e12),
    ("L40S", 0.864e12),
    ("L4", 0.3e12),
    ("RTX 4090", 1.008e12),
]


def datasheet_bandwidth(name: str) -> float | None:
    for key, bw in BANDWIDTH:
        if key.lower() in name.lower():
            return bw
    return None


def copy_bandwidth(device: torch.device, timer: bench.Timer, nbytes: int) -> float:
    """Bytes read plus written per second by a large device-to-device copy."""
    src = torch.empty(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    stat, _ = bench.repeat(lambda: dst.copy_(src), timer, runs=5, warmup=2)
    return 2 * nbytes / stat.median


def prompt_of(tokenizer: Any, n: int) -> str:
    """A text that tokenises to exactly ``n`` tokens (or as close as the vocabulary allows)."""
    words = "describe the picture and tell me what is in the middle of it with every detail you can see".split()
    text, i = "", 0
    while len(tokenizer(text).input_ids) < n and i < 10 * n:
        text = f"{text} {words[i % len(words)]}".strip()
        i += 1
    while len(tokenizer(text).input_ids) > n and " " in text:
        text = text.rsplit(" ", 1)[0]
    for _ in range(n):  # top up with one-token punctuation
        if len(tokenizer(text).input_ids) >= n:
            break
        text += " ."
    return text


def run(args: argparse.Namespace) -> dict[str, Any]:
    import vila
    from vila.loading import load

    device = torch.device("cpu" if args.smoke else args.device)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    timer = bench.Timer(device)
    workdir = Path(tempfile.mkdtemp(prefix="vila-gpu-check-"))
    try:
        t0 = time.perf_counter()
        root = bench.materialize(args.arch, workdir, torch.bfloat16 if not args.smoke else torch.float32, str(device))
        write_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        model = load(root, device=device, dtype=dtype)
        timer.sync()
        load_s = time.perf_counter() - t0
        card = torch.cuda.get_device_name(device) if device.type == "cuda" else bench.machine_info(device)["cpu"]
        print(
            f"# card: {card}; {args.arch}, random {dtype} weights; written in {write_s:.1f} s, loaded in {load_s:.1f} s"
        )

        image = workdir / "image.png"
        bench.test_image((448, 448)).save(image)
        text = prompt_of(model.tokenizer, 32)
        parts = [vila.Image(image), text]
        n_text = len(model.tokenizer(text).input_ids)

        report = bench.Report(bench.machine_info(device), {"arch": args.arch, "dtype": str(dtype), "card": card})
        out: dict[str, Any] = {"card": card, "load_s": load_s, "prompt_text_tokens": n_text}
        res = bench.bench_static(report, model, parts, args, timer, compile_decode=device.type == "cuda")
        results = {}
        for key, name in (("dynamic_cache", "default"), ("static_compiled", "static_compiled")):
            runs = res[key]
            results[name] = {
                "ttft_s": statistics.median(r["ttft_s"] for r in runs),
                "prefill_s": statistics.median(r["prefill_s"] for r in runs),
                "media_decode_s": statistics.median(r["media_decode_s"] for r in runs),
                "preprocess_s": statistics.median(r["preprocess_s"] for r in runs),
                "vision_encode_s": statistics.median(r["vision_encode_s"] for r in runs),
                "decode_tok_s": statistics.median(r["decode_tok_s"] for r in runs),
                "tokens": runs[0]["tokens"],
                "positions": runs[0]["positions"],
            }
        same = results["default"]["tokens"] == results["static_compiled"]["tokens"]

        weight_bytes = bench.llm_decode_bytes(model.llm)
        measured = copy_bandwidth(device, timer, (2 << 30) if device.type == "cuda" else (256 << 20))
        sheet = datasheet_bandwidth(card) if device.type == "cuda" else None
        bw = sheet or measured
        bound = bw / weight_bytes
        fast = results["static_compiled"]["decode_tok_s"]
        print("bound")
        report.add("bound", "llm_weight_bytes_per_token", weight_bytes, f"({weight_bytes / 1e9:.2f} GB)")
        report.add(
            "bound", "bandwidth_datasheet", sheet or "unknown card", f"({sheet / 1e12:.2f} TB/s)" if sheet else ""
        )
        report.add("bound", "bandwidth_measured_copy", measured, f"({measured / 1e12:.3f} TB/s, read+write)")
        report.add("bound", "decode_bound_tok_s", round(bound, 2), "(bandwidth / weight bytes)")
        report.add("bound", "default_over_bound", round(results["default"]["decode_tok_s"] / bound, 3))
        report.add("bound", "fast_over_bound", round(fast / bound, 3), "(goal >= 0.75)")
        report.add("bound", "fast_over_measured_copy_bound", round(fast / (measured / weight_bytes), 3))
        report.add("bound", "fast_ttft_ms", round(results["static_compiled"]["ttft_s"] * 1e3, 2), "(goal <= 40 ms)")
        fast_run = results["static_compiled"]
        ttft_parts = ", ".join(
            f"{k[:-2]} {fast_run[k] * 1e3:.1f} ms"
            for k in ("media_decode_s", "preprocess_s", "vision_encode_s", "prefill_s")
        )
        report.add("bound", "fast_ttft_breakdown", ttft_parts)
        report.add("bound", "llm_input_positions", fast_run["positions"])
        report.add("bound", "same_greedy_tokens", same)
        out.update(results=results, same_greedy_tokens=same, bound_tok_s=bound, bandwidth=bw, report=report.sections)
        for r in out["results"].values():
            r.pop("tokens")
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2, default=str) + "\n")
        print(
            f"# {card}: decode {results['default']['decode_tok_s']:.1f} tok/s default, {fast:.1f} tok/s fast = "
            f"{fast / bound:.2f} of the {bound:.1f} tok/s bound; TTFT {results['static_compiled']['ttft_s'] * 1e3:.1f} ms; "
            f"greedy tokens identical: {same}"
        )
        return out
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, toy widths of the same architecture (for tests)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--arch", default=None, help="default: nvila-8b (nvila-8b-smoke with --smoke)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2, help="the first static-cache runs compile the decode step")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    args.arch = args.arch or ("nvila-8b-smoke" if args.smoke else "nvila-8b")
    if not args.smoke and not torch.cuda.is_available():
        p.error("no CUDA device here; use --smoke for the CPU path")
    out = run(args)
    return 0 if out["same_greedy_tokens"] else 1


if __name__ == "__main__":
    sys.exit(main())
