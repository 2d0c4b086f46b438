"""``vila-infer --serve``: the OpenAI-compatible server, driven by the official ``openai`` client, offline on
the tiny checkpoints. Servers run in-process (uvicorn in a thread) on free 127.0.0.1 ports."""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import functools
import http.client
import http.server
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import PIL.Image
import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from conftest import TINY  # noqa: E402

import vila  # noqa: E402
from vila.openai_protocol import APIError, ChatRequest, Limits, fetch_url, system_template  # noqa: E402
from vila.scheduler import _stable  # noqa: E402
from vila.serve import ServeSettings, create_app  # noqa: E402

NAME = "nvila-tiny"
LIMITS = Limits(max_body_bytes=1 << 20, max_media_bytes=512 << 10, max_image_pixels=200_000, max_video_frames=16)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(model, **kwargs):
    """A server for ``model`` on a free port; yields ``(base_url, app)``."""
    settings = ServeSettings(model_name=NAME, aliases=(str(TINY / NAME),), **kwargs)
    app = create_app(model, settings)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def client(base: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model(NAME)


@pytest.fixture(scope="module")
def srv(model):
    with running(model, limits=LIMITS) as (base, app):
        yield base, app


@pytest.fixture(scope="module")
def keyed(model):
    """An API key, and URLs on 127.0.0.1 allowed (the test's own HTTP server is one)."""
    with running(model, api_key="sekret", limits=Limits(allow_private_urls=True)) as (base, app):
        yield base, app


def png_bytes(size=(48, 40), seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    PIL.Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def mp4_bytes(n: int = 8) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(n):
            frame = np.full((48, 64, 3), i * 30, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def ask(base: str, messages, key: str = "unused", **kwargs):
    return client(base, key).chat.completions.create(model=NAME, messages=messages, **kwargs)


# -- answers ---------------------------------------------------------------------------------------------------


def test_plain_and_streamed_answers_equal_generate_content(model, srv):
    base, _ = srv
    text = "Describe a sunny day."
    expected = model.generate_content(text, max_new_tokens=12)
    plain = ask(base, [{"role": "user", "content": text}], max_tokens=12)
    assert plain.choices[0].message.content == expected
    assert plain.object == "chat.completion" and plain.model == NAME
    assert plain.usage.completion_tokens == len(model.generate(text, max_new_tokens=12).token_ids)
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens
    assert plain.choices[0].finish_reason == "length"

    stream = ask(
        base, [{"role": "user", "content": text}], max_tokens=12, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1  # streamed, not one piece at the end
    assert "".join(pieces) == expected
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].object == "chat.completion.chunk"


def test_sse_wire_format_ends_with_done(srv):
    base, _ = srv
    body = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True}
    status, headers, raw = raw_post(base, "/chat/completions", body)  # the reference's path works too
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [e for e in raw.decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert all("usage" not in json.loads(e[6:]) for e in events[:-1])  # only when stream_options asks


def test_image_as_data_uri_and_as_url(model, srv, keyed, tmp_path):
    png = png_bytes()
    expected = model.generate_content([vila.Image(png), "What is shown?"], max_new_tokens=8)
    parts = [{"type": "image_url", "image_url": {"url": data_uri(png, "image/png")}}]
    parts.append({"type": "text", "text": "What is shown?"})
    answer = ask(srv[0], [{"role": "user", "content": parts}], max_tokens=8)
    assert answer.choices[0].message.content == expected

    (tmp_path / "cat.png").write_bytes(png)
    handler = functools.partial(QuietHandler, directory=str(tmp_path))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as files:
        threading.Thread(target=files.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{files.server_address[1]}/cat.png"
        parts[0] = {"type": "image_url", "image_url": {"url": url}}
        answer = ask(keyed[0], [{"role": "user", "content": parts}], key="sekret", max_tokens=8)
        assert answer.choices[0].message.content == expected
        # The same URL on a server with the default settings: 127.0.0.1 is a loopback address.
        with pytest.raises(openai.BadRequestError) as e:
            ask(srv[0], [{"role": "user", "content": parts}], max_tokens=8)
        assert e.value.code == "url_not_allowed" and "--allow-private-urls" in e.value.message
        allowed = Limits(allow_private_urls=True, max_media_bytes=len(png) - 1)
        with pytest.raises(APIError, match="at most") as e:  # the download stops at the size limit
            fetch_url(url, allowed)
        assert e.value.code == "media_too_large"
        with pytest.raises(APIError, match="HTTP 404"):
            fetch_url(url + ".missing", allowed)
        files.shutdown()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_video_as_data_uri_with_frames(model, srv):
    video = mp4_bytes()
    expected = model.generate_content([vila.Video(video), "What happens?"], num_video_frames=4, max_new_tokens=8)
    part = {"type": "video_url", "video_url": {"url": data_uri(video, "video/mp4")}, "frames": 4}
    answer = ask(srv[0], [{"role": "user", "content": [part, {"type": "text", "text": "What happens?"}]}], max_tokens=8)
    assert answer.choices[0].message.content == expected
    eight = model.generate([vila.Video(video), "What happens?"], num_video_frames=8, max_new_tokens=8)
    assert answer.usage.prompt_tokens < eight.num_prompt_tokens  # frames= was honoured


def test_multi_turn_and_system_prompt(model, srv):
    turns = [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one?"},
    ]
    answer = ask(srv[0], turns, max_tokens=8)
    assert answer.choices[0].message.content == model.generate_content(turns, max_new_tokens=8)

    system = "You answer in French."
    template = system_template(model.template, model.tokenizer, system)
    prepared = model.prepare(vila.model.vila.to_turns(turns), template=template)
    assert prepared.prompt_text.startswith(f"<|im_start|>system\n{system}<|im_end|>")
    with_system = ask(srv[0], [{"role": "system", "content": system}, *turns], max_tokens=8)
    expected = model.generate(turns, template=template, max_new_tokens=8)
    assert with_system.choices[0].message.content == expected.text
    assert with_system.usage.prompt_tokens == expected.num_prompt_tokens > answer.usage.prompt_tokens


def test_json_mode_answer_parses(srv):
    pytest.importorskip("llguidance")
    answer = ask(
        srv[0], [{"role": "user", "content": "Give me JSON."}], max_tokens=40, response_format={"type": "json_object"}
    )
    assert isinstance(json.loads(answer.choices[0].message.content), dict)


def test_stop_strings_cut_the_answer(model, srv):
    full = model.generate_content("Describe a sunny day.", max_new_tokens=12)
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    cut = full[: full.find(stop)].strip()
    for stream in (False, True):
        out = ask(
            srv[0], [{"role": "user", "content": "Describe a sunny day."}], max_tokens=12, stop=[stop], stream=stream
        )
        if stream:
            chunks = list(out)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            reason = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        else:
            text, reason = out.choices[0].message.content, out.choices[0].finish_reason
        assert (text, reason) == (cut, "stop")


def test_models_and_health(srv, keyed):
    assert [m.id for m in client(srv[0]).models.list()] == [NAME]
    with pytest.raises(openai.AuthenticationError):
        client(keyed[0], "wrong").models.list()
    status, _, raw = raw_get(keyed[0], "/health")  # for load balancers: no key
    assert status == 200 and json.loads(raw)["status"] == "ok"


# -- bad requests ----------------------------------------------------------------------------------------------

PNG_URI = data_uri(png_bytes(), "image/png")
_big = io.BytesIO()
PIL.Image.new("RGB", (500, 500), "gray").save(_big, format="PNG")  # 250,000 pixels > LIMITS.max_image_pixels
BIG_PNG_URI = data_uri(_big.getvalue(), "image/png")


def user(*parts):
    return [{"role": "user", "content": list(parts)}]


BAD = {
    "bad base64": (
        dict(messages=user({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}})),
        400,
        None,
    ),
    "not an image": (
        dict(messages=user({"type": "image_url", "image_url": {"url": data_uri(b"hello" * 10, "image/png")}})),
        400,
        None,
    ),
    "unknown part type": (dict(messages=user({"type": "audio_url", "audio_url": {"url": "x"}})), 400, None),
    "wrong model name": (dict(model="gpt-4o", messages=user({"type": "text", "text": "Hi"})), 404, "model_not_found"),
    "n=2": (dict(messages=user({"type": "text", "text": "Hi"}), n=2), 400, None),
    "max_tokens over the context": (dict(messages=user({"type": "text", "text": "Hi"}), max_tokens=10**6), 400, None),
    "prompt longer than the context": (
        dict(messages=user({"type": "text", "text": "word " * 9000})),
        400,
        "context_length_exceeded",
    ),
    "image over the pixel limit": (
        dict(messages=user({"type": "image_url", "image_url": {"url": BIG_PNG_URI}})),
        400,
        "image_too_large",
    ),
    "image over the byte limit": (
        dict(messages=user({"type": "image_url", "image_url": {"url": data_uri(b"\0" * (600 << 10), "image/png")}})),
        400,
        "media_too_large",
    ),
    "too many video frames": (
        dict(messages=user({"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}, "frames": 99})),
        400,
        None,
    ),
    "private URL": (
        dict(messages=user({"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest/x.png"}})),
        400,
        "url_not_allowed",
    ),
    "local file without --media-root": (
        dict(messages=user({"type": "image_url", "image_url": {"url": "/etc/hostname"}})),
        400,
        None,
    ),
    "ftp URL": (dict(messages=user({"type": "image_url", "image_url": {"url": "ftp://example.com/a.png"}})), 400, None),
    "temperature 5": (dict(messages=user({"type": "text", "text": "Hi"}), temperature=5), 400, None),
    "last message is the assistant's": (dict(messages=[{"role": "assistant", "content": "Hi"}]), 400, None),
    "tool message": (dict(messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}]), 400, None),
    "unknown parameter": (dict(messages=user({"type": "text", "text": "Hi"}), extra_body={"best_of": 3}), 400, None),
    "body over the size limit": (
        dict(messages=user({"type": "text", "text": "x" * (1 << 20)})),
        413,
        "request_too_large",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests_get_clean_openai_errors(srv, case):
    kwargs, status, code = BAD[case]
    kwargs = {"model": NAME, **kwargs}
    with pytest.raises(openai.APIStatusError) as e:
        client(srv[0]).chat.completions.create(**kwargs)
    assert e.value.status_code == status, e.value.message
    error = e.value.response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["code"] == code
    assert "Traceback" not in e.value.response.text


def test_missing_or_wrong_key_is_401(keyed):
    for key in (None, "wrong"):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        status, _, raw = raw_post(keyed[0], "/v1/chat/completions", {"model": NAME, "messages": []}, headers)
        assert status == 401 and json.loads(raw)["error"]["code"] == "invalid_api_key"
    assert ask(keyed[0], [{"role": "user", "content": "Hi"}], key="sekret", max_tokens=2).choices


def test_a_failing_generation_is_a_500_and_the_server_goes_on(srv, monkeypatch):
    import vila.engine

    def boom(*args, **kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(vila.engine, "decode", boom)
    with pytest.raises(openai.InternalServerError) as e:
        ask(srv[0], [{"role": "user", "content": "Hi"}], max_tokens=2)
    assert "secret" not in e.value.response.text and "Traceback" not in e.value.response.text
    monkeypatch.undo()
    assert ask(srv[0], [{"role": "user", "content": "Hi"}], max_tokens=2).usage.completion_tokens == 2


def test_malformed_json_and_unknown_path(srv):
    status, _, raw = raw_post(srv[0], "/v1/chat/completions", b"{not json")
    assert status == 400 and "not valid JSON" in json.loads(raw)["error"]["message"]
    status, _, raw = raw_get(srv[0], "/v1/completions")
    assert status == 404 and "error" in json.loads(raw)


def test_system_message_without_a_system_template_is_400(tiny_model):
    with running(tiny_model(NAME, "plain")) as (base, _):
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
        with pytest.raises(openai.BadRequestError, match="has no system prompt"):
            ask(base, messages, max_tokens=2)


def test_url_fetching_refuses_internal_addresses():
    for url in ("http://localhost/a.png", "http://10.0.0.1/a.png", "http://[::1]/a.png", "http://0.0.0.0/"):
        with pytest.raises(Exception, match="private address"):
            fetch_url(url, Limits())
    with pytest.raises(Exception, match="only http"):
        fetch_url("file:///etc/passwd", Limits())


def test_local_files_only_under_media_root(tmp_path):
    from vila.openai_protocol import MediaRef, resolve_media

    (tmp_path / "a.png").write_bytes(png_bytes())
    limits = Limits(media_root=str(tmp_path))
    for url in ("a.png", "file://" + str(tmp_path / "a.png")):
        req = ChatRequest(turns=[{"role": "user", "content": [MediaRef("image", url, "p")]}])
        resolve_media(req, limits)
        assert req.turns[0]["content"][0].source == os.path.realpath(tmp_path / "a.png")
    for url in ("../a.png", "/etc/hostname", "file:///etc/hostname"):
        req = ChatRequest(turns=[{"role": "user", "content": [MediaRef("image", url, "p")]}])
        with pytest.raises(APIError, match="outside the server's --media-root"):
            resolve_media(req, limits)


def test_stable_prefix_holds_back_what_may_change():
    assert _stable("Hello wor", ()) == "Hello wor"
    assert _stable("Hello  ", ()) == "Hello"
    assert _stable("caf\ufffd", ()) == "caf"
    assert _stable("Hello ST", ("STOP",)) == "Hello"


class _Recorder:
    """A tokenizer that notes how many ids each ``decode`` call is given."""

    def __init__(self, tok):
        self.tok, self.sizes = tok, []

    def decode(self, ids, **kwargs):
        self.sizes.append(len(ids))
        return self.tok.decode(ids, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def _follow(tok, ids, stop, stream=True):
    """Feed ``ids`` one at a time to a one-row RowTracker; its deltas, completion and the step it ended at."""
    from types import SimpleNamespace

    from vila.scheduler import Job, RowTracker

    events = []
    job = Job("r", [], {}, lambda kind, payload: events.append((kind, payload)), stop=tuple(stop), stream=stream)
    row = RowTracker(SimpleNamespace(tokenizer=tok, stop_token_ids=()), job)
    ended = len(ids)
    for k in range(1, len(ids) + 1):
        if row.step(ids[k - 1]):
            ended = k
            break
    row.finish(0)
    deltas = "".join(p for kind, p in events if kind == "delta")
    return deltas, events[-1][1], ended


def _old_follow(tok, ids, stop):
    """What the tracker answered when it decoded every answer whole at every token (the reference)."""
    for k in range(1, len(ids) + 1):
        text = tok.decode(ids[:k], skip_special_tokens=True).lstrip()
        hits = [i for i in (text.find(s) for s in stop) if i >= 0]
        if hits:
            return text[: min(hits)].strip(), "stop", k
    return tok.decode(ids, skip_special_tokens=True).strip(), "length", len(ids)


@pytest.mark.parametrize("variant", ["nvila-tiny", "vila15-tiny"])  # Qwen2 byte-level BPE; Llama byte fallback
def test_streamed_rows_decode_each_token_once_and_stop_where_a_whole_decode_would(tiny_model, variant):
    import random

    tok = tiny_model(variant).tokenizer
    rng = random.Random(0)
    texts = ["The sky is blue. The sky is wide!", "日本語のテキスト, 中文也没有空格！ emoji 😀🎉 ünï"]
    sequences = [tok(t, add_special_tokens=False).input_ids for t in texts]
    sequences += [[rng.randrange(len(tok)) for _ in range(25)] for _ in range(6)]  # invalid UTF-8 runs too
    for ids in sequences:
        full = tok.decode(ids, skip_special_tokens=True).strip()
        middle = len(full) // 2
        for stop in ([], [full[middle : middle + 2]], [full[-3:-1], full[middle - 1 : middle + 3]], ["\n\n#"]):
            stop = [s for s in stop if s.strip()] if stop else stop
            cut, reason, ended = _old_follow(tok, ids, stop)
            deltas, done, k = _follow(tok, ids, stop)
            assert (done.text, done.finish_reason, done.num_completion_tokens, k) == (cut, reason, ended, ended)
            assert deltas == cut, (ids, stop)

    # Bounded work per token: no decode while following an answer is given all of it.
    recorder = _Recorder(tok)
    ids = sequences[0] * 6
    _, done, _ = _follow(recorder, ids, ["never appears"])
    assert done.num_completion_tokens == len(ids) and max(recorder.sizes[:-1]) <= 8, recorder.sizes


# -- concurrency, queue, cancellation --------------------------------------------------------------------------


def test_16_concurrent_clients_get_their_one_by_one_answers(model, srv):
    base, app = srv
    requests = [(f"Question {i}: {'why ' * (i % 5)}?", 4 + i % 6, 0.0 if i % 8 else 0.7) for i in range(16)]
    expected = [
        model.generate_content(
            text, max_new_tokens=n, **({"do_sample": True, "temperature": t, "seed": 7} if t else {})
        )
        for text, n, t in requests
    ]

    def one(args):
        text, n, t = args
        extra = {"temperature": t, "seed": 7} if t else {}
        return ask(base, [{"role": "user", "content": text}], max_tokens=n, **extra).choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, requests))
    assert answers == expected
    assert app.state.scheduler.largest_batch > 1  # greedy requests were batched


@pytest.fixture
def decoded(monkeypatch):
    """``(tokens decoded, budget)`` of every row the engine decodes, call by call."""
    import vila.engine

    calls, real = [], vila.engine.decode

    def spy(llm, rows, **kwargs):
        out = real(llm, rows, **kwargs)
        calls.append([(len(ids), row.max_new_tokens) for ids, row in zip(out, rows)])
        return out

    monkeypatch.setattr(vila.engine, "decode", spy)
    return calls


def test_queue_full_is_503_and_a_client_leaving_mid_stream_frees_its_slot(model, decoded):
    with running(model, max_queue=1, max_batch_size=1) as (base, app):
        scheduler = app.state.scheduler
        # A: streams until the context is full (the tiny model never says its stop token here)
        conn = http.client.HTTPConnection("127.0.0.1", int(base.rsplit(":", 1)[1]), timeout=120)
        body = {"model": NAME, "messages": [{"role": "user", "content": "Hello there"}], "stream": True}
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        sock = conn.sock
        response = conn.getresponse()
        assert response.status == 200
        while not first_token(response.fp.readline()):
            pass  # A is running
        # B waits in the queue, C finds it full.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(ask, base, [{"role": "user", "content": "Hi"}], max_tokens=4)
            deadline = time.monotonic() + 60
            while scheduler.queued < 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            with pytest.raises(openai.APIStatusError) as e:
                ask(base, [{"role": "user", "content": "Hi"}], max_tokens=4)
            assert e.value.status_code == 503 and e.value.response.headers["retry-after"] == "1"
            assert e.value.response.json()["error"]["code"] == "queue_full"
            # A leaves: its generation stops and B gets the worker.
            sock.shutdown(socket.SHUT_RDWR)
            conn.close()
            assert waiting.result(timeout=120).choices[0].message.content
    (tokens, budget), *_ = decoded[0]  # A's row: stopped long before the context was full
    assert tokens < budget / 2, f"A decoded {tokens} of {budget} tokens after its client left"


def test_a_non_streaming_client_that_leaves_is_cancelled(model, srv, decoded):
    base, app = srv
    body = json.dumps({"model": NAME, "messages": [{"role": "user", "content": "Hello there"}]}).encode()
    head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    sock = socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1])))
    sock.sendall(head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    deadline = time.monotonic() + 60
    while app.state.scheduler.running == 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.3)  # generating
    sock.close()
    assert ask(base, [{"role": "user", "content": "Hi"}], max_tokens=2).usage.completion_tokens == 2
    (tokens, budget), *_ = decoded[0]  # the abandoned answer: stopped long before the context was full
    assert tokens < budget / 2, f"the abandoned request decoded {tokens} of {budget} tokens"


# -- the command line ------------------------------------------------------------------------------------------


def test_cli_serve_starts_and_answers(tmp_path):
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", VILA_API_KEY="k1")
    cmd = [sys.executable, "-m", "vila.cli", "-m", str(TINY / NAME), "--device", "cpu", "--serve", "--port", str(port)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "vila-infer --serve did not come up"
            with contextlib.suppress(OSError):
                if raw_get(f"http://127.0.0.1:{port}", "/health")[0] == 200:
                    break
            time.sleep(0.2)
        out = client(f"http://127.0.0.1:{port}", "k1").chat.completions.create(
            model=str(TINY / NAME), messages=[{"role": "user", "content": "Hi"}], max_tokens=3
        )
        assert out.model == NAME and out.usage.completion_tokens == 3
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert f"serving {NAME} on http://127.0.0.1:{port}" in err
    assert "prompt_tokens=" in err and "completion_tokens=3" in err  # the per-request log line
    assert "Traceback" not in err


def test_cli_serve_flag_checks():
    from vila.cli import build_parser, check_serve_flags
    from vila.errors import UsageError

    args = build_parser().parse_args(["-m", "some/NVILA-8B", "--serve", "--media-root", "."])
    got = check_serve_flags(args, environ={"VILA_API_KEY": "env-key"})
    assert got["host"] == "127.0.0.1" and got["settings"]["api_key"] == "env-key"
    assert got["settings"]["model_name"] == "NVILA-8B" and got["settings"]["limits"].media_root == os.path.abspath(".")
    for extra in (["--text", "hi"], ["--max-queue", "0"], ["--media-root", "/no/such/dir"], ["--port", "0"]):
        with pytest.raises(UsageError):
            check_serve_flags(build_parser().parse_args(["-m", "x", "--serve", *extra]), environ={})


# -- helpers ---------------------------------------------------------------------------------------------------


def first_token(line: bytes) -> bool:
    if not line.startswith(b"data: {"):
        return False
    choices = json.loads(line[6:])["choices"]
    return bool(choices and choices[0]["delta"].get("content"))


def raw_post(base: str, path: str, body, headers=None) -> tuple[int, dict, bytes]:
    host, port = base.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", path, data, {"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    out = resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    conn.close()
    return out


def raw_get(base: str, path: str) -> tuple[int, dict, bytes]:
    host, port = base.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", path)
    resp = conn.getresponse()
    out = resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    conn.close()
    return out


def test_stop_ends_the_running_job_and_answers_the_waiting_ones(model, decoded):
    """Shutting down: the job being answered stops within a token, the waiting ones get ShuttingDown (a 503)."""
    import threading

    from vila.scheduler import Job, Scheduler, ShuttingDown
    from vila.serve import to_api_error

    events: dict[str, list] = {"a": [], "b": []}
    running = threading.Event()

    def on(name):
        def record(kind, payload):
            events[name].append((kind, payload))
            if kind == "delta":
                running.set()

        return record

    scheduler = Scheduler(model, max_batch_size=1)
    scheduler.start()
    prompt = [{"role": "user", "content": "Hello there"}]
    scheduler.submit(Job("a", prompt, {}, on("a"), stream=True))  # until the context is full, unless stopped
    assert running.wait(60)
    scheduler.submit(Job("b", prompt, {"max_new_tokens": 4}, on("b")))
    scheduler.stop()
    assert not scheduler._thread.is_alive()
    (tokens, budget), *_ = decoded[0]
    assert tokens < budget / 2
    (kind, error), *_ = events["b"]
    assert kind == "error" and isinstance(error, ShuttingDown)
    assert to_api_error(error).status == 503
