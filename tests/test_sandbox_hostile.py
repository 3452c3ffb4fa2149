"""Hostile code through the Docker runtime, each case as a trajectory's tool call would run it.

The cases are ``tracegen.runtime.selfcheck.CASES`` (what ``tracegen sandbox check`` runs), plus
checks of the exact observation each one records, and a crash of the whole host process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest

from tests.conftest import SECRET
from tests.docker_fixtures import (
    own_containers,
    started,
)
from tracegen.runtime.docker.settings import LABEL_RUN, MANAGED_FILTER
from tracegen.runtime.selfcheck import CASES, Case, check_config, run

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("no_leftover_containers")]


@pytest.mark.parametrize(("name", "expected", "case"), CASES, ids=[c[0].replace(" ", "-") for c in CASES])
@pytest.mark.anyio
async def test_selfcheck_case_holds(docker_client: Any, name: str, expected: str, case: Case) -> None:
    async with started(check_config()) as rt:
        observed, passed = await case(rt)
        assert passed, f"{name}: expected {expected}; observed {observed}"


@pytest.mark.anyio
async def test_infinite_loop_records_timeout_and_kill(docker_client: Any) -> None:
    async with started(timeout_s=2.0) as rt:
        ep = await rt.open_episode("t")
        started_at = time.monotonic()
        out = await run(ep, "bash", "echo begun; while :; do :; done")
        obs = out.observation
        assert obs.timed_out and obs.exit_code == 137 and obs.source == "executed"
        assert 2.0 <= time.monotonic() - started_at < 4.0
        assert out.content.startswith("begun") and "timed out after 2 s" in out.content
        await ep.close()


@pytest.mark.anyio
async def test_out_of_memory_is_recorded(docker_client: Any) -> None:
    async with started(mem_limit="128m") as rt:
        ep = await rt.open_episode("t")
        out = await run(ep, "python", "blocks = []\nwhile True:\n    blocks.append(b'x' * 2**24)")
        assert out.observation.oom_killed and out.observation.exit_code == 137
        assert "out of memory" in out.content
        again = await run(ep, "bash", "echo alive")  # the worker survived: same container
        assert again.content == "alive"
        await ep.close()


@pytest.mark.anyio
async def test_huge_output_keeps_head_and_tail_and_the_run_continues(docker_client: Any) -> None:
    async with started(keep_bytes=64 * 1024, max_chars=4000) as rt:
        ep = await rt.open_episode("t")
        out = await run(ep, "python", "import sys\nsys.stdout.write('START' + 'y' * 100_000_000 + 'FINISH\\n')")
        assert out.observation.truncated and out.observation.exit_code == 0
        assert out.content.startswith("START") and "FINISH" in out.content and len(out.content) <= 4000
        # A producer past kill_bytes is stopped instead of read to the end.
        flood = await run(ep, "bash", "yes flood")
        assert flood.observation.truncated and flood.observation.exit_code == 137
        assert "output too long" in flood.content
        assert (await run(ep, "bash", "echo alive")).content == "alive"
        await ep.close()


@pytest.mark.anyio
async def test_teacher_key_is_not_in_the_container(docker_client: Any) -> None:
    assert os.environ["TRACEGEN_TEACHER_API_KEY"] == SECRET  # set by conftest for every test

    async with started() as rt:
        ep = await rt.open_episode("t")
        out = await run(ep, "bash", "env; for p in /proc/[0-9]*; do tr '\\0' '\\n' < $p/environ; done 2>/dev/null")
        assert SECRET not in out.content and "TRACEGEN_TEACHER_API_KEY" not in out.content
        await ep.close()


CRASHER = textwrap.dedent(
    """
    import asyncio, json, sys, time
    from tracegen.runtime.docker.pool import DockerRuntime
    from tracegen.runtime.docker.settings import DockerRuntimeConfig
    from tracegen.runtime.selfcheck import run

    async def main():
        rt = DockerRuntime(DockerRuntimeConfig(pool_size=2))
        await rt.start()
        ep = await rt.open_episode("doomed")
        await run(ep, "bash", "true")
        print(json.dumps({"run_id": rt.run_id}), flush=True)
        await asyncio.sleep(600)

    asyncio.run(main())
    """
)


@pytest.mark.anyio
async def test_sigkilled_host_process_leaves_containers_that_the_next_start_sweeps(docker_client: Any) -> None:
    with subprocess.Popen([sys.executable, "-c", CRASHER], stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            run_id = json.loads(proc.stdout.readline())["run_id"]
            time.sleep(1.0)  # let the pool fill
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    filters = {"label": [MANAGED_FILTER["label"], f"{LABEL_RUN}={run_id}"]}
    orphans = docker_client.api.containers(all=True, filters=filters)
    assert orphans, "kill -9 skips all clean-up, so its containers are still there"

    async with started():
        assert docker_client.api.containers(all=True, filters=filters) == []
    assert own_containers(docker_client) == []
