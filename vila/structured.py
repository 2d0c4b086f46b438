"""JSON mode: answers constrained to a JSON object or to a JSON Schema (spec generation.md §8.5).

The grammar work is xgrammar's (the reference's choice; CPU and CUDA), installed with ``pip install
'vila[json]'``. ``response_format`` is what the reference and OpenAI-style APIs take::

    {"type": "json_object"}                                   # any JSON object
    {"type": "json_schema", "json_schema": {"schema": {...}}}  # an object valid under the schema
    {"type": "text"} or None                                  # unconstrained

Differences from the reference, on purpose: ``json_object`` means an *object* (the reference's builtin
grammar also allowed arrays and scalars, and treated ``"text"`` as JSON too), and whitespace is compact
instead of free, so a model cannot spend its budget on blank space. And the answer is always complete
JSON: when the token budget (``max_new_tokens`` or the context) is about to run out, decoding switches to
the shortest way of closing the open strings, arrays and objects, instead of stopping mid-string.
"""

from __future__ import annotations

import json
import os
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import UsageError

if TYPE_CHECKING:  # torch comes with the model; importing it here would slow down `vila-infer --help`-time errors
    import torch

INSTALL_HINT = "pip install 'vila[json]'"
_COMPACT = (",", ":")
# Tokens made only of these (or spelling a literal) are what the closing policy picks from.
_CLOSING_ALPHABET = frozenset(b'"{}[]:,0123456789')
_LITERALS = (b"true", b"false", b"null")
RECHECK_EVERY = 8  # steps between re-measuring how many tokens closing the JSON would take


@dataclass(frozen=True)
class ResponseFormat:
    """A validated ``response_format``: ``type`` is "json_object" or "json_schema" (with ``schema`` as JSON text)."""

    type: str
    schema: str | None = None


def require_xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError as e:
        raise UsageError(f"JSON mode needs the optional xgrammar package; install it with: {INSTALL_HINT}") from e
    return xgrammar


def parse_response_format(value: Any) -> ResponseFormat | None:
    """Normalise a ``response_format`` (dict, :class:`ResponseFormat`, or the reference's pydantic object)."""
    if value is None or isinstance(value, ResponseFormat):
        return value
    if not isinstance(value, dict):  # the reference's pydantic ResponseFormat: .type, .json_schema.schema_
        schema = getattr(getattr(value, "json_schema", None), "schema_", None)
        value = {"type": getattr(value, "type", None), "json_schema": {"schema": schema}}
    kind = value.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return ResponseFormat("json_object")
    if kind != "json_schema":
        raise UsageError(f"response_format type must be 'text', 'json_object' or 'json_schema', got {kind!r}")
    spec = value.get("json_schema")
    schema = spec.get("schema", spec.get("schema_")) if isinstance(spec, dict) else None
    if schema is None:
        raise UsageError('response_format json_schema needs {"json_schema": {"schema": {...}}}')
    return ResponseFormat("json_schema", validate_schema(schema))


def validate_schema(schema: Any, name: str = "the JSON schema") -> str:
    """The schema as JSON text, after checking that xgrammar can turn it into a grammar."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise UsageError(f"{name} is not valid JSON ({e}); give a JSON Schema object") from e
    if not isinstance(schema, (dict, bool)):
        raise UsageError(f"{name} must be a JSON object (a JSON Schema), got {type(schema).__name__}")
    text = json.dumps(schema)
    xgr = require_xgrammar()
    try:
        xgr.Grammar.from_json_schema(text, any_whitespace=False, separators=_COMPACT)
    except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError with the converter's message
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise UsageError(f"{name} is not a usable JSON Schema: {reason.split(': ', 1)[-1]}") from e
    return text


def load_schema_file(path: str | os.PathLike) -> ResponseFormat:
    """``--json-schema FILE``: a JSON file holding a JSON Schema."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError as e:
        raise UsageError(f"--json-schema file not found: {path}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read --json-schema file {path}: {e}") from e
    return ResponseFormat("json_schema", validate_schema(text, f"--json-schema file {path}"))


# -- grammar ----------------------------------------------------------------------------------------------


class GrammarVocab:
    """xgrammar's view of one model's tokenizer, plus what the closing policy needs; built once per model."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: tuple[int, ...]):
        xgr = require_xgrammar()
        self.info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids)
        )
        self.compiler = xgr.GrammarCompiler(self.info)
        self.vocab_size = vocab_size
        self.token_bytes: list[bytes] = list(self.info.decoded_vocab) + [b""] * (
            vocab_size - len(self.info.decoded_vocab)
        )
        special = set(self.info.special_token_ids) | set(stop_token_ids)
        cands = [
            i
            for i, b in enumerate(self.token_bytes)
            if i not in special and b and (b in _LITERALS or (len(b) <= 3 and set(b) <= _CLOSING_ALPHABET))
        ]
        self.candidates = np.array(cands, dtype=np.int64)
        self._grammars: dict[ResponseFormat, Any] = {}

    def grammar(self, fmt: ResponseFormat) -> Any:
        if fmt not in self._grammars:
            if fmt.type == "json_schema":
                g = self.compiler.compile_json_schema(fmt.schema, any_whitespace=False, separators=_COMPACT)
            else:
                g = self.compiler.compile_json_schema(
                    '{"type": "object"}', any_whitespace=False, separators=_COMPACT, strict_mode=False
                )
            if len(self._grammars) >= 32:
                self._grammars.pop(next(iter(self._grammars)))
            self._grammars[fmt] = g
        return self._grammars[fmt]


_VOCABS: weakref.WeakKeyDictionary[Any, dict[tuple[int, ...], GrammarVocab]] = weakref.WeakKeyDictionary()


def grammar_vocab(model: Any, stop_token_ids: tuple[int, ...]) -> GrammarVocab:
    per_model = _VOCABS.setdefault(model, {})
    key = tuple(stop_token_ids)
    if key not in per_model:
        vocab_size = model.llm.get_output_embeddings().weight.shape[0]
        per_model[key] = GrammarVocab(model.tokenizer, vocab_size, key)
    return per_model[key]


def json_logits_processor(
    model: Any, fmt: ResponseFormat, budgets: list[int], stop_token_ids: Any
) -> JsonLogitsProcessor:
    """A processor constraining each of ``len(budgets)`` rows to ``fmt`` within its token budget."""
    vocab = grammar_vocab(model, tuple(stop_token_ids))
    processor = JsonLogitsProcessor(vocab, [vocab.grammar(fmt)] * len(budgets), budgets)
    path = processor._close_path(processor.matchers[0], _Nesting(), max(4096, *budgets))
    shortest = None if path is None else len(path)
    if shortest is None or shortest > min(budgets):
        need = f"{shortest} tokens" if shortest is not None else f"more than {max(budgets)} tokens"
        raise UsageError(
            f"max_new_tokens={min(budgets)} is too small for this JSON format: the shortest valid answer takes {need} "
            "with this tokenizer; raise max_new_tokens (--max-new-tokens)"
        )
    return processor


# -- decoding ---------------------------------------------------------------------------------------------


@dataclass
class _Nesting:
    """How deep a JSON prefix is: open arrays/objects, and whether it is inside a string."""

    depth: int = 0
    in_string: bool = False
    escape: bool = False

    def feed(self, data: bytes) -> _Nesting:
        depth, in_string, escape = self.depth, self.in_string, self.escape
        for c in data:
            if in_string:
                if escape:
                    escape = False
                elif c == 0x5C:  # backslash
                    escape = True
                elif c == 0x22:  # quote
                    in_string = False
            elif c == 0x22:
                in_string = True
            elif c in (0x7B, 0x5B):  # { [
                depth += 1
            elif c in (0x7D, 0x5D):  # } ]
                depth -= 1
        return _Nesting(depth, in_string, escape)

    @property
    def open(self) -> int:
        return self.depth + self.in_string


class JsonLogitsProcessor:
    """Masks every token the grammar forbids; near the end of a row's budget, forces the closing path.

    One ``xgrammar.GrammarMatcher`` per row. Every ``RECHECK_EVERY`` steps the processor measures, on a fork of
    the matcher, how many tokens a greedy closing policy (fewest open strings, arrays and objects first; a
    schema's required keys come from the grammar) needs to complete the JSON. Once the budget left is within
    that length plus a margin, each step checks that the model's best token still leaves room to close; if
    not, the closing token is forced. (Sampling turns greedy inside that window.) Rows whose grammar has
    terminated are left alone (transformers pads them).
    """

    def __init__(self, vocab: GrammarVocab, grammars: list[Any], budgets: list[int]):
        xgr = require_xgrammar()
        self.xgr = xgr
        self.vocab = vocab
        self.matchers = [xgr.GrammarMatcher(g) for g in grammars]
        self.nesting = [_Nesting() for _ in grammars]
        self.budgets = list(budgets)
        self.broken = [False] * len(grammars)
        # The closing path from the current state (None: not known), and the (token, path after it) foreseen.
        self.plans: list[list[int] | None] = [None] * len(grammars)
        self.close_length = [0] * len(grammars)  # length of the last known closing path
        self.after: list[tuple[int, list[int]] | None] = [None] * len(grammars)
        self.steps = 0
        self.bitmask = xgr.allocate_token_bitmask(len(grammars), vocab.vocab_size)
        self._scratch = xgr.allocate_token_bitmask(1, vocab.vocab_size)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        rows = scores.shape[0]
        if rows != len(self.matchers):
            raise RuntimeError(f"JSON mode was set up for {len(self.matchers)} rows, got {rows}")
        if self.steps > 0:
            for i in range(rows):
                if self._active(i, self.steps - 1):
                    token = int(input_ids[i, -1])
                    if self.matchers[i].accept_token(token):
                        self.nesting[i] = self.nesting[i].feed(self.vocab.token_bytes[token])
                    else:
                        self.broken[i] = True
                    self._advance_plan(i, token)
        forced: dict[int, int] = {}
        for i in range(rows):
            if not self._active(i, self.steps):
                self.bitmask[i] = -1  # all allowed: the row is finished, its scores are not used
                continue
            self.matchers[i].fill_next_token_bitmask(self.bitmask, i)
            remaining = self.budgets[i] - self.steps
            if self.plans[i] is None and (self.steps % RECHECK_EVERY == 0 or remaining <= self._window(i)):
                self.plans[i] = self._close_path(self.matchers[i], self.nesting[i], remaining)
                self.close_length[i] = remaining if self.plans[i] is None else len(self.plans[i])
            if remaining <= self._window(i):
                forced[i] = self._choose(i, scores[i], remaining)
        self.steps += 1
        device = scores.device
        work = scores if device.type in ("cpu", "cuda") else scores.cpu()
        self.xgr.apply_token_bitmask_inplace(work, self.bitmask.to(work.device))
        for i, token in forced.items():
            keep = work[i, token].clone()
            work[i] = -float("inf")
            work[i, token] = keep if bool(keep.isfinite()) else 0.0
        return work if work is scores else work.to(device)

    def _window(self, i: int) -> int:
        """Within this many tokens of the budget's end every step checks that the JSON can still be closed."""
        return self.close_length[i] + RECHECK_EVERY + 4 * self.nesting[i].open

    def _advance_plan(self, i: int, token: int) -> None:
        """Keep the closing path valid for the new state when the token taken was foreseen; else drop it."""
        expected, plan = self.after[i], self.plans[i]
        if expected is not None and expected[0] == token:
            self.plans[i] = expected[1]
        elif plan and plan[0] == token:
            self.plans[i] = plan[1:]
        else:
            self.plans[i] = None  # close_length keeps the last estimate until the next check
        if self.plans[i] is not None:
            self.close_length[i] = len(self.plans[i])
        self.after[i] = None

    def _active(self, i: int, step: int) -> bool:
        return not self.broken[i] and not self.matchers[i].is_terminated() and step < self.budgets[i]

    def _choose(self, i: int, row_scores: torch.Tensor, remaining: int) -> int:
        """The model's best allowed token if the JSON can still be closed after it, else the closing token."""
        allowed = self._allowed(self.bitmask[i])
        logits = row_scores.detach().float().cpu().numpy()
        best = int(np.argmax(np.where(allowed, logits, -np.inf)))
        plan = self.plans[i]
        if plan and plan[0] == best:  # the model walks the closing path itself
            self.after[i] = (best, plan[1:])
            return best
        matcher, nesting = self.matchers[i].fork(), self.nesting[i]
        if matcher.accept_token(best):
            path = self._close_path(matcher, nesting.feed(self.vocab.token_bytes[best]), remaining - 1)
            if path is not None:
                self.after[i] = (best, path)
                return best
        if plan:
            self.after[i] = (plan[0], plan[1:])
            return plan[0]
        return self._closing_token(nesting, self.bitmask[i])  # already too late: close as fast as possible

    def _close_path(self, matcher: Any, nesting: _Nesting, limit: int) -> list[int] | None:
        """The closing policy's tokens completing the JSON from this state (on a fork), None if more than limit."""
        matcher, path = matcher.fork(), []
        while not matcher.is_completed():
            if len(path) >= limit:
                return None
            matcher.fill_next_token_bitmask(self._scratch, 0)
            token = self._closing_token(nesting, self._scratch[0])
            if not matcher.accept_token(token):
                return None
            nesting = nesting.feed(self.vocab.token_bytes[token])
            path.append(token)
        return path

    def _closing_token(self, nesting: _Nesting, mask_row: torch.Tensor) -> int:
        """Among allowed structural tokens, the one leaving the fewest open strings/arrays/objects."""
        words = mask_row.numpy().view(np.uint32)
        cands = self.vocab.candidates
        ok = cands[((words[cands >> 5] >> (cands & 31).astype(np.uint32)) & 1).astype(bool)]
        if len(ok) == 0:
            allowed = np.flatnonzero(self._allowed(mask_row))
            return int(allowed[0]) if len(allowed) else 0
        tb = self.vocab.token_bytes
        return int(
            min(ok, key=lambda t: (nesting.feed(tb[t]).open, -tb[t].count(b"}"[0]) - tb[t].count(b"]"[0]), len(tb[t])))
        )

    def _allowed(self, mask_row: torch.Tensor) -> np.ndarray:
        bits = np.unpackbits(mask_row.numpy().view(np.uint8), bitorder="little")
        return bits[: self.vocab.vocab_size].astype(bool)
