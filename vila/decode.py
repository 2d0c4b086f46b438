"""The decode loop: many prompts' embeddings in, their new token ids out.

One prefill for all rows (left-padded), then one forward per step for the rows still alive. Two ways to keep the
key/value cache:

* dynamic (default): transformers' ``DynamicCache``, grown by one column per step. A row that finishes leaves the
  batch at once (its cache rows and tensors are dropped), so the remaining steps cost less.
* static (``static=True``, optionally ``compile=True``): a preallocated ``StaticCache`` whose length is rounded up
  to a bucket, so the one-token step always sees the same shapes and ``torch.compile`` (CUDA graphs on CUDA) can
  replay it without recompiling for every prompt length. Finished rows stay in the batch as dead rows whose
  tokens are ignored: dropping them would change the batch shape, i.e. another graph to compile and record, and
  at decode sizes a step is bound by reading the weights, not by the number of rows.

Greedy tokens equal ``llm.generate(inputs_embeds=..., do_sample=False)`` row by row: the prefill passes the same
mask and position ids as ``generate`` (no mask when no row is padded), logits are the last position's in
float32, the vocabulary mask and the caller's processors run before the sampling warpers, in ``generate``'s order.

Nothing is stored on ``llm``: compiled step functions are module-level (their graphs are keyed by shapes), and
static caches are kept for reuse in a pool keyed weakly by ``llm``, taken and given back under a lock.

Threads: PyTorch keeps CUDA graphs per thread (inductor's CUDA-graph trees live in thread-local storage), and
callers come from many threads (a worker thread per stream, the server's scheduler thread, the caller's own).
Every new thread would warm up and record its graphs again, each into a memory pool of its own, and a thread
that ends leaves its recordings behind for nobody. So every decode that uses CUDA graphs runs on one long-lived
thread (:class:`_GraphThread`), one call at a time: graphs are recorded once per process and shape and
replayed by every later caller, whatever thread it is on. Calls without CUDA graphs (eager, or compiled without
them on CPU) run on the caller's thread as before. So do streams (:func:`without_cuda_graphs`, set by ``vila.engine.stream_content``): a stream's per-token hook waits
until its reader takes each piece, so a stream on the shared thread would stall every other caller while its
reader is elsewhere (for ever, if that reader is waiting on another stream); a stream's decode compiles without
CUDA graphs on its own thread instead (inductor's fused kernels, launched one by one).
"""

from __future__ import annotations

import inspect
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

# Static caches are sized to a multiple of this many positions, so that prompts of nearby lengths share one
# compiled graph (and one CUDA graph) instead of compiling one per length.
BUCKET = 256
# Idle static caches kept per llm for reuse (see _CachePool).
POOL_KEEP = 2


@dataclass(frozen=True)
class Sampling:
    """Multinomial sampling as ``generate(do_sample=True)``: temperature (if != 1), top-k (if != 0), top-p (if < 1).

    ``generator`` makes a row's draws independent of the global RNG; without it ``torch.manual_seed`` governs
    them exactly as it does for ``generate``."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    generator: torch.Generator | None = field(default=None, compare=False)


@dataclass
class DecodeRow:
    """One prompt to continue.

    ``embeds``: (L, D) input embeddings with the media already spliced in. ``max_new_tokens``: the budget, already
    capped to the context by the caller. ``stop_ids``: the row ends after emitting one (it is part of the output).
    ``processors``: transformers-style logits processors ``(input_ids (1, T_new), scores (1, V) float32) -> scores``
    where ``input_ids`` hold only the tokens generated so far (as ``generate`` gives them with ``inputs_embeds``).
    ``sampling``: None for greedy. ``on_token``: called with each new token; returning True ends the row there
    (cancellation, stop strings)."""

    embeds: torch.Tensor
    max_new_tokens: int
    stop_ids: Collection[int]
    processors: Sequence[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = ()
    sampling: Sampling | None = None
    on_token: Callable[[int], bool] | None = None


def decode(
    llm: Any,
    rows: Sequence[DecodeRow],
    *,
    vocab_limit: int | None = None,
    static: bool = False,
    compile: bool = False,
) -> list[list[int]]:
    """New token ids per row: up to and including its stop token, at most its ``max_new_tokens``.

    ``vocab_limit``: ids at or above it are never emitted (checkpoints whose LM head is wider than the tokenizer).
    ``static``: preallocated, bucketed KV cache; ``compile``: also ``torch.compile`` the one-token step (implies
    ``static``; CUDA graphs on CUDA). The prefill always runs eagerly: its shape changes with every prompt."""
    if not rows:
        return []
    for row in rows:
        if row.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {row.max_new_tokens}; cap it before calling decode")
        if row.embeds.ndim != 2:
            raise ValueError(f"DecodeRow.embeds must be (L, D), got shape {tuple(row.embeds.shape)}")
    states = [_RowState(row) for row in rows]
    if compile and _needs_graph_thread(rows[0].embeds.device):
        device = rows[0].embeds.device
        _GRAPHS.call(states, lambda: _on_device(device, lambda: _decode_static(llm, states, vocab_limit, True)))
        return [s.tokens for s in states]
    with torch.no_grad():
        if static or compile:
            _decode_static(llm, states, vocab_limit, compile)
        else:
            _decode_dynamic(llm, states, vocab_limit)
    return [s.tokens for s in states]


# -- per-row bookkeeping ---------------------------------------------------------------------------------------


class _RowState:
    """A row's tokens so far, its warpers and whether it has ended."""

    def __init__(self, row: DecodeRow):
        self.row = row
        self.tokens: list[int] = []
        self.done = False
        self.stops = frozenset(row.stop_ids)
        self.warpers = _warpers(row.sampling) if row.sampling is not None else []
        self.abandoned = False  # the caller stopped waiting (interrupted while a graph thread decoded for it)

    def push(self, token: int) -> None:
        """Record a token and decide whether the row ends with it."""
        self.tokens.append(token)
        ended = token in self.stops or len(self.tokens) >= self.row.max_new_tokens or self.abandoned
        if self.row.on_token is not None and self.row.on_token(token):
            ended = True
        self.done = ended


def _warpers(s: Sampling) -> list[Any]:
    """transformers' own warpers, in the order ``GenerationMixin._get_logits_processor`` appends them, so that a
    seeded sampled row draws the same tokens as ``generate``."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    out: list[Any] = []
    if s.temperature != 1.0:
        out.append(TemperatureLogitsWarper(s.temperature))
    if s.top_k:
        out.append(TopKLogitsWarper(top_k=s.top_k))
    if s.top_p < 1.0:
        out.append(TopPLogitsWarper(top_p=s.top_p))
    return out


def choose(logits: torch.Tensor, states: Sequence[_RowState | None], vocab_limit: int | None) -> list[int]:
    """Next token per batch row from float32 last-position ``logits`` (B, V); a None state is a dead row (any token).

    Order as ``generate``: vocabulary mask and the row's processors, then the sampling warpers, then argmax or
    softmax + ``torch.multinomial``."""
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        logits[:, vocab_limit:] = float("-inf")
    out = logits.argmax(-1).tolist()
    for i, s in enumerate(states):
        if s is None or (not s.row.processors and s.row.sampling is None):
            continue
        scores = logits[i : i + 1]
        if s.row.processors or s.warpers:
            ids = torch.tensor([s.tokens], dtype=torch.long, device=logits.device)
            for p in (*s.row.processors, *s.warpers):
                scores = p(ids, scores)
        if s.row.sampling is None:
            out[i] = int(scores.argmax(-1))
        else:
            probs = torch.nn.functional.softmax(scores, dim=-1)
            out[i] = int(torch.multinomial(probs, num_samples=1, generator=s.row.sampling.generator))
    return out


# -- prefill inputs ----------------------------------------------------------------------------------------------


def _left_pad(states: Sequence[_RowState], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, width, D) embeddings right-aligned and the (B, width) 0/1 mask of real positions."""
    first = states[0].row.embeds
    embeds = first.new_zeros(len(states), width, first.shape[-1])
    mask = torch.zeros(len(states), width, dtype=torch.long, device=first.device)
    for i, s in enumerate(states):
        n = s.row.embeds.shape[0]
        embeds[i, width - n :] = s.row.embeds.to(first.device, first.dtype)
        mask[i, width - n :] = 1
    return embeds, mask


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids as ``generate`` derives them from the mask: counting real tokens, 0 on padding."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def _forward_kwargs(llm: Any, cache: Any) -> dict[str, Any]:
    """The cache argument under the name this transformers version's forward takes (``cache`` in recent 5.x
    releases, ``past_key_values`` in earlier ones), and ``logits_to_keep=1`` as ``generate`` passes it."""
    params = _forward_params(type(llm))
    out: dict[str, Any] = {"use_cache": True, ("cache" if "cache" in params else "past_key_values"): cache}
    if "logits_to_keep" in params:
        out["logits_to_keep"] = 1
    return out


_PARAMS: dict[type, frozenset[str]] = {}


def _forward_params(cls: type) -> frozenset[str]:
    if cls not in _PARAMS:
        _PARAMS[cls] = frozenset(inspect.signature(cls.forward).parameters)
    return _PARAMS[cls]


def _last_logits(out: Any) -> torch.Tensor:
    # A copy in float32, as generate takes it, so the next forward cannot overwrite it.
    return out.logits[:, -1].to(dtype=torch.float32, copy=True)


# -- dynamic cache: rows leave as they finish --------------------------------------------------------------------


def _decode_dynamic(llm: Any, states: list[_RowState], vocab_limit: int | None) -> None:
    """Prefill, then one forward per step over the live rows; finished rows are cut out of the cache."""
    from transformers import DynamicCache

    width = max(s.row.embeds.shape[0] for s in states)
    embeds, mask = _left_pad(states, width)
    pos = _positions(mask)
    padded = bool((mask == 0).any())
    cache = DynamicCache(config=llm.config)
    kw = _forward_kwargs(llm, cache)
    out = llm(inputs_embeds=embeds, attention_mask=mask if padded else None, position_ids=pos, **kw)
    logits = _last_logits(out)
    del out, embeds

    live = list(range(len(states)))  # batch row -> index into states
    pos = pos[:, -1:]
    while True:
        tokens = choose(logits, [states[i] for i in live], vocab_limit)
        for i, t in zip(live, tokens):
            states[i].push(t)
        keep = [k for k, i in enumerate(live) if not states[i].done]
        if not keep:
            return
        ids = torch.tensor(tokens, dtype=torch.long, device=pos.device)[:, None]
        if len(keep) < len(live):
            index = torch.tensor(keep, device=pos.device)
            cache.batch_select_indices(index)
            ids, pos, mask = ids[index], pos[index], mask[index]
            live = [live[k] for k in keep]
        pos = pos + 1
        if padded:
            mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=-1)
        out = llm(input_ids=ids, attention_mask=mask if padded else None, position_ids=pos, **kw)
        logits = _last_logits(out)
        del out


# -- static cache: fixed shapes, optionally compiled ---------------------------------------------------------------


def bucket(n: int) -> int:
    """Cache length for ``n`` positions: ``n`` rounded up to a multiple of :data:`BUCKET`."""
    return -(-n // BUCKET) * BUCKET


def _batch_bucket(n: int) -> int:
    """Static batch size: the next power of two, so that batches of 5..8 rows share one graph."""
    return 1 << (n - 1).bit_length()


def _decode_static(llm: Any, states: list[_RowState], vocab_limit: int | None, compiled: bool) -> None:
    """Prefill into a preallocated cache, then the one-token step at fixed shapes (compiled if asked).

    The batch is padded to a power of two with dummy rows, and rows that finish stay as dead rows: the step's
    shapes never change during a call, and calls of nearby sizes reuse the same graphs."""
    width = max(s.row.embeds.shape[0] for s in states)
    need = width + max(s.row.max_new_tokens for s in states)
    length, batch = bucket(need), _batch_bucket(len(states))
    embeds, mask = _left_pad(states, width)
    if batch > len(states):
        # Dummy rows see only their last position, so their attention is never over an empty set.
        extra = batch - len(states)
        embeds = torch.cat([embeds, embeds.new_zeros(extra, width, embeds.shape[-1])])
        mask = torch.cat([mask, mask.new_zeros(extra, width)])
        mask[len(states) :, -1] = 1
    pos = _positions(mask)
    # The mask spans the whole cache; positions not written yet are hidden by causality, so it never changes.
    full = torch.cat([mask, mask.new_ones(batch, length - width)], dim=-1)

    graphs = compiled and uses_cuda_graphs(embeds.device)
    step = _compiled_step(embeds.device, graphs) if compiled else _step
    with _pooled_cache(llm, length, batch, embeds) as cache:
        kw = _forward_kwargs(llm, cache)
        out = llm(inputs_embeds=embeds, attention_mask=full, position_ids=pos, **kw)
        logits = _last_logits(out)
        del out, embeds
        pos = pos[:, -1:]
        alive: list[_RowState | None] = [*states, *([None] * (batch - len(states)))]
        while True:
            tokens = choose(logits, alive, vocab_limit)
            for k, s in enumerate(alive):
                if s is not None:
                    s.push(tokens[k])
                    if s.done:
                        alive[k] = None
            if all(s is None for s in alive):
                return
            ids = torch.tensor(tokens, dtype=torch.long, device=pos.device)[:, None]
            pos = pos + 1
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            logits = step(llm, ids, pos, full, cache).clone()


def _step(llm: Any, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, cache: Any) -> torch.Tensor:
    """One token per row at fixed shapes: the function ``torch.compile`` sees."""
    out = llm(input_ids=ids, attention_mask=mask, position_ids=pos, **_forward_kwargs(llm, cache))
    return out.logits[:, -1].float()


_COMPILED: dict[tuple[str, str, bool], Callable[..., torch.Tensor]] = {}
_COMPILE_LOCK = threading.Lock()


def _compiled_step(device: torch.device, graphs: bool) -> Callable[..., torch.Tensor]:
    """``torch.compile`` of :func:`_step`, one per device type and ``graphs``: CUDA graphs (``reduce-overhead``)
    on CUDA, where launch overhead dominates a one-token step; inductor's default elsewhere and for streams.
    Graphs are keyed by the step's shapes (batch bucket, cache bucket), so a call of a new size compiles once
    and later calls reuse it."""
    key = (device.type, _backend(device), graphs)
    with _COMPILE_LOCK:
        if key not in _COMPILED:
            mode = "reduce-overhead" if graphs else None
            _COMPILED[key] = torch.compile(_step, mode=mode, fullgraph=True, backend=key[1])
        return _COMPILED[key]


def uses_cuda_graphs(device: torch.device) -> bool:
    """Whether a compiled step called from this thread replays CUDA graphs on ``device`` (inductor's
    ``reduce-overhead`` on CUDA, unless inside :func:`without_cuda_graphs`)."""
    return device.type == "cuda" and _backend(device) == "inductor" and not getattr(_LOCAL, "no_graphs", False)


_LOCAL = threading.local()


class without_cuda_graphs:
    """Within this block, this thread's compiled decodes run on this thread without CUDA graphs (for streams,
    whose hooks wait on their reader; see the module docstring)."""

    def __enter__(self) -> None:
        self.before = getattr(_LOCAL, "no_graphs", False)
        _LOCAL.no_graphs = True

    def __exit__(self, *exc: Any) -> None:
        _LOCAL.no_graphs = self.before


class _GraphThread:
    """The one long-lived thread on which every decode with CUDA graphs runs (see the module docstring).

    Started on first use, a daemon. A call from that thread itself (an ``on_token`` hook that decodes again)
    runs inline instead of waiting on itself. A caller interrupted while waiting (Ctrl-C in the main thread)
    ends its rows at their next token and waits for the thread to let go of them before the interrupt goes on."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.queue: Any = None

    def call(self, states: Sequence[_RowState], work: Callable[[], None]) -> None:
        if threading.current_thread() is self.thread:
            with torch.no_grad():
                work()
            return
        done, box = threading.Event(), []
        self._start().put((work, done, box))
        try:
            done.wait()
        except BaseException:
            for s in states:
                s.abandoned = True
            done.wait()
            raise
        if box:
            raise box[0]

    def _start(self) -> Any:
        import queue

        with self.lock:
            if self.thread is None:
                self.queue = queue.SimpleQueue()
                self.thread = threading.Thread(target=self._loop, name="vila-cuda-graphs", daemon=True)
                self.thread.start()
            return self.queue

    def _loop(self) -> None:
        while True:
            work, done, box = self.queue.get()
            try:
                with torch.no_grad():  # grad mode is per thread
                    work()
            except BaseException as e:  # noqa: BLE001 - raised again in the calling thread
                box.append(e)
            finally:
                del work
                done.set()


_GRAPHS = _GraphThread()


def _needs_graph_thread(device: torch.device) -> bool:
    return uses_cuda_graphs(device)


def _on_device(device: torch.device, work: Callable[[], None]) -> None:
    # The current CUDA device is per thread too: the graph thread's default is cuda:0, the model's may not be.
    if device.type != "cuda":
        work()
        return
    with torch.cuda.device(device):
        work()


def _backend(device: torch.device) -> str:
    """Inductor needs a C compiler on CPU; without one, ``aot_eager`` still traces the step as one graph.
    ``VILA_COMPILE_BACKEND`` overrides it (the tests use ``aot_eager``, which compiles in seconds)."""
    import os
    import shutil

    if os.environ.get("VILA_COMPILE_BACKEND"):
        return os.environ["VILA_COMPILE_BACKEND"]
    if device.type != "cpu" or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang"):
        return "inductor"
    return "aot_eager"


class _CachePool:
    """Static caches kept between calls, keyed weakly by the llm: a compiled step with CUDA graphs captures the
    cache's addresses, so reusing the same tensors avoids recording a new graph every call. A cache is taken
    out under the lock and given back when its call ends, so concurrent calls never share one. At most
    :data:`POOL_KEEP` idle caches are kept per llm (the most recently used shapes): a cache of a long context at
    batch 16 is gigabytes on an 8B model, and a server sees many shapes."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.free: weakref.WeakKeyDictionary[Any, OrderedDict[tuple, list[Any]]] = weakref.WeakKeyDictionary()

    def take(self, llm: Any, key: tuple) -> Any | None:
        with self.lock:
            caches = self.free.get(llm, OrderedDict()).get(key)
            return caches.pop() if caches else None

    def give(self, llm: Any, key: tuple, cache: Any) -> None:
        with self.lock:
            shelf = self.free.setdefault(llm, OrderedDict())
            shelf.setdefault(key, []).append(cache)
            shelf.move_to_end(key)
            while sum(len(c) for c in shelf.values()) > POOL_KEEP:
                oldest = next(iter(shelf))
                shelf[oldest].pop(0)
                if not shelf[oldest]:
                    del shelf[oldest]

    def idle(self, llm: Any) -> int:
        with self.lock:
            return sum(len(c) for c in self.free.get(llm, {}).values())


_POOL = _CachePool()


class _pooled_cache:
    """A reset ``StaticCache`` of ``length`` positions for ``batch`` rows, returned to the pool afterwards."""

    def __init__(self, llm: Any, length: int, batch: int, like: torch.Tensor):
        self.llm, self.key = llm, (length, batch, like.dtype, like.device)
        self.length = length

    def __enter__(self) -> Any:
        from transformers import StaticCache

        self.cache = _POOL.take(self.llm, self.key)
        if self.cache is None:
            self.cache = StaticCache(config=self.llm.config, max_cache_len=self.length)
        else:
            self.cache.reset()
        return self.cache

    def __exit__(self, *exc: Any) -> None:
        _POOL.give(self.llm, self.key, self.cache)
