"""Authentication challenges and tokens, without I/O.

A registry answers an unauthenticated request with ``401`` and a ``WWW-Authenticate``
header naming a scheme: ``Basic realm="..."`` or ``Bearer realm="https://auth/token",
service="registry",scope="repository:team/api:pull"``. For Bearer, the client asks the
realm for a token for that service and scope (anonymously, or with Basic credentials),
then repeats the request with ``Authorization: Bearer <token>``. Tokens are cached per
(registry, service, scope) until shortly before they expire, and are only ever sent to
the registry host they were issued for.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from .record import Record

__all__ = ["Challenge", "parse_challenges", "Token", "parse_token_response", "pull_scope"]

# auth-param = token "=" ( token / quoted-string ), RFC 7235.
_PARAM = re.compile(r'\s*([A-Za-z0-9_.\-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s,]*)\s*(?:,|$)')
_SCHEME = re.compile(r"\s*([A-Za-z][A-Za-z0-9_\-]*)(?:\s+|$)")

# Tokens without expires_in are valid for 60 s (distribution's token spec); refresh a
# little early so a token never expires between check and use.
_DEFAULT_EXPIRY = 60.0
_EARLY = 10.0
# Longer lifetimes are cut to this (a rejected token is replaced anyway).
_MAX_EXPIRY = 86400.0
# Visible ASCII: what a token can be and still be sent in an Authorization header.
_TOKEN_CHARS = re.compile(r"[!-~]+")


class Challenge(Record):
    scheme: str  # lower case: "bearer" or "basic"
    params: dict[str, str] = {}  # (copied for each record)

    @property
    def realm(self) -> str | None:
        return self.params.get("realm")


def parse_challenges(header: str) -> list[Challenge]:
    """Parse a ``WWW-Authenticate`` value into its challenges (several may be listed)."""
    out: list[Challenge] = []
    pos = 0
    n = len(header)
    while pos < n:
        m = _SCHEME.match(header, pos)
        if not m:
            break
        scheme = m.group(1).lower()
        pos = m.end()
        params: dict[str, str] = {}
        while pos < n:
            pm = _PARAM.match(header, pos)
            if not pm:
                break
            key, value = pm.group(1).lower(), pm.group(2)
            if value.startswith('"'):
                value = re.sub(r"\\(.)", r"\1", value[1:-1])
            params[key] = value
            pos = pm.end()
        out.append(Challenge(scheme, params))
        while pos < n and header[pos] in ", ":
            pos += 1
    return out


def pull_scope(repository: str, actions: str = "pull") -> str:
    return f"repository:{repository}:{actions}"


class Token(Record, frozen=False):
    value: str
    expires_at: float  # time.monotonic() deadline

    def fresh(self) -> bool:
        return time.monotonic() < self.expires_at


def parse_token_response(body: bytes) -> Token:
    """Read a token endpoint's JSON answer (``token`` or ``access_token``).

    As in docker's client, ``access_token`` wins when both are given, and an
    ``expires_in`` that is missing or unusable means the default lifetime."""
    try:
        doc: Any = json.loads(body)
    except (ValueError, RecursionError):  # (RecursionError: nested too deep to parse)
        raise ValueError("token endpoint did not return JSON") from None
    if not isinstance(doc, dict):
        raise ValueError("token endpoint returned an unexpected JSON value")
    value = doc.get("access_token") or doc.get("token")
    if not isinstance(value, str) or not value:
        raise ValueError("token endpoint returned no token")
    if not _TOKEN_CHARS.fullmatch(value):  # it goes in a header: no spaces, controls
        raise ValueError("token endpoint returned a token that is not a valid header value")
    expires_in = doc.get("expires_in")
    seconds = _DEFAULT_EXPIRY
    if isinstance(expires_in, (int, float)) and not isinstance(expires_in, bool) \
            and expires_in > 0:  # (not NaN)
        seconds = float(min(expires_in, _MAX_EXPIRY))  # (nor an int too big for a float)
    lifetime = max(seconds - _EARLY, seconds / 2)
    return Token(value, time.monotonic() + lifetime)
