"""Multi-turn conversations: ``model.chat()`` and ``vila-infer --chat``.

A session keeps the turns and renders the whole conversation with the model's template on every turn, as
``generate_content`` does for a list of ``{"role", "content"}`` turns. Media already encoded in the session
come from its :class:`~vila.cache.FeatureCache` instead of being decoded and encoded again.

    chat = model.chat(max_new_tokens=256)
    chat.send(vila.Image("cat.jpg"), "What is this?")
    chat.send("And what colour is it?")          # the image stays in the conversation, not re-encoded
    for piece in chat.stream("Tell me more."):   # streamed, then added to the history
        print(piece, end="", flush=True)
"""

from __future__ import annotations

import os
import sys
from typing import Any, TextIO

from . import engine
from .cache import FeatureCache
from .engine import GenerationResult
from .errors import UsageError, VilaError
from .media import Image, Video, is_url, prompt_part
from .processor import Turn
from .streaming import Progress, TextStream, TokenClock

CHAT_HELP = """commands:
  /image PATH   attach an image (file or URL) to your next message
  /video PATH   attach a video (file, URL or folder of frames) to your next message
  /reset        forget the conversation (and attached media)
  /help         this help
  /quit         leave (also /exit, Ctrl-D)
anything else is your message; attached media go before its text."""


class ChatSession:
    """A conversation with one model. ``generation`` settings apply to every turn; ``send`` / ``stream``
    take per-turn overrides. Answers come from the engine (:mod:`vila.engine`); the model is only passed on to it,
    so this module does not import the model's."""

    def __init__(
        self,
        model: Any,
        *,
        cache: FeatureCache | None = None,
        decode_time_tokens: bool = False,
        **generation: Any,
    ):
        if "streamer" in generation or "cache" in generation:
            raise UsageError("ChatSession manages streaming and the media cache itself")
        self.model = model
        self.cache = cache if cache is not None else FeatureCache()
        self.decode_time_tokens = decode_time_tokens
        self.generation = generation
        self.turns: list[Turn] = []
        self.last_result: GenerationResult | None = None

    @property
    def history(self) -> list[dict[str, Any]]:
        """The conversation as ``{"role", "content"}`` dicts (what ``generate_content`` accepts)."""
        return [{"role": t.role, "content": list(t.content)} for t in self.turns]

    def reset(self) -> None:
        """Forget the conversation; the media cache stays (it is keyed by content)."""
        self.turns.clear()
        self.last_result = None

    def send(self, *parts: Any, **overrides: Any) -> str:
        """Add a user message (text and media parts, in order) and return the answer."""
        user = _user_turn(parts)
        settings = {**self.generation, **overrides}
        result = engine.generate(self.model, self._conversation(user), cache=self.cache, **settings)
        return self._commit(user, result)

    def stream(self, *parts: Any, **overrides: Any) -> ChatStream:
        """Like :meth:`send`, an iterator over pieces of the answer; the turn joins the history once the answer
        is complete. Leaving the loop early (or ``close()``) stops the generation and adds nothing. Time tokens
        are not rewritten while streaming (use :meth:`send` for such video answers)."""
        user = _user_turn(parts)
        settings = {**self.generation, **overrides}
        pieces = engine.stream_content(self.model, self._conversation(user), cache=self.cache, **settings)
        return ChatStream(self, user, pieces)

    def _conversation(self, user: Turn) -> list[dict[str, Any]]:
        return [*self.history, {"role": user.role, "content": user.content}]

    def _commit(self, user: Turn, result: GenerationResult) -> str:
        self.turns += [user, Turn("assistant", [result.text])]
        self.last_result = result
        if self.decode_time_tokens:
            return self.model.decode_time_tokens(result.text, result.video_durations)
        return result.text


class ChatStream:
    """The pieces of one streamed chat answer (a :class:`vila.streaming.TextStream` that adds the turn to the
    session when it ends). It holds no reference back from the stream, so dropping it stops the generation."""

    def __init__(self, session: ChatSession, user: Turn, pieces: TextStream):
        self._session: ChatSession | None = session
        self._user = user
        self._pieces = pieces

    def __iter__(self) -> ChatStream:
        return self

    def __next__(self) -> str:
        try:
            return next(self._pieces)
        except StopIteration:
            if self._session is not None:
                self._session._commit(self._user, self._pieces.result)
                self._session = None
            raise

    def __enter__(self) -> ChatStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def result(self) -> GenerationResult | None:
        return self._pieces.result

    @property
    def num_tokens(self) -> int:
        return self._pieces.num_tokens

    def close(self) -> None:
        """Stop generating (within one token); an unfinished answer is not added to the conversation."""
        self._pieces.close()


def _user_turn(parts: tuple[Any, ...]) -> Turn:
    if len(parts) == 1 and isinstance(parts[0], (list, tuple)):
        parts = tuple(parts[0])
    parts = tuple(prompt_part(part) for part in parts)
    if not parts or all(isinstance(p, str) and not p.strip() for p in parts):
        raise UsageError("the message is empty; type some text or attach media")
    return Turn("user", list(parts))


def run_chat(
    session: ChatSession,
    *,
    stream: bool,
    first: list[Any] | None = None,
    stdin: TextIO = sys.stdin,
    stdout: TextIO = sys.stdout,
    stderr: TextIO = sys.stderr,
) -> int:
    """The ``vila-infer --chat`` loop: reads messages and /commands, prints answers. Errors in one turn are
    reported and the conversation goes on. ``first``: a first message (from ``--media`` / ``--text``)."""
    interactive = stdin.isatty()
    pending: list[Any] = []
    if interactive:
        print("vila chat: type a message, /help for commands, /quit to leave", file=stderr)
    queued = [first] if first else []
    while True:
        if queued:
            parts = queued.pop()
            text = None
        else:
            if interactive:
                print("> ", end="", file=stderr, flush=True)
            line = stdin.readline()
            if not line:
                break
            text = line.strip()
            if not text:
                continue
            if text.startswith("/"):
                command, _, arg = text.partition(" ")
                arg = arg.strip()
                if command in ("/quit", "/exit"):
                    break
                if command == "/help":
                    print(CHAT_HELP, file=stderr)
                elif command == "/reset":
                    session.reset()
                    pending.clear()
                    print("(conversation reset)", file=stderr)
                elif command in ("/image", "/video"):
                    problem = _check_media_arg(command, arg)
                    if problem:
                        print(f"error: {problem}", file=stderr)
                    else:
                        pending.append(Image(arg) if command == "/image" else Video(arg))
                        print(f"(attached {command[1:]} {arg})", file=stderr)
                else:
                    print(f"error: unknown command {command}; /help lists the commands", file=stderr)
                continue
            parts = [*pending, text]
        pending = []
        try:
            if stream:
                with session.stream(*parts) as pieces, Progress(lambda: pieces.num_tokens, stderr) as progress:
                    for piece in pieces:
                        progress.write(stdout, piece)
                stdout.write("\n")
            else:
                counter = TokenClock()
                with Progress(lambda c=counter: c.steps, stderr):
                    answer = session.send(*parts, streamer=counter)
                stdout.write(answer + "\n")
            stdout.flush()
        except VilaError as e:
            print(f"error: {e}", file=stderr)
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the chat (at the prompt, it leaves)
            stdout.write("\n")
            print("(answer interrupted; not added to the conversation)", file=stderr)
    return 0


def _check_media_arg(command: str, arg: str) -> str | None:
    if not arg:
        return f"{command} needs a path or URL, e.g. {command} photo.jpg"
    if is_url(arg) or os.path.exists(os.path.expanduser(arg)):
        return None
    return f"{arg} not found; check the path"
