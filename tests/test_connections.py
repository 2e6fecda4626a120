"""Kept-alive connections that the server closed while idle: one request more on a fresh
connection, in the one place every http.client path takes its connections from."""

from __future__ import annotations

import http.client
import socket
from urllib.parse import urlsplit

import pytest

from puller.transport import ConnectionPool, ThreadedTransport, describe_network_error
from tests.support.sockets import read_head, serve_connections


class _HangUpServer:
    """Answers one request per connection (keep-alive, as far as the client can tell)
    and then closes it: every idle connection a client keeps has gone stale."""

    def __init__(self, answer: bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
                 hold: bool = False) -> None:
        self.answer = answer
        self.hold = hold  # keep the connection open after answering, until close()
        self.held: list[socket.socket] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.accepted = 0
        self.answered = 0
        self._stop = False
        serve_connections(self.sock, self._answer, lambda: not self._stop)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/v2/"

    def _answer(self, conn: socket.socket) -> None:
        self.accepted += 1
        if read_head(conn):
            self.answered += 1  # before the client can see the answer
            conn.sendall(self.answer)
        if self.hold:
            self.held.append(conn)
        else:
            conn.close()

    def close(self) -> None:
        self._stop = True
        self.sock.close()
        for conn in self.held:
            conn.close()


@pytest.fixture
def server():
    s = _HangUpServer()
    yield s
    s.close()


def _get(conn: http.client.HTTPConnection) -> bytes:
    conn.request("GET", "/v2/")
    resp = conn.getresponse()
    return resp.read()


def test_a_stale_idle_connection_is_replaced_once(server) -> None:
    pool = ConnectionPool(timeout=5)
    parts = urlsplit(server.url)
    try:
        for _ in range(3):
            conn, body = pool.open(parts, None, _get)
            assert body == b"ok"
            pool.give(parts, conn)  # looks reusable; the server has hung up on it
    finally:
        pool.close()
    assert server.answered == 3 and server.accepted == 3


def test_no_second_try_when_told_not_to_or_on_a_new_connection(server) -> None:
    pool = ConnectionPool(timeout=5)
    parts = urlsplit(server.url)
    calls = []

    def failing(c: http.client.HTTPConnection) -> None:
        calls.append(c)
        raise ConnectionResetError("refused")

    try:
        conn, _ = pool.open(parts, None, _get)
        pool.give(parts, conn)
        with pytest.raises((OSError, http.client.HTTPException)):
            pool.open(parts, None, _get, retry=lambda: False)  # e.g. the caller was cancelled
        with pytest.raises(ConnectionResetError):
            pool.open(parts, None, failing)  # nothing idle: a new connection, one try
    finally:
        pool.close()
    assert len(calls) == 1


async def test_the_threaded_transport_goes_on_after_a_hang_up(server) -> None:
    transport = ThreadedTransport(timeout=5)
    try:
        for _ in range(3):
            resp = await transport.request("GET", server.url, headers={}, ssl_context=None)
            assert resp.status == 200 and await resp.content.read() == b"ok"
            resp.release()
    finally:
        await transport.close()
    assert server.answered == 3


@pytest.mark.parametrize("length", [b"-5", b"12abc", b""])
async def test_a_content_length_that_is_not_a_count_of_bytes_fails_at_once(length) -> None:
    # Before, http.client read such a body until the server hung up, which this one
    # never does: the request sat out the whole stall timeout.
    server = _HangUpServer(b"HTTP/1.1 200 OK\r\nContent-Length: " + length + b"\r\n\r\nabc",
                           hold=True)
    transport = ThreadedTransport(timeout=60)
    try:
        with pytest.raises(http.client.HTTPException) as info:
            await transport.request("GET", server.url, headers={}, ssl_context=None)
    finally:
        await transport.close()
        server.close()
    err = describe_network_error(info.value, "registry.test", "fetching blob x")
    assert str(err) == (f"registry.test sent an invalid Content-Length ({length.decode()!r}) "
                        "while fetching blob x")


# -- which requests go through a proxy (docker's rules) -----------------------------------

_PROXY_ENV = ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy",
              "REQUEST_METHOD")


@pytest.fixture
def proxy_env(monkeypatch):
    for name in _PROXY_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_the_proxy_is_chosen_by_scheme_and_never_for_this_machine(proxy_env) -> None:
    from puller.transport import env_proxy

    proxy_env.setenv("HTTPS_PROXY", "proxy.corp:3128")  # no scheme: http://, as Go reads it
    proxy_env.setenv("http_proxy", "http://u:p@proxy.corp:8080")
    assert env_proxy("https://registry-1.docker.io/v2/") == "http://proxy.corp:3128"
    assert env_proxy("http://mirror.corp/v2/") == "http://u:p@proxy.corp:8080"
    for local in ("http://127.0.0.1:5000/v2/", "https://127.9.9.9/v2/", "http://localhost:5000/v2/",
                  "https://[::1]:5000/v2/", "http://LOCALHOST/v2/"):
        assert env_proxy(local) is None, local
    proxy_env.delenv("HTTPS_PROXY")
    assert env_proxy("https://registry-1.docker.io/v2/") is None  # no HTTPS proxy set


def test_no_proxy_names_hosts_domains_ports_and_networks(proxy_env) -> None:
    from puller.transport import env_proxy

    proxy_env.setenv("HTTPS_PROXY", "http://proxy.corp:3128")
    proxy_env.setenv("NO_PROXY", ".internal, reg.example:5000, 10.0.0.0/8, fd00::/8")
    assert env_proxy("https://a.b.internal/v2/") is None
    assert env_proxy("https://reg.example:5000/v2/") is None
    assert env_proxy("https://reg.example:6000/v2/") == "http://proxy.corp:3128"
    assert env_proxy("https://10.20.30.40:443/v2/") is None
    assert env_proxy("https://11.0.0.1/v2/") == "http://proxy.corp:3128"
    assert env_proxy("https://[fd00::5]/v2/") is None
    proxy_env.setenv("NO_PROXY", "*")
    assert env_proxy("https://anything.example/v2/") is None


def test_upper_case_names_come_first_as_in_go(proxy_env) -> None:
    from puller.transport import env_proxy

    proxy_env.setenv("HTTPS_PROXY", "http://upper:1")
    proxy_env.setenv("https_proxy", "http://lower:2")
    assert env_proxy("https://r.example/") == "http://upper:1"
    proxy_env.setenv("HTTPS_PROXY", "")
    assert env_proxy("https://r.example/") == "http://lower:2"


@pytest.mark.parametrize("value, message", [
    ("socks5://h:1080", "HTTPS_PROXY='socks5://h:1080': only http:// proxies are supported"),
    ("http://h:port", "HTTPS_PROXY='http://h:port' is not a proxy URL"),
    ("http://:3128", "HTTPS_PROXY='http://:3128' is not a proxy URL"),
])
def test_an_unusable_proxy_is_an_error_naming_the_variable(proxy_env, value, message) -> None:
    from puller.transport import ProxyError, env_proxy

    proxy_env.setenv("HTTPS_PROXY", value)
    with pytest.raises(ProxyError) as info:
        env_proxy("https://r.example/v2/")
    assert str(info.value).startswith(message)
    assert not info.value.retryable
