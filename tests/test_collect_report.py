"""What collect says: tool calls by observation source in its table, and progress lines in plain logs."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tracegen.testing.fake_server import FakeServer, ReactScript

from .conftest import tracegen, write_tasks

Start = Callable[[Any], FakeServer]


def test_summary_counts_tool_calls_by_source_and_logs_get_progress_lines(fake_server: Start, tmp_path: Path) -> None:
    server = fake_server(ReactScript(turns=3, latency_s=0.3))  # two python calls per trajectory, then the answer
    args = ["collect", "--tasks", str(write_tasks(tmp_path / "t.jsonl", 3)), "--out", str(tmp_path / "run")]
    args += ["--teacher-base-url", server.base_url, "--teacher-model", "m", "--runtime", "simulated", "-c", "1"]
    proc = tracegen(*args, env={**os.environ, "TRACEGEN_PROGRESS_EVERY_S": "0.5"})  # stderr is a pipe here
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"tool calls\s+│\s+6 ", proc.stdout), proc.stdout
    assert re.search(r"answered: simulated\s+│\s+6 ", proc.stdout) and re.search(
        r"answered: executed\s+│\s+0 ", proc.stdout
    )
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("collect: ")]
    assert len(lines) >= 3, proc.stderr
    assert lines[-1].startswith("collect: 3/3 done, 0 failed, 0 in flight") and "trajectories/s" in lines[-1]
