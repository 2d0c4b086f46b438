"""``vila-infer --batch requests.jsonl --output answers.jsonl``: many requests, one model load.

Each input line is a JSON object::

    {"id": "q1", "text": "Describe the image.", "media": ["a.jpg"], "max_new_tokens": 64}

``id`` (string or integer, unique) is required, and ``text`` and/or ``media`` (paths or URLs, relative paths
resolved against the request file's folder first); optional settings: ``max_new_tokens``, ``temperature``,
``top_p``, ``top_k``, ``seed``, ``num_video_frames``, ``fps``, ``video_max_tiles`` and ``response_format``
(as the API's). Flags given on the command line are the defaults.

Every request gets exactly one output line: ``{"id", "answer", "num_prompt_tokens", "num_generated_tokens",
"media_tokens", "line"}`` or, when it fails, ``{"id", "error", "error_type", "exit_code", "line"}`` (a line
that is not a valid request has ``"id": null``); the run goes on. Lines are appended with one ``write`` each,
so a killed run leaves at most one partial last line; ``--resume`` drops it and skips every request that
already has a line (answers and errors alike), so after a crash and a resumed run each id has exactly one line.

Requests are taken ``batch_size`` at a time and answered by one call of the engine (:func:`vila.engine.run`):
their media not yet in the feature cache go through the vision tower together, and greedy requests go through
the LLM as one batch (sampled and JSON-mode requests run one by one, so that seeds and grammars behave as in
single calls). Batched greedy answers equal one-by-one answers (tests/test_batch.py checks it on the tiny
checkpoints).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .cache import FeatureCache
from .errors import UsageError, VilaError

logger = logging.getLogger(__name__)
SETTINGS = (
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "num_video_frames",
    "fps",
    "video_max_tiles",
    "response_format",
)
KEYS = frozenset(("id", "text", "media", *SETTINGS))


@dataclass
class Request:
    line: int
    id: Any
    text: str | None
    media: list[str]
    settings: dict[str, Any]
    prompt: list[Any] = field(default_factory=list)


@dataclass
class BatchSummary:
    total: int = 0  # requests in the file
    skipped: int = 0  # already answered (--resume)
    answered: int = 0
    failed: int = 0
    seconds: float = 0.0


class RowWriter:
    """Appends JSON lines with one ``os.write`` of a whole line each (no partial rows in between)."""

    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, row: dict[str, Any]) -> None:
        data = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        while data:
            data = data[os.write(self.fd, data) :]

    def close(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)


def answered_keys(path: Path) -> set[str]:
    """Keys (see :func:`row_key`) of the rows already in ``path``; a trailing partial line is cut off."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(cut)
        data = data[:cut]
    keys = set()
    for raw in data.splitlines():
        try:
            row = json.loads(raw)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            keys.add(row_key(row.get("id"), row.get("line")))
    return keys


def row_key(request_id: Any, line: Any) -> str:
    """Requests are known by id; lines without a usable id by their line number."""
    return f"id:{json.dumps(request_id)}" if request_id is not None else f"line:{line}"


def parse_request(raw: str | dict[str, Any], line: int, base: Path) -> Request:
    """One JSONL line (or a row already decoded, from Parquet or a Ray batch) -> a :class:`Request`, or a
    :class:`UsageError` saying what is wrong with it."""
    from .engine import validate_generation_args
    from .structured import parse_response_format

    if isinstance(raw, dict):
        obj: Any = raw
    else:
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise UsageError(f"line {line} is not valid JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(obj, dict):
        raise UsageError(f"line {line} must be a JSON object with id, text and media, got {type(obj).__name__}")
    unknown = sorted(set(obj) - KEYS)
    if unknown:
        raise UsageError(f"line {line}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(KEYS))}")
    rid = obj.get("id")
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or rid == "":
        raise UsageError(f"line {line}: 'id' must be a non-empty string or an integer")
    text = obj.get("text")
    if text is not None and not isinstance(text, str):
        raise UsageError(f"line {line}: 'text' must be a string")
    media = obj.get("media") or []
    if isinstance(media, str):
        media = [media]
    if isinstance(media, tuple):
        media = list(media)
    if not isinstance(media, list) or not all(isinstance(m, (str, bytes)) and m for m in media):
        raise UsageError(f"line {line}: 'media' must be a list of paths, URLs or image bytes")
    if not media and not (text or "").strip():
        raise UsageError(f"line {line}: the request is empty; give 'text' and/or 'media'")
    settings = {k: obj[k] for k in SETTINGS if obj.get(k) is not None}
    for k in ("max_new_tokens", "top_k", "seed", "num_video_frames", "video_max_tiles"):
        if k in settings and (isinstance(settings[k], bool) or not isinstance(settings[k], int)):
            raise UsageError(f"line {line}: '{k}' must be an integer")
    for k in ("temperature", "top_p", "fps"):
        if k in settings and (isinstance(settings[k], bool) or not isinstance(settings[k], (int, float))):
            raise UsageError(f"line {line}: '{k}' must be a number")
    validate_generation_args(
        settings.get("max_new_tokens"),
        settings.get("temperature"),
        settings.get("top_p"),
        settings.get("top_k"),
        settings.get("num_video_frames"),
        settings.get("fps"),
    )
    if settings.get("seed", 0) < 0:
        raise UsageError(f"line {line}: 'seed' must be >= 0")
    if "response_format" in settings:
        parse_response_format(settings["response_format"])
    return Request(line, rid, text, [_resolve(m, base) for m in media], settings)


def _resolve(item: str | bytes, base: Path) -> str | bytes:
    if isinstance(item, bytes) or "://" in item or os.path.isabs(item):
        return item
    candidate = base / item
    return str(candidate) if candidate.exists() else item


def read_requests(path: Path) -> Iterator[tuple[int, str]]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, raw in enumerate(f, start=1):
            if raw.strip():
                yield number, raw


def is_parquet(path: str | os.PathLike) -> bool:
    return os.fspath(path).lower().endswith((".parquet", ".pq"))


def read_input(path: str | os.PathLike) -> list[tuple[int, str | dict[str, Any]]]:
    """The rows of a requests file as ``(line, row)``: JSONL lines as text (parsed per row, so that one bad line
    is one error row), Parquet rows as dicts numbered from 1."""
    if not is_parquet(path):
        return list(read_requests(Path(path)))
    pq = _pyarrow_parquet()
    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for unreadable files
        raise UsageError(f"cannot read Parquet file {path}: {e}") from e
    return list(enumerate(table.to_pylist(), start=1))


def _pyarrow_parquet() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError("Parquet files need pyarrow: pip install pyarrow (or 'vila[ray]')") from None
    return pq


def peek_id(row: str | dict[str, Any]) -> Any:
    """The row's id when it has a usable one (a non-empty string or an integer), else None; no validation."""
    if isinstance(row, dict):
        obj: Any = row
    else:
        try:
            obj = json.loads(row)
        except json.JSONDecodeError:
            return None
    rid = obj.get("id") if isinstance(obj, dict) else None
    return rid if isinstance(rid, (str, int)) and not isinstance(rid, bool) and rid != "" else None


@dataclass
class Plan:
    """What a run has to do: the rows not yet answered (with the line of the first row holding the same id, for
    duplicates), and how many rows were skipped because their answers are already there."""

    total: int = 0
    skipped: int = 0
    pending: list[tuple[int, str | dict[str, Any], int | None]] = field(default_factory=list)


def plan_rows(
    rows: Sequence[tuple[int, str | dict[str, Any]]], done: set[str], shard: tuple[int, int] = (0, 1)
) -> Plan:
    """Rows to answer: this shard's (every ``shard[1]``-th row from ``shard[0]``), minus those in ``done``.

    Duplicates are found over the whole input, so that every shard (and the Ray driver) flags the same rows as the
    local run does: the first row with an id owns it, later ones become error rows."""
    index, count = shard
    plan = Plan(total=len(rows))
    first: dict[str, int] = {}
    for position, (line, row) in enumerate(rows):
        rid = peek_id(row)
        key = row_key(rid, line)
        dup_of = first.setdefault(key, line) if rid is not None else line
        if position % count != index:
            continue
        if key in done or f"line:{line}" in done:
            plan.skipped += 1
        else:
            plan.pending.append((line, row, dup_of if dup_of != line else None))
    return plan


def duplicate_row(row: str | dict[str, Any], line: int, first: int) -> dict[str, Any]:
    error = UsageError(f"line {line}: duplicate id {peek_id(row)!r} (first seen on line {first}); ids must be unique")
    return _error_row(None, line, error)


def answer_rows(
    model: Any,
    rows: Sequence[tuple[int, str | dict[str, Any]]],
    cache: FeatureCache | None = None,
    *,
    base: str | os.PathLike = ".",
    defaults: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """One output row (answer or error) per ``(line, row)``, in order: rows are validated, their media kinds
    checked, and the valid ones answered by one engine call (see the module docstring). Never raises for a bad row.

    The local ``--batch`` loop, the shards and the Ray predictor all answer through this function."""
    defaults = {k: v for k, v in (defaults or {}).items() if v is not None}
    cache = cache if cache is not None else FeatureCache()
    out: dict[int, dict[str, Any]] = {}
    requests: list[Request] = []
    for number, raw in rows:
        request_id = None
        try:
            request = parse_request(raw, number, Path(base))
            request_id = request.id
            request.settings = {**defaults, **request.settings}
            request.prompt = request_prompt(request.text, request.media)  # media kinds, placeholders
            requests.append(request)
        except VilaError as e:
            out[number] = _error_row(request_id, number, e)
    for request, row in zip(requests, _answer(model, requests, cache)):
        out[request.line] = row
    return [out[number] for number, _ in rows]


def request_prompt(text: str | None, media: Sequence[str | bytes]) -> list[Any]:
    """:func:`vila.media.build_prompt` for a request row (media given as bytes, from a Parquet or Ray binary
    column, are images)."""
    from .media import build_prompt

    return build_prompt(text, media, names=("'text'", "'media'"))


class OutputFile:
    """``--output``: a JSONL file appended row by row (flushed per row), or a Parquet file written at the end from
    a JSONL journal beside it (``ANSWERS.parquet.rows.jsonl``), so that a killed run loses nothing and
    ``--resume`` continues either. ``done`` holds the keys of the rows already there."""

    def __init__(self, path: str | os.PathLike, resume: bool):
        self.path = Path(path)
        self.parquet = is_parquet(self.path)
        self.journal = self.path.with_name(self.path.name + ".rows.jsonl") if self.parquet else self.path
        existing = [p for p in {self.path, self.journal} if p.exists() and p.stat().st_size > 0]
        if existing and not resume:
            raise UsageError(f"{existing[0]} already exists; pass --resume to continue it, or choose a new --output")
        self.done = answered_keys(self.journal) if resume else set()
        if resume and self.parquet and self.path.exists():
            self.done |= {row_key(r.get("id"), r.get("line")) for r in read_output(self.path)}
        self.writer = RowWriter(self.journal)

    def write(self, row: dict[str, Any]) -> None:
        self.writer.write(row)

    def close(self, finalize: bool = True) -> None:
        self.writer.close()
        if self.parquet and finalize:
            rows = read_output(self.path) if self.path.exists() else []
            rows += read_output(self.journal)
            write_parquet(self.path, sorted(rows, key=lambda r: r.get("line") or 0))
            self.journal.unlink()


OUTPUT_COLUMNS = (
    "id",
    "answer",
    "num_prompt_tokens",
    "num_generated_tokens",
    "media_tokens",
    "error",
    "error_type",
    "exit_code",
    "line",
)


def read_output(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of an answers file (JSONL or Parquet), without the null columns a Parquet row does not use."""
    if is_parquet(path):
        rows = _pyarrow_parquet().read_table(path).to_pylist()
        return [{k: v for k, v in r.items() if v is not None or k == "id"} for r in rows]
    rows = []
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(raw))
        except json.JSONDecodeError:
            continue  # a partial last line of a killed run
    return rows


def write_parquet(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> None:
    """Answer rows -> one Parquet file (the columns of ``OUTPUT_COLUMNS``; ids stay integers or strings when all
    are, else become strings), written to a temporary name and renamed, so a reader never sees half a file."""
    pq = _pyarrow_parquet()
    table = rows_to_table(rows)
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def rows_to_table(rows: Sequence[dict[str, Any]], id_type: Any = None) -> Any:
    import pyarrow as pa

    types = {
        "answer": pa.string(),
        "num_prompt_tokens": pa.int64(),
        "num_generated_tokens": pa.int64(),
        "media_tokens": pa.list_(pa.int64()),
        "error": pa.string(),
        "error_type": pa.string(),
        "exit_code": pa.int64(),
        "line": pa.int64(),
    }
    ids = [r.get("id") for r in rows]
    try:
        id_array = pa.array(ids, type=id_type)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
        id_array = pa.array([None if i is None else str(i) for i in ids], type=pa.string())
    arrays = [id_array] + [pa.array([r.get(c) for r in rows], type=types[c]) for c in OUTPUT_COLUMNS[1:]]
    return pa.Table.from_arrays(arrays, names=list(OUTPUT_COLUMNS))


def run_batch(
    model: Any,
    requests_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    resume: bool = False,
    batch_size: int = 8,
    defaults: dict[str, Any] | None = None,
    progress: bool | None = None,
    cache: FeatureCache | None = None,
    shard: tuple[int, int] = (0, 1),
) -> BatchSummary:
    """Answer every request of ``requests_path`` into ``output_path`` (see the module docstring).

    ``progress``: a bar on stderr; None shows it only on a terminal (in a log file a bar is one endless line of
    carriage returns). ``shard=(i, k)``: only every k-th row from row i (see :func:`plan_rows`)."""
    if batch_size < 1:
        raise UsageError(f"--batch-size must be a positive integer, got {batch_size}")
    cache = cache if cache is not None else FeatureCache()
    base = Path(requests_path).parent

    def answer(todo: list[tuple[int, str | dict[str, Any]]]) -> Iterator[dict[str, Any]]:
        for start in range(0, len(todo), batch_size):
            yield from answer_rows(model, todo[start : start + batch_size], cache, base=base, defaults=defaults)

    return drive_batch(requests_path, output_path, answer, resume=resume, progress=progress, shard=shard)


def drive_batch(
    requests_path: str | os.PathLike,
    output_path: str | os.PathLike,
    answer: Callable[[list[tuple[int, str | dict[str, Any]]]], Iterable[dict[str, Any]]],
    *,
    resume: bool = False,
    progress: bool | None = None,
    shard: tuple[int, int] = (0, 1),
) -> BatchSummary:
    """The run loop of the local ``--batch``, its shards and ``--ray``: plan the rows, write an error row per
    duplicate id, then each row ``answer(todo)`` yields as it comes (``answer`` is called once, and only when rows
    are left); a Parquet output is finalised only when every row is written, so ``--resume`` can continue it."""
    src = Path(requests_path)
    if not src.is_file():
        raise UsageError(f"batch file not found: {src}")
    output = OutputFile(output_path, resume)
    summary = BatchSummary()
    t0 = time.perf_counter()
    finished = False
    try:
        plan = plan_rows(read_input(src), output.done, shard)
        summary.total, summary.skipped = plan.total, plan.skipped
        bar = _progress(len(plan.pending), sys.stderr.isatty() if progress is None else progress)
        try:
            for line, row, first in plan.pending:
                if first is not None:
                    _record(output, summary, bar, duplicate_row(row, line, first))
            todo = [(line, row) for line, row, first in plan.pending if first is None]
            for row in answer(todo) if todo else ():
                _record(output, summary, bar, row)
            finished = True
        finally:
            bar.close()
    finally:
        output.close(finalize=finished)
    summary.seconds = time.perf_counter() - t0
    return summary


def _record(writer: Any, summary: BatchSummary, bar: Any, row: dict[str, Any]) -> None:
    writer.write(row)
    if "error" in row:
        summary.failed += 1
    else:
        summary.answered += 1
    bar.update(1)


def _error_row(request_id: Any, line: int, error: BaseException) -> dict[str, Any]:
    if isinstance(error, VilaError):
        return {
            "id": request_id,
            "error": str(error),
            "error_type": type(error).__name__,
            "exit_code": error.exit_code,
            "line": line,
        }
    if isinstance(error, torch.OutOfMemoryError):
        return {
            "id": request_id,
            "error": f"out of memory answering this request alone ({(str(error).splitlines() or [''])[0][:200]}); "
            "lower its max_new_tokens, num_video_frames or image size, or use a larger GPU",
            "error_type": "OutOfMemoryError",
            "exit_code": 1,
            "line": line,
        }
    return {
        "id": request_id,
        "error": f"{type(error).__name__}: {error}",
        "error_type": "InternalError",
        "exit_code": 1,
        "line": line,
    }


def _answer(model: Any, requests: list[Request], cache: FeatureCache) -> list[dict[str, Any]]:
    """Rows for ``requests`` from one engine call; a request that fails gets its error row, the others go on."""
    from . import engine
    from .media import has_video_file

    jobs = [
        engine.Request(
            r.prompt,
            {**engine.request_settings(r.settings), "cache": cache, "decode_time_tokens": has_video_file(r.prompt)},
        )
        for r in requests
    ]
    rows = []
    for r, result in zip(requests, engine.run(model, jobs, return_errors=True) if jobs else []):
        if isinstance(result, BaseException):
            rows.append(_error_row(r.id, r.line, result))
            continue
        rows.append(
            {
                "id": r.id,
                "answer": result.text,
                "num_prompt_tokens": result.num_prompt_tokens,
                "num_generated_tokens": len(result.token_ids),
                "media_tokens": result.media_tokens,
                "line": r.line,
            }
        )
    return rows


def _progress(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=total, unit="req", desc="batch", file=sys.stderr, disable=not enabled or total == 0, dynamic_ncols=True
    )


# -- static sharding without Ray (torchrun, SLURM): one part file per shard, merged in input order ----------


def shard_from_env(
    index: int | None, count: int | None, environ: Any = None
) -> tuple[tuple[int, int], str] | tuple[None, None]:
    """``(shard index, shard count)`` and where they came from: the flags, else ``RANK``/``WORLD_SIZE`` (torchrun,
    accelerate), else ``SLURM_PROCID``/``SLURM_NTASKS`` (srun); ``(None, None)`` when the run is not sharded."""
    environ = os.environ if environ is None else environ
    if index is not None or count is not None:
        if index is None or count is None:
            raise UsageError("--shard-index and --num-shards go together; give both")
        source = "--shard-index/--num-shards"
    else:
        for rank, world in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
            if environ.get(rank) is not None and environ.get(world) is not None:
                try:
                    index, count = int(environ[rank]), int(environ[world])
                except ValueError:
                    raise UsageError(
                        f"{rank}={environ[rank]!r} and {world}={environ[world]!r} must be integers"
                    ) from None
                source = f"{rank}/{world}"
                break
        if index is None or count == 1:
            return None, None
    assert count is not None
    if count < 1 or not 0 <= index < count:
        raise UsageError(f"shard index {index} is not in 0..{count - 1} (from {source})")
    return (index, count), source


def part_path(output: str | os.PathLike, index: int, count: int) -> Path:
    """``answers.jsonl`` -> ``answers.jsonl.part-00001-of-00004`` (JSON lines, whatever the final format)."""
    return Path(f"{os.fspath(output)}.part-{index:05d}-of-{count:05d}")


def merge_parts(
    requests_path: str | os.PathLike, output_path: str | os.PathLike, num_shards: int | None = None
) -> BatchSummary:
    """Write ``output_path`` (JSONL or Parquet) from its part files, one row per request in input order; raises a
    :class:`UsageError` naming the missing rows and their shards when a part is missing or incomplete."""
    out = Path(output_path)
    found = sorted(out.parent.glob(glob.escape(out.name) + ".part-*-of-*"))
    counts = {int(p.name.rsplit("-of-", 1)[1]) for p in found if p.name.rsplit("-of-", 1)[1].isdigit()}
    if num_shards is None:
        if len(counts) != 1:
            raise UsageError(
                f"found part files for {sorted(counts) or 'no'} shard count(s) next to {out}; pass --num-shards"
            )
        num_shards = counts.pop()
    parts = [part_path(out, i, num_shards) for i in range(num_shards)]
    absent = [p.name for p in parts if not p.exists()]
    if absent:
        raise UsageError(f"missing part file(s) {', '.join(absent)}; run those shards (with --resume), then --merge")
    by_line: dict[int, dict[str, Any]] = {}
    for p in parts:
        for row in read_output(p):
            if isinstance(row.get("line"), int):
                by_line.setdefault(row["line"], row)
    rows = read_input(requests_path)
    missing = [(pos, line, peek_id(row)) for pos, (line, row) in enumerate(rows) if line not in by_line]
    if missing:
        shown = ", ".join(f"line {line} (id {rid!r}, shard {pos % num_shards})" for pos, line, rid in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise UsageError(
            f"{len(missing)} request(s) have no row in the part files: {shown}{more}; rerun their shards with "
            "--resume, then --merge again"
        )
    merged = [by_line[line] for line, _ in rows]
    if is_parquet(out):
        write_parquet(out, merged)
    else:
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in merged), encoding="utf-8")
        os.replace(tmp, out)
    failed = sum("error" in r for r in merged)
    return BatchSummary(total=len(rows), answered=len(merged) - failed, failed=failed)
