"""The hostile-code self-test: what ``tracegen sandbox check`` runs against an engine and image.

Each case runs code through :class:`~tracegen.runtime.docker.pool.DockerRuntime` exactly as a
trajectory's tool call would, and reports what it expected, what it observed, and whether the
sandbox held. The test suite runs the same cases (``tests/test_sandbox_hostile.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NamedTuple

from tracegen.errors import RuntimeToolError
from tracegen.records import ToolCall, ToolSpec
from tracegen.runtime.base import ToolOutput
from tracegen.runtime.docker.episode import DockerEpisode
from tracegen.runtime.docker.pool import DockerRuntime
from tracegen.runtime.docker.settings import RESTART_NOTE, DockerRuntimeConfig

PYTHON = ToolSpec(name="python", description="Run Python code.", parameters={"type": "object"})
BASH = ToolSpec(name="bash", description="Run a bash command.", parameters={"type": "object"})
SECRET_ENV = ("TRACEGEN_TEACHER_API_KEY", "OPENAI_API_KEY", "HF_TOKEN")


class CheckRow(NamedTuple):
    case: str
    expected: str
    observed: str
    passed: bool


class Outcome(NamedTuple):
    observed: str
    passed: bool


Case = Callable[[DockerRuntime], Awaitable[Outcome]]


def check_config(base: DockerRuntimeConfig | None = None) -> DockerRuntimeConfig:
    """The configured sandbox with short deadlines and a small memory limit, so the check is quick."""
    base = base or DockerRuntimeConfig()
    return base.model_copy(update={"timeout_s": 3.0, "kill_grace_s": 5.0, "mem_limit": "256m", "pool_size": 2})


async def run(episode: DockerEpisode, tool: str, source: str) -> ToolOutput:
    key = "code" if tool == "python" else "command"
    spec = PYTHON if tool == "python" else BASH
    call = ToolCall(id=f"call-{secrets.token_hex(4)}", name=tool, arguments="{}")
    return await episode.call(call, {key: source}, spec)


@contextlib.asynccontextmanager
async def _episode(rt: DockerRuntime) -> AsyncIterator[DockerEpisode]:
    """One trajectory's episode for a case, closed (and its container released) however the case ends."""
    ep = await rt.open_episode(f"selfcheck-{secrets.token_hex(4)}")
    try:
        yield ep
    finally:
        await ep.close()


COUNT_PROCS = "import os; print(sum(1 for p in os.listdir('/proc') if p.isdigit()))"


async def infinite_loop(rt: DockerRuntime) -> Outcome:
    async with _episode(rt) as ep:
        out = await run(ep, "python", "while True:\n    pass")
        after = await run(ep, "bash", "echo alive")
        obs = out.observation
        ok = obs.timed_out and obs.duration_s < rt.config.timeout_s + 2 and after.content.strip() == "alive"
        return Outcome(f"timed_out={obs.timed_out} after {obs.duration_s:.1f}s; next call: {after.content[:40]!r}", ok)


async def background_children(rt: DockerRuntime) -> Outcome:
    async with _episode(rt) as ep:
        out = await run(ep, "bash", "sleep 300 & sleep 301; wait")
        procs = await run(ep, "python", COUNT_PROCS)
        left = int(procs.content.strip()) if procs.content.strip().isdigit() else -1
        # init, the keepalive sleep, the worker and this python: nothing else.
        ok = out.observation.timed_out and 0 < left <= 4
        return Outcome(f"timed_out={out.observation.timed_out}; processes after: {left}", ok)


async def fork_bomb(rt: DockerRuntime) -> Outcome:
    async with _episode(rt) as ep:
        out = await run(ep, "bash", "bomb() { bomb | bomb & }; bomb; sleep 2; echo survived")
        after = await run(ep, "bash", "echo alive")
        host_ok = subprocess.run(["true"], check=False).returncode == 0
        # On a loaded host the bomb may outlive its deadline: the container is then replaced, which is
        # the promise too (the next call is answered), so the restart note is no failure.
        ok = after.content.removeprefix(RESTART_NOTE).strip() == "alive" and host_ok
        return Outcome(
            f"bomb call exit={out.observation.exit_code} timed_out={out.observation.timed_out}; "
            f"next call: {after.content[:30]!r}; host forks: {host_ok}",
            ok,
        )


async def memory_hog(rt: DockerRuntime) -> Outcome:
    async with _episode(rt) as ep:
        out = await run(
            ep, "python", "x = bytearray(4 * 1024**3)\nx[::4096] = b'1' * len(x[::4096])\nprint('no limit')"
        )
        obs = out.observation
        return Outcome(
            f"oom_killed={obs.oom_killed} exit={obs.exit_code}", obs.oom_killed and "no limit" not in out.content
        )


async def huge_output(rt: DockerRuntime) -> Outcome:
    async with _episode(rt) as ep:
        code = "import sys\nsys.stdout.write('HEAD' + 'x' * 100_000_000 + 'TAIL\\n')"
        started = time.monotonic()
        out = await run(ep, "python", code)
        took = time.monotonic() - started
        after = await run(ep, "bash", "echo alive")
        obs = out.observation
        ok = (
            obs.truncated
            and out.content.startswith("HEAD")
            and "TAIL" in out.content
            and len(out.content) <= rt.max_chars
            and after.content.strip() == "alive"
        )
        return Outcome(f"truncated={obs.truncated}, {len(out.content)} chars shown, {took:.1f}s; run continues", ok)


async def outbound_tcp(rt: DockerRuntime) -> Outcome:
    async with _episode(rt) as ep:
        code = (
            "import socket\n"
            "for host in ('1.1.1.1', '8.8.8.8'):\n"
            "    try:\n"
            "        socket.create_connection((host, 53), timeout=2); print('CONNECTED', host)\n"
            "    except OSError as e:\n"
            "        print('refused:', e)"
        )
        out = await run(ep, "python", code)
        return Outcome(out.content.splitlines()[0][:80] if out.content else "", "CONNECTED" not in out.content)


async def write_system_dirs(rt: DockerRuntime) -> Outcome:
    async with _episode(rt) as ep:
        out = await run(
            ep, "bash", "for d in / /usr /etc; do touch $d/tracegen-probe 2>/dev/null && echo WROTE $d; done; echo done"
        )
        return Outcome(out.content.replace("\n", " ")[:80], "WROTE" not in out.content)


async def host_environment(rt: DockerRuntime) -> Outcome:
    canary = f"canary-{secrets.token_hex(8)}"
    os.environ["TRACEGEN_SELFCHECK_CANARY"] = canary
    try:
        async with _episode(rt) as ep:
            out = await run(ep, "bash", "env; cat /proc/1/environ 2>/dev/null | tr '\\0' '\\n'")
    finally:
        os.environ.pop("TRACEGEN_SELFCHECK_CANARY", None)
    values = [canary] + [v for k in SECRET_ENV if (v := os.environ.get(k))]
    leaked = [v for v in values if v in out.content] + [k for k in SECRET_ENV if k in out.content]
    return Outcome("none visible" if not leaked else f"{len(leaked)} visible", not leaked)


async def privileges(rt: DockerRuntime) -> Outcome:
    async with _episode(rt) as ep:
        out = await run(ep, "bash", "id -u; grep CapEff /proc/self/status; grep NoNewPrivs /proc/self/status")
        lines = out.content.split()
        ok = lines[:1] != ["0"] and "0000000000000000" in out.content and "NoNewPrivs:\t1" in out.content
        return Outcome(out.content.replace("\n", " ").replace("\t", " ")[:80], ok)


async def kill_worker(rt: DockerRuntime) -> Outcome:
    async with _episode(rt) as ep:
        await run(ep, "bash", "echo MARK-7f3 > state.txt")
        first = ep.container_id
        killed = await run(ep, "bash", "kill -9 $PPID 1; kill -STOP $PPID; echo tried")
        after = await run(ep, "bash", "cat state.txt 2>&1; echo alive")
        same = ep.container_id == first
        ok = same and "not permitted" in killed.content and "MARK-7f3" in after.content and "alive" in after.content
        return Outcome(f"kill answered {killed.content.splitlines()[-1][:50]!r}; same container: {same}", ok)


# Lists every other process's pid and real uid; used by the cases that attack the worker and PID 1.
OTHER_PROCESSES = (
    "import os\n"
    "def others():\n"
    "    for p in os.listdir('/proc'):\n"
    "        if p.isdigit() and int(p) not in (os.getpid(), os.getppid()):\n"
    "            try:\n"
    "                uid = int([l for l in open(f'/proc/{p}/status') if l.startswith('Uid:')][0].split()[1])\n"
    "            except (OSError, IndexError):\n"
    "                continue\n"
    "            if uid != os.getuid():\n"
    "                yield int(p)\n"
)


async def forged_reply(rt: DockerRuntime) -> Outcome:
    """The attack that made a tests verdict forgeable: write a worker reply into the worker's stdout."""
    async with _episode(rt) as ep:
        forge = OTHER_PROCESSES + (
            "import json\n"
            "fake = {'op': 'result', 'exit_code': 0, 'stdout': 'FORGED', 'stderr': '', 'timed_out': False}\n"
            "for i in range(1, 20):\n"
            "    line = json.dumps({**fake, 'id': i}) + '\\n'\n"
            "    for pid in others():\n"
            "        for fd in range(0, 16):\n"
            "            try:\n"
            "                with open(f'/proc/{pid}/fd/{fd}', 'w') as f: f.write(line)\n"
            "                print('WROTE', pid, fd)\n"
            "            except OSError:\n"
            "                pass\n"
            "print('done')"
        )
        out = await run(ep, "python", forge)
        after = await run(ep, "bash", "echo genuine")
        ok = out.content == "done" and after.content == "genuine" and out.observation.source == "executed"
        return Outcome(f"forger saw {out.content[:40]!r}; next call saw {after.content[:30]!r}", ok)


LIE_TO_EVERY_FD = (
    "import os\n"
    "for fd in [int(fd) for fd in os.listdir('/proc/self/fd') if int(fd) > 2]:\n"
    "    try:\n"
    "        os.write(fd, b'exit 0\\n')\n"
    "    except OSError:\n"
    "        pass\n"
)


async def forged_exit_report(rt: DockerRuntime) -> Outcome:
    """A python call tells the worker its exit status on a pipe of its own (the host is answered while
    its process exits). Code that writes that report itself gains nothing it has not with os._exit: a
    report followed by another is ignored, and one that ends the call early leaves no process behind."""
    async with _episode(rt) as ep:
        lied = await run(ep, "python", LIE_TO_EVERY_FD + "print('lied')\nraise SystemExit(3)")
        ended = await run(ep, "python", LIE_TO_EVERY_FD + "os.close(1)\nos.close(2)\nwhile True:\n    pass")
        seen = await run(ep, "python", SHOW_STATE)
        try:
            left = json.loads(seen.content)["procs"]
        except (ValueError, KeyError):
            return Outcome(f"unreadable state: {seen.content[:60]!r}", False)
        ok = (
            lied.content == "lied\n[exit code 3]"
            and not ended.observation.timed_out
            and ended.observation.exit_code == 0
            and left == []
        )
        observed = f"exit {lied.observation.exit_code} after a forged report; early end leaves processes {left}"
        return Outcome(observed, ok)


async def ptrace_worker(rt: DockerRuntime) -> Outcome:
    async with _episode(rt) as ep:
        code = OTHER_PROCESSES + (
            "import ctypes\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "for pid in others():\n"
            "    if libc.ptrace(16, pid, 0, 0) == 0:\n"  # PTRACE_ATTACH
            "        print('ATTACHED', pid)\n"
            "    try:\n"
            "        open(f'/proc/{pid}/mem', 'rb').read(1); print('READ MEM', pid)\n"
            "    except OSError:\n"
            "        pass\n"
            "print('done')"
        )
        out = await run(ep, "python", code)
        return Outcome(repr(out.content[:60]), out.content == "done")


async def pid1_streams(rt: DockerRuntime) -> Outcome:
    """PID 1's output is the container log on the host: unreachable, and the log is off anyway."""
    async with _episode(rt) as ep:
        out = await run(
            ep, "bash", "for fd in 1 2; do echo flood > /proc/1/fd/$fd && echo WROTE $fd; done 2>/dev/null; echo done"
        )
        state = await rt._api(rt.engines[0].client.api.inspect_container, ep.container_id or "")
        log_type = state["HostConfig"]["LogConfig"]["Type"]
        ok = out.content == "done" and log_type == "none"
        return Outcome(f"{out.content.replace(chr(10), ' ')[:40]}; container log driver {log_type!r}", ok)


async def host_buffer_flood(rt: DockerRuntime) -> Outcome:
    """Output is bounded at every hop: the worker's captures, the host's reply line, what the model sees."""
    async with _episode(rt) as ep:
        before = _rss_mb()
        code = "import os\nchunk = b'{\"op\": \"result\"' + b'x' * 65536\nwhile True:\n    os.write(1, chunk)"
        out = await run(ep, "python", code)
        grew = _rss_mb() - before
        after = await run(ep, "bash", "echo alive")
        ok = out.observation.truncated and grew < 64 and after.content == "alive"
        return Outcome(f"flood truncated={out.observation.truncated}; host RSS +{grew:.0f} MB", ok)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


async def bad_arguments(rt: DockerRuntime) -> Outcome:
    """Text no program can take (NUL, lone surrogate) or a wrong type is an error the teacher sees."""
    async with _episode(rt) as ep:
        spec = PYTHON
        outs = [
            await ep.call(ToolCall(id="c1", name="python", arguments="{}"), {"code": "print(1)\x00"}, spec),
            await ep.call(ToolCall(id="c2", name="python", arguments="{}"), {"code": "print('\ud800')"}, spec),
            await ep.call(ToolCall(id="c3", name="python", arguments="{}"), {"code": 5}, spec),
        ]
        after = await run(ep, "bash", "echo alive")
        ok = all(o.observation.source == "error" for o in outs) and after.content == "alive"
        return Outcome(" | ".join(o.content[:30] for o in outs), ok)


async def writable_places(rt: DockerRuntime) -> Outcome:
    """Everything the sandbox user can write to is a mount that a reset empties."""
    async with _episode(rt) as ep:
        out = await run(
            ep,
            "bash",
            "find / \\( -path /proc -o -path /sys \\) -prune -o -writable ! -type c ! -type l -print 2>/dev/null; true",
        )
        mounts = rt.config.reset_mounts()
        outside = [p for p in out.content.splitlines() if not any(p == m or p.startswith(m + "/") for m in mounts)]
        return Outcome(f"outside the reset mounts: {outside[:3] or 'nothing'}", not outside and bool(out.content))


LEAVE_STATE = (
    "echo secret > /work/left.txt; mkdir -p /tmp/d/e; echo x > /tmp/d/e/f; chmod 000 /tmp/d; "
    "echo s > /dev/shm/segment; echo q > /dev/mqueue/queue 2>/dev/null; "
    "python3 -c 'import ctypes; l = ctypes.CDLL(None); print(l.msgget(1234, 0o1600), l.shmget(99, 4096, 0o1600))'; "
    "(setsid sleep 300 &); echo planted"
)
LOCK_WORK_DIR = "chmod 000 /work"  # the last call of a trajectory: no later call could chdir there
# What a trajectory can see of an earlier one: files in every writable mount, SysV IPC objects,
# processes of its own uid besides itself, the work dir's mode.
SHOW_STATE = """
import json, os
mounts = {m: os.listdir(m) for m in ('/work', '/tmp', '/dev/shm', '/dev/mqueue')}
ipc = sum(len(open(f'/proc/sysvipc/{k}').readlines()) - 1 for k in ('msg', 'shm', 'sem'))
def uid(p):
    try:
        return int([l for l in open(f'/proc/{p}/status') if l.startswith('Uid:')][0].split()[1])
    except (OSError, IndexError):
        return -1
procs = [p for p in os.listdir('/proc') if p.isdigit() and int(p) != os.getpid() and uid(p) == os.getuid()]
print(json.dumps({'mounts': mounts, 'ipc': ipc, 'procs': procs, 'mode': oct(os.stat('/work').st_mode & 0o7777)}))
"""


def leftovers(state: dict[str, Any]) -> list[str]:
    """What of an earlier trajectory a SHOW_STATE report still shows; empty when the container is clean."""
    found = [f"{m}/{name}" for m, names in state["mounts"].items() for name in names]
    found += [f"{state['ipc']} SysV IPC object(s)"] if state["ipc"] else []
    found += [f"process {p}" for p in state["procs"]]
    found += [f"/work mode {state['mode']}"] if state["mode"] != "0o755" else []
    return found


async def recycled_is_clean(rt: DockerRuntime) -> Outcome:
    """A file, a process, a /dev/shm segment and SysV objects left by one trajectory are gone for the next."""
    if not rt.config.recycle:
        return Outcome("recycling is off: every trajectory gets a fresh container", True)
    async with _episode(rt) as first:
        planted = await run(first, "bash", LEAVE_STATE)
        await run(first, "bash", LOCK_WORK_DIR)
        used = first.container_id
    # Reset containers rejoin the back of the pool: take containers until the used one comes back.
    for _ in range(rt.config.pool_size + 3):
        async with _episode(rt) as ep:
            seen = await run(ep, "python", SHOW_STATE)
            again = ep.container_id == used
        if again:
            break
    try:
        left = leftovers(json.loads(seen.content))
    except (ValueError, KeyError):
        return Outcome(f"unreadable state: {seen.content[:60]!r}", False)
    ok = "planted" in planted.content and again and not left
    return Outcome(f"same container again: {again}; left over: {left[:3] or 'nothing'}", ok)


async def state_across_calls(rt: DockerRuntime) -> Outcome:
    async with _episode(rt) as ep:
        await run(ep, "python", "open('notes.txt', 'w').write('remembered')")
        out = await run(ep, "bash", "cat notes.txt")
        return Outcome(repr(out.content[:40]), out.content == "remembered")


async def isolation(rt: DockerRuntime) -> Outcome:
    async with _episode(rt) as a, _episode(rt) as b:
        await asyncio.gather(run(a, "bash", "echo A > mine.txt"), run(b, "bash", "echo B > mine.txt"))
        seen_a, seen_b = await asyncio.gather(run(a, "bash", "cat mine.txt"), run(b, "bash", "cat mine.txt"))
        ok = seen_a.content == "A" and seen_b.content == "B" and a.container_id != b.container_id
        return Outcome(f"A sees {seen_a.content!r}, B sees {seen_b.content!r}", ok)


CASES: list[tuple[str, str, Case]] = [
    ("state across calls", "a file written by one call is read by the next", state_across_calls),
    ("concurrent isolation", "two trajectories never see each other's files", isolation),
    ("infinite loop", "timed out at the deadline; the sandbox answers the next call", infinite_loop),
    ("background children", "`sleep 300 & sleep 301; wait` timed out, no process left", background_children),
    ("fork bomb", "stopped by pids_limit; next call and the host fine", fork_bomb),
    ("memory hog", "allocating past mem_limit is OOM-killed (oom_killed)", memory_hog),
    ("100 MB of output", "capped; head and tail kept; the run continues", huge_output),
    ("outbound TCP", "no connection (network none)", outbound_tcp),
    ("write to / and /usr", "refused (read-only root, non-root user)", write_system_dirs),
    ("host environment", "no host variable or teacher key inside", host_environment),
    ("privileges", "non-root, no capabilities, no-new-privileges", privileges),
    ("attack the worker", "no signal reaches the worker or PID 1; files kept", kill_worker),
    ("forged reply", "writing a worker reply into another process's fds is refused", forged_reply),
    ("forged exit report", "no more than os._exit: a second report is ignored, no process left", forged_exit_report),
    ("ptrace", "the worker and PID 1 cannot be traced or their memory read", ptrace_worker),
    ("PID 1 streams", "unwritable; the container log is off", pid1_streams),
    ("host buffer flood", "output bounded end to end; host memory flat", host_buffer_flood),
    ("bad arguments", "NUL, lone surrogate, wrong type: error observations", bad_arguments),
    ("writable places", "only the mounts a reset empties are writable", writable_places),
    ("recycled container", "the next trajectory sees nothing of the last", recycled_is_clean),
]


async def run_selfcheck(config: DockerRuntimeConfig | None = None) -> list[CheckRow]:
    """Run every case against the configured engine(s) and image; raises RuntimeToolError if none answers."""
    runtime = DockerRuntime(check_config(config))
    rows: list[CheckRow] = []
    try:
        await runtime.start()
        for name, expected, case in CASES:
            try:
                observed, passed = await case(runtime)
            except RuntimeToolError as exc:
                observed, passed = f"runtime error: {exc.message}", False
            rows.append(CheckRow(name, expected, observed, passed))
    finally:
        await runtime.aclose()
    return rows
