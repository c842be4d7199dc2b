"""HttpFetcher against a real HTTP server that misbehaves on purpose: endless bodies, stalls,
dropped connections, Range requests, and a bandwidth budget."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from edged.ota.fetcher import FetchError, HttpFetcher, NoSpace, NotFound, TooLarge, ensure_space

BODY = bytes(range(256)) * 400  # 100 KiB


class Server:
    """A threaded HTTP server; `mode` says how it answers /file."""

    def __init__(self) -> None:
        self.mode = "normal"
        self.requests: list[dict[str, str]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                outer.requests.append(dict(self.headers))
                if self.path != "/file":
                    self.send_error(404)
                    return
                getattr(outer, f"_{outer.mode}")(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def _normal(self, handler: BaseHTTPRequestHandler) -> None:
        start = 0
        ranged = handler.headers.get("Range")
        if ranged:
            start = int(ranged.removeprefix("bytes=").rstrip("-"))
            if start >= len(BODY):
                handler.send_response(416)
                handler.end_headers()
                return
            handler.send_response(206)
            handler.send_header("Content-Range", f"bytes {start}-{len(BODY) - 1}/{len(BODY)}")
        else:
            handler.send_response(200)
        handler.send_header("Content-Length", str(len(BODY) - start))
        handler.end_headers()
        handler.wfile.write(BODY[start:])

    def _endless(self, handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.end_headers()
        try:
            while True:
                handler.wfile.write(b"A" * 65536)
        except OSError:
            pass

    def _stall(self, handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(BODY)))
        handler.end_headers()
        handler.wfile.write(BODY[:1000])
        handler.wfile.flush()
        time.sleep(5)

    def _broken(self, handler: BaseHTTPRequestHandler) -> None:
        """Half the body, then the connection drops: a retry resumes with Range."""
        self.mode = "normal"
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(BODY)))
        handler.end_headers()
        handler.wfile.write(BODY[: len(BODY) // 2])
        handler.wfile.flush()
        handler.connection.close()

    def _error(self, handler: BaseHTTPRequestHandler) -> None:
        handler.send_error(503)


@pytest.fixture
def server() -> Iterator[Server]:
    server = Server()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


def test_download_resumes_with_range(server: Server, tmp_path: Path) -> None:
    """Bytes already on disk are not fetched again: the request carries Range and gets 206."""
    dest = tmp_path / "a.part"
    dest.write_bytes(BODY[:30_000])
    with_fetcher = HttpFetcher(server.url)
    with_fetcher.download("file", dest, len(BODY))
    assert dest.read_bytes() == BODY
    assert server.requests[-1]["Range"] == "bytes=30000-"


def test_dropped_connection_is_retried_and_resumed(server: Server, tmp_path: Path) -> None:
    """A transfer that breaks off is retried from where it stopped."""
    server.mode = "broken"
    dest = tmp_path / "a.part"
    HttpFetcher(server.url, attempts=3).download("file", dest, len(BODY))
    assert dest.read_bytes() == BODY
    assert len(server.requests) == 2 and server.requests[1]["Range"] == f"bytes={len(BODY) // 2}-"


def test_endless_body_is_cut_at_the_cap(server: Server, tmp_path: Path) -> None:
    """A server that never stops sending costs at most the cap (plus one chunk of slack)."""
    server.mode = "endless"
    with pytest.raises(TooLarge, match="longer than the 200000 bytes"):
        HttpFetcher(server.url).fetch("file", 200_000)
    dest = tmp_path / "b.part"
    with pytest.raises(TooLarge):
        HttpFetcher(server.url).download("file", dest, 200_000)
    assert dest.stat().st_size <= 200_000


def test_stalled_server_times_out_retries_and_reports(server: Server) -> None:
    """A server that stops mid-body is given up on after the retries, with a FetchError."""
    server.mode = "stall"
    started = time.monotonic()
    with pytest.raises(FetchError, match="stalled"):
        HttpFetcher(server.url, timeout_s=0.5, attempts=2).fetch("file", len(BODY))
    assert len(server.requests) == 2
    assert time.monotonic() - started < 4.5  # far less than the server's 5 s stall each


def test_http_errors_and_missing_files(server: Server) -> None:
    """404 is NotFound (not retried); 503 is a FetchError after the retries."""
    with pytest.raises(NotFound):
        HttpFetcher(server.url).fetch("missing", 10)
    assert len(server.requests) == 1
    server.mode = "error"
    with pytest.raises(FetchError, match="HTTP 503"):
        HttpFetcher(server.url, attempts=2).fetch("file", 10)


def test_bandwidth_budget_slows_the_transfer(server: Server) -> None:
    """At 200 KB/s a 100 KiB file takes about half a second, not a millisecond."""
    started = time.monotonic()
    assert HttpFetcher(server.url, bytes_per_s=200_000).fetch("file", len(BODY)) == BODY
    assert time.monotonic() - started >= 0.4


def test_disk_space_is_checked_before_starting(tmp_path: Path) -> None:
    """A download that would eat into the reserve is refused up front."""
    with pytest.raises(NoSpace, match="reserve"):
        ensure_space(tmp_path, 1 << 60, 0)
    ensure_space(tmp_path, 1, 0)
