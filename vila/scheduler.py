"""One worker thread that owns the model and answers queued requests, batching the ones that can be.

The server's event loop never touches the model: it puts a :class:`Job` in a bounded FIFO queue
(:meth:`Scheduler.submit` raises :class:`QueueFull` when it is full) and receives the job's events through the
job's ``on_event`` callback, called from the worker thread: ``("start", None)`` once the prompt is ready
(errors come before it), ``("delta", text)`` for streamed jobs, then ``("done", Completion)`` or
``("error", exception)``.

Scheduling: the worker takes the oldest waiting job; if it is greedy (no sampling, no JSON mode) it also
takes up to ``max_batch_size - 1`` other *waiting* greedy jobs with the same prompt settings, and answers
them with one engine call (:func:`vila.engine.run`: one batch through the LLM, whose answers equal one-by-one
answers). Everything else runs alone. A running batch admits nobody, so a job waits at most for the jobs
queued before it, each bounded by its ``max_tokens``. Each row's per-token hook (:class:`RowTracker`) streams
its text, applies ``stop`` strings, and the engine's ``cancel`` ends a row within one token once its client is
gone.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import engine
from .cache import FeatureCache
from .streaming import IncrementalDecoder

logger = logging.getLogger("vila.serve")


class QueueFull(Exception):
    """The queue holds ``max_queue`` waiting jobs already."""


@dataclass
class Completion:
    text: str
    num_prompt_tokens: int
    num_completion_tokens: int
    finish_reason: str  # "stop" | "length"


class ShuttingDown(Exception):
    """What the requests still waiting get when the server stops."""


def _tell(job: Job, kind: str, payload: Any) -> None:
    """``job.on_event``, which must not take the worker down (e.g. once the server's event loop has closed)."""
    try:
        job.on_event(kind, payload)
    except Exception:  # noqa: BLE001
        logger.debug("event %s for request %s not delivered", kind, job.id, exc_info=True)


@dataclass
class Job:
    """One request for the worker. ``prompt``: turns for :meth:`VilaModel.generate`; ``settings``: its keyword
    arguments (``max_new_tokens``, ``temperature``, ``top_p``, ``top_k``, ``seed``, ``response_format``,
    ``num_video_frames``, ``fps``)."""

    id: str
    prompt: list[dict[str, Any]]
    settings: dict[str, Any]
    on_event: Callable[[str, Any], None]
    template: Any = None  # a vila.prompt.Template with the request's system prompt, or None
    stop: tuple[str, ...] = ()
    stream: bool = False
    cancelled: bool = False
    started: bool = field(default=False, repr=False)

    def cancel(self) -> None:
        """Stop this job (from any thread): dropped if still queued, its row stopped within a token if running."""
        self.cancelled = True

    @property
    def batch_key(self) -> tuple[Any, ...] | None:
        """Jobs with equal keys can share one greedy batch; None: the job runs alone."""
        s = self.settings
        if (s.get("temperature") or 0) > 0 or s.get("response_format") is not None:
            return None
        return (self.template, s.get("num_video_frames"), s.get("fps"))

    def start(self) -> None:
        if not self.started:
            self.started = True
            self.on_event("start", None)


class Scheduler:
    """The worker thread and its queue (see the module docstring)."""

    def __init__(self, model: Any, *, max_queue: int = 64, max_batch_size: int = 8, cache: FeatureCache | None = None):
        if max_queue < 1 or max_batch_size < 1:
            raise ValueError("max_queue and max_batch_size must be positive")
        self.model = model
        self.max_queue = max_queue
        self.max_batch_size = max_batch_size
        self.cache = cache if cache is not None else FeatureCache(max_items=256, max_bytes=512 << 20)
        self.batched = model.supports_feature_cache  # models with their own media path run one by one
        self.running = 0
        self._current: list[Job] = []  # the jobs being answered now
        self.largest_batch = 0  # most jobs decoded together so far
        self._pending: deque[Job] = deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="vila-serve-worker", daemon=True)

    @property
    def queued(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop the worker: the running jobs end within a token, the waiting ones are answered with
        :class:`ShuttingDown`."""
        with self._cv:
            self._stopping = True
            waiting, self._pending = list(self._pending), deque()
            for job in [*self._current, *waiting]:
                job.cancel()
            self._cv.notify_all()
        for job in waiting:
            _tell(job, "error", ShuttingDown("the server is shutting down; send the request again"))
        self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        with self._cv:
            live = [j for j in self._pending if not j.cancelled]
            if len(live) != len(self._pending):
                self._pending = deque(live)
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"{len(self._pending)} requests are waiting")
            self._pending.append(job)
            self._cv.notify()

    def _take(self) -> list[Job] | None:
        with self._cv:
            while not self._pending and not self._stopping:
                self._cv.wait()
            if self._stopping:
                return None
            head = self._pending.popleft()
            group = [head]
            key = head.batch_key
            if key is not None and self.batched:
                for job in list(self._pending):
                    if len(group) >= self.max_batch_size:
                        break
                    if job.batch_key == key and not job.cancelled:
                        group.append(job)
                        self._pending.remove(job)
            self.running = len(group)
            self._current = group
            self.largest_batch = max(self.largest_batch, len(group))
            return group

    def _loop(self) -> None:
        while True:
            group = self._take()
            if group is None:
                return
            try:
                live = [j for j in group if not j.cancelled]
                if live:
                    self._run(live)
            except BaseException as e:  # noqa: BLE001 - the worker must survive anything one request does
                for job in group:
                    _tell(job, "error", e)
            finally:
                self.running = 0
                self._current = []

    def _run(self, jobs: list[Job]) -> None:
        """One engine call for ``jobs``; each gets its deltas, then its completion or its error."""
        trackers = [RowTracker(self.model, job) for job in jobs]
        requests = [
            engine.Request(
                job.prompt,
                {
                    **engine.request_settings(job.settings),
                    "template": job.template,
                    "cache": self.cache,
                },
                on_token=tracker.step,
                cancel=lambda job=job: job.cancelled,
            )
            for job, tracker in zip(jobs, trackers)
        ]
        for job, tracker, result in zip(jobs, trackers, engine.run(self.model, requests, return_errors=True)):
            if job.cancelled:
                continue
            if isinstance(result, BaseException):
                job.on_event("error", result)
            else:
                tracker.finish(result.num_prompt_tokens)


@dataclass
class _Row:
    job: Job
    ids: list[int] = field(default_factory=list)
    decoder: IncrementalDecoder | None = None  # for rows that stream or watch for stop strings
    text: str = ""  # what ``decoder`` gave out, left-stripped like the answer
    sent: str = ""
    finish_reason: str | None = None
    cut: str | None = None  # the answer up to a stop string, once one appeared

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class RowTracker:
    """The per-token hook of one job (:attr:`step`, the engine's ``on_token``): it streams text deltas, ends the
    row at a ``stop`` string, and makes the final answer (decoded as :meth:`VilaModel.generate` decodes it, cut at
    a stop string).

    Each token is decoded once, incrementally (:class:`vila.streaming.IncrementalDecoder`), and stop strings
    are looked for only where a new match can be: a decode of the whole answer at every token would make a
    long answer quadratic in its length."""

    def __init__(self, model: Any, job: Job):
        self.tokenizer = model.tokenizer
        self.stop_ids = set(model.stop_token_ids)
        self.row = _Row(job)
        if job.stream or job.stop:
            self.row.decoder = IncrementalDecoder(self.tokenizer)

    def step(self, token: int) -> bool:
        """A new token of this row; True ends the row (a stop string, or the job was cancelled)."""
        row = self.row
        row.job.start()
        if not row.finished and not row.job.cancelled:
            self._step(row, token)
        return row.finished or row.job.cancelled

    def _text(self, row: _Row) -> str:
        return self.tokenizer.decode(row.ids, skip_special_tokens=True).strip()

    def _step(self, row: _Row, token: int) -> None:
        row.ids.append(token)
        if token in self.stop_ids:
            row.finish_reason = "stop"
            return
        if row.decoder is not None:
            checked = len(row.text)  # no stop string lies wholly inside it (the last step looked)
            piece = row.decoder.push([token])
            row.text += piece if row.text else piece.lstrip()
            stops = row.job.stop
            if stops:
                text = self._so_far(row)
                if text is None:  # the held ids change how the last piece reads: decode it all, look everywhere
                    text, checked = self.tokenizer.decode(row.ids, skip_special_tokens=True).lstrip(), 0
                hits = [i for i in (text.find(s, max(0, checked - len(s) + 1)) for s in stops) if i >= 0]
                if hits:
                    row.cut = text[: min(hits)].strip()
                    row.finish_reason = "stop"
                    return
            if row.job.stream:
                self._send(row, _stable(row.text[len(row.sent) :], stops))

    def _so_far(self, row: _Row) -> str | None:
        """The answer so far as ``decode(ids).lstrip()`` reads it, so that a stop string counts as soon as the
        whole answer's decode shows it: the decoder's text plus the ids it holds back (a character split over
        tokens, a run of byte tokens) decoded after its last piece; None when they change that piece."""
        d = row.decoder
        if d.done == len(d.ids):
            return row.text
        before = self.tokenizer.decode(d.ids[d.start : d.done])
        after = self.tokenizer.decode(d.ids[d.start :])
        if not after.startswith(before):
            return None
        held = after[len(before) :]
        return row.text + held if row.text else held.lstrip()

    def _send(self, row: _Row, piece: str) -> None:
        if piece:
            row.job.on_event("delta", piece)
            row.sent += piece

    def finish(self, num_prompt_tokens: int) -> None:
        """Send the row's last delta and its :class:`Completion` (nothing once the job is cancelled)."""
        row = self.row
        if row.job.cancelled:
            return
        row.job.start()
        text = row.cut if row.cut is not None else self._text(row)
        if row.job.stream:
            if text.startswith(row.sent):
                self._send(row, text[len(row.sent) :])
            else:  # a later token changed how earlier ones decode; what was sent stands
                logger.debug("request %s: streamed text diverged from the final decode", row.job.id)
        reason = row.finish_reason or "length"
        row.job.on_event("done", Completion(text, num_prompt_tokens, len(row.ids), reason))


def _stable(text: str, stops: Sequence[str]) -> str:
    """The part of a partial answer's unsent ``text`` that later tokens cannot change: without trailing
    whitespace (the answer is stripped), an incomplete character, or a tail that may be the start of a stop
    string. Looking at the unsent text alone is enough: what was sent ended before any such tail, so a stop
    string that appears later starts after it."""
    text = text.rstrip()
    while text.endswith("\ufffd"):
        text = text[:-1]
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return text[: len(text) - hold].rstrip() if hold else text
