"""Owner identity of tracegen containers, the start-up sweep of stale ones, and connecting to an engine."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from tracegen.errors import RuntimeToolError
from tracegen.runtime.docker.settings import (
    LABEL_CREATED,
    LABEL_MANAGED,
    LABEL_OWNER,
    LABEL_RUN,
    LABEL_TTL,
)

if TYPE_CHECKING:
    import docker


class SweepReport(NamedTuple):
    removed: int
    kept: int


def _proc_start_ticks(pid: int) -> str:
    """Start time of a process in clock ticks since boot, so a reused pid is not mistaken for us."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[19].decode()
    except (OSError, IndexError):
        return "0"


def owner_label() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{_proc_start_ticks(os.getpid())}"


def _owner_alive(owner: str) -> bool | None:
    """True/False for an owner on this host; None when it lives elsewhere (only its ttl can tell)."""
    host, _, rest = owner.partition(":")
    pid_text, _, ticks = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return None
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    return ticks in ("", "0") or _proc_start_ticks(pid) in (ticks, "0")


def _is_stale(labels: dict[str, str], status: str, now: float) -> bool:
    """A container whose owner lives is never stale, whatever its state (it may be starting)."""
    alive = _owner_alive(labels.get(LABEL_OWNER, ""))
    if alive is not None:
        return not alive
    if status in ("exited", "dead"):
        return True
    try:
        return int(labels.get(LABEL_CREATED, "0")) + int(labels.get(LABEL_TTL, "0")) < now
    except ValueError:
        return True


def sweep_engine(client: docker.DockerClient, only_stale: bool = True, run_id: str | None = None) -> SweepReport:
    """Remove tracegen containers on one engine: stale ones, one run's, or (only_stale=False) all."""
    import docker.errors

    filters: dict[str, Any] = {"label": [f"{LABEL_MANAGED}=tracegen"]}
    if run_id is not None:
        filters["label"].append(f"{LABEL_RUN}={run_id}")
    removed = kept = 0
    now = time.time()
    for summary in client.api.containers(all=True, filters=filters):
        labels = summary.get("Labels") or {}
        if only_stale and run_id is None and not _is_stale(labels, summary.get("State", ""), now):
            kept += 1
            continue
        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
            # 409 "removal already in progress" (auto-remove) counts as gone.
            client.api.remove_container(summary["Id"], force=True)
        removed += 1
    return SweepReport(removed, kept)


def connect(url: str | None, threads: int = 4, timeout: float = 60.0) -> docker.DockerClient:
    """A client for one engine (``None``: from the environment); raises RuntimeToolError if it does not answer."""
    import docker
    import docker.errors
    import requests.exceptions

    where = url or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    hint = "start one (as root: bash scripts/provision_docker.sh), or set collect.docker.engines"
    # Checked first: docker-py leaks a socket when its constructor's version probe cannot connect.
    if where.startswith("unix://"):
        path = where.removeprefix("unix://")
        if not Path(path).is_socket():
            raise RuntimeToolError(f"no Docker engine answers at {where}: no such socket", hint=hint)
        with socket.socket(socket.AF_UNIX) as probe:  # a socket file left by a dead daemon refuses
            try:
                probe.connect(path)
            except OSError as exc:
                raise RuntimeToolError(f"no Docker engine answers at {where}: {exc.strerror}", hint=hint) from exc
    try:
        if url is None:
            client = docker.from_env(version="auto", max_pool_size=threads, timeout=int(timeout))
        else:
            client = docker.DockerClient(
                base_url=url,
                version="auto",
                max_pool_size=threads,
                timeout=int(timeout),
                use_ssh_client=url.startswith("ssh://"),  # the system ssh honours ~/.ssh/config and agents
            )
        client.ping()
    except (docker.errors.DockerException, requests.exceptions.RequestException, OSError) as exc:
        raise RuntimeToolError(f"no Docker engine answers at {where}: {short_error(exc)}", hint=hint) from exc
    return client


def short_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:300]
