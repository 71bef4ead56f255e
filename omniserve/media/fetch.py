"""Get the raw bytes behind a client's media reference, without letting the client aim the server.

A media URL makes the server open a connection of the client's choosing, the classic SSRF
(server-side request forgery) hole: ``http://169.254.169.254/`` reads cloud credentials,
``http://localhost:6379/`` talks to internal services, ``file:///etc/passwd`` reads the disk.
The defences:

- only ``data:``, ``http(s)://`` and (when the operator names a directory) local files;
- the address check happens where the socket is opened, on the addresses actually resolved, so a
  host name that resolves to a public address at check time and a private one at connect time
  (DNS rebinding) gets nowhere; a custom httpcore network backend does it for every connection,
  including each redirect hop;
- redirects are followed by hand so every hop's scheme and domain are checked again, and an https
  URL may not redirect to plain http (a downgrade hands the exchange to anyone on the path);
- URLs carrying ``user:password@`` are refused, first URL and every hop: httpx would send them as
  Basic credentials to a host of the client's (or a redirect's) choosing;
- bodies are read raw and any ``Content-Encoding`` but identity is refused: a decoder inflates a
  whole chunk before a byte cap can look, and ~500 bytes of ``gzip, gzip`` become 200 MB;
- one overall deadline and a byte cap enforced while streaming, so a slow or endless body cannot
  hold a worker or fill memory;
- messages to clients never name the addresses a host resolved to (that maps the internal network
  for them); the server log does.
"""

from __future__ import annotations

import base64
import functools
import ipaddress
import logging
import os
import socket
import ssl
import stat
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from urllib.parse import unquote, urlsplit

import anyio
import anyio.to_thread
import httpcore
import httpx

from omniserve.config import MediaLimits
from omniserve.errors import MediaError, MediaFetchForbidden, MediaTooLarge, UnsupportedMediaEncoding

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_HEADERS = {
    "User-Agent": "omniserve-media-fetch",
    # Asked for politely; what actually protects us is reading raw bytes and refusing any other coding.
    "Accept-Encoding": "identity",
}

# Failures of the HTTP machinery; all mean "could not fetch", never a server error.
_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    httpx.HTTPError,
    httpx.InvalidURL,
    httpcore.NetworkError,
    httpcore.ProtocolError,
    httpcore.UnsupportedProtocol,
    httpcore.PoolTimeout,
    httpcore.ProxyError,
    ssl.SSLError,
    OSError,
)
_TIMEOUT_ERRORS: tuple[type[BaseException], ...] = (TimeoutError, httpx.TimeoutException, httpcore.TimeoutException)

# 100.64.0.0/10 (carrier-grade NAT) is neither "private" nor "global" to the ipaddress module.
_SHARED_NETWORK = ipaddress.IPv4Network("100.64.0.0/10")
# Well-known NAT64 prefixes: the last 32 bits are an IPv4 address the gateway connects to.
_NAT64_NETWORKS = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))
_ADDRESS_KINDS: tuple[tuple[str, str], ...] = (
    ("is_unspecified", "unspecified"),
    ("is_loopback", "loopback"),
    ("is_link_local", "link-local"),
    ("is_private", "private"),
    ("is_multicast", "multicast"),
    ("is_reserved", "reserved"),
)


async def fetch_media_bytes(ref: str, limits: MediaLimits, *, param: str | None = None) -> bytes:
    """The bytes of ``ref``: a ``data:`` URL, an ``http(s)://`` URL, or a ``file://`` URL / path when allowed."""
    ref = ref.strip()
    try:
        scheme = urlsplit(ref).scheme.lower()
    except ValueError as exc:  # e.g. an unclosed "[" in an IPv6 host
        raise MediaError(f"Invalid media URL: {exc}.", param=param) from exc
    if scheme == "data":
        data = _decode_data_url(ref, limits, param)
    elif scheme in ("http", "https"):
        data = await _fetch_remote(ref, limits, param)
    elif scheme in ("file", ""):
        data = await _read_local(ref, scheme, limits, param)
    else:
        raise MediaFetchForbidden(
            f"Media URL scheme {scheme!r} is not allowed; use data:, http:// or https://.", param=param
        )
    if not data:
        raise MediaError("The media is empty (0 bytes).", param=param)
    return data


# --- data: URLs -------------------------------------------------------------------------------


def _decode_data_url(ref: str, limits: MediaLimits, param: str | None) -> bytes:
    """Strict base64 (no whitespace, no URL-safe alphabet): sloppy input is refused, not guessed at."""
    header, comma, payload = ref[len("data:") :].partition(",")
    if not comma:
        raise MediaError("Malformed data URL: no ',' before the data.", param=param)
    if header.split(";")[-1].strip().lower() != "base64":
        raise MediaError("Data URLs must be base64-encoded ('data:<mime>;base64,<data>').", param=param)
    decoded_size = len(payload) * 3 // 4 - payload[-2:].count("=")
    if decoded_size > limits.max_media_bytes:
        raise MediaTooLarge(
            f"Data URL holds about {decoded_size} bytes, over the limit of {limits.max_media_bytes} bytes.",
            param=param,
        )
    try:
        return base64.b64decode(payload, validate=True)
    except ValueError as exc:  # binascii.Error, and non-ASCII text
        raise MediaError(f"Data URL is not valid base64 ({exc}).", param=param) from exc


# --- http(s) ----------------------------------------------------------------------------------


async def _fetch_remote(ref: str, limits: MediaLimits, param: str | None) -> bytes:
    url = _checked_url(ref, limits, param)
    try:
        with anyio.fail_after(limits.fetch_timeout_seconds):
            async with _client(limits) as client:
                return await _follow(client, url, limits, param)
    except _ForbiddenAddress as exc:
        # The address itself stays in the log: told to the client, it would map the internal network.
        log.warning("refused media fetch: host %r resolves to %s, a %s address", exc.host, exc.address, exc.reason)
        raise MediaFetchForbidden(
            f"Media URL host {exc.host!r} resolves to a {exc.reason} address; "
            "fetching from non-public addresses is not allowed.",
            param=param,
        ) from exc
    except _TIMEOUT_ERRORS as exc:
        raise MediaError(
            f"Fetching media from {_origin(url)} timed out (limit: {limits.fetch_timeout_seconds:g} s in total).",
            param=param,
        ) from exc
    except _TRANSPORT_ERRORS as exc:
        raise MediaError(
            f"Could not fetch media from {_origin(url)}: {exc or type(exc).__name__}.", param=param
        ) from exc


async def _follow(client: httpx.AsyncClient, url: httpx.URL, limits: MediaLimits, param: str | None) -> bytes:
    """GET ``url``, following at most ``limits.max_redirects`` redirects, each re-checked like the first URL."""
    for _ in range(limits.max_redirects + 1):
        async with client.stream("GET", url) as response:
            if response.has_redirect_location:
                url = _checked_redirect(url, response.headers["location"], limits, param)
                continue
            if not response.is_success:
                status = f"{response.status_code} {response.reason_phrase}".strip()
                raise MediaError(f"Fetching media from {_origin(url)} failed: HTTP {status}.", param=param)
            return await _read_body(response, url, limits, param)
    raise MediaError(
        f"Too many redirects fetching media from {_origin(url)} (limit: {limits.max_redirects}).", param=param
    )


def _checked_redirect(url: httpx.URL, location: str, limits: MediaLimits, param: str | None) -> httpx.URL:
    """The next hop: checked like a first URL, and never a step down from https to http."""
    target = _checked_url(url.join(location), limits, param)
    if url.scheme == "https" and target.scheme == "http":
        raise MediaFetchForbidden(
            f"Media URL {_origin(url)} redirects from https to http ({_origin(target)}); "
            "downgrading a redirect to plain http is not allowed.",
            param=param,
        )
    return target


async def _read_body(response: httpx.Response, url: httpx.URL, limits: MediaLimits, param: str | None) -> bytes:
    """Stream the raw body, stopping at the first byte over the cap; Content-Length, when sent, refuses sooner.

    Raw means undecoded: a compressed body is refused on its header, before a byte of it is read.
    """
    _check_identity_encoding(response, url, param)
    declared = response.headers.get("content-length", "").strip()
    if declared.isdigit() and int(declared) > limits.max_media_bytes:
        raise _too_large(f"{_origin(url)} declares {declared} bytes", limits, param)
    body = bytearray()
    async for chunk in response.aiter_raw():
        body += chunk
        if len(body) > limits.max_media_bytes:
            raise _too_large(f"{_origin(url)} sent more than {limits.max_media_bytes} bytes", limits, param)
    return bytes(body)


def _check_identity_encoding(response: httpx.Response, url: httpx.URL, param: str | None) -> None:
    """Refuse a body with any Content-Encoding but identity (servers may ignore ``Accept-Encoding``).

    Inflating under the cap would also work, but every decoder would need a bounded output; media
    formats are compressed already, so a compressed transfer buys nothing worth that risk.
    """
    codings = [
        coding.strip().lower()
        for value in response.headers.get_list("content-encoding")
        for coding in value.split(",")
        if coding.strip()
    ]
    refused = list(dict.fromkeys(coding for coding in codings if coding != "identity"))
    if refused:
        raise UnsupportedMediaEncoding(
            f"The media server at {_origin(url)} sent a {'+'.join(refused)}-encoded body "
            f"(Content-Encoding: {', '.join(codings)}); omniserve accepts only identity (uncompressed) bodies.",
            param=param,
        )


def _checked_url(ref: str | httpx.URL, limits: MediaLimits, param: str | None) -> httpx.URL:
    """Scheme, host, domain allow-list and literal-IP checks: everything decidable before connecting."""
    try:
        url = httpx.URL(ref)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise MediaError(f"Invalid media URL: {exc}.", param=param) from exc
    if url.scheme not in ("http", "https"):
        raise MediaFetchForbidden(
            f"Media URL scheme {url.scheme!r} is not allowed (a redirect may not leave http/https).", param=param
        )
    if not url.host:
        raise MediaError("Media URL has no host.", param=param)
    if url.userinfo:
        # Named without the credentials themselves: _origin leaves the user-info out.
        raise MediaFetchForbidden(
            f"Media URL {_origin(url)} carries a user name or password ('user:password@'); "
            "omniserve does not send credentials to media servers, so such URLs are refused.",
            param=param,
        )
    _check_domain(url, limits, param)
    if not limits.allow_private_media_addresses:
        address = _literal_address(url.host)
        reason = forbidden_address_reason(address) if address is not None else None
        if reason is not None:
            raise MediaFetchForbidden(
                f"Media URL host {url.host} is a {reason} address; fetching from non-public addresses is not allowed.",
                param=param,
            )
    return url


def _check_domain(url: httpx.URL, limits: MediaLimits, param: str | None) -> None:
    allowed = limits.allowed_media_domains
    if allowed is None:
        return
    # Compare both spellings of internationalised names: Unicode and the punycode that goes on the wire.
    names = {_normal_host(url.host), _normal_host(url.raw_host.decode("ascii", "replace"))}
    if not any(_host_matches(name, _normal_host(domain)) for name in names for domain in allowed):
        raise MediaFetchForbidden(
            f"Media host {url.host!r} is not in the allowed domains ({', '.join(allowed)}).", param=param
        )


def _normal_host(host: str) -> str:
    return host.strip().strip(".").lower()


def _host_matches(host: str, domain: str) -> bool:
    return bool(domain) and (host == domain or host.endswith("." + domain))


def _literal_address(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]").split("%")[0])
    except ValueError:
        return None


def forbidden_address_reason(address: IPAddress) -> str | None:
    """Why a connection to ``address`` is refused ("loopback", "private"...), or None when it is public.

    IPv6 forms that embed an IPv4 address (mapped, 6to4, NAT64) are judged by the IPv4 address they
    reach, so ``[::ffff:127.0.0.1]`` is loopback however it is written.
    """
    embedded = _embedded_ipv4(address)
    if embedded is not None:
        return forbidden_address_reason(embedded)
    for attribute, kind in _ADDRESS_KINDS:
        if getattr(address, attribute):
            return kind
    if isinstance(address, ipaddress.IPv4Address) and address in _SHARED_NETWORK:
        return "shared (carrier-grade NAT)"
    if not address.is_global:
        return "non-global"
    return None


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if any(address in network for network in _NAT64_NETWORKS):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _origin(url: httpx.URL) -> str:
    """Messages name the host, not the full URL: paths and query strings may carry the client's tokens."""
    return f"{url.scheme}://{url.netloc.decode('ascii', 'replace')}"


def _too_large(what: str, limits: MediaLimits, param: str | None) -> MediaTooLarge:
    return MediaTooLarge(f"Media too large: {what}; the limit is {limits.max_media_bytes} bytes.", param=param)


# --- the guarded connection layer -------------------------------------------------------------


class _ForbiddenAddress(Exception):
    """Raised inside httpcore by the guarded backend; turned into MediaFetchForbidden (with param) above."""

    def __init__(self, host: str, address: IPAddress, reason: str) -> None:
        super().__init__(f"{host} resolves to {reason} address {address}")
        self.host, self.address, self.reason = host, address, reason


async def _resolve(host: str, port: int) -> list[IPAddress]:
    """Every address ``host`` resolves to, in resolver order (IP literals resolve to themselves)."""
    try:
        infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise httpcore.ConnectError(f"cannot resolve host {host!r}: {exc}") from exc
    addresses: list[IPAddress] = []
    for _family, _type, _proto, _canonname, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%")[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


class _GuardedBackend(httpcore.AsyncNetworkBackend):
    """Resolves each host itself, refuses if ANY address is non-public, then connects to a checked address.

    Connecting to the checked IP (not the name) closes the rebinding window between check and
    connect. TLS is unaffected: httpcore passes the URL's host name to start_tls for SNI and
    certificate checks, separately from the address dialled here.
    """

    def __init__(self, inner: httpcore.AsyncNetworkBackend) -> None:
        self._inner = inner

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await _resolve(host, port)
        for address in addresses:
            reason = forbidden_address_reason(address)
            if reason is not None:
                raise _ForbiddenAddress(host, address, reason)
        failure: Exception = httpcore.ConnectError(f"no addresses for host {host!r}")
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    str(address), port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        raise failure

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.UnsupportedProtocol("unix sockets are never used for media")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _CoreByteStream(httpx.AsyncByteStream):
    def __init__(self, stream: Iterable[bytes] | AsyncIterator[bytes]) -> None:
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for part in self._stream:  # type: ignore[union-attr]
            yield part

    async def aclose(self) -> None:
        close = getattr(self._stream, "aclose", None)
        if close is not None:
            await close()


class _PoolTransport(httpx.AsyncBaseTransport):
    """httpx's AsyncHTTPTransport (0.28) builds its own pool and takes no network backend, so this
    small transport hands httpx requests to a pool built with the guarded backend."""

    def __init__(self, pool: httpcore.AsyncConnectionPool) -> None:
        self._pool = pool

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,  # type: ignore[arg-type]
            extensions=request.extensions,
        )
        core_response = await self._pool.handle_async_request(core_request)
        return httpx.Response(
            status_code=core_response.status,
            headers=core_response.headers,
            stream=_CoreByteStream(core_response.stream),
            extensions=core_response.extensions,
        )

    async def aclose(self) -> None:
        await self._pool.aclose()


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    """Loading the CA bundle costs milliseconds; one verified context serves every fetch."""
    return httpx.create_ssl_context()


def _client(limits: MediaLimits) -> httpx.AsyncClient:
    """A client per fetch: no shared connections between clients' URLs, no proxies or .netrc from the
    environment (a proxy would resolve names itself, out of the guard's sight)."""
    backend: httpcore.AsyncNetworkBackend = httpcore.AnyIOBackend()
    if not limits.allow_private_media_addresses:
        backend = _GuardedBackend(backend)
    pool = httpcore.AsyncConnectionPool(ssl_context=_ssl_context(), network_backend=backend, retries=0)
    return httpx.AsyncClient(
        transport=_PoolTransport(pool),
        trust_env=False,
        follow_redirects=False,
        timeout=limits.fetch_timeout_seconds,
        headers=_HEADERS,
    )


# --- local files ------------------------------------------------------------------------------


async def _read_local(ref: str, scheme: str, limits: MediaLimits, param: str | None) -> bytes:
    root = limits.allowed_local_media_path
    if root is None:
        raise MediaFetchForbidden("Local files (file:// URLs and paths) are not allowed on this server.", param=param)
    raw_path = _local_path(ref, scheme, param)
    return await anyio.to_thread.run_sync(_read_file_under, raw_path, root, limits, param)


def _local_path(ref: str, scheme: str, param: str | None) -> str:
    if scheme == "":
        return ref
    parts = urlsplit(ref)
    if parts.netloc not in ("", "localhost"):
        raise MediaFetchForbidden(f"file:// URLs must name a local file, not host {parts.netloc!r}.", param=param)
    return unquote(parts.path)


def _read_file_under(raw_path: str, root: Path, limits: MediaLimits, param: str | None) -> bytes:
    """Read a regular file whose real path (symlinks and '..' resolved) lies under ``root``.

    Relative paths count from ``root``. Containment is decided before existence, so paths outside
    the directory are refused the same way whether or not they exist.
    """
    try:
        real_root = Path(os.path.realpath(root))
        real = Path(os.path.realpath(real_root / raw_path))
    except (OSError, ValueError) as exc:
        raise MediaError(f"Invalid file path: {exc}.", param=param) from exc
    if not real.is_relative_to(real_root):
        raise MediaFetchForbidden(f"File {raw_path!r} is outside the allowed local media directory.", param=param)
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(real, flags)  # O_NONBLOCK: a FIFO planted in the directory must not hang the open
    except FileNotFoundError as exc:
        raise MediaError(f"File {raw_path!r} does not exist.", param=param) from exc
    except OSError as exc:
        raise MediaError(f"File {raw_path!r} cannot be read: {exc.strerror}.", param=param) from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise MediaError(f"{raw_path!r} is not a regular file.", param=param)
        with os.fdopen(fd, "rb", closefd=False) as file:
            data = file.read(limits.max_media_bytes + 1)
    finally:
        os.close(fd)
    if len(data) > limits.max_media_bytes:
        raise _too_large(f"file {raw_path!r} is over the limit", limits, param)
    return data
