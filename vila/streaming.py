"""Streaming answers, timing generation, and showing progress on a terminal.

``VilaModel.stream_content`` runs the engine (:func:`vila.engine.generate`) in a worker thread whose per-token
hook decodes each token as it comes (:class:`IncrementalDecoder`) and hands the text to the reading thread; the
pieces are stripped like the final answer, so that joined they equal ``generate_content``'s string.
``TokenClock`` is the streamer the engine always drives: it timestamps tokens for ``--stats`` and forwards
everything to the caller's streamer. :class:`Progress` is ``vila-infer``'s token counter on a terminal.
"""

from __future__ import annotations

import atexit
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO

import torch


class TokenClock:
    """A streamer (``put`` / ``end``, as the LLM's ``generate`` calls it) recording when the first and the last new token came out;
    passes every call on to ``inner``. (Duck-typed, so importing vila does not import transformers.)"""

    def __init__(self, inner: Any = None):
        self.inner = inner
        self.first: float | None = None
        self.last: float | None = None
        self.steps = 0
        self._seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if self._seen_prompt:  # generate's first put is the prompt (empty for embeddings-only input)
            now = time.perf_counter()
            self.first = self.first or now
            self.last = now
            self.steps += 1
        self._seen_prompt = True
        if self.inner is not None:
            self.inner.put(value)

    def tick(self, token: int) -> None:
        """One new token (after the prompt's ``put``); a tensor is built only for a caller's streamer."""
        if self.inner is not None:
            self.put(torch.tensor([token]))
            return
        now = time.perf_counter()
        self.first = self.first or now
        self.last = now
        self.steps += 1

    def end(self) -> None:
        if self.inner is not None:
            self.inner.end()

    def timings(self, t_request: float, t_llm: float) -> dict[str, float]:
        """``prefill_s`` (LLM start to first token), ``time_to_first_token_s`` (request start to first token),
        ``decode_tokens_per_s`` (after the first token) and ``num_generated_tokens``."""
        if self.first is None:
            return {}
        out = {
            "prefill_s": self.first - t_llm,
            "time_to_first_token_s": self.first - t_request,
            "num_generated_tokens": float(self.steps),
        }
        if self.steps > 1 and self.last > self.first:
            out["decode_tokens_per_s"] = (self.steps - 1) / (self.last - self.first)
        return out


def strip_pieces(pieces: Iterable[str]) -> Iterator[str]:
    """Pieces of a text, as pieces of ``text.strip()``: leading whitespace dropped, whitespace held back until
    something follows it."""
    started, pending = False, ""
    for piece in pieces:
        if not started:
            piece = piece.lstrip()
            if not piece:
                continue
            started = True
        text = pending + piece
        body = text.rstrip()
        pending = text[len(body) :]
        if body:
            yield body


_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class IncrementalDecoder:
    """Token ids in, text out as soon as the ids decode to whole characters.

    Each step decodes a short window, the ids of the last piece given out (as context) plus the new ones,
    and gives out what the new ids added. The context makes decoders that treat the first token of a text
    specially (SentencePiece drops its leading space) decode the new ids as they do inside the whole answer;
    a window ending in U+FFFD stops inside a character split over byte tokens and waits for the rest. A run of
    SentencePiece byte tokens (``<0xE4>``) is held until it ends: the byte-fallback decoder decodes a run as a
    whole, and an invalid run as one U+FFFD per byte, so a later byte can change how earlier ones read. Special
    tokens are dropped first, as ``decode(ids, skip_special_tokens=True)`` drops them.
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        decoder = getattr(tokenizer, "added_tokens_decoder", {}) if skip_special_tokens else {}
        self.skip = frozenset(i for i, token in decoder.items() if getattr(token, "special", False))
        self.ids: list[int] = []
        self.start = 0  # window start: the first id of the last piece given out
        self.done = 0  # ids[:done] are given out
        self._bytes: dict[int, bool] = {}

    def push(self, token_ids: Iterable[int]) -> str:
        """The text the new ids complete ("" while they end inside a character)."""
        self.ids.extend(i for i in token_ids if i not in self.skip)
        end = len(self.ids)
        while end > self.done and self._is_byte(self.ids[end - 1]):
            end -= 1
        if end == self.done:
            return ""
        before = self.tokenizer.decode(self.ids[self.start : self.done])
        after = self.tokenizer.decode(self.ids[self.start : end])
        if len(after) <= len(before) or not after.startswith(before) or after.endswith("\ufffd"):
            return ""
        self.start, self.done = self.done, end
        return after[len(before) :]

    def _is_byte(self, token_id: int) -> bool:
        if token_id not in self._bytes:
            token = self.tokenizer.convert_ids_to_tokens(token_id)
            self._bytes[token_id] = isinstance(token, str) and _BYTE_TOKEN.fullmatch(token) is not None
        return self._bytes[token_id]


class _PieceSink:
    """The per-token hook of a :class:`TextStream`: decodes each token and hands the text to the reading thread,
    one piece at a time. :meth:`on_token` returns only once the reader took the piece, so generation runs at
    most one token ahead of the reader and pauses when the reader pauses; after :meth:`cancel` it returns True,
    which ends the generation within one token."""

    def __init__(self, tokenizer: Any):
        self.decoder = IncrementalDecoder(tokenizer)
        self.tokens = 0
        self._cond = threading.Condition()
        self._queue: deque[str | None] = deque()
        self._cancelled = False

    def on_token(self, token: int) -> bool:
        self.tokens += 1
        piece = self.decoder.push([token])
        with self._cond:
            if piece and not self._cancelled:
                self._queue.append(piece)
                self._cond.notify_all()
                while self._queue and not self._cancelled:
                    self._cond.wait()
            return self._cancelled

    def end(self) -> None:
        with self._cond:
            self._queue.append(None)
            self._cond.notify_all()

    def get(self) -> str | None:
        """The next piece, or None once generation ended (reading thread)."""
        with self._cond:
            while not self._queue:
                self._cond.wait()
            item = self._queue.popleft()
            self._cond.notify_all()
            return item

    def cancel(self) -> None:
        with self._cond:
            self._cancelled = True
            self._cond.notify_all()

    def pieces(self) -> Iterator[str]:
        while (piece := self.get()) is not None:
            yield piece


# Generations in flight. At interpreter exit they are cancelled and waited for: a daemon thread still inside
# torch when the interpreter finalises aborts the process ("terminate called without an active exception").
_RUNNING: set[tuple[threading.Thread, _PieceSink]] = set()
_RUNNING_LOCK = threading.Lock()
_atexit_registered = False


def _track(entry: tuple[threading.Thread, _PieceSink]) -> None:
    global _atexit_registered
    with _RUNNING_LOCK:
        if not _atexit_registered:
            atexit.register(_stop_all)
            _atexit_registered = True
        _RUNNING.add(entry)


def _stop_all() -> None:
    with _RUNNING_LOCK:
        running = list(_RUNNING)
    for _, sink in running:
        sink.cancel()
    for thread, _ in running:
        thread.join()


class _StreamState:
    def __init__(self) -> None:
        self.result: Any = None
        self.sink: _PieceSink | None = None


class TextStream:
    """Iterator over the pieces of one streamed answer; ``result`` is the ``GenerationResult`` once done.

    ``run(on_token)`` generates the answer (in a worker thread), calling ``on_token`` with each new token id and
    stopping when it returns True. Generation pauses when the reader does (it runs at most one token ahead) and
    stops within one token when the stream is closed, dropped (leaving a ``for`` loop over it with ``break``), or
    the program exits."""

    def __init__(self, tokenizer: Any, run: Callable[[Callable[[int], bool]], Any]):
        # The generator must not hold this object (no reference cycle), so that dropping the stream closes
        # the generator, and with it the generation, at once rather than at the next garbage collection.
        self._state = _StreamState()
        self._pieces = _stream(tokenizer, run, self._state)

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def __enter__(self) -> TextStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def result(self) -> Any:
        return self._state.result

    @property
    def num_tokens(self) -> int:
        """Tokens generated so far."""
        sink = self._state.sink
        return sink.tokens if sink is not None else 0

    def close(self) -> None:
        """Stop generating (within one token) and wait for the generating thread to end."""
        self._pieces.close()


def _stream(tokenizer: Any, run: Callable[[Callable[[int], bool]], Any], state: _StreamState) -> Iterator[str]:
    sink = _PieceSink(tokenizer)
    state.sink = sink
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["result"] = run(sink.on_token)
        except BaseException as e:  # noqa: BLE001 - handed to the reading thread
            box["error"] = e
        finally:
            sink.end()  # unblocks the reader when generation failed or was cancelled

    thread = threading.Thread(target=work, name="vila-generate", daemon=True)
    entry = (thread, sink)
    _track(entry)
    thread.start()
    sent = ""
    try:
        for piece in strip_pieces(sink.pieces()):
            sent += piece
            yield piece
        thread.join()
        if "error" in box:
            raise box["error"]
        state.result = box["result"]
        # Anything the incremental decoding held back (a text ending in U+FFFD) comes from the final decode.
        text = state.result.text
        if len(text) > len(sent) and text.startswith(sent):
            yield text[len(sent) :]
    finally:
        sink.cancel()
        thread.join()
        with _RUNNING_LOCK:
            _RUNNING.discard(entry)


# -- progress on a terminal ---------------------------------------------------------------------------------

PROGRESS_AFTER_S = 2.0  # silence on the terminal before the counter shows
PROGRESS_TICK_S = 0.25


class Progress:
    """A token counter on a terminal's stderr, shown while nothing printed says that generation goes on (a
    long prefill, an answer printed only when complete, tokens that print nothing). It appears after
    ``PROGRESS_AFTER_S`` of silence and is erased before anything else is printed through :meth:`write`; the
    cursor is saved and restored around it, so the answer carries on where it was. Off unless ``stream`` is a
    terminal. ``count``: tokens generated so far."""

    def __init__(self, count: Any = None, stream: TextIO | None = None, enabled: bool | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = _isatty(self.stream) if enabled is None else enabled
        self.count = count
        self._lock = threading.Lock()
        self._shown = False
        self._start = self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Progress:
        if self.enabled:
            self._thread = threading.Thread(target=self._run, name="vila-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            self._erase()

    def write(self, out: TextIO, text: str) -> None:
        """Print ``text`` on ``out`` (the counter erased first)."""
        with self._lock:
            self._erase()
            out.write(text)
            out.flush()
            self._last = time.monotonic()

    def _run(self) -> None:
        spinner = "|/-\\"
        frame = 0
        while not self._stop.wait(PROGRESS_TICK_S):
            with self._lock:
                now = time.monotonic()
                if now - self._last < PROGRESS_AFTER_S:
                    continue
                seconds = f"{now - self._start:.0f} s"
                label = f"{self.count()} tokens, {seconds}" if self.count is not None else seconds
                # save cursor, label, clear the rest of the line, restore cursor
                self.stream.write(f"\0337 [{spinner[frame % 4]} generating: {label}]\033[K\0338")
                self.stream.flush()
                self._shown = True
                frame += 1

    def _erase(self) -> None:
        if self._shown:
            self.stream.write("\033[K")
            self.stream.flush()
            self._shown = False


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False
