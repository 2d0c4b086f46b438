"""``vila-infer --batch``: batched answers equal one-by-one answers, bad rows are recorded, and a run killed
with SIGKILL then resumed answers every id exactly once."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys

import pytest
from conftest import INPUTS, TINY, read_rows, wait_for_lines, write_jsonl

import vila
import vila.batch
import vila.engine
from vila.batch import answered_keys, run_batch
from vila.errors import UsageError


@pytest.mark.parametrize("variant", ["nvila-tiny", "vila15-tiny", "nvila-lite-tiny"])
def test_batched_greedy_answers_equal_one_by_one(tiny_model, images, monkeypatch, variant):
    model = tiny_model(variant)
    requests = [
        {"id": "img-a", "text": "Describe the image.", "media": ["a.png"]},
        {"id": "img-b", "text": "What is this?", "media": ["b.png"]},
        {"id": "text", "text": "Tell me a story about a small tiger who lived in a big city."},
        {"id": "two", "text": "Compare <image> and <image>.", "media": ["a.png", "b.png"]},
    ]
    src = write_jsonl(images / "req.jsonl", requests)
    batched_calls = []
    real = vila.engine.decode
    monkeypatch.setattr(
        vila.engine, "decode", lambda llm, rows, **kw: batched_calls.append(len(rows)) or real(llm, rows, **kw)
    )
    summary = run_batch(model, src, images / "out.jsonl", batch_size=8, defaults={"max_new_tokens": 8}, progress=False)
    assert batched_calls == [4]  # all four went through the LLM together
    assert (summary.answered, summary.failed) == (4, 0)
    rows = {r["id"]: r for r in read_rows(images / "out.jsonl")}
    from vila.media import build_prompt

    for req in requests:
        media = [str(images / m) for m in req.get("media", [])]
        single = model.generate(build_prompt(req["text"], media), max_new_tokens=8)
        assert rows[req["id"]]["answer"] == single.text, req["id"]
        assert rows[req["id"]]["num_generated_tokens"] == len(single.token_ids)
        assert rows[req["id"]]["num_prompt_tokens"] == single.num_prompt_tokens
        assert rows[req["id"]]["media_tokens"] == single.media_tokens


def test_one_engine_call_returns_what_generate_returns(tiny_model):
    model = tiny_model("vila15-tiny")
    texts = ("short", "a much longer prompt " * 20, "medium sized prompt here")
    answers = vila.engine.run(model, [vila.engine.Request(t, {"max_new_tokens": 9}) for t in texts])
    singles = [model.generate(t, max_new_tokens=9) for t in texts]
    assert [(s.token_ids, s.text) for s in singles] == [(a.token_ids, a.text) for a in answers]


def test_bad_rows_are_recorded_and_the_run_goes_on(tiny_model, images):
    model = tiny_model("nvila-tiny")
    src = write_jsonl(
        images / "req.jsonl",
        [
            {"id": 1, "text": "first"},
            "{this is not json",
            {"id": 2, "text": "x", "media": ["missing.png"]},
            {"id": 3, "text": "x", "colour": "blue"},
            {"text": "no id"},
            {"id": 1, "text": "duplicate"},
            {"id": 4, "text": "x", "max_new_tokens": 0},
            {"id": 5, "text": "too long " * 6000},
            ["a", "list"],
            {"id": 6, "text": "json please", "response_format": {"type": "json_object"}},
            {"id": 7, "text": "sampled", "temperature": 0.8, "seed": 1},
            {"id": 8, "media": ["a.png"]},
        ],
    )
    out = images / "out.jsonl"
    summary = run_batch(model, src, out, defaults={"max_new_tokens": 6}, progress=False)
    rows = read_rows(out)
    assert len(rows) == 12 and summary.total == 12
    by_line = {r["line"]: r for r in rows}
    errors = {line: r["error_type"] for line, r in by_line.items() if "error" in r}
    assert errors == {
        2: "UsageError",
        3: "MediaError",
        4: "UsageError",
        5: "UsageError",
        6: "UsageError",
        7: "UsageError",
        8: "PromptTooLongError",
        9: "UsageError",
    }
    assert by_line[3]["id"] == 2 and by_line[6]["id"] is None and "duplicate id 1" in by_line[6]["error"]
    assert "colour" in by_line[4]["error"] and "not valid JSON" in by_line[2]["error"]
    assert isinstance(json.loads(by_line[10]["answer"]), dict)
    assert by_line[11]["answer"] == model.generate_content(
        "sampled", max_new_tokens=6, do_sample=True, temperature=0.8, seed=1
    )
    assert (summary.answered, summary.failed) == (4, 8)


def test_resume_drops_a_partial_line_and_skips_answered_ids(tiny_model, tmp_path):
    model = tiny_model("nvila-tiny")
    src = write_jsonl(tmp_path / "req.jsonl", [{"id": f"q{i}", "text": f"question {i}"} for i in range(5)] + ["{bad"])
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"id": "q0", "answer": "kept", "line": 1}) + "\n" + '{"id": "q1", "answ')
    with pytest.raises(vila.errors.UsageError, match="--resume"):
        run_batch(model, src, out, progress=False)
    summary = run_batch(model, src, out, resume=True, defaults={"max_new_tokens": 3}, progress=False)
    assert (summary.skipped, summary.answered, summary.failed) == (1, 4, 1)
    rows = read_rows(out)
    assert rows[0] == {"id": "q0", "answer": "kept", "line": 1}  # the partial q1 line is gone
    assert sorted(str(r.get("id")) for r in rows) == ["None", "q0", "q1", "q2", "q3", "q4"]
    again = run_batch(model, src, out, resume=True, progress=False)  # nothing left: the bad line counts as answered
    assert (again.skipped, again.answered, again.failed) == (6, 0, 0)
    assert answered_keys(out) == {f'id:"q{i}"' for i in range(5)} | {"line:6"}


def test_kill_9_then_resume_answers_every_id_exactly_once(tmp_path):
    ids = [f"r{i:02d}" for i in range(20)]
    src = write_jsonl(
        tmp_path / "req.jsonl", [{"id": i, "text": f"Question number {i}, please answer at length."} for i in ids]
    )
    out = tmp_path / "out.jsonl"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    cmd = [sys.executable, "-m", "vila.cli", "-m", str(TINY / "nvila-tiny"), "--device", "cpu", "--batch", str(src)]
    cmd += ["--output", str(out), "--max-new-tokens", "8", "--batch-size", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    wait_for_lines(proc, out, 3)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    first_run = out.read_text().count("\n")
    assert proc.returncode == -signal.SIGKILL and first_run < len(ids)  # killed mid-run
    resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    rows = read_rows(out)
    assert sorted(r["id"] for r in rows) == ids  # each id once, no partial line left
    assert all("answer" in r for r in rows)
    assert f"{first_run} already in" in resumed.stderr


def test_ctrl_c_keeps_the_rows_and_prints_the_resume_command(tmp_path):
    ids = [f"q{i}" for i in range(6)]
    src = write_jsonl(tmp_path / "req.jsonl", [{"id": i, "text": f"Question {i}, answer at length."} for i in ids])
    out = tmp_path / "my answers.jsonl"  # a space: the printed command must quote it
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "vila.cli", "-m", str(TINY / "nvila-tiny"), "--device", "cpu", "--batch", str(src)]
    cmd += ["--output", str(out), "--max-new-tokens", "8", "--batch-size", "1"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=_foreground_sigint)
    wait_for_lines(proc, out, 1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    kept = out.read_text().count("\n")
    assert 1 <= kept < len(ids)
    line = next(ln for ln in err.splitlines() if "--resume" in ln)
    assert line.startswith("vila-infer: interrupted") and str(out) in line
    resume = line.split("to continue, run: ", 1)[1]
    assert shlex.split(resume) == [*cmd, "--resume"]
    again = subprocess.run(shlex.split(resume), capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr
    rows = read_rows(out)
    assert sorted(r["id"] for r in rows) == ids and all("answer" in r for r in rows)  # each id exactly once
    assert f"{kept} already in" in again.stderr


def _foreground_sigint() -> None:
    """A shell may start background jobs (a CI runner's) with SIGINT ignored; Ctrl-C reaches foreground ones."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_drive_batch_hands_only_the_rows_left_to_answer(tmp_path):
    """The loop shared by the local run and --ray: duplicates become error rows without reaching ``answer``, and
    ``answer`` is not called at all when --resume finds nothing left (so Ray is never started for nothing)."""
    src = write_jsonl(tmp_path / "req.jsonl", [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}, {"id": 3}])
    calls = []

    def answer(todo):
        calls.append([line for line, _ in todo])
        return [{"id": vila.batch.peek_id(row), "answer": "ok", "line": line} for line, row in todo]

    out = tmp_path / "out.jsonl"
    summary = vila.batch.drive_batch(src, out, answer, progress=False)
    assert calls == [[1, 3]] and (summary.total, summary.answered, summary.failed) == (3, 2, 1)
    assert [r["line"] for r in read_rows(out) if "duplicate id" in r.get("error", "")] == [2]
    again = vila.batch.drive_batch(src, out, answer, resume=True, progress=False)
    assert calls == [[1, 3]] and again.skipped == 3


def test_image_bytes_follow_the_placeholder_rules_of_paths():
    """A row's image bytes (Parquet / Ray binary columns) are placed like paths; errors name the row's keys."""
    from vila.batch import request_prompt
    from vila.media import Image

    png = (INPUTS / "demo_img.png").read_bytes()
    parts = request_prompt("Compare <image> with <image>.", [png, png])
    assert [type(p).__name__ for p in parts] == ["str", "Image", "str", "Image", "str"]
    assert parts[1].source == png and parts[2] == " with "
    assert isinstance(request_prompt("Describe.", [png])[0], Image)
    with pytest.raises(UsageError, match=r"^'text' has 2 media placeholder\(s\) but 1 'media' item\(s\)"):
        request_prompt("<image> and <image>", [png])
