"""Issue 12 (items 1 and 10) end to end: the real gateway, the official ``openai`` client, a real
media server on loopback. Each refusal is a 400 with OpenAI's error object that says why, and
never tells the client what a host name resolved to."""

from __future__ import annotations

import http.server
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from omniserve.config import MediaLimits
from tests.conftest import RunningServer, start_server
from tests.media_factory import png_bytes
from tests.test_media_fetch import gzip_bomb

FETCH_LOGGER = "omniserve.media.fetch"


class _MediaServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    paths: list[str]


class _MediaHandler(http.server.BaseHTTPRequestHandler):
    """/pic.png (a real PNG), /bomb (200 MiB of zeros as ``Content-Encoding: gzip, gzip``),
    /to-user-info (a redirect to /pic.png with ``user:s3cret@``), else 404."""

    server: _MediaServer

    def do_GET(self) -> None:
        self.server.paths.append(self.path)
        if self.path == "/pic.png":
            self._send(png_bytes(32, 32), {"Content-Type": "image/png"})
        elif self.path == "/bomb":
            self._send(gzip_bomb(), {"Content-Type": "image/png", "Content-Encoding": "gzip, gzip"})
        elif self.path == "/to-user-info":
            self.send_response(302)
            self.send_header("Location", f"http://user:s3cret@127.0.0.1:{self.server.server_address[1]}/pic.png")
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.send_error(404)

    def _send(self, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(200)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def media_server() -> Iterator[_MediaServer]:
    httpd = _MediaServer(("127.0.0.1", 0), _MediaHandler)
    httpd.paths = []
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def media_port(media_server: _MediaServer) -> int:
    media_server.paths.clear()
    return media_server.server_address[1]


@pytest.fixture(scope="module")
def guarded_server(tiny_omni: Path) -> Iterator[RunningServer]:
    """A gateway with the default media policy: loopback and private addresses refused."""
    srv = start_server(tiny_omni, name="tiny-omni", engine={"max_model_len": 2048}, server={"media": MediaLimits()})
    yield srv
    srv.stop()


def _refused(server: RunningServer, url: str) -> dict[str, Any]:
    """Ask the gateway to look at ``url``; return the OpenAI error object of the 400 it must answer."""
    content = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": url}}]
    with pytest.raises(openai.BadRequestError) as info:
        server.client().chat.completions.create(
            model="tiny-omni", messages=[{"role": "user", "content": content}], max_tokens=2
        )
    body = info.value.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error"
    assert str(body["error"]["param"]).startswith("messages[0].content[1]")  # the image part
    return body["error"]


def test_gateway_refuses_a_compression_bomb(omni_server: RunningServer, media_port: int) -> None:
    """12.1: refused on its Content-Encoding, before any inflation; the gateway keeps serving."""
    gzip_bomb()  # built before the clock starts
    started = time.perf_counter()
    error = _refused(omni_server, f"http://127.0.0.1:{media_port}/bomb")
    elapsed = time.perf_counter() - started
    assert error["code"] == "unsupported_media_encoding"
    assert "sent a gzip-encoded body" in error["message"] and "accepts only identity" in error["message"]
    assert elapsed < 2.0, f"took {elapsed:.3f} s"  # inflating 200 MiB took over a second by itself
    out = omni_server.client().chat.completions.create(
        model="tiny-omni", messages=[{"role": "user", "content": "still there?"}], max_tokens=1
    )
    assert out.choices


def test_gateway_keeps_resolved_addresses_out_of_errors(
    guarded_server: RunningServer, media_server: _MediaServer, media_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    """12.10a: the client learns the kind of address, the server log the address itself."""
    with caplog.at_level(logging.WARNING, logger=FETCH_LOGGER):
        error = _refused(guarded_server, f"http://localhost:{media_port}/pic.png")
    assert error["code"] == "media_url_forbidden"
    assert "'localhost' resolves to a loopback address" in error["message"]
    assert "127.0.0.1" not in error["message"] and "::1" not in error["message"]
    logged = [r.getMessage() for r in caplog.records if r.name == FETCH_LOGGER and r.levelno == logging.WARNING]
    assert any("'localhost'" in line and ("127.0.0.1" in line or "::1" in line) for line in logged), logged
    assert media_server.paths == []


def test_gateway_refuses_urls_with_user_info(
    omni_server: RunningServer, media_server: _MediaServer, media_port: int
) -> None:
    """12.10c: refused before connecting, on the first URL and on a redirect hop (this gateway allows
    loopback, so nothing else stops them), and the password is not echoed back."""
    for url in (f"http://user:s3cret@127.0.0.1:{media_port}/pic.png", f"http://user@127.0.0.1:{media_port}/pic.png"):
        error = _refused(omni_server, url)
        assert error["code"] == "media_url_forbidden"
        assert "user name or password" in error["message"] and "s3cret" not in error["message"]
    assert media_server.paths == []
    error = _refused(omni_server, f"http://127.0.0.1:{media_port}/to-user-info")
    assert "user name or password" in error["message"] and "s3cret" not in error["message"]
    assert media_server.paths == ["/to-user-info"]  # the hop with credentials was never requested
