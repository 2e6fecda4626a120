"""TLS settings per registry, following docker's conventions.

For a registry ``HOST[:PORT]`` puller trusts the system CAs, plus

- the file given with ``--ca-cert`` (every registry),
- every ``*.crt`` in ``/etc/docker/certs.d/HOST[:PORT]/`` and in
  ``$DOCKER_CONFIG/certs.d/HOST[:PORT]/`` (default ``~/.docker/certs.d``),

and presents a client certificate when that folder holds ``NAME.cert`` with a matching
``NAME.key``. An *insecure* registry (``--insecure-registry HOST``, or
``PULLER_INSECURE_REGISTRIES=host1,host2``) and every loopback registry, as with docker,
may be reached over HTTPS without verification or, failing that, plain HTTP.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import ssl
from pathlib import Path
from typing import Any, Callable, Iterable

from .errors import PullerError

__all__ = ["certs_dirs", "make_ssl_context", "is_loopback_host", "TLSConfigError",
           "InsecureRegistries"]


class TLSConfigError(PullerError):
    """A CA or client certificate file that can't be loaded."""


def certs_dirs() -> list[Path]:
    from .credentials import docker_config_dir

    dirs = [Path("/etc/docker/certs.d"), docker_config_dir() / "certs.d"]
    extra = os.environ.get("PULLER_CERTS_DIR")
    if extra:
        dirs.insert(0, Path(extra))
    return dirs


def is_loopback_host(host: str) -> bool:
    """``host[:port]`` names this machine: localhost, 127.0.0.0/8 or ::1."""
    name = _hostname(host)
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def make_ssl_context(host: str, *, ca_cert: str | None, verify: bool) -> ssl.SSLContext:
    """The SSL context for one registry host (``host[:port]``). A file that can't be
    used is a :class:`TLSConfigError` naming it; as in docker, so is a ``NAME.cert``
    without ``NAME.key`` and a ``NAME.key`` without ``NAME.cert`` (a client certificate
    saved as ``NAME.crt`` would otherwise be taken for a CA and silently not sent)."""
    if verify:
        ctx = ssl.create_default_context()
    else:
        # No verification, so no need to load the system CA store (tens of ms).
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if ca_cert:
        _load(host, Path(ca_cert), lambda: ctx.load_verify_locations(cafile=ca_cert))
    for base in certs_dirs():
        folder = base / host
        try:
            if not folder.is_dir():
                continue
            files = sorted(folder.iterdir())
        except OSError as exc:
            raise TLSConfigError(f"cannot read {folder}: {exc.strerror or exc}") from exc
        names = {f.name for f in files}
        for f in files:
            if f.suffix == ".crt":
                _load(host, f, functools.partial(ctx.load_verify_locations, cafile=str(f)))
            elif f.suffix == ".cert":
                key = f.with_suffix(".key")
                if key.name not in names:
                    raise TLSConfigError(f"client certificate {f} has no matching {key.name} "
                                         f"(CA certificates must end in .crt)")
                _load(host, f, functools.partial(ctx.load_cert_chain, str(f), str(key)))
            elif f.suffix == ".key" and f.with_suffix(".cert").name not in names:
                raise TLSConfigError(f"key {f} has no matching client certificate "
                                     f"{f.with_suffix('.cert').name}")
    return ctx


def _load(host: str, path: Path, load: Callable[[], object]) -> None:
    """Run ``load``; a failure is one line naming ``path`` (no ``_ssl.c`` positions)."""
    try:
        load()
    except ssl.SSLError as exc:
        reason = (exc.reason or str(exc)).replace("_", " ").lower()
        raise TLSConfigError(f"cannot load {path} (TLS files for {host}): {reason}") from exc
    except OSError as exc:
        raise TLSConfigError(f"cannot load {path} (TLS files for {host}): "
                             f"{exc.strerror or exc}") from exc


class InsecureRegistries:
    """docker's ``insecure-registries`` entries: ``HOST[:PORT]`` (a leading
    ``http://`` or ``https://`` and a trailing ``/`` are dropped, as docker drops them)
    or networks such as ``10.0.0.0/8``, which match a registry named by an address in
    them, or by a name ``--add-host`` gives such an address."""

    def __init__(self, entries: Iterable[str], add_hosts: Iterable[tuple[str, str]] = ()
                 ) -> None:
        self.names: set[str] = set()
        self.networks: list[Any] = []
        for entry in entries:
            entry = entry.strip()
            lower = entry.lower()
            for scheme in ("http://", "https://"):
                if lower.startswith(scheme):
                    entry = entry[len(scheme):]
            entry = entry.rstrip("/")
            network = network_of(entry)
            if network is not None:
                self.networks.append(network)
            elif entry:
                self.names.add(entry)
        self._hosts = dict(add_hosts)

    def __contains__(self, host: str) -> bool:
        if host in self.names:
            return True
        name = _hostname(host)
        return bool(self.networks) and address_in(self._hosts.get(name, name), self.networks)


def network_of(entry: str) -> Any:
    """The IP network an entry such as ``10.0.0.0/8`` names, or None for anything else
    (as in docker's insecure-registries and Go's NO_PROXY)."""
    if "/" not in entry:
        return None
    try:
        return ipaddress.ip_network(entry.strip(), strict=False)
    except ValueError:
        return None


def address_in(name: str, networks: Iterable[Any]) -> bool:
    """``name`` is an IP address in one of ``networks`` (a host name never is)."""
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    return any(address in net for net in networks)


def _hostname(host: str) -> str:
    """The name or address in ``host[:port]`` (without IPv6 brackets)."""
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    if host.count(":") == 1:
        return host.split(":", 1)[0]
    return host
