"""`vila-infer` through a subprocess: the answer alone on stdout, one-line errors and exit codes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import GOLDENS, INPUTS, TINY

DEMO = str(INPUTS / "demo_img.png")


def run(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vila.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )


def assert_one_line_error(p: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    assert p.returncode == code, p.stderr
    assert p.stdout == ""
    assert "Traceback" not in p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("vila-infer:")]
    assert len(lines) == 1, p.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_answer_alone_on_stdout_matches_golden():
    golden = json.loads((GOLDENS / "nvila-tiny" / "demo_image.json").read_text())
    # The goldens were recorded on the CPU in float32; on a GPU machine the CLI would pick CUDA and bf16.
    p = run(
        "-m", str(TINY / "nvila-tiny"), "--device", "cpu", "--media", DEMO, "--text", "Please describe the image",
        "--max-new-tokens", "16",
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert p.stdout == golden["generated_text"] + "\n"


def test_vicuna_checkpoint_with_conv_mode_and_placeholder_text():
    golden = json.loads((GOLDENS / "vila15-tiny" / "demo_image.json").read_text())
    # "<image>Please describe the image": the placeholder puts the image where the reference puts it
    p = run(
        "-m",
        str(TINY / "vila15-tiny"),
        "--device",
        "cpu",
        "-c",
        "vicuna_v1",
        "--media",
        DEMO,
        "--text",
        "<image>Please describe the image",
        "--max-new-tokens",
        "16",
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == golden["generated_text"]


def test_help_explains_every_flag():
    p = run("--help")
    assert p.returncode == 0
    for flag in ["--model-path", "--conv-mode", "--text", "--media", "--num-video-frames", "--video-max-tiles", "--max-new-tokens", "--temperature", "--top-p", "--seed", "--device", "--dtype", "--compile", "--version", "--debug"]:  # fmt: skip
        assert flag in p.stdout
    assert "exit codes" in p.stdout and "examples" in p.stdout


def test_version():
    p = run("--version")
    assert p.returncode == 0 and p.stdout.startswith("vila ")


def broken_checkpoint(tmp_path: Path, edit) -> str:
    root = tmp_path / "ckpt"
    shutil.copytree(TINY / "nvila-tiny", root)
    edit(root)
    return str(root)


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            data.pop(k, None)
        else:
            data[k] = v
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "name, edit, code, needle",
    [
        ("missing llm/", lambda r: shutil.rmtree(r / "llm"), 3, "no llm/ folder"),
        (
            "missing config key",
            lambda r: edit_json(r / "config.json", mm_vision_select_layer=None),
            3,
            "mm_vision_select_layer",
        ),
        (
            "unknown projector",
            lambda r: edit_json(r / "mm_projector" / "config.json", mm_projector_type="mlp_magic"),
            3,
            "mlp_magic",
        ),
        ("unknown aspect ratio", lambda r: edit_json(r / "config.json", image_aspect_ratio="anyres"), 3, "anyres"),
        ("not a checkpoint", lambda r: (r / "config.json").unlink(), 3, "no config.json"),
    ],
)
def test_bad_checkpoints(tmp_path, name, edit, code, needle):
    p = run("-m", broken_checkpoint(tmp_path, edit), "--text", "hi", "--max-new-tokens", "2")
    assert_one_line_error(p, code, needle)


def test_bad_media(tmp_path):
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes((INPUTS / "demo_img.png").read_bytes()[:2000])
    assert_one_line_error(
        run("-m", str(TINY / "nvila-tiny"), "--media", str(tmp_path / "nope.jpg"), "--text", "x"), 4, "not found"
    )
    assert_one_line_error(run("-m", str(TINY / "nvila-tiny"), "--media", str(corrupt), "--text", "x"), 4, "broken.png")


def test_wrong_model_path_and_usage_errors():
    assert_one_line_error(run("-m", "/no/such/model", "--text", "hi"), 3, "/no/such/model")
    assert_one_line_error(run("-m", str(TINY / "nvila-tiny"), "--text", "hi", "--conv-mode", "vicuna"), 2, "vicuna")
    assert_one_line_error(
        run("-m", str(TINY / "nvila-tiny"), "--text", "hi", "--max-new-tokens", "0"), 2, "max_new_tokens"
    )
    assert_one_line_error(run("-m", str(TINY / "nvila-tiny"), "--text", "  "), 2, "nothing to answer")
    assert_one_line_error(
        run("-m", str(TINY / "nvila-tiny"), "--text", "a <image> b <image>", "--media", DEMO), 2, "placeholder"
    )


def test_debug_shows_traceback():
    p = run("-m", "/no/such/model", "--text", "hi", "--debug")
    assert p.returncode != 0 and "Traceback" in p.stderr
