"""Bad input, everywhere: every case runs ``vila-infer`` in a subprocess and must end with a one-line error that
names the problem, the documented exit code (vila/cli.py EXIT_CODES), no traceback and no hang.

Most cases fail before the model loads; the rest use the tiny checkpoints. The subprocesses of the selected
cases run a few at a time up front (module fixture), then each case checks its own result.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from conftest import INPUTS, TINY

import vila

TIMEOUT_S = 180
TINY_MODEL = TINY / "nvila-tiny"
VIDEO = INPUTS / "video_160x120_64f_16fps.mp4"
IMAGE = INPUTS / "demo_img.png"


@dataclass(frozen=True)
class Case:
    name: str
    args: Callable[[Path], list[str]]  # folder with the prepared bad files -> argv after `vila-infer`
    code: int
    needles: tuple[str, ...]  # each must appear (case-insensitive) in the error line
    stdin: str | None = None


def m(*rest: str) -> list[str]:
    """Tiny model, greedy, few tokens."""
    return ["-m", str(TINY_MODEL), "--max-new-tokens", "4", "--device", "cpu", *rest]


CASES = [
    # -- images (4) --
    Case(
        "image_missing", lambda d: m("--media", str(d / "missing.png"), "--text", "hi"), 4, ("not found", "missing.png")
    ),
    Case("image_zero_bytes", lambda d: m("--media", str(d / "zero.png"), "--text", "hi"), 4, ("empty",)),
    Case("image_truncated_png", lambda d: m("--media", str(d / "truncated.png"), "--text", "hi"), 4, ("truncated",)),
    Case(
        "image_truncated_jpeg", lambda d: m("--media", str(d / "truncated.jpg"), "--text", "hi"), 4, ("truncated.jpg",)
    ),
    Case("image_corrupt_jpeg", lambda d: m("--media", str(d / "random.jpg"), "--text", "hi"), 4, ("random.jpg",)),
    Case("image_text_named_png", lambda d: m("--media", str(d / "text.png"), "--text", "hi"), 4, ("text.png",)),
    Case("image_corrupt_pixel_data", lambda d: m("--media", str(d / "badcrc.png"), "--text", "hi"), 4, ("badcrc.png",)),
    Case("image_decompression_bomb", lambda d: m("--media", str(d / "bomb.png"), "--text", "hi"), 4, ("too large",)),
    # A 1-pixel-high image next to another one: the reference's processor fails on it (single images are fine).
    Case(
        "image_1_pixel_strip_of_two",
        lambda d: m("--media", str(d / "strip.png"), "--media", str(d / "one.png"), "--text", "hi"),
        4,
        ("500x1", "2 pixels high"),
    ),
    Case("image_broken_symlink", lambda d: m("--media", str(d / "dangling.png"), "--text", "hi"), 4, ("not found",)),
    Case("image_ftp_url", lambda d: m("--media", "ftp://example.com/a.png", "--text", "hi"), 4, ("url scheme",)),
    Case("image_file_url", lambda d: m("--media", "file:///tmp/a.png", "--text", "hi"), 4, ("url scheme",)),
    Case(
        "image_unreachable_url",
        lambda d: m("--media", "http://127.0.0.1:9/a.png", "--text", "hi"),
        4,
        ("cannot download", "127.0.0.1"),
    ),
    Case(
        "image_svg_unknown_format", lambda d: m("--media", str(d / "drawing.svg"), "--text", "hi"), 4, ("drawing.svg",)
    ),
    Case("media_unknown_extension", lambda d: m("--media", str(d / "blob.xyz"), "--text", "hi"), 4, ("blob.xyz",)),
    # -- videos (4) --
    Case(
        "video_missing", lambda d: m("--media", str(d / "missing.mp4"), "--text", "hi"), 4, ("not found", "missing.mp4")
    ),
    Case("video_zero_bytes", lambda d: m("--media", str(d / "zero.mp4"), "--text", "hi"), 4, ("zero.mp4",)),
    Case("video_truncated", lambda d: m("--media", str(d / "truncated.mp4"), "--text", "hi"), 4, ("truncated.mp4",)),
    Case("video_random_bytes", lambda d: m("--media", str(d / "random.mp4"), "--text", "hi"), 4, ("random.mp4",)),
    Case("video_text_named_mkv", lambda d: m("--media", str(d / "text.mkv"), "--text", "hi"), 4, ("text.mkv",)),
    Case("video_empty_directory", lambda d: m("--media", str(d / "empty_dir"), "--text", "hi"), 4, ("empty_dir",)),
    Case(
        "video_directory_without_media", lambda d: m("--media", str(d / "notes_dir"), "--text", "hi"), 4, ("notes_dir",)
    ),
    Case("video_rtsp_url", lambda d: m("--media", "rtsp://example.com/live.mp4", "--text", "hi"), 4, ("url scheme",)),
    # -- arguments (2) --
    Case("no_text_no_media", lambda d: m(), 2, ("nothing to answer",)),
    Case("empty_text", lambda d: m("--text", ""), 2, ("nothing to answer",)),
    Case("whitespace_text", lambda d: m("--text", "   \t "), 2, ("nothing to answer",)),
    Case(
        "max_new_tokens_zero",
        lambda d: ["-m", str(TINY_MODEL), "--text", "hi", "--max-new-tokens", "0"],
        2,
        ("max_new_tokens", "positive"),
    ),
    Case(
        "max_new_tokens_negative",
        lambda d: ["-m", str(TINY_MODEL), "--text", "hi", "--max-new-tokens", "-5"],
        2,
        ("max_new_tokens", "-5"),
    ),
    Case(
        "max_new_tokens_not_a_number",
        lambda d: m("--text", "hi", "--max-new-tokens", "ten"),
        2,
        ("--max-new-tokens", "ten"),
    ),
    Case("temperature_negative", lambda d: m("--text", "hi", "--temperature", "-1"), 2, ("temperature",)),
    Case("temperature_nan", lambda d: m("--text", "hi", "--temperature", "nan"), 2, ("temperature", "nan")),
    Case(
        "temperature_not_a_number", lambda d: m("--text", "hi", "--temperature", "warm"), 2, ("--temperature", "warm")
    ),
    Case("top_p_zero", lambda d: m("--text", "hi", "--temperature", "1", "--top-p", "0"), 2, ("top_p",)),
    Case("top_p_above_one", lambda d: m("--text", "hi", "--temperature", "1", "--top-p", "1.5"), 2, ("top_p", "1.5")),
    Case(
        "num_video_frames_zero",
        lambda d: m("--media", str(VIDEO), "--text", "hi", "--num-video-frames", "0"),
        2,
        ("num_video_frames",),
    ),
    Case("fps_negative", lambda d: m("--media", str(VIDEO), "--text", "hi", "--fps", "-2"), 2, ("fps",)),
    Case("video_max_tiles_zero", lambda d: m("--text", "hi", "--video-max-tiles", "0"), 2, ("video-max-tiles",)),
    Case("seed_negative", lambda d: m("--text", "hi", "--seed", "-1"), 2, ("--seed",)),
    Case(
        "unknown_conv_mode", lambda d: m("--text", "hi", "--conv-mode", "chatml9"), 2, ("conversation mode", "chatml9")
    ),
    Case("unknown_dtype", lambda d: m("--text", "hi", "--dtype", "float8"), 2, ("dtype", "float8")),
    Case("unknown_device", lambda d: m("--text", "hi", "--device", "tpu"), 2, ("device", "tpu")),
    Case("unknown_flag", lambda d: m("--text", "hi", "--frobnicate"), 2, ("unrecognized", "--frobnicate")),
    Case("model_path_missing_flag", lambda d: ["--text", "hi"], 2, ("--model-path",)),
    Case(
        "placeholders_mismatch", lambda d: m("--media", str(IMAGE), "--text", "<image> vs <image>"), 2, ("placeholder",)
    ),
    Case(
        "output_format_unknown", lambda d: m("--text", "hi", "--output-format", "yaml"), 2, ("--output-format", "yaml")
    ),
    # -- batch, JSON (2, 7) --
    Case(
        "batch_file_missing",
        lambda d: m("--batch", str(d / "nope.jsonl"), "--output", str(d / "o1.jsonl")),
        2,
        ("batch file not found",),
    ),
    Case("batch_without_output", lambda d: m("--batch", str(d / "good.jsonl")), 2, ("--output",)),
    Case(
        "batch_output_exists",
        lambda d: m("--batch", str(d / "good.jsonl"), "--output", str(d / "existing.jsonl")),
        2,
        ("already exists", "--resume"),
    ),
    Case(
        "batch_and_chat",
        lambda d: m("--batch", str(d / "good.jsonl"), "--output", str(d / "o2.jsonl"), "--chat"),
        2,
        ("--chat", "--batch"),
    ),
    Case(
        "batch_with_text",
        lambda d: m("--batch", str(d / "good.jsonl"), "--output", str(d / "o3.jsonl"), "--text", "x"),
        2,
        ("--text",),
    ),
    Case("resume_without_batch", lambda d: m("--text", "hi", "--resume"), 2, ("--resume",)),
    Case(
        "batch_malformed_line",
        lambda d: m("--batch", str(d / "malformed.jsonl"), "--output", str(d / "o4.jsonl")),
        7,
        ("1 request(s) failed",),
    ),
    Case(
        "json_schema_missing",
        lambda d: m("--text", "hi", "--json-schema", str(d / "nope.json")),
        2,
        ("--json-schema", "not found"),
    ),
    Case(
        "json_schema_not_json",
        lambda d: m("--text", "hi", "--json-schema", str(d / "schema_bad.json")),
        2,
        ("not valid json",),
    ),
    Case(
        "json_schema_not_an_object",
        lambda d: m("--text", "hi", "--json-schema", str(d / "schema_list.json")),
        2,
        ("json schema",),
    ),
    Case(
        "json_schema_unknown_type",
        lambda d: m("--text", "hi", "--json-schema", str(d / "schema_type.json")),
        2,
        ("json schema", "foo"),
    ),
    # -- checkpoints (3) --
    Case("model_path_not_found", lambda d: ["-m", str(d / "no_model"), "--text", "hi"], 3, ("not found",)),
    Case("model_path_is_a_file", lambda d: ["-m", str(d / "zero.png"), "--text", "hi"], 3, ("is a file",)),
    Case(
        "folder_not_a_checkpoint", lambda d: ["-m", str(d / "empty_dir"), "--text", "hi"], 3, ("not a vila checkpoint",)
    ),
    Case(
        "unknown_hub_id",
        lambda d: ["-m", "no-such-org/no-such-model-xyz", "--text", "hi"],
        3,
        ("no-such-org/no-such-model-xyz",),
    ),
    Case("config_not_json", lambda d: ["-m", str(d / "ckpt_badjson"), "--text", "hi"], 3, ("config.json",)),
    Case(
        "config_unknown_projector",
        lambda d: ["-m", str(d / "ckpt_projector"), "--text", "hi"],
        3,
        ("projector", "warp_drive"),
    ),
    Case(
        "config_unknown_aspect_ratio",
        lambda d: ["-m", str(d / "ckpt_aspect"), "--text", "hi"],
        3,
        ("image_aspect_ratio", "stretch"),
    ),
    Case("tokenizer_missing", lambda d: ["-m", str(d / "ckpt_notok"), "--text", "hi"], 3, ("tokenizer",)),
    Case("llm_weights_missing", lambda d: ["-m", str(d / "ckpt_nollm"), "--text", "hi"], 3, ("llm",)),
    Case("projector_weights_missing", lambda d: ["-m", str(d / "ckpt_noproj"), "--text", "hi"], 3, ("mm_projector",)),
    # -- context (5) --
    Case("prompt_longer_than_context", lambda d: m("--text", "tiger zebra " * 6000), 5, ("context",)),
]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def build_files(d: Path) -> None:
    """Every bad file the cases point at."""
    rng = np.random.default_rng(0)
    png = IMAGE.read_bytes()
    (d / "zero.png").write_bytes(b"")
    (d / "truncated.png").write_bytes(png[: len(png) // 3])
    jpg = d / "good.jpg"
    PIL.Image.open(IMAGE).convert("RGB").save(jpg, quality=90)
    (d / "truncated.jpg").write_bytes(jpg.read_bytes()[: jpg.stat().st_size // 2])
    (d / "random.jpg").write_bytes(b"\xff\xd8\xff\xe0" + rng.bytes(4000))
    (d / "text.png").write_text("this is not a picture\n")
    bad = bytearray(png)
    mid = len(bad) // 2
    bad[mid : mid + 64] = rng.bytes(64)
    (d / "badcrc.png").write_bytes(bytes(bad))
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 1, 0, 0, 0, 0)  # 900 MP, 1-bit: PIL refuses it at open
    (d / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IEND", b""))
    PIL.Image.new("RGB", (1, 1), (255, 0, 0)).save(d / "one.png")
    PIL.Image.new("RGB", (500, 1), (0, 255, 0)).save(d / "strip.png")
    os.symlink(d / "gone.png", d / "dangling.png")
    (d / "drawing.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>')
    (d / "blob.xyz").write_bytes(rng.bytes(3000))
    video = VIDEO.read_bytes()
    (d / "zero.mp4").write_bytes(b"")
    (d / "truncated.mp4").write_bytes(video[:2048])
    (d / "random.mp4").write_bytes(rng.bytes(20000))
    (d / "text.mkv").write_text("not a video either\n" * 50)
    (d / "empty_dir").mkdir()
    (d / "notes_dir").mkdir()
    (d / "notes_dir" / "readme.txt").write_text("no frames here")
    good = {"id": "a", "text": "hello"}
    (d / "good.jsonl").write_text(json.dumps(good) + "\n")
    (d / "existing.jsonl").write_text(json.dumps({"id": "a", "answer": "x"}) + "\n")
    (d / "malformed.jsonl").write_text(
        json.dumps(good) + "\n{not json\n" + json.dumps({"id": "b", "text": "bye"}) + "\n"
    )
    (d / "schema_bad.json").write_text("{'type': 'object',}")
    (d / "schema_list.json").write_text("[1, 2, 3]")
    (d / "schema_type.json").write_text(json.dumps({"type": "foo"}))
    for name, edit in [
        ("ckpt_badjson", lambda c: (c / "config.json").write_text("{ not json")),
        ("ckpt_projector", lambda c: _edit_json(c / "mm_projector" / "config.json", mm_projector_type="warp_drive")),
        ("ckpt_aspect", lambda c: _edit_json(c / "config.json", image_aspect_ratio="stretch")),
        ("ckpt_notok", lambda c: [p.unlink() for p in (c / "llm").glob("tokenizer*")]),
        ("ckpt_nollm", lambda c: [p.unlink() for p in (c / "llm").glob("*.safetensors")]),
        ("ckpt_noproj", lambda c: [p.unlink() for p in (c / "mm_projector").glob("*.safetensors")]),
    ]:
        shutil.copytree(TINY_MODEL, d / name)
        edit(d / name)


def _edit_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def run_cli(case: Case, d: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    return subprocess.run(
        [sys.executable, "-m", "vila.cli", *case.args(d)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env=env,
        cwd=d,
        input=case.stdin,
    )


@pytest.fixture(scope="module")
def results(request, tmp_path_factory):
    """Runs the selected cases' subprocesses, a few at a time."""
    d = tmp_path_factory.mktemp("bad_inputs")
    build_files(d)
    wanted = {
        item.callspec.params["case"].name for item in request.session.items if item.originalname == "test_bad_input"
    }
    todo = [c for c in CASES if c.name in wanted]
    with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2))) as pool:
        done = dict(zip((c.name for c in todo), pool.map(lambda c: run_cli(c, d), todo)))
    return done, d


def test_case_count():
    assert len({c.name for c in CASES}) == len(CASES) >= 40


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_input(case, results):
    done, folder = results
    proc = done[case.name]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == case.code, (proc.returncode, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("vila-infer:")]
    errors = [line for line in lines if line.startswith(("vila-infer: error:", "vila-infer: internal error"))]
    if case.code == 7:  # batch: the run finished; the bad row is in the output, the summary on stderr
        assert errors == [], proc.stderr
        message = lines[-1]
        rows = [json.loads(line) for line in (folder / "o4.jsonl").read_text().splitlines()]
        assert sorted(r.get("id") or f"line{r['line']}" for r in rows) == ["a", "b", "line2"]
        assert [r["error_type"] for r in rows if "error" in r] == ["UsageError"]
    else:
        others = [line for line in proc.stderr.splitlines() if line.strip() and "Loading weights" not in line]
        assert others == errors and len(errors) == 1, proc.stderr  # one line, nothing else
        message = errors[0]
        assert "internal error" not in message
        assert proc.stdout == ""
    for needle in case.needles:
        assert needle.lower() in message.lower(), (needle, message)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "CMYK", "L", "I;16", "I", "F", "1"])
def test_unusual_image_modes_are_valid_input(tiny_model, tmp_path, mode):
    """Not errors: converted to RGB like the reference, except that 16/32-bit grayscale is scaled instead of clipped."""
    from vila.media import load_image

    ramp = np.linspace(0, 1, 64 * 48).reshape(48, 64)
    if mode in ("I;16", "I"):
        img = PIL.Image.fromarray((ramp * 65535).astype(np.uint16 if mode == "I;16" else np.int32))
        assert img.mode == mode
    elif mode == "F":
        img = PIL.Image.fromarray(ramp.astype(np.float32))
    else:
        img = PIL.Image.fromarray((ramp * 255).astype(np.uint8), "L").convert(mode)
    rgb = np.asarray(load_image(vila.Image(img)))
    assert rgb.shape == (48, 64, 3) and rgb.dtype == np.uint8
    if mode != "1":  # 1-bit is black and white by nature
        assert 20 < rgb.mean() < 235 and rgb.std() > 30  # a ramp, neither clipped white nor black
    model = tiny_model("vila15-tiny")
    assert model.generate([vila.Image(img), "What is it?"], max_new_tokens=2).token_ids
