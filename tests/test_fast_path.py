"""The fast decode path as a load-time setting (``vila.load(compile=...)``, ``--compile``): the compiled static-cache
step gives the eager path's greedy tokens through every entry point (generate, a many-request run, a stream),
"auto" compiles on CUDA only, and decodes that use CUDA graphs run on one long-lived thread whoever calls."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import INPUTS, TINY

import vila
import vila.engine
from vila import decode as decode_mod
from vila.decode import DecodeRow, decode
from vila.engine import Request, fast_decode, run
from vila.errors import UsageError

IMAGE = INPUTS / "demo_img.png"
PROMPTS = [[vila.Image(IMAGE), "Describe the image."], "hi", "Tell me a story about a small tiger, " * 4]


@pytest.fixture(scope="module")
def compiled():
    """nvila-tiny loaded with ``compile=True`` (the tests pick ``aot_eager``, which traces the step in seconds)."""
    return vila.load(TINY / "nvila-tiny", device="cpu", dtype="float32", compile=True)


@pytest.fixture
def aot_eager(monkeypatch):
    monkeypatch.setenv("VILA_COMPILE_BACKEND", "aot_eager")


def _recording_decode(monkeypatch):
    """Record the ``static`` / ``compile`` arguments of every decode() call the engine makes."""
    calls, real = [], vila.engine.decode

    def decode(llm, rows, **kwargs):
        calls.append((len(rows), kwargs.get("static", False), kwargs.get("compile", False)))
        return real(llm, rows, **kwargs)

    monkeypatch.setattr(vila.engine, "decode", decode)
    return calls


def test_compile_setting_is_checked_before_loading():
    assert [vila.engine.compile_mode(v) for v in (True, False, "auto", "ON", None)] == [
        "on",
        "off",
        "auto",
        "on",
        "auto",
    ]
    with pytest.raises(UsageError, match="compile must be"):
        vila.load(TINY / "no-such-checkpoint", compile="fast")  # the setting fails before the path is resolved


def test_auto_compiles_on_cuda_only(tiny_model, monkeypatch):
    model = tiny_model("nvila-tiny")
    assert model.compile_mode == "auto"
    # The decision per device type, without needing one: the fast path on CUDA, eager on CPU and MPS.
    assert fast_decode(model, torch.device("cuda")) is True
    assert fast_decode(model, torch.device("cpu")) is False and fast_decode(model, torch.device("mps")) is False
    monkeypatch.setattr(model, "compile_mode", "off")
    assert fast_decode(model, torch.device("cuda")) is False
    monkeypatch.setattr(model, "compile_mode", "on")
    assert fast_decode(model, torch.device("cpu")) is True
    monkeypatch.setattr(model, "compile_mode", "auto")
    calls = _recording_decode(monkeypatch)
    model.generate("hi", max_new_tokens=2)
    assert calls == [(1, False, False)]  # tiny_model is on the CPU: auto decodes eagerly with the dynamic cache


def test_compiled_model_gives_eager_tokens(tiny_model, compiled, aot_eager, monkeypatch):
    eager = tiny_model("nvila-tiny")
    assert compiled.compile_mode == "on"
    want = [eager.generate(p, max_new_tokens=8).token_ids for p in PROMPTS]
    want_text = eager.generate_content(PROMPTS[2], max_new_tokens=8)
    calls = _recording_decode(monkeypatch)
    assert compiled.generate(PROMPTS[0], max_new_tokens=8).token_ids == want[0]
    assert [r.token_ids for r in run(compiled, [Request(p, {"max_new_tokens": 8}) for p in PROMPTS])] == want
    text = "".join(compiled.stream_content(PROMPTS[2], max_new_tokens=8))
    assert text == want_text
    assert calls == [(1, True, True), (3, True, True), (1, True, True)]


def test_cuda_graph_decodes_run_on_one_long_lived_thread(tiny_model, compiled, aot_eager, monkeypatch):
    """Whatever thread calls (the caller's, another), the decode runs on the graph thread, so graphs recorded once
    are replayed by every caller; a stream decodes on its own worker thread (its hook waits on its reader).
    CUDA graphs themselves need a GPU; the routing does not."""
    monkeypatch.setattr(
        decode_mod, "_needs_graph_thread", lambda device: not decode_mod._LOCAL.__dict__.get("no_graphs")
    )
    eager = tiny_model("nvila-tiny")
    want = eager.generate(PROMPTS[2], max_new_tokens=6)
    seen: set[str] = set()

    def hook(token: int) -> bool:
        seen.add(threading.current_thread().name)
        return False

    got = vila.engine.generate(compiled, PROMPTS[2], on_token=hook, max_new_tokens=6)
    assert got.token_ids == want.token_ids
    other: list = []
    t = threading.Thread(
        target=lambda: other.append(vila.engine.generate(compiled, PROMPTS[2], on_token=hook, max_new_tokens=6))
    )
    t.start()
    t.join()
    assert other[0].token_ids == want.token_ids
    assert seen == {"vila-cuda-graphs"}
    want_hi = eager.generate_content("hi", max_new_tokens=6)
    stream_threads: set[str] = set()
    real = vila.engine.generate

    def spy(*args, **kwargs):
        stream_threads.add(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(vila.engine, "generate", spy)
    first, second = (
        compiled.stream_content(PROMPTS[2], max_new_tokens=6),
        compiled.stream_content("hi", max_new_tokens=6),
    )
    assert "".join(second) == want_hi  # the later stream read first: neither waits on the other
    assert "".join(first) == want.text
    assert stream_threads == {"vila-generate"} and seen == {"vila-cuda-graphs"}


def test_graph_thread_hands_errors_back_and_keeps_serving(compiled, aot_eager, monkeypatch):
    monkeypatch.setattr(decode_mod, "_needs_graph_thread", lambda device: True)
    embeds = compiled.llm.get_input_embeddings().weight[:5].detach()

    def boom(token: int) -> bool:
        raise ValueError("from on_token")

    with pytest.raises(ValueError, match="from on_token"):
        decode(compiled.llm, [DecodeRow(embeds, 3, [], on_token=boom)], compile=True)
    want = decode(compiled.llm, [DecodeRow(embeds, 3, [])])
    assert decode(compiled.llm, [DecodeRow(embeds, 3, [])], compile=True) == want


def test_auto_falls_back_to_eager_when_the_compiled_step_fails(tiny_model, monkeypatch):
    model = tiny_model("nvila-tiny")
    want = model.generate("hi", max_new_tokens=4).token_ids
    monkeypatch.setattr(model, "_compile_failed", False, raising=False)
    monkeypatch.setattr(vila.engine, "fast_decode", lambda m, d: not getattr(m, "_compile_failed", False))
    real = vila.engine.decode

    def decode(llm, rows, **kwargs):
        if kwargs.get("compile"):
            raise torch._dynamo.exc.BackendCompilerFailed(print, RuntimeError("backend failed to compile"), None)
        return real(llm, rows, **kwargs)

    monkeypatch.setattr(vila.engine, "decode", decode)
    with pytest.warns(UserWarning, match="compiled decode step failed"):
        assert model.generate("hi", max_new_tokens=4).token_ids == want
    assert model._compile_failed is True
    assert model.generate("hi", max_new_tokens=4).token_ids == want  # no second attempt, no second warning
    model._compile_failed = False
    monkeypatch.setattr(model, "compile_mode", "on")
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed):  # asked for explicitly: the failure is the answer
        model.generate("hi", max_new_tokens=4)


def test_auto_does_not_hide_errors_that_are_not_the_compilers(tiny_model, aot_eager, monkeypatch):
    model = tiny_model("nvila-tiny")
    monkeypatch.setattr(model, "_compile_failed", False, raising=False)
    monkeypatch.setattr(vila.engine, "fast_decode", lambda m, d: True)

    def processor(ids, scores):
        raise ValueError("the caller's processor failed")

    with pytest.raises(ValueError, match="processor failed"):
        model.generate("hi", max_new_tokens=4, logits_processor=[processor])
    assert model._compile_failed is False


@pytest.mark.parametrize(("flag", "mode"), [("on", "on"), ("off", "off"), (None, "auto")])
def test_compile_flag_reaches_the_model(flag, mode, monkeypatch, capsys):
    """``vila-infer --compile`` is handed to ``vila.load`` and ends up as the model's setting."""
    from vila import cli

    seen, real = [], vila.load

    def load(*args, **kwargs):
        model = real(*args, **kwargs)
        seen.append(model.compile_mode)
        return model

    monkeypatch.setattr(vila, "load", load)
    monkeypatch.setenv("VILA_COMPILE_BACKEND", "aot_eager")
    argv = ["-m", str(TINY / "nvila-tiny"), "--text", "hi", "--max-new-tokens", "2", "--device", "cpu"]
    assert cli.main(argv + (["--compile", flag] if flag else [])) == 0
    assert seen == [mode]
