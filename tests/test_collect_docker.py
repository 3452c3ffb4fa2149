"""collect with runtime=docker: every tool call of a trajectory executes for real in its own container."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tracegen.collect.driver import run_collect
from tracegen.records import ToolMessage
from tracegen.store import read_trajectories
from tracegen.testing.fake_server import FakeServer, ReactScript, Scripted, text_reply, tool_call_reply

from .conftest import SECRET, make_config, write_tasks

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("no_leftover_containers")]
Start = Callable[[Any], FakeServer]
FAST = {"timeout_s": 5.0, "kill_grace_s": 3.0, "mem_limit": "256m", "pool_size": 2}


def test_tool_calls_execute_in_the_sandbox(docker_client: Any, fake_server: Start, tmp_path: Path) -> None:
    server = fake_server(ReactScript(turns=3, latency_s=0.0))
    cfg = make_config(server.base_url, write_tasks(tmp_path / "t.jsonl", 2), runtime="docker", docker=FAST)
    summary = run_collect(cfg, tmp_path / "run", show_progress=False)
    assert summary.by_stop_reason == {"answer": 2}
    for t in read_trajectories(tmp_path / "run" / "trajectories.jsonl"):
        assert t.runtime.kind == "docker" and t.runtime.image
        tools = [m for m in t.messages if isinstance(m, ToolMessage)]
        # ReactScript's calls are print(turn * 7): the real interpreter answers, not a model.
        assert [m.content.strip() for m in tools] == ["0", "7"]
        assert all(m.observation.source == "executed" and m.observation.exit_code == 0 for m in tools)
    assert not [r for r in server.requests if not r.get("tools")], "no simulator request with runtime=docker"


def test_state_persists_within_a_trajectory_and_the_key_stays_outside(
    docker_client: Any, fake_server: Start, tmp_path: Path
) -> None:
    write = json.dumps({"command": "echo hello > notes.txt && env"})
    read = json.dumps({"command": "wc -c < notes.txt"})
    server = fake_server(
        Scripted([tool_call_reply([("bash", write)]), tool_call_reply([("bash", read)]), text_reply("6")])
    )
    cfg = make_config(server.base_url, write_tasks(tmp_path / "t.jsonl", 1), runtime="docker", docker=FAST)
    run_collect(cfg, tmp_path / "run", show_progress=False)
    [t] = read_trajectories(tmp_path / "run" / "trajectories.jsonl")
    first, second = (m for m in t.messages if isinstance(m, ToolMessage))
    assert SECRET not in first.content and "TRACEGEN_TEACHER_API_KEY" not in first.content
    assert second.content.strip() == "6" and t.final_answer == "6"
