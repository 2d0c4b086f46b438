"""Per-token decode step time of vila.decode: dynamic cache vs static cache vs compiled static step, same run.

    python scripts/bench_decode.py [--tokens 64] [--batch 1 4] [--big]

A step's time is (time for N new tokens - time for 1 new token) / (N - 1), so the prefill cancels out; each
figure is the median of ``--runs`` runs (the paths alternating) after one warm-up run (the compiled path's first run is reported as its
warm-up: tracing, compiling and, on CUDA, recording the graph). Models: the tiny test checkpoint's LLM and, with
``--big``, a random Qwen2 of 4 layers, hidden size 1024.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from vila.decode import DecodeRow, decode

TINY_LLM = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "tiny" / "nvila-lite-tiny" / "llm"
NEVER = 10**9  # a stop id no vocabulary has: every row runs to its budget


def tiny_llm(device: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(TINY_LLM, dtype=torch.float32).eval().to(device)


def big_llm(device: str, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=4,
        num_attention_heads=16,
        num_key_value_heads=2,
        vocab_size=32000,
        max_position_embeddings=4096,
    )
    return Qwen2ForCausalLM(cfg).eval().to(device, dtype)


def run(llm: torch.nn.Module, prompts: list[torch.Tensor], tokens: int, **kw: bool) -> tuple[float, list[list[int]]]:
    if prompts[0].device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = decode(llm, [DecodeRow(p, tokens, [NEVER]) for p in prompts], **kw)
    if prompts[0].device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def bench(name: str, llm: torch.nn.Module, batch: int, tokens: int, runs: int) -> None:
    device = next(llm.parameters()).device
    dtype = next(llm.parameters()).dtype
    g = torch.Generator().manual_seed(0)
    prompts = [
        (torch.randn(40 + 7 * i, llm.config.hidden_size, generator=g) * 0.5).to(device, dtype) for i in range(batch)
    ]
    paths = {"dynamic": {}, "static": {"static": True}, "compiled": {"compile": True}}
    answers = {}
    for path, kw in paths.items():
        warm, answers[path] = run(llm, prompts, tokens, **kw)
        run(llm, prompts, 1, **kw)
        if path == "compiled":
            print(f"{name} batch {batch}: compiled first call {warm:.1f} s (warm-up incl. compile)")
    # The paths alternate within each run so that a busy machine slows them alike; ratios are per run.
    steps: dict[str, list[float]] = {p: [] for p in paths}
    for _ in range(runs):
        for path, kw in paths.items():
            long, short = run(llm, prompts, tokens, **kw)[0], run(llm, prompts, 1, **kw)[0]
            steps[path].append((long - short) / (tokens - 1))
    step = {p: statistics.median(v) for p, v in steps.items()}
    ratio = {p: statistics.median(a / b for a, b in zip(v, steps["dynamic"])) for p, v in steps.items()}
    same = answers["dynamic"] == answers["static"] == answers["compiled"]
    print(
        f"{name} batch {batch}: step ms dynamic {step['dynamic'] * 1e3:.2f}, static {step['static'] * 1e3:.2f}"
        f" ({ratio['static']:.2f}x), compiled {step['compiled'] * 1e3:.2f} ({ratio['compiled']:.2f}x);"
        f" identical greedy tokens: {same}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--big", action="store_true", help="also a random Qwen2, 4 layers, hidden 1024")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}")
    with torch.no_grad():
        llm = tiny_llm(args.device)
        for b in args.batch:
            bench("tiny", llm, b, args.tokens, args.runs)
        if args.big:
            dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
            llm = big_llm(args.device, dtype)
            for b in args.batch:
                bench("qwen2-4x1024", llm, b, args.tokens, args.runs)


if __name__ == "__main__":
    main()
