"""`tracegen run`: the Stage table, --dry-run, refusals that name the changed setting, stage summaries."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args

from tracegen.config import StageName
from tracegen.pipeline import STAGES
from tracegen.testing.fake_server import FakeServer, ReactScript

from .conftest import tracegen, write_tasks

Start = Callable[[Any], FakeServer]


def test_every_stage_name_has_one_stage_record_in_pipeline_order() -> None:
    assert tuple(s.name for s in STAGES) == get_args(StageName)
    assert len({s.folder for s in STAGES}) == len(STAGES)


def _recipe(tmp_path: Path, url: str, temperature: float) -> Path:
    recipe = tmp_path / "r.yaml"
    tasks = write_tasks(tmp_path / "t.jsonl", 2)
    recipe.write_text(
        "run: {stages: [collect]}\n"
        f"collect: {{tasks: {tasks}, runtime: simulated, max_turns: 3,\n"
        f"  teacher: {{base_url: '{url}', model: m, temperature: {temperature}}}}}\n"
    )
    return recipe


def test_dry_run_plans_then_run_reports_tool_calls_and_a_change_is_named(fake_server: Start, tmp_path: Path) -> None:
    server = fake_server(ReactScript(turns=2, latency_s=0.0))  # one python call, then the answer
    work = tmp_path / "w"
    recipe = _recipe(tmp_path, server.base_url, 0.6)

    plan = tracegen("run", str(recipe), "--out", str(work), "--dry-run")
    assert plan.returncode == 0, plan.stderr
    assert plan.stdout.splitlines()[0].split() == ["collect", "run", str(work / "collect")]
    assert "  teacher.temperature: 0.6" in plan.stdout and not work.exists() and not server.requests

    ran = tracegen("run", str(recipe), "--out", str(work))
    assert ran.returncode == 0, ran.stderr
    assert "answered: simulated" in ran.stdout, "collect's own table, tool calls by source"
    facts = json.loads((work / "run.json").read_text())["stages"][0]["facts"]
    assert facts["tool_calls"] == {"executed": 0, "simulated": 2, "error": 0}

    again = json.loads(tracegen("run", str(recipe), "--out", str(work), "--dry-run", "--json").stdout)
    assert [s["action"] for s in again["stages"]] == ["skip (done earlier)"]

    changed = _recipe(tmp_path, server.base_url, 1.0)
    refused = tracegen("run", str(changed), "--out", str(work))
    assert refused.returncode == 2
    assert "different settings: teacher.temperature: 0.6 -> 1.0" in refused.stderr


def test_collect_refusal_names_the_changed_setting(fake_server: Start, tmp_path: Path) -> None:
    server = fake_server(ReactScript(turns=1, latency_s=0.0))
    base = ["collect", "--tasks", str(write_tasks(tmp_path / "t.jsonl", 1)), "--out", str(tmp_path / "run")]
    base += ["--teacher-base-url", server.base_url, "--teacher-model", "m", "-q"]
    assert tracegen(*base).returncode == 0
    refused = tracegen(*base, "--temperature", "1.0", "--max-turns", "2")
    assert refused.returncode == 2
    # The simulator samples with the teacher's settings unless it has its own: its temperature moved too.
    changes = "max_turns: 8 -> 2; simulator.temperature: 0.6 -> 1.0; teacher.temperature: 0.6 -> 1.0"
    assert changes in refused.stderr
