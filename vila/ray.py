"""Ray Data: answer ``--batch`` rows on many GPUs and nodes, one model per actor (``pip install 'vila[ray]'``).

As a library::

    import ray
    from vila.ray import VilaPredictor

    ds = ray.data.read_parquet("s3://bucket/requests/")  # columns: id, text, media (paths, URLs or image bytes)
    answers = ds.map_batches(
        VilaPredictor,
        fn_constructor_kwargs={"model": "Efficient-Large-Model/NVILA-8B", "defaults": {"max_new_tokens": 128}},
        compute=ray.data.ActorPoolStrategy(size=8),
        num_gpus=1,
        batch_size=16,
    )
    answers.write_parquet("s3://bucket/answers/")

From the command line: ``vila-infer -m MODEL --batch requests.jsonl --output answers.jsonl --ray [ADDRESS]
--replicas N``. The driver writes each row as its batch comes back, so a killed driver loses at most the batches in
flight, and ``--resume`` skips every row already written.

Faults: Ray Data restarts a dead actor and retries its batch (actor pools default to ``max_restarts=-1`` and
``max_task_retries=-1``); the driver drops a row it has already written, so a retried batch never duplicates one.
A request that runs out of GPU memory is retried alone and, if it still does not fit, becomes an error row.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .batch import BatchSummary, answer_rows, drive_batch, rows_to_table
from .cache import FeatureCache

# For the fault-tolerance test: "ROW_ID@MARKER_PATH" makes the actor that receives that row exit at once, unless
# the marker file exists (it creates it first), so the restarted actor answers the row.
EXIT_ONCE_ENV = "VILA_TEST_EXIT_ONCE"


class VilaPredictor:
    """A Ray Data callable class: loads the checkpoint once per actor, answers batches of ``--batch`` rows.

    Input columns: ``id``, ``text``, ``media`` (a list of paths, URLs or image bytes) and the optional per-row
    settings of ``--batch`` (``max_new_tokens``, ``temperature``, ...); or ``request``, one ``--batch`` JSON line
    per row (the CLI sends JSONL rows as text, so that a malformed row gets the same error row as in a local run).
    An optional ``line`` column numbers the rows (it comes back in the output).

    Output: one row per input row with the columns ``id, answer, num_prompt_tokens, num_generated_tokens,
    media_tokens, error, error_type, exit_code, line`` (nulls where they do not apply), whatever the batch format
    (pandas, pyarrow or NumPy dicts). ``id`` keeps the input's type; with a ``request`` column it is the id as JSON
    text, since JSON ids may mix strings and integers.

    ``model``: a checkpoint path or hub id; ``defaults``: settings for rows that do not give them; ``base_dir``:
    where relative media paths are looked up first; other keyword arguments go to :func:`vila.load` (``dtype``,
    ``conv_mode``, ``lora``, ...). The device is the actor's GPU when Ray gives it one, else the CPU.
    """

    def __init__(
        self,
        model: str,
        *,
        defaults: dict[str, Any] | None = None,
        base_dir: str | None = None,
        **load_kwargs: Any,
    ):
        import vila

        t0 = time.perf_counter()
        self.model = vila.load(model, **load_kwargs)
        self.load_seconds = time.perf_counter() - t0
        self.defaults = dict(defaults or {})
        self.base = base_dir or os.getcwd()
        self.cache = FeatureCache()

    def __call__(self, batch: Any) -> Any:
        records, id_type, as_json = _records(batch)
        numbered = all(line is not None for line, _ in records)
        rows = [(line if numbered else i + 1, r) for i, (line, r) in enumerate(records)]  # unique keys
        _exit_once_on(rows)
        out = answer_rows(self.model, rows, self.cache, base=self.base, defaults=self.defaults)
        for row, (line, _) in zip(out, records):
            row["line"] = line
            if as_json and row.get("id") is not None:
                row["id"] = json.dumps(row["id"])
        return rows_to_table(out, id_type)


def _records(batch: Any) -> tuple[list[tuple[int | None, Any]], Any, bool]:
    """A Ray batch -> ``(line, row)`` pairs (a row is a dict, or JSON text from a ``request`` column), the Arrow
    type the output ``id`` column takes, and whether rows came as JSON text."""
    import pyarrow as pa

    if isinstance(batch, dict):  # NumPy batches
        table = pa.table({k: [_plain(x) for x in v] for k, v in batch.items()})
    elif isinstance(batch, pa.Table):
        table = batch
    else:  # pandas
        table = pa.Table.from_pandas(batch, preserve_index=False)
    names = table.column_names
    as_json = "request" in names
    id_type = pa.string() if as_json or "id" not in names else table.schema.field("id").type
    if pa.types.is_null(id_type):
        id_type = None
    out: list[tuple[int | None, Any]] = []
    for record in table.to_pylist():
        line = record.pop("line", None)
        out.append((line, record["request"] if as_json else record))
    return out, id_type, as_json


def _plain(value: Any) -> Any:
    """NumPy scalars and arrays -> Python values (``tolist`` leaves the arrays inside object arrays alone)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _exit_once_on(rows: list[tuple[int, Any]]) -> None:
    spec = os.environ.get(EXIT_ONCE_ENV)
    if not spec:
        return
    from .batch import peek_id

    target, marker = spec.split("@", 1)
    if any(str(peek_id(r)) == target for _, r in rows) and not os.path.exists(marker):
        Path(marker).touch()
        os._exit(1)


def run_ray_batch(
    model: str,
    requests_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    load_kwargs: dict[str, Any] | None = None,
    resume: bool = False,
    batch_size: int = 8,
    defaults: dict[str, Any] | None = None,
    address: str | None = None,
    replicas: int = 1,
    gpus_per_replica: float | None = None,
    progress: bool | None = None,
) -> BatchSummary:
    """``vila-infer --batch ... --ray``: the rows of ``requests_path`` answered by ``replicas`` actors, written to
    ``output_path`` as they come back; the same rows, in the same format, as :func:`vila.batch.run_batch`.

    ``address``: a running cluster (``auto``, ``ray://host:10001``, ``host:6379``); None connects to the cluster
    in ``RAY_ADDRESS`` or starts a local one. ``gpus_per_replica`` defaults to 1 when the cluster has GPUs, else 0."""
    import ray

    from .errors import UsageError

    if replicas < 1 or batch_size < 1:
        raise UsageError("--replicas and --batch-size must be positive integers")
    base_dir = str(Path(requests_path).parent.resolve())

    def answer(todo: list[tuple[int, Any]]) -> Iterator[dict[str, Any]]:
        if not ray.is_initialized():
            ray.init(address=address or None, logging_level="WARNING")
        ray.data.DataContext.get_current().enable_progress_bars = False  # ours counts rows, not blocks
        gpus = gpus_per_replica
        if gpus is None:
            gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
        ds = ray.data.from_arrow(_blocks(todo, batch_size)).map_batches(
            VilaPredictor,
            fn_constructor_kwargs={"model": model, "defaults": defaults, "base_dir": base_dir, **(load_kwargs or {})},
            compute=ray.data.ActorPoolStrategy(size=replicas),
            num_gpus=gpus,
            batch_size=batch_size,
            batch_format="pyarrow",
        )
        as_json = isinstance(todo[0][1], str)
        written: set[int] = set()
        for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in block.to_pylist():
                if row["line"] in written:  # a batch retried after its actor died
                    continue
                written.add(row["line"])
                if as_json and row["id"] is not None:
                    row["id"] = json.loads(row["id"])
                yield {k: v for k, v in row.items() if v is not None or k == "id"}

    return drive_batch(requests_path, output_path, answer, resume=resume, progress=progress)


def _blocks(todo: list[tuple[int, Any]], batch_size: int) -> list[Any]:
    """One Arrow table per batch, so the actor pool spreads the batches over all replicas."""
    import pyarrow as pa

    if isinstance(todo[0][1], str):  # JSONL lines, passed through as text
        table = pa.table({"line": [line for line, _ in todo], "request": [row for _, row in todo]})
    else:  # Parquet rows
        table = pa.Table.from_pylist([{**row, "line": line} for line, row in todo])
    return [table.slice(i, batch_size) for i in range(0, table.num_rows, batch_size)]
