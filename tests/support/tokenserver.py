"""A Bearer token server for distribution's ``auth: token`` mode (the Docker Hub flow).

    ts = TokenServer(tmp_dir, users={"alice": "secret"}).start()
    reg = Registry(tmp_dir / "reg", **ts.registry_kwargs()).start()

``GET /token?service=S&scope=repository:NAME:pull,push[&scope=...]`` answers
``{"token", "access_token", "expires_in", "issued_at"}``. The JWT is ES256-signed by hand
(``cryptography``) and carries the signing certificate in the ``x5c`` header; distribution
verifies that chain against ``rootcertbundle`` (the self-signed cert written by this server).

Grants: anonymous requests get ``requested ∩ anonymous_actions``; Basic auth with a known user
gets everything requested; a wrong password is answered 401. Every request is logged in
:attr:`TokenServer.log` (``path``, ``query`` (dict of lists), ``had_authorization``, ``user``,
``status``, ``granted``).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import parse_qs

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from . import ThreadedServer

__all__ = ["TokenServer", "SERVICE", "ISSUER", "make_jwt", "decode_jwt_unverified"]

SERVICE = "puller-test-registry"
ISSUER = "puller-test-issuer"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64url_decode(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def make_jwt(claims: dict, key: ec.EllipticCurvePrivateKey, cert_der: bytes) -> str:
    """Compact JWS, ES256, header ``{"typ","alg","x5c"}``; signature is raw r||s (JOSE)."""
    header = {"typ": "JWT", "alg": "ES256", "x5c": [base64.b64encode(cert_der).decode()]}
    signing_input = (_b64url(json.dumps(header, separators=(",", ":")).encode()) + "."
                     + _b64url(json.dumps(claims, separators=(",", ":")).encode()))
    der_sig = key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der_sig)
    return signing_input + "." + _b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))


def decode_jwt_unverified(token: str) -> tuple[dict, dict]:
    """(header, claims) of a compact JWT, without verifying anything. For assertions."""
    h, c, _ = token.split(".")
    return json.loads(_b64url_decode(h)), json.loads(_b64url_decode(c))


def _parse_scope(scope: str) -> tuple[str, str, list[str]] | None:
    # "repository:name/with/slashes:pull,push"  (type may carry a "(class)" suffix)
    try:
        head, actions = scope.rsplit(":", 1)
        typ, name = head.split(":", 1)
    except ValueError:
        return None
    return typ, name, [a for a in actions.split(",") if a]


class TokenServer:
    def __init__(
        self,
        tmp_dir: str | os.PathLike[str],
        *,
        users: dict[str, str] | None = None,
        anonymous_actions: tuple[str, ...] | list[str] = ("pull",),
        expires_in: int = 300,
        service: str = SERVICE,
        issuer: str = ISSUER,
    ) -> None:
        self.tmp_dir = Path(tmp_dir)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.users = dict(users or {})
        # OAuth refresh tokens (docker's "identitytoken") -> user, for POST /token.
        self.refresh_tokens: dict[str, str] = {}
        self.anonymous_actions = tuple(anonymous_actions)
        self.expires_in = expires_in
        self.service = service
        self.issuer = issuer
        self.cert_path = self.tmp_dir / "token-signing-cert.pem"
        self._lock = threading.Lock()
        self._log: list[dict] = []
        self._fail: list[tuple[int, int]] = []  # [(status, remaining)]
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._cert = self._make_cert()
        self.cert_der = self._cert.public_bytes(serialization.Encoding.DER)
        self.cert_path.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))
        self._server = ThreadedServer(self._make_app, name="tokenserver")

    # -- public --------------------------------------------------------------------------------
    @property
    def port(self) -> int | None:
        return self._server.port

    @property
    def url(self) -> str:
        return self._server.url

    @property
    def realm(self) -> str:
        return f"{self._server.url}/token"

    def start(self) -> "TokenServer":
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

    def __enter__(self) -> "TokenServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def registry_config(self) -> dict:
        """The ``auth:`` section for a registry config.yml trusting this server."""
        return {"token": {"realm": self.realm, "service": self.service,
                          "issuer": self.issuer, "rootcertbundle": str(self.cert_path)}}

    def registry_kwargs(self) -> dict:
        """Keyword arguments for :class:`tests.support.registry.Registry`."""
        return {"auth": "token", "token_realm": self.realm, "token_cert_path": self.cert_path,
                "token_service": self.service, "token_issuer": self.issuer}

    @property
    def log(self) -> list[dict]:
        with self._lock:
            return [dict(e) for e in self._log]

    def clear_log(self) -> None:
        with self._lock:
            self._log.clear()

    def fail(self, status: int = 500, times: int = 1) -> None:
        """Answer the next ``times`` token requests with ``status`` (bounded)."""
        with self._lock:
            self._fail.append((status, times))

    def issue(self, name: str, actions: list[str] | tuple[str, ...], *, subject: str = "",
              expires_in: int | None = None, audience: str | None = None,
              issuer: str | None = None) -> str:
        """Mint a token directly (e.g. for tests of expired/foreign tokens)."""
        now = int(time.time())
        exp = now + (self.expires_in if expires_in is None else expires_in)
        claims = {
            "iss": issuer or self.issuer, "sub": subject, "aud": audience or self.service,
            "exp": exp, "nbf": now - 1, "iat": now, "jti": uuid.uuid4().hex,
            "access": [{"type": "repository", "name": name, "actions": list(actions)}],
        }
        return make_jwt(claims, self._key, self.cert_der)

    # -- internals -----------------------------------------------------------------------------
    def _make_cert(self) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "puller-test-token-signer")])
        now = dt.datetime.now(dt.timezone.utc)
        return (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(self._key, hashes.SHA256())
        )

    def _make_app(self):
        from aiohttp import web

        app = web.Application()
        app.router.add_get("/token", self._handle_token)
        app.router.add_post("/token", self._handle_token)
        return app

    def _authenticate(self, header: str | None) -> tuple[bool, str | None]:
        """(ok, user). No header: anonymous (ok). Bad credentials: not ok."""
        if not header:
            return True, None
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return False, None
        try:
            user, _, password = base64.b64decode(value.strip()).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False, None
        if self.users.get(user) == password and user in self.users:
            return True, user
        return False, user

    async def _handle_token(self, request):
        from aiohttp import web

        query = parse_qs(request.query_string, keep_blank_values=True)
        auth_header = request.headers.get("Authorization")
        form: dict[str, list[str]] = {}
        if request.method == "POST":  # OAuth2: grant_type=refresh_token&refresh_token=...
            form = parse_qs(await request.text(), keep_blank_values=True)
            query = {**query, **{k: v for k, v in form.items() if k in ("service", "scope")}}
        entry = {"path": request.path, "query": query, "had_authorization": bool(auth_header),
                 "user": None, "status": None, "granted": []}
        with self._lock:
            self._log.append(entry)
            fail = None
            for i, (st, left) in enumerate(self._fail):
                if left > 0:
                    fail = st
                    self._fail[i] = (st, left - 1)
                    break

        def done(resp):
            with self._lock:
                entry["status"] = resp.status
            return resp

        if fail is not None:
            return done(web.json_response({"details": "injected failure"}, status=fail))
        if request.method == "POST":
            refresh = form.get("refresh_token", [""])[0]
            user = self.refresh_tokens.get(refresh) \
                if form.get("grant_type", [""])[0] == "refresh_token" else None
            ok = user is not None
            entry["grant"] = "refresh_token"
        else:
            ok, user = self._authenticate(auth_header)
        entry["user"] = user
        if not ok:
            return done(web.json_response(
                {"details": "incorrect username or password"}, status=401,
                headers={"WWW-Authenticate": 'Basic realm="puller-test-token"'}))
        service = query.get("service", [""])[0]
        if service and service != self.service:
            return done(web.json_response({"details": f"unknown service {service!r}"},
                                          status=400))
        access = []
        for scope in query.get("scope", []):
            for one in scope.split(" "):  # some clients space-join several scopes
                parsed = _parse_scope(one)
                if parsed is None:
                    continue
                typ, name, actions = parsed
                if user is not None:
                    granted = actions
                else:
                    granted = [a for a in actions if a in self.anonymous_actions]
                access.append({"type": typ, "name": name, "actions": granted})
        now = int(time.time())
        expires_in = int(self.expires_in)
        claims = {
            "iss": self.issuer, "sub": user or "", "aud": self.service,
            "exp": now + expires_in, "nbf": now - 1, "iat": now, "jti": uuid.uuid4().hex,
            "access": access,
        }
        token = make_jwt(claims, self._key, self.cert_der)
        with self._lock:
            entry["granted"] = access
        issued_at = dt.datetime.fromtimestamp(now, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        return done(web.json_response({"token": token, "access_token": token,
                                       "expires_in": expires_in, "issued_at": issued_at}))


def spoil_cached_token(client: object, host: str, scope: str) -> None:
    """Replace the token a RegistryClient holds for (host, scope) with one the registry
    refuses (as after an expiry or a revocation); the client must have one."""
    from puller.auth import Token

    key = (host, scope)
    tokens = client._tokens  # type: ignore[attr-defined]
    assert key in tokens
    tokens[key] = Token("eyJhbGciOiJub25lIn0.e30.", time.monotonic() + 600)
