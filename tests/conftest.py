"""Shared fixtures: the real distribution registry (plain and token mode), fault proxies,
unique repository names, captured fixtures. See tests/support/."""

from __future__ import annotations

import itertools
import os
import re
from pathlib import Path

import pytest

# ``tests.support`` is importable because pyproject sets pytest's pythonpath to the root.
from tests.support.images import FIXTURES, fixtures_available
from tests.support.proxy import FaultProxy
from tests.support.registry import REGISTRY_BIN, Registry, registry_binary
from tests.support.tokenserver import TokenServer

# Credentials the session token server accepts (pull+push); anonymous gets pull only.
TOKEN_USER = ("pusher", "push-secret")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: a slower test (big blobs, long timeouts)")


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _need_registry() -> None:
    if registry_binary() is None:
        msg = f"docker-registry not installed ({REGISTRY_BIN}; Debian package docker-registry)"
        if _in_ci():
            pytest.fail(f"CI=true but {msg}", pytrace=False)
        pytest.skip(msg)


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory):
    """The real registry, plain HTTP, no auth; one per session. Use ``unique_repo``."""
    _need_registry()
    with Registry(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


@pytest.fixture
def registry_factory(tmp_path_factory: pytest.TempPathFactory):
    """Factory for extra, per-test registries: ``registry_factory(auth="htpasswd",
    htpasswd_users={...})``, ``registry_factory(tls=(cert, key))`` ... -> started Registry
    (stopped at teardown). Same skip/fail rule as ``registry``."""
    _need_registry()
    regs: list[Registry] = []

    def make(**kwargs) -> Registry:
        reg = Registry(tmp_path_factory.mktemp("registry"), **kwargs)
        regs.append(reg)
        return reg.start()

    yield make
    for reg in regs:
        reg.stop()


@pytest.fixture(scope="session")
def token_server(tmp_path_factory: pytest.TempPathFactory):
    """Token server for ``token_registry``: anonymous pull, ``TOKEN_USER`` gets pull+push.
    Tests may change ``expires_in``/``anonymous_actions`` but must restore them."""
    with TokenServer(tmp_path_factory.mktemp("tokenserver"), users=dict([TOKEN_USER]),
                     anonymous_actions=("pull",)) as ts:
        yield ts


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory: pytest.TempPathFactory, token_server: TokenServer):
    """The real registry in ``auth: token`` mode backed by ``token_server``. Has
    ``.tokenserver`` and ``.credentials`` (push with ``credentials=reg.credentials``)."""
    _need_registry()
    with Registry(tmp_path_factory.mktemp("token-registry"),
                  **token_server.registry_kwargs()) as reg:
        reg.tokenserver = token_server
        reg.credentials = TOKEN_USER
        yield reg


@pytest.fixture
def fault_proxy():
    """Factory: ``fault_proxy(upstream_url) -> FaultProxy`` (started; stopped at teardown)."""
    proxies: list[FaultProxy] = []

    def make(upstream: str | object) -> FaultProxy:
        url = upstream if isinstance(upstream, str) else upstream.url  # Registry accepted
        p = FaultProxy(url).start()
        proxies.append(p)
        return p

    yield make
    for p in proxies:
        p.stop()


@pytest.fixture
def proxy(registry: Registry, fault_proxy) -> FaultProxy:
    """A FaultProxy in front of the session ``registry``."""
    return fault_proxy(registry.url)


_repo_counter = itertools.count(1)


@pytest.fixture
def unique_repo(request: pytest.FixtureRequest) -> str:
    """A fresh repository name per test: ``test/<test-name-sanitised>-<n>``."""
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:60].strip("-")
    return f"test/{name or 'repo'}-{next(_repo_counter)}"


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    """Where a test's OCI layout/store goes (not created)."""
    return tmp_path / "store"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """The captured registry fixtures dir (env PULLER_FIXTURES overrides)."""
    if not fixtures_available():
        msg = f"registry-captures fixtures not found at {FIXTURES} (set PULLER_FIXTURES)"
        if _in_ci():
            pytest.fail(f"CI=true but {msg}", pytrace=False)
        pytest.skip(msg)
    return FIXTURES
