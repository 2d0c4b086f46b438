"""The one generation path: requests in, :class:`GenerationResult` out.

Every entry point stands on :func:`run`: ``model.generate`` / ``generate_content`` / ``stream_content``, chat
sessions, ``vila-infer --batch`` and its shards and Ray actors, and the server's scheduler. A call:

1. validates each request's settings (nothing is decoded for a request that cannot run);
2. prepares the prompts through ``model.prepare_many``, requests with the same template and media settings
   together, so media not yet in the feature cache go through the vision tower together;
3. checks each prompt against the context and caps ``max_new_tokens`` at what the context leaves;
4. builds each request's logits processors (:func:`logits_processors`: JSON mode, the caller's own);
5. decodes with :func:`vila.decode.decode`: greedy requests without processors share one batch (their answers
   equal one-by-one answers), sampled and JSON-mode requests run alone, so that a seed and a grammar behave as
   in a single call. Each row streams and can be cancelled on its own (``on_token``, ``cancel``);
6. decodes the text (and the time tokens of video answers when asked).

How :func:`vila.decode.decode` keeps the cache is the model's setting ``model.compile_mode`` (``vila.load(...,
compile=...)``, :func:`fast_decode`): on CUDA by default a static cache and a compiled, CUDA-graph one-token step;
elsewhere the eager dynamic cache unless asked.

A caller's ``generation_config`` (a ``transformers.GenerationConfig``, used as is) that asks for what
:func:`vila.decode.decode` does not do (beam search, a repetition penalty, ...) is the one case that runs the
LLM's own ``generate`` (:func:`_hf_generate`).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .cache import FeatureCache
from .decode import DecodeRow, Sampling, decode, without_cuda_graphs
from .errors import PromptTooLongError, UsageError, VilaError
from .processor import PreparedPrompt, to_turns
from .prompt import Template, get_template
from .streaming import TextStream, TokenClock
from .structured import ResponseFormat, json_logits_processor, parse_response_format
from .tokenizer import infer_stop_token_ids

# The keyword arguments of ``generate`` that are not media settings (those are ``model.media_settings``).
GENERATION_SETTINGS = (
    "max_new_tokens",
    "do_sample",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "generation_config",
    "conv_mode",
    "template",
    "decode_time_tokens",
    "streamer",
    "logits_processor",
    "stopping_criteria",
    "response_format",
    "cache",
)
BASE_MEDIA_SETTINGS = ("num_video_frames", "fps", "video_max_tiles")
# GenerationConfig fields decode() reproduces; any other field set on a caller's config runs the LLM's generate.
_DECODE_FIELDS = frozenset(
    {
        "max_new_tokens",
        "do_sample",
        "temperature",
        "top_p",
        "top_k",
        "eos_token_id",
        "pad_token_id",
        "bos_token_id",
        "transformers_version",
        "_from_model_config",
    }
)
# Fields set to what decode() does anyway.
_NEUTRAL: dict[str, Any] = {"num_beams": 1, "repetition_penalty": 1.0, "use_cache": True, "num_return_sequences": 1}


@dataclass
class GenerationResult:
    """What one request produced."""

    text: str
    token_ids: list[int]  # new tokens, up to and including the stop token
    num_prompt_tokens: int  # LLM input positions (text + media embeddings)
    media_tokens: list[int]
    video_durations: list[float]
    timings: dict[str, float]
    finish_reason: str = "stop"  # "stop" (a stop token or criterion), "length" (the budget) or "cancelled"


@dataclass
class Request:
    """One request for :func:`run`. ``settings``: the keyword arguments of ``model.generate``. ``on_token`` is
    called with each new token id (from the generating thread) and ends this request when it returns True;
    ``cancel`` is polled before the request starts and after each token, and ends it when it returns True."""

    prompt: Any
    settings: dict[str, Any] = field(default_factory=dict)
    on_token: Callable[[int], bool] | None = None
    cancel: Callable[[], bool] | None = None


def request_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """A request row's settings (``--batch``, the server) -> ``generate`` keyword arguments: there a temperature
    above 0 asks for sampling, where ``generate`` itself samples only with ``do_sample=True``."""
    return {**settings, "do_sample": (settings.get("temperature") or 0) > 0}


def generate(
    model: Any,
    prompt: Any,
    *,
    on_token: Callable[[int], bool] | None = None,
    cancel: Callable[[], bool] | None = None,
    **settings: Any,
) -> GenerationResult:
    """One request through :func:`run`; its error is raised."""
    (result,) = run(model, [Request(prompt, settings, on_token, cancel)])
    return result


def stream_content(model: Any, prompt: Any, **settings: Any) -> TextStream:
    """A :class:`vila.streaming.TextStream` over the answer's pieces (see ``VilaModel.stream_content``)."""
    if settings.get("streamer") is not None:
        raise UsageError("stream_content makes its own streamer; call generate(streamer=...) to use yours")
    if settings.get("decode_time_tokens"):
        raise UsageError("time tokens cannot be rewritten while streaming; call generate_content for video answers")

    def work(on_token: Callable[[int], bool]) -> GenerationResult:
        # In the stream's own worker thread: its hook waits on the reader, so it must not hold the one thread
        # that replays CUDA graphs for every other caller (see vila.decode).
        with without_cuda_graphs():
            return generate(model, prompt, on_token=on_token, **settings)

    return TextStream(model.tokenizer, work)


def run(model: Any, requests: Sequence[Request], *, return_errors: bool = False) -> list[Any]:
    """Answer ``requests``; a :class:`GenerationResult` per request, in order.

    With ``return_errors`` a request that fails gets its exception in place of a result and the others go on
    (a batch that fails as a whole, e.g. out of memory, is retried request by request first); without, the
    first error is raised."""
    t_start = time.perf_counter()
    jobs: list[_Job] = []
    out: list[Any] = [None] * len(requests)

    def fail(job: _Job, error: Exception) -> None:
        if not return_errors:
            raise error
        job.error = error
        out[job.index] = error

    for i, request in enumerate(requests):
        try:
            jobs.append(_Job.parse(model, i, request, t_start))
        except VilaError as e:
            fail(_Job.failed(i, request), e)

    _prepare(model, [j for j in jobs if j.error is None and not j.is_cancelled()], fail, return_errors)
    for job in jobs:
        if job.error is None and job.prepared is not None:
            try:
                job.plan(model)
            except VilaError as e:
                fail(job, e)

    live = [j for j in jobs if j.error is None and j.prepared is not None]
    batches: dict[Any, list[_Job]] = {}
    for job in live:
        key = job.batch_key()
        batches.setdefault(key if key is not None else ("alone", job.index), []).append(job)
    for group in batches.values():
        _decode_group(model, group, fail, return_errors)

    for job in jobs:
        if job.error is None:
            out[job.index] = job.result(model)
    return out


def _prepare(model: Any, jobs: list[_Job], fail: Callable[[_Job, Exception], None], return_errors: bool) -> None:
    """``model.prepare_many`` per group of jobs with the same template, media settings and cache."""
    groups: dict[Any, list[_Job]] = {}
    for job in jobs:
        groups.setdefault(job.prepare_key(), []).append(job)
    for group in groups.values():
        head = group[0]
        extra = {"cache": head.cache} if head.cache is not None else {}
        try:
            prepared = model.prepare_many(
                [j.turns for j in group], template=head.template, return_errors=True, **head.media, **extra
            )
        except Exception as e:  # noqa: BLE001 - e.g. out of memory for the whole group: each alone below
            if len(group) == 1 or not return_errors:
                fail(head, e)
                continue
            _release_memory(e)
            prepared = []
            for job in group:
                try:
                    prepared += model.prepare_many(
                        [job.turns], template=job.template, return_errors=True, **job.media, **extra
                    )
                except Exception as e1:  # noqa: BLE001 - this request's own failure
                    _release_memory(e1)
                    prepared.append(e1)
        for job, p in zip(group, prepared):
            if isinstance(p, Exception):
                fail(job, p)
            else:
                job.prepared = p


def _decode_group(model: Any, group: list[_Job], fail: Callable[[_Job, Exception], None], return_errors: bool) -> None:
    """Decode ``group`` as one batch; when a batch fails before any of its rows produced a token (out of memory
    at the prefill), each row is tried alone."""
    todo = [j for j in group if not j.is_cancelled()]
    if not todo:
        return
    try:
        _decode(model, todo)
        return
    except Exception as e:  # noqa: BLE001 - reported per request, or retried alone
        if len(todo) == 1 or not return_errors or any(j.ids for j in todo):
            for job in todo:
                fail(job, e)
            return
        _release_memory(e)
    for job in todo:
        try:
            _decode(model, [job])
        except Exception as e:  # noqa: BLE001 - this request's own failure
            _release_memory(e)
            fail(job, e)


def _decode(model: Any, jobs: list[_Job]) -> None:
    head = jobs[0]
    if head.seed is not None and head.hf_config is not None:
        torch.manual_seed(head.seed)  # the LLM's generate draws from the global generator
    elif head.seed is not None and head.sampling is not None:
        # A generator of the request's own, seeded as torch.manual_seed would seed the global one (the same draws),
        # so that a seed gives the same answer whatever other requests draw meanwhile in other threads.
        device = model.llm.get_output_embeddings().weight.device  # where the logits are drawn from
        head.sampling = replace(head.sampling, generator=torch.Generator(device).manual_seed(head.seed))
    t0 = time.perf_counter()
    for job in jobs:
        job.start(t0)
    try:
        if jobs[0].hf_config is not None:
            jobs[0].ids = _hf_generate(model, jobs[0])
            return
        rows = [
            DecodeRow(
                embeds=job.prepared.inputs_embeds,
                max_new_tokens=job.budget,
                stop_ids=job.stop_ids,
                processors=tuple(job.processors),
                sampling=job.sampling,
                on_token=job.step,
            )
            for job in jobs
        ]
        fast = fast_decode(model, rows[0].embeds.device)
        try:
            with torch.no_grad():
                new = decode(
                    model.llm, rows, vocab_limit=model.num_generatable, static=fast or jobs[0].static, compile=fast
                )
        except Exception as e:
            # "auto" promised speed, not a new failure: a step the compiler cannot handle (an LLM class it cannot
            # trace, a missing toolchain) falls back to eager once for this model, when nothing was streamed yet.
            if not fast or model_compile_mode(model) != "auto" or any(j.ids for j in jobs) or not _compiler_error(e):
                raise
            warnings.warn(
                f"the compiled decode step failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                "decoding eagerly from now on; load with compile=False (--compile off) to skip the attempt",
                stacklevel=2,
            )
            model._compile_failed = True
            with torch.no_grad():
                new = decode(model.llm, rows, vocab_limit=model.num_generatable, static=jobs[0].static)
        for job, ids in zip(jobs, new):
            job.ids = list(ids)
    finally:
        t1 = time.perf_counter()
        for job in jobs:
            job.end(t1)


COMPILE_MODES = ("auto", "on", "off")


def compile_mode(value: bool | str | None) -> str:
    """``vila.load(compile=...)`` / ``--compile`` as one of :data:`COMPILE_MODES` (True = "on", False = "off")."""
    if value is None:
        return "auto"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, str) and value.lower() in COMPILE_MODES:
        return value.lower()
    raise UsageError(f"compile must be 'auto', True ('on') or False ('off'), got {value!r}")


def model_compile_mode(model: Any) -> str:
    return getattr(model, "compile_mode", "auto")


def fast_decode(model: Any, device: torch.device) -> bool:
    """Whether requests on ``device`` decode with the static cache and the compiled step.

    "auto": on CUDA only, where a one-token step launches hundreds of small kernels and CUDA graphs replay
    them as one; on CPU and MPS there is no launch overhead to remove and compiling costs seconds per new shape,
    so there it is opt-in ("on"). Also not under "auto": an LLM spread over devices or quantised by
    bitsandbytes (its kernels do not compile into one graph), or a model whose compiled step failed once."""
    mode = model_compile_mode(model)
    if mode != "auto":
        return mode == "on"
    if device.type != "cuda" or getattr(model, "_compile_failed", False):
        return False
    llm = model.llm
    if getattr(llm, "is_quantized", False) or getattr(llm, "hf_quantizer", None) is not None:
        return False
    return len({str(d) for d in (getattr(llm, "hf_device_map", None) or {}).values()}) <= 1


def _compiler_error(error: BaseException) -> bool:
    """Whether ``error`` came from ``torch.compile`` or CUDA-graph capture (not from the model or a caller's hook)."""
    import traceback

    if isinstance(error, torch.OutOfMemoryError):
        return False
    dynamo = getattr(getattr(torch, "_dynamo", None), "exc", None)
    if dynamo is not None and isinstance(error, dynamo.TorchDynamoException):
        return True
    files = [f.filename.replace("\\", "/") for f in traceback.extract_tb(error.__traceback__)]
    return any(part in f for f in files for part in ("torch/_dynamo/", "torch/_inductor/", "torch/cuda/graphs.py"))


def _hf_generate(model: Any, job: _Job) -> list[int]:
    """The caller's ``generation_config`` through the LLM's own ``generate``, with the same processors (and the
    mask of ids past the tokenizer) and the same per-token hook as :func:`vila.decode.decode`."""
    from transformers import LogitsProcessorList, StoppingCriteriaList

    embeds = job.prepared.inputs_embeds[None]
    # The mask first, as decode() applies it: a processor never sees scores of ids that cannot be emitted.
    processors = LogitsProcessorList([_MaskTail(model.num_generatable), *job.processors])
    with torch.no_grad():
        out = model.llm.generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device),
            generation_config=job.hf_config,
            logits_processor=processors,
            stopping_criteria=StoppingCriteriaList([_StepCriterion(job)]),
        )
    return out[0].tolist()


class _StepCriterion:
    """:meth:`_Job.step` as a stopping criterion of the LLM's ``generate`` (its input ids are the new tokens)."""

    def __init__(self, job: _Job):
        self.job = job

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        stop = self.job.step(int(input_ids[0, -1]))
        return torch.tensor([stop], dtype=torch.bool, device=input_ids.device)


class _MaskTail:
    """Never emit ids at or beyond ``len(tokenizer)``: the reference's ``resize_token_embeddings`` cut those
    LM-head rows off, so a padded vocabulary can never produce them (``decode`` does it with ``vocab_limit``)."""

    def __init__(self, limit: int):
        self.limit = limit

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores[:, self.limit :] = -float("inf")
        return scores


class _Job:
    """One request on its way through :func:`run`."""

    def __init__(self, index: int, request: Request):
        self.index = index
        self.request = request
        self.error: Exception | None = None
        self.prepared: PreparedPrompt | None = None
        self.ids: list[int] = []
        self.processors: list[Any] = []
        self.cancelled = False
        self.stopped = False  # ended by a stopping criterion or the caller's on_token
        # Set by parse() from the request's settings:
        self.t_start = 0.0
        self.turns: list[Any] = []
        self.media: dict[str, Any] = {}
        self.template: Template | None = None
        self.stop_ids: tuple[int, ...] = ()
        self.cache: FeatureCache | None = None
        self.seed: int | None = None
        self.max_new_tokens: int | None = None
        self.sampling: Sampling | None = None
        self.static = False
        self.hf_config: Any = None  # a caller's GenerationConfig that decode() cannot follow
        self.json_format: ResponseFormat | None = None
        self.decode_time_tokens = False
        self.user_processors: list[Any] = []
        self.criteria: list[Any] = []
        self.clock = TokenClock(None)
        # Set on the way: the capped budget (plan), the LLM's start and its duration (start / end).
        self.budget = 0
        self.t_llm = 0.0
        self.generate_s: float | None = None

    @classmethod
    def failed(cls, index: int, request: Request) -> _Job:
        return cls(index, request)

    @classmethod
    def parse(cls, model: Any, index: int, request: Request, t_start: float) -> _Job:
        """Validate the settings before any media work; fail with what is wrong."""
        job = cls(index, request)
        s = dict(request.settings)
        media_names = tuple(getattr(model, "media_settings", BASE_MEDIA_SETTINGS))
        unknown = sorted(k for k in s if k not in GENERATION_SETTINGS and k not in media_names)
        if unknown:
            allowed = ", ".join(sorted({*GENERATION_SETTINGS, *media_names}))
            raise UsageError(f"unknown generation setting(s) {', '.join(unknown)}; allowed: {allowed}")
        validate_generation_args(
            s.get("max_new_tokens"),
            s.get("temperature"),
            s.get("top_p"),
            s.get("top_k"),
            s.get("num_video_frames"),
            s.get("fps"),
        )
        tiles = s.get("video_max_tiles")
        if tiles is not None and (not isinstance(tiles, int) or tiles < 1):
            raise UsageError(f"video_max_tiles must be a positive integer, got {tiles!r}")
        job.json_format = parse_response_format(s.get("response_format"))
        job.t_start = t_start
        job.turns = to_turns(request.prompt)
        job.media = {k: s[k] for k in media_names if s.get(k) is not None}
        conv_mode = s.get("conv_mode")
        template: Template | None = s.get("template")
        custom = template is not None or bool(conv_mode)
        job.template = template or (get_template(conv_mode) if conv_mode else model.template)
        job.stop_ids = tuple(infer_stop_token_ids(model.tokenizer, job.template) if custom else model.stop_token_ids)
        cache: FeatureCache | None = s.get("cache")
        job.cache = cache if cache is not None and model.supports_feature_cache else None
        job.seed = s.get("seed")
        job.max_new_tokens = s.get("max_new_tokens")
        temperature = s.get("temperature")
        do_sample = bool(s.get("do_sample")) and temperature != 0
        job.sampling = (
            Sampling(
                temperature=1.0 if temperature is None else temperature,
                top_p=1.0 if s.get("top_p") is None else s["top_p"],
                top_k=50 if s.get("top_k") is None else s["top_k"],
            )
            if do_sample
            else None
        )
        job.static = False
        job.hf_config = None
        config = s.get("generation_config")
        if config is not None:
            job.use_generation_config(config)
        job.decode_time_tokens = bool(s.get("decode_time_tokens"))
        job.user_processors = list(s.get("logits_processor") or [])
        job.criteria = list(s.get("stopping_criteria") or [])
        job.clock = TokenClock(s.get("streamer"))
        beams = getattr(job.hf_config, "num_beams", 1) or 1
        if beams > 1 and (request.on_token or s.get("streamer") is not None or job.criteria):
            raise UsageError(
                f"a generation_config with num_beams={beams} cannot be streamed or stopped per token (its rows are "
                "beam hypotheses, not the answer); drop the streamer / stopping criteria, or use num_beams=1"
            )
        return job

    def use_generation_config(self, config: Any) -> None:
        """A caller's ``GenerationConfig``, used as is: its budget, sampling and stop tokens; what decode() does
        not do runs the LLM's ``generate`` with it."""
        eos = config.eos_token_id
        self.stop_ids = () if eos is None else tuple([eos] if isinstance(eos, int) else eos)
        self.max_new_tokens = config.max_new_tokens
        diff = {k: v for k, v in config.to_diff_dict().items() if _NEUTRAL.get(k, _NEUTRAL) != v}
        cache = diff.pop("cache_implementation", None)
        if not set(diff) <= _DECODE_FIELDS or config.max_new_tokens is None or cache not in (None, "static"):
            self.hf_config = config
            return
        static = cache == "static"
        self.static = static
        self.sampling = (
            Sampling(
                temperature=1.0 if config.temperature is None else config.temperature,
                top_p=1.0 if config.top_p is None else config.top_p,
                top_k=50 if config.top_k is None else config.top_k,
            )
            if config.do_sample
            else None
        )

    def prepare_key(self) -> tuple[Any, ...]:
        # repr: media settings may be lists (VILA-HD's select_num_each_scale)
        # Templates by value (frozen dataclasses): requests with equal system prompts share one prepare_many.
        template: Any = self.template
        try:
            hash(template)
        except TypeError:  # a template built with unhashable fields: by identity
            template = id(template)
        return (template, repr(sorted(self.media.items())), id(self.cache))

    def plan(self, model: Any) -> None:
        """The context check, the budget and the logits processors, once the prompt is known."""
        p = self.prepared
        context = p.context_length or model.context_length
        check_fits(p, context)
        n = p.inputs_embeds.shape[0]
        if self.hf_config is None or self.hf_config.max_new_tokens is not None:
            self.budget = cap_new_tokens(self.max_new_tokens, context, n)
            if self.hf_config is not None and self.budget < self.hf_config.max_new_tokens:
                self.hf_config = _with_budget(self.hf_config, self.budget)
        else:  # the caller's config counts max_length, prompt included
            self.budget = self.hf_config.max_length - n if self.hf_config.max_length else context - n
        self.processors = logits_processors(model, self.user_processors, self.json_format, self.budget, self.stop_ids)

    def batch_key(self) -> tuple[Any, ...] | None:
        """Jobs with equal keys decode as one batch; None: this job decodes alone (sampling needs its seed, a
        processor may keep state per row, a caller's GenerationConfig is used as is)."""
        if self.sampling is not None or self.processors or self.hf_config is not None:
            return None
        return (self.stop_ids, self.static)

    def is_cancelled(self) -> bool:
        if not self.cancelled and self.request.cancel is not None and self.request.cancel():
            self.cancelled = True
        return self.cancelled

    def start(self, t0: float) -> None:
        self.t_llm = t0
        self.ids = []
        # The LLM's generate puts the prompt first (empty for embeddings-only input); streamers expect it.
        self.clock.put(torch.empty((1, 0), dtype=torch.long))

    def step(self, token: int) -> bool:
        """Called with each new token; True ends this request."""
        self.ids.append(token)
        self.clock.tick(token)
        stop = False
        if self.criteria:
            ids = torch.tensor([self.ids])
            for criterion in self.criteria:  # every criterion sees every token, as in the LLM's generate
                stop |= bool(torch.as_tensor(criterion(ids, None)).any())
        if self.request.on_token is not None and self.request.on_token(token):
            stop = True
        self.stopped = stop
        return stop or self.is_cancelled()

    def end(self, t1: float) -> None:
        self.generate_s = t1 - self.t_llm
        self.clock.end()

    def result(self, model: Any) -> GenerationResult:
        p = self.prepared
        if p is None:  # cancelled before it was prepared
            return GenerationResult("", [], 0, [], [], {}, "cancelled")
        text = model.tokenizer.decode(self.ids, skip_special_tokens=True).strip()
        if self.decode_time_tokens:
            text = model.decode_time_tokens(text, p.video_durations)
        if self.cancelled:
            reason = "cancelled"
        elif (self.ids and self.ids[-1] in self.stop_ids) or self.stopped:
            reason = "stop"
        else:
            reason = "length"
        timings = dict(p.timings)
        if self.generate_s is not None:
            timings.update(generate_s=self.generate_s, **self.clock.timings(self.t_start, self.t_llm))
        return GenerationResult(
            text=text,
            token_ids=list(self.ids),
            num_prompt_tokens=p.inputs_embeds.shape[0],
            media_tokens=p.media_tokens,
            video_durations=p.video_durations,
            timings=timings,
            finish_reason=reason,
        )


def _with_budget(config: Any, budget: int) -> Any:
    import copy

    config = copy.deepcopy(config)
    config.max_new_tokens = budget
    return config


def logits_processors(
    model: Any, extra: Sequence[Any], json_format: ResponseFormat | None, budget: int, stop_ids: Sequence[int]
) -> list[Any]:
    """The processors of one request, in the order they apply: the caller's, then JSON mode. (Ids past the
    tokenizer are masked by ``decode``'s ``vocab_limit``, or :class:`_MaskTail` on the LLM's generate.)"""
    processors = list(extra)
    if json_format is not None:
        processors.append(json_logits_processor(model, json_format, [budget], stop_ids))
    return processors


def check_fits(prepared: PreparedPrompt, context_length: int) -> None:
    """Raise :class:`PromptTooLongError` when the prompt leaves no room for an answer."""
    n = prepared.inputs_embeds.shape[0]
    if n >= context_length:
        media = ", ".join(str(m) for m in prepared.media_tokens) or "none"
        raise PromptTooLongError(
            f"the prompt needs {n} positions (media: {media}) but the model's context is {context_length}; "
            "use fewer or smaller images, fewer video frames (num_video_frames / --num-video-frames) or a lower fps"
        )


def cap_new_tokens(max_new_tokens: int | None, context_length: int, prompt_len: int) -> int:
    """``max_new_tokens``, or what the context leaves after the prompt when that is less (None: all of it).
    Past the context the model is outside the positions it was trained on and the answer is noise, so a larger
    request is capped, with a warning (worded the same for every prompt, so it is shown once)."""
    room = context_length - prompt_len
    if max_new_tokens is None:
        return room
    if max_new_tokens > room:
        warnings.warn(
            f"max_new_tokens={max_new_tokens} is more than the model's context ({context_length} positions, "
            "prompt included) has room for; the answer stops when the context is full",
            stacklevel=2,
        )
        return room
    return max_new_tokens


def validate_generation_args(
    max_new_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    num_video_frames: int | None,
    fps: float | None,
) -> None:
    """Raise :class:`UsageError` for a setting out of range (the API, ``--batch`` rows and the CLI's flags)."""
    if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or max_new_tokens < 1):
        raise UsageError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if temperature is not None and not (0 <= temperature <= 100):
        raise UsageError(f"temperature must be between 0 and 100 (0 = greedy), got {temperature!r}")
    if top_p is not None and not (0 < top_p <= 1):
        raise UsageError(f"top_p must be in (0, 1], got {top_p!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 0):
        raise UsageError(f"top_k must be a non-negative integer, got {top_k!r}")
    if num_video_frames is not None and (not isinstance(num_video_frames, int) or num_video_frames < 1):
        raise UsageError(f"num_video_frames must be a positive integer, got {num_video_frames!r}")
    if fps is not None and not fps >= 0:
        raise UsageError(f"fps must be >= 0 (0 = uniform sampling), got {fps!r}")


def _release_memory(error: BaseException) -> None:
    """After an out-of-memory error, hand the cached blocks back, so the requests retried alone get them."""
    if isinstance(error, torch.OutOfMemoryError) and torch.cuda.is_available():
        torch.cuda.empty_cache()
