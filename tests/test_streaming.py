"""Streaming: ``model.stream_content`` pieces add up to ``generate_content``'s answer, come token by token, and
stop when the reader does; the CLI streams to a TTY and stops on Ctrl-C."""

from __future__ import annotations

import io
import json
import os
import pty
import random
import re
import signal
import subprocess
import sys
import threading
import time
import warnings

import pytest
from conftest import INPUTS, TINY

import vila
import vila.engine
import vila.streaming
from vila.cli import main as cli_main
from vila.errors import MediaError
from vila.model.vila import VilaModel, to_turns
from vila.streaming import IncrementalDecoder, strip_pieces

IMAGE = INPUTS / "demo_img.png"


@pytest.mark.parametrize(
    "variant, parts, n",
    [
        ("nvila-tiny", [vila.Image(IMAGE), "Describe the image."], 24),
        ("nvila-tiny", ["Write a long story about a tiger."], 40),
        ("vila15-tiny", [vila.Image(IMAGE), "What is shown?"], 30),  # SentencePiece-style decoder with Strip
        ("vila15-tiny", ["hello"], 80),
        ("nvila-lite-tiny", ["Two words:"], 30),
        ("vila15-tiny", ["写一首关于猫的诗。"], 40),  # byte-fallback tokens: partial and invalid UTF-8
        ("nvila-tiny", ["```python\ndef fib(n):"], 30),
    ],
)
def test_stream_joins_to_the_answer(tiny_model, variant, parts, n):
    model = tiny_model(variant)
    expected = model.generate(parts, max_new_tokens=n)
    stream = model.stream_content(parts, max_new_tokens=n)
    pieces = list(stream)
    assert "".join(pieces) == expected.text == model.generate_content(parts, max_new_tokens=n)
    assert len(pieces) > 1  # it did stream
    assert stream.result.token_ids == expected.token_ids


def test_stream_sampling_with_seed_matches(tiny_model):
    model = tiny_model("nvila-tiny")
    kw = dict(max_new_tokens=20, do_sample=True, temperature=0.9, seed=3)
    assert "".join(model.stream_content("Say something.", **kw)) == model.generate_content("Say something.", **kw)


def test_strip_pieces_matches_str_strip():
    pieces = ["  ", "\n Hello", " ", "world", "  ", "\t", "again ", " \n"]
    assert "".join(strip_pieces(pieces)) == "".join(pieces).strip()
    assert list(strip_pieces([" ", "\n"])) == []


def test_stream_errors_reach_the_caller(tiny_model):
    model = tiny_model("nvila-tiny")
    with pytest.raises(MediaError, match="not found"):
        list(model.stream_content([vila.Image(INPUTS / "nope.png"), "hi"], max_new_tokens=4))


def test_closing_a_stream_stops_generation(tiny_model):
    model = tiny_model("nvila-tiny")
    before = threading.active_count()
    stream = model.stream_content("Tell me everything.", max_new_tokens=2000)
    first = next(stream)
    stream.close()
    assert first
    assert threading.active_count() == before  # the worker thread ended instead of generating 2000 tokens
    assert stream.result is None


def test_stream_rejects_its_own_streamer(tiny_model):
    model = tiny_model("nvila-tiny")
    with pytest.raises(vila.errors.UsageError):
        model.stream_content("hi", streamer=object())


def _read_terminal(leader: int, take) -> None:
    """Hands each chunk a child writes to its pseudo-terminal to ``take`` until the child closes it."""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the child closed the terminal
            return
        if not chunk:
            return
        take(chunk)


def _cli_in_a_terminal(args):
    """Runs vila-infer with stdout on a pseudo-terminal (so it streams) and returns what it printed."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    cmd = [sys.executable, "-m", "vila.cli", "-m", str(TINY / "nvila-tiny"), "--device", "cpu", *args]
    leader, follower = pty.openpty()
    proc = subprocess.Popen(cmd, stdout=follower, stderr=subprocess.DEVNULL, env=env)
    os.close(follower)
    chunks = []
    _read_terminal(leader, chunks.append)
    out = b"".join(chunks)
    proc.wait(timeout=300)
    os.close(leader)
    assert proc.returncode == 0
    return out.decode().replace("\r\n", "\n")


def test_cli_streams_to_a_terminal_and_prints_the_same_answer(tiny_model):
    args = ["--media", str(IMAGE), "--text", "Describe.", "--max-new-tokens", "12"]
    streamed = _cli_in_a_terminal(args)
    answer = tiny_model("nvila-tiny").generate_content([vila.Image(IMAGE), "Describe."], max_new_tokens=12)
    assert streamed == answer + "\n" and answer


# -- pieces as soon as they are whole characters ----------------------------------------------------------------

TEXTS = [
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)",
    "日本語のテキストにはスペースがありません。中文也没有空格！",
    "emoji 😀🎉 and ünïcödé, mixed with 中文 and   spaces  ",
]


@pytest.mark.parametrize("variant", ["nvila-tiny", "vila15-tiny"])  # Qwen2 byte-level BPE; Llama with byte fallback
def test_decoder_gives_each_complete_character_at_once(tiny_model, variant):
    """After every token the text given out is the whole decode so far, unless that ends inside a character
    (U+FFFD) or in a run of byte-fallback tokens (which a later byte may turn into U+FFFDs)."""
    tok = tiny_model(variant).tokenizer
    rng = random.Random(0)
    specials = sorted(i for i, t in tok.added_tokens_decoder.items() if t.special)
    sequences = [tok(text, add_special_tokens=False).input_ids for text in TEXTS]
    sequences += [[rng.randrange(len(tok)) for _ in range(30)] for _ in range(20)]  # invalid UTF-8 runs too
    sequences += [[*sequences[1][:5], specials[0], *sequences[1][5:]]]
    held = 0
    for ids in sequences:
        decoder, out, last = IncrementalDecoder(tok), "", None
        for k, token in enumerate(ids, 1):
            out += decoder.push([token])
            last = last if token in specials else token  # special tokens are skipped, as in the answer
            full = tok.decode(ids[:k], skip_special_tokens=True)
            assert full.startswith(out)
            if out != full:
                held += 1
                assert full.endswith("\ufffd") or tok.convert_ids_to_tokens(last).startswith("<0x"), (ids[:k], out)
    assert held < sum(map(len, sequences)) / 2


@pytest.mark.parametrize(
    "variant, parts",
    [("nvila-tiny", [vila.Image(IMAGE), "Describe the image."]), ("nvila-lite-tiny", ["Two words:"])],
)
def test_stream_pieces_come_token_by_token(tiny_model, variant, parts):
    """The tiny checkpoints' answers have few spaces: each token still arrives as its own piece."""
    model = tiny_model(variant)
    stream = model.stream_content(parts, max_new_tokens=24)
    seen = []
    for _ in stream:
        seen.append(stream.num_tokens)  # tokens generated when this piece arrived
    assert len(seen) >= len(stream.result.token_ids) - 1
    assert all(n <= i + 2 for i, n in enumerate(seen)), seen


# -- stopping when the reader stops -----------------------------------------------------------------------------

STOP_SCRIPT = r"""
import sys, threading, time
import torch, vila

class Count:  # a stopping criterion that only counts decode steps
    def __init__(self):
        self.n = 0
    def __call__(self, input_ids, scores, **kwargs):
        self.n += 1
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

model = vila.load(sys.argv[1], device="cpu", dtype="float32")
N, PROMPT, KW = 3, [vila.Image(sys.argv[2]), "Describe the image."], dict(max_new_tokens=2000)

def report(how, count):
    time.sleep(0.3)  # a generation still running would count on meanwhile
    generating = sum(t.name == "vila-generate" for t in threading.enumerate())
    print(how, count.n, generating, flush=True)

c = Count()  # leave a for loop early; the stream, never named, is dropped
for i, _ in enumerate(model.stream_content(PROMPT, stopping_criteria=[c], **KW)):
    if i + 1 == N:
        break
report("break", c)

c = Count()
stream = model.stream_content(PROMPT, stopping_criteria=[c], **KW)
for _ in range(N):
    next(stream)
stream.close()
report("close", c)

c = Count()
stream = model.stream_content(PROMPT, stopping_criteria=[c], **KW)
it = iter(stream)
for _ in range(N):
    next(it)
del stream, it
report("drop", c)

c, chat = Count(), model.chat(max_new_tokens=2000)
for i, _ in enumerate(chat.stream(*PROMPT, stopping_criteria=[c])):
    if i + 1 == N:
        break
assert chat.history == []
report("chat", c)

c = Count()  # still referenced when the program ends: paused, then stopped at exit
kept = model.stream_content(PROMPT, stopping_criteria=[c], **KW)
for _ in range(N):
    next(kept)
report("kept", c)
"""


def test_leaving_a_stream_early_stops_generation_and_exits_cleanly(tmp_path):
    script = tmp_path / "stop.py"
    script.write_text(STOP_SCRIPT)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    p = subprocess.run(
        [sys.executable, str(script), str(TINY / "nvila-tiny"), str(IMAGE)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert "terminate called" not in p.stderr
    rows = {how: (int(steps), int(threads)) for how, steps, threads in (ln.split() for ln in p.stdout.splitlines())}
    assert set(rows) == {"break", "close", "drop", "chat", "kept"}
    for how, (steps, threads) in rows.items():
        assert steps <= 3 + 1, (how, steps)  # the reader took 3 pieces, one per token: at most one token more
        assert threads == (how == "kept"), (how, threads)  # the generating thread ended (or waits)


def test_ctrl_c_stops_a_streaming_cli_at_once():
    """SIGINT while vila-infer streams a long answer to a terminal: exit 130 at once, the answer's line ended
    and one line on stderr, no traceback."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    cmd = [sys.executable, "-m", "vila.cli", "-m", str(TINY / "nvila-tiny"), "--device", "cpu"]
    cmd += ["--text", "Tell me everything.", "--max-new-tokens", "5000"]
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        cmd,
        stdout=follower,
        stderr=subprocess.PIPE,
        env=env,
        # a shell's background job ignores SIGINT, and the child would inherit that
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    os.close(follower)
    printed, started = [], threading.Event()

    def took(chunk: bytes) -> None:
        printed.append(chunk)
        started.set()

    reader = threading.Thread(target=_read_terminal, args=(leader, took), daemon=True)
    reader.start()
    try:
        assert started.wait(240), "no answer streamed"
        proc.send_signal(signal.SIGINT)
        t0 = time.perf_counter()
        stderr = proc.communicate(timeout=60)[1].decode()
        assert time.perf_counter() - t0 < 30
        reader.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(leader)
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines() == ["vila-infer: interrupted"], stderr
    assert b"".join(printed).endswith(b"\r\n")  # the message does not land in the middle of the answer's line


# -- max_new_tokens beyond the context; progress on a silent terminal -------------------------------------------


def test_max_new_tokens_is_capped_at_what_the_context_leaves(tiny_model, monkeypatch):
    model = tiny_model("nvila-tiny")
    prompts = ["hi", "Describe a cat in great detail, please."]
    lengths = [model.prepare(to_turns(p)).inputs_embeds.shape[0] for p in prompts]
    context = max(lengths) + 5
    monkeypatch.setattr(VilaModel, "context_length", property(lambda self: context))
    warning = rf"max_new_tokens=1000000 is more than the model's context \({context} positions"
    with pytest.warns(UserWarning, match=warning):
        result = model.generate("hi", max_new_tokens=1000000)
    assert len(result.token_ids) <= context - lengths[0]
    with pytest.warns(UserWarning, match=warning):
        assert "".join(model.stream_content("hi", max_new_tokens=1000000)) == result.text
    with pytest.warns(UserWarning, match=warning):
        answers = vila.engine.run(model, [vila.engine.Request(p, {"max_new_tokens": 1000000}) for p in prompts])
    assert [len(a.token_ids) <= context - n for a, n in zip(answers, lengths)] == [True, True]
    assert answers[0].token_ids == result.token_ids
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # what fits is not warned about
        model.generate("hi", max_new_tokens=context - lengths[0])


def test_cli_caps_max_new_tokens_with_one_line(monkeypatch, capsys):
    monkeypatch.setattr(VilaModel, "context_length", property(lambda self: 40))
    args = ["-m", str(TINY / "nvila-tiny"), "--device", "cpu", "--text", "hi", "--output-format", "json"]
    assert cli_main([*args, "--max-new-tokens", "1000000"]) == 0
    out, err = capsys.readouterr()
    row = json.loads(out)
    assert row["num_prompt_tokens"] + row["num_generated_tokens"] <= 40
    assert err.splitlines() == [
        "vila-infer: warning: max_new_tokens=1000000 is more than the model's context (40 positions, prompt included) "
        "has room for; the answer stops when the context is full"
    ]


class _Stream(io.StringIO):
    """stdout / stderr stand-in that logs every write, in order, with the other one."""

    def __init__(self, name: str, log: list, tty: bool):
        super().__init__()
        self.name, self.log, self.tty = name, log, tty

    def isatty(self) -> bool:
        return self.tty

    def write(self, text: str) -> int:
        self.log.append((self.name, text))
        return super().write(text)


@pytest.mark.parametrize("streamed", [True, False])  # stdout a terminal (streamed) or a file
def test_cli_shows_progress_on_a_silent_terminal_and_erases_it(tiny_model, monkeypatch, streamed):
    monkeypatch.setattr(vila.streaming, "PROGRESS_AFTER_S", 0.0)  # 2 s of silence, made 0 for the test
    monkeypatch.setattr(vila.streaming, "PROGRESS_TICK_S", 0.005)
    log: list[tuple[str, str]] = []
    out, err = _Stream("out", log, tty=streamed), _Stream("err", log, tty=True)
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    args = [
        "-m",
        str(TINY / "nvila-tiny"),
        "--device",
        "cpu",
        "--text",
        "Tell me everything.",
        "--max-new-tokens",
        "60",
    ]
    assert cli_main(args) == 0
    monkeypatch.undo()
    assert out.getvalue() == tiny_model("nvila-tiny").generate_content("Tell me everything.", max_new_tokens=60) + "\n"
    drawn = [text for name, text in log if name == "err" and "generating:" in text]
    assert drawn and re.search(r"\d+ tokens", drawn[-1]), err.getvalue()
    shown = False  # every counter drawn is erased before the answer goes on, and at the end
    for name, text in log:
        if name == "err":
            shown = "generating:" in text or (shown and text != "\033[K")
        else:
            assert not shown
    assert not shown
