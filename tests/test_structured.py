"""JSON mode: constrained decoding gives JSON that parses and validates, even from random-weight tiny models
and even when the token budget runs out mid-answer."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import INPUTS, TINY

import vila
from vila.errors import UsageError
from vila.structured import (
    ResponseFormat,
    closed_schema,
    load_schema_file,
    parse_response_format,
    require_llguidance,
)

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "colour": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "size": {
            "type": "object",
            "properties": {"w": {"type": "number"}, "h": {"type": "number"}},
            "required": ["w", "h"],
        },
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "colour", "tags", "size", "ok"],
}


def validate(value, schema):
    """The subset of JSON Schema used above (no extra library needed)."""
    if "enum" in schema:
        assert value in schema["enum"]
        return
    kind = schema["type"]
    if kind == "object":
        assert isinstance(value, dict)
        for key in schema.get("required", []):
            assert key in value, key
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                validate(value[key], sub)
    elif kind == "array":
        assert isinstance(value, list) and len(value) >= schema.get("minItems", 0)
        for item in value:
            validate(item, schema["items"])
    elif kind == "string":
        assert isinstance(value, str)
    elif kind == "integer":
        assert isinstance(value, int) and not isinstance(value, bool)
    elif kind == "number":
        assert isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind == "boolean":
        assert isinstance(value, bool)


def test_validator_rejects_wrong_values():
    with pytest.raises(AssertionError):
        validate({"name": "x"}, SCHEMA)


def shortest_answer(model, schema) -> int:
    """The token count of the shortest valid answer, as the too-small-budget error reports it."""
    with pytest.raises(UsageError, match=r"max_new_tokens=1 is too small .* takes \d+ tokens") as info:
        model.generate(
            "x", max_new_tokens=1, response_format={"type": "json_schema", "json_schema": {"schema": schema}}
        )
    return int(re.search(r"takes (\d+) tokens", str(info.value)).group(1))


@pytest.mark.parametrize("variant", ["nvila-tiny", "vila15-tiny"])
@pytest.mark.parametrize("budget", ["shortest", 150])
def test_schema_answers_validate(tiny_model, variant, budget):
    model = tiny_model(variant)
    if budget == "shortest":  # not one token to spare: the closing policy must take over at once
        budget = shortest_answer(model, SCHEMA)
    fmt = {"type": "json_schema", "json_schema": {"schema": SCHEMA}}
    result = model.generate("Describe a cat as JSON.", max_new_tokens=budget, response_format=fmt)
    validate(json.loads(result.text), SCHEMA)
    assert len(result.token_ids) <= budget


OPTIONAL = {
    "type": "object",
    "properties": {
        "a": {"type": "integer"},
        "b": {"type": "string"},
        "c": {"type": "array", "items": {"type": "number"}},
    },
}


@pytest.mark.parametrize("variant", ["nvila-tiny", "vila15-tiny", "nvila-lite-tiny"])
def test_answers_hold_only_the_listed_keys(tiny_model, variant):
    """Left free to add keys (JSON Schema's default), the random models invent some; a schema that lists its
    properties gets only those, in the listed order, unless it allows more itself."""
    model = tiny_model(variant)
    fmt = {"type": "json_schema", "json_schema": {"schema": OPTIONAL}}
    for budget in (20, 60):
        value = json.loads(model.generate_content("JSON.", max_new_tokens=budget, response_format=fmt))
        assert list(value) == [k for k in OPTIONAL["properties"] if k in value]
        validate(value, OPTIONAL)


def test_closed_schema_keeps_what_the_schema_says():
    closed = closed_schema(SCHEMA)
    assert closed["additionalProperties"] is False and closed["properties"]["size"]["additionalProperties"] is False
    assert "additionalProperties" not in SCHEMA  # the caller's schema is not modified
    free = {"type": "object", "properties": {"x": {}}, "additionalProperties": {"type": "integer"}}
    assert closed_schema(free) == free
    both = {"allOf": [{"properties": {"x": {}}}, {"properties": {"y": {}}}]}
    assert closed_schema(both) == both  # closing each member would forbid the other's key
    nested = {"$defs": {"P": {"properties": {"x": {}}}}, "anyOf": [{"$ref": "#/$defs/P"}, {"properties": {"y": {}}}]}
    closed = closed_schema(nested)
    assert closed["$defs"]["P"]["additionalProperties"] is False and closed["anyOf"][1]["additionalProperties"] is False


def test_greedy_json_answers_are_deterministic(tiny_model):
    model = tiny_model("vila15-tiny")
    fmt = {"type": "json_schema", "json_schema": {"schema": SCHEMA}}
    first = model.generate("Describe a cat as JSON.", max_new_tokens=80, response_format=fmt)
    second = model.generate("Describe a cat as JSON.", max_new_tokens=80, response_format=fmt)
    assert first.token_ids == second.token_ids


@pytest.mark.parametrize("variant", ["nvila-tiny", "vila15-tiny", "nvila-lite-tiny"])
@pytest.mark.parametrize("budget", [2, 40])
def test_json_object_answers_parse(tiny_model, variant, budget):
    model = tiny_model(variant)
    text = model.generate_content("Give me JSON.", max_new_tokens=budget, response_format={"type": "json_object"})
    assert isinstance(json.loads(text), dict)


def test_a_budget_too_small_for_the_schema_is_a_clear_error(tiny_model):
    model = tiny_model("nvila-tiny")
    fmt = {"type": "json_schema", "json_schema": {"schema": SCHEMA}}
    with pytest.raises(UsageError, match=r"max_new_tokens=40 is too small .* takes (\d+) tokens") as info:
        model.generate("x", max_new_tokens=40, response_format=fmt)
    shortest = int(re.search(r"takes (\d+) tokens", str(info.value)).group(1))
    assert shortest > 40
    with pytest.raises(UsageError, match=f"max_new_tokens={shortest - 1} is too small"):
        model.generate("x", max_new_tokens=shortest - 1, response_format=fmt)
    validate(json.loads(model.generate_content("x", max_new_tokens=shortest, response_format=fmt)), SCHEMA)


def test_random_model_is_closed_before_the_budget_ends(tiny_model):
    """Unconstrained by a schema, the random model wanders into a long string; the budget forces it closed."""
    model = tiny_model("vila15-tiny")
    schema = {"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"]}
    for budget in (25, 40, 70):
        result = model.generate(
            "Tell a story.",
            max_new_tokens=budget,
            response_format={"type": "json_schema", "json_schema": {"schema": schema}},
        )
        story = json.loads(result.text)["story"]
        assert isinstance(story, str) and len(story) > 0
        assert len(result.token_ids) <= budget


SMALL = {"type": "object", "properties": {"n": {"type": "integer"}, "s": {"type": "string"}}, "required": ["n", "s"]}


def test_stream_and_json_mode(tiny_model):
    model = tiny_model("nvila-tiny")
    fmt = {"type": "json_schema", "json_schema": {"schema": SMALL}}
    prompt = [vila.Image(INPUTS / "demo_img.png"), "JSON please"]
    streamed = "".join(model.stream_content(prompt, max_new_tokens=30, response_format=fmt))
    assert streamed == model.generate_content(prompt, max_new_tokens=30, response_format=fmt)
    validate(json.loads(streamed), SMALL)


def test_response_format_parsing(tmp_path):
    assert parse_response_format(None) is None and parse_response_format({"type": "text"}) is None
    assert parse_response_format({"type": "json_object"}) == ResponseFormat("json_object")
    fmt = parse_response_format({"type": "json_schema", "json_schema": {"schema": json.dumps(SCHEMA)}})
    assert fmt.type == "json_schema" and json.loads(fmt.schema) == SCHEMA
    for bad, match in [
        ({"type": "xml"}, "json_object"),
        ({"type": "json_schema"}, "schema"),
        ({"type": "json_schema", "json_schema": {"schema": {"type": "foo"}}}, "foo"),
        ({"type": "json_schema", "json_schema": {"schema": "{not json"}}, "not valid JSON"),
        ({"type": "json_schema", "json_schema": {"schema": [1, 2]}}, "JSON object"),
        ({"type": "json_schema", "json_schema": {"schema": False}}, "no answer satisfies"),
        ({"type": "json_schema", "json_schema": {"schema": {"properties": {"a": {"not": {}}}}}}, 'usable.*"not"'),
    ]:
        with pytest.raises(UsageError, match=match):
            parse_response_format(bad)
    assert parse_response_format({"type": "json_schema", "json_schema": {"schema": True}}).schema == "true"
    path = tmp_path / "s.json"
    path.write_text(json.dumps(SCHEMA))
    assert json.loads(load_schema_file(path).schema) == SCHEMA


def test_bad_response_format_fails_before_any_work(tiny_model):
    model = tiny_model("nvila-tiny")
    with pytest.raises(UsageError, match="response_format"):
        model.generate([vila.Image(INPUTS / "nope.png"), "hi"], response_format={"type": "yaml"})


def test_missing_llguidance_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)
    with pytest.raises(UsageError, match=r"pip install 'vila\[json\]'"):
        require_llguidance()


def test_cli_json_schema_and_json_output(tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SMALL))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    cmd = [sys.executable, "-m", "vila.cli", "-m", str(TINY / "nvila-tiny"), "--device", "cpu", "--text", "JSON!"]
    cmd += ["--max-new-tokens", "30", "--json-schema", str(schema), "--output-format", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    validate(json.loads(json.loads(proc.stdout)["answer"]), SMALL)
