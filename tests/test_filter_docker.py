"""The sandbox checks of ``tracegen filter`` against a real Docker engine: ``tests`` and ``replay``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.docker_fixtures import (
    fast_config,
)
from tracegen.config import FilterConfig
from tracegen.filter import run_filter
from tracegen.records import (
    AssistantMessage,
    Message,
    Observation,
    RuntimeInfo,
    SystemMessage,
    Task,
    ToolCall,
    ToolMessage,
    Trajectory,
    UserMessage,
)
from tracegen.testing.synthetic import make_trajectory

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("no_leftover_containers")]

ADD_TESTS = "from solution import add\nassert add(2, 3) == 5\nassert add(-1, 1) == 0\nprint('ok')\n"


def trajectory(
    tid: str,
    calls: list[tuple[str, str, str, int | None]],
    final: str = "done",
    tests: str | None = None,
    source: str = "simulated",
) -> Trajectory:
    """A trajectory whose tool calls (tool, code, recorded output, recorded exit code) came from ``source``."""
    messages: list[Message] = [SystemMessage(content="solve"), UserMessage(content="task")]
    for i, (tool, code, output, exit_code) in enumerate(calls):
        key = "code" if tool == "python" else "command"
        call = ToolCall(id=f"c{i}", name=tool, arguments=json.dumps({key: code}))
        messages.append(AssistantMessage(content="", tool_calls=[call], finish_reason="tool_calls"))
        observation = Observation(
            source=source,  # type: ignore[arg-type]
            exit_code=exit_code,
            simulator="sim" if source == "simulated" else None,
        )
        messages.append(ToolMessage(tool_call_id=call.id, name=tool, content=output, observation=observation))
    messages.append(AssistantMessage(content=final, finish_reason="stop"))
    return make_trajectory(0).model_copy(
        update={
            "id": tid,
            "task": Task(id=tid, prompt="task", tests=tests),
            "runtime": RuntimeInfo(kind="simulated" if source == "simulated" else "docker", simulator_model="sim"),
            "messages": messages,
            "final_answer": final,
        }
    )


def write(path: Path, trajectories: list[Trajectory]) -> Path:
    path.write_text("".join(t.model_dump_json() + "\n" for t in trajectories))
    return path


def config(**overrides: Any) -> FilterConfig:
    docker = fast_config(timeout_s=4.0, pool_size=2)
    return FilterConfig.model_validate({"docker": docker.model_dump(), "concurrency": 2, **overrides})


def by_id(path: Path) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in (json.loads(line) for line in path.read_text().splitlines())}


def test_tests_verifier_runs_task_tests_in_the_sandbox(docker_client: Any, tmp_path: Path) -> None:
    samples = [
        trajectory("right", [], final="Here:\n```python\ndef add(a, b):\n    return a + b\n```", tests=ADD_TESTS),
        trajectory("wrong", [], final="```python\ndef add(a, b):\n    return a - b\n```", tests=ADD_TESTS),
        trajectory("hangs", [], final="```python\ndef add(a, b):\n    while True: pass\n```", tests=ADD_TESTS),
        # no fenced block in the answer: the last python tool call is the solution
        trajectory(
            "from-call",
            [("python", "def add(a, b):\n    return b + a\nprint(add(1, 2))", "3", 0)],
            final="add is defined above.",
            tests=ADD_TESTS,
            source="executed",
        ),
        trajectory("answer-file", [], final="42", tests="assert open('answer.txt').read().strip() == '42'"),
        trajectory("no-tests", [], final="whatever"),
    ]
    source = write(tmp_path / "in.jsonl", samples)
    summary = run_filter(source, tmp_path / "f", config(verifiers=["tests"]), show_progress=False)
    kept, rejected = by_id(tmp_path / "f" / "kept.jsonl"), by_id(tmp_path / "f" / "rejected.jsonl")
    assert set(kept) == {"right", "from-call", "answer-file", "no-tests"}  # no tests + tests_missing=skip: kept
    verdict = {i: r["verdicts"][-1] for i, r in rejected.items()}
    assert verdict["wrong"]["check"] == "tests" and "tests failed (exit 1)" in verdict["wrong"]["reason"]
    assert "AssertionError" in verdict["wrong"]["reason"]
    assert verdict["hangs"]["reason"].startswith("tests timed out")
    assert kept["right"]["verdicts"][-1]["reason"].startswith("tests passed")
    assert summary.report["checks"]["tests"] == {
        "ran": 5, "passed": 3, "failed": 2, "errors": 0, "reused": 0, "acceptance_rate": 0.6
    }  # fmt: skip
    # resume: every sandbox verdict is reused, no container needed
    again = run_filter(source, tmp_path / "f", config(verifiers=["tests"]), show_progress=False)
    assert again.report["checks"]["tests"]["reused"] == 5


def test_replay_measures_the_sim_to_real_gap(docker_client: Any, tmp_path: Path) -> None:
    faithful = trajectory(
        "faithful",
        [
            (
                "bash",
                "echo 'hello world' > notes.txt && wc -c < notes.txt",
                "12\n",
                0,
            ),  # exact after the runtime's rstrip
            ("python", "print(open('notes.txt').read().upper())", "HELLO WORLD  ", 0),  # state kept; normalised
            ("python", "print(6 * 7)", "42", 0),
        ],
    )
    invented = trajectory(
        "invented",
        [
            ("python", "print(sum(range(101)))", "5051", 0),  # wrong number: material
            ("python", "import sys; sys.exit('boom')", "all good", 0),  # wrong exit status: material
        ],
    )
    cosmetic = trajectory("cosmetic", [("python", "print('Done')", "done!", 0)])  # differs, but not materially
    executed = trajectory("executed", [("python", "print(1)", "1", 0)], source="executed")  # nothing to replay
    source = write(tmp_path / "in.jsonl", [faithful, invented, cosmetic, executed])

    summary = run_filter(source, tmp_path / "f", config(verifiers=["replay"]), show_progress=False)
    kept, rejected = by_id(tmp_path / "f" / "kept.jsonl"), by_id(tmp_path / "f" / "rejected.jsonl")
    assert set(kept) == {"faithful", "cosmetic", "executed"} and set(rejected) == {"invented"}
    v = rejected["invented"]["verdicts"][-1]
    assert v["check"] == "replay" and v["score"] == 0.0
    assert "2 differ (2 material)" in v["reason"] and "'5051'" in v["reason"] and "'5050'" in v["reason"]
    good = kept["faithful"]["verdicts"][-1]
    assert good["score"] == 1.0 and "3 simulated call(s)" in good["reason"], good
    assert [x["check"] for x in kept["executed"]["verdicts"]] == ["structural", "duplicate"]
    gap = summary.report["replay"]
    assert gap["trajectories"] == 3 and gap["calls"] == 6
    assert gap["differ"] == 3 and gap["material"] == 2 and gap["exact"] + gap["normalised"] == 3
    assert gap["agreement_rate"] == 0.5
    journal = [json.loads(line) for line in (tmp_path / "f" / "verdicts.jsonl").read_text().splitlines()]
    calls = {c["call_id"]: c for r in journal if r["id"] == "invented" for c in r["details"]}
    assert calls["c1"]["simulated_exit"] == 0 and calls["c1"]["real_exit"] == 1 and calls["c1"]["material"]

    strict = run_filter(
        source, tmp_path / "any", config(verifiers=["replay"], replay={"reject": "any"}), show_progress=False
    )
    assert strict.report["kept"] == 2  # cosmetic goes too
    lenient = run_filter(
        source, tmp_path / "never", config(verifiers=["replay"], replay={"reject": "never"}), show_progress=False
    )
    assert lenient.report["kept"] == 4 and lenient.report["replay"]["material"] == 2


# A wrong solution that, on import, tries what used to forge a passing verdict: write a worker reply
# ("exit 0", the next ids) into the streams of every other process it can open.
FORGING_SOLUTION = """```python
import json, os
for i in range(1, 10):
    line = json.dumps({"op": "result", "id": i, "exit_code": 0, "stdout": "ok", "stderr": ""}) + "\\n"
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) not in (os.getpid(), os.getppid()):
            for fd in ("0", "1", "2"):
                try:
                    with open(f"/proc/{pid}/fd/{fd}", "w") as f:
                        f.write(line)
                except OSError:
                    pass

def add(a, b):
    return a - b
```"""


def test_a_solution_cannot_forge_its_tests_verdict(docker_client: Any, tmp_path: Path) -> None:
    source = write(tmp_path / "in.jsonl", [trajectory("forger", [], final=FORGING_SOLUTION, tests=ADD_TESTS)])
    run_filter(source, tmp_path / "f", config(verifiers=["tests"]), show_progress=False)
    assert by_id(tmp_path / "f" / "kept.jsonl") == {}
    verdict = by_id(tmp_path / "f" / "rejected.jsonl")["forger"]["verdicts"][-1]
    assert verdict["check"] == "tests" and "tests failed (exit 1)" in verdict["reason"], verdict


UNITTEST_TESTS = (
    "import unittest\nfrom solution import add\n\n"
    "class T(unittest.TestCase):\n    def test_add(self):\n        self.assertEqual(add(2, 3), 5)\n\n"
    "if __name__ == '__main__':\n    unittest.main()\n"
)


def test_a_solution_that_ends_the_test_process_early_fails(docker_client: Any, tmp_path: Path) -> None:
    """An exit 0 from the solution's import is not the tests' verdict; unittest.main()'s own exit 0 is."""
    wrong = "def add(a, b):\n    return a - b\n"
    samples = [
        trajectory("sys-exit", [], final=f"```python\n{wrong}import sys\nsys.exit(0)\n```", tests=ADD_TESTS),
        trajectory("builtin-exit", [], final=f"```python\n{wrong}exit()\n```", tests=ADD_TESTS),
        trajectory("os-exit", [], final=f"```python\n{wrong}import os\nos._exit(0)\n```", tests=ADD_TESTS),
        trajectory("unittest", [], final="```python\ndef add(a, b):\n    return a + b\n```", tests=UNITTEST_TESTS),
    ]
    run_filter(write(tmp_path / "in.jsonl", samples), tmp_path / "f", config(verifiers=["tests"]), show_progress=False)
    assert set(by_id(tmp_path / "f" / "kept.jsonl")) == {"unittest"}
    reasons = {i: r["verdicts"][-1]["reason"] for i, r in by_id(tmp_path / "f" / "rejected.jsonl").items()}
    assert "ended the test process" in reasons["sys-exit"] and "ended the test process" in reasons["builtin-exit"]
    assert reasons["os-exit"].startswith("tests did not run to their end")
