"""Rows/s of ``vila-infer --batch`` locally and on Ray Data with 1 and 2 replicas, and the per-actor overhead.

    python scripts/bench_scaleout.py [--model tests/fixtures/tiny/nvila-tiny] [--rows 48] [--max-new-tokens 8]

Every run answers the same text+image rows (fresh output files). "load" is the model load (local) or the
cluster start plus the first actor's model load; "answer" is the time from the first to the last row written.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def write_rows(folder: Path, n: int) -> Path:
    shutil.copy(ROOT / "tests/fixtures/inputs/demo_img.png", folder / "a.png")
    rows = [
        {"id": i, "text": f"Describe the image, detail {i}.", "media": ["a.png"]}
        if i % 2
        else {"id": i, "text": f"Q{i}?"}
        for i in range(n)
    ]
    src = folder / "req.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return src


class Watch:
    """Times the first and last line appended to a file (polled every 10 ms in a thread)."""

    def __init__(self, path: Path):
        import threading

        self.path, self.first, self.last, self.stop = path, None, None, False
        self.t0 = time.perf_counter()
        self.thread = threading.Thread(target=self.poll, daemon=True)
        self.thread.start()

    def poll(self) -> None:
        seen = 0
        while not self.stop:
            n = self.path.read_bytes().count(b"\n") if self.path.exists() else 0
            if n > seen:
                now = time.perf_counter() - self.t0
                self.first = now if self.first is None else self.first
                self.last, seen = now, n
            time.sleep(0.01)

    def done(self) -> tuple[float, float]:
        time.sleep(0.05)
        self.stop = True
        self.thread.join()
        return self.first or 0.0, self.last or 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "tests/fixtures/tiny/nvila-tiny"))
    p.add_argument("--rows", type=int, default=48)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    args = p.parse_args()
    defaults = {"max_new_tokens": args.max_new_tokens}
    load = {"device": "cpu", "dtype": "float32"}
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        src = write_rows(folder, args.rows)

        import vila
        from vila.batch import run_batch

        watch = Watch(folder / "local.jsonl")
        model = vila.load(args.model, **load)
        run_batch(model, src, folder / "local.jsonl", batch_size=args.batch_size, defaults=defaults, progress=False)
        table.append(("local --batch", time.perf_counter() - watch.t0, *watch.done()))
        del model

        import ray

        from vila.ray import run_ray_batch

        t0 = time.perf_counter()
        ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        print(f"ray.init (local 2-CPU cluster): {time.perf_counter() - t0:.2f} s")
        for replicas in (1, 2):
            out = folder / f"ray{replicas}.jsonl"
            watch = Watch(out)
            run_ray_batch(
                args.model, src, out, load_kwargs=load, batch_size=args.batch_size, defaults=defaults,
                replicas=replicas, gpus_per_replica=0, progress=False,
            )  # fmt: skip
            table.append((f"ray, {replicas} replica(s)", time.perf_counter() - watch.t0, *watch.done()))
        ray.shutdown()
    print(
        f"{args.rows} rows (half text, half image), max_new_tokens {args.max_new_tokens}, batch size {args.batch_size}"
    )
    print(f"{'run':<20}{'total s':>9}{'rows/s':>8}{'to 1st row s':>14}{'steady rows/s':>15}")
    for name, total, first, last in table:
        steady = (args.rows - args.batch_size) / (last - first) if last > first else float("nan")
        print(f"{name:<20}{total:>9.2f}{args.rows / total:>8.2f}{first:>14.2f}{steady:>15.2f}")


if __name__ == "__main__":
    main()
