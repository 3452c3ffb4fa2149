"""Shared set-up of the Docker sandbox tests: a real engine, the real image, no leftovers.

Without an engine (or without the sandbox image) the tests skip with the reason; with
``TRACEGEN_REQUIRE_DOCKER=1`` (CI) they fail instead. The fixtures are registered for every module
by ``tests/conftest.py`` (``pytest_plugins``); a Docker test module asks for the leftover check with
``pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("no_leftover_containers")]``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any, NoReturn

import pytest

from tracegen.errors import RuntimeToolError
from tracegen.runtime.docker.pool import DockerRuntime
from tracegen.runtime.docker.settings import LABEL_OWNER, MANAGED_FILTER, DockerRuntimeConfig
from tracegen.runtime.docker.sweep import owner_label

REQUIRED = os.environ.get("TRACEGEN_REQUIRE_DOCKER") == "1"


def unavailable(reason: str) -> NoReturn:
    """Skip, or fail when the run requires Docker (CI)."""
    if REQUIRED:
        pytest.fail(f"TRACEGEN_REQUIRE_DOCKER=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session", name="docker_client")
def docker_client_fixture() -> Iterator[Any]:
    """A client of the default engine that has the sandbox image."""
    from tracegen.runtime.docker.settings import DEFAULT_IMAGE
    from tracegen.runtime.docker.sweep import connect

    try:
        client = connect(None)
    except RuntimeToolError as exc:
        unavailable(f"no Docker engine answers ({exc.message}); start one: bash scripts/provision_docker.sh")
    import docker.errors

    from tracegen.runtime.image import DIGEST_LABEL, sandbox_digest

    try:
        labels = client.api.inspect_image(DEFAULT_IMAGE)["Config"].get("Labels") or {}
    except docker.errors.ImageNotFound:
        unavailable(f"the sandbox image {DEFAULT_IMAGE} is missing; build it: tracegen sandbox build")
    if labels.get(DIGEST_LABEL) != sandbox_digest():  # e.g. built before node was added
        unavailable(f"the sandbox image {DEFAULT_IMAGE} is older than sandbox/; rebuild: tracegen sandbox build")
    yield client
    client.close()


def own_containers(client: Any) -> list[dict[str, Any]]:
    """tracegen containers that this test process created (other runs on the engine are not ours)."""
    owner = owner_label()
    return [c for c in client.api.containers(all=True, filters=MANAGED_FILTER) if c["Labels"].get(LABEL_OWNER) == owner]


@pytest.fixture(scope="module", name="no_leftover_containers")
def no_leftover_containers_fixture(docker_client: Any) -> Iterator[None]:
    """After each Docker test module none of our containers may remain (any that do are removed, then fail)."""
    yield
    client = docker_client
    left = own_containers(client)
    for container in left:
        with contextlib.suppress(Exception):
            client.api.remove_container(container["Id"], force=True)
    assert not left, f"{len(left)} tracegen container(s) left behind: {[c['Names'] for c in left]}"


def fast_config(**overrides: Any) -> DockerRuntimeConfig:
    """Short deadlines and a small pool, so the suite is quick on two cores."""
    settings: dict[str, Any] = {"timeout_s": 3.0, "kill_grace_s": 3.0, "mem_limit": "256m", "pool_size": 1}
    settings.update(overrides)
    return DockerRuntimeConfig(**settings)


@contextlib.asynccontextmanager
async def started(config: DockerRuntimeConfig | None = None, **overrides: Any) -> AsyncIterator[DockerRuntime]:
    runtime = DockerRuntime(config or fast_config(**overrides))
    try:
        await runtime.start()
        yield runtime
    finally:
        await runtime.aclose()
