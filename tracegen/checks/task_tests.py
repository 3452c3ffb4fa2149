"""The ``tests`` check: the task's tests run in the Docker sandbox against the trajectory's solution."""

from __future__ import annotations

import base64
import json
import re
import secrets
import time
from typing import TYPE_CHECKING, Literal

from tracegen.checks.protocol import Checked, Cost
from tracegen.checks.sandbox import SharedSandbox
from tracegen.client.tools import BUILTIN_TOOLS
from tracegen.errors import RuntimeToolError
from tracegen.fingerprint import deciding, fingerprint
from tracegen.records import AssistantMessage, ToolCall, Trajectory, Verdict

if TYPE_CHECKING:
    from tracegen.runtime.docker.pool import DockerRuntime


TESTS_FILE = "test_task.py"
SOLUTION_FILE = "solution.py"
ANSWER_FILE = "answer.txt"
_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.S)


def solution_code(t: Trajectory) -> str:
    """The trajectory's final code: the last fenced block of the final answer, else its last python call."""
    blocks = _FENCE.findall(t.final_answer or "")
    if blocks:
        return str(blocks[-1][1])
    for m in reversed(t.messages):
        if isinstance(m, AssistantMessage):
            for call in reversed(m.tool_calls):
                if call.name == "python":
                    try:
                        code = json.loads(call.arguments).get("code")
                    except (ValueError, AttributeError):
                        continue
                    if isinstance(code, str):
                        return code
    return ""


# Runs test_task.py as ``python3 test_task.py`` would, then prints the run's marker: only tests that ran
# to their end pass. A solution that ends the process early (``sys.exit(0)``, ``exit()``, ``os._exit(0)``
# on import) would otherwise hand its own exit code in as the verdict.
TESTS_RUNNER = """\
import os, runpy, sys
with open(".tracegen-marker") as f:
    marker = f.read()
os.unlink(".tracegen-marker")
solution = os.path.realpath("solution.py")
sys.argv = ["test_task.py"]
try:
    runpy.run_path("test_task.py", run_name="__main__")
except SystemExit as exc:
    if exc.code not in (None, 0):
        raise
    tb = exc.__traceback__
    while tb is not None:
        if os.path.realpath(tb.tb_frame.f_code.co_filename) == solution:
            sys.exit("the solution ended the test process before the tests finished")
        tb = tb.tb_next
sys.stdout.flush()
sys.stderr.write(marker + "\\n")  # last on the last stream shown: kept by every head-and-tail cut
sys.stderr.flush()
"""
RUNNER_FILE = ".tracegen-run-tests.py"


async def run_tests(t: Trajectory, runtime: DockerRuntime) -> Verdict:
    """Run the task's tests in a fresh sandbox against the trajectory; pass iff they finish and exit 0 in time.

    The sandbox's work dir gets ``solution.py`` (:func:`solution_code`), ``answer.txt`` (the final
    answer) and ``test_task.py`` (the task's ``tests``), which runs as ``python3 test_task.py`` would
    (through :data:`TESTS_RUNNER`), so a test can ``from solution import f`` or read ``answer.txt``. It
    passes only when it exits 0 *and* the runner printed this run's random marker after the tests ran
    to their end, so a solution that exits early fails. Not guaranteed: code in the solution's process
    that deliberately reads the runner's memory for the marker can still forge it (the tests and the
    solution share one process by design). The time limit is the runtime's ``timeout_s``. A sandbox
    that cannot run at all gives a ``tests_error:`` verdict (retried on resume).
    """
    marker = f"tracegen-tests-finished-{secrets.token_hex(16)}"
    files = {
        SOLUTION_FILE: solution_code(t),
        ANSWER_FILE: t.final_answer or "",
        TESTS_FILE: t.task.tests or "",
        RUNNER_FILE: TESTS_RUNNER,
        ".tracegen-marker": marker,
    }
    payload = {name: base64.b64encode(text.encode()).decode() for name, text in files.items()}
    writer = (
        "import base64, pathlib\n"
        f"for name, data in {payload!r}.items():\n"
        "    pathlib.Path(name).write_bytes(base64.b64decode(data))\n"
    )
    episode = await runtime.open_episode(t.id)
    started = time.monotonic()
    try:
        wrote = await episode.call(_call("python", writer), {"code": writer}, BUILTIN_TOOLS["python"])
        if wrote.observation.exit_code != 0:
            return Verdict(
                check="tests", passed=False, reason=f"tests_error: could not write files: {wrote.content[:200]}"
            )
        command = f"python3 {RUNNER_FILE}"
        out = await episode.call(_call("bash", command), {"command": command}, BUILTIN_TOOLS["bash"])
    except RuntimeToolError as exc:
        return Verdict(check="tests", passed=False, reason=f"tests_error: {exc.message}")
    finally:
        await episode.close()
    elapsed = time.monotonic() - started
    obs = out.observation
    if obs.source == "error":
        return Verdict(check="tests", passed=False, reason=f"tests_error: {out.content[:200]}")
    if obs.timed_out:
        return Verdict(check="tests", passed=False, score=0.0, reason=f"tests timed out ({elapsed:.1f} s)")
    finished = marker in out.content
    if obs.exit_code == 0 and finished:
        return Verdict(check="tests", passed=True, score=1.0, reason=f"tests passed in {elapsed:.1f} s")
    tail = out.content.replace(marker, "").strip()[-300:]
    if obs.exit_code == 0:
        return Verdict(check="tests", passed=False, score=0.0, reason=f"tests did not run to their end: {tail}")
    return Verdict(check="tests", passed=False, score=0.0, reason=f"tests failed (exit {obs.exit_code}): {tail}")


def _call(name: str, source: str) -> ToolCall:
    key = "code" if name == "python" else "command"
    return ToolCall(id=f"verify-{name}", name=name, arguments=json.dumps({key: source}))


class TestsCheck:
    """``tests``: the task's tests, run in the shared sandbox (:func:`run_tests`)."""

    __test__ = False  # not a pytest class, whatever its name
    name = "tests"
    cost: Cost = "sandbox"

    def __init__(self, sandbox: SharedSandbox, missing: Literal["skip", "reject"]) -> None:
        self.sandbox = sandbox
        self.missing = missing
        self.key = fingerprint(deciding(sandbox.config))

    def applies(self, t: Trajectory) -> bool:
        return bool(t.task.tests) or self.missing == "reject"

    async def __call__(self, t: Trajectory) -> Checked:
        if not t.task.tests:
            return Checked(Verdict(check="tests", passed=False, reason="task has no tests (tests_missing=reject)"))
        return Checked(await run_tests(t, await self.sandbox.get()))

    async def aclose(self) -> None:
        await self.sandbox.aclose()
