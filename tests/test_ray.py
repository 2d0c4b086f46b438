"""``vila-infer --batch ... --ray`` and ``vila.ray.VilaPredictor`` on a local Ray cluster (CPU only, one per
module): the same rows as the local ``--batch``, Parquet in and out, a killed driver resumed, a killed actor
restarted, each id answered exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from conftest import MIXED_REQUESTS, TINY, by_line, read_rows, wait_for_lines, write_jsonl

ray = pytest.importorskip("ray")

from vila.batch import read_output, run_batch  # noqa: E402
from vila.ray import EXIT_ONCE_ENV, VilaPredictor, run_ray_batch  # noqa: E402

MODEL = TINY / "nvila-tiny"
LOAD = {"device": "cpu", "dtype": "float32"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A 2-CPU cluster whose workers exit once on the row with id ``crash-me`` (the marker file says it happened)."""
    marker = tmp_path_factory.mktemp("ray") / "actor-exited"
    saved = os.environ.get(EXIT_ONCE_ENV)
    os.environ[EXIT_ONCE_ENV] = f"crash-me@{marker}"  # workers inherit the environment the cluster starts with
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield ray.get_runtime_context().gcs_address, marker
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop(EXIT_ONCE_ENV, None)
        else:
            os.environ[EXIT_ONCE_ENV] = saved


def test_ray_rows_equal_the_local_batch(cluster, tiny_model, images):
    src = write_jsonl(images / "req.jsonl", MIXED_REQUESTS)
    want = run_batch(tiny_model("nvila-tiny"), src, images / "local.jsonl", defaults={"max_new_tokens": 2})
    got = run_ray_batch(
        str(MODEL), src, images / "ray.jsonl", load_kwargs=LOAD, batch_size=2, defaults={"max_new_tokens": 2}
    )
    assert (got.answered, got.failed) == (want.answered, want.failed) == (4, 3)
    assert by_line(read_rows(images / "ray.jsonl")) == by_line(read_rows(images / "local.jsonl"))


def test_predictor_in_map_batches_with_parquet_in_and_out(cluster, tiny_model, images):
    """Used directly, as the docs show: pandas batches, image bytes, Parquet written by Ray."""
    import pandas as pd

    texts = ["Describe the image.", "What is this?", "Hello there."]
    media = [[(images / "a.png").read_bytes()], [(images / "b.png").read_bytes()], []]
    df = pd.DataFrame({"id": [10, 11, 12], "text": texts, "media": media, "line": [1, 2, 3]})
    df.to_parquet(images / "req.parquet")
    ds = ray.data.read_parquet(str(images / "req.parquet")).map_batches(
        VilaPredictor,
        fn_constructor_kwargs={"model": str(MODEL), "defaults": {"max_new_tokens": 2}, **LOAD},
        compute=ray.data.ActorPoolStrategy(size=1),
        num_gpus=0,
        batch_size=2,
        batch_format="pandas",
    )
    ds.write_parquet(str(images / "answers"))
    got = pd.read_parquet(images / "answers").sort_values("line")
    model = tiny_model("nvila-tiny")
    src = write_jsonl(
        images / "req.jsonl",
        [
            {"id": 10 + i, "text": t, "media": [m] if m else []}
            for i, (t, m) in enumerate(zip(texts, ["a.png", "b.png", None]))
        ],
    )
    run_batch(model, src, images / "local.jsonl", defaults={"max_new_tokens": 2}, progress=False)
    want = by_line(read_rows(images / "local.jsonl"))
    assert got["id"].tolist() == [10, 11, 12] and got["error"].isna().all()
    assert got["answer"].tolist() == [r["answer"] for r in want]
    assert [list(m) for m in got["media_tokens"]] == [r["media_tokens"] for r in want]

    # The CLI's Parquet path: Parquet rows in, one Parquet file out, the same answers.
    df.drop(columns="line").to_parquet(images / "cli.parquet")
    summary = run_ray_batch(
        str(MODEL), images / "cli.parquet", images / "cli-out.parquet", load_kwargs=LOAD, defaults={"max_new_tokens": 2}
    )
    assert (summary.answered, summary.failed) == (3, 0)
    assert [r["answer"] for r in read_output(images / "cli-out.parquet")] == [r["answer"] for r in want]


def test_an_actor_killed_mid_run_is_restarted_and_no_row_is_lost_or_repeated(cluster, tmp_path):
    _, marker = cluster
    ids = ["q0", "q1", "crash-me", "q3", "q4", "q5"]
    src = write_jsonl(tmp_path / "req.jsonl", [{"id": i, "text": f"Question {i}"} for i in ids])
    summary = run_ray_batch(
        str(MODEL), src, tmp_path / "out.jsonl", load_kwargs=LOAD, batch_size=2, defaults={"max_new_tokens": 2}
    )
    assert marker.exists()  # the actor holding "crash-me" did exit
    rows = read_rows(tmp_path / "out.jsonl")
    assert sorted(r["id"] for r in rows) == sorted(ids) and all("answer" in r for r in rows)
    assert (summary.answered, summary.failed) == (6, 0)


def test_kill_9_of_the_driver_then_resume_answers_every_id_once(cluster, tmp_path):
    address, _ = cluster
    ids = [f"r{i:02d}" for i in range(16)]
    src = write_jsonl(tmp_path / "req.jsonl", [{"id": i, "text": f"Question {i}, answer at length."} for i in ids])
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "vila.cli", "-m", str(MODEL), "--device", "cpu", "--dtype", "float32"]
    cmd += ["--batch", str(src), "--output", str(out), "--max-new-tokens", "6", "--batch-size", "1"]
    cmd += ["--ray", address, "--replicas", "1"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    wait_for_lines(proc, out, 1, timeout=240)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    first_run = out.read_text().count("\n")
    assert proc.returncode == -signal.SIGKILL and 1 <= first_run < len(ids)  # killed mid-run
    resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    rows = read_rows(out)
    assert sorted(r["id"] for r in rows) == ids and all("answer" in r for r in rows)  # each id once
    assert f"{first_run} already in" in resumed.stderr
