"""The DISC, TKD and paged-optimizer recipes: smoke blocks that run on CPU, smoke runs that log the new metrics.

Their cards' values are checked with the other recipes' in tests/test_run.py (CARDS).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, tracegen
from tracegen.recipe import load_recipe

RECIPES = ROOT / "recipes"


def test_smoke_blocks_run_on_cpu() -> None:
    assert load_recipe(RECIPES / "qwen3.6-27b-agentic-react-lora.yaml", "smoke").distill.optimizer == "adamw_torch"
    topology = load_recipe(RECIPES / "topological-qwen-dualmind.yaml", "smoke").distill.topology
    assert topology is not None and topology.window < 120  # the smoke rows are ~120-170 tokens long


def run_smoke(recipe: str, work: Path) -> list[dict[str, Any]]:  # 900 s: the eval stage serves the model too
    proc = tracegen("run", str(RECIPES / recipe), "--out", str(work), "--scale", "smoke", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (work / "adapter" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.mark.slow
def test_disc_recipe_smoke_logs_the_discrepancy_terms(tmp_path: Path) -> None:
    steps = run_smoke("qwen3-1.7b-stem-proof-disc.yaml", tmp_path / "work")
    assert len(steps) == 3
    for m in steps:
        assert m["gap_energy"] >= 0 and 0 <= m["jump_fraction"] <= 1 and 0 <= m["smoothed_fraction"] <= 1
        assert m["loss"] == pytest.approx(0.55 * m["ce"] + 0.45 * m["kd"] + 0.02 * m["gap_energy"], rel=1e-6)
    assert any(m["smoothed_fraction"] > 0 for m in steps)


@pytest.mark.slow
def test_tkd_recipe_smoke_trains_windows_with_the_ramp_and_curriculum(tmp_path: Path) -> None:
    steps = run_smoke("topological-qwen-dualmind.yaml", tmp_path / "work")
    # 4 steps at 0, 1/3, 2/3 and 3/3 of the run: alpha_kd 0 until 15%, 0.45 from 45%
    assert [m["alpha_kd"] for m in steps] == pytest.approx([0.0, 0.45 * (1 / 3 - 0.15) / 0.3, 0.45, 0.45])
    phases = [m["curriculum_phase"] for m in steps]
    assert phases[0] == 1 and phases == sorted(phases)
    assert all(0 <= m["topology_jump_fraction"] <= 1 for m in steps)
    plan = json.loads((tmp_path / "work" / "adapter" / "topology.json").read_text())
    assert plan["pieces"] > plan["rows"]  # the smoke rows were cut into windows
    assert all(w[2] - w[1] <= 96 for w in plan["windows"])
    assert all(m["drift"] >= 0 for m in steps)  # the drift channel is on (drift_weight 0.02)
    sources = json.loads((tmp_path / "work" / ".run" / "format.json").read_text())["facts"]["sources"]
    assert [s["read"] for s in sources["sources"]] == [2, 2, 2, 2] and sources["rows"] == 8  # data.sources
    evaluation = json.loads((tmp_path / "work" / "eval" / "eval.json").read_text())
    assert evaluation["totals"]["answers"] == 2  # the rows distill held out: ceil(8 * 0.25)
    answers = evaluation["answers"]
    assert evaluation["totals"]["with_markers"] == sum(1 for a in answers if not a["markers_missing"])
