"""Edge cases of authentication and credentials, against the real registry.

A scripted token service (:class:`Realm`) stands where a registry's token realm is: by
default it answers as distribution's token spec says (Basic-authenticated users get what
they ask for, anonymous clients ``pull``), minting real tokens with the session
``token_server``'s key; a test replaces one answer at a time with something odd. The
registry (docker-registry in ``auth: token`` mode) is real and judges the tokens.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from puller.client import ClientOptions, RegistryClient
from puller.credentials import CredentialError, Credentials, DockerConfig
from puller.errors import AccessDenied, AuthenticationRequired, PullerError, ServerError
from puller.reference import Reference
from tests.support import ThreadedServer
from tests.support.images import build_image, push
from tests.support.registry import Registry, registry_binary

USER, PASSWORD = "edge-user", "edge-secret-pw-7788"
REPO = "edge/app"


class Realm:
    """A token service whose answers a test can replace (``answer``)."""

    def __init__(self, token_server) -> None:
        self.ts = token_server
        self.answer = None  # callable(request, realm) -> aiohttp Response | None (default)
        self.grant = None  # callable(user, name, actions) -> actions granted (default: all)
        self._lock = threading.Lock()
        self._log: list[dict] = []
        self.server = ThreadedServer(self._app, name="scripted-realm")

    @property
    def url(self) -> str:
        return f"{self.server.url}/token"

    @property
    def log(self) -> list[dict]:
        with self._lock:
            return list(self._log)

    def reset(self) -> None:
        self.answer = self.grant = None
        with self._lock:
            self._log.clear()

    def token_for(self, query: dict, user: str | None) -> str:
        scope = next(iter(query.get("scope", [])), "")
        name, actions = "", []
        if scope.count(":") >= 2:
            head, acts = scope.rsplit(":", 1)
            name = head.split(":", 1)[1]
            actions = [a for a in acts.split(",") if a]
        if user is None:
            actions = [a for a in actions if a == "pull"]
        elif self.grant is not None:
            actions = self.grant(user, name, actions)
        return self.ts.issue(name, actions, subject=user or "")

    def _app(self):
        from aiohttp import web

        async def handle(request):
            query = parse_qs(request.query_string, keep_blank_values=True)
            auth = request.headers.get("Authorization", "")
            entry = {"method": request.method, "path": request.path, "query": query,
                     "host": request.host, "authorization": auth}
            with self._lock:
                self._log.append(entry)
            if self.answer is not None:
                resp = self.answer(request, self)
                if resp is not None:
                    return resp
            user = None
            if auth:
                raw = base64.b64decode(auth.split(" ", 1)[1]).decode()
                if raw != f"{USER}:{PASSWORD}":
                    return web.json_response({"details": "incorrect username or password"},
                                             status=401)
                user = USER
            token = self.token_for(query, user)
            return web.json_response({"token": token, "access_token": token,
                                      "expires_in": 300})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app


@pytest.fixture(scope="module")
def realm(token_server):
    r = Realm(token_server)
    r.server.start()
    yield r
    r.server.stop()


@pytest.fixture(scope="module")
def edge_registry(tmp_path_factory, token_server, realm):
    if registry_binary() is None:
        pytest.skip("docker-registry not installed")
    with Registry(tmp_path_factory.mktemp("edge-registry"), auth="token",
                  token_realm=realm.url, token_cert_path=token_server.cert_path,
                  token_service=token_server.service,
                  token_issuer=token_server.issuer) as reg:
        img = build_image(seed=901, layer_sizes=[6_000, 2_000])
        push(reg.url, REPO, "1", img, credentials=(USER, PASSWORD))
        reg.image = img
        yield reg


@pytest.fixture
def reg(edge_registry, realm):
    realm.reset()
    yield edge_registry
    realm.reset()


class Login:
    """``credentials=`` for RegistryClient: one fixed login for every registry."""

    def __init__(self, user: str = USER, password: str = PASSWORD, token: str = "") -> None:
        self.creds = Credentials(username=user, password=password, identity_token=token)

    def get(self, registry: str) -> Credentials:
        return self.creds


def client(retries: int = 0, credentials=None) -> RegistryClient:
    return RegistryClient(ClientOptions(retries=retries, backoff_base=0.0),
                          credentials=credentials)


def ref_of(reg) -> Reference:
    return Reference.parse(f"{reg.host}/{REPO}:1")


def one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text and "\r" not in text, text
    return text


def body(realm: Realm, text: str, status: int = 200):
    """An answer that sends ``text`` (``{token}`` is replaced by a real token)."""
    from aiohttp import web

    def answer(request, r):
        query = parse_qs(request.query_string, keep_blank_values=True)
        out = text.replace("{token}", r.token_for(query, None)) if "{token}" in text else text
        return web.Response(status=status, body=out.encode(),
                            content_type="application/json")
    return answer


# -- what the token service answers -------------------------------------------------------

@pytest.mark.parametrize("expires", [
    "1" + "0" * 400,  # an integer no float holds
    "NaN", "Infinity", "1e308", '"300"', "-5", "0", "null", "true",
])
async def test_odd_expires_in_still_gives_a_cached_token(reg, realm, expires):
    realm.answer = body(realm, '{"token": "{token}", "expires_in": %s, '
                               '"issued_at": "yesterday-ish"}' % expires)
    async with client() as c:
        for _ in range(3):
            got = await c.get_manifest(ref_of(reg))
            assert str(got.digest) == reg.image.digest
    assert len(realm.log) == 1, "the token was not reused"


async def test_access_token_wins_over_token_as_in_docker(reg, realm):
    # distribution's client (and containerd's): "access_token" is equivalent to "token";
    # when both are given, access_token is the one used.
    realm.answer = body(realm, '{"token": "not-a-real-token", "access_token": "{token}"}')
    async with client() as c:
        got = await c.get_manifest(ref_of(reg))
    assert str(got.digest) == reg.image.digest


@pytest.mark.parametrize("text", [
    "<html>try again later</html>",
    "[]",
    "{}",
    '{"token": ""}',
    '{"token": 42}',
    "[" * 100_000,  # deeper than the JSON parser recurses
    " " * 400_000 + '{"token": "x"}',  # huge
    '{"token": "abc\\r\\nX-Injected: 1"}',  # not a header value
    '{"token": "t\\u00e9l\\u00e9phone"}',
])
async def test_unusable_token_answer_is_one_clear_error(reg, realm, text):
    realm.answer = body(realm, text)
    async with client(retries=2) as c:
        with pytest.raises(AuthenticationRequired) as info:
            await c.get_manifest(ref_of(reg))
    msg = one_line(info.value)
    assert f"127.0.0.1:{realm.server.port}" in msg and "token" in msg
    assert "Injected" not in msg and "abc" not in msg
    assert len(realm.log) == 1  # not asked again: it would answer the same


async def test_anonymous_token_refused_names_the_registry_to_log_in_to(reg, realm):
    from aiohttp import web

    realm.answer = lambda request, r: web.json_response(
        {"details": "anonymous access disabled"}, status=401,
        headers={"WWW-Authenticate": 'Basic realm="tokens"'})
    async with client() as c:
        with pytest.raises(AuthenticationRequired) as info:
            await c.get_manifest(ref_of(reg))
    msg = one_line(info.value)
    # The login that helps is the registry's, not one for the token service's host.
    assert f"puller login {reg.host}`" in msg, msg
    assert f"puller login 127.0.0.1:{realm.server.port}" not in msg


async def test_refused_saved_login_at_the_token_service_is_clear(reg, realm):
    async with client(credentials=Login(password="wrong-password-123")) as c:
        with pytest.raises(AuthenticationRequired, match="refused") as info:
            await c.get_manifest(ref_of(reg))
    assert "wrong-password-123" not in str(info.value)
    assert len(realm.log) == 1


@pytest.mark.parametrize("status, error, asked", [
    (503, ServerError, 3),  # retries=2: three requests in all, not three per manifest try
    (403, AccessDenied, 1),  # refused: never asked again
])
async def test_token_service_errors_are_retried_only_when_transient(reg, realm, status, error,
                                                                    asked):
    from aiohttp import web

    realm.answer = lambda request, r: web.json_response({"details": "no"}, status=status)
    async with client(retries=2) as c:
        with pytest.raises(error) as info:
            await c.get_manifest(ref_of(reg))
    one_line(info.value)
    assert len(realm.log) == asked, len(realm.log)


async def test_realm_redirect_is_followed_keeping_the_login_on_the_same_host(reg, realm):
    from aiohttp import web

    def answer(request, r):
        if request.path == "/token":  # moved: on to /v2/token, same origin
            raise web.HTTPTemporaryRedirect(f"/v2/token?{request.query_string}")
        return None
    realm.answer = answer
    async with client(credentials=Login()) as c:
        got = await c.get_manifest(ref_of(reg))
    assert str(got.digest) == reg.image.digest
    assert [e["path"] for e in realm.log] == ["/token", "/v2/token"]
    assert all(e["authorization"].startswith("Basic ") for e in realm.log)


async def test_realm_redirect_to_another_host_carries_no_login(reg, realm):
    from aiohttp import web

    def answer(request, r):
        if request.path == "/token":
            raise web.HTTPFound(f"http://localhost:{r.server.port}/elsewhere?"
                                f"{request.query_string}")
        return None
    realm.answer = answer
    async with client(credentials=Login()) as c:
        got = await c.get_manifest(ref_of(reg))  # anonymous pull is allowed
    assert str(got.digest) == reg.image.digest
    first, second = realm.log
    assert first["authorization"].startswith("Basic ")
    assert second["path"] == "/elsewhere" and second["authorization"] == ""


async def test_identity_token_is_never_posted_to_another_host(reg, realm):
    from aiohttp import web

    def answer(request, r):
        if request.path == "/token":
            raise web.HTTPTemporaryRedirect(f"http://localhost:{r.server.port}/elsewhere")
        return None
    realm.answer = answer
    async with client(retries=2, credentials=Login(user="", password="",
                                                   token="refresh-" + PASSWORD)) as c:
        with pytest.raises(PullerError) as info:
            await c.get_manifest(ref_of(reg))
    assert "redirected" in one_line(info.value) and PASSWORD not in str(info.value)
    assert [e["path"] for e in realm.log] == ["/token"]  # not retried, never sent on


async def test_endless_realm_redirects_end_in_one_error(reg, realm):
    from aiohttp import web

    def answer(request, r):
        raise web.HTTPFound(f"/token?{request.query_string}")
    realm.answer = answer
    async with client(retries=2) as c:
        with pytest.raises(PullerError) as info:
            await c.get_manifest(ref_of(reg))
    assert "redirect" in one_line(info.value)
    assert len(realm.log) <= 20


# -- what the registry answers ------------------------------------------------------------

class _Front:
    """In front of the registry: answers each 401 with the registry's challenge split in
    two ``WWW-Authenticate`` headers, a Basic one first (as some registries send)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.server = ThreadedServer(self._app, name="two-challenges")

    def _app(self):
        import aiohttp
        from aiohttp import web
        from multidict import CIMultiDict

        async def handle(request):
            headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
            async with aiohttp.ClientSession(auto_decompress=False) as s:
                async with s.request(request.method, self.upstream + request.path_qs,
                                     headers=headers, data=await request.read(),
                                     allow_redirects=False) as up:
                    data = await up.read()
                    out = CIMultiDict((k, v) for k, v in up.headers.items()
                                      if k.lower() not in ("content-length", "transfer-encoding",
                                                           "connection", "www-authenticate"))
                    if up.status == 401:
                        out.add("WWW-Authenticate", 'Basic realm="registry"')
                        out.add("WWW-Authenticate", up.headers["WWW-Authenticate"])
                    return web.Response(status=up.status, body=data, headers=out)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app


async def test_bearer_is_chosen_among_several_challenge_headers(reg, realm):
    front = _Front(reg.url)
    with front.server:
        ref = Reference.parse(f"{front.server.host}/{REPO}:1")
        async with client(credentials=Login()) as c:
            got = await c.get_manifest(ref)
    assert str(got.digest) == reg.image.digest
    assert realm.log and realm.log[0]["authorization"].startswith("Basic ")


async def test_insufficient_scope_with_a_good_login_is_not_called_a_bad_login(reg, realm):
    # The token service accepts the login but grants nothing for this repository: the
    # registry answers 401 error="insufficient_scope". The saved login is fine; saying
    # it was refused (and to log in again) would send the user the wrong way.
    realm.grant = lambda user, name, actions: []
    async with client(credentials=Login()) as c:
        with pytest.raises(PullerError) as info:
            await c.get_manifest(ref_of(reg))
    msg = one_line(info.value).lower()
    assert "denied" in msg and REPO in msg
    assert "refused" not in msg and "login again" not in msg and "again)" not in msg
    assert isinstance(info.value, AccessDenied)
    assert len(realm.log) == 1  # the token after the first (anonymous) 401: no loop


async def test_registry_refusing_every_token_is_one_error_after_one_refresh(reg, realm,
                                                                           token_server):
    # The realm hands out tokens the registry won't accept (long expired).
    from aiohttp import web

    def answer(request, r):
        dead = r.ts.issue(REPO, ["pull"], expires_in=-3600)
        return web.json_response({"token": dead, "expires_in": 300})
    realm.answer = answer
    async with client(retries=3) as c:
        with pytest.raises(AuthenticationRequired) as info:
            await c.get_manifest(ref_of(reg))
    msg = one_line(info.value)
    assert "authentication required" in msg
    assert "eyJ" not in msg
    # One token after the anonymous request's 401; when the registry refuses it too,
    # that is the answer (no loop, and no retry as if the network had failed).
    assert len(realm.log) == 1


async def test_token_refused_on_a_blob_get_mid_pull_is_replaced(reg, realm):
    from puller.digest import Digest
    from tests.support.tokenserver import spoil_cached_token

    ref = ref_of(reg)
    async with client() as c:
        await c.get_manifest(ref)
        # The token earned for the manifest is refused when the blobs are fetched (it
        # expired, or was revoked): the blob GET gets a fresh one and goes on.
        spoil_cached_token(c, ref.api_host, f"repository:{REPO}:pull")
        for digest, data in reg.image.blobs().items():
            got = b""
            async with c.open_blob(ref, Digest.parse(digest), size=len(data)) as stream:
                while chunk := await stream.content.read(65536):
                    got += chunk
            assert got == data
    assert len(realm.log) == 2


# -- docker's config.json -----------------------------------------------------------------

def _auth(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize("key", ["https://reg.example:5000/v1/", "http://reg.example:5000",
                                 "reg.example:5000", "https://reg.example:5000"])
def test_auths_key_forms(tmp_path, key):
    (tmp_path / "config.json").write_text(json.dumps({"auths": {key: {"auth": _auth("u", "p")}}}))
    assert DockerConfig(tmp_path).get("reg.example:5000") == Credentials("u", "p")
    assert DockerConfig(tmp_path).get("reg.example") is None


@pytest.mark.parametrize("key", ["https://index.docker.io/v1/", "index.docker.io",
                                 "docker.io", "registry-1.docker.io"])
def test_docker_hub_key_aliases(tmp_path, key):
    (tmp_path / "config.json").write_text(json.dumps({"auths": {key: {"auth": _auth("h", "p")}}}))
    assert DockerConfig(tmp_path).get("docker.io") == Credentials("h", "p")


@pytest.mark.parametrize("entry", [
    {"auth": "!!!not base64"}, {"auth": _auth("nocolon", "")[:-4] + "===="},
    {"auth": base64.b64encode(b"no-colon-here").decode()}, {"auth": 123},
    {"username": "", "password": ""}, {}, "a string",
])
def test_unusable_auths_entries_mean_anonymous(tmp_path, entry):
    (tmp_path / "config.json").write_text(json.dumps({"auths": {"reg.example": entry}}))
    assert DockerConfig(tmp_path).get("reg.example") is None


def test_username_and_password_fields_instead_of_auth(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"auths": {"reg.example": {"username": "u", "password": "p:with:colons"}}}))
    assert DockerConfig(tmp_path).get("reg.example") == Credentials("u", "p:with:colons")


def test_missing_config_dir_means_no_logins(tmp_path):
    assert DockerConfig(tmp_path / "nowhere").get("reg.example") is None


@pytest.mark.parametrize("kind", ["malformed", "directory", "not-an-object", "deep"])
def test_broken_config_file_means_no_logins_and_one_warning(tmp_path, kind, caplog):
    """docker warns "Error loading config file" and goes on without saved logins; the
    warning names the file, not what is in it."""
    path = tmp_path / "config.json"
    if kind == "malformed":
        path.write_text('{"auths": {"reg.example": {"auth": "%s"}' % _auth("u", PASSWORD))
    elif kind == "directory":
        path.mkdir()
    elif kind == "deep":
        path.write_text('{"auths": ' + "[" * 100_000)
    else:
        path.write_text(json.dumps([PASSWORD]))
    config = DockerConfig(tmp_path)
    with caplog.at_level("WARNING", logger="puller"):
        assert config.get("reg.example") is None
        assert config.get("other.example") is None
    assert len(caplog.records) == 1  # once, not per registry
    msg = caplog.records[0].getMessage()
    assert "\n" not in msg and msg.startswith("puller: WARNING: ")
    assert str(path) in msg and PASSWORD not in msg and _auth("u", PASSWORD) not in msg
    with pytest.raises(CredentialError) as info:  # login and logout won't overwrite it
        config.load()
    msg = one_line(info.value)
    assert str(path) in msg and PASSWORD not in msg and _auth("u", PASSWORD) not in msg


# -- credential helpers -------------------------------------------------------------------

def _helper(tmp_path: Path, name: str, script: str) -> dict:
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    exe = bindir / f"docker-credential-{name}"
    exe.write_text(f"#!{sys.executable}\nimport json, sys, time\n{script}\n")
    exe.chmod(0o755)
    (tmp_path / "config.json").write_text(json.dumps(
        {"credsStore": name, "auths": {"other.example": {"auth": _auth("o", "p")}}}))
    return {"PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}


def test_helper_credentials_not_found_means_anonymous(tmp_path, monkeypatch):
    env = _helper(tmp_path, "nf", 'print("credentials not found in native keychain")\n'
                                  "sys.exit(1)")
    monkeypatch.setenv("PATH", env["PATH"])
    assert DockerConfig(tmp_path).get("reg.example") is None


def test_helper_identity_token_convention(tmp_path, monkeypatch):
    env = _helper(tmp_path, "tok", 'json.dump({"ServerURL": sys.stdin.read(), '
                                   '"Username": "<token>", "Secret": "refresh-xyz"}, '
                                   "sys.stdout)")
    monkeypatch.setenv("PATH", env["PATH"])
    creds = DockerConfig(tmp_path).get("reg.example")
    assert creds == Credentials(identity_token="refresh-xyz")
    assert "refresh-xyz" not in repr(creds)


@pytest.mark.parametrize("script,expect", [
    ('print("Username: %s garbage")' % PASSWORD, "not JSON"),
    ('print("boom %s", file=sys.stderr); sys.exit(3)' % "x", "failed"),
    ("time.sleep(30)", "did not answer"),
    ("sys.stdout.write('[' * 100000)", "not JSON"),
])
def test_failing_helper_is_one_clear_error(tmp_path, monkeypatch, script, expect):
    from puller import credentials

    env = _helper(tmp_path, "bad", script)
    monkeypatch.setenv("PATH", env["PATH"])
    monkeypatch.setattr(credentials, "_HELPER_TIMEOUT", 1.0)
    with pytest.raises(CredentialError, match=expect) as info:
        DockerConfig(tmp_path).get("reg.example")
    msg = one_line(info.value)
    assert "docker-credential-bad" in msg and PASSWORD not in msg


def test_missing_helper_is_one_clear_error(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps({"credHelpers": {"reg.example": "absent"}}))
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(CredentialError, match="not installed") as info:
        DockerConfig(tmp_path).get("reg.example")
    one_line(info.value)
    assert DockerConfig(tmp_path).get("elsewhere.example") is None  # only for that host


# -- no secrets in what the CLI prints ----------------------------------------------------

def _cli(*args: str, docker_config: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PULLER_STORE", "DOCKER_CONFIG", "PULLER_INSECURE_REGISTRIES")}
    env["DOCKER_CONFIG"] = str(docker_config)
    return subprocess.run([sys.executable, "-m", "puller", *args], capture_output=True,
                          text=True, timeout=120, env=env)


@pytest.mark.parametrize("entry", [
    {"auth": _auth(USER, "wrong-" + PASSWORD)},
    {"auth": _auth(USER, ""), "identitytoken": "refresh-" + PASSWORD},
])
def test_refused_login_leaks_nothing_in_json_output(reg, realm, tmp_path, entry):
    from aiohttp import web

    if "identitytoken" in entry:  # the OAuth refresh is refused
        realm.answer = lambda request, r: web.json_response(
            {"error": "invalid_grant"}, status=401) if request.method == "POST" else None
    (tmp_path / "config.json").write_text(json.dumps({"auths": {reg.host: entry}}))
    r = _cli("pull", "--json", "--retries", "0", "--store", str(tmp_path / "s"),
             f"{reg.host}/{REPO}:1", docker_config=tmp_path)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    out = r.stdout + r.stderr
    assert PASSWORD not in out and _auth(USER, "wrong-" + PASSWORD) not in out
    assert "refused" in out
    assert realm.log and urlsplit(realm.url).path == realm.log[0]["path"]
