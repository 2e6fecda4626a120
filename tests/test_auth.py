"""Logins, credentials and TLS against the real registry in htpasswd and token modes."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import ssl
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import trustme

from puller import Puller
from puller.client import ClientOptions, RegistryClient
from puller.credentials import Credentials, DockerConfig
from puller.errors import AuthenticationRequired
from puller.reference import Reference
from tests.support import ThreadedServer
from tests.support.images import Pusher, build_image, push
from tests.support.tokenserver import spoil_cached_token

USER, PASSWORD = "alice", "wonder-land-42"


def cli(*args: str, docker_config: Path, stdin: str | None = None,
        env: dict | None = None) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k not in ("PULLER_STORE", "DOCKER_CONFIG",
                                                           "PULLER_INSECURE_REGISTRIES")}
    e["DOCKER_CONFIG"] = str(docker_config)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "puller", *args], input=stdin,
                          capture_output=True, text=True, timeout=120, env=e)


def no_traceback(r: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in r.stderr, r.stderr


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("registry.test", "127.0.0.1")
    files = {"ca": d / "ca.crt", "cert": d / "server.crt", "key": d / "server.key"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    with open(files["cert"], "wb") as f:
        for pem in cert.cert_chain_pems:
            f.write(pem.bytes())
    cert.private_key_pem.write_to_path(str(files["key"]))
    return files


@pytest.fixture
def tls_registry(registry_factory, tls_files):
    return registry_factory(auth="htpasswd", htpasswd_users={USER: PASSWORD},
                            tls=(tls_files["cert"], tls_files["key"]))


@pytest.fixture
def docker_config(tmp_path) -> Path:
    d = tmp_path / "docker-config"
    d.mkdir()
    return d


def test_login_tls_htpasswd_then_pull_with_saved_credentials(tls_registry, tls_files,
                                                            docker_config, tmp_path):
    img = build_image(seed=51, layer_sizes=[30_000])
    push(tls_registry.url, "team/api", "3", img, credentials=(USER, PASSWORD))
    name = f"registry.test:{tls_registry.port}"
    net = ["--add-host", "registry.test:127.0.0.1", "--ca-cert", str(tls_files["ca"])]
    # Other settings in config.json survive a login.
    (docker_config / "config.json").write_text(json.dumps(
        {"auths": {"other.example": {"auth": "eDp5"}}, "proxies": {"default": {}},
         "detachKeys": "ctrl-e,e"}))

    wrong = cli("login", "-u", USER, "--password-stdin", *net, name,
                stdin="not-the-password\n", docker_config=docker_config)
    assert wrong.returncode == 1, wrong.stderr
    no_traceback(wrong)
    assert "not-the-password" not in wrong.stderr + wrong.stdout
    assert name not in (docker_config / "config.json").read_text()

    ok = cli("login", "-u", USER, "--password-stdin", *net, name, stdin=PASSWORD + "\n",
             docker_config=docker_config)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "Login Succeeded"
    assert "stored unencrypted" in ok.stderr
    cfg_path = docker_config / "config.json"
    assert stat.S_IMODE(cfg_path.stat().st_mode) == 0o600
    cfg = json.loads(cfg_path.read_text())
    assert cfg["auths"][name]["auth"] == base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    assert cfg["auths"]["other.example"] == {"auth": "eDp5"}
    assert cfg["proxies"] == {"default": {}} and cfg["detachKeys"] == "ctrl-e,e"

    store = tmp_path / "store"
    pulled = cli("pull", "-q", *net, "--store", str(store), f"{name}/team/api:3",
                 docker_config=docker_config)
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout.strip().endswith(img.digest)
    assert PASSWORD not in pulled.stdout + pulled.stderr

    # Without the CA: a plain verification error that says what to do.
    bad = cli("pull", "--add-host", "registry.test:127.0.0.1", "--store", str(store),
              f"{name}/team/api:3", docker_config=docker_config)
    assert bad.returncode == 1
    no_traceback(bad)
    assert "could not be verified" in bad.stderr and "--ca-cert" in bad.stderr

    # docker's certs.d convention, under $DOCKER_CONFIG.
    certs = docker_config / "certs.d" / name
    certs.mkdir(parents=True)
    shutil.copy(tls_files["ca"], certs / "ca.crt")
    via_certs_d = cli("pull", "-q", "--add-host", "registry.test:127.0.0.1", "--store",
                      str(tmp_path / "s2"), f"{name}/team/api:3", docker_config=docker_config)
    assert via_certs_d.returncode == 0, via_certs_d.stderr
    shutil.rmtree(docker_config / "certs.d")

    # --insecure-registry names one host; it then needs no CA.
    insecure = cli("pull", "-q", "--add-host", "registry.test:127.0.0.1", "--insecure-registry",
                   name, "--store", str(tmp_path / "s3"), f"{name}/team/api:3",
                   docker_config=docker_config)
    assert insecure.returncode == 0, insecure.stderr

    out = cli("logout", name, docker_config=docker_config)
    assert out.returncode == 0 and f"Removing login credentials for {name}" in out.stdout
    assert name not in json.loads(cfg_path.read_text())["auths"]
    again = cli("logout", name, docker_config=docker_config)
    assert again.returncode == 0 and "Not logged in" in again.stdout

    anon = cli("pull", *net, "--store", str(tmp_path / "s4"), f"{name}/team/api:3",
               docker_config=docker_config)
    assert anon.returncode == 1
    no_traceback(anon)
    assert f"authentication required for {name}" in anon.stderr
    assert f"puller login {name}" in anon.stderr


def test_skopeo_uses_the_login_puller_saved(registry_factory, docker_config, tmp_path):
    skopeo = shutil.which("skopeo")
    if skopeo is None:
        pytest.skip("skopeo is not installed")
    reg = registry_factory(auth="htpasswd", htpasswd_users={USER: PASSWORD})
    img = build_image(seed=52, layer_sizes=[10_000])
    push(reg.url, "shared/login", "1", img, credentials=(USER, PASSWORD))
    r = cli("login", "-u", USER, "--password-stdin", reg.host, stdin=PASSWORD,
            docker_config=docker_config)
    assert r.returncode == 0, r.stderr
    inspect = subprocess.run([skopeo, "inspect", "--tls-verify=false", "--authfile",
                              str(docker_config / "config.json"),
                              f"docker://{reg.host}/shared/login:1"],
                             capture_output=True, text=True, timeout=60)
    assert inspect.returncode == 0, inspect.stderr
    assert json.loads(inspect.stdout)["Digest"] == img.digest
    # And the other way round: basic auth for a plain-HTTP loopback registry works in pull.
    pulled = cli("pull", "-q", "--store", str(tmp_path / "s"), f"{reg.host}/shared/login:1",
                 docker_config=docker_config)
    assert pulled.returncode == 0, pulled.stderr


@pytest.fixture
def private_token_registry(token_registry):
    """The token registry with anonymous pulls switched off for the test."""
    ts = token_registry.tokenserver
    saved = ts.anonymous_actions
    ts.anonymous_actions = ()
    ts.clear_log()
    yield token_registry
    ts.anonymous_actions = saved
    ts.refresh_tokens.clear()


def test_bearer_token_with_credentials_and_no_leaks(private_token_registry, docker_config,
                                                    unique_repo, tmp_path):
    reg = private_token_registry
    user, password = reg.credentials
    img = build_image(seed=53, layer_sizes=[20_000, 5_000])
    push(reg.url, unique_repo, "p", img, credentials=reg.credentials)
    ref = f"{reg.host}/{unique_repo}:p"

    denied = cli("pull", "--store", str(tmp_path / "s1"), ref, docker_config=docker_config)
    assert denied.returncode == 1
    no_traceback(denied)
    assert "authentication required" in denied.stderr or "denied" in denied.stderr

    bad = cli("login", "-u", user, "--password-stdin", reg.host, stdin="wrong",
              docker_config=docker_config)
    assert bad.returncode == 1
    assert not (docker_config / "config.json").exists()
    ok = cli("login", "-u", user, "--password-stdin", reg.host, stdin=password,
             docker_config=docker_config)
    assert ok.returncode == 0, ok.stderr

    reg.tokenserver.clear_log()
    r = cli("pull", "--json", "--store", str(tmp_path / "s2"), ref, docker_config=docker_config)
    assert r.returncode == 0, r.stderr
    log = reg.tokenserver.log
    assert log and all(e["user"] == user for e in log)
    # Neither the password nor a token (JWTs start with "eyJ") shows up anywhere.
    for text in (r.stdout, r.stderr):
        assert password not in text and "eyJ" not in text and "Bearer" not in text


def test_identity_token_is_exchanged_by_oauth_refresh(private_token_registry, docker_config,
                                                      unique_repo, tmp_path):
    reg = private_token_registry
    img = build_image(seed=54, layer_sizes=[4_000])
    push(reg.url, unique_repo, "i", img, credentials=reg.credentials)
    reg.tokenserver.refresh_tokens["refresh-abc"] = reg.credentials[0]
    reg.tokenserver.clear_log()
    (docker_config / "config.json").write_text(json.dumps({"auths": {reg.host: {
        "auth": base64.b64encode(b"someone:").decode(), "identitytoken": "refresh-abc"}}}))
    r = cli("pull", "-q", "--store", str(tmp_path / "s"), f"{reg.host}/{unique_repo}:i",
            docker_config=docker_config)
    assert r.returncode == 0, r.stderr
    assert {e.get("grant") for e in reg.tokenserver.log} == {"refresh_token"}


HELPER = """\
#!{python}
import json, sys
path = {store!r}
try:
    data = json.load(open(path))
except FileNotFoundError:
    data = {{}}
action = sys.argv[1]
if action == "store":
    item = json.load(sys.stdin)
    data[item["ServerURL"]] = item
    json.dump(data, open(path, "w"))
elif action == "get":
    url = sys.stdin.read().strip()
    if url not in data:
        print("credentials not found in native keychain")
        sys.exit(1)
    json.dump(data[url], sys.stdout)
elif action == "erase":
    url = sys.stdin.read().strip()
    data.pop(url, None)
    json.dump(data, open(path, "w"))
"""


def test_credential_helper_get_store_erase(registry_factory, docker_config, tmp_path):
    reg = registry_factory(auth="htpasswd", htpasswd_users={USER: PASSWORD})
    img = build_image(seed=55, layer_sizes=[3_000])
    push(reg.url, "helper/x", "1", img, credentials=(USER, PASSWORD))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    helper = bindir / "docker-credential-test"
    secrets = tmp_path / "helper-store.json"
    helper.write_text(HELPER.format(python=sys.executable, store=str(secrets)))
    helper.chmod(0o755)
    (docker_config / "config.json").write_text(json.dumps({"credsStore": "test"}))
    env = {"PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}

    r = cli("login", "-u", USER, "--password-stdin", reg.host, stdin=PASSWORD,
            docker_config=docker_config, env=env)
    assert r.returncode == 0, r.stderr
    assert "unencrypted" not in r.stderr
    assert json.loads(secrets.read_text())[reg.host]["Secret"] == PASSWORD
    assert PASSWORD not in (docker_config / "config.json").read_text()

    pulled = cli("pull", "-q", "--store", str(tmp_path / "s"), f"{reg.host}/helper/x:1",
                 docker_config=docker_config, env=env)
    assert pulled.returncode == 0, pulled.stderr

    out = cli("logout", reg.host, docker_config=docker_config, env=env)
    assert out.returncode == 0, out.stderr
    assert reg.host not in json.loads(secrets.read_text())


def test_credential_lookup_rules(tmp_path):
    """docker's key forms: Docker Hub's URL key, URL-shaped keys, helpers per registry."""
    cfg = tmp_path / "config.json"
    hub = base64.b64encode(b"hubuser:hubpass").decode()
    cfg.write_text(json.dumps({"auths": {
        "https://index.docker.io/v1/": {"auth": hub},
        "https://myreg.example:5000/v2/": {"auth": base64.b64encode(b"u:p").decode()},
        "broken.example": {"auth": "!!!not base64"},
    }}))
    dc = DockerConfig(tmp_path)
    assert dc.get("docker.io") == Credentials("hubuser", "hubpass")
    assert dc.get("myreg.example:5000") == Credentials("u", "p")
    assert dc.get("myreg.example") is None
    assert dc.get("broken.example") is None
    assert "hubpass" not in repr(dc.get("docker.io"))
    dc.store("docker.io", Credentials("new", "secret"))
    assert json.loads(cfg.read_text())["auths"]["https://index.docker.io/v1/"]["auth"] == \
        base64.b64encode(b"new:secret").decode()
    assert dc.erase("myreg.example:5000")
    assert "https://myreg.example:5000/v2/" not in json.loads(cfg.read_text())["auths"]


async def test_refused_token_is_refreshed_mid_run(token_registry, unique_repo, store_dir):
    img = build_image(seed=56, layer_sizes=[2_000])
    push(token_registry.url, unique_repo, "t", img, credentials=token_registry.credentials)
    ref = Reference.parse(f"{token_registry.host}/{unique_repo}:t")
    async with RegistryClient(ClientOptions(), credentials=None) as client:
        first = await client.get_manifest(ref)
        # The registry now refuses the cached token (expired or revoked): the client
        # must answer the new challenge with a fresh token, not fail.
        spoil_cached_token(client, ref.api_host, f"repository:{unique_repo}:pull")
        token_registry.tokenserver.clear_log()
        second = await client.get_manifest(ref)
        assert second.digest == first.digest
        assert len(token_registry.tokenserver.log) == 1


async def test_basic_credentials_refused_is_clear(registry_factory, unique_repo):
    reg = registry_factory(auth="htpasswd", htpasswd_users={USER: PASSWORD})

    class Wrong:
        def get(self, registry: str) -> Credentials:
            return Credentials(USER, "nope")

    ref = Reference.parse(f"{reg.host}/{unique_repo}:x")
    async with RegistryClient(ClientOptions(retries=0), credentials=Wrong()) as client:
        with pytest.raises(AuthenticationRequired, match="refused") as info:
            await client.get_manifest(ref)
    assert "nope" not in str(info.value)


async def test_one_repositorys_unusable_challenge_fails_only_that_repository(
        registry, proxy, unique_repo):
    img = build_image(seed=57, layer_sizes=[1_500])
    push(registry.url, f"{unique_repo}/open", "t", img)
    push(registry.url, f"{unique_repo}/odd", "t", img)
    proxy.status(401, path_regex=f"/v2/{unique_repo}/odd/", times=None,
                 headers={"WWW-Authenticate": 'Bearer service="nowhere"'})  # no realm
    odd = Reference.parse(f"{proxy.host}/{unique_repo}/odd:t")
    fine = Reference.parse(f"{proxy.host}/{unique_repo}/open:t")
    async with RegistryClient(ClientOptions(retries=0), credentials=None) as client:
        assert str((await client.get_manifest(fine)).digest) == img.digest
        for _ in range(2):
            with pytest.raises(AuthenticationRequired, match="without a usable realm"):
                await client.get_manifest(odd)
            assert str((await client.get_manifest(fine)).digest) == img.digest


class _RedirectingFront:
    """In front of a registry: blob GETs are answered with a 307 to a "CDN" on another
    port (another origin); the CDN records whether it saw an Authorization header."""

    def __init__(self, upstream: str, blobs: dict[str, bytes]) -> None:
        self.upstream = upstream
        self.blobs = blobs
        self.cdn_saw_auth: list[bool] = []
        self.front_saw_auth: list[bool] = []
        self._lock = threading.Lock()
        self.cdn = ThreadedServer(self._cdn_app, name="cdn")
        self.front = ThreadedServer(self._front_app, name="front")

    def _cdn_app(self):
        from aiohttp import web

        async def blob(request):
            with self._lock:
                self.cdn_saw_auth.append("Authorization" in request.headers)
            return web.Response(body=self.blobs[request.match_info["digest"]])

        app = web.Application()
        app.router.add_get("/cdn/{digest}", blob)
        return app

    def _front_app(self):
        import aiohttp
        from aiohttp import web

        async def handle(request):
            with self._lock:
                self.front_saw_auth.append("Authorization" in request.headers)
            tail = request.path.rsplit("/blobs/", 1)
            if len(tail) == 2 and tail[1] in self.blobs:
                raise web.HTTPTemporaryRedirect(f"{self.cdn.url}/cdn/{tail[1]}")
            headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
            async with aiohttp.ClientSession(auto_decompress=False) as s:
                async with s.request(request.method, self.upstream + request.path_qs,
                                     headers=headers, allow_redirects=False) as up:
                    body = await up.read()
                    out = {k: v for k, v in up.headers.items()
                           if k.lower() not in ("content-length", "transfer-encoding",
                                                "connection")}
                    return web.Response(status=up.status, body=body, headers=out)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app

    def __enter__(self):
        self.cdn.start()
        self.front.start()
        return self

    def __exit__(self, *exc):
        self.front.stop()
        self.cdn.stop()


async def test_cross_host_redirect_carries_no_credentials(token_registry, unique_repo,
                                                          store_dir):
    img = build_image(seed=57, layer_sizes=[50_000, 7_000])
    push(token_registry.url, unique_repo, "r", img, credentials=token_registry.credentials)
    with _RedirectingFront(token_registry.url, img.blobs()) as front:
        async with Puller(store=store_dir, credentials=None) as p:
            result = await p.pull(f"{front.front.host}/{unique_repo}:r")
    assert result.digest == img.digest
    assert front.cdn_saw_auth and not any(front.cdn_saw_auth)  # no token to the CDN
    assert any(front.front_saw_auth)  # while the registry itself did get one
    for d, data in img.blobs().items():
        assert (store_dir / "blobs" / "sha256" / d.split(":")[1]).read_bytes() == data
    assert hashlib.sha256(img.manifest).hexdigest() == img.digest.split(":")[1]


def test_client_certificate_from_certs_d(registry_factory, tls_files, docker_config, tmp_path):
    """A registry that demands a client certificate gets the one in certs.d/HOST/."""
    client_ca = trustme.CA()
    client = client_ca.issue_cert("puller-client@example.test")
    ca_path, cert_path, key_path = (tmp_path / n for n in ("client-ca.crt", "c.cert", "c.key"))
    client_ca.cert_pem.write_to_path(str(ca_path))
    client.cert_chain_pems[0].write_to_path(str(cert_path))
    client.private_key_pem.write_to_path(str(key_path))
    reg = registry_factory(tls=(tls_files["cert"], tls_files["key"]), client_ca=ca_path,
                           client_cert=(cert_path, key_path))
    img = build_image(seed=58, layer_sizes=[3_000])
    ctx = ssl._create_unverified_context()
    ctx.load_cert_chain(str(cert_path), str(key_path))
    with Pusher(reg.url, ssl_context=ctx) as pusher:
        pusher.push("mtls/x", "1", img)
    name = f"registry.test:{reg.port}"
    net = ["--add-host", "registry.test:127.0.0.1", "--ca-cert", str(tls_files["ca"])]

    without = cli("pull", *net, "--retries", "0", "--store", str(tmp_path / "s1"),
                  f"{name}/mtls/x:1", docker_config=docker_config)
    assert without.returncode == 1
    no_traceback(without)

    certs = docker_config / "certs.d" / name
    certs.mkdir(parents=True)
    shutil.copy(cert_path, certs / "client.cert")
    shutil.copy(key_path, certs / "client.key")
    with_cert = cli("pull", "-q", *net, "--store", str(tmp_path / "s2"), f"{name}/mtls/x:1",
                    docker_config=docker_config)
    assert with_cert.returncode == 0, with_cert.stderr
    assert with_cert.stdout.strip().endswith(img.digest)
