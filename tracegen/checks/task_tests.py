"""The ``tests`` check: the task's tests run in the Docker sandbox against the trajectory's solution."""

from __future__ import annotations

import base64
import json
import re
import secrets
import time
from typing import TYPE_CHECKING, Literal, NamedTuple

from tracegen.checks.protocol import Checked, Cost
from tracegen.checks.sandbox import SharedSandbox
from tracegen.client.tools import BUILTIN_TOOLS
from tracegen.errors import RuntimeToolError
from tracegen.fingerprint import deciding, fingerprint
from tracegen.records import AssistantMessage, TestsLanguage, ToolCall, Trajectory, Verdict

if TYPE_CHECKING:
    from tracegen.runtime.docker.pool import DockerRuntime


_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.S)
MARKER_FILE = ".tracegen-marker"

# Runs test_task.py as ``python3 test_task.py`` would, then prints the run's marker: only tests that ran
# to their end pass. A solution that ends the process early (``sys.exit(0)``, ``exit()``, ``os._exit(0)``
# on import) would otherwise hand its own exit code in as the verdict.
PYTHON_RUNNER = """\
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

# Runs test_task.js as ``node test_task.js`` would (CommonJS), then prints the marker when the event
# loop empties on its own. ``beforeExit`` is never emitted after ``process.exit()`` nor after an
# uncaught error, and the two handlers count an error even when the solution swallows it.
NODE_RUNNER = """\
"use strict";
const fs = require("fs");
const path = require("path");
const marker = fs.readFileSync(".tracegen-marker", "utf8");
fs.unlinkSync(".tracegen-marker");
let failed = false;
process.on("uncaughtExceptionMonitor", () => { failed = true; });
process.on("unhandledRejection", (reason) => { failed = true; throw reason; });
const tests = path.resolve("test_task.js");
process.argv[1] = tests;
require(tests);
process.once("beforeExit", (code) => {
  if (!failed && !code) process.stderr.write(marker + "\\n");
});
"""

# Runs test_task.sh as ``bash test_task.sh`` would, then prints the marker only when the tests ran to
# their last line with status 0: an ``exit`` anywhere (the solution's, a trap's, or the tests' own)
# ends the shell before it. ``((...))`` is syntax, so no function the solution defines can fake it.
BASH_RUNNER = """\
marker=$(< .tracegen-marker)
rm -f .tracegen-marker
source ./test_task.sh
status=$?
(( status == 0 )) && builtin printf '%s\\n' "$marker" >&2
exit "$status"
"""


class Language(NamedTuple):
    """Where a language's solution and tests go in the sandbox, and how they run."""

    solution: str
    tests: str
    runner: str  # file name of the runner
    runner_source: str
    command: str  # run by the ``bash`` tool: a fresh interpreter, never the worker's python zygote
    fences: tuple[str, ...]  # code-fence tags that mark a block in this language
    tool: str | None  # the tool call whose code is the solution when the answer has no fenced block


LANGUAGES: dict[TestsLanguage, Language] = {
    "python": Language(
        "solution.py", "test_task.py", ".tracegen-run-tests.py", PYTHON_RUNNER,
        "python3 .tracegen-run-tests.py", ("python", "py", "python3"), "python",
    ),
    "javascript": Language(
        "solution.js", "test_task.js", ".tracegen-run-tests.js", NODE_RUNNER,
        "node .tracegen-run-tests.js", ("javascript", "js", "node", "nodejs"), None,
    ),
    "bash": Language(
        "solution.sh", "test_task.sh", ".tracegen-run-tests.sh", BASH_RUNNER,
        "bash .tracegen-run-tests.sh", ("bash", "sh", "shell"), "bash",
    ),
}  # fmt: skip
ANSWER_FILE = "answer.txt"


def solution_code(t: Trajectory) -> str:
    """The trajectory's final code in its task's language.

    The last fenced block of the final answer tagged with the language (``js``, ``bash``, ...), else its
    last fenced block, else the code of the last call of the language's tool (``python``, ``bash``).
    """
    language = LANGUAGES[t.task.language]
    blocks = _FENCE.findall(t.final_answer or "")
    tagged = [code for tag, code in blocks if tag.lower() in language.fences]
    if tagged or blocks:
        return str((tagged or [code for _, code in blocks])[-1])
    key = "code" if language.tool == "python" else "command"
    for m in reversed(t.messages):
        if isinstance(m, AssistantMessage):
            for call in reversed(m.tool_calls):
                if call.name == language.tool:
                    try:
                        code = json.loads(call.arguments).get(key)
                    except (ValueError, AttributeError):
                        continue
                    if isinstance(code, str):
                        return code
    return ""


async def run_tests(t: Trajectory, runtime: DockerRuntime) -> Verdict:
    """Run the task's tests in a fresh sandbox against the trajectory; pass iff they finish and exit 0 in time.

    The task's ``language`` picks the files and the interpreter (:data:`LANGUAGES`): for python the
    sandbox's work dir gets ``solution.py`` (:func:`solution_code`), ``answer.txt`` (the final answer)
    and ``test_task.py`` (the task's ``tests``), which runs as ``python3 test_task.py`` would (through
    :data:`PYTHON_RUNNER`), so a test can ``from solution import f`` or read ``answer.txt``; javascript
    has ``solution.js`` / ``test_task.js`` run by ``node`` (``require("./solution")``), bash
    ``solution.sh`` / ``test_task.sh`` run by ``bash`` (``source ./solution.sh``). Files are written
    and the tests run by ``bash`` commands as the sandbox user, never in the worker's python zygote.
    A run passes only when it exits 0 *and* its runner printed this run's random marker after the
    tests ran to their end, so a solution that exits early (or exits 0 from a trap) fails; bash tests
    must therefore not ``exit 0`` themselves. Not guaranteed: code in the solution's process that
    deliberately reads the runner's state for the marker (its memory; the bash runner's variables,
    node's process events) can still forge it (the tests and the solution share one process by
    design). The time limit is the runtime's ``timeout_s``. A sandbox that cannot run at all gives a
    ``tests_error:`` verdict (retried on resume).
    """
    language = LANGUAGES[t.task.language]
    marker = f"tracegen-tests-finished-{secrets.token_hex(16)}"
    files = {
        language.solution: solution_code(t),
        ANSWER_FILE: t.final_answer or "",
        language.tests: t.task.tests or "",
        language.runner: language.runner_source,
        MARKER_FILE: marker,
    }
    # base64 text needs no quoting; the names are ours.
    writer = "set -e\n" + "".join(
        f"printf %s '{base64.b64encode(text.encode()).decode()}' | base64 -d > '{name}'\n"
        for name, text in files.items()
    )
    episode = await runtime.open_episode(t.id)
    started = time.monotonic()
    try:
        wrote = await episode.call(_call("bash", writer), {"command": writer}, BUILTIN_TOOLS["bash"])
        if wrote.observation.exit_code != 0:
            return Verdict(
                check="tests", passed=False, reason=f"tests_error: could not write files: {wrote.content[:200]}"
            )
        command = language.command
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
