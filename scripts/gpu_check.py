#!/usr/bin/env python
"""GPU check: the library's eager and fast decode paths on an NVILA-8B-size model with random bf16 weights.

One command runs the whole device check: the test suite on this machine (``--suite``), then an NVILA-8B-size
checkpoint with random weights written in the published layout (``benchmark.py``'s writer), loaded with
``vila.load`` and answered through ``vila.engine``, once eager (``compile_mode="off"``: dynamic KV cache) and
once fast (``"on"``: static KV cache, ``torch.compile``-d step, CUDA graphs):

* time to first token for one 448x448 image and a 32-token prompt, against the floor of its FLOPs (vision tower
  + LLM prefill) at this card's measured bf16 matmul rate;
* decode tokens/s at batch 1 and at batch 16 (``--batch`` requests in one ``vila.engine.run``), batch-1 decode against
  the memory-bandwidth bound (LLM weight bytes per token over the datasheet and the measured copy bandwidth);
* identical greedy tokens eager vs fast, at both batch sizes.

    python scripts/gpu_check.py --suite --json gpu.json   # on a CUDA machine: tests, then ~16 GB written and loaded
    python scripts/gpu_check.py --smoke                   # the same code on CPU at toy sizes (what the tests run)

Goals (issue 12), printed as pass/fail and never asserted: batch-1 fast decode >= 0.75 of the bandwidth bound;
fast TTFT <= 1.5x the FLOP floor; batch-16 fast decode throughput >= 10x batch 1. The exit status is 1 only
when the greedy tokens differ or the suite fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchmark as bench  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GOALS = {  # name: (minimum, maximum) of the ratio; the batch goal is for --batch 16
    "fast_b1_over_bound": (0.75, None),
    "fast_ttft_over_floor": (None, 1.5),
    "fast_batch_over_b1": (10.0, None),
}

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


def run_suite(timeout: int) -> dict[str, Any]:
    """The whole test suite on this machine (``pytest -q -x``), stopped after ``timeout`` seconds."""
    print(f"# test suite (pytest -q -x, at most {timeout} s)", flush=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"]
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False)
        rc, text = out.returncode, out.stdout + out.stderr
    except subprocess.TimeoutExpired as e:
        rc, text = 124, (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
    seconds = time.perf_counter() - t0
    tail = "\n".join(text.strip().splitlines()[-15:])
    print(tail, flush=True)
    print(f"# suite: exit {rc} in {seconds:.0f} s" + (" (timed out)" if rc == 124 else ""), flush=True)
    return {"rc": rc, "seconds": round(seconds, 1), "tail": tail}


class Ticks:
    """``on_token`` hooks that timestamp each request's tokens (a token is chosen on the host, so the device has
    finished the step that produced it when the hook runs)."""

    def __init__(self, n: int):
        self.times: list[list[float]] = [[] for _ in range(n)]

    def hook(self, i: int) -> Any:
        def on_token(token: int) -> bool:
            self.times[i].append(time.perf_counter())
            return False

        return on_token


def answer(model: Any, parts: list[Any], gen: Any, rows: int) -> dict[str, Any]:
    """``rows`` copies of the request in one ``vila.engine.run``: TTFT of the first, decode tokens/s over all."""
    from vila.engine import Request, run

    ticks = Ticks(rows)
    requests = [Request(parts, {"generation_config": gen}, on_token=ticks.hook(i)) for i in range(rows)]
    t0 = time.perf_counter()
    results = run(model, requests)
    first = min(t[0] for t in ticks.times)
    start, end = max(t[0] for t in ticks.times), max(t[-1] for t in ticks.times)
    decoded = sum(len(t) - 1 for t in ticks.times)
    return {
        "ttft_s": first - t0,
        "decode_tok_s": decoded / (end - start) if end > start else float("nan"),
        "tokens": [r.token_ids for r in results],
        "positions": results[0].num_prompt_tokens,
        "vision_encode_s": results[0].timings.get("vision_encode_s", 0.0),
    }


def measure(model: Any, parts: list[Any], gen: Any, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """TTFT and batch-1 / batch-16 decode under ``model.compile_mode = mode``, medians of ``args.runs``."""
    model.compile_mode = mode
    out: dict[str, Any] = {}
    for rows in (1, args.batch):
        t0 = time.perf_counter()
        for _ in range(args.warmup):  # the fast path's first calls of a shape compile and record its graphs
            answer(model, parts, gen, rows)
        out[f"warmup_b{rows}_s"] = round(time.perf_counter() - t0, 2)
        runs = [answer(model, parts, gen, rows) for _ in range(args.runs)]
        out[f"decode_tok_s_b{rows}"] = statistics.median(r["decode_tok_s"] for r in runs)
        out[f"tokens_b{rows}"] = runs[0]["tokens"]
        if rows == 1:
            out["ttft_s"] = statistics.median(r["ttft_s"] for r in runs)
            out["vision_encode_s"] = statistics.median(r["vision_encode_s"] for r in runs)
            out["positions"] = runs[0]["positions"]
        print(
            f"  {mode:<4} batch {rows:>2}: decode {out[f'decode_tok_s_b{rows}']:.1f} tok/s"
            + (f", TTFT {out['ttft_s'] * 1e3:.1f} ms" if rows == 1 else "")
            + f" (warm-up {out[f'warmup_b{rows}_s']} s)",
            flush=True,
        )
    return out


def vision_tiles(model: Any) -> Any:
    """A counter of the tiles the vision tower encodes (a hook on its forward): the FLOP floor's input."""
    count = [0]

    def hook(module: Any, inputs: tuple[Any, ...]) -> None:
        if inputs and isinstance(inputs[0], torch.Tensor):
            count[0] += inputs[0].shape[0]

    return count, model.vision_tower.register_forward_pre_hook(hook)


def goal_lines(values: dict[str, float]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, (lo, hi) in GOALS.items():
        v = values[name]
        ok = (lo is None or v >= lo) and (hi is None or v <= hi)
        want = f">= {lo}" if lo is not None else f"<= {hi}"
        out[name] = {"value": round(v, 3), "goal": want, "pass": ok}
        print(f"  {name:<24} {v:8.3f}   goal {want:<7} {'PASS' if ok else 'FAIL'}", flush=True)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    import vila

    device = torch.device("cpu" if args.smoke else args.device)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    timer = bench.Timer(device)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="vila-gpu-check-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        root = bench.materialize(args.arch, workdir, dtype, str(device))
        write_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        model = vila.load(root, device=device, dtype=dtype, compile=False)
        timer.sync()
        load_s = time.perf_counter() - t0
        card = torch.cuda.get_device_name(device) if device.type == "cuda" else bench.machine_info(device)["cpu"]
        print(f"# {card}: {args.arch}, random {dtype} weights; written in {write_s:.1f} s, loaded in {load_s:.1f} s")

        image = workdir / "image.png"
        bench.test_image((448, 448)).save(image)
        text = prompt_of(model.tokenizer, 32)
        parts = [vila.Image(image), text]
        gen = bench.greedy_config(model, args.new_tokens)  # exactly new_tokens tokens: no stop id can be chosen

        tiles, handle = vision_tiles(model)
        model.generate(parts, generation_config=bench.greedy_config(model, 1))
        handle.remove()
        print(f"decode, {args.new_tokens} new tokens, eager (dynamic cache) vs fast (static cache + compiled step)")
        results = {"eager": measure(model, parts, gen, "off", args), "fast": measure(model, parts, gen, "on", args)}
        same = all(results["eager"][f"tokens_b{b}"] == results["fast"][f"tokens_b{b}"] for b in (1, args.batch))
        fast = results["fast"]

        weight_bytes = bench.llm_decode_bytes(model.llm)
        measured = copy_bandwidth(device, timer, (2 << 30) if device.type == "cuda" else (256 << 20))
        sheet = datasheet_bandwidth(card) if device.type == "cuda" else None
        bound = (sheet or measured) / weight_bytes
        # The floor of one request's TTFT: the vision tower's and the prefill's FLOPs at the card's matmul rate
        # (the projector's and the norms' share is small and left out, so the floor is a little low).
        rate = bench.matmul_rate(device, dtype, 4096, 4096, 4096, timer) if not args.smoke else None
        rate = rate or bench.matmul_rate(device, dtype, 256, 256, 256, timer)
        vision_flops = bench.siglip_flops(model.config.vision, tiles[0])
        prefill_flops = bench.llm_prefill_flops(model.llm, fast["positions"])
        floor = (vision_flops + prefill_flops) / rate

        print("bounds")
        print(
            f"  LLM weight bytes per token {weight_bytes / 1e9:.2f} GB; bandwidth datasheet "
            f"{f'{sheet / 1e12:.2f} TB/s' if sheet else 'unknown'}, measured copy {measured / 1e12:.3f} TB/s"
        )
        print(
            f"  decode bound {bound:.1f} tok/s; matmul {rate / 1e12:.1f} TFLOP/s; {tiles[0]} tiles, "
            f"{fast['positions']} positions: TTFT floor {floor * 1e3:.2f} ms"
        )
        print(f"  greedy tokens identical eager vs fast (batch 1 and {args.batch}): {same}")
        ratios = {
            "fast_b1_over_bound": fast["decode_tok_s_b1"] / bound,
            "fast_ttft_over_floor": fast["ttft_s"] / floor,
            "fast_batch_over_b1": fast[f"decode_tok_s_b{args.batch}"] / fast["decode_tok_s_b1"],
        }
        print("goals")
        goals = goal_lines(ratios)
        for r in results.values():
            for b in (1, args.batch):
                r.pop(f"tokens_b{b}")
        out: dict[str, Any] = {
            "card": card,
            "machine": bench.machine_info(device),
            "arch": args.arch,
            "dtype": str(dtype),
            "write_s": round(write_s, 1),
            "load_s": round(load_s, 2),
            "prompt_text_tokens": len(model.tokenizer(text).input_ids),
            "new_tokens": args.new_tokens,
            "batch": args.batch,
            "results": results,
            "same_greedy_tokens": same,
            "llm_weight_bytes": weight_bytes,
            "bandwidth_datasheet": sheet,
            "bandwidth_measured_copy": measured,
            "bound_tok_s": bound,
            "matmul_flop_s": rate,
            "vision_tiles": tiles[0],
            "ttft_floor_s": floor,
            "fast_over_eager_b1": fast["decode_tok_s_b1"] / results["eager"]["decode_tok_s_b1"],
            "ratios": ratios,
            "goals": goals,
        }
        print(
            f"# {card}: batch-1 decode {results['eager']['decode_tok_s_b1']:.1f} tok/s eager, "
            f"{fast['decode_tok_s_b1']:.1f} fast = {ratios['fast_b1_over_bound']:.2f} of the {bound:.1f} tok/s bound; "
            f"batch {args.batch} {fast[f'decode_tok_s_b{args.batch}']:.1f} tok/s; TTFT {fast['ttft_s'] * 1e3:.1f} ms "
            f"= {ratios['fast_ttft_over_floor']:.2f}x the floor; greedy tokens identical: {same}"
        )
        return out
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, toy widths of the same architecture (for tests)")
    p.add_argument("--suite", action="store_true", help="run the whole test suite (pytest -q -x) first")
    p.add_argument("--suite-timeout", type=int, default=420, help="seconds the suite may take (default 420)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--arch", default=None, help="default: nvila-8b (nvila-8b-smoke with --smoke)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=16, help="requests decoded together for the batch figure")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per batch size (the fast path compiles)")
    p.add_argument("--workdir", default=None, help="keep the random checkpoint here (default: a temp dir, removed)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    args.arch = args.arch or ("nvila-8b-smoke" if args.smoke else "nvila-8b")
    if not args.smoke and not torch.cuda.is_available():
        p.error("no CUDA device here; use --smoke for the CPU path")
    if args.smoke:
        # Inductor's C++ build takes minutes on a small CPU; aot_eager traces the same step as one graph.
        os.environ.setdefault("VILA_COMPILE_BACKEND", "aot_eager")
    out: dict[str, Any] = {}
    if args.suite:
        out["suite"] = run_suite(args.suite_timeout)
    out.update(run(args))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str) + "\n")
    ok = out["same_greedy_tokens"] and out.get("suite", {"rc": 0})["rc"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
