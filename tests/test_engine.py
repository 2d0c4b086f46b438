"""The engine (:mod:`vila.engine`): many requests in one call answer as one-by-one ``generate`` calls do, errors
and cancellations stay with their request, logits processors run once per step, and a ``generation_config``
that decode() cannot follow runs the LLM's own ``generate``."""

from __future__ import annotations

import pytest
import torch
from conftest import INPUTS
from transformers import GenerationConfig

import vila
import vila.engine
from vila.engine import Request, run
from vila.errors import MediaError, UsageError

IMAGE = INPUTS / "demo_img.png"
VIDEO = INPUTS / "video_160x120_64f_16fps.mp4"


def _counting_decode(monkeypatch):
    """Record the number of rows of every decode() call."""
    calls, real = [], vila.engine.decode

    def decode(llm, rows, **kwargs):
        calls.append(len(rows))
        return real(llm, rows, **kwargs)

    monkeypatch.setattr(vila.engine, "decode", decode)
    return calls


@pytest.mark.parametrize(
    "variant, prompts",
    [
        (
            "nvila-tiny",
            [
                [vila.Image(IMAGE), "Describe the image."],
                "hi",
                "Tell me a story about a small tiger who lived in a big city, " * 4,
                [vila.Image(INPUTS / "syn_640x480.png"), vila.Image(IMAGE), "Compare them."],
            ],
        ),
        ("nvila-video-tiny", [[vila.Video(VIDEO), "What happens?"], "A short question?", [vila.Image(IMAGE), "x"]]),
    ],
)
def test_one_call_equals_one_by_one(tiny_model, monkeypatch, variant, prompts):
    model = tiny_model(variant)
    settings = [{"max_new_tokens": n, "num_video_frames": 4} for n in (7, 3, 9, 5)][: len(prompts)]
    singles = [model.generate(p, **s) for p, s in zip(prompts, settings)]
    calls = _counting_decode(monkeypatch)
    batched = run(model, [Request(p, s) for p, s in zip(prompts, settings)])
    assert calls == [len(prompts)]  # every greedy request went through the LLM together
    for one, many in zip(singles, batched):
        assert (many.token_ids, many.text, many.num_prompt_tokens) == (one.token_ids, one.text, one.num_prompt_tokens)
        assert many.media_tokens == one.media_tokens and many.video_durations == one.video_durations
        assert many.finish_reason == ("stop" if one.token_ids[-1] in model.stop_token_ids else "length")


def test_errors_stay_with_their_request(tiny_model):
    model = tiny_model("nvila-tiny")
    requests = [
        Request("Hello", {"max_new_tokens": 4}),
        Request([vila.Image(INPUTS / "missing.png"), "x"], {"max_new_tokens": 4}),
        Request("Hello", {"max_new_tokens": 0}),
        Request("Hello", {"max_new_tokens": 4, "no_such_setting": 1}),
        Request([vila.Image(IMAGE), "Describe."], {"max_new_tokens": 4}),
    ]
    out = run(model, requests, return_errors=True)
    assert [type(r).__name__ for r in out] == [
        "GenerationResult",
        "MediaError",
        "UsageError",
        "UsageError",
        "GenerationResult",
    ]
    assert "no_such_setting" in str(out[3])
    assert out[0].token_ids == model.generate("Hello", max_new_tokens=4).token_ids
    assert out[4].token_ids == model.generate([vila.Image(IMAGE), "Describe."], max_new_tokens=4).token_ids
    with pytest.raises(MediaError):  # without return_errors the first error is raised
        run(model, requests[:2])
    with pytest.raises(UsageError, match="no_such_setting"):
        model.generate("Hello", no_such_setting=1)


def test_cancel_mid_stream_ends_only_that_request(tiny_model, monkeypatch):
    model = tiny_model("nvila-tiny")
    prompts = ["Tell me everything about cats.", "Tell me everything about dogs."]
    singles = [model.generate(p, max_new_tokens=12) for p in prompts]
    seen: list[int] = []
    cancel = {"now": False}

    def on_token(token: int) -> bool:
        seen.append(token)
        cancel["now"] = len(seen) == 3  # the client goes away after the third token
        return False

    calls = _counting_decode(monkeypatch)
    first, second = run(
        model,
        [
            Request(prompts[0], {"max_new_tokens": 12}, on_token=on_token, cancel=lambda: cancel["now"]),
            Request(prompts[1], {"max_new_tokens": 12}),
        ],
    )
    assert calls == [2]
    assert len(singles[0].token_ids) > 3, "the tiny answer must outlast the cancellation"
    assert first.finish_reason == "cancelled" and first.token_ids == seen == singles[0].token_ids[:3]
    assert second.token_ids == singles[1].token_ids  # the other row went on to its end


def test_a_request_cancelled_before_it_starts_is_never_prepared(tiny_model, monkeypatch):
    model = tiny_model("nvila-tiny")
    calls = _counting_decode(monkeypatch)
    (out,) = run(model, [Request([vila.Image(INPUTS / "missing.png"), "x"], cancel=lambda: True)])
    assert (out.finish_reason, out.token_ids, calls) == ("cancelled", [], [])


class _Count:
    """A logits processor that changes nothing and counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, input_ids, scores):
        assert input_ids.shape == (1, self.calls)  # the tokens generated so far, one row
        self.calls += 1
        return scores


def test_processors_run_once_per_step_in_a_many_request_call(tiny_model, monkeypatch):
    pytest.importorskip("llguidance")
    model = tiny_model("nvila-tiny")
    fmt = {"type": "json_object"}
    single = model.generate("Give me JSON.", max_new_tokens=30, response_format=fmt)
    counters = [_Count(), _Count()]
    requests = [
        Request("Give me JSON.", {"max_new_tokens": 30, "response_format": fmt, "logits_processor": [counters[0]]}),
        Request("Give me JSON.", {"max_new_tokens": 30, "response_format": fmt}),
        Request("Say hi.", {"max_new_tokens": 5, "logits_processor": [counters[1]]}),
        Request("Say hi.", {"max_new_tokens": 5}),
    ]
    calls = _counting_decode(monkeypatch)
    out = run(model, requests)
    assert sorted(calls) == [1, 1, 1, 1]  # requests with processors decode alone; the plain one too (one left)
    assert out[0].token_ids == out[1].token_ids == single.token_ids
    assert counters[0].calls == len(out[0].token_ids) and counters[1].calls == len(out[2].token_ids)
    assert out[2].token_ids == out[3].token_ids


def test_stream_and_streamer_see_each_token_once(tiny_model):
    model = tiny_model("nvila-lite-tiny")
    puts = []

    class Streamer:
        def put(self, value):
            puts.append(value.tolist())

        def end(self):
            puts.append("end")

    result = model.generate("Two words:", max_new_tokens=6, streamer=Streamer())
    assert puts == [[[]], *[[t] for t in result.token_ids], "end"]  # the prompt first, as the LLM's generate
    stream = model.stream_content("Two words:", max_new_tokens=6)
    assert "".join(stream) == result.text and stream.result.token_ids == result.token_ids


def test_generation_config_decode_cannot_follow_runs_the_llms_generate(tiny_model, monkeypatch):
    model = tiny_model("nvila-tiny")
    eos = list(model.stop_token_ids)
    plain = GenerationConfig(max_new_tokens=5, do_sample=False, eos_token_id=eos, num_beams=1)
    penalised = GenerationConfig(max_new_tokens=5, do_sample=False, eos_token_id=eos, repetition_penalty=5.0)
    calls = _counting_decode(monkeypatch)
    assert (
        model.generate("Hello", generation_config=plain).token_ids
        == model.generate("Hello", max_new_tokens=5).token_ids
    )
    assert calls == [1, 1]
    got = model.generate("Hello", generation_config=penalised).token_ids
    assert calls == [1, 1]  # not through decode()
    prepared = model.prepare(vila.model.vila.to_turns("Hello"))
    embeds = prepared.inputs_embeds[None]
    with torch.no_grad():
        want = model.llm.generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
            generation_config=penalised,
        )[0].tolist()
    assert got == want


def test_a_seed_gives_its_answer_whatever_other_threads_draw(tiny_model):
    """Each seeded request draws from a generator of its own: requests sampling at once in other threads (the
    server's worker, streams) cannot change its answer, and it equals the same request made alone."""
    import threading

    model = tiny_model("nvila-tiny")
    kwargs = {"max_new_tokens": 8, "do_sample": True, "temperature": 100.0}
    alone = model.generate("Hello", seed=123, **kwargs).token_ids
    out: dict[int, list[int]] = {}

    def noisy() -> None:  # unseeded sampling: draws from the global generator all along
        for _ in range(3):
            model.generate("Tell me more", **kwargs)

    def seeded(i: int) -> None:
        out[i] = model.generate("Hello", seed=123, **kwargs).token_ids

    threads = [threading.Thread(target=noisy)] + [threading.Thread(target=seeded, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == {0: alone, 1: alone, 2: alone}
    torch.manual_seed(123)
    assert model.generate("Hello", **kwargs).token_ids == alone  # the same draws as torch.manual_seed(seed)
