"""Streaming answers and timing generation, on top of transformers' streamers.

``VilaModel.stream_content`` runs ``generate`` in a worker thread with a ``TextIteratorStreamer`` and yields
its text pieces, stripped like the final answer so that the pieces joined equal ``generate_content``'s
string. ``TokenClock`` is the streamer ``generate`` always passes: it timestamps tokens for ``--stats``
and forwards everything to the caller's streamer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch


class TokenClock:
    """A ``generate`` streamer (``put`` / ``end``) recording when the first and the last new token came out;
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


class Cancel:
    """Stops a running ``generate`` from another thread (a stream closed early, Ctrl-C)."""

    def __init__(self) -> None:
        self.stop = False

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.stop, dtype=torch.bool, device=input_ids.device)


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


class TextStream:
    """Iterator over the pieces of one streamed answer; ``result`` is the ``GenerationResult`` once done."""

    def __init__(self, model: Any, prompt: Any, kwargs: dict[str, Any]):
        self.result: Any = None
        self._pieces = self._run(model, prompt, dict(kwargs))

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        """Stop generating (also what leaving a ``for`` loop early does, once the stream is collected)."""
        self._pieces.close()

    def _run(self, model: Any, prompt: Any, kwargs: dict[str, Any]) -> Iterator[str]:
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        streamer = TextIteratorStreamer(model.tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancel = Cancel()
        kwargs["stopping_criteria"] = StoppingCriteriaList([cancel, *(kwargs.get("stopping_criteria") or [])])
        box: dict[str, Any] = {}

        def work() -> None:
            try:
                box["result"] = model.generate(prompt, streamer=streamer, **kwargs)
            except BaseException as e:  # noqa: BLE001 - handed to the consuming thread
                box["error"] = e
            finally:
                streamer.end()  # unblocks the consumer when generate failed before it began

        thread = threading.Thread(target=work, name="vila-generate", daemon=True)
        thread.start()
        sent = ""
        try:
            for piece in strip_pieces(streamer):
                sent += piece
                yield piece
            thread.join()
            if "error" in box:
                raise box["error"]
            self.result = box["result"]
            # The streamer decodes incrementally; the final decode is authoritative for the tail.
            text = self.result.text
            if len(text) > len(sent) and text.startswith(sent):
                yield text[len(sent) :]
        finally:
            cancel.stop = True
            thread.join()
