"""``--batch`` without Ray: torchrun/SLURM shards merged in input order, Parquet in and out, and out-of-memory
requests recorded as error rows."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import MIXED_REQUESTS, TINY, by_line, read_rows, write_jsonl

import vila.batch
import vila.engine
from vila.batch import merge_parts, part_path, run_batch, shard_from_env
from vila.errors import UsageError

MODEL = TINY / "nvila-tiny"


def test_shard_from_env_prefers_flags_then_torchrun_then_slurm():
    assert shard_from_env(None, None, {}) == (None, None)
    assert shard_from_env(1, 3, {"RANK": "0", "WORLD_SIZE": "2"}) == ((1, 3), "--shard-index/--num-shards")
    assert shard_from_env(None, None, {"RANK": "1", "WORLD_SIZE": "2"}) == ((1, 2), "RANK/WORLD_SIZE")
    assert shard_from_env(None, None, {"SLURM_PROCID": "3", "SLURM_NTASKS": "4"})[0] == (3, 4)
    assert shard_from_env(None, None, {"RANK": "0", "WORLD_SIZE": "1"}) == (None, None)  # one process: no parts
    with pytest.raises(UsageError, match="not in 0..1"):
        shard_from_env(2, 2, {})
    with pytest.raises(UsageError, match="go together"):
        shard_from_env(1, None, {})


@pytest.mark.usefixtures("images")  # a.png and b.png in tmp_path
def test_two_torchrun_shards_merged_equal_the_local_run(tiny_model, tmp_path):
    src = write_jsonl(tmp_path / "req.jsonl", MIXED_REQUESTS)
    local = tmp_path / "local.jsonl"
    run_batch(tiny_model("nvila-tiny"), src, local, defaults={"max_new_tokens": 2}, progress=False)

    out = tmp_path / "answers.jsonl"
    cmd = [sys.executable, "-m", "vila.cli", "-m", str(MODEL), "--device", "cpu", "--dtype", "float32"]
    cmd += ["--batch", str(src), "--output", str(out), "--max-new-tokens", "2"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", WORLD_SIZE="2", OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(cmd, env={**env, "RANK": str(rank)}, stderr=subprocess.PIPE, text=True) for rank in (0, 1)
    ]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [7, 7], errs  # each shard holds a failed row
    parts = [part_path(out, i, 2) for i in range(2)]
    assert [sorted(r["line"] for r in read_rows(p)) for p in parts] == [[1, 3, 5, 7], [2, 4, 6]]

    merged = subprocess.run([*cmd, "--merge"], env=os.environ, capture_output=True, text=True, timeout=120)
    assert merged.returncode == 7 and "merged 7 rows" in merged.stderr, merged.stderr
    assert read_rows(out) == by_line(read_rows(local))  # input order, same answers and error rows

    # Resumable per shard: a rerun of shard 1 finds every row done.
    again = run_batch(None, src, parts[1], resume=True, shard=(1, 2), progress=False)
    assert (again.skipped, again.answered, again.failed) == (3, 0, 0)


def test_merge_names_the_missing_rows_and_their_shard(tmp_path):
    src = write_jsonl(tmp_path / "req.jsonl", [{"id": f"q{i}", "text": "x"} for i in range(4)])
    out = tmp_path / "answers.jsonl"
    write_jsonl(part_path(out, 0, 2), [{"id": "q0", "answer": "a", "line": 1}, {"id": "q2", "answer": "c", "line": 3}])
    with pytest.raises(UsageError, match=r"missing part file\(s\) answers.jsonl.part-00001-of-00002"):
        merge_parts(src, out)
    write_jsonl(part_path(out, 1, 2), [{"id": "q1", "answer": "b", "line": 2}])
    with pytest.raises(UsageError, match=r"1 request\(s\) have no row.*line 4 \(id 'q3', shard 1\)"):
        merge_parts(src, out)
    assert not out.exists()


@pytest.mark.usefixtures("images")  # a.png and b.png in tmp_path
def test_parquet_in_and_out_with_image_bytes(tiny_model, tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    model = tiny_model("nvila-tiny")
    rows = [r for r in MIXED_REQUESTS if isinstance(r, dict) and r["text"] != "a duplicate id"]
    src_jsonl = write_jsonl(tmp_path / "req.jsonl", rows)
    # One Arrow type per column: a binary media column carries every item as bytes (a broken one for "gone").
    blobs = [
        [(tmp_path / m).read_bytes() if m != "missing.png" else b"not an image" for m in r.get("media", [])]
        for r in rows
    ]
    table = pa.table(
        {
            "id": [str(r["id"]) for r in rows],
            "text": [r["text"] for r in rows],
            "media": pa.array(blobs, type=pa.list_(pa.binary())),
            "max_new_tokens": [r.get("max_new_tokens") for r in rows],
        }
    )
    pq.write_table(table, tmp_path / "req.parquet")
    want = run_batch(model, src_jsonl, tmp_path / "want.jsonl", defaults={"max_new_tokens": 2}, progress=False)
    got = run_batch(
        model, tmp_path / "req.parquet", tmp_path / "got.parquet", defaults={"max_new_tokens": 2}, progress=False
    )
    assert (got.answered, got.failed) == (want.answered, want.failed) == (4, 1)
    assert not (tmp_path / "got.parquet.rows.jsonl").exists()  # the journal is folded into the file
    got_rows = vila.batch.read_output(tmp_path / "got.parquet")
    for row in read_rows(tmp_path / "want.jsonl"):
        got_row = got_rows[row["line"] - 1]
        assert got_row["id"] == str(row["id"])
        if "answer" in row:
            assert got_row == {**row, "id": str(row["id"])}
        else:
            assert got_row["error_type"] == row["error_type"] == "MediaError"


def test_out_of_memory_is_retried_row_by_row_then_an_error_row(tiny_model, tmp_path, monkeypatch):
    model = tiny_model("nvila-tiny")
    src = write_jsonl(tmp_path / "req.jsonl", [{"id": f"q{i}", "text": f"question {i}"} for i in range(3)])

    real = vila.engine.decode
    calls = []

    def decode(llm, rows, **kwargs):
        calls.append(len(rows))
        if len(rows) > 1:  # the whole batch does not fit
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if len(calls) == 3:  # alone, the second request (q1) still does not fit
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return real(llm, rows, **kwargs)

    monkeypatch.setattr(vila.engine, "decode", decode)
    summary = run_batch(model, src, tmp_path / "out.jsonl", defaults={"max_new_tokens": 2}, progress=False)
    monkeypatch.undo()
    rows = {r["id"]: r for r in read_rows(tmp_path / "out.jsonl")}
    assert calls == [3, 1, 1, 1]
    assert (summary.answered, summary.failed) == (2, 1)
    assert rows["q1"]["error_type"] == "OutOfMemoryError" and "out of memory" in rows["q1"]["error"]
    assert rows["q0"]["answer"] == model.generate("question 0", max_new_tokens=2).text
