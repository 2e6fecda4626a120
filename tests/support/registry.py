"""Run the real CNCF distribution registry (Debian ``docker-registry``, 2.8.x) for tests.

    with Registry(tmp_path) as reg:
        reg.url   # "http://127.0.0.1:PORT"
        reg.host  # "127.0.0.1:PORT"

Modes: ``auth=None`` (anonymous read/write), ``auth="token"`` (needs ``token_realm`` and
``token_cert_path``; see :class:`tests.support.tokenserver.TokenServer.registry_config`),
``auth="htpasswd"`` (bcrypt entries made with libxcrypt via ctypes, or ``htpasswd -B``).
``tls=(cert_path, key_path)`` serves HTTPS instead of HTTP.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import http.client
import json
import os
import shutil
import ssl
import subprocess
import time
from pathlib import Path

from . import free_port

__all__ = ["Registry", "RegistryStartError", "HtpasswdUnavailable", "REGISTRY_BIN",
           "registry_binary", "bcrypt_hash"]

REGISTRY_BIN = "/usr/bin/docker-registry"


def registry_binary() -> str | None:
    """Path of the docker-registry binary (env PULLER_REGISTRY_BIN overrides), or None."""
    cand = os.environ.get("PULLER_REGISTRY_BIN") or REGISTRY_BIN
    if os.access(cand, os.X_OK):
        return cand
    return shutil.which("docker-registry") or shutil.which("registry")


class RegistryStartError(RuntimeError):
    pass


class HtpasswdUnavailable(RuntimeError):
    """No way to make bcrypt hashes on this machine (no libxcrypt bcrypt, no htpasswd)."""


def bcrypt_hash(password: str, cost: int = 5) -> str:
    """A bcrypt ($2y$) hash of ``password``: libxcrypt via ctypes, else ``htpasswd -nbB``."""
    libname = ctypes.util.find_library("crypt")
    if libname:
        try:
            lib = ctypes.CDLL(libname)
            lib.crypt_gensalt.restype = ctypes.c_char_p
            lib.crypt_gensalt.argtypes = [ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p,
                                          ctypes.c_int]
            lib.crypt.restype = ctypes.c_char_p
            lib.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
            salt = lib.crypt_gensalt(b"$2y$", cost, None, 0)
            if salt:
                out = lib.crypt(password.encode(), salt)
                if out and out.startswith(b"$2"):
                    return out.decode()
        except (OSError, AttributeError):
            pass
    htpasswd = shutil.which("htpasswd")
    if htpasswd:
        out = subprocess.run([htpasswd, "-nbB", "-C", str(cost), "u", password],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return out.strip().split(":", 1)[1]
    raise HtpasswdUnavailable("no bcrypt implementation (libxcrypt or htpasswd) available")


class Registry:
    """A docker-registry subprocess on a free 127.0.0.1 port, storage under ``tmp_dir``."""

    SERVICE = "puller-test-registry"
    ISSUER = "puller-test-issuer"
    START_TIMEOUT = 15.0

    def __init__(
        self,
        tmp_dir: str | os.PathLike[str],
        *,
        auth: str | None = None,
        htpasswd_users: dict[str, str] | None = None,
        token_realm: str | None = None,
        token_cert_path: str | os.PathLike[str] | None = None,
        token_service: str | None = None,
        token_issuer: str | None = None,
        tls: tuple[str | os.PathLike[str], str | os.PathLike[str]] | None = None,
        client_ca: str | os.PathLike[str] | None = None,
        client_cert: tuple[str | os.PathLike[str], str | os.PathLike[str]] | None = None,
        binary: str | None = None,
    ) -> None:
        """``client_ca``: require TLS client certificates signed by this CA (then
        ``client_cert`` = (cert, key) is what the readiness probe presents)."""
        if auth not in (None, "htpasswd", "token"):
            raise ValueError(f"auth must be None, 'htpasswd' or 'token', not {auth!r}")
        if auth == "token" and not (token_realm and token_cert_path):
            raise ValueError("auth='token' needs token_realm and token_cert_path")
        self.tmp_dir = Path(tmp_dir)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.auth = auth
        self.htpasswd_users = dict(htpasswd_users or {})
        self.token_realm = token_realm
        self.token_cert_path = str(token_cert_path) if token_cert_path else None
        self.token_service = token_service or self.SERVICE
        self.token_issuer = token_issuer or self.ISSUER
        self.tls = (str(tls[0]), str(tls[1])) if tls else None
        self.client_ca = str(client_ca) if client_ca else None
        self.client_cert = (str(client_cert[0]), str(client_cert[1])) if client_cert else None
        self.binary = binary or registry_binary()
        self.root = self.tmp_dir / "storage"
        self.config_path = self.tmp_dir / "config.yml"
        self.log_path = self.tmp_dir / "registry.log"
        self.port: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file = None
        # Set by fixtures for convenience (token mode): the TokenServer and push credentials.
        self.tokenserver = None
        self.credentials: tuple[str, str] | None = None

    # -- addresses ---------------------------------------------------------------------------
    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    # -- lifecycle ----------------------------------------------------------------------------
    def __enter__(self) -> "Registry":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, attempts: int = 4) -> "Registry":
        if self.proc is not None:
            return self
        if not self.binary:
            raise RegistryStartError(f"docker-registry binary not found ({REGISTRY_BIN})")
        self.root.mkdir(parents=True, exist_ok=True)
        last = ""
        for _ in range(attempts):
            self.port = free_port()
            self._write_config()
            self._spawn()
            ok, last = self._wait_ready()
            if ok:
                return self
            self._terminate()
            if "address already in use" not in last.lower():
                break
        raise RegistryStartError(f"docker-registry did not become ready: {last}\n"
                                 f"--- log tail ({self.log_path}) ---\n{self.log_tail()}")

    def stop(self) -> None:
        self._terminate()

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-n:])

    # -- internals ----------------------------------------------------------------------------
    def _config(self) -> dict:
        http_cfg: dict = {
            "addr": f"127.0.0.1:{self.port}",
            "secret": "puller-test-secret",
            "headers": {"X-Content-Type-Options": ["nosniff"]},
        }
        if self.tls:
            http_cfg["tls"] = {"certificate": self.tls[0], "key": self.tls[1]}
            if self.client_ca:
                http_cfg["tls"]["clientcas"] = [self.client_ca]
        cfg: dict = {
            "version": 0.1,
            "log": {"level": "warn", "formatter": "text", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.root)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": http_cfg,
            "health": {"storagedriver": {"enabled": False}},
        }
        if self.auth == "token":
            cfg["auth"] = {"token": {
                "realm": self.token_realm,
                "service": self.token_service,
                "issuer": self.token_issuer,
                "rootcertbundle": self.token_cert_path,
            }}
        elif self.auth == "htpasswd":
            htpasswd_path = self.tmp_dir / "htpasswd"
            htpasswd_path.write_text("".join(f"{u}:{bcrypt_hash(p)}\n"
                                             for u, p in self.htpasswd_users.items()))
            cfg["auth"] = {"htpasswd": {"realm": "puller-test", "path": str(htpasswd_path)}}
        return cfg

    def _write_config(self) -> None:
        # JSON is valid YAML; the registry's yaml parser reads it fine.
        self.config_path.write_text(json.dumps(self._config(), indent=2) + "\n")

    def _spawn(self) -> None:
        self._log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [self.binary, "serve", str(self.config_path)],
            stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT,
            cwd=self.tmp_dir, env={**os.environ, "OTEL_TRACES_EXPORTER": "none"},
        )

    def _wait_ready(self) -> tuple[bool, str]:
        deadline = time.monotonic() + self.START_TIMEOUT
        last = "timeout"
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False, f"exited with {self.proc.returncode}: {self.log_tail(5)}"
            try:
                status = self._probe()
                if status in (200, 401):
                    return True, ""
                last = f"GET /v2/ -> {status}"
            except OSError as e:
                last = repr(e)
            time.sleep(0.05)
        return False, f"timeout after {self.START_TIMEOUT}s ({last})"

    def _probe(self) -> int:
        if self.tls:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            if self.client_cert:
                ctx.load_cert_chain(*self.client_cert)
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                "127.0.0.1", self.port, timeout=1, context=ctx)
        else:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
        try:
            conn.request("GET", "/v2/")
            resp = conn.getresponse()
            resp.read()
            return resp.status
        finally:
            conn.close()

    def _terminate(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __repr__(self) -> str:
        return f"<Registry {self.url} auth={self.auth} root={self.root}>"
