"""The agentic seed recipes at smoke scale: a real SmolLM2 teacher, the real Docker sandbox, every stage."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.test_run import RECIPES, tracegen
from tracegen.runtime.docker.settings import MANAGED_FILTER
from tracegen.store import read_trajectories
from tracegen.testing.fake_server import FakeServer, Provider, Reply, assistant_turns, text_reply

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.usefixtures("no_leftover_containers")]


def _stages(work: Path) -> dict[str, str]:
    return {s["stage"]: s["status"] for s in json.loads((work / "run.json").read_text())["stages"]}


def _managed(client: Any) -> set[str]:
    return {c["Id"] for c in client.api.containers(all=True, filters=MANAGED_FILTER)}


def test_agentic_recipe_smoke_executes_tools_filters_by_tests_and_trains(tmp_path: Path, docker_client: Any) -> None:
    before = _managed(docker_client)
    work = tmp_path / "work"
    proc = tracegen("run", str(RECIPES / "qwen3.6-27b-agentic-react-lora.yaml"), "--out", str(work), "--scale", "smoke")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _stages(work) == {s: "ran" for s in ("collect", "filter", "format", "distill", "merge", "eval")}
    trajectories = list(read_trajectories(work / "collect" / "trajectories.jsonl"))
    assert trajectories and all(t.runtime.kind == "docker" for t in trajectories)
    report = json.loads((work / "filter" / "report.json").read_text())
    assert report["checks"]["tests"]["ran"] >= 1, "the tasks' tests ran in the sandbox"
    kept = list(read_trajectories(work / "filter" / "kept.jsonl"))
    assert kept and all(any(v.check == "tests" and v.passed for v in t.verdicts) for t in kept if t.task.tests)
    distill = json.loads((work / ".run" / "distill.json").read_text())["facts"]
    assert distill["steps"] == 3 and distill["final_loss"] > 0, "the kept tokens were trained on"
    # eval: the merged student served, answering through the sandbox, its answers run against the tests
    evaluation = json.loads((work / "eval" / "eval.json").read_text())
    tasks = [json.loads(line) for line in (RECIPES / "tasks" / "code-javascript.jsonl").read_text().splitlines()]
    assert evaluation["totals"]["answers"] == len(tasks)
    assert sum(evaluation["totals"]["by_finish_reason"].values()) == len(tasks)
    with_tests = {t["id"] for t in tasks if t.get("tests")}
    assert with_tests and {r["task_id"] for r in evaluation["answers"] if "tests" in r["checks"]} == with_tests
    ran = [r["checks"]["tests"] for r in evaluation["answers"]]  # under node: passed, failed, never a sandbox error
    assert all(reason.startswith(("tests passed", "tests failed", "tests did not run")) for reason in ran), ran
    assert _managed(docker_client) <= before, "the run removed every container it created"


def test_simulated_variant_smoke_replays_the_simulated_calls_and_masks_them(tmp_path: Path) -> None:
    work = tmp_path / "work"
    recipe = RECIPES / "qwen3.6-27b-agentic-react-lora-simulated.yaml"
    proc = tracegen("run", str(recipe), "--out", str(work), "--scale", "smoke")
    assert proc.returncode == 0, proc.stderr[-3000:]
    trajectories = list(read_trajectories(work / "collect" / "trajectories.jsonl"))
    assert all(t.runtime.kind == "simulated" for t in trajectories)
    report = json.loads((work / "filter" / "report.json").read_text())
    with_calls = [t for t in trajectories if any(getattr(m, "tool_calls", None) for m in t.messages)]
    assert report["replay"]["trajectories"] == len(with_calls), "every trajectory with tool calls was replayed"
    import pyarrow.parquet as pq

    rows = pq.read_table(sorted((work / "dataset" / "data").glob("*.parquet"))[0]).to_pylist()
    for row in rows:
        spans = row["spans"] if isinstance(row["spans"], list) else json.loads(row["spans"])
        assert not any(s["kind"] == "observation" and s["train"] for s in spans), "simulated observations masked"


@pytest.mark.parametrize(("api", "provider"), [("responses", "openai_responses"), ("anthropic", "anthropic")])
def test_simulated_variant_smoke_on_the_responses_and_anthropic_apis(
    tmp_path: Path, fake_server: Callable[..., FakeServer], api: str, provider: str
) -> None:
    """The simulated recipe's smoke run with only ``teacher.api`` changed, the teacher a fake provider that
    refuses a turn whose reasoning is not echoed as that API requires (the simulator stays on chat).

    The stages that read what the teacher produced run (collect, filter with its sandbox replay, format,
    distill); merge and eval see only the student."""
    tasks = [json.loads(line) for line in (RECIPES / "tasks" / "agentic-smoke.jsonl").read_text().splitlines()]
    answers = {t["prompt"]: t["reference"] for t in tasks}

    def script(request: dict[str, Any]) -> Reply:
        messages = request.get("messages") or []
        if messages and str(messages[0].get("content")).startswith("You simulate"):
            return text_reply("4\nEXIT_CODE: 0")  # the simulator, on chat completions
        prompt = next(str(m.get("content")) for m in messages or request["input"] if m.get("role") == "user")
        if assistant_turns(request) == 0:  # the smoke block pins the hermes text protocol
            call = '<tool_call>\n{"name": "python", "arguments": {"code": "print(2 + 2)"}}\n</tool_call>'
            return text_reply(call, reasoning="check it in python first")
        return text_reply(answers[prompt], reasoning="the tool agrees")

    server = fake_server(Provider(provider, script))
    recipe = tmp_path / "recipe.yaml"
    text = (RECIPES / "qwen3.6-27b-agentic-react-lora-simulated.yaml").read_text()
    for old, new in [
        ("stages: [collect, filter, format, distill, merge, eval]", "stages: [collect, filter, format, distill]"),
        ('teacher: {base_url: "", model: ""', f'teacher: {{base_url: "{server.base_url}", model: m, api: {api}'),
        ('simulator: {base_url: "", model: ""', f'simulator: {{base_url: "{server.base_url}", model: m'),
    ]:
        assert old in text
        text = text.replace(old, new)
    recipe.write_text(text)
    for folder in ("tasks", "data"):
        (tmp_path / folder).symlink_to(RECIPES / folder)
    work = tmp_path / "work"
    proc = tracegen("run", str(recipe), "--out", str(work), "--scale", "smoke", "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _stages(work) == {s: "ran" for s in ("collect", "filter", "format", "distill")}
    trajectories = list(read_trajectories(work / "collect" / "trajectories.jsonl"))
    assert len(trajectories) == 2 * len(tasks) and all(t.stop_reason == "answer" for t in trajectories)
    assert all(t.final_answer == answers[t.task.prompt] for t in trajectories)
    teacher_calls = [r for r in server.requests if "input" in r or "stream_options" not in r]
    assert len(teacher_calls) == 2 * len(trajectories), "two teacher turns each, none refused"
    report = json.loads((work / "filter" / "report.json").read_text())
    # A task's two samples are the same script, so one is a duplicate; every other one was replayed in the sandbox.
    assert report["checks"]["duplicate"]["passed"] == report["replay"]["trajectories"] == len(tasks)
    distill = json.loads((work / ".run" / "distill.json").read_text())["facts"]
    assert distill["steps"] == 3 and distill["final_loss"] > 0
