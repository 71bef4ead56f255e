"""fetch_media_bytes against a real HTTP server on 127.0.0.1 and real files: the SSRF and size guards."""

from __future__ import annotations

import asyncio
import base64
import functools
import gzip
import http.server
import ipaddress
import logging
import os
import re
import shutil
import ssl
import subprocess
import threading
import time
import tracemalloc
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

import omniserve.media.fetch as fetch_module
from omniserve.config import MediaLimits
from omniserve.errors import MediaError, MediaFetchForbidden, MediaTooLarge, UnsupportedMediaEncoding
from omniserve.media import fetch_media_bytes

BODY = b"media-bytes"
BIG = b"x" * 5000
PARAM = "messages[0].content[1].image_url"
BOMB_INFLATED = 200 * 2**20


@functools.cache
def gzip_bomb() -> bytes:
    """200 MiB of zeros gzipped twice: under a kilobyte on the wire (``Content-Encoding: gzip, gzip``).

    Built a mebibyte at a time so the test itself never holds the inflated size.
    """
    inner = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: the gzip container
    zeros = bytes(2**20)
    layer = b"".join(inner.compress(zeros) for _ in range(BOMB_INFLATED // len(zeros))) + inner.flush()
    return gzip.compress(layer, 9)


class _Handler(http.server.BaseHTTPRequestHandler):
    """Routes: /ok, /redirect?to=URL, /chain/N (N redirects then /ok), /loop, /sleep, /trickle,
    /big (with Content-Length), /big-unsized (no Content-Length), /bomb (Content-Encoding: gzip, gzip),
    /bomb-unlabelled (the same bytes, no Content-Encoding), /encoded?ce=X (BODY labelled
    Content-Encoding: X), /transfer-encoded (Transfer-Encoding: gzip, chunked), anything else 404."""

    server: _Server

    def do_GET(self) -> None:
        self.server.paths.append(self.path)
        url = urlsplit(self.path)
        route = getattr(self, "_route_" + url.path.strip("/").split("/")[0].replace("-", "_"), None)
        if route is None:
            self._send(404, b"not here")
        else:
            route(url)

    def _send(self, status: int, body: bytes, *, sized: bool = True, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if sized:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _route_ok(self, url: Any) -> None:
        self._send(200, BODY)

    def _route_redirect(self, url: Any) -> None:
        self._send(302, b"", headers={"Location": parse_qs(url.query)["to"][0]})

    def _route_chain(self, url: Any) -> None:
        left = int(url.path.rsplit("/", 1)[1])
        self._send(302, b"", headers={"Location": f"/chain/{left - 1}" if left > 1 else "/ok"})

    def _route_loop(self, url: Any) -> None:
        self._send(301, b"", headers={"Location": "/loop"})

    def _route_sleep(self, url: Any) -> None:
        if not self.server.stopping.wait(5):
            self._send(200, BODY)

    def _route_trickle(self, url: Any) -> None:
        """One byte every 50 ms: each read is quick, only a deadline on the whole fetch stops it."""
        self.send_response(200)
        self.end_headers()
        for _ in range(100):
            if self.server.stopping.wait(0.05):
                return
            try:
                self.wfile.write(b"x")
                self.wfile.flush()
            except OSError:  # the client gave up, as it should
                return

    def _route_big(self, url: Any) -> None:
        self._send(200, BIG)

    def _route_big_unsized(self, url: Any) -> None:
        self._send(200, BIG, sized=False)  # HTTP/1.0: the body ends when the connection closes

    def _route_bomb(self, url: Any) -> None:
        self._send(200, gzip_bomb(), headers={"Content-Encoding": "gzip, gzip", "Content-Type": "image/png"})

    def _route_bomb_unlabelled(self, url: Any) -> None:
        self._send(200, gzip_bomb())

    def _route_encoded(self, url: Any) -> None:
        """BODY labelled with the coding the query names, ignoring Accept-Encoding as a careless server would."""
        self._send(200, BODY, headers={"Content-Encoding": parse_qs(url.query, keep_blank_values=True)["ce"][0]})

    def _route_transfer_encoded(self, url: Any) -> None:
        self.send_response(200)
        self.send_header("Transfer-Encoding", "gzip, chunked")
        self.end_headers()
        packed = gzip.compress(BODY)
        self.wfile.write(f"{len(packed):x}\r\n".encode() + packed + b"\r\n0\r\n\r\n")

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    paths: list[str]
    stopping: threading.Event


@pytest.fixture(scope="module")
def server() -> Iterator[_Server]:
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.paths, httpd.stopping = [], threading.Event()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.stopping.set()
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def base(server: _Server) -> str:
    server.paths.clear()
    return f"http://127.0.0.1:{server.server_address[1]}"


def fetch(ref: str, **limits: Any) -> bytes:
    return asyncio.run(fetch_media_bytes(ref, MediaLimits(**limits), param=PARAM))


def local(ref: str, **limits: Any) -> bytes:
    """Fetch with private addresses allowed, as the local test server needs."""
    return fetch(ref, allow_private_media_addresses=True, **limits)


def refused(error: type[MediaError], ref: str, **limits: Any) -> MediaError:
    with pytest.raises(error) as info:
        fetch(ref, **limits)
    assert info.value.param == PARAM
    return info.value


# --- data: URLs -------------------------------------------------------------------------------


def test_data_url_decodes() -> None:
    assert fetch("data:image/png;base64," + base64.b64encode(BODY).decode()) == BODY
    assert fetch("DATA:application/octet-stream;BASE64," + base64.b64encode(BODY).decode()) == BODY


@pytest.mark.parametrize(
    "payload",
    ["not base64!", "aGVsbG8", "aGVs bG8=", "aGVs\nbG8=", "aGVsbG8-_w==", "aGVsbG8é"],
    ids=["symbols", "bad-padding", "space", "newline", "urlsafe", "non-ascii"],
)
def test_data_url_invalid_base64_refused(payload: str) -> None:
    error = refused(MediaError, "data:image/png;base64," + payload)
    assert "base64" in error.message
    assert not isinstance(error, MediaTooLarge | MediaFetchForbidden)


def test_data_url_must_be_base64() -> None:
    assert "base64" in refused(MediaError, "data:text/plain,hello").message
    assert "Malformed" in refused(MediaError, "data:image/png;base64").message


def test_empty_data_url_refused() -> None:
    assert "empty" in refused(MediaError, "data:image/png;base64,").message


def test_data_url_over_limit_refused_from_encoded_length() -> None:
    valid = "data:image/png;base64," + base64.b64encode(b"a" * 1001).decode()
    error = refused(MediaTooLarge, valid, max_media_bytes=1000)
    assert "1000" in error.message
    # Size is judged before decoding: an invalid payload that is too long is "too large", not "invalid".
    refused(MediaTooLarge, "data:image/png;base64," + "!" * 4000, max_media_bytes=1000)
    assert fetch("data:image/png;base64," + base64.b64encode(b"a" * 1000).decode(), max_media_bytes=1000)


# --- http(s) ----------------------------------------------------------------------------------


def test_http_fetch_when_private_addresses_allowed(base: str) -> None:
    assert local(f"{base}/ok") == BODY
    assert local(base.replace("127.0.0.1", "localhost") + "/ok") == BODY


def test_loopback_refused_by_default_without_any_request(
    base: str, server: _Server, caplog: pytest.LogCaptureFixture
) -> None:
    error = refused(MediaFetchForbidden, f"{base}/ok")
    assert "loopback" in error.message
    # A host NAME is only caught where the connection is made, after resolving: same refusal.
    with caplog.at_level(logging.WARNING, logger=fetch_module.__name__):
        error = refused(MediaFetchForbidden, base.replace("127.0.0.1", "localhost") + "/ok")
    assert "'localhost' resolves to a loopback address" in error.message
    # The address a name resolves to is the server's business: logged, never told to the client.
    assert "127.0.0.1" not in error.message and "::1" not in error.message
    assert any("localhost" in r.getMessage() and ("127.0.0.1" in r.getMessage() or "::1" in r.getMessage())
               for r in caplog.records if r.levelno == logging.WARNING)  # fmt: skip
    assert server.paths == []


@pytest.mark.parametrize(
    "host",
    [
        "169.254.169.254",
        "10.0.0.1",
        "172.16.0.1",
        "192.168.1.1",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "240.0.0.1",
        "255.255.255.255",
        "[::1]",
        "[::]",
        "[::ffff:127.0.0.1]",
        "[::ffff:169.254.169.254]",
        "[fd00::1]",
        "[fe80::1]",
        "[ff02::1]",
        "2130706433",  # 127.0.0.1 in decimal: caught after resolution
        "0x7f.1",
    ],
)
def test_non_public_addresses_refused(host: str) -> None:
    started = time.monotonic()
    refused(MediaFetchForbidden, f"http://{host}/latest/meta-data/", fetch_timeout_seconds=5)
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("8.8.8.8", None),
        ("2606:4700:4700::1111", None),
        ("::ffff:8.8.8.8", None),
        ("127.0.0.1", "loopback"),
        ("169.254.169.254", "link-local"),
        ("100.100.100.100", "shared (carrier-grade NAT)"),
        ("64:ff9b::a00:1", "private"),  # NAT64 of 10.0.0.1
        ("2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1
        ("fc00::1", "private"),
    ],
)
def test_forbidden_address_reason(address: str, reason: str | None) -> None:
    assert fetch_module.forbidden_address_reason(ipaddress.ip_address(address)) == reason


@pytest.mark.parametrize(
    "ref", ["ftp://example.com/a.png", "gopher://example.com/", "javascript:alert(1)", "ws://example.com/"]
)
def test_other_schemes_refused(ref: str) -> None:
    assert "scheme" in refused(MediaFetchForbidden, ref).message


def test_each_redirect_hop_is_rechecked_against_allowed_domains(base: str, server: _Server) -> None:
    first = base.replace("127.0.0.1", "localhost")
    ref = f"{first}/redirect?to={base}/ok"  # localhost -> 127.0.0.1
    assert local(ref, allowed_media_domains=("localhost", "127.0.0.1")) == BODY
    server.paths.clear()
    with pytest.raises(MediaFetchForbidden, match="allowed domains"):
        local(ref, allowed_media_domains=("localhost",))
    assert server.paths == ["/redirect?to=" + f"{base}/ok"]  # the second hop never reached the server


@pytest.mark.parametrize("target", ["file:///etc/passwd", "ftp://example.com/x", "gopher://127.0.0.1:6379/_INFO"])
def test_redirect_to_other_scheme_refused(base: str, target: str) -> None:
    with pytest.raises(MediaFetchForbidden, match="scheme"):
        local(f"{base}/redirect?to={target}")


def test_redirect_to_private_address_refused_at_connection(
    base: str, server: _Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With 127.0.0.1 playing a public host, a redirect to a NAME that resolves to a private address
    (as DNS rebinding would) is caught by the connection-time check, not by a literal-IP pre-check."""
    real_reason, real_resolve = fetch_module.forbidden_address_reason, fetch_module._resolve

    def reason(address: Any) -> str | None:
        return None if str(address) == "127.0.0.1" else real_reason(address)

    async def resolve(host: str, port: int) -> list[Any]:
        return [ipaddress.ip_address("10.1.2.3")] if host == "rebind.test" else await real_resolve(host, port)

    monkeypatch.setattr(fetch_module, "forbidden_address_reason", reason)
    monkeypatch.setattr(fetch_module, "_resolve", resolve)
    port = server.server_address[1]
    assert fetch(f"{base}/ok") == BODY  # the first hop's host is acceptable
    with pytest.raises(MediaFetchForbidden, match=r"'rebind\.test' resolves to a private address") as info:
        fetch(f"{base}/redirect?to=http://rebind.test:{port}/ok")
    assert "10.1.2.3" not in info.value.message
    assert server.paths == ["/ok", f"/redirect?to=http://rebind.test:{port}/ok"]


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """An HTTPS server on 127.0.0.1 whose self-signed certificate names only "localhost"."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost"],
        check=True, capture_output=True,
    )  # fmt: skip
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.paths, httpd.stopping = [], threading.Event()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1], cert
    httpd.stopping.set()
    httpd.shutdown()
    httpd.server_close()


def test_tls_verifies_the_host_name_while_dialling_the_checked_address(
    tls_server: tuple[int, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guarded backend connects to an IP, yet certificate checks (and SNI) still use the URL's name."""
    port, cert = tls_server
    real_reason = fetch_module.forbidden_address_reason
    monkeypatch.setattr(fetch_module, "_ssl_context", lambda: ssl.create_default_context(cafile=str(cert)))
    monkeypatch.setattr(fetch_module, "forbidden_address_reason", lambda a: None if a.is_loopback else real_reason(a))
    assert fetch(f"https://localhost:{port}/ok") == BODY
    with pytest.raises(MediaError, match="Could not fetch"):
        fetch(f"https://127.0.0.1:{port}/ok")  # the certificate does not name this address


def test_redirects_followed_up_to_the_limit(base: str, server: _Server) -> None:
    assert local(f"{base}/chain/2", max_redirects=2) == BODY
    with pytest.raises(MediaError, match=r"Too many redirects.*limit: 1"):
        local(f"{base}/chain/2", max_redirects=1)
    server.paths.clear()
    with pytest.raises(MediaError, match="Too many redirects"):
        local(f"{base}/loop", max_redirects=3)
    assert len(server.paths) == 4  # the first request and three followed redirects
    with pytest.raises(MediaError, match="Too many redirects"):
        local(f"{base}/chain/1", max_redirects=0)


@pytest.mark.parametrize("route", ["sleep", "trickle"])
def test_fetch_deadline_covers_the_whole_fetch(base: str, route: str) -> None:
    started = time.monotonic()
    with pytest.raises(MediaError, match=r"timed out \(limit: 0\.5 s"):
        local(f"{base}/{route}", fetch_timeout_seconds=0.5)
    assert time.monotonic() - started < 2.0


@pytest.mark.parametrize("route", ["big", "big-unsized"])
def test_body_over_limit_refused(base: str, route: str) -> None:
    with pytest.raises(MediaTooLarge, match="limit is 1000 bytes"):
        local(f"{base}/{route}", max_media_bytes=1000)
    assert local(f"{base}/{route}", max_media_bytes=len(BIG)) == BIG


def test_compression_bomb_refused_before_inflating(base: str) -> None:
    """Issue 12.1: ~500 bytes labelled ``Content-Encoding: gzip, gzip`` used to inflate to 200 MiB in
    one chunk before the byte cap looked. Now the label alone refuses it, before any body byte is read."""
    bomb = gzip_bomb()
    assert len(bomb) < 1000
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(UnsupportedMediaEncoding) as info:
            local(f"{base}/bomb")
        elapsed = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.param == PARAM and info.value.code == "unsupported_media_encoding"
    assert "sent a gzip-encoded body" in info.value.message
    assert "accepts only identity" in info.value.message
    assert peak < 8 * 2**20, f"peak {peak} bytes: the body was inflated"  # vs. BOMB_INFLATED = 200 MiB
    assert elapsed < 0.5, f"took {elapsed:.3f} s"


def test_compressed_looking_body_without_a_label_is_returned_raw(base: str) -> None:
    """Bytes are read raw: nothing in the fetch path inflates, whatever the body looks like."""
    assert local(f"{base}/bomb-unlabelled") == gzip_bomb()


@pytest.mark.parametrize(
    ("coding", "named"),
    [
        ("gzip", "gzip"),
        ("deflate", "deflate"),
        ("br", "br"),
        ("zstd", "zstd"),
        ("GZIP", "gzip"),
        ("x-gzip", "x-gzip"),
        ("compress", "compress"),
        ("identity, gzip", "gzip"),
        ("gzip, deflate, br, zstd", "gzip+deflate+br+zstd"),
    ],
)
def test_content_encodings_other_than_identity_refused(base: str, coding: str, named: str) -> None:
    with pytest.raises(
        UnsupportedMediaEncoding, match=f"sent a {re.escape(named)}-encoded body.*accepts only identity"
    ):
        local(f"{base}/encoded?ce={coding}")


@pytest.mark.parametrize("coding", ["identity", "Identity", ""])
def test_identity_content_encoding_accepted(base: str, coding: str) -> None:
    assert local(f"{base}/encoded?ce={coding}") == BODY


def test_compressed_transfer_encoding_refused(base: str) -> None:
    """Transfer codings other than chunked never reach the body reader: h11 refuses them."""
    with pytest.raises(MediaError, match="Could not fetch"):
        local(f"{base}/transfer-encoded")


def test_url_user_info_refused(base: str, server: _Server) -> None:
    """Issue 12.10c: httpx would send ``user:pass@`` as Basic auth to whatever host the client names."""
    port = server.server_address[1]
    for userinfo in ("user:s3cret@", "user@", ":s3cret@", "%75ser:s3cret@"):
        error = refused(
            MediaFetchForbidden, f"http://{userinfo}127.0.0.1:{port}/ok", allow_private_media_addresses=True
        )
        assert "user name or password" in error.message
        assert "s3cret" not in error.message
    assert server.paths == []


def test_redirect_to_url_with_user_info_refused(base: str, server: _Server) -> None:
    port = server.server_address[1]
    target = f"http://user:s3cret@127.0.0.1:{port}/ok"
    error = refused(MediaFetchForbidden, f"{base}/redirect?to={target}", allow_private_media_addresses=True)
    assert "user name or password" in error.message and "s3cret" not in error.message
    assert server.paths == [f"/redirect?to={target}"]  # the hop carrying credentials was never requested


def test_https_to_http_redirect_refused(
    base: str, server: _Server, tls_server: tuple[int, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 12.10b: a redirect may not downgrade https to http; https->https and http->https are fine."""
    port, cert = tls_server
    monkeypatch.setattr(fetch_module, "_ssl_context", lambda: ssl.create_default_context(cafile=str(cert)))
    secure = f"https://localhost:{port}"
    error = refused(MediaFetchForbidden, f"{secure}/redirect?to={base}/ok", allow_private_media_addresses=True)
    assert "from https to http" in error.message
    assert server.paths == []  # the plain-http hop was never requested
    assert local(f"{secure}/redirect?to={secure}/ok") == BODY
    assert local(f"{base}/redirect?to={secure}/ok") == BODY


def test_http_error_status_refused(base: str) -> None:
    error = refused(MediaError, f"{base}/missing", allow_private_media_addresses=True)
    assert "HTTP 404" in error.message
    assert not isinstance(error, MediaFetchForbidden | MediaTooLarge)


def test_connection_failure_is_a_media_error(base: str, server: _Server) -> None:
    probe = http.server.HTTPServer(("127.0.0.1", 0), _Handler)
    closed_port = probe.server_address[1]
    probe.server_close()
    with pytest.raises(MediaError, match="Could not fetch"):
        local(f"http://127.0.0.1:{closed_port}/ok")
    with pytest.raises(MediaError, match="Could not fetch"):
        local("http://no-such-host.invalid/ok")
    with pytest.raises(MediaError, match="resolve"):
        fetch("http://no-such-host.invalid/ok")


def test_allowed_media_domains(base: str) -> None:
    domains = ("example.com",)
    for ref in ("http://evil.example/x.png", "http://notexample.com/x.png", "http://example.com.evil.net/x.png"):
        refused(MediaFetchForbidden, ref, allowed_media_domains=domains)
    limits = MediaLimits(allowed_media_domains=domains)
    for ref in ("http://example.com/x.png", "https://cdn.Example.COM./x.png", "http://a.b.example.com/x"):
        fetch_module._checked_url(ref, limits, None)  # passes the pre-connection checks
    assert local(base.replace("127.0.0.1", "localhost") + "/ok", allowed_media_domains=("LOCALHOST",)) == BODY


# --- local files ------------------------------------------------------------------------------


@pytest.fixture
def media_dir(tmp_path: Path) -> Path:
    root = tmp_path / "media"
    root.mkdir()
    (root / "a.png").write_bytes(BODY)
    (tmp_path / "secret.txt").write_bytes(b"secret")
    return root


def test_local_files_refused_by_default(media_dir: Path) -> None:
    refused(MediaFetchForbidden, f"file://{media_dir}/a.png")
    refused(MediaFetchForbidden, str(media_dir / "a.png"))


def test_local_files_under_allowed_directory(media_dir: Path) -> None:
    allowed = {"allowed_local_media_path": media_dir}
    assert fetch(f"file://{media_dir}/a.png", **allowed) == BODY
    assert fetch(f"file://localhost{media_dir}/a.png", **allowed) == BODY
    assert fetch(str(media_dir / "a.png"), **allowed) == BODY
    assert fetch("a.png", **allowed) == BODY  # relative paths count from the allowed directory
    (media_dir / "sub").mkdir()
    (media_dir / "sub" / "my pic.png").write_bytes(BODY)
    assert fetch(f"file://{media_dir}/sub/my%20pic.png", **allowed) == BODY


def test_missing_local_file_is_an_error_not_forbidden(media_dir: Path) -> None:
    error = refused(MediaError, f"file://{media_dir}/nope.png", allowed_local_media_path=media_dir)
    assert "does not exist" in error.message and not isinstance(error, MediaFetchForbidden)


def test_local_paths_escaping_the_directory_refused(media_dir: Path) -> None:
    allowed = {"allowed_local_media_path": media_dir}
    (media_dir / "link.txt").symlink_to(media_dir.parent / "secret.txt")
    (media_dir / "dirlink").symlink_to(media_dir.parent)
    for ref in (
        f"file://{media_dir}/../secret.txt",
        f"{media_dir}/../secret.txt",
        "../secret.txt",
        f"file://{media_dir}/link.txt",
        f"{media_dir}/dirlink/secret.txt",
        "/etc/passwd",
        f"file://{media_dir}/%2e%2e/secret.txt",
        f"file://{media_dir.parent}/nope.png",  # outside and missing: still "forbidden", no existence oracle
    ):
        refused(MediaFetchForbidden, ref, **allowed)
    (media_dir / "inside.png").symlink_to(media_dir / "a.png")
    assert fetch("inside.png", **allowed) == BODY  # links that stay inside are fine


def test_special_local_files_refused(media_dir: Path) -> None:
    allowed: dict[str, Any] = {"allowed_local_media_path": media_dir}
    os.mkfifo(media_dir / "fifo")
    started = time.monotonic()
    assert "regular file" in refused(MediaError, "fifo", **allowed).message
    assert time.monotonic() - started < 1.0  # opening a FIFO must not wait for a writer
    (media_dir / "sub").mkdir()
    refused(MediaError, "sub", **allowed)
    refused(MediaError, "a\x00.png", **allowed)
    refused(MediaFetchForbidden, "file://otherhost/a.png", **allowed)
    (media_dir / "big.bin").write_bytes(b"x" * 2000)
    refused(MediaTooLarge, "big.bin", max_media_bytes=1000, **allowed)
