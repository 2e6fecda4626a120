"""TLS and connection configuration as docker users expect it: certs.d folders, client
certificates (mTLS), insecure registries, --add-host, and one-line errors that name the
host and the fix. Real registries on loopback; small TLS servers only where a registry
can't misbehave the way a test needs."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import ssl
import subprocess
import sys
import warnings
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import trustme

from puller.client import ClientOptions, RegistryClient
from puller.errors import PullerError
from puller.reference import Reference
from puller.tls import TLSConfigError, make_ssl_context
from puller.transport import ConnectionPool
from tests.conftest import _need_registry
from tests.support.images import Pusher, build_image
from tests.support.registry import Registry
from tests.support.sockets import read_head, serve_connections

NAME = "registry.test"


def cli(*args: str, docker_config: Path, env: dict | None = None
        ) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items()
         if k not in ("PULLER_STORE", "DOCKER_CONFIG", "PULLER_INSECURE_REGISTRIES",
                      "PULLER_CERTS_DIR") and not k.lower().endswith("_proxy")}
    e["DOCKER_CONFIG"] = str(docker_config)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "puller", *args], capture_output=True,
                          text=True, timeout=60, env=e)


def one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("puller:")]
    assert len(lines) == 1, r.stderr
    return lines[0]


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    ca, client_ca = trustme.CA(), trustme.CA()
    files = {"ca": d / "ca.crt", "client_ca": d / "client-ca.crt"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    client_ca.cert_pem.write_to_path(str(files["client_ca"]))

    def leaf(name: str, issuer: trustme.CA, *ids: str) -> None:
        cert = issuer.issue_cert(*ids)
        files[name] = d / f"{name}.cert"
        files[f"{name}_key"] = d / f"{name}.key"
        with open(files[name], "wb") as f:
            for pem in cert.cert_chain_pems:
                f.write(pem.bytes())
        cert.private_key_pem.write_to_path(str(files[f"{name}_key"]))

    leaf("server", ca, NAME, "localhost", "127.0.0.1", "::1")
    leaf("client", client_ca, "client@test")
    return files


@pytest.fixture(scope="module")
def image():
    return build_image(seed=811, layer_sizes=[5_000])


def _start(tmp_path_factory, pki, image, **kw) -> Registry:
    _need_registry()
    reg = Registry(tmp_path_factory.mktemp("registry"), tls=(pki["server"], pki["server_key"]),
                   **kw).start()
    ctx = ssl._create_unverified_context()
    if "client_cert" in kw:
        ctx.load_cert_chain(*kw["client_cert"])
    with Pusher(reg.url, ssl_context=ctx) as p:
        p.push("team/app", "1", image)
    return reg


@pytest.fixture(scope="module")
def tls_registry(tmp_path_factory, pki, image):
    reg = _start(tmp_path_factory, pki, image)
    yield reg
    reg.stop()


@pytest.fixture(scope="module")
def mtls_registry(tmp_path_factory, pki, image):
    reg = _start(tmp_path_factory, pki, image, client_ca=pki["client_ca"],
                 client_cert=(pki["client"], pki["client_key"]))
    yield reg
    reg.stop()


@pytest.fixture
def docker_config(tmp_path) -> Path:
    d = tmp_path / "docker-config"
    d.mkdir()
    return d


# -- certs.d ---------------------------------------------------------------------------------


def test_a_key_without_its_cert_is_an_error_as_in_docker(tmp_path, monkeypatch, pki) -> None:
    # The common mistake: the client certificate named client.crt (docker then loads it
    # as a CA) next to client.key. docker refuses: "missing client certificate
    # client.cert for key client.key"; presenting no certificate at all is worse.
    folder = tmp_path / "certs.d" / "reg.example:5000"
    folder.mkdir(parents=True)
    shutil.copy(pki["client"], folder / "client.crt")
    shutil.copy(pki["client_key"], folder / "client.key")
    monkeypatch.setenv("PULLER_CERTS_DIR", str(tmp_path / "certs.d"))
    with pytest.raises(TLSConfigError) as info:
        make_ssl_context("reg.example:5000", ca_cert=None, verify=True)
    msg = str(info.value)
    assert "client.cert" in msg and "client.key" in msg and "\n" not in msg


def test_unusable_tls_files_are_named(tmp_path, monkeypatch) -> None:
    folder = tmp_path / "certs.d" / "reg.example"
    folder.mkdir(parents=True)
    monkeypatch.setenv("PULLER_CERTS_DIR", str(tmp_path / "certs.d"))
    (folder / "ca.crt").write_text("not a certificate\n")
    with pytest.raises(TLSConfigError) as info:
        make_ssl_context("reg.example", ca_cert=None, verify=True)
    assert str(folder / "ca.crt") in str(info.value)
    assert "_ssl.c" not in str(info.value)
    (folder / "ca.crt").unlink()
    (folder / "ca.crt").symlink_to(tmp_path / "nowhere.pem")  # dangling
    with pytest.raises(TLSConfigError) as info:
        make_ssl_context("reg.example", ca_cert=None, verify=True)
    assert str(folder / "ca.crt") in str(info.value)
    (folder / "ca.crt").unlink()
    bad = tmp_path / "bundle.pem"
    bad.write_text("junk\n")
    with pytest.raises(TLSConfigError) as info:
        make_ssl_context("reg.example", ca_cert=str(bad), verify=True)
    assert str(bad) in str(info.value) and "_ssl.c" not in str(info.value)


# -- mTLS -------------------------------------------------------------------------------------


def test_mtls_loopback_without_client_cert_says_so(mtls_registry, docker_config, tmp_path
                                                   ) -> None:
    # The registry speaks TLS and refuses us for want of a client certificate: no plain
    # HTTP fallback (which only earned "answered HTTP 400"), and the fix named.
    ref = f"{mtls_registry.host}/team/app:1"
    line = one_line_error(cli("pull", "--store", str(tmp_path / "s"), ref,
                              docker_config=docker_config))
    assert "client certificate" in line, line
    assert f"certs.d/{mtls_registry.host}/" in line, line
    assert "HTTP 400" not in line


def test_mtls_named_host_with_and_without_client_cert(mtls_registry, pki, docker_config,
                                                      tmp_path, image) -> None:
    name = f"{NAME}:{mtls_registry.port}"
    net = ["--add-host", f"{NAME}:127.0.0.1", "--ca-cert", str(pki["ca"])]
    line = one_line_error(cli("pull", *net, "--store", str(tmp_path / "s"),
                              f"{name}/team/app:1", docker_config=docker_config))
    assert "client certificate" in line and f"certs.d/{name}/" in line, line
    folder = docker_config / "certs.d" / name
    folder.mkdir(parents=True)
    shutil.copy(pki["client"], folder / "client.cert")
    shutil.copy(pki["client_key"], folder / "client.key")
    ok = cli("pull", "-q", *net, "--store", str(tmp_path / "s"), f"{name}/team/app:1",
             docker_config=docker_config)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip().endswith(image.digest)


def test_mtls_refusal_through_the_library_is_not_a_plain_http_fallback(mtls_registry
                                                                        ) -> None:
    async def main() -> None:
        async with RegistryClient(ClientOptions(retries=0), credentials=None) as client:
            await client.get_manifest(Reference.parse(f"{mtls_registry.host}/team/app:1"))

    with pytest.raises(PullerError) as info:
        asyncio.run(main())
    assert "client certificate" in str(info.value), info.value


# -- plain HTTP, insecure registries, --add-host --------------------------------------------


def test_a_plain_http_registry_not_named_insecure_gets_the_fix(registry, docker_config,
                                                              tmp_path) -> None:
    name = f"{NAME}:{registry.port}"
    line = one_line_error(cli("pull", "--add-host", f"{NAME}:127.0.0.1", "--store",
                              str(tmp_path / "s"), f"{name}/team/none:1",
                              docker_config=docker_config))
    assert f"--insecure-registry {name}" in line, line
    assert "_ssl.c" not in line


@pytest.mark.parametrize("entry", ["http://{name}", "https://{name}/", "127.0.0.0/8"])
def test_insecure_registry_entries_as_docker_takes_them(tls_registry, docker_config, tmp_path,
                                                         image, entry) -> None:
    # docker strips a scheme from an insecure-registry entry, and takes CIDR networks.
    name = f"{NAME}:{tls_registry.port}"
    r = cli("pull", "-q", "--add-host", f"{NAME}:127.0.0.1", "--insecure-registry",
            entry.format(name=name), "--store", str(tmp_path / "s"), f"{name}/team/app:1",
            docker_config=docker_config)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith(image.digest)


def test_certificate_errors_suggest_what_can_fix_them(tls_registry, pki, docker_config,
                                                      tmp_path) -> None:
    # A name the certificate doesn't cover: another CA can't help.
    name = f"other.test:{tls_registry.port}"
    line = one_line_error(cli("pull", "--add-host", "other.test:127.0.0.1", "--ca-cert",
                              str(pki["ca"]), "--store", str(tmp_path / "s"),
                              f"{name}/team/app:1", docker_config=docker_config))
    assert name in line and f"--insecure-registry {name}" in line, line
    assert "--ca-cert" not in line, line
    # An unknown CA: every way out is named.
    name = f"{NAME}:{tls_registry.port}"
    line = one_line_error(cli("pull", "--add-host", f"{NAME}:127.0.0.1", "--store",
                              str(tmp_path / "s"), f"{name}/team/app:1",
                              docker_config=docker_config))
    assert "--ca-cert" in line and f"certs.d/{name}/" in line, line
    assert f"--insecure-registry {name}" in line


class _NameServer:
    """Plain HTTP: answers every request with 200 and remembers its Host header."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.hosts: list[str] = []
        serve_connections(self.sock, self._answer)

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            for line in read_head(conn).decode("latin-1").split("\r\n"):
                if line.lower().startswith("host:"):
                    self.hosts.append(line[5:].strip())
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")


def test_add_host_over_plain_http_still_sends_the_name() -> None:
    # Like docker (and like HTTPS here): the address is only where to dial; the Host
    # header (virtual hosts, the registry's upload Locations) keeps the name.
    server = _NameServer()
    try:
        port = server.sock.getsockname()[1]
        pool = ConnectionPool(add_hosts={NAME: "127.0.0.1"}, timeout=10)
        parts = urlsplit(f"http://{NAME}:{port}/v2/")
        conn = pool.new(parts, None)
        conn.request("GET", "/v2/")
        conn.getresponse().read()
        conn.close()
        assert server.hosts == [f"{NAME}:{port}"]
    finally:
        server.sock.close()


# -- TLS versions ------------------------------------------------------------------------------


class _OldTLSServer:
    """Speaks only TLS 1.0 (or refuses whatever this OpenSSL can't): counts connections."""

    def __init__(self, pki: dict[str, Path]) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(pki["server"], pki["server_key"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            self.ctx.minimum_version = ssl.TLSVersion.TLSv1
            self.ctx.maximum_version = ssl.TLSVersion.TLSv1
        self.ctx.set_ciphers("ALL:@SECLEVEL=0")  # TLS 1.0 ciphers, so it gets that far
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.accepted = 0
        serve_connections(self.sock, self._answer)

    def _answer(self, conn: socket.socket) -> None:
        self.accepted += 1
        try:
            with self.ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(4096)
        except (OSError, ssl.SSLError):
            conn.close()


def test_an_old_tls_server_is_one_clear_error_without_fallback_or_retries(pki, docker_config,
                                                                          tmp_path) -> None:
    server = _OldTLSServer(pki)
    try:
        host = f"127.0.0.1:{server.sock.getsockname()[1]}"
        line = one_line_error(cli("pull", "--store", str(tmp_path / "s"), f"{host}/a/b:1",
                                  docker_config=docker_config))
        assert host in line and "TLS 1.2" in line, line
        assert server.accepted == 1  # not retried, and no plain HTTP try on top
    finally:
        server.sock.close()


# -- a TLS connection that ends without TLS's goodbye -----------------------------------------


class _CuttingTLSServer:
    """Serves one blob over HTTPS. The first answer stops half-way and closes the TCP
    connection without a TLS close_notify (as a load balancer timing a connection out
    does); later answers honour ``Range``."""

    def __init__(self, pki: dict[str, Path], data: bytes) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(pki["server"], pki["server_key"])
        self.data = data
        self.ranges: list[str | None] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        serve_connections(self.sock, self._answer)

    def _answer(self, conn: socket.socket) -> None:
        try:
            tls = self.ctx.wrap_socket(conn, server_side=True)
            head = read_head(tls).decode("latin-1")
        except (OSError, ssl.SSLError):
            conn.close()
            return
        rng = next((line.split(":", 1)[1].strip() for line in head.split("\r\n")
                    if line.lower().startswith("range:")), None)
        self.ranges.append(rng)
        start = int(rng.removeprefix("bytes=").split("-")[0]) if rng else 0
        body = self.data[start:]
        status = "206 Partial Content" if rng else "200 OK"
        extra = f"Content-Range: bytes {start}-{len(self.data) - 1}/{len(self.data)}\r\n" \
            if rng else ""
        tls.sendall(f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{extra}"
                    f"Connection: close\r\n\r\n".encode())
        if len(self.ranges) == 1:
            tls.sendall(body[:len(body) // 2])
            tls.shutdown(socket.SHUT_RDWR)  # TCP FIN, no close_notify
            tls.close()
            return
        tls.sendall(body)
        tls.close()


def test_a_tls_connection_closed_without_goodbye_mid_blob_is_resumed(pki, tmp_path) -> None:
    from puller.client import BlobRequest
    from puller.digest import Digest
    from puller.errors import PullerError
    from puller.store import ContentStore
    from puller.threadfetch import Handle, fetch_into

    data = os.urandom(3_000_000)
    server = _CuttingTLSServer(pki, data)
    try:
        digest = Digest.from_bytes(data)
        ctx = make_ssl_context("127.0.0.1", ca_cert=None, verify=False)
        req = BlobRequest(url=f"https://127.0.0.1:{server.sock.getsockname()[1]}/v2/a/b/blobs/"
                              f"{digest}", headers={}, ssl_for=lambda _: ctx, timeout=10)
        pool = ConnectionPool(timeout=10)
        store = ContentStore(tmp_path / "store")
        writer = store.ingest(digest, len(data))
        with pytest.raises(PullerError) as info:
            fetch_into(req, writer, handle=Handle(), progress=lambda _: None, pool=pool)
        assert info.value.retryable, info.value  # a broken transfer, not a refusal
        assert "broke" in str(info.value)
        kept = writer.offset
        assert 0 < kept <= len(data) // 2
        fetch_into(req, writer, handle=Handle(), progress=lambda _: None, pool=pool)
        writer.commit()
        assert store.read(digest, max_size=len(data)) == data
        assert server.ranges == [None, f"bytes={kept}-"]
        pool.close()
    finally:
        server.sock.close()


def test_tls_errors_that_are_not_refusals_are_retried() -> None:
    """A handshake the peer drops (an overloaded load balancer) or a record that went bad
    on the way is transient; a refusal (an alert, a certificate, plain HTTP) is not."""
    from puller.transport import describe_network_error

    def error(cls: type[ssl.SSLError], reason: str) -> ssl.SSLError:
        e = cls(1, reason)
        e.reason = reason  # as OpenSSL sets it
        return e

    for cls, reason in ((ssl.SSLEOFError, "UNEXPECTED_EOF_WHILE_READING"),
                        (ssl.SSLError, "DECRYPTION_FAILED_OR_BAD_RECORD_MAC")):
        err = describe_network_error(error(cls, reason), "r.example", "fetching x")
        assert err.retryable and "TLS connection to r.example broke" in str(err), err
    for reason in ("SSLV3_ALERT_HANDSHAKE_FAILURE", "WRONG_VERSION_NUMBER",
                   "TLSV1_ALERT_PROTOCOL_VERSION", "SSLV3_ALERT_BAD_CERTIFICATE"):
        assert not describe_network_error(error(ssl.SSLError, reason), "r.example",
                                          "fetching x").retryable, reason
