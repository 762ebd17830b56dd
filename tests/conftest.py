"""Session-wide fixtures.

``services`` and ``ray_cluster`` live here, not in the integration/fault conftests, so the
two suites share ONE Postgres, ONE Valkey and ONE Ray per pytest session. Fixtures only run
when a test asks for them, and Ray is imported inside the fixture, so unit tests never start
or even import it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ops.servers import Services

_TEST_DIR = Path(__file__).parent
_SUITE_MARKERS = {"integration": pytest.mark.integration, "fault": pytest.mark.fault}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Mark by folder, so `-m "not fault"` works without decorating every test.
    for item in items:
        try:
            suite = Path(item.path).relative_to(_TEST_DIR).parts[0]
        except ValueError:
            continue
        if suite in _SUITE_MARKERS:
            item.add_marker(_SUITE_MARKERS[suite])


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    """Migrated Postgres + Redis URLs (embedded in a temp dir unless VOUCHER_*_URL are set)."""
    from tests.support import running_services

    with running_services(tmp_path_factory.mktemp("services")) as svc:
        yield svc


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Any]:
    """A local Ray (num_cpus=4, namespace voucher-test) shared by the whole session."""
    from tests.support import running_ray

    with running_ray() as context:
        yield context


@pytest.fixture(scope="session")
def engine_settings() -> Any:
    from engine.settings import Settings
    from tests.support import RAY_NAMESPACE

    return Settings(shards=4, namespace=RAY_NAMESPACE, batch_window_ms=1.0)


@pytest.fixture(scope="session")
def engine(services: Services, ray_cluster: Any, engine_settings: Any) -> Any:
    """The shard actors and the coordinator, started once per session on the shared
    Postgres; tests keep apart by using their own campaigns."""
    from actors.client import start_engine

    return start_engine(engine_settings, services.database_url)


class HttpApi:
    """The running Serve app: base URL and the bootstrap admin's credentials."""

    def __init__(
        self,
        url: str,
        admin_email: str,
        admin_password: str,
        data_dir: str,
        database_url: str,
        hook_port: int = 0,
    ) -> None:
        self.url = url
        #: the one port on 127.0.0.1 that VOUCHER_OUTBOUND_ALLOW lets webhooks reach (tests
        #: that receive notification webhooks listen there)
        self.hook_port = hook_port
        self.admin_email = admin_email
        self.admin_password = admin_password
        self.data_dir = data_dir
        self.database_url = database_url


@pytest.fixture(scope="session")
def http_api(engine: Any, services: Services, engine_settings: Any) -> Iterator[HttpApi]:
    """The HTTP API on Ray Serve (HAProxy mode, two gateway replicas) over the session's
    engine, Postgres and Valkey."""
    import socket

    import msgspec

    from ops.start import start_http

    with socket.socket() as s, socket.socket() as h:
        s.bind(("127.0.0.1", 0))
        h.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        hook_port = h.getsockname()[1]
    settings = msgspec.structs.replace(
        engine_settings,
        http_port=port,
        outbound_allow=f"127.0.0.1:{hook_port}",
        admin_email="admin@test.example",
        admin_password="admin-password-for-tests",
        data_dir=str(services.data_dir or ".data"),
    )
    url = start_http(
        settings, services.database_url, services.redis_url, replicas={"Gateway": 2}
    )
    yield HttpApi(
        url,
        settings.admin_email,
        settings.admin_password or "",
        settings.data_dir,
        services.database_url,
        hook_port,
    )
    # No serve.shutdown(): its controller often takes its full 30 s timeout to stop; the
    # session's ray.shutdown() stops Serve with everything else.
