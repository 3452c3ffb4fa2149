"""The README's main job, as a fresh machine runs it: scripts/quickstart.py, every stage, offline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.docker]


def test_quickstart_runs_every_stage_offline_and_audits_the_dataset(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "quickstart.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tool runtime = docker" in proc.stderr, "CI provisions the sandbox: the quickstart must use it"
    work = tmp_path / "docker"
    run = json.loads((work / "run.json").read_text())["stages"]
    stages = {s["stage"]: s["status"] for s in run}
    assert stages == {s: "ran" for s in ("collect", "filter", "format", "cache_teacher", "distill", "merge", "eval")}
    # The recipe's few_shot examples make the real SmolLM2 call a tool, and the run says how many ran where.
    calls = next(s["facts"]["tool_calls"] for s in run if s["stage"] == "collect")
    assert calls["executed"] + calls["simulated"] >= 1, f"no tool call ran in the sandbox or simulator: {calls}"
    assert f"quickstart: the teacher made {sum(calls.values())} tool calls: " in proc.stderr
    evaluation = json.loads((work / "eval" / "eval.json").read_text())
    assert evaluation["totals"]["answers"] == 4 and evaluation["prompt_template"] == "proof"
    assert "trained" in proc.stdout.lower(), "the audit printed which tokens are trained"
