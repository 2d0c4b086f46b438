#!/usr/bin/env python
"""Benchmark `vila.video.load_video` against the reference llava frame loader.

The baseline reproduces the reference (media_loading.md §7.3): OpenCV, the last-frame check, then one
``cap.set(CAP_PROP_POS_FRAMES, i)`` + ``read()`` per distinct index, ``cvtColor`` and ``PIL.Image.fromarray``.
Both loaders sample the same indices (uniform rule) from the same file; every loader runs once to warm up, then
``--runs`` times, interleaved so that drift on a shared machine affects both alike.

Peak memory: each loader runs in a fresh subprocess that samples ``--memory-frames`` frames and keeps them resized to
448x448 (the NVILA frame size), resizing each frame as it is decoded: the baseline in its loop, ours through
``load_video(transform=...)``. A third run keeps the full-resolution frames that ``load_video`` returns without a
transform and resizes afterwards, to show what holding them costs. Reported: peak RSS (``ru_maxrss``) of the child,
and its RSS after imports, before decoding.

The test video (default 60 s, 1280x720, 30 fps, OpenCV ``mp4v``, a keyframe every 12 frames) is written once into
the temp directory and reused.

    python scripts/bench_video.py            # full benchmark, a table
    python scripts/bench_video.py --json     # the same as JSON
    python scripts/bench_video.py --quick    # small video, one run: a smoke test
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
from collections.abc import Callable
from pathlib import Path

import numpy as np
import PIL.Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FRAME_SIZE = 448


def make_video(seconds: int, width: int, height: int, fps: int) -> Path:
    """Write the synthetic video once (moving gradients, a moving box and the frame number) and cache it."""
    import cv2

    path = Path(tempfile.gettempdir()) / "vila-bench" / f"bench_{width}x{height}_{seconds}s_{fps}fps_v1.mp4"
    if path.is_file() and path.stat().st_size > 0:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.mp4")
    writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    yy, xx = np.mgrid[0:height, 0:width]
    base = ((xx + yy) % 256).astype(np.uint8)
    box = max(width // 6, 8)
    try:
        for i in range(seconds * fps):
            frame = np.empty((height, width, 3), np.uint8)
            frame[..., 0] = np.roll(base, i * 4, axis=1)
            frame[..., 1] = np.roll(base, i * 2, axis=0)
            frame[..., 2] = (i * 3) % 256
            x = (i * 7) % max(width - box, 1)
            cv2.rectangle(frame, (x, height // 4), (x + box, height // 4 + box), (255, 255, 255), -1)
            cv2.putText(
                frame, str(i), (width // 20, height - height // 10), cv2.FONT_HERSHEY_SIMPLEX, height / 200, 0, 3
            )
            writer.write(frame)
    finally:
        writer.release()
    os.replace(tmp, path)
    return path


def reference_load(path: Path, num_frames: int, transform: Callable | None = None) -> list[PIL.Image.Image]:
    """The reference llava `_load_video` for fps 0, as in media_loading.md §7.3 (OpenCV seek + read per frame)."""
    import cv2

    cap = cv2.VideoCapture(str(path))
    frame_count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    while frame_count > 0:
        cap.set(cv2.CAP_PROP_POS_FRAMES, frame_count - 1)
        if cap.grab():
            break
        frame_count -= 1
    indices = np.round(np.linspace(0, frame_count - 1, num_frames)).astype(int)
    frames: dict[int, PIL.Image.Image] = {}
    for index in indices:
        if index in frames:
            continue
        cap.set(cv2.CAP_PROP_POS_FRAMES, index)
        ok, frame = cap.read()
        if not ok:
            continue
        image = PIL.Image.fromarray(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
        frames[index] = transform(image) if transform else image
    cap.release()
    return [frames[i] for i in indices if i in frames]


def ours_load(path: Path, num_frames: int, backend: str | None = None, transform: Callable | None = None) -> list:
    from vila.video import load_video

    return load_video(path, num_frames=num_frames, backend=backend, progress=False, transform=transform).frames


def time_runs(loaders: dict[str, Callable[[], object]], runs: int) -> dict[str, list[float]]:
    for load in loaders.values():  # warm-up: file cache, lazy imports
        load()
    times: dict[str, list[float]] = {name: [] for name in loaders}
    for _ in range(runs):
        for name, load in loaders.items():
            start = time.perf_counter()
            load()
            times[name].append(time.perf_counter() - start)
    return times


def summary(ts: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts)}


def resize(image: PIL.Image.Image) -> PIL.Image.Image:
    return image.resize((FRAME_SIZE, FRAME_SIZE), PIL.Image.BICUBIC)


def memory_worker(mode: str, video: Path, frames: int) -> None:
    """Run in a fresh process: decode, print peak RSS as JSON."""
    import cv2  # noqa: F401  (imports count in the "after imports" RSS of every mode)

    import vila.video  # noqa: F401

    before = _rss_mb()
    if mode == "baseline":
        kept = reference_load(video, frames, transform=resize)
    elif mode == "ours":
        kept = ours_load(video, frames, transform=resize)
    else:  # ours, full-resolution frames kept until all are decoded
        kept = [resize(f) for f in ours_load(video, frames)]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"mode": mode, "frames": len(kept), "rss_after_imports_mb": before, "peak_rss_mb": peak}))


def _rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def measure_memory(video: Path, frames: int) -> list[dict]:
    results = []
    for mode in ("baseline", "ours", "ours_full_res"):
        cmd = [sys.executable, __file__, "--memory-worker", mode, "--video", str(video), "--memory-frames", str(frames)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small 3 s 320x240 video, 1 run, no memory check")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--runs", type=int, default=None, help="timed runs per loader (default 7, quick 1)")
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 32, 128], help="frame counts to sample")
    parser.add_argument("--video", type=Path, default=None, help="benchmark this file instead of the synthetic one")
    parser.add_argument("--memory-frames", type=int, default=None, help="frames for the peak RSS check (0: skip)")
    parser.add_argument("--memory-worker", choices=["baseline", "ours", "ours_full_res"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.memory_worker:
        memory_worker(args.memory_worker, args.video, args.memory_frames)
        return 0

    runs = args.runs or (1 if args.quick else 7)
    memory_frames = args.memory_frames if args.memory_frames is not None else (0 if args.quick else 1024)
    start = time.perf_counter()
    video = args.video or (make_video(3, 320, 240, 30) if args.quick else make_video(60, 1280, 720, 30))
    generate_s = time.perf_counter() - start

    import cv2

    from vila.video import load_video

    cap = cv2.VideoCapture(str(video))
    info = {
        "video": str(video),
        "frame_count": int(cap.get(cv2.CAP_PROP_FRAME_COUNT)),
        "fps": cap.get(cv2.CAP_PROP_FPS),
        "size": [int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))],
        "generate_or_cache_s": round(generate_s, 3),
        "runs": runs,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "opencv": cv2.__version__,
    }
    cap.release()
    rows = []
    for n in args.frames:
        ours = load_video(video, num_frames=n, progress=False)
        ref = reference_load(video, n)
        same = len(ref) == len(ours.frames) and all(
            np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(ref, ours.frames)
        )
        times = time_runs(
            {
                "baseline": lambda n=n: reference_load(video, n),
                "ours": lambda n=n: ours_load(video, n),
                "ours_opencv": lambda n=n: ours_load(video, n, backend="opencv"),
            },
            runs,
        )
        base = statistics.median(times["baseline"])
        rows.append(
            {
                "frames": n,
                "identical_frames": same,
                **{name: summary(ts) for name, ts in times.items()},
                "ratio": statistics.median(times["ours"]) / base,
                "ratio_opencv": statistics.median(times["ours_opencv"]) / base,
            }
        )
    memory = measure_memory(video, memory_frames) if memory_frames > 0 else []
    report = {"info": info, "timing": rows, "memory": memory, "memory_frames": memory_frames}

    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(
        f"video {video.name}: {info['frame_count']} frames, {info['fps']:g} fps, {info['size'][0]}x{info['size'][1]}; "
        f"{runs} run(s) after a warm-up, {info['cpus']} CPUs"
    )
    print("seconds: median [min-max]; ratio = median ours / median baseline (lower is better)")
    header = f"{'frames':>6} | {'baseline (ref. OpenCV)':>24} | {'ours (auto: decord)':>24} | {'ratio':>5} | "
    print(header + f"{'ours (backend=opencv)':>24} | {'ratio':>5} | same pixels")
    for row in rows:
        cells = [_cell(row["baseline"]), _cell(row["ours"]), f"{row['ratio']:5.2f}"]
        cells += [_cell(row["ours_opencv"]), f"{row['ratio_opencv']:5.2f}", str(row["identical_frames"])]
        print(f"{row['frames']:>6} | " + " | ".join(cells))
    if memory:
        print(f"peak RSS, {memory_frames} frames kept at {FRAME_SIZE}x{FRAME_SIZE} (fresh process each):")
        for m in memory:
            print(
                f"  {m['mode']:<14} peak {m['peak_rss_mb']:8.0f} MB  (after imports {m['rss_after_imports_mb']:.0f} MB,"
                f" {m['frames']} frames)"
            )
    return 0


def _cell(s: dict[str, float]) -> str:
    return f"{s['median_s']:7.3f} [{s['min_s']:.3f}-{s['max_s']:.3f}]".rjust(24)


if __name__ == "__main__":
    sys.exit(main())
