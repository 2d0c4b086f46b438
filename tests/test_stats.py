"""Timings: the API's ``GenerationResult.timings``, ``--stats`` on stderr and ``--output-format json``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from conftest import INPUTS, TINY

import vila

IMAGE = INPUTS / "demo_img.png"
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")


def cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "vila.cli", "-m", str(TINY / "nvila-tiny"), "--device", "cpu", "--no-stream", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)


def test_generate_reports_timings(tiny_model):
    model = tiny_model("nvila-tiny")
    result = model.generate([vila.Image(IMAGE), "Describe."], max_new_tokens=7)
    t = result.timings
    media = ("media_decode_s", "preprocess_s", "vision_encode_s")
    assert set(t) >= {*media, "generate_s", "prefill_s", "time_to_first_token_s", "decode_tokens_per_s"}
    assert t["num_generated_tokens"] == len(result.token_ids) == 7
    # Relations, not timings: the media stages run one after another before the LLM starts, all inside the
    # time to the first token; the prefill and the decode steps fit in the LLM's time.
    assert sum(t[key] for key in media) <= t["time_to_first_token_s"] - t["prefill_s"] + 1e-6
    assert 0 < t["prefill_s"] <= t["generate_s"]
    decode_s = (t["num_generated_tokens"] - 1) / t["decode_tokens_per_s"]  # first to last token
    assert t["prefill_s"] + decode_s <= t["generate_s"] + 1e-6
    text_only = model.generate("hi", max_new_tokens=1).timings
    assert "decode_tokens_per_s" not in text_only and text_only["num_generated_tokens"] == 1


def test_cli_stats_go_to_stderr(tiny_model):
    proc = cli("--media", str(IMAGE), "--text", "Describe.", "--max-new-tokens", "6", "--stats")
    assert proc.returncode == 0, proc.stderr
    answer = tiny_model("nvila-tiny").generate_content([vila.Image(IMAGE), "Describe."], max_new_tokens=6)
    assert proc.stdout == answer + "\n"  # stdout: the answer only
    stats = proc.stderr[proc.stderr.index("vila-infer stats:") :]
    for label in ("load", "media decode", "preprocess", "vision encode", "time to first token"):
        assert re.search(rf"^  {label} +\d+\.\d+ s", stats, re.M), label
    assert re.search(r"^  decode +\d+\.\d tokens/s", stats, re.M)
    assert re.search(r"^  tokens +\d+ prompt positions, 6 generated", stats, re.M)
    assert re.search(r"^  visual tokens +2305 \(per media item\)", stats, re.M)
    assert re.search(r"^  peak memory +RSS \d+(\.\d+)? (MiB|GiB), CUDA ", stats, re.M)


def test_cli_output_format_json(tiny_model):
    proc = cli("--media", str(IMAGE), "--text", "Describe.", "--max-new-tokens", "5", "--output-format", "json")
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)
    model = tiny_model("nvila-tiny")
    result = model.generate([vila.Image(IMAGE), "Describe."], max_new_tokens=5)
    assert row["answer"] == result.text
    assert row["num_generated_tokens"] == 5 and row["num_prompt_tokens"] == result.num_prompt_tokens
    assert row["media_tokens"] == result.media_tokens == [2305]
    assert set(row["timings"]) >= {
        "load_s",
        "media_decode_s",
        "vision_encode_s",
        "time_to_first_token_s",
        "decode_tokens_per_s",
    }
    assert row["peak_memory"]["rss_bytes"] > 50 * 2**20


def test_batch_stats_summary(tmp_path):
    src = tmp_path / "r.jsonl"
    src.write_text(json.dumps({"id": 1, "text": "hi"}) + "\n")
    proc = cli("--batch", str(src), "--output", str(tmp_path / "o.jsonl"), "--max-new-tokens", "3", "--stats")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"batch: 1 answered, 0 failed, 0 already in .*requests/s", proc.stderr)
    assert re.search(r"load \d+\.\d+ s, peak RSS", proc.stderr)
