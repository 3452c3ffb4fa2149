"""Coding tasks in javascript (node) and bash, scored by the ``tests`` check in the real Docker sandbox."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.docker_fixtures import fast_config
from tests.test_filter_docker import by_id, trajectory, write
from tracegen.config import EvalConfig, FilterConfig
from tracegen.evaluate import run_eval
from tracegen.filter import run_filter
from tracegen.records import TestsLanguage
from tracegen.testing.fake_server import FakeServer, Reply, text_reply

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("no_leftover_containers")]

TASKS = Path(__file__).parent.parent / "recipes" / "tasks"

JS_TESTS = (
    'const assert = require("assert");\nconst { add } = require("./solution");\nassert.strictEqual(add(2, 3), 5);\n'
)
# The verdict waits on a promise: the case an error-swallowing solution would target.
JS_ASYNC_TESTS = (
    'const assert = require("assert");\nconst { add } = require("./solution");\n'
    "(async () => { assert.strictEqual(await add(2, 3), 5); })();\n"
)
JS_RIGHT = "function add(a, b) { return a + b; }\nmodule.exports = { add };\n"
JS_WRONG = "function add(a, b) { return a - b; }\nmodule.exports = { add };\n"
SH_TESTS = 'set -e\nsource ./solution.sh\n[ "$(add 2 3)" = 5 ]\necho ok\n'
SH_RIGHT = "add() { echo $(( $1 + $2 )); }\n"
SH_WRONG = "add() { echo $(( $1 - $2 )); }\n"


def coded(tid: str, language: TestsLanguage, code: str, tests: str, tag: str, final: str = "") -> Any:
    t = trajectory(tid, [], final=final or f"```{tag}\n{code}```", tests=tests)
    return t.model_copy(update={"task": t.task.model_copy(update={"language": language})})


def filter_verdicts(tmp_path: Path, samples: list[Any]) -> tuple[set[str], dict[str, str]]:
    docker = fast_config(timeout_s=6.0, pool_size=2)
    config = FilterConfig.model_validate({"docker": docker.model_dump(), "concurrency": 2, "verifiers": ["tests"]})
    run_filter(write(tmp_path / "in.jsonl", samples), tmp_path / "f", config, show_progress=False)
    rejected = by_id(tmp_path / "f" / "rejected.jsonl")
    return set(by_id(tmp_path / "f" / "kept.jsonl")), {i: r["verdicts"][-1]["reason"] for i, r in rejected.items()}


def test_javascript_tests_run_under_node_and_an_early_exit_cannot_forge_a_pass(
    docker_client: Any, tmp_path: Path
) -> None:
    samples = [
        # the js block is the solution, not the usage example after it
        coded("right", "javascript", JS_RIGHT, JS_TESTS, "js", f"```js\n{JS_RIGHT}```\nRun:\n```bash\nnode x\n```"),
        coded("async-right", "javascript", JS_RIGHT, JS_ASYNC_TESTS, "js"),
        coded("wrong", "javascript", JS_WRONG, JS_TESTS, "javascript"),
        coded("exit-early", "javascript", JS_WRONG + "process.exit(0);\n", JS_TESTS, "js"),
        coded("exit-hook", "javascript", JS_WRONG + 'process.on("exit", () => (process.exitCode = 0))', JS_TESTS, "js"),
        coded("swallow", "javascript", JS_WRONG + 'process.on("uncaughtException", () => {});\n', JS_ASYNC_TESTS, "js"),
    ]  # fmt: skip
    kept, reasons = filter_verdicts(tmp_path, samples)
    assert kept == {"right", "async-right"}, reasons
    assert reasons["wrong"].startswith("tests failed (exit 1)") and "ERR_ASSERTION" in reasons["wrong"]
    assert reasons["exit-early"].startswith("tests did not run to their end")
    assert reasons["swallow"].startswith("tests did not run to their end")
    assert reasons["exit-hook"].startswith("tests did not run to their end")  # exit code 0, but no marker


def test_bash_tests_run_under_bash_and_an_exit_in_a_trap_cannot_forge_a_pass(
    docker_client: Any, tmp_path: Path
) -> None:
    samples = [
        coded("right", "bash", SH_RIGHT, SH_TESTS, "bash"),
        coded("wrong", "bash", SH_WRONG, SH_TESTS, "sh"),
        coded("exit-early", "bash", SH_WRONG + "exit 0\n", SH_TESTS, "bash"),
        coded("exit-trap", "bash", SH_WRONG + "trap 'exit 0' EXIT\n", SH_TESTS, "bash"),
        coded("exec", "bash", SH_WRONG + "exec true\n", SH_TESTS, "bash"),
        coded("fake-exit", "bash", SH_WRONG + "exit() { builtin exit 0; }\n", SH_TESTS, "bash"),
    ]
    kept, reasons = filter_verdicts(tmp_path, samples)
    assert kept == {"right"}, reasons
    assert reasons["wrong"].startswith("tests failed (exit 1)")
    for forger in ("exit-early", "exit-trap", "exec"):
        assert reasons[forger].startswith("tests did not run to their end"), (forger, reasons[forger])
    assert reasons["fake-exit"].startswith("tests failed (exit 1)")  # set -e ends the shell, not the fake exit


SOLUTIONS = {  # the shipped samples' functions; the last of each set is answered wrongly
    "add": "```javascript\nmodule.exports = { add: (a, b) => a + b };\n```",
    "reverseWords": "```js\nmodule.exports = { reverseWords: (s) => s.trim().split(/\\s+/).reverse().join(' ') };\n```",
    "isPalindrome": "```js\nmodule.exports = { isPalindrome: (s) => s === s };\n```",
    "add_sh": "```bash\nadd() { echo $(( $1 + $2 )); }\n```",
    "count_lines": '```bash\ncount_lines() { wc -l < "$1"; }\n```',
    "upper": '```bash\nupper() { echo "$1"; }\n```',
}


@pytest.mark.parametrize("language", ["javascript", "bash"])
def test_eval_scores_the_shipped_coding_samples_by_their_tests(
    docker_client: Any, tmp_path: Path, language: str
) -> None:
    sample = TASKS / f"code-{language}.jsonl"
    tasks = [json.loads(line) for line in sample.read_text().splitlines()]
    assert 2 <= len(tasks) <= 3 and all(t["language"] == language for t in tasks)

    def answer(request: dict[str, Any]) -> Reply:
        prompt = request["messages"][-1]["content"]
        name = re.search(r"function (\w+)", prompt).group(1)  # type: ignore[union-attr]
        return text_reply(SOLUTIONS[name + ("_sh" if (language, name) == ("bash", "add") else "")])

    docker = fast_config(timeout_s=6.0, pool_size=2).model_dump()
    with FakeServer(answer) as server:
        endpoint = {"base_url": server.base_url, "model": "student", "backoff_base_s": 0.01}
        config = EvalConfig.model_validate(
            {"tasks": str(sample), "endpoint": endpoint, "tools": [], "max_turns": 1, "tests": True, "docker": docker}
        )
        summary = run_eval(config, tmp_path / "eval", show_progress=False)
    rows = {r.task_id: r for r in summary.rows}
    assert {i: r.correct for i, r in rows.items()} == {t["id"]: t is not tasks[-1] for t in tasks}
    assert all("tests" in r.checks for r in rows.values())
