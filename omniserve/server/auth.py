"""Bearer-token auth: a wrong or missing key is a 401 in OpenAI's shape (never a 400)."""

from __future__ import annotations

import hmac
from pathlib import Path

from fastapi import Request

from omniserve.errors import AuthenticationFailed
from omniserve.flags import OptionError


def read_key_file(path: Path) -> list[str]:
    """One key per line; blank lines and '#' comments ignored.

    A file that yields no key is refused (``OptionError``): the operator asked for authentication,
    and an empty Secret or a file of comments must not quietly serve everyone.
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise OptionError(f"--api-key-file {path}: cannot read it: {getattr(exc, 'strerror', None) or exc}") from None
    keys = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not keys:
        raise OptionError(
            f"--api-key-file {path} holds no API key (only blank or '#' lines): refusing to start without "
            "authentication; put one key per line, or leave the flag out to serve without keys"
        )
    return keys


class ApiKeyAuth:
    def __init__(self, keys: tuple[str, ...]) -> None:
        self._keys = [k.encode() for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    async def __call__(self, request: Request) -> None:
        if not self._keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise AuthenticationFailed("missing API key: send 'Authorization: Bearer <key>'")
        given = token.strip().encode()
        # compare against every key so timing does not reveal which one nearly matched
        if not any([hmac.compare_digest(given, key) for key in self._keys]):
            raise AuthenticationFailed("invalid API key")
