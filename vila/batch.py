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

Requests are taken ``batch_size`` at a time: their media not yet in the feature cache go through the vision
tower together, and greedy requests with equal settings go through the LLM as one left-padded batch (sampled
and JSON-mode requests run one by one, so that seeds and grammars behave as in single calls). Batched greedy
answers equal one-by-one answers (tests/test_batch.py checks it on the tiny checkpoints).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
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

    @property
    def greedy(self) -> bool:
        t = self.settings.get("temperature")
        return (t is None or t == 0) and self.settings.get("response_format") is None

    def group_key(self) -> str:
        return json.dumps({k: v for k, v in self.settings.items() if k != "seed"}, sort_keys=True, default=str)


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


def parse_request(raw: str, line: int, base: Path) -> Request:
    """One JSONL line -> a :class:`Request`, or a :class:`UsageError` saying what is wrong with it."""
    from .model.vila import validate_generation_args
    from .structured import parse_response_format

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
    if not isinstance(media, list) or not all(isinstance(m, str) and m for m in media):
        raise UsageError(f"line {line}: 'media' must be a list of paths or URLs")
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


def _resolve(item: str, base: Path) -> str:
    if "://" in item or os.path.isabs(item):
        return item
    candidate = base / item
    return str(candidate) if candidate.exists() else item


def read_requests(path: Path) -> Iterator[tuple[int, str]]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, raw in enumerate(f, start=1):
            if raw.strip():
                yield number, raw


def run_batch(
    model: Any,
    requests_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    resume: bool = False,
    batch_size: int = 8,
    defaults: dict[str, Any] | None = None,
    progress: bool = True,
    cache: FeatureCache | None = None,
) -> BatchSummary:
    """Answer every request of ``requests_path`` into ``output_path`` (see the module docstring)."""
    src, out = Path(requests_path), Path(output_path)
    if not src.is_file():
        raise UsageError(f"batch file not found: {src}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be a positive integer, got {batch_size}")
    if out.exists() and out.stat().st_size > 0 and not resume:
        raise UsageError(f"{out} already exists; pass --resume to continue it, or choose a new --output file")
    done = answered_keys(out) if resume else set()
    defaults = {k: v for k, v in (defaults or {}).items() if v is not None}
    cache = cache if cache is not None else FeatureCache()
    from .cli import build_prompt

    summary = BatchSummary()
    t0 = time.perf_counter()

    lines = list(read_requests(src))
    summary.total = len(lines)
    seen: dict[str, int] = {}
    pending: list[tuple[int, str]] = []
    for number, raw in lines:
        if row_key(_peek_id(raw), number) in done or f"line:{number}" in done:
            summary.skipped += 1
        else:
            pending.append((number, raw))
    writer = RowWriter(out)
    bar = _progress(len(pending), progress)
    try:
        for start in range(0, len(pending), batch_size):
            window = pending[start : start + batch_size]
            requests: list[Request] = []
            for number, raw in window:
                request_id = None
                try:
                    request = parse_request(raw, number, src.parent)
                    key = row_key(request.id, number)
                    if key in seen or key in done:
                        first = f"line {seen[key]}" if key in seen else "an earlier run"
                        raise UsageError(
                            f"line {number}: duplicate id {request.id!r} (first seen on {first}); ids must be unique"
                        )
                    seen[key] = number
                    request_id = request.id
                    request.settings = {**defaults, **request.settings}
                    request.prompt = build_prompt(request.text, request.media)  # media kinds, placeholders
                    requests.append(request)
                except VilaError as e:
                    _record(writer, summary, bar, _error_row(request_id, number, e))
            for group in _groups(requests):
                for row in _answer_group(model, group, cache):
                    _record(writer, summary, bar, row)
    finally:
        bar.close()
        writer.close()
    summary.seconds = time.perf_counter() - t0
    return summary


def _peek_id(raw: str) -> Any:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError:
        return None
    rid = obj.get("id") if isinstance(obj, dict) else None
    return rid if isinstance(rid, (str, int)) and not isinstance(rid, bool) and rid != "" else None


def _groups(requests: Sequence[Request]) -> list[list[Request]]:
    groups: dict[str, list[Request]] = {}
    for r in requests:
        groups.setdefault(r.group_key() if r.greedy else f"single:{r.line}", []).append(r)
    return list(groups.values())


def _record(writer: RowWriter, summary: BatchSummary, bar: Any, row: dict[str, Any]) -> None:
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
    return {
        "id": request_id,
        "error": f"{type(error).__name__}: {error}",
        "error_type": "InternalError",
        "exit_code": 1,
        "line": line,
    }


def _answer_row(
    model: Any,
    request: Request,
    text: str,
    ids: list[int],
    num_prompt: int,
    media_tokens: list[int],
    durations: list[float],
) -> dict[str, Any]:
    from .cli import has_video_file

    if has_video_file(request.prompt):
        text = model.decode_time_tokens(text, durations)
    return {
        "id": request.id,
        "answer": text,
        "num_prompt_tokens": num_prompt,
        "num_generated_tokens": len(ids),
        "media_tokens": media_tokens,
        "line": request.line,
    }


def _answer_group(model: Any, group: list[Request], cache: FeatureCache) -> list[dict[str, Any]]:
    """Rows for requests sharing settings: vision batched, then the LLM batched (greedy) or one by one."""
    from .model.vila import to_turns

    settings = group[0].settings
    media_kw = {k: settings.get(k) for k in ("num_video_frames", "fps", "video_max_tiles")}
    use_cache = cache if model.supports_feature_cache else None
    rows: dict[int, dict[str, Any]] = {}
    ready: list[tuple[Request, Any]] = []
    if len(group) > 1 and use_cache is not None:
        turns = []
        for r in group:
            try:
                turns.append(to_turns(r.prompt))
            except VilaError as e:
                rows[r.line] = _error_row(r.id, r.line, e)
        live = [r for r in group if r.line not in rows]
        try:
            prepared = model.prepare_many(turns, cache=use_cache, return_errors=True, **media_kw)
        except Exception:  # noqa: BLE001 - e.g. out of memory for the whole batch: one by one below
            logger.debug("batched preparation failed; answering one by one", exc_info=True)
            live, prepared = [], []
        for r, p in zip(live, prepared):
            if isinstance(p, Exception):
                rows[r.line] = _error_row(r.id, r.line, p)
                continue
            try:
                model.check_fits(p)
                ready.append((r, p))
            except VilaError as e:
                rows[r.line] = _error_row(r.id, r.line, e)
    if len(ready) > 1 and group[0].greedy:
        try:
            for (r, p), (ids, text) in zip(
                ready, generate_batch(model, [p for _, p in ready], settings.get("max_new_tokens"))
            ):
                rows[r.line] = _answer_row(
                    model, r, text, ids, p.inputs_embeds.shape[0], p.media_tokens, p.video_durations
                )
        except Exception:  # noqa: BLE001 - e.g. out of memory for the whole batch: answer one by one below
            logger.debug("batched generation failed; answering one by one", exc_info=True)
            rows = {line: row for line, row in rows.items() if "error" in row}
    for r in group:
        if r.line in rows:
            continue
        try:
            result = model.generate(r.prompt, cache=use_cache, **generate_kwargs(r.settings))
            rows[r.line] = _answer_row(
                model,
                r,
                result.text,
                result.token_ids,
                result.num_prompt_tokens,
                result.media_tokens,
                result.video_durations,
            )
        except Exception as e:  # noqa: BLE001 - one bad request must not stop the run
            rows[r.line] = _error_row(r.id, r.line, e)
    return [rows[r.line] for r in group]


def generate_kwargs(settings: dict[str, Any]) -> dict[str, Any]:
    """Request settings -> ``generate`` keyword arguments (a temperature above 0 means sampling)."""
    kwargs = dict(settings)
    kwargs["do_sample"] = (kwargs.get("temperature") or 0) > 0
    return kwargs


class _RowBudgets:
    """Per-row ``max_new_tokens`` inside one batched ``generate`` (input ids hold only new tokens)."""

    def __init__(self, budgets: Sequence[int]):
        self.budgets = torch.tensor(list(budgets))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return (input_ids.shape[1] >= self.budgets).to(input_ids.device)


def generate_batch(model: Any, prepared: Sequence[Any], max_new_tokens: int | None) -> list[tuple[list[int], str]]:
    """Greedy answers to several prepared prompts in one left-padded ``llm.generate``; per prompt the token
    ids (up to and including its stop token) and the text, exactly as :meth:`VilaModel.generate` returns them."""
    from transformers import StoppingCriteriaList

    lengths = [p.inputs_embeds.shape[0] for p in prepared]
    width = max(lengths)
    budgets = [max_new_tokens or model.context_length - n for n in lengths]
    device = model._embed_device
    embeds = torch.zeros(
        len(prepared), width, prepared[0].inputs_embeds.shape[1], dtype=prepared[0].inputs_embeds.dtype, device=device
    )
    mask = torch.zeros(len(prepared), width, dtype=torch.long, device=device)
    for i, p in enumerate(prepared):
        embeds[i, width - lengths[i] :] = p.inputs_embeds.to(device)
        mask[i, width - lengths[i] :] = 1
    config = model.generation_config(
        max_new_tokens=max(budgets),
        do_sample=False,
        temperature=1.0,
        top_p=1.0,
        top_k=50,
        prompt_len=width,
        stop_token_ids=model.stop_token_ids,
    )
    with torch.no_grad():
        out = model.llm.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            generation_config=config,
            logits_processor=model._logits_processors(None),
            stopping_criteria=StoppingCriteriaList([_RowBudgets(budgets)]),
        )
    stops = set(model.stop_token_ids)
    answers = []
    for i, budget in enumerate(budgets):
        ids = out[i].tolist()[:budget]
        end = next((k + 1 for k, t in enumerate(ids) if t in stops), len(ids))
        ids = ids[:end]
        answers.append((ids, model.tokenizer.decode(ids, skip_special_tokens=True).strip()))
    return answers


def _progress(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=total, unit="req", desc="batch", file=sys.stderr, disable=not enabled or total == 0, dynamic_ncols=True
    )
