"""Shared fixtures: a real loopback OpenAI-compatible server, task files, and a secret to guard."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tracegen.config import CollectConfig
from tracegen.testing.fake_server import FakeServer, Script

ROOT = Path(__file__).parent.parent
pytest_plugins = ["tests.docker_fixtures", "tests.hub_fixtures"]  # docker_client, no_leftover_containers; hub


@pytest.fixture
def anyio_backend() -> str:
    """``@pytest.mark.anyio`` tests (anyio's pytest plugin) run on asyncio, as tracegen does."""
    return "asyncio"


def tracegen(*args: str, timeout: float = 900, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a user does (``python cli.py ...``), capturing stdout and stderr as text."""
    return subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True, timeout=timeout, **kwargs
    )


def start_tracegen(*args: str) -> subprocess.Popen[str]:
    """Start the CLI as a foreground job, so Ctrl-C (SIGINT) reaches it.

    A job a shell starts in the background inherits SIGINT *ignored*, and so would this child when the
    test suite itself runs in the background: reset it to the default, as a terminal's foreground has.
    """
    return subprocess.Popen(
        [sys.executable, str(ROOT / "cli.py"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


SECRET = "sk-test-SECRET-do-not-leak-0123456789"


@pytest.fixture(autouse=True)
def _secret_key(monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs with a teacher key set, so any test can check it never leaks."""
    monkeypatch.setenv("TRACEGEN_TEACHER_API_KEY", SECRET)
    return SECRET


@pytest.fixture
def fake_server() -> Iterator[Callable[..., FakeServer]]:
    """Start fake servers (``FakeServer(script, **options)``, e.g. a gate of listed models and one key)."""
    servers: list[FakeServer] = []

    def start(script: Script, **options: Any) -> FakeServer:
        server = FakeServer(script, **options)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def write_tasks(path: Path, n: int = 3) -> Path:
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"t{i}", "prompt": f"What is {i} + {i}?", "reference": str(2 * i)}) + "\n")
    return path


@pytest.fixture
def tasks_file(tmp_path: Path) -> Path:
    return write_tasks(tmp_path / "tasks.jsonl")


def make_config(base_url: str, tasks: Path, **overrides: object) -> CollectConfig:
    teacher = {"base_url": base_url, "model": "fake-teacher", "backoff_base_s": 0.01, "backoff_max_s": 0.05}
    teacher.update(overrides.pop("teacher", {}))  # type: ignore[arg-type]
    return CollectConfig.model_validate({"tasks": str(tasks), "teacher": teacher, **overrides})


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer trained in the fixture (format/audit tests)."""
    from .format_fixtures import train_tiny_tokenizer

    return train_tiny_tokenizer(tmp_path_factory.mktemp("tiny-tok"))
