"""Registry credentials, kept where and how docker keeps them.

docker, skopeo and puller share one login: ``$DOCKER_CONFIG/config.json`` (default
``~/.docker/config.json``) with

- ``auths.<key>.auth``: base64 of ``user:password`` (``<key>`` is ``host[:port]``, or
  ``https://index.docker.io/v1/`` for Docker Hub), or ``auths.<key>.identitytoken``: an
  OAuth refresh token, exchanged at the token realm for access tokens;
- ``credHelpers.<host>``: a helper for one registry, and ``credsStore``: the helper for
  all others. A helper is the program ``docker-credential-<name>``, spoken to as docker
  does: ``get``/``store``/``erase`` with the server URL or a JSON object on stdin.

The file is rewritten atomically with mode 0600, keeping every key puller doesn't use.
Secrets never appear in exceptions or ``repr``.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
from pathlib import Path
from typing import Any

from .errors import PullerError
from .fsutil import write_atomic
from .record import Record

__all__ = [
    "Credentials",
    "CredentialError",
    "DockerConfig",
    "DOCKER_HUB_KEY",
    "config_key",
    "docker_config_dir",
]

DOCKER_HUB_KEY = "https://index.docker.io/v1/"
_HUB_ALIASES = {"docker.io", "index.docker.io", "registry-1.docker.io"}
_HELPER_TIMEOUT = 60.0


class CredentialError(PullerError):
    """Credentials could not be read or stored (a broken config.json, a failing helper)."""


class Credentials(Record, hidden=("password", "identity_token")):
    username: str = ""
    password: str = ""
    identity_token: str = ""  # OAuth refresh token

    def basic(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


def docker_config_dir() -> Path:
    env = os.environ.get("DOCKER_CONFIG")
    return Path(env).expanduser() if env else Path.home() / ".docker"


def config_key(registry: str) -> str:
    """The ``auths`` key docker uses for a registry host."""
    return DOCKER_HUB_KEY if registry in _HUB_ALIASES else registry


def hostname_of(key: str) -> str:
    """docker's ConvertToHostname: ``https://host:5000/v2/`` → ``host:5000``."""
    k = key
    for prefix in ("http://", "https://"):
        if k.startswith(prefix):
            k = k[len(prefix):]
            break
    return k.split("/", 1)[0]


def _same_registry(key: str, registry: str) -> bool:
    host = hostname_of(key)
    if registry in _HUB_ALIASES:
        return host in _HUB_ALIASES
    return host == registry


class DockerConfig:
    """Reads and writes docker's ``config.json`` (and runs its credential helpers)."""

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        self.directory = Path(directory) if directory is not None else docker_config_dir()
        self.path = self.directory / "config.json"
        self._warned = False

    # -- the file ------------------------------------------------------------------------

    def load(self) -> dict[str, Any]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise CredentialError(f"cannot read {self.path}: {exc.strerror}") from exc
        if not raw.strip():
            return {}
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError):  # (not chained: json's error holds the file)
            raise CredentialError(f"{self.path} is not valid JSON") from None
        if not isinstance(doc, dict):
            raise CredentialError(f"{self.path} is not a JSON object")
        return doc

    def _save(self, doc: dict[str, Any]) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            write_atomic(self.path, (json.dumps(doc, indent="\t") + "\n").encode(), 0o600)
        except OSError as exc:
            raise CredentialError(f"cannot write {self.path}: {exc.strerror}") from exc

    def helper_for(self, registry: str, doc: dict[str, Any] | None = None) -> str | None:
        doc = self.load() if doc is None else doc
        helpers = doc.get("credHelpers")
        if isinstance(helpers, dict):
            for key, name in helpers.items():
                if isinstance(name, str) and name and _same_registry(key, registry):
                    return name
        store = doc.get("credsStore")
        return store if isinstance(store, str) and store else None

    # -- lookups -------------------------------------------------------------------------

    def get(self, registry: str) -> Credentials | None:
        """The credentials for ``registry`` (a host[:port] or ``docker.io``), if any.

        A config file that can't be read or parsed means no saved logins, with a warning
        (logged once, on the ``puller`` logger), as docker carries on after "Error loading
        config file"; ``login`` and ``logout`` still refuse to rewrite it."""
        try:
            doc = self.load()
        except CredentialError as exc:
            if not self._warned:
                self._warned = True
                logging.getLogger("puller").warning(
                    "puller: WARNING: %s; going on without saved logins", exc)
            return None
        helper = self.helper_for(registry, doc)
        if helper is not None:
            found = _helper_get(helper, config_key(registry))
            if found is not None:
                return found
        auths = doc.get("auths")
        if not isinstance(auths, dict):
            return None
        # An exact key first, then any key docker would read as the same host.
        keys = [config_key(registry)] + [k for k in auths if k != config_key(registry)]
        for key in keys:
            entry = auths.get(key)
            if not isinstance(entry, dict) or not _same_registry(key, registry):
                continue
            creds = _from_entry(entry)
            if creds is not None:
                return creds
        return None

    def store(self, registry: str, creds: Credentials) -> str:
        """Save credentials; returns where they went ("helper NAME" or the file path)."""
        doc = self.load()
        key = config_key(registry)
        helper = self.helper_for(registry, doc)
        if helper is not None:
            secret = creds.identity_token or creds.password
            user = "<token>" if creds.identity_token else creds.username
            _helper_run(helper, "store",
                        json.dumps({"ServerURL": key, "Username": user, "Secret": secret}))
            auths = doc.setdefault("auths", {})
            if isinstance(auths, dict) and key in auths:  # drop a stale plain-text copy
                del auths[key]
                self._save(doc)
            return f"credential helper docker-credential-{helper}"
        auths = doc.get("auths")
        if not isinstance(auths, dict):
            auths = doc["auths"] = {}
        entry: dict[str, Any] = {}
        old = auths.get(key)
        if isinstance(old, dict):  # keep fields we don't manage (e.g. email)
            entry = {k: v for k, v in old.items() if k not in ("auth", "identitytoken",
                                                             "username", "password")}
        if creds.identity_token:
            entry["auth"] = base64.b64encode(f"{creds.username}:".encode()).decode()
            entry["identitytoken"] = creds.identity_token
        else:
            entry["auth"] = base64.b64encode(
                f"{creds.username}:{creds.password}".encode()).decode()
        auths[key] = entry
        self._save(doc)
        return str(self.path)

    def erase(self, registry: str) -> bool:
        """Remove saved credentials; True if anything was removed."""
        doc = self.load()
        key = config_key(registry)
        removed = False
        helper = self.helper_for(registry, doc)
        if helper is not None:
            try:
                _helper_run(helper, "erase", key)
                removed = True
            except CredentialError:
                pass
        auths = doc.get("auths")
        if isinstance(auths, dict):
            for k in [k for k in auths if _same_registry(k, registry)]:
                del auths[k]
                removed = True
            if removed:
                self._save(doc)
        return removed


def _from_entry(entry: dict[str, Any]) -> Credentials | None:
    user = password = ""
    auth = entry.get("auth")
    if isinstance(auth, str) and auth:
        try:
            decoded = base64.b64decode(auth, validate=False).decode()
        except (ValueError, UnicodeDecodeError):
            decoded = ""
        user, sep, password = decoded.partition(":")
        if not sep:
            user = password = ""
    if not user:
        u, p = entry.get("username"), entry.get("password")
        if isinstance(u, str) and isinstance(p, str):
            user, password = u, p
    token = entry.get("identitytoken")
    token = token if isinstance(token, str) else ""
    if token:
        return Credentials(username=user, identity_token=token)
    if user:
        return Credentials(username=user, password=password)
    return None


def _helper_run(name: str, action: str, stdin: str) -> str:
    program = f"docker-credential-{name}"
    try:
        proc = subprocess.run([program, action], input=stdin, capture_output=True, text=True,
                              timeout=_HELPER_TIMEOUT, check=False)
    except FileNotFoundError as exc:
        raise CredentialError(f"credential helper {program} is not installed "
                              f"(named in {docker_config_dir() / 'config.json'})") from exc
    except subprocess.TimeoutExpired as exc:
        raise CredentialError(f"credential helper {program} did not answer") from exc
    except OSError as exc:
        raise CredentialError(f"cannot run credential helper {program}: {exc.strerror}") from exc
    if proc.returncode != 0:
        # Helpers print their error on stdout; it never holds the secret we sent.
        detail = (proc.stdout.strip() or proc.stderr.strip()).splitlines()
        reason = detail[0][:200] if detail else f"exit status {proc.returncode}"
        raise CredentialError(f"credential helper {program} {action} failed: {reason}")
    return proc.stdout


def _helper_get(name: str, server: str) -> Credentials | None:
    try:
        out = _helper_run(name, "get", server)
    except CredentialError as exc:
        if "credentials not found" in str(exc).lower():
            return None
        raise
    try:
        doc = json.loads(out)
    except (ValueError, RecursionError):  # (not chained: json's error holds the output)
        raise CredentialError(f"credential helper docker-credential-{name} returned "
                              "something that is not JSON") from None
    if not isinstance(doc, dict):
        return None
    user, secret = doc.get("Username"), doc.get("Secret")
    if not isinstance(user, str) or not isinstance(secret, str) or not secret:
        return None
    if user == "<token>":
        return Credentials(identity_token=secret)
    return Credentials(username=user, password=secret)
