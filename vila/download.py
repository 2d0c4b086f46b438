"""Fetching media URLs: the one downloader behind ``vila.Image(url)``, ``vila.Video(url)`` and the server.

A :class:`DownloadPolicy` says how much may be fetched, how long it may take and which hosts may be reached.
The library's default reaches any host (a user's own URLs, a NAS on the LAN); the server builds a policy
with ``allow_private=False`` so a request cannot make it fetch from loopback, link-local or private
addresses (a cloud metadata endpoint, an admin page): the host is resolved once, every address checked, and
the connection made to the address that was checked, on every redirect too.
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from .errors import MediaError

CHUNK = 1 << 16


class DownloadError(MediaError):
    """A URL could not be fetched. ``code`` says why, for callers that answer with their own words (the server):
    ``bad_url``, ``url_not_allowed``, ``too_large``, ``timeout``, ``http_error``, ``unsupported_media``, ``failed``.
    """

    def __init__(self, detail: str, hint: str, code: str = "failed", *, size: int | None = None) -> None:
        super().__init__(f"{detail}; {hint}")
        self.detail = detail  # what is wrong, for a caller that knows better what to do
        self.code = code
        self.size = size


@dataclass(frozen=True)
class DownloadPolicy:
    """Limits on one download."""

    max_bytes: int | None = None  # None: no limit
    timeout_s: float = 30.0  # connecting, and each read
    deadline_s: float | None = None  # the whole download; None: no limit (a large video on a slow link is fine)
    allow_private: bool = True  # loopback, link-local and private hosts; the server turns this off
    max_redirects: int = 5


def fetch(
    url: str, policy: DownloadPolicy = DownloadPolicy(), *, refuse: Callable[[bytes], None] | None = None
) -> bytes:
    """The body of ``url``, in memory. ``refuse`` is shown the first bytes and may raise to stop early (a web page
    where an image was expected)."""
    buf = io.BytesIO()
    fetch_to(url, buf, policy, refuse=refuse, progress=False)
    return buf.getvalue()


def fetch_to(
    url: str,
    out: IO[bytes],
    policy: DownloadPolicy = DownloadPolicy(),
    *,
    refuse: Callable[[bytes], None] | None = None,
    progress: bool | None = None,
    desc: str = "downloading",
) -> int:
    """Write the body of ``url`` to ``out``; the number of bytes written. ``progress``: None shows a bar on a
    terminal. Every failure is one :class:`DownloadError` naming the URL and what to do."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise DownloadError(f"cannot download {url}: only http(s) URLs can be fetched", "pass a local file", "bad_url")
    deadline = None if policy.deadline_s is None else time.monotonic() + policy.deadline_s
    request = urllib.request.Request(url, headers={"User-Agent": "vila"})
    try:
        with _opener(policy).open(request, timeout=policy.timeout_s) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            if total is not None and policy.max_bytes is not None and total > policy.max_bytes:
                raise _too_large(url, total, policy.max_bytes)
            written = _copy(url, response, out, policy, deadline, refuse, _bar(total, progress, desc))
    except DownloadError:
        raise
    except urllib.error.HTTPError as e:
        raise DownloadError(f"cannot download {url}: HTTP {e.code} {e.reason}", "check the URL", "http_error") from e
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        if isinstance(reason, TimeoutError):
            raise DownloadError(
                f"cannot download {url}: no answer within {policy.timeout_s:g} s",
                "try again or pass a local file",
                "timeout",
            ) from e
        raise DownloadError(
            f"cannot download {url}: {reason}", "check the URL and your network, or pass a local file"
        ) from e
    if written == 0:
        raise DownloadError(f"{url} returned no data", "check the URL")
    if total is not None and written != total:
        raise DownloadError(f"download of {url} stopped after {written} of {total} bytes", "try again")
    return written


# Bytes refuse() sees at once: enough for every signature it checks, however the server splits its packets.
SNIFF_BYTES = 4096


def _copy(
    url: str,
    response: Any,
    out: IO[bytes],
    policy: DownloadPolicy,
    deadline: float | None,
    refuse: Callable[[bytes], None] | None,
    bar: Any,
) -> int:
    written = 0
    # read1 returns what has arrived (up to CHUNK); read(CHUNK) would wait for a whole chunk, so a server dripping
    # a byte at a time, each within the per-read timeout, could hold the download far past the deadline.
    read = getattr(response, "read1", response.read)
    head = b""  # the first bytes, held until refuse() has seen enough of them to know the content
    with bar:
        while True:
            chunk = read(CHUNK)
            if deadline is not None and time.monotonic() > deadline:
                raise DownloadError(
                    f"download of {url} took longer than {policy.deadline_s:g} s",
                    "pass a smaller or local file",
                    "timeout",
                )
            if refuse is not None:
                head += chunk
                if chunk and len(head) < SNIFF_BYTES:
                    continue
                if head:
                    refuse(head)
                chunk, head, refuse = head, b"", None
            if not chunk:
                break
            written += len(chunk)
            if policy.max_bytes is not None and written > policy.max_bytes:
                raise _too_large(url, written, policy.max_bytes)
            out.write(chunk)
            bar.update(len(chunk))
    return written


def _too_large(url: str, size: int, limit: int) -> DownloadError:
    return DownloadError(
        f"{url} is over the {limit / (1 << 20):.1f} MiB limit (at least {size / (1 << 20):.1f} MiB)",
        "pass a smaller or local file",
        "too_large",
        size=size,
    )


def _bar(total: int | None, progress: bool | None, desc: str) -> Any:
    from tqdm import tqdm

    show = progress if progress is not None else sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr, disable=not show, leave=False)


# -- the private-address policy ---------------------------------------------------------------------------------


def _opener(policy: DownloadPolicy) -> urllib.request.OpenerDirector:
    if policy.allow_private:
        return urllib.request.build_opener(_Redirects(policy.max_redirects))
    # No proxy: a proxy would resolve the host itself, after the check.
    return urllib.request.build_opener(
        urllib.request.ProxyHandler({}), _Redirects(policy.max_redirects), _CheckedHTTP(), _CheckedHTTPS()
    )


class _Redirects(urllib.request.HTTPRedirectHandler):
    def __init__(self, max_redirects: int) -> None:
        self.max_redirections = max_redirects

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> Any:
        if urllib.parse.urlsplit(newurl).scheme.lower() not in ("http", "https"):
            raise DownloadError(
                f"{req.full_url} redirects to {newurl}, which is not http(s)", "pass a local file", "bad_url"
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def is_private_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Loopback, link-local, private, reserved or multicast: what a server refuses to fetch from."""
    ip = getattr(ip, "ipv4_mapped", None) or ip
    return not ip.is_global or ip.is_multicast


def _connect_public(host: str, port: int, timeout: Any, source_address: Any = None) -> socket.socket:
    """Resolve ``host`` once, refuse it if any address is not public, connect to the first checked address (a
    second DNS answer cannot point the connection elsewhere)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    refused = [a for a in addresses if is_private_address(a)]
    if refused:
        raise DownloadError(
            f"refusing to download from {host}: it resolves to a loopback, link-local or private address ({refused[0]})",
            "allow private addresses (DownloadPolicy(allow_private=True)) to fetch it",
            "url_not_allowed",
        )
    return socket.create_connection((str(addresses[0]), port), timeout, source_address)


class _Checked:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._create_connection = lambda address, *a: _connect_public(address[0], address[1], *a)


class _CheckedHTTPConnection(_Checked, http.client.HTTPConnection):
    pass


class _CheckedHTTPSConnection(_Checked, http.client.HTTPSConnection):
    pass


class _CheckedHTTP(urllib.request.HTTPHandler):
    def http_open(self, req: Any) -> Any:
        return self.do_open(_CheckedHTTPConnection, req)


class _CheckedHTTPS(urllib.request.HTTPSHandler):
    def https_open(self, req: Any) -> Any:
        return self.do_open(_CheckedHTTPSConnection, req, context=self._context)
