"""Tests for vila/download.py, against a local HTTP server on 127.0.0.1."""

from __future__ import annotations

import http.server
import ipaddress
import threading

import pytest

from vila import download
from vila.download import DownloadError, DownloadPolicy, fetch, fetch_to
from vila.errors import MediaError
from vila.media import Image, load_image

PNG = (
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x02\x00\x00\x00\x90wS\xde"
    b"\x00\x00\x00\x0cIDATx\x9cc\xf8\xcf\xc0\x00\x00\x03\x01\x01\x00\xc9\xfe\x92\xef\x00\x00\x00\x00IEND\xaeB`\x82"
)
RELEASE = threading.Event()  # the slow path waits on it, so the server thread ends with the test


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path == "/slow":
            RELEASE.wait(10)
            return
        if self.path == "/drip":  # one byte every 0.1 s: each read is quick, the whole download is not
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            for _ in range(100):
                if RELEASE.wait(0.1):
                    return
                try:
                    self.wfile.write(b"x")
                    self.wfile.flush()
                except OSError:
                    return
            return
        if self.path.startswith("/redirect?"):
            self.send_response(302)
            self.send_header("Location", self.path.split("?", 1)[1])
            self.end_headers()
            return
        body, kind = {
            "/a.png": (PNG, "image/png"),
            "/big": (bytes(1000), "application/octet-stream"),
            "/page": (b"<!DOCTYPE html><html><body>Sign in</body></html>", "text/html"),
        }.get(self.path, (b"", ""))
        self.send_response(200 if body else 404)
        self.send_header("Content-Type", kind or "text/plain")
        # /big streams without a Content-Length, so only counting the bytes can stop it
        if self.path != "/big":
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def base():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    RELEASE.set()
    server.shutdown()
    server.server_close()


def test_fetch_and_image_url(base):
    assert fetch(f"{base}/a.png") == PNG
    assert load_image(Image(f"{base}/a.png")).size == (1, 1)


def test_size_limit_stops_the_download(base):
    with pytest.raises(DownloadError, match=r"/big is over the .* MiB limit.*; pass a smaller or local file") as e:
        fetch(f"{base}/big", DownloadPolicy(max_bytes=999))
    assert e.value.code == "too_large" and "\n" not in str(e.value)
    with pytest.raises(DownloadError, match="over the") as e:  # declared by Content-Length
        fetch(f"{base}/a.png", DownloadPolicy(max_bytes=len(PNG) - 1))
    assert e.value.size == len(PNG)
    assert len(fetch(f"{base}/big", DownloadPolicy(max_bytes=1000))) == 1000


def test_timeout_is_one_line(base):
    with pytest.raises(DownloadError, match=r"no answer within 0.2 s; try again") as e:
        fetch(f"{base}/slow", DownloadPolicy(timeout_s=0.2))
    assert e.value.code == "timeout" and f"{base}/slow" in str(e.value)


def test_deadline_bounds_a_dripping_download(base):
    """A server that sends a byte at a time, each well within the per-read timeout, is still cut off at the
    whole-download deadline (the server's defence against slow-drip URLs)."""
    import time

    t0 = time.monotonic()
    with pytest.raises(DownloadError, match=r"/drip took longer than 0.5 s") as e:
        fetch(f"{base}/drip", DownloadPolicy(timeout_s=1.0, deadline_s=0.5))
    assert e.value.code == "timeout"
    assert time.monotonic() - t0 < 5  # not the 10 s the drip would take; a bound, not a speed figure


def test_http_error_and_scheme(base):
    with pytest.raises(MediaError, match=r"cannot download .*/missing: HTTP 404 .*; check the URL"):
        fetch(f"{base}/missing")
    with pytest.raises(DownloadError, match="only http"):
        fetch("file:///etc/passwd")
    with pytest.raises(DownloadError, match="not http"):
        fetch(f"{base}/redirect?ftp://10.0.0.1/a.png")  # an FTP hop would skip the address check


def test_private_addresses_refused_only_under_the_server_policy(base):
    server_policy = DownloadPolicy(allow_private=False)
    with pytest.raises(DownloadError, match=r"127\.0\.0\.1.*private address") as e:
        fetch(f"{base}/a.png", server_policy)
    assert e.value.code == "url_not_allowed"
    assert fetch(f"{base}/redirect?/a.png") == PNG  # the library's default reaches any host


def test_redirect_to_a_private_address_is_refused(base, monkeypatch):
    # Let the test server's own address pass, so the redirect is what the policy has to catch.
    checked = []

    def private(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        checked.append(str(ip))
        return str(ip) != "127.0.0.1"

    monkeypatch.setattr(download, "is_private_address", private)
    server_policy = DownloadPolicy(allow_private=False)
    assert fetch(f"{base}/redirect?/a.png", server_policy) == PNG
    with pytest.raises(DownloadError, match=r"169\.254\.169\.254.*private address") as e:
        fetch(f"{base}/redirect?http://169.254.169.254/latest/meta-data/", server_policy)
    assert e.value.code == "url_not_allowed" and checked[-1] == "169.254.169.254"


def test_real_private_ranges():
    for ip in ("127.0.0.1", "10.1.2.3", "192.168.0.1", "169.254.169.254", "::1", "::ffff:10.0.0.1", "0.0.0.0"):
        assert download.is_private_address(ipaddress.ip_address(ip)), ip
    assert not download.is_private_address(ipaddress.ip_address("8.8.8.8"))


def test_web_page_instead_of_media_is_one_line(base, tmp_path, monkeypatch):
    with pytest.raises(MediaError, match=r"/page is an HTML page, not an image or a video; vila reads") as e:
        load_image(Image(f"{base}/page"))
    assert "\n" not in str(e.value)

    from vila.video import load_video

    monkeypatch.setenv("VILA_CACHE", str(tmp_path))
    with pytest.raises(MediaError, match=r"/page is an HTML page"):
        load_video(f"{base}/page", num_frames=2, progress=False)
    assert not any((tmp_path / "videos").iterdir())  # not cached


def test_fetch_to_writes_a_file(base, tmp_path):
    path = tmp_path / "a.png"
    with open(path, "wb") as out:
        assert fetch_to(f"{base}/a.png", out, progress=False) == len(PNG)
    assert path.read_bytes() == PNG
