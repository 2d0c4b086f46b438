#!/usr/bin/env python
"""Benchmark `vila.video.load_video` against the reference llava frame loader.

The baseline reproduces the reference (``_load_video``, NVlabs/VILA ``llava/utils/media.py``): OpenCV, the
last-frame check, then one ``cap.set(CAP_PROP_POS_FRAMES, i)`` + ``read()`` per distinct index, ``cvtColor`` and
``PIL.Image.fromarray``.
Both loaders sample the same indices (uniform rule) from the same file; every loader runs once to warm up, then
``--runs`` times, interleaved so that drift on a shared machine affects both alike. "ours" is measured four ways:
the automatic backend (PyAV, keyframe-exact seeks, when the file's PyAV metadata agrees with OpenCV's),
``backend="opencv"``, ``backend="decord"``, and the automatic backend with one decoder thread
(``VILA_VIDEO_THREADS=1``).

Peak memory: each loader runs in a fresh subprocess that samples ``--memory-frames`` frames and keeps them resized to
448x448 (the NVILA frame size), resizing each frame as it is decoded: the baseline in its loop, ours through
``load_video(transform=...)``. A third run keeps the full-resolution frames that ``load_video`` returns without a
transform and resizes afterwards, to show what holding them costs. Reported: peak RSS (``VmHWM``) of the child,
and its RSS after imports, before decoding.

The test video (default 60 s, 1280x720, 30 fps, OpenCV ``mp4v``, a keyframe every 12 frames) is written once into
the temp directory and reused.

    python scripts/bench_video.py            # full benchmark, a table
    python scripts/bench_video.py --json     # the same as JSON
    python scripts/bench_video.py --quick    # small video, one run: a smoke test
"""

from __future__ import annotations

import argparse
import functools
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
    """The reference llava `_load_video` (NVlabs/VILA `llava/utils/media.py`) for fps 0: OpenCV seek + read per
    frame."""
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


def ours_load_serial(path: Path, num_frames: int) -> list:
    """Ours with one decoder thread (``VILA_VIDEO_THREADS=1``): what the parallel runs add."""
    old = os.environ.get("VILA_VIDEO_THREADS")
    os.environ["VILA_VIDEO_THREADS"] = "1"
    try:
        return ours_load(path, num_frames)
    finally:
        if old is None:
            del os.environ["VILA_VIDEO_THREADS"]
        else:
            os.environ["VILA_VIDEO_THREADS"] = old


LABELS = {
    "baseline": "baseline (reference: OpenCV seek per frame)",
    "ours": "ours (automatic backend: {auto})",
    "ours_opencv": "ours (backend='opencv')",
    "ours_decord": "ours (backend='decord')",
    "ours_1_thread": "ours (automatic, VILA_VIDEO_THREADS=1)",
}
GOAL_RATIO = 0.25  # the target for ours / baseline at 32 frames


def _pyav_version() -> str | None:
    try:
        import av
    except ImportError:
        return None
    return av.__version__


def auto_backend(video: Path) -> str:
    """The backend ``load_video(backend=None)`` decodes this file with (the first of AUTO_BACKENDS that takes it)."""
    from vila import video as vv

    with vv._open_reader(video, None, str(video)) as (reader, _, _):
        return {"pyav": "PyAV", "opencv": "OpenCV", "decord": "decord"}[reader.name]


def time_runs(loaders: dict[str, Callable[[], object]], runs: int) -> dict[str, list[tuple[float, float]]]:
    """(wall, CPU) seconds per run; CPU time (all threads) is the work done, less disturbed by a busy machine."""
    for load in loaders.values():  # warm-up: file cache, lazy imports
        load()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in loaders}
    for _ in range(runs):
        for name, load in loaders.items():
            cpu, start = _cpu_s(), time.perf_counter()
            load()
            times[name].append((time.perf_counter() - start, _cpu_s() - cpu))
    return times


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def summary(runs: list[tuple[float, float]], base: float) -> dict[str, float]:
    wall = [w for w, _ in runs]
    median = statistics.median(wall)
    return {
        "median_s": median,
        "min_s": min(wall),
        "max_s": max(wall),
        "cpu_median_s": statistics.median(c for _, c in runs),
        "ratio": median / base,
    }


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
    print(json.dumps({"mode": mode, "frames": len(kept), "rss_after_imports_mb": before, "peak_rss_mb": _peak_mb()}))


def _rss_mb(field: str = "VmRSS") -> float:
    """From /proc (Linux): ru_maxrss would also count the parent's peak, which survives fork + exec."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _peak_mb() -> float:
    peak = _rss_mb("VmHWM")
    return peak if peak == peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
    parser.add_argument("--frames", type=int, nargs="+", default=None, help="frame counts to sample (quick: 8 32)")
    parser.add_argument("--video", type=Path, default=None, help="benchmark this file instead of the synthetic one")
    parser.add_argument("--memory-frames", type=int, default=None, help="frames for the peak RSS check (0: skip)")
    parser.add_argument("--memory-worker", choices=["baseline", "ours", "ours_full_res"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.memory_worker:
        memory_worker(args.memory_worker, args.video, args.memory_frames)
        return 0

    runs = args.runs or (1 if args.quick else 7)
    frames = args.frames or ([8, 32] if args.quick else [8, 32, 128])
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
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "opencv": cv2.__version__,
        "pyav": _pyav_version(),
        "auto_backend": auto_backend(video),
    }
    cap.release()
    loaders: dict[str, Callable[[int], object]] = {
        "baseline": lambda n: reference_load(video, n),
        "ours": lambda n: ours_load(video, n),
        "ours_opencv": lambda n: ours_load(video, n, backend="opencv"),
        "ours_decord": lambda n: ours_load(video, n, backend="decord"),
        "ours_1_thread": lambda n: ours_load_serial(video, n),
    }
    rows = []
    for n in frames:
        ours = load_video(video, num_frames=n, progress=False)
        ref = reference_load(video, n)
        same = len(ref) == len(ours.frames) and all(
            np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(ref, ours.frames)
        )
        del ours, ref
        times = time_runs({name: functools.partial(load, n) for name, load in loaders.items()}, runs)
        base = statistics.median(w for w, _ in times["baseline"])
        rows.append(
            {
                "frames": n,
                "ours_identical_to_baseline": same,
                **{name: summary(runs_, base) for name, runs_ in times.items()},
            }
        )
    memory = measure_memory(video, memory_frames) if memory_frames > 0 else []
    report = {"info": info, "timing": rows, "memory": memory, "memory_frames": memory_frames}

    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(
        f"video {video.name}: {info['frame_count']} frames, {info['fps']:g} fps, {info['size'][0]}x{info['size'][1]}; "
        f"{runs} timed run(s) per loader after a warm-up, {info['cpus']} CPUs"
    )
    print(
        "wall-clock seconds (median, min, max), CPU seconds of all threads (median); ratio = median wall / baseline's"
    )
    print(f"{'frames':>6}  {'loader':<44} {'median s':>9} {'min s':>7} {'max s':>7} {'cpu s':>7} {'ratio':>6}")
    for row in rows:
        for name, label in LABELS.items():
            t = row[name]
            times = f"{t['median_s']:9.3f} {t['min_s']:7.3f} {t['max_s']:7.3f} {t['cpu_median_s']:7.3f}"
            print(f"{row['frames']:>6}  {label.format(auto=info['auto_backend']):<44} {times} {t['ratio']:6.2f}")
        print(f"{'':>6}  (ours gives the same pixels as the baseline: {row['ours_identical_to_baseline']})")
    if memory:
        print(f"peak RSS (VmHWM), {memory_frames} frames kept at {FRAME_SIZE}x{FRAME_SIZE}, a fresh process each:")
        for m in memory:
            print(
                f"  {m['mode']:<14} peak {m['peak_rss_mb']:7.0f} MB  (after imports {m['rss_after_imports_mb']:.0f} MB;"
                f" {m['frames']} frames)"
            )
    key = min(rows, key=lambda row: abs(row["frames"] - 32))
    ratio = key["ours"]["ratio"]
    verdict = "met" if ratio <= GOAL_RATIO else "not met"
    print(f"ratio ours/baseline at {key['frames']} frames: {ratio:.2f} (goal <= {GOAL_RATIO}: {verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
