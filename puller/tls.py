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

import ipaddress
import os
import ssl
from pathlib import Path

from .errors import PullerError

__all__ = ["certs_dirs", "make_ssl_context", "is_loopback_host", "TLSConfigError"]


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
    name = host
    if name.startswith("["):
        name = name[1:].split("]", 1)[0]
    elif name.count(":") == 1:
        name = name.split(":", 1)[0]
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def make_ssl_context(host: str, *, ca_cert: str | None, verify: bool) -> ssl.SSLContext:
    """The SSL context for one registry host (``host[:port]``)."""
    if verify:
        ctx = ssl.create_default_context()
    else:
        # No verification, so no need to load the system CA store (tens of ms).
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    try:
        if ca_cert:
            ctx.load_verify_locations(cafile=ca_cert)
        for base in certs_dirs():
            folder = base / host
            if not folder.is_dir():
                continue
            for f in sorted(folder.iterdir()):
                if f.suffix == ".crt":
                    ctx.load_verify_locations(cafile=str(f))
                elif f.suffix == ".cert":
                    key = f.with_suffix(".key")
                    if not key.is_file():
                        raise TLSConfigError(f"client certificate {f} has no matching {key.name}")
                    ctx.load_cert_chain(str(f), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(f"cannot load TLS files for {host}: {exc}") from exc
    return ctx
