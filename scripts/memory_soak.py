"""Steady memory: many sequential requests in one process must not grow its resident memory.

    .venv/bin/python scripts/memory_soak.py                      # 1,000 image requests on a tiny checkpoint
    .venv/bin/python scripts/memory_soak.py --model PATH --requests 200 --cache --stream

Each request is an image (cycling through the test images and a few synthetic sizes, so tile grids vary) plus a
question. RSS is read after a warm-up and then every ``--report-every`` requests; the script prints the growth
after warm-up in percent and exits 1 when it exceeds ``--max-growth`` (default 5 %). Users of the reference
report unbounded growth over long runs; this is the check that ours stays flat.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import vila  # noqa: E402
from vila.cache import FeatureCache  # noqa: E402

INPUTS = ROOT / "tests" / "fixtures" / "inputs"


def rss_bytes() -> int:
    """Current resident set size of this process."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil  # macOS / Windows

        return psutil.Process().memory_info().rss


def images() -> list:
    rng = np.random.default_rng(0)
    synthetic = [
        PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for w, h in ((320, 240), (200, 600), (900, 300))
    ]
    return [vila.Image(INPUTS / "demo_img.png"), vila.Image(INPUTS / "syn_640x480.png"), *synthetic]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        default=str(ROOT / "tests" / "fixtures" / "tiny" / "vila15-tiny"),
        help="checkpoint (default: a tiny one)",
    )
    p.add_argument("--requests", type=int, default=1000, help="requests after the warm-up (default: 1000)")
    p.add_argument("--warmup", type=int, default=50, help="requests before the baseline RSS is taken (default: 50)")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache", action="store_true", help="use a feature cache (as chat and batch do)")
    p.add_argument("--stream", action="store_true", help="use stream_content instead of generate")
    p.add_argument("--report-every", type=int, default=100)
    p.add_argument("--max-growth", type=float, default=5.0, help="fail above this growth after warm-up, in percent")
    args = p.parse_args()

    model = vila.load(args.model, device=args.device)
    pool = images()
    cache = FeatureCache() if args.cache else None
    questions = ["Describe the image.", "What colour dominates?", "Is there text in it?", "Count the objects."]

    def request(i: int) -> None:
        prompt = [pool[i % len(pool)], questions[i % len(questions)]]
        kw = dict(max_new_tokens=args.max_new_tokens, cache=cache)
        if args.stream:
            "".join(model.stream_content(prompt, **kw))
        else:
            model.generate(prompt, **kw)

    for i in range(args.warmup):
        request(i)
    gc.collect()
    base = rss_bytes()
    print(f"after {args.warmup} warm-up requests: RSS {base / 2**20:.1f} MiB", flush=True)
    t0 = time.perf_counter()
    peak = base
    for i in range(args.requests):
        request(args.warmup + i)
        if (i + 1) % args.report_every == 0:
            gc.collect()
            now = rss_bytes()
            peak = max(peak, now)
            rate = (i + 1) / (time.perf_counter() - t0)
            print(
                f"  {i + 1:5d} requests: RSS {now / 2**20:.1f} MiB ({(now - base) / base * 100:+.2f} %), {rate:.1f} req/s",
                flush=True,
            )
    gc.collect()
    end = rss_bytes()
    growth = (end - base) / base * 100
    print(
        f"after {args.requests} more requests: RSS {end / 2**20:.1f} MiB (peak sample {peak / 2**20:.1f} MiB); "
        f"growth after warm-up {growth:+.2f} % (limit {args.max_growth} %)"
    )
    return 0 if growth <= args.max_growth else 1


if __name__ == "__main__":
    sys.exit(main())
