"""OpenAI chat-completions requests -> vila prompts, and the JSON the server answers with.

Nothing here imports FastAPI: :func:`parse_chat_request` checks a decoded JSON body against the parts of
OpenAI's ``POST /v1/chat/completions`` schema the models can honour and raises :class:`APIError` (an
OpenAI-style error with its HTTP status) for anything else; :func:`resolve_media` turns the ``image_url`` /
``video_url`` parts into :class:`vila.Image` / :class:`vila.Video` (``data:`` URIs, http(s) URLs fetched with
the safety limits of :class:`Limits`, files under ``media_root``). The ``video_url`` part, with its part-level
``frames`` and ``fps``, is the extension of the reference's server (``server.py`` in NVlabs/VILA).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import math
import os
import re
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from .download import DownloadError, DownloadPolicy, fetch
from .media import Image, Video, is_url
from .prompt import Template, render_chat_template

MB = 1 << 20


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server (``vila-infer --serve`` flags of the same names)."""

    max_body_bytes: int = 64 * MB  # the whole JSON body; base64 media inflate it by a third
    max_media_bytes: int = 32 * MB  # one image or video, decoded or downloaded
    max_media_items: int = 16  # images and videos in one request
    max_image_pixels: int = 40_000_000  # width x height of one image (a 4K VILA-HD input is ~14 MP)
    max_video_frames: int = 256  # frames sampled from one video
    max_tokens: int | None = None  # completion tokens per request; None: the model's context
    url_timeout_s: float = 10.0  # connect, each read, and the whole download of one media URL
    allow_private_urls: bool = False  # fetch from loopback, link-local and private addresses too
    media_root: str | None = None  # local files under this folder may be named in image_url / video_url


class APIError(Exception):
    """An error answered as OpenAI does: ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass
class MediaRef:
    """An ``image_url`` / ``video_url`` part before its bytes are fetched."""

    kind: str  # "image" | "video"
    url: str
    param: str  # where it is in the request, for error messages


@dataclass
class ChatRequest:
    """A checked request: turns for ``VilaModel.generate`` and the generation settings."""

    turns: list[dict[str, Any]]  # [{"role": "user" | "assistant", "content": [str | MediaRef | Image | Video]}]
    system: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    response_format: dict[str, Any] | None = None
    stream: bool = False
    include_usage: bool = False
    num_video_frames: int | None = None
    fps: float | None = None
    media: list[MediaRef] = field(default_factory=list)


# Parameters OpenAI's client or common frameworks send that change nothing here.
_IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "use_cache", "modalities"}
_KNOWN = {
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "n",
    "stream",
    "stream_options",
    "response_format",
    "presence_penalty",
    "frequency_penalty",
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "num_beams",
} | _IGNORED


def parse_chat_request(body: Any, *, model_names: tuple[str, ...], limits: Limits, context_length: int) -> ChatRequest:
    """Check a decoded request body; media stay :class:`MediaRef` until :func:`resolve_media`."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    unknown = sorted(set(body) - _KNOWN)
    if unknown:
        raise bad_request(f"unrecognized request argument supplied: {unknown[0]}", param=unknown[0])
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("you must provide a model parameter", param="model")
    if model not in model_names:
        raise APIError(
            404,
            f"the model {model!r} does not exist; this server serves {model_names[0]!r} (see GET /v1/models)",
            param="model",
            code="model_not_found",
        )
    req = ChatRequest(turns=[])
    _parse_sampling(body, req, limits, context_length)
    _parse_messages(body.get("messages"), req, limits)
    return req


def _parse_sampling(body: dict[str, Any], req: ChatRequest, limits: Limits, context_length: int) -> None:
    n = body.get("n")
    if n is not None and n != 1:
        raise bad_request(f"n must be 1 (one answer per request), got {n!r}", param="n")
    if body.get("num_beams") not in (None, 1):
        raise bad_request("num_beams must be 1; beam search is not supported", param="num_beams")
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise bad_request(f"{name} is not supported; leave it unset or 0", param=name)
    if body.get("logprobs") or body.get("top_logprobs"):
        raise bad_request("logprobs are not supported; leave logprobs unset or false", param="logprobs")
    for name in ("logit_bias", "tools", "functions", "tool_choice", "function_call"):
        if body.get(name) not in (None, {}, [], "none"):
            raise bad_request(f"{name} is not supported by this server; remove it", param=name)

    max_tokens = body.get("max_completion_tokens")
    param = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, param = body.get("max_tokens"), "max_tokens"
    cap = min(limits.max_tokens or context_length, context_length)
    if max_tokens is not None:
        _int(max_tokens, param, low=1)
        if max_tokens > cap:
            raise bad_request(
                f"{param} is too large: {max_tokens}; this server allows at most {cap} completion tokens per request",
                param=param,
            )
    req.max_tokens = max_tokens if max_tokens is not None else limits.max_tokens
    if body.get("temperature") is not None:
        req.temperature = _number(body["temperature"], "temperature", 0.0, 2.0)
    if body.get("top_p") is not None:
        req.top_p = _number(body["top_p"], "top_p", 0.0, 1.0)
        if req.top_p == 0:
            raise bad_request("top_p must be in (0, 1], got 0", param="top_p")
    if body.get("top_k") is not None:
        req.top_k = _int(body["top_k"], "top_k", low=0)
    if body.get("seed") is not None:
        req.seed = _int(body["seed"], "seed", low=0, high=2**63 - 1)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
            raise bad_request("stop must be a non-empty string or a list of up to 4 non-empty strings", param="stop")
        req.stop = tuple(stop)
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad_request("stream must be true or false", param="stream")
    req.stream = bool(stream)
    options = body.get("stream_options")
    if options is not None:
        if not req.stream:
            raise bad_request("stream_options is only allowed when stream is true", param="stream_options")
        if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
            raise bad_request('stream_options must be {"include_usage": true|false}', param="stream_options")
        req.include_usage = bool(options.get("include_usage"))
    fmt = body.get("response_format")
    if fmt is not None:
        from .errors import VilaError
        from .structured import parse_response_format

        if not isinstance(fmt, dict):
            raise bad_request('response_format must be an object such as {"type": "json_object"}', "response_format")
        try:
            parsed = parse_response_format(fmt)
        except VilaError as e:
            raise bad_request(str(e), param="response_format") from e
        req.response_format = fmt if parsed is not None else None


def _parse_messages(messages: Any, req: ChatRequest, limits: Limits) -> None:
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list of {role, content} objects", param="messages")
    frames: set[int] = set()
    fps: set[float] = set()
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_request(f"{where} must be an object with role and content", param=where)
        role = message.get("role")
        content = message.get("content")
        if role in ("system", "developer"):
            if i != 0:
                raise bad_request(f"{where}: a {role} message is only allowed first", param=f"{where}.role")
            req.system = _text_only(content, where)
            continue
        if role == "assistant":
            req.turns.append({"role": "assistant", "content": [_text_only(content, where)]})
            continue
        if role != "user":
            raise bad_request(
                f"{where}.role must be system, user or assistant, got {role!r} (tools are not supported)",
                param=f"{where}.role",
            )
        if isinstance(content, str):
            req.turns.append({"role": "user", "content": [content]})
            continue
        if not isinstance(content, list) or not content:
            raise bad_request(f"{where}.content must be a string or a non-empty list of parts", f"{where}.content")
        parts: list[Any] = []
        for k, part in enumerate(content):
            pwhere = f"{where}.content[{k}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise bad_request(f"{pwhere}.text must be a string", param=f"{pwhere}.text")
                parts.append(part["text"])
            elif kind in ("image_url", "video_url"):
                url = part.get(kind)
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str) or not url:
                    raise bad_request(f'{pwhere}.{kind} must be {{"url": "..."}}', param=f"{pwhere}.{kind}")
                ref = MediaRef(kind.split("_")[0], url, pwhere)
                if kind == "video_url":
                    if part.get("frames") is not None:
                        frames.add(_int(part["frames"], f"{pwhere}.frames", 1, limits.max_video_frames))
                    if part.get("fps") is not None:
                        fps.add(_number(part["fps"], f"{pwhere}.fps", 0.0, 1000.0))
                req.media.append(ref)
                parts.append(ref)
            else:
                raise bad_request(
                    f"{pwhere}.type must be text, image_url or video_url, got {kind!r}", param=f"{pwhere}.type"
                )
        req.turns.append({"role": "user", "content": parts})
    if not req.turns or req.turns[-1]["role"] != "user":
        raise bad_request("the last message must be the user's", param="messages")
    if len(req.media) > limits.max_media_items:
        raise bad_request(
            f"the request has {len(req.media)} images and videos; this server allows at most {limits.max_media_items}",
            param="messages",
        )
    if len(frames) > 1 or len(fps) > 1:
        raise bad_request("all videos of one request must use the same frames and fps", param="messages")
    req.num_video_frames = frames.pop() if frames else None
    req.fps = fps.pop() if fps else None


def _text_only(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        if all(isinstance(p.get("text"), str) for p in content):
            return "".join(p["text"] for p in content)
    raise bad_request(f"{where}.content must be a string or a list of text parts", param=f"{where}.content")


def _int(value: Any, name: str, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"{name} must be an integer, got {value!r}", param=name)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise bad_request(f"{name} must be {bounds}, got {value}", param=name)
    return value


def _number(value: Any, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad_request(f"{name} must be a number, got {value!r}", param=name)
    if not low <= value <= high:
        raise bad_request(f"{name} must be between {low:g} and {high:g}, got {value}", param=name)
    return float(value)


# -- system prompts -----------------------------------------------------------------------------------------

# What precedes the system text in the templates whose system prompt is a fixed string (the default text
# follows it there; a request's system message replaces that text).
_SYSTEM_PREFIX = {
    "vicuna_v1": "",
    "llama_3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n",
    "hermes-2": "<|im_start|>system\n",
}


@dataclass(frozen=True)
class _ChatTemplateWithSystem(Template):
    """The tokenizer's chat template with a system message first (its own default system prompt otherwise)."""

    def render(self, messages: Any, tokenizer: Any = None) -> str:
        return render_chat_template([("system", self.system), *messages], tokenizer)


def system_template(template: Template, tokenizer: Any, text: str) -> Template:
    """``template`` with ``text`` as its system prompt, or a 400 when the checkpoint's template has none."""
    if template.style == "auto" and "system" in (getattr(tokenizer, "chat_template", None) or ""):
        fields = {f.name: getattr(template, f.name) for f in dataclasses.fields(Template)}
        return _ChatTemplateWithSystem(**{**fields, "system": text})
    if template.style != "auto" and template.name in _SYSTEM_PREFIX:
        return dataclasses.replace(template, system=_SYSTEM_PREFIX[template.name] + text)
    raise bad_request(
        f"this model's prompt template ({template.name}) has no system prompt; "
        "put the instructions in the first user message instead",
        param="messages[0].role",
    )


# -- media ---------------------------------------------------------------------------------------------------

_DATA_URI = re.compile(r"^data:([^,;]*)((?:;[^,;]*)*),(.*)$", re.DOTALL | re.IGNORECASE)


def resolve_media(req: ChatRequest, limits: Limits) -> None:
    """Replace every :class:`MediaRef` of ``req`` by a :class:`vila.Image` / :class:`vila.Video` (blocking I/O:
    run it in a worker thread). Images are checked against the pixel limit here, from their header."""
    for turn in req.turns:
        turn["content"] = [_load(p, limits) if isinstance(p, MediaRef) else p for p in turn["content"]]


def _load(ref: MediaRef, limits: Limits) -> Image | Video:
    url = ref.url
    if url[:5].lower() == "data:":
        data = _decode_data_uri(ref, limits)
        source: Any = data
    elif is_url(url):
        data = fetch_url(url, limits, ref.param)
        source = data
    else:
        source = _local_path(ref, limits)
        data = None
    if ref.kind == "image":
        _check_image(data if data is not None else source, ref, limits)
        return Image(source)
    return Video(source)


def _decode_data_uri(ref: MediaRef, limits: Limits) -> bytes:
    m = _DATA_URI.match(ref.url)
    if m is None:
        raise bad_request(f"{ref.param} has a malformed data: URI; use data:<mime>;base64,<data>", param=ref.param)
    mime, params, payload = m.group(1).lower(), m.group(2).lower(), m.group(3)
    if ";base64" not in params:
        raise bad_request(f"{ref.param}: only base64 data: URIs are supported (data:<mime>;base64,...)", ref.param)
    if mime and not mime.startswith(f"{ref.kind}/") and mime != "application/octet-stream":
        raise bad_request(f"{ref.param}: a {ref.kind} part cannot carry {mime!r} data", param=ref.param)
    payload = re.sub(r"\s+", "", payload)
    if len(payload) * 3 // 4 > limits.max_media_bytes:
        raise _too_large(ref, len(payload) * 3 // 4, limits)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad_request(f"{ref.param}: the data: URI is not valid base64 ({e})", param=ref.param) from e


def _too_large(ref: MediaRef, size: int, limits: Limits) -> APIError:
    return bad_request(
        f"{ref.param}: the {ref.kind} is {size / MB:.1f} MiB; this server accepts at most "
        f"{limits.max_media_bytes / MB:.1f} MiB per image or video",
        param=ref.param,
        code="media_too_large",
    )


def _local_path(ref: MediaRef, limits: Limits) -> str:
    url = ref.url
    if url[:7].lower() == "file://":
        url = urllib.parse.unquote(urllib.parse.urlparse(url).path)
    elif "://" in url:
        raise bad_request(f"{ref.param}: unsupported URL scheme; use http(s)://, a data: URI or a file", ref.param)
    if limits.media_root is None:
        raise bad_request(
            f"{ref.param}: local files are not served; send the {ref.kind} as a data: URI or an http(s) URL "
            "(or start the server with --media-root DIR)",
            param=ref.param,
        )
    root = os.path.realpath(limits.media_root)
    path = os.path.realpath(os.path.join(root, url))
    if os.path.commonpath([root, path]) != root:
        raise bad_request(f"{ref.param}: the path is outside the server's --media-root", param=ref.param)
    if not os.path.exists(path):
        raise bad_request(f"{ref.param}: no such file under the server's --media-root: {url}", param=ref.param)
    if os.path.isfile(path) and os.path.getsize(path) > limits.max_media_bytes:
        raise _too_large(ref, os.path.getsize(path), limits)
    return path


def _check_image(source: Any, ref: MediaRef, limits: Limits) -> None:
    import PIL.Image

    try:
        with PIL.Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            width, height = img.size
    except (PIL.UnidentifiedImageError, OSError, ValueError) as e:
        raise bad_request(f"{ref.param} is not an image the server can read ({type(e).__name__})", ref.param) from e
    if width * height > limits.max_image_pixels:
        raise bad_request(
            f"{ref.param}: the image is {width}x{height} pixels; this server accepts at most "
            f"{limits.max_image_pixels} pixels per image",
            param=ref.param,
            code="image_too_large",
        )


def fetch_url(url: str, limits: Limits, param: str = "url") -> bytes:
    """GET an http(s) URL into memory under the server's limits: at most ``max_media_bytes``, within
    ``url_timeout_s`` in all, and from public addresses only unless ``allow_private_urls`` (every redirect
    checked alike); any failure is a 400 naming ``param``."""
    policy = DownloadPolicy(
        max_bytes=limits.max_media_bytes,
        timeout_s=limits.url_timeout_s,
        deadline_s=limits.url_timeout_s,
        allow_private=limits.allow_private_urls,
        max_redirects=3,
    )
    try:
        return fetch(url, policy)
    except DownloadError as e:
        if e.code == "too_large":
            raise _too_large(MediaRef("media", url, param), e.size or 0, limits) from e
        if e.code == "url_not_allowed":
            raise bad_request(
                f"{param}: {e.detail}; the server fetches those only when started with --allow-private-urls",
                param=param,
                code=e.code,
            ) from e
        raise bad_request(f"{param}: {e.detail}; check the URL, or send the media as a data: URI", param=param) from e


# -- responses -----------------------------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(
    rid: str, created: int, model: str, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage(prompt_tokens, completion_tokens),
        "system_fingerprint": None,
    }


def chunk_body(
    rid: str,
    created: int,
    model: str,
    delta: dict[str, Any] | None,
    finish_reason: str | None = None,
    usage_: dict[str, int] | None = None,
    include_usage: bool = False,
) -> dict[str, Any]:
    """One ``chat.completion.chunk``; ``delta=None`` is the usage-only last chunk (no choices)."""
    body: dict[str, Any] = {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": []
        if delta is None
        else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }
    if include_usage:
        body["usage"] = usage_
    return body
