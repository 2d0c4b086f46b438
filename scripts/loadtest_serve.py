"""Load test for ``vila-infer --serve``: requests/s and latency at several concurrency levels, and the server's
memory before and after.

Starts ``vila-infer --serve`` on a free local port as a subprocess, warms it up, then sends ``--requests``
chat completions (distinct greedy prompts, ``--max-tokens`` each) at every ``--concurrency`` level from as
many client threads, and prints a table (requests/s, completion tokens/s, p50 / p99 latency) and the server's
RSS after the warm-up and after all requests (the growth should stay within a few percent).

    python scripts/loadtest_serve.py                                   # the tiny checkpoint, CPU
    python scripts/loadtest_serve.py -m /tmp/vila-bench/nvila-lite-2b-random --requests 100 --device cuda

Not a unit test: the numbers depend on the machine. Clients are plain ``http.client`` connections (keep-alive,
one per thread) so that the client side costs little next to the server.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class Client:
    """One keep-alive connection per thread."""

    local = threading.local()

    def __init__(self, port: int, model: str, max_tokens: int):
        self.port, self.model, self.max_tokens = port, model, max_tokens

    def ask(self, i: int) -> tuple[float, int]:
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": f"Request {i}: describe item number {i} in a few words."}],
            "max_tokens": self.max_tokens,
        }
        t0 = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        elapsed = time.perf_counter() - t0
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {data[:200]!r}")
        return elapsed, json.loads(data)["usage"]["completion_tokens"]


def run_level(client: Client, concurrency: int, n: int, start: int) -> dict[str, float]:
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(client.ask, range(start, start + n)))
    wall = time.perf_counter() - t0
    latencies = sorted(r[0] for r in results)
    return {
        "concurrency": concurrency,
        "requests": n,
        "req_per_s": n / wall,
        "tokens_per_s": sum(r[1] for r in results) / wall,
        "p50_s": statistics.median(latencies),
        "p99_s": latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-path", "-m", default=str(REPO / "tests/fixtures/tiny/nvila-tiny"))
    p.add_argument("--requests", type=int, default=200, help="requests per concurrency level (default: 200)")
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated levels (default: 1,4,16)")
    p.add_argument("--max-tokens", type=int, default=16, help="completion tokens per request (default: 16)")
    p.add_argument("--max-batch-size", type=int, default=16, help="the server's --max-batch-size (default: 16)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results here")
    args = p.parse_args()

    port = free_port()
    cmd = [sys.executable, "-m", "vila.cli", "-m", args.model_path, "--serve", "--port", str(port)]
    cmd += ["--device", args.device, "--max-batch-size", str(args.max_batch_size), "--max-queue", "1024"]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    log = open(os.devnull, "w")  # noqa: SIM115 - one line per request is not wanted here
    server = subprocess.Popen(cmd, stderr=log, env=dict(os.environ, HF_HUB_OFFLINE="1"), cwd=REPO)
    try:
        deadline = time.monotonic() + 900
        while True:
            if server.poll() is not None:
                raise SystemExit(f"the server exited with {server.returncode}; run {' '.join(cmd)} to see why")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the server did not come up in 15 minutes")
            time.sleep(0.5)
        name = os.path.basename(os.path.normpath(args.model_path))
        client = Client(port, name, args.max_tokens)
        run_level(client, 4, 16, 10**6)  # warm-up: first-call costs, allocator pools, thread pools
        rss_before = rss_bytes(server.pid)
        rows, start = [], 0
        for level in (int(c) for c in args.concurrency.split(",")):
            rows.append(run_level(client, level, args.requests, start))
            start += args.requests
        rss_after = rss_bytes(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=60)

    print(f"model {args.model_path}, device {args.device}, max_tokens {args.max_tokens}, greedy, distinct prompts")
    print("| concurrency | requests | requests/s | completion tokens/s | p50 latency | p99 latency |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['concurrency']} | {r['requests']} | {r['req_per_s']:.2f} | {r['tokens_per_s']:.1f} "
            f"| {r['p50_s'] * 1000:.0f} ms | {r['p99_s'] * 1000:.0f} ms |"
        )
    growth = (rss_after - rss_before) / rss_before * 100
    print(
        f"server RSS: {rss_before / 2**20:.0f} MiB after warm-up, {rss_after / 2**20:.0f} MiB after {start} "
        f"requests ({growth:+.1f} %)"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"rows": rows, "rss_before": rss_before, "rss_after": rss_after, "requests": start}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
