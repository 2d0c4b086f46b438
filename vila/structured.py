"""JSON mode: answers constrained to a JSON object or to a JSON Schema.

The grammar work is llguidance's (CPU and CUDA alike: masks are computed on the CPU and applied with plain
torch), installed with ``pip install 'vila[json]'``. ``response_format`` is what the reference and OpenAI-style
APIs take::

    {"type": "json_object"}                                   # any JSON object
    {"type": "json_schema", "json_schema": {"schema": {...}}}  # an object valid under the schema
    {"type": "text"} or None                                  # unconstrained

Differences from the reference, on purpose: ``json_object`` means an *object* (the reference's builtin
grammar also allowed arrays and scalars, and treated ``"text"`` as JSON too), and whitespace is compact
instead of free, so a model cannot spend its budget on blank space. And the answer is always complete
JSON: when the token budget (``max_new_tokens`` or the context) is about to run out, decoding switches to
the shortest way of closing the open strings, arrays and objects, instead of stopping mid-string.

The reference constrains through xgrammar, which pulls triton (about 1 GB installed) even on machines without
a GPU; llguidance is one 3 MB wheel with no dependencies. Both are exact token-level engines, and with the
options below they accept the same JSON texts (compact, properties in the schema's order, no keys the schema
does not list; llguidance never puts a raw DEL character in a string), but llguidance writes text the grammar
forces (a key name) only in the tokenizer's own tokenization, so answers of the same model can differ.
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
# Compact JSON; given as overrides, so a schema's own "x-guidance" options cannot turn free whitespace back on.
_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
# Tokens made only of these (or spelling a literal) are what the closing policy picks from.
_CLOSING_ALPHABET = frozenset(b'"{}[]:,0123456789')
_LITERALS = (b"true", b"false", b"null")
RECHECK_EVERY = 8  # steps between re-measuring how many tokens closing the JSON would take


@dataclass(frozen=True)
class ResponseFormat:
    """A validated ``response_format``: ``type`` is "json_object" or "json_schema" (with ``schema`` as JSON text)."""

    type: str
    schema: str | None = None


def require_llguidance() -> Any:
    try:
        import llguidance
        import llguidance.hf
        import llguidance.numpy  # noqa: F401 - the mask helpers used below
    except ImportError as e:
        raise UsageError(f"JSON mode needs the optional llguidance package; install it with: {INSTALL_HINT}") from e
    return llguidance


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
    """The schema as JSON text, after checking that llguidance can turn it into a grammar."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise UsageError(f"{name} is not valid JSON ({e}); give a JSON Schema object") from e
    if schema is False:
        raise UsageError(f"{name} is `false`, which no answer satisfies; give a JSON Schema object")
    if not isinstance(schema, (dict, bool)):
        raise UsageError(f"{name} must be a JSON object (a JSON Schema), got {type(schema).__name__}")
    text = json.dumps(schema)
    llg = require_llguidance()
    error = llg.LLMatcher.validate_grammar(_grammar(ResponseFormat("json_schema", text)))
    if error:
        lines = [line for line in error.strip().splitlines() if line.strip()]
        raise UsageError(f"{name} is not a usable JSON Schema: {lines[0] if lines else error}")
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

# Keywords whose value is one schema, a list of schemas, or a name -> schema mapping.
_ONE_SCHEMA = ("items", "additionalItems", "contains", "not", "if", "then", "else", "additionalProperties")
_SCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def closed_schema(schema: Any, close: bool = True) -> Any:
    """A copy of ``schema`` in which every object listing ``properties`` takes no other keys, unless it says
    otherwise (``additionalProperties``, ``patternProperties`` or ``unevaluatedProperties``).

    JSON Schema's default would let the model invent keys the caller never asked for; a constrained answer is
    wanted for its listed fields (OpenAI's strict mode and xgrammar's default behave the same way).
    ``allOf`` members are left open, since closing each one would forbid the keys the others list."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _ONE_SCHEMA:
        if isinstance(out.get(key), dict):
            out[key] = closed_schema(out[key])
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed_schema(s) for s in out[key]]
    if isinstance(out.get("allOf"), list):
        out["allOf"] = [closed_schema(s, close=False) for s in out["allOf"]]
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {k: closed_schema(s) for k, s in out[key].items()}
    open_keys = ("additionalProperties", "patternProperties", "unevaluatedProperties")
    if close and "properties" in out and not any(k in out for k in open_keys):
        out["additionalProperties"] = False
    return out


def _grammar(fmt: ResponseFormat) -> str:
    """llguidance's grammar text for a format (any object for json_object)."""
    llg = require_llguidance()
    schema = json.loads(fmt.schema) if fmt.type == "json_schema" else {"type": "object"}
    if schema is True:  # any JSON value; options only attach to an object schema
        schema = {}
    return llg.LLMatcher.grammar_from_json_schema(closed_schema(schema), overrides=_OPTIONS)


class GrammarVocab:
    """llguidance's view of one model's tokenizer, plus what the closing policy needs; built once per model."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: tuple[int, ...]):
        llg = require_llguidance()
        try:
            self.tokenizer = llg.hf.from_tokenizer(
                tokenizer, n_vocab=vocab_size, eos_token=list(stop_token_ids) or None
            )
        except ValueError as e:  # a slow (Python) tokenizer; every checkpoint we load has a fast one
            raise UsageError(f"JSON mode needs a fast (tokenizers-backed) tokenizer: {e}") from e
        self.vocab_size = vocab_size
        self.stop_token_ids = frozenset(stop_token_ids)
        # Special tokens never appear inside JSON text, so they spell nothing here.
        self.token_bytes: list[bytes] = [
            b"" if self.tokenizer.is_special_token(i) else self.tokenizer.decode_bytes([i]) for i in range(vocab_size)
        ]
        cands = [
            i
            for i, b in enumerate(self.token_bytes)
            if i not in self.stop_token_ids and b and (b in _LITERALS or (len(b) <= 3 and set(b) <= _CLOSING_ALPHABET))
        ]
        self.candidates = np.array(cands, dtype=np.int64)
        self._matchers: dict[ResponseFormat, Any] = {}

    def matcher(self, fmt: ResponseFormat) -> Any:
        """A fresh matcher for ``fmt`` (a copy of one built once per format: building compiles the lexer)."""
        if fmt not in self._matchers:
            llg = require_llguidance()
            m = llg.LLMatcher(self.tokenizer, _grammar(fmt), log_level=0)  # errors are read below, not printed
            if m.is_error():
                raise UsageError(f"cannot use this JSON format with this model's tokenizer: {m.get_error()}")
            if len(self._matchers) >= 32:
                self._matchers.pop(next(iter(self._matchers)))
            self._matchers[fmt] = m
        return self._matchers[fmt].deep_copy()


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
    processor = JsonLogitsProcessor(vocab, [vocab.matcher(fmt) for _ in budgets], budgets)
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

    One ``llguidance.LLMatcher`` per row. Every ``RECHECK_EVERY`` steps the processor measures, on a copy of
    the matcher, how many tokens a greedy closing policy (fewest open strings, arrays and objects first; a
    schema's required keys come from the grammar) needs to complete the JSON. Once the budget left is within
    that length plus a margin, each step checks that the model's best token still leaves room to close; if
    not, the closing token is forced. (Sampling turns greedy inside that window.) Rows that have taken a stop
    token are left alone (transformers pads them).
    """

    def __init__(self, vocab: GrammarVocab, matchers: list[Any], budgets: list[int]):
        self.llg = require_llguidance()
        self.vocab = vocab
        self.matchers = matchers
        self.nesting = [_Nesting() for _ in matchers]
        self.budgets = list(budgets)
        self.broken = [False] * len(matchers)
        # Own flag: llguidance reports "stopped" as soon as only a stop token may follow, one step before it is taken.
        self.done = [False] * len(matchers)
        # The closing path from the current state (None: not known), and the (token, path after it) foreseen.
        self.plans: list[list[int] | None] = [None] * len(matchers)
        self.close_length = [0] * len(matchers)  # length of the last known closing path
        self.after: list[tuple[int, list[int]] | None] = [None] * len(matchers)
        self.steps = 0
        self.bitmask = self.llg.numpy.allocate_token_bitmask(len(matchers), vocab.vocab_size)
        self._scratch = self.llg.numpy.allocate_token_bitmask(1, vocab.vocab_size)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        import torch

        rows = scores.shape[0]
        if rows != len(self.matchers):
            raise RuntimeError(f"JSON mode was set up for {len(self.matchers)} rows, got {rows}")
        if self.steps > 0:
            for i in range(rows):
                if self._active(i, self.steps - 1):
                    token = int(input_ids[i, -1])
                    if self.matchers[i].consume_token(token):
                        self.nesting[i] = self.nesting[i].feed(self.vocab.token_bytes[token])
                        self.done[i] = token in self.vocab.stop_token_ids
                    else:
                        self.broken[i] = True
                    self._advance_plan(i, token)
        forced: dict[int, int] = {}
        for i in range(rows):
            if not self._active(i, self.steps):
                self.bitmask[i] = -1  # all allowed: the row is finished, its scores are not used
                continue
            self.llg.numpy.fill_next_token_bitmask(self.matchers[i], self.bitmask, i)
            remaining = self.budgets[i] - self.steps
            if self.plans[i] is None and (self.steps % RECHECK_EVERY == 0 or remaining <= self._window(i)):
                self.plans[i] = self._close_path(self.matchers[i], self.nesting[i], remaining)
                self.close_length[i] = remaining if self.plans[i] is None else len(self.plans[i])
            if remaining <= self._window(i):
                forced[i] = self._choose(i, scores[i], remaining)
        self.steps += 1
        width = min(scores.shape[1], self.vocab.vocab_size)
        allowed = np.unpackbits(self.bitmask.view(np.uint8), axis=1, bitorder="little")[:, :width]
        forbidden = torch.from_numpy(allowed == 0).to(scores.device)
        scores[:, :width].masked_fill_(forbidden, -float("inf"))
        scores[:, width:] = -float("inf")  # positions past the tokenizer's vocabulary spell nothing
        for i, token in forced.items():
            keep = scores[i, token].clone()
            scores[i] = -float("inf")
            scores[i, token] = keep if bool(keep.isfinite()) else 0.0
        return scores

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
        return not self.broken[i] and not self.done[i] and step < self.budgets[i]

    def _choose(self, i: int, row_scores: torch.Tensor, remaining: int) -> int:
        """The model's best allowed token if the JSON can still be closed after it, else the closing token."""
        allowed = self._allowed(self.bitmask[i])
        logits = row_scores.detach().float().cpu().numpy()[: len(allowed)]
        best = int(np.argmax(np.where(allowed[: len(logits)], logits, -np.inf)))
        plan = self.plans[i]
        if plan and plan[0] == best:  # the model walks the closing path itself
            self.after[i] = (best, plan[1:])
            return best
        matcher, nesting = self.matchers[i].deep_copy(), self.nesting[i]
        if matcher.consume_token(best):
            path = self._close_path(matcher, nesting.feed(self.vocab.token_bytes[best]), remaining - 1)
            if path is not None:
                self.after[i] = (best, path)
                return best
        if plan:
            self.after[i] = (plan[0], plan[1:])
            return plan[0]
        return self._closing_token(nesting, self.bitmask[i])  # already too late: close as fast as possible

    def _close_path(self, matcher: Any, nesting: _Nesting, limit: int) -> list[int] | None:
        """The closing policy's tokens completing the JSON from this state (on a copy), None if more than limit."""
        matcher, path = matcher.deep_copy(), []
        while not matcher.is_accepting():
            if len(path) >= limit:
                return None
            self.llg.numpy.fill_next_token_bitmask(matcher, self._scratch, 0)
            token = self._closing_token(nesting, self._scratch[0])
            if not matcher.consume_token(token):
                return None
            nesting = nesting.feed(self.vocab.token_bytes[token])
            path.append(token)
        return path

    def _closing_token(self, nesting: _Nesting, mask_row: np.ndarray) -> int:
        """Among allowed structural tokens, the one leaving the fewest open strings/arrays/objects."""
        words = mask_row.view(np.uint32)
        cands = self.vocab.candidates
        ok = cands[((words[cands >> 5] >> (cands & 31).astype(np.uint32)) & 1).astype(bool)]
        if len(ok) == 0:
            allowed = np.flatnonzero(self._allowed(mask_row))
            return int(allowed[0]) if len(allowed) else 0
        tb = self.vocab.token_bytes
        return int(
            min(ok, key=lambda t: (nesting.feed(tb[t]).open, -tb[t].count(b"}"[0]) - tb[t].count(b"]"[0]), len(tb[t])))
        )

    def _allowed(self, mask_row: np.ndarray) -> np.ndarray:
        bits = np.unpackbits(mask_row.view(np.uint8), bitorder="little")
        return bits[: self.vocab.vocab_size].astype(bool)
