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
    """Read a token endpoint's JSON answer (``token`` or ``access_token``)."""
    try:
        doc: Any = json.loads(body)
    except ValueError as exc:
        raise ValueError("token endpoint did not return JSON") from exc
    if not isinstance(doc, dict):
        raise ValueError("token endpoint returned an unexpected JSON value")
    value = doc.get("token") or doc.get("access_token")
    if not isinstance(value, str) or not value:
        raise ValueError("token endpoint returned no token")
    expires_in = doc.get("expires_in")
    if not isinstance(expires_in, (int, float)) or isinstance(expires_in, bool) or expires_in <= 0:
        expires_in = _DEFAULT_EXPIRY
    lifetime = max(float(expires_in) - _EARLY, float(expires_in) / 2)
    return Token(value, time.monotonic() + lifetime)
